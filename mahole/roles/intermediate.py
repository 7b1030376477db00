"""The intermediate: authenticates nodes, tells them their observed address, signals, relays.

One UDP socket carries control QUIC connections from agents and connectors, STUN Binding
requests (answered with XOR-MAPPED-ADDRESS, RFC 8489 §14.2) and relay frames. The relay
engine reads the socket: it forwards relay frames of known sessions between their two members
entirely in compiled code and hands everything else to the endpoint.

Registry, ACL, sessions and signaling are the sans-IO `mahole.signaling.SignalingCore`; this
module is its shell: it accepts QUIC connections, checks certificates, decodes the control
stream, feeds the core with what happened (authenticated packets only) and carries out its
events on the connections and the relay engine, with one endpoint timer for the core's.
"""

import itertools
import logging
import os
import statistics

from aioquic.quic import events as qe

from .. import connection as qc
from .. import identity
from .._fast import RelayEngine
from ..endpoint import ConnectionHandler, Endpoint
from ..signaling import (
    AclRule,
    CloseNode,
    RelayAdd,
    RelayRemove,
    RelaySetMember,
    SendMessage,
    SignalingCore,
)
from ..status import metrics_from_counters
from ..wire import control, stun
from .node import ControlStream, _fmt, bind_udp, load_credentials, start_status

log = logging.getLogger(__name__)

__all__ = ["AclRule", "Intermediate"]

SUPPORTED_VERSIONS = (0x00000001,)  # QUIC v1 (RFC 9000)
TIMER_KEY = "signaling"  # the core's one timer on the endpoint


class ControlConnection(ConnectionHandler):
    """A node's control connection at the intermediate: certificate, control stream, and
    what the core hears of it under ``handle``."""

    def __init__(self, intermediate, handle):
        self.intermediate = intermediate
        self.handle = handle
        self.connection = None
        self.stream = None
        self.peer = None  # identity.Peer once the certificate checked out

    def send(self, message):
        if self.stream is not None and not self.connection.closed:
            self.stream.send(message)

    def quic_event(self, connection, event):
        intermediate = self.intermediate
        if isinstance(event, qe.HandshakeCompleted):
            try:
                self.peer = qc.verify_peer(connection.quic, intermediate.ca,
                                           ("agent", "connector"))
            except identity.IdentityError as exc:
                intermediate.shell_counters["refused_unauthenticated"] += 1
                log.warning("refused %s: %s", _fmt(connection.peer_addr), exc)
                connection.close(qc.ERROR_UNAUTHENTICATED, f"unauthenticated: {exc}"[:200])
                return
            intermediate.signaling.node_connected(self.handle, self.peer.role, self.peer.name,
                                                  connection.peer_addr[:2],
                                                  intermediate.endpoint.now())
            intermediate.pump()
        elif isinstance(event, qe.StreamDataReceived):
            if self.peer is None or event.stream_id != 0:
                return  # only the first client stream carries control messages
            if self.stream is None:
                self.stream = ControlStream(connection, event.stream_id)
            try:
                messages = self.stream.feed(event.data)
            except ValueError as exc:
                intermediate.shell_counters["bad_control_messages"] += 1
                self.send(control.Error(code=control.ErrorCode.BAD_MESSAGE,
                                        message=f"bad control message: {exc}"[:1024]))
                connection.close(qc.ERROR_SHUTDOWN, "bad control message")
                return
            now = intermediate.endpoint.now()
            for message in messages:
                intermediate.signaling.control_message(self.handle, message, now)
            intermediate.pump()

    def packet_authenticated(self, connection, addr, now):
        if self.peer is not None:
            signaling = self.intermediate.signaling
            signaling.packet_authenticated(self.handle, addr[:2], now,
                                           rtt=connection.quic.smoothed_rtt)
            self.intermediate.pump()

    def connection_closed(self, connection):
        intermediate = self.intermediate
        intermediate.connections.pop(self.handle, None)
        if self.peer is not None:
            intermediate.signaling.node_disconnected(self.handle, intermediate.endpoint.now())
            intermediate.pump()


class Intermediate:
    role = "intermediate"

    def __init__(self, cfg):
        self.cfg = cfg
        self.identity, self.ca = load_credentials(cfg, "intermediate")
        self.signaling = SignalingCore(acl=cfg.allow, home=self.identity.name,
                                       probe_timeout=cfg.probe_timeout,
                                       node_dead_after=cfg.node_dead_after)
        self.connections = {}  # handle -> ControlConnection
        self._handles = itertools.count(1)
        self.endpoint = None
        self.engine = None
        self.status_server = None
        self.shell_counters = {
            "connections_accepted": 0, "refused_unauthenticated": 0, "stun_requests": 0,
            "stun_malformed": 0, "bad_control_messages": 0, "initials_dropped": 0,
        }
        self._server_config = qc.configuration(
            self.identity, cfg.ca, is_client=False, alpn=qc.ALPN_CONTROL,
            idle_timeout=cfg.idle_timeout)
        self._timer_at = None

    async def start(self):
        sock = bind_udp(*self.cfg.listen)
        self.engine = RelayEngine(sock, rate_limit_bps=self.cfg.relay_rate_limit,
                                  burst_bytes=self.cfg.relay_burst)
        self.endpoint = Endpoint(sock, on_stun=self._stun, on_initial=self._initial,
                                 receiver=self.engine)
        self.endpoint.start()
        self.status_server = await start_status(self.cfg.status, self.status, self.metrics)
        log.info("intermediate %s listening on %s", self.identity.name,
                 _fmt(self.endpoint.local_address))

    @property
    def local_address(self):
        return self.endpoint.local_address

    @property
    def nodes(self):
        """(role, name) -> `NodeRecord` of every registered node."""
        return {(n.role, n.name): n for n in self.signaling.registry.nodes()}

    @property
    def counters(self):
        return {**self.shell_counters, **self.signaling.counters}

    async def stop(self):
        for conn in list(self.connections.values()):
            if conn.connection is not None:
                conn.connection.close(qc.ERROR_SHUTDOWN, "intermediate stopping")
        if self.endpoint is not None:
            self.endpoint.cancel_timer(TIMER_KEY)
            self.endpoint.flush()
        if self.status_server is not None:
            await self.status_server.close()
        if self.endpoint is not None:
            self.endpoint.close()

    # The core's events and timer ---------------------------------------------------------
    def pump(self):
        """Carry out what the core asked for and wake up for its next timer. Call after
        every input to the core (the handlers here do)."""
        signaling = self.signaling
        engine = self.engine
        while (event := signaling.next_event()) is not None:
            if isinstance(event, SendMessage):
                conn = self.connections.get(event.handle)
                if conn is not None:
                    conn.send(event.message)
            elif isinstance(event, CloseNode):
                conn = self.connections.get(event.handle)
                if conn is not None and conn.connection is not None:
                    conn.connection.close(event.code, event.reason)
            elif isinstance(event, RelayAdd):
                engine.add_session(event.session_id, event.agent_addr, event.connector_addr)
            elif isinstance(event, RelayRemove):
                engine.remove_session(event.session_id)
            elif isinstance(event, RelaySetMember):
                engine.set_member(event.session_id, event.member, event.addr)
        when = signaling.next_timer()
        if when != self._timer_at:
            self._timer_at = when
            if when is None:
                self.endpoint.cancel_timer(TIMER_KEY)
            else:
                self.endpoint.set_timer(TIMER_KEY, when, self._on_timer)

    def _on_timer(self, now):
        self._timer_at = None
        self.signaling.handle_timer(now)
        self.pump()

    # Datagrams the relay engine did not relay ------------------------------------------
    def _initial(self, header, data, addr):
        if header.version not in SUPPORTED_VERSIONS or len(data) < 1200:
            # RFC 9000 §14.1: Initial datagrams are at least 1200 bytes.
            self.shell_counters["initials_dropped"] += 1
            return
        quic = qc.NodeQuicConnection(configuration=self._server_config,
                                     original_destination_connection_id=header.dcid)
        handle = next(self._handles)
        conn = ControlConnection(self, handle)
        self.connections[handle] = conn
        conn.connection = self.endpoint.add_connection(quic, conn, peer_addr=addr,
                                                       extra_cids=(header.dcid,))
        self.shell_counters["connections_accepted"] += 1
        conn.connection.datagram_received(data, addr, self.endpoint.now())

    def _stun(self, data, addr):
        try:
            request = stun.decode(data)
        except ValueError:
            self.shell_counters["stun_malformed"] += 1
            return
        if (request.method != stun.METHOD_BINDING
                or request.message_class != stun.CLASS_REQUEST):
            self.shell_counters["stun_malformed"] += 1
            return
        self.shell_counters["stun_requests"] += 1
        response = stun.binding_success(request, (addr[0], addr[1]))
        self.endpoint.send([(stun.encode(response), addr)])

    # Status ----------------------------------------------------------------------------
    def status(self):
        registry = self.signaling.registry
        nodes = registry.nodes()
        roles = {"agent": 0, "connector": 0}
        for node in nodes:
            roles[node.role] += 1
        sessions = registry.sessions()
        engine = self.engine
        punching = self.signaling.punching
        times = self.signaling.time_to_direct_ms
        return {
            "role": "intermediate",
            "name": self.identity.name,
            "pid": os.getpid(),
            "listen": _fmt(self.endpoint.local_address) if self.endpoint else None,
            "nodes": {"agents": roles["agent"], "connectors": roles["connector"],
                      "list": [{"role": n.role, "name": n.name, "addr": _fmt(n.addr),
                                "services": list(n.services)} for n in nodes]},
            "sessions": {"open": len(sessions), "list": [
                {"session_id": s.session_id.hex(), "service": s.service,
                 "agent": s.agent_name, "connector": s.connector_name, "path": s.path,
                 "relay": engine.session_stats(s.session_id) if engine else None}
                for s in sessions]},
            "relay": engine.counters() if engine else {},
            "punching": {**punching, "time_to_direct_ms_median":
                         statistics.median(times) if times else None},
            "counters": self.counters,
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
            **{f"punching_{k}": v for k, v in self.signaling.punching.items()},
            **status["counters"], **status["endpoint"], **status["router"],
        })
