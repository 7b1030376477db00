"""Nobody but the node itself moves its observed address and its relay address.

A node sits behind a NAT on loopback (`NatBox`) with a relayed session that carries traffic
the whole time. Attacks from another address must leave the intermediate's record of the
node, the relay session's member address and the node's ObservedAddress alone, and send the
attacker no relay frame; a real NAT rebinding must still move all three.
"""

import asyncio
import os

from aio_helpers import run, wait_for
from edge_helpers import Attacker, Echoer, NatBox

from mahole.demo import LocalDeployment

ATTACK_PACKETS = 200  # forged packets, one every ATTACK_EVERY seconds
ATTACK_EVERY = 0.002
COPIED_PACKETS = 12  # authentic control packets the attacker sends first (every second one)


class Setup:
    """Deployment with the agent behind a NAT box, its session on the relay, traffic on."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path

    async def __aenter__(self):
        self.nat = NatBox(lambda: self.d.intermediate.local_address[:2])
        await self.nat.start()
        self.d = LocalDeployment(str(self.tmp_path), agent_kwargs={
            "intermediate": self.nat.inside, "relay_only": True},
            connector_kwargs={"relay_only": True})
        await self.d.start()
        self.echo = await Echoer(self.d.forward_address(self.d.tcp_forward)).start()
        await wait_for(lambda: self.echo.echoes >= 5, 10)
        self.attacker = await Attacker.open()
        return self

    async def __aexit__(self, *exc):
        self.nat.tap = None
        await self.echo.stop()
        self.attacker.close()
        await self.d.stop()
        self.nat.close()

    def agent_record(self):
        return self.d.intermediate.nodes[("agent", "alice")].addr

    def relay_member(self):
        (session,) = self.d.intermediate.signaling.registry.sessions()
        stats = self.d.intermediate.engine.session_stats(session.session_id)
        return tuple(stats["member_a"][:2])

    def observed_by_agent(self):
        return tuple(self.d.agent.control.observed_addr)

    def where(self):
        return self.agent_record(), self.relay_member(), self.observed_by_agent()

    async def traffic_flows(self, echoes=20):
        target = self.echo.echoes + echoes
        await wait_for(lambda: self.echo.echoes >= target or self.echo.failures, 10)
        assert not self.echo.failures, self.echo.failures


def _short_header_dcid(data):
    """The destination connection ID of a QUIC short-header packet (8 bytes here)."""
    return data[1:9] if data and data[0] & 0xC0 == 0x40 else None


def test_forged_packets_with_the_connection_id_move_nothing(tmp_path):
    async def main():
        async with Setup(tmp_path) as s:
            before = s.where()
            assert before[0] == s.nat.public  # the intermediate sees the NAT's address
            dcids = []
            s.nat.tap = lambda data: dcids.append(_short_header_dcid(data)) and False
            await wait_for(lambda: any(dcids), 5)
            dcid = next(d for d in dcids if d)
            s.nat.tap = None
            router_before = s.d.intermediate.endpoint.counters["datagrams_received"]
            for _ in range(ATTACK_PACKETS):
                s.attacker.transport.sendto(bytes([0x40 | os.urandom(1)[0] & 0x3F]) + dcid
                                            + os.urandom(40), s.d.intermediate.local_address)
                await asyncio.sleep(ATTACK_EVERY)
            await s.traffic_flows()
            assert s.d.intermediate.endpoint.counters["datagrams_received"] \
                >= router_before + ATTACK_PACKETS  # the attack reached the intermediate
            assert s.where() == before
            assert s.attacker.relay_frames() == []
    run(main(), timeout=60)


def test_a_copied_authentic_packet_from_elsewhere_moves_nothing(tmp_path):
    """An on-path attacker sends every second control packet of the node from its own
    address first (the node's copy then arrives as a duplicate, RFC 9000 §12.3). They
    decrypt, so they keep the node alive, but the attacker's address never answers aioquic's
    PATH_CHALLENGE: the node does not move."""
    async def main():
        async with Setup(tmp_path) as s:
            before = s.where()
            target = s.d.intermediate.local_address
            stolen, seen = [], [0]

            def steal(data):
                if not _short_header_dcid(data):
                    return False
                seen[0] += 1
                if seen[0] % 2 and len(stolen) < COPIED_PACKETS:
                    stolen.append(data)
                    s.attacker.transport.sendto(data, target)  # the attacker's copy first
                    asyncio.get_running_loop().call_later(
                        0.005, s.nat._outer.sendto, data, target)  # then the node's own
                    return True
                return False

            counters = s.d.intermediate.shell_counters
            unvalidated = counters["address_changes_unvalidated"]
            s.nat.tap = steal
            await wait_for(lambda: len(stolen) >= COPIED_PACKETS, 30)
            s.nat.tap = None
            await s.traffic_flows()
            # The copies decrypted at the intermediate (else this test proves nothing) ...
            assert counters["address_changes_unvalidated"] > unvalidated
            # ... and moved nothing: not the record, not the relay, not the node's view.
            assert s.where() == before
            assert s.attacker.relay_frames() == []
            # Copies sent again later are duplicates (RFC 9000 §12.3): still nothing.
            for data in stolen:
                s.attacker.transport.sendto(data, target)
            await s.traffic_flows()
            assert s.where() == before
            assert s.attacker.relay_frames() == []
    run(main(), timeout=90)


def test_a_real_nat_rebinding_still_moves_the_node_and_its_relay(tmp_path):
    async def main():
        async with Setup(tmp_path) as s:
            old = s.nat.public
            assert s.where() == (old, old, old)
            moved = s.d.intermediate.shell_counters["address_changes"]
            await s.nat.rebind()
            new = s.nat.public
            await wait_for(lambda: s.where() == (new, new, new), 10)
            assert s.d.intermediate.shell_counters["address_changes"] == moved + 1
            await s.traffic_flows()
            assert s.echo.longest < 5, s.echo.longest
    run(main(), timeout=60)
