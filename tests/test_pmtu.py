"""Path MTU discovery (mahole.pmtu.PathMtu) on a fake clock and a simulated path: the search,
the ceiling, losses, black holes, a path that grows, and the relay header."""

import pytest

from mahole import pmtu
from mahole.pmtu import (BASE_PLPMTU, CONFIRM_INTERVAL, MAX_PROBES, RAISE_INTERVAL,
                         SEARCH_COMPLETE, SEARCH_RESOLUTION, SEARCHING, PathMtu, route_ceiling)

RTT = 0.05


class Path:
    """Carries probes up to `mtu` bytes; each probe's fate is known one RTT later."""

    def __init__(self, mtu):
        self.mtu = mtu
        self.sent = []

    def run(self, core, now, until):
        """Drive `core` until `until`: send what it asks, report fates, follow its timer."""
        while now < until:
            size = core.next_probe(now)
            if size is not None:
                self.sent.append(size)
                now += RTT
                if size <= self.mtu:
                    core.probe_acked(size, now)
                else:
                    core.probe_lost(size, now)
                continue
            when = core.next_timer()
            if when is None or when >= until:
                return until
            now = max(now, when)
        return now


def test_a_path_carrying_the_ceiling_gets_it_with_one_probe():
    core = PathMtu(1472, 0.0)
    path = Path(9000)
    path.run(core, 0.0, 10.0)
    assert path.sent == [1472]
    assert core.plpmtu == 1472 and core.state == SEARCH_COMPLETE
    # Nothing above the ceiling to find: no raise timer, only confirmations.
    assert core.next_timer() == pytest.approx(RTT + CONFIRM_INTERVAL)


@pytest.mark.parametrize("mtu", [1200, 1201, 1280, 1350, 1400, 1420, 1455, 1471])
def test_the_search_ends_within_its_resolution_below_the_path_mtu(mtu):
    core = PathMtu(1472, 0.0)
    path = Path(mtu)
    path.run(core, 0.0, 60.0)
    assert core.state == SEARCH_COMPLETE
    assert mtu - SEARCH_RESOLUTION <= core.plpmtu <= mtu
    # Every failing size was tried MAX_PROBES times before it was given up.
    for size in set(path.sent):
        if size > mtu:
            assert path.sent.count(size) == MAX_PROBES
    assert len(set(path.sent)) <= 8  # a binary search, not a walk


def test_a_path_below_the_base_keeps_the_base():
    core = PathMtu(1472, 0.0)
    Path(1100).run(core, 0.0, 60.0)
    assert core.plpmtu == BASE_PLPMTU and core.state == SEARCH_COMPLETE


def test_one_lost_probe_is_not_a_verdict():
    core = PathMtu(1472, 0.0)
    assert core.next_probe(0.0) == 1472
    core.probe_lost(1472, 0.1)
    assert core.next_probe(0.1) == 1472  # tried again
    core.probe_acked(1472, 0.2)
    assert core.plpmtu == 1472


def test_a_black_hole_under_a_working_size_falls_back_and_searches_again():
    core = PathMtu(1472, 0.0)
    path = Path(1472)
    now = path.run(core, 0.0, 1.0)
    assert core.plpmtu == 1472
    path.mtu = 1300  # a tunnel appeared on the way
    now = path.run(core, now, CONFIRM_INTERVAL + 10.0)  # the confirmation finds it
    assert core.black_holes == 1
    assert 1300 - SEARCH_RESOLUTION <= core.plpmtu <= 1300
    assert core.state == SEARCH_COMPLETE


def test_suspect_confirms_at_once_and_a_good_size_stays():
    core = PathMtu(1472, 0.0)
    path = Path(1472)
    now = path.run(core, 0.0, 1.0)
    sent = len(path.sent)
    core.suspect(now)
    assert core.next_timer() == now
    now = path.run(core, now, now + 1.0)
    assert path.sent[sent:] == [1472] and core.plpmtu == 1472 and core.black_holes == 0


def test_suspect_at_the_base_does_nothing():
    core = PathMtu(1472, 0.0)
    Path(1100).run(core, 0.0, 60.0)
    core.suspect(60.0)
    assert core.next_probe(60.0) is None


def test_a_path_that_grew_is_found_after_the_raise_timer():
    core = PathMtu(1472, 0.0)
    path = Path(1300)
    now = path.run(core, 0.0, 60.0)
    assert core.plpmtu <= 1300
    path.mtu = 1500
    now = path.run(core, now, RAISE_INTERVAL - 10.0)
    assert core.plpmtu <= 1300  # not before the raise timer
    path.run(core, now, RAISE_INTERVAL + 60.0)
    assert core.plpmtu == 1472 and core.state == SEARCH_COMPLETE


def test_stale_and_unsent_probes():
    core = PathMtu(1472, 0.0)
    assert core.next_probe(0.0) == 1472
    core.probe_acked(1300, 0.1)  # not the probe in flight: ignored
    assert core.plpmtu == BASE_PLPMTU
    core.probe_unsent(1472, 0.1)  # the connection was not ready
    assert core.probes_sent == 0
    assert core.next_probe(0.5) is None
    assert core.next_timer() == pytest.approx(0.1 + pmtu.UNSENT_RETRY)
    assert core.next_probe(0.1 + pmtu.UNSENT_RETRY) == 1472
    assert core.state == SEARCHING


def test_only_one_probe_is_in_flight():
    core = PathMtu(1472, 0.0)
    assert core.next_probe(0.0) == 1472
    assert core.next_probe(0.0) is None and core.next_timer() is None


def test_ceilings_account_for_ipv6_and_the_relay_header():
    assert route_ceiling(1472, False) == 1472
    assert route_ceiling(1472, True) == 1452
    assert route_ceiling(1472, False, header=17) == 1455
    assert route_ceiling(1472, True, header=17) == 1435
    assert route_ceiling(1200, False, header=17) == BASE_PLPMTU  # never below QUIC's minimum
    with pytest.raises(ValueError):
        PathMtu(1100, 0.0)


def test_unconfigured_ceilings_follow_the_local_link():
    assert route_ceiling(None, False, link_mtu=1500) == 1472
    assert route_ceiling(None, True, link_mtu=1500) == 1452
    assert route_ceiling(None, False, header=17, link_mtu=9000) == 8955
    assert route_ceiling(None, False) == pmtu.DEFAULT_MAX_UDP_PAYLOAD  # the link unknown
    # Loopback's 65,536 bytes, or a configured ceiling, stop at what aioquic frames.
    assert route_ceiling(None, False, link_mtu=65536) == pmtu.MAX_PACKET
    assert route_ceiling(65527, False) == pmtu.MAX_PACKET
    assert route_ceiling(1472, False, link_mtu=65536) == 1472  # the configured one wins


def test_ceiling_equal_to_the_base_never_probes():
    core = PathMtu(BASE_PLPMTU, 0.0)
    assert core.next_probe(0.0) is None
    assert core.state == SEARCH_COMPLETE and core.next_timer() is None
