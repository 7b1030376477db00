"""Relay frames: ``0x10 | session_id (8 bytes) | inner packet`` (DESIGN.md, wire table).

A node wraps each end-to-end packet (QUIC, or a STUN check) in a relay frame and sends it to the
intermediate, which forwards the frame unchanged to the other member of the session. The inner
packet is opaque: the intermediate never holds keys for it.

The first byte 0x10 sits in a range that neither STUN (0x00-0x03, RFC 8489 §5) nor QUIC with the
fixed bit set (0x40-0xFF, RFC 9000 §17) uses, so one socket can demultiplex all of them by first
byte, in the manner of RFC 7983/9443.

This module is the reference codec; the per-packet relay loop of the intermediate parses the same
layout in ``mahole._fast``. Like every parser in mahole, ``decode_frame`` raises ``ValueError``
on bad bytes and nothing else.
"""

import os

from mahole._fast._kinds import RELAY_FRAME_TYPE, RELAY_HEADER_LEN, RELAY_SESSION_ID_LEN

__all__ = [
    "FRAME_TYPE",
    "HEADER_LEN",
    "SESSION_ID_LEN",
    "decode_frame",
    "encode_frame",
    "new_session_id",
]

FRAME_TYPE = RELAY_FRAME_TYPE  # first byte of every relay frame
SESSION_ID_LEN = RELAY_SESSION_ID_LEN  # bytes of session id after the type byte
HEADER_LEN = RELAY_HEADER_LEN  # type byte + session id; the inner packet follows

_BYTES_LIKE = (bytes, bytearray, memoryview)


def new_session_id() -> bytes:
    """A fresh random session id (8 bytes from ``os.urandom``)."""
    return os.urandom(SESSION_ID_LEN)


def encode_frame(session_id: bytes, inner: bytes) -> bytes:
    """Wrap ``inner`` (one end-to-end packet) in a relay frame for ``session_id``.

    Raises ``ValueError`` if ``session_id`` is not exactly 8 bytes or ``inner`` is empty, and
    ``TypeError`` if either is not bytes-like.
    """
    if not isinstance(session_id, _BYTES_LIKE) or not isinstance(inner, _BYTES_LIKE):
        raise TypeError("relay frame: session_id and inner must be bytes-like")
    if len(session_id) != SESSION_ID_LEN:
        raise ValueError(
            f"relay frame: session id must be {SESSION_ID_LEN} bytes, got {len(session_id)}"
        )
    if len(inner) == 0:
        raise ValueError("relay frame: inner packet is empty")
    return b"".join((bytes((FRAME_TYPE,)), session_id, inner))


def decode_frame(data: bytes) -> tuple[bytes, bytes]:
    """Split a relay frame into ``(session_id, inner)``, both ``bytes``.

    Raises ``ValueError`` if the first byte is not 0x10, the frame is shorter than its 9-byte
    header, or the inner packet is empty.
    """
    if not isinstance(data, _BYTES_LIKE):
        raise TypeError("relay frame: data must be bytes-like")
    if len(data) == 0:
        raise ValueError("relay frame: empty datagram")
    if data[0] != FRAME_TYPE:
        raise ValueError(f"relay frame: first byte is 0x{data[0]:02x}, not 0x{FRAME_TYPE:02x}")
    if len(data) < HEADER_LEN:
        raise ValueError(
            f"relay frame: {len(data)} bytes is shorter than the {HEADER_LEN}-byte header"
        )
    if len(data) == HEADER_LEN:
        raise ValueError("relay frame: inner packet is empty")
    return bytes(data[1:HEADER_LEN]), bytes(data[HEADER_LEN:])
