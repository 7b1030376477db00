"""The intermediate: authenticates nodes, tells them their observed address, signals, relays.

One UDP socket carries control QUIC connections from agents and connectors, STUN Binding
requests (answered with XOR-MAPPED-ADDRESS, RFC 8489 §14.2) and relay frames. The relay
engine reads the socket: it forwards relay frames of known sessions between their two members
entirely in compiled code and hands everything else to the endpoint. With --relay-threads N
the address has N sockets (SO_REUSEPORT), the other N - 1 read by the engine's relay threads,
which hand what is not a relay frame to the endpoint too (docs/architecture.md, "Relay
threads").

Registry, ACL, sessions and signaling are the sans-IO `mahole.signaling.SignalingCore`; this
module is its shell: it accepts QUIC connections, checks certificates, decodes the control
stream, feeds the core with what happened (authenticated packets only) and carries out its
events on the connections and the relay engine, with one endpoint timer for the core's.

The edge, where every byte is an attacker's:

- A node's observed address (its relay address, and what `ObservedAddress` tells it) moves only
  to an address that sent a packet aioquic decrypted *and* that aioquic validated with
  PATH_CHALLENGE / PATH_RESPONSE (RFC 9000 §8.2, §9): neither a forged packet carrying a
  connection ID nor a copied authentic packet sent from elsewhere moves it.
- Handshakes are bounded: at most ``max_half_open`` connections that have not registered yet
  (``max_half_open_per_source`` of them from one host); above ``retry_threshold`` of them, or
  past a host's share, a new client must first prove its address with a Retry (RFC 9000
  §8.1.2); one that has not registered ``handshake_timeout`` after its first Initial is
  dropped.
- An Initial of another QUIC version gets Version Negotiation (RFC 9000 §6), and a STUN Binding
  request its response, each rate-limited per source host in a bounded table.
- IPv4 clients of a dual-stack (``[::]``) listener are reported as IPv4, and sessions are
  named by `session_tag` (a hash) in status and logs: the id itself keys relay frames.
"""

import collections
import ipaddress
import itertools
import logging
import os
import statistics

from aioquic.quic import events as qe
from aioquic.quic.packet import encode_quic_retry, encode_quic_version_negotiation
from aioquic.quic.retry import QuicRetryTokenHandler

from .. import connection as qc
from .. import identity
from .._fast import RELAY_COMPILED, RelayEngine
from ..debug_logs import DebugLogs
from ..endpoint import ConnectionHandler, Endpoint, plain_addr
from ..config import relay_threads_count
from ..fleet import FleetRegistry
from ..fleet_redis import FleetError, RedisFleet
from ..signaling import (
    AclRule,
    CloseNode,
    FleetSend,
    RelayAdd,
    RelayRemove,
    RelaySetMember,
    RelaySetRate,
    SendMessage,
    SignalingCore,
    session_tag,
)
from ..stun_server import StunResponder, open_alt_observers
from ..wire import control
from .node import (
    ControlStream, StartupError, bind_udp, load_credentials, start_control, start_status)

log = logging.getLogger(__name__)

__all__ = ["AclRule", "Intermediate", "SourceLimiter", "plain_addr"]

SUPPORTED_VERSIONS = (0x00000001,)  # QUIC v1 (RFC 9000)
TIMER_KEY = "signaling"  # the core's one timer on the endpoint
# RFC 9000 §14.1: a datagram carrying a client's Initial is at least 1200 bytes; §6.1 / §5.2.2:
# only such datagrams get Version Negotiation (so a VN answer never amplifies).
MIN_INITIAL_DATAGRAM = 1200
RETRY_CID_LEN = 8  # the connection ID a Retry hands out (the router's DCID length)


def _fmt(addr):
    if addr is None:
        return "?"
    host, port = plain_addr(addr)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class SourceLimiter:
    """Token buckets per source (sans-IO): ``allow(key, now)`` says whether a source may have
    one more answer. Each source gets ``rate`` answers a second with bursts of ``burst``; all
    sources together get ``total_rate`` (bursts of twice that), so spoofing many sources buys
    no more. The table keeps the ``max_sources`` most recently seen sources: a source pushed
    out starts again with a full bucket, which the total rate still bounds."""

    def __init__(self, rate, burst=None, *, max_sources=4096, total_rate=None):
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1.0, 2 * self.rate))
        self.max_sources = max(1, int(max_sources))
        self.total_rate = float(total_rate) if total_rate else None
        self._total = (self.total_rate * 2 if self.total_rate else 0.0, None)
        self._buckets = collections.OrderedDict()  # key -> [tokens, refilled_at]

    def __len__(self):
        return len(self._buckets)

    def allow(self, key, now):
        if self.rate <= 0:
            return False
        if self.total_rate:
            tokens, at = self._total
            cap = self.total_rate * 2
            tokens = cap if at is None else min(cap, tokens + (now - at) * self.total_rate)
            if tokens < 1:
                self._total = (tokens, now)
                return False
            self._total = (tokens, now)
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.max_sources:
                buckets.popitem(last=False)
            bucket = buckets[key] = [self.burst, now]
        else:
            buckets.move_to_end(key)
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] < 1:
            return False
        bucket[0] -= 1
        if self.total_rate:
            self._total = (self._total[0] - 1, now)
        return True


class ControlConnection(ConnectionHandler):
    """A node's control connection at the intermediate: certificate, control stream, and
    what the core hears of it under ``handle``.

    ``addr`` is the address the core knows (raw, as the socket reports it): the one the
    handshake came from, or the last one aioquic validated. Authenticated packets from any
    other address keep the node alive but do not move it until aioquic has validated that
    path (RFC 9000 §8.2, §9)."""

    def __init__(self, intermediate, handle, addr, now):
        self.intermediate = intermediate
        self.handle = handle
        self.connection = None
        self.stream = None
        self.peer = None  # identity.Peer once the certificate checked out
        self.addr = addr
        self.first_addr = addr  # where its first Initial came from (half-open accounting)
        self.created = now
        self.registered = False
        self._unvalidated = None  # the last address an unvalidated move was seen from

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
            self.addr = connection.peer_addr
            intermediate.signaling.node_connected(
                self.handle, self.peer.role, self.peer.name, plain_addr(self.addr),
                intermediate.endpoint.now(),
                resumable=event.alpn_protocol in qc.CONTROLS_RESUMABLE,
                nat_aware=event.alpn_protocol == qc.ALPN_CONTROL_NAT)
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
        if self.peer is None:
            return
        intermediate = self.intermediate
        if addr != self.addr:
            if connection.quic.path_validated(addr):
                # RFC 9000 §9.3: the peer proved it receives at addr; it is the node's now.
                self.addr = addr
                self._unvalidated = None
                intermediate.shell_counters["address_changes"] += 1
            else:
                # Decrypted, but nobody has answered a PATH_CHALLENGE there yet: a NAT
                # rebinding about to be validated, or a copy of a packet sent from elsewhere.
                # Liveness only; the core keeps the validated address.
                if addr != self._unvalidated:
                    self._unvalidated = addr
                    intermediate.shell_counters["address_changes_unvalidated"] += 1
                    log.debug("%s: authenticated packet from %s, not validated yet",
                              self.peer.name, _fmt(addr))
                addr = self.addr
        intermediate.signaling.packet_authenticated(self.handle, plain_addr(addr), now,
                                                    rtt=connection.quic.smoothed_rtt)
        intermediate.pump()

    def connection_closed(self, connection):
        intermediate = self.intermediate
        intermediate.connections.pop(self.handle, None)
        intermediate.handshake_over(self)
        if self.peer is not None:
            intermediate.signaling.node_disconnected(self.handle, intermediate.endpoint.now())
            intermediate.pump()


class Intermediate:
    role = "intermediate"

    def __init__(self, cfg):
        self.cfg = cfg
        self.identity, self.ca = load_credentials(cfg, "intermediate")
        self.debug_logs = DebugLogs.from_config(cfg)  # --keylog, --qlog-dir
        # A fleet shares a directory of nodes through Redis (mahole.fleet); alone, the
        # registry is this process's memory.
        self.fleet = None
        registry = FleetRegistry(self.identity.name) if cfg.registry else None
        self.signaling = SignalingCore.from_config(cfg, home=self.identity.name,
                                                   registry=registry)
        self.connections = {}  # handle -> ControlConnection
        self.half_open = {}  # handle -> ControlConnection not registered yet
        self._half_open_by_host = {}  # source host -> how many of those it opened
        self._handles = itertools.count(1)
        self.endpoint = None
        self.engine = None
        self.status_server = None
        self.control_server = None  # the local control socket (mahole status)
        self.shell_counters = {
            "connections_accepted": 0, "refused_unauthenticated": 0, "stun_requests": 0,
            "stun_malformed": 0, "stun_unknown_attributes": 0, "stun_classic": 0,
            "stun_rate_limited": 0, "bad_control_messages": 0, "initials_dropped": 0,
            "retries_sent": 0, "retry_tokens_invalid": 0, "half_open_full": 0,
            "half_open_source_full": 0,
            "handshakes_timed_out": 0, "version_negotiations_sent": 0,
            "version_negotiation_rate_limited": 0, "address_changes": 0,
            "address_changes_unvalidated": 0,
        }
        self._server_config = qc.configuration(
            self.identity, cfg.ca, is_client=False, alpn=qc.ALPN_CONTROLS,
            idle_timeout=cfg.idle_timeout, **self.debug_logs.quic_kwargs())
        self._retry = QuicRetryTokenHandler()
        self._stun_limiter = SourceLimiter(cfg.stun_rate, max_sources=cfg.rate_limit_sources,
                                           total_rate=cfg.stun_total_rate)
        self.stun_observers = {}  # (ip, port) index -> AltObserver (--stun-alt-port)
        self._stun_responder = None
        self._vn_limiter = SourceLimiter(cfg.vn_rate, max_sources=cfg.rate_limit_sources,
                                         total_rate=cfg.vn_total_rate)
        self._timer_at = None

    async def start(self):
        threads = relay_threads_count(self.cfg.relay_threads)
        if self.cfg.relay_threads == "auto" and not RELAY_COMPILED:
            threads = 1  # the pure-Python engine serves them all from the event loop
        # [::] serves IPv4 too. More relay threads: more sockets on the same address, and
        # the kernel spreads flows over them by 4-tuple hash (SO_REUSEPORT).
        host, port = self.cfg.listen
        if threads > 1:
            # A socket of a SO_REUSEPORT group would join another running intermediate's
            # group (same user) and take half its traffic: an exclusive bind first fails on
            # a port in use, as a one-socket intermediate does, and picks port 0's port.
            probe = bind_udp(host, port, dual_stack=True)
            port = probe.getsockname()[1]
            probe.close()
        sock = bind_udp(host, port, dual_stack=True, reuse_port=threads > 1)
        workers = []
        try:
            for _ in range(threads - 1):
                workers.append(bind_udp(host, port, dual_stack=True, reuse_port=True))
            self.engine = RelayEngine(sock, rate_limit_bps=self.cfg.relay_rate_limit,
                                      burst_bytes=self.cfg.relay_burst,
                                      worker_sockets=workers)
        except BaseException:
            sock.close()
            raise
        finally:
            for worker in workers:
                worker.close()  # the engine reads duplicates of them until its close()
        self.endpoint = Endpoint(sock, on_stun=self._stun, on_initial=self._initial,
                                 receiver=self.engine)
        self.endpoint.start()
        try:
            self._open_stun_observers()
            self.status_server = await start_status(self.cfg.status, self.status, self.metrics)
            self.control_server = await start_control(self, self.cfg)
            if self.cfg.registry:
                fleet = RedisFleet(self.cfg.registry, self.identity.name,
                                   self._fleet_address(), self.signaling.registry,
                                   on_message=self._fleet_message,
                                   on_silent=self._fleet_home_silent,
                                   on_duplicates=self._fleet_duplicates)
                try:
                    await fleet.start()
                except FleetError as exc:
                    raise StartupError(str(exc)) from None
                self.fleet = fleet
        except BaseException:
            await self.stop()
            raise
        log.info("intermediate %s listening on %s", self.identity.name,
                 _fmt(self.endpoint.local_address))

    def _open_stun_observers(self):
        """The main socket answers STUN; --stun-alt-port (and --stun-alt-ip) add observers
        for RFC 5780 NAT behaviour discovery (mahole.stun_server)."""
        cfg = self.cfg
        try:
            self.stun_observers = open_alt_observers(
                cfg.listen[0], cfg.stun_alt_port, cfg.stun_alt_ip, self._stun,
                self.endpoint.loop)
        except OSError as exc:
            raise StartupError(f"--stun-alt-port: {exc.strerror or exc}") from None
        origins = {(0, 0): self.endpoint.local_address[:2]}
        origins.update({key: obs.local_address[:2] for key, obs in self.stun_observers.items()})
        self._stun_responder = StunResponder(origins, self._stun_limiter, self.shell_counters)

    def _fleet_address(self):
        """Where the other intermediates of the fleet send relay frames for this one."""
        host, port = plain_addr(self.cfg.fleet_address or self.endpoint.local_address[:2])
        try:
            unspecified = ipaddress.ip_address(host).is_unspecified
        except ValueError:
            unspecified = False  # a host name
        if unspecified:
            raise StartupError(f"--registry needs --fleet-address HOST:PORT: where the other "
                               f"intermediates reach this one ({_fmt((host, port))} is every "
                               f"address, not one)")
        return _fmt((host, port))

    def _fleet_home_silent(self, home):
        self.signaling.fleet_home_silent(home, self.endpoint.now())
        self.pump()

    def _fleet_duplicates(self):
        self.signaling.resolve_duplicates(self.endpoint.now())
        self.pump()

    def _fleet_message(self, home, sender, to, message, session, rtt):
        self.signaling.fleet_message(home, sender, to, message, self.endpoint.now(),
                                     session=session, rtt=rtt)
        self.pump()

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
            for handle in list(self.half_open):
                self.endpoint.cancel_timer(("handshake", handle))
            self.endpoint.flush()
        if self.status_server is not None:
            await self.status_server.close()
        if self.control_server is not None:
            await self.control_server.close()
        if self.fleet is not None:
            await self.fleet.stop()
        if self.endpoint is not None:
            self.endpoint.close()
        if self.engine is not None:
            self.engine.close()  # stops and joins the relay threads
        for observer in self.stun_observers.values():
            observer.close()
        self.debug_logs.close()

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
                    if isinstance(event.message, control.Registered):
                        conn.registered = True
                        self.handshake_over(conn)
                    conn.send(event.message)
            elif isinstance(event, CloseNode):
                conn = self.connections.get(event.handle)
                if conn is not None and conn.connection is not None:
                    conn.connection.close(event.code, event.reason)
            elif isinstance(event, RelayAdd):
                self._relay_add(event)
            elif isinstance(event, RelayRemove):
                engine.remove_session(event.session_id)
            elif isinstance(event, RelaySetMember):
                engine.set_member(event.session_id, event.member, event.addr)
            elif isinstance(event, RelaySetRate):
                self._relay_set_rate(event)
            elif isinstance(event, FleetSend):
                if self.fleet is not None:
                    self.fleet.send(event)
        if self.fleet is not None and self.signaling.registry.outbox:
            self.fleet.changed()
        when = signaling.next_timer()
        if when != self._timer_at:
            self._timer_at = when
            if when is None:
                self.endpoint.cancel_timer(TIMER_KEY)
            else:
                self.endpoint.set_timer(TIMER_KEY, when, self._on_timer)

    def _relay_add(self, event):
        # Each member's frames must carry its own token : a frame from a member's
        # address without it is not the member's. The engine refuses a session without them.
        self.engine.add_session(event.session_id, event.agent_addr, event.connector_addr,
                                event.agent_token, event.connector_token)

    def _relay_set_rate(self, event):
        # The session's share of its members' per-identity relay cap , never
        # above the per-session --relay-rate-limit the engine was started with.
        engine = self.engine
        rate, burst = event.rate_bps, event.burst_bytes
        if engine.rate_limit_bps and engine.rate_limit_bps <= rate:
            rate, burst = engine.rate_limit_bps, engine.burst_bytes
        engine.set_rate(event.session_id, rate, burst)

    def _on_timer(self, now):
        self._timer_at = None
        self.signaling.handle_timer(now)
        self.pump()

    # Handshakes ------------------------------------------------------------------------
    def handshake_over(self, conn):
        """conn registered or closed: it no longer counts as half-open."""
        if self.half_open.pop(conn.handle, None) is not None:
            self._release_host(conn)
            self.endpoint.cancel_timer(("handshake", conn.handle))

    def _release_host(self, conn):
        host = conn.first_addr[0]
        left = self._half_open_by_host.get(host, 0) - 1
        if left > 0:
            self._half_open_by_host[host] = left
        else:
            self._half_open_by_host.pop(host, None)

    def _handshake_expired(self, handle, now):
        conn = self.half_open.pop(handle, None)
        if conn is None:
            return
        self._release_host(conn)
        if conn.connection is None or conn.connection.closed:
            return
        self.shell_counters["handshakes_timed_out"] += 1
        who = conn.peer.name if conn.peer is not None else "unauthenticated client"
        log.debug("dropped %s at %s: not registered within %.1f s", who,
                  _fmt(conn.connection.peer_addr), self.cfg.handshake_timeout)
        conn.connection.abandon(qc.ERROR_SHUTDOWN, "handshake timeout")

    def _initial(self, header, data, addr):
        counters = self.shell_counters
        known = self.endpoint.router.connection(header.dcid)
        if known is not None:
            # A retransmission in the same receive batch as the Initial that opened it.
            known.datagram_received(data, addr, self.endpoint.now())
            return
        if header.version not in SUPPORTED_VERSIONS:
            # An Initial of another version, or any long header of a version the router does
            # not parse (packet_type "unsupported_version", RFC 8999 invariants only).
            self._version_negotiation(header, data, addr)
            return
        if len(data) < MIN_INITIAL_DATAGRAM:
            counters["initials_dropped"] += 1
            return
        now = self.endpoint.now()
        host = addr[0]
        per_host = self._half_open_by_host.get(host, 0)
        original_dcid, retry_scid = header.dcid, None
        if header.token:
            # Our Retry's token coming back (RFC 9000 §8.1.2); nothing else issues tokens.
            try:
                original_dcid = self._retry.validate_token(
                    address=addr, destination_cid=header.dcid, token=header.token, now=now)
            except ValueError:
                # §8.1.3 allows discarding it: the client times out, as a forger should.
                counters["retry_tokens_invalid"] += 1
                return
            retry_scid = header.dcid
        elif (len(self.half_open) >= self.cfg.retry_threshold
              or per_host >= self.cfg.max_half_open_per_source):
            # §8.1.2: make the client prove it receives at addr before it costs a handshake.
            scid = os.urandom(RETRY_CID_LEN)
            token = self._retry.create_token(address=addr,
                                             original_destination_connection_id=header.dcid,
                                             retry_source_connection_id=scid, now=now)
            self.endpoint.send([(encode_quic_retry(
                version=header.version, source_cid=scid, destination_cid=header.scid,
                original_destination_cid=header.dcid, retry_token=token), addr)])
            counters["retries_sent"] += 1
            return
        if len(self.half_open) >= self.cfg.max_half_open:
            counters["half_open_full"] += 1
            return
        if per_host >= self.cfg.max_half_open_per_source:
            # One host that answers Retries must not hold every handshake slot.
            counters["half_open_source_full"] += 1
            return
        self._half_open_by_host[host] = per_host + 1
        quic = qc.NodeQuicConnection(configuration=self._server_config,
                                     original_destination_connection_id=original_dcid,
                                     retry_source_connection_id=retry_scid)
        handle = next(self._handles)
        conn = ControlConnection(self, handle, addr, now)
        self.connections[handle] = conn
        self.half_open[handle] = conn
        self.endpoint.set_timer(("handshake", handle), now + self.cfg.handshake_timeout,
                                lambda when, handle=handle: self._handshake_expired(handle, when))
        conn.connection = self.endpoint.add_connection(quic, conn, peer_addr=addr,
                                                       extra_cids=(header.dcid,))
        counters["connections_accepted"] += 1
        conn.connection.datagram_received(data, addr, now)

    def _version_negotiation(self, header, data, addr):
        """RFC 9000 §6.1: answer a client's first packet of an unsupported version with the
        versions we support, once it is big enough to start a connection (§14.1), never a
        Version Negotiation packet itself (version 0, §17.2.1), and at a bounded rate."""
        counters = self.shell_counters
        if header.version == 0 or len(data) < MIN_INITIAL_DATAGRAM:
            counters["initials_dropped"] += 1
            return
        if not self._vn_limiter.allow(addr[0], self.endpoint.now()):
            counters["version_negotiation_rate_limited"] += 1
            return
        counters["version_negotiations_sent"] += 1
        self.endpoint.send([(encode_quic_version_negotiation(
            source_cid=header.dcid, destination_cid=header.scid,
            supported_versions=list(SUPPORTED_VERSIONS)), addr)])

    def _stun(self, data, addr, at=(0, 0)):
        """A STUN datagram at observer ``at`` (mahole.stun_server): the answer goes back to
        its source, from the observer a CHANGE-REQUEST names."""
        responder = self._stun_responder
        answer = responder.handle(data, addr, at, self.endpoint.now())
        if answer is None:
            if responder.next_delayed() is not None:  # a RESPONSE-DELAY request was held
                self.endpoint.set_timer("stun-delayed", responder.next_delayed(),
                                        self._stun_delayed)
            return
        self._stun_send(*answer, addr)

    def _stun_send(self, key, payload, addr):
        if key == (0, 0):
            self.endpoint.send([(payload, addr)])
        elif key in self.stun_observers:
            self.stun_observers[key].send(payload, addr)

    def _stun_delayed(self, now):
        """Held answers (RESPONSE-DELAY, mahole.stun_server) that are due."""
        responder = self._stun_responder
        for key, payload, addr in responder.delayed_due(now):
            self._stun_send(key, payload, addr)
        if responder.next_delayed() is not None:
            self.endpoint.set_timer("stun-delayed", responder.next_delayed(),
                                    self._stun_delayed)

    # Status ----------------------------------------------------------------------------
    def control_commands(self):
        """Commands of the local control socket beyond "status": none yet."""
        return {}

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
            # --stun-alt-port / --stun-alt-ip: the STUN-only observers (mahole.stun_server)
            "stun_observers": [_fmt(o.local_address) for o in self.stun_observers.values()],
            "control_socket": self.control_server.path if self.control_server else None,
            "handshakes": {"half_open": len(self.half_open),
                           "max_half_open": self.cfg.max_half_open,
                           "retry_threshold": self.cfg.retry_threshold},
            "nodes": {"agents": roles["agent"], "connectors": roles["connector"],
                      "list": [{"role": n.role, "name": n.name, "addr": _fmt(n.addr),
                                "services": list(n.services), "nat": n.nat} for n in nodes]},
            "sessions": {"open": len(sessions), "list": [
                {"session": session_tag(s.session_id), "service": s.service,
                 "agent": s.agent_name, "connector": s.connector_name, "path": s.path,
                 "strategy": s.strategy or None, "hard_side": s.hard_side or None,
                 "relay": self._relay_stats(s.session_id)}
                for s in sessions]},
            "relay": engine.counters() if engine else {},
            "relay_threads": engine.threads if engine else None,
            "punching": {**punching, "time_to_direct_ms_median":
                         statistics.median(times) if times else None,
                         "strategies": dict(self.signaling.strategies)},
            "counters": self.counters,
            "fleet": self.fleet.status() if self.fleet is not None else None,
            "endpoint": dict(self.endpoint.counters) if self.endpoint else {},
            "router": self.endpoint.router.counters() if self.endpoint else {},
        }

    def _relay_stats(self, session_id):
        stats = self.engine.session_stats(session_id) if self.engine else None
        if stats is None:
            return None
        for key in ("member_a", "member_b"):
            if stats.get(key) is not None:
                stats[key] = list(plain_addr(stats[key]))
        return stats

    def metrics(self):
        """The intermediate's prometheus_client registry (nodes, sessions, relay, punching)."""
        from ..metrics import intermediate_registry
        return intermediate_registry(self)
