"""Relay frame codec: ``0x10 | session_id (8 bytes) | relay_token (8 bytes) | inner packet``."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mahole._fast._kinds import KIND_RELAY
from mahole.wire.relay import (
    FRAME_TYPE,
    HEADER_LEN,
    NO_TOKEN,
    SESSION_ID_LEN,
    TOKEN_LEN,
    RelayFrame,
    decode_frame,
    encode_frame,
    new_relay_token,
    new_session_id,
)

SID = bytes.fromhex("0123456789abcdef")
TOKEN = bytes.fromhex("a1b2c3d4e5f60718")
FAST = settings(max_examples=300, deadline=None)


def test_layout_is_type_byte_then_session_id_then_token_then_inner():
    frame = encode_frame(SID, b"\xc3quic-initial", TOKEN)
    assert frame == b"\x10" + SID + TOKEN + b"\xc3quic-initial"
    assert (FRAME_TYPE, SESSION_ID_LEN, TOKEN_LEN, HEADER_LEN) == (0x10, 8, 8, 17)


def test_without_a_token_the_frame_carries_eight_zero_bytes():
    assert NO_TOKEN == bytes(8)
    assert encode_frame(SID, b"x") == b"\x10" + SID + bytes(8) + b"x"


def test_round_trip():
    frame = decode_frame(encode_frame(SID, b"x", TOKEN))
    assert frame == (SID, TOKEN, b"x")
    assert isinstance(frame, RelayFrame)
    assert (frame.session_id, frame.token, frame.inner) == (SID, TOKEN, b"x")


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_accepts_bytes_like_and_returns_bytes(wrap):
    frame = encode_frame(wrap(SID), wrap(b"payload"), wrap(TOKEN))
    session_id, token, inner = decode_frame(wrap(frame))
    assert (session_id, token, inner) == (SID, TOKEN, b"payload")
    assert type(session_id) is bytes and type(token) is bytes and type(inner) is bytes


def test_new_session_ids_and_tokens_are_random_8_bytes():
    for make, length in ((new_session_id, SESSION_ID_LEN), (new_relay_token, TOKEN_LEN)):
        values = {make() for _ in range(32)}
        assert len(values) == 32
        assert all(type(v) is bytes and len(v) == length for v in values)


@pytest.mark.parametrize("length", [0, 1, 7, 9, 16])
def test_encode_rejects_session_id_of_wrong_length(length):
    with pytest.raises(ValueError, match=f"session id must be 8 bytes, got {length}"):
        encode_frame(b"s" * length, b"inner")


@pytest.mark.parametrize("length", [0, 1, 7, 9, 16])
def test_encode_rejects_token_of_wrong_length(length):
    with pytest.raises(ValueError, match=f"token must be 8 bytes, got {length}"):
        encode_frame(SID, b"inner", b"t" * length)


def test_encode_rejects_empty_inner():
    with pytest.raises(ValueError, match="inner packet is empty"):
        encode_frame(SID, b"")


def test_encode_rejects_non_bytes():
    with pytest.raises(TypeError):
        encode_frame("0123456789abcdef", b"x")
    with pytest.raises(TypeError):
        encode_frame(SID, b"x", "a1b2c3d4")


def test_decode_rejects_empty_datagram():
    with pytest.raises(ValueError, match="empty datagram"):
        decode_frame(b"")


@pytest.mark.parametrize("first", [0x00, 0x01, 0x11, 0x0F, 0x40, 0xC0, 0xFF])
def test_decode_rejects_other_first_bytes(first):
    with pytest.raises(ValueError, match=f"first byte is 0x{first:02x}, not 0x10"):
        decode_frame(bytes([first]) + SID + TOKEN + b"inner")


@pytest.mark.parametrize("length", range(1, HEADER_LEN))
def test_decode_rejects_truncated_header(length):
    with pytest.raises(ValueError, match=f"{length} bytes is shorter than the 17-byte header"):
        decode_frame((b"\x10" + SID + TOKEN)[:length])


def test_decode_rejects_header_without_inner_packet():
    with pytest.raises(ValueError, match="inner packet is empty"):
        decode_frame(b"\x10" + SID + TOKEN)


def test_frames_classify_as_relay(hot):
    """The hot path's first-byte demultiplexer agrees with this codec."""
    assert hot.classify(encode_frame(SID, b"\x40short-header", TOKEN)) == KIND_RELAY


def test_routers_route_frames_by_session_id_whatever_the_token(hot):
    """A node's router finds the session by bytes 1-8; the token is the intermediate's to
    check, so frames with any token reach the session's entry unchanged."""
    router = hot.Router()
    router.add_session(SID, "entry")
    frames = [encode_frame(SID, b"\x40in", token) for token in (TOKEN, NO_TOKEN)]
    result = router.dispatch([(f, ("198.51.100.1", 4478)) for f in frames])
    assert [(e, bytes(d)) for e, d, _ in result.relay] == [("entry", f) for f in frames]


@FAST
@given(st.binary(min_size=8, max_size=8), st.binary(min_size=8, max_size=8),
       st.binary(min_size=1, max_size=1500))
def test_round_trip_property(session_id, token, inner):
    frame = encode_frame(session_id, inner, token)
    assert len(frame) == HEADER_LEN + len(inner)
    assert decode_frame(frame) == (session_id, token, inner)


@FAST
@given(st.binary(max_size=64))
def test_random_bytes_raise_only_value_error(data):
    try:
        session_id, token, inner = decode_frame(data)
    except ValueError:
        return
    # Whatever decodes re-encodes to the same bytes.
    assert encode_frame(session_id, inner, token) == data
