"""The path layer of an end-to-end session: which route carries each QUIC packet (sans-IO).

aioquic talks to a stable virtual peer address; underneath, a session has up to two routes:
the relay (frames through the intermediate, always available while it is up) and the direct
route (the remote address of the nominated candidate pair). Packets arriving by either route
are handed to the same connection, so streams continue across every switch (DESIGN.md
principle 3, the magicsock approach). Direct packets are accepted only from the nominated
address.
"""

from ._fast._kinds import RELAY_FRAME_TYPE

RELAY = "relay"
DIRECT = "direct"
NONE = "none"


class PathManager:
    """Routes of one session and the choice between them.

    allow_relay=False (--direct-only) drops packets until a direct route exists;
    allow_direct=False (--relay-only) never takes one.
    """

    def __init__(self, session_id, relay_addr, *, allow_relay=True, allow_direct=True):
        self.header = bytes([RELAY_FRAME_TYPE]) + session_id
        self.relay_addr = relay_addr
        self.allow_relay = allow_relay
        self.allow_direct = allow_direct
        self.direct_addr = None
        self.direct_since = None
        self.last_direct_rx = None  # when the last packet arrived by the direct route
        self.switches = []  # (when, route, reason)
        self.packets = {RELAY: 0, DIRECT: 0}
        self.dropped_no_route = 0

    @property
    def name(self):
        if self.direct_addr is not None:
            return DIRECT
        return RELAY if self.allow_relay else NONE

    def use_direct(self, addr, now, reason="nominated"):
        """Send by the direct route to addr from now on (a nominated candidate pair)."""
        if not self.allow_direct:
            raise ValueError("this session is relay-only")
        self.direct_addr = tuple(addr[:2])
        self.direct_since = self.last_direct_rx = now
        self.switches.append((now, DIRECT, reason))

    def use_relay(self, now, reason):
        """Give up the direct route (it failed); the relay carries everything again."""
        if self.direct_addr is not None:
            self.direct_addr = None
            self.switches.append((now, RELAY if self.allow_relay else NONE, reason))

    def outbound(self, data):
        """(datagram, destination) for one QUIC packet, or None to drop it (no route yet)."""
        if self.direct_addr is not None:
            self.packets[DIRECT] += 1
            return data, self.direct_addr
        if self.allow_relay:
            self.packets[RELAY] += 1
            return self.header + data, self.relay_addr
        self.dropped_no_route += 1
        return None

    def inbound(self, addr):
        """Whether a QUIC packet that came straight from addr (not relayed) is accepted."""
        return self.direct_addr is not None and tuple(addr[:2]) == self.direct_addr

    def authenticated(self, addr, now):
        """A packet from addr decrypted: liveness evidence for the direct route."""
        if self.direct_addr is not None and tuple(addr[:2]) == self.direct_addr:
            self.last_direct_rx = now

    def switches_since(self, when):
        return sum(1 for at, _route, _reason in self.switches if at >= when)

    def relay_inbound_allowed(self):
        return self.allow_relay
