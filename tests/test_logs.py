"""Logs: aioquic's own lines said in mahole's words, and refusal lines that a flood cannot
multiply (`mahole.logs.LogLimit`, on a fake clock)."""

import io
import json
import logging

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionAdapter, QuicConnectionError
from aioquic.quic.packet import QuicErrorCode

from mahole import logs, signaling
from mahole.signaling import SignalingCore
from mahole.wire import control
from quic_samples import CLIENT_ADDR, _self_signed, handshake_packets

CID = "8f3a0c1d2e4b5a69"


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    quic = logging.getLogger("quic")
    handlers, level = list(root.handlers), root.level
    quic_level, quic_filters = quic.level, list(quic.filters)
    factory = logging.getLogRecordFactory()
    yield
    logging.setLogRecordFactory(factory)
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    quic.setLevel(quic_level)
    quic.filters[:] = quic_filters


def logged(verbose=0, fmt="text"):
    """mahole's logging set up as the CLI does, writing into a string."""
    stream = io.StringIO()
    logs.setup(verbose=verbose, fmt=fmt, stream=stream, environ={})
    return stream


def aioquic_logger():
    """The logger adapter every aioquic QuicConnection logs through."""
    return QuicConnectionAdapter(logging.getLogger("quic"), {"id": CID})


def fake_clock(start=1000.0):
    """Records stamped with a settable time instead of the real one."""
    clock = {"now": start}
    factory = logging.getLogRecordFactory()

    def make(*args, **kwargs):
        record = factory(*args, **kwargs)
        record.created = clock["now"]
        return record

    logging.setLogRecordFactory(make)
    return clock


# --- LogLimit ---------------------------------------------------------------------------------

def test_log_limit_lets_a_burst_through_then_counts_and_reports_once():
    limit = logs.LogLimit(burst=3, window=10.0)
    assert [limit.take("x", 0.0 + i / 100) for i in range(5)] == [
        (True, 0), (True, 0), (True, 0), (False, 0), (False, 0)]
    assert limit.take("y", 1.0) == (True, 0)  # kinds are counted apart
    assert limit.next_due() == 10.0 and limit.due(9.99) == []
    assert limit.take("x", 10.0) == (True, 2)  # the next window reports the last one's misses
    assert limit.take("x", 10.5) == (True, 0)  # ... once
    assert limit.suppressed_total == 2


def test_log_limit_due_reports_a_window_when_the_flood_stops():
    limit = logs.LogLimit(burst=1, window=10.0)
    for i in range(100):
        limit.take("x", i / 100)
    assert limit.due(10.0) == [("x", 99)]
    assert limit.due(100.0) == [] and limit.next_due() is None
    assert limit.take("x", 100.0) == (True, 0)


def test_log_limit_bounds_its_kinds():
    limit = logs.LogLimit(burst=1, window=10.0, max_kinds=4)
    results = [limit.take(f"kind{i}", 1.0) for i in range(100)]
    assert results[:4] == [(True, 0)] * 4 and results[4] == (True, 0)  # (other) opens
    assert results[5:] == [(False, 0)] * 95
    assert len(limit._windows) == 5
    with pytest.raises(ValueError):
        logs.LogLimit(burst=0)


# --- aioquic's lines ----------------------------------------------------------------------------

def test_a_peer_protocol_violation_is_one_readable_info_line(restore_logging):
    stream = logged(verbose=1)
    aioquic_logger().warning(QuicConnectionError(
        error_code=QuicErrorCode.PROTOCOL_VIOLATION, frame_type=0x1c,
        reason_phrase="Packet contains no frames"))
    [line] = stream.getvalue().splitlines()
    assert line.endswith(
        f" mahole.quic INFO the peer of QUIC connection {CID} broke the QUIC protocol: "
        f"Packet contains no frames (error 0xa PROTOCOL_VIOLATION, frame type 0x1c)")
    assert "Error:" not in line and "WARNING" not in line


def test_error_298_is_a_failed_tls_handshake_named_by_its_alert(restore_logging):
    stream = logged(verbose=1)
    aioquic_logger().warning(QuicConnectionError(
        error_code=298, frame_type=6, reason_phrase="unable to get local issuer certificate"))
    [line] = stream.getvalue().splitlines()
    assert line.endswith(
        f"INFO the TLS handshake with the peer of QUIC connection {CID} failed: unable to get "
        f"local issuer certificate (error 0x12a bad certificate, frame type 0x6)")


def test_aioquic_warnings_stay_out_of_a_default_log(restore_logging):
    stream = logged()  # WARNING: what a peer can cause is not a warning of ours
    aioquic_logger().warning(QuicConnectionError(298, 6, "bad certificate"))
    aioquic_logger().warning("Version negotiation packet contains protocol version %s",
                             "VERSION_1")
    assert stream.getvalue() == ""


def test_aioquic_lines_in_json_are_mahole_objects(restore_logging):
    stream = logged(verbose=1, fmt="json")
    aioquic_logger().warning(QuicConnectionError(0xA, None, "Bad\nreason\x1b[31m"))
    [entry] = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert entry["logger"] == "mahole.quic" and entry["level"] == "INFO"
    assert entry["message"] == (f"the peer of QUIC connection {CID} broke the QUIC protocol: "
                                f"Bad?reason?[31m (error 0xa PROTOCOL_VIOLATION)")


def test_a_real_undecryptable_packet_is_a_debug_line_only_with_vv(restore_logging):
    cert, key = _self_signed()
    config = QuicConfiguration(is_client=False, alpn_protocols=["test"])
    config.certificate, config.private_key = cert, key
    initial = bytearray(handshake_packets()[0])
    initial[100] ^= 0xFF  # inside the Initial's payload: its AEAD tag no longer matches

    def receive():
        server = QuicConnection(configuration=config,
                                original_destination_connection_id=bytes(initial[6:14]))
        server.receive_datagram(bytes(initial), CLIENT_ADDR, now=1.0)
        return server

    stream = logged(verbose=1)
    receive()
    assert stream.getvalue() == ""
    stream = logged(verbose=2)
    receive()
    lines = [line for line in stream.getvalue().splitlines() if "decrypt" in line]
    assert len(lines) == 1, stream.getvalue()
    assert " mahole.quic DEBUG QUIC connection " in lines[0]
    assert lines[0].endswith(": dropped a packet that could not be decrypted "
                             "(authentication failed)")


def test_other_aioquic_lines_keep_their_level_in_our_words(restore_logging):
    stream = logged(verbose=2)
    aioquic_logger().info("Stream %d reset by peer (error code %d, final size %d)", 4, 1, 0)
    [line] = stream.getvalue().splitlines()
    assert line.endswith(f" mahole.quic INFO QUIC connection {CID}: Stream 4 reset by peer "
                         f"(error code 1, final size 0)")


def test_a_flood_of_aioquic_warnings_is_rate_limited_with_one_summary(restore_logging):
    stream = logged(verbose=1)
    clock = fake_clock()
    adapter = aioquic_logger()
    for i in range(5000):
        clock["now"] = 1000.0 + i / 1000  # 5,000 in 5 s
        adapter.warning(QuicConnectionError(0xA, 0, "Packet contains no frames"))
    lines = stream.getvalue().splitlines()
    assert len(lines) == logs.QUIC_BURST
    clock["now"] = 1000.0 + logs.QUIC_WINDOW + 1
    adapter.warning(QuicConnectionError(0xA, 0, "Packet contains no frames"))
    summary, last = stream.getvalue().splitlines()[len(lines):]
    assert summary.endswith(f"INFO … and {5000 - logs.QUIC_BURST:,} more lines like the next "
                            f"were not logged in {logs.QUIC_WINDOW:g} s")
    assert "broke the QUIC protocol" in last


# --- the intermediate's refusals -------------------------------------------------------------------

def test_refusals_are_logged_at_info_with_node_and_service(caplog):
    caplog.set_level(logging.INFO, logger="mahole.signaling")
    core = SignalingCore(acl=("alice=web",))
    core.node_connected(1, "agent", "bob", ("198.51.100.7", 40001), 0.0)
    core.control_message(1, control.Register(role="agent", name="bob"), 0.0)
    core.control_message(1, control.OpenSession(request_id=1, service="web"), 0.0)
    core.node_connected(2, "agent", "alice", ("198.51.100.8", 40002), 0.0)
    core.control_message(2, control.Register(role="agent", name="alice"), 0.0)
    core.control_message(2, control.OpenSession(request_id=1, service="web"), 0.0)
    refusals = [(r.levelname, r.getMessage()) for r in caplog.records if "refused" in r.message]
    assert refusals == [
        ("INFO", "refused agent 'bob' at 198.51.100.7:40001 a session to service 'web': "
                 "no --allow rule matches"),
        ("INFO", "refused agent 'alice' at 198.51.100.8:40002 a session to service 'web': "
                 "no connector offers it"),
    ]


def test_5000_refusals_make_a_bounded_number_of_lines_and_a_summary(caplog):
    """A flood of refused requests from 5,000 agents over 20 s of the core's fake clock."""
    caplog.set_level(logging.INFO, logger="mahole.signaling")
    core = SignalingCore(acl=("*=web",))
    now = 0.0

    def run_timers(until):
        while (timer := core.next_timer()) is not None and timer <= until:
            core.handle_timer(timer)

    for i in range(5000):
        now = i * 0.004
        run_timers(now)
        core.node_connected(i, "agent", f"a{i}", ("198.51.100.7", 1024 + i), now)
        core.control_message(i, control.Register(role="agent", name=f"a{i}"), now)
        service = "db" if i % 2 else "web"  # denied by the ACL / no connector offers it
        core.control_message(i, control.OpenSession(request_id=1, service=service), now)
        core.node_disconnected(i, now)
    assert core.counters["sessions_denied"] == core.counters["sessions_unknown_service"] == 2500
    run_timers(now + 100)  # the flood stopped: its last windows still get their summaries
    assert core.next_timer() is None
    lines = [r for r in caplog.records if r.name == "mahole.signaling"
             and r.levelno == logging.INFO and "refused" in r.getMessage()
             or "more refusals" in r.getMessage()]
    windows = 2  # 20 s of flood, 10 s windows
    burst = signaling.REFUSAL_LOG_BURST
    assert len(lines) <= 2 * windows * (burst + 1)
    for kind, reason in (("denied by the ACL", "no --allow rule matches"),
                         ("for an unknown service", "no connector offers it")):
        shown = [r for r in lines if r.getMessage().endswith(reason)]
        summaries = [r.getMessage() for r in lines if f"more refusals {kind} in" in r.getMessage()]
        assert burst <= len(shown) <= windows * burst
        assert 1 <= len(summaries) <= windows
        missed = sum(int(s.split(" more ")[0].split()[-1].replace(",", "")) for s in summaries)
        assert len(shown) + missed == 2500  # every refusal is either logged or counted
    assert lines[-1].getMessage().startswith("… and ")
    assert "1,2" in lines[-1].getMessage()  # counts are written with thousands separators
