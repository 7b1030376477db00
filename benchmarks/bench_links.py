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
    sudo python benchmarks/bench_links.py --matrix [--runs N]   # the NAT matrix, bursty links
    sudo python benchmarks/bench_links.py --soak 600 [--soak-both] [--soak-link PRESET]

--matrix runs all sixteen cells of the NAT matrix with both nodes on `bursty` links (the
suite runs three) --runs times (default 1) and counts, per cell, the runs that ended on the
expected path and the false failovers on the way. --soak SECONDS runs paced transfers and
idleness in turn on a direct path at 5 % random loss each way (the agent's link; both nodes'
with --soak-both) and counts its route switches after the first, with the nodes' reasons.

Not measured here yet: goodput on long and lossy links, IPv6 cells, path choice by RTT.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import _report
from bench_resilience import HERE, TESTS, run_tests  # the lab tests in a pytest of their own

LABELS = {
    "to_direct_ms_sync": "far agent (150 ms) / near connector (20 ms): time to direct, "
                         "synchronized StartPunching",
    "to_direct_ms_at_once": "the same, StartPunching to both at once (--no-punch-sync)",
}


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_long(test_file, out_dir, keyword, env, timeout):
    """run_tests with more time (a soak outlasts its 600 s) and the whole output."""
    cmd = [sys.executable, "-m", "pytest", str(TESTS / test_file), "-q", "-s", "-p",
           "no:cacheprovider", "--rootdir", str(HERE.parent), "-k", keyword]
    env = dict(os.environ, **env, MAHOLE_BENCH_DIR=str(out_dir), MAHOLE_REQUIRE_NETLAB="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=tempfile.gettempdir())
    return proc.returncode, proc.stdout


def soak(seconds, both, preset):
    with tempfile.TemporaryDirectory() as out:
        env = {"MAHOLE_SOAK_SECONDS": str(seconds), "MAHOLE_SOAK_LINK": preset,
               "MAHOLE_SOAK_BOTH": "1" if both else "0"}
        code, output = run_long("test_links_lab.py", out, "soak", env, seconds + 300)
        path = Path(out) / "links_run.json"
        runs = json.loads(path.read_text()).get("soak", []) if path.exists() else []
    if code != 0 or not runs:
        print(f"soak failed\n{output[-5000:]}", file=sys.stderr)
        return 1
    result = runs[0]
    where = "both nodes' links" if both else "the agent's link"
    print(f"soak on a direct path, {preset} on {where}")
    print(_report.table(["seconds", "transfers", "route switches after the first",
                         "failovers (agent)"],
                        [[result["seconds"], result["transfers"], result["route_switches"],
                          result["failovers"]]]))
    for reason in result["fell_back"]:
        print(f"  {reason}")
    print(f"wrote {_report.write('links-soak', result)}")
    return 0


def matrix(runs):
    cells, failures = {}, 0
    for index in range(runs):
        with tempfile.TemporaryDirectory() as out:
            code, output = run_long("test_nat_matrix.py", out, "bursty",
                                    {"MAHOLE_BURSTY_MATRIX": "1"}, 1800)
            if code != 0:
                failures += 1
                print(f"run {index + 1}: cells failed\n{output[-3000:]}", file=sys.stderr)
            path = Path(out) / "links_run.json"
            for r in json.loads(path.read_text()).get("matrix_bursty", []) \
                    if path.exists() else []:
                cell = cells.setdefault(f"{r['agent']} x {r['connector']}",
                                        {"expected": r["expected"], "as_expected": 0,
                                         "failovers": 0, "runs": 0})
                cell["runs"] += 1
                cell["as_expected"] += r["path"] == r["expected"]
                cell["failovers"] += r["failovers"]
        print(f"run {index + 1}/{runs} done", file=sys.stderr)
    print(f"NAT matrix on bursty links (both nodes), {runs} run(s)")
    print(_report.table(["cell", "expected", "ended as expected", "false failovers"],
                        [[name, c["expected"], f"{c['as_expected']}/{c['runs']}",
                          c["failovers"]] for name, c in cells.items()]))
    print(f"wrote {_report.write('links-matrix', {'runs': runs, 'cells': cells})}")
    return 1 if failures else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="repetitions of each setting (default 30, "
                                                 "quick 2; --matrix 1)")
    parser.add_argument("--quick", action="store_true", help="a couple of runs")
    parser.add_argument("--matrix", action="store_true",
                        help="the NAT matrix with both nodes on bursty links")
    parser.add_argument("--soak", type=float, metavar="SECONDS",
                        help="route switches of a healthy direct path in a run this long")
    parser.add_argument("--soak-both", action="store_true",
                        help="the soak's loss on both nodes' links, not the agent's only")
    parser.add_argument("--soak-link", default="lossy", help="the soak's link preset")
    args = parser.parse_args(argv)
    if args.soak:
        return soak(args.soak, args.soak_both, args.soak_link)
    if args.matrix:
        return matrix(args.runs or 1)
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
