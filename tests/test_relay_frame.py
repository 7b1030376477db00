"""Relay frame codec: ``0x10 | session_id (8 bytes) | inner packet``."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mahole._fast._kinds import KIND_RELAY
from mahole.wire.relay import (
    FRAME_TYPE,
    HEADER_LEN,
    SESSION_ID_LEN,
    decode_frame,
    encode_frame,
    new_session_id,
)

SID = bytes.fromhex("0123456789abcdef")
FAST = settings(max_examples=300, deadline=None)


def test_layout_is_type_byte_then_session_id_then_inner():
    frame = encode_frame(SID, b"\xc3quic-initial")
    assert frame == b"\x10" + SID + b"\xc3quic-initial"
    assert (FRAME_TYPE, SESSION_ID_LEN, HEADER_LEN) == (0x10, 8, 9)


def test_round_trip():
    assert decode_frame(encode_frame(SID, b"x")) == (SID, b"x")


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_accepts_bytes_like_and_returns_bytes(wrap):
    frame = encode_frame(wrap(SID), wrap(b"payload"))
    session_id, inner = decode_frame(wrap(frame))
    assert (session_id, inner) == (SID, b"payload")
    assert type(session_id) is bytes and type(inner) is bytes


def test_new_session_id_is_random_8_bytes():
    ids = {new_session_id() for _ in range(32)}
    assert len(ids) == 32
    assert all(type(i) is bytes and len(i) == SESSION_ID_LEN for i in ids)


@pytest.mark.parametrize("length", [0, 1, 7, 9, 16])
def test_encode_rejects_session_id_of_wrong_length(length):
    with pytest.raises(ValueError, match=f"session id must be 8 bytes, got {length}"):
        encode_frame(b"s" * length, b"inner")


def test_encode_rejects_empty_inner():
    with pytest.raises(ValueError, match="inner packet is empty"):
        encode_frame(SID, b"")


def test_encode_rejects_non_bytes():
    with pytest.raises(TypeError):
        encode_frame("0123456789abcdef", b"x")


def test_decode_rejects_empty_datagram():
    with pytest.raises(ValueError, match="empty datagram"):
        decode_frame(b"")


@pytest.mark.parametrize("first", [0x00, 0x01, 0x11, 0x0F, 0x40, 0xC0, 0xFF])
def test_decode_rejects_other_first_bytes(first):
    with pytest.raises(ValueError, match=f"first byte is 0x{first:02x}, not 0x10"):
        decode_frame(bytes([first]) + SID + b"inner")


@pytest.mark.parametrize("length", range(1, HEADER_LEN))
def test_decode_rejects_truncated_header(length):
    with pytest.raises(ValueError, match=f"{length} bytes is shorter than the 9-byte header"):
        decode_frame((b"\x10" + SID)[:length])


def test_decode_rejects_header_without_inner_packet():
    with pytest.raises(ValueError, match="inner packet is empty"):
        decode_frame(b"\x10" + SID)


def test_frames_classify_as_relay(hot):
    """The hot path's first-byte demultiplexer agrees with this codec."""
    assert hot.classify(encode_frame(SID, b"\x40short-header")) == KIND_RELAY


@FAST
@given(st.binary(min_size=8, max_size=8), st.binary(min_size=1, max_size=1500))
def test_round_trip_property(session_id, inner):
    frame = encode_frame(session_id, inner)
    assert len(frame) == HEADER_LEN + len(inner)
    assert decode_frame(frame) == (session_id, inner)


@FAST
@given(st.binary(max_size=64))
def test_random_bytes_raise_only_value_error(data):
    try:
        session_id, inner = decode_frame(data)
    except ValueError:
        return
    # Whatever decodes re-encodes to the same bytes.
    assert encode_frame(session_id, inner) == data
