"""``python -m mahole netcheck``: what kind of network this machine is on.

    python -m mahole netcheck --intermediate HOST[:PORT] [--intermediate ...] [--json]
                              [--timeout SECONDS] [--no-port-mapping] [--lifetime | --quick]

The asyncio shell of `mahole.netcheck`: resolves the intermediates, opens the sockets the
checks need (``main``, ``filter``, ``hairpin`` and four fresh ``portN``, all on ``[::]:0``, and
``gateway`` to ask the default gateway whether it speaks NAT-PMP or PCP), moves datagrams and
timers, and prints the report as a table (or ``--json``). STUN needs no credentials. The
checks end within about two probe timeouts (``--timeout``, default 1.5 s each); progress goes
to stderr. ``--lifetime`` then measures the binding lifetime (`mahole.binding_lifetime`, up to
about two minutes, with a progress line as each probe tells something), ``--quick`` the same
within about 30 s (idle times up to 25 s).

Exit status: 0 with a report; 1 when no intermediate answered (the report is still printed,
then one line on stderr); 2 for a bad flag or a name that does not resolve.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import sys

from . import binding_lifetime, netcheck
from .wire import pcp
from .endpoint import plain_addr
from .status_cli import seconds_between

__all__ = ["add_parser", "check", "format_report", "run_netcheck"]

PORT_SAMPLES = 4  # fresh sockets for port allocation


class NetcheckError(Exception):
    """One line for the user; exit status 2."""


def add_parser(subparsers) -> None:
    """Add the ``netcheck`` command to an argparse subparsers action."""
    from .cli import _hostport  # cli imports this module; by now it is loaded
    from .config import DEFAULT_PORT

    sub = subparsers.add_parser(
        "netcheck", help="report this network: UDP, public addresses, NAT behaviour, RTTs",
        description="Ask the intermediates' STUN observers (RFC 5780) what this network "
                    "does: whether UDP works, the public IPv4 and IPv6 addresses, the NAT's "
                    "mapping and filtering behaviour (an intermediate with --stun-alt-port, "
                    "and --stun-alt-ip, tells them), its port allocation and the RTT to each "
                    "intermediate; whether the NAT hairpins and the gateway speaks NAT-PMP "
                    "or PCP. No credentials are needed.")
    sub.add_argument("--intermediate", required=True, action="append",
                     type=_hostport(allow_zero=False, default_port=DEFAULT_PORT),
                     metavar="HOST[:PORT]",
                     help=f"an intermediate (default port: {DEFAULT_PORT}); repeat for more")
    sub.add_argument("--json", action="store_true", help="print the report as JSON")
    sub.add_argument("--timeout", type=seconds_between(0.1, 10), default=netcheck.PROBE_TIMEOUT,
                     metavar="SECONDS", help="how long each request is retried before it "
                     f"counts as unanswered (default: {netcheck.PROBE_TIMEOUT:g})")
    sub.add_argument("--no-port-mapping", action="store_true",
                     help="do not ask the default gateway whether it speaks NAT-PMP or PCP")
    how = sub.add_mutually_exclusive_group()
    how.add_argument("--lifetime", action="store_const", const="full", dest="lifetime",
                     help="also measure how long an idle UDP mapping lives (probes up to "
                     f"{max(binding_lifetime.FULL_DELAYS)} s idle: about two minutes)")
    how.add_argument("--quick", action="store_const", const="quick", dest="lifetime",
                     help="measure the binding lifetime within about 30 s (idle times up to "
                     f"{max(binding_lifetime.QUICK_DELAYS)} s)")
    sub.set_defaults(func=run_netcheck)


def _fmt(addr):
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _open_socket():
    """A fresh UDP socket on [::]:0 reaching both families (0.0.0.0:0 where IPv6 is off)."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", 0))
        except OSError:
            sock.close()
            raise
    except OSError:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", 0))
    sock.setblocking(False)
    return sock


async def _resolve(loop, host, port, families):
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as exc:
        raise NetcheckError(f"cannot resolve the intermediate {host!r}: "
                            f"{getattr(exc, 'strerror', None) or exc}") from None
    addrs = [plain_addr(info[4][:2]) for info in infos if info[0] in families]
    return list(dict.fromkeys(addrs))


def _local_ips():
    try:
        from .ice.candidates import host_addresses
        return host_addresses(include_loopback=True)
    except Exception:  # no ifaddr: "no NAT" is then seen only for a specific bind
        return []


def _gateway(resolved):
    """(gateway, the address this host reaches it from), or None: not when asked not to, and
    not when an intermediate is on loopback (one machine, no router in between: tests and
    demos never send anything to the host's real router), as mahole.portmapping decides."""
    from .portmapping import default_gateway, source_address
    if any(ipaddress.ip_address(a[0].split("%", 1)[0]).is_loopback
           for _, addrs in resolved for a in addrs):
        return None
    gateway = default_gateway()
    if gateway is None:
        return None
    try:
        return gateway, source_address(gateway, pcp.PORT)
    except OSError:
        return None


async def measure_lifetime(target, delays, *, progress=None, on_update=None):
    """Binding lifetime against the observer ``target`` (host, port), one fresh socket per
    delay: the `binding_lifetime.LifetimeResult`. ``on_update(result)`` runs whenever what
    is proven grows (a node adapts its keepalive as it goes)."""
    say = progress or (lambda text: None)
    names = [f"life{i}" for i in range(len(delays))]
    sockets = {}
    try:
        for name in names:
            sockets[name] = _open_socket()
        core = binding_lifetime.LifetimeProbe(target, names, delays)
        shown = [None]

        def after_pump():
            result = core.result()
            if (result.at_least, result.below) != shown[0]:
                shown[0] = (result.at_least, result.below)
                if on_update is not None:
                    on_update(result)
                if result.at_least is not None and not core.done:
                    say(f"netcheck: an idle mapping lived {result.at_least:g} s"
                        + (f", not {result.below:g} s" if result.below else "")
                        + "; still waiting")

        await _drive(core, sockets, after_pump)
        return core.result()
    finally:
        for sock in sockets.values():
            sock.close()


async def _drive(core, sockets, after_pump=None):
    """Run a sans-IO probe core (`NetCheck`, `LifetimeProbe`) over its named sockets until
    it is done: its datagrams out, theirs in, its timer."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    timer = None

    def pump():
        nonlocal timer
        for name, data, (host, port) in core.datagrams_to_send(loop.time()):
            sock = sockets[name]
            if sock.family == socket.AF_INET6 and ":" not in host:
                host = "::ffff:" + host
            try:
                sock.sendto(data, (host, port))
            except OSError:
                pass  # unreachable, no route for a family: that request goes unanswered
        if after_pump is not None:
            after_pump()
        if core.done:
            if not finished.done():
                finished.set_result(None)
            return
        if timer is not None:
            timer.cancel()
        at = core.get_timer()
        timer = loop.call_at(at, on_timer) if at is not None else None

    def on_timer():
        core.handle_timer(loop.time())
        pump()

    def readable(name):
        sock = sockets[name]
        for _ in range(64):
            try:
                data, addr = sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # an ICMP error on the socket
            core.datagram_received(name, data, plain_addr(addr[:2]), loop.time())
        pump()

    for name, sock in sockets.items():
        loop.add_reader(sock.fileno(), readable, name)
    try:
        core.start(loop.time())
        pump()
        await finished
    finally:
        if timer is not None:
            timer.cancel()
        for sock in sockets.values():
            loop.remove_reader(sock.fileno())


async def check(intermediates, *, timeout=netcheck.PROBE_TIMEOUT, progress=None,
                port_mapping=True, lifetime=None):
    """Run the checks against [(host, port)]; the `netcheck.Report`."""
    loop = asyncio.get_running_loop()
    say = progress or (lambda text: None)
    sockets = {name: _open_socket() for name in
               ["main", "filter", "hairpin", *(f"port{i}" for i in range(PORT_SAMPLES))]}
    try:
        families = {socket.AF_INET}
        if sockets["main"].family == socket.AF_INET6:
            families.add(socket.AF_INET6)
        resolved = []
        for host, port in intermediates:
            addrs = await _resolve(loop, host, port, families)
            if not addrs:
                raise NetcheckError(f"the intermediate {host!r} has no address this machine "
                                    "can reach")
            resolved.append((_fmt((host, port)), addrs))
        gateway = _gateway(resolved) if port_mapping else None
        if gateway is not None:
            sockets["gateway"] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets["gateway"].setblocking(False)
            sockets["gateway"].bind(("0.0.0.0", 0))
            say(f"netcheck: asking the gateway {gateway[0]} for NAT-PMP and PCP")
        local = {name: sock.getsockname()[:2] for name, sock in sockets.items()}
        core = netcheck.NetCheck(resolved, local, local_ips=_local_ips(), probe_timeout=timeout,
                                 gateway=gateway and gateway[0],
                                 gateway_client_ip=gateway and gateway[1])
        stage = [False]

        def after_pump():
            if not stage[0] and any(p.name.startswith("map ") for p in core.probes.values()):
                stage[0] = True
                say("netcheck: mapping and filtering tests against "
                    f"{_fmt(core.target)} and the observer at {_fmt(core.other)}")

        say(f"netcheck: asking {sum(len(a) for _, a in resolved)} address(es) of "
            f"{len(resolved)} intermediate(s)")
        await _drive(core, sockets, after_pump)
        report = core.report()
    finally:
        for sock in sockets.values():
            sock.close()
    if lifetime and core.target is not None:
        delays = (binding_lifetime.QUICK_DELAYS if lifetime == "quick"
                  else binding_lifetime.FULL_DELAYS)
        say(f"netcheck: binding lifetime: idle mappings of {len(delays)} sockets, up to "
            f"{max(delays)} s, answered late by {_fmt(core.target)} (about "
            f"{max(delays) + binding_lifetime.WARM_UP + 2:.0f} s at most)")
        result = await measure_lifetime(core.target, delays, progress=say)
        report.binding_lifetime = result.as_dict()
    return report


def _yes(value):
    return {True: "yes", False: "no", None: "unknown"}[value]


def lifetime_text(value):
    """A binding lifetime verdict (LifetimeResult.as_dict()) in words."""
    if value is None:
        return "not measured (--lifetime, --quick)"
    if value["supported"] is False:
        return "unknown (the intermediate does not hold answers: an older mahole?)"
    if value["at_least_s"] is None:
        return ("unknown (no answer)" if value["supported"] is None else
                f"under {value['below_s']:g} s")
    if value["below_s"] is None:
        return f"over {value['at_least_s']:g} s (nothing probed expired)"
    return f"{value['at_least_s']:g} s to {value['below_s']:g} s"


def format_report(report: netcheck.Report) -> str:
    """The report as `tailscale netcheck` prints its own: one fact a line."""
    rows = [("UDP", "true" if report.udp else "false"),
            ("IPv4", f"yes, {report.public_ipv4}" if report.public_ipv4 else "no"),
            ("IPv6", f"yes, {report.public_ipv6}" if report.public_ipv6 else "no"),
            ("Behind a NAT", _yes(report.nat)),
            ("Mapping", report.mapping or "unknown"),
            ("Filtering", report.filtering or "unknown"),
            ("Port allocation", (report.port_allocation or "unknown")
             + (f", step {report.port_step}" if report.port_step else "")),
            ("Hairpinning", _yes(report.hairpinning)),
            ("Alternate observer", "yes" if report.alternate_observer else
             "no (the intermediate has no --stun-alt-port)" if report.udp else "unknown")]
    mapping = report.port_mapping
    if mapping is None:
        rows.append(("Port mapping", "not asked"))
    else:
        offered = [name for name, key in (("PCP", "pcp"), ("NAT-PMP", "nat_pmp"))
                   if mapping[key]]
        rows.append(("Port mapping", (", ".join(offered) if offered else
                                      f"none (the gateway {mapping['gateway']} answered "
                                      "neither NAT-PMP nor PCP)")
                     + (f", external address {mapping['external_ipv4']}"
                        if mapping["external_ipv4"] else "")))
    rows.append(("Binding lifetime", lifetime_text(report.binding_lifetime)))
    lines = ["Report:"] + [f"\t* {name}: {value}" for name, value in rows]
    lines.append("\t* Intermediates:")
    for item in report.intermediates:
        rtt = f"{item['rtt_ms']:.1f}ms" if item["rtt_ms"] is not None else "no answer"
        lines.append(f"\t\t- {item['name']}: {rtt}")
    return "\n".join(lines) + "\n"


def run_netcheck(args) -> int:
    quiet = getattr(args, "quiet", 0) + getattr(args, "cmd_quiet", 0)

    def progress(text):
        if not quiet:
            print(text, file=sys.stderr, flush=True)

    try:
        report = asyncio.run(check(args.intermediate, timeout=args.timeout, progress=progress,
                                   port_mapping=not args.no_port_mapping,
                                   lifetime=getattr(args, "lifetime", None)))
    except NetcheckError as exc:
        print(f"mahole netcheck: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.write(json.dumps(report.as_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(format_report(report))
    if not report.udp:
        names = ", ".join(_fmt(a) for a in args.intermediate)
        print(f"mahole netcheck: error: no answer from {names} within {args.timeout:g} s "
              "(UDP blocked on the way, or the intermediate is down)", file=sys.stderr)
        return 1
    return 0
