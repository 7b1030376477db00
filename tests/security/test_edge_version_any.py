"""Version Negotiation for every client of another version (RFC 9000 §6.1, §5.2.2):
the intermediate answers any long header of a version it does not speak, in a datagram big
enough to start a connection, even when the packet is not laid out as a QUIC v1 Initial
(another version's packet types, longer connection IDs, no fixed bit: RFC 8999 §5.1 keeps only
the first bit, the version and the connection IDs). A Version Negotiation packet itself
(version 0) is never answered."""

import os
import struct

import pytest
from aio_helpers import run
from edge_helpers import Attacker, LoneIntermediate, certs, exchange, parse_vn  # noqa: F401


GREASE = 0x1A2A3A4A  # a reserved version (RFC 9000 §15): never supported
OTHER = 0xFF00001D  # draft-29, which a QUIC client may still try first


def long_header(version, dcid, scid, first, size=1200):
    """A long header of `version` that is no v1 Initial: after the connection IDs, bytes a
    v1 parser cannot read (a token length running past the end), padded to size."""
    head = bytes([first]) + struct.pack("!I", version) + bytes([len(dcid)]) + dcid \
        + bytes([len(scid)]) + scid
    return head + b"\xff" * (size - len(head))


@pytest.mark.parametrize("version, first, dcid_len, scid_len", [
    (GREASE, 0xC0, 8, 8),     # laid out as an Initial whose token runs off the end
    (GREASE, 0xE0, 8, 8),     # laid out as a v1 Handshake
    (OTHER, 0xC0, 21, 8),     # a connection ID longer than v1's 20 bytes
    (GREASE, 0xC0, 255, 0),   # the longest the invariants allow
    (GREASE, 0x80, 8, 8),     # no fixed bit
], ids=["grease-bad-token", "grease-handshake", "other-long-cid", "cid-255", "no-fixed-bit"])
def test_every_client_of_another_version_gets_version_negotiation(certs, version, first,
                                                                  dcid_len, scid_len):
    async def main():
        async with LoneIntermediate(certs) as inter:
            client = await Attacker.open()
            dcid, scid = os.urandom(dcid_len), os.urandom(scid_len)
            replies = await exchange(client, long_header(version, dcid, scid, first),
                                     inter.local_address, 1, 0.3)
            assert len(replies) == 1, replies
            # §17.2.1: the client's connection IDs swapped, and the versions we speak.
            assert parse_vn(replies[0]) == (scid, dcid, [1])
            assert len(replies[0]) < 1200  # never more than the client sent
            assert inter.counters["version_negotiations_sent"] == 1
            client.close()
    run(main(), timeout=30)


def test_small_datagrams_and_version_negotiation_packets_get_nothing(certs):
    async def main():
        async with LoneIntermediate(certs) as inter:
            client = await Attacker.open()
            to = inter.local_address
            dcid, scid = os.urandom(8), os.urandom(8)
            small = long_header(GREASE, dcid, scid, 0xE0, size=1199)  # §14.1: cannot start one
            vn = bytes([0xC0]) + bytes(4) + b"\x08" + dcid + b"\x08" + scid \
                + struct.pack("!I", GREASE) * 300  # version 0, 1223 bytes: no ping-pong
            bad_vn = long_header(0, dcid, scid, 0xE0, size=1202)  # version 0, partial list
            for data in (small, vn, bad_vn):
                assert await exchange(client, data, to, 1, 0.3) == []
            assert inter.counters["version_negotiations_sent"] == 0
            # The same client with a packet that may start a connection is answered.
            assert len(await exchange(client, long_header(GREASE, dcid, scid, 0xE0), to,
                                      1, 0.3)) == 1
            client.close()
    run(main(), timeout=30)
