"""rtnetlink parsing (mahole.netlink): what a move to another network looks like to a node,
and that hostile or truncated datagrams are dropped and counted, never raised."""

import random
import socket
import struct

import pytest

from mahole import netlink as nl

ETH0, ETH1 = 2, 3


def message(kind, body, seq=0):
    return struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 0) + body + b"\0" * (
        -len(body) % 4)


def attr(kind, value):
    return struct.pack("=HH", 4 + len(value), kind) + value + b"\0" * (-len(value) % 4)


def link(index, up=True, kind=nl.RTM_NEWLINK):
    flags = nl.IFF_UP | nl.IFF_RUNNING if up else 0
    return message(kind, struct.pack("=BxHiII", 0, 1, index, flags, 0))


def address(ip, index, kind=nl.RTM_NEWADDR, flags=0, scope=0):
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    raw = socket.inet_pton(family, ip)
    return message(kind, struct.pack("=BBBBI", family, 24, 0, scope, index)
                   + attr(nl.IFA_LOCAL, raw) + attr(nl.IFA_FLAGS, struct.pack("=I", flags)))


def route(gateway, index, kind=nl.RTM_NEWROUTE, metric=0, dst_len=0, table=nl.RT_TABLE_MAIN):
    family = socket.AF_INET6 if ":" in gateway else socket.AF_INET
    body = struct.pack("=BBBBBBBBI", family, dst_len, 0, 0, table, 3, 0, nl.RTN_UNICAST, 0)
    body += attr(nl.RTA_GATEWAY, socket.inet_pton(family, gateway))
    body += attr(nl.RTA_OIF, struct.pack("=I", index))
    body += attr(nl.RTA_PRIORITY, struct.pack("=I", metric))
    return message(kind, body)


def done(seq):
    return message(nl.NLMSG_DONE, struct.pack("=i", 0), seq)


def ready_view(*datagrams):
    """A view whose three dumps were answered with `datagrams` (links, addresses, routes)."""
    view = nl.NetworkView()
    for data in datagrams:
        request = view.datagrams_to_send()
        assert len(request) == 1  # one dump at a time
        seq = struct.unpack_from("=IHHII", request[0])[3]
        view.feed(data + done(seq))
    assert view.ready and view.datagrams_to_send() == []
    assert view.changed() is None  # the baseline
    return view


def wifi():
    return ready_view(link(ETH0) + link(ETH1),
                      address("10.0.1.2", ETH0) + address("10.0.3.2", ETH1),
                      route("10.0.1.1", ETH0, metric=100) + route("10.0.3.1", ETH1, metric=200))


def test_dumps_go_one_at_a_time_and_make_the_view():
    view = nl.NetworkView()
    first = view.datagrams_to_send()
    assert [struct.unpack_from("=IHHII", d)[1] for d in first] == [nl.RTM_GETLINK]
    assert not view.ready and view.changed() is None
    view = wifi()
    assert view.usable_addresses() == {"10.0.1.2", "10.0.3.2"}
    assert view.default_routes()[socket.AF_INET].gateway == "10.0.1.1"


def test_wifi_gone_moves_the_default_route_to_lte():
    view = wifi()
    view.feed(address("10.0.1.2", ETH0, kind=nl.RTM_DELADDR)
              + route("10.0.1.1", ETH0, kind=nl.RTM_DELROUTE, metric=100))
    change = view.changed()
    assert change.gone == {"10.0.1.2"} and not change.added and change.routes
    assert "10.0.1.2 gone" in change.reason and "via 10.0.3.1" in change.reason
    assert view.changed() is None  # said once


def test_the_last_ipv4_address_gone_takes_the_routes_the_kernel_flushes_unannounced():
    view = wifi()
    view.feed(address("10.0.1.2", ETH0, kind=nl.RTM_DELADDR))  # no RTM_DELROUTE follows
    change = view.changed()
    assert change.gone == {"10.0.1.2"} and change.routes
    assert view.default_routes()[socket.AF_INET].gateway == "10.0.3.1"


def test_a_link_going_down_takes_its_addresses_and_route_out_of_use():
    view = wifi()
    view.feed(link(ETH0, up=False))
    change = view.changed()
    assert change.gone == {"10.0.1.2"} and change.routes
    assert view.default_routes()[socket.AF_INET].gateway == "10.0.3.1"


def test_what_a_node_does_not_care_about_is_no_change():
    view = wifi()
    view.feed(route("10.0.9.1", ETH0, dst_len=24)  # not a default route
              + route("10.0.9.1", ETH0, table=100)  # another table
              + address("fe80::1", ETH0, scope=nl.RT_SCOPE_LINK)  # link-local
              + address("10.0.7.2", ETH0, flags=nl.IFA_F_TENTATIVE))  # not usable yet
    assert view.changed() is None
    view.feed(address("10.0.7.2", ETH0))  # DAD done
    assert view.changed().added == {"10.0.7.2"}


def test_ipv6_default_route_and_addresses():
    view = wifi()
    view.feed(address("2001:db8:1::2", ETH0) + route("2001:db8:1::1", ETH0))
    change = view.changed()
    assert change.added == {"2001:db8:1::2"} and change.routes and "IPv6" in change.reason


def test_an_overrun_dumps_again_and_compares_when_whole():
    view = wifi()
    view.feed(message(nl.NLMSG_OVERRUN, b""))
    assert view.overruns == 1 and not view.ready
    assert view.changed() is None
    # The dumps again, while the address on eth0 went unseen:
    for data in (link(ETH0) + link(ETH1), address("10.0.3.2", ETH1),
                 route("10.0.3.1", ETH1, metric=200)):
        seq = struct.unpack_from("=IHHII", view.datagrams_to_send()[0])[3]
        view.feed(data + done(seq))
    change = view.changed()
    assert change.gone == {"10.0.1.2"} and change.routes


@pytest.mark.parametrize("data", [
    struct.pack("=IHHII", 8, nl.RTM_NEWADDR, 0, 0, 0),  # length below the header
    struct.pack("=IHHII", 400, nl.RTM_NEWADDR, 0, 0, 0),  # runs past the datagram
    message(nl.RTM_NEWADDR, b"\2\x18"),  # short ifaddrmsg
    message(nl.RTM_NEWROUTE, b"\2\0"),  # short rtmsg
    message(nl.RTM_NEWLINK, b"\0"),  # short ifinfomsg
    message(nl.RTM_NEWADDR, struct.pack("=BBBBI", socket.AF_INET, 24, 0, 0, ETH0)
            + struct.pack("=HH", 200, nl.IFA_LOCAL) + b"\1\2\3\4"),  # attribute too long
    message(nl.RTM_NEWADDR, struct.pack("=BBBBI", socket.AF_INET, 24, 0, 0, ETH0)
            + attr(nl.IFA_LOCAL, b"\1\2\3")),  # a 3-byte IPv4 address
    message(nl.RTM_NEWROUTE, struct.pack("=BBBBBBBBI", socket.AF_INET, 0, 0, 0, 254, 3, 0, 1, 0)
            + attr(nl.RTA_OIF, b"\1\2")),  # a 2-byte u32
])
def test_malformed_datagrams_are_dropped_and_counted(data):
    view = wifi()
    view.feed(data)
    assert view.malformed == 1
    assert view.changed() is None


def test_a_truncated_datagram_keeps_what_came_before_the_cut():
    view = wifi()
    good = address("10.0.5.2", ETH0)
    view.feed(good + address("10.0.6.2", ETH0)[:20])
    assert view.malformed == 1
    assert view.changed().added == {"10.0.5.2"}


def test_random_and_mutated_bytes_never_raise():
    rng = random.Random(7)
    samples = [link(ETH0), address("10.0.1.2", ETH0), route("10.0.1.1", ETH0),
               address("2001:db8::2", ETH1), done(1)]
    view = wifi()
    for _ in range(3000):
        data = bytearray(rng.choice(samples) * rng.randint(1, 3))
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[:rng.randrange(len(data))]
        view.feed(bytes(data))
        view.feed(rng.randbytes(rng.randint(0, 64)))
        view.changed()
    assert len(view.addresses) <= nl.MAX_ADDRESSES and len(view.routes) <= nl.MAX_ROUTES
    assert len(view.links) <= nl.MAX_LINKS
    assert view.malformed > 0


def test_bounds_hold_against_a_flood_of_addresses():
    view = wifi()
    for n in range(nl.MAX_ADDRESSES + 50):
        view.feed(address(f"10.1.{n // 250}.{n % 250 + 1}", ETH0))
    assert len(view.addresses) == nl.MAX_ADDRESSES


def test_the_monitor_says_why_it_cannot_watch(monkeypatch):
    from mahole import netmonitor

    def refused(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(netmonitor.socket, "socket", refused)
    monitor = netmonitor.NetworkMonitor(lambda change: None)
    assert not monitor.start()
    assert monitor.status()["monitor"] == "unavailable: Operation not permitted"
    monitor.close()
