"""UDP helpers for lab tests: wait on select() deadlines, never on sleeps."""

import itertools
import os
import select
import time

_tokens = itertools.count(1)


def token(label="t"):
    """A payload unique within this run (no spaces: the reflector splits on them)."""
    return f"{label}-{os.getpid()}-{next(_tokens)}".encode()


def late_answer(data, addr=None):
    """True for a reflector's answer (``TOKEN IP:PORT``): after request() resent, the answers
    to earlier copies may still arrive. Test payloads carry no space, so they never match."""
    return b" " in data


def recv(sock, timeout, *, match=None):
    """The next datagram `(data, addr)` on `sock` within `timeout` seconds (for which
    `match(data, addr)` is true, if given; others are discarded), or None."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        readable, _, _ = select.select([sock], [], [], left)
        if not readable:
            return None
        data, addr = sock.recvfrom(65535)
        if match is None or match(data, addr):
            return data, addr


def nothing_pending(sock):
    """True when no datagram is queued on `sock` right now."""
    readable, _, _ = select.select([sock], [], [], 0)
    return not readable


def request(sock, addr, payload, *, timeout=2.0, resend=0.25):
    """Send `payload` to `addr` until a reply starting with it arrives; return `(data, src)`.

    Resends every `resend` seconds (bounded by `timeout`); raise TimeoutError without a reply.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no reply from {addr[0]}:{addr[1]} within {timeout}s")
        sock.sendto(payload, addr)
        got = recv(sock, min(resend, left), match=lambda data, src: data.split(b" ")[0] == payload)
        if got is not None:
            return got


def mapped_address(sock, reflector_addr, *, timeout=2.0):
    """The source address `reflector_addr` (a lab Reflector's .addr) observed for `sock`."""
    data, _ = request(sock, reflector_addr, token("map"), timeout=timeout)
    ip, port = data.split(b" ")[1].decode().rsplit(":", 1)
    return ip, int(port)


def wait_until(predicate, timeout, *, interval=0.01):
    """Poll `predicate` until true (return True) or `timeout` seconds pass (return False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
