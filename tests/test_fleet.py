"""A fleet of intermediates sharing a directory of nodes: the registry view (sans-IO), the
signaling core with it, and intermediates in this process on a real redis-server."""

import asyncio
import json
import os

import pytest

from aio_helpers import run, wait_for
from redis_helpers import redis_server  # noqa: F401 - a fixture
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


def test_one_identity_is_one_node_across_the_fleet():
    h, reg = fleet_harness()
    reg.apply_remote("relay2", "put", "4", encode_record(record(4, role="agent", name="alice",
                                                               services=())))
    error, close = _refusal(h.connect(1, "agent", "alice", AGENT_ADDR))
    assert error.code == control.ErrorCode.CONFLICT
    assert "registered with intermediate 'relay2'" in error.message
    assert close.code == signaling.CLOSE_CONFLICT
    # Once relay2 lets go (or its heartbeat expires), the name is free here.
    reg.forget_home("relay2")
    h.connect(2, "agent", "alice", AGENT_ADDR)
    assert reg.node_by_identity("agent", "alice").home == "test"


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
    identity.issue(tmp_path, "intermediate", "relay2", hosts=["127.0.0.1"])
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
                                       match="registered with intermediate 'relay2'"):
                        async with copy:
                            await copy.wait_registered()
                status = relay1.status()["fleet"]
                assert status["connected"] and status["intermediates"] == ["relay2"]
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
    """Redis dies: relay1's own agent and connector keep working, relay2's nodes are
    forgotten after the TTL; Redis returns: relay1 rejoins and sees relay2's nodes again."""
    async def main():
        async with intermediate(fleet_certs, "relay1", redis_server.url) as relay1, \
                intermediate(fleet_certs, "relay2", redis_server.url) as relay2:
            local = mahole.Connector(relay1.address, bind=("127.0.0.1", 0), control_socket="",
                                     **creds(fleet_certs, "connector1"))
            local.serve("echo", _echo_tcp)
            far = mahole.Connector(relay2.address, bind=("127.0.0.1", 0), control_socket="",
                                   **creds(fleet_certs, "office"))
            far.serve("far", _echo_tcp)
            async with local, far, mahole.Agent(relay1.address, bind=("127.0.0.1", 0),
                                                control_socket="",
                                                **creds(fleet_certs, "alice")) as agent:
                await far.wait_registered()
                await wait_for(lambda: remote(relay1) == {"relay2": 1}, 5)
                redis_server.stop()
                await wait_for(lambda: not relay1.status()["fleet"]["connected"], 10)
                await wait_for(lambda: remote(relay1) == {}, fleet_redis.TTL + 5)
                data = os.urandom(200_000)
                reader, writer = await agent.open_connection("echo")
                writer.write(data)
                writer.write_eof()
                assert await reader.read() == data
                writer.close()
                with pytest.raises(mahole.ServiceUnavailable, match="no connector offers"):
                    await agent.open_connection("far")
                redis_server.start()
                await wait_for(lambda: relay1.status()["fleet"]["connected"]
                               and remote(relay1) == {"relay2": 1}, 20)
                assert relay1.status()["fleet"]["counters"]["connects"] >= 2
    run(main(), timeout=120)


# A session across two intermediates, sans-IO ----------------------------------------------------
RELAY1, RELAY2 = ("192.0.2.1", 4478), ("192.0.2.2", 4478)


class TwoIntermediates:
    """Two signaling cores of one fleet; their FleetSend events carried to each other as
    the Redis shell would."""

    def __init__(self):
        self.h1 = Harness(home="relay1", registry=FleetRegistry("relay1"))
        self.h2 = Harness(home="relay2", registry=FleetRegistry("relay2"))
        self.h1.core.registry.relay_addrs["relay2"] = RELAY2
        self.h2.core.registry.relay_addrs["relay1"] = RELAY1
        self.h2.connect(2, "connector", "office", CONNECTOR_ADDR, services=("web",))
        self.h1.connect(1, "agent", "alice", AGENT_ADDR)
        [office] = self.h2.core.registry.nodes()
        self.h1.core.registry.apply_remote("relay2", "put", "2", encode_record(office))
        self.carried = 0

    def carry(self, events, source):
        """Deliver the FleetSends among ``events`` (from ``source``), and what they cause,
        until nothing is left; every event on both sides, as {home: [events]}."""
        seen = {"relay1": [], "relay2": []}
        pending = [(source, events)]
        while pending:
            harness, batch = pending.pop()
            seen[harness.core.home].extend(batch)
            for event in batch:
                if isinstance(event, signaling.FleetSend):
                    other = self.h2 if harness is self.h1 else self.h1
                    self.carried += 1
                    other.core.fleet_message(
                        harness.core.home, None if event.sender is None else str(event.sender),
                        None if event.to is None else str(event.to), event.message, other.now,
                        session=event.session)
                    pending.append((other, other.events()))
        return seen

    def open(self):
        session_id, events = self.h1.open(service="web")
        return session_id, self.carry(events, self.h1)


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


def test_the_agent_leaving_ends_the_mirror_and_tells_the_connector():
    t = TwoIntermediates()
    session_id, _ = t.open()
    t.h1.core.node_disconnected(1, t.h1.now)
    seen = t.carry(t.h1.events(), t.h1)
    [closed] = sent(seen["relay2"], 2)
    assert isinstance(closed, control.SessionClosed) and "alice" in closed.reason
    assert t.h2.core.registry.sessions() == []
    assert any(isinstance(e, signaling.RelayRemove) for e in seen["relay2"])


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
