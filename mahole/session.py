"""End-to-end sessions at a node: the agent↔connector QUIC connection and its path layer.

aioquic talks to a stable virtual peer address; the session's `PathManager` decides where
each packet goes: inside relay frames through the intermediate (`0x10 | session_id | inner`,
DESIGN.md wire table) or straight to the peer once hole punching nominated a pair.
"""

import logging

from ._fast import KIND_QUIC_LONG, classify, parse_header
from ._fast._kinds import RELAY_HEADER_LEN
from .endpoint import ConnectionHandler
from .path import PathManager
from .tunnel import FLOW_ID_LEN, MAX_DATAGRAM_PAYLOAD, pack_datagram

log = logging.getLogger(__name__)

# Relay frames right after a switch to direct are stragglers (the peer may learn the
# result a little later than we do), not a sign of failure.
PEER_SWITCH_GRACE = 0.25
PEER_SILENT = 0.1

# What aioquic believes the peer's address is; the path layer knows the real routes.
VIRTUAL_PEER_ADDR = ("0.0.0.0", 1)


class Session(ConnectionHandler):
    """One end-to-end session of a node: its id, peer, path and QUIC connection.

    Registered in the endpoint's router under its session id, so relay frames for it arrive at
    `relay_frame_received`. Subclasses (agent, connector) handle the QUIC events.
    """

    def __init__(self, node, session_id, service, agent, connector):
        self.node = node
        self.endpoint = node.endpoint
        self.session_id = session_id
        self.service = service
        self.agent = agent
        self.connector = connector
        self.path = PathManager(session_id, node.intermediate_addr,
                                allow_relay=not node.cfg.direct_only,
                                allow_direct=not node.cfg.relay_only)
        self.connection = None
        self.closed = False
        self.dropped_frames = 0
        self.opened_at = self.endpoint.now()
        self.punch_outcome = None  # ice.HolePunchResult once hole punching ended
        self.failovers = []  # when the direct route died
        self._awaiting_since = None
        self._pings = 0
        self.repunch_attempts = 0  # punches since the direct route last worked
        self.switch_ms = None  # StartPunching -> direct route in use
        self.endpoint.router.add_session(session_id, self)

    @property
    def path_name(self):
        if self.connection is None or self.closed:
            return "none"
        return self.path.name

    def relay_frame_received(self, frame, addr):
        if addr != self.path.relay_addr or self.closed or not self.path.allow_relay:
            self.dropped_frames += 1
            return
        inner = frame[RELAY_HEADER_LEN:]
        if self.connection is not None:
            now = self.endpoint.now()
            path = self.path
            if (path.direct_addr is not None and now - path.direct_since > PEER_SWITCH_GRACE
                    and now - path.last_direct_rx > PEER_SILENT):
                # The peer sends by the relay again and nothing comes direct: it has seen the
                # direct route die; follow it now instead of waiting for our own timeout.
                self.direct_failed(now, "the peer went back to the relay")
            self.connection.path_datagram_received(inner, addr, now)
        elif classify(inner) == KIND_QUIC_LONG:
            try:
                header = parse_header(inner)
            except ValueError:
                self.dropped_frames += 1
                return
            self.first_packet(header, inner, addr)
        else:
            self.dropped_frames += 1

    def punch_result(self, result):
        """Hole punching ended: move to the direct route, or stay on the relay."""
        now = self.endpoint.now()
        self.punch_outcome = result
        if result.path == "direct" and not self.closed:
            self.path.use_direct(result.remote_addr, now)
            self.switch_ms = round(result.elapsed * 1000, 3)
            self.repunch_attempts = 0
            log.info("session %s: direct path to %s after %.0f ms", self.session_id.hex(),
                     _fmt(result.remote_addr), result.elapsed * 1000)
            if self.connection is not None:
                self.connection.transmit()
        else:
            log.info("session %s: staying on the relay: %s", self.session_id.hex(),
                     result.reason)
            self.node.punch_failed(self)
            if not self.path.allow_relay:
                self.node.report(result.to_wire(self.session_id))
                self.close("direct path required (--direct-only) but hole punching failed: "
                           f"{result.reason}")
                return
        self.node.report(result.to_wire(self.session_id))

    def check_direct(self, now):
        """Liveness of the direct route: fail over to the relay, or probe it when idle."""
        path, conn = self.path, self.connection
        if path.direct_addr is None or conn is None or conn.closed or self.closed:
            return
        quic = conn.quic
        cfg = self.node.cfg
        if quic.bytes_in_flight:  # ack-eliciting packets wait for an answer
            if self._awaiting_since is None:
                self._awaiting_since = now
            heard = max(self._awaiting_since, path.last_direct_rx)
            # 3 RTTs when the path is slow, but queueing can inflate the RTT estimate during
            # bulk transfers: never more than twice the configured timeout.
            timeout = min(max(cfg.failover_timeout, 3 * (quic.smoothed_rtt or 0.0)),
                          2 * cfg.failover_timeout)
            if now - heard > timeout:
                self.direct_failed(now, f"nothing heard on the direct path for "
                                        f"{(now - path.last_direct_rx) * 1000:.0f} ms")
        else:
            self._awaiting_since = None
            if now - path.last_direct_rx >= cfg.direct_keepalive:
                # RFC 9000 §19.2: a PING elicits an ACK: liveness evidence, and it keeps
                # the NAT mappings of the direct route open while the session is idle.
                self._pings += 1
                quic.send_ping(self._pings)
                conn.transmit()

    def direct_failed(self, now, reason):
        """The direct route died: back to the relay at once, same QUIC connection."""
        self.path.use_relay(now, reason)
        self.failovers.append(now)
        self._awaiting_since = None
        log.warning("session %s: %s; back on the relay", self.session_id.hex(), reason)
        if not self.path.allow_relay:
            self.close(f"direct path lost and the relay is not allowed (--direct-only): {reason}")
            return
        if not self.node.control.connected:
            self.close(f"direct path lost while the intermediate is unreachable: {reason}")
            return
        # Packets sent into the dead route are lost: probe at once over the relay so that
        # loss recovery retransmits them now rather than after a backed-off PTO.
        quic = self.connection.quic
        quic.reset_probe_backoff()
        self._pings += 1
        quic.send_ping(self._pings)
        self.connection.transmit()
        self.node.direct_route_failed(self)

    def packet_authenticated(self, connection, addr, now):
        self.path.authenticated(addr, now)

    def first_packet(self, header, data, addr):
        """A packet before the connection exists (the connector accepts an Initial here)."""
        self.dropped_frames += 1

    def send_datagram(self, flow_id, payload):
        """One UDP payload of a flow, as a QUIC DATAGRAM frame (RFC 9221).

        A payload too large for one packet is dropped and counted here: aioquic would queue
        it for ever and stall the datagrams behind it. Subclasses keep `counters`.
        """
        if len(payload) + FLOW_ID_LEN > MAX_DATAGRAM_PAYLOAD:
            self.counters["datagrams_dropped_oversize"] += 1
            return
        conn = self.connection
        if conn is None or conn.closed:
            self.counters["datagrams_dropped"] += 1
            return
        self.counters["datagrams_out"] += 1
        conn.quic.send_datagram_frame(pack_datagram(flow_id, payload))
        conn.transmit()

    def punch_stats(self):
        punch = self.node.puncher.punches.get(self)
        return punch.stats() if punch is not None else None

    def stats(self):
        conn = self.connection
        quic = conn.quic if conn is not None else None
        rtt = quic.smoothed_rtt if quic is not None else None
        return {
            "service": self.service,
            "session_id": self.session_id.hex(),
            "agent": self.agent,
            "connector": self.connector,
            "path": self.path_name,
            "direct_addr": _fmt(self.path.direct_addr) if self.path.direct_addr else None,
            "switch_ms": self.switch_ms,
            "route_switches": len(self.path.switches),
            "failovers": len(self.failovers),
            "rtt_ms": round(rtt * 1000, 3) if rtt is not None else None,
            "bytes_sent": conn.bytes_sent if conn is not None else 0,
            "bytes_received": conn.bytes_received if conn is not None else 0,
            "dropped_frames": self.dropped_frames,
            "punch": self.punch_stats(),
        }

    def close(self, reason="closed"):
        if self.closed:
            return
        self.closed = True
        self.endpoint.router.remove_session(self.session_id)
        self.node.puncher.forget(self)
        if self.connection is not None and not self.connection.closed:
            self.connection.close(reason=reason)


def _fmt(addr):
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
