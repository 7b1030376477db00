"""A fleet of intermediates sharing a directory of nodes: the registry view (sans-IO), the
signaling core with it, and intermediates in this process on a real redis-server."""

import asyncio
import hashlib
import json
import os
import signal
import socket
import time

import pytest
import redis

from aio_helpers import run, wait_for
from ports import free_port
from redis_helpers import redis_server  # noqa: F401 - a fixture
from test_processes import processes  # noqa: F401 - a fixture
from test_signaling import AGENT_ADDR, CONNECTOR_ADDR, Harness, _refusal, answer, offer, result

import mahole
from mahole import fleet, fleet_redis, identity, signaling
from mahole.demo import _echo_tcp, issue_certificates
from mahole.fleet import FleetRegistry, encode_record
from mahole.signaling import NodeRecord, SendMessage
from mahole.wire import control


def record(handle, role="connector", name="office", services=("web",), home="relay2",
           since=10.0):
    return NodeRecord(handle=handle, role=role, name=name, addr=("192.0.2.5", 4000),
                      services=services, home=home, since=since)


# The registry view, sans-IO ------------------------------------------------------------------
def test_remote_nodes_are_found_by_identity_and_service_with_handles_of_their_own():
    reg = FleetRegistry("relay1")
    reg.apply_remote("relay2", "put", "7", encode_record(record(7)))
    [office] = reg.connectors_for("web")
    assert office.handle == "relay2/7" and office.home == "relay2"
    assert reg.node_by_identity("connector", "office") == office
    assert reg.nodes() == [] and reg.remote_homes() == {"relay2": 1}
    # A local node of the same identity is found first; local changes go to the outbox.
    local = record(7, home="relay1")
    reg.put_node(local)
    assert reg.node_by_identity("connector", "office") == local
    assert [c.home for c in reg.connectors_for("web")] == ["relay1", "relay2"]
    assert list(reg.outbox) == [("put", local)]
    reg.remove_node(7)
    assert list(reg.outbox)[-1] == ("del", 7)
    # A delete, and forgetting a whole home.
    reg.apply_remote("relay2", "del", "7")
    assert reg.connectors_for("web") == [] and reg.node_by_identity("connector", "office") is None
    reg.replace_remote("relay3", {"1": encode_record(record(1, home="relay3")),
                                  "2": encode_record(record(2, name="b", home="relay3"))})
    assert reg.remote_homes() == {"relay3": 2}
    reg.forget_home("relay3")
    assert reg.remote_homes() == {} and reg.connectors_for("web") == []


def test_the_longest_registered_copy_of_an_identity_is_the_one_found():
    reg = FleetRegistry("relay1")
    reg.apply_remote("relay2", "put", "1", encode_record(record(1, since=50.0)))
    reg.apply_remote("relay3", "put", "1", encode_record(record(1, home="relay3", since=20.0)))
    assert reg.node_by_identity("connector", "office").home == "relay3"
    reg.forget_home("relay3")
    assert reg.node_by_identity("connector", "office").home == "relay2"


@pytest.mark.parametrize("encoded", [
    b"\xff\xfe", "not json", "[]", json.dumps({"handle": 1}),
    encode_record(record(1, home="relay9")),  # claims another home
    encode_record(record(1, role="intermediate")),
    "x" * (fleet.MAX_RECORD_BYTES + 1),
])
def test_malformed_records_from_the_store_are_dropped_and_counted(encoded):
    reg = FleetRegistry("relay1")
    reg.apply_remote("relay2", "put", "1", encoded)
    assert reg.remote_homes() == {}
    assert reg.counters["remote_malformed"] == 1


def test_remote_nodes_are_bounded(monkeypatch):
    monkeypatch.setattr(fleet, "MAX_REMOTE_NODES", 3)
    reg = FleetRegistry("relay1")
    for i in range(5):
        reg.apply_remote("relay2", "put", str(i), encode_record(record(i, name=f"c{i}")))
    assert sum(reg.remote_homes().values()) == 3 and reg.counters["remote_dropped_full"] == 2
    reg.apply_remote("relay2", "put", "0", encode_record(record(0, name="c0", since=11.0)))
    assert reg.counters["remote_dropped_full"] == 2  # an update of a known node still lands


def test_own_records_in_the_store_are_not_taken_as_remote():
    reg = FleetRegistry("relay1")
    reg.apply_remote("relay1", "put", "1", encode_record(record(1, home="relay1")))
    reg.replace_remote("relay1", {"1": encode_record(record(1, home="relay1"))})
    assert reg.remote_homes() == {} and reg.connectors_for("web") == []


# The signaling core with a fleet registry -------------------------------------------------------
def fleet_harness(**kwargs):
    h = Harness(registry=FleetRegistry("test"), **kwargs)
    return h, h.core.registry


def test_a_local_replica_is_preferred_to_one_elsewhere():
    h, reg = fleet_harness()
    reg.relay_addrs["relay2"] = ("192.0.2.2", 4478)
    h.connect(1, "agent", "alice", AGENT_ADDR)
    reg.apply_remote("relay2", "put", "4", encode_record(record(4)))
    h.connect(2, "connector", "office-b", CONNECTOR_ADDR, services=("web",))
    session_id, _ = h.open(service="web")
    assert reg.session(session_id).connector_name == "office-b"


# Intermediates on a real Redis ------------------------------------------------------------------
@pytest.fixture
def fleet_certs(tmp_path):
    issue_certificates(tmp_path, intermediate="relay1")
    for name in ("relay2", "relay3"):
        identity.issue(tmp_path, "intermediate", name, hosts=["127.0.0.1"])
    identity.issue(tmp_path, "connector", "office")
    return tmp_path


def creds(directory, name):
    return {"cert": str(directory / f"{name}.crt"), "key": str(directory / f"{name}.key"),
            "ca": str(directory / "ca.crt")}


def intermediate(directory, name, url, **settings):
    return mahole.Intermediate(allow=("*=*",), registry=url, control_socket="",
                               **creds(directory, name), **settings)


def remote(inter):
    return inter._role.signaling.registry.remote_homes()


def test_intermediates_share_their_nodes_and_forget_a_dead_ones(fleet_certs, redis_server):
    """relay2's connector shows at relay1 within moments and cannot register at relay1 too;
    relay2 crashing (no goodbye) is forgotten when its heartbeat expires."""
    async def main():
        echo = await asyncio.start_server(_echo_tcp, "127.0.0.1", 0)
        port = echo.sockets[0].getsockname()[1]
        async with intermediate(fleet_certs, "relay1", redis_server.url) as relay1, \
                intermediate(fleet_certs, "relay2", redis_server.url) as relay2:
            connector = mahole.Connector(relay2.address, bind=("127.0.0.1", 0),
                                         control_socket="", **creds(fleet_certs, "office"))
            connector.expose("web", f"tcp:127.0.0.1:{port}")
            async with connector:
                await connector.wait_registered()
                await wait_for(lambda: remote(relay1) == {"relay2": 1}, 5)
                async with mahole.Agent(relay1.address, bind=("127.0.0.1", 0),
                                        control_socket="", **creds(fleet_certs, "alice")):
                    # The same identity cannot register at relay1 as well.
                    copy = mahole.Connector(relay1.address, bind=("127.0.0.1", 0),
                                            control_socket="", **creds(fleet_certs, "office"))
                    with pytest.raises(mahole.Unauthorized,
                                       match="answering at intermediate 'relay2'"):
                        async with copy:
                            await copy.wait_registered()
                status = relay1.status()["fleet"]
                assert status["connected"] and status["intermediates"] == ["relay2"]
                await wait_for(lambda: relay1.status()["fleet"]["reachable"] == ["relay2"], 5)
                # relay2 dies: its fleet link stops without a goodbye.
                crashed = relay2._role.fleet
                for task in crashed._tasks:
                    task.cancel()
                await asyncio.gather(*crashed._tasks, return_exceptions=True)
                crashed.connected = False
                started = asyncio.get_running_loop().time()
                await wait_for(lambda: remote(relay1) == {}, fleet_redis.TTL
                               + fleet_redis.RESYNC + 2)
                gone_after = asyncio.get_running_loop().time() - started
                assert relay1.status()["fleet"]["counters"]["homes_expired"] == 1
        echo.close()
        return gone_after

    gone_after = run(main(), timeout=90)
    assert gone_after <= fleet_redis.TTL + fleet_redis.RESYNC + 2


def test_a_stalled_intermediate_reads_the_beats_that_waited_before_judging_silence(
        redis_server):
    """relay1's process stalls longer than HOME_SILENT while relay2 (its own thread and
    event loop) goes on beating: on waking relay1 reads the waiting beats first, so relay2
    is never taken as silent (which refused new sessions through it)."""
    import threading

    stop = threading.Event()

    def relay2_thread():
        async def beat():
            other = fleet_redis.RedisFleet(redis_server.url, "relay2", "127.0.0.1:5000",
                                           FleetRegistry("relay2"))
            await other.start()
            while not stop.is_set():
                await asyncio.sleep(0.05)
            await other.stop()
        asyncio.run(beat())

    thread = threading.Thread(target=relay2_thread, daemon=True)
    thread.start()

    async def main():
        silent = []
        registry = FleetRegistry("relay1")
        relay1 = fleet_redis.RedisFleet(redis_server.url, "relay1", "127.0.0.1:5001", registry,
                                        on_silent=silent.append)
        await relay1.start()
        try:
            await wait_for(lambda: "relay2" in registry.relay_addrs, 10)
            time.sleep(fleet_redis.HOME_SILENT + 1.0)  # the stall: this whole loop blocked
            settled = asyncio.get_running_loop().time() + fleet_redis.HOME_SILENT
            while asyncio.get_running_loop().time() < settled:
                assert "relay2" in registry.relay_addrs and silent == []
                await asyncio.sleep(0.05)
        finally:
            await relay1.stop()
        return relay1.counters

    try:
        counters = run(main(), timeout=60)
    finally:
        stop.set()
        thread.join(10)
    assert counters["received"] > 0


def test_an_intermediate_is_seen_only_once_it_listens(redis_server, monkeypatch):
    """Its heartbeat key and beats make the others send it sessions: they appear only once
    Redis has confirmed its subscriptions (held back 0.5 s here), or the first messages to
    it would be lost."""
    import redis.asyncio.client

    subscribe = redis.asyncio.client.PubSub.subscribe

    async def slow_subscribe(self, *args, **kwargs):
        await asyncio.sleep(0.5)
        return await subscribe(self, *args, **kwargs)
    monkeypatch.setattr(redis.asyncio.client.PubSub, "subscribe", slow_subscribe)

    async def main():
        watcher = redis.asyncio.Redis.from_url(redis_server.url)
        relay2 = fleet_redis.RedisFleet(redis_server.url, "relay2", "127.0.0.1:5000",
                                        FleetRegistry("relay2"))
        starting = asyncio.get_running_loop().create_task(relay2.start())
        try:
            while not await watcher.exists(fleet_redis.heartbeat_key("relay2")):
                assert not starting.done()
                await asyncio.sleep(0.005)
            [(_, listening)] = await watcher.pubsub_numsub(fleet_redis.inbox("relay2"))
            assert listening == 1
            await starting
        finally:
            await relay2.stop()
            await watcher.aclose()
    run(main(), timeout=30)


def test_a_second_intermediate_of_the_same_name_is_refused(fleet_certs, redis_server):
    async def main():
        async with intermediate(fleet_certs, "relay1", redis_server.url):
            twin = intermediate(fleet_certs, "relay1", redis_server.url)
            with pytest.raises(mahole.Error, match="another intermediate named 'relay1' is "
                                                   "live in this fleet"):
                await twin.start()
    run(main(), timeout=60)


def test_without_redis_an_intermediate_serves_what_it_holds_and_rebuilds_after(
        fleet_certs, redis_server):
    """Redis dies: a relayed session between the two intermediates carries on, relay1's own
    agent and connector keep working, relay2's nodes are forgotten after the TTL; a second
    copy of relay1's connector registers at relay2 meanwhile. Redis returns: relay1 rejoins
    and sees relay2's nodes again, and the second copy is let go."""
    async def main():
        async with intermediate(fleet_certs, "relay1", redis_server.url) as relay1, \
                intermediate(fleet_certs, "relay2", redis_server.url) as relay2:
            local = mahole.Connector(relay1.address, bind=("127.0.0.1", 0), control_socket="",
                                     **creds(fleet_certs, "connector1"))
            local.serve("echo", _echo_tcp)
            far = mahole.Connector(relay2.address, bind=("127.0.0.1", 0), control_socket="",
                                   **creds(fleet_certs, "office"))
            far.serve("far", _echo_tcp)
            far.serve("far-too", _echo_tcp)
            async with local, far, mahole.Agent(relay1.address, bind=("127.0.0.1", 0),
                                                control_socket="", relay_only=True,
                                                **creds(fleet_certs, "alice")) as agent:
                await far.wait_registered()
                await wait_for(lambda: remote(relay1) == {"relay2": 1}
                               and relay1._role.signaling.registry.relay_address("relay2"), 10)
                across_reader, across = await agent.open_connection("far")
                across.write(b"before ")
                redis_server.stop()
                await wait_for(lambda: not relay1.status()["fleet"]["connected"], 10)
                await wait_for(lambda: remote(relay1) == {}, fleet_redis.TTL + 5)
                # The session between the intermediates never needed Redis to relay.
                across.write(b"and after Redis died")
                across.write_eof()
                assert await across_reader.read() == b"before and after Redis died"
                across.close()
                data = os.urandom(200_000)
                reader, writer = await agent.open_connection("echo")
                writer.write(data)
                writer.write_eof()
                assert await reader.read() == data
                writer.close()
                with pytest.raises(mahole.ServiceUnavailable, match="no connector offers"):
                    await agent.open_connection("far-too")
                # A second copy of relay1's connector registers at relay2: nobody can ask
                # relay1 whether the first lives.
                copy = mahole.Connector(relay2.address, bind=("127.0.0.1", 0),
                                        control_socket="", **creds(fleet_certs, "connector1"))
                copy.serve("echo", _echo_tcp)
                await copy.start()
                redis_server.start()
                await wait_for(lambda: relay1.status()["fleet"]["connected"]
                               and remote(relay1) == {"relay2": 1}, 20)
                assert relay1.status()["fleet"]["counters"]["connects"] >= 2
                # Redis is back: the newer copy is let go, the first keeps serving.
                with pytest.raises(mahole.Unauthorized, match="is registered at intermediate "
                                                              "'relay1' since before"):
                    await asyncio.wait_for(copy.wait_closed(), 15)
                await copy.close()
                assert relay2.status()["counters"]["duplicates_let_go"] == 1
                reader, writer = await agent.open_connection("echo")
                writer.write(b"still the first")
                writer.write_eof()
                assert await reader.read() == b"still the first"
                writer.close()
    run(main(), timeout=120)


# A session across two intermediates, sans-IO ----------------------------------------------------
RELAY1, RELAY2 = ("192.0.2.1", 4478), ("192.0.2.2", 4478)


class TwoIntermediates:
    """Two signaling cores of one fleet; their FleetSend events carried to each other as
    the Redis shell would."""

    def __init__(self, resumable=False, limits2=None):
        self.h1 = Harness(home="relay1", registry=FleetRegistry("relay1"))
        self.h2 = Harness(home="relay2", registry=FleetRegistry("relay2"), limits=limits2)
        self.h1.core.registry.relay_addrs["relay2"] = RELAY2
        self.h2.core.registry.relay_addrs["relay1"] = RELAY1
        self.h2.connect(2, "connector", "office", CONNECTOR_ADDR, services=("web",),
                        resumable=resumable)
        self.h1.connect(1, "agent", "alice", AGENT_ADDR, resumable=resumable)
        [office] = self.h2.core.registry.nodes()
        self.h1.core.registry.apply_remote("relay2", "put", "2", encode_record(office))
        self.by_home = {"relay1": self.h1, "relay2": self.h2}
        self.carried = 0

    def carry(self, events, source):
        """Deliver the FleetSends among ``events`` (from ``source``), and what they cause,
        until nothing is left; every event of every intermediate, as {home: [events]}."""
        seen = {home: [] for home in self.by_home}
        pending = [(source, events)]
        while pending:
            harness, batch = pending.pop()
            seen[harness.core.home].extend(batch)
            for event in batch:
                if isinstance(event, signaling.FleetSend):
                    other = self.by_home[event.home]
                    self.carried += 1
                    other.core.fleet_message(
                        harness.core.home, None if event.sender is None else str(event.sender),
                        None if event.to is None else str(event.to), event.message, other.now,
                        session=event.session, rtt=event.rtt)
                    pending.append((other, other.events()))
        return seen

    def open(self):
        """The agent's OpenSession at relay1: the session id its SessionOpened names (sent
        once relay2 confirms the session) or None, and what each intermediate did."""
        _, events = self.h1.open(service="web")
        seen = self.carry(events, self.h1)
        opened = [m for m in sent(seen["relay1"], 1) if isinstance(m, control.SessionOpened)]
        return opened[0].session_id if opened else None, seen

    def dies(self, home):
        """``home`` falls silent for the others: what each then does, as {home: [events]}."""
        seen = {other: [] for other in self.by_home}
        for h in self.by_home.values():
            if h.core.home != home:
                h.core.registry.relay_addrs.pop(home, None)
                h.core.fleet_home_silent(home, h.now)
                for other, events in self.carry(h.events(), h).items():
                    seen[other].extend(events)
        return seen


def sent(events, handle=None):
    return [e.message for e in events if isinstance(e, SendMessage)
            and (handle is None or e.handle == handle)]


def test_a_session_across_two_intermediates_is_signaled_and_relayed_through_both():
    t = TwoIntermediates()
    session_id, seen = t.open()
    assert session_id is not None
    # relay1 relays between the agent and relay2; relay2 between relay1 and the connector,
    # with the same tokens, so each member's frames pass both relays unchanged.
    [add1] = [e for e in seen["relay1"] if isinstance(e, signaling.RelayAdd)]
    [add2] = [e for e in seen["relay2"] if isinstance(e, signaling.RelayAdd)]
    assert (add1.agent_addr, add1.connector_addr) == (AGENT_ADDR, RELAY2)
    assert (add2.agent_addr, add2.connector_addr) == (RELAY1, CONNECTOR_ADDR)
    assert (add1.agent_token, add1.connector_token) == (add2.agent_token, add2.connector_token)
    [to_connector] = sent(seen["relay2"], 2)
    assert isinstance(to_connector, control.SessionOpened)
    assert to_connector.agent == "alice" and to_connector.peer_addr == AGENT_ADDR
    [to_agent] = sent(seen["relay1"], 1)
    assert to_agent.connector == "office" and to_agent.peer_addr == CONNECTOR_ADDR
    # Offer, answer, StartPunching on both sides, results.
    seen = t.carry(t.h1.say(1, offer(session_id)), t.h1)
    assert [type(m) for m in sent(seen["relay2"], 2)] == [control.CandidateOffer]
    seen = t.carry(t.h2.say(2, answer(session_id)), t.h2)
    assert [type(m) for m in sent(seen["relay1"], 1)] == [control.CandidateAnswer,
                                                          control.StartPunching]
    assert [type(m) for m in sent(seen["relay2"], 2)] == [control.StartPunching]
    t.carry(t.h2.say(2, result(session_id, path="direct")), t.h2)
    t.carry(t.h1.say(1, result(session_id, path="direct")), t.h1)
    owned = t.h1.core.registry.session(session_id)
    assert set(owned.reported) == {"agent", "connector"} and owned.path == "direct"
    assert t.h1.core.counters["sessions_across"] == 1
    assert t.h2.core.counters["sessions_mirrored"] == 1
    # The connector leaves: both relays drop the session and the agent is told why.
    t.h2.core.node_disconnected(2, t.h2.now)
    seen = t.carry(t.h2.events(), t.h2)
    assert any(isinstance(e, signaling.RelayRemove) for e in seen["relay2"])
    assert any(isinstance(e, signaling.RelayRemove) for e in seen["relay1"])
    [closed] = sent(seen["relay1"], 1)
    assert isinstance(closed, control.SessionClosed) and "office" in closed.reason
    assert t.h1.core.registry.sessions() == [] and t.h2.core.registry.sessions() == []


def fleet_sends(events):
    return [e for e in events if isinstance(e, signaling.FleetSend)]


def deliver(t, send, source):
    """One FleetSend from ``source`` to its intermediate, and what follows from it."""
    return t.carry([send], source)


def test_a_session_across_is_told_to_the_agent_only_once_the_connectors_side_confirms_it():
    t = TwoIntermediates()
    _, events = t.h1.open(service="web")
    assert sent(events, 1) == []  # nothing for the agent yet
    [send] = fleet_sends(events)
    assert isinstance(send.message, control.SessionOpened) and send.session is not None
    seen = deliver(t, send, t.h1)
    [confirm] = fleet_sends(seen["relay2"])
    assert confirm.home == "relay1" and confirm.session is None
    [opened] = sent(seen["relay1"], 1)
    assert isinstance(opened, control.SessionOpened) and opened.request_id == 7
    assert opened.session_id == send.message.session_id
    # No timer is left behind: ten times the whole deadline later, nothing more.
    later = t.h1.advance(10 * signaling.MIRROR_TIMEOUT * signaling.MIRROR_ATTEMPTS,
                         keep_alive=(1,))
    assert fleet_sends(later) == [] and sent(later) == []
    assert t.h1.core.counters["fleet_resent"] == 0


def test_a_lost_session_opened_is_sent_again_and_the_session_opens():
    t = TwoIntermediates()
    _, events = t.h1.open(service="web")
    [lost] = fleet_sends(events)  # the store dropped it: relay2 never hears of the session
    early = t.h1.advance(signaling.MIRROR_TIMEOUT - 0.05, step=0.05, keep_alive=(1,))
    assert fleet_sends(early) == []
    [again] = fleet_sends(t.h1.advance(0.1, step=0.05, keep_alive=(1,)))
    assert again == lost  # the same message and record: idempotent at relay2
    seen = deliver(t, again, t.h1)
    [opened] = sent(seen["relay1"], 1)
    assert isinstance(opened, control.SessionOpened) and opened.request_id == 7
    assert [type(m) for m in sent(seen["relay2"], 2)] == [control.SessionOpened]
    assert t.h1.core.counters["fleet_resent"] == 1
    assert t.h2.core.counters["sessions_mirrored"] == 1


def test_a_repeat_after_a_lost_confirmation_is_confirmed_again_and_changes_nothing():
    t = TwoIntermediates()
    _, events = t.h1.open(service="web")
    [send] = fleet_sends(events)
    t.h2.core.fleet_message("relay1", str(send.sender), str(send.to), send.message, t.h2.now,
                            session=send.session)
    first = t.h2.events()
    [lost_confirm] = fleet_sends(first)  # dropped on its way back
    [again] = fleet_sends(t.h1.advance(signaling.MIRROR_TIMEOUT + 0.05, step=0.05,
                                       keep_alive=(1,)))
    seen = deliver(t, again, t.h1)
    # relay2 confirms again without a second relay entry or SessionOpened for the connector.
    assert not [e for e in seen["relay2"] if isinstance(e, signaling.RelayAdd)]
    assert sent(seen["relay2"], 2) == []
    assert t.h2.core.counters["fleet_duplicates"] == 1
    assert t.h2.core.counters["sessions_mirrored"] == 1
    [opened] = sent(seen["relay1"], 1)
    assert isinstance(opened, control.SessionOpened)
    # The first confirmation arriving late is ignored: the agent is told once.
    late = deliver(t, lost_confirm, t.h2)
    assert sent(late["relay1"], 1) == []
    assert len(t.h1.core.registry.sessions()) == len(t.h2.core.registry.sessions()) == 1


def test_a_session_never_confirmed_answers_the_agent_with_an_error_after_three_sends():
    """Every SessionOpened to relay2 is lost: relay1 sends it MIRROR_ATTEMPTS times a
    MIRROR_TIMEOUT apart, then answers the agent's OpenSession with TIMEOUT and a reason,
    drops the session and its relay entry, and tells relay2 (which never heard of it)."""
    t = TwoIntermediates()
    _, events = t.h1.open(service="web")
    opened_at = t.h1.now
    sends = fleet_sends(events)
    errors = []
    while not errors and t.h1.now < opened_at + 10:
        later = t.h1.advance(0.05, step=0.05, keep_alive=(1,))
        sends += [s for s in fleet_sends(later) if isinstance(s.message, control.SessionOpened)]
        errors += [m for m in sent(later, 1) if isinstance(m, control.Error)]
        closing = [s for s in fleet_sends(later) if isinstance(s.message,
                                                                control.SessionClosed)]
    [error] = errors
    waited = t.h1.now - opened_at
    assert waited == pytest.approx(signaling.MIRROR_TIMEOUT * signaling.MIRROR_ATTEMPTS,
                                   abs=0.06)
    assert len(sends) == signaling.MIRROR_ATTEMPTS
    assert error.code == control.ErrorCode.TIMEOUT and error.request_id == 7
    assert ("connector 'office' at intermediate 'relay2' did not confirm the session within "
            "3.0 s (3 tries through the fleet's store)") in error.message
    assert t.h1.core.registry.sessions() == []
    [closing] = closing
    assert closing.home == "relay2" and closing.to == "2"
    assert deliver(t, closing, t.h1)["relay2"] == []  # unknown there: ignored and counted
    assert t.h1.core.counters["sessions_across_unconfirmed"] == 1
    later = t.h1.advance(30, keep_alive=(1,))
    assert fleet_sends(later) == [] and sent(later) == []


def test_an_unconfirmed_session_ends_at_once_when_the_connectors_intermediate_falls_silent():
    t = TwoIntermediates()
    _, events = t.h1.open(service="web")
    t.h1.core.registry.relay_addrs.pop("relay2")
    t.h1.core.fleet_home_silent("relay2", t.h1.now)
    [error] = sent(t.h1.events(), 1)
    assert error.code == control.ErrorCode.CONNECTOR_OFFLINE and error.request_id == 7
    assert "intermediate 'relay2' of connector 'office' fell silent" in error.message
    assert fleet_sends(t.h1.advance(10, keep_alive=(1,))) == []


def test_an_agent_leaving_before_the_confirmation_leaves_nothing_behind():
    t = TwoIntermediates()
    _, events = t.h1.open(service="web")
    seen = deliver(t, fleet_sends(events)[0], t.h1)  # relay2 mirrors; confirmation pending
    [confirm] = fleet_sends(seen["relay2"])
    t.h1.core.node_disconnected(1, t.h1.now)
    seen = t.carry(t.h1.events(), t.h1)
    assert t.h1.core.registry.sessions() == [] and t.h2.core.registry.sessions() == []
    [closed] = sent(seen["relay2"], 2)
    assert isinstance(closed, control.SessionClosed)
    assert sent(deliver(t, confirm, t.h2)["relay1"]) == []  # late: ignored
    assert fleet_sends(t.h1.advance(10)) == []


def test_start_punching_across_intermediates_counts_the_connectors_longer_way():
    """The connector's StartPunching goes through the store and its intermediate: the owner
    counts the connector's control RTT (its intermediate reports it with the answer) plus the
    store's round trip, and holds the agent's back by half the difference."""
    t = TwoIntermediates()
    t.h1.alive(1, rtt=0.010)
    t.h2.alive(2, rtt=0.100)
    t.h1.core.registry.store_rtt = 0.020
    session_id, _ = t.open()
    t.carry(t.h1.say(1, offer(session_id)), t.h1)
    seen = t.carry(t.h2.say(2, answer(session_id)), t.h2)
    assert [type(m) for m in sent(seen["relay2"], 2)] == [control.StartPunching]
    assert [type(m) for m in sent(seen["relay1"], 1)] == [control.CandidateAnswer]
    answered_at = t.h1.now
    later = t.h1.advance(0.1, step=0.005)
    [start] = [e for e in later if isinstance(e, SendMessage)
               and isinstance(e.message, control.StartPunching)]
    assert t.h1.when(start) - answered_at == pytest.approx((0.120 - 0.010) / 2, abs=0.006)


def test_the_agent_leaving_ends_the_mirror_and_tells_the_connector():
    t = TwoIntermediates()
    session_id, _ = t.open()
    t.h1.core.node_disconnected(1, t.h1.now)
    seen = t.carry(t.h1.events(), t.h1)
    [closed] = sent(seen["relay2"], 2)
    assert isinstance(closed, control.SessionClosed) and "alice" in closed.reason
    assert t.h2.core.registry.sessions() == []
    assert any(isinstance(e, signaling.RelayRemove) for e in seen["relay2"])


# Resuming a session after its intermediate died ----------------------------------------------
NEW_ADDR = ("198.51.100.77", 50001)


def tokens(seen):
    """The relay tokens the members were given: {handle: token}."""
    return {e.handle: e.message.relay_token for events in seen.values() for e in events
            if isinstance(e, SendMessage) and isinstance(e.message, control.SessionOpened)}


def resume(session_id, token, service="web", agent="alice", connector="office"):
    return control.ResumeSession(session_id=session_id, service=service, agent=agent,
                                 connector=connector, relay_token=token)


def test_an_agent_whose_intermediate_died_resumes_where_its_connector_is():
    """relay1 (the owner) dies. relay2 tells its connector to hold the session; the agent,
    homed again at relay2, resumes it with its token: relay2 takes the session over and
    relays straight between the two, the tokens unchanged."""
    t = TwoIntermediates(resumable=True)
    session_id, seen = t.open()
    agent_token = tokens(seen)[1]
    h2 = t.h2
    [held] = sent(t.dies("relay1")["relay2"], 2)
    assert held == control.SessionHeld(session_id=session_id, hold_ms=6000)
    h2.connect(3, "agent", "alice", NEW_ADDR, resumable=True)
    h2.events()
    # Someone else's token, or another agent's name, resumes nothing.
    [refused] = sent(h2.say(3, resume(session_id, b"\x00" * 8)), 3)
    assert refused.code == control.ErrorCode.UNKNOWN_SESSION
    assert refused.session_id == session_id
    [refused] = sent(h2.say(3, resume(session_id, agent_token, agent="mallory")), 3)
    assert "is not the agent of session" in refused.message
    events = h2.say(3, resume(session_id, agent_token))
    assert signaling.RelaySetMember(session_id, signaling.AGENT, NEW_ADDR) in events
    assert sent(events, 3) == sent(events, 2) == [control.SessionResumed(session_id=session_id)]
    record = h2.core.registry.session(session_id)
    assert (record.agent, record.connector, record.home) == (3, 2, "relay2")
    assert h2.core.counters["sessions_resumed"] == 1
    assert h2.core.counters["resumes_refused"] == 2
    # From now on relay2 owns it: signaling and the end go straight between the two.
    assert [type(m) for m in sent(h2.say(3, offer(session_id)), 2)] == [control.CandidateOffer]
    events = h2.say(3, control.SessionClosed(session_id=session_id, reason="done"))
    assert [type(m) for m in sent(events, 2)] == [control.SessionClosed]
    assert signaling.RelayRemove(session_id) in events
    assert not any(isinstance(e, signaling.FleetSend) for e in events)


def test_a_connector_whose_intermediate_died_resumes_at_the_owner():
    t = TwoIntermediates(resumable=True)
    session_id, seen = t.open()
    connector_token = tokens(seen)[2]
    h1 = t.h1
    assert sent(t.dies("relay2")["relay1"], 1) == [
        control.SessionHeld(session_id=session_id, hold_ms=6000)]
    h1.connect(4, "connector", "office", NEW_ADDR, services=("web",), resumable=True)
    h1.events()
    events = h1.say(4, resume(session_id, connector_token))
    assert signaling.RelaySetMember(session_id, signaling.CONNECTOR, NEW_ADDR) in events
    assert sent(events, 1) == sent(events, 4) == [control.SessionResumed(session_id=session_id)]
    assert h1.core.registry.session(session_id).members() == (1, 4)


def test_a_resume_waits_for_the_old_intermediate_to_be_known_silent():
    """The agent may home again a moment before relay2 takes relay1 for silent: its resume
    waits for that (within RESUME_WAIT), and without it is refused."""
    t = TwoIntermediates(resumable=True)
    session_id, seen = t.open()
    agent_token = tokens(seen)[1]
    h2 = t.h2
    h2.connect(3, "agent", "alice", NEW_ADDR, resumable=True)
    h2.events()
    assert h2.say(3, resume(session_id, agent_token)) == []
    h2.now += 1.0
    assert control.SessionResumed(session_id=session_id) in sent(t.dies("relay1")["relay2"], 3)
    # relay1 never falls silent: the resume is refused after RESUME_WAIT.
    t = TwoIntermediates(resumable=True)
    session_id, seen = t.open()
    t.h2.connect(3, "agent", "alice", NEW_ADDR, resumable=True)
    t.h2.events()
    t.h2.say(3, resume(session_id, tokens(seen)[1]))
    [refused] = sent(t.h2.advance(signaling.RESUME_WAIT + 0.5, keep_alive=(2, 3)), 3)
    assert "did not resume it here within 5 s" in refused.message
    assert t.h2.core.counters["resumes_expired"] == 1
    assert t.h2.core.registry.session(session_id).agent == "relay1/1"  # untouched


def test_members_of_a_session_this_intermediate_never_saw_resume_it_together():
    """Both members homed again here (their intermediate died or restarted): each resumes
    with its own token; when both have, and agree, the session is rebuilt and relayed."""
    h = Harness()
    h.connect(1, "agent", "alice", AGENT_ADDR, resumable=True)
    h.connect(2, "connector", "office", CONNECTOR_ADDR, services=("web",), resumable=True)
    h.events()
    sid, agent_token, connector_token = b"\x05" * 8, b"a" * 8, b"c" * 8
    assert h.say(1, resume(sid, agent_token)) == []
    events = h.say(2, resume(sid, connector_token))
    assert signaling.RelayAdd(sid, AGENT_ADDR, CONNECTOR_ADDR, agent_token,
                              connector_token) in events
    assert sent(events, 1) == sent(events, 2) == [control.SessionResumed(session_id=sid)]
    assert h.core.registry.session(sid).members() == (1, 2)
    # A member that disagrees (another service) is refused and cannot disturb the one
    # waiting, which is refused in turn when nobody agreeing came within RESUME_WAIT.
    other = b"\x06" * 8
    h.say(1, resume(other, agent_token))
    [refused] = sent(h.say(2, resume(other, connector_token, service="mail")), 2)
    assert refused.code == control.ErrorCode.UNKNOWN_SESSION
    assert h.core.registry.session(other) is None
    [refused] = sent(h.advance(signaling.RESUME_WAIT + 0.5, keep_alive=(1, 2)), 1)
    assert refused.code == control.ErrorCode.UNKNOWN_SESSION
    assert "did not resume it here" in refused.message
    # The ACL holds for a resumed session as for a new one.
    strict = Harness(acl=("bob=web",))
    strict.connect(1, "agent", "alice", AGENT_ADDR, resumable=True)
    strict.connect(2, "connector", "office", CONNECTOR_ADDR, services=("web",), resumable=True)
    strict.events()
    strict.say(1, resume(sid, agent_token))
    [refused] = sent(strict.say(2, resume(sid, connector_token)), 2)
    assert "not allowed to reach service 'web'" in refused.message


RELAY3 = ("192.0.2.3", 4478)


class ThreeIntermediates(TwoIntermediates):
    """relay1 (the agent, owner) and relay2 (the connector, mirror) as in TwoIntermediates,
    and relay3, which knows both and holds nobody yet; FleetSends go to their home."""

    def __init__(self):
        super().__init__(resumable=True)
        self.h3 = Harness(home="relay3", registry=FleetRegistry("relay3"))
        reg3 = self.h3.core.registry
        reg3.relay_addrs.update(relay1=RELAY1, relay2=RELAY2)
        for h in (self.h1, self.h2):
            h.core.registry.relay_addrs["relay3"] = RELAY3
            for node in h.core.registry.nodes():
                if node.home == h.core.home:
                    reg3.apply_remote(h.core.home, "put", str(node.handle), encode_record(node))
        [alice] = [n for n in self.h1.core.registry.nodes() if n.name == "alice"]
        self.h2.core.registry.apply_remote("relay1", "put", "1", encode_record(alice))
        self.by_home["relay3"] = self.h3


def test_an_agent_homing_at_a_third_intermediate_resumes_through_the_connectors():
    """relay1 (the agent's, the owner) dies and the agent homes at relay3, which holds no
    record: its resume goes to relay2, which holds the connector's side; relay2 takes the
    session over with the agent at relay3, and relay3 mirrors it. Signaling then runs
    relay3 <-> relay2, and each relay forwards to the other with the same tokens."""
    t = ThreeIntermediates()
    session_id, seen = t.open()
    agent_token = tokens(seen)[1]
    t.dies("relay1")
    h3 = t.h3
    h3.connect(5, "agent", "alice", NEW_ADDR, resumable=True)
    h3.events()
    seen = t.carry(h3.say(5, resume(session_id, agent_token)), h3)
    assert signaling.RelaySetMember(session_id, signaling.AGENT, RELAY3) in seen["relay2"]
    [add] = [e for e in seen["relay3"] if isinstance(e, signaling.RelayAdd)]
    assert (add.agent_addr, add.connector_addr) == (NEW_ADDR, RELAY2)
    assert control.SessionResumed(session_id=session_id) in sent(seen["relay3"], 5)
    assert control.SessionResumed(session_id=session_id) in sent(seen["relay2"], 2)
    owned, mirror = t.h2.core.registry.session(session_id), h3.core.registry.session(session_id)
    assert (owned.home, owned.agent, owned.connector) == ("relay2", "relay3/5", 2)
    assert (mirror.home, mirror.agent, mirror.connector) == ("relay2", 5, "relay2/2")
    # Punching again goes through both: offer to the connector, answer and StartPunching back.
    seen = t.carry(h3.say(5, offer(session_id)), h3)
    assert [type(m) for m in sent(seen["relay2"], 2)] == [control.CandidateOffer]
    seen = t.carry(t.h2.say(2, answer(session_id)), t.h2)
    assert {type(m) for m in sent(seen["relay3"], 5)} == {control.CandidateAnswer,
                                                          control.StartPunching}


def test_a_connector_homing_at_a_third_intermediate_resumes_through_the_owner():
    t = ThreeIntermediates()
    session_id, seen = t.open()
    connector_token = tokens(seen)[2]
    t.dies("relay2")
    h3 = t.h3
    h3.connect(7, "connector", "office", NEW_ADDR, services=("web",), resumable=True)
    h3.events()
    # Someone else's token: refused by the owner, and the node is told.
    seen = t.carry(h3.say(7, resume(session_id, b"\x00" * 8)), h3)
    [refused] = sent(seen["relay3"], 7)
    assert refused.code == control.ErrorCode.UNKNOWN_SESSION and refused.session_id == session_id
    seen = t.carry(h3.say(7, resume(session_id, connector_token)), h3)
    assert signaling.RelaySetMember(session_id, signaling.CONNECTOR, RELAY3) in seen["relay1"]
    [add] = [e for e in seen["relay3"] if isinstance(e, signaling.RelayAdd)]
    assert (add.agent_addr, add.connector_addr) == (RELAY1, NEW_ADDR)
    assert control.SessionResumed(session_id=session_id) in sent(seen["relay3"], 7)
    assert t.h1.core.registry.session(session_id).connector == "relay3/7"
    # The end travels back the same way.
    seen = t.carry(t.h1.say(1, control.SessionClosed(session_id=session_id, reason="bye")), t.h1)
    assert [type(m) for m in sent(seen["relay3"], 7)] == [control.SessionClosed]
    assert h3.core.registry.session(session_id) is None


class SplitUp(ThreeIntermediates):
    """Both members of a session at relay1, which dies: the agent homes at relay2 (handle
    5), the connector at relay3 (handle 6), and each intermediate's view shows the other's
    node."""

    def __init__(self):  # noqa: super().__init__ is not called: another starting point
        self.carried = 0
        addrs = {"relay1": RELAY1, "relay2": RELAY2, "relay3": RELAY3}
        self.by_home = {}
        for home in addrs:
            h = self.by_home[home] = Harness(home=home, registry=FleetRegistry(home))
            h.core.registry.relay_addrs.update({k: v for k, v in addrs.items() if k != home})
        self.h1, self.h2, self.h3 = self.by_home.values()
        h1 = self.h1
        h1.connect(1, "agent", "alice", AGENT_ADDR, resumable=True)
        h1.connect(2, "connector", "office", CONNECTOR_ADDR, services=("web",),
                   resumable=True)
        h1.events()
        self.session_id, events = h1.open(service="web")
        self.tokens = tokens({"relay1": events})
        self.dies("relay1")
        self.h2.connect(5, "agent", "alice", NEW_ADDR, resumable=True)
        self.h3.connect(6, "connector", "office", CONNECTOR_ADDR, services=("web",),
                        resumable=True)
        for here, there, handle in ((self.h2, self.h3, 6), (self.h3, self.h2, 5)):
            [node] = [n for n in there.core.registry.nodes() if n.handle == handle]
            here.core.registry.apply_remote(there.core.home, "put", str(handle),
                                            encode_record(node))
        self.h2.events(), self.h3.events()

    def resume(self, harness, handle, token):
        return self.carry(harness.say(handle, resume(self.session_id, token)), harness)


@pytest.mark.parametrize("together", [False, True])
def test_members_that_home_at_two_different_intermediates_resume_across_them(together):
    """Neither relay2 nor relay3 holds a record. The agent's resume goes to relay3 (where
    the connector is) and waits there; the connector's, arriving at relay3, pairs with it:
    relay3 owns the session, relay2 mirrors it. When both resumes cross on the way
    (``together``), each intermediate pairs the one it received with its own and owns the
    session with the other member remote: the frames still pass both relays and each
    member hears SessionResumed."""
    t = SplitUp()
    sid = t.session_id
    if together:
        first = t.h2.say(5, resume(sid, t.tokens[1]))  # held back: both are on their way
        t.carry(t.h3.say(6, resume(sid, t.tokens[2])), t.h3)
        t.carry(first, t.h2)
    else:
        t.resume(t.h2, 5, t.tokens[1])
        t.resume(t.h3, 6, t.tokens[2])
    resumed = control.SessionResumed(session_id=sid)
    assert resumed in [e.message for e in t.h2.log if isinstance(e, SendMessage)
                       and e.handle == 5]
    assert resumed in [e.message for e in t.h3.log if isinstance(e, SendMessage)
                       and e.handle == 6]
    at2, at3 = t.h2.core.registry.session(sid), t.h3.core.registry.session(sid)
    assert (at2.agent, at2.connector) == (5, "relay3/6")
    assert (at3.agent, at3.connector) == ("relay2/5", 6)
    adds2 = [e for e in t.h2.log if isinstance(e, signaling.RelayAdd)]
    adds3 = [e for e in t.h3.log if isinstance(e, signaling.RelayAdd)]
    assert [(a.agent_addr, a.connector_addr) for a in adds2] == [(NEW_ADDR, RELAY3)]
    assert [(a.agent_addr, a.connector_addr) for a in adds3] == [(RELAY2, CONNECTOR_ADDR)]
    assert adds2[0].agent_token == adds3[0].agent_token == t.tokens[1]
    # Signaling runs between them: an offer from the agent reaches the connector.
    seen = t.carry(t.h2.say(5, offer(sid)), t.h2)
    assert [type(m) for m in sent(seen["relay3"], 6)] == [control.CandidateOffer]


def test_a_member_of_control_protocol_1_is_never_sent_the_new_messages():
    t = TwoIntermediates(resumable=False)
    session_id, _ = t.open()
    assert sent(t.dies("relay1")["relay2"]) == []


def test_a_connectors_session_quota_holds_for_sessions_opened_at_other_intermediates():
    """relay1 does not know how many sessions the connector at relay2 serves: relay2 does,
    counts the ones it mirrors, and refuses one over the quota back to relay1, which ends
    it and answers the agent's OpenSession with why. Relay shares count the mirrored
    sessions too."""
    t = TwoIntermediates(limits2=signaling.Limits(sessions_per_connector=1,
                                                  relay_rate_per_identity=1_000_000))
    first, seen = t.open()
    assert t.h2.core.registry.session(first) is not None
    assert any(isinstance(e, signaling.RelaySetRate) for e in seen["relay2"])
    second, seen = t.open()
    assert second is None
    assert t.h2.core.registry.sessions() == t.h2.core.registry.sessions_of(2) != []
    assert len(t.h1.core.registry.sessions()) == 1
    [error] = sent(seen["relay1"], 1)
    assert isinstance(error, control.Error) and error.request_id == 7
    assert error.code == control.ErrorCode.RATE_LIMITED
    assert "serves 1 sessions, the most allowed (--sessions-per-connector)" in error.message
    [refused] = [e.session_id for e in seen["relay1"] if isinstance(e, signaling.RelayRemove)]
    assert t.h1.core.registry.session(refused) is None
    assert t.h2.core.counters["sessions_rate_limited"] == 1


def test_fleet_messages_that_fit_no_session_are_ignored_and_counted():
    t = TwoIntermediates()
    session_id, _ = t.open()
    core2, core1 = t.h2.core, t.h1.core
    before = core2.counters["fleet_ignored"]
    # Unknown session; a member that is not the session's; a home that does not own it.
    core2.fleet_message("relay1", "1", "2", offer(b"\x01" * 8), t.h2.now)
    core1.fleet_message("relay2", "9", "1", answer(session_id), t.h1.now)
    core2.fleet_message("relay3", "1", "2", offer(session_id), t.h2.now)
    # A SessionOpened for an agent, or without the session's record.
    opened = control.SessionOpened(request_id=0, session_id=b"\x02" * 8, service="web",
                                   agent="alice", connector="office", peer_addr=None,
                                   relay_token=b"t" * 8)
    core2.fleet_message("relay1", "1", "2", opened, t.h2.now)
    assert core2.counters["fleet_ignored"] == before + 3
    assert core1.counters["fleet_ignored"] == 1
    assert sent(t.h2.events(), 2) == [] and sent(t.h1.events(), 1) == []
    # A connector's word on a mirrored session that is not its to send goes nowhere.
    events = t.h2.say(2, offer(session_id))
    assert not [e for e in events if isinstance(e, signaling.FleetSend)]
    assert core2.counters["ignored_wrong_direction"] == 1


def test_a_connector_elsewhere_that_cannot_be_reached_is_refused_saying_so():
    t = TwoIntermediates()
    t.h1.core.registry.relay_addrs.clear()  # the store is unavailable
    session_id, events = t.h1.open(service="web")
    assert session_id is None
    [error] = sent(events, 1)
    assert error.code == control.ErrorCode.CONNECTOR_OFFLINE
    assert "at intermediate 'relay2', which cannot be reached now" in error.message


@pytest.mark.parametrize("relay_only", [True, False], ids=["relayed", "direct"])
def test_an_agent_reaches_a_connector_at_another_intermediate(fleet_certs, redis_server,
                                                              relay_only):
    """Agent at relay1, connector at relay2: the session is signaled through Redis, relayed
    through both intermediates (relay_only), or punched to a direct path; 2 MB arrive intact
    and both intermediates see it end."""
    async def main():
        async with intermediate(fleet_certs, "relay1", redis_server.url) as relay1, \
                intermediate(fleet_certs, "relay2", redis_server.url) as relay2:
            connector = mahole.Connector(relay2.address, bind=("127.0.0.1", 0),
                                         control_socket="", relay_only=relay_only,
                                         include_loopback=True,
                                         **creds(fleet_certs, "office"))
            connector.serve("web", _echo_tcp)
            async with connector, mahole.Agent(
                    relay1.address, bind=("127.0.0.1", 0), control_socket="",
                    relay_only=relay_only, include_loopback=True,
                    **creds(fleet_certs, "alice")) as agent:
                await connector.wait_registered()
                await wait_for(lambda: remote(relay1) == {"relay2": 1}
                               and relay1._role.signaling.registry.relay_address("relay2"), 10)
                data = os.urandom(2 << 20)
                reader, writer = await agent.open_connection("web")
                writer.write(data)
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(), 30) == data
                writer.close()
                session = await agent.session("web")
                if relay_only:
                    assert session.path == "relay"
                    # Both relays carried the frames: each member's, both ways.
                    for relay in (relay1, relay2):
                        counters = relay.status()["relay"]
                        assert counters["relayed_bytes"] > 2 * len(data), counters
                        assert counters["dropped_not_member"] == 0
                        assert counters["dropped_bad_token"] == 0
                else:
                    await wait_for(lambda: session.path == "direct", 10)
                assert relay1.status()["counters"]["sessions_across"] == 1
                assert relay2.status()["counters"]["sessions_mirrored"] == 1
                assert relay2.status()["sessions"]["open"] == 1
            await wait_for(lambda: relay1.status()["sessions"]["open"] == 0
                           and relay2.status()["sessions"]["open"] == 0, 10)
    run(main(), timeout=120)


@pytest.mark.parametrize("lost", [1, "all", "subscriber"])
def test_a_session_opened_through_a_store_that_loses_messages(fleet_certs, redis_server,
                                                              lost):
    """Redis pub/sub drops what arrives while a subscriber is away. relay2 loses the first
    SessionOpened relay1 forwards for its connector: relay1 sends it again a second later and
    the session opens. relay2 loses every one: the agent is told why within about 3 s (its
    own open timeout, 8 s here, is never what answers). Redis drops the intermediates'
    subscriptions just before the agent asks: the session opens once they are back, or
    the agent is told why, within the same bound."""
    async def main():
        async with intermediate(fleet_certs, "relay1", redis_server.url) as relay1, \
                intermediate(fleet_certs, "relay2", redis_server.url) as relay2:
            dropped = []
            receive = relay2._role.fleet._signaling

            def lossy(data):
                if b"SessionOpened" in data and (lost == "all" or not dropped):
                    dropped.append(data)  # as if it came while the subscriber reconnected
                    return
                receive(data)
            if lost != "subscriber":
                relay2._role.fleet._signaling = lossy
            connector = mahole.Connector(relay2.address, bind=("127.0.0.1", 0),
                                         control_socket="", relay_only=True,
                                         include_loopback=True,
                                         **creds(fleet_certs, "office"))
            connector.serve("web", _echo_tcp)
            async with connector, mahole.Agent(
                    relay1.address, bind=("127.0.0.1", 0), control_socket="",
                    relay_only=True, include_loopback=True, open_timeout=8.0,
                    **creds(fleet_certs, "alice")) as agent:
                await connector.wait_registered()
                await wait_for(lambda: remote(relay1) == {"relay2": 1}
                               and relay1._role.signaling.registry.relay_address("relay2"), 10)
                if lost == "subscriber":
                    killer = redis.Redis.from_url(redis_server.url)
                    assert killer.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
                    killer.close()
                started = time.monotonic()
                if lost == "subscriber":
                    try:
                        reader, writer = await agent.open_connection("web")
                        writer.close()
                        print(f"opened {time.monotonic() - started:.2f} s after the "
                              f"subscriptions were dropped")
                    except mahole.ServiceUnavailable as exc:
                        assert "did not confirm the session within" in str(exc)
                        print(f"refused after {time.monotonic() - started:.2f} s: {exc}")
                    assert time.monotonic() - started < 6.0
                    await wait_for(lambda: relay2.status()["fleet"]["counters"]
                                   ["subscriptions_lost"] >= 1, 5)
                    return
                if lost == "all":
                    with pytest.raises(mahole.ServiceUnavailable) as refused:
                        await agent.open_connection("web")
                    took = time.monotonic() - started
                    assert ("connector 'office' at intermediate 'relay2' did not confirm the "
                            "session within") in str(refused.value)
                    assert took < 6.0, took
                    assert dropped
                    counters = relay1.status()["counters"]
                    assert counters["fleet_resent"] == signaling.MIRROR_ATTEMPTS - 1
                    assert counters["sessions_across_unconfirmed"] == 1
                    assert relay1.status()["sessions"]["open"] == 0
                    status = agent.status()
                    assert status["counters"]["session_errors"] == 1
                    failed = status["last_session_error"]
                    assert failed["service"] == "web" and failed["code"] == "TIMEOUT"
                    assert "did not confirm the session" in failed["error"]
                    print(f"refused after {took:.2f} s")
                    return
                reader, writer = await agent.open_connection("web")
                took = time.monotonic() - started
                writer.write(b"hello")
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(), 30) == b"hello"
                writer.close()
                assert len(dropped) == 1 and took < 6.0, took
                assert relay1.status()["counters"]["fleet_resent"] == 1
                assert relay2.status()["counters"]["sessions_mirrored"] == 1
                print(f"opened in {took:.2f} s past one lost message")
    run(main(), timeout=60)


# Intermediates as processes, killed ------------------------------------------------------------
@pytest.mark.parametrize("path", ["direct", "relay"])
def test_nodes_rehome_within_3_s_when_their_intermediate_is_killed_and_a_stream_goes_on(
        fleet_certs, redis_server, processes, path):
    """Three intermediate processes of one fleet: a connector (in this process) at relay2,
    an agent that knows relay1 and relay3 and homes on the nearest. A stream flows on the
    direct path, or through both relays (relay-only nodes); the agent's home is killed
    (SIGKILL): the agent is registered at the other within 3 s, and the stream ends
    byte-identical on the same session. A relayed session is resumed: the agent's new home
    holds no record of it, so it asks relay2, which holds the connector's side; relay2 takes
    the session over and the route moves under the same connection."""
    from test_processes import status

    relays = {}
    for name in ("relay1", "relay2", "relay3"):
        port, status_port = free_port(socket.SOCK_DGRAM), free_port()
        proc = processes.start(
            "intermediate", "--listen", f"127.0.0.1:{port}", "--registry", redis_server.url,
            "--allow", "*=*", "--status", f"127.0.0.1:{status_port}",
            "--control-socket", "", *creds_args(fleet_certs, name), name=name)
        relays[name] = (proc, ("127.0.0.1", port), status_port)
    for name, (proc, _addr, status_port) in relays.items():
        deadline = time.monotonic() + 20
        while ((status(status_port) or {}).get("fleet") or {}).get("connected") is not True:
            assert proc.poll() is None and time.monotonic() < deadline, f"{name} did not start"
            time.sleep(0.05)
    agent_homes = [relays[name][1] for name in ("relay1", "relay3")]

    async def main():
        common = {"bind": ("127.0.0.1", 0), "control_socket": "", "include_loopback": True,
                  "relay_only": path == "relay"}
        connector = mahole.Connector(relays["relay2"][1], **common,
                                     **creds(fleet_certs, "office"))
        connector.serve("sink", _digest)
        async with connector, mahole.Agent(agent_homes, **common,
                                           **creds(fleet_certs, "alice")) as agent:
            await connector.wait_registered()
            # The agent's intermediate learns of the connector through Redis within moments.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while True:
                try:
                    session = await agent.session("sink")
                    break
                except mahole.ServiceUnavailable:
                    assert loop.time() < deadline, "the connector never became reachable"
                    await asyncio.sleep(0.05)
            await wait_for(lambda: session.path == path, 15)
            reader, writer = await agent.open_connection("sink")
            home = agent.status()["intermediate"]["addr"]
            [victim] = [n for n, (_p, addr, _s) in relays.items() if f"{addr[0]}:{addr[1]}" == home]
            digest, sent, rehomed = hashlib.sha256(), 0, None
            while sent < 24 << 20:
                chunk = os.urandom(64 << 10)
                digest.update(chunk)
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
                if rehomed is None and sent >= 4 << 20:
                    processes.stop(relays[victim][0], signal.SIGKILL)
                    # Timed on its own: a relayed stream waits for the resumption.
                    rehomed = loop.create_task(rehomed_at(agent, home))
                    killed_at = loop.time()
                await asyncio.sleep(0.002)  # a steady stream across the kill
            rehomed_after = await rehomed - killed_at
            writer.write_eof()
            answer = await asyncio.wait_for(reader.read(), 30)
            assert answer.decode() == f"{digest.hexdigest()} {sent}\n"
            assert session.path == path and not session.closed
            [stats] = agent.status()["sessions"]
            if path == "relay":
                assert stats["relay_addr"] != home and stats["relay_moves"] == 1, stats
            writer.close()
            return rehomed_after

    rehomed_after = run(main(), timeout=120)
    if path == "relay":  # relay2 took the session over
        assert status(relays["relay2"][2])["counters"]["sessions_resumed"] == 1
    print(f"{path}: re-homed {rehomed_after:.2f} s after the kill")
    assert rehomed_after < 3.0


async def rehomed_at(node, home):
    """When ``node`` is registered at an intermediate other than ``home`` (loop time)."""
    await wait_for(lambda: node.status()["intermediate"]["connected"]
                   and node.status()["intermediate"]["addr"] != home, 10)
    return asyncio.get_running_loop().time()


async def _digest(reader, writer):
    digest, size = hashlib.sha256(), 0
    while chunk := await reader.read(1 << 16):
        digest.update(chunk)
        size += len(chunk)
    writer.write(f"{digest.hexdigest()} {size}\n".encode())
    await writer.drain()


def creds_args(directory, name):
    return ["--ca", str(directory / "ca.crt"), "--cert", str(directory / f"{name}.crt"),
            "--key", str(directory / f"{name}.key")]


# One identity across the fleet -----------------------------------------------------------------
def test_a_second_copy_at_another_intermediate_is_refused_while_the_first_answers():
    t = TwoIntermediates()
    office = t.h1.core.registry.node_by_identity("connector", "office")
    assert office.home == "relay2"
    # A copy of 'office' registers at relay1: relay1 asks relay2, relay2 pings its node.
    seen = t.carry(t.h1.connect(9, "connector", "office", ("198.51.100.9", 7000),
                                services=("web",)), t.h1)
    [ping] = sent(seen["relay2"], 2)
    assert isinstance(ping, control.Ping)
    # The first copy answers: the newcomer is refused, naming where the first one is.
    seen = t.carry(t.h2.say(2, control.Pong(nonce=ping.nonce)), t.h2)
    error, close = _refusal(seen["relay1"])
    assert error.code == control.ErrorCode.CONFLICT
    assert "answering at intermediate 'relay2'" in error.message
    assert close.code == signaling.CLOSE_CONFLICT
    assert t.h2.core.is_connected(2)


def test_a_copy_elsewhere_that_does_not_answer_is_replaced_and_let_go():
    t = TwoIntermediates()
    seen = t.carry(t.h1.connect(9, "connector", "office", ("198.51.100.9", 7000),
                                services=("web",)), t.h1)
    assert isinstance(sent(seen["relay2"], 2)[0], control.Ping)
    # No Pong within the probe timeout: relay1 registers the newcomer, relay2 lets go.
    seen = t.carry(t.h1.advance(t.h1.core.probe_timeout + 0.5, keep_alive=(1, 9)), t.h1)
    assert [type(m) for m in sent(seen["relay1"], 9)] == [control.Registered]
    assert t.h1.core.registry.node_by_identity("connector", "office").home == "relay1"
    assert [e.handle for e in seen["relay2"] if isinstance(e, signaling.CloseNode)] == [2]
    assert not t.h2.core.is_connected(2)


def test_a_probe_waiting_on_an_intermediate_that_falls_silent_ends_at_once():
    """The node re-homes before its dead intermediate is known to be silent: the probe is
    sent; when the heartbeats are found missing, the newcomer registers without waiting for
    the probe timeout."""
    t = TwoIntermediates()
    seen = t.carry(t.h1.connect(9, "connector", "office", ("198.51.100.9", 7000),
                                services=("web",)), t.h1)
    assert isinstance(sent(seen["relay2"], 2)[0], control.Ping)
    assert not sent(seen["relay1"], 9)  # waiting for the answer
    t.h1.core.registry.relay_addrs.pop("relay2")
    t.h1.core.fleet_home_silent("relay2", t.h1.now + 0.2)
    assert [type(m) for m in sent(t.h1.events(), 9)] == [control.Registered]
    assert t.h1.core.registry.node_by_identity("connector", "office").home == "relay1"


def test_a_node_whose_intermediate_is_silent_registers_elsewhere_at_once():
    """The fleet shell takes a silent intermediate out of relay_addrs: its nodes can
    re-home at once (what a node does when its intermediate dies)."""
    t = TwoIntermediates()
    t.h1.core.registry.relay_addrs.clear()
    events = t.h1.connect(9, "connector", "office", ("198.51.100.9", 7000), services=("web",))
    assert [type(m) for m in sent(events, 9)] == [control.Registered]
    assert not [e for e in events if isinstance(e, signaling.FleetSend)]


# Service replicas ------------------------------------------------------------------------------
def test_when_a_replica_is_killed_new_connections_reach_the_other_within_3_s(tmp_path,
                                                                             processes):
    """Two connectors offer one service; /status names the replica of each session; the one
    serving the agent is killed (SIGKILL) and a new connection works within 3 s."""
    issue_certificates(tmp_path)
    for name in ("office-a", "office-b"):
        identity.issue(tmp_path, "connector", name)

    async def main():
        echo = await asyncio.start_server(_echo_tcp, "127.0.0.1", 0)
        echo_port = echo.sockets[0].getsockname()[1]
        async with mahole.Intermediate(allow=("*=*",), offer=("office-*=web",),
                                       control_socket="",
                                       **creds(tmp_path, "intermediate")) as relay:
            host, port = relay.address
            replicas = {
                name: processes.start(
                    "connector", "--intermediate", f"{host}:{port}", "--bind", "127.0.0.1:0",
                    "--service", f"web=tcp:127.0.0.1:{echo_port}", "--control-socket", "",
                    *creds_args(tmp_path, name), name=name)
                for name in ("office-a", "office-b")}
            await wait_for(lambda: relay.status()["nodes"]["connectors"] == 2, 20)
            async with mahole.Agent(relay.address, bind=("127.0.0.1", 0), control_socket="",
                                    **creds(tmp_path, "alice")) as agent:
                assert await _round_trip(agent, b"first") == b"first"
                [serving] = [s["connector"] for s in relay.status()["sessions"]["list"]]
                assert serving in replicas
                loop = asyncio.get_running_loop()
                processes.stop(replicas[serving], signal.SIGKILL)
                killed_at = loop.time()
                while True:
                    try:
                        if await asyncio.wait_for(_round_trip(agent, b"again"), 0.5) == b"again":
                            break
                    except (mahole.Error, asyncio.TimeoutError, ConnectionError):
                        pass
                    assert loop.time() - killed_at < 10, "no replica took over"
                    await asyncio.sleep(0.05)
                took_over = loop.time() - killed_at
                [now_serving] = [s["connector"] for s in relay.status()["sessions"]["list"]]
                assert now_serving != serving
        echo.close()
        return took_over

    took_over = run(main(), timeout=90)
    print(f"a new connection reached the other replica {took_over:.2f} s after the kill")
    assert took_over < 3.0


async def _round_trip(agent, data):
    reader, writer = await agent.open_connection("web")
    try:
        writer.write(data)
        writer.write_eof()
        return await reader.read()
    finally:
        writer.close()


# Homing, sans-IO ---------------------------------------------------------------------------
def test_a_node_homes_on_the_intermediate_that_answers_first():
    from mahole.homing import HomeRanking
    from mahole.wire import stun

    a, b, c = ("192.0.2.1", 4478), ("192.0.2.2", 4478), ("192.0.2.3", 4478)
    ranking = HomeRanking([(a, "a"), (b, "b"), (c, "c")])
    probes = ranking.probes(now=10.0)
    assert [addr for _data, addr in probes] == [a, b, c]

    def answer(data, addr, now, source=None):
        request = stun.decode(data)
        reply = stun.encode(stun.binding_success(request, ("198.51.100.1", 5000)))
        return ranking.response(reply, source or addr, now)

    (pa, _), (pb, _), (pc, _) = probes
    assert not answer(pb, b, 10.02, source=c)  # an answer from elsewhere is not b's
    assert answer(pb, b, 10.02) and answer(pa, a, 10.05)
    assert not answer(pa, a, 10.06)  # once only
    assert not ranking.response(b"\x00" * 40, a, 10.1) and not ranking.done
    assert [name for _addr, name in ranking.order()] == ["b", "a", "c"]  # c never answered
    assert ranking.rtts == {b: pytest.approx(0.02), a: pytest.approx(0.05)}


def test_a_fleet_through_redis_over_tls(fleet_certs, tmp_path):
    """rediss://: the intermediates reach Redis over TLS, checking its certificate."""
    from redis_helpers import RedisServer, need_redis

    need_redis()
    identity.issue(fleet_certs, "intermediate", "redis", hosts=["127.0.0.1"])
    server = RedisServer(tmp_path / "redis-tls", tls=(
        str(fleet_certs / "ca.crt"), str(fleet_certs / "redis.crt"),
        str(fleet_certs / "redis.key"))).start()
    try:
        async def main():
            assert server.url.startswith("rediss://")
            async with intermediate(fleet_certs, "relay1", server.url) as relay1, \
                    intermediate(fleet_certs, "relay2", server.url) as relay2:
                async with mahole.Connector(relay2.address, bind=("127.0.0.1", 0),
                                            control_socket="",
                                            **creds(fleet_certs, "office")) as connector:
                    await connector.wait_registered()
                    await wait_for(lambda: remote(relay1) == {"relay2": 1}, 10)
                    assert relay1.status()["fleet"]["connected"]
        run(main(), timeout=60)
    finally:
        server.stop()


# Copies registered while the store was unavailable ---------------------------------------------
def test_copies_registered_while_the_store_was_away_are_resolved_in_favour_of_the_older():
    """alice lives at relay1 (registered first). While relay2 cannot reach the store, a
    second alice registers there. When the views meet again, relay2 (the newer copy's)
    asks relay1's copy whether it lives; it answers, so relay2 lets its copy go with
    CONFLICT, as at registration. relay1 does nothing: its copy is the older."""
    walls = iter([100.0, 200.0])
    clock = lambda: next(walls)  # noqa: E731 - the registrations' wall clock, in order
    h1 = Harness(home="relay1", registry=FleetRegistry("relay1"), wall_clock=clock)
    h2 = Harness(home="relay2", registry=FleetRegistry("relay2"), wall_clock=clock)
    h1.connect(1, "agent", "alice", AGENT_ADDR, resumable=True)
    h2.connect(9, "agent", "alice", NEW_ADDR, resumable=True)  # relay1 unknown here: no probe
    h1.events(), h2.events()
    [a1] = h1.core.registry.nodes()
    [a2] = h2.core.registry.nodes()
    # The store is back: each reads the other's nodes.
    h1.core.registry.relay_addrs["relay2"] = RELAY2
    h2.core.registry.relay_addrs["relay1"] = RELAY1
    h1.core.registry.apply_remote("relay2", "put", "9", encode_record(a2))
    h2.core.registry.apply_remote("relay1", "put", "1", encode_record(a1))
    h1.core.resolve_duplicates(h1.now)
    assert h1.events() == [] and h1.core.counters["duplicates_found"] == 0
    h2.core.resolve_duplicates(h2.now)
    [ask] = h2.events()
    assert isinstance(ask, signaling.FleetSend) and ask.home == "relay1"
    h1.core.fleet_message("relay2", None, ask.to, ask.message, h1.now)
    [ping] = sent(h1.events(), 1)
    [answer] = [e for e in h1.say(1, control.Pong(nonce=ping.nonce))
                if isinstance(e, signaling.FleetSend)]
    h2.core.fleet_message("relay1", str(answer.sender), answer.to, answer.message, h2.now)
    events = h2.events()
    [error] = sent(events, 9)
    assert error.code == control.ErrorCode.CONFLICT and "relay1" in error.message
    assert any(isinstance(e, signaling.CloseNode) and e.code == signaling.CLOSE_CONFLICT
               for e in events)
    assert not h2.core.is_connected(9) and h1.core.is_connected(1)
    assert h2.core.counters["duplicates_let_go"] == 1


def test_a_stale_record_of_an_older_copy_changes_nothing():
    walls = iter([100.0, 200.0])
    clock = lambda: next(walls)  # noqa: E731
    h1 = Harness(home="relay1", registry=FleetRegistry("relay1"), wall_clock=clock)
    h2 = Harness(home="relay2", registry=FleetRegistry("relay2"), wall_clock=clock)
    h1.connect(1, "agent", "alice", AGENT_ADDR)
    h2.connect(9, "agent", "alice", NEW_ADDR)
    h1.events(), h2.events()
    [a1] = h1.core.registry.nodes()
    h2.core.registry.relay_addrs["relay1"] = RELAY1
    h2.core.registry.apply_remote("relay1", "put", "1", encode_record(a1))
    h2.core.resolve_duplicates(h2.now)
    assert len(h2.events()) == 1  # the question, which nobody answers
    h2.advance(3 * signaling.PROBE_TIMEOUT, keep_alive=(9,))
    assert h2.core.is_connected(9) and h2.core.counters["duplicates_let_go"] == 0
