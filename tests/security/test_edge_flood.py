"""A flood of QUIC handshakes costs the intermediate bounded memory, and the nodes
already there — and a new one — keep working.

The intermediate runs as its own process (`python -m mahole intermediate` with the edge
flags), so its memory is measured alone (VmRSS). The flood is real ClientHellos: the first
datagram of a fresh aioquic client connection each, from sources that never answer.
"""

import asyncio
import time

from aio_helpers import run, wait_for
from edge_helpers import Attacker, Echoer, IntermediateProcess, LoneIntermediate, Nodes

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from mahole import identity
from mahole.connection import ALPN_CONTROL
from mahole.demo import issue_certificates

FLOOD = 3000  # ClientHellos
FLOOD_SECONDS = 6.0  # sent evenly over this long
SOURCES = 4  # attacker hosts (127.0.0.2-5; the nodes are at 127.0.0.1)
MAX_HALF_OPEN = 128
RETRY_THRESHOLD = 32
HANDSHAKE_TIMEOUT = 1.0
RSS_GROWTH_LIMIT_KB = 40 * 1024  # the unbounded intermediate grew 111 MB for 2,000


def client_hellos(n, addr):
    """n first datagrams of aioquic client connections (each a ClientHello, ≥ 1200 bytes)."""
    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN_CONTROL],
                               server_name="127.0.0.1")
    hellos = []
    now = time.monotonic()
    for _ in range(n):
        client = QuicConnection(configuration=config)
        client.connect(addr, now=now)
        (data, _addr), *_ = client.datagrams_to_send(now=now)
        hellos.append(data)
    return hellos


def test_a_handshake_flood_is_bounded_and_nodes_keep_working(tmp_path):
    issue_certificates(tmp_path)
    identity.issue(tmp_path, "agent", "bob")
    inter = IntermediateProcess(tmp_path, "--max-half-open", str(MAX_HALF_OPEN),
                                "--retry-threshold", str(RETRY_THRESHOLD),
                                "--handshake-timeout", str(HANDSHAKE_TIMEOUT))
    hellos = client_hellos(FLOOD, inter.address)
    assert all(len(h) >= 1200 for h in hellos)

    async def main():
        await inter.wait_up()
        async with Nodes(tmp_path, inter.address) as nodes:
            echo = await Echoer(nodes.forward_address(nodes.forward)).start()
            attackers = [await Attacker.open(f"127.0.0.{2 + n}") for n in range(SOURCES)]
            try:
                await wait_for(lambda: echo.echoes >= 10, 10)
                baseline = inter.rss_kb()
                peak = baseline
                newcomer = None
                started = time.monotonic()
                for i, hello in enumerate(hellos):
                    attackers[i % SOURCES].transport.sendto(hello, inter.address)
                    if i % 50 == 49:
                        delay = started + FLOOD_SECONDS * (i + 1) / FLOOD - time.monotonic()
                        await asyncio.sleep(max(delay, 0))
                        peak = max(peak, inter.rss_kb())
                    if i == FLOOD // 2:  # a new node joins in the middle of the flood
                        newcomer = asyncio.ensure_future(nodes.start_agent("bob"))
                flood_took = time.monotonic() - started
                bob = await asyncio.wait_for(newcomer, 15)
                during = await inter.status()
                # Past the handshake timeout every half-open connection is gone.
                await asyncio.sleep(3 * HANDSHAKE_TIMEOUT)
                peak = max(peak, inter.rss_kb())
                after = await inter.status()
                echoes = echo.echoes
                await wait_for(lambda: echo.echoes >= echoes + 10 or echo.failures, 10)
                await bob.stop()
            finally:
                await echo.stop()
                for attacker in attackers:
                    attacker.close()
            retries_seen = sum(1 for a in attackers for d in a.received
                               if d[0] & 0xF0 == 0xF0)  # long header, type Retry
            counters = after["counters"]
            print(f"\nflood: {FLOOD} ClientHellos in {flood_took:.1f} s from {SOURCES} "
                  f"sources; intermediate RSS {baseline / 1024:.1f} MB -> peak "
                  f"{peak / 1024:.1f} MB (+{(peak - baseline) / 1024:.1f} MB); "
                  f"retries {counters['retries_sent']} (seen {retries_seen}), accepted "
                  f"{counters['connections_accepted']}, timed out "
                  f"{counters['handshakes_timed_out']}, refused (full) "
                  f"{counters['half_open_full']}; echoes {echo.echoes}, longest wait "
                  f"{echo.longest * 1000:.0f} ms")
            assert not echo.failures, echo.failures
            assert echo.longest < 2.0, echo.longest
            assert peak - baseline < RSS_GROWTH_LIMIT_KB, (baseline, peak)
            assert counters["retries_sent"] >= FLOOD // 2 and retries_seen > 0
            # Without a Retry answered, no flood source got past RETRY_THRESHOLD at a time.
            assert counters["connections_accepted"] < FLOOD // 4
            assert during["handshakes"]["half_open"] <= MAX_HALF_OPEN
            assert counters["handshakes_timed_out"] > 0
            assert after["handshakes"]["half_open"] == 0
            assert after["nodes"]["agents"] == 2 and after["sessions"]["open"] == 1
            assert counters["nodes_registered"] >= 3  # connector, alice and bob

    try:
        run(main(), timeout=120)
    finally:
        inter.stop()


def test_nodes_register_and_relay_through_a_retry(tmp_path):
    """With Retry for every new connection (--retry-threshold 0) nodes still get in: aioquic's
    client answers the Retry, the token checks out, the session carries data."""

    issue_certificates(tmp_path)

    async def main():
        async with LoneIntermediate(tmp_path, retry_threshold=0) as inter:
            async with Nodes(tmp_path, inter.local_address[:2]) as nodes:
                echo = await Echoer(nodes.forward_address(nodes.forward)).start()
                try:
                    await wait_for(lambda: echo.echoes >= 20 or echo.failures, 10)
                finally:
                    await echo.stop()
                assert not echo.failures, echo.failures
            counters = inter.counters
            assert counters["retries_sent"] >= 2  # the connector and the agent
            assert counters["nodes_registered"] == 2
            assert counters["retry_tokens_invalid"] == 0
    run(main(), timeout=60)


def test_one_host_that_answers_retries_gets_only_its_share(tmp_path):
    """Clients that do answer Retries (real aioquic clients, one host) get
    --max-half-open-per-source handshakes at once; the rest are refused, and another host
    still gets in."""
    issue_certificates(tmp_path)
    share = 3

    async def main():
        async with LoneIntermediate(tmp_path, max_half_open_per_source=share,
                                    retry_threshold=1000) as inter:
            to = inter.local_address[:2]
            host = await Attacker.open("127.0.0.2")
            config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN_CONTROL],
                                       server_name="127.0.0.1")
            clients = {}
            now = time.monotonic()
            for _ in range(10):
                client = QuicConnection(configuration=config)
                client.connect(to, now=now)
                clients[client.host_cid] = client
                for data, _addr in client.datagrams_to_send(now=now):
                    host.transport.sendto(data, to)
            await asyncio.sleep(0.5)
            assert inter.counters["connections_accepted"] == share
            retries = [d for d in host.received if d[0] & 0xF0 == 0xF0]
            assert len(retries) == 10 - share
            # Each Retry answered from the address it was sent to: the token checks out, but
            # the host has its share already.
            for retry in retries:
                client = clients[retry[6:6 + retry[5]]]  # the Retry's DCID: our SCID
                client.receive_datagram(retry, to, now=time.monotonic())
                for data, _addr in client.datagrams_to_send(now=time.monotonic()):
                    host.transport.sendto(data, to)
            await asyncio.sleep(0.5)
            counters = inter.counters
            assert counters["retry_tokens_invalid"] == 0
            assert counters["half_open_source_full"] >= 10 - share
            assert counters["connections_accepted"] == share
            assert len(inter.half_open) == share
            # Another host is not held back by this one.
            other = await Attacker.open("127.0.0.3")
            other.transport.sendto(client_hellos(1, to)[0], to)
            await wait_for(lambda: inter.counters["connections_accepted"] == share + 1, 5)
            host.close()
            other.close()
    run(main(), timeout=30)
