"""Port prediction behind real NATs (tests/netlab, real role processes).

The intermediate has a second STUN observer (--stun-alt-port), so each node observes two new
mappings of its socket at start. Behind `symmetric-sequential` (nat.py: the next external port
per new mapping) a node offers the next ports, and its peer behind `port-restricted` checks
them: the session goes direct, agent or connector, where behind `symmetric` (random ports) no
predicted port is offered (that pair goes to birthday probing).
"""

import os

import pytest

from labroles import Deployment, wait
from netlab import lab  # noqa: F401 - the fixture

ALT_PORT = 3479


def run(lab, tmp_path, agent_nat, connector_nat="port-restricted"):  # noqa: F811
    """Data through the forward, before and after punching; the symmetric side's verdict."""
    d = Deployment(lab, tmp_path, agent_nat, connector_nat,
                   intermediate_args=("--stun-alt-port", str(ALT_PORT)))
    d.wait_registered()
    node = d.agent if agent_nat.startswith("symmetric") else d.connector
    prediction = wait(lambda: ((d.status(node) or {}).get("port_prediction") or {}).get(
        "done") and d.status(node)["port_prediction"], 10, "the mapping probe", d)
    data = os.urandom(256 << 10)
    assert d.round_trip(data) == data, d.logs()
    wait(lambda: (s := d.session()) and s["punch"] and s["punch"]["path"] and s,
         15, "hole punching to finish", d)
    assert d.round_trip(data) == data, d.logs()  # byte-identical on the final path
    return d, prediction, d.session()


@pytest.mark.parametrize("agent_nat, connector_nat", [
    ("symmetric-sequential", "port-restricted"), ("port-restricted", "symmetric-sequential")])
def test_symmetric_sequential_and_port_restricted_go_direct(lab, tmp_path,  # noqa: F811
                                                            agent_nat, connector_nat):
    d, prediction, session = run(lab, tmp_path, agent_nat, connector_nat)
    print("prediction:", prediction, "time to direct:", session["switch_ms"], "ms")
    assert prediction["allocation"] == "sequential" and prediction["step"] == 1, d.logs()
    last = prediction["observed_ports"][-1]
    assert prediction["predicted_ports"] == [last + i for i in range(1, 7)]
    assert session["path"] == "direct", f"{session['punch']}\n{d.logs()}"
    # The symmetric side's checks got through from a predicted port (the agent's session
    # names its side of the selected pair "local").
    end = "local" if agent_nat == "symmetric-sequential" else "remote"
    chosen = session["punch"]["selected"][end]  # "srflx 203.0.113.3:40002 (related ...)"
    assert int(chosen.split()[1].rsplit(":", 1)[1]) in prediction["predicted_ports"], chosen


def test_symmetric_random_to_port_restricted_offers_no_predictions(lab, tmp_path):  # noqa: F811
    """Random ports cannot be predicted: nothing is offered, and the pair is given to
    birthday probing instead (tests/test_birthday_lab.py)."""
    d, prediction, session = run(lab, tmp_path, "symmetric")
    assert prediction["allocation"] == "random" and prediction["predicted_ports"] == []
    assert "offering predicted ports" not in d.agent.log_path.read_text()
    assert session["strategy"] == "birthday", f"{session['punch']}\n{d.logs()}"
