"""Pure-Python twin of `_batch.pyx`: the same batch socket over recvfrom/sendto loops.

Keep the two files in step: the same tests run against both (tests/conftest.py `batch`).
Works on any platform; `_batch.pyx` (recvmmsg/sendmmsg) is Linux only.
"""

import errno
import socket as _socket
import struct
import sys
import threading

from ._addr_py import (  # noqa: F401 - MAX_* are this module's constants too
    GSO_MAX_BYTES,
    GSO_MAX_SEGMENTS,
    MAX_BATCH_SIZE,
    MAX_DATAGRAM,
    MAX_FLOWINFO,
    RECV_TOO_BIG as _RECV_TOO_BIG,
    SOL_UDP,
    UDP_GRO,
    UDP_SEGMENT,
    batch_args,
    check_address,
    has_udp_segment,
    turn_on_udp_gro,
)

# Destination address cache: cleared (between calls) once it holds more entries.
DEST_CACHE_MAX = 8192

# Room for one UDP_GRO control message (a 16-bit segment size).
_GRO_ANCBUF = _socket.CMSG_SPACE(4) if hasattr(_socket, "CMSG_SPACE") else 0
_MSG_TRUNC = getattr(_socket, "MSG_TRUNC", 0)

# send errors that stop the batch, leaving the rest to the caller.
_SEND_STOP = frozenset(e for e in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS))
# send errors about the socket itself rather than one datagram: raised.
_SEND_FATAL = frozenset((errno.EBADF, errno.ENOTSOCK, errno.EFAULT))


def _send_stops(exc):
    """After a send failed: True if the socket takes no more now (a full buffer), False if
    only what was sent was refused; raises exc again if the socket itself is gone."""
    if exc.errno in _SEND_STOP:
        return True
    if exc.errno in _SEND_FATAL:
        raise exc
    return False


def _sendto_address(family, addr):
    """The address to give sendto for a destination tuple, or ValueError.

    Same rules as `address_to_sockaddr` (_sockaddr.pxd) in _batch.pyx, with True and False
    taken as ports 1 and 0 like sendto does: see `check_address` in _addr_py.py. On
    AF_INET6 an IPv4 literal becomes its IPv4-mapped address "::ffff:a.b.c.d".
    """
    host, port, flowinfo, scope_id, _ = check_address(family, addr, allow_bool=True)
    if family == _socket.AF_INET:
        return (host, port)
    return (host, port, flowinfo, scope_id)


def _check_data(data):
    try:
        memoryview(data)
    except TypeError:
        raise TypeError(f"datagram must be a bytes-like object, "
                        f"not {type(data).__name__}") from None


class BatchSocket:
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
        gro=True, where the kernel has UDP_GRO and max_datagram is 65535), which recv_batch
        cuts apart: a batch may then hold more than batch_size datagrams.
    gso: whether runs of equal-size datagrams to one destination go out as UDP GSO sends
        (asked with gso=True, the default; False where the kernel lacks UDP_SEGMENT, and
        from the first EIO on).

    Read-only counters: recv_calls and send_calls count recv_batch() and send_batch()
    calls; send_errors counts datagrams skipped after a per-datagram error; truncated
    counts received datagrams dropped for being longer than max_datagram; gso_runs counts
    runs of two or more datagrams the kernel took in one GSO send.
    """

    __slots__ = (
        "_sock", "_family", "_batch_size", "_max_datagram", "_recv_calls", "_send_calls",
        "_send_errors", "_truncated", "_pending_error", "_dest_cache", "_rx_lock", "_tx_lock",
        "_gso", "_gso_runs", "_gro",
    )

    def __init__(self, sock, batch_size=32, max_datagram=65535, *, gso=True, gro=False):
        self._family, self._batch_size, self._max_datagram = batch_args(
            sock, batch_size, max_datagram)
        self._sock = sock
        self._recv_calls = 0
        self._send_calls = 0
        self._send_errors = 0
        self._truncated = 0
        self._pending_error = None
        self._dest_cache = {}  # address tuple -> sendto address
        self._rx_lock = threading.Lock()
        self._tx_lock = threading.Lock()
        self._gso = bool(gso) and has_udp_segment(sock)
        self._gso_runs = 0
        self._gro = bool(gro) and self._max_datagram == MAX_DATAGRAM and turn_on_udp_gro(sock)

    batch_size = property(lambda self: self._batch_size)
    max_datagram = property(lambda self: self._max_datagram)
    recv_calls = property(lambda self: self._recv_calls)
    send_calls = property(lambda self: self._send_calls)
    send_errors = property(lambda self: self._send_errors)
    truncated = property(lambda self: self._truncated)
    gso = property(lambda self: self._gso)
    gso_runs = property(lambda self: self._gso_runs)
    gro = property(lambda self: self._gro)

    def fileno(self):
        """The socket's file descriptor (-1 once the caller closed it)."""
        return self._sock.fileno()

    def recv_batch(self):
        """Up to batch_size waiting datagrams as [(data, address)]; [] when none wait."""
        if not self._rx_lock.acquire(blocking=False):
            raise RuntimeError("BatchSocket.recv_batch called from two threads at once")
        try:
            self._recv_calls += 1
            if self._pending_error is not None:
                exc, self._pending_error = self._pending_error, None
                raise exc
            out = []
            recvfrom = self._recv_gro if self._gro else self._sock.recvfrom
            limit = self._max_datagram
            # One byte more than the limit tells "fits" from "was cut" (recvfrom truncates).
            bufsize = limit + 1
            for _ in range(self._batch_size):
                try:
                    data, addr = recvfrom(bufsize)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _RECV_TOO_BIG:
                        self._truncated += 1
                        continue
                    if out:  # like recvmmsg: return what arrived, report the error next call
                        self._pending_error = exc
                        break
                    raise
                if len(data) > limit:
                    self._truncated += 1
                    continue
                if type(data) is list:  # coalesced by UDP GRO
                    out.extend((segment, addr) for segment in data)
                else:
                    out.append((data, addr))
            return out
        finally:
            self._rx_lock.release()

    def _recv_gro(self, bufsize):
        """recvfrom for a socket with UDP_GRO: (data, address), data a list of the datagrams
        when the kernel handed several over as one buffer."""
        data, ancdata, flags, addr = self._sock.recvmsg(bufsize, _GRO_ANCBUF)
        segment = 0
        for level, kind, value in ancdata:
            if level == SOL_UDP and kind == UDP_GRO and len(value) >= 2:
                segment = int.from_bytes(value[:2], sys.byteorder)
        if flags & _MSG_TRUNC:
            return b"\0" * bufsize, addr  # counted in truncated by the caller
        if 0 < segment < len(data):
            return [data[i:i + segment] for i in range(0, len(data), segment)], addr
        return data, addr

    def send_batch(self, datagrams):
        """Send [(data, address)] in order; returns how many entries were consumed."""
        if not self._tx_lock.acquire(blocking=False):
            raise RuntimeError("BatchSocket.send_batch called from two threads at once")
        try:
            self._send_calls += 1
            items = datagrams if type(datagrams) in (list, tuple) else tuple(datagrams)
            cache = self._dest_cache
            if len(cache) > DEST_CACHE_MAX:
                cache.clear()
            # Check every entry first, so that a bad one raises before anything is sent.
            for data, addr in items:
                if data.__class__ is not bytes:
                    _check_data(data)
                try:
                    if addr in cache:
                        continue
                except TypeError:
                    raise ValueError(
                        f"address must be a tuple (host, port), not {addr!r}") from None
                cache[addr] = _sendto_address(self._family, addr)
            done = 0
            n = len(items)
            while done < n:
                run = self._run(items, done) if self._gso else 1
                if run > 1:
                    sent = self._send_run(items, done, run, cache[items[done][1]])
                    if sent is None:
                        break
                    done += sent
                    if sent < run:
                        break
                    continue
                sent = self._send_one(*items[done], cache)
                if sent is None:
                    break
                done += 1
            return done
        finally:
            self._tx_lock.release()

    @staticmethod
    def _run(items, start):
        """How many datagrams from items[start] go as one GSO send: consecutive, for one
        destination, all of the first one's size except perhaps a shorter last one."""
        first, addr = items[start]
        size = total = len(first)
        if size == 0:
            return 1
        end = start + 1
        limit = min(len(items), start + GSO_MAX_SEGMENTS)
        while end < limit:
            data, other = items[end]
            length = len(data)
            if (length > size or length == 0 or total + length > GSO_MAX_BYTES
                    or (other is not addr and other != addr)):
                break
            total += length
            end += 1
            if length < size:
                break  # a shorter datagram can only be the last of a run
        return end - start

    def _send_run(self, items, start, run, address):
        """One GSO send of items[start:start + run]; how many datagrams it consumed (sent
        one by one after the kernel refused the run), None if the socket took none now."""
        try:
            self._sock.sendmsg([data for data, _ in items[start:start + run]],
                               [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(items[start][0])))],
                               0, address)
        except OSError as exc:
            if _send_stops(exc):
                return None
            # A GSO run refused (over the path MTU, an old kernel...): one by one.
            if exc.errno == errno.EIO:
                self._gso = False  # no checksum offload for GSO: stop trying
            cache = self._dest_cache
            for k in range(start, start + run):
                if self._send_one(*items[k], cache) is None:
                    return (k - start) or None
            return run
        self._gso_runs += 1
        return run

    def _send_one(self, data, addr, cache):
        """Send one datagram: True sent, False refused on its own (counted), None if the
        socket takes no more now."""
        try:
            self._sock.sendto(data, cache[addr])
        except OSError as exc:
            if _send_stops(exc):
                return None
            # Refused on its own (ECONNREFUSED, EMSGSIZE, ENETUNREACH...): skip it.
            self._send_errors += 1
            return False
        return True
