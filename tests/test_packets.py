"""The compiled QUIC packet builder keeps aioquic's builder's output byte for byte.

`mahole._fast._packets` is a port of aioquic's `QuicPacketBuilder` (its pure-Python twin
is aioquic's own). Random sequences of packets and frames, under congestion and
anti-amplification limits, are built with both; every answer, every datagram and every
sent-packet record must be the same. The rest checks behaviour both must have.
"""

import random

import pytest
from aioquic._crypto import CryptoError
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.logger import QuicLogger
from aioquic.quic.packet import QuicFrameType, QuicPacketType
from aioquic.quic.packet_builder import QuicPacketBuilder, QuicPacketBuilderStop
from aioquic.tls import CipherSuite

from mahole._fast import implementations

PACKET_TYPES = [QuicPacketType.INITIAL, QuicPacketType.HANDSHAKE, QuicPacketType.ZERO_RTT,
                QuicPacketType.ONE_RTT]
FRAME_TYPES = [QuicFrameType.PADDING, QuicFrameType.PING, QuicFrameType.ACK,
               QuicFrameType.CRYPTO, QuicFrameType.STREAM_BASE | 6,
               QuicFrameType.MAX_DATA, QuicFrameType.PATH_CHALLENGE,
               QuicFrameType.PATH_RESPONSE, QuicFrameType.TRANSPORT_CLOSE,
               QuicFrameType.APPLICATION_CLOSE, QuicFrameType.DATAGRAM]


def _crypto(key_phase=0, cipher_suite=None, update_key=False, is_client=True):
    pair = CryptoPair()
    pair.setup_initial(cid=bytes(8), is_client=is_client, version=1)
    if cipher_suite is not None:  # 1-RTT keys of another suite (RFC 9001 §5.3)
        for context in (pair.send, pair.recv):
            context.setup(cipher_suite=cipher_suite, secret=bytes(range(48))[
                :48 if cipher_suite == CipherSuite.AES_256_GCM_SHA384 else 32], version=1)
    pair.send.key_phase = key_phase
    if update_key:
        pair.update_key()  # the next packet sent updates the keys (RFC 9001 §6)
    return pair


CRYPTOS = [dict(), dict(key_phase=1), dict(cipher_suite=CipherSuite.AES_256_GCM_SHA384),
           dict(cipher_suite=CipherSuite.CHACHA20_POLY1305_SHA256), dict(update_key=True)]


def _on_delivery(*args):
    pass


def _record(packet):
    return (packet.epoch, packet.in_flight, packet.is_ack_eliciting, packet.is_crypto_packet,
            packet.packet_number, packet.packet_type, packet.sent_bytes,
            packet.delivery_handlers, packet.quic_logger_frames)


def _script(seed):
    """One random session of builder calls, the same for both builders."""
    rng = random.Random(seed)
    kwargs = dict(host_cid=rng.randbytes(rng.choice([0, 8, 20])),
                  peer_cid=rng.randbytes(rng.choice([0, 8, 20])),
                  version=rng.choice([1, 0x6B3343CF]), is_client=rng.random() < 0.5,
                  max_datagram_size=rng.choice([1200, 1452, 1500, 9000]),
                  packet_number=rng.choice([0, 0xFFF0, 2**40]),
                  peer_token=rng.randbytes(rng.choice([0, 40])),
                  spin_bit=rng.random() < 0.5)
    limits = dict(max_flight_bytes=rng.choice([None, 0, 500, 3000, 100_000]),
                  max_total_bytes=rng.choice([None, 1000, 5000]))
    ops = []
    for _ in range(rng.randrange(5, 60)):
        roll = rng.random()
        if roll < 0.3:
            ops.append(("packet", rng.choice(PACKET_TYPES), rng.randrange(len(CRYPTOS))))
        elif roll < 0.85:
            ops.append(("frame", rng.choice(FRAME_TYPES), rng.choice([1, 8, 30, 200]),
                        rng.random() < 0.5, rng.choice([0, 1, 2, 5, rng.randrange(1500)])))
        elif roll < 0.95:
            ops.append(("query",))
        else:
            ops.append(("flush",))
    return kwargs, limits, ops


def _run(cls, kwargs, limits, ops, logger):
    crypto = [_crypto(**settings) for settings in CRYPTOS]
    trace = logger.start_trace(is_client=True, odcid=bytes(8)) if logger else None
    builder = cls(quic_logger=trace, **kwargs)
    builder.max_flight_bytes = limits["max_flight_bytes"]
    builder.max_total_bytes = limits["max_total_bytes"]
    answers, datagrams, packets = [], [], []
    open_packet = False
    for op in ops:
        try:
            if op[0] == "packet":
                builder.start_packet(op[1], crypto[op[2]])
                open_packet = True
                answers.append(("packet", builder.packet_number))
            elif op[0] == "frame":
                if not open_packet:
                    continue
                buf = builder.start_frame(op[1], capacity=op[2],
                                          handler=_on_delivery if op[3] else None,
                                          handler_args=(op[1],))
                room = builder.remaining_buffer_space
                buf.push_bytes(bytes(min(op[4], max(room, 0))))
                answers.append(("frame", room, builder.remaining_flight_space))
            elif op[0] == "query":
                answers.append(("query", builder.packet_number,
                                builder.packet_is_empty if open_packet else None,
                                builder.remaining_buffer_space if open_packet else None))
            else:
                got, sent = builder.flush()
                datagrams += got
                packets += [_record(p) for p in sent]
                open_packet = False
                answers.append(("flush", len(got), len(sent)))
        except QuicPacketBuilderStop:
            answers.append(("stop", op[0]))
            if op[0] == "packet":  # the previous packet was ended, no new one started
                open_packet = False
    got, sent = builder.flush()
    return answers, datagrams + got, packets + [_record(p) for p in sent], builder.packet_number


# The twin is aioquic's builder itself: only the compiled one is compared (conftest's
# `builder` fixture fails the run when MAHOLE_REQUIRE_EXTENSIONS=1 and it is missing).
COMPILED = implementations("packets").get("compiled")


@pytest.mark.skipif(COMPILED is None, reason="the compiled builder is not built")
@pytest.mark.parametrize("with_logger", [False, True])
@pytest.mark.parametrize("seed", range(150))
def test_the_compiled_builder_builds_what_aioquics_builds(seed, with_logger):
    kwargs, limits, ops = _script(seed)
    want = _run(QuicPacketBuilder, kwargs, limits, ops, QuicLogger() if with_logger else None)
    got = _run(COMPILED.PacketBuilder, kwargs, limits, ops,
               QuicLogger() if with_logger else None)
    assert got == want


@pytest.fixture
def builder_cls(packets):
    return packets.PacketBuilder


def _one_rtt(cls, **overrides):
    kwargs = dict(host_cid=bytes(8), peer_cid=bytes(range(8)), version=1, is_client=True,
                  max_datagram_size=1200)
    kwargs.update(overrides)
    return cls(**kwargs)


def test_a_short_header_packet_is_a_datagram_of_its_own(builder_cls):
    builder = _one_rtt(builder_cls, packet_number=7)
    crypto = _crypto()
    for _ in range(3):
        builder.start_packet(QuicPacketType.ONE_RTT, crypto)
        builder.start_frame(QuicFrameType.STREAM_BASE, capacity=100).push_bytes(bytes(1000))
    datagrams, packets = builder.flush()
    assert [len(d) for d in datagrams] == [1000 + 1 + 3 + 8 + 16] * 3
    assert [p.packet_number for p in packets] == [7, 8, 9]
    assert all(p.in_flight and p.is_ack_eliciting for p in packets)
    assert builder.packet_number == 10


def test_an_ack_only_packet_is_neither_in_flight_nor_ack_eliciting(builder_cls):
    builder = _one_rtt(builder_cls)
    builder.start_packet(QuicPacketType.ONE_RTT, _crypto())
    builder.start_frame(QuicFrameType.ACK, capacity=8).push_bytes(bytes(8))
    [_], [packet] = builder.flush()
    assert not packet.in_flight and not packet.is_ack_eliciting


def test_a_full_congestion_window_stops_frames_in_flight_but_not_acks(builder_cls):
    builder = _one_rtt(builder_cls)
    builder.max_flight_bytes = 0
    builder.start_packet(QuicPacketType.ONE_RTT, _crypto())
    with pytest.raises(QuicPacketBuilderStop):
        builder.start_frame(QuicFrameType.PING)
    builder.start_frame(QuicFrameType.ACK, capacity=8).push_bytes(bytes(8))
    assert len(builder.flush()[0]) == 1


def test_path_challenge_pads_the_datagram_to_the_full_size(builder_cls):
    builder = _one_rtt(builder_cls)
    builder.start_packet(QuicPacketType.ONE_RTT, _crypto())
    builder.start_frame(QuicFrameType.PATH_CHALLENGE, capacity=9).push_bytes(bytes(8))
    [datagram], [packet] = builder.flush()
    assert len(datagram) == 1200 and packet.in_flight


def test_an_empty_packet_is_cancelled_and_keeps_its_number(builder_cls):
    builder = _one_rtt(builder_cls, packet_number=3)
    builder.start_packet(QuicPacketType.ONE_RTT, _crypto())
    assert builder.packet_is_empty
    assert builder.flush() == ([], [])
    assert builder.packet_number == 3


def test_a_datagram_too_small_for_a_header_stops_the_packet(builder_cls):
    builder = _one_rtt(builder_cls, max_datagram_size=1200)
    builder.max_total_bytes = 10  # anti-amplification: almost nothing may be sent
    with pytest.raises(QuicPacketBuilderStop):
        builder.start_packet(QuicPacketType.ONE_RTT, _crypto())


# Decryption ---------------------------------------------------------------------------------

def _outcome(call):
    try:
        return "ok", call()
    except Exception as exc:  # noqa: BLE001 - the errors must be the same too
        return type(exc).__name__, str(exc)


@pytest.mark.skipif(COMPILED is None, reason="the compiled module is not built")
@pytest.mark.parametrize("seed", range(100))
def test_the_compiled_decrypter_decrypts_what_aioquic_does(seed):
    """Packets of every key kind, whole, damaged and cut short, decrypted by two receivers
    alike: one with the pair's own method, one with the compiled decrypter; the same
    results and errors, and the same keys afterwards (a key update goes through)."""
    rng = random.Random(seed)
    settings = CRYPTOS[seed % len(CRYPTOS)]
    sender = _crypto(**settings)
    builder = QuicPacketBuilder(host_cid=bytes(8), peer_cid=bytes(8), version=1,
                                is_client=True, max_datagram_size=1200,
                                packet_number=rng.choice([0, 0xFFF0, 2**40]))
    first_number = builder.packet_number
    for _ in range(rng.randrange(1, 8)):
        builder.start_packet(QuicPacketType.ONE_RTT, sender)
        builder.start_frame(QuicFrameType.STREAM_BASE, capacity=10).push_bytes(
            rng.randbytes(rng.randrange(0, 1100)))
    datagrams, _ = builder.flush()
    receivers = [_crypto(**{k: v for k, v in settings.items() if k == "cipher_suite"},
                         is_client=False) for _ in range(2)]
    want, got = receivers[0].decrypt_packet, COMPILED.decrypter(receivers[1])
    packets = []
    for datagram in datagrams:
        packets.append(datagram)
        damaged = bytearray(datagram)
        damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        packets.append(bytes(damaged))
        packets.append(datagram[:rng.randrange(len(datagram))])
    for number, packet in enumerate(packets):
        expected = max(0, first_number + number // 3 + rng.choice([0, 0, 1, -1, 40000]))
        assert _outcome(lambda: got(packet, 9, expected)) == \
            _outcome(lambda: want(packet, 9, expected))
        assert receivers[1].recv.key_phase == receivers[0].recv.key_phase


def test_a_connections_decrypter_returns_the_pairs_results(packets):
    sender, receiver = _crypto(), _crypto(is_client=False)
    builder = QuicPacketBuilder(host_cid=bytes(8), peer_cid=bytes(8), version=1,
                                is_client=True, max_datagram_size=1200)
    builder.start_packet(QuicPacketType.ONE_RTT, sender)
    builder.start_frame(QuicFrameType.PING)
    [datagram], _ = builder.flush()
    header, payload, number = packets.decrypter(receiver)(datagram, 9, 0)
    assert number == 0 and payload.startswith(bytes([QuicFrameType.PING]))
    assert header[1:9] == bytes(8)
    with pytest.raises(CryptoError):
        packets.decrypter(receiver)(datagram[:-1] + b"x", 9, 0)
