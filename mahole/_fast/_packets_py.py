"""QUIC packets, pure-Python twin: aioquic's own packet builder, decryption, and the
methods that fill packets, read their frames and process ACKs.

The compiled `_packets` builds, decrypts, fills and reads the same packets and leaves the
same state after an ACK (tests/test_packets.py and tests/test_steady_packets.py compare the
two).
"""

from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet_builder import QuicPacketBuilder as PacketBuilder

__all__ = ["PacketBuilder", "ack_receiver", "decrypter", "payload_received",
           "write_application"]


def decrypter(pair):
    """What to call instead of `pair.decrypt_packet`: here, the pair's own method."""
    return pair.decrypt_packet


def write_application(connection, builder, network_path, now):
    """What fills a steady connection's packets: here, aioquic's own
    `QuicConnection._write_application`."""
    connection._write_application(builder, network_path, now)


def payload_received(connection, context, plain):
    """What reads a 1-RTT packet's frames: here, aioquic's own
    `QuicConnection._payload_received`."""
    return QuicConnection._payload_received(connection, context, plain)


def ack_receiver(recovery):
    """What to call instead of `recovery.on_ack_received`: here, its own method."""
    return recovery.on_ack_received
