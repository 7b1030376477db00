"""The send budget: bytes a node read from local TCP connections and the peer has not yet
acknowledged, all streams of all its sessions together (sans-IO; `mahole.tunnel.StreamPipe`
is its shell)."""

import heapq

from .config import MIN_SEND_BUDGET

# One read of a stream from its TCP socket (mahole.tunnel.READ_SIZE): the least fair share.
READ = MIN_SEND_BUDGET


class SendBudget:
    """Bytes read from local TCP and not yet acknowledged by the peer, all streams of a node.

    Sans-IO: the pipes (the shell) tell it what each read and what was acknowledged, and it
    answers which waiting streams may read again. Without contention (nobody waiting) a
    stream may read while `used` is below `limit` (`admit`); it is charged only what a read
    returned (`charge`), so a stream whose client is idle holds nothing.

    Under contention a stream holding its fair share or more - `limit` / the streams holding
    a charge, never below one read - waits even below the limit, so streams whose peers read
    slowly (their charge released only as the peer acknowledges) cannot hold the budget
    against the others. Waiters within their share are granted first, oldest first; those
    over it only when no waiter within its share is left. A release grants about as many
    reads as fit below the limit, not every waiter at once. A stream that holds nothing
    never waits, even with the budget spent: 16 stalled streams of 4 MiB each (the whole
    default) cannot keep another from moving one read per acknowledgement.

    Bound: every stream takes `used` past the limit by at most one read (a read admitted
    below it, or a read of a stream that held nothing), so `used` stays under `limit` + one
    read per stream. Each call costs O(log n) in the streams waiting.

    Charged bytes are released when the peer acknowledged them, not when they were sent:
    QUIC keeps every sent byte for retransmission until its acknowledgement (RFC 9000 §13.3),
    so until then the bytes are still in this node's memory.
    """

    def __init__(self, limit, read_size=READ):
        if limit <= 0:
            raise ValueError(f"send budget must be positive, got {limit}")
        self.limit = limit
        self.read_size = read_size
        self.used = 0
        self.peak = 0  # most bytes charged at once
        self.waits = 0  # times a stream had to wait
        self.longest_wait = 0.0  # seconds, of a granted wait
        self.streams = 0  # streams open that may read (add_stream / remove_stream)
        self._charges = {}  # stream -> bytes charged, only streams holding some
        self._waiting = {}  # stream -> [arrival number, since when, in the fair queue?]
        self._arrivals = 0
        # Waiters in arrival order, (arrival number, stream): within their share, and over it.
        # Entries whose stream left or moved are skipped when they come up (lazy deletion).
        self._fair = []
        self._over = []

    def share(self):
        """A stream's fair share under contention: every waiter holds a charge (a stream
        holding nothing never waits), so the streams holding one are all that compete."""
        return max(self.limit // max(len(self._charges), 1), self.read_size)

    def admit(self, waiter, now):
        """True if `waiter` may read now; else it waits in line and a later `release` names
        it (unless `cancel` came first)."""
        if waiter in self._waiting:
            return False
        held = self._charges.get(waiter, 0)
        if not held or (not self._waiting and self.used < self.limit):
            return True
        fair = held < self.share()
        if fair and self.used < self.limit and self._head(self._fair, True) is None:
            return True
        self.waits += 1
        self._arrivals += 1
        self._waiting[waiter] = [self._arrivals, now, fair]
        heapq.heappush(self._fair if fair else self._over, (self._arrivals, waiter))
        if len(self._fair) + len(self._over) > 2 * len(self._waiting) + 64:
            self._compact()  # O(n) once per n entries left behind: O(1) amortised
        return False

    def _compact(self):
        """Rebuild both queues from the live waiters, dropping entries left behind."""
        self._fair = [(e[0], w) for w, e in self._waiting.items() if e[2]]
        self._over = [(e[0], w) for w, e in self._waiting.items() if not e[2]]
        heapq.heapify(self._fair)
        heapq.heapify(self._over)

    def add_stream(self):
        self.streams += 1

    def remove_stream(self):
        self.streams -= 1

    def few_streams(self, per_stream):
        """True while every open stream holding `per_stream` bytes outside the budget (in
        its reader) would hold no more than a quarter of the limit together."""
        return self.streams * per_stream <= self.limit >> 2

    def cancel(self, waiter):
        """`waiter` no longer waits (its stream closed, or it was granted)."""
        self._waiting.pop(waiter, None)

    def charge(self, waiter, count):
        """A read of `waiter` returned `count` bytes."""
        if count <= 0:
            return
        self._charges[waiter] = self._charges.get(waiter, 0) + count
        self.used += count
        if self.used > self.peak:
            self.peak = self.used

    def release(self, waiter, count, now):
        """`count` bytes charged to `waiter` were acknowledged (or its stream ended): the
        waiters that may read again, in the order granted."""
        held = self._charges.get(waiter, 0)
        count = min(count, held)
        self.used -= count
        granted = []
        if held > count:
            self._charges[waiter] = held - count
            entry = self._waiting.get(waiter)
            if entry is not None and not entry[2] and held - count < self.share():
                entry[2] = True  # now within its share: into the fair queue, same place
                heapq.heappush(self._fair, (entry[0], waiter))
        else:
            self._charges.pop(waiter, None)
            if waiter in self._waiting:  # holds nothing now: it never waits
                self._grant(waiter, now, granted)
        # About as many reads as fit below the limit: one read each.
        room = self.limit - self.used
        while room > 0:
            head = self._head(self._fair, True)
            if head is None:
                head = self._head(self._over, False)
                if head is None:
                    break
            self._grant(head, now, granted)
            room -= self.read_size
        if len(self._fair) + len(self._over) > 2 * len(self._waiting) + 64:
            self._compact()
        return granted

    def _head(self, queue, fair):
        """The oldest live waiter of `queue`, without taking it; entries of streams that left
        the queue are dropped, and fair waiters whose share shrank (more streams hold a
        charge now) move to the other queue."""
        while queue:
            arrival, waiter = queue[0]
            entry = self._waiting.get(waiter)
            if entry is None or entry[0] != arrival or entry[2] != fair:
                heapq.heappop(queue)
                continue
            if fair and self._charges.get(waiter, 0) >= self.share():
                heapq.heappop(queue)
                entry[2] = False
                heapq.heappush(self._over, (arrival, waiter))
                continue
            return waiter
        return None

    def _grant(self, waiter, now, granted):
        self.longest_wait = max(self.longest_wait, now - self._waiting.pop(waiter)[1])
        granted.append(waiter)

    @property
    def waiting(self):
        return len(self._waiting)

    def status(self):
        return {"limit": self.limit, "used": self.used, "peak": self.peak,
                "waiting": len(self._waiting), "waits": self.waits, "streams": self.streams,
                "longest_wait": round(self.longest_wait, 3)}
