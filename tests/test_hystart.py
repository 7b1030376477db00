"""Slow start ends on a queue that builds, not on loopback scheduling noise (RFC 9406 §4.3
thresholds in mahole.connection.HyStartRttMonitor), on a fake clock."""

import random

import pytest
from aioquic.quic.congestion.base import QuicRttMonitor

from mahole import connection as qc
from quic_pair import make_pair


def first_exit(monitor, rtts, step=0.002):
    """Index of the RTT sample after which `monitor` ends slow start, or None."""
    now = 0.0
    for index, rtt in enumerate(rtts):
        now += step
        if monitor.is_rtt_increasing(now=now, rtt=rtt):
            return index
    return None


def jitter(count, seed):
    """Loopback RTTs under CPU contention: 0.8-1.2 ms, with runs up to 3 ms."""
    rng = random.Random(seed)
    rtts, base = [], 0.001
    for index in range(count):
        high = (index // 40) % 2  # the other process holds the core for a while
        rtts.append(base * rng.uniform(0.8, 1.2) + high * rng.uniform(0.0005, 0.002))
    return rtts


@pytest.mark.parametrize("seed", range(5))
def test_scheduling_noise_does_not_end_slow_start(seed):
    rtts = jitter(2000, seed)
    # aioquic's own test (25 % above the minimum) ends slow start on this noise...
    assert first_exit(QuicRttMonitor(), rtts) is not None
    # ...RFC 9406's 4 ms floor does not.
    assert first_exit(qc.HyStartRttMonitor(), rtts) is None


@pytest.mark.parametrize("base", [0.001, 0.020, 0.200])
def test_a_growing_queue_ends_slow_start(base):
    """The RTT climbs by 0.5 ms per sample once a queue builds: slow start ends once the
    lowest of the last five samples is past the threshold (clamped to 4-16 ms), five
    samples in a row."""
    steady, rise = [base] * 50, [base + 0.0005 * n for n in range(1, 200)]
    index = first_exit(qc.HyStartRttMonitor(), steady + rise)
    assert index is not None
    threshold = min(max(base / 8, 0.004), 0.016)
    assert threshold / 0.0005 <= index - len(steady) <= threshold / 0.0005 + 10


@pytest.mark.parametrize("algorithm", ["reno", "cubic"])
def test_every_connection_uses_it(tmp_path, algorithm):
    client, server = make_pair(tmp_path, congestion_control=algorithm)
    for conn in (client, server):
        assert isinstance(conn._loss._cc._rtt_monitor, qc.HyStartRttMonitor)
