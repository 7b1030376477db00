"""The per-session hole-punch coordinator (docs/architecture.md, "An end-to-end session"), sans-IO.

:class:`HolePunch` walks one session from nothing to a result::

    Idle --local_description--> Gathering --> Signaling --start--> WaitingToStart
         --(both descriptions known)--> Checking --> Connected | Failed

``local_description`` makes the ICE credentials (RFC 8445 §5.3) and returns what goes into
``CandidateOffer`` / ``CandidateAnswer``; ``remote_description`` takes the peer's;
``start`` is called on ``StartPunching``. Checking runs a :class:`~mahole.ice.checklist.CheckList`
and ends with one :class:`HolePunchResult`: ``path="direct"`` with the selected pair, or
``path="relay"`` when the checks fail or the deadline (5 s by default, counted from
:meth:`HolePunch.start`) passes first.

The states are one transition table, :data:`TRANSITIONS`; an impossible transition (say
``start`` before ``local_description``) raises :class:`~mahole.ice.checklist.TransitionError`.
A remote description that is not usable raises ``ValueError``.

Timers use the node's shared scheduler under two keys, ``(key, "check")`` (the check list's
retransmissions and pacing) and ``(key, "deadline")``, where ``key`` defaults to the
``HolePunch`` itself: when the scheduler pops either, call ``key.handle_timer(now)``.
"""

from __future__ import annotations

import base64
import enum
import ipaddress
import os
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

from ..wire import control, stun
from .candidates import Addr, Candidate, as_candidate
from .checklist import (
    DEFAULT_MAX_PAIRS,
    DEFAULT_MAX_TRIES,
    DEFAULT_NOMINATION_ATTEMPTS,
    DEFAULT_NOMINATION_GRACE,
    DEFAULT_RTO,
    DEFAULT_TA,
    CheckList,
    ChecksFailed,
    Pair,
    PairNominated,
    SchedulerLike,
    TransitionError,
)

__all__ = [
    "DEFAULT_DEADLINE",
    "TRANSITIONS",
    "HolePunch",
    "HolePunchEvent",
    "HolePunchResult",
    "HolePunchState",
    "ice_string",
]

DEFAULT_DEADLINE = 5.0  # seconds from StartPunching to falling back to the relay
# RFC 8445 §19.5.1 (STUN amplification): a peer's candidates make us send checks to
# addresses it chose, so take at most this many (the best by priority), and never
# addresses no peer can be at.
DEFAULT_MAX_REMOTE_CANDIDATES = 16

# RFC 8445 §5.3: ufrag at least 24 bits of randomness (4+ chars), pwd at least 128 bits (22+
# chars). Base64 of 6 and 18 random bytes gives 8 and 24 ice-chars (A-Z a-z 0-9 + /, RFC 8839
# §5.4), 48 and 144 bits, with no padding.
_UFRAG_BYTES = 6
_PWD_BYTES = 18
_ICE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def ice_string(random_bytes: bytes) -> str:
    """Base64 without padding: every character an ice-char (RFC 8839 §5.4)."""
    return base64.b64encode(random_bytes).decode("ascii").rstrip("=")


def _check_credential(value: Any, what: str, min_len: int) -> str:
    if not isinstance(value, str) or not min_len <= len(value) <= 256 \
            or not set(value) <= _ICE_CHARS:
        raise ValueError(f"remote {what} must be {min_len}..256 ice-chars (RFC 8445 §5.3)")
    return value


class HolePunchState(str, enum.Enum):
    IDLE = "idle"
    GATHERING = "gathering"
    SIGNALING = "signaling"
    WAITING_TO_START = "waiting-to-start"
    CHECKING = "checking"
    CONNECTED = "connected"
    FAILED = "failed"


class HolePunchEvent(str, enum.Enum):
    GATHER = "gather"  # local_description() begins
    GATHERED = "gathered"  # local credentials and candidates ready to send
    REMOTE = "remote"  # remote_description()
    START = "start"  # start() on StartPunching
    READY = "ready"  # started and both descriptions known
    NOMINATED = "nominated"  # the check list selected a pair
    CHECKS_FAILED = "checks-failed"
    DEADLINE = "deadline"
    CLOSE = "close"


_S, _E = HolePunchState, HolePunchEvent
TRANSITIONS: dict[tuple[HolePunchState, HolePunchEvent], HolePunchState] = {
    (_S.IDLE, _E.GATHER): _S.GATHERING,
    (_S.IDLE, _E.REMOTE): _S.IDLE,  # the connector hears the offer before answering
    (_S.GATHERING, _E.GATHERED): _S.SIGNALING,
    (_S.SIGNALING, _E.REMOTE): _S.SIGNALING,
    (_S.SIGNALING, _E.START): _S.WAITING_TO_START,
    (_S.WAITING_TO_START, _E.REMOTE): _S.WAITING_TO_START,
    (_S.WAITING_TO_START, _E.READY): _S.CHECKING,
    (_S.WAITING_TO_START, _E.DEADLINE): _S.FAILED,
    (_S.CHECKING, _E.NOMINATED): _S.CONNECTED,
    (_S.CHECKING, _E.CHECKS_FAILED): _S.FAILED,
    (_S.CHECKING, _E.DEADLINE): _S.FAILED,
    **{(state, _E.CLOSE): _S.FAILED for state in (
        _S.IDLE, _S.GATHERING, _S.SIGNALING, _S.WAITING_TO_START, _S.CHECKING)},
}
del _S, _E


@dataclass(frozen=True)
class HolePunchResult:
    """How hole punching ended. ``path`` is ``"direct"`` (``pair`` is the selected pair,
    ``rtt`` its check RTT) or ``"relay"`` (``reason`` says why). ``elapsed`` counts from
    :meth:`HolePunch.start`, in seconds."""

    path: str
    pair: Optional[Pair]
    rtt: Optional[float]
    elapsed: float
    reason: str

    @property
    def remote_addr(self) -> Optional[Addr]:
        return None if self.pair is None else self.pair.remote.addr

    def to_wire(self, session_id: bytes) -> control.PunchingResult:
        """The ``PunchingResult`` to send to the intermediate."""
        return control.PunchingResult(
            session_id=session_id,
            path=self.path,  # type: ignore[arg-type]
            rtt_ms=None if self.rtt is None else self.rtt * 1000.0,
            elapsed_ms=max(0.0, self.elapsed * 1000.0),
            remote_addr=self.remote_addr if self.path == "direct" else None,
        )


class HolePunch:
    """One session's hole punching (see the module docstring).

    ``controlling`` is True on the agent (it nominates, RFC 8445 §8.1.1) and False on the
    connector. ``urandom`` supplies the credentials' and tie-breaker's randomness (tests pass a
    deterministic one). ``ta``/``rto``/``max_tries``/``nomination_grace``/
    ``nomination_attempts``/``max_pairs`` go to the check list.
    """

    def __init__(
        self,
        controlling: bool,
        scheduler: SchedulerLike,
        *,
        deadline: float = DEFAULT_DEADLINE,
        key: Any = None,
        ta: float = DEFAULT_TA,
        rto: float = DEFAULT_RTO,
        max_tries: int = DEFAULT_MAX_TRIES,
        nomination_grace: float = DEFAULT_NOMINATION_GRACE,
        nomination_attempts: int = DEFAULT_NOMINATION_ATTEMPTS,
        max_pairs: int = DEFAULT_MAX_PAIRS,
        max_remote_candidates: int = DEFAULT_MAX_REMOTE_CANDIDATES,
        allow_loopback: bool = False,
        urandom: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.controlling = bool(controlling)
        self.max_remote_candidates = max_remote_candidates
        self.allow_loopback = allow_loopback
        self.refused_remote_candidates = 0
        self.scheduler = scheduler
        self.deadline = deadline
        self.key = self if key is None else key
        self._check_key = (self.key, "check")
        self._deadline_key = (self.key, "deadline")
        self._checklist_options = dict(ta=ta, rto=rto, max_tries=max_tries,
                                       nomination_grace=nomination_grace,
                                       nomination_attempts=nomination_attempts,
                                       max_pairs=max_pairs)
        self._urandom = urandom

        self.state = HolePunchState.IDLE
        self.tie_breaker = int.from_bytes(urandom(8), "big")  # RFC 8445 §7.1.3
        self.local_ufrag: Optional[str] = None
        self.local_pwd: Optional[str] = None
        self.local_candidates: tuple[Candidate, ...] = ()
        self.remote_ufrag: Optional[str] = None
        self.remote_pwd: Optional[str] = None
        self.remote_candidates: tuple[Candidate, ...] = ()
        self.checklist: Optional[CheckList] = None
        self.result: Optional[HolePunchResult] = None
        self.started_at: Optional[float] = None
        self.checking_at: Optional[float] = None
        self.early_requests = 0
        self._events: deque[HolePunchResult] = deque()

    # ------------------------------------------------------------------------- transitions

    def _transition(self, event: HolePunchEvent) -> None:
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise TransitionError(
                f"hole punch in state {self.state.value} cannot take event {event.value}"
            ) from None

    # ----------------------------------------------------------------------------- public API

    def local_description(
        self, candidates: Iterable[Union[Candidate, control.Candidate]], now: float
    ) -> tuple[str, str, tuple[Candidate, ...]]:
        """Make the local credentials; returns ``(ufrag, pwd, candidates)`` for the offer or
        answer (``[c.to_wire() for c in candidates]`` is the control-protocol form)."""
        self._transition(HolePunchEvent.GATHER)
        self.local_ufrag = ice_string(self._urandom(_UFRAG_BYTES))
        self.local_pwd = ice_string(self._urandom(_PWD_BYTES))
        self.local_candidates = tuple(as_candidate(c) for c in candidates)
        self._transition(HolePunchEvent.GATHERED)
        self._make_checklist()
        return self.local_ufrag, self.local_pwd, self.local_candidates

    def remote_description(
        self,
        ufrag: str,
        pwd: str,
        candidates: Iterable[Union[Candidate, control.Candidate]],
        now: float,
    ) -> None:
        """The peer's credentials and candidates (from CandidateOffer / CandidateAnswer)."""
        if self.remote_ufrag is not None:
            raise ValueError("the remote description was already received")
        ufrag = _check_credential(ufrag, "ufrag", 4)
        pwd = _check_credential(pwd, "pwd", 22)
        converted = self._usable(as_candidate(c) for c in candidates)
        self._transition(HolePunchEvent.REMOTE)
        self.remote_ufrag, self.remote_pwd, self.remote_candidates = ufrag, pwd, converted
        self._make_checklist()
        self._maybe_begin(now)

    def start(self, now: float) -> None:
        """``StartPunching``: check now if both descriptions are known, else as soon as they
        are. The deadline runs from here."""
        self._transition(HolePunchEvent.START)
        self.started_at = now
        self.scheduler.schedule(self._deadline_key, now + self.deadline)
        self._maybe_begin(now)

    def handle_timer(self, now: float) -> None:
        """Drive the check list's timers and enforce the deadline."""
        if self.checklist is not None and self.state in (HolePunchState.CHECKING,
                                                          HolePunchState.CONNECTED):
            self.checklist.handle_timer(now)
            self._pump(now)
        if self.state in (HolePunchState.WAITING_TO_START, HolePunchState.CHECKING) \
                and self.started_at is not None and now >= self.started_at + self.deadline:
            self._transition(HolePunchEvent.DEADLINE)
            self._finish_relay(now, f"no direct path within {self.deadline:g} s")

    def receive_stun(self, data: bytes, addr: Addr, now: float) -> bool:
        """A STUN datagram from ``addr``; True if it belonged to this session."""
        if self.checklist is None:
            return self._early(data)
        handled = self.checklist.receive_stun(data, addr, now)
        self._pump(now)
        return handled

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        return [] if self.checklist is None else self.checklist.datagrams_to_send()

    @property
    def nominating(self) -> Optional[Pair]:
        """The pair this (controlling) side is nominating while its answer is awaited
        (:attr:`CheckList.nominating`), else None."""
        if self.checklist is None or self.state is not HolePunchState.CHECKING:
            return None
        return self.checklist.nominating

    def confirm_nomination(self, addr: Addr, now: float) -> bool:
        """The peer's authenticated packet came from ``addr``: completes a nomination of the
        pair with that remote address (:meth:`CheckList.confirm_nomination`)."""
        if self.nominating is None or self.checklist is None:
            return False
        confirmed = self.checklist.confirm_nomination(addr, now)
        self._pump(now)
        return confirmed

    def next_event(self) -> Optional[HolePunchResult]:
        return self._events.popleft() if self._events else None

    def close(self, now: float, reason: str = "session closed") -> None:
        """Abandon hole punching (the session ended); emits a relay result unless one was
        already produced."""
        if self.state in (HolePunchState.CONNECTED, HolePunchState.FAILED):
            return
        self._transition(HolePunchEvent.CLOSE)
        self._finish_relay(now, reason)

    def _usable(self, candidates: Iterable[Candidate]) -> tuple[Candidate, ...]:
        """The peer's candidates we will send checks to: no unspecified, multicast, broadcast
        or port-0 address, loopback and link-local only where this node itself lives on
        loopback (``allow_loopback``), and at most ``max_remote_candidates``, best first."""
        usable = []
        for candidate in candidates:
            address = ipaddress.ip_address(candidate.addr[0].partition("%")[0])
            if (address.is_unspecified or address.is_multicast or candidate.addr[1] == 0
                    or address == ipaddress.IPv4Address("255.255.255.255")
                    or ((address.is_loopback or address.is_link_local)
                        and not self.allow_loopback)):
                self.refused_remote_candidates += 1
                continue
            usable.append(candidate)
        usable.sort(key=lambda c: c.priority, reverse=True)
        self.refused_remote_candidates += max(len(usable) - self.max_remote_candidates, 0)
        return tuple(usable[: self.max_remote_candidates])

    def stats(self) -> dict[str, Any]:
        """A JSON-friendly summary for status output and PunchingResult logging."""
        result = self.result
        checklist = self.checklist
        return {
            "state": self.state.value,
            "role": "controlling" if (checklist.controlling if checklist else self.controlling)
            else "controlled",
            "path": None if result is None else result.path,
            "reason": None if result is None else result.reason,
            "elapsed_ms": None if result is None else round(result.elapsed * 1000, 3),
            "rtt_ms": None if result is None or result.rtt is None else round(result.rtt * 1000, 3),
            "selected": None if result is None or result.pair is None else result.pair.to_status(),
            "local_candidates": len(self.local_candidates),
            "remote_candidates": len(self.remote_candidates),
            "refused_remote_candidates": self.refused_remote_candidates,
            "pairs": 0 if checklist is None else len(checklist.pairs),
            "pair_states": {} if checklist is None else _count_states(checklist.pairs),
            "pairs_by_family": {} if checklist is None else _count_families(checklist.pairs),
            "early_requests": self.early_requests,
            "counters": {} if checklist is None else dict(checklist.counters),
        }

    # ------------------------------------------------------------------------------ internals

    def _make_checklist(self) -> None:
        if self.checklist is not None or self.local_ufrag is None or self.remote_ufrag is None:
            return
        assert self.local_pwd is not None and self.remote_pwd is not None
        self.checklist = CheckList(
            self.controlling,
            self.tie_breaker,
            self.local_ufrag,
            self.local_pwd,
            self.remote_ufrag,
            self.remote_pwd,
            self.local_candidates,
            self.remote_candidates,
            self.scheduler,
            timer_key=self._check_key,
            **self._checklist_options,
        )

    def _maybe_begin(self, now: float) -> None:
        if self.state is HolePunchState.WAITING_TO_START and self.checklist is not None:
            self._transition(HolePunchEvent.READY)
            self.checking_at = now
            self.checklist.start(now)
            self._pump(now)

    def _early(self, data: bytes) -> bool:
        """A request for our ufrag before the check list exists: ours, but dropped (the peer
        retransmits)."""
        if self.local_ufrag is None:
            return False
        try:
            message = stun.decode(data)
        except ValueError:
            return False
        username = message.attributes.get("USERNAME")
        if message.message_class == stun.CLASS_REQUEST and isinstance(username, str) \
                and username.startswith(self.local_ufrag + ":"):
            self.early_requests += 1
            return True
        return False

    def _pump(self, now: float) -> None:
        assert self.checklist is not None
        while True:
            event = self.checklist.next_event()
            if event is None:
                return
            if self.state is not HolePunchState.CHECKING:
                continue
            if isinstance(event, PairNominated):
                self._transition(HolePunchEvent.NOMINATED)
                self._finish(HolePunchResult("direct", event.pair, event.rtt,
                                             self._elapsed(now), "nominated"))
            elif isinstance(event, ChecksFailed):
                self._transition(HolePunchEvent.CHECKS_FAILED)
                self._finish_relay(now, event.reason)

    def _elapsed(self, now: float) -> float:
        return 0.0 if self.started_at is None else max(0.0, now - self.started_at)

    def _finish_relay(self, now: float, reason: str) -> None:
        if self.checklist is not None:
            self.checklist.close(reason)
        self._finish(HolePunchResult("relay", None, None, self._elapsed(now), reason))

    def _finish(self, result: HolePunchResult) -> None:
        self.result = result
        self._events.append(result)
        self.scheduler.cancel(self._deadline_key)


def _count_families(pairs: list[Pair]) -> dict[str, dict[str, int]]:
    """Pair states per address family: ``{"ipv6": {"succeeded": 1}, "ipv4": {...}}``."""
    families: dict[str, list[Pair]] = {}
    for pair in pairs:
        families.setdefault(f"ipv{pair.local.ip_version}", []).append(pair)
    return {family: _count_states(members) for family, members in sorted(families.items())}


def _count_states(pairs: list[Pair]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for pair in pairs:
        counts[pair.state.value] = counts.get(pair.state.value, 0) + 1
    return counts
