"""``GET /metrics`` for every role, through ``prometheus_client``.

Each role gets its own :class:`~prometheus_client.CollectorRegistry` (never the global one, so
several roles in one process, as in tests and the demo, do not clash) holding one custom
collector that reads the role's state at scrape time. Names follow Prometheus' conventions:
counters end in ``_total``, units are in the name (``_seconds``, ``_bytes_total``), every
sample carries ``role`` (``agent``, ``connector`` or ``intermediate``), and per-route values
carry ``path`` (``direct``, ``relay`` or ``none``).

Counters must never go backwards while the process lives, but sessions come and go. A node's
session counters are therefore the sum over the open sessions plus what the sessions that
have closed carried when they were last seen (:meth:`NodeCollector.retire` folds a session's
final values in exactly when the node calls it; otherwise a vanished session is folded in with
its values from the previous scrape). Histograms are kept here, cumulatively, from samples the
roles record: the intermediate's time to direct, a session's switch time and failover
durations.
"""

from __future__ import annotations

import numbers
import re
from typing import Any, Iterable, Mapping, Optional

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

__all__ = ["Buckets", "IntermediateCollector", "NodeCollector", "PATHS", "exposition",
           "intermediate_registry", "node_registry", "registry_for"]

PATHS = ("direct", "relay", "none")
# Seconds from StartPunching to the direct route in use (loopback: ms; NATs: up to seconds).
TIME_TO_DIRECT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Seconds from the last packet on the direct route to traffic back on the relay.
FAILOVER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0)

_NAME_BAD_RE = re.compile(r"[^a-zA-Z0-9_]")
# Counter keys that carry a unit, renamed so the unit ends the name (before ``_total``).
_UNIT_RENAMES = {
    "bytes_sent": "sent_bytes", "bytes_received": "received_bytes",
    "bytes_in": "received_bytes", "bytes_out": "sent_bytes",
}


def _counter_name(prefix: str, key: str) -> str:
    """``prefix_key`` as a counter base name (``_total`` is added by prometheus_client)."""
    key = _UNIT_RENAMES.get(key, key)
    name = _NAME_BAD_RE.sub("_", f"{prefix}_{key}")
    return name[:-len("_total")] if name.endswith("_total") else name


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None


class Buckets:
    """A cumulative histogram kept by hand: ``observe`` samples, ``family`` exposes them."""

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        value = float(value)
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts):
            running += count
            out.append((bound, running))
        return out


def _histogram(name: str, documentation: str, labels: Mapping[str, str],
               buckets: Buckets) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=list(labels))
    family.add_metric(list(labels.values()), buckets.cumulative(), buckets.sum)
    return family


def _counters(prefix: str, counters: Mapping[str, Any], documentation: str,
              labels: Mapping[str, str], seen: set) -> Iterable[CounterMetricFamily]:
    for key, value in counters.items():
        number = _number(value)
        if number is None:
            continue
        name = _counter_name(prefix, key)
        if name in seen:  # two keys that give one name: the first wins, never a bad scrape
            continue
        seen.add(name)
        family = CounterMetricFamily(name, documentation.format(key=key), labels=list(labels))
        family.add_metric(list(labels.values()), number)
        yield family


def _gauge(name: str, documentation: str, labels: Mapping[str, str],
           value: Optional[float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    if value is not None:
        family.add_metric(list(labels.values()), value)
    return family


# --------------------------------------------------------------------------------------------
# Agent and connector

_SESSION_COUNTERS = {  # stats() key -> (metric base name, help)
    "bytes_sent": ("mahole_session_sent_bytes",
                   "Bytes sent on end-to-end connections (QUIC, every route), closed sessions included."),
    "bytes_received": ("mahole_session_received_bytes",
                       "Bytes received on end-to-end connections, closed sessions included."),
    "route_switches": ("mahole_session_route_switches",
                       "Route changes of sessions (relay to direct and back)."),
    "failovers": ("mahole_session_failovers",
                  "Times the direct route of a session died and traffic went back to the relay."),
    "dropped_frames": ("mahole_session_dropped_frames",
                       "End-to-end frames dropped by sessions."),
}


class NodeCollector:
    """Metrics of an agent or a connector (:class:`mahole.roles.node.Node`)."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.role = node.role
        self._last: dict[Any, dict[str, float]] = {}  # session id -> values at last scrape
        self._retired: dict[str, float] = {}  # totals of sessions gone
        self._observed: dict[Any, tuple[bool, int]] = {}  # id -> (switch seen, failovers seen)
        self.time_to_direct = Buckets(TIME_TO_DIRECT_BUCKETS)
        self.failover = Buckets(FAILOVER_BUCKETS)

    # Bookkeeping -----------------------------------------------------------------------------
    def _values(self, session: Any, stats: Mapping[str, Any]) -> dict[str, float]:
        # Only what counts up: the known session counters and the role's own counter dict
        # (streams, datagrams, ...); gauges in stats() such as an age or an RTT are not summed.
        values = {}
        own = getattr(session, "counters", None)
        for key, value in (*((k, stats.get(k)) for k in _SESSION_COUNTERS),
                           *(own.items() if isinstance(own, Mapping) else ())):
            number = _number(value)
            if number is not None:
                values[key] = number
        core = getattr(session, "core", None)
        for path, packets in (getattr(core, "packets", None) or {}).items():
            values[f"packets:{path}"] = float(packets)
        return values

    def _observe(self, sid: Any, session: Any, stats: Mapping[str, Any]) -> None:
        switch_seen, failovers_seen = self._observed.get(sid, (False, 0))
        if not switch_seen and stats.get("switch_ms") is not None:
            self.time_to_direct.observe(stats["switch_ms"] / 1000)
            switch_seen = True
        durations = getattr(getattr(session, "core", None), "failover_durations", ())
        for duration in list(durations)[failovers_seen:]:
            self.failover.observe(duration)
        self._observed[sid] = (switch_seen, len(durations))

    def retire(self, sid: Any, session: Any) -> None:
        """Fold a closing session's final values into the totals (the node may call this)."""
        stats = session.stats()
        self._observe(sid, session, stats)
        self._last[sid] = self._values(session, stats)
        self._fold(sid)

    def _fold(self, sid: Any) -> None:
        for key, value in self._last.pop(sid, {}).items():
            self._retired[key] = self._retired.get(key, 0.0) + value
        self._observed.pop(sid, None)

    # Collection ------------------------------------------------------------------------------
    def collect(self):
        node, role = self.node, self.role
        labels = {"role": role}
        status = node.status()
        sessions = dict(getattr(node, "sessions", {}))
        for sid in [sid for sid in self._last if sid not in sessions]:
            self._fold(sid)  # closed since the last scrape: keep its counts in the totals
        totals = dict(self._retired)
        by_path = dict.fromkeys(PATHS, 0)
        rtt = GaugeMetricFamily("mahole_session_rtt_seconds",
                                "Smoothed RTT of each open session's end-to-end connection.",
                                labels=["role", "service", "session", "path"])
        for sid, session in sessions.items():
            stats = session.stats()
            self._observe(sid, session, stats)
            values = self._values(session, stats)
            self._last[sid] = values
            for key, value in values.items():
                totals[key] = totals.get(key, 0.0) + value
            path = str(stats.get("path") or "none")
            by_path[path] = by_path.get(path, 0) + 1
            if stats.get("rtt_ms") is not None:
                rtt.add_metric([role, str(stats.get("service")), str(stats.get("session")), path],
                               stats["rtt_ms"] / 1000)

        intermediate = status.get("intermediate") or {}
        yield _gauge("mahole_intermediate_connected",
                     "1 while the control connection to the intermediate is up.", labels,
                     1.0 if intermediate.get("connected") else 0.0)
        rtt_ms = intermediate.get("rtt_ms")
        yield _gauge("mahole_intermediate_rtt_seconds",
                     "Smoothed RTT of the control connection (absent while disconnected).",
                     labels, rtt_ms / 1000 if rtt_ms is not None else None)
        seen: set = set()
        yield from _counters("mahole_intermediate", {"connects": intermediate.get("connects", 0)},
                             "Control connections to the intermediate established.", labels, seen)
        sessions_gauge = GaugeMetricFamily("mahole_sessions", "Open sessions by route.",
                                           labels=["role", "path"])
        for path, count in by_path.items():
            sessions_gauge.add_metric([role, path], count)
        yield sessions_gauge
        yield rtt
        packets = CounterMetricFamily("mahole_session_packets_sent",
                                      "End-to-end packets sent, by route.",
                                      labels=["role", "path"])
        for path in sorted({*("direct", "relay"),
                            *(k.split(":", 1)[1] for k in totals if k.startswith("packets:"))}):
            packets.add_metric([role, path], totals.get(f"packets:{path}", 0.0))
        yield packets
        seen.update({"mahole_session_packets_sent"})
        for key, (name, documentation) in _SESSION_COUNTERS.items():
            seen.add(name)
            family = CounterMetricFamily(name, documentation, labels=["role"])
            family.add_metric([role], totals.get(key, 0.0))
            yield family
        others = {k: v for k, v in totals.items()
                  if k not in _SESSION_COUNTERS and not k.startswith("packets:")}
        yield from _counters("mahole_session", others,
                             "Session counter {key}, summed over sessions, closed ones included.",
                             labels, seen)
        yield _histogram("mahole_session_time_to_direct_seconds",
                         "Time from the start of punching to the direct route in use.",
                         labels, self.time_to_direct)
        yield _histogram("mahole_session_failover_seconds",
                         "Time from the last packet on a dead direct route to traffic on the relay.",
                         labels, self.failover)
        yield from _counters("mahole_signaling", {
            "duplicates": status.get("duplicate_signaling", 0)},
            "Repeated signaling messages ignored.", labels, seen)
        role_counters = status.get("counters")
        if isinstance(role_counters, Mapping):
            yield from _counters(f"mahole_{role}", role_counters, f"{role} counter {{key}}.",
                                 labels, seen)
        yield from _counters("mahole_endpoint", status.get("endpoint") or {},
                             "UDP endpoint counter {key}.", labels, seen)
        yield from _counters("mahole_router", status.get("router") or {},
                             "Datagram router counter {key}.", labels, seen)


# --------------------------------------------------------------------------------------------
# Intermediate

class IntermediateCollector:
    """Metrics of an intermediate (:class:`mahole.roles.intermediate.Intermediate`)."""

    role = "intermediate"

    def __init__(self, intermediate: Any) -> None:
        self.intermediate = intermediate
        self.time_to_direct = Buckets(TIME_TO_DIRECT_BUCKETS)
        self._directs_seen = 0

    def _observe_time_to_direct(self) -> None:
        signaling = self.intermediate.signaling
        times = list(signaling.time_to_direct_ms)
        # Every "direct" result appends one sample to a bounded deque: the count says how many
        # arrived since the last scrape even after the deque started dropping old ones.
        total = int(signaling.punching.get("direct", len(times)))
        new = max(total - self._directs_seen, 0)
        for ms in times[len(times) - min(new, len(times)):]:
            self.time_to_direct.observe(ms / 1000)
        self._directs_seen = total

    def collect(self):
        inter = self.intermediate
        labels = {"role": self.role}
        status = inter.status()
        self._observe_time_to_direct()
        nodes = GaugeMetricFamily("mahole_nodes", "Nodes registered, by their role.",
                                  labels=["role", "node_role"])
        for node_role in ("agent", "connector"):
            nodes.add_metric([self.role, node_role], status["nodes"][f"{node_role}s"])
        yield nodes
        by_path = dict.fromkeys(("direct", "relay"), 0)
        for session in status["sessions"]["list"]:
            path = str(session.get("path") or "none")
            by_path[path] = by_path.get(path, 0) + 1
        sessions = GaugeMetricFamily("mahole_sessions", "Open sessions by route.",
                                     labels=["role", "path"])
        for path, count in by_path.items():
            sessions.add_metric([self.role, path], count)
        yield sessions
        yield _gauge("mahole_handshakes_half_open",
                     "Control connections accepted but not registered yet.", labels,
                     status["handshakes"]["half_open"])
        punching = dict(inter.signaling.punching)
        seen: set = {"mahole_punching_results"}
        yield from _counters("mahole_punching", {"attempts": punching.pop("attempts", 0)},
                             "Hole punching attempts started.", labels, seen)
        results = CounterMetricFamily("mahole_punching_results",
                                      "Punching outcomes reported by agents, by resulting path.",
                                      labels=["role", "path"])
        for path, count in punching.items():
            results.add_metric([self.role, path], count)
        yield results
        yield _histogram("mahole_time_to_direct_seconds",
                         "Time from StartPunching to the direct route, as agents report it.",
                         labels, self.time_to_direct)
        yield from _counters("mahole_intermediate_relay", status.get("relay") or {},
                             "Relay engine counter {key}.", labels, seen)
        yield from _counters("mahole_intermediate", status.get("counters") or {},
                             "Intermediate counter {key}.", labels, seen)
        yield from _counters("mahole_endpoint", status.get("endpoint") or {},
                             "UDP endpoint counter {key}.", labels, seen)
        yield from _counters("mahole_router", status.get("router") or {},
                             "Datagram router counter {key}.", labels, seen)


# --------------------------------------------------------------------------------------------

def registry_for(role: Any, make: Any) -> CollectorRegistry:
    """The role's own registry with ``make(role)`` as its collector, made on first use and
    kept on the role (one registry per role object, never the global one)."""
    registry = getattr(role, "_metrics_registry", None)
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        collector = make(role)
        registry.register(collector)
        role._metrics_registry = registry
        role._metrics_collector = collector
    return registry


def node_registry(node: Any) -> CollectorRegistry:
    """The registry an agent's or a connector's ``/metrics`` serves."""
    return registry_for(node, NodeCollector)


def intermediate_registry(intermediate: Any) -> CollectorRegistry:
    """The registry an intermediate's ``/metrics`` serves."""
    return registry_for(intermediate, IntermediateCollector)


def exposition(registry: CollectorRegistry) -> bytes:
    """A registry's metrics as Prometheus text format 0.0.4."""
    return generate_latest(registry)
