"""The punching strategy behind real NATs (tests/netlab, real role processes).

Each node observes its mappings at start (the intermediate has a second STUN observer,
--stun-alt-port) and sends the verdict as a NatSummary; the intermediate chooses each
session's strategy from the pair and shows it in its /status and in both nodes' /status.
"""

import os

import pytest

from labroles import Deployment, wait
from netlab import lab  # noqa: F401 - the fixture

ALT_PORT = 3479


@pytest.mark.parametrize("agent_nat, connector_nat, strategy, hard_side, path", [
    ("port-restricted", "port-restricted", "checks", None, "direct"),
    ("symmetric-sequential", "port-restricted", "prediction", "agent", "direct"),
    ("port-restricted", "symmetric", "birthday", "connector", None),
    ("symmetric", "symmetric", "relay", None, "relay"),
])
def test_the_strategy_shown_matches_the_nat_pair(lab, tmp_path, agent_nat,  # noqa: F811
                                                 connector_nat, strategy, hard_side, path):
    d = Deployment(lab, tmp_path, agent_nat, connector_nat,
                   intermediate_args=("--stun-alt-port", str(ALT_PORT)))
    d.wait_registered()
    # Both summaries in before the session opens (one opened earlier gets plain checks).
    nats = wait(lambda: (nodes := ((d.status(d.intermediate) or {}).get("nodes") or {})
                         .get("list")) and len(nodes) == 2 and all(n["nat"] for n in nodes)
                and {n["role"]: n["nat"] for n in nodes}, 15, "both NAT summaries", d)
    for role, nat in nats.items():
        preset = agent_nat if role == "agent" else connector_nat
        assert nat["mapping"] == ("endpoint-dependent" if preset.startswith("symmetric")
                                  else "endpoint-independent"), (role, nat)
    data = os.urandom(64 << 10)
    assert d.round_trip(data) == data, d.logs()
    session = wait(lambda: (s := d.session()) and s["punch"] and s["punch"]["path"] and s,
                   15, "hole punching to finish", d)
    assert (session["strategy"], session["hard_side"]) == (strategy, hard_side), d.logs()
    shown = (d.status(d.intermediate) or {})["sessions"]["list"][0]
    assert (shown["strategy"], shown["hard_side"]) == (strategy, hard_side)
    connector_side = (d.status(d.connector) or {})["sessions"][0]
    assert connector_side["strategy"] == strategy
    if path is not None:
        assert session["path"] == path, f"{session['punch']}\n{d.logs()}"
    if strategy == "relay":  # relay at once: the checks were never started
        assert "strategy relay" in session["punch"]["reason"], session["punch"]
        assert session["punch"]["counters"].get("checks_sent", 0) == 0, session["punch"]
    assert d.round_trip(data) == data, d.logs()
