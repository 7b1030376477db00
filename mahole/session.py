"""End-to-end sessions at a node: the path layer under the agent↔connector QUIC connection.

aioquic talks to a stable virtual peer address; `RelayPath` decides where each packet goes.
Until hole punching lands every packet travels inside relay frames through the intermediate
(`0x10 | session_id | inner`, DESIGN.md wire table), which forwards them unchanged.
"""

import logging

from ._fast import KIND_QUIC_LONG, classify, parse_header
from ._fast._kinds import RELAY_HEADER_LEN, RELAY_FRAME_TYPE

log = logging.getLogger(__name__)

# What aioquic believes the peer's address is; the path layer knows the real routes.
VIRTUAL_PEER_ADDR = ("0.0.0.0", 1)


class RelayPath:
    """Route every packet of a session through the intermediate's relay."""

    name = "relay"

    def __init__(self, session_id, relay_addr):
        self.header = bytes([RELAY_FRAME_TYPE]) + session_id
        self.relay_addr = relay_addr
        self.frames_sent = 0

    def outbound(self, data):
        self.frames_sent += 1
        return self.header + data, self.relay_addr

    def inbound(self, addr):
        # Direct packets (not inside relay frames) are not accepted until a pair is nominated.
        return False


class Session:
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
        self.path = RelayPath(session_id, node.intermediate_addr)
        self.connection = None
        self.closed = False
        self.dropped_frames = 0
        self.opened_at = self.endpoint.now()
        self.endpoint.router.add_session(session_id, self)

    @property
    def path_name(self):
        if self.connection is None or self.closed:
            return "none"
        return self.path.name

    def relay_frame_received(self, frame, addr):
        if addr != self.path.relay_addr or self.closed:
            self.dropped_frames += 1
            return
        inner = frame[RELAY_HEADER_LEN:]
        if self.connection is not None:
            self.connection.path_datagram_received(inner, self.endpoint.now())
        elif classify(inner) == KIND_QUIC_LONG:
            try:
                header = parse_header(inner)
            except ValueError:
                self.dropped_frames += 1
                return
            self.first_packet(header, inner)
        else:
            self.dropped_frames += 1

    def first_packet(self, header, data):
        """A packet before the connection exists (the connector accepts an Initial here)."""
        self.dropped_frames += 1

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
            "rtt_ms": round(rtt * 1000, 3) if rtt is not None else None,
            "bytes_sent": conn.bytes_sent if conn is not None else 0,
            "bytes_received": conn.bytes_received if conn is not None else 0,
            "dropped_frames": self.dropped_frames,
        }

    def close(self, reason="closed"):
        if self.closed:
            return
        self.closed = True
        self.endpoint.router.remove_session(self.session_id)
        if self.connection is not None and not self.connection.closed:
            self.connection.close(reason=reason)
