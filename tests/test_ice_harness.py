"""Test harness for the sans-IO ICE code: a fake clock and an in-memory network with NATs.
No sockets, no sleeps.

The other ``test_ice_*`` modules import from here; the tests at the bottom check the harness
itself (a harness that lies would make every ICE test meaningless). Node schedulers are the
real ``mahole._fast.Scheduler``; the ICE tests run against both of its implementations through
the conftest ``sched`` fixture (each module's ``make_scheduler`` fixture).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytest

from mahole._fast import Scheduler
from mahole.ice.candidates import Candidate, candidate_priority, foundation
from mahole.wire import stun

Addr = tuple[str, int]


# --------------------------------------------------------------------------------------------
# Candidates


def host(ip: str, port: int, local_pref: int = 65535, fnd: Optional[str] = None) -> Candidate:
    return Candidate(foundation=fnd or foundation("host", ip), priority=candidate_priority("host", local_pref),
                     addr=(ip, port), type="host")


def srflx(ip: str, port: int, base: Candidate, fnd: Optional[str] = None) -> Candidate:
    return Candidate(foundation=fnd or foundation("srflx", base.addr[0], "intermediate"),
                     priority=candidate_priority("srflx", base.local_preference),
                     addr=(ip, port), type="srflx", related_addr=base.addr)


# --------------------------------------------------------------------------------------------
# Network


class Nat:
    """A NAT with one public IP. ``mapping``: "endpoint-independent" (one public port per
    inside address) or "address-and-port-dependent" (symmetric: one per destination too).
    ``filtering``: "endpoint-independent", "address-dependent" or "address-and-port-dependent"
    (RFC 4787). Public ports start at ``first_port``, so they never equal the inside port."""

    def __init__(self, public_ip: str, *, mapping: str = "endpoint-independent",
                 filtering: str = "address-and-port-dependent", first_port: int = 40000) -> None:
        self.public_ip = public_ip
        self.mapping = mapping
        self.filtering = filtering
        self._ports = itertools.count(first_port)
        self._out: dict[tuple, Addr] = {}
        self._in: dict[Addr, Addr] = {}
        self._sent_to: dict[Addr, set[Addr]] = {}  # public address -> destinations seen

    def outbound(self, src: Addr, dst: Addr) -> Addr:
        key = (src,) if self.mapping == "endpoint-independent" else (src, dst)
        public = self._out.get(key)
        if public is None:
            public = (self.public_ip, next(self._ports))
            self._out[key] = public
            self._in[public] = src
        self._sent_to.setdefault(public, set()).add(dst)
        return public

    def inbound(self, public: Addr, src: Addr) -> Optional[Addr]:
        inside = self._in.get(public)
        if inside is None:
            return None
        seen = self._sent_to.get(public, set())
        if self.filtering == "address-dependent" and all(d[0] != src[0] for d in seen):
            return None
        if self.filtering == "address-and-port-dependent" and src not in seen:
            return None
        return inside


class Firewall:
    """A stateful firewall without NAT, as home routers put in front of IPv6 hosts: anything
    goes out; a datagram comes in only from an address and port the inside address has sent
    to (address-and-port-dependent filtering, RFC 6092 §3.2). ``dropped`` counts the rest."""

    def __init__(self) -> None:
        self._sent_to: dict[Addr, set[Addr]] = {}
        self.dropped = 0

    def outbound(self, src: Addr, dst: Addr) -> None:
        self._sent_to.setdefault(src, set()).add(dst)

    def inbound(self, dst: Addr, src: Addr) -> bool:
        if src in self._sent_to.get(dst, ()):
            return True
        self.dropped += 1
        return False


def _family(ip: str) -> int:
    return 6 if ":" in ip else 4


@dataclass
class Datagram:
    sent_at: float
    sender: str
    src: Addr  # inside address
    wire_src: Addr  # after the sender's NAT
    dst: Addr
    data: bytes
    fate: str = "in-flight"  # delivered / lost / unroutable / filtered / no-source
    arrived_at: Optional[float] = None
    receiver: Optional[str] = None

    def stun(self) -> stun.Message:
        return stun.decode(self.data)


@dataclass(eq=False)
class Node:
    name: str
    agent: Any  # receive_stun / datagrams_to_send / handle_timer
    scheduler: Any
    addrs: list[Addr]
    nat: Optional[Nat] = None
    firewall: Optional[Firewall] = None
    accepted: list[bool] = field(default_factory=list)

    def translated(self, ip: str) -> bool:
        """Whether datagrams of ``ip``'s family pass this node's NAT (a NAT translates its
        own family; a dual-stack node's other family is routed, through ``firewall``)."""
        return self.nat is not None and _family(ip) == _family(self.nat.public_ip)

    def source_for(self, dst: Addr) -> Optional[Addr]:
        v6 = ":" in dst[0]
        return next((a for a in self.addrs if (":" in a[0]) == v6), None)


class Network:
    """Delivers datagrams between nodes after ``latency`` seconds, through their NATs.

    A node behind a NAT is reachable only through the NAT's public mappings (its inside
    addresses do not route from outside); a node without one is reachable at its addresses,
    for those of the other family than its NAT's too (a dual-stack site: IPv4 behind a NAT,
    IPv6 routed), through its ``firewall`` if it has one.
    ``drop(datagram) -> bool`` loses chosen datagrams; ``tamper(datagram) -> bytes`` rewrites
    them in flight. Everything sent is in ``log``."""

    def __init__(self, latency: float = 0.010) -> None:
        self.latency = latency
        self.now = 0.0
        self.nodes: list[Node] = []
        self.log: list[Datagram] = []
        self.drop: Callable[[Datagram], bool] = lambda d: False
        self.tamper: Optional[Callable[[Datagram], bytes]] = None
        self._queue: list[tuple[float, int, Datagram]] = []
        self._seq = itertools.count()

    def add(self, name: str, agent: Any, scheduler: Any, addrs: list[Addr],
            nat: Optional[Nat] = None, firewall: Optional[Firewall] = None) -> Node:
        node = Node(name, agent, scheduler, list(addrs), nat, firewall)
        self.nodes.append(node)
        return node

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    # sending -------------------------------------------------------------------------------

    def flush(self, node: Node) -> None:
        for item in node.agent.datagrams_to_send():
            self.send(node, *item)

    def send(self, node: Node, data: bytes, dst: Addr, src: Optional[Addr] = None) -> Datagram:
        """Send from ``src`` (a test agent may choose) or the node's first address of the
        destination's family (what a wildcard-bound socket does)."""
        src = src or node.source_for(dst)
        datagram = Datagram(self.now, node.name, src or ("", 0), src or ("", 0), dst, data)
        self.log.append(datagram)
        if src is None:
            datagram.fate = "no-source"
            return datagram
        if node.translated(src[0]):
            datagram.wire_src = node.nat.outbound(src, dst)
        elif node.firewall is not None:
            node.firewall.outbound(src, dst)
        if self.drop(datagram):
            datagram.fate = "lost"
            return datagram
        if self.tamper is not None:
            datagram.data = self.tamper(datagram)
        heapq.heappush(self._queue, (self.now + self.latency, next(self._seq), datagram))
        return datagram

    def _arrive(self, datagram: Datagram) -> None:
        datagram.arrived_at = self.now
        for node in self.nodes:
            if not node.translated(datagram.dst[0]) and datagram.dst in node.addrs:
                if node.firewall is not None and not node.firewall.inbound(datagram.dst,
                                                                           datagram.wire_src):
                    datagram.fate = "filtered"
                    return
                target, inside = node, datagram.dst
                break
            if node.nat is not None and datagram.dst[0] == node.nat.public_ip:
                inside = node.nat.inbound(datagram.dst, datagram.wire_src)
                if inside is None:
                    datagram.fate = "filtered"
                    return
                target = node
                break
        else:
            datagram.fate = "unroutable"
            return
        datagram.fate = "delivered"
        datagram.receiver = target.name
        if isinstance(target.agent, Responder):  # it answers from the address it was sent to
            accepted = target.agent.receive_stun(datagram.data, datagram.wire_src, self.now, inside)
        else:
            accepted = target.agent.receive_stun(datagram.data, datagram.wire_src, self.now)
        target.accepted.append(accepted)
        self.flush(target)

    # running -------------------------------------------------------------------------------

    def call(self, node: Node, method: str, *args: Any) -> Any:
        """Call ``node.agent.method(*args, now)`` and send what it produced."""
        result = getattr(node.agent, method)(*args, self.now)
        self.flush(node)
        return result

    def next_time(self) -> Optional[float]:
        times = [n.scheduler.next_deadline() for n in self.nodes]
        times = [t for t in times if t is not None]
        if self._queue:
            times.append(self._queue[0][0])
        return min(times, default=None)

    def run(self, until: float, stop: Optional[Callable[[], bool]] = None, max_steps: int = 100_000) -> None:
        """Advance the clock event by event up to ``until`` (or until ``stop()``)."""
        for _ in range(max_steps):
            if stop is not None and stop():
                return
            when = self.next_time()
            if when is None or when > until:
                self.now = max(self.now, until)
                return
            self.now = max(self.now, when)
            while self._queue and self._queue[0][0] <= self.now:
                self._arrive(heapq.heappop(self._queue)[2])
            for node in self.nodes:
                self._fire(node.scheduler.pop_due(self.now), node)
        raise AssertionError("simulation did not settle (timer loop?)")

    def _fire(self, keys: list, default: Node) -> None:
        """Timer keys are agents, or (agent, tag) tuples; several nodes may share one scheduler
        (as several sessions share their node's)."""
        called: set[int] = set()
        for key in keys:
            target = key[0] if isinstance(key, tuple) else key
            if not hasattr(target, "handle_timer"):
                target = default.agent
            if id(target) in called:
                continue
            called.add(id(target))
            target.handle_timer(self.now)
            node = next((n for n in self.nodes if n.agent is target), default)
            self.flush(node)

    # inspecting ----------------------------------------------------------------------------

    def requests(self, sender: str) -> list[Datagram]:
        """Binding requests sent by ``sender``, retransmissions included."""
        return [d for d in self.log if d.sender == sender and _is_request(d.data)]

    def new_requests(self, sender: str) -> list[Datagram]:
        """First transmissions only (one per transaction id)."""
        seen: set[bytes] = set()
        result = []
        for datagram in self.requests(sender):
            tid = datagram.data[8:20]
            if tid not in seen:
                seen.add(tid)
                result.append(datagram)
        return result


class Responder:
    """A minimal ICE peer for isolating one check list: answers every authenticated request
    to ``ufrag`` with a success (XOR-MAPPED-ADDRESS = source) from the address it was sent
    to, signed with ``pwd``. ``error`` makes it answer with that error code instead."""

    def __init__(self, ufrag: str, pwd: str, error: Optional[int] = None) -> None:
        self.ufrag = ufrag
        self.key = pwd.encode()
        self.error = error
        self.requests: list[tuple[stun.Message, Addr, float]] = []
        self._out: list[tuple[bytes, Addr, Addr]] = []

    def receive_stun(self, data: bytes, addr: Addr, now: float, dst: Optional[Addr] = None) -> bool:
        try:
            message = stun.decode(data, integrity_key=self.key)
        except ValueError:
            return False
        if message.message_class != stun.CLASS_REQUEST:
            return False
        self.requests.append((message, addr, now))
        if self.error is not None:
            response = stun.binding_error(message, self.error, "test")
        else:
            response = stun.binding_success(message, addr)
        self._out.append((stun.encode(response, integrity_key=self.key), addr, dst))
        return True

    def datagrams_to_send(self):
        out, self._out = self._out, []
        return out

    def handle_timer(self, now: float) -> None:
        pass


def _is_request(data: bytes) -> bool:
    try:
        return stun.decode(data).message_class == stun.CLASS_REQUEST
    except ValueError:
        return False


def events(agent: Any) -> list[Any]:
    """Drain an agent's events."""
    found = []
    while (event := agent.next_event()) is not None:
        found.append(event)
    return found


# --------------------------------------------------------------------------------------------
# Tests of the harness itself


@pytest.fixture
def make_scheduler(sched):
    return sched.Scheduler


def test_scheduler_semantics_the_ice_code_relies_on(make_scheduler):
    s = make_scheduler(0.020)
    s.schedule("x", 0.3)
    s.schedule("y", 0.1)
    s.schedule("x", 0.2)  # replaces
    assert s.next_deadline() == pytest.approx(0.1) and s.deadline("x") == pytest.approx(0.2)
    assert list(s.pop_due(0.25)) == ["y", "x"]  # earliest first, removed
    assert s.next_deadline() is None
    assert s.take_pacing_slot(0.0)
    assert not s.take_pacing_slot(0.01)
    assert s.pacing_slot(0.01) == pytest.approx(0.02)
    assert s.take_pacing_slot(s.pacing_slot(0.01))  # exactly at the slot


def test_nat_rewrites_ports_and_filters():
    nat = Nat("203.0.113.1", filtering="address-and-port-dependent")
    public = nat.outbound(("10.0.0.1", 5000), ("198.51.100.2", 6000))
    assert public == ("203.0.113.1", 40000)
    assert nat.inbound(public, ("198.51.100.2", 6000)) == ("10.0.0.1", 5000)
    assert nat.inbound(public, ("198.51.100.2", 6001)) is None  # filtered
    assert nat.outbound(("10.0.0.1", 5000), ("198.51.100.3", 1)) == public  # endpoint-independent
    symmetric = Nat("203.0.113.2", mapping="address-and-port-dependent")
    a = symmetric.outbound(("10.0.0.1", 5000), ("198.51.100.2", 6000))
    b = symmetric.outbound(("10.0.0.1", 5000), ("198.51.100.3", 6000))
    assert a != b


def test_firewall_lets_in_only_what_was_asked_for():
    fw = Firewall()
    inside, peer = ("2001:db8:1::2", 5000), ("2001:db8:2::2", 6000)
    assert not fw.inbound(inside, peer) and fw.dropped == 1  # unsolicited
    fw.outbound(inside, peer)
    assert fw.inbound(inside, peer)  # the reply
    assert not fw.inbound(inside, ("2001:db8:2::2", 6001))  # another port of that host
    assert not fw.inbound(("2001:db8:1::2", 5001), peer)  # another inside port
    assert fw.dropped == 3


class _Echo:
    def __init__(self):
        self.got = []
        self.out = []

    def receive_stun(self, data, addr, now):
        self.got.append((data, addr, now))
        return True

    def datagrams_to_send(self):
        out, self.out = self.out, []
        return out

    def handle_timer(self, now):
        pass


def test_network_delivers_after_latency_through_nat():
    net = Network(latency=0.010)
    a, b = _Echo(), _Echo()
    na = net.add("a", a, Scheduler(), [("10.0.0.1", 5000)], Nat("203.0.113.1"))
    net.add("b", b, Scheduler(), [("198.51.100.2", 6000)])
    net.send(na, b"hello", ("198.51.100.2", 6000))
    net.send(na, b"lost", ("10.9.9.9", 1))
    net.run(until=1.0)
    assert b.got == [(b"hello", ("203.0.113.1", 40000), 0.010)]
    assert [d.fate for d in net.log] == ["delivered", "unroutable"]
