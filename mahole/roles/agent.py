"""The agent: opens end-to-end sessions to services through the intermediate.

A session is opened on demand (`session_for`) and carries streams (`AgentSession.open_stream`)
and datagrams. The library (mahole.api) and the local forwards (mahole.forwards) use it.
"""

import asyncio
import itertools
import logging
import numbers
import sys
import time

from aioquic.quic import events as qe

from .. import connection as qc
from .. import identity
from ..session import VIRTUAL_PEER_ADDR, Session
from ..tunnel import StreamPipe
from ..wire import control
from .node import Node, StartupError, _fmt

log = logging.getLogger(__name__)

# Flow id of the library's own datagrams (mahole.api Session.send_datagram); UDP forwards
# number their flows from 1.
APP_FLOW = 0
# Datagrams received for the library and not read yet; beyond this they are dropped.
MAX_APP_DATAGRAMS = 1024

# Bounds of a `mahole ping` request on the control socket: (default, lowest, highest).
PING_COUNT = (4, 1, 1000)
PING_INTERVAL = (1.0, 0.0, 60.0)  # seconds between probes
PING_TIMEOUT = (2.0, 0.01, 60.0)  # seconds a probe waits for its acknowledgement


class SessionError(Exception):
    """Why a forward could not reach its service, for a person; `code` is the
    intermediate's `control.ErrorCode` when it refused, None otherwise."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


class AgentSession(Session):
    controlling = True

    def __init__(self, agent, message):
        super().__init__(agent, message.session_id, message.service, message.agent,
                         message.connector)
        self.peer = f"connector {message.connector}"
        self.ready = asyncio.get_running_loop().create_future()
        self.counters = {"streams": 0, "datagrams_out": 0, "datagrams_in": 0,
                         "datagrams_dropped_oversize": 0, "datagrams_dropped": 0}
        # The library's datagrams (flow APP_FLOW), bounded; None until it asks for them.
        self.app_datagrams = None
        config = qc.configuration(agent.identity, agent.cfg.ca, is_client=True,
                                  alpn=qc.ALPN_E2E, server_name=message.connector,
                                  idle_timeout=agent.cfg.e2e_idle_timeout,
                                  max_datagram_frame_size=65536,
                                  max_stream_data=qc.E2E_STREAM_WINDOW,
                                  congestion_control=agent.cfg.congestion_control,
                                  **agent.debug_logs.quic_kwargs())
        quic = qc.NodeQuicConnection(configuration=config)
        quic.connect(VIRTUAL_PEER_ADDR, now=self.endpoint.now())
        self.connection = self.endpoint.add_connection(quic, self, path=self.core,
                                                       peer_addr=VIRTUAL_PEER_ADDR)

    def quic_event(self, connection, event):
        super().quic_event(connection, event)
        if isinstance(event, qe.HandshakeCompleted):
            try:
                qc.verify_peer(connection.quic, self.node.ca, "connector", self.connector)
            except identity.IdentityError as exc:
                self._fail(f"connector refused: {exc}")
                connection.close(qc.ERROR_UNAUTHENTICATED, str(exc)[:200])
                return
            if not self.ready.done():
                self.ready.set_result(self)
            log.info("session %s to %s at %s ready (%s)", self.tag,
                     self.service, self.connector, self.route)
        elif isinstance(event, qe.StreamDataReceived):
            pipe = self.pipes.get(event.stream_id)
            if pipe is not None:
                pipe.data_received(event.data, event.end_stream)
        elif isinstance(event, qe.StreamReset):
            pipe = self.pipes.get(event.stream_id)
            if pipe is not None:
                pipe.reset()
        elif isinstance(event, qe.DatagramFrameReceived):
            received = self.datagram_frame_received(event.data)
            if received is not None:
                self._deliver_datagram(*received)
        elif isinstance(event, qe.ConnectionTerminated):
            self._fail(f"end-to-end connection closed: {event.reason_phrase or 'no reason'}")

    def _deliver_datagram(self, flow_id, payload):
        """To the library's queue (flow APP_FLOW, once it asked for datagrams) or to the
        UDP forward the flow belongs to."""
        if flow_id != APP_FLOW or self.app_datagrams is None:
            self.node.udp_reply(self.service, flow_id, payload)
        elif self.app_datagrams.full():
            self._datagram_dropped(APP_FLOW, "unread")
        else:
            self.app_datagrams.put_nowait(payload)

    def progress(self, connection):
        super().progress(connection)
        for pipe in list(self.pipes.values()):
            pipe.progress()

    def repunch(self, attempt):
        """The session core's cool-down after a failover (or a failed attempt) is over."""
        agent = self.node
        if self.closed or not agent.control.connected:
            return
        log.info("session %s: punching again (attempt %d)", self.tag, attempt)
        ufrag, pwd, candidates = agent.puncher.local_description(self, controlling=True)
        agent.control.send(control.CandidateOffer(session_id=self.session_id, ufrag=ufrag,
                                                  pwd=pwd, candidates=candidates))

    def connection_closed(self, connection):
        self.close("end-to-end connection closed")

    def _fail(self, reason):
        if not self.ready.done():
            self.ready.set_exception(SessionError(reason))
            self.ready.exception()  # retrieved: nobody may be waiting any more

    def open_stream(self, reader, writer):
        quic = self.connection.quic
        stream_id = quic.get_next_available_stream_id()
        # Claims the id for this pipe at once; under /3 also tells the connector now, so a
        # service that speaks first is connected before the app sends anything.
        quic.send_stream_data(stream_id, qc.STREAM_OPEN if self.stream_open_byte else b"")
        self.connection.transmit()
        pipe = StreamPipe(self.connection, stream_id, reader, writer,
                          on_done=lambda p: self.pipes.pop(p.stream_id, None),
                          budget=self.node.send_budget)
        self.pipes[stream_id] = pipe
        self.counters["streams"] += 1
        return pipe

    def close(self, reason="closed"):
        if self.closed:
            return
        super().close(reason)
        self._fail(reason)
        for pipe in list(self.pipes.values()):
            pipe.close(abort=True)
        self.node.session_closed(self, reason)

    def stats(self):
        return {**super().stats(), **self.counters}


class Agent(Node):
    role = "agent"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.forwards = None  # mahole.forwards.Forwards of cfg.forwards, set by mahole.api
        self._opening = {}  # service -> Future of AgentSession
        self._requests = {}  # request_id -> Future of SessionOpened
        self._request_ids = itertools.count(1)
        self.counters = {"session_errors": 0}
        # (service, SessionError, time.monotonic()) of the latest open that failed, for
        # /status: what a person asks first when a forward resets its connections.
        self._last_session_error = None

    def register_message(self):
        return control.Register(role="agent", name=self.name)

    async def prepare(self):
        """Listen on the forwards before registering: a copy that cannot listen never
        disturbs a running one."""
        if self.forwards is None:
            return
        from ..forwards import ForwardError
        try:
            await self.forwards.start()
        except ForwardError as exc:
            raise StartupError(str(exc)) from None
        for line in self.forwards.lines():
            print(line, file=sys.stderr, flush=True)

    async def stop(self):
        if self.forwards is not None:
            self.forwards.close()
        await super().stop()

    # The local control socket -------------------------------------------------------------
    def control_commands(self):
        return {"ping": self._control_ping}

    async def _control_ping(self, request, send):
        """`mahole ping`: QUIC PINGs on the service's session (opened if needed), one reply
        line a probe with its RTT and route, then where the session goes now."""
        service = request.get("service")
        if not isinstance(service, str) or not 0 < len(service) <= 255:
            return {"ok": False, "error": "ping needs a service name"}
        try:
            count = _bounded(request, "count", PING_COUNT, integer=True)
            interval = _bounded(request, "interval", PING_INTERVAL)
            timeout = _bounded(request, "timeout", PING_TIMEOUT)
        except ValueError as exc:
            return {"ok": False, "error": str(exc)}
        loop = asyncio.get_running_loop()
        session = None
        for probe in range(1, count + 1):
            started = loop.time()
            if session is None or session.closed:
                try:
                    session = await self.session_for(service)
                except SessionError as exc:
                    return {"ok": False, "error": f"no session to {service}: {exc}"}
            route, addr, answered = session.probe()
            try:
                rtt = await asyncio.wait_for(answered, timeout)
            except (asyncio.TimeoutError, asyncio.CancelledError, ConnectionError):
                if asyncio.current_task().cancelling():
                    raise
                rtt = None
            await send({"probe": probe, "service": service, "session": session.tag,
                        "path": route, "addr": _fmt(addr) if addr else None,
                        "rtt_ms": round(rtt * 1000, 3) if rtt is not None else None})
            if probe < count:
                await asyncio.sleep(max(0.0, interval - (loop.time() - started)))
        core = session.core
        return {"ok": True, "done": True, "service": service, "session": session.tag,
                "path": session.route, "connector": session.connector,
                "direct_addr": _fmt(core.direct_addr) if core.direct_addr else None,
                "relay_addr": _fmt(core.relay_addr) if core.relay_addr else None}

    # Sessions --------------------------------------------------------------------------
    def ready_session(self, service):
        for session in self.sessions.values():
            if (session.service == service and not session.closed and session.ready.done()
                    and not session.ready.exception()):
                return session
        return None

    async def session_for(self, service):
        """A ready end-to-end session for service, opening one if needed (SessionError)."""
        session = self.ready_session(service)
        if session is not None:
            return session
        opening = self._opening.get(service)
        if opening is None:
            opening = asyncio.get_running_loop().create_task(self._open(service))
            self._opening[service] = opening
            opening.add_done_callback(lambda _t, s=service: self._opening.pop(s, None))
        return await asyncio.shield(opening)

    async def _open(self, service):
        timeout = self.cfg.open_timeout
        try:
            return await asyncio.wait_for(self._open_inner(service), timeout)
        except asyncio.TimeoutError:
            error = SessionError(f"no session to {service} within {timeout:g} s "
                                 f"(intermediate {'reachable' if self.control.connected else 'unreachable'})")
            self._session_failed(service, error)
            raise error from None
        except SessionError as exc:
            self._session_failed(service, exc)
            raise

    def _session_failed(self, service, error):
        self.counters["session_errors"] += 1
        self._last_session_error = (service, error, time.monotonic())

    async def _open_inner(self, service):
        await self.control._registered.wait()
        request_id = next(self._request_ids)
        reply = asyncio.get_running_loop().create_future()
        self._requests[request_id] = reply
        try:
            self.control.send(control.OpenSession(request_id=request_id, service=service))
            message = await reply
        finally:
            self._requests.pop(request_id, None)
        if isinstance(message, control.Error):
            raise SessionError(message.message, message.code)
        session = AgentSession(self, message)
        self.sessions[message.session_id] = session
        if not self.cfg.relay_only:
            ufrag, pwd, candidates = self.puncher.local_description(session, controlling=True)
            self.control.send(control.CandidateOffer(session_id=session.session_id, ufrag=ufrag,
                                                     pwd=pwd, candidates=candidates))
        return await session.ready

    def control_message(self, message):
        if self.session_message(message):
            return
        request_id = getattr(message, "request_id", None)
        if isinstance(message, (control.SessionOpened, control.Error)) and request_id:
            reply = self._requests.get(request_id)
            if reply is not None and not reply.done():
                reply.set_result(message)
                return
        session = self.sessions.get(getattr(message, "session_id", None))
        if isinstance(message, control.SessionClosed):
            if session is not None:
                session.close(message.reason)
        elif isinstance(message, control.CandidateAnswer):
            if session is not None:
                self.puncher.remote_description(session, message)
        elif isinstance(message, control.StartPunching):
            if session is not None:
                self.start_punching(session, message)
        elif isinstance(message, control.Error):
            log.warning("intermediate: %s", message.message)

    def session_closed(self, session, reason):
        if self.sessions.pop(session.session_id, None) is session:
            self.record_closed(session, reason)
            log.info("session %s to %s closed: %s", session.tag, session.service,
                     reason)
            if self.control is not None and self.control.connected:
                self.control.send(control.SessionClosed(session_id=session.session_id,
                                                        reason=reason[:1024]))

    def control_state_changed(self, state):
        if state == "disconnected":
            for reply in self._requests.values():
                if not reply.done():
                    reply.set_result(control.Error(
                        code=control.ErrorCode.CONNECTOR_OFFLINE,
                        message="lost the intermediate while opening the session"))
        self.relay_state_changed(state)

    def udp_reply(self, service, flow_id, payload):
        if self.forwards is not None:
            self.forwards.datagram_received(service, flow_id, payload)

    def status(self):
        status = super().status()
        status["counters"] = dict(self.counters)
        if self._last_session_error is not None:
            service, error, at = self._last_session_error
            code = getattr(error.code, "name", error.code)
            status["last_session_error"] = {"service": service, "error": str(error),
                                            "code": code,
                                            "age_s": round(time.monotonic() - at, 3)}
        if self.forwards is not None:
            status["forwards"] = self.forwards.status()
            status["counters"].update(self.forwards.counters)
        return status


def _bounded(request, key, bounds, *, integer=False):
    """request[key] within bounds (default, lowest, highest); ValueError for a person."""
    default, low, high = bounds
    value = request.get(key, default)
    if value is None:
        return default
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        raise ValueError(f"{key} must be {'a whole number' if integer else 'a number'} "
                         f"from {low:g} to {high:g}")
    return value
