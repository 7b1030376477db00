"""End-to-end sessions at a node: the asyncio shell around the sans-IO session core.

A `Session` holds the agent↔connector QUIC connection of one session and its
`mahole.session_core.SessionCore`, which decides everything about routes and lifetime. The
shell only feeds the core — authenticated packets and where they came from, application
activity, open streams, what the QUIC connection knows (packets in flight, RTT), hole-punching
results, the intermediate coming and going — executes its events (route changes, PINGs,
re-punching, closing) and arms its next timer on the endpoint's one timer scheduler.

aioquic talks to a stable virtual peer address; the core is the connection's *path*: it puts
each packet inside a relay frame for the intermediate (`0x10 | session_id | relay_token |
inner`, mahole/wire/relay.py; the token is this member's, from `SessionOpened.relay_token`) or
sends it straight to the peer once hole punching nominated a pair. Relay frames that arrive
are stripped of their 17-byte header and offered to the QUIC connection; only what aioquic
then authenticates reaches the core, so a forged frame moves no route.

Each route also has its packet size, found by path MTU discovery (`mahole.pmtu.PathMtu`, one
per route: the relay, and each direct peer address): the connection sends packets of the
current route's size, and UDP datagrams too large for one DATAGRAM frame of it are fragmented.
"""

import functools
import itertools
import logging
import socket

from aioquic.quic import events as qe

from ._fast import KIND_QUIC_LONG, classify, parse_header
from ._fast._kinds import RELAY_HEADER_LEN, RELAY_TOKEN_LEN
from .connection import ALPN_E2E_STREAM_OPEN, E2E_WITH_FRAGMENTS, datagram_frame_room
from .endpoint import ConnectionHandler
from .pmtu import BASE_PLPMTU, PathMtu, route_ceiling
from .session_core import (DIRECT, NONE, NOTHING_HEARD, RELAY, RELAY_FASTER, RELAY_MOVED, Closed,
                           NominationConfirmed, RepunchDue,
                           RouteChanged, SendPing, SessionCore)
from .wire import control
from .wire.relay import session_tag
from .tunnel import FLOW_ID_LEN, MAX_UDP_PAYLOAD, DatagramReassembler, frame_datagram

log = logging.getLogger(__name__)

# What aioquic believes the peer's address is; the session core knows the real routes.
VIRTUAL_PEER_ADDR = ("0.0.0.0", 1)

# PING uids of `Session.probe` (mahole ping), apart from the core's keepalive PINGs.
_PROBE_UIDS = itertools.count(1 << 40)
MAX_PROBES = 64  # unanswered probes kept per session; older ones are forgotten
# DATAGRAM frames aioquic may hold unsent (congestion control paces them); beyond this a UDP
# datagram is dropped and counted rather than queued without bound.
MAX_QUEUED_DATAGRAM_FRAMES = 1024
MAX_FLOW_LOGS = 1024  # flows per session whose first datagram drop is logged
MAX_MTU_ROUTES = 4  # routes whose packet size a session remembers (the relay, direct peers)
# Packets over 1,200 bytes declared lost that make a route's packet size suspect, so that
# path MTU discovery confirms it at once: a black hole that appeared under a working size
# shows as large packets vanishing (RFC 8899 §4.3). A false alarm costs one probe.
MTU_SUSPECT_LOSSES = 3
# Linux's IP_MTU / IPV6_MTU (linux/in.h, linux/in6.h): a connected socket's route MTU.
_IP_MTU = getattr(socket, "IP_MTU", 14)
_IPV6_MTU = getattr(socket, "IPV6_MTU", 24)


class Session(ConnectionHandler):
    """One end-to-end session of a node: its id, peer, session core and QUIC connection.

    Registered in the endpoint's router under its session id, so relay frames for it arrive at
    `relay_frame_received`. Subclasses (agent, connector) handle the QUIC events after calling
    `Session.quic_event`, keep their streams in `pipes`, and name the peer in `peer`.

    ``relay_token`` is this member's token from `control.SessionOpened.relay_token`, sent in
    every relay frame. The roles build their sessions as ``Cls(node, message)`` from the
    `SessionOpened` message; when the token is not passed explicitly it is taken from that
    message (see `__new__`), and a message without one gives eight zero bytes.
    """

    controlling = False  # the agent's sessions nominate and punch again after a failover
    peer = "the peer"

    def __new__(cls, node=None, message=None, *args, **kwargs):
        self = super().__new__(cls)
        # Subclasses are built from the SessionOpened message, Cls(node, message), and pass
        # its fields on to __init__ one by one: keep the relay token it carries.
        self._opened_relay_token = _relay_token_of(message) if not args else None
        return self

    def __init__(self, node, session_id, service, agent, connector, *, relay_token=None):
        if relay_token is None:
            relay_token = getattr(self, "_opened_relay_token", None)
        self.node = node
        self.endpoint = node.endpoint
        self.session_id = session_id
        self.tag = session_tag(session_id)  # for logs: the id itself keys relay frames
        self.service = service
        self.agent = agent
        self.connector = connector
        self.relay_token = relay_token  # ours, for ResumeSession after homing again
        now = self.endpoint.now()
        control_client = node.control
        self.core = SessionCore.from_config(
            node.cfg, session_id, node.intermediate_addr, now, controlling=self.controlling,
            relay_available=control_client is not None and control_client.connected,
            relay_token=relay_token)
        self.core.set_direct_keepalive(node.direct_keepalive)
        self.connection = None
        self.closed = False
        self.pipes = {}  # stream id -> what carries the stream (subclasses)
        self.dropped_frames = 0
        self.opened_at = now
        self.punch_outcome = None  # ice.HolePunchResult once hole punching ended
        self._candidates_grew = False  # a port mapping came up while punching
        self.switch_ms = None  # StartPunching -> direct route in use
        # The intermediate's punching strategy of the last round and its hard side
        # (StartPunching, control protocol /3); None from an older intermediate.
        self.strategy = None
        self.hard_side = None
        self._probes = {}  # PING uid -> (sent at, Future of the RTT in seconds)
        self._timer_key = ("session", session_id)
        self._timer_at = None
        self._datagram_ids = itertools.count()
        self.reassembler = DatagramReassembler(on_drop=self._datagram_dropped)
        self._drops_logged = set()  # flow ids whose first datagram drop was logged
        self.fragments_allowed = False  # the peer reassembles fragments (known at handshake)
        self.stream_open_byte = False  # streams start with STREAM_OPEN (known at handshake)
        self._max_udp_payload = node.cfg.max_udp_payload
        self._mtus = {}  # route key -> PathMtu, oldest first
        self._mtu_key = None  # the route whose size the connection uses
        self._large_lost_seen = 0  # the connection's large_packets_lost when last looked at
        self.route_watchers = []  # callables(RouteChanged): the library's path_changes()
        self.endpoint.router.add_session(session_id, self)
        self._arm()

    @property
    def route(self):
        """"relay", "direct" or "none" (no connection yet, or closed)."""
        if self.connection is None or self.closed:
            return NONE
        return self.core.route

    # From the network --------------------------------------------------------------------
    def relay_frame_received(self, frame, addr):
        # The router routed the frame by its session id; the rest of the header is ours to
        # check. The token in it is the sender's, not ours: the intermediate checked it.
        if (self.closed or len(frame) <= RELAY_HEADER_LEN
                or not self.core.relay_inbound_allowed(addr)):
            self.dropped_frames += 1
            return
        inner = frame[RELAY_HEADER_LEN:]
        if self.connection is not None:
            self.connection.path_datagram_received(inner, addr, self.endpoint.now())
        elif classify(inner) == KIND_QUIC_LONG:
            try:
                header = parse_header(inner)
            except ValueError:
                self.dropped_frames += 1
                return
            self.first_packet(header, inner, addr)
        else:
            self.dropped_frames += 1

    def first_packet(self, header, data, addr):
        """A packet before the connection exists (the connector accepts an Initial here)."""
        self.dropped_frames += 1

    # Connection handler ------------------------------------------------------------------
    def packet_authenticated(self, connection, addr, now):
        self.core.packet_authenticated(addr, now)
        self._pump(now)

    def quic_event(self, connection, event):
        """Feeds the core; subclasses call this first, then act on the event."""
        if isinstance(event, (qe.StreamDataReceived, qe.DatagramFrameReceived)):
            self.core.app_activity(self.endpoint.now())
        elif isinstance(event, qe.PingAcknowledged):
            probe = self._probes.pop(event.uid, None)
            if probe is not None and not probe[1].done():
                probe[1].set_result(self.endpoint.now() - probe[0])
        elif isinstance(event, qe.HandshakeCompleted):
            self.fragments_allowed = event.alpn_protocol in E2E_WITH_FRAGMENTS
            self.stream_open_byte = event.alpn_protocol == ALPN_E2E_STREAM_OPEN
            now = self.endpoint.now()
            self.core.handshake_completed(now)
            self._mtu_step(now)
            self._arm()

    def progress(self, connection):
        """Before the endpoint collects the connection's packets: what the core must know."""
        now = self.endpoint.now()
        self._feed_transport(now)
        self._pump(now)

    def _feed_transport(self, now):
        conn = self.connection
        if conn is not None and not conn.closed:
            quic = conn.quic
            self.core.transport_state(quic.bytes_in_flight > 0, quic.smoothed_rtt, now,
                                      quic.latest_rtt)
            if (quic.large_packets_lost - self._large_lost_seen >= MTU_SUSPECT_LOSSES
                    and self._mtu_key is not None):
                self._large_lost_seen = quic.large_packets_lost
                self._mtus[self._mtu_key].suspect(now)
        self.core.set_open_streams(len(self.pipes), now)

    # Hole punching and the intermediate ----------------------------------------------------
    def punch_result(self, result):
        """Hole punching ended: the direct route, or the relay (or the end, --direct-only)."""
        now = self.endpoint.now()
        self.punch_outcome = result
        if result.path == "direct":
            core = self.core
            core.punch_succeeded(result.remote_addr, now, result.rtt)
            if self.closed:
                pass  # nothing to say: the session ended
            elif core.direct_addr is not None:
                self.switch_ms = round(result.elapsed * 1000, 3)
                log.info("session %s to %s: direct via %s after %.0f ms", self.tag,
                         self.service, _fmt(result.remote_addr), result.elapsed * 1000)
            else:
                log.info("session %s to %s: staying on the relay, faster than the direct "
                         "route via %s (%s against %s ms)", self.tag, self.service,
                         _fmt(result.remote_addr), _ms(core.route_rtt[RELAY]),
                         _ms(result.rtt))
        else:
            log.info("session %s to %s: staying on the relay (%s)", self.tag,
                     self.service, result.reason)
            self.core.punch_failed(result.reason, now)
            if self._candidates_grew:
                self.core.candidates_grew(now)
        self._candidates_grew = False
        self.node.report(result.to_wire(self.session_id))
        self._pump(now)

    def nominating(self, addr):
        """Hole punching is nominating the pair with remote address addr (None: not)."""
        self.core.nominating(addr)

    def relay_state_changed(self, available, reason, hold=0.0):
        """The control connection to the intermediate (and with it the relay) came or went;
        with ``hold`` a relayed session waits that long for a resumption."""
        now = self.endpoint.now()
        self.core.relay_available(available, now, reason, hold)
        self._pump(now)

    def resume_message(self):
        """ResumeSession for this session, after the node homed again (None: no token)."""
        if self.closed or self.relay_token is None:
            return None
        return control.ResumeSession(session_id=self.session_id, service=self.service,
                                     agent=self.agent, connector=self.connector,
                                     relay_token=self.relay_token)

    def relay_moved(self, addr):
        """The intermediate at addr took the session over (SessionResumed)."""
        now = self.endpoint.now()
        if addr != self.core.relay_addr:
            log.info("session %s to %s: resumed through the relay at %s", self.tag,
                     self.service, _fmt(addr))
        self.core.relay_moved(addr, now)
        self._pump(now)

    def network_changed(self, reason, repunch=True):
        """This node's network moved: off the direct route, and punch again now (or, with
        repunch False, at repunch_now())."""
        now = self.endpoint.now()
        self.core.network_changed(now, reason, repunch)
        self._pump(now)

    def set_direct_keepalive(self, seconds):
        """The node's keepalive for idle direct routes changed (its NAT's binding lifetime)."""
        self.core.set_direct_keepalive(seconds)
        self._arm()

    def repunch_now(self):
        now = self.endpoint.now()
        self.core.repunch_now(now)
        self._pump(now)

    def direct_local_ip(self):
        """The local address the direct route was punched from (None: not known)."""
        outcome = self.punch_outcome
        if self.core.direct_addr is None or outcome is None or outcome.pair is None:
            return None
        local = outcome.pair.local
        return (local.related_addr or local.addr)[0]

    def candidates_grew(self):
        """A new local candidate (a port mapping came up): punch again if it may help; a
        punch under way is left to end first."""
        if self.punch_outcome is None:
            self._candidates_grew = True  # looked at when this punch ends
            return
        now = self.endpoint.now()
        self.core.candidates_grew(now)
        self._pump(now)

    def hold(self, seconds):
        """The peer is homing again (SessionHeld): not dead for ``seconds``."""
        now = self.endpoint.now()
        self.core.hold(now + seconds)
        self._pump(now)

    def repunch(self, attempt):
        """Punch again (the controlling side overrides this)."""

    # The core's events and timer ---------------------------------------------------------
    def _pump(self, now):
        core = self.core
        while (event := core.next_event()) is not None:
            if isinstance(event, SendPing):
                self._send_ping(event.reset_backoff)
                if event.doubt:
                    self.node.direct_in_doubt()
            elif isinstance(event, RouteChanged):
                self._route_changed(event)
            elif isinstance(event, RepunchDue):
                self.repunch(event.attempt)
            elif isinstance(event, NominationConfirmed):
                self.node.puncher.confirm_nomination(self, event.addr)
            elif isinstance(event, Closed):
                reason = event.reason
                if reason == "the peer stopped answering":
                    reason = f"{reason} ({self.peer})"
                self.close(reason)
                return
        self._mtu_step(now)
        self._arm()

    def _arm(self):
        if self.closed:
            return
        when = _earliest(self.core.next_timer(), self.reassembler.next_expiry(),
                         self._mtus[self._mtu_key].next_timer() if self._mtu_key else None)
        if when is None or (self._timer_at is not None and when >= self._timer_at):
            # A timer that fires too early finds nothing due and arms the next deadline:
            # cheaper than moving it on every acknowledgement of a transfer.
            return
        self._timer_at = when
        self.endpoint.set_timer(self._timer_key, when, self._on_timer)

    def _on_timer(self, now):
        self._timer_at = None
        if self.closed:
            return
        self._feed_transport(now)
        self.reassembler.expire(now)
        self.core.relay_heard(self.node.relay_last_heard())
        self.core.handle_timer(now)
        self._pump(now)

    # Path MTU ------------------------------------------------------------------------------
    def _route_key(self):
        route = self.core.route
        if route == DIRECT:
            return (route, self.core.direct_addr)
        return (route, self.core.relay_addr) if route != NONE else None

    def _mtu_step(self, now):
        """Keep the connection's packet size that of the route in use, and send the probe
        that route's discovery wants now."""
        conn = self.connection
        if conn is None or conn.closed or self.closed or not self.core.established:
            return
        key = self._route_key()
        if key is None:
            return
        mtu = self._mtus.get(key)
        if mtu is None:
            while len(self._mtus) >= MAX_MTU_ROUTES:
                del self._mtus[next(k for k in self._mtus if k != self._mtu_key)]
            route, addr = key
            ipv6 = _is_ipv6(addr)
            ceiling = route_ceiling(
                self._max_udp_payload, ipv6, header=0 if route == DIRECT else RELAY_HEADER_LEN,
                link_mtu=None if self._max_udp_payload else _link_mtu(addr))
            mtu = self._mtus[key] = PathMtu(ceiling, now)
        elif key != self._mtu_key:
            mtu.suspect(now)  # a route used before: confirm its size before trusting it
        if key != self._mtu_key:
            self._mtu_key = key
            self._apply_mtu(mtu)
        size = mtu.next_probe(now)
        if size is not None:
            conn.quic.send_mtu_probe(size, functools.partial(self._mtu_probe_result, key))
            conn.transmit()

    def _mtu_probe_result(self, key, size, acked):
        """A probe's fate, from inside aioquic: recorded now, acted on from the timer."""
        mtu = self._mtus.get(key)
        if mtu is None or self.closed:
            return
        now = self.endpoint.now()
        black_holes = mtu.black_holes
        if acked is None:
            mtu.probe_unsent(size, now)
        elif acked:
            mtu.probe_acked(size, now)
        else:
            mtu.probe_lost(size, now)
        if mtu.black_holes != black_holes:
            log.info("session %s to %s: %d-byte packets stopped getting through on the %s "
                     "route; back to %d bytes", self.tag, self.service, size, key[0],
                     mtu.plpmtu)
        if key == self._mtu_key:
            self._apply_mtu(mtu)
        self._arm()

    def _apply_mtu(self, mtu):
        conn = self.connection
        if conn is None or conn.closed or conn.quic.max_datagram_size == mtu.plpmtu:
            return
        log.debug("session %s: %d-byte packets on the %s route", self.tag, mtu.plpmtu,
                  self.core.route)
        dropped = conn.quic.set_max_datagram_size(mtu.plpmtu)
        if dropped:
            self._count("datagrams_dropped_mtu", dropped)

    def max_datagram_frame(self):
        """The largest DATAGRAM frame data one packet of the current route carries."""
        conn = self.connection
        return conn.quic.max_datagram_frame if conn is not None else datagram_frame_room(
            BASE_PLPMTU)

    def mtu_stats(self):
        """Each remembered route's path MTU discovery (route, address, size, state ...)."""
        return [{"route": route, "addr": _fmt(addr) if addr else None, **mtu.stats(),
                 "in_use": (route, addr) == self._mtu_key}
                for (route, addr), mtu in self._mtus.items()]

    def _send_ping(self, reset_backoff):
        conn = self.connection
        if conn is None or conn.closed:
            return
        if reset_backoff:
            conn.quic.reset_probe_backoff()
        conn.quic.send_probe()
        conn.transmit()

    def _route_changed(self, event):
        for watcher in list(self.route_watchers):
            watcher(event)
        if event.reason == RELAY_MOVED:
            pass  # relay_moved said so
        elif event.reason.startswith(RELAY_FASTER):
            log.info("session %s to %s: moved to the relay (%s)", self.tag, self.service,
                     event.reason)
        elif event.reason != "nominated":
            where = {"relay": "fell back to the relay", "none": "has no route left"}.get(
                event.route, f"now {event.route}")
            log.warning("session %s to %s: %s (%s)", self.tag, self.service, where,
                        event.reason)
            if event.reason.startswith(NOTHING_HEARD):
                self.node.direct_route_failed(self.core.direct_keepalive)
        if self.core.repunch_at is not None:
            log.info("session %s: punching again in %.1f s", self.tag,
                     self.core.repunch_at - self.endpoint.now())
        if self.connection is not None:
            self.connection.transmit()

    def probe(self):
        """One QUIC PING (RFC 9000 §19.2) for `mahole ping`: (route, address, Future of the
        round-trip time in seconds, set when the peer acknowledges it). aioquic sends a lost
        PING again; the caller bounds the wait."""
        conn = self.connection
        future = self.endpoint.loop.create_future()
        route = self.route
        core = self.core
        addr = core.direct_addr if route == "direct" else core.relay_addr if route == "relay" \
            else None
        if conn is None or conn.closed or self.closed:
            future.set_exception(ConnectionError("the session is closed"))
            return route, addr, future
        while len(self._probes) >= MAX_PROBES:
            _, old = self._probes.pop(next(iter(self._probes)))
            old.cancel()
        uid = next(_PROBE_UIDS)
        self._probes[uid] = (self.endpoint.now(), future)
        conn.quic.send_ping(uid)
        conn.transmit()
        return route, addr, future

    # Application -------------------------------------------------------------------------
    def unsendable(self, size):
        """Why a UDP payload of `size` bytes cannot be sent ("oversize": over
        MAX_UDP_PAYLOAD; "peer_cannot_reassemble": too large for one packet and the peer
        takes no fragments), or None."""
        if size > MAX_UDP_PAYLOAD:
            return "oversize"
        if not self.fragments_allowed and FLOW_ID_LEN + size > self.max_datagram_frame():
            return "peer_cannot_reassemble"
        return None

    def send_datagram(self, flow_id, payload):
        """One UDP payload of a flow, in one QUIC DATAGRAM frame (RFC 9221) or, when too
        large for one packet of the current route, in fragments
        (`mahole.tunnel.frame_datagram`).

        Dropped and counted (never queued for ever): a payload over MAX_UDP_PAYLOAD, one too
        large for a packet when the peer cannot reassemble fragments, one sent before the
        connection exists or after it closed, and one that would overfill aioquic's queue of
        unsent DATAGRAM frames. Subclasses keep `counters`.
        """
        unsendable = self.unsendable(len(payload))
        if unsendable is not None:
            self._datagram_dropped(flow_id, unsendable)
            return
        try:
            frames = frame_datagram(flow_id, payload, next(self._datagram_ids),
                                    self.max_datagram_frame())
        except ValueError:  # a flow id out of range: no caller sends one
            self._datagram_dropped(flow_id, "oversize")
            return
        conn = self.connection
        if conn is None or conn.closed:
            self.counters["datagrams_dropped"] += 1
            return
        quic = conn.quic
        if quic.datagrams_queued + len(frames) > MAX_QUEUED_DATAGRAM_FRAMES:
            self._datagram_dropped(flow_id, "queue_full")
            return
        self.counters["datagrams_out"] += 1
        if len(frames) > 1:
            self._count("datagrams_fragmented_out")
        self.core.app_activity(self.endpoint.now())
        for frame in frames:
            quic.send_datagram_frame(frame)
        conn.transmit()

    def datagram_frame_received(self, data):
        """(flow_id, payload) of a whole UDP datagram from a DATAGRAM frame's data, or None
        (a fragment of one not yet complete, or dropped and counted)."""
        received = self.reassembler.receive(data, self.endpoint.now())
        if received is not None:
            self.counters["datagrams_in"] += 1
            if data[0] & 0x80:
                self._count("datagrams_reassembled")
        return received

    def _count(self, key, n=1):
        self.counters[key] = self.counters.get(key, 0) + n

    def _datagram_dropped(self, flow_id, reason):
        """Counts a UDP datagram (or fragment) dropped, and logs the first drop of each flow."""
        if reason == "malformed":
            key = "datagrams_dropped"
        elif reason == "duplicate":
            key = "datagram_fragments_duplicate"
        else:
            key = f"datagrams_dropped_{reason}"
        self._count(key)
        logged = self._drops_logged
        if flow_id in logged or len(logged) > MAX_FLOW_LOGS:
            return
        logged.add(flow_id)
        log.warning("session %s: udp flow %s of %s: datagram dropped (%s); further drops on "
                    "this flow are only counted", self.tag,
                    "?" if flow_id is None else flow_id, self.service, reason.replace("_", " "))

    def punch_stats(self):
        punch = self.node.puncher.punches.get(self)
        return punch.stats() if punch is not None else None

    def stats(self):
        conn = self.connection
        core = self.core
        rtt = conn.quic.smoothed_rtt if conn is not None else None
        return {
            "service": self.service,
            "session": self.tag,
            "agent": self.agent,
            "connector": self.connector,
            "path": self.route,
            "direct_addr": _fmt(core.direct_addr) if core.direct_addr else None,
            "relay_addr": _fmt(core.relay_addr),
            "routes": {
                DIRECT: {"addr": _fmt(core.direct_addr or core.slower_direct)
                         if core.direct_addr or core.slower_direct else None,
                         "rtt_ms": _ms(core.route_rtt[DIRECT])},
                RELAY: {"addr": _fmt(core.relay_addr), "rtt_ms": _ms(core.route_rtt[RELAY])},
            },
            "rtt_moves": core.rtt_moves,
            "switch_reason": core.switches[-1][2] if core.switches else None,
            "relay_moves": core.relay_moves,
            "network_changes": core.network_changes,
            "switch_ms": self.switch_ms,
            "to_direct_ms": next((round((at - self.opened_at) * 1000, 3)
                                  for at, route, _why in core.switches if route == DIRECT),
                                 None),
            "route_switches": len(core.switches),
            "failovers": len(core.failovers),
            "pings": core.pings,  # keepalives and liveness probes sent
            "direct_keepalive_s": round(core.direct_keepalive, 3),
            "rtt_ms": _ms(rtt),
            "age_s": round(self.endpoint.now() - self.opened_at, 3),
            "bytes_sent": conn.bytes_sent if conn is not None else 0,
            "bytes_received": conn.bytes_received if conn is not None else 0,
            "dropped_frames": self.dropped_frames,
            "mtu": self.mtu_stats(),
            "punch": self.punch_stats(),
            "strategy": self.strategy,
            "hard_side": self.hard_side,
            "birthday": self.node.puncher.birthday_status(self),
        }

    def close(self, reason="closed"):
        if self.closed:
            return
        self.closed = True
        self.core.close(self.endpoint.now())
        self.endpoint.cancel_timer(self._timer_key)
        self.endpoint.router.remove_session(self.session_id)
        self.node.puncher.forget(self)
        for _, future in self._probes.values():
            future.cancel()
        self._probes.clear()
        for watcher in list(self.route_watchers):
            watcher(RouteChanged(NONE, None, reason))
        if self.connection is not None and not self.connection.closed:
            self.connection.close(reason=reason)


def _relay_token_of(message):
    """The 8-byte relay token a SessionOpened message carries, or None."""
    token = getattr(message, "relay_token", None)
    if isinstance(token, (bytes, bytearray)) and len(token) == RELAY_TOKEN_LEN:
        return bytes(token)
    return None


def _earliest(*times):
    times = [t for t in times if t is not None]
    return min(times) if times else None


def _link_mtu(addr):
    """The MTU of the local link towards addr (an IP literal), as the kernel's route to it
    says (IP_MTU of a connected UDP socket, which sends nothing; Linux), or None. An
    IPv4-mapped address is asked over IPv6 and answered by its IPv4 route."""
    family, level, option = ((socket.AF_INET6, socket.IPPROTO_IPV6, _IPV6_MTU) if ":" in addr[0]
                             else (socket.AF_INET, socket.IPPROTO_IP, _IP_MTU))
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(addr[:2])
            return sock.getsockopt(level, option)
    except OSError:
        return None


def _is_ipv6(addr):
    """Whether packets to addr travel over IPv6 (an IPv4-mapped address travels as IPv4)."""
    return addr is not None and ":" in addr[0] and not addr[0].startswith("::ffff:")


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000, 3)


def _fmt(addr):
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
