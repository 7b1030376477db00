"""Shared pieces of the edge tests: a NAT in front of one node, a traffic check, RSS."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from mahole.demo import issue_certificates
from mahole.status import fetch
from ports import free_port


class _Side(asyncio.DatagramProtocol):
    def __init__(self, on_datagram):
        self.on_datagram = on_datagram
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.on_datagram(data, addr, self)


class NatBox:
    """A NAT on loopback in front of one node: the node sends to `inside`; the box sends on
    to the intermediate from its public socket (`public`) and hands back what comes in there.

    `rebind()` gives it a new public port (a NAT rebinding, RFC 4787 §4.3); `tap(data)`, if
    set, sees every datagram the node sends out and returns True to withhold it (an on-path
    attacker that copies or delays packets)."""

    def __init__(self, upstream):
        self.upstream = upstream  # callable -> the intermediate's (host, port)
        self.node = None
        self.inside = None
        self.public = None
        self.tap = None
        self._inner = None
        self._outer = None

    async def start(self):
        loop = asyncio.get_running_loop()
        self._inner, _ = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_node), local_addr=("127.0.0.1", 0))
        self.inside = self._inner.get_extra_info("sockname")[:2]
        await self.rebind()
        return self

    async def rebind(self):
        loop = asyncio.get_running_loop()
        old = self._outer
        self._outer, _ = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_outside), local_addr=("127.0.0.1", 0))
        self.public = self._outer.get_extra_info("sockname")[:2]
        if old is not None:
            old.close()

    def _from_node(self, data, addr, side):
        self.node = addr
        if self.tap is not None and self.tap(data):
            return
        self._outer.sendto(data, self.upstream())

    def _from_outside(self, data, addr, side):
        if side.transport is self._outer and self.node is not None:
            self._inner.sendto(data, self.node)

    def close(self):
        for transport in (self._inner, self._outer):
            if transport is not None:
                transport.close()


class Attacker(asyncio.DatagramProtocol):
    """A UDP socket on loopback that counts what it receives, by first byte."""

    def __init__(self):
        self.transport = None
        self.received = []

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.received.append(data)

    @classmethod
    async def open(cls, host="127.0.0.1"):
        _, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
            cls, local_addr=(host, 0))
        return protocol

    @property
    def address(self):
        return self.transport.get_extra_info("sockname")[:2]

    def relay_frames(self):
        return [d for d in self.received if d and d[0] == 0x10]

    def close(self):
        self.transport.close()


class Echoer:
    """Keeps a TCP connection through a forward busy: a 512-byte message every `every`
    seconds, each checked when it comes back. `echoes` counts good round trips, `failures`
    holds what went wrong; `gap()` is the longest wait for an echo so far."""

    def __init__(self, address, every=0.02):
        self.address = address
        self.every = every
        self.echoes = 0
        self.failures = []
        self.longest = 0.0
        self._task = None

    async def start(self):
        self._reader, self._writer = await asyncio.open_connection(*self.address)
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self):
        n = 0
        try:
            while True:
                payload = n.to_bytes(4, "big") * 128
                started = time.monotonic()
                self._writer.write(payload)
                echoed = await asyncio.wait_for(self._reader.readexactly(len(payload)), 10)
                self.longest = max(self.longest, time.monotonic() - started)
                if echoed != payload:
                    self.failures.append(f"echo {n} differs")
                    return
                self.echoes += 1
                n += 1
                await asyncio.sleep(self.every)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.failures.append(repr(exc))

    async def stop(self):
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._writer.close()


def rss_kb(pid=None):
    """VmRSS of a process (this one by default), in KiB."""
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")




class IntermediateProcess:
    """`python -m mahole intermediate …` in its own process group, always ended; its /status
    on a loopback port."""

    def __init__(self, tmp_path, *flags, listen_host="127.0.0.1"):
        self.port = free_port(socket.SOCK_DGRAM, listen_host)
        self.status_port = free_port()
        host = f"[{listen_host}]" if ":" in listen_host else listen_host
        self.log_path = tmp_path / "intermediate.log"
        args = ["-v", "intermediate", "--listen", f"{host}:{self.port}", "--allow", "*=*",
                "--status", f"127.0.0.1:{self.status_port}", "--ca", str(tmp_path / "ca.crt"),
                "--cert", str(tmp_path / "intermediate.crt"),
                "--key", str(tmp_path / "intermediate.key"), *flags]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "mahole", *args], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    @property
    def address(self):
        return ("127.0.0.1", self.port)

    async def status(self):
        try:
            code, _headers, body = await fetch("127.0.0.1", self.status_port, "/status")
        except (OSError, ValueError, asyncio.TimeoutError):
            return None
        return json.loads(body) if code == 200 else None

    async def wait_up(self, timeout=20):
        async with asyncio.timeout(timeout):
            while await self.status() is None:
                assert self.proc.poll() is None, self.log()
                await asyncio.sleep(0.05)

    def rss_kb(self):
        return rss_kb(self.proc.pid)

    def log(self):
        return self.log_path.read_text()

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


class Nodes:
    """A connector offering a TCP echo service as `echo` and an agent forwarding to it, both in
    this process, registered with the intermediate at `address` (relay only by default, so
    the session's traffic crosses the intermediate)."""

    def __init__(self, cert_dir, address, agent="alice", connector="connector1",
                 relay_only=True):
        self.cert_dir = cert_dir
        self.address = address
        self.agent_name = agent
        self.connector_name = connector
        self.relay_only = relay_only
        self.agent = self.connector = self._echo = None

    def creds(self, name):
        return {"ca": str(self.cert_dir / "ca.crt"), "cert": str(self.cert_dir / f"{name}.crt"),
                "key": str(self.cert_dir / f"{name}.key")}

    async def __aenter__(self):
        from mahole.config import ConnectorConfig, Forward, Service
        from mahole.demo import _echo_tcp
        from mahole.roles.connector import Connector

        self._echo = await asyncio.start_server(_echo_tcp, "127.0.0.1", 0)
        port = self._echo.sockets[0].getsockname()[1]
        common = {"intermediate": self.address, "bind": ("127.0.0.1", 0),
                  "relay_only": self.relay_only}
        self.connector = Connector(ConnectorConfig(
            services=(Service.parse(f"echo=tcp:127.0.0.1:{port}"),), **common,
            **self.creds(self.connector_name)))
        await self.connector.start()
        self.forward = Forward.parse("tcp:127.0.0.1:0=echo")
        self.agent = await self.start_agent(self.agent_name)
        await self.connector.wait_registered(10)
        return self

    async def start_agent(self, name):
        """The role inside a library agent with one TCP forward (as the command line)."""
        from mahole import Agent
        from mahole.config import AgentConfig

        agent = Agent._from_config(AgentConfig(
            forwards=(self.forward,), intermediate=self.address, bind=("127.0.0.1", 0),
            relay_only=self.relay_only, **self.creds(name)))
        await agent.start(wait_registered=False)
        await agent._node.wait_registered(10)
        return agent._node

    def forward_address(self, forward):
        return self.agent.forwards.address(forward)

    async def __aexit__(self, *exc):
        for role in (self.agent, self.connector):
            if role is not None:
                try:
                    await role.stop()
                except Exception:  # noqa: BLE001
                    pass
        if self._echo is not None:
            self._echo.close()


class LoneIntermediate:
    """An in-process intermediate (no nodes) on `host`, with IntermediateConfig overrides."""

    def __init__(self, cert_dir, host="127.0.0.1", **cfg):
        self.cert_dir = cert_dir
        self.host = host
        self.cfg = cfg
        self.intermediate = None

    async def __aenter__(self):
        from mahole.config import IntermediateConfig
        from mahole.roles.intermediate import Intermediate

        self.intermediate = Intermediate(IntermediateConfig(
            listen=(self.host, 0), allow=("*=*",), ca=str(self.cert_dir / "ca.crt"),
            cert=str(self.cert_dir / "intermediate.crt"),
            key=str(self.cert_dir / "intermediate.key"), **self.cfg))
        await self.intermediate.start()
        return self.intermediate

    async def __aexit__(self, *exc):
        await self.intermediate.stop()


async def exchange(client, data, to, count=1, timeout=1.0):
    """Send data from client (an `Attacker`) count times; the datagrams that came back
    within timeout seconds of the last one."""
    before = len(client.received)
    for _ in range(count):
        client.transport.sendto(data, to)
    await asyncio.sleep(timeout)
    return client.received[before:]


def parse_vn(data):
    """(dcid, scid, versions) of a Version Negotiation packet (RFC 9000 §17.2.1)."""
    assert data[0] & 0x80 and data[1:5] == b"\x00\x00\x00\x00", data[:8]
    dcid_len = data[5]
    dcid = data[6:6 + dcid_len]
    pos = 6 + dcid_len
    scid = data[pos + 1:pos + 1 + data[pos]]
    pos += 1 + data[pos]
    versions = [int.from_bytes(data[i:i + 4], "big") for i in range(pos, len(data), 4)]
    return dcid, scid, versions


@pytest.fixture
def certs(tmp_path):
    """A deployment's certificates in tmp_path."""
    issue_certificates(tmp_path)
    return tmp_path
