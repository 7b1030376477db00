"""`--status`: /status JSON, /metrics exposition text, HTTP edge cases and HOST:PORT parsing.

Every server test runs a real StatusServer on a loopback port chosen by the kernel.
"""

import asyncio
import contextlib
import datetime
import errno
import json
import logging
import math
import re
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mahole.status import (
    Metric,
    StatusServer,
    fetch,
    format_hostport,
    metrics_from_counters,
    parse_hostport,
    parse_request_head,
    render_metrics,
)

HOST = "127.0.0.1"


@contextlib.asynccontextmanager
async def serving(snapshot=dict, metrics=None, **kwargs):
    server = StatusServer(snapshot, metrics, **kwargs)
    await server.start(HOST, 0)
    try:
        yield server
    finally:
        await server.close()


async def raw(server, data):
    """Send raw bytes and end-of-file, return everything the server sends until it closes."""
    reader, writer = await asyncio.open_connection(*server.address)
    try:
        writer.write(data)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def status_of(response):
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", response)
    assert match, response[:80]
    return int(match[1])


# --- a small validator for Prometheus text format 0.0.4 ---------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL_VALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'
_LABELS = rf"\{{(?:[a-zA-Z_][a-zA-Z0-9_]*={_LABEL_VALUE}(?:,[a-zA-Z_][a-zA-Z0-9_]*={_LABEL_VALUE})*)?\}}"
_VALUE = r"(?:[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|NaN|\+Inf|-Inf)"
_HELP_RE = re.compile(rf"# HELP ({_NAME}) ((?:[^\\\n]|\\[\\n])*)")
_TYPE_RE = re.compile(rf"# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)")
_SAMPLE_RE = re.compile(rf"({_NAME})({_LABELS})? ({_VALUE})(?: -?[0-9]+)?")
_PAIR_RE = re.compile(rf"([a-zA-Z_][a-zA-Z0-9_]*)=({_LABEL_VALUE})")


def _unescape(text):
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m[1], m[1]), text)


def parse_exposition(text):
    """Check `text` line by line; return {name: {"type", "help", "samples": {labels: value}}}."""
    assert text == "" or text.endswith("\n")
    families = {}
    current = None
    for line in (text[:-1].split("\n") if text else []):
        if m := _HELP_RE.fullmatch(line):
            family = families.setdefault(m[1], {"samples": {}})
            assert "help" not in family, f"second HELP for {m[1]}"
            family["help"] = _unescape(m[2])
            current = m[1]
        elif m := _TYPE_RE.fullmatch(line):
            family = families.setdefault(m[1], {"samples": {}})
            assert "type" not in family and not family["samples"], f"late TYPE for {m[1]}"
            family["type"] = m[2]
            current = m[1]
        elif m := _SAMPLE_RE.fullmatch(line):
            assert m[1] == current, f"sample {m[1]} outside its family"
            labels = tuple((k, _unescape(v[1:-1])) for k, v in _PAIR_RE.findall(m[2] or ""))
            samples = families[m[1]]["samples"]
            assert labels not in samples, f"duplicate sample {line}"
            samples[labels] = float(m[3])
        else:
            raise AssertionError(f"not exposition format 0.0.4: {line!r}")
    return families


# --- /status ----------------------------------------------------------------------------------

def test_status_serves_the_snapshot_as_json():
    started = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.timezone.utc)
    snapshot = {"role": "agent", "sessions": [{"id": 1, "route": "direct"}],
                "started": started, "counters": {"bytes_in": 10}}

    async def main():
        async with serving(lambda: snapshot) as server:
            return await fetch(*server.address, "/status")

    status, headers, body = asyncio.run(main())
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert json.loads(body) == {**snapshot, "started": str(started)}
    assert body.startswith(b'{\n  "role"')  # indented for people reading it with curl


def test_status_query_string_and_async_snapshot_and_head():
    async def snapshot():
        return {"ok": True}

    async def main():
        async with serving(snapshot) as server:
            return (await fetch(*server.address, "/status?pretty=1"),
                    await fetch(*server.address, "/status", method="HEAD"))

    (status, _, body), (head_status, head_headers, head_body) = asyncio.run(main())
    assert (status, json.loads(body)) == (200, {"ok": True})
    assert head_status == 200 and head_body == b""
    assert head_headers["content-length"] == str(len(body))


def test_status_over_ipv6_loopback():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")

    async def main():
        server = StatusServer(lambda: {"v": 6})
        try:
            await server.start("::1", 0)
        except OSError:
            pytest.skip("no IPv6 loopback")
        try:
            host, port = parse_hostport(format_hostport(*server.address))
            return await fetch(host, port, "/status")
        finally:
            await server.close()

    status, _, body = asyncio.run(main())
    assert (status, json.loads(body)) == (200, {"v": 6})


# --- /metrics ---------------------------------------------------------------------------------

def _metrics():
    return [
        *metrics_from_counters("mahole_agent", {"bytes_in": 1234, "packets_dropped": 0},
                               labels={"role": "agent"}),
        Metric("mahole_sessions", "gauge", "Open sessions.\nBy route.", [
            ({"route": "direct"}, 2),
            ({"route": "relay"}, 1.5),
            ({"route": 'we\\ird "name"\nx'}, float("nan")),
            ({}, float("inf")),
        ]),
        Metric("mahole_uptime_seconds", "gauge", "", [({}, 12.25)]),
    ]


def test_metrics_are_valid_exposition_text():
    async def main():
        async with serving(dict, _metrics) as server:
            return await fetch(*server.address, "/metrics")

    status, headers, body = asyncio.run(main())
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    families = parse_exposition(body.decode("utf-8"))
    assert families["mahole_agent_bytes_in_total"] == {
        "help": "Total bytes_in.", "type": "counter",
        "samples": {(("role", "agent"),): 1234.0}}
    assert families["mahole_agent_packets_dropped_total"]["samples"] == {(("role", "agent"),): 0.0}
    sessions = families["mahole_sessions"]
    assert sessions["help"] == "Open sessions.\nBy route."
    assert sessions["type"] == "gauge"
    assert sessions["samples"][(("route", "direct"),)] == 2
    assert sessions["samples"][(("route", "relay"),)] == 1.5
    assert math.isnan(sessions["samples"][(("route", 'we\\ird "name"\nx'),)])
    assert sessions["samples"][()] == math.inf
    assert families["mahole_uptime_seconds"] == {"type": "gauge", "samples": {(): 12.25}}


def test_render_metrics_exact_text():
    text = render_metrics([
        Metric("a_total", "counter", "Back\\slash", [({"k": 'q"'}, 3), ({"k": "z"}, True)]),
        Metric("b", "gauge", samples=[({}, -0.5), ({"x": "1"}, float("-inf"))]),
    ])
    assert text == (
        "# HELP a_total Back\\\\slash\n"
        "# TYPE a_total counter\n"
        'a_total{k="q\\""} 3\n'
        'a_total{k="z"} 1\n'
        "# TYPE b gauge\n"
        "b -0.5\n"
        'b{x="1"} -Inf\n'
    )
    assert render_metrics([]) == ""


@pytest.mark.parametrize("make, message", [
    (lambda: Metric("1bad", "gauge"), "invalid metric name '1bad'"),
    (lambda: Metric("has-dash", "gauge"), "invalid metric name"),
    (lambda: Metric("bytes", "counter"), "counter bytes must be named bytes_total"),
    (lambda: Metric("x", "histogram"), "type must be one of counter, gauge"),
])
def test_bad_metric_definitions_are_refused(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


@pytest.mark.parametrize("metrics, message", [
    ([Metric("g", "gauge", samples=[({"bad-label": "v"}, 1)])], "invalid label name 'bad-label'"),
    ([Metric("g", "gauge", samples=[({"__reserved": "v"}, 1)])], "invalid label name"),
    ([Metric("g", "gauge", samples=[({}, "12")])], "must be a number"),
    ([Metric("g", "gauge"), Metric("g", "gauge")], "metric g given twice"),
    ([Metric("g", "gauge", samples=[({"a": "1", "b": "2"}, 1), ({"b": "2", "a": "1"}, 2)])],
     "given twice"),
])
def test_render_metrics_refuses_what_prometheus_would_reject(metrics, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        render_metrics(metrics)


def test_metrics_from_counters():
    metrics = metrics_from_counters("mahole_relay", {"frames-in": 5, "drops_total": 1},
                                    help_text={"frames-in": "Frames received."})
    assert [(m.name, m.type, m.help, m.samples) for m in metrics] == [
        ("mahole_relay_frames_in_total", "counter", "Frames received.", [({}, 5)]),
        ("mahole_relay_drops_total", "counter", "drops_total", [({}, 1)]),
    ]
    with pytest.raises(ValueError, match="both give metric x_a_b_total"):
        metrics_from_counters("x", {"a.b": 1, "a-b": 2})
    with pytest.raises(ValueError, match="must be a number"):
        metrics_from_counters("x", {"nested": {"a": 1}})


def test_metrics_path_is_404_without_metrics():
    async def main():
        async with serving(dict) as server:
            return await fetch(*server.address, "/metrics")

    assert asyncio.run(main())[0] == 404


# --- errors -----------------------------------------------------------------------------------

def test_unknown_path_404_and_other_method_405():
    async def main():
        async with serving(dict, list) as server:
            missing = await fetch(*server.address, "/nope")
            trailing = await fetch(*server.address, "/status/")
            post = await raw(server, b"POST /status HTTP/1.1\r\nHost: x\r\n"
                                     b"Content-Length: 5\r\n\r\nhello")
            delete = await fetch(*server.address, "/metrics", method="DELETE")
            return missing, trailing, post, delete

    missing, trailing, post, delete = asyncio.run(main())
    assert missing[0] == 404 and b"/nope" in missing[2]
    assert trailing[0] == 404
    assert status_of(post) == 405
    assert b"\r\nAllow: GET, HEAD\r\n" in post
    assert delete[0] == 405 and delete[1]["allow"] == "GET, HEAD"


def test_snapshot_raising_gives_500_and_server_keeps_serving(caplog):
    calls = []

    def snapshot():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("snapshot exploded")
        return {"calls": len(calls)}

    async def main():
        async with serving(snapshot) as server:
            return (await fetch(*server.address, "/status"),
                    await fetch(*server.address, "/status"))

    with caplog.at_level(logging.ERROR, logger="mahole.status"):
        (status1, _, body1), (status2, _, body2) = asyncio.run(main())
    assert status1 == 500
    assert b"snapshot exploded" not in body1  # details go to the log, not to the client
    assert any("snapshot exploded" in (r.exc_text or "") for r in caplog.records)
    assert (status2, json.loads(body2)) == (200, {"calls": 2})


def test_metrics_failures_give_500():
    def broken():
        raise KeyError("gone")

    async def main():
        async with serving(dict, broken) as server:
            first = await fetch(*server.address, "/metrics")
        async with serving(dict, lambda: [Metric("g", "gauge", samples=[({}, None)])]) as server:
            second = await fetch(*server.address, "/metrics")
        async with serving(lambda: {"loop": float("nan"), ("tuple",): 1}) as server:
            third = await fetch(*server.address, "/status")
        return first, second, third

    assert [r[0] for r in asyncio.run(main())] == [500, 500, 500]


@pytest.mark.parametrize("request_bytes", [
    b"garbage\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),  # a TLS ClientHello
    b"GET /status\r\n\r\n",
    b"GET  /status HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /status HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    b"GET /status HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /status HTTP/1.1\r\nHost : x\r\n\r\n",
    b"GET /status HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
    b"GET /status HTTP/1.1\r\nHost: x\rX: y\r\n\r\n",
    b"GET /status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
    b"GET /status HTTP/1.1\r\nHost: x\r\n" + b"X-Many: y\r\n" * 2000 + b"\r\n",
    # more than the server buffers before it stops reading: the unread rest must not turn
    # into a connection reset that loses the 400
    b"GET /status HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"a" * 200_000 + b"\r\n\r\n",
    b"GET /status HTTP/1.1\r\nHost: x\r\n",  # then EOF before the blank line
])
def test_malformed_request_gets_400_and_server_survives(request_bytes):
    async def main():
        async with serving(lambda: {"ok": 1}) as server:
            return await raw(server, request_bytes), await fetch(*server.address, "/status")

    response, after = asyncio.run(main())
    assert status_of(response) == 400
    assert b"Connection: close" in response
    assert after[0] == 200


def test_garbage_gets_400_while_the_client_keeps_its_side_open():
    async def main():
        async with serving(lambda: {"ok": 1}) as server:
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(b"\x00\xffnot http at all\r\n")
            response = await asyncio.wait_for(reader.read(), 5)  # server half-closes after 400
            writer.close()
            return response, await fetch(*server.address, "/status")

    response, after = asyncio.run(main())
    assert status_of(response) == 400
    assert after[0] == 200


def test_http_1_0_without_host_and_bare_lf_are_accepted():
    async def main():
        async with serving(lambda: {"ok": 1}) as server:
            return (await raw(server, b"GET /status HTTP/1.0\r\n\r\n"),
                    await raw(server, b"\r\nGET /status HTTP/1.1\nHost: x\n\n"))

    for response in asyncio.run(main()):
        assert status_of(response) == 200
        assert response.endswith(b'"ok": 1\n}\n')


def test_slow_client_is_closed_and_server_survives():
    async def main():
        async with serving(lambda: {"ok": 1}, read_timeout=0.2) as server:
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(b"GET /status HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
            await writer.drain()
            try:
                leftover = await asyncio.wait_for(reader.read(), 5)
            except ConnectionResetError:
                leftover = b""
            writer.close()
            return leftover, await fetch(*server.address, "/status")

    leftover, after = asyncio.run(main())
    assert leftover == b""
    assert after[0] == 200


def test_connection_closed_without_request_gets_nothing():
    async def main():
        async with serving(dict) as server:
            return await raw(server, b"")

    assert asyncio.run(main()) == b""


def test_close_ends_idle_connections():
    async def main():
        server = StatusServer(dict)
        await server.start(HOST, 0)
        reader, writer = await asyncio.open_connection(*server.address)
        await asyncio.wait_for(server.close(), 5)
        try:
            data = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            data = b""
        writer.close()
        return data

    assert asyncio.run(main()) == b""


def test_port_in_use_raises_oserror():
    async def main():
        async with serving(dict) as first:
            second = StatusServer(dict)
            with pytest.raises(OSError) as info:
                await second.start(*first.address)
            return info.value

    error = asyncio.run(main())
    assert error.errno == errno.EADDRINUSE
    assert "address already in use" in str(error)


def test_address_before_start_is_an_error():
    with pytest.raises(RuntimeError, match="not started"):
        StatusServer(dict).address


# --- HOST:PORT --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, default_host, expected", [
    ("127.0.0.1:9000", None, ("127.0.0.1", 9000)),
    ("[::1]:9000", None, ("::1", 9000)),
    ("[fe80::1%eth0]:53", None, ("fe80::1%eth0", 53)),
    ("localhost:9000", None, ("localhost", 9000)),
    ("relay.example.com:443", None, ("relay.example.com", 443)),
    ("my_host-1:1", None, ("my_host-1", 1)),
    (":9000", None, ("127.0.0.1", 9000)),
    (":9000", "0.0.0.0", ("0.0.0.0", 9000)),
    ("0.0.0.0:0", None, ("0.0.0.0", 0)),
    ("host:65535", None, ("host", 65535)),
])
def test_parse_hostport_accepts(text, default_host, expected):
    assert parse_hostport(text, default_host) == expected


@pytest.mark.parametrize("text, message", [
    ("x", "expected HOST:PORT, got 'x'"),
    ("9000", "expected HOST:PORT, got '9000'"),
    ("", "expected HOST:PORT, got ''"),
    ("host:", "port '' is not a number"),
    ("host:http", "port 'http' is not a number"),
    ("host:+80", "port '+80' is not a number"),
    ("host:8_0", "port '8_0' is not a number"),
    ("host: 80", "port ' 80' is not a number"),
    ("host:65536", "port 65536 out of range 0-65535"),
    ("host:99999", "out of range"),
    ("::1:9000", "write an IPv6 address in brackets"),
    ("[::1]9000", "expected HOST:PORT, got '[::1]9000'"),
    ("[::1:9000", "expected HOST:PORT"),
    ("[nothost]:1", "'nothost' is not an IPv6 address"),
    ("999.1.1.1:80", "'999.1.1.1' is not an IPv4 address"),
    ("bad host:80", "'bad host' is not a valid host name"),
    ("-lead:80", "is not a valid host name"),
    ("a..b:80", "is not a valid host name"),
])
def test_parse_hostport_refuses(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_hostport(text)


def test_parse_hostport_port_zero_can_be_refused():
    with pytest.raises(ValueError, match="port 0 out of range 1-65535"):
        parse_hostport("relay:0", allow_zero=False)


@pytest.mark.parametrize("host, port", [("127.0.0.1", 1), ("::1", 2), ("name", 3)])
def test_format_hostport_round_trips(host, port):
    assert parse_hostport(format_hostport(host, port)) == (host, port)


# --- properties -------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_parse_hostport_only_raises_value_error(text):
    try:
        host, port = parse_hostport(text)
    except ValueError:
        return
    assert 0 <= port <= 65535 and host


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), min_size=0, max_size=5))
def test_parse_request_head_only_raises_value_error(lines):
    try:
        parse_request_head(lines)
    except ValueError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True),
                       st.text(max_size=20), max_size=4),
       st.one_of(st.integers(min_value=-2**60, max_value=2**60),
                 st.floats(allow_nan=False)))
def test_rendered_labels_and_values_round_trip(labels, value):
    text = render_metrics([Metric("m", "gauge", "h", [(labels, value)])])
    families = parse_exposition(text)
    assert families["m"]["samples"] == {tuple(labels.items()): float(value)}
