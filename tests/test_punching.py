"""Hole punching on loopback: two roles on 127.0.0.1 and 127.0.0.2 (distinct host candidates)."""

import asyncio
import os
import socket

import pytest
from aio_helpers import run, wait_for

from mahole.demo import LocalDeployment, tcp_round_trip
from mahole.session_core import DIRECT, RELAY
from mahole.roles.agent import SessionError




def two_hosts(agent=None, connector=None, **kw):
    return LocalDeployment(agent_kwargs={"bind": ("127.0.0.1", 0), **(agent or {})},
                           connector_kwargs={"bind": ("127.0.0.2", 0), **(connector or {})},
                           **kw)


def _only_session(node):
    [session] = node.sessions.values()
    return session


def test_session_opens_on_the_relay_then_moves_to_direct_mid_transfer():
    async def main():
        async with two_hosts() as d:
            # Hold StartPunching until a transfer is under way over the relay.
            gate = asyncio.Event()
            inter = d.intermediate
            start_punching = inter.signaling.start_punching

            def held(session_id, now):
                async def later():
                    await gate.wait()
                    start_punching(session_id, inter.endpoint.now())
                    inter.pump()
                asyncio.get_running_loop().create_task(later())
            inter.signaling.start_punching = held

            data = os.urandom(12 << 20)
            transfer = asyncio.get_running_loop().create_task(
                tcp_round_trip(d.forward_address(d.tcp_forward), data))
            await wait_for(lambda: d.agent.sessions and _only_session(d.agent).connection
                           and _only_session(d.agent).connection.bytes_received > 1 << 20, 30)
            agent_session = _only_session(d.agent)
            assert agent_session.core.route == RELAY and not transfer.done()
            gate.set()
            await wait_for(lambda: agent_session.core.route == DIRECT, 10)
            assert not transfer.done(), "the switch should happen while data is moving"
            assert await transfer == data  # streams survive the switch, no reconnect
            connector_session = _only_session(d.connector)
            for session in (agent_session, connector_session):
                assert session.core.packets[RELAY] > 100 and session.core.packets[DIRECT] > 100
                assert len(session.core.switches) == 1
            assert agent_session.core.direct_addr == connector_session.endpoint.local_address[:2]
            assert connector_session.core.direct_addr == d.agent.endpoint.local_address[:2]
            status = d.agent.status()["sessions"][0]
            assert status["path"] == "direct" and status["switch_ms"] > 0
            assert status["direct_addr"].startswith("127.0.0.2:")
            assert d.connector.status()["sessions"][0]["path"] == "direct"
            # One QUIC connection the whole time: one handshake on each side.
            assert agent_session.connection.quic.host_cid in agent_session.connection.cids
            punching = d.intermediate.status()["punching"]
            assert punching["attempts"] == 1 and punching["direct"] == 1
            assert punching["time_to_direct_ms_median"] > 0
    run(main())


def test_relay_only_never_punches():
    async def main():
        async with two_hosts(agent={"relay_only": True}) as d:
            data = os.urandom(1 << 20)
            assert await tcp_round_trip(d.forward_address(d.tcp_forward), data) == data
            session = _only_session(d.agent)
            assert session.core.route == RELAY and session.core.packets[DIRECT] == 0
            assert d.agent.puncher.punches == {}
            assert d.intermediate.status()["punching"]["attempts"] == 0
    run(main())


def test_direct_only_uses_no_relay():
    async def main():
        async with two_hosts(agent={"direct_only": True},
                             connector={"direct_only": True}) as d:
            data = os.urandom(1 << 20)
            assert await tcp_round_trip(d.forward_address(d.tcp_forward), data) == data
            for node in (d.agent, d.connector):
                session = _only_session(node)
                assert session.core.route == DIRECT and session.core.packets[RELAY] == 0
            assert d.intermediate.status()["relay"]["relayed_packets"] == 0
    run(main())


def test_direct_only_fails_clearly_when_punching_fails():
    async def main():
        async with two_hosts(agent={"direct_only": True, "punch_deadline": 1.0},
                             connector={"relay_only": True}) as d:
            with pytest.raises(SessionError, match=r"direct path required \(--direct-only\) "
                                                   r"but hole punching failed"):
                await d.agent.session_for("echo")
            assert d.intermediate.status()["punching"]["relay"] == 1
    run(main())


def test_direct_packets_from_another_address_are_dropped():
    async def main():
        async with two_hosts() as d:
            data = os.urandom(256 << 10)
            assert await tcp_round_trip(d.forward_address(d.tcp_forward), data) == data
            session = _only_session(d.agent)
            await wait_for(lambda: session.core.route == DIRECT)
            before = d.agent.endpoint.counters["dropped_wrong_source"]
            # A short-header packet for the session's connection, from a stranger.
            packet = bytes([0x40]) + session.connection.quic.host_cid + os.urandom(40)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
                stranger.bind(("127.0.0.3", 0))
                for _ in range(5):
                    stranger.sendto(packet, d.agent.endpoint.local_address[:2])
            await wait_for(lambda: d.agent.endpoint.counters["dropped_wrong_source"] >= before + 5)
            assert await tcp_round_trip(d.forward_address(d.tcp_forward), data) == data
    run(main())


def test_repeated_and_stray_signaling_is_ignored_and_counted():
    """A second StartPunching (the intermediate sends one per CandidateAnswer) or a stray
    answer once punching has begun used to raise TransitionError out of the datagram loop
    and skip the rest of the batch; now each is ignored and counted, and data flows."""
    from mahole.wire import control

    async def main():
        async with two_hosts() as d:
            addr = d.forward_address(d.tcp_forward)
            assert await tcp_round_trip(addr, b"before") == b"before"
            session = _only_session(d.agent)
            await wait_for(lambda: session.core.route == DIRECT, 10)
            for node in (d.agent, d.connector):
                sid = _only_session(node).session_id
                node.control_message(control.StartPunching(session_id=sid, delay_ms=0))
                node.control_message(control.StartPunching(session_id=sid, delay_ms=0))
                assert node.puncher.duplicate_signaling >= 1
                assert node.status()["duplicate_signaling"] == node.puncher.duplicate_signaling
            answer = control.CandidateAnswer(session_id=session.session_id, ufrag="abcd",
                                             pwd="a" * 22, candidates=())
            d.agent.control_message(answer)
            assert d.agent.endpoint.counters["handler_errors"] == 0
            assert d.connector.endpoint.counters["handler_errors"] == 0
            assert await tcp_round_trip(addr, b"after" * 1000) == b"after" * 1000
    run(main())


def test_an_answer_to_a_replaced_offer_is_skipped():
    """A network that changes twice within a round trip makes the agent offer twice before
    the first answer comes back. Answers return in the order of the offers: the first is
    the earlier round's, whose credentials would fail every check of the new one, so it is
    skipped and the second round goes direct."""
    async def main():
        async with two_hosts() as d:
            addr = d.forward_address(d.tcp_forward)
            assert await tcp_round_trip(addr, b"before") == b"before"
            session = _only_session(d.agent)
            await wait_for(lambda: session.core.route == DIRECT, 10)
            before = session.punch_outcome
            session.repunch(1)
            session.repunch(2)  # before the first offer's answer
            await wait_for(lambda: session.punch_outcome is not before, 10)
            assert session.punch_outcome.path == "direct", session.punch_outcome
            assert d.agent.puncher.stale_answers == 1
            assert not d.agent.puncher._stale_answers
            assert await tcp_round_trip(addr, b"after") == b"after"
    run(main())


def test_a_node_without_nat_observes_one_port_and_offers_no_predicted_ports():
    """Port prediction's probe (two new mappings, mahole.ice.prediction) on loopback: the
    intermediate's two observers see the node's own port, so nothing is predicted."""
    async def main():
        async with two_hosts(intermediate_kwargs={"stun_alt_port": _free_udp_port()}) as d:
            await wait_for(lambda: (d.agent.status()["port_prediction"] or {}).get("done"), 10)
            prediction = d.agent.status()["port_prediction"]
            port = d.agent.endpoint.local_address[1]
            assert prediction == {"done": True, "allocation": "preserving", "step": None,
                                  "observed_ports": [port, port], "predicted_ports": []}
            data = os.urandom(64 << 10)
            assert await tcp_round_trip(d.forward_address(d.tcp_forward), data) == data
            await wait_for(lambda: _only_session(d.agent).core.route == DIRECT, 10)
            punch = d.connector.puncher.punches[_only_session(d.connector)]
            remote = punch.remote_candidates
            assert any(c.type == "host" for c in remote)
            assert all(c.addr[1] == port for c in remote if c.type == "srflx"), remote
    run(main())


def _free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
