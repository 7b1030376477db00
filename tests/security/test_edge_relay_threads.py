"""An intermediate with two relay threads (--relay-threads 2): it relays a session, and
while a flood of relay frames keeps both of its sockets busy, STUN requests are answered and
a new node completes its QUIC handshake and registers.

The intermediate runs as its own process; the flood is another one, from 16 source ports so
that the kernel's SO_REUSEPORT hash sends it to both sockets, bounded in time (it stops by
itself) and ended by PID in any case.
"""

import asyncio
import os
import signal
import subprocess
import sys

from aio_helpers import run, wait_for
from edge_helpers import Attacker, Echoer, IntermediateProcess, Nodes

from mahole import identity
from mahole._fast import RELAY_COMPILED
from mahole.demo import issue_certificates
from mahole.wire import stun

FLOOD_SECONDS = 20.0  # the most it runs; the test ends it once its checks are done
FLOOD_SOURCES = 16
STUN_CLIENTS = 16  # all on one socket by chance: 1 in 2**16
# Relay frames of no session (each dropped and counted by whichever thread reads it), sent
# with UDP GSO from several sockets as fast as they go.
FLOOD = r"""
import os, socket, sys, time
host, port, seconds, n = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
frame = b"\x10" + os.urandom(16) + bytes(1200)
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    socks.append(s)
cmsg = [(socket.SOL_UDP, 103, len(frame).to_bytes(2, sys.byteorder))]
bufs = [frame] * 32
end = time.monotonic() + seconds
while time.monotonic() < end:
    for s in socks:
        try:
            s.sendmsg(bufs, cmsg, 0, (host, port))
        except BlockingIOError:
            time.sleep(0.0005)
        except OSError:
            s.sendto(frame, (host, port))
"""


async def stun_answer(client, address, deadline=10.0):
    """A Binding request from client, retransmitted until answered; the response."""
    request = stun.binding_request()
    data = stun.encode(request)
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    seen = 0
    while loop.time() < end:
        client.transport.sendto(data, address)
        await asyncio.sleep(0.2)
        for reply in client.received[seen:]:
            try:
                response = stun.decode(reply)
            except ValueError:
                continue
            if response.transaction_id == request.transaction_id:
                return response
        seen = len(client.received)
    raise AssertionError(f"no STUN answer in {deadline:g} s")


def test_two_relay_threads_relay_and_control_gets_through_a_flood(tmp_path):
    issue_certificates(tmp_path)
    identity.issue(tmp_path, "agent", "bob")
    inter = IntermediateProcess(tmp_path, "--relay-threads", "2")
    flood = None

    async def main():
        nonlocal flood
        await inter.wait_up()
        async with Nodes(tmp_path, inter.address) as nodes:
            echo = await Echoer(nodes.forward_address(nodes.forward)).start()
            try:
                await wait_for(lambda: echo.echoes >= 10, 15)
            finally:
                await echo.stop()
            assert echo.failures == []
            status = await inter.status()
            assert status["relay_threads"] == 2
            assert status["relay"]["relayed_packets"] > 0
            # A saturated relay drops frames of every session alike (the kernel's socket
            # buffers are full): what must get through is the control traffic.
            try:
                flood = subprocess.Popen(
                    [sys.executable, "-c", FLOOD, *map(str, inter.address),
                     str(FLOOD_SECONDS), str(FLOOD_SOURCES)],
                    start_new_session=True, stdin=subprocess.DEVNULL)
                dropped = 0
                for _ in range(200):  # the flood is arriving
                    dropped = (await inter.status())["relay"]["dropped_unknown_session"]
                    if dropped > 20_000:
                        break
                    await asyncio.sleep(0.05)
                assert dropped > 20_000

                clients = [await Attacker.open() for _ in range(STUN_CLIENTS)]
                try:
                    answers = await asyncio.gather(
                        *(stun_answer(c, inter.address) for c in clients))
                    for client, response in zip(clients, answers):
                        assert response.message_class == stun.CLASS_SUCCESS
                        assert response.attributes["XOR-MAPPED-ADDRESS"] == client.address
                finally:
                    for client in clients:
                        client.close()
                if RELAY_COMPILED:
                    # A new agent's handshake too. Not with the pure-Python engine: it reads
                    # every socket on the event loop, so a flood that saturates the loop
                    # delays handshakes past the agent's 10 s registration wait at random.
                    bob = await asyncio.wait_for(nodes.start_agent("bob"), 20)
                    assert bob is not None
                assert flood.poll() is None, "the flood ended before the checks did"
                during = await inter.status()
                assert during["relay"]["handed_off"] > 0  # control through the thread's socket
                assert during["relay"]["handoff_dropped"] == 0
            finally:
                if flood is not None and flood.poll() is None:
                    os.killpg(flood.pid, signal.SIGKILL)
                    flood.wait(10)

    try:
        run(main(), timeout=120)
    finally:
        if flood is not None and flood.poll() is None:
            os.killpg(flood.pid, signal.SIGKILL)
            flood.wait(10)
        inter.stop()


def test_a_second_intermediate_on_the_port_is_refused_not_joined(tmp_path):
    """Relay threads bind with SO_REUSEPORT, which would let a second intermediate of the
    same user join the first one's sockets and take part of its traffic: it must fail to
    start instead, as it does without relay threads."""
    from mahole.config import IntermediateConfig
    from mahole.roles.intermediate import Intermediate
    from mahole.roles.node import StartupError

    issue_certificates(tmp_path)

    def config(port, threads):
        return IntermediateConfig(
            listen=("127.0.0.1", port), allow=("*=*",), relay_threads=threads,
            control_socket="", ca=str(tmp_path / "ca.crt"),
            cert=str(tmp_path / "intermediate.crt"), key=str(tmp_path / "intermediate.key"))

    async def main():
        first = Intermediate(config(0, 2))
        await first.start()
        try:
            assert first.engine.threads == 2
            port = first.local_address[1]
            for threads in (2, 1):
                second = Intermediate(config(port, threads))
                try:
                    await second.start()
                except StartupError as exc:
                    assert "Address already in use" in str(exc)
                else:
                    await second.stop()
                    raise AssertionError(f"a second intermediate started on port {port}")
        finally:
            await first.stop()

    run(main(), timeout=30)
