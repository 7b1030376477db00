"""The compiled `write_application` fills packets exactly as aioquic's
`QuicConnection._write_application` does.

Two in-memory connections play a random script (streams written, ended, reset and stopped;
DATAGRAM frames, PINGs, probes; small flow-control windows; lost datagrams; timers) on a fake
clock, once with each implementation of `mahole._fast._packets` (the compiled builder and
`write_application`, or aioquic's own). Every packet each side sends — its size, flags and
the frames it carries, as the delivery records loss recovery keeps — and every event each side
sees must be the same. The certificates are Ed25519 ones, whose signatures have one length,
so that the handshake, and all that follows it, takes the same bytes in every run.
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

CLIENT_ADDR, SERVER_ADDR = ("127.0.0.1", 5000), ("127.0.0.1", 4478)


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


def _play(seed, module, monkeypatch):
    """The trace of one scripted session with `module`'s builder and write_application."""
    monkeypatch.setattr(qc, "PacketBuilder", module.PacketBuilder)
    monkeypatch.setattr(qc, "write_application", module.write_application)
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

    def pump():
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
            for data, _addr in datagrams:
                if rng.random() >= loss:
                    receiver.receive_datagram(data, source, now=now)
        for side in (client, server):
            trace.extend(_event_record(event) for event in iter(side.next_event, None))

    while not client._handshake_confirmed or not server._handshake_complete:
        pump()
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
            pump()
            now += rng.choice([0.0005, 0.002, 0.01, 0.05])
    for _ in range(200):  # drain what is left, loss and all
        pump()
        now += 0.01
    return trace


@pytest.mark.parametrize("seed", range(16))
def test_compiled_write_application_fills_the_same_packets_as_aioquic(seed, monkeypatch):
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
