"""The one-socket endpoint: its single timer scheduler, a datagram loop nothing can break,
and peer addresses that only authenticated packets move."""

import asyncio
import logging
import socket

from aioquic.quic import events as qe

from mahole import connection as qc
from mahole import identity
from mahole.demo import issue_certificates
from mahole.endpoint import ConnectionHandler, Endpoint
from mahole.wire.relay import new_session_id

from aio_helpers import run, wait_for

ATTACKER = ("127.0.0.9", 40000)


def udp_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind(("127.0.0.1", 0))
    return sock


class Recorder(ConnectionHandler):
    def __init__(self):
        self.events = []
        self.moves = []
        self.authenticated = []

    def quic_event(self, connection, event):
        self.events.append(event)

    def peer_address_changed(self, connection, previous, addr):
        self.moves.append((previous, addr))

    def packet_authenticated(self, connection, addr, now):
        self.authenticated.append(addr)


def test_timers_run_once_in_order_and_can_be_replaced_or_cancelled():
    async def main():
        endpoint = Endpoint(udp_socket())
        endpoint.start()
        fired = []
        now = endpoint.now()
        endpoint.set_timer("b", now + 0.02, lambda t: fired.append("b"))
        endpoint.set_timer("a", now + 0.01, lambda t: fired.append("a"))
        endpoint.set_timer("c", now + 0.01, lambda t: fired.append("c"))
        endpoint.set_timer("c", now + 0.03, lambda t: fired.append("c2"))  # replaces c
        endpoint.set_timer("d", now + 0.01, lambda t: fired.append("d"))
        endpoint.cancel_timer("d")
        await wait_for(lambda: len(fired) == 3, timeout=2)
        assert fired == ["a", "b", "c2"]
        await asyncio.sleep(0.05)
        assert fired == ["a", "b", "c2"]  # each ran once
        endpoint.close()
    run(main())


def test_a_failing_timer_does_not_stop_the_others(caplog):
    async def main():
        endpoint = Endpoint(udp_socket())
        endpoint.start()
        fired = []
        now = endpoint.now()
        endpoint.set_timer("bad", now + 0.01, lambda t: 1 / 0)
        endpoint.set_timer("good", now + 0.01, lambda t: fired.append(t))
        await wait_for(lambda: fired, timeout=2)
        assert endpoint.counters["handler_errors"] == 1
        endpoint.close()
    with caplog.at_level(logging.ERROR, logger="mahole.endpoint"):
        run(main())
    assert "error while handling a timer" in caplog.text


def test_one_bad_datagram_is_counted_and_logged_once_and_the_batch_goes_on(caplog):
    class Entry:
        def __init__(self):
            self.frames = []

        def relay_frame_received(self, frame, addr):
            if frame.endswith(b"boom"):
                raise RuntimeError("a handler bug")
            self.frames.append(frame)

    async def main():
        endpoint = Endpoint(udp_socket())
        endpoint.start()
        entry = Entry()
        sid = new_session_id()
        endpoint.router.add_session(sid, entry)
        frame = bytes([0x10]) + sid
        batch = [(frame + b"boom", ATTACKER), (frame + b"one", ATTACKER),
                 (frame + b"boom", ATTACKER), (frame + b"two", ATTACKER)]
        endpoint.process(batch)
        assert entry.frames == [frame + b"one", frame + b"two"]
        assert endpoint.counters["handler_errors"] == 2
        endpoint.close()
    with caplog.at_level(logging.ERROR, logger="mahole.endpoint"):
        run(main())
    assert caplog.text.count("error while handling a relay frame") == 1


def _pair(tmp_path):
    """A client and a server connection with a completed handshake, on two endpoints."""
    issue_certificates(tmp_path)
    ca = str(tmp_path / "ca.crt")
    agent = identity.load_identity(tmp_path / "alice.crt", tmp_path / "alice.key")
    server_id = identity.load_identity(tmp_path / "intermediate.crt",
                                       tmp_path / "intermediate.key")
    client_cfg = qc.configuration(agent, ca, is_client=True, alpn=qc.ALPN_CONTROL,
                                  server_name="127.0.0.1")
    server_cfg = qc.configuration(server_id, ca, is_client=False, alpn=qc.ALPN_CONTROL)
    return client_cfg, server_cfg


def test_only_an_authenticated_packet_moves_a_connections_peer_address(tmp_path):
    client_cfg, server_cfg = _pair(tmp_path)

    async def main():
        recorder = Recorder()
        server = Endpoint(udp_socket())

        def initial(header, data, addr):
            quic = qc.NodeQuicConnection(configuration=server_cfg,
                                         original_destination_connection_id=header.dcid)
            server.accepted = server.add_connection(quic, recorder, peer_addr=addr,
                                                    extra_cids=(header.dcid,))
            server.accepted.datagram_received(data, addr, server.now())

        server.on_initial = initial
        server.start()
        client = Endpoint(udp_socket())
        client.start()
        quic = qc.NodeQuicConnection(configuration=client_cfg)
        quic.connect(server.local_address, now=client.now())
        client_conn = client.add_connection(quic, ConnectionHandler(),
                                            peer_addr=server.local_address)
        await wait_for(lambda: any(isinstance(e, qe.HandshakeCompleted)
                                   for e in recorder.events), timeout=5)
        conn = server.accepted
        home = conn.peer_addr
        assert home == client.local_address

        # An attacker who saw one packet knows the connection ID: garbage with it, from
        # elsewhere, reaches the connection but does not decrypt, so nothing moves.
        cid = next(iter(conn.cids))
        garbage = bytes([0x40]) + cid + bytes(40)
        authenticated = conn.quic.packets_authenticated
        server.process([(garbage, ATTACKER)] * 5)
        assert conn.peer_addr == home
        assert recorder.moves == []
        assert conn.quic.packets_authenticated == authenticated

        # A real packet of the client from a new address (NAT rebinding) does move it.
        client_conn.quic.send_ping(1)
        packets = client_conn.quic.datagrams_to_send(now=client.now())
        rebound = ("127.0.0.1", 1 + client.local_address[1] % 60000)
        server.process([(data, rebound) for data, _addr in packets])
        assert conn.peer_addr == rebound
        assert recorder.moves == [(home, rebound)]
        assert recorder.authenticated[-1] == rebound
        client.close()
        server.close()
    run(main())


def test_a_side_socket_carries_one_peer_address_both_ways_and_closes_with_the_endpoint():
    """The one-socket exception (birthday probing): datagrams to the peer's address leave
    from the side socket, what it receives is routed like the main socket's, other
    addresses still use the main socket."""
    from mahole.wire import stun

    async def main():
        heard = []
        endpoint = Endpoint(udp_socket(), on_stun=lambda data, addr: heard.append((data, addr)))
        endpoint.start()
        side, peer, other = udp_socket(), udp_socket(), udp_socket()
        peer_addr = peer.getsockname()
        endpoint.add_side_socket(side, peer_addr)
        endpoint.send([(b"to the peer", peer_addr), (b"to another", other.getsockname())])
        loop = asyncio.get_running_loop()
        data, source = await asyncio.wait_for(loop.sock_recvfrom(peer, 2048), 2)
        assert (data, source) == (b"to the peer", side.getsockname())
        data, source = await asyncio.wait_for(loop.sock_recvfrom(other, 2048), 2)
        assert source == endpoint.local_address[:2]
        request = stun.encode(stun.binding_request())
        peer.sendto(request, side.getsockname())
        await wait_for(lambda: heard, timeout=2)
        assert heard == [(request, peer_addr)]
        assert endpoint.counters["side_sent"] == 1
        endpoint.close()
        assert side.fileno() == -1 and endpoint.side_routes() == []
        peer.close()
        other.close()
    run(main())
