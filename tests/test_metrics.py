"""/metrics through prometheus_client: every role's scrape parses, with the right names, types
and labels; counters never go backwards when sessions close; histograms fill from the roles'
samples; several roles in one process never share a registry."""

import asyncio
import collections
import json
import os
import re
import shutil
import subprocess
import types

import prometheus_client
import pytest
from aio_helpers import run, wait_for
from prometheus_client.parser import text_string_to_metric_families

from mahole.demo import LocalDeployment, tcp_round_trip
from mahole.metrics import (
    Buckets,
    IntermediateCollector,
    NodeCollector,
    exposition,
    intermediate_registry,
    node_registry,
    registry_for,
)
from mahole.session_core import DIRECT
from mahole.status import METRICS_CONTENT_TYPE, StatusServer, fetch

# name -> type, as prometheus_client's parser names families (counters without _total).
NODE_FAMILIES = {
    "mahole_intermediate_connected": "gauge",
    "mahole_intermediate_rtt_seconds": "gauge",
    "mahole_intermediate_connects": "counter",
    "mahole_sessions": "gauge",
    "mahole_session_rtt_seconds": "gauge",
    "mahole_session_packets_sent": "counter",
    "mahole_session_sent_bytes": "counter",
    "mahole_session_received_bytes": "counter",
    "mahole_session_route_switches": "counter",
    "mahole_session_failovers": "counter",
    "mahole_session_dropped_frames": "counter",
    "mahole_session_time_to_direct_seconds": "histogram",
    "mahole_session_failover_seconds": "histogram",
    "mahole_endpoint_received_bytes": "counter",
    "mahole_endpoint_sent_bytes": "counter",
    "mahole_endpoint_datagrams_received": "counter",
    "mahole_router_dropped_malformed": "counter",
}
INTERMEDIATE_FAMILIES = {
    "mahole_nodes": "gauge",
    "mahole_sessions": "gauge",
    "mahole_handshakes_half_open": "gauge",
    "mahole_punching_attempts": "counter",
    "mahole_punching_results": "counter",
    "mahole_time_to_direct_seconds": "histogram",
    "mahole_intermediate_relay_relayed_bytes": "counter",
    "mahole_intermediate_relay_relayed_packets": "counter",
    "mahole_intermediate_connections_accepted": "counter",
    "mahole_endpoint_received_bytes": "counter",
    "mahole_router_dropped_malformed": "counter",
}


def parse(text):
    """{family name: family}; fails on anything prometheus_client's parser refuses."""
    families = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in families, f"family {family.name} twice"
        families[family.name] = family
    return families


def samples(family, name=None, **labels):
    return [s for s in family.samples
            if (name is None or s.name == name)
            and all(s.labels.get(k) == v for k, v in labels.items())]


def value(family, name=None, **labels):
    [sample] = samples(family, name, **labels)
    return sample.value


def check_conventions(text, families, role):
    """Counters end in _total, units end names, every sample says its role."""
    for family in families.values():
        for sample in family.samples:
            assert sample.labels.get("role") == role, sample
            if family.type == "counter":
                assert sample.name in (f"{family.name}_total", f"{family.name}_created"), sample
        assert not family.name.endswith(("_ms", "_milliseconds", "_bytes_sent",
                                         "_bytes_received")), family.name
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert line.startswith("mahole_"), line


def promtool_check(text):
    promtool = shutil.which("promtool")
    if promtool is None:
        return None
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                            capture_output=True, timeout=30)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    return True


def two_hosts():
    return LocalDeployment(agent_kwargs={"bind": ("127.0.0.1", 0)},
                           connector_kwargs={"bind": ("127.0.0.2", 0)})


def test_every_role_serves_prometheus_metrics_that_parse_with_the_right_types():
    async def main():
        async with two_hosts() as d:
            data = os.urandom(256 << 10)
            assert await tcp_round_trip(d.forward_address(d.tcp_forward), data) == data
            [session] = d.agent.sessions.values()
            await wait_for(lambda: session.core.route == DIRECT
                           and d.intermediate.signaling.punching["direct"] == 1, 15)
            assert await tcp_round_trip(d.forward_address(d.tcp_forward), data) == data
            texts = {}
            for role, registry in ((d.intermediate, intermediate_registry(d.intermediate)),
                                   (d.agent, node_registry(d.agent)),
                                   (d.connector, node_registry(d.connector))):
                server = StatusServer(role.status, lambda registry=registry: registry)
                await server.start("127.0.0.1", 0)
                try:
                    status, headers, body = await fetch(*server.address, "/metrics")
                finally:
                    await server.close()
                assert status == 200
                assert headers["content-type"] == METRICS_CONTENT_TYPE
                texts[role.status()["role"]] = body.decode()
            return texts, len(data)

    texts, size = run(main())
    for role, text in texts.items():
        families = parse(text)
        check_conventions(text, families, role)
        expected = INTERMEDIATE_FAMILIES if role == "intermediate" else NODE_FAMILIES
        types_seen = {name: families[name].type for name in expected if name in families}
        assert types_seen == expected, role
        promtool_check(text)

    inter = parse(texts["intermediate"])
    assert value(inter["mahole_nodes"], node_role="agent") == 1
    assert value(inter["mahole_nodes"], node_role="connector") == 1
    assert value(inter["mahole_sessions"], path="direct") == 1
    assert value(inter["mahole_sessions"], path="relay") == 0
    assert value(inter["mahole_punching_attempts"]) == 1
    assert value(inter["mahole_punching_results"], path="direct") == 1
    ttd = inter["mahole_time_to_direct_seconds"]
    assert value(ttd, "mahole_time_to_direct_seconds_count") == 1
    assert 0 < value(ttd, "mahole_time_to_direct_seconds_sum") < 15
    assert value(ttd, "mahole_time_to_direct_seconds_bucket", le="+Inf") == 1
    assert value(inter["mahole_intermediate_relay_relayed_bytes"]) > 0  # the first transfer went by relay

    for role in ("agent", "connector"):
        node = parse(texts[role])
        assert value(node["mahole_intermediate_connected"]) == 1
        assert 0 < value(node["mahole_intermediate_rtt_seconds"]) < 1
        assert value(node["mahole_sessions"], path="direct") == 1
        assert value(node["mahole_sessions"], path="relay") == 0
        [rtt] = samples(node["mahole_session_rtt_seconds"])
        assert rtt.labels["service"] == "echo" and rtt.labels["path"] == "direct"
        assert 0 < rtt.value < 1
        assert value(node["mahole_session_sent_bytes"]) > size
        assert value(node["mahole_session_received_bytes"]) > size
        assert value(node["mahole_session_packets_sent"], path="relay") > 0
        assert value(node["mahole_session_packets_sent"], path="direct") > 0
        assert value(node["mahole_session_route_switches"]) == 1
        assert value(node["mahole_session_failovers"]) == 0
        assert value(node["mahole_session_failover_seconds"],
                     "mahole_session_failover_seconds_count") == 0
    agent = parse(texts["agent"])
    assert value(agent["mahole_session_time_to_direct_seconds"],
                 "mahole_session_time_to_direct_seconds_count") == 1
    assert value(agent["mahole_agent_tcp_accepted"]) == 2
    check_dashboard(texts)


DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "contrib", "grafana", "mahole.json")


def check_dashboard(texts):
    """Every metric the Grafana dashboard queries is one some role exports."""
    exported = {sample.name for text in texts.values()
                for family in text_string_to_metric_families(text) for sample in family.samples}
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    exprs = [target["expr"] for panel in dashboard["panels"]
             for target in panel.get("targets", ())]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"]
              if isinstance(v.get("query"), dict)]
    assert len(exprs) > 20
    for expr in exprs:
        names = re.findall(r"\b(mahole_[a-z_]+)\b(?![.*])", expr)
        patterns = re.findall(r'__name__=~"([^"]+)"', expr)
        assert names or patterns, expr
        for name in names:
            if name not in {p.split(".")[0] for p in patterns}:
                assert name in exported, f"dashboard queries {name}, which no role exports"
        for pattern in patterns:
            assert any(re.fullmatch(pattern, name) for name in exported), pattern


def test_roles_in_one_process_have_their_own_registries_and_none_in_the_global_one():
    async def main():
        async with LocalDeployment() as d:
            registries = [intermediate_registry(d.intermediate), node_registry(d.agent),
                          node_registry(d.connector)]
            assert len({id(r) for r in registries}) == 3
            assert node_registry(d.agent) is registries[1]  # one registry per role, kept
            return [exposition(r).decode() for r in registries]

    texts = run(main())
    assert "mahole_" not in prometheus_client.generate_latest().decode()
    assert "node_role" in texts[0] and 'role="agent"' in texts[1]
    assert 'role="connector"' in texts[2]


# --- bookkeeping with stand-ins: closed sessions, failovers, a full time-to-direct deque ------

class FakeSession:
    def __init__(self, service="svc", sent=0, path="relay"):
        self.service = service
        self.sent = sent
        self.path = path
        self.switch_ms = None
        self.counters = {"streams": 3}
        self.core = types.SimpleNamespace(packets={"relay": 0, "direct": 0},
                                          failover_durations=[])

    def stats(self):
        return {"service": self.service, "session": "s", "path": self.path,
                "bytes_sent": self.sent, "bytes_received": 1, "route_switches": 0,
                "failovers": len(self.core.failover_durations), "rtt_ms": 2.5,
                "switch_ms": self.switch_ms, "dropped_frames": 0, "age_s": 9.5,
                **self.counters}


class FakeNode:
    role = "agent"

    def __init__(self):
        self.sessions = {}

    def status(self):
        return {"intermediate": {"connected": False, "rtt_ms": None, "connects": 0},
                "duplicate_signaling": 0, "endpoint": {"bytes_sent": 7}, "router": {}}


def scrape(node):
    return parse(exposition(registry_for(node, NodeCollector)).decode())


def test_session_counters_never_go_backwards_when_sessions_close():
    node = FakeNode()
    node.sessions[b"a"] = FakeSession(sent=1000)
    node.sessions[b"b"] = FakeSession(sent=10)
    first = scrape(node)
    assert value(first["mahole_session_sent_bytes"]) == 1010
    assert value(first["mahole_session_streams"]) == 6
    assert not any("age" in name for name in first)  # a gauge in stats() is not a counter
    assert value(first["mahole_sessions"], path="relay") == 2
    assert samples(first["mahole_intermediate_rtt_seconds"]) == []  # absent, not 0
    assert value(first["mahole_endpoint_sent_bytes"]) == 7
    node.sessions[b"a"].sent = 2000
    collector = node._metrics_collector
    collector.retire(b"a", node.sessions.pop(b"a"))  # exact final values
    del node.sessions[b"b"]  # gone unannounced: its last scraped values count
    second = scrape(node)
    assert value(second["mahole_session_sent_bytes"]) == 2010
    assert value(second["mahole_sessions"], path="relay") == 0
    assert samples(second["mahole_session_rtt_seconds"]) == []
    node.sessions[b"c"] = FakeSession(sent=5)
    assert value(scrape(node)["mahole_session_sent_bytes"]) == 2015


def test_failover_and_switch_times_fill_histograms_once_each():
    node = FakeNode()
    session = node.sessions[b"a"] = FakeSession()
    session.switch_ms = 120.0
    session.core.failover_durations.append(0.4)
    scrape(node)
    session.core.failover_durations.append(7.0)
    families = scrape(node)
    failover = families["mahole_session_failover_seconds"]
    assert value(failover, "mahole_session_failover_seconds_count") == 2
    assert value(failover, "mahole_session_failover_seconds_sum") == pytest.approx(7.4)
    assert value(failover, "mahole_session_failover_seconds_bucket", le="0.5") == 1
    assert value(failover, "mahole_session_failover_seconds_bucket", le="10.0") == 2
    ttd = families["mahole_session_time_to_direct_seconds"]
    assert value(ttd, "mahole_session_time_to_direct_seconds_count") == 1
    assert value(ttd, "mahole_session_time_to_direct_seconds_sum") == pytest.approx(0.12)


def test_intermediate_time_to_direct_counts_every_result_even_past_the_kept_samples():
    signaling = types.SimpleNamespace(punching={"attempts": 0, "direct": 0, "relay": 0},
                                      time_to_direct_ms=collections.deque(maxlen=3))
    collector = IntermediateCollector(types.SimpleNamespace(signaling=signaling))

    def report(*ms):
        for each in ms:
            signaling.punching["direct"] += 1
            signaling.time_to_direct_ms.append(each)
        collector._observe_time_to_direct()

    report(10, 20)
    report(30, 40, 50, 60, 70)  # more than the deque keeps: the last 3 are observed
    report()
    buckets = collector.time_to_direct
    assert buckets.count == 5 and buckets.sum == pytest.approx((10 + 20 + 50 + 60 + 70) / 1000)


def test_buckets_are_cumulative_with_inf_last():
    buckets = Buckets((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        buckets.observe(v)
    assert buckets.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert buckets.count == 4 and buckets.sum == pytest.approx(3.65)


def test_promtool_accepts_a_node_scrape():
    if shutil.which("promtool") is None:
        pytest.skip("promtool (Debian package prometheus) not installed")
    node = FakeNode()
    node.sessions[b"a"] = FakeSession()
    assert promtool_check(exposition(registry_for(node, NodeCollector)).decode())


def test_a_failover_records_how_long_the_direct_route_was_silent():
    from test_session_core import DIRECT as CORE_DIRECT, direct_pump

    pump = direct_pump()
    pump.run(3.0, every=0.01, action=pump.send_data)
    pump.cut.add(CORE_DIRECT)
    cut_at = pump.now
    pump.run(6.0, every=0.01, action=pump.send_data)
    [failed_at] = pump.core.failovers
    [silent] = pump.core.failover_durations
    assert 0.5 - 0.011 <= silent <= failed_at - cut_at + 0.011
