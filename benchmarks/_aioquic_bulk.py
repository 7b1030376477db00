"""Baseline for bench_tunnel.py: plain aioquic bulk transfer on one stream, over loopback.

    python _aioquic_bulk.py server --cert C --key K [--port P] [--host H]
        prints "ready PORT"; for every stream it counts the bytes until FIN, then answers
        the count as ASCII on the same stream (with FIN).
    python _aioquic_bulk.py client --port P --ca CA --server-name NAME --bytes N [--host H]
        connects (aioquic.asyncio.connect), prints "ready", then for every "run" line on
        stdin opens a new bidirectional stream, sends the N bytes with end_stream, waits for
        the count and prints "done SECONDS COUNT" (SECONDS from the first byte handed to
        aioquic to the count received). An empty line or EOF ends it.

Both sides use aioquic's asyncio API (`serve`, `connect`, a `QuicConnectionProtocol`
subclass handling events) and aioquic's default QuicConfiguration flow control and
congestion control (see DEFAULTS), the way a plain aioquic application would; --host (default
127.0.0.1) is where the server listens and the client connects, --congestion-control picks
another of aioquic's controllers (bench_goodput.py).
"""

import argparse
import asyncio
import os
import socket
import ssl
import sys
import time

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration

ALPN = "mahole-bench/1"


def defaults():
    """The QuicConfiguration settings that shape bulk throughput (aioquic's own defaults)."""
    config = QuicConfiguration()
    return {"max_data": config.max_data, "max_stream_data": config.max_stream_data,
            "max_datagram_size": config.max_datagram_size,
            "congestion_control_algorithm": config.congestion_control_algorithm,
            "flow_control": "aioquic doubles a window when half of it is used"}


class CountingServer(QuicConnectionProtocol):
    """Counts the bytes of each stream; on FIN answers the count on the same stream."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.counts = {}

    def quic_event_received(self, event):
        if isinstance(event, qe.StreamDataReceived):
            count = self.counts.get(event.stream_id, 0) + len(event.data)
            if event.end_stream:
                self.counts.pop(event.stream_id, None)
                self._quic.send_stream_data(event.stream_id, str(count).encode(),
                                            end_stream=True)
                self.transmit()
            else:
                self.counts[event.stream_id] = count


class BulkClient(QuicConnectionProtocol):
    """Sends bulk data on new streams and waits for the count the server answers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replies = {}  # stream_id -> (bytearray, Future)

    async def send(self, data):
        quic = self._quic
        stream_id = quic.get_next_available_stream_id()
        reply = bytearray()
        done = asyncio.get_running_loop().create_future()
        self.replies[stream_id] = (reply, done)
        start = time.perf_counter()
        quic.send_stream_data(stream_id, data, end_stream=True)
        self.transmit()
        await done
        return time.perf_counter() - start, int(reply.decode("ascii"))

    def quic_event_received(self, event):
        if isinstance(event, qe.StreamDataReceived):
            entry = self.replies.get(event.stream_id)
            if entry is not None:
                entry[0].extend(event.data)
                if event.end_stream:
                    del self.replies[event.stream_id]
                    entry[1].set_result(None)
        elif isinstance(event, qe.ConnectionTerminated):
            for _reply, done in self.replies.values():
                if not done.done():
                    done.set_exception(ConnectionError(f"connection closed: "
                                                       f"{event.reason_phrase}"))


async def run_server(args):
    config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN],
                               **_congestion_control(args))
    config.load_cert_chain(args.cert, args.key)
    server = await serve(args.host, args.port, configuration=config,
                         create_protocol=CountingServer)
    _set_buffers(server._transport, args.sockbuf)
    port = server._transport.get_extra_info("sockname")[1]
    print(f"ready {port}", flush=True)
    loop = asyncio.get_running_loop()
    stdin = await _stdin_reader(loop)
    await stdin.read()  # the parent closes stdin (or kills us) to stop
    server.close()


async def run_client(args):
    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN],
                               server_name=args.server_name, **_congestion_control(args))
    config.load_verify_locations(cafile=args.ca)
    config.verify_mode = ssl.CERT_REQUIRED
    data = os.urandom(args.bytes)
    loop = asyncio.get_running_loop()
    stdin = await _stdin_reader(loop)
    async with connect(args.host, args.port, configuration=config,
                       create_protocol=BulkClient) as client:
        _set_buffers(client._transport, args.sockbuf)
        print("ready", flush=True)
        while True:
            line = (await stdin.readline()).strip()
            if line != b"run":
                break
            seconds, count = await client.send(data)
            print(f"done {seconds:.6f} {count}", flush=True)


def _congestion_control(args):
    """QuicConfiguration keywords for --congestion-control (none: aioquic's default)."""
    if args.congestion_control:
        return {"congestion_control_algorithm": args.congestion_control}
    return {}


def _set_buffers(transport, size):
    """SO_RCVBUF/SO_SNDBUF on the UDP socket aioquic created (0: leave the OS default)."""
    if size:
        sock = transport.get_extra_info("socket")
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, size)


async def _stdin_reader(loop):
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("server")
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--sockbuf", type=int, default=0)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--congestion-control")
    c = sub.add_parser("client")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--ca", required=True)
    c.add_argument("--server-name", default="127.0.0.1")
    c.add_argument("--bytes", type=int, required=True)
    c.add_argument("--sockbuf", type=int, default=0)
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--congestion-control")
    args = parser.parse_args(argv)
    asyncio.run(run_server(args) if args.mode == "server" else run_client(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
