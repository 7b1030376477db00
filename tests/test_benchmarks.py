"""Every benchmark runs (quick mode) and writes its JSON report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script, report, key", [
    ("bench_hotpath.py", "hotpath.json", "median_ns_per_packet"),
    ("bench_recv.py", "bench_recv-quick.json", None),
    ("bench_relay.py", "bench_relay-quick.json", None),
    ("bench_tunnel.py", "tunnel-quick.json", "median_mb_per_s"),
    ("bench_sched.py", "sched-quick.json", "median_ns_per_timer"),
    ("bench_packets.py", "packets-quick.json", None),
    ("bench_punch.py", "punch-quick.json", None),
    ("bench_fleet.py", "fleet-quick.json", None),
    ("bench_many.py", "many-quick.json", None),
])
def test_benchmark_quick_run(tmp_path, script, report, key):
    if script == "bench_fleet.py":
        from redis_helpers import need_redis
        need_redis()
    env = dict(os.environ, MAHOLE_BENCH_DIR=str(tmp_path))
    run = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", "--allow-twin"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout
    data = json.loads((tmp_path / report).read_text())
    assert data["benchmark"]
    if key:
        assert all(v > 0 for v in data[key].values())


def test_bench_relay_quick_with_relay_threads(tmp_path):
    """--relay-threads 2 (quick: mahole only, saturated, brief): 8 flows through one relay
    thread and through two, each relayed, with the ratio and the relay's CPU reported."""
    env = dict(os.environ, MAHOLE_BENCH_DIR=str(tmp_path))
    run = subprocess.run([sys.executable, str(BENCHMARKS / "bench_relay.py"), "--quick",
                          "--allow-twin", "--relay-threads", "2", "--flows", "4"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    data = json.loads((tmp_path / "bench_relay-threads-quick.json").read_text())
    assert (data["relay_threads"], data["flows"]) == (2, 4)
    assert set(data["summary"]) == {"mahole x1", "mahole x2"}
    assert all(s["saturated_rx_pps"] > 0 for s in data["summary"].values())
    assert data["ratios_by_pair"]["mahole x2 / mahole x1"]["saturated"] > 0


def test_bench_many_quick_with_agent_args_and_profiles(tmp_path):
    """--agent-args reaches the agent (its send budget in the report is the one asked for),
    and --profile leaves a cProfile file per role."""
    env = dict(os.environ, MAHOLE_BENCH_DIR=str(tmp_path))
    run = subprocess.run([sys.executable, str(BENCHMARKS / "bench_many.py"), "--quick",
                          "--allow-twin", "--agent-args", "--send-budget 1048576",
                          "--profile", str(tmp_path / "prof")],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    data = json.loads((tmp_path / "many-quick.json").read_text())
    assert data["agent_args"] == ["--send-budget", "1048576"]
    assert data["runs_detail"]["relay"][0]["agent_send_budget"]["limit"] == 1048576
    names = sorted(p.name for p in (tmp_path / "prof").iterdir())
    assert names == ["relay-0-agent.prof", "relay-0-connector0.prof",
                     "relay-0-connector1.prof", "relay-0-intermediate.prof"]


def test_bench_goodput_reports_p50_p95_and_the_ratios():
    """bench_goodput.py needs root and minutes in the NAT lab, so CI checks its report: the
    median, the slow tail (the goodput of the 95th-percentile time), n, failures and the
    ratios to the baselines with the same congestion controller."""
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    import bench_goodput

    assert bench_goodput.summary([]) == (None, None, 0)
    assert bench_goodput.summary([4.0, 1.0, 2.0]) == (2.0, 1.0, 3)
    mid, tail, n = bench_goodput.summary([10.0] * 18 + [2.0, 2.0])  # 2 slow in 20: p95
    assert (mid, n) == (10.0, 20) and tail == pytest.approx(2.0)
    results = {"lte": {
        "mahole direct cubic": {"mb_per_s": [3.0, 4.0, 5.0], "failed": 0},
        "aioquic cubic": {"mb_per_s": [2.0], "failed": 1},
        "tcp cubic": {"mb_per_s": [8.0], "failed": 0},
        "tcp reno": {"mb_per_s": [], "failed": 0, "skipped": "out of time"},
        "_kernel_default_cc": "bbr"}}
    rows = {(r[0], r[1], r[2]): r for r in bench_goodput.rows(results)}
    assert len(rows) == 4
    assert rows["lte", "mahole direct", "cubic"][3:9] == [4.0, 3.0, 3, 0, "2.00x", "0.50x"]
    assert rows["lte", "aioquic", "cubic"][5:9] == [1, 1, "-", "0.25x"]
    assert rows["lte", "tcp", "reno"][3:] == ["-", "-", 0, 0, "-", "-", "out of time"]
    assert len(bench_goodput.HEADERS) == len(rows["lte", "tcp", "reno"])


def test_bench_birthday_reports_the_rate_with_its_interval_against_the_formula():
    """bench_birthday.py needs root and minutes in the NAT lab, so CI checks its arithmetic:
    the 95 % interval of a rate and the (K, M) points it reads."""
    import sys
    sys.path.insert(0, str(BENCHMARKS))
    import bench_birthday

    low, high = bench_birthday.wilson(30, 30)
    assert 0.88 < low < 0.89 and high == 1.0  # 30 of 30 cannot promise 98 %
    low, high = bench_birthday.wilson(15, 30)
    assert low < 0.5 < high
    assert bench_birthday._points("64:256,256:1024") == [(64, 256), (256, 1024)]
    assert bench_birthday.LAB_PORTS == 64512


def test_bench_nat_matrix_reports_rate_percentiles_and_strategy_per_cell():
    """bench_nat_matrix.py needs root and many minutes in the NAT lab, so CI checks its
    report: a cell's direct rate, p50/p95 of the direct runs only, the strategies, the
    Markdown matrix and the --cells subsets."""
    import argparse
    import sys
    sys.path.insert(0, str(BENCHMARKS))
    import bench_nat_matrix as bench

    runs = ([{"path": "direct", "strategy": "birthday", "to_direct_ms": float(t)}
             for t in range(100, 2800, 100)]  # 27 direct: 100 .. 2,700 ms
            + [{"path": "relay", "strategy": "birthday", "to_direct_ms": None}] * 2
            + [{"path": "error", "error": "timed out"}])
    cell = bench.summarize("symmetric", "port-restricted", runs)
    assert (cell["runs"], cell["direct"], cell["errors"]) == (29, 27, 1)
    assert (cell["to_direct_ms_p50"], cell["to_direct_ms_p95"]) == (1400.0, 2600.0)
    assert cell["strategies"] == {"birthday": 29} and cell["direct_within_10s"] == 27
    assert bench.cell_text(cell) == "27/29 · 1.4 s / 2.6 s · birthday (1 failed)"
    relay = bench.summarize("symmetric", "symmetric", [{"path": "relay", "strategy": "relay"}])
    assert bench.cell_text(relay) == "0/1 · relay"
    table = bench.markdown([cell, relay], 30).splitlines()
    assert table[0] == "| agent \\ connector | port-restricted | symmetric |"
    assert table[2] == "| symmetric | 27/29 · 1.4 s / 2.6 s · birthday (1 failed) | 0/1 · relay |"
    report = bench.compact(cell)
    assert "results" not in report and report["to_direct_ms"][26:] == [2700.0, None, None, None]
    assert report["endings"] == {"direct: ": 27, "relay: ": 2, "error: timed out": 1}
    assert bench._cells("symmetric:port-restricted,none:*")[:2] == [
        ("symmetric", "port-restricted"), ("none", "none")]
    assert len(bench._cells("*:*")) == len(bench.PRESETS) ** 2
    with pytest.raises(argparse.ArgumentTypeError):
        bench._cells("symmetric:cone")


def test_bench_relay_drain_alone_report(capsys):
    """The "drain, relay alone" rows: rate and CPU medians, the flows each socket got, loss
    from counts and drop counters, and the N / 1 ratio beside what the CPU alone bounds it at."""
    import argparse
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    import bench_relay

    def run(pps, threads, share, lost=0, drops=0):
        return {"rx_pps": pps, "seconds": 0.5, "relay_cores": len(threads),
                "thread_cpu_s": threads, "backlog_share": share, "sent": 1000,
                "received": 1000 - lost, "drops_at_relay": drops, "drops_at_receiver": 0,
                "bad_batches": 0}

    args = argparse.Namespace(relay_threads=2, flows=8)
    runs = {"mahole x1 drain alone": [run(500.0, [0.6], [1.0]), run(600.0, [0.5], [1.0]),
                                      run(400.0, [0.7], [1.0])],
            "mahole x2 drain alone": [run(900.0, [0.3, 0.31], [0.5, 0.5]),
                                      run(1000.0, [0.29, 0.3], [0.5, 0.5]),
                                      run(1100.0, [0.27, 0.28], [0.5, 0.5], drops=2)]}
    by_pair = {}
    summary = bench_relay._report_alone(args, runs, [[5, 3], [4, 4]], by_pair)
    assert summary["mahole x1 drain alone"]["rx_pps"] == 500.0
    assert summary["mahole x1 drain alone"]["lossless"]
    x2 = summary["mahole x2 drain alone"]
    assert (x2["flows_by_socket"], x2["busiest_thread_cpu_s"], x2["drops"]) == ([4, 4], 0.3, 2)
    assert not x2["lossless"]
    ratio = by_pair["mahole x2 drain alone / mahole x1 drain alone"]
    assert ratio["drain_alone"] == 2.0 and ratio["drain_alone_cpu_bound"] == 2.0
    out = capsys.readouterr().out
    assert "splits tried 5:3, 4:4" in out and "2.00x (target >= 1.7x met; LOSS)" in out
