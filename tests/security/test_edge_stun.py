"""STUN at the intermediate (RFC 8489): unknown comprehension-required attributes get
420, classic RFC 3489 clients get MAPPED-ADDRESS, and answers are rate-limited per source."""

import os
import struct

from aio_helpers import run
from edge_helpers import Attacker, LoneIntermediate, certs, exchange  # noqa: F401

from mahole.roles.intermediate import SourceLimiter
from mahole.wire import stun


def test_unknown_comprehension_required_attribute_gets_420(certs):
    async def main():
        async with LoneIntermediate(certs) as inter:
            client = await Attacker.open()
            request = stun.binding_request()
            request.attributes[0x7F01] = b"\x01\x02\x03\x04"  # comprehension-required
            # RFC 5780 §7.2: a CHANGE-REQUEST this intermediate (no --stun-alt-port) cannot
            # honour is listed as unknown too.
            request.attributes["CHANGE-REQUEST"] = (True, True)
            request.attributes[0xC001] = b"optional"  # comprehension-optional: ignored
            (reply,) = await exchange(client, stun.encode(request), inter.local_address, 1, 0.3)
            response = stun.decode(reply)
            assert response.message_class == stun.CLASS_ERROR
            assert response.transaction_id == request.transaction_id
            assert response.attributes["ERROR-CODE"][0] == 420
            assert response.attributes["UNKNOWN-ATTRIBUTES"] == (0x7F01, 0x0003)
            assert "XOR-MAPPED-ADDRESS" not in response.attributes
            # A well-formed request from the same client still gets its address.
            plain = stun.binding_request(software="test")
            (reply,) = await exchange(client, stun.encode(plain), inter.local_address, 1, 0.3)
            response = stun.decode(reply)
            assert response.message_class == stun.CLASS_SUCCESS
            assert response.attributes["XOR-MAPPED-ADDRESS"] == client.address
            assert inter.counters["stun_unknown_attributes"] == 1
            client.close()
    run(main(), timeout=30)


def _classic_request(transaction_id):
    """An RFC 3489 Binding request: type 0x0001, length 0, a 128-bit transaction id."""
    return struct.pack("!HH", 0x0001, 0) + transaction_id


def test_a_classic_rfc3489_request_gets_mapped_address(certs):
    async def main():
        async with LoneIntermediate(certs) as inter:
            client = await Attacker.open()
            transaction_id = os.urandom(16)
            (reply,) = await exchange(client, _classic_request(transaction_id),
                                      inter.local_address, 1, 0.3)
            # RFC 3489 §11.1: same 128-bit transaction id, success type 0x0101, MAPPED-ADDRESS.
            assert reply[:2] == b"\x01\x01" and reply[4:20] == transaction_id
            response = stun.decode(reply, classic=True)
            assert response.classic and response.message_class == stun.CLASS_SUCCESS
            assert response.attributes["MAPPED-ADDRESS"] == client.address
            assert set(response.attributes) == {"MAPPED-ADDRESS"}  # no FINGERPRINT
            assert inter.counters["stun_classic"] == 1
            client.close()
    run(main(), timeout=30)


def test_stun_answers_are_rate_limited_per_source(certs):
    rate = 5.0  # per second, bursts of 10

    async def main():
        async with LoneIntermediate(certs, stun_rate=rate) as inter:
            flooder, other = await Attacker.open(), await Attacker.open("127.0.0.2")
            request = stun.encode(stun.binding_request())
            replies = await exchange(flooder, request, inter.local_address, 200, 0.5)
            # A burst of 2 x rate, plus what refilled while the flood was sent and read.
            assert 2 * rate <= len(replies) <= 2 * rate + rate * 1.5, len(replies)
            assert inter.counters["stun_rate_limited"] >= 200 - len(replies)
            # Another source is not held back by the flooder.
            replies = await exchange(other, request, inter.local_address, 1, 0.3)
            assert len(replies) == 1
            flooder.close()
            other.close()
    run(main(), timeout=30)


def test_the_source_table_is_bounded_and_the_total_rate_holds():
    limiter = SourceLimiter(1.0, max_sources=100, total_rate=50)
    allowed = sum(limiter.allow(("10.0.0.1", n), 0.0) for n in range(10_000))
    assert len(limiter) == 100
    assert allowed == 100  # twice the total rate: the total bucket's burst
    assert not limiter.allow(("10.9.9.9", 1), 0.01)  # a new source, but no total left
    assert limiter.allow(("10.9.9.9", 1), 0.5)  # the total refills at its rate
    one = SourceLimiter(2.0)
    assert [one.allow("a", 0.0) for _ in range(5)] == [True] * 4 + [False]
    assert one.allow("a", 0.5)
