"""A peer that withholds byte 0 of a stream cannot make the receiver buffer without bound.

Before, stream and connection credit was granted from the highest offset seen, gaps
included, and aioquic doubled MAX_DATA whenever half of it was used: +403 MB at the
intermediate in 14 s, +300 MB at a connector. Credit now follows the data delivered in
order, so what a gap can pin is one stream window per stream and one connection window in
all; a peer that ignores credit is closed with FLOW_CONTROL_ERROR (RFC 9000 §4.1).

The two ends are aioquic connections pumped against each other in memory, as aioquic's own
tests do: no sockets, no clock, so the attack runs as far as it can every time.
"""

import pytest
from aioquic.quic import events as qe
from aioquic.quic.packet import QuicErrorCode
from quic_pair import handshake, make_pair, pump

STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 1024 * 1024


@pytest.fixture
def pair(tmp_path):
    return make_pair(tmp_path, max_stream_data=STREAM_WINDOW, max_data=CONNECTION_WINDOW)


def buffered(server):
    """Bytes the server holds for streams, received but not delivered (the gap's cost)."""
    return sum(len(stream.receiver._buffer) for stream in server._streams.values())


def with_gap_at_zero(client, stream_id):
    """The attacker's stream starts at offset 1: byte 0 never comes."""
    stream = client._get_or_create_stream_for_send(stream_id)
    stream.sender._buffer_start = stream.sender._buffer_stop = 1
    return stream


def test_a_gap_at_byte_zero_pins_at_most_one_window(pair):
    client, server = pair
    now = handshake(client, server)
    for stream_id in (0, 4, 8):
        with_gap_at_zero(client, stream_id)
    chunk = bytes(64 * 1024)
    peak = 0
    for _ in range(400):  # 3 streams x 25 MiB offered, far past every window
        for stream_id in (0, 4, 8):
            client.send_stream_data(stream_id, chunk)
        pump(client, server, now, rounds=4)
        now += 0.005
        peak = max(peak, buffered(server))
    assert peak <= CONNECTION_WINDOW
    for stream in server._streams.values():
        assert stream.max_stream_data_local <= STREAM_WINDOW  # never moved: nothing delivered
    assert server._local_max_data.value <= CONNECTION_WINDOW


def test_a_peer_that_ignores_credit_is_closed_with_flow_control_error(pair):
    client, server = pair
    now = handshake(client, server)
    stream = with_gap_at_zero(client, 0)
    stream.max_stream_data_remote = 1 << 40  # pretend the server granted everything
    client._remote_max_data = 1 << 40
    events = []
    for _ in range(200):
        client.send_stream_data(0, bytes(64 * 1024))
        events += pump(client, server, now, rounds=4)
        now += 0.005
        if any(isinstance(e, qe.ConnectionTerminated) for e in events):
            break
    assert buffered(server) <= STREAM_WINDOW
    assert server.local_close is not None
    assert server.local_close[0] == QuicErrorCode.FLOW_CONTROL_ERROR


def test_in_order_data_keeps_flowing_past_many_windows(pair):
    """The bound costs an honest peer nothing: credit follows what is delivered."""
    client, server = pair
    now = handshake(client, server)
    total = 0
    for _ in range(200):
        client.send_stream_data(0, bytes(64 * 1024))
        for event in pump(client, server, now, rounds=4):
            if isinstance(event, qe.StreamDataReceived) and event.stream_id == 0:
                total += len(event.data)
        now += 0.005
    assert total >= 8 * CONNECTION_WINDOW
