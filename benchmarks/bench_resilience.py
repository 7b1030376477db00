"""Failover, recovery and re-registration times behind real NATs, medians over repeated runs.

Runs the NAT-lab resilience tests (tests/test_resilience.py: real role processes in network
namespaces with nftables NATs; needs root) --runs times; each run records how long traffic
stalled after a direct path was cut mid-transfer, how long an idle cut took to notice, how long
after the cut was lifted the session was direct again, how long a transfer stalled and how
long the session took to be direct again when the agent's public address moved (its NAT
rebound) and when its host moved to another uplink behind another NAT (noticed by its own
network monitor), and how long nodes took to re-register once the intermediate returned. The NAT
matrix (direct rate and time to direct per cell) is benchmarks/bench_nat_matrix.py's.

    sudo python benchmarks/bench_resilience.py [--runs N] [--quick]
    sudo python benchmarks/bench_resilience.py --links lan,wifi,lte,long [--runs N]

With --links, the active cut and the roaming tests run on each link preset (tests/netlab/
wire.py, on both nodes' links) and the table gives p50 and p95 per preset.
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

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"

TARGETS = {  # the resilience and real-links issues' goals, in seconds
    "failover_active_s": 1.0,
    "failover_idle_s": 3.0,
    "roaming_stall_s": 1.0,
    "roaming_to_direct_s": 1.5,
    "move_stall_s": 1.0,
    "move_to_direct_s": 1.5,
    "reregister_s": 5.0,
}
LABELS = {
    "failover_active_s": "direct path cut during a transfer -> data flowing (longest stall)",
    "failover_idle_s": "direct path cut while idle -> on the relay",
    "recovery_s": "cut lifted -> direct again",
    "roaming_stall_s": "new public address under a transfer -> longest stall",
    "roaming_to_direct_s": "new public address -> direct again",
    "move_stall_s": "uplink moved to another NAT under a transfer -> longest stall",
    "move_to_direct_s": "uplink moved -> direct again",
    "reregister_s": "intermediate back -> nodes re-registered",
}


LINK_EVENTS = ("failover_active_s", "roaming_stall_s", "roaming_to_direct_s", "move_stall_s",
               "move_to_direct_s")
LINK_TESTS = "cut_mid_transfer or new_public_address or move_to_another_uplink"


def run_tests(test_file, out_dir, keyword=None, env=None):
    cmd = [sys.executable, "-m", "pytest", str(TESTS / test_file), "-q", "-p", "no:cacheprovider",
           "--rootdir", str(HERE.parent)]
    if keyword:
        cmd += ["-k", keyword]
    env = dict(os.environ, **(env or {}), MAHOLE_BENCH_DIR=str(out_dir),
               MAHOLE_REQUIRE_NETLAB="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          cwd=tempfile.gettempdir())
    return proc.returncode, proc.stdout[-3000:]


def resilience_run(out, keyword, env, values, label):
    """One run of the resilience tests; their measurements added to `values` (name -> list).
    False (and the tail of pytest's output) if a test failed."""
    code, tail = run_tests("test_resilience.py", out, keyword, env)
    if code != 0:
        print(f"{label}: tests failed\n{tail}", file=sys.stderr)
    path = Path(out) / "resilience_run.json"
    if path.exists():
        for name, entry in json.loads(path.read_text()).items():
            values.setdefault(name, []).extend(entry["values"])
    return code == 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="repetitions (default 5, quick 1)")
    parser.add_argument("--quick", action="store_true", help="one run of the cut tests only")
    parser.add_argument("--links", help="comma-separated link presets: failover and roaming "
                                            "on each (p50/p95)")
    args = parser.parse_args(argv)
    runs = args.runs or (1 if args.quick else 5)
    if args.links:
        return per_link(args.links.split(","), runs)
    values, failures = {}, 0
    for index in range(runs):
        with tempfile.TemporaryDirectory() as out:
            failures += not resilience_run(out, "cut" if args.quick else None, None, values,
                                           f"run {index + 1}")
        print(f"run {index + 1}/{runs} done", file=sys.stderr)
    rows = []
    for name, label in LABELS.items():
        if name in values:
            lo, hi = _report.spread(values[name])
            target = TARGETS.get(name)
            med = statistics.median(values[name])
            verdict = "-" if target is None else ("met" if med < target else "MISSED")
            rows.append([label, round(med, 3), round(lo, 3), round(hi, 3), len(values[name]),
                         f"< {target:g} s {verdict}" if target else "-"])
    print(f"resilience behind port-restricted NATs (rebinding: symmetric x full-cone), "
          f"{runs} run(s)")
    print(_report.table(["event", "median s", "min s", "max s", "n", "target"], rows))
    data = {"runs": runs, "test_failures": failures, "values_s": values,
            "median_s": {k: statistics.median(v) for k, v in values.items()},
            "targets_s": TARGETS}
    print(f"wrote {_report.write('resilience' + ('-quick' if args.quick else ''), data)}")
    return 1 if failures else 0


def per_link(links, runs):
    """Failover and roaming on each link preset: p50/p95 of every event over `runs` runs."""
    per, failures = {}, 0
    for link in links:
        values = per.setdefault(link, {})
        for index in range(runs):
            with tempfile.TemporaryDirectory() as out:
                failures += not resilience_run(out, LINK_TESTS, {"MAHOLE_LAB_LINK": link},
                                               values, f"{link} run {index + 1}")
            print(f"{link}: run {index + 1}/{runs} done", file=sys.stderr)
    rows = []
    for link, values in per.items():
        for name in LINK_EVENTS:
            got = values.get(name, [])
            rows.append([link, LABELS[name], _p(got, 0.5), _p(got, 0.95), len(got)])
    print(f"failover and roaming per link preset (both nodes' links), {runs} run(s) each")
    print(_report.table(["link", "event", "p50 s", "p95 s", "n"], rows))
    data = {"runs": runs, "test_failures": failures, "links": {
        link: {name: {"values_s": got, "p50_s": _p(got, 0.5), "p95_s": _p(got, 0.95)}
               for name, got in values.items()} for link, values in per.items()}}
    print(f"wrote {_report.write('resilience-links', data)}")
    return 1 if failures else 0


def _p(values, q):
    value = _report.percentile(values, q)
    return None if value is None else round(value, 3)


if __name__ == "__main__":
    sys.exit(main())
