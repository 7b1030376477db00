"""`python -m mahole demo`: a whole deployment on loopback, checked end to end.

Creates throw-away certificates, starts an intermediate, a connector with built-in TCP and UDP
echo services and an agent with a TCP and a UDP forward, sends data through both forwards,
checks it comes back identical, and prints what it saw. Exit status 0 only if all went well.
`LocalDeployment` is also what the integration tests use.
"""

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time

from . import identity
from .config import AgentConfig, ConnectorConfig, Forward, IntermediateConfig, Service

log = logging.getLogger(__name__)


class EchoUdp(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


async def _echo_tcp(reader, writer):
    try:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


def issue_certificates(directory, agent="alice", connector="connector1",
                       intermediate="intermediate", host="127.0.0.1"):
    identity.init_ca(directory)
    identity.issue(directory, "intermediate", intermediate, hosts=[host])
    identity.issue(directory, "connector", connector)
    identity.issue(directory, "agent", agent)


class LocalDeployment:
    """Intermediate + connector (echo services) + agent (forwards) on loopback, in-process."""

    def __init__(self, directory=None, *, allow=("*=*",), agent="alice",
                 connector="connector1", extra_services=(), extra_forwards=(),
                 intermediate_kwargs=None, agent_kwargs=None, connector_kwargs=None):
        self._own_dir = directory is None
        self.dir = directory or tempfile.mkdtemp(prefix="mahole-")
        self.allow = allow
        self.agent_name = agent
        self.connector_name = connector
        self.extra_services = extra_services
        self.extra_forwards = extra_forwards
        self.intermediate_kwargs = intermediate_kwargs or {}
        self.agent_kwargs = agent_kwargs or {}
        self.connector_kwargs = connector_kwargs or {}
        self.intermediate = self.connector = self.agent = self.agent_api = None
        self._servers = []

    def creds(self, name):
        return {"ca": os.path.join(self.dir, "ca.crt"),
                "cert": os.path.join(self.dir, f"{name}.crt"),
                "key": os.path.join(self.dir, f"{name}.key")}

    async def start(self):
        from .api import Agent
        from .roles.connector import Connector
        from .roles.intermediate import Intermediate

        if not os.path.exists(os.path.join(self.dir, "ca.crt")):
            issue_certificates(self.dir, self.agent_name, self.connector_name)
        tcp_echo = await asyncio.start_server(_echo_tcp, "127.0.0.1", 0)
        self._servers.append(tcp_echo)
        udp_transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            EchoUdp, local_addr=("127.0.0.1", 0))
        self._servers.append(udp_transport)
        self.tcp_echo_port = tcp_echo.sockets[0].getsockname()[1]
        self.udp_echo_port = udp_transport.get_extra_info("sockname")[1]

        self.intermediate = Intermediate(IntermediateConfig(**{
            "listen": ("127.0.0.1", 0), "allow": tuple(self.allow),
            "offer": (f"{self.connector_name}=*",), **self.creds("intermediate"),
            **self.intermediate_kwargs}))
        await self.intermediate.start()
        node = {"intermediate": self.intermediate.local_address[:2],
                "bind": ("127.0.0.1", 0)}
        services = (Service.parse(f"echo=tcp:127.0.0.1:{self.tcp_echo_port}"),
                    Service.parse(f"echo-udp=udp:127.0.0.1:{self.udp_echo_port}"),
                    *self.extra_services)
        self.connector = Connector(ConnectorConfig(
            services=services, **{**node, **self.connector_kwargs},
            **self.creds(self.connector_name)))
        await self.connector.start()
        self.tcp_forward = Forward.parse("tcp:127.0.0.1:0=echo")
        self.udp_forward = Forward.parse("udp:127.0.0.1:0=echo-udp")
        # The agent as the command line runs it: the library's Agent with its forwards.
        self.agent_api = Agent._from_config(AgentConfig(
            forwards=(self.tcp_forward, self.udp_forward, *self.extra_forwards),
            **{**node, **self.agent_kwargs}, **self.creds(self.agent_name)))
        await self.agent_api.start(wait_registered=False)
        self.agent = self.agent_api._node  # the role inside, for tests that look at it
        await self.connector.wait_registered(10)
        await self.agent.wait_registered(10)
        return self

    def forward_address(self, forward):
        """Where the agent's forward listens (host, port)."""
        return self.agent_api.forward_address(forward)

    async def stop(self):
        if self.agent_api is not None:
            with contextlib.suppress(Exception):
                await self.agent_api.close()
        for role in (self.connector, self.intermediate):
            if role is not None:
                with contextlib.suppress(Exception):
                    await role.stop()
        for server in self._servers:
            server.close()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    async def __aenter__(self):
        try:
            return await self.start()
        except BaseException:
            await self.stop()
            raise

    async def __aexit__(self, *exc):
        await self.stop()


async def tcp_round_trip(addr, data, timeout=60.0):
    """Send data through a TCP echo path and return what came back (sending concurrently)."""
    reader, writer = await asyncio.open_connection(*addr)

    async def send():
        writer.write(data)
        await writer.drain()
        writer.write_eof()

    sender = asyncio.get_running_loop().create_task(send())
    received = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await reader.read(1 << 20)
                if not chunk:
                    break
                received += chunk
            await sender
    finally:
        sender.cancel()
        writer.close()
    return bytes(received)


class _UdpClient(asyncio.DatagramProtocol):
    def __init__(self):
        self.queue = asyncio.Queue()

    def datagram_received(self, data, addr):
        self.queue.put_nowait(data)


async def udp_round_trips(addr, payloads, timeout=10.0):
    """Send each payload and wait for its echo; returns the list of replies (None if lost)."""
    transport, client = await asyncio.get_running_loop().create_datagram_endpoint(
        _UdpClient, remote_addr=addr)
    replies = []
    try:
        for payload in payloads:
            transport.sendto(payload)
            try:
                replies.append(await asyncio.wait_for(client.queue.get(), timeout))
            except asyncio.TimeoutError:
                replies.append(None)
    finally:
        transport.close()
    return replies


async def _punching_done(agent, timeout):
    """Wait until every session of the agent knows whether it goes direct."""
    async with asyncio.timeout(timeout):
        while any(s.punch_outcome is None for s in agent.sessions.values()):
            await asyncio.sleep(0.01)


async def _demo(total_bytes):
    results = {"ok": False}
    async with LocalDeployment() as deployment:
        agent = deployment.agent
        # First contact opens the sessions over the relay; then hole punching runs.
        tcp_addr = deployment.forward_address(deployment.tcp_forward)
        udp_addr = deployment.forward_address(deployment.udp_forward)
        await tcp_round_trip(tcp_addr, b"hello")
        await udp_round_trips(udp_addr, [b"hello"])
        await _punching_done(agent, deployment.agent.cfg.punch_deadline + 2)
        data = os.urandom(total_bytes)
        started = time.perf_counter()
        echoed = await tcp_round_trip(tcp_addr, data)
        elapsed = time.perf_counter() - started
        tcp_ok = echoed == data
        payloads = [os.urandom(n) for n in (1, 100, 500, 1000) for _ in range(5)]
        started = time.perf_counter()
        replies = await udp_round_trips(udp_addr, payloads)
        udp_elapsed = time.perf_counter() - started
        udp_ok = replies == payloads
        sessions = {s["service"]: s for s in agent.status()["sessions"]}
        results = {
            "ok": tcp_ok and udp_ok,
            "tcp": {"service": "echo", "ok": tcp_ok, "bytes_checked": len(echoed),
                    "sha256": hashlib.sha256(data).hexdigest()[:16],
                    "seconds": round(elapsed, 3),
                    "throughput_mbit_s": round(2 * len(data) * 8 / elapsed / 1e6, 1),
                    "path": sessions.get("echo", {}).get("path"),
                    "switch_ms": sessions.get("echo", {}).get("switch_ms"),
                    "rtt_ms": sessions.get("echo", {}).get("rtt_ms")},
            "udp": {"service": "echo-udp", "ok": udp_ok,
                    "datagrams_checked": sum(r == p for r, p in zip(replies, payloads)),
                    "datagrams_sent": len(payloads),
                    "bytes_checked": sum(len(p) for r, p in zip(replies, payloads) if r == p),
                    "seconds": round(udp_elapsed, 3),
                    "path": sessions.get("echo-udp", {}).get("path"),
                    "switch_ms": sessions.get("echo-udp", {}).get("switch_ms"),
                    "rtt_ms": sessions.get("echo-udp", {}).get("rtt_ms")},
            "intermediate": {k: deployment.intermediate.status()["relay"][k]
                             for k in ("relayed_packets", "relayed_bytes")},
        }
    return results


def run(json_output=False, total_bytes=4 << 20):
    print("mahole demo: starting an intermediate, a connector (echo services) and an agent "
          "on loopback…", file=sys.stderr, flush=True)
    try:
        results = asyncio.run(_demo(total_bytes))
    except Exception as exc:  # noqa: BLE001 - the demo reports any failure in one line
        print(f"mahole demo: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if json_output:
        print(json.dumps(results, indent=2))
    else:
        tcp, udp = results["tcp"], results["udp"]
        rows = [("forward", "path", "to direct ms", "rtt ms", "checked", "throughput", "result"),
                ("tcp → echo", tcp["path"], _ms(tcp["switch_ms"]), _ms(tcp["rtt_ms"]),
                 f"{tcp['bytes_checked']:,} B", f"{tcp['throughput_mbit_s']} Mbit/s",
                 "ok" if tcp["ok"] else "FAILED"),
                ("udp → echo-udp", udp["path"], _ms(udp["switch_ms"]), _ms(udp["rtt_ms"]),
                 f"{udp['datagrams_checked']}/{udp['datagrams_sent']} datagrams", "-",
                 "ok" if udp["ok"] else "FAILED")]
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        print(f"relayed by the intermediate before the direct path: "
              f"{results['intermediate']['relayed_packets']:,} packets, "
              f"{results['intermediate']['relayed_bytes']:,} bytes (end-to-end encrypted; "
              f"it holds no keys)")
        print("demo " + ("passed" if results["ok"] else "FAILED"))
    return 0 if results["ok"] else 1


def _ms(value):
    return "-" if value is None else f"{value:.2f}"
