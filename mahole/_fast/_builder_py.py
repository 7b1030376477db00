"""QUIC packet builder, pure-Python twin: aioquic's own `QuicPacketBuilder`.

The compiled `_builder` is a port of it that must keep its output byte for byte
(tests/test_packet_builder.py compares the two).
"""

from aioquic.quic.packet_builder import QuicPacketBuilder as PacketBuilder

__all__ = ["PacketBuilder"]
