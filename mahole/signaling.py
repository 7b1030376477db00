"""The intermediate's signaling core (sans-IO): registry, policy, sessions, signaling.

The core holds no sockets, tasks or clock. Its shell (`mahole.roles.intermediate`) feeds it
what happened, each with the time `now`, and carries out what it asks for:

Inputs
    ``node_connected(handle, role, name, addr, now)``
        a control connection completed its handshake with a certificate of the deployment CA
        for ``role`` ``name``; ``addr`` is its observed address. ``handle`` is an opaque id
        the shell chooses (a str or an int, unique among the shell's live connections; a
        fleet makes it unique across intermediates, e.g. ``"relay1/17"``).
    ``control_message(handle, message, now)``
        a decoded control message (`mahole.wire.control`) arrived on its control stream.
    ``packet_authenticated(handle, addr, now, rtt=None)``
        a packet of the connection decrypted (only these count: an address seen on anything
        else is an attacker's guess). Refreshes liveness; a new ``addr`` is a NAT rebinding
        (QAD). ``rtt`` is the connection's smoothed RTT in seconds, if known; StartPunching is
        timed from it.
    ``node_disconnected(handle, now)``
        the connection ended.
    ``handle_timer(now)``
        the time ``next_timer()`` asked for has come.

Outputs: ``next_event()`` returns the next of these events (or None), oldest first:
`SendMessage`, `CloseNode`, `RelayAdd`, `RelayRemove`, `RelaySetMember`. A probe of a node is a
`SendMessage` carrying a control `Ping`.

State that may be shared between intermediates lives behind the `Registry` interface as
plain, serialisable records (`NodeRecord`, `SessionRecord`); `MemoryRegistry` keeps them in
this process. What belongs to one intermediate's connections — liveness, RTT, probes,
pending StartPunching deliveries, counters — stays in the core.

Behaviour worth knowing:

- A session ends only when a member sends SessionClosed, disconnects or is declared dead.
  Relay traffic has nothing to do with it: a session on the direct path carries no relay
  frames. Idle sessions are reaped end to end by the nodes themselves.
- One identity, one live node: a second registration of a (role, name) probes the first
  with a `Ping`. An answer within ``probe_timeout`` refuses the newcomer (`ErrorCode.CONFLICT`)
  and the first keeps its sessions; silence replaces the first.
- A node with no authenticated packet for ``node_dead_after`` is gone: its sessions end (the
  other member is told why) and its connection is closed.
- Repeated, out-of-order, foreign or unknown signaling is ignored and counted, never raised.
- Each punching round has a strategy (`choose_strategy`, from both members' `NatSummary`,
  control protocol /3): StartPunching tells it to members of /3; /status shows it.

Policy and quotas:

- Which connectors may offer which services: `OfferRule`s (``--offer CONNECTOR_GLOB=
  SERVICE_GLOB``). With none configured (``offers=None``) any connector of the deployment CA
  may offer any service, as before; `SignalingCore.from_config` warns about it at start. A
  `Register` offering a service no rule allows is refused as a whole (`ErrorCode.DENIED`, close
  code `CLOSE_DENIED`), naming the connector and the service, and logged at WARNING. Several
  connectors allowed to offer one service are replicas: of those below their session cap, the
  one serving the fewest sessions takes the next (the longest registered on a tie; one held
  by this intermediate before one elsewhere in the fleet).
- `Limits`, per identity, answered with `ErrorCode.RATE_LIMITED`: control connections per
  identity and the time to register; sessions opened per minute per agent; open sessions per
  agent and per connector; control messages per connection (a token bucket: excess messages
  are ignored and counted, and a node that has more than a burst of them ignored within
  ``ABUSE_WINDOW`` is closed with `CLOSE_RATE_LIMITED`); relay bandwidth per identity, as a
  per-session share (`RelaySetRate`).
- Every refusal that closes a connection sends `Error` and closes with a distinct application
  code (``CLOSE_*``) whose reason phrase repeats the Error's text: a message queued just before
  a close may never leave (aioquic sends only CONNECTION_CLOSE once closing).
- Session ids are secrets of sorts (they key relay frames): logs show `session_tag`.
- Every refusal is logged with the node and, for a session, the service: a session denied by
  the ACL, for an unknown service or an offline connector, or over a quota, and a service no
  --offer rule allows, at INFO (ordinary policy at work); a registration that contradicts
  its certificate, a second copy, too many connections and a control flood at WARNING (a
  broken or hostile node). At most ``REFUSAL_LOG_BURST`` lines of one kind are logged per
  ``REFUSAL_LOG_WINDOW`` seconds of ``now``; the rest are counted and reported in one line
  (``… and 1,234 more refusals …``) when the window ends (a timer), so a flood of refused
  requests cannot fill the disk.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import fnmatch
import heapq
import itertools
import logging
import os
import secrets
import time
from typing import Hashable

from . import logs
from .wire import control
from .wire.relay import new_session_id, session_tag

log = logging.getLogger(__name__)

__all__ = [
    "AclRule", "CloseNode", "Limits", "MemoryRegistry", "NodeRecord", "OfferRule", "Registry",
    "RelayAdd", "RelayRemove", "RelaySetMember", "RelaySetRate", "SendMessage",
    "SessionRecord", "SignalingCore", "choose_strategy", "session_tag",
]

# QUIC application error codes of closed control connections (CONNECTION_CLOSE type 0x1d,
# RFC 9000 §19.19); mahole.connection.ERROR_* are the same numbers (kept here so the core
# does not import aioquic). Never 0 (NO_ERROR) for a refusal; the reason phrase says why.
CLOSE_SHUTDOWN = 0x100  # ordinary close: stopping, replaced, gone silent
CLOSE_UNAUTHENTICATED = 0x101  # the certificate does not match what the node claims
CLOSE_PROTOCOL_ERROR = 0x102  # undecodable control stream, a broken protocol
CLOSE_RATE_LIMITED = 0x103  # over a quota: connections per identity, a control flood
CLOSE_CONFLICT = 0x104  # another live connection holds this identity (permanent)
CLOSE_DENIED = 0x105  # the policy refuses the registration: a service it may not offer

PERMANENT_CLOSES = frozenset((CLOSE_UNAUTHENTICATED, CLOSE_CONFLICT, CLOSE_DENIED))
"""Close codes after which a node must not retry (the configuration has to change)."""

PROBE_TIMEOUT = 1.0  # s: a probed node that answers within this is alive
NODE_DEAD_AFTER = 2.0  # s without an authenticated packet: the node is gone
ABUSE_WINDOW = 10.0  # s: more than a burst of ignored control messages within this closes
MAX_BUCKETS = 65536  # sessions-per-minute buckets kept (least recently used dropped)
MIN_RELAY_BURST = 64 * 1024  # bytes: the smallest relay bucket of a session's share
MAX_DEPARTED = 1024  # services remembered after their connector left (CONNECTOR_OFFLINE)
MAX_PUNCH_TIMES = 1000  # time-to-direct samples kept for the median in /status
MAX_REASON = 200  # characters of a close reason (CONNECTION_CLOSE reason phrase)
MAX_REMOTE_PROBES = 1024  # other intermediates' probes of nodes here awaiting a Pong
MAX_REMOTE_RTT = 10.0  # s: a member's RTT reported by another intermediate, at most
# Resuming a session after a member homed again (control protocol /2, ResumeSession): a
# resume that waits for the other member's (no record here) or for its old intermediate to
# be known silent waits this long at most; the member left behind is told to hold the
# session (SessionHeld) this long; at most this many resumes wait at once.
RESUME_WAIT = 5.0  # s
SESSION_HOLD = 6.0  # s: silence detection, re-homing (within 3 s) and the resume itself
MAX_PENDING_RESUMES = 4096
# A session to a connector at another intermediate of the fleet is opened there by a
# SessionOpened carried through the store's pub/sub, which drops what arrives while a
# subscriber is away (reconnecting, or not yet subscribed after its start); that
# intermediate confirms it by sending the SessionOpened back. Unconfirmed after this long
# (plus the store's round trip twice) it is sent again, the same (the other side takes a
# repeat as a repeat); after MIRROR_ATTEMPTS sends the agent's OpenSession is answered with
# an Error (TIMEOUT). The agent hears of the session only once it is confirmed, so it never
# waits on a session that exists at one intermediate only.
MIRROR_TIMEOUT = 1.0  # s per send: a second spans a resubscription (fleet_redis: 0.5 s)
MIRROR_ATTEMPTS = 3  # sends in all: the agent is answered within about 3 s, not its 10 s
PUNCH_SKEW_MIN = 0.0005  # s: StartPunching delays shorter than this are sent at once
REFUSAL_LOG_BURST = 10  # refusal lines of one kind logged per REFUSAL_LOG_WINDOW
REFUSAL_LOG_WINDOW = 10.0  # s
REFUSALS = {  # kind of refusal -> (log level, what the summary line calls it)
    "denied": (logging.INFO, "denied by the ACL"),
    "unknown_service": (logging.INFO, "for an unknown service"),
    "connector_offline": (logging.INFO, "for a service whose connector is offline"),
    "rate_limited": (logging.INFO, "over a session quota"),
    "unauthenticated": (logging.WARNING, "of a registration contradicting its certificate"),
    "offer": (logging.INFO, "of an offer no --offer rule allows"),
    "conflict": (logging.WARNING, "of a second copy of a node"),
    "connections": (logging.WARNING, "over the control connections per identity"),
    "flood": (logging.WARNING, "closing a control message flood"),
}

AGENT, CONNECTOR = 0, 1  # member index of a session (relay engine member order)


class _GlobRule:
    """`NODE_GLOB=SERVICE_GLOB` (fnmatch patterns, case-sensitive)."""

    WHAT = "NODE_GLOB=SERVICE_GLOB"

    def __init__(self, text):
        node, sep, service = text.partition("=")
        if not sep or not node or not service:
            raise ValueError(f"expected {self.WHAT}, got {text!r}")
        self.node, self.service = node, service

    def allows(self, node, service):
        return fnmatch.fnmatchcase(node, self.node) and fnmatch.fnmatchcase(service, self.service)

    def __str__(self):
        return f"{self.node}={self.service}"


class AclRule(_GlobRule):
    """`AGENT_GLOB=SERVICE_GLOB` (``--allow``): agents whose name matches may reach matching
    services."""

    WHAT = "AGENT_GLOB=SERVICE_GLOB"

    @property
    def agent(self):
        return self.node


class OfferRule(_GlobRule):
    """`CONNECTOR_GLOB=SERVICE_GLOB` (``--offer``): connectors whose name matches may offer
    matching services."""

    WHAT = "CONNECTOR_GLOB=SERVICE_GLOB"

    @property
    def connector(self):
        return self.node


@dataclasses.dataclass(frozen=True)
class Limits:
    """Quotas per identity, with their defaults; `IntermediateConfig` has fields
    and the command line flags of the same names. Over a quota means `ErrorCode.RATE_LIMITED`.

    connections_per_identity: control connections of one (role, name) at this intermediate,
                              registered or not (one registers; the rest are a reconnect in
                              progress or a twin being probed). Beyond it: closed at once.
                              (How long a connection may stay unregistered is the shell's
                              ``handshake_timeout``; a probe bounds a twin's wait.)
    sessions_per_minute:      sessions one agent may open per minute (a token bucket: that
                              many at once, then one every 60/N s).
    sessions_per_agent:       open sessions one agent may be a member of.
    sessions_per_connector:   open sessions one connector may serve (the next replica of the
                              service takes over).
    signaling_rate, signaling_burst: control messages per second per connection (a token
                              bucket); excess messages are ignored and counted; more than
                              ``signaling_burst`` ignored within ``ABUSE_WINDOW`` closes the
                              node (`CLOSE_RATE_LIMITED`).
    relay_rate_per_identity:  relay bytes/s one identity's sessions may use in all (0: no
                              cap). Expressed as a per-session share (`RelaySetRate`): the cap
                              divided by the member's open sessions rounded up to a power of
                              two (the busier member's), so the shares never add up to more.
    """

    connections_per_identity: int = 4
    sessions_per_minute: int = 120
    sessions_per_agent: int = 256
    sessions_per_connector: int = 4096
    signaling_rate: float = 50.0
    # An agent may open its whole sessions_per_minute at once, and each session costs up to
    # three messages (OpenSession, CandidateOffer, PunchResult): the burst must hold them.
    signaling_burst: int = 400
    relay_rate_per_identity: int = 0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "relay_rate_per_identity":
                if value < 0:
                    raise ValueError(f"{field.name} must be >= 0, got {value}")
            elif not value > 0:
                raise ValueError(f"{field.name} must be > 0, got {value}")


class _Bucket:
    """A token bucket: ``rate`` tokens a second, at most ``burst``; starts full."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate, burst, now):
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now):
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait(self):
        """Seconds until the next token (after a failed take)."""
        return (1.0 - self.tokens) / self.rate


def _share_level(count):
    """``count`` rounded up to a power of two (1, 2, 4, 8, ...): shares change only when a
    member's session count crosses one, so opening a session rarely touches the others."""
    return 1 << (max(count, 1) - 1).bit_length()


# --------------------------------------------------------------------------------------------
# Records: plain, serialisable state (no connection objects; nodes are named by handle).


def _addr(value):
    return None if value is None else (str(value[0]), int(value[1]))


def _hard(nat):
    return nat.get("mapping") == "endpoint-dependent"


def choose_strategy(agent_nat, connector_nat):
    """The punching strategy of a session whose members sent these NatSummary fields (dicts,
    or None when a member sent none): ``(strategy, hard_side)``, hard_side "agent",
    "connector" or None. docs/architecture.md, "Punching strategy", has the table.

    Unknown NATs get the plain checks, as before summaries existed; so do two global IPv6
    addresses (no NAT between them). A NAT that maps per destination (RFC 4787 §4.1) is the
    hard side: a port the router maps on either side makes it moot; one allocating in
    sequence gets predicted ports; one allocating at random faced by an endpoint-independent
    mapping gets birthday probing, unless the easy side filters nothing (its checks then
    pass). Two hard sides without a mapped port leave nothing to punch: relay at once.
    """
    if agent_nat is None or connector_nat is None:
        return "checks", None
    if agent_nat.get("ipv6") and connector_nat.get("ipv6"):
        return "checks", None
    hard = [role for role, nat in (("agent", agent_nat), ("connector", connector_nat))
            if _hard(nat)]
    if not hard:
        return "checks", None
    if agent_nat.get("mapped_port") or connector_nat.get("mapped_port"):
        return "mapped", None
    if len(hard) == 2:
        # Even two sequential NATs: both count in step, so each side's check to the peer's
        # predicted port p leaves from p + 1 and the peer's check to p + 1 from p + 2; the
        # mappings never pair up (0 of 30 in the lab matrix). Punching only delays the relay.
        return "relay", None
    side = hard[0]
    nat, easy = ((agent_nat, connector_nat) if side == "agent"
                 else (connector_nat, agent_nat))
    if nat.get("allocation") == "sequential":
        return "prediction", side
    if easy.get("filtering") == "endpoint-independent":
        return "checks", None
    if nat.get("allocation") == "random" and easy.get("mapping") == "endpoint-independent":
        return "birthday", side
    return "checks", None


@dataclasses.dataclass(frozen=True)
class NodeRecord:
    """A registered node."""

    handle: Hashable  # the shell's id of its control connection
    role: str  # "agent" or "connector"
    name: str  # from its certificate
    addr: tuple  # observed address of its control connection (host, port)
    services: tuple = ()  # a connector's service names
    home: str = ""  # the intermediate holding its control connection
    since: float = 0.0  # registration time (the home's clock)
    wall: float = 0.0  # registration time, wall clock: compares copies across a fleet
    # Its last NatSummary as plain JSON fields (bounded by the codec), None until one came.
    nat: dict | None = None

    def to_dict(self):
        return {"handle": self.handle, "role": self.role, "name": self.name,
                "addr": list(self.addr), "services": list(self.services), "home": self.home,
                "since": self.since, "wall": self.wall, "nat": self.nat}

    @classmethod
    def from_dict(cls, data):
        return cls(handle=data["handle"], role=data["role"], name=data["name"],
                   addr=_addr(data["addr"]), services=tuple(data["services"]),
                   home=data["home"], since=float(data["since"]),
                   wall=float(data.get("wall", 0.0)), nat=data.get("nat"))


@dataclasses.dataclass(frozen=True)
class SessionRecord:
    """A session between one agent and one connector, and how far its signaling got."""

    session_id: bytes
    service: str
    agent: Hashable  # handles of the members
    connector: Hashable
    agent_name: str
    connector_name: str
    home: str = ""
    created: float = 0.0
    offers: int = 0  # CandidateOffers forwarded (a re-punch offers again)
    answers: int = 0  # CandidateAnswers forwarded; never more than offers
    punch_round: int = 0  # StartPunching rounds begun
    punch_started: float | None = None  # when the current round began
    reported: tuple = ()  # roles whose PunchingResult for the current round arrived
    path: str = "relay"  # the agent's last PunchingResult decides
    strategy: str = ""  # of the current punching round (choose_strategy); "" before one
    hard_side: str = ""  # "agent" or "connector" for prediction and birthday, else ""
    agent_token: bytes = b""  # relay tokens of the members (RelayAdd); secret, never logged
    connector_token: bytes = b""

    def members(self):
        return (self.agent, self.connector)

    def other(self, handle):
        return self.connector if handle == self.agent else self.agent

    def to_dict(self):
        data = dataclasses.asdict(self)
        for key in ("session_id", "agent_token", "connector_token"):
            data[key] = data[key].hex()
        data["reported"] = list(self.reported)
        return data

    @classmethod
    def from_dict(cls, data):
        return cls(**{**data, "session_id": bytes.fromhex(data["session_id"]),
                      "agent_token": bytes.fromhex(data["agent_token"]),
                      "connector_token": bytes.fromhex(data["connector_token"]),
                      "reported": tuple(data["reported"])})


# --------------------------------------------------------------------------------------------
# The registry interface and its in-memory implementation.


class Registry(abc.ABC):
    """Where nodes and sessions are kept: in this process, or in a store several
    intermediates share. Records go in and come out whole (a store serialises them with
    ``to_dict``/``from_dict``); ``put_*`` adds or replaces by key."""

    # Nodes, by handle, by (role, name) and by service.
    @abc.abstractmethod
    def put_node(self, record: NodeRecord) -> None:
        """Add or replace the node ``record.handle``; at most one node per (role, name)."""

    @abc.abstractmethod
    def remove_node(self, handle) -> NodeRecord | None: ...

    @abc.abstractmethod
    def node(self, handle) -> NodeRecord | None: ...

    @abc.abstractmethod
    def node_by_identity(self, role: str, name: str) -> NodeRecord | None: ...

    @abc.abstractmethod
    def nodes(self) -> list[NodeRecord]: ...

    @abc.abstractmethod
    def connectors_for(self, service: str) -> list[NodeRecord]:
        """Connectors offering ``service``, longest registered first."""

    # Sessions, by id and by member.
    @abc.abstractmethod
    def put_session(self, record: SessionRecord) -> None: ...

    @abc.abstractmethod
    def remove_session(self, session_id: bytes) -> SessionRecord | None: ...

    @abc.abstractmethod
    def session(self, session_id: bytes) -> SessionRecord | None: ...

    @abc.abstractmethod
    def sessions(self) -> list[SessionRecord]: ...

    @abc.abstractmethod
    def sessions_of(self, handle) -> list[SessionRecord]: ...

    def session_count(self, handle) -> int:
        """How many sessions ``handle`` is a member of."""
        return len(self.sessions_of(handle))

    def fleet_rtt(self) -> float:
        """The round trip through the fleet's store, s (what a message to another
        intermediate adds); 0 alone."""
        return 0.0

    def relay_address(self, home: str) -> tuple | None:
        """Where intermediate ``home`` of the fleet takes relay frames, while it can be
        reached; None alone (a fleet's registry says)."""
        return None


def remote_handle(handle):
    """(home, handle there) of a member held by another intermediate of the fleet (its
    handle here is "HOME/HANDLE", mahole.fleet), or None for a member held here."""
    if isinstance(handle, str) and "/" in handle:
        home, there = handle.split("/", 1)
        return home, there
    return None


class MemoryRegistry(Registry):
    """The registry of one intermediate, in dictionaries."""

    def __init__(self):
        self._nodes = {}  # handle -> NodeRecord
        self._identities = {}  # (role, name) -> handle
        self._services = collections.defaultdict(dict)  # service -> {handle: None} (ordered)
        self._sessions = {}  # session_id -> SessionRecord
        self._member_of = collections.defaultdict(dict)  # handle -> {session_id: None}

    def put_node(self, record):
        key = (record.role, record.name)
        holder = self._identities.get(key)
        if holder is not None and holder != record.handle:
            raise KeyError(f"{record.role} {record.name!r} is registered by another handle")
        old = self._nodes.get(record.handle)
        if old is not None:
            self._unindex_services(old)
        self._nodes[record.handle] = record
        self._identities[key] = record.handle
        for service in record.services:
            self._services[service][record.handle] = None

    def _unindex_services(self, record):
        for service in record.services:
            holders = self._services.get(service)
            if holders is not None:
                holders.pop(record.handle, None)
                if not holders:
                    del self._services[service]

    def remove_node(self, handle):
        record = self._nodes.pop(handle, None)
        if record is not None:
            self._identities.pop((record.role, record.name), None)
            self._unindex_services(record)
        return record

    def node(self, handle):
        return self._nodes.get(handle)

    def node_by_identity(self, role, name):
        handle = self._identities.get((role, name))
        return None if handle is None else self._nodes[handle]

    def nodes(self):
        return list(self._nodes.values())

    def connectors_for(self, service):
        return [self._nodes[h] for h in self._services.get(service, ())]

    def put_session(self, record):
        self._sessions[record.session_id] = record
        for handle in record.members():
            self._member_of[handle][record.session_id] = None

    def remove_session(self, session_id):
        record = self._sessions.pop(session_id, None)
        if record is not None:
            for handle in record.members():
                of = self._member_of.get(handle)
                if of is not None:
                    of.pop(session_id, None)
                    if not of:
                        del self._member_of[handle]
        return record

    def session(self, session_id):
        return self._sessions.get(session_id)

    def sessions(self):
        return list(self._sessions.values())

    def sessions_of(self, handle):
        return [self._sessions[s] for s in self._member_of.get(handle, ())]

    def session_count(self, handle):
        return len(self._member_of.get(handle, ()))


# --------------------------------------------------------------------------------------------
# Events.


@dataclasses.dataclass(frozen=True)
class SendMessage:
    """Send ``message`` (a `mahole.wire.control.Message`) on the node's control stream."""

    handle: Hashable
    message: control.Message


@dataclasses.dataclass(frozen=True)
class FleetSend:
    """Carry ``message`` to intermediate ``home`` of the fleet, for its member ``to`` (the
    handle there) or, with ``to`` None, for its core; ``sender`` is the member here it comes
    from (None: this core). ``session`` goes with a SessionOpened, so the other intermediate
    can relay the session's frames; ``rtt`` lets the owner time StartPunching for a member
    it reaches through another intermediate."""

    home: str
    to: Hashable
    sender: Hashable
    message: control.Message
    session: "SessionRecord | None" = None
    rtt: float | None = None  # the sender's control RTT here, s (with a CandidateAnswer)


@dataclasses.dataclass(frozen=True)
class CloseNode:
    """Close the node's control connection with a QUIC application error ``code`` and
    ``reason``. The core has already forgotten the node; `node_disconnected` may follow."""

    handle: Hashable
    code: int
    reason: str


@dataclasses.dataclass(frozen=True)
class RelayAdd:
    """Relay frames of ``session_id`` between these two addresses (agent, connector).

    ``agent_token`` / ``connector_token`` (8 random bytes each, independent) are the tokens
    that member was sent in its `SessionOpened.relay_token` and must put in every relay frame
    it sends for this session; a frame with the wrong token is not the member's."""

    session_id: bytes
    agent_addr: tuple
    connector_addr: tuple
    agent_token: bytes
    connector_token: bytes


@dataclasses.dataclass(frozen=True)
class RelayRemove:
    """Stop relaying ``session_id``."""

    session_id: bytes


@dataclasses.dataclass(frozen=True)
class RelaySetRate:
    """Limit the relay of ``session_id`` to ``rate_bps`` bytes/s (with a bucket of
    ``burst_bytes``): the session's share of its members' per-identity relay cap. Only sent
    when ``relay_rate_per_identity`` is set; a session never told has no share cap."""

    session_id: bytes
    rate_bps: int
    burst_bytes: int


@dataclasses.dataclass(frozen=True)
class RelaySetMember:
    """Member ``member`` (0 agent, 1 connector) of ``session_id`` is now at ``addr``."""

    session_id: bytes
    member: int
    addr: tuple


# --------------------------------------------------------------------------------------------
# The core.


class _Link:
    """What this intermediate knows of one control connection (never shared)."""

    __slots__ = ("handle", "role", "name", "addr", "last_rx", "rtt", "registered", "probing",
                 "bucket", "ignored", "ignored_since", "resumable", "nat_aware")

    def __init__(self, handle, role, name, addr, now, bucket, resumable=False, nat_aware=False):
        self.resumable = resumable  # speaks control protocol /2 (session resumption)
        self.nat_aware = nat_aware  # speaks /3: NatSummary, StartPunching.strategy
        self.handle = handle
        self.role = role
        self.name = name
        self.addr = addr
        self.last_rx = now
        self.rtt = None
        self.registered = False
        self.probing = None  # (role, name) while this newcomer waits for a probe
        self.bucket = bucket  # control messages (Limits.signaling_rate/burst)
        self.ignored = 0  # messages over the rate since ignored_since
        self.ignored_since = now

    def __str__(self):
        return f"{self.role} {self.name!r}"


class _RemoteLink:
    """A session member held by another intermediate of the fleet, as the signaling of a
    session owned here sees it."""

    __slots__ = ("handle", "role", "name")

    def __init__(self, handle, role, name):
        self.handle = handle
        self.role = role
        self.name = name

    def __str__(self):
        return f"{self.role} {self.name!r}"


class _Resume:
    """A ResumeSession waiting for the other member's, for the intermediate that held the
    session to be known silent, or for the one it was passed on to."""

    __slots__ = ("asker", "message", "deadline")

    def __init__(self, asker, message, deadline):
        self.asker = asker  # _Link, or _Asker of another intermediate
        self.message = message
        self.deadline = deadline


class _Asker:
    """A member at another intermediate of the fleet asking to resume a session held
    here; that intermediate checked its identity, as for any member it passes words on
    for. Frames for it go to that intermediate's relay (``addr``)."""

    __slots__ = ("home", "sender", "handle", "role", "name", "addr")

    def __init__(self, home, sender, role, name, addr):
        self.home = home
        self.sender = sender  # its handle there
        self.handle = f"{home}/{sender}"
        self.role = role
        self.name = name
        self.addr = addr

    def __str__(self):
        return f"{self.role} {self.name!r}"


class _Mirroring:
    """A session opened here to a connector at another intermediate, until that one
    confirms it (or MIRROR_ATTEMPTS sends go unanswered)."""

    __slots__ = ("home", "request_id", "to_agent", "to_connector", "attempts")

    def __init__(self, home, request_id, to_agent, to_connector):
        self.home = home
        self.request_id = request_id
        self.to_agent = to_agent  # its SessionOpened, sent once the session is confirmed
        self.to_connector = to_connector  # the SessionOpened carried to ``home``
        self.attempts = 0


class _Probe:
    __slots__ = ("old", "newcomer", "register", "nonce", "deadline")

    def __init__(self, old, newcomer, register, nonce, deadline):
        self.old = old
        self.newcomer = newcomer
        self.register = register
        self.nonce = nonce
        self.deadline = deadline


def _fmt(addr):
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class SignalingCore:
    """Registry, ACL, sessions and signaling of one intermediate (see the module docstring).

    acl:             `AclRule`s (or their text); none means every session is denied.
    registry:        a `Registry`; a fresh `MemoryRegistry` by default.
    home:            this intermediate's name, written into the records it creates.
    offers:          `OfferRule`s (or their text): which connectors may offer which
                     services. None (the default) lets any connector offer any service; an
                     empty list lets none.
    probe_timeout:   how long a registered node has to answer the probe that a second
                     registration of its identity triggers.
    node_dead_after: silence (no authenticated packet) after which a node is gone.
    limits:          `Limits` (quotas per identity); the defaults if None.
    token_source:    ``f(n) -> n random bytes`` for relay tokens (``os.urandom``; tests
                     inject their own).
    punch_sync:      time StartPunching from the members' RTTs (the default); False sends
                     it to both at once.
    wall_clock:      ``f() -> seconds`` of the wall clock (``time.time``), stamped on node
                     records so that copies of an identity at two intermediates of a fleet
                     can be told apart by age (tests inject their own).
    """

    def __init__(self, *, acl=(), offers=None, registry=None, home="",
                 probe_timeout=PROBE_TIMEOUT, node_dead_after=NODE_DEAD_AFTER, limits=None,
                 token_source=os.urandom, wall_clock=time.time, punch_sync=True):
        self.acl = [rule if isinstance(rule, AclRule) else AclRule(rule) for rule in acl]
        self.offers = None if offers is None else [
            rule if isinstance(rule, OfferRule) else OfferRule(rule) for rule in offers]
        self.registry = registry if registry is not None else MemoryRegistry()
        self.home = home
        self.probe_timeout = probe_timeout
        self.node_dead_after = node_dead_after
        self.limits = limits if limits is not None else Limits()
        self._token_source = token_source
        self._wall_clock = wall_clock
        self.punch_sync = punch_sync
        self.counters = dict.fromkeys((
            "nodes_registered", "refused_registration", "refused_conflict", "nodes_replaced",
            "nodes_dead", "probes_sent", "probes_answered", "sessions_opened",
            "sessions_denied", "sessions_unknown_service", "sessions_connector_offline",
            "sessions_rate_limited", "sessions_closed", "offers_forwarded",
            "answers_forwarded", "start_punching_sent", "bad_requests", "ignored_signaling",
            "ignored_unknown_node", "ignored_unknown_session", "ignored_foreign_session",
            "ignored_wrong_direction", "ignored_duplicate_answer", "ignored_duplicate_result",
            "ignored_unexpected_result", "ignored_unexpected_pong", "ignored_duplicate_register",
            "refused_offer", "refused_connections", "signaling_dropped",
            "nodes_flooding", "relay_shares_set", "services_updated",
            "sessions_connector_elsewhere", "sessions_across", "fleet_sent", "fleet_received",
            "fleet_ignored", "sessions_mirrored", "sessions_resumed", "sessions_held",
            "resumes_refused", "resumes_expired", "duplicates_found", "duplicates_let_go",
            "fleet_resent", "fleet_duplicates", "sessions_across_unconfirmed",
        ), 0)
        self.punching = {"attempts": 0, "direct": 0, "relay": 0}
        self.strategies = dict.fromkeys(control.STRATEGIES, 0)  # punching rounds of each
        self.counters["nat_summaries"] = 0
        self.time_to_direct_ms = collections.deque(maxlen=MAX_PUNCH_TIMES)
        self._links = {}  # handle -> _Link
        self._probes = {}  # (role, name) -> _Probe
        self._remote_probes = {}  # (handle, nonce) -> intermediate that asked (bounded)
        # Members at other intermediates -> their RTT as StartPunching sees it, s (one per
        # member of a session owned here: bounded by the session quotas).
        self._remote_rtts = {}
        self._departed = collections.OrderedDict()  # service -> text (recently offline)
        self._events = collections.deque()
        self._timers = []  # heap of (when, seq, key); valid while _deadlines[key] == when
        self._deadlines = {}
        self._seq = itertools.count()
        self._punches = {}  # ("punch", session_id, handle) -> (punch_round, message)
        self._identity_links = collections.defaultdict(dict)  # (role, name) -> {handle: None}
        self._open_buckets = collections.OrderedDict()  # agent name -> _Bucket (per minute)
        self._shares = {}  # session_id -> relay rate share sent (RelaySetRate)
        self._resumes = {}  # session_id -> _Resume (bounded: MAX_PENDING_RESUMES)
        # session_id -> _Mirroring, sessions owned here not yet confirmed by the connector's
        # intermediate (each is a session in the registry: bounded by the session quotas).
        self._mirroring = {}
        # (role, name) -> (local handle, remote handle, nonce): a copy here asking an older
        # copy elsewhere whether it lives (one per identity held here: bounded).
        self._duplicate_probes = {}
        self.refusal_log = logs.LogLimit(REFUSAL_LOG_BURST, REFUSAL_LOG_WINDOW,
                                         max_kinds=len(REFUSALS))

    @classmethod
    def from_config(cls, cfg, *, home="", registry=None, **kwargs):
        """The core an `IntermediateConfig` describes (``allow``, ``offer``, ``probe_timeout``,
        ``node_dead_after`` and the `Limits` fields of the same names). Warns when no
        ``--offer`` rule is configured: then any connector may offer any service."""
        limits = Limits(**{field.name: getattr(cfg, field.name)
                           for field in dataclasses.fields(Limits) if hasattr(cfg, field.name)})
        offers = tuple(getattr(cfg, "offer", ()) or ())
        if not offers:
            log.warning("no --offer rules: any connector of the deployment CA may offer any "
                        "service; add --offer CONNECTOR_GLOB=SERVICE_GLOB to say which")
        return cls(acl=cfg.allow, offers=offers or None, registry=registry, home=home,
                   probe_timeout=cfg.probe_timeout, node_dead_after=cfg.node_dead_after,
                   limits=limits, punch_sync=getattr(cfg, "punch_sync", True), **kwargs)

    # Outputs ---------------------------------------------------------------------------
    def next_event(self):
        """The next thing to do, or None."""
        return self._events.popleft() if self._events else None

    def next_timer(self):
        """When ``handle_timer`` wants to run next, or None."""
        timers = self._timers
        while timers and self._deadlines.get(timers[0][2]) != timers[0][0]:
            heapq.heappop(timers)  # superseded or cancelled
        return timers[0][0] if timers else None

    def _send(self, handle, message, sender=None, session=None):
        remote = remote_handle(handle)
        if remote is None:
            link = self._links.get(handle)
            if (isinstance(message, control.StartPunching) and message.strategy is not None
                    and link is not None and not link.nat_aware):
                # A member of control protocol /1 or /2 refuses fields it does not know.
                message = dataclasses.replace(message, strategy=None, hard_side=None)
            self._events.append(SendMessage(handle, message))
            return
        self.counters["fleet_sent"] += 1
        self._events.append(FleetSend(remote[0], remote[1], sender, message, session))

    def _reachable(self, handle):
        """A member this core can send to: connected here, or held by another intermediate
        of the fleet."""
        return handle in self._links or remote_handle(handle) is not None

    def _error(self, handle, code, text, request_id=None, session_id=None):
        self._send(handle, control.Error(code=code, message=text[:control.MAX_TEXT_LEN],
                                         request_id=request_id, session_id=session_id))

    def _log_refusal(self, kind, now, msg, *args):
        """Log a refusal of ``kind`` (`REFUSALS`) unless its kind is over the rate limit;
        lines not logged are summed up in one line when the kind's window ends."""
        level = REFUSALS[kind][0]
        logged, missed = self.refusal_log.take(kind, now)
        if missed:
            self._log_missed_refusals(kind, missed)
        if logged:
            log.log(level, msg, *args)
            return
        end = self.refusal_log.window_end(kind)
        if self._deadlines.get(("refusals", kind)) != end:
            self._schedule(("refusals", kind), end)

    def _log_missed_refusals(self, kind, missed):
        level, what = REFUSALS[kind]
        log.log(level, "… and %s more refusals %s in %g s", f"{missed:,}", what,
                self.refusal_log.window)

    def _ignore(self, kind, link, message):
        self.counters["ignored_signaling"] += 1
        self.counters[f"ignored_{kind}"] += 1
        log.debug("ignored %s from %s: %s", type(message).__name__, link, kind)

    # Timers ----------------------------------------------------------------------------
    def _schedule(self, key, when):
        self._deadlines[key] = when
        heapq.heappush(self._timers, (when, next(self._seq), key))

    def _cancel(self, key):
        self._deadlines.pop(key, None)

    def handle_timer(self, now):
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _seq, key = heapq.heappop(timers)
            if self._deadlines.get(key) != when:
                continue
            del self._deadlines[key]
            kind = key[0]
            if kind == "dead":
                self._check_alive(key[1], now)
            elif kind == "probe":
                self._probe_expired(key[1], now)
            elif kind == "punch":
                self._deliver_punch(key)
            elif kind == "resume":
                self._resume_expired(key[1], now)
            elif kind == "mirror":
                self._mirror_unconfirmed(key[1], now)
            elif kind == "duplicate":  # the older copy did not answer: it is stale
                self._duplicate_probes.pop(key[1], None)
            elif kind == "remote_probe":  # the asker has given up by now
                self._remote_probes.pop(key[1:], None)
            elif kind == "refusals":
                for refusal, missed in self.refusal_log.due(now):
                    self._log_missed_refusals(refusal, missed)

    # Connections -----------------------------------------------------------------------
    def node_connected(self, handle, role, name, addr, now, resumable=False, nat_aware=False):
        """A control connection authenticated as ``role`` ``name`` (from its certificate);
        ``resumable`` if it speaks control protocol /2 (session resumption), ``nat_aware``
        if /3 (NatSummary, the strategy in StartPunching)."""
        if handle in self._links:
            raise ValueError(f"handle {handle!r} is already connected")
        limits = self.limits
        held = self._identity_links[(role, name)]
        if len(held) >= limits.connections_per_identity:
            self.counters["refused_connections"] += 1
            text = (f"{role} {name!r} already has {len(held)} control connections here, the "
                    f"most allowed (--connections-per-identity)")
            self._log_refusal("connections", now, "refused a connection from %s: %s",
                              _fmt(_addr(addr)), text)
            self._events.append(CloseNode(handle, CLOSE_RATE_LIMITED, text[:MAX_REASON]))
            return
        held[handle] = None
        self._links[handle] = _Link(handle, role, name, _addr(addr), now,
                                    _Bucket(limits.signaling_rate, limits.signaling_burst, now),
                                    resumable, nat_aware)
        self._schedule(("dead", handle), now + self.node_dead_after)

    def _refuse(self, link, code, close_code, text, now, request_id=None):
        """Tell the node ``text`` in an Error, forget it and close its connection with
        ``close_code``, the reason phrase repeating the text (the Error may not arrive)."""
        self._error(link.handle, code, text, request_id)
        if link.handle in self._links:
            self._drop(link, "was refused", now)
        self._events.append(CloseNode(link.handle, close_code, text[:MAX_REASON]))

    def packet_authenticated(self, handle, addr, now, rtt=None):
        link = self._links.get(handle)
        if link is None:
            return
        if now > link.last_rx:
            link.last_rx = now
        if rtt:
            link.rtt = rtt
        addr = _addr(addr)
        if addr == link.addr:
            return
        previous, link.addr = link.addr, addr
        log.info("%s moved from %s to %s", link, _fmt(previous), _fmt(addr))
        if not link.registered:
            return
        record = self.registry.node(handle)
        if record is not None:
            self.registry.put_node(dataclasses.replace(record, addr=addr))
        self._send(handle, control.ObservedAddress(addr=addr))
        for session in self.registry.sessions_of(handle):
            member = AGENT if session.agent == handle else CONNECTOR
            self._events.append(RelaySetMember(session.session_id, member, addr))

    def node_disconnected(self, handle, now):
        link = self._links.get(handle)
        if link is not None:
            self._drop(link, "disconnected", now)

    def _check_alive(self, handle, now):
        link = self._links.get(handle)
        if link is None:
            return
        deadline = link.last_rx + self.node_dead_after
        if now < deadline:
            self._schedule(("dead", handle), deadline)
            return
        self.counters["nodes_dead"] += 1
        log.warning("%s at %s stopped answering (silent for %.1f s)", link, _fmt(link.addr),
                    now - link.last_rx)
        self._drop(link, "stopped answering", now)
        self._events.append(CloseNode(handle, CLOSE_SHUTDOWN, "stopped answering"))

    def _drop(self, link, why, now):
        """Forget a connection: its registration, its sessions, any probe it is part of.
        ``why`` completes "ROLE NAME ..." in what the other session members are told."""
        handle = link.handle
        del self._links[handle]
        self._cancel(("dead", handle))
        key = (link.role, link.name)
        held = self._identity_links.get(key)
        if held is not None:
            held.pop(handle, None)
            if not held:
                del self._identity_links[key]
        if link.probing is not None:  # a newcomer left while its predecessor was probed
            self._probes.pop(key, None)
            self._cancel(("probe", key))
        if not link.registered:
            return
        for session_id in [s for s, r in self._resumes.items() if r.asker.handle == handle]:
            del self._resumes[session_id]
            self._cancel(("resume", session_id))
        reason = f"{link.role} {link.name} {why}"
        others = {}
        for session in self.registry.sessions_of(handle):
            self._close_session(session, reason, notify_except=handle, rebalance=False)
            others[session.other(handle)] = None
        self._rebalance([other for other in others if other in self._links])
        record = self.registry.remove_node(handle)
        if record is not None and record.role == "connector":
            for service in record.services:
                self._departed[service] = (f"connector {record.name!r} offering service "
                                           f"{service!r} is offline ({why})")
                self._departed.move_to_end(service)
            while len(self._departed) > MAX_DEPARTED:
                self._departed.popitem(last=False)
        log.info("%s %s", link, why)
        probe = self._probes.get(key)
        if probe is not None and probe.old == handle:  # the probed node left: newcomer in
            del self._probes[key]
            self._cancel(("probe", key))
            newcomer = self._links.get(probe.newcomer)
            if newcomer is not None:
                newcomer.probing = None
                self._register(newcomer, probe.register, now)

    # Control messages ------------------------------------------------------------------
    def control_message(self, handle, message, now):
        link = self._links.get(handle)
        if link is None:  # closed here already (replaced, dead): late words are ignored
            self.counters["ignored_signaling"] += 1
            self.counters["ignored_unknown_node"] += 1
            return
        if not link.bucket.take(now):
            self._flooded(link, now)
            return
        if isinstance(message, control.Pong):
            self._pong(link, message, now)
        elif not link.registered:
            if link.probing is not None:
                self._ignore("duplicate_register", link, message)
            elif isinstance(message, control.Register):
                self._check_register(link, message, now)
            elif isinstance(message, control.Ping):
                self._send(handle, control.Pong(nonce=message.nonce))
            else:
                self._error(handle, control.ErrorCode.NOT_REGISTERED, "register first")
        elif isinstance(message, control.ResumeSession):
            self._resume(link, message, now)
        elif self._mirrored(link, message):
            return
        elif isinstance(message, control.OpenSession) and link.role == "agent":
            self._open_session(link, message, now)
        elif isinstance(message, control.UpdateServices) and link.role == "connector":
            self._update_services(link, message, now)
        elif isinstance(message, control.SessionClosed):
            session = self._own_session(link, message)
            if session is not None:
                self._close_session(session, f"closed by {link.role} {link.name}: "
                                             f"{message.reason}", notify_except=handle)
        elif isinstance(message, control.CandidateOffer):
            self._offer(link, message)
        elif isinstance(message, control.CandidateAnswer):
            self._answer(link, message, now)
        elif isinstance(message, control.PunchingResult):
            self._punching_result(link, message)
        elif isinstance(message, control.NatSummary):
            self._nat_summary(link, message)
        elif isinstance(message, control.Ping):
            self._send(handle, control.Pong(nonce=message.nonce))
        elif isinstance(message, control.Register):
            self._ignore("duplicate_register", link, message)
        else:
            self.counters["bad_requests"] += 1
            self._error(handle, control.ErrorCode.BAD_MESSAGE,
                        f"unexpected {type(message).__name__} from {link.role} {link.name}")

    def _flooded(self, link, now):
        """A message over the node's control-message rate: ignored and counted; more than a
        burst of them within ABUSE_WINDOW closes the node."""
        self.counters["signaling_dropped"] += 1
        if now - link.ignored_since > ABUSE_WINDOW:
            link.ignored, link.ignored_since = 0, now
        link.ignored += 1
        limits = self.limits
        if link.ignored <= limits.signaling_burst:
            return
        self.counters["nodes_flooding"] += 1
        text = (f"{link.role} {link.name!r} sent control messages faster than "
                f"{limits.signaling_rate:g}/s (burst {limits.signaling_burst}): "
                f"{link.ignored} ignored within {ABUSE_WINDOW:g} s")
        self._log_refusal("flood", now, "closing %s at %s: %s", link, _fmt(link.addr), text)
        self._refuse(link, control.ErrorCode.RATE_LIMITED, CLOSE_RATE_LIMITED, text, now)

    # Sessions across intermediates -------------------------------------------------------
    # The agent's intermediate owns the session: its core runs the signaling (offers,
    # answers, StartPunching, results), and its relay forwards the agent's frames to the
    # connector's intermediate. That one keeps a mirror of the session (home = the owner):
    # enough to relay the connector's frames and to pass messages both ways. It confirms
    # the mirror to the owner, which only then answers the agent (MIRROR_TIMEOUT).

    def _mirrored(self, link, message):
        """A member's message about a session mirrored here goes to the session's owner;
        True if it was such a message (handled)."""
        session_id = getattr(message, "session_id", None)
        if session_id is None or isinstance(message, control.Error):
            return False
        session = self.registry.session(session_id)
        if session is None or session.home == self.home:
            return False
        if link.handle not in session.members():
            self._ignore("foreign_session", link, message)
            return True
        if not isinstance(message, (control.CandidateOffer if link.role == "agent"
                                    else control.CandidateAnswer, control.PunchingResult,
                                    control.SessionClosed)):
            self._ignore("wrong_direction", link, message)
            return True
        if isinstance(message, control.SessionClosed):
            self._forget_mirror(session)
        owner, there = remote_handle(session.other(link.handle))
        self.counters["fleet_sent"] += 1
        self._events.append(FleetSend(owner, there, link.handle, message, rtt=link.rtt))
        return True

    def _forget_mirror(self, session):
        if self.registry.remove_session(session.session_id) is not None:
            self._events.append(RelayRemove(session.session_id))

    def fleet_message(self, home, sender, to, message, now, session=None, rtt=None):
        """A message from intermediate ``home`` of the fleet (`FleetSend` there): from its
        member ``sender``, for member ``to`` here (handles as text), with the session's
        record if it is a SessionOpened. Checked like any input: it must fit a session and
        its members, or it is ignored and counted."""
        self.counters["fleet_received"] += 1
        target = self._local_link(to)
        if isinstance(message, (control.ResumeSession, control.SessionResumed)) or (
                isinstance(message, control.Error) and message.session_id is not None):
            return self._fleet_resume(home, sender, target, message, now, session)
        if isinstance(message, (control.Ping, control.Pong, control.Error)):
            self._fleet_probe(home, sender, target, message, now)
            return None
        if isinstance(message, control.SessionOpened):
            if session is None:  # the connector's intermediate confirms a session of ours
                return self._mirror_confirmed(home, sender, message, now)
            if target is None:
                return self._fleet_ignore("session_opened", home)
            self._mirror(home, target, message, session, now)
            return None
        session_id = getattr(message, "session_id", None)
        record = self.registry.session(session_id) if session_id is not None else None
        if record is None or (target is not None and target.handle not in record.members()):
            return self._fleet_ignore("unknown_session", home)
        remote_member = f"{home}/{sender}"
        if record.home == self.home:  # the owner: as if the remote member had sent it here
            if remote_member not in record.members():
                return self._fleet_ignore("foreign_member", home)
            peer = _RemoteLink(remote_member, "agent" if remote_member == record.agent
                               else "connector", record.agent_name
                               if remote_member == record.agent else record.connector_name)
            if isinstance(message, (control.CandidateAnswer, control.CandidateOffer)):
                if isinstance(rtt, (int, float)) and 0 <= rtt < MAX_REMOTE_RTT:
                    # StartPunching reaches it through the fleet's store and its intermediate:
                    # as far as its own control RTT plus the store's round trip.
                    self._remote_rtts[remote_member] = rtt + self.registry.fleet_rtt()
                if isinstance(message, control.CandidateOffer):  # an agent resumed elsewhere
                    self._offer(peer, message)
                else:
                    self._answer(peer, message, now)
            elif isinstance(message, control.PunchingResult):
                self._punching_result(peer, message)
            elif isinstance(message, control.SessionClosed):
                # Before it confirms the session, the connector's intermediate closes it only
                # to refuse it (the connector's session quota).
                self._close_session(record, f"closed by {peer}: {message.reason}",
                                    notify_except=remote_member,
                                    code=control.ErrorCode.RATE_LIMITED)
            else:
                self._fleet_ignore("wrong_direction", home)
            return None
        if record.home != home or target is None:  # a mirror takes words from its owner only
            return self._fleet_ignore("foreign_member", home)
        if isinstance(message, control.SessionClosed):
            self._forget_mirror(record)
        elif not isinstance(message, (control.CandidateOffer if target.role == "connector"
                                      else control.CandidateAnswer, control.StartPunching)):
            return self._fleet_ignore("wrong_direction", home)
        self._send(target.handle, message)
        return None

    def _fleet_resume(self, home, sender, target, message, now, session):
        """Resumption across the fleet: a member at ``home`` asks to resume a session whose
        other member (``target``) is here; ``home`` took over a session a member here asked
        to resume (SessionResumed with its record); or it refused to (Error)."""
        if target is None:
            return self._fleet_ignore("resume", home)
        if isinstance(message, control.SessionResumed):
            return self._mirror_resumed(home, target, message, session)
        if isinstance(message, control.Error):
            waiting = self._resumes.get(message.session_id)
            if waiting is None or waiting.asker is not target:
                return self._fleet_ignore("resume", home)
            del self._resumes[message.session_id]
            self._cancel(("resume", message.session_id))
            self.counters["resumes_refused"] += 1
            self._send(target.handle, message)
            return None
        relay_peer = self.registry.relay_address(home)
        if relay_peer is None or not isinstance(sender, str) or not sender:
            return self._fleet_ignore("resume", home)
        role = "connector" if target.role == "agent" else "agent"
        asker = _Asker(home, sender, role,
                       message.agent if role == "agent" else message.connector, relay_peer)
        self._resume(asker, message, now)
        return None

    def resolve_duplicates(self, now):
        """Identities the fleet's view found registered here and at another intermediate
        (``registry.duplicates``): only possible when copies registered while the store was
        unavailable. The newer copy's intermediate asks the older copy whether it lives (a
        probe through the fleet); if it answers, the newer copy is let go with CONFLICT, as
        a second copy is at registration. A stale record (the older copy left) changes
        nothing."""
        found = getattr(self.registry, "duplicates", None)
        later = []
        while found:
            key, _ = found.popitem()
            local = self.registry.node_by_identity(*key)
            if local is None or local.home != self.home or key in self._duplicate_probes:
                continue
            older = [r for r in self.registry.remote_copies(*key)
                     if (r.wall, r.home) < (local.wall, self.home)]
            if not older:
                continue  # this copy is the older: the other's intermediate acts
            older = [r for r in older if self.registry.relay_address(r.home) is not None]
            if not older:  # not reachable yet (the store is just back): at the next change
                later.append(key)
                continue
            self.counters["duplicates_found"] += 1
            remote = min(older, key=lambda r: (r.wall, r.home))
            home, there = remote_handle(remote.handle)
            nonce = secrets.randbits(53)
            self._duplicate_probes[key] = (local.handle, remote.handle, nonce)
            self._schedule(("duplicate", key), now + 2 * self.probe_timeout)
            log.warning("%s %r is registered here and at intermediate %s (the fleet's store was "
                        "unavailable); asking whether the older copy there lives", key[0],
                        key[1], home)
            self.counters["fleet_sent"] += 1
            self._events.append(FleetSend(home, there, None, control.Ping(nonce=nonce)))
        if found is not None:
            found.update(dict.fromkeys(later))

    def _duplicate_answered(self, key, local, home, now):
        del self._duplicate_probes[key]
        self._cancel(("duplicate", key))
        link = self._links.get(local)
        if link is None:
            return
        self.counters["duplicates_let_go"] += 1
        text = (f"{key[0]} {key[1]!r} is registered at intermediate {home!r} since before it "
                f"registered here (while the fleet's store was unavailable); this copy is let "
                f"go")
        self._log_refusal("conflict", now, "%s", text)
        self._refuse(link, control.ErrorCode.CONFLICT, CLOSE_CONFLICT, text, now)

    def fleet_home_silent(self, home, now):
        """Intermediate ``home`` of the fleet stopped sending heartbeats: a probe of a node
        it held will not be answered, so the newcomer waiting for it registers now (a node
        re-homing after its intermediate died)."""
        for key, probe in list(self._probes.items()):
            held_at = remote_handle(probe.old)
            if held_at is not None and held_at[0] == home:
                self._cancel(("probe", key))
                self._probe_expired(key, now)
        # A member held there is homing again and may resume its sessions: the members
        # here must not take its silence for death meanwhile.
        for session in self.registry.sessions():
            for handle in session.members():
                held_at = remote_handle(handle)
                other = self._links.get(session.other(handle))
                if held_at is not None and held_at[0] == home and other is not None \
                        and other.resumable:
                    self.counters["sessions_held"] += 1
                    self._send(other.handle, control.SessionHeld(
                        session_id=session.session_id, hold_ms=int(SESSION_HOLD * 1000)))
        # Sessions it never confirmed will not be: the agents are answered now.
        for session_id, pending in list(self._mirroring.items()):
            record = self.registry.session(session_id)
            if pending.home == home and record is not None:
                self._close_session(record, f"intermediate {home!r} of connector "
                                    f"{record.connector_name!r} fell silent")
        for session_id, waiting in list(self._resumes.items()):
            if self.registry.session(session_id) is not None:  # waited for this silence
                del self._resumes[session_id]
                self._cancel(("resume", session_id))
                self._resume(waiting.asker, waiting.message, now)

    def _fleet_probe(self, home, sender, target, message, now):
        """Probing a node across the fleet: another intermediate asks whether a node here is
        alive (Ping), answers for its own (Pong), or took over its identity (Error)."""
        if isinstance(message, control.Ping):
            if target is None or len(self._remote_probes) >= MAX_REMOTE_PROBES:
                self._fleet_ignore("probe", home)
                return
            self._remote_probes[(target.handle, message.nonce)] = home
            self._schedule(("remote_probe", target.handle, message.nonce),
                           now + 2 * self.probe_timeout)
            self._send(target.handle, message)
        elif isinstance(message, control.Pong):
            holder = f"{home}/{sender}"
            for key, probe in list(self._probes.items()):
                if probe.old == holder and probe.nonce == message.nonce:
                    self._probe_answered(key, probe, f"answering at intermediate {home!r}",
                                         now)
                    return
            for key, (local, remote, nonce) in list(self._duplicate_probes.items()):
                if remote == holder and nonce == message.nonce:
                    self._duplicate_answered(key, local, home, now)
                    return
            self._fleet_ignore("unexpected_pong", home)
        elif (target is not None and message.code == control.ErrorCode.CONFLICT
              and self.registry.node_by_identity(target.role, target.name) is not None):
            log.warning("%s was registered at intermediate %s; letting it go", target, home)
            self._drop(target, f"moved to intermediate {home}", now)
            self._events.append(CloseNode(target.handle, CLOSE_SHUTDOWN, message.message))
        else:
            self._fleet_ignore("error", home)

    def _mirror(self, home, target, message, session, now):
        """Intermediate ``home`` opened a session to connector ``target`` held here."""
        relay_peer = self.registry.relay_address(home)
        held = self.registry.session(session.session_id)
        if (held is not None and held.home == home and held.connector == target.handle
                and held.agent == f"{home}/{session.agent}"
                and held.agent_token == session.agent_token
                and held.connector_token == message.relay_token == session.connector_token):
            # Sent again: our confirmation was lost (or is late). Confirm again, nothing more.
            self.counters["fleet_duplicates"] += 1
            self._confirm_mirror(home, target, message, session)
            return
        if (target.role != "connector" or message.connector != target.name
                or relay_peer is None or session.session_id != message.session_id
                or session.connector_token != message.relay_token
                or len(session.agent_token) != control.RELAY_TOKEN_LEN or held is not None):
            self._fleet_ignore("session_opened", home)
            return
        cap = self.limits.sessions_per_connector
        if self.registry.session_count(target.handle) >= cap:
            # The connector's quota holds fleet-wide: the intermediate holding it counts
            # every session it serves, the ones owned elsewhere too, and refuses the extra
            # one back to its owner (which tells the agent).
            text = (f"connector {target.name!r} serves {cap} sessions, the most allowed "
                    f"(--sessions-per-connector)")
            self.counters["sessions_rate_limited"] += 1
            self._log_refusal("rate_limited", now, "refused a session to service %r "
                              "from intermediate %s: %s", session.service, home, text)
            self.counters["fleet_sent"] += 1
            self._events.append(FleetSend(home, session.agent, target.handle,
                                          control.SessionClosed(session_id=session.session_id,
                                                                reason=text)))
            return
        mirror = dataclasses.replace(session, agent=f"{home}/{session.agent}",
                                     connector=target.handle, home=home)
        self.registry.put_session(mirror)
        self.counters["sessions_mirrored"] += 1
        self._events.append(RelayAdd(session.session_id, relay_peer, target.addr,
                                     session.agent_token, session.connector_token))
        self._send(target.handle, message)
        self._confirm_mirror(home, target, message, session)
        # Its relay share counts every session of the connector's, the mirrored ones too.
        self._rebalance([target.handle])
        log.info("session %s: agent %s at intermediate %s -> service %s here",
                 session_tag(session.session_id), session.agent_name, home, session.service)

    def _confirm_mirror(self, home, target, message, session):
        """Tell the owner the session is open here: its SessionOpened back, without the
        record (so it is never taken for a session to mirror)."""
        self.counters["fleet_sent"] += 1
        self._events.append(FleetSend(home, session.agent, target.handle, message))

    def _mirror_confirmed(self, home, sender, message, now):
        """The connector's intermediate confirms a session opened here: the agent is told."""
        pending = self._mirroring.get(message.session_id)
        record = self.registry.session(message.session_id)
        if (pending is None or record is None or pending.home != home
                or record.connector != f"{home}/{sender}"):
            return self._fleet_ignore("session_opened", home)  # e.g. a late second one
        del self._mirroring[message.session_id]
        self._cancel(("mirror", message.session_id))
        self._send(record.agent, pending.to_agent)
        return None

    def _send_mirror(self, record, pending):
        pending.attempts += 1
        home, there = remote_handle(record.connector)
        self.counters["fleet_sent"] += 1
        self._events.append(FleetSend(home, there, record.agent, pending.to_connector,
                                      record))
        # From the open, not from now: a late timer does not put the agent's answer off.
        self._schedule(("mirror", record.session_id), record.created + pending.attempts
                       * (MIRROR_TIMEOUT + 2 * self.registry.fleet_rtt()))

    def _mirror_unconfirmed(self, session_id, now):
        pending = self._mirroring.get(session_id)
        record = self.registry.session(session_id)
        if pending is None or record is None:
            return
        if pending.attempts < MIRROR_ATTEMPTS:
            self.counters["fleet_resent"] += 1
            log.info("session %s: intermediate %s has not confirmed it; sending it again",
                     session_tag(session_id), pending.home)
            self._send_mirror(record, pending)
            return
        self.counters["sessions_across_unconfirmed"] += 1
        waited = now - record.created
        text = (f"connector {record.connector_name!r} at intermediate {pending.home!r} did not "
                f"confirm the session within {waited:.1f} s ({pending.attempts} tries through "
                f"the fleet's store)")
        log.warning("session %s to service %r for agent %s: %s", session_tag(session_id),
                    record.service, record.agent_name, text)
        self._close_session(record, text, code=control.ErrorCode.TIMEOUT)

    # Resuming sessions -------------------------------------------------------------------
    # A node whose intermediate died (or restarted) homes again and asks to carry on each of
    # its sessions here (ResumeSession). If this intermediate holds the session (it owned
    # it, or mirrored it for the member it holds) and the asker's old intermediate is known
    # silent, it takes the session over: the asker becomes a member here and the relay
    # sends its frames straight to it. If the other member is held by another intermediate
    # of the fleet, the resume goes there (it holds the record) and that one takes the
    # session over with the asker as a member here, which then mirrors it. Without a
    # record anywhere, the resume waits for the other member's: both tokens and identities
    # agreeing, the session is rebuilt here. Either way the end-to-end connection goes on
    # over this relay, without a new handshake.

    def _resume(self, asker, message, now):
        """``asker``: the `_Link` that sent ``message``, or the `_Asker` of another
        intermediate that passed it on."""
        session_id = message.session_id
        claimed = message.agent if asker.role == "agent" else message.connector
        if claimed != asker.name:
            return self._refuse_resume(asker, session_id, f"{asker} is not the {asker.role} "
                                       f"of session {session_tag(session_id)}")
        record = self.registry.session(session_id)
        if record is None:
            return self._pair_resume(asker, message, now)
        index = AGENT if asker.role == "agent" else CONNECTOR
        member = record.members()[index]
        token = record.agent_token if index == AGENT else record.connector_token
        if ((record.agent_name, record.connector_name, record.service)
                != (message.agent, message.connector, message.service)
                or not secrets.compare_digest(token, message.relay_token)):
            return self._refuse_resume(asker, session_id, f"session "
                                       f"{session_tag(session_id)} is not {asker}'s")
        if member == asker.handle:  # resumed already (a repeated request)
            return self._resumed(record, asker)
        held_at = remote_handle(member)
        if held_at is None:  # a member here on another connection: a copy, not a move
            return self._refuse_resume(asker, session_id, f"session {session_tag(session_id)}"
                                       f" has its {asker.role} at intermediate {self.home}")
        if self.registry.relay_address(held_at[0]) is not None:
            # Its old intermediate is not known silent yet (it may be a moment behind):
            # wait for that, within RESUME_WAIT.
            return self._wait_resume(asker, message, now)
        if not isinstance(asker, _Link):
            # The other member must be here to own the session (a mirror for one member
            # held elsewhere cannot be handed to a third intermediate).
            other = self._links.get(record.other(member))
            if other is None:
                return self._refuse_resume(asker, session_id, f"session "
                                           f"{session_tag(session_id)} has no member at "
                                           f"intermediate {self.home}")
        self.registry.remove_session(session_id)
        self._remote_rtts.pop(member, None)
        changes = {"agent" if index == AGENT else "connector": asker.handle, "home": self.home}
        record = dataclasses.replace(record, **changes)
        self.registry.put_session(record)
        self._events.append(RelaySetMember(session_id, index, asker.addr))
        log.info("session %s: %s resumed it%s (its intermediate %s is gone)",
                 session_tag(session_id), asker, "" if isinstance(asker, _Link)
                 else f" from intermediate {asker.home}", held_at[0])
        return self._resumed(record, asker)

    def _pair_resume(self, asker, message, now):
        """No record here: pair with the other member's resume if it waits here (from a
        node here, or passed on by its intermediate); else pass this one on to the other
        member's intermediate (it may hold the session, or pair it there) and wait."""
        session_id = message.session_id
        waiting = self._resumes.get(session_id)
        other = None if waiting is None else waiting.asker
        if other is not None and other.role == asker.role:
            return self._refuse_resume(asker, session_id, f"session {session_tag(session_id)}"
                                       f" is being resumed by another {asker.role}")
        if other is None or (not isinstance(asker, _Link) and not isinstance(other, _Link)):
            if isinstance(asker, _Link):
                other_role = "connector" if asker.role == "agent" else "agent"
                peer = self.registry.node_by_identity(
                    other_role, message.connector if other_role == "connector"
                    else message.agent)
                held_at = remote_handle(peer.handle) if peer is not None else None
                if held_at is not None and self.registry.relay_address(held_at[0]) is not None:
                    # The other member is at another intermediate: it holds the session and
                    # takes it over with the asker here (sending the record back to mirror),
                    # or it pairs the two resumes there.
                    self.counters["fleet_sent"] += 1
                    self._events.append(FleetSend(held_at[0], held_at[1], asker.handle,
                                                  message))
            return self._wait_resume(asker, message, now)
        mine, theirs = message, waiting.message
        if (mine.service, mine.agent, mine.connector) != (
                theirs.service, theirs.agent, theirs.connector):
            return self._refuse_resume(asker, session_id, f"session {session_tag(session_id)}"
                                       f" was resumed with other members or service")
        del self._resumes[session_id]
        self._cancel(("resume", session_id))
        agent, connector = (asker, other) if asker.role == "agent" else (other, asker)
        agent_msg, connector_msg = (mine, theirs) if asker.role == "agent" else (theirs, mine)
        service = message.service
        limits, registry = self.limits, self.registry
        why = None
        if not any(rule.allows(agent.name, service) for rule in self.acl):
            why = f"agent {agent.name!r} is not allowed to reach service {service!r}"
        elif not self.may_offer(connector.name, service):
            why = f"connector {connector.name!r} may not offer service {service!r}"
        elif registry.session_count(agent.handle) >= limits.sessions_per_agent:
            why = f"agent {agent.name!r} has {limits.sessions_per_agent} open sessions"
        elif registry.session_count(connector.handle) >= limits.sessions_per_connector:
            why = f"connector {connector.name!r} serves {limits.sessions_per_connector} sessions"
        if why is not None:
            self._refuse_resume(other, session_id, why)
            return self._refuse_resume(asker, session_id, why)
        record = SessionRecord(session_id=session_id, service=service, agent=agent.handle,
                               connector=connector.handle, agent_name=agent.name,
                               connector_name=connector.name, home=self.home, created=now,
                               agent_token=agent_msg.relay_token,
                               connector_token=connector_msg.relay_token)
        registry.put_session(record)
        self._events.append(RelayAdd(session_id, agent.addr, connector.addr,
                                     agent_msg.relay_token, connector_msg.relay_token))
        log.info("session %s: agent %s and connector %s resumed it here",
                 session_tag(session_id), agent.name, connector.name)
        return self._resumed(record, asker, other)

    def _wait_resume(self, asker, message, now):
        session_id = message.session_id
        if (len(self._resumes) >= MAX_PENDING_RESUMES
                or sum(r.asker.handle == asker.handle for r in self._resumes.values())
                >= max(self.limits.sessions_per_agent, self.limits.sessions_per_connector)):
            return self._refuse_resume(asker, session_id, "too many sessions waiting to resume")
        self._resumes[session_id] = _Resume(asker, message, now + RESUME_WAIT)
        self._schedule(("resume", session_id), now + RESUME_WAIT)
        return None

    def _resume_expired(self, session_id, now):
        waiting = self._resumes.pop(session_id, None)
        if waiting is not None and isinstance(waiting.asker, _Link):
            # (Another intermediate's asker is told by its own, whose wait ends too.)
            self.counters["resumes_expired"] += 1
            self._refuse_resume(waiting.asker, session_id, f"the other member of session "
                                f"{session_tag(session_id)} did not resume it here within "
                                f"{RESUME_WAIT:g} s", count=False)

    def _refuse_resume(self, asker, session_id, text, count=True):
        if count:
            self.counters["resumes_refused"] += 1
        log.info("could not resume session %s for %s: %s", session_tag(session_id), asker, text)
        error = control.Error(code=control.ErrorCode.UNKNOWN_SESSION,
                              message=f"cannot resume the session: {text}"[:control.MAX_TEXT_LEN],
                              session_id=session_id)
        if isinstance(asker, _Link):
            self._send(asker.handle, error)
        else:
            self.counters["fleet_sent"] += 1
            self._events.append(FleetSend(asker.home, asker.sender, None, error))

    def _resumed(self, record, *askers):
        self.counters["sessions_resumed"] += 1
        resumed = control.SessionResumed(session_id=record.session_id)
        for handle in record.members():
            link = self._links.get(handle)
            if link is not None and link.resumable:
                self._send(handle, resumed)
        for asker in askers:
            if not isinstance(asker, _Link):  # its intermediate mirrors the session
                self.counters["fleet_sent"] += 1
                self._events.append(FleetSend(asker.home, asker.sender,
                                              record.other(asker.handle), resumed,
                                              session=record))
        self._rebalance([h for h in record.members() if h in self._links])

    def _mirror_resumed(self, home, target, message, session):
        """Intermediate ``home`` took over a session that member ``target`` here asked to
        resume (passed on by `_pair_resume`): mirror it, as for a session opened there."""
        session_id = message.session_id
        waiting = self._resumes.get(session_id)
        relay_peer = self.registry.relay_address(home)
        index = AGENT if target.role == "agent" else CONNECTOR
        if (waiting is None or waiting.asker is not target or session is None
                or relay_peer is None or session.session_id != session_id
                or session.home != home
                or session.members()[index] != f"{self.home}/{target.handle}"
                or (session.agent_name, session.connector_name, session.service)
                != (waiting.message.agent, waiting.message.connector, waiting.message.service)
                or self.registry.session(session_id) is not None):
            return self._fleet_ignore("session_resumed", home)
        del self._resumes[session_id]
        self._cancel(("resume", session_id))
        other = session.members()[1 - index]
        members = {"agent": target.handle, "connector": f"{home}/{other}"} if index == AGENT \
            else {"agent": f"{home}/{other}", "connector": target.handle}
        mirror = dataclasses.replace(session, **members)
        self.registry.put_session(mirror)
        addrs = (target.addr, relay_peer) if index == AGENT else (relay_peer, target.addr)
        self._events.append(RelayAdd(session_id, *addrs, session.agent_token,
                                     session.connector_token))
        self.counters["sessions_resumed"] += 1
        self.counters["sessions_mirrored"] += 1
        if target.resumable:
            self._send(target.handle, message)
        log.info("session %s: %s resumed it here, held by intermediate %s",
                 session_tag(session_id), target, home)
        return None

    def _local_link(self, text):
        """The registered link here whose handle is ``text`` (handles travel as text)."""
        if text is None:
            return None
        for handle in (text, int(text)) if str(text).isdigit() else (text,):
            link = self._links.get(handle)
            if link is not None and link.registered:
                return link
        return None

    def _fleet_ignore(self, kind, home):
        self.counters["fleet_ignored"] += 1
        log.debug("ignored a fleet message from %s: %s", home, kind)
        return None

    def _own_session(self, link, message):
        """The session ``message`` is about, if ``link`` is one of its members."""
        session = self.registry.session(message.session_id)
        if session is None:
            self._ignore("unknown_session", link, message)
            return None
        if link.handle not in session.members():
            self._ignore("foreign_session", link, message)
            return None
        return session

    # Registration ----------------------------------------------------------------------
    def _check_register(self, link, message, now):
        if message.role != link.role or message.name != link.name:
            self.counters["refused_registration"] += 1
            text = (f"certificate is for {link.role} {link.name!r} but registration "
                    f"claims {message.role} {message.name!r}")
            self._log_refusal("unauthenticated", now, "refused %s from %s: %s", link,
                              _fmt(link.addr), text)
            self._refuse(link, control.ErrorCode.UNAUTHENTICATED, CLOSE_UNAUTHENTICATED, text,
                         now)
            return
        text = self._offer_refusal(link, message.services, now)
        if text is not None:
            self._refuse(link, control.ErrorCode.DENIED, CLOSE_DENIED, text, now)
            return
        key = (link.role, link.name)
        holder = self.registry.node_by_identity(*key)
        if holder is None:
            self._register(link, message, now)
            return
        if holder.home != self.home:
            # Held at another intermediate of the fleet. A silent intermediate (dead, or cut
            # off) cannot vouch for its node: the newcomer takes the name, as a node re-homing
            # after its intermediate died must. A live one probes its node for us.
            if self.registry.relay_address(holder.home) is None:
                self._register(link, message, now)
                return
            if key in self._probes:
                self._refuse_conflict(link, holder, "answering", now)
                return
            self._probe(link, holder.handle, key, message, now)
            return
        if key in self._probes:  # a third copy while the second waits: refuse it at once
            self._refuse_conflict(link, holder, "answering", now)
            return
        old = self._links.get(holder.handle)
        if old is None:
            # Registered by a connection this intermediate does not hold (a record left
            # behind): nothing to probe here; the newcomer takes the name.
            self.registry.remove_node(holder.handle)
            self._register(link, message, now)
            return
        self._probe(link, old.handle, key, message, now)
        log.info("%s registers again from %s; probing the connection from %s", link,
                 _fmt(link.addr), _fmt(old.addr))

    def _probe(self, link, old, key, message, now):
        """Ask the node holding ``key`` (handle ``old``, here or at another intermediate)
        whether it is alive; the newcomer ``link`` waits for the answer or the timeout."""
        nonce = secrets.randbits(53)
        probe = _Probe(old, link.handle, message, nonce, now + self.probe_timeout)
        self._probes[key] = probe
        link.probing = key
        self.counters["probes_sent"] += 1
        self._send(old, control.Ping(nonce=nonce))
        self._schedule(("probe", key), probe.deadline)

    def _pong(self, link, message, now):
        key = (link.role, link.name)
        asker = self._remote_probes.pop((link.handle, message.nonce), None)
        if asker is not None:  # another intermediate's probe of this node: it is alive
            self.counters["fleet_sent"] += 1
            self._events.append(FleetSend(asker, None, link.handle, message))
            return
        probe = self._probes.get(key)
        if probe is None or probe.old != link.handle or probe.nonce != message.nonce:
            self._ignore("unexpected_pong", link, message)
            return
        self._probe_answered(key, probe, "answering", now)

    def _probe_answered(self, key, probe, state, now):
        """The node holding ``key`` answered its probe: it keeps the name, the newcomer is
        refused."""
        del self._probes[key]
        self._cancel(("probe", key))
        self.counters["probes_answered"] += 1
        newcomer = self._links.get(probe.newcomer)
        if newcomer is not None:
            newcomer.probing = None
            self._refuse_conflict(newcomer, self.registry.node(probe.old), state, now)

    def _refuse_conflict(self, link, holder, state, now):
        self.counters["refused_conflict"] += 1
        addr = _fmt(holder.addr) if holder is not None else "elsewhere"
        text = (f"{link.role} {link.name!r} is already connected from {addr} and {state}; "
                f"stop the other copy or use another certificate")
        self._log_refusal("conflict", now, "refused a second %s from %s: %s", link,
                          _fmt(link.addr), text)
        self._refuse(link, control.ErrorCode.CONFLICT, CLOSE_CONFLICT, text, now)

    def _probe_expired(self, key, now):
        probe = self._probes.pop(key, None)
        if probe is None:
            return
        self.counters["nodes_replaced"] += 1
        old = self._links.get(probe.old)
        newcomer = self._links.get(probe.newcomer)
        if newcomer is not None:
            newcomer.probing = None
        if old is not None:
            log.warning("%s at %s did not answer a probe within %.1f s; replacing it", old,
                        _fmt(old.addr), self.probe_timeout)
            self._drop(old, "was replaced: it did not answer", now)
            self._events.append(CloseNode(old.handle, CLOSE_SHUTDOWN,
                                          "replaced: did not answer"))
        elif remote_handle(probe.old) is not None:  # its intermediate lets it go
            home, there = remote_handle(probe.old)
            log.warning("%s %r at intermediate %s did not answer a probe within %.1f s; "
                        "replacing it", key[0], key[1], home, self.probe_timeout)
            self.counters["fleet_sent"] += 1
            self._events.append(FleetSend(home, there, None, control.Error(
                code=control.ErrorCode.CONFLICT,
                message=f"replaced: registered at intermediate {self.home}")))
        if newcomer is not None and newcomer.handle in self._links:
            self._register(newcomer, probe.register, now)

    def _offer_refusal(self, link, services, now):
        """None if the policy lets the connector offer all of ``services``; else why not
        (counted and logged)."""
        denied = [service for service in services if not self.may_offer(link.name, service)]
        if not denied:
            return None
        self.counters["refused_offer"] += 1
        more = f" (and {len(denied) - 1} more)" if len(denied) > 1 else ""
        text = (f"connector {link.name!r} is not allowed to offer service "
                f"{denied[0]!r}{more}: no --offer rule matches")
        self._log_refusal("offer", now, "refused %s from %s: %s", link, _fmt(link.addr), text)
        return text

    def _update_services(self, link, message, now):
        """A registered connector's new list of services; refused as a whole (and the old
        list kept) if the policy denies one of them."""
        text = self._offer_refusal(link, message.services, now)
        if text is not None:
            self._error(link.handle, control.ErrorCode.DENIED, text)
            return
        record = self.registry.node(link.handle)
        if record is None:
            return
        self.registry.put_node(dataclasses.replace(record, services=tuple(message.services)))
        for service in message.services:
            self._departed.pop(service, None)
        self.counters["services_updated"] += 1
        log.info("%s now offers %s", link, ", ".join(message.services) or "no services")

    def may_offer(self, connector, service):
        """Whether the policy lets ``connector`` (a name) offer ``service``."""
        return self.offers is None or any(rule.allows(connector, service)
                                          for rule in self.offers)

    def _register(self, link, message, now):
        link.registered = True
        record = NodeRecord(handle=link.handle, role=link.role, name=link.name, addr=link.addr,
                            services=tuple(message.services), home=self.home, since=now,
                            wall=self._wall_clock())
        self.registry.put_node(record)
        for service in record.services:
            self._departed.pop(service, None)
        self.counters["nodes_registered"] += 1
        self._send(link.handle, control.Registered(node_id=link.name, observed_addr=link.addr))
        log.info("%s registered from %s%s", link, _fmt(link.addr),
                 f" with services {', '.join(record.services)}" if record.services else "")

    def _nat_summary(self, link, message):
        """The node's NAT as it sees it: kept in its record (one per node, replaced by the
        next), read when a session of it punches."""
        record = self.registry.node(link.handle)
        if record is None:
            return
        nat = message._to_json_object()
        self.counters["nat_summaries"] += 1
        if record.nat != nat:
            self.registry.put_node(dataclasses.replace(record, nat=nat))
            log.info("%s: NAT mapping %s%s, filtering %s%s%s", link,
                     nat["mapping"] or "unknown",
                     f" ({nat['allocation']}{', step %d' % nat['step'] if nat['step'] else ''})"
                     if nat["allocation"] else "", nat["filtering"] or "unknown",
                     ", a mapped port" if nat["mapped_port"] else "",
                     ", IPv6" if nat["ipv6"] else "")

    def _nat_of(self, handle):
        record = self.registry.node(handle)
        return None if record is None else record.nat

    # Sessions --------------------------------------------------------------------------
    def _open_session(self, link, message, now):
        service = message.service
        handle = link.handle
        if not any(rule.allows(link.name, service) for rule in self.acl):
            self.counters["sessions_denied"] += 1
            self._log_session_refusal("denied", link, service, "no --allow rule matches", now)
            self._error(handle, control.ErrorCode.DENIED,
                        f"agent {link.name!r} is not allowed to reach service {service!r}",
                        message.request_id)
            return
        connectors = self.registry.connectors_for(service)
        if not connectors:
            departed = self._departed.get(service)
            if departed is not None:
                self.counters["sessions_connector_offline"] += 1
                self._log_session_refusal("connector_offline", link, service, departed, now)
                self._error(handle, control.ErrorCode.CONNECTOR_OFFLINE, departed,
                            message.request_id)
            else:
                self.counters["sessions_unknown_service"] += 1
                self._log_session_refusal("unknown_service", link, service,
                                          "no connector offers it", now)
                self._error(handle, control.ErrorCode.UNKNOWN_SERVICE,
                            f"no connector offers service {service!r}", message.request_id)
            return
        limits = self.limits
        registry = self.registry
        request_id = message.request_id
        if registry.session_count(handle) >= limits.sessions_per_agent:
            self._rate_limited(link, service, now,
                               f"agent {link.name!r} has {limits.sessions_per_agent} "
                               f"open sessions, the most allowed (--sessions-per-agent)",
                               request_id)
            return
        # Replicas (several connectors allowed to offer the service): those held here
        # first, then those at another intermediate of the fleet that can be reached now
        # (the session is signaled and relayed through it); among them the one serving the
        # fewest sessions (spread), the longest registered on a tie, below its session cap.
        allowed = [c for c in connectors if self.may_offer(c.name, service)]
        elsewhere = [c for c in allowed if c.home != self.home]
        allowed = [c for c in allowed if c.home == self.home]
        allowed += [c for c in elsewhere if registry.relay_address(c.home) is not None]
        loads = {c.handle: registry.session_count(c.handle) for c in allowed}
        open_to = [c for c in allowed if loads[c.handle] < limits.sessions_per_connector]
        connector = min(open_to, key=lambda c: (c.home != self.home, loads[c.handle]),
                        default=None)
        if connector is None:
            if not allowed and elsewhere:
                other = elsewhere[0]
                text = (f"service {service!r} is offered by connector {other.name!r} at "
                        f"intermediate {other.home!r}, which cannot be reached now (the "
                        f"fleet's registry is unavailable)")
                self.counters["sessions_connector_elsewhere"] += 1
                self._log_session_refusal("connector_offline", link, service, text, now)
                self._error(handle, control.ErrorCode.CONNECTOR_OFFLINE, text, request_id)
                return
            if not allowed:
                self.counters["sessions_unknown_service"] += 1
                self._log_session_refusal("unknown_service", link, service,
                                          "no connector allowed to offer it is registered",
                                          now)
                self._error(handle, control.ErrorCode.UNKNOWN_SERVICE,
                            f"no connector offers service {service!r}", request_id)
                return
            self._rate_limited(link, service, now,
                               f"every connector of service {service!r} serves "
                               f"{limits.sessions_per_connector} sessions, the most allowed "
                               f"(--sessions-per-connector)", request_id)
            return
        bucket = self._open_buckets.get(link.name)
        if bucket is None:
            bucket = _Bucket(limits.sessions_per_minute / 60.0, limits.sessions_per_minute, now)
            self._open_buckets[link.name] = bucket
            while len(self._open_buckets) > MAX_BUCKETS:
                self._open_buckets.popitem(last=False)
        else:
            self._open_buckets.move_to_end(link.name)
        if not bucket.take(now):
            self._rate_limited(link, service, now, f"agent {link.name!r} opened "
                               f"{limits.sessions_per_minute} sessions within a minute, the "
                               f"most allowed (--sessions-per-minute); try again in "
                               f"{bucket.wait():.1f} s", request_id)
            return
        agent_token = self._token_source(control.RELAY_TOKEN_LEN)
        connector_token = self._token_source(control.RELAY_TOKEN_LEN)
        session = SessionRecord(session_id=new_session_id(), service=service, agent=handle,
                                connector=connector.handle, agent_name=link.name,
                                connector_name=connector.name, home=self.home, created=now,
                                agent_token=agent_token, connector_token=connector_token)
        self.registry.put_session(session)
        self.counters["sessions_opened"] += 1
        # A connector at another intermediate: the relay here forwards its frames to that
        # intermediate, which relays them on to the connector (and back).
        across = connector.home != self.home
        if across:
            self.counters["sessions_across"] += 1
        relay_peer = registry.relay_address(connector.home) if across else connector.addr
        self._events.append(RelayAdd(session.session_id, link.addr, relay_peer,
                                     agent_token, connector_token))
        to_connector, to_agent = (control.SessionOpened(
            request_id=message.request_id, session_id=session.session_id, service=service,
            agent=link.name, connector=connector.name, peer_addr=peer, relay_token=token)
            for peer, token in ((link.addr, connector_token), (connector.addr, agent_token)))
        if across:  # the agent hears of it once the connector's intermediate confirms it
            pending = _Mirroring(connector.home, request_id, to_agent, to_connector)
            self._mirroring[session.session_id] = pending
            self._send_mirror(session, pending)
        else:
            self._send(connector.handle, to_connector)
            self._send(handle, to_agent)
        log.info("session %s: agent %s -> service %s at connector %s",
                 session_tag(session.session_id), link.name, service, connector.name)
        self._rebalance(session.members())

    def _rate_limited(self, link, service, now, text, request_id):
        self.counters["sessions_rate_limited"] += 1
        self._log_session_refusal("rate_limited", link, service, text, now)
        self._error(link.handle, control.ErrorCode.RATE_LIMITED, text, request_id)

    def _log_session_refusal(self, kind, link, service, why, now):
        self._log_refusal(kind, now, "refused %s at %s a session to service %r: %s", link,
                          _fmt(link.addr), service, why)

    def _rebalance(self, handles):
        """Relay shares (Limits.relay_rate_per_identity) of the sessions of ``handles``,
        after their session counts changed: each session may use the cap divided by the
        busier member's session count rounded up to a power of two. Only changed shares are
        sent, so this is rarely more than the new session's."""
        cap = self.limits.relay_rate_per_identity
        if not cap:
            return
        registry = self.registry
        levels = {}

        def level(handle):
            if handle not in levels:
                levels[handle] = _share_level(registry.session_count(handle))
            return levels[handle]

        for handle in handles:
            for session in registry.sessions_of(handle):
                share = max(1, cap // max(level(session.agent), level(session.connector)))
                if self._shares.get(session.session_id) != share:
                    self._shares[session.session_id] = share
                    self.counters["relay_shares_set"] += 1
                    self._events.append(RelaySetRate(session.session_id, share,
                                                     max(share // 4, MIN_RELAY_BURST)))

    def _close_session(self, session, reason, notify_except=None, rebalance=True,
                       code=control.ErrorCode.CONNECTOR_OFFLINE):
        """``code``: the Error answering the agent's OpenSession if the session was not
        confirmed yet (the agent does not know it)."""
        if self.registry.remove_session(session.session_id) is None:
            return
        pending = self._mirroring.pop(session.session_id, None)
        if pending is not None:
            self._cancel(("mirror", session.session_id))
        for handle in session.members():
            if handle in self._remote_rtts and not self.registry.sessions_of(handle):
                del self._remote_rtts[handle]
        self.counters["sessions_closed"] += 1
        self._shares.pop(session.session_id, None)
        self._events.append(RelayRemove(session.session_id))
        for handle in session.members():
            self._punches.pop(("punch", session.session_id, handle), None)
            self._cancel(("punch", session.session_id, handle))
            if handle == notify_except or not self._reachable(handle):
                continue
            if pending is not None and handle == session.agent:
                self._error(handle, code, f"no session to service {session.service!r}: "
                            f"{reason}", pending.request_id)
            else:
                self._send(handle, control.SessionClosed(session_id=session.session_id,
                                                         reason=reason[:control.MAX_TEXT_LEN]),
                           sender=session.other(handle))
        log.info("session %s closed: %s", session_tag(session.session_id), reason)
        if rebalance:
            self._rebalance([h for h in session.members() if h in self._links])

    # Signaling -------------------------------------------------------------------------
    def _offer(self, link, message):
        session = self._own_session(link, message)
        if session is None:
            return
        if link.handle != session.agent:
            self._ignore("wrong_direction", link, message)
            return
        self.registry.put_session(dataclasses.replace(session, offers=session.offers + 1))
        self.counters["offers_forwarded"] += 1
        self._send(session.connector, message, sender=link.handle)

    def _answer(self, link, message, now):
        session = self._own_session(link, message)
        if session is None:
            return
        if link.handle != session.connector:
            self._ignore("wrong_direction", link, message)
            return
        if session.answers >= session.offers:
            self._ignore("duplicate_answer", link, message)
            return
        session = dataclasses.replace(session, answers=session.answers + 1)
        self.registry.put_session(session)
        self.counters["answers_forwarded"] += 1
        self._send(session.agent, message, sender=link.handle)
        self.start_punching(session.session_id, now)

    def start_punching(self, session_id, now):
        """Send StartPunching so that both members start at the same moment (DCUtR's idea).

        The message to the member with the shorter control RTT leaves later, by half the
        difference of the two RTTs (the difference of the one-way delays), so both arrive
        together; each member starts its checks on arrival (delay_ms = 0).
        """
        session = self.registry.session(session_id)
        if session is None:
            return
        strategy, hard_side = choose_strategy(self._nat_of(session.agent),
                                              self._nat_of(session.connector))
        session = dataclasses.replace(session, punch_round=session.punch_round + 1,
                                      punch_started=now, reported=(), strategy=strategy,
                                      hard_side=hard_side or "")
        self.registry.put_session(session)
        self.punching["attempts"] += 1
        self.strategies[strategy] += 1
        log.info("session %s: punching strategy %s%s", session_tag(session_id), strategy,
                 f" ({hard_side} is the hard side)" if hard_side else "")
        rtts = {}
        for handle in session.members():
            link = self._links.get(handle)
            rtts[handle] = ((link.rtt or 0.0) if link is not None
                            else self._remote_rtts.get(handle, self.registry.fleet_rtt()))
        far = max(rtts.values())
        message = control.StartPunching(session_id=session_id, delay_ms=0, strategy=strategy,
                                        hard_side=hard_side)
        for handle, rtt in rtts.items():
            key = ("punch", session_id, handle)
            wait = (far - rtt) / 2 if self.punch_sync else 0.0
            if wait > PUNCH_SKEW_MIN:
                self._punches[key] = message
                self._schedule(key, now + wait)
            else:
                self._punches.pop(key, None)
                self._cancel(key)
                self.counters["start_punching_sent"] += 1
                self._send(handle, message, sender=session.other(handle))

    def _deliver_punch(self, key):
        message = self._punches.pop(key, None)
        _kind, session_id, handle = key
        if message is None or self.registry.session(session_id) is None:
            return
        if self._reachable(handle):
            self.counters["start_punching_sent"] += 1
            self._send(handle, message)

    def _punching_result(self, link, message):
        session = self._own_session(link, message)
        if session is None:
            return
        if session.punch_round == 0:
            self._ignore("unexpected_result", link, message)
            return
        if link.role in session.reported:
            self._ignore("duplicate_result", link, message)
            return
        changes = {"reported": (*session.reported, link.role)}
        if link.handle == session.agent:  # the controlling side's word decides the path
            changes["path"] = message.path
            self.punching[message.path] += 1
            if message.path == "direct":
                self.time_to_direct_ms.append(message.elapsed_ms)
        self.registry.put_session(dataclasses.replace(session, **changes))
        log.info("session %s: %s reports %s%s", session_tag(session.session_id), link,
                 message.path,
                 f" to {_fmt(message.remote_addr)} after {message.elapsed_ms:.0f} ms"
                 if message.path == "direct" else "")

    # Introspection ---------------------------------------------------------------------
    def is_connected(self, handle):
        return handle in self._links

    def last_heard(self, handle):
        link = self._links.get(handle)
        return None if link is None else link.last_rx
