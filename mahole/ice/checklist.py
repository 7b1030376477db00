"""The ICE check list (RFC 8445 §6, §7, §8), sans-IO.

One :class:`CheckList` runs the connectivity checks of one session between a local and a remote
set of candidates. Like aioquic's ``QuicConnection`` it does no I/O and never reads the clock:
every entry point takes ``now`` (seconds, any monotonic origin), outgoing datagrams are drained
with :meth:`CheckList.datagrams_to_send`, and what happened is reported by
:meth:`CheckList.next_event` as small dataclasses (:class:`PairSucceeded`,
:class:`PairNominated`, :class:`ChecksFailed`).

Timers go through the node's shared scheduler (``mahole._fast.Scheduler``): the check list asks
to be woken under ``timer_key`` (by default the check list itself) at the earliest of its next
retransmission and, when it has a new check to send, the next pacing slot. Whoever pops the key
calls :meth:`CheckList.handle_timer`. New checks (ordinary, triggered and nominating) take one
node-wide pacing slot each (Ta = 20 ms, RFC 8445 §14.2) via ``take_pacing_slot``;
retransmissions are not paced.

Pair states are one transition table, :data:`PAIR_TRANSITIONS` (h11 style); an impossible
transition raises :class:`TransitionError`, which is a bug in this module, never bad input.
Bad input (unparsable bytes, failed MESSAGE-INTEGRITY, wrong USERNAME, a request without
PRIORITY or role) is dropped and counted in :attr:`CheckList.counters`.

Simplifications, all within RFC 8445's latitude:

- one component, one check list per session (no check-list set);
- the node's socket cannot pick the source address of a check, so a request's destination
  (the local candidate of an incoming check, §7.3.1.4) is inferred: the pair already holding
  the request's source as remote candidate (a succeeded one first), else the best local host
  candidate of the same family;
- unauthenticated error responses are ignored (a forged error must not kill a check); a
  request that fails authentication is ignored rather than answered with 400/401;
- RTO is a fixed first value doubled on every retransmission (default 100 ms, 5 tries, giving
  up 100+200+400+800+1600 ms after the first send) instead of §14.3's formula;
- both sides must agree on the outcome, so: the controlling agent retries a failed nomination
  on the same pair (``nomination_attempts`` transactions, RTO capped at 4x) and never moves on
  to another pair the peer might not have selected; the controlled agent keeps re-checking a
  pair nominated before its own check succeeded; a failed (or closed) check list answers no
  more requests, so the peer cannot nominate a pair this side has given up on.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Protocol, Union

from ..wire import control, stun
from .candidates import (
    Addr,
    Candidate,
    as_candidate,
    candidate_priority,
    format_addr,
    foundation,
    ip_version,
    is_link_local,
    normalize_addr,
    pair_priority,
)

__all__ = [
    "DEFAULT_MAX_PAIRS",
    "DEFAULT_MAX_TRIES",
    "DEFAULT_NOMINATION_ATTEMPTS",
    "DEFAULT_NOMINATION_GRACE",
    "DEFAULT_RTO",
    "DEFAULT_TA",
    "PAIR_TRANSITIONS",
    "CheckList",
    "ChecksFailed",
    "Pair",
    "PairEvent",
    "PairNominated",
    "PairState",
    "PairSucceeded",
    "SchedulerLike",
    "TransitionError",
    "next_pair_state",
]

logger = logging.getLogger(__name__)

DEFAULT_TA = 0.020  # RFC 8445 §14.2: Ta default 50 ms; mahole paces at 20 ms (docs/architecture.md)
DEFAULT_RTO = 0.100  # first retransmission timeout; doubled each try (RFC 8489 §6.2.1 style)
DEFAULT_MAX_TRIES = 5  # transmissions of one check before the pair fails (RFC 8489 Rc spirit)
DEFAULT_NOMINATION_GRACE = 0.050  # controlling agent: wait for better pairs this long
DEFAULT_NOMINATION_ATTEMPTS = 3  # USE-CANDIDATE transactions on the chosen pair before failing
DEFAULT_MAX_PAIRS = 100  # RFC 8445 §6.1.2.5: limit on the number of candidate pairs

_EPSILON = 1e-9  # timer comparisons on floats computed as sums of the same terms


class SchedulerLike(Protocol):
    """What the check list needs of ``mahole._fast.Scheduler`` (one per node)."""

    def schedule(self, key: Any, when: float) -> None: ...
    def cancel(self, key: Any) -> None: ...
    def pacing_slot(self, now: float) -> float: ...
    def take_pacing_slot(self, now: float) -> bool: ...


# --------------------------------------------------------------------------------------------
# Pair states: one transition table


class PairState(str, enum.Enum):
    """RFC 8445 §6.1.2.6 candidate pair states."""

    FROZEN = "frozen"
    WAITING = "waiting"
    IN_PROGRESS = "in-progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class PairEvent(str, enum.Enum):
    UNFREEZE = "unfreeze"  # initial states §6.1.2.6; §6.1.4.2; same-foundation success §7.2.5.3.3
    TRIGGER = "trigger"  # triggered check §7.3.1.4; role-conflict retry §7.2.5.1
    SEND = "send"  # a check transaction starts (§6.1.4.2, §7.2.4)
    SUCCEED = "succeed"  # a success response (§7.2.5.3)
    FAIL = "fail"  # timeout, error response (§7.2.5.2.4), response from elsewhere (§7.2.5.2.1)


F, W, I, S, X = (PairState.FROZEN, PairState.WAITING, PairState.IN_PROGRESS,
                 PairState.SUCCEEDED, PairState.FAILED)

PAIR_TRANSITIONS: dict[tuple[PairState, PairEvent], PairState] = {
    (F, PairEvent.UNFREEZE): W,
    (F, PairEvent.TRIGGER): W,  # §7.3.1.4: a Frozen pair is set to Waiting and enqueued
    (W, PairEvent.TRIGGER): W,  # already Waiting: just enqueued
    (W, PairEvent.SEND): I,
    # §7.3.1.4: a triggered check cancels an In-Progress check, which still accepts responses
    (W, PairEvent.SUCCEED): S,
    (I, PairEvent.TRIGGER): W,
    (I, PairEvent.SUCCEED): S,
    (I, PairEvent.FAIL): X,
    (X, PairEvent.TRIGGER): W,  # §7.3.1.4: a Failed pair is checked again
    (S, PairEvent.TRIGGER): S,  # §7.3.1.4: "nothing further is done"
}
del F, W, I, S, X


class TransitionError(RuntimeError):
    """An impossible state transition: a bug in the caller, never the network's doing."""


def next_pair_state(state: PairState, event: PairEvent) -> PairState:
    """Look ``(state, event)`` up in :data:`PAIR_TRANSITIONS`."""
    try:
        return PAIR_TRANSITIONS[(state, event)]
    except KeyError:
        raise TransitionError(f"a {state.value} candidate pair cannot {event.value}") from None


# --------------------------------------------------------------------------------------------
# Pairs and events


@dataclass(eq=False)
class Pair:
    """A candidate pair (RFC 8445 §6.1.2). Compared by identity."""

    local: Candidate
    remote: Candidate
    priority: int
    state: PairState = PairState.FROZEN
    valid: bool = False  # in the valid list (§7.2.5.3.2)
    nominated: bool = False
    rtt: Optional[float] = None
    valid_pair: Optional["Pair"] = field(default=None, repr=False)  # what its success produced
    nominate_on_success: bool = False  # controlled: USE-CANDIDATE came before success (§7.3.1.5)
    in_check_list: bool = True  # False for a valid pair built from a check on another pair
    transaction: Optional["_Transaction"] = field(default=None, repr=False)

    @property
    def foundation(self) -> str:
        """The pair foundation: the local and remote candidate foundations (§6.1.2.6)."""
        return f"{self.local.foundation}:{self.remote.foundation}"

    @property
    def component(self) -> int:
        return self.local.component

    @property
    def key(self) -> tuple[Addr, Addr]:
        return (self.local.addr, self.remote.addr)

    def transition(self, event: PairEvent) -> None:
        self.state = next_pair_state(self.state, event)

    def __repr__(self) -> str:
        flags = "".join((" valid" if self.valid else "", " nominated" if self.nominated else ""))
        return (f"<Pair {self.local.describe()} -> {self.remote.describe()} "
                f"{self.state.value}{flags} priority={self.priority}>")

    def describe(self) -> str:
        return f"{format_addr(self.local.addr)} -> {format_addr(self.remote.addr)}"

    def to_status(self) -> dict[str, Any]:
        return {
            "local": self.local.describe(),
            "remote": self.remote.describe(),
            "state": self.state.value,
            "priority": self.priority,
            "valid": self.valid,
            "nominated": self.nominated,
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
        }


@dataclass(frozen=True)
class PairSucceeded:
    """A check succeeded; ``pair`` is the resulting valid pair (§7.2.5.3.2), ``checked`` the
    pair whose check it was (the same object unless a peer-reflexive or other local candidate
    answered)."""

    pair: Pair
    rtt: float
    checked: Optional[Pair] = None


@dataclass(frozen=True)
class PairNominated:
    """The selected pair (§8.1.1): checks are over and this pair carries the session."""

    pair: Pair
    rtt: Optional[float]


@dataclass(frozen=True)
class ChecksFailed:
    """Every pair failed (or nomination did); no direct path from this check list."""

    reason: str


Event = Union[PairSucceeded, PairNominated, ChecksFailed]


@dataclass(eq=False)
class _Transaction:
    transaction_id: bytes
    pair: Pair
    data: bytes
    dest: Addr
    controlling: bool  # the role the request claimed
    priority: int  # the PRIORITY attribute sent (§7.1.1)
    nomination: bool  # USE-CANDIDATE check of the controlling agent (§8.1.1)
    first_sent: float
    last_sent: float
    rto: float
    next_at: float  # retransmit, or give up after the last try
    expires_at: float  # end of the whole transaction (a cancelled one listens until then)
    tries: int = 1
    cancelled: bool = False


def _same_scope(a: Addr, b: Addr) -> bool:
    return ip_version(a[0]) == ip_version(b[0]) and is_link_local(a[0]) == is_link_local(b[0])


_COUNTERS = (
    "checks_sent",
    "triggered_checks",
    "retransmissions",
    "timeouts",
    "requests_received",
    "responses_received",
    "error_responses",
    "integrity_failures",
    "malformed",
    "wrong_username",
    "bad_requests",
    "wrong_source",
    "stale_responses",
    "role_conflicts",
    "role_switches",
    "prflx_local",
    "prflx_remote",
    "nominations_sent",
    "nomination_failures",
    "ignored_after_failure",
    "nomination_retries",
    "nominations_confirmed_by_peer",
)


# --------------------------------------------------------------------------------------------
# The check list


class CheckList:
    """Connectivity checks for one session (see the module docstring).

    ``local_candidates`` / ``remote_candidates`` are :class:`Candidate` or
    ``control.Candidate``; relay candidates are kept for reporting but never paired (mahole's
    relay path is separate). ``tie_breaker`` is the agent's 64-bit random tie-breaker
    (§7.1.3). Credentials: requests carry USERNAME ``remote_ufrag:local_ufrag`` and are signed
    with ``remote_pwd``; incoming requests must carry ``local_ufrag:remote_ufrag`` signed with
    ``local_pwd`` (§7.2.2, §7.3).

    ``state`` is ``"new"`` until :meth:`start`, then ``"running"``, then ``"completed"`` (a pair
    was selected) or ``"failed"``. A completed check list still answers requests, so the peer
    can finish its checks and nomination; a failed one (including after :meth:`close`) answers
    none, so the peer cannot nominate a pair this side has given up on.
    """

    def __init__(
        self,
        controlling: bool,
        tie_breaker: int,
        local_ufrag: str,
        local_pwd: str,
        remote_ufrag: str,
        remote_pwd: str,
        local_candidates: Iterable[Union[Candidate, control.Candidate]],
        remote_candidates: Iterable[Union[Candidate, control.Candidate]],
        scheduler: SchedulerLike,
        *,
        ta: float = DEFAULT_TA,
        rto: float = DEFAULT_RTO,
        max_tries: int = DEFAULT_MAX_TRIES,
        nomination_grace: float = DEFAULT_NOMINATION_GRACE,
        nomination_attempts: int = DEFAULT_NOMINATION_ATTEMPTS,
        max_pairs: int = DEFAULT_MAX_PAIRS,
        timer_key: Any = None,
    ) -> None:
        if not 0 <= tie_breaker < 1 << 64:
            raise ValueError("tie_breaker must be a 64-bit unsigned integer")
        if max_tries < 1:
            raise ValueError("max_tries must be at least 1")
        self.controlling = bool(controlling)
        self.tie_breaker = tie_breaker
        self.local_ufrag = local_ufrag
        self.remote_ufrag = remote_ufrag
        self._local_key = local_pwd.encode()
        self._remote_key = remote_pwd.encode()
        self._username_in = f"{local_ufrag}:{remote_ufrag}"  # §7.3: what requests must carry
        self._username_out = f"{remote_ufrag}:{local_ufrag}"  # §7.2.2
        self.local_candidates: list[Candidate] = [as_candidate(c) for c in local_candidates]
        self.remote_candidates: list[Candidate] = [as_candidate(c) for c in remote_candidates]
        self.scheduler = scheduler
        self.ta = ta
        self.rto = rto
        self.max_tries = max_tries
        self.nomination_grace = nomination_grace
        self.nomination_attempts = nomination_attempts
        self.max_pairs = max_pairs
        self.timer_key = self if timer_key is None else timer_key

        self.state = "new"
        self.failure_reason: Optional[str] = None
        self.pairs: list[Pair] = []  # the check list, highest priority first
        self.valid_pairs: list[Pair] = []
        self.selected: Optional[Pair] = None
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self.started_at: Optional[float] = None
        # Birthday probing may still bring a pair (learn_remote): no "all pairs failed" yet.
        self.awaiting = False

        self._pairs_by_key: dict[tuple[Addr, Addr], Pair] = {}
        self._triggered: deque[Pair] = deque()  # §6.1.2.5 triggered-check queue (FIFO)
        self._transactions: dict[bytes, _Transaction] = {}
        self._finished: set[bytes] = set()  # transaction ids that may still see late responses
        self._datagrams: list[tuple[bytes, Addr]] = []
        self._events: deque[Event] = deque()
        self._last_new_check = float("-inf")
        self._nominate_at: Optional[float] = None  # controlling: nominate by then
        self._nomination_pending: Optional[Pair] = None  # to send at the next pacing slot
        self._nomination_txn: Optional[_Transaction] = None
        self._nomination_tries = 0
        self._form_pairs()

    # ----------------------------------------------------------------------------- public API

    def start(self, now: float) -> None:
        """Start checking (RFC 8445 §6.1.2.6 initial states, then §6.1.4.2 scheduling)."""
        if self.state != "new":
            raise TransitionError(f"start() on a {self.state} check list")
        self.state = "running"
        self.started_at = now
        if not self.pairs and not self._triggered:
            self._fail("no candidate pairs (no local and remote candidates of the same family)")
            self._update_timer(now)
            return
        # §6.1.2.6: for each foundation, the highest-priority pair (lowest component) is Waiting.
        seen: set[str] = set()
        for pair in self.pairs:  # sorted by priority
            if pair.foundation in seen:
                continue
            seen.add(pair.foundation)
            if pair.state is PairState.FROZEN:
                pair.transition(PairEvent.UNFREEZE)
        self._service(now)

    def handle_timer(self, now: float) -> None:
        """Retransmit or give up due checks, send a new check if a pacing slot is free,
        nominate when it is time. Safe to call at any time."""
        self._service(now)

    @property
    def nominating(self) -> Optional[Pair]:
        """Controlling side: the valid pair a USE-CANDIDATE check was sent on (§8.1.1) while
        its answer is awaited, else None. The controlled side may already use the pair
        (§7.3.1.5: it selects on the request), so its packets from the pair's remote address
        are the session's (see :meth:`confirm_nomination`)."""
        if self.state != "running" or not self.controlling:
            return None
        if self._nomination_txn is not None:
            return self._nomination_txn.pair
        return self._nomination_pending if self._nomination_tries else None

    def confirm_nomination(self, addr: Addr, now: float) -> bool:
        """An authenticated (decrypted) packet of the peer's came from ``addr``: if that is
        the remote address of the pair being nominated, the nomination is complete, as if its
        answer had come (a packet only the peer can make, from the address our own check
        validated, proves the path both ways as well as the answer would); the pair is
        selected (:class:`PairNominated`, with the RTT of its earlier check)."""
        pair = self.nominating
        try:
            if pair is None or pair.remote.addr != normalize_addr(addr):
                return False
        except ValueError:
            return False
        self.counters["nominations_confirmed_by_peer"] += 1
        self._select(pair, pair.rtt)
        self._update_timer(now)
        return True

    # ------------------------------------------------- birthday probing (mahole.ice.birthday)

    def probe_request(self) -> tuple[bytes, bytes]:
        """(transaction id, datagram) of one Binding request signed like a check (USERNAME,
        PRIORITY, this side's role, MESSAGE-INTEGRITY with the remote password, §7.2.2) that
        no pair tracks: a birthday probe or opener. The peer answers it like any check."""
        role = {"ice_controlling": self.tie_breaker} if self.controlling \
            else {"ice_controlled": self.tie_breaker}
        request = stun.binding_request(
            username=self._username_out, priority=candidate_priority("prflx", 65535, 1), **role)
        return request.transaction_id, stun.encode(request, integrity_key=self._remote_key)

    def authentic(self, data: bytes) -> bool:
        """Whether ``data`` is a Binding request of the peer to this check list or a success
        response of the peer, signed with the session's password (§7.3, §7.2.5): what a
        birthday socket must see before it may become a route."""
        try:
            message = stun.decode(data)
            if message.message_class == stun.CLASS_REQUEST:
                if message.attributes.get("USERNAME") != self._username_in:
                    return False
                stun.decode(data, integrity_key=self._local_key)
            elif message.message_class == stun.CLASS_SUCCESS:
                stun.decode(data, integrity_key=self._remote_key)
            else:
                return False
        except ValueError:
            return False
        return True

    def learn_remote(self, addr: Addr, now: float) -> None:
        """A birthday probe to ``addr`` was answered by the peer: ``addr`` becomes a
        peer-reflexive remote candidate (§7.3.1.3, as if a request had come from it) and its
        pair gets a triggered check (§7.3.1.4), checked like any other."""
        if self.state != "running":
            return
        remote = self._remote_for(normalize_addr(addr),
                                  candidate_priority("prflx", 65535, 1))
        pair = self._pair_for_request(remote)
        if pair is not None:
            self._trigger(pair)
            self._service(now)

    def receive_stun(self, data: bytes, addr: Addr, now: float) -> bool:
        """Handle one STUN datagram from ``addr``. True if it was for this check list: a response
        matching one of its transaction ids, or a request whose USERNAME starts with our ufrag
        (even if it is then dropped for failing authentication)."""
        try:
            addr = normalize_addr(addr)
            message = stun.decode(data)
        except ValueError:
            self.counters["malformed"] += 1
            return False
        if message.method != stun.METHOD_BINDING:
            return False
        if message.message_class == stun.CLASS_REQUEST:
            handled = self._receive_request(data, message, addr, now)
        elif message.message_class in (stun.CLASS_SUCCESS, stun.CLASS_ERROR):
            handled = self._receive_response(data, message, addr, now)
        else:
            return False
        if handled:
            self._service(now)
        return handled

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        """Drain the datagrams to send, as ``(data, destination address)``."""
        datagrams, self._datagrams = self._datagrams, []
        return datagrams

    def next_event(self) -> Optional[Event]:
        """The next event, or None."""
        return self._events.popleft() if self._events else None

    def close(self, reason: str = "closed") -> None:
        """Stop checking (the session's deadline passed, or it closed): no more checks,
        timers or answers. A completed check list stays completed (and keeps answering).
        No event is emitted."""
        if self.state in ("new", "running"):
            self.state = "failed"
            self.failure_reason = reason
        self._drop_transactions()
        self.scheduler.cancel(self.timer_key)

    def status(self) -> dict[str, Any]:
        """A JSON-friendly view for ``mahole status``."""
        return {
            "state": self.state,
            "role": "controlling" if self.controlling else "controlled",
            "failure_reason": self.failure_reason,
            "selected": None if self.selected is None else self.selected.to_status(),
            "local_candidates": [c.describe() for c in self.local_candidates],
            "remote_candidates": [c.describe() for c in self.remote_candidates],
            "pairs": [p.to_status() for p in self.pairs],
            "valid_pairs": [p.to_status() for p in self.valid_pairs],
            "counters": dict(self.counters),
        }

    # ------------------------------------------------------------------------ pair formation

    def _pair_priority(self, local: Candidate, remote: Candidate) -> int:
        # §6.1.2.3: G is the controlling agent's candidate priority.
        if self.controlling:
            return pair_priority(local.priority, remote.priority)
        return pair_priority(remote.priority, local.priority)

    def _base_of(self, candidate: Candidate) -> Optional[Candidate]:
        """The host candidate a local candidate is sent from (§6.1.2.4 replaces srflx by it)."""
        if candidate.type == "host":
            return candidate
        for other in self.local_candidates:
            if other.type == "host" and other.addr == candidate.base:
                return other
        return None

    def _form_pairs(self) -> None:
        """§6.1.2.2 pairing (same component and address family; link-local only with
        link-local), §6.1.2.4 srflx replaced by its base and redundant pairs pruned, §6.1.2.3
        order, §6.1.2.5 cap."""
        bases: list[Candidate] = []
        for candidate in self.local_candidates:
            if candidate.type == "relay":
                continue
            base = self._base_of(candidate)
            if base is not None and base not in bases:
                bases.append(base)
        best: dict[tuple[Addr, Addr], Pair] = {}
        for local in bases:
            for remote in self.remote_candidates:
                if remote.type == "relay" or remote.component != local.component:
                    continue
                if not _same_scope(local.addr, remote.addr):
                    continue
                pair = Pair(local, remote, self._pair_priority(local, remote))
                kept = best.get(pair.key)
                if kept is None or pair.priority > kept.priority:
                    best[pair.key] = pair
        pairs = sorted(best.values(), key=lambda p: p.priority, reverse=True)
        self.pairs = pairs[: self.max_pairs]
        self._pairs_by_key = {p.key: p for p in self.pairs}

    def _insert_pair(self, pair: Pair) -> None:
        self.pairs.append(pair)
        self.pairs.sort(key=lambda p: p.priority, reverse=True)
        self._pairs_by_key[pair.key] = pair

    # ----------------------------------------------------------------------------- scheduling

    def _service(self, now: float) -> None:
        if self.state == "running":
            self._expire(now)
        if self.state == "running":
            self._maybe_nominate(now)
            self._send_new_check(now)
            self._check_done()
        self._update_timer(now)

    def _has_unfreezable(self) -> Optional[Pair]:
        """§6.1.4.2: with no Waiting pair, the best Frozen pair whose foundation has no
        Waiting or In-Progress pair."""
        busy = {p.foundation for p in self.pairs
                if p.state in (PairState.WAITING, PairState.IN_PROGRESS)}
        for pair in self.pairs:
            if pair.state is PairState.FROZEN and pair.foundation not in busy:
                return pair
        return None

    def _next_check(self) -> Optional[tuple[str, Pair]]:
        """What the next pacing slot would be used for, without doing it."""
        if self._nomination_pending is not None:
            return ("nominate", self._nomination_pending)
        if self._triggered:
            return ("triggered", self._triggered[0])
        for pair in self.pairs:
            if pair.state is PairState.WAITING:
                return ("ordinary", pair)
        pair = self._has_unfreezable()
        if pair is not None:
            return ("unfreeze", pair)
        return None

    def _send_new_check(self, now: float) -> None:
        plan = self._next_check()
        if plan is None or now < self._last_new_check + self.ta - _EPSILON:
            return
        if not self.scheduler.take_pacing_slot(now):
            return
        kind, pair = plan
        self._last_new_check = now
        if kind == "nominate":
            self._nomination_pending = None
            self._nomination_txn = self._send_request(pair, now, nomination=True)
            self._nomination_tries += 1
            self.counters["nominations_sent"] += 1
            return
        if kind == "triggered":
            self._triggered.popleft()
            self.counters["triggered_checks"] += 1
        elif kind == "unfreeze":
            pair.transition(PairEvent.UNFREEZE)
        pair.transition(PairEvent.SEND)
        pair.transaction = self._send_request(pair, now, nomination=False)

    def _update_timer(self, now: float) -> None:
        times = []
        if self.state == "running":
            times = [t.next_at for t in self._transactions.values() if not t.cancelled]
            if self._next_check() is not None:
                times.append(max(now, self.scheduler.pacing_slot(now), self._last_new_check + self.ta))
            if self._nominate_at is not None and self.controlling and self._nomination_txn is None \
                    and self._nomination_pending is None and self.valid_pairs:
                times.append(max(now, self._nominate_at))
        if times:
            self.scheduler.schedule(self.timer_key, min(times))
        else:
            self.scheduler.cancel(self.timer_key)

    def _check_done(self) -> None:
        """Fail the check list when nothing more can succeed (§6.1.2.1 "Failed")."""
        if self.state != "running":
            return
        if self._triggered or self._nomination_pending is not None or self._nomination_txn is not None:
            return
        if any(p.state in (PairState.FROZEN, PairState.WAITING, PairState.IN_PROGRESS) for p in self.pairs):
            return
        if self.valid_pairs:
            return  # controlling: nomination comes next; controlled: waits for USE-CANDIDATE
        if self.awaiting:
            return
        self._fail("all candidate pairs failed")

    def _fail(self, reason: str) -> None:
        self.state = "failed"
        self.failure_reason = reason
        self._drop_transactions()
        self._events.append(ChecksFailed(reason))
        logger.debug("checks failed: %s", reason)

    def _drop_transactions(self) -> None:
        self._finished.update(self._transactions)
        self._transactions.clear()
        self._triggered.clear()
        self._nomination_pending = None
        self._nomination_txn = None
        self._nominate_at = None
        for pair in self.pairs:
            pair.transaction = None

    # ---------------------------------------------------------------------- sending requests

    def _send_request(self, pair: Pair, now: float, *, nomination: bool) -> _Transaction:
        """A Binding request on ``pair`` (§7.2.2): USERNAME, PRIORITY (prflx priority of the
        base, §7.1.1), ICE-CONTROLLING/ICE-CONTROLLED (§7.1.3), USE-CANDIDATE when nominating
        (§8.1.1), MESSAGE-INTEGRITY with the remote password and FINGERPRINT."""
        local = pair.local
        priority = candidate_priority("prflx", local.local_preference, local.component)
        role = {"ice_controlling": self.tie_breaker} if self.controlling \
            else {"ice_controlled": self.tie_breaker}
        request = stun.binding_request(
            username=self._username_out, priority=priority, use_candidate=nomination, **role
        )
        data = stun.encode(request, integrity_key=self._remote_key)
        total = self.rto * ((1 << self.max_tries) - 1)  # 100+200+400+800+1600 ms by default
        txn = _Transaction(
            transaction_id=request.transaction_id,
            pair=pair,
            data=data,
            dest=pair.remote.addr,
            controlling=self.controlling,
            priority=priority,
            nomination=nomination,
            first_sent=now,
            last_sent=now,
            rto=self.rto,
            next_at=now + self.rto,
            expires_at=now + total,
        )
        self._transactions[txn.transaction_id] = txn
        self._datagrams.append((data, txn.dest))
        self.counters["checks_sent"] += 1
        return txn

    def _expire(self, now: float) -> None:
        for txn in list(self._transactions.values()):
            if self.state != "running":
                return  # a failed nomination ended the check list
            if txn.cancelled:
                if now >= txn.expires_at - _EPSILON:
                    self._forget(txn)
                continue
            if now < txn.next_at - _EPSILON:
                continue
            if txn.tries < self.max_tries:
                txn.tries += 1
                txn.last_sent = now
                # Doubling; a nomination's RTO stops at 4x the first, so that more tries fit
                # before the session deadline (the peer may already have selected the pair).
                txn.rto = min(txn.rto * 2, 4 * self.rto) if txn.nomination else txn.rto * 2
                txn.next_at = now + txn.rto
                self._datagrams.append((txn.data, txn.dest))
                self.counters["retransmissions"] += 1
            else:
                self._forget(txn)
                self.counters["timeouts"] += 1
                self._transaction_failed(txn, "timeout")

    def _forget(self, txn: _Transaction) -> None:
        self._transactions.pop(txn.transaction_id, None)
        self._finished.add(txn.transaction_id)

    def _cancel(self, txn: _Transaction) -> None:
        """§7.3.1.4: no more retransmissions, no failure on silence, responses still count."""
        txn.cancelled = True
        if txn.pair.transaction is txn:
            txn.pair.transaction = None

    def _transaction_failed(self, txn: _Transaction, reason: str) -> None:
        pair = txn.pair
        if txn.nomination:
            if self._nomination_txn is txn:
                # Never move on to another pair: the controlled agent may already have selected
                # this one (it answered; the answers were lost). Retry, then give up.
                self._nomination_txn = None
                self.counters["nomination_failures"] += 1
                logger.debug("nomination of %s failed: %s", pair.describe(), reason)
                if self._nomination_tries < self.nomination_attempts:
                    self._nomination_pending = pair
                else:
                    self._fail(f"nomination of {pair.describe()} failed: {reason}")
            return
        if txn.cancelled or pair.transaction is not txn:
            return
        pair.transaction = None
        pair.transition(PairEvent.FAIL)
        logger.debug("pair %s failed: %s", pair.describe(), reason)
        if pair.nominate_on_success and not self.controlling:
            # The controlling agent nominated this pair and has stopped checking; only this
            # side's own check is missing (§7.3.1.5), and the peer keeps answering. Retry
            # rather than leave the peer on a pair this side never selects.
            self.counters["nomination_retries"] += 1
            self._trigger(pair)

    def _trigger(self, pair: Pair) -> None:
        """§7.3.1.4: queue a triggered check for ``pair`` (cancelling one in progress)."""
        if pair.state is PairState.IN_PROGRESS and pair.transaction is not None:
            self._cancel(pair.transaction)
        pair.transition(PairEvent.TRIGGER)
        if pair.state is PairState.WAITING and pair not in self._triggered:
            self._triggered.append(pair)

    # -------------------------------------------------------------------------------- roles

    def _switch_role(self, controlling: bool, now: float) -> None:
        """§7.3.1.1 / §7.2.5.1: take the other role; pair priorities change with it."""
        self.controlling = controlling
        self.counters["role_switches"] += 1
        for pair in self.pairs + [p for p in self.valid_pairs if not p.in_check_list]:
            pair.priority = self._pair_priority(pair.local, pair.remote)
        self.pairs.sort(key=lambda p: p.priority, reverse=True)
        if controlling:
            if self.valid_pairs and self._nominate_at is None:
                self._nominate_at = now + self.nomination_grace
        else:
            self._nominate_at = None
            self._nomination_pending = None
            if self._nomination_txn is not None:
                self._nomination_txn.cancelled = True
                self._nomination_txn = None
        logger.debug("role switched to %s", "controlling" if controlling else "controlled")

    # ------------------------------------------------------------------------ incoming requests

    def _respond(self, response: stun.Message, addr: Addr) -> None:
        self._datagrams.append((stun.encode(response, integrity_key=self._local_key), addr))

    def _receive_request(self, data: bytes, message: stun.Message, addr: Addr, now: float) -> bool:
        attributes = message.attributes
        username = attributes.get("USERNAME")
        if not isinstance(username, str) or not username.startswith(self.local_ufrag + ":"):
            return False  # another session's (or nobody's)
        try:
            stun.decode(data, integrity_key=self._local_key)  # §7.3: short-term credentials
        except ValueError:
            self.counters["integrity_failures"] += 1
            return True
        if username != self._username_in:
            self.counters["wrong_username"] += 1
            return True
        unknown = message.unknown_required()
        if unknown:  # RFC 8489 §6.3.1
            self.counters["bad_requests"] += 1
            self._respond(stun.binding_error(message, 420, "Unknown Attribute",
                                             unknown_attributes=unknown), addr)
            return True
        priority = attributes.get("PRIORITY")
        their_controlling = attributes.get("ICE-CONTROLLING")
        their_controlled = attributes.get("ICE-CONTROLLED")
        if priority is None or (their_controlling is None) == (their_controlled is None):
            self.counters["bad_requests"] += 1  # §7.3: PRIORITY and exactly one role required
            return True
        self.counters["requests_received"] += 1
        if self.state == "failed":
            # This side has given up (and will report the relay path): answering would let
            # the peer nominate a pair this side no longer uses.
            self.counters["ignored_after_failure"] += 1
            return True

        # §7.3.1.1: role conflicts.
        if self.controlling and their_controlling is not None:
            self.counters["role_conflicts"] += 1
            if self.tie_breaker >= their_controlling:
                self._respond(stun.binding_error(message, 487, "Role Conflict"), addr)
                return True
            self._switch_role(False, now)
        elif not self.controlling and their_controlled is not None:
            self.counters["role_conflicts"] += 1
            if self.tie_breaker >= their_controlled:
                self._switch_role(True, now)
            else:
                self._respond(stun.binding_error(message, 487, "Role Conflict"), addr)
                return True

        # §7.3.1.2: the success response; XOR-MAPPED-ADDRESS is the request's source.
        self._respond(stun.binding_success(message, addr), addr)
        if self.state == "completed":
            return True  # answered, so the peer can finish; nothing else changes

        remote = self._remote_for(addr, priority)  # §7.3.1.3
        pair = self._pair_for_request(remote)
        if pair is None:
            return True
        use_candidate = bool(attributes.get("USE-CANDIDATE"))
        self._trigger(pair)  # §7.3.1.4
        if use_candidate and not self.controlling:  # §7.3.1.5
            if pair.state is PairState.SUCCEEDED and pair.valid_pair is not None:
                if self.state == "running":
                    self._select(pair.valid_pair, pair.valid_pair.rtt)
            else:
                pair.nominate_on_success = True
        return True

    def _remote_for(self, addr: Addr, priority: int) -> Candidate:
        for candidate in self.remote_candidates:
            if candidate.addr == addr and candidate.type != "relay":
                return candidate
        # §7.3.1.3: a peer-reflexive remote candidate; priority from the request, a foundation
        # of its own.
        candidate = Candidate(
            foundation=foundation("prflx", addr[0], "remote"),
            priority=priority,
            addr=addr,
            type="prflx",
        )
        self.remote_candidates.append(candidate)
        self.counters["prflx_remote"] += 1
        logger.debug("peer-reflexive remote candidate %s", format_addr(addr))
        return candidate

    def _pair_for_request(self, remote: Candidate) -> Optional[Pair]:
        """The pair a request from ``remote`` arrived on (see the module docstring)."""
        matching = [p for p in self.pairs if p.remote.addr == remote.addr]
        for pair in matching:
            if pair.state is PairState.SUCCEEDED:
                return pair
        if matching:
            return matching[0]
        for local in sorted(self.local_candidates, key=lambda c: c.priority, reverse=True):
            if local.type == "host" and local.component == remote.component \
                    and _same_scope(local.addr, remote.addr):
                pair = Pair(local, remote, self._pair_priority(local, remote))
                self._insert_pair(pair)
                return pair
        return None

    # ------------------------------------------------------------------------ incoming responses

    def _receive_response(self, data: bytes, message: stun.Message, addr: Addr, now: float) -> bool:
        txn = self._transactions.get(message.transaction_id)
        if txn is None:
            if message.transaction_id in self._finished:
                self.counters["stale_responses"] += 1
                return True
            return False
        try:
            stun.decode(data, integrity_key=self._remote_key)
        except ValueError:
            self.counters["integrity_failures"] += 1
            return True  # a forgery must not end the transaction
        self.counters["responses_received"] += 1
        self._forget(txn)
        if addr != txn.dest:  # §7.2.5.2.1: non-symmetric transport addresses
            self.counters["wrong_source"] += 1
            self._transaction_failed(txn, f"response from {format_addr(addr)}")
            return True
        if message.message_class == stun.CLASS_ERROR:
            self.counters["error_responses"] += 1
            code = message.attributes.get("ERROR-CODE", (0, ""))[0]
            if code == 487:
                self._role_conflict_response(txn, now)
            else:  # §7.2.5.2.4: unrecoverable
                self._transaction_failed(txn, f"error {code}")
            return True
        mapped = message.attributes.get("XOR-MAPPED-ADDRESS")
        if mapped is None:
            self.counters["malformed"] += 1
            self._transaction_failed(txn, "success response without XOR-MAPPED-ADDRESS")
            return True
        rtt = max(0.0, now - txn.last_sent)
        if txn.nomination:
            if self._nomination_txn is txn:
                self._nomination_txn = None
                txn.pair.rtt = rtt
                self._select(txn.pair, rtt)
            return True
        self._check_succeeded(txn, normalize_addr(mapped), rtt, now)
        return True

    def _role_conflict_response(self, txn: _Transaction, now: float) -> None:
        """§7.2.5.1: a 487: switch role if we still claim the one we sent, then retry."""
        self.counters["role_conflicts"] += 1
        if self.controlling == txn.controlling:
            self._switch_role(not txn.controlling, now)
        if txn.nomination:
            if self._nomination_txn is txn:
                self._nomination_txn = None
                if self.controlling:
                    self._nomination_pending = txn.pair
            return
        if not txn.cancelled and txn.pair.transaction is txn:
            self._trigger(txn.pair)

    def _check_succeeded(self, txn: _Transaction, mapped: Addr, rtt: float, now: float) -> None:
        pair = txn.pair
        if pair.state not in (PairState.WAITING, PairState.IN_PROGRESS):
            self.counters["stale_responses"] += 1
            return
        # §7.2.5.3.1: the mapped address names the local candidate; unknown means prflx.
        local = next((c for c in self.local_candidates if c.addr == mapped and c.type != "relay"), None)
        if local is None:
            base = pair.local
            local = Candidate(
                foundation=foundation("prflx", base.addr[0]),
                component=base.component,
                priority=txn.priority,
                addr=mapped,
                type="prflx",
                related_addr=base.base,
            )
            self.local_candidates.append(local)
            self.counters["prflx_local"] += 1
            logger.debug("peer-reflexive local candidate %s", format_addr(mapped))
        # §7.2.5.3.2: the valid pair.
        if local.addr == pair.local.addr:
            valid = pair
        else:
            valid = self._pairs_by_key.get((local.addr, pair.remote.addr))
            if valid is None:
                valid = next((p for p in self.valid_pairs if p.key == (local.addr, pair.remote.addr)), None)
            if valid is None:
                valid = Pair(local, pair.remote, self._pair_priority(local, pair.remote),
                             state=PairState.SUCCEEDED, in_check_list=False)
        # §7.2.5.3.3: the checked pair succeeds; other checks of it stop.
        pair.transition(PairEvent.SUCCEED)
        pair.transaction = None
        pair.rtt = rtt
        for other in list(self._transactions.values()):
            if other.pair is pair and not other.nomination:
                self._forget(other)
        if pair in self._triggered:
            self._triggered.remove(pair)
        valid.valid = True
        valid.rtt = rtt
        pair.valid_pair = valid
        if valid not in self.valid_pairs:
            self.valid_pairs.append(valid)
        for other in self.pairs:  # §7.2.5.3.3: unfreeze the same foundation
            if other.state is PairState.FROZEN and other.foundation == pair.foundation:
                other.transition(PairEvent.UNFREEZE)
        self._events.append(PairSucceeded(valid, rtt, pair))
        if not self.controlling and (pair.nominate_on_success or valid.nominate_on_success):
            self._select(valid, rtt)  # §7.3.1.5
        elif self.controlling and self._nominate_at is None:
            self._nominate_at = now + self.nomination_grace

    # ------------------------------------------------------------------------------ nomination

    def _maybe_nominate(self, now: float) -> None:
        """§8.1.1 regular nomination by the controlling agent: once a valid pair exists, wait
        ``nomination_grace`` or until no better pair is still being checked, then send a check
        with USE-CANDIDATE on the best valid pair."""
        if not self.controlling or not self.valid_pairs:
            return
        if self._nomination_pending is not None or self._nomination_txn is not None:
            return
        if self._nominate_at is None:
            self._nominate_at = now + self.nomination_grace
        best = max(self.valid_pairs, key=lambda p: p.priority)
        better_pending = any(
            p.priority > best.priority
            and p.state in (PairState.FROZEN, PairState.WAITING, PairState.IN_PROGRESS)
            for p in self.pairs
        )
        if better_pending and now < self._nominate_at - _EPSILON:
            return
        self._nomination_pending = best

    def _select(self, pair: Pair, rtt: Optional[float]) -> None:
        pair.nominated = True
        self.selected = pair
        self.state = "completed"
        self._drop_transactions()
        self._events.append(PairNominated(pair, rtt))
        logger.debug("selected pair %s", pair.describe())
