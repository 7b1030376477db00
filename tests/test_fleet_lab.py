"""A session between two intermediates of a fleet behind NATs (the NAT lab, real processes).

Both intermediates and their Redis run on the lab's public host; the agent, behind its NAT,
homes on relay1 and the connector, behind its own, on relay2. Behind port-restricted NATs
hole punching goes direct exactly as with one intermediate; behind symmetric NATs the
session stays on the relay, carried through both intermediates.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from labroles import INTERMEDIATE_PORT, Deployment, Transfer, wait
from netlab import _ns, lab  # noqa: F401 - the fixture
from redis_helpers import need_redis

from mahole import identity

RELAY2_PORT = INTERMEDIATE_PORT + 1
RELAY2_STATUS = 9101
REDIS_PORT = 6379  # inside the lab's public namespace, on its own loopback


class FleetDeployment(Deployment):
    """relay1 and relay2 of one fleet; with ``everywhere`` both nodes know both (the agent
    relay1 first, the connector relay2 first) and home on the nearest."""

    def __init__(self, *args, everywhere=False, **kwargs):
        self.everywhere = everywhere
        super().__init__(*args, **kwargs)

    def start_agent(self, agent_args):
        if self.everywhere:
            agent_args = (*agent_args, "--intermediate", self.relay2_addr)
        return super().start_agent(agent_args)

    def start_intermediate(self):
        identity.issue(self.tmp_path, "intermediate", "relay2", hosts=[self.public.ip])
        self.redis = self.public.popen(
            ["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.tmp_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait(self._redis_up, 10, "redis-server in the lab")
        fleet = ("--registry", f"redis://127.0.0.1:{REDIS_PORT}/0", "--allow", "*=*")
        self.relay2_addr = f"{self.public.ip}:{RELAY2_PORT}"
        log = open(self.tmp_path / "relay2.log", "a")
        self.relay2 = self.public.popen(
            [sys.executable, "-m", "mahole", "intermediate", "--listen",
             f"0.0.0.0:{RELAY2_PORT}", "--fleet-address", self.relay2_addr,
             "--status", f"127.0.0.1:{RELAY2_STATUS}", *fleet,
             *self.creds("relay2")], stdout=log, stderr=subprocess.STDOUT)
        self.relay2.host, self.relay2.log_path = self.public, self.tmp_path / "relay2.log"
        return self._role(self.public, "intermediate", "--listen",
                          f"0.0.0.0:{INTERMEDIATE_PORT}", "--fleet-address", self.relay_addr,
                          *fleet, *self.creds("intermediate"))

    def start_connector(self):
        fallback = ("--intermediate", self.relay_addr) if self.everywhere else ()
        return self._role(self.connector_host, "connector", "--intermediate", self.relay2_addr,
                          *fallback, "--service", "echo=tcp:127.0.0.1:7000",
                          *self.connector_args, *self.creds("connector1"))

    def _redis_up(self):
        try:
            with _ns.entered(self.public.ns):
                sock = socket.create_connection(("127.0.0.1", REDIS_PORT), timeout=0.5)
            with sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def relay2_status(self):
        return self.status(self.relay2, RELAY2_STATUS)

    def logs(self):
        # The fleet's counters say where a message between the two was lost, if one was
        # (the roles log warnings only).
        counters = {}
        for name, status in (("relay1", self.status(self.intermediate)),
                             ("relay2", self.relay2_status())):
            status = status or {}
            counters[name] = {**((status.get("fleet") or {}).get("counters") or {}),
                              **{k: v for k, v in (status.get("counters") or {}).items()
                                 if k.startswith(("fleet", "sessions_"))}}
        return super().logs() + (f"\n--- relay2.log\n"
                                 f"{self.relay2.log_path.read_text()[-3000:]}"
                                 f"\n--- fleet counters\n{json.dumps(counters)}")


@pytest.mark.parametrize("nat, path", [("port-restricted", "direct"), ("symmetric", "relay")])
def test_a_session_between_intermediates_behind_nats(lab, tmp_path, nat, path):
    need_redis()
    d = FleetDeployment(lab, tmp_path, nat, nat)
    d.wait_registered()
    def sees_relay2():
        fleet = (d.status(d.intermediate) or {}).get("fleet") or {}
        return fleet.get("remote_nodes") == {"relay2": 1} and "relay2" in fleet["reachable"]
    wait(sees_relay2, 20, "relay1 to see the connector at relay2", d)
    data = os.urandom(1 << 20)
    assert d.round_trip(data) == data, d.logs()
    wait(lambda: (d.session() or {}).get("path") == path, 20, f"the {path} path", d)
    relay1, relay2 = d.status(d.intermediate), d.relay2_status()
    assert relay1["counters"]["sessions_across"] == 1, d.logs()
    assert relay2["counters"]["sessions_mirrored"] == 1, d.logs()
    if path == "relay":
        for status in (relay1, relay2):
            assert status["relay"]["relayed_bytes"] > 2 * len(data), d.logs()
    assert d.round_trip(data) == data, d.logs()


def test_killing_the_agents_intermediate_mid_transfer_loses_nothing_on_the_relay(lab, tmp_path):
    """Behind symmetric NATs the session is relayed. The agent's intermediate is killed
    (SIGKILL) mid-transfer: the agent homes on the other, which takes the session over (or
    both members re-home there and resume it together); the same TCP stream, on the same
    end-to-end connection, ends byte-identical."""
    need_redis()
    d = FleetDeployment(lab, tmp_path, "symmetric", "symmetric", everywhere=True)
    d.wait_registered()

    def each_sees_both_nodes():
        # Wherever the two homed, each intermediate knows both (its own and the other's)
        # and reaches the other: the agent's home can find the connector.
        for status in (d.status(d.intermediate), d.relay2_status()):
            nodes, fleet = (status or {}).get("nodes") or {}, (status or {}).get("fleet") or {}
            held = nodes.get("agents", 0) + nodes.get("connectors", 0)
            if held + sum((fleet.get("remote_nodes") or {}).values()) != 2 \
                    or not fleet.get("reachable"):
                return False
        return True
    wait(each_sees_both_nodes, 20, "each intermediate to see both nodes", d)
    data = os.urandom(12 << 20)
    transfer = Transfer(d, data, pace=0.01)  # ~3 MB/s for about four seconds
    wait(lambda: len(transfer.received) > 1 << 20, 30, "the transfer to get going", d)
    session = d.session()
    assert session["path"] == "relay", d.logs()
    home = d.status(d.agent)["intermediate"]["addr"]
    victim = d.intermediate if home == d.relay_addr else d.relay2
    killed_at = time.monotonic()
    os.killpg(victim.pid, signal.SIGKILL)
    assert transfer.join() == data, d.logs()
    stall = transfer.longest_stall_after(killed_at)
    after = d.session()
    assert after["session"] == session["session"] and after["path"] == "relay", d.logs()
    assert after["relay_moves"] == 1 and after["relay_addr"] != home, d.logs()
    print(f"relayed stream stalled {stall:.2f} s across the kill of its intermediate")
    assert stall < 6.0, d.logs()
