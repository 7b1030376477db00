"""What the kernel says about this host's network (Linux rtnetlink, RFC 3549), sans-IO.

`NetworkView` reads rtnetlink datagrams (the answers to its dumps and the notifications of
the groups in `GROUPS`) and keeps what a node needs to notice a move to another network:
the usable local addresses (up interfaces, not tentative or failed) and each address
family's default route (gateway, interface and metric of the best one). It sends its own
dumps one after another (the kernel runs one dump per socket at a time) through
`datagrams_to_send`, and `changed()` says what moved since the last time it was asked.

Nothing here reads the clock or a socket: the asyncio shell (mahole/netmonitor.py) feeds
datagrams and debounces. Every datagram is the kernel's, but it is parsed as if hostile:
a malformed or truncated message raises ValueError inside and is dropped and counted
(`malformed`), the rest of the datagram with it.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

# linux/rtnetlink.h multicast groups (RTMGRP_*): links, addresses, routes of both families.
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
GROUPS = (RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE
          | RTMGRP_IPV6_ROUTE)

# linux/netlink.h: struct nlmsghdr (RFC 3549 §2.3.2) and the control messages.
_NLMSGHDR = struct.Struct("=IHHII")
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
# linux/rtnetlink.h message types.
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, proto, scope, type, flags
_RTGENMSG = struct.Struct("=Bxxx")
_RTATTR = struct.Struct("=HH")
IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x1, 0x8, 0x40
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_DADFAILED, IFA_F_TENTATIVE = 0x08, 0x40
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_TABLE = 1, 4, 5, 6, 15
RT_TABLE_MAIN, RTN_UNICAST = 254, 1
RT_SCOPE_LINK, RT_SCOPE_HOST = 253, 254
_FAMILIES = {socket.AF_INET: 4, socket.AF_INET6: 16}

# Bounds: a host with more is not a node's host; what is beyond them is not tracked.
MAX_LINKS = 256
MAX_ADDRESSES = 256
MAX_ROUTES = 64


@dataclass(frozen=True)
class Route:
    """A default route: the best (lowest metric) of its address family is the one used."""
    family: int
    gateway: str | None
    ifindex: int
    metric: int

    def __str__(self):
        via = f"via {self.gateway} " if self.gateway else ""
        return f"{via}dev #{self.ifindex}"


@dataclass(frozen=True)
class Change:
    """What moved between two looks: addresses gone and added, default routes replaced."""
    gone: frozenset
    added: frozenset
    routes: bool  # a family's default route changed (another gateway or interface, or none)
    reason: str


def _align(n):
    return (n + 3) & ~3


def _attrs(data, offset, end):
    """{type: bytes} of the rtattrs in data[offset:end] (RFC 3549 §2.3.2.2); ValueError
    on one that runs past the message."""
    attrs = {}
    while offset + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > end:
            raise ValueError(f"attribute of {length} bytes at {offset} runs past the message")
        attrs.setdefault(kind & 0x3FFF, data[offset + _RTATTR.size:offset + length])
        offset += _align(length)
    return attrs


def _ip(family, raw):
    size = _FAMILIES.get(family)
    if size is None or raw is None or len(raw) != size:
        raise ValueError(f"address of {0 if raw is None else len(raw)} bytes for family {family}")
    return str(ipaddress.ip_address(raw))


def _u32(raw, default=0):
    if raw is None:
        return default
    if len(raw) != 4:
        raise ValueError(f"u32 attribute of {len(raw)} bytes")
    return struct.unpack("=I", raw)[0]


def dump_request(kind, seq, family=socket.AF_UNSPEC):
    """An RTM_GET* dump request (nlmsghdr + rtgenmsg)."""
    body = _RTGENMSG.pack(family)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP,
                          seq, 0) + body


class NetworkView:
    """This host's usable addresses and default routes, from rtnetlink (see the module)."""

    def __init__(self):
        self.links = {}  # ifindex -> usable (up and running, not loopback)
        self.addresses = {}  # (ifindex, ip) -> usable (not tentative, not failed)
        self.routes = {}  # (family, table-less key) -> Route
        self.malformed = 0  # datagrams (or their tails) dropped as malformed
        self.overruns = 0  # the kernel dropped notifications: dumped again
        self.ready = False  # every dump answered: the view is whole
        self._dumps = []
        self._seq = 0
        self._waiting = None  # seq of the dump under way
        self._outbox = []
        self._last = None  # the (addresses, routes) changed() last compared against
        self.resync()

    # -- input ---------------------------------------------------------------------------

    def resync(self):
        """Dump links, addresses and routes again (at start, and after the kernel dropped
        notifications: ENOBUFS, NLMSG_OVERRUN). The view starts over: what was missed
        may be a deletion, and changed() compares only once the dumps are answered."""
        self.links, self.addresses, self.routes = {}, {}, {}
        self.ready = False
        self._dumps = [RTM_GETLINK, RTM_GETADDR, RTM_GETROUTE]
        self._waiting = None
        self._next_dump()

    def datagrams_to_send(self):
        out, self._outbox = self._outbox, []
        return out

    def feed(self, data):
        """One datagram from the netlink socket."""
        offset = 0
        try:
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size or offset + length > len(data):
                    raise ValueError(f"message of {length} bytes at {offset} in a datagram "
                                     f"of {len(data)}")
                self._message(kind, seq, data, offset + _NLMSGHDR.size, offset + length)
                offset += _align(length)
            if offset < len(data) and len(data) - offset >= 4:
                raise ValueError(f"{len(data) - offset} bytes after the last message")
        except ValueError:
            self.malformed += 1

    def _message(self, kind, seq, data, start, end):
        if kind in (NLMSG_DONE, NLMSG_ERROR):
            if self._waiting is not None and seq == self._waiting:
                self._next_dump()
        elif kind == NLMSG_OVERRUN:
            self.overruns += 1
            self.resync()
        elif kind in (RTM_NEWLINK, RTM_DELLINK):
            self._link(kind, data, start, end)
        elif kind in (RTM_NEWADDR, RTM_DELADDR):
            self._address(kind, data, start, end)
        elif kind in (RTM_NEWROUTE, RTM_DELROUTE):
            self._route(kind, data, start, end)

    def _next_dump(self):
        if not self._dumps:
            self._waiting = None
            self.ready = True
            return
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        self._waiting = self._seq
        self._outbox.append(dump_request(self._dumps.pop(0), self._seq))

    def _link(self, kind, data, start, end):
        if end - start < _IFINFOMSG.size:
            raise ValueError("short ifinfomsg")
        _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(data, start)
        usable = (kind == RTM_NEWLINK and flags & IFF_UP and flags & IFF_RUNNING
                  and not flags & IFF_LOOPBACK)
        if kind == RTM_DELLINK:
            self.links.pop(index, None)
            for key in [k for k in self.addresses if k[0] == index]:
                del self.addresses[key]
            for key in [k for k, r in self.routes.items() if r.ifindex == index]:
                del self.routes[key]
        elif index in self.links or len(self.links) < MAX_LINKS:
            self.links[index] = bool(usable)

    def _address(self, kind, data, start, end):
        if end - start < _IFADDRMSG.size:
            raise ValueError("short ifaddrmsg")
        family, _prefix, flags, scope, index = _IFADDRMSG.unpack_from(data, start)
        if family not in _FAMILIES:
            return
        attrs = _attrs(data, start + _IFADDRMSG.size, end)
        raw = attrs.get(IFA_LOCAL, attrs.get(IFA_ADDRESS))
        ip = _ip(family, raw)
        flags = _u32(attrs.get(IFA_FLAGS), flags)
        key = (index, ip)
        if kind == RTM_DELADDR or scope >= RT_SCOPE_LINK:
            self.addresses.pop(key, None)  # link-local and host scope: never a candidate
            if kind == RTM_DELADDR and family == socket.AF_INET and not any(
                    i == index and ":" not in a for i, a in self.addresses):
                # The kernel flushes the IPv4 routes of an interface that lost its last
                # address without a notification for each (fib_disable_ip): so here too.
                for k in [k for k, r in self.routes.items()
                          if r.ifindex == index and r.family == socket.AF_INET]:
                    del self.routes[k]
        elif key in self.addresses or len(self.addresses) < MAX_ADDRESSES:
            self.addresses[key] = not flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)

    def _route(self, kind, data, start, end):
        if end - start < _RTMSG.size:
            raise ValueError("short rtmsg")
        family, dst_len, _src, _tos, table, _proto, _scope, rtype, _flags = \
            _RTMSG.unpack_from(data, start)
        if family not in _FAMILIES:
            return
        attrs = _attrs(data, start + _RTMSG.size, end)
        table = _u32(attrs.get(RTA_TABLE), table)
        if dst_len != 0 or table != RT_TABLE_MAIN or rtype != RTN_UNICAST:
            return  # not a default route of the main table
        gateway = _ip(family, attrs[RTA_GATEWAY]) if RTA_GATEWAY in attrs else None
        route = Route(family, gateway, _u32(attrs.get(RTA_OIF)), _u32(attrs.get(RTA_PRIORITY)))
        key = (family, route.metric, route.ifindex, route.gateway)
        if kind == RTM_DELROUTE:
            self.routes.pop(key, None)
        elif key in self.routes or len(self.routes) < MAX_ROUTES:
            self.routes[key] = route

    # -- output --------------------------------------------------------------------------

    def usable_addresses(self):
        """Addresses of up interfaces, not tentative or failed (link-local ones left out)."""
        return frozenset(ip for (index, ip), ok in self.addresses.items()
                         if ok and self.links.get(index, True))

    def default_routes(self):
        """Each family's best default route on an up interface: {family: Route}."""
        best = {}
        for route in self.routes.values():
            if not self.links.get(route.ifindex, True):
                continue
            held = best.get(route.family)
            if held is None or route.metric < held.metric:
                best[route.family] = route
        return best

    @property
    def settled(self):
        """Whole, and compared once (changed() has its baseline)."""
        return self.ready and self._last is not None

    def changed(self):
        """The Change since the last call (None if nothing a node cares about moved, or the
        view is not whole yet). The first call after the dumps sets the baseline."""
        if not self.ready:
            return None
        now = (self.usable_addresses(), self.default_routes())
        last, self._last = self._last, now
        if last is None or last == now:
            return None
        (old_addrs, old_routes), (addrs, routes) = last, now
        gone, added = old_addrs - addrs, addrs - old_addrs
        moved = {f for f in set(old_routes) | set(routes)
                 if old_routes.get(f) != routes.get(f)}
        parts = []
        if gone:
            parts.append("address " + ", ".join(sorted(gone)) + " gone")
        if added:
            parts.append("address " + ", ".join(sorted(added)) + " added")
        for family in sorted(moved):
            name = "IPv6" if family == socket.AF_INET6 else "IPv4"
            old, new = old_routes.get(family), routes.get(family)
            parts.append(f"{name} default route {old or 'none'} -> {new or 'none'}")
        if not parts:
            return None
        return Change(frozenset(gone), frozenset(added), bool(moved), "; ".join(parts))
