# C declarations and helpers shared by the Linux socket modules of mahole._fast (`_batch.pyx`,
# `_relay.pyx`): errno, sockaddr/msghdr/mmsghdr, recvmmsg/sendmmsg, inet_pton/ntop,
# clock_gettime, UDP GSO; and, as inline functions, the conversions between address tuples
# and sockaddrs, the cache of received source addresses and the receive buffers.
# Nothing here is compiled on its own (setup.py builds one extension per .pyx): a module
# that cimports a helper compiles its own copy of it. `_addr_py.py` holds the pure-Python
# form of the address rules, for the twins.

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset, strlen

cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN          # == EWOULDBLOCK on Linux
        EINTR
        ENOBUFS
        EBADF
        ENOTSOCK
        EFAULT
        EIO

cdef extern from "<string.h>" nogil:
    char *strerror(int errnum)

cdef extern from "<stdint.h>" nogil:
    ctypedef unsigned short uint16_t
    ctypedef unsigned int uint32_t
    ctypedef unsigned long long uint64_t

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    ctypedef int clockid_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    enum:
        CLOCK_MONOTONIC     # the clock behind Python's time.monotonic() on Linux
    int clock_gettime(clockid_t clk_id, timespec *tp)

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

cdef extern from "<sys/socket.h>" nogil:
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    unsigned char *CMSG_DATA(cmsghdr *cmsg)
    size_t CMSG_SPACE(size_t length)
    size_t CMSG_LEN(size_t length)

# UDP generic segmentation offload (Linux 4.18+): one sendmsg carries several datagrams of one
# size to one destination; the kernel (or the NIC) cuts them apart. Fallback values for old
# headers; an old kernel refuses the option and the caller then sends one datagram per msghdr.
cdef extern from *:
    """
    #include <netinet/udp.h>
    #ifndef SOL_UDP
    #define SOL_UDP 17
    #endif
    #ifndef UDP_SEGMENT
    #define UDP_SEGMENT 103
    #endif
    """
    enum:
        SOL_UDP
        UDP_SEGMENT


# A sendmmsg's UDP_SEGMENT control messages: one per message slot, CMSG_STRIDE bytes apart.
cdef enum:
    CMSG_STRIDE = 32            # >= CMSG_SPACE(sizeof(uint16_t)), a multiple of 8


cdef inline char *gso_cmsgs_alloc(Py_ssize_t count) noexcept:
    """count UDP_SEGMENT control messages, their segment size still to set (gso_message);
    NULL when out of memory. The caller frees it."""
    cdef char *buf = <char *>calloc(count, CMSG_STRIDE)
    cdef cmsghdr *cmsg
    cdef Py_ssize_t j
    if buf == NULL:
        return NULL
    for j in range(count):
        cmsg = <cmsghdr *>(buf + j * CMSG_STRIDE)
        cmsg.cmsg_len = CMSG_LEN(sizeof(uint16_t))
        cmsg.cmsg_level = SOL_UDP
        cmsg.cmsg_type = UDP_SEGMENT
    return buf


cdef inline void gso_message(msghdr *msg, iovec *iov, size_t count, char *cmsgs,
                             Py_ssize_t slot, Py_ssize_t size) noexcept nogil:
    """Message `slot` of a sendmmsg carries the `count` datagrams at iov: a run of `size`
    bytes each (the last may be shorter) with the slot's UDP_SEGMENT, or one without."""
    msg.msg_iov = iov
    msg.msg_iovlen = count
    if count > 1:
        msg.msg_control = cmsgs + slot * CMSG_STRIDE
        msg.msg_controllen = CMSG_SPACE(sizeof(uint16_t))
        (<uint16_t *>CMSG_DATA(<cmsghdr *>msg.msg_control))[0] = <uint16_t>size
    else:
        msg.msg_control = NULL
        msg.msg_controllen = 0


# IPv6 flow label is 20 bits (RFC 8200 §3); Python's sendto enforces the same range.
# == MAX_FLOWINFO in _addr_py.py (the modules' Python-level constant).
cdef enum:
    MAX_FLOWINFO = 0xFFFFF


cdef inline bint _is_int(object value, bint allow_bool) noexcept:
    return isinstance(value, int) and (allow_bool or not isinstance(value, bool))


cdef inline bytes address_to_sockaddr(int family, object addr, bint allow_bool):
    """The sockaddr bytes for an address tuple, or ValueError (`check_address` in
    _addr_py.py is the twins' form: same rules, same order, same messages).

    AF_INET sockets take (host, port) with an IPv4 literal. AF_INET6 sockets take
    (host, port[, flowinfo[, scope_id]]) with an IPv6 literal, or an IPv4 literal which
    stands for its IPv4-mapped address ::ffff:a.b.c.d (RFC 4291 §2.5.5.2) - the form the
    kernel reports for IPv4 peers of an AF_INET6 socket. allow_bool: whether True and
    False pass as the ints 1 and 0 (as socket.sendto takes them) or are refused.
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
    if not _is_int(p, allow_bool) or not 0 <= p <= 0xFFFF:
        raise ValueError(f"address port must be an int 0-65535, not {p!r}")
    port = p
    if n > 2:
        f = addr[2]
        if not _is_int(f, allow_bool) or not 0 <= f <= MAX_FLOWINFO:
            raise ValueError(f"address flowinfo must be an int 0-{MAX_FLOWINFO}, not {f!r}")
        flowinfo = f
    if n > 3:
        s = addr[3]
        if not _is_int(s, allow_bool) or not 0 <= s <= 0xFFFFFFFF:
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


cdef inline object sockaddr_to_address(const unsigned char *name, socklen_t namelen):
    """A sockaddr as Python's recvfrom shows it."""
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


# The cache of received source addresses: direct-mapped, keyed by the raw sockaddr, so that
# the datagrams of a batch from one peer share one address tuple. The C part lives in the
# owner's struct; the tuples in a list of SRC_SLOTS entries beside it.
cdef enum:
    SRC_SLOTS = 64          # cache entries (power of two)
    SRC_KEY_MAX = 28        # sizeof(struct sockaddr_in6) on Linux
    V4_KEY_LEN = 8          # sin_family, sin_port, sin_addr: the rest is zero padding

cdef struct SrcKey:
    unsigned int length     # 0 = empty slot
    unsigned char key[SRC_KEY_MAX]

cdef struct SrcCache:
    SrcKey keys[SRC_SLOTS]
    unsigned int last       # the slot that answered last


cdef inline unsigned int _fnv1a(const unsigned char *p, unsigned int n) noexcept nogil:
    cdef unsigned int h = 2166136261u
    cdef unsigned int i
    for i in range(n):
        h = (h ^ p[i]) * 16777619u
    return h ^ (h >> 16)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline object cached_address(SrcCache *cache, list tuples, const unsigned char *name,
                                  socklen_t namelen):
    """The address tuple for a received sockaddr, reused while the sockaddr repeats.

    tuples: the list of SRC_SLOTS address tuples that goes with cache (None when empty)."""
    cdef unsigned int keylen, slot
    cdef SrcKey *entry
    cdef sa_family_t family
    if namelen < sizeof(sa_family_t):
        return None
    family = (<const sockaddr *>name).sa_family
    if family == AF_INET and namelen >= sizeof(sockaddr_in):
        keylen = V4_KEY_LEN
    elif family == AF_INET6 and namelen >= sizeof(sockaddr_in6):
        keylen = sizeof(sockaddr_in6)
    else:
        return sockaddr_to_address(name, namelen)
    entry = &cache.keys[cache.last]
    if entry.length == keylen and memcmp(entry.key, name, keylen) == 0:
        return tuples[cache.last]
    slot = _fnv1a(name, keylen) & (SRC_SLOTS - 1)
    entry = &cache.keys[slot]
    if not (entry.length == keylen and memcmp(entry.key, name, keylen) == 0):
        tuples[slot] = sockaddr_to_address(name, namelen)
        memcpy(entry.key, name, keylen)
        entry.length = keylen
    cache.last = slot
    return tuples[slot]


# The receive side of a recvmmsg batch, allocated once per socket: datagram j lands in slot j
# (max_datagram bytes) of buf, through message header msgs[j] and its one iovec iov[j]; its
# source sockaddr in names[j].
cdef struct RecvBuffers:
    mmsghdr *msgs
    iovec *iov
    sockaddr_storage *names
    char *buf
    Py_ssize_t size             # datagrams per batch
    Py_ssize_t max_datagram     # bytes per slot


cdef inline int recv_buffers_alloc(RecvBuffers *rx, Py_ssize_t size,
                                   Py_ssize_t max_datagram) except -1:
    """Allocate and link the buffers, or MemoryError; recv_buffers_free frees them (also
    after a MemoryError)."""
    cdef Py_ssize_t j
    rx.size = size
    rx.max_datagram = max_datagram
    rx.msgs = <mmsghdr *>calloc(size, sizeof(mmsghdr))
    rx.iov = <iovec *>calloc(size, sizeof(iovec))
    rx.names = <sockaddr_storage *>calloc(size, sizeof(sockaddr_storage))
    rx.buf = <char *>malloc(size * max_datagram)
    if rx.msgs == NULL or rx.iov == NULL or rx.names == NULL or rx.buf == NULL:
        raise MemoryError()
    for j in range(size):
        rx.iov[j].iov_base = rx.buf + j * max_datagram
        rx.iov[j].iov_len = max_datagram
        rx.msgs[j].msg_hdr.msg_name = &rx.names[j]
        rx.msgs[j].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
        rx.msgs[j].msg_hdr.msg_iov = &rx.iov[j]
        rx.msgs[j].msg_hdr.msg_iovlen = 1
    return 0


cdef inline void recv_buffers_free(RecvBuffers *rx) noexcept nogil:
    free(rx.msgs)
    free(rx.iov)
    free(rx.names)
    free(rx.buf)


cdef inline void recv_buffers_ready(RecvBuffers *rx) noexcept nogil:
    """Before each recvmmsg: every source sockaddr buffer back to its full size."""
    cdef Py_ssize_t j
    for j in range(rx.size):
        rx.msgs[j].msg_hdr.msg_namelen = sizeof(sockaddr_storage)


cdef inline tuple received(RecvBuffers *rx, Py_ssize_t j, SrcCache *cache, list tuples):
    """Datagram j of the last recvmmsg as (data, address), the way recvfrom gives them;
    the address comes from cached_address with cache and tuples."""
    return (PyBytes_FromStringAndSize(rx.buf + j * rx.max_datagram, rx.msgs[j].msg_len),
            cached_address(cache, tuples, <const unsigned char *>&rx.names[j],
                           rx.msgs[j].msg_hdr.msg_namelen))
