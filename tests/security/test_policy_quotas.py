"""With the real roles on loopback: one identity cannot take the intermediate.

One agent opened 5,000 sessions in 7.5 s and /status grew to 1.85 MB. Now sessions opened
per minute, open sessions and control messages per second are bounded per identity and
answered with RATE_LIMITED; a node that floods its control stream is closed with the reason;
another agent's traffic carries on and /status stays small.
"""

import asyncio
import json
import math

from aio_helpers import run, wait_for
from test_policy_offers import policy

from mahole import identity
from mahole.config import AgentConfig
from mahole.demo import LocalDeployment, tcp_round_trip
from mahole.roles.agent import Agent
from mahole.wire import control

# Bytes of /status JSON: what "small" means here. The quotas let fewer than 200 of the 5,000
# sessions open, and each is listed in about 350 bytes (with its path, punching strategy and
# relay counters), so a bound of 1 KiB a session they allow: far below the 1.85 MB of before,
# and not broken when a loaded machine lets the per-minute refill open a few more.
STATUS_LIMIT = 200 * 1024


async def mallory(d, seen):
    """A second agent, with a control stream we drive by hand; ``seen`` collects what the
    intermediate tells it."""
    identity.issue(d.dir, "agent", "mallory")
    node = Agent(AgentConfig(
        intermediate=d.intermediate.local_address[:2], bind=("127.0.0.1", 0),
        **d.creds("mallory")))
    original = node.control_message
    node.control_message = lambda message: (seen.append(message), original(message))
    await node.start()
    await node.wait_registered(10)
    return node


def _status_size(d):
    return len(json.dumps(d.intermediate.status()))


def test_5000_session_requests_from_one_agent_are_refused_and_alice_keeps_working(monkeypatch):
    """With the control-message rate raised (so only the session quotas speak): 120 open at
    once, then RATE_LIMITED naming --sessions-per-minute."""
    policy(monkeypatch, signaling_rate=5000.0, signaling_burst=10000)

    async def main():
        async with LocalDeployment() as d:
            addr = d.forward_address(d.tcp_forward)
            data = b"alice's bytes" * 2000
            assert await tcp_round_trip(addr, data) == data
            seen = []
            node = await mallory(d, seen)
            try:
                for request_id in range(1, 5001):
                    node.control.send(control.OpenSession(request_id=request_id,
                                                          service="echo"))
                    if request_id % 500 == 0:
                        await wait_for(lambda: len([m for m in seen if getattr(
                            m, "request_id", None)]) >= request_id - 50, 20)
                await wait_for(lambda: sum(isinstance(m, (control.SessionOpened, control.Error))
                                           for m in seen) >= 5000, 30)
                opened = [m for m in seen if isinstance(m, control.SessionOpened)]
                limited = [m for m in seen if isinstance(m, control.Error)
                           and m.code == control.ErrorCode.RATE_LIMITED]
                assert 120 <= len(opened) < 200, len(opened)
                assert len(opened) + len(limited) == 5000
                assert "(--sessions-per-minute)" in limited[0].message
                counters = d.intermediate.counters
                assert counters["sessions_rate_limited"] == len(limited)
                assert await tcp_round_trip(addr, data) == data  # alice is unaffected
                size = _status_size(d)
                assert size < STATUS_LIMIT, size
            finally:
                await node.stop()
    run(main(), timeout=120)


def test_a_control_flood_closes_the_flooding_agent_with_the_reason(monkeypatch, caplog):
    """5,000 requests at once with the default limits: a burst is served, the rest ignored,
    and the flooding agent is closed with CLOSE_RATE_LIMITED and the reason; its sessions end
    with it; alice's traffic carries on."""
    policy(monkeypatch)
    caplog.set_level("WARNING", logger="mahole.roles.node")

    async def main():
        async with LocalDeployment() as d:
            addr = d.forward_address(d.tcp_forward)
            data = b"alice's bytes" * 2000
            seen = []
            node = await mallory(d, seen)
            try:
                first_connect = node.control.connects
                started = asyncio.get_running_loop().time()
                for request_id in range(1, 5001):
                    node.control.send(control.OpenSession(request_id=request_id,
                                                          service="echo"))
                reason = ("closed by the intermediate: agent 'mallory' sent control messages "
                          "faster than 50/s (burst 400): 401 ignored within 10 s")
                await wait_for(lambda: reason in caplog.text, 20)  # the node heard why
                # The bucket holds 400 and refills at 50/s while the 5,000 arrive: what gets
                # through is bounded by both, not by the burst alone.
                allowed = 400 + math.ceil(50 * (asyncio.get_running_loop().time() - started))
                await wait_for(lambda: node.control.connects > first_connect, 20)
                assert d.intermediate.counters["nodes_flooding"] >= 1
                assert d.intermediate.counters["signaling_dropped"] >= 401
                opened = [m for m in seen if isinstance(m, control.SessionOpened)]
                assert len(opened) <= allowed, (len(opened), allowed)
                await wait_for(lambda: all(s["agent"] != "mallory" for s in
                                           d.intermediate.status()["sessions"]["list"]), 10)
                assert await tcp_round_trip(addr, data) == data
                size = _status_size(d)
                assert size < STATUS_LIMIT, size
            finally:
                await node.stop()
    run(main(), timeout=120)
