"""The session core: routes, liveness, keepalive, failover, re-punching and expiry of one
end-to-end session (agent ↔ connector QUIC connection), sans-IO.

Like aioquic's ``QuicConnection`` and the :mod:`mahole.ice` cores, :class:`SessionCore` does
no I/O and never reads the clock: every input takes ``now`` (seconds, any monotonic origin),
:meth:`SessionCore.next_timer` says when it wants :meth:`SessionCore.handle_timer`, and what
the shell must do is drained with :meth:`SessionCore.next_event` as small dataclasses:

- :class:`RouteChanged` — the session's packets go by another route from now on;
- :class:`SendPing` — send a QUIC PING now (RFC 9000 §19.2), after resetting the PTO backoff
  if ``reset_backoff`` (RFC 9002 §6.2.1: packets lost in a dead route are probed for at once);
- :class:`RepunchDue` — the controlling side (the agent) should punch again now;
- :class:`NominationConfirmed` — the peer already uses the pair the agent is nominating (its
  authenticated packet came from there): the shell completes the nomination;
- :class:`Closed` — the session ends, for ``reason``.

Routes
    aioquic talks to a stable virtual peer address; underneath, a session has up to two
    routes: the relay (frames ``0x10 | session_id | relay_token | packet`` through the
    intermediate, :mod:`mahole.wire.relay`; the token is this member's, from
    ``control.SessionOpened.relay_token``, and lets the intermediate tell our frames from
    frames with a forged source address) and the direct route (the remote address of the nominated
    candidate pair). :meth:`outbound` picks the route of each packet; :meth:`inbound` accepts
    direct packets only from the nominated address, and at the agent from the address of the
    pair it is nominating (:meth:`nominating`): the connector takes a pair on the nominating
    check itself (RFC 8445 §7.3.1.5), maybe a second before the check's answer reaches the
    agent through fades, and its first authenticated packet from there completes the
    nomination (:class:`NominationConfirmed`) as the answer would. Packets from either route go to the same
    connection, so streams continue across every switch. ``relay_only`` sessions never take
    the direct route; ``direct_only`` ones have route ``"none"`` until hole punching succeeds
    and end when it fails or the direct route dies.

Only authenticated packets count
    The shell reports a packet with :meth:`packet_authenticated` only after aioquic decrypted
    it (docs/architecture.md, principle 5); a source address alone
    moves nothing.

Liveness and failover (docs/architecture.md, "The session core")
    The core *probes* while ack-eliciting packets are in flight (reported by the shell with
    :meth:`transport_state`) or a PING it asked for is unanswered. A direct route probed with
    nothing heard on it for ``failover_timeout`` (or 3 RTTs when the path is slow, never more
    than twice the timeout) is dead: the session is back on the relay at once, with a PING
    to get loss recovery going. An idle route is probed with a PING every ``keepalive`` (the
    relay) or ``direct_keepalive`` (the direct route; :meth:`set_direct_keepalive`, which a
    node raises to a third of its NAT's measured binding lifetime, mahole.binding_lifetime),
    which also keeps the NAT mappings open. Rarer keepalives declare nothing dead: the
    failover and peer-dead timers run only while probing (data in flight or a PING out). While the direct route is
    probed and nothing is heard on it, a PING goes out every :data:`REPROBE_INTERVAL`: on a
    lossy path one lost PING or ACK is no verdict, several unanswered in a row are. A route
    that fades is given longer: one that came back from a silence while probed in the last
    :data:`FADE_MEMORY` may stay silent :data:`FADE_MARGIN` times its longest such silence
    (still at most twice the timeout), so fades that line up into half a second of silence
    cost no switch, and a clean route is given up after the timeout as before. An
    authenticated packet by the relay while direct, with nothing direct for
    :data:`PEER_SILENT` (after :data:`PEER_SWITCH_GRACE`), means the peer has seen the
    direct route die: the core follows it at once.

Death and expiry
    Probing with nothing authenticated heard on any route for ``peer_dead_after`` ends the
    session ("the peer stopped answering"). A session with no open stream and no application
    data either way (:meth:`app_activity`) for ``idle_timeout`` ends ("idle: no traffic for
    N s"); keepalive PINGs are not activity, and a session that carries traffic is never
    closed by a timer.

Resumption (control protocol /2)
    When the control connection is lost and the node will home again, the shell says so
    with ``relay_available(False, now, reason, hold=s)``: a relayed session is held (not
    closed) for ``hold`` seconds, until :meth:`relay_moved` names the relay that took the
    session over (a new home, or the same one restarted), the route changing under the same
    QUIC connection. :meth:`hold` keeps a session whose peer is homing again (SessionHeld)
    from declaring it dead; and a relayed peer falling silent while the relay itself is quiet
    (:meth:`relay_heard`) is held for :data:`RELAY_DOUBT_HOLD` rather than given up.

Network changes
    :meth:`network_changed` (the node's public address moved, or its own addresses or
    default route changed) takes a direct session back to the relay at once, and the
    controlling side punches again at once (:meth:`repunch_now`): a new network is not a
    flapping path, so no cool-down applies.

Path choice by measured RTT (controlling side only)
    Each route's RTT is the minimum of its samples over the last :data:`RTT_WINDOW` (one
    sample per QUIC ACK while the route carries the session, :meth:`transport_state`, and the
    hole-punching check's round trip for a direct route just found): the minimum, because
    queues filled by a bulk transfer inflate single samples. Direct is the default route, and
    a route found by hole punching is taken (one check's round trip is a thin verdict). The
    agent leaves a direct route for the relay when its RTT is more than :data:`RTT_SLOWER`
    times the relay's and :data:`RTT_MARGIN` more, for :data:`RTT_SUSTAIN` more, over at
    least :data:`RTT_MIN_SAMPLES` samples. It then punches again after :data:`RTT_RECHECK`
    (doubling up to :data:`RTT_RECHECK_MAX`) and takes the direct route back only if the
    check's round trip is within :data:`RTT_RETURN` times (or RTT_MARGIN of) the relay's:
    the gap between the two ratios is the hysteresis, so a path that stays slow costs no
    switch and a change of conditions costs one. The other member follows the agent's route
    (a peer back on the relay is followed, see above); until it has, its packets by the
    direct route it still uses are accepted. The relay's RTT is measured only while the relay
    carries the session: on a direct session it is the figure from the last time it did.

Re-punching (controlling side only)
    After a failover, and after a failed attempt on a session that was direct once, the
    agent punches again after a cool-down of ``repunch_cooldown`` doubled for every further
    failover in the last :data:`REPUNCH_WINDOW` and every failed attempt since the direct
    route last worked, at most ``repunch_cooldown_max`` — so a flapping path settles on the
    relay with a bounded number of switches.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional, Union

from ._fast._kinds import RELAY_FRAME_TYPE, RELAY_NO_TOKEN, RELAY_TOKEN_LEN
from .config import NodeConfig

__all__ = [
    "DIRECT", "NONE", "RELAY", "PEER_SILENT", "PEER_SWITCH_GRACE", "REPUNCH_WINDOW",
    "Closed", "NominationConfirmed", "RepunchDue", "RouteChanged", "SendPing", "SessionCore",
    "SessionEvent",
]

Addr = tuple  # (host, port)

RELAY = "relay"
DIRECT = "direct"
NONE = "none"

# Relay frames right after a switch to direct are stragglers (the peer may learn the
# punching result a little later than we do), not a sign that the direct route died.
PEER_SWITCH_GRACE = 0.25
PEER_SILENT = 0.1
# Failovers within this window each double the re-punch cool-down.
REPUNCH_WINDOW = 60.0
# The relay silent this long as well when the peer falls silent on it: the relay, not the
# peer, may be what died; the peer is not given up for RELAY_DOUBT_HOLD more, time enough for
# the control connection's verdict (control_dead_after) and, with resumption, a new home.
# While the direct route is probed and nothing is heard, a PING goes out this often (or every
# two RTTs, if longer): one lost PING or ACK is no verdict on a lossy path; several unanswered
# in a row are.
REPROBE_INTERVAL = 0.1
# A route that came back from a silence (nothing heard while probed) fades, as Wi-Fi and LTE
# do: for FADE_MEMORY it is given FADE_MARGIN times its longest such silence before it is
# declared dead (at least the failover timeout, never more than twice it), as an RTO has a
# margin over the RTT's variation (RFC 6298 §2). Fades of 30 ms on both links of a path
# line up now and then into a silence of half a second, one way; a cut path answers
# nothing, and a clean one is still given up after the timeout.
FADE_MEMORY = 60.0
FADE_MARGIN = 4.0
MAX_FADES = 64  # silences kept (each later and shorter than the one before): a bound
RELAY_QUIET = 1.0
RELAY_DOUBT_HOLD = 2.0
RELAY_MOVED = "the relay moved"
NOTHING_HEARD = "nothing heard on the direct path"  # the reason of a failover, then "for N ms"
# Path choice by measured RTT (see the module docstring). A route's RTT is the minimum over
# RTT_WINDOW; a move needs the other route RTT_SLOWER times faster ("50 % faster") for
# RTT_SUSTAIN with RTT_MIN_SAMPLES samples, and the way back only RTT_RETURN (hysteresis).
# Samples within RTT_SETTLE (or two RTTs) of a switch are of packets sent before it. Routes
# within RTT_MARGIN of each other are as fast (on a LAN, processing time is all that differs).
RTT_WINDOW = 5.0
RTT_SLOWER = 1.5
RTT_RETURN = 1.2
RTT_SUSTAIN = 2.0
RTT_MIN_SAMPLES = 3
RTT_SETTLE = 0.2
RTT_MAX_SAMPLES = 256  # rising samples kept per route (a bound, whatever the ACK rate)
RTT_MARGIN = 0.01
RTT_RECHECK = 30.0
RTT_RECHECK_MAX = 300.0
RELAY_FASTER = "the relay is faster"


@dataclass(frozen=True)
class RouteChanged:
    """Packets go by ``route`` ("relay", "direct" or "none") to ``addr`` (None for "none")
    from now on, because of ``reason`` ("nominated", or why the direct route died)."""

    route: str
    addr: Optional[Addr]
    reason: str


@dataclass(frozen=True)
class SendPing:
    """Send a QUIC PING now; first reset the PTO backoff if ``reset_backoff`` (after a
    failover: what was sent into the dead route is probed for at once, not after a
    backed-off PTO). ``doubt``: the direct route has not answered the last probe either;
    the node may check whether its own public address moved (a NAT that rebound), which
    would explain it."""

    reset_backoff: bool = False
    doubt: bool = False


@dataclass(frozen=True)
class RepunchDue:
    """Punch again now (controlling side); ``attempt`` counts attempts since the direct route
    last worked."""

    attempt: int


@dataclass(frozen=True)
class Closed:
    """The session ended by itself (idle, dead peer, no route left); the shell closes the
    QUIC connection with ``reason``."""

    reason: str


@dataclass(frozen=True)
class NominationConfirmed:
    """An authenticated packet of the peer's came from ``addr``, the remote address of the
    pair this (controlling) side is nominating: the peer selected the pair (RFC 8445
    §7.3.1.5) and the path works both ways, so the nomination is complete even if its check's
    answer was lost. The shell ends hole punching with that pair (its punch result then calls
    :meth:`SessionCore.punch_succeeded`)."""

    addr: Addr


SessionEvent = Union[RouteChanged, SendPing, RepunchDue, NominationConfirmed, Closed]


def _slower(rtt: float, other: float, ratio: float) -> bool:
    """Whether a route of `rtt` is slower than one of `other` by more than `ratio` and by
    more than RTT_MARGIN: below that, what differs is processing time, not the path."""
    return rtt > ratio * other and rtt - other > RTT_MARGIN


def _addr(addr) -> Addr:
    return tuple(addr[:2])


class SessionCore:
    """One end-to-end session's routes, liveness and lifetime (see the module docstring).

    ``controlling`` is True at the agent (it nominates and re-punches). ``relay_token`` is
    this member's 8-byte relay token (``control.SessionOpened.relay_token``), carried in
    every relay frame it sends; None sends eight zero bytes (an intermediate that gave no
    token does not check it). The timing arguments default to
    :class:`~mahole.config.NodeConfig`'s; :meth:`from_config` takes them from a node's
    configuration.
    """

    def __init__(self, session_id: bytes, relay_addr: Addr, now: float, *,
                 controlling: bool,
                 relay_token: Optional[bytes] = None,
                 relay_only: bool = False,
                 direct_only: bool = False,
                 relay_available: bool = True,
                 failover_timeout: float = NodeConfig.failover_timeout,
                 keepalive: float = NodeConfig.direct_keepalive,
                 repunch_cooldown: float = NodeConfig.repunch_cooldown,
                 repunch_cooldown_max: float = NodeConfig.repunch_cooldown_max,
                 idle_timeout: float = NodeConfig.session_idle_timeout,
                 peer_dead_after: float = NodeConfig.peer_dead_after) -> None:
        if relay_only and direct_only:
            raise ValueError("a session cannot be both relay-only and direct-only")
        if relay_token is None:
            relay_token = RELAY_NO_TOKEN
        if len(relay_token) != RELAY_TOKEN_LEN:
            raise ValueError(f"a relay token is {RELAY_TOKEN_LEN} bytes, not {len(relay_token)}")
        # Every relay frame we send: 0x10 | session_id | our relay token | packet.
        self.header = bytes([RELAY_FRAME_TYPE]) + bytes(session_id) + bytes(relay_token)
        self.relay_addr = _addr(relay_addr)
        self.controlling = controlling
        self.allow_relay = not direct_only
        self.allow_direct = not relay_only
        self.failover_timeout = failover_timeout
        self.keepalive = keepalive
        self.direct_keepalive = keepalive  # idle direct route: raised once a lifetime is known
        self.repunch_cooldown = repunch_cooldown
        self.repunch_cooldown_max = repunch_cooldown_max
        self.idle_timeout = idle_timeout
        self.peer_dead_after = peer_dead_after
        # Routes
        self.direct_addr: Optional[Addr] = None
        self.nominating_addr: Optional[Addr] = None  # the pair being nominated (agent)
        self.direct_since: Optional[float] = None
        self.switches: list = []  # (when, route, reason)
        self.packets = {RELAY: 0, DIRECT: 0}  # sent by each route
        self.dropped_no_route = 0
        self.relay_up = relay_available
        self.relay_moves = 0  # times the session moved to another relay (resumption)
        self.network_changes = 0  # times this node's public address moved
        # Path choice by RTT
        self.route_rtt: dict = {RELAY: None, DIRECT: None}  # s, min over RTT_WINDOW
        self._rtt_samples: dict = {RELAY: deque(), DIRECT: deque()}  # (when, rtt)
        self._last_sample = None  # serial of the last RTT sample taken
        self._settle_until = now
        self._worse_since: Optional[float] = None  # direct slower than the relay since
        self._worse_samples = 0
        self.slower_direct: Optional[Addr] = None  # a direct route left for a faster relay
        self.rtt_moves = 0  # times the session took the relay for its RTT
        self.rtt_rechecks = 0  # punches since, to see whether direct got fast enough
        self.hold_until: Optional[float] = None  # the peer is not given up before this
        self._relay_lost_reason: Optional[str] = None  # while held for a resumption
        self._relay_heard: Optional[float] = None  # the intermediate's last packet (shell)
        # Liveness
        self.established = False  # handshake done: liveness and keepalive run from then on
        self.last_rx: Optional[float] = None  # last authenticated packet, any route
        self.last_direct_rx: Optional[float] = None
        self.rtt: Optional[float] = None
        self.pings = 0
        self._last_ping = now
        self._in_flight = False
        self._probe_since: Optional[float] = None  # waiting for an answer on this route
        self._fades: deque = deque()  # (when, seconds) silences the direct route came back from
        self._peer_wait_since: Optional[float] = None  # waiting for anything from the peer
        # Re-punching
        self.failovers: list = []  # when the direct route died
        self.failover_durations: list = []  # seconds from the last direct packet to the relay
        self.repunch_attempts = 0  # punches since the direct route last worked
        self.repunch_at: Optional[float] = None
        # Lifetime
        self.last_activity = now
        self.open_streams = 0
        self.closed = False
        self.close_reason: Optional[str] = None
        self._events: deque = deque()

    @classmethod
    def from_config(cls, cfg, session_id: bytes, relay_addr: Addr, now: float, *,
                    controlling: bool, relay_available: bool = True,
                    relay_token: Optional[bytes] = None) -> "SessionCore":
        """A core with a node's settings (a :class:`~mahole.config.NodeConfig`)."""
        return cls(session_id, relay_addr, now, controlling=controlling,
                   relay_token=relay_token,
                   relay_only=cfg.relay_only, direct_only=cfg.direct_only,
                   relay_available=relay_available,
                   failover_timeout=cfg.failover_timeout, keepalive=cfg.direct_keepalive,
                   repunch_cooldown=cfg.repunch_cooldown,
                   repunch_cooldown_max=cfg.repunch_cooldown_max,
                   idle_timeout=cfg.session_idle_timeout, peer_dead_after=cfg.peer_dead_after)

    # Routes ----------------------------------------------------------------------------
    @property
    def route(self) -> str:
        """"direct", "relay" or "none" (direct-only and not punched yet, or closed)."""
        if self.closed:
            return NONE
        if self.direct_addr is not None:
            return DIRECT
        return RELAY if self.allow_relay else NONE

    def outbound(self, data: bytes):
        """(datagram, destination) for one QUIC packet, or None to drop it (no route)."""
        if self.direct_addr is not None:
            self.packets[DIRECT] += 1
            return data, self.direct_addr
        if self.allow_relay:
            self.packets[RELAY] += 1
            return self.header + data, self.relay_addr
        self.dropped_no_route += 1
        return None

    def inbound(self, addr) -> bool:
        """Whether a QUIC packet that came straight from addr (not relayed) may be offered
        to the connection: only from the nominated direct address. Changes nothing."""
        addr = _addr(addr)
        if addr == self.nominating_addr:
            return True  # the peer took the pair on our nominating check (see nominating)
        if self.direct_addr is not None:
            return addr == self.direct_addr
        # The peer may still send by a direct route we left for a faster relay: it follows
        # us within PEER_SWITCH_GRACE, and its packets meanwhile are the session's.
        return self.slower_direct is not None and addr == self.slower_direct

    def relay_inbound_allowed(self, addr) -> bool:
        """Whether a relay frame from addr may be offered to the connection."""
        return self.allow_relay and not self.closed and _addr(addr) == self.relay_addr

    # Inputs ----------------------------------------------------------------------------
    def handshake_completed(self, now: float) -> None:
        """The QUIC handshake is done: liveness, keepalive and death detection start."""
        if not self.established:
            self.established = True
            self.last_rx = now

    def packet_authenticated(self, addr, now: float) -> None:
        """A packet from addr (the direct peer, or the relay) decrypted: the peer sent it."""
        if self.closed:
            return
        addr = _addr(addr)
        if self.direct_addr is not None and addr == self.direct_addr:
            route = DIRECT
            if self._probe_since is not None:
                self._faded(now - max(self._probe_since, self.last_direct_rx), now)
            self.last_direct_rx = now
        elif addr == self.relay_addr:
            route = RELAY
        elif addr == self.nominating_addr:
            # The peer selected the pair we nominate and sends by it: the nomination is
            # complete, whether or not its check's answer comes (lost in a fade, say).
            self.nominating_addr = None
            self.last_rx = now
            self._peer_wait_since = None
            self._events.append(NominationConfirmed(addr))
            return
        elif addr == self.slower_direct:
            self.last_rx = now  # the peer, not yet following us to the relay
            self._peer_wait_since = None
            return
        else:
            return
        self.last_rx = now
        self._peer_wait_since = None
        if self.relay_up:
            self.hold_until = None
        if route == self.route:
            self._probe_since = None
        elif (self.direct_addr is not None and now - self.direct_since > PEER_SWITCH_GRACE
                and now - self.last_direct_rx > PEER_SILENT):
            # The peer sends by the relay again and nothing comes direct: it has seen the
            # direct route die; follow it now instead of waiting for our own timeout.
            self._direct_failed(now, "the peer went back to the relay")

    def transport_state(self, in_flight: bool, rtt: Optional[float], now: float,
                        latest_rtt: Optional[tuple] = None) -> None:
        """What the QUIC connection knows: ack-eliciting packets in flight, smoothed RTT
        (RFC 9002 §5.3, None before the first sample) and (serial, seconds) of the newest
        RTT sample (§5.2): a new serial is a new sample of the route in use."""
        self._in_flight = in_flight
        self.rtt = rtt
        if latest_rtt is not None and latest_rtt[0] != self._last_sample:
            self._last_sample = latest_rtt[0]
            self._rtt_sample(latest_rtt[1], now)
        if in_flight:
            if self.established:
                self._probing(now)
        elif (self._probe_since is not None and self.last_rx is not None
              and self.last_rx >= self._probe_since):
            # Everything was answered, if by the other route (the peer had not switched
            # yet): nothing is waiting. Packets declared lost without an answer keep the
            # probe going.
            self._probe_since = None

    def app_activity(self, now: float) -> None:
        """Application data (stream or datagram) was sent or received."""
        self.last_activity = now

    def set_open_streams(self, count: int, now: float) -> None:
        """How many streams are open; a session with one is never idle."""
        if count != self.open_streams:
            self.open_streams = count
            self.last_activity = now

    def nominating(self, addr) -> None:
        """The controlling side sent a nominating check (USE-CANDIDATE, RFC 8445 §8.1.1) on a
        pair its own check validated, whose remote address is addr (None: no nomination under
        way). The peer may select the pair on that check (§7.3.1.5) and send by it before the
        answer reaches us: its packets from addr are accepted (:meth:`inbound`), and the first
        one authenticated completes the nomination (:class:`NominationConfirmed`). A packet
        from any other address still moves nothing."""
        if addr is None or not self.controlling or not self.allow_direct or self.closed:
            self.nominating_addr = None
        else:
            self.nominating_addr = _addr(addr)

    def punch_succeeded(self, addr, now: float, rtt: Optional[float] = None) -> None:
        """Hole punching nominated a pair with remote address addr (its check took ``rtt``):
        the direct route, unless the agent finds it much slower than the relay."""
        if self.closed:
            return
        if not self.allow_direct:
            raise ValueError("this session is relay-only")
        addr = _addr(addr)
        self.nominating_addr = None
        self.repunch_attempts = 0
        self.repunch_at = None
        if rtt is not None:
            self._record(DIRECT, rtt, now)
        relay_rtt = self.route_rtt[RELAY]
        if (self.slower_direct is not None and self.controlling and self.allow_relay
                and self.relay_up and rtt is not None and relay_rtt is not None
                and _slower(rtt, relay_rtt, RTT_RETURN)):
            # A re-check of a direct route left for the relay: still too slow. (A first
            # nomination is always taken: one check's round trip is a thin verdict, so the
            # route's own samples decide, see _rtt_sample.)
            self.slower_direct = addr
            self.rtt_rechecks += 1
            self.repunch_at = now + self._recheck_after()
            return
        self.direct_addr = addr
        self.direct_since = self.last_direct_rx = now
        self.slower_direct = None
        self.rtt_rechecks = 0
        self._probe_since = None
        self._worse_since = None
        self._switched(now, DIRECT, addr, "nominated")

    def punch_failed(self, reason: str, now: float) -> None:
        """Hole punching ended without a direct route."""
        self.nominating_addr = None
        if self.closed:
            return
        if not self.allow_relay:
            self._close("direct path required (--direct-only) but hole punching failed: "
                        f"{reason}")
        elif self.controlling and self.slower_direct is not None:
            self.repunch_at = now + self._recheck_after()  # on the relay for its RTT
        elif self.controlling and self.switches and self.direct_addr is None:
            self._schedule_repunch(now)  # it was direct once: keep trying, with pauses

    def network_changed(self, now: float, reason: str, repunch: bool = True) -> None:
        """This node's own network changed (its public address moved: a new uplink, a NAT
        that rebound; or the kernel says an address or the default route went): the direct
        route is gone with the old address, which is no failed route. Back to the relay at
        once, without waiting for the failover timeout, and the controlling side punches
        again now, not after a cool-down (with ``repunch`` False: when :meth:`repunch_now`
        says, once the new public address is known)."""
        if self.closed:
            return
        self.network_changes += 1
        self._forget_rtts()
        self._fades.clear()
        if self.direct_addr is not None:
            self._direct_failed(now, reason, counts=False)
        if repunch:
            self.repunch_now(now)

    def repunch_now(self, now: float) -> None:
        """The controlling side of a relayed session that was direct (or is waiting to punch
        again) punches again now, with no cool-down: its network changed."""
        if self.controlling and self.allow_direct and self.route == RELAY and self.relay_up \
                and not self.closed and (self.switches or self.repunch_at is not None):
            self.repunch_at = now

    def candidates_grew(self, now: float) -> None:
        """This node has a new candidate (its router mapped a port after the session
        punched): a relayed session the agent did not leave for its RTT punches again now,
        as a pair may work that did not."""
        if (self.controlling and self.allow_direct and self.route == RELAY and self.relay_up
                and self.slower_direct is None and not self.closed):
            self.repunch_at = now

    def relay_available(self, available: bool, now: float,
                        reason: str = "intermediate connection lost",
                        hold: float = 0.0) -> None:
        """The control connection to the intermediate came up or went down. Without it
        there is no relay: a session not on the direct route ends, at once or, with
        ``hold``, if no relay has taken it over (:meth:`relay_moved`) within ``hold`` s."""
        self.relay_up = available
        if available:
            self._relay_lost_reason = None
        elif hold > 0 and not self.closed:
            self._relay_lost_reason = reason
            if self.direct_addr is None:  # a direct session needs no hold
                self.hold(now + hold)
        elif not self.closed and self.direct_addr is None:
            self._close(reason)

    def relay_moved(self, addr, now: float) -> None:
        """The session's relay is at addr from now on (a resumption was accepted there): the
        relayed route changes under the same connection, and loss recovery starts at once."""
        if self.closed:
            return
        addr = _addr(addr)
        moved = addr != self.relay_addr
        self.relay_addr = addr
        self.relay_up = True
        self._relay_lost_reason = None
        self.hold_until = None
        if moved:
            self.relay_moves += 1
            self._rtt_samples[RELAY].clear()
            self.route_rtt[RELAY] = None
        if self.route == RELAY:
            self._peer_wait_since = None
            if moved:
                self._switched(now, RELAY, addr, RELAY_MOVED)
            self._ping(now, reset_backoff=True)

    def hold(self, until: float) -> None:
        """Do not give the peer up before ``until`` (it is homing again: SessionHeld)."""
        if not self.closed:
            self.hold_until = max(self.hold_until or until, until)

    def relay_heard(self, when: Optional[float]) -> None:
        """When the intermediate (the relay) was last heard on the control connection."""
        self._relay_heard = when

    def set_direct_keepalive(self, seconds: float) -> None:
        """PING an idle direct route every ``seconds`` from now on (a node's adaptive
        keepalive); the next one is due that long after the last direct packet heard."""
        if seconds <= 0:
            raise ValueError(f"a keepalive is a positive number of seconds, not {seconds!r}")
        self.direct_keepalive = seconds

    def close(self, now: float) -> None:
        """The shell ends the session: no more timers or events."""
        self.closed = True
        self.repunch_at = None
        self._events.clear()

    # Timers ----------------------------------------------------------------------------
    def _failover_after(self, since: float) -> float:
        """How long the direct route may stay silent from `since` on: the failover timeout;
        3 RTTs when the path is slow (but queueing can inflate the RTT estimate during bulk
        transfers); FADE_MARGIN times the longest silence it came back from in the
        FADE_MEMORY before, when it fades. Never more than twice the timeout."""
        timeout = self.failover_timeout
        fade = next((FADE_MARGIN * seconds for when, seconds in self._fades
                     if when >= since - FADE_MEMORY), 0.0)
        return min(max(timeout, 3 * (self.rtt or 0.0), fade), 2 * timeout)

    def _deadlines(self):
        """(when, what) of everything the core waits for."""
        if self.closed:
            return
        if self.open_streams == 0:
            yield self.last_activity + self.idle_timeout, "idle"
        if self.repunch_at is not None:
            yield self.repunch_at, "repunch"
        if self._relay_lost_reason is not None and self.hold_until is not None:
            yield self.hold_until, "resume"
        route = self.route
        if not self.established or route == NONE:
            return
        if self._peer_wait_since is not None:
            dead = max(self._peer_wait_since, self.last_rx) + self.peer_dead_after
            yield max(dead, self.hold_until or dead), "dead"
        if route == DIRECT:
            if self._probe_since is not None:
                since = max(self._probe_since, self.last_direct_rx)
                yield since + self._failover_after(since), "failover"
                yield (max(self._last_ping, self.last_direct_rx, self._probe_since)
                       + max(REPROBE_INTERVAL, 2 * (self.rtt or 0.0)), "reprobe")
            else:
                yield self.last_direct_rx + self.direct_keepalive, "keepalive"
        elif self._probe_since is None:
            yield self.last_rx + self.keepalive, "keepalive"

    def next_timer(self) -> Optional[float]:
        """When :meth:`handle_timer` should run next, or None."""
        return min((when for when, _what in self._deadlines()), default=None)

    def handle_timer(self, now: float) -> None:
        due = {what for when, what in self._deadlines() if when <= now}
        if not due:
            return
        if "idle" in due:
            self._close(f"idle: no traffic for {self.idle_timeout:g} s")
            return
        if "resume" in due:
            reason, self._relay_lost_reason = self._relay_lost_reason, None
            if self.direct_addr is None:
                self._close(f"{reason}; no intermediate took the session over")
                return
        if "dead" in due:
            if (self.route == RELAY and self.hold_until is None and self._relay_heard is not None
                    and now - self._relay_heard >= RELAY_QUIET):
                # The relay is as silent as the peer: it may be the relay that died. Wait
                # for the control connection's verdict (and a resumption) a little longer.
                self.hold(now + RELAY_DOUBT_HOLD)
                return
            self._close("the peer stopped answering")
            return
        if "failover" in due:
            self._direct_failed(now, f"{NOTHING_HEARD} for "
                                     f"{(now - self.last_direct_rx) * 1000:.0f} ms")
        elif "keepalive" in due or "reprobe" in due:
            # RFC 9000 §19.2: a PING elicits an ACK: liveness evidence, and it keeps the NAT
            # mappings of the route open while the session is idle.
            self._ping(now, doubt="reprobe" in due and self.route == DIRECT)
        if "repunch" in due and not self.closed:
            self.repunch_at = None
            if self.direct_addr is None and self.relay_up:
                self.repunch_attempts += 1
                self._events.append(RepunchDue(self.repunch_attempts))

    def next_event(self) -> Optional[SessionEvent]:
        return self._events.popleft() if self._events else None

    # Internals -------------------------------------------------------------------------
    def _probing(self, now):
        if self._probe_since is None:
            self._probe_since = now
        if self._peer_wait_since is None:
            self._peer_wait_since = now

    def _ping(self, now, reset_backoff=False, doubt=False):
        self.pings += 1
        self._last_ping = now
        self._probing(now)
        self._events.append(SendPing(reset_backoff, doubt))

    def _direct_failed(self, now, reason, counts=True):
        """The direct route died: back to the relay at once, same QUIC connection. A route
        lost to a change of our own network (``counts`` False) does not slow re-punching."""
        self.direct_addr = None
        self.slower_direct = None
        if counts:
            self.failovers.append(now)
            if self.last_direct_rx is not None:
                self.failover_durations.append(now - self.last_direct_rx)
        self._probe_since = None
        route = self.route
        self._switched(now, route, self.relay_addr if route == RELAY else None, reason)
        if not self.allow_relay:
            self._close(f"direct path lost and the relay is not allowed (--direct-only): "
                        f"{reason}")
        elif not self.relay_up:
            self._close(f"direct path lost while the intermediate is unreachable: {reason}")
        else:
            self._ping(now, reset_backoff=True)
            if self.controlling:
                self._schedule_repunch(now)

    def _faded(self, seconds, now):
        """The direct route was heard again after `seconds` of silence while probed. Kept:
        the silences that may still be the longest of a FADE_MEMORY (each later and shorter
        than the one before), so the longest is the first."""
        if seconds <= max(REPROBE_INTERVAL, 2 * (self.rtt or 0.0)):
            return  # answered before a PING had to go again: no fade
        fades = self._fades
        while fades and fades[-1][1] <= seconds:
            fades.pop()
        fades.append((now, seconds))
        while fades[0][0] < now - FADE_MEMORY or len(fades) > MAX_FADES:
            fades.popleft()

    def _switched(self, now, route, addr, reason):
        self.switches.append((now, route, reason))
        self._events.append(RouteChanged(route, addr, reason))
        self._settle_until = now + max(RTT_SETTLE, 2 * (self.rtt or 0.0))
        self._worse_since = None

    def _record(self, route, rtt, now):
        """A sample of `route`; its RTT is the minimum over RTT_WINDOW. Only samples that
        may still become that minimum are kept (each later than and above the one before):
        O(1) per sample when a bulk transfer gives thousands a second."""
        samples = self._rtt_samples[route]
        while samples and samples[-1][1] >= rtt:
            samples.pop()
        samples.append((now, rtt))
        while samples[0][0] < now - RTT_WINDOW or len(samples) > RTT_MAX_SAMPLES:
            samples.popleft()
        self.route_rtt[route] = samples[0][1]

    def _rtt_sample(self, rtt, now):
        """One RTT sample of the route in use; on a direct route much slower than the relay
        for RTT_SUSTAIN, the agent takes the relay."""
        route = self.route
        if route == NONE or now < self._settle_until:
            return
        self._record(route, rtt, now)
        relay_rtt = self.route_rtt[RELAY]
        if (route != DIRECT or not self.controlling or not self.allow_relay
                or not self.relay_up or relay_rtt is None
                or not _slower(self.route_rtt[DIRECT], relay_rtt, RTT_SLOWER)):
            self._worse_since = None
            return
        if self._worse_since is None:
            self._worse_since, self._worse_samples = now, 0
        self._worse_samples += 1
        if (now - self._worse_since >= RTT_SUSTAIN
                and self._worse_samples >= RTT_MIN_SAMPLES):
            self._take_faster_relay(now)

    def _take_faster_relay(self, now):
        direct_rtt, relay_rtt = self.route_rtt[DIRECT], self.route_rtt[RELAY]
        self.slower_direct, self.direct_addr = self.direct_addr, None
        self._probe_since = None
        self.rtt_moves += 1
        self._switched(now, RELAY, self.relay_addr,
                       f"{RELAY_FASTER}: {relay_rtt * 1000:.0f} ms against "
                       f"{direct_rtt * 1000:.0f} ms direct")
        self._ping(now)  # the peer follows on our first relayed packet
        self.rtt_rechecks = 1
        self.repunch_at = now + self._recheck_after()

    def _recheck_after(self):
        return min(RTT_RECHECK * 2 ** min(self.rtt_rechecks - 1, 16), RTT_RECHECK_MAX)

    def _forget_rtts(self):
        """A new network: what was measured on the old one says nothing."""
        for route, samples in self._rtt_samples.items():
            samples.clear()
            self.route_rtt[route] = None
        self.slower_direct = None
        self.rtt_rechecks = 0

    def _schedule_repunch(self, now):
        recent = sum(1 for at in self.failovers if at > now - REPUNCH_WINDOW)
        exponent = min(max(recent - 1, 0) + self.repunch_attempts, 32)
        self.repunch_at = now + min(self.repunch_cooldown * 2 ** exponent,
                                    self.repunch_cooldown_max)

    def _close(self, reason):
        self.closed = True
        self.close_reason = reason
        self.repunch_at = None
        self._events.append(Closed(reason))
