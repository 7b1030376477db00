"""Benchmark output: a plain table on stdout plus a JSON file under benchmarks/results/."""

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def median(values):
    return statistics.median(values)


def percentile(values, q):
    """The q-quantile (0-1) by nearest rank, None without values: p50 and p95 of runs."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def spread(values):
    """(min, max) of repeated measurements."""
    return min(values), max(values)


def table(headers, rows):
    """Format rows (lists of cells) as a left-aligned text table."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value):
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


def write(name, data):
    """Write data (plus machine context) to benchmarks/results/NAME.json and return the path."""
    out_dir = Path(os.environ.get("MAHOLE_BENCH_DIR", RESULTS))
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        **data,
    }
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path
