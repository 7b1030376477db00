"""Port prediction for NATs that allocate external ports in sequence, sans-IO.

A symmetric NAT (RFC 4787 §4.1, address-and-port-dependent mapping) gives the node's socket a
new external port for every new destination, so the address the intermediate observes is not
the one the peer will see, and checks from a peer behind a port-restricted NAT never reach it.
Many such NATs take the ports in order (RFC 4787 §4.2.1 calls this "port contiguity"): the
mapping to the peer is then one of the next few ports after the last one observed.

:class:`MappingProbe` makes two observations of one socket's mappings, both new: a Binding
request to the intermediate's main port, then one to the observer its answer names in
OTHER-ADDRESS (RFC 5780 §7.4; the intermediate's ``--stun-alt-port``). Two ports a small
constant step apart (:func:`sequential_step`) mean sequential allocation; the same port twice
means endpoint-independent mapping (nothing to predict); anything else is random.

:func:`predicted_candidates` turns the last observed port into the next ``count`` ports as
srflx candidates with their own foundation and a lower local preference than the observed one.
They go into the node's offer like any candidate: the peer checks them because they were
offered, and only those (never a scan). The node's own checks to the peer leave from its one
socket and make the new mapping whose port was predicted.

Nothing here opens sockets or reads the clock.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional

from ..wire import stun
from .candidates import (
    Addr,
    Candidate,
    candidate_priority,
    foundation,
    ip_version,
    normalize_addr,
)

__all__ = [
    "DEFAULT_COUNT",
    "MAX_STEP",
    "MappingProbe",
    "predict_ports",
    "predicted_candidates",
    "sequential_step",
]

# The next ports offered: the node's checks to the peer's host candidates may take a port or
# two before the one to its srflx candidate, and other flows through the NAT take more.
DEFAULT_COUNT = 6
# A step larger than this is called random: with two observations a random NAT looks
# sequential by chance with probability about 2 * MAX_STEP / 64512 (0.05 %).
MAX_STEP = 16
# RFC 8489 §6.2.1: Rc retransmissions with an RTO doubling from 500 ms; fewer here, since a
# lost answer only costs the prediction.
DEFAULT_RTO = 0.5
DEFAULT_TRIES = 3

_LOWEST_PORT = 1024  # a NAT allocating in sequence stays among the unprivileged ports


def sequential_step(ports: list[int]) -> Optional[int]:
    """The allocation step of a NAT that mapped ``ports`` for successive new mappings, or
    None when they are not sequential (a non-constant step, 0, or more than ``MAX_STEP``)."""
    if len(ports) < 2:
        return None
    steps = {(b - a) % 65536 for a, b in zip(ports, ports[1:])}
    if len(steps) != 1:
        return None
    step = steps.pop()
    step = step - 65536 if step > 32768 else step
    return step if step and abs(step) <= MAX_STEP else None


def predict_ports(last_port: int, step: int, count: int = DEFAULT_COUNT) -> list[int]:
    """The ``count`` ports after ``last_port`` by ``step``, wrapping inside 1024..65535."""
    span = 65536 - _LOWEST_PORT
    return [_LOWEST_PORT + (last_port - _LOWEST_PORT + step * i) % span
            for i in range(1, count + 1)]


def predicted_candidates(observed: Candidate, ports: list[int]) -> list[Candidate]:
    """srflx candidates at ``observed``'s IP and each of ``ports``, in order, with the same
    base and local preferences below the observed candidate's, decreasing.

    Each has a foundation of its own ("prediction i" as the server, RFC 8445 §5.1.1.3):
    pairs of one foundation are checked one after another (the rest stay Frozen, §6.1.2.6),
    and the peer must check every predicted port while this node's checks are still
    retransmitted, before its check list gives up."""
    if observed.type != "srflx":
        raise ValueError(f"predictions extend a srflx candidate, not {observed.type}")
    base_ip = observed.base[0].split("%", 1)[0]
    result = []
    for i, port in enumerate(ports, 1):
        addr = (observed.addr[0], port)
        if addr == observed.addr:
            continue
        result.append(Candidate(
            foundation=foundation("srflx", base_ip, f"prediction {i}"),
            priority=candidate_priority("srflx", max(0, observed.local_preference - i)),
            addr=addr,
            type="srflx",
            related_addr=observed.related_addr,
        ))
    return result


class _Request:
    __slots__ = ("dest", "message", "data", "tries", "next_at", "rto")

    def __init__(self, dest: Addr, now: float, rto: float):
        self.dest = dest
        self.message = stun.binding_request()
        self.data = stun.encode(self.message)
        self.tries = 0
        self.next_at = now
        self.rto = rto


class MappingProbe:
    """Two observations of one socket's NAT mappings, from the intermediate at ``server``.

    ``datagrams_to_send()`` -> ``[(bytes, addr)]`` to send from the socket; feed every STUN
    datagram the socket receives to ``receive_stun(data, addr, now)`` (True when it was this
    probe's answer); call ``handle_timer(now)`` at ``get_timer()``. When ``done``:
    ``allocation`` is ``"sequential"`` (``step`` and ``last_port`` set), ``"preserving"``
    (one port for both destinations), ``"random"``, or None (no answer, or no alternate
    observer to ask).
    """

    def __init__(self, server: Addr, now: float, *, rto: float = DEFAULT_RTO,
                 tries: int = DEFAULT_TRIES):
        self.server = normalize_addr(server)
        self.rto = rto
        self.tries = tries
        self.ports: list[int] = []
        self.public_ip: Optional[str] = None
        self.allocation: Optional[str] = None
        self.step: Optional[int] = None
        self.done = False
        self.ignored = 0
        self._request: Optional[_Request] = _Request(self.server, now, rto)
        self._outbox: list[tuple[bytes, Addr]] = []
        self._due(now)

    @property
    def last_port(self) -> Optional[int]:
        return self.ports[-1] if self.ports else None

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        out, self._outbox = self._outbox, []
        return out

    def get_timer(self) -> Optional[float]:
        return None if self._request is None else self._request.next_at

    def handle_timer(self, now: float) -> None:
        self._due(now)

    def predict(self, count: int = DEFAULT_COUNT) -> list[int]:
        """The next ports, or [] unless the NAT allocates in sequence."""
        if self.allocation != "sequential" or self.step is None:
            return []
        return predict_ports(self.ports[-1], self.step, count)

    def receive_stun(self, data: bytes, addr: Any, now: float) -> bool:
        request = self._request
        if request is None or len(data) < 20 or data[8:20] != request.message.transaction_id:
            return False
        try:
            message = stun.decode(data)
            source = normalize_addr(addr)
        except ValueError:
            self.ignored += 1
            return True
        mapped = message.attributes.get("XOR-MAPPED-ADDRESS")
        if (message.message_class != stun.CLASS_SUCCESS or mapped is None
                or source != request.dest):
            self.ignored += 1
            return True
        mapped = normalize_addr(tuple(mapped))
        if self.public_ip is not None and mapped[0] != self.public_ip:
            self._finish(None)  # two public addresses: not one NAT's ports to compare
            return True
        self.public_ip = mapped[0]
        self.ports.append(mapped[1])
        if len(self.ports) == 1:
            other = message.attributes.get("OTHER-ADDRESS")
            if other is None:
                self._finish(None)
                return True
            host = other[0]
            if ipaddress.ip_address(host).is_unspecified:
                host = self.server[0]  # an observer bound to a wildcard: "the host I sent to"
            dest = normalize_addr((host, other[1]))
            # The second request goes where the answer says: only to another observer of
            # the same family, and only this one request (retransmitted at most `tries`).
            if dest == self.server or ip_version(dest[0]) != ip_version(self.server[0]):
                self._finish(None)
                return True
            self._request = _Request(dest, now, self.rto)
            self._due(now)
            return True
        a, b = self.ports
        if a == b:
            self._finish("preserving")
        else:
            self.step = sequential_step(self.ports)
            self._finish("random" if self.step is None else "sequential")
        return True

    def _finish(self, allocation: Optional[str]) -> None:
        self.allocation, self.done, self._request = allocation, True, None

    def _due(self, now: float) -> None:
        request = self._request
        if request is None or now < request.next_at:
            return
        if request.tries >= self.tries:
            self._finish(None)
            return
        request.tries += 1
        self._outbox.append((request.data, request.dest))
        request.next_at = now + request.rto
        request.rto *= 2
