"""Birthday probing: a random symmetric NAT against an endpoint-independent one, sans-IO.

A NAT that maps each destination to a random port (RFC 4787 §4.1 address-and-port-dependent
mapping, random allocation) shows the peer a port nobody can predict. When the other side's
NAT maps endpoint-independently (a cone or port-restricted NAT), both sides can still meet by
the birthday paradox:

- the *hard* side opens K extra sockets, each sending to the easy side's offered address
  (:class:`BirthdayOpeners`): K random mappings on its NAT, each open for the easy side's
  address;
- the *easy* side sends up to M probes from its one socket to random ports of the hard side's
  offered public IP (:class:`BirthdayProber`), each opening its own NAT for the hard side's
  port probed. A probe that hits one of the K ports reaches a hard-side socket.

With N ports the NAT allocates from, P(some probe lands) = 1 - (1 - K/N)^M
(:func:`success_probability`): 98 % for K = 256, M = 1,024 and N = 64,512 (1024..65535, the
range of Linux's masquerade). Probes here never repeat a port, which only helps.

Probes and openers are Binding requests signed like the session's connectivity checks
(`CheckList.probe_request`); a socket wins only on a request or a response that the check
list finds authentic, so a stray or forged packet cannot make a route. The landed pair is then
checked like any other: the easy side's check list learns the hard side's port as a
peer-reflexive candidate (`CheckList.learn_remote`), and the hard side's winning socket
answers through the check list. Probes go only to the IP the peer offered, never anywhere
else, at a paced rate, within a node-wide budget (:class:`ProbeBudget`).

Nothing here opens sockets or reads the clock.
"""

from __future__ import annotations

import random
from typing import Callable, Optional

from .candidates import Addr, ip_version, normalize_addr

__all__ = [
    "DEFAULT_PROBES",
    "DEFAULT_SOCKETS",
    "DEFAULT_INTERVAL",
    "PORTS",
    "BirthdayOpeners",
    "BirthdayProber",
    "ProbeBudget",
    "success_probability",
]

DEFAULT_SOCKETS = 256  # K: extra sockets of the hard side
DEFAULT_PROBES = 1024  # M: probes of the easy side
# Between two probes: 1,024 probes take about 4 s, well inside the punching deadline, at a
# rate (250/s, ~30 kB/s) that neither floods a link nor looks like a fast scan.
DEFAULT_INTERVAL = 0.004
PORTS = (1024, 65535)  # where NATs allocate (RFC 6056 §3.2: the ephemeral port range)
# Openers are sent again this often, in case the first ones were lost, and paced this far
# apart so that K sockets do not burst.
OPENER_RESEND = 1.0
OPENER_PACE = 0.001
MAX_LATE_PROBES = 8  # probes sent at once when the timer fired late (a busy loop)
# Node-wide budget: probes per second on average, and the most in one go (two rounds).
BUDGET_RATE = DEFAULT_PROBES / 30.0
BUDGET_BURST = 2 * DEFAULT_PROBES

MakeRequest = Callable[[], tuple[bytes, bytes]]  # -> (transaction id, datagram)


def success_probability(sockets: int, probes: int, ports: int = PORTS[1] - PORTS[0] + 1) -> float:
    """P(at least one of ``probes`` random ports is one of ``sockets`` mapped ports among
    ``ports``): 1 - (1 - K/N)^M."""
    if not 0 <= sockets <= ports:
        raise ValueError("sockets must be within 0..ports")
    return 1.0 - (1.0 - sockets / ports) ** probes


class ProbeBudget:
    """A token bucket of probes shared by every session of a node: birthday probing must not
    turn a node into a port scanner, whatever its peers ask for."""

    def __init__(self, now: float, rate: float = BUDGET_RATE, burst: float = BUDGET_BURST):
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class BirthdayProber:
    """The easy side: up to ``probes`` Binding requests, one per ``interval``, to random ports
    of ``target_ip`` — which must be an IP of ``offered`` (the peer's candidates' addresses):
    never anything the peer did not offer.

    ``datagrams_to_send()`` -> ``[(bytes, addr)]``; ``handle_timer(now)`` at ``get_timer()``;
    feed STUN datagrams to ``receive_stun(data, addr, now)`` (True if it answered one of our
    probes). ``authentic(data)`` says whether a response carries the session's credentials.
    When ``done``: ``landed`` is the address that answered, or None (``reason`` says why).
    """

    def __init__(self, target_ip: str, offered: list[Addr], make_request: MakeRequest,
                 authentic: Callable[[bytes], bool], now: float, *,
                 probes: int = DEFAULT_PROBES, interval: float = DEFAULT_INTERVAL,
                 ports: tuple[int, int] = PORTS, budget: Optional[ProbeBudget] = None,
                 rng: Optional[random.Random] = None):
        target_ip = normalize_addr((target_ip, 1))[0]
        if target_ip not in {normalize_addr(a)[0] for a in offered}:
            raise ValueError(f"{target_ip} is not an address the peer offered")
        if ip_version(target_ip) != 4:
            raise ValueError("birthday probing is for IPv4 NATs")
        low, high = ports
        if not 1 <= low <= high <= 65535 or probes < 0:
            raise ValueError("bad port range or probe count")
        self.target_ip = target_ip
        self._ports = (rng or random.SystemRandom()).sample(range(low, high + 1),
                                                            min(probes, high - low + 1))
        self._make_request = make_request
        self._authentic = authentic
        self.interval = interval
        self.budget = budget
        self.sent = 0
        self.ignored = 0
        self.landed: Optional[Addr] = None
        self.done = False
        self.reason: Optional[str] = None
        self.started_at = now
        self._next_at: Optional[float] = now
        self._probed: dict[bytes, Addr] = {}  # transaction id -> where it went (<= probes)
        self._outbox: list[tuple[bytes, Addr]] = []
        self.handle_timer(now)

    def get_timer(self) -> Optional[float]:
        return None if self.done else self._next_at

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        out, self._outbox = self._outbox, []
        return out

    def handle_timer(self, now: float) -> None:
        if self.done or self._next_at is None or now < self._next_at:
            return
        # One probe per interval; a late timer sends the probes it owes, a few at most.
        owed = min(MAX_LATE_PROBES, 1 + int((now - self._next_at) / self.interval))
        for _ in range(owed):
            if self.sent >= len(self._ports):
                self.stop(f"{self.sent} probes sent, none answered")
                return
            if self.budget is not None and not self.budget.take(now):
                self.stop("the node's probe budget is spent")
                return
            addr = (self.target_ip, self._ports[self.sent])
            transaction_id, data = self._make_request()
            self._probed[transaction_id] = addr
            self._outbox.append((data, addr))
            self.sent += 1
        self._next_at = max(self._next_at + owed * self.interval, now)

    def receive_stun(self, data: bytes, addr: Addr, now: float) -> bool:
        if len(data) < 20:
            return False
        probed = self._probed.get(bytes(data[8:20]))
        if probed is None:
            return False
        if self.done or normalize_addr(addr) != probed or not self._authentic(data):
            self.ignored += 1  # late, from elsewhere (RFC 8445 §7.2.5.2.1), or forged
            return True
        self.landed = probed
        self.stop(f"probe {self.sent} landed")
        return True

    def stop(self, reason: str) -> None:
        """No more probes (landed, spent, or the hole punch ended some other way)."""
        if not self.done:
            self.done, self.reason, self._next_at = True, reason, None


class BirthdayOpeners:
    """The hard side: ``sockets`` extra sockets (the shell opens them; index 0..K-1) each
    send a Binding request to ``target``, the address the easy side offered, opening one
    random mapping each; again every ``resend`` until ``stop``.

    ``datagrams_to_send()`` -> ``[(index, bytes, addr)]``; ``handle_timer(now)`` at
    ``get_timer()``; feed what socket ``index`` receives to ``receive(index, data, addr,
    now)``: True when it made that socket the winner (an authentic request or response from
    ``target``). Then ``winner`` is its index: the shell keeps it as the route to ``target``
    and closes the others at once.
    """

    def __init__(self, target: Addr, sockets: int, make_request: MakeRequest,
                 authentic: Callable[[bytes], bool], now: float, *,
                 resend: float = OPENER_RESEND, pace: float = OPENER_PACE):
        target = normalize_addr(target)
        if ip_version(target[0]) != 4:
            raise ValueError("birthday probing is for IPv4 NATs")
        if sockets < 1:
            raise ValueError("at least one socket")
        self.target = target
        self.sockets = sockets
        self.resend = resend
        self.pace = pace
        self.winner: Optional[int] = None
        self.done = False
        self.sent = 0
        self.ignored = 0
        self._make_request = make_request
        self._authentic = authentic
        self._cursor = 0  # next socket to send from in this round
        self._next_at: Optional[float] = now
        self._outbox: list[tuple[int, bytes, Addr]] = []
        self.handle_timer(now)

    def get_timer(self) -> Optional[float]:
        return None if self.done else self._next_at

    def datagrams_to_send(self) -> list[tuple[int, bytes, Addr]]:
        out, self._outbox = self._outbox, []
        return out

    def handle_timer(self, now: float) -> None:
        if self.done or self._next_at is None or now < self._next_at:
            return
        # Paced: as many sockets as the time since the last slot allows, at least one.
        count = max(1, int((now - self._next_at) / self.pace) + 1) if self.pace > 0 \
            else self.sockets
        for _ in range(min(count, self.sockets - self._cursor)):
            _transaction_id, data = self._make_request()
            self._outbox.append((self._cursor, data, self.target))
            self._cursor += 1
            self.sent += 1
        if self._cursor >= self.sockets:
            self._cursor = 0
            self._next_at = now + self.resend
        else:
            self._next_at = now + self.pace

    def receive(self, index: int, data: bytes, addr: Addr, now: float) -> bool:
        if (self.done or not 0 <= index < self.sockets or normalize_addr(addr) != self.target
                or not self._authentic(data)):
            self.ignored += 1
            return False
        self.winner = index
        self.stop()
        return True

    def stop(self) -> None:
        self.done, self._next_at = True, None
