# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled classify, QUIC header parsing and DCID/session routing.

Twin of `_hot_py.py` (same API, same tests). The tables keep 8-byte keys in an
open-addressing C hash table, so routing a packet reads its DCID straight out of the
datagram without building a key object.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int32_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy

from ._kinds import (
    KIND_QUIC_LONG,
    KIND_QUIC_SHORT,
    KIND_RELAY,
    KIND_STUN,
    KIND_UNKNOWN,
    RELAY_TOKEN_OFFSET,
)

# RFC 9000 §17.2: connection IDs in long headers are at most 20 bytes in QUIC v1.
DEF MAX_CID_LEN = 20
# RFC 9001 §5.8: the Retry Integrity Tag is 16 bytes.
DEF RETRY_TAG_LEN = 16
DEF VERSION_1 = 0x00000001  # RFC 9000 §15
DEF VERSION_2 = 0x6B3343CF  # RFC 9369 §3.1
# RFC 9000 §14.1: a datagram that starts a connection is at least 1200 bytes, so only those
# of an unsupported version get Version Negotiation (§5.2.2, §6.1): it never amplifies.
DEF C_MIN_INITIAL_DATAGRAM = 1200
MIN_INITIAL_DATAGRAM = C_MIN_INITIAL_DATAGRAM
DEF C_KIND_UNKNOWN = 0
DEF C_KIND_STUN = 1
DEF C_KIND_RELAY = 2
DEF C_KIND_QUIC_SHORT = 3
DEF C_KIND_QUIC_LONG = 4
# Relay frames are routed by their session id (bytes 1-8); the relay token and the inner
# packet after it are the session handler's to check (mahole/session.py).
DEF C_RELAY_ROUTE_LEN = 9

# Long header type bits (first byte & 0x30) >> 4: RFC 9000 §17.2 table 5, RFC 9369 §3.2.
LONG_TYPES_V1 = ("initial", "0rtt", "handshake", "retry")
LONG_TYPES_V2 = ("retry", "initial", "0rtt", "handshake")

assert KIND_STUN == C_KIND_STUN and KIND_RELAY == C_KIND_RELAY
assert KIND_QUIC_SHORT == C_KIND_QUIC_SHORT and KIND_QUIC_LONG == C_KIND_QUIC_LONG
assert RELAY_TOKEN_OFFSET == C_RELAY_ROUTE_LEN


cdef inline int _kind(uint8_t b) noexcept nogil:
    # docs/architecture.md wire table: 0x00-0x03 STUN, 0x10 relay, 0x40-0x7F short, 0xC0-0xFF long.
    if b <= 0x03:
        return C_KIND_STUN
    if b == 0x10:
        return C_KIND_RELAY
    if b >= 0xC0:
        return C_KIND_QUIC_LONG
    if b >= 0x40 and b <= 0x7F:
        return C_KIND_QUIC_SHORT
    return C_KIND_UNKNOWN


def classify(data):
    """The kind of a datagram (KIND_*), from its first byte; KIND_UNKNOWN when empty."""
    cdef const uint8_t[:] view
    if isinstance(data, bytes):
        if PyBytes_GET_SIZE(data) == 0:
            return C_KIND_UNKNOWN
        return _kind(<uint8_t>PyBytes_AS_STRING(data)[0])
    view = data
    if view.shape[0] == 0:
        return C_KIND_UNKNOWN
    return _kind(view[0])


cdef class QuicHeader:
    """The routing-relevant fields of a QUIC packet header (RFC 9000 §17, RFC 8999).

    `length` is the long header's Length field (None for Retry, Version Negotiation and
    short headers); `packet_length` is how many bytes of the datagram this packet covers.
    """

    cdef readonly object version
    cdef readonly str packet_type
    cdef readonly bytes dcid
    cdef readonly bytes scid
    cdef readonly bytes token
    cdef readonly object length
    cdef readonly Py_ssize_t packet_length
    cdef readonly tuple supported_versions

    def __repr__(self):
        return (f"QuicHeader(packet_type={self.packet_type!r}, version={self.version!r}, "
                f"dcid={self.dcid.hex()}, scid={self.scid.hex()}, length={self.length!r})")


cdef inline uint32_t _be32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint64_t _le64(const uint8_t* p) noexcept nogil:
    # Table key of an 8-byte id; byte order is irrelevant as long as it is consistent.
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v


cdef Py_ssize_t _varint(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end,
                        uint64_t* out) except -1:
    """Decode a variable-length integer (RFC 9000 §16); returns the new position."""
    cdef int size, i
    cdef uint64_t value
    if pos >= end:
        raise ValueError("QUIC header truncated in a variable-length integer")
    size = 1 << (p[pos] >> 6)
    if pos + size > end:
        raise ValueError("QUIC header truncated in a variable-length integer")
    value = p[pos] & 0x3F
    for i in range(1, size):
        value = (value << 8) | p[pos + i]
    out[0] = value
    return pos + size


cdef QuicHeader _parse(const uint8_t* p, Py_ssize_t end, Py_ssize_t short_dcid_len):
    cdef QuicHeader h = QuicHeader.__new__(QuicHeader)
    cdef uint8_t first
    cdef uint32_t version
    cdef Py_ssize_t pos, dcid_len, scid_len, i
    cdef uint64_t token_len, length
    cdef str packet_type
    if end == 0:
        raise ValueError("empty datagram")
    first = p[0]
    h.token = b""
    h.supported_versions = ()
    if not first & 0x80:
        # Short header (RFC 9000 §17.3): the DCID length is the endpoint's own.
        if not first & 0x40:
            raise ValueError("QUIC fixed bit is zero")
        if end < 1 + short_dcid_len:
            raise ValueError("QUIC short header shorter than its connection ID")
        h.version = None
        h.packet_type = "1rtt"
        h.dcid = PyBytes_FromStringAndSize(<const char*>p + 1, short_dcid_len)
        h.scid = b""
        h.length = None
        h.packet_length = end
        return h

    # Long header (RFC 9000 §17.2; invariants in RFC 8999 §5.1).
    if end < 7:
        raise ValueError("QUIC long header truncated")
    version = _be32(p + 1)
    dcid_len = p[5]
    if dcid_len > MAX_CID_LEN:
        raise ValueError(f"destination connection ID too long ({dcid_len} bytes)")
    pos = 6 + dcid_len
    if pos >= end:
        raise ValueError("QUIC long header truncated in the destination connection ID")
    h.dcid = PyBytes_FromStringAndSize(<const char*>p + 6, dcid_len)
    scid_len = p[pos]
    if scid_len > MAX_CID_LEN:
        raise ValueError(f"source connection ID too long ({scid_len} bytes)")
    pos += 1
    if pos + scid_len > end:
        raise ValueError("QUIC long header truncated in the source connection ID")
    h.scid = PyBytes_FromStringAndSize(<const char*>p + pos, scid_len)
    pos += scid_len
    h.version = version

    if version == 0:
        # RFC 9000 §17.2.1: the rest is a list of 32-bit versions.
        if (end - pos) % 4:
            raise ValueError("version negotiation packet has a partial version")
        h.packet_type = "version_negotiation"
        h.supported_versions = tuple([_be32(p + i) for i in range(pos, end, 4)])
        h.length = None
        h.packet_length = end
        return h

    if not first & 0x40:
        raise ValueError("QUIC fixed bit is zero")
    if version == VERSION_2:
        packet_type = LONG_TYPES_V2[(first & 0x30) >> 4]
    else:
        packet_type = LONG_TYPES_V1[(first & 0x30) >> 4]
    h.packet_type = packet_type
    if packet_type == "retry":
        # RFC 9000 §17.2.5: token fills the packet up to the 16-byte integrity tag.
        if end - pos < RETRY_TAG_LEN:
            raise ValueError("retry packet shorter than its integrity tag")
        h.token = PyBytes_FromStringAndSize(<const char*>p + pos, end - RETRY_TAG_LEN - pos)
        h.length = None
        h.packet_length = end
        return h
    if packet_type == "initial":
        pos = _varint(p, pos, end, &token_len)
        if token_len > <uint64_t>(end - pos):
            raise ValueError("QUIC initial token truncated")
        h.token = PyBytes_FromStringAndSize(<const char*>p + pos, <Py_ssize_t>token_len)
        pos += <Py_ssize_t>token_len
    pos = _varint(p, pos, end, &length)
    if length > <uint64_t>(end - pos):
        raise ValueError("QUIC packet payload truncated")
    h.length = length
    h.packet_length = pos + <Py_ssize_t>length
    return h


cdef int _scan_long(const uint8_t* p, Py_ssize_t end, Py_ssize_t* dcid_len,
                    bint* is_initial) noexcept nogil:
    """Validate a long header exactly as _parse does, without allocating; 1 if well formed.

    The DCID starts at offset 6. Keep in step with _parse.
    """
    cdef uint32_t version
    cdef Py_ssize_t pos, scid_len, size, i, k
    cdef uint64_t value
    cdef int bits
    if end < 7:
        return 0
    version = _be32(p + 1)
    dcid_len[0] = p[5]
    if dcid_len[0] > MAX_CID_LEN:
        return 0
    pos = 6 + dcid_len[0]
    if pos >= end:
        return 0
    scid_len = p[pos]
    if scid_len > MAX_CID_LEN:
        return 0
    pos += 1 + scid_len
    if pos > end:
        return 0
    is_initial[0] = False
    if version == 0:
        return (end - pos) % 4 == 0
    if not p[0] & 0x40:
        return 0
    bits = (p[0] & 0x30) >> 4
    if version == VERSION_2:
        bits = (bits + 3) & 3  # v2 order is retry, initial, 0rtt, handshake
    if bits == 3:  # retry
        return end - pos >= RETRY_TAG_LEN
    # Initial carries a token before Length; then Length must fit (RFC 9000 §17.2.2).
    for i in range(2 if bits == 0 else 1):
        if pos >= end:
            return 0
        size = 1 << (p[pos] >> 6)
        if pos + size > end:
            return 0
        value = p[pos] & 0x3F
        for k in range(1, size):
            value = (value << 8) | p[pos + k]
        pos += size
        if value > <uint64_t>(end - pos):
            return 0
        if i == 0 and bits == 0:
            pos += <Py_ssize_t>value
    is_initial[0] = bits == 0
    return 1


cdef inline bint _is_unsupported_version(const uint8_t* p, Py_ssize_t end) noexcept nogil:
    """A datagram a server answers with Version Negotiation (see _unsupported_header)."""
    cdef uint32_t version
    if end < C_MIN_INITIAL_DATAGRAM or not p[0] & 0x80:
        return False
    version = _be32(p + 1)
    return version != 0 and version != VERSION_1 and version != VERSION_2


cdef QuicHeader _unsupported_header(const uint8_t* p, Py_ssize_t end):
    """The header of a datagram _is_unsupported_version accepted.

    RFC 9000 §6.1, §5.2.2: a long header (RFC 8999 §5.1: only the first bit is invariant)
    of a version that is not 1, 2 or 0 (a Version Negotiation packet is never answered,
    §17.2.1), in a datagram of at least 1200 bytes. Only the invariant fields are read, so
    connection IDs may be up to 255 bytes (RFC 8999 §5.1; RFC 9000 §17.2 asks servers to
    read them to answer): packet_type "unsupported_version", no token or length. Twin of
    `_unsupported_version` in _hot_py.py.
    """
    cdef QuicHeader h = QuicHeader.__new__(QuicHeader)
    # 1200 bytes always hold both connection IDs (at most 6 + 255 + 1 + 255 bytes).
    cdef Py_ssize_t pos = 6 + p[5]
    h.version = _be32(p + 1)
    h.packet_type = "unsupported_version"
    h.dcid = PyBytes_FromStringAndSize(<const char*>p + 6, pos - 6)
    h.scid = PyBytes_FromStringAndSize(<const char*>p + pos + 1, p[pos])
    h.token = b""
    h.length = None
    h.packet_length = end
    h.supported_versions = ()
    return h


cdef int _check_short_dcid_len(Py_ssize_t short_dcid_len) except -1:
    if short_dcid_len < 0:
        raise ValueError(f"short_dcid_len must be >= 0, not {short_dcid_len}")
    return 0


def parse_header(data, Py_ssize_t short_dcid_len=8):
    """Parse a QUIC packet header; raise ValueError on anything malformed (and on a
    negative short_dcid_len)."""
    cdef const uint8_t[:] view
    _check_short_dcid_len(short_dcid_len)
    if isinstance(data, bytes):
        return _parse(<const uint8_t*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data),
                      short_dcid_len)
    view = data
    if view.shape[0] == 0:
        raise ValueError("empty datagram")
    return _parse(&view[0], view.shape[0], short_dcid_len)


cdef inline uint64_t _mix(uint64_t x) noexcept nogil:
    # splitmix64 finaliser: spreads keys over the table even if ids share prefixes.
    x ^= x >> 30
    x *= 0xBF58476D1CE4E5B9ULL
    x ^= x >> 27
    x *= 0x94D049BB133111EBULL
    x ^= x >> 31
    return x


DEF EMPTY = -1
DEF TOMBSTONE = -2


cdef class _IdTable:
    """Open-addressing hash table: 8-byte id (as uint64) -> Python object.

    Objects live in a Python list (so references are owned normally); the C arrays hold
    keys and list slots. Linear probing, grown at half load, tombstones on removal.
    """

    cdef uint64_t* keys
    cdef int32_t* slots
    cdef Py_ssize_t capacity, used, filled
    cdef list objects
    cdef list free_slots

    def __cinit__(self):
        self.capacity = 64
        self.keys = <uint64_t*>calloc(self.capacity, sizeof(uint64_t))
        self.slots = <int32_t*>calloc(self.capacity, sizeof(int32_t))
        if self.keys == NULL or self.slots == NULL:
            raise MemoryError()
        for i in range(self.capacity):
            self.slots[i] = EMPTY
        self.used = 0
        self.filled = 0
        self.objects = []
        self.free_slots = []

    def __dealloc__(self):
        free(self.keys)
        free(self.slots)

    cdef Py_ssize_t _find(self, uint64_t key) noexcept:
        """Index of key in the arrays, or -1."""
        cdef Py_ssize_t mask = self.capacity - 1
        cdef Py_ssize_t i = <Py_ssize_t>(_mix(key) & <uint64_t>mask)
        cdef int32_t s
        while True:
            s = self.slots[i]
            if s == EMPTY:
                return -1
            if s != TOMBSTONE and self.keys[i] == key:
                return i
            i = (i + 1) & mask

    cdef object get(self, uint64_t key):
        cdef Py_ssize_t i = self._find(key)
        if i < 0:
            return None
        return self.objects[self.slots[i]]

    cdef void _grow(self) except *:
        cdef uint64_t* old_keys = self.keys
        cdef int32_t* old_slots = self.slots
        cdef Py_ssize_t old_capacity = self.capacity, i, j, mask
        cdef Py_ssize_t capacity = self.capacity
        while (self.used + 1) * 2 > capacity:
            capacity *= 2
        if capacity == self.capacity and self.filled * 2 <= self.capacity:
            return
        new_keys = <uint64_t*>calloc(capacity, sizeof(uint64_t))
        new_slots = <int32_t*>calloc(capacity, sizeof(int32_t))
        if new_keys == NULL or new_slots == NULL:
            free(new_keys)
            free(new_slots)
            raise MemoryError()
        for i in range(capacity):
            new_slots[i] = EMPTY
        mask = capacity - 1
        for i in range(old_capacity):
            if old_slots[i] >= 0:
                j = <Py_ssize_t>(_mix(old_keys[i]) & <uint64_t>mask)
                while new_slots[j] != EMPTY:
                    j = (j + 1) & mask
                new_keys[j] = old_keys[i]
                new_slots[j] = old_slots[i]
        self.keys = new_keys
        self.slots = new_slots
        self.capacity = capacity
        self.filled = self.used
        free(old_keys)
        free(old_slots)

    cdef void put(self, uint64_t key, object obj) except *:
        cdef Py_ssize_t i = self._find(key)
        cdef Py_ssize_t mask, slot
        if i >= 0:
            self.objects[self.slots[i]] = obj
            return
        if (self.filled + 1) * 2 > self.capacity:
            self._grow()
        if self.free_slots:
            slot = self.free_slots.pop()
            self.objects[slot] = obj
        else:
            slot = len(self.objects)
            self.objects.append(obj)
        mask = self.capacity - 1
        i = <Py_ssize_t>(_mix(key) & <uint64_t>mask)
        while self.slots[i] >= 0:
            i = (i + 1) & mask
        if self.slots[i] == EMPTY:
            self.filled += 1
        self.keys[i] = key
        self.slots[i] = <int32_t>slot
        self.used += 1

    cdef object pop(self, uint64_t key):
        cdef Py_ssize_t i = self._find(key)
        cdef int32_t slot
        if i < 0:
            return None
        slot = self.slots[i]
        obj = self.objects[slot]
        self.objects[slot] = None
        self.free_slots.append(slot)
        self.slots[i] = TOMBSTONE
        self.used -= 1
        return obj


cdef inline uint64_t _key8(bytes key) except? 0:
    if PyBytes_GET_SIZE(key) != 8:
        raise ValueError("ids are 8 bytes")
    return _le64(<const uint8_t*>PyBytes_AS_STRING(key))


def _group(handles, datagrams):
    groups = {}
    for handle, item in zip(handles, datagrams):
        group = groups.get(handle)
        if group is None:
            groups[handle] = [item]
        else:
            group.append(item)
    return groups


cdef class DispatchResult:
    """One received batch, grouped so the caller enters Python once per group.

    quic_handles, quic_datagrams: parallel lists, the connection handle of each routed QUIC
              (datagram, addr), in arrival order; `grouped_quic()` groups them by handle
    initials: [(QuicHeader, datagram, addr)] Initial packets for unknown DCIDs (may open a
              connection, if the caller allows it), and datagrams to answer with Version
              Negotiation that do not parse as an Initial: long headers of an unsupported
              version, >= 1200 bytes (packet_type "unsupported_version", see
              `_unsupported_header`)
    stun:     [(datagram, addr)]
    relay:    [(session entry, datagram, addr)] relay frames of known sessions (routed by
              session id; the entry checks the rest of the 17-byte header)
    dropped:  how many datagrams of this batch were dropped (also counted on the Router)
    """

    cdef public list quic_handles
    cdef public list quic_datagrams
    cdef public list initials
    cdef public list stun
    cdef public list relay
    cdef public Py_ssize_t dropped

    def __cinit__(self):
        self.quic_handles = []
        self.quic_datagrams = []
        self.initials = []
        self.stun = []
        self.relay = []
        self.dropped = 0

    def grouped_quic(self):
        """{handle: [(datagram, addr), ...]}, arrival order kept within each handle."""
        return _group(self.quic_handles, self.quic_datagrams)


cdef class Router:
    """Tables from 8-byte DCIDs to connection handles and 8-byte relay session ids to entries.

    `dispatch` classifies, parses and looks up a whole batch in one call. Malformed or
    unroutable datagrams are dropped and counted by reason. DCIDs of other lengths (a
    client's first Initial may carry up to 20 bytes) live in a plain dict beside the table.
    """

    cdef readonly Py_ssize_t short_dcid_len
    cdef _IdTable _connections8
    cdef dict _connections_other
    cdef _IdTable _sessions
    cdef readonly Py_ssize_t dropped_malformed
    cdef readonly Py_ssize_t dropped_unknown_kind
    cdef readonly Py_ssize_t dropped_unknown_dcid
    cdef readonly Py_ssize_t dropped_unknown_session

    def __init__(self, Py_ssize_t short_dcid_len=8):
        _check_short_dcid_len(short_dcid_len)
        self.short_dcid_len = short_dcid_len
        self._connections8 = _IdTable()
        self._connections_other = {}
        self._sessions = _IdTable()

    # Connection table ------------------------------------------------------------------
    def add_connection(self, dcid, handle):
        dcid = bytes(dcid)
        if len(dcid) == 8:
            self._connections8.put(_key8(dcid), handle)
        else:
            self._connections_other[dcid] = handle

    def remove_connection(self, dcid):
        """Forget a DCID; returns its handle, or None if it was not known."""
        dcid = bytes(dcid)
        if len(dcid) == 8:
            return self._connections8.pop(_key8(dcid))
        return self._connections_other.pop(dcid, None)

    def connection(self, dcid):
        dcid = bytes(dcid)
        if len(dcid) == 8:
            return self._connections8.get(_key8(dcid))
        return self._connections_other.get(dcid)

    @property
    def connection_count(self):
        return self._connections8.used + len(self._connections_other)

    # Relay session table ---------------------------------------------------------------
    def add_session(self, session_id, entry):
        session_id = bytes(session_id)
        if len(session_id) != 8:
            raise ValueError("relay session ids are 8 bytes")
        self._sessions.put(_key8(session_id), entry)

    def remove_session(self, session_id):
        session_id = bytes(session_id)
        if len(session_id) != 8:
            return None
        return self._sessions.pop(_key8(session_id))

    def session(self, session_id):
        session_id = bytes(session_id)
        if len(session_id) != 8:
            return None
        return self._sessions.get(_key8(session_id))

    @property
    def session_count(self):
        return self._sessions.used

    def counters(self):
        return {
            "dropped_malformed": self.dropped_malformed,
            "dropped_unknown_kind": self.dropped_unknown_kind,
            "dropped_unknown_dcid": self.dropped_unknown_dcid,
            "dropped_unknown_session": self.dropped_unknown_session,
        }

    cdef object _lookup_long(self, const uint8_t* p, Py_ssize_t dcid_len):
        if dcid_len == 8:
            return self._connections8.get(_le64(p + 6))
        if self._connections_other:
            return self._connections_other.get(PyBytes_FromStringAndSize(<const char*>p + 6,
                                                                         dcid_len))
        return None

    # Dispatch --------------------------------------------------------------------------
    def dispatch(self, datagrams):
        """Classify, parse and route a batch of (datagram, addr) pairs."""
        cdef DispatchResult result = DispatchResult()
        cdef list quic_handles = result.quic_handles
        cdef list quic_datagrams = result.quic_datagrams
        cdef Py_ssize_t n, short_len = self.short_dcid_len
        cdef const uint8_t* p
        cdef int kind
        cdef Py_ssize_t dcid_len
        cdef bint is_initial
        cdef bytes data
        short8 = short_len == 8
        cdef list batch = datagrams if type(datagrams) is list else list(datagrams)
        cdef Py_ssize_t index
        for index in range(len(batch)):
            item = batch[index]
            raw = (<tuple>item)[0] if type(item) is tuple else item[0]
            data = raw if type(raw) is bytes else bytes(raw)
            n = PyBytes_GET_SIZE(data)
            p = <const uint8_t*>PyBytes_AS_STRING(data)
            kind = _kind(p[0]) if n > 0 else C_KIND_UNKNOWN
            if kind == C_KIND_QUIC_SHORT:
                if n < 1 + short_len:
                    self.dropped_malformed += 1
                    result.dropped += 1
                    continue
                if short8:
                    handle = self._connections8.get(_le64(p + 1))
                else:
                    handle = self._connections_other.get(data[1:1 + short_len])
                if handle is None:
                    self.dropped_unknown_dcid += 1
                    result.dropped += 1
                    continue
                quic_handles.append(handle)
                quic_datagrams.append(item)
            elif kind == C_KIND_QUIC_LONG:
                if not _scan_long(p, n, &dcid_len, &is_initial):
                    if _is_unsupported_version(p, n):
                        # Every client of a version we do not speak gets Version
                        # Negotiation (RFC 9000 §6.1), whatever its packet's layout.
                        result.initials.append((_unsupported_header(p, n), data, item[1]))
                        continue
                    self.dropped_malformed += 1
                    result.dropped += 1
                    continue
                handle = self._lookup_long(p, dcid_len)
                if handle is not None:
                    quic_handles.append(handle)
                    quic_datagrams.append(item)
                elif is_initial:
                    result.initials.append((_parse(p, n, short_len), data, item[1]))
                elif _is_unsupported_version(p, n):
                    result.initials.append((_unsupported_header(p, n), data, item[1]))
                else:
                    self.dropped_unknown_dcid += 1
                    result.dropped += 1
            elif kind == C_KIND_RELAY:
                if n <= C_RELAY_ROUTE_LEN:
                    self.dropped_malformed += 1
                    result.dropped += 1
                    continue
                entry = self._sessions.get(_le64(p + 1))
                if entry is None:
                    self.dropped_unknown_session += 1
                    result.dropped += 1
                    continue
                result.relay.append((entry, data, item[1]))
            elif kind == C_KIND_STUN:
                result.stun.append(item)
            elif _is_unsupported_version(p, n):
                # 0x80-0xBF: a long header without the fixed bit, which another version
                # may clear (RFC 8999 §5.1).
                result.initials.append((_unsupported_header(p, n), data, item[1]))
            else:
                self.dropped_unknown_kind += 1
                result.dropped += 1
        return result
