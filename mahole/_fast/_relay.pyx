# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The intermediate's relay engine: recvmmsg, forward relay frames in C, sendmmsg (Linux only).

Twin of `_relay_py.py` (same API, same tests: tests/conftest.py `relay`).
docs/architecture.md, "The intermediate", and mahole/wire/relay.py: a relay frame
``0x10 | session_id (8) | relay_token (8) | inner`` whose source is one member of a known
session, and whose token is that member's, goes unchanged to the other member.

One `poll()` is one recvmmsg batch. Every relay frame in it is handled in C: the session is
found by its 8-byte id in an open-addressing hash table (keyed with a per-engine random seed,
so chosen ids cannot build long probe chains), the source sockaddr is compared with the two
stored member sockaddrs, the frame's 8-byte relay token with that member's (one 64-bit
compare, no early exit), the session's own token bucket is charged, and the frame is queued for
sendmmsg pointing straight at its receive buffer. All queued frames leave in one sendmmsg
call; counters are updated from what the kernel accepted. No Python object is created per
relayed frame. Only the other datagrams (STUN, QUIC, anything not 0x10) become
``(bytes, address)`` tuples for the caller, built after the forwarding is done.

UDP GSO (`gso=True`, the default where the kernel has UDP_SEGMENT, Linux 4.18+): consecutive
queued frames of one size for one destination (the last may be shorter) become one msghdr
of that sendmmsg, with one iovec per frame and a UDP_SEGMENT control message, so the stack
is traversed once per run instead of once per frame. The datagrams on the wire are the same.
A run the kernel refuses (over the path MTU, say) is sent again one frame per msghdr; EIO
(no checksum offload on the device) turns GSO off for the engine.

The GIL is held for the whole poll: every syscall is non-blocking, and so no other thread
(and no Python code) can change the session table while queued frames point into it.
Timing (activity, token refill) reads CLOCK_MONOTONIC, the clock of time.monotonic().
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy, memset

from mahole._fast._sockaddr cimport (
    AF_INET,
    AF_INET6,
    CLOCK_MONOTONIC,
    CMSG_DATA,
    CMSG_LEN,
    CMSG_SPACE,
    EAGAIN,
    EBADF,
    EFAULT,
    EINTR,
    EIO,
    ENOBUFS,
    ENOTSOCK,
    MSG_DONTWAIT,
    MSG_TRUNC,
    SOL_UDP,
    SRC_SLOTS,
    UDP_SEGMENT,
    RecvBuffers,
    SrcCache,
    address_to_sockaddr,
    clock_gettime,
    cmsghdr,
    errno,
    iovec,
    mmsghdr,
    msghdr,
    received,
    recv_buffers_alloc,
    recv_buffers_free,
    recv_buffers_ready,
    recvmmsg,
    sendmmsg,
    sockaddr_in,
    sockaddr_in6,
    sockaddr_storage,
    sockaddr_to_address,
    socklen_t,
    strerror,
    timespec,
    uint16_t,
    uint64_t,
)
from mahole._fast._sockaddr cimport MAX_FLOWINFO as C_MAX_FLOWINFO

import os

from mahole._fast._addr_py import (
    MAX_BATCH_SIZE,
    MAX_DATAGRAM,
    MAX_FLOWINFO,
    relay_args,
    session_id as _session_id,
)
from mahole._fast._kinds import (
    RELAY_FRAME_TYPE,
    RELAY_HEADER_LEN,
    RELAY_SESSION_ID_LEN,
    RELAY_TOKEN_LEN,
    RELAY_TOKEN_OFFSET,
)
from mahole._fast._relay_py import relay_rate as _relay_rate, relay_token as _relay_token

COUNTERS = (
    "received", "returned", "relayed_packets", "relayed_bytes", "dropped_unknown_session",
    "dropped_not_member", "dropped_bad_token", "dropped_rate_limited", "dropped_malformed",
    "send_errors", "truncated",
)

cdef enum:
    FRAME_TYPE = 0x10           # == RELAY_FRAME_TYPE
    TOKEN_OFFSET = 9            # == RELAY_TOKEN_OFFSET: type byte + 8-byte session id
    HEADER_LEN = 17             # == RELAY_HEADER_LEN: ... + the sender's 8-byte relay token
    MIN_CAPACITY = 16           # hash table slots at start (power of two)
    GSO_MAX_SEGMENTS = 64       # the kernel's UDP_MAX_SEGMENTS before Linux 6.x raised it
    GSO_MAX_BYTES = 65000       # one GSO send stays under the 64 KiB IP/UDP length limit
    CMSG_STRIDE = 32            # >= CMSG_SPACE(sizeof(uint16_t)), a multiple of 8

assert FRAME_TYPE == RELAY_FRAME_TYPE and HEADER_LEN == RELAY_HEADER_LEN
assert TOKEN_OFFSET == RELAY_TOKEN_OFFSET
assert RELAY_SESSION_ID_LEN == 8 and RELAY_TOKEN_LEN == 8
assert C_MAX_FLOWINFO == MAX_FLOWINFO


cdef struct Member:
    socklen_t addrlen           # 0 = address unknown
    sockaddr_in6 addr           # a sockaddr_in on AF_INET sockets (fits: 16 <= 28 bytes)
    uint64_t token              # the member's 8 token bytes, as memcpy loads them


cdef struct Session:
    uint64_t key                # the 8 session-id bytes, as memcpy loads them
    bint used                   # slot holds a session
    Member member[2]            # 0 = A, 1 = B
    uint64_t packets[2]         # by source member: [0] = A to B, [1] = B to A
    uint64_t nbytes[2]          # whole frames (header included), as sent on the wire
    uint64_t dropped_rate_limited
    uint64_t dropped_not_member
    uint64_t dropped_bad_token
    double created              # CLOCK_MONOTONIC seconds
    double last_activity        # < 0: nothing relayed yet
    double rate                 # bytes/s, 0 = unlimited (the engine's until set_rate)
    double burst                # the bucket's capacity, in bytes
    double tokens               # token bucket, in bytes
    double refilled_at


cdef inline double _monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline uint64_t _mix(uint64_t x) noexcept nogil:
    """splitmix64's finaliser: every input bit moves every output bit."""
    x ^= x >> 30
    x *= 0xBF58476D1CE4E5B9ULL
    x ^= x >> 27
    x *= 0x94D049BB133111EBULL
    x ^= x >> 31
    return x


cdef inline bint _is_member(int family, const sockaddr_storage *src, socklen_t srclen,
                            const Member *m) noexcept nogil:
    """Source sockaddr == stored member: IP and port, exactly (flowinfo/scope ignored)."""
    cdef const sockaddr_in *a4
    cdef const sockaddr_in *b4
    cdef const sockaddr_in6 *a6
    if m.addrlen == 0 or src.ss_family != family:
        return False
    if family == AF_INET:
        if srclen < sizeof(sockaddr_in):
            return False
        a4 = <const sockaddr_in *>src
        b4 = <const sockaddr_in *>&m.addr
        return a4.sin_port == b4.sin_port and a4.sin_addr.s_addr == b4.sin_addr.s_addr
    if srclen < sizeof(sockaddr_in6):
        return False
    a6 = <const sockaddr_in6 *>src
    return (a6.sin6_port == m.addr.sin6_port
            and memcmp(&a6.sin6_addr, &m.addr.sin6_addr, 16) == 0)


cdef inline bint _token_ok(const Member *m, uint64_t token) noexcept nogil:
    """The frame's token is the member's: one 64-bit compare, so the time taken does not
    depend on how many leading bytes match."""
    return m.token == token


cdef inline bint _stops_sending(int err) noexcept nogil:
    """Errors after which nothing more of this batch can go out: a full socket buffer
    (EAGAIN, ENOBUFS: a relay never waits) or a dead socket (the next recvmmsg reports it)."""
    return (err == EAGAIN or err == ENOBUFS or err == EBADF or err == ENOTSOCK
            or err == EFAULT)


def _has_udp_segment(sock):
    """Whether the kernel knows UDP_SEGMENT (UDP GSO, Linux 4.18+)."""
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


@cython.final
cdef class RelayEngine:
    """Reads the intermediate's socket and relays frames between session members in C.

    RelayEngine(sock, batch_size=32, max_datagram=65535, rate_limit_bps=0, burst_bytes=0,
                *, gso=True)

    sock: a non-blocking UDP socket (AF_INET or AF_INET6); it stays the caller's (never
        closed, options untouched). The engine is its only reader.
    rate_limit_bps: per-session token bucket rate in BYTES per second (0 = unlimited),
        shared by both directions and charged the whole frame length; burst_bytes is the
        bucket's capacity (0 = one second at the rate). A new session starts full, at this
        rate until set_rate gives it its own.
    gso: send runs of same-size frames for one destination as UDP GSO sends where the
        kernel supports it (see the module docstring); the `gso` attribute says whether it
        is in use. The pure-Python twin accepts the flag and always sends one by one.

    poll() -> [(data, address)]: reads one batch (recvmmsg, never blocks). Relay frames
        (first byte 0x10) are forwarded or dropped and counted, never returned; every other
        datagram is returned with its source address as socket.recvfrom gives it. Returns []
        when nothing waits - or when the whole batch was relay frames, so loop while
        `last_batch_size` (datagrams read by the last poll) is not 0.
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
    counted in truncated.
    """

    cdef object _sock
    cdef int _family
    cdef readonly Py_ssize_t batch_size
    cdef readonly Py_ssize_t max_datagram
    cdef readonly double rate_limit_bps
    cdef readonly double burst_bytes
    cdef readonly Py_ssize_t last_batch_size
    cdef readonly bint gso

    # counters
    cdef uint64_t _received, _returned, _relayed_packets, _relayed_bytes
    cdef uint64_t _dropped_unknown, _dropped_not_member, _dropped_rate, _dropped_malformed
    cdef uint64_t _dropped_bad_token
    cdef uint64_t _send_errors, _truncated

    # session table: open addressing, linear probing, load <= 1/2, backward-shift delete
    cdef Session *_slots
    cdef size_t _mask
    cdef size_t _count
    cdef uint64_t _seed

    # receive side
    cdef RecvBuffers _recv
    cdef int *_up                   # indices of datagrams handed back to Python
    # forward side: per queued frame k...
    cdef iovec *_tx_iov             # ...its bytes, in the receive buffer
    cdef sockaddr_in6 *_tx_names    # ...a copy of its destination (the table may move)
    cdef socklen_t *_tx_namelen
    cdef Session **_q_session
    cdef int *_q_dir
    # ...and per message m of the sendmmsg (one frame, or a GSO run of frames)
    cdef mmsghdr *_tx
    cdef int *_msg_first
    cdef int *_msg_count
    cdef char *_cmsg                # one UDP_SEGMENT control message per message slot

    cdef SrcCache _src              # source addresses: see cached_address in _sockaddr.pxd
    cdef list _src_tuples

    def __cinit__(self, sock, batch_size=32, max_datagram=65535, rate_limit_bps=0,
                  burst_bytes=0, *, gso=True):
        cdef Py_ssize_t j, bs, mx
        cdef cmsghdr *cmsg
        family, bs, mx, rate, burst = relay_args(sock, batch_size, max_datagram,
                                                 rate_limit_bps, burst_bytes)
        self._sock = sock
        self._family = family
        self.batch_size = bs
        self.max_datagram = mx
        self.rate_limit_bps = rate
        self.burst_bytes = burst
        self._seed = <uint64_t>int.from_bytes(os.urandom(8), "little")
        self._slots = <Session *>calloc(MIN_CAPACITY, sizeof(Session))
        self._mask = MIN_CAPACITY - 1
        recv_buffers_alloc(&self._recv, bs, mx)
        self._up = <int *>calloc(bs, sizeof(int))
        self._tx_iov = <iovec *>calloc(bs, sizeof(iovec))
        self._tx_names = <sockaddr_in6 *>calloc(bs, sizeof(sockaddr_in6))
        self._tx_namelen = <socklen_t *>calloc(bs, sizeof(socklen_t))
        self._q_session = <Session **>calloc(bs, sizeof(Session *))
        self._q_dir = <int *>calloc(bs, sizeof(int))
        self._tx = <mmsghdr *>calloc(bs, sizeof(mmsghdr))
        self._msg_first = <int *>calloc(bs, sizeof(int))
        self._msg_count = <int *>calloc(bs, sizeof(int))
        self._cmsg = <char *>calloc(bs, CMSG_STRIDE)
        if (self._slots == NULL or self._up == NULL or self._tx == NULL or self._tx_iov == NULL
                or self._tx_names == NULL or self._tx_namelen == NULL or self._q_session == NULL
                or self._q_dir == NULL or self._msg_first == NULL or self._msg_count == NULL
                or self._cmsg == NULL):
            raise MemoryError()
        assert CMSG_SPACE(sizeof(uint16_t)) <= CMSG_STRIDE
        for j in range(bs):
            cmsg = <cmsghdr *>(self._cmsg + j * CMSG_STRIDE)
            cmsg.cmsg_len = CMSG_LEN(sizeof(uint16_t))
            cmsg.cmsg_level = SOL_UDP
            cmsg.cmsg_type = UDP_SEGMENT
        self.gso = bool(gso) and _has_udp_segment(sock)
        memset(&self._src, 0, sizeof(self._src))
        self._src_tuples = [None] * SRC_SLOTS

    def __dealloc__(self):
        free(self._slots)
        recv_buffers_free(&self._recv)
        free(self._up)
        free(self._tx_iov)
        free(self._tx_names)
        free(self._tx_namelen)
        free(self._q_session)
        free(self._q_dir)
        free(self._tx)
        free(self._msg_first)
        free(self._msg_count)
        free(self._cmsg)

    def fileno(self):
        """The socket's file descriptor (-1 once the caller closed it)."""
        return self._sock.fileno()

    @property
    def session_count(self):
        """Sessions in the table."""
        return self._count

    # --- session table ---------------------------------------------------------------------

    cdef inline size_t _home(self, uint64_t key) noexcept nogil:
        return <size_t>_mix(key ^ self._seed) & self._mask

    cdef inline Session *_find(self, uint64_t key) noexcept nogil:
        cdef size_t i = self._home(key)
        cdef Session *slots = self._slots
        while slots[i].used:
            if slots[i].key == key:
                return &slots[i]
            i = (i + 1) & self._mask
        return NULL

    cdef int _grow(self) except -1:
        cdef Session *old = self._slots
        cdef size_t old_cap = self._mask + 1, i, j
        cdef Session *fresh = <Session *>calloc(old_cap * 2, sizeof(Session))
        if fresh == NULL:
            raise MemoryError()
        self._slots = fresh
        self._mask = old_cap * 2 - 1
        for i in range(old_cap):
            if old[i].used:
                j = self._home(old[i].key)
                while fresh[j].used:
                    j = (j + 1) & self._mask
                fresh[j] = old[i]
        free(old)
        return 0

    cdef Session *_insert(self, uint64_t key) except NULL:
        """A zeroed slot for a key that is not in the table."""
        cdef size_t i
        if (self._count + 1) * 2 > self._mask + 1:
            self._grow()
        i = self._home(key)
        while self._slots[i].used:
            i = (i + 1) & self._mask
        memset(&self._slots[i], 0, sizeof(Session))
        self._slots[i].used = True
        self._slots[i].key = key
        self._count += 1
        return &self._slots[i]

    cdef void _delete(self, Session *s) noexcept nogil:
        """Remove by shifting later members of the probe run back (no tombstones)."""
        cdef Session *slots = self._slots
        cdef size_t mask = self._mask
        cdef size_t i = <size_t>(s - slots), j = i, k
        while True:
            j = (j + 1) & mask
            if not slots[j].used:
                break
            k = self._home(slots[j].key)
            # Leave slots[j] where it is if its home lies cyclically in (i, j].
            if (i < j and i < k <= j) or (i > j and (k > i or k <= j)):
                continue
            slots[i] = slots[j]
            i = j
        slots[i].used = False
        self._count -= 1

    cdef Session *_lookup(self, object session_id) except? NULL:
        cdef uint64_t key
        sid = _session_id(session_id)
        memcpy(&key, PyBytes_AS_STRING(sid), 8)
        return self._find(key)

    cdef int _set_address(self, Member *m, object addr) except -1:
        """The member's address (None = unknown); its token stays."""
        cdef bytes name
        if addr is None:
            memset(&m.addr, 0, sizeof(m.addr))
            m.addrlen = 0
            return 0
        name = address_to_sockaddr(self._family, addr, False)  # a bool is not a port here
        memset(&m.addr, 0, sizeof(m.addr))
        memcpy(&m.addr, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))
        m.addrlen = <socklen_t>PyBytes_GET_SIZE(name)
        return 0

    cdef int _set_token(self, Member *m, object token) except -1:
        """The member's relay token (checked by _relay_token: 8 bytes, never all zeros)."""
        cdef bytes checked = _relay_token(token)
        memcpy(&m.token, PyBytes_AS_STRING(checked), 8)
        return 0

    def add_session(self, session_id, member_a, member_b, token_a, token_b):
        """Start relaying for session_id between member_a and member_b (None = unknown),
        each frame carrying its sender's token (token_a, token_b)."""
        cdef uint64_t key
        cdef Member a, b
        cdef Session *s
        sid = _session_id(session_id)
        memcpy(&key, PyBytes_AS_STRING(sid), 8)
        if self._find(key) != NULL:
            raise ValueError(f"session {sid.hex()} already exists")
        memset(&a, 0, sizeof(Member))
        memset(&b, 0, sizeof(Member))
        self._set_address(&a, member_a)  # all checked before the table changes
        self._set_address(&b, member_b)
        self._set_token(&a, token_a)
        self._set_token(&b, token_b)
        s = self._insert(key)
        s.member[0] = a
        s.member[1] = b
        s.created = _monotonic()
        s.last_activity = -1.0
        s.rate = self.rate_limit_bps
        s.burst = self.burst_bytes
        s.tokens = s.burst  # a new session starts full
        s.refilled_at = s.created

    def set_member(self, session_id, index, addr):
        """A member's observed address changed (QAD): frames now go to / come from addr."""
        cdef Session *s = self._lookup(session_id)
        cdef Member m
        if s == NULL:
            raise KeyError(_session_id(session_id))
        if isinstance(index, bool) or not isinstance(index, int) or index not in (0, 1):
            raise ValueError(f"member index must be 0 (A) or 1 (B), not {index!r}")
        m = s.member[<int>index]
        self._set_address(&m, addr)  # checked before the table changes
        s.member[<int>index] = m

    def set_rate(self, session_id, rate_bps, burst_bytes):
        """This session's relay rate (bytes/s, 0 = unlimited) and burst from now on."""
        cdef double rate, burst, now, tokens
        cdef Session *s
        s = self._lookup(session_id)  # a bad id raises first, then a bad rate, as in the twin
        rate, burst = _relay_rate(rate_bps, burst_bytes)  # Python that leaves the table be
        if s == NULL:
            raise KeyError(_session_id(session_id))
        now = _monotonic()
        # Tokens earned at the old rate stay, up to the new burst; an unlimited bucket
        # starts full (as _Session.set_rate in the twin).
        if s.rate > 0:
            if now > s.refilled_at:
                tokens = s.tokens + (now - s.refilled_at) * s.rate
                s.tokens = tokens if tokens < s.burst else s.burst
            if s.tokens > burst:
                s.tokens = burst
        else:
            s.tokens = burst
        s.refilled_at = now
        s.rate = rate
        s.burst = burst

    def remove_session(self, session_id):
        """Stop relaying for session_id (an unknown id is ignored)."""
        cdef Session *s = self._lookup(session_id)
        if s != NULL:
            self._delete(s)

    def session_stats(self, session_id):
        """Counters of one session, or None if it is unknown."""
        cdef Session *s = self._lookup(session_id)
        if s == NULL:
            return None
        return {
            "member_a": self._member_address(&s.member[0]),
            "member_b": self._member_address(&s.member[1]),
            "packets_a_to_b": s.packets[0],
            "bytes_a_to_b": s.nbytes[0],
            "packets_b_to_a": s.packets[1],
            "bytes_b_to_a": s.nbytes[1],
            "dropped_rate_limited": s.dropped_rate_limited,
            "dropped_not_member": s.dropped_not_member,
            "dropped_bad_token": s.dropped_bad_token,
            "rate_bps": s.rate,
            "burst_bytes": s.burst,
            "created": s.created,
            "last_activity": s.last_activity if s.last_activity >= 0 else None,
        }

    cdef object _member_address(self, const Member *m):
        if m.addrlen == 0:
            return None
        return sockaddr_to_address(<const unsigned char *>&m.addr, m.addrlen)

    def counters(self):
        """Engine-wide counters (see the class docstring)."""
        return {
            "received": self._received,
            "returned": self._returned,
            "relayed_packets": self._relayed_packets,
            "relayed_bytes": self._relayed_bytes,
            "dropped_unknown_session": self._dropped_unknown,
            "dropped_not_member": self._dropped_not_member,
            "dropped_bad_token": self._dropped_bad_token,
            "dropped_rate_limited": self._dropped_rate,
            "dropped_malformed": self._dropped_malformed,
            "send_errors": self._send_errors,
            "truncated": self._truncated,
        }

    # --- the hot path ------------------------------------------------------------------------

    cdef Py_ssize_t _classify(self, int n, double now, Py_ssize_t *nup) noexcept nogil:
        """Forward-or-drop every relay frame of the batch; returns how many were queued."""
        cdef Py_ssize_t j, nq = 0, up = 0
        cdef int d
        cdef bint claimed
        cdef unsigned int length
        cdef socklen_t srclen
        cdef uint64_t key, token
        cdef const unsigned char *p
        cdef const sockaddr_storage *src
        cdef Session *s
        cdef Member *dest
        cdef mmsghdr *rx = self._recv.msgs
        cdef double tokens
        cdef int family = self._family
        for j in range(n):
            if rx[j].msg_hdr.msg_flags & MSG_TRUNC:
                self._truncated += 1
                continue
            length = rx[j].msg_len
            p = <const unsigned char *>self._recv.buf + j * self.max_datagram
            if length == 0 or p[0] != FRAME_TYPE:
                self._up[up] = <int>j
                up += 1
                continue
            if length <= HEADER_LEN:
                self._dropped_malformed += 1
                continue
            memcpy(&key, p + 1, 8)
            s = self._find(key)
            if s == NULL:
                self._dropped_unknown += 1
                continue
            # The sender is the member whose address AND token the frame has (A and B may
            # share an address: then the token alone tells them apart).
            memcpy(&token, p + TOKEN_OFFSET, 8)
            src = &self._recv.names[j]
            srclen = rx[j].msg_hdr.msg_namelen
            d = -1
            claimed = False
            if _is_member(family, src, srclen, &s.member[0]):
                if _token_ok(&s.member[0], token):
                    d = 0
                else:
                    claimed = True
            if d < 0 and _is_member(family, src, srclen, &s.member[1]):
                if _token_ok(&s.member[1], token):
                    d = 1
                else:
                    claimed = True
            if d < 0:
                if claimed:  # a member's address with the wrong token: spoofed
                    s.dropped_bad_token += 1
                    self._dropped_bad_token += 1
                else:
                    s.dropped_not_member += 1
                    self._dropped_not_member += 1
                continue
            dest = &s.member[1 - d]
            if dest.addrlen == 0:
                s.dropped_not_member += 1
                self._dropped_not_member += 1
                continue
            if s.rate > 0:
                if now > s.refilled_at:
                    tokens = s.tokens + (now - s.refilled_at) * s.rate
                    s.tokens = tokens if tokens < s.burst else s.burst
                    s.refilled_at = now
                if s.tokens < length:
                    s.dropped_rate_limited += 1
                    self._dropped_rate += 1
                    continue
                s.tokens -= length
            memcpy(&self._tx_names[nq], &dest.addr, dest.addrlen)
            self._tx_namelen[nq] = dest.addrlen
            self._tx_iov[nq].iov_base = <void *>p
            self._tx_iov[nq].iov_len = length
            self._q_session[nq] = s
            self._q_dir[nq] = d
            nq += 1
        nup[0] = up
        return nq

    cdef Py_ssize_t _group(self, Py_ssize_t nq) noexcept nogil:
        """Lay the queued frames out as sendmmsg messages; returns how many.

        Without GSO each frame is a message. With it, a run of consecutive frames for one
        destination, all of the first one's size except perhaps a shorter last one, is one
        message with an iovec per frame and UDP_SEGMENT = that size.
        """
        cdef Py_ssize_t m = 0, k = 0, start
        cdef size_t size, total, length
        cdef socklen_t namelen
        cdef iovec *iov = self._tx_iov
        cdef msghdr *msg
        while k < nq:
            start = k
            size = total = iov[k].iov_len
            namelen = self._tx_namelen[k]
            k += 1
            if self.gso:
                while (k < nq and k - start < GSO_MAX_SEGMENTS
                       and total + iov[k].iov_len <= GSO_MAX_BYTES
                       and self._tx_namelen[k] == namelen
                       and memcmp(&self._tx_names[k], &self._tx_names[start], namelen) == 0):
                    length = iov[k].iov_len
                    if length > size:
                        break
                    total += length
                    k += 1
                    if length < size:
                        break  # a shorter segment can only be the last one
            msg = &self._tx[m].msg_hdr
            msg.msg_name = &self._tx_names[start]
            msg.msg_namelen = namelen
            msg.msg_iov = &iov[start]
            msg.msg_iovlen = <size_t>(k - start)
            if k - start > 1:
                msg.msg_control = self._cmsg + m * CMSG_STRIDE
                msg.msg_controllen = CMSG_SPACE(sizeof(uint16_t))
                (<uint16_t *>CMSG_DATA(<cmsghdr *>msg.msg_control))[0] = <uint16_t>size
            else:
                msg.msg_control = NULL
                msg.msg_controllen = 0
            self._msg_first[m] = <int>start
            self._msg_count[m] = <int>(k - start)
            m += 1
        return m

    cdef void _sent(self, Py_ssize_t first, Py_ssize_t count, double now) noexcept nogil:
        """Count frames [first, first + count) as relayed."""
        cdef Py_ssize_t k
        cdef Session *s
        cdef size_t length
        for k in range(first, first + count):
            s = self._q_session[k]
            length = self._tx_iov[k].iov_len
            s.packets[self._q_dir[k]] += 1
            s.nbytes[self._q_dir[k]] += length
            s.last_activity = now
            self._relayed_bytes += length
        self._relayed_packets += <uint64_t>count

    cdef bint _send_singly(self, int fd, Py_ssize_t first, Py_ssize_t count,
                           double now) noexcept nogil:
        """Send a refused GSO run one frame per call; False if the socket stopped taking
        frames (the rest of the run is then counted in send_errors)."""
        cdef Py_ssize_t k
        cdef int r, err
        cdef mmsghdr one
        memset(&one, 0, sizeof(one))
        for k in range(first, first + count):
            one.msg_hdr.msg_name = &self._tx_names[k]
            one.msg_hdr.msg_namelen = self._tx_namelen[k]
            one.msg_hdr.msg_iov = &self._tx_iov[k]
            one.msg_hdr.msg_iovlen = 1
            while True:
                r = sendmmsg(fd, &one, 1, MSG_DONTWAIT)
                err = errno
                if r < 0 and err == EINTR:
                    continue
                break
            if r == 1:
                self._sent(k, 1, now)
            elif r == 0 or _stops_sending(err):
                self._send_errors += <uint64_t>(first + count - k)
                return False
            else:
                self._send_errors += 1
        return True

    cdef void _forward(self, int fd, Py_ssize_t nq, double now) noexcept nogil:
        """sendmmsg the queued frames; count what went out, and what could not."""
        cdef Py_ssize_t nmsg = self._group(nq), off = 0, mm, k
        cdef int r, err
        while off < nmsg:
            r = sendmmsg(fd, self._tx + off, <unsigned int>(nmsg - off), MSG_DONTWAIT)
            if r > 0:
                for mm in range(off, off + r):
                    self._sent(self._msg_first[mm], self._msg_count[mm], now)
                off += r
                continue
            err = errno
            if r < 0 and err == EINTR:
                continue  # the interpreter sees the signal after poll returns
            if r == 0 or _stops_sending(err):
                # Full socket buffer (a relay never waits) or a dead socket, which the next
                # recvmmsg reports: the rest of this batch is dropped.
                for mm in range(off, nmsg):
                    self._send_errors += <uint64_t>self._msg_count[mm]
                return
            if self._msg_count[off] > 1:
                # A GSO run refused (over the path MTU, an old kernel...): frame by frame.
                if err == EIO:
                    self.gso = False  # the device cannot checksum GSO sends: stop trying
                if not self._send_singly(fd, self._msg_first[off], self._msg_count[off], now):
                    for mm in range(off + 1, nmsg):
                        self._send_errors += <uint64_t>self._msg_count[mm]
                    return
            else:
                # Refused on its own (EMSGSIZE, ENETUNREACH, EPERM...): skip that frame.
                self._send_errors += 1
            off += 1

    def poll(self):
        """Read one batch, relay its frames; return the other datagrams as [(data, addr)]."""
        cdef int fd = self._sock.fileno()
        cdef int n, err
        cdef Py_ssize_t k, nq, nup = 0
        cdef double now
        cdef mmsghdr *rx = self._recv.msgs
        cdef list out
        recv_buffers_ready(&self._recv)
        while True:
            n = recvmmsg(fd, rx, <unsigned int>self.batch_size, MSG_DONTWAIT, NULL)
            if n >= 0:
                break
            err = errno
            if err == EINTR:
                PyErr_CheckSignals()
                continue
            self.last_batch_size = 0
            if err == EAGAIN:
                return []
            raise OSError(err, strerror(err).decode("utf-8", "replace"))
        self.last_batch_size = n
        self._received += <uint64_t>n
        if n == 0:
            return []
        now = _monotonic()
        nq = self._classify(n, now, &nup)
        if nq:
            self._forward(fd, nq, now)
        if nup == 0:
            return []
        self._returned += <uint64_t>nup
        out = []
        for k in range(nup):
            out.append(received(&self._recv, self._up[k], &self._src, self._src_tuples))
        return out
