"""Loopback UDP helpers shared by the socket tests (test_batch_socket.py, test_relay_engine.py).

Nothing sleeps: waits are select() on a file descriptor with a deadline. A host that cannot
bind what a test needs (no IPv6, no dual-stack socket) skips the test instead of failing it.
"""

import contextlib
import select
import socket
import time

import pytest

DEADLINE = 5.0  # seconds; loopback delivery is immediate, this only bounds a failure


def udp(family, host, port=0):
    """A non-blocking UDP socket bound to (host, port); skips the test if it cannot bind."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        pytest.skip(f"cannot bind UDP {host}: {exc}")
    sock.setblocking(False)
    return sock


def loopback(family):
    return "127.0.0.1" if family == socket.AF_INET else "::1"


@contextlib.contextmanager
def socket_factory():
    """make(family=AF_INET, host=loopback) -> a non-blocking bound UDP socket; every socket
    made is closed on leaving. The body of each test module's `sockets` fixture."""
    made = []

    def make(family=socket.AF_INET, host=None):
        if host is None:
            host = loopback(family)
        if family == socket.AF_INET6 and not socket.has_ipv6:
            pytest.skip("no IPv6")
        sock = udp(family, host)
        made.append(sock)
        return sock

    try:
        yield make
    finally:
        for sock in made:
            sock.close()


def dual_stack():
    """A non-blocking AF_INET6 UDP socket on [::] that IPv4 peers reach too (they appear as
    ::ffff:a.b.c.d); the caller closes it. Skips the test where there is no such socket."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
    except OSError as exc:
        sock.close()
        pytest.skip(f"no dual-stack socket: {exc}")
    sock.setblocking(False)
    return sock


def wait_until(done, step, fd, timeout=DEADLINE):
    """Call step() until done() is true or timeout seconds passed. A step that returns
    something false found nothing to do: then wait (select) until fd is readable."""
    deadline = time.monotonic() + timeout
    while not done():
        if step():
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        select.select([fd], [], [], remaining)


def assert_refuses_unsuitable_sockets(construct):
    """construct(sock) refuses a blocking UDP socket and a TCP socket with ValueError."""
    blocking = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setblocking(False)
    try:
        with pytest.raises(ValueError, match="non-blocking"):
            construct(blocking)
        with pytest.raises(ValueError, match="SOCK_DGRAM"):
            construct(tcp)
    finally:
        blocking.close()
        tcp.close()
