"""NAT-PMP codec (RFC 6886): ask the home router for a UDP port mapping.

Pure Python, no I/O. A client sends requests to the gateway's port :data:`PORT` and the
gateway answers from it; the same port answers PCP (RFC 6887, :mod:`mahole.wire.pcp`), told
apart by the version byte (0 here, 2 for PCP).

- :func:`external_address_request` / :class:`ExternalAddress` (RFC 6886 §3.2)
- :func:`map_request` / :class:`Mapping` (§3.3): a lifetime of 0 with external port 0 deletes
  the mapping (§3.4)

Every decoding failure raises :class:`NatPmpError`, a :class:`ValueError`, so a caller drops
a bad datagram with ``except ValueError``. A well-formed answer with a result code other than
success decodes (its ``result`` says why), since the caller must act on it.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

__all__ = [
    "PORT", "VERSION", "OP_EXTERNAL_ADDRESS", "OP_MAP_UDP", "RESULTS", "SUCCESS",
    "UNSUPPORTED_VERSION", "INITIAL_RETRANSMIT", "MAX_TRIES", "NatPmpError",
    "ExternalAddress", "Mapping", "external_address_request", "map_request", "decode",
]

PORT = 5351  # RFC 6886 §3.1: requests to the gateway's port 5351
VERSION = 0
OP_EXTERNAL_ADDRESS = 0
OP_MAP_UDP = 1
RESPONSE_BIT = 0x80  # §3.5: a response's opcode is the request's plus 128
# §3.1: the first retransmission after 250 ms, doubling, nine tries in all (about 64 s).
INITIAL_RETRANSMIT = 0.25
MAX_TRIES = 9
RECOMMENDED_LIFETIME = 7200  # s, §3.3

SUCCESS = 0
UNSUPPORTED_VERSION = 1
RESULTS = {  # §3.5
    0: "success",
    1: "unsupported version",
    2: "not authorized or refused (NAT-PMP is disabled on the router)",
    3: "network failure (the router has no external address)",
    4: "out of resources (no more mappings)",
    5: "unsupported opcode",
}


class NatPmpError(ValueError):
    """A datagram that is not a NAT-PMP answer this client can use."""


@dataclass(frozen=True)
class ExternalAddress:
    """The router's answer to an external address request."""

    result: int
    epoch: int  # seconds since the router's mapping table began (§3.6: lower = it forgot)
    address: str  # the router's external IPv4 address


@dataclass(frozen=True)
class Mapping:
    """The router's answer to a mapping request: internal_port is reachable from outside at
    the router's external address, port external_port, for lifetime seconds."""

    result: int
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int


def external_address_request() -> bytes:
    """§3.2: version 0, opcode 0."""
    return bytes([VERSION, OP_EXTERNAL_ADDRESS])


def map_request(internal_port: int, external_port: int = 0,
                lifetime: int = RECOMMENDED_LIFETIME) -> bytes:
    """§3.3: map UDP ``internal_port``; ``external_port`` is a suggestion (0: any). Lifetime 0
    with external port 0 deletes the mapping (§3.4)."""
    for name, port in (("internal port", internal_port), ("external port", external_port)):
        if not 0 <= port <= 0xFFFF:
            raise NatPmpError(f"{name} {port} out of range")
    if internal_port == 0:
        raise NatPmpError("internal port 0 cannot be mapped")
    if not 0 <= lifetime <= 0xFFFFFFFF:
        raise NatPmpError(f"lifetime {lifetime} out of range")
    return struct.pack("!BBHHHI", VERSION, OP_MAP_UDP, 0, internal_port, external_port,
                       lifetime)


def decode(data: bytes) -> ExternalAddress | Mapping:
    """An answer from the gateway; NatPmpError if it is none (requests, PCP, garbage)."""
    if len(data) < 8:
        raise NatPmpError(f"{len(data)} bytes: too short for a NAT-PMP answer")
    version, opcode, result, epoch = struct.unpack_from("!BBHI", data)
    if version != VERSION:
        raise NatPmpError(f"version {version}, not NAT-PMP's {VERSION}")
    if not opcode & RESPONSE_BIT:
        raise NatPmpError(f"opcode {opcode} is a request, not an answer")
    opcode &= ~RESPONSE_BIT
    if result != SUCCESS:
        # §3.5: an error answer may be shorter than a success; what it says is the code.
        if opcode == OP_MAP_UDP and len(data) >= 16:
            internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
            return Mapping(result, epoch, internal, external, lifetime)
        if opcode == OP_EXTERNAL_ADDRESS:
            return ExternalAddress(result, epoch, "0.0.0.0")
        return Mapping(result, epoch, 0, 0, 0)
    if opcode == OP_EXTERNAL_ADDRESS:
        if len(data) < 12:
            raise NatPmpError("external address answer shorter than 12 bytes")
        return ExternalAddress(result, epoch, str(ipaddress.IPv4Address(data[8:12])))
    if opcode == OP_MAP_UDP:
        if len(data) < 16:
            raise NatPmpError("mapping answer shorter than 16 bytes")
        internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
        if internal == 0:
            raise NatPmpError("mapping answer for internal port 0")
        return Mapping(result, epoch, internal, external, lifetime)
    raise NatPmpError(f"opcode {opcode} answered: not one this client sends")
