"""mahole on links with the character of real ones (the NAT lab's wire links), repeated runs.

Runs the lab tests on emulated links (tests/test_links_lab.py: real role processes in network
namespaces, links through tests/netlab/wire.py; needs root) --runs times and reports the
distributions:

- time to direct (session opened at the agent -> direct route) for an agent 150 ms (RTT)
  from everything and a connector 20 ms away, behind port-restricted NATs, with the
  intermediate's RTT-synchronized StartPunching and with `--no-punch-sync` (both at once);
- at 5 % random loss on both nodes' links: false failovers of a healthy direct path (none
  expected) and the time to notice a real cut.

    sudo python benchmarks/bench_links.py [--runs N] [--quick]

Not measured here yet: the NAT matrix under `lte` and `bursty` links, goodput on long and
lossy links, IPv6 cells, path choice by RTT.
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import _report
from bench_resilience import run_tests  # the lab tests in a pytest of their own

LABELS = {
    "to_direct_ms_sync": "far agent (150 ms) / near connector (20 ms): time to direct, "
                         "synchronized StartPunching",
    "to_direct_ms_at_once": "the same, StartPunching to both at once (--no-punch-sync)",
}


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="repetitions of each setting (default 30, "
                                                 "quick 2)")
    parser.add_argument("--quick", action="store_true", help="a couple of runs")
    args = parser.parse_args(argv)
    runs = args.runs or (2 if args.quick else 30)
    values, failures = {}, 0
    with tempfile.TemporaryDirectory() as out:
        for index in range(runs):
            code, tail = run_tests("test_links_lab.py", out, "far_agent")
            if code != 0:
                failures += 1
                print(f"run {index + 1}: tests failed\n{tail}", file=sys.stderr)
            print(f"run {index + 1}/{runs} done", file=sys.stderr)
        path = Path(out) / "links_run.json"
        if path.exists():
            values = json.loads(path.read_text())
    rows = []
    for name, label in LABELS.items():
        got = [v for v in values.get(name, []) if v is not None]
        if got:
            rows.append([label, round(statistics.median(got)), round(percentile(got, 0.95)),
                         len(got)])
    print(f"time to direct on emulated links, {runs} run(s) per setting")
    print(_report.table(["setting", "p50 ms", "p95 ms", "n"], rows))
    data = {"runs": runs, "test_failures": failures, "values_ms": values,
            "p50_ms": {k: statistics.median(v) for k, v in values.items() if v},
            "p95_ms": {k: percentile(v, 0.95) for k, v in values.items() if v}}
    print(f"wrote {_report.write('links' + ('-quick' if args.quick else ''), data)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
