"""Pure-Python twin of `_hot.pyx`: classify, QUIC header parsing, DCID/session routing.

Keep the two files in step: the same tests run against both (tests/conftest.py `hot`).
"""

import operator

from ._kinds import (
    KIND_QUIC_LONG,
    KIND_QUIC_SHORT,
    KIND_RELAY,
    KIND_STUN,
    KIND_UNKNOWN,
    RELAY_SESSION_ID_LEN,
    RELAY_TOKEN_OFFSET,
)

# RFC 9000 §17.2: connection IDs in long headers are at most 20 bytes in QUIC v1.
MAX_CID_LEN = 20
# RFC 9001 §5.8: the Retry Integrity Tag is 16 bytes.
RETRY_TAG_LEN = 16
VERSION_NEGOTIATION = 0x00000000  # RFC 9000 §17.2.1
VERSION_1 = 0x00000001  # RFC 9000 §15
VERSION_2 = 0x6B3343CF  # RFC 9369 §3.1
# RFC 9000 §14.1: a datagram that starts a connection is at least 1200 bytes, so only those
# of an unsupported version get Version Negotiation (§5.2.2, §6.1): it never amplifies.
MIN_INITIAL_DATAGRAM = 1200
# Long header type bits (first byte & 0x30) >> 4: RFC 9000 §17.2 table 5, RFC 9369 §3.2.
LONG_TYPES_V1 = ("initial", "0rtt", "handshake", "retry")
LONG_TYPES_V2 = ("retry", "initial", "0rtt", "handshake")

# First byte -> kind, per the docs/architecture.md wire table.
_KIND_BY_BYTE = tuple(
    KIND_STUN if b <= 0x03
    else KIND_RELAY if b == 0x10
    else KIND_QUIC_SHORT if 0x40 <= b <= 0x7F
    else KIND_QUIC_LONG if b >= 0xC0
    else KIND_UNKNOWN
    for b in range(256)
)


def classify(data):
    """The kind of a datagram (KIND_*), from its first byte; KIND_UNKNOWN when empty."""
    if not data:
        return KIND_UNKNOWN
    return _KIND_BY_BYTE[data[0]]


class QuicHeader:
    """The routing-relevant fields of a QUIC packet header (RFC 9000 §17, RFC 8999).

    `length` is the long header's Length field (None for Retry, Version Negotiation and
    short headers); `packet_length` is how many bytes of the datagram this packet covers.
    """

    __slots__ = ("version", "packet_type", "dcid", "scid", "token", "length",
                 "packet_length", "supported_versions")

    def __init__(self, version, packet_type, dcid, scid, token, length, packet_length,
                 supported_versions):
        self.version = version
        self.packet_type = packet_type
        self.dcid = dcid
        self.scid = scid
        self.token = token
        self.length = length
        self.packet_length = packet_length
        self.supported_versions = supported_versions

    def __repr__(self):
        return (f"QuicHeader(packet_type={self.packet_type!r}, version={self.version!r}, "
                f"dcid={self.dcid.hex()}, scid={self.scid.hex()}, length={self.length!r})")


def _varint(data, pos, end):
    """Decode a variable-length integer (RFC 9000 §16) at pos; returns (value, new_pos)."""
    if pos >= end:
        raise ValueError("QUIC header truncated in a variable-length integer")
    first = data[pos]
    size = 1 << (first >> 6)
    if pos + size > end:
        raise ValueError("QUIC header truncated in a variable-length integer")
    value = first & 0x3F
    for i in range(pos + 1, pos + size):
        value = (value << 8) | data[i]
    return value, pos + size


def _check_short_dcid_len(short_dcid_len):
    """The DCID length of short headers, an int >= 0 (TypeError / ValueError otherwise)."""
    short_dcid_len = operator.index(short_dcid_len)
    if short_dcid_len < 0:
        raise ValueError(f"short_dcid_len must be >= 0, not {short_dcid_len}")
    return short_dcid_len


def parse_header(data, short_dcid_len=8):
    """Parse a QUIC packet header; raise ValueError on anything malformed (and on a
    negative short_dcid_len)."""
    short_dcid_len = _check_short_dcid_len(short_dcid_len)
    end = len(data)
    if end == 0:
        raise ValueError("empty datagram")
    first = data[0]
    if not first & 0x80:
        # Short header (RFC 9000 §17.3): the DCID length is the endpoint's own.
        if not first & 0x40:
            raise ValueError("QUIC fixed bit is zero")
        if end < 1 + short_dcid_len:
            raise ValueError("QUIC short header shorter than its connection ID")
        return QuicHeader(None, "1rtt", bytes(data[1:1 + short_dcid_len]), b"", b"", None,
                          end, ())

    # Long header (RFC 9000 §17.2; invariants in RFC 8999 §5.1).
    if end < 7:
        raise ValueError("QUIC long header truncated")
    version = int.from_bytes(data[1:5], "big")
    dcid_len = data[5]
    if dcid_len > MAX_CID_LEN:
        raise ValueError(f"destination connection ID too long ({dcid_len} bytes)")
    pos = 6 + dcid_len
    if pos >= end:
        raise ValueError("QUIC long header truncated in the destination connection ID")
    dcid = bytes(data[6:pos])
    scid_len = data[pos]
    if scid_len > MAX_CID_LEN:
        raise ValueError(f"source connection ID too long ({scid_len} bytes)")
    pos += 1
    if pos + scid_len > end:
        raise ValueError("QUIC long header truncated in the source connection ID")
    scid = bytes(data[pos:pos + scid_len])
    pos += scid_len

    if version == VERSION_NEGOTIATION:
        # RFC 9000 §17.2.1: the rest is a list of 32-bit versions.
        if (end - pos) % 4:
            raise ValueError("version negotiation packet has a partial version")
        versions = tuple(int.from_bytes(data[i:i + 4], "big") for i in range(pos, end, 4))
        return QuicHeader(version, "version_negotiation", dcid, scid, b"", None, end, versions)

    if not first & 0x40:
        raise ValueError("QUIC fixed bit is zero")
    types = LONG_TYPES_V2 if version == VERSION_2 else LONG_TYPES_V1
    packet_type = types[(first & 0x30) >> 4]
    token = b""
    if packet_type == "retry":
        # RFC 9000 §17.2.5: token fills the packet up to the 16-byte integrity tag.
        if end - pos < RETRY_TAG_LEN:
            raise ValueError("retry packet shorter than its integrity tag")
        token = bytes(data[pos:end - RETRY_TAG_LEN])
        return QuicHeader(version, packet_type, dcid, scid, token, None, end, ())
    if packet_type == "initial":
        token_len, pos = _varint(data, pos, end)
        if pos + token_len > end:
            raise ValueError("QUIC initial token truncated")
        token = bytes(data[pos:pos + token_len])
        pos += token_len
    length, pos = _varint(data, pos, end)
    if pos + length > end:
        raise ValueError("QUIC packet payload truncated")
    return QuicHeader(version, packet_type, dcid, scid, token, length, pos + length, ())


def _unsupported_version(data):
    """The header of a datagram a server answers with Version Negotiation, else None.

    RFC 9000 §6.1, §5.2.2: a long header (RFC 8999 §5.1: only the first bit is invariant)
    of a version that is not 1, 2 or 0 (a Version Negotiation packet is never answered,
    §17.2.1), in a datagram of at least 1200 bytes. Only the invariant fields are read, so
    connection IDs may be up to 255 bytes (RFC 8999 §5.1; RFC 9000 §17.2 asks servers to
    read them to answer): packet_type "unsupported_version", no token or length.
    """
    end = len(data)
    if end < MIN_INITIAL_DATAGRAM or not data[0] & 0x80:
        return None
    version = int.from_bytes(data[1:5], "big")
    if version in (VERSION_NEGOTIATION, VERSION_1, VERSION_2):
        return None
    # 1200 bytes always hold both connection IDs (at most 6 + 255 + 1 + 255 bytes).
    pos = 6 + data[5]
    dcid = bytes(data[6:pos])
    scid = bytes(data[pos + 1:pos + 1 + data[pos]])
    return QuicHeader(version, "unsupported_version", dcid, scid, b"", None, end, ())


class DispatchResult:
    """One received batch, grouped so the caller enters Python once per group.

    quic_handles, quic_datagrams: parallel lists, the connection handle of each routed QUIC
              (datagram, addr), in arrival order; `grouped_quic()` groups them by handle
    initials: [(QuicHeader, datagram, addr)] Initial packets for unknown DCIDs (may open a
              connection, if the caller allows it), and datagrams to answer with Version
              Negotiation that do not parse as an Initial: long headers of an unsupported
              version, >= 1200 bytes (packet_type "unsupported_version", see
              `_unsupported_version`)
    stun:     [(datagram, addr)]
    relay:    [(session entry, datagram, addr)] relay frames of known sessions (routed by
              session id; the entry checks the rest of the 17-byte header)
    dropped:  how many datagrams of this batch were dropped (also counted on the Router)
    """

    __slots__ = ("quic_handles", "quic_datagrams", "initials", "stun", "relay", "dropped")

    def __init__(self):
        self.quic_handles = []
        self.quic_datagrams = []
        self.initials = []
        self.stun = []
        self.relay = []
        self.dropped = 0

    def grouped_quic(self):
        """{handle: [(datagram, addr), ...]}, arrival order kept within each handle."""
        groups = {}
        for handle, item in zip(self.quic_handles, self.quic_datagrams):
            group = groups.get(handle)
            if group is None:
                groups[handle] = [item]
            else:
                group.append(item)
        return groups


class Router:
    """Tables from 8-byte DCIDs to connection handles and 8-byte relay session ids to entries.

    `dispatch` classifies, parses and looks up a whole batch in one call. Malformed or
    unroutable datagrams are dropped and counted by reason.
    """

    def __init__(self, short_dcid_len=8):
        self.short_dcid_len = _check_short_dcid_len(short_dcid_len)
        self._connections = {}
        self._sessions = {}
        self.dropped_malformed = 0
        self.dropped_unknown_kind = 0
        self.dropped_unknown_dcid = 0
        self.dropped_unknown_session = 0

    # Connection table ------------------------------------------------------------------
    def add_connection(self, dcid, handle):
        self._connections[bytes(dcid)] = handle

    def remove_connection(self, dcid):
        """Forget a DCID; returns its handle, or None if it was not known."""
        return self._connections.pop(bytes(dcid), None)

    def connection(self, dcid):
        return self._connections.get(bytes(dcid))

    @property
    def connection_count(self):
        return len(self._connections)

    # Relay session table ---------------------------------------------------------------
    def add_session(self, session_id, entry):
        if len(session_id) != RELAY_SESSION_ID_LEN:
            raise ValueError("relay session ids are 8 bytes")
        self._sessions[bytes(session_id)] = entry

    def remove_session(self, session_id):
        return self._sessions.pop(bytes(session_id), None)

    def session(self, session_id):
        return self._sessions.get(bytes(session_id))

    @property
    def session_count(self):
        return len(self._sessions)

    def counters(self):
        return {
            "dropped_malformed": self.dropped_malformed,
            "dropped_unknown_kind": self.dropped_unknown_kind,
            "dropped_unknown_dcid": self.dropped_unknown_dcid,
            "dropped_unknown_session": self.dropped_unknown_session,
        }

    # Dispatch --------------------------------------------------------------------------
    def dispatch(self, datagrams):
        """Classify, parse and route a batch of (datagram, addr) pairs."""
        result = DispatchResult()
        quic_handles = result.quic_handles
        quic_datagrams = result.quic_datagrams
        connections = self._connections
        sessions = self._sessions
        short_len = self.short_dcid_len
        for item in datagrams:
            data = item[0]
            if type(data) is not bytes:
                data = bytes(data)
            kind = _KIND_BY_BYTE[data[0]] if data else KIND_UNKNOWN
            if kind == KIND_QUIC_SHORT:
                if len(data) < 1 + short_len:
                    self.dropped_malformed += 1
                    result.dropped += 1
                    continue
                handle = connections.get(data[1:1 + short_len])
                if handle is None:
                    self.dropped_unknown_dcid += 1
                    result.dropped += 1
                    continue
                quic_handles.append(handle)
                quic_datagrams.append(item)
            elif kind == KIND_QUIC_LONG:
                try:
                    header = parse_header(data, short_len)
                except ValueError:
                    header = None
                if header is not None:
                    handle = connections.get(header.dcid)
                    if handle is not None:
                        quic_handles.append(handle)
                        quic_datagrams.append(item)
                        continue
                    if header.packet_type == "initial":
                        result.initials.append((header, data, item[1]))
                        continue
                # Not laid out as this version's Initial, but every client of a version we
                # do not speak gets Version Negotiation (RFC 9000 §6.1).
                unsupported = _unsupported_version(data)
                if unsupported is not None:
                    result.initials.append((unsupported, data, item[1]))
                elif header is None:
                    self.dropped_malformed += 1
                    result.dropped += 1
                else:
                    self.dropped_unknown_dcid += 1
                    result.dropped += 1
            elif kind == KIND_RELAY:
                # Routed by the session id (bytes 1-8); the relay token and the inner packet
                # after it are the session handler's to check (mahole/session.py).
                if len(data) <= RELAY_TOKEN_OFFSET:
                    self.dropped_malformed += 1
                    result.dropped += 1
                    continue
                entry = sessions.get(data[1:RELAY_TOKEN_OFFSET])
                if entry is None:
                    self.dropped_unknown_session += 1
                    result.dropped += 1
                    continue
                result.relay.append((entry, data, item[1]))
            elif kind == KIND_STUN:
                result.stun.append(item)
            else:
                # 0x80-0xBF: a long header without the fixed bit, which another version
                # may clear (RFC 8999 §5.1).
                unsupported = _unsupported_version(data) if data else None
                if unsupported is not None:
                    result.initials.append((unsupported, data, item[1]))
                    continue
                self.dropped_unknown_kind += 1
                result.dropped += 1
        return result
