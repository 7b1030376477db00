"""QUIC packet headers (RFC 9000 §17, RFC 8999 invariants), parsed by the hot path.

`parse_header(data, short_dcid_len=8)` returns an object with `version, packet_type, dcid,
scid, token, length` (plus `packet_length` and `supported_versions`); `packet_type` is one
of PACKET_TYPES. Malformed input raises ValueError. The compiled parser is used when built.
"""

from .._fast import QuicHeader, parse_header  # noqa: F401

PACKET_TYPES = ("initial", "0rtt", "handshake", "retry", "1rtt", "version_negotiation")

__all__ = ["PACKET_TYPES", "QuicHeader", "parse_header"]
