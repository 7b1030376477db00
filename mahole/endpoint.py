"""The one-socket node: batch I/O, dispatch by the compiled router, aioquic connections, timers.

Every datagram a node sends or receives — control QUIC, STUN, relay frames, end-to-end QUIC —
goes through one UDP socket (DESIGN.md principle 1). The endpoint reads it in batches, lets
the `Router` classify and route a whole batch at once, feeds QUIC packets to sans-IO aioquic
connections, and sends everything they produce in batches. One timer heap serves all
connections. Connections that carry an end-to-end session have a *path*: aioquic sees a
stable virtual peer address, and the path decides where each packet really goes.
"""

import asyncio
import heapq
import itertools
import logging
from collections import deque

from aioquic.quic import events as qe

from ._fast import BatchSocket, Router

log = logging.getLogger(__name__)

# How many receive batches one wake-up may process before yielding to other tasks.
MAX_BATCHES_PER_WAKEUP = 16
# Bound on datagrams waiting for the socket to become writable; beyond it new ones are
# dropped (UDP semantics: QUIC recovers, a relay must never block).
MAX_OUTBOX = 4096


class Connection:
    """One aioquic connection on the endpoint, with the handler that receives its events.

    handler: object with `quic_event(connection, event)`; optional `connection_closed(conn)`.
    path:    None (packets go to and come from the address aioquic uses), or an object with
             `outbound(data) -> (bytes, addr) | None` and `inbound(addr, now) -> bool` deciding
             where the end-to-end packets go and which sources are accepted.
    """

    def __init__(self, endpoint, quic, handler, path=None, peer_addr=None):
        self.endpoint = endpoint
        self.quic = quic
        self.handler = handler
        self.path = path
        self.peer_addr = peer_addr  # last address a datagram came from (QAD at the server)
        self.cids = set()
        self.closed = False
        self.timer = None
        self.bytes_received = 0
        self.bytes_sent = 0
        self.packets_received = 0
        self.packets_sent = 0
        self.last_rx = None  # when the last datagram of this connection arrived
        self._virtual_addr = peer_addr

    def __repr__(self):
        return f"<Connection {self.quic.host_cid.hex()} peer={self.peer_addr}>"

    # Receive ---------------------------------------------------------------------------
    def datagram_received(self, data, addr, now):
        if self.closed:
            return
        if self.path is not None:
            if not self.path.inbound(addr, now):
                self.endpoint.counters["dropped_wrong_source"] += 1
                return
            addr = self._virtual_addr
        elif addr != self.peer_addr:
            previous, self.peer_addr = self.peer_addr, addr
            changed = getattr(self.handler, "peer_address_changed", None)
            if changed is not None and previous is not None:
                changed(self, previous, addr)
        self.bytes_received += len(data)
        self.packets_received += 1
        self.last_rx = now
        self.quic.receive_datagram(data, addr, now)
        self.process_events()
        self.endpoint.mark(self)

    def path_datagram_received(self, data, now):
        """An end-to-end packet its path already vouched for (e.g. unwrapped from the relay)."""
        if self.closed:
            return
        self.bytes_received += len(data)
        self.packets_received += 1
        self.last_rx = now
        self.quic.receive_datagram(data, self._virtual_addr, now)
        self.process_events()
        self.endpoint.mark(self)

    def process_events(self):
        quic = self.quic
        router = self.endpoint.router
        while True:
            event = quic.next_event()
            if event is None:
                break
            if isinstance(event, qe.ConnectionIdIssued):
                self.cids.add(event.connection_id)
                router.add_connection(event.connection_id, self)
            elif isinstance(event, qe.ConnectionIdRetired):
                self.cids.discard(event.connection_id)
                router.remove_connection(event.connection_id)
            self.handler.quic_event(self, event)
            if isinstance(event, qe.ConnectionTerminated):
                self._terminated()
                break

    def _terminated(self):
        if self.closed:
            return
        self.closed = True
        self.endpoint._forget(self)
        closed = getattr(self.handler, "connection_closed", None)
        if closed is not None:
            closed(self)

    # Send ------------------------------------------------------------------------------
    def transmit(self):
        """Ask the endpoint to collect this connection's packets soon (after API calls)."""
        self.endpoint.mark(self)

    def collect(self, now, out):
        """Append this connection's datagrams (through its path) to out; re-arm its timer."""
        datagrams = self.quic.datagrams_to_send(now=now)
        path = self.path
        for data, addr in datagrams:
            self.bytes_sent += len(data)
            self.packets_sent += 1
            if path is not None:
                routed = path.outbound(data)
                if routed is not None:
                    out.append(routed)
            else:
                out.append((data, addr))
        timer = self.quic.get_timer()
        if timer != self.timer:
            self.timer = timer
            if timer is not None:
                self.endpoint._arm_timer(self, timer)

    def close(self, error_code=0, reason=""):
        if not self.closed:
            self.quic.close(error_code=error_code, reason_phrase=reason)
            self.transmit()


class Endpoint:
    """A node's UDP socket, its router, connections and timers.

    on_stun(data, addr), on_initial(header, data, addr): hooks for the datagrams the router
    does not send to a connection. Relay frames go to the session entry registered with
    `router.add_session(session_id, entry)`: `entry.relay_frame_received(frame, addr)`.
    `receiver` replaces the plain batch reader (the intermediate's relay engine reads the
    socket itself and hands back what it does not relay).
    """

    def __init__(self, sock, *, on_stun=None, on_initial=None, receiver=None, batch_size=32):
        self.sock = sock
        self.batch = BatchSocket(sock, batch_size)
        self.receiver = receiver if receiver is not None else self.batch
        self.router = Router()
        self.on_stun = on_stun
        self.on_initial = on_initial
        self.connections = set()
        self.counters = {
            "datagrams_received": 0, "datagrams_sent": 0, "bytes_received": 0,
            "bytes_sent": 0, "dropped_wrong_source": 0, "dropped_initial": 0,
            "dropped_stun": 0, "dropped_outbox_full": 0, "send_errors": 0,
        }
        self.loop = None
        self._dirty = set()
        self._flush_scheduled = False
        self._outbox = deque()
        self._writer_waiting = False
        self._timers = []
        self._timer_seq = itertools.count()
        self._timer_handle = None
        self._timer_at = None
        self._closed = False

    @property
    def local_address(self):
        return self.sock.getsockname()

    def start(self):
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def now(self):
        return self.loop.time()

    def close(self):
        """Stop reading; connections are dropped without sending anything more."""
        if self._closed:
            return
        self._closed = True
        if self.loop is not None:
            self.loop.remove_reader(self.sock.fileno())
            if self._writer_waiting:
                self.loop.remove_writer(self.sock.fileno())
        if self._timer_handle is not None:
            self._timer_handle.cancel()
        self.sock.close()

    # Connections -----------------------------------------------------------------------
    def add_connection(self, quic, handler, *, path=None, peer_addr=None, extra_cids=()):
        """Register an aioquic connection (already connect()ed for clients)."""
        conn = Connection(self, quic, handler, path=path, peer_addr=peer_addr)
        self.connections.add(conn)
        for cid in (quic.host_cid, *extra_cids):
            conn.cids.add(cid)
            self.router.add_connection(cid, conn)
        conn.process_events()
        self.mark(conn)
        return conn

    def _forget(self, conn):
        self.connections.discard(conn)
        for cid in conn.cids:
            if self.router.connection(cid) is conn:
                self.router.remove_connection(cid)
        conn.cids.clear()
        self._dirty.discard(conn)

    # Receive ---------------------------------------------------------------------------
    def _on_readable(self):
        receiver = self.receiver
        for _ in range(MAX_BATCHES_PER_WAKEUP):
            try:
                batch = receiver.recv_batch() if receiver is self.batch else receiver.poll()
            except OSError as exc:  # e.g. ICMP errors surfacing on the socket
                log.debug("receive error: %s", exc)
                continue
            if batch:
                self.process(batch)
            elif not getattr(receiver, "last_batch_size", 0):
                break
        self.flush()

    def process(self, datagrams):
        """Route one received batch to connections, sessions and hooks."""
        counters = self.counters
        counters["datagrams_received"] += len(datagrams)
        counters["bytes_received"] += sum(len(data) for data, _addr in datagrams)
        result = self.router.dispatch(datagrams)
        now = self.loop.time()
        for conn, (data, addr) in zip(result.quic_handles, result.quic_datagrams):
            conn.datagram_received(data, addr, now)
        if result.initials:
            if self.on_initial is None:
                counters["dropped_initial"] += len(result.initials)
            else:
                for header, data, addr in result.initials:
                    self.on_initial(header, data, addr)
        if result.stun:
            if self.on_stun is None:
                counters["dropped_stun"] += len(result.stun)
            else:
                for data, addr in result.stun:
                    self.on_stun(data, addr)
        for entry, data, addr in result.relay:
            entry.relay_frame_received(data, addr)

    # Send ------------------------------------------------------------------------------
    def mark(self, conn):
        """conn has something to send: collect it at the end of this loop iteration."""
        self._dirty.add(conn)
        if not self._flush_scheduled and self.loop is not None:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def send(self, datagrams):
        """Queue raw datagrams (STUN, relay frames) for the next flush."""
        self._queue(datagrams)
        if not self._flush_scheduled and self.loop is not None:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def _queue(self, datagrams):
        room = MAX_OUTBOX - len(self._outbox)
        if len(datagrams) > room:
            self.counters["dropped_outbox_full"] += len(datagrams) - max(room, 0)
            datagrams = datagrams[:max(room, 0)]
        self._outbox.extend(datagrams)

    def flush(self):
        """Collect packets from every connection that has something to send; send batches."""
        self._flush_scheduled = False
        if self._closed:
            return
        if self._dirty:
            now = self.loop.time()
            out = []
            dirty, self._dirty = self._dirty, set()
            for conn in dirty:
                if not conn.closed:
                    progress = getattr(conn.handler, "progress", None)
                    if progress is not None:
                        progress(conn)  # acknowledgements may have freed send buffer
                    conn.collect(now, out)
                    conn.process_events()  # closing may have ended the connection
            self._queue(out)
        self._send_outbox()

    def _send_outbox(self):
        outbox = self._outbox
        batch_size = self.batch.batch_size
        while outbox:
            chunk = [outbox[i] for i in range(min(batch_size, len(outbox)))]
            errors_before = self.batch.send_errors
            try:
                used = self.batch.send_batch(chunk)
            except (OSError, ValueError) as exc:
                log.warning("dropping %d datagrams that could not be sent: %s", len(chunk), exc)
                used = len(chunk)
                self.counters["send_errors"] += len(chunk)
            self.counters["send_errors"] += self.batch.send_errors - errors_before
            for _ in range(used):
                data, _addr = outbox.popleft()
                self.counters["bytes_sent"] += len(data)
            self.counters["datagrams_sent"] += used
            if used < len(chunk):
                # Socket buffer full: wait until it is writable again.
                if not self._writer_waiting:
                    self._writer_waiting = True
                    self.loop.add_writer(self.sock.fileno(), self._on_writable)
                return

    def _on_writable(self):
        self._writer_waiting = False
        self.loop.remove_writer(self.sock.fileno())
        self._send_outbox()

    # Timers ----------------------------------------------------------------------------
    def _arm_timer(self, conn, when):
        heapq.heappush(self._timers, (when, next(self._timer_seq), conn))
        if self._timer_at is None or when < self._timer_at:
            self._schedule_timer(when)

    def _schedule_timer(self, when):
        if self._timer_handle is not None:
            self._timer_handle.cancel()
        self._timer_at = when
        self._timer_handle = self.loop.call_at(when, self._on_timer)

    def _on_timer(self):
        self._timer_handle = None
        self._timer_at = None
        now = self.loop.time()
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _seq, conn = heapq.heappop(timers)
            if conn.closed or conn.timer != when:
                continue  # superseded: the connection re-armed or went away
            conn.timer = None
            conn.quic.handle_timer(now=now)
            conn.process_events()
            self.mark(conn)
        if timers:
            self._schedule_timer(timers[0][0])
        self.flush()
