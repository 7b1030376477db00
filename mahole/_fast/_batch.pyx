# cython: language_level=3, boundscheck=False, wraparound=False
"""recvmmsg/sendmmsg batches on a non-blocking UDP socket (Linux only).

Twin of `_batch_py.py` (same API, same tests: tests/conftest.py `batch`). One syscall
moves up to `batch_size` datagrams; the GIL is released around it. Receive buffers and
message headers are allocated once. Per datagram the receive side builds one `bytes`
and one (data, address) tuple: source addresses come from a small direct-mapped cache
keyed by the raw sockaddr, so a batch from one peer shares one address tuple.
Destination tuples are converted to sockaddrs once and kept in a dict.

Semantics shared with the twin (see `BatchSocket`): a datagram longer than
`max_datagram` is dropped and counted in `truncated`; `send_batch` validates every
entry before sending any, returns how many entries it consumed (sent, or skipped
after a per-datagram error counted in `send_errors`) and stops at EAGAIN/ENOBUFS.
"""

cimport cython
from cpython.buffer cimport PyObject_CheckBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.exc cimport PyErr_CheckSignals
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset, strlen

import operator
import socket as _socket


cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN          # == EWOULDBLOCK on Linux
        EINTR
        ENOBUFS
        EBADF
        ENOTSOCK
        EFAULT

cdef extern from "<string.h>" nogil:
    char *strerror(int errnum)

cdef extern from "<stdint.h>" nogil:
    ctypedef unsigned short uint16_t
    ctypedef unsigned int uint32_t

cdef extern from "<time.h>" nogil:
    struct timespec:
        pass

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t

    struct sockaddr:
        sa_family_t sa_family

    struct sockaddr_storage:
        sa_family_t ss_family

    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    int recvmmsg(int sockfd, mmsghdr *msgvec, unsigned int vlen, int flags,
                 timespec *timeout)
    int sendmmsg(int sockfd, mmsghdr *msgvec, unsigned int vlen, int flags)

    enum:
        AF_INET
        AF_INET6
        MSG_DONTWAIT
        MSG_TRUNC

cdef extern from "<netinet/in.h>" nogil:
    ctypedef uint16_t in_port_t

    struct in_addr:
        uint32_t s_addr

    struct in6_addr:
        unsigned char s6_addr[16]

    struct sockaddr_in:
        sa_family_t sin_family
        in_port_t sin_port
        in_addr sin_addr

    struct sockaddr_in6:
        sa_family_t sin6_family
        in_port_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id

    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)
    uint32_t htonl(uint32_t)
    uint32_t ntohl(uint32_t)

    enum:
        INET6_ADDRSTRLEN

cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)
    int inet_pton(int af, const char *src, void *dst)


# The kernel caps recvmmsg/sendmmsg vlen at UIO_MAXIOV (1024) without saying so.
MAX_BATCH_SIZE = 1024
# Largest UDP payload a 16-bit length field can describe (RFC 768).
MAX_DATAGRAM = 65535
# Destination sockaddr cache: cleared (between calls) once it holds more entries.
DEST_CACHE_MAX = 8192
# IPv6 flow label is 20 bits (RFC 8200 §3); Python's sendto enforces the same range.
MAX_FLOWINFO = 0xFFFFF

cdef enum:
    SRC_SLOTS = 64          # source-address cache entries (power of two)
    SRC_KEY_MAX = 28        # sizeof(struct sockaddr_in6) on Linux
    V4_KEY_LEN = 8          # sin_family, sin_port, sin_addr: the rest is zero padding

cdef struct SrcKey:
    unsigned int length     # 0 = empty slot
    unsigned char key[SRC_KEY_MAX]


def _check_args(sock, batch_size, max_datagram):
    """Validate the constructor arguments; returns (family, batch_size, max_datagram)."""
    batch_size = operator.index(batch_size)
    max_datagram = operator.index(max_datagram)
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be 1-{MAX_BATCH_SIZE}, not {batch_size}")
    if not 1 <= max_datagram <= MAX_DATAGRAM:
        raise ValueError(f"max_datagram must be 1-{MAX_DATAGRAM}, not {max_datagram}")
    family = sock.family
    if family != _socket.AF_INET and family != _socket.AF_INET6:
        raise ValueError(f"BatchSocket needs an AF_INET or AF_INET6 socket, not {family!r}")
    if sock.type != _socket.SOCK_DGRAM:
        raise ValueError(f"BatchSocket needs a SOCK_DGRAM socket, not {sock.type!r}")
    if sock.gettimeout() != 0.0:
        raise ValueError("BatchSocket needs a non-blocking socket (sock.setblocking(False))")
    return int(family), batch_size, max_datagram


cdef bytes _sockaddr(int family, object addr):
    """The sockaddr bytes for a destination tuple, or ValueError (same rules as the twin).

    AF_INET sockets take (host, port) with an IPv4 literal. AF_INET6 sockets take
    (host, port[, flowinfo[, scope_id]]) with an IPv6 literal, or an IPv4 literal which
    is sent to its IPv4-mapped address ::ffff:a.b.c.d (RFC 4291 §2.5.5.2).
    """
    cdef sockaddr_in sin
    cdef sockaddr_in6 sin6
    cdef bytes hb
    cdef unsigned long long port, flowinfo = 0, scope_id = 0
    if not isinstance(addr, tuple):
        raise ValueError(f"address must be a tuple (host, port), not {addr!r}")
    n = len(addr)
    if family == AF_INET:
        if n != 2:
            raise ValueError(f"AF_INET address must be (host, port), not {addr!r}")
    elif not 2 <= n <= 4:
        raise ValueError(f"AF_INET6 address must be (host, port[, flowinfo[, scope_id]]), "
                         f"not {addr!r}")
    host = addr[0]
    if not isinstance(host, str) or not host.isascii() or "\0" in host:
        raise ValueError(f"address host must be an IP literal, not {host!r}")
    p = addr[1]
    if not isinstance(p, int) or not 0 <= p <= 0xFFFF:
        raise ValueError(f"address port must be an int 0-65535, not {p!r}")
    port = p
    if n > 2:
        f = addr[2]
        if not isinstance(f, int) or not 0 <= f <= MAX_FLOWINFO:
            raise ValueError(f"address flowinfo must be an int 0-{MAX_FLOWINFO}, not {f!r}")
        flowinfo = f
    if n > 3:
        s = addr[3]
        if not isinstance(s, int) or not 0 <= s <= 0xFFFFFFFF:
            raise ValueError(f"address scope_id must be an int 0-4294967295, not {s!r}")
        scope_id = s
    hb = host.encode("ascii")
    if family == AF_INET:
        memset(&sin, 0, sizeof(sin))
        sin.sin_family = AF_INET
        sin.sin_port = htons(<uint16_t>port)
        if inet_pton(AF_INET, hb, &sin.sin_addr) != 1:
            raise ValueError(f"address host must be an IPv4 literal on an AF_INET socket, "
                             f"not {host!r}")
        return PyBytes_FromStringAndSize(<char *>&sin, sizeof(sin))
    memset(&sin6, 0, sizeof(sin6))
    sin6.sin6_family = AF_INET6
    sin6.sin6_port = htons(<uint16_t>port)
    sin6.sin6_flowinfo = htonl(<uint32_t>flowinfo)
    sin6.sin6_scope_id = <uint32_t>scope_id
    if inet_pton(AF_INET6, hb, &sin6.sin6_addr) != 1:
        if inet_pton(AF_INET, hb, &sin6.sin6_addr.s6_addr[12]) != 1:
            raise ValueError(f"address host must be an IP literal, not {host!r}")
        sin6.sin6_addr.s6_addr[10] = 0xFF
        sin6.sin6_addr.s6_addr[11] = 0xFF
    return PyBytes_FromStringAndSize(<char *>&sin6, sizeof(sin6))


cdef object _address(const unsigned char *name, socklen_t namelen):
    """A received sockaddr as Python's recvfrom shows it."""
    cdef char buf[INET6_ADDRSTRLEN]
    cdef const sockaddr_in *sin
    cdef const sockaddr_in6 *sin6
    cdef sa_family_t family
    if namelen < sizeof(sa_family_t):
        return None
    family = (<const sockaddr *>name).sa_family
    if family == AF_INET and namelen >= sizeof(sockaddr_in):
        sin = <const sockaddr_in *>name
        inet_ntop(AF_INET, &sin.sin_addr, buf, sizeof(buf))
        return (PyUnicode_DecodeASCII(buf, strlen(buf), NULL), ntohs(sin.sin_port))
    if family == AF_INET6 and namelen >= sizeof(sockaddr_in6):
        sin6 = <const sockaddr_in6 *>name
        inet_ntop(AF_INET6, &sin6.sin6_addr, buf, sizeof(buf))
        return (PyUnicode_DecodeASCII(buf, strlen(buf), NULL), ntohs(sin6.sin6_port),
                ntohl(sin6.sin6_flowinfo), sin6.sin6_scope_id)
    return (family, PyBytes_FromStringAndSize(<const char *>name + sizeof(sa_family_t),
                                              namelen - sizeof(sa_family_t)))


cdef inline unsigned int _fnv1a(const unsigned char *p, unsigned int n) noexcept nogil:
    cdef unsigned int h = 2166136261u
    cdef unsigned int i
    for i in range(n):
        h = (h ^ p[i]) * 16777619u
    return h ^ (h >> 16)


@cython.final
cdef class BatchSocket:
    """Batches of datagrams through one non-blocking UDP socket (AF_INET or AF_INET6).

    The socket stays the caller's: BatchSocket never closes it or changes its options.
    Not for concurrent use of one method from several threads (RuntimeError).

    recv_batch() -> [(data, address)]: up to batch_size datagrams already waiting, [] if
        none (never blocks). Addresses look exactly like socket.recvfrom's. A datagram
        longer than max_datagram is dropped and counted in `truncated`. Other errors
        raise OSError; an error met after some datagrams is raised by the next call.
    send_batch([(data, address)]) -> int: sends in order; returns how many entries were
        consumed, so `datagrams[n:]` is what is left after EAGAIN/ENOBUFS. An entry
        refused on its own (ECONNREFUSED, EMSGSIZE, EHOSTUNREACH...) is skipped and
        counted in `send_errors`. Every entry is checked before any is sent: a host that
        is not an IP literal (or a malformed address) raises ValueError, data that is
        not bytes-like raises TypeError. On AF_INET6 an IPv4 literal goes to ::ffff:a.b.c.d.

    Read-only counters: recv_calls and send_calls count recv_batch() and send_batch()
    calls; send_errors counts datagrams skipped after a per-datagram error; truncated
    counts received datagrams dropped for being longer than max_datagram.
    """

    cdef object _sock
    cdef int _family
    cdef readonly Py_ssize_t batch_size
    cdef readonly Py_ssize_t max_datagram
    cdef readonly unsigned long long recv_calls
    cdef readonly unsigned long long send_calls
    cdef readonly unsigned long long send_errors
    cdef readonly unsigned long long truncated

    cdef mmsghdr *_rx
    cdef iovec *_rx_iov
    cdef sockaddr_storage *_rx_names
    cdef char *_rx_buf
    cdef mmsghdr *_tx
    cdef iovec *_tx_iov
    cdef list _tx_hold          # keeps each in-flight datagram's bytes alive without the GIL
    cdef bint _rx_busy
    cdef bint _tx_busy

    cdef SrcKey _src_keys[SRC_SLOTS]
    cdef list _src_tuples
    cdef unsigned int _src_last

    cdef dict _dest_cache       # address tuple -> sockaddr bytes
    cdef object _last_dest
    cdef bytes _last_name

    def __cinit__(self, sock, batch_size=32, max_datagram=65535):
        cdef Py_ssize_t j, bs, mx
        family, bs, mx = _check_args(sock, batch_size, max_datagram)
        self._sock = sock
        self._family = family
        self.batch_size = bs
        self.max_datagram = mx
        self._rx = <mmsghdr *>calloc(bs, sizeof(mmsghdr))
        self._rx_iov = <iovec *>calloc(bs, sizeof(iovec))
        self._rx_names = <sockaddr_storage *>calloc(bs, sizeof(sockaddr_storage))
        self._rx_buf = <char *>malloc(bs * mx)
        self._tx = <mmsghdr *>calloc(bs, sizeof(mmsghdr))
        self._tx_iov = <iovec *>calloc(bs, sizeof(iovec))
        if (self._rx == NULL or self._rx_iov == NULL or self._rx_names == NULL
                or self._rx_buf == NULL or self._tx == NULL or self._tx_iov == NULL):
            raise MemoryError()
        for j in range(bs):
            self._rx_iov[j].iov_base = self._rx_buf + j * mx
            self._rx_iov[j].iov_len = mx
            self._rx[j].msg_hdr.msg_name = &self._rx_names[j]
            self._rx[j].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
            self._rx[j].msg_hdr.msg_iov = &self._rx_iov[j]
            self._rx[j].msg_hdr.msg_iovlen = 1
            self._tx[j].msg_hdr.msg_iov = &self._tx_iov[j]
            self._tx[j].msg_hdr.msg_iovlen = 1
        self._tx_hold = [None] * bs
        memset(self._src_keys, 0, sizeof(self._src_keys))
        self._src_tuples = [None] * SRC_SLOTS
        self._src_last = 0
        self._dest_cache = {}

    def __dealloc__(self):
        free(self._rx)
        free(self._rx_iov)
        free(self._rx_names)
        free(self._rx_buf)
        free(self._tx)
        free(self._tx_iov)

    def fileno(self):
        """The socket's file descriptor (-1 once the caller closed it)."""
        return self._sock.fileno()

    cdef object _source(self, const unsigned char *name, socklen_t namelen):
        """The address tuple for a received sockaddr, reused while the sockaddr repeats."""
        cdef unsigned int keylen, slot
        cdef SrcKey *entry
        if namelen < sizeof(sa_family_t):
            return None
        family = (<const sockaddr *>name).sa_family
        if family == AF_INET and namelen >= sizeof(sockaddr_in):
            keylen = V4_KEY_LEN
        elif family == AF_INET6 and namelen >= sizeof(sockaddr_in6):
            keylen = sizeof(sockaddr_in6)
        else:
            return _address(name, namelen)
        entry = &self._src_keys[self._src_last]
        if entry.length == keylen and memcmp(entry.key, name, keylen) == 0:
            return self._src_tuples[self._src_last]
        slot = _fnv1a(name, keylen) & (SRC_SLOTS - 1)
        entry = &self._src_keys[slot]
        if not (entry.length == keylen and memcmp(entry.key, name, keylen) == 0):
            address = _address(name, namelen)
            self._src_tuples[slot] = address
            memcpy(entry.key, name, keylen)
            entry.length = keylen
        self._src_last = slot
        return self._src_tuples[slot]

    def recv_batch(self):
        """Up to batch_size waiting datagrams as [(data, address)]; [] when none wait."""
        cdef int fd = self._sock.fileno()
        cdef int n, err
        cdef Py_ssize_t j
        cdef unsigned int vlen = <unsigned int>self.batch_size
        cdef mmsghdr *rx = self._rx
        cdef list out
        if self._rx_busy:
            raise RuntimeError("BatchSocket.recv_batch called from two threads at once")
        self.recv_calls += 1
        for j in range(self.batch_size):
            rx[j].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
        self._rx_busy = True
        try:
            while True:
                with nogil:
                    n = recvmmsg(fd, rx, vlen, MSG_DONTWAIT, NULL)
                    err = errno
                if n >= 0:
                    break
                if err == EINTR:
                    PyErr_CheckSignals()
                    continue
                if err == EAGAIN:
                    return []
                raise OSError(err, strerror(err).decode("utf-8", "replace"))
            out = []
            for j in range(n):
                if rx[j].msg_hdr.msg_flags & MSG_TRUNC:
                    self.truncated += 1
                    continue
                data = PyBytes_FromStringAndSize(self._rx_buf + j * self.max_datagram,
                                                 rx[j].msg_len)
                out.append((data, self._source(<const unsigned char *>&self._rx_names[j],
                                               rx[j].msg_hdr.msg_namelen)))
            return out
        finally:
            self._rx_busy = False

    cdef bytes _dest(self, object addr):
        """The cached sockaddr bytes for a destination tuple; ValueError if it is bad."""
        if addr is self._last_dest:
            return self._last_name
        try:
            name = self._dest_cache.get(addr)
        except TypeError:
            raise ValueError(f"address must be a tuple (host, port), not {addr!r}") from None
        if name is None:
            name = _sockaddr(self._family, addr)
            self._dest_cache[addr] = name
        self._last_dest = addr
        self._last_name = name
        return name

    def send_batch(self, datagrams):
        """Send [(data, address)] in order; returns how many entries were consumed."""
        cdef int fd, r, err
        cdef Py_ssize_t n, i, j, k, off, used = 0
        cdef Py_ssize_t bs = self.batch_size
        cdef mmsghdr *tx = self._tx
        cdef iovec *iov = self._tx_iov
        cdef list hold = self._tx_hold
        cdef tuple items
        cdef bytes name
        cdef bint stop = False
        if self._tx_busy:
            raise RuntimeError("BatchSocket.send_batch called from two threads at once")
        self.send_calls += 1
        items = tuple(datagrams)
        n = len(items)
        if len(self._dest_cache) > DEST_CACHE_MAX:
            self._dest_cache.clear()
            self._last_dest = None
            self._last_name = None
        # Check every entry first, so that a bad one raises before anything is sent.
        for i in range(n):
            data, addr = items[i]
            if not PyBytes_CheckExact(data) and not PyObject_CheckBuffer(data):
                raise TypeError(f"datagram must be a bytes-like object, "
                                f"not {type(data).__name__}")
            self._dest(addr)
        fd = self._sock.fileno()
        i = 0
        self._tx_busy = True
        try:
            while i < n and not stop:
                k = min(bs, n - i)
                for j in range(k):
                    data, addr = items[i + j]
                    if not PyBytes_CheckExact(data):
                        data = bytes(memoryview(data))
                    name = self._dest(addr)
                    hold[j] = data
                    iov[j].iov_base = PyBytes_AS_STRING(data)
                    iov[j].iov_len = PyBytes_GET_SIZE(data)
                    tx[j].msg_hdr.msg_name = PyBytes_AS_STRING(name)
                    tx[j].msg_hdr.msg_namelen = <socklen_t>PyBytes_GET_SIZE(name)
                if k > used:
                    used = k
                off = 0
                while off < k:
                    with nogil:
                        r = sendmmsg(fd, tx + off, <unsigned int>(k - off), MSG_DONTWAIT)
                        err = errno
                    if r > 0:
                        off += r
                        continue
                    if r == 0 or err == EAGAIN or err == ENOBUFS:
                        stop = True
                        break
                    if err == EINTR:
                        PyErr_CheckSignals()
                        continue
                    if err == EBADF or err == ENOTSOCK or err == EFAULT:
                        raise OSError(err, strerror(err).decode("utf-8", "replace"))
                    # Refused on its own (ECONNREFUSED, EMSGSIZE, ENETUNREACH...): skip it.
                    self.send_errors += 1
                    off += 1
                i += off
            return i
        finally:
            for j in range(used):
                hold[j] = None
            self._tx_busy = False
