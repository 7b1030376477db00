# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""QUIC packet builder, compiled: aioquic 1.7's `QuicPacketBuilder` with its state in C.

Twin of `_builder_py.py`, which is aioquic's own builder: this one keeps its API, its
decisions and its output byte for byte (tests/test_packet_builder.py builds the same
sequences with both and compares datagrams and sent-packet records). It exists because
building a packet is the largest share of a sender's per-packet Python work at 1,200-byte
packets; the connection (mahole.connection) uses it for 1-RTT sends once the handshake is
confirmed.

What it keeps from aioquic: the `Buffer` handed to frame writers, the `QuicSentPacket`
records loss recovery keeps, `QuicPacketBuilderStop`, and the packet's `CryptoPair`'s keys.
What it changes is only where its own counters and flags live: a packet's ack-eliciting /
in-flight / crypto flags are kept in C while the packet is open and written to its
`QuicSentPacket` when it ends (nothing reads them before). And it protects packets itself
with AES-GCM keys (the AEAD call, the nonce and the header protection mask, RFC 9001 §5),
using the cipher objects of aioquic's contexts; with ChaCha20 keys, or a key update due, it
calls the pair's own encrypt_packet.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize

from aioquic._crypto import AEAD, AEAD_NONCE_LENGTH as _NONCE_LENGTH, HeaderProtection
from aioquic._crypto import SAMPLE_LENGTH as _SAMPLE_LENGTH
from aioquic.buffer import Buffer, size_uint_var
from aioquic.quic.packet import (
    PACKET_FIXED_BIT,
    PACKET_NUMBER_MAX_SIZE,
    QuicFrameType,
    QuicPacketType,
    encode_long_header_first_byte,
)
from aioquic.quic.packet_builder import (
    PACKET_NUMBER_SEND_SIZE,
    QuicPacketBuilderStop,
    QuicSentPacket,
)
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

    # the packet protection keys of the last context used, taken from aioquic's AEAD and
    # HeaderProtection objects (the owners, whose identity says whether they changed)
    cdef object _aead_owner
    cdef object _hp_owner
    cdef bint _keys_usable
    cdef object _aead
    cdef bytes _iv
    cdef object _hp_encryptor

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

        self._buffer = Buffer(max_datagram_size)
        self._buffer_capacity = max_datagram_size
        self._flight_capacity = max_datagram_size

    @property
    def packet_is_empty(self):
        assert self._packet is not None
        return self._buffer.tell() - self._packet_start <= self._header_size

    @property
    def packet_number(self):
        return self._packet_number

    @property
    def remaining_buffer_space(self):
        return self._buffer_capacity - <Py_ssize_t>self._buffer.tell() - self._tag_size

    @property
    def remaining_flight_space(self):
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
        assert self._packet is not None
        cdef long ft = frame_type
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

    def _end_packet(self):
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
        """Write the packet protected (RFC 9001 §5): what the pair's encrypt_packet returns,
        without its four Python calls when the keys are AES-GCM ones aioquic set up."""
        pair = self._packet_crypto
        context = pair.send
        if (pair._update_key_requested or not self._keys_ready(context)):
            buf.push_bytes(pair.encrypt_packet(header, payload, self._packet_number))
            return
        protected = self._aead.encrypt(self._nonce(self._packet_number), payload, header)
        # the sample starts as if the packet number were 4 bytes long (RFC 9001 §5.4.2)
        cdef Py_ssize_t sample_offset = PN_MAX - ((<unsigned char *>header)[0] & 0x03) - 1
        buf.push_bytes(_mask_header(header, self._hp_encryptor.update(
            protected[sample_offset:sample_offset + SAMPLE_LENGTH])))
        buf.push_bytes(protected)

    cdef bint _keys_ready(self, context) except -1:
        """Whether the fast path holds `context`'s current keys (a key update replaces
        its aead and hp objects), taking them when it can."""
        aead = context.aead
        hp = context.hp
        if aead is self._aead_owner and hp is self._hp_owner:
            return self._keys_usable
        self._aead_owner = aead
        self._hp_owner = hp
        self._keys_usable = (type(aead) is AEAD and type(hp) is HeaderProtection
                             and not hp._is_chacha20)
        if self._keys_usable:
            self._aead = aead._aead
            self._iv = (<object>aead._iv).to_bytes(AEAD_NONCE_LENGTH, "big")
            self._hp_encryptor = hp._encryptor
        return self._keys_usable

    cdef bytes _nonce(self, packet_number):
        """The IV with the packet number XORed into its low bytes (RFC 9001 §5.3)."""
        cdef unsigned long long pn = packet_number
        cdef bytes nonce = PyBytes_FromStringAndSize(<char *>self._iv, AEAD_NONCE_LENGTH)
        cdef unsigned char *out = <unsigned char *>PyBytes_AS_STRING(nonce)
        cdef int i
        for i in range(8):
            out[AEAD_NONCE_LENGTH - 1 - i] ^= (pn >> (8 * i)) & 0xFF
        return nonce

    def _flush_current_datagram(self):
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
