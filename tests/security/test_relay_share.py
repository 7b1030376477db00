"""Relay bandwidth per identity, enforced by the relay engine.

The signaling core turns ``--relay-rate-per-identity`` into a share per session
(`RelaySetRate`); the intermediate gives it to the relay engine (`RelayEngine.set_rate`), so
what one identity's session pushes through the relay is bounded by that share, never above
the per-session ``--relay-rate-limit``, while its data still arrives intact.
"""

import os
import time

from aio_helpers import run

from mahole.demo import LocalDeployment, tcp_round_trip
from mahole.signaling import MIN_RELAY_BURST

SHARE = 400_000  # bytes/s: one identity's relay cap, all of it for its one session
BULK = 2_000_000  # bytes echoed through the forward: 4 MB over the relay, several buckets


def relay_only(tmp_path, **intermediate_kwargs):
    return LocalDeployment(str(tmp_path), intermediate_kwargs=intermediate_kwargs,
                           agent_kwargs={"relay_only": True},
                           connector_kwargs={"relay_only": True})


async def open_session(d):
    data = os.urandom(20000)
    assert await tcp_round_trip(d.forward_address(d.tcp_forward), data) == data
    (session,) = d.agent.sessions.values()
    return session.session_id


def test_a_sessions_relay_share_bounds_what_it_relays(tmp_path):
    async def main():
        d = relay_only(tmp_path, relay_rate_per_identity=SHARE)
        try:
            await d.start()
            sid = await open_session(d)
            engine = d.intermediate.engine
            stats = engine.session_stats(sid)
            burst = max(SHARE // 4, MIN_RELAY_BURST)
            assert (stats["rate_bps"], stats["burst_bytes"]) == (SHARE, burst)
            assert "relay_rates_not_applied" not in d.intermediate.counters

            before = stats["bytes_a_to_b"] + stats["bytes_b_to_a"]
            started = time.monotonic()
            data = os.urandom(BULK)
            assert await tcp_round_trip(d.forward_address(d.tcp_forward), data) == data
            elapsed = time.monotonic() - started
            stats = engine.session_stats(sid)
            relayed = stats["bytes_a_to_b"] + stats["bytes_b_to_a"] - before
            # A token bucket passes at most its burst plus its rate over the time taken.
            assert 2 * BULK <= relayed <= burst + SHARE * elapsed, (relayed, elapsed)
            assert elapsed >= (2 * BULK - burst) / SHARE
            assert stats["dropped_rate_limited"] > 0
        finally:
            await d.stop()
    run(main(), timeout=120)


def test_the_per_session_limit_caps_a_larger_share(tmp_path):
    async def main():
        d = relay_only(tmp_path, relay_rate_per_identity=10 * SHARE,
                       relay_rate_limit=SHARE, relay_burst=MIN_RELAY_BURST)
        try:
            await d.start()
            sid = await open_session(d)
            stats = d.intermediate.engine.session_stats(sid)
            assert (stats["rate_bps"], stats["burst_bytes"]) == (SHARE, MIN_RELAY_BURST)
        finally:
            await d.stop()
    run(main(), timeout=60)
