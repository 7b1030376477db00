"""mahole as a library: agents, connectors and an intermediate inside an asyncio program.

```python
import mahole

async with mahole.Agent(intermediate="relay.example.com:4478", cert="certs/alice.crt",
                        key="certs/alice.key", ca="certs/ca.crt") as agent:
    reader, writer = await agent.open_connection("web")
    session = await agent.session("web")
    print(session.path)  # "direct", "relay" or "none"
```

Each object owns its socket, sessions and tasks (no state shared between objects, so several
can run in one process); leaving `async with` closes them. Credentials are file paths or PEM
bytes held in memory. Errors are `mahole.Error` and its subclasses, with the messages the
command line prints. docs/api.md lists every name with an example.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Literal, Optional, TypeVar, Union, cast

from .cli import parse_address
from .config import AgentConfig, ConnectorConfig, DEFAULT_PORT, IntermediateConfig, Service
from .roles import agent as _agent
from .roles import connector as _connector
from .roles import node as _node
from . import forwards as _forwards
from . import tunnel as _tunnel
from .wire.control import MAX_SERVICES, ErrorCode

__all__ = [
    "Agent", "Connector", "Intermediate", "Session", "SessionStats", "PathChange", "Path",
    "Error", "Unauthorized", "Refused", "ServiceUnavailable", "ConnectionLost",
    "DatagramTooLarge", "Credential",
]

Credential = Union[str, "os.PathLike[str]", bytes]
"""A certificate, key or CA: a file path, or the PEM bytes themselves."""
Path = Literal["direct", "relay", "none"]
StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
DatagramHandler = Callable[[bytes], Union[Optional[bytes], Awaitable[Optional[bytes]]]]

REGISTER_TIMEOUT = 10.0  # s: entering `async with` waits this long for the intermediate
PATH_CHANGES_QUEUE = 256  # route changes kept for a slow `path_changes()` reader


# Errors ------------------------------------------------------------------------------------
class Error(Exception):
    """Everything mahole raises; `str(error)` is the message the command line prints."""


class Unauthorized(Error):
    """Credentials refused: a certificate of the wrong role or CA, a key that does not match,
    or an identity the intermediate will not register. Retrying does not help."""


class Refused(Error):
    """The intermediate refused the request: the ACL denies it, or a quota is used up."""


class ServiceUnavailable(Error):
    """No connector offers the service, its connector is offline, or no session came up
    in time."""


class ConnectionLost(Error):
    """The session or the connection to the intermediate ended."""


class DatagramTooLarge(Error, ValueError):
    """A datagram larger than the session can carry (65,507 bytes; less when the peer
    cannot reassemble fragments)."""


_REFUSALS = {ErrorCode.DENIED: Refused, ErrorCode.RATE_LIMITED: Refused,
             ErrorCode.UNKNOWN_SERVICE: ServiceUnavailable,
             ErrorCode.CONNECTOR_OFFLINE: ServiceUnavailable,
             ErrorCode.TIMEOUT: ServiceUnavailable,
             ErrorCode.UNAUTHENTICATED: Unauthorized}


def _session_error(exc: _agent.SessionError) -> Error:
    kind = _REFUSALS.get(exc.code) if exc.code is not None else None
    if kind is None and str(exc).startswith("connector refused"):
        kind = Unauthorized  # its certificate did not match the connector named
    if kind is None:
        kind = ServiceUnavailable if "within" in str(exc) else ConnectionLost
    return kind(str(exc))


def _seconds(ms: Optional[float]) -> Optional[float]:
    return None if ms is None else ms / 1000


def _hostport(value: Union[str, tuple[str, int]], default_port: int) -> tuple[str, int]:
    """("host", port) from a tuple or from text as the command line reads it ("HOST",
    "HOST:PORT", "[v6]:PORT"), with its messages."""
    if isinstance(value, tuple):
        return value[0], int(value[1])
    try:
        host, port = parse_address(value, default_port=default_port, allow_zero=True)
    except ValueError as exc:
        raise Error(str(exc)) from None
    return str(host), int(port)


Address = Union[str, tuple[str, int]]
Intermediates = Union[Address, Sequence[Address]]


def _intermediates(value: Intermediates) -> dict[str, Any]:
    """The config fields of one intermediate or several (the first, then the fallbacks):
    "HOST:PORT", ("host", port), or a list of them."""
    given: list[Address]
    if isinstance(value, str) or (isinstance(value, tuple) and len(value) == 2
                                  and isinstance(value[1], int)):
        given = [value]
    else:
        given = list(cast(Sequence[Address], value))
    if not given:
        raise Error("no intermediate given")
    addrs = [_hostport(item, DEFAULT_PORT) for item in given]
    return {"intermediate": addrs[0], "fallbacks": tuple(addrs[1:])}


def _credentials(cert: Credential, key: Credential, ca: Credential) -> dict[str, Any]:
    return {"cert": _credential(cert), "key": _credential(key), "ca": _credential(ca)}


def _credential(value: Credential) -> Union[str, bytes]:
    return bytes(value) if isinstance(value, (bytes, bytearray)) else os.fspath(value)


async def _started(role: Any) -> None:
    """Start a role; its start-up errors as mahole errors."""
    try:
        await role.start()
    except _node.PermanentError as exc:
        raise Unauthorized(str(exc)) from None
    except _node.StartupError as exc:
        raise Error(str(exc)) from None


def _built(cls: Any, cfg: Any) -> Any:
    """A role object; credentials it cannot use raise Unauthorized."""
    try:
        return cls(cfg)
    except _node.StartupError as exc:
        raise Unauthorized(str(exc)) from None


async def _registered(role: Any, timeout: Optional[float], *, stop: bool = False) -> None:
    """Until the role is registered; `stop` stops it when that fails (a start that
    failed)."""
    try:
        await role.wait_registered(timeout)
    except _node.PermanentError as exc:
        if stop:
            await role.stop()
        raise Unauthorized(str(exc)) from None
    except asyncio.TimeoutError:
        error = role.control.last_error or "no answer"
        if stop:
            await role.stop()
        raise ConnectionLost(f"not registered with the intermediate within {timeout:g} s "
                             f"({error})") from None


async def _until_closed(role: Any, closed: asyncio.Event) -> None:
    """Until `closed` is set; Unauthorized when the role fails for good first."""
    waiter = asyncio.ensure_future(closed.wait())
    try:
        await asyncio.wait((waiter, role.failed), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if role.failed.done() and not closed.is_set():
        raise Unauthorized(str(role.failed.result()))


# Sessions ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SessionStats:
    """A snapshot of one session (`Session.stats()`)."""

    path: Path
    rtt: Optional[float]  # seconds, smoothed (RFC 9002 §5.3); None before a sample
    bytes_sent: int
    bytes_received: int
    route_switches: int
    failovers: int
    time_to_direct: Optional[float]  # seconds from StartPunching to the direct route
    punch_result: Optional[str]  # "direct", "relay" (punching failed), None while punching
    packet_size: int  # bytes per packet on the current route (path MTU discovery)
    direct_rtt: Optional[float] = None  # seconds: each route's measured RTT (the minimum
    relay_rtt: Optional[float] = None  # over a few seconds), None before it was measured


@dataclasses.dataclass(frozen=True)
class PathChange:
    """The route of a session changed (`Session.path_changes()`)."""

    path: Path
    address: Optional[tuple[str, int]]  # where packets go now (None for "none")
    reason: str  # "nominated", why the direct route died, or why the session ended


class Session:
    """One end-to-end session to a service (`Agent.session`). Streams of
    `Agent.open_connection` and datagrams share it."""

    def __init__(self, inner: _agent.AgentSession) -> None:
        self._inner = inner
        self._watchers: list[asyncio.Queue[Optional[PathChange]]] = []
        self._ended = asyncio.Event()  # set by the route change to "none"
        if inner.closed:
            self._ended.set()
        inner.route_watchers.append(self._route_changed)

    @property
    def service(self) -> str:
        return str(self._inner.service)

    @property
    def connector(self) -> str:
        """The connector's name (checked against its certificate)."""
        return str(self._inner.connector)

    @property
    def path(self) -> Path:
        route: Path = self._inner.route
        return route

    @property
    def in_fallback(self) -> bool:
        """True while a direct route failed and the relay carries the traffic."""
        core = self._inner.core
        return self.path == "relay" and bool(core.failovers) and core.direct_addr is None

    @property
    def closed(self) -> bool:
        return bool(self._inner.closed)

    def stats(self) -> SessionStats:
        raw = self._inner.stats()
        punch = self._inner.punch_outcome
        rtt_ms = raw.get("rtt_ms")
        conn = self._inner.connection
        return SessionStats(
            path=self.path, rtt=rtt_ms / 1000 if rtt_ms is not None else None,
            bytes_sent=int(raw["bytes_sent"]), bytes_received=int(raw["bytes_received"]),
            route_switches=int(raw["route_switches"]), failovers=int(raw["failovers"]),
            time_to_direct=raw["switch_ms"] / 1000 if raw.get("switch_ms") is not None
            else None,
            punch_result=str(punch.path) if punch is not None else None,
            packet_size=int(conn.quic.max_datagram_size) if conn is not None else 1200,
            direct_rtt=_seconds(raw["routes"]["direct"]["rtt_ms"]),
            relay_rtt=_seconds(raw["routes"]["relay"]["rtt_ms"]))

    def carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Carry a connection you already hold (an accepted TCP connection's streams, say) on
        a new stream of this session: `open_connection` without the copy through a socket
        pair. The writer is closed when the stream ends; ConnectionLost if the session has
        ended."""
        if self.closed:
            raise ConnectionLost(f"the session to {self.service} has ended")
        self._inner.open_stream(reader, writer)

    def _send_flow(self, flow_id: int, data: bytes) -> None:
        """A datagram on one of the session's flows (mahole.forwards: one flow per UDP
        client; flow 0 is `send_datagram`'s)."""
        self._inner.send_datagram(flow_id, data)

    async def send_datagram(self, data: bytes) -> None:
        """Send one datagram (unreliable, unordered: QUIC DATAGRAM frames, fragmented when
        larger than a packet). DatagramTooLarge over 65,507 bytes; ConnectionLost if the
        session has ended."""
        inner = self._inner
        if inner.closed:
            raise ConnectionLost(f"the session to {self.service} has ended")
        unsendable = inner.unsendable(len(data))
        if unsendable == "oversize":
            raise DatagramTooLarge(f"datagram of {len(data):,} bytes exceeds "
                                   f"{_tunnel.MAX_UDP_PAYLOAD:,}")
        if unsendable is not None:
            raise DatagramTooLarge(f"datagram of {len(data):,} bytes does not fit one packet "
                                   f"and {self.connector} cannot reassemble fragments")
        self._datagrams()
        inner.send_datagram(_agent.APP_FLOW, bytes(data))

    async def recv_datagram(self) -> bytes:
        """The next datagram from the service; ConnectionLost once the session ends."""
        queue = self._datagrams()
        closed = asyncio.ensure_future(self._ended.wait())
        got = asyncio.ensure_future(queue.get())
        try:
            await asyncio.wait((got, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not got.done():
                got.cancel()
        if got.done() and not got.cancelled():
            data: bytes = got.result()
            return data
        raise ConnectionLost(f"the session to {self.service} has ended")

    async def path_changes(self) -> AsyncIterator[PathChange]:
        """Each route change from now on, until the session ends (the last one has path
        "none")."""
        queue: asyncio.Queue[Optional[PathChange]] = asyncio.Queue(PATH_CHANGES_QUEUE)
        if self.closed:
            return
        self._watchers.append(queue)
        try:
            while True:
                change = await queue.get()
                if change is None:
                    return
                yield change
                if change.path == "none":
                    return
        finally:
            self._watchers.remove(queue)

    def _route_changed(self, event: Any) -> None:
        change = PathChange(event.route, tuple(event.addr) if event.addr else None,
                            str(event.reason))
        for queue in self._watchers:
            if not queue.full():
                queue.put_nowait(change)
        if event.route == "none":
            self._ended.set()

    def _datagrams(self) -> asyncio.Queue[bytes]:
        inner = self._inner
        if inner.app_datagrams is None:
            inner.app_datagrams = asyncio.Queue(_agent.MAX_APP_DATAGRAMS)
        queue: asyncio.Queue[bytes] = inner.app_datagrams
        return queue



# Roles ---------------------------------------------------------------------------------------
_N = TypeVar("_N", bound="_Node")


class _Node:
    """What agents and connectors share: start, registration, closing."""

    _what = "node"

    @classmethod
    def _from_config(cls: type[_N], cfg: Any) -> _N:
        """One of a whole configuration (the command line's)."""
        node = cls.__new__(cls)
        node._setup(cfg)
        return node

    def _setup(self, cfg: Any) -> None:
        self._cfg = cfg
        self._node: Any = None
        self._closed = asyncio.Event()

    async def _launch(self, node: Any, wait_registered: bool) -> None:
        self._node = node  # a forward may accept a connection before start() returns
        try:
            await _started(node)
        except BaseException:
            self._node = None
            raise
        self._closed.clear()
        if wait_registered:
            try:
                await _registered(node, REGISTER_TIMEOUT, stop=True)
            except Error:
                self._node = None
                raise

    async def wait_registered(self, timeout: Optional[float] = REGISTER_TIMEOUT) -> None:
        """Until registered with the intermediate (None: no limit)."""
        await _registered(self._running(), timeout)

    async def close(self) -> None:
        """Close every session and the socket."""
        node, self._node = self._node, None
        if node is not None:
            await node.stop()
        self._closed.set()

    async def wait_closed(self) -> None:
        """Until `close()` (or the task is cancelled); Unauthorized if the intermediate
        refuses this node for good (a duplicate identity, say)."""
        await _until_closed(self._running(), self._closed)

    def status(self) -> dict[str, Any]:
        """What `mahole status --json` shows for this node."""
        status: dict[str, Any] = self._running().status()
        return status

    def _running(self) -> Any:
        if self._node is None:
            raise Error(f"the {self._what} is not running: use `async with "
                        f"mahole.{type(self).__name__}(...)`")
        return self._node


class Agent(_Node):
    """An agent: opens sessions to services through the intermediate, directly when hole
    punching works and through its relay when not.

    Settings beyond the arguments are the agent's (`mahole.config.AgentConfig`, the same as
    the command line's flags), e.g. ``relay_only=True`` or ``open_timeout=5.0``."""

    _what = "agent"

    def __init__(self, intermediate: Intermediates, *, cert: Credential,
                 key: Credential, ca: Credential, bind: tuple[str, int] = ("::", 0),
                 **settings: Any) -> None:
        self._setup(AgentConfig(**_intermediates(intermediate), bind=bind,
                                control_socket=settings.pop("control_socket", ""),
                                **_credentials(cert, key, ca), **settings))

    def _setup(self, cfg: AgentConfig) -> None:
        super()._setup(cfg)
        self._forwards: Optional[_forwards.Forwards] = None
        self._sessions: dict[int, Session] = {}

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, *, wait_registered: bool = True) -> None:
        """Bind, listen on the forwards, connect and register with the intermediate (what
        `async with` does). With ``wait_registered=False`` registration goes on in the
        background, retried until the intermediate answers (the command line's way)."""
        node = _built(_agent.Agent, self._cfg)
        if self._cfg.forwards:
            node.forwards = self._forwards = _forwards.Forwards(self, self._cfg.forwards)
        await self._launch(node, wait_registered)

    def forward_address(self, forward: Any) -> tuple[str, int]:
        """Where a forward of the ``forwards`` setting listens (useful with port 0)."""
        self._running()
        if self._forwards is None or forward not in self._forwards.listeners:
            raise Error(f"no such forward: {forward}")
        host, port = self._forwards.address(forward)
        return str(host), int(port)

    @property
    def name(self) -> str:
        return str(self._running().name)

    @property
    def local_address(self) -> tuple[str, int]:
        host, port = self._running().endpoint.local_address[:2]
        return str(host), int(port)

    async def session(self, service: str) -> Session:
        """The session to `service`, opened (or reused). Refused, ServiceUnavailable,
        ConnectionLost or Unauthorized (the connector's certificate) when it cannot be."""
        node = self._running()
        try:
            inner = await node.session_for(service)
        except _agent.SessionError as exc:
            raise _session_error(exc) from None
        return self._wrapped(inner)

    async def open_connection(self, service: str
                              ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new stream to `service` as asyncio streams, like `asyncio.open_connection`."""
        session = await self.session(service)
        (reader, writer), (app_reader, app_writer) = await _tunnel.stream_pair()
        try:
            session.carry(reader, writer)
        except ConnectionLost:
            writer.close()
            app_writer.close()
            raise
        return app_reader, app_writer

    def _ready_session(self, service: str) -> Optional[Session]:
        """The session to `service` if one is open and ready now, without waiting."""
        inner = self._running().ready_session(service)
        return None if inner is None else self._wrapped(inner)

    def _wrapped(self, inner: Any) -> Session:
        wrapper = self._sessions.get(id(inner))
        if wrapper is None or wrapper._inner is not inner:
            self._sessions = {key: s for key, s in self._sessions.items() if not s.closed}
            wrapper = self._sessions[id(inner)] = Session(inner)
        return wrapper


class Connector(_Node):
    """A connector: offers services to agents. A service is a TCP or UDP target
    (`expose`), or served in this process (`serve`, `serve_datagrams`). A service declared
    before `async with` goes with the registration; one declared later is announced to the
    intermediate at once (a service its --offer rules deny is logged there and here, and not
    offered)."""

    _what = "connector"

    def __init__(self, intermediate: Intermediates, *, cert: Credential,
                 key: Credential, ca: Credential, bind: tuple[str, int] = ("::", 0),
                 **settings: Any) -> None:
        self._setup(ConnectorConfig(**_intermediates(intermediate), bind=bind,
                                    control_socket=settings.pop("control_socket", ""),
                                    **_credentials(cert, key, ca), **settings))

    def _setup(self, cfg: ConnectorConfig) -> None:
        super()._setup(cfg)
        self._pending: list[tuple[Service, Any]] = []

    async def __aenter__(self) -> Connector:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, *, wait_registered: bool = False) -> None:
        """Bind and start registering (what `async with` does). The registration itself
        runs in the background (retried until the intermediate answers), so services
        declared right after still go with it; `wait_registered()` waits for it, and so does
        ``wait_registered=True``."""
        node = _built(_connector.Connector, self._cfg)
        for service, handler in self._pending:
            node.add_service(service, handler)
        await self._launch(node, wait_registered)

    def expose(self, name: str, target: str) -> None:
        """Offer `name` with a target like the command line's --service: "tcp:HOST:PORT" or
        "udp:HOST:PORT"."""
        try:
            service = Service.parse(f"{name}={target}")
        except ValueError as exc:
            raise Error(str(exc)) from None
        self._add(service, None)

    def serve(self, name: str, handler: StreamHandler) -> None:
        """Offer `name`, served in-process: each stream an agent opens is one call of
        ``await handler(reader, writer)``; the writer is closed when it returns."""
        self._add(_connector.app_service(name, _connector.APP_STREAMS), handler)

    def serve_datagrams(self, name: str, handler: DatagramHandler) -> None:
        """Offer `name` for datagrams, served in-process: ``handler(data)`` (plain or
        async) returns the reply, or None for none."""
        self._add(_connector.app_service(name, _connector.APP_DATAGRAMS), handler)

    def _add(self, service: Service, handler: Any) -> None:
        from .wire.control import NAME_RE
        if not NAME_RE.fullmatch(service.name):
            raise Error(f"bad service name {service.name!r}")
        if self._node is None:
            offered = [s.name for s in self._cfg.services] + [s.name for s, _ in self._pending]
            if service.name in offered:
                raise Error(f"service {service.name!r} is already offered")
            if len(offered) >= MAX_SERVICES:
                raise Error(f"a connector offers at most {MAX_SERVICES} services")
            self._pending.append((service, handler))
            return
        try:
            self._node.add_service(service, handler)
        except ValueError as exc:
            raise Error(str(exc)) from None


class Intermediate:
    """An intermediate in this process (tests, or an app that brings its own): registers
    nodes, signals, relays. `allow` holds ACL rules like --allow ("AGENT=SERVICE" globs);
    none refuses every session."""

    def __init__(self, listen: Union[str, tuple[str, int]] = ("127.0.0.1", 0), *,
                 cert: Credential, key: Credential, ca: Credential,
                 allow: tuple[str, ...] = (), **settings: Any) -> None:
        self._cfg = IntermediateConfig(listen=_hostport(listen, DEFAULT_PORT),
                                       allow=tuple(allow),
                                       control_socket=settings.pop("control_socket", ""),
                                       **_credentials(cert, key, ca), **settings)
        self._role: Any = None

    async def __aenter__(self) -> Intermediate:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        from .roles.intermediate import Intermediate as Role
        role = _built(Role, self._cfg)
        await _started(role)
        self._role = role

    async def close(self) -> None:
        role, self._role = self._role, None
        if role is not None:
            await role.stop()

    @property
    def address(self) -> tuple[str, int]:
        """Where nodes reach it: (host, port)."""
        if self._role is None:
            raise Error("the intermediate is not running")
        host, port = self._role.local_address[:2]
        return str(host), int(port)

    def status(self) -> dict[str, Any]:
        if self._role is None:
            raise Error("the intermediate is not running")
        status: dict[str, Any] = self._role.status()
        return status
