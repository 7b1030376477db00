"""RelayEngine: the intermediate's relay loop on real loopback sockets, both twins.

Every test taking `relay` runs against the compiled recvmmsg/sendmmsg engine (Linux) and the
pure-Python twin. Members A and B are ordinary UDP sockets; the engine owns a third socket.
Nothing sleeps and hopes: waits are select() with a deadline, "nothing arrived" is shown by
a marker datagram sent afterwards arriving first. The one sleep lets a token bucket refill.
"""

import errno
import random
import select
import socket
import time

import pytest
from udp_helpers import (
    DEADLINE,
    assert_refuses_unsuitable_sockets,
    dual_stack,
    socket_factory,
    udp,
    wait_until,
)

from mahole.wire.relay import HEADER_LEN, NO_TOKEN, encode_frame

SID = bytes.fromhex("0123456789abcdef")
OTHER_SID = bytes.fromhex("fedcba9876543210")
TOKEN_A = bytes.fromhex("a1a2a3a4a5a6a7a8")  # member A's relay token
TOKEN_B = bytes.fromhex("b1b2b3b4b5b6b7b8")
TOKEN = bytes.fromhex("c1c2c3c4c5c6c7c8")  # both members', where a test is not about tokens
STUN = bytes.fromhex("000100002112a442") + bytes(12)  # a Binding request header
QUIC_SHORT = b"\x43" + bytes(range(8)) + b"short-header"
QUIC_LONG = b"\xc3\x00\x00\x00\x01\x08" + bytes(8) + b"\x00" + b"long-header"


@pytest.fixture
def sockets():
    """Factory for non-blocking UDP sockets bound to loopback, closed after the test."""
    with socket_factory() as make:
        yield make


@pytest.fixture
def trio(relay, sockets):
    """(engine, relay socket, A, B) with session SID between A and B, on IPv4 loopback."""
    rsock, a, b = sockets(), sockets(), sockets()
    engine = relay.RelayEngine(rsock)
    engine.add_session(SID, a.getsockname(), b.getsockname(), TOKEN, TOKEN)
    return engine, rsock, a, b


def pump(engine, done, timeout=DEADLINE):
    """Poll the engine until done() or the deadline; returns everything poll handed back."""
    got = []

    def step():
        got.extend(engine.poll())
        return engine.last_batch_size  # a full or all-relayed batch: more may be waiting

    wait_until(done, step, engine.fileno(), timeout)
    return got


def counted(engine, name, n):
    return lambda: engine.counters()[name] >= n


def received(engine, n):
    return counted(engine, "received", n)


def recv_n(sock, n, timeout=DEADLINE):
    """Up to n datagrams from sock as [(data, addr)], waiting at most timeout."""
    out = []

    def step():
        try:
            out.append(sock.recvfrom(70000))
        except BlockingIOError:
            return False
        return True

    wait_until(lambda: len(out) >= n, step, sock, timeout)
    return out


def relay_through(engine, sender, rsock, frames, receiver, expect=None):
    """Send frames from sender to the relay, pump until the engine read them all, and return
    the `expect` datagrams (default: all) receiver got. With expect=0 nothing is read: the
    caller checks later, with a marker, that nothing arrived."""
    before = engine.counters()["received"]
    for f in frames:
        sender.sendto(f, rsock.getsockname())
    pump(engine, received(engine, before + len(frames)))
    assert engine.counters()["received"] == before + len(frames)
    if expect == 0:
        return []
    return recv_n(receiver, len(frames) if expect is None else expect)


def frame(inner, sid=SID, token=TOKEN):
    return encode_frame(sid, inner, token)


def assert_only(sock, expected_first, engine, rsock, sender, sid=SID, token=TOKEN):
    """Show nothing else reached sock: a marker relayed now arrives first."""
    marker = frame(b"marker-" + expected_first, sid, token)
    got = relay_through(engine, sender, rsock, [marker], sock)
    assert [d for d, _ in got] == [marker]


# --- relaying --------------------------------------------------------------------------------


def test_frames_cross_both_ways_unchanged(trio):
    engine, rsock, a, b = trio
    to_b = [frame(bytes([i]) * size) for i, size in enumerate([1, 20, 1200, 1500, 9000])]
    to_a = [frame(b"\xc3" + bytes(range(256)) * 4), frame(b"\x41reply")]
    started = time.monotonic()

    got_b = relay_through(engine, a, rsock, to_b, b)
    got_a = relay_through(engine, b, rsock, to_a, a)

    assert got_b == [(f, rsock.getsockname()) for f in to_b]
    assert got_a == [(f, rsock.getsockname()) for f in to_a]
    stats = engine.session_stats(SID)
    assert stats["packets_a_to_b"] == len(to_b)
    assert stats["bytes_a_to_b"] == sum(map(len, to_b))
    assert stats["packets_b_to_a"] == len(to_a)
    assert stats["bytes_b_to_a"] == sum(map(len, to_a))
    assert stats["dropped_rate_limited"] == stats["dropped_not_member"] == 0
    assert started <= stats["last_activity"] <= time.monotonic()
    assert stats["member_a"] == a.getsockname() and stats["member_b"] == b.getsockname()
    counters = engine.counters()
    assert counters["relayed_packets"] == len(to_a) + len(to_b)
    assert counters["relayed_bytes"] == sum(map(len, to_a + to_b))
    assert counters["received"] == len(to_a) + len(to_b)
    assert all(counters[k] == 0 for k in (
        "returned", "dropped_unknown_session", "dropped_not_member", "dropped_bad_token",
        "dropped_rate_limited", "dropped_malformed", "send_errors", "truncated"))
    assert engine.session_count == 1


def test_all_relayed_batch_returns_empty_but_reports_its_size(trio):
    engine, rsock, a, b = trio
    frames = [frame(b"%d" % i) for i in range(5)]
    for f in frames:
        a.sendto(f, rsock.getsockname())
    seen = []

    def done():
        return engine.counters()["relayed_packets"] == 5

    deadline = time.monotonic() + DEADLINE
    while not done() and time.monotonic() < deadline:
        select.select([rsock], [], [], DEADLINE)
        assert engine.poll() == []
        seen.append(engine.last_batch_size)
    assert done() and sum(seen) == 5 and max(seen) > 0
    assert engine.poll() == [] and engine.last_batch_size == 0
    assert [d for d, _ in recv_n(b, 5)] == frames


def test_many_sessions_each_relay_to_their_own_peer(relay, sockets):
    rsock = sockets()
    engine = relay.RelayEngine(rsock, batch_size=64)
    pairs = [(sockets(), sockets()) for _ in range(8)]
    ids = [bytes([i]) * 8 for i in range(len(pairs))]
    filler = [bytes([0xEE, i]) * 4 for i in range(200)]  # grows the table past its start
    for sid in filler:
        engine.add_session(sid, ("127.0.0.1", 1), ("127.0.0.1", 2), TOKEN, TOKEN)
    for sid, (a, b) in zip(ids, pairs):
        engine.add_session(sid, a.getsockname(), b.getsockname(), TOKEN, TOKEN)
    for sid in filler[::2]:
        engine.remove_session(sid)  # deletions shift probe runs: lookups must still work
    assert engine.session_count == len(pairs) + len(filler) // 2

    for i, (sid, (a, b)) in enumerate(zip(ids, pairs)):
        a.sendto(frame(b"to-b-%d" % i, sid), rsock.getsockname())
        b.sendto(frame(b"to-a-%d" % i, sid), rsock.getsockname())
    pump(engine, counted(engine, "relayed_packets", 2 * len(pairs)))

    for i, (sid, (a, b)) in enumerate(zip(ids, pairs)):
        assert [d for d, _ in recv_n(b, 1)] == [frame(b"to-b-%d" % i, sid)]
        assert [d for d, _ in recv_n(a, 1)] == [frame(b"to-a-%d" % i, sid)]
        stats = engine.session_stats(sid)
        assert (stats["packets_a_to_b"], stats["packets_b_to_a"]) == (1, 1)
    for sid in filler[1::2]:
        assert engine.session_stats(sid) is not None
    for sid in filler[::2]:
        assert engine.session_stats(sid) is None


@pytest.mark.parametrize("gso", [True, False], ids=["gso", "no-gso"])
def test_runs_of_sizes_and_destinations_arrive_unchanged_in_order(relay, sockets, gso):
    """Frames queued in one batch go out grouped (UDP GSO runs in the compiled engine):
    whatever the sizes and destinations, each member gets its frames, byte for byte, in order."""
    rsock, a, b, c, d = sockets(), sockets(), sockets(), sockets(), sockets()
    engine = relay.RelayEngine(rsock, batch_size=128, gso=gso)
    assert engine.gso in ((True, False) if gso else (False,))
    engine.add_session(SID, a.getsockname(), b.getsockname(), TOKEN, TOKEN)
    engine.add_session(OTHER_SID, c.getsockname(), d.getsockname(), TOKEN, TOKEN)
    phases = [
        # runs broken by a shorter frame, a longer one, other destinations in between
        [1200] * 5 + [800] + [1200] * 3 + [1300, 1200, 1200, 1, 1],
        [20] * 70,  # a run longer than the 64 segments one GSO send may carry
        [16000] * 5,  # a run over the 64 KiB one GSO send may carry
    ]
    total = 0
    for n, sizes in enumerate(phases):
        to_b = [frame(bytes([n, i & 0xFF]) * (size // 2) + b"x" * (size % 2))
                for i, size in enumerate(sizes)]
        to_a = [frame(b"\xc3" + bytes([n, i]) * 600) for i in range(3)]
        to_d = [frame(bytes([n, i]) * 600, OTHER_SID) for i in range(3)]
        third = len(to_b) // 3
        plan = ([(a, f) for f in to_b[:third]] + [(b, to_a[0]), (c, to_d[0])]
                + [(a, f) for f in to_b[third:2 * third]] + [(c, to_d[1]), (b, to_a[1])]
                + [(a, f) for f in to_b[2 * third:]] + [(b, to_a[2]), (c, to_d[2])])
        for sock, data in plan:
            sock.sendto(data, rsock.getsockname())
        total += len(plan)
        pump(engine, received(engine, total))

        assert [x for x, _ in recv_n(b, len(to_b))] == to_b
        assert [x for x, _ in recv_n(a, len(to_a))] == to_a
        assert [x for x, _ in recv_n(d, len(to_d))] == to_d
        counters = engine.counters()
        assert counters["relayed_packets"] == total and counters["send_errors"] == 0


def test_refused_run_of_frames_is_retried_one_by_one(relay, sockets):
    """A run the kernel refuses as a whole is sent frame by frame: each refusal counts once,
    and the frames after it still go."""
    rsock, a, b = sockets(), sockets(), sockets()
    engine = relay.RelayEngine(rsock, batch_size=16)
    engine.add_session(SID, a.getsockname(), ("127.0.0.1", 0), TOKEN, TOKEN)  # port 0: EINVAL
    engine.add_session(OTHER_SID, a.getsockname(), b.getsockname(), TOKEN, TOKEN)
    for i in range(3):
        a.sendto(frame(b"%d" % i * 100), rsock.getsockname())
    for i in range(2):
        a.sendto(frame(b"ok%d" % i, OTHER_SID), rsock.getsockname())
    pump(engine, received(engine, 5))
    assert engine.counters()["send_errors"] == 3
    assert engine.counters()["relayed_packets"] == 2
    assert [x for x, _ in recv_n(b, 2)] == [frame(b"ok0", OTHER_SID), frame(b"ok1", OTHER_SID)]


# --- drops ---------------------------------------------------------------------------------


def test_frame_from_non_member_is_dropped_and_counted(trio, sockets):
    engine, rsock, a, b = trio
    stranger = sockets()
    relay_through(engine, stranger, rsock, [frame(b"spoofed")], b, expect=0)
    assert engine.counters()["dropped_not_member"] == 1
    assert engine.session_stats(SID)["dropped_not_member"] == 1
    assert engine.counters()["relayed_packets"] == 0
    assert_only(b, b"spoofed", engine, rsock, a)


def test_same_ip_other_port_is_not_a_member(trio, sockets):
    """IP and port must both match: another socket on 127.0.0.1 is a stranger."""
    engine, rsock, a, b = trio
    neighbour = sockets()
    assert neighbour.getsockname()[0] == a.getsockname()[0]
    relay_through(engine, neighbour, rsock, [frame(b"neighbour")], b, expect=0)
    assert engine.counters()["dropped_not_member"] == 1
    assert_only(b, b"neighbour", engine, rsock, a)


def test_unknown_session_is_dropped_and_counted(trio):
    engine, rsock, a, b = trio
    relay_through(engine, a, rsock, [frame(b"lost", OTHER_SID)], b, expect=0)
    assert engine.counters()["dropped_unknown_session"] == 1
    assert engine.session_stats(SID)["dropped_not_member"] == 0
    assert_only(b, b"lost", engine, rsock, a)


def test_frames_wait_for_unknown_member_then_flow(relay, sockets):
    rsock, a, b = sockets(), sockets(), sockets()
    engine = relay.RelayEngine(rsock)
    engine.add_session(SID, a.getsockname(), None, TOKEN, TOKEN)
    assert engine.session_stats(SID)["member_b"] is None

    relay_through(engine, a, rsock, [frame(b"too early")], b, expect=0)
    assert engine.counters()["dropped_not_member"] == 1
    assert engine.session_stats(SID)["dropped_not_member"] == 1
    relay_through(engine, b, rsock, [frame(b"not yet a member")], a, expect=0)
    assert engine.counters()["dropped_not_member"] == 2

    engine.set_member(SID, 1, b.getsockname())
    assert_only(b, b"too early", engine, rsock, a)
    assert_only(a, b"not yet a member", engine, rsock, b)


# --- relay tokens: a forged source address is not enough --------------------------------------


@pytest.fixture
def tokened(relay, sockets):
    """(engine, relay socket, A, B) with session SID between A and B, tokens TOKEN_A/TOKEN_B."""
    rsock, a, b = sockets(), sockets(), sockets()
    engine = relay.RelayEngine(rsock)
    engine.add_session(SID, a.getsockname(), b.getsockname(), TOKEN_A, TOKEN_B)
    return engine, rsock, a, b


def test_frames_with_the_senders_token_cross_unchanged(tokened):
    engine, rsock, a, b = tokened
    to_b = [frame(b"\x40to-b-%d" % i, token=TOKEN_A) for i in range(3)]
    to_a = [frame(b"\x40to-a", token=TOKEN_B)]
    assert relay_through(engine, a, rsock, to_b, b) == [(f, rsock.getsockname()) for f in to_b]
    assert relay_through(engine, b, rsock, to_a, a) == [(f, rsock.getsockname()) for f in to_a]
    assert engine.counters()["dropped_bad_token"] == 0
    assert engine.session_stats(SID)["dropped_bad_token"] == 0


def test_member_address_with_a_wrong_token_is_dropped_and_counted(tokened):
    """What a spoofer who forges A's source IP and port can send: frames from A's address
    with any token but A's. None reaches B, none is relayed, each is counted."""
    engine, rsock, a, b = tokened
    wrong = [NO_TOKEN, TOKEN_B, TOKEN_A[:7] + b"\x00", b"\x00" + TOKEN_A[1:],
             bytes(x ^ 0x80 for x in TOKEN_A)] + [random.Random(i).randbytes(8) for i in range(20)]
    spoofed = [frame(b"\x40injected", token=t) for t in wrong]
    relay_through(engine, a, rsock, spoofed, b, expect=0)
    counters = engine.counters()
    assert counters["dropped_bad_token"] == len(spoofed)
    assert engine.session_stats(SID)["dropped_bad_token"] == len(spoofed)
    assert counters["relayed_packets"] == 0 and counters["dropped_not_member"] == 0
    stats = engine.session_stats(SID)
    assert stats["packets_a_to_b"] == stats["bytes_a_to_b"] == 0
    assert stats["last_activity"] is None  # spoofed frames do not keep a session alive
    assert_only(b, b"injected", engine, rsock, a, token=TOKEN_A)


def test_a_stranger_is_still_not_a_member_even_with_the_right_token(tokened, sockets):
    """The token does not replace the address check: both must match one member."""
    engine, rsock, a, b = tokened
    stranger = sockets()
    relay_through(engine, stranger, rsock, [frame(b"right token", token=TOKEN_A)], b, expect=0)
    assert engine.counters()["dropped_not_member"] == 1
    assert engine.counters()["dropped_bad_token"] == 0
    assert_only(b, b"right token", engine, rsock, a, token=TOKEN_A)


def test_spoofed_frames_do_not_spend_the_sessions_rate(relay, sockets):
    """Frames are authenticated before the token bucket is charged: a flood with a forged
    source address cannot starve the members."""
    rsock, a, b = sockets(), sockets(), sockets()
    size = 1000
    engine = relay.RelayEngine(rsock, rate_limit_bps=1.0, burst_bytes=3 * size)
    engine.add_session(SID, a.getsockname(), b.getsockname(), TOKEN_A, TOKEN_B)
    spoofed = [frame(bytes(size - HEADER_LEN), token=NO_TOKEN) for _ in range(50)]
    relay_through(engine, a, rsock, spoofed, b, expect=0)
    assert engine.counters()["dropped_bad_token"] == 50
    assert engine.counters()["dropped_rate_limited"] == 0
    good = [frame(bytes([i]) * (size - HEADER_LEN), token=TOKEN_A) for i in range(3)]
    assert [d for d, _ in relay_through(engine, a, rsock, good, b)] == good


def test_every_session_checks_both_members_tokens(relay, sockets):
    """No session without tokens: a token left out, None, or the eight zero
    bytes a node sends when it was given none is refused, and nothing is added."""
    rsock, a, b = sockets(), sockets(), sockets()
    engine = relay.RelayEngine(rsock)
    members = (a.getsockname(), b.getsockname())
    with pytest.raises(TypeError):
        engine.add_session(SID, *members)
    with pytest.raises(TypeError):
        engine.add_session(SID, *members, TOKEN_A)
    for token_a, token_b in ((TOKEN_A, None), (None, TOKEN_B), (None, None)):
        with pytest.raises(TypeError, match="relay token"):
            engine.add_session(SID, *members, token_a, token_b)
    for token_a, token_b in ((TOKEN_A, NO_TOKEN), (NO_TOKEN, TOKEN_B)):
        with pytest.raises(ValueError, match="zeros"):
            engine.add_session(SID, *members, token_a, token_b)
    assert engine.session_count == 0

    # With both tokens, B's frames pass with B's token only, and A's with A's.
    engine.add_session(SID, *members, TOKEN_A, TOKEN_B)
    from_b = [frame(b"from b", token=t) for t in (NO_TOKEN, TOKEN_A, TOKEN)]
    relay_through(engine, b, rsock, from_b, a, expect=0)
    assert engine.counters()["dropped_bad_token"] == len(from_b)
    assert_only(a, b"from b", engine, rsock, b, token=TOKEN_B)
    assert_only(b, b"from a", engine, rsock, a, token=TOKEN_A)


def test_set_member_keeps_the_members_token(tokened, sockets):
    """NAT rebinding moves the address; the token stays the member's."""
    engine, rsock, a, b = tokened
    b2 = sockets()
    engine.set_member(SID, 1, b2.getsockname())
    relay_through(engine, b2, rsock, [frame(b"no token", token=NO_TOKEN)], a, expect=0)
    assert engine.counters()["dropped_bad_token"] == 1
    got = relay_through(engine, b2, rsock, [frame(b"rebound", token=TOKEN_B)], a)
    assert [d for d, _ in got] == [frame(b"rebound", token=TOKEN_B)]
    engine.set_member(SID, 1, None)
    engine.set_member(SID, 1, b.getsockname())
    relay_through(engine, b, rsock, [frame(b"zeros again", token=NO_TOKEN)], a, expect=0)
    assert engine.counters()["dropped_bad_token"] == 2
    assert_only(a, b"zeros again", engine, rsock, b, token=TOKEN_B)


def test_members_at_one_address_are_told_apart_by_their_tokens(relay, sockets):
    rsock, a = sockets(), sockets()
    engine = relay.RelayEngine(rsock)
    engine.add_session(SID, a.getsockname(), a.getsockname(), TOKEN_A, TOKEN_B)
    frames = [frame(b"as A", token=TOKEN_A), frame(b"as B", token=TOKEN_B),
              frame(b"as nobody", token=NO_TOKEN)]
    got = relay_through(engine, a, rsock, frames, a, expect=2)
    assert [d for d, _ in got] == frames[:2]
    stats = engine.session_stats(SID)
    assert (stats["packets_a_to_b"], stats["packets_b_to_a"], stats["dropped_bad_token"]) == (
        1, 1, 1)


@pytest.mark.parametrize("bad, error", [
    (b"", ValueError), (bytes(7), ValueError), (bytes(9), ValueError), (bytes(8), ValueError),
    ("a1a2a3a4", TypeError), (12345678, TypeError), (None, TypeError),
], ids=repr)
def test_bad_tokens_are_refused_before_any_change(relay, sockets, bad, error):
    engine = relay.RelayEngine(sockets())
    with pytest.raises(error):
        engine.add_session(SID, ("127.0.0.1", 9), ("127.0.0.1", 10), TOKEN_A, bad)
    with pytest.raises(error):
        engine.add_session(SID, ("127.0.0.1", 9), ("127.0.0.1", 10), token_a=bad,
                           token_b=TOKEN_B)
    assert engine.session_count == 0
    engine.add_session(SID, ("127.0.0.1", 9), None, bytearray(TOKEN_A), memoryview(TOKEN_B))
    assert engine.session_count == 1


def test_malformed_relay_frames_are_dropped_and_counted(trio):
    """Anything short of the 17-byte header plus one byte of inner packet."""
    engine, rsock, a, b = trio
    short = [b"\x10" + SID + NO_TOKEN, b"\x10" + SID + b"\x00" * 3, b"\x10" + SID, b"\x10",
             b"\x10" + SID[:4]]
    relay_through(engine, a, rsock, short, b, expect=0)
    assert engine.counters()["dropped_malformed"] == len(short)
    assert engine.counters()["returned"] == 0
    assert_only(b, b"malformed", engine, rsock, a)


def test_oversized_datagram_is_dropped_as_truncated(relay, sockets):
    rsock, a, b = sockets(), sockets(), sockets()
    engine = relay.RelayEngine(rsock, max_datagram=100)
    engine.add_session(SID, a.getsockname(), b.getsockname(), TOKEN, TOKEN)
    big_frame, big_other = frame(bytes(200)), b"\xc3" + bytes(200)
    a.sendto(big_frame, rsock.getsockname())
    a.sendto(big_other, rsock.getsockname())
    a.sendto(frame(b"fits"), rsock.getsockname())
    a.sendto(QUIC_SHORT, rsock.getsockname())
    got = pump(engine, received(engine, 4))
    assert got == [(QUIC_SHORT, a.getsockname())]
    assert engine.counters()["truncated"] == 2
    assert [d for d, _ in recv_n(b, 1)] == [frame(b"fits")]


def test_refused_send_is_counted_and_the_rest_still_go(relay, sockets):
    """A destination the kernel refuses (port 0: EINVAL) costs that frame only."""
    rsock, a, b = sockets(), sockets(), sockets()
    engine = relay.RelayEngine(rsock)
    engine.add_session(SID, a.getsockname(), ("127.0.0.1", 0), TOKEN, TOKEN)
    engine.add_session(OTHER_SID, a.getsockname(), b.getsockname(), TOKEN, TOKEN)
    a.sendto(frame(b"nowhere"), rsock.getsockname())
    a.sendto(frame(b"somewhere", OTHER_SID), rsock.getsockname())
    pump(engine, received(engine, 2))
    assert engine.counters()["send_errors"] == 1
    assert engine.counters()["relayed_packets"] == 1
    assert engine.session_stats(SID)["packets_a_to_b"] == 0
    assert [d for d, _ in recv_n(b, 1)] == [frame(b"somewhere", OTHER_SID)]


# --- membership changes ------------------------------------------------------------------------


def test_set_member_moves_delivery_to_the_new_address(trio, sockets):
    """NAT rebinding: B's observed address changes; frames follow it, the old one is a stranger."""
    engine, rsock, a, b = trio
    b2 = sockets()
    engine.set_member(SID, 1, b2.getsockname())

    got = relay_through(engine, a, rsock, [frame(b"after rebinding")], b2)
    assert [d for d, _ in got] == [frame(b"after rebinding")]
    got = relay_through(engine, b2, rsock, [frame(b"from new B")], a)
    assert [d for d, _ in got] == [frame(b"from new B")]
    relay_through(engine, b, rsock, [frame(b"from old B")], a, expect=0)
    assert engine.counters()["dropped_not_member"] == 1
    assert engine.session_stats(SID)["member_b"] == b2.getsockname()

    engine.set_member(SID, 1, b.getsockname())  # nothing was sent to the old B meanwhile
    assert_only(b, b"after rebinding", engine, rsock, a)
    assert_only(a, b"from old B", engine, rsock, b)


def test_set_member_to_none_stops_delivery(trio):
    engine, rsock, a, b = trio
    engine.set_member(SID, 1, None)
    relay_through(engine, a, rsock, [frame(b"b is gone")], b, expect=0)
    relay_through(engine, b, rsock, [frame(b"old b")], a, expect=0)
    assert engine.counters()["dropped_not_member"] == 2
    assert engine.session_stats(SID)["member_b"] is None


def test_removed_session_is_unknown(trio):
    engine, rsock, a, b = trio
    engine.remove_session(SID)
    engine.remove_session(SID)  # already gone: ignored
    assert engine.session_count == 0 and engine.session_stats(SID) is None
    relay_through(engine, a, rsock, [frame(b"late")], b, expect=0)
    assert engine.counters()["dropped_unknown_session"] == 1
    engine.add_session(SID, a.getsockname(), b.getsockname(), TOKEN, TOKEN)  # id reused
    assert_only(b, b"late", engine, rsock, a)


# --- datagrams for the caller -----------------------------------------------------------------


def test_other_datagrams_come_back_in_order_with_addresses_in_one_batch(trio, sockets):
    engine, rsock, a, b = trio
    c = sockets()
    mixed = [
        (a, STUN), (a, frame(b"one")), (c, QUIC_SHORT), (a, frame(b"two")), (c, QUIC_LONG),
        (b, frame(b"three")), (a, b""), (c, b"\x11not a relay frame"), (b, STUN + b"x"),
    ]
    expected = [(d, s.getsockname()) for s, d in mixed if not d.startswith(b"\x10")]
    # Loopback delivers during sendto, so one poll sees everything; retry if it did not.
    for _attempt in range(3):
        before = engine.counters()
        for sock, data in mixed:
            sock.sendto(data, rsock.getsockname())
        select.select([rsock], [], [], DEADLINE)
        got = engine.poll()
        if engine.last_batch_size == len(mixed):
            break
        pump(engine, received(engine, before["received"] + len(mixed)))
        recv_n(b, 2), recv_n(a, 1)
    else:
        pytest.fail("one poll never saw the whole mixed batch")

    assert got == expected
    assert all(type(d) is bytes and type(addr) is tuple for d, addr in got)
    after = engine.counters()
    assert after["returned"] - before["returned"] == len(expected)
    assert after["relayed_packets"] - before["relayed_packets"] == 3
    assert [d for d, _ in recv_n(b, 2)] == [frame(b"one"), frame(b"two")]
    assert [d for d, _ in recv_n(a, 1)] == [frame(b"three")]


def test_returned_addresses_match_recvfrom(relay, sockets):
    rsock, c = sockets(), sockets()
    engine = relay.RelayEngine(rsock)
    c.sendto(STUN, rsock.getsockname())
    got = pump(engine, received(engine, 1))
    assert got == [(STUN, c.getsockname())]
    assert [type(x) for x in got[0][1]] == [str, int]
    assert engine.poll() == [] and engine.last_batch_size == 0


def test_poll_on_an_empty_socket_returns_at_once(relay, sockets):
    engine = relay.RelayEngine(sockets())
    started = time.monotonic()
    assert engine.poll() == [] and engine.last_batch_size == 0
    assert time.monotonic() - started < 1.0


# --- rate limit -----------------------------------------------------------------------------------


def test_rate_limit_drops_the_excess_then_recovers(relay, sockets):
    rsock, a, b = sockets(), sockets(), sockets()
    size, rate = 1000, 2000.0  # 1000-byte frames; the bucket refills two of them a second
    engine = relay.RelayEngine(rsock, rate_limit_bps=rate, burst_bytes=3 * size)
    assert (engine.rate_limit_bps, engine.burst_bytes) == (rate, 3 * size)
    started = time.monotonic()
    engine.add_session(SID, a.getsockname(), b.getsockname(), TOKEN, TOKEN)
    frames = [frame(bytes([i]) * (size - HEADER_LEN)) for i in range(10)]
    assert {len(f) for f in frames} == {size}

    relay_through(engine, a, rsock, frames, b, expect=0)
    elapsed = time.monotonic() - started
    stats = engine.session_stats(SID)
    passed = stats["packets_a_to_b"]
    # A full bucket lets three through at once; refill adds two a second.
    assert 3 <= passed <= 3 + int(elapsed * rate / size)
    assert stats["dropped_rate_limited"] == 10 - passed
    assert engine.counters()["dropped_rate_limited"] == 10 - passed
    assert [d for d, _ in recv_n(b, passed)] == frames[:passed]

    # The bucket is shared by both directions: B is limited by what A spent.
    relay_through(engine, b, rsock, [frame(b"reply")], a, expect=0)
    assert engine.session_stats(SID)["dropped_rate_limited"] == 10 - passed + 1

    time.sleep(size / rate)  # the only fixed wait: one frame's worth of tokens
    deadline = time.monotonic() + DEADLINE
    got = []
    while not got and time.monotonic() < deadline:
        before = engine.session_stats(SID)["packets_a_to_b"]
        relay_through(engine, a, rsock, [frame(b"again" + bytes(size - HEADER_LEN - 5))], b,
                      expect=0)
        if engine.session_stats(SID)["packets_a_to_b"] > before:
            got = recv_n(b, 1)
        else:
            select.select([], [], [], 0.1)  # wait for more tokens
    assert got and got[0][0] == frame(b"again" + bytes(size - HEADER_LEN - 5))


def test_default_burst_is_one_second_of_rate(relay, sockets):
    engine = relay.RelayEngine(sockets(), rate_limit_bps=5000)
    assert engine.burst_bytes == 5000.0
    assert relay.RelayEngine(sockets()).burst_bytes == 0.0


def _passed(engine, sid, sender, rsock, receiver, n, size=1000):
    """Send n frames of size bytes for sid; returns how many the engine relayed (and checks
    that exactly those, the first ones, arrived)."""
    before = engine.session_stats(sid)["packets_a_to_b"]
    frames = [frame(bytes([i]) * (size - HEADER_LEN), sid) for i in range(n)]
    relay_through(engine, sender, rsock, frames, receiver, expect=0)
    passed = engine.session_stats(sid)["packets_a_to_b"] - before
    assert [d for d, _ in recv_n(receiver, passed)] == frames[:passed]
    return passed


def test_set_rate_limits_that_session_only(relay, sockets):
    """The intermediate applies a session's relay share (RelaySetRate): that session is held
    to its bucket at once, another session of the same engine is not, and 0 lifts it."""
    rsock, a, b, c, d = sockets(), sockets(), sockets(), sockets(), sockets()
    size = 1000
    engine = relay.RelayEngine(rsock)  # unlimited by default
    engine.add_session(SID, a.getsockname(), b.getsockname(), TOKEN, TOKEN)
    engine.add_session(OTHER_SID, c.getsockname(), d.getsockname(), TOKEN, TOKEN)
    assert engine.session_stats(SID)["rate_bps"] == 0.0

    engine.set_rate(SID, 1.0, 3 * size)  # 1 byte/s: only the burst gets through
    stats = engine.session_stats(SID)
    assert (stats["rate_bps"], stats["burst_bytes"]) == (1.0, 3.0 * size)
    assert _passed(engine, SID, a, rsock, b, 10) == 3
    assert engine.session_stats(SID)["dropped_rate_limited"] == 7
    assert _passed(engine, OTHER_SID, c, rsock, d, 10) == 10
    other = engine.session_stats(OTHER_SID)
    assert (other["rate_bps"], other["dropped_rate_limited"]) == (0.0, 0)
    assert engine.counters()["dropped_rate_limited"] == 7
    assert (engine.rate_limit_bps, engine.burst_bytes) == (0.0, 0.0)  # the default stays

    engine.set_rate(SID, 0, 0)  # unlimited again
    assert _passed(engine, SID, a, rsock, b, 10) == 10


def test_set_rate_overrides_the_engines_default_for_one_session(relay, sockets):
    rsock, a, b, c, d = sockets(), sockets(), sockets(), sockets(), sockets()
    size = 1000
    engine = relay.RelayEngine(rsock, rate_limit_bps=1.0, burst_bytes=2 * size)
    engine.add_session(SID, a.getsockname(), b.getsockname(), TOKEN, TOKEN)
    engine.add_session(OTHER_SID, c.getsockname(), d.getsockname(), TOKEN, TOKEN)
    assert engine.session_stats(SID)["burst_bytes"] == 2.0 * size

    engine.set_rate(OTHER_SID, 0, 0)
    assert _passed(engine, OTHER_SID, c, rsock, d, 8) == 8
    assert _passed(engine, SID, a, rsock, b, 8) == 2  # still the engine's bucket

    # From unlimited to a bucket: it starts full, and the burst 0 means one second of rate.
    engine.set_rate(OTHER_SID, float(size), 0)
    assert engine.session_stats(OTHER_SID)["burst_bytes"] == float(size)
    assert _passed(engine, OTHER_SID, c, rsock, d, 5) == 1


def test_set_rate_keeps_what_the_session_spent(relay, sockets):
    """A new, larger burst is no free refill: tokens already spent stay spent, and a smaller
    burst cuts what is left."""
    rsock, a, b = sockets(), sockets(), sockets()
    size = 1000
    engine = relay.RelayEngine(rsock)
    engine.add_session(SID, a.getsockname(), b.getsockname(), TOKEN, TOKEN)
    engine.set_rate(SID, 1.0, 3 * size)
    assert _passed(engine, SID, a, rsock, b, 2) == 2  # one frame's worth left
    engine.set_rate(SID, 1.0, 10 * size)
    assert _passed(engine, SID, a, rsock, b, 5) == 1
    engine.set_rate(SID, 0, 0)
    engine.set_rate(SID, 1.0, 4 * size)  # back from unlimited: full again
    engine.set_rate(SID, 1.0, 2 * size)  # cut to the smaller burst
    assert _passed(engine, SID, a, rsock, b, 5) == 2


def test_set_rate_checks_its_arguments(relay, sockets):
    engine = relay.RelayEngine(sockets())
    engine.add_session(SID, ("127.0.0.1", 9), None, TOKEN, TOKEN)
    with pytest.raises(KeyError):
        engine.set_rate(OTHER_SID, 1000, 1000)
    for rate, burst in ((-1, 0), (0, -1), (float("nan"), 0), (float("inf"), 0),
                        (1000, float("inf"))):
        with pytest.raises(ValueError):
            engine.set_rate(SID, rate, burst)
    for rate, burst in (("fast", 0), (None, 0), (True, 0), (1000, None)):
        with pytest.raises(TypeError):
            engine.set_rate(SID, rate, burst)
    for bad in (b"short", SID + b"x"):
        with pytest.raises(ValueError):
            engine.set_rate(bad, 1000, 1000)
    stats = engine.session_stats(SID)
    assert (stats["rate_bps"], stats["burst_bytes"]) == (0.0, 0.0)  # nothing changed
    engine.set_rate(bytearray(SID), 5000, 0)
    stats = engine.session_stats(SID)
    assert (stats["rate_bps"], stats["burst_bytes"]) == (5000.0, 5000.0)


# --- activity ---------------------------------------------------------------------------------


def test_session_stats_say_when_a_session_was_created_and_last_relayed(trio):
    engine, rsock, a, b = trio
    engine.add_session(OTHER_SID, ("127.0.0.1", 9), None, TOKEN, TOKEN)
    created = engine.session_stats(OTHER_SID)["created"]
    assert abs(created - time.monotonic()) < DEADLINE
    assert engine.session_stats(OTHER_SID)["last_activity"] is None

    relay_through(engine, a, rsock, [frame(b"keepalive")], b)
    active = engine.session_stats(SID)["last_activity"]
    assert active > created
    assert engine.session_stats(OTHER_SID)["last_activity"] is None  # never relayed


# --- IPv6 -------------------------------------------------------------------------------------


def test_ipv6_members(relay, sockets):
    rsock = sockets(socket.AF_INET6)
    a, b, c = sockets(socket.AF_INET6), sockets(socket.AF_INET6), sockets(socket.AF_INET6)
    engine = relay.RelayEngine(rsock)
    engine.add_session(SID, a.getsockname()[:2], b.getsockname(), TOKEN, TOKEN)

    assert [d for d, _ in relay_through(engine, a, rsock, [frame(b"v6 to b")], b)] == [
        frame(b"v6 to b")]
    assert [d for d, _ in relay_through(engine, b, rsock, [frame(b"v6 to a")], a)] == [
        frame(b"v6 to a")]
    relay_through(engine, c, rsock, [frame(b"stranger")], b, expect=0)
    assert engine.counters()["dropped_not_member"] == 1

    c.sendto(QUIC_LONG, rsock.getsockname())
    got = pump(engine, received(engine, 4))
    assert got == [(QUIC_LONG, c.getsockname())]
    assert len(got[0][1]) == 4
    assert engine.session_stats(SID)["member_a"] == a.getsockname()


def test_ipv4_members_of_an_ipv6_socket_are_stored_v4_mapped(relay, sockets):
    dual = dual_stack()
    try:
        a, b = sockets(), sockets()
        engine = relay.RelayEngine(dual)
        engine.add_session(SID, a.getsockname(), ("::ffff:127.0.0.1", b.getsockname()[1], 0, 0),
                           TOKEN, TOKEN)
        relay_addr = ("127.0.0.1", dual.getsockname()[1])
        a.sendto(frame(b"mapped"), relay_addr)
        b.sendto(frame(b"back"), relay_addr)
        pump(engine, counted(engine, "relayed_packets", 2))
        assert recv_n(b, 1) == [(frame(b"mapped"), relay_addr)]
        assert recv_n(a, 1) == [(frame(b"back"), relay_addr)]
        stats = engine.session_stats(SID)
        assert stats["member_a"] == ("::ffff:127.0.0.1", a.getsockname()[1], 0, 0)
    finally:
        dual.close()


# --- robustness -------------------------------------------------------------------------------


def _mutations(rng, n):
    """Random datagrams, most of them relay frames bent in one way or another."""
    good = frame(b"payload-bytes", token=TOKEN_A)
    for _ in range(n):
        kind = rng.randrange(6)
        if kind == 0:
            yield bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
        elif kind == 1:  # flipped bytes
            data = bytearray(good)
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            yield bytes(data)
        elif kind == 2:  # truncated
            yield good[:rng.randrange(0, len(good))]
        elif kind == 3:  # a relay frame, random session id and body
            yield b"\x10" + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
        elif kind == 4:  # known session, A's token or none, random body
            yield frame(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))),
                        token=rng.choice([TOKEN_A, NO_TOKEN]))
        else:
            yield good + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 8)))


def test_random_and_mutated_datagrams_never_crash_and_add_up(relay, sockets):
    rsock, a, b, c = sockets(), sockets(), sockets(), sockets()
    engine = relay.RelayEngine(rsock, batch_size=16)
    engine.add_session(SID, a.getsockname(), b.getsockname(), TOKEN_A, TOKEN_B)
    rng = random.Random(20240607)
    sent, expect_relayed, expect_returned = 0, [], []
    datagrams = list(_mutations(rng, 1500))
    for start in range(0, len(datagrams), 50):
        for data in datagrams[start:start + 50]:
            sender = a if rng.random() < 0.8 else c
            sender.sendto(data, rsock.getsockname())
            if not data or data[0] != 0x10:
                expect_returned.append((data, sender.getsockname()))
            elif (len(data) > HEADER_LEN and data[1:9] == SID and data[9:17] == TOKEN_A
                    and sender is a):
                expect_relayed.append(data)
        sent = start + len(datagrams[start:start + 50])
        returned = pump(engine, received(engine, sent))
        assert returned == expect_returned
        expect_returned = []
        got = recv_n(b, len(expect_relayed))
        assert [d for d, _ in got] == expect_relayed
        expect_relayed = []

    counters = engine.counters()
    assert counters["received"] == len(datagrams)
    assert counters["received"] == sum(counters[k] for k in (
        "returned", "relayed_packets", "dropped_unknown_session", "dropped_not_member",
        "dropped_bad_token", "dropped_rate_limited", "dropped_malformed", "send_errors",
        "truncated"))
    assert counters["dropped_bad_token"] > 0 and counters["relayed_packets"] > 0
    assert recv_n(a, 1, timeout=0) == []  # B never sent: nothing goes to A


# --- API checks -----------------------------------------------------------------------------


def test_constructor_checks_its_arguments(relay, sockets):
    sock = sockets()
    for kwargs in ({"batch_size": 0}, {"batch_size": 1025}, {"max_datagram": 0},
                   {"max_datagram": 65536}, {"rate_limit_bps": -1}, {"burst_bytes": -1},
                   {"rate_limit_bps": float("nan")}, {"rate_limit_bps": float("inf")}):
        with pytest.raises(ValueError):
            relay.RelayEngine(sock, **kwargs)
    with pytest.raises(TypeError):
        relay.RelayEngine(sock, rate_limit_bps="fast")
    assert_refuses_unsuitable_sockets(relay.RelayEngine)


@pytest.mark.parametrize("bad", [b"", b"short", SID + b"x", "01234567"], ids=repr)
def test_bad_session_ids_are_refused(relay, sockets, bad):
    engine = relay.RelayEngine(sockets())
    with pytest.raises(TypeError if isinstance(bad, str) else ValueError):
        engine.add_session(bad, None, None, TOKEN, TOKEN)
    with pytest.raises((TypeError, ValueError)):
        engine.session_stats(bad)
    assert engine.session_count == 0


def test_session_table_misuse(relay, sockets):
    engine = relay.RelayEngine(sockets())
    engine.add_session(bytearray(SID), None, None, TOKEN, TOKEN)
    assert engine.session_stats(memoryview(SID)) is not None
    with pytest.raises(ValueError, match="already exists"):
        engine.add_session(SID, None, None, TOKEN, TOKEN)
    with pytest.raises(KeyError):
        engine.set_member(OTHER_SID, 0, ("127.0.0.1", 9))
    for index in (2, -1, True, "0", 0.0):
        with pytest.raises(ValueError):
            engine.set_member(SID, index, ("127.0.0.1", 9))


@pytest.mark.parametrize("bad", [
    ("localhost", 9), ("::1", 9), ("1.2.3.4", 70000), ("1.2.3.4", "9"), ("1.2.3.4", True),
    ("1.2.3.4", 9, 0, 0), ["1.2.3.4", 9], "1.2.3.4:9", ("1.2.3.4\0", 9),
], ids=repr)
def test_bad_member_addresses_are_refused_before_any_change(relay, sockets, bad):
    engine = relay.RelayEngine(sockets())
    with pytest.raises(ValueError):
        engine.add_session(SID, ("127.0.0.1", 9), bad, TOKEN, TOKEN)
    assert engine.session_count == 0
    engine.add_session(SID, ("127.0.0.1", 9), None, TOKEN, TOKEN)
    with pytest.raises(ValueError):
        engine.set_member(SID, 0, bad)
    assert engine.session_stats(SID)["member_a"] == ("127.0.0.1", 9)


def test_ipv6_socket_refuses_bad_ipv6_addresses(relay, sockets):
    engine = relay.RelayEngine(sockets(socket.AF_INET6))
    for bad in [("fe80::1%1", 9), ("::1", 9, 1 << 20, 0), ("::1", 9, 0, -1), ("::1", 9, 0, 0, 0)]:
        with pytest.raises(ValueError):
            engine.add_session(SID, bad, None, TOKEN, TOKEN)
    engine.add_session(SID, ("::1", 9), ("127.0.0.1", 10), TOKEN, TOKEN)
    assert engine.session_stats(SID)["member_b"] == ("::ffff:127.0.0.1", 10, 0, 0)


def test_closed_socket_raises_oserror(relay):
    sock = udp(socket.AF_INET, "127.0.0.1")
    engine = relay.RelayEngine(sock)
    sock.close()
    assert engine.fileno() == -1
    with pytest.raises(OSError) as info:
        engine.poll()
    assert info.value.errno == errno.EBADF


def test_both_twins_count_the_same_things(relay):
    from mahole._fast import _relay_py
    assert set(relay.COUNTERS) == set(_relay_py.COUNTERS)
    sock = udp(socket.AF_INET, "127.0.0.1")
    try:
        assert set(relay.RelayEngine(sock).counters()) == set(_relay_py.COUNTERS)
    finally:
        sock.close()
