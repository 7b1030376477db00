"""QUIC packets, pure-Python twin: aioquic's own packet builder and decryption.

The compiled `_packets` builds and decrypts the same packets byte for byte
(tests/test_packets.py compares the two).
"""

from aioquic.quic.packet_builder import QuicPacketBuilder as PacketBuilder

__all__ = ["PacketBuilder", "decrypter"]


def decrypter(pair):
    """What to call instead of `pair.decrypt_packet`: here, the pair's own method."""
    return pair.decrypt_packet
