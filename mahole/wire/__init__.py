"""Wire codecs: QUIC header, STUN, relay frames, control messages."""
