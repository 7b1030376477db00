"""Hole punching behind real NATs: every pair of NAT presets, real role processes.

Each cell builds a small internet in network namespaces (tests/netlab): the intermediate on
the public segment, the agent and the connector each behind a NAT router of a preset (or on
the public segment for `none`). The roles run as `python -m mahole …` processes; a TCP forward
moves data and the path the session ends on must be the one theory predicts: direct in every
cell but symmetric × symmetric and symmetric × port-restricted (either order), which use the
relay — a symmetric side reaching a full-cone or public peer gets through by peer-reflexive
discovery. The observed matrix is printed in the test report and written to
benchmarks/results/nat_matrix.json.
"""

import itertools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import netlab
from netlab import lab  # noqa: F401 - the fixture
from netlab import _ns
from mahole.demo import issue_certificates

PRESETS = ("none", "full-cone", "port-restricted", "symmetric")
RELAY_CELLS = {("symmetric", "symmetric"), ("symmetric", "port-restricted"),
               ("port-restricted", "symmetric")}
INTERMEDIATE_PORT = 4478
STATUS_PORT = 9100
FORWARD_PORT = 8080
ECHO_PORT = 7000
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"

_ECHO = """
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen()
def serve(c):
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
    c.shutdown(socket.SHUT_WR)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

observed = {}


def expected_path(agent, connector):
    return "relay" if (agent, connector) in RELAY_CELLS else "direct"


class Deployment:
    """The three roles (and an echo service) as processes inside a lab."""

    def __init__(self, lab, tmp_path, agent_nat, connector_nat, *, agent_args=(),
                 connector_args=(), intermediate_args=()):
        self.lab = lab
        self.tmp_path = tmp_path
        self.public = lab.public_host(name="inter")
        self.agent_host = lab.host(agent_nat, name="agent")
        self.connector_host = lab.host(connector_nat, name="conn")
        issue_certificates(tmp_path, host=self.public.ip)
        creds = lambda n: ["--ca", str(tmp_path / "ca.crt"), "--cert",
                           str(tmp_path / f"{n}.crt"), "--key", str(tmp_path / f"{n}.key")]
        relay = f"{self.public.ip}:{INTERMEDIATE_PORT}"
        self.connector_host.python(_ECHO, str(ECHO_PORT))
        self.intermediate = self._role(self.public, "intermediate", "--listen",
                                       f"0.0.0.0:{INTERMEDIATE_PORT}", "--allow", "*=*",
                                       *intermediate_args, *creds("intermediate"))
        self.connector = self._role(self.connector_host, "connector", "--intermediate", relay,
                                    "--service", f"echo=tcp:127.0.0.1:{ECHO_PORT}",
                                    *connector_args, *creds("connector1"))
        self.agent = self._role(self.agent_host, "agent", "--intermediate", relay,
                                "--forward", f"tcp:127.0.0.1:{FORWARD_PORT}=echo",
                                *agent_args, *creds("alice"))

    def _role(self, host, role, *args):
        log = open(self.tmp_path / f"{role}.log", "w")
        proc = host.popen([sys.executable, "-m", "mahole", role, "--status",
                           f"127.0.0.1:{STATUS_PORT}", *args], stdout=log,
                          stderr=subprocess.STDOUT)
        proc.host, proc.log_path = host, self.tmp_path / f"{role}.log"
        return proc

    def logs(self):
        return "\n".join(f"--- {p.log_path.name}\n{p.log_path.read_text()[-3000:]}"
                         for p in (self.intermediate, self.connector, self.agent))

    def status(self, proc):
        try:
            with _ns.entered(proc.host.ns):
                sock = socket.create_connection(("127.0.0.1", STATUS_PORT), timeout=2)
            with sock:
                sock.sendall(b"GET /status HTTP/1.0\r\n\r\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            return json.loads(data.split(b"\r\n\r\n", 1)[1])
        except (OSError, ValueError, IndexError):
            return None

    def wait_registered(self, timeout=20):
        for proc in (self.connector, self.agent):
            wait(lambda: (self.status(proc) or {}).get("intermediate", {}).get("connected"),
                 timeout, f"{proc.log_path.stem} to register", self)

    def round_trip(self, data, timeout=30):
        """Send data through the agent's forward (from inside its namespace); the echo."""
        with _ns.entered(self.agent_host.ns):
            sock = socket.create_connection(("127.0.0.1", FORWARD_PORT), timeout=timeout)
        received = bytearray()
        with sock:
            sock.settimeout(timeout)
            sent = 0
            while sent < len(data) or len(received) < len(data):
                if sent < len(data):
                    sent += sock.send(data[sent:sent + 65536])
                    if sent == len(data):
                        sock.shutdown(socket.SHUT_WR)
                try:
                    sock.settimeout(0 if sent < len(data) else timeout)
                    chunk = sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                if not chunk:
                    break
                received += chunk
        return bytes(received)

    def session(self):
        sessions = (self.status(self.agent) or {}).get("sessions") or []
        return sessions[0] if sessions else None


def wait(condition, timeout, what, deployment=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    logs = deployment.logs() if deployment is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{logs}")


@pytest.mark.parametrize("agent_nat, connector_nat", list(itertools.product(PRESETS, PRESETS)),
                         ids=lambda preset: preset)
def test_matrix_cell(lab, tmp_path, agent_nat, connector_nat):
    d = Deployment(lab, tmp_path, agent_nat, connector_nat)
    d.wait_registered()
    data = os.urandom(512 << 10)
    assert d.round_trip(data) == data, d.logs()
    session = wait(lambda: (s := d.session()) and s["punch"] and s["punch"]["path"] and s,
                   15, "hole punching to finish", d)
    assert d.round_trip(data) == data, d.logs()  # and data flows on the final path
    session = d.session()
    observed[(agent_nat, connector_nat)] = {
        "path": session["path"], "expected": expected_path(agent_nat, connector_nat),
        "to_direct_ms": session["switch_ms"], "rtt_ms": session["rtt_ms"],
        "reason": session["punch"]["reason"],
    }
    assert session["path"] == expected_path(agent_nat, connector_nat), (
        f"{agent_nat} x {connector_nat}: {session['punch']}\n{d.logs()}")


@pytest.fixture(scope="module", autouse=True)
def _write_matrix():
    yield
    if not observed:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    cells = [{"agent": a, "connector": c, **v} for (a, c), v in sorted(observed.items())]
    (RESULTS / "nat_matrix.json").write_text(json.dumps({"cells": cells}, indent=2) + "\n")
    (RESULTS / "nat_matrix.md").write_text(matrix_table(observed) + "\n")


def matrix_table(results):
    """Markdown: rows = agent's NAT, columns = connector's NAT; path, time to direct, RTT."""
    lines = ["| agent \\ connector | " + " | ".join(PRESETS) + " |",
             "|---" * (len(PRESETS) + 1) + "|"]
    for a in PRESETS:
        cells = []
        for c in PRESETS:
            r = results.get((a, c))
            if r is None:
                cells.append("–")
            elif r["path"] == "direct":
                cells.append(f"direct {r['to_direct_ms']:.0f} ms, rtt {r['rtt_ms']:.1f} ms")
            else:
                cells.append(f"{r['path']}, rtt {r['rtt_ms']:.1f} ms")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
