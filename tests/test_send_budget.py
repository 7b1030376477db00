"""The send budget: what a node read from local TCP and the peer has not acknowledged, all its
streams together. The core on a fake clock, its shell (StreamPipe) against a fake QUIC
connection, and a deployment with many idle streams."""

import asyncio
import os
import socket

import pytest

from aio_helpers import run, wait_for

from mahole import connection as qc, tunnel
from mahole.config import Forward, Service
from mahole.demo import LocalDeployment, tcp_round_trip
from mahole.send_budget import SendBudget
from mahole.tunnel import LARGE_RECEIVE, READ_SIZE, StreamPipe, stream_pair


# The core --------------------------------------------------------------------------------

def test_reads_are_admitted_below_the_limit_and_charged_what_they_returned():
    budget = SendBudget(100, read_size=10)
    assert budget.admit("a", now=0.0)
    budget.charge("a", 60)
    assert budget.admit("b", now=0.0)  # 60 < 100: admitted, nothing reserved
    budget.charge("b", 70)  # one read may take it past the limit
    assert budget.used == 130 and budget.peak == 130
    assert not budget.admit("a", now=1.0)
    assert budget.status() == {"limit": 100, "used": 130, "peak": 130, "waiting": 1,
                               "waits": 1, "streams": 0, "longest_wait": 0.0}
    assert budget.release("b", 30, now=2.0) == []  # 100: still not below the limit
    assert budget.release("b", 1, now=3.5) == ["a"]
    assert budget.longest_wait == 2.5 and budget.waiting == 0
    with pytest.raises(ValueError):
        SendBudget(0)


def test_an_idle_stream_holds_nothing():
    # The regression of a budget that reserved a read before data arrived: streams admitted to
    # read and then idle (no bytes yet) must not keep anyone else from reading.
    budget = SendBudget(READ_SIZE)
    for idle in range(10_000):
        assert budget.admit(idle, now=0.0)
    assert budget.used == 0
    assert budget.admit("active", now=0.0)


def test_a_lone_stream_uses_the_whole_budget():
    budget = SendBudget(1 << 20, read_size=READ_SIZE)
    for _ in range(16):  # nobody waits: no share applies, however much it holds
        assert budget.admit("only", now=0.0)
        budget.charge("only", READ_SIZE)
    assert budget.used == budget.limit and budget.waits == 0
    assert not budget.admit("only", now=0.0)  # spent: it waits for its acknowledgements
    assert budget.release("only", READ_SIZE, now=1.0) == ["only"]


def test_stalled_streams_holding_the_whole_budget_cannot_keep_a_new_stream_from_reading():
    # 16 streams whose peers stopped reading hold 4 MiB each, the whole default budget; their
    # charges are never released.
    budget = SendBudget(64 << 20, read_size=READ_SIZE)
    for stalled in range(16):
        while budget._charges.get(stalled, 0) < 4 << 20:
            assert budget.admit(stalled, now=0.0)
            budget.charge(stalled, READ_SIZE)
    assert budget.used == budget.limit and budget.waits == 0
    # A stalled stream asking for more now waits: the budget is spent.
    assert not budget.admit(0, now=0.0)
    # A new stream holds nothing: it reads, and again each time its bytes are acknowledged.
    for step in range(100):
        assert budget.admit("new", now=step)
        budget.charge("new", READ_SIZE)
        assert not budget.admit("new", now=step)  # holding a read over the limit: waits
        assert budget.release("new", READ_SIZE, now=step + 0.5) == ["new"]
    assert budget.used == budget.limit
    assert budget.waiting == 1  # the stalled stream still waits for its own acknowledgements


def test_under_contention_a_stream_over_its_fair_share_waits_even_below_the_limit():
    budget = SendBudget(1000, read_size=10)
    budget.charge("big", 600)  # read while alone: no share applied
    budget.charge("small", 100)
    budget.charge("c", 10)
    assert budget.share() == 333
    assert budget.admit("big", now=0.0)  # nobody waits yet: below the limit, it reads
    budget.charge("big", 300)  # 1,010: spent
    assert not budget.admit("small", now=1.0)  # contention from now on
    assert not budget.admit("big", now=1.0)  # 900 > its share of 333
    # Room again: the stream within its share goes first, though it asked later.
    assert budget.release("c", 10, now=2.0) == []  # 1,000: still no room
    assert budget.release("big", 5, now=3.0) == ["small"]  # room for one read
    # "big" is still over its share (895 > 500 with 2 streams holding a charge): below the
    # limit and contended, it waits, while "small", within its share, reads at once.
    assert budget.share() == 500
    assert budget.admit("small", now=3.0)
    budget.charge("small", 10)
    assert budget.admit("new", now=3.0)  # holds nothing: never waits
    assert budget.waiting == 1
    # No waiter within its share left: "big" gets the room that is left.
    assert budget.release("small", 110, now=4.0) == ["big"]
    assert budget.longest_wait == 3.0


def test_waiters_within_their_share_are_granted_oldest_first_and_only_once():
    budget = SendBudget(100, read_size=10)
    for name in "cabdx":
        budget.charge(name, 20)
    assert not budget.admit("x", now=0.0)  # spent
    for name in "cab":
        assert not budget.admit(name, now=0.0)
    assert not budget.admit("c", now=0.5)  # asking again keeps its place
    budget.cancel("a")
    assert budget.waits == 4
    # 15 bytes of room: two reads of 10 fit about, not every waiter at once.
    assert budget.release("d", 15, now=1.0) == ["x", "c"]
    assert budget.release("d", 5, now=1.0) == ["b"]  # "d" holds nothing now
    assert budget.waiting == 0 and budget.used == 80


def test_a_waiter_whose_charge_is_all_acknowledged_reads_even_with_the_budget_spent():
    budget = SendBudget(100, read_size=10)
    budget.charge("a", 90)
    budget.charge("b", 30)
    assert not budget.admit("b", now=0.0)
    assert budget.release("b", 30, now=1.0) == ["b"]  # 90 < 100 too, but it holds nothing


def test_used_stays_under_the_limit_plus_one_read_per_stream():
    rng = __import__("random").Random(7)
    for limit, streams, stalled in ((1000, 20, 0), (1000, 20, 5), (300, 40, 10), (5000, 8, 2)):
        budget = SendBudget(limit, read_size=100)
        charged = [0] * streams
        waiting = set()
        for step in range(20_000):
            k = rng.randrange(streams)
            if rng.random() < 0.5 and k not in waiting:
                if budget.admit(k, now=step):
                    read = rng.randint(0, 100)  # at most one read of 100 bytes
                    charged[k] += read
                    budget.charge(k, read)
                else:
                    waiting.add(k)
            elif charged[k] and k >= stalled:  # the first `stalled` are never acknowledged
                acked = rng.randint(1, charged[k])
                charged[k] -= acked
                granted = budget.release(k, acked, now=step)
                assert len(granted) == len(set(granted)) and set(granted) <= waiting
                waiting -= set(granted)
            assert budget.used == sum(charged)
            assert budget.used < limit + streams * 100
            assert budget.waiting == len(waiting)
            # Nobody waits holding nothing: a stream without a charge always reads.
            assert all(charged[w] for w in waiting)
            # Nobody waits within its share with room left but because a release granted
            # about as many reads as fit (ones within their share first).
        assert budget.peak >= limit and budget.waits > 0
        assert len(budget._fair) + len(budget._over) <= 2 * budget.waiting + 64 + 1


def test_a_release_grants_only_what_fits_and_later_releases_the_rest():
    budget = SendBudget(1000, read_size=100)
    for k in range(10):
        budget.charge(k, 99)
    budget.charge("x", 11)
    for k in range(10):
        assert not budget.admit(k, now=0.0)
    assert budget.release("x", 2, now=1.0) == [0]  # 1 byte of room: one read
    assert budget.release(0, 99, now=2.0) == [1]  # 0 holds nothing: not waiting any more
    budget.charge(1, 100)  # 1 read: spent again
    assert budget.release(9, 50, now=3.0) == [2]
    assert budget.release(8, 99, now=3.0) == [8, 3, 4]  # 8 holds nothing; 149 of room


def test_the_queues_stay_bounded_by_the_waiters():
    budget = SendBudget(100, read_size=10)
    budget.charge("hog", 100)
    for round_ in range(1000):
        budget.charge(round_, 5)
        assert not budget.admit(round_, now=0.0)
        budget.cancel(round_)
        budget.release(round_, 5, now=0.0)
    assert budget.waiting == 0
    assert len(budget._fair) + len(budget._over) <= 65


def test_thousands_of_waiters_cost_little_per_call():
    budget = SendBudget(64 << 20, read_size=READ_SIZE)
    streams = 5000
    for k in range(streams):
        budget.charge(k, 16 << 10)
    budget.charge("hog", 64 << 20)
    for k in range(streams):
        assert not budget.admit(k, now=0.0)
    granted = []
    for k in range(streams):  # every acknowledgement a stream's own: each granted in turn
        granted += budget.release(k, 16 << 10, now=1.0)
    assert sorted(granted) == list(range(streams)) and budget.waiting == 0


def test_streams_receive_large_only_while_few_enough_to_hold_a_quarter_of_the_limit():
    budget = SendBudget(4 << 20)
    for _ in range(4):
        budget.add_stream()
    assert budget.few_streams(256 << 10)  # 4 x 256 KiB = 1 MiB, a quarter of 4 MiB
    budget.add_stream()
    assert not budget.few_streams(256 << 10) and budget.few_streams(64 << 10)
    budget.remove_stream()
    assert budget.few_streams(256 << 10)


# The shell -------------------------------------------------------------------------------

class FakeQuic:
    """What a StreamPipe asks of its QUIC connection; acknowledgements are set by hand."""

    def __init__(self):
        self.unacked = {}  # stream id -> bytes written, not acknowledged
        self.sent = {}
        self.resets = []

    def send_stream_data(self, stream_id, data, end_stream=False):
        self.unacked[stream_id] = self.unacked.get(stream_id, 0) + len(data)
        self.sent[stream_id] = self.sent.get(stream_id, b"") + data

    def stream_send_buffered(self, stream_id):
        return self.unacked.get(stream_id, 0)

    def ack(self, stream_id):
        self.unacked[stream_id] = 0

    def reset_stream(self, stream_id, error_code):
        self.resets.append(stream_id)

    def pause_stream(self, stream_id):
        pass

    def resume_stream(self, stream_id):
        pass


class FakeConnection:
    def __init__(self):
        self.quic = FakeQuic()

    def transmit(self):
        pass


async def _pipes(budget, count, connection=None, first=0):
    """`count` pipes on one fake connection, with their client ends (reader, writer)."""
    connection = connection or FakeConnection()
    pipes, clients, done = [], [], []
    for stream_id in range(first, first + count):
        (reader, writer), client = await stream_pair()
        pipes.append(StreamPipe(connection, stream_id, reader, writer,
                                on_done=done.append, budget=budget))
        clients.append(client)
    return connection.quic, pipes, clients, done


def _ack_all(quic, pipes):
    for pipe in pipes:
        quic.ack(pipe.stream_id)
        pipe.progress()


def test_many_idle_streams_and_one_active_stream_flows_and_new_streams_read():
    async def main():
        budget = SendBudget(READ_SIZE)
        quic, pipes, clients, _ = await _pipes(budget, 200)  # 200 idle: 12.5 MiB of reads
        active_pipe, (_, active) = pipes[0], clients[0]
        data = os.urandom(4 << 20)
        active.write(data)
        # The active stream moves 64 budgets' worth as its bytes are acknowledged.
        async with asyncio.timeout(30):
            while len(quic.sent.get(0, b"")) < len(data):
                await asyncio.sleep(0.001)
                assert budget.used <= budget.limit + READ_SIZE
                _ack_all(quic, [active_pipe])
        assert quic.sent[0] == data and budget.waits > 0
        # 200 streams: each socket is received one read at a time.
        assert active_pipe.writer.transport.max_size == READ_SIZE
        # A stream that was idle all along reads its first bytes at once.
        clients[150][1].write(b"first")
        await wait_for(lambda: quic.sent.get(150) == b"first")
        for pipe in pipes:
            pipe.close(abort=True)
        for _, writer in clients:
            writer.close()
    run(main())


def test_a_spent_budget_pauses_readers_and_grants_them_in_arrival_order():
    async def main():
        budget = SendBudget(4 * READ_SIZE)
        order = []
        real_release = budget.release

        def release(pipe, count, now):
            granted = real_release(pipe, count, now)
            order.extend(pipe.stream_id for pipe in granted)
            return granted
        budget.release = release
        quic, pipes, clients, _ = await _pipes(budget, 1, first=3)
        clients[0][1].write(b"s" * 4 * READ_SIZE)  # stream 3, alone, spends the budget
        await wait_for(lambda: budget.used == 4 * READ_SIZE and budget.waiting == 1)
        # Streams opened now hold nothing: each reads once though the budget is spent.
        connection = pipes[0].connection
        _, more, more_clients, _ = await _pipes(budget, 3, connection)
        pipes, clients = more + pipes, more_clients + clients
        for k in (2, 0, 1):
            clients[k][1].write(b"x" * 1000)
            await wait_for(lambda: budget.waiting == 2 + (k != 2) + (k == 1))
        # Holding a charge now, with the budget spent, they wait with their sockets paused:
        # their clients' next bytes stay in the kernel.
        for _, writer in clients[:3]:
            writer.write(b"y" * 1000)
        await asyncio.sleep(0.05)  # time enough to read, had a socket not been paused
        assert not any(pipe.writer.transport.is_reading() for pipe in pipes[:3])
        assert budget.used == 4 * READ_SIZE + 3000
        assert all(len(quic.sent[k]) == 1000 for k in range(3))
        _ack_all(quic, pipes[3:])  # room again: stream 3 holds nothing, then oldest first
        assert order == [3, 2, 0, 1] and budget.waiting == 0
        await wait_for(lambda: sum(len(v) for v in quic.sent.values())
                       == 4 * READ_SIZE + 6000)
        assert all(pipe.writer.transport.is_reading() for pipe in pipes)
        assert budget.used == 6000
        _ack_all(quic, pipes)
        assert budget.used == 0
        for pipe in pipes:
            pipe.close(abort=True)
        for _, writer in clients:
            writer.close()
    run(main())


def test_a_stream_that_ends_gives_its_charge_back():
    async def main():
        budget = SendBudget(1 << 20)
        quic, pipes, clients, done = await _pipes(budget, 2)
        # Reset (abort): what it held is freed at once.
        clients[0][1].write(b"x" * 1000)
        await wait_for(lambda: budget.used == 1000)
        pipes[0].reset()
        assert budget.used == 0 and done == [pipes[0]]
        # Clean end: QUIC still holds the unacknowledged bytes, so they stay charged and the
        # owner keeps the pipe until the peer acknowledged them.
        clients[1][1].write(b"y" * 2000)
        clients[1][1].write_eof()
        await wait_for(lambda: pipes[1]._tcp_finished)
        pipes[1].data_received(b"", end_stream=True)
        await wait_for(lambda: pipes[1]._closed)
        assert budget.used == 2000 and done == [pipes[0]]
        _ack_all(quic, pipes[1:])
        assert budget.used == 0 and done == [pipes[0], pipes[1]]
        assert budget.streams == 0
        for _, writer in clients:
            writer.close()
    run(main())


def test_a_lone_stream_receives_large_and_many_receive_one_read_at_a_time():
    async def main():
        budget = SendBudget(64 << 20)
        quic, pipes, clients, _ = await _pipes(budget, 1)
        clients[0][1].write(b"a")
        await wait_for(lambda: quic.sent.get(0) == b"a")
        assert pipes[0].writer.transport.max_size == LARGE_RECEIVE
        _, more, more_clients, _ = await _pipes(budget, 64, pipes[0].connection, first=1)
        clients[0][1].write(b"b")  # 65 streams of 256 KiB would be more than 16 MiB
        await wait_for(lambda: quic.sent.get(0) == b"ab")
        await asyncio.sleep(0)
        assert pipes[0].writer.transport.max_size == READ_SIZE
        for pipe in pipes + more:
            pipe.close(abort=True)
        assert budget.streams == 0
        for _, writer in clients + more_clients:
            writer.close()
    run(main())


def test_a_lingering_stream_is_freed_when_its_session_ends():
    async def main():
        budget = SendBudget(1 << 20)
        quic, pipes, clients, done = await _pipes(budget, 1)
        clients[0][1].write(b"z" * 3000)
        clients[0][1].write_eof()
        await wait_for(lambda: pipes[0]._tcp_finished)
        pipes[0].data_received(b"", end_stream=True)
        await wait_for(lambda: pipes[0]._closed)
        assert budget.used == 3000 and done == []
        pipes[0].close(abort=True)  # what a closing session does to its pipes
        assert budget.used == 0 and done == pipes
        clients[0][1].close()
    run(main())


# A deployment ----------------------------------------------------------------------------

def test_idle_streams_leave_room_for_an_active_stream_and_new_ones():
    # 256 KiB per node, 40 streams idle after 64 KiB each (2.5 MiB read in all): the old
    # reserving budget stalled every other stream here.
    limit = 4 * READ_SIZE

    async def main():
        async with LocalDeployment(agent_kwargs={"relay_only": True, "send_budget": limit},
                                   connector_kwargs={"send_budget": limit}) as d:
            addr = d.forward_address(d.tcp_forward)
            idle = []
            async with asyncio.timeout(60):
                for _ in range(40):
                    reader, writer = await asyncio.open_connection(*addr)
                    chunk = os.urandom(READ_SIZE)
                    writer.write(chunk)
                    assert await reader.readexactly(len(chunk)) == chunk
                    idle.append(writer)
                data = os.urandom(8 << 20)
                assert await tcp_round_trip(addr, data) == data
                assert await tcp_round_trip(addr, b"new") == b"new"
            for node in (d.agent, d.connector):
                budget = node.status()["send_budget"]
                assert budget["limit"] == limit and budget["waits"] > 0, budget
                assert budget["peak"] <= limit + 41 * READ_SIZE, budget
            # Everything acknowledged: the idle streams hold nothing.
            await wait_for(lambda: d.agent.send_budget.used == 0
                           and d.connector.send_budget.used == 0, 10)
            for writer in idle:
                writer.close()
    run(main())


def test_many_streams_under_a_small_budget_arrive_byte_identical_and_give_it_back():
    limit = 1 << 20

    async def main():
        async with LocalDeployment(agent_kwargs={"relay_only": True, "send_budget": limit},
                                   connector_kwargs={"send_budget": limit}) as d:
            addr = d.forward_address(d.tcp_forward)
            blobs = [os.urandom(384 << 10) for _ in range(64)]
            async with asyncio.timeout(120):
                echoed = await asyncio.gather(*(tcp_round_trip(addr, b) for b in blobs))
            assert echoed == blobs
            for node in (d.agent, d.connector):
                budget = node.status()["send_budget"]
                assert budget["peak"] <= limit + 64 * READ_SIZE, budget
            await wait_for(lambda: d.agent.send_budget.used == 0
                           and d.connector.send_budget.used == 0, 10)
            await wait_for(lambda: not any(s.pipes for s in d.agent.sessions.values()), 10)
    run(main())


def test_streams_stalled_by_a_service_that_does_not_read_leave_a_new_stream_moving(monkeypatch):
    # 16 streams to a service that never reads hold their charges (nothing of theirs is
    # acknowledged once the peer's windows are full), more than the whole budget; a stream
    # through another session still moves its bytes. Small windows keep the test small.
    limit = 1 << 20
    monkeypatch.setattr(qc, "E2E_STREAM_WINDOW", 128 << 10)
    monkeypatch.setattr(tunnel, "RECEIVE_HIGH_WATER", 64 << 10)

    async def main():
        held = []

        async def never_read(reader, writer):
            held.append(writer)
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        listener.bind(("127.0.0.1", 0))
        stall = await asyncio.start_server(never_read, sock=listener)
        stall_forward = Forward.parse("tcp:127.0.0.1:0=stall")
        service = Service.parse(f"stall=tcp:127.0.0.1:{listener.getsockname()[1]}")
        clients = []
        try:
            async with LocalDeployment(
                    agent_kwargs={"relay_only": True, "send_budget": limit},
                    connector_kwargs={"send_budget": limit},
                    extra_services=(service,), extra_forwards=(stall_forward,)) as d:
                addr = d.forward_address(stall_forward)
                budget = d.agent.send_budget
                for _ in range(16):
                    reader, writer = await asyncio.open_connection(*addr)
                    writer.write(bytes(8 << 20))  # past the kernel's buffers too
                    clients.append(writer)
                # Stalled once the kernel's buffers towards the service are full too (up to
                # 4 MiB each): every one waits, for acknowledgements that do not come.
                async with asyncio.timeout(60):
                    quiet = 0
                    while quiet < 20:  # 1 s on end
                        await asyncio.sleep(0.05)
                        stalled = budget.waiting == 16 and budget.used >= limit
                        quiet = quiet + 1 if stalled else 0
                data = os.urandom(2 << 20)
                echo = d.forward_address(d.tcp_forward)
                assert await tcp_round_trip(echo, data, timeout=30) == data
                # The stalled streams still hold the budget: the new stream moved past them.
                assert budget.used >= limit and budget.waiting > 0, budget.status()
        finally:
            for writer in clients + held:
                writer.close()
            stall.close()
    run(main())
