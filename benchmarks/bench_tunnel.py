"""Tunnel goodput: a TCP forward through agent -> intermediate (relay) -> connector -> sink,
against aioquic's own asyncio client/server moving the same bytes on one stream.

    python benchmarks/bench_tunnel.py [--quick] [--bytes N] [--reps R] [--path relay|direct]
                                      [--max-udp-payload BYTES]
                                      [--baseline-sockbuf BYTES] [--profile DIR] [--py-spy DIR]

How it measures. Everything runs on 127.0.0.1 in separate processes, each in its own process
group, all ended by PID in `finally`.

  mahole   the real role processes, started like a user starts them: `python -m mahole
           intermediate|connector|agent` with certificates from mahole.demo.issue_certificates
           (intermediate, connector1, alice), ACL `--allow alice=*`, readiness by polling each
           node's --status endpoint (intermediate answers; connector and agent report
           `intermediate.connected`). The connector's service `sink` is a TCP server process
           (this file, --serve-sink) that counts bytes until EOF, then writes the count as
           ASCII and closes. This process connects to the agent's forward, sends N bytes,
           half-closes and waits for the count.
  aioquic  benchmarks/_aioquic_bulk.py: an `aioquic.asyncio.serve` process and an
           `aioquic.asyncio.connect` process with aioquic's default QuicConfiguration (flow
           control windows and congestion control as listed in the JSON: max_data and
           max_stream_data 1 MiB, doubled whenever half is used; Reno; 1200-byte datagrams;
           mahole's packets grow to what path MTU discovery finds, up to 16,383 bytes on
           loopback, or stay at 1,200 bytes with --max-udp-payload 1200)
           and the OS default UDP socket buffers (mahole's nodes ask for 4 MiB;
           --baseline-sockbuf gives the baseline the same); the client opens one stream per
           transfer, sends the same N bytes with end_stream, the server counts them and
           answers the count on the same stream.

Goodput = N / elapsed, elapsed from the first byte handed over (TCP send / send_stream_data)
to the count received. One warm-up transfer per system first (it opens the mahole session
and the aioquic connection's windows), then R timed transfers per system, interleaved
A B A B so drift hits both alike. Reported: median, min, max MB/s (10^6 bytes/s) and
mahole / aioquic (target >= 1.0). Also reported: CPU seconds (user+system, /proc/PID/stat)
of every process per timed transfer, which says which process is the bottleneck, and the
kernel's UDP receive drops per process (/proc/net/udp). CPU seconds per GB (10^9 bytes)
moved, per process, say what each byte costs whatever the machine's other load. JSON: benchmarks/results/tunnel.json
(tunnel-quick.json for --quick). Budget: under 3 minutes (--quick: 40 s).

--profile DIR runs the three role processes under cProfile (`python -m cProfile -o
DIR/ROLE.prof -m mahole ...`); the profiles are written when the roles stop (SIGTERM).
--py-spy DIR attaches `py-spy record` (raw collapsed stacks, DIR/NAME.txt) to every process
under test for the timed transfers; py-spy must be installed. Profiled numbers are slower.
"""

import argparse
import asyncio
import os
import select
import shutil
import signal
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

import _aioquic_bulk  # noqa: E402
import _report  # noqa: E402
from _procs import HOST, Processes, free_port, status, wait_for  # noqa: E402

TARGET = 1.0  # mahole / aioquic
MB = 1e6
POLL = 0.02  # s between readiness checks


# --- the sink service ----------------------------------------------------------------------


class _Sink(asyncio.BufferedProtocol):
    """Counts bytes until EOF, then answers the count as ASCII and closes."""

    def __init__(self):
        self.buffer = bytearray(1 << 18)
        self.count = 0
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        return self.buffer

    def buffer_updated(self, nbytes):
        self.count += nbytes

    def eof_received(self):
        self.transport.write(str(self.count).encode("ascii"))
        self.transport.close()
        return True


def serve_sink():
    async def main():
        server = await asyncio.get_running_loop().create_server(_Sink, HOST, 0)
        print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def send_counted(sock, data):
    """Send `data` on a connected socket to a sink, half-close, read the count it answers:
    (seconds from the first byte handed over to the count received, count or None)."""
    start = time.perf_counter()
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    reply = bytearray()
    while True:
        chunk = sock.recv(64)
        if not chunk:
            break
        reply += chunk
    return time.perf_counter() - start, int(reply) if reply else None


# --- processes -----------------------------------------------------------------------------


def _readline(proc, timeout):
    if not select.select([proc.stdout], [], [], timeout)[0]:
        return ""
    return proc.stdout.readline().decode(errors="replace").strip()


def _start_py_spy(procs, directory):
    """py-spy record attached to every process under test (ended with SIGINT: it writes)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    spies = []
    for proc in list(procs.procs):
        if proc.poll() is None:
            spies.append(procs.start(f"py-spy-{proc.bench_name}", [
                spy, "record", "--pid", str(proc.pid), "--rate", "200", "--format", "raw",
                "-o", str(directory / f"{proc.bench_name}.txt")]))
    time.sleep(0.5)  # let py-spy attach before the measured transfers (profiling runs only)
    return spies


def _stop_py_spy(spies):
    for spy in spies:
        if spy.poll() is None:
            os.kill(spy.pid, signal.SIGINT)
    for spy in spies:
        try:
            spy.wait(15)
        except subprocess.TimeoutExpired:
            pass


# --- mahole --------------------------------------------------------------------------------


class MaholeTunnel:
    name = "mahole"
    processes = ("bench (client)", "agent", "intermediate", "connector", "sink")

    def __init__(self, procs, certs, total_bytes, profile_dir=None, path="relay",
                 max_udp_payload=None):
        self.path = path  # "relay": nodes run --relay-only; "direct": hole punching on
        self.procs = procs
        self.total = total_bytes
        self.data = os.urandom(total_bytes)
        sink = procs.start("sink", [sys.executable, str(Path(__file__).resolve()),
                                    "--serve-sink"], stdout=subprocess.PIPE)
        line = _readline(sink, 10)
        if not line.startswith("ready "):
            raise RuntimeError(f"sink did not start: {line!r} {procs.tail('sink')}")
        sink_port = int(line.split()[1])

        udp_port = free_port(socket.SOCK_DGRAM)
        self.status_ports = {role: free_port(socket.SOCK_STREAM)
                             for role in ("intermediate", "connector", "agent")}

        def role(name, *args, cert):
            cmd = [sys.executable]
            if profile_dir is not None:
                cmd += ["-m", "cProfile", "-o", str(Path(profile_dir) / f"{name}.prof")]
            cmd += ["-m", "mahole", name, "--ca", str(certs / "ca.crt"),
                    "--cert", str(certs / f"{cert}.crt"), "--key", str(certs / f"{cert}.key"),
                    "--status", f"{HOST}:{self.status_ports[name]}", *args]
            return procs.start(name, cmd)

        node = ["--intermediate", f"{HOST}:{udp_port}", "--intermediate-name", HOST,
                "--bind", f"{HOST}:0", *(["--relay-only"] if path == "relay" else []),
                *(["--max-udp-payload", str(max_udp_payload)] if max_udp_payload else [])]
        role("intermediate", "--listen", f"{HOST}:{udp_port}", "--allow", "alice=*",
             cert="intermediate")
        wait_for("intermediate", lambda: status(self.status_ports["intermediate"]),
                 procs, 20, interval=POLL)
        role("connector", "--service", f"sink=tcp:{HOST}:{sink_port}", *node, cert="connector1")
        role("agent", "--forward", f"tcp:{HOST}:0=sink", *node, cert="alice")
        for name in ("connector", "agent"):
            wait_for(name, lambda n=name: (status(self.status_ports[n]) or {}).get(
                "intermediate", {}).get("connected"), procs, 20, interval=POLL)
        agent = status(self.status_ports["agent"])
        forward = agent["forwards"][0]["forward"]  # "tcp:127.0.0.1:PORT"
        self.forward = (HOST, int(forward.rsplit(":", 1)[1]))

    def _session_path(self):
        sessions = (status(self.status_ports["agent"]) or {}).get("sessions") or []
        return sessions[0]["path"] if sessions else None

    def transfer(self, timeout):
        if self._session_path() is not None:  # after the warm-up opened the session
            deadline = time.monotonic() + 10
            while self._session_path() != self.path and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._session_path() != self.path:
                raise RuntimeError(f"mahole: the session is on {self._session_path()}, "
                                   f"not {self.path}")
        with socket.create_connection(self.forward, timeout=timeout) as sock:
            elapsed, count = send_counted(sock, self.data)
        if count is None:
            raise RuntimeError("mahole: the connection closed without a count "
                               f"(agent: {self.procs.tail('agent', 2)})")
        return elapsed, count

    def details(self):
        agent = status(self.status_ports["agent"]) or {}
        inter = status(self.status_ports["intermediate"]) or {}
        sessions = agent.get("sessions", [])
        relay = inter.get("relay", {})
        return {"path": sessions[0]["path"] if sessions else None,
                "rtt_ms": sessions[0]["rtt_ms"] if sessions else None,
                "sessions": len(sessions),
                "relayed_packets": relay.get("relayed_packets"),
                "relayed_bytes": relay.get("relayed_bytes"),
                "agent_endpoint": agent.get("endpoint")}


# --- aioquic baseline ----------------------------------------------------------------------


class AioquicBulk:
    name = "aioquic"
    processes = ("aioquic-client", "aioquic-server")

    def __init__(self, procs, certs, total_bytes, sockbuf=0, *, listen=HOST, connect=HOST,
                 server_name=HOST, congestion_control=None):
        """`listen`: the server's address; `connect`: where the client finds it;
        `server_name`: the name in certs/intermediate.crt; `congestion_control`: one of
        aioquic's controllers for both (None: aioquic's default)."""
        self.procs = procs
        self.total = total_bytes
        self.sockbuf = sockbuf
        self.congestion_control = congestion_control
        helper = str(HERE / "_aioquic_bulk.py")
        bufs = ["--sockbuf", str(sockbuf)] if sockbuf else []
        if congestion_control:
            bufs += ["--congestion-control", congestion_control]
        server = procs.start("aioquic-server",
                             [sys.executable, helper, "server", "--host", listen,
                              "--cert", str(certs / "intermediate.crt"),
                              "--key", str(certs / "intermediate.key"), *bufs],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = _readline(server, 10)
        if not line.startswith("ready "):
            raise RuntimeError(f"aioquic server did not start: {line!r} "
                               f"{procs.tail('aioquic-server')}")
        self.client = procs.start("aioquic-client",
                                  [sys.executable, helper, "client", "--port", line.split()[1],
                                   "--host", connect, "--ca", str(certs / "ca.crt"),
                                   "--server-name", server_name,
                                   "--bytes", str(total_bytes), *bufs],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = _readline(self.client, 20)
        if line != "ready":
            raise RuntimeError(f"aioquic client did not connect: {line!r} "
                               f"{procs.tail('aioquic-client')}")

    def transfer(self, timeout):
        self.client.stdin.write(b"run\n")
        self.client.stdin.flush()
        line = _readline(self.client, timeout)
        if not line.startswith("done "):
            raise RuntimeError(f"aioquic transfer failed: {line!r} "
                               f"{self.procs.tail('aioquic-client')}")
        _, seconds, count = line.split()
        return float(seconds), int(count)

    def details(self):
        configuration = _aioquic_bulk.defaults()
        if self.congestion_control:
            configuration["congestion_control_algorithm"] = self.congestion_control
        return {"configuration": configuration,
                "socket_buffers": self.sockbuf or "OS default"}


# --- main ----------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (4 MiB x 2)")
    parser.add_argument("--bytes", type=int, help="bytes per transfer (default 64 MiB, "
                        "quick 4 MiB)")
    parser.add_argument("--reps", type=int, help="timed transfers per system (default 5, "
                        "quick 2)")
    parser.add_argument("--profile", metavar="DIR", help="run the mahole roles under cProfile "
                        "and write DIR/{intermediate,connector,agent}.prof")
    parser.add_argument("--baseline-sockbuf", type=int, default=0, metavar="BYTES",
                        help="give the aioquic baseline's UDP sockets SO_RCVBUF/SO_SNDBUF "
                        "BYTES, as mahole's nodes have (default: the OS default)")
    parser.add_argument("--py-spy", metavar="DIR", help="sample every process under test with "
                        "py-spy during the timed runs; raw stacks in DIR/NAME.txt")
    parser.add_argument("--path", choices=("relay", "direct"), default="relay",
                        help="the mahole session's path: relay (--relay-only) or direct")
    parser.add_argument("--max-udp-payload", type=int, metavar="BYTES",
                        help="the nodes' --max-udp-payload (default: theirs, the link's; "
                        "1200 keeps QUIC's minimum packet)")
    parser.add_argument("--allow-twin", action="store_true",
                        help="run even if the compiled hot path is missing")
    parser.add_argument("--only", choices=("mahole", "aioquic"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-sink", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_sink:
        serve_sink()
        return 0

    total = args.bytes or ((4 << 20) if args.quick else (64 << 20))
    reps = args.reps or (2 if args.quick else 5)
    # Timed rounds stop when the next would end after `budget`; a stuck transfer fails at
    # `hard` (totals stay under 40 s quick, 3 min full, set-up and shutdown included).
    budget, hard = (28.0, 34.0) if args.quick else (150.0, 168.0)
    started = time.monotonic()
    profile_dir = Path(args.profile).resolve() if args.profile else None
    spy_dir = Path(args.py_spy).resolve() if args.py_spy else None
    for directory in (profile_dir, spy_dir):
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
    cpu = {}
    drops = {}
    cut_short = None

    from mahole import _fast
    from mahole.demo import issue_certificates

    if not _fast.COMPILED and not args.allow_twin:
        print("bench_tunnel: the compiled hot path is not built", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="bench-tunnel-"))
    certs = tmp / "certs"
    issue_certificates(str(certs))
    procs = Processes(tmp)
    samples = {}
    details = {}
    counts_ok = True
    try:
        systems = []
        if args.only != "aioquic":
            systems.append(MaholeTunnel(procs, certs, total, profile_dir, path=args.path,
                                        max_udp_payload=args.max_udp_payload))
        if args.only != "mahole":
            systems.append(AioquicBulk(procs, certs, total, args.baseline_sockbuf))
        samples = {s.name: [] for s in systems}
        seconds = {s.name: [] for s in systems}
        setup_s = time.monotonic() - started
        print(f"set up in {setup_s:.1f} s; {total:,} bytes per transfer, 1 warm-up + {reps} "
              f"timed per system, interleaved", file=sys.stderr)
        cpu = {s.name: {} for s in systems}  # system -> process -> CPU s in timed runs
        spies = []
        round_started = time.monotonic()
        for rep in range(-1, reps):  # -1: the warm-up
            now = time.monotonic()
            last_round, round_started = now - round_started, now
            if rep >= 1 and now + last_round > started + budget:
                cut_short = rep
                print(f"  stopping after {rep} timed runs per system: the next round would "
                      f"pass the {budget:g} s budget", file=sys.stderr)
                break
            if rep == 0 and spy_dir is not None:
                spies = _start_py_spy(procs, spy_dir)
            for system in systems:
                left = hard - (time.monotonic() - started)
                if left < 1:
                    raise RuntimeError(f"out of time ({hard:g} s)")
                before = procs.cpu_seconds()
                elapsed, count = system.transfer(timeout=left)
                after = procs.cpu_seconds()
                if count != total:
                    counts_ok = False
                    print(f"{system.name}: the receiver counted {count:,} of {total:,} bytes",
                          file=sys.stderr)
                if rep >= 0:
                    samples[system.name].append(total / elapsed / MB)
                    seconds[system.name].append(elapsed)
                    for name in system.processes:
                        if name in before and name in after:
                            used = cpu[system.name].get(name, 0.0)
                            cpu[system.name][name] = used + after[name] - before[name]
                print(f"  {'warm-up' if rep < 0 else f'run {rep + 1}'} {system.name}: "
                      f"{elapsed:.3f} s, {total / elapsed / MB:.1f} MB/s", file=sys.stderr)
        _stop_py_spy(spies)
        drops = procs.udp_drops()
        for system in systems:
            details[system.name] = system.details()
    except BaseException:
        procs.stop_all()
        print(f"bench_tunnel: failed; process logs kept in {tmp}", file=sys.stderr)
        raise
    procs.stop_all()
    if counts_ok:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"process logs kept in {tmp}", file=sys.stderr)

    medians = {name: _report.median(v) for name, v in samples.items()}
    base = medians.get("aioquic")
    rows = []
    for name, values in samples.items():
        lo, hi = _report.spread(values)
        rows.append([name, medians[name], lo, hi,
                     f"{medians[name] / base:.2f}x" if base else "-"])
    print(f"tunnel goodput, {total:,} bytes per transfer x {reps} runs, one TCP connection / "
          f"QUIC stream, loopback (compiled hot path: {_fast.COMPILED})")
    print(_report.table(["system", "median MB/s", "min", "max", "x aioquic"], rows))
    ratio = medians["mahole"] / base if base and "mahole" in medians else None
    if ratio is not None:
        verdict = "meets" if ratio >= TARGET else "MISSES"
        print(f"mahole is {ratio:.2f}x aioquic ({verdict} the >= {TARGET:.1f}x target)")
    cpu_rows = []
    cpu_per_transfer = {}
    cpu_per_gb = {}
    for name, per_process in cpu.items():
        runs = len(seconds[name])
        if not runs:
            continue
        wall = sum(seconds[name])
        gigabytes = runs * total / 1e9
        cpu_per_transfer[name] = {p: round(v / runs, 3) for p, v in per_process.items()}
        cpu_per_gb[name] = {p: round(v / gigabytes, 2) for p, v in per_process.items()}
        for process, used in per_process.items():
            cpu_rows.append([name, process, used / runs, used / gigabytes,
                             f"{100 * used / wall:.0f}%"])
        total_cpu = sum(per_process.values())
        cpu_rows.append([name, "total", total_cpu / runs, total_cpu / gigabytes,
                         f"{100 * total_cpu / wall:.0f}%"])
    if cpu_rows:
        print(f"CPU per timed transfer and per GB moved (user+system; % of the transfer's "
              f"wall time; {os.cpu_count()} CPUs)")
        print(_report.table(["system", "process", "CPU s", "CPU s/GB", "busy"], cpu_rows))
    if drops:
        print("UDP receive drops in the kernel over the whole run (warm-up included): "
              + ", ".join(f"{name} {count}" for name, count in drops.items()))
    if cut_short is not None:
        print(f"NOTE: only {cut_short} of {reps} timed runs per system fitted the time budget")
    if not counts_ok:
        print("ERROR: a receiver did not count every byte")
    for directory in (profile_dir, spy_dir):
        if directory is not None:
            print(f"profiles in {directory}")
    suffix = "" if args.path == "relay" else "-direct"
    path = _report.write(("tunnel-quick" if args.quick else "tunnel") + suffix, {
        "mahole_path": args.path,
        "bytes": total, "reps": reps, "reps_done": cut_short or reps,
        "unit": "MB/s (10^6 bytes/s)",
        "mb_per_s": samples, "median_mb_per_s": medians, "ratio_mahole_vs_aioquic": ratio,
        "target_ratio": TARGET, "counts_ok": counts_ok, "compiled": _fast.COMPILED,
        "profiled": profile_dir is not None or spy_dir is not None, "cpus": os.cpu_count(),
        "seconds": seconds, "cpu_seconds_per_transfer": cpu_per_transfer,
        "cpu_seconds_per_gb": cpu_per_gb, "max_udp_payload": args.max_udp_payload,
        "udp_receive_drops": drops, "baseline_sockbuf": args.baseline_sockbuf or None,
        "seconds_total": round(time.monotonic() - started, 1), "details": details,
    })
    print(f"wrote {path}")
    return 0 if counts_ok else 1


if __name__ == "__main__":
    sys.exit(main())
