"""Path choice by measured RTT in the NAT lab: a direct path much slower than the relay gives
way to it, once, and the stream goes on.

The connector's link delays what it exchanges with the agent's site but spares the
intermediate (netlab/wire.py `spare`): a poor peering between two ISPs that both reach the
relay well, or a satellite hop on the direct path only. The agent takes the direct route
punching finds, measures it, and moves to the relay once the route's RTT (its minimum over
RTT_WINDOW) has been more than 1.5 times the relay's for RTT_SUSTAIN; then nothing moves
until the re-check (RTT_RECHECK, 30 s: the way back is a unit test with a fake clock).
"""

import os
import time

from labroles import Deployment, Transfer, wait
from mahole.session_core import RTT_RECHECK, RTT_SUSTAIN, RTT_WINDOW
from netlab import lab  # noqa: F401 - the fixture

SLOW_MS = 300  # the direct path's added round trip
STEADY_FOR = 10.0  # s after the move in which nothing may move again
# From the path's change to the move: the window, the sustain, and room for the samples (on a
# quiet session the two members' keepalives interleave: a sample every 2 s or so).
MOVE_WITHIN = RTT_WINDOW + RTT_SUSTAIN + 8.0


def slow_direct(d):
    return {"rtt_ms": SLOW_MS, "spare": [d.public.ip]}


def moved_to_relay(d):
    session = d.session() or {}
    return session.get("path") == "relay" and session.get("rtt_moves") == 1 and session


def transfer_across_the_move(d):
    data = os.urandom(2 << 20)
    transfer = Transfer(d, data, chunk=16 << 10, pace=0.1)  # ~160 KB/s for ~13 s
    session = wait(lambda: moved_to_relay(d), MOVE_WITHIN, "the move to the relay", d)
    session["seen_at"] = time.monotonic()
    assert session["switch_reason"].startswith("the relay is faster: "), session
    assert transfer.join(timeout=120) == data, d.logs()
    return session


def steady_on_the_relay(d, session):
    """Nothing moves for STEADY_FOR (well before the re-check); the connector followed."""
    assert STEADY_FOR < RTT_RECHECK
    switches = session["route_switches"]
    until = time.monotonic() + STEADY_FOR
    while time.monotonic() < until:
        now = d.session()
        assert now["path"] == "relay" and now["route_switches"] == switches, (now, d.logs())
        time.sleep(0.5)  # sampling the status; the session runs on its own
    assert session["failovers"] == 0, session  # a choice, not a failure
    routes = session["routes"]
    # Taken when the agent chose: the smoothed RTT of the direct path may still be rising
    # toward SLOW_MS then (201 ms of 300 in one run), but it is many times the relay's.
    assert routes["direct"]["rtt_ms"] >= SLOW_MS / 2, routes
    assert routes["relay"]["rtt_ms"] < SLOW_MS / 3, routes
    connector = (d.status(d.connector) or {}).get("sessions") or [{}]
    assert connector[0].get("path") == "relay", (connector, d.logs())


def test_a_direct_path_much_slower_than_the_relay_gives_way_to_it(lab, tmp_path):
    """Slow from the start: punching finds the direct path and the agent takes it, measures
    it, and leaves it for the relay; a transfer across the move arrives whole."""
    d = Deployment(lab, tmp_path, "port-restricted", "port-restricted", connector_link="lan")
    d.connector_host.site.set_link(slow_direct(d))
    d.wait_registered(30)
    probe = os.urandom(16 << 10)
    assert d.round_trip(probe) == probe, d.logs()
    wait(lambda: (s := d.session()) and s["route_switches"] >= 1, 30, "the direct path", d)
    session = transfer_across_the_move(d)
    print(f"moved to the relay: {session['routes']}")
    steady_on_the_relay(d, session)


def test_a_direct_path_that_gets_much_worse_is_left_once(lab, tmp_path):
    """Fast, then much worse mid-session: one move to the relay within the bound, then none."""
    d = Deployment(lab, tmp_path, "port-restricted", "port-restricted", connector_link="lan")
    d.wait_registered(30)
    probe = os.urandom(16 << 10)
    assert d.round_trip(probe) == probe, d.logs()
    wait(lambda: (d.session() or {}).get("path") == "direct", 30, "the direct path", d)
    d.connector_host.site.set_link(slow_direct(d))
    worse_at = time.monotonic()
    session = transfer_across_the_move(d)
    print(f"moved within {session['seen_at'] - worse_at:.1f} s of the path getting worse")
    steady_on_the_relay(d, session)
