"""What agents and connectors share: the socket, the control connection, status.

A node keeps one QUIC control connection to the intermediate on its one UDP socket,
registers, learns its observed address (QAD), and reconnects with backoff when the
intermediate is unreachable or restarts.
"""

import asyncio
import collections
import itertools
import logging
import os
import random
import time
import socket

from aioquic.quic import events as qe

from .. import connection as qc
from .. import identity
from ..endpoint import ConnectionHandler, Endpoint
from ..punching import Puncher
from ..status import StatusServer, metrics_from_counters
from ..wire import control

log = logging.getLogger(__name__)

CONTROL_STREAM = 0  # the first client-initiated bidirectional stream (RFC 9000 §2.1)


class StartupError(Exception):
    """A problem that stops a role from starting, with a message for a person."""


def bind_udp(host, port):
    """The node's one UDP socket, non-blocking."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        for opt, size in ((socket.SO_RCVBUF, 4 << 20), (socket.SO_SNDBUF, 4 << 20)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
            except OSError:
                pass
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot bind UDP {host}:{port}: {exc.strerror or exc}") from None
    return sock


def load_credentials(cfg, role):
    """(Identity, CA certificates) from the configured files, checked for the role."""
    try:
        ca = identity.load_ca(cfg.ca)
        node = identity.load_identity(cfg.cert, cfg.key)
    except identity.IdentityError as exc:
        raise StartupError(str(exc)) from None
    if node.role != role:
        raise StartupError(f"{cfg.cert} is a certificate for {_a(node.role)}, "
                           f"but this is {_a(role)}")
    try:
        identity.verify_peer([node.certificate, *node.chain], ca, expected_role=role)
    except identity.IdentityError as exc:
        raise StartupError(f"{cfg.cert}: {exc}") from None
    return node, ca


async def resolve(hostport, bind_host):
    """The intermediate's address as an IP literal of the bound socket's family."""
    host, port = hostport
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=family,
                                                             type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as exc:
        raise StartupError(f"cannot resolve the intermediate {host!r}: "
                           f"{getattr(exc, 'strerror', None) or exc}") from None
    return infos[0][4][:2]


async def start_status(addr, snapshot, metrics):
    """The role's /status and /metrics server on addr (None: no server); StartupError if
    the address cannot be used."""
    if addr is None:
        return None
    server = StatusServer(snapshot, metrics)
    try:
        await server.start(*addr)
    except OSError as exc:
        raise StartupError(f"cannot serve status on {_fmt(addr)}: {exc.strerror or exc}") from None
    return server


def _a(role):
    return ("an " if role[0] in "aeiou" else "a ") + role


class ControlStream:
    """Control messages on one QUIC stream: length-prefixed frames (mahole.wire.control)."""

    def __init__(self, connection, stream_id=CONTROL_STREAM):
        self.connection = connection
        self.stream_id = stream_id
        self.decoder = control.FrameDecoder()

    def send(self, message):
        self.connection.quic.send_stream_data(self.stream_id, control.encode(message))
        self.connection.transmit()

    def feed(self, data):
        """Messages completed by data; ValueError on a malformed stream."""
        return self.decoder.feed(data)


class ControlClient(ConnectionHandler):
    """The node's control connection: connect, authenticate the intermediate, register.

    The node hears every control message after registration through `control_message` and
    the changes between "connecting", "connected" and "disconnected" through
    `control_state_changed`.
    """

    def __init__(self, node):
        self.node = node
        self.state = "disconnected"
        self.observed_addr = None
        self.connection = None
        self.stream = None
        self.attempts = 0
        self.connects = 0
        self.last_error = None
        self._closed = asyncio.Event()
        self._registered = asyncio.Event()
        self._stop = asyncio.Event()

    @property
    def connected(self):
        return self.state == "connected"

    @property
    def rtt(self):
        if self.connection is None:
            return None
        return self.connection.quic.smoothed_rtt

    async def run(self):
        """Keep the control connection up until stop(); back off between failed attempts."""
        cfg = self.node.cfg
        delay = cfg.reconnect_min
        while not self._stop.is_set():
            self.attempts += 1
            ok = await self._connect_once()
            if self._stop.is_set():
                break
            if ok:
                delay = cfg.reconnect_min
                keepalive = asyncio.get_running_loop().create_task(self._keepalive())
                try:
                    await self._closed.wait()
                finally:
                    keepalive.cancel()
                if self._stop.is_set():
                    break
                log.warning("lost the intermediate at %s; reconnecting",
                            _fmt(self.node.intermediate_addr))
            log.warning("intermediate %s unreachable (%s); retrying in %.1f s",
                        _fmt(self.node.intermediate_addr), self.last_error, delay)
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass
            delay = min(delay * 2, cfg.reconnect_max) * random.uniform(0.8, 1.0)

    async def _keepalive(self):
        """QUIC PINGs (RFC 9000 §19.2) keep the connection and the NAT mapping alive; an
        intermediate that stops answering them is given up on (and reconnected to) after
        control_dead_after, long before QUIC's idle timeout."""
        cfg = self.node.cfg
        for nonce in itertools.count():
            await asyncio.sleep(cfg.keepalive_interval)
            conn = self.connection
            if conn is None or conn.closed:
                return
            silent = self.node.endpoint.now() - (conn.last_rx or 0.0)
            if silent > cfg.control_dead_after:
                self.last_error = f"no answer from the intermediate for {silent:.1f} s"
                conn.abandon(qc.ERROR_SHUTDOWN, "intermediate not answering")
                return
            conn.quic.send_ping(nonce)
            conn.transmit()

    async def _connect_once(self):
        node = self.node
        self._closed.clear()
        self._registered.clear()
        self.state = "connecting"
        config = qc.configuration(node.identity, node.cfg.ca, is_client=True,
                                  alpn=qc.ALPN_CONTROL,
                                  server_name=node.cfg.intermediate_name,
                                  idle_timeout=node.cfg.control_idle_timeout)
        quic = qc.NodeQuicConnection(configuration=config)
        quic.connect(node.intermediate_addr, now=node.endpoint.now())
        self.connection = node.endpoint.add_connection(quic, self,
                                                       peer_addr=node.intermediate_addr)
        self.stream = ControlStream(self.connection)
        try:
            await asyncio.wait_for(self._registered.wait(), timeout=node.cfg.connect_timeout)
        except asyncio.TimeoutError:
            self.last_error = self.last_error or "no answer"
            self.connection.close(reason="registration timed out")
            self._set_state("disconnected")
            return False
        if self.connection.closed:
            return False
        self.connects += 1
        self.last_error = None
        return True

    def _set_state(self, state):
        if state != self.state:
            self.state = state
            self.node.control_state_changed(state)

    def send(self, message):
        if self.stream is None or self.connection is None or self.connection.closed:
            raise ConnectionError("not connected to the intermediate")
        self.stream.send(message)

    # Connection handler ----------------------------------------------------------------
    def quic_event(self, connection, event):
        if connection is not self.connection:
            return
        if isinstance(event, qe.HandshakeCompleted):
            try:
                qc.verify_peer(connection.quic, self.node.ca, "intermediate")
            except identity.IdentityError as exc:
                self.last_error = f"intermediate refused: {exc}"
                log.error("%s", self.last_error)
                connection.close(qc.ERROR_UNAUTHENTICATED, str(exc)[:200])
                return
            self.stream.send(self.node.register_message())
        elif isinstance(event, qe.StreamDataReceived) and event.stream_id == self.stream.stream_id:
            try:
                messages = self.stream.feed(event.data)
            except ValueError as exc:
                log.error("bad control stream from the intermediate: %s", exc)
                connection.close(reason="bad control message")
                return
            for message in messages:
                self._message(message)
        elif isinstance(event, qe.ConnectionTerminated):
            if event.reason_phrase:
                self.last_error = f"closed by the intermediate: {event.reason_phrase}"
            elif self.last_error is None:
                self.last_error = "connection closed"

    def _message(self, message):
        if isinstance(message, control.Registered):
            self.observed_addr = tuple(message.observed_addr)
            self._set_state("connected")
            self._registered.set()
            log.info("registered with the intermediate as %s; observed address %s",
                     message.node_id, _fmt(self.observed_addr))
        elif isinstance(message, control.ObservedAddress):
            self.observed_addr = tuple(message.addr)
            log.info("observed address is now %s", _fmt(self.observed_addr))
        elif isinstance(message, control.Ping):
            self.send(control.Pong(nonce=message.nonce))
        elif isinstance(message, control.Error) and not self._registered.is_set():
            self.last_error = f"refused by the intermediate: {message.message}"
            log.error("%s", self.last_error)
            self.node.control_message(message)
        else:
            self.node.control_message(message)

    def connection_closed(self, connection):
        if connection is self.connection:
            self._set_state("disconnected")
            self._closed.set()

    def stop(self):
        self._stop.set()
        if self.connection is not None and not self.connection.closed:
            self.connection.close(qc.ERROR_SHUTDOWN, "node stopping")
        self._closed.set()


def _fmt(addr):
    if addr is None:
        return "?"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Node:
    """Base of agent and connector: socket, endpoint, control client, status server."""

    role = None

    def __init__(self, cfg):
        self.cfg = cfg
        self.identity, self.ca = load_credentials(cfg, self.role)
        self.intermediate_addr = cfg.intermediate
        self.endpoint = None
        self.control = None
        self.puncher = None
        self.status_server = None
        self.sessions = {}
        self.closed_sessions = collections.deque(maxlen=20)  # for status: what ended, why
        self._tasks = []

    @property
    def name(self):
        return self.identity.name

    async def start(self):
        self.intermediate_addr = await resolve(self.cfg.intermediate, self.cfg.bind[0])
        sock = bind_udp(*self.cfg.bind)
        self.endpoint = Endpoint(sock, on_stun=self._stun_received,
                                 on_initial=self._initial_received)
        self.endpoint.start()
        self.puncher = Puncher(self)
        self.control = ControlClient(self)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.control.run()))
        self._tasks.append(loop.create_task(self._watch_direct_routes()))
        self.status_server = await start_status(self.cfg.status, self.status, self.metrics)

    async def wait_registered(self, timeout):
        await asyncio.wait_for(self.control._registered.wait(), timeout)

    async def stop(self):
        for session in list(self.sessions.values()):
            session.close("node stopping")
        if self.control is not None:
            self.control.stop()
        if self.puncher is not None:
            self.puncher.close()
        if self.endpoint is not None:
            self.endpoint.flush()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.status_server is not None:
            await self.status_server.close()
        if self.endpoint is not None:
            self.endpoint.close()

    def register_message(self):
        raise NotImplementedError

    def control_state_changed(self, state):
        pass

    def control_message(self, message):
        pass

    def _stun_received(self, data, addr):
        if not self.puncher.stun_received(data, addr):
            self.endpoint.counters["dropped_stun"] += 1

    def _initial_received(self, header, data, addr):
        """A QUIC Initial straight from a peer: only for a session whose direct route it is."""
        for session in self.sessions.values():
            if session.connection is None and session.path.inbound(addr):
                session.first_packet(header, data, addr)
                return
        self.endpoint.counters["dropped_initial"] += 1

    async def _watch_direct_routes(self, interval=0.05):
        while True:
            await asyncio.sleep(interval)
            now = self.endpoint.now()
            for session in list(self.sessions.values()):
                session.check_direct(now)

    def direct_route_failed(self, session):
        """A session fell back to the relay (the agent punches again after a cool-down)."""

    def punch_failed(self, session):
        """Hole punching for a session ended on the relay."""

    def record_closed(self, session, reason):
        self.closed_sessions.append({
            "service": session.service, "session_id": session.session_id.hex(),
            "reason": reason, "closed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def close_relayed_sessions(self, reason):
        """The intermediate is gone: relayed sessions end, direct ones carry on."""
        for session in list(self.sessions.values()):
            if session.path.direct_addr is None:
                session.close(reason)

    def start_punching(self, session, delay_ms):
        if delay_ms:
            self.endpoint.loop.call_later(delay_ms / 1000, self._start_if_open, session)
        else:
            self._start_if_open(session)

    def _start_if_open(self, session):
        if not session.closed:
            self.puncher.start(session)
            self.endpoint.flush()

    def report(self, message):
        """Send a message to the intermediate if connected (results are best effort)."""
        if self.control is not None and self.control.connected:
            self.control.send(message)

    def status(self):
        control_client = self.control
        return {
            "role": self.role,
            "name": self.name,
            "pid": os.getpid(),
            "local_addr": _fmt(self.endpoint.local_address) if self.endpoint else None,
            "intermediate": {
                "addr": _fmt(self.intermediate_addr),
                "connected": bool(control_client and control_client.connected),
                "observed_addr": _fmt(control_client.observed_addr)
                if control_client and control_client.observed_addr else None,
                "rtt_ms": round(control_client.rtt * 1000, 3)
                if control_client and control_client.connected and control_client.rtt
                else None,
                "connects": control_client.connects if control_client else 0,
                "last_error": control_client.last_error if control_client else None,
            },
            "sessions": [s.stats() for s in self.sessions.values()],
            "closed_sessions": list(self.closed_sessions),
            "endpoint": dict(self.endpoint.counters) if self.endpoint else {},
            "router": self.endpoint.router.counters() if self.endpoint else {},
        }

    def metrics(self):
        status = self.status()
        metrics = metrics_from_counters(f"mahole_{self.role}", {
            **status["endpoint"], **status["router"]})
        return metrics
