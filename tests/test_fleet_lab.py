"""A session between two intermediates of a fleet behind NATs (the NAT lab, real processes).

Both intermediates and their Redis run on the lab's public host; the agent, behind its NAT,
homes on relay1 and the connector, behind its own, on relay2. Behind port-restricted NATs
hole punching goes direct exactly as with one intermediate; behind symmetric NATs the
session stays on the relay, carried through both intermediates.
"""

import os
import socket
import subprocess
import sys

import pytest

from labroles import INTERMEDIATE_PORT, Deployment, wait
from netlab import _ns, lab  # noqa: F401 - the fixture
from redis_helpers import need_redis

from mahole import identity

RELAY2_PORT = INTERMEDIATE_PORT + 1
RELAY2_STATUS = 9101
REDIS_PORT = 6379  # inside the lab's public namespace, on its own loopback


class FleetDeployment(Deployment):
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
        return self._role(self.connector_host, "connector", "--intermediate", self.relay2_addr,
                          "--service", "echo=tcp:127.0.0.1:7000", *self.connector_args,
                          *self.creds("connector1"))

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
        return super().logs() + (f"\n--- relay2.log\n"
                                 f"{self.relay2.log_path.read_text()[-3000:]}")


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
