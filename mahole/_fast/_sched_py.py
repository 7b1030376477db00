"""Pure-Python twin of `_sched.pyx`: keyed timers plus Ta pacing for a node's checks.

Keep the two files in step: the same tests run against both (tests/conftest.py `sched`).
A heapq of [deadline, sequence, key, live] entries ordered by (deadline, sequence), and a
dict key -> its live entry; cancel and replace mark the old entry dead (lazy deletion), and
the heap is rebuilt once dead entries are more than half of it, as in the compiled module.
"""

import math
from heapq import heapify, heappop, heappush

# Compaction is not worth it below this many heap entries.
MIN_COMPACT = 64

_WHEN, _SEQ, _KEY, _LIVE = range(4)


def _as_double(value):
    """float(value) as a C double argument converts it: numbers only, never strings."""
    if type(value) is float:
        return value
    kind = type(value)
    if not (hasattr(kind, "__float__") or hasattr(kind, "__index__")):
        raise TypeError(f"must be real number, not {kind.__name__}")
    return float(value)


class Scheduler:
    """Keyed deadlines (one per key) and Ta pacing shared by all sessions of a node.

    Times are seconds on the caller's clock (every method takes `now`; nothing here reads
    a clock). A NaN time raises ValueError.
    """

    __slots__ = ("_pacing_interval", "_heap", "_index", "_seq", "_next_slot", "_deferred")

    def __init__(self, pacing_interval=0.020):
        # RFC 8445 §14.2: Ta defaults to 20 ms ("Ta SHOULD be configurable ... 5 ms").
        pacing_interval = _as_double(pacing_interval)
        if not 0.0 <= pacing_interval < math.inf:
            raise ValueError(f"pacing interval must be finite and >= 0, not {pacing_interval!r}")
        self._pacing_interval = pacing_interval
        self._heap = []
        self._index = {}
        self._seq = 0
        self._next_slot = -math.inf
        self._deferred = 0

    @property
    def pacing_interval(self):
        return self._pacing_interval

    def _maybe_compact(self):
        """Drop dead entries once they are more than half of the heap."""
        heap = self._heap
        size = len(heap)
        if size < MIN_COMPACT or 2 * (size - len(self._index)) <= size:
            return
        heap[:] = [entry for entry in heap if entry[_LIVE]]
        heapify(heap)

    # Timers ------------------------------------------------------------------------------
    def schedule(self, key, when):
        """Set key's deadline, replacing any earlier one; `when` may not be NaN."""
        if type(when) is not float:
            when = _as_double(when)
        if when != when:
            raise ValueError("deadline is NaN")
        index = self._index
        old = index.get(key)
        self._seq = seq = self._seq + 1
        if old is None:
            entry = [when, seq, key, True]
            index[key] = entry
            heappush(self._heap, entry)
        else:
            old[_LIVE] = False
            entry = [when, seq, old[_KEY], True]  # the dict keeps the first key object
            index[key] = entry
            heappush(self._heap, entry)
            self._maybe_compact()

    def cancel(self, key):
        """Forget key's deadline; no-op if it has none."""
        entry = self._index.pop(key, None)
        if entry is not None:
            entry[_LIVE] = False
            self._maybe_compact()

    def deadline(self, key):
        """key's pending deadline, or None."""
        entry = self._index.get(key)
        return None if entry is None else entry[_WHEN]

    def next_deadline(self):
        """The earliest pending deadline, or None when nothing is pending."""
        heap = self._heap
        while heap:
            if heap[0][_LIVE]:
                return heap[0][_WHEN]
            heappop(heap)
        return None

    def pop_due(self, now):
        """Remove and return the keys whose deadline is <= now: earliest first, ties in
        scheduling order."""
        if type(now) is not float:
            now = _as_double(now)
        if now != now:
            raise ValueError("now is NaN")
        heap = self._heap
        index = self._index
        due = []
        while heap:
            entry = heap[0]
            if not entry[_LIVE]:
                heappop(heap)
                continue
            if not entry[_WHEN] <= now:
                break
            heappop(heap)
            entry[_LIVE] = False
            key = entry[_KEY]
            index.pop(key, None)
            due.append(key)
        if due:
            self._maybe_compact()
        return due

    def __len__(self):
        return len(self._index)

    # Ta pacing (RFC 8445 §14.2) ----------------------------------------------------------
    def pacing_slot(self, now):
        """The earliest time >= now at which a new paced check may go out."""
        if type(now) is not float:
            now = _as_double(now)
        if now != now:
            raise ValueError("now is NaN")
        return self._next_slot if self._next_slot > now else now

    def take_pacing_slot(self, now):
        """Reserve the pacing slot if it is open at `now` (the next opens one interval
        later) and return True; else count a deferral and return False."""
        if type(now) is not float:
            now = _as_double(now)
        if now != now:
            raise ValueError("now is NaN")
        if now >= self._next_slot:
            self._next_slot = now + self._pacing_interval
            return True
        self._deferred += 1
        return False

    def pacing_deferred(self):
        """How many take_pacing_slot calls returned False."""
        return self._deferred
