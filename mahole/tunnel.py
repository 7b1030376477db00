"""Carrying TCP connections on QUIC streams and UDP datagrams in QUIC DATAGRAM frames.

A `StreamPipe` joins one QUIC stream to one TCP connection, with backpressure both ways and
half-close: a slow TCP reader pauses the peer through QUIC stream flow control (RFC 9000 §4.1),
and a slow QUIC path pauses reading from TCP. UDP flows are multiplexed on DATAGRAM frames
(RFC 9221) with a 2-byte flow id in front of each payload.
"""

import asyncio
import logging

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
# Unacknowledged bytes on a QUIC stream before we stop reading its TCP side.
SEND_HIGH_WATER = 1 << 20
# Bytes queued towards a TCP peer (received from QUIC, not yet taken by the kernel) before we
# stop granting the QUIC peer more stream credit. Credit already granted stays valid, so a
# stalled reader leaves at most RECEIVE_HIGH_WATER + one stream window (max_stream_data)
# queued: the window is granted only while the queue is at or under the high water.
RECEIVE_HIGH_WATER = 1 << 20

FLOW_ID_LEN = 2
# A DATAGRAM frame must fit in one QUIC packet (RFC 9221 §5) or aioquic keeps it queued for
# ever: max_datagram_size 1200 minus short header (1 + 8-byte DCID + up to 4-byte packet
# number), AEAD tag (16), frame type and length (1 + 2), rounded down for safety.
MAX_DATAGRAM_PAYLOAD = 1200 - (1 + 8 + 4) - 16 - 3 - 8


class StreamPipe:
    """One QUIC stream ↔ one TCP connection (asyncio reader/writer).

    The owner feeds QUIC events with `data_received(data, end_stream)` / `reset()`, and calls
    `progress()` whenever acknowledgements may have freed send buffer.
    """

    def __init__(self, connection, stream_id, reader, writer, on_done=None):
        self.connection = connection
        self.quic = connection.quic
        self.stream_id = stream_id
        self.reader = reader
        self.writer = writer
        self.on_done = on_done
        self.bytes_to_quic = 0
        self.bytes_from_quic = 0
        self._send_room = asyncio.Event()
        self._send_room.set()
        self._quic_finished = False
        self._tcp_finished = False
        self._drain_task = None
        self._closed = False
        self._incoming = []
        self._incoming_size = 0
        self._paused = False
        self._write_scheduled = False
        self._eof_written = False
        self._pump = asyncio.get_running_loop().create_task(self._tcp_to_quic())

    async def _tcp_to_quic(self):
        try:
            while True:
                await self._send_room.wait()
                data = await self.reader.read(READ_SIZE)
                if self._closed:
                    return
                if not data:
                    self.quic.send_stream_data(self.stream_id, b"", end_stream=True)
                    self.connection.transmit()
                    break
                self.bytes_to_quic += len(data)
                self.quic.send_stream_data(self.stream_id, data)
                self.connection.transmit()
                if self.quic.stream_send_buffered(self.stream_id) > SEND_HIGH_WATER:
                    self._send_room.clear()
        except (ConnectionError, OSError) as exc:
            log.debug("stream %d: TCP read failed: %s", self.stream_id, exc)
            self._abort_quic()
            return
        except Exception as exc:  # noqa: BLE001 - the QUIC stream may be gone (reset, closed)
            log.debug("stream %d: %s", self.stream_id, exc)
            self._abort_quic()
            return
        self._tcp_finished = True
        self._maybe_done()

    def progress(self):
        """Acknowledgements arrived: resume reading TCP if the stream drained enough."""
        if not self._send_room.is_set() and (
                self.quic.stream_send_buffered(self.stream_id) <= SEND_HIGH_WATER // 2):
            self._send_room.set()

    def data_received(self, data, end_stream):
        """Stream data from QUIC: queued and written to TCP once per event-loop iteration.

        One QUIC packet carries about a kilobyte; writing each to the socket costs a system
        call per packet on both ends, so the chunks of a received batch are joined. The queue
        is checked against the high water here, on every chunk, not when it is written: the
        endpoint collects packets (and with them new stream credit) as soon as it has handled
        a receive batch, before the write runs, and that credit must not count the chunks
        waiting here as taken by the reader.
        """
        if self._closed:
            return
        if data:
            self.bytes_from_quic += len(data)
            self._incoming.append(data)
            self._incoming_size += len(data)
        if end_stream:
            self._quic_finished = True
        if not self._write_scheduled:
            self._write_scheduled = True
            asyncio.get_running_loop().call_soon(self._write_incoming)
        if not self._paused and self._queued() > RECEIVE_HIGH_WATER:
            self._pause()

    def _queued(self):
        """Bytes received from QUIC and not yet taken by the kernel."""
        return self.writer.transport.get_write_buffer_size() + self._incoming_size

    def _write_incoming(self):
        self._write_scheduled = False
        if self._closed:
            return
        writer = self.writer
        if self._incoming:
            data = b"".join(self._incoming) if len(self._incoming) > 1 else self._incoming[0]
            self._incoming.clear()
            self._incoming_size = 0
            writer.write(data)
        if self._quic_finished and not self._eof_written:
            self._eof_written = True
            if writer.can_write_eof():
                try:
                    writer.write_eof()
                except OSError:
                    pass
            self._maybe_done()
            return
        if not self._paused and self._queued() > RECEIVE_HIGH_WATER:
            self._pause()

    def _pause(self):
        """Stop granting the peer credit until the TCP side drained under the high water."""
        if self.writer.is_closing():
            return
        self._paused = True
        self.quic.pause_stream(self.stream_id)
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self):
        try:
            while self._queued() > RECEIVE_HIGH_WATER:
                if self._closed:
                    return
                if self._incoming_size:
                    await asyncio.sleep(0)  # let _write_incoming hand the queue to the transport
                await self.writer.drain()
        except (ConnectionError, OSError):
            self._abort_quic()
            return
        finally:
            self._drain_task = None
        if self._closed:
            return
        self._paused = False
        self.quic.resume_stream(self.stream_id)
        self.connection.transmit()

    def reset(self):
        """The peer reset the stream: drop the TCP connection."""
        self._quic_finished = self._tcp_finished = True
        self.close(abort=True)

    def _abort_quic(self):
        try:
            self.quic.reset_stream(self.stream_id, error_code=1)
            self.connection.transmit()
        except Exception:  # noqa: BLE001 - stream already finished or connection closed
            pass
        self.close(abort=True)

    def _maybe_done(self):
        if self._quic_finished and self._tcp_finished:
            self.close()

    def close(self, abort=False):
        if self._closed:
            return
        self._closed = True
        self._send_room.set()
        if self._pump is not asyncio.current_task():
            self._pump.cancel()
        transport = self.writer.transport
        if abort:
            transport.abort()
        else:
            self.writer.close()
        if self.on_done is not None:
            self.on_done(self)


def pack_datagram(flow_id, payload):
    return flow_id.to_bytes(FLOW_ID_LEN, "big") + payload


def unpack_datagram(data):
    """(flow_id, payload) of a DATAGRAM frame's data; ValueError if too short."""
    if len(data) < FLOW_ID_LEN:
        raise ValueError("DATAGRAM frame shorter than its flow id")
    return int.from_bytes(data[:FLOW_ID_LEN], "big"), data[FLOW_ID_LEN:]
