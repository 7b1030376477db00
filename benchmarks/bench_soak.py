"""Soak: sessions that live for days. Bursts of traffic separated by silences longer than
the timeouts, on a direct and on a relayed session, for a long time; counts the sessions that
closed when they should not have, route switches and failovers, and each process's memory.

    python benchmarks/bench_soak.py [--quick] [--duration SECONDS] [--burst BYTES]

What runs. Separate processes on loopback, each in its own process group, all ended by PID
in `finally`: an echo server (this file, --serve-echo), `python -m mahole intermediate`
(127.0.0.1), one connector (binds 127.0.0.2) with two services `stream` and `fresh`, both
the echo server, and two agents, each with a forward to both services: `alice` (binds
127.0.0.3: her sessions go direct on loopback) and `bob` (`--relay-only`: his stay on the
intermediate's relay). Certificates from mahole.demo.issue_certificates (plus `bob`).

The workload, per agent (so per path), in cycles of one burst and one silence:

  stream  one TCP connection opened at the start and held open to the end; each burst
          echoes --burst bytes (default 1 MB) on it. The session must live through every
          silence: its open stream keeps it from being reaped as idle, and its keepalive
          PINGs (not traffic) keep the route, the NAT mappings, the peer's liveness and the
          end-to-end QUIC connection alive. Any close of a `stream` session is unexpected.
  fresh   a new TCP connection per burst (--burst bytes, then closed). In a silence longer
          than the session idle timeout the session is reaped with reason "idle": an
          *expected* close, counted apart; the next burst opens a new session (alice's on
          the direct path again). A `fresh` close for any other reason is unexpected.

The silences (what an "idle gap" exercises). Every silence is longer than every liveness
timeout — keepalive, failover, peer-dead-after, the intermediate's node-dead-after and the
nodes' control-dead-after — so nothing but keepalives keeps a quiet session, route or
control connection alive. Every third silence is long: past the session idle timeout (the
open `stream` sessions must stay, the closed `fresh` ones go) and past the end-to-end QUIC
idle timeout (30 s, fixed), which only the keepalive PINGs hold off.

  full run (--duration, default 30 min), default timeouts: silences 45, 45, 330 s (330 > the
      300 s session idle timeout), repeated.
  --quick (2 min), timeouts shortened by flags (session idle 3 s, peer dead 1 s, keepalive
      0.25 s, intermediate node-dead-after 1.5 s, probe 0.5 s): silences 33, 4, 4 s (33 > the
      30 s QUIC idle timeout; 4 > every shortened timeout), repeated.

Reported, per path: bursts done and failed, session ids seen per service, sessions ended
(expected or unexpected; a session counts once, whatever its agent and the connector each
said), route switches and failovers (the agents' /status, largest value seen per session,
summed: every new direct session switches once, relay -> direct, so on the direct path
"route switches" = sessions seen when nothing failed over), samples where a session was not on its path, median burst goodput; the
intermediate's punching counters and dead/replaced nodes; the agents' control reconnects;
VmRSS (/proc/PID/status) of every process after the first burst and after the last, and
their ratio (the baseline is the same process at the start of the run). Status is sampled
every second. JSON: benchmarks/results/soak.json (soak-quick.json for --quick). Exit status
1 if any session closed unexpectedly or a burst failed (target: 0 of each).
"""

import argparse
import asyncio
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
try:
    import mahole  # prefer the installed package
except ImportError:
    sys.path.insert(0, str(HERE.parent))
    import mahole

import _report  # noqa: E402
from _procs import HOST, Processes, free_port, status, wait_for  # noqa: E402
from mahole import _fast  # noqa: E402
from mahole.config import IntermediateConfig, NodeConfig  # noqa: E402

CONNECTOR_BIND = "127.0.0.2"
DIRECT_AGENT_BIND = "127.0.0.3"
E2E_QUIC_IDLE = NodeConfig.e2e_idle_timeout  # fixed (no flag): the end-to-end idle timeout
QUICK_NODE = {"session-idle-timeout": 3.0, "peer-dead-after": 1.0, "keepalive": 0.25,
              "failover-timeout": 0.5}
QUICK_INTERMEDIATE = {"node-dead-after": 1.5, "probe-timeout": 0.5}
AGENTS = {"direct": ("alice", ["--bind", f"{DIRECT_AGENT_BIND}:0"]),
          "relay": ("bob", ["--bind", f"{HOST}:0", "--relay-only"])}
SERVICES = ("stream", "fresh")


# --- the echo service ----------------------------------------------------------------------


def serve_echo():
    async def echo(reader, writer):
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except OSError:
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(echo, HOST, 0)
        print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# --- bursts --------------------------------------------------------------------------------


def echo_burst(sock, data, timeout):
    """Send data on sock while reading its echo; True if it all came back identical."""
    sock.setblocking(False)
    deadline = time.monotonic() + timeout
    sent, received = 0, bytearray()
    while len(received) < len(data):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"echo stalled after {len(received)} of {len(data)} bytes")
        writers = [sock] if sent < len(data) else []
        readable, writable, _ = select.select([sock], writers, [], left)
        if writable:
            try:
                sent += sock.send(data[sent:sent + (1 << 16)])
            except BlockingIOError:
                pass
        if readable:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise EOFError(f"connection closed after {len(received)} of {len(data)} bytes")
            received += chunk
    return bytes(received) == data


class Workload:
    """One agent's workload and what its /status said about it."""

    def __init__(self, name, agent, status_port, forwards):
        self.name, self.agent, self.status_port, self.forwards = name, agent, status_port, forwards
        self.stream = None
        self.bursts = 0
        self.failures = []  # (seconds into the run, service, error)
        self.rates = []  # MB/s of each burst
        self.sessions = {s: set() for s in SERVICES}  # session ids seen per service
        self.switches = {}  # session id -> largest route_switches seen
        self.failovers = {}  # session id -> largest failovers seen
        self.off_path = 0  # samples where a session was not on this path
        self.connects = 1

    def open_stream(self):
        self.stream = socket.create_connection((HOST, self.forwards["stream"]), timeout=30)

    def burst(self, data, started):
        for service in SERVICES:
            t0 = time.perf_counter()
            try:
                if service == "stream":
                    ok = echo_burst(self.stream, data, 60)
                else:
                    with socket.create_connection((HOST, self.forwards["fresh"]),
                                                  timeout=30) as sock:
                        ok = echo_burst(sock, data, 60)
                if not ok:
                    raise ValueError("the echo differs from what was sent")
                self.rates.append(len(data) / (time.perf_counter() - t0) / 1e6)
            except (OSError, EOFError, ValueError) as exc:
                self.failures.append((round(time.monotonic() - started, 1), service,
                                      repr(exc)))
                if service == "stream":  # reopen, so later bursts still measure something
                    try:
                        self.stream.close()
                        self.open_stream()
                    except OSError:
                        pass
        self.bursts += 1

    def sample(self, status):
        if not status:
            return
        self.connects = status["intermediate"]["connects"]
        for s in status["sessions"]:
            if s["service"] not in self.sessions:
                continue
            sid = s["session"]
            self.sessions[s["service"]].add(sid)
            self.switches[sid] = max(self.switches.get(sid, 0), s["route_switches"])
            self.failovers[sid] = max(self.failovers.get(sid, 0), s["failovers"])
            starting = s["path"] == "relay" and self.switches[sid] == 0
            if s["path"] != self.name and not starting:  # (a session opens on the relay)
                self.off_path += 1


# --- the run -------------------------------------------------------------------------------


def run(args, workdir):
    quick = args.quick
    duration = args.duration or (120.0 if quick else 1800.0)
    node_flags = [a for k, v in QUICK_NODE.items() for a in (f"--{k}", f"{v:g}")] if quick else []
    inter_flags = ([a for k, v in QUICK_INTERMEDIATE.items() for a in (f"--{k}", f"{v:g}")]
                   if quick else [])
    timeouts = {
        "session_idle_timeout": QUICK_NODE["session-idle-timeout"] if quick
        else NodeConfig.session_idle_timeout,
        "peer_dead_after": QUICK_NODE["peer-dead-after"] if quick else NodeConfig.peer_dead_after,
        "keepalive": QUICK_NODE["keepalive"] if quick else NodeConfig.direct_keepalive,
        "failover_timeout": QUICK_NODE["failover-timeout"] if quick
        else NodeConfig.failover_timeout,
        "node_dead_after": QUICK_INTERMEDIATE["node-dead-after"] if quick
        else IntermediateConfig.node_dead_after,
        "control_dead_after": NodeConfig.control_dead_after,
        "e2e_quic_idle_timeout": E2E_QUIC_IDLE,
    }
    liveness = max(v for k, v in timeouts.items()
                   if k not in ("session_idle_timeout", "e2e_quic_idle_timeout"))
    long_gap = max(timeouts["session_idle_timeout"], E2E_QUIC_IDLE) + (3 if quick else 30)
    short_gap = (max(liveness, timeouts["session_idle_timeout"]) + 1 if quick
                 else max(liveness, E2E_QUIC_IDLE) + 15)
    gaps = [long_gap, short_gap, short_gap] if quick else [short_gap, short_gap, long_gap]
    data = os.urandom(args.burst)

    certs = Path(workdir)
    from mahole import identity
    from mahole.demo import issue_certificates
    issue_certificates(certs)
    identity.issue(certs, "agent", "bob")

    procs = Processes(workdir)
    try:
        echo = procs.start("echo", [sys.executable, str(Path(__file__).resolve()),
                                    "--serve-echo"], stdout=subprocess.PIPE)
        if not select.select([echo.stdout], [], [], 10)[0]:
            raise RuntimeError(f"the echo server did not start: {procs.tail('echo')}")
        line = echo.stdout.readline().decode().split()
        echo_port = int(line[1])

        udp_port = free_port(socket.SOCK_DGRAM)
        status_ports = {}

        def role(name, role_name, cert, *extra):
            status_ports[name] = free_port()
            return procs.start(name, [sys.executable, "-m", "mahole", role_name,
                                      "--ca", str(certs / "ca.crt"),
                                      "--cert", str(certs / f"{cert}.crt"),
                                      "--key", str(certs / f"{cert}.key"),
                                      "--status", f"{HOST}:{status_ports[name]}", *extra])

        role("intermediate", "intermediate", "intermediate", "--listen", f"{HOST}:{udp_port}",
             "--allow", "alice=*", "--allow", "bob=*", *inter_flags)
        wait_for("intermediate", lambda: status(status_ports["intermediate"]), procs, 20)
        node = ["--intermediate", f"{HOST}:{udp_port}", *node_flags]
        role("connector", "connector", "connector1", "--bind", f"{CONNECTOR_BIND}:0", *node,
             *(a for s in SERVICES for a in ("--service", f"{s}=tcp:{HOST}:{echo_port}")))
        paths = {}
        for path, (cert, extra) in AGENTS.items():
            forwards = {s: free_port() for s in SERVICES}
            name = f"agent-{path}"
            role(name, "agent", cert, *extra, *node,
                 *(a for s in SERVICES for a in ("--forward", f"tcp:{HOST}:{forwards[s]}={s}")))
            paths[path] = Workload(path, name, None, forwards)
        for name in ("connector", *(p.agent for p in paths.values())):
            wait_for(name, lambda n=name: (status(status_ports[n]) or {}).get(
                "intermediate", {}).get("connected"), procs, 20)
        for p in paths.values():
            p.status_port = status_ports[p.agent]

        closed = {}  # (node, session id) -> record (closed_sessions rolls over: keep all)

        def sample():
            procs.check()
            for name in ("connector", *(p.agent for p in paths.values())):
                answer = status(status_ports[name])
                for c in (answer or {}).get("closed_sessions", []):
                    closed.setdefault((name, c["session"]), {**c, "node": name})
                for p in paths.values():
                    if p.agent == name:
                        p.sample(answer)

        started = time.monotonic()
        for p in paths.values():
            p.open_stream()
            p.burst(data, started)
        # The direct session must be direct before the soak starts.
        wait_for("alice's sessions on the direct path", lambda: all(
            s["path"] == "direct" for s in (status(status_ports["agent-direct"]) or {}).get(
                "sessions", [{"path": None}])), procs, 15)
        rss_start = procs.rss_kb()
        end = started + duration
        cycle = 0
        print(f"soak: {duration:g} s, silences {', '.join(f'{g:g}' for g in gaps)} s, "
              f"bursts of {len(data)} bytes", flush=True)
        while time.monotonic() < end:
            gap_end = min(end, time.monotonic() + gaps[cycle % len(gaps)])
            while time.monotonic() < gap_end:
                sample()
                time.sleep(min(1.0, max(0.0, gap_end - time.monotonic())))  # sampling pace
            cycle += 1
            for p in paths.values():
                p.burst(data, started)
            sample()
            if args.verbose:
                print(f"  {time.monotonic() - started:7.1f} s  cycle {cycle}  "
                      f"sessions ended {len({sid for _node, sid in closed})}", flush=True)
        rss_end = procs.rss_kb()
        inter = status(status_ports["intermediate"]) or {}
        elapsed = time.monotonic() - started
    finally:
        for p in locals().get("paths", {}).values():
            if p.stream is not None:
                p.stream.close()
        procs.stop_all()

    # --- what it says ----------------------------------------------------------------------
    def by_path(node_name):
        return next((p.name for p in paths.values() if p.agent == node_name), None)

    sessions_path = {sid: p.name for p in paths.values() for ids in p.sessions.values()
                     for sid in ids}
    ended = {}  # session id -> what its agent and the connector said (both end it)
    for (node_name, sid), c in sorted(closed.items(), key=lambda kv: kv[1]["closed_at"]):
        entry = ended.setdefault(sid, {"session": sid, "service": c["service"],
                                       "path": sessions_path.get(sid), "reasons": {}})
        entry["path"] = entry["path"] or by_path(node_name)
        entry["reasons"][node_name] = c["reason"]
    expected, unexpected = [], []
    for entry in ended.values():
        idle = all("idle" in reason for reason in entry["reasons"].values())
        (expected if entry["service"] == "fresh" and idle else unexpected).append(entry)
    results = {"duration_s": round(elapsed, 1), "quick": quick, "compiled": _fast.COMPILED,
               "burst_bytes": len(data), "silences_s": gaps, "timeouts_s": timeouts,
               "cycles": cycle, "paths": {}, "rss_kb": {}, "unexpected_closes": unexpected,
               "expected_closes": len(expected)}
    rows = []
    for p in paths.values():
        unexp = [c for c in unexpected if c["path"] == p.name]
        exp = [c for c in expected if c["path"] == p.name]
        results["paths"][p.name] = {
            "bursts": p.bursts, "burst_failures": p.failures,
            "stream_sessions": len(p.sessions["stream"]),
            "fresh_sessions": len(p.sessions["fresh"]),
            "closed_unexpectedly": len(unexp), "closed_idle_as_expected": len(exp),
            "route_switches": sum(p.switches.values()),
            "failovers": sum(p.failovers.values()), "off_path_samples": p.off_path,
            "control_connects": p.connects,
            "median_burst_mb_per_s": _report.median(p.rates) if p.rates else None,
        }
        r = results["paths"][p.name]
        rows.append([p.name, p.bursts, len(p.failures), r["stream_sessions"],
                     r["fresh_sessions"], len(unexp), len(exp), r["route_switches"],
                     r["failovers"], p.off_path, p.connects,
                     r["median_burst_mb_per_s"] or "-"])
    rss_rows = []
    for name in rss_start:
        a, b = rss_start[name], rss_end.get(name)
        results["rss_kb"][name] = {"start": a, "end": b, "ratio": b / a if b else None}
        rss_rows.append([name, a / 1024, b / 1024 if b else "-",
                         round(b / a, 3) if b else "-"])
    results["intermediate"] = {
        "punching": inter.get("punching"),
        **{k: inter.get("counters", {}).get(k) for k in (
            "nodes_dead", "nodes_replaced", "sessions_opened", "sessions_closed")}}

    print(f"\nsoak on loopback, {elapsed:.0f} s, {cycle} cycles "
          f"(compiled hot path: {_fast.COMPILED}); timeouts "
          + ", ".join(f"{k} {v:g}" for k, v in timeouts.items()))
    print(_report.table(["path", "bursts", "failed", "stream sessions", "fresh sessions",
                         "closed unexpectedly", "closed idle (expected)", "route switches",
                         "failovers", "off-path samples", "control connects",
                         "median burst MB/s"], rows))
    print()
    print(_report.table(["process", "RSS start MiB", "RSS end MiB", "end / start"], rss_rows))
    print(f"\nintermediate: {results['intermediate']}")
    for c in unexpected:
        print(f"UNEXPECTED: {c}")
    for p in paths.values():
        for f in p.failures:
            print(f"BURST FAILED ({p.name}): {f}")
    path = _report.write("soak" + ("-quick" if quick else ""), results)
    print(f"wrote {path}")
    ok = not unexpected and not any(p.failures for p in paths.values())
    return 0 if ok else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 minutes with timeouts shortened by flags")
    parser.add_argument("--duration", type=float,
                        help="seconds to run (default 1800, quick 120)")
    parser.add_argument("--burst", type=int, default=1 << 20,
                        help="bytes echoed per connection per burst (default 1 MiB)")
    parser.add_argument("--verbose", action="store_true", help="a line per cycle")
    parser.add_argument("--allow-twin", action="store_true",
                        help="run even if the compiled hot path is missing")
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_echo:
        serve_echo()
        return 0
    if not _fast.COMPILED and not args.allow_twin:
        print("bench_soak: the compiled hot path is not built", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mahole-soak-") as workdir:
        try:
            return run(args, workdir)
        except RuntimeError as exc:
            print(f"bench_soak: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
