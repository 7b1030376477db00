"""Many light nodes in one process, for bench_fleet.py: each a real mTLS QUIC control
connection to its intermediate (mahole's own configuration, endpoint and control framing),
registered and kept alive, all on one UDP socket. No sessions of their own beyond what the
driver asks for: agents open sessions (OpenSession, timed until SessionOpened) and close them.

Driven over stdin/stdout with one JSON object a line:
  -> {"registered": N, "failed": F, "seconds": S}     once every node tried to register
  <- {"open": K, "service": NAME, "interval": SECONDS}  agents open K sessions, one each
  -> {"latencies_ms": [...], "errors": E}
  <- {"quit": true}
"""

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aioquic.quic import events as qe  # noqa: E402

from mahole import connection as qc  # noqa: E402
from mahole import identity  # noqa: E402
from mahole.endpoint import ConnectionHandler, Endpoint  # noqa: E402
from mahole.roles.node import ControlStream, bind_udp  # noqa: E402
from mahole.wire import control  # noqa: E402

HANDSHAKES_AT_ONCE = 48
REGISTER_TIMEOUT = 30.0


class LightNode(ConnectionHandler):
    def __init__(self, worker, name, role, addr, server_name):
        self.worker = worker
        self.name = name
        self.role = role
        self.addr = addr
        self.server_name = server_name
        self.registered = asyncio.get_running_loop().create_future()
        self.replies = {}  # request id -> Future of SessionOpened / Error
        self.connection = None
        self.stream = None

    def connect(self):
        worker = self.worker
        node = identity.load_identity(str(worker.certs / f"{self.name}.crt"),
                                      str(worker.certs / f"{self.name}.key"))
        config = qc.configuration(node, str(worker.certs / "ca.crt"), is_client=True,
                                  alpn=qc.ALPN_CONTROL, server_name=self.server_name,
                                  idle_timeout=120.0)
        quic = qc.NodeQuicConnection(configuration=config)
        quic.connect(self.addr, now=worker.endpoint.now())
        self.connection = worker.endpoint.add_connection(quic, self, peer_addr=self.addr)
        self.stream = ControlStream(self.connection)
        self.connection.transmit()

    def quic_event(self, connection, event):
        if isinstance(event, qe.HandshakeCompleted):
            services = (self.worker.service,) if self.role == "connector" else ()
            self.stream.send(control.Register(role=self.role, name=self.name,
                                              services=services))
        elif isinstance(event, qe.StreamDataReceived):
            for message in self.stream.feed(event.data):
                self._message(message)
        elif isinstance(event, qe.ConnectionTerminated):
            if not self.registered.done():
                self.registered.set_exception(ConnectionError(event.reason_phrase))

    def _message(self, message):
        if isinstance(message, control.Registered) and not self.registered.done():
            self.registered.set_result(True)
        elif isinstance(message, control.Error) and not self.registered.done():
            self.registered.set_exception(ConnectionError(message.message))
        elif isinstance(message, (control.SessionOpened, control.Error)):
            reply = self.replies.pop(getattr(message, "request_id", None), None)
            if reply is not None and not reply.done():
                reply.set_result(message)
        elif isinstance(message, control.Ping):
            self.stream.send(control.Pong(nonce=message.nonce))

    def keepalive(self):
        if self.connection is not None and not self.connection.closed:
            self.connection.quic.send_ping(0)
            self.connection.transmit()


class Worker:
    def __init__(self, args):
        self.certs = Path(args.certs)
        self.service = args.service
        self.args = args
        self.endpoint = None
        self.nodes = []

    async def run(self):
        args = self.args
        sock = bind_udp("127.0.0.1", 0)
        self.endpoint = Endpoint(sock, batch_size=64)
        self.endpoint.start()
        homes = [_hostport(text) for text in args.intermediates.split(",")]
        self.nodes = [LightNode(self, f"{args.prefix}{i}", args.role, homes[i % len(homes)],
                                "127.0.0.1")
                      for i in range(args.start, args.start + args.count)]
        started = time.perf_counter()
        failed = 0
        gate = asyncio.Semaphore(HANDSHAKES_AT_ONCE)
        # From the start: the first nodes must not fall silent (and be closed by the
        # intermediate's 30 s idle timeout) while the last ones are still registering.
        keepalive = asyncio.get_running_loop().create_task(self._keepalive())

        async def register(node):
            nonlocal failed
            async with gate:
                node.connect()
                try:
                    await asyncio.wait_for(node.registered, REGISTER_TIMEOUT)
                except (ConnectionError, asyncio.TimeoutError):
                    failed += 1

        await asyncio.gather(*(register(node) for node in self.nodes))
        _say({"registered": len(self.nodes) - failed, "failed": failed,
              "seconds": time.perf_counter() - started})
        reader = await _stdin_reader()
        while line := await reader.readline():
            command = json.loads(line)
            if command.get("quit"):
                break
            if "open" in command:
                _say(await self._open(command["open"], command["service"],
                                      command["interval"]))
        keepalive.cancel()

    async def _keepalive(self):
        """A PING from every node each interval, spread evenly over it (as independent
        nodes would send them), not in one burst."""
        slices = 20
        while True:
            for part in range(slices):
                await asyncio.sleep(self.args.keepalive / slices)
                for node in self.nodes[part::slices]:
                    node.keepalive()

    async def _open(self, count, service, interval):
        latencies, errors = [], 0
        live = [n for n in self.nodes if n.registered.done() and not n.registered.exception()]
        request_ids = iter(range(1, 1 << 30))
        for _ in range(count):
            node = random.choice(live)
            request_id = next(request_ids)
            reply = asyncio.get_running_loop().create_future()
            node.replies[request_id] = reply
            started = time.perf_counter()
            node.stream.send(control.OpenSession(request_id=request_id, service=service))
            try:
                message = await asyncio.wait_for(reply, 10)
            except asyncio.TimeoutError:
                errors += 1
                continue
            if isinstance(message, control.SessionOpened):
                latencies.append((time.perf_counter() - started) * 1000)
                node.stream.send(control.SessionClosed(session_id=message.session_id,
                                                       reason="benchmark"))
            else:
                errors += 1
            await asyncio.sleep(interval)
        return {"latencies_ms": latencies, "errors": errors}


async def _stdin_reader():
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def _hostport(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def _say(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--certs", required=True)
    parser.add_argument("--intermediates", required=True, help="HOST:PORT,HOST:PORT,...")
    parser.add_argument("--role", choices=("agent", "connector"), required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--service", default="svc")
    parser.add_argument("--keepalive", type=float, default=10.0)
    asyncio.run(Worker(parser.parse_args()).run())


if __name__ == "__main__":
    main()
