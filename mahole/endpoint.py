"""The one-socket node: batch I/O, dispatch by the compiled router, aioquic connections, timers.

Every datagram a node sends or receives — control QUIC, STUN, relay frames, end-to-end QUIC —
goes through one UDP socket (docs/architecture.md, principle 1). The endpoint reads it in
batches, lets the `Router` classify and route a whole batch at once, feeds QUIC packets to
sans-IO aioquic connections, and sends everything they produce in batches. One keyed timer
scheduler (the compiled `Scheduler`) serves every timer of the node: QUIC connections, hole
punching, session cores, keepalives. Connections that carry an end-to-end session have a
*path*: aioquic sees a stable virtual peer address, and the path decides where each packet
really goes.

The one exception to one socket is birthday probing (docs/architecture.md): a side socket
that won becomes the route to one peer address (`add_side_socket`): every datagram to that
address leaves from it, and what it receives is processed like the main socket's.

Nothing a peer sends may break the loop: an exception while handling one datagram or one
timer is logged once per kind, counted, and the rest of the batch is processed.
"""

import asyncio
import ipaddress
import logging
import socket
from collections import deque

from aioquic.quic import events as qe

from ._fast import BatchSocket, Router, Scheduler

log = logging.getLogger(__name__)

# How many receive batches one wake-up may process before yielding to other tasks.
MAX_BATCHES_PER_WAKEUP = 16
# Bound on datagrams waiting for the socket to become writable; beyond it new ones are
# dropped (UDP semantics: QUIC recovers, a relay must never block).
MAX_OUTBOX = 4096


class ConnectionHandler:
    """What the owner of a connection on the endpoint hears; every method is optional."""

    def quic_event(self, connection, event):
        """An aioquic event of the connection."""

    def packet_authenticated(self, connection, addr, now):
        """A datagram from addr (the real source, not the virtual peer address) carried a
        packet that aioquic decrypted: proof the peer sent it. Only these change state."""

    def peer_address_changed(self, connection, previous, addr):
        """An authenticated packet of a path-less connection came from a new address."""

    def progress(self, connection):
        """Acknowledgements may have freed send buffer (called before collecting packets)."""

    def connection_closed(self, connection):
        """The connection ended (after its ConnectionTerminated event)."""


class Connection:
    """One aioquic connection on the endpoint, with the handler that receives its events.

    handler: a `ConnectionHandler`.
    path:    None (packets go to and come from the address aioquic uses), or an object with
             `outbound(data) -> (bytes, addr) | None` and `inbound(addr) -> bool` deciding
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
        self.last_rx = None  # when the last authenticated packet of this connection arrived
        self._virtual_addr = peer_addr
        self._heard = []  # sources of authenticated packets not yet told to the handler
        self._heard_last = None

    def __repr__(self):
        return f"<Connection {self.quic.host_cid.hex()} peer={self.peer_addr}>"

    # Receive ---------------------------------------------------------------------------
    def datagram_received(self, data, addr, now):
        """A datagram straight from addr. Under a path aioquic sees the virtual peer address
        (the path picks routes); without one aioquic sees addr and validates a new address
        itself (RFC 9000 §9). Either way only a packet that decrypts tells the handler."""
        if self.closed:
            return
        if self.path is not None:
            if not self.path.inbound(addr):
                self.endpoint.counters["dropped_wrong_source"] += 1
                return
            self._receive(data, addr, self._virtual_addr, now)
        else:
            self._receive(data, addr, addr, now)

    def path_datagram_received(self, data, addr, now):
        """An end-to-end packet that arrived by a route of the path (e.g. unwrapped from a
        relay frame that came from addr)."""
        if self.closed:
            return
        self._receive(data, addr, self._virtual_addr, now)

    def _receive(self, data, addr, quic_addr, now):
        quic = self.quic
        before = quic.packets_authenticated
        self.bytes_received += len(data)
        self.packets_received += 1
        quic.receive_datagram(data, quic_addr, now)
        if quic.packets_authenticated != before:
            self.last_rx = now
            if self.path is None and addr != self.peer_addr:
                previous, self.peer_addr = self.peer_addr, addr
                if previous is not None:
                    self.handler.peer_address_changed(self, previous, addr)
            if addr != self._heard_last:  # one call per run of packets from one address
                self._heard_last = addr
                self._heard.append(addr)
        self.endpoint.received(self, now)

    def settle(self, now):
        """After the datagrams of one receive batch: tell the handler which addresses sent
        authenticated packets, hand on aioquic's events, collect what the connection sends.
        Once per batch, not per packet: a bulk transfer fills batches with one connection's
        packets, and all of them share the batch's `now`."""
        heard, self._heard, self._heard_last = self._heard, [], None
        for addr in heard:
            self.handler.packet_authenticated(self, addr, now)
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
        self.handler.connection_closed(self)

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
            if timer is None:
                self.endpoint.cancel_timer(self)
            else:
                self.endpoint.set_timer(self, timer, self._on_timer)

    def _on_timer(self, now):
        self.timer = None
        self.quic.handle_timer(now=now)
        self.process_events()
        self.endpoint.mark(self)

    def close(self, error_code=0, reason=""):
        if not self.closed:
            self.quic.close(error_code=error_code, reason_phrase=reason)
            self.transmit()

    def abandon(self, error_code=0, reason=""):
        """Close without waiting for a closing handshake that nobody will answer."""
        if not self.closed:
            self.quic.close(error_code=error_code, reason_phrase=reason)
            self.endpoint.flush()
            self._terminated()


def plain_addr(addr):
    """(host, port) of a socket address, an IPv4-mapped IPv6 host (``::ffff:a.b.c.d``, how a
    dual-stack socket reports IPv4 peers, RFC 4291 §2.5.5.2) given as plain IPv4."""
    host = addr[0]
    if host.startswith("::ffff:") and "." in host:
        try:
            mapped = ipaddress.IPv6Address(host).ipv4_mapped
        except ValueError:
            mapped = None
        if mapped is not None:
            host = str(mapped)
    return (host, addr[1])


class Endpoint:
    """A node's UDP socket, its router, connections and timers.

    on_stun(data, addr), on_initial(header, data, addr): hooks for the datagrams the router
    does not send to a connection. Relay frames go to the session entry registered with
    `router.add_session(session_id, entry)`: `entry.relay_frame_received(frame, addr)`.
    `receiver` replaces the plain batch reader (the intermediate's relay engine reads the
    socket itself and hands back what it does not relay).

    Timers: `set_timer(key, when, callback)` runs callback(now) once when due (one deadline
    per key, a new one replaces it), `cancel_timer(key)`. Sans-IO cores that schedule on
    `scheduler` themselves (hole punching) name their callbacks with `on_timer(key, callback)`
    and call `rearm()` afterwards.
    """

    def __init__(self, sock, *, on_stun=None, on_initial=None, receiver=None, batch_size=32):
        self.sock = sock
        # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d with flow and scope: every
        # address is handed on as the (host, port) the rest of mahole compares and sends to
        # (the batch socket maps an IPv4 destination back on the way out).
        self._plain = sock.family == socket.AF_INET6
        # UDP GRO only where the batch socket reads: the relay engine reads frames one each.
        self.batch = BatchSocket(sock, batch_size, gro=receiver is None)
        self.receiver = receiver if receiver is not None else self.batch
        self.router = Router()
        self.on_stun = on_stun
        self.on_initial = on_initial
        self.connections = set()
        self.counters = {
            "datagrams_received": 0, "datagrams_sent": 0, "bytes_received": 0,
            "bytes_sent": 0, "dropped_wrong_source": 0, "dropped_initial": 0,
            "dropped_stun": 0, "dropped_outbox_full": 0, "send_errors": 0,
            "handler_errors": 0,
        }
        self.loop = None
        self.scheduler = Scheduler()
        self._timer_callbacks = {}
        self._timer_handle = None
        self._timer_at = None
        self._errors_logged = set()
        self._dirty = set()
        self._flush_scheduled = False
        self._outbox = deque()
        self._writer_waiting = False
        self._closed = False
        self._side = {}  # peer address -> side socket routing it (birthday probing)
        self._receiver_fds = ()
        self._received = None  # while a batch is processed: connections to settle after it

    @property
    def local_address(self):
        return self.sock.getsockname()

    def start(self):
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.fileno(), self._on_readable)
        # A receiver reading more than the socket (the relay threads' hand-off) says where.
        self._receiver_fds = tuple(getattr(self.receiver, "reader_fds", tuple)())
        for fd in self._receiver_fds:
            self.loop.add_reader(fd, self._on_readable)

    def now(self):
        return self.loop.time()

    def close(self):
        """Stop reading; connections are dropped without sending anything more."""
        if self._closed:
            return
        self._closed = True
        if self.loop is not None:
            self.loop.remove_reader(self.sock.fileno())
            for fd in self._receiver_fds:
                self.loop.remove_reader(fd)
            if self._writer_waiting:
                self.loop.remove_writer(self.sock.fileno())
        if self._timer_handle is not None:
            self._timer_handle.cancel()
        for addr in list(self._side):
            self.remove_side_socket(addr)
        self.sock.close()

    # The one-socket exception ----------------------------------------------------------
    def add_side_socket(self, sock, addr):
        """From now on datagrams to ``addr`` (a plain (host, port)) leave from ``sock``, and
        what ``sock`` receives is routed like the main socket's. The endpoint owns it."""
        old = self._side.get(addr)
        if old is not None and old is not sock:
            self.remove_side_socket(addr)
        self._side[addr] = sock
        self.counters.setdefault("side_sent", 0)
        self.loop.add_reader(sock.fileno(), self._on_side_readable, sock)

    def remove_side_socket(self, addr, sock=None):
        """Close the side socket of ``addr`` (only if it is ``sock``, when given)."""
        current = self._side.get(addr)
        if current is None or (sock is not None and current is not sock):
            return
        del self._side[addr]
        if self.loop is not None:
            self.loop.remove_reader(current.fileno())
        current.close()

    def side_routes(self):
        return list(self._side)

    def _on_side_readable(self, sock):
        batch = []
        for _ in range(self.batch.batch_size):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # an ICMP error surfacing on the socket
                log.debug("side socket receive error: %s", exc)
                break
            batch.append((data, addr[:2]))
        if batch:
            self.process(batch)
        self.flush()

    def _send_aside(self, datagrams):
        """The datagrams not routed through a side socket (those are sent here, now)."""
        side, rest = self._side, []
        for item in datagrams:
            sock = side.get(item[1])
            if sock is None:
                rest.append(item)
                continue
            try:
                sock.sendto(item[0], item[1])
                self.counters["side_sent"] += 1
            except OSError:
                self.counters["send_errors"] += 1  # a full buffer: UDP, QUIC recovers
        return rest

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
        self.cancel_timer(conn)
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
        if self._plain:
            datagrams = [(data, plain_addr(addr)) for data, addr in datagrams]
        result = self.router.dispatch(datagrams)
        now = self.loop.time()
        self._received = {}
        try:
            for conn, (data, addr) in zip(result.quic_handles, result.quic_datagrams):
                try:
                    conn.datagram_received(data, addr, now)
                except Exception as exc:  # noqa: BLE001 - one bad datagram must not stop the batch
                    self.handler_failed("QUIC packet", exc)
        finally:
            self._settle(now)
        if result.initials:
            if self.on_initial is None:
                counters["dropped_initial"] += len(result.initials)
            else:
                for header, data, addr in result.initials:
                    try:
                        self.on_initial(header, data, addr)
                    except Exception as exc:  # noqa: BLE001
                        self.handler_failed("QUIC Initial", exc)
        if result.stun:
            if self.on_stun is None:
                counters["dropped_stun"] += len(result.stun)
            else:
                for data, addr in result.stun:
                    try:
                        self.on_stun(data, addr)
                    except Exception as exc:  # noqa: BLE001
                        self.handler_failed("STUN message", exc)
        if result.relay:
            self._received = {}
            try:
                for entry, data, addr in result.relay:
                    try:
                        entry.relay_frame_received(data, addr)
                    except Exception as exc:  # noqa: BLE001
                        self.handler_failed("relay frame", exc)
            finally:
                self._settle(now)

    def _settle(self, now):
        received, self._received = self._received, None
        for conn in received:
            if not conn.closed:
                try:
                    conn.settle(now)
                except Exception as exc:  # noqa: BLE001
                    self.handler_failed("QUIC packet", exc)

    def received(self, conn, now):
        """conn took a datagram: settle it after the batch being processed, or now."""
        if self._received is not None:
            self._received[conn] = None
        else:
            conn.settle(now)

    def handler_failed(self, kind, exc):
        """An unexpected exception while handling one input: count it, log it once per kind
        and exception type (a peer must not be able to flood the log), and carry on."""
        self.counters["handler_errors"] += 1
        what = (kind, type(exc).__name__)
        if what not in self._errors_logged:
            self._errors_logged.add(what)
            log.error("error while handling a %s (logged once; counted as handler_errors)",
                      kind, exc_info=exc)

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
        if self._side:
            datagrams = self._send_aside(datagrams)
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
                    try:
                        conn.handler.progress(conn)  # acks may have freed send buffer
                        conn.collect(now, out)
                        conn.process_events()  # closing may have ended the connection
                    except Exception as exc:  # noqa: BLE001
                        self.handler_failed("connection flush", exc)
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
    def set_timer(self, key, when, callback):
        """Run callback(now) once at `when` (loop time); replaces key's earlier deadline."""
        self._timer_callbacks[key] = (callback, False)
        self.scheduler.schedule(key, when)
        if self._timer_at is None or when < self._timer_at:
            self._schedule_wakeup(when)

    def cancel_timer(self, key):
        self._timer_callbacks.pop(key, None)
        self.scheduler.cancel(key)

    def on_timer(self, key, callback):
        """callback(now) runs whenever key comes due; for keys that a sans-IO core schedules
        on `scheduler` itself (call `rearm()` after it did). `cancel_timer(key)` forgets it."""
        self._timer_callbacks[key] = (callback, True)

    def rearm(self):
        """Wake up for the earliest deadline (after a core scheduled on `scheduler`)."""
        when = self.scheduler.next_deadline()
        if when is not None and (self._timer_at is None or when < self._timer_at):
            self._schedule_wakeup(when)

    def _schedule_wakeup(self, when):
        if self.loop is None or self._closed:
            return
        if self._timer_handle is not None:
            self._timer_handle.cancel()
        self._timer_at = when
        self._timer_handle = self.loop.call_at(when, self._on_timer)

    def _on_timer(self):
        self._timer_handle = None
        self._timer_at = None
        now = self.loop.time()
        scheduler = self.scheduler
        callbacks = self._timer_callbacks
        for key in scheduler.pop_due(now):
            if scheduler.deadline(key) is not None:
                continue  # an earlier callback of this round moved it later
            entry = callbacks.get(key)
            if entry is None:
                continue
            callback, persistent = entry
            if not persistent:
                del callbacks[key]
            try:
                callback(now)
            except Exception as exc:  # noqa: BLE001 - one timer must not stop the others
                self.handler_failed("timer", exc)
        self.rearm()
        self.flush()
