"""The aioquic internals that `mahole.connection` adapts to are still there and still mean
what the adapter assumes. This fails (never skips) when an aioquic release changes them:
then fix the adapter and widen the version pin in pyproject.toml."""

import inspect

import aioquic
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.recovery import QuicPacketPacer

from mahole import connection as qc
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
