"""Datagram kinds, decided by the first byte (docs/architecture.md wire table; RFC 7983/9443)."""

KIND_UNKNOWN = 0
KIND_STUN = 1  # 0x00-0x03: STUN (RFC 8489 §5: the two top bits of a STUN message are zero)
KIND_RELAY = 2  # 0x10: relay frame
KIND_QUIC_SHORT = 3  # 0x40-0x7F: QUIC short header (RFC 9000 §17.3, fixed bit set)
KIND_QUIC_LONG = 4  # 0xC0-0xFF: QUIC long header (RFC 9000 §17.2, fixed bit set)

KIND_NAMES = {
    KIND_UNKNOWN: "unknown",
    KIND_STUN: "stun",
    KIND_RELAY: "relay",
    KIND_QUIC_SHORT: "quic_short",
    KIND_QUIC_LONG: "quic_long",
}

# Relay frames: ``0x10 | session_id (8) | relay_token (8) | inner packet`` (mahole/wire/relay.py).
RELAY_FRAME_TYPE = 0x10
RELAY_SESSION_ID_LEN = 8
RELAY_TOKEN_LEN = 8  # the sending member's token, from control.SessionOpened.relay_token
RELAY_TOKEN_OFFSET = 1 + RELAY_SESSION_ID_LEN  # where the token starts (9)
RELAY_HEADER_LEN = RELAY_TOKEN_OFFSET + RELAY_TOKEN_LEN  # type + session id + token (17)
RELAY_NO_TOKEN = bytes(RELAY_TOKEN_LEN)  # what a node sends when it was given no token
