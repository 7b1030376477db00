"""The connector: sits beside private apps and exposes named services to agents.

It accepts end-to-end QUIC connections only for sessions the intermediate announced, and only
from the agent the intermediate named. Each QUIC stream becomes a TCP connection to the
service's target; DATAGRAM frames go to its UDP target and replies come back.
"""

import asyncio
import logging
import os

from aioquic.quic import events as qe

from .. import connection as qc
from .. import identity
from ..ice.coordinator import ice_string
from ..session import VIRTUAL_PEER_ADDR, Session
from ..tunnel import StreamPipe
from ..wire import control
from .node import Node

log = logging.getLogger(__name__)

# UDP datagrams of a new flow held while its socket to the target opens; beyond, dropped.
MAX_PENDING_FLOW_DATAGRAMS = 64


class _PendingStream:
    """Stream data that arrived while the TCP connection to the target is being opened."""

    def __init__(self):
        self.chunks = []
        self.end = False
        self.reset = False


class _UdpFlow(asyncio.DatagramProtocol):
    def __init__(self, session, flow_id):
        self.session = session
        self.flow_id = flow_id
        self.transport = None
        self.pending = []  # datagrams that arrived while the socket to the target opened

    def connection_made(self, transport):
        self.transport = transport
        pending, self.pending = self.pending, []
        for payload in pending:
            transport.sendto(payload)

    def datagram_received(self, data, addr):
        self.session.send_datagram(self.flow_id, data)

    def error_received(self, exc):
        log.debug("udp flow %d: %s", self.flow_id, exc)


class ConnectorSession(Session):
    def __init__(self, node, message):
        super().__init__(node, message.session_id, message.service, message.agent,
                         message.connector)
        self.peer = f"agent {message.agent}"
        self.target = node.services[message.service]
        self.verified = False
        self.flows = {}
        self.counters = {"streams": 0, "stream_connect_failures": 0, "datagrams_in": 0,
                         "datagrams_out": 0, "datagrams_dropped": 0,
                         "datagrams_dropped_oversize": 0}

    def first_packet(self, header, data, addr):
        if header.packet_type != "initial" or len(data) < 1200:
            self.dropped_frames += 1
            return
        quic = qc.NodeQuicConnection(configuration=self.node.e2e_config,
                                     original_destination_connection_id=header.dcid)
        self.connection = self.endpoint.add_connection(
            quic, self, path=self.core, peer_addr=VIRTUAL_PEER_ADDR, extra_cids=(header.dcid,))
        self.connection.path_datagram_received(data, addr, self.endpoint.now())

    def quic_event(self, connection, event):
        super().quic_event(connection, event)
        if isinstance(event, qe.HandshakeCompleted):
            try:
                qc.verify_peer(connection.quic, self.node.ca, "agent", self.agent)
            except identity.IdentityError as exc:
                log.warning("session %s: refused the peer: %s", self.tag, exc)
                connection.close(qc.ERROR_UNAUTHENTICATED, str(exc)[:200])
                return
            self.verified = True
            log.info("session %s: agent %s connected for %s", self.tag,
                     self.agent, self.service)
        elif not self.verified:
            return
        elif isinstance(event, qe.StreamDataReceived):
            self._stream_data(event)
        elif isinstance(event, qe.StreamReset):
            pipe = self.pipes.get(event.stream_id)
            if isinstance(pipe, _PendingStream):
                pipe.reset = True
            elif pipe is not None:
                pipe.reset()
        elif isinstance(event, qe.DatagramFrameReceived):
            self._datagram(event.data)

    def connection_closed(self, connection):
        self.close("end-to-end connection closed")

    def progress(self, connection):
        super().progress(connection)
        for pipe in list(self.pipes.values()):
            if isinstance(pipe, StreamPipe):
                pipe.progress()

    # TCP -------------------------------------------------------------------------------
    def _stream_data(self, event):
        pipe = self.pipes.get(event.stream_id)
        if pipe is None:
            if self.target.proto != "tcp":
                return
            pipe = self.pipes[event.stream_id] = _PendingStream()
            self.counters["streams"] += 1
            asyncio.get_running_loop().create_task(self._open_tcp(event.stream_id, pipe))
        if isinstance(pipe, _PendingStream):
            pipe.chunks.append(event.data)
            pipe.end = pipe.end or event.end_stream
        else:
            pipe.data_received(event.data, event.end_stream)

    async def _open_tcp(self, stream_id, pending):
        try:
            reader, writer = await asyncio.open_connection(self.target.host, self.target.port)
        except OSError as exc:
            self.counters["stream_connect_failures"] += 1
            log.warning("service %s: cannot connect to %s:%d: %s", self.service,
                        self.target.host, self.target.port, exc.strerror or exc)
            self.pipes.pop(stream_id, None)
            if self.connection is not None and not self.connection.closed:
                try:
                    self.connection.quic.reset_stream(stream_id, 1)
                    self.connection.transmit()
                except Exception:  # noqa: BLE001 - stream already gone
                    pass
            return
        if self.closed or pending.reset:
            writer.transport.abort()
            self.pipes.pop(stream_id, None)
            return
        pipe = StreamPipe(self.connection, stream_id, reader, writer,
                          on_done=lambda p: self.pipes.pop(p.stream_id, None))
        self.pipes[stream_id] = pipe
        for chunk in pending.chunks:
            pipe.data_received(chunk, False)
        if pending.end:
            pipe.data_received(b"", True)

    # UDP -------------------------------------------------------------------------------
    def _datagram(self, data):
        if self.target.proto != "udp":
            return
        received = self.datagram_frame_received(data)
        if received is None:
            return
        flow_id, payload = received
        flow = self.flows.get(flow_id)
        if flow is None:
            flow = self.flows[flow_id] = _UdpFlow(self, flow_id)
            flow.pending.append(payload)
            asyncio.get_running_loop().create_task(self._open_udp(flow))
        elif flow.transport is not None:
            flow.transport.sendto(payload)
        elif len(flow.pending) < MAX_PENDING_FLOW_DATAGRAMS:
            flow.pending.append(payload)
        else:
            self._datagram_dropped(flow_id, "flow_opening")

    async def _open_udp(self, flow):
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: flow, remote_addr=(self.target.host, self.target.port))
        if self.closed:
            transport.close()

    def close(self, reason="closed"):
        if self.closed:
            return
        super().close(reason)
        for pipe in list(self.pipes.values()):
            if isinstance(pipe, StreamPipe):
                pipe.close(abort=True)
        for flow in self.flows.values():
            if flow.transport is not None:
                flow.transport.close()
        self.node.session_closed(self, reason)

    def stats(self):
        return {**super().stats(), **self.counters}


class Connector(Node):
    role = "connector"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.services = {service.name: service for service in cfg.services}
        self.e2e_config = qc.configuration(
            self.identity, cfg.ca, is_client=False, alpn=qc.ALPN_E2E,
            idle_timeout=cfg.e2e_idle_timeout, max_datagram_frame_size=65536,
            **self.debug_logs.quic_kwargs())

    def register_message(self):
        return control.Register(role="connector", name=self.name,
                                services=tuple(self.services))

    def control_message(self, message):
        if isinstance(message, control.SessionOpened):
            if message.connector != self.name or message.service not in self.services:
                log.warning("ignoring a session for %s at %s", message.service,
                            message.connector)
                return
            self.sessions[message.session_id] = ConnectorSession(self, message)
        elif isinstance(message, control.SessionClosed):
            session = self.sessions.get(message.session_id)
            if session is not None:
                session.close(message.reason)
        elif isinstance(message, control.CandidateOffer):
            session = self.sessions.get(message.session_id)
            if session is not None:
                self._answer(session, message)
        elif isinstance(message, control.StartPunching):
            session = self.sessions.get(message.session_id)
            if session is not None and not self.cfg.relay_only:
                self.start_punching(session, message.delay_ms)
        elif isinstance(message, control.Error):
            log.warning("intermediate: %s", message.message)

    def _answer(self, session, offer):
        if self.cfg.relay_only:
            # Credentials but no candidates: the agent's checks have nothing to reach, and
            # this node does not answer checks (its hole punch never exists).
            ufrag, pwd, candidates = ice_string(os.urandom(6)), ice_string(os.urandom(18)), ()
        else:
            ufrag, pwd, candidates = self.puncher.local_description(session, controlling=False)
            self.puncher.remote_description(session, offer)
        self.control.send(control.CandidateAnswer(session_id=session.session_id, ufrag=ufrag,
                                                  pwd=pwd, candidates=candidates))

    def session_closed(self, session, reason):
        if self.sessions.pop(session.session_id, None) is session:
            self.record_closed(session, reason)
            if self.control is not None and self.control.connected:
                self.control.send(control.SessionClosed(session_id=session.session_id,
                                                        reason=reason[:1024]))

    def control_state_changed(self, state):
        # Relayed sessions cannot outlive the relay (their agents will open new ones);
        # direct sessions carry on without the intermediate.
        self.relay_state_changed(state)
