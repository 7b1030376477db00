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
    ("bench_punch.py", "punch-quick.json", None),
    ("bench_fleet.py", "fleet-quick.json", None),
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
