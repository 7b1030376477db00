"""The agent's local forwards, built on the library (mahole.api): what `mahole agent
--forward` runs.

`tcp:LHOST:LPORT=SERVICE` listens locally; each accepted connection is carried on a new
stream of the service's session (`Session.carry`: `Agent.open_connection` without the copy
through a socket pair). `udp:LHOST:LPORT=SERVICE` carries datagrams: each client address is
one flow of the session's DATAGRAM frames, and replies go back to the address they came for.
A session is opened on first use and reopened when it ends.
"""

import asyncio
import itertools
import logging

from .status import format_hostport
from .tunnel import MAX_FLOW_ID

log = logging.getLogger(__name__)

# UDP datagrams held while a session opens; beyond this they are dropped (UDP semantics).
MAX_PENDING_DATAGRAMS = 64
# UDP clients remembered per forward (each is a flow id); the oldest is forgotten beyond.
MAX_UDP_CLIENTS = 4096


class ForwardError(Exception):
    """A forward cannot listen (address in use, no permission), for a person."""


class Forwards:
    """The listeners of one agent (`mahole.Agent`), and their counters."""

    def __init__(self, agent, forwards):
        self.agent = agent
        self.forwards = list(forwards)
        self.listeners = {}  # Forward -> asyncio.Server or _UdpForward
        self.counters = {"tcp_accepted": 0, "tcp_refused": 0, "udp_dropped": 0}

    async def start(self):
        """Listen on every forward (ForwardError if one cannot)."""
        loop = asyncio.get_running_loop()
        for forward in self.forwards:
            try:
                if forward.proto == "tcp":
                    self.listeners[forward] = await asyncio.start_server(
                        lambda r, w, f=forward: self._tcp_accepted(f, r, w),
                        forward.host, forward.port)
                else:
                    _, self.listeners[forward] = await loop.create_datagram_endpoint(
                        lambda f=forward: _UdpForward(self, f),
                        local_addr=(forward.host, forward.port))
            except OSError as exc:
                self.close()
                raise ForwardError(f"cannot listen on {forward.proto} "
                                   f"{_fmt((forward.host, forward.port))} for "
                                   f"{forward.service}: {exc.strerror or exc}") from None

    def close(self):
        for listener in self.listeners.values():
            if isinstance(listener, asyncio.AbstractServer):
                listener.close()
            elif listener.transport is not None:
                listener.transport.close()

    def address(self, forward):
        """The bound (host, port) of a forward (useful when LPORT was 0)."""
        listener = self.listeners[forward]
        if forward.proto == "tcp":
            return tuple(listener.sockets[0].getsockname()[:2])
        return tuple(listener.transport.get_extra_info("sockname")[:2])

    def lines(self):
        """One line a forward, `tcp 127.0.0.1:8080 → web`, as the agent prints at start."""
        return [f"{f.proto} {_fmt(self.address(f))} \u2192 {f.service}"
                for f in self.forwards if f in self.listeners]

    def status(self):
        return [{"forward": f"{f.proto}:{_fmt(self.address(f))}", "service": f.service}
                for f in self.forwards if f in self.listeners]

    def datagram_received(self, service, flow_id, payload):
        """A reply on a UDP flow of `service`'s session: to the client of that flow."""
        for forward, listener in self.listeners.items():
            if forward.service == service and isinstance(listener, _UdpForward):
                listener.reply(flow_id, payload)

    async def _tcp_accepted(self, forward, reader, writer):
        from .api import Error

        self.counters["tcp_accepted"] += 1
        try:
            session = await self.agent.session(forward.service)
            session.carry(reader, writer)
        except Error as exc:
            self.counters["tcp_refused"] += 1
            log.warning("forward %s:%d -> %s: %s", forward.host, forward.port, forward.service,
                        exc)
            writer.transport.abort()


class _UdpForward(asyncio.DatagramProtocol):
    """A local UDP port: each client address is a flow of the service's session."""

    def __init__(self, forwards, forward):
        self.forwards = forwards
        self.forward = forward
        self.transport = None
        self.flow_ids = {}  # client address -> flow id (oldest first)
        self.flow_addrs = {}  # flow id -> client address
        self._next_flow = itertools.count()
        self.pending = []  # (flow id, datagram) while the session opens

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        flow_id = self._flow(addr)
        session = self.forwards.agent._ready_session(self.forward.service)
        if session is not None:
            session._send_flow(flow_id, data)
            return
        if len(self.pending) >= MAX_PENDING_DATAGRAMS:
            self.forwards.counters["udp_dropped"] += 1
            return
        self.pending.append((flow_id, data))
        if len(self.pending) == 1:
            asyncio.get_running_loop().create_task(self._flush_when_ready())

    def _flow(self, addr):
        flow_id = self.flow_ids.get(addr)
        if flow_id is None:
            if len(self.flow_ids) >= MAX_UDP_CLIENTS:
                oldest = next(iter(self.flow_ids))
                self.flow_addrs.pop(self.flow_ids.pop(oldest), None)
            # 1 to MAX_FLOW_ID (the top bit marks fragments; flow 0 is the library's own),
            # round again after that: the oldest flows were forgotten long before.
            flow_id = next(self._next_flow) % MAX_FLOW_ID + 1
            self.flow_ids[addr] = flow_id
            self.flow_addrs[flow_id] = addr
        return flow_id

    async def _flush_when_ready(self):
        from .api import Error

        try:
            session = await self.forwards.agent.session(self.forward.service)
        except Error as exc:
            log.warning("udp forward to %s: %s", self.forward.service, exc)
            self.forwards.counters["udp_dropped"] += len(self.pending)
            self.pending.clear()
            return
        pending, self.pending = self.pending, []
        for flow_id, data in pending:
            session._send_flow(flow_id, data)

    def reply(self, flow_id, payload):
        addr = self.flow_addrs.get(flow_id)
        if addr is not None and self.transport is not None:
            self.transport.sendto(payload, addr)


def _fmt(addr):
    return format_hostport(*addr[:2])
