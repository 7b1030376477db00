# C declarations shared by the Linux socket modules of mahole._fast (`_relay.pyx`):
# errno, sockaddr/msghdr/mmsghdr, recvmmsg/sendmmsg, inet_pton/ntop, clock_gettime, UDP GSO.
# Declarations only: nothing here is compiled on its own. `_batch.pyx` predates this file and
# still carries its own copy of the same declarations.

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
