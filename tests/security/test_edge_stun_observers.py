"""The intermediate's second STUN observer (--stun-alt-port, --stun-alt-ip; RFC 5780):
OTHER-ADDRESS in answers, CHANGE-REQUEST answered from the other port or IP, and none of it
usable to reflect or amplify towards anyone but the request's source."""

import asyncio
import socket

import pytest
from aio_helpers import run
from edge_helpers import LoneIntermediate, certs  # noqa: F401
from ports import free_port

from mahole.cli import main
from mahole.roles.node import StartupError
from mahole.wire import stun


class Client(asyncio.DatagramProtocol):
    """A UDP socket that keeps (data, source address) of what it receives."""

    def __init__(self):
        self.received = []

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.received.append((data, addr[:2]))

    @classmethod
    async def open(cls, host="127.0.0.1"):
        _, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
            cls, local_addr=(host, 0))
        return protocol

    async def ask(self, to, wait=0.3, count=1, **attributes):
        request = stun.binding_request(**attributes)
        before = len(self.received)
        for _ in range(count):
            self.transport.sendto(stun.encode(request), to)
        await asyncio.sleep(wait)
        return [(stun.decode(data), addr) for data, addr in self.received[before:]]


def test_other_address_and_change_request(certs):
    alt_port = free_port(socket.SOCK_DGRAM)

    async def main():
        async with LoneIntermediate(certs, stun_alt_port=alt_port,
                                    stun_alt_ip="127.0.0.2") as inter:
            main_addr = inter.endpoint.local_address[:2]
            client = await Client.open()
            me = client.transport.get_extra_info("sockname")[:2]
            # Plain request at the main port: the answer names the alternate observer.
            ((answer, source),) = await client.ask(main_addr)
            assert source == main_addr
            assert answer.attributes["XOR-MAPPED-ADDRESS"] == me
            assert answer.attributes["OTHER-ADDRESS"] == ("127.0.0.2", alt_port)
            assert answer.attributes["RESPONSE-ORIGIN"] == main_addr
            # At the alternate port and the alternate IP, the same address is observed.
            for observer in (("127.0.0.1", alt_port), ("127.0.0.2", alt_port)):
                ((answer, source),) = await client.ask(observer)
                assert source == observer and answer.attributes["XOR-MAPPED-ADDRESS"] == me
            # RFC 5780 §7.2: change port comes from the alternate port, change IP and port
            # from the alternate IP; both back to the client's own address, once.
            ((answer, source),) = await client.ask(main_addr, change_request=(False, True))
            assert source == ("127.0.0.1", alt_port)
            assert answer.attributes["RESPONSE-ORIGIN"] == source
            ((answer, source),) = await client.ask(main_addr, change_request=(True, True))
            assert source == ("127.0.0.2", alt_port)
            ((answer, source),) = await client.ask(("127.0.0.2", alt_port),
                                                   change_request=(True, True))
            assert source == main_addr
            # Change IP alone needs the alternate IP at the main port, which is not opened.
            ((answer, source),) = await client.ask(main_addr, change_request=(True, False))
            assert answer.message_class == stun.CLASS_ERROR and source == main_addr
            assert answer.attributes["ERROR-CODE"][0] == 420
            assert answer.attributes["UNKNOWN-ATTRIBUTES"] == (0x0003,)
            assert inter.counters["stun_changed"] == 3
            assert inter.status()["stun_observers"] == [f"127.0.0.1:{alt_port}",
                                                        f"127.0.0.2:{alt_port}"]
            client.transport.close()
    run(main(), timeout=30)


def test_change_request_is_no_reflector_and_no_amplifier(certs):
    """RESPONSE-PORT (RFC 5780 §7.5) would send the answer elsewhere: refused with 420. A
    malformed CHANGE-REQUEST is counted and dropped. A flood of CHANGE-REQUESTs gets one
    answer per request at most and is held to the per-source STUN rate whichever observer
    answers."""
    alt_port = free_port(socket.SOCK_DGRAM)
    rate = 5.0

    async def main():
        async with LoneIntermediate(certs, stun_alt_port=alt_port, stun_rate=rate) as inter:
            main_addr = inter.endpoint.local_address[:2]
            client, bystander = await Client.open(), await Client.open()
            victim_port = bystander.transport.get_extra_info("sockname")[1]
            request = stun.binding_request()
            request.attributes[0x0027] = victim_port.to_bytes(2, "big") + b"\0\0"
            client.transport.sendto(stun.encode(request), main_addr)
            await asyncio.sleep(0.3)
            ((data, source),) = client.received
            assert stun.decode(data).attributes["ERROR-CODE"][0] == 420
            assert bystander.received == []
            # A CHANGE-REQUEST of 2 bytes instead of 4.
            raw = bytearray(stun.encode(stun.binding_request(), fingerprint=False))
            raw[2:4] = (8).to_bytes(2, "big")
            raw += b"\x00\x03\x00\x02\x00\x06\x00\x00"
            before = inter.counters["stun_malformed"]
            client.transport.sendto(bytes(raw), main_addr)
            await asyncio.sleep(0.2)
            assert inter.counters["stun_malformed"] == before + 1
            assert len(client.received) == 1
            # A flood: at most one answer per request, within the rate (a burst of 2 x rate).
            replies = await client.ask(main_addr, wait=0.5, count=200,
                                       change_request=(False, True))
            assert 2 * rate - 1 <= len(replies) <= 2 * rate + rate * 1.5, len(replies)
            assert all(source == ("127.0.0.1", alt_port) for _, source in replies)
            assert inter.counters["stun_rate_limited"] >= 200 - len(replies)
            assert bystander.received == []
            client.transport.close()
            bystander.transport.close()
    run(main(), timeout=30)


@pytest.mark.parametrize("flags, message", [
    (["--stun-alt-ip", "127.0.0.2"], "--stun-alt-ip needs --stun-alt-port"),
    (["--stun-alt-port", "4000", "--stun-alt-ip", "relay2"], "is not an IP address"),
    (["--stun-alt-port", "70000"], "--stun-alt-port must be a free port"),
    (["--listen", "4000", "--stun-alt-port", "4000"], "--stun-alt-port must be a free port"),
])
def test_bad_observer_flags_are_one_line_and_exit_2(capsys, flags, message):
    assert main(["intermediate", "--cert", "x.crt", "--key", "x.key", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_an_alt_port_in_use_is_one_line(certs):
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))

    async def main_():
        with pytest.raises(StartupError, match="--stun-alt-port: cannot bind UDP"):
            async with LoneIntermediate(certs, stun_alt_port=holder.getsockname()[1]):
                pass
    try:
        run(main_(), timeout=30)
    finally:
        holder.close()


def test_held_answers_are_no_pulse_amplifier(certs):
    """RESPONSE-DELAY (binding lifetime discovery): answers held to land later go to their
    request's source only, one per request, and at most MAX_DELAYED_PER_SOURCE of one source
    host are held at once: a flood timed to land together on one victim is that few answers;
    the rest are answered at once, without the echo."""
    from mahole.stun_server import MAX_DELAYED_PER_SOURCE

    async def main():
        async with LoneIntermediate(certs, stun_rate=1000.0) as inter:
            main_addr = inter.endpoint.local_address[:2]
            client, bystander = await Client.open(), await Client.open()
            count = MAX_DELAYED_PER_SOURCE + 40
            for _ in range(count):
                client.transport.sendto(stun.encode(stun.binding_request(
                    response_delay=600)), main_addr)
            await asyncio.sleep(0.3)
            at_once = [stun.decode(d) for d, _ in client.received]
            assert len(at_once) == count - MAX_DELAYED_PER_SOURCE
            assert all("RESPONSE-DELAY" not in m.attributes for m in at_once)
            await asyncio.sleep(0.8)
            late = [stun.decode(d) for d, _ in client.received[len(at_once):]]
            assert len(late) == MAX_DELAYED_PER_SOURCE
            assert all(m.attributes["RESPONSE-DELAY"] == 600 for m in late)
            assert len({m.transaction_id for m in at_once + late}) == count
            assert inter.counters["stun_delayed"] == MAX_DELAYED_PER_SOURCE
            assert inter.counters["stun_delay_refused"] == count - MAX_DELAYED_PER_SOURCE
            assert bystander.received == []
            client.transport.close()
            bystander.transport.close()
    run(main(), timeout=30)
