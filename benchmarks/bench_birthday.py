"""Birthday probing behind real NATs: the direct rate against the predicted curve, and the
time to direct, over repeated independent sessions.

Each run builds a fresh NAT lab (tests/netlab: network namespaces and nftables; needs root)
with the agent behind `symmetric` (masquerade fully-random: a random port in 1024..65535, so
N = 64,512) and the connector behind `port-restricted`, starts the three roles (the
intermediate with --stun-alt-port, so both nodes classify their NAT), opens one session and
waits for its punching result. The intermediate gives the pair the "birthday" strategy: the
agent opens K = 256 extra sockets, the connector sends up to M = 1,024 probes.

    sudo python benchmarks/bench_birthday.py [--runs N] [--quick]

Prints the direct rate with its 95 % interval against P = 1 - (1 - K/N)^M, p50/p95 of
StartPunching -> direct route, the probes the connector sent, and writes
benchmarks/results/birthday.json.
"""

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
for path in (HERE, HERE.parent, TESTS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import _report  # noqa: E402
from mahole.ice.birthday import DEFAULT_PROBES, DEFAULT_SOCKETS, success_probability  # noqa: E402

ALT_PORT = 3479
LAB_PORTS = 65535 - 1024 + 1  # masquerade fully-random without a range: 1024..65535
TARGET_RATE, TARGET_SECONDS = 0.95, 10.0


def one_run(index, log):
    """One fresh lab and session: a dict of what happened."""
    from labroles import Deployment, wait
    from netlab import Lab

    tmp = Path(tempfile.mkdtemp(prefix=f"bench-birthday-{index}-"))
    with Lab() as lab:
        d = Deployment(lab, tmp, "symmetric", "port-restricted",
                       intermediate_args=("--stun-alt-port", str(ALT_PORT)))
        d.wait_registered(30)
        wait(lambda: (nodes := ((d.status(d.intermediate) or {}).get("nodes") or {})
                      .get("list")) and len(nodes) == 2 and all(n["nat"] for n in nodes),
             15, "both NAT summaries", d)
        data = os.urandom(16 << 10)
        if d.round_trip(data) != data:
            raise RuntimeError("the echo came back different")
        session = wait(lambda: (s := d.session()) and s["punch"] and s["punch"]["path"]
                       and s, 20, "hole punching to finish", d)
        connector = (d.status(d.connector) or {}).get("sessions") or [{}]
        easy = connector[0].get("birthday") or {}
        hard = session.get("birthday") or {}
        result = {
            "path": session["path"], "strategy": session["strategy"],
            "to_direct_ms": session["switch_ms"], "punch_elapsed_ms":
            session["punch"]["elapsed_ms"], "probes_sent": easy.get("probes_sent"),
            "landed": easy.get("landed"), "hard_route": hard.get("route"),
            "reason": session["punch"]["reason"],
        }
    log(f"run {index + 1}: {result['path']} ({result['strategy']}), "
        f"{result['to_direct_ms']} ms, {result['probes_sent']} probes")
    return result


def wilson(successes, n, z=1.96):
    """95 % Wilson score interval of a rate."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="independent sessions (default 30, quick 3)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_birthday: the NAT lab needs root", file=sys.stderr)
        return 2
    runs = args.runs or (3 if args.quick else 30)
    started = time.monotonic()
    results = []
    for index in range(runs):
        try:
            results.append(one_run(index, lambda line: print(line, flush=True)))
        except (AssertionError, RuntimeError, OSError) as exc:
            print(f"run {index + 1}: failed: {str(exc).splitlines()[0]}", flush=True)
            results.append({"path": "error", "error": str(exc)[:2000]})
    done = [r for r in results if r["path"] != "error"]
    direct = [r for r in done if r["path"] == "direct"]
    within = [r for r in direct if r["to_direct_ms"] is not None
              and r["to_direct_ms"] <= TARGET_SECONDS * 1000]
    predicted = success_probability(DEFAULT_SOCKETS, DEFAULT_PROBES, LAB_PORTS)
    low, high = wilson(len(direct), len(done))
    times = [r["to_direct_ms"] for r in direct if r["to_direct_ms"] is not None]
    probes = [r["probes_sent"] for r in direct if r["probes_sent"] is not None]
    rows = [
        ["direct rate", f"{len(direct)}/{len(done)} = {len(direct) / max(1, len(done)):.1%}",
         f"{low:.1%}..{high:.1%}", f"P = {predicted:.1%}"],
        ["direct within 10 s", f"{len(within)}/{len(done)}", "", f">= {TARGET_RATE:.0%}"],
        ["StartPunching -> direct p50", _report.percentile(times, 0.5), "ms", ""],
        ["StartPunching -> direct p95", _report.percentile(times, 0.95), "ms", ""],
        ["probes sent until landing p50", _report.percentile(probes, 0.5), "", ""],
    ]
    print(f"birthday probing, symmetric x port-restricted, K={DEFAULT_SOCKETS} "
          f"M={DEFAULT_PROBES} N={LAB_PORTS}, {len(done)} runs "
          f"({len(results) - len(done)} failed to set up), "
          f"{time.monotonic() - started:.0f} s")
    print(_report.table(["measure", "value", "95 % interval / unit", "expected"], rows))
    path = _report.write("birthday" + ("-quick" if args.quick else ""), {
        "sockets": DEFAULT_SOCKETS, "probes": DEFAULT_PROBES, "ports": LAB_PORTS,
        "predicted_rate": predicted, "runs": len(done), "direct": len(direct),
        "direct_within_10s": len(within), "rate_interval_95": [low, high],
        "to_direct_ms_p50": _report.percentile(times, 0.5),
        "to_direct_ms_p95": _report.percentile(times, 0.95),
        "probes_to_landing_p50": _report.percentile(probes, 0.5),
        "results": results,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
