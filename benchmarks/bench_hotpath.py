"""Classify + parse + route per packet, in batches of 32, with a 10,000-entry DCID table.

Compares, in one run: the compiled Router.dispatch, its pure-Python twin, and a baseline of
aioquic's `pull_quic_header` plus a dict lookup per packet (what a plain aioquic server
does). Target (foundation issue): compiled >= 20x the aioquic baseline.

    python benchmarks/bench_hotpath.py [--quick]
"""

import argparse
import os
import random
import sys
import time

try:
    import mahole  # noqa: F401
except ImportError:  # running from a source checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from aioquic.buffer import Buffer
from aioquic.quic.packet import pull_quic_header

import _report
from mahole import _fast

TABLE_SIZE = 10_000
BATCH = 32
TARGET_RATIO = 20.0


def make_traffic(rng, dcids, count):
    """Mostly 1-RTT packets (90%), some Handshake long headers, for known DCIDs."""
    packets = []
    for _ in range(count):
        dcid = rng.choice(dcids)
        if rng.random() < 0.9:
            data = bytes([0x43]) + dcid + rng.randbytes(1191)
        else:
            # Handshake packet (RFC 9000 §17.2.4): type bits 0b10, Length 0x44b0 = 1200.
            data = (b"\xe0\x00\x00\x00\x01\x08" + dcid + b"\x08" + rng.randbytes(8)
                    + b"\x44\xb0" + rng.randbytes(1200))
        packets.append((data, ("127.0.0.1", 40000)))
    return [packets[i:i + BATCH] for i in range(0, len(packets), BATCH)]


def run_router(impl, dcids, batches):
    router = impl.Router()
    for i, dcid in enumerate(dcids):
        router.add_connection(dcid, i)
    dispatch = router.dispatch
    start = time.perf_counter()
    routed = 0
    for batch in batches:
        routed += len(dispatch(batch).quic_handles)
    return time.perf_counter() - start, routed


def run_aioquic(dcids, batches):
    table = {dcid: i for i, dcid in enumerate(dcids)}
    start = time.perf_counter()
    routed = 0
    for batch in batches:
        for data, _addr in batch:
            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
            if table.get(header.destination_cid) is not None:
                routed += 1
    return time.perf_counter() - start, routed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--allow-twin", action="store_true",
                        help="run even if the compiled module is missing")
    args = parser.parse_args(argv)
    impls = _fast.implementations("hot")
    if "compiled" not in impls and not args.allow_twin:
        print("bench_hotpath: the compiled hot path is not built", file=sys.stderr)
        return 2

    rng = random.Random(1)
    dcids = [rng.randbytes(8) for _ in range(TABLE_SIZE)]
    packets = 3_200 if args.quick else 64_000
    repeats = 3 if args.quick else 7
    batches = make_traffic(rng, dcids, packets)

    runners = {name: (lambda impl=impl: run_router(impl, dcids, batches))
               for name, impl in impls.items()}
    runners["aioquic"] = lambda: run_aioquic(dcids, batches)
    ns_per_packet = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():  # interleaved, so drift hits all alike
            elapsed, routed = run()
            assert routed == packets, (name, routed)
            ns_per_packet[name].append(elapsed / packets * 1e9)

    medians = {name: _report.median(v) for name, v in ns_per_packet.items()}
    baseline = medians["aioquic"]
    rows = []
    for name in runners:
        lo, hi = _report.spread(ns_per_packet[name])
        rows.append([name, medians[name], lo, hi, 1e9 / medians[name], baseline / medians[name]])
    print(f"classify+parse+route, {packets} packets x {repeats} runs, table {TABLE_SIZE}, "
          f"batch {BATCH}")
    print(_report.table(["implementation", "ns/packet (median)", "min", "max", "packets/s",
                         "x aioquic"], rows))
    ratio = baseline / medians["compiled"] if "compiled" in medians else None
    if ratio is not None:
        verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
        print(f"compiled is {ratio:.1f}x the aioquic baseline ({verdict} the {TARGET_RATIO:.0f}x target)")
    path = _report.write("hotpath", {
        "packets": packets, "repeats": repeats, "table_size": TABLE_SIZE, "batch": BATCH,
        "ns_per_packet": ns_per_packet, "median_ns_per_packet": medians,
        "ratio_compiled_vs_aioquic": ratio, "target_ratio": TARGET_RATIO,
        "ratio_twin_vs_aioquic": baseline / medians["python"],
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
