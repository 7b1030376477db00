"""Hole punching behind real NATs: every pair of NAT presets, real role processes.

Each cell builds a small internet in network namespaces (tests/netlab): the intermediate on
the public segment, the agent and the connector each behind a NAT router of a preset (or on
the public segment for `none`). The roles run as `python -m mahole …` processes; a TCP forward
moves data and the path the session ends on must be the one theory predicts: direct in every
cell but symmetric × symmetric and symmetric × port-restricted (either order), which use the
relay — a symmetric side reaching a full-cone or public peer gets through by peer-reflexive
discovery. The observed matrix is printed in the test report and written to
build/nat_matrix.{json,md} (to $MAHOLE_BENCH_DIR if set), so a test run leaves the committed
results alone.

Here the intermediate has no second STUN observer, so nodes learn nothing of their NAT and
every session gets the plain checks. benchmarks/bench_nat_matrix.py measures the matrix with
it (strategies chosen from the NATs, more presets, direct rates over many runs).
"""

import itertools
import json
import os
from pathlib import Path

import pytest

from labroles import Deployment, record_link, wait
from netlab import lab  # noqa: F401 - the fixture

PRESETS = ("none", "full-cone", "port-restricted", "symmetric")
RELAY_CELLS = {("symmetric", "symmetric"), ("symmetric", "port-restricted"),
               ("port-restricted", "symmetric")}
RESULTS = Path(os.environ.get("MAHOLE_BENCH_DIR")
               or Path(__file__).resolve().parent.parent / "build")

observed = {}


def expected_path(agent, connector):
    return "relay" if (agent, connector) in RELAY_CELLS else "direct"


@pytest.mark.parametrize("agent_nat, connector_nat", list(itertools.product(PRESETS, PRESETS)),
                         ids=lambda preset: preset)
def test_matrix_cell(lab, tmp_path, agent_nat, connector_nat):
    d = Deployment(lab, tmp_path, agent_nat, connector_nat)
    d.wait_registered()
    data = os.urandom(512 << 10)
    assert d.round_trip(data) == data, d.logs()
    session = wait(lambda: (s := d.session()) and s["punch"] and s["punch"]["path"] and s,
                   15, "hole punching to finish", d)
    assert d.round_trip(data) == data, d.logs()  # and data flows on the final path
    session = d.session()
    observed[(agent_nat, connector_nat)] = {
        "path": session["path"], "expected": expected_path(agent_nat, connector_nat),
        "to_direct_ms": session["switch_ms"], "rtt_ms": session["rtt_ms"],
        "reason": session["punch"]["reason"],
    }
    assert session["path"] == expected_path(agent_nat, connector_nat), (
        f"{agent_nat} x {connector_nat}: {session['punch']}\n{d.logs()}")


@pytest.mark.parametrize("agent_nat, connector_nat", list(itertools.product(PRESETS, PRESETS)),
                         ids=lambda preset: preset)
def test_matrix_cell_on_lte_links(lab, tmp_path, agent_nat, connector_nat):
    """The same cells on `lte` links (60 ms ± 10 ms, 1 % loss each way, netlab/wire.py) for
    both nodes: each goes the same way as on clean links."""
    cell_on_links(lab, tmp_path, agent_nat, connector_nat, "lte")


BURSTY_CI_CELLS = {("port-restricted", "port-restricted"), ("symmetric", "full-cone"),
                   ("symmetric", "symmetric")}


@pytest.mark.parametrize("agent_nat, connector_nat", list(itertools.product(PRESETS, PRESETS)),
                         ids=lambda preset: preset)
def test_matrix_cell_on_bursty_links(lab, tmp_path, agent_nat, connector_nat):
    """The same cells on `bursty` links (20 ms, fades of 30 ms on average 5 % of the time each
    way, netlab/wire.py) for both nodes: each goes the same way as on clean links.

    In the suite only three cells run (a direct punch through two filtering NATs, a
    peer-reflexive one from a symmetric NAT, and a relayed one) unless MAHOLE_BURSTY_MATRIX=1;
    benchmarks/bench_links.py --matrix runs all sixteen.

    A fade can still make a node leave a direct path that works (a false failover: nothing
    heard for failover_timeout while a lost packet waits for its retransmission), after
    which the agent punches again; here a cell must reach its path, within one re-punch,
    and the false failovers are printed. tests/test_links_lab.py asserts there are none."""
    if (os.environ.get("MAHOLE_BURSTY_MATRIX") != "1"
            and (agent_nat, connector_nat) not in BURSTY_CI_CELLS):
        pytest.skip("one of the cells run by MAHOLE_BURSTY_MATRIX=1 only "
                    "(benchmarks/bench_links.py --matrix)")
    cell_on_links(lab, tmp_path, agent_nat, connector_nat, "bursty", repunch_within=15)


def cell_on_links(lab, tmp_path, agent_nat, connector_nat, preset, repunch_within=0):
    """One cell with both nodes on links of `preset` (seeded): data flows, punching ends
    on the path theory predicts, and data flows on it. With `repunch_within`, a cell that
    left its direct path may take that long (s) to punch back to it."""
    from netlab import wire

    d = Deployment(lab, tmp_path, agent_nat, connector_nat,
                   agent_link={**wire.LINKS[preset], "seed": 1},
                   connector_link={**wire.LINKS[preset], "seed": 2})
    d.wait_registered(30)
    data = os.urandom(256 << 10)
    assert d.round_trip(data) == data, d.logs()
    session = wait(lambda: (s := d.session()) and s["punch"] and s["punch"]["path"] and s,
                   20, "hole punching to finish", d)
    assert d.round_trip(data) == data, d.logs()
    expected = expected_path(agent_nat, connector_nat)
    if repunch_within and expected == "direct":
        wait(lambda: (d.session() or {}).get("path") == "direct", repunch_within,
             "the direct path again", d)
    session = d.session()
    print(f"{preset} {agent_nat} x {connector_nat}: {session['path']}, "
          f"to direct {session['switch_ms']} ms, rtt {session['rtt_ms']} ms, "
          f"{session['failovers']} failover(s)")
    record_link(f"matrix_{preset}", {"agent": agent_nat, "connector": connector_nat,
                                  "path": session["path"], "expected": expected,
                                  "failovers": session["failovers"]})
    assert session["path"] == expected, (
        f"{agent_nat} x {connector_nat} on {preset} links: {session['punch']}\n{d.logs()}")




@pytest.fixture(scope="module", autouse=True)
def _write_matrix():
    yield
    if not observed:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    cells = [{"agent": a, "connector": c, **v} for (a, c), v in sorted(observed.items())]
    (RESULTS / "nat_matrix.json").write_text(json.dumps({"cells": cells}, indent=2) + "\n")
    (RESULTS / "nat_matrix.md").write_text(matrix_table(observed) + "\n")


def matrix_table(results):
    """Markdown: rows = agent's NAT, columns = connector's NAT; path, time to direct, RTT."""
    lines = ["| agent \\ connector | " + " | ".join(PRESETS) + " |",
             "|---" * (len(PRESETS) + 1) + "|"]
    for a in PRESETS:
        cells = []
        for c in PRESETS:
            r = results.get((a, c))
            if r is None:
                cells.append("–")
            elif r["path"] == "direct":
                cells.append(f"direct {r['to_direct_ms']:.0f} ms, rtt {r['rtt_ms']:.1f} ms")
            else:
                cells.append(f"{r['path']}, rtt {r['rtt_ms']:.1f} ms")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
