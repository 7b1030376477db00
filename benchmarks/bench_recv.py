"""Batch receive rate on loopback: BatchSocket (recvmmsg) vs a recvfrom loop vs asyncio.

    python benchmarks/bench_recv.py [--quick] [--allow-twin] [--reps N] [--duration S]

How it measures. One sender process sends 1200-byte datagrams to 127.0.0.1. It works in
rounds: while the receiver waits, the sender fills the receiver's (enlarged) socket
buffer with one round of datagrams and reports how many it sent; then the receiver drains
the round as fast as it can and only that drain is timed. So the receiver is the
bottleneck by construction: on loopback the sender pays for the whole kernel delivery
path and would otherwise cap every receiver at its own rate. Rounds repeat for about
`--duration` seconds per measurement. The three receivers run interleaved against the
same sender, `--reps` times each; each does the same per-datagram work (unpack data and
address, count it). Drops = sent - received (a round overflowing the socket buffer);
rounds with drops are reported and left out of the rate.

Reported: datagrams/s medians, and the ratios compiled/recvfrom (target >= 1.2) and
compiled/asyncio (target >= 5), all from this one run. JSON goes to
benchmarks/results/bench_recv.json (bench_recv-quick.json for --quick).
"""

import argparse
import asyncio
import multiprocessing
import select
import socket
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
try:
    import mahole  # noqa: F401 - prefer the installed package
except ImportError:
    sys.path.insert(0, str(HERE.parent))

import _report  # noqa: E402
from mahole import _fast  # noqa: E402

NAME = "bench_recv"
DATAGRAM_SIZE = 1200  # QUIC clients pad Initial datagrams to at least 1200 bytes (RFC 9000 §14.1)
RECV_BUFSIZE = 65535  # what each receiver asks for per datagram (BatchSocket's default)
ROUND_MAX = 8192  # datagrams per round when the socket buffer allows
TRUESIZE = 2304  # kernel memory one queued 1200-byte loopback datagram costs (skb + 2 KiB)
RCVBUF_WANTED = 32 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; root may exceed rmem_max
STALL = 0.25  # seconds without a datagram: the rest of the round was dropped
TARGETS = {"recvfrom": 1.2, "asyncio": 5.0}  # compiled rate / this method's rate
SENDER_BATCH = 64
SMALL_ROUND = 1000  # below this many datagrams per round, say the buffer is small

METHODS = ("batch", "recvfrom", "asyncio")


# --- sender process --------------------------------------------------------------------------


def _sender(conn):
    """Child process: on ("fill", port, count) send count datagrams, reply with the number."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    bsock = _fast.BatchSocket(sock, batch_size=SENDER_BATCH) if _fast.BATCH_COMPILED else None
    payload = bytes(DATAGRAM_SIZE)
    try:
        while True:
            msg = conn.recv()
            if msg[0] != "fill":
                break
            _, port, count = msg
            dest = ("127.0.0.1", port)
            sent = 0
            if bsock is not None:
                full = [(payload, dest)] * SENDER_BATCH
                while sent < count:
                    want = min(SENDER_BATCH, count - sent)
                    done = bsock.send_batch(full if want == SENDER_BATCH else full[:want])
                    sent += done
                    if done < want:
                        select.select([], [sock], [], 1.0)
            else:
                while sent < count:
                    try:
                        sock.sendto(payload, dest)
                    except BlockingIOError:
                        select.select([], [sock], [], 1.0)
                        continue
                    sent += 1
            conn.send(sent)
    finally:
        sock.close()


# --- receivers -------------------------------------------------------------------------------


def _receiver_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_WANTED)
    except OSError:  # not privileged: capped at net.core.rmem_max
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_WANTED)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


class _Batch:
    """BatchSocket.recv_batch until the round is in."""

    def __init__(self, sock, batch_size):
        self.sock = sock
        self.bsock = _fast.BatchSocket(sock, batch_size=batch_size)

    def drain(self, target):
        recv_batch, fd = self.bsock.recv_batch, self.sock.fileno()
        got, busy, stalls = 0, 0.0, 0
        start = time.perf_counter()
        while got < target:
            batch = recv_batch()
            if batch:
                for data, addr in batch:
                    got += 1
                continue
            busy += time.perf_counter() - start
            stalls += 1
            if not select.select([fd], [], [], STALL)[0]:
                return got, busy, stalls
            start = time.perf_counter()
        return got, busy + time.perf_counter() - start, stalls

    def close(self):
        self.sock.close()


class _Recvfrom:
    """A plain non-blocking sock.recvfrom loop, select() when empty."""

    def __init__(self, sock, batch_size):
        self.sock = sock

    def drain(self, target):
        recvfrom, fd = self.sock.recvfrom, self.sock.fileno()
        got, busy, stalls = 0, 0.0, 0
        start = time.perf_counter()
        while got < target:
            try:
                data, addr = recvfrom(RECV_BUFSIZE)
            except BlockingIOError:
                busy += time.perf_counter() - start
                stalls += 1
                if not select.select([fd], [], [], STALL)[0]:
                    return got, busy, stalls
                start = time.perf_counter()
                continue
            got += 1
        return got, busy + time.perf_counter() - start, stalls

    def close(self):
        self.sock.close()


class _Counter(asyncio.DatagramProtocol):
    def __init__(self):
        self.got = 0
        self.target = 0
        self.done = None
        self.finished_at = 0.0

    def datagram_received(self, data, addr):
        self.got += 1
        if self.got == self.target:
            self.finished_at = time.perf_counter()
            self.done.set_result(None)


class _Asyncio:
    """An asyncio DatagramProtocol on the default event loop; the loop runs per round."""

    def __init__(self, sock, batch_size):
        self.loop = asyncio.new_event_loop()
        self.proto = _Counter()
        self.transport, _ = self.loop.run_until_complete(
            self.loop.create_datagram_endpoint(lambda: self.proto, sock=sock))
        self._watch_handle = None

    def drain(self, target):
        proto, loop = self.proto, self.loop
        proto.got, proto.target, proto.done = 0, target, loop.create_future()
        self._watch_handle = loop.call_later(STALL, self._watch, -1)
        start = time.perf_counter()
        loop.run_until_complete(proto.done)
        self._watch_handle.cancel()
        if proto.got < target:
            return proto.got, 0.0, 1  # stalled: the round is not timed
        return proto.got, proto.finished_at - start, 0

    def _watch(self, seen):
        """End the round if no datagram came in STALL seconds (the rest was dropped)."""
        proto = self.proto
        if proto.got == seen:
            proto.done.set_result(None)
        else:
            self._watch_handle = self.loop.call_later(STALL, self._watch, proto.got)

    def close(self):
        self.transport.close()
        self.loop.run_until_complete(asyncio.sleep(0))  # let the transport finish closing
        self.loop.close()


RECEIVERS = {"batch": _Batch, "recvfrom": _Recvfrom, "asyncio": _Asyncio}


def measure(method, conn, duration, batch_size):
    """Rounds of fill-then-drain for about `duration` seconds; returns the measurement."""
    sock = _receiver_socket()
    rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    per_round = max(16, min(ROUND_MAX, int(0.75 * rcvbuf / TRUESIZE)))
    receiver = RECEIVERS[method](sock, batch_size)
    port = sock.getsockname()[1]
    sent = received = timed = rounds = bad_rounds = stalls = 0
    seconds = 0.0
    try:
        end = time.perf_counter() + duration
        while rounds == 0 or time.perf_counter() < end:
            conn.send(("fill", port, per_round))
            n = conn.recv()
            got, busy, round_stalls = receiver.drain(n)
            sent += n
            received += got
            rounds += 1
            stalls += round_stalls
            if got < n:
                bad_rounds += 1
            else:
                timed += got
                seconds += busy
    finally:
        receiver.close()
    return {
        "rate": timed / seconds if seconds else 0.0,
        "sent": sent,
        "received": received,
        "drops": sent - received,
        "rounds": rounds,
        "rounds_with_drops": bad_rounds,
        "stalls": stalls,
        "per_round": per_round,
        "rcvbuf": rcvbuf,
    }


# --- main --------------------------------------------------------------------------------------


def _parse(argv):
    parser = argparse.ArgumentParser(
        prog="bench_recv.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: one short repetition of each method")
    parser.add_argument("--allow-twin", action="store_true",
                        help="measure the pure-Python twin if the compiled module is missing")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each method")
    parser.add_argument("--duration", type=float, default=1.0,
                        help="seconds per measurement (fill + drain)")
    parser.add_argument("--batch-size", type=int, default=32, help="BatchSocket batch_size")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.duration = 1, 0.1
    if args.reps < 1 or args.duration <= 0 or not 1 <= args.batch_size <= 1024:
        parser.error("--reps must be >= 1, --duration > 0, --batch-size 1-1024")
    return args


def _warm_allocator():
    """Put malloc in the state a long-running process reaches.

    asyncio reads each datagram into a fresh 256 KiB buffer. glibc serves blocks that large
    with mmap until some large block has been freed (its dynamic mmap threshold), which makes
    every asyncio read ~4x slower in a young process and left the result bimodal. Freeing one
    1 MiB block raises the threshold; only asyncio benefits, so the ratio stays conservative.
    """
    block = bytes(1 << 20)
    del block


def main(argv=None):
    args = _parse(argv)
    if not _fast.BATCH_COMPILED and not args.allow_twin:
        print("bench_recv: the compiled mahole._fast._batch module is not available "
              "(build it, or pass --allow-twin to measure the pure-Python twin)",
              file=sys.stderr)
        return 2
    _warm_allocator()

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    sender = ctx.Process(target=_sender, args=(child,), daemon=True)
    sender.start()
    results = {m: [] for m in METHODS}
    try:
        parent.send(("fill", 9, 0))  # wait until the sender is up, outside any measurement
        parent.recv()
        for _ in range(args.reps):
            for method in METHODS:  # interleaved, so drift hits every method alike
                results[method].append(measure(method, parent, args.duration, args.batch_size))
    finally:
        try:
            parent.send(("quit",))
        except OSError:
            pass
        sender.join(5)
        if sender.is_alive():
            sender.terminate()

    batch_label = ("BatchSocket.recv_batch (recvmmsg)" if _fast.BATCH_COMPILED
                   else "BatchSocket.recv_batch (python twin)")
    labels = {"batch": batch_label, "recvfrom": "sock.recvfrom loop",
              "asyncio": "asyncio DatagramProtocol"}
    medians = {m: _report.median([r["rate"] for r in results[m]]) for m in METHODS}
    ratios = {m: (medians["batch"] / medians[m] if medians[m] else 0.0) for m in TARGETS}
    rows = []
    for m in METHODS:
        lo, hi = _report.spread([r["rate"] for r in results[m]])
        ratio = ratios.get(m)
        rows.append([
            labels[m], medians[m], lo, hi,
            "1" if m == "batch" else f"{ratio:.2f}x",
            f">= {TARGETS[m]}x {'met' if ratio >= TARGETS[m] else 'MISSED'}" if m in TARGETS
            else "-",
            sum(r["drops"] for r in results[m]),
            sum(r["rounds"] for r in results[m]),
        ])
    first = results["batch"][0]
    print(f"loopback receive, {DATAGRAM_SIZE}-byte datagrams, {first['per_round']} per round, "
          f"SO_RCVBUF {first['rcvbuf']}, batch_size {args.batch_size}, "
          f"{args.reps} x {args.duration:g}s per method")
    if first["per_round"] < SMALL_ROUND:
        print(f"note: only {first['per_round']} datagrams fit a round; per-round overheads weigh "
              f"more (raise net.core.rmem_max, e.g. to {RCVBUF_WANTED})")
    print(_report.table(
        ["receiver", "datagrams/s", "min", "max", "compiled/this", "target", "drops", "rounds"],
        rows))
    path = _report.write(NAME + ("-quick" if args.quick else ""), {
        "datagram_size": DATAGRAM_SIZE,
        "recv_bufsize": RECV_BUFSIZE,
        "batch_size": args.batch_size,
        "compiled": _fast.BATCH_COMPILED,
        "quick": args.quick,
        "reps": args.reps,
        "duration_s": args.duration,
        "method": "sender fills the socket buffer, receiver drains; drain time only",
        "medians": medians,
        "ratios": {f"batch_vs_{m}": ratios[m] for m in TARGETS},
        "targets": {f"batch_vs_{m}": t for m, t in TARGETS.items()},
        "targets_met": {f"batch_vs_{m}": ratios[m] >= t for m, t in TARGETS.items()},
        "runs": results,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
