"""NAT-PMP (RFC 6886) and PCP (RFC 6887) codecs: layouts byte by byte, refusals, garbage."""

import os
import random
import struct

import pytest

from mahole.wire import natpmp, pcp

NONCE = bytes(range(12))


# NAT-PMP ---------------------------------------------------------------------------------
def test_natpmp_requests_are_laid_out_as_rfc_6886_says():
    assert natpmp.external_address_request() == b"\x00\x00"  # §3.2
    # §3.3: version, opcode 1 (UDP), reserved, internal port, suggested port, lifetime
    assert natpmp.map_request(4478, 4478, 7200) == bytes.fromhex("0001 0000 117e 117e 00001c20")
    assert natpmp.map_request(4478, 0, 0)[-6:] == bytes(6)  # §3.4: delete
    with pytest.raises(ValueError, match="internal port 0"):
        natpmp.map_request(0)
    with pytest.raises(ValueError, match="out of range"):
        natpmp.map_request(70000)


def test_natpmp_answers_decode_with_their_result():
    answer = struct.pack("!BBHI", 0, 128, 0, 1234) + bytes([198, 51, 100, 7])
    assert natpmp.decode(answer) == natpmp.ExternalAddress(0, 1234, "198.51.100.7")
    mapped = struct.pack("!BBHIHHI", 0, 129, 0, 99, 4478, 61000, 3600)
    assert natpmp.decode(mapped) == natpmp.Mapping(0, 99, 4478, 61000, 3600)
    refused = struct.pack("!BBHIHHI", 0, 129, 2, 99, 4478, 0, 0)
    got = natpmp.decode(refused)
    assert got.result == 2 and "refused" in natpmp.RESULTS[got.result]
    short_error = struct.pack("!BBHI", 0, 128, 3, 5)  # error answers may be short
    assert natpmp.decode(short_error).result == 3


@pytest.mark.parametrize("data, why", [
    (b"", "too short"),
    (struct.pack("!BBHI", 2, 128, 0, 0) + bytes(4), "version 2"),
    (struct.pack("!BBHI", 0, 1, 0, 0) + bytes(8), "is a request"),
    (struct.pack("!BBHI", 0, 128, 0, 0), "shorter than 12"),
    (struct.pack("!BBHI", 0, 129, 0, 0) + bytes(4), "shorter than 16"),
    (struct.pack("!BBHIHHI", 0, 129, 0, 0, 0, 5, 5), "internal port 0"),
    (struct.pack("!BBHI", 0, 130, 0, 0) + bytes(8), "opcode 2 answered"),
])
def test_natpmp_rejects_what_is_no_usable_answer(data, why):
    with pytest.raises(natpmp.NatPmpError, match=why):
        natpmp.decode(data)


# PCP -------------------------------------------------------------------------------------
def test_pcp_map_request_is_laid_out_as_rfc_6887_says():
    data = pcp.map_request("192.168.1.10", 4478, NONCE, lifetime=7200, external_port=4478)
    assert len(data) == 60  # §7.1 header (24) + §11.1 MAP (36)
    assert data[:8] == bytes.fromhex("02 01 0000 00001c20")
    assert data[8:24] == bytes(10) + b"\xff\xff" + bytes([192, 168, 1, 10])  # §5: v4-mapped
    assert data[24:36] == NONCE
    assert data[36:44] == bytes.fromhex("11 000000 117e 117e")  # UDP, reserved, ports
    assert data[44:60] == bytes(10) + b"\xff\xff" + bytes(4)  # no address suggested
    v6 = pcp.map_request("2001:db8::5", 4478, NONCE)
    assert v6[8:24] == bytes.fromhex("20010db8000000000000000000000005")
    with pytest.raises(ValueError, match="nonce is 12 bytes"):
        pcp.map_request("192.168.1.10", 4478, b"short")
    with pytest.raises(ValueError):
        pcp.map_request("not an address", 4478, NONCE)


def _answer(result=0, lifetime=3600, epoch=77, nonce=NONCE, proto=17, internal=4478,
            external=62000, address="203.0.113.9", opcode=0x81):
    header = struct.pack("!BBxBII", 2, opcode, result, lifetime, epoch) + bytes(12)
    body = nonce + struct.pack("!B3xHH", proto, internal, external) + pcp._ip16(address)
    return header + body


def test_pcp_answers_decode_and_a_natpmp_router_says_so():
    got = pcp.decode(_answer())
    assert got == pcp.MapResponse(0, 3600, 77, NONCE, 4478, 62000, "203.0.113.9")
    assert pcp.decode(_answer(address="2001:db8::9")).external_address == "2001:db8::9"
    refused = pcp.decode(_answer(result=2))
    assert refused.result == 2 and "not authorized" in pcp.RESULTS[refused.result]
    short_error = struct.pack("!BBxBII", 2, 0x81, 8, 0, 1) + bytes(12)
    assert pcp.decode(short_error).result == 8
    # §9: a NAT-PMP-only router answers a version-2 request with its own version error.
    natpmp_refusal = struct.pack("!BBHI", 0, 0x81, 1, 5) + bytes(8)
    assert pcp.decode(natpmp_refusal) == pcp.UnsupportedVersion(0)


@pytest.mark.parametrize("data, why", [
    (b"\x02\x81", "too short"),
    (_answer()[:-1], "not a PCP message length"),
    (_answer(opcode=0x01), "a request"),
    (_answer(opcode=0x82), "opcode 2"),
    (_answer(proto=6), "protocol 6"),
    (_answer()[:24], "without its mapping"),
    (bytes([3]) + _answer()[1:], "version 3"),
])
def test_pcp_rejects_what_is_no_usable_answer(data, why):
    with pytest.raises(pcp.PcpError, match=why):
        pcp.decode(data)


def test_random_datagrams_raise_value_error_and_nothing_else():
    rng = random.Random(6886)
    valid = [_answer(), struct.pack("!BBHIHHI", 0, 129, 0, 99, 4478, 61000, 3600)]
    for _ in range(5000):
        if rng.random() < 0.5:
            data = os.urandom(rng.randrange(0, 80))
        else:  # a valid answer with a few bytes changed
            data = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data[:rng.randrange(len(data) + 1)])
        for decode in (natpmp.decode, pcp.decode):
            try:
                decode(data)
            except ValueError:
                pass


def test_pcp_announce_request_layout():
    """RFC 6887 §14.1 / §7.1: version 2, opcode 0 (ANNOUNCE), lifetime 0, the client's
    address IPv4-mapped; no opcode data."""
    data = pcp.announce_request("10.0.0.2")
    assert data == bytes([2, 0, 0, 0]) + bytes(4) + bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 2])
    with pytest.raises(ValueError):
        pcp.announce_request("not an address")
