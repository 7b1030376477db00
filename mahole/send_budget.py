"""The send budget: bytes a node read from local TCP connections and the peer has not yet
acknowledged, all streams of all its sessions together (sans-IO; `mahole.tunnel.StreamPipe`
is its shell)."""


class SendBudget:
    """Bytes read from local TCP and not yet acknowledged by the peer, all streams of a node.

    Sans-IO: the pipes (the shell) tell it what they read and what was acknowledged, and it
    answers which waiting streams may read again. A stream may read while `used` is below
    `limit` (`admit`); it is charged only what a read returned (`charge`), so a stream whose
    client is idle holds nothing. Once `used` reaches the limit, streams that want to read
    wait in arrival order (their sockets paused, so their TCP senders block) and `release`
    grants them, oldest first, as soon as `used` is below the limit again. A read admitted
    below the limit may take `used` past it by at most that one read: `used` stays under
    `limit` + one read per stream.

    Charged bytes are released when the peer acknowledged them, not when they were sent:
    QUIC keeps every sent byte for retransmission until its acknowledgement (RFC 9000 §13.3),
    so until then the bytes are still in this node's memory.
    """

    def __init__(self, limit):
        if limit <= 0:
            raise ValueError(f"send budget must be positive, got {limit}")
        self.limit = limit
        self.used = 0
        self.peak = 0  # most bytes charged at once
        self.waits = 0  # times a stream had to wait
        self.longest_wait = 0.0  # seconds, of a granted wait
        self.streams = 0  # streams open that may read (add_stream / remove_stream)
        self._waiting = {}  # waiter -> since when, oldest first (dicts keep insertion order)

    def admit(self, waiter, now):
        """True if `waiter` may read now; else it waits in line and a later `release` names
        it (unless `cancel` came first)."""
        if self.used < self.limit and not self._waiting:
            return True
        if waiter not in self._waiting:
            self.waits += 1
            self._waiting[waiter] = now
        return False

    def add_stream(self):
        self.streams += 1

    def remove_stream(self):
        self.streams -= 1

    def few_streams(self, per_stream):
        """True while every open stream holding `per_stream` bytes outside the budget (in
        its reader) would hold no more than a quarter of the limit together."""
        return self.streams * per_stream <= self.limit >> 2

    def cancel(self, waiter):
        """`waiter` no longer waits (its stream closed)."""
        self._waiting.pop(waiter, None)

    def charge(self, count):
        """A read returned `count` bytes."""
        self.used += count
        if self.used > self.peak:
            self.peak = self.used

    def release(self, count, now):
        """`count` charged bytes were acknowledged (or their stream ended): the waiters that
        may read again, oldest first."""
        self.used -= count
        granted = []
        waiting = self._waiting
        while waiting and self.used < self.limit:
            waiter = next(iter(waiting))
            self.longest_wait = max(self.longest_wait, now - waiting.pop(waiter))
            granted.append(waiter)
        return granted

    @property
    def waiting(self):
        return len(self._waiting)

    def status(self):
        return {"limit": self.limit, "used": self.used, "peak": self.peak,
                "waiting": len(self._waiting), "waits": self.waits, "streams": self.streams,
                "longest_wait": round(self.longest_wait, 3)}
