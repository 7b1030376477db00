"""How long an end-to-end session lives, with the real roles on loopback and short timeouts:
an idle session ends and the next use opens a new one, a session that carries traffic (or
holds a stream open) outlives ten idle timeouts, a peer that goes silent is noticed."""

import asyncio
import os
import time

from aio_helpers import run, wait_for

from mahole.demo import LocalDeployment, tcp_round_trip
from mahole.wire.relay import session_tag

IDLE = 0.5


def _closed(node, session_id):
    return [c for c in node.closed_sessions if c["session"] == session_tag(session_id)]


def _only_session(node):
    [session] = node.sessions.values()
    return session


def test_idle_session_ends_and_a_busy_one_never_does():
    short = {"session_idle_timeout": IDLE}

    async def main():
        async with LocalDeployment(agent_kwargs=short, connector_kwargs=short) as d:
            forward = d.forward_address(d.tcp_forward)
            # A TCP connection held open without a byte for ten idle timeouts.
            reader, writer = await asyncio.open_connection(*forward)
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"
            session = _only_session(d.agent)
            await asyncio.sleep(10 * IDLE)
            writer.write(b"still here")
            assert await reader.readexactly(10) == b"still here"
            assert not session.closed and _only_session(d.agent) is session
            writer.close()
            # Then nothing: the session ends by itself, with the reason, on both sides (the
            # side whose timer runs first tells the other through the intermediate).
            await wait_for(lambda: session.closed, 5 * IDLE + 2)
            [closed] = _closed(d.agent, session.session_id)
            assert closed["reason"].endswith(f"idle: no traffic for {IDLE:g} s"), closed
            await wait_for(lambda: _closed(d.connector, session.session_id), 5)
            # UDP datagrams now and then (no stream open) for ten idle timeouts.
            loop = asyncio.get_running_loop()
            replies = asyncio.Queue()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Collect(replies), remote_addr=d.forward_address(d.udp_forward))
            try:
                transport.sendto(b"ping")
                assert await asyncio.wait_for(replies.get(), 10) == b"ping"
                [udp_session] = [s for s in d.agent.sessions.values()
                                 if s.service == "echo-udp"]
                deadline = time.monotonic() + 10 * IDLE
                while time.monotonic() < deadline:
                    transport.sendto(b"ping")
                    assert await asyncio.wait_for(replies.get(), 5) == b"ping"
                    await asyncio.sleep(IDLE / 3)
            finally:
                transport.close()
            assert not udp_session.closed
            await wait_for(lambda: udp_session.closed, 5 * IDLE + 2)
            [closed] = _closed(d.agent, udp_session.session_id)
            assert closed["reason"].endswith(f"idle: no traffic for {IDLE:g} s"), closed
            # The next use opens a new session.
            data = os.urandom(64 << 10)
            assert await tcp_round_trip(forward, data) == data
            [new] = [s for s in d.agent.sessions.values() if s.service == "echo"]
            assert new.session_id != session.session_id
    run(main())


class _Collect(asyncio.DatagramProtocol):
    def __init__(self, queue):
        self.queue = queue

    def datagram_received(self, data, addr):
        self.queue.put_nowait(data)


def test_a_peer_that_goes_silent_is_noticed_within_peer_dead_after():
    fast = {"direct_keepalive": 0.2, "peer_dead_after": 0.8}

    async def main():
        async with LocalDeployment(agent_kwargs=fast, connector_kwargs=fast) as d:
            data = os.urandom(64 << 10)
            assert await tcp_round_trip(d.forward_address(d.tcp_forward), data) == data
            session = _only_session(d.agent)
            # The connector vanishes without a word (as under kill -9, or a cut cable).
            silenced_at = time.monotonic()
            d.connector.endpoint.close()
            await wait_for(lambda: session.closed, 10)
            noticed = time.monotonic() - silenced_at
            [closed] = _closed(d.agent, session.session_id)
            assert closed["reason"] == "the peer stopped answering (connector connector1)"
            # Keepalive + failover + peer_dead_after, with room for a loaded machine.
            assert noticed < 0.2 + 0.5 + 0.8 + 1.0, noticed
    run(main())


def test_a_relayed_stream_survives_a_restart_of_the_intermediate():
    """Relay-only nodes; the intermediate stops mid-stream and a new one starts on the same
    address with no memory of the session. Both members register again and resume the
    session together (ResumeSession): the same stream goes on, byte-identical, on the same
    end-to-end connection."""
    relay = {"relay_only": True}

    async def main():
        from mahole.config import IntermediateConfig
        from mahole.roles.intermediate import Intermediate

        async with LocalDeployment(agent_kwargs=relay, connector_kwargs=relay) as d:
            reader, writer = await asyncio.open_connection(*d.forward_address(d.tcp_forward))
            data = os.urandom(8 << 20)
            echoed = asyncio.ensure_future(reader.readexactly(len(data)))
            session = None
            for offset in range(0, len(data), 64 << 10):
                writer.write(data[offset:offset + (64 << 10)])
                await writer.drain()
                if offset == 2 << 20:
                    session = _only_session(d.agent)
                    assert session.route == "relay"
                    old = d.intermediate
                    listen = old.local_address[:2]
                    await old.stop()
                    d.intermediate = Intermediate(IntermediateConfig(**{
                        **vars(old.cfg), "listen": listen}))
                    await d.intermediate.start()
                await asyncio.sleep(0.002)
            assert await asyncio.wait_for(echoed, 30) == data
            assert _only_session(d.agent) is session and not session.closed
            assert session.core.relay_moves == 0  # the same address: no move, a resumption
            counters = d.intermediate.signaling.counters
            assert counters["sessions_resumed"] == 1 and counters["sessions_opened"] == 0
            writer.close()
    run(main(), timeout=60)
