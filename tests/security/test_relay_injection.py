"""Relay frame injection and forced downgrade.

An attacker who forges a session member's source IP and port (and knows the session id and
the connection IDs, as anyone who saw one packet does) sends relay frames. With relay tokens
(mahole/wire/relay.py) the intermediate relays none of them: each frame must carry its
sender's token, which only that member was told, on its authenticated control connection.
Frames sent straight to a node with the intermediate's address forged reach its QUIC
connection, which authenticates none of them, so no route moves: the session core acts only
on packets aioquic decrypted.

The forged datagrams are real: raw IPv4 packets with the member's source address, written as
root (the suite runs as root in CI; elsewhere these tests skip). Each test first shows that
a forged frame carrying the right token *is* relayed, so the spoofing itself works and a
pass means the token stopped the attack.
"""

import asyncio
import os
import random
import socket
import struct

import pytest
from aio_helpers import run, wait_for

from mahole.demo import LocalDeployment, tcp_round_trip
from mahole.wire.relay import NO_TOKEN, TOKEN_LEN, encode_frame

ATTACK_FRAMES = 200
MARKER = b"forged-by-the-attacker"


def _raw_socket():
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except PermissionError:
        pytest.skip("forging source addresses needs a raw socket (root or CAP_NET_RAW)")


class Spoofer:
    """Sends UDP datagrams with any IPv4 source address and port (IP_HDRINCL)."""

    def __init__(self):
        self.sock = _raw_socket()
        self.sent = 0

    def send(self, src, dst, payload):
        udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0) + payload  # no checksum
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), random.getrandbits(16), 0,
                         64, socket.IPPROTO_UDP, 0, socket.inet_aton(src[0]),
                         socket.inet_aton(dst[0]))  # the kernel fills in the IP checksum
        self.sock.sendto(ip + udp, (dst[0], 0))
        self.sent += 1

    def close(self):
        self.sock.close()


def record_relay_frames(session):
    """Every relay frame the node's session is handed, as a list that grows."""
    seen = []
    original = session.relay_frame_received

    def recording(frame, addr):
        seen.append(bytes(frame))
        return original(frame, addr)
    session.relay_frame_received = recording  # the router calls the entry's attribute
    return seen


def forged_inner(session):
    """A QUIC short-header packet to the session's connection ID, with garbage inside."""
    return b"\x40" + session.connection.quic.host_cid + MARKER + os.urandom(40)


def wrong_tokens(n, right):
    tokens = [NO_TOKEN, bytes(x ^ 1 for x in right)] + [os.urandom(TOKEN_LEN) for _ in range(n)]
    return [t for t in tokens if t != right][:n]


async def open_session(d):
    data = os.urandom(20000)
    assert await tcp_round_trip(d.forward_address(d.tcp_forward), data) == data
    (agent_session,) = d.agent.sessions.values()
    (connector_session,) = d.connector.sessions.values()
    return agent_session, connector_session


async def traffic_flows(d, rounds=3):
    for _ in range(rounds):
        data = os.urandom(50000)
        assert await tcp_round_trip(d.forward_address(d.tcp_forward), data) == data


def test_forged_source_address_without_the_token_injects_nothing(tmp_path):
    """200 frames from the connector's address with wrong tokens: the relay drops every one,
    the agent sees none of them, the session carries on."""
    async def main():
        d = LocalDeployment(str(tmp_path), agent_kwargs={"relay_only": True},
                            connector_kwargs={"relay_only": True})
        spoofer = Spoofer()
        try:
            await d.start()
            agent_session, connector_session = await open_session(d)
            sid = agent_session.session_id
            connector_token = connector_session.core.header[-TOKEN_LEN:]
            assert connector_token != NO_TOKEN  # the node sends the token it was given
            assert agent_session.core.header[-TOKEN_LEN:] not in (NO_TOKEN, connector_token)
            seen = record_relay_frames(agent_session)
            engine = d.intermediate.engine
            relay_addr = d.intermediate.local_address[:2]
            connector_addr = d.connector.endpoint.local_address[:2]

            # The spoofing works: with the connector's token a forged frame is relayed.
            control = encode_frame(sid, forged_inner(agent_session), connector_token)
            spoofer.send(connector_addr, relay_addr, control)
            await wait_for(lambda: control in seen, 5)

            before = engine.counters()
            forged = [encode_frame(sid, forged_inner(agent_session), token)
                      for token in wrong_tokens(ATTACK_FRAMES, connector_token)]
            assert len(forged) == ATTACK_FRAMES
            for frame in forged:
                spoofer.send(connector_addr, relay_addr, frame)
            await wait_for(lambda: engine.counters()["dropped_bad_token"]
                           - before["dropped_bad_token"] >= ATTACK_FRAMES, 10)
            await traffic_flows(d)
            after = engine.counters()
            assert after["dropped_bad_token"] - before["dropped_bad_token"] == ATTACK_FRAMES
            assert engine.session_stats(sid)["dropped_bad_token"] == ATTACK_FRAMES
            assert not any(MARKER in frame for frame in seen[seen.index(control) + 1:])
            assert agent_session.route == connector_session.route == "relay"
            assert not agent_session.closed and not connector_session.closed
        finally:
            spoofer.close()
            await d.stop()
    run(main())


def test_forged_frames_do_not_pull_a_direct_session_back_to_the_relay(tmp_path):
    """A direct session under 200 forged frames, half at the relay (from the connector's
    address, wrong tokens), half at the agent itself (from the intermediate's address):
    it stays direct the whole time, no failover, traffic intact."""
    async def main():
        d = LocalDeployment(str(tmp_path))
        spoofer = Spoofer()
        try:
            await d.start()
            agent_session, connector_session = await open_session(d)
            await wait_for(lambda: agent_session.route == connector_session.route == "direct",
                           15)
            sid = agent_session.session_id
            connector_token = connector_session.core.header[-TOKEN_LEN:]
            engine = d.intermediate.engine
            relay_addr = d.intermediate.local_address[:2]
            connector_addr = d.connector.endpoint.local_address[:2]
            agent_addr = d.agent.endpoint.local_address[:2]
            seen = record_relay_frames(agent_session)
            switches = (list(agent_session.core.switches), list(connector_session.core.switches))
            before = engine.counters()

            routes = []
            tokens = wrong_tokens(ATTACK_FRAMES // 2, connector_token)

            async def attack():
                for i in range(ATTACK_FRAMES):
                    frame = encode_frame(sid, forged_inner(agent_session), tokens[i // 2])
                    if i % 2:
                        spoofer.send(relay_addr, agent_addr, frame)  # straight at the agent
                    else:
                        spoofer.send(connector_addr, relay_addr, frame)  # through the relay
                    routes.append((agent_session.route, connector_session.route))
                    await asyncio.sleep(0.005)

            attacker = asyncio.get_running_loop().create_task(attack())
            await traffic_flows(d, rounds=5)
            await attacker
            await wait_for(lambda: len(seen) >= ATTACK_FRAMES // 2, 5)
            await traffic_flows(d, rounds=2)

            assert spoofer.sent == ATTACK_FRAMES
            assert set(routes) == {("direct", "direct")}
            assert agent_session.route == connector_session.route == "direct"
            assert (agent_session.core.switches, connector_session.core.switches) == switches
            assert agent_session.core.failovers == connector_session.core.failovers == []
            assert engine.counters()["dropped_bad_token"] - before["dropped_bad_token"] == (
                ATTACK_FRAMES // 2)
            assert engine.counters()["relayed_packets"] == before["relayed_packets"]
            # The frames sent straight at the agent reached its QUIC connection and were
            # thrown away there: none authenticated, none moved anything.
            assert sum(MARKER in frame for frame in seen) == ATTACK_FRAMES // 2
            assert not agent_session.closed and not connector_session.closed
        finally:
            spoofer.close()
            await d.stop()
    run(main())
