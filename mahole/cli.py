"""`python -m mahole ROLE ...`: the command line of every role."""

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys

from . import __version__, certs_cli, logs
from .config import (
    DEFAULT_PORT,
    AgentConfig,
    ConnectorConfig,
    Forward,
    IntermediateConfig,
    Service,
)
from .status import parse_hostport

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
COMMANDS = [certs_cli.add_parser]


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


def _add_node(sub, role):
    sub.add_argument("--intermediate", required=True,
                     type=_hostport(allow_zero=False, default_port=DEFAULT_PORT),
                     metavar="HOST[:PORT]",
                     help=f"the intermediate's address (default port: {DEFAULT_PORT})")
    sub.add_argument("--intermediate-name", metavar="NAME",
                     help="name in the intermediate's certificate (default: its HOST)")
    sub.add_argument("--bind", type=_hostport("0.0.0.0"), default=("0.0.0.0", 0),
                     metavar="HOST:PORT", help="local UDP address (default: any, port 0)")
    policy = sub.add_mutually_exclusive_group()
    policy.add_argument("--relay-only", action="store_true",
                        help="never punch: sessions stay on the intermediate's relay")
    policy.add_argument("--direct-only", action="store_true",
                        help="never use the relay: a session fails if hole punching fails")
    sub.add_argument("--punch-deadline", type=float, default=5.0, metavar="SECONDS",
                     help="give up on a direct path after this long (default: 5)")
    node = AgentConfig  # the settings every node shares, with their defaults
    for flag, field, text in (
            ("--failover-timeout", "failover_timeout",
             "leave a direct route that answers nothing this long (or 3 RTTs, at most twice "
             "this) for the relay"),
            ("--keepalive", "direct_keepalive",
             "PING an idle session's route this often (keeps NAT mappings open)"),
            ("--peer-dead-after", "peer_dead_after",
             "end a session whose peer answers nothing on any route this long"),
            ("--session-idle-timeout", "session_idle_timeout",
             "end a session with no open stream and no data this long")):
        sub.add_argument(flag, dest=field, type=_seconds, default=getattr(node, field),
                         metavar="SECONDS", help=f"{text} (default: {getattr(node, field):g})")
    _add_credentials(sub, role)


def _seconds(text):
    """A positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def build_parser():
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
    sub.add_argument("--relay-rate-limit", type=int, default=0, metavar="BYTES_PER_S",
                     help="per-session relay rate limit (default: 0, unlimited)")
    sub.add_argument("--node-dead-after", type=float,
                     default=IntermediateConfig.node_dead_after, metavar="SECONDS",
                     help="a node silent this long is gone and its sessions end "
                          f"(default: {IntermediateConfig.node_dead_after:g})")
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
    return parser


def _credentials(args):
    return {"ca": args.ca, "cert": args.cert, "key": args.key, "status": args.status}


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
    if not args.allow:
        log.warning("no --allow rule: every session will be refused; add one such as "
                    "--allow 'alice=web' (AGENT_GLOB=SERVICE_GLOB)")
    cfg = IntermediateConfig(listen=args.listen, allow=tuple(args.allow),
                             offer=tuple(args.offer), **quotas,
                             relay_rate_limit=args.relay_rate_limit,
                             relay_burst=max(args.relay_rate_limit // 4, 64 * 1024)
                             if args.relay_rate_limit else 0,
                             node_dead_after=args.node_dead_after,
                             probe_timeout=args.probe_timeout,
                             max_half_open=args.max_half_open,
                             max_half_open_per_source=args.max_half_open_per_source,
                             retry_threshold=args.retry_threshold,
                             handshake_timeout=args.handshake_timeout,
                             stun_rate=args.stun_rate, vn_rate=args.vn_rate,
                             **_credentials(args))
    return _serve(args, Intermediate, cfg)


def _node_kwargs(args):
    return {"intermediate": args.intermediate, "intermediate_name": args.intermediate_name,
            "bind": args.bind, "relay_only": args.relay_only, "direct_only": args.direct_only,
            "punch_deadline": args.punch_deadline, "failover_timeout": args.failover_timeout,
            "direct_keepalive": args.direct_keepalive, "peer_dead_after": args.peer_dead_after,
            "session_idle_timeout": args.session_idle_timeout, **_credentials(args)}


def run_connector(args):
    from .roles.connector import Connector

    seen = set()
    for service in args.service:
        if service.name in seen:
            return _error(args, f"two --service entries are named {service.name!r}; "
                                "give each service one name")
        seen.add(service.name)
    cfg = ConnectorConfig(services=tuple(args.service), **_node_kwargs(args))
    return _serve(args, Connector, cfg)


def run_agent(args):
    from .roles.agent import Agent

    cfg = AgentConfig(forwards=tuple(args.forward), **_node_kwargs(args))
    return _serve(args, Agent, cfg)


def run_demo(args):
    from .demo import run

    return run(json_output=args.json, total_bytes=args.bytes)


def _error(args, text):
    print(f"mahole {args.command}: error: {text}", file=sys.stderr)
    return 2


def _serve(args, role_cls, cfg):
    """Run a role until SIGINT/SIGTERM; one clear line and exit 2 if it cannot start or
    meets a permanent error (a certificate that does not match, a duplicate identity)."""
    from .roles.node import PermanentError, StartupError

    async def main():
        role = role_cls(cfg)
        await role.start()
        stop = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        print(f"mahole {args.command} running; Ctrl-C to stop", file=sys.stderr, flush=True)
        failed = getattr(role, "failed", None)  # agents and connectors can fail for good
        await asyncio.wait([stop] if failed is None else [stop, failed],
                           return_when=asyncio.FIRST_COMPLETED)
        await role.stop()
        if failed is not None and failed.done():
            raise PermanentError(failed.result())

    try:
        asyncio.run(main())
    except StartupError as exc:
        return _error(args, str(exc))
    return 0


def setup_logging(args):
    """-v/-q before and after the command add up; --log-format after it wins."""
    logs.setup(verbose=getattr(args, "verbose", 0) + getattr(args, "cmd_verbose", 0),
               quiet=getattr(args, "quiet", 0) + getattr(args, "cmd_quiet", 0),
               fmt=getattr(args, "cmd_log_format", None) or getattr(args, "log_format", "text"))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
