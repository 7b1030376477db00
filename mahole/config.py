"""Settings of each role, with their defaults; the command line is built from these."""

import dataclasses
import json
import math
import os
import re
import tomllib

from .signaling import Limits  # the quota defaults live with the quotas
from .wire.control import NAME_RE as NAME  # a node or service name (one grammar everywhere)

DEFAULT_PORT = 4478
# Congestion controllers of end-to-end sessions: the ones aioquic implements (RFC 9002 §7
# NewReno; RFC 9438 CUBIC). NodeConfig.congestion_control says which is the default and why.
CONGESTION_CONTROLS = ("reno", "cubic")

TARGET = re.compile(r"(tcp|udp):(\[[^\]]+\]|[^:\[\]]+):(\d{1,5})")  # proto:host:port


def _target(text, min_port):
    """(proto, host, port) of `tcp:HOST:PORT` / `udp:HOST:PORT`, or None."""
    match = TARGET.fullmatch(text)
    if not match or not min_port <= int(match.group(3)) < 65536:
        return None
    return match.group(1), match.group(2).strip("[]"), int(match.group(3))


def parse_target(text):
    """`tcp:HOST:PORT` or `udp:HOST:PORT` -> (proto, host, port)."""
    target = _target(text, 1)
    if target is None:
        raise ValueError(f"expected tcp:HOST:PORT or udp:HOST:PORT, got {text!r}")
    return target


@dataclasses.dataclass(frozen=True)
class Service:
    """A connector's named service: `NAME=tcp:HOST:PORT` (only these targets are reachable)."""

    name: str
    proto: str
    host: str
    port: int

    @classmethod
    def parse(cls, text):
        name, sep, target = text.partition("=")
        if not sep or not NAME.fullmatch(name):
            raise ValueError(f"expected NAME=tcp:HOST:PORT, got {text!r}")
        return cls(name, *parse_target(target))

    def text(self):
        """The inverse of :meth:`parse`."""
        return f"{self.name}={self.proto}:{_host(self.host)}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Forward:
    """An agent's local forward: `tcp:LHOST:LPORT=SERVICE` (LPORT 0 picks a free port)."""

    proto: str
    host: str
    port: int
    service: str

    @classmethod
    def parse(cls, text):
        local, sep, service = text.rpartition("=")
        target = _target(local, 0) if sep and NAME.fullmatch(service) else None
        if target is None:
            raise ValueError(f"expected tcp:LHOST:LPORT=SERVICE, got {text!r}")
        return cls(*target, service)

    def text(self):
        """The inverse of :meth:`parse`."""
        return f"{self.proto}:{_host(self.host)}:{self.port}={self.service}"


def _host(host):
    return f"[{host}]" if ":" in host else host


class ConfigFileError(ValueError):
    """A config file that cannot be read or holds a bad key or value (a message for people)."""


MAX_RELAY_THREADS = 256


def parse_relay_threads(text):
    """`--relay-threads`: a whole number 1-256, or "auto" (kept as "auto": see
    relay_threads_count)."""
    text = str(text).strip().lower()
    if text == "auto":
        return "auto"
    try:
        value = int(text, 10)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_RELAY_THREADS:
        raise ValueError(f"expected a number of relay threads 1-{MAX_RELAY_THREADS} or auto, "
                         f"got {text!r}")
    return value


def relay_threads_count(value, cpus=None):
    """How many relay sockets and threads `relay_threads` means: "auto" is the CPUs this
    process may run on (its affinity, which a container's cpuset limits), at most 256."""
    if value != "auto":
        return parse_relay_threads(value)
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
    return max(1, min(MAX_RELAY_THREADS, cpus))


def read_config_file(path):
    """The top-level table of the TOML file at `path` (read with tomllib)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigFileError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigFileError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{path}: not valid TOML: {exc}") from None


def toml_value(value):
    """One setting as TOML, in the form its flag takes (HOST:PORT, NAME=tcp:HOST:PORT, ...)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, (Service, Forward)):
        return json.dumps(value.text())
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        return json.dumps(f"{_host(value[0])}:{value[1]}")  # an address
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # JSON escapes are TOML escapes


@dataclasses.dataclass
class Credentials:
    ca: str = "certs/ca.crt"
    cert: str = ""
    key: str = ""


@dataclasses.dataclass
class IntermediateConfig(Credentials):
    listen: tuple = ("0.0.0.0", DEFAULT_PORT)
    allow: tuple = ()  # AGENT_GLOB=SERVICE_GLOB rules; none means every session is denied
    status: tuple | None = None
    control_socket: str | None = None  # None: the default path (mahole.local_control); "": none
    keylog: str | None = None  # append TLS secrets here (SSLKEYLOGFILE format; debugging)
    qlog_dir: str | None = None  # one aioquic qlog file per QUIC connection here (debugging)
    idle_timeout: float = 30.0  # control connections (QUIC idle timeout, RFC 9000 §10.1)
    # A node with no authenticated packet this long is gone: its sessions end (the other
    # member is told) and its connection is closed. Nodes send a keepalive every
    # keepalive_interval, so this notices a kill -9 within about 2 s. Sessions have no idle
    # expiry here: they end when a member closes them, leaves or is declared gone.
    node_dead_after: float = 2.0
    # A second registration of a registered (role, name) probes the first with a Ping; an
    # answer within this keeps the first and refuses the newcomer, silence replaces it.
    probe_timeout: float = 1.0
    # StartPunching timed so both members get it at the same moment (the nearer one's held
    # back by half the RTT difference); off sends both at once (for measuring what it buys).
    punch_sync: bool = True
    relay_rate_limit: int = 0  # bytes/s per session, 0 = unlimited
    relay_burst: int = 0
    # Sockets (and threads) of the relay: 1 is one socket read by the event loop; N > 1 adds
    # N - 1 sockets bound to the same address with SO_REUSEPORT, each read by a relay thread
    # of the compiled engine; "auto" is the number of CPUs this process may run on.
    relay_threads: int | str = 1
    # Which connectors may offer which services: CONNECTOR_GLOB=SERVICE_GLOB rules. None
    # given: any connector of the deployment CA may offer any service (warned at start).
    offer: tuple = ()
    # A fleet: intermediates sharing their directory of nodes through this Redis
    # (redis://HOST:PORT/DB, rediss:// with TLS, unix:///PATH). "": alone, in memory.
    registry: str = ""
    # Where the other intermediates of the fleet send relay frames for this one (host, port);
    # None: the --listen address, which must then be a specific one.
    fleet_address: tuple | None = None
    # Quotas per identity (mahole.signaling.Limits, same names and defaults), answered with
    # RATE_LIMITED: control connections of one identity; sessions an agent opens per minute
    # (that many at once, then one every 60/N s); open sessions per agent and per connector;
    # control messages per connection (token bucket; more than a burst ignored within 10 s
    # closes the node); relay bytes/s of one identity's sessions together (0 = no cap).
    connections_per_identity: int = Limits.connections_per_identity
    sessions_per_minute: int = Limits.sessions_per_minute
    sessions_per_agent: int = Limits.sessions_per_agent
    sessions_per_connector: int = Limits.sessions_per_connector
    signaling_rate: float = Limits.signaling_rate
    signaling_burst: int = Limits.signaling_burst
    relay_rate_per_identity: int = Limits.relay_rate_per_identity
    # The edge. Connections that have not registered yet ("half-open": handshake
    # under way, or done and no Register yet) each hold TLS state (~50 KB) and cost ~2 ms of
    # CPU: at most max_half_open at once (further Initials are dropped); above
    # retry_threshold a new client first gets a Retry and must echo its token from the
    # address it claims (RFC 9000 §8.1.2; 0 = always); one not registered handshake_timeout
    # after its first Initial is dropped.
    max_half_open: int = 256
    max_half_open_per_source: int = 16  # of those, from one source host (Retry passed or not)
    retry_threshold: int = 64
    handshake_timeout: float = 5.0
    # Answers to unauthenticated datagrams, per source host (token buckets, bursts of twice
    # the rate) and in total: STUN Binding responses (RFC 8489) and QUIC Version Negotiation
    # (RFC 9000 §6). rate_limit_sources bounds the per-source table (least recent forgotten).
    stun_rate: float = 10.0
    stun_total_rate: float = 5000.0
    # RFC 5780 NAT behaviour discovery (mahole.stun_server): a second UDP port answering STUN
    # only (0: none), and a second IP of this host answering at that port (None: none).
    stun_alt_port: int = 0
    stun_alt_ip: str | None = None
    vn_rate: float = 1.0
    vn_total_rate: float = 1000.0
    rate_limit_sources: int = 4096


# Default of NodeConfig.send_budget, and its least: one read of a stream (mahole.tunnel.READ_SIZE).
SEND_BUDGET = 64 << 20
MIN_SEND_BUDGET = 64 * 1024


@dataclasses.dataclass
class NodeConfig(Credentials):
    intermediate: tuple = ("127.0.0.1", DEFAULT_PORT)
    intermediate_name: str | None = None  # TLS name of the intermediate; default its host
    # More intermediates of the fleet (host, port): the node homes on the nearest of all
    # (mahole.homing) and moves to the next when its home is lost.
    fallbacks: tuple = ()
    bind: tuple = ("::", 0)  # dual-stack: IPv4 and IPv6 on one socket
    status: tuple | None = None
    control_socket: str | None = None  # None: the default path (mahole.local_control); "": none
    keylog: str | None = None  # append TLS secrets here (SSLKEYLOGFILE format; debugging)
    qlog_dir: str | None = None  # one aioquic qlog file per QUIC connection here (debugging)
    connect_timeout: float = 3.0  # per attempt to reach and register with the intermediate
    # Backoff between attempts doubles up to reconnect_max (with jitter); kept short so a
    # node is back within a few seconds of the intermediate returning.
    reconnect_min: float = 0.25
    reconnect_max: float = 2.0
    control_idle_timeout: float = 15.0
    # QUIC PING on the control connection. Frequent enough that the intermediate can tell a
    # crashed node from a quiet one within its node_dead_after (2 s: four missed PINGs).
    keepalive_interval: float = 0.5
    # Nothing heard this long (four missed PINGs): the intermediate is lost; reconnect, or home
    # on the next one of a fleet (re-homed within 3 s: this, a ranking, a handshake).
    control_dead_after: float = 2.0
    e2e_idle_timeout: float = 30.0
    relay_only: bool = False  # never punch: every session stays on the relay
    direct_only: bool = False  # no relay: a session fails if hole punching fails
    punch_deadline: float = 5.0  # from StartPunching to giving up on a direct path
    include_loopback: bool = False  # offer loopback host candidates (local testing)
    # Ask the router for a public UDP port (PCP, then NAT-PMP: mahole.portmapping) and offer
    # it as a candidate; only from a wildcard socket, with a default gateway and an
    # intermediate not on loopback. port_mapping_gateway (HOST, PORT) names the gateway
    # instead of the default route's (tests: a fake one on loopback).
    port_mapping: bool = True
    port_mapping_gateway: tuple | None = None
    # Birthday probing (strategy "birthday", mahole.ice.birthday): extra sockets this node
    # opens as the hard side (K), probes it sends as the easy side (M); 0 turns a side off.
    birthday_sockets: int = 256
    birthday_probes: int = 1024
    # Direct-route liveness (docs/architecture.md, "The session core"): a route with
    # ack-eliciting packets in flight and nothing heard for failover_timeout (or 3 RTTs if
    # longer, or four times the longest recent silence of a route that fades; at most twice
    # failover_timeout) is dead: back to the relay at once. Idle direct routes are probed with a QUIC
    # PING every direct_keepalive, which also keeps the NAT mappings open.
    failover_timeout: float = 0.5
    direct_keepalive: float = 1.0
    # Measure this network's binding lifetime after registering (mahole.binding_lifetime: a
    # few sockets, STUN answers held up to 75 s by the intermediate; not with an intermediate
    # on loopback nor relay_only) and PING idle direct routes every third of it instead,
    # between direct_keepalive and 25 s (and half of e2e_idle_timeout).
    adaptive_keepalive: bool = True
    # After a failover the agent punches again after a cool-down that doubles with every
    # failover in a minute (bounded switches per minute), up to repunch_cooldown_max.
    repunch_cooldown: float = 2.0
    repunch_cooldown_max: float = 30.0
    # A session with no open stream and no application data either way this long ends (its
    # keepalive PINGs do not count); one that carries traffic is never closed by a timer.
    session_idle_timeout: float = 300.0
    # Probing (PINGs or data in flight) with nothing authenticated heard from the peer on any
    # route this long: the peer is gone and the session ends (idle routes are probed every
    # direct_keepalive, so a dead peer is noticed within about 3 s, even on the relay).
    peer_dead_after: float = 2.5
    # Path MTU discovery (mahole.pmtu) tries end-to-end packets up to this UDP payload; None:
    # what the local link towards each route's next hop carries (1,472 bytes on a 1,500-byte
    # Ethernet MTU, up to 16,383 on loopback); 1200 (QUIC's minimum) turns discovery off.
    max_udp_payload: int | None = None
    # Congestion controller of this node's end-to-end sessions (what it sends; each member
    # controls its own direction): one of CONGESTION_CONTROLS. CUBIC, because it moved more
    # than Reno on an lte link (60 ms, 1 % loss: p50 0.28 vs 0.23 MB/s, direct and relayed)
    # and no less on a long one (benchmarks/bench_goodput.py, README).
    congestion_control: str = "cubic"
    # Bytes read from local TCP sockets and not yet acknowledged by the peer, all streams of
    # all sessions together (mahole.send_budget; each stream also stops at 4 MiB): when spent,
    # streams that want to read wait with their sockets paused, oldest first, as
    # acknowledgements free it; idle streams hold none of it.
    send_budget: int = SEND_BUDGET

    def __post_init__(self):
        if self.intermediate_name is None:
            self.intermediate_name = self.intermediate[0]
        check_congestion_control(self.congestion_control)
        for name, most in (("birthday_sockets", MAX_BIRTHDAY_SOCKETS),
                           ("birthday_probes", MAX_BIRTHDAY_PROBES)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
                raise ValueError(f"{name.replace('_', '-')} must be in 0..{most}, got {value!r}")
        check_send_budget(self.send_budget)


def check_send_budget(value):
    """`value` if it is a usable send budget (bytes), else ValueError saying why."""
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_SEND_BUDGET:
        raise ValueError(f"send-budget must be a whole number of bytes, at least "
                         f"{MIN_SEND_BUDGET}, got {value!r}")
    return value


def check_congestion_control(name):
    """`name` if it is a congestion controller mahole offers, else ValueError saying which."""
    if name not in CONGESTION_CONTROLS:
        raise ValueError(f"unknown congestion control {name!r}; choose one of "
                         f"{', '.join(CONGESTION_CONTROLS)}")
    return name


# Bounds of birthday probing: file descriptors of the hard side, probes of the easy side.
MAX_BIRTHDAY_SOCKETS = 1024
MAX_BIRTHDAY_PROBES = 4096


@dataclasses.dataclass
class ConnectorConfig(NodeConfig):
    services: tuple = ()  # Service


@dataclasses.dataclass
class AgentConfig(NodeConfig):
    forwards: tuple = ()  # Forward
    open_timeout: float = 10.0  # from first use of a forward to a ready session
