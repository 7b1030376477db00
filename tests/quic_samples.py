"""Real QUIC packets for tests, made by a client/server handshake pumped in memory."""

import functools
import os

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import (
    QuicProtocolVersion,
    encode_quic_retry,
    encode_quic_version_negotiation,
)

CLIENT_ADDR = ("127.0.0.1", 4433)
SERVER_ADDR = ("127.0.0.1", 4434)


def _self_signed():
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


@functools.lru_cache(maxsize=None)
def handshake_packets():
    """Every datagram of a full handshake plus some 1-RTT data, in both directions."""
    cert, key = _self_signed()
    client = QuicConnection(configuration=QuicConfiguration(
        is_client=True, alpn_protocols=["test"], verify_mode=0, server_name="localhost"))
    server_cfg = QuicConfiguration(is_client=False, alpn_protocols=["test"])
    server_cfg.certificate = cert
    server_cfg.private_key = key
    server = None
    now = 1.0
    client.connect(SERVER_ADDR, now=now)
    sent = []
    for _ in range(20):
        for data, _addr in client.datagrams_to_send(now=now):
            sent.append(data)
            if server is None:
                server = QuicConnection(configuration=server_cfg,
                                        original_destination_connection_id=data[6:6 + data[5]])
            server.receive_datagram(data, CLIENT_ADDR, now=now)
        if server is not None:
            for data, _addr in server.datagrams_to_send(now=now):
                sent.append(data)
                client.receive_datagram(data, SERVER_ADDR, now=now)
        now += 0.01
        if len(sent) > 6:
            stream = client.get_next_available_stream_id()
            client.send_stream_data(stream, b"hello" * 50, end_stream=True)
    return tuple(sent)


def synthetic_packets():
    """Version negotiation and retry packets, which a normal handshake does not produce."""
    vn = encode_quic_version_negotiation(
        source_cid=os.urandom(8), destination_cid=os.urandom(8),
        supported_versions=[QuicProtocolVersion.VERSION_1, QuicProtocolVersion.VERSION_2])
    retry = encode_quic_retry(
        version=QuicProtocolVersion.VERSION_1, source_cid=os.urandom(8),
        destination_cid=os.urandom(8), original_destination_cid=os.urandom(8),
        retry_token=os.urandom(32))
    retry_v2 = encode_quic_retry(
        version=QuicProtocolVersion.VERSION_2, source_cid=os.urandom(8),
        destination_cid=os.urandom(8), original_destination_cid=os.urandom(8),
        retry_token=os.urandom(16))
    return (vn, retry, retry_v2)
