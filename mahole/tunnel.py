"""Carrying TCP connections on QUIC streams and UDP datagrams in QUIC DATAGRAM frames.

A `StreamPipe` joins one QUIC stream to one TCP connection, with backpressure both ways and
half-close: a slow TCP reader pauses the peer through QUIC stream flow control (RFC 9000 §4.1),
and a slow QUIC path pauses reading from TCP. UDP flows are multiplexed on DATAGRAM frames
(RFC 9221) with a 2-byte flow id in front of each payload; a UDP datagram too large for one
DATAGRAM frame is cut into fragments, one frame each, and put together again at the other end
by a `DatagramReassembler` (sans-IO, bounded, on a clock it is given). How large one frame
may be depends on the session's current packet size (path MTU discovery, mahole.pmtu).

Framing of a DATAGRAM frame's data (the top bit of the first byte tells the two apart):

    whole datagram:  0 | flow id (15 bits) | payload                      (2 bytes of header)
    fragment:        1 | flow id (15 bits) | datagram id (32 bits) | index (8) | count (8) | part

A datagram that fits in one frame is framed exactly as before fragmentation existed. Fragments
of one datagram share its flow id, datagram id and count; index runs from 0 to count - 1, and
every part but the last has the same length. A lost fragment loses the datagram (UDP semantics).
"""

import asyncio
import logging
import socket
import struct
from collections import OrderedDict

from .config import MIN_SEND_BUDGET
from .connection import datagram_frame_room
from .pmtu import BASE_PLPMTU

log = logging.getLogger(__name__)

READ_SIZE = MIN_SEND_BUDGET  # 64 KiB: bytes a stream reads from TCP at once
# What asyncio's transport receives from a socket at once (its default); with a send budget a
# stream receives one read at a time instead once the node has many streams (StreamPipe).
LARGE_RECEIVE = 256 * 1024
# Unacknowledged bytes on a QUIC stream before we stop reading its TCP side: half the
# end-to-end stream window (connection.E2E_STREAM_WINDOW), so a long path is kept full (the
# reading resumes at half of this).
SEND_HIGH_WATER = 4 << 20
# Bytes queued towards a TCP peer (received from QUIC, not yet taken by the kernel) before we
# stop granting the QUIC peer more stream credit. Credit already granted stays valid, so a
# stalled reader leaves at most RECEIVE_HIGH_WATER + one stream window (max_stream_data)
# queued: the window is granted only while the queue is at or under the high water.
RECEIVE_HIGH_WATER = 1 << 20

FLOW_ID_LEN = 2
# A DATAGRAM frame must fit in one QUIC packet (RFC 9221 §5) or aioquic keeps it queued for
# ever: what one packet of QUIC's minimum size (1,200 bytes) carries. Path MTU discovery
# (mahole.pmtu) raises a session's packet size, and `frame_datagram` is given the larger room.
MAX_DATAGRAM_PAYLOAD = datagram_frame_room(BASE_PLPMTU)

# The top bit of the 2-byte flow id field marks a fragment, so flow ids have 15 bits.
FRAGMENT_FLAG = 0x8000
MAX_FLOW_ID = 0x7FFF
# flow id | flag, datagram id, fragment index, fragment count
FRAGMENT_HEADER = struct.Struct("!HIBB")
FRAGMENT_PAYLOAD = MAX_DATAGRAM_PAYLOAD - FRAGMENT_HEADER.size
# Largest UDP payload over IPv4: 65535 - 8 (UDP header, RFC 768) - 20 (IPv4 header, RFC 791).
MAX_UDP_PAYLOAD = 65535 - 8 - 20
# A receiver accepts up to this many fragments in one datagram: enough for MAX_UDP_PAYLOAD in
# parts of ~1 kB (QUIC packets are at least 1200 bytes, RFC 9000 §14), whatever the sender's
# fragment size.
MAX_FRAGMENTS = 64

# Reassembly bounds, per session (every byte from the network is hostile).
REASSEMBLY_MAX_INCOMPLETE = 64  # datagrams waiting for fragments
REASSEMBLY_MAX_BYTES = 1 << 20  # bytes of fragments held
REASSEMBLY_TIMEOUT = 1.0  # seconds a datagram may wait for its last fragment


class StreamPipe:
    """One QUIC stream ↔ one TCP connection (asyncio reader/writer).

    The owner feeds QUIC events with `data_received(data, end_stream)` / `reset()`, and calls
    `progress()` whenever acknowledgements may have freed send buffer. With a `SendBudget`
    (mahole.send_budget) the pipe is its shell: a read is charged what it returned until the
    peer acknowledged it, and while the budget is spent the pipe waits before its next read
    with its TCP socket paused, so the sender blocks. A pipe that closed cleanly stays with its
    owner (`on_done` waits) until its last bytes are acknowledged: QUIC holds them till then.
    """

    def __init__(self, connection, stream_id, reader, writer, on_done=None, budget=None):
        self.connection = connection
        self.quic = connection.quic
        self.stream_id = stream_id
        self.reader = reader
        self.writer = writer
        self.on_done = on_done
        self.budget = budget
        self._charged = 0  # of the budget: read, not yet acknowledged
        self._grant = None  # Future while waiting for the budget
        self._lingering = False  # closed, its last charged bytes not yet acknowledged
        if budget is not None:
            budget.add_stream()
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
        budget = self.budget
        loop = asyncio.get_running_loop()
        # What the reader buffers ahead of the pipe is outside the budget: with many streams
        # the socket is received one read at a time, so each holds about one read there; with
        # few, 256 KiB at once, which moves a bulk transfer with a quarter less CPU.
        transport = self.writer.transport
        sized = budget is not None and hasattr(transport, "max_size")
        try:
            while True:
                await self._send_room.wait()
                if budget is not None:
                    if sized:
                        transport.max_size = (LARGE_RECEIVE if budget.few_streams(LARGE_RECEIVE)
                                              else READ_SIZE)
                    if not budget.admit(self, loop.time()):
                        await self._wait_for_budget()
                        if self._closed:
                            return
                data = await self.reader.read(READ_SIZE)
                if self._closed:
                    return
                if budget is not None and data:
                    self._charged += len(data)
                    budget.charge(self, len(data))
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

    async def _wait_for_budget(self):
        """Wait in line for the budget, the TCP socket paused meanwhile (unless the reader
        paused it already: its buffer is full, and it resumes it itself as the pipe reads)."""
        transport = self.writer.transport
        paused = transport.is_reading()
        if paused:
            transport.pause_reading()
        self._grant = asyncio.get_running_loop().create_future()
        try:
            await self._grant
        finally:
            self._grant = None
            self.budget.cancel(self)
            if paused and not self._closed and not transport.is_closing():
                transport.resume_reading()

    def _release(self, count):
        """Give `count` charged bytes back; the streams the budget then lets read go on."""
        self._charged -= count
        for pipe in self.budget.release(self, count,
                                       asyncio.get_running_loop().time()):
            if pipe._grant is not None and not pipe._grant.done():
                pipe._grant.set_result(None)

    def progress(self):
        """Acknowledgements arrived: give back to the budget what the peer acknowledged, and
        resume reading TCP if the stream drained enough."""
        if self._charged:
            acked = self._charged - self.quic.stream_send_buffered(self.stream_id)
            if acked > 0:
                self._release(acked)
            if self._lingering and not self._charged:
                self._done()
        if not self._closed and not self._send_room.is_set() and (
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
            if abort and self._lingering:  # the session ends: QUIC drops the bytes with it
                self._done()
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
        if self._charged and not abort:
            # Closed cleanly: QUIC still holds what the peer has not acknowledged, so it stays
            # charged (progress() gives it back) and the owner keeps the pipe till then.
            self._lingering = True
            self.progress()
            return
        self._done()

    def _done(self):
        self._lingering = False
        if self.budget is not None:
            self.budget.remove_stream()
            self.budget.cancel(self)
            if self._charged:
                self._release(self._charged)
        if self.on_done is not None:
            self.on_done(self)


async def stream_pair():
    """Two connected asyncio stream ends, ((reader, writer), (reader, writer)), over a
    socket pair: one end for a `StreamPipe`, the other for in-process code, with the same
    backpressure as a TCP peer."""
    ours, theirs = socket.socketpair()
    try:
        return (await asyncio.open_connection(sock=ours),
                await asyncio.open_connection(sock=theirs))
    except BaseException:
        ours.close()
        theirs.close()
        raise


def pack_datagram(flow_id, payload):
    """The DATAGRAM frame data of a whole (unfragmented) datagram."""
    return flow_id.to_bytes(FLOW_ID_LEN, "big") + payload


def unpack_datagram(data):
    """(flow_id, payload) of a whole datagram's frame data; ValueError if too short or if the
    frame is a fragment (see `DatagramReassembler`)."""
    if len(data) < FLOW_ID_LEN:
        raise ValueError("DATAGRAM frame shorter than its flow id")
    if data[0] & 0x80:
        raise ValueError("DATAGRAM frame is a fragment")
    return int.from_bytes(data[:FLOW_ID_LEN], "big"), data[FLOW_ID_LEN:]


def frame_datagram(flow_id, payload, datagram_id, max_frame=MAX_DATAGRAM_PAYLOAD):
    """The DATAGRAM frames' data carrying one UDP payload: one frame framed as `pack_datagram`
    when it fits in `max_frame` bytes, fragments otherwise. `datagram_id` (32 bits) tells the
    receiver which fragments belong together; the sender counts it up per session.
    ValueError if the flow id has more than 15 bits or the payload exceeds MAX_UDP_PAYLOAD."""
    if not 0 <= flow_id <= MAX_FLOW_ID:
        raise ValueError(f"flow id {flow_id} out of range")
    if FLOW_ID_LEN + len(payload) <= max_frame:
        return [pack_datagram(flow_id, payload)]
    if len(payload) > MAX_UDP_PAYLOAD:
        raise ValueError(f"datagram of {len(payload)} bytes exceeds {MAX_UDP_PAYLOAD}")
    part = max_frame - FRAGMENT_HEADER.size
    count = -(-len(payload) // part)
    if count > MAX_FRAGMENTS:
        raise ValueError(f"datagram of {len(payload)} bytes needs {count} fragments")
    data = memoryview(payload)
    first = FRAGMENT_FLAG | flow_id
    datagram_id &= 0xFFFFFFFF
    return [FRAGMENT_HEADER.pack(first, datagram_id, index, count)
            + bytes(data[index * part:(index + 1) * part]) for index in range(count)]


def unpack_fragment(data):
    """(flow_id, datagram_id, index, count, part) of a fragment's frame data; ValueError on
    anything a sender following `frame_datagram` cannot produce."""
    if len(data) <= FRAGMENT_HEADER.size:
        raise ValueError("fragment shorter than its header or empty")
    first, datagram_id, index, count = FRAGMENT_HEADER.unpack_from(data)
    if not first & FRAGMENT_FLAG:
        raise ValueError("not a fragment")
    if not 2 <= count <= MAX_FRAGMENTS:
        raise ValueError(f"fragment count {count} out of range")
    if index >= count:
        raise ValueError(f"fragment index {index} not below count {count}")
    return first & MAX_FLOW_ID, datagram_id, index, count, data[FRAGMENT_HEADER.size:]


class _Partial:
    __slots__ = ("started", "count", "parts", "have", "size", "part_len")

    def __init__(self, started, count):
        self.started = started
        self.count = count
        self.parts = [None] * count
        self.have = 0
        self.size = 0
        self.part_len = None  # length of every part but the last, once one arrived


class DatagramReassembler:
    """The receiving end of one session's DATAGRAM frames (sans-IO: it is told the time).

    `receive(data, now)` returns `(flow_id, payload)` for a whole datagram (one arrived whole or
    the last missing fragment of one), or None. Bounded: at most `max_incomplete` datagrams and
    `max_bytes` bytes of fragments wait at once (the oldest is given up to make room), and each
    waits at most `timeout` seconds. What it drops it counts in `counters` and reports through
    `on_drop(flow_id, reason)` (flow_id None when the frame could not be parsed):

    - ``malformed``: a frame no sender produces (too short, bad count or index);
    - ``duplicate``: a fragment received again, identical — the fragment alone is dropped;
    - ``inconsistent``: a fragment that contradicts the ones held (another count, other bytes
      at the same index, another part length, too many bytes) — the datagram is given up;
    - ``expired``: a datagram whose fragments did not all arrive within `timeout`;
    - ``evicted``: a datagram given up to make room for newer ones.
    """

    REASONS = ("malformed", "duplicate", "inconsistent", "expired", "evicted")

    def __init__(self, max_incomplete=REASSEMBLY_MAX_INCOMPLETE,
                 max_bytes=REASSEMBLY_MAX_BYTES, timeout=REASSEMBLY_TIMEOUT, on_drop=None):
        if max_bytes < MAX_UDP_PAYLOAD or max_incomplete < 1:
            raise ValueError("reassembly bounds too small for one datagram")
        self.max_incomplete = max_incomplete
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.on_drop = on_drop
        self.counters = dict.fromkeys(self.REASONS, 0)
        self.reassembled = 0
        self.bytes = 0  # bytes of fragments held
        self._partial = OrderedDict()  # (flow id, datagram id) -> _Partial, oldest first

    def __len__(self):
        return len(self._partial)

    def _drop(self, reason, flow_id):
        self.counters[reason] += 1
        if self.on_drop is not None:
            self.on_drop(flow_id, reason)

    def _give_up(self, key, reason):
        partial = self._partial.pop(key)
        self.bytes -= partial.size
        self._drop(reason, key[0])

    def next_expiry(self):
        """When the oldest incomplete datagram expires (None: none waits); the owner calls
        `expire` then, so a datagram whose last fragment never comes is not held until the
        next frame arrives."""
        if not self._partial:
            return None
        return next(iter(self._partial.values())).started + self.timeout

    def expire(self, now):
        """Give up the datagrams that waited `timeout` seconds or more."""
        while self._partial:
            key, partial = next(iter(self._partial.items()))
            if now - partial.started < self.timeout:
                break
            self._give_up(key, "expired")

    def receive(self, data, now):
        self.expire(now)
        try:
            if data[:1] and not data[0] & 0x80:
                return unpack_datagram(data)
            flow_id, datagram_id, index, count, part = unpack_fragment(data)
        except ValueError:
            self._drop("malformed", None)
            return None
        key = (flow_id, datagram_id)
        partial = self._partial.get(key)
        if partial is None:
            while len(self._partial) >= self.max_incomplete:
                self._give_up(next(iter(self._partial)), "evicted")
            partial = self._partial[key] = _Partial(now, count)
        elif partial.count != count:
            self._give_up(key, "inconsistent")
            return None
        held = partial.parts[index]
        if held is not None:
            if held == part:
                self._drop("duplicate", flow_id)
            else:
                self._give_up(key, "inconsistent")
            return None
        if not self._fits(partial, index, part):
            self._give_up(key, "inconsistent")
            return None
        while self.bytes + len(part) > self.max_bytes:
            oldest = next(iter(self._partial))
            if oldest == key:  # cannot happen while max_bytes >= MAX_UDP_PAYLOAD
                self._give_up(key, "evicted")
                return None
            self._give_up(oldest, "evicted")
        partial.parts[index] = bytes(part)
        partial.have += 1
        partial.size += len(part)
        self.bytes += len(part)
        if partial.have < partial.count:
            return None
        del self._partial[key]
        self.bytes -= partial.size
        self.reassembled += 1
        return flow_id, b"".join(partial.parts)

    @staticmethod
    def _fits(partial, index, part):
        """Every part but the last has one length, the last is no longer, and the whole
        stays a UDP payload."""
        last = partial.count - 1
        if index == last:
            return partial.part_len is None or len(part) <= partial.part_len
        if partial.part_len is not None:
            return len(part) == partial.part_len
        held_last = partial.parts[last]
        if held_last is not None and len(held_last) > len(part):
            return False
        if len(part) * last >= MAX_UDP_PAYLOAD:
            return False
        partial.part_len = len(part)
        return True
