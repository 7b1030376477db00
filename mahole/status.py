"""The ``--status HOST:PORT`` endpoint every role offers, and ``HOST:PORT`` parsing.

``GET /status`` answers the role's snapshot as JSON; ``GET /metrics`` answers Prometheus text
exposition format 0.0.4 (the roles' metrics come from ``prometheus_client``, see
:mod:`mahole.metrics`; :class:`Metric` and :func:`render_metrics` remain for simple callers).
The server is a deliberately small HTTP/1.1 server on
:func:`asyncio.start_server`: one request per connection, ``Connection: close`` after every
response, bounded in size and time so that a broken or hostile client costs one short-lived
task and nothing else.

* ``GET``/``HEAD`` ``/status``  → 200 ``application/json``
* ``GET``/``HEAD`` ``/metrics`` → 200 ``text/plain; version=0.0.4; charset=utf-8``
  (404 when the role gave no metrics callable)
* any other path → 404; another method on a known path → 405 with ``Allow``
* malformed request, request head over 16 KiB, HTTP/1.1 without ``Host`` → 400
* request head not complete within ``read_timeout`` (5 s) → connection closed
* ``snapshot()``/``metrics()`` raising → 500, logged with traceback; the server keeps serving

Parsing (:func:`parse_hostport`, :func:`parse_request_head`) is free of I/O and raises
``ValueError`` only. :func:`fetch` is a tiny client for tests and the demo.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import http
import inspect
import ipaddress
import json
import logging
import math
import numbers
import re
from typing import Any, Awaitable, Callable, Iterable, Mapping, Optional, Union
from urllib.parse import urlsplit

from prometheus_client import generate_latest

__all__ = [
    "METRICS_CONTENT_TYPE",
    "Metric",
    "Request",
    "StatusServer",
    "fetch",
    "format_hostport",
    "metrics_from_counters",
    "parse_hostport",
    "parse_request_head",
    "parse_request_line",
    "render_metrics",
]

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
MAX_HEAD_BYTES = 16 * 1024  # request line + header fields, terminators included
READ_TIMEOUT = 5.0  # seconds for the whole request head (slow clients are closed)
LINGER_BYTES = 1024 * 1024  # unread request bytes discarded before close, see _linger
JSON_CONTENT_TYPE = "application/json"
# The content type Prometheus' own client libraries send for format 0.0.4.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"


# --------------------------------------------------------------------------------------------
# HOST:PORT

_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                          r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?")
_PORT_RE = re.compile(r"[0-9]{1,5}")


def parse_hostport(text: str, default_host: Optional[str] = None, *,
                   allow_zero: bool = True) -> tuple[str, int]:
    """Parse ``HOST:PORT`` into ``(host, port)``.

    Accepts ``127.0.0.1:9000``, ``[::1]:9000`` (host returned without brackets),
    ``localhost:9000`` and ``:9000`` (host = ``default_host`` or ``127.0.0.1``). Port 0
    ("any free port") is accepted unless ``allow_zero`` is false, as for an address to
    connect to. Raises ``ValueError`` with a message fit to show as-is.
    """
    expected = f"expected HOST:PORT, got {text!r}"
    if not isinstance(text, str):
        raise ValueError(expected)
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1:close + 2] != ":":
            raise ValueError(expected)
        host, port_text = text[1:close], text[close + 2:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{expected}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(expected)
        if ":" in host:
            raise ValueError(f"{expected}: write an IPv6 address in brackets, "
                             f"as in [{host}]:{port_text}")
        if not host:
            host = default_host or DEFAULT_HOST
        elif re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{expected}: {host!r} is not an IPv4 address") from None
        elif len(host) > 253 or not _HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"{expected}: {host!r} is not a valid host name")
    if not _PORT_RE.fullmatch(port_text):
        raise ValueError(f"{expected}: port {port_text!r} is not a number")
    port = int(port_text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"{expected}: port {port} out of range {low}-65535")
    return host, port


def format_hostport(host: str, port: int) -> str:
    """The inverse of :func:`parse_hostport`: brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------------------------
# Prometheus text exposition format 0.0.4
# https://prometheus.io/docs/instrumenting/exposition_formats/#text-based-format

_METRIC_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
METRIC_TYPES = ("counter", "gauge")

Labels = Mapping[str, str]
Sample = tuple[Labels, float]


@dataclasses.dataclass
class Metric:
    """One metric family: a name, its type, a help line and its samples.

    ``samples`` is a list of ``(labels, value)``; ``labels`` maps label name to value
    (``{}`` for an unlabelled sample). Counter names must end with ``_total``. Name and type
    are checked here; :func:`render_metrics` checks everything again, samples included.
    """

    name: str
    type: str
    help: str = ""
    samples: list[Sample] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        _check_family(self.name, self.type)


def _check_family(name: str, kind: str) -> None:
    if not isinstance(name, str) or not _METRIC_NAME_RE.fullmatch(name):
        raise ValueError(f"invalid metric name {name!r}: must match [a-zA-Z_:][a-zA-Z0-9_:]*")
    if kind not in METRIC_TYPES:
        raise ValueError(f"metric {name}: type must be one of {', '.join(METRIC_TYPES)}, "
                         f"got {kind!r}")
    if kind == "counter" and not name.endswith("_total"):
        raise ValueError(f"counter {name} must be named {name}_total")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_value(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isnan(number):
            return "NaN"
        if math.isinf(number):
            return "+Inf" if number > 0 else "-Inf"
        return repr(number)
    raise ValueError(f"metric {name}: sample value must be a number, got {value!r}")


def _format_labels(name: str, labels: Labels) -> str:
    if not labels:
        return ""
    parts = []
    for label, value in labels.items():
        if not isinstance(label, str) or not _LABEL_NAME_RE.fullmatch(label) \
                or label.startswith("__"):
            raise ValueError(f"metric {name}: invalid label name {label!r}")
        parts.append(f'{label}="{_escape_label_value(str(value))}"')
    return "{" + ",".join(parts) + "}"


def render_metrics(metrics: Iterable[Metric]) -> str:
    """Metric families as Prometheus text format 0.0.4 (``""`` for none).

    Raises ``ValueError`` on an invalid metric or label name, a non-numeric value, a metric
    name given twice or the same label set given twice in one family: Prometheus would
    reject the whole scrape, so it is better found here.
    """
    lines: list[str] = []
    seen_names: set[str] = set()
    for metric in metrics:
        _check_family(metric.name, metric.type)
        if metric.name in seen_names:
            raise ValueError(f"metric {metric.name} given twice")
        seen_names.add(metric.name)
        if metric.help:
            lines.append(f"# HELP {metric.name} {_escape_help(metric.help)}")
        lines.append(f"# TYPE {metric.name} {metric.type}")
        seen_series: set[tuple] = set()
        for labels, value in metric.samples:
            label_text = _format_labels(metric.name, labels)
            key = tuple(sorted((str(k), str(v)) for k, v in labels.items()))
            if key in seen_series:
                raise ValueError(f"metric {metric.name}: sample {label_text or '{}'} given twice")
            seen_series.add(key)
            lines.append(f"{metric.name}{label_text} {_format_value(metric.name, value)}")
    return "".join(line + "\n" for line in lines)


def metrics_from_counters(prefix: str, counters: Mapping[str, Any],
                          help_text: Union[str, Mapping[str, str]] = "Total {key}.",
                          labels: Optional[Labels] = None) -> list[Metric]:
    """Turn a flat ``{key: number}`` dict of counters into counter metrics.

    Each key becomes ``PREFIX_KEY_total`` (characters not allowed in a metric name become
    ``_``; a key already ending in ``_total`` is not suffixed twice). ``help_text`` is one
    string in which ``{key}`` is replaced by the key, or a mapping from key to help string
    (missing keys get the key itself). ``labels`` are attached to every sample.
    Raises ``ValueError`` on a non-numeric value or two keys that give one name.
    """
    metrics = []
    seen: dict[str, str] = {}
    for key, value in counters.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"counter {key!r}: value must be a number, got {value!r}")
        base = re.sub(r"[^a-zA-Z0-9_:]", "_", f"{prefix}_{key}" if prefix else str(key))
        name = base if base.endswith("_total") else f"{base}_total"
        if name in seen:
            raise ValueError(f"counters {seen[name]!r} and {key!r} both give metric {name}")
        seen[name] = key
        if isinstance(help_text, str):
            text = help_text.replace("{key}", str(key))
        else:
            text = help_text.get(key, str(key))
        metrics.append(Metric(name, "counter", text, [(dict(labels or {}), value)]))
    return metrics


# --------------------------------------------------------------------------------------------
# HTTP/1.1 request head (RFC 9112), sans I/O

_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2
_VERSION_RE = re.compile(rb"HTTP/([0-9])\.([0-9])")  # RFC 9112 §2.3
_FIELD_VALUE_BAD_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # CTLs but HTAB, RFC 9110 §5.5


@dataclasses.dataclass
class Request:
    """A parsed request head: method, path (query removed), version and header fields."""

    method: str
    path: str
    version: tuple[int, int]
    headers: list[tuple[str, str]]  # (lower-case name, value), in order

    def header(self, name: str) -> list[str]:
        """Every value of header field ``name`` (case-insensitive)."""
        name = name.lower()
        return [value for field, value in self.headers if field == name]


def parse_request_head(lines: list[bytes]) -> Request:
    """Parse a request line and header field lines, terminators already removed.

    Raises ``ValueError`` with a short reason on anything malformed.
    """
    if not lines:
        raise ValueError("empty request")
    method, path, version = parse_request_line(lines[0])
    headers = []
    for line in lines[1:]:
        # RFC 9112 §5.2: obsolete line folding may be rejected with 400.
        if line[:1] in (b" ", b"\t"):
            raise ValueError("obsolete header line folding")
        name, colon, value = line.partition(b":")
        # RFC 9112 §5.1: no whitespace between field name and colon.
        if not colon or not _TOKEN_RE.fullmatch(name):
            raise ValueError("malformed header field")
        value = value.strip(b" \t")
        if _FIELD_VALUE_BAD_RE.search(value):
            raise ValueError("malformed header field value")
        headers.append((name.decode("ascii").lower(), value.decode("latin-1")))
    request = Request(method, path, version, headers)
    # RFC 9112 §3.2: an HTTP/1.1 request without exactly one Host field gets 400.
    if request.version >= (1, 1) and len(request.header("host")) != 1:
        raise ValueError("HTTP/1.1 request needs exactly one Host header")
    return request


def parse_request_line(line: bytes) -> tuple[str, str, tuple[int, int]]:
    """``(method, path, (major, minor))`` from a request line; raises ``ValueError``."""
    # RFC 9112 §3: request-line = method SP request-target SP HTTP-version
    parts = line.split(b" ")
    if len(parts) != 3:
        raise ValueError("malformed request line")
    method, target, version = parts
    if not _TOKEN_RE.fullmatch(method):
        raise ValueError("malformed method")
    match = _VERSION_RE.fullmatch(version)
    if not match:
        raise ValueError("malformed HTTP version")
    if not target or _FIELD_VALUE_BAD_RE.search(target) or b"\t" in target:
        raise ValueError("malformed request target")
    try:
        target_text = target.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("malformed request target") from None
    if target_text.startswith("/"):  # origin-form, RFC 9112 §3.2.1
        path = target_text.partition("?")[0]
    elif "://" in target_text:  # absolute-form, RFC 9112 §3.2.2
        path = urlsplit(target_text).path or "/"
    elif target_text == "*":  # asterisk-form (OPTIONS), RFC 9112 §3.2.4
        path = "*"
    else:
        raise ValueError("malformed request target")
    return method.decode("ascii"), path, (int(match[1]), int(match[2]))


# --------------------------------------------------------------------------------------------
# The server

class _Closed(Exception):
    """Internal: the client closed before sending a request."""


@dataclasses.dataclass
class _Response:
    status: int
    body: bytes
    content_type: str = TEXT_CONTENT_TYPE
    extra_headers: tuple[tuple[str, str], ...] = ()

    def head(self) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status} {http.HTTPStatus(self.status).phrase}",
            f"Date: {email.utils.formatdate(usegmt=True)}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Cache-Control: no-store",
            "Connection: close",
        ]
        lines.extend(f"{name}: {value}" for name, value in self.extra_headers)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _error(status: int, message: str, extra_headers: tuple[tuple[str, str], ...] = ()) -> _Response:
    text = f"{status} {http.HTTPStatus(status).phrase}: {message}\n"
    return _Response(status, text.encode(), extra_headers=extra_headers)


class StatusServer:
    """Serves ``/status`` and ``/metrics`` for one role.

    ``snapshot()`` returns a JSON-serialisable dict (anything else goes through ``str``);
    ``metrics()`` returns a ``prometheus_client`` registry (what the roles do, see
    :mod:`mahole.metrics`), exposition text (``str`` or ``bytes``) or a list of
    :class:`Metric`. Either may also be a coroutine function.
    Both are called once per request, on the event loop.
    """

    def __init__(self, snapshot: Callable[[], Union[dict, Awaitable[dict]]],
                 metrics: Optional[Callable[[], Union[list[Metric], Awaitable[list[Metric]]]]] = None,
                 *, read_timeout: float = READ_TIMEOUT) -> None:
        self._snapshot = snapshot
        self._metrics = metrics
        self._read_timeout = read_timeout
        self._server: Optional[asyncio.AbstractServer] = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port``; raises ``OSError`` (e.g. address already in use)."""
        if self._server is not None:
            raise RuntimeError("status server already started")
        self._server = await asyncio.start_server(self._handle, host, port,
                                                  limit=MAX_HEAD_BYTES)
        logger.info("status on http://%s/status", format_hostport(*self.address))

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` actually bound (the first socket's, if the host had several)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("status server not started")
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def close(self) -> None:
        """Stop listening and end every open connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        who = f"status {format_hostport(*peer[:2])}" if isinstance(peer, tuple) else "status"
        graceful = False  # False: abort (RST) rather than wait for a client that will not read
        try:
            try:
                request = await asyncio.wait_for(self._read_request(reader), self._read_timeout)
            except _Closed:
                graceful = True
                return
            except asyncio.TimeoutError:
                logger.debug("%s: request not complete in %.1f s, closed", who, self._read_timeout)
                graceful = True
                return
            except ValueError as exc:
                logger.debug("%s: bad request: %s", who, exc)
                response, head_only = _error(400, str(exc)), False
            else:
                response = await self._respond(request)
                head_only = request.method == "HEAD"
                logger.debug("%s: %s %s -> %d", who, request.method, request.path,
                             response.status)
            await asyncio.wait_for(self._send(reader, writer, response, head_only),
                                   self._read_timeout)
            graceful = True
        except asyncio.TimeoutError:
            logger.debug("%s: client too slow, closed", who)
        except OSError:  # ConnectionResetError and friends: the client went away
            pass
        except Exception:  # never let one connection take the server down
            logger.exception("%s: unexpected error", who)
        finally:
            if graceful:
                writer.close()
            else:
                writer.transport.abort()
            if task is not None:
                self._tasks.discard(task)

    async def _read_request(self, reader: asyncio.StreamReader) -> Request:
        lines: list[bytes] = []
        total = 0
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                if not lines and not exc.partial.strip():
                    raise _Closed() from None
                raise ValueError("incomplete request") from None
            except asyncio.LimitOverrunError:
                raise ValueError(f"request head over {MAX_HEAD_BYTES} bytes") from None
            total += len(line)
            if total > MAX_HEAD_BYTES:
                raise ValueError(f"request head over {MAX_HEAD_BYTES} bytes")
            # RFC 9112 §2.2: LF alone may end a line; a bare CR anywhere else is invalid.
            line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
            if b"\r" in line:
                raise ValueError("bare CR in request head")
            if not line:
                if lines:
                    return parse_request_head(lines)
                continue  # RFC 9112 §2.2: ignore empty lines before the request line
            if not lines:
                parse_request_line(line)  # answer garbage now, not after the read timeout
            lines.append(line)

    async def _respond(self, request: Request) -> _Response:
        routes = {"/status": self._status_response}
        if self._metrics is not None:
            routes["/metrics"] = self._metrics_response
        route = routes.get(request.path)
        if route is None:
            return _error(404, f"no such path {request.path}; try /status or /metrics")
        if request.method not in ("GET", "HEAD"):
            return _error(405, f"{request.method} not allowed", (("Allow", "GET, HEAD"),))
        try:
            return await route()
        except Exception:
            logger.exception("status: %s failed", request.path)
            return _error(500, f"{request.path} failed; see the log")

    async def _status_response(self) -> _Response:
        snapshot = self._snapshot()
        if inspect.isawaitable(snapshot):
            snapshot = await snapshot
        body = json.dumps(snapshot, indent=2, default=str) + "\n"
        return _Response(200, body.encode(), JSON_CONTENT_TYPE)

    async def _metrics_response(self) -> _Response:
        assert self._metrics is not None
        metrics = self._metrics()
        if inspect.isawaitable(metrics):
            metrics = await metrics
        if isinstance(metrics, bytes):
            body = metrics
        elif isinstance(metrics, str):
            body = metrics.encode()
        elif hasattr(metrics, "collect"):  # a prometheus_client registry or collector
            body = generate_latest(metrics)
        else:
            body = render_metrics(metrics).encode()
        return _Response(200, body, METRICS_CONTENT_TYPE)

    @staticmethod
    async def _send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    response: _Response, head_only: bool) -> None:
        writer.write(response.head() + (b"" if head_only else response.body))
        await writer.drain()
        await _linger(reader, writer)


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then discard what the client still sends until it closes too.

    Closing a socket with unread bytes in its receive buffer makes the kernel send RST, and
    the client may then lose the response it has not read yet (a request body, or the rest
    of a garbage request we answered 400 to). Bounded by LINGER_BYTES and the caller's timeout.
    """
    if not writer.can_write_eof():
        return
    writer.write_eof()
    discarded = 0
    while discarded < LINGER_BYTES:
        chunk = await reader.read(4096)
        if not chunk:
            return
        discarded += len(chunk)


# --------------------------------------------------------------------------------------------
# Client, for tests and the demo

async def fetch(host: str, port: int, path: str, *, method: str = "GET",
                timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request; returns ``(status_code, headers, body)``.

    Header names are lower-case. Raises ``OSError`` if the connection fails,
    ``asyncio.TimeoutError`` after ``timeout`` seconds, ``ValueError`` on a malformed
    response (including a body shorter or longer than its Content-Length).
    """
    return await asyncio.wait_for(_fetch(host, port, path, method), timeout)


async def _fetch(host: str, port: int, path: str, method: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        request = (f"{method} {path} HTTP/1.1\r\nHost: {format_hostport(host, port)}\r\n"
                   f"Connection: close\r\n\r\n")
        writer.write(request.encode("ascii"))
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError(f"malformed HTTP response: {data[:80]!r}")
    status_line, *field_lines = head.decode("latin-1").split("\r\n")
    match = re.fullmatch(r"HTTP/1\.[01] ([0-9]{3}) .*", status_line)
    if not match:
        raise ValueError(f"malformed HTTP status line: {status_line!r}")
    headers = {}
    for line in field_lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"malformed HTTP header line: {line!r}")
        headers[name.strip().lower()] = value.strip()
    if method != "HEAD" and "content-length" in headers:
        if headers["content-length"] != str(len(body)):
            raise ValueError(f"Content-Length {headers['content-length']} but "
                             f"{len(body)} body bytes")
    return int(match[1]), headers, body
