"""A steady connection's packets are filled and read exactly as aioquic does it.

`mahole._fast._packets` ports aioquic's `QuicConnection._write_application` (what goes in a
steady connection's packets), `_payload_received` (how a 1-RTT packet's frames are read) and
`QuicPacketRecovery.on_ack_received` (what an ACK does); its pure twin is aioquic's own
code. Two in-memory connections play a random script (streams
written, ended, reset and stopped; DATAGRAM frames, PINGs, probes; small flow-control
windows; lost datagrams; timers) on a fake clock, once with each implementation. Every packet
each side sends — its size, flags and the frames it carries, as the delivery records loss
recovery keeps —, every event each side sees, and the congestion window, RTT estimate and
send buffers after each send must be the same. The certificates are
Ed25519 ones, whose signatures have one length, so that the handshake, and all that follows
it, takes the same bytes in every run.
"""

import datetime
import random

import pytest
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.stream import QuicStream
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from mahole import connection as qc
from mahole._fast import implementations
from quic_pair import CLIENT_ADDR, SERVER_ADDR, pump



def _certificate(name):
    key = ed25519.Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(1).not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=3650)).sign(key, None))
    return cert, key


CERTIFICATES = {name: _certificate(name) for name in ("client", "server")}


def _pair(settings):
    def config(is_client):
        cert, key = CERTIFICATES["client" if is_client else "server"]
        configuration = QuicConfiguration(
            is_client=is_client, alpn_protocols=["mahole-test"], idle_timeout=600.0,
            max_datagram_frame_size=65536, **settings)
        configuration.certificate, configuration.private_key = cert, key
        configuration.verify_mode = 0  # ssl.CERT_NONE: nothing here is about trust
        return configuration

    client = qc.NodeQuicConnection(configuration=config(True))
    client.connect(SERVER_ADDR, now=0.0)
    server = qc.NodeQuicConnection(
        configuration=config(False),
        original_destination_connection_id=client.original_destination_connection_id)
    return client, server


def _frame_record(handler, args):
    """A delivery record without object identities: the frame's handler and plain args."""
    plain = tuple(arg if isinstance(arg, (int, float, bool, bytes, type(None)))
                  else type(arg).__name__ for arg in args)
    return getattr(handler, "__qualname__", type(handler).__name__), plain


def _event_record(event):
    """An event, with data as its length and digest and connection IDs (random) as their
    length."""
    fields = {key: (len(value), hash(value) if key == "data" else None)
              if isinstance(value, bytes) else value for key, value in vars(event).items()}
    return type(event).__name__, sorted(fields.items(), key=lambda item: item[0])


def _sender_state(connection):
    """What acknowledgements change: congestion control, RTT, loss recovery, send buffers."""
    loss = connection._loss
    return (loss.congestion_window, loss.bytes_in_flight, loss._rtt_smoothed,
            loss._rtt_variance, loss._rtt_min, loss._pto_count,
            [len(space.sent_packets) for space in connection._spaces.values()],
            [(i, s.sender._buffer_start, len(s.sender._buffer), s.sender.is_finished,
              list(s.sender._acked)) for i, s in sorted(connection._streams.items())])


def _play(seed, module, monkeypatch):
    """The trace of one scripted session with `module`'s builder and write_application."""
    monkeypatch.setattr(qc, "PacketBuilder", module.PacketBuilder)
    monkeypatch.setattr(qc, "write_application", module.write_application)
    monkeypatch.setattr(qc, "payload_received", module.payload_received)
    monkeypatch.setattr(qc, "ack_receiver", module.ack_receiver)
    # aioquic puts the streams a packet served at the back of its queue in the order of a
    # set of them, which follows their hashes, by default their addresses: by stream ID,
    # every run serves them in one order.
    monkeypatch.setattr(QuicStream, "__hash__", lambda stream: stream.stream_id)
    rng = random.Random(seed)
    settings = dict(max_stream_data=rng.choice([4096, 65536, 1 << 20]),
                    max_data=rng.choice([16384, 1 << 20]),
                    max_datagram_size=rng.choice([1200, 1452]))
    client, server = _pair(settings)
    trace = []
    now = 0.0
    loss = 0.0  # no loss until the handshake is over: it is the same either way

    def exchange():
        """Timers, then datagrams both ways once, each send traced; the events after."""
        for sender, receiver, source in ((client, server, CLIENT_ADDR),
                                         (server, client, SERVER_ADDR)):
            timer = sender.get_timer()
            if timer is not None and timer <= now:
                sender.handle_timer(now)
            sent = {pn for space in sender._spaces.values() for pn in space.sent_packets}
            datagrams = sender.datagrams_to_send(now=now)
            for space in sender._spaces.values():
                for pn, packet in sorted(space.sent_packets.items()):
                    if pn not in sent:
                        trace.append((sender is client, pn, packet.sent_bytes,
                                      packet.in_flight, packet.is_ack_eliciting,
                                      [_frame_record(h, a) for h, a in
                                       packet.delivery_handlers]))
            trace.append([len(data) for data, _addr in datagrams])
            trace.append(_sender_state(sender))
            for data, _addr in datagrams:
                if rng.random() >= loss:
                    receiver.receive_datagram(data, source, now=now)
        for side in (client, server):
            trace.extend(_event_record(event) for event in iter(side.next_event, None))

    while not client._handshake_confirmed or not server._handshake_complete:
        exchange()
        now += 0.005
        assert now < 5, "no handshake"
    assert client._steady() and server._steady()
    loss = rng.choice([0.0, 0.05, 0.2])
    streams = {client: [0, 4, 8], server: [1, 5]}
    ended = set()
    for _ in range(160):
        side = rng.choice([client, server])
        stream_id = rng.choice(streams[side])
        op = rng.random()
        try:
            if op < 0.45 and stream_id not in ended:
                end = rng.random() < 0.1
                side.send_stream_data(stream_id, rng.randbytes(rng.randrange(1, 60000)),
                                      end_stream=end)
                if end:
                    ended.add(stream_id)
            elif op < 0.5 and stream_id not in ended:
                side.reset_stream(stream_id, error_code=7)
                ended.add(stream_id)
            elif 0.5 <= op < 0.55:
                side.send_datagram_frame(rng.randbytes(rng.randrange(1, 900)))
            elif 0.55 <= op < 0.58:
                side.send_ping(rng.randrange(1000))
            elif 0.58 <= op < 0.6:
                side.send_probe()
            elif 0.6 <= op < 0.62:  # a stream the peer opened: stop receiving on it
                side.stop_stream(rng.choice(streams[client if side is server else server]),
                                 error_code=9)
        except (ValueError, RuntimeError) as exc:  # e.g. a stream the peer stopped
            trace.append(("refused", type(exc).__name__, str(exc)))
        for _ in range(rng.randrange(1, 4)):
            exchange()
            now += rng.choice([0.0005, 0.002, 0.01, 0.05])
    for _ in range(200):  # drain what is left, loss and all
        exchange()
        now += 0.01
    return trace


@pytest.mark.parametrize("seed", range(16))
def test_the_compiled_module_fills_and_reads_packets_as_aioquic_does(seed, monkeypatch):
    modules = implementations("packets")
    reference = _play(seed, modules["python"], monkeypatch)
    assert sum(1 for record in reference if type(record) is tuple
               and type(record[0]) is bool) > 100  # many packets: the script did its work
    for name, module in modules.items():
        assert _play(seed, module, monkeypatch) == reference, name


def test_the_reference_trace_is_the_same_in_every_run(monkeypatch):
    """What makes the comparison above meaningful: one implementation, one seed, one trace."""
    reference = implementations("packets")["python"]
    assert _play(3, reference, monkeypatch) == _play(3, reference, monkeypatch)


def _varint(value, size=None):
    """RFC 9000 §16 encoding, in `size` bytes if given (a longer one than needed)."""
    size = size or (1 if value < 64 else 2 if value < 16384 else 4 if value < 2**30 else 8)
    prefix = {1: 0, 2: 0x40, 4: 0x80, 8: 0xC0}[size]
    return (value | (prefix << (8 * size - 8))).to_bytes(size, "big")


def _hostile_payload(rng):
    """Frames as a peer might send them, well or badly formed."""
    payload = b""
    for _ in range(rng.randrange(0, 4)):
        kind = rng.random()
        if kind < 0.5:  # STREAM, any flags, sometimes past the limits
            frame_type = 0x08 | rng.randrange(8)
            stream_id = rng.choice([0, 1, 2, 3, 4, 5, 8, 12, 14, 400, 2**40])
            offset = rng.choice([0, 1, 100, 5000, 70000, 2**62 - 10])
            data = rng.randbytes(rng.choice([0, 1, 30, 500]))
            frame = _varint(frame_type) + _varint(stream_id, rng.choice([None, 8]))
            if frame_type & 4:
                frame += _varint(offset)
            if frame_type & 2:
                frame += _varint(len(data) + rng.choice([0, 0, 0, 3]))
            payload += frame + data
        elif kind < 0.6:
            payload += bytes(rng.randrange(1, 4))  # PADDING
        elif kind < 0.7:
            payload += b"\x01"  # PING
        elif kind < 0.8:  # STOP_SENDING, RESET_STREAM, MAX_DATA, MAX_STREAM_DATA
            payload += rng.choice([b"\x05" + _varint(rng.choice([0, 1, 4, 12])) + b"\x07",
                                   b"\x04\x04\x07" + _varint(rng.randrange(9000)),
                                   b"\x10" + _varint(rng.randrange(2**20)),
                                   b"\x11\x01" + _varint(rng.randrange(2**20))])
        elif kind < 0.85:  # ACK of packets sent, not sent, or far beyond
            largest = rng.choice([0, 3, 10, 20, 40, 2**30])
            first = rng.randrange(0, min(largest, 30) + 1)
            frame = b"\x02" + _varint(largest) + _varint(rng.randrange(100)) + b"\x01"
            payload += frame + _varint(first) + _varint(rng.randrange(3)) + _varint(
                rng.randrange(5))
        elif kind < 0.9:
            payload += rng.choice([b"\x40", b"\x21", b"\x1f", b"\xff", b"\x06\x00"])  # bad
        else:
            payload += rng.randbytes(rng.randrange(1, 12))  # noise
    if rng.random() < 0.2 and payload:
        payload = payload[:rng.randrange(len(payload))]  # cut short
    return payload


def _read_hostile(seed, module, monkeypatch):
    from aioquic import tls
    from aioquic.quic.connection import QuicConnectionError, QuicReceiveContext

    monkeypatch.setattr(QuicStream, "__hash__", lambda stream: stream.stream_id)
    monkeypatch.setattr(qc, "ack_receiver", module.ack_receiver)
    rng = random.Random(seed)
    client, server = _pair(dict(max_stream_data=65536, max_data=1 << 20))
    now = 0.0
    while not client._handshake_confirmed or not server._handshake_complete:
        pump(client, server, now)
        now += 0.005
    trace = []
    for sender in (client, server):  # stream data in flight, for the ACKs
        sender.send_stream_data(4 if sender is client else 1, rng.randbytes(30000))
        trace.append([len(data) for data, _addr in sender.datagrams_to_send(now=now)])
    for _ in range(300):
        side = rng.choice([client, server])
        payload = _hostile_payload(rng)
        context = QuicReceiveContext(
            epoch=tls.Epoch.ONE_RTT, host_cid=side.host_cid,
            network_path=side._network_paths[0], quic_logger_frames=None, time=now,
            version=None)
        try:
            outcome = module.payload_received(side, context, payload)
        except QuicConnectionError as exc:
            outcome = (exc.error_code, exc.frame_type, exc.reason_phrase)
        trace.append((side is client, payload, outcome,
                      [_event_record(event) for event in iter(side.next_event, None)],
                      side._local_max_data.used,
                      sorted((i, s.receiver.highest_offset, s.receiver._buffer_start,
                              len(s.receiver._buffer))
                             for i, s in side._streams.items()),
                      _sender_state(side)))
    return trace


@pytest.mark.parametrize("seed", range(6))
def test_hostile_payloads_are_read_as_aioquic_reads_them(seed, monkeypatch):
    """Malformed, truncated, out-of-order, over-limit and unknown frames, ACKs of packets
    never sent: the same answer (the same error, code and reason included), the same events,
    the same stream, congestion and RTT state."""
    modules = implementations("packets")
    reference = _read_hostile(seed, modules["python"], monkeypatch)
    outcomes = [record[2] for record in reference if type(record) is tuple]
    errors = {outcome[1] for outcome in outcomes if len(outcome) == 3}
    assert len(errors) > 3 and 2 in errors  # ACK frames among those refused
    for name, module in modules.items():
        assert _read_hostile(seed, module, monkeypatch) == reference, name
