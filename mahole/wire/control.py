"""The control-stream protocol between nodes (agents, connectors) and the intermediate.

Each node keeps one QUIC connection to the intermediate (the *control connection*) and speaks
this protocol on one bidirectional stream of it.

Framing
    ``length (4 bytes, big endian) | payload``. The payload is 1..65536 bytes (``MAX_PAYLOAD``);
    a length of 0 or above the cap is a protocol error, detected as soon as the 4-byte length is
    seen. ``encode(msg)`` builds one frame; ``FrameDecoder`` is the sans-IO incremental decoder
    (feed it stream bytes, get messages).

Payload
    A UTF-8 JSON object whose ``"type"`` names the message class (``"Register"``,
    ``"SessionOpened"``, ...) and whose other keys are exactly that class's fields. Decoding is
    strict: unknown types, missing or extra fields, wrong JSON types (``true`` is not an
    integer), out-of-range numbers, NaN/Infinity, duplicate keys, non-UTF-8 bytes and non-object
    JSON are all rejected with ``ControlError`` (a ``ValueError``) whose text names the field and
    the problem. Field encodings:

    - session ids and relay tokens: 16 lowercase hex digits (8 bytes each);
    - addresses: ``[host, port]``, host an IP literal (normalised by ``ipaddress``), port 0..65535;
    - node and service names: 1-64 characters of ``A-Z a-z 0-9 . _ -`` starting with a letter
      or digit (`NAME_RE`, the command line's grammar); at most 64 services per `Register`;
    - optional fields are present with ``null`` when absent;
    - integers stay within 0..2**53-1, which every JSON implementation keeps exact
      (RFC 8259 §6).

Every message is a frozen dataclass that validates itself on construction, so an invalid message
can be neither decoded nor built; the same per-field specs (held in the dataclass field metadata,
one table per class) drive construction checks, decoding and encoding. ``MESSAGE_TYPES`` maps
type names to classes; a new message type is a dataclass with specs plus one entry there.

Typical flow::

    node -> Register                     intermediate -> Registered, ObservedAddress
    agent -> OpenSession                 intermediate -> SessionOpened (to agent and connector)
    agent -> CandidateOffer  -> (forwarded) -> connector
    connector -> CandidateAnswer -> (forwarded) -> agent
    intermediate -> StartPunching (both) nodes -> PunchingResult
    either side -> SessionClosed; intermediate -> Error on any refused request

Versions
    The ALPN of the control connection names the version (``mahole-control/N``,
    `mahole.connection`). /2 added `ResumeSession`, `SessionResumed`, `SessionHeld`; /3 adds
    `NatSummary` (node → intermediate, after `Registered`) and the ``strategy`` and
    ``hard_side`` fields of `StartPunching`. A field a version added is *omitted* when null
    and decodes as null when absent (`_Added`), so a /3 node reads the StartPunching of a /2
    intermediate; the other way round, the intermediate drops those fields for a node that
    did not negotiate /3, and a node sends NatSummary only over /3: an older peer's strict
    decoder never sees a field or a type it does not know.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
import math
import re
from typing import Any, ClassVar, Literal

from .relay import SESSION_ID_LEN

__all__ = [
    "MAX_PAYLOAD",
    "MAX_NAME_LEN",
    "MAX_SERVICES",
    "NAME_RE",
    "LENGTH_PREFIX_LEN",
    "MESSAGE_TYPES",
    "RELAY_TOKEN_LEN",
    "Addr",
    "Candidate",
    "CandidateAnswer",
    "CandidateOffer",
    "ControlError",
    "Error",
    "ErrorCode",
    "FrameDecoder",
    "Message",
    "NatSummary",
    "ObservedAddress",
    "OpenSession",
    "Ping",
    "Pong",
    "PunchingResult",
    "Register",
    "Registered",
    "SessionClosed",
    "SessionOpened",
    "StartPunching",
    "decode",
    "decode_payload",
    "encode",
    "encode_payload",
]

LENGTH_PREFIX_LEN = 4  # bytes of big-endian payload length in front of every payload
MAX_PAYLOAD = 65536  # largest payload accepted or produced (64 KiB)

# Node names, node ids and service names: the grammar of names on the command line and in
# certificates (mahole.config.NAME is this pattern): 1-64 characters of A-Z a-z 0-9 . _ -,
# starting with a letter or digit, so "*", "/", ".." and spaces never reach the registry.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_NAME_LEN = 64
MAX_TEXT_LEN = 1024  # free text: Error.message, SessionClosed.reason
MAX_SERVICES = 64  # services in one Register (64 names of at most 64 characters: ~4.5 KB)
RELAY_TOKEN_LEN = 8  # bytes of SessionOpened.relay_token
MAX_CANDIDATES = 64  # candidates in one offer/answer
MAX_SAFE_INT = 2**53 - 1  # RFC 8259 §6: larger integers are not exact in every JSON parser
MAX_DELAY_MS = 60_000  # StartPunching.delay_ms: more than a minute is a bug, not a plan
MAX_DURATION_MS = 86_400_000.0  # rtt_ms / elapsed_ms: one day

ROLES = ("agent", "connector")
CANDIDATE_TYPES = ("host", "srflx", "prflx", "relay")  # RFC 8445 §5.1.1
PATHS = ("direct", "relay")
# StartPunching.strategy (control protocol /3), chosen by the intermediate from both members'
# NatSummary (docs/architecture.md, "Punching strategy"): plain checks, predicted ports of a
# sequential symmetric side, a port the router maps, birthday probing of a random symmetric
# side, or the relay at once.
STRATEGIES = ("checks", "prediction", "mapped", "birthday", "relay")
MAPPINGS = ("endpoint-independent", "endpoint-dependent")  # RFC 4787 §4.1, as a node sees it
ALLOCATIONS = ("sequential", "random")  # of an endpoint-dependent mapping (RFC 4787 §4.2.1)
FILTERINGS = ("endpoint-independent", "address-dependent",
              "address-and-port-dependent")  # RFC 4787 §5
MAX_STEP = 16  # NatSummary.step: mahole.ice.prediction.MAX_STEP

# RFC 8839 §5.1 / §5.4: ice-char = ALPHA / DIGIT / "+" / "/"; foundation = 1*32 ice-char.
_ICE_CHARS = re.compile(r"[A-Za-z0-9+/]*")
_HEX = re.compile(r"[0-9a-f]*")

Addr = tuple[str, int]
"""A transport address: (IP literal, port)."""


class ControlError(ValueError):
    """A control frame or message that breaks the protocol; the text says where and why."""


class ErrorCode(enum.IntEnum):
    """Codes carried by `Error`, HTTP-like: 4xx the request or the sender is at fault, 5xx the
    intermediate or the far side is."""

    BAD_MESSAGE = 400  # undecodable or invalid message; the intermediate closes the stream
    UNAUTHENTICATED = 401  # no valid certificate from the deployment CA
    DENIED = 403  # identity known but not allowed: wrong role, or the ACL forbids the service
    UNKNOWN_SERVICE = 404  # no connector has registered this service
    CONFLICT = 409  # already registered, or the name is registered by another live connection
    UNKNOWN_SESSION = 410  # the session id is not (or no longer) known, or not yours
    NOT_REGISTERED = 428  # a request arrived before Register
    RATE_LIMITED = 429  # too many sessions or requests
    INTERNAL = 500  # bug or resource exhaustion at the intermediate
    CONNECTOR_OFFLINE = 503  # the service is known but its connector is not connected
    TIMEOUT = 504  # the other session member did not answer in time


# --------------------------------------------------------------------------------------------
# Field specs: how one field is checked (Python value), read from JSON and written to JSON.


def _short(value: Any, limit: int = 40) -> str:
    """repr() of a value, truncated so error messages stay one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_JSON_KINDS = {
    type(None): "null",
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
}


def _kind(value: Any) -> str:
    return _JSON_KINDS.get(type(value), type(value).__name__)


def _fail(where: str, problem: str) -> ControlError:
    return ControlError(f"{where}: {problem}")


class _Spec:
    """Base field spec. ``check`` validates and normalises a Python value (and is what the
    dataclasses call on construction); ``from_json`` turns the JSON shape into the Python shape
    before ``check``; ``to_json`` is the reverse."""

    def check(self, value: Any, where: str) -> Any:
        raise NotImplementedError

    def from_json(self, value: Any, where: str) -> Any:
        return value

    def to_json(self, value: Any) -> Any:
        return value


class _Str(_Spec):
    def __init__(
        self,
        min_len: int = 0,
        max_len: int = MAX_TEXT_LEN,
        *,
        choices: tuple[str, ...] | None = None,
        pattern: re.Pattern[str] | None = None,
        pattern_text: str = "",
        printable: bool = False,
    ) -> None:
        self.min_len = min_len
        self.max_len = max_len
        self.choices = choices
        self.pattern = pattern
        self.pattern_text = pattern_text
        self.printable = printable

    def check(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise _fail(where, f"must be a string, got {_kind(value)}")
        if self.choices is not None:
            if value not in self.choices:
                allowed = ", ".join(repr(c) for c in self.choices)
                raise _fail(where, f"must be one of {allowed}, got {_short(value)}")
            return value
        if not self.min_len <= len(value) <= self.max_len:
            raise _fail(
                where,
                f"length must be {self.min_len}..{self.max_len} characters, got {len(value)}",
            )
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise _fail(where, f"must contain only {self.pattern_text}, got {_short(value)}")
        if self.printable:
            if not value.isprintable():
                raise _fail(
                    where, f"contains a control or non-printable character: {_short(value)}"
                )
        else:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _fail(where, "contains a lone surrogate (not encodable as UTF-8)") from None
        return value


class _Int(_Spec):
    def __init__(self, lo: int, hi: int, enum_type: type[enum.IntEnum] | None = None) -> None:
        self.lo = lo
        self.hi = hi
        self.enum_type = enum_type

    def check(self, value: Any, where: str) -> int:
        # bool is a subclass of int in Python, and JSON true/false must not pass as numbers.
        if not isinstance(value, int) or isinstance(value, bool):
            raise _fail(where, f"must be an integer, got {_kind(value)}")
        if not self.lo <= value <= self.hi:
            raise _fail(where, f"must be in {self.lo}..{self.hi}, got {_short(value)}")
        if self.enum_type is not None:
            try:
                return self.enum_type(value)
            except ValueError:
                pass
        return int(value)

    def to_json(self, value: Any) -> int:
        return int(value)


class _Bool(_Spec):
    def check(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise _fail(where, f"must be a boolean, got {_kind(value)}")
        return value


class _Float(_Spec):
    def __init__(self, lo: float, hi: float) -> None:
        self.lo = lo
        self.hi = hi

    def check(self, value: Any, where: str) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _fail(where, f"must be a number, got {_kind(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise _fail(where, f"must be a finite number, got {value}")
        # Compare before converting: float(10**400) would raise OverflowError.
        if not self.lo <= value <= self.hi:
            raise _fail(where, f"must be in {self.lo:g}..{self.hi:g}, got {_short(value)}")
        return float(value)


class _Bytes(_Spec):
    """Fixed-length bytes, carried in JSON as lowercase hex."""

    def __init__(self, length: int) -> None:
        self.length = length

    def check(self, value: Any, where: str) -> bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise _fail(where, f"must be bytes, got {_kind(value)}")
        value = bytes(value)
        if len(value) != self.length:
            raise _fail(where, f"must be {self.length} bytes, got {len(value)}")
        return value

    def from_json(self, value: Any, where: str) -> bytes:
        if not isinstance(value, str):
            raise _fail(where, f"must be a hex string, got {_kind(value)}")
        if len(value) != 2 * self.length or not _HEX.fullmatch(value):
            raise _fail(
                where, f"must be {2 * self.length} lowercase hex digits, got {_short(value)}"
            )
        return bytes.fromhex(value)

    def to_json(self, value: Any) -> str:
        return value.hex()


class _Addr(_Spec):
    """[host, port]: host an IPv4/IPv6 literal (normalised), port 0..65535."""

    _MAX_HOST_LEN = 64  # longest IPv6 text (45) plus a %scope; checked before parsing

    def check(self, value: Any, where: str) -> Addr:
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise _fail(where, f"must be [host, port], got {_short(value)}")
        host, port = value
        if not isinstance(host, str):
            raise _fail(where, f"host must be a string, got {_kind(host)}")
        if len(host) > self._MAX_HOST_LEN:
            raise _fail(where, f"host is not an IP address: {_short(host)}")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise _fail(where, f"host is not an IP address: {_short(host)}") from None
        if not isinstance(port, int) or isinstance(port, bool):
            raise _fail(where, f"port must be an integer, got {_kind(port)}")
        if not 0 <= port <= 65535:
            raise _fail(where, f"port must be in 0..65535, got {_short(port)}")
        return (str(ip), int(port))

    def to_json(self, value: Any) -> list[Any]:
        return [value[0], value[1]]


class _Optional(_Spec):
    def __init__(self, inner: _Spec) -> None:
        self.inner = inner

    def check(self, value: Any, where: str) -> Any:
        return None if value is None else self.inner.check(value, where)

    def from_json(self, value: Any, where: str) -> Any:
        return None if value is None else self.inner.from_json(value, where)

    def to_json(self, value: Any) -> Any:
        return None if value is None else self.inner.to_json(value)


class _Added(_Optional):
    """An optional field a later protocol version added: omitted from the JSON when null, and
    null when absent, so that a peer of the version before never meets it (see Versions)."""


class _Tuple(_Spec):
    def __init__(self, inner: _Spec, max_len: int, *, unique: bool = False) -> None:
        self.inner = inner
        self.max_len = max_len
        self.unique = unique

    def check(self, value: Any, where: str) -> tuple[Any, ...]:
        if not isinstance(value, (tuple, list)):
            raise _fail(where, f"must be an array, got {_kind(value)}")
        if len(value) > self.max_len:
            raise _fail(where, f"must have at most {self.max_len} items, got {len(value)}")
        items = tuple(self.inner.check(item, f"{where}[{i}]") for i, item in enumerate(value))
        if self.unique and len(set(items)) != len(items):
            seen: set[Any] = set()
            for item in items:
                if item in seen:
                    raise _fail(where, f"duplicate item {_short(item)}")
                seen.add(item)
        return items

    def from_json(self, value: Any, where: str) -> Any:
        if not isinstance(value, list):
            raise _fail(where, f"must be an array, got {_kind(value)}")
        if len(value) > self.max_len:
            raise _fail(where, f"must have at most {self.max_len} items, got {len(value)}")
        return [self.inner.from_json(item, f"{where}[{i}]") for i, item in enumerate(value)]

    def to_json(self, value: Any) -> list[Any]:
        return [self.inner.to_json(item) for item in value]


class _Nested(_Spec):
    """A nested record (e.g. `Candidate`), carried as a JSON object."""

    def __init__(self, record: type[_Record]) -> None:
        self.record = record

    def check(self, value: Any, where: str) -> Any:
        if not isinstance(value, self.record):
            raise _fail(where, f"must be a {self.record.__name__}, got {_kind(value)}")
        return value

    def from_json(self, value: Any, where: str) -> Any:
        return self.record._from_json_object(value, where)

    def to_json(self, value: Any) -> dict[str, Any]:
        return value._to_json_object()


_NAME = _Str(1, MAX_NAME_LEN, pattern=NAME_RE,
             pattern_text="A-Z a-z 0-9 . _ - (starting with a letter or digit)")
_TEXT = _Str(0, MAX_TEXT_LEN)
_SAFE_INT = _Int(0, MAX_SAFE_INT)
_SESSION_ID = _Bytes(SESSION_ID_LEN)
_ADDR = _Addr()
_DURATION = _Float(0.0, MAX_DURATION_MS)
_ICE_PATTERN = "ice-chars (A-Z a-z 0-9 + /)"


def _f(spec: _Spec, **kwargs: Any) -> Any:
    """A dataclass field carrying its spec in the metadata."""
    return dataclasses.field(metadata={"spec": spec}, **kwargs)


# --------------------------------------------------------------------------------------------
# Records and messages.


class _Record:
    """Base of every validated frozen dataclass in this module.

    Each field carries its `_Spec` in ``dataclasses.field(metadata=...)``; the per-class table
    of specs is built once, on first use, from ``dataclasses.fields``.
    """

    _SPECS: ClassVar[tuple[tuple[str, _Spec], ...] | None] = None

    @classmethod
    def _field_specs(cls) -> tuple[tuple[str, _Spec], ...]:
        specs = cls.__dict__.get("_SPECS")  # per class, never a base class's table
        if specs is None:
            table = []
            for field in dataclasses.fields(cls):  # type: ignore[arg-type]
                spec = field.metadata.get("spec")
                if not isinstance(spec, _Spec):
                    raise TypeError(f"{cls.__name__}.{field.name} has no field spec")
                table.append((field.name, spec))
            specs = tuple(table)
            cls._SPECS = specs
        return specs

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field_name, spec in self._field_specs():
            value = getattr(self, field_name)
            checked = spec.check(value, f"{name}.{field_name}")
            if checked is not value:
                object.__setattr__(self, field_name, checked)
        problem = self._cross_check()
        if problem is not None:
            raise ControlError(f"{name}: {problem}")

    def _cross_check(self) -> str | None:
        """Rules spanning several fields; returns the problem, or None if the record is valid."""
        return None

    def _to_json_object(self) -> dict[str, Any]:
        return {name: spec.to_json(value) for name, spec in self._field_specs()
                if (value := getattr(self, name)) is not None or not isinstance(spec, _Added)}

    @classmethod
    def _from_json_object(
        cls, obj: Any, where: str, skip: frozenset[str] = frozenset()
    ) -> Any:
        if not isinstance(obj, dict):
            raise _fail(where, f"must be a JSON object, got {_kind(obj)}")
        specs = cls._field_specs()
        missing = [name for name, spec in specs
                   if name not in obj and not isinstance(spec, _Added)]
        if missing:
            raise _fail(where, "missing field(s) " + ", ".join(repr(m) for m in missing))
        known = {name for name, _ in specs} | skip
        unknown = [key for key in obj if key not in known]
        if unknown:
            shown = ", ".join(_short(key) for key in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise _fail(where, f"unknown field(s) {shown}{more}")
        values = {name: spec.from_json(obj.get(name), f"{where}.{name}") for name, spec in specs}
        try:
            return cls(**values)
        except ControlError as exc:
            if where == cls.__name__:
                raise
            raise ControlError(f"{where}: {exc}") from None


class Message(_Record):
    """Base of every control message; ``TYPE`` is the JSON ``"type"`` value (the class name),
    set when the class is entered in `MESSAGE_TYPES`."""

    TYPE: ClassVar[str] = ""


@dataclasses.dataclass(frozen=True)
class Candidate(_Record):
    """One ICE candidate (RFC 8445 §5.1), listed in `CandidateOffer` / `CandidateAnswer`.

    ``priority`` is the RFC 8445 §5.1.2 value (carried as the 32-bit STUN PRIORITY attribute);
    ``related_addr`` is the base/mapped address behind a srflx/prflx/relay candidate and must be
    absent for host candidates (RFC 8839 §5.1).
    """

    foundation: str = _f(
        _Str(1, 32, pattern=_ICE_CHARS, pattern_text=_ICE_PATTERN)
    )  # RFC 8839 §5.1: 1*32 ice-char
    component: int = _f(_Int(1, 256))  # RFC 8445 §5.1.2.1: component ID 1..256
    transport: Literal["udp"] = _f(_Str(choices=("udp",)))
    priority: int = _f(_Int(0, 2**32 - 1))
    addr: Addr = _f(_ADDR)
    type: Literal["host", "srflx", "prflx", "relay"] = _f(_Str(choices=CANDIDATE_TYPES))
    related_addr: Addr | None = _f(_Optional(_ADDR), default=None)

    def _cross_check(self) -> str | None:
        if self.type == "host" and self.related_addr is not None:
            return "a host candidate has no related_addr"
        return None


@dataclasses.dataclass(frozen=True)
class Register(Message):
    """Node → intermediate, first message on the control stream: role, name and, for a
    connector, the names of the services it offers (an agent offers none).

    The intermediate checks role and name against the node's certificate and answers with
    `Registered` (and `ObservedAddress`), or `Error`.
    """

    role: Literal["agent", "connector"] = _f(_Str(choices=ROLES))
    name: str = _f(_NAME)
    services: tuple[str, ...] = _f(_Tuple(_NAME, MAX_SERVICES, unique=True), default=())

    def _cross_check(self) -> str | None:
        if self.role == "agent" and self.services:
            return "an agent registers no services"
        return None


@dataclasses.dataclass(frozen=True)
class UpdateServices(Message):
    """Connector → intermediate, after `Registered`: the whole list of services it offers
    now (one was added while it runs). The intermediate checks it against the --offer policy
    like `Register`; a refusal is an `Error` (DENIED) and leaves the list as it was."""

    services: tuple[str, ...] = _f(_Tuple(_NAME, MAX_SERVICES, unique=True))


@dataclasses.dataclass(frozen=True)
class Registered(Message):
    """Intermediate → node, reply to `Register`: the node's id for this registration and the
    address the intermediate observes for its control connection (QAD)."""

    node_id: str = _f(_NAME)
    observed_addr: Addr = _f(_ADDR)


@dataclasses.dataclass(frozen=True)
class ObservedAddress(Message):
    """Intermediate → node (QAD): the control connection's peer address as the intermediate sees
    it; sent on registration and again on every change (NAT rebinding, migration)."""

    addr: Addr = _f(_ADDR)


@dataclasses.dataclass(frozen=True)
class OpenSession(Message):
    """Agent → intermediate: open a session to ``service``. ``request_id`` is chosen by the
    agent and echoed in `SessionOpened` or `Error`."""

    request_id: int = _f(_SAFE_INT)
    service: str = _f(_NAME)


@dataclasses.dataclass(frozen=True)
class SessionOpened(Message):
    """Intermediate → agent and → connector: a session exists.

    ``request_id`` echoes the agent's `OpenSession` (connectors may ignore it). ``agent`` is the
    agent identity the connector must accept on the end-to-end connection; ``connector`` is the
    connector serving ``service``. ``peer_addr`` is the other member's observed address, if
    known. ``session_id`` also keys the relay frames of this session. ``relay_token`` (8 bytes,
    16 hex digits) is the token the receiving member must put in every relay frame it sends
    for this session; each member gets its own, drawn at random by the intermediate, so a
    frame is bound to its sender and session by more than a spoofable source address.
    """

    request_id: int = _f(_SAFE_INT)
    session_id: bytes = _f(_SESSION_ID)
    service: str = _f(_NAME)
    agent: str = _f(_NAME)
    connector: str = _f(_NAME)
    peer_addr: Addr | None = _f(_Optional(_ADDR))
    relay_token: bytes = _f(_Bytes(RELAY_TOKEN_LEN))


@dataclasses.dataclass(frozen=True)
class SessionClosed(Message):
    """Node ↔ intermediate, either direction: the session is over. A node sends it to end a
    session; the intermediate sends it to both members when one leaves, on idle expiry or on
    policy."""

    session_id: bytes = _f(_SESSION_ID)
    reason: str = _f(_TEXT)


@dataclasses.dataclass(frozen=True)
class ResumeSession(Message):
    """Node → intermediate (control protocol /2), after it homed again: carry on session
    ``session_id`` here, whose relay was at an intermediate that is gone (or restarted).

    ``service``, ``agent`` and ``connector`` repeat what `SessionOpened` said and
    ``relay_token`` is the sender's token from it, which proves membership: the intermediate
    takes the session over from its own record of it (a fleet member that held the other
    side), or pairs this with the other member's ResumeSession. It answers
    `SessionResumed`, or `Error` (code UNKNOWN_SESSION) with ``session_id`` set."""

    session_id: bytes = _f(_SESSION_ID)
    service: str = _f(_NAME)
    agent: str = _f(_NAME)
    connector: str = _f(_NAME)
    relay_token: bytes = _f(_Bytes(RELAY_TOKEN_LEN))


@dataclasses.dataclass(frozen=True)
class SessionResumed(Message):
    """Intermediate → node (control protocol /2): the relay of ``session_id`` is this
    intermediate from now on (same tokens); the end-to-end connection goes on over it."""

    session_id: bytes = _f(_SESSION_ID)


@dataclasses.dataclass(frozen=True)
class SessionHeld(Message):
    """Intermediate → node (control protocol /2): the other member's intermediate of
    ``session_id`` is gone; that member is homing again and may resume the session within
    ``hold_ms``, so the peer's silence until then is not its death."""

    session_id: bytes = _f(_SESSION_ID)
    hold_ms: int = _f(_Int(0, MAX_DELAY_MS))


@dataclasses.dataclass(frozen=True)
class _CandidateExchange(Message):
    """Fields shared by `CandidateOffer` and `CandidateAnswer` (RFC 8445 §5.3 credentials)."""

    session_id: bytes = _f(_SESSION_ID)
    ufrag: str = _f(
        _Str(4, 256, pattern=_ICE_CHARS, pattern_text=_ICE_PATTERN)
    )  # RFC 8445 §5.3: 4..256 chars
    pwd: str = _f(
        _Str(22, 256, pattern=_ICE_CHARS, pattern_text=_ICE_PATTERN)
    )  # RFC 8445 §5.3: 22..256 chars
    candidates: tuple[Candidate, ...] = _f(_Tuple(_Nested(Candidate), MAX_CANDIDATES))


@dataclasses.dataclass(frozen=True)
class CandidateOffer(_CandidateExchange):
    """Agent → intermediate → connector (forwarded unchanged): the agent's ICE credentials and
    candidates for ``session_id``."""


@dataclasses.dataclass(frozen=True)
class CandidateAnswer(_CandidateExchange):
    """Connector → intermediate → agent (forwarded unchanged): the connector's ICE credentials
    and candidates, in answer to `CandidateOffer`."""


@dataclasses.dataclass(frozen=True)
class StartPunching(Message):
    """Intermediate → both session members: start connectivity checks ``delay_ms`` after
    receiving this. The intermediate picks each delay from that node's control-connection RTT
    so that both start at the same moment (DCUtR-style).

    Control protocol /3: ``strategy`` (one of `STRATEGIES`) is what the intermediate chose
    from both members' `NatSummary`; ``hard_side`` names the member ("agent" or
    "connector") behind the NAT that maps per destination: always for "birthday", for
    "prediction" when only one side is.
    Both are null (and omitted) from an intermediate of an older version."""

    session_id: bytes = _f(_SESSION_ID)
    delay_ms: int = _f(_Int(0, MAX_DELAY_MS))
    strategy: str | None = _f(_Added(_Str(choices=STRATEGIES)), default=None)
    hard_side: Literal["agent", "connector"] | None = _f(_Added(_Str(choices=ROLES)),
                                                         default=None)

    def _cross_check(self) -> str | None:
        if self.strategy == "birthday" and self.hard_side is None:
            return "strategy 'birthday' needs hard_side"
        if self.strategy is None and self.hard_side is not None:
            return "hard_side without a strategy"
        return None


@dataclasses.dataclass(frozen=True)
class NatSummary(Message):
    """Node → intermediate (control protocol /3), after `Registered` and whenever it changes:
    what the node learnt of its NAT, from which the intermediate chooses each session's
    punching strategy.

    ``mapping`` is "endpoint-independent" (the intermediate's two observers saw one port) or
    "endpoint-dependent" (two ports: a symmetric NAT), null if not known; ``allocation`` says
    how an endpoint-dependent NAT picks ports ("sequential", with ``step`` between -16 and 16,
    not 0; or "random"); ``filtering`` is RFC 4787 §5's, null if not known; ``mapped_port``
    whether the router maps a public port to the node's socket (PCP, NAT-PMP, UPnP);
    ``ipv6`` whether the node has a global IPv6 address."""

    mapping: str | None = _f(_Optional(_Str(choices=MAPPINGS)))
    allocation: str | None = _f(_Optional(_Str(choices=ALLOCATIONS)))
    step: int | None = _f(_Optional(_Int(-MAX_STEP, MAX_STEP)))
    filtering: str | None = _f(_Optional(_Str(choices=FILTERINGS)))
    mapped_port: bool = _f(_Bool())
    ipv6: bool = _f(_Bool())

    def _cross_check(self) -> str | None:
        if self.allocation is not None and self.mapping != "endpoint-dependent":
            return "an allocation is only known of an endpoint-dependent mapping"
        if (self.step is not None) != (self.allocation == "sequential"):
            return "step goes with a sequential allocation, and only with it"
        if self.step == 0:
            return "step must not be 0"
        return None


@dataclasses.dataclass(frozen=True)
class PunchingResult(Message):
    """Node → intermediate: how hole punching for ``session_id`` ended.

    ``path`` is ``"direct"`` (a pair was nominated; ``remote_addr`` is the peer's address on it)
    or ``"relay"`` (no direct path; ``remote_addr`` is null). ``rtt_ms`` is the measured RTT of
    the chosen path if known; ``elapsed_ms`` the time from `StartPunching` to the result.
    """

    session_id: bytes = _f(_SESSION_ID)
    path: Literal["direct", "relay"] = _f(_Str(choices=PATHS))
    rtt_ms: float | None = _f(_Optional(_DURATION))
    elapsed_ms: float = _f(_DURATION)
    remote_addr: Addr | None = _f(_Optional(_ADDR))

    def _cross_check(self) -> str | None:
        if self.path == "direct" and self.remote_addr is None:
            return "a direct result needs remote_addr"
        if self.path == "relay" and self.remote_addr is not None:
            return "a relay result has no remote_addr"
        return None


@dataclasses.dataclass(frozen=True)
class Ping(Message):
    """Node ↔ intermediate, either side: asks for a `Pong` with the same ``nonce`` (RTT of the
    control stream)."""

    nonce: int = _f(_SAFE_INT)


@dataclasses.dataclass(frozen=True)
class Pong(Message):
    """Node ↔ intermediate, either side: reply to `Ping`, echoing its ``nonce``."""

    nonce: int = _f(_SAFE_INT)


@dataclasses.dataclass(frozen=True)
class Error(Message):
    """Intermediate → node (a node may send it too): a request was refused or failed.

    ``code`` is an `ErrorCode` (any 400..599 is accepted; known codes decode to `ErrorCode`
    members). ``request_id`` / ``session_id`` say which request or session it concerns, if any.
    """

    code: int = _f(_Int(400, 599, ErrorCode))
    message: str = _f(_TEXT)
    request_id: int | None = _f(_Optional(_SAFE_INT), default=None)
    session_id: bytes | None = _f(_Optional(_SESSION_ID), default=None)


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.__name__: cls
    for cls in (
        Register,
        UpdateServices,
        Registered,
        ObservedAddress,
        OpenSession,
        SessionOpened,
        SessionClosed,
        ResumeSession,
        SessionResumed,
        SessionHeld,
        CandidateOffer,
        CandidateAnswer,
        StartPunching,
        NatSummary,
        PunchingResult,
        Ping,
        Pong,
        Error,
    )
}
"""JSON ``"type"`` value → message class."""

for _name, _cls in MESSAGE_TYPES.items():
    _cls.TYPE = _name
    _cls._field_specs()  # a field without a spec fails here, at import
Candidate._field_specs()
del _name, _cls


# --------------------------------------------------------------------------------------------
# Payload codec.


def _reject_constant(name: str) -> Any:
    raise ControlError(f"{name} is not allowed (JSON numbers must be finite)")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ControlError(f"number {_short(text)} is out of range")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ControlError(f"duplicate key {_short(key)}")
        obj[key] = value
    return obj


def encode_payload(msg: Message) -> bytes:
    """The JSON payload of ``msg`` (compact UTF-8). Raises ``ControlError`` if it would exceed
    ``MAX_PAYLOAD`` (possible only with very long names or many services)."""
    if not isinstance(msg, Message) or not msg.TYPE:
        raise TypeError(f"not a control message: {_short(msg)}")
    obj: dict[str, Any] = {"type": msg.TYPE}
    obj.update(msg._to_json_object())
    data = json.dumps(
        obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")
    ).encode("utf-8")
    if len(data) > MAX_PAYLOAD:
        raise ControlError(
            f"{msg.TYPE}: encoded payload is {len(data)} bytes, over the {MAX_PAYLOAD}-byte cap"
        )
    return data


def decode_payload(data: bytes) -> Message:
    """Decode one JSON payload into its message. Raises ``ControlError`` (a ``ValueError``) on
    anything but a valid message."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("control payload must be bytes-like")
    if len(data) == 0:
        raise ControlError("control payload is empty")
    if len(data) > MAX_PAYLOAD:
        raise ControlError(f"control payload is {len(data)} bytes, over the {MAX_PAYLOAD}-byte cap")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ControlError(
            f"control payload is not valid UTF-8: {exc.reason} at byte {exc.start}"
        ) from None
    try:
        obj = json.loads(
            text,
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_reject_constant,
            parse_float=_parse_float,
        )
    except RecursionError:
        raise ControlError("control payload: JSON nested too deeply") from None
    except ControlError as exc:  # from the hooks: duplicate key, NaN/Infinity, huge exponent
        raise ControlError(f"control payload: {exc}") from None
    except ValueError as exc:  # JSONDecodeError, integer digit limit
        raise ControlError(f"control payload is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ControlError(f"control payload must be a JSON object, got {_kind(obj)}")
    if "type" not in obj:
        raise ControlError("control message has no 'type' field")
    type_name = obj["type"]
    if not isinstance(type_name, str):
        raise ControlError(f"control message 'type' must be a string, got {_kind(type_name)}")
    cls = MESSAGE_TYPES.get(type_name)
    if cls is None:
        raise ControlError(f"unknown control message type {_short(type_name)}")
    return cls._from_json_object(obj, cls.TYPE, skip=frozenset(("type",)))


# --------------------------------------------------------------------------------------------
# Framing.


def encode(msg: Message) -> bytes:
    """One frame: 4-byte big-endian length, then the JSON payload of ``msg``."""
    payload = encode_payload(msg)
    return len(payload).to_bytes(LENGTH_PREFIX_LEN, "big") + payload


def decode(frame: bytes) -> Message:
    """Decode exactly one complete frame (as produced by `encode`)."""
    decoder = FrameDecoder()
    messages = decoder.feed(frame)
    if len(messages) != 1 or decoder.buffered:
        raise ControlError(
            f"expected exactly one complete control frame, got {len(messages)} "
            f"and {decoder.buffered} trailing bytes"
        )
    return messages[0]


def _check_length(length: int) -> None:
    if length == 0:
        raise ControlError("control frame: length is 0 (payloads are never empty)")
    if length > MAX_PAYLOAD:
        raise ControlError(f"control frame: length {length} is over the {MAX_PAYLOAD}-byte cap")


class FrameDecoder:
    """Sans-IO incremental decoder of one control stream.

    ``feed(data)`` takes whatever bytes the stream delivered and returns the messages completed
    by them, buffering a partial frame for the next call. A bad length is reported as soon as
    its 4 bytes are in, without waiting for the body.

    Any ``ControlError`` is final: the peer broke the protocol, so the decoder drops its buffer
    and every later ``feed`` raises too; send `Error` (``BAD_MESSAGE``) and close the stream.
    Messages decoded earlier in the failing call are discarded with it.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._failure: ControlError | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held for the next `feed`."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Message]:
        if self._failure is not None:
            raise ControlError(f"control stream already failed: {self._failure}")
        buf = self._buffer
        buf += data
        messages: list[Message] = []
        pos = 0
        end = len(buf)
        try:
            while end - pos >= LENGTH_PREFIX_LEN:
                length = int.from_bytes(buf[pos : pos + LENGTH_PREFIX_LEN], "big")
                _check_length(length)
                start = pos + LENGTH_PREFIX_LEN
                if end - start < length:
                    break
                messages.append(decode_payload(bytes(buf[start : start + length])))
                pos = start + length
        except ControlError as exc:
            self._failure = exc
            self._buffer = bytearray()
            raise
        del buf[:pos]
        return messages

    def finish(self) -> None:
        """Call when the stream ends: raises ``ControlError`` if a partial frame is left."""
        if self._failure is None and self._buffer:
            raise ControlError(
                f"control stream ended inside a frame ({len(self._buffer)} bytes left over)"
            )
