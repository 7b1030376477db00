# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The node's connectivity-check scheduler: keyed timers plus Ta pacing, compiled.

Twin of `_sched_py.py` (same API, same tests: tests/conftest.py `sched`). One Scheduler
serves every session of a node:

* timers keyed by any hashable key, one deadline per key: `schedule` sets or replaces it,
  `cancel` drops it, `pop_due(now)` returns the due keys earliest first, ties in the order
  they were scheduled (a replaced key counts as scheduled at its replacement);
* Ta pacing (RFC 8445 §14.2): at most one new check every Ta across the whole agent.

Layout: the heap is a C array of (deadline, sequence, slot) entries ordered by
(deadline, sequence). Each key owns a slot; `_keys[slot]` holds the key object and
`_live_seq[slot]` the sequence number of its one live heap entry (0 when the slot is free),
so the sequence number is the slot's generation. `_index` maps key -> slot. Cancel and
replace only change the slot's generation (O(1) plus a dict operation); a heap entry whose
sequence is no longer its slot's generation is stale and is skipped when it reaches the
top. When stale entries are more than half of the heap it is compacted and re-heapified.

Key hashing and comparison can run Python code; no C pointer into the arrays is kept across
such a call, so a key that calls back into the scheduler cannot corrupt it.
"""

from libc.math cimport INFINITY
from libc.stdint cimport INT32_MAX, int32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc

# Compaction is not worth it below this many heap entries.
cdef Py_ssize_t MIN_COMPACT = 64
cdef Py_ssize_t INITIAL_CAPACITY = 16
# _live_seq of a slot handed out but not yet scheduled; sequence numbers start at 1 and
# would need 2**64 - 1 schedule calls to reach it.
cdef uint64_t ALLOCATED = 0xFFFFFFFFFFFFFFFF


cdef struct Entry:
    double when
    uint64_t seq
    int32_t slot


cdef inline bint _before(const Entry* a, const Entry* b) noexcept nogil:
    return a.when < b.when or (a.when == b.when and a.seq < b.seq)


cdef inline void _sift_up(Entry* heap, Py_ssize_t pos) noexcept nogil:
    cdef Entry item = heap[pos]
    cdef Py_ssize_t parent
    while pos > 0:
        parent = (pos - 1) >> 1
        if not _before(&item, &heap[parent]):
            break
        heap[pos] = heap[parent]
        pos = parent
    heap[pos] = item


cdef inline void _sift_down(Entry* heap, Py_ssize_t size, Py_ssize_t pos) noexcept nogil:
    cdef Entry item = heap[pos]
    cdef Py_ssize_t child
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and _before(&heap[child + 1], &heap[child]):
            child += 1
        if not _before(&heap[child], &item):
            break
        heap[pos] = heap[child]
        pos = child
    heap[pos] = item


cdef class Scheduler:
    """Keyed deadlines (one per key) and Ta pacing shared by all sessions of a node.

    Times are seconds on the caller's clock (every method takes `now`; nothing here reads
    a clock). A NaN time raises ValueError.
    """

    cdef Entry* _heap
    cdef Py_ssize_t _size
    cdef Py_ssize_t _capacity
    cdef uint64_t* _live_seq     # per slot: sequence of its live heap entry, 0 if free
    cdef double* _when           # per slot: its deadline
    cdef int32_t* _free          # stack of free slots
    cdef Py_ssize_t _nfree
    cdef Py_ssize_t _slots       # slots handed out so far (len(_keys))
    cdef Py_ssize_t _slot_capacity
    cdef list _keys
    cdef dict _index
    cdef uint64_t _seq
    cdef readonly double pacing_interval
    cdef double _next_slot
    cdef uint64_t _deferred

    def __cinit__(self):
        self._heap = <Entry*>malloc(INITIAL_CAPACITY * sizeof(Entry))
        self._live_seq = <uint64_t*>malloc(INITIAL_CAPACITY * sizeof(uint64_t))
        self._when = <double*>malloc(INITIAL_CAPACITY * sizeof(double))
        self._free = <int32_t*>malloc(INITIAL_CAPACITY * sizeof(int32_t))
        if (self._heap == NULL or self._live_seq == NULL or self._when == NULL
                or self._free == NULL):
            raise MemoryError()
        self._capacity = INITIAL_CAPACITY
        self._slot_capacity = INITIAL_CAPACITY
        self._size = 0
        self._nfree = 0
        self._slots = 0
        self._keys = []
        self._index = {}
        self._seq = 0
        self._next_slot = -INFINITY
        self._deferred = 0

    def __dealloc__(self):
        free(self._heap)
        free(self._live_seq)
        free(self._when)
        free(self._free)

    def __init__(self, double pacing_interval=0.020):
        # RFC 8445 §14.2: Ta defaults to 20 ms ("Ta SHOULD be configurable ... 5 ms").
        if not (0.0 <= pacing_interval < INFINITY):
            raise ValueError(f"pacing interval must be finite and >= 0, not {pacing_interval!r}")
        self.pacing_interval = pacing_interval

    # Storage -----------------------------------------------------------------------------
    cdef int _reserve_entry(self) except -1:
        """Make room for one more heap entry."""
        cdef Entry* grown
        cdef Py_ssize_t capacity
        if self._size < self._capacity:
            return 0
        capacity = self._capacity * 2
        grown = <Entry*>realloc(self._heap, capacity * sizeof(Entry))
        if grown == NULL:
            raise MemoryError()
        self._heap = grown
        self._capacity = capacity
        return 0

    cdef int32_t _alloc_slot(self) except -1:
        cdef Py_ssize_t capacity
        cdef void* grown
        cdef int32_t slot
        if self._nfree:
            self._nfree -= 1
            slot = self._free[self._nfree]
            self._live_seq[slot] = ALLOCATED
            return slot
        if self._slots == self._slot_capacity:
            if self._slot_capacity >= INT32_MAX // 2:
                raise OverflowError("too many scheduler keys")
            capacity = self._slot_capacity * 2
            # Each array is adopted as soon as it has grown: a later failure leaves it
            # merely larger than _slot_capacity says.
            grown = realloc(self._live_seq, capacity * sizeof(uint64_t))
            if grown == NULL:
                raise MemoryError()
            self._live_seq = <uint64_t*>grown
            grown = realloc(self._when, capacity * sizeof(double))
            if grown == NULL:
                raise MemoryError()
            self._when = <double*>grown
            grown = realloc(self._free, capacity * sizeof(int32_t))
            if grown == NULL:
                raise MemoryError()
            self._free = <int32_t*>grown
            self._slot_capacity = capacity
        slot = <int32_t>self._slots
        self._keys.append(None)
        self._live_seq[slot] = ALLOCATED
        self._slots += 1
        return slot

    cdef void _release(self, int32_t slot):
        """Free a slot; its heap entry (if any) becomes stale. Freeing a free slot (only
        possible if a key's hash changed while scheduled) does nothing."""
        if self._live_seq[slot] == 0 or self._nfree >= self._slot_capacity:
            return
        self._live_seq[slot] = 0
        self._free[self._nfree] = slot
        self._nfree += 1
        self._keys[slot] = None  # may run a key's __del__: last

    cdef inline void _pop_top(self) noexcept:
        self._size -= 1
        if self._size:
            self._heap[0] = self._heap[self._size]
            _sift_down(self._heap, self._size, 0)

    cdef void _maybe_compact(self) noexcept:
        """Drop stale entries once they are more than half of the heap."""
        cdef Py_ssize_t i, kept = 0, size = self._size, capacity
        cdef Entry* heap = self._heap
        cdef Entry* shrunk
        if size < MIN_COMPACT or 2 * (size - len(self._index)) <= size:
            return
        for i in range(size):
            if self._live_seq[heap[i].slot] == heap[i].seq:
                heap[kept] = heap[i]
                kept += 1
        self._size = kept
        i = kept // 2
        while i > 0:
            i -= 1
            _sift_down(heap, kept, i)
        capacity = self._capacity
        while capacity > INITIAL_CAPACITY and capacity >= 4 * kept:
            capacity //= 2
        if capacity != self._capacity:
            shrunk = <Entry*>realloc(heap, capacity * sizeof(Entry))
            if shrunk != NULL:
                self._heap = shrunk
                self._capacity = capacity

    # Timers ------------------------------------------------------------------------------
    def schedule(self, key, double when):
        """Set key's deadline, replacing any earlier one; `when` may not be NaN."""
        cdef int32_t slot
        cdef uint64_t seq
        cdef Py_ssize_t pos
        cdef bint new
        if when != when:
            raise ValueError("deadline is NaN")
        found = self._index.get(key)
        # A free slot here means the key's hash changed while it was scheduled: start over.
        new = found is None or self._live_seq[<int32_t>found] == 0
        if new:
            slot = self._alloc_slot()
            try:
                self._index[key] = slot
            except BaseException:
                self._release(slot)
                raise
            self._keys[slot] = key
        else:
            slot = found
        try:
            self._reserve_entry()
        except MemoryError:
            if new:
                self._index.pop(key, None)
                self._release(slot)
            raise
        self._seq += 1
        seq = self._seq
        self._live_seq[slot] = seq
        self._when[slot] = when
        pos = self._size
        self._heap[pos].when = when
        self._heap[pos].seq = seq
        self._heap[pos].slot = slot
        self._size = pos + 1
        _sift_up(self._heap, pos)
        if not new:
            self._maybe_compact()

    def cancel(self, key):
        """Forget key's deadline; no-op if it has none."""
        found = self._index.pop(key, None)
        if found is None:
            return
        self._release(<int32_t>found)
        self._maybe_compact()

    def deadline(self, key):
        """key's pending deadline, or None."""
        found = self._index.get(key)
        if found is None:
            return None
        return self._when[<int32_t>found]

    def next_deadline(self):
        """The earliest pending deadline, or None when nothing is pending."""
        cdef Entry* top
        while self._size:
            top = &self._heap[0]
            if self._live_seq[top.slot] == top.seq:
                return top.when
            self._pop_top()
        return None

    def pop_due(self, double now):
        """Remove and return the keys whose deadline is <= now: earliest first, ties in
        scheduling order."""
        cdef Entry top
        cdef list due = []
        if now != now:
            raise ValueError("now is NaN")
        while self._size:
            top = self._heap[0]
            if self._live_seq[top.slot] != top.seq:
                self._pop_top()
                continue
            if not top.when <= now:
                break
            self._pop_top()
            key = self._keys[top.slot]
            self._release(top.slot)
            self._index.pop(key, None)
            due.append(key)
        if due:
            self._maybe_compact()
        return due

    def __len__(self):
        return len(self._index)

    # Ta pacing (RFC 8445 §14.2) ----------------------------------------------------------
    def pacing_slot(self, double now):
        """The earliest time >= now at which a new paced check may go out."""
        if now != now:
            raise ValueError("now is NaN")
        return self._next_slot if self._next_slot > now else now

    def take_pacing_slot(self, double now):
        """Reserve the pacing slot if it is open at `now` (the next opens one interval
        later) and return True; else count a deferral and return False."""
        if now != now:
            raise ValueError("now is NaN")
        if now >= self._next_slot:
            self._next_slot = now + self.pacing_interval
            return True
        self._deferred += 1
        return False

    def pacing_deferred(self):
        """How many take_pacing_slot calls returned False."""
        return self._deferred
