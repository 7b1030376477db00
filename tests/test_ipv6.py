"""IPv4 and IPv6 on a node's one socket, on loopback: nodes bind [::]:0 (dual-stack) by
default, reach an intermediate at an IPv4 or an IPv6 address, and an intermediate on [::]
reports IPv4 peers as plain IPv4.

The nodes here are relay-only: bound to every address, they would offer this machine's own
interface addresses as candidates, and tests send only to loopback and to the lab's
namespaces."""

import asyncio
import os
import socket

import pytest
from aio_helpers import run

import mahole
from mahole import identity


def _has_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")


@pytest.fixture
def certs(tmp_path):
    identity.init_ca(tmp_path)
    identity.issue(tmp_path, "intermediate", "relay", hosts=["127.0.0.1", "::1"])
    identity.issue(tmp_path, "connector", "office")
    identity.issue(tmp_path, "agent", "alice")
    return tmp_path


def creds(certs, name):
    return {"cert": str(certs / f"{name}.crt"), "key": str(certs / f"{name}.key"),
            "ca": str(certs / "ca.crt")}


async def echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def session_through(certs, listen, reach):
    """An intermediate on ``listen``; a connector and an agent (default bind: [::]:0) that
    reach it at ``reach``; an echo round trip; their status and the intermediate's."""
    node = {"relay_only": True}
    async with mahole.Intermediate(listen, allow=("*=*",), **creds(certs, "relay")) as inter:
        where = (reach, inter.address[1])
        connector = mahole.Connector(where, intermediate_name="relay", **node,
                                     **creds(certs, "office"))
        connector.serve("echo", echo)
        async with connector, mahole.Agent(where, intermediate_name="relay", **node,
                                           **creds(certs, "alice")) as agent:
            await connector.wait_registered()
            reader, writer = await agent.open_connection("echo")
            data = os.urandom(256 << 10)
            writer.write(data)
            writer.write_eof()
            assert await asyncio.wait_for(reader.readexactly(len(data)), 20) == data
            writer.close()
            return agent.status(), connector.status(), inter.status()


def test_a_dual_stack_node_reaches_an_ipv4_intermediate(certs):
    agent, connector, inter = run(session_through(certs, ("127.0.0.1", 0), "127.0.0.1"))
    assert agent["local_addr"].startswith("[::]:") and connector["local_addr"].startswith("[::]:")
    assert agent["intermediate"]["observed_addr"].startswith("127.0.0.1:")
    assert all(n["addr"].startswith("127.0.0.1:") for n in inter["nodes"]["list"])


def test_a_node_reaches_an_intermediate_at_an_ipv6_address(certs):
    agent, _, inter = run(session_through(certs, ("::1", 0), "::1"))
    assert agent["intermediate"]["addr"].startswith("[::1]:")
    assert agent["intermediate"]["observed_addr"].startswith("[::1]:")
    assert all(n["addr"].startswith("[::1]:") for n in inter["nodes"]["list"])


def test_an_intermediate_on_every_address_reports_ipv4_nodes_as_ipv4(certs):
    _, _, inter = run(session_through(certs, ("::", 0), "127.0.0.1"))
    addrs = [n["addr"] for n in inter["nodes"]["list"]]
    assert addrs and all(a.startswith("127.0.0.1:") for a in addrs), addrs


def test_an_ipv4_only_socket_cannot_reach_an_ipv6_intermediate_and_says_so(certs):
    async def main():
        agent = mahole.Agent(("::1", 4478), bind=("0.0.0.0", 0), **creds(certs, "alice"))
        with pytest.raises(mahole.Error, match="is an IPv6 address, but this node's socket "
                                               "is IPv4 only"):
            await agent.start()
    run(main())
