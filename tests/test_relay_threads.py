"""RelayEngine with worker sockets (relay threads), on real loopback sockets, both twins.

The compiled engine reads each worker socket in a thread of its own with the GIL released;
the pure-Python twin reads them in poll(). Both must relay, check and count alike, and hand
what is not a relay frame back through poll(). Tests drive the engine the way the
intermediate's event loop does: poll() whenever the main socket or one of reader_fds() is
readable. Waits are select() with a deadline; nothing sleeps and hopes.
"""

import gc
import os
import select
import socket
import time

import pytest
from udp_helpers import DEADLINE, socket_factory

from mahole.wire.relay import encode_frame

SID = bytes.fromhex("0123456789abcdef")
TOKEN_A = bytes.fromhex("a1a2a3a4a5a6a7a8")
TOKEN_B = bytes.fromhex("b1b2b3b4b5b6b7b8")
STUN = bytes.fromhex("000100002112a442") + bytes(12)  # a Binding request header


@pytest.fixture
def sockets():
    with socket_factory() as make:
        yield make


def reuseport_group(n, host="127.0.0.1"):
    """n non-blocking UDP sockets bound to one address with SO_REUSEPORT."""
    socks = []
    port = 0
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.setblocking(False)
            port = sock.getsockname()[1]
    except OSError as exc:
        for sock in socks:
            sock.close()
        pytest.skip(f"no SO_REUSEPORT: {exc}")
    return socks


class Driven:
    """An engine polled as the intermediate polls it, until a condition holds."""

    def __init__(self, engine):
        self.engine = engine
        self.returned = []

    def until(self, done, timeout=DEADLINE, also=()):
        """Poll whenever the engine's descriptors are readable until done(); `also`: more
        sockets whose readability ends a wait (the receivers). False on the deadline."""
        engine = self.engine
        deadline = time.monotonic() + timeout
        fds = [engine.fileno(), *engine.reader_fds(), *also]
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            select.select(fds, [], [], min(remaining, 0.05))
            for _ in range(64):
                self.returned.extend(engine.poll())
                if not engine.last_batch_size:
                    break
        return True


def drain(sock, into):
    """Everything sock holds now, appended to into as (data, addr); returns into."""
    while True:
        try:
            into.append(sock.recvfrom(70000))
        except BlockingIOError:
            return into


def tasks():
    """This process's thread ids."""
    return set(os.listdir("/proc/self/task"))


@pytest.fixture
def engine_with_workers(relay, sockets):
    """(engine, [main, worker1, worker2] sockets, each on a port of its own, A, B) with a
    session between A and B; the engine is closed after the test."""
    socks = [sockets() for _ in range(3)]
    engine = relay.RelayEngine(socks[0], worker_sockets=socks[1:])
    a, b = sockets(), sockets()
    engine.add_session(SID, a.getsockname(), b.getsockname(), TOKEN_A, TOKEN_B)
    yield engine, socks, a, b
    engine.close()


def test_frames_reaching_every_socket_are_relayed_from_that_socket(engine_with_workers):
    engine, socks, a, b = engine_with_workers
    assert engine.threads == 3
    frames = {}
    for i, sock in enumerate(socks):
        frames[i] = [encode_frame(SID, bytes([i, k]) * 300, TOKEN_A) for k in range(5)]
        for f in frames[i]:
            a.sendto(f, sock.getsockname())
    got = []
    assert Driven(engine).until(lambda: len(drain(b, got)) >= 15, also=[b])
    by_source = {}
    for data, addr in got:
        by_source.setdefault(addr, []).append(data)
    # Each frame leaves by the socket it came in on, unchanged and in order.
    assert by_source == {sock.getsockname(): frames[i] for i, sock in enumerate(socks)}
    stats = engine.session_stats(SID)
    assert stats["packets_a_to_b"] == 15
    assert stats["bytes_a_to_b"] == sum(len(f) for fs in frames.values() for f in fs)
    counters = engine.counters()
    assert counters["received"] == counters["relayed_packets"] == 15


def test_a_sessions_two_directions_on_two_threads(engine_with_workers):
    engine, socks, a, b = engine_with_workers
    n = 200
    to_b = [encode_frame(SID, k.to_bytes(4, "big") * 100, TOKEN_A) for k in range(n)]
    to_a = [encode_frame(SID, k.to_bytes(4, "big") * 90, TOKEN_B) for k in range(n)]
    at_a, at_b = [], []
    for k in range(n):
        a.sendto(to_b[k], socks[1].getsockname())
        b.sendto(to_a[k], socks[2].getsockname())
        if k % 40 == 39:  # stay inside the sockets' buffers
            Driven(engine).until(lambda: len(drain(b, at_b)) >= k + 1
                                 and len(drain(a, at_a)) >= k + 1, also=[a, b])
    assert [d for d, _ in at_b] == to_b and [d for d, _ in at_a] == to_a
    stats = engine.session_stats(SID)
    assert (stats["packets_a_to_b"], stats["packets_b_to_a"]) == (n, n)
    assert stats["last_activity"] is not None


def test_tokens_membership_and_unknown_sessions_are_checked_on_worker_sockets(
        engine_with_workers, sockets):
    engine, socks, a, b = engine_with_workers
    stranger = sockets()
    worker = socks[2].getsockname()
    a.sendto(encode_frame(SID, b"x" * 50, TOKEN_B), worker)  # A's address, B's token
    stranger.sendto(encode_frame(SID, b"x" * 50, TOKEN_A), worker)  # right token, not A
    a.sendto(encode_frame(bytes(8), b"x" * 50, TOKEN_A), worker)  # no such session
    a.sendto(b"\x10short", worker)
    c = engine.counters
    assert Driven(engine).until(lambda: c()["received"] == 4)
    assert (c()["dropped_bad_token"], c()["dropped_not_member"],
            c()["dropped_unknown_session"], c()["dropped_malformed"]) == (1, 1, 1, 1)
    stats = engine.session_stats(SID)
    assert (stats["dropped_bad_token"], stats["dropped_not_member"]) == (1, 1)
    # Nothing reached B: a good frame sent now is the first thing it gets.
    marker = encode_frame(SID, b"marker", TOKEN_A)
    a.sendto(marker, worker)
    got = []
    assert Driven(engine).until(lambda: drain(b, got), also=[b])
    assert [d for d, _ in got] == [marker]


def test_one_sessions_rate_is_shared_by_every_thread(relay, sockets):
    socks = [sockets() for _ in range(3)]
    rate, burst = 20_000, 20_000  # bytes/s; the bucket starts full
    engine = relay.RelayEngine(socks[0], worker_sockets=socks[1:], rate_limit_bps=rate,
                               burst_bytes=burst)
    try:
        a, b = sockets(), sockets()
        engine.add_session(SID, a.getsockname(), b.getsockname(), TOKEN_A, TOKEN_B)
        frame = encode_frame(SID, b"r" * 983, TOKEN_A)  # 1,000 bytes
        started = time.monotonic()
        for k in range(90):  # 90 kB at once over three sockets: 4.5 x the burst
            a.sendto(frame, socks[k % 3].getsockname())
        c = engine.counters
        assert Driven(engine).until(lambda: c()["received"] == 90)
        elapsed = time.monotonic() - started
        passed = c()["relayed_packets"]
        assert passed + c()["dropped_rate_limited"] == 90
        # One bucket for the session, whichever thread charged it.
        assert 20 <= passed <= 20 + rate * elapsed / 1000 + 1
        assert engine.session_stats(SID)["dropped_rate_limited"] == 90 - passed
    finally:
        engine.close()


def test_other_datagrams_on_worker_sockets_come_back_from_poll(engine_with_workers, sockets):
    engine, socks, a, b = engine_with_workers
    client = sockets()
    for i, sock in enumerate(socks):
        client.sendto(STUN + bytes([i]), sock.getsockname())
    driven = Driven(engine)
    assert driven.until(lambda: len(driven.returned) == 3)
    assert sorted(driven.returned) == sorted(
        (STUN + bytes([i]), client.getsockname()) for i in range(3))
    counters = engine.counters()
    assert counters["handed_off"] == 2 and counters["returned"] == 3
    assert counters["received"] == 3 and counters["handoff_dropped"] == 0


def test_a_full_hand_off_queue_drops_and_counts(relay, sockets):
    socks = [sockets() for _ in range(2)]
    engine = relay.RelayEngine(socks[0], worker_sockets=socks[1:])
    try:
        client = sockets()
        c = engine.counters
        sent = 0
        for _ in range(15):  # 1,500 datagrams in all, none taken by poll() meanwhile
            for _ in range(100):
                client.sendto(STUN, socks[1].getsockname())
            sent += 100
            deadline = time.monotonic() + DEADLINE
            while c()["received"] < sent and time.monotonic() < deadline:
                if relay.__name__.endswith("_py"):
                    engine.poll()  # the twin reads worker sockets only in poll()
                else:
                    select.select([], [], [], 0.002)  # the thread reads on meanwhile
        driven = Driven(engine)
        driven.until(lambda: not select.select([*engine.reader_fds()], [], [], 0)[0], 2)
        counters = c()
        assert counters["received"] == sent
        if relay.__name__.endswith("_py"):
            assert counters["handoff_dropped"] == 0
        else:  # 1,024 wait at most; the rest were dropped, and counted
            assert counters["handoff_dropped"] == sent - 1024
            assert len(driven.returned) == 1024
        assert counters["returned"] + counters["handoff_dropped"] == sent
    finally:
        engine.close()


def test_spread_by_reuseport_every_flow_is_relayed(relay, sockets):
    """The kernel picks the socket by 4-tuple hash: 32 senders land on all three."""
    group = reuseport_group(3)
    try:
        engine = relay.RelayEngine(group[0], worker_sockets=group[1:])
        address = group[0].getsockname()
        senders, receivers = [], []
        for k in range(32):
            s, r = sockets(), sockets()
            sid = bytes([0x55]) + k.to_bytes(7, "big")
            engine.add_session(sid, s.getsockname(), r.getsockname(), TOKEN_A, TOKEN_B)
            senders.append((s, sid))
            receivers.append(r)
        for s, sid in senders:
            for _ in range(3):
                s.sendto(encode_frame(sid, b"p" * 500, TOKEN_A), address)
        got = [[] for _ in receivers]
        assert Driven(engine).until(
            lambda: all(len(drain(r, g)) >= 3 for r, g in zip(receivers, got)))
        assert all(addr == address for g in got for _, addr in g)
        assert engine.counters()["relayed_packets"] == 96
        engine.close()
    finally:
        for sock in group:
            sock.close()


def test_close_stops_and_joins_the_threads(relay, sockets):
    before = tasks()
    socks = [sockets() for _ in range(3)]
    a, b = sockets(), sockets()
    engine = relay.RelayEngine(socks[0], worker_sockets=socks[1:])
    engine.add_session(SID, a.getsockname(), b.getsockname(), TOKEN_A, TOKEN_B)
    compiled = not relay.__name__.endswith("_py")
    started = tasks() - before
    assert len(started) == (2 if compiled else 0)
    engine.close()
    engine.close()  # idempotent
    assert not started & tasks()
    assert engine.reader_fds() == ()
    # No longer read: a frame to a worker socket waits there (the caller's socket is open).
    a.sendto(encode_frame(SID, b"late", TOKEN_A), socks[1].getsockname())
    assert select.select([socks[1]], [], [], DEADLINE)[0]
    engine.poll()
    assert engine.counters()["received"] == 0
    # The main socket is still served.
    a.sendto(encode_frame(SID, b"main", TOKEN_A), socks[0].getsockname())
    got = []
    assert Driven(engine).until(lambda: drain(b, got), also=[b])
    assert [d for d, _ in got] == [encode_frame(SID, b"main", TOKEN_A)]


def test_an_engine_left_to_the_collector_stops_its_threads(relay, sockets):
    before = tasks()
    socks = [sockets() for _ in range(3)]
    engine = relay.RelayEngine(socks[0], worker_sockets=socks[1:])
    started = tasks() - before
    fds = os.listdir("/proc/self/fd")
    del engine
    gc.collect()
    assert not started & tasks()
    assert len(os.listdir("/proc/self/fd")) < len(fds)  # its duplicates are closed


def inheritable_fds():
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.get_inheritable(int(name)):
                fds.append(int(name))
        except OSError:  # the descriptor listdir had open while it read the directory
            pass
    return set(fds)


def test_the_engines_own_descriptors_are_not_inherited(relay, sockets):
    """A child process that inherited a worker socket's duplicate would keep a member of the
    SO_REUSEPORT group that nobody reads, and the kernel would go on giving it flows."""
    socks = [sockets() for _ in range(3)]
    before = inheritable_fds()
    engine = relay.RelayEngine(socks[0], worker_sockets=socks[1:])
    try:
        assert inheritable_fds() <= before
    finally:
        engine.close()


def test_worker_sockets_must_suit(relay, sockets):
    main = sockets()
    with pytest.raises(ValueError, match="family"):
        relay.RelayEngine(main, worker_sockets=[sockets(socket.AF_INET6)])
    blocking = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with pytest.raises(ValueError, match="non-blocking"):
            relay.RelayEngine(main, worker_sockets=[blocking])
    finally:
        blocking.close()
    assert relay.RelayEngine(main).reader_fds() == ()
    assert relay.RelayEngine(main).threads == 1
