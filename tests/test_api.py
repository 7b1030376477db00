"""The library API (mahole.api): the whole system in one process on loopback, real QUIC."""

import asyncio
import os

import pytest
from aio_helpers import run, wait_for

import mahole
import mahole.api
from mahole import identity
from mahole.demo import issue_certificates


@pytest.fixture
def certs(tmp_path):
    issue_certificates(tmp_path, "alice", "connector1")
    identity.issue(tmp_path, "agent", "bob")  # same CA: one more agent
    return tmp_path


def creds(certs, name):
    return {"cert": str(certs / f"{name}.crt"), "key": str(certs / f"{name}.key"),
            "ca": str(certs / "ca.crt")}


def pem(certs, name):
    """The same credentials as PEM bytes held in memory."""
    return {key: open(path, "rb").read() for key, path in creds(certs, name).items()}


async def echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def tcp_echo_server():
    return await asyncio.start_server(echo, "127.0.0.1", 0)


class System:
    """An intermediate and a connector (in-process services + one TCP target)."""

    def __init__(self, certs, allow=("*=*",), **agent_settings):
        self.certs = certs
        self.allow = allow
        self.agent_settings = agent_settings

    async def __aenter__(self):
        self.tcp = await tcp_echo_server()
        self.intermediate = mahole.Intermediate(allow=self.allow,
                                                **creds(self.certs, "intermediate"))
        await self.intermediate.start()
        where = self.intermediate.address
        self.connector = mahole.Connector(where, bind=("127.0.0.1", 0),
                                          **creds(self.certs, "connector1"))
        self.connector.serve("echo", echo)
        self.connector.serve_datagrams("upper", lambda data: data.upper())
        self.connector.expose("tcp-echo", f"tcp:127.0.0.1:{self.tcp.sockets[0].getsockname()[1]}")
        await self.connector.start()
        await self.connector.wait_registered()
        return self

    def agent(self, name="alice", **settings):
        return mahole.Agent(self.intermediate.address, bind=("127.0.0.1", 0),
                            **{**creds(self.certs, name), **self.agent_settings, **settings})

    async def __aexit__(self, *exc):
        await self.connector.close()
        await self.intermediate.close()
        self.tcp.close()


def test_open_connection_to_in_process_and_tcp_services_and_session_facts(certs):
    async def main():
        async with System(certs) as system, system.agent() as agent:
            for service in ("echo", "tcp-echo"):
                reader, writer = await agent.open_connection(service)
                data = os.urandom(300_000)
                writer.write(data)
                writer.write_eof()
                assert await reader.read() == data
                writer.close()
            session = await agent.session("echo")
            assert session is await agent.session("echo")  # reused
            assert session.path in ("direct", "relay")
            await wait_for(lambda: session.stats().punch_result is not None, 10)
            stats = session.stats()
            assert isinstance(stats, mahole.SessionStats)
            assert stats.path == session.path and stats.bytes_sent > 0
            assert stats.rtt is not None and stats.rtt < 1
            assert stats.packet_size >= 1200
            assert not session.in_fallback
    run(main(), timeout=60)


def test_datagrams_both_ways_and_too_large(certs):
    async def main():
        async with System(certs) as system, system.agent() as agent:
            session = await agent.session("upper")
            for size in (10, 1400, 8000):
                payload = os.urandom(size // 2).hex().encode()[:size]
                for _ in range(5):  # unreliable by design: retry a lost one
                    await session.send_datagram(payload)
                    try:
                        reply = await asyncio.wait_for(session.recv_datagram(), 2)
                        break
                    except asyncio.TimeoutError:
                        continue
                assert reply == payload.upper()
            with pytest.raises(mahole.DatagramTooLarge):
                await session.send_datagram(bytes(65508))
    run(main(), timeout=60)


def test_several_agents_in_one_process_with_pem_credentials_in_memory(certs):
    async def main():
        async with System(certs) as system:
            alice = mahole.Agent(system.intermediate.address, bind=("127.0.0.1", 0),
                                 **pem(certs, "alice"))
            bob = system.agent("bob")
            async with alice, bob:
                assert alice.name == "alice" and bob.name == "bob"
                assert alice.local_address != bob.local_address

                async def talk(agent, text):
                    reader, writer = await agent.open_connection("echo")
                    writer.write(text)
                    writer.write_eof()
                    reply = await reader.read()
                    writer.close()
                    return reply
                replies = await asyncio.gather(talk(alice, b"from alice"), talk(bob, b"bob"))
                assert replies == [b"from alice", b"bob"]
            with pytest.raises(mahole.Error, match="not running"):
                await alice.session("echo")
    run(main(), timeout=60)


def test_each_refusal_has_its_error_type(certs, monkeypatch):
    async def main():
        async with System(certs, allow=("alice=echo", "alice=nope")) as system:
            async with system.agent() as agent:
                with pytest.raises(mahole.ServiceUnavailable, match="no connector offers"):
                    await agent.session("nope")
                with pytest.raises(mahole.Refused, match="not allowed to reach service"):
                    await agent.session("upper")
            # The connector's certificate is not an agent's.
            with pytest.raises(mahole.Unauthorized, match="certificate for a connector"):
                async with mahole.Agent(system.intermediate.address,
                                        **creds(certs, "connector1")):
                    pass
            # An intermediate that is not there.
            with pytest.raises(mahole.ConnectionLost, match="not registered"):
                agent = mahole.Agent(("127.0.0.1", 9), bind=("127.0.0.1", 0),
                                     **creds(certs, "alice"))
                monkeypatch.setattr(mahole.api, "REGISTER_TIMEOUT", 1.0)
                await agent.start()
            assert issubclass(mahole.DatagramTooLarge, ValueError)
    run(main(), timeout=60)


def test_cancelling_mid_connect_and_closing_during_a_transfer(certs):
    async def main():
        async with System(certs) as system:
            agent = system.agent()
            await agent.start()
            opening = asyncio.ensure_future(agent.open_connection("echo"))
            await asyncio.sleep(0)
            opening.cancel()
            with pytest.raises(asyncio.CancelledError):
                await opening
            # The agent still works after the cancelled open.
            reader, writer = await agent.open_connection("echo")
            writer.write(b"x" * 100_000)
            await reader.readexactly(1000)  # the transfer is under way
            session = await agent.session("echo")
            await agent.close()  # closing during the transfer ends it, cleanly
            assert session.closed
            await asyncio.wait_for(reader.read(), 5)  # what had arrived, then the end
            assert reader.at_eof()
            writer.close()
            with pytest.raises(mahole.ConnectionLost):
                await session.send_datagram(b"late")
    run(main(), timeout=60)


def test_path_changes_report_the_route_and_the_end(certs):
    async def main():
        async with System(certs) as system, system.agent() as agent:
            session = await agent.session("echo")
            changes = []

            async def watch():
                async for change in session.path_changes():
                    changes.append(change)
            watcher = asyncio.ensure_future(watch())
            await wait_for(lambda: session.stats().punch_result is not None, 10)
            await agent.close()
            await asyncio.wait_for(watcher, 5)
            assert changes and changes[-1].path == "none"
            assert all(isinstance(c, mahole.PathChange) for c in changes)
            if session.stats().punch_result == "direct":
                assert changes[0].path == "direct" and changes[0].reason == "nominated"
    run(main(), timeout=60)


def test_services_added_while_the_connector_runs_are_announced_at_once(certs):
    async def main():
        async with System(certs) as system, system.agent() as agent:
            with pytest.raises(mahole.ServiceUnavailable):
                await agent.open_connection("late")
            with pytest.raises(mahole.Error, match="already offered"):
                system.connector.serve("echo", echo)
            with pytest.raises(mahole.Error, match="expected tcp:HOST:PORT"):
                system.connector.expose("bad", "http://x")
            system.connector.serve("late", echo)
            await wait_for(lambda: system.intermediate.status()["counters"].get(
                "services_updated") == 1, 10)
            reader, writer = await agent.open_connection("late")
            writer.write(b"after registration")
            writer.write_eof()
            assert await reader.read() == b"after registration"
            writer.close()
    run(main(), timeout=60)
