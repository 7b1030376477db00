"""PCP codec (RFC 6887), the MAP opcode only: ask the router for a UDP port mapping.

Pure Python, no I/O. PCP shares the gateway's port 5351 with NAT-PMP
(:mod:`mahole.wire.natpmp`); a router that speaks only NAT-PMP answers a PCP request with a
NAT-PMP "unsupported version" (RFC 6887 §9), which :func:`decode` reports as
:class:`UnsupportedVersion` so the caller falls back.

- :func:`map_request` (§11.1): the client's own address, the internal port, a suggested
  external port and address, a lifetime (0 deletes the mapping, §15) and a 12-byte nonce that
  the answer must repeat (§11.2: it proves the answer is for this request's mapping);
- :func:`decode` (§7.2, §11.1): a :class:`MapResponse`;
- :func:`announce_request` (§14.1): ANNOUNCE, which changes nothing on the router; any PCP
  answer to it says the router speaks PCP (`mahole netcheck` asks it).

Every decoding failure raises :class:`PcpError`, a :class:`ValueError`. A well-formed answer
with an error result decodes (``result``, with :data:`RESULTS` saying what it means).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

__all__ = [
    "PORT", "VERSION", "OP_MAP", "PROTO_UDP", "NONCE_LEN", "RESULTS", "SUCCESS",
    "INITIAL_RETRANSMIT", "MAX_RETRANSMIT", "PcpError", "MapResponse", "UnsupportedVersion",
    "map_request", "decode", "announce_request", "OP_ANNOUNCE",
]

PORT = 5351  # §19.1
VERSION = 2
OP_ANNOUNCE = 0  # §14.1
OP_MAP = 1
RESPONSE_BIT = 0x80  # §7.2: the R bit
PROTO_UDP = 17
NONCE_LEN = 12
HEADER_LEN = 24  # §7.1, §7.2
MAP_LEN = 36  # §11.1
# §8.1.1: first retransmission after 3 s, doubling with jitter, at most 1024 s apart.
INITIAL_RETRANSMIT = 3.0
MAX_RETRANSMIT = 1024.0

SUCCESS = 0
RESULTS = {  # §7.4
    0: "success",
    1: "unsupported version",
    2: "not authorized (PCP is disabled on the router)",
    3: "malformed request",
    4: "unsupported opcode",
    5: "unsupported option",
    6: "malformed option",
    7: "network failure (the router has no external address)",
    8: "no resources",
    9: "unsupported protocol",
    10: "user exceeded quota",
    11: "cannot provide the external port or address",
    12: "address mismatch (a NAT between this host and the router)",
    13: "excessive remote peers",
}


class PcpError(ValueError):
    """A datagram that is not a PCP answer this client can use."""


@dataclass(frozen=True)
class UnsupportedVersion:
    """The router answered in an older version (NAT-PMP, version 0): use that instead."""

    version: int


@dataclass(frozen=True)
class MapResponse:
    """§11.1: internal_port is reachable at (external_address, external_port) for lifetime
    seconds; ``epoch`` is the server's epoch time (§8.5: a jump back means it forgot)."""

    result: int
    lifetime: int
    epoch: int
    nonce: bytes
    internal_port: int
    external_port: int
    external_address: str


def _ip16(address: str) -> bytes:
    """An address as PCP carries it: IPv6, or IPv4 mapped into IPv6 (§5)."""
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def _address(data: bytes) -> str:
    ip = ipaddress.IPv6Address(data)
    return str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else str(ip)


def map_request(client_address: str, internal_port: int, nonce: bytes, *,
                lifetime: int = 7200, external_port: int = 0,
                external_address: str = "0.0.0.0") -> bytes:
    """§11.1 MAP of UDP ``internal_port`` for the host at ``client_address`` (its own
    address as the router sees it: the source address of the request)."""
    if len(nonce) != NONCE_LEN:
        raise PcpError(f"a mapping nonce is {NONCE_LEN} bytes, not {len(nonce)}")
    if not 0 < internal_port <= 0xFFFF or not 0 <= external_port <= 0xFFFF:
        raise PcpError("port out of range")
    if not 0 <= lifetime <= 0xFFFFFFFF:
        raise PcpError(f"lifetime {lifetime} out of range")
    try:
        client, suggested = _ip16(client_address), _ip16(external_address)
    except ValueError as exc:
        raise PcpError(str(exc)) from None
    header = struct.pack("!BBHI", VERSION, OP_MAP, 0, lifetime) + client
    return header + nonce + struct.pack("!B3xHH", PROTO_UDP, internal_port,
                                        external_port) + suggested


def announce_request(client_address: str) -> bytes:
    """§14.1 ANNOUNCE: the common header (§7.1) with lifetime 0 and no opcode data."""
    try:
        client = _ip16(client_address)
    except ValueError as exc:
        raise PcpError(str(exc)) from None
    return struct.pack("!BBHI", VERSION, OP_ANNOUNCE, 0, 0) + client


def decode(data: bytes) -> MapResponse | UnsupportedVersion:
    """A MAP answer; UnsupportedVersion for a NAT-PMP router's refusal; PcpError otherwise."""
    if len(data) >= 4 and data[0] == 0 and data[1] & RESPONSE_BIT:
        # §9: a NAT-PMP-only server answers version 2 with its own unsupported-version error.
        if struct.unpack_from("!H", data, 2)[0] == 1:
            return UnsupportedVersion(0)
        raise PcpError("a NAT-PMP answer to a PCP request")
    if len(data) < HEADER_LEN:
        raise PcpError(f"{len(data)} bytes: too short for a PCP answer")
    if len(data) > 1100 or len(data) % 4:
        raise PcpError(f"{len(data)} bytes: not a PCP message length (§7)")
    version, opcode, result, lifetime, epoch = struct.unpack_from("!BBxBII", data)
    if version != VERSION:
        raise PcpError(f"version {version}, not PCP's {VERSION}")
    if not opcode & RESPONSE_BIT:
        raise PcpError("a request, not an answer")
    if opcode & ~RESPONSE_BIT != OP_MAP:
        raise PcpError(f"opcode {opcode & ~RESPONSE_BIT} answered: not one this client sends")
    if len(data) < HEADER_LEN + MAP_LEN:
        if result == SUCCESS:
            raise PcpError("MAP answer without its mapping")
        return MapResponse(result, lifetime, epoch, b"", 0, 0, "")
    body = data[HEADER_LEN:HEADER_LEN + MAP_LEN]
    nonce = body[:NONCE_LEN]
    protocol, internal, external = struct.unpack_from("!B3xHH", body, NONCE_LEN)
    if protocol != PROTO_UDP:
        raise PcpError(f"a mapping for protocol {protocol}, not UDP")
    return MapResponse(result, lifetime, epoch, bytes(nonce), internal, external,
                       _address(body[NONCE_LEN + 8:]))
