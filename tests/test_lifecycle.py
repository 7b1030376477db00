"""Sessions that live for days, seen as a user sees them: real `python -m mahole ROLE …`
processes on loopback with every session timeout shortened by flags, a TCP echo through the
agent's forward, and each node's /status.

  - a session that carries traffic is never closed by a timer, direct or relayed;
  - an idle session is reaped, with "idle" in the reason, and the next connection opens a new one;
  - a second copy of an identity is refused while the first lives (and never disturbs it);
  - a crashed connector is noticed fast, and its replacement serves again;
  - a wrong name or another deployment's CA stops a node with one line and exit 2, an absent
    intermediate is retried.

The connector binds 127.0.0.2 and the agent 127.0.0.3 (the intermediate 127.0.0.1), so the
peers' addresses differ and hole punching finds the direct route on loopback.
"""

import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from labroles import wait
from mahole.demo import issue_certificates
from test_processes import Processes, free_port, status

# Shortened session timeouts (agent and connector flags); the longest of them is IDLE.
IDLE = 2.0  # --session-idle-timeout
PEER_DEAD = 1.0  # --peer-dead-after
KEEPALIVE = 0.2  # --keepalive
NODE_TIMEOUTS = ("--session-idle-timeout", f"{IDLE:g}", "--peer-dead-after", f"{PEER_DEAD:g}",
                 "--keepalive", f"{KEEPALIVE:g}")
BUSY_FOR = 10 * IDLE  # a busy session runs ten times past its longest timeout
PING_EVERY = 0.2  # the busy client's pace (s)
CONNECTOR_BIND = "127.0.0.2"
AGENT_BIND = "127.0.0.3"


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.close()
        # pytest shows a test's captured output only when it fails: the roles' logs.
        for proc in procs.procs:
            if hasattr(proc, "log_path"):
                print(f"--- {proc.log_path.name}\n{proc.log_path.read_text()[-6000:]}")


# --- an echo service and clients ----------------------------------------------------------


class EchoServer:
    """A TCP echo service in a thread of this process (closed by the fixture)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn):
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (Linux)
        except OSError:
            pass
        self.sock.close()
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass


@pytest.fixture
def echo():
    server = EchoServer()
    try:
        yield server
    finally:
        server.close()


def recv_exactly(sock, n):
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def echo_once(port, data=None, timeout=10):
    """One TCP connection through the forward: send, read the echo, close. The echo."""
    data = data or os.urandom(1000)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(data)
        reply = recv_exactly(sock, len(data))
    assert reply == data
    return reply


def echo_eventually(port, timeout, what, lab):
    """Retry a round trip through the forward until it works (a connection refused for a
    moment, e.g. while a replacement connector registers, is expected)."""
    errors = []

    def attempt():
        try:
            echo_once(port, timeout=5)
            return True
        except (OSError, EOFError, AssertionError) as exc:
            errors.append(repr(exc))
            return False
    wait(attempt, timeout, f"{what} (errors: {errors[-3:]})", lab)


class Pinger:
    """One TCP connection through a forward carrying a small echo every `every` seconds, in
    a thread; it records every failure (EOF, reset, wrong bytes, a slow echo)."""

    def __init__(self, port, every=PING_EVERY, size=256, timeout=5.0):
        self.every = every
        self.size = size
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.echoes = 0
        self.failures = []  # (monotonic time, text)
        self.slowest = 0.0
        self._stop = threading.Event()
        self.ping()  # the first echo opens the session before the thread starts
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def ping(self):
        data = os.urandom(self.size)
        start = time.monotonic()
        self.sock.sendall(data)
        if recv_exactly(self.sock, len(data)) != data:
            raise AssertionError("the echo differs from what was sent")
        self.slowest = max(self.slowest, time.monotonic() - start)
        self.echoes += 1

    def _run(self):
        while not self._stop.wait(self.every):  # the client's pace, not a wait for a state
            try:
                self.ping()
            except (OSError, EOFError, AssertionError) as exc:
                self.failures.append((time.monotonic(), repr(exc)))
                return

    def stop(self):
        self._stop.set()
        self._thread.join(10)
        self.sock.close()


# --- the deployment -----------------------------------------------------------------------


class Lab:
    """An intermediate, connectors and agents as processes, with their status ports."""

    def __init__(self, processes, tmp_path, echo=None, certs=None):
        self.processes = processes
        self.certs = certs or tmp_path
        if not (self.certs / "ca.crt").exists():
            issue_certificates(self.certs)
        self.relay_port = free_port(socket.SOCK_DGRAM)
        self.echo = echo
        self.intermediate = None

    def creds(self, cert, certs=None, ca=None):
        certs = certs or self.certs
        return ["--ca", str(ca or certs / "ca.crt"), "--cert", str(certs / f"{cert}.crt"),
                "--key", str(certs / f"{cert}.key")]

    def start(self, role, name, *args, cert, status_port=None, certs=None, ca=None):
        status_port = status_port or free_port()
        proc = self.processes.start(role, "--status", f"127.0.0.1:{status_port}", *args,
                                    *self.creds(cert, certs, ca), name=name)
        proc.name, proc.status_port, proc.started = name, status_port, time.monotonic()
        return proc

    def start_intermediate(self, *args, name="intermediate"):
        self.intermediate = self.start("intermediate", name, "--listen",
                                       f"127.0.0.1:{self.relay_port}", "--allow", "alice=*",
                                       *args, cert="intermediate")
        wait(lambda: self.status(self.intermediate), 20, "the intermediate's status", self)
        return self.intermediate

    def node_args(self, bind, relay_only, extra):
        return ("--intermediate", f"127.0.0.1:{self.relay_port}", "--bind", f"{bind}:0",
                *NODE_TIMEOUTS, *(("--relay-only",) if relay_only else ()), *extra)

    def start_connector(self, *extra, name="connector", cert="connector1", relay_only=False):
        return self.start("connector", name, "--service", f"echo=tcp:127.0.0.1:{self.echo.port}",
                          *self.node_args(CONNECTOR_BIND, relay_only, extra), cert=cert)

    def start_agent(self, *extra, name="agent", cert="alice", relay_only=False, **kwargs):
        # The forward listens on a port the agent picks itself (a port chosen here and bound
        # later can be taken in between); forward_port() reads it from the agent's status.
        return self.start("agent", name, "--forward", "tcp:127.0.0.1:0=echo",
                          *self.node_args(AGENT_BIND, relay_only, extra), cert=cert, **kwargs)

    def forward_port(self, agent, timeout=20):
        """The port the agent's forward listens on, once it does."""
        def listening():
            assert agent.poll() is None, f"{agent.name} exited with {agent.returncode}"
            forwards = (self.status(agent) or {}).get("forwards") or []
            return forwards and int(forwards[0]["forward"].rsplit(":", 1)[1])
        return wait(listening, timeout, f"{agent.name}'s forward", self)

    def status(self, proc):
        return status(proc.status_port)

    def registered(self, *procs, timeout=20):
        for proc in procs:
            wait(lambda: (self.status(proc) or {}).get("intermediate", {}).get("connected"),
                 timeout, f"{proc.name} to register", self)

    def session(self, agent):
        sessions = (self.status(agent) or {}).get("sessions") or []
        assert len(sessions) <= 1, sessions
        return sessions[0] if sessions else None

    def closed(self, node, session_id):
        return [c for c in (self.status(node) or {}).get("closed_sessions", [])
                if c["session"] == session_id]

    def logs(self):
        return "\n".join(f"--- {p.log_path.name}\n{p.log_path.read_text()[-3000:]}"
                         for p in self.processes.procs if hasattr(p, "log_path"))

    def up(self, relay_only=False):
        """Intermediate, connector and agent, registered: (connector, agent)."""
        self.start_intermediate()
        connector = self.start_connector(relay_only=relay_only)
        agent = self.start_agent(relay_only=relay_only)
        self.registered(connector, agent)
        return connector, agent

    def on_path(self, agent, path, timeout=15):
        """Wait for the agent's one session to be on `path`; that session's status."""
        return wait(lambda: (s := self.session(agent)) and s["path"] == path and s, timeout,
                    f"the session to be on the {path} path", self)


def intermediate_sessions(lab):
    """The sessions the intermediate's /status lists, by tag (every role's /status names a
    session by the same short tag, never by its id)."""
    return [s["session"] for s in lab.status(lab.intermediate)["sessions"]["list"]]


def kill_group(processes, proc):
    """kill -9 of a role's whole process group (it must be one this test started)."""
    assert proc in processes.procs
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def error_lines(proc):
    return [line for line in proc.log_path.read_text().splitlines()
            if line.startswith(f"mahole {proc.args[3]}: error:")]


PATHS = [pytest.param(False, "direct", id="direct"), pytest.param(True, "relay", id="relay")]


# --- 1, 3: a busy session is never closed by a timer --------------------------------------


@pytest.mark.parametrize("relay_only, path", PATHS)
def test_a_busy_session_outlives_ten_idle_timeouts(tmp_path, processes, echo, relay_only, path):
    lab = Lab(processes, tmp_path, echo)
    connector, agent = lab.up(relay_only)
    pinger = Pinger(lab.forward_port(agent))
    try:
        session = lab.on_path(agent, path)
        session_id = session["session"]
        end = time.monotonic() + BUSY_FOR
        paths, seen_ids = set(), set()
        while time.monotonic() < end and not pinger.failures:
            current = lab.session(agent)
            if current is not None:
                seen_ids.add(current["session"])
                paths.add(current["path"])
            time.sleep(0.25)  # the status sampling interval (the run's length is the point)
        echoes = pinger.echoes
    finally:
        pinger.stop()
    assert not pinger.failures, (pinger.failures, lab.logs())
    # ~one echo per PING_EVERY for the whole run: the connection carried data throughout.
    assert echoes >= 0.5 * BUSY_FOR / PING_EVERY, echoes
    assert seen_ids == {session_id}
    assert paths == {path}, paths
    final = lab.session(agent)
    assert final["session"] == session_id and final["path"] == path
    assert final["route_switches"] == session["route_switches"]
    for node in (agent, connector):
        assert lab.status(node)["closed_sessions"] == [], lab.logs()
    listed = intermediate_sessions(lab)
    assert listed == [session_id], listed


# --- 2, 3: an idle session is reaped, with the reason --------------------------------------


@pytest.mark.parametrize("relay_only, path", PATHS)
def test_an_idle_session_is_reaped_and_the_next_connection_opens_a_new_one(
        tmp_path, processes, echo, relay_only, path):
    lab = Lab(processes, tmp_path, echo)
    connector, agent = lab.up(relay_only)
    echo_once(lab.forward_port(agent))  # one echo, then the TCP connection is closed: silence
    silent_since = time.monotonic()
    session_id = lab.on_path(agent, path)["session"]
    [closed] = wait(lambda: lab.closed(agent, session_id), IDLE + 5,
                    "the agent to reap the idle session", lab)
    reaped_after = time.monotonic() - silent_since
    assert "idle" in closed["reason"], closed
    assert reaped_after >= 0.75 * IDLE, reaped_after  # not before its timeout
    assert lab.session(agent) is None
    # The connector ends it too (by its own timer or told by the agent).
    wait(lambda: lab.closed(connector, session_id), 5, "the connector to end the session", lab)
    wait(lambda: not lab.status(lab.intermediate)["sessions"]["list"], 5,
         "the intermediate to forget the session", lab)
    # A new connection opens a new session.
    echo_once(lab.forward_port(agent))
    new = lab.on_path(agent, path)
    assert new["session"] != session_id


# --- 4: two copies of one identity ---------------------------------------------------------


def alices(lab):
    nodes = lab.status(lab.intermediate)["nodes"]["list"]
    return [n for n in nodes if n["role"] == "agent" and n["name"] == "alice"]


def test_a_second_copy_of_an_identity_is_refused_and_never_disturbs_the_first(
        tmp_path, processes, echo):
    lab = Lab(processes, tmp_path, echo)
    connector, a = lab.up()
    a_addr = lab.status(a)["intermediate"]["observed_addr"]
    assert [n["addr"] for n in alices(lab)] == [a_addr]
    pinger = Pinger(lab.forward_port(a))
    try:
        session_id = lab.on_path(a, "direct")["session"]

        # B: same certificate and key, while A is alive and busy.
        b = lab.start_agent(name="agent-b")

        def exited_and_a_alone(proc):
            assert [n["addr"] for n in alices(lab)] == [a_addr], lab.logs()
            return proc.poll() is not None
        wait(lambda: exited_and_a_alone(b), 10, "the second alice to exit", lab)
        assert b.returncode == 2, lab.logs()
        assert time.monotonic() - b.started < 6  # start-up, the probe (1 s), the refusal
        [line] = error_lines(b)
        assert "already" in line and "alice" in line, line
        assert "Traceback" not in b.log_path.read_text()
        assert [n["addr"] for n in alices(lab)] == [a_addr]

        # B2: its --status port is taken, so it stops before it registers: the intermediate
        # never hears of it.
        before = lab.status(lab.intermediate)["counters"]
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            b2 = lab.start_agent(name="agent-b2", status_port=taken.getsockname()[1])
            wait(lambda: exited_and_a_alone(b2), 10,
                 "the agent with a taken status port to exit", lab)
        assert b2.returncode == 2
        [line] = error_lines(b2)
        assert "status" in line, line
        after = lab.status(lab.intermediate)["counters"]
        for counter in ("connections_accepted", "nodes_registered", "probes_sent",
                        "refused_conflict", "nodes_replaced"):
            assert after[counter] == before[counter], (counter, before, after)

        # A's session carried echoes throughout, on the same connection.
        echoes = pinger.echoes
        wait(lambda: pinger.echoes >= echoes + 5 or pinger.failures, 10,
             "more echoes through A", lab)
        assert not pinger.failures, pinger.failures
        assert lab.session(a)["session"] == session_id
        assert lab.status(a)["intermediate"]["connects"] == 1
        assert lab.status(a)["closed_sessions"] == []
    finally:
        pinger.stop()

    # A crashes; C with the same identity takes the name after the probe goes unanswered.
    kill_group(processes, a)
    c = lab.start_agent(name="agent-c")
    wait(lambda: lab.status(c), 20, "C's status server", lab)
    serving = time.monotonic()  # C's checks passed; it is registering now
    lab.registered(c)
    took = time.monotonic() - serving
    assert took < 1.0 + 1.5, took  # probe timeout (1 s) and a little
    echo_once(lab.forward_port(c))
    c_addr = lab.status(c)["intermediate"]["observed_addr"]
    assert [n["addr"] for n in alices(lab)] == [c_addr]


# --- 5: a crashed connector ----------------------------------------------------------------


def test_a_crashed_connector_is_noticed_fast_and_its_replacement_serves(
        tmp_path, processes, echo):
    lab = Lab(processes, tmp_path, echo)
    connector, agent = lab.up()
    # An idle session: a TCP connection held open after one echo.
    held = socket.create_connection(("127.0.0.1", lab.forward_port(agent)), timeout=10)
    try:
        held.sendall(b"hello")
        assert recv_exactly(held, 5) == b"hello"
        session_id = lab.on_path(agent, "direct")["session"]

        kill_group(processes, connector)
        killed = time.monotonic()
        [closed] = wait(lambda: lab.closed(agent, session_id), 3,
                        "the agent to end the session of the dead connector", lab)
        assert lab.session(agent) is None
        # The held connection ends too (EOF or reset), it does not hang.
        held.settimeout(max(0.1, killed + 4 - time.monotonic()))
        try:
            assert held.recv(100) == b""
        except ConnectionResetError:
            pass
    finally:
        held.close()

    # A new connection fails fast: closed with no data, not a hang until some timeout.
    opened = time.monotonic()
    with socket.create_connection(("127.0.0.1", lab.forward_port(agent)), timeout=10) as sock:
        sock.settimeout(10)
        try:
            sock.sendall(b"anyone?")
            data = sock.recv(100)
        except ConnectionResetError:
            data = b""
    assert data == b""
    assert time.monotonic() - opened < 1.5, time.monotonic() - opened

    # A new connector with the same identity: the forward works again.
    replacement = lab.start_connector(name="connector-2")
    lab.registered(replacement)
    echo_eventually(lab.forward_port(agent), 15, "an echo through the new connector", lab)
    assert lab.on_path(agent, "direct")["session"] != session_id


# --- 6: permanent errors stop a node, an absent intermediate is retried ---------------------


def test_a_wrong_intermediate_name_stops_the_node_with_the_right_name(tmp_path, processes):
    certs = tmp_path / "certs"
    certs.mkdir()
    issue_certificates(certs, host="relay1.test")
    lab = Lab(processes, tmp_path, certs=certs)
    lab.start_intermediate()
    agent = lab.start_agent("--intermediate-name", "wrongname")
    wait(lambda: agent.poll() is not None, 10, "the agent to stop", lab)
    assert agent.returncode == 2
    assert time.monotonic() - agent.started < 10
    [line] = error_lines(agent)
    # The flag to pass, with a name the certificate holds (its DNS names: the intermediate's
    # name and the host it was issued for).
    suggested = re.search(r"--intermediate-name (\S+)", line)
    assert suggested and suggested.group(1).rstrip(".,;") in ("relay1.test", "intermediate"), line
    log = agent.log_path.read_text()
    assert "retrying" not in log and "Traceback" not in log, log


def test_another_deployments_ca_stops_the_node(tmp_path, processes):
    other = tmp_path / "other"
    other.mkdir()
    issue_certificates(other)
    lab = Lab(processes, tmp_path)
    lab.start_intermediate()
    # A whole node of another deployment: its CA does not trust this intermediate.
    agent = lab.start_agent(certs=other)
    # A node whose own certificate is not from its --ca.
    mixed = lab.start_agent(name="agent-mixed", ca=other / "ca.crt")
    for proc in (agent, mixed):
        wait(lambda: proc.poll() is not None, 10, f"{proc.name} to stop", lab)
        assert proc.returncode == 2, lab.logs()
        assert time.monotonic() - proc.started < 10
        [line] = error_lines(proc)
        assert "trust" in line or "--ca" in line or "CA" in line, line
        assert "retrying" not in proc.log_path.read_text()
    [line] = error_lines(agent)
    assert "--ca" in line and "trust" in line, line
    assert not lab.status(lab.intermediate)["nodes"]["list"]


def test_an_absent_intermediate_is_retried(tmp_path, processes):
    lab = Lab(processes, tmp_path)  # nothing listens on lab.relay_port
    agent = lab.start_agent()
    wait(lambda: "unreachable" in agent.log_path.read_text()
         or "no answer" in agent.log_path.read_text(), 15, "the retry message", lab)
    wait(lambda: time.monotonic() - agent.started > 3 or agent.poll() is not None, 5,
         "three seconds", lab)
    assert agent.poll() is None, agent.log_path.read_text()
    log = agent.log_path.read_text()
    assert "closed by the intermediate" not in log and "error:" not in log, log
    assert lab.status(agent)["intermediate"]["connected"] is False
