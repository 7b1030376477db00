"""STUN codec (RFC 8489) with the ICE attributes of RFC 8445 §7.1.2 / §16.1.

Pure Python, no I/O. A message is a :class:`Message`: method, class, 12-byte transaction id and
an ordered ``attributes`` dict keyed by attribute name (``"USERNAME"``, ``"PRIORITY"``, ...).
Every attribute this module understands is declared once in :data:`ATTRIBUTES` with its type
code and its pack/unpack functions; anything else is kept raw (see below).

Values by attribute::

    MAPPED-ADDRESS, XOR-MAPPED-ADDRESS   (host, port); IPv6 host compressed, IPv4-mapped as
                                         "::ffff:192.0.2.1" (as sockets report it)
    USERNAME, SOFTWARE                   str
    ERROR-CODE                           (code, reason) with 300 <= code <= 699
    UNKNOWN-ATTRIBUTES                   tuple of attribute type codes
    PRIORITY                             int (32 bits)
    USE-CANDIDATE                        True (the attribute is empty; presence is the flag)
    ICE-CONTROLLED, ICE-CONTROLLING      int (64-bit tie-breaker)
    RESPONSE-ORIGIN, OTHER-ADDRESS       (host, port), as MAPPED-ADDRESS (RFC 5780 §7.3, §7.4)
    CHANGE-REQUEST                       (change_ip, change_port): two bools (RFC 5780 §7.2)
    RESPONSE-DELAY                       int, milliseconds (mahole's, see ATTRIBUTES)
    MESSAGE-INTEGRITY                    bytes (20), only as decoded; encode computes it
    FINGERPRINT                          int, only as decoded; encode computes it
    <unknown type>                       key is the int type code, value the raw bytes

Unknown attributes: comprehension-optional ones (type >= 0x8000, RFC 8489 §14) are kept raw and
may simply be ignored. Comprehension-required ones (< 0x8000) are kept raw too and never make
:func:`decode` fail: a server processing a request must reject it with a 420 error listing
them (RFC 8489 §6.3.1); :meth:`Message.unknown_required` returns them for that purpose.

Every decoding failure raises :class:`StunError`, a :class:`ValueError`, and nothing else, so
callers can drop bad datagrams with ``except ValueError``. Encoding a message that cannot be
represented (bad address, out-of-range integer, over-long string) also raises :class:`StunError`.

Only short-term credentials are supported (RFC 8489 §9.1): the MESSAGE-INTEGRITY key is the
password's bytes (UTF-8; the OpaqueString profile is not applied). MESSAGE-INTEGRITY-SHA256 and
the long-term mechanism are not implemented; such attributes decode as raw unknowns.

Example::

    request = binding_request(username="remote:local", priority=0x6E0001FF,
                              ice_controlling=tie_breaker, use_candidate=True)
    data = encode(request, integrity_key=remote_password.encode())
    ...
    message = decode(data, integrity_key=local_password.encode())   # ValueError if forged
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import secrets
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

__all__ = [
    "ATTRIBUTES",
    "CLASS_ERROR",
    "CLASS_INDICATION",
    "CLASS_REQUEST",
    "CLASS_SUCCESS",
    "HEADER_LENGTH",
    "MAGIC_COOKIE",
    "METHOD_BINDING",
    "Attribute",
    "Message",
    "MessageClass",
    "StunError",
    "binding_error",
    "binding_indication",
    "binding_request",
    "binding_success",
    "decode",
    "encode",
    "is_stun",
]

# RFC 8489 §5: 20-byte header: type (16 bits, top two zero), length (16), magic cookie (32),
# transaction id (96).
HEADER_LENGTH = 20
MAGIC_COOKIE = 0x2112A442
TRANSACTION_ID_LENGTH = 12
_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
_HEADER = struct.Struct("!HHI")
_TLV = struct.Struct("!HH")

# RFC 8489 §18.2: the Binding method.
METHOD_BINDING = 0x001

# RFC 8489 §14.5: HMAC-SHA1 digest length. §14.7: FINGERPRINT XOR constant ("STUN").
_INTEGRITY_LENGTH = 20
_FINGERPRINT_XOR = 0x5354554E

# RFC 8489 §14.1: address families.
_FAMILY_IPV4 = 0x01
_FAMILY_IPV6 = 0x02

# RFC 8489 §14.3: USERNAME "fewer than 509 bytes". §14.8 / §14.14: reason phrase and SOFTWARE
# "fewer than 128 characters". Enforced when encoding; decode is liberal and accepts more.
_MAX_USERNAME_BYTES = 508
_MAX_TEXT_CHARS = 127


class StunError(ValueError):
    """Bytes that are not a valid STUN message, or a message that cannot be encoded."""


class MessageClass(enum.IntEnum):
    """The two class bits C1 C0 of the message type (RFC 8489 §5)."""

    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


CLASS_REQUEST = MessageClass.REQUEST
CLASS_INDICATION = MessageClass.INDICATION
CLASS_SUCCESS = MessageClass.SUCCESS
CLASS_ERROR = MessageClass.ERROR


@dataclass
class Message:
    """One STUN message. ``attributes`` keeps insertion order, which is the wire order."""

    method: int
    message_class: int
    transaction_id: bytes = field(default_factory=lambda: secrets.token_bytes(12))
    attributes: dict[str | int, Any] = field(default_factory=dict)
    # The header's magic cookie field. Anything but MAGIC_COOKIE marks a classic RFC 3489
    # message (decoded only with ``classic=True``), whose 128-bit transaction id is this
    # field followed by ``transaction_id`` (RFC 8489 §12).
    cookie: int = MAGIC_COOKIE

    @property
    def classic(self) -> bool:
        """Whether this is a classic RFC 3489 message (no magic cookie, RFC 8489 §12.2)."""
        return self.cookie != MAGIC_COOKIE

    def unknown_required(self) -> tuple[int, ...]:
        """Type codes of comprehension-required attributes (< 0x8000, RFC 8489 §14) this module
        does not understand; a request carrying any must get a 420 error (§6.3.1)."""
        return tuple(key for key in self.attributes if isinstance(key, int) and key < 0x8000)


# --- message type: method and class interleaved (RFC 8489 §5, figure 3) -------------------
#
#   bit  13 12 11 10  9  8  7  6  5  4  3  2  1  0
#        M11 ...  M7  C1 M6 M5 M4 C0 M3 M2 M1 M0


def _join_type(method: int, message_class: int) -> int:
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((message_class & 0b01) << 4)
        | ((message_class & 0b10) << 7)
    )


def _split_type(message_type: int) -> tuple[int, MessageClass]:
    method = (
        (message_type & 0x000F) | ((message_type >> 1) & 0x0070) | ((message_type >> 2) & 0x0F80)
    )
    message_class = ((message_type >> 4) & 0b01) | ((message_type >> 7) & 0b10)
    return method, MessageClass(message_class)


# --- attribute value codecs: pack(value, transaction_id) / unpack(data, transaction_id) ----


def _expect_length(data: bytes, length: int, what: str) -> None:
    if len(data) != length:
        raise StunError(f"{what} value must be {length} bytes, got {len(data)}")


def _check_uint(value: Any, bits: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise StunError(f"{what} must be an integer in [0, 2**{bits}), got {value!r}")
    return value


def _check_address(value: Any) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    try:
        host, port = value
        address = ipaddress.ip_address(host) if isinstance(host, str) else None
    except (TypeError, ValueError):
        address = None
    if address is None:
        raise StunError(f"address must be a (host string, port) tuple, got {value!r}")
    _check_uint(port, 16, "port")
    return address, port


def _unpack_family_port(data: bytes) -> tuple[int, int]:
    # RFC 8489 §14.1: the first byte is reserved ("MUST be ignored by receivers").
    if len(data) < 4:
        raise StunError(f"address value too short ({len(data)} bytes)")
    family = data[1]
    if family == _FAMILY_IPV4:
        _expect_length(data, 8, "IPv4 address")
    elif family == _FAMILY_IPV6:
        _expect_length(data, 20, "IPv6 address")
    else:
        raise StunError(f"unknown address family 0x{family:02x}")
    return family, int.from_bytes(data[2:4], "big")


def _address_from_bytes(family: int, packed: bytes) -> str:
    if family == _FAMILY_IPV4:
        return str(ipaddress.IPv4Address(packed))
    address = ipaddress.IPv6Address(packed)
    if address.ipv4_mapped is not None:
        # The form sockets report (and str() gives from Python 3.13 on), on every version.
        return f"::ffff:{address.ipv4_mapped}"
    return address.compressed


def _pack_address(value: Any, transaction_id: bytes) -> bytes:
    """MAPPED-ADDRESS (RFC 8489 §14.1): 0, family, port, address."""
    address, port = _check_address(value)
    family = _FAMILY_IPV4 if address.version == 4 else _FAMILY_IPV6
    return bytes((0, family)) + port.to_bytes(2, "big") + address.packed


def _unpack_address(data: bytes, transaction_id: bytes) -> tuple[str, int]:
    family, port = _unpack_family_port(data)
    return _address_from_bytes(family, data[4:]), port


def _xor_bytes(data: bytes, mask: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(data, mask))


def _pack_xor_address(value: Any, transaction_id: bytes) -> bytes:
    """XOR-MAPPED-ADDRESS (RFC 8489 §14.2): X-Port = port XOR the cookie's top 16 bits;
    X-Address = address XOR the cookie (IPv4) or XOR cookie || transaction id (IPv6)."""
    address, port = _check_address(value)
    family = _FAMILY_IPV4 if address.version == 4 else _FAMILY_IPV6
    x_port = port ^ (MAGIC_COOKIE >> 16)
    x_address = _xor_bytes(address.packed, _COOKIE_BYTES + transaction_id)
    return bytes((0, family)) + x_port.to_bytes(2, "big") + x_address


def _unpack_xor_address(data: bytes, transaction_id: bytes) -> tuple[str, int]:
    family, x_port = _unpack_family_port(data)
    packed = _xor_bytes(data[4:], _COOKIE_BYTES + transaction_id)
    return _address_from_bytes(family, packed), x_port ^ (MAGIC_COOKIE >> 16)


def _text_packer(what: str, max_chars: int | None = None, max_bytes: int | None = None):
    def pack(value: Any, transaction_id: bytes) -> bytes:
        if not isinstance(value, str):
            raise StunError(f"{what} must be a str, got {value!r}")
        if max_chars is not None and len(value) > max_chars:
            raise StunError(f"{what} must be fewer than {max_chars + 1} characters")
        try:
            data = value.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates
            raise StunError(f"{what} is not encodable as UTF-8") from exc
        if max_bytes is not None and len(data) > max_bytes:
            raise StunError(f"{what} must be fewer than {max_bytes + 1} bytes of UTF-8")
        return data

    return pack


def _unpack_text(data: bytes, transaction_id: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StunError("text attribute is not valid UTF-8") from exc


def _pack_error_code(value: Any, transaction_id: bytes) -> bytes:
    """ERROR-CODE (RFC 8489 §14.8): 21 reserved zero bits, class (3 bits, the hundreds digit,
    3..6), number (8 bits, 0..99), then a UTF-8 reason phrase."""
    try:
        code, reason = value
    except (TypeError, ValueError):
        raise StunError(f"ERROR-CODE must be a (code, reason) tuple, got {value!r}") from None
    if isinstance(code, bool) or not isinstance(code, int) or not 300 <= code <= 699:
        raise StunError(f"ERROR-CODE code must be an integer in 300..699, got {code!r}")
    phrase = _text_packer("ERROR-CODE reason", _MAX_TEXT_CHARS)(reason, transaction_id)
    return bytes((0, 0, code // 100, code % 100)) + phrase


def _unpack_error_code(data: bytes, transaction_id: bytes) -> tuple[int, str]:
    if len(data) < 4:
        raise StunError(f"ERROR-CODE value too short ({len(data)} bytes)")
    # RFC 8489 §14.8: receivers ignore the reserved bits.
    error_class, number = data[2] & 0x07, data[3]
    if not 3 <= error_class <= 6 or number > 99:
        raise StunError(f"ERROR-CODE class {error_class} / number {number} out of range")
    return error_class * 100 + number, _unpack_text(data[4:], transaction_id)


def _pack_unknown_attributes(value: Any, transaction_id: bytes) -> bytes:
    """UNKNOWN-ATTRIBUTES (RFC 8489 §14.13): a list of 16-bit attribute types."""
    try:
        types = [_check_uint(item, 16, "UNKNOWN-ATTRIBUTES entry") for item in value]
    except TypeError:
        raise StunError(f"UNKNOWN-ATTRIBUTES must be a sequence of ints, got {value!r}") from None
    return b"".join(item.to_bytes(2, "big") for item in types)


def _unpack_unknown_attributes(data: bytes, transaction_id: bytes) -> tuple[int, ...]:
    if len(data) % 2:
        raise StunError("UNKNOWN-ATTRIBUTES value has an odd length")
    return tuple(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))


def _uint_codec(bits: int, what: str):
    size = bits // 8

    def pack(value: Any, transaction_id: bytes) -> bytes:
        return _check_uint(value, bits, what).to_bytes(size, "big")

    def unpack(data: bytes, transaction_id: bytes) -> int:
        _expect_length(data, size, what)
        return int.from_bytes(data, "big")

    return pack, unpack


def _pack_flag(value: Any, transaction_id: bytes) -> bytes:
    return b""


def _unpack_flag(data: bytes, transaction_id: bytes) -> bool:
    _expect_length(data, 0, "USE-CANDIDATE")
    return True


def _pack_computed(value: Any, transaction_id: bytes) -> bytes:  # pragma: no cover - guarded
    raise StunError("MESSAGE-INTEGRITY and FINGERPRINT are computed by encode()")


def _unpack_integrity(data: bytes, transaction_id: bytes) -> bytes:
    _expect_length(data, _INTEGRITY_LENGTH, "MESSAGE-INTEGRITY")
    return data


# RFC 5780 §7.2: CHANGE-REQUEST is 32 bits, of which bit 0x4 is "change IP" (A) and bit 0x2
# "change port" (B); the others are zero when sending and ignored when receiving.
_CHANGE_IP = 0x4
_CHANGE_PORT = 0x2


def _pack_change_request(value: Any, transaction_id: bytes) -> bytes:
    try:
        change_ip, change_port = value
    except (TypeError, ValueError):
        raise StunError(f"CHANGE-REQUEST must be a (change_ip, change_port) pair, got {value!r}") from None
    flags = (_CHANGE_IP if change_ip else 0) | (_CHANGE_PORT if change_port else 0)
    return flags.to_bytes(4, "big")


def _unpack_change_request(data: bytes, transaction_id: bytes) -> tuple[bool, bool]:
    _expect_length(data, 4, "CHANGE-REQUEST")
    flags = int.from_bytes(data, "big")
    return bool(flags & _CHANGE_IP), bool(flags & _CHANGE_PORT)


_pack_priority, _unpack_priority = _uint_codec(32, "PRIORITY")
_pack_delay, _unpack_delay = _uint_codec(32, "RESPONSE-DELAY")
_pack_tie_breaker, _unpack_tie_breaker = _uint_codec(64, "ICE tie-breaker")
_unpack_fingerprint = _uint_codec(32, "FINGERPRINT")[1]


class Attribute(NamedTuple):
    type: int
    name: str
    pack: Callable[[Any, bytes], bytes]
    unpack: Callable[[bytes, bytes], Any]


# The attribute table (RFC 8489 §18.3 registry; RFC 8445 §16.1 for the ICE ones; RFC 5780
# §9.1 for NAT behaviour discovery's). RESPONSE-PORT (0x0027, RFC 5780 §7.5) is left out on
# purpose: it asks for the answer at another port, so a server that honoured it could be
# pointed at a third party; a request carrying it gets 420 (comprehension-required, unknown).
ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute(0x0001, "MAPPED-ADDRESS", _pack_address, _unpack_address),  # RFC 8489 §14.1
    Attribute(0x0006, "USERNAME",  # §14.3
              _text_packer("USERNAME", max_bytes=_MAX_USERNAME_BYTES), _unpack_text),
    Attribute(0x0008, "MESSAGE-INTEGRITY", _pack_computed, _unpack_integrity),  # §14.5
    Attribute(0x0009, "ERROR-CODE", _pack_error_code, _unpack_error_code),  # §14.8
    Attribute(0x000A, "UNKNOWN-ATTRIBUTES",  # §14.13
              _pack_unknown_attributes, _unpack_unknown_attributes),
    Attribute(0x0003, "CHANGE-REQUEST",  # RFC 5780 §7.2
              _pack_change_request, _unpack_change_request),
    Attribute(0x0020, "XOR-MAPPED-ADDRESS", _pack_xor_address, _unpack_xor_address),  # §14.2
    Attribute(0x0024, "PRIORITY", _pack_priority, _unpack_priority),  # RFC 8445 §7.1.1, §16.1
    Attribute(0x0025, "USE-CANDIDATE", _pack_flag, _unpack_flag),  # RFC 8445 §7.1.2, §16.1
    Attribute(0x8022, "SOFTWARE", _text_packer("SOFTWARE", _MAX_TEXT_CHARS), _unpack_text),  # §14.14
    Attribute(0x8028, "FINGERPRINT", _pack_computed, _unpack_fingerprint),  # §14.7
    Attribute(0x802B, "RESPONSE-ORIGIN", _pack_address, _unpack_address),  # RFC 5780 §7.3
    Attribute(0x802C, "OTHER-ADDRESS", _pack_address, _unpack_address),  # RFC 5780 §7.4
    Attribute(0x8029, "ICE-CONTROLLED", _pack_tie_breaker, _unpack_tie_breaker),  # RFC 8445 §7.1.3
    Attribute(0x802A, "ICE-CONTROLLING", _pack_tie_breaker, _unpack_tie_breaker),  # RFC 8445 §7.1.3
    # mahole's own, comprehension-optional (RFC 8489 §18.3: 0xC000-0xFFFF, so other servers
    # ignore it and answer at once): "answer this after N ms", to the request's source only;
    # the answer carries it back. Binding lifetime discovery (mahole.binding_lifetime).
    Attribute(0xC0DE, "RESPONSE-DELAY", _pack_delay, _unpack_delay),
)
_BY_TYPE = {attribute.type: attribute for attribute in ATTRIBUTES}
_BY_NAME = {attribute.name: attribute for attribute in ATTRIBUTES}
_TYPE_MESSAGE_INTEGRITY = _BY_NAME["MESSAGE-INTEGRITY"].type
_TYPE_FINGERPRINT = _BY_NAME["FINGERPRINT"].type
_COMPUTED = ("MESSAGE-INTEGRITY", "FINGERPRINT")


def _padded(length: int) -> int:
    """RFC 8489 §14: each attribute value is padded to a multiple of 4 bytes."""
    return (length + 3) & ~3


def _tlv(attr_type: int, value: bytes, pad: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise StunError(f"attribute 0x{attr_type:04x} value too long ({len(value)} bytes)")
    return _TLV.pack(attr_type, len(value)) + value + pad * (_padded(len(value)) - len(value))


def _header(message_type: int, length: int, transaction_id: bytes,
            cookie: int = MAGIC_COOKIE) -> bytes:
    if length > 0xFFFF:
        raise StunError(f"message too long ({length} bytes of attributes)")
    return _HEADER.pack(message_type, length, cookie) + transaction_id


def _fingerprint(data: bytes) -> int:
    """RFC 8489 §14.7: CRC-32 (ISO 3309 / zlib) of the message up to the attribute, XOR 'STUN'."""
    return zlib.crc32(data) ^ _FINGERPRINT_XOR


def _integrity(key: bytes, data: bytes) -> bytes:
    """RFC 8489 §14.5: HMAC-SHA1 of the message up to the attribute (header length adjusted)."""
    return hmac.new(key, data, hashlib.sha1).digest()


# --- encode / decode ---------------------------------------------------------------------


def encode(
    message: Message,
    integrity_key: bytes | None = None,
    fingerprint: bool = True,
    *,
    pad_byte: int = 0x00,
) -> bytes:
    """Serialise ``message``.

    Attributes go on the wire in dict order. With ``integrity_key`` a MESSAGE-INTEGRITY is
    appended (RFC 8489 §14.5), then, if ``fingerprint``, a FINGERPRINT (§14.7). Any
    "MESSAGE-INTEGRITY" / "FINGERPRINT" entries in ``message.attributes`` (say, from decode) are
    skipped: those two are always computed here.

    ``pad_byte`` fills attribute padding. RFC 8489 §14 says padding MUST be zero when sending
    (the default); it exists so tests can reproduce the RFC 5769 vectors, written under RFC 5389
    which allowed any value and which pad with 0x20.
    """
    _check_uint(message.method, 12, "method")
    _check_uint(message.message_class, 2, "message class")
    transaction_id = message.transaction_id
    if not isinstance(transaction_id, (bytes, bytearray)) or len(transaction_id) != 12:
        raise StunError(f"transaction id must be 12 bytes, got {transaction_id!r}")
    transaction_id = bytes(transaction_id)
    cookie = _check_uint(message.cookie, 32, "magic cookie")
    pad = bytes((pad_byte,))

    body = bytearray()
    for key, value in message.attributes.items():
        if isinstance(key, int) and not isinstance(key, bool):
            if not 0 <= key <= 0xFFFF or key in _BY_TYPE:
                raise StunError(f"raw attribute type 0x{key:04x} is out of range or has a name; use the name")
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise StunError(f"raw attribute 0x{key:04x} value must be bytes, got {value!r}")
            body += _tlv(key, bytes(value), pad)
        elif key in _COMPUTED:
            continue
        elif key in _BY_NAME:
            attribute = _BY_NAME[key]
            body += _tlv(attribute.type, attribute.pack(value, transaction_id), pad)
        else:
            raise StunError(f"unknown STUN attribute name {key!r}")

    message_type = _join_type(message.method, message.message_class)
    if integrity_key is not None:
        # §14.5: the length covers the message up to and including MESSAGE-INTEGRITY itself.
        header = _header(message_type, len(body) + 4 + _INTEGRITY_LENGTH, transaction_id,
                         cookie)
        body += _tlv(_TYPE_MESSAGE_INTEGRITY, _integrity(integrity_key, header + body), pad)
    if fingerprint:
        # §14.7: the length already includes the 8-byte FINGERPRINT attribute.
        header = _header(message_type, len(body) + 8, transaction_id, cookie)
        body += _tlv(_TYPE_FINGERPRINT, _fingerprint(header + body).to_bytes(4, "big"), pad)
    return _header(message_type, len(body), transaction_id, cookie) + bytes(body)


def decode(data: bytes, integrity_key: bytes | None = None, *, classic: bool = False) -> Message:
    """Parse one STUN message; raise :class:`StunError` (a ValueError) on anything wrong.

    With ``classic`` a message without the magic cookie is accepted as a classic RFC 3489
    one (RFC 8489 §12: a server can tell such a client by the cookie and answers it); its
    cookie field is kept in ``Message.cookie``. Without it the cookie is required.

    Checks the header (RFC 8489 §5: top two bits zero, magic cookie, length a multiple of 4
    that matches the datagram), parses every attribute, and verifies FINGERPRINT whenever it is
    present (it must be last, §14.7). With ``integrity_key`` the message MUST carry a
    MESSAGE-INTEGRITY that verifies with that key (§9.1.3). Attributes after MESSAGE-INTEGRITY
    other than FINGERPRINT are ignored (§14.5). For a repeated attribute only the first
    occurrence is kept (§14).
    """
    data = bytes(data)
    if len(data) < HEADER_LENGTH:
        raise StunError(f"STUN message shorter than its {HEADER_LENGTH}-byte header ({len(data)} bytes)")
    message_type, length, cookie = _HEADER.unpack_from(data)
    if message_type & 0xC000:
        raise StunError("top two bits of a STUN message must be zero")
    if cookie != MAGIC_COOKIE and not classic:
        raise StunError(f"bad magic cookie 0x{cookie:08x}")
    if length % 4:
        raise StunError(f"STUN length {length} is not a multiple of 4")
    if length != len(data) - HEADER_LENGTH:
        raise StunError(
            f"STUN length {length} does not match the {len(data) - HEADER_LENGTH} bytes after the header"
        )
    method, message_class = _split_type(message_type)
    transaction_id = data[8:HEADER_LENGTH]

    attributes: dict[str | int, Any] = {}
    integrity_at = fingerprint_at = None
    position = HEADER_LENGTH
    while position < len(data):
        if fingerprint_at is not None:
            raise StunError("FINGERPRINT is not the last attribute")
        if position + 4 > len(data):  # cannot happen while every length is a multiple of 4
            raise StunError("truncated attribute header")
        attr_type, attr_length = _TLV.unpack_from(data, position)
        start = position + 4
        end = start + _padded(attr_length)
        if end > len(data):
            raise StunError(f"attribute 0x{attr_type:04x} ({attr_length} bytes) overruns the message")
        value = data[start : start + attr_length]
        if attr_type == _TYPE_FINGERPRINT:
            fingerprint_at = position
        elif integrity_at is not None:
            position = end  # §14.5: ignored after MESSAGE-INTEGRITY
            continue
        elif attr_type == _TYPE_MESSAGE_INTEGRITY:
            integrity_at = position
        attribute = _BY_TYPE.get(attr_type)
        if attribute is None:
            attributes.setdefault(attr_type, value)
        elif attribute.name not in attributes:
            attributes[attribute.name] = attribute.unpack(value, transaction_id)
        position = end

    if fingerprint_at is not None:
        expected = _fingerprint(data[:fingerprint_at])
        if attributes["FINGERPRINT"] != expected:
            raise StunError("FINGERPRINT does not match")
    if integrity_key is not None:
        if integrity_at is None:
            raise StunError("MESSAGE-INTEGRITY missing")
        header = _header(message_type, integrity_at + 4 + _INTEGRITY_LENGTH - HEADER_LENGTH,
                         transaction_id, cookie)
        expected = _integrity(integrity_key, header + data[HEADER_LENGTH:integrity_at])
        if not hmac.compare_digest(attributes["MESSAGE-INTEGRITY"], expected):
            raise StunError("MESSAGE-INTEGRITY does not match")
    return Message(method, message_class, transaction_id, attributes, cookie)


def is_stun(data: bytes) -> bool:
    """Cheap check that a datagram looks like one STUN message (RFC 8489 §5): top two bits
    zero, magic cookie, length a multiple of 4 that matches the datagram. Does not parse."""
    return (
        len(data) >= HEADER_LENGTH
        and data[0] & 0xC0 == 0
        and data[4:8] == _COOKIE_BYTES
        and (data[2] << 8 | data[3]) == len(data) - HEADER_LENGTH
        and data[3] & 0x03 == 0
    )


# --- helpers for Binding (RFC 8489 §3; ICE checks RFC 8445 §7.1) --------------------------


def _attributes_from_keywords(keywords: dict[str, Any]) -> dict[str | int, Any]:
    """``use_candidate=True`` -> {"USE-CANDIDATE": True}. None (and a false flag) is omitted."""
    attributes: dict[str | int, Any] = {}
    for keyword, value in keywords.items():
        name = keyword.upper().replace("_", "-")
        if name not in _BY_NAME or name in _COMPUTED:
            raise TypeError(f"unknown STUN attribute keyword {keyword!r}")
        if value is None or (name == "USE-CANDIDATE" and not value):
            continue
        attributes[name] = value
    return attributes


def binding_request(transaction_id: bytes | None = None, **attributes: Any) -> Message:
    """A Binding request; keywords name attributes (``username=``, ``priority=``,
    ``ice_controlling=``, ``ice_controlled=``, ``use_candidate=``, ``software=``,
    ``change_request=(change_ip, change_port)``, ``response_delay=`` ms)."""
    return Message(
        METHOD_BINDING,
        CLASS_REQUEST,
        transaction_id if transaction_id is not None else secrets.token_bytes(TRANSACTION_ID_LENGTH),
        _attributes_from_keywords(attributes),
    )


def binding_indication(**attributes: Any) -> Message:
    """A Binding indication (keepalive, RFC 8445 §11), with a fresh transaction id."""
    return Message(METHOD_BINDING, CLASS_INDICATION, attributes=_attributes_from_keywords(attributes))


def binding_success(request: Message, mapped_addr: tuple[str, int], **attributes: Any) -> Message:
    """The success response to ``request``: same transaction id, XOR-MAPPED-ADDRESS =
    ``mapped_addr`` (the request's source address, RFC 8489 §12 / RFC 8445 §7.3.1.2).

    A classic RFC 3489 request (no magic cookie) gets its cookie field back and a
    MAPPED-ADDRESS instead, the one attribute such a client reads (RFC 8489 §12.2)."""
    name = "MAPPED-ADDRESS" if request.classic else "XOR-MAPPED-ADDRESS"
    attrs: dict[str | int, Any] = {name: mapped_addr}
    attrs.update(_attributes_from_keywords(attributes))
    return Message(request.method, CLASS_SUCCESS, request.transaction_id, attrs, request.cookie)


def binding_error(request: Message, code: int, reason: str = "", **attributes: Any) -> Message:
    """The error response to ``request`` with ERROR-CODE (code, reason), e.g. 400 Bad Request,
    401 Unauthorized, 420 Unknown Attribute (add ``unknown_attributes=``), 487 Role Conflict."""
    attrs: dict[str | int, Any] = {"ERROR-CODE": (code, reason)}
    attrs.update(_attributes_from_keywords(attributes))
    return Message(request.method, CLASS_ERROR, request.transaction_id, attrs, request.cookie)
