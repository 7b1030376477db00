"""mahole.netcheck on a fake clock: the real STUN responder of the intermediate
(mahole.stun_server) behind a simulated NAT of each RFC 4787 behaviour, every verdict."""

import itertools
import random
import struct

import pytest

from mahole import netcheck
from mahole.netcheck import (
    ADDRESS_AND_PORT_DEPENDENT as APD,
    ADDRESS_DEPENDENT as AD,
    ENDPOINT_INDEPENDENT as EI,
    PORT_INDEPENDENT,
    NetCheck,
    classify_filtering,
    classify_mapping,
    classify_ports,
)
from mahole.stun_server import StunResponder
from mahole.wire import natpmp, pcp, stun

LOCAL_IP, PUBLIC_IP = "10.0.0.2", "198.51.100.1"
A1, A2, P1, P2 = "203.0.113.1", "203.0.113.2", 3478, 3479
B1 = "203.0.113.9"  # a second intermediate
GATEWAY = "10.0.0.1"
SOCKETS = {"main": (LOCAL_IP, 5000), "filter": (LOCAL_IP, 5001), "gateway": (LOCAL_IP, 5100),
           "hairpin": (LOCAL_IP, 5101),
           **{f"port{i}": (LOCAL_IP, 5002 + i) for i in range(4)}}


class AllowAll:
    def allow(self, host, now):
        return True


class Nat:
    """A NAT of one mapping behaviour, filtering behaviour and port allocation (None: no
    NAT, the host is public)."""

    def __init__(self, mapping=EI, filtering=EI, allocation="preserving", step=1, seed=1):
        self.mapping, self.filtering, self.allocation = mapping, filtering, allocation
        self.step = step
        self.rng = random.Random(seed)
        self.next_port = 40000
        self.mappings = {}  # (local, key) -> external port
        self.sent = {}  # external port -> set of remote (ip, port) it sent to
        self.internal = {}  # external port -> local address

    def outbound(self, local, remote):
        if self.mapping is None:
            return local
        key = {EI: None, AD: remote[0], APD: remote}[self.mapping]
        port = self.mappings.get((local, key))
        if port is None:
            if self.allocation == "preserving" and local[1] not in self.internal:
                port = local[1]
            elif self.allocation == "sequential":
                port, self.next_port = self.next_port, self.next_port + self.step
            else:
                port = self.rng.randrange(1024, 65536)
            self.mappings[(local, key)] = port
            self.internal[port] = local
        self.sent.setdefault(port, set()).add(tuple(remote))
        return (PUBLIC_IP, port)

    def inbound(self, source, external):
        """The local address a packet from source to external reaches, or None (dropped)."""
        if self.mapping is None:
            return external
        port = external[1]
        if port not in self.internal:
            return None
        sent = self.sent[port]
        if (self.filtering == EI or (self.filtering == AD and source[0] in {r[0] for r in sent})
                or tuple(source) in sent):
            return self.internal[port]
        return None


class World:
    """Intermediates (real StunResponders) behind the NAT, with a fake clock."""

    def __init__(self, nat, *, alt_port=True, alt_ip=True, second=False, loss=(),
                 ignore_change=False, silent=False, router=None):
        self.nat = nat
        self.now = 1000.0
        self.loss = set(loss)  # test names whose first transmission is lost
        self.lost = set()
        self.silent = silent
        self.router = router  # None (silent), "nat-pmp" or "pcp" (and NAT-PMP), as miniupnpd
        self.router_asked = []
        self.hairpin = False  # whether the NAT loops a packet to its own public address back
        self.servers = {}  # observer address -> (responder, key)
        origins = {(0, 0): (A1, P1)}
        if alt_port:
            origins[(0, 1)] = (A1, P2)
        if alt_port and alt_ip:
            origins[(1, 1)] = (A2, P2)
        self.responder = StunResponder(origins, AllowAll(), self._counters())
        self.ignore_change = ignore_change
        for key, addr in origins.items():
            self.servers[addr] = (self.responder, key, origins)
        self.intermediates = [("relay1", [(A1, P1)])]
        if second:
            other = {(0, 0): (B1, P1)}
            responder = StunResponder(other, AllowAll(), self._counters())
            self.servers[(B1, P1)] = (responder, (0, 0), other)
            self.intermediates.append(("relay2", [(B1, P1)]))

    @staticmethod
    def _counters():
        return {k: 0 for k in ("stun_malformed", "stun_requests", "stun_rate_limited",
                               "stun_unknown_attributes", "stun_classic")}

    def run(self, check=None, sockets=SOCKETS, local_ips=(), gateway=GATEWAY):
        check = check or NetCheck(self.intermediates, sockets, local_ips=local_ips,
                                  gateway=gateway, gateway_client_ip=LOCAL_IP)
        check.start(self.now)
        for _ in range(1000):
            for sock, data, dest in check.datagrams_to_send(self.now):
                self.deliver(check, sockets[sock], sock, data, dest)
            if check.done:
                return check.report()
            timer = check.get_timer()
            assert timer is not None
            self.now = max(timer, self.now)
            check.handle_timer(self.now)
        raise AssertionError("netcheck never finished")

    def deliver(self, check, local, sock, data, dest):
        name = next(p.name for p in check.probes.values() if p.data == data)
        if name in self.loss and name not in self.lost:
            self.lost.add(name)
            return
        if sock == "gateway":
            self.router_asked.append(data)
            answer = self.gateway_answer(data)
            if answer is not None:
                check.datagram_received(sock, answer, dest, self.now + 0.001)
            return
        if dest[0] == PUBLIC_IP or (self.nat.mapping is None and dest[0] == LOCAL_IP):
            if self.hairpin or self.nat.mapping is None:
                to = self.nat.inbound(dest, dest) if self.nat.mapping else dest
                name = next(n for n, a in sockets_of(check).items() if tuple(a) == tuple(to))
                check.datagram_received(name, data, self.nat.outbound(local, dest),
                                        self.now + 0.001)
            return
        if self.silent or dest not in self.servers:
            return
        source = self.nat.outbound(local, dest)
        responder, at, origins = self.servers[dest]
        if self.ignore_change:
            request = stun.decode(data)
            request.attributes.pop("CHANGE-REQUEST", None)
            data = stun.encode(request)
        answer = responder.handle(data, source, at, self.now)
        if answer is None:
            return
        key, payload = answer
        origin = origins[key]
        to = self.nat.inbound(origin, source)
        if to is not None:
            check.datagram_received(sock, payload, origin, self.now + 0.010)  # RTT 10 ms


@pytest.mark.parametrize("mapping, filtering", list(itertools.product((EI, AD, APD), repeat=2)))
def test_every_mapping_and_filtering_behaviour_is_told(mapping, filtering):
    report = World(Nat(mapping, filtering)).run()
    assert report.udp and report.nat is True and report.alternate_observer
    assert (report.mapping, report.filtering) == (mapping, filtering)
    assert report.public_ipv4 == PUBLIC_IP
    assert report.intermediates[0]["rtt_ms"] == pytest.approx(10.0)


def test_no_nat_is_said_and_filtering_still_measured():
    report = World(Nat(mapping=None)).run()
    assert report.nat is False and report.mapping == EI and report.filtering == EI
    assert report.port_allocation == "preserving" and report.public_ipv4 == LOCAL_IP


def test_a_public_address_of_a_wildcard_socket_is_no_nat():
    sockets = {name: ("0.0.0.0", port) for name, (_, port) in SOCKETS.items()}
    report = World(Nat(mapping=None)).run(sockets=sockets, local_ips=[LOCAL_IP])
    assert report.nat is False


@pytest.mark.parametrize("allocation, step, expected", [
    ("preserving", 1, ("preserving", None)),
    ("sequential", 1, ("sequential", 1)),
    ("sequential", 2, ("sequential", 2)),
    ("random", 1, ("random", None)),
])
def test_port_allocation(allocation, step, expected):
    report = World(Nat(APD, APD, allocation, step)).run()
    assert (report.port_allocation, report.port_step) == expected


def test_without_a_second_ip_it_says_port_independent():
    report = World(Nat(AD, AD), alt_ip=False).run()
    assert (report.mapping, report.filtering) == (PORT_INDEPENDENT, PORT_INDEPENDENT)
    report = World(Nat(APD, APD), alt_ip=False).run()
    assert (report.mapping, report.filtering) == (APD, APD)


def test_a_second_intermediate_serves_as_the_other_ip():
    """No --stun-alt-ip, but another intermediate: its observation tells EI from AD."""
    for mapping in (EI, AD):
        report = World(Nat(mapping, APD), alt_ip=False, second=True).run()
        assert report.mapping == mapping
        assert [i["name"] for i in report.intermediates] == ["relay1", "relay2"]
        assert all(i["rtt_ms"] is not None for i in report.intermediates)


def test_without_an_alternate_observer_only_port_allocation_is_measured():
    report = World(Nat(APD, APD, "random"), alt_port=False).run()
    assert report.udp and not report.alternate_observer
    assert report.mapping is None and report.filtering is None
    assert report.port_allocation == "random"


def test_a_silent_intermediate_ends_within_the_probe_timeout():
    world = World(Nat(), silent=True)
    start = world.now
    report = world.run()
    assert not report.udp and report.nat is None and report.mapping is None
    assert report.intermediates[0]["rtt_ms"] is None
    assert world.now - start <= netcheck.PROBE_TIMEOUT + 1e-9


def test_lost_requests_are_retransmitted_and_rtt_is_from_the_last_sending():
    world = World(Nat(EI, APD), loss={"rtt 0 203.0.113.1:3478", "map alt-ip",
                                      "filter change-port"})
    report = world.run()
    assert (report.mapping, report.filtering) == (EI, APD)
    assert report.intermediates[0]["rtt_ms"] == pytest.approx(10.0)


def test_a_filtered_change_request_waits_the_whole_probe_timeout():
    """A CHANGE-REQUEST's answer that a NAT drops is a verdict only once every
    retransmission has had its time: the check does not end before the probe timeout."""
    world = World(Nat(EI, APD))
    start = world.now
    world.run()
    assert world.now - start >= netcheck.PROBE_TIMEOUT


def test_a_server_ignoring_change_request_proves_nothing():
    report = World(Nat(EI, APD), ignore_change=True).run()
    assert report.filtering is None and report.mapping == EI


def test_forged_and_stray_answers_are_ignored():
    check = NetCheck([("relay1", [(A1, P1)])], SOCKETS)
    check.start(0.0)
    ((sock, data, dest),) = check.datagrams_to_send(0.0)
    stray = stun.binding_success(stun.binding_request(), ("192.0.2.66", 1))
    check.datagram_received("main", stun.encode(stray), dest, 0.01)
    check.datagram_received("main", b"\x00\x01garbage", dest, 0.01)
    request = stun.decode(data)
    # The right transaction on the wrong socket is not an answer either.
    check.datagram_received("filter", stun.encode(stun.binding_success(request, ("1.2.3.4", 5))),
                            dest, 0.01)
    assert (check.ignored, check.malformed) == (2, 1)
    assert not check.report().udp


def test_classifiers_directly():
    local = (LOCAL_IP, 5000)
    assert classify_mapping(local, None, None) == (None, None)
    assert classify_mapping(local, local, None) == (False, EI)
    x = (PUBLIC_IP, 5000)
    assert classify_mapping(local, x, None) == (True, None)
    assert classify_mapping(local, x, None, [x]) == (True, EI)
    assert classify_mapping(local, x, (PUBLIC_IP, 6000)) == (True, APD)
    assert classify_mapping(local, x, x, [(PUBLIC_IP, 7000)]) == (True, AD)
    assert classify_filtering(True, None) == EI
    assert classify_filtering(False, True) == AD
    assert classify_filtering(None, True) == PORT_INDEPENDENT
    assert classify_filtering(False, False) == APD
    assert classify_filtering(None, None) is None
    assert classify_ports([(1, 1)]) == (None, None)
    assert classify_ports([(1, 65535), (2, 1)]) == ("sequential", 2)
    assert classify_ports([(1, 100), (2, 90), (3, 80)]) == ("sequential", -10)
    assert classify_ports([(1, 100), (2, 5000), (3, 80)]) == ("random", None)


def _natpmp_answer(opcode, result, tail=b""):
    return struct.pack("!BBHI", 0, 0x80 | opcode, result, 1234) + tail


def _gateway_answer(self, data):
    if self.router is None:
        return None
    if data[0] == natpmp.VERSION:
        return _natpmp_answer(0, 0, bytes([198, 51, 100, 1]))
    if self.router == "nat-pmp":  # RFC 6887 §9: version 2 refused with NAT-PMP's code 1
        return _natpmp_answer(0, natpmp.UNSUPPORTED_VERSION)
    assert data[:2] == bytes([2, 0]) and len(data) == 24  # an ANNOUNCE, lifetime 0
    assert data[4:8] == bytes(4) and data[-4:] == bytes([10, 0, 0, 2])
    return bytes([2, 0x80, 0, 0]) + bytes(20)


World.gateway_answer = _gateway_answer


@pytest.mark.parametrize("router, expected", [
    (None, {"nat_pmp": False, "pcp": False, "external_ipv4": None}),
    ("nat-pmp", {"nat_pmp": True, "pcp": False, "external_ipv4": "198.51.100.1"}),
    ("pcp", {"nat_pmp": True, "pcp": True, "external_ipv4": "198.51.100.1"}),
])
def test_the_port_mapping_protocols_the_router_answers(router, expected):
    world = World(Nat(APD, APD), router=router)
    report = world.run()
    assert report.port_mapping == {"gateway": GATEWAY, **expected}
    # Only requests that change nothing: NAT-PMP opcode 0 and a PCP ANNOUNCE.
    assert {bytes(d[:2]) for d in world.router_asked} <= {b"\x00\x00", b"\x02\x00"}


def test_no_gateway_asks_nothing_and_answers_from_elsewhere_do_not_count():
    world = World(Nat(APD, APD), router="pcp")
    report = world.run(gateway=None)
    assert report.port_mapping is None and world.router_asked == []
    check = NetCheck([("relay1", [(A1, P1)])], SOCKETS, gateway=GATEWAY)
    check.start(0.0)
    check.datagrams_to_send(0.0)
    forged = _natpmp_answer(0, 0, bytes([6, 6, 6, 6]))
    check.datagram_received("gateway", forged, (GATEWAY, 5350), 0.01)
    check.datagram_received("gateway", forged, ("192.0.2.1", pcp.PORT), 0.01)
    check.datagram_received("gateway", b"\x07junk", (GATEWAY, pcp.PORT), 0.01)
    assert check.ignored == 2 and check.malformed == 1
    assert check.report().port_mapping["nat_pmp"] is False


def sockets_of(check):
    return check.sockets


@pytest.mark.parametrize("mapping, hairpin", [(EI, True), (EI, False), (APD, True), (None, None)])
def test_hairpinning(mapping, hairpin):
    """A NAT that loops a packet to its own public address back (RFC 4787 §6) is said to
    hairpin; one that drops it is not; a public host reaches its own address."""
    world = World(Nat(mapping, EI))
    world.hairpin = bool(hairpin)
    report = world.run()
    assert report.hairpinning is (True if hairpin is None else hairpin)
    assert (report.mapping, report.filtering) == (mapping or EI, EI)


def test_a_request_of_someone_else_to_main_is_no_hairpin():
    check = NetCheck([("relay1", [(A1, P1)])], SOCKETS)
    check.start(0.0)
    check.datagrams_to_send(0.0)
    request = stun.binding_request()
    check.datagram_received("main", stun.encode(request), ("192.0.2.7", 9), 0.01)
    assert check.report().hairpinning is None and check.ignored == 1


def test_public_ipv4_and_ipv6_from_an_intermediate_with_both():
    check = NetCheck([("relay1", [(A1, P1), ("2001:db8::1", P1)])], SOCKETS)
    check.start(0.0)
    sent = check.datagrams_to_send(0.0)
    assert {dest for _, _, dest in sent} == {(A1, P1), ("2001:db8::1", P1)}
    answers = {A1: (PUBLIC_IP, 5000), "2001:db8::1": ("2001:db8:1::2", 5000)}
    for sock, data, dest in sent:
        answer = stun.binding_success(stun.decode(data), answers[dest[0]])
        check.datagram_received(sock, stun.encode(answer), dest, 0.030 if ":" in dest[0] else 0.05)
    report = check.report()
    assert (report.public_ipv4, report.public_ipv6) == (PUBLIC_IP, "2001:db8:1::2")
    assert report.intermediates[0]["rtt_ms"] == 30.0  # the nearer of its addresses
