"""Relay frames: ``0x10 | session_id (8) | relay_token (8) | inner packet``.

A node wraps each end-to-end packet (QUIC, or a STUN check) in a relay frame and sends it to the
intermediate, which forwards the frame unchanged to the other member of the session. The inner
packet is opaque: the intermediate never holds keys for it.

Layout (17-byte header, then the inner packet; docs/architecture.md has the wire table)::

    offset  size  field
    0       1     0x10, the frame type
    1       8     session_id: which relay session (control.SessionOpened.session_id)
    9       8     relay_token: the *sending* member's token (control.SessionOpened.relay_token)
    17      n>=1  inner packet, opaque to the intermediate

The relay token binds a frame to the member that sends it. The intermediate draws a random
8-byte token for each member of a session and tells each member only its own, on its
authenticated control connection. A frame is relayed only if it comes from a member's
observed address *and* carries that member's token, so an attacker who forges a member's
source IP and port but never saw the token cannot inject frames. The
token travels in clear: it stops off-path spoofers, not an on-path observer, who can read
it; the end-to-end QUIC encryption still keeps such an observer from injecting anything the
receiving node would accept. The receiving node ignores the token (it is the sender's).
A node that was given no token sends :data:`NO_TOKEN` (eight zero bytes).

The first byte 0x10 sits in a range that neither STUN (0x00-0x03, RFC 8489 §5) nor QUIC with the
fixed bit set (0x40-0xFF, RFC 9000 §17) uses, so one socket can demultiplex all of them by first
byte, in the manner of RFC 7983/9443.

This module is the reference codec; the per-packet relay loop of the intermediate parses the same
layout in ``mahole._fast``. Like every parser in mahole, ``decode_frame`` raises ``ValueError``
on bad bytes and nothing else.
"""

import hashlib
import os
from typing import NamedTuple

from mahole._fast._kinds import (
    RELAY_FRAME_TYPE,
    RELAY_HEADER_LEN,
    RELAY_NO_TOKEN,
    RELAY_SESSION_ID_LEN,
    RELAY_TOKEN_LEN,
    RELAY_TOKEN_OFFSET,
)

__all__ = [
    "FRAME_TYPE",
    "HEADER_LEN",
    "NO_TOKEN",
    "SESSION_ID_LEN",
    "TOKEN_LEN",
    "RelayFrame",
    "decode_frame",
    "encode_frame",
    "new_relay_token",
    "new_session_id",
    "session_tag",
]

FRAME_TYPE = RELAY_FRAME_TYPE  # first byte of every relay frame
SESSION_ID_LEN = RELAY_SESSION_ID_LEN  # bytes of session id after the type byte
TOKEN_LEN = RELAY_TOKEN_LEN  # bytes of the sender's relay token after the session id
HEADER_LEN = RELAY_HEADER_LEN  # type byte + session id + token; the inner packet follows
NO_TOKEN = RELAY_NO_TOKEN  # the token of a node that was given none

_BYTES_LIKE = (bytes, bytearray, memoryview)


class RelayFrame(NamedTuple):
    """A decoded relay frame."""

    session_id: bytes
    token: bytes
    inner: bytes


def session_tag(session_id: bytes) -> str:
    """A short, stable name of a session for logs and status: 8 hex digits of a SHA-256 of
    the id, never the id itself (the id keys relay frames, so it stays out of sight)."""
    return hashlib.sha256(session_id).hexdigest()[:8]


def new_session_id() -> bytes:
    """A fresh random session id (8 bytes from ``os.urandom``)."""
    return os.urandom(SESSION_ID_LEN)


def new_relay_token() -> bytes:
    """A fresh random relay token for one member of a session (8 bytes from ``os.urandom``)."""
    return os.urandom(TOKEN_LEN)


def encode_frame(session_id: bytes, inner: bytes, token: bytes = NO_TOKEN) -> bytes:
    """Wrap ``inner`` (one end-to-end packet) in a relay frame for ``session_id``, sent by the
    member whose relay token is ``token``.

    Raises ``ValueError`` if ``session_id`` or ``token`` is not exactly 8 bytes or ``inner`` is
    empty, and ``TypeError`` if any of them is not bytes-like.
    """
    if not all(isinstance(x, _BYTES_LIKE) for x in (session_id, inner, token)):
        raise TypeError("relay frame: session_id, inner and token must be bytes-like")
    if len(session_id) != SESSION_ID_LEN:
        raise ValueError(
            f"relay frame: session id must be {SESSION_ID_LEN} bytes, got {len(session_id)}"
        )
    if len(token) != TOKEN_LEN:
        raise ValueError(f"relay frame: token must be {TOKEN_LEN} bytes, got {len(token)}")
    if len(inner) == 0:
        raise ValueError("relay frame: inner packet is empty")
    return b"".join((bytes((FRAME_TYPE,)), session_id, token, inner))


def decode_frame(data: bytes) -> RelayFrame:
    """Split a relay frame into ``RelayFrame(session_id, token, inner)``, all ``bytes``.

    Raises ``ValueError`` if the first byte is not 0x10, the frame is shorter than its 17-byte
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
    return RelayFrame(bytes(data[1:RELAY_TOKEN_OFFSET]), bytes(data[RELAY_TOKEN_OFFSET:HEADER_LEN]),
                      bytes(data[HEADER_LEN:]))
