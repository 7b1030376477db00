"""What agents and connectors share: the socket, the control connection, status.

A node keeps one QUIC control connection to the intermediate on its one UDP socket,
registers, learns its observed address (QAD), and reconnects with backoff when the
intermediate is unreachable or restarts.
"""

import asyncio
import collections
import ipaddress
import logging
import os
import random
import re
import socket
import sys
import time

from aioquic.quic import events as qe

from .. import connection as qc
from .. import identity, local_control
from ..debug_logs import DebugLogs
from ..endpoint import ConnectionHandler, Endpoint, plain_addr
from ..homing import RANK_TIMEOUT, HomeRanking
from ..ice.candidates import normalize_addr
from ..netmonitor import NetworkMonitor
from ..portmapping import PortMapping
from ..punching import Puncher
from ..send_budget import SendBudget
from ..status import StatusServer
from ..wire import control

log = logging.getLogger(__name__)

# A relayed session waits this long, from losing its intermediate, for a new home (or the
# same one restarted) to take it over (SessionResumed) before it ends: re-homing takes up
# to 3 s, the resumption a round trip more.
RESUME_HOLD = 5.0
# After the kernel said this node's network changed, sessions punch again once the
# intermediate has reported the new public address (the srflx candidate the peer needs):
# two control round trips after the PING that prods it, as it validates the new path before
# it believes it (RFC 9000 §9.3); at the latest after three round trips and this margin,
# with what is known then (a move behind the same public address).
MOVE_WAIT_MARGIN = 0.1
MOVE_WAIT_MAX = 1.0
# A direct route that does not answer its probes may have lost this node's NAT mapping (a
# rebinding: the kernel sees no change). The node asks the intermediate for its public
# address by STUN at most this often, as it does after a move.
DOUBT_CHECK_INTERVAL = 1.0
CONTROL_STREAM = 0  # the first client-initiated bidirectional stream (RFC 9000 §2.1)


class StartupError(Exception):
    """A problem that stops a role from starting, with a message for a person."""


class PermanentError(StartupError):
    """A problem that retrying cannot fix (wrong certificate, wrong name, a duplicate
    identity): the node stops with this message and exit code 2."""


# Registration refusals that no retry can change.
PERMANENT_REFUSALS = {control.ErrorCode.UNAUTHENTICATED, control.ErrorCode.DENIED,
                      control.ErrorCode.CONFLICT}


def explain_tls_failure(reason, cfg):
    """A person's sentence for a TLS failure of our own handshake with the intermediate."""
    match = re.match(r"hostname '([^']*)' doesn't match (.*)", reason)
    if match:
        # aioquic names the certificate's patterns by their repr: DNSPattern(pattern=b'relay1'),
        # IPAddressPattern(pattern=IPv4Address('127.0.0.1')); mahole's role URI is not a name.
        names = [name for name in re.findall(r"\(pattern=(?:b|IPv\dAddress\()'([^']+)'",
                                             match.group(2)) if not name.startswith("//")]
        if names:
            return (f"the intermediate's certificate names {', '.join(names)}, not "
                    f"{match.group(1)}: pass --intermediate-name {names[0]}")
        return (f"the intermediate's certificate does not name {match.group(1)}: "
                f"pass --intermediate-name NAME with the name it holds")
    if "expired" in reason.lower() or "no longer valid" in reason or "not valid yet" in reason:
        return f"the intermediate's certificate is not valid now ({reason})"
    return (f"the intermediate's certificate is not trusted by --ca "
            f"{identity.describe_source(cfg.ca)} ({reason}): "
            f"is this the right deployment's CA?")


def socket_reach(sock):
    """The address family a UDP socket can send to: AF_UNSPEC for a dual-stack one (an IPv6
    wildcard with IPV6_V6ONLY off reaches IPv4 peers as ::ffff:a.b.c.d)."""
    if sock.family != socket.AF_INET6:
        return socket.AF_INET
    wildcard = ipaddress.ip_address(sock.getsockname()[0]).is_unspecified
    try:
        v6only = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    except OSError:
        v6only = 1
    return socket.AF_UNSPEC if wildcard and not v6only else socket.AF_INET6


def bind_node_socket(host, port):
    """A node's one socket: dual-stack on ``::`` (the default) where this host has IPv6,
    plain IPv4 on ``0.0.0.0`` where it has not."""
    try:
        return bind_udp(host, port, dual_stack=True)
    except StartupError:
        if host != "::" or _ipv6_works():
            raise
        log.info("no IPv6 on this host: binding 0.0.0.0:%d (IPv4 only)", port)
        return bind_udp("0.0.0.0", port)


def _ipv6_works():
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
        return True
    except OSError:
        return False


def bind_udp(host, port, *, dual_stack=False, reuse_port=False):
    """A role's one UDP socket, non-blocking. With dual_stack an IPv6 wildcard or address is
    bound with IPV6_V6ONLY off, so ``[::]`` serves IPv4 clients too. With reuse_port it joins
    the SO_REUSEPORT group of (host, port): the intermediate's relay sockets."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if dual_stack and family == socket.AF_INET6:
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:
                pass  # a host without dual-stack sockets serves IPv6 only
        _forbid_fragmentation(sock, family)
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


# Linux's IP_PMTUDISC_PROBE / IPV6_PMTUDISC_PROBE (linux/in.h, linux/in6.h): set DF and
# never fragment, ignoring the kernel's own path MTU guess. mahole discovers packet sizes
# itself (mahole.pmtu); a kernel that fragmented its probes would make every size look like
# it works, and IP fragments are what NATs and firewalls drop first.
_PMTUDISC_PROBE = 3
_IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
_IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)


def _forbid_fragmentation(sock, family):
    """Send every datagram whole with the don't-fragment bit (RFC 8899 §3 wants probes that
    the network may not fragment); a datagram too large for the link fails to send."""
    if not sys.platform.startswith("linux"):
        return
    options = [(socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER)] if family == socket.AF_INET6 else []
    options.append((socket.IPPROTO_IP, _IP_MTU_DISCOVER))  # IPv4, also on dual-stack sockets
    for level, option in options:
        try:
            sock.setsockopt(level, option, _PMTUDISC_PROBE)
        except OSError:
            pass  # an IPv6-only socket has no IPv4 option


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


async def resolve_all(hostport, sock):
    """Every address of the intermediate's name the socket can reach (both families from a
    dual-stack socket), as (host, port), in the resolver's order."""
    host, port = hostport
    family = socket_reach(sock)
    if family == socket.AF_INET and ":" in host:
        raise StartupError(f"the intermediate {host!r} is an IPv6 address, but this node's "
                           f"socket is IPv4 only (--bind {_fmt(sock.getsockname())}): bind "
                           f"[::]:0 (the default) to reach both")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=family,
                                                             type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as exc:
        raise StartupError(f"cannot resolve the intermediate {host!r}: "
                           f"{getattr(exc, 'strerror', None) or exc}") from None
    return list(dict.fromkeys(tuple(info[4][:2]) for info in infos))


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


async def start_control(role, cfg):
    """The role's local control socket (mahole.local_control; None when configured off).
    A configured path that cannot be used stops the start (StartupError); the default one
    only costs `mahole status`, so the role warns and runs without it."""
    try:
        return await local_control.open_for(role.role, role.identity.name, role.status,
                                            role.control_commands(), cfg)
    except local_control.ControlError as exc:
        if getattr(cfg, "control_socket", None):
            raise StartupError(f"control socket: {exc}") from None
        log.warning("no control socket (mahole status and ping will not find this %s): %s",
                    role.role, exc)
        return None


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
    `control_state_changed`. Transient failures (no answer, connection lost) are retried
    with backoff; permanent ones (`PermanentError`: a certificate that does not match, a
    refused identity, a duplicate) stop the node through `node.fatal_error`.
    """

    def __init__(self, node):
        self.node = node
        self.state = "disconnected"
        self.observed_addr = None
        self.connection = None
        self.stream = None
        self.attempts = 0
        self.connects = 0
        self.resumable = False  # the intermediate speaks control protocol /2 (resumption)
        self.nat_aware = False  # ... /3: it takes NatSummary and tells the punching strategy
        self.last_error = None
        self.permanent_error = None
        self._attempt_error = None
        self._pings = 0
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
        """Keep the control connection up until stop(). With several intermediates, home on
        the nearest and, when it is lost, on the next at once (mahole.homing); back off only
        when none could be reached."""
        node = self.node
        cfg = node.cfg
        delay = cfg.reconnect_min
        lost_home = None
        while not self._stop.is_set():
            homes = await node.ranked_homes(lost_home)
            lost_home = None
            for home in homes:
                node.use_home(home)
                self.attempts += 1
                ok = await self._connect_once()
                if self.permanent_error is not None:
                    node.fatal_error(self.permanent_error)
                    return
                if self._stop.is_set():
                    return
                if not ok:
                    log.warning("intermediate %s unreachable (%s)",
                                _fmt(node.intermediate_addr), self.last_error)
                    continue
                delay = cfg.reconnect_min
                self._arm_keepalive()
                await self._closed.wait()
                self.last_error = self._attempt_error or "connection closed"
                if self.permanent_error is not None:
                    node.fatal_error(self.permanent_error)
                    return
                if self._stop.is_set():
                    return
                log.warning("lost the intermediate at %s (%s); %s",
                            _fmt(node.intermediate_addr), self.last_error,
                            "homing again" if len(node.homes) > 1 else "reconnecting")
                lost_home = home[0]
                break
            if lost_home is not None:
                if len(node.homes) > 1:
                    continue  # rank again now: a dead home answers no STUN and sorts last
            else:
                log.warning("no intermediate reachable; retrying in %.1f s", delay)
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass
            delay = min(delay * 2, cfg.reconnect_max) * random.uniform(0.8, 1.0)

    def _arm_keepalive(self):
        endpoint = self.node.endpoint
        endpoint.set_timer((self, "keepalive"), endpoint.now() + self.node.cfg.keepalive_interval,
                           self._keepalive)

    def prod(self):
        """One QUIC PING now (RFC 9000 §19.2): from a new network, the intermediate sees the
        new address and reports it (ObservedAddress) one round trip later."""
        conn = self.connection
        if conn is None or conn.closed or not self.connected:
            return False
        self._pings += 1
        conn.quic.send_ping(self._pings)
        conn.transmit()
        return True

    def _keepalive(self, now):
        """QUIC PINGs (RFC 9000 §19.2) keep the connection and the NAT mapping alive; an
        intermediate that stops answering them is given up on (and reconnected to) after
        control_dead_after, long before QUIC's idle timeout."""
        conn = self.connection
        if conn is None or conn.closed:
            return
        cfg = self.node.cfg
        silent = now - (conn.last_rx or 0.0)
        if silent > cfg.control_dead_after:
            self._note(f"no answer from the intermediate for {silent:.1f} s")
            conn.abandon(qc.ERROR_SHUTDOWN, "intermediate not answering")
            return
        self._pings += 1
        conn.quic.send_ping(self._pings)
        conn.transmit()
        self._arm_keepalive()

    async def _connect_once(self):
        node = self.node
        self._closed.clear()
        self._registered.clear()
        self._attempt_error = None
        self.state = "connecting"
        config = qc.configuration(node.identity, node.cfg.ca, is_client=True,
                                  alpn=qc.ALPN_CONTROLS,
                                  server_name=node.intermediate_name,
                                  idle_timeout=node.cfg.control_idle_timeout,
                                  **node.debug_logs.quic_kwargs())
        quic = qc.NodeQuicConnection(configuration=config)
        quic.connect(node.intermediate_addr, now=node.endpoint.now())
        self.connection = node.endpoint.add_connection(quic, self,
                                                       peer_addr=node.intermediate_addr)
        self.stream = ControlStream(self.connection)
        registered = asyncio.ensure_future(self._registered.wait())
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait((registered, closed), timeout=node.cfg.connect_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            registered.cancel()
            closed.cancel()
        if self._registered.is_set() and not self.connection.closed:
            self.connects += 1
            self.last_error = None
            return True
        if not self.connection.closed:
            self._note(f"no answer within {node.cfg.connect_timeout:g} s"
                       if self.connection.packets_received == 0 else
                       f"no registration within {node.cfg.connect_timeout:g} s")
            self.connection.abandon(qc.ERROR_SHUTDOWN, "registration timed out")
        self.last_error = self._attempt_error or "connection closed"
        self._set_state("disconnected")
        return False

    def _set_state(self, state):
        if state != self.state:
            self.state = state
            self.node.control_state_changed(state)

    def send(self, message):
        if self.stream is None or self.connection is None or self.connection.closed:
            raise ConnectionError("not connected to the intermediate")
        self.stream.send(message)

    def _note(self, error):
        """The first cause of this attempt's (or connection's) end is the one reported."""
        if self._attempt_error is None:
            self._attempt_error = error

    def _fail_permanently(self, message, code=qc.ERROR_UNAUTHENTICATED):
        self.permanent_error = self.last_error = self._attempt_error = message
        if self.connection is not None and not self.connection.closed:
            self.connection.close(code, message[:200])

    # Connection handler ----------------------------------------------------------------
    def quic_event(self, connection, event):
        if connection is not self.connection:
            return
        if isinstance(event, qe.HandshakeCompleted):
            try:
                qc.verify_peer(connection.quic, self.node.ca, "intermediate")
            except identity.IdentityError as exc:
                self._fail_permanently(f"the intermediate's certificate was refused: {exc}")
                return
            self.resumable = event.alpn_protocol in qc.CONTROLS_RESUMABLE
            self.nat_aware = event.alpn_protocol == qc.ALPN_CONTROL_NAT
            self.stream.send(self.node.register_message())
        elif isinstance(event, qe.StreamDataReceived) and event.stream_id == self.stream.stream_id:
            try:
                messages = self.stream.feed(event.data)
            except ValueError as exc:
                log.error("bad control stream from the intermediate: %s", exc)
                self._note(f"bad control stream from the intermediate: {exc}")
                connection.close(qc.ERROR_PROTOCOL_ERROR, f"bad control message: {exc}"[:200])
                return
            for message in messages:
                self._message(message)
        elif isinstance(event, qe.ConnectionTerminated):
            self._terminated(connection.quic, event)

    def _terminated(self, quic, event):
        """Say who closed the connection and why; decide whether retrying can help."""
        if self.permanent_error is not None:
            return
        if quic.local_close is not None:
            code, frame_type, reason = quic.local_close
            if qc.is_tls_failure(code, frame_type):  # our TLS refused the intermediate
                self._fail_permanently(explain_tls_failure(reason, self.node.cfg))
            else:
                self._note(f"closed here: {reason or 'no reason'}")
            return
        reason = event.reason_phrase or "no reason given"
        if qc.is_tls_failure(event.error_code, event.frame_type) or (
                event.error_code == qc.ERROR_UNAUTHENTICATED and event.frame_type is None):
            self._fail_permanently(f"the intermediate refused this node's certificate "
                                   f"({self.node.cfg.cert}): {reason}")
        elif event.error_code in qc.PERMANENT_ERRORS and event.frame_type is None:
            self._fail_permanently(f"refused by the intermediate: {reason}")
        else:
            self._note(f"closed by the intermediate: {reason}")

    def _message(self, message):
        if isinstance(message, control.Registered):
            self.observed_addr = tuple(message.observed_addr)
            self._set_state("connected")
            self._registered.set()
            log.info("registered with the intermediate as %s; observed address %s",
                     message.node_id, _fmt(self.observed_addr))
            self.node.puncher.probe_mapping()
        elif isinstance(message, control.ObservedAddress):
            before, self.observed_addr = self.observed_addr, tuple(message.addr)
            log.info("observed address is now %s", _fmt(self.observed_addr))
            self.node.puncher.probe_mapping()
            if before is not None and normalize_addr(before) != normalize_addr(
                    self.observed_addr):  # not already learnt by STUN (mapping_observed)
                self.node.network_changed(f"this node's public address moved from "
                                          f"{_fmt(before)} to {_fmt(self.observed_addr)}")
        elif isinstance(message, control.Ping):
            self.send(control.Pong(nonce=message.nonce))
        elif isinstance(message, control.Error) and not self._registered.is_set():
            text = f"refused by the intermediate: {message.message}"
            if message.code in PERMANENT_REFUSALS:
                self._fail_permanently(text, qc.ERROR_SHUTDOWN)
            else:
                self._note(text)
                log.error("%s", text)
        else:
            self.node.control_message(message)

    def connection_closed(self, connection):
        if connection is self.connection:
            self.node.endpoint.cancel_timer((self, "keepalive"))
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


# A direct route lost under an adapted keepalive measures the binding lifetime again, at most
# this often (s).
REMEASURE_AFTER = 300.0


class Node:
    """Base of agent and connector: socket, endpoint, control client, status server."""

    role = None

    def __init__(self, cfg):
        self.cfg = cfg
        self.identity, self.ca = load_credentials(cfg, self.role)
        self.debug_logs = DebugLogs.from_config(cfg)  # --keylog, --qlog-dir
        self.intermediate_addr = cfg.intermediate  # the home: where the node is registered
        self.intermediate_name = cfg.intermediate_name  # its name in its certificate
        self.homes = []  # [(addr, tls name)] of every intermediate known (mahole.homing)
        self.home_rtts = {}  # addr -> s, from the last ranking
        self._ranking = None  # a HomeRanking waiting for answers
        self._ranked = asyncio.Event()
        self.endpoint = None
        self.control = None
        self.puncher = None
        self.port_mapping = None  # mahole.portmapping: a public port from the router
        self.status_server = None
        self.control_server = None  # the local control socket (mahole status, mahole ping)
        self.sessions = {}
        self.closed_sessions = collections.deque(maxlen=20)  # for status: what ended, why
        self.failed = None  # Future: set to a PermanentError's message when the node must stop
        self.netmonitor = None  # mahole.netmonitor: the kernel's word on this host's network
        # Changes of this node's network acted on, by who noticed: the kernel (rtnetlink) or
        # the intermediate (a new observed address); the last few, for status.
        self.network_changes = {"netlink": 0, "observed_address": 0}
        self.network_log = collections.deque(maxlen=8)
        self._move_pending = False  # left direct routes on the kernel's word; punch when known
        self._doubt_checked = None  # when direct_in_doubt last asked for the public address
        self._tasks = []
        # Idle direct routes' keepalive: cfg.direct_keepalive until the binding lifetime of
        # this network is measured (mahole.binding_lifetime), then a third of it.
        self.direct_keepalive = cfg.direct_keepalive
        self.binding_lifetime = None  # binding_lifetime.LifetimeResult, as it grows
        self._lifetime_task = None
        self._lifetime_started = None  # endpoint time of the last measurement's start
        # Bytes read from local TCP sockets and not yet acknowledged, every stream of every
        # session together (mahole.send_budget; StreamPipe is its shell).
        self.send_budget = SendBudget(cfg.send_budget)

    @property
    def name(self):
        return self.identity.name

    async def start(self):
        """Every local check (name, socket, status port, the role's own listeners) passes
        before the node registers: a copy that cannot start never disturbs a running one."""
        loop = asyncio.get_running_loop()
        self.failed = loop.create_future()
        sock = bind_node_socket(*self.cfg.bind)
        try:
            self.homes = await self._resolve_homes(sock)
        except BaseException:
            sock.close()
            raise
        self.intermediate_addr, self.intermediate_name = self.homes[0]
        self.endpoint = Endpoint(sock, on_stun=self._stun_received,
                                 on_initial=self._initial_received)
        self.endpoint.start()
        self.puncher = Puncher(self)
        self.control = ControlClient(self)
        self.netmonitor = NetworkMonitor(self.local_network_changed)
        if not self.netmonitor.start():
            log.info("no network monitor (%s): a move to another network is noticed when "
                     "the intermediate reports a new address", self.netmonitor.state)
        try:
            self.status_server = await start_status(self.cfg.status, self.status, self.metrics)
            await self.prepare()
            self.control_server = await start_control(self, self.cfg)
        except BaseException:
            await self.stop()
            raise
        # Asked alongside registration: the answer comes within a LAN round trip, long
        # before a session gathers its candidates.
        self.port_mapping = PortMapping(self)
        self.port_mapping.start()
        self._tasks.append(loop.create_task(self.control.run()))
        self._measure_lifetime()

    # Adaptive keepalive ----------------------------------------------------------------
    def _measure_lifetime(self):
        """Measure the binding lifetime in the background (again after a network change):
        not with --fixed-keepalive or --relay-only, nor against an intermediate on loopback
        (one machine: no NAT between, and tests stay quiet)."""
        if self._lifetime_task is not None:
            self._lifetime_task.cancel()
            self._lifetime_task = None
        cfg = self.cfg
        if not cfg.adaptive_keepalive or cfg.relay_only:
            return
        try:
            if ipaddress.ip_address(self.intermediate_addr[0].split("%", 1)[0]).is_loopback:
                return
        except ValueError:
            return
        self._lifetime_started = self.endpoint.now()
        self._lifetime_task = asyncio.get_running_loop().create_task(self._lifetime())
        self._tasks.append(self._lifetime_task)

    async def _lifetime(self):
        from .. import binding_lifetime
        from ..netcheck_cli import lifetime_text, measure_lifetime
        await self.control._registered.wait()  # the home answering: no probes into a void
        target = self.intermediate_addr
        log.info("measuring the binding lifetime against %s", _fmt(target))
        try:
            result = await measure_lifetime(plain_addr(target), binding_lifetime.NODE_DELAYS,
                                            on_update=self._lifetime_measured)
        except OSError as exc:
            log.info("binding lifetime not measured: %s", exc)
            return
        self._lifetime_measured(result)
        log.info("binding lifetime %s: idle direct routes PINGed every %.1f s",
                 lifetime_text(result.as_dict()), self.direct_keepalive)

    def _lifetime_measured(self, result):
        from .. import binding_lifetime
        self.binding_lifetime = result
        cfg = self.cfg
        keepalive = binding_lifetime.keepalive_for(
            result.at_least, cfg.direct_keepalive,
            ceiling=min(binding_lifetime.KEEPALIVE_MAX, cfg.e2e_idle_timeout / 2))
        if keepalive != self.direct_keepalive:
            self.direct_keepalive = keepalive
            for session in list(self.sessions.values()):
                session.set_direct_keepalive(keepalive)

    def direct_route_failed(self, keepalive):
        """A session's direct route died while PINGed every ``keepalive`` s. If that was an
        adapted keepalive, the NAT may expire mappings sooner than it did when measured (some
        shorten their timeouts under load): back to the configured keepalive at once, and
        measure again (at most every REMEASURE_AFTER s; a path that is simply cut costs
        that)."""
        cfg = self.cfg
        if keepalive <= cfg.direct_keepalive or self.binding_lifetime is None:
            return
        log.info("a direct route died with a keepalive of %.1f s: back to %.1f s",
                 keepalive, cfg.direct_keepalive)
        self.binding_lifetime = None
        self.direct_keepalive = cfg.direct_keepalive
        for session in list(self.sessions.values()):
            session.set_direct_keepalive(self.direct_keepalive)
        if self._lifetime_task is not None:
            self._lifetime_task.cancel()  # its verdict is in doubt too
            self._lifetime_task = None
        started = self._lifetime_started
        if started is None or self.endpoint.now() - started >= REMEASURE_AFTER:
            self._measure_lifetime()

    def keepalive_status(self):
        result = self.binding_lifetime
        return {"direct_s": round(self.direct_keepalive, 3),
                "control_s": self.cfg.keepalive_interval,
                "measuring": bool(self._lifetime_task and not self._lifetime_task.done()),
                "binding_lifetime": result.as_dict() if result else None}

    async def prepare(self):
        """The role's own start-up (listeners); StartupError if it cannot run."""

    def control_commands(self):
        """Commands of the local control socket beyond "status" (name -> async handler)."""
        return {}

    def fatal_error(self, message):
        """A permanent error: the node cannot work as configured (see PermanentError)."""
        log.error("%s", message)
        if self.failed is not None and not self.failed.done():
            self.failed.set_result(message)

    async def wait_registered(self, timeout):
        """Until registered; PermanentError if the node was refused for good."""
        registered = asyncio.ensure_future(self.control._registered.wait())
        try:
            await asyncio.wait_for(asyncio.wait((registered, self.failed),
                                                return_when=asyncio.FIRST_COMPLETED), timeout)
        finally:
            registered.cancel()
        if self.failed.done():
            raise PermanentError(self.failed.result())

    async def stop(self):
        for session in list(self.sessions.values()):
            session.close("node stopping")
        if self.control is not None:
            self.control.stop()
        if self.netmonitor is not None:
            self.netmonitor.close()
        if self.endpoint is not None:
            self.endpoint.cancel_timer((self, "move"))
        if self.puncher is not None:
            self.puncher.close()
        if self.port_mapping is not None:
            await self.port_mapping.stop()  # lifetime 0: the router deletes it
        if self.endpoint is not None:
            self.endpoint.flush()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.status_server is not None:
            await self.status_server.close()
        if self.control_server is not None:
            await self.control_server.close()
        if self.endpoint is not None:
            self.endpoint.close()
        self.debug_logs.close()

    def register_message(self):
        raise NotImplementedError

    def control_state_changed(self, state):
        pass

    def control_message(self, message):
        pass

    async def _resolve_homes(self, sock):
        """Every address of every intermediate configured that ``sock`` can reach, with the
        TLS name to expect."""
        cfg = self.cfg
        homes = {}
        for hostport, name in ((cfg.intermediate, cfg.intermediate_name),
                               *((f, f[0]) for f in cfg.fallbacks)):
            for addr in await resolve_all(hostport, sock):
                homes.setdefault(addr, name)
        return list(homes.items())

    async def ranked_homes(self, lost=None):
        """The intermediates, nearest first (STUN round trips; one alone is not asked). The
        home just ``lost`` goes last without waiting for it."""
        last = [home for home in self.homes if home[0] == lost]
        others = [home for home in self.homes if home[0] != lost]
        if len(others) < 2:
            return others + last
        ranking = self._ranking = HomeRanking(others)
        self._ranked.clear()
        self.endpoint.send(ranking.probes(self.endpoint.now()))
        try:
            await asyncio.wait_for(self._ranked.wait(), RANK_TIMEOUT)
        except asyncio.TimeoutError:
            pass
        self._ranking = None
        self.home_rtts = dict(ranking.rtts)
        return ranking.order() + last

    def mapped_addr(self):
        """The public address the router maps to this node's socket, or None."""
        return self.port_mapping.external_addr if self.port_mapping is not None else None

    def use_home(self, home):
        self.intermediate_addr, self.intermediate_name = home

    def _stun_received(self, data, addr):
        port_mapping = self.port_mapping
        if port_mapping is not None and port_mapping.datagram(data, addr):
            return  # PCP / NAT-PMP from the gateway's port 5351 (first byte 2 / 0)
        ranking = self._ranking
        if ranking is not None and ranking.response(data, addr, self.endpoint.now()):
            if ranking.done:
                self._ranked.set()
            return
        if not self.puncher.stun_received(data, addr):
            self.endpoint.counters["dropped_stun"] += 1

    def _initial_received(self, header, data, addr):
        """A QUIC Initial straight from a peer: only for a session whose direct route it is."""
        for session in self.sessions.values():
            if session.connection is None and session.core.inbound(addr):
                session.first_packet(header, data, addr)
                return
        self.endpoint.counters["dropped_initial"] += 1

    def record_closed(self, session, reason):
        self.closed_sessions.append({
            "service": session.service, "session": session.tag,
            "reason": reason, "closed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def relay_state_changed(self, state, reason="intermediate connection lost"):
        """The control connection is `state`: without it there is no relay, so relayed
        sessions end and direct ones carry on (each session's core decides). An
        intermediate that speaks control protocol /2 can resume sessions: relayed ones are
        held for RESUME_HOLD instead, and once registered again (at a new home, or the same
        one restarted) the node asks it to carry on each (ResumeSession); a session's relay
        is back only when it answers SessionResumed."""
        control_client = self.control
        resumable = control_client is not None and control_client.resumable
        if state == "disconnected":
            for session in list(self.sessions.values()):
                session.relay_state_changed(False, reason,
                                            hold=RESUME_HOLD if resumable else 0.0)
        elif state == "connected":
            for session in list(self.sessions.values()):
                message = session.resume_message() if resumable else None
                if message is None:
                    session.relay_state_changed(True, reason)
                else:
                    control_client.send(message)

    def network_changed(self, reason):
        """This node's public address moved (a new uplink, a NAT that rebound): direct
        routes went with the old one. Sessions go back to the relay at once and the agent
        punches again now (the candidates are gathered anew, with the new address). After
        the kernel's word on a move (local_network_changed) this is the address awaited."""
        self._note_change("observed_address", reason)
        # Another public address, maybe another NAT: back to the configured keepalive, and
        # measure anew.
        if self.binding_lifetime is not None or self._lifetime_task is not None:
            self.binding_lifetime = None
            self.direct_keepalive = self.cfg.direct_keepalive
            for session in list(self.sessions.values()):
                session.set_direct_keepalive(self.direct_keepalive)
            self._measure_lifetime()
        if self._move_pending:
            self._punch_after_move(reason, observed=True)
            return
        if self.port_mapping is not None:
            self.port_mapping.network_changed()
        for session in list(self.sessions.values()):
            session.network_changed(reason)

    def nat_changed(self):
        """This node learnt (more of) its NAT: tell an intermediate of control protocol /3."""
        control_client = self.control
        if (control_client is not None and control_client.connected
                and control_client.nat_aware and self.puncher is not None):
            control_client.send(self.puncher.nat_summary())

    def local_network_changed(self, change):
        """The kernel says this host's network changed (mahole.netmonitor): an address went
        or a default route moved, before any peer could notice. Direct routes from a gone
        address (all of them when the default route moved) go back to the relay at once,
        the control connection is prodded so that the intermediate sees the new address,
        and the agent punches again as soon as that address is known. An address added
        alone breaks nothing: a relayed session may try it (candidates_grew)."""
        reason = f"this node's network changed ({change.reason})"
        self._note_change("netlink", reason)
        if not (change.gone or change.routes):
            self.candidates_grew()
            return
        if self.port_mapping is not None:
            self.port_mapping.network_changed()
        prodded = self.control is not None and self.control.prod()
        if prodded:
            self.puncher.probe_mapping()  # the new public address, one round trip away
        for session in list(self.sessions.values()):
            ip = session.direct_local_ip()
            if change.routes or ip is None or ip in change.gone \
                    or ipaddress.ip_address(ip).is_unspecified:
                session.network_changed(reason, repunch=False)
        rtt = (self.control.rtt if prodded else None) or 0.0
        self._move_pending = True
        self.endpoint.set_timer((self, "move"), self.endpoint.now() + min(
            3 * rtt + MOVE_WAIT_MARGIN, MOVE_WAIT_MAX),
            lambda _now: self._punch_after_move("no new public address reported"))

    def direct_in_doubt(self):
        """A direct route missed a probe's answer. If this node's NAT rebound, the peer's
        answers go to the old mapping and the kernel says nothing: a STUN request to the
        intermediate tells within one round trip (mapping_observed), before the failover
        timeout, where its ObservedAddress waits for the next keepalive and a validation."""
        now = self.endpoint.now()
        if self._doubt_checked is not None and now - self._doubt_checked < DOUBT_CHECK_INTERVAL:
            return
        probe = self.puncher.probe
        if self.control is None or not self.control.connected or (
                probe is not None and not probe.done):
            return
        self._doubt_checked = now
        self.control.prod()
        self.puncher.probe_mapping()

    def mapping_observed(self, addr):
        """A STUN answer from the intermediate's own address (Puncher.probe_mapping): this
        socket's public address, the one its control connection is observed at. After a
        move or a NAT rebinding it comes one round trip after asking, where the
        intermediate's ObservedAddress waits for the new path to be validated: punch with
        it now."""
        control_client = self.control
        before = control_client.observed_addr
        if before is None or normalize_addr(before) == addr:
            return
        control_client.observed_addr = addr
        log.info("observed address is now %s (STUN)", _fmt(addr))
        self.network_changed(f"this node's public address moved from {_fmt(before)} to "
                             f"{_fmt(addr)}")

    def _punch_after_move(self, why, observed=False):
        self._move_pending = False
        self.endpoint.cancel_timer((self, "move"))
        log.info("punching again after this node's network changed (%s)", why)
        for session in list(self.sessions.values()):
            if session.core.direct_addr is None:
                session.repunch_now()
            elif observed:
                session.network_changed(why)  # still direct, but its public address moved
        self.endpoint.flush()

    def _note_change(self, by, reason):
        self.network_changes[by] += 1
        self.network_log.append({"by": by, "reason": reason, "at": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def candidates_grew(self):
        """The router mapped a port (or a new one): sessions that could not go direct try
        again with it."""
        self.nat_changed()
        for session in list(self.sessions.values()):
            session.candidates_grew()

    def session_message(self, message):
        """SessionResumed, SessionHeld or a session's Error from the intermediate; True if
        it was one of those."""
        session = self.sessions.get(getattr(message, "session_id", None))
        if isinstance(message, control.SessionResumed):
            if session is not None:
                session.relay_moved(self.intermediate_addr)
        elif isinstance(message, control.SessionHeld):
            if session is not None:
                session.hold(message.hold_ms / 1000)
        elif (isinstance(message, control.Error) and message.session_id is not None
              and message.request_id is None):
            log.warning("intermediate: %s", message.message)
            if session is not None:
                session.relay_state_changed(False, message.message)
        else:
            return False
        return True

    def relay_last_heard(self):
        """When the intermediate was last heard on the control connection (endpoint clock)."""
        control_client = self.control
        connection = control_client.connection if control_client is not None else None
        return connection.last_rx if connection is not None else None

    def start_punching(self, session, message):
        """StartPunching for ``session``: remember the strategy (None from an intermediate
        of control protocol /1 or /2) and start after the delay."""
        session.strategy, session.hard_side = message.strategy, message.hard_side
        if message.delay_ms:
            self.endpoint.set_timer((session, "start punching"),
                                    self.endpoint.now() + message.delay_ms / 1000,
                                    lambda _now: self._start_if_open(session))
        else:
            self._start_if_open(session)

    def _start_if_open(self, session):
        if not session.closed:
            self.puncher.start(session, session.strategy)
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
                "known": [{"addr": _fmt(addr), "rtt_ms": round(self.home_rtts[addr] * 1000, 3)
                           if addr in self.home_rtts else None} for addr, _ in self.homes],
                "connected": bool(control_client and control_client.connected),
                "observed_addr": _fmt(control_client.observed_addr)
                if control_client and control_client.observed_addr else None,
                "rtt_ms": round(control_client.rtt * 1000, 3)
                if control_client and control_client.connected and control_client.rtt
                else None,
                "connects": control_client.connects if control_client else 0,
                "last_error": control_client.last_error if control_client else None,
            },
            "port_mapping": self.port_mapping.status() if self.port_mapping else None,
            "network": {**(self.netmonitor.status() if self.netmonitor else {}),
                        "network_changes": dict(self.network_changes),
                        "recent_changes": list(self.network_log)},
            "sessions": [s.stats() for s in self.sessions.values()],
            "duplicate_signaling": self.puncher.duplicate_signaling if self.puncher else 0,
            "port_prediction": self.puncher.prediction_status() if self.puncher else None,
            "nat": self.puncher.nat_summary()._to_json_object()
            if self.puncher and self.endpoint else None,
            "keepalive": self.keepalive_status(),
            "send_budget": self.send_budget.status(),
            "birthday": dict(self.puncher.birthday_counters) if self.puncher else None,
            "closed_sessions": list(self.closed_sessions),
            "control_socket": self.control_server.path if self.control_server else None,
            "endpoint": dict(self.endpoint.counters) if self.endpoint else {},
            "router": self.endpoint.router.counters() if self.endpoint else {},
        }

    def metrics(self):
        """This node's prometheus_client registry (sessions, routes, endpoint counters)."""
        from ..metrics import node_registry
        return node_registry(self)
