"""The agent's local forwards (mahole.forwards) on their own: UDP flow numbering and bounds."""

import asyncio

from aio_helpers import run

from mahole import forwards as fw
from mahole.config import Forward
from mahole.tunnel import MAX_FLOW_ID


class _NoSessions:
    """An agent whose sessions never open, so datagrams wait as pending."""

    def _ready_session(self, service):
        return None

    async def session(self, service):
        await asyncio.Event().wait()


def test_udp_flow_ids_skip_the_librarys_flow_and_clients_are_bounded(monkeypatch):
    monkeypatch.setattr(fw, "MAX_UDP_CLIENTS", 8)
    forward = fw._UdpForward(fw.Forwards(_NoSessions(), ()), Forward.parse("udp:127.0.0.1:0=dns"))
    ids = [forward._flow(("192.0.2.1", port)) for port in range(MAX_FLOW_ID + 5)]
    assert 0 not in ids and min(ids) == 1 and max(ids) == MAX_FLOW_ID
    assert ids[MAX_FLOW_ID] == 1  # round again once every id was used
    assert len(forward.flow_ids) == len(forward.flow_addrs) == 8
    # The newest clients are the ones remembered, each with its own id.
    assert forward.flow_addrs[ids[-1]] == ("192.0.2.1", MAX_FLOW_ID + 4)


def test_datagrams_waiting_for_a_session_are_bounded_and_counted():
    async def main():
        forwards = fw.Forwards(_NoSessions(), ())
        forward = fw._UdpForward(forwards, Forward.parse("udp:127.0.0.1:0=dns"))
        for i in range(fw.MAX_PENDING_DATAGRAMS + 10):
            forward.datagram_received(b"x%d" % i, ("127.0.0.1", 5000))
        assert len(forward.pending) == fw.MAX_PENDING_DATAGRAMS
        assert forwards.counters["udp_dropped"] == 10
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()
    run(main())


def test_a_forward_that_cannot_listen_says_where_and_why():
    async def main():
        taken = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = taken.sockets[0].getsockname()[1]
        forwards = fw.Forwards(_NoSessions(), (Forward.parse("udp:127.0.0.1:0=dns"),
                                               Forward.parse(f"tcp:127.0.0.1:{port}=web")))
        try:
            await forwards.start()
        except fw.ForwardError as exc:
            assert str(exc).startswith(f"cannot listen on tcp 127.0.0.1:{port} for web: ")
        else:
            raise AssertionError("listened on a port in use")
        finally:
            taken.close()
        # The UDP forward bound before the failure was closed again.
        assert all(listener.transport.is_closing() for f, listener in forwards.listeners.items()
                   if f.proto == "udp")
    run(main())
