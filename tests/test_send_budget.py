"""The send budget: what a node read from local TCP and the peer has not acknowledged, all its
streams together. The core on a fake clock, its shell (StreamPipe) against a fake QUIC
connection, and a deployment with many idle streams."""

import asyncio
import os

import pytest

from aio_helpers import run, wait_for

from mahole.demo import LocalDeployment, tcp_round_trip
from mahole.send_budget import SendBudget
from mahole.tunnel import LARGE_RECEIVE, READ_SIZE, StreamPipe, stream_pair


# The core --------------------------------------------------------------------------------

def test_reads_are_admitted_below_the_limit_and_charged_what_they_returned():
    budget = SendBudget(100)
    assert budget.admit("a", now=0.0)
    budget.charge(60)
    assert budget.admit("b", now=0.0)  # 60 < 100: admitted, nothing reserved
    budget.charge(70)  # one read may take it past the limit
    assert budget.used == 130 and budget.peak == 130
    assert not budget.admit("a", now=1.0)
    assert budget.status() == {"limit": 100, "used": 130, "peak": 130, "waiting": 1,
                               "waits": 1, "streams": 0, "longest_wait": 0.0}
    assert budget.release(30, now=2.0) == []  # 100: still not below the limit
    assert budget.release(1, now=3.5) == ["a"]
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


def test_streams_receive_large_only_while_few_enough_to_hold_a_quarter_of_the_limit():
    budget = SendBudget(4 << 20)
    for _ in range(4):
        budget.add_stream()
    assert budget.few_streams(256 << 10)  # 4 x 256 KiB = 1 MiB, a quarter of 4 MiB
    budget.add_stream()
    assert not budget.few_streams(256 << 10) and budget.few_streams(64 << 10)
    budget.remove_stream()
    assert budget.few_streams(256 << 10)


def test_waiters_are_granted_oldest_first_and_only_once():
    budget = SendBudget(10)
    budget.charge(10)
    for name in "cab":
        assert not budget.admit(name, now=0.0)
    assert not budget.admit("c", now=0.5)  # asking again keeps its place
    budget.cancel("a")
    # A newcomer queues behind the waiting ones even with room (none until the release).
    assert budget.release(1, now=1.0) == ["c", "b"]
    assert budget.status()["waits"] == 3
    budget.charge(5)
    assert not budget.admit("d", now=1.0)
    assert budget.release(4, now=1.0) == []
    assert budget.release(1, now=2.0) == ["d"] and budget.used == 9


def test_used_stays_under_the_limit_plus_one_read_per_stream():
    rng = __import__("random").Random(7)
    limit, streams = 1000, 20
    budget = SendBudget(limit)
    charged = [0] * streams
    waiting = set()
    for step in range(20_000):
        k = rng.randrange(streams)
        if rng.random() < 0.5 and k not in waiting:
            if budget.admit(k, now=step):
                read = rng.randint(1, 100)  # at most one read of 100 bytes
                charged[k] += read
                budget.charge(read)
            else:
                waiting.add(k)
        elif charged[k]:
            acked = rng.randint(1, charged[k])
            charged[k] -= acked
            waiting -= set(budget.release(acked, now=step))
        assert budget.used == sum(charged)
        assert budget.used < limit + streams * 100
        # Nobody waits while there is room: a release grants every waiter below the limit.
        assert not waiting or budget.used >= limit
    assert budget.peak >= limit and budget.waits > 0


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
        budget = SendBudget(READ_SIZE)
        order = []
        real_release = budget.release

        def release(count, now):
            granted = real_release(count, now)
            order.extend(pipe.stream_id for pipe in granted)
            return granted
        budget.release = release
        quic, pipes, clients, _ = await _pipes(budget, 1, first=3)
        clients[0][1].write(b"s" * READ_SIZE)  # stream 3 spends the budget
        await wait_for(lambda: budget.used == READ_SIZE)
        # Streams opened now wait before their first read, holding nothing.
        connection = pipes[0].connection
        _, more, more_clients, _ = await _pipes(budget, 3, connection)
        pipes, clients = more + pipes, more_clients + clients
        for _, writer in reversed(clients[:3]):
            writer.write(b"x" * 1000)
        await wait_for(lambda: budget.waiting == 4)  # 3 asked first, for its next read
        await asyncio.sleep(0.05)  # time enough to read, had a socket not been paused
        # Waiting streams' sockets are paused: their clients' bytes stay in the kernel.
        assert not any(pipe.writer.transport.is_reading() for pipe in pipes[:3])
        assert budget.used == READ_SIZE and list(quic.sent) == [3]
        _ack_all(quic, pipes[3:])  # room again: every waiter may read, oldest first
        assert order == [3, 0, 1, 2] and budget.waiting == 0
        await wait_for(lambda: sum(len(v) for v in quic.sent.values()) == READ_SIZE + 3000)
        assert all(pipe.writer.transport.is_reading() for pipe in pipes)
        assert budget.used == 3000
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
