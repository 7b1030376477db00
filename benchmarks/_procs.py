"""Benchmark child processes: each in its own process group with its stderr in a log file,
ended by PID; what /proc says about them; and the loopback helpers the benchmarks poll with."""

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import mahole

HOST = "127.0.0.1"
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class Processes:
    """Children in their own process groups, with their stderr in log files; ended by PID.

    `procs` lists every child started, in order; each has a `bench_name`, which names its
    log file (LOGDIR/NAME.log) and its entry in what the methods below report."""

    def __init__(self, logdir):
        self.logdir = Path(logdir)
        self.procs = []
        # Children find the same mahole as this process (installed, or this checkout).
        package_root = str(Path(mahole.__file__).resolve().parent.parent)
        path = os.environ.get("PYTHONPATH")
        self.env = {**os.environ,
                    "PYTHONPATH": package_root + (os.pathsep + path if path else "")}

    def start(self, name, cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL):
        with open(self.logdir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdin=stdin, stdout=stdout, stderr=log,
                                    start_new_session=True, cwd=self.logdir, env=self.env)
        proc.bench_name = name
        self.procs.append(proc)
        return proc

    def check(self):
        """Raise RuntimeError, with the end of its log, if a child has exited."""
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.bench_name} exited with {proc.returncode}: "
                                   f"{self.tail(proc.bench_name)}")

    def tail(self, name, lines=5):
        try:
            text = (self.logdir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def cpu_seconds(self, own_name="bench (client)"):
        """{name: user+system CPU seconds so far} of every running child, plus this process
        (as own_name)."""
        times = {own_name: sum(os.times()[:2])}
        for proc in self.procs:
            try:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
            times[proc.bench_name] = (int(fields[11]) + int(fields[12])) / _CLK_TCK
        return times

    def rss_kb(self):
        """{name: VmRSS in kB} of every running child (/proc/PID/status)."""
        rss = {}
        for proc in self.procs:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        rss[proc.bench_name] = int(line.split()[1])
            except OSError:
                pass
        return rss

    def udp_drops(self):
        """{name: kernel receive drops summed over the child's UDP sockets} (/proc/net/udp)."""
        drops_by_inode = {}
        for table in ("/proc/net/udp", "/proc/net/udp6"):
            try:
                lines = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                drops_by_inode[fields[9]] = int(fields[-1])
        result = {}
        for proc in self.procs:
            try:
                fds = os.listdir(f"/proc/{proc.pid}/fd")
            except OSError:
                continue
            total = None
            for fd in fds:
                try:
                    target = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
                except OSError:
                    continue
                inode = target[len("socket:["):-1] if target.startswith("socket:[") else None
                if inode in drops_by_inode:
                    total = (total or 0) + drops_by_inode[inode]
            if total is not None:
                result[proc.bench_name] = total
        return result

    def stop_all(self, grace=5.0):
        """SIGTERM every process group (profiles are written on SIGTERM), then SIGKILL."""
        for proc in self.procs:
            if proc.poll() is None:
                signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            signal_group(proc, signal.SIGKILL)  # the group, in case it left children
            try:
                proc.wait(1.0)
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass


def signal_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the child's PID
    except (ProcessLookupError, PermissionError):
        pass


# Ports for --listen / --status are drawn below the kernel's ephemeral range (32768-60999
# by default): a port found free there stays free until the process started binds it, while
# one from bind(0) can be handed to another socket (an outgoing connection) in between.
PORT_RANGE = (20000, 32767)


def free_port(kind=socket.SOCK_STREAM):
    for _ in range(200):
        port = random.randint(*PORT_RANGE)
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free {kind.name} port on {HOST} in {PORT_RANGE}")


def status(port, timeout=2.0):
    """A node's --status JSON on HOST:port, or None if it does not answer 200."""
    from mahole.status import fetch

    try:
        code, _headers, body = asyncio.run(fetch(HOST, port, "/status", timeout=timeout))
    except (OSError, ValueError, asyncio.TimeoutError):
        return None
    return json.loads(body) if code == 200 else None


def wait_for(what, check, procs, timeout, interval=0.05):
    """check()'s first true result, polled every `interval` s; RuntimeError if a child of
    procs exits or `timeout` s pass first."""
    deadline = time.monotonic() + timeout
    while True:
        procs.check()
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready within {timeout:g} s")
        time.sleep(interval)  # polling interval, not a readiness guess
