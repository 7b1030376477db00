"""``python -m mahole status`` and ``python -m mahole ping``: ask a running node, locally.

    python -m mahole status [NAME] [--json] [--socket PATH]
    python -m mahole ping SERVICE [-c N] [-i SECONDS] [--timeout SECONDS] [--socket PATH]

Both talk to the local control socket every role opens (mahole.local_control), so they work
without ``--status``. With no ``--socket`` they look in the control directory: one running node
is used; with several, NAME (``alice`` or ``agent-alice``) picks one, else they are listed.

Wiring (in mahole/cli.py)::

    status_cli.add_parser(commands)   # adds "status" and "ping", defaults func=status_cli.run_*
    ...
    return args.func(args)

Exit status: 0; 1 when the node cannot be found or answers with an error (one line on stderr,
``mahole status: error: ...``); ``ping`` also exits 1 when no probe was answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time

from . import local_control
from .local_control import ControlError

__all__ = ["add_parser", "run_status", "run_ping", "main", "format_status"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be from 1 to 1000: {text!r}")
    return value


def seconds_between(low: float, high: float):
    """An argparse type: a number of seconds from `low` to `high`, or a one-line error."""
    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low:g} to {high:g} seconds: "
                                             f"{text!r}")
        return value
    return seconds


_seconds = seconds_between(0, 60)


def add_parser(subparsers) -> None:
    """Add the ``status`` and ``ping`` commands to an argparse subparsers action."""
    where = f"(default: the one running node in {local_control.control_dir()})"
    sub = subparsers.add_parser(
        "status", help="show a running node's state (intermediate, sessions, paths)",
        description="Show the state of a node running on this machine, through its local "
                    "control socket: role, name, the intermediate (connected, observed "
                    "address, RTT) and each session (service, peer, path, RTT, the RTT measured "
                    "on each route, bytes, since).")
    sub.add_argument("name", nargs="?", metavar="NAME",
                     help="which node when several run: alice, or agent-alice")
    sub.add_argument("--json", action="store_true", help="print the node's status as JSON")
    sub.add_argument("--socket", metavar="PATH", help=f"the node's control socket {where}")
    sub.set_defaults(func=run_status)

    sub = subparsers.add_parser(
        "ping", help="ping a service through the local agent, showing the path taken",
        description="Through the agent running on this machine: open (or reuse) the session "
                    "to SERVICE and send QUIC PINGs on it, one line a probe with its RTT and "
                    "path, ending with 'direct via HOST:PORT' or 'via relay'.")
    sub.add_argument("service", metavar="SERVICE", help="the service to ping")
    sub.add_argument("-c", "--count", type=_positive_int, default=4,
                     help="probes to send (default: 4)")
    sub.add_argument("-i", "--interval", type=_seconds, default=1.0,
                     help="seconds between probes (default: 1)")
    sub.add_argument("--timeout", type=_seconds, default=2.0,
                     help="seconds a probe waits for its answer (default: 2)")
    sub.add_argument("--socket", metavar="PATH", help=f"the agent's control socket {where}")
    sub.set_defaults(func=run_ping)


# --------------------------------------------------------------------------------------------
# Finding the node

def _label(path: str) -> str:
    base = os.path.basename(path)
    return base[:-len(local_control.SUFFIX)] if base.endswith(local_control.SUFFIX) else base


def _matches(label, name):
    """agent-alice (or a second copy's agent-alice.1234) is NAME alice or agent-alice."""
    stem = re.sub(r"\.\d+(-\d+)?$", "", label)
    return name in (label, stem) or stem.split("-", 1)[-1] == name


def find_socket(explicit=None, name=None, role=None) -> str:
    """The control socket to use (see the module docstring); ControlError otherwise."""
    if explicit:
        return explicit
    dirs = local_control.search_dirs()
    directory = " or ".join(dirs)
    found = [path for d in dirs for path in local_control.list_sockets(d)]
    if role is not None:
        found = [p for p in found if _label(p).startswith(f"{role}-")]
    if name:
        found = [p for p in found if _matches(_label(p), name)]
    what = f"{role} " if role else ""
    if not found:
        named = f" named {name}" if name else ""
        raise ControlError(f"no mahole {what}node{named} is running here (no live control "
                           f"socket in {directory}; --socket PATH names another)")
    if len(found) > 1:
        choose = "NAME or --socket PATH" if role is None else "--socket PATH"
        raise ControlError(f"{len(found)} {what}nodes run here: "
                           f"{', '.join(_label(p) for p in found)}; choose one with {choose} "
                           f"(in {directory})")
    return found[0]


async def _ask(path, message, timeout=10.0):
    replies = []
    async for reply in local_control.request(path, message, timeout=timeout):
        replies.append(reply)
    return replies


# --------------------------------------------------------------------------------------------
# status

def _size(n) -> str:
    n = n or 0
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _since(age, now) -> str:
    if age is None:
        return "-"
    age = max(0.0, age)
    clock = time.strftime("%H:%M:%S", time.localtime(now - age))
    if age < 60:
        span = f"{age:.0f}s"
    elif age < 3600:
        span = f"{age // 60:.0f}m{age % 60:02.0f}s"
    else:
        span = f"{age // 3600:.0f}h{age % 3600 // 60:02.0f}m"
    return f"{clock} ({span})"


def _table(header, rows) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in (header, *rows)]


def format_status(status: dict, now=None) -> str:
    """The readable form of a role's status() for ``mahole status``."""
    now = time.time() if now is None else now
    role = status.get("role", "?")
    lines = [f"{role} {status.get('name', '?')} (pid {status.get('pid', '?')})"]
    if role == "intermediate":
        nodes = status.get("nodes", {})
        sessions = status.get("sessions", {})
        lines.append(f"listening on {status.get('listen')}; {nodes.get('agents', 0)} agents, "
                     f"{nodes.get('connectors', 0)} connectors, "
                     f"{sessions.get('open', 0)} sessions")
        if nodes.get("list"):
            lines.append("")
            lines += _table(("NODE", "ROLE", "ADDRESS", "SERVICES"), [
                (n.get("name"), n.get("role"), n.get("addr"), ",".join(n.get("services", ())) or "-")
                for n in nodes["list"]])
        if sessions.get("list"):
            lines.append("")
            lines += _table(("SERVICE", "SESSION", "AGENT", "CONNECTOR", "PATH"), [
                (s.get("service"), s.get("session"), s.get("agent"), s.get("connector"),
                 s.get("path")) for s in sessions["list"]])
        return "\n".join(lines)
    inter = status.get("intermediate", {})
    if inter.get("connected"):
        state = (f"connected, observed address {inter.get('observed_addr') or '?'}, "
                 f"RTT {_ms(inter.get('rtt_ms'))}")
    else:
        error = inter.get("last_error")
        state = "not connected" + (f" ({error})" if error else "")
    lines.append(f"intermediate {inter.get('addr')}: {state}")
    if status.get("keepalive"):
        lines.append(_keepalive(status["keepalive"]))
    for forward in status.get("forwards", ()):
        lines.append(f"forward {forward.get('forward')} \u2192 {forward.get('service')}")
    failed = status.get("last_session_error")
    if failed:
        code = f" [{failed['code']}]" if failed.get("code") else ""
        lines.append(f"last failed session to {failed.get('service')}, "
                     f"{_since(failed.get('age_s'), now)}: {failed.get('error')}{code}")
    sessions = status.get("sessions", ())
    if not sessions:
        lines.append("no sessions")
        return "\n".join(lines)
    lines.append("")
    peer_key = "connector" if role == "agent" else "agent"
    rows = []
    for s in sessions:
        path = s.get("path", "?")
        if path == "direct" and s.get("direct_addr"):
            path = f"direct {s['direct_addr']}"
        routes = s.get("routes") or {}
        rows.append((s.get("service"), s.get("session"), s.get(peer_key), path,
                     _ms(s.get("rtt_ms")), _ms((routes.get("direct") or {}).get("rtt_ms")),
                     _ms((routes.get("relay") or {}).get("rtt_ms")), _mtu(s.get("mtu")),
                     _size(s.get("bytes_sent")), _size(s.get("bytes_received")),
                     _since(s.get("age_s"), now)))
    lines += _table(("SERVICE", "SESSION", "PEER", "PATH", "RTT", "DIRECT RTT", "RELAY RTT",
                     "MTU", "SENT", "RECEIVED", "SINCE"), rows)
    return "\n".join(lines)


def _keepalive(keepalive) -> str:
    """The keepalive of idle direct routes and the binding lifetime it comes from."""
    line = f"keepalive of idle direct routes {keepalive.get('direct_s'):g} s"
    lifetime = keepalive.get("binding_lifetime") or {}
    at_least, below = lifetime.get("at_least_s"), lifetime.get("below_s")
    if at_least is not None:
        proven = f"{at_least:g} s" + (f" to {below:g} s" if below else " or more")
        line += f" (binding lifetime {proven}{', measuring' if keepalive.get('measuring') else ''})"
    elif keepalive.get("measuring"):
        line += " (measuring the binding lifetime)"
    elif lifetime.get("supported") is False:
        line += " (the intermediate cannot measure the binding lifetime)"
    return line


def _mtu(routes) -> str:
    """The packet size of the route in use (path MTU discovery), '-' before it is known."""
    for route in routes or ():
        if route.get("in_use"):
            size = str(route.get("size"))
            return size if route.get("state") == "search complete" else f"{size}…"
    return "-"


def run_status(args) -> int:
    try:
        path = find_socket(args.socket, getattr(args, "name", None))
        replies = asyncio.run(_ask(path, {"cmd": "status"}))
        reply = replies[-1]
        if not reply.get("ok") or not isinstance(reply.get("status"), dict):
            raise ControlError(reply.get("error") or "the node sent no status")
    except ControlError as exc:
        print(f"mahole status: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply["status"], indent=2, sort_keys=True))
    else:
        print(format_status(reply["status"]))
    return 0


# --------------------------------------------------------------------------------------------
# ping

def run_ping(args) -> int:
    """One line a probe, then where the session goes, like ``tailscale ping``."""
    message = {"cmd": "ping", "service": args.service, "count": args.count,
               "interval": args.interval, "timeout": args.timeout}
    answered = 0

    async def go():
        nonlocal answered
        # Opening a session may take the agent's open timeout: wait for the first line longer.
        wait = max(30.0, args.timeout + args.interval + 5)
        async for reply in local_control.request(path, message, timeout=wait):
            if "probe" in reply:
                via = reply.get("path")
                where = f" {reply['addr']}" if reply.get("addr") else ""
                if reply.get("rtt_ms") is None:
                    print(f"no answer from {args.service} within {args.timeout:g} s "
                          f"(via {via}{where})", flush=True)
                else:
                    answered += 1
                    print(f"pong from {args.service} ({reply.get('session')}) via {via}{where} "
                          f"in {reply['rtt_ms']:.2f} ms", flush=True)
            elif not reply.get("ok"):
                raise ControlError(reply.get("error") or "ping failed")
            else:
                return reply
        raise ControlError("the agent ended the ping without a result")  # pragma: no cover

    try:
        path = find_socket(args.socket, role=None if args.socket else "agent")
        final = asyncio.run(go())
    except ControlError as exc:
        print(f"mahole ping: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if final.get("path") == "direct" and final.get("direct_addr"):
        print(f"{args.service}: direct via {final['direct_addr']}")
    elif final.get("path") == "relay":
        print(f"{args.service}: via relay {final.get('relay_addr') or ''}".rstrip())
    else:
        print(f"{args.service}: no route")
    return 0 if answered else 1


def main(argv=None) -> int:
    """Stand-alone entry point (``python -m mahole.status_cli …``), mainly for testing."""
    parser = argparse.ArgumentParser(prog="mahole")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
