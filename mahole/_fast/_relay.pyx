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

Relay threads (`worker_sockets`): each extra socket - bound to the same address as `sock`
with SO_REUSEPORT, so that the kernel spreads flows over the sockets by their 4-tuple hash -
is read by a thread of its own running the same recvmmsg / forward / sendmmsg loop in C with
the GIL released. The session table is one for all threads, behind one mutex, taken once per
batch to look frames up, check tokens, charge buckets and count, and once more to count what
the kernel took; never across a syscall. A session's two directions may be on two threads:
the mutex makes that safe, and frames keep a copy of their destination, never a pointer into
the table (which a new session may move). Datagrams that are not relay frames arriving on a
worker socket are copied into a bounded hand-off queue and an eventfd wakes the caller, whose
next poll() returns them with the main socket's; a full queue drops and counts them
(`handoff_dropped`). close() stops the threads and joins them.

Timing (activity, token refill) reads CLOCK_MONOTONIC, the clock of time.monotonic().
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset
from posix.signal cimport sigfillset
from posix.types cimport sigset_t
from posix.fcntl cimport F_DUPFD_CLOEXEC, fcntl
from posix.unistd cimport close as c_close, read as c_read, write as c_write

from mahole._fast._sockaddr cimport (
    CMSG_STRIDE,
    gso_cmsgs_alloc,
    gso_message,
    AF_INET,
    AF_INET6,
    CLOCK_MONOTONIC,
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
    cached_address,
    clock_gettime,
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
    "send_errors", "truncated", "handed_off", "handoff_dropped",
)

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_mutexattr_t:
        pass
    ctypedef struct pthread_attr_t:
        pass
    ctypedef unsigned long pthread_t
    int pthread_mutex_init(pthread_mutex_t *mutex, const pthread_mutexattr_t *attr)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)
    int pthread_create(pthread_t *thread, const pthread_attr_t *attr,
                       void *(*start)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t thread, void **retval)

cdef extern from "<signal.h>" nogil:
    enum:
        SIG_BLOCK
    int pthread_sigmask(int how, const sigset_t *set, sigset_t *old)

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum:
        POLLIN

cdef extern from *:
    """
    static inline int mahole_load_int(int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void mahole_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    """
    int mahole_load_int(int *p) nogil
    void mahole_store_int(int *p, int v) nogil

cdef enum:
    FRAME_TYPE = 0x10           # == RELAY_FRAME_TYPE
    TOKEN_OFFSET = 9            # == RELAY_TOKEN_OFFSET: type byte + 8-byte session id
    HEADER_LEN = 17             # == RELAY_HEADER_LEN: ... + the sender's 8-byte relay token
    MIN_CAPACITY = 16           # hash table slots at start (power of two)
    GSO_MAX_SEGMENTS = 64       # the kernel's UDP_MAX_SEGMENTS before Linux 6.x raised it
    GSO_MAX_BYTES = 65000       # one GSO send stays under the 64 KiB IP/UDP length limit
    HELD_MAX = 1024             # datagrams a worker may hand to the caller, waiting at most...
    HELD_MAX_BYTES = 4 << 20    # ...and their bytes: past either, handoff_dropped
    IDLE_WAIT_MS = 1000         # a worker's poll() timeout: only a safety net, close() wakes it
    ERROR_BACKOFF_MS = 10       # a worker's pause after a receive error other than EAGAIN

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


# --- the shared session table -----------------------------------------------------------------

cdef struct Counters:
    uint64_t received, returned, relayed_packets, relayed_bytes
    uint64_t dropped_unknown, dropped_not_member, dropped_bad_token, dropped_rate
    uint64_t dropped_malformed, send_errors, truncated, handed_off, handoff_dropped


# A datagram a worker read that is not a relay frame, waiting for the caller's poll().
cdef struct Held:
    Held *next
    socklen_t namelen
    sockaddr_storage name
    size_t length               # its bytes follow the struct


cdef struct Table:
    pthread_mutex_t lock        # guards everything below, and every lane's counters
    Session *slots              # open addressing, linear probing, load <= 1/2,
    size_t mask                 # backward-shift delete
    size_t count
    uint64_t seed
    uint64_t generation         # +1 whenever sessions move or go: Session pointers are stale
    int family
    Held *held_head             # hand-off queue, oldest first
    Held *held_tail
    size_t held_count
    size_t held_bytes
    int wake_fd                 # eventfd: something waits in the queue (-1: no workers)
    int stop_fd                 # eventfd: written once by close(), wakes every worker
    int stopping


cdef inline size_t _home(const Table *t, uint64_t key) noexcept nogil:
    return <size_t>_mix(key ^ t.seed) & t.mask


cdef inline Session *_find(const Table *t, uint64_t key) noexcept nogil:
    cdef size_t i = _home(t, key)
    cdef Session *slots = t.slots
    while slots[i].used:
        if slots[i].key == key:
            return &slots[i]
        i = (i + 1) & t.mask
    return NULL


cdef int _grow(Table *t) noexcept nogil:
    """Double the table; -1 if out of memory (the table is then unchanged)."""
    cdef Session *old = t.slots
    cdef size_t old_cap = t.mask + 1, i, j
    cdef Session *fresh = <Session *>calloc(old_cap * 2, sizeof(Session))
    if fresh == NULL:
        return -1
    t.slots = fresh
    t.mask = old_cap * 2 - 1
    for i in range(old_cap):
        if old[i].used:
            j = _home(t, old[i].key)
            while fresh[j].used:
                j = (j + 1) & t.mask
            fresh[j] = old[i]
    free(old)
    t.generation += 1
    return 0


cdef Session *_insert(Table *t, uint64_t key) noexcept nogil:
    """A zeroed slot for a key that is not in the table; NULL if out of memory."""
    cdef size_t i
    if (t.count + 1) * 2 > t.mask + 1 and _grow(t) < 0:
        return NULL
    i = _home(t, key)
    while t.slots[i].used:
        i = (i + 1) & t.mask
    memset(&t.slots[i], 0, sizeof(Session))
    t.slots[i].used = True
    t.slots[i].key = key
    t.count += 1
    return &t.slots[i]


cdef void _delete(Table *t, Session *s) noexcept nogil:
    """Remove by shifting later members of the probe run back (no tombstones)."""
    cdef Session *slots = t.slots
    cdef size_t mask = t.mask
    cdef size_t i = <size_t>(s - slots), j = i, k
    while True:
        j = (j + 1) & mask
        if not slots[j].used:
            break
        k = _home(t, slots[j].key)
        # Leave slots[j] where it is if its home lies cyclically in (i, j].
        if (i < j and i < k <= j) or (i > j and (k > i or k <= j)):
            continue
        slots[i] = slots[j]
        i = j
    slots[i].used = False
    t.count -= 1
    t.generation += 1


cdef void _free_held(Held *h) noexcept nogil:
    cdef Held *next
    while h != NULL:
        next = h.next
        free(h)
        h = next


# --- one socket's batch: a lane ---------------------------------------------------------------

cdef struct Lane:
    Table *table
    int fd
    bint gso
    Py_ssize_t batch_size
    Py_ssize_t max_datagram
    Counters c                  # written under the table's lock only
    RecvBuffers recv
    int *up                     # indices of datagrams that are not relay frames
    # per queued frame k: its bytes (in the receive buffer), a copy of its destination,
    # its session (valid while the table's generation is `generation`) and its key
    iovec *tx_iov
    sockaddr_in6 *tx_names
    socklen_t *tx_namelen
    Session **q_session
    uint64_t *q_key
    int *q_dir
    unsigned char *q_sent       # 1 once the kernel took it
    uint64_t generation
    # per message m of the sendmmsg (one frame, or a GSO run of frames)
    mmsghdr *tx
    int *msg_first
    int *msg_count
    char *cmsg                  # one UDP_SEGMENT control message per message slot
    pthread_t thread
    bint running


cdef int _lane_alloc(Lane *lane, Table *t, int fd, Py_ssize_t bs, Py_ssize_t mx,
                     bint gso) except -1:
    lane.table = t
    lane.fd = fd
    lane.gso = gso
    lane.batch_size = bs
    lane.max_datagram = mx
    recv_buffers_alloc(&lane.recv, bs, mx)
    lane.up = <int *>calloc(bs, sizeof(int))
    lane.tx_iov = <iovec *>calloc(bs, sizeof(iovec))
    lane.tx_names = <sockaddr_in6 *>calloc(bs, sizeof(sockaddr_in6))
    lane.tx_namelen = <socklen_t *>calloc(bs, sizeof(socklen_t))
    lane.q_session = <Session **>calloc(bs, sizeof(Session *))
    lane.q_key = <uint64_t *>calloc(bs, sizeof(uint64_t))
    lane.q_dir = <int *>calloc(bs, sizeof(int))
    lane.q_sent = <unsigned char *>calloc(bs, 1)
    lane.tx = <mmsghdr *>calloc(bs, sizeof(mmsghdr))
    lane.msg_first = <int *>calloc(bs, sizeof(int))
    lane.msg_count = <int *>calloc(bs, sizeof(int))
    lane.cmsg = gso_cmsgs_alloc(bs)
    if (lane.up == NULL or lane.tx == NULL or lane.tx_iov == NULL or lane.tx_names == NULL
            or lane.tx_namelen == NULL or lane.q_session == NULL or lane.q_key == NULL
            or lane.q_dir == NULL or lane.q_sent == NULL or lane.msg_first == NULL
            or lane.msg_count == NULL or lane.cmsg == NULL):
        raise MemoryError()
    return 0


cdef void _lane_free(Lane *lane) noexcept nogil:
    if lane == NULL:
        return
    recv_buffers_free(&lane.recv)
    free(lane.up)
    free(lane.tx_iov)
    free(lane.tx_names)
    free(lane.tx_namelen)
    free(lane.q_session)
    free(lane.q_key)
    free(lane.q_dir)
    free(lane.q_sent)
    free(lane.tx)
    free(lane.msg_first)
    free(lane.msg_count)
    free(lane.cmsg)
    free(lane)


cdef Py_ssize_t _classify(Lane *lane, int n, double now, Py_ssize_t *nup) noexcept nogil:
    """Forward-or-drop every relay frame of the batch; returns how many were queued.
    Under the table's lock."""
    cdef Table *t = lane.table
    cdef Counters *c = &lane.c
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
    cdef mmsghdr *rx = lane.recv.msgs
    cdef double tokens
    cdef int family = t.family
    c.received += <uint64_t>n
    for j in range(n):
        if rx[j].msg_hdr.msg_flags & MSG_TRUNC:
            c.truncated += 1
            continue
        length = rx[j].msg_len
        p = <const unsigned char *>lane.recv.buf + j * lane.max_datagram
        if length == 0 or p[0] != FRAME_TYPE:
            lane.up[up] = <int>j
            up += 1
            continue
        if length <= HEADER_LEN:
            c.dropped_malformed += 1
            continue
        memcpy(&key, p + 1, 8)
        s = _find(t, key)
        if s == NULL:
            c.dropped_unknown += 1
            continue
        # The sender is the member whose address AND token the frame has (A and B may
        # share an address: then the token alone tells them apart).
        memcpy(&token, p + TOKEN_OFFSET, 8)
        src = &lane.recv.names[j]
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
                c.dropped_bad_token += 1
            else:
                s.dropped_not_member += 1
                c.dropped_not_member += 1
            continue
        dest = &s.member[1 - d]
        if dest.addrlen == 0:
            s.dropped_not_member += 1
            c.dropped_not_member += 1
            continue
        if s.rate > 0:
            if now > s.refilled_at:
                tokens = s.tokens + (now - s.refilled_at) * s.rate
                s.tokens = tokens if tokens < s.burst else s.burst
                s.refilled_at = now
            if s.tokens < length:
                s.dropped_rate_limited += 1
                c.dropped_rate += 1
                continue
            s.tokens -= length
        memcpy(&lane.tx_names[nq], &dest.addr, dest.addrlen)
        lane.tx_namelen[nq] = dest.addrlen
        lane.tx_iov[nq].iov_base = <void *>p
        lane.tx_iov[nq].iov_len = length
        lane.q_session[nq] = s
        lane.q_key[nq] = key
        lane.q_dir[nq] = d
        lane.q_sent[nq] = 0
        nq += 1
    lane.generation = t.generation
    nup[0] = up
    return nq


cdef Py_ssize_t _group(Lane *lane, Py_ssize_t nq) noexcept nogil:
    """Lay the queued frames out as sendmmsg messages; returns how many.

    Without GSO each frame is a message. With it, a run of consecutive frames for one
    destination, all of the first one's size except perhaps a shorter last one, is one
    message with an iovec per frame and UDP_SEGMENT = that size.
    """
    cdef Py_ssize_t m = 0, k = 0, start
    cdef size_t size, total, length
    cdef socklen_t namelen
    cdef iovec *iov = lane.tx_iov
    cdef msghdr *msg
    while k < nq:
        start = k
        size = total = iov[k].iov_len
        namelen = lane.tx_namelen[k]
        k += 1
        if lane.gso:
            while (k < nq and k - start < GSO_MAX_SEGMENTS
                   and total + iov[k].iov_len <= GSO_MAX_BYTES
                   and lane.tx_namelen[k] == namelen
                   and memcmp(&lane.tx_names[k], &lane.tx_names[start], namelen) == 0):
                length = iov[k].iov_len
                if length > size:
                    break
                total += length
                k += 1
                if length < size:
                    break  # a shorter segment can only be the last one
        msg = &lane.tx[m].msg_hdr
        msg.msg_name = &lane.tx_names[start]
        msg.msg_namelen = namelen
        gso_message(msg, &iov[start], <size_t>(k - start), lane.cmsg, m, size)
        lane.msg_first[m] = <int>start
        lane.msg_count[m] = <int>(k - start)
        m += 1
    return m


cdef inline void _mark(Lane *lane, Py_ssize_t first, Py_ssize_t count) noexcept nogil:
    cdef Py_ssize_t k
    for k in range(first, first + count):
        lane.q_sent[k] = 1


cdef Py_ssize_t _send_singly(Lane *lane, Py_ssize_t first, Py_ssize_t count,
                             bint *stopped) noexcept nogil:
    """Send a refused GSO run one frame per call; returns the frames that failed, and sets
    stopped if the socket took no more (the rest of the run is among those failed)."""
    cdef Py_ssize_t k
    cdef int r, err
    cdef mmsghdr one
    memset(&one, 0, sizeof(one))
    for k in range(first, first + count):
        one.msg_hdr.msg_name = &lane.tx_names[k]
        one.msg_hdr.msg_namelen = lane.tx_namelen[k]
        one.msg_hdr.msg_iov = &lane.tx_iov[k]
        one.msg_hdr.msg_iovlen = 1
        while True:
            r = sendmmsg(lane.fd, &one, 1, MSG_DONTWAIT)
            err = errno
            if r < 0 and err == EINTR:
                continue
            break
        if r == 1:
            lane.q_sent[k] = 1
        elif r == 0 or _stops_sending(err):
            stopped[0] = True
            return first + count - k + _failed_before(lane, first, k)
    return _failed_before(lane, first, first + count)


cdef inline Py_ssize_t _failed_before(Lane *lane, Py_ssize_t first, Py_ssize_t end) noexcept nogil:
    cdef Py_ssize_t k, failed = 0
    for k in range(first, end):
        if not lane.q_sent[k]:
            failed += 1
    return failed


cdef Py_ssize_t _forward(Lane *lane, Py_ssize_t nq) noexcept nogil:
    """sendmmsg the queued frames (no lock held); marks what the kernel took, returns how
    many frames it did not."""
    cdef Py_ssize_t nmsg = _group(lane, nq), off = 0, mm, failed = 0
    cdef int r, err
    cdef bint stopped = False
    while off < nmsg:
        r = sendmmsg(lane.fd, lane.tx + off, <unsigned int>(nmsg - off), MSG_DONTWAIT)
        if r > 0:
            for mm in range(off, off + r):
                _mark(lane, lane.msg_first[mm], lane.msg_count[mm])
            off += r
            continue
        err = errno
        if r < 0 and err == EINTR:
            continue  # the interpreter sees the signal after poll returns
        if r == 0 or _stops_sending(err):
            # Full socket buffer (a relay never waits) or a dead socket, which the next
            # recvmmsg reports: the rest of this batch is dropped.
            for mm in range(off, nmsg):
                failed += lane.msg_count[mm]
            return failed
        if lane.msg_count[off] > 1:
            # A GSO run refused (over the path MTU, an old kernel...): frame by frame.
            if err == EIO:
                lane.gso = False  # the device cannot checksum GSO sends: stop trying
            failed += _send_singly(lane, lane.msg_first[off], lane.msg_count[off], &stopped)
            if stopped:
                for mm in range(off + 1, nmsg):
                    failed += lane.msg_count[mm]
                return failed
        else:
            # Refused on its own (EMSGSIZE, ENETUNREACH, EPERM...): skip that frame.
            failed += 1
        off += 1
    return failed


cdef void _account(Lane *lane, Py_ssize_t nq, Py_ssize_t failed, double now) noexcept nogil:
    """Count the frames the kernel took, per session and in all. Under the table's lock;
    a session that moved since _classify is found again by its key, one that went is not
    counted (its frames still are, in the lane's totals)."""
    cdef Table *t = lane.table
    cdef Py_ssize_t k
    cdef Session *s
    cdef size_t length
    cdef bint fresh = lane.generation == t.generation
    lane.c.send_errors += <uint64_t>failed
    for k in range(nq):
        if not lane.q_sent[k]:
            continue
        length = lane.tx_iov[k].iov_len
        s = lane.q_session[k] if fresh else _find(t, lane.q_key[k])
        if s != NULL:
            s.packets[lane.q_dir[k]] += 1
            s.nbytes[lane.q_dir[k]] += length
            s.last_activity = now
        lane.c.relayed_bytes += length
        lane.c.relayed_packets += 1


cdef int _receive(Lane *lane) noexcept nogil:
    """One recvmmsg; the count, or -errno."""
    cdef int n
    recv_buffers_ready(&lane.recv)
    n = recvmmsg(lane.fd, lane.recv.msgs, <unsigned int>lane.batch_size, MSG_DONTWAIT, NULL)
    if n < 0:
        return -errno
    return n


cdef Py_ssize_t _relay_batch(Lane *lane, int n, double now, Py_ssize_t *nup) noexcept nogil:
    """Relay the frames of a batch of n datagrams just received; nup: how many others."""
    cdef Table *t = lane.table
    cdef Py_ssize_t nq, failed
    pthread_mutex_lock(&t.lock)
    nq = _classify(lane, n, now, nup)
    pthread_mutex_unlock(&t.lock)
    if nq:
        failed = _forward(lane, nq)
        pthread_mutex_lock(&t.lock)
        _account(lane, nq, failed, now)
        pthread_mutex_unlock(&t.lock)
    return nq


cdef void _hand_off(Lane *lane, Py_ssize_t nup) noexcept nogil:
    """A worker's non-relay datagrams go to the caller's queue (copied); past its bounds,
    or out of memory, they are dropped and counted."""
    cdef Table *t = lane.table
    cdef Held *first = NULL
    cdef Held *last = NULL
    cdef Held *h
    cdef Held *rest
    cdef Py_ssize_t k, j, made = 0, dropped = 0, kept
    cdef size_t length, total = 0
    cdef uint64_t one = 1
    for k in range(nup):
        j = lane.up[k]
        length = lane.recv.msgs[j].msg_len
        h = <Held *>malloc(sizeof(Held) + length)
        if h == NULL:
            dropped += 1
            continue
        h.next = NULL
        h.length = length
        h.namelen = lane.recv.msgs[j].msg_hdr.msg_namelen
        if h.namelen > sizeof(sockaddr_storage):
            h.namelen = sizeof(sockaddr_storage)
        memcpy(&h.name, &lane.recv.names[j], h.namelen)
        memcpy(<char *>(h + 1), lane.recv.buf + j * lane.max_datagram, length)
        if last == NULL:
            first = h
        else:
            last.next = h
        last = h
        made += 1
        total += length
    pthread_mutex_lock(&t.lock)
    # As many as fit, in order; the rest are dropped.
    kept = 0
    total = 0
    last = NULL
    h = first
    while (h != NULL and t.held_count + kept < HELD_MAX
           and t.held_bytes + total + h.length <= HELD_MAX_BYTES):
        total += h.length
        kept += 1
        last = h
        h = h.next
    rest = h
    if last != NULL:
        last.next = NULL
        if t.held_tail == NULL:
            t.held_head = first
        else:
            t.held_tail.next = first
        t.held_tail = last
        t.held_count += <size_t>kept
        t.held_bytes += total
    lane.c.handed_off += <uint64_t>kept
    lane.c.handoff_dropped += <uint64_t>(dropped + made - kept)
    pthread_mutex_unlock(&t.lock)
    _free_held(rest)
    if kept:
        c_write(t.wake_fd, &one, sizeof(one))  # a full counter (never) only loses a wake-up


cdef void *_worker(void *arg) noexcept nogil:
    """A relay thread: its socket's batches until close() sets `stopping`."""
    cdef Lane *lane = <Lane *>arg
    cdef Table *t = lane.table
    cdef pollfd fds[2]
    cdef sigset_t all_signals
    cdef int n
    cdef Py_ssize_t nup
    sigfillset(&all_signals)
    pthread_sigmask(SIG_BLOCK, &all_signals, NULL)  # signals are the main thread's
    fds[0].fd = lane.fd
    fds[0].events = POLLIN
    fds[1].fd = t.stop_fd
    fds[1].events = POLLIN
    while not mahole_load_int(&t.stopping):
        n = _receive(lane)
        if n > 0:
            nup = 0
            _relay_batch(lane, n, _monotonic(), &nup)
            if nup:
                _hand_off(lane, nup)
            continue
        if n == -EINTR:
            continue
        if n == -EBADF or n == -ENOTSOCK or n == -EFAULT:
            break  # its socket is gone (the engine's own dup: only close() does that)
        if n == 0 or n == -EAGAIN:  # nothing waiting: wait for more, or for close()
            poll(fds, 2, IDLE_WAIT_MS)
        else:  # an error that may last (ENOMEM...): back off rather than spin on a ready socket
            poll(&fds[1], 1, ERROR_BACKOFF_MS)
    return NULL


@cython.final
cdef class RelayEngine:
    """Reads the intermediate's socket(s) and relays frames between session members in C.

    RelayEngine(sock, batch_size=32, max_datagram=65535, rate_limit_bps=0, burst_bytes=0,
                *, gso=True, worker_sockets=())

    sock: a non-blocking UDP socket (AF_INET or AF_INET6); it stays the caller's (never
        closed, options untouched). The engine is its only reader, in poll().
    worker_sockets: more non-blocking UDP sockets of the same family, normally bound to
        sock's address with SO_REUSEPORT (the kernel then spreads flows over all of them by
        4-tuple hash). Each is read by a relay thread of its own, started here, which relays
        frames as poll() does with the GIL released; the datagrams that are not relay frames
        are handed to the caller (see reader_fds). The engine reads duplicates of their file
        descriptors, so they stay open, and in the group, until close(). `threads` is
        1 + len(worker_sockets).
    rate_limit_bps: per-session token bucket rate in BYTES per second (0 = unlimited),
        shared by both directions and charged the whole frame length; burst_bytes is the
        bucket's capacity (0 = one second at the rate). A new session starts full, at this
        rate until set_rate gives it its own.
    gso: send runs of same-size frames for one destination as UDP GSO sends where the
        kernel supports it (see the module docstring); the `gso` attribute says whether it
        is in use on sock. The pure-Python twin accepts the flag and always sends one by one.

    poll() -> [(data, address)]: reads one batch of sock (recvmmsg, never blocks) and takes
        what the relay threads handed over. Relay frames (first byte 0x10) are forwarded or
        dropped and counted, never returned; every other datagram is returned with its
        source address as socket.recvfrom gives it. Returns [] when nothing waits - or when
        the whole batch was relay frames, so loop while `last_batch_size` (datagrams read
        and taken over by the last poll) is not 0.
    reader_fds() -> tuple of file descriptors besides sock's that the caller watches for
        reading, calling poll() when one is readable: here the relay threads' hand-off
        eventfd (none without worker sockets); the twin's worker sockets themselves.
    close(): stops the relay threads and waits for them, closes their descriptors and drops
        what they handed over and poll() did not take. poll() still serves sock. Idempotent;
        garbage collection does it too.
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
    Counters and session stats add up every thread's.

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
    counted in truncated. A frame leaves by the socket it came in on. handed_off: datagrams
    a relay thread passed to poll() (counted in returned when poll returns them);
    handoff_dropped: those it dropped because 1,024 datagrams or 4 MiB were waiting.
    """

    cdef object _sock
    cdef int _family
    cdef readonly Py_ssize_t batch_size
    cdef readonly Py_ssize_t max_datagram
    cdef readonly double rate_limit_bps
    cdef readonly double burst_bytes
    cdef readonly Py_ssize_t last_batch_size
    cdef readonly int threads

    cdef Table *_t
    cdef Lane *_main                # sock's lane, driven by poll()
    cdef Lane **_workers            # one lane and thread per worker socket
    cdef int _nworkers
    cdef bint _closed
    cdef SrcCache _src              # source addresses: see cached_address in _sockaddr.pxd
    cdef list _src_tuples

    def __cinit__(self, sock, batch_size=32, max_datagram=65535, rate_limit_bps=0,
                  burst_bytes=0, *, gso=True, worker_sockets=()):
        cdef Py_ssize_t bs, mx
        cdef int i, fd
        cdef Lane *lane
        family, bs, mx, rate, burst = relay_args(sock, batch_size, max_datagram,
                                                 rate_limit_bps, burst_bytes)
        workers = list(worker_sockets)
        for w in workers:
            if relay_args(w, bs, mx, 0, 0)[0] != family:
                raise ValueError("worker sockets must be of the main socket's family")
        self._sock = sock
        self._family = family
        self.batch_size = bs
        self.max_datagram = mx
        self.rate_limit_bps = rate
        self.burst_bytes = burst
        self.threads = 1 + len(workers)
        self._t = <Table *>calloc(1, sizeof(Table))
        if self._t == NULL:
            raise MemoryError()
        self._t.wake_fd = -1
        self._t.stop_fd = -1
        pthread_mutex_init(&self._t.lock, NULL)
        self._t.family = family
        self._t.seed = <uint64_t>int.from_bytes(os.urandom(8), "little")
        self._t.slots = <Session *>calloc(MIN_CAPACITY, sizeof(Session))
        self._t.mask = MIN_CAPACITY - 1
        self._main = <Lane *>calloc(1, sizeof(Lane))
        if self._t.slots == NULL or self._main == NULL:
            raise MemoryError()
        _lane_alloc(self._main, self._t, -1, bs, mx, bool(gso) and _has_udp_segment(sock))
        memset(&self._src, 0, sizeof(self._src))
        self._src_tuples = [None] * SRC_SLOTS
        if not workers:
            return
        self._workers = <Lane **>calloc(len(workers), sizeof(Lane *))
        if self._workers == NULL:
            raise MemoryError()
        for _ in range(2):  # one at a time: a failed second leaves the first to __dealloc__
            fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
            if fd < 0:
                raise OSError(errno, strerror(errno).decode("utf-8", "replace"))
            if self._t.wake_fd < 0:
                self._t.wake_fd = fd
            else:
                self._t.stop_fd = fd
        for w in workers:
            lane = <Lane *>calloc(1, sizeof(Lane))
            if lane == NULL:
                raise MemoryError()
            lane.fd = -1
            self._workers[self._nworkers] = lane
            self._nworkers += 1
            # Close-on-exec (as socket.dup): a child that inherited it would keep a member of
            # the SO_REUSEPORT group that nobody reads, taking its share of the flows.
            fd = fcntl(w.fileno(), F_DUPFD_CLOEXEC, 0)
            if fd < 0:
                raise OSError(errno, strerror(errno).decode("utf-8", "replace"))
            _lane_alloc(lane, self._t, fd, bs, mx, bool(gso) and _has_udp_segment(w))
        for i in range(self._nworkers):
            lane = self._workers[i]
            err = pthread_create(&lane.thread, NULL, _worker, lane)
            if err != 0:
                raise OSError(err, strerror(err).decode("utf-8", "replace"))
            lane.running = True

    def __dealloc__(self):
        self._stop()
        _lane_free(self._main)
        if self._t != NULL:
            free(self._t.slots)
            pthread_mutex_destroy(&self._t.lock)
            free(self._t)

    cdef void _stop(self) noexcept:
        """Stop and join the relay threads, close their descriptors, free their lanes."""
        cdef int i
        cdef uint64_t one = 1
        cdef Lane *lane
        cdef Held *held
        if self._closed or self._t == NULL:
            return
        self._closed = True
        mahole_store_int(&self._t.stopping, 1)
        if self._t.stop_fd >= 0:
            c_write(self._t.stop_fd, &one, sizeof(one))
        with nogil:
            for i in range(self._nworkers):
                lane = self._workers[i]
                if lane.running:
                    pthread_join(lane.thread, NULL)
                    lane.running = False
        for i in range(self._nworkers):
            lane = self._workers[i]
            if lane.fd >= 0:
                c_close(lane.fd)
            # Its counters stay in the engine's: fold them into the main lane's.
            _fold(&self._main.c, &lane.c)
            _lane_free(lane)
        free(self._workers)
        self._workers = NULL
        self._nworkers = 0
        pthread_mutex_lock(&self._t.lock)
        held = self._t.held_head
        self._t.held_head = self._t.held_tail = NULL
        self._t.held_count = self._t.held_bytes = 0
        pthread_mutex_unlock(&self._t.lock)
        _free_held(held)
        for fd in (self._t.wake_fd, self._t.stop_fd):
            if fd >= 0:
                c_close(fd)
        self._t.wake_fd = self._t.stop_fd = -1

    def close(self):
        """Stop the relay threads and wait for them (poll() still serves the main socket)."""
        self._stop()

    def reader_fds(self):
        """Descriptors besides the main socket's whose readability means poll() has work."""
        if self._t.wake_fd >= 0:
            return (self._t.wake_fd,)
        return ()

    @property
    def gso(self):
        """Whether the main socket's frames leave as UDP GSO runs."""
        return bool(self._main.gso)

    def fileno(self):
        """The socket's file descriptor (-1 once the caller closed it)."""
        return self._sock.fileno()

    @property
    def session_count(self):
        """Sessions in the table."""
        return self._t.count

    # --- session table ---------------------------------------------------------------------

    cdef inline void _lock(self) noexcept:
        pthread_mutex_lock(&self._t.lock)

    cdef inline void _unlock(self) noexcept:
        pthread_mutex_unlock(&self._t.lock)

    cdef uint64_t _key(self, object session_id) except? 0:
        cdef uint64_t key
        sid = _session_id(session_id)
        memcpy(&key, PyBytes_AS_STRING(sid), 8)
        return key

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
        cdef double now
        cdef bint exists
        sid = _session_id(session_id)
        memcpy(&key, PyBytes_AS_STRING(sid), 8)
        self._lock()
        exists = _find(self._t, key) != NULL
        self._unlock()
        if exists:
            raise ValueError(f"session {sid.hex()} already exists")
        memset(&a, 0, sizeof(Member))
        memset(&b, 0, sizeof(Member))
        self._set_address(&a, member_a)  # all checked before the table changes
        self._set_address(&b, member_b)
        self._set_token(&a, token_a)
        self._set_token(&b, token_b)
        now = _monotonic()
        self._lock()
        if _find(self._t, key) != NULL:
            self._unlock()
            raise ValueError(f"session {sid.hex()} already exists")
        s = _insert(self._t, key)
        if s != NULL:
            s.member[0] = a
            s.member[1] = b
            s.created = now
            s.last_activity = -1.0
            s.rate = self.rate_limit_bps
            s.burst = self.burst_bytes
            s.tokens = s.burst  # a new session starts full
            s.refilled_at = s.created
        self._unlock()
        if s == NULL:
            raise MemoryError()

    def set_member(self, session_id, index, addr):
        """A member's observed address changed (QAD): frames now go to / come from addr."""
        cdef uint64_t key = self._key(session_id)
        cdef Session *s
        cdef Member m
        self._lock()
        s = _find(self._t, key)
        self._unlock()
        if s == NULL:
            raise KeyError(_session_id(session_id))
        if isinstance(index, bool) or not isinstance(index, int) or index not in (0, 1):
            raise ValueError(f"member index must be 0 (A) or 1 (B), not {index!r}")
        memset(&m, 0, sizeof(Member))
        self._set_address(&m, addr)  # checked before the table changes
        self._lock()
        s = _find(self._t, key)
        if s != NULL:
            s.member[<int>index].addr = m.addr
            s.member[<int>index].addrlen = m.addrlen
        self._unlock()
        if s == NULL:
            raise KeyError(_session_id(session_id))

    def set_rate(self, session_id, rate_bps, burst_bytes):
        """This session's relay rate (bytes/s, 0 = unlimited) and burst from now on."""
        cdef double rate, burst, now, tokens
        cdef Session *s
        cdef uint64_t key = self._key(session_id)  # a bad id raises first, then a bad rate
        rate, burst = _relay_rate(rate_bps, burst_bytes)
        now = _monotonic()
        self._lock()
        s = _find(self._t, key)
        if s != NULL:
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
        self._unlock()
        if s == NULL:
            raise KeyError(_session_id(session_id))

    def remove_session(self, session_id):
        """Stop relaying for session_id (an unknown id is ignored)."""
        cdef uint64_t key = self._key(session_id)
        cdef Session *s
        self._lock()
        s = _find(self._t, key)
        if s != NULL:
            _delete(self._t, s)
        self._unlock()

    def session_stats(self, session_id):
        """Counters of one session, or None if it is unknown."""
        cdef uint64_t key = self._key(session_id)
        cdef Session copy
        cdef Session *s
        self._lock()
        s = _find(self._t, key)
        if s != NULL:
            copy = s[0]
        self._unlock()
        if s == NULL:
            return None
        return {
            "member_a": self._member_address(&copy.member[0]),
            "member_b": self._member_address(&copy.member[1]),
            "packets_a_to_b": copy.packets[0],
            "bytes_a_to_b": copy.nbytes[0],
            "packets_b_to_a": copy.packets[1],
            "bytes_b_to_a": copy.nbytes[1],
            "dropped_rate_limited": copy.dropped_rate_limited,
            "dropped_not_member": copy.dropped_not_member,
            "dropped_bad_token": copy.dropped_bad_token,
            "rate_bps": copy.rate,
            "burst_bytes": copy.burst,
            "created": copy.created,
            "last_activity": copy.last_activity if copy.last_activity >= 0 else None,
        }

    cdef object _member_address(self, const Member *m):
        if m.addrlen == 0:
            return None
        return sockaddr_to_address(<const unsigned char *>&m.addr, m.addrlen)

    def counters(self):
        """Engine-wide counters, every thread's added up (see the class docstring)."""
        cdef Counters c
        cdef int i
        self._lock()
        c = self._main.c
        for i in range(self._nworkers):
            _fold(&c, &self._workers[i].c)
        self._unlock()
        return {
            "received": c.received,
            "returned": c.returned,
            "relayed_packets": c.relayed_packets,
            "relayed_bytes": c.relayed_bytes,
            "dropped_unknown_session": c.dropped_unknown,
            "dropped_not_member": c.dropped_not_member,
            "dropped_bad_token": c.dropped_bad_token,
            "dropped_rate_limited": c.dropped_rate,
            "dropped_malformed": c.dropped_malformed,
            "send_errors": c.send_errors,
            "truncated": c.truncated,
            "handed_off": c.handed_off,
            "handoff_dropped": c.handoff_dropped,
        }

    # --- the hot path ------------------------------------------------------------------------

    def poll(self):
        """Read one batch, relay its frames; return the other datagrams as [(data, addr)],
        with those the relay threads handed over."""
        cdef Lane *lane = self._main
        cdef int n
        cdef Py_ssize_t k, nup = 0, taken = 0
        cdef uint64_t drained
        cdef list out = []
        cdef Held *held = NULL
        cdef Held *h
        lane.fd = self._sock.fileno()
        while True:
            n = _receive(lane)
            if n >= 0:
                break
            if n == -EINTR:
                PyErr_CheckSignals()
                continue
            self.last_batch_size = 0
            if n == -EAGAIN:
                n = 0
                break
            raise OSError(-n, strerror(-n).decode("utf-8", "replace"))
        if n > 0:
            _relay_batch(lane, n, _monotonic(), &nup)
            for k in range(nup):
                out.append(received(&lane.recv, lane.up[k], &self._src, self._src_tuples))
        if self._t.wake_fd >= 0:
            c_read(self._t.wake_fd, &drained, sizeof(drained))  # before the queue: no lost wake
            self._lock()
            held = self._t.held_head
            h = NULL
            while self._t.held_head != NULL and taken < self.batch_size:
                h = self._t.held_head
                self._t.held_head = h.next
                self._t.held_count -= 1
                self._t.held_bytes -= h.length
                taken += 1
            if h != NULL:
                h.next = NULL
            if self._t.held_head == NULL:
                self._t.held_tail = NULL
            elif taken:
                c_write(self._t.wake_fd, &drained, sizeof(drained))  # more left: poll again
            self._unlock()
            if not taken:
                held = NULL
        if nup or taken:
            self._lock()
            lane.c.returned += <uint64_t>(nup + taken)
            self._unlock()
        try:
            h = held
            while h != NULL:
                out.append((PyBytes_FromStringAndSize(<char *>(h + 1), h.length),
                            cached_address(&self._src, self._src_tuples,
                                           <const unsigned char *>&h.name, h.namelen)))
                h = h.next
        finally:
            _free_held(held)
        self.last_batch_size = n + taken
        return out


cdef inline void _fold(Counters *into, const Counters *c) noexcept nogil:
    into.received += c.received
    into.returned += c.returned
    into.relayed_packets += c.relayed_packets
    into.relayed_bytes += c.relayed_bytes
    into.dropped_unknown += c.dropped_unknown
    into.dropped_not_member += c.dropped_not_member
    into.dropped_bad_token += c.dropped_bad_token
    into.dropped_rate += c.dropped_rate
    into.dropped_malformed += c.dropped_malformed
    into.send_errors += c.send_errors
    into.truncated += c.truncated
    into.handed_off += c.handed_off
    into.handoff_dropped += c.handoff_dropped
