"""Birthday probing behind real NATs: the direct rate against the predicted curve, and the
time to direct, over repeated independent sessions.

Each run builds a fresh NAT lab (tests/netlab: network namespaces and nftables; needs root)
with the agent behind `symmetric` (masquerade fully-random: a random port in 1024..65535, so
N = 64,512) and the connector behind `port-restricted`, starts the three roles (the
intermediate with --stun-alt-port, so both nodes classify their NAT), opens one session and
waits for its punching result. The intermediate gives the pair the "birthday" strategy: the
agent opens K = 256 extra sockets, the connector sends up to M = 1,024 probes.

    sudo python benchmarks/bench_birthday.py [--runs N] [--quick] [--points K:M,...]

Prints, for each (K, M) point (default 256:1024; --points 64:256,128:512,256:1024 measures
the curve where it is not flat), the direct rate with its 95 % interval against
P = 1 - (1 - K/N)^M, p50/p95 of StartPunching -> direct route and the probes the connector
sent until one landed, and writes benchmarks/results/birthday.json.
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


def one_run(index, log, sockets=DEFAULT_SOCKETS, probes=DEFAULT_PROBES):
    """One fresh lab and session: a dict of what happened."""
    from labroles import Deployment, wait
    from netlab import Lab

    tmp = Path(tempfile.mkdtemp(prefix=f"bench-birthday-{index}-"))
    with Lab() as lab:
        knobs = ("--birthday-sockets", str(sockets), "--birthday-probes", str(probes))
        d = Deployment(lab, tmp, "symmetric", "port-restricted", agent_args=knobs,
                       connector_args=knobs,
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
    log(f"K={sockets} M={probes} run {index + 1}: {result['path']} ({result['strategy']}), "
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


def point(sockets, probes, runs, log):
    """Runs at one (K, M): the summary row data and the runs."""
    results = []
    for index in range(runs):
        try:
            results.append(one_run(index, log, sockets, probes))
        except (AssertionError, RuntimeError, OSError) as exc:
            log(f"K={sockets} M={probes} run {index + 1}: failed: {str(exc).splitlines()[0]}")
            results.append({"path": "error", "error": str(exc)[:2000]})
    done = [r for r in results if r["path"] != "error"]
    direct = [r for r in done if r["path"] == "direct"]
    times = [r["to_direct_ms"] for r in direct if r["to_direct_ms"] is not None]
    within = [t for t in times if t <= TARGET_SECONDS * 1000]
    probes_used = [r["probes_sent"] for r in direct if r["probes_sent"] is not None]
    low, high = wilson(len(direct), len(done))
    return {
        "sockets": sockets, "probes": probes, "ports": LAB_PORTS,
        "predicted_rate": success_probability(sockets, probes, LAB_PORTS),
        "runs": len(done), "setup_failures": len(results) - len(done),
        "direct": len(direct), "direct_within_10s": len(within),
        "rate_interval_95": [low, high],
        "to_direct_ms_p50": _report.percentile(times, 0.5),
        "to_direct_ms_p95": _report.percentile(times, 0.95),
        "probes_to_landing_p50": _report.percentile(probes_used, 0.5),
        "results": results,
    }


def _points(text):
    try:
        return [tuple(int(x) for x in item.split(":")) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K:M,K:M..., got {text!r}") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="independent sessions per point "
                                                 "(default 30, quick 3)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--points", type=_points, default=[(DEFAULT_SOCKETS, DEFAULT_PROBES)],
                        help="K:M pairs to measure (default 256:1024)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_birthday: the NAT lab needs root", file=sys.stderr)
        return 2
    runs = args.runs or (3 if args.quick else 30)
    started = time.monotonic()
    points = [point(k, m, runs, lambda line: print(line, flush=True)) for k, m in args.points]
    rows = []
    for p in points:
        n = max(1, p["runs"])
        low, high = p["rate_interval_95"]
        rows.append([f"{p['sockets']} x {p['probes']}", f"{p['predicted_rate']:.1%}",
                     f"{p['direct']}/{p['runs']} = {p['direct'] / n:.1%}",
                     f"{low:.1%}..{high:.1%}", f"{p['direct_within_10s']}/{p['runs']}",
                     p["to_direct_ms_p50"], p["to_direct_ms_p95"],
                     p["probes_to_landing_p50"]])
    print(f"birthday probing, symmetric x port-restricted in the NAT lab, N={LAB_PORTS} "
          f"ports, {runs} runs per point, {time.monotonic() - started:.0f} s "
          f"(target: >= {TARGET_RATE:.0%} direct within {TARGET_SECONDS:g} s at 256 x 1024)")
    print(_report.table(["K x M", "predicted P", "direct", "95 % interval", "within 10 s",
                         "to direct p50 ms", "p95 ms", "probes p50"], rows))
    path = _report.write("birthday" + ("-quick" if args.quick else ""), {"points": points})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
