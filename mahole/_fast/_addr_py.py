"""Checks shared by the batch socket and the relay engine, compiled and pure-Python alike.

Constructor arguments (`batch_args`, `relay_args`) and relay session ids are checked here
for all four modules, so the rules and messages cannot drift apart. `check_address` is the
pure-Python form of `address_to_sockaddr` in _sockaddr.pxd, for the twins: the same rules,
in the same order, with the same messages (tests/test_batch_socket.py and
tests/test_relay_engine.py run both).
"""

import errno
import operator
import socket as _socket

from ._kinds import RELAY_SESSION_ID_LEN

# The kernel caps recvmmsg/sendmmsg vlen at UIO_MAXIOV (1024) without saying so; the twins
# keep the limit.
MAX_BATCH_SIZE = 1024
# Largest UDP payload a 16-bit length field can describe (RFC 768).
MAX_DATAGRAM = 65535
# IPv6 flow label is 20 bits (RFC 8200 §3); Python's sendto enforces the same range.
# == MAX_FLOWINFO in _sockaddr.pxd.
MAX_FLOWINFO = 0xFFFFF

# UDP GSO (Linux 4.18+, UDP_SEGMENT in linux/udp.h): one send of up to 64 datagrams (the
# kernel's UDP_MAX_SEGMENTS before Linux 6.x raised it) and under the 64 KiB IP/UDP length
# limit. == the enums of _batch.pyx and _relay.pyx.
SOL_UDP = 17
UDP_SEGMENT = 103
# UDP GRO (Linux 5.0+): the kernel may hand over datagrams of one sender coalesced in one
# buffer, with their size in a control message of this type.
UDP_GRO = 104
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000

# recv errors meaning "datagram longer than the buffer" (Windows reports, Linux truncates).
RECV_TOO_BIG = frozenset(e for e in (errno.EMSGSIZE, getattr(errno, "WSAEMSGSIZE", None))
                         if e is not None)


def has_udp_segment(sock):
    """Whether the kernel knows UDP_SEGMENT (UDP GSO) for this socket."""
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


def turn_on_udp_gro(sock):
    """Turn UDP_GRO on for the socket; False where the kernel does not know it."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def batch_args(sock, batch_size, max_datagram):
    """BatchSocket's constructor arguments, checked: (family, batch_size, max_datagram)."""
    batch_size, max_datagram = _sizes(batch_size, max_datagram)
    return _socket_family("BatchSocket", sock), batch_size, max_datagram


def relay_args(sock, batch_size, max_datagram, rate_limit_bps, burst_bytes):
    """RelayEngine's constructor arguments, checked:
    (family, batch_size, max_datagram, rate_limit_bps, burst_bytes) with a burst of 0
    under a rate made one second of traffic."""
    batch_size, max_datagram = _sizes(batch_size, max_datagram)
    rate = _non_negative("rate_limit_bps", rate_limit_bps)
    burst = _non_negative("burst_bytes", burst_bytes)
    family = _socket_family("RelayEngine", sock)
    if rate > 0 and burst == 0:
        burst = rate  # one second of traffic
    return family, batch_size, max_datagram, rate, burst


def _sizes(batch_size, max_datagram):
    batch_size = operator.index(batch_size)
    max_datagram = operator.index(max_datagram)
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be 1-{MAX_BATCH_SIZE}, not {batch_size}")
    if not 1 <= max_datagram <= MAX_DATAGRAM:
        raise ValueError(f"max_datagram must be 1-{MAX_DATAGRAM}, not {max_datagram}")
    return batch_size, max_datagram


def _socket_family(owner, sock):
    """The family of a non-blocking AF_INET or AF_INET6 datagram socket, or ValueError."""
    family = sock.family
    if family != _socket.AF_INET and family != _socket.AF_INET6:
        raise ValueError(f"{owner} needs an AF_INET or AF_INET6 socket, not {family!r}")
    if sock.type != _socket.SOCK_DGRAM:
        raise ValueError(f"{owner} needs a SOCK_DGRAM socket, not {sock.type!r}")
    if sock.gettimeout() != 0.0:
        raise ValueError(f"{owner} needs a non-blocking socket (sock.setblocking(False))")
    return int(family)


def _non_negative(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    value = float(value)
    if not (value >= 0 and value != float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
    return value


def session_id(value):
    """The 8 session-id bytes; TypeError / ValueError like mahole.wire.relay.encode_frame."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"session_id must be bytes-like, not {type(value).__name__}")
    sid = bytes(value)
    if len(sid) != RELAY_SESSION_ID_LEN:
        raise ValueError(f"session_id must be {RELAY_SESSION_ID_LEN} bytes, got {len(sid)}")
    return sid


def check_address(family, addr, *, allow_bool):
    """(host, port, flowinfo, scope_id, packed) for a destination tuple, or ValueError.

    AF_INET sockets take (host, port) with an IPv4 literal. AF_INET6 sockets take
    (host, port[, flowinfo[, scope_id]]) with an IPv6 literal, or an IPv4 literal which
    stands for its IPv4-mapped address ::ffff:a.b.c.d (RFC 4291 §2.5.5.2): host is then
    "::ffff:" + the literal. inet_pton decides what a literal is, as in the compiled
    modules; packed is what it made of host (4 bytes on AF_INET, 16 on AF_INET6).
    allow_bool: whether True and False pass as the ints 1 and 0 (as socket.sendto takes
    them) or are refused.
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
    if not _is_int(port, allow_bool) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"address port must be an int 0-65535, not {port!r}")
    flowinfo = scope_id = 0
    if n > 2:
        flowinfo = addr[2]
        if not _is_int(flowinfo, allow_bool) or not 0 <= flowinfo <= MAX_FLOWINFO:
            raise ValueError(f"address flowinfo must be an int 0-{MAX_FLOWINFO}, "
                             f"not {flowinfo!r}")
    if n > 3:
        scope_id = addr[3]
        if not _is_int(scope_id, allow_bool) or not 0 <= scope_id <= 0xFFFFFFFF:
            raise ValueError(f"address scope_id must be an int 0-4294967295, not {scope_id!r}")
    if family == _socket.AF_INET:
        packed = _pton(_socket.AF_INET, host)
        if packed is None:
            raise ValueError(f"address host must be an IPv4 literal on an AF_INET socket, "
                             f"not {host!r}")
        return host, int(port), 0, 0, packed
    packed = _pton(_socket.AF_INET6, host)
    if packed is None:
        v4 = _pton(_socket.AF_INET, host)
        if v4 is None:
            raise ValueError(f"address host must be an IP literal, not {host!r}")
        host = "::ffff:" + host
        packed = b"\0" * 10 + b"\xff\xff" + v4
    return host, int(port), int(flowinfo), int(scope_id), packed


def _is_int(value, allow_bool):
    return isinstance(value, int) and (allow_bool or not isinstance(value, bool))


def _pton(family, host):
    try:
        return _socket.inet_pton(family, host)
    except (OSError, ValueError):
        return None
