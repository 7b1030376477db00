"""The session core, pumped with a fake clock and a fake peer: no sockets, no sleeps.

`Pump` plays the shell and the network: it executes the core's events, reports what a QUIC
connection would (ack-eliciting packets in flight, authenticated packets arriving) and runs
the core's timers. The peer answers every probe (a PING or application data) one RTT later
by the route it was sent on, unless that route is cut or the peer is dead.
"""

import pytest

from mahole.session_core import (
    DIRECT,
    FADE_MARGIN,
    FADE_MEMORY,
    NONE,
    PEER_SWITCH_GRACE,
    RELAY,
    RELAY_DOUBT_HOLD,
    RELAY_MOVED,
    REPROBE_INTERVAL,
    RTT_RECHECK,
    RTT_SUSTAIN,
    RTT_WINDOW,
    Closed,
    NominationConfirmed,
    RepunchDue,
    RouteChanged,
    SendPing,
    SessionCore,
)
from mahole.wire.relay import decode_frame

SID = bytes(range(8))
RELAY_ADDR = ("198.51.100.1", 4478)
PEER = ("203.0.113.9", 40001)
STRANGER = ("203.0.113.66", 40001)


class Pump:
    def __init__(self, rtt=0.02, route_rtts=None, **kw):
        kw.setdefault("controlling", True)
        self.now = 0.0
        self.rtt = rtt
        self.route_rtts = route_rtts  # {route: RTT} when the routes differ
        self.latest = None  # the newest RTT sample (the last answer's round trip)
        self.due = []  # (arrival, round trip) of the probes in flight
        self.samples = 0
        self.core = SessionCore(SID, RELAY_ADDR, self.now, **kw)
        self.events = []  # (when, event)
        self.cut = set()  # routes whose packets are lost
        self.peer_dead = False
        self.lose = 0  # answers to lose next (loss on a working path)
        self.on_repunch = None  # called at each RepunchDue (a new punching attempt)
        self.outstanding = 0  # probes sent and not answered (aioquic retransmits them)
        self.arrivals = []  # when answers reach us
        self.core.handshake_completed(self.now)

    # What the shell does
    def _drain(self):
        while (event := self.core.next_event()) is not None:
            self.events.append((self.now, event))
            if isinstance(event, SendPing):
                self._probe()
            elif isinstance(event, RepunchDue) and self.on_repunch is not None:
                self.on_repunch()
        self.core.transport_state(self.outstanding > 0, self.rtt, self.now,
                                  None if self.latest is None else (self.samples, self.latest))

    def _probe(self):
        self.outstanding += 1
        rtt = self.rtt if self.route_rtts is None else self.route_rtts[self.core.route]
        self.arrivals.append(self.now + rtt)
        self.due.append((self.now + rtt, rtt))

    def _answer(self):
        """An answer arrives by the route the session is on (the peer is on it too)."""
        route = self.core.route
        if route == NONE or route in self.cut or self.peer_dead:
            return
        if self.lose > 0:  # this answer is lost on the way (a lossy path)
            self.lose -= 1
            return
        self.outstanding = 0  # an ACK covers everything sent before it
        answered = [item for item in self.due if item[0] <= self.now]
        if answered:
            self.latest = answered[-1][1]
            self.samples += 1
            self.due = [item for item in self.due if item[0] > self.now]
        self.core.packet_authenticated(self.core.direct_addr if route == DIRECT
                                       else self.core.relay_addr, self.now)
        self._drain()

    def send_data(self):
        """The application sends (a stream write or a datagram): it is acknowledged later."""
        self.core.app_activity(self.now)
        self._probe()
        self._drain()

    def punch(self, addr=PEER, rtt=None):
        self.core.punch_succeeded(addr, self.now, rtt)
        self._drain()

    def run(self, until, every=None, action=None):
        """Advance the clock to `until`, calling action() every `every` seconds."""
        next_action = self.now if every else None
        while self.now < until and not self.core.closed:
            candidates = [until, *self.arrivals]
            timer = self.core.next_timer()
            if timer is not None:
                candidates.append(timer)
            if next_action is not None:
                candidates.append(next_action)
            self.now = max(self.now, min(candidates))
            due = [at for at in self.arrivals if at <= self.now]
            for at in due:
                self.arrivals.remove(at)
                self._answer()
            if next_action is not None and self.now >= next_action:
                action()
                next_action += every
            timer = self.core.next_timer()
            if timer is not None and timer <= self.now:
                self.core.handle_timer(self.now)
                self._drain()

    def of(self, kind):
        return [(at, event) for at, event in self.events if isinstance(event, kind)]


def direct_pump(**kw):
    pump = Pump(**kw)
    pump.run(1.0)
    pump.punch()
    return pump


# Routes ------------------------------------------------------------------------------------
def test_packets_go_by_the_relay_in_frames_until_a_direct_route_is_nominated():
    core = SessionCore(SID, RELAY_ADDR, 0.0, controlling=True)
    assert core.route == RELAY
    assert core.outbound(b"quic") == (b"\x10" + SID + bytes(8) + b"quic", RELAY_ADDR)
    assert not core.inbound(PEER)  # nothing is accepted straight from anyone yet
    core.punch_succeeded(PEER + ("extra",), 1.0)
    assert core.next_event() == RouteChanged(DIRECT, PEER, "nominated")
    assert core.route == DIRECT and core.outbound(b"quic") == (b"quic", PEER)
    assert core.inbound(PEER) and not core.inbound(STRANGER)
    assert core.packets == {RELAY: 1, DIRECT: 1}
    assert core.switches == [(1.0, DIRECT, "nominated")]


def test_relay_frames_carry_the_members_relay_token():
    """0x10 | session id | this member's token (SessionOpened.relay_token) | packet: the
    intermediate relays only frames with the sender's token (mahole/wire/relay.py)."""
    token = bytes.fromhex("a1b2c3d4e5f60718")
    core = SessionCore(SID, RELAY_ADDR, 0.0, controlling=True, relay_token=token)
    frame, addr = core.outbound(b"quic")
    assert addr == RELAY_ADDR
    assert decode_frame(frame) == (SID, token, b"quic")
    assert core.header == b"\x10" + SID + token
    for bad in (b"", bytes(7), bytes(9)):
        with pytest.raises(ValueError, match="relay token is 8 bytes"):
            SessionCore(SID, RELAY_ADDR, 0.0, controlling=True, relay_token=bad)


def test_direct_only_drops_packets_until_punched_and_relay_only_refuses_a_direct_route():
    core = SessionCore(SID, RELAY_ADDR, 0.0, controlling=True, direct_only=True)
    assert core.route == NONE and core.outbound(b"x") is None and core.dropped_no_route == 1
    assert not core.relay_inbound_allowed(RELAY_ADDR)
    core.punch_succeeded(PEER, 0.5)
    assert core.outbound(b"x") == (b"x", PEER)
    relay_only = SessionCore(SID, RELAY_ADDR, 0.0, controlling=True, relay_only=True)
    with pytest.raises(ValueError, match="relay-only"):
        relay_only.punch_succeeded(PEER, 0.5)
    assert relay_only.relay_inbound_allowed(RELAY_ADDR)
    assert not relay_only.relay_inbound_allowed(STRANGER)


def test_direct_only_session_ends_when_punching_fails():
    core = SessionCore(SID, RELAY_ADDR, 0.0, controlling=True, direct_only=True)
    core.punch_failed("no direct path within 5 s", 5.0)
    assert core.next_event() == Closed(
        "direct path required (--direct-only) but hole punching failed: "
        "no direct path within 5 s")
    assert core.closed and core.next_timer() is None


# Liveness and failover ---------------------------------------------------------------------
def test_direct_route_cut_mid_transfer_fails_over_to_the_relay_within_the_timeout():
    pump = direct_pump()
    pump.run(3.0, every=0.01, action=pump.send_data)
    assert pump.of(RouteChanged)[-1][1].route == DIRECT
    pump.cut.add(DIRECT)
    cut_at = pump.now
    pump.run(6.0, every=0.01, action=pump.send_data)
    [(at, change)] = [(at, e) for at, e in pump.of(RouteChanged) if e.route == RELAY]
    assert change == RouteChanged(RELAY, RELAY_ADDR, change.reason)
    assert change.reason.startswith("nothing heard on the direct path for ")
    assert 0.5 - 0.011 <= at - cut_at <= 0.5 + 0.001
    # At once a PING that resets the PTO backoff, so loss recovery resends over the relay.
    assert (at, SendPing(reset_backoff=True)) in pump.events
    assert pump.core.route == RELAY and pump.core.failovers == [at]
    assert not pump.core.closed  # traffic kept flowing on the relay


def test_a_direct_route_that_misses_its_probes_is_doubted_before_the_failover():
    """The reprobe of a direct route still unanswered carries doubt: the node then asks the
    intermediate whether its own public address moved (a NAT that rebound), and that answer
    comes back before the failover timeout. Keepalives of a route that answers carry none."""
    pump = direct_pump()
    pump.run(3.0, every=0.01, action=pump.send_data)
    assert not any(e.doubt for _, e in pump.of(SendPing))
    pump.cut.add(DIRECT)
    cut_at = pump.now
    pump.run(6.0, every=0.01, action=pump.send_data)
    doubts = [at for at, e in pump.of(SendPing) if e.doubt]
    [(failover, _)] = [(at, e) for at, e in pump.of(RouteChanged) if e.route == RELAY]
    assert doubts and doubts[0] - cut_at <= 0.1 + 0.02  # a reprobe interval after the last rx
    assert all(at < failover for at in doubts)  # on the relay, no more doubt of the direct


def test_idle_direct_cut_is_noticed_by_keepalive_within_1_5_s():
    pump = direct_pump()
    pump.run(5.0)
    pump.cut.add(DIRECT)
    cut_at = pump.now
    pump.run(10.0)
    [(at, _change)] = [(at, e) for at, e in pump.of(RouteChanged) if e.route == RELAY]
    assert at - cut_at <= 1.0 + 0.5 + pump.rtt
    assert not pump.core.closed


def test_failover_waits_3_rtts_on_a_slow_path_but_never_more_than_twice_the_timeout():
    for rtt, expected in ((0.2, 0.6), (0.4, 1.0)):
        pump = direct_pump(rtt=rtt)
        pump.run(3.0, every=0.05, action=pump.send_data)
        pump.cut.add(DIRECT)
        cut_at = pump.now
        pump.run(6.0, every=0.05, action=pump.send_data)
        [(at, _)] = [(at, e) for at, e in pump.of(RouteChanged) if e.route == RELAY]
        # The last answer came up to one sending interval before the cut.
        assert expected - 0.06 <= at - cut_at <= expected + 0.01, (rtt, at - cut_at)


def test_idle_routes_are_pinged_every_keepalive_and_never_fail_over_while_answered():
    pump = direct_pump()
    start = pump.now
    pump.run(start + 10.0)
    pings = [at for at, _ in pump.of(SendPing) if at >= start]
    assert 8 <= len(pings) <= 10  # one a keepalive (+ the answer's RTT)
    assert all(1.0 <= b - a <= 1.0 + 2 * pump.rtt for a, b in zip(pings, pings[1:]))
    assert pump.core.route == DIRECT and pump.core.failovers == [] and not pump.core.closed
    relay = Pump()
    relay.run(10.0)
    assert 8 <= len(relay.of(SendPing)) <= 10 and not relay.core.closed


def test_keepalive_pings_are_not_activity_and_data_in_flight_suppresses_them():
    pump = direct_pump()
    pump.run(5.0, every=0.2, action=pump.send_data)
    assert [at for at, _ in pump.of(SendPing) if at > 1.0] == []  # data answered every 0.2 s is liveness enough
    assert pump.core.last_activity == pytest.approx(4.8, abs=0.21)


def test_a_stranger_cannot_keep_a_dead_direct_route_alive():
    pump = direct_pump()
    pump.run(3.0)
    pump.cut.add(DIRECT)

    def stranger():
        pump.core.packet_authenticated(STRANGER, pump.now)
        pump._drain()
    pump.run(6.0, every=0.05, action=stranger)
    assert [e for _, e in pump.of(RouteChanged)][-1].route == RELAY


def test_follows_the_peer_back_to_the_relay_when_its_packets_come_by_the_relay():
    pump = direct_pump()
    punched = pump.now
    pump.run(punched + 0.5)  # idle: nothing direct for a while
    # A straggler right after the switch would be ignored; this is well after the grace.
    pump.core.packet_authenticated(RELAY_ADDR, pump.now)
    pump._drain()
    change = pump.of(RouteChanged)[-1][1]
    assert change == RouteChanged(RELAY, RELAY_ADDR, "the peer went back to the relay")
    assert (pump.now, SendPing(reset_backoff=True)) in pump.events


def test_relay_stragglers_right_after_the_switch_do_not_move_the_session():
    pump = direct_pump()
    pump.now += PEER_SWITCH_GRACE / 2
    pump.core.packet_authenticated(RELAY_ADDR, pump.now)
    pump._drain()
    # ... nor relay packets while the direct route is carrying packets.
    pump.run(pump.now + 3.0, every=0.05, action=pump.send_data)
    pump.core.packet_authenticated(RELAY_ADDR, pump.now)
    pump._drain()
    assert pump.core.route == DIRECT and pump.core.failovers == []


def test_packets_acknowledged_by_the_relay_just_after_the_switch_leave_nothing_waiting():
    core = SessionCore(SID, RELAY_ADDR, 0.0, controlling=True)
    core.handshake_completed(0.0)
    core.transport_state(True, 0.02, 1.0)  # data in flight over the relay
    core.punch_succeeded(PEER, 1.0)
    core.transport_state(True, 0.02, 1.0)
    core.packet_authenticated(RELAY_ADDR, 1.02)  # the peer has not switched yet
    core.transport_state(False, 0.02, 1.02)  # everything acknowledged
    assert core.next_timer() == 2.0  # the next keepalive, not a failover at 1.5
    core.handle_timer(1.6)
    assert core.route == DIRECT


def test_losing_the_relay_ends_relayed_sessions_and_a_later_failover():
    relayed = Pump()
    relayed.core.relay_available(False, 1.0, "intermediate connection lost")
    assert relayed.core.next_event() == Closed("intermediate connection lost")
    pump = direct_pump()
    pump.core.relay_available(False, pump.now)
    pump.run(pump.now + 5.0, every=0.1, action=pump.send_data)
    assert not pump.core.closed  # a direct session carries on without the intermediate
    pump.cut.add(DIRECT)
    pump.run(pump.now + 5.0, every=0.1, action=pump.send_data)
    reason = pump.of(Closed)[0][1].reason
    assert reason.startswith("direct path lost while the intermediate is unreachable: "
                             "nothing heard on the direct path")


# Resumption (a new home takes the relay over) ----------------------------------------------
NEW_RELAY = ("198.51.100.2", 4478)


def test_a_relayed_session_held_for_resumption_moves_to_the_new_relay_and_goes_on():
    pump = Pump()
    pump.run(1.0, every=0.1, action=pump.send_data)
    pump.cut.add(RELAY)  # the intermediate dies: nothing relayed any more
    pump.run(3.0, every=0.1, action=pump.send_data)  # data waits, unanswered
    pump.core.relay_available(False, pump.now, "intermediate connection lost", hold=5.0)
    pump.run(6.0, every=0.1, action=pump.send_data)  # past peer_dead_after: held, not dead
    assert not pump.core.closed
    pump.cut.clear()
    pump.core.relay_moved(NEW_RELAY, pump.now)
    pump._drain()
    assert pump.of(RouteChanged)[-1][1] == RouteChanged(RELAY, NEW_RELAY, RELAY_MOVED)
    assert pump.of(SendPing)[-1][1] == SendPing(True)  # loss recovery at once
    assert pump.core.outbound(b"q")[1] == NEW_RELAY and pump.core.relay_moves == 1
    assert pump.core.relay_inbound_allowed(NEW_RELAY)
    assert not pump.core.relay_inbound_allowed(RELAY_ADDR)
    pump.run(20.0, every=0.1, action=pump.send_data)
    assert not pump.core.closed and pump.core.hold_until is None


def test_a_held_session_no_relay_takes_over_ends_when_the_hold_does():
    pump = Pump()
    pump.run(1.0)
    pump.core.relay_available(False, pump.now, "intermediate connection lost", hold=5.0)
    pump.run(5.9)
    assert not pump.core.closed
    pump.run(7.0)
    [(at, closed)] = pump.of(Closed)
    assert at == pytest.approx(6.0)
    assert closed.reason == "intermediate connection lost; no intermediate took the session over"


def test_a_direct_session_is_not_held_and_carries_on_without_the_relay():
    pump = direct_pump()
    pump.core.relay_available(False, pump.now, "intermediate connection lost", hold=5.0)
    assert pump.core.hold_until is None
    pump.run(pump.now + 20.0, every=0.1, action=pump.send_data)
    assert not pump.core.closed and pump.core.route == DIRECT
    pump.core.relay_moved(NEW_RELAY, pump.now)  # the relay for a later failover
    assert pump.core.route == DIRECT and pump.core.relay_addr == NEW_RELAY


@pytest.mark.parametrize("relay_quiet", [True, False])
def test_a_peer_silent_on_a_quiet_relay_is_given_a_little_longer(relay_quiet):
    """The peer falls silent on the relay. If the intermediate is quiet as well, the relay
    may be what died: the core waits RELAY_DOUBT_HOLD longer (for the control verdict);
    if the intermediate is heard, the peer is dead after peer_dead_after as ever."""
    pump = Pump(peer_dead_after=2.5)
    pump.run(1.0, every=0.1, action=pump.send_data)
    pump.cut.add(RELAY)
    silent_from = pump.now
    pump.core.relay_heard(silent_from if relay_quiet else 1e9)
    pump.run(10.0, every=0.1, action=pump.send_data)
    [(at, closed)] = pump.of(Closed)
    expected = silent_from + 2.5 + (RELAY_DOUBT_HOLD if relay_quiet else 0.0)
    assert at == pytest.approx(expected, abs=0.15)
    assert closed.reason == "the peer stopped answering"


def test_a_peer_homing_again_is_not_declared_dead_during_the_hold():
    pump = Pump(peer_dead_after=2.5)
    pump.run(1.0, every=0.1, action=pump.send_data)
    pump.cut.add(RELAY)  # the peer's side of the relay is gone
    pump.core.hold(pump.now + 6.0)  # SessionHeld from our intermediate
    pump.run(6.5, every=0.1, action=pump.send_data)
    assert not pump.core.closed
    pump.cut.clear()  # the peer resumed the session at our intermediate
    pump.run(20.0, every=0.1, action=pump.send_data)
    assert not pump.core.closed and pump.core.hold_until is None


def test_direct_only_session_ends_when_the_direct_route_dies():
    pump = Pump(direct_only=True)
    pump.punch()
    pump.run(3.0)
    pump.cut.add(DIRECT)
    pump.run(8.0)
    [(_, closed)] = pump.of(Closed)
    assert closed.reason.startswith("direct path lost and the relay is not allowed "
                                    "(--direct-only): ")


# Death -------------------------------------------------------------------------------------
def test_a_dead_peer_is_noticed_within_about_3_s_on_the_relay():
    pump = Pump()
    pump.run(10.0)
    pump.peer_dead = True
    died_at = pump.now
    pump.run(30.0)
    [(at, closed)] = pump.of(Closed)
    assert closed == Closed("the peer stopped answering")
    assert 2.5 <= at - died_at <= 3.6


def test_a_dead_peer_is_noticed_on_the_direct_route_after_the_failover():
    pump = direct_pump()
    pump.run(5.0, every=0.05, action=pump.send_data)
    pump.peer_dead = True
    died_at = pump.now
    pump.run(30.0, every=0.05, action=pump.send_data)  # the application keeps sending
    assert [e.route for _, e in pump.of(RouteChanged)] == [DIRECT, RELAY]
    [(at, closed)] = pump.of(Closed)
    # From the last answer, up to one sending interval before the death.
    assert closed.reason == "the peer stopped answering"
    assert 2.5 - 0.06 <= at - died_at <= 2.5 + 0.01


def test_a_slow_but_answering_peer_is_not_declared_dead():
    pump = Pump(rtt=2.0)  # every answer takes 2 s (less than peer_dead_after)
    pump.run(60.0, every=0.5, action=pump.send_data)
    assert not pump.core.closed


# Expiry ------------------------------------------------------------------------------------
def test_an_idle_session_ends_after_the_idle_timeout_with_the_reason():
    pump = Pump(idle_timeout=5.0)
    pump.run(2.0, every=0.5, action=pump.send_data)
    last = pump.core.last_activity
    pump.run(60.0)  # keepalives go on all the while, and are no activity
    [(at, closed)] = pump.of(Closed)
    assert closed == Closed("idle: no traffic for 5 s")
    assert at == pytest.approx(last + 5.0)
    assert len(pump.of(SendPing)) >= 3


def test_a_busy_session_is_never_closed_by_a_timer():
    # Ten times the idle timeout with a datagram now and then, on every route, with
    # failovers and re-punches on the way.
    pump = Pump(idle_timeout=1.0)
    pump.run(0.5, every=0.9, action=pump.send_data)
    pump.punch()
    pump.run(5.0, every=0.9, action=pump.send_data)
    pump.cut.add(DIRECT)
    pump.run(12.0, every=0.9, action=pump.send_data)
    assert not pump.core.closed and pump.core.route == RELAY and pump.of(RepunchDue)


def test_an_open_stream_keeps_a_quiet_session_open():
    pump = Pump(idle_timeout=1.0)
    pump.core.set_open_streams(1, pump.now)
    pump.run(10.0)  # ten idle timeouts with the stream open and no data
    assert not pump.core.closed
    pump.core.set_open_streams(0, pump.now)
    closed_at = pump.now
    pump.run(20.0)
    [(at, closed)] = pump.of(Closed)
    assert closed.reason == "idle: no traffic for 1 s" and at == pytest.approx(closed_at + 1)


# Re-punching -------------------------------------------------------------------------------
def test_repunch_cool_down_doubles_with_failed_attempts_and_failovers_and_is_capped():
    pump = direct_pump(repunch_cooldown=2.0, repunch_cooldown_max=30.0)
    pump.run(3.0)
    pump.cut.add(DIRECT)
    pump.run(5.0, every=0.5, action=pump.send_data)
    [(failed_at, _)] = [(at, e) for at, e in pump.of(RouteChanged) if e.route == RELAY]
    # Every attempt fails at once: the next waits twice as long, up to 30 s.
    pump.on_repunch = lambda: pump.core.punch_failed("checks failed", pump.now)
    pump.run(200.0, every=5.0, action=pump.send_data)
    dues = pump.of(RepunchDue)
    times = [failed_at] + [at for at, _ in dues]
    gaps = [round(b - a, 6) for a, b in zip(times, times[1:])]
    assert gaps[:5] == [2.0, 4.0, 8.0, 16.0, 30.0]
    assert [e.attempt for _, e in dues[:3]] == [1, 2, 3]
    # Success resets the count; the next failover within a minute of the last waits longer.
    pump.on_repunch = None
    pump.cut.discard(DIRECT)
    pump.punch()
    assert pump.core.repunch_attempts == 0
    pump.run(pump.now + 2.0, every=0.1, action=pump.send_data)
    pump.cut.add(DIRECT)
    pump.run(pump.now + 3.0, every=0.1, action=pump.send_data)
    second = [at for at, e in pump.of(RouteChanged) if e.route == RELAY][-1]
    assert pump.of(RepunchDue)[-1][0] == pytest.approx(second + 2.0)  # the first: long ago
    pump.cut.discard(DIRECT)
    pump.punch()
    pump.run(pump.now + 1.0, every=0.1, action=pump.send_data)
    pump.cut.add(DIRECT)
    pump.run(pump.now + 5.0, every=0.1, action=pump.send_data)
    third = [at for at, e in pump.of(RouteChanged) if e.route == RELAY][-1]
    assert pump.of(RepunchDue)[-1][0] == pytest.approx(third + 4.0)  # two in a minute


def test_only_the_controlling_side_repunches_and_a_punch_result_cancels_it():
    connector = direct_pump(controlling=False)
    connector.run(2.0)
    connector.cut.add(DIRECT)
    connector.run(60.0, every=0.5, action=connector.send_data)
    assert connector.core.route == RELAY and connector.of(RepunchDue) == []
    agent = direct_pump()
    agent.run(2.0)
    agent.cut.add(DIRECT)
    agent.run(3.0)
    assert agent.core.repunch_at is not None
    agent.cut.discard(DIRECT)
    agent.punch()  # the connector's offer, say, succeeded first
    agent.run(60.0)
    assert agent.of(RepunchDue) == [] and agent.core.route == DIRECT


# Nomination: the connector may go direct before the agent hears the check's answer ---------
AGENT = ("192.0.2.7", 50000)  # the agent's address as the connector sees it


class Members:
    """An agent and a connector core pumped against each other: each sends a packet every
    50 ms (and one per PING) by its route; a packet arrives rtt/2 later, straight from the
    sender's address or by the relay, and counts only if the receiver accepts its source
    (`inbound`, as the endpoint does). The agent's shell completes hole punching on
    NominationConfirmed, as Puncher.confirm_nomination does."""

    def __init__(self, rtt=0.02):
        self.now, self.rtt = 0.0, rtt
        self.agent = SessionCore(SID, RELAY_ADDR, 0.0, controlling=True)
        self.connector = SessionCore(SID, RELAY_ADDR, 0.0, controlling=False)
        self.addr = {id(self.agent): AGENT, id(self.connector): PEER}
        for core in (self.agent, self.connector):
            core.handshake_completed(0.0)
        self.in_flight = []  # (arrival, receiver, source)
        self.dropped = 0  # direct packets refused by inbound
        self.punch_done = False

    def other(self, core):
        return self.connector if core is self.agent else self.agent

    def send(self, core):
        out = core.outbound(b"packet")
        if out is not None:
            source = RELAY_ADDR if out[1] == RELAY_ADDR else self.addr[id(core)]
            self.in_flight.append((self.now + self.rtt / 2, self.other(core), source))

    def drain(self, core):
        while (event := core.next_event()) is not None:
            if isinstance(event, SendPing):
                self.send(core)
            elif isinstance(event, NominationConfirmed):
                self.punch_done = True
                core.punch_succeeded(event.addr, self.now)

    def answer_arrives(self):
        """The nominating check's answer reaches the agent (if hole punching still waits)."""
        if not self.punch_done:
            self.punch_done = True
            self.agent.punch_succeeded(PEER, self.now)
            self.drain(self.agent)

    def run(self, until, tick=0.05):
        next_tick = self.now
        while self.now < until:
            timers = [t for t in (c.next_timer() for c in (self.agent, self.connector)) if t]
            self.now = min([until, next_tick, *[at for at, _, _ in self.in_flight], *timers])
            for item in [i for i in self.in_flight if i[0] <= self.now]:
                self.in_flight.remove(item)
                _, core, source = item
                if source == RELAY_ADDR or core.inbound(source):
                    core.packet_authenticated(source, self.now)
                else:
                    self.dropped += 1
                self.drain(core)
            if self.now >= next_tick:
                next_tick += tick
                for core in (self.agent, self.connector):
                    self.send(core)
            for core in (self.agent, self.connector):
                timer = core.next_timer()
                if timer is not None and timer <= self.now:
                    core.handle_timer(self.now)
                    self.drain(core)


def test_the_agent_takes_the_pair_it_nominates_when_the_connector_sends_by_it_first():
    # The agent sends USE-CANDIDATE on a pair its check validated; the connector selects the
    # pair on it (RFC 8445 §7.3.1.5) and sends direct at once; the answer is lost in a fade
    # and its retransmission arrives 0.8 s later. The agent must neither drop the
    # connector's direct packets nor make it give the direct route up.
    members = Members()
    members.run(1.0)
    members.agent.nominating(PEER)
    members.connector.punch_succeeded(AGENT, members.now)
    members.run(1.8)
    members.answer_arrives()
    members.run(5.0)
    agent, connector = members.agent, members.connector
    assert [(route, why) for _, route, why in connector.switches] == [(DIRECT, "nominated")]
    assert [(route, why) for _, route, why in agent.switches] == [(DIRECT, "nominated")]
    assert agent.switches[0][0] <= 1.0 + 0.05 + members.rtt  # its first direct packet
    assert agent.failovers == connector.failovers == [] and members.dropped == 0
    assert agent.route == connector.route == DIRECT and agent.nominating_addr is None


def test_only_authenticated_packets_from_the_nominated_pair_complete_a_nomination():
    core = SessionCore(SID, RELAY_ADDR, 0.0, controlling=True)
    core.handshake_completed(0.0)
    assert not core.inbound(PEER)  # nothing nominated yet
    core.nominating(PEER)
    assert core.inbound(PEER) and not core.inbound(STRANGER)
    core.packet_authenticated(STRANGER, 0.1)  # (an attacker's packet would not even decrypt)
    assert core.next_event() is None and core.route == RELAY
    core.packet_authenticated(PEER, 0.2)
    assert core.next_event() == NominationConfirmed(PEER) and core.route == RELAY
    assert core.nominating_addr is None  # the shell ends punching; its result moves the route
    core.nominating(PEER)
    core.punch_failed("nomination failed", 0.3)
    assert not core.inbound(PEER)
    # The controlled side never nominates.
    connector = SessionCore(SID, RELAY_ADDR, 0.0, controlling=False)
    connector.nominating(PEER)
    assert not connector.inbound(PEER)


def test_a_punch_that_fails_before_the_session_was_ever_direct_is_not_retried():
    pump = Pump()
    pump.core.punch_failed("no direct path within 5 s", 5.0)
    pump.run(120.0, every=1.0, action=pump.send_data)
    assert pump.of(RepunchDue) == [] and pump.core.route == RELAY


def test_close_stops_timers_and_events():
    pump = direct_pump()
    pump.core.close(pump.now)
    assert pump.core.next_timer() is None and pump.core.next_event() is None
    assert pump.core.route == NONE


# A change of the node's own network ---------------------------------------------------------
def test_a_network_change_leaves_the_direct_route_at_once_and_punches_again_now():
    pump = direct_pump()
    pump.run(5.0, every=0.1, action=pump.send_data)
    repunches = []
    pump.on_repunch = lambda: repunches.append(pump.now)
    moved_at = pump.now
    pump.core.network_changed(moved_at, "this node's public address moved")
    pump._drain()
    assert pump.core.route == RELAY and pump.core.failovers == []
    assert pump.of(RouteChanged)[-1][1] == RouteChanged(RELAY, RELAY_ADDR,
                                                        "this node's public address moved")
    pump.run(moved_at + 0.01)
    assert repunches == [moved_at]  # no cool-down
    assert pump.core.network_changes == 1
    pump.punch()
    assert pump.core.route == DIRECT


def test_a_network_change_on_the_relay_brings_a_pending_repunch_forward():
    pump = direct_pump()
    pump.cut.add(DIRECT)
    pump.run(pump.now + 1.5, every=0.1, action=pump.send_data)  # failed over by timeout
    assert pump.core.route == RELAY and pump.core.repunch_at > pump.now + 0.5
    pump.core.network_changed(pump.now, "moved")
    assert pump.core.repunch_at == pump.now
    relayed = Pump(controlling=False)  # the connector never punches on its own
    relayed.core.network_changed(1.0, "moved")
    assert relayed.core.repunch_at is None and relayed.core.route == RELAY


def test_an_idle_direct_route_that_loses_a_few_answers_is_probed_again_not_abandoned():
    """On a lossy path a keepalive PING (or its ACK) is lost now and then: the core pings
    again every REPROBE_INTERVAL while nothing is heard, so three lost answers in a row
    cost nothing; a route that answers nothing still fails over on time."""
    pump = direct_pump()
    pump.run(pump.now + 2.0)  # idle: keepalives answered
    pump.lose = 3
    pump.run(pump.now + 5.0)
    assert pump.core.route == DIRECT and pump.core.failovers == []
    pings = [at for at, _ in pump.of(SendPing)]
    assert any(b - a == pytest.approx(REPROBE_INTERVAL) for a, b in zip(pings, pings[1:]))
    pump.cut.add(DIRECT)
    cut_at = pump.now
    pump.run(pump.now + 3.0)
    assert pump.core.route == RELAY
    assert pump.core.failovers[0] - cut_at <= 1.0 + 0.5 + 0.01  # keepalive + failover


def fade(pump, seconds, **run):
    """Nothing the peer sends arrives for `seconds` (a fade: one way is enough)."""
    pump.cut.add(DIRECT)
    pump.run(pump.now + seconds, **run)
    pump.cut.discard(DIRECT)


def test_a_route_that_came_back_from_a_fade_is_given_longer_before_it_fails_over():
    """Fades on both links of a path line up now and then into a silence longer than the
    failover timeout. A route that came back from a silence of 0.3 s is given FADE_MARGIN
    times that (at most twice the timeout) for FADE_MEMORY: a silence of 0.7 s a little
    later costs no switch, and a cut is still noticed within twice the timeout."""
    pump = direct_pump()
    busy = dict(every=0.01, action=pump.send_data)
    pump.run(3.0, **busy)
    fade(pump, 0.3, **busy)
    pump.run(pump.now + 10.0, **busy)
    assert pump.core.failovers == []
    fade(pump, 0.7, **busy)
    pump.run(pump.now + 5.0, **busy)
    assert pump.core.route == DIRECT and pump.core.failovers == []
    assert [e.route for _, e in pump.of(RouteChanged)] == [DIRECT]  # nominated, never left
    pump.cut.add(DIRECT)
    cut_at = pump.now
    pump.run(pump.now + 3.0, **busy)
    [at] = pump.core.failovers
    assert 1.0 - 0.011 <= at - cut_at <= 1.0 + 0.001  # min(4 x 0.3 s, 2 x 0.5 s)


def test_an_idle_route_that_fades_is_kept_and_a_cut_is_still_noticed_within_3_s():
    """Idle, the same: a lost keepalive answer and two lost re-probes (0.3 s), then fades
    that swallow everything for 0.8 s from a keepalive on: the route is kept; a cut is
    noticed a keepalive and twice the timeout later."""
    pump = direct_pump()
    pump.run(3.0)
    keepalive = pump.core.next_timer()
    pump.run(keepalive - 0.001)
    fade(pump, 0.3)
    pump.run(pump.now + 5.0)
    keepalive = pump.core.next_timer()
    pump.run(keepalive - 0.001)
    fade(pump, 0.8)
    pump.run(pump.now + 5.0)
    assert pump.core.route == DIRECT and pump.core.failovers == []
    pump.cut.add(DIRECT)
    cut_at = pump.now
    pump.run(pump.now + 5.0)
    [at] = pump.core.failovers
    assert at - cut_at <= 1.0 + 1.0 + pump.rtt < 3.0


def test_a_clean_route_fails_over_after_the_timeout_and_fades_are_forgotten():
    """A route that never faded (or not for FADE_MEMORY) is given the timeout alone: a
    silence is then no fade it came back from, and a cut costs no more than before."""
    pump = direct_pump()
    busy = dict(every=0.01, action=pump.send_data)
    pump.run(3.0, **busy)
    fade(pump, 0.3, **busy)
    pump.run(pump.now + FADE_MEMORY + 1.0, **busy)
    pump.cut.add(DIRECT)
    cut_at = pump.now
    pump.run(pump.now + 3.0, **busy)
    [at] = pump.core.failovers
    assert 0.5 - 0.011 <= at - cut_at <= 0.5 + 0.001
    assert FADE_MARGIN * 0.3 > 1.0  # the fade would have given the route twice the timeout


# Path choice by measured RTT ---------------------------------------------------------------
def rtt_pump(relay, direct, **kw):
    """A session measured on the relay for a second (a keepalive every second: samples),
    routes `relay` and `direct` seconds long."""
    pump = Pump(route_rtts={RELAY: relay, DIRECT: direct}, **kw)
    pump.run(3.0, every=0.25, action=pump.send_data)
    assert pump.core.route_rtt[RELAY] == pytest.approx(relay)
    return pump


def to_relay_for_rtt(pump):
    """Run with data until the agent leaves the direct route for the relay; when it did."""
    deadline = pump.now + RTT_WINDOW + RTT_SUSTAIN + 2.0
    while pump.core.route == DIRECT and pump.now < deadline:
        pump.run(pump.now + 0.1, every=0.1, action=pump.send_data)
    assert pump.core.route == RELAY and pump.core.rtt_moves == 1
    return pump.core.switches[-1][0]


def test_a_direct_route_much_slower_than_the_relay_is_left_for_it_and_looked_at_again():
    """A 600 ms direct path (a satellite hop) against a 40 ms relay: taken when found (one
    check is a thin verdict), left for the relay once its own samples say so, and looked at
    again by punching after RTT_RECHECK; what the peer still sends by it is accepted."""
    pump = rtt_pump(relay=0.04, direct=0.6)
    pump.punch(rtt=0.6)
    core = pump.core
    assert core.route == DIRECT
    moved_at = to_relay_for_rtt(pump)
    assert moved_at - core.switches[0][0] <= RTT_WINDOW + RTT_SUSTAIN + 1.0
    assert core.switches[-1][2] == "the relay is faster: 40 ms against 600 ms direct"
    assert core.failovers == [] and core.slower_direct == PEER
    assert core.inbound(PEER) and not core.inbound(STRANGER)
    assert core.repunch_at == pytest.approx(moved_at + RTT_RECHECK)
    core.packet_authenticated(PEER, pump.now)  # the peer's packets by it are the session's
    assert core.last_rx == pump.now


def test_routes_within_a_few_milliseconds_are_as_fast():
    """On a LAN the relay may measure 0.3 ms and the direct route 2 ms: processing time, not
    the path, so nothing moves."""
    pump = rtt_pump(relay=0.0003, direct=0.002)
    pump.punch(rtt=0.002)
    pump.run(pump.now + 20, every=0.1, action=pump.send_data)
    assert pump.core.route == DIRECT and pump.core.rtt_moves == 0


def test_a_direct_route_not_much_slower_than_the_relay_is_taken():
    """Direct is the default: 50 ms direct against a 40 ms relay is no reason to relay."""
    pump = rtt_pump(relay=0.04, direct=0.05)
    pump.punch(rtt=0.05)
    assert pump.core.route == DIRECT and pump.core.slower_direct is None


def test_only_the_agent_chooses_by_rtt_the_connector_follows_it():
    pump = rtt_pump(relay=0.04, direct=0.6, controlling=False)
    pump.punch(rtt=0.6)
    assert pump.core.route == DIRECT  # it follows the agent back when relay packets come


def test_a_direct_route_that_got_much_worse_is_left_once_sustained_then_taken_back():
    """Direct 10 ms, relay 40 ms; the direct path turns to 200 ms. The agent moves to the
    relay only when the whole RTT window and RTT_SUSTAIN say so, once; a re-check while it is
    still slow moves nothing; once it is fast again the next re-check takes it back. One
    switch per change of conditions."""
    pump = rtt_pump(relay=0.04, direct=0.01)
    pump.punch(rtt=0.01)
    core = pump.core
    rechecks = []
    pump.on_repunch = lambda: rechecks.append(pump.now)
    pump.run(pump.now + 10, every=0.1, action=pump.send_data)
    assert core.route == DIRECT and core.route_rtt[DIRECT] == pytest.approx(0.01)
    worse_at = pump.now
    pump.route_rtts[DIRECT] = 0.2
    pump.run(worse_at + RTT_WINDOW - 0.5, every=0.1, action=pump.send_data)
    assert core.route == DIRECT  # one fast sample in the window still speaks for it
    pump.run(worse_at + RTT_WINDOW + RTT_SUSTAIN + 1.0, every=0.1, action=pump.send_data)
    assert core.route == RELAY and core.rtt_moves == 1 and core.failovers == []
    moved_at, route, reason = core.switches[-1]
    assert worse_at + RTT_WINDOW + RTT_SUSTAIN - 0.5 <= moved_at
    assert reason == "the relay is faster: 40 ms against 200 ms direct"
    assert core.inbound(PEER)  # until the peer has followed
    # The first re-check finds it still slow (200 ms > 1.2 x 40 ms): no switch.
    pump.run(moved_at + RTT_RECHECK + 0.5, every=0.1, action=pump.send_data)
    assert rechecks == [pytest.approx(moved_at + RTT_RECHECK)]
    pump.punch(rtt=0.2)
    assert core.route == RELAY and len(core.switches) == 2
    assert core.repunch_at == pytest.approx(pump.now + 2 * RTT_RECHECK)  # doubled
    # Fast again: the next re-check takes it back.
    pump.route_rtts[DIRECT] = 0.01
    pump.run(pump.now + 2 * RTT_RECHECK + 0.5, every=0.1, action=pump.send_data)
    assert len(rechecks) == 2
    pump.punch(rtt=0.01)
    assert core.route == DIRECT and [route for _at, route, _why in core.switches] == [
        DIRECT, RELAY, DIRECT]


def test_hysteresis_a_route_near_the_threshold_does_not_flap():
    """Once on the relay for its RTT, direct must come within 1.2x of the relay to be taken
    back (1.3x would have been taken at first), and direct samples that cross 1.5x now and
    then (queues) never move the session: its RTT is the window's minimum."""
    pump = rtt_pump(relay=0.04, direct=0.052)
    pump.punch(rtt=0.052)
    core = pump.core
    for index in range(200):  # 20 s of samples, every third one inflated to 90 ms
        pump.route_rtts[DIRECT] = 0.09 if index % 3 == 0 else 0.052
        pump.run(pump.now + 0.1, every=0.1, action=pump.send_data)
    assert core.route == DIRECT and len(core.switches) == 1
    slow = rtt_pump(relay=0.04, direct=0.4)
    slow.punch(rtt=0.4)
    to_relay_for_rtt(slow)
    slow.punch(rtt=0.052)  # 1.3x: not enough to come back
    assert slow.core.route == RELAY and len(slow.core.switches) == 2
    slow.punch(rtt=0.045)
    assert slow.core.route == DIRECT


def test_a_network_change_forgets_what_the_routes_measured():
    pump = rtt_pump(relay=0.04, direct=0.6)
    pump.punch(rtt=0.6)
    to_relay_for_rtt(pump)
    pump.core.network_changed(pump.now, "new address")
    assert pump.core.route_rtt == {RELAY: None, DIRECT: None}
    assert pump.core.slower_direct is None
    pump.punch(rtt=0.6)  # nothing measured on the new network yet: direct is the default
    assert pump.core.route == DIRECT


def test_a_new_candidate_brings_a_relayed_sessions_next_punch_forward():
    """A port mapping that comes up after the session punched (UPnP takes seconds): the agent
    punches again now on the relay; not on a direct route, not for a route left for its RTT,
    and never at the connector."""
    pump = Pump()
    pump.run(1.0)
    pump.core.candidates_grew(pump.now)
    assert pump.core.repunch_at == pump.now
    pump.run(pump.now + 0.01)
    assert pump.of(RepunchDue)
    direct = direct_pump()
    direct.core.candidates_grew(direct.now)
    assert direct.core.repunch_at is None
    connector = Pump(controlling=False)
    connector.core.candidates_grew(connector.now)
    assert connector.core.repunch_at is None
    slow = rtt_pump(relay=0.04, direct=0.4)
    slow.punch(rtt=0.4)
    to_relay_for_rtt(slow)
    planned = slow.core.repunch_at
    slow.core.candidates_grew(slow.now)
    assert slow.core.repunch_at == planned  # the RTT re-check keeps its time


def test_a_routes_rtt_is_the_minimum_of_its_window_at_any_ack_rate():
    """The kept samples give the same minimum as all of them would, and stay few, whatever
    the ACK rate (a bulk transfer gives thousands of samples a second)."""
    import random
    from mahole.session_core import RTT_MAX_SAMPLES
    rng = random.Random(9002)
    core = SessionCore(SID, RELAY_ADDR, 0.0, controlling=True)
    core.handshake_completed(0.0)
    seen = []
    for serial in range(20000):
        now = serial * 0.001
        rtt = 0.02 + rng.random() * 0.03 + (0.05 if 8 < now < 12 else 0.0)
        core.transport_state(True, 0.03, now, (serial, rtt))
        seen.append((now, rtt))
        if serial % 997 == 0:
            window = [value for when, value in seen if when >= now - RTT_WINDOW]
            assert core.route_rtt[RELAY] == min(window)
        assert len(core._rtt_samples[RELAY]) <= RTT_MAX_SAMPLES


# Adaptive keepalive (a node's measured binding lifetime, mahole.binding_lifetime) ----------
@pytest.mark.parametrize("keepalive", [8 / 3, 10.0, 15.0])
def test_an_idle_direct_route_is_pinged_every_adapted_keepalive_and_stays_direct(keepalive):
    pump = direct_pump(idle_timeout=1000.0)
    pump.core.set_direct_keepalive(keepalive)
    start = pump.now
    pump.run(start + 300.0)  # 20 to 100 keepalives: nothing dead, nothing moved, open
    pings = [at for at, _ in pump.of(SendPing) if at > start + 1.0 + pump.rtt]
    assert all(keepalive <= b - a <= keepalive + 2 * pump.rtt for a, b in zip(pings, pings[1:]))
    assert len(pings) == pytest.approx(300 / keepalive, abs=2)
    assert [e.route for _, e in pump.of(RouteChanged)] == [DIRECT]
    assert pump.core.failovers == [] and not pump.core.closed
    # The relay keeps its own (it is also the control connection's socket).
    assert pump.core.keepalive == 1.0


def test_rarer_keepalives_still_fail_over_within_the_timeout_once_data_is_sent():
    pump = direct_pump()
    pump.core.set_direct_keepalive(15.0)
    pump.run(pump.now + 20.0)
    pump.cut.add(DIRECT)
    pump.run(pump.now + 5.0)  # idle: the cut is not seen yet (no keepalive due)
    assert pump.core.route == DIRECT
    sent_at = pump.now
    pump.send_data()  # the application writes: in-flight data drives failover
    pump.run(pump.now + 5.0)
    [(at, _)] = [(at, e) for at, e in pump.of(RouteChanged) if e.route == RELAY]
    assert at - sent_at <= 0.5 + 0.01 and not pump.core.closed


def test_an_idle_direct_cut_is_noticed_within_an_adapted_keepalive_and_the_failover():
    pump = direct_pump()
    pump.core.set_direct_keepalive(8.0)
    pump.run(pump.now + 10.0)
    pump.cut.add(DIRECT)
    cut_at = pump.now
    pump.run(cut_at + 20.0)
    [(at, _)] = [(at, e) for at, e in pump.of(RouteChanged) if e.route == RELAY]
    assert at - cut_at <= 8.0 + 0.5 + pump.rtt and not pump.core.closed


def test_a_keepalive_is_a_positive_number_of_seconds():
    with pytest.raises(ValueError):
        Pump().core.set_direct_keepalive(0)
