"""How long an idle UDP mapping of this network's NAT lives: binding lifetime discovery, sans-IO.

RFC 5780 §4.6 measures it by letting a mapping idle for T, then asking the server, from
another socket, to answer at the idle mapping (RESPONSE-PORT). mahole's STUN observers never
send to an address that did not ask (mahole.stun_server), and asking again from the same
socket after T proves nothing on a NAT that preserves ports (an expired mapping comes back
with the same port). So the idle time is put on the server's side: a socket sends a Binding
request carrying RESPONSE-DELAY (T ms) and the observer answers *to that request's source*
T seconds later. The request was the mapping's last packet: the answer arriving proves the
mapping lived T idle seconds; a NAT that expired it drops the answer.

Each probe is one fresh socket with one delay. It first exchanges a plain Binding request
and, :data:`WARM_UP` seconds after its first packet, sends the delayed one: a mapping that has
seen answers for a couple of seconds is what a session has, and some NATs keep those longer
(Linux conntrack: ``nf_conntrack_udp_timeout_stream`` rather than ``_udp_timeout``). The
probes run in parallel, the longest first and each :data:`STAGGER` after the previous (the
observers' per-source rate limit is 10 requests/s), so a measurement takes about its longest
delay plus a few seconds; it ends early once the shortest delay that failed and every delay
below it are known.

The verdict (:meth:`LifetimeProbe.result`): ``at_least`` — the longest delay answered with
every shorter one answered too (a lost answer only makes it shorter: conservative);
``below`` — the shortest delay that went unanswered (None: nothing expired within the longest
delay). ``supported`` is False when the observer answered without echoing RESPONSE-DELAY (an
intermediate that does not hold answers): nothing is measured then.

Like `mahole.netcheck`: ``start(now)``, ``datagrams_to_send(now) -> [(sock, bytes, addr)]``,
``datagram_received(sock, data, addr, now)``, ``get_timer()``, ``handle_timer(now)``; sockets
are named by the shell (``"life0"``…, one per delay).
"""

from __future__ import annotations

import dataclasses

from .wire import stun

__all__ = ["FULL_DELAYS", "NODE_DELAYS", "QUICK_DELAYS", "LifetimeProbe", "LifetimeResult",
           "keepalive_for"]

# Delays probed (s): 2 to 25 s in 1-5 s steps for `netcheck --quick` (about 30 s in all), up
# to 120 s (Linux's default for an established UDP flow) for the full measurement.
QUICK_DELAYS = (2, 3, 4, 5, 6, 8, 10, 12, 15, 18, 21, 25)
FULL_DELAYS = QUICK_DELAYS + (30, 40, 50, 60, 75, 90, 105, 120)
# A node only needs what changes its keepalive (lifetime / 3, at most KEEPALIVE_MAX).
NODE_DELAYS = (2, 3, 5, 7, 12, 20, 30, 45, 75)
WARM_UP = 2.5  # s from a probe's first packet to its delayed request (conntrack: 2 s)
STAGGER = 0.25  # s between probes: two requests each, within 10 requests/s per source
GRACE = 2.0  # s after a delayed answer is due before it counts as lost
FIRST_RTO = 0.25
PROBE_TIMEOUT = 1.5  # s a request is retransmitted (netcheck's)

# Keepalive of an idle direct route from a binding lifetime (docs/architecture.md, "The
# session core"): a third of what was proven, so two keepalives in a row may be lost before
# the mapping expires; at most KEEPALIVE_MAX (the QUIC idle timeout also bounds it).
KEEPALIVE_FRACTION = 3
KEEPALIVE_MAX = 25.0


def keepalive_for(at_least, floor, ceiling=KEEPALIVE_MAX):
    """The keepalive (s) for a proven lifetime ``at_least`` (None: not measured): a third of
    it, never under ``floor`` (the configured keepalive) nor over ``ceiling``."""
    if not at_least:
        return floor
    return max(floor, min(at_least / KEEPALIVE_FRACTION, ceiling))


@dataclasses.dataclass
class LifetimeResult:
    at_least: float | None = None  # s: the longest idle time proven survived
    below: float | None = None  # s: the shortest idle time that ended the mapping
    supported: bool | None = None  # None: no answer at all; False: answers are not held
    longest: float | None = None  # s: the longest delay probed

    def as_dict(self):
        return {"at_least_s": self.at_least, "below_s": self.below,
                "supported": self.supported, "longest_probed_s": self.longest}


class _Probe:
    __slots__ = ("sock", "delay", "start_at", "warm", "warm_sent", "warm_next", "warm_rto",
                 "warm_answered", "held", "held_sent", "outcome")

    def __init__(self, sock, delay, start_at):
        self.sock, self.delay, self.start_at = sock, delay, start_at
        self.warm = stun.binding_request()
        self.warm_sent = None  # first sending
        self.warm_next = start_at
        self.warm_rto = FIRST_RTO
        self.warm_answered = False
        self.held = stun.binding_request(response_delay=int(delay * 1000))
        self.held_sent = None
        self.outcome = None  # True answered, False lost, "unheld" answered at once, "fail"


class LifetimeProbe:
    """Binding lifetime against one observer ``target`` (host, port), with one socket per
    delay: ``sockets`` [name, ...] in the order of ``delays`` (seconds)."""

    def __init__(self, target, sockets, delays, *, stagger=STAGGER, warm_up=WARM_UP,
                 grace=GRACE):
        if len(sockets) != len(delays) or not delays:
            raise ValueError("one socket per delay")
        self.target = tuple(target)
        self.delays = [float(d) for d in delays]
        self.sockets = list(sockets)
        self.stagger, self.warm_up, self.grace = stagger, warm_up, grace
        self.probes: list[_Probe] = []
        self._by_tid: dict[bytes, tuple[_Probe, bool]] = {}
        self.malformed = 0
        self.ignored = 0
        self._started = False

    def start(self, now):
        self._started = True
        # The longest first: the measurement takes about the longest delay, not their sum.
        order = sorted(range(len(self.delays)), key=lambda i: -self.delays[i])
        for n, i in enumerate(order):
            probe = _Probe(self.sockets[i], self.delays[i], now + n * self.stagger)
            self.probes.append(probe)
            self._by_tid[probe.warm.transaction_id] = (probe, False)
            self._by_tid[probe.held.transaction_id] = (probe, True)

    # --- the verdict ----------------------------------------------------------------------
    def result(self):
        res = LifetimeResult(longest=max(self.delays))
        outcomes = [p.outcome for p in self.probes]
        if True not in outcomes and False not in outcomes:
            res.supported = False if "unheld" in outcomes else None
            return res
        res.supported = True
        res.below = min((p.delay for p in self.probes if p.outcome is False), default=None)
        for probe in sorted(self.probes, key=lambda p: p.delay):
            if (res.below is not None and probe.delay >= res.below) or probe.outcome is None:
                break  # a shorter delay still waited for caps what is proven
            if probe.outcome is True:
                res.at_least = probe.delay
        return res

    @property
    def done(self):
        if not self._started:
            return False
        if all(p.outcome is not None for p in self.probes):
            return True
        below = self.result().below
        return below is not None and all(p.outcome is not None for p in self.probes
                                         if p.delay < below)

    # --- I/O of the core ------------------------------------------------------------------
    def datagrams_to_send(self, now):
        out = []
        for probe in self.probes:
            if probe.outcome is not None:
                continue
            if not probe.warm_answered:
                if probe.warm_next is not None and probe.warm_next <= now:
                    out.append((probe.sock, stun.encode(probe.warm), self.target))
                    if probe.warm_sent is None:
                        probe.warm_sent = now
                    probe.warm_next = now + probe.warm_rto
                    probe.warm_rto *= 2
                    if probe.warm_next >= probe.warm_sent + PROBE_TIMEOUT:
                        probe.warm_next = None  # last try: wait out the timeout
            elif probe.held_sent is None and now >= probe.warm_sent + self.warm_up:
                out.append((probe.sock, stun.encode(probe.held), self.target))
                probe.held_sent = now
        return out

    def get_timer(self):
        times = []
        for probe in self.probes:
            if probe.outcome is not None:
                continue
            if not probe.warm_answered:
                if probe.warm_next is not None:
                    times.append(probe.warm_next)
                times.append((probe.warm_sent if probe.warm_sent is not None
                              else probe.start_at) + PROBE_TIMEOUT)
            elif probe.held_sent is None:
                times.append(probe.warm_sent + self.warm_up)
            else:
                times.append(probe.held_sent + probe.delay + self.grace)
        return min(times) if times else None

    def handle_timer(self, now):
        for probe in self.probes:
            if probe.outcome is not None:
                continue
            if not probe.warm_answered:
                if probe.warm_sent is not None and now >= probe.warm_sent + PROBE_TIMEOUT:
                    probe.outcome = "fail"  # no answer at all: this probe tells nothing
            elif probe.held_sent is not None and now >= probe.held_sent + probe.delay \
                    + self.grace:
                probe.outcome = False

    def datagram_received(self, sock, data, addr, now):
        try:
            message = stun.decode(data)
        except ValueError:
            self.malformed += 1
            return
        entry = self._by_tid.get(message.transaction_id)
        if (entry is None or entry[0].sock != sock or tuple(addr[:2]) != self.target
                or message.message_class != stun.CLASS_SUCCESS):
            self.ignored += 1
            return
        probe, held = entry
        if not held:
            if not probe.warm_answered and probe.outcome is None:
                probe.warm_answered = True
            return
        if probe.outcome is not None or probe.held_sent is None:
            self.ignored += 1
            return
        if message.attributes.get("RESPONSE-DELAY") is None:
            probe.outcome = "unheld"
        elif now - probe.held_sent >= probe.delay * 0.9:
            probe.outcome = True
        else:
            self.ignored += 1  # too early to be the held answer: not ours to trust
