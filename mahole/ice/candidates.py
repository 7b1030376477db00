"""ICE candidates (RFC 8445 §5.1): priorities, foundations, gathering, pair priorities.

Pure functions and one frozen dataclass, no I/O except :func:`host_addresses`, which reads the
machine's interface table through ``ifaddr`` (never by parsing command output).

Addresses are ``(host, port)`` tuples normalised by :func:`normalize_addr`: the host is the
``ipaddress`` text form, and an IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, as a dual-stack
socket reports IPv4 peers) becomes plain IPv4, so one peer has one address whichever socket saw
it. An I/O layer using a dual-stack ``AF_INET6`` socket maps IPv4 destinations back when sending.

Worked numbers (RFC 8445 §5.1.2.1, component 1)::

    host,  local preference 65535: (126 << 24) | (65535 << 8) | 255 = 2130706431  (0x7EFFFFFF)
    srflx, local preference 65535: (100 << 24) | (65535 << 8) | 255 = 1694498815  (0x64FFFFFF)
    prflx, local preference 65535: (110 << 24) | (65535 << 8) | 255 = 1862270975  (0x6EFFFFFF)
    relay, local preference 65535: (  0 << 24) | (65535 << 8) | 255 =   16777215  (0x00FFFFFF)
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Iterable, Literal, Optional

from ..wire import control

__all__ = [
    "CANDIDATE_TYPES",
    "MAX_LOCAL_PREFERENCE",
    "TYPE_PREFERENCE",
    "Addr",
    "Candidate",
    "as_candidate",
    "candidate_priority",
    "format_addr",
    "foundation",
    "gather",
    "host_addresses",
    "ip_version",
    "is_link_local",
    "local_preference_of",
    "local_preferences",
    "normalize_addr",
    "pair_priority",
    "precedence",
]

Addr = tuple[str, int]
CandidateType = Literal["host", "srflx", "prflx", "relay"]
CANDIDATE_TYPES: tuple[str, ...] = ("host", "srflx", "prflx", "relay")  # RFC 8445 §5.1.1

# RFC 8445 §5.1.2.2: recommended type preferences.
TYPE_PREFERENCE: dict[str, int] = {"host": 126, "prflx": 110, "srflx": 100, "relay": 0}

# RFC 8445 §5.1.2.1: the local preference is 16 bits; 65535 when there is one address.
MAX_LOCAL_PREFERENCE = 65535

# RFC 8839 §5.1: foundation = 1*32 ice-char.
_FOUNDATION_LENGTH = 8

_WILDCARDS = ("", "0.0.0.0", "::")

# RFC 8445 §5.1.1.1: IPv4-compatible IPv6 addresses (deprecated, RFC 4291 §2.5.5.1) and IPv6
# site-local addresses (deprecated, RFC 3879) MUST NOT be host candidates; neither are the
# old 6bone test addresses (RFC 3701), which RFC 6724 ranks with them.
_NEVER_GATHERED = tuple(ipaddress.ip_network(n) for n in ("::/96", "fec0::/10", "3ffe::/16"))

# RFC 8421 §4 orders host candidates by the precedence of RFC 6724 §2.1's default policy
# table: native IPv6 (::/0, 40) before IPv4 (::ffff:0:0/96, 35) before 6to4 (2002::/16, 30),
# Teredo (2001::/32, 5) and unique local addresses (fc00::/7, 3), which are likelier to be
# unreachable, or slow, than IPv4.
_PRECEDENCE_NATIVE_IPV6 = 40
_PRECEDENCE_IPV4 = 35
_PRECEDENCE_TABLE = tuple((ipaddress.ip_network(n), p) for n, p in (
    ("2002::/16", 30),  # 6to4
    ("2001::/32", 5),  # Teredo
    ("fc00::/7", 3),  # unique local (RFC 4193)
))


# --------------------------------------------------------------------------------------------
# Addresses


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def normalize_addr(addr: Addr) -> Addr:
    """``(host, port)`` with the host in ``ipaddress`` text form and IPv4-mapped IPv6 unmapped.

    Accepts an ``AF_INET6`` socket address ``(host, port, flowinfo, scope_id)`` too (the scope
    travels in the host text, ``fe80::1%eth0``, as ``recvfrom`` reports it). Raises
    ``ValueError`` when ``addr`` is not an (IP literal, 0..65535) pair."""
    if isinstance(addr, (tuple, list)) and len(addr) == 4:
        addr = (addr[0], addr[1])
    try:
        host, port = addr
    except (TypeError, ValueError):
        raise ValueError(f"address must be a (host, port) pair, got {addr!r}") from None
    if not isinstance(host, str):
        raise ValueError(f"address host must be an IP literal string, got {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"address port must be an integer in 0..65535, got {port!r}")
    return (str(_ip(host)), port)


def ip_version(host: str) -> int:
    """4 or 6 (an IPv4-mapped IPv6 address counts as IPv4)."""
    return _ip(host).version


def is_link_local(host: str) -> bool:
    """169.254.0.0/16 or fe80::/10 (RFC 3927, RFC 4291 §2.5.6)."""
    return _ip(host).is_link_local


def precedence(host: str, *, prefer_ipv6: bool = True) -> int:
    """RFC 6724 §2.1 default policy precedence of ``host`` (higher is better; RFC 8421 §4):
    native IPv6 40, IPv4 35, 6to4 30, Teredo 5, unique local 3, loopback ``::1`` 50. With
    ``prefer_ipv6`` false IPv4 ranks above every IPv6 address but loopback (45)."""
    address = _ip(host.split("%", 1)[0])
    if address.version == 4:
        return _PRECEDENCE_IPV4 if prefer_ipv6 else 45
    if address.is_loopback:
        return 50
    for network, value in _PRECEDENCE_TABLE:
        if address in network:
            return value
    return _PRECEDENCE_NATIVE_IPV6


# --------------------------------------------------------------------------------------------
# Priorities and foundations


def candidate_priority(type: str, local_pref: int = MAX_LOCAL_PREFERENCE, component: int = 1) -> int:
    """RFC 8445 §5.1.2.1: ``(2^24)*type_pref + (2^8)*local_pref + (256 - component_id)``."""
    if type not in TYPE_PREFERENCE:
        raise ValueError(f"unknown candidate type {type!r}")
    if isinstance(local_pref, bool) or not 0 <= local_pref <= MAX_LOCAL_PREFERENCE:
        raise ValueError(f"local preference must be in 0..65535, got {local_pref!r}")
    if isinstance(component, bool) or not 1 <= component <= 256:
        raise ValueError(f"component must be in 1..256, got {component!r}")
    return (TYPE_PREFERENCE[type] << 24) | (local_pref << 8) | (256 - component)


def local_preference_of(priority: int) -> int:
    """The local preference bits of a candidate priority (RFC 8445 §5.1.2.1)."""
    return (priority >> 8) & 0xFFFF


def pair_priority(g: int, d: int) -> int:
    """RFC 8445 §6.1.2.3: ``2^32*MIN(G,D) + 2*MAX(G,D) + (G>D?1:0)``; G is the controlling
    agent's candidate priority, D the controlled agent's."""
    return (min(g, d) << 32) + 2 * max(g, d) + (1 if g > d else 0)


def foundation(type: str, base_ip: str, server: object = None, transport: str = "udp") -> str:
    """RFC 8445 §5.1.1.3: candidates with the same type, base IP address, STUN/TURN server and
    transport share a foundation, and others do not.

    Eight hex digits of a SHA-256 over those four facts: short, stable across runs and hosts,
    made of ice-chars (RFC 8839 §5.1). ``server`` is anything with a stable ``str()`` (the
    intermediate's address, say); None for host candidates."""
    if type not in TYPE_PREFERENCE:
        raise ValueError(f"unknown candidate type {type!r}")
    key = "\x00".join((type, str(_ip(base_ip)), "" if server is None else str(server), transport))
    return hashlib.sha256(key.encode()).hexdigest()[:_FOUNDATION_LENGTH]


# --------------------------------------------------------------------------------------------
# The candidate


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One ICE candidate (RFC 8445 §5.1). ``addr`` is normalised (:func:`normalize_addr`).

    ``related_addr`` is the base behind a srflx/prflx candidate (and the mapped address behind a
    relay candidate); a host candidate has none (RFC 8839 §5.1)."""

    foundation: str
    component: int = 1
    transport: str = "udp"
    priority: int
    addr: Addr
    type: CandidateType
    related_addr: Optional[Addr] = None

    def __post_init__(self) -> None:
        if self.type not in CANDIDATE_TYPES:
            raise ValueError(f"candidate type must be one of {CANDIDATE_TYPES}, got {self.type!r}")
        if self.transport != "udp":
            raise ValueError(f"only udp candidates are supported, got {self.transport!r}")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int) \
                or not 0 <= self.priority < 1 << 32:
            raise ValueError(f"candidate priority must be a 32-bit integer, got {self.priority!r}")
        if isinstance(self.component, bool) or not isinstance(self.component, int) \
                or not 1 <= self.component <= 256:
            raise ValueError(f"candidate component must be in 1..256, got {self.component!r}")
        if not isinstance(self.foundation, str) or not 1 <= len(self.foundation) <= 32 or not all(
            c.isascii() and (c.isalnum() or c in "+/") for c in self.foundation
        ):
            raise ValueError(f"foundation must be 1..32 ice-chars, got {self.foundation!r}")
        object.__setattr__(self, "addr", normalize_addr(self.addr))
        if self.related_addr is not None:
            if self.type == "host":
                raise ValueError("a host candidate has no related_addr")
            object.__setattr__(self, "related_addr", normalize_addr(self.related_addr))

    @property
    def base(self) -> Addr:
        """The base (RFC 8445 §5.1.1.1): a host or relay candidate is its own base; a
        srflx/prflx candidate's base is its related address."""
        if self.type in ("host", "relay") or self.related_addr is None:
            return self.addr
        return self.related_addr

    @property
    def ip_version(self) -> int:
        return ip_version(self.addr[0])

    @property
    def local_preference(self) -> int:
        return local_preference_of(self.priority)

    def to_wire(self) -> control.Candidate:
        """The control-protocol form carried in CandidateOffer / CandidateAnswer."""
        return control.Candidate(
            foundation=self.foundation,
            component=self.component,
            transport=self.transport,
            priority=self.priority,
            addr=self.addr,
            type=self.type,
            related_addr=self.related_addr,
        )

    @classmethod
    def from_wire(cls, wire: control.Candidate) -> "Candidate":
        """From the control-protocol form (ValueError if it is not a usable candidate)."""
        return cls(
            foundation=wire.foundation,
            component=wire.component,
            transport=wire.transport,
            priority=wire.priority,
            addr=tuple(wire.addr),  # type: ignore[arg-type]
            type=wire.type,
            related_addr=None if wire.related_addr is None else tuple(wire.related_addr),  # type: ignore[arg-type]
        )

    def describe(self) -> str:
        """``host 192.0.2.1:4433`` / ``srflx [2001:db8::1]:4433 (base 10.0.0.2:4433)``."""
        text = f"{self.type} {format_addr(self.addr)}"
        if self.related_addr is not None:
            text += f" (related {format_addr(self.related_addr)})"
        return text


def as_candidate(candidate: "Candidate | control.Candidate") -> Candidate:
    """A :class:`Candidate` from either form (ValueError if the wire one is unusable)."""
    if isinstance(candidate, Candidate):
        return candidate
    if isinstance(candidate, control.Candidate):
        return Candidate.from_wire(candidate)
    raise TypeError(f"expected a Candidate, got {type(candidate).__name__}")


def format_addr(addr: Addr) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------------------------
# Gathering


def host_addresses(include_loopback: bool = False, include_link_local: bool = False) -> list[str]:
    """The machine's usable unicast IP addresses (IPv4 and IPv6), from its interfaces.

    Unspecified and multicast addresses are never included, nor IPv4-compatible or site-local
    IPv6 ones (RFC 8445 §5.1.1.1); loopback and link-local only on request. A link-local IPv6 address carries its interface as a scope (``fe80::1%eth0``),
    which sockets need to use it. Order: interface order, without duplicates."""
    import ifaddr  # a dependency; imported here so the pure functions load without it

    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, tuple):  # IPv6: (address, flowinfo, scope_id)
                host = ip.ip[0]
            else:
                host = ip.ip
            try:
                address = ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError:
                continue
            if address.is_unspecified or address.is_multicast:
                continue
            if address.version == 6 and not address.is_loopback and (
                    address.ipv4_mapped is not None
                    or any(address in network for network in _NEVER_GATHERED)):
                continue
            if address.is_loopback and not include_loopback:
                continue
            if address.is_link_local:
                if not include_link_local:
                    continue
                if address.version == 6:
                    host = f"{address}%{adapter.name}"
            text = host if "%" in host else str(address)
            if text not in found:
                found.append(text)
    return found


def local_preferences(hosts: Iterable[str], *, prefer_ipv6: bool = True) -> dict[str, int]:
    """A distinct local preference per base address (RFC 8445 §5.1.2.1, multihomed hosts).

    Routable addresses first, ordered by :func:`precedence` (RFC 8421 §4 with RFC 6724's
    table: native IPv6, then IPv4, then 6to4, Teredo and unique local IPv6; IPv4 first when
    ``prefer_ipv6`` is false), then link-local, then loopback; ties keep the given order. The
    best gets 65535 and each next one less, so any pair with the best host candidate
    outranks the pairs of the same types with worse ones (RFC 8445 §6.1.2.3)."""
    hosts = list(dict.fromkeys(hosts))

    def rank(item: tuple[int, str]) -> tuple[bool, bool, int, int]:
        index, host = item
        address = _ip(host.split("%", 1)[0])
        return (address.is_loopback, address.is_link_local,
                -precedence(host, prefer_ipv6=prefer_ipv6), index)

    ordered = sorted(enumerate(hosts), key=rank)
    return {host: MAX_LOCAL_PREFERENCE - i for i, (_, host) in enumerate(ordered)}


def gather(
    port: int,
    *,
    bound_host: str,
    observed_addr: Optional[Addr] = None,
    relay_addr: Optional[Addr] = None,
    mapped_addr: Optional[Addr] = None,
    include_loopback: bool = False,
    prefer_ipv6: bool = True,
    server: object = None,
) -> list[Candidate]:
    """The local candidates of a socket bound to ``(bound_host, port)``, best first.

    - host: bound to a wildcard (``""``, ``0.0.0.0``, ``::``) every usable interface address at
      ``port`` (IPv4 only for ``0.0.0.0``; both families for ``::``, assuming a dual-stack
      socket); bound to a specific address only that one, even if it is loopback.
    - srflx: ``mapped_addr`` (a port the router maps to this socket: PCP, NAT-PMP), then
      ``observed_addr`` (the intermediate's QAD observation), each unless it equals a
      candidate already there. Their base is the best host candidate of the same family. The
      mapped one is a srflx with its own foundation and the highest local preference, and
      the observed one gets at most 65534 beside it: the mapping ranks between host and
      observed candidates without a new candidate type, which the control protocol's
      strict codec on older nodes and intermediates would refuse (docs/architecture.md).
    - relay: ``relay_addr`` (the intermediate). Informational only: mahole's relay path is
      separate and the check list never runs checks on relay candidates.

    ``server`` names the intermediate in srflx/relay foundations (RFC 8445 §5.1.1.3).
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
        raise ValueError(f"port must be in 1..65535, got {port!r}")
    if bound_host in _WILDCARDS:
        hosts = host_addresses(include_loopback=include_loopback)
        if bound_host == "0.0.0.0":
            hosts = [h for h in hosts if ip_version(h.split("%", 1)[0]) == 4]
    else:
        hosts = [str(_ip(bound_host))]
    server_name = "intermediate" if server is None else server

    preferences = local_preferences(hosts, prefer_ipv6=prefer_ipv6)
    result: list[Candidate] = []
    for host in sorted(hosts, key=lambda h: -preferences[h]):
        result.append(Candidate(
            foundation=foundation("host", host.split("%", 1)[0]),
            priority=candidate_priority("host", preferences[host]),
            addr=(host, port),
            type="host",
        ))

    def best_host(version: int) -> Optional[Candidate]:
        for candidate in result:
            if candidate.type == "host" and candidate.ip_version == version:
                return candidate
        return None

    mapped_added = False
    if mapped_addr is not None:
        mapped = normalize_addr(mapped_addr)
        if all(c.addr != mapped for c in result) and mapped != (
                None if observed_addr is None else normalize_addr(observed_addr)):
            base = best_host(ip_version(mapped[0]))
            base_ip = base.addr[0] if base is not None else mapped[0]
            result.append(Candidate(
                foundation=foundation("srflx", base_ip.split("%", 1)[0], "port-mapping"),
                priority=candidate_priority("srflx", MAX_LOCAL_PREFERENCE),
                addr=mapped,
                type="srflx",
                related_addr=None if base is None else base.addr,
            ))
            mapped_added = True
    if observed_addr is not None:
        observed = normalize_addr(observed_addr)
        if all(c.addr != observed for c in result):
            base = best_host(ip_version(observed[0]))
            local_pref = base.local_preference if base is not None else MAX_LOCAL_PREFERENCE
            if mapped_added:
                local_pref = min(local_pref, MAX_LOCAL_PREFERENCE - 1)
            base_ip = base.addr[0] if base is not None else observed[0]
            result.append(Candidate(
                foundation=foundation("srflx", base_ip.split("%", 1)[0], server_name),
                priority=candidate_priority("srflx", local_pref),
                addr=observed,
                type="srflx",
                related_addr=None if base is None else base.addr,
            ))
    if relay_addr is not None:
        relay = normalize_addr(relay_addr)
        base = best_host(ip_version(relay[0]))
        local_pref = base.local_preference if base is not None else MAX_LOCAL_PREFERENCE
        base_ip = base.addr[0] if base is not None else relay[0]
        related = normalize_addr(observed_addr) if observed_addr is not None else None
        result.append(Candidate(
            foundation=foundation("relay", base_ip.split("%", 1)[0], server_name),
            priority=candidate_priority("relay", local_pref),
            addr=relay,
            type="relay",
            related_addr=related,
        ))
    return result
