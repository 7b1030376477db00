"""A bounded soak: real role processes on loopback with every timeout shortened by flags,
running twenty times past the longest of them, sessions on both routes, busy and idle.

One intermediate; one connector with three services (all the same echo server): `busy`,
`held` and `idle`. Two agents, each with a forward to every service: `alice` (binds
127.0.0.3, the connector 127.0.0.2, so her sessions go direct) and `bob` (`--relay-only`).
For each agent, for the whole soak:

  busy   one TCP connection with a small echo every 0.2 s: never fails, one session
         throughout, on its route throughout, never closed;
  held   one TCP connection opened with one echo, then silent until the end, when it echoes
         again: an open stream keeps its session (keepalive PINGs are not traffic, but the
         open stream is), and the keepalives keep the QUIC connection and the route alive;
  idle   over and over: one echo on a new connection, closed, then silence until the session
         is reaped with "idle" in its reason; the next echo opens a new session.
"""

import socket
import threading
import time

from labroles import wait
from mahole import identity
from test_lifecycle import (AGENT_BIND, Lab, Pinger, echo,  # noqa: F401
                            echo_once, intermediate_sessions, processes, recv_exactly)

IDLE = 1.5  # --session-idle-timeout: the longest node timeout here
PEER_DEAD = 1.0  # --peer-dead-after
KEEPALIVE = 0.2  # --keepalive
FAILOVER = 0.5  # --failover-timeout
NODE_DEAD = 1.5  # the intermediate's --node-dead-after
PROBE = 0.5  # the intermediate's --probe-timeout
SOAK = 20 * IDLE  # 30 s
TIMEOUTS = ("--session-idle-timeout", f"{IDLE:g}", "--peer-dead-after", f"{PEER_DEAD:g}",
            "--keepalive", f"{KEEPALIVE:g}", "--failover-timeout", f"{FAILOVER:g}")
SERVICES = ("busy", "held", "idle")


class IdleCycler:
    """Echo once on a new connection, then wait (with a deadline) for the agent to reap the
    session as idle; again and again until stopped. Records each reaped session."""

    def __init__(self, lab, agent, port):
        self.lab, self.agent, self.port = lab, agent, port
        self.reaped = []  # (session_id, reason, seconds from the echo to the reaping)
        self.error = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _session_id(self):
        for s in (self.lab.status(self.agent) or {}).get("sessions", []):
            if s["service"] == "idle":
                return s["session"]
        return None

    def _run(self):
        try:
            while not self._stop.is_set():
                echo_once(self.port)
                silent_since = time.monotonic()
                session_id = self._session_id()
                assert session_id, "the idle service's session is gone right after an echo"
                [closed] = wait(lambda: self.lab.closed(self.agent, session_id), IDLE + 5,
                                f"the agent to reap idle session {session_id}")
                self.reaped.append((session_id, closed["reason"],
                                    time.monotonic() - silent_since))
        except BaseException as exc:  # reported by the test
            self.error = exc

    def stop(self):
        self._stop.set()
        self._thread.join(IDLE + 15)


def services_of(lab, agent):
    return {s["service"]: s for s in (lab.status(agent) or {}).get("sessions", [])}


def test_soak_busy_sessions_live_idle_ones_are_reaped(tmp_path, processes, echo):
    lab = Lab(processes, tmp_path, echo)
    identity.issue(tmp_path, "agent", "bob")
    lab.start_intermediate("--allow", "bob=*", "--node-dead-after", f"{NODE_DEAD:g}",
                           "--probe-timeout", f"{PROBE:g}")
    relay_node = ("--intermediate", f"127.0.0.1:{lab.relay_port}", *TIMEOUTS)
    connector = lab.start("connector", "connector",
                          *(a for s in SERVICES
                            for a in ("--service", f"{s}=tcp:127.0.0.1:{echo.port}")),
                          "--bind", "127.0.0.2:0", *relay_node, cert="connector1")
    agents = {}
    for name, path, extra in (("alice", "direct", ("--bind", f"{AGENT_BIND}:0")),
                              ("bob", "relay", ("--bind", "127.0.0.1:0", "--relay-only"))):
        # Each forward listens on a port the agent picks (read back from its status below).
        agent = lab.start("agent", name,
                          *(a for s in SERVICES for a in ("--forward", f"tcp:127.0.0.1:0={s}")),
                          *extra, *relay_node, cert=name)
        agent.path = path
        agents[name] = agent
    lab.registered(connector, *agents.values())
    for agent in agents.values():  # a node listens on its forwards before it registers
        agent.ports = {f["service"]: int(f["forward"].rsplit(":", 1)[1])
                       for f in lab.status(agent)["forwards"]}

    pingers, held, cyclers = {}, {}, {}
    try:
        for name, agent in agents.items():
            pingers[name] = Pinger(agent.ports["busy"])
            sock = socket.create_connection(("127.0.0.1", agent.ports["held"]), timeout=10)
            sock.settimeout(10)
            held[name] = sock
            sock.sendall(b"hello")
            assert recv_exactly(sock, 5) == b"hello"
        first = {}
        for name, agent in agents.items():
            first[name] = wait(
                lambda: (s := services_of(lab, agent)).get("busy", {}).get("path") == agent.path
                and s.get("held", {}).get("path") == agent.path and s,
                15, f"{name}'s busy and held sessions on the {agent.path} path", lab)
        for name, agent in agents.items():
            cyclers[name] = IdleCycler(lab, agent, agent.ports["idle"])

        # The soak: sample every node's status; every sample must agree with the first.
        end = time.monotonic() + SOAK
        samples = 0
        while time.monotonic() < end:
            for name, agent in agents.items():
                now = services_of(lab, agent)
                for service in ("busy", "held"):
                    assert service in now, (name, service, lab.status(agent), lab.logs())
                    assert now[service]["session"] == first[name][service]["session"]
                    assert now[service]["path"] == agent.path, (name, service, now[service])
                assert not pingers[name].failures, (name, pingers[name].failures, lab.logs())
                assert cyclers[name].error is None, (name, cyclers[name].error, lab.logs())
            for proc in (lab.intermediate, connector, *agents.values()):
                assert proc.poll() is None, (proc.name, lab.logs())
            samples += 1
            time.sleep(0.25)  # the sampling interval (the soak's length is the point)

        for name in agents:
            held[name].sendall(b"still here")
            assert recv_exactly(held[name], 10) == b"still here"
    finally:
        for cycler in cyclers.values():
            cycler.stop()
        for pinger in pingers.values():
            pinger.stop()
        for sock in held.values():
            sock.close()

    assert samples > SOAK / 1.0, samples
    for name, agent in agents.items():
        assert not pingers[name].failures, pingers[name].failures
        assert pingers[name].echoes >= 0.5 * SOAK / 0.2, pingers[name].echoes
        assert cyclers[name].error is None, cyclers[name].error
        reaped = cyclers[name].reaped
        # Each cycle takes an echo plus ~IDLE: many idle sessions came and went.
        assert len(reaped) >= SOAK / (IDLE + 2) / 2, reaped
        assert len({r[0] for r in reaped}) == len(reaped)
        for session_id, reason, after in reaped:
            assert "idle" in reason, reason
            assert 0.75 * IDLE <= after <= IDLE + 5, after
        # Only idle sessions ended, on both sides of every session.
        reaped_ids = {r[0] for r in reaped}
        closed = lab.status(agent)["closed_sessions"]
        assert {c["session"] for c in closed} <= reaped_ids | {None}, closed
        assert all(c["service"] == "idle" for c in closed), closed
        final = services_of(lab, agent)
        for service in ("busy", "held"):
            assert final[service]["session"] == first[name][service]["session"]
            assert final[service]["failovers"] == 0, final[service]
    connector_closed = lab.status(connector)["closed_sessions"]
    assert connector_closed and all(c["service"] == "idle" for c in connector_closed), \
        connector_closed
    listed = intermediate_sessions(lab)
    for name in agents:
        for service in ("busy", "held"):
            assert first[name][service]["session"] in listed, listed
    inter = lab.status(lab.intermediate)
    assert inter["counters"]["nodes_dead"] == 0 and inter["counters"]["nodes_replaced"] == 0
