"""Pure-Python twin of `_relay.pyx`: the same relay engine over recvfrom/sendto and dicts.

Keep the two files in step: the same tests run against both (tests/conftest.py `relay`).
Works on any platform; `_relay.pyx` (recvmmsg/sendmmsg, a C hash table) is Linux only.
See `RelayEngine` for the semantics.
"""

import errno
import hmac
import socket as _socket
import time

from ._addr_py import (  # noqa: F401 - MAX_* are this module's constants too
    MAX_BATCH_SIZE,
    MAX_DATAGRAM,
    MAX_FLOWINFO,
    RECV_TOO_BIG as _RECV_TOO_BIG,
    _non_negative,
    check_address,
    relay_args,
    session_id as _session_id,
)
from ._kinds import (
    RELAY_FRAME_TYPE,
    RELAY_HEADER_LEN,
    RELAY_NO_TOKEN,
    RELAY_TOKEN_LEN,
    RELAY_TOKEN_OFFSET,
)

COUNTERS = (
    "received", "returned", "relayed_packets", "relayed_bytes", "dropped_unknown_session",
    "dropped_not_member", "dropped_bad_token", "dropped_rate_limited", "dropped_malformed",
    "send_errors", "truncated", "handed_off", "handoff_dropped",
)

# send errors that drop the rest of the batch's frames (a relay never waits).
_SEND_STOP = frozenset(e for e in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS,
                                   errno.EBADF, errno.ENOTSOCK, errno.EFAULT))


def relay_token(value):
    """A member's relay token as 8 bytes; shared with _relay.pyx.

    Every member has one (a session whose frames are not checked must not exist):
    TypeError if it is not bytes-like (None included), ValueError if it is not 8
    bytes long or is eight zero bytes, what a node sends when it was given no token
    (RELAY_NO_TOKEN).
    """
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"relay token must be bytes-like, not {type(value).__name__}")
    token = bytes(value)
    if len(token) != RELAY_TOKEN_LEN:
        raise ValueError(f"relay token must be {RELAY_TOKEN_LEN} bytes, got {len(token)}")
    if token == RELAY_NO_TOKEN:
        raise ValueError("relay token must not be all zeros (what a node sends without one)")
    return token


def relay_rate(rate_bps, burst_bytes):
    """A session's (rate, burst) for set_rate, checked like the constructor's: finite
    numbers >= 0 (TypeError if not numbers), a burst of 0 under a rate made one second of
    traffic; shared with _relay.pyx."""
    rate = _non_negative("rate_bps", rate_bps)
    burst = _non_negative("burst_bytes", burst_bytes)
    if rate > 0 and burst == 0:
        burst = rate  # one second of traffic
    return rate, burst


def _member(family, addr):
    """(sendto address, (host, port) as recvfrom reports it) for a member address tuple.

    Same rules as `address_to_sockaddr` (_sockaddr.pxd) in _relay.pyx, bools refused: see
    `check_address` in _addr_py.py. On AF_INET6 an IPv4 literal is stored as ::ffff:a.b.c.d,
    as the kernel reports IPv4 peers of an AF_INET6 socket. Hosts are normalised with
    inet_ntop, the function behind recvfrom's addresses, so the source check is a tuple
    comparison.
    """
    _, port, flowinfo, scope_id, packed = check_address(family, addr, allow_bool=False)
    host = _socket.inet_ntop(family, packed)
    if family == _socket.AF_INET:
        return (host, port), (host, port)
    return (host, port, flowinfo, scope_id), (host, port)


class _Session:
    __slots__ = ("dest", "key", "relay_token", "packets", "nbytes", "dropped_rate_limited",
                 "dropped_not_member", "dropped_bad_token", "created", "last_activity",
                 "rate", "burst", "tokens", "refilled_at")

    def __init__(self, created, rate, burst, relay_tokens):
        self.dest = [None, None]   # sendto address per member (0 = A, 1 = B), None = unknown
        self.key = [None, None]    # (host, port) as recvfrom reports the member
        self.relay_token = relay_tokens  # each member's 8 bytes
        self.packets = [0, 0]      # by source member: [0] = A to B, [1] = B to A
        self.nbytes = [0, 0]       # whole frames (header included), as sent on the wire
        self.dropped_rate_limited = 0
        self.dropped_not_member = 0
        self.dropped_bad_token = 0
        self.created = created
        self.last_activity = None
        self.rate = rate           # bytes/s, 0 = unlimited (the engine's until set_rate)
        self.burst = burst         # the bucket's capacity, in bytes
        self.tokens = burst        # token bucket, in bytes: a new session starts full
        self.refilled_at = created

    def set_rate(self, rate, burst, now):
        """New rate and burst from now on: tokens earned so far at the old rate are kept,
        up to the new burst; a bucket that had no rate starts full."""
        if self.rate > 0:
            if now > self.refilled_at:
                self.tokens = min(self.burst, self.tokens + (now - self.refilled_at) * self.rate)
            self.tokens = min(self.tokens, burst)
        else:
            self.tokens = burst
        self.refilled_at = now
        self.rate, self.burst = rate, burst


class RelayEngine:
    """Reads the intermediate's socket and relays frames between session members.

    RelayEngine(sock, batch_size=32, max_datagram=65535, rate_limit_bps=0, burst_bytes=0,
                *, gso=True, worker_sockets=())

    sock: a non-blocking UDP socket (AF_INET or AF_INET6); it stays the caller's (never
        closed, options untouched). The engine is its only reader.
    worker_sockets: more sockets of the same family, normally bound to sock's address with
        SO_REUSEPORT. The compiled engine reads each in a relay thread of its own; this twin
        reads them in poll() too, one batch each after sock's, when the caller finds one of
        reader_fds() readable. Either way it reads duplicates of their descriptors, closed by
        close(); `threads` is 1 + len(worker_sockets). A frame leaves by the socket it came
        in on; what is not a relay frame is returned by poll() (counted in handed_off).
    rate_limit_bps: per-session token bucket rate in BYTES per second (0 = unlimited),
        shared by both directions and charged the whole frame length; burst_bytes is the
        bucket's capacity (0 = one second at the rate). A new session starts full, at this
        rate until set_rate gives it its own.
    gso: the compiled engine sends runs of same-size frames for one destination as UDP GSO
        sends; this twin accepts the flag and always sends one datagram per sendto, so its
        `gso` attribute is False.

    poll() -> [(data, address)]: reads one batch (never blocks). Relay frames (first byte
        0x10) are forwarded or dropped and counted, never returned; every other datagram is
        returned with its source address as socket.recvfrom gives it. Returns [] when nothing
        waits - or when the whole batch was relay frames, so loop while `last_batch_size`
        (datagrams read by the last poll) is not 0.
    reader_fds() -> descriptors besides sock's to watch for reading, calling poll() when one
        is readable: here the worker sockets (compiled: the relay threads' hand-off eventfd).
    close(): stops reading the worker sockets and closes the engine's duplicates of them.
        Idempotent; poll() still serves sock.
    add_session(session_id, member_a, member_b, token_a, token_b): member addresses are
        tuples like recvfrom's (or None while unknown). On AF_INET6 sockets IPv4 literals are
        stored v4-mapped, as the kernel reports such peers. token_a / token_b: each member's
        8-byte relay token (control.SessionOpened.relay_token), which its frames must carry;
        both are required, so every session checks them. A session id already present raises
        ValueError; a token that is not 8 bytes, or is all zeros, ValueError (TypeError if
        not bytes, None included). The session starts at the engine's rate and burst.
    set_member(session_id, index, addr): index 0 = A, 1 = B; addr None = unknown. The
        member's token stays. KeyError for an unknown session.
    set_rate(session_id, rate_bps, burst_bytes): this session's token bucket from now on
        (bytes/s, 0 = unlimited; burst 0 = one second at the rate), other sessions keep
        theirs. Tokens the session earned at its old rate stay, up to the new burst; one that
        was unlimited starts full. KeyError for an unknown session; rate and burst are checked
        as the constructor's.
    remove_session(session_id): forgets it; an unknown id is ignored.
    session_stats(session_id) -> dict | None; counters() -> dict; session_count; fileno().

    A frame is forwarded when its session is known, its source IP and port equal member A's
    or B's and its relay token (bytes 9-16) is that member's, the other member's address is
    known, and the bucket holds its length in tokens. Otherwise it is dropped and counted:
    dropped_malformed (0x10 with no complete 17-byte header and inner packet),
    dropped_unknown_session, dropped_not_member (source not a member, or other member
    unknown), dropped_bad_token (source a member's, token not that member's: a spoofed
    source address), dropped_rate_limited. Frames are authenticated before the bucket is
    charged, so spoofed frames cannot spend a session's rate. A send the kernel refuses on
    its own is skipped; EAGAIN or ENOBUFS drop the rest of the batch's frames (a relay never
    blocks): all counted in send_errors. Datagrams longer than max_datagram are dropped and
    counted in truncated. handed_off: datagrams from worker sockets returned by poll();
    handoff_dropped: the compiled engine's, when its hand-off queue is full (here 0).
    """

    def __init__(self, sock, batch_size=32, max_datagram=65535, rate_limit_bps=0,
                 burst_bytes=0, *, gso=True, worker_sockets=()):
        (self._family, self._batch_size, self._max_datagram, self._rate,
         self._burst) = relay_args(sock, batch_size, max_datagram, rate_limit_bps, burst_bytes)
        workers = list(worker_sockets)
        for w in workers:
            if relay_args(w, self._batch_size, self._max_datagram, 0, 0)[0] != self._family:
                raise ValueError("worker sockets must be of the main socket's family")
        self._workers = []
        for w in workers:
            dup = w.dup()
            dup.setblocking(False)
            self._workers.append(dup)
        self.threads = 1 + len(workers)
        self._sock = sock
        self._sessions = {}
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._pending_error = None
        self._last_batch_size = 0

    batch_size = property(lambda self: self._batch_size)
    max_datagram = property(lambda self: self._max_datagram)
    rate_limit_bps = property(lambda self: self._rate)
    burst_bytes = property(lambda self: self._burst)
    last_batch_size = property(lambda self: self._last_batch_size)
    gso = property(lambda self: False)

    @property
    def session_count(self):
        """Sessions in the table."""
        return len(self._sessions)

    def fileno(self):
        """The socket's file descriptor (-1 once the caller closed it)."""
        return self._sock.fileno()

    def reader_fds(self):
        """Descriptors besides the main socket's whose readability means poll() has work."""
        return tuple(w.fileno() for w in self._workers)

    def close(self):
        """Stop reading the worker sockets (poll() still serves the main socket)."""
        workers, self._workers = self._workers, []
        for w in workers:
            w.close()

    # --- session table ---------------------------------------------------------------------

    def add_session(self, session_id, member_a, member_b, token_a, token_b):
        """Start relaying for session_id between member_a and member_b (None = unknown),
        each frame carrying its sender's token (token_a, token_b)."""
        sid = _session_id(session_id)
        if sid in self._sessions:
            raise ValueError(f"session {sid.hex()} already exists")
        members = [None if addr is None else _member(self._family, addr)
                   for addr in (member_a, member_b)]
        tokens = [relay_token(token_a), relay_token(token_b)]
        session = _Session(time.monotonic(), self._rate, self._burst, tokens)
        for index, member in enumerate(members):
            if member is not None:
                session.dest[index], session.key[index] = member
        self._sessions[sid] = session

    def set_member(self, session_id, index, addr):
        """A member's observed address changed (QAD): frames now go to / come from addr."""
        sid = _session_id(session_id)
        session = self._sessions.get(sid)
        if session is None:
            raise KeyError(sid)
        if isinstance(index, bool) or not isinstance(index, int) or index not in (0, 1):
            raise ValueError(f"member index must be 0 (A) or 1 (B), not {index!r}")
        if addr is None:
            session.dest[index] = session.key[index] = None
        else:
            session.dest[index], session.key[index] = _member(self._family, addr)

    def set_rate(self, session_id, rate_bps, burst_bytes):
        """This session's relay rate (bytes/s, 0 = unlimited) and burst from now on."""
        sid = _session_id(session_id)
        rate, burst = relay_rate(rate_bps, burst_bytes)
        session = self._sessions.get(sid)
        if session is None:
            raise KeyError(sid)
        session.set_rate(rate, burst, time.monotonic())

    def remove_session(self, session_id):
        """Stop relaying for session_id (an unknown id is ignored)."""
        self._sessions.pop(_session_id(session_id), None)

    def session_stats(self, session_id):
        """Counters of one session, or None if it is unknown."""
        session = self._sessions.get(_session_id(session_id))
        if session is None:
            return None
        return {
            "member_a": session.dest[0],
            "member_b": session.dest[1],
            "packets_a_to_b": session.packets[0],
            "bytes_a_to_b": session.nbytes[0],
            "packets_b_to_a": session.packets[1],
            "bytes_b_to_a": session.nbytes[1],
            "dropped_rate_limited": session.dropped_rate_limited,
            "dropped_not_member": session.dropped_not_member,
            "dropped_bad_token": session.dropped_bad_token,
            "rate_bps": session.rate,
            "burst_bytes": session.burst,
            "created": session.created,
            "last_activity": session.last_activity,
        }

    def counters(self):
        """Engine-wide counters (see the class docstring)."""
        return dict(self._counters)

    # --- the hot path ------------------------------------------------------------------------

    def poll(self):
        """Read one batch, relay its frames; return the other datagrams as [(data, addr)],
        then one batch of each worker socket."""
        if self._pending_error is not None:
            exc, self._pending_error = self._pending_error, None
            self._last_batch_size = 0
            raise exc
        out = []
        try:
            n = self._read(self._sock, out, True)
        except OSError:
            self._last_batch_size = 0
            raise
        for w in self._workers:
            before = len(out)
            try:
                n += self._read(w, out, False)
            except OSError:
                pass  # an error surfacing on a worker socket: the next poll reads on
            self._counters["handed_off"] += len(out) - before
        self._last_batch_size = n
        return out

    def _read(self, sock, out, main):
        """One batch of sock: relay frames forwarded by sock, the others appended to out;
        returns how many datagrams were read."""
        c = self._counters
        recvfrom = sock.recvfrom
        limit = self._max_datagram
        bufsize = limit + 1  # one byte more than the limit tells "fits" from "was cut"
        sessions = self._sessions
        returned = len(out)
        forward = []
        n = 0
        for _ in range(self._batch_size):
            try:
                data, addr = recvfrom(bufsize)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _RECV_TOO_BIG:
                    n += 1
                    c["truncated"] += 1
                    continue
                if n and main:  # like recvmmsg: deal with what arrived, report it next call
                    self._pending_error = exc
                    break
                if n:
                    break
                raise
            n += 1
            if len(data) > limit:
                c["truncated"] += 1
                continue
            if not data or data[0] != RELAY_FRAME_TYPE:
                out.append((data, addr))
                continue
            if len(data) <= RELAY_HEADER_LEN:
                c["dropped_malformed"] += 1
                continue
            session = sessions.get(data[1:RELAY_TOKEN_OFFSET])
            if session is None:
                c["dropped_unknown_session"] += 1
                continue
            # The sender is the member whose address AND token the frame has (A and B may
            # share an address: then the token alone tells them apart).
            source = (addr[0], addr[1])
            d = -1
            claimed = False
            for index in (0, 1):
                if source == session.key[index]:
                    if hmac.compare_digest(data[RELAY_TOKEN_OFFSET:RELAY_HEADER_LEN],
                                           session.relay_token[index]):
                        d = index
                        break
                    claimed = True
            if d < 0:
                if claimed:  # a member's address with the wrong token: spoofed
                    session.dropped_bad_token += 1
                    c["dropped_bad_token"] += 1
                else:
                    session.dropped_not_member += 1
                    c["dropped_not_member"] += 1
                continue
            dest = session.dest[1 - d]
            if dest is None:
                session.dropped_not_member += 1
                c["dropped_not_member"] += 1
                continue
            forward.append((data, dest, session, d))
        c["received"] += n
        if forward:
            self._forward(sock, forward, time.monotonic())
        c["returned"] += len(out) - returned
        return n

    def _forward(self, sock, forward, now):
        """Charge each session's token bucket, then sendto each frame; count what went out."""
        c = self._counters
        allowed = []
        for item in forward:
            session = item[2]
            rate = session.rate
            if rate > 0:
                length = len(item[0])
                if now > session.refilled_at:
                    session.tokens = min(session.burst, session.tokens
                                         + (now - session.refilled_at) * rate)
                    session.refilled_at = now
                if session.tokens < length:
                    session.dropped_rate_limited += 1
                    c["dropped_rate_limited"] += 1
                    continue
                session.tokens -= length
            allowed.append(item)
        forward = allowed
        sendto = sock.sendto
        for i, (data, dest, session, d) in enumerate(forward):
            try:
                sendto(data, dest)  # EINTR is retried by Python (PEP 475)
            except OSError as exc:
                if isinstance(exc, BlockingIOError) or exc.errno in _SEND_STOP:
                    c["send_errors"] += len(forward) - i
                    return
                # Refused on its own (EMSGSIZE, ENETUNREACH, EPERM...): skip that frame.
                c["send_errors"] += 1
                continue
            length = len(data)
            session.packets[d] += 1
            session.nbytes[d] += length
            session.last_activity = now
            c["relayed_packets"] += 1
            c["relayed_bytes"] += length
