"""The intermediate: authenticates nodes, tells them their observed address, signals, relays.

One UDP socket carries control QUIC connections from agents and connectors, STUN Binding
requests (answered with XOR-MAPPED-ADDRESS, RFC 8489 §14.2) and relay frames. The relay
engine reads the socket: it forwards relay frames of known sessions between their two members
entirely in compiled code and hands everything else to the endpoint.
"""

import asyncio
import fnmatch
import logging
import os
import statistics
import time

from aioquic.quic import events as qe

from .. import connection as qc
from .. import identity
from .._fast import RelayEngine
from ..endpoint import ConnectionHandler, Endpoint
from ..status import metrics_from_counters
from ..wire import control, stun
from ..wire.relay import new_session_id
from .node import ControlStream, _fmt, bind_udp, load_credentials, start_status

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = (0x00000001,)  # QUIC v1 (RFC 9000)


class AclRule:
    """`AGENT_GLOB=SERVICE_GLOB`: agents whose name matches may reach matching services."""

    def __init__(self, text):
        agent, sep, service = text.partition("=")
        if not sep or not agent or not service:
            raise ValueError(f"expected AGENT_GLOB=SERVICE_GLOB, got {text!r}")
        self.agent, self.service = agent, service

    def allows(self, agent, service):
        return fnmatch.fnmatchcase(agent, self.agent) and fnmatch.fnmatchcase(service, self.service)

    def __str__(self):
        return f"{self.agent}={self.service}"


class PeerNode(ConnectionHandler):
    """A node's control connection at the intermediate (handler of its QUIC events)."""

    def __init__(self, intermediate, connection=None):
        self.intermediate = intermediate
        self.connection = connection
        self.stream = None
        self.peer = None  # identity.Peer once the certificate checked out
        self.registered = False
        self.services = ()
        self.sessions = set()

    @property
    def name(self):
        return self.peer.name if self.peer else None

    @property
    def role(self):
        return self.peer.role if self.peer else None

    @property
    def addr(self):
        return self.connection.peer_addr

    def send(self, message):
        if self.stream is not None and not self.connection.closed:
            self.stream.send(message)

    def refuse(self, code, text, request_id=None):
        self.send(control.Error(code=code, message=text, request_id=request_id))

    def quic_event(self, connection, event):
        if isinstance(event, qe.HandshakeCompleted):
            try:
                self.peer = qc.verify_peer(connection.quic, self.intermediate.ca,
                                           ("agent", "connector"))
            except identity.IdentityError as exc:
                self.intermediate.counters["refused_unauthenticated"] += 1
                log.warning("refused %s: %s", _fmt(connection.peer_addr), exc)
                connection.close(qc.ERROR_UNAUTHENTICATED, f"unauthenticated: {exc}"[:200])
        elif isinstance(event, qe.StreamDataReceived):
            if self.peer is None:
                return
            if event.stream_id != 0:
                return  # only the first client stream carries control messages
            if self.stream is None:
                self.stream = ControlStream(connection, event.stream_id)
            try:
                messages = self.stream.feed(event.data)
            except ValueError as exc:
                self.intermediate.counters["bad_control_messages"] += 1
                self.refuse(control.ErrorCode.BAD_MESSAGE, f"bad control message: {exc}")
                connection.close(reason="bad control message")
                return
            for message in messages:
                self.intermediate.control_message(self, message)

    def peer_address_changed(self, connection, previous, addr):
        self.intermediate.address_changed(self, previous, addr)

    def connection_closed(self, connection):
        self.intermediate.node_gone(self)


class RelaySession:
    """A session between one agent and one connector, relayed by the engine."""

    def __init__(self, session_id, service, agent, connector):
        self.session_id = session_id
        self.service = service
        self.agent = agent
        self.connector = connector
        self.created = time.monotonic()
        self.punch_started = None
        self.results = {}  # role -> PunchingResult

    def members(self):
        return (self.agent, self.connector)


class Intermediate:
    role = "intermediate"

    def __init__(self, cfg):
        self.cfg = cfg
        self.identity, self.ca = load_credentials(cfg, "intermediate")
        self.acl = [AclRule(rule) for rule in cfg.allow]
        self.nodes = {}  # (role, name) -> PeerNode
        self.sessions = {}  # session_id -> RelaySession
        self.endpoint = None
        self.engine = None
        self.status_server = None
        self.counters = {
            "connections_accepted": 0, "refused_unauthenticated": 0, "refused_registration": 0,
            "sessions_opened": 0, "sessions_denied": 0, "sessions_unknown_service": 0,
            "sessions_closed": 0, "sessions_expired": 0, "stun_requests": 0,
            "stun_malformed": 0, "bad_control_messages": 0, "initials_dropped": 0,
        }
        self._server_config = qc.configuration(
            self.identity, cfg.ca, is_client=False, alpn=qc.ALPN_CONTROL,
            idle_timeout=cfg.idle_timeout)
        self._expiry_task = None
        self.punching = {"attempts": 0, "direct": 0, "relay": 0}
        self.time_to_direct_ms = []

    async def start(self):
        sock = bind_udp(*self.cfg.listen)
        self.engine = RelayEngine(sock, rate_limit_bps=self.cfg.relay_rate_limit,
                                  burst_bytes=self.cfg.relay_burst)
        self.endpoint = Endpoint(sock, on_stun=self._stun, on_initial=self._initial,
                                 receiver=self.engine)
        self.endpoint.start()
        self._expiry_task = asyncio.get_running_loop().create_task(self._expire_sessions())
        self.status_server = await start_status(self.cfg.status, self.status, self.metrics)
        log.info("intermediate %s listening on %s", self.identity.name,
                 _fmt(self.endpoint.local_address))

    @property
    def local_address(self):
        return self.endpoint.local_address

    async def stop(self):
        for node in list(self.nodes.values()):
            node.connection.close(qc.ERROR_SHUTDOWN, "intermediate stopping")
        if self.endpoint is not None:
            self.endpoint.flush()
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            await asyncio.gather(self._expiry_task, return_exceptions=True)
        if self.status_server is not None:
            await self.status_server.close()
        if self.endpoint is not None:
            self.endpoint.close()

    # Datagrams the relay engine did not relay ------------------------------------------
    def _initial(self, header, data, addr):
        if header.version not in SUPPORTED_VERSIONS or len(data) < 1200:
            # RFC 9000 §14.1: Initial datagrams are at least 1200 bytes.
            self.counters["initials_dropped"] += 1
            return
        quic = qc.NodeQuicConnection(configuration=self._server_config,
                                     original_destination_connection_id=header.dcid)
        node = PeerNode(self)
        node.connection = self.endpoint.add_connection(quic, node, peer_addr=addr,
                                                       extra_cids=(header.dcid,))
        self.counters["connections_accepted"] += 1
        node.connection.datagram_received(data, addr, self.endpoint.now())

    def _stun(self, data, addr):
        try:
            request = stun.decode(data)
        except ValueError:
            self.counters["stun_malformed"] += 1
            return
        if (request.method != stun.METHOD_BINDING
                or request.message_class != stun.CLASS_REQUEST):
            self.counters["stun_malformed"] += 1
            return
        self.counters["stun_requests"] += 1
        response = stun.binding_success(request, (addr[0], addr[1]))
        self.endpoint.send([(stun.encode(response), addr)])

    # Control messages ------------------------------------------------------------------
    def control_message(self, node, message):
        if not node.registered:
            if isinstance(message, control.Register):
                self._register(node, message)
            else:
                node.refuse(control.ErrorCode.NOT_REGISTERED, "register first")
            return
        if isinstance(message, control.OpenSession) and node.role == "agent":
            self._open_session(node, message)
        elif isinstance(message, control.SessionClosed):
            session = self.sessions.get(message.session_id)
            if session is not None and node in session.members():
                self._close_session(session, f"closed by {node.role} {node.name}: "
                                             f"{message.reason}", notify_except=node)
        elif isinstance(message, (control.CandidateOffer, control.CandidateAnswer)):
            session = self.sessions.get(message.session_id)
            if session is not None and node in session.members():
                other = session.connector if node is session.agent else session.agent
                other.send(message)
                if isinstance(message, control.CandidateAnswer) and node is session.connector:
                    self._start_punching(session)
        elif isinstance(message, control.PunchingResult):
            self._punching_result(node, message)
        elif isinstance(message, control.Ping):
            node.send(control.Pong(nonce=message.nonce))
        elif isinstance(message, control.Pong):
            pass
        else:
            node.refuse(control.ErrorCode.BAD_MESSAGE,
                        f"unexpected {type(message).__name__} from a {node.role}")

    def _register(self, node, message):
        if message.role != node.role or message.name != node.name:
            self.counters["refused_registration"] += 1
            text = (f"certificate is for {node.role} {node.name!r} but registration "
                    f"claims {message.role} {message.name!r}")
            node.refuse(control.ErrorCode.UNAUTHENTICATED, text)
            node.connection.close(qc.ERROR_UNAUTHENTICATED, text[:200])
            return
        key = (node.role, node.name)
        previous = self.nodes.get(key)
        if previous is not None and previous is not node:
            log.info("%s %s registered again; replacing its older connection",
                     node.role, node.name)
            previous.connection.close(qc.ERROR_SHUTDOWN, "replaced by a newer connection")
            self.node_gone(previous)
        node.registered = True
        node.services = tuple(message.services)
        self.nodes[key] = node
        node.send(control.Registered(node_id=node.name, observed_addr=node.addr[:2]))
        log.info("%s %s registered from %s%s", node.role, node.name, _fmt(node.addr),
                 f" with services {', '.join(node.services)}" if node.services else "")

    def _open_session(self, agent, message):
        service = message.service
        connectors = [n for n in self.nodes.values()
                      if n.role == "connector" and service in n.services]
        if not any(rule.allows(agent.name, service) for rule in self.acl):
            self.counters["sessions_denied"] += 1
            agent.refuse(control.ErrorCode.DENIED,
                         f"agent {agent.name!r} is not allowed to reach service {service!r}",
                         message.request_id)
            return
        if not connectors:
            self.counters["sessions_unknown_service"] += 1
            agent.refuse(control.ErrorCode.UNKNOWN_SERVICE,
                         f"no connector offers service {service!r}", message.request_id)
            return
        connector = connectors[0]
        session_id = new_session_id()
        session = RelaySession(session_id, service, agent, connector)
        self.sessions[session_id] = session
        agent.sessions.add(session)
        connector.sessions.add(session)
        self.engine.add_session(session_id, agent.addr[:2], connector.addr[:2])
        self.counters["sessions_opened"] += 1
        for node, peer in ((connector, agent), (agent, connector)):
            node.send(control.SessionOpened(
                request_id=message.request_id, session_id=session_id, service=service,
                agent=agent.name, connector=connector.name, peer_addr=peer.addr[:2]))
        log.info("session %s: agent %s -> service %s at connector %s", session_id.hex(),
                 agent.name, service, connector.name)

    def _start_punching(self, session):
        """Send StartPunching so that both peers start at the same moment (DCUtR's idea).

        The message to the peer with the shorter control RTT leaves later, by half the
        difference of the two RTTs (the difference of the one-way delays), so both arrive
        together; each peer starts its checks on arrival (delay_ms = 0).
        """
        rtts = {node: node.connection.quic.smoothed_rtt or 0.0 for node in session.members()}
        far = max(rtts.values())
        session.punch_started = time.monotonic()
        self.punching["attempts"] += 1
        loop = asyncio.get_running_loop()
        for node, rtt in rtts.items():
            message = control.StartPunching(session_id=session.session_id, delay_ms=0)
            wait = (far - rtt) / 2
            if wait > 0.0005:
                loop.call_later(wait, self._send_if_open, node, session, message)
            else:
                node.send(message)

    def _send_if_open(self, node, session, message):
        if session.session_id in self.sessions:
            node.send(message)

    def _punching_result(self, node, message):
        session = self.sessions.get(message.session_id)
        if session is None or node not in session.members():
            return
        session.results[node.role] = message
        if node is session.agent:  # the controlling side's word decides the session's path
            self.punching[message.path] += 1
            if message.path == "direct":
                self.time_to_direct_ms.append(message.elapsed_ms)
                del self.time_to_direct_ms[:-1000]
        log.info("session %s: %s %s reports %s%s", session.session_id.hex(), node.role,
                 node.name, message.path,
                 f" to {_fmt(message.remote_addr)} after {message.elapsed_ms:.0f} ms"
                 if message.path == "direct" else "")

    def _close_session(self, session, reason, notify_except=None):
        if self.sessions.pop(session.session_id, None) is None:
            return
        self.engine.remove_session(session.session_id)
        self.counters["sessions_closed"] += 1
        for node in session.members():
            node.sessions.discard(session)
            if node is not notify_except:
                node.send(control.SessionClosed(session_id=session.session_id,
                                                reason=reason[:1024]))

    def address_changed(self, node, previous, addr):
        """QAD: the node's observed address changed (NAT rebinding); tell it, move relays."""
        log.info("%s %s moved from %s to %s", node.role, node.name, _fmt(previous), _fmt(addr))
        if node.registered:
            node.send(control.ObservedAddress(addr=addr[:2]))
        for session in node.sessions:
            self.engine.set_member(session.session_id, 0 if node is session.agent else 1,
                                   addr[:2])

    def node_gone(self, node):
        key = (node.role, node.name)
        if self.nodes.get(key) is node:
            del self.nodes[key]
            log.info("%s %s disconnected", node.role, node.name)
        for session in list(node.sessions):
            self._close_session(session, f"{node.role} {node.name} disconnected",
                                notify_except=node)

    async def _expire_sessions(self):
        while True:
            await asyncio.sleep(self.cfg.session_idle_timeout / 4)
            for session_id in self.engine.idle_sessions(time.monotonic(),
                                                        self.cfg.session_idle_timeout):
                session = self.sessions.get(session_id)
                if session is not None:
                    self.counters["sessions_expired"] += 1
                    self._close_session(session, "idle")

    # Status ----------------------------------------------------------------------------
    def status(self):
        roles = {"agent": 0, "connector": 0}
        for role, _name in self.nodes:
            roles[role] += 1
        relay = self.engine.counters() if self.engine else {}
        return {
            "role": "intermediate",
            "name": self.identity.name,
            "pid": os.getpid(),
            "listen": _fmt(self.endpoint.local_address) if self.endpoint else None,
            "nodes": {"agents": roles["agent"], "connectors": roles["connector"],
                      "list": [{"role": n.role, "name": n.name, "addr": _fmt(n.addr),
                                "services": list(n.services)} for n in self.nodes.values()]},
            "sessions": {"open": len(self.sessions), "list": [
                {"session_id": s.session_id.hex(), "service": s.service,
                 "agent": s.agent.name, "connector": s.connector.name,
                 "path": s.results["agent"].path if "agent" in s.results else "relay",
                 "relay": self.engine.session_stats(s.session_id)}
                for s in self.sessions.values()]},
            "relay": relay,
            "punching": {**self.punching, "time_to_direct_ms_median":
                         statistics.median(self.time_to_direct_ms)
                         if self.time_to_direct_ms else None},
            "counters": dict(self.counters),
            "endpoint": dict(self.endpoint.counters) if self.endpoint else {},
            "router": self.endpoint.router.counters() if self.endpoint else {},
        }

    def metrics(self):
        status = self.status()
        return metrics_from_counters("mahole_intermediate", {
            "nodes_agents": status["nodes"]["agents"],
            "nodes_connectors": status["nodes"]["connectors"],
            "sessions_open": status["sessions"]["open"],
            **{f"relay_{k}": v for k, v in status["relay"].items()},
            **{f"punching_{k}": v for k, v in self.punching.items()},
            **status["counters"], **status["endpoint"], **status["router"],
        })
