"""Real role processes inside the NAT lab (tests/netlab): what the lab tests drive."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from mahole import identity
from netlab import _ns

INTERMEDIATE_PORT = 4478
STATUS_PORT = 9100
FORWARD_PORT = 8080
ECHO_PORT = 7000

ECHO_SERVER = """
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
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

class Deployment:
    """The three roles (and an echo service) as processes inside a lab."""

    def __init__(self, lab, tmp_path, agent_nat, connector_nat, *, agent_args=(),
                 connector_args=(), intermediate_args=(), agent_link=None,
                 connector_link=None, intermediate_link=None, agent_site=None,
                 connector_site=None, over_ipv6=(), adaptive_keepalive=False):
        self.lab = lab
        # Nodes keep the fixed 1 s keepalive (--fixed-keepalive) unless a test asks for the
        # adaptive one: the other lab tests' timings (an idle cut noticed within 3 s, RTT
        # samples from keepalives on a quiet session) are those of the fixed keepalive.
        self.adaptive_keepalive = adaptive_keepalive
        self.tmp_path = tmp_path
        # Sites: `agent_site` / `connector_site` are more arguments of lab.site, such as
        # {"ipv6": True} (dual-stack) or {"ipv6_only": True}. With either, the intermediate
        # is dual-stack too, listens on [::] and has both addresses in its certificate.
        # `over_ipv6` names the roles ("agent", "connector") of dual-stack sites that reach
        # it over IPv6 (IPv6-only ones always do, the others use IPv4 unless named here).
        agent_site, connector_site = agent_site or {}, connector_site or {}
        ipv6 = any(s.get("ipv6") or s.get("ipv6_only") for s in (agent_site, connector_site))
        # Links (netlab/wire.py presets or settings): the agent's and the connector's own
        # link to their router (or to the public segment), the intermediate's to it.
        self.public = lab.public_host(name="inter", link=intermediate_link, ipv6=ipv6)
        self.agent_host = lab.host(agent_nat, name="agent", link=agent_link, **agent_site)
        self.connector_host = lab.host(connector_nat, name="conn", link=connector_link,
                                       **connector_site)
        identity.init_ca(tmp_path)
        identity.issue(tmp_path, "intermediate", "intermediate",
                       hosts=[self.public.ip] + ([self.public.ip6] if ipv6 else []))
        identity.issue(tmp_path, "connector", "connector1")
        identity.issue(tmp_path, "agent", "alice")
        self.listen = f"[::]:{INTERMEDIATE_PORT}" if ipv6 else f"0.0.0.0:{INTERMEDIATE_PORT}"
        self.relay_addr = f"{self.public.ip}:{INTERMEDIATE_PORT}"
        self.over_ipv6 = {h for role, h in (("agent", self.agent_host),
                                            ("connector", self.connector_host))
                          if role in over_ipv6 or h.ip is None}
        if ipv6:
            self.relay_addr6 = f"[{self.public.ip6}]:{INTERMEDIATE_PORT}"
        self.intermediate_args = intermediate_args
        self.connector_args = connector_args
        self.connector_host.python(ECHO_SERVER, str(ECHO_PORT))
        self.intermediate = self.start_intermediate()
        self.connector = self.start_connector()
        self.agent = self.start_agent(agent_args)

    def intermediate_for(self, host):
        """The intermediate's address as `host` reaches it: over IPv6 from an IPv6-only
        host or one named in `over_ipv6`, over IPv4 otherwise (a dual-stack node still
        gathers its IPv6 address)."""
        return self.relay_addr6 if host in self.over_ipv6 else self.relay_addr

    def start_agent(self, agent_args):
        return self._role(self.agent_host, "agent", "--intermediate",
                          self.intermediate_for(self.agent_host),
                          "--forward", f"tcp:127.0.0.1:{FORWARD_PORT}=echo",
                          *agent_args, *self.creds("alice"))

    def creds(self, name):
        return ["--ca", str(self.tmp_path / "ca.crt"), "--cert",
                str(self.tmp_path / f"{name}.crt"), "--key", str(self.tmp_path / f"{name}.key")]

    def start_intermediate(self):
        return self._role(self.public, "intermediate", "--listen", self.listen,
                          "--allow", "*=*",
                          *self.intermediate_args, *self.creds("intermediate"))

    def start_connector(self):
        return self._role(self.connector_host, "connector", "--intermediate",
                          self.intermediate_for(self.connector_host),
                          "--service", f"echo=tcp:127.0.0.1:{ECHO_PORT}",
                          *self.connector_args, *self.creds("connector1"))

    def _role(self, host, role, *args):
        if role in ("agent", "connector") and not self.adaptive_keepalive:
            args = ("--fixed-keepalive", *args)
        log = open(self.tmp_path / f"{role}.log", "a")
        proc = host.popen([sys.executable, "-m", "mahole", role, "--status",
                           f"127.0.0.1:{STATUS_PORT}", *args], stdout=log,
                          stderr=subprocess.STDOUT)
        proc.host, proc.log_path = host, self.tmp_path / f"{role}.log"
        return proc

    def logs(self):
        return "\n".join(f"--- {p.log_path.name}\n{p.log_path.read_text()[-3000:]}"
                         for p in (self.intermediate, self.connector, self.agent))

    def status(self, proc, port=STATUS_PORT):
        try:
            with _ns.entered(proc.host.ns):
                sock = socket.create_connection(("127.0.0.1", port), timeout=2)
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
        """Send data through the agent's forward (from inside its namespace); the echo.
        A failed connection raises with the roles' logs, which say why."""
        try:
            return self._round_trip(data, timeout)
        except OSError as exc:
            raise AssertionError(f"round trip failed: {exc!r}\n{self.logs()}") from exc

    def _round_trip(self, data, timeout):
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


class Transfer:
    """A TCP transfer through the agent's forward running in a thread; it records when
    echoed bytes arrive, so stalls (e.g. around a failover) can be measured."""

    def __init__(self, deployment, data, chunk=32 << 10, pace=None):
        self.data = data
        self.chunk = chunk
        self.pace = pace  # seconds between chunks, to keep a transfer going for a while
        self.received = bytearray()
        self.arrivals = []  # (monotonic time, total bytes received)
        self.error = None
        with _ns.entered(deployment.agent_host.ns):
            self.sock = socket.create_connection(("127.0.0.1", FORWARD_PORT), timeout=60)
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._receive, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _send(self):
        try:
            for offset in range(0, len(self.data), self.chunk):
                self.sock.sendall(self.data[offset:offset + self.chunk])
                if self.pace:
                    time.sleep(self.pace)  # a steady sender, not a test wait
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.error = exc

    def _receive(self):
        try:
            while chunk := self.sock.recv(1 << 20):
                self.received += chunk
                self.arrivals.append((time.monotonic(), len(self.received)))
        except OSError as exc:
            self.error = exc

    def join(self, timeout=90):
        for thread in self._threads:
            thread.join(timeout)
        self.sock.close()
        return bytes(self.received)

    def longest_stall_after(self, when):
        """Longest gap between arrivals from `when` on (seconds)."""
        times = [when] + [t for t, _ in self.arrivals if t >= when]
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)


def record_link(name, value):
    """A figure for benchmarks/bench_links.py, which runs lab tests with MAHOLE_BENCH_DIR set
    and reads them back from links_run.json there; nothing without it."""
    directory = os.environ.get("MAHOLE_BENCH_DIR")
    if directory:
        path = Path(directory) / "links_run.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data.setdefault(name, []).append(value)
        path.write_text(json.dumps(data))
