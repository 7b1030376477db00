"""Port prediction (mahole.ice.prediction) on a fake clock: two observations of a socket's
mappings tell a NAT that allocates in sequence, and the ports predicted from them let a node
behind a symmetric NAT reach one behind a port-restricted NAT directly, where without them
the punch ends on the relay."""

import random

import pytest

from mahole.ice import HolePunch
from mahole.ice.candidates import candidate_priority
from mahole.ice.prediction import (
    MAX_STEP,
    MappingProbe,
    predict_ports,
    predicted_candidates,
    sequential_step,
)
from mahole.wire import control, stun
from test_ice_harness import Nat, Network, events, host, srflx

APD = "address-and-port-dependent"
SERVER, ALT = ("198.51.100.7", 4478), ("198.51.100.7", 3479)
A_HOST, B_HOST = host("10.0.0.1", 5000), host("10.1.0.1", 6000)
SESSION = bytes.fromhex("0123456789abcdef")


@pytest.fixture
def make_scheduler(sched):
    return sched.Scheduler


class RandomNat(Nat):
    """Symmetric, a random port per new mapping."""

    def __init__(self, public_ip, seed):
        super().__init__(public_ip, mapping=APD)
        rng = random.Random(seed)
        self._ports = iter(lambda: rng.randrange(1024, 65536), None)


def observe(probe, nat, *, other=ALT, lose=0, answer=True):
    """Pump `probe` against an intermediate at SERVER (with an observer at `other`, or none)
    through `nat`; the first `lose` requests are lost. Returns the requests sent."""
    sent, now = [], 0.0
    for _ in range(50):
        while not probe.done and (out := probe.datagrams_to_send()):
            data, dest = out[0]
            assert len(out) == 1
            sent.append((data, dest))
            if len(sent) <= lose or not answer:
                continue
            source = nat.outbound(A_HOST.addr, dest)
            request = stun.decode(data)
            extra = {"other_address": other} if other is not None and dest == SERVER else {}
            reply = stun.encode(stun.binding_success(request, source, **extra))
            if nat.inbound(source, dest) is not None:
                assert probe.receive_stun(reply, dest, now + 0.01)
                now += 0.01
        if probe.done:
            return sent
        now = probe.get_timer()
        probe.handle_timer(now)
    raise AssertionError("the probe never finished")


# --- the arithmetic --------------------------------------------------------------------------


@pytest.mark.parametrize("ports, step", [
    ([40000, 40001], 1), ([40000, 40002, 40004], 2), ([40001, 40000], -1),
    ([65534, 1024], None),  # a jump across the range is no step
    ([40000, 40000], None), ([40000, 40000 + MAX_STEP], MAX_STEP),
    ([40000, 40001 + MAX_STEP], None), ([40000, 40001, 40003], None), ([40000], None),
])
def test_sequential_step(ports, step):
    assert sequential_step(ports) == step


def test_predicted_ports_follow_the_last_one_and_wrap_among_unprivileged_ports():
    assert predict_ports(40001, 1, 3) == [40002, 40003, 40004]
    assert predict_ports(40010, -2, 2) == [40008, 40006]
    assert predict_ports(65534, 1, 3) == [65535, 1024, 1025]


def test_predicted_candidates_rank_below_the_observed_one_with_their_own_foundation():
    observed = srflx("203.0.113.1", 40001, A_HOST)
    cands = predicted_candidates(observed, [40002, 40003, 40001])
    assert [c.addr for c in cands] == [("203.0.113.1", 40002), ("203.0.113.1", 40003)]
    assert all(c.type == "srflx" and c.related_addr == A_HOST.addr for c in cands)
    # A foundation each: all are checked at once (RFC 8445 §6.1.2.6 freezes the rest of one).
    assert len({c.foundation for c in cands} | {observed.foundation}) == 3
    assert observed.priority > cands[0].priority > cands[1].priority
    assert cands[0].priority == candidate_priority("srflx", observed.local_preference - 1)
    with pytest.raises(ValueError, match="srflx"):
        predicted_candidates(A_HOST, [1])


# --- the probe ---------------------------------------------------------------------------------


def test_a_sequential_nat_is_told_and_the_next_mapping_is_among_the_predictions():
    nat = Nat("203.0.113.1", mapping=APD, first_port=40000)
    probe = MappingProbe(SERVER, 0.0)
    sent = observe(probe, nat)
    assert [dest for _, dest in sent] == [SERVER, ALT]  # one request each, no scan
    assert (probe.allocation, probe.step, probe.ports) == ("sequential", 1, [40000, 40001])
    assert probe.predict(4) == [40002, 40003, 40004, 40005]
    # The node's checks go to the peer's host candidate first, then to its srflx one.
    nat.outbound(A_HOST.addr, B_HOST.addr)
    assert nat.outbound(A_HOST.addr, ("203.0.113.2", 50000))[1] in probe.predict(4)


@pytest.mark.parametrize("seed", range(20))
def test_a_random_nat_gets_no_predictions(seed):
    probe = MappingProbe(SERVER, 0.0)
    observe(probe, RandomNat("203.0.113.1", seed))
    assert probe.allocation == "random" and probe.predict() == []


def test_an_endpoint_independent_nat_needs_no_predictions():
    probe = MappingProbe(SERVER, 0.0)
    observe(probe, Nat("203.0.113.1"))
    assert probe.allocation == "preserving" and probe.predict() == []


def test_without_an_alternate_observer_one_request_and_no_verdict():
    probe = MappingProbe(SERVER, 0.0)
    sent = observe(probe, Nat("203.0.113.1", mapping=APD), other=None)
    assert len(sent) == 1 and probe.done and probe.allocation is None and probe.predict() == []


def test_lost_requests_are_retransmitted_then_the_probe_gives_up():
    probe = MappingProbe(SERVER, 0.0, rto=0.5, tries=3)
    observe(probe, Nat("203.0.113.1", mapping=APD), lose=1)
    assert probe.allocation == "sequential"
    silent = MappingProbe(SERVER, 0.0, rto=0.5, tries=3)
    times, now = [], 0.0
    for _ in range(10):
        times += [now] * len(silent.datagrams_to_send())
        if silent.done:
            break
        now = silent.get_timer()
        silent.handle_timer(now)
    # RTO 0.5 s doubling; the probe gives up one RTO after the last try.
    assert times == [0.0, 0.5, 1.5] and now == 3.5
    assert silent.done and silent.allocation is None
    assert silent.get_timer() is None


def test_forged_and_stray_answers_do_not_count():
    probe = MappingProbe(SERVER, 0.0)
    [(data, _)] = probe.datagrams_to_send()
    request = stun.decode(data)
    other = stun.binding_request()
    # Another transaction: not the probe's.
    assert not probe.receive_stun(stun.encode(stun.binding_success(other, ("1.2.3.4", 9))),
                                  SERVER, 0.1)
    # The right transaction from elsewhere, an error, garbage: claimed, ignored.
    good = stun.encode(stun.binding_success(request, ("203.0.113.1", 40000), other_address=ALT))
    assert probe.receive_stun(good, ("192.0.2.66", 4478), 0.1)
    assert probe.receive_stun(stun.encode(stun.binding_error(request, 400)), SERVER, 0.1)
    assert probe.receive_stun(data[:8] + request.transaction_id + b"\xff" * 4, SERVER, 0.1)
    assert probe.ignored == 3 and probe.ports == []
    assert probe.receive_stun(good, SERVER, 0.1) and probe.ports == [40000]


# --- a whole punch -------------------------------------------------------------------------------


def punch(make_scheduler, predict):
    """Agent behind a symmetric NAT that allocates in sequence, connector behind a
    port-restricted one (endpoint-independent mapping, address-and-port-dependent filtering)."""
    a_nat = Nat("203.0.113.1", mapping=APD, first_port=40000)
    b_nat = Nat("203.0.113.2", first_port=50000)
    probe = MappingProbe(SERVER, 0.0)
    observe(probe, a_nat)  # the intermediate saw 40000, its second observer 40001
    observed = srflx("203.0.113.1", 40000, A_HOST)
    a_cands = [A_HOST, observed]
    if predict:
        a_cands += predicted_candidates(observed, probe.predict())
    b_cands = [B_HOST, srflx("203.0.113.2", b_nat.outbound(B_HOST.addr, SERVER)[1], B_HOST)]
    net = Network()
    sa, sb = make_scheduler(), make_scheduler()
    agent, connector = HolePunch(True, sa), HolePunch(False, sb)
    na = net.add("agent", agent, sa, [A_HOST.addr], a_nat)
    nb = net.add("connector", connector, sb, [B_HOST.addr], b_nat)
    ufrag, pwd, cands = agent.local_description(a_cands, 0.0)
    offer = control.decode(control.encode(control.CandidateOffer(
        session_id=SESSION, ufrag=ufrag, pwd=pwd, candidates=tuple(c.to_wire() for c in cands))))
    connector.remote_description(offer.ufrag, offer.pwd, offer.candidates, 0.0)
    ufrag, pwd, cands = connector.local_description(b_cands, 0.0)
    agent.remote_description(ufrag, pwd, cands, 0.0)
    net.call(na, "start")
    net.call(nb, "start")
    net.run(until=10, stop=lambda: agent.result is not None and connector.result is not None)
    return net, events(agent), events(connector)


def test_symmetric_behind_port_restricted_relays_without_predictions(make_scheduler):
    _, [a], [c] = punch(make_scheduler, predict=False)
    assert a.path == c.path == "relay"


def test_predicted_ports_take_symmetric_to_port_restricted_direct(make_scheduler):
    net, [a], [c] = punch(make_scheduler, predict=True)
    assert a.path == c.path == "direct", (a.reason, c.reason)
    assert a.elapsed < 2.0
    # The connector checked only offered addresses: the observed and predicted ones.
    offered = {("203.0.113.1", p) for p in [40000, *range(40002, 40008)]}
    sent_to = {d.dst for d in net.requests("connector")}
    assert sent_to <= offered | {A_HOST.addr}
    assert c.pair.remote.addr in offered - {("203.0.113.1", 40000)}


@pytest.mark.parametrize("other", [SERVER, ("2001:db8::7", 3479)])
def test_an_alternate_observer_that_is_no_other_observer_gets_no_request(other):
    probe = MappingProbe(SERVER, 0.0)
    sent = observe(probe, Nat("203.0.113.1", mapping=APD), other=other)
    assert len(sent) == 1 and probe.done and probe.allocation is None
