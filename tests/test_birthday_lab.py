"""Birthday probing behind real NATs (tests/netlab, real role processes).

`symmetric` (masquerade fully-random: a random port in 1024..65535 per destination) against
`port-restricted` is the pair the intermediate gives the "birthday" strategy: the symmetric
side opens 256 extra sockets towards the other's offered address, the other probes up to 1,024
random ports of the symmetric side's IP, and the socket a probe reaches becomes the session's
direct route. P(direct) = 1 - (1 - 256/64512)^1024 = 98.3 % per session
(benchmarks/bench_birthday.py measures it over many runs). A test must not fail one run in
60 by design, so here the hard side opens 512 sockets: P = 1 - (1 - 512/64512)^1024 =
99.97 %, with the probing time unchanged.
"""

import os

import pytest

from labroles import Deployment, wait
from netlab import lab  # noqa: F401 - the fixture

ALT_PORT = 3479
SOCKETS = ("--birthday-sockets", "512")


def birthday_session(lab, tmp_path, agent_nat, connector_nat):  # noqa: F811
    """A deployment whose session punched with the birthday strategy; (deployment, the
    agent's session status) once punching ended."""
    d = Deployment(lab, tmp_path, agent_nat, connector_nat, agent_args=SOCKETS,
                   connector_args=SOCKETS, intermediate_args=("--stun-alt-port", str(ALT_PORT)))
    d.wait_registered()
    wait(lambda: (nodes := ((d.status(d.intermediate) or {}).get("nodes") or {})
                  .get("list")) and len(nodes) == 2 and all(n["nat"] for n in nodes),
         15, "both NAT summaries", d)
    data = os.urandom(64 << 10)
    assert d.round_trip(data) == data, d.logs()
    session = wait(lambda: (s := d.session()) and s["punch"] and s["punch"]["path"] and s,
                   20, "hole punching to finish", d)
    return d, session


@pytest.mark.parametrize("agent_nat, connector_nat, hard", [
    ("symmetric", "port-restricted", "agent"), ("port-restricted", "symmetric", "connector")])
def test_symmetric_and_port_restricted_go_direct_by_birthday_probing(
        lab, tmp_path, agent_nat, connector_nat, hard):  # noqa: F811
    d, session = birthday_session(lab, tmp_path, agent_nat, connector_nat)
    assert (session["strategy"], session["hard_side"]) == ("birthday", hard), d.logs()
    print("birthday:", session["birthday"], "time to direct:", session["switch_ms"], "ms")
    assert session["path"] == "direct", f"{session['punch']}\n{session['birthday']}\n{d.logs()}"
    hard_node = d.agent if hard == "agent" else d.connector
    hard_status = d.status(hard_node)
    assert hard_status["birthday"]["won"] == 1, hard_status["birthday"]
    # The winning socket carries the session: bytes still arrive identical on it.
    data = os.urandom(256 << 10)
    assert d.round_trip(data) == data, d.logs()
    assert hard_status["endpoint"].get("side_sent", 0) > 0
