"""The port-mapping client (mahole.portmap) against fake routers on a fake clock."""

import random
import struct

import pytest

from mahole import portmap
from mahole.portmap import MappingFailed, MappingLost, MappingUp, PortMapper, Send
from mahole.wire import natpmp, pcp

GW = "192.168.1.1"
ME = "192.168.1.10"
PORT = 4478
EXTERNAL = "203.0.113.9"


class Router:
    """A gateway speaking PCP and/or NAT-PMP, answering what it is sent."""

    def __init__(self, speaks=("pcp", "natpmp"), lifetime=3600, external_port=62000):
        self.speaks = speaks
        self.lifetime = lifetime
        self.external_port = external_port
        self.boot = 0.0  # its epoch starts here
        self.table = {}  # internal port -> (external port, lifetime)
        self.requests = []
        self.silent = False
        self.refuse = None  # a result code to answer with

    def epoch(self, now):
        return int(now - self.boot)

    def answer(self, data, now):
        self.requests.append(data)
        if self.silent:
            return None
        version = data[0]
        if version == pcp.VERSION:
            if "pcp" not in self.speaks:
                return struct.pack("!BBHI", 0, 0x81, natpmp.UNSUPPORTED_VERSION,
                                   self.epoch(now)) + bytes(8)  # RFC 6887 §9
            lifetime, = struct.unpack_from("!I", data, 4)
            nonce, internal = data[24:36], struct.unpack_from("!H", data, 40)[0]
            result = self.refuse or 0
            if lifetime == 0:
                self.table.pop(internal, None)
            elif not result:
                self.table[internal] = (self.external_port, min(lifetime, self.lifetime))
            granted = self.table.get(internal, (0, 0))
            header = struct.pack("!BBxBII", 2, 0x81, result, granted[1], self.epoch(now))
            body = nonce + struct.pack("!B3xHH", 17, internal, granted[0]) + pcp._ip16(EXTERNAL)
            return header + bytes(12) + body
        assert "natpmp" in self.speaks
        if data[1] == natpmp.OP_EXTERNAL_ADDRESS:
            return struct.pack("!BBHI", 0, 128, self.refuse or 0, self.epoch(now)) + \
                bytes(int(x) for x in EXTERNAL.split("."))
        _, _, _, internal, _, lifetime = struct.unpack("!BBHHHI", data)
        if lifetime == 0:
            self.table.pop(internal, None)
        elif not self.refuse:
            self.table[internal] = (self.external_port, min(lifetime, self.lifetime))
        granted = self.table.get(internal, (0, 0))
        return struct.pack("!BBHIHHI", 0, 129, self.refuse or 0, self.epoch(now), internal,
                           *granted)

    def restart(self, now):
        """A reboot: the table is gone and the epoch starts again."""
        self.table.clear()
        self.boot = now


class Harness:
    def __init__(self, router, **kwargs):
        self.router = router
        self.now = 100.0
        self.mapper = PortMapper(GW, ME, PORT, rng=random.Random(1), **kwargs)
        self.events = []
        self.sent = []

    def pump(self):
        """Deliver every datagram the mapper sends and every answer, until quiet."""
        while True:
            event = self.mapper.next_event()
            if event is None:
                return
            if isinstance(event, Send):
                assert event.addr == (GW, 5351)
                self.sent.append(event.data)
                reply = self.router.answer(event.data, self.now)
                if reply is not None:
                    self.mapper.datagram_received(reply, (GW, 5351), self.now)
            else:
                self.events.append(event)

    def start(self):
        self.mapper.start(self.now)
        self.pump()

    def run_until(self, t):
        """Fire timers in order up to t."""
        while True:
            due = self.mapper.next_timer()
            if due is None or due > t:
                break
            self.now = max(self.now, due)
            self.mapper.handle_timer(self.now)
            self.pump()
        self.now = t

    def ups(self):
        return [e for e in self.events if isinstance(e, MappingUp)]


def test_pcp_router_maps_at_once_and_the_mapping_is_renewed_at_half_its_lifetime():
    h = Harness(Router(lifetime=600))
    h.start()
    assert h.ups() == [MappingUp((EXTERNAL, 62000), 600, "pcp")]
    assert len(h.sent) == 1 and h.sent[0][0] == pcp.VERSION
    assert h.mapper.next_timer() == pytest.approx(100 + 300)
    h.run_until(100 + 299)
    assert len(h.sent) == 1
    h.run_until(100 + 3 * 600)  # six renewals, none of them a new MappingUp
    assert len(h.sent) == 7 and h.ups() == [MappingUp((EXTERNAL, 62000), 600, "pcp")]
    assert all(s[24:36] == h.mapper.nonce for s in h.sent)  # §11.2: the same nonce
    assert h.mapper.status(h.now)["expires_in_s"] == pytest.approx(600 - 0, abs=300)


def test_natpmp_only_router_answers_pcp_with_unsupported_version_and_natpmp_is_used():
    h = Harness(Router(speaks=("natpmp",)))
    h.start()
    assert h.ups() == [MappingUp((EXTERNAL, 62000), 3600, "natpmp")]
    assert [s[0] for s in h.sent] == [2, 0, 0]  # PCP, then NAT-PMP address and map
    assert h.mapper.status(h.now)["protocol"] == "natpmp"


def test_silent_gateway_is_tried_within_the_rfc_bounds_then_given_up():
    router = Router()
    router.silent = True
    h = Harness(router)
    h.start()
    h.run_until(1000)
    pcp_sent = [s for s in h.sent if s[0] == pcp.VERSION]
    natpmp_maps = [s for s in h.sent if s[:2] == b"\x00\x01"]
    assert len(pcp_sent) == portmap.PCP_TRIES
    assert len(natpmp_maps) == natpmp.MAX_TRIES  # RFC 6886 §3.1: nine tries
    assert isinstance(h.events[-1], MappingFailed) and "no answer" in h.events[-1].reason
    assert h.mapper.next_timer() is None  # nothing more is sent


def test_pcp_retransmissions_double_from_three_seconds():
    router = Router(speaks=("pcp",))
    router.silent = True
    h = Harness(router)
    h.start()
    times = []
    while len(times) < portmap.PCP_TRIES:
        due = h.mapper.next_timer()
        times.append(due)
        h.now = due
        h.mapper.handle_timer(due)
        h.pump()
    gaps = [times[0] - 100] + [b - a for a, b in zip(times, times[1:])]
    for gap, expected in zip(gaps, (3, 6, 12)):
        assert expected * 0.8 <= gap <= expected * 1.25


def test_router_that_restarts_is_noticed_at_the_next_renewal_and_mapped_again():
    router = Router(lifetime=600)
    h = Harness(router)
    h.start()
    h.run_until(200)
    router.restart(h.now)
    router.external_port = 62001  # it hands out another port after the reboot
    h.run_until(100 + 300)  # the renewal: the answer's epoch went back
    lost = [e for e in h.events if isinstance(e, MappingLost)]
    assert lost and "forgot" in lost[0].reason
    assert h.ups()[-1] == MappingUp((EXTERNAL, 62001), 600, "pcp")
    assert router.table  # mapped again
    assert portmap.epoch_valid("pcp", 1000, 50.0, 1300, 350.0)
    assert not portmap.epoch_valid("pcp", 1000, 50.0, 10, 350.0)  # back
    assert not portmap.epoch_valid("pcp", 1000, 50.0, 1010, 350.0)  # too slow (§8.5)
    assert not portmap.epoch_valid("natpmp", 1000, 50.0, 1100, 350.0)  # §3.6: < 7/8


def test_natpmp_router_restart_is_noticed_too():
    router = Router(speaks=("natpmp",), lifetime=100)
    h = Harness(router)
    h.start()
    h.run_until(130)
    router.restart(h.now)
    h.run_until(151)
    assert any(isinstance(e, MappingLost) and "forgot" in e.reason for e in h.events)
    assert h.mapper.state == "mapped" and router.table


def test_unanswered_renewal_loses_the_mapping_at_the_end_of_the_lease_and_asks_again():
    router = Router(lifetime=100)
    h = Harness(router)
    h.start()
    router.silent = True
    h.run_until(100 + 100)
    assert any(isinstance(e, MappingLost) and "lease ended" in e.reason for e in h.events)
    assert h.mapper.state == "requesting"
    router.silent = False
    h.run_until(100 + 100 + 4)  # PCP's first retransmission reaches it
    assert h.mapper.state == "mapped" and len(h.ups()) == 2


def test_refusals_fall_back_to_natpmp_then_fail_with_the_reason():
    router = Router()
    router.refuse = 2
    h = Harness(router)
    h.start()
    assert isinstance(h.events[-1], MappingFailed)
    assert "natpmp refused" in h.events[-1].reason and "disabled" in h.events[-1].reason
    assert not router.table


def test_close_deletes_the_mapping_with_lifetime_zero():
    for speaks in (("pcp", "natpmp"), ("natpmp",)):
        router = Router(speaks=speaks)
        h = Harness(router)
        h.start()
        assert router.table
        h.mapper.close(h.now)
        h.pump()
        assert not router.table and h.mapper.next_timer() is None
        h.mapper.close(h.now)  # twice is harmless
        assert h.mapper.next_event() is None


def test_answers_that_are_not_ours_are_dropped_and_counted():
    router = Router()
    router.silent = True
    h = Harness(router)
    h.start()
    good = Router().answer(h.sent[0], h.now)
    mapper = h.mapper
    assert not mapper.datagram_received(good, ("192.168.1.66", 5351), h.now)  # not the gateway
    assert not mapper.datagram_received(good, (GW, 5350), h.now)  # not its port
    wrong_nonce = good[:24] + bytes(12) + good[36:]
    assert not mapper.datagram_received(wrong_nonce, (GW, 5351), h.now)
    wrong_port = good[:40] + struct.pack("!H", PORT + 1) + good[42:]
    assert not mapper.datagram_received(wrong_port, (GW, 5351), h.now)
    unspecified = good[:44] + pcp._ip16("0.0.0.0")
    assert not mapper.datagram_received(unspecified, (GW, 5351), h.now)
    assert not mapper.datagram_received(b"\x02garbage", (GW, 5351), h.now)
    assert mapper.dropped == 6 and mapper.state == "requesting"
    assert h.mapper.next_event() is None
    assert mapper.datagram_received(good, (GW, 5351), h.now)
    assert mapper.state == "mapped"
    # Once mapped nothing is in flight: a replayed answer is dropped too.
    assert not mapper.datagram_received(good, (GW, 5351), h.now)


def test_random_bytes_from_the_gateway_never_raise():
    rng = random.Random(6887)
    router = Router()
    router.silent = True
    h = Harness(router)
    h.start()
    good = Router().answer(h.sent[0], h.now)
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        h.mapper.datagram_received(bytes(data[:rng.randrange(len(data) + 1)]), (GW, 5351),
                                   h.now)
        while h.mapper.next_event() is not None:
            pass


def test_restart_after_a_network_change_asks_again():
    router = Router()
    h = Harness(router)
    h.start()
    h.mapper.restart(h.now)
    h.pump()
    assert isinstance(h.events[1], MappingLost) and len(h.ups()) == 2


def test_a_short_refusal_cannot_end_a_mapping_but_one_with_our_nonce_can():
    router = Router(lifetime=600)
    h = Harness(router)
    h.start()
    short = struct.pack("!BBxBII", 2, 0x81, 8, 0, 1) + bytes(12)  # no MAP fields
    router.silent = True
    h.run_until(100 + 301)  # renewing: a request is in flight
    assert h.mapper.renewing
    assert not h.mapper.datagram_received(short, (GW, 5351), h.now)
    assert h.mapper.state == "mapped" and h.mapper.dropped == 1
    router.silent, router.refuse = False, 2
    h.run_until(100 + 305)  # the retransmission is refused, with our nonce
    assert any(isinstance(e, MappingLost) and "refused" in e.reason for e in h.events)


def test_natpmp_answers_for_another_port_or_short_refusals_do_not_end_a_mapping():
    router = Router(speaks=("natpmp",), lifetime=600)
    h = Harness(router)
    h.start()
    router.silent = True
    h.run_until(100 + 301)  # renewing
    other = struct.pack("!BBHIHHI", 0, 129, 2, 400, PORT + 1, 0, 0)
    short = struct.pack("!BBHI", 0, 129, 3, 400)
    address_refused = struct.pack("!BBHI", 0, 128, 3, 400)
    for data in (other, short, address_refused):
        assert not h.mapper.datagram_received(data, (GW, 5351), h.now)
    assert h.mapper.state == "mapped" and h.mapper.dropped == 3
    assert not any(isinstance(e, MappingLost) for e in h.events)
