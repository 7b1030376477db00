"""Path MTU discovery for the end-to-end QUIC connection of a session (DPLPMTUD, RFC 8899, as
QUIC does it, RFC 9000 §14.3), sans-IO: one `PathMtu` per route, told the time.

Every QUIC path carries 1,200-byte packets (RFC 9000 §14.1), so a session starts there. On each
route — the direct route to one peer address, and the relay — the session sends probes: 1-RTT
packets of a chosen size holding only PING and PADDING (RFC 9000 §14.4), which the peer
acknowledges like any packet. A probe that is acknowledged proves the size works on that route;
one that is lost `MAX_PROBES` times in a row proves it does not. The sizes are searched by
trying the ceiling first, then halving the interval between the largest size known to work
and the smallest known not to, to within `SEARCH_RESOLUTION` bytes. The ceiling is the UDP
payload the local link towards the route's next hop carries (the kernel's route MTU: 1,472
bytes on 1,500-byte Ethernet, 16,383 on loopback, where `MAX_PACKET` caps it), or the
configured one, minus the relay header on the relay route (the relay frame wraps the QUIC
packet, RFC 8899 §4.4: the packetization layer accounts for headers below it).

Sizes here are QUIC packet sizes, i.e. what aioquic's `max_datagram_size` limits.

A size that stops working is noticed by confirmation probes of the current size, sent every
`CONFIRM_INTERVAL` and at once when the shell suspects a black hole (RFC 8899 §4.3: packets
lost while small ones get through, which the shell sees as QUIC probe timeouts). If the
current size is lost `MAX_PROBES` times the route falls back to `BASE_PLPMTU` and searches
again below the size that failed. A completed search looks above again after
`RAISE_INTERVAL` (RFC 8899 §5.1.1 PMTU_RAISE_TIMER), so a path that grew is used.
"""

BASE_PLPMTU = 1200  # RFC 9000 §14.1: every QUIC path carries it (RFC 8899 §5.1.2 BASE_PLPMTU)
# Largest UDP payload on a 1,500-byte Ethernet MTU: 1500 - 20 (IPv4 header) - 8 (UDP header);
# the ceiling when the local link's MTU is unknown.
DEFAULT_MAX_UDP_PAYLOAD = 1472
IPV6_EXTRA_HEADER = 20  # an IPv6 header is 40 bytes, 20 more than IPv4's
IPV4_UDP_HEADERS = 28  # IPv4 (20) and UDP (8) headers: a link MTU less these is the payload
# Largest QUIC packet mahole sends: aioquic writes each frame's length in a 2-byte varint
# (RFC 9000 §16: at most 16,383), so a STREAM frame filling a larger packet is malformed and
# the peer closes the connection (FRAME_ENCODING_ERROR).
MAX_PACKET = 16383
MAX_PROBES = 3  # RFC 8899 §5.1.2: probes of one size lost before it is taken as not working
SEARCH_RESOLUTION = 8  # bytes: the search stops when the bounds are this close
CONFIRM_INTERVAL = 30.0  # s between confirmations of the current size above the base
RAISE_INTERVAL = 600.0  # s: RFC 8899 §5.1.1 PMTU_RAISE_TIMER
UNSENT_RETRY = 1.0  # s before a probe that could not be sent is tried again

SEARCHING, SEARCH_COMPLETE = "searching", "search complete"


def route_ceiling(max_udp_payload, ipv6, header=0, link_mtu=None):
    """The largest QUIC packet to try on a route. `max_udp_payload`: the configured UDP
    payload ceiling, or None for the local link's: `link_mtu` (the MTU of the link towards
    the route's next hop, None if unknown: then a 1,500-byte Ethernet MTU's) less the IPv4
    and UDP headers. Less the extra IPv6 header when the next hop is IPv6, less `header`
    bytes the route wraps each packet in (the relay frame's); never over `MAX_PACKET`."""
    if max_udp_payload is None:
        max_udp_payload = (DEFAULT_MAX_UDP_PAYLOAD if link_mtu is None
                           else link_mtu - IPV4_UDP_HEADERS)
    ceiling = max_udp_payload - (IPV6_EXTRA_HEADER if ipv6 else 0) - header
    return max(BASE_PLPMTU, min(MAX_PACKET, ceiling))


class PathMtu:
    """The packet size of one route and the search for a larger one.

    The shell asks `next_probe(now)` (a size to send a probe of now, or None), reports each
    probe's fate with `probe_acked(size, now)` / `probe_lost(size, now)` (or
    `probe_unsent(size, now)` when it could not go out), applies `plpmtu`
    (the size packets may have) whenever it changes, and wakes it at `next_timer()`.
    `suspect(now)` asks for a confirmation of the current size at once.
    """

    def __init__(self, ceiling, now, *, base=BASE_PLPMTU):
        if ceiling < base:
            raise ValueError(f"ceiling {ceiling} below the base packet size {base}")
        self.base = base
        self.ceiling = ceiling
        self.plpmtu = base
        self.state = SEARCHING
        self.probes_sent = 0
        self.probes_acked = 0
        self.probes_lost = 0
        self.black_holes = 0  # times the current size stopped working
        self._works = base  # the largest size known to work
        self._fails = ceiling + 1  # the smallest size known not to work (or past the ceiling)
        self._in_flight = None  # size of the probe awaiting its fate
        self._losses = 0  # consecutive losses of that size
        self._confirming = False
        self._due = now  # when the next probe may go; None: nothing to send
        self._confirm_at = None
        self._raise_at = None

    def next_probe(self, now):
        """The size of the probe to send now, or None."""
        if self._in_flight is not None:
            return None
        self._wake(now)
        if self._due is None or now < self._due:
            return None
        if self._confirming:
            size = self.plpmtu
        elif self._works >= self.ceiling or self._fails - self._works <= SEARCH_RESOLUTION:
            self._search_complete(now)
            return None
        elif self._fails > self.ceiling:
            size = self.ceiling  # most paths carry the ceiling or far less: try it first
        else:
            size = (self._works + self._fails) // 2
        self._in_flight = size
        self._due = None
        self.probes_sent += 1
        return size

    def probe_acked(self, size, now):
        if size != self._in_flight:
            return  # a probe of a search that was restarted
        self._in_flight = None
        self._losses = 0
        self.probes_acked += 1
        if self._confirming:
            self._confirming = False
            self._confirm_at = now + CONFIRM_INTERVAL
            return
        self._works = max(self._works, size)
        self.plpmtu = self._works
        self._due = now

    def probe_lost(self, size, now):
        if size != self._in_flight:
            return
        self._in_flight = None
        self.probes_lost += 1
        self._losses += 1
        self._due = now
        if self._losses < MAX_PROBES:
            return
        self._losses = 0
        if self._confirming:
            # A black hole: the size that worked does not any more. Back to what every path
            # carries, and search again below the size that failed.
            self._confirming = False
            self.black_holes += 1
            self.plpmtu = self._works = self.base
            self._confirm_at = None
            self.state = SEARCHING
        self._fails = min(self._fails, size)

    def probe_unsent(self, size, now):
        """The probe could not be sent (the connection was not ready): try again later."""
        if size != self._in_flight:
            return
        self._in_flight = None
        self.probes_sent -= 1
        self._due = now + UNSENT_RETRY

    def suspect(self, now):
        """Packets are being lost: confirm the current size at once (when above the base)."""
        if self.plpmtu > self.base and not self._confirming:
            self._confirming = True
            if self._in_flight is None:
                self._due = now

    def next_timer(self):
        """When `next_probe` may have something to send (None: only after an event)."""
        if self._in_flight is not None:
            return None
        times = [t for t in (self._due, self._confirm_at, self._raise_at) if t is not None]
        return min(times) if times else None

    def _wake(self, now):
        if self._confirm_at is not None and now >= self._confirm_at:
            self._confirm_at = None
            self._confirming = True
            self._due = now
        if self._raise_at is not None and now >= self._raise_at:
            self._raise_at = None
            self._fails = self.ceiling + 1
            self.state = SEARCHING
            if not self._confirming:
                self._due = now

    def _search_complete(self, now):
        self.state = SEARCH_COMPLETE
        self._due = None
        if self.plpmtu > self.base and self._confirm_at is None:
            self._confirm_at = now + CONFIRM_INTERVAL
        if self._fails <= self.ceiling:
            self._raise_at = now + RAISE_INTERVAL

    def stats(self):
        return {
            "size": self.plpmtu,
            "ceiling": self.ceiling,
            "state": self.state,
            "probes_sent": self.probes_sent,
            "probes_acked": self.probes_acked,
            "probes_lost": self.probes_lost,
            "black_holes": self.black_holes,
        }
