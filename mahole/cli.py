"""`python -m mahole ROLE ...`: the command line of every role."""

import argparse
import asyncio
import dataclasses
import difflib
import ipaddress
import logging
import os
import signal
import sys

from . import __version__, certs_cli, logs, netcheck_cli, status_cli, systemd
from .config import (
    CONGESTION_CONTROLS,
    DEFAULT_PORT,
    MAX_BIRTHDAY_PROBES,
    MAX_BIRTHDAY_SOCKETS,
    AgentConfig,
    ConnectorConfig,
    ConfigFileError,
    Forward,
    IntermediateConfig,
    Service,
    check_send_budget,
    parse_relay_threads,
    read_config_file,
    toml_value,
)
from .pmtu import BASE_PLPMTU, MAX_PACKET
from .status import format_hostport, parse_hostport

log = logging.getLogger("mahole")

ROLES = {
    "intermediate": "public QUIC server: authentication, address discovery, signaling, relay",
    "connector": "sits beside private apps and exposes named services to agents",
    "agent": "runs on the user's machine and exposes local forwards to services",
    "demo": "run an intermediate, a connector and an agent on loopback and check data flows",
}

# Commands beyond the roles, each a callable add_parser(commands) that adds one command to
# the subparsers action and sets its func (see certs_cli.add_parser). New commands (status,
# ping, ...) go in this list; build_parser gives every command -v/-q/--log-format.
COMMANDS = [certs_cli.add_parser, status_cli.add_parser, netcheck_cli.add_parser]


def parse_address(text, default_host=None, default_port=None, allow_zero=True):
    """``HOST:PORT`` with the documented shortcuts: a bare ``PORT`` means ``default_host``
    (when there is one: any address to listen on, loopback for --status), a bare ``HOST``
    means ``default_port`` (when there is one: 4478 for --intermediate). An IPv6 address
    without brackets is refused with the spelling to use. Raises ValueError."""
    given = text
    if isinstance(text, str) and not text.startswith("["):
        if default_host is not None and text.isdigit():
            text = f":{text}"
        elif text.count(":") >= 2:
            port = default_port if default_port is not None else "PORT"
            try:
                ipaddress.IPv6Address(text)
            except ValueError:
                pass
            else:
                raise ValueError(f"expected HOST:PORT, got {text!r}: write an IPv6 address "
                                 f"in brackets, as in [{text}]:{port}")
        elif default_port is not None and ":" not in text and not text.isdigit():
            text = f"{text}:{default_port}"
    try:
        return parse_hostport(text, default_host, allow_zero=allow_zero)
    except ValueError as exc:  # speak of what the user wrote
        raise ValueError(str(exc).replace(f"got {text!r}", f"got {given!r}", 1)) from None


def _hostport(default_host=None, allow_zero=True, default_port=None):
    def parse(text):
        try:
            return parse_address(text, default_host, default_port, allow_zero)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _parsed(cls):
    def parse(text):
        try:
            return cls.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _add_credentials(sub, role):
    sub.add_argument("--ca", default="certs/ca.crt", help="deployment CA certificate "
                     "(default: certs/ca.crt)")
    sub.add_argument("--cert", required=True, help=f"this {role}'s certificate")
    sub.add_argument("--key", required=True, help=f"this {role}'s private key")
    sub.add_argument("--status", type=_hostport("127.0.0.1"), metavar="HOST:PORT",
                     help="serve GET /status (JSON) and GET /metrics (Prometheus) here "
                          "(a bare PORT means 127.0.0.1:PORT)")
    sub.add_argument("--control-socket", metavar="PATH",
                     help="local socket for `mahole status` and `mahole ping` (default: "
                          "ROLE-NAME.sock in $XDG_RUNTIME_DIR/mahole or /run/mahole; '' for none)")
    sub.add_argument("--keylog", metavar="FILE",
                     help="append the TLS secrets of the control and end-to-end connections "
                          "here (SSLKEYLOGFILE format, for Wireshark; created 0600)")
    sub.add_argument("--qlog-dir", metavar="DIR",
                     help="write one qlog file per QUIC connection here (read with qvis)")


def _add_node(sub, role):
    sub.add_argument("--intermediate", required=True, action="append",
                     type=_hostport(allow_zero=False, default_port=DEFAULT_PORT),
                     metavar="HOST[:PORT]",
                     help=f"the intermediate's address (default port: {DEFAULT_PORT}); "
                          "repeat it for the intermediates of a fleet: the node homes on the "
                          "nearest and moves to the next when it is lost")
    sub.add_argument("--intermediate-name", metavar="NAME",
                     help="name in the (first) intermediate's certificate (default: its "
                          "HOST; the others are checked against their own HOST)")
    sub.add_argument("--bind", type=_hostport("::"), default=("::", 0),
                     metavar="HOST:PORT", help="local UDP address (default: [::]:0, every "
                                               "address of both IPv4 and IPv6, any port)")
    policy = sub.add_mutually_exclusive_group()
    policy.add_argument("--relay-only", action="store_true",
                        help="never punch: sessions stay on the intermediate's relay")
    policy.add_argument("--direct-only", action="store_true",
                        help="never use the relay: a session fails if hole punching fails")
    sub.add_argument("--punch-deadline", type=float, default=5.0, metavar="SECONDS",
                     help="give up on a direct path after this long (default: 5)")
    sub.add_argument("--birthday-sockets", type=_count(MAX_BIRTHDAY_SOCKETS),
                     default=AgentConfig.birthday_sockets, metavar="K",
                     help="birthday probing: extra sockets this node opens behind a NAT that "
                          "maps at random (default: 256; 0: never)")
    sub.add_argument("--birthday-probes", type=_count(MAX_BIRTHDAY_PROBES),
                     default=AgentConfig.birthday_probes, metavar="M",
                     help="birthday probing: most probes this node sends to a peer behind "
                          "such a NAT, 250 a second (default: 1024; 0: never)")
    sub.add_argument("--no-port-mapping", action="store_true",
                     help="do not ask the router for a public port (PCP, NAT-PMP, UPnP-IGD); "
                          "asking sends a few datagrams to the default gateway's port "
                          "5351 and an SSDP search")
    sub.add_argument("--fixed-keepalive", action="store_true",
                     help="keep --keepalive on idle direct routes instead of measuring this "
                          "network's binding lifetime (a few STUN requests to the "
                          "intermediate, answered up to 75 s late) and PINGing a third as often")
    node = AgentConfig  # the settings every node shares, with their defaults
    for flag, field, text in (
            ("--failover-timeout", "failover_timeout",
             "leave a direct route that answers nothing this long (or 3 RTTs, or longer on a "
             "route that fades; at most twice this) for the relay"),
            ("--keepalive", "direct_keepalive",
             "PING an idle session's route this often (keeps NAT mappings open); idle direct "
             "routes: until the binding lifetime is measured, and at least this often"),
            ("--peer-dead-after", "peer_dead_after",
             "end a session whose peer answers nothing on any route this long"),
            ("--session-idle-timeout", "session_idle_timeout",
             "end a session with no open stream and no data this long")):
        sub.add_argument(flag, dest=field, type=_seconds, default=getattr(node, field),
                         metavar="SECONDS", help=f"{text} (default: {getattr(node, field):g})")
    sub.add_argument("--max-udp-payload", type=_udp_payload, default=node.max_udp_payload,
                     metavar="BYTES",
                     help="largest end-to-end packet path MTU discovery tries (default: what "
                          "the local link carries, 1472 on a 1,500-byte MTU; 1200 turns it "
                          "off)")
    sub.add_argument("--send-budget", type=_send_budget, default=node.send_budget,
                     metavar="BYTES",
                     help="bytes read from local TCP connections and not yet acknowledged by "
                          "the peer, all streams together; when spent, streams stop reading "
                          f"and take turns (default: {node.send_budget})")
    sub.add_argument("--congestion-control", choices=CONGESTION_CONTROLS,
                     default=node.congestion_control,
                     help="congestion controller of the end-to-end sessions' sending side "
                          f"(default: {node.congestion_control})")
    _add_credentials(sub, role)


def _send_budget(text):
    try:
        return check_send_budget(int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _udp_payload(text):
    """A UDP payload size a QUIC path may use: 1200 (RFC 9000 §14.1) to mahole.pmtu's
    MAX_PACKET (aioquic's largest)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not BASE_PLPMTU <= value <= MAX_PACKET:
        raise argparse.ArgumentTypeError(f"expected a number of bytes from {BASE_PLPMTU} to "
                                         f"{MAX_PACKET}, got {text!r}")
    return value


def _count(most):
    """An argparse type: a whole number from 0 to ``most``."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = -1
        if not 0 <= value <= most:
            raise argparse.ArgumentTypeError(f"expected a number from 0 to {most}, got {text!r}")
        return value
    return parse


def _registry_url(text):
    """A Redis URL for --registry ("" for none)."""
    if text and not text.startswith(("redis://", "rediss://", "unix://")):
        raise argparse.ArgumentTypeError(
            f"expected redis://HOST:PORT/DB, rediss://HOST:PORT/DB or unix:///PATH, "
            f"not {text!r}")
    return text


def _relay_threads(text):
    try:
        return parse_relay_threads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text):
    """A positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def build_parser(*, explicit_only=False):
    """The parser of every command. Role settings parse to their defaults, and settings the
    roles require (--cert, ...) are checked after merging the sources (see resolve()); with
    `explicit_only` (what main() uses) the namespace holds only the flags given, so that the
    environment and a config file can fill the rest."""
    parser = argparse.ArgumentParser(
        prog="mahole",
        description="Connect devices to private applications directly, peer to peer, "
                    "through NATs; relayed end-to-end encrypted when no direct path exists.",
    )
    parser.add_argument("--version", action="version", version=f"mahole {__version__}")
    logs.add_flags(parser, top_level=True)
    commands = parser.add_subparsers(dest="command", metavar="ROLE")
    commands.required = True

    sub = commands.add_parser("intermediate", help=ROLES["intermediate"],
                              description=ROLES["intermediate"])
    sub.add_argument("--listen", type=_hostport("0.0.0.0"), default=("0.0.0.0", DEFAULT_PORT),
                     metavar="HOST:PORT", help=f"UDP address (default: 0.0.0.0:{DEFAULT_PORT}; "
                     "a bare PORT means 0.0.0.0:PORT)")
    sub.add_argument("--allow", action="append", default=[], metavar="AGENT_GLOB=SERVICE_GLOB",
                     help="let matching agents reach matching services (repeatable; "
                          "default: deny everything)")
    sub.add_argument("--offer", action="append", default=[],
                     metavar="CONNECTOR_GLOB=SERVICE_GLOB",
                     help="let matching connectors offer matching services (repeatable; "
                          "default: any connector may offer any service, with a warning)")
    sub.add_argument("--registry", type=_registry_url, default="", metavar="URL",
                     help="share the directory of nodes with the other intermediates of a "
                          "fleet through this Redis: redis://HOST:PORT/DB, rediss:// (TLS) "
                          "or unix:///PATH (default: none, this intermediate alone)")
    sub.add_argument("--fleet-address", type=_hostport(allow_zero=False), default=None,
                     metavar="HOST:PORT",
                     help="where the other intermediates of the fleet send relay frames for "
                          "this one (default: the --listen address, if it is a specific one)")
    sub.add_argument("--relay-rate-limit", type=int, default=0, metavar="BYTES_PER_S",
                     help="per-session relay rate limit (default: 0, unlimited)")
    sub.add_argument("--relay-threads", type=_relay_threads,
                     default=IntermediateConfig.relay_threads, metavar="N|auto",
                     help="relay sockets, each read by a thread of its own (SO_REUSEPORT); "
                          "auto: one per CPU (default: "
                          f"{IntermediateConfig.relay_threads})")
    sub.add_argument("--node-dead-after", type=float,
                     default=IntermediateConfig.node_dead_after, metavar="SECONDS",
                     help="a node silent this long is gone and its sessions end "
                          f"(default: {IntermediateConfig.node_dead_after:g})")
    sub.add_argument("--no-punch-sync", action="store_true",
                     help="send StartPunching to both members at once instead of timing it "
                          "from their RTTs so that both start together (for measurements)")
    sub.add_argument("--probe-timeout", type=float, default=IntermediateConfig.probe_timeout,
                     metavar="SECONDS",
                     help="a registered node probed because its identity registers again "
                          "keeps it if it answers within this, else it is replaced "
                          f"(default: {IntermediateConfig.probe_timeout:g})")
    quota = IntermediateConfig
    for flag, kind, metavar, text in (
            ("--connections-per-identity", int, "N",
             "control connections one identity may hold here"),
            ("--sessions-per-minute", int, "N",
             "sessions one agent may open per minute (that many at once)"),
            ("--sessions-per-agent", int, "N", "open sessions per agent"),
            ("--sessions-per-connector", int, "N", "open sessions per connector"),
            ("--signaling-rate", float, "PER_S", "control messages per second per node; "
             "more are ignored, and a node that keeps it up is closed"),
            ("--signaling-burst", int, "N", "control messages a node may send at once"),
            ("--relay-rate-per-identity", int, "BYTES_PER_S",
             "relay rate of one identity's sessions together, shared among them (0: none)")):
        field = flag[2:].replace("-", "_")
        sub.add_argument(flag, type=kind, default=getattr(quota, field), metavar=metavar,
                         help=f"{text} (default: {getattr(quota, field):g})")
    edge = IntermediateConfig
    sub.add_argument("--max-half-open", type=int, default=edge.max_half_open, metavar="N",
                     help="connections not registered yet, at most (default: "
                          f"{edge.max_half_open})")
    sub.add_argument("--max-half-open-per-source", type=int,
                     default=edge.max_half_open_per_source, metavar="N",
                     help="of those, from one source host; more get a Retry, or are dropped "
                          f"after one (default: {edge.max_half_open_per_source})")
    sub.add_argument("--retry-threshold", type=int, default=edge.retry_threshold,
                     metavar="N", help="above this many, new clients must first answer a QUIC "
                     f"Retry (0: always; default: {edge.retry_threshold})")
    sub.add_argument("--handshake-timeout", type=float, default=edge.handshake_timeout,
                     metavar="SECONDS", help="a connection not registered this long after "
                     f"its first packet is dropped (default: {edge.handshake_timeout:g})")
    sub.add_argument("--stun-rate", type=float, default=edge.stun_rate, metavar="PER_S",
                     help="STUN responses per second per source host "
                          f"(default: {edge.stun_rate:g})")
    sub.add_argument("--stun-alt-port", type=int, default=edge.stun_alt_port, metavar="PORT",
                     help="a second UDP port answering STUN only, with OTHER-ADDRESS and "
                          "CHANGE-REQUEST (RFC 5780), for `mahole netcheck` (default: none)")
    sub.add_argument("--stun-alt-ip", default=edge.stun_alt_ip, metavar="IP",
                     help="a second address of this host answering at --stun-alt-port, so "
                          "netcheck can tell address-dependent NATs (default: none)")
    sub.add_argument("--vn-rate", type=float, default=edge.vn_rate, metavar="PER_S",
                     help="QUIC Version Negotiation packets per second per source host "
                          f"(default: {edge.vn_rate:g})")
    _add_credentials(sub, "intermediate")
    sub.set_defaults(func=run_intermediate)

    sub = commands.add_parser("connector", help=ROLES["connector"],
                              description=ROLES["connector"])
    sub.add_argument("--service", action="append", default=[], required=True,
                     type=_parsed(Service), metavar="NAME=tcp:HOST:PORT",
                     help="a named service and its target (repeatable; tcp: or udp:)")
    _add_node(sub, "connector")
    sub.set_defaults(func=run_connector)

    sub = commands.add_parser("agent", help=ROLES["agent"], description=ROLES["agent"])
    sub.add_argument("--forward", action="append", default=[], required=True,
                     type=_parsed(Forward), metavar="tcp:LHOST:LPORT=SERVICE",
                     help="a local forward to a service (repeatable; tcp: or udp:)")
    _add_node(sub, "agent")
    sub.set_defaults(func=run_agent)

    sub = commands.add_parser("demo", help=ROLES["demo"], description=ROLES["demo"])
    sub.add_argument("--json", action="store_true", help="print the results as JSON")
    sub.add_argument("--bytes", type=int, default=4 << 20,
                     help="bytes sent through the TCP forward (default: 4 MiB)")
    sub.set_defaults(func=run_demo)

    # Commands beyond the roles: each module offers add_parser(commands), which adds its
    # command and sets func. Add new commands (status, ping, ...) to this list.
    for add_parser in COMMANDS:
        add_parser(commands)
    for sub in commands.choices.values():  # -v/-q/--log-format after the command too
        if "-v" not in sub._option_string_actions:
            logs.add_flags(sub)
    for role in CONFIGURABLE:
        _configurable(commands.choices[role], explicit_only)
    return parser


# --- settings from flags, MAHOLE_* environment variables and a TOML file ------------------

CONFIGURABLE = ("intermediate", "connector", "agent")
ENV_PREFIX = "MAHOLE_"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_LOG_DEFAULTS = {"cmd_verbose": 0, "cmd_quiet": 0, "cmd_log_format": "text"}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting of a role: its flag ``--key``, config-file key ``key`` and environment
    variable ``MAHOLE_KEY`` (upper case, dashes as underscores) all name it."""

    key: str
    dest: str
    action: argparse.Action
    default: object
    required: bool

    @property
    def env(self):
        return ENV_PREFIX + self.key.upper().replace("-", "_")


def _configurable(sub, explicit_only):
    """Give a role's parser --config and --print-config, and record its settings. With
    `explicit_only` their defaults move out of argparse (the namespace holds only the flags
    given), so that the environment and the file can fill what the flags leave. Required
    settings are checked after merging (missing_settings())."""
    sub.add_argument("--config", metavar="FILE",
                     help="read settings from this TOML file, keys named like the flags "
                          "(precedence: flags > MAHOLE_* environment > file > defaults; "
                          "the file may also be given as MAHOLE_CONFIG)")
    sub.add_argument("--print-config", action="store_true",
                     help="print the effective settings as TOML and exit")
    settings = []
    for action in sub._actions:
        if not action.option_strings or action.dest in ("help", "config", "print_config"):
            continue
        key = max(action.option_strings, key=len).lstrip("-")
        default = _LOG_DEFAULTS.get(action.dest, action.default)
        settings.append(Setting(key, action.dest, action, default, action.required))
        if action.required:
            action.required = False
            action.help = f"{action.help} (required)"
        if explicit_only:
            action.default = argparse.SUPPRESS
    sub.set_defaults(settings=tuple(settings))


def _scalar(action, raw):
    """A file or environment value converted as its flag's text would be."""
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        raw = str(raw)
    if not isinstance(raw, str):
        raise ValueError(f"expected a string, got {toml_value(raw) if isinstance(raw, list) else raw!r}")
    kind = action.type or str
    try:
        value = kind(raw)
    except (ValueError, TypeError):
        if kind not in (int, float):
            raise
        raise ValueError(f"expected {'a whole number' if kind is int else 'a number'}, "
                         f"got {raw!r}") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}, got {raw!r}")
    return value


def _convert(setting, raw, from_env):
    action = setting.action
    if isinstance(action, argparse._StoreTrueAction):
        if from_env and raw.strip().lower() in _TRUE + _FALSE:
            return raw.strip().lower() in _TRUE
        if isinstance(raw, bool):
            return raw
        raise ValueError(f"expected true or false, got {raw!r}")
    if isinstance(action, argparse._CountAction):
        if from_env and raw.strip().isdigit():
            raw = int(raw)
        if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
            return raw
        raise ValueError(f"expected a whole number >= 0, got {raw!r}")
    if isinstance(action, argparse._AppendAction):
        if from_env:  # MAHOLE_FORWARD="tcp:127.0.0.1:8080=web,udp:127.0.0.1:5353=dns"
            raw = [part.strip() for part in raw.split(",") if part.strip()]
        elif not isinstance(raw, list):
            raw = [raw]
        return [_scalar(action, item) for item in raw]
    return _scalar(action, raw)


def _unknown_key(key, settings, role, path):
    text = f"{path}: unknown key {key!r}"
    known = [s.key for s in settings]
    for other in CONFIGURABLE:  # a key of another role is said so
        if other != role and key in _role_keys(other):
            return f"{text}: it is a setting of the {other}, not of the {role}"
    close = difflib.get_close_matches(key, known, n=1)
    return f"{text} (did you mean {close[0]!r}?)" if close else \
        f"{text}; the keys are the {role}'s long flags without dashes: {', '.join(known)}"


def _role_keys(role):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {s.key for s in sub.choices[role].get_default("settings")}


def resolve(args, environ=None):
    """Give every setting of a role its value from the first source that has it: flags,
    ``MAHOLE_*`` environment variables, the ``--config`` file, defaults. Records where each
    came from in ``args.sources``. Raises ConfigFileError (a message for people)."""
    environ = os.environ if environ is None else environ
    given = dict(vars(args))
    for name in ("verbose", "quiet"):  # -v/-q before the command count with those after it
        if name in given or f"cmd_{name}" in given:
            given[f"cmd_{name}"] = given.pop(name, 0) + given.get(f"cmd_{name}", 0)
    if "log_format" in given:
        given.setdefault("cmd_log_format", given.pop("log_format"))
    for name in ("verbose", "quiet", "log_format"):
        if hasattr(args, name):
            delattr(args, name)
    path = given.get("config") or environ.get(ENV_PREFIX + "CONFIG") or None
    args.config = path
    table = read_config_file(path) if path else {}
    settings = args.settings
    known = {s.key for s in settings}
    for key in table:
        if key not in known:
            raise ConfigFileError(_unknown_key(key, settings, args.command, path))
    # -v and -q make one log level: a source that gives either gives both (0 for the other).
    level = [s for s in settings if s.dest in ("cmd_verbose", "cmd_quiet")]
    if any(s.dest in given for s in level):
        for s in level:
            given.setdefault(s.dest, 0)
    elif any(s.env in environ for s in level):
        environ = {**environ, **{s.env: environ.get(s.env, "0") for s in level}}
    elif any(s.key in table for s in level):
        table = {**table, **{s.key: table.get(s.key, 0) for s in level}}
    args.sources = {}
    for s in settings:
        if s.dest in given:
            value, source = given[s.dest], "flag"
        elif s.env in environ:
            value, source = _checked(s, environ[s.env], True, s.env), s.env
        elif s.key in table:
            value, source = _checked(s, table[s.key], False, f"{path}: {s.key}"), "file"
        else:
            value, source = s.default, "default"
            value = list(value) if isinstance(value, list) else value
        setattr(args, s.dest, value)
        args.sources[s.key] = source
    if getattr(args, "relay_only", False) and getattr(args, "direct_only", False):
        raise ConfigFileError("relay-only and direct-only exclude each other "
                              f"(from {args.sources['relay-only']} and "
                              f"{args.sources['direct-only']})")
    return args


def _checked(setting, raw, from_env, where):
    try:
        return _convert(setting, raw, from_env)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        raise ConfigFileError(f"{where}: {exc}") from None


def missing_settings(args):
    """The required settings no source gave, as their flags."""
    return [f"--{s.key}" for s in args.settings
            if s.required and getattr(args, s.dest) in (None, [], ())]


def config_text(args):
    """The effective settings as TOML (feed it back with --config FILE)."""
    lines = [f"# mahole {args.command}: effective settings",
             "# precedence: flags > MAHOLE_* environment > config file > defaults"]
    if args.config:
        lines.append(f"# config file: {args.config}")
    for s in args.settings:
        value = getattr(args, s.dest)
        source = args.sources[s.key]
        note = "" if source == "default" else f"  # {source}"
        if value is None or (s.required and value == []):
            lines.append(f"# {s.key} = (not set{', required' if s.required else ''})")
        else:
            lines.append(f"{s.key} = {toml_value(value)}{note}")
    return "\n".join(lines) + "\n"


def _credentials(args):
    return {"ca": args.ca, "cert": args.cert, "key": args.key, "status": args.status,
            "control_socket": args.control_socket, "keylog": args.keylog,
            "qlog_dir": args.qlog_dir}


def run_intermediate(args):
    from .roles.intermediate import Intermediate
    from .signaling import AclRule, Limits, OfferRule

    quotas = {field: getattr(args, field) for field in (
        "connections_per_identity", "sessions_per_minute", "sessions_per_agent",
        "sessions_per_connector", "signaling_rate", "signaling_burst",
        "relay_rate_per_identity")}
    try:
        for rule in args.allow:
            AclRule(rule)
        for rule in args.offer:
            OfferRule(rule)
    except ValueError as exc:
        return _error(args, str(exc))
    try:
        Limits(**quotas)
    except ValueError as exc:
        field = str(exc).split(" ", 1)
        return _error(args, f"--{field[0].replace('_', '-')} {field[1]}")
    if args.relay_rate_limit < 0:
        return _error(args, "--relay-rate-limit must be >= 0")
    for flag in ("node_dead_after", "probe_timeout", "handshake_timeout", "max_half_open",
                 "max_half_open_per_source"):
        if not getattr(args, flag) > 0:
            return _error(args, f"--{flag.replace('_', '-')} must be > 0")
    for flag in ("retry_threshold", "stun_rate", "vn_rate"):
        if not getattr(args, flag) >= 0:
            return _error(args, f"--{flag.replace('_', '-')} must be >= 0")
    if not 0 <= args.stun_alt_port <= 65535 or args.stun_alt_port == args.listen[1] != 0:
        return _error(args, "--stun-alt-port must be a free port other than --listen's")
    if args.stun_alt_ip is not None:
        if not args.stun_alt_port:
            return _error(args, "--stun-alt-ip needs --stun-alt-port")
        try:
            ipaddress.ip_address(args.stun_alt_ip)
        except ValueError:
            return _error(args, f"--stun-alt-ip {args.stun_alt_ip!r} is not an IP address")
    if not args.allow:
        log.warning("no --allow rule: every session will be refused; add one such as "
                    "--allow 'alice=web' (AGENT_GLOB=SERVICE_GLOB)")
    cfg = IntermediateConfig(listen=args.listen, allow=tuple(args.allow),
                             offer=tuple(args.offer), **quotas,
                             relay_rate_limit=args.relay_rate_limit,
                             relay_threads=args.relay_threads,
                             relay_burst=max(args.relay_rate_limit // 4, 64 * 1024)
                             if args.relay_rate_limit else 0,
                             node_dead_after=args.node_dead_after,
                             probe_timeout=args.probe_timeout,
                             punch_sync=not args.no_punch_sync,
                             max_half_open=args.max_half_open,
                             max_half_open_per_source=args.max_half_open_per_source,
                             retry_threshold=args.retry_threshold,
                             handshake_timeout=args.handshake_timeout,
                             stun_rate=args.stun_rate, vn_rate=args.vn_rate,
                             stun_alt_port=args.stun_alt_port, stun_alt_ip=args.stun_alt_ip,
                             registry=args.registry, fleet_address=args.fleet_address,
                             **_credentials(args))
    return _serve(args, Intermediate, cfg)


def _node_kwargs(args):
    return {"intermediate": args.intermediate[0], "fallbacks": tuple(args.intermediate[1:]),
            "intermediate_name": args.intermediate_name,
            "bind": args.bind, "relay_only": args.relay_only, "direct_only": args.direct_only,
            "punch_deadline": args.punch_deadline, "failover_timeout": args.failover_timeout,
            "port_mapping": not args.no_port_mapping,
            "adaptive_keepalive": not args.fixed_keepalive,
            "birthday_sockets": args.birthday_sockets, "birthday_probes": args.birthday_probes,
            "direct_keepalive": args.direct_keepalive, "peer_dead_after": args.peer_dead_after,
            "session_idle_timeout": args.session_idle_timeout,
            "max_udp_payload": args.max_udp_payload, "send_budget": args.send_budget,
            "congestion_control": args.congestion_control, **_credentials(args)}


def run_connector(args):
    from .api import Connector

    seen = set()
    for service in args.service:
        if service.name in seen:
            return _error(args, f"two --service entries are named {service.name!r}; "
                                "give each service one name")
        seen.add(service.name)
    cfg = ConnectorConfig(services=tuple(args.service), **_node_kwargs(args))
    return _serve(args, Connector, cfg)


def run_agent(args):
    from .api import Agent

    cfg = AgentConfig(forwards=tuple(args.forward), **_node_kwargs(args))
    return _serve(args, Agent, cfg)


def run_demo(args):
    from .demo import run

    return run(json_output=args.json, total_bytes=args.bytes)


def _error(args, text):
    logs.say(f"mahole {args.command}: error: {text}", logging.ERROR)
    return 2


async def _until_signalled():
    """Until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    await stop


def _serve(args, role_cls, cfg):
    """Run a role until SIGINT/SIGTERM; one clear line and exit 2 if it cannot start. An
    agent or a connector is the library's (`_serve_node`)."""
    from .roles.node import StartupError

    if hasattr(role_cls, "_from_config"):
        return _serve_node(args, role_cls._from_config(cfg))

    async def main():
        role = role_cls(cfg)
        await role.start()
        logs.say(f"mahole {args.command} running; Ctrl-C to stop")
        systemd.ready(f"{args.command} {role.identity.name} listening on "
                      f"{format_hostport(*role.local_address[:2])}")
        try:
            await _until_signalled()
        finally:
            systemd.stopping()
            await role.stop()

    try:
        asyncio.run(main())
    except StartupError as exc:
        return _error(args, str(exc))
    return 0


def _serve_node(args, node):
    """Run an agent or a connector (a `mahole.Agent` or `mahole.Connector`: the command line
    is a user of the library) until SIGINT/SIGTERM. It keeps trying to reach the
    intermediate; one clear line and exit 2 if it cannot start or meets a permanent error
    (a certificate that does not match, a duplicate identity)."""
    from .api import Error

    async def notify_registered():
        # READY=1 for systemd (Type=notify) once the intermediate accepted the registration.
        try:
            await node.wait_registered(None)
        except Error:
            return  # a permanent refusal ends wait_closed() below
        status = node.status()
        systemd.ready(f"{args.command} {status['name']} registered with "
                      f"{status['intermediate']['addr']}")

    async def main():
        await node.start(wait_registered=False)
        logs.say(f"mahole {args.command} running; Ctrl-C to stop")
        ready = asyncio.ensure_future(notify_registered())
        signalled = asyncio.ensure_future(_until_signalled())
        closed = asyncio.ensure_future(node.wait_closed())
        try:
            await asyncio.wait((signalled, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (ready, signalled, closed):
                task.cancel()
            systemd.stopping()
            await node.close()
        if closed.done() and not closed.cancelled() and closed.exception() is not None:
            raise closed.exception()

    try:
        asyncio.run(main())
    except Error as exc:
        return _error(args, str(exc))
    return 0


def setup_logging(args):
    """-v/-q before and after the command add up; --log-format after it wins (for the roles
    resolve() has already folded them into the cmd_* settings)."""
    logs.setup(verbose=getattr(args, "verbose", 0) + getattr(args, "cmd_verbose", 0),
               quiet=getattr(args, "quiet", 0) + getattr(args, "cmd_quiet", 0),
               fmt=getattr(args, "cmd_log_format", None) or getattr(args, "log_format", "text"))


def main(argv=None):
    parser = build_parser(explicit_only=True)
    args = parser.parse_args(argv)
    if args.command in CONFIGURABLE:
        try:
            resolve(args)
        except ConfigFileError as exc:
            return _error(args, str(exc))
        if args.print_config:
            sys.stdout.write(config_text(args))
            return 0
        missing = missing_settings(args)
        if missing:
            return _error(args, f"missing {', '.join(missing)} (give each as a flag, as a "
                                "MAHOLE_* environment variable or in --config FILE)")
    setup_logging(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
