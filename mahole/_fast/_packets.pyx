# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""QUIC packets, compiled: aioquic 1.7's packet builder with its state in C, and packet
protection (RFC 9001 §5) without aioquic's Python wrappers, in both directions.

Twin of `_packets_py.py`, which is aioquic's own code: this module keeps its API, its
decisions and its output byte for byte (tests/test_packets.py builds and decrypts the same
packets with both and compares). It exists because at 1,200-byte packets building and
protecting a packet is the largest share of a sender's per-packet Python work, and removing
protection a large share of a receiver's; mahole.connection uses it for 1-RTT packets.

`write_application` and `payload_received` are aioquic's `QuicConnection._write_application`
(what fills a steady connection's packets) and `_payload_received` (what reads a 1-RTT
packet's frames), compiled: pacing, STREAM frames and frame types in C, every rarer frame
by the connection's own methods. `ack_receiver` is `QuicPacketRecovery.on_ack_received`
with acknowledged STREAM data handled in C. tests/test_steady_packets.py compares the
packets sent, the events, the errors and the congestion and RTT state, hostile payloads
included.

`PacketBuilder` keeps aioquic's `Buffer` handed to frame writers, the `QuicSentPacket`
records loss recovery keeps and `QuicPacketBuilderStop`. What it changes is only where its
own counters and flags live: a packet's ack-eliciting / in-flight / crypto flags are kept in
C while the packet is open and written to its `QuicSentPacket` when it ends (nothing reads
them before).

Protection uses the cipher objects of aioquic's crypto contexts (`_Keys`): the AEAD call
with a nonce made in C, and the header protection mask applied in C. With ChaCha20 keys, a
key update due, or a packet in the other key phase, the pair's own methods do the work.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize

from types import MethodType as _MethodType

from cryptography.exceptions import InvalidTag

from aioquic._crypto import AEAD, AEAD_NONCE_LENGTH as _NONCE_LENGTH, CryptoError
from aioquic._crypto import HeaderProtection
from aioquic.quic.crypto import CryptoPair
from aioquic._crypto import SAMPLE_LENGTH as _SAMPLE_LENGTH
from aioquic.buffer import UINT_VAR_MAX, Buffer, BufferReadError, size_uint_var
from aioquic.quic.connection import QuicConnectionError
from aioquic.quic.events import StreamDataReceived as _StreamDataReceived
from aioquic.quic.packet import (
    NON_ACK_ELICITING_FRAME_TYPES as _NON_ACK_ELICITING_FRAME_TYPES,
    PROBING_FRAME_TYPES as _PROBING_FRAME_TYPES,
    PACKET_FIXED_BIT,
    PACKET_NUMBER_MAX_SIZE,
    QuicErrorCode,
    QuicFrameType,
    QuicPacketType,
    QuicStreamFrame as _QuicStreamFrame,
    decode_packet_number,
    encode_long_header_first_byte,
)
from aioquic.quic.packet_builder import (
    PACKET_NUMBER_SEND_SIZE,
    QuicDeliveryState,
    QuicPacketBuilderStop,
    QuicSentPacket,
)
from aioquic.quic.recovery import QuicPacketPacer
from aioquic.quic.stream import FinalSizeError as _FinalSizeError
from aioquic.quic.stream import QuicStreamReceiver as _QuicStreamReceiver
from aioquic.quic.stream import QuicStreamSender as _QuicStreamSender
from aioquic.quic.stream import StreamFinishedError as _StreamFinishedError
from aioquic.tls import Epoch

# Frame types whose handling differs (RFC 9000 §12.4 and §13.2.1: ACK, PADDING and
# CONNECTION_CLOSE do not elicit ACKs; ACK and CONNECTION_CLOSE are not in flight,
# RFC 9002 §2), read from aioquic's enum so the two builders cannot disagree.
cdef long FT_PADDING = QuicFrameType.PADDING
cdef long FT_ACK = QuicFrameType.ACK
cdef long FT_ACK_ECN = QuicFrameType.ACK_ECN
cdef long FT_CRYPTO = QuicFrameType.CRYPTO
cdef long FT_TRANSPORT_CLOSE = QuicFrameType.TRANSPORT_CLOSE
cdef long FT_APPLICATION_CLOSE = QuicFrameType.APPLICATION_CLOSE
cdef long FT_PATH_CHALLENGE = QuicFrameType.PATH_CHALLENGE
cdef long FT_PATH_RESPONSE = QuicFrameType.PATH_RESPONSE
cdef Py_ssize_t PN_MAX = PACKET_NUMBER_MAX_SIZE
cdef Py_ssize_t PN_SEND = PACKET_NUMBER_SEND_SIZE
cdef int FIXED_BIT = PACKET_FIXED_BIT
# RFC 9001 §5.3 (the AEAD nonce is the IV's length, 12 bytes) and §5.4.2 (a 16-byte sample)
cdef Py_ssize_t AEAD_NONCE_LENGTH = _NONCE_LENGTH
cdef Py_ssize_t SAMPLE_LENGTH = _SAMPLE_LENGTH

_INITIAL = QuicPacketType.INITIAL
_HANDSHAKE = QuicPacketType.HANDSHAKE
_ZERO_RTT = QuicPacketType.ZERO_RTT
_ONE_RTT = QuicPacketType.ONE_RTT
_EPOCH_INITIAL = Epoch.INITIAL
_EPOCH_HANDSHAKE = Epoch.HANDSHAKE
_EPOCH_ONE_RTT = Epoch.ONE_RTT


cdef bytes _mask_header(bytes header, bytes mask):
    """Header protection applied (RFC 9001 §5.4.1): the first byte's low bits and the
    packet number bytes XORed with the mask."""
    cdef Py_ssize_t length = len(header)
    cdef bytes out = PyBytes_FromStringAndSize(<char *>header, length)
    cdef unsigned char *h = <unsigned char *>PyBytes_AS_STRING(out)
    cdef const unsigned char *m = <const unsigned char *>PyBytes_AS_STRING(mask)
    cdef Py_ssize_t pn_length = (h[0] & 0x03) + 1
    cdef Py_ssize_t pn_offset = length - pn_length
    cdef Py_ssize_t i
    if h[0] & 0x80:
        h[0] ^= m[0] & 0x0F
    else:
        h[0] ^= m[0] & 0x1F
    for i in range(pn_length):
        h[pn_offset + i] ^= m[1 + i]
    return out


cdef class _Keys:
    """The AES-GCM packet protection keys of one aioquic crypto context, as its cipher
    objects: taken again whenever the context's AEAD or HeaderProtection object is another
    one (a key update replaces them)."""

    cdef object aead_owner      # aioquic's AEAD and HeaderProtection objects last seen
    cdef object hp_owner
    cdef bint usable
    cdef object aead            # cryptography's AESGCM
    cdef bytes iv
    cdef object hp              # cryptography's AES-ECB encryptor (the mask)

    cdef bint take(self, context) except -1:
        """Whether `context`'s current keys are AES-GCM ones, held here."""
        aead = context.aead
        hp = context.hp
        if aead is self.aead_owner and hp is self.hp_owner:
            return self.usable
        self.aead_owner = aead
        self.hp_owner = hp
        self.usable = (type(aead) is AEAD and type(hp) is HeaderProtection
                       and not hp._is_chacha20)
        if self.usable:
            self.aead = aead._aead
            self.iv = (<object>aead._iv).to_bytes(AEAD_NONCE_LENGTH, "big")
            self.hp = hp._encryptor
        return self.usable

    cdef bytes nonce(self, packet_number):
        """The IV with the packet number XORed into its low bytes (RFC 9001 §5.3)."""
        cdef unsigned long long pn = packet_number
        cdef bytes nonce = PyBytes_FromStringAndSize(<char *>self.iv, AEAD_NONCE_LENGTH)
        cdef unsigned char *out = <unsigned char *>PyBytes_AS_STRING(nonce)
        cdef int i
        for i in range(8):
            out[AEAD_NONCE_LENGTH - 1 - i] ^= (pn >> (8 * i)) & 0xFF
        return nonce


cdef class _Decrypter:
    """A CryptoPair's decrypt_packet without aioquic's Python wrappers (RFC 9001 §5.4, §5.3,
    RFC 9000 §A.3): the same results and the same errors."""

    cdef object pair
    cdef _Keys keys

    def __cinit__(self, pair):
        self.pair = pair
        self.keys = _Keys()

    def __call__(self, bytes packet, Py_ssize_t encrypted_offset,
                 expected_packet_number):
        pair = self.pair
        context = pair.recv
        cdef _Keys keys = self.keys
        if not keys.take(context):  # no keys yet (KeyUnavailableError) or ChaCha20 ones
            return CryptoPair.decrypt_packet(pair, packet, encrypted_offset,
                                             expected_packet_number)
        cdef Py_ssize_t length = len(packet)
        cdef Py_ssize_t sample_offset = encrypted_offset + PN_MAX
        if sample_offset + SAMPLE_LENGTH > length:
            raise CryptoError("Packet is too short to sample")
        mask = keys.hp.update(packet[sample_offset:sample_offset + SAMPLE_LENGTH])
        cdef const unsigned char *m = <const unsigned char *>PyBytes_AS_STRING(mask)
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(packet)
        cdef unsigned char first = p[0]
        if first & 0x80:
            first ^= m[0] & 0x0F
        else:
            first ^= m[0] & 0x1F
        cdef Py_ssize_t pn_length = (first & 0x03) + 1
        if not (first & 0x80) and ((first & 4) >> 2) != <int>context.key_phase:
            # the peer's next key phase: aioquic's own path derives and applies it
            return CryptoPair.decrypt_packet(pair, packet, encrypted_offset,
                                             expected_packet_number)
        cdef bytes header = PyBytes_FromStringAndSize(<const char *>p,
                                                      encrypted_offset + pn_length)
        cdef unsigned char *h = <unsigned char *>PyBytes_AS_STRING(header)
        cdef unsigned long long truncated = 0
        cdef Py_ssize_t i
        h[0] = first
        for i in range(pn_length):
            h[encrypted_offset + i] ^= m[1 + i]
            truncated = (truncated << 8) | h[encrypted_offset + i]
        packet_number = decode_packet_number(truncated, pn_length * 8,
                                             expected_packet_number)
        try:
            payload = keys.aead.decrypt(keys.nonce(packet_number),
                                        packet[encrypted_offset + pn_length:], header)
        except InvalidTag as exc:
            raise CryptoError(str(exc))
        return header, payload, packet_number


def decrypter(pair):
    """What to call instead of `pair.decrypt_packet` (it keeps the pair's results)."""
    return _Decrypter(pair)


cdef inline bint _not_in_flight(long frame_type):
    return (frame_type == FT_ACK or frame_type == FT_ACK_ECN
            or frame_type == FT_TRANSPORT_CLOSE or frame_type == FT_APPLICATION_CLOSE)


cdef inline bint _not_ack_eliciting(long frame_type):
    return _not_in_flight(frame_type) or frame_type == FT_PADDING


cdef class PacketBuilder:
    """Drop-in for aioquic's QuicPacketBuilder (same keyword arguments and members)."""

    cdef public object max_flight_bytes
    cdef public object max_total_bytes
    cdef public object quic_logger_frames
    cdef public bint _datagram_needs_padding

    cdef bytes _host_cid
    cdef bint _is_client
    cdef bytes _peer_cid
    cdef bytes _peer_token
    cdef object _quic_logger
    cdef int _spin_bit
    cdef object _version

    cdef list _datagrams
    cdef Py_ssize_t _datagram_flight_bytes
    cdef bint _datagram_init
    cdef list _packets
    cdef Py_ssize_t _flight_bytes
    cdef Py_ssize_t _total_bytes

    cdef Py_ssize_t _header_size
    cdef object _packet            # QuicSentPacket or None
    cdef bint _pkt_ack_eliciting
    cdef bint _pkt_in_flight
    cdef bint _pkt_crypto
    cdef object _packet_crypto     # CryptoPair
    cdef Py_ssize_t _tag_size
    cdef object _packet_number     # a Python int: packet numbers go up to 2**62
    cdef Py_ssize_t _packet_start
    cdef object _packet_type
    cdef bint _one_rtt

    cdef _Keys _keys

    cdef object _buffer
    cdef Py_ssize_t _buffer_capacity
    cdef Py_ssize_t _flight_capacity

    def __init__(self, *, bytes host_cid, bytes peer_cid, version, bint is_client,
                 Py_ssize_t max_datagram_size, packet_number=0, bytes peer_token=b"",
                 quic_logger=None, spin_bit=False):
        self.max_flight_bytes = None
        self.max_total_bytes = None
        self.quic_logger_frames = None

        self._host_cid = host_cid
        self._is_client = is_client
        self._peer_cid = peer_cid
        self._peer_token = peer_token
        self._quic_logger = quic_logger
        self._spin_bit = 1 if spin_bit else 0
        self._version = version

        self._datagrams = []
        self._datagram_flight_bytes = 0
        self._datagram_init = True
        self._datagram_needs_padding = False
        self._packets = []
        self._flight_bytes = 0
        self._total_bytes = 0

        self._header_size = 0
        self._packet = None
        self._packet_crypto = None
        self._tag_size = 0
        self._packet_number = packet_number
        self._packet_start = 0
        self._packet_type = None
        self._one_rtt = False

        self._keys = _Keys()
        self._buffer = Buffer(max_datagram_size)
        self._buffer_capacity = max_datagram_size
        self._flight_capacity = max_datagram_size

    @property
    def packet_is_empty(self):
        return self._packet_is_empty()

    cdef bint _packet_is_empty(self) except -1:
        assert self._packet is not None
        return <Py_ssize_t>self._buffer.tell() - self._packet_start <= self._header_size

    @property
    def packet_number(self):
        return self._packet_number

    @property
    def remaining_buffer_space(self):
        return self._buffer_capacity - <Py_ssize_t>self._buffer.tell() - self._tag_size

    @property
    def remaining_flight_space(self):
        return self._remaining_flight_space()

    cdef Py_ssize_t _remaining_flight_space(self) except? -1:
        return self._flight_capacity - <Py_ssize_t>self._buffer.tell() - self._tag_size

    def flush(self):
        if self._packet is not None:
            self._end_packet()
        self._flush_current_datagram()
        datagrams = self._datagrams
        packets = self._packets
        self._datagrams = []
        self._packets = []
        return datagrams, packets

    def start_frame(self, frame_type, Py_ssize_t capacity=1, handler=None,
                    handler_args=[]):
        return self._start_frame(frame_type, capacity, handler, handler_args)

    cdef object _start_frame(self, long ft, Py_ssize_t capacity, handler, handler_args):
        assert self._packet is not None
        cdef Py_ssize_t position = self._buffer.tell()
        # The first frame leaves room for the padding that lets header protection sample
        # enough bytes (RFC 9001 §5.4.2).
        if position - self._packet_start <= self._header_size:
            capacity = max(capacity, PN_MAX - PN_SEND)
        if (self._buffer_capacity - position - self._tag_size < capacity
                or (not _not_in_flight(ft)
                    and self._flight_capacity - position - self._tag_size < capacity)):
            raise QuicPacketBuilderStop

        self._buffer.push_uint_var(ft)
        if not _not_ack_eliciting(ft):
            self._pkt_ack_eliciting = True
        if not _not_in_flight(ft):
            self._pkt_in_flight = True
        if ft == FT_CRYPTO:
            self._pkt_crypto = True
        if ft == FT_PATH_CHALLENGE or ft == FT_PATH_RESPONSE:
            # Expanded to at least 1,200 bytes unless anti-amplification prevents it
            # (RFC 9000 §8.2.1, §8.2.2).
            self._datagram_needs_padding = True
        if handler is not None:
            self._packet.delivery_handlers.append((handler, handler_args))
        return self._buffer

    def start_packet(self, packet_type, crypto):
        self._start_packet(packet_type, crypto)

    cdef _start_packet(self, packet_type, crypto):
        assert packet_type in (_INITIAL, _HANDSHAKE, _ZERO_RTT, _ONE_RTT), \
            "Invalid packet type"
        cdef Py_ssize_t packet_start, header_size, remaining, token_length
        cdef bint one_rtt = packet_type is _ONE_RTT
        buf = self._buffer

        if self._packet is not None:
            self._end_packet()

        # Too little room left: a new datagram (aioquic's arbitrary 128-byte limit).
        packet_start = buf.tell()
        if self._buffer_capacity - packet_start < 128:
            self._flush_current_datagram()
            packet_start = 0

        # A short header packet pads with PADDING frames, which are congestion controlled
        # (RFC 9002 §2): if the window cannot cover them, start a new datagram.
        if (one_rtt and self._datagram_needs_padding
                and self._flight_capacity < self._buffer_capacity):
            self._flush_current_datagram()
            packet_start = 0

        if self._datagram_init:
            if self.max_total_bytes is not None:
                remaining = self.max_total_bytes - self._total_bytes
                if remaining < self._buffer_capacity:
                    self._buffer_capacity = remaining
            self._flight_capacity = self._buffer_capacity
            if self.max_flight_bytes is not None:
                remaining = self.max_flight_bytes - self._flight_bytes
                if remaining < self._flight_capacity:
                    self._flight_capacity = remaining
            self._datagram_flight_bytes = 0
            self._datagram_init = False
            self._datagram_needs_padding = False

        if not one_rtt:
            header_size = 11 + len(self._peer_cid) + len(self._host_cid)
            if packet_type is _INITIAL:
                token_length = len(self._peer_token)
                header_size += size_uint_var(token_length) + token_length
        else:
            header_size = 3 + len(self._peer_cid)

        if packet_start + header_size >= self._buffer_capacity:
            raise QuicPacketBuilderStop

        if packet_type is _INITIAL:
            epoch = _EPOCH_INITIAL
        elif packet_type is _HANDSHAKE:
            epoch = _EPOCH_HANDSHAKE
        else:
            epoch = _EPOCH_ONE_RTT

        self._header_size = header_size
        self._packet = QuicSentPacket(epoch, False, False, False, self._packet_number,
                                      packet_type)
        self._pkt_ack_eliciting = False
        self._pkt_in_flight = False
        self._pkt_crypto = False
        self._packet_crypto = crypto
        self._tag_size = crypto.aead_tag_size
        self._packet_start = packet_start
        self._packet_type = packet_type
        self._one_rtt = one_rtt
        self.quic_logger_frames = self._packet.quic_logger_frames

        buf.seek(packet_start + header_size)

    cdef _end_packet(self):
        cdef Py_ssize_t packet_size, padding_size, length, room
        buf = self._buffer
        packet = self._packet
        packet_size = buf.tell() - self._packet_start
        if packet_size > self._header_size:
            # padding so that header protection has a full sample
            padding_size = PN_MAX - PN_SEND + self._header_size - packet_size

            # datagrams with Initial packets are padded (RFC 9000 §14.1)
            if ((self._is_client or self._pkt_ack_eliciting)
                    and self._packet_type is _INITIAL):
                self._datagram_needs_padding = True

            # 1-RTT packets carry their datagram's padding inside (nothing may follow a
            # short header packet)
            if self._datagram_needs_padding and self._one_rtt:
                room = self._flight_capacity - <Py_ssize_t>buf.tell() - self._tag_size
                if room > padding_size:
                    padding_size = room
                self._datagram_needs_padding = False

            if padding_size > 0:
                buf.push_bytes(bytes(padding_size))
                packet_size += padding_size
                self._pkt_in_flight = True
                if self._quic_logger is not None:
                    packet.quic_logger_frames.append(
                        self._quic_logger.encode_padding_frame())

            buf.seek(self._packet_start)
            if not self._one_rtt:
                length = packet_size - self._header_size + PN_SEND + self._tag_size
                buf.push_uint8(encode_long_header_first_byte(
                    self._version, self._packet_type, PN_SEND - 1))
                buf.push_uint32(self._version)
                buf.push_uint8(len(self._peer_cid))
                buf.push_bytes(self._peer_cid)
                buf.push_uint8(len(self._host_cid))
                buf.push_bytes(self._host_cid)
                if self._packet_type is _INITIAL:
                    buf.push_uint_var(len(self._peer_token))
                    buf.push_bytes(self._peer_token)
                buf.push_uint16(length | 0x4000)
                buf.push_uint16(self._packet_number & 0xFFFF)
            else:
                buf.push_uint8(FIXED_BIT | (self._spin_bit << 5)
                               | (<int>self._packet_crypto.key_phase << 2) | (PN_SEND - 1))
                buf.push_bytes(self._peer_cid)
                buf.push_uint16(self._packet_number & 0xFFFF)

            # encrypt in place
            header = buf.data_slice(self._packet_start, self._packet_start + self._header_size)
            payload = buf.data_slice(self._packet_start + self._header_size,
                                     self._packet_start + packet_size)
            buf.seek(self._packet_start)
            self._protect(buf, header, payload)
            packet.is_ack_eliciting = self._pkt_ack_eliciting
            packet.in_flight = self._pkt_in_flight
            packet.is_crypto_packet = self._pkt_crypto
            packet.sent_bytes = <Py_ssize_t>buf.tell() - self._packet_start
            self._packets.append(packet)
            if self._pkt_in_flight:
                self._datagram_flight_bytes += packet.sent_bytes

            # short header packets cannot be coalesced
            if self._one_rtt:
                self._flush_current_datagram()

            self._packet_number += 1
        else:
            # an empty packet is cancelled
            buf.seek(self._packet_start)

        self._packet = None
        self.quic_logger_frames = None

    cdef _protect(self, buf, bytes header, bytes payload):
        """Write the packet protected: what the pair's encrypt_packet returns."""
        pair = self._packet_crypto
        cdef _Keys keys = self._keys
        if pair._update_key_requested or not keys.take(pair.send):
            buf.push_bytes(pair.encrypt_packet(header, payload, self._packet_number))
            return
        protected = keys.aead.encrypt(keys.nonce(self._packet_number), payload, header)
        # the sample starts as if the packet number were 4 bytes long (RFC 9001 §5.4.2)
        cdef Py_ssize_t sample_offset = PN_MAX - ((<unsigned char *>header)[0] & 0x03) - 1
        buf.push_bytes(_mask_header(header, keys.hp.update(
            protected[sample_offset:sample_offset + SAMPLE_LENGTH])))
        buf.push_bytes(protected)

    cdef _flush_current_datagram(self):
        cdef Py_ssize_t datagram_bytes = self._buffer.tell()
        cdef Py_ssize_t extra_bytes
        if datagram_bytes:
            # Bytes after the last packet pad datagrams with Initial packets or path
            # validation (RFC 9000 §8.2, §14.1): not frames, not in flight, but they count
            # for anti-amplification.
            if self._datagram_needs_padding:
                extra_bytes = self._buffer_capacity - datagram_bytes
                if extra_bytes > 0:
                    self._buffer.push_bytes(bytes(extra_bytes))
                    datagram_bytes += extra_bytes
            self._datagrams.append(self._buffer.data)
            self._flight_bytes += self._datagram_flight_bytes
            self._total_bytes += datagram_bytes
            self._datagram_init = True
            self._buffer.seek(0)


# -- aioquic 1.7's QuicConnection._write_application, compiled --------------------------------

cdef long FT_STREAM_BASE = QuicFrameType.STREAM_BASE
_DATAGRAM_WITH_LENGTH = QuicFrameType.DATAGRAM_WITH_LENGTH
_STREAMS_BLOCKED_BIDI = QuicFrameType.STREAMS_BLOCKED_BIDI
_STREAMS_BLOCKED_UNI = QuicFrameType.STREAMS_BLOCKED_UNI
_EPOCH_ZERO_RTT = Epoch.ZERO_RTT
_PACER_NEXT_SEND_TIME = QuicPacketPacer.next_send_time
_PACER_UPDATE_AFTER_SEND = QuicPacketPacer.update_after_send
_PACER_UPDATE_BUCKET = QuicPacketPacer.update_bucket


cdef bint _plain_pacer(pacer):
    """Whether `pacer` paces as aioquic's QuicPacketPacer does (a subclass may change only
    update_rate), so that its bucket can be read and written here."""
    cls = type(pacer)
    return (cls.next_send_time is _PACER_NEXT_SEND_TIME
            and cls.update_after_send is _PACER_UPDATE_AFTER_SEND
            and cls.update_bucket is _PACER_UPDATE_BUCKET)


cdef _update_bucket(pacer, double now):
    cdef double evaluation_time = pacer.evaluation_time
    cdef double bucket_time, bucket_max
    if now > evaluation_time:
        bucket_time = pacer.bucket_time + (now - evaluation_time)
        bucket_max = pacer.bucket_max
        pacer.bucket_time = bucket_time if bucket_time < bucket_max else bucket_max
        pacer.evaluation_time = now


cdef object _next_send_time(pacer, double now):
    """QuicPacketPacer.next_send_time (RFC 9002 §7.7): when the next packet may leave, or
    None if it may leave now."""
    packet_time = pacer.packet_time
    if packet_time is not None:
        _update_bucket(pacer, now)
        if pacer.bucket_time <= 0:
            return now + packet_time
    return None


cdef _update_after_send(pacer, double now):
    """QuicPacketPacer.update_after_send: a packet's time taken from the bucket."""
    packet_time = pacer.packet_time
    if packet_time is not None:
        _update_bucket(pacer, now)
        if pacer.bucket_time < packet_time:
            pacer.bucket_time = 0.0
        else:
            pacer.bucket_time -= packet_time


cdef long long _write_stream_frame(PacketBuilder builder, stream, long long max_offset) except -1:
    """QuicConnection._write_stream_frame with QuicStreamSender.get_frame inside, for a
    connection without qlog: one STREAM frame (RFC 9000 §19.8) of the first pending range,
    as large as the packet and flow control allow. Returns by how much the stream's highest
    offset sent grew (what it takes of the connection's credit)."""
    sender = stream.sender
    ranges = sender._pending._RangeSet__ranges
    cdef long long next_offset = ranges[0].start if ranges else sender._buffer_stop
    cdef long long stream_id = stream.stream_id
    cdef Py_ssize_t overhead = 3 + size_uint_var(stream_id) + (
        size_uint_var(next_offset) if next_offset else 0)
    cdef long long previous_highest = sender.highest_offset
    cdef Py_ssize_t max_size = builder._remaining_flight_space() - overhead
    cdef long long start, stop, range_stop, buffer_start
    cdef bint fin = False
    assert sender._reset_error_code is None, "cannot call get_frame() after reset()"
    if max_size < 0:
        return 0
    if not ranges:
        if not sender._pending_eof:
            sender.buffer_is_empty = True
            return 0
        sender._pending_eof = False  # FIN only
        start = stop = sender._buffer_fin
        data = b""
        fin = True
    else:
        first = ranges[0]
        start = first.start
        range_stop = first.stop
        stop = range_stop if range_stop < start + max_size else start + max_size
        if stop > max_offset:
            stop = max_offset
        if stop <= start:
            return 0
        buffer_start = sender._buffer_start
        buffer = sender._buffer
        if (type(buffer) is bytearray and start >= buffer_start
                and stop - buffer_start <= PyByteArray_GET_SIZE(buffer)):
            data = PyBytes_FromStringAndSize(
                PyByteArray_AS_STRING(buffer) + (start - buffer_start), stop - start)
        else:
            data = bytes(buffer[start - buffer_start:stop - buffer_start])
        # RangeSet.subtract(start, stop) of the first range (ranges never touch)
        if stop == range_stop:
            del ranges[0]
        else:
            ranges[0] = range(stop, range_stop)
        if stop > previous_highest:
            sender.highest_offset = stop
        buffer_fin = sender._buffer_fin
        if buffer_fin is not None and <long long>buffer_fin == stop:
            fin = True
            sender._pending_eof = False

    cdef long frame_type = FT_STREAM_BASE | 2  # with a length
    if start:
        frame_type |= 4
    if fin:
        frame_type |= 1
    buf = builder._start_frame(frame_type, overhead, sender.on_data_delivery,
                               (start, start + len(data), fin))
    buf.push_uint_var(stream_id)
    if start:
        buf.push_uint_var(start)
    buf.push_uint16(len(data) | 0x4000)
    buf.push_bytes(data)
    return <long long>sender.highest_offset - previous_highest


def write_application(connection, PacketBuilder builder, network_path, double now):
    """aioquic 1.7's `QuicConnection._write_application(builder, network_path, now)` for
    `connection`, compiled: the same frames in the same packets, with the per-packet steps
    (pacing, STREAM frames, the stream queue) in C and every rarer frame written by the
    connection's own method. QuicPacketBuilderStop goes to the caller, as there."""
    self = connection
    cryptos = self._cryptos
    crypto = cryptos[_EPOCH_ONE_RTT]
    crypto_stream = None
    if crypto.send.is_valid():
        crypto_stream = self._crypto_streams[_EPOCH_ONE_RTT]
        packet_type = _ONE_RTT
    else:
        crypto = cryptos[_EPOCH_ZERO_RTT]
        if not crypto.send.is_valid():
            return
        packet_type = _ZERO_RTT
    cdef bint one_rtt = packet_type is _ONE_RTT
    space = self._spaces[_EPOCH_ONE_RTT]
    pacer = self._loss._pacer
    cdef bint plain_pacer = _plain_pacer(pacer)
    cdef bint inline_streams = self._quic_logger is None
    cdef bint is_client = self._is_client
    cdef set sent, discarded
    cdef list queue
    cdef long long used

    while True:
        # apply pacing, except if we have ACKs to send
        ack_at = space.ack_at
        if ack_at is None or ack_at >= now:
            if plain_pacer:
                pacing_at = _next_send_time(pacer, now)
            else:
                pacing_at = pacer.next_send_time(now=now)
            self._pacing_at = pacing_at
            if pacing_at is not None:
                break
        builder._start_packet(packet_type, crypto)

        # ACK, which a server sends for 0-RTT packets before the handshake completes
        # (RFC 9000 §13.2.1), but not in 0-RTT packets.
        if one_rtt and space.ack_at is not None and space.ack_at <= now:
            self._write_ack_frame(builder=builder, space=space, now=now)

        if self._handshake_complete:
            # PATH_CHALLENGE while the path is not validated (RFC 9000 §9.3); validation
            # is abandoned after 3 PTOs of the larger of the two paths (§8.2.4).
            if not (network_path.is_validated or network_path.local_challenge_sent):
                self._write_path_challenge_frame(builder=builder, network_path=network_path)
                if network_path.validation_deadline is None:
                    network_path.validation_deadline = now + 3 * max(
                        self._loss.get_probe_timeout(), 2 * self._configuration.initial_rtt)
            if self._handshake_done_pending:
                self._write_handshake_done_frame(builder=builder)
                self._handshake_done_pending = False
            challenges = network_path.remote_challenges
            while len(challenges) > 0:
                self._write_path_response_frame(builder=builder, challenge=challenges[0])
                challenges.popleft()
            for connection_id in self._host_cids:
                if not connection_id.was_sent:
                    self._write_new_connection_id_frame(
                        builder=builder, connection_id=connection_id)
            retire = self._retire_connection_ids
            for sequence_number in retire[:]:
                self._write_retire_connection_id_frame(
                    builder=builder, sequence_number=sequence_number)
                retire.pop(0)
            if self._streams_blocked_pending:
                if self._streams_blocked_bidi:
                    self._write_streams_blocked_frame(
                        builder=builder, frame_type=_STREAMS_BLOCKED_BIDI,
                        limit=self._remote_max_streams_bidi)
                if self._streams_blocked_uni:
                    self._write_streams_blocked_frame(
                        builder=builder, frame_type=_STREAMS_BLOCKED_UNI,
                        limit=self._remote_max_streams_uni)
                self._streams_blocked_pending = False
            # MAX_DATA and MAX_STREAMS
            self._write_connection_limits(builder=builder, space=space)

        # stream-level limits
        for stream in self._streams.values():
            self._write_stream_limits(builder=builder, space=space, stream=stream)

        if self._ping_pending:  # PING (user-request)
            self._write_ping_frame(builder, self._ping_pending)
            self._ping_pending.clear()
        if self._probe_pending:  # PING (probe)
            self._write_ping_frame(builder, comment="probe")
            self._probe_pending = False
        if crypto_stream is not None and not crypto_stream.sender.buffer_is_empty:
            self._write_crypto_frame(builder=builder, space=space, stream=crypto_stream)
        datagrams = self._datagrams_pending
        while datagrams:
            try:
                self._write_datagram_frame(builder=builder, data=datagrams[0],
                                           frame_type=_DATAGRAM_WITH_LENGTH)
                datagrams.popleft()
            except QuicPacketBuilderStop:
                break

        sent = set()
        discarded = set()
        queue = self._streams_queue
        try:
            for stream in queue:
                if stream.is_finished:  # discard a finished stream
                    self._logger.debug("Stream %d discarded", stream.stream_id)
                    self._streams.pop(stream.stream_id)
                    # let the peer open a new stream for each one that closes (§4.6)
                    if ((stream.stream_id & 1) == 0) != is_client:
                        self._stream_limit(stream.stream_id).value += 1
                    discarded.add(stream)
                    continue
                if stream.receiver.stop_pending:  # STOP_SENDING
                    self._write_stop_sending_frame(builder=builder, stream=stream)
                sender = stream.sender
                if sender.reset_pending:  # RESET_STREAM
                    self._write_reset_stream_frame(builder=builder, stream=stream)
                elif not stream.is_blocked and not sender.buffer_is_empty:  # STREAM
                    max_offset = min(
                        sender.highest_offset + self._remote_max_data
                        - self._remote_max_data_used,
                        stream.max_stream_data_remote)
                    if inline_streams and type(sender) is _QuicStreamSender:
                        used = _write_stream_frame(builder, stream, max_offset)
                    else:
                        used = self._write_stream_frame(builder=builder, space=space,
                                                        stream=stream, max_offset=max_offset)
                    self._remote_max_data_used += used
                    if used > 0:
                        sent.add(stream)
        finally:
            # a new service order with the served streams last (and the discarded gone),
            # even when the packet filled up
            if sent or discarded:
                self._streams_queue = [
                    stream for stream in queue
                    if not (stream in discarded or stream in sent)]
                self._streams_queue.extend(sent)

        if builder._packet_is_empty():
            # Discarded streams may let the peer open new ones, which the next packet
            # announces with MAX_STREAMS.
            if not discarded:
                break
        elif plain_pacer:
            _update_after_send(pacer, now)
        else:
            pacer.update_after_send(now=now)


# -- aioquic 1.7's QuicConnection._payload_received, compiled ---------------------------------

cdef unsigned long long VARINT_MAX = UINT_VAR_MAX  # 2^62 - 1 (RFC 9000 §16)
cdef long long FRAME_ENCODING_ERROR = QuicErrorCode.FRAME_ENCODING_ERROR
cdef long long FLOW_CONTROL_ERROR = QuicErrorCode.FLOW_CONTROL_ERROR
cdef long long FINAL_SIZE_ERROR = QuicErrorCode.FINAL_SIZE_ERROR
cdef long long PROTOCOL_VIOLATION = QuicErrorCode.PROTOCOL_VIOLATION
# Whether a frame type may come in a 1-RTT packet, from the connection's own handler table
# (the same for every aioquic connection), filled as frame types are first seen.
cdef dict _ONE_RTT_ALLOWED = {}


cdef inline Py_ssize_t _pull_varint(const unsigned char *data, Py_ssize_t pos,
                                    Py_ssize_t end, unsigned long long *value):
    """A variable-length integer (RFC 9000 §16) at `pos`: the position after it, or -1 if
    the data ends first."""
    if pos >= end:
        return -1
    cdef Py_ssize_t length = 1 << (data[pos] >> 6)
    if pos + length > end:
        return -1
    cdef unsigned long long result = data[pos] & 0x3F
    cdef Py_ssize_t i
    for i in range(1, length):
        result = (result << 8) | data[pos + i]
    value[0] = result
    return pos + length


cdef inline _frame_error(long long error_code, frame_type, str reason):
    return QuicConnectionError(error_code=error_code, frame_type=frame_type,
                               reason_phrase=reason)


cdef Py_ssize_t _stream_frame(connection, long long frame_type, bytes plain,
                              Py_ssize_t pos) except -1:
    """QuicConnection._handle_stream_frame (RFC 9000 §19.8, §4) for a connection without
    qlog, with QuicStreamReceiver.handle_frame's in-order case inside: the position after
    the frame, which is ignored for a stream whose state is gone, as there."""
    cdef const unsigned char *data = <const unsigned char *>PyBytes_AS_STRING(plain)
    cdef Py_ssize_t end = len(plain)
    cdef unsigned long long stream_id, offset = 0, length
    pos = _pull_varint(data, pos, end, &stream_id)
    if pos >= 0 and frame_type & 4:
        pos = _pull_varint(data, pos, end, &offset)
    if pos >= 0:
        if frame_type & 2:
            pos = _pull_varint(data, pos, end, &length)
        else:
            length = end - pos
    if pos < 0:
        raise _frame_error(FRAME_ENCODING_ERROR, frame_type, "Failed to parse frame")
    if offset + length > VARINT_MAX:
        raise _frame_error(FRAME_ENCODING_ERROR, frame_type,
                           "offset + length cannot exceed 2^62 - 1")
    if length > <unsigned long long>(end - pos):
        raise _frame_error(FRAME_ENCODING_ERROR, frame_type, "Failed to parse frame")
    chunk = PyBytes_FromStringAndSize(<const char *>data + pos, length)
    pos += length
    cdef bint fin = frame_type & 1

    # the stream can receive (not our own unidirectional one), exists or is opened
    if ((stream_id & 1) == 0) == connection._is_client and stream_id & 2:
        connection._assert_stream_can_receive(frame_type, stream_id)  # raises
    stream = connection._streams.get(stream_id)
    if stream is None:
        try:
            stream = connection._get_or_create_stream(frame_type, stream_id)
        except _StreamFinishedError:
            return pos  # we lack the state for the stream, ignore the frame

    # flow control (RFC 9000 §4.1)
    cdef unsigned long long frame_end = offset + length
    if frame_end > <unsigned long long>stream.max_stream_data_local:
        raise _frame_error(FLOW_CONTROL_ERROR, frame_type, "Over stream data limit")
    receiver = stream.receiver
    cdef long long highest = receiver.highest_offset
    cdef long long newly_received = <long long>frame_end - highest
    if newly_received < 0:
        newly_received = 0
    max_data = connection._local_max_data
    if max_data.used + newly_received > max_data.value:
        raise _frame_error(FLOW_CONTROL_ERROR, frame_type, "Over connection data limit")

    if (type(receiver) is _QuicStreamReceiver and not fin and length
            and receiver._final_size is None and not receiver.is_finished
            and offset == receiver._buffer_start and not receiver._buffer):
        # the next data in order, nothing buffered: delivered as it is
        if <long long>frame_end > highest:
            receiver.highest_offset = frame_end
        receiver._buffer_start = frame_end
        event = _StreamDataReceived(data=chunk, end_stream=False,
                                    stream_id=receiver._stream_id)
    else:
        try:
            event = receiver.handle_frame(
                _QuicStreamFrame(offset=offset, data=chunk, fin=fin))
        except _FinalSizeError as exc:
            raise _frame_error(FINAL_SIZE_ERROR, frame_type, str(exc))
    if event is not None:
        connection._events.append(event)
    max_data.used += newly_received
    return pos


def payload_received(connection, context, bytes plain):
    """aioquic 1.7's `QuicConnection._payload_received(context, plain)` for a packet that
    needs no CRYPTO frame, compiled: frame types read in C, STREAM frames handled here (no
    qlog), every other frame by the connection's own handler. (is_ack_eliciting,
    is_probing), or QuicConnectionError, as there."""
    cdef const unsigned char *data = <const unsigned char *>PyBytes_AS_STRING(plain)
    cdef Py_ssize_t end = len(plain)
    cdef Py_ssize_t pos = 0, after
    cdef unsigned long long value
    cdef long long ft
    cdef bint frame_found = False, is_ack_eliciting = False
    is_probing = None
    handlers = connection._QuicConnection__frame_handlers
    epoch = context.epoch
    cdef bint inline_streams = connection._quic_logger is None
    buf = None
    while pos < end:
        after = _pull_varint(data, pos, end, &value)
        if after < 0:
            raise _frame_error(FRAME_ENCODING_ERROR, None, "Malformed frame type")
        pos = after
        frame_type = value
        try:
            frame_handler, frame_epochs = handlers[frame_type]
        except KeyError:
            raise _frame_error(FRAME_ENCODING_ERROR, frame_type, "Unknown frame type")
        if epoch is _EPOCH_ONE_RTT:
            allowed = _ONE_RTT_ALLOWED.get(frame_type)
            if allowed is None:
                allowed = _ONE_RTT_ALLOWED[frame_type] = epoch in frame_epochs
        else:
            allowed = epoch in frame_epochs
        if not allowed:
            raise _frame_error(PROTOCOL_VIOLATION, frame_type, "Unexpected frame type")
        ft = value
        if inline_streams and FT_STREAM_BASE <= ft <= FT_STREAM_BASE + 7:
            pos = _stream_frame(connection, ft, plain, pos)
        else:
            if buf is None:
                buf = Buffer(data=plain)
            buf.seek(pos)
            try:
                frame_handler(context, frame_type, buf)
            except BufferReadError:
                raise _frame_error(FRAME_ENCODING_ERROR, frame_type, "Failed to parse frame")
            except _StreamFinishedError:
                pass  # we lack the state for the stream, ignore the frame
            pos = buf.tell()
        frame_found = True
        if frame_type not in _NON_ACK_ELICITING_FRAME_TYPES:
            is_ack_eliciting = True
        if frame_type not in _PROBING_FRAME_TYPES:
            is_probing = False
        elif is_probing is None:
            is_probing = True
    if not frame_found:
        raise _frame_error(PROTOCOL_VIOLATION, FT_PADDING, "Packet contains no frames")
    return is_ack_eliciting, bool(is_probing)


# -- aioquic 1.7's QuicPacketRecovery.on_ack_received, compiled -------------------------------

_ACKED = QuicDeliveryState.ACKED
_ON_DATA_DELIVERY = _QuicStreamSender.on_data_delivery


cdef _stream_data_acked(sender, start, stop, fin):
    """QuicStreamSender.on_data_delivery(ACKED, start, stop, fin): data the peer has, dropped
    from the send buffer once everything before it is acknowledged too."""
    assert not fin or stop == sender._buffer_fin, (
        "on_data_delivered() was called with inconsistent fin / stop")
    if sender._reset_error_code is not None:
        return
    cdef long long size
    if stop > start:
        acked = sender._acked
        ranges = acked._RangeSet__ranges
        if not ranges and start == sender._buffer_start:
            # RangeSet.add then shift of the same range: the buffer's head goes
            size = stop - start
            sender._buffer_start = stop
            del sender._buffer[:size]
        else:
            acked.add(start, stop)
            first_range = ranges[0]
            if first_range.start == sender._buffer_start:
                size = first_range.stop - first_range.start
                acked.shift()
                sender._buffer_start += size
                del sender._buffer[:size]
    if fin:
        sender._acked_fin = True
    if sender._buffer_start == sender._buffer_fin and sender._acked_fin:
        sender.is_finished = True


cdef class _AckReceiver:
    """QuicPacketRecovery.on_ack_received (RFC 9002 §5, §6, §7) of one recovery object: the
    same steps, with the newly acknowledged packets found by walking the sent packets (kept
    in the order they were sent) up to the largest acknowledged instead of copying all
    their numbers, and STREAM data acknowledgements handled in C."""

    cdef object recovery

    def __cinit__(self, recovery):
        self.recovery = recovery

    def __call__(self, *, ack_rangeset, ack_delay, now, space):
        loss = self.recovery
        cdef bint is_ack_eliciting = False
        largest_acked = ack_rangeset.bounds().stop - 1
        largest_newly_acked = None
        largest_sent_time = None
        if largest_acked > space.largest_acked_packet:
            space.largest_acked_packet = largest_acked

        # the sent packets within the acknowledged ranges, in order
        ranges = ack_rangeset._RangeSet__ranges
        sent_packets = space.sent_packets
        cdef list acked = []
        cdef Py_ssize_t index = 0, count = len(ranges)
        current = ranges[0]
        for packet_number in sent_packets:
            while packet_number >= current.stop:
                index += 1
                if index == count:
                    break
                current = ranges[index]
            if index == count:
                break
            if packet_number >= current.start:
                acked.append(packet_number)

        cc = loss._cc
        for packet_number in acked:
            packet = sent_packets.pop(packet_number)
            if packet.is_ack_eliciting:
                is_ack_eliciting = True
                space.ack_eliciting_in_flight -= 1
            if packet.in_flight:
                cc.on_packet_acked(packet=packet, now=now)
            largest_newly_acked = packet_number
            largest_sent_time = packet.sent_time
            for handler, args in packet.delivery_handlers:
                if (type(handler) is _MethodType and handler.__func__ is _ON_DATA_DELIVERY
                        and type(handler.__self__) is _QuicStreamSender
                        and type(args) is tuple and len(args) == 3):
                    _stream_data_acked(handler.__self__, args[0], args[1], args[2])
                else:
                    handler(_ACKED, *args)

        if largest_newly_acked is None:
            return

        if largest_acked == largest_newly_acked and is_ack_eliciting:
            latest_rtt = now - largest_sent_time
            log_rtt = True
            ack_delay = min(ack_delay, loss.max_ack_delay)
            # RTT estimate (RFC 9002 §5.3), never under 1 ms
            loss._rtt_latest = max(latest_rtt, 0.001)
            if loss._rtt_latest < loss._rtt_min:
                loss._rtt_min = loss._rtt_latest
            if loss._rtt_latest > loss._rtt_min + ack_delay:
                loss._rtt_latest -= ack_delay
            if not loss._rtt_initialized:
                loss._rtt_first_sample_time = now
                loss._rtt_initialized = True
                loss._rtt_variance = latest_rtt / 2
                loss._rtt_smoothed = latest_rtt
            else:
                # aioquic's 3 / 4, 1 / 4, 7 / 8 and 1 / 8, written as the floats they are
                # (constant integer division here would be C's)
                loss._rtt_variance = 0.75 * loss._rtt_variance + 0.25 * abs(
                    loss._rtt_min - loss._rtt_latest)
                loss._rtt_smoothed = 0.875 * loss._rtt_smoothed + 0.125 * loss._rtt_latest
            cc.on_rtt_measurement(now=now, rtt=latest_rtt)
            loss._pacer.update_rate(congestion_window=cc.congestion_window,
                                    smoothed_rtt=loss._rtt_smoothed)
        else:
            log_rtt = False

        loss._detect_loss(now=now, space=space)
        # the PTO count restarts, unless a client is not sure yet that the server validated
        # its address (RFC 9002 §6.2.1)
        if loss.peer_completed_address_validation:
            loss._pto_count = 0
        if loss._quic_logger is not None:
            loss._log_metrics_updated(log_rtt=log_rtt)


def ack_receiver(recovery):
    """What to call instead of `recovery.on_ack_received` (it keeps its results)."""
    return _AckReceiver(recovery)
