"""The NAT matrix: direct rate and time to direct per pair of NATs, over independent runs.

For every cell (the agent's NAT x the connector's NAT) one lab (tests/netlab: network
namespaces and nftables; needs root) with the intermediate on the public segment, running a
second STUN observer (--stun-alt-port) so that nodes classify their NAT at start and the
intermediate chooses each session's punching strategy from the pair. Presets: none,
full-cone, port-restricted, symmetric-sequential (ports in sequence: prediction), symmetric
(a random port per destination) and symmetric behind a router that maps ports (miniupnpd:
PCP, NAT-PMP).

A run is one session between fresh nodes: the agent and the connector are started, register
and send their NAT summaries; a round trip through the agent's forward opens the session, and
punching ends on a path. Then both nodes exit and both routers forget every flow and mapping
(conntrack -F; full-cone's open ports too), so no run inherits a hole from the one before.
The intermediate stays up and lets the next run's nodes replace the killed ones.

    sudo python benchmarks/bench_nat_matrix.py [--runs N] [--cells A:C,...] [--quick]

Prints per cell the direct rate, p50/p95 of StartPunching -> direct route and the strategy
the intermediate chose, and writes benchmarks/results/nat_matrix.json and nat_matrix.md.
"""

import argparse
import collections
import os
import shutil
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

ALT_PORT = 3479
MAPPED = "symmetric+pm"  # symmetric behind a router that maps ports (miniupnpd)
PRESETS = ("none", "full-cone", "port-restricted", "symmetric-sequential", "symmetric", MAPPED)
LABELS = {MAPPED: "symmetric + port mapping"}
QUICK_CELLS = (("port-restricted", "port-restricted"), ("symmetric", "port-restricted"),
               ("symmetric", MAPPED))
TARGET_RATE, TARGET_SECONDS = 0.95, 10.0
# The nodes of a run are killed (SIGTERM would wait for the UPnP discovery thread, seconds);
# the next run's registrations replace them once the killed ones miss this probe (s).
PROBE_TIMEOUT = 0.3


def _site(preset):
    """(lab preset, lab.site arguments) of a matrix preset."""
    if preset == MAPPED:
        return "symmetric", {"port_mapping": True}
    return preset, {}


class Cell:
    """One lab of a cell, its intermediate up for every run; `run()` is one fresh session."""

    def __init__(self, agent, connector, workdir):
        from labroles import Deployment
        from netlab import Lab

        self.agent, self.connector = agent, connector
        self.mapped = {role for role, preset in (("agent", agent), ("connector", connector))
                       if preset == MAPPED}
        self.lab = Lab()
        try:
            (agent_nat, agent_site), (conn_nat, conn_site) = _site(agent), _site(connector)
            self.d = Deployment(self.lab, workdir, agent_nat, conn_nat, agent_site=agent_site,
                                connector_site=conn_site,
                                intermediate_args=("--stun-alt-port", str(ALT_PORT),
                                                   "--probe-timeout", str(PROBE_TIMEOUT)))
        except BaseException:
            self.lab.close(raise_errors=False)
            raise
        self.fresh = True  # the nodes the Deployment started have not had a session

    def close(self):
        self.lab.close(raise_errors=False)

    def _restart_nodes(self):
        d = self.d
        for proc in (d.agent, d.connector):
            _stop(proc)
        for host in (d.agent_host, d.connector_host):
            if host.router is not None:
                host.router.flush_conntrack()
        d.connector = d.start_connector()
        d.agent = d.start_agent(())

    def run(self):
        """One session between fresh nodes: a dict of what happened."""
        from labroles import wait

        if not self.fresh:
            self._restart_nodes()
        self.fresh = False
        d = self.d
        started = time.monotonic()
        d.wait_registered(30)

        def summaries():
            nodes = ((d.status(d.intermediate) or {}).get("nodes") or {}).get("list") or []
            nats = {n["role"]: n["nat"] for n in nodes}
            return (len(nats) == 2 and all(nats.values())
                    and all(nats[role].get("mapped_port") for role in self.mapped) and nats)

        nats = wait(summaries, 20, "both NAT summaries", d)
        data = os.urandom(16 << 10)
        if d.round_trip(data) != data:
            raise RuntimeError("the echo came back different")
        session = wait(lambda: (s := d.session()) and s["punch"] and s["punch"]["path"]
                       and s, 30, "hole punching to finish", d)
        return {"path": session["path"], "strategy": session["strategy"],
                "hard_side": session["hard_side"], "to_direct_ms": session["switch_ms"],
                "reason": session["punch"]["reason"],
                "agent_nat": _nat_line(nats["agent"]),
                "connector_nat": _nat_line(nats["connector"]),
                "run_s": round(time.monotonic() - started, 3)}


def _stop(proc):
    """End a node at once (SIGKILL). Its port mapping stays in the router's table until its
    lifetime ends; the next node maps another internal port."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def _nat_line(nat):
    """A node's NAT summary, short: mapping/allocation and whether it has a mapped port."""
    text = (nat.get("allocation") or nat.get("mapping") or "unknown").replace(
        "endpoint-independent", "EI").replace("endpoint-dependent", "ED")
    return text + ("+mapped" if nat.get("mapped_port") else "")


def measure_cell(agent, connector, runs, log):
    """`runs` sessions in one cell's lab: the cell's summary with every run."""
    results = []
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-matrix-{agent}-{connector}-"))
    cell = None
    try:
        cell = Cell(agent, connector, workdir)
        for index in range(runs):
            try:
                result = cell.run()
            except (AssertionError, RuntimeError, OSError) as exc:
                result = {"path": "error", "error": str(exc)[:2000]}
                log(f"{agent} x {connector} run {index + 1}: failed: "
                    f"{str(exc).splitlines()[0] if str(exc) else exc!r}")
            results.append(result)
    except Exception as exc:  # the lab itself did not come up: the cell has no runs
        log(f"{agent} x {connector}: lab failed: {exc!r}"[:500])
        results.append({"path": "error", "error": repr(exc)[:2000]})
    finally:
        if cell is not None:
            cell.close()
    if any(r["path"] == "error" for r in results):
        log(f"{agent} x {connector}: the roles' logs are in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(agent, connector, results)
    summary["wall_s"] = round(time.monotonic() - started, 1)
    log(f"{agent} x {connector}: {cell_text(summary)} ({summary['wall_s']} s)")
    return summary


def summarize(agent, connector, results):
    """A cell's figures from its runs: direct rate, p50/p95 time to direct, strategies."""
    done = [r for r in results if r["path"] != "error"]
    direct = [r for r in done if r["path"] == "direct"]
    times = [r["to_direct_ms"] for r in direct if r.get("to_direct_ms") is not None]
    strategies = collections.Counter(r["strategy"] for r in done)
    return {
        "agent": agent, "connector": connector, "runs": len(done),
        "errors": len(results) - len(done), "direct": len(direct),
        "direct_within_10s": sum(t <= TARGET_SECONDS * 1000 for t in times),
        "to_direct_ms_p50": _report.percentile(times, 0.5),
        "to_direct_ms_p95": _report.percentile(times, 0.95),
        "strategies": dict(strategies.most_common()),
        "results": results,
    }


def compact(cell):
    """A cell for the JSON report: its runs as one list per field (the time to direct, None
    for a run that did not go direct) and the counts of each way a run ended."""
    results = cell["results"]
    return {**{k: v for k, v in cell.items() if k != "results"},
            "to_direct_ms": [r.get("to_direct_ms") if r["path"] == "direct" else None
                             for r in results],
            "run_s": [r.get("run_s") for r in results],
            "nats": dict(collections.Counter(f"{r['agent_nat']} x {r['connector_nat']}"
                                             for r in results if "agent_nat" in r)),
            "endings": dict(collections.Counter(
                f"{r['path']}: {r.get('reason') or r.get('error', '')[:200]}" for r in results))}


def _ms(value):
    if value is None:
        return "–"
    return f"{value / 1000:.1f} s" if value >= 1000 else f"{value:.0f} ms"


def cell_text(cell):
    """`27/30 · 95 ms / 140 ms · checks`: direct runs of runs, p50 / p95 of time to direct,
    the strategy (the most common first when runs differed)."""
    if cell is None or cell["runs"] == 0:
        return "–"
    strategy = "/".join(cell["strategies"]) or "?"
    text = f"{cell['direct']}/{cell['runs']}"
    if cell["direct"]:
        text += f" · {_ms(cell['to_direct_ms_p50'])} / {_ms(cell['to_direct_ms_p95'])}"
    text += f" · {strategy}"
    if cell["errors"]:
        text += f" ({cell['errors']} failed)"
    return text


def markdown(cells, runs):
    """The matrix as Markdown: rows the agent's NAT, columns the connector's."""
    by = {(c["agent"], c["connector"]): c for c in cells}
    rows = [p for p in PRESETS if any(a == p for a, _ in by)]
    cols = [p for p in PRESETS if any(c == p for _, c in by)]
    lines = ["| agent \\ connector | " + " | ".join(LABELS.get(c, c) for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for a in rows:
        lines.append(f"| {LABELS.get(a, a)} | "
                     + " | ".join(cell_text(by.get((a, c))) for c in cols) + " |")
    lines.append("")
    lines.append(f"Each cell: sessions that went direct / runs ({runs} independent runs: fresh "
                 "nodes, routers' flows and mappings forgotten) · time from StartPunching to "
                 "the direct route, p50 / p95 · the strategy the intermediate chose.")
    return "\n".join(lines)


def _cells(text):
    """`A:C,A:C` (presets as in PRESETS; `*` for every preset) -> [(agent, connector)]."""
    cells = []
    for item in text.split(","):
        try:
            agent, connector = item.strip().split(":")
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected AGENT:CONNECTOR, got {item!r}") from None
        for preset in (agent, connector):
            if preset != "*" and preset not in PRESETS:
                raise argparse.ArgumentTypeError(
                    f"unknown preset {preset!r}; choose from {', '.join(PRESETS)} or *")
        cells += [(a, c) for a in (PRESETS if agent == "*" else (agent,))
                  for c in (PRESETS if connector == "*" else (connector,))]
    return list(dict.fromkeys(cells))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="independent sessions per cell "
                                                 "(default 30, quick 1)")
    parser.add_argument("--cells", type=_cells,
                        help="AGENT:CONNECTOR,... (presets: " + ", ".join(PRESETS)
                             + "; * for all), default every pair")
    parser.add_argument("--quick", action="store_true",
                        help="one run of three cells (checks, birthday, mapped)")
    parser.add_argument("--name", default=None, help="report name (default nat_matrix, "
                                                     "quick nat_matrix-quick)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_nat_matrix: the NAT lab needs root", file=sys.stderr)
        return 2
    runs = args.runs or (1 if args.quick else 30)
    cells = args.cells or (list(QUICK_CELLS) if args.quick else
                           [(a, c) for a in PRESETS for c in PRESETS])
    name = args.name or ("nat_matrix-quick" if args.quick else "nat_matrix")
    started = time.monotonic()
    results = [measure_cell(a, c, runs, lambda line: print(line, flush=True))
               for a, c in cells]
    wall = time.monotonic() - started
    rows = [[f"{LABELS.get(c['agent'], c['agent'])} x {LABELS.get(c['connector'], c['connector'])}",
             f"{c['direct']}/{c['runs']}", c["to_direct_ms_p50"], c["to_direct_ms_p95"],
             "/".join(c["strategies"]) or "-", c["errors"], c["wall_s"]] for c in results]
    print(f"NAT matrix: {runs} independent run(s) per cell, {len(cells)} cells, {wall:.0f} s")
    print(_report.table(["agent x connector", "direct", "p50 ms", "p95 ms", "strategy",
                         "errors", "wall s"], rows))
    path = _report.write(name, {"runs": runs, "wall_s": round(wall, 1), "presets": PRESETS,
                                "cells": [compact(c) for c in results]})
    table = markdown(results, runs)
    (path.parent / f"{name}.md").write_text(table + "\n")
    print(table)
    print(f"wrote {path} and {name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
