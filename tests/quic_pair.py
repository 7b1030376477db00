"""Two mahole QUIC connections (agent-like client, connector-like server) pumped against each
other in memory, as aioquic's own tests do: no sockets, no clock of their own."""

from aioquic.quic import events as qe

from mahole import connection as qc
from mahole import identity
from mahole.demo import issue_certificates

CLIENT_ADDR, SERVER_ADDR = ("127.0.0.1", 5000), ("127.0.0.1", 4478)


def make_pair(directory, client_alpn=qc.ALPN_E2E, server_alpn=qc.ALPN_E2E, **settings):
    """(client, server) NodeQuicConnections with the deployment's certificates; `settings`
    go to `mahole.connection.configuration` on both sides."""
    issue_certificates(directory)
    ca = str(directory / "ca.crt")
    client_id = identity.load_identity(directory / "alice.crt", directory / "alice.key")
    server_id = identity.load_identity(directory / "connector1.crt",
                                       directory / "connector1.key")
    client = qc.NodeQuicConnection(configuration=qc.configuration(
        client_id, ca, is_client=True, alpn=client_alpn, server_name="connector1",
        **settings))
    client.connect(SERVER_ADDR, now=0.0)
    server = qc.NodeQuicConnection(
        configuration=qc.configuration(server_id, ca, is_client=False, alpn=server_alpn,
                                       **settings),
        original_destination_connection_id=client.original_destination_connection_id)
    return client, server


def pump(client, server, now, rounds=1, carry=None):
    """Move datagrams both ways `rounds` times (or until none moves); the events of both.
    `carry(data)` decides whether a datagram arrives (a path that drops some)."""
    events = []
    for _ in range(rounds):
        moved = False
        for sender, receiver, source in ((client, server, CLIENT_ADDR),
                                         (server, client, SERVER_ADDR)):
            for data, _addr in sender.datagrams_to_send(now=now):
                moved = True
                if carry is None or carry(data):
                    receiver.receive_datagram(data, source, now=now)
        events += [e for c in (client, server) for e in iter(c.next_event, None)]
        if not moved:
            break
    return events


def handshake(client, server):
    """Pump until the handshake completes; the fake time it took."""
    now = 0.0
    while not any(isinstance(e, qe.HandshakeCompleted) for e in pump(client, server, now)):
        now += 0.01
        assert now < 5, "no handshake"
    return now
