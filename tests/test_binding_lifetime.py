"""Binding lifetime discovery (mahole.binding_lifetime) against the real STUN responder
(mahole.stun_server) and a simulated NAT, on a fake clock."""

import collections

import pytest

from mahole import binding_lifetime as bl
from mahole.stun_server import MAX_DELAYED_PER_SOURCE, StunResponder
from mahole.wire import stun

TARGET = ("203.0.113.1", 3478)
PUBLIC = "198.51.100.7"


class AllowAll:
    def allow(self, host, now):
        return True


def responder(counters=None):
    return StunResponder({(0, 0): TARGET}, AllowAll(),
                         counters if counters is not None else collections.defaultdict(int))


def simulate(lifetime, delays, *, server=None, lose=(), one_way=0.01):
    """Run a probe behind a NAT whose idle mappings live `lifetime` s; `lose`: delays whose
    held answer is lost on the way. (result, seconds taken, core)."""
    server = server or responder()
    socks = [f"life{i}" for i in range(len(delays))]
    core = bl.LifetimeProbe(TARGET, socks, delays)
    last = {}  # socket -> its mapping's last packet
    inbound = []  # (at, socket, payload)
    now = 0.0
    core.start(now)
    while True:
        for sock, data, addr in core.datagrams_to_send(now):
            assert addr == TARGET
            if sock in last and now - last[sock] >= lifetime:
                del last[sock]  # expired: a new mapping (a new port, to be sure)
            last[sock] = now
            port = 40000 + socks.index(sock)
            answer = server.handle(data, (PUBLIC, port), (0, 0), now + one_way)
            if answer is not None:
                inbound.append((now + 2 * one_way, sock, answer[1]))
        for _key, payload, addr in server.delayed_due(now):
            sock = socks[addr[1] - 40000]
            inbound.append((now + one_way, sock, payload))
        due = [item for item in inbound if item[0] <= now]
        for item in due:
            inbound.remove(item)
            at, sock, payload = item
            message = stun.decode(payload)
            if "RESPONSE-DELAY" in message.attributes:
                if message.attributes["RESPONSE-DELAY"] / 1000 in lose:
                    continue
                if sock not in last or at - last[sock] >= lifetime:
                    continue  # the NAT dropped it: no mapping
            last[sock] = at
            core.datagram_received(sock, payload, TARGET, now)
        core.handle_timer(now)
        if core.done:
            break
        times = [t for t in (core.get_timer(), server.next_delayed(),
                             min((i[0] for i in inbound), default=None)) if t is not None]
        assert times, "stalled"
        now = max(now, min(times))
        assert now < 1000
    return core.result(), now, core


@pytest.mark.parametrize("lifetime, at_least, below", [
    (10.0, 8, 10), (9.5, 8, 10), (30.0, 25, 30), (60.0, 50, 60), (7.0, 6, 8)])
def test_the_lifetime_lies_between_the_longest_answered_delay_and_the_first_lost(
        lifetime, at_least, below):
    result, took, _ = simulate(lifetime, bl.FULL_DELAYS)
    assert (result.at_least, result.below, result.supported) == (at_least, below, True)
    # It ends once the first lost delay is known, not after the longest one.
    assert took < below + bl.WARM_UP + bl.GRACE + len(bl.FULL_DELAYS) * bl.STAGGER + 1


def test_a_mapping_that_never_expires_within_the_longest_delay_says_so_in_about_that_time():
    result, took, _ = simulate(1000.0, bl.QUICK_DELAYS)
    assert (result.at_least, result.below) == (25, None)
    # The longest probe goes first: the whole takes about it, not the sum of the delays.
    assert took <= max(bl.QUICK_DELAYS) + bl.WARM_UP + 1
    assert took <= 30


def test_a_lost_answer_only_makes_the_verdict_shorter():
    result, _, _ = simulate(30.0, bl.FULL_DELAYS, lose=(12,))
    assert result.at_least == 10 and result.below == 12


def test_an_observer_that_does_not_hold_answers_measures_nothing():
    class Old(StunResponder):  # an intermediate without RESPONSE-DELAY: answers at once
        def handle(self, data, addr, at, now):
            request = stun.decode(data)
            return at, stun.encode(stun.binding_success(request, addr))
    result, took, _ = simulate(10.0, bl.QUICK_DELAYS, server=Old({(0, 0): TARGET}, AllowAll(),
                                                                  collections.defaultdict(int)))
    assert result.supported is False and result.at_least is None
    assert took < 10


def test_held_answers_are_bounded_per_source_and_go_back_to_the_source_only():
    counters = collections.defaultdict(int)
    server = responder(counters)
    for i in range(MAX_DELAYED_PER_SOURCE + 5):
        request = stun.encode(stun.binding_request(response_delay=5000))
        assert server.handle(request, ("192.0.2.9", 1000 + i), (0, 0), 0.0) is None \
            or i >= MAX_DELAYED_PER_SOURCE
    assert counters["stun_delayed"] == MAX_DELAYED_PER_SOURCE
    assert counters["stun_delay_refused"] == 5  # answered at once, without the echo
    # Too long a delay is not held either.
    answer = server.handle(stun.encode(stun.binding_request(response_delay=10 ** 6)),
                           ("192.0.2.10", 1), (0, 0), 0.0)
    assert answer is not None and "RESPONSE-DELAY" not in stun.decode(answer[1]).attributes
    assert server.delayed_due(4.9) == []
    due = server.delayed_due(5.0)
    assert len(due) == MAX_DELAYED_PER_SOURCE
    assert {addr for _, _, addr in due} == {("192.0.2.9", 1000 + i)
                                            for i in range(MAX_DELAYED_PER_SOURCE)}
    assert all(stun.decode(p).attributes["RESPONSE-DELAY"] == 5000 for _, p, _ in due)
    assert server.next_delayed() is None
    # The source's budget is back once its answers went out.
    assert server.handle(stun.encode(stun.binding_request(response_delay=5000)),
                         ("192.0.2.9", 1), (0, 0), 6.0) is None


def test_an_answer_from_elsewhere_or_too_early_proves_nothing():
    core = bl.LifetimeProbe(TARGET, ["life0"], [10])
    core.start(0.0)
    [(sock, data, _)] = core.datagrams_to_send(0.0)
    warm = stun.decode(data)
    core.datagram_received("life0", stun.encode(stun.binding_success(warm, (PUBLIC, 1))),
                           TARGET, 0.05)
    assert core.datagrams_to_send(1.0) == []
    [(_, data, _)] = core.datagrams_to_send(bl.WARM_UP)
    held = stun.decode(data)
    answer = stun.encode(stun.binding_success(held, (PUBLIC, 1), response_delay=10000))
    core.datagram_received("life0", answer, ("203.0.113.66", 3478), 13.0)  # not the observer
    core.datagram_received("life0", answer, TARGET, bl.WARM_UP + 1)  # long before it is due
    core.datagram_received("life0", b"\x00garbage", TARGET, 13.0)
    assert core.ignored == 2 and core.malformed == 1 and not core.done
    core.handle_timer(bl.WARM_UP + 10 + bl.GRACE)
    assert core.done and core.result().below == 10 and core.result().at_least is None


@pytest.mark.parametrize("at_least, expected", [
    (None, 1.0), (2, 1.0), (8, 8 / 3), (30, 10.0), (75, 25.0), (120, 25.0)])
def test_the_keepalive_is_a_third_of_the_lifetime_between_the_floor_and_the_ceiling(
        at_least, expected):
    assert bl.keepalive_for(at_least, 1.0) == pytest.approx(expected)
    assert bl.keepalive_for(at_least, 1.0, ceiling=15.0) == pytest.approx(min(expected, 15.0))


def test_a_direct_route_lost_under_an_adapted_keepalive_brings_back_the_configured_one():
    from mahole.config import AgentConfig
    from mahole.roles.node import REMEASURE_AFTER, Node

    class FakeSession:
        keepalive = None

        def set_direct_keepalive(self, seconds):
            self.keepalive = seconds

    class Clock:
        t = 1000.0

        def now(self):
            return self.t

    node = object.__new__(Node)  # the keepalive part of a node, no sockets
    node.cfg = AgentConfig()
    node.endpoint = Clock()
    node.sessions = {b"s": FakeSession()}
    node.direct_keepalive = node.cfg.direct_keepalive
    node.binding_lifetime = None
    node._lifetime_task = None
    node._lifetime_started = None
    measured = []
    node._measure_lifetime = lambda: measured.append(node.endpoint.now())
    node._lifetime_started = 990.0
    node._lifetime_measured(bl.LifetimeResult(at_least=30, below=None, supported=True))
    assert node.direct_keepalive == 10.0 and node.sessions[b"s"].keepalive == 10.0
    node.direct_route_failed(1.0)  # under the configured keepalive: nothing to doubt
    assert node.direct_keepalive == 10.0 and measured == []
    node.direct_route_failed(10.0)
    assert node.direct_keepalive == 1.0 and node.sessions[b"s"].keepalive == 1.0
    assert node.binding_lifetime is None and measured == []  # measured 10 s ago: not again
    node._lifetime_measured(bl.LifetimeResult(at_least=30, below=None, supported=True))
    node.endpoint.t = 990.0 + REMEASURE_AFTER
    node.direct_route_failed(10.0)
    assert node.direct_keepalive == 1.0 and measured == [990.0 + REMEASURE_AFTER]


def test_a_new_public_address_brings_back_the_configured_keepalive_and_measures_again():
    import collections as c

    from mahole.config import AgentConfig
    from mahole.roles.node import Node

    class FakeSession:
        keepalive = None
        changed = 0

        def set_direct_keepalive(self, seconds):
            self.keepalive = seconds

        def network_changed(self, reason):
            self.changed += 1

    node = object.__new__(Node)
    node.cfg = AgentConfig()
    node.sessions = {b"s": FakeSession()}
    node.direct_keepalive = 10.0
    node.binding_lifetime = bl.LifetimeResult(at_least=30, supported=True)
    node._lifetime_task = None
    node._move_pending = False
    node.port_mapping = None
    node.network_changes = c.Counter()
    node.network_log = c.deque(maxlen=5)
    measured = []
    node._measure_lifetime = lambda: measured.append(True)
    node.network_changed("this node's public address moved")
    assert node.direct_keepalive == 1.0 and node.sessions[b"s"].keepalive == 1.0
    assert node.binding_lifetime is None and measured == [True]
    assert node.sessions[b"s"].changed == 1
