"""Goodput on long and lossy links: mahole's TCP forward, direct and relayed, next to aioquic's
own bulk transfer and kernel TCP between the same two hosts of the NAT lab (needs root).

    sudo python benchmarks/bench_goodput.py [--runs N] [--quick] [--bytes N]
                                            [--links lan,long,lte] [--systems ...]
                                            [--budget SECONDS] [--transfer-timeout SECONDS]

The lab (tests/netlab, one per link preset, torn down after it, also on failure):

    agent host --[emulated link]-- port-restricted NAT --+-- public segment
                                                         +-- intermediate (public host)
                                                         +-- connector host (public host)

The link preset (tests/netlab/wire.py) is on the agent's own link, between its host and its
NAT router: the part of a real path that is long or lossy is the user's end (an LTE last mile;
a laptop a continent away from the office, where both the intermediate and the connector sit
in one data centre). Every way from the agent crosses that link once, the direct path and the
relayed one alike, and the rest of the lab is clean, so the systems below see the same link.
The connector's host is on the public segment (NAT preset none), which lets kernel TCP and the
aioquic baseline reach a server on it from the agent's host behind its NAT; mahole punches the
same way (port-restricted x none goes direct in the NAT matrix).

Every transfer sends BYTES (16 MiB on lan and long, 4 MiB on lte: seconds each; --bytes) from
the agent's host to a counting sink on the connector's host
(bench_tunnel.py's sink: it counts to EOF and answers the count), which is the direction whose
sender the congestion controller governs:

  mahole direct / relay   the real roles (tests/labroles.py Deployment) with
                          `--congestion-control CC` on agent and connector, a forward
                          tcp:127.0.0.1:PORT=sink at the agent and service sink at the
                          connector; relay: the agent runs `--relay-only`. A TCP connection to
                          the forward per transfer (one QUIC stream of the session).
  aioquic                 bench_tunnel.py's AioquicBulk (benchmarks/_aioquic_bulk.py): an
                          aioquic server on the connector's host, a client on the agent's,
                          congestion_control_algorithm CC, 4 MiB UDP socket buffers as mahole's
                          nodes ask for; one stream per transfer on one connection.
  tcp                     kernel TCP from the agent's host (TCP_CONGESTION CC) on one
                          connection for all transfers, as the QUIC systems keep one connection:
                          each transfer is an 8-byte length and the bytes, the sink answers the
                          count. Slow start after idle is off in the agent's namespace
                          (net.ipv4.tcp_slow_start_after_idle=0; aioquic keeps its window over
                          the pause between transfers too); Linux's defaults otherwise.

CC is reno and cubic for each. Each system is set up, warmed with one transfer (it opens the
session or connection and, for mahole direct, waits for the direct path), then timed --runs
times; systems run one after another in one lab. Goodput = bytes / seconds from the first
byte handed over to the count received, in MB/s (10^6 bytes/s). Reported per link and system:
p50 and p95, p95 being the slow tail (95 % of the transfers were at least this fast: the
goodput of the 95th-percentile transfer time), and n; also mahole / aioquic and mahole / tcp
with the same controller. A transfer that does not finish within --transfer-timeout counts as
failed (reported, not averaged). Budget: --budget seconds in all (systems left over are
skipped and said so); JSON: benchmarks/results/goodput.json (goodput-quick.json).

The wire is a user-space forwarder (one Python process per link) sharing the machine's CPUs
with everything measured: `lan` shows that ceiling, the other presets what the link takes off it.
"""

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
for path in (HERE, TESTS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import _report  # noqa: E402
from bench_links import percentile  # noqa: E402
from _procs import Processes  # noqa: E402
from bench_tunnel import AioquicBulk, _readline, _Sink, send_counted  # noqa: E402

LINKS = ("lan", "long", "lte")
# Bytes per transfer by link, sized so that one transfer of the slowest system lasts seconds
# (lte: about 0.25 MB/s, so ~17 s) and a whole run stays within about 20 minutes.
BYTES = {"lan": 16 << 20, "long": 16 << 20, "lte": 4 << 20}
DEFAULT_BYTES = 8 << 20  # other presets
CONTROLLERS = ("reno", "cubic")
SYSTEMS = ("mahole direct", "mahole relay", "aioquic", "tcp")
SINK_PORT = 7100  # the sink on the connector's host (all addresses)
FRAMED_SINK_PORT = 7101  # the sink of length-prefixed transfers on one connection (tcp)
FORWARD_PORT = 8100  # the agent's forward to it
SOCKBUF = 4 << 20  # mahole's nodes ask for 4 MiB UDP socket buffers; the baseline gets the same
MB = 1e6


# --- the sink on the connector's host ----------------------------------------------------


class _FramedSink(_Sink):
    """Transfers on one connection: an 8-byte big-endian length, then that many bytes, which
    are counted; after each the count is answered as ASCII and a newline."""

    def __init__(self):
        super().__init__()
        self.header = b""
        self.left = None  # bytes of the current transfer still to come

    def eof_received(self):
        return False  # the client is done: close

    def buffer_updated(self, nbytes):
        view = memoryview(self.buffer)[:nbytes]
        while view:
            if self.left is None:
                need = 8 - len(self.header)
                self.header += bytes(view[:need])
                view = view[need:]
                if len(self.header) == 8:
                    self.left, self.count, self.header = int.from_bytes(self.header, "big"), 0, b""
                continue
            take = min(self.left, len(view))
            self.count += take
            self.left -= take
            view = view[take:]
            if self.left == 0:
                self.transport.write(b"%d\n" % self.count)
                self.left = None


def serve_sink(port):
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Sink, "0.0.0.0", port)
        await loop.create_server(_FramedSink, "0.0.0.0", FRAMED_SINK_PORT)
        print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# --- the systems -------------------------------------------------------------------------


class LabProcesses(Processes):
    """bench_tunnel's Processes inside the lab: each named process on its lab host (the lab
    ends their process groups), its stderr in LOGDIR/NAME.log."""

    def __init__(self, hosts, logdir):
        super().__init__(logdir)
        self.hosts = hosts  # name -> lab host

    def start(self, name, cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL):
        with open(self.logdir / f"{name}.log", "ab") as log:
            proc = self.hosts[name].popen(cmd, stdin=stdin, stdout=stdout, stderr=log)
        proc.bench_name = name
        self.procs.append(proc)
        return proc


class Tcp:
    """Kernel TCP from the agent's host to the framed sink, one connection for all transfers."""

    def __init__(self, deployment, data, cc):
        from netlab import _ns

        ns = deployment.agent_host.ns
        _ns.write_sysctls(ns, {"net.ipv4.tcp_slow_start_after_idle": 0})
        with _ns.entered(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
        self.sock.settimeout(30)
        self.sock.connect((deployment.connector_host.ip, FRAMED_SINK_PORT))
        self.message = len(data).to_bytes(8, "big") + data
        self.reader = self.sock.makefile("rb")

    def transfer(self, timeout):
        self.sock.settimeout(timeout)
        start = time.perf_counter()
        self.sock.sendall(self.message)
        line = self.reader.readline()
        elapsed = time.perf_counter() - start
        return elapsed, int(line) if line.strip() else None

    def stop(self):
        self.reader.close()
        self.sock.close()


class Mahole:
    """The agent and the connector of the deployment, restarted with this controller (and
    --relay-only for the relay); transfers through the agent's forward."""

    def __init__(self, deployment, data, cc, relay):
        self.d = deployment
        self.data = data
        self.path = "relay" if relay else "direct"
        d = deployment
        for proc in (d.agent, d.connector):
            _stop(proc)
        d.connector_args = ("--service", f"sink=tcp:127.0.0.1:{SINK_PORT}",
                            "--congestion-control", cc)
        d.connector = d.start_connector()
        d.agent = d.start_agent(("--forward", f"tcp:127.0.0.1:{FORWARD_PORT}=sink",
                                 "--congestion-control", cc,
                                 *(("--relay-only",) if relay else ())))
        d.wait_registered(30)

    def transfer(self, timeout):
        from netlab import _ns

        with _ns.entered(self.d.agent_host.ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(timeout)
            sock.connect(("127.0.0.1", FORWARD_PORT))
            return send_counted(sock, self.data)

    def warmed(self):
        """After the warm-up: the session is on the path this system measures."""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            session = self.d.session() or {}
            if session.get("path") == self.path:
                return
            time.sleep(0.1)  # polling the agent's status
        raise RuntimeError(f"mahole: the session is on {session.get('path')}, not {self.path}")

    def stop(self):
        pass  # the next Mahole restarts the roles; the lab ends them


class Aioquic:
    def __init__(self, deployment, certs, total, cc, logdir):
        self.procs = LabProcesses({"aioquic-server": deployment.connector_host,
                                   "aioquic-client": deployment.agent_host}, logdir)
        self.bulk = AioquicBulk(self.procs, certs, total, SOCKBUF, listen="0.0.0.0",
                                connect=deployment.connector_host.ip,
                                server_name=deployment.public.ip, congestion_control=cc)

    def transfer(self, timeout):
        return self.bulk.transfer(timeout)

    def stop(self):
        for proc in self.procs.procs:
            _stop(proc)


def _stop(proc):
    """End a process group the lab started (SIGTERM, then SIGKILL)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass


# --- one link ----------------------------------------------------------------------------


def measure_link(link, args, deadline, log):
    """{system key: {"mb_per_s": [...], "failed": n}} for one link preset, in one lab."""
    from labroles import Deployment
    from netlab import Lab, _ns

    total = args.bytes or BYTES.get(link, DEFAULT_BYTES) // (8 if args.quick else 1)
    data = os.urandom(total)
    results = {}
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-goodput-{link}-"))
    with Lab() as lab:
        d = Deployment(lab, tmp, "port-restricted", "none", agent_link=link)
        sink = d.connector_host.popen([sys.executable, str(Path(__file__).resolve()),
                                       "--serve-sink", str(SINK_PORT)], stdout=subprocess.PIPE)
        line = _readline(sink, 10)
        if not line.startswith("ready"):
            raise RuntimeError(f"sink did not start: {line!r}")
        d.wait_registered(30)
        kernel_cc = _ns.read_sysctl(d.agent_host.ns, "net.ipv4.tcp_congestion_control")
        for system in args.systems:
            for cc in CONTROLLERS:
                key = f"{system} {cc}"
                entry = results[key] = {"mb_per_s": [], "failed": 0, "seconds": []}
                if time.monotonic() > deadline:
                    entry["skipped"] = "out of time"
                    log(f"{link}: {key}: skipped, out of time")
                    continue
                try:
                    if system == "tcp":
                        sut = Tcp(d, data, cc)
                    elif system == "aioquic":
                        sut = Aioquic(d, tmp, total, cc, tmp)
                    else:
                        sut = Mahole(d, data, cc, relay=system.endswith("relay"))
                    timeout = args.transfer_timeout
                    _elapsed, count = sut.transfer(timeout)  # the warm-up
                    if isinstance(sut, Mahole):
                        sut.warmed()
                    for run in range(args.runs):
                        if time.monotonic() > deadline:
                            entry["skipped"] = f"out of time after {run} runs"
                            break
                        try:
                            elapsed, count = sut.transfer(timeout)
                        except OSError as exc:  # a timeout included
                            entry["failed"] += 1
                            log(f"{link}: {key}: run {run + 1} failed: {exc!r}")
                            continue
                        if count != total:
                            entry["failed"] += 1
                            log(f"{link}: {key}: run {run + 1}: the sink counted {count}")
                            continue
                        entry["seconds"].append(round(elapsed, 4))
                        entry["mb_per_s"].append(round(total / elapsed / MB, 3))
                        log(f"{link}: {key}: run {run + 1}: {total / elapsed / MB:.2f} MB/s")
                    sut.stop()
                except (OSError, RuntimeError, AssertionError) as exc:
                    entry["error"] = str(exc).splitlines()[0][:300]
                    log(f"{link}: {key}: set-up or warm-up failed: {entry['error']}")
        results["_kernel_default_cc"] = kernel_cc
        results["_bytes"] = total
    return results


# --- the report --------------------------------------------------------------------------


def summary(values):
    """(p50, p95 slow tail, n) of goodputs: p95 is the goodput of the 95th-percentile time."""
    if not values:
        return None, None, 0
    times = [1 / v for v in values]
    return _report.median(values), 1 / percentile(times, 0.95), len(values)


def rows(results):
    """Table rows: link, system, controller, p50, p95, n, failed, x aioquic, x tcp."""
    out = []
    for link, systems in results.items():
        p50 = {key: summary(entry["mb_per_s"])[0] for key, entry in systems.items()
               if not key.startswith("_")}
        for key, entry in systems.items():
            if key.startswith("_"):
                continue
            system, cc = key.rsplit(" ", 1)
            mid, tail, n = summary(entry["mb_per_s"])
            ratios = []
            for base in ("aioquic", "tcp"):
                ref = p50.get(f"{base} {cc}")
                ratios.append(f"{mid / ref:.2f}x" if mid and ref and system != base else "-")
            note = entry.get("error") or entry.get("skipped") or ""
            out.append([link, system, cc, "-" if mid is None else round(mid, 2),
                        "-" if tail is None else round(tail, 2), n, entry["failed"],
                        *ratios, note])
    return out


HEADERS = ["link", "system", "cc", "p50 MB/s", "p95 MB/s", "n", "failed", "x aioquic",
           "x tcp", "note"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="timed transfers per system and controller "
                        "(default 5, quick 1)")
    parser.add_argument("--quick", action="store_true", help="one run per system, an eighth "
                        "of the bytes")
    parser.add_argument("--bytes", type=int, help="bytes per transfer on every link (default "
                        "16 MiB on lan and long, 4 MiB on lte, 8 MiB on others)")
    parser.add_argument("--links", default=",".join(LINKS),
                        help=f"link presets, comma-separated (default {','.join(LINKS)})")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"systems, comma-separated (default {','.join(SYSTEMS)})")
    parser.add_argument("--transfer-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="a transfer not done within this counts as failed (default 60)")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help="stop starting transfers after this long (default 1800, quick "
                             "300)")
    parser.add_argument("--allow-twin", action="store_true",
                        help="run even if the compiled hot path is missing")
    parser.add_argument("--serve-sink", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_sink is not None:
        serve_sink(args.serve_sink)
        return 0
    args.runs = args.runs or (1 if args.quick else 5)
    links = [name for name in args.links.split(",") if name]
    args.systems = [name for name in args.systems.split(",") if name]
    for name in args.systems:
        if name not in SYSTEMS:
            parser.error(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
    budget = args.budget or (300.0 if args.quick else 1800.0)

    import netlab
    from netlab import wire
    from mahole import _fast

    for name in links:
        try:
            wire.settings(name)
        except ValueError as exc:
            parser.error(str(exc))
    why = netlab.problem()
    if why:
        print(f"bench_goodput: {why}", file=sys.stderr)
        return 2
    if not _fast.COMPILED and not args.allow_twin:
        print("bench_goodput: the compiled hot path is not built", file=sys.stderr)
        return 2

    def log(text):
        print(text, file=sys.stderr, flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt  # the lab's `with` ends its processes and namespaces
    signal.signal(signal.SIGTERM, stop)

    started = time.monotonic()
    deadline = started + budget
    results = {}
    try:
        for link in links:
            results[link] = measure_link(link, args, deadline, log)
    except KeyboardInterrupt:
        print("bench_goodput: interrupted; the lab is torn down", file=sys.stderr)
        return 130
    sizes = ", ".join(f"{link} {r['_bytes'] / (1 << 20):g} MiB" for link, r in results.items())
    print(f"goodput per transfer from the agent's host to a sink on the connector's ({sizes}), "
          f"link preset on the agent's link, {args.runs} run(s) per system "
          f"(compiled hot path: {_fast.COMPILED}); p95 = slow tail")
    table = rows(results)
    print(_report.table(HEADERS, table))
    failed = sum(entry["failed"] for systems in results.values()
                 for key, entry in systems.items() if not key.startswith("_"))
    data = {"bytes": {link: r["_bytes"] for link, r in results.items()}, "runs": args.runs, "unit": "MB/s (10^6 bytes/s)",
            "links": {name: wire.settings(name) for name in links},
            "link_placement": "agent host <-> its NAT router; the rest of the lab clean",
            "results": results, "table": {"headers": HEADERS, "rows": table},
            "compiled": _fast.COMPILED, "cpus": os.cpu_count(),
            "seconds_total": round(time.monotonic() - started, 1), "failed_transfers": failed}
    print(f"wrote {_report.write('goodput' + ('-quick' if args.quick else ''), data)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
