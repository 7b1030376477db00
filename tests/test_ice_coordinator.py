"""The per-session hole-punch coordinator: descriptions, StartPunching, result, deadline."""

import ipaddress
import json
import re

import pytest

from mahole.ice.candidates import Candidate
from mahole.ice.checklist import TransitionError
from mahole.ice.coordinator import (
    TRANSITIONS,
    HolePunch,
    HolePunchEvent,
    HolePunchResult,
    HolePunchState,
)
from mahole.wire import control, stun

import ifaddr

from mahole.ice import gather
from test_ice_harness import Firewall, Nat, Network, events, host, srflx


@pytest.fixture
def make_scheduler(sched):
    """Node schedulers of each implementation (compiled and pure Python)."""
    return sched.Scheduler


ICE_CHARS = re.compile(r"[A-Za-z0-9+/]+")
SESSION = bytes.fromhex("0123456789abcdef")
A_HOST, B_HOST = host("10.0.0.1", 5000), host("10.1.0.1", 6000)
A_CANDS = [A_HOST, srflx("203.0.113.1", 40000, A_HOST)]
B_CANDS = [B_HOST, srflx("203.0.113.2", 50000, B_HOST)]


def nodes(make_scheduler, *, a_nat=True, b_nat=True, deadline=5.0, **options):
    """Agent (controlling) and connector (controlled) behind endpoint-independent NATs."""
    net = Network()
    sa, sb = make_scheduler(), make_scheduler()
    agent = HolePunch(True, sa, deadline=deadline, **options)
    connector = HolePunch(False, sb, deadline=deadline, **options)
    na = net.add("agent", agent, sa, [A_HOST.addr], Nat("203.0.113.1", first_port=40000) if a_nat else None)
    nb = net.add("connector", connector, sb, [B_HOST.addr], Nat("203.0.113.2", first_port=50000) if b_nat else None)
    return net, agent, connector, na, nb


def signal(agent, connector, now=0.0, a_cands=A_CANDS, b_cands=B_CANDS):
    """Offer/answer through real control messages, as the intermediate forwards them."""
    ufrag, pwd, cands = agent.local_description(a_cands, now)
    offer = control.decode(control.encode(control.CandidateOffer(
        session_id=SESSION, ufrag=ufrag, pwd=pwd, candidates=tuple(c.to_wire() for c in cands))))
    connector.remote_description(offer.ufrag, offer.pwd, offer.candidates, now)
    ufrag, pwd, cands = connector.local_description(b_cands, now)
    answer = control.decode(control.encode(control.CandidateAnswer(
        session_id=SESSION, ufrag=ufrag, pwd=pwd, candidates=tuple(c.to_wire() for c in cands))))
    agent.remote_description(answer.ufrag, answer.pwd, answer.candidates, now)


def finished(*punches):
    return lambda: all(p.result is not None for p in punches)


# --- descriptions ------------------------------------------------------------------------


def test_local_description_makes_ice_credentials(make_scheduler):
    punch = HolePunch(True, make_scheduler())
    assert punch.state is HolePunchState.IDLE
    ufrag, pwd, cands = punch.local_description([A_HOST.to_wire()], 0.0)  # wire form accepted
    assert punch.state is HolePunchState.SIGNALING
    assert len(ufrag) >= 4 and len(pwd) >= 22  # RFC 8445 §5.3
    assert ICE_CHARS.fullmatch(ufrag) and ICE_CHARS.fullmatch(pwd)
    assert cands == (A_HOST,)
    assert 0 <= punch.tie_breaker < 2**64
    other = HolePunch(True, make_scheduler())
    assert other.local_description([], 0.0)[:2] != (ufrag, pwd)  # random per session
    control.CandidateOffer(session_id=SESSION, ufrag=ufrag, pwd=pwd, candidates=())  # valid
    with pytest.raises(TransitionError, match="signaling cannot take event gather"):
        punch.local_description([], 0.0)


def test_credentials_come_from_urandom(make_scheduler):
    punch = HolePunch(True, make_scheduler(), urandom=lambda n: bytes(n))
    assert punch.tie_breaker == 0
    assert punch.local_description([], 0.0)[:2] == ("AAAAAAAA", "A" * 24)


def test_bad_remote_descriptions_are_refused(make_scheduler):
    punch = HolePunch(True, make_scheduler())
    punch.local_description([A_HOST], 0.0)
    with pytest.raises(ValueError, match="pwd"):
        punch.remote_description("abcd", "short", [], 0.0)
    with pytest.raises(ValueError, match="ufrag"):
        punch.remote_description("ab:c", "p" * 22, [], 0.0)
    punch.remote_description("abcd", "p" * 22, [B_HOST], 0.0)
    with pytest.raises(ValueError, match="already"):
        punch.remote_description("abcd", "p" * 22, [B_HOST], 0.0)


def test_impossible_transitions_raise(make_scheduler):
    punch = HolePunch(True, make_scheduler())
    with pytest.raises(TransitionError, match="idle cannot take event start"):
        punch.start(0.0)
    assert (HolePunchState.CONNECTED, HolePunchEvent.DEADLINE) not in TRANSITIONS
    assert (HolePunchState.FAILED, HolePunchEvent.NOMINATED) not in TRANSITIONS


# --- full runs ---------------------------------------------------------------------------


def test_agent_and_connector_connect_directly(make_scheduler):
    net, agent, connector, na, nb = nodes(make_scheduler)
    signal(agent, connector)
    assert agent.state is connector.state is HolePunchState.SIGNALING
    net.call(na, "start")
    net.call(nb, "start")
    assert agent.state is HolePunchState.CHECKING
    net.run(until=10, stop=finished(agent, connector))
    assert agent.state is connector.state is HolePunchState.CONNECTED
    [a_result], [c_result] = events(agent), events(connector)
    assert a_result.path == c_result.path == "direct" and a_result.reason == "nominated"
    # The same pair seen from both ends.
    assert a_result.pair.remote.addr == c_result.pair.local.addr == ("203.0.113.2", 50000)
    assert a_result.pair.local.addr == c_result.pair.remote.addr == ("203.0.113.1", 40000)
    assert a_result.rtt == pytest.approx(0.02)
    assert 0 < a_result.elapsed < 0.5
    wire = a_result.to_wire(SESSION)
    assert wire.path == "direct" and wire.remote_addr == ("203.0.113.2", 50000)
    assert wire.rtt_ms == pytest.approx(20.0)
    assert control.decode(control.encode(wire)) == wire
    # After the result, no timers remain (the deadline was cancelled).
    net.run(until=10)
    assert na.scheduler.next_deadline() is None and nb.scheduler.next_deadline() is None
    stats = agent.stats()
    json.dumps(stats)
    assert stats["state"] == "connected" and stats["path"] == "direct"
    assert stats["selected"]["nominated"] and stats["counters"]["nominations_sent"] == 1


def test_start_before_the_remote_description_waits(make_scheduler):
    net, agent, connector, na, nb = nodes(make_scheduler)
    # The connector hears the offer before making its answer (Idle accepts a remote description).
    ufrag, pwd, cands = agent.local_description(A_CANDS, 0.0)
    connector.remote_description(ufrag, pwd, cands, 0.0)
    assert connector.state is HolePunchState.IDLE
    c_ufrag, c_pwd, c_cands = connector.local_description(B_CANDS, 0.0)
    net.call(na, "start")  # StartPunching reaches the agent before the answer
    assert agent.state is HolePunchState.WAITING_TO_START
    assert net.log == []
    net.call(nb, "start")
    net.run(until=0.2)
    assert agent.state is HolePunchState.WAITING_TO_START
    assert not [d for d in net.log if d.sender == "agent"]  # nothing answered yet
    net.call(na, "remote_description", c_ufrag, c_pwd, c_cands)
    assert agent.state is HolePunchState.CHECKING and agent.checking_at == pytest.approx(0.2)
    net.run(until=10, stop=finished(agent, connector))
    assert agent.result.path == connector.result.path == "direct"
    assert agent.result.elapsed > 0.2  # counted from start()


def test_requests_before_the_check_list_exists_are_claimed_and_counted(make_scheduler):
    punch = HolePunch(False, make_scheduler())
    assert punch.receive_stun(b"junk", ("192.0.2.9", 1), 0.0) is False
    ufrag, _, _ = punch.local_description([B_HOST], 0.0)
    request = stun.encode(stun.binding_request(username=f"{ufrag}:peer", priority=1, ice_controlling=1))
    assert punch.receive_stun(request, ("192.0.2.9", 1), 0.0) is True
    other = stun.encode(stun.binding_request(username="nope:peer", priority=1, ice_controlling=1))
    assert punch.receive_stun(other, ("192.0.2.9", 1), 0.0) is False
    assert punch.early_requests == 1 and punch.datagrams_to_send() == []


# --- falling back to the relay -----------------------------------------------------------


def test_deadline_gives_a_relay_result(make_scheduler):
    # Everything is lost, and checks would retry for longer than the deadline.
    net, agent, connector, na, nb = nodes(make_scheduler, max_tries=10)
    net.drop = lambda d: True
    signal(agent, connector)
    net.call(na, "start")
    net.call(nb, "start")
    net.run(until=4.999)
    assert agent.state is HolePunchState.CHECKING
    net.run(until=10, stop=finished(agent, connector))
    assert net.now == pytest.approx(5.0)
    assert agent.state is connector.state is HolePunchState.FAILED
    [result] = events(agent)
    assert result == HolePunchResult("relay", None, None, pytest.approx(5.0), "no direct path within 5 s")
    wire = result.to_wire(SESSION)
    assert wire.path == "relay" and wire.remote_addr is None and wire.elapsed_ms == pytest.approx(5000.0)
    sent = len(net.log)
    net.run(until=20)
    assert len(net.log) == sent  # checks stopped at the deadline
    assert na.scheduler.next_deadline() is None
    assert agent.checklist.state == "failed"


def test_deadline_is_settable_and_counts_while_waiting_to_start(make_scheduler):
    net, agent, connector, na, nb = nodes(make_scheduler, deadline=1.5)
    agent.local_description(A_CANDS, 0.0)
    net.call(na, "start")  # the answer never arrives
    net.run(until=10, stop=finished(agent))
    assert net.now == pytest.approx(1.5)
    assert agent.result.path == "relay" and agent.result.reason == "no direct path within 1.5 s"
    assert agent.state is HolePunchState.FAILED


def test_failed_checks_give_a_relay_result_before_the_deadline(make_scheduler):
    net, agent, connector, na, nb = nodes(make_scheduler)
    net.drop = lambda d: True
    signal(agent, connector)
    net.call(na, "start")
    net.call(nb, "start")
    net.run(until=10, stop=finished(agent, connector))
    assert agent.result.path == "relay"
    assert agent.result.reason == "all candidate pairs failed"
    assert agent.result.elapsed == pytest.approx(3.1 + 0.02)  # the second pair went 20 ms later
    assert agent.stats()["pair_states"] == {"failed": 2}


def test_close_abandons_with_a_relay_result(make_scheduler):
    net, agent, connector, na, nb = nodes(make_scheduler)
    signal(agent, connector)
    net.call(na, "start")
    agent.close(0.05, "session closed")
    assert agent.state is HolePunchState.FAILED
    assert events(agent) == [HolePunchResult("relay", None, None, pytest.approx(0.05), "session closed")]
    agent.close(0.06)  # idempotent once finished
    assert events(agent) == []
    assert na.scheduler.next_deadline() is None


def test_candidates_given_in_wire_form_work_end_to_end(make_scheduler):
    net, agent, connector, na, nb = nodes(make_scheduler, a_nat=False, b_nat=False)
    a_wire = [Candidate.to_wire(A_HOST)]
    b_wire = [Candidate.to_wire(B_HOST)]
    ua, pa, _ = agent.local_description(a_wire, 0.0)
    ub, pb, _ = connector.local_description(b_wire, 0.0)
    agent.remote_description(ub, pb, b_wire, 0.0)
    connector.remote_description(ua, pa, a_wire, 0.0)
    net.call(na, "start")
    net.call(nb, "start")
    net.run(until=10, stop=finished(agent, connector))
    assert agent.result.pair.remote.addr == B_HOST.addr
    assert connector.result.pair.remote.addr == A_HOST.addr


def test_a_side_that_fell_back_stops_answering_so_both_report_relay(make_scheduler):
    net = Network()
    sa, sb = make_scheduler(), make_scheduler()
    agent = HolePunch(True, sa, deadline=5.0, max_tries=20)
    connector = HolePunch(False, sb, deadline=0.5, max_tries=20)  # gives up first
    na = net.add("agent", agent, sa, [A_HOST.addr], Nat("203.0.113.1", first_port=40000))
    nb = net.add("connector", connector, sb, [B_HOST.addr], Nat("203.0.113.2", first_port=50000))
    net.drop = lambda d: d.sent_at < 0.6  # the path opens only after the connector gave up
    signal(agent, connector)
    net.call(na, "start")
    net.call(nb, "start")
    net.run(until=10, stop=finished(agent, connector))
    assert connector.result.path == "relay" and connector.result.elapsed == pytest.approx(0.5)
    assert agent.result.path == "relay"  # not "direct": the connector no longer answers
    assert connector.checklist.counters["ignored_after_failure"] > 0


@pytest.mark.parametrize("loss", [0.2, 0.4])
def test_lossy_networks_end_with_the_same_answer_on_both_sides(make_scheduler, loss):
    """Seeded random loss and latency: both sides agree on the path, and on the pair."""
    import random

    outcomes = set()
    for seed in range(25):
        rng = random.Random(seed)
        net, agent, connector, na, nb = nodes(make_scheduler)
        net.latency = rng.choice([0.001, 0.01, 0.05, 0.2])
        net.drop = lambda d: rng.random() < loss
        signal(agent, connector)
        net.call(na, "start")
        net.call(nb, "start")
        net.run(until=20, stop=finished(agent, connector))
        a, c = agent.result, connector.result
        assert a.path == c.path, (seed, a, c)
        if a.path == "direct":
            assert a.pair.local.addr == c.pair.remote.addr and a.pair.remote.addr == c.pair.local.addr
        outcomes.add(a.path)
    assert "direct" in outcomes


# --- hostile offers (RFC 8445 §19.5.1) -----------------------------------------------------


def test_a_hostile_offer_cannot_aim_checks_at_chosen_addresses(make_scheduler):
    """An 8.8 KB offer of 64 candidates, some at loopback, multicast and unspecified
    addresses: the connector keeps the 16 best usable ones and sends checks only there,
    a bounded number of them."""
    offered = [host("0.0.0.0", 9), host("127.0.0.1", 22), host("224.0.0.1", 5353),
               host("169.254.1.1", 80), host("198.51.100.1", 0), host("255.255.255.255", 7)]
    offered += [host(f"198.51.100.{i}", 1000 + i, local_pref=60000 - i) for i in range(2, 60)]
    scheduler = make_scheduler()
    connector = HolePunch(False, scheduler, max_pairs=32)
    connector.local_description(B_CANDS, 0.0)
    wire = tuple(c.to_wire() for c in offered)
    assert len(control.encode(control.CandidateOffer(
        session_id=SESSION, ufrag="abcd", pwd="a" * 22, candidates=wire))) > 5000
    connector.remote_description("abcd", "a" * 22, wire, 0.0)
    kept = {c.addr for c in connector.remote_candidates}
    assert kept == {(f"198.51.100.{i}", 1000 + i) for i in range(2, 18)}  # the best 16
    assert connector.refused_remote_candidates == 6 + (58 - 16)
    connector.start(0.0)
    sent = []
    now = 0.0
    while now < 10.0:
        sent += connector.datagrams_to_send()
        for _key in scheduler.pop_due(now):
            connector.handle_timer(now)
        now += 0.01
    sent += connector.datagrams_to_send()
    assert sent, "the connector checks the usable candidates"
    assert {addr for _data, addr in sent} <= kept
    assert len(sent) <= 32 * 5  # pairs x tries


def test_loopback_candidates_are_kept_for_a_node_on_loopback(make_scheduler):
    punch = HolePunch(False, make_scheduler(), allow_loopback=True)
    punch.local_description([host("127.0.0.2", 5000)], 0.0)
    punch.remote_description("abcd", "a" * 22, [host("127.0.0.3", 6000).to_wire()], 0.0)
    assert [c.addr for c in punch.remote_candidates] == [("127.0.0.3", 6000)]
    assert punch.refused_remote_candidates == 0


# --- dual-stack sites: IPv4 behind NATs, IPv6 routed behind stateful firewalls -------------------

INTERMEDIATE = ("203.0.113.100", 4478)
SYMMETRIC = {"mapping": "address-and-port-dependent"}
EASY = {"mapping": "endpoint-independent"}


def site_candidates(monkeypatch, port, v4=None, v6=None, nat=None):
    """What a node bound to [::]:port gathers on a site of the lab's shape: eth0 with a
    private IPv4 address behind ``nat`` and/or a global IPv6 address (and its link-local
    one), the srflx candidate the intermediate observes (over IPv4 through the NAT when
    there is IPv4, else over IPv6)."""
    ips = [ifaddr.IP(("fe80::2", 0, 2), 64, "eth0")]
    if v4:
        ips.append(ifaddr.IP(v4, 24, "eth0"))
    if v6:
        ips.append(ifaddr.IP((v6, 0, 0), 64, "eth0"))
    adapters = [ifaddr.Adapter("lo", "lo", [ifaddr.IP("127.0.0.1", 8, "lo")]),
                ifaddr.Adapter("eth0", "eth0", ips)]
    monkeypatch.setattr(ifaddr, "get_adapters", lambda: adapters)
    observed = nat.outbound((v4, port), INTERMEDIATE) if v4 else (v6, port)
    return gather(port, bound_host="::", observed_addr=observed, relay_addr=INTERMEDIATE)


def dual_stack_run(make_scheduler, monkeypatch, a_site, b_site, drop=None, stagger=0.0):
    """Agent and connector on sites given as dicts (v4, v6, nat settings); run to a result.
    The connector gets StartPunching ``stagger`` seconds after the agent."""
    net = Network()
    if drop is not None:
        net.drop = drop
    sa, sb = make_scheduler(), make_scheduler()
    agent, connector = HolePunch(True, sa), HolePunch(False, sb)
    members = []
    for name, punch, sched, site, port, public in (("agent", agent, sa, a_site, 5000, "203.0.113.3"),
                                                  ("connector", connector, sb, b_site, 6000, "203.0.113.4")):
        nat = Nat(public, first_port=port * 10, **site["nat"]) if site.get("v4") else None
        firewall = Firewall() if site.get("v6") else None
        addrs = [(ip, port) for ip in (site.get("v4"), site.get("v6")) if ip]
        members.append(net.add(name, punch, sched, addrs, nat, firewall))
        site["candidates"] = site_candidates(monkeypatch, port, site.get("v4"), site.get("v6"), nat)
    signal(agent, connector, a_cands=a_site["candidates"], b_cands=b_site["candidates"])
    net.call(members[0], "start")
    net.run(until=stagger)
    net.call(members[1], "start")
    net.run(until=10, stop=finished(agent, connector))
    return net, agent, connector, members


def version(addr):
    return ipaddress.ip_address(addr[0]).version


def test_gathering_on_a_dual_stack_site_offers_the_global_ipv6_address_first(monkeypatch):
    nat = Nat("203.0.113.3", first_port=50000)
    cands = site_candidates(monkeypatch, 5000, "10.0.1.2", "2001:db8:1::2", nat)
    assert [(c.type, c.addr) for c in cands] == [
        ("host", ("2001:db8:1::2", 5000)),  # global IPv6, best (RFC 8421)
        ("host", ("10.0.1.2", 5000)),
        ("srflx", ("203.0.113.3", 50000)),
        ("relay", INTERMEDIATE),
    ]
    assert cands[0].priority > cands[1].priority > cands[2].priority  # no link-local either


def test_two_firewalled_dual_stack_sites_go_direct_over_ipv6_behind_symmetric_nats(
        make_scheduler, monkeypatch):
    a = {"v4": "10.0.1.2", "v6": "2001:db8:1::2", "nat": SYMMETRIC}
    b = {"v4": "10.0.2.2", "v6": "2001:db8:2::2", "nat": SYMMETRIC}
    # The connector starts 30 ms late, so the agent's first IPv6 check meets a closed
    # firewall; the connector's own check then opens it (simultaneous open, as with NATs).
    net, agent, connector, (na, nb) = dual_stack_run(make_scheduler, monkeypatch, a, b,
                                                     stagger=0.03)
    assert agent.result.path == connector.result.path == "direct", agent.stats()
    assert agent.result.pair.remote.addr == ("2001:db8:2::2", 6000)
    assert connector.result.pair.remote.addr == ("2001:db8:1::2", 5000)
    assert nb.firewall.dropped >= 1
    assert agent.result.elapsed < 0.2  # no wait for a retransmission
    # IPv6 was paired with IPv6 only, IPv4 with IPv4 only.
    assert all(version(p.local.addr) == version(p.remote.addr) for p in agent.checklist.pairs)


def test_the_ipv6_pair_is_chosen_where_ipv4_works_too(make_scheduler, monkeypatch):
    a = {"v4": "10.0.1.2", "v6": "2001:db8:1::2", "nat": EASY}
    b = {"v4": "10.0.2.2", "v6": "2001:db8:2::2", "nat": EASY}
    _, agent, connector, _ = dual_stack_run(make_scheduler, monkeypatch, a, b)
    assert version(agent.result.pair.remote.addr) == 6, agent.stats()
    assert version(connector.result.pair.remote.addr) == 6
    v6_pairs = [p for p in agent.checklist.pairs if version(p.remote.addr) == 6]
    v4_pairs = [p for p in agent.checklist.pairs if version(p.remote.addr) == 4]
    assert v4_pairs and min(p.priority for p in v6_pairs) > max(p.priority for p in v4_pairs)


def test_ipv4_is_used_when_ipv6_does_not_get_through(make_scheduler, monkeypatch):
    """The same easy sites, with every IPv6 datagram lost: IPv4 still goes direct, soon."""
    a = {"v4": "10.0.1.2", "v6": "2001:db8:1::2", "nat": EASY}
    b = {"v4": "10.0.2.2", "v6": "2001:db8:2::2", "nat": EASY}
    _, agent, connector, _ = dual_stack_run(make_scheduler, monkeypatch, a, b,
                                            drop=lambda d: ":" in d.dst[0])
    assert agent.result.path == connector.result.path == "direct", agent.stats()
    assert version(agent.result.pair.remote.addr) == 4
    assert agent.result.elapsed < 0.5  # IPv4 did not wait for IPv6's checks to time out


def test_an_ipv6_only_node_and_an_ipv4_only_node_fall_back_to_the_relay(make_scheduler, monkeypatch):
    a = {"v6": "2001:db8:1::2", "nat": EASY}
    b = {"v4": "10.0.2.2", "nat": EASY}
    net, agent, connector, _ = dual_stack_run(make_scheduler, monkeypatch, a, b)
    assert agent.result.path == connector.result.path == "relay"
    assert "no candidate pairs" in agent.result.reason
    assert agent.result.elapsed == 0  # at once: nothing to try
    assert net.log == []  # and no check was sent


def test_an_ipv6_only_node_reaches_a_dual_stack_one_over_ipv6(make_scheduler, monkeypatch):
    a = {"v6": "2001:db8:1::2", "nat": EASY}
    b = {"v4": "10.0.2.2", "v6": "2001:db8:2::2", "nat": SYMMETRIC}
    _, agent, connector, _ = dual_stack_run(make_scheduler, monkeypatch, a, b)
    assert agent.result.path == "direct", agent.stats()
    assert agent.result.pair.remote.addr == ("2001:db8:2::2", 6000)
