"""Port mapping (sans-IO): ask the home router to forward a public port to the node's socket.

A node behind a NAT that maps per destination (symmetric, RFC 4787 "address and port
dependent") shows every peer a different port, so its server-reflexive candidate is useless
to them. A router that speaks PCP (RFC 6887) or NAT-PMP (RFC 6886) can be asked for a
mapping instead: a fixed external address and port that forwards to the node's socket. The
node offers it as a candidate (see :func:`mahole.ice.candidates.gather`, ``mapped_addr``).

:class:`PortMapper` does no I/O and never reads the clock; like :mod:`mahole.session_core`
it takes ``now`` and produces events (:meth:`PortMapper.next_event`):

- :class:`Send` ``(data, addr)``: a datagram for the gateway's port 5351, from the node's one
  socket (the router maps the source port of the request).
- :class:`MappingUp` ``(external_addr, lifetime, protocol)``: a mapping exists, or its
  external address changed.
- :class:`MappingLost` ``(reason)``: the mapping that was up is gone (the router forgot it,
  a renewal went unanswered to the end of the lease, the router refused to renew).
- :class:`MappingFailed` ``(reason)``: no mapping could be made; nothing more is sent until
  :meth:`PortMapper.restart`.

The order: PCP first (a MAP request with a random nonce); a router that only speaks NAT-PMP
answers it with "unsupported version" (RFC 6887 §9) and NAT-PMP is asked at once; a router
that answers nothing to PCP's tries is asked with NAT-PMP too. A mapping is renewed at half
its lifetime; a router whose epoch goes back has restarted and forgot it (RFC 6887 §8.5,
RFC 6886 §3.6), and is asked again at once. :meth:`PortMapper.close` deletes it (lifetime 0).

Everything from the network is hostile: an answer counts only if it comes from the gateway's
port 5351, answers a request in flight, names our internal port and (PCP) repeats our nonce.
Anything else is dropped and counted (``dropped``).
"""

from __future__ import annotations

import ipaddress
import os
import random
from dataclasses import dataclass
from typing import Optional, Union

from .wire import natpmp, pcp

__all__ = [
    "Send", "MappingUp", "MappingLost", "MappingFailed", "PortMapper", "epoch_valid",
    "PCP_TRIES", "DEFAULT_LIFETIME", "MIN_RENEW",
]

Addr = tuple[str, int]

# RFC 6887 §8.1.1 leaves MRC at 0 (retry for ever); a node that must start without a
# mapping bounds it: 3 tries (at about 3, 6 and 12 s) and then NAT-PMP is asked.
PCP_TRIES = 3
# RFC 6886 §3.3 recommends 7200 s; the router may grant less.
DEFAULT_LIFETIME = 7200
# A router granting a lease of a few seconds would have us renew in a loop: never renew
# more often than this.
MIN_RENEW = 2.0


@dataclass(frozen=True)
class Send:
    """A datagram for the gateway (its port 5351), from the node's socket."""

    data: bytes
    addr: Addr


@dataclass(frozen=True)
class MappingUp:
    """The router forwards ``external_addr`` to the node's socket for ``lifetime`` seconds
    (renewed before then); ``protocol`` is ``"pcp"`` or ``"natpmp"``."""

    external_addr: Addr
    lifetime: int
    protocol: str


@dataclass(frozen=True)
class MappingLost:
    """The mapping that was up is gone; ``reason`` says why (a new attempt may follow)."""

    reason: str


@dataclass(frozen=True)
class MappingFailed:
    """No mapping could be made; ``reason`` says why."""

    reason: str


Event = Union[Send, MappingUp, MappingLost, MappingFailed]


def epoch_valid(protocol: str, prev_server: int, prev_client: float, curr_server: int,
                curr_client: float) -> bool:
    """Whether the router's epoch (seconds since its mapping table began) is consistent with
    the time that passed here; False means it restarted and lost its mappings.

    PCP, RFC 6887 §8.5: invalid if it went back by more than one second, or if
    ``client_delta + 2 < server_delta - server_delta / 16`` or
    ``server_delta + 2 < client_delta - client_delta / 16``.
    NAT-PMP, RFC 6886 §3.6: invalid if it is below ``prev + client_delta * 7 / 8 - 2``."""
    client_delta = curr_client - prev_client
    if protocol == "natpmp":
        return curr_server >= prev_server + client_delta * 7 / 8 - 2
    if curr_server + 1 < prev_server:
        return False
    server_delta = curr_server - prev_server
    if client_delta + 2 < server_delta - server_delta / 16:
        return False
    if server_delta + 2 < client_delta - client_delta / 16:
        return False
    return True


def _usable_external(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not (ip.is_unspecified or ip.is_multicast or ip.is_loopback)


class PortMapper:
    """One UDP mapping of ``internal_port`` at the router ``gateway`` (an IP address).

    ``client_addr`` is the node's own address as the gateway sees it (the source address of
    the requests: PCP carries it, RFC 6887 §11.1). ``rng`` gives the nonce and the
    retransmission jitter (tests pass a seeded one)."""

    def __init__(self, gateway: str, client_addr: str, internal_port: int, *,
                 lifetime: int = DEFAULT_LIFETIME, port: int = pcp.PORT,
                 rng: Optional[random.Random] = None) -> None:
        if not 0 < internal_port <= 0xFFFF:
            raise ValueError(f"internal port {internal_port} out of range")
        self.gateway = (str(ipaddress.ip_address(gateway)), port)
        self.client_addr = client_addr
        self.internal_port = internal_port
        self.lifetime = lifetime
        self.rng = rng or random.Random(os.urandom(16))
        self.nonce = self.rng.randbytes(pcp.NONCE_LEN)
        self.state = "idle"  # idle, requesting, mapped, failed, closed
        self.protocol: Optional[str] = None  # the protocol being asked, or that mapped
        self.external_addr: Optional[Addr] = None
        self.expires_at: Optional[float] = None  # end of the current lease
        self.granted = 0  # the lease the router gave, s
        self.last_error: Optional[str] = None
        self.dropped = 0  # datagrams from the gateway's port that were no usable answer
        self.mappings = 0  # MappingUp events so far
        self.renewing = False
        self._events: list[Event] = []
        self._tries = 0
        self._retransmit_at: Optional[float] = None
        self._interval = 0.0
        self._renew_at: Optional[float] = None
        self._epoch: Optional[tuple[int, float]] = None  # (router's epoch, our time then)
        # NAT-PMP needs two answers: the external address (§3.2) and the port (§3.3).
        self._natpmp_address: Optional[str] = None
        self._natpmp_port: Optional[tuple[int, int]] = None  # (external port, lifetime)

    # Driving ---------------------------------------------------------------------------
    def start(self, now: float) -> None:
        """Ask for a mapping (PCP first)."""
        if self.state in ("requesting", "mapped", "closed"):
            return
        self._begin("pcp", now)

    def restart(self, now: float) -> None:
        """Start over (a network change): forget any mapping and ask again."""
        if self.state == "closed":
            return
        if self.state == "mapped":
            self._lost("the network changed", now, again=False)
        self._epoch = None
        self._begin("pcp", now)

    def close(self, now: float) -> None:
        """Delete the mapping (lifetime 0, RFC 6887 §15, RFC 6886 §3.4), best effort: one
        datagram, not retransmitted, as the node is going away."""
        if self.state == "closed":
            return
        if self.state in ("mapped", "requesting") and self.protocol is not None:
            self._send(self._request(self.protocol, lifetime=0))
        self.state = "closed"
        self._retransmit_at = self._renew_at = self.expires_at = None

    def next_timer(self) -> Optional[float]:
        times = [t for t in (self._retransmit_at, self._renew_at, self.expires_at)
                 if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        if self.state == "closed":
            return
        if self.expires_at is not None and now >= self.expires_at:
            self._lost("the lease ended without a renewal", now, again=True)
            return
        if self._renew_at is not None and now >= self._renew_at:
            self._renew_at = None
            self.renewing = True
            self._ask(now)
            return
        if self._retransmit_at is not None and now >= self._retransmit_at:
            self._retransmit(now)

    def next_event(self) -> Optional[Event]:
        return self._events.pop(0) if self._events else None

    def datagram_received(self, data: bytes, addr: Addr, now: float) -> bool:
        """An answer from the gateway; False (and counted in ``dropped``) if it is none we
        asked for. ``addr`` must already be normalised (plain IPv4, not ``::ffff:``)."""
        if (addr[0], addr[1]) != self.gateway or self._retransmit_at is None:
            self.dropped += 1
            return False
        try:
            if self.protocol == "pcp":
                return self._pcp_answer(pcp.decode(data), now)
            return self._natpmp_answer(natpmp.decode(data), now)
        except ValueError as exc:
            self.last_error = f"bad answer from the gateway: {exc}"
            self.dropped += 1
            return False

    def status(self, now: float) -> dict:
        return {
            "state": self.state,
            "protocol": self.protocol,
            "gateway": self.gateway[0],
            "external_addr": None if self.external_addr is None else
            f"{self.external_addr[0]}:{self.external_addr[1]}",
            "lifetime_s": self.granted if self.state == "mapped" else None,
            "expires_in_s": round(self.expires_at - now, 1)
            if self.expires_at is not None and self.state == "mapped" else None,
            "last_error": self.last_error,
            "dropped": self.dropped,
        }

    # Requests --------------------------------------------------------------------------
    def _begin(self, protocol: str, now: float) -> None:
        self.state = "requesting"
        self.protocol = protocol
        self.renewing = False
        self._tries = 0
        self._natpmp_address = self._natpmp_port = None
        self._ask(now)

    def _ask(self, now: float) -> None:
        """Send the current protocol's request(s) and arm the retransmission."""
        self._tries = 0
        # NAT-PMP: ask the external address again too, to notice it changed.
        self._natpmp_address = self._natpmp_port = None
        # §8.1.1: RT = (1 + RAND) * IRT, RAND in [-0.1, +0.1]; NAT-PMP §3.1: 250 ms.
        self._interval = (pcp.INITIAL_RETRANSMIT * (1 + self.rng.uniform(-0.1, 0.1))
                          if self.protocol == "pcp" else natpmp.INITIAL_RETRANSMIT)
        self._transmit(now)

    def _transmit(self, now: float) -> None:
        assert self.protocol is not None
        self._tries += 1
        if self.protocol == "natpmp" and self._natpmp_address is None:
            self._send(natpmp.external_address_request())
        if self.protocol == "pcp" or self._natpmp_port is None:
            self._send(self._request(self.protocol, lifetime=self.lifetime))
        self._retransmit_at = now + self._interval

    def _retransmit(self, now: float) -> None:
        limit = PCP_TRIES if self.protocol == "pcp" else natpmp.MAX_TRIES
        if self._tries >= limit:
            self._retransmit_at = None
            if self.renewing:
                return  # keep the lease until it ends; expires_at decides
            if self.protocol == "pcp":
                self._begin("natpmp", now)  # no PCP server: perhaps NAT-PMP
            else:
                self._fail("no answer to PCP or NAT-PMP from the gateway "
                           f"{self.gateway[0]}")
            return
        if self.protocol == "pcp":  # §8.1.1: RT = (1 + RAND) * MIN(2 * RTprev, MRT)
            self._interval = (1 + self.rng.uniform(-0.1, 0.1)) * min(2 * self._interval,
                                                                     pcp.MAX_RETRANSMIT)
        else:  # RFC 6886 §3.1: doubling
            self._interval *= 2
        self._transmit(now)

    def _request(self, protocol: str, *, lifetime: int) -> bytes:
        suggested = self.external_addr[1] if self.external_addr is not None else 0
        if protocol == "pcp":
            return pcp.map_request(self.client_addr, self.internal_port, self.nonce,
                                   lifetime=lifetime, external_port=suggested)
        if lifetime == 0:
            return natpmp.map_request(self.internal_port, 0, 0)  # §3.4: delete
        return natpmp.map_request(self.internal_port, suggested, lifetime)

    def _send(self, data: bytes) -> None:
        self._events.append(Send(data, self.gateway))

    # Answers ---------------------------------------------------------------------------
    def _pcp_answer(self, answer: Union[pcp.MapResponse, pcp.UnsupportedVersion],
                    now: float) -> bool:
        if isinstance(answer, pcp.UnsupportedVersion):
            if self.state == "requesting":  # RFC 6887 §9: the router speaks NAT-PMP only
                self._begin("natpmp", now)
                return True
            self.dropped += 1
            return False
        if answer.result != pcp.SUCCESS:
            # An error answer repeats the request's MAP fields (RFC 6887 §7.2), so it must
            # carry our nonce. One without them (too short to) is believed only before a
            # mapping exists: otherwise anyone on the LAN could end ours with one.
            if (answer.nonce != self.nonce if answer.nonce
                    else self.state == "mapped" or self.renewing):
                self.dropped += 1
                return False
            self._refused(pcp.RESULTS.get(answer.result, f"result {answer.result}"), now)
            return True
        if answer.nonce != self.nonce or answer.internal_port != self.internal_port:
            self.dropped += 1  # §11.2: not an answer to this mapping's request
            return False
        if not answer.external_port or not _usable_external(answer.external_address):
            self.dropped += 1
            self.last_error = "the gateway answered with an unusable external address"
            return False
        self._granted(now, answer.epoch, (answer.external_address, answer.external_port),
                      answer.lifetime)
        return True

    def _natpmp_answer(self, answer: Union[natpmp.ExternalAddress, natpmp.Mapping],
                       now: float) -> bool:
        # NAT-PMP has no nonce: the internal port is all that ties an answer to our request.
        # A refusal that does not name it (a short one, or an external address refusal) is
        # believed only before a mapping exists, as for PCP.
        if answer.result == natpmp.SUCCESS or getattr(answer, "internal_port", 0):
            mismatch = getattr(answer, "internal_port", self.internal_port) != self.internal_port
        else:
            mismatch = self.state == "mapped" or self.renewing
        if mismatch:
            self.dropped += 1
            return False
        if answer.result != natpmp.SUCCESS:
            self._refused(natpmp.RESULTS.get(answer.result, f"result {answer.result}"), now)
            return True
        if isinstance(answer, natpmp.ExternalAddress):
            if not _usable_external(answer.address):
                self.dropped += 1
                self.last_error = "the gateway has no usable external address"
                return False
            if not self._check_epoch("natpmp", answer.epoch, now):
                return True
            self._natpmp_address = answer.address
        else:
            if not answer.external_port:
                self.dropped += 1
                return False
            if not self._check_epoch("natpmp", answer.epoch, now):
                return True
            self._natpmp_port = (answer.external_port, answer.lifetime)
        if self._natpmp_address is not None and self._natpmp_port is not None:
            port, lifetime = self._natpmp_port
            address, self._natpmp_port = self._natpmp_address, None
            self._granted(now, None, (address, port), lifetime)
        return True

    def _check_epoch(self, protocol: str, epoch: int, now: float) -> bool:
        """Record the router's epoch; on a jump back (it restarted and forgot every
        mapping) start over and return False."""
        previous, self._epoch = self._epoch, (epoch, now)
        if previous is None or epoch_valid(protocol, previous[0], previous[1], epoch, now):
            return True
        if self.state == "mapped" or self.renewing:
            self._lost("the router restarted and forgot the mapping (its epoch went back)",
                       now, again=False)
        self._epoch = (epoch, now)
        self._begin(protocol, now)  # RFC 6887 §8.5, RFC 6886 §3.6: map again at once
        return False

    def _granted(self, now: float, epoch: Optional[int], external: Addr, lifetime: int) -> None:
        if epoch is not None and not self._check_epoch("pcp", epoch, now):
            return
        if lifetime <= 0:
            self._refused("the gateway granted no lifetime", now)
            return
        changed = self.state != "mapped" or external != self.external_addr
        self.state = "mapped"
        self.renewing = False
        self.external_addr = external
        self.granted = lifetime
        self.last_error = None
        self._retransmit_at = None
        self.expires_at = now + lifetime
        self._renew_at = now + max(lifetime / 2, MIN_RENEW)  # RFC 6886 §3.3: at half
        if changed:
            self.mappings += 1
            self._events.append(MappingUp(external, lifetime, self.protocol or "?"))

    def _refused(self, why: str, now: float) -> None:
        """The router answered with an error: NAT-PMP is worth asking after a PCP refusal;
        after NAT-PMP's there is nothing left to ask."""
        self.last_error = f"{self.protocol} refused: {why}"
        self._retransmit_at = None
        if self.state == "mapped" or self.renewing:
            self._lost(f"the router refused to renew the mapping ({why})", now, again=False)
        if self.protocol == "pcp":
            self._begin("natpmp", now)
        else:
            self._fail(self.last_error)

    def _lost(self, reason: str, now: float, *, again: bool) -> None:
        self.external_addr = None
        self.expires_at = self._renew_at = self._retransmit_at = None
        self.renewing = False
        self.state = "idle"
        self.last_error = reason
        self._events.append(MappingLost(reason))
        if again:
            self._epoch = None
            self._begin("pcp", now)

    def _fail(self, reason: str) -> None:
        self.state = "failed"
        self.last_error = reason
        self._retransmit_at = self._renew_at = self.expires_at = None
        self._events.append(MappingFailed(reason))
