"""The connector: sits beside private apps and exposes named services to agents.

It accepts end-to-end QUIC connections only for sessions the intermediate announced, and only
from the agent the intermediate named. Each QUIC stream becomes a TCP connection to the
service's target; DATAGRAM frames go to its UDP target and replies come back. A service can
also be served in-process (the library, mahole.api): its streams go to a handler given an
asyncio reader and writer, its datagrams to a handler whose return value is the reply.
"""

import asyncio
import inspect
import logging
import os

from aioquic.quic import events as qe

from .. import connection as qc
from .. import identity
from ..ice.coordinator import ice_string
from ..session import VIRTUAL_PEER_ADDR, Session
from ..tunnel import StreamPipe, stream_pair
from ..config import Service
from ..wire import control
from .node import Node

log = logging.getLogger(__name__)

# UDP datagrams of a new flow held while its socket to the target opens; beyond, dropped.
MAX_PENDING_FLOW_DATAGRAMS = 64
# Kinds of in-process service (Service.proto of a service served by a handler).
APP_STREAMS, APP_DATAGRAMS = "app-streams", "app-datagrams"
# Datagram handler calls running at once per session; beyond this datagrams are dropped.
MAX_DATAGRAM_HANDLERS = 64


# The pipe of a stream refused for breaking the end-to-end protocol: its data is ignored.
_REFUSED = object()


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
        self._handler_calls = set()  # in-process datagram handler tasks running
        self.counters = {"streams": 0, "streams_refused": 0, "stream_connect_failures": 0,
                         "datagrams_in": 0, "datagrams_out": 0, "datagrams_dropped": 0,
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
            elif pipe is _REFUSED:
                del self.pipes[event.stream_id]
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
        data = event.data
        if pipe is _REFUSED:
            return
        if pipe is None:
            if self.target.proto not in ("tcp", APP_STREAMS):
                return
            if event.stream_id & 3:
                # Only the agent's bidirectional streams carry connections (RFC 9000 §2.1:
                # the low bits 0 mean client-initiated, bidirectional).
                self._refuse_stream(event.stream_id, "not a bidirectional stream")
                return
            if self.stream_open_byte:
                if data[:1] != qc.STREAM_OPEN:
                    self._refuse_stream(event.stream_id, "no stream-open byte")
                    return
                data = data[1:]
            pipe = self.pipes[event.stream_id] = _PendingStream()
            self.counters["streams"] += 1
            asyncio.get_running_loop().create_task(self._open_tcp(event.stream_id, pipe))
        if isinstance(pipe, _PendingStream):
            if data:
                pipe.chunks.append(data)
            pipe.end = pipe.end or event.end_stream
        else:
            pipe.data_received(data, event.end_stream)

    def _refuse_stream(self, stream_id, why):
        """A stream that breaks the end-to-end protocol: dropped, counted, and reset if it
        can be (a unidirectional stream of the agent's has no sending side here)."""
        self.counters["streams_refused"] += 1
        self.pipes[stream_id] = _REFUSED  # bounded by the QUIC stream limits
        log.debug("session %s: refused stream %d: %s", self.tag, stream_id, why)
        quic = self.connection.quic
        try:
            quic.stop_stream(stream_id, qc.ERROR_PROTOCOL_ERROR)
            if stream_id & 2 == 0:
                quic.reset_stream(stream_id, qc.ERROR_PROTOCOL_ERROR)
            self.connection.transmit()
        except Exception:  # noqa: BLE001 - the stream may already be gone
            pass

    async def _open_tcp(self, stream_id, pending):
        try:
            if self.target.proto == APP_STREAMS:
                reader, writer = await self._serve_in_process()
            else:
                reader, writer = await asyncio.open_connection(self.target.host,
                                                               self.target.port)
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
                          on_done=lambda p: self.pipes.pop(p.stream_id, None),
                          budget=self.node.send_budget)
        self.pipes[stream_id] = pipe
        for chunk in pending.chunks:
            pipe.data_received(chunk, False)
        if pending.end:
            pipe.data_received(b"", True)

    async def _serve_in_process(self):
        """A connected socket pair: one end for the stream's pipe, the other end handed to
        the service's handler as asyncio streams (the same backpressure as a TCP target)."""
        (reader, writer), (app_reader, app_writer) = await stream_pair()
        handler = self.node.app_handlers[self.service]
        task = asyncio.get_running_loop().create_task(
            _run_stream_handler(handler, app_reader, app_writer, self.service))
        self.node.app_tasks.add(task)
        task.add_done_callback(self.node.app_tasks.discard)
        return reader, writer

    # UDP -------------------------------------------------------------------------------
    def _datagram(self, data):
        if self.target.proto not in ("udp", APP_DATAGRAMS):
            return
        received = self.datagram_frame_received(data)
        if received is None:
            return
        flow_id, payload = received
        if self.target.proto == APP_DATAGRAMS:
            self._datagram_in_process(flow_id, payload)
            return
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

    def _datagram_in_process(self, flow_id, payload):
        """The in-process handler's return value (bytes, or None for no reply) goes back on
        the same flow; a coroutine handler runs as a task, bounded per session."""
        handler = self.node.app_handlers[self.service]
        try:
            reply = handler(payload)
        except Exception:  # noqa: BLE001 - the application's bug must not end the session
            log.exception("service %s: datagram handler failed", self.service)
            return
        if not inspect.isawaitable(reply):
            if reply is not None:
                self.send_datagram(flow_id, bytes(reply))
            return
        if len(self._handler_calls) >= MAX_DATAGRAM_HANDLERS:
            if inspect.iscoroutine(reply):
                reply.close()  # never awaited: no "coroutine was never awaited" warning
            self._datagram_dropped(flow_id, "handler_busy")
            return
        task = asyncio.ensure_future(reply)
        self._handler_calls.add(task)
        task.add_done_callback(lambda t, f=flow_id: self._datagram_handled(t, f))

    def _datagram_handled(self, task, flow_id):
        self._handler_calls.discard(task)
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("service %s: datagram handler failed: %r", self.service,
                      task.exception())
        elif task.result() is not None and not self.closed:
            self.send_datagram(flow_id, bytes(task.result()))

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
        for task in self._handler_calls:
            task.cancel()
        self.node.session_closed(self, reason)

    def stats(self):
        return {**super().stats(), **self.counters}


class Connector(Node):
    role = "connector"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.services = {service.name: service for service in cfg.services}
        self.app_handlers = {}  # service name -> handler of an in-process service
        self.app_tasks = set()  # stream handlers running
        self._announced = ()  # the services the intermediate was last told of
        self.e2e_config = qc.configuration(
            self.identity, cfg.ca, is_client=False, alpn=qc.ALPN_E2E,
            idle_timeout=cfg.e2e_idle_timeout, max_datagram_frame_size=65536,
            max_stream_data=qc.E2E_STREAM_WINDOW, congestion_control=cfg.congestion_control, **self.debug_logs.quic_kwargs())

    def add_service(self, service, handler=None):
        """Offer one more service: a `Service` with a TCP or UDP target, or with proto
        APP_STREAMS / APP_DATAGRAMS and the handler that serves it in-process. Once
        registered the connector announces its new list at once (UpdateServices); before,
        the list goes with its registration (ValueError: a name already offered, or too
        many services)."""
        if service.name in self.services:
            raise ValueError(f"service {service.name!r} is already offered")
        if len(self.services) >= control.MAX_SERVICES:
            raise ValueError(f"a connector offers at most {control.MAX_SERVICES} services")
        self.services[service.name] = service
        if handler is not None:
            self.app_handlers[service.name] = handler
        if self.control is not None and self.control.connected:
            self._announce_services()

    def _announce_services(self):
        self._announced = tuple(self.services)
        self.control.send(control.UpdateServices(services=self._announced))

    async def stop(self):
        await super().stop()
        for task in list(self.app_tasks):
            task.cancel()
        await asyncio.gather(*self.app_tasks, return_exceptions=True)

    def register_message(self):
        self._announced = tuple(self.services)
        return control.Register(role="connector", name=self.name, services=self._announced)

    def control_message(self, message):
        if self.session_message(message):
            return
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
                self.start_punching(session, message)
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
        if state == "connected" and self._announced != tuple(self.services):
            self._announce_services()  # added while the registration was on its way


async def _run_stream_handler(handler, reader, writer, service):
    """One in-process stream: the handler's, closed when it returns or fails."""
    try:
        await handler(reader, writer)
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - the application's bug must not end the connector
        log.exception("service %s: stream handler failed", service)
    finally:
        writer.close()


def app_service(name, kind):
    """The `Service` entry of an in-process service (APP_STREAMS or APP_DATAGRAMS)."""
    return Service(name, kind, "", 0)
