"""QUIC connections between mahole nodes: TLS configuration, mutual authentication, and the
one adapter to aioquic's internals.

Both kinds of connection — control (node ↔ intermediate) and end-to-end (agent ↔ connector)
— authenticate both sides with certificates from the deployment CA. aioquic's server does not
ask for or check client certificates by itself, so `NodeQuicConnection` asks for one during the
handshake and `verify_peer` checks it (chain to the CA, role, name) on HandshakeCompleted,
before any stream data of the connection is looked at; a connection that fails is closed.

This is the only module that touches aioquic's private attributes (with the compiled packets
module, mahole/_fast/_packets.pyx, which ports aioquic methods for the steady paths and reads
the same internals); the aioquic versions they were written against are pinned in
pyproject.toml, and tests/test_aioquic_adapter.py fails when those attributes change.
"""

import ssl

from aioquic import tls
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    END_STATES, MAX_STREAM_DATA_FRAME_CAPACITY, QuicConnection, QuicConnectionError,
    QuicConnectionState, QuicReceiveContext)
from aioquic.quic.crypto import CryptoError, KeyUnavailableError
from aioquic.buffer import Buffer
from aioquic.quic.events import HandshakeCompleted, StreamDataReceived
from aioquic.quic.packet import (
    PACKET_FIXED_BIT, QuicErrorCode, QuicFrameType, QuicPacketType, get_spin_bit)
from aioquic.quic.packet_builder import (
    QuicDeliveryState, QuicPacketBuilder, QuicPacketBuilderStop)
from aioquic.quic.congestion.base import K_GRANULARITY, QuicRttMonitor
from aioquic.quic.recovery import MAX_ACK_RANGES, QuicPacketPacer

from . import identity
from ._fast import (
    PacketBuilder, ack_receiver, decrypter, payload_received, write_application)
from .config import check_congestion_control
from .pmtu import BASE_PLPMTU

# Control protocol versions, newest first; nodes offer both and the intermediate picks the
# first it knows (RFC 7301). /2 adds session resumption after a node homes again
# (ResumeSession, SessionResumed, SessionHeld): they are never sent to a member of /1. /3 adds
# the NAT summary and the punching strategy (NatSummary, StartPunching.strategy): a node sends
# NatSummary only over /3, and a member of /1 or /2 gets StartPunching without the strategy.
ALPN_CONTROL_NAT = "mahole-control/3"
ALPN_CONTROL_RESUME = "mahole-control/2"
ALPN_CONTROL = "mahole-control/1"
ALPN_CONTROLS = (ALPN_CONTROL_NAT, ALPN_CONTROL_RESUME, ALPN_CONTROL)
CONTROLS_RESUMABLE = frozenset((ALPN_CONTROL_NAT, ALPN_CONTROL_RESUME))
# End-to-end protocol versions, newest first; both sides offer all of them and the connector
# picks the first it knows (RFC 7301). /2 adds fragmented UDP datagrams (mahole.tunnel): a
# member that negotiated /1 is sent no fragments. /3 adds the stream-open byte: each stream the
# agent opens starts with STREAM_OPEN, so the connector learns of it before the app's first
# byte (QUIC opens a stream only with its first frame, and aioquic sends no empty one) and a
# service that speaks first (SSH, SMTP) is connected at once.
ALPN_E2E_STREAM_OPEN = "mahole-e2e/3"
ALPN_E2E_FRAGMENTS = "mahole-e2e/2"
ALPN_E2E = (ALPN_E2E_STREAM_OPEN, ALPN_E2E_FRAGMENTS, "mahole-e2e/1")
E2E_WITH_FRAGMENTS = frozenset((ALPN_E2E_STREAM_OPEN, ALPN_E2E_FRAGMENTS))
# The first byte of every agent-opened stream under /3: "a byte stream to the service" (other
# values are reserved for other kinds of stream; a connector resets a stream it does not know).
STREAM_OPEN = b"\x00"

# QUIC application error codes used when mahole closes a connection (CONNECTION_CLOSE of
# type 0x1d, RFC 9000 §19.19: their own space, apart from transport codes such as
# CRYPTO_ERROR 0x100-0x1ff, which come in frames of type 0x1c).
ERROR_SHUTDOWN = 0x100  # ordinary close: stopping, replaced, gone silent
ERROR_UNAUTHENTICATED = 0x101  # the certificate does not match what the node claims
ERROR_PROTOCOL_ERROR = 0x102  # undecodable control stream, a broken protocol
ERROR_RATE_LIMITED = 0x103  # over a quota
ERROR_CONFLICT = 0x104  # another live connection holds this identity
ERROR_DENIED = 0x105  # the policy refuses the registration
# After these the configuration has to change: a node must not retry.
PERMANENT_ERRORS = frozenset((ERROR_UNAUTHENTICATED, ERROR_CONFLICT, ERROR_DENIED))
# QUIC transport CRYPTO_ERROR codes (RFC 9001 §4.8): 0x100 + the TLS alert.
CRYPTO_ERROR_RANGE = range(0x100, 0x200)


# Bytes of TLS output a connection can take per epoch once its handshake is over. aioquic's
# TLS writes nothing after the handshake (a NewSessionTicket, a few hundred bytes, RFC 8446
# §4.6.1, goes out with the handshake's last flight); this is a margin.
CRYPTO_BUFFER_AFTER_HANDSHAKE = 1024


def is_tls_failure(error_code, frame_type):
    """Whether a close is the TLS handshake's refusal (a transport CRYPTO_ERROR), as opposed
    to a mahole application close that happens to share the number."""
    return frame_type is not None and error_code in CRYPTO_ERROR_RANGE


# Stream window of end-to-end sessions: a bulk stream moves at most one window per round trip,
# so it must cover the bandwidth-delay product (8 MiB: 53 MB/s at 150 ms). Memory stays bounded
# by the connection window (max_data, 16 MiB) whatever the peer does; control connections keep
# the 2 MiB default, as their messages are small.
E2E_STREAM_WINDOW = 8 << 20


def configuration(node, ca_path, *, is_client, alpn, server_name=None, idle_timeout=30.0,
                  max_datagram_frame_size=None, max_stream_data=2 << 20,
                  max_data=16 << 20, max_datagram_size=1200, keylog=None, qlog=None,
                  congestion_control="reno"):
    """A QuicConfiguration presenting this node's certificate and trusting the deployment CA.
    `alpn`: one protocol name or several, preferred first. `congestion_control`: one of
    mahole.config.CONGESTION_CONTROLS (ValueError otherwise, before aioquic sees it); control
    connections keep aioquic's default, Reno, end-to-end ones take the node's setting.

    `keylog`: a text file the TLS secrets are appended to (SSLKEYLOGFILE format, for
    Wireshark); `qlog`: an aioquic QuicLogger (QuicFileLogger writes one .qlog per connection
    when it ends). Both are for debugging (--keylog, --qlog-dir; mahole.debug_logs)."""
    config = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[alpn] if isinstance(alpn, str) else list(alpn),
        idle_timeout=idle_timeout,
        max_datagram_frame_size=max_datagram_frame_size,
        max_stream_data=max_stream_data,
        max_data=max_data,
        max_datagram_size=max_datagram_size,
        secrets_log_file=keylog,
        quic_logger=qlog,
        congestion_control_algorithm=check_congestion_control(congestion_control),
    )
    config.certificate = node.certificate
    config.certificate_chain = list(node.chain)
    config.private_key = node.private_key
    if isinstance(ca_path, (bytes, bytearray, memoryview)):
        config.load_verify_locations(cadata=bytes(ca_path))  # PEM held in memory
    else:
        config.load_verify_locations(cafile=str(ca_path))
    if is_client:
        config.verify_mode = ssl.CERT_REQUIRED
        config.server_name = server_name
    return config


# asyncio timers fire no sooner than about a millisecond after they are due, so a pacer whose
# bucket holds less than that sends one small burst per timer tick and caps throughput.
PACER_MIN_BURST = 0.002  # seconds of sending the bucket may hold (RFC 9002 §7.7 allows bursts)


class TimerAwarePacer(QuicPacketPacer):
    """aioquic's pacer, with a bucket that lasts at least one event-loop timer tick."""

    def update_rate(self, congestion_window, smoothed_rtt):
        super().update_rate(congestion_window, smoothed_rtt)
        self.bucket_max = max(self.bucket_max, PACER_MIN_BURST)


# RFC 9406 §4.3: an RTT rise ends slow start only when it passes
# clamp(min RTT / 8, 4 ms, 16 ms).
HYSTART_MIN_RTT_THRESH = 0.004  # seconds
HYSTART_MAX_RTT_THRESH = 0.016  # seconds
HYSTART_MIN_RTT_DIVISOR = 8


class HyStartRttMonitor(QuicRttMonitor):
    """aioquic's slow-start exit test (5 RTT samples in a row whose minimum is above the
    lowest seen), with RFC 9406's threshold instead of aioquic's "25 % above". On loopback
    and LANs the RTT is near a millisecond, so scheduling noise of a few hundred
    microseconds passed aioquic's test and ended slow start at a few dozen packets; CUBIC
    then needed seconds to grow the window back. A queue that builds still ends it."""

    def is_rtt_increasing(self, *, now, rtt):
        if now > self._sample_time + K_GRANULARITY:
            self.add_rtt(rtt=rtt)
            self._sample_time = now
            if self._ready:
                if self._filtered_min is None or self._filtered_min > self._sample_max:
                    self._filtered_min = self._sample_max
                delta = self._sample_min - self._filtered_min
                threshold = min(max(self._filtered_min / HYSTART_MIN_RTT_DIVISOR,
                                    HYSTART_MIN_RTT_THRESH), HYSTART_MAX_RTT_THRESH)
                if delta >= threshold:
                    self._increases += 1
                    if self._increases >= self._size:
                        return True
                elif delta > 0:
                    self._increases = 0
        return False


class NodeQuicConnection(QuicConnection):
    """aioquic's QuicConnection with client certificates and receive-side backpressure.

    - A server asks the client for its certificate (aioquic's TLS supports it but leaves it
      off); `peer_certificates()` returns what the peer proved to hold.
    - `pause_stream(id)` stops granting the peer more credit on a stream (RFC 9000 §4.1
      MAX_STREAM_DATA) while our consumer is slow, so a slow local reader bounds memory
      instead of buffering without limit; `resume_stream(id)` grants it again.
    - Credit is granted from data *delivered* in order, never from the highest offset seen:
      a peer that withholds byte 0 of a stream can make this side hold at most one stream
      window (`max_stream_data`) for that stream and one connection window (`max_data`) in
      all, and one that sends past its credit is closed with FLOW_CONTROL_ERROR by aioquic
      (RFC 9000 §4.1). aioquic's own rule doubles MAX_DATA whenever half of it is used,
      gaps included, without bound.
    - `packets_authenticated` counts packets that decrypted (so the caller knows whether a
      datagram was really from the peer); `local_close` is (error_code, frame_type, reason)
      when this side closed the connection (frame_type is None for an application close and
      set for a transport error such as a local TLS failure), None otherwise.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._paused_streams = set()
        self._delivered = 0  # stream bytes handed to the application, in order
        self.packets_authenticated = 0
        self.local_close = None
        self._mtu_probes = []  # (size, on_result) to send with the next datagrams
        # (1-RTT crypto pair, 1-RTT packet space, 0-RTT receive keys), once receiving 1-RTT
        self._one_rtt = None
        self.large_packets_lost = 0  # packets over 1,200 bytes declared lost (probes aside)
        self._loss._on_packets_lost = self._count_large_losses(self._loss._on_packets_lost)
        # ACKs are processed by the compiled twin of the recovery's own method
        # (mahole._fast.ack_receiver: the same results, acknowledged stream data in C).
        self._loss.on_ack_received = ack_receiver(self._loss)
        self._loss._cc._rtt_monitor = HyStartRttMonitor()
        self._loss._pacer = TimerAwarePacer(
            max_datagram_size=self._configuration.max_datagram_size)

    def _count_large_losses(self, on_packets_lost):
        """aioquic's loss handler, counting lost packets larger than QUIC's minimum first:
        when those vanish while small ones get through, the path's packet size may have
        shrunk (RFC 8899 §4.3 black hole detection, mahole.pmtu)."""
        def counting(*, packets, **kwargs):
            packets = list(packets)
            self.large_packets_lost += sum(
                1 for packet in packets
                if packet.in_flight and packet.sent_bytes > BASE_PLPMTU)
            return on_packets_lost(packets=packets, **kwargs)
        return counting

    def _payload_received(self, context, plain_payload, crypto_frame_required=False):
        # Called only for a packet that decrypted and passed header protection: the peer's.
        self.packets_authenticated += 1
        return super()._payload_received(context, plain_payload,
                                         crypto_frame_required=crypto_frame_required)

    def next_event(self):
        event = super().next_event()
        if type(event) is StreamDataReceived:
            if not event.end_stream:
                event = self._join_stream_data(event)
            self._delivered += len(event.data)
        elif type(event) is HandshakeCompleted:
            self._shrink_crypto_buffers()
        return event

    def _join_stream_data(self, event):
        """The stream's data events queued right behind `event`, as one event: aioquic makes
        one per STREAM frame, about one per packet, and each goes through the node's
        handlers; a receive batch's data for a stream goes through them once."""
        queued = self._events
        if not queued:
            return event
        after = queued[0]
        if type(after) is not StreamDataReceived or after.stream_id != event.stream_id:
            return event
        parts = [event.data]
        end_stream = False
        while (queued and type(queued[0]) is StreamDataReceived
               and queued[0].stream_id == event.stream_id and not end_stream):
            after = queued.popleft()
            parts.append(after.data)
            end_stream = after.end_stream
        return StreamDataReceived(data=b"".join(parts), end_stream=end_stream,
                                  stream_id=event.stream_id)

    def _shrink_crypto_buffers(self):
        """aioquic keeps a 16 KB buffer for the TLS output of each of three epochs for the
        connection's whole life; past the handshake its TLS writes nothing. Small ones save
        about 45 KB per connection (an intermediate holds one per registered node)."""
        for epoch in self._crypto_buffers:
            self._crypto_buffers[epoch] = Buffer(capacity=CRYPTO_BUFFER_AFTER_HANDSHAKE)

    def _write_connection_limits(self, builder, space):
        """MAX_DATA one fixed window ahead of what was delivered (see the class docstring);
        MAX_STREAMS as aioquic does it (one more for each stream that ended)."""
        max_data = self._local_max_data
        window = self._configuration.max_data
        if self._delivered + window // 2 > max_data.value:
            max_data.value = self._delivered + window
        bidi, uni = self._local_max_streams_bidi, self._local_max_streams_uni
        if (max_data.value == max_data.sent and bidi.value == bidi.sent
                and uni.value == uni.sent):
            return  # nothing to raise: aioquic would write no frame (this runs per packet)
        # aioquic's rule would double max_data.value when `used` (gaps included) passes half
        # of it: hide `used` from it while it writes the frames.
        used, max_data.used = max_data.used, 0
        try:
            super()._write_connection_limits(builder, space)
        finally:
            max_data.used = used

    def close(self, error_code=0, frame_type=None, reason_phrase=""):
        if self.local_close is None and self._close_event is None:
            self.local_close = (error_code, frame_type, reason_phrase)
        super().close(error_code=error_code, frame_type=frame_type,
                      reason_phrase=reason_phrase)

    # Path MTU probes (mahole.pmtu) -------------------------------------------------------
    @property
    def max_datagram_size(self):
        """The largest QUIC packet (UDP payload on the path) this side sends."""
        return self._max_datagram_size

    @property
    def max_datagram_frame(self):
        """The largest DATAGRAM frame data one packet of the current size carries."""
        return datagram_frame_room(self._max_datagram_size, len(self._peer_cid.cid))

    def set_max_datagram_size(self, size):
        """Packets up to `size` bytes from now on (what path MTU discovery found). Returns
        how many queued DATAGRAM frames no longer fit and were dropped: aioquic would keep
        such a frame at the head of its queue for ever (RFC 9221 §5: one frame, one
        packet), holding back every datagram behind it."""
        self._max_datagram_size = size
        limit = self.max_datagram_frame
        pending = self._datagrams_pending
        kept = [frame for frame in pending if len(frame) <= limit]
        dropped = len(pending) - len(kept)
        if dropped:
            pending.clear()
            pending.extend(kept)
        return dropped

    def send_mtu_probe(self, size, on_result):
        """Send a path MTU probe with the next datagrams: one 1-RTT packet of exactly `size`
        bytes holding PING and PADDING (RFC 9000 §14.4). `on_result(size, acked)` is called
        once, when aioquic sees it acknowledged or declares it lost (by its usual loss
        detection, RFC 9002 §6), with acked None if it could not be sent (the handshake not
        confirmed yet, the path not validated, the connection closing). The probe is not
        counted in flight: its loss says nothing of congestion (RFC 9000 §14.4), so the
        congestion window does not shrink for it."""
        self._mtu_probes.append((size, on_result))

    def datagrams_to_send(self, now):
        if self._steady():
            datagrams = self._send_application(now)
        else:
            datagrams = super().datagrams_to_send(now)
        if self._mtu_probes:
            probes, self._mtu_probes = self._mtu_probes, []
            for size, on_result in probes:
                if self._can_send_mtu_probe():
                    datagrams.extend(self._build_mtu_probe(size, on_result, now))
                else:
                    on_result(size, None)
        return datagrams

    def receive_datagram(self, data, addr, now):
        paths = self._network_paths
        if (data and not data[0] & 0x80 and self._quic_logger is None
                and self._handshake_confirmed
                and self._state == QuicConnectionState.CONNECTED and len(paths) == 1
                and paths[0].addr == addr and paths[0].is_validated):
            self._receive_short(data, paths[0], now)
        else:
            super().receive_datagram(data, addr, now)

    def _receive_short(self, data, network_path, now):
        """aioquic 1.7's receive_datagram for what a steady connection receives most: a
        datagram of one 1-RTT packet from its validated path, no qlog. The same steps and
        decisions, without those that cannot apply (long headers, version negotiation,
        retry, the first flight, a new or unvalidated path, logging), the header read by
        slicing, the 1-RTT keys and packet space looked up once, and the frames read by
        the compiled port of aioquic's _payload_received (mahole._fast.payload_received).
        It is a bulk receiver's largest per-packet Python work."""
        if self._close_at is None:
            self._close_at = now + self._idle_timeout()
        cid_end = 1 + self._configuration.connection_id_length
        # RFC 9000 §17.3: the fixed bit is set, the DCID is the length we issue
        if not data[0] & PACKET_FIXED_BIT or len(data) < cid_end:
            return
        destination_cid = data[1:cid_end]
        for connection_id in self._host_cids:
            if connection_id.cid == destination_cid:
                break
        else:
            return  # unknown connection ID
        one_rtt = self._one_rtt
        if one_rtt is None:
            one_rtt = self._one_rtt = (self._cryptos[tls.Epoch.ONE_RTT],
                                       self._spaces[tls.Epoch.ONE_RTT],
                                       self._cryptos[tls.Epoch.ZERO_RTT].recv)
        crypto, space, zero_rtt = one_rtt
        try:
            plain_header, plain_payload, packet_number = crypto.decrypt_packet(
                data, cid_end, space.expected_packet_number)
        except (KeyUnavailableError, CryptoError):
            return  # dropped (aioquic logs it at debug level only)
        # RFC 9000 §12.3: duplicates are discarded
        if packet_number in space.received_packets:
            return
        if plain_header[0] & 0x18:  # reserved bits (RFC 9000 §17.3.1)
            self.close(error_code=QuicErrorCode.PROTOCOL_VIOLATION,
                       frame_type=QuicFrameType.PADDING,
                       reason_phrase="Reserved bits must be zero")
            return
        if packet_number > space.expected_packet_number:
            space.expected_packet_number = packet_number + 1
        # a server drops 0-RTT keys on the first 1-RTT packet (RFC 9001 §4.9.3)
        if not self._is_client and zero_rtt.is_valid():
            zero_rtt.teardown()
        if self._peer_cid.sequence_number is None:
            self._peer_cid.cid = b""
            self._peer_cid.sequence_number = 0
        if packet_number > self._spin_highest_pn:
            spin_bit = get_spin_bit(plain_header[0])
            self._spin_bit = not spin_bit if self._is_client else spin_bit
            self._spin_highest_pn = packet_number
        context = QuicReceiveContext(epoch=tls.Epoch.ONE_RTT, host_cid=destination_cid,
                                     network_path=network_path, quic_logger_frames=None,
                                     time=now, version=None)
        self.packets_authenticated += 1  # as _payload_received counts
        try:
            is_ack_eliciting, is_probing = payload_received(self, context, plain_payload)
        except QuicConnectionError as exc:
            self._logger.warning(exc)
            self.close(error_code=exc.error_code, frame_type=exc.frame_type,
                       reason_phrase=exc.reason_phrase)
        if self._state in END_STATES or self._close_pending:
            return
        self._close_at = now + self._idle_timeout()
        self._ack_eliciting_sent_since_receipt = False
        # The peer moved to another of our connection IDs (RFC 9000 §9.5; a probing packet
        # does not move it).
        if not self._is_client and not is_probing and destination_cid != self.host_cid:
            self.host_cid = destination_cid
            if network_path.peer_cid is None:
                self.change_connection_id()
        if not space.discarded:
            if packet_number > space.largest_received_packet:
                space.largest_received_packet = packet_number
                space.largest_received_time = now
            space.ack_queue.add(packet_number)
            space.received_packets.add(packet_number)
            # the oldest ACK range goes past MAX_ACK_RANGES (RFC 9000 §13.2.3)
            if len(space.ack_queue) > MAX_ACK_RANGES:
                space.ack_queue.shift()
            if is_ack_eliciting and space.ack_at is None:
                space.ack_at = now + self._ack_delay

    def _steady(self):
        """Established, on one path, nothing but 1-RTT packets to build: where aioquic's
        datagrams_to_send does no more than `_send_application` does."""
        return (self._handshake_confirmed and self._state == QuicConnectionState.CONNECTED
                and not self._close_pending and len(self._network_paths) == 1
                and (not self._is_client or self._remote_preferred_address is None))

    def _send_application(self, now):
        """aioquic 1.7's datagrams_to_send for a steady connection, with the compiled packet
        builder and the compiled port of aioquic's _write_application (mahole._fast
        PacketBuilder and write_application: the same packets as aioquic's): building and
        filling packets is most of a bulk sender's per-packet work. Congestion control
        stays aioquic's (its ACKs processed by mahole._fast.ack_receiver, set up in
        __init__)."""
        network_path = self._network_paths[0]
        builder = PacketBuilder(
            host_cid=self.host_cid, is_client=self._is_client,
            max_datagram_size=self._max_datagram_size, packet_number=self._packet_number,
            peer_cid=self._peer_cid.cid, peer_token=self._peer_token,
            quic_logger=self._quic_logger, spin_bit=self._spin_bit, version=self._version)
        # Only pacing holding back this attempt sets the pacing time (RFC 9002 §7.7).
        self._pacing_at = None
        builder.max_flight_bytes = self._loss.congestion_window - self._loss.bytes_in_flight
        # RFC 9002 §7: only probes may exceed the congestion window.
        if (self._probe_pending and builder.max_flight_bytes < self._max_datagram_size):
            builder.max_flight_bytes = self._max_datagram_size
        # anti-amplification on a path not validated yet (RFC 9000 §8.1)
        if not network_path.is_validated:
            builder.max_total_bytes = network_path.bytes_received * 3 - network_path.bytes_sent
        try:
            write_application(self, builder, network_path, now)
        except QuicPacketBuilderStop:
            pass
        return self._flush_builder(builder=builder, network_path=network_path,
                                   peer_cid=self._peer_cid.cid, now=now)

    def _can_send_mtu_probe(self):
        return (self._state == QuicConnectionState.CONNECTED and not self._close_pending
                and self._handshake_confirmed and self._network_paths[0].is_validated
                and self._cryptos[tls.Epoch.ONE_RTT].send.is_valid())

    def _build_mtu_probe(self, size, on_result, now):
        builder = QuicPacketBuilder(
            host_cid=self.host_cid, is_client=self._is_client, max_datagram_size=size,
            packet_number=self._packet_number, peer_cid=self._peer_cid.cid,
            peer_token=self._peer_token, quic_logger=self._quic_logger,
            spin_bit=self._spin_bit, version=self._version)
        builder.start_packet(QuicPacketType.ONE_RTT, self._cryptos[tls.Epoch.ONE_RTT])
        builder.start_frame(QuicFrameType.PING, handler=_mtu_probe_delivered,
                            handler_args=(size, on_result))
        builder._datagram_needs_padding = True  # PADDING up to the builder's full size
        datagrams, packets = builder.flush()
        for packet in packets:
            packet.in_flight = False
        return self._flush_builder(builder=_Built(datagrams, packets, builder.packet_number),
                                   network_path=self._network_paths[0],
                                   peer_cid=self._peer_cid.cid, now=now)

    @property
    def bytes_in_flight(self):
        """Bytes of ack-eliciting packets sent and not yet acknowledged or lost."""
        return self._loss.bytes_in_flight

    @property
    def datagrams_queued(self):
        """DATAGRAM frames (RFC 9221) waiting to be sent: aioquic's queue has no bound."""
        return len(self._datagrams_pending)

    def path_validated(self, addr):
        """Whether aioquic has validated addr as a path of this connection (RFC 9000 §8.2:
        PATH_CHALLENGE answered by PATH_RESPONSE, or the handshake's own address)."""
        return any(path.addr == addr and path.is_validated for path in self._network_paths)

    def send_probe(self):
        """A PING that goes out even when the congestion window is full, as a PTO probe does
        (RFC 9002 §7 lets probes exceed it). The session core's liveness PINGs are probes:
        after a loss burst the window is full of packets that will never be acknowledged,
        and a PING queued behind them would wait for the backed-off PTO, long enough to take
        a brief fade for a dead path."""
        self._probe_pending = True

    def reset_probe_backoff(self):
        """Forget the PTO backoff (RFC 9002 §6.2.1) after a route change: packets lost in a
        dead route are probed for at once over the new one, not after a backed-off PTO."""
        self._loss._pto_count = 0

    def _initialize(self, peer_cid):
        super()._initialize(peer_cid)
        if not self._is_client:
            self.tls._request_client_certificate = True
        # 1-RTT packets are decrypted by the compiled twin of the pair's own method
        # (mahole._fast.decrypter: the same results, without aioquic's Python wrappers).
        pair = self._cryptos[tls.Epoch.ONE_RTT]
        pair.decrypt_packet = decrypter(pair)

    def peer_certificates(self):
        """[leaf, *chain] the peer presented in the handshake, or [] if none."""
        leaf = getattr(self.tls, "_peer_certificate", None)
        if leaf is None:
            return []
        return [leaf] + list(getattr(self.tls, "_peer_certificate_chain", []))

    @property
    def smoothed_rtt(self):
        """Smoothed RTT in seconds (RFC 9002 §5.3), or None before the first sample."""
        loss = self._loss
        return loss._rtt_smoothed if loss._rtt_initialized else None

    @property
    def latest_rtt(self):
        """(serial, seconds) of the newest RTT sample (RFC 9002 §5.2, ack delay taken off),
        or None before the first: what one round trip on the current route took just now.
        The serial changes with every new sample (a sample is taken when the largest packet
        number acknowledged grows), so equal values are still told apart."""
        loss = self._loss
        if not loss._rtt_initialized:
            return None
        serial = sum(space.largest_acked_packet for space in self._spaces.values())
        return serial, loss._rtt_latest

    def pause_stream(self, stream_id):
        self._paused_streams.add(stream_id)

    def resume_stream(self, stream_id):
        self._paused_streams.discard(stream_id)

    def stream_send_buffered(self, stream_id):
        """Bytes written to a stream and not yet acknowledged by the peer."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return len(stream.sender._buffer)

    def _write_stream_limits(self, builder, space, stream):
        """Grant stream credit (MAX_STREAM_DATA) one fixed window ahead of what was received.

        aioquic doubles the window whenever half of it is used, without bound, which is fine
        for a consumer that never stalls; here the consumer can be a slow TCP peer, so the
        window stays `max_stream_data` ahead of the data received and is not moved at all
        while the stream is paused. That bounds what a stream can buffer.
        """
        if stream.stream_id in self._paused_streams or not stream.max_stream_data_local:
            return
        window = self._configuration.max_stream_data
        delivered = stream.receiver.starting_offset()  # handed to the application, in order
        if delivered + window // 2 > stream.max_stream_data_local:
            stream.max_stream_data_local = delivered + window
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local


def _mtu_probe_delivered(delivery, size, on_result):
    on_result(size, delivery == QuicDeliveryState.ACKED)


class _Built:
    """Packets already built, handed to aioquic's `_flush_builder` as if by a builder."""

    def __init__(self, datagrams, packets, packet_number):
        self._flushed = (datagrams, packets)
        self.packet_number = packet_number

    def flush(self):
        return self._flushed


# A 1-RTT packet's bytes around a DATAGRAM frame's data (RFC 9000 §17.3.1, RFC 9221 §4): the
# first byte, the destination connection id, a packet number of up to 4 bytes, the AEAD tag
# (16), the frame type (1) and a length of up to 2 bytes; 8 more leave room for aioquic's
# header-protection padding rule.
def datagram_frame_room(packet_size, cid_length=8):
    """The largest DATAGRAM frame data that fits in one packet of `packet_size` bytes."""
    return packet_size - (1 + cid_length + 4) - 16 - 3 - 8


def verify_peer(connection, ca, expected_role, expected_name=None):
    """Check the certificate the peer proved to hold: chain, role, name. IdentityError if not."""
    chain = connection.peer_certificates()
    if not chain:
        raise identity.IdentityError("the peer presented no certificate")
    return identity.verify_peer(chain, ca, expected_role=expected_role,
                                expected_name=expected_name)
