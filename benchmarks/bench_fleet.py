"""A fleet under load: three intermediates sharing a Redis, thousands of registered nodes.

Light nodes (benchmarks/_fleet_clients.py: real mTLS QUIC control connections, a few processes)
register in steps: connectors at relay3, agents at relay1 and relay2, so every session crosses
two intermediates. At each step it reports the registration rate, the RSS per registered
node at each intermediate, and the setup latency of sessions between intermediates
(OpenSession -> SessionOpened at the agent) while sessions open at 1,000 a minute; then that
every node is still registered (held).

    python benchmarks/bench_fleet.py            # steps 1,000 / 2,500 / 5,000 / 10,000 nodes
    python benchmarks/bench_fleet.py --quick    # 150 / 300 nodes, a few sessions

Needs redis-server (Debian package redis-server). Intermediates run with --node-dead-after 60
and clients send a QUIC PING every 10 s, so keepalive traffic does not dominate.
"""

import argparse
import json
import math
import shutil
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import mahole  # noqa: F401 - is it installed?
except ImportError:  # running from a source checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _procs
import _report
from mahole import identity

HERE = Path(__file__).resolve().parent
NODES_PER_PROCESS = 2500
SESSION_RATE = 1000 / 60  # sessions a second (1,000 a minute)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small steps (tests)")
    parser.add_argument("--steps", default=None, help="node counts, e.g. 1000,2500,5000")
    parser.add_argument("--sessions", type=int, default=None,
                        help="sessions opened at each step (default 300; quick 20)")
    parser.add_argument("--allow-twin", action="store_true",
                        help="accepted for symmetry with the other benchmarks")
    args = parser.parse_args(argv)
    if not shutil.which("redis-server"):
        print("bench_fleet: redis-server is not installed (Debian package redis-server)",
              file=sys.stderr)
        return 2
    steps = ([int(s) for s in args.steps.split(",")] if args.steps else
             [150, 300] if args.quick else [1000, 2500, 5000, 10000])
    sessions = args.sessions or (20 if args.quick else 300)
    with tempfile.TemporaryDirectory(prefix="mahole-fleet-") as tmp:
        rows = run(Path(tmp), steps, sessions)
    print(_report.table(
        ["nodes", "registered/s", "RSS/node kB (r1, r2, r3)", "session p50 ms", "p99 ms",
         "errors", "held"],
        [[r["nodes"], r["registrations_per_s"],
          ", ".join(f"{v:.1f}" for v in r["rss_per_node_kb"].values()),
          r["session_p50_ms"], r["session_p99_ms"], r["session_errors"], r["held"]]
         for r in rows]))
    path = _report.write("fleet" + ("-quick" if args.quick else ""),
                         {"steps": rows, "sessions_per_step": sessions,
                          "session_rate_per_min": 1000})
    print(f"wrote {path}")
    return 0


def run(tmp, steps, sessions):
    certs = tmp / "certs"
    top = steps[-1]
    connectors, agents = split(top)
    print(f"issuing {top:,} node certificates ...", flush=True)
    identity.init_ca(certs)
    for n in (1, 2, 3):
        identity.issue(certs, "intermediate", f"relay{n}", hosts=["127.0.0.1"])
    for i in range(connectors):
        identity.issue(certs, "connector", f"c{i}")
    for i in range(agents):
        identity.issue(certs, "agent", f"a{i}")
    procs = _procs.Processes(tmp)
    try:
        redis_port = _procs.free_port()
        procs.start("redis", ["redis-server", "--port", str(redis_port), "--bind",
                              "127.0.0.1", "--save", "", "--appendonly", "no", "--dir",
                              str(tmp)])
        relays = {}
        for n in (1, 2, 3):
            port, status_port = _procs.free_port(socket.SOCK_DGRAM), _procs.free_port()
            procs.start(f"relay{n}", [
                sys.executable, "-m", "mahole", "intermediate", "--listen",
                f"127.0.0.1:{port}", "--registry", f"redis://127.0.0.1:{redis_port}/0",
                "--allow", "*=*", "--node-dead-after", "60", "--max-half-open", "4096",
                "--max-half-open-per-source", "4096", "--retry-threshold", "1000000",
                "--sessions-per-minute", "100000", "--signaling-rate", "1000",
                "--status", f"127.0.0.1:{status_port}", "--control-socket", "",
                "--ca", str(certs / "ca.crt"), "--cert", str(certs / f"relay{n}.crt"),
                "--key", str(certs / f"relay{n}.key"), "-q"])
            relays[f"relay{n}"] = (f"127.0.0.1:{port}", status_port)
        for name, (_addr, status_port) in relays.items():
            _procs.wait_for(f"{name} in the fleet",
                            lambda p=status_port: ((_procs.status(p) or {}).get("fleet") or {})
                            .get("connected"), procs, 30)
        baseline = procs.rss_kb()
        rows, clients, have_c, have_a = [], [], 0, 0
        for target in steps:
            want_c, want_a = split(target)
            started = time.perf_counter()
            added = []
            added += spawn(procs, certs, "connector", "c", have_c, want_c - have_c,
                           relays["relay3"][0], clients)
            added += spawn(procs, certs, "agent", "a", have_a, want_a - have_a,
                           f"{relays['relay1'][0]},{relays['relay2'][0]}", clients)
            reports = [json.loads(read_line(proc, procs, 900)) for proc in added]
            elapsed = time.perf_counter() - started
            failed = sum(r["failed"] for r in reports)
            have_c, have_a = want_c, want_a
            registered = {name: count_nodes(port) for name, (_a, port) in relays.items()}
            rss = procs.rss_kb()
            drops = procs.udp_drops()
            rss_per_node = {name: (rss[name] - baseline[name]) / max(1, registered[name])
                            for name in relays}
            latencies, errors = open_sessions(procs, clients, sessions)
            held = {name: count_nodes(port) for name, (_a, port) in relays.items()}
            row = {
                "nodes": target, "failed_registrations": failed,
                "registrations_per_s": (target - (rows[-1]["nodes"] if rows else 0)) / elapsed,
                "registered": registered, "rss_kb": {n: rss[n] for n in relays},
                "rss_per_node_kb": rss_per_node,
                "session_p50_ms": percentile(latencies, 50),
                "session_p99_ms": percentile(latencies, 99),
                "sessions": len(latencies), "session_errors": errors,
                "held": sum(held.values()) == target and failed == 0,
                "held_nodes": held,
                "udp_receive_drops": {n: drops.get(n) for n in relays},
            }
            rows.append(row)
            print(f"{target:,} nodes: {row['registrations_per_s']:.0f} registered/s, "
                  f"RSS/node {', '.join(f'{v:.1f}' for v in rss_per_node.values())} kB, "
                  f"session p50 {row['session_p50_ms']:.1f} ms p99 "
                  f"{row['session_p99_ms']:.1f} ms, held {row['held']}", flush=True)
        for proc in clients:
            try:
                proc.stdin.write(b'{"quit": true}\n')
                proc.stdin.flush()
            except OSError:
                pass
        return rows
    finally:
        procs.stop_all()


def split(nodes):
    """(connectors, agents): a third connectors."""
    connectors = max(1, nodes // 3)
    return connectors, nodes - connectors


def spawn(procs, certs, role, prefix, start, count, intermediates, clients):
    out = []
    for first in range(start, start + count, NODES_PER_PROCESS):
        n = min(NODES_PER_PROCESS, start + count - first)
        proc = procs.start(f"{role}s-{first}", [
            sys.executable, str(HERE / "_fleet_clients.py"), "--certs", str(certs),
            "--intermediates", intermediates, "--role", role, "--prefix", prefix,
            "--start", str(first), "--count", str(n)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        proc.role = role
        out.append(proc)
        clients.append(proc)
    return out


def read_line(proc, procs, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if line:
                return line
        procs.check()
    raise RuntimeError(f"{proc.bench_name}: no answer within {timeout} s")


def open_sessions(procs, clients, count):
    """Sessions opened by the first agents' process at 1,000 a minute; their latencies."""
    agents = next(p for p in clients if p.role == "agent")
    agents.stdin.write((json.dumps({"open": count, "service": "svc",
                                    "interval": 1 / SESSION_RATE}) + "\n").encode())
    agents.stdin.flush()
    answer = json.loads(read_line(agents, procs, count / SESSION_RATE * 3 + 60))
    return answer["latencies_ms"], answer["errors"]


def count_nodes(status_port):
    status = _procs.status(status_port, timeout=10.0) or {}
    nodes = status.get("nodes") or {}
    return nodes.get("agents", 0) + nodes.get("connectors", 0)


def percentile(values, p):
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


if __name__ == "__main__":
    sys.exit(main())
