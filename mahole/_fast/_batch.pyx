# cython: language_level=3, boundscheck=False, wraparound=False
"""recvmmsg/sendmmsg batches on a non-blocking UDP socket (Linux only).

Twin of `_batch_py.py` (same API, same tests: tests/conftest.py `batch`). One syscall
moves up to `batch_size` datagrams; the GIL is released around it. Receive buffers and
message headers are allocated once. Per datagram the receive side builds one `bytes`
and one (data, address) tuple: source addresses come from a small direct-mapped cache
keyed by the raw sockaddr, so a batch from one peer shares one address tuple.
Destination tuples are converted to sockaddrs once and kept in a dict.

UDP GSO (`gso=True`, the default where the kernel has UDP_SEGMENT, Linux 4.18+): consecutive
datagrams of one size for one destination (the last may be shorter) become one msghdr of the
sendmmsg, with one iovec per datagram and a UDP_SEGMENT control message, so the stack is
traversed once per run instead of once per datagram; the datagrams on the wire are the same.
A run the kernel refuses (over the path MTU, say) is sent again one datagram per msghdr; EIO
(no checksum offload on the device) turns GSO off for the socket.

UDP GRO (`gro=True`, where the kernel has UDP_GRO, Linux 5.0+, and max_datagram is 65535):
the batch socket turns UDP_GRO on, and the kernel may hand over several datagrams of one
sender as one buffer (GSO sends on loopback arrive so, and a NIC's GRO does the same), with
the segment size in a control message; recv_batch cuts the buffer back into the datagrams,
so a batch may hold more than batch_size of them (at most 64 KiB each buffer).

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
from libc.stdint cimport uint16_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset

from mahole._fast._sockaddr cimport (
    CMSG_STRIDE,
    gso_cmsgs_alloc,
    gso_message,
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
    cmsghdr,
    msghdr,
    CMSG_DATA,
    CMSG_LEN,
    CMSG_SPACE,
    address_to_sockaddr,
    cached_address,
    errno,
    iovec,
    mmsghdr,
    received,
    recv_buffers_alloc,
    recv_buffers_free,
    recv_buffers_ready,
    recvmmsg,
    sendmmsg,
    socklen_t,
    strerror,
)
from mahole._fast._sockaddr cimport MAX_FLOWINFO as C_MAX_FLOWINFO

cdef extern from "<sys/socket.h>" nogil:
    cmsghdr *CMSG_FIRSTHDR(msghdr *msg)
    cmsghdr *CMSG_NXTHDR(msghdr *msg, cmsghdr *cmsg)

from mahole._fast._addr_py import (
    GSO_MAX_BYTES as _GSO_MAX_BYTES,
    GSO_MAX_SEGMENTS as _GSO_MAX_SEGMENTS,
    MAX_BATCH_SIZE,
    MAX_DATAGRAM,
    MAX_FLOWINFO,
    UDP_GRO as _UDP_GRO,
    batch_args,
    has_udp_segment,
    turn_on_udp_gro,
)

cdef enum:
    UDP_GRO = 104               # == _addr_py.UDP_GRO (linux/udp.h)
    GSO_MAX_SEGMENTS = 64       # == _addr_py.GSO_MAX_SEGMENTS
    GSO_MAX_BYTES = 65000       # == _addr_py.GSO_MAX_BYTES

assert UDP_GRO == _UDP_GRO
assert CMSG_SPACE(sizeof(uint16_t)) <= CMSG_STRIDE  # a control message fits its slot
assert GSO_MAX_SEGMENTS == _GSO_MAX_SEGMENTS and GSO_MAX_BYTES == _GSO_MAX_BYTES

# Destination sockaddr cache: cleared (between calls) once it holds more entries.
DEST_CACHE_MAX = 8192

assert C_MAX_FLOWINFO == MAX_FLOWINFO


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

    gro: whether the kernel may hand over several datagrams as one buffer (asked with
        gro=True; see the module docstring), which recv_batch cuts apart.
    gso: whether runs of equal-size datagrams to one destination go out as UDP GSO sends
        (asked with gso=True, the default; False where the kernel lacks UDP_SEGMENT, and
        from the first EIO on).

    Read-only counters: recv_calls and send_calls count recv_batch() and send_batch()
    calls; send_errors counts datagrams skipped after a per-datagram error; truncated
    counts received datagrams dropped for being longer than max_datagram; gso_runs counts
    runs of two or more datagrams the kernel took in one GSO send.
    """

    cdef object _sock
    cdef int _family
    cdef readonly Py_ssize_t batch_size
    cdef readonly Py_ssize_t max_datagram
    cdef readonly unsigned long long recv_calls
    cdef readonly unsigned long long send_calls
    cdef readonly unsigned long long send_errors
    cdef readonly unsigned long long truncated
    cdef readonly unsigned long long gso_runs
    cdef readonly bint gso
    cdef readonly bint gro
    cdef char *_rx_cmsg         # per receive slot: room for its UDP_GRO control message

    cdef RecvBuffers _recv
    cdef mmsghdr *_tx
    cdef iovec *_tx_iov
    cdef list _tx_hold          # keeps each in-flight datagram's bytes alive without the GIL
    cdef list _tx_names         # each datagram's destination sockaddr (bytes)
    cdef int *_msg_first        # per sendmmsg message: its first datagram...
    cdef int *_msg_count        # ...and how many (a GSO run when more than one)
    cdef char *_cmsg            # one UDP_SEGMENT control message per message slot
    cdef bint _rx_busy
    cdef bint _tx_busy

    cdef SrcCache _src          # source addresses: see cached_address in _sockaddr.pxd
    cdef list _src_tuples

    cdef dict _dest_cache       # address tuple -> sockaddr bytes
    cdef object _last_dest
    cdef bytes _last_name

    def __cinit__(self, sock, batch_size=32, max_datagram=65535, *, gso=True, gro=False):
        cdef Py_ssize_t bs, mx
        family, bs, mx = batch_args(sock, batch_size, max_datagram)
        self._sock = sock
        self._family = family
        self.batch_size = bs
        self.max_datagram = mx
        recv_buffers_alloc(&self._recv, bs, mx)
        self._tx = <mmsghdr *>calloc(bs, sizeof(mmsghdr))
        self._tx_iov = <iovec *>calloc(bs, sizeof(iovec))
        self._msg_first = <int *>calloc(bs, sizeof(int))
        self._msg_count = <int *>calloc(bs, sizeof(int))
        self._cmsg = gso_cmsgs_alloc(bs)
        if (self._tx == NULL or self._tx_iov == NULL or self._msg_first == NULL
                or self._msg_count == NULL or self._cmsg == NULL):
            raise MemoryError()
        self.gso = bool(gso) and has_udp_segment(sock)
        self.gro = bool(gro) and mx == MAX_DATAGRAM and turn_on_udp_gro(sock)
        if self.gro:
            self._rx_cmsg = <char *>calloc(bs, CMSG_STRIDE)
            if self._rx_cmsg == NULL:
                raise MemoryError()
        self._tx_hold = [None] * bs
        self._tx_names = [None] * bs
        memset(&self._src, 0, sizeof(self._src))
        self._src_tuples = [None] * SRC_SLOTS
        self._dest_cache = {}

    def __dealloc__(self):
        recv_buffers_free(&self._recv)
        free(self._tx)
        free(self._tx_iov)
        free(self._msg_first)
        free(self._msg_count)
        free(self._cmsg)
        free(self._rx_cmsg)

    def fileno(self):
        """The socket's file descriptor (-1 once the caller closed it)."""
        return self._sock.fileno()

    def recv_batch(self):
        """Up to batch_size waiting datagrams as [(data, address)]; [] when none wait."""
        cdef int fd = self._sock.fileno()
        cdef int n, err
        cdef Py_ssize_t j
        cdef unsigned int vlen = <unsigned int>self.batch_size
        cdef mmsghdr *rx = self._recv.msgs
        cdef list out
        if self._rx_busy:
            raise RuntimeError("BatchSocket.recv_batch called from two threads at once")
        self.recv_calls += 1
        recv_buffers_ready(&self._recv)
        if self.gro:
            for j in range(self.batch_size):
                rx[j].msg_hdr.msg_control = self._rx_cmsg + j * CMSG_STRIDE
                rx[j].msg_hdr.msg_controllen = CMSG_STRIDE
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
                if self.gro:
                    self._split(j, out)
                else:
                    out.append(received(&self._recv, j, &self._src, self._src_tuples))
            return out
        finally:
            self._rx_busy = False

    cdef int _split(self, Py_ssize_t j, list out) except -1:
        """Append datagram j of the last recvmmsg, or the datagrams it coalesces (UDP GRO:
        all of the control message's segment size, the last perhaps shorter)."""
        cdef msghdr *msg = &self._recv.msgs[j].msg_hdr
        cdef cmsghdr *cmsg = CMSG_FIRSTHDR(msg)
        cdef size_t length = self._recv.msgs[j].msg_len, segment = 0, off
        cdef char *data = self._recv.buf + j * self._recv.max_datagram
        while cmsg != NULL:
            if (cmsg.cmsg_level == SOL_UDP and cmsg.cmsg_type == UDP_GRO
                    and cmsg.cmsg_len >= CMSG_LEN(sizeof(uint16_t))):
                segment = (<uint16_t *>CMSG_DATA(cmsg))[0]
            cmsg = CMSG_NXTHDR(msg, cmsg)
        if segment == 0 or segment >= length:
            out.append(received(&self._recv, j, &self._src, self._src_tuples))
            return 0
        addr = cached_address(&self._src, self._src_tuples,
                              <const unsigned char *>&self._recv.names[j], msg.msg_namelen)
        off = 0
        while off < length:
            out.append((PyBytes_FromStringAndSize(data + off, min(segment, length - off)), addr))
            off += segment
        return 0

    cdef bytes _dest(self, object addr):
        """The cached sockaddr bytes for a destination tuple; ValueError if it is bad."""
        if addr is self._last_dest:
            return self._last_name
        try:
            name = self._dest_cache.get(addr)
        except TypeError:
            raise ValueError(f"address must be a tuple (host, port), not {addr!r}") from None
        if name is None:
            name = address_to_sockaddr(self._family, addr, True)  # bools pass, as in sendto
            self._dest_cache[addr] = name
        self._last_dest = addr
        self._last_name = name
        return name

    cdef Py_ssize_t _group(self, Py_ssize_t k):
        """Lay datagrams [0, k) out as sendmmsg messages; returns how many. Without GSO each
        datagram is a message; with it, a run of consecutive datagrams for one destination,
        all of the first one's size except perhaps a shorter last one, is one message with
        an iovec per datagram and UDP_SEGMENT = that size."""
        cdef Py_ssize_t m = 0, j = 0, start
        cdef size_t size, total, length
        cdef iovec *iov = self._tx_iov
        cdef list names = self._tx_names
        cdef msghdr *msg
        cdef bytes name
        while j < k:
            start = j
            size = total = iov[j].iov_len
            name = <bytes>names[j]
            j += 1
            if self.gso and size > 0:
                while (j < k and j - start < GSO_MAX_SEGMENTS
                       and total + iov[j].iov_len <= GSO_MAX_BYTES and names[j] is name):
                    length = iov[j].iov_len
                    if length > size or length == 0:
                        break
                    total += length
                    j += 1
                    if length < size:
                        break  # a shorter datagram can only be the last of a run
            msg = &self._tx[m].msg_hdr
            msg.msg_name = PyBytes_AS_STRING(name)
            msg.msg_namelen = <socklen_t>PyBytes_GET_SIZE(name)
            gso_message(msg, &iov[start], <size_t>(j - start), self._cmsg, m, size)
            self._msg_first[m] = <int>start
            self._msg_count[m] = <int>(j - start)
            m += 1
        return m

    cdef int _send_one(self, int fd, Py_ssize_t j) except -2:
        """Send datagram j alone: 1 sent, 0 refused on its own (counted), -1 the socket
        takes no more now (EAGAIN/ENOBUFS); OSError for a dead socket."""
        cdef int r, err
        cdef mmsghdr one
        cdef bytes name = <bytes>self._tx_names[j]
        memset(&one, 0, sizeof(one))
        one.msg_hdr.msg_name = PyBytes_AS_STRING(name)
        one.msg_hdr.msg_namelen = <socklen_t>PyBytes_GET_SIZE(name)
        one.msg_hdr.msg_iov = &self._tx_iov[j]
        one.msg_hdr.msg_iovlen = 1
        while True:
            with nogil:
                r = sendmmsg(fd, &one, 1, MSG_DONTWAIT)
                err = errno
            if r == 1:
                return 1
            if r == 0 or err == EAGAIN or err == ENOBUFS:
                return -1
            if err == EINTR:
                PyErr_CheckSignals()
                continue
            if err == EBADF or err == ENOTSOCK or err == EFAULT:
                raise OSError(err, strerror(err).decode("utf-8", "replace"))
            self.send_errors += 1
            return 0

    def send_batch(self, datagrams):
        """Send [(data, address)] in order; returns how many entries were consumed."""
        cdef int fd, r, err, one
        cdef Py_ssize_t n, i, j, k, m, mm, off, done, used = 0
        cdef Py_ssize_t bs = self.batch_size
        cdef mmsghdr *tx = self._tx
        cdef iovec *iov = self._tx_iov
        cdef list hold = self._tx_hold
        cdef list names = self._tx_names
        cdef tuple items
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
                    hold[j] = data
                    names[j] = self._dest(addr)
                    iov[j].iov_base = PyBytes_AS_STRING(data)
                    iov[j].iov_len = PyBytes_GET_SIZE(data)
                if k > used:
                    used = k
                m = self._group(k)
                off = 0      # messages handled
                done = 0     # datagrams consumed
                while off < m:
                    with nogil:
                        r = sendmmsg(fd, tx + off, <unsigned int>(m - off), MSG_DONTWAIT)
                        err = errno
                    if r > 0:
                        for mm in range(off, off + r):
                            done += self._msg_count[mm]
                            if self._msg_count[mm] > 1:
                                self.gso_runs += 1
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
                    if self._msg_count[off] > 1:
                        # A GSO run refused (over the path MTU, an old kernel...): one by one.
                        if err == EIO:
                            self.gso = False  # no checksum offload for GSO: stop trying
                        for j in range(self._msg_first[off],
                                       self._msg_first[off] + self._msg_count[off]):
                            one = self._send_one(fd, j)
                            if one < 0:
                                stop = True
                                break
                            done += 1
                        if stop:
                            break
                    else:
                        # Refused on its own (ECONNREFUSED, EMSGSIZE, ENETUNREACH...): skip it.
                        self.send_errors += 1
                        done += 1
                    off += 1
                i += done
            return i
        finally:
            for j in range(used):
                hold[j] = None
                names[j] = None
            self._tx_busy = False
