"""classify, parse_header and Router, against both the compiled module and its twin."""

import os
import random

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.packet import pull_quic_header
from hypothesis import given, settings, strategies as st

from mahole import _fast
from mahole._fast import KIND_QUIC_LONG, KIND_QUIC_SHORT, KIND_RELAY, KIND_STUN, KIND_UNKNOWN
from quic_samples import handshake_packets, synthetic_packets

AIOQUIC_TYPES = {
    "INITIAL": "initial", "ZERO_RTT": "0rtt", "HANDSHAKE": "handshake", "RETRY": "retry",
    "ONE_RTT": "1rtt", "VERSION_NEGOTIATION": "version_negotiation",
}


def all_samples():
    return list(handshake_packets()) + list(synthetic_packets())


# classify -----------------------------------------------------------------------------
@pytest.mark.parametrize("first, kind", [
    (0x00, KIND_STUN), (0x01, KIND_STUN), (0x03, KIND_STUN), (0x04, KIND_UNKNOWN),
    (0x10, KIND_RELAY), (0x11, KIND_UNKNOWN), (0x3F, KIND_UNKNOWN),
    (0x40, KIND_QUIC_SHORT), (0x7F, KIND_QUIC_SHORT), (0x80, KIND_UNKNOWN),
    (0xBF, KIND_UNKNOWN), (0xC0, KIND_QUIC_LONG), (0xFF, KIND_QUIC_LONG),
])
def test_classify_by_first_byte(hot, first, kind):
    assert hot.classify(bytes([first, 1, 2, 3])) == kind
    assert hot.classify(bytearray([first])) == kind
    assert hot.classify(memoryview(bytes([first, 9]))) == kind


def test_classify_empty_is_unknown(hot):
    assert hot.classify(b"") == KIND_UNKNOWN


def test_twins_classify_every_byte_alike():
    impls = _fast.implementations("hot")
    for b in range(256):
        assert len({impl.classify(bytes([b])) for impl in impls.values()}) == 1


# parse_header -------------------------------------------------------------------------
def test_parse_real_handshake(hot):
    packets = handshake_packets()
    client_initial = hot.parse_header(packets[0])
    assert client_initial.packet_type == "initial"
    assert client_initial.version == 1
    assert len(client_initial.dcid) == 8 and len(client_initial.scid) == 8
    assert client_initial.token == b""
    # RFC 9000 §14.1: a client Initial datagram is padded to at least 1200 bytes.
    assert len(packets[0]) >= 1200
    assert client_initial.packet_length == 26 + client_initial.length
    types = [hot.parse_header(p).packet_type for p in packets]
    assert "handshake" in types or "initial" in types[1:]
    short = [p for p in packets if p[0] & 0x80 == 0]
    assert short, "the handshake should have produced 1-RTT packets"
    for p in short:
        h = hot.parse_header(p)
        assert (h.packet_type, h.version, h.scid, h.length) == ("1rtt", None, b"", None)
        assert h.dcid == p[1:9]


def test_parse_version_negotiation_and_retry(hot):
    vn, retry, retry_v2 = synthetic_packets()
    h = hot.parse_header(vn)
    assert h.packet_type == "version_negotiation" and h.version == 0
    assert h.supported_versions == (1, 0x6B3343CF)
    h = hot.parse_header(retry)
    assert h.packet_type == "retry" and len(h.token) == 32 and h.length is None
    h = hot.parse_header(retry_v2)
    assert h.packet_type == "retry" and h.version == 0x6B3343CF and len(h.token) == 16


def test_parse_coalesced_packet_length(hot):
    server_flight = handshake_packets()[1]
    first = hot.parse_header(server_flight)
    assert first.packet_length < len(server_flight)  # Initial + Handshake coalesced
    second = hot.parse_header(server_flight[first.packet_length:])
    assert second.packet_type in ("handshake", "initial")


def test_public_parse_header_is_the_hot_path():
    from mahole.wire import quic

    assert quic.parse_header is _fast.parse_header
    h = quic.parse_header(handshake_packets()[0])
    assert h.packet_type in quic.PACKET_TYPES


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"\x00\x01", "fixed bit"),
    (b"\x41\x01\x02", "shorter than its connection ID"),
    (b"\xc0\x00\x00\x00\x01", "truncated"),
    (b"\xc0\x00\x00\x00\x01\x15" + b"\x00" * 40, "destination connection ID too long"),
    (b"\xc0\x00\x00\x00\x01\x00\x15" + b"\x00" * 40, "source connection ID too long"),
    (b"\x80\x00\x00\x00\x01\x00\x00\x00\x00", "fixed bit"),
    (b"\xc0\x00\x00\x00\x01\x00\x00\x00\x40", "truncated"),  # Initial, token length 2 bytes cut
    (b"\xc0\x00\x00\x00\x01\x00\x00\x05ab", "token truncated"),
    (b"\xe0\x00\x00\x00\x01\x00\x00\x10abc", "payload truncated"),  # Handshake, Length 16
    (b"\xf0\x00\x00\x00\x01\x00\x00" + b"x" * 15, "integrity tag"),
    (b"\x80\x00\x00\x00\x00\x00\x00\x01\x02", "partial version"),
])
def test_parse_rejects_malformed(hot, data, message):
    with pytest.raises(ValueError, match=message):
        hot.parse_header(data)


def test_twins_agree_on_mutations():
    impls = list(_fast.implementations("hot").values())
    rng = random.Random(7)
    for sample in all_samples():
        for _ in range(300):
            data = _mutate(rng, sample)
            outcomes = [_parse_outcome(impl.parse_header, data) for impl in impls]
            assert all(o == outcomes[0] for o in outcomes), data.hex()


def _parse_outcome(parse, data):
    try:
        h = parse(data)
    except ValueError:
        return "rejected"
    return (h.version, h.packet_type, h.dcid, h.scid, h.token, h.length, h.packet_length,
            tuple(h.supported_versions))


def _mutate(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        if op == 0 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1:
            data = data[: rng.randrange(len(data) + 1)]
        elif op == 2:
            pos = rng.randrange(len(data) + 1)
            data[pos:pos] = os.urandom(rng.randint(1, 8))
        elif op == 3 and len(data) > 8:
            # Header fields live in the first bytes: hit them more often.
            data[rng.randrange(min(len(data), 30))] = rng.randrange(256)
    return bytes(data)


def _aioquic_outcome(data):
    try:
        h = pull_quic_header(Buffer(data=data), host_cid_length=8)
    except ValueError:
        return "rejected"
    return (h.version, AIOQUIC_TYPES[h.packet_type.name], h.destination_cid, h.source_cid,
            h.token, h.packet_length)


def test_differential_against_aioquic(hot):
    """On many real and mutated packets, parse_header agrees with aioquic's own parser."""
    rng = random.Random(2026)
    checked = 0
    for sample in all_samples():
        for data in [sample] + [_mutate(rng, sample) for _ in range(1000)]:
            if hot.classify(data) not in (KIND_QUIC_LONG, KIND_QUIC_SHORT):
                continue  # mahole drops these before parsing (docs/architecture.md wire table)
            ours = _parse_outcome(hot.parse_header, data)
            if ours != "rejected":
                ours = ours[:5] + ours[6:7]
            assert ours == _aioquic_outcome(data), data.hex()
            checked += 1
    assert checked > 3000


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_random_bytes_only_raise_value_error(data):
    for impl in _fast.implementations("hot").values():
        try:
            impl.parse_header(data)
        except ValueError:
            pass
        impl.classify(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(range(9)), st.binary(max_size=8), st.integers(0, 1500), st.randoms())
def test_mutated_packets_only_raise_value_error(index, extra, cut, rnd):
    sample = all_samples()[index % len(all_samples())]
    data = _mutate(rnd, sample)[:cut] + extra
    for impl in _fast.implementations("hot").values():
        try:
            impl.parse_header(data)
        except ValueError:
            pass
        impl.Router().dispatch([(data, ("127.0.0.1", 1))])


# Router -------------------------------------------------------------------------------
ADDR = ("127.0.0.1", 5000)


def _short(dcid, payload=b"x" * 30):
    return bytes([0x40 | 0x03]) + dcid + payload


def _relay(session_id, inner=b"\x40inner"):
    return b"\x10" + session_id + inner


def test_router_tables(hot):
    router = hot.Router()
    handles = {os.urandom(8): object() for _ in range(2000)}
    for dcid, handle in handles.items():
        router.add_connection(dcid, handle)
    assert router.connection_count == 2000
    for dcid, handle in handles.items():
        assert router.connection(dcid) is handle
    removed = list(handles)[:1000]
    for dcid in removed:
        assert router.remove_connection(dcid) is handles[dcid]
        assert router.remove_connection(dcid) is None
    assert router.connection_count == 1000
    for dcid, handle in handles.items():
        assert router.connection(dcid) is (None if dcid in removed else handle)
    # Re-adding after removals (tombstones) and replacing a handle both work.
    for dcid in removed[:10]:
        router.add_connection(dcid, "again")
        assert router.connection(dcid) == "again"
    long_dcid = os.urandom(18)
    router.add_connection(long_dcid, "long")
    assert router.connection(long_dcid) == "long"
    with pytest.raises(ValueError):
        router.add_session(b"short", "x")
    router.add_session(b"S" * 8, "entry")
    assert router.session(b"S" * 8) == "entry" and router.session_count == 1
    assert router.remove_session(b"S" * 8) == "entry" and router.session(b"S" * 8) is None


def test_dispatch_groups_and_counts(hot):
    router = hot.Router()
    a, b = object(), object()
    dcid_a, dcid_b, unknown = b"A" * 8, b"B" * 8, b"U" * 8
    router.add_connection(dcid_a, a)
    router.add_connection(dcid_b, b)
    router.add_session(b"s" * 8, "session-entry")
    initial = handshake_packets()[0]
    stun = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"t" * 12
    batch = [
        (_short(dcid_a), ADDR), (_short(dcid_b), ADDR), (_short(dcid_a, b"y"), ADDR),
        (_short(unknown), ADDR),                    # unknown DCID
        (b"\x41abc", ADDR),                         # too short for a DCID
        (initial, ADDR),                            # Initial for a new connection
        (stun, ADDR),
        (_relay(b"s" * 8), ADDR), (_relay(b"?" * 8), ADDR), (b"\x10" + b"s" * 8, ADDR),
        (b"\x20junk", ADDR), (b"", ADDR), (b"\xc0\x00", ADDR),
    ]
    result = router.dispatch(batch)
    assert result.grouped_quic() == {a: [batch[0], batch[2]], b: [batch[1]]}
    assert result.quic_handles == [a, b, a]
    assert result.quic_datagrams == [batch[0], batch[1], batch[2]]
    assert [(h.packet_type, d) for h, d, _ in result.initials] == [("initial", initial)]
    assert result.initials[0][2] == ADDR
    assert result.stun == [batch[6]]
    assert result.relay == [("session-entry", batch[7][0], ADDR)]
    assert result.dropped == 7
    assert router.counters() == {
        "dropped_malformed": 3, "dropped_unknown_kind": 2,
        "dropped_unknown_dcid": 1, "dropped_unknown_session": 1,
    }
    # A long-header packet whose DCID is known goes to its connection, Initial or not.
    router.add_connection(hot.parse_header(initial).dcid, a)
    assert router.dispatch([(initial, ADDR)]).grouped_quic() == {a: [(initial, ADDR)]}


def test_dispatch_accepts_any_buffer(hot):
    router = hot.Router()
    router.add_connection(b"A" * 8, "a")
    result = router.dispatch([(bytearray(_short(b"A" * 8)), ADDR)])
    assert result.quic_handles == ["a"]


# Version Negotiation hand-off (RFC 9000 §6.1, RFC 8999 §5.1) -----------------------------
GREASE = 0x1A2A3A4A  # a reserved version (RFC 9000 §15): never supported
QUIC_V2 = 0x6B3343CF  # RFC 9369


def _long(first, version, dcid, scid, body=b"", size=1200):
    """A long header with these fields, then body, padded with 0xee to size bytes."""
    head = bytes([first]) + version.to_bytes(4, "big") + bytes([len(dcid)]) + dcid \
        + bytes([len(scid)]) + scid + body
    return head + b"\xee" * (size - len(head))


@pytest.mark.parametrize("first, dcid_len, scid_len", [
    (0xE0, 8, 8),    # laid out as a v1 Handshake: not an Initial
    (0xC0, 8, 8),    # an "Initial" whose token length (0xee: 8 bytes) runs off the end
    (0xF0, 8, 8),    # laid out as a v1 Retry
    (0xC0, 21, 4),   # longer connection IDs than v1 allows (RFC 9000 §17.2: read them)
    (0xC0, 0, 255),
    (0xC0, 255, 255),
    (0x80, 8, 8),    # no fixed bit: only the first bit is invariant (RFC 8999 §5.1)
    (0xBF, 8, 0),
], ids=["handshake", "bad-token-length", "retry", "cid-21", "scid-255", "cids-255",
        "no-fixed-bit", "no-fixed-bit-empty-scid"])
def test_any_long_header_of_an_unsupported_version_goes_to_initials(hot, first, dcid_len,
                                                                    scid_len):
    """Every client of a version we do not speak is answered with Version Negotiation: the
    router hands its datagram to the caller whatever its layout, with the two connection IDs
    the answer needs (RFC 9000 §17.2.1)."""
    dcid = bytes((1 + i) % 256 for i in range(dcid_len))
    scid = bytes((100 + i) % 256 for i in range(scid_len))
    data = _long(first, GREASE, dcid, scid)
    router = hot.Router()
    result = router.dispatch([(data, ADDR)])
    assert len(result.initials) == 1 and result.dropped == 0
    header, got, addr = result.initials[0]
    assert (got, addr) == (data, ADDR)
    assert (header.version, header.dcid, header.scid) == (GREASE, dcid, scid)
    assert (header.packet_type, header.token, header.length) == ("unsupported_version", b"",
                                                                 None)
    assert header.packet_length == len(data)
    assert router.counters() == dict.fromkeys(router.counters(), 0)


@pytest.mark.parametrize("data, counter", [
    (_long(0xE0, GREASE, b"d" * 8, b"s" * 8, b"\x40\x10", size=1199), "dropped_unknown_dcid"),
    (_long(0xC0, GREASE, b"d" * 21, b"s" * 8, size=1199), "dropped_malformed"),
    (_long(0x80, GREASE, b"d" * 8, b"s" * 8, size=1199), "dropped_unknown_kind"),
    (_long(0xE0, 1, b"d" * 8, b"s" * 8, b"\x40\x10"), "dropped_unknown_dcid"),  # v1 Handshake
    (_long(0xC0, 1, b"d" * 21, b"s" * 8), "dropped_malformed"),  # a malformed v1 packet
    (_long(0xD0, QUIC_V2, b"d" * 21, b"s" * 8), "dropped_malformed"),  # ... and v2
    (_long(0x80, 1, b"d" * 8, b"s" * 8), "dropped_unknown_kind"),  # v1 without the fixed bit
    (_long(0xC0, 0, b"d" * 8, b"s" * 8, size=1202), "dropped_malformed"),  # partial version
    (_long(0xC0, 0, b"d" * 8, b"s" * 8, size=1203), "dropped_unknown_dcid"),  # a VN packet
    (_long(0x80, 0, b"d" * 8, b"s" * 8, size=1203), "dropped_unknown_kind"),
], ids=["small-grease", "small-grease-long-cid", "small-grease-no-fixed-bit",
        "v1-handshake", "v1-malformed", "v2-malformed", "v1-no-fixed-bit", "v0-partial",
        "v0-version-negotiation", "v0-no-fixed-bit"])
def test_what_gets_no_version_negotiation_is_dropped_as_before(hot, data, counter):
    """Datagrams too small to start a connection (RFC 9000 §14.1), packets of the versions we
    parse (1, 2), and Version Negotiation packets (version 0, never answered: §6.1) are not
    handed over as Initials."""
    router = hot.Router()
    result = router.dispatch([(data, ADDR)])
    assert result.initials == [] and result.dropped == 1
    assert router.counters()[counter] == 1


def test_an_unsupported_version_laid_out_as_an_initial_keeps_its_parsed_header(hot):
    data = _long(0xC0, GREASE, b"d" * 8, b"s" * 8, b"\x00\x44\x96")  # no token, Length 1174
    result = hot.Router().dispatch([(data, ADDR)])
    ((header, _, _),) = result.initials
    assert (header.packet_type, header.version, header.length) == ("initial", GREASE, 1174)
    assert header.packet_length == len(data)


def test_an_unsupported_version_for_a_known_connection_goes_to_it(hot):
    router = hot.Router()
    router.add_connection(b"d" * 8, "conn")
    data = _long(0xE0, GREASE, b"d" * 8, b"s" * 8, b"\x40\x10")
    result = router.dispatch([(data, ADDR)])
    assert result.quic_handles == ["conn"] and result.initials == []


def test_twins_hand_over_the_same_unsupported_versions():
    """Random long headers of at least 1200 bytes, many versions: both routers agree."""
    impls = list(_fast.implementations("hot").values())
    rng = random.Random(99)
    versions = [0, 1, QUIC_V2, GREASE, 0xFF00001D, 0x00000002]
    batch = []
    for _ in range(3000):
        head = bytes([rng.randrange(0x80, 0x100)]) + rng.choice(versions).to_bytes(4, "big")
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
        size = rng.choice([1199, 1200, 1350, rng.randrange(1, 1500)])
        batch.append((head + body + bytes(max(0, size - len(head) - len(body))), ADDR))
    outcomes = []
    for impl in impls:
        result = impl.Router().dispatch(batch)
        outcomes.append(([_parse_outcome(lambda h: h, h) for h, _, _ in result.initials],
                         [d for _, d, _ in result.initials], result.dropped))
    assert all(o == outcomes[0] for o in outcomes)
    assert any(h[1] == "unsupported_version" for h in outcomes[0][0])


# Arguments --------------------------------------------------------------------------------
@pytest.mark.parametrize("short_dcid_len", [-1, -8, -(1 << 40)])
def test_negative_short_dcid_len_is_a_value_error(hot, short_dcid_len):
    for data in (b"\x41" + bytes(20), b"\xc0\x00\x00\x00\x01\x00\x00\x00\x00", b""):
        with pytest.raises(ValueError, match="short_dcid_len"):
            hot.parse_header(data, short_dcid_len)
    with pytest.raises(ValueError, match="short_dcid_len"):
        hot.Router(short_dcid_len)


def test_short_dcid_len_zero_is_allowed(hot):
    header = hot.parse_header(b"\x41payload", 0)
    assert (header.packet_type, header.dcid) == ("1rtt", b"")
    router = hot.Router(0)
    router.add_connection(b"", "zero-length")
    assert router.dispatch([(b"\x41payload", ADDR)]).quic_handles == ["zero-length"]
