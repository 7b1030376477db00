"""QUIC Version Negotiation at the intermediate (RFC 9000 §6, §17.2.1): a client's
first packet of a version it does not speak gets the versions it does, at a bounded rate."""

import os
import struct

import pytest
from aio_helpers import run
from edge_helpers import Attacker, LoneIntermediate, certs, exchange, parse_vn  # noqa: F401


GREASE = 0x1A2A3A4A  # a reserved version (RFC 9000 §15): never supported
QUIC_V2 = 0x6B3343CF  # RFC 9369


def initial(version, dcid, scid, first=0xC0, size=1200):
    """A long-header packet laid out like an Initial (RFC 9000 §17.2.2), padded to size."""
    head = bytes([first]) + struct.pack("!I", version) + bytes([len(dcid)]) + dcid \
        + bytes([len(scid)]) + scid + b"\x00"  # no token
    rest = size - len(head) - 2
    return head + struct.pack("!H", 0x4000 | rest) + os.urandom(rest)


@pytest.mark.parametrize("version, first", [(GREASE, 0xC0), (QUIC_V2, 0xD0)],
                         ids=["reserved", "quic-v2"])
def test_an_unsupported_version_gets_version_negotiation(certs, version, first):
    async def main():
        async with LoneIntermediate(certs) as inter:
            client = await Attacker.open()
            dcid, scid = os.urandom(8), os.urandom(8)
            (reply,) = await exchange(client, initial(version, dcid, scid, first),
                                      inter.local_address, 1, 0.3)
            # §17.2.1: the client's connection IDs swapped, and the versions we speak.
            assert parse_vn(reply) == (scid, dcid, [1])
            assert len(reply) < 1200  # never more than the client sent
            assert inter.counters["version_negotiations_sent"] == 1
            client.close()
    run(main(), timeout=30)


def test_version_negotiation_is_rate_limited_and_never_answers_small_or_vn(certs):
    async def main():
        async with LoneIntermediate(certs, vn_rate=1.0) as inter:
            client = await Attacker.open()
            other = await Attacker.open("127.0.0.2")
            to = inter.local_address
            packet = initial(GREASE, os.urandom(8), os.urandom(8))
            replies = await exchange(client, packet, to, 100, 0.5)
            assert 2 <= len(replies) <= 4, len(replies)  # a burst of 2, ~1 a second after
            assert inter.counters["version_negotiation_rate_limited"] >= 96
            # §14.1: a datagram too small to start a connection gets nothing ...
            assert await exchange(other, initial(GREASE, b"a" * 8, b"b" * 8, size=600), to,
                                  1, 0.3) == []
            # ... nor does a Version Negotiation packet (version 0): no ping-pong.
            vn = bytes([0xC0]) + bytes(4) + b"\x08" + b"a" * 8 + b"\x08" + b"b" * 8 \
                + struct.pack("!I", GREASE) * 300
            assert await exchange(other, vn, to, 1, 0.3) == []
            # The other source still gets its answer: the limit is per source.
            assert len(await exchange(other, packet, to, 1, 0.3)) == 1
            client.close()
            other.close()
    run(main(), timeout=30)
