"""The aioquic internals that `mahole.connection` adapts to are still there and still mean
what the adapter assumes. This fails (never skips) when an aioquic release changes them:
then fix the adapter and widen the version pin in pyproject.toml."""

import hashlib
import inspect
import os

import aioquic
import pytest
from aioquic import tls
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.recovery import QuicPacketPacer

from mahole import connection as qc
from mahole._fast import PacketBuilder
from mahole.endpoint import ConnectionHandler


def _client():
    quic = qc.NodeQuicConnection(configuration=QuicConfiguration(is_client=True))
    quic.connect(("127.0.0.1", 4478), now=0.0)
    return quic


def test_aioquic_version_is_the_pinned_one():
    major, minor = (int(part) for part in aioquic.__version__.split(".")[:2])
    assert (major, minor) == (1, 7), "update mahole/connection.py's adapter and the pin"


def test_private_methods_keep_their_signatures():
    params = list(inspect.signature(QuicConnection._payload_received).parameters)
    assert params == ["self", "context", "plain", "crypto_frame_required"]
    params = list(inspect.signature(QuicConnection._write_stream_limits).parameters)
    assert params == ["self", "builder", "space", "stream"]
    params = list(inspect.signature(QuicConnection._write_connection_limits).parameters)
    assert params == ["self", "builder", "space"]
    params = list(inspect.signature(QuicConnection._initialize).parameters)
    assert params == ["self", "peer_cid"]
    assert "update_rate" in vars(QuicPacketPacer)


def test_private_attributes_exist_on_a_live_connection():
    quic = _client()
    loss = quic._loss
    assert isinstance(loss.bytes_in_flight, int)
    assert isinstance(loss._pto_count, int)
    assert isinstance(loss._rtt_initialized, bool)
    assert isinstance(loss._rtt_smoothed, float)
    assert isinstance(loss._pacer, qc.TimerAwarePacer)
    assert isinstance(loss._pacer.bucket_max, float)
    assert isinstance(quic._streams, dict)
    assert isinstance(quic._local_max_data.used, int)
    assert isinstance(quic._local_max_data.value, int)
    stream = quic._get_or_create_stream_for_send(0)
    assert stream.receiver.starting_offset() == 0  # delivered, in order: credit follows it
    assert quic._close_event is None
    [path] = quic._network_paths
    assert path.addr == ("127.0.0.1", 4478) and path.is_validated is True
    assert hasattr(quic.tls, "_request_client_certificate")
    assert hasattr(quic._configuration, "max_stream_data")


def test_adapter_properties():
    quic = _client()
    quic.datagrams_to_send(now=0.0)  # the ClientHello is now in flight
    assert quic.bytes_in_flight > 0
    quic._loss._pto_count = 3
    quic.reset_probe_backoff()
    assert quic._loss._pto_count == 0
    assert quic.smoothed_rtt is None
    assert quic.packets_authenticated == 0
    assert quic.path_validated(("127.0.0.1", 4478))
    assert quic.datagrams_queued == 0
    quic._datagrams_pending.append(b"x")
    assert quic.datagrams_queued == 1
    assert not quic.path_validated(("127.0.0.9", 4478))


def test_local_close_is_recorded_once():
    quic = _client()
    quic.close(error_code=0x101, reason_phrase="first")
    quic.close(error_code=0x100, reason_phrase="second")
    assert quic.local_close == (0x101, None, "first")


def test_handler_base_class_is_all_no_ops():
    handler = ConnectionHandler()
    assert handler.quic_event(None, None) is None
    assert handler.packet_authenticated(None, None, 0.0) is None
    assert handler.peer_address_changed(None, None, None) is None
    assert handler.progress(None) is None
    assert handler.connection_closed(None) is None


# Path MTU probes and the packet size --------------------------------------------------------

def _probing_pair(tmp_path):
    from quic_pair import handshake, make_pair, pump

    client, server = make_pair(tmp_path, max_datagram_frame_size=65536)
    now = handshake(client, server)
    while not client._handshake_confirmed:  # HANDSHAKE_DONE has to arrive (RFC 9001 §4.1.2)
        now += 0.01
        pump(client, server, now, rounds=4)
        assert now < 5
    return client, server, now + 0.01, pump


def test_an_mtu_probe_is_one_packet_of_exactly_its_size_and_not_in_flight(tmp_path):
    client, server, now, pump = _probing_pair(tmp_path)
    results = []
    in_flight = client.bytes_in_flight
    client.send_mtu_probe(1400, lambda size, acked: results.append((size, acked)))
    datagrams = client.datagrams_to_send(now)
    assert [len(d) for d, _ in datagrams][-1] == 1400
    assert client.bytes_in_flight == in_flight  # its loss is no congestion signal
    for data, _ in datagrams:
        server.receive_datagram(data, ("127.0.0.1", 5000), now=now)
    pump(client, server, now + 0.05, rounds=4)
    assert results == [(1400, True)]


def test_a_lost_mtu_probe_is_reported_lost_without_shrinking_the_window(tmp_path):
    client, server, now, pump = _probing_pair(tmp_path)
    results = []
    window = client._loss.congestion_window
    client.send_mtu_probe(1472, lambda size, acked: results.append((size, acked)))
    path_mtu = 1300  # the path drops every larger datagram
    for step in range(1, 200):
        now += 0.05
        client.send_ping(step)  # traffic after the probe lets loss detection decide
        pump(client, server, now, rounds=4, carry=lambda data: len(data) <= path_mtu)
        timer = client.get_timer()
        if timer is not None and timer <= now:
            client.handle_timer(now)
        if results:
            break
    assert results == [(1472, False)]
    assert client._loss.congestion_window >= window
    assert client.large_packets_lost == 0  # a probe is not a black-hole signal


def test_lost_packets_over_the_minimum_size_are_counted(tmp_path):
    client, server, now, pump = _probing_pair(tmp_path)
    client.set_max_datagram_size(1472)
    stream = client.get_next_available_stream_id()
    client.send_stream_data(stream, b"x" * 20_000)
    path_mtu = 1300  # a black hole for the full-size packets
    for _ in range(100):
        now += 0.05
        pump(client, server, now, rounds=4, carry=lambda data: len(data) <= path_mtu)
        timer = client.get_timer()
        if timer is not None and timer <= now:
            client.handle_timer(now)
        if client.large_packets_lost >= 3:
            break
    assert client.large_packets_lost >= 3


def test_a_probe_before_the_handshake_is_reported_unsent(tmp_path):
    from quic_pair import make_pair

    client, _server = make_pair(tmp_path)
    results = []
    client.send_mtu_probe(1300, lambda size, acked: results.append((size, acked)))
    client.datagrams_to_send(0.0)
    assert results == [(1300, None)]


def test_a_smaller_packet_size_drops_the_datagram_frames_that_no_longer_fit(tmp_path):
    client, server, now, pump = _probing_pair(tmp_path)
    assert client.set_max_datagram_size(1472) == 0
    assert client.max_datagram_size == 1472
    client.send_datagram_frame(b"a" * 1400)
    client.send_datagram_frame(b"b" * 100)
    assert client.set_max_datagram_size(1200) == 1  # the 1,400-byte frame cannot go any more
    assert list(client._datagrams_pending) == [b"b" * 100]
    room = qc.datagram_frame_room(1200)
    client.send_datagram_frame(b"c" * room)  # the largest frame one 1,200-byte packet takes
    sent = client.datagrams_to_send(now + 0.01)
    assert sent and max(len(d) for d, _ in sent) <= 1200
    assert client.datagrams_queued == 0


def test_the_newest_e2e_protocol_version_is_preferred_and_old_peers_still_connect(
        tmp_path):
    from quic_pair import handshake, make_pair

    client, server = make_pair(tmp_path)
    handshake(client, server)
    assert client.tls.alpn_negotiated == qc.ALPN_E2E_STREAM_OPEN
    mid_client, mid_server = make_pair(tmp_path / "mid", server_alpn=qc.ALPN_E2E[1:])
    handshake(mid_client, mid_server)
    assert mid_client.tls.alpn_negotiated == qc.ALPN_E2E_FRAGMENTS
    old_client, old_server = make_pair(tmp_path / "old", server_alpn="mahole-e2e/1")
    handshake(old_client, old_server)
    assert old_client.tls.alpn_negotiated == "mahole-e2e/1"


def test_crypto_buffers_shrink_after_the_handshake_and_the_connection_goes_on(tmp_path):
    """aioquic keeps three 16 KB TLS output buffers for a connection's life; mahole swaps
    them for small ones once the handshake completed (what an intermediate holding thousands
    of control connections saves), and the connection carries on: streams, a key update."""
    from quic_pair import handshake, make_pair, pump

    client, server = make_pair(tmp_path)
    handshake(client, server)
    pump(client, server, 1.0, rounds=10)
    for conn in (client, server):
        capacities = {buf.capacity for buf in conn._crypto_buffers.values()}
        assert capacities == {qc.CRYPTO_BUFFER_AFTER_HANDSHAKE}
    data = os.urandom(200_000)
    stream_id = client.get_next_available_stream_id()
    client.send_stream_data(stream_id, data, end_stream=True)
    client.request_key_update()
    received = b""
    for step in range(200):
        for event in pump(client, server, 1.0 + step * 0.01, rounds=5):
            if isinstance(event, qe.StreamDataReceived) and event.stream_id == stream_id:
                received += event.data
        if len(received) == len(data):
            break
    assert received == data


def test_a_probe_ping_goes_out_when_the_congestion_window_is_full(tmp_path):
    """The session core's liveness PINGs must reach the wire after a loss burst, when the
    congestion window is full of packets that will never be acknowledged: a plain PING
    (send_ping) waits behind them, a probe (send_probe) does not (RFC 9002 §7)."""
    from quic_pair import make_pair, pump
    client, server = make_pair(tmp_path)
    pump(client, server, now=0.0, rounds=10)
    assert client._handshake_complete
    stream_id = client.get_next_available_stream_id()
    client.send_stream_data(stream_id, os.urandom(1 << 20))
    while client.datagrams_to_send(now=0.1):  # all of it lost: nothing reaches the server
        pass
    assert client.bytes_in_flight >= client._loss.congestion_window
    client.send_ping(1)
    assert client.datagrams_to_send(now=0.1) == []  # held back by the window
    client.send_probe()
    assert len(client.datagrams_to_send(now=0.1)) == 1


def test_a_stream_moves_intact_in_packets_of_the_largest_size_and_breaks_beyond(tmp_path):
    """aioquic frames STREAM data with 2-byte lengths: packets up to mahole.pmtu.MAX_PACKET
    carry a stream byte-identical; larger, frames are misparsed: the peer closes the connection
    or takes wrong bytes (why route ceilings stop at MAX_PACKET)."""
    from quic_pair import handshake, make_pair, pump

    from mahole.pmtu import MAX_PACKET

    def send(size, directory):
        """(whether the stream arrived intact, the largest packet)"""
        client, server = make_pair(tmp_path / directory)
        now = handshake(client, server)
        client.set_max_datagram_size(size)
        data = os.urandom(256 << 10)
        client.send_stream_data(client.get_next_available_stream_id(), data, end_stream=True)
        received, sizes = bytearray(), [0]

        def carry(datagram):
            sizes.append(len(datagram))
            return True

        for _ in range(1000):
            now += 0.01
            for event in pump(client, server, now, rounds=3, carry=carry):
                if isinstance(event, qe.StreamDataReceived):
                    received += event.data
                elif isinstance(event, qe.ConnectionTerminated):
                    return False, max(sizes)
            if len(received) >= len(data):
                break
        return bytes(received) == data, max(sizes)

    assert send(MAX_PACKET, "max") == (True, MAX_PACKET)
    intact, largest = send(MAX_PACKET + 200, "over")
    assert not intact and largest > MAX_PACKET


# Steady sends with the compiled packet builder ---------------------------------------------

# NodeQuicConnection._send_application copies the steady-state part of this aioquic method
# (a connection with its handshake confirmed, on one path, not closing): when aioquic changes
# the method, compare the two again and then update the digest.
DATAGRAMS_TO_SEND_SHA256 = "f4eb22c8add260fe863a12c5ccc3b77887a1c93da3c7e0236722e2d5263560f5"


def test_the_packet_protection_keys_the_compiled_builder_reads_are_there():
    from aioquic._crypto import AEAD, HeaderProtection
    from aioquic.quic.crypto import CryptoPair

    pair = CryptoPair()
    pair.setup_initial(cid=bytes(8), is_client=True, version=1)
    assert pair._update_key_requested is False
    assert type(pair.send.aead) is AEAD and type(pair.send.hp) is HeaderProtection
    assert pair.send.aead._iv.to_bytes(12, "big") and hasattr(pair.send.aead._aead, "encrypt")
    assert pair.send.hp._is_chacha20 is False and hasattr(pair.send.hp._encryptor, "update")


def test_steady_sends_copy_aioquics_datagrams_to_send_as_it_is():
    source = inspect.getsource(QuicConnection.datagrams_to_send)
    assert hashlib.sha256(source.encode()).hexdigest() == DATAGRAMS_TO_SEND_SHA256


# mahole.connection.HyStartRttMonitor.is_rtt_increasing is this aioquic method with RFC
# 9406's threshold in place of "25 % over the minimum", and reads the monitor's private
# state (_sample_time, _ready, _filtered_min, _sample_min, _sample_max, _increases): when
# aioquic changes it, compare the two again and then update the digest.
RTT_MONITOR_SHA256 = "6a1ab5a771a74f342f676d24b6293386e92f81e463401be9c89e7e352de15555"


def test_the_slow_start_exit_test_copies_aioquics_rtt_monitor_as_it_is():
    from aioquic.quic.congestion.base import QuicRttMonitor

    source = inspect.getsource(QuicRttMonitor.is_rtt_increasing)
    assert hashlib.sha256(source.encode()).hexdigest() == RTT_MONITOR_SHA256


# mahole._fast._packets.write_application ports these aioquic methods (tests/
# test_steady_packets.py compares its packets with theirs): when aioquic changes them,
# port the change and then update the digest.
WRITE_APPLICATION_SHA256 = "e7e7123f9e4d8b6291c89309eaa491089808703bf1ccf6ab8572186ad61be9c1"


def test_the_compiled_write_application_ports_aioquics_methods_as_they_are():
    from aioquic.quic.stream import QuicStreamSender

    source = "".join(inspect.getsource(method) for method in (
        QuicConnection._write_application, QuicConnection._write_stream_frame,
        QuicStreamSender.get_frame, QuicStreamSender.next_offset.fget,
        QuicPacketPacer.next_send_time, QuicPacketPacer.update_after_send,
        QuicPacketPacer.update_bucket))
    assert hashlib.sha256(source.encode()).hexdigest() == WRITE_APPLICATION_SHA256
    from aioquic.quic.rangeset import RangeSet
    assert isinstance(RangeSet([range(0, 4)])._RangeSet__ranges, list)  # read in place


# mahole._fast._packets.payload_received ports these (tests/test_steady_packets.py compares
# what it reads with theirs): when aioquic changes them, port the change and then update the
# digest. The frame handler table it reads is checked too.
PAYLOAD_RECEIVED_SHA256 = "43d1d46c33b1f4e2f980255e8ad8d23c6df1acf9f911b4f3a655585a0c521dcd"


def test_the_compiled_payload_received_ports_aioquics_methods_as_they_are():
    from aioquic.quic.stream import QuicStreamReceiver

    source = "".join(inspect.getsource(method) for method in (
        QuicConnection._payload_received, QuicConnection._handle_stream_frame,
        QuicStreamReceiver.handle_frame))
    assert hashlib.sha256(source.encode()).hexdigest() == PAYLOAD_RECEIVED_SHA256
    handlers = _client()._QuicConnection__frame_handlers
    assert all(handlers[frame_type][0].__name__ == "_handle_stream_frame"
               and tls.Epoch.ONE_RTT in handlers[frame_type][1]
               for frame_type in range(0x08, 0x10))


# mahole._fast._packets.ack_receiver ports these (tests/test_steady_packets.py compares the
# congestion, RTT and send buffer state after each send): when aioquic changes them, port the
# change and then update the digest.
ACK_RECEIVED_SHA256 = "18a8c527e4c5ebb70f679ea6c600f10dd10b7ad9a0b70369a1eb840254ccb05c"


def test_the_compiled_ack_receiver_ports_aioquics_methods_as_they_are():
    from aioquic.quic.recovery import QuicPacketRecovery
    from aioquic.quic.stream import QuicStreamSender

    source = "".join(inspect.getsource(method) for method in (
        QuicPacketRecovery.on_ack_received, QuicStreamSender.on_data_delivery))
    assert hashlib.sha256(source.encode()).hexdigest() == ACK_RECEIVED_SHA256
    # the sent packets are walked in the order they were sent: a dict's, by packet number
    assert type(_client()._spaces[tls.Epoch.ONE_RTT].sent_packets) is dict


def _stream_arrives(client, server, now, pump):
    """Send 300 kB on a stream from client to server and check it arrives intact; the time
    after."""
    data = os.urandom(300_000)
    client.send_stream_data(0, data, end_stream=True)
    received = bytearray()
    for _ in range(500):
        now += 0.01
        for event in pump(client, server, now, rounds=3):
            if isinstance(event, qe.StreamDataReceived):
                received += event.data
        if len(received) >= len(data):
            break
    assert bytes(received) == data
    return now


def test_a_steady_connection_builds_with_maholes_builder_and_the_stream_arrives(
        tmp_path, monkeypatch):
    client, server, now, pump = _probing_pair(tmp_path)
    built = []

    def counting_builder(**kwargs):
        if kwargs["host_cid"] == client.host_cid:
            built.append(kwargs["packet_number"])
        return PacketBuilder(**kwargs)

    monkeypatch.setattr(qc, "PacketBuilder", counting_builder)
    assert client._steady()
    now = _stream_arrives(client, server, now, pump)
    assert len(built) > 1 and built == sorted(built)  # packet numbers carry on
    client.close()
    assert not client._steady()  # closing goes through aioquic's own path
    assert client.datagrams_to_send(now)  # CONNECTION_CLOSE


def test_a_streams_queued_data_events_come_out_as_one_in_order():
    quic = _client()
    sdr = qe.StreamDataReceived
    quic._events.extend([
        sdr(data=b"a", end_stream=False, stream_id=0), sdr(data=b"b", end_stream=False,
                                                          stream_id=0),
        sdr(data=b"c", end_stream=False, stream_id=4),
        sdr(data=b"d", end_stream=False, stream_id=0), sdr(data=b"e", end_stream=True,
                                                          stream_id=0),
        sdr(data=b"f", end_stream=False, stream_id=0),
        qe.DatagramFrameReceived(data=b"g"),
        sdr(data=b"h", end_stream=True, stream_id=8), sdr(data=b"", end_stream=True,
                                                         stream_id=8)])
    delivered = quic._delivered
    got = [(type(e).__name__, getattr(e, "stream_id", None), e.data,
            getattr(e, "end_stream", None)) for e in iter(quic.next_event, None)]
    assert got == [("StreamDataReceived", 0, b"ab", False),
                   ("StreamDataReceived", 4, b"c", False),
                   ("StreamDataReceived", 0, b"de", True),
                   ("StreamDataReceived", 0, b"f", False),
                   ("DatagramFrameReceived", None, b"g", None),
                   ("StreamDataReceived", 8, b"h", True),
                   ("StreamDataReceived", 8, b"", True)]
    assert quic._delivered - delivered == 7  # stream bytes only


def test_more_streams_than_the_first_limit_open_one_after_another(tmp_path):
    """MAX_STREAMS is raised as streams end (the connection limits are checked on every
    packet, and written only when one moved)."""
    from quic_pair import handshake, make_pair, pump

    client, server = make_pair(tmp_path)
    now = handshake(client, server)
    limit = client._remote_max_streams_bidi
    done = set()
    for number in range(limit * 2 + 5):
        stream_id = client.get_next_available_stream_id()
        client.send_stream_data(stream_id, b"x", end_stream=True)
        for _ in range(50):
            now += 0.01
            for event in pump(client, server, now, rounds=3):
                if isinstance(event, qe.StreamDataReceived) and event.end_stream:
                    if event.stream_id not in done and event.stream_id % 4 == 0:
                        done.add(event.stream_id)
                        server.send_stream_data(event.stream_id, b"", end_stream=True)
            if stream_id in done:
                break
        assert stream_id in done, number
    assert client._remote_max_streams_bidi > limit


# Steady receives: one 1-RTT packet from the validated path ----------------------------------

# NodeQuicConnection._receive_short copies the steps of this aioquic method that apply to a
# 1-RTT packet on a confirmed connection's one validated path: when aioquic changes the
# method, compare the two again and then update the digest.
RECEIVE_DATAGRAM_SHA256 = "3c7f29826050cbfe326c3a05400792ce8757bd0be07a2f41b6b1562f22588278"


def test_steady_receives_copy_aioquics_receive_datagram_as_it_is():
    source = inspect.getsource(QuicConnection.receive_datagram)
    assert hashlib.sha256(source.encode()).hexdigest() == RECEIVE_DATAGRAM_SHA256


def _short_packet(sender, receiver, first_byte_bits=0, payload=b"\x01"):
    """A 1-RTT packet from sender to receiver, protected with sender's keys, with extra
    bits set in its first byte (before protection)."""
    from aioquic.quic.packet import PACKET_FIXED_BIT

    pair = sender._cryptos[tls.Epoch.ONE_RTT]
    number = sender._packet_number
    sender._packet_number += 1
    header = (bytes([PACKET_FIXED_BIT | first_byte_bits | (pair.key_phase << 2) | 1])
              + receiver.host_cid + (number & 0xFFFF).to_bytes(2, "big"))
    return pair.encrypt_packet(header, payload + bytes(40), number)


@pytest.mark.parametrize("steady", [True, False])
def test_a_packet_with_reserved_bits_closes_the_connection_on_either_path(
        tmp_path, monkeypatch, steady):
    client, server, now, pump = _probing_pair(tmp_path)
    if not steady:  # aioquic's own receive_datagram for the same packet
        monkeypatch.setattr(server, "_receive_short", lambda *a: pytest.fail("steady"))
        monkeypatch.setattr(server, "_quic_logger", None)
        server._network_paths.append(server._network_paths[0])  # two paths: not steady
    packet = _short_packet(client, server, first_byte_bits=0x18)
    server.receive_datagram(packet, ("127.0.0.1", 5000), now=now)
    assert server._close_event.error_code == 0xA  # PROTOCOL_VIOLATION (RFC 9000 §20.1)


def test_duplicate_damaged_and_foreign_packets_change_nothing(tmp_path):
    client, server, now, pump = _probing_pair(tmp_path)
    space = server._spaces[tls.Epoch.ONE_RTT]
    packet = _short_packet(client, server)  # PING
    server.receive_datagram(packet, ("127.0.0.1", 5000), now=now)
    received = (list(space.ack_queue), space.largest_received_packet)
    authenticated = server.packets_authenticated
    damaged = packet[:-1] + bytes([packet[-1] ^ 1])
    unknown_cid = packet[:1] + bytes(8) + packet[9:]
    no_fixed_bit = bytes([packet[0] & ~0x40]) + packet[1:]
    for bad in (packet, damaged, unknown_cid, no_fixed_bit, packet[:5], packet[:30]):
        server.receive_datagram(bad, ("127.0.0.1", 5000), now=now)
    assert (list(space.ack_queue), space.largest_received_packet) == received
    assert server.packets_authenticated == authenticated
    assert server._close_event is None


def test_a_steady_connection_receives_on_the_short_path_and_the_stream_arrives(
        tmp_path, monkeypatch):
    client, server, now, pump = _probing_pair(tmp_path)
    short = []
    original = server._receive_short
    monkeypatch.setattr(server, "_receive_short",
                        lambda *a: short.append(1) or original(*a))
    _stream_arrives(client, server, now, pump)
    assert len(short) > 200
