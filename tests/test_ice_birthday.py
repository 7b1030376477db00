"""Birthday probing, sans-IO (mahole.ice.birthday): pacing, budget, the first landing stops
the probes, only the offered IP is ever probed, and only authentic answers count; on a fake
clock, with the session's real check-list credentials where they matter."""

import random

import pytest

from mahole._fast import Scheduler
from mahole.ice.birthday import (
    BirthdayOpeners,
    BirthdayProber,
    ProbeBudget,
    success_probability,
)
from mahole.ice.checklist import CheckList
from mahole.wire import stun
from test_ice_harness import host, srflx

HARD_IP, EASY = "203.0.113.5", ("198.51.100.9", 40000)
UFRAG_E, PWD_E = "EEEE", "e" * 22
UFRAG_H, PWD_H = "HHHH", "h" * 22


class FakeRequests:
    """Numbered fake requests; `authentic` accepts what the test says."""

    def __init__(self):
        self.count = 0
        self.good = set()

    def __call__(self):
        self.count += 1
        tid = self.count.to_bytes(12, "big")
        return tid, b"\x00\x01\x00\x00\x21\x12\xa4\x42" + tid

    def authentic(self, data):
        return bytes(data[8:20]) in self.good


def prober(now=0.0, **kwargs):
    requests = FakeRequests()
    kwargs.setdefault("rng", random.Random(7))
    p = BirthdayProber(HARD_IP, [(HARD_IP, 50000), ("10.0.0.2", 5000)], requests,
                       requests.authentic, now, **kwargs)
    return p, requests


def run(p, until, step=0.001):
    """Drive the prober's timer on a fake clock; every datagram it sends."""
    now, sent = p.started_at, list(p.datagrams_to_send())
    while now < until:
        now = round(now + step, 9)
        if p.get_timer() is not None and now >= p.get_timer():
            p.handle_timer(now)
        sent += p.datagrams_to_send()
    return sent


def test_the_expected_probability_is_the_birthday_formula():
    assert success_probability(256, 1024) == pytest.approx(0.983, abs=0.001)  # N = 64,512
    assert success_probability(256, 1024, 65536) == pytest.approx(0.982, abs=0.001)
    assert success_probability(0, 1024) == 0.0
    assert success_probability(64, 256) == pytest.approx(1 - (1 - 64 / 64512) ** 256)


def test_probes_are_paced_one_per_interval_and_stop_at_m():
    p, _ = prober(probes=100, interval=0.004)
    sent = run(p, 1.0)
    assert len(sent) == 100 and p.done and "100 probes sent" in p.reason
    # 100 probes one per 4 ms: none before its slot.
    times = []
    p2, _ = prober(probes=100, interval=0.004)
    now = 0.0
    times += [0.0] * len(p2.datagrams_to_send())
    while not p2.done:
        now = p2.get_timer()
        p2.handle_timer(now)
        times += [now] * len(p2.datagrams_to_send())
    assert times[:3] == [0.0, 0.004, 0.008]
    assert times[99] == pytest.approx(0.396)


def test_a_late_timer_sends_only_a_few_owed_probes():
    p, _ = prober(probes=1000, interval=0.004)
    p.datagrams_to_send()
    p.handle_timer(10.0)  # the loop was stuck for 10 s
    assert len(p.datagrams_to_send()) == 8


def test_probes_go_only_to_the_offered_ip_and_never_twice_to_one_port():
    p, _ = prober(probes=2000, interval=0.001)
    sent = run(p, 3.0)
    assert {addr[0] for _, addr in sent} == {HARD_IP}
    ports = [addr[1] for _, addr in sent]
    assert len(set(ports)) == len(ports) == 2000 and min(ports) >= 1024


def test_an_ip_the_peer_did_not_offer_is_refused():
    with pytest.raises(ValueError, match="not an address the peer offered"):
        BirthdayProber("192.0.2.77", [(HARD_IP, 50000)], FakeRequests(), bool, 0.0)
    with pytest.raises(ValueError, match="IPv4"):
        BirthdayProber("2001:db8::1", [("2001:db8::1", 1)], FakeRequests(), bool, 0.0)


def test_the_first_authentic_answer_stops_the_probes():
    p, requests = prober(probes=1024, interval=0.004)
    sent = run(p, 0.1)
    data, addr = sent[10]
    forged = data  # same transaction id, from elsewhere or not authentic
    assert p.receive_stun(forged, (HARD_IP, addr[1] + 1), 0.1) is True  # wrong source
    assert p.receive_stun(forged, addr, 0.1) is True  # not signed with the password
    assert not p.done and p.ignored == 2
    requests.good.add(bytes(data[8:20]))
    assert p.receive_stun(data, addr, 0.1) is True
    assert p.done and p.landed == addr
    assert run(p, 1.0) == []  # nothing after the landing
    assert p.receive_stun(b"\x01\x01" + b"\x00" * 18, addr, 0.2) is False  # not ours


def test_the_node_budget_bounds_probes_across_sessions():
    budget = ProbeBudget(0.0, rate=10.0, burst=1500)
    first, _ = prober(probes=1024, interval=0.0001, budget=budget)
    run(first, 0.5, step=0.0001)
    second, _ = prober(probes=1024, interval=0.0001, budget=budget)
    sent = run(second, 0.5, step=0.0001)
    assert first.sent == 1024
    assert 476 <= len(sent) <= 482 and second.reason == "the node's probe budget is spent"


def test_openers_send_from_every_socket_paced_and_again_until_stopped():
    requests = FakeRequests()
    o = BirthdayOpeners(EASY, 256, requests, requests.authentic, 0.0, resend=1.0, pace=0.001)
    out = list(o.datagrams_to_send())
    now = 0.0
    while now < 2.5:
        now = round(now + 0.001, 9)
        if o.get_timer() is not None and now >= o.get_timer():
            o.handle_timer(now)
        out += o.datagrams_to_send()
    indexes = [i for i, _, _ in out]
    assert {addr for _, _, addr in out} == {EASY}
    # Round one over 256 ms, round two a second later (1.255 s to 1.51 s): twice 256.
    assert sorted(indexes[:256]) == list(range(256)) and len(out) == 2 * 256
    # A packet from elsewhere, or not authentic, wins nothing; an authentic one does.
    data = out[5][1]
    assert not o.receive(17, data, ("198.51.100.10", 40000), now)
    assert not o.receive(17, data, EASY, now)
    requests.good.add(bytes(data[8:20]))
    assert not o.receive(256, data, EASY, now)  # no such socket
    assert o.receive(17, data, EASY, now) and o.winner == 17 and o.done
    assert o.get_timer() is None


def checklists():
    sched_e, sched_h = Scheduler(), Scheduler()
    e_host = host("10.0.1.2", 40000)
    h_host = host("10.0.2.2", 5000)
    e_local = [e_host, srflx(*EASY, e_host)]
    h_local = [h_host, srflx(HARD_IP, 50000, h_host)]
    easy = CheckList(True, 2, UFRAG_E, PWD_E, UFRAG_H, PWD_H, e_local, h_local, sched_e)
    hard = CheckList(False, 1, UFRAG_H, PWD_H, UFRAG_E, PWD_E, h_local, e_local, sched_h)
    return easy, hard


def test_probes_carry_the_sessions_credentials_and_the_landed_port_is_checked():
    """A probe is a check the hard side's check list accepts and answers; the answer is
    authentic to the easy side; a stray request with other credentials is not."""
    easy, hard = checklists()
    easy.start(0.0)
    hard.start(0.0)
    easy.datagrams_to_send()
    hard.datagrams_to_send()
    tid, probe = easy.probe_request()
    assert hard.authentic(probe) and not easy.authentic(probe)
    stray = stun.encode(stun.binding_request(username=f"{UFRAG_H}:XXXX", priority=1,
                                             ice_controlling=5), integrity_key=PWD_H.encode())
    assert not hard.authentic(stray)
    assert hard.receive_stun(probe, EASY, 0.01)
    answer = next(d for d, a in hard.datagrams_to_send()
                  if a == EASY and stun.decode(d).transaction_id == tid)
    assert easy.authentic(answer)
    # The landed port becomes a peer-reflexive candidate with a triggered check.
    landed = (HARD_IP, 61234)
    easy.learn_remote(landed, 0.02)
    assert any(c.addr == landed and c.type == "prflx" for c in easy.remote_candidates)
    assert landed in [a for _, a in easy.datagrams_to_send()]
