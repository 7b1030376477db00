"""Agent → intermediate relay → connector on loopback: what a user of the forwards sees."""

import asyncio
import hashlib
import os
import random

from aio_helpers import run, wait_for

from mahole.config import Forward, Service
from mahole.demo import LocalDeployment, tcp_round_trip, udp_round_trips
from mahole.tunnel import MAX_DATAGRAM_PAYLOAD, READ_SIZE, RECEIVE_HIGH_WATER, SEND_HIGH_WATER




def relayed(**kw):
    """A deployment whose sessions stay on the relay (the agent never punches)."""
    return LocalDeployment(agent_kwargs={"relay_only": True}, **kw)




async def _digest_service(reader, writer):
    """Reads until the client half-closes, then answers with the SHA-256 and the size."""
    digest, size = hashlib.sha256(), 0
    while True:
        chunk = await reader.read(1 << 16)
        if not chunk:
            break
        digest.update(chunk)
        size += len(chunk)
    writer.write(f"{digest.hexdigest()} {size}\n".encode())
    await writer.drain()
    writer.close()


def test_20_mb_arrive_byte_identical():
    async def main():
        async with relayed() as d:
            data = os.urandom(20 << 20)
            echoed = await tcp_round_trip(d.forward_address(d.tcp_forward), data)
            assert echoed == data
            session = d.agent.status()["sessions"][0]
            assert session["path"] == "relay" and session["service"] == "echo"
            assert session["bytes_sent"] > 20 << 20 and session["bytes_received"] > 20 << 20
            assert session["rtt_ms"] is not None
            relay = d.intermediate.status()["relay"]
            assert relay["relayed_bytes"] > 40 << 20
    run(main())


def test_concurrent_tcp_connections_share_one_session():
    async def main():
        async with relayed() as d:
            addr = d.forward_address(d.tcp_forward)
            blobs = [os.urandom(random.randint(1, 2 << 20)) for _ in range(8)]
            echoed = await asyncio.gather(*(tcp_round_trip(addr, b) for b in blobs))
            assert echoed == blobs
            assert len(d.agent.sessions) == 1
            assert d.intermediate.status()["counters"]["sessions_opened"] == 1
    run(main())


def test_half_close_reaches_the_service_and_the_answer_comes_back():
    async def main():
        server = await asyncio.start_server(_digest_service, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        forward = Forward.parse("tcp:127.0.0.1:0=digest")
        async with relayed(extra_services=(Service.parse(f"digest=tcp:127.0.0.1:{port}"),),
                                   extra_forwards=(forward,)) as d:
            data = os.urandom(3 << 20)
            reader, writer = await asyncio.open_connection(*d.forward_address(forward))
            writer.write(data)
            await writer.drain()
            writer.write_eof()  # our side is done; the service answers only after the EOF
            answer = await reader.read()
            assert answer.decode() == f"{hashlib.sha256(data).hexdigest()} {len(data)}\n"
            writer.close()
        server.close()
    run(main())


def test_slow_reader_bounds_memory_with_backpressure():
    # Well over what the windows and high waters let through before a stall (about 17 MiB
    # with the end-to-end stream window and the kernel's socket buffers), so the stall is seen.
    total = 48 << 20

    async def firehose(reader, writer):
        block = os.urandom(1 << 16)
        try:
            for _ in range(total // len(block)):
                writer.write(block)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def main():
        server = await asyncio.start_server(firehose, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        forward = Forward.parse("tcp:127.0.0.1:0=firehose")
        async with relayed(extra_services=(Service.parse(f"firehose=tcp:127.0.0.1:{port}"),),
                                   extra_forwards=(forward,)) as d:
            reader, writer = await asyncio.open_connection(*d.forward_address(forward))
            writer.write(b"go")
            await writer.drain()
            connector_session = await _one_session(d.connector)
            agent_session = await _one_session(d.agent)

            def buffered():
                agent_pipes = list(agent_session.pipes.values())
                connector_pipes = list(connector_session.pipes.values())
                sent = sum(p.quic.stream_send_buffered(p.stream_id) for p in connector_pipes
                           if hasattr(p, "quic"))
                queued = sum(p.writer.transport.get_write_buffer_size() for p in agent_pipes)
                return sent, queued, sum(p.bytes_to_quic for p in connector_pipes
                                         if hasattr(p, "bytes_to_quic"))

            # Read nothing: the firehose must stall, with bounded buffers in between. The agent's
            # queue passing its high water shows that the kernel's socket buffers are full and
            # the agent stopped granting credit; the stall is then the connector reading no
            # more from the firehose for 0.3 s (one quiet 0.1 s can be a scheduling hiccup
            # mid-transfer, and measuring then would check nothing).
            await wait_for(lambda: buffered()[1] > RECEIVE_HIGH_WATER, 20)
            stalled_at, quiet = None, 0
            for _ in range(100):
                before = buffered()[2]
                await asyncio.sleep(0.1)
                quiet = quiet + 1 if buffered()[2] == before else 0
                if quiet == 3:
                    stalled_at = before
                    break
            assert stalled_at is not None and stalled_at < total // 2, buffered()
            sent, queued, _ = buffered()
            # Between the two apps at most, from the configured windows:
            # - the connector's unacknowledged stream data: its pump stops reading TCP once
            #   more than SEND_HIGH_WATER is unacknowledged, checked after each read, so
            #   SEND_HIGH_WATER plus one READ_SIZE;
            # - the agent's queue towards the reader: stream credit (MAX_STREAM_DATA) is
            #   granted only while the queue is at or under RECEIVE_HIGH_WATER, and reaches at
            #   most one window (max_stream_data) past the highest offset received, all of it
            #   delivered since loopback loses no packet; so after the last grant at most one
            #   window more arrives: RECEIVE_HIGH_WATER plus one window, with no slack.
            window = agent_session.connection.quic.configuration.max_stream_data
            assert sent <= SEND_HIGH_WATER + READ_SIZE, (sent, SEND_HIGH_WATER + READ_SIZE)
            assert queued <= RECEIVE_HIGH_WATER + window, (queued, RECEIVE_HIGH_WATER + window)
            # Now read everything: all of it arrives.
            received = 0
            async with asyncio.timeout(60):
                while chunk := await reader.read(1 << 20):
                    received += len(chunk)
            assert received == total
            writer.close()
        server.close()
    run(main())


async def _one_session(node, timeout=10):
    await wait_for(lambda: len(node.sessions) == 1, timeout)
    return next(iter(node.sessions.values()))


def test_udp_round_trips_and_a_datagram_over_one_frame_does_not_stall_later_ones():
    # Over MAX_DATAGRAM_PAYLOAD - 2 a datagram is fragmented (tests/test_datagrams.py).
    async def main():
        async with relayed() as d:
            addr = d.forward_address(d.udp_forward)
            payloads = [os.urandom(n) for n in (1, 64, 512, MAX_DATAGRAM_PAYLOAD - 2)]
            assert await udp_round_trips(addr, payloads) == payloads
            over_one_frame = os.urandom(MAX_DATAGRAM_PAYLOAD + 100)
            assert await udp_round_trips(addr, [over_one_frame]) == [over_one_frame]
            session = next(s for s in d.agent.status()["sessions"] if s["service"] == "echo-udp")
            assert session["datagrams_dropped_oversize"] == 0
            later = [os.urandom(100) for _ in range(5)]
            assert await udp_round_trips(addr, later) == later
    run(main())


def test_the_intermediate_only_ever_sees_ciphertext():
    marker = b"PLAINTEXT-MARKER-" + os.urandom(8).hex().encode()

    async def main():
        async with relayed() as d:
            seen = []
            # The relay forwards frames unchanged, so what reaches the nodes is exactly what
            # the intermediate handled; record every datagram on both sides.
            for node in (d.agent, d.connector):
                original = node.endpoint.process

                def recording(datagrams, original=original):
                    seen.extend(data for data, _ in datagrams)
                    return original(datagrams)
                node.endpoint.process = recording
            data = marker * 2000
            assert await tcp_round_trip(d.forward_address(d.tcp_forward), data) == data
            frames = [frame for frame in seen if frame[:1] == b"\x10"]
            assert len(frames) > 50
            assert not any(marker[:16] in frame for frame in seen)
    run(main())


def test_malformed_and_random_datagrams_are_dropped_and_counted():
    async def main():
        async with relayed() as d:
            rng = random.Random(5)
            junk = [bytes([first]) + rng.randbytes(rng.randint(0, 1300))
                    for first in range(256) for _ in range(2)]
            junk += [b"", b"\x10" + b"\x00" * 8, b"\x10" + rng.randbytes(40),
                     b"\xc0\x00\x00\x00\x01\x08" + rng.randbytes(8), b"\x00\x01\x00\x00"]
            targets = [d.intermediate.local_address, d.connector.endpoint.local_address,
                       d.agent.endpoint.local_address]
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                               local_addr=("127.0.0.1", 0))
            for target in targets:
                for datagram in junk:
                    transport.sendto(datagram, target[:2])
            transport.close()

            def dropped(role):
                counters = {**role.endpoint.router.counters(), **role.endpoint.counters}
                return sum(v for k, v in counters.items() if k.startswith("dropped"))
            await wait_for(lambda: dropped(d.connector) > 300 and dropped(d.agent) > 300)
            await wait_for(lambda: dropped(d.intermediate) + d.intermediate.engine.counters()[
                "dropped_unknown_session"] + d.intermediate.engine.counters()["dropped_malformed"]
                + d.intermediate.counters["stun_malformed"] > 300)
            # Everything keeps serving.
            data = os.urandom(1 << 20)
            assert await tcp_round_trip(d.forward_address(d.tcp_forward), data) == data
    run(main())


async def _banner_service(reader, writer):
    """Speaks first, like SSH or SMTP: the banner goes out before anything is read."""
    writer.write(b"SSH-2.0-banner\r\n")
    await writer.drain()
    line = await reader.readline()
    writer.write(b"you said " + line)
    await writer.drain()
    writer.close()


def test_a_service_that_speaks_first_is_reached_before_the_client_writes():
    """Under mahole-e2e/3 the agent's stream-open byte tells the connector of the stream at
    once; without it the connector would wait for the client's first byte, and a client that
    waits for the banner would wait for ever."""
    async def main():
        server = await asyncio.start_server(_banner_service, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        forward = Forward.parse("tcp:127.0.0.1:0=banner")
        async with relayed(extra_services=(Service.parse(f"banner=tcp:127.0.0.1:{port}"),),
                           extra_forwards=(forward,)) as d:
            reader, writer = await asyncio.open_connection(*d.forward_address(forward))
            assert await asyncio.wait_for(reader.readline(), 10) == b"SSH-2.0-banner\r\n"
            writer.write(b"hello\n")
            assert await asyncio.wait_for(reader.read(), 10) == b"you said hello\n"
            writer.close()
            session = next(iter(d.agent.sessions.values()))
            assert session.connection.quic.tls.alpn_negotiated == "mahole-e2e/3"
        server.close()
    run(main())


def test_an_agent_of_the_protocol_before_the_stream_open_byte_still_connects(monkeypatch):
    """An agent that offers only /2 and /1 (an older release) gets streams without the
    stream-open byte: the connector takes the first byte as data, as before."""
    import mahole.connection as qc

    async def main():
        async with relayed() as d:
            monkeypatch.setattr(qc, "ALPN_E2E", ("mahole-e2e/2", "mahole-e2e/1"))
            data = os.urandom(100_000)
            assert await tcp_round_trip(d.forward_address(d.tcp_forward), data) == data
            session = next(iter(d.agent.sessions.values()))
            assert session.connection.quic.tls.alpn_negotiated == "mahole-e2e/2"
            assert not session.stream_open_byte
    run(main())


def test_streams_that_break_the_stream_open_rule_are_refused_and_counted():
    """A hostile agent opens a stream without the stream-open byte and a unidirectional
    stream: neither reaches the service, both are counted, the session keeps serving."""
    async def main():
        async with relayed() as d:
            data = os.urandom(10_000)
            assert await tcp_round_trip(d.forward_address(d.tcp_forward), data) == data
            agent_session = next(iter(d.agent.sessions.values()))
            quic = agent_session.connection.quic
            bad = quic.get_next_available_stream_id()
            quic.send_stream_data(bad, b"\x07not a stream-open byte")
            uni = quic.get_next_available_stream_id(is_unidirectional=True)
            quic.send_stream_data(uni, b"\x00one way")
            agent_session.connection.transmit()
            session = next(iter(d.connector.sessions.values()))
            await wait_for(lambda: session.counters["streams_refused"] == 2)
            streams = session.counters["streams"]
            assert await tcp_round_trip(d.forward_address(d.tcp_forward), data) == data
            assert session.counters["streams"] == streams + 1
    run(main())
