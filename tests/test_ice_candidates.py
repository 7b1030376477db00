"""Candidates: RFC 8445 priorities, foundations and pair priorities with worked numbers;
gathering from (faked) interfaces; conversion to and from the control protocol's Candidate."""

import ipaddress
import re

import ifaddr
import pytest

from mahole.ice.candidates import (
    TYPE_PREFERENCE,
    Candidate,
    candidate_priority,
    foundation,
    gather,
    host_addresses,
    local_preferences,
    precedence,
    normalize_addr,
    pair_priority,
)
from mahole.wire import control

ICE_CHARS = re.compile(r"[A-Za-z0-9+/]{1,32}")


# --- priorities (RFC 8445 §5.1.2) --------------------------------------------------------


def test_type_preferences_are_the_rfc_recommendations():
    # RFC 8445 §5.1.2.2: host 126, prflx 110, srflx 100, relay 0.
    assert TYPE_PREFERENCE == {"host": 126, "prflx": 110, "srflx": 100, "relay": 0}


@pytest.mark.parametrize(
    "type_, local_pref, component, expected",
    [
        # (type_pref << 24) | (local_pref << 8) | (256 - component), computed by hand:
        ("host", 65535, 1, 2130706431),  # 126*16777216 + 65535*256 + 255 = 0x7EFFFFFF
        ("prflx", 65535, 1, 1862270975),  # 110*16777216 + 16776960 + 255 = 0x6EFFFFFF
        ("srflx", 65535, 1, 1694498815),  # 100*16777216 + 16776960 + 255 = 0x64FFFFFF
        ("relay", 65535, 1, 16777215),  # 0 + 16776960 + 255 = 0x00FFFFFF
        ("host", 65534, 1, 2130706175),  # 2113929216 + 16776704 + 255 = 0x7EFFFEFF
        ("host", 65534, 2, 2130706174),  # component 2: 256 - 2 = 254
        ("host", 0, 256, 2113929216),  # lowest local preference, last component
    ],
)
def test_candidate_priority_worked_numbers(type_, local_pref, component, expected):
    assert candidate_priority(type_, local_pref, component) == expected


@pytest.mark.parametrize("args", [("bogus", 1, 1), ("host", 65536, 1), ("host", -1, 1),
                                  ("host", 1, 0), ("host", 1, 257)])
def test_candidate_priority_rejects_out_of_range(args):
    with pytest.raises(ValueError):
        candidate_priority(*args)


def test_type_order_dominates_local_preference():
    assert candidate_priority("host", 0) > candidate_priority("prflx", 65535)
    assert candidate_priority("prflx", 0) > candidate_priority("srflx", 65535)
    assert candidate_priority("srflx", 0) > candidate_priority("relay", 65535)


# --- pair priority (RFC 8445 §6.1.2.3) ---------------------------------------------------


def test_pair_priority_worked_numbers():
    g, d = 2130706431, 1694498815  # controlling host, controlled srflx
    # 2^32*MIN + 2*MAX + (G>D): 1694498815*4294967296 = 7277816993535754240;
    # + 2*2130706431 = 4261412862; + 1.
    assert pair_priority(g, d) == 7277816993535754240 + 4261412862 + 1 == 7277816997797167103
    assert pair_priority(d, g) == pair_priority(g, d) - 1  # only the G>D bit differs
    assert pair_priority(5, 5) == (5 << 32) + 10


def test_pair_priority_orders_by_the_weaker_candidate_first():
    host, srflx, relay = (candidate_priority(t) for t in ("host", "srflx", "relay"))
    assert pair_priority(host, host) > pair_priority(host, srflx) > pair_priority(srflx, srflx)
    assert pair_priority(srflx, srflx) > pair_priority(host, relay)


# --- foundations (RFC 8445 §5.1.1.3) -----------------------------------------------------


def test_foundation_same_type_base_and_server_means_same_foundation():
    assert foundation("srflx", "192.0.2.1", "intermediate") == foundation("srflx", "192.0.2.1", "intermediate")
    assert foundation("host", "2001:DB8::1") == foundation("host", "2001:db8::1")  # same IP
    assert foundation("host", "::ffff:192.0.2.1") == foundation("host", "192.0.2.1")


def test_foundation_differs_when_any_input_differs():
    base = foundation("srflx", "192.0.2.1", "intermediate")
    assert base != foundation("host", "192.0.2.1")
    assert base != foundation("srflx", "192.0.2.2", "intermediate")
    assert base != foundation("srflx", "192.0.2.1", "other-server")
    assert base != foundation("relay", "192.0.2.1", "intermediate")


def test_foundation_is_short_stable_and_made_of_ice_chars():
    value = foundation("host", "192.0.2.1")
    assert ICE_CHARS.fullmatch(value) and len(value) == 8
    assert value == "85fb6306"  # stable across runs and machines (a SHA-256 prefix)


# --- addresses and the candidate dataclass -----------------------------------------------


def test_normalize_addr():
    assert normalize_addr(("::ffff:192.0.2.1", 1)) == ("192.0.2.1", 1)
    assert normalize_addr(["2001:DB8:0::1", 2]) == ("2001:db8::1", 2)
    assert normalize_addr(("fe80::1%eth0", 3, 0, 2)) == ("fe80::1%eth0", 3)  # AF_INET6 sockaddr
    for bad in (("example.com", 1), ("192.0.2.1", 70000), ("192.0.2.1", True), "192.0.2.1:1", None):
        with pytest.raises(ValueError):
            normalize_addr(bad)


def test_candidate_validates_and_normalises():
    cand = Candidate(foundation="abc", priority=1, addr=("::ffff:192.0.2.1", 5), type="host")
    assert cand.addr == ("192.0.2.1", 5) and cand.base == cand.addr and cand.ip_version == 4
    srflx = Candidate(foundation="x", priority=1, addr=("203.0.113.1", 9), type="srflx",
                      related_addr=("10.0.0.1", 5))
    assert srflx.base == ("10.0.0.1", 5)
    with pytest.raises(ValueError, match="host candidate has no related_addr"):
        Candidate(foundation="a", priority=1, addr=("192.0.2.1", 5), type="host", related_addr=("192.0.2.2", 1))
    with pytest.raises(ValueError, match="foundation"):
        Candidate(foundation="not ice!", priority=1, addr=("192.0.2.1", 5), type="host")
    with pytest.raises(ValueError, match="type"):
        Candidate(foundation="a", priority=1, addr=("192.0.2.1", 5), type="turn")
    with pytest.raises(ValueError, match="priority"):
        Candidate(foundation="a", priority=2**32, addr=("192.0.2.1", 5), type="host")


ALL_KINDS = [
    Candidate(foundation="85fb6306", priority=2130706431, addr=("192.0.2.1", 4433), type="host"),
    Candidate(foundation="a+b/C9", component=2, priority=1694498814, addr=("2001:db8::7", 1),
              type="srflx", related_addr=("fd00::2", 4433)),
    Candidate(foundation="p", priority=1862270975, addr=("203.0.113.9", 40000), type="prflx",
              related_addr=("10.0.0.2", 4433)),
    Candidate(foundation="r" * 32, priority=16777215, addr=("198.51.100.1", 443), type="relay"),
]


@pytest.mark.parametrize("cand", ALL_KINDS, ids=lambda c: c.type)
def test_candidate_round_trips_through_control_candidate(cand):
    wire = cand.to_wire()
    assert isinstance(wire, control.Candidate)
    assert (wire.foundation, wire.component, wire.transport, wire.priority, wire.addr, wire.type,
            wire.related_addr) == (cand.foundation, cand.component, cand.transport, cand.priority,
                                   cand.addr, cand.type, cand.related_addr)
    assert Candidate.from_wire(wire) == cand


def test_candidates_round_trip_through_a_candidate_offer_on_the_wire():
    offer = control.CandidateOffer(session_id=bytes(8), ufrag="abcd", pwd="p" * 22,
                                   candidates=tuple(c.to_wire() for c in ALL_KINDS))
    decoded = control.decode(control.encode(offer))
    assert [Candidate.from_wire(c) for c in decoded.candidates] == ALL_KINDS


# --- interfaces --------------------------------------------------------------------------


def _fake_adapters():
    return [
        ifaddr.Adapter("lo", "lo", [ifaddr.IP("127.0.0.1", 8, "lo"), ifaddr.IP(("::1", 0, 0), 128, "lo")]),
        ifaddr.Adapter("eth0", "eth0", [
            ifaddr.IP("192.0.2.2", 24, "eth0"),
            ifaddr.IP(("2001:db8::2", 0, 0), 64, "eth0"),
            ifaddr.IP(("fe80::1", 0, 2), 64, "eth0"),
            ifaddr.IP("169.254.3.4", 16, "eth0"),
            ifaddr.IP("192.0.2.2", 24, "eth0:1"),  # duplicate
        ]),
        ifaddr.Adapter("weird", "weird", [ifaddr.IP("0.0.0.0", 0, "w"), ifaddr.IP("224.0.0.1", 4, "w"),
                                          ifaddr.IP("not-an-ip", 0, "w")]),
    ]


def test_host_addresses_filters_interfaces(monkeypatch):
    monkeypatch.setattr(ifaddr, "get_adapters", _fake_adapters)
    assert host_addresses() == ["192.0.2.2", "2001:db8::2"]
    assert host_addresses(include_loopback=True) == ["127.0.0.1", "::1", "192.0.2.2", "2001:db8::2"]
    assert host_addresses(include_link_local=True) == ["192.0.2.2", "2001:db8::2", "fe80::1%eth0", "169.254.3.4"]


def test_host_addresses_on_this_machine_are_usable_unicast_ips():
    found = host_addresses()
    for host in found:
        address = ipaddress.ip_address(host)
        assert not (address.is_loopback or address.is_link_local or address.is_multicast
                    or address.is_unspecified)
    assert len(found) == len(set(found))


def test_local_preferences_are_distinct_and_prefer_ipv6():
    prefs = local_preferences(["192.0.2.2", "10.0.0.1", "2001:db8::2", "127.0.0.1", "fe80::1%eth0"])
    assert prefs == {"2001:db8::2": 65535, "192.0.2.2": 65534, "10.0.0.1": 65533,
                     "fe80::1%eth0": 65532, "127.0.0.1": 65531}
    prefs4 = local_preferences(["2001:db8::2", "192.0.2.2"], prefer_ipv6=False)
    assert prefs4 == {"192.0.2.2": 65535, "2001:db8::2": 65534}


def test_local_preferences_follow_the_rfc_6724_precedence():
    # RFC 8421 §4: native IPv6 first, then IPv4, then 6to4, Teredo and unique local IPv6,
    # which are likelier to be unreachable or slow than IPv4.
    prefs = local_preferences(["fd00::2", "2001:0:4136:e378::1", "2002:c000:204::1",
                               "192.0.2.2", "2001:db8::2"])
    assert sorted(prefs, key=prefs.get, reverse=True) == [
        "2001:db8::2", "192.0.2.2", "2002:c000:204::1", "2001:0:4136:e378::1", "fd00::2"]
    assert precedence("2001:db8::2") == 40 and precedence("192.0.2.2") == 35
    assert precedence("::ffff:192.0.2.2") == 35  # a mapped address is IPv4
    assert precedence("192.0.2.2", prefer_ipv6=False) > precedence("2001:db8::2")


def test_host_addresses_leave_out_what_rfc_8445_forbids(monkeypatch):
    adapters = [ifaddr.Adapter("eth0", "eth0", [
        ifaddr.IP(("2001:db8::2", 0, 0), 64, "eth0"),
        ifaddr.IP(("fec0::1", 0, 0), 64, "eth0"),  # site-local (RFC 3879)
        ifaddr.IP(("::c000:202", 0, 0), 96, "eth0"),  # IPv4-compatible (RFC 4291 §2.5.5.1)
        ifaddr.IP(("::ffff:192.0.2.9", 0, 0), 96, "eth0"),  # IPv4-mapped
        ifaddr.IP(("3ffe::1", 0, 0), 64, "eth0"),  # 6bone (RFC 3701)
        ifaddr.IP(("fd00::2", 0, 0), 64, "eth0"),  # unique local: kept, ranked low
    ])]
    monkeypatch.setattr(ifaddr, "get_adapters", lambda: adapters)
    assert host_addresses() == ["2001:db8::2", "fd00::2"]


# --- gathering ---------------------------------------------------------------------------


@pytest.fixture
def two_interfaces(monkeypatch):
    monkeypatch.setattr(ifaddr, "get_adapters", _fake_adapters)


def test_gather_wildcard_dual_stack(two_interfaces):
    cands = gather(4433, bound_host="::", observed_addr=("203.0.113.5", 50000),
                   relay_addr=("198.51.100.1", 443))
    assert [(c.type, c.addr) for c in cands] == [
        ("host", ("2001:db8::2", 4433)),
        ("host", ("192.0.2.2", 4433)),
        ("srflx", ("203.0.113.5", 50000)),
        ("relay", ("198.51.100.1", 443)),
    ]
    v6, v4, srflx, relay = cands
    assert v6.priority == candidate_priority("host", 65535)
    assert v4.priority == candidate_priority("host", 65534)
    assert srflx.priority == candidate_priority("srflx", 65534)  # its base's local preference
    assert srflx.related_addr == v4.addr and srflx.base == v4.addr
    assert relay.priority == candidate_priority("relay", 65534)
    assert relay.related_addr == ("203.0.113.5", 50000)
    assert len({c.foundation for c in cands}) == 4
    assert v4.foundation == foundation("host", "192.0.2.2")
    assert srflx.foundation == foundation("srflx", "192.0.2.2", "intermediate")
    for cand in cands:  # every gathered candidate is valid on the wire
        assert Candidate.from_wire(cand.to_wire()) == cand


def test_gather_ipv4_wildcard_and_loopback(two_interfaces):
    assert [c.addr for c in gather(5, bound_host="0.0.0.0")] == [("192.0.2.2", 5)]
    with_lo = gather(5, bound_host="0.0.0.0", include_loopback=True)
    assert [c.addr for c in with_lo] == [("192.0.2.2", 5), ("127.0.0.1", 5)]
    assert with_lo[0].priority > with_lo[1].priority


def test_gather_specific_address_only_that_one_even_loopback(two_interfaces):
    cands = gather(7000, bound_host="127.0.0.1")
    assert [(c.type, c.addr) for c in cands] == [("host", ("127.0.0.1", 7000))]
    assert cands[0].priority == candidate_priority("host", 65535)


def test_gather_skips_srflx_equal_to_a_host(two_interfaces):
    # A public address bound directly: QAD sees the same address, no srflx candidate.
    cands = gather(4433, bound_host="192.0.2.2", observed_addr=("::ffff:192.0.2.2", 4433))
    assert [c.type for c in cands] == ["host"]


def test_gather_a_mapped_port_ranks_between_host_and_observed_as_srflx(two_interfaces):
    # A port the router maps (PCP, NAT-PMP): a srflx of its own foundation, above the
    # address the intermediate observed and below every host candidate.
    cands = gather(4433, bound_host="0.0.0.0", observed_addr=("203.0.113.5", 50000),
                   mapped_addr=("203.0.113.5", 62000))
    assert [(c.type, c.addr) for c in cands] == [
        ("host", ("192.0.2.2", 4433)),
        ("srflx", ("203.0.113.5", 62000)),
        ("srflx", ("203.0.113.5", 50000)),
    ]
    host, mapped, observed = cands
    assert host.priority > mapped.priority > observed.priority
    assert mapped.priority == candidate_priority("srflx", 65535)
    assert mapped.related_addr == host.addr
    assert mapped.foundation == foundation("srflx", "192.0.2.2", "port-mapping")
    assert mapped.foundation != observed.foundation
    assert Candidate.from_wire(mapped.to_wire()) == mapped
    # A router that maps the very port the intermediate observed adds nothing.
    same = gather(4433, bound_host="0.0.0.0", observed_addr=("203.0.113.5", 50000),
                  mapped_addr=("203.0.113.5", 50000))
    assert [c.type for c in same] == ["host", "srflx"]
    assert same[1].priority == candidate_priority("srflx", 65535)


def test_gather_rejects_bad_port(two_interfaces):
    with pytest.raises(ValueError):
        gather(0, bound_host="::")
