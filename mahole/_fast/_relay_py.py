"""Pure-Python twin of `_relay.pyx`: the same relay engine over recvfrom/sendto and dicts.

Keep the two files in step: the same tests run against both (tests/conftest.py `relay`).
Works on any platform; `_relay.pyx` (recvmmsg/sendmmsg, a C hash table) is Linux only.
See `RelayEngine` for the semantics.
"""

import errno
import operator
import socket as _socket
import time

from ._kinds import RELAY_FRAME_TYPE, RELAY_HEADER_LEN, RELAY_SESSION_ID_LEN

# The kernel caps recvmmsg/sendmmsg vlen at UIO_MAXIOV (1024); the twin keeps the limit.
MAX_BATCH_SIZE = 1024
# Largest UDP payload a 16-bit length field can describe (RFC 768).
MAX_DATAGRAM = 65535
# IPv6 flow label is 20 bits (RFC 8200 §3); Python's sendto enforces the same range.
MAX_FLOWINFO = 0xFFFFF

COUNTERS = (
    "received", "returned", "relayed_packets", "relayed_bytes", "dropped_unknown_session",
    "dropped_not_member", "dropped_rate_limited", "dropped_malformed", "send_errors",
    "truncated",
)

# send errors that drop the rest of the batch's frames (a relay never waits).
_SEND_STOP = frozenset(e for e in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS,
                                   errno.EBADF, errno.ENOTSOCK, errno.EFAULT))
# recv errors meaning "datagram longer than the buffer" (Windows reports, Linux truncates).
_RECV_TOO_BIG = frozenset(e for e in (errno.EMSGSIZE, getattr(errno, "WSAEMSGSIZE", None))
                          if e is not None)


def _check_args(sock, batch_size, max_datagram, rate_limit_bps, burst_bytes):
    """Validate the constructor arguments (same rules and messages as the compiled one)."""
    batch_size = operator.index(batch_size)
    max_datagram = operator.index(max_datagram)
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be 1-{MAX_BATCH_SIZE}, not {batch_size}")
    if not 1 <= max_datagram <= MAX_DATAGRAM:
        raise ValueError(f"max_datagram must be 1-{MAX_DATAGRAM}, not {max_datagram}")
    rate = _non_negative("rate_limit_bps", rate_limit_bps)
    burst = _non_negative("burst_bytes", burst_bytes)
    family = sock.family
    if family != _socket.AF_INET and family != _socket.AF_INET6:
        raise ValueError(f"RelayEngine needs an AF_INET or AF_INET6 socket, not {family!r}")
    if sock.type != _socket.SOCK_DGRAM:
        raise ValueError(f"RelayEngine needs a SOCK_DGRAM socket, not {sock.type!r}")
    if sock.gettimeout() != 0.0:
        raise ValueError("RelayEngine needs a non-blocking socket (sock.setblocking(False))")
    if rate > 0 and burst == 0:
        burst = rate  # one second of traffic
    return int(family), batch_size, max_datagram, rate, burst


def _non_negative(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    value = float(value)
    if not (value >= 0 and value != float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
    return value


def _session_id(session_id):
    """The 8 session-id bytes; TypeError / ValueError like mahole.wire.relay.encode_frame."""
    if not isinstance(session_id, (bytes, bytearray, memoryview)):
        raise TypeError(f"session_id must be bytes-like, not {type(session_id).__name__}")
    sid = bytes(session_id)
    if len(sid) != RELAY_SESSION_ID_LEN:
        raise ValueError(f"session_id must be {RELAY_SESSION_ID_LEN} bytes, got {len(sid)}")
    return sid


def _member(family, addr):
    """(sendto address, (host, port) as recvfrom reports it) for a member address tuple.

    Same rules as `_sockaddr` in _relay.pyx: AF_INET sockets take (host, port) with an IPv4
    literal; AF_INET6 sockets take (host, port[, flowinfo[, scope_id]]) with an IPv6 literal
    or an IPv4 literal, stored as ::ffff:a.b.c.d (RFC 4291 §2.5.5.2) as the kernel reports
    IPv4 peers of an AF_INET6 socket. Hosts are normalised with inet_pton/inet_ntop, the
    functions behind recvfrom's addresses, so the source check is a tuple comparison.
    """
    if not isinstance(addr, tuple):
        raise ValueError(f"address must be a tuple (host, port), not {addr!r}")
    n = len(addr)
    if family == _socket.AF_INET:
        if n != 2:
            raise ValueError(f"AF_INET address must be (host, port), not {addr!r}")
    elif not 2 <= n <= 4:
        raise ValueError(f"AF_INET6 address must be (host, port[, flowinfo[, scope_id]]), "
                         f"not {addr!r}")
    host = addr[0]
    if not isinstance(host, str) or not host.isascii() or "\0" in host:
        raise ValueError(f"address host must be an IP literal, not {host!r}")
    port = addr[1]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"address port must be an int 0-65535, not {port!r}")
    flowinfo = scope_id = 0
    if n > 2:
        flowinfo = addr[2]
        if (isinstance(flowinfo, bool) or not isinstance(flowinfo, int)
                or not 0 <= flowinfo <= MAX_FLOWINFO):
            raise ValueError(f"address flowinfo must be an int 0-{MAX_FLOWINFO}, "
                             f"not {flowinfo!r}")
    if n > 3:
        scope_id = addr[3]
        if (isinstance(scope_id, bool) or not isinstance(scope_id, int)
                or not 0 <= scope_id <= 0xFFFFFFFF):
            raise ValueError(f"address scope_id must be an int 0-4294967295, not {scope_id!r}")
    if family == _socket.AF_INET:
        packed = _pton(_socket.AF_INET, host)
        if packed is None:
            raise ValueError(f"address host must be an IPv4 literal on an AF_INET socket, "
                             f"not {host!r}")
        host = _socket.inet_ntop(_socket.AF_INET, packed)
        return (host, int(port)), (host, int(port))
    packed = _pton(_socket.AF_INET6, host)
    if packed is None:
        v4 = _pton(_socket.AF_INET, host)
        if v4 is None:
            raise ValueError(f"address host must be an IP literal, not {host!r}")
        packed = b"\0" * 10 + b"\xff\xff" + v4
    host = _socket.inet_ntop(_socket.AF_INET6, packed)
    return (host, int(port), int(flowinfo), int(scope_id)), (host, int(port))


def _pton(family, host):
    try:
        return _socket.inet_pton(family, host)
    except (OSError, ValueError):
        return None


class _Session:
    __slots__ = ("dest", "key", "packets", "nbytes", "dropped_rate_limited",
                 "dropped_not_member", "created", "last_activity", "tokens", "refilled_at")

    def __init__(self, created, tokens):
        self.dest = [None, None]   # sendto address per member (0 = A, 1 = B), None = unknown
        self.key = [None, None]    # (host, port) as recvfrom reports the member
        self.packets = [0, 0]      # by source member: [0] = A to B, [1] = B to A
        self.nbytes = [0, 0]       # whole frames (header included), as sent on the wire
        self.dropped_rate_limited = 0
        self.dropped_not_member = 0
        self.created = created
        self.last_activity = None
        self.tokens = tokens       # token bucket, in bytes
        self.refilled_at = created


class RelayEngine:
    """Reads the intermediate's socket and relays frames between session members.

    RelayEngine(sock, batch_size=32, max_datagram=65535, rate_limit_bps=0, burst_bytes=0,
                *, gso=True)

    sock: a non-blocking UDP socket (AF_INET or AF_INET6); it stays the caller's (never
        closed, options untouched). The engine is its only reader.
    rate_limit_bps: per-session token bucket rate in BYTES per second (0 = unlimited),
        shared by both directions and charged the whole frame length; burst_bytes is the
        bucket's capacity (0 = one second at the rate). A new session starts full.
    gso: the compiled engine sends runs of same-size frames for one destination as UDP GSO
        sends; this twin accepts the flag and always sends one datagram per sendto, so its
        `gso` attribute is False.

    poll() -> [(data, address)]: reads one batch (never blocks). Relay frames (first byte
        0x10) are forwarded or dropped and counted, never returned; every other datagram is
        returned with its source address as socket.recvfrom gives it. Returns [] when nothing
        waits - or when the whole batch was relay frames, so loop while `last_batch_size`
        (datagrams read by the last poll) is not 0.
    add_session(session_id, member_a, member_b): member addresses are tuples like recvfrom's
        (or None while unknown). On AF_INET6 sockets IPv4 literals are stored v4-mapped, as
        the kernel reports such peers. A session id already present raises ValueError.
    set_member(session_id, index, addr): index 0 = A, 1 = B; addr None = unknown. KeyError
        for an unknown session.
    remove_session(session_id): forgets it; an unknown id is ignored.
    session_stats(session_id) -> dict | None; idle_sessions(now, idle_timeout) -> [id];
    counters() -> dict; session_count; fileno().

    A frame is forwarded when its session is known, its source IP and port equal member A's
    or B's, the other member's address is known, and the bucket holds its length in tokens.
    Otherwise it is dropped and counted: dropped_malformed (0x10 with no inner packet),
    dropped_unknown_session, dropped_not_member (source not a member, or other member
    unknown), dropped_rate_limited. A send the kernel refuses on its own is skipped; EAGAIN
    or ENOBUFS drop the rest of the batch's frames (a relay never blocks): all counted in
    send_errors. Datagrams longer than max_datagram are dropped and counted in truncated.
    """

    def __init__(self, sock, batch_size=32, max_datagram=65535, rate_limit_bps=0,
                 burst_bytes=0, *, gso=True):
        (self._family, self._batch_size, self._max_datagram, self._rate,
         self._burst) = _check_args(sock, batch_size, max_datagram, rate_limit_bps, burst_bytes)
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

    # --- session table ---------------------------------------------------------------------

    def add_session(self, session_id, member_a, member_b):
        """Start relaying for session_id between member_a and member_b (None = unknown)."""
        sid = _session_id(session_id)
        if sid in self._sessions:
            raise ValueError(f"session {sid.hex()} already exists")
        members = [None if addr is None else _member(self._family, addr)
                   for addr in (member_a, member_b)]
        session = _Session(time.monotonic(), self._burst)
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
            "created": session.created,
            "last_activity": session.last_activity,
        }

    def idle_sessions(self, now, idle_timeout):
        """Ids of sessions that relayed nothing for idle_timeout seconds before now
        (a time.monotonic() value), counting from creation if they never relayed."""
        now, idle_timeout = float(now), float(idle_timeout)
        out = []
        for sid, session in self._sessions.items():
            since = session.last_activity
            if since is None:
                since = session.created
            if now - since >= idle_timeout:
                out.append(sid)
        return out

    def counters(self):
        """Engine-wide counters (see the class docstring)."""
        return dict(self._counters)

    # --- the hot path ------------------------------------------------------------------------

    def poll(self):
        """Read one batch, relay its frames; return the other datagrams as [(data, addr)]."""
        if self._pending_error is not None:
            exc, self._pending_error = self._pending_error, None
            self._last_batch_size = 0
            raise exc
        c = self._counters
        recvfrom = self._sock.recvfrom
        limit = self._max_datagram
        bufsize = limit + 1  # one byte more than the limit tells "fits" from "was cut"
        sessions = self._sessions
        out = []
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
                if n:  # like recvmmsg: deal with what arrived, report the error next call
                    self._pending_error = exc
                    break
                self._last_batch_size = 0
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
            session = sessions.get(data[1:RELAY_HEADER_LEN])
            if session is None:
                c["dropped_unknown_session"] += 1
                continue
            source = (addr[0], addr[1])
            if source == session.key[0]:
                d = 0
            elif source == session.key[1]:
                d = 1
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
        self._last_batch_size = n
        c["received"] += n
        if forward:
            self._forward(forward, time.monotonic())
        c["returned"] += len(out)
        return out

    def _forward(self, forward, now):
        """Charge the token buckets, then sendto each frame; count what went out."""
        c = self._counters
        rate, burst = self._rate, self._burst
        if rate > 0:
            allowed = []
            for item in forward:
                session, length = item[2], len(item[0])
                if now > session.refilled_at:
                    session.tokens = min(burst, session.tokens
                                         + (now - session.refilled_at) * rate)
                    session.refilled_at = now
                if session.tokens < length:
                    session.dropped_rate_limited += 1
                    c["dropped_rate_limited"] += 1
                    continue
                session.tokens -= length
                allowed.append(item)
            forward = allowed
        sendto = self._sock.sendto
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
