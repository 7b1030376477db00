"""Port mapping at a node (mahole.portmapping): the default gateway from the kernel's table,
when a node asks at all, and a real node against a fake PCP gateway on loopback."""

import asyncio
import socket
import struct
import types

from mahole import portmapping
from mahole.demo import LocalDeployment
from mahole.portmapping import default_gateway
from mahole.wire import pcp

from aio_helpers import run, wait_for

ROUTES = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth1\t00000000\t0200000A\t0001\t0\t0\t5\t00000000\t0\t0\t0
bad\tnot hex at all
"""


def test_the_default_gateway_is_the_default_route_with_the_lowest_metric(tmp_path):
    table = tmp_path / "route"
    table.write_text(ROUTES)
    # eth1's route has no gateway flag (on-link), wlan0's a higher metric.
    assert default_gateway(str(table)) == "10.0.0.1"
    table.write_text(ROUTES.splitlines()[0] + "\n")
    assert default_gateway(str(table)) is None
    assert default_gateway(str(tmp_path / "missing")) is None


class FakeGateway(asyncio.DatagramProtocol):
    """A PCP server on loopback: maps every MAP request to 198.51.100.7:62000 for 600 s.
    Before its first real answer it sends two that the node must drop: garbage and an
    answer with another nonce."""

    def __init__(self):
        self.requests = []
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.requests.append(data)
        lifetime = min(struct.unpack_from("!I", data, 4)[0], 600)
        nonce, internal = data[24:36], struct.unpack_from("!H", data, 40)[0]

        def answer(nonce):
            header = struct.pack("!BBxBII", 2, 0x81, 0, lifetime, 1000) + bytes(12)
            return header + nonce + struct.pack("!B3xHH", 17, internal, 62000) + \
                pcp._ip16("198.51.100.7")
        if len(self.requests) == 1:
            self.transport.sendto(b"\x02\x81garbage!", addr)
            self.transport.sendto(answer(bytes(12)), addr)
        self.transport.sendto(answer(nonce), addr)


def test_a_node_maps_through_its_socket_shows_it_and_deletes_it_on_exit():
    async def main():
        loop = asyncio.get_running_loop()
        transport, gateway = await loop.create_datagram_endpoint(
            FakeGateway, local_addr=("127.0.0.1", 0))
        gw = transport.get_extra_info("sockname")[:2]
        try:
            # relay_only: the mapped address is a documentation one; nothing may be sent there.
            async with LocalDeployment(agent_kwargs={"port_mapping_gateway": gw,
                                                     "relay_only": True}) as d:
                await wait_for(lambda: d.agent.status()["port_mapping"]["state"] == "mapped",
                               timeout=5)
                status = d.agent.status()["port_mapping"]
                assert status["protocol"] == "pcp"
                assert status["external_addr"] == "198.51.100.7:62000"
                assert 590 < status["expires_in_s"] <= 600 and status["lifetime_s"] == 600
                assert status["dropped"] == 2  # the garbage and the other nonce
                assert d.agent.mapped_addr() == ("198.51.100.7", 62000)
                port = d.agent.endpoint.local_address[1]
                # The requests came from the node's one socket, for that socket's port.
                assert struct.unpack_from("!H", gateway.requests[0], 40)[0] == port
                # The connector's intermediate is on loopback: it does not ask anyone.
                assert d.connector.status()["port_mapping"]["state"] == "off"
            await wait_for(lambda: len(gateway.requests) >= 2, timeout=2)
            delete = gateway.requests[-1]
            assert struct.unpack_from("!I", delete, 4)[0] == 0  # lifetime 0: delete
            assert delete[24:36] == gateway.requests[0][24:36]  # the mapping's nonce
        finally:
            transport.close()
    run(main())


def test_nodes_of_a_loopback_deployment_never_ask_the_hosts_router():
    async def main():
        async with LocalDeployment(connector_kwargs={"port_mapping": False}) as d:
            agent = d.agent.status()["port_mapping"]
            connector = d.connector.status()["port_mapping"]
            return agent, connector
    agent, connector = run(main())
    assert agent["state"] == "off" and connector["state"] == "off"
    assert "not a wildcard" in agent["reason"] or "loopback" in agent["reason"]
    assert connector["reason"] == "turned off (--no-port-mapping)"


class _Sock:
    def __init__(self, family):
        self.family = family

    def getsockopt(self, *_):
        return 0  # dual-stack


class _Endpoint:
    def __init__(self, addr, family):
        self.local_address = addr
        self.sock = _Sock(family)


class _Node:
    def __init__(self, addr, home, family=socket.AF_INET, **cfg):
        self.endpoint = _Endpoint(addr, family)
        self.homes = [((home, 4478), "relay")]
        self.cfg = types.SimpleNamespace(**cfg)


def test_when_a_node_asks_and_when_it_does_not(monkeypatch):
    """decide() sends nothing; it says whom the node would ask, or why it would not."""
    monkeypatch.setattr(portmapping, "default_gateway", lambda: "192.0.2.1")
    ask = portmapping.PortMapping(_Node(("0.0.0.0", 5000), "198.51.100.1"))
    assert ask.decide() == ("192.0.2.1", 5351)
    dual = portmapping.PortMapping(_Node(("::", 5000, 0, 0), "198.51.100.1", socket.AF_INET6))
    assert dual.decide() == ("192.0.2.1", 5351)
    for node, why in (
            (_Node(("0.0.0.0", 5000), "198.51.100.1", port_mapping=False), "turned off"),
            (_Node(("10.0.0.2", 5000), "198.51.100.1"), "not a wildcard"),
            (_Node(("0.0.0.0", 5000), "127.0.0.1"), "on loopback"),
            (_Node(("::", 5000, 0, 0), "::1", socket.AF_INET6), "on loopback")):
        mapping = portmapping.PortMapping(node)
        assert mapping.decide() is None and why in mapping.off
    explicit = portmapping.PortMapping(_Node(("127.0.0.1", 5000), "127.0.0.1",
                                             port_mapping_gateway=("127.0.0.1", 15351)))
    assert explicit.decide() == ("127.0.0.1", 15351)
    monkeypatch.setattr(portmapping, "default_gateway", lambda: None)
    none = portmapping.PortMapping(_Node(("0.0.0.0", 5000), "198.51.100.1"))
    assert none.decide() is None and none.off == "no IPv4 default gateway"


def test_sessions_hear_of_each_new_mapped_address_once():
    """A mapping that came up (or moved) may take sessions that punched without it direct;
    a renewal of the same address is no news."""
    told = []
    node = _Node(("0.0.0.0", 5000), "198.51.100.1")
    node.candidates_grew = lambda: told.append(True)
    mapping = portmapping.PortMapping(node)
    for addr in (("198.51.100.7", 62000), ("198.51.100.7", 62000), ("198.51.100.7", 62001)):
        mapping._offered(addr)
    assert len(told) == 2
