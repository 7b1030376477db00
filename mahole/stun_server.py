"""The intermediate's STUN responder, with RFC 5780 NAT behaviour discovery.

It answers Binding requests with the source address they came from (XOR-MAPPED-ADDRESS,
RFC 8489 §14.2). An intermediate given ``--stun-alt-port`` (and ``--stun-alt-ip``) has more
*observers*, sockets that answer STUN only, so a client can tell how its NAT maps and filters
(RFC 5780 §4.3, §4.4; `mahole.netcheck` is that client). Observers are named by
``(ip, port)`` indices, 0 the primary and 1 the alternate, as in RFC 5780 §3:

    (0, 0)  the main socket (--listen): QUIC, relay frames and STUN
    (0, 1)  the --listen host at --stun-alt-port
    (1, 1)  --stun-alt-ip at --stun-alt-port (only with --stun-alt-ip)

(1, 0), the alternate IP at the main port, is not opened: a main socket bound to a wildcard
holds that port on every address. The client's tests use (1, 1) where RFC 5780 uses (1, 0)
for mapping (a different IP *and* port tells the same thing once (0, 1) has been compared).

Answers carry OTHER-ADDRESS (RFC 5780 §7.4), the alternate (1, 1) — or (0, 1) without an
alternate IP — and RESPONSE-ORIGIN (§7.3), the observer answering. An observer bound to a
wildcard names it (``0.0.0.0`` or ``::``): the client reads "the host I sent to". A
CHANGE-REQUEST (§7.2) is answered from the observer at the other IP and/or port; one that
cannot be honoured (no such observer, or not of the client's address family) gets 420 listing
CHANGE-REQUEST, as §7.2 says.

Every byte is an attacker's, and a server answering from other addresses is what a reflector
is made of, so: an answer goes only to the request's source address, one answer per request
(whichever observer sends it), within the same per-source and total rate limits as every STUN
answer (`SourceLimiter`); RESPONSE-PORT (§7.5), which would send it elsewhere, is not
implemented (it is comprehension-required, so such a request gets 420); malformed requests are
counted and dropped. The answer is a few tens of bytes, like any Binding success.

Binding lifetime discovery (`mahole.binding_lifetime`): a request carrying RESPONSE-DELAY
(mahole's comprehension-optional attribute, `mahole.wire.stun`) is answered after that many
ms, by the observer it reached, to its source, with RESPONSE-DELAY echoed: if the client's NAT
mapping expired meanwhile the answer is dropped on the way, which is the measurement (what
RFC 5780 §4.6 does with RESPONSE-PORT, without ever sending to an address that did not ask).
Held answers are bounded: at most :data:`MAX_RESPONSE_DELAY` later, :data:`MAX_DELAYED_PER_SOURCE`
per source host (so many answers timed to land at once on a spoofed source are still that
few) and :data:`MAX_DELAYED` in all; a request beyond these is answered at once, without the
echo, which tells the client it was not held.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
import socket

from .endpoint import plain_addr
from .wire import stun

log = logging.getLogger(__name__)

__all__ = ["AltObserver", "StunResponder", "open_alt_observers"]

PRIMARY = (0, 0)
ALT_PORT = (0, 1)
ALT_BOTH = (1, 1)
_CHANGE_REQUEST_TYPE = 0x0003  # RFC 5780 §7.2, for UNKNOWN-ATTRIBUTES in a 420
MAX_RESPONSE_DELAY = 150.0  # s: netcheck's longest probe is 120 s
MAX_DELAYED_PER_SOURCE = 32
MAX_DELAYED = 1024  # a held answer is ~200 bytes: 200 KB at most


def _family(host):
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


class StunResponder:
    """Decides the answer to one datagram at one observer (no I/O).

    ``origins`` maps each observer's key to the address it is bound to; ``limiter`` is the
    intermediate's per-source limiter (``allow(host, now)``), ``counters`` its counter dict
    (``stun_*`` keys)."""

    def __init__(self, origins, limiter, counters):
        self.origins = dict(origins)
        self.limiter = limiter
        self.counters = counters
        other = self.origins.get(ALT_BOTH) or self.origins.get(ALT_PORT)
        self.other_address = plain_addr(other) if other else None
        for key in ("stun_changed", "stun_change_refused", "stun_delayed",
                    "stun_delay_refused"):
            counters.setdefault(key, 0)
        self._delayed: list = []  # heap of (due, seq, observer key, payload, addr)
        self._delayed_by_source: dict = {}  # host -> answers held
        self._seq = 0

    def _can_send(self, key, addr):
        """Whether observer ``key`` exists and can reach ``addr`` (same address family)."""
        origin = self.origins.get(key)
        if origin is None:
            return False
        host = plain_addr(addr)[0]
        bound = origin[0]
        if _family(bound) == 4:
            return _family(host) == 4
        # An IPv6 socket: a wildcard one is dual-stack (bind_udp), a specific one is not.
        return ipaddress.ip_address(bound).is_unspecified or _family(host) == 6

    def handle(self, data, addr, at, now):
        """``(observer key, payload)`` to send back to ``addr``, or None (dropped)."""
        counters = self.counters
        try:
            request = stun.decode(data, classic=True)
        except ValueError:
            counters["stun_malformed"] += 1
            return None
        if (request.method != stun.METHOD_BINDING
                or request.message_class != stun.CLASS_REQUEST):
            counters["stun_malformed"] += 1
            return None
        counters["stun_requests"] += 1
        if not self.limiter.allow(addr[0], now):
            counters["stun_rate_limited"] += 1
            return None
        change_ip, change_port = request.attributes.get("CHANGE-REQUEST", (False, False))
        target = (at[0] ^ int(change_ip), at[1] ^ int(change_port))
        unknown = request.unknown_required()
        if target != at and not self._can_send(target, addr):
            # RFC 5780 §7.2: a CHANGE-REQUEST the server cannot honour gets 420.
            counters["stun_change_refused"] += 1
            unknown += (_CHANGE_REQUEST_TYPE,)
        if unknown:
            # RFC 8489 §6.3.1: list the comprehension-required attributes we do not know.
            counters["stun_unknown_attributes"] += 1
            response = stun.binding_error(request, 420, "Unknown Attribute",
                                          unknown_attributes=unknown[:32])
            return at, stun.encode(response, fingerprint=not request.classic)
        # §12.2: an RFC 3489 client gets MAPPED-ADDRESS (binding_success picks it).
        counters["stun_classic"] += int(request.classic)
        extra = {}
        if not request.classic and self.other_address is not None:
            extra = {"response_origin": plain_addr(self.origins[target]),
                     "other_address": self.other_address}
        counters["stun_changed"] += int(target != at)
        delay = request.attributes.get("RESPONSE-DELAY")
        if delay is not None and not request.classic:
            host = addr[0]
            held = self._delayed_by_source.get(host, 0)
            if (delay / 1000 <= MAX_RESPONSE_DELAY and held < MAX_DELAYED_PER_SOURCE
                    and len(self._delayed) < MAX_DELAYED):
                response = stun.binding_success(request, plain_addr(addr),
                                                response_delay=delay, **extra)
                self._seq += 1
                heapq.heappush(self._delayed, (now + delay / 1000, self._seq, target,
                                               stun.encode(response, fingerprint=True), addr))
                self._delayed_by_source[host] = held + 1
                counters["stun_delayed"] += 1
                return None
            counters["stun_delay_refused"] += 1  # answered at once, without the echo
        response = stun.binding_success(request, plain_addr(addr), **extra)
        return target, stun.encode(response, fingerprint=not request.classic)

    def next_delayed(self):
        """When the next held answer is due, or None."""
        return self._delayed[0][0] if self._delayed else None

    def delayed_due(self, now):
        """The held answers due by ``now``: [(observer key, payload, addr)]."""
        out = []
        while self._delayed and self._delayed[0][0] <= now:
            _, _, key, payload, addr = heapq.heappop(self._delayed)
            host = addr[0]
            left = self._delayed_by_source[host] - 1
            if left:
                self._delayed_by_source[host] = left
            else:
                del self._delayed_by_source[host]
            out.append((key, payload, addr))
        return out


class AltObserver:
    """One STUN-only socket of the intermediate (--stun-alt-port / --stun-alt-ip)."""

    def __init__(self, sock, key, on_datagram, loop):
        self.sock = sock
        self.key = key
        self.loop = loop
        self._on_datagram = on_datagram
        self.local_address = sock.getsockname()
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self):
        for _ in range(64):  # a bounded batch per wake-up
            try:
                data, addr = self.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an ICMP error reported on the socket
            self._on_datagram(data, addr, self.key)

    def send(self, payload, addr):
        host, port = plain_addr(addr)
        if self.sock.family == socket.AF_INET6 and _family(host) == 4:
            host = "::ffff:" + host
        try:
            self.sock.sendto(payload, (host, port))
        except OSError as exc:  # full buffer, unreachable: a STUN answer may be lost
            log.debug("STUN observer %s: send to %s failed: %s", self.key, addr, exc)

    def close(self):
        try:
            self.loop.remove_reader(self.sock.fileno())
        except (ValueError, OSError):
            pass
        self.sock.close()


def _bind(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        # A wildcard alt-port socket and the alt IP's at the same port coexist: the kernel
        # gives each datagram to the most specific one.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and ipaddress.ip_address(host).is_unspecified:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot bind UDP {host}:{port}: {exc.strerror or exc}") \
            from None
    return sock


def open_alt_observers(listen_host, alt_port, alt_ip, on_datagram, loop):
    """The observers beyond the main socket: ``{key: AltObserver}``. Raises OSError."""
    observers = {}
    try:
        if not alt_port:
            return observers
        observers[ALT_PORT] = AltObserver(_bind(listen_host, alt_port), ALT_PORT, on_datagram,
                                          loop)
        if alt_ip:
            observers[ALT_BOTH] = AltObserver(_bind(alt_ip, alt_port), ALT_BOTH, on_datagram,
                                              loop)
    except OSError:
        for observer in observers.values():
            observer.close()
        raise
    return observers
