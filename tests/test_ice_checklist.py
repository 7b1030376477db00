"""The check list (RFC 8445 §6-§8) driven by a fake clock over an in-memory network."""

import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mahole._fast import Scheduler
from mahole.ice.candidates import Candidate, candidate_priority, pair_priority
from mahole.ice.checklist import (
    PAIR_TRANSITIONS,
    CheckList,
    ChecksFailed,
    PairEvent,
    PairNominated,
    PairState,
    PairSucceeded,
    TransitionError,
    next_pair_state,
)
from mahole.wire import stun

from test_ice_harness import (
    Nat,
    Network,
    Responder,
    events,
    host,
    srflx,
)


@pytest.fixture
def make_scheduler(sched):
    """Node schedulers of each implementation (compiled and pure Python)."""
    return sched.Scheduler


UFRAG_A, PWD_A = "AAAA", "a" * 22
UFRAG_B, PWD_B = "BBBB", "b" * 22
TB_HIGH, TB_LOW = 0xF000_0000_0000_0000, 0x0F00_0000_0000_0000

A4 = host("192.0.2.1", 5000)
B4 = host("198.51.100.2", 6000)


def agent_a(local, remote, scheduler, controlling=True, tie_breaker=TB_HIGH, **options):
    return CheckList(controlling, tie_breaker, UFRAG_A, PWD_A, UFRAG_B, PWD_B, local, remote,
                     scheduler, **options)


def agent_b(local, remote, scheduler, controlling=False, tie_breaker=TB_LOW, **options):
    return CheckList(controlling, tie_breaker, UFRAG_B, PWD_B, UFRAG_A, PWD_A, local, remote,
                     scheduler, **options)


def two_agents(make_scheduler, a_local, b_local, *, a_addrs=None, b_addrs=None, a_nat=None,
               b_nat=None, a_remote=None, b_remote=None, a_controlling=True, b_controlling=False,
               a_tb=TB_HIGH, b_tb=TB_LOW, latency=0.010, **options):
    net = Network(latency=latency)
    sa, sb = make_scheduler(), make_scheduler()
    a = agent_a(a_local, b_local if a_remote is None else a_remote, sa, a_controlling, a_tb, **options)
    b = agent_b(b_local, a_local if b_remote is None else b_remote, sb, b_controlling, b_tb, **options)
    na = net.add("a", a, sa, a_addrs or [c.addr for c in a_local if c.type == "host"], a_nat)
    nb = net.add("b", b, sb, b_addrs or [c.addr for c in b_local if c.type == "host"], b_nat)
    return net, a, b, na, nb


def start(net, *nodes):
    for node in nodes:
        net.call(node, "start")


def both_done(a, b):
    return lambda: a.state != "running" and b.state != "running"


def assert_same_selected_pair(a, b):
    assert a.state == b.state == "completed"
    assert a.selected is not None and b.selected is not None
    assert a.selected.nominated and b.selected.nominated
    # Each side's local address, as the other sees it, is the other's remote address.
    assert a.selected.local.addr == b.selected.remote.addr
    assert a.selected.remote.addr == b.selected.local.addr


def alone(make_scheduler, local, remote, **options):
    """One check list on a network where nothing answers."""
    net = Network()
    s = make_scheduler()
    a = agent_a(local, remote, s, **options)
    node = net.add("a", a, s, [c.addr for c in local if c.type == "host"])
    return net, a, node


# --- the transition table ----------------------------------------------------------------


def test_pair_transition_table_is_the_rfc_state_machine():
    S = PairState
    assert next_pair_state(S.FROZEN, PairEvent.UNFREEZE) is S.WAITING
    assert next_pair_state(S.WAITING, PairEvent.SEND) is S.IN_PROGRESS
    assert next_pair_state(S.IN_PROGRESS, PairEvent.SUCCEED) is S.SUCCEEDED
    assert next_pair_state(S.IN_PROGRESS, PairEvent.FAIL) is S.FAILED
    assert next_pair_state(S.FAILED, PairEvent.TRIGGER) is S.WAITING
    assert next_pair_state(S.IN_PROGRESS, PairEvent.TRIGGER) is S.WAITING


def test_impossible_pair_transitions_raise():
    impossible = [(s, e) for s in PairState for e in PairEvent if (s, e) not in PAIR_TRANSITIONS]
    assert (PairState.SUCCEEDED, PairEvent.SEND) in impossible
    assert (PairState.FROZEN, PairEvent.SEND) in impossible
    for state, event in impossible:
        with pytest.raises(TransitionError, match=f"a {state.value} candidate pair cannot {event.value}"):
            next_pair_state(state, event)


# --- pair formation (§6.1.2) -------------------------------------------------------------


def test_pairs_formed_by_family_with_srflx_replaced_and_pruned(make_scheduler):
    a6 = host("2001:db8::1", 5000, 65535)
    a4 = host("192.0.2.1", 5000, 65534)
    a_srflx = srflx("203.0.113.1", 40000, a4)
    a_relay = Candidate(foundation="rel", priority=candidate_priority("relay"), addr=("198.51.100.9", 443), type="relay")
    b6 = host("2001:db8::2", 6000, 65535)
    b4 = host("198.51.100.2", 6000, 65534)
    b_srflx = srflx("203.0.113.2", 41000, b4)
    b_relay = Candidate(foundation="rel2", priority=candidate_priority("relay"), addr=("198.51.100.9", 444), type="relay")
    a = agent_a([a6, a4, a_srflx, a_relay], [b6, b4, b_srflx, b_relay], make_scheduler())
    got = [(p.local.addr, p.remote.addr) for p in a.pairs]
    assert got == [
        (a6.addr, b6.addr),
        (a4.addr, b4.addr),
        (a4.addr, b_srflx.addr),
    ]  # no v4/v6 mixes, the local srflx became its base (pruned as redundant), no relay pairs
    for pair in a.pairs:  # controlling: G is the local priority (§6.1.2.3)
        assert pair.priority == pair_priority(pair.local.priority, pair.remote.priority)
    b = agent_b([b6, b4, b_srflx], [a6, a4, a_srflx], make_scheduler())
    for pair in b.pairs:  # controlled: G is the remote priority
        assert pair.priority == pair_priority(pair.remote.priority, pair.local.priority)
    assert [p.priority for p in a.pairs] == sorted((p.priority for p in a.pairs), reverse=True)


def test_link_local_pairs_only_with_link_local_and_cap(make_scheduler):
    ll = host("fe80::1", 5000, 65000)
    glob = host("2001:db8::1", 5000, 65535)
    remote = [host("fe80::2", 6000, 65000), host("2001:db8::2", 6000)] + [
        host(f"2001:db8::{i}", 6000, 60000 - i) for i in range(3, 9)]
    a = agent_a([glob, ll], remote, make_scheduler())
    for pair in a.pairs:
        assert pair.local.addr[0].startswith("fe80") == pair.remote.addr[0].startswith("fe80")
    assert len(a.pairs) == 8
    capped = agent_a([glob, ll], remote, make_scheduler(), max_pairs=3)
    assert [p.key for p in capped.pairs] == [p.key for p in a.pairs[:3]]


def test_no_pairs_fails_at_start(make_scheduler):
    a = agent_a([A4], [host("2001:db8::2", 6000)], make_scheduler())
    a.start(0.0)
    assert a.state == "failed"
    assert events(a) == [ChecksFailed("no candidate pairs (no local and remote candidates of the same family)")]


# --- the requests on the wire (§7.2.2) ---------------------------------------------------


def test_check_request_and_response_attributes(make_scheduler):
    s = make_scheduler()
    a = agent_a([host("192.0.2.1", 5000, 65000)], [B4], s)
    a.start(0.0)
    [(data, dst)] = a.datagrams_to_send()
    assert dst == B4.addr
    with pytest.raises(ValueError):
        stun.decode(data, integrity_key=PWD_A.encode())  # signed with the remote password
    request = stun.decode(data, integrity_key=PWD_B.encode())
    assert request.message_class == stun.CLASS_REQUEST
    attrs = request.attributes
    assert attrs["USERNAME"] == "BBBB:AAAA"
    assert attrs["PRIORITY"] == candidate_priority("prflx", 65000)  # §7.1.1: prflx of the base
    assert attrs["ICE-CONTROLLING"] == TB_HIGH and "ICE-CONTROLLED" not in attrs
    assert "USE-CANDIDATE" not in attrs and "FINGERPRINT" in attrs

    # The controlled side answers with XOR-MAPPED-ADDRESS = source, signed with its password.
    b = agent_b([B4], [A4], make_scheduler())
    assert b.receive_stun(data, ("203.0.113.7", 1234), 0.01)
    responses = b.datagrams_to_send()
    response_data, to = responses[0]
    assert to == ("203.0.113.7", 1234)
    response = stun.decode(response_data, integrity_key=PWD_B.encode())
    assert response.message_class == stun.CLASS_SUCCESS
    assert response.transaction_id == request.transaction_id
    assert response.attributes["XOR-MAPPED-ADDRESS"] == ("203.0.113.7", 1234)


def test_unknown_comprehension_required_attribute_gets_420(make_scheduler):
    b = agent_b([B4], [A4], make_scheduler())
    request = stun.binding_request(username="BBBB:AAAA", priority=1, ice_controlling=5)
    request.attributes[0x7F00] = b"?"
    assert b.receive_stun(stun.encode(request, integrity_key=PWD_B.encode()), A4.addr, 0.0)
    [(data, _)] = b.datagrams_to_send()
    error = stun.decode(data, integrity_key=PWD_B.encode())
    assert error.attributes["ERROR-CODE"][0] == 420
    assert error.attributes["UNKNOWN-ATTRIBUTES"] == (0x7F00,)


# --- pacing (Ta = 20 ms, node-wide) ------------------------------------------------------


def unreachable(n, port=7000):
    return [host(f"198.51.100.{10 + i}", port, 65535 - i) for i in range(n)]


def test_one_new_check_every_20_ms(make_scheduler):
    remote = unreachable(6)
    net, a, node = alone(make_scheduler, [A4], remote)
    start(net, node)
    assert node.scheduler.deadline(a) == pytest.approx(0.020)  # asks to be woken at the slot
    net.run(until=0.5)
    first = net.new_requests("a")
    assert [d.dst for d in first] == [c.addr for c in remote]  # priority order
    times = [d.sent_at for d in first]
    assert times == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08, 0.10], abs=1e-9)
    # Retransmissions are not paced: the first one goes at 100 ms even though a new check
    # also went out then.
    retransmitted = [d.sent_at for d in net.requests("a") if d.data[8:20] == first[0].data[8:20]]
    assert retransmitted[:2] == pytest.approx([0.0, 0.1])


def test_pacing_is_shared_by_all_check_lists_of_a_node(make_scheduler):
    net = Network()
    shared = make_scheduler()
    first = agent_a([A4], unreachable(4, 7000), shared)
    second = agent_a([A4], unreachable(4, 7001), shared)
    n1 = net.add("one", first, shared, [A4.addr])
    n2 = net.add("two", second, Scheduler(), [A4.addr])  # timers come via `shared`
    start(net, n1, n2)
    net.run(until=0.3)
    times = sorted(d.sent_at for name in ("one", "two") for d in net.new_requests(name))
    assert len(times) == 8
    assert times == pytest.approx([0.02 * i for i in range(8)], abs=1e-9)


# --- retransmission (RTO 100 ms doubling, 5 tries) ---------------------------------------


def test_backoff_100_200_400_800_1600_then_the_pair_fails(make_scheduler):
    net, a, node = alone(make_scheduler, [A4], [B4])
    start(net, node)
    net.run(until=3.0999)
    assert a.state == "running" and a.pairs[0].state is PairState.IN_PROGRESS
    assert [d.sent_at for d in net.requests("a")] == pytest.approx([0.0, 0.1, 0.3, 0.7, 1.5], abs=1e-9)
    assert len({d.data for d in net.requests("a")}) == 1  # retransmissions are identical
    net.run(until=10, stop=lambda: a.state != "running")
    assert net.now == pytest.approx(3.1)  # 100+200+400+800+1600 ms after the first send
    net.run(until=10)
    assert len(net.requests("a")) == 5  # nothing more after the failure
    assert a.pairs[0].state is PairState.FAILED
    assert a.state == "failed"
    assert events(a) == [ChecksFailed("all candidate pairs failed")]
    assert a.counters["retransmissions"] == 4 and a.counters["timeouts"] == 1
    assert node.scheduler.deadline(a) is None


def test_backoff_is_settable(make_scheduler):
    net, a, node = alone(make_scheduler, [A4], [B4], rto=0.05, max_tries=3)
    start(net, node)
    net.run(until=10, stop=lambda: a.state != "running")
    assert [d.sent_at for d in net.requests("a")] == pytest.approx([0.0, 0.05, 0.15], abs=1e-9)
    assert net.now == pytest.approx(0.35)
    assert a.state == "failed"


# --- foundations: initial states and unfreezing (§6.1.2.6, §6.1.4.2, §7.2.5.3.3) --------------


L1 = host("192.0.2.1", 5000, 65535, fnd="L1")
L2 = host("192.0.2.2", 5000, 65534, fnd="L2")
R1 = host("198.51.100.1", 6000, 65535, fnd="R")  # one peer socket address family, two ports:
R2 = host("198.51.100.1", 6001, 65534, fnd="R")  # same type and IP, so the same foundation


def test_initial_states_one_waiting_pair_per_foundation(make_scheduler):
    a = agent_a([L1, L2], [R1, R2], make_scheduler())
    assert [(p.local.foundation, p.remote.addr[1]) for p in a.pairs] == [
        ("L1", 6000), ("L1", 6001), ("L2", 6000), ("L2", 6001)]
    assert all(p.state is PairState.FROZEN for p in a.pairs)
    a.start(0.0)
    assert [p.state for p in a.pairs] == [PairState.IN_PROGRESS, PairState.FROZEN,
                                          PairState.WAITING, PairState.FROZEN]


def test_frozen_pairs_wait_for_their_foundation_then_unfreeze_on_failure(make_scheduler):
    net, a, node = alone(make_scheduler, [L1, L2], [R1, R2])
    start(net, node)
    net.run(until=10)
    sent = [(round(d.sent_at, 6), d.dst) for d in net.new_requests("a")]
    # (L1,R1) and (L2,R1) first; the frozen (L1,R2)/(L2,R2) only once their foundation has no
    # pair Waiting or In-Progress (§6.1.4.2), i.e. when the first checks fail at 3.1/3.12 s.
    assert sent == [(0.0, R1.addr), (0.02, R1.addr), (3.1, R2.addr), (3.12, R2.addr)]


def test_success_unfreezes_pairs_of_the_same_foundation(make_scheduler):
    net = Network()
    s = make_scheduler()
    a = agent_a([L1, L2], [R1, R2], s, controlling=False)  # controlled: checks every pair
    node = net.add("a", a, s, [L1.addr])
    net.add("b", Responder(UFRAG_B, PWD_B), Scheduler(), [R1.addr, R2.addr])
    start(net, node)
    net.run(until=0.0201, stop=lambda: a.pairs[0].state is PairState.SUCCEEDED)
    by_name = {(p.local.foundation, p.remote.addr[1]): p for p in a.pairs}
    l1r1, l1r2, l2r2 = by_name["L1", 6000], by_name["L1", 6001], by_name["L2", 6001]
    assert l1r1.state is PairState.SUCCEEDED
    assert l1r2.state is PairState.WAITING  # unfrozen by its foundation's success
    assert l2r2.state is PairState.FROZEN  # another foundation: still frozen
    net.run(until=0.5)
    sent = [(round(d.sent_at, 6), d.dst) for d in net.new_requests("a")]
    # Controlled, so (L2,R1) outranks (L1,R2) (§6.1.2.3: G is R1's priority); (L2,R2) goes
    # only once (L2,R1) succeeded and unfroze it.
    assert sent == [(0.0, R1.addr), (0.02, R1.addr), (0.04, R2.addr), (0.06, R2.addr)]
    assert all(p.state is PairState.SUCCEEDED for p in a.pairs)


# --- triggered checks (§7.3.1.4) ---------------------------------------------------------


def test_triggered_check_goes_before_ordinary_checks(make_scheduler):
    bad = unreachable(4)  # higher priority than the real peer address
    b_low = host("198.51.100.2", 6000, 100)
    net, a, b, na, nb = two_agents(make_scheduler, [A4], [b_low], a_remote=bad + [b_low])
    start(net, na, nb)
    net.run(until=0.0201)
    dsts = [d.dst for d in net.new_requests("a")]
    # t=0 ordinary check to bad[0]; B's request arrives at 10 ms; the 20 ms slot goes to the
    # triggered check back to B, not to bad[1].
    assert dsts == [bad[0].addr, b_low.addr]
    assert a.counters["triggered_checks"] == 1
    net.run(until=2, stop=both_done(a, b))
    assert_same_selected_pair(a, b)


def test_incoming_check_while_in_progress_cancels_and_retriggers(make_scheduler):
    s = make_scheduler()
    a = agent_a([A4], [B4], s, controlling=False, tie_breaker=TB_LOW)
    a.start(0.0)
    [(request, _)] = a.datagrams_to_send()
    pair = a.pairs[0]
    assert pair.state is PairState.IN_PROGRESS
    incoming = stun.binding_request(username="AAAA:BBBB", priority=5, ice_controlling=TB_HIGH)
    assert a.receive_stun(stun.encode(incoming, integrity_key=PWD_A.encode()), B4.addr, 0.01)
    assert pair.state is PairState.WAITING  # cancelled, queued as a triggered check
    # The cancelled transaction's response still counts (§7.3.1.4).
    old = stun.decode(request)
    response = stun.encode(stun.binding_success(old, A4.addr), integrity_key=PWD_B.encode())
    assert a.receive_stun(response, B4.addr, 0.015)
    assert pair.state is PairState.SUCCEEDED
    assert a.counters["triggered_checks"] == 0  # the success emptied the queue


# --- peer-reflexive candidates (§7.3.1.3, §7.2.5.3.1) -----------------------------------------


def test_peer_reflexive_both_directions_through_a_port_rewriting_nat(make_scheduler):
    a_private = host("10.0.0.1", 5000)  # behind a NAT; its srflx is NOT signalled
    net, a, b, na, nb = two_agents(make_scheduler, [a_private], [B4],
                                   a_nat=Nat("203.0.113.1", first_port=40000))
    start(net, na, nb)
    net.run(until=5, stop=both_done(a, b))
    public = ("203.0.113.1", 40000)
    # B learnt A's public address from the source of A's request: a remote prflx candidate with
    # the request's PRIORITY (§7.3.1.3).
    [remote_prflx] = [c for c in b.remote_candidates if c.type == "prflx"]
    assert remote_prflx.addr == public
    assert remote_prflx.priority == candidate_priority("prflx", 65535)
    # A learnt it from XOR-MAPPED-ADDRESS: a local prflx candidate based on its host (§7.2.5.3.1).
    [local_prflx] = [c for c in a.local_candidates if c.type == "prflx"]
    assert local_prflx.addr == public and local_prflx.related_addr == a_private.addr
    assert local_prflx.priority == candidate_priority("prflx", 65535)
    assert a.counters["prflx_local"] == 1 and b.counters["prflx_remote"] == 1
    assert_same_selected_pair(a, b)
    assert a.selected.local is local_prflx and b.selected.remote is remote_prflx


def test_hole_punching_between_two_nats_with_signalled_srflx(make_scheduler):
    a_host, b_host = host("10.0.0.1", 5000), host("10.1.0.1", 6000)
    a_nat, b_nat = Nat("203.0.113.1", first_port=40000), Nat("203.0.113.2", first_port=50000)
    a_cands = [a_host, srflx("203.0.113.1", 40000, a_host)]
    b_cands = [b_host, srflx("203.0.113.2", 50000, b_host)]
    net, a, b, na, nb = two_agents(make_scheduler, a_cands, b_cands, a_nat=a_nat, b_nat=b_nat)
    start(net, na, nb)
    net.run(until=5, stop=both_done(a, b))
    assert_same_selected_pair(a, b)
    assert a.selected.local.addr == ("203.0.113.1", 40000)
    assert b.selected.local.addr == ("203.0.113.2", 50000)
    assert net.now < 0.5


def test_symmetric_nats_on_both_sides_fail(make_scheduler):
    a_host, b_host = host("10.0.0.1", 5000), host("10.1.0.1", 6000)
    a_nat = Nat("203.0.113.1", mapping="address-and-port-dependent", first_port=40000)
    b_nat = Nat("203.0.113.2", mapping="address-and-port-dependent", first_port=50000)
    a_cands = [a_host, srflx("203.0.113.1", 39999, a_host)]  # what the intermediate saw
    b_cands = [b_host, srflx("203.0.113.2", 49999, b_host)]
    net, a, b, na, nb = two_agents(make_scheduler, a_cands, b_cands, a_nat=a_nat, b_nat=b_nat)
    start(net, na, nb)
    net.run(until=10, stop=both_done(a, b))
    assert a.state == b.state == "failed"
    assert isinstance(events(a)[-1], ChecksFailed)
    assert any(d.fate == "filtered" for d in net.log)


# --- authentication (§7.3, RFC 8489 §9.1) ------------------------------------------------


def checked_a(make_scheduler):
    """A (controlling) that has sent its first check to B4."""
    a = agent_a([A4], [B4], make_scheduler())
    a.start(0.0)
    [(data, _)] = a.datagrams_to_send()
    return a, stun.decode(data)


def request_to_a(username="AAAA:BBBB", key=PWD_A, **attrs):
    attrs.setdefault("priority", candidate_priority("prflx"))
    attrs.setdefault("ice_controlled", TB_LOW)
    message = stun.binding_request(username=username, **attrs)
    return stun.encode(message, integrity_key=key.encode())


def test_request_with_wrong_password_is_ignored_and_counted(make_scheduler):
    a, _ = checked_a(make_scheduler)
    assert a.receive_stun(request_to_a(key="x" * 22), B4.addr, 0.01) is True
    assert a.counters["integrity_failures"] == 1
    assert a.datagrams_to_send() == []  # no answer
    assert a.counters["requests_received"] == 0


def test_request_with_wrong_username_is_ignored(make_scheduler):
    a, _ = checked_a(make_scheduler)
    assert a.receive_stun(request_to_a(username="AAAA:CCCC"), B4.addr, 0.01) is True
    assert a.counters["wrong_username"] == 1
    # Not our ufrag at all: not this check list's (another session may own it), not counted.
    assert a.receive_stun(request_to_a(username="ZZZZ:BBBB"), B4.addr, 0.01) is False
    assert a.receive_stun(request_to_a(username=None), B4.addr, 0.01) is False
    assert a.datagrams_to_send() == []
    assert a.counters["wrong_username"] == 1 and a.counters["requests_received"] == 0


def test_tampered_requests_are_ignored(make_scheduler):
    a, _ = checked_a(make_scheduler)
    data = bytearray(request_to_a())
    data[30] ^= 0x01  # inside USERNAME: the FINGERPRINT no longer matches
    assert a.receive_stun(bytes(data), B4.addr, 0.01) is False
    assert a.counters["malformed"] == 1
    # Tampered, with the FINGERPRINT recomputed: MESSAGE-INTEGRITY still catches it.
    body = bytes(data[:-8])
    fixed = body + data[-8:-4] + (zlib.crc32(body) ^ 0x5354554E).to_bytes(4, "big")
    assert a.receive_stun(fixed, B4.addr, 0.01) is True
    assert a.counters["integrity_failures"] == 1
    assert a.receive_stun(b"\x00\x01 not stun", B4.addr, 0.01) is False
    assert a.counters["malformed"] == 2
    assert a.datagrams_to_send() == []


def test_request_without_priority_or_role_is_ignored(make_scheduler):
    a, _ = checked_a(make_scheduler)
    no_role = stun.encode(stun.binding_request(username="AAAA:BBBB", priority=1), integrity_key=PWD_A.encode())
    assert a.receive_stun(no_role, B4.addr, 0.01)
    assert a.receive_stun(request_to_a(priority=None), B4.addr, 0.01)
    assert a.counters["bad_requests"] == 2 and a.datagrams_to_send() == []


def test_forged_response_is_ignored_and_the_real_one_still_counts(make_scheduler):
    a, request = checked_a(make_scheduler)
    forged = stun.encode(stun.binding_success(request, ("6.6.6.6", 6)), integrity_key=b"guess" * 5)
    assert a.receive_stun(forged, B4.addr, 0.01) is True
    assert a.counters["integrity_failures"] == 1
    assert a.pairs[0].state is PairState.IN_PROGRESS
    forged_error = stun.encode(stun.binding_error(request, 400, "no"), integrity_key=b"guess" * 5)
    assert a.receive_stun(forged_error, B4.addr, 0.01) is True
    assert a.pairs[0].state is PairState.IN_PROGRESS
    real = stun.encode(stun.binding_success(request, A4.addr), integrity_key=PWD_B.encode())
    assert a.receive_stun(real, B4.addr, 0.02) is True
    assert a.pairs[0].state is PairState.SUCCEEDED
    assert a.receive_stun(real, B4.addr, 0.03) is True  # a duplicate: stale, harmless
    assert a.counters["stale_responses"] == 1
    unknown = stun.encode(stun.binding_success(stun.binding_request(), A4.addr), integrity_key=PWD_B.encode())
    assert a.receive_stun(unknown, B4.addr, 0.03) is False  # not one of our transactions


def test_response_from_another_address_fails_the_check(make_scheduler):
    a, request = checked_a(make_scheduler)
    real = stun.encode(stun.binding_success(request, A4.addr), integrity_key=PWD_B.encode())
    assert a.receive_stun(real, ("198.51.100.99", 6000), 0.02) is True  # §7.2.5.2.1
    assert a.pairs[0].state is PairState.FAILED
    assert a.counters["wrong_source"] == 1
    assert a.state == "failed"


def test_error_response_fails_the_check(make_scheduler):
    a, request = checked_a(make_scheduler)
    error = stun.encode(stun.binding_error(request, 400, "Bad Request"), integrity_key=PWD_B.encode())
    assert a.receive_stun(error, B4.addr, 0.02)
    assert a.pairs[0].state is PairState.FAILED


def test_end_to_end_with_a_wrong_password_falls_back(make_scheduler):
    net = Network()
    sa, sb = make_scheduler(), make_scheduler()
    # Each side has the wrong password for the other: every request fails MESSAGE-INTEGRITY.
    a = CheckList(True, TB_HIGH, UFRAG_A, PWD_A, UFRAG_B, "wrong" * 5, [A4], [B4], sa)
    b = CheckList(False, TB_LOW, UFRAG_B, PWD_B, UFRAG_A, "wrong" * 5, [B4], [A4], sb)
    na, nb = net.add("a", a, sa, [A4.addr]), net.add("b", b, sb, [B4.addr])
    start(net, na, nb)
    net.run(until=10, stop=both_done(a, b))
    assert a.state == b.state == "failed"
    assert a.counters["integrity_failures"] > 0 and b.counters["integrity_failures"] > 0
    assert a.counters["responses_received"] == 0


# --- role conflicts (§7.3.1.1, §7.2.5.1) -------------------------------------------------


def test_controlling_with_larger_tie_breaker_answers_487_and_peer_switches(make_scheduler):
    a = agent_a([A4], [B4], make_scheduler(), controlling=True, tie_breaker=TB_HIGH)
    b = agent_b([B4], [A4], make_scheduler(), controlling=True, tie_breaker=TB_LOW)
    a.start(0.0)
    b.start(0.0)
    a.datagrams_to_send()
    [(b_request, _)] = b.datagrams_to_send()
    assert a.receive_stun(b_request, B4.addr, 0.01)
    [(error, _)] = a.datagrams_to_send()
    message = stun.decode(error, integrity_key=PWD_A.encode())
    assert message.message_class == stun.CLASS_ERROR and message.attributes["ERROR-CODE"][0] == 487
    assert a.controlling and a.counters["role_conflicts"] == 1
    # B gets the 487: becomes controlled, retries the pair as a triggered check (§7.2.5.1).
    assert b.receive_stun(error, A4.addr, 0.02)
    assert not b.controlling and b.counters["role_switches"] == 1
    assert b.pairs[0].priority == pair_priority(A4.priority, B4.priority)
    # The retry went out at once (the pacing slot was free), now claiming the controlled role.
    assert b.counters["triggered_checks"] == 1 and b.pairs[0].state is PairState.IN_PROGRESS
    [(retry, _)] = b.datagrams_to_send()
    assert stun.decode(retry).attributes["ICE-CONTROLLED"] == TB_LOW
    assert "ICE-CONTROLLING" not in stun.decode(retry).attributes


def test_controlling_with_smaller_tie_breaker_switches_on_request(make_scheduler):
    a = agent_a([A4], [B4], make_scheduler(), controlling=True, tie_breaker=TB_LOW)
    a.start(0.0)
    a.datagrams_to_send()
    assert a.receive_stun(request_to_a(ice_controlled=None, ice_controlling=TB_HIGH), B4.addr, 0.01)
    assert not a.controlling
    [(response, _)] = a.datagrams_to_send()[:1]
    assert stun.decode(response).message_class == stun.CLASS_SUCCESS


def test_controlled_with_larger_tie_breaker_switches_on_request(make_scheduler):
    a = agent_a([A4], [B4], make_scheduler(), controlling=False, tie_breaker=TB_HIGH)
    a.start(0.0)
    a.datagrams_to_send()
    assert a.receive_stun(request_to_a(ice_controlled=TB_LOW), B4.addr, 0.01)
    assert a.controlling
    assert a.pairs[0].priority == pair_priority(A4.priority, B4.priority)
    [(response, _)] = a.datagrams_to_send()[:1]
    assert stun.decode(response).message_class == stun.CLASS_SUCCESS


def test_controlled_with_smaller_tie_breaker_answers_487(make_scheduler):
    a = agent_a([A4], [B4], make_scheduler(), controlling=False, tie_breaker=TB_LOW)
    a.start(0.0)
    a.datagrams_to_send()
    assert a.receive_stun(request_to_a(ice_controlled=TB_HIGH), B4.addr, 0.01)
    assert not a.controlling
    [(error, _)] = a.datagrams_to_send()
    assert stun.decode(error).attributes["ERROR-CODE"][0] == 487


@pytest.mark.parametrize("both_controlling", [True, False], ids=["both-controlling", "both-controlled"])
@pytest.mark.parametrize("a_wins", [True, False], ids=["a-larger", "b-larger"])
def test_role_conflict_resolves_end_to_end(make_scheduler, both_controlling, a_wins):
    a_tb, b_tb = (TB_HIGH, TB_LOW) if a_wins else (TB_LOW, TB_HIGH)
    net, a, b, na, nb = two_agents(make_scheduler, [A4], [B4], a_controlling=both_controlling,
                                   b_controlling=both_controlling, a_tb=a_tb, b_tb=b_tb)
    start(net, na, nb)
    net.run(until=5, stop=both_done(a, b))
    assert_same_selected_pair(a, b)
    assert a.controlling is a_wins and b.controlling is not a_wins  # larger tie-breaker controls
    assert a.counters["role_conflicts"] + b.counters["role_conflicts"] >= 1


# --- nomination (§8.1.1, §7.3.1.5) -------------------------------------------------------


def test_nomination_selects_the_same_pair_on_both_sides(make_scheduler):
    a_cands = [host("2001:db8::1", 5000, 65535), host("192.0.2.1", 5000, 65534)]
    b_cands = [host("2001:db8::2", 6000, 65535), host("198.51.100.2", 6000, 65534)]
    net, a, b, na, nb = two_agents(make_scheduler, a_cands, b_cands)
    start(net, na, nb)
    net.run(until=5, stop=both_done(a, b))
    assert_same_selected_pair(a, b)
    assert a.selected.remote.addr == ("2001:db8::2", 6000)  # the highest-priority pair
    a_events, b_events = events(a), events(b)
    assert isinstance(a_events[-1], PairNominated) and a_events[-1].pair is a.selected
    assert isinstance(b_events[-1], PairNominated) and b_events[-1].pair is b.selected
    assert any(isinstance(e, PairSucceeded) for e in a_events)
    nominations = [d for d in net.requests("a") if "USE-CANDIDATE" in d.stun().attributes]
    assert len(nominations) == 1 and nominations[0].dst == ("2001:db8::2", 6000)
    assert not any("USE-CANDIDATE" in d.stun().attributes for d in net.requests("b"))
    assert a.selected.rtt == pytest.approx(0.02)
    # Done: no more checks or timers on either side.
    assert na.scheduler.next_deadline() is None and nb.scheduler.next_deadline() is None


@pytest.mark.parametrize("grace, expected", [(0.05, "198.51.100.2"), (0.5, "2001:db8::2")])
def test_nomination_grace_waits_for_better_pairs(make_scheduler, grace, expected):
    a_cands = [host("2001:db8::1", 5000, 65535), host("192.0.2.1", 5000, 65534)]
    b_cands = [host("2001:db8::2", 6000, 65535), host("198.51.100.2", 6000, 65534)]
    net, a, b, na, nb = two_agents(make_scheduler, a_cands, b_cands, nomination_grace=grace)
    # Lose every IPv6 datagram in the first 250 ms: the best pair succeeds only after a few
    # retransmissions (~0.32 s), the IPv4 one at once.
    net.drop = lambda d: ":" in d.dst[0] and d.sent_at < 0.25
    start(net, na, nb)
    net.run(until=5, stop=both_done(a, b))
    assert_same_selected_pair(a, b)
    assert a.selected.remote.addr[0] == expected


def test_use_candidate_before_the_controlled_side_succeeded(make_scheduler):
    net, a, b, na, nb = two_agents(make_scheduler, [A4], [B4])
    # Lose B's own checks for a while: A's nomination reaches B before B's pair succeeded.
    net.drop = lambda d: d.sender == "b" and d.sent_at < 0.05 and "ICE-CONTROLLED" in d.stun().attributes
    start(net, na, nb)
    net.run(until=5, stop=both_done(a, b))
    assert_same_selected_pair(a, b)
    assert b.pairs[0].nominate_on_success


def test_completed_side_still_answers_a_retransmitted_nomination(make_scheduler):
    net, a, b, na, nb = two_agents(make_scheduler, [A4], [B4])
    lost = []

    def drop(d):  # lose B's first answer to the nomination
        if d.sender == "b" and not lost and d.stun().message_class == stun.CLASS_SUCCESS \
                and b.state == "completed":
            lost.append(d)
            return True
        return False

    net.drop = drop
    start(net, na, nb)
    net.run(until=5, stop=both_done(a, b))
    assert lost and b.state == "completed"
    assert_same_selected_pair(a, b)
    assert a.counters["retransmissions"] >= 1


def test_a_packet_of_the_peer_from_the_nominated_pair_completes_the_nomination(make_scheduler):
    net, a, b, na, nb = two_agents(make_scheduler, [A4], [B4])
    # Every answer to the nomination is lost (a fade): B selected the pair on the request
    # (§7.3.1.5) and sends by it; A keeps retransmitting.
    net.drop = lambda d: (d.sender == "b" and a.nominating is not None
                          and d.stun().message_class == stun.CLASS_SUCCESS)
    start(net, na, nb)
    assert net.call(na, "confirm_nomination", B4.addr) is False  # nothing nominated yet
    net.run(until=5, stop=lambda: b.state != "running")
    net.run(until=net.now + 0.3)
    assert b.state == "completed" and a.state == "running" and a.nominating is not None
    checked_rtt = a.nominating.rtt
    # Only the nominated pair's remote address completes it.
    assert net.call(na, "confirm_nomination", ("198.51.100.99", 6000)) is False
    assert net.call(na, "confirm_nomination", B4.addr) is True
    assert_same_selected_pair(a, b)
    assert events(a)[-1] == PairNominated(a.selected, checked_rtt)
    assert a.counters["nominations_confirmed_by_peer"] == 1
    assert a.nominating is None and na.scheduler.next_deadline() is None  # no more checks
    assert net.call(na, "confirm_nomination", B4.addr) is False


def test_nomination_is_retried_on_the_same_pair_then_fails(make_scheduler):
    a6, a4 = host("2001:db8::1", 5000), host("192.0.2.1", 5000, 65000)
    b6, b4 = host("2001:db8::2", 6000), host("198.51.100.2", 6000, 65000)
    net = Network()
    s = make_scheduler()
    a = agent_a([a6, a4], [b6, b4], s, nomination_attempts=2)
    node = net.add("a", a, s, [a6.addr, a4.addr])
    net.add("b", Responder(UFRAG_B, PWD_B), Scheduler(), [b6.addr, b4.addr])
    # The peer's answers to nominations are lost: it may have selected the pair, so the
    # agent must not move on to the other valid pair.
    net.drop = lambda d: d.sender == "b" and d.dst == a6.addr and d.sent_at > 0.015
    start(net, node)
    net.run(until=20, stop=lambda: a.state != "running")
    nominations = [d for d in net.requests("a") if "USE-CANDIDATE" in d.stun().attributes]
    assert {d.dst for d in nominations} == {b6.addr}  # never the IPv4 pair
    assert len({d.data for d in nominations}) == 2  # two transactions, retransmitted
    assert a.counters["nomination_failures"] == 2
    assert a.state == "failed"
    assert events(a)[-1] == ChecksFailed(
        "nomination of [2001:db8::1]:5000 -> [2001:db8::2]:6000 failed: timeout")


# --- relay candidates and routing --------------------------------------------------------


def test_relay_candidates_are_never_checked(make_scheduler):
    relay = Candidate(foundation="rel", priority=candidate_priority("relay"), addr=("198.51.100.9", 443),
                      type="relay", related_addr=("203.0.113.5", 1))
    net, a, b, na, nb = two_agents(make_scheduler, [A4], [B4, relay], b_remote=[A4])
    start(net, na, nb)
    net.run(until=5, stop=both_done(a, b))
    assert all(d.dst != relay.addr for d in net.log)
    assert relay in a.remote_candidates  # still known, for status
    assert_same_selected_pair(a, b)


def test_receive_stun_says_whether_the_datagram_was_ours(make_scheduler):
    a, request = checked_a(make_scheduler)
    assert a.receive_stun(stun.encode(stun.binding_indication()), B4.addr, 0.0) is False
    assert a.receive_stun(request_to_a(), B4.addr, 0.01) is True
    assert a.counters["requests_received"] == 1
    status = a.status()
    assert status["role"] == "controlling" and status["pairs"][0]["state"] in ("in-progress", "waiting")


def test_a_failed_check_list_answers_nothing(make_scheduler):
    a, _ = checked_a(make_scheduler)
    a.close("deadline")
    assert a.state == "failed" and a.failure_reason == "deadline"
    assert a.receive_stun(request_to_a(), B4.addr, 0.01) is True
    assert a.datagrams_to_send() == []
    assert a.counters["ignored_after_failure"] == 1
    assert events(a) == []  # close() reports nothing: the caller decided


def test_socket_addresses_of_ipv6_sockets_are_accepted(make_scheduler):
    b = agent_b([B4], [A4], make_scheduler())
    request = stun.encode(stun.binding_request(username="BBBB:AAAA", priority=1, ice_controlling=5),
                          integrity_key=PWD_B.encode())
    assert b.receive_stun(request, ("::ffff:192.0.2.1", 5000, 0, 0), 0.0)  # AF_INET6 recvfrom
    [(response, to)] = b.datagrams_to_send()
    assert to == A4.addr  # the known remote candidate, not a new peer-reflexive one
    assert b.counters["prflx_remote"] == 0


# --- property tests: bad bytes never raise, never get an answer ----------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200))
def test_random_datagrams_are_dropped_quietly(make_scheduler, data):
    a, _ = checked_a(make_scheduler)
    a.receive_stun(data, B4.addr, 0.01)
    assert a.datagrams_to_send() == []
    assert a.pairs[0].state is PairState.IN_PROGRESS


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255),
       kind=st.sampled_from(["request", "response"]))
def test_mutated_checks_and_responses_are_dropped(make_scheduler, position, flip, kind):
    a, request = checked_a(make_scheduler)
    if kind == "request":
        good = request_to_a()
    else:
        good = stun.encode(stun.binding_success(request, A4.addr), integrity_key=PWD_B.encode())
    data = bytearray(good)
    # Any byte but the FINGERPRINT attribute's type and length: changing those turns it into
    # an unknown attribute after MESSAGE-INTEGRITY, which is ignored (RFC 8489 §14.5), leaving
    # an authentic message without a fingerprint.
    protected = [i for i in range(len(data)) if not len(data) - 8 <= i < len(data) - 4]
    data[protected[position % len(protected)]] ^= flip
    a.receive_stun(bytes(data), B4.addr, 0.01)
    assert a.datagrams_to_send() == []  # no answer to a forged request
    assert a.pairs[0].state is PairState.IN_PROGRESS  # a forged response changes nothing
    assert a.counters["requests_received"] == a.counters["responses_received"] == 0
