"""BatchSocket: batches of datagrams through real loopback sockets, both twins.

Every test taking `batch` runs against the compiled recvmmsg/sendmmsg module (Linux) and
the pure-Python twin. Nothing sleeps: waits are select()/poll() on the fd with a deadline.
"""

import errno
import select
import sys
import socket
import time

import pytest
from udp_helpers import (
    DEADLINE,
    assert_refuses_unsuitable_sockets,
    dual_stack,
    loopback,
    socket_factory,
    udp,
    wait_until,
)

from mahole._fast import _batch_py


@pytest.fixture
def sockets():
    """Factory for non-blocking UDP sockets bound to loopback, closed after the test."""
    with socket_factory() as make:
        yield make


@pytest.fixture(params=[socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def family(request):
    if request.param == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6")
    return request.param


def closed_port_address(family):
    """A loopback address nothing listens on (bound, noted, closed)."""
    sock = udp(family, loopback(family))
    addr = sock.getsockname()
    sock.close()
    return addr


def recv_n(bsock, n, timeout=DEADLINE):
    """Call recv_batch until n datagrams arrived or the deadline passed; returns the batches."""
    batches = []

    def step():
        batch = bsock.recv_batch()
        if batch:
            batches.append(batch)
        return batch

    wait_until(lambda: sum(map(len, batches)) >= n, step, bsock.fileno(), timeout)
    return batches


def flat(batches):
    return [item for batch in batches for item in batch]


def wait_socket_error(sock):
    """Wait until the kernel has queued an error (an ICMP report) on sock."""
    if not hasattr(select, "poll"):
        pytest.skip("needs select.poll")
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLERR)
    assert poller.poll(DEADLINE * 1000), "no ICMP error was reported on the socket"


def payload(i, size):
    return bytes((i + k) & 0xFF for k in range(size))


# --- round trips -------------------------------------------------------------------------

SIZES = [0, 1, 20, 1200, 1201, 1500, 9000, 60000]


def test_batch_roundtrip_contents_order_and_source(batch, sockets, family):
    rx, tx = sockets(family), sockets(family)
    receiver, sender = batch.BatchSocket(rx), batch.BatchSocket(tx)
    datagrams = [(payload(i, size), rx.getsockname()) for i, size in enumerate(SIZES)]

    assert sender.send_batch(datagrams) == len(datagrams)

    got = flat(recv_n(receiver, len(datagrams)))
    assert [data for data, _ in got] == [data for data, _ in datagrams]
    assert all(type(data) is bytes for data, _ in got)
    assert [addr for _, addr in got] == [tx.getsockname()] * len(datagrams)
    assert len(got[0][1]) == (2 if family == socket.AF_INET else 4)
    assert receiver.recv_batch() == []
    assert sender.send_errors == 0 and receiver.truncated == 0


def test_gso_runs_arrive_as_the_same_datagrams(batch, sockets, family):
    """Runs of equal-size datagrams to one address go out as UDP GSO sends (a shorter one may
    end a run); what arrives is the same datagrams in the same order, whatever the grouping."""
    rx, rx2, tx = sockets(family), sockets(family), sockets(family)
    receiver, receiver2 = batch.BatchSocket(rx, batch_size=256), batch.BatchSocket(rx2)
    sender = batch.BatchSocket(tx, batch_size=128)
    a, b = rx.getsockname(), rx2.getsockname()
    sizes = [1200] * 70 + [700] + [1200] * 3 + [1500, 0, 0, 1200, 1200]
    to_a = [(payload(i, size), a) for i, size in enumerate(sizes)]
    to_b = [(payload(i, 1200), b) for i in range(3)]
    datagrams = to_a[:40] + to_b[:2] + to_a[40:] + to_b[2:]

    assert sender.send_batch(datagrams) == len(datagrams)

    assert flat(recv_n(receiver, len(to_a))) == [(d, tx.getsockname()) for d, _ in to_a]
    assert flat(recv_n(receiver2, len(to_b))) == [(d, tx.getsockname()) for d, _ in to_b]
    assert sender.send_errors == 0
    if sender.gso:
        assert sender.gso_runs >= 3  # 40, then 30 + the 700, then 3 (64-segment cap), ...
    else:
        assert sender.gso_runs == 0


def test_gro_hands_over_coalesced_datagrams_one_by_one(batch, sockets, family):
    """With UDP GRO the kernel may pass a GSO run on as one buffer (it does on loopback):
    recv_batch gives the same datagrams as without it, in order, from the same address."""
    rx, tx = sockets(family), sockets(family)
    receiver = batch.BatchSocket(rx, batch_size=4, gro=True)
    sender = batch.BatchSocket(tx)
    sizes = [1200] * 50 + [333] + [1200] * 30 + [9000, 1, 0]
    datagrams = [(payload(i, size), rx.getsockname()) for i, size in enumerate(sizes)]
    assert sender.send_batch(datagrams) == len(datagrams)
    batches = recv_n(receiver, len(datagrams))
    assert flat(batches) == [(d, tx.getsockname()) for d, _ in datagrams]
    assert receiver.recv_batch() == [] and receiver.truncated == 0
    if receiver.gro and sender.gso:
        assert max(map(len, batches)) > 4  # coalesced: more datagrams than messages


def test_gro_needs_full_size_buffers(batch, sockets, family):
    # A coalesced buffer can be 64 KiB: a smaller max_datagram would cut it, so no GRO.
    assert not batch.BatchSocket(sockets(family), max_datagram=2048, gro=True).gro
    assert not batch.BatchSocket(sockets(family)).gro


def test_gso_can_be_turned_off(batch, sockets, family):
    rx, tx = sockets(family), sockets(family)
    receiver, sender = batch.BatchSocket(rx), batch.BatchSocket(tx, gso=False)
    datagrams = [(payload(i, 1200), rx.getsockname()) for i in range(10)]
    assert not sender.gso
    assert sender.send_batch(datagrams) == 10
    assert flat(recv_n(receiver, 10)) == [(d, tx.getsockname()) for d, _ in datagrams]
    assert sender.gso_runs == 0


def test_zero_byte_datagrams_round_trip(batch, sockets, family):
    rx, tx = sockets(family), sockets(family)
    receiver, sender = batch.BatchSocket(rx), batch.BatchSocket(tx)
    assert sender.send_batch([(b"", rx.getsockname())] * 3) == 3
    got = flat(recv_n(receiver, 3))
    assert got == [(b"", tx.getsockname())] * 3


def test_addresses_match_recvfrom(batch, sockets, family):
    rx, tx = sockets(family), sockets(family)
    receiver = batch.BatchSocket(rx, batch_size=1)
    tx.sendto(b"one", rx.getsockname())
    tx.sendto(b"two", rx.getsockname())
    (first,) = flat(recv_n(receiver, 1))
    select.select([rx], [], [], DEADLINE)
    data, addr = rx.recvfrom(100)
    assert (first[0], data) == (b"one", b"two")
    assert first[1] == addr
    assert type(first[1]) is tuple and [type(x) for x in first[1]] == [type(x) for x in addr]


def test_reply_to_received_addresses(batch, sockets, family):
    """What recv_batch returns as an address is accepted by send_batch as-is."""
    server, client = sockets(family), sockets(family)
    bserver, bclient = batch.BatchSocket(server), batch.BatchSocket(client)
    bclient.send_batch([(b"ping%d" % i, server.getsockname()) for i in range(5)])
    requests = flat(recv_n(bserver, 5))
    assert bserver.send_batch([(data.replace(b"ping", b"pong"), addr)
                               for data, addr in requests]) == 5
    replies = flat(recv_n(bclient, 5))
    assert [data for data, _ in replies] == [b"pong%d" % i for i in range(5)]
    assert {addr for _, addr in replies} == {server.getsockname()}


def test_bytes_like_data_is_sent(batch, sockets):
    rx, tx = sockets(), sockets()
    receiver, sender = batch.BatchSocket(rx), batch.BatchSocket(tx)
    dest = rx.getsockname()
    buf = bytearray(b"xxmemoryviewxx")
    assert sender.send_batch([(bytearray(b"bytearray"), dest), (memoryview(buf)[2:-2], dest)]) == 2
    assert [data for data, _ in flat(recv_n(receiver, 2))] == [b"bytearray", b"memoryview"]


# --- IPv4 on an IPv6 socket -----------------------------------------------------------------


def test_ipv4_peer_on_ipv6_socket_appears_mapped(batch, sockets):
    dual = dual_stack()
    try:
        v4 = sockets(socket.AF_INET)
        receiver = batch.BatchSocket(dual)
        v4.sendto(b"hello", ("127.0.0.1", dual.getsockname()[1]))
        got = flat(recv_n(receiver, 1))
        assert got == [(b"hello", ("::ffff:127.0.0.1", v4.getsockname()[1], 0, 0))]
    finally:
        dual.close()


def test_ipv6_socket_sends_to_ipv4_literals_via_mapped_address(batch, sockets):
    dual = dual_stack()
    try:
        v4 = sockets(socket.AF_INET)
        sender, receiver = batch.BatchSocket(dual), batch.BatchSocket(v4)
        port = v4.getsockname()[1]
        assert sender.send_batch([(b"plain", ("127.0.0.1", port)),
                                  (b"mapped", ("::ffff:127.0.0.1", port, 0, 0))]) == 2
        got = flat(recv_n(receiver, 2))
        assert got == [(b"plain", ("127.0.0.1", dual.getsockname()[1])),
                       (b"mapped", ("127.0.0.1", dual.getsockname()[1]))]
    finally:
        dual.close()


# --- batching --------------------------------------------------------------------------------


def test_recv_on_empty_socket_returns_empty_list_at_once(batch, sockets, family):
    bsock = batch.BatchSocket(sockets(family))
    started = time.monotonic()
    assert bsock.recv_batch() == []
    assert bsock.recv_batch() == []
    assert time.monotonic() - started < 1.0
    assert bsock.recv_calls == 2


def test_batch_size_is_honoured_and_everything_arrives(batch, sockets):
    rx, tx = sockets(), sockets()
    receiver = batch.BatchSocket(rx, batch_size=8)
    sender = batch.BatchSocket(tx, batch_size=8)
    assert receiver.batch_size == 8
    datagrams = [(b"%03d" % i, rx.getsockname()) for i in range(100)]

    assert sender.send_batch(datagrams) == 100  # more than batch_size: sent in chunks

    batches = recv_n(receiver, 100)
    assert all(1 <= len(b) <= 8 for b in batches)
    assert max(len(b) for b in batches) == 8  # batches really fill up
    assert [data for data, _ in flat(batches)] == [data for data, _ in datagrams]
    assert receiver.recv_calls >= 13  # at least ceil(100 / 8) calls returned data
    assert sender.send_calls == 1


def test_send_batch_of_nothing(batch, sockets):
    bsock = batch.BatchSocket(sockets())
    assert bsock.send_batch([]) == 0
    assert bsock.send_calls == 1


def test_send_batch_accepts_any_iterable(batch, sockets):
    rx, tx = sockets(), sockets()
    receiver, sender = batch.BatchSocket(rx), batch.BatchSocket(tx)
    assert sender.send_batch((b"%d" % i, rx.getsockname()) for i in range(3)) == 3
    assert [d for d, _ in flat(recv_n(receiver, 3))] == [b"0", b"1", b"2"]


# --- errors ----------------------------------------------------------------------------------


def test_send_to_closed_port_does_not_fail_the_batch(batch, sockets, family):
    rx, tx = sockets(family), sockets(family)
    receiver, sender = batch.BatchSocket(rx), batch.BatchSocket(tx)
    closed, good = closed_port_address(family), rx.getsockname()

    n = sender.send_batch([(b"a", closed), (b"b", good), (b"c", closed), (b"d", good)])

    assert n == 4
    assert [d for d, _ in flat(recv_n(receiver, 2))] == [b"b", b"d"]


def test_refused_datagram_is_skipped_and_counted(batch, sockets):
    """On a connected socket an ICMP port-unreachable makes the next send fail
    (ECONNREFUSED); that datagram is skipped and counted, the rest still go out."""
    rx, tx = sockets(), sockets()
    closed = closed_port_address(socket.AF_INET)
    tx.connect(closed)
    receiver, sender = batch.BatchSocket(rx), batch.BatchSocket(tx)
    assert sender.send_batch([(b"probe", closed)]) == 1
    wait_socket_error(tx)

    n = sender.send_batch([(b"first", rx.getsockname()), (b"second", rx.getsockname())])

    assert n == 2
    assert sender.send_errors == 1
    assert [d for d, _ in flat(recv_n(receiver, 1))] == [b"second"]


def test_oversized_datagram_is_skipped_and_counted(batch, sockets):
    rx, tx = sockets(), sockets()
    receiver, sender = batch.BatchSocket(rx), batch.BatchSocket(tx)
    dest = rx.getsockname()
    too_big = bytes(65508)  # over the IPv4 UDP payload limit of 65507: EMSGSIZE

    assert sender.send_batch([(b"before", dest), (too_big, dest), (b"after", dest)]) == 3

    assert sender.send_errors == 1
    assert [d for d, _ in flat(recv_n(receiver, 2))] == [b"before", b"after"]


def test_pending_icmp_error_is_raised_by_recv(batch, sockets):
    tx = sockets()
    closed = closed_port_address(socket.AF_INET)
    tx.connect(closed)
    bsock = batch.BatchSocket(tx)
    bsock.send_batch([(b"probe", closed)])
    wait_socket_error(tx)
    with pytest.raises(ConnectionRefusedError):
        bsock.recv_batch()
    assert bsock.recv_batch() == []  # the error was reported once


BAD_IPV4 = [
    ("localhost", 9),
    ("example.com", 9),
    ("", 9),
    ("<broadcast>", 9),
    ("1.2.3", 9),
    ("1.2.3.4 ", 9),
    ("1.2.3.4\0", 9),
    ("::1", 9),
    (b"1.2.3.4", 9),
    ("1.2.3.4", 65536),
    ("1.2.3.4", -1),
    ("1.2.3.4", "9"),
    ("1.2.3.4", 9, 0, 0),
    ("1.2.3.4",),
    ["1.2.3.4", 9],
    ("1.2.3.4", [9]),
    "1.2.3.4:9",
    None,
]
BAD_IPV6 = [
    ("localhost", 9),
    ("::1%lo", 9, 0, 0),
    ("fe80::1%1", 9),
    (":::1", 9),
    ("::1", 9, 1 << 20, 0),
    ("::1", 9, 0, 1 << 32),
    ("::1", 9, 0, -1),
    ("::1", 9, 0, 0, 0),
    ("::1", 70000),
    ("1.2.3.4.5", 9),
]


@pytest.mark.parametrize("bad", BAD_IPV4, ids=repr)
def test_bad_ipv4_address_raises_value_error_before_sending(batch, sockets, bad):
    rx, tx = sockets(), sockets()
    receiver, sender = batch.BatchSocket(rx), batch.BatchSocket(tx)
    with pytest.raises(ValueError):
        sender.send_batch([(b"good", rx.getsockname()), (b"bad", bad)])
    # Nothing of the failed call went out: the next datagram to arrive is the marker.
    assert sender.send_batch([(b"marker", rx.getsockname())]) == 1
    assert [d for d, _ in flat(recv_n(receiver, 1))] == [b"marker"]


@pytest.mark.parametrize("bad", BAD_IPV6, ids=repr)
def test_bad_ipv6_address_raises_value_error(batch, sockets, bad):
    bsock = batch.BatchSocket(sockets(socket.AF_INET6))
    with pytest.raises(ValueError):
        bsock.send_batch([(b"bad", bad)])


def test_bad_data_raises_type_error(batch, sockets):
    rx, tx = sockets(), sockets()
    sender = batch.BatchSocket(tx)
    for bad in ("text", 5, None, [1, 2]):
        with pytest.raises(TypeError):
            sender.send_batch([(b"ok", rx.getsockname()), (bad, rx.getsockname())])
    assert batch.BatchSocket(rx).recv_batch() == []


def test_malformed_entries_raise(batch, sockets):
    sender = batch.BatchSocket(sockets())
    with pytest.raises((TypeError, ValueError)):
        sender.send_batch([b"no address"])
    with pytest.raises(TypeError):
        sender.send_batch(None)


def test_closed_socket_raises_oserror(batch):
    sock = udp(socket.AF_INET, "127.0.0.1")
    dest = sock.getsockname()
    bsock = batch.BatchSocket(sock)
    sock.close()
    assert bsock.fileno() == -1
    with pytest.raises(OSError) as info:
        bsock.recv_batch()
    assert info.value.errno == errno.EBADF
    with pytest.raises(OSError) as info:
        bsock.send_batch([(b"x", dest)])
    assert info.value.errno == errno.EBADF


# --- truncation --------------------------------------------------------------------------------


def test_datagram_longer_than_max_datagram_is_dropped_and_counted(batch, sockets, family):
    """A datagram longer than max_datagram never arrives cut short: it is dropped, counted
    in `truncated`, and the datagrams around it still arrive in order."""
    rx, tx = sockets(family), sockets(family)
    receiver = batch.BatchSocket(rx, batch_size=4, max_datagram=1200)
    sender = batch.BatchSocket(tx)
    sizes = [10, 1199, 1200, 1201, 20, 5000, 1200, 0]
    sender.send_batch([(payload(i, s), rx.getsockname()) for i, s in enumerate(sizes)])
    kept = [payload(i, s) for i, s in enumerate(sizes) if s <= 1200]

    got = flat(recv_n(receiver, len(kept)))

    assert [d for d, _ in got] == kept
    assert receiver.truncated == 2
    assert receiver.recv_batch() == []


# --- construction ------------------------------------------------------------------------------


def test_constructor_rejects_bad_arguments(batch, sockets):
    sock = sockets()
    for kwargs in ({"batch_size": 0}, {"batch_size": 1025}, {"max_datagram": 0},
                   {"max_datagram": 65536}):
        with pytest.raises(ValueError):
            batch.BatchSocket(sock, **kwargs)
    with pytest.raises(TypeError):
        batch.BatchSocket(sock, batch_size=2.5)
    assert_refuses_unsuitable_sockets(batch.BatchSocket)


def test_attributes_are_readonly(batch, sockets):
    sock = sockets()
    bsock = batch.BatchSocket(sock, batch_size=3, max_datagram=1500)
    assert (bsock.batch_size, bsock.max_datagram) == (3, 1500)
    assert bsock.fileno() == sock.fileno()
    for name in ("batch_size", "max_datagram", "recv_calls", "send_calls", "send_errors",
                 "truncated"):
        assert getattr(bsock, name) >= 0
        with pytest.raises(AttributeError):
            setattr(bsock, name, 7)


def test_module_constants_agree(batch):
    assert batch.MAX_BATCH_SIZE == _batch_py.MAX_BATCH_SIZE == 1024
    assert batch.MAX_DATAGRAM == _batch_py.MAX_DATAGRAM == 65535


# --- twin-only: errors loopback cannot produce on demand ------------------------------------------


class _ScriptedSocket:
    """Stands in for a socket: sendto/recvfrom follow a script of results and errors."""

    family = socket.AF_INET
    type = socket.SOCK_DGRAM

    def __init__(self, sends=(), recvs=()):
        self.sends, self.recvs, self.sent = list(sends), list(recvs), []

    def gettimeout(self):
        return 0.0

    def getsockopt(self, level, option):
        raise OSError(errno.ENOPROTOOPT, "no such option")  # no UDP GSO here

    def fileno(self):
        return 99

    def sendto(self, data, addr):
        outcome = self.sends.pop(0) if self.sends else None
        if isinstance(outcome, BaseException):
            raise outcome
        self.sent.append((data, addr))
        return len(data)

    def recvfrom(self, bufsize):
        outcome = self.recvs.pop(0) if self.recvs else BlockingIOError(errno.EAGAIN, "again")
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


@pytest.mark.parametrize("stop", [BlockingIOError(errno.EAGAIN, "again"),
                                  OSError(errno.ENOBUFS, "no buffer space")])
def test_twin_send_stops_at_eagain_and_enobufs(stop):
    sock = _ScriptedSocket(sends=[None, ConnectionRefusedError(errno.ECONNREFUSED, "x"), None, stop])
    bsock = _batch_py.BatchSocket(sock)
    items = [(b"%d" % i, ("10.0.0.1", 9)) for i in range(6)]
    n = bsock.send_batch(items)
    assert n == 3  # consumed: 0 sent, 1 refused (skipped), 2 sent; 3 hit the stop
    assert [d for d, _ in sock.sent] == [b"0", b"2"]
    assert bsock.send_errors == 1
    assert items[n:] == items[3:]  # what the caller keeps for later


def test_twin_recv_error_after_data_is_raised_next_call():
    sock = _ScriptedSocket(recvs=[(b"a", ("10.0.0.1", 9)),
                                  ConnectionRefusedError(errno.ECONNREFUSED, "x")])
    bsock = _batch_py.BatchSocket(sock)
    assert bsock.recv_batch() == [(b"a", ("10.0.0.1", 9))]
    with pytest.raises(ConnectionRefusedError):
        bsock.recv_batch()
    assert bsock.recv_batch() == []


def test_twin_send_fatal_socket_error_raises():
    sock = _ScriptedSocket(sends=[OSError(errno.EBADF, "bad fd")])
    with pytest.raises(OSError):
        _batch_py.BatchSocket(sock).send_batch([(b"x", ("10.0.0.1", 9))])


class _ScriptedGsoSocket(_ScriptedSocket):
    """A scripted socket whose kernel knows UDP GSO: sendmsg follows its own script."""

    def __init__(self, sends=(), gso_sends=()):
        super().__init__(sends=sends)
        self.gso_sends, self.runs = list(gso_sends), []

    def getsockopt(self, level, option):
        return 0

    def sendmsg(self, buffers, ancdata, flags, addr):
        outcome = self.gso_sends.pop(0) if self.gso_sends else None
        if isinstance(outcome, BaseException):
            raise outcome
        self.runs.append((list(buffers), ancdata, addr))
        return sum(map(len, buffers))


@pytest.mark.parametrize("refusal", [errno.EIO, errno.EMSGSIZE, errno.EINVAL])
def test_twin_refused_gso_run_goes_one_by_one(refusal):
    sock = _ScriptedGsoSocket(gso_sends=[OSError(refusal, "refused")])
    bsock = _batch_py.BatchSocket(sock)
    datagrams = [(payload(i, 100), ("10.0.0.1", 9)) for i in range(5)]
    assert bsock.gso
    assert bsock.send_batch(datagrams) == 5
    assert sock.sent == datagrams and sock.runs == []
    # EIO: the device cannot checksum GSO sends, so GSO stays off; other refusals are per run.
    assert bsock.gso == (refusal != errno.EIO)
    assert bsock.send_batch(datagrams) == 5
    assert len(sock.runs) == (0 if refusal == errno.EIO else 1)


def test_twin_gso_run_stops_at_eagain():
    sock = _ScriptedGsoSocket(gso_sends=[None, BlockingIOError(errno.EAGAIN, "again")])
    bsock = _batch_py.BatchSocket(sock)
    datagrams = [(payload(i, 100), ("10.0.0.1", 9)) for i in range(3)]
    datagrams += [(payload(i, 50), ("10.0.0.2", 9)) for i in range(3)]
    assert bsock.send_batch(datagrams) == 3  # the first run; the second waits
    assert [buffers for buffers, _, _ in sock.runs] == [[d for d, _ in datagrams[:3]]]
    assert sock.runs[0][1] == [(socket.SOL_UDP, 103, (100).to_bytes(2, sys.byteorder))]
    assert bsock.gso_runs == 1
