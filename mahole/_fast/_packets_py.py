"""QUIC packets, pure-Python twin: aioquic's own packet builder, decryption and packet
filling.

The compiled `_packets` builds, decrypts and fills the same packets byte for byte
(tests/test_packets.py and tests/test_write_application.py compare the two).
"""

from aioquic.quic.packet_builder import QuicPacketBuilder as PacketBuilder

__all__ = ["PacketBuilder", "decrypter", "write_application"]


def decrypter(pair):
    """What to call instead of `pair.decrypt_packet`: here, the pair's own method."""
    return pair.decrypt_packet


def write_application(connection, builder, network_path, now):
    """What fills a steady connection's packets: here, aioquic's own
    `QuicConnection._write_application`."""
    connection._write_application(builder, network_path, now)
