"""Many sessions, many streams: one agent with 100 sessions (10 connectors x 10 services)
carrying 1,000 concurrent TCP streams, against one stream through one session in the same run.

    python benchmarks/bench_many.py [--quick] [--connectors C] [--services S] [--streams N]
                                    [--bytes B] [--single-bytes B] [--runs R] [--rounds K]
                                    [--path relay|direct|both] [--intermediate-args ARGS]
                                    [--agent-args ARGS] [--profile DIR]

How it measures. Everything runs on 127.0.0.1 in separate processes, each in its own process
group, all ended by PID in `finally`; every run starts fresh processes.

  roles    `python -m mahole intermediate|connector|agent`, as bench_tunnel.py starts them:
           one intermediate (`--allow alice=*`), C connectors (certificates conn0..conn{C-1})
           each offering S services `cIsJ`, all pointing at one sink process, and one agent
           with C*S forwards, one per service. A session is one (agent, service) pair (the
           intermediate picks the connector offering the service), so the agent opens C*S
           sessions. `--path relay` runs the nodes with --relay-only; `direct` lets them
           punch, and the bench waits until every session reports the direct path.
  sink     a TCP server (this file, --serve-sink) answering "+" to a connection's first byte,
           then counting bytes until EOF and answering the count.
  clients  this process, asyncio: each stream connects to a forward (stream k to forward
           k mod C*S), sends one byte and waits for the "+": the stream is then open from
           end to end (agent, QUIC stream, connector, sink). Once all N are open, all send
           their remaining B-1 bytes at once, half-close and read the count.

Reported, per run, then the median over runs:
  - time to open all sessions: one small transfer per forward, all at once, until every one
    has its count (and, direct, until every session is on the direct path);
  - single stream: B1 bytes through one session alone (before the many streams), MB/s;
  - aggregate goodput: N*B bytes / (the last count - the release), MB/s; per stream B /
    (its count - the release): min, p50, max and Jain's fairness index (sum x)^2 / (n sum x^2)
    over streams (1.0: every stream moved at the same rate);
  - RSS (VmRSS, /proc) of the agent and of each connector: idle (registered, no session),
    with every session open, with every stream open (before the bulk data), the peak while
    the data moves (sampled every 0.1 s), and 1 s after the last count (with --rounds K,
    after each of K rounds of the N streams on the same sessions); RSS per session =
    (sessions - idle) / sessions, per stream = (streams open - sessions) / streams;
  - CPU busy while the streams move: CPU seconds (user+system, /proc) / wall seconds of the
    agent, the intermediate, the connectors together, the sink and this process;
  - the agent's send budget at the end (JSON only, from /status): its limit, the most bytes
    it held charged at once, how often streams waited and the longest wait;
  - errors: streams that failed, miscounted or timed out, plus the agent's tcp_refused and
    session_errors counters: all must be 0 (exit status 1 otherwise).

Opening 100 sessions at once takes up to three control messages each (OpenSession,
CandidateOffer, PunchResult); the intermediate's signaling burst (400) holds an agent's whole
`--sessions-per-minute` (120) of them. (With the burst of 100 it once had, 8-21 of 100 punched
sessions were dropped and failed after the agent's 10 s open timeout.)

--profile DIR runs the agent, the connectors and the intermediate under cProfile (`python -m
cProfile -o DIR/PATH-RUN-ROLE.prof -m mahole ...`), written when they stop (SIGTERM); the
whole life of each process, start-up included. Profiled numbers are slower.

MB/s is 10^6 bytes/s. JSON: benchmarks/results/many.json (many-quick.json for --quick).
Budget: about a minute per run and path on an idle 2-core machine (--quick: 20 s).
"""

import argparse
import asyncio
import os
import resource
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
try:
    from mahole import _fast  # prefer the installed package
except ImportError:
    sys.path.insert(0, str(HERE.parent))
    from mahole import _fast

import _report  # noqa: E402
from _procs import HOST, Processes, free_port, status, wait_for  # noqa: E402

MB = 1e6
POLL = 0.05  # s between readiness checks


# --- the sink service ----------------------------------------------------------------------


class _Sink(asyncio.BufferedProtocol):
    """Answers "+" to the first byte, counts bytes until EOF, then answers the count."""

    def __init__(self):
        self.buffer = bytearray(1 << 16)
        self.count = 0
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        return self.buffer

    def buffer_updated(self, nbytes):
        if not self.count:
            self.transport.write(b"+")
        self.count += nbytes

    def eof_received(self):
        self.transport.write(str(self.count).encode("ascii"))
        self.transport.close()
        return True


def serve_sink():
    async def main():
        server = await asyncio.get_running_loop().create_server(_Sink, HOST, 0, backlog=4096)
        print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def raise_fd_limit(needed):
    """Raise RLIMIT_NOFILE towards the hard limit (children inherit it); the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    return soft


def jain(values):
    """Jain's fairness index: 1.0 when all are equal, 1/n when one takes everything."""
    if not values:
        return None
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


# --- clients -------------------------------------------------------------------------------


async def _open_stream(addr, data, timeout):
    """Connect, send the first byte, wait for the sink's "+": (reader, writer)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr), timeout)
    try:
        writer.write(data[:1])
        ack = await asyncio.wait_for(reader.readexactly(1), timeout)
    except BaseException:
        writer.transport.abort()
        raise
    if ack != b"+":
        writer.transport.abort()
        raise RuntimeError(f"the sink answered {ack!r}")
    return reader, writer


async def _finish_stream(reader, writer, data, release):
    """Send the rest, half-close, read the count: seconds since `release`, count."""
    try:
        writer.write(memoryview(data)[1:])
        await writer.drain()
        writer.write_eof()
        reply = await reader.read()
    finally:
        writer.transport.abort()
    return time.perf_counter() - release, int(reply) if reply else None


async def open_sessions(forwards, timeout):
    """One tiny transfer per forward, all at once: (seconds until every count, errors)."""
    start = time.perf_counter()

    async def one(addr):
        reader, writer = await _open_stream(addr, b"x", timeout)
        _, count = await _finish_stream(reader, writer, b"x", start)
        if count != 1:
            raise RuntimeError(f"count {count}")

    results = await asyncio.gather(*(one(a) for a in forwards), return_exceptions=True)
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    return time.perf_counter() - start, errors


async def single_stream(addr, data, timeout):
    reader, writer = await _open_stream(addr, data, timeout)
    release = time.perf_counter()
    elapsed, count = await asyncio.wait_for(_finish_stream(reader, writer, data, release),
                                            timeout)
    if count != len(data):
        raise RuntimeError(f"single stream: the sink counted {count} of {len(data)} bytes")
    return len(data) / elapsed / MB


async def many_streams(forwards, n, data, procs, timeout):
    """n streams over the forwards: open all, measure RSS, then move the data at once."""
    started = time.perf_counter()
    opened = await asyncio.gather(
        *(_open_stream(forwards[k % len(forwards)], data, timeout) for k in range(n)),
        return_exceptions=True)
    open_s = time.perf_counter() - started
    errors = [repr(r) for r in opened if isinstance(r, BaseException)]
    streams = [r for r in opened if not isinstance(r, BaseException)]
    rss_open = procs.rss_kb()
    peak = dict(rss_open)
    done = asyncio.Event()

    async def sample():
        while not done.is_set():
            for name, kb in procs.rss_kb().items():
                peak[name] = max(peak.get(name, 0), kb)
            try:
                await asyncio.wait_for(done.wait(), 0.1)
            except asyncio.TimeoutError:
                pass

    sampler = asyncio.get_running_loop().create_task(sample())
    cpu_before = procs.cpu_seconds()
    release = time.perf_counter()
    results = await asyncio.gather(
        *(asyncio.wait_for(_finish_stream(r, w, data, release), timeout) for r, w in streams),
        return_exceptions=True)
    wall = time.perf_counter() - release
    cpu_after = procs.cpu_seconds()
    done.set()
    await sampler
    seconds = []
    for result in results:
        if isinstance(result, BaseException):
            errors.append(repr(result))
        elif result[1] != len(data):
            errors.append(f"the sink counted {result[1]} of {len(data)} bytes")
        else:
            seconds.append(result[0])
    cpu = {name: cpu_after[name] - cpu_before[name] for name in cpu_after if name in cpu_before}
    return {"open_s": open_s, "wall_s": wall, "seconds": seconds, "errors": errors,
            "rss_open": rss_open, "rss_peak": peak, "cpu_s": cpu}


# --- one run -------------------------------------------------------------------------------


def one_run(args, path, certs, tmp, run):
    procs = Processes(tmp / f"{path}-{run}")
    procs.logdir.mkdir(parents=True, exist_ok=True)
    n_sessions = args.connectors * args.services
    timeout = 60.0
    try:
        sink = procs.start("sink", [sys.executable, str(Path(__file__).resolve()),
                                    "--serve-sink"], stdout=subprocess.PIPE)
        ready = select.select([sink.stdout], [], [], 10)[0]
        line = sink.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("ready "):
            raise RuntimeError(f"sink did not start: {line!r} {procs.tail('sink')}")
        sink_port = int(line.split()[1])
        udp_port = free_port(socket.SOCK_DGRAM)
        ports = {}

        def role(name, kind, cert, *extra):
            ports[name] = free_port()
            profile = ([] if args.profile is None else
                       ["-m", "cProfile", "-o", str(args.profile / f"{path}-{run}-{name}.prof")])
            return procs.start(name, [
                sys.executable, *profile, "-m", "mahole", kind, "--ca", str(certs / "ca.crt"),
                "--cert", str(certs / f"{cert}.crt"), "--key", str(certs / f"{cert}.key"),
                "--status", f"{HOST}:{ports[name]}", *extra])

        node = ["--intermediate", f"{HOST}:{udp_port}", "--intermediate-name", HOST,
                "--bind", f"{HOST}:0", *(["--relay-only"] if path == "relay" else [])]
        role("intermediate", "intermediate", "intermediate", "--listen", f"{HOST}:{udp_port}",
             "--allow", "alice=*", *args.intermediate_args)
        wait_for("intermediate", lambda: status(ports["intermediate"]), procs, 20)
        services = []
        connectors = []
        for i in range(args.connectors):
            names = [f"c{i}s{j}" for j in range(args.services)]
            services += names
            connectors.append(f"connector{i}")
            role(f"connector{i}", "connector", f"conn{i}", *node,
                 *(a for s in names for a in ("--service", f"{s}=tcp:{HOST}:{sink_port}")))
        role("agent", "agent", "alice", *node, *args.agent_args,
             *(a for s in services for a in ("--forward", f"tcp:{HOST}:0={s}")))
        for name in ["agent", *connectors]:
            wait_for(name, lambda n=name: (status(ports[n], timeout=10) or {}).get(
                "intermediate", {}).get("connected"), procs, 40)
        agent = status(ports["agent"], timeout=10)
        by_service = {f["service"]: f["forward"] for f in agent["forwards"]}
        forwards = [(HOST, int(by_service[s].rsplit(":", 1)[1])) for s in services]
        rss_idle = procs.rss_kb()

        open_s, errors = asyncio.run(open_sessions(forwards, timeout))
        if errors:
            inter = (status(ports["intermediate"], timeout=10) or {}).get("counters", {})
            ignored = {k: v for k, v in inter.items() if isinstance(v, int) and v}
            raise RuntimeError(f"opening sessions: {len(errors)} of {n_sessions} failed "
                               f"(first: {errors[0]}); intermediate: {ignored}")

        def paths():
            st = status(ports["agent"], timeout=10) or {}
            return [s["path"] for s in st.get("sessions", [])]

        to_path_s = None
        if path == "direct":
            begun = time.monotonic()
            wait_for("every session direct", lambda: paths().count("direct") == n_sessions,
                     procs, 30, interval=0.2)
            to_path_s = open_s + time.monotonic() - begun
        got = paths()
        if len(got) != n_sessions or got.count(path) != n_sessions:
            raise RuntimeError(f"expected {n_sessions} sessions on {path}, got "
                               f"{len(got)}: {sorted(set(got))}")
        rss_sessions = procs.rss_kb()

        single = asyncio.run(single_stream(forwards[0], os.urandom(args.single_bytes), timeout))
        data = os.urandom(args.bytes)
        many = asyncio.run(many_streams(forwards, args.streams, data, procs, timeout))
        # Streams end asynchronously after the last count (and status does not list open
        # streams): "after" is RSS one second later, a measurement, not a readiness wait.
        time.sleep(1.0)
        rss_after = procs.rss_kb()
        # More rounds of the same streams tell a leak (RSS after each round keeps growing)
        # from memory the allocator keeps for reuse (flat after the first round).
        later = []
        for _ in range(args.rounds - 1):
            again = asyncio.run(many_streams(forwards, args.streams, data, procs, timeout))
            time.sleep(1.0)
            later.append({"errors": len(again["errors"]),
                          "aggregate_mb_per_s": round(args.bytes * len(again["seconds"])
                                                      / again["wall_s"] / MB, 2),
                          "agent_rss_kb_peak": again["rss_peak"].get("agent"),
                          "agent_rss_kb_after": procs.rss_kb().get("agent")})
            many["errors"] += again["errors"]
        agent = status(ports["agent"], timeout=10) or {}
        counters = agent.get("counters", {})
        send_budget = agent.get("send_budget")
        errors = list(many["errors"])
        for key in ("tcp_refused", "session_errors"):
            if counters.get(key):
                errors.append(f"agent {key}: {counters[key]}")
        procs.check()
    finally:
        procs.stop_all()

    per_stream = [args.bytes / s / MB for s in many["seconds"]]
    moved = args.bytes * len(many["seconds"])

    def rss(stage, name):
        return stage.get(name)

    def mean_connectors(stage):
        values = [stage[c] for c in connectors if c in stage]
        return statistics.mean(values) if values else None

    stages = {"idle": rss_idle, "sessions": rss_sessions, "streams_open": many["rss_open"],
              "peak": many["rss_peak"], "after": rss_after}
    agent_rss = {k: rss(v, "agent") for k, v in stages.items()}
    conn_rss = {k: mean_connectors(v) for k, v in stages.items()}
    per_conn_sessions = args.services
    per_conn_streams = args.streams / args.connectors
    return {
        "path": path,
        "sessions": n_sessions,
        "streams": args.streams,
        "open_sessions_s": round(open_s, 3),
        "to_path_s": round(to_path_s, 3) if to_path_s is not None else None,
        "open_streams_s": round(many["open_s"], 3),
        "single_mb_per_s": round(single, 2),
        "aggregate_mb_per_s": round(moved / many["wall_s"] / MB, 2) if moved else 0.0,
        "wall_s": round(many["wall_s"], 3),
        "per_stream_mb_per_s": {
            "min": round(min(per_stream), 3) if per_stream else None,
            "p50": round(_report.percentile(per_stream, 0.5), 3) if per_stream else None,
            "max": round(max(per_stream), 3) if per_stream else None},
        "jain": round(jain(per_stream), 4) if per_stream else None,
        "agent_rss_kb": agent_rss,
        "connector_rss_kb_mean": {k: round(v) if v else v for k, v in conn_rss.items()},
        "agent_kb_per_session": round((agent_rss["sessions"] - agent_rss["idle"])
                                      / n_sessions, 1),
        "agent_kb_per_stream": round((agent_rss["streams_open"] - agent_rss["sessions"])
                                     / args.streams, 1),
        "connector_kb_per_session": round((conn_rss["sessions"] - conn_rss["idle"])
                                          / per_conn_sessions, 1),
        "connector_kb_per_stream": round((conn_rss["streams_open"] - conn_rss["sessions"])
                                         / per_conn_streams, 1),
        "cpu_busy": {  # CPU seconds / wall seconds of the many streams (1.0: one core)
            "agent": _busy(many, ["agent"]), "intermediate": _busy(many, ["intermediate"]),
            "connectors": _busy(many, connectors), "sink": _busy(many, ["sink"]),
            "clients": _busy(many, ["bench (client)"])},
        "agent_send_budget": send_budget,  # limit, peak, waits, longest wait (/status)
        "errors": len(errors),
        "error_samples": errors[:5],
        "later_rounds": later,
    }


def _busy(many, names):
    used = sum(many["cpu_s"].get(n, 0.0) for n in names)
    return round(used / many["wall_s"], 2) if many["wall_s"] else None


# --- main ----------------------------------------------------------------------------------

SUMMARY = [  # (label, key in a run, nested key or None)
    ("time to open all sessions, s", "open_sessions_s", None),
    ("time until every session is direct, s", "to_path_s", None),
    ("time to open all streams, s", "open_streams_s", None),
    ("single stream, MB/s", "single_mb_per_s", None),
    ("aggregate, MB/s", "aggregate_mb_per_s", None),
    ("per stream min, MB/s", "per_stream_mb_per_s", "min"),
    ("per stream p50, MB/s", "per_stream_mb_per_s", "p50"),
    ("per stream max, MB/s", "per_stream_mb_per_s", "max"),
    ("Jain's index", "jain", None),
    ("agent RSS idle, MB", "agent_rss_kb", "idle"),
    ("agent RSS, sessions open, MB", "agent_rss_kb", "sessions"),
    ("agent RSS, streams open, MB", "agent_rss_kb", "streams_open"),
    ("agent RSS peak, MB", "agent_rss_kb", "peak"),
    ("agent RSS after, MB", "agent_rss_kb", "after"),
    ("agent kB per session", "agent_kb_per_session", None),
    ("agent kB per stream", "agent_kb_per_stream", None),
    ("connector RSS idle, MB", "connector_rss_kb_mean", "idle"),
    ("connector RSS, streams open, MB", "connector_rss_kb_mean", "streams_open"),
    ("connector RSS peak, MB", "connector_rss_kb_mean", "peak"),
    ("connector kB per session", "connector_kb_per_session", None),
    ("connector kB per stream", "connector_kb_per_stream", None),
    ("CPU busy, agent (1.0 = a core)", "cpu_busy", "agent"),
    ("CPU busy, intermediate", "cpu_busy", "intermediate"),
    ("CPU busy, connectors in all", "cpu_busy", "connectors"),
    ("CPU busy, sink", "cpu_busy", "sink"),
    ("CPU busy, clients (this process)", "cpu_busy", "clients"),
    ("errors", "errors", None),
]


def _value(run, key, sub):
    value = run[key]
    if sub is not None:
        value = value[sub]
        if key.endswith("rss_kb") or key.endswith("rss_kb_mean"):
            value = value / 1024 if value is not None else None
    return value


def summarize(runs):
    """{label: median over runs} of every SUMMARY row (None when a run has no value)."""
    out = {}
    for label, key, sub in SUMMARY:
        values = [_value(r, key, sub) for r in runs]
        values = [v for v in values if v is not None]
        out[label] = round(statistics.median(values), 4) if values else None
    if runs:
        out["aggregate / single"] = round(statistics.median(
            r["aggregate_mb_per_s"] / r["single_mb_per_s"] for r in runs), 3)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 connectors x 2 services, 20 streams, relay, 1 run")
    parser.add_argument("--connectors", type=int, help="connector processes (default 10)")
    parser.add_argument("--services", type=int, help="services per connector (default 10)")
    parser.add_argument("--streams", type=int, help="concurrent TCP streams (default 1000)")
    parser.add_argument("--bytes", type=int, help="bytes per stream (default 256 KiB)")
    parser.add_argument("--single-bytes", type=int,
                        help="bytes of the single-stream transfer (default 32 MiB)")
    parser.add_argument("--runs", type=int, help="fresh runs per path (default 3)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="many-stream rounds per run on the same sessions (default 1; "
                        "RSS after each says whether memory comes back)")
    parser.add_argument("--path", choices=("relay", "direct", "both"),
                        help="the sessions' path (default both; quick: relay)")
    parser.add_argument("--intermediate-args", default="", metavar="ARGS",
                        help="extra arguments for the intermediate, one string "
                        "(e.g. \"--signaling-burst 100\")")
    parser.add_argument("--agent-args", default="", metavar="ARGS",
                        help="extra arguments for the agent, one string "
                        "(e.g. \"--send-budget 1073741824\")")
    parser.add_argument("--profile", metavar="DIR", type=Path,
                        help="run the agent, connectors and intermediate under cProfile, "
                        "DIR/PATH-RUN-ROLE.prof")
    parser.add_argument("--allow-twin", action="store_true",
                        help="run even if the compiled hot path is missing")
    parser.add_argument("--serve-sink", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_sink:
        serve_sink()
        return 0
    quick = args.quick
    args.intermediate_args = args.intermediate_args.split()
    args.agent_args = args.agent_args.split()
    args.connectors = args.connectors or (2 if quick else 10)
    args.services = args.services or (2 if quick else 10)
    args.streams = args.streams or (20 if quick else 1000)
    args.bytes = args.bytes or ((64 << 10) if quick else (256 << 10))
    args.single_bytes = args.single_bytes or ((2 << 20) if quick else (32 << 20))
    args.runs = args.runs or (1 if quick else 3)
    paths = {"both": ["relay", "direct"], None: ["relay"] if quick else ["relay", "direct"],
             "relay": ["relay"], "direct": ["direct"]}[args.path]

    from mahole.demo import issue_certificates
    from mahole import identity

    if not _fast.COMPILED and not args.allow_twin:
        print("bench_many: the compiled hot path is not built", file=sys.stderr)
        return 2
    # The agent holds a client and a QUIC side per stream, the sink and this process one
    # socket each; 4 per stream leaves room for the rest.
    fds = raise_fd_limit(4 * args.streams + 256)
    if fds < 2 * args.streams + 256:
        print(f"bench_many: RLIMIT_NOFILE is {fds}, too low for {args.streams} streams",
              file=sys.stderr)
        return 2

    if args.profile is not None:
        args.profile = args.profile.resolve()
        args.profile.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="bench-many-"))
    certs = tmp / "certs"
    issue_certificates(str(certs))
    for i in range(args.connectors):
        identity.issue(str(certs), "connector", f"conn{i}")
    runs = {p: [] for p in paths}
    try:
        for run in range(args.runs):
            for path in paths:
                result = one_run(args, path, certs, tmp, run)
                runs[path].append(result)
                print(f"  run {run + 1} {path}: open {result['open_sessions_s']:.2f} s, "
                      f"single {result['single_mb_per_s']:.1f} MB/s, aggregate "
                      f"{result['aggregate_mb_per_s']:.1f} MB/s, Jain {result['jain']}, "
                      f"errors {result['errors']}", file=sys.stderr)
    except BaseException:
        print(f"bench_many: failed; process logs kept in {tmp}", file=sys.stderr)
        raise
    errors = sum(r["errors"] for rs in runs.values() for r in rs)
    if errors:
        print(f"process logs kept in {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)

    medians = {p: summarize(rs) for p, rs in runs.items()}
    labels = [label for label, _, _ in SUMMARY] + ["aggregate / single"]
    print(f"{args.connectors} connectors x {args.services} services = "
          f"{args.connectors * args.services} sessions, {args.streams} concurrent streams x "
          f"{args.bytes:,} bytes, single stream {args.single_bytes:,} bytes; medians of "
          f"{args.runs} run(s), loopback (compiled hot path: {_fast.COMPILED}, "
          f"{os.cpu_count()} CPUs)")
    print(_report.table(["", *paths], [[label, *(medians[p][label] if medians[p][label]
                                                  is not None else "-" for p in paths)]
                                       for label in labels]))
    if errors:
        print(f"ERROR: {errors} stream errors; first: "
              + "; ".join(e for rs in runs.values() for r in rs for e in r["error_samples"])[:400])
    out = _report.write("many-quick" if quick else "many", {
        "connectors": args.connectors, "services_per_connector": args.services,
        "streams": args.streams, "bytes_per_stream": args.bytes,
        "single_stream_bytes": args.single_bytes, "runs": args.runs,
        "unit": "MB/s (10^6 bytes/s); RSS in kB (MB in medians)",
        "medians": medians, "runs_detail": runs, "errors": errors,
        "intermediate_args": args.intermediate_args, "agent_args": args.agent_args,
        "compiled": _fast.COMPILED, "cpus": os.cpu_count(), "rlimit_nofile": fds,
        "profiled": args.profile is not None,
        "seconds_total": round(time.monotonic() - started, 1),
    })
    if args.profile is not None:
        print(f"profiles in {args.profile}")
    print(f"wrote {out}")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
