"""The intermediate's signaling core, sans-IO: a fake clock, fake node handles, no sockets."""

import json

import pytest

from mahole import connection as qc
from mahole import signaling
from mahole.signaling import (
    AclRule,
    CloseNode,
    MemoryRegistry,
    NodeRecord,
    RelayAdd,
    RelayRemove,
    RelaySetMember,
    SendMessage,
    SessionRecord,
    SignalingCore,
)
from mahole.wire import control

AGENT_ADDR = ("198.51.100.7", 40001)
CONNECTOR_ADDR = ("203.0.113.9", 50002)
UFRAG, PWD = "abcd", "p" * 22


class Harness:
    """One core, a fake clock, and helpers that speak for the nodes."""

    def __init__(self, acl=("*=*",), home="test", **kwargs):
        self.core = SignalingCore(acl=acl, home=home, **kwargs)
        self.now = 1000.0
        self.log = []  # every event, in order
        self.timed = []  # (time, event)
        self.addrs = {}  # handle -> the address its packets come from

    def events(self):
        out = []
        while (event := self.core.next_event()) is not None:
            out.append(event)
        self.log.extend(out)
        self.timed.extend((self.now, e) for e in out)
        return out

    def when(self, event):
        """The fake time at which event came out of the core."""
        return next(t for t, e in self.timed if e == event)

    def say(self, handle, message):
        self.core.control_message(handle, message, self.now)
        return self.events()

    def connect(self, handle, role, name, addr, services=(), register=True, resumable=False,
                nat_aware=False):
        self.core.node_connected(handle, role, name, addr, self.now, resumable=resumable,
                                 nat_aware=nat_aware)
        self.addrs[handle] = addr
        if register:
            return self.say(handle, control.Register(role=role, name=name, services=services))
        return []

    def alive(self, *handles, rtt=None):
        for handle in handles:
            self.core.packet_authenticated(handle, self.core_addr(handle), self.now, rtt=rtt)

    def core_addr(self, handle):
        return self.addrs[handle]

    def advance(self, seconds, step=0.25, keep_alive=()):
        """Move the clock, running due timers; keep_alive handles send a packet each step."""
        end = self.now + seconds
        out = []
        while self.now < end - 1e-9:
            self.now = min(self.now + step, end)
            self.alive(*keep_alive)
            timer = self.core.next_timer()
            while timer is not None and timer <= self.now:
                self.core.handle_timer(self.now)
                timer = self.core.next_timer()
            out.extend(self.events())
        return out

    def pair(self, service="web"):
        """Agent 'alice' (handle 1) and connector 'office' (handle 2) with `service`."""
        self.connect(1, "agent", "alice", AGENT_ADDR)
        self.connect(2, "connector", "office", CONNECTOR_ADDR, services=(service,))
        self.events()

    def open(self, agent=1, service="web", request_id=7):
        events = self.say(agent, control.OpenSession(request_id=request_id, service=service))
        opened = [e.message for e in events if isinstance(e, SendMessage)
                  and isinstance(e.message, control.SessionOpened)]
        return opened[0].session_id if opened else None, events


def offer(session_id):
    return control.CandidateOffer(session_id=session_id, ufrag=UFRAG, pwd=PWD, candidates=())


def answer(session_id):
    return control.CandidateAnswer(session_id=session_id, ufrag="wxyz", pwd="q" * 22,
                                   candidates=())


def result(session_id, path="direct", elapsed_ms=25.0):
    return control.PunchingResult(session_id=session_id, path=path, rtt_ms=1.0,
                                  elapsed_ms=elapsed_ms,
                                  remote_addr=CONNECTOR_ADDR if path == "direct" else None)


# --- registration -----------------------------------------------------------------------------

def test_register_answers_with_the_observed_address():
    h = Harness()
    events = h.connect(1, "agent", "alice", AGENT_ADDR)
    assert events == [SendMessage(1, control.Registered(node_id="alice",
                                                        observed_addr=AGENT_ADDR))]
    record = h.core.registry.node_by_identity("agent", "alice")
    assert (record.handle, record.addr, record.home) == (1, AGENT_ADDR, "test")


def test_registration_that_contradicts_the_certificate_is_refused_and_closed():
    h = Harness()
    events = h.connect(1, "agent", "alice", AGENT_ADDR, register=False)
    events = h.say(1, control.Register(role="agent", name="bob"))
    error, close = events
    assert error.message.code == control.ErrorCode.UNAUTHENTICATED
    assert error.message.message == ("certificate is for agent 'alice' but registration "
                                     "claims agent 'bob'")
    assert close == CloseNode(1, signaling.CLOSE_UNAUTHENTICATED, error.message.message)
    assert h.core.registry.nodes() == [] and h.core.counters["refused_registration"] == 1
    h.say(1, control.Register(role="agent", name="alice"))  # too late: forgotten
    assert h.core.registry.nodes() == []


def test_requests_before_register_are_refused():
    h = Harness()
    h.connect(1, "agent", "alice", AGENT_ADDR, register=False)
    [error] = [e.message for e in h.say(1, control.OpenSession(request_id=1, service="web"))]
    assert (error.code, error.message) == (control.ErrorCode.NOT_REGISTERED, "register first")


def test_close_codes_match_the_connection_module():
    assert signaling.CLOSE_SHUTDOWN == qc.ERROR_SHUTDOWN
    assert signaling.CLOSE_UNAUTHENTICATED == qc.ERROR_UNAUTHENTICATED


# --- ACL and sessions -------------------------------------------------------------------------

@pytest.mark.parametrize("acl, service, code, text", [
    (("bob=*",), "web", control.ErrorCode.DENIED,
     "agent 'alice' is not allowed to reach service 'web'"),
    ((), "web", control.ErrorCode.DENIED, "agent 'alice' is not allowed to reach service 'web'"),
    (("alice=w*",), "mail", control.ErrorCode.DENIED,
     "agent 'alice' is not allowed to reach service 'mail'"),
    (("*=*",), "nope", control.ErrorCode.UNKNOWN_SERVICE, "no connector offers service 'nope'"),
])
def test_open_session_refusals(acl, service, code, text):
    h = Harness(acl=acl)
    h.pair()
    session_id, events = h.open(service=service, request_id=42)
    assert session_id is None
    assert events == [SendMessage(1, control.Error(code=code, message=text, request_id=42))]
    assert h.core.registry.sessions() == []


def test_acl_rule_text():
    assert AclRule("al*=web").allows("alice", "web")
    assert not AclRule("al*=web").allows("bob", "web")
    for bad in ("alice", "=web", "alice="):
        with pytest.raises(ValueError, match="expected AGENT_GLOB=SERVICE_GLOB"):
            AclRule(bad)


def counting_tokens():
    """A token source that hands out 1, 2, 3, ... as 8-byte tokens (predictable in tests)."""
    counter = iter(range(1, 1 << 30))
    return lambda n: next(counter).to_bytes(n, "big")


def token(i):
    return i.to_bytes(8, "big")


def test_open_session_tells_both_members_and_adds_the_relay():
    h = Harness(acl=("alice=web",), token_source=counting_tokens())
    h.pair()
    session_id, events = h.open()
    assert events[0] == RelayAdd(session_id, AGENT_ADDR, CONNECTOR_ADDR,
                                 agent_token=token(1), connector_token=token(2))
    to = {e.handle: e.message for e in events[1:]}
    assert to[2] == control.SessionOpened(request_id=7, session_id=session_id, service="web",
                                          agent="alice", connector="office",
                                          peer_addr=AGENT_ADDR, relay_token=token(2))
    assert to[1].peer_addr == CONNECTOR_ADDR and to[1].session_id == session_id
    assert to[1].relay_token == token(1)  # each member its own token
    assert h.core.registry.session(session_id).members() == (1, 2)
    assert h.core.counters["sessions_opened"] == 1


def test_relay_tokens_are_random_independent_and_fresh_for_every_session():
    h = Harness()  # os.urandom
    h.pair()
    tokens = []
    for request_id in range(1, 21):
        _session_id, events = h.open(request_id=request_id)
        [add] = [e for e in events if isinstance(e, RelayAdd)]
        opened = {e.handle: e.message.relay_token for e in events
                  if isinstance(e, SendMessage)}
        assert opened == {1: add.agent_token, 2: add.connector_token}
        assert len(add.agent_token) == len(add.connector_token) == 8
        tokens += [add.agent_token, add.connector_token]
    assert len(set(tokens)) == len(tokens)


def test_session_closed_by_a_member_tells_the_other_and_removes_the_relay():
    h = Harness()
    h.pair()
    session_id, _ = h.open()
    events = h.say(1, control.SessionClosed(session_id=session_id, reason="done"))
    assert events == [RelayRemove(session_id), SendMessage(2, control.SessionClosed(
        session_id=session_id, reason="closed by agent alice: done"))]
    assert h.core.registry.session(session_id) is None
    assert h.say(2, control.SessionClosed(session_id=session_id, reason="me too")) == []
    assert h.core.counters["ignored_unknown_session"] == 1


def test_disconnect_ends_the_members_sessions():
    h = Harness()
    h.pair()
    session_id, _ = h.open()
    h.core.node_disconnected(2, h.now)
    assert h.events() == [RelayRemove(session_id), SendMessage(1, control.SessionClosed(
        session_id=session_id, reason="connector office disconnected"))]
    [error] = [e.message for e in h.open()[1]]
    assert error.code == control.ErrorCode.CONNECTOR_OFFLINE
    assert error.message == "connector 'office' offering service 'web' is offline (disconnected)"
    h.connect(3, "connector", "office", CONNECTOR_ADDR, services=("web",))
    assert h.open()[0] is not None


# --- signaling --------------------------------------------------------------------------------

def test_offer_and_answer_are_forwarded_unchanged_then_both_start_punching():
    h = Harness()
    h.pair()
    session_id, _ = h.open()
    assert h.say(1, offer(session_id)) == [SendMessage(2, offer(session_id))]
    events = h.say(2, answer(session_id))
    start = control.StartPunching(session_id=session_id, delay_ms=0)
    assert events == [SendMessage(1, answer(session_id)), SendMessage(1, start),
                      SendMessage(2, start)]
    assert h.core.punching["attempts"] == 1


# --- punching strategy (control protocol /3) ------------------------------------------------

# NatSummary of each lab NAT preset as a node behind it reports it (filtering is not measured
# at start: null), and of a node with no NAT.
NATS = {
    "public": control.NatSummary("endpoint-independent", None, None, None, False, False),
    "cone": control.NatSummary("endpoint-independent", None, None, None, False, False),
    "port-restricted": control.NatSummary("endpoint-independent", None, None, None, False,
                                          False),
    "full-cone": control.NatSummary("endpoint-independent", None, None,
                                    "endpoint-independent", False, False),
    "symmetric": control.NatSummary("endpoint-dependent", "random", None, None, False, False),
    "symmetric-sequential": control.NatSummary("endpoint-dependent", "sequential", 1, None,
                                               False, False),
    "symmetric+upnp": control.NatSummary("endpoint-dependent", "random", None, None, True,
                                         False),
    "symmetric+ipv6": control.NatSummary("endpoint-dependent", "random", None, None, False,
                                         True),
    "unknown": control.NatSummary(None, None, None, None, False, False),
}



@pytest.mark.parametrize("agent, connector, expected", [
    (None, "symmetric", ("checks", None)),  # a member sent no summary: as before
    ("public", "port-restricted", ("checks", None)),
    ("port-restricted", "cone", ("checks", None)),
    ("unknown", "symmetric", ("checks", None)),
    ("symmetric-sequential", "port-restricted", ("prediction", "agent")),
    ("port-restricted", "symmetric-sequential", ("prediction", "connector")),
    ("symmetric", "port-restricted", ("birthday", "agent")),
    ("cone", "symmetric", ("birthday", "connector")),
    ("full-cone", "symmetric", ("checks", None)),  # its checks come through unfiltered
    ("symmetric", "unknown", ("checks", None)),  # the easy side's mapping is not known
    ("symmetric+upnp", "symmetric", ("mapped", None)),
    ("symmetric", "port-restricted+upnp", ("mapped", None)),
    ("symmetric", "symmetric", ("relay", None)),
    ("symmetric", "symmetric-sequential", ("relay", None)),
    ("symmetric-sequential", "symmetric-sequential", ("relay", None)),
    ("symmetric+ipv6", "symmetric+ipv6", ("checks", None)),
    ("symmetric+ipv6", "symmetric", ("relay", None)),
])
def test_the_strategy_follows_the_nat_pair(agent, connector, expected):
    nats = {**NATS, "port-restricted+upnp": control.NatSummary(
        "endpoint-independent", None, None, None, True, False)}
    pick = signaling.choose_strategy(
        None if agent is None else nats[agent]._to_json_object(),
        None if connector is None else nats[connector]._to_json_object())
    assert pick == expected


def _nat_pair(h, agent_nat, connector_nat, agent_aware=True, connector_aware=True):
    h.connect(1, "agent", "alice", AGENT_ADDR, nat_aware=agent_aware)
    h.connect(2, "connector", "office", CONNECTOR_ADDR, services=("web",),
              nat_aware=connector_aware)
    for handle, nat in ((1, agent_nat), (2, connector_nat)):
        if nat is not None:
            assert h.say(handle, NATS[nat]) == []
    session_id, _ = h.open()
    h.say(1, offer(session_id))
    events = h.say(2, answer(session_id))
    starts = {e.handle: e.message for e in events if isinstance(e, SendMessage)
              and isinstance(e.message, control.StartPunching)}
    return session_id, starts


def test_start_punching_tells_both_members_the_strategy_and_the_hard_side():
    h = Harness()
    session_id, starts = _nat_pair(h, "symmetric", "port-restricted")
    told = control.StartPunching(session_id=session_id, delay_ms=0, strategy="birthday",
                                 hard_side="agent")
    assert starts == {1: told, 2: told}
    record = h.core.registry.session(session_id)
    assert (record.strategy, record.hard_side) == ("birthday", "agent")
    assert h.core.strategies["birthday"] == 1
    assert h.core.registry.node(1).nat["allocation"] == "random"


def test_a_member_of_an_older_version_gets_start_punching_without_the_strategy():
    """The strict decoder of /1 and /2 refuses unknown fields: the agent of /2 is sent the
    message it knows, the connector of /3 the strategy."""
    h = Harness()
    session_id, starts = _nat_pair(h, None, "symmetric-sequential", agent_aware=False)
    assert starts[1] == control.StartPunching(session_id=session_id, delay_ms=0)
    assert json.loads(control.encode_payload(starts[1])).keys() == {
        "type", "session_id", "delay_ms"}
    # No summary from the agent: plain checks, as before summaries existed.
    assert starts[2].strategy == "checks"


def test_a_summary_replaces_the_last_one_and_each_round_chooses_again():
    h = Harness()
    session_id, starts = _nat_pair(h, "symmetric", "symmetric")
    assert starts[1].strategy == "relay"
    h.say(2, NATS["symmetric+upnp"])  # the connector's router mapped a port
    h.say(1, offer(session_id))
    events = h.say(2, answer(session_id))
    assert [e.message.strategy for e in events
            if isinstance(e.message, control.StartPunching)] == ["mapped", "mapped"]
    assert h.core.registry.node(2).nat["mapped_port"] is True
    assert h.core.counters["nat_summaries"] == 3
    assert len(h.core.registry.nodes()) == 2


def test_a_summary_before_register_is_refused():
    h = Harness()
    h.connect(1, "agent", "alice", AGENT_ADDR, register=False, nat_aware=True)
    events = h.say(1, NATS["symmetric"])
    assert [e.message.code for e in events] == [control.ErrorCode.NOT_REGISTERED]


def test_a_nat_summary_survives_the_registry_round_trip():
    record = NodeRecord(handle=1, role="agent", name="alice", addr=AGENT_ADDR,
                        nat=NATS["symmetric-sequential"]._to_json_object())
    assert NodeRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    older = record.to_dict()
    del older["nat"]  # a record written before summaries existed
    assert NodeRecord.from_dict(older).nat is None


def test_start_punching_is_timed_from_the_two_control_rtts():
    h = Harness()
    h.pair()
    h.alive(1, rtt=0.100)  # the agent is far
    h.alive(2, rtt=0.020)
    session_id, _ = h.open()
    h.say(1, offer(session_id))
    start = control.StartPunching(session_id=session_id, delay_ms=0)
    t0 = h.now
    events = h.say(2, answer(session_id))
    assert events == [SendMessage(1, answer(session_id)), SendMessage(1, start)]
    # the near connector's copy leaves half the RTT difference later: both arrive together
    assert h.core.next_timer() == pytest.approx(t0 + 0.040)
    h.now = t0 + 0.039
    h.core.handle_timer(h.now)
    assert h.events() == []
    h.now = t0 + 0.040
    h.core.handle_timer(h.now)
    assert h.events() == [SendMessage(2, start)]
    assert h.core.counters["start_punching_sent"] == 2


def test_without_punch_sync_start_punching_goes_to_both_at_once():
    """--no-punch-sync (for measuring what the timing buys): no copy is held back."""
    h = Harness(punch_sync=False)
    h.pair()
    h.alive(1, rtt=0.100)
    h.alive(2, rtt=0.020)
    session_id, _ = h.open()
    h.say(1, offer(session_id))
    start = control.StartPunching(session_id=session_id, delay_ms=0)
    events = h.say(2, answer(session_id))
    assert events == [SendMessage(1, answer(session_id)), SendMessage(1, start),
                      SendMessage(2, start)]
    assert h.core.next_timer() != pytest.approx(h.now + 0.040)


def test_a_delayed_start_punching_is_dropped_with_its_session():
    h = Harness()
    h.pair()
    h.alive(1, rtt=0.300)
    h.alive(2, rtt=0.010)
    session_id, _ = h.open()
    h.say(1, offer(session_id))
    h.say(2, answer(session_id))
    h.say(1, control.SessionClosed(session_id=session_id, reason="bye"))
    assert not [e for e in h.advance(1.0, keep_alive=(1, 2)) if isinstance(e, SendMessage)
                and isinstance(e.message, control.StartPunching)]


def test_punching_results_are_recorded_once_per_round():
    h = Harness()
    h.pair()
    session_id, _ = h.open()
    h.say(1, offer(session_id))
    h.say(2, answer(session_id))
    assert h.say(2, result(session_id)) == []
    assert h.say(1, result(session_id, elapsed_ms=30.0)) == []
    assert h.say(1, result(session_id, "relay")) == []  # a repeat: ignored, counted
    assert h.core.counters["ignored_duplicate_result"] == 1
    assert h.core.punching == {"attempts": 1, "direct": 1, "relay": 0}
    assert list(h.core.time_to_direct_ms) == [30.0]
    assert h.core.registry.session(session_id).path == "direct"
    # a re-punch (after a failover) is a new round with its own results
    h.say(1, offer(session_id))
    h.say(2, answer(session_id))
    h.say(1, result(session_id, "relay"))
    assert h.core.punching == {"attempts": 2, "direct": 1, "relay": 1}
    assert h.core.registry.session(session_id).path == "relay"


def test_duplicate_out_of_order_and_foreign_signaling_is_ignored_and_counted():
    h = Harness()
    h.pair()
    h.connect(3, "agent", "mallory", ("192.0.2.66", 1))
    session_id, _ = h.open()
    unknown = bytes(8)
    c = h.core.counters
    cases = [
        (2, answer(session_id), "ignored_duplicate_answer"),  # no offer yet
        (2, result(session_id), "ignored_unexpected_result"),  # no punching yet
        (1, offer(unknown), "ignored_unknown_session"),
        (2, answer(unknown), "ignored_unknown_session"),
        (1, result(unknown), "ignored_unknown_session"),
        (3, offer(session_id), "ignored_foreign_session"),  # not mallory's session
        (3, control.SessionClosed(session_id=session_id, reason="x"), "ignored_foreign_session"),
        (2, offer(session_id), "ignored_wrong_direction"),  # connectors answer, never offer
        (1, answer(session_id), "ignored_wrong_direction"),
        (1, control.Pong(nonce=5), "ignored_unexpected_pong"),  # no probe asked for it
        (1, control.Register(role="agent", name="alice"), "ignored_duplicate_register"),
        (99, offer(session_id), "ignored_unknown_node"),
    ]
    for handle, message, counter in cases:
        before = c[counter]
        assert h.say(handle, message) == [], message
        assert c[counter] == before + 1, (message, counter)
    h.say(1, offer(session_id))
    h.say(2, answer(session_id))
    assert h.say(2, answer(session_id)) == []  # repeated answer: one answer per offer
    assert c["ignored_duplicate_answer"] == 2
    assert c["ignored_signaling"] == len(cases) + 1
    assert h.core.registry.session(session_id) is not None  # nothing of that hurt the session
    assert c["answers_forwarded"] == 1


def test_unexpected_message_types_get_an_error():
    h = Harness()
    h.pair()
    [error] = [e.message for e in h.say(2, control.OpenSession(request_id=1, service="web"))]
    assert error.code == control.ErrorCode.BAD_MESSAGE
    assert error.message == "unexpected OpenSession from connector office"


def test_ping_is_answered():
    h = Harness()
    h.pair()
    assert h.say(1, control.Ping(nonce=9)) == [SendMessage(1, control.Pong(nonce=9))]


# --- address changes (only authenticated packets reach the core) ------------------------------

def test_a_new_address_is_told_to_the_node_and_moves_its_relay_member():
    h = Harness()
    h.pair()
    session_id, _ = h.open()
    moved = ("203.0.113.9", 50999)
    h.addrs[2] = moved
    h.alive(2)
    assert h.events() == [SendMessage(2, control.ObservedAddress(addr=moved)),
                          RelaySetMember(session_id, 1, moved)]
    assert h.core.registry.node(2).addr == moved
    h.alive(2)
    assert h.events() == []
    events = h.say(1, control.OpenSession(request_id=8, service="web"))
    [opened] = [e.message for e in events if isinstance(e, SendMessage) and e.handle == 1]
    assert opened.peer_addr == moved


# --- one identity, one live node --------------------------------------------------------------

def test_second_copy_of_a_live_node_is_refused_and_the_first_keeps_its_sessions():
    h = Harness()
    h.pair()
    session_id, _ = h.open()
    newcomer_events = h.connect(5, "connector", "office", ("127.0.0.1", 6000), services=("web",))
    [probe] = newcomer_events
    ping = probe.message
    assert probe.handle == 2 and isinstance(ping, control.Ping)
    h.now += 0.2
    assert h.say(2, control.Pong(nonce=ping.nonce ^ 1)) == []  # wrong nonce: ignored
    assert h.core.counters["ignored_unexpected_pong"] == 1
    events = h.say(2, control.Pong(nonce=ping.nonce))
    error, close = events
    assert error.handle == 5 and error.message.code == control.ErrorCode.CONFLICT
    assert error.message.message == (
        "connector 'office' is already connected from 203.0.113.9:50002 and answering; "
        "stop the other copy or use another certificate")
    assert close == CloseNode(5, signaling.CLOSE_CONFLICT, error.message.message)
    assert h.core.registry.node_by_identity("connector", "office").handle == 2
    assert h.core.registry.session(session_id) is not None
    # nothing happens later: no replacement when the probe time runs out
    assert not [e for e in h.advance(5, keep_alive=(1, 2)) if e.__class__ is not SendMessage]
    assert h.core.registry.session(session_id) is not None
    assert h.core.counters["refused_conflict"] == 1 and h.core.counters["nodes_replaced"] == 0


def test_second_copy_replaces_a_node_that_does_not_answer_within_the_probe_time():
    h = Harness(probe_timeout=1.0, node_dead_after=30.0)
    h.pair()
    session_id, _ = h.open()
    t0 = h.now
    [probe] = h.connect(5, "connector", "office", ("127.0.0.1", 6000), services=("web",))
    assert probe.handle == 2
    ping = probe.message
    events = h.advance(2.0, step=0.05, keep_alive=(1, 2, 5))  # 2 is "alive" but never answers
    registered = [e for e in events if isinstance(e, SendMessage) and e.handle == 5]
    assert registered == [SendMessage(5, control.Registered(node_id="office",
                                                            observed_addr=("127.0.0.1", 6000)))]
    at = h.log.index(registered[0])
    assert CloseNode(2, signaling.CLOSE_SHUTDOWN, "replaced: did not answer") in h.log[:at]
    assert SendMessage(1, control.SessionClosed(
        session_id=session_id, reason="connector office was replaced: it did not answer")) \
        in h.log[:at]
    assert h.core.registry.node_by_identity("connector", "office").handle == 5
    assert h.core.counters["nodes_replaced"] == 1
    # it happened at the probe deadline, not later
    assert h.when(registered[0]) - t0 == pytest.approx(1.0, abs=0.051)
    assert h.say(2, control.Pong(nonce=ping.nonce)) == []  # too late, and from a closed node
    assert h.open()[0] is not None  # new sessions go to the newcomer


def test_probed_node_that_disconnects_lets_the_newcomer_in_at_once():
    h = Harness()
    h.pair()
    h.connect(5, "agent", "alice", ("127.0.0.1", 6000))
    h.events()
    h.core.node_disconnected(1, h.now)
    assert h.events() == [SendMessage(5, control.Registered(node_id="alice",
                                                            observed_addr=("127.0.0.1", 6000)))]


def test_newcomer_that_leaves_during_the_probe_changes_nothing():
    h = Harness()
    h.pair()
    [probe] = h.connect(5, "agent", "alice", ("127.0.0.1", 6000))
    ping = probe.message
    h.core.node_disconnected(5, h.now)
    assert h.advance(3, keep_alive=(1, 2)) == []
    assert h.say(1, control.Pong(nonce=ping.nonce)) == []
    assert h.core.registry.node_by_identity("agent", "alice").handle == 1


def test_a_third_copy_during_a_probe_is_refused_at_once():
    h = Harness()
    h.pair()
    h.connect(5, "agent", "alice", ("127.0.0.1", 6000))
    events = h.connect(6, "agent", "alice", ("127.0.0.1", 7000))
    assert [type(e) for e in events] == [SendMessage, CloseNode]
    assert events[0].message.code == control.ErrorCode.CONFLICT


# --- death detection --------------------------------------------------------------------------

def test_a_silent_connector_is_declared_dead_and_the_agent_learns_at_once():
    h = Harness(node_dead_after=2.0)
    h.pair()
    session_id, _ = h.open()
    t0 = h.now  # the connector's last packet; it is kill -9'd now
    events = h.advance(3.0, step=0.05, keep_alive=(1,))
    closed = SendMessage(1, control.SessionClosed(
        session_id=session_id, reason="connector office stopped answering"))
    assert closed in events
    assert CloseNode(2, signaling.CLOSE_SHUTDOWN, "stopped answering") in events
    # found within a clock step of node_dead_after: well inside the 3 s budget
    assert h.when(closed) - t0 == pytest.approx(2.0, abs=0.051)
    assert h.core.counters["nodes_dead"] == 1
    assert h.core.registry.node(2) is None and h.core.registry.node(1) is not None
    [error] = [e.message for e in h.open()[1]]
    assert error.code == control.ErrorCode.CONNECTOR_OFFLINE
    assert "stopped answering" in error.message
    # late words of the dead connection are ignored
    assert h.say(2, result(session_id)) == []
    h.core.node_disconnected(2, h.now)
    assert h.events() == []


def test_death_is_found_at_the_deadline_not_later():
    h = Harness(node_dead_after=2.0)
    h.pair()
    t0 = h.now
    h.now = t0 + 1.999
    h.core.handle_timer(h.now)
    assert h.events() == []
    assert h.core.next_timer() == pytest.approx(t0 + 2.0)
    h.now = t0 + 2.0
    h.core.handle_timer(h.now)
    assert {e.handle for e in h.events() if isinstance(e, CloseNode)} == {1, 2}


def test_sessions_of_live_members_outlast_ten_times_every_timeout():
    """No timer ends a session whose members are alive: not the old 300 s relay idle
    expiry, not death detection, not probes. 3000 s of fake time, a packet a second."""
    h = Harness(probe_timeout=1.0, node_dead_after=2.0)
    h.pair()
    session_id, _ = h.open()
    h.say(1, offer(session_id))
    h.say(2, answer(session_id))
    h.say(1, result(session_id))
    events = h.advance(10 * 300.0, step=1.0, keep_alive=(1, 2))
    assert not [e for e in events if isinstance(e, (RelayRemove, CloseNode))
                or isinstance(getattr(e, "message", None), control.SessionClosed)]
    assert h.core.registry.session(session_id) is not None
    assert h.core.counters["nodes_dead"] == 0 and h.core.counters["sessions_closed"] == 0


def test_liveness_timers_stay_bounded():
    h = Harness()
    h.pair()
    h.advance(100, step=0.1, keep_alive=(1, 2))
    assert len(h.core._timers) <= 4


# --- the registry -----------------------------------------------------------------------------

def test_memory_registry_indexes_nodes_and_sessions():
    r = MemoryRegistry()
    a = NodeRecord(handle="h1", role="agent", name="alice", addr=AGENT_ADDR)
    c1 = NodeRecord(handle="h2", role="connector", name="c1", addr=CONNECTOR_ADDR,
                    services=("web", "db"))
    c2 = NodeRecord(handle="h3", role="connector", name="c2", addr=CONNECTOR_ADDR,
                    services=("web",))
    for record in (a, c1, c2):
        r.put_node(record)
    assert r.node_by_identity("agent", "alice") == a and r.node("h2") == c1
    assert [n.name for n in r.connectors_for("web")] == ["c1", "c2"]
    with pytest.raises(KeyError):
        r.put_node(NodeRecord(handle="h9", role="agent", name="alice", addr=AGENT_ADDR))
    r.put_node(NodeRecord(handle="h2", role="connector", name="c1", addr=CONNECTOR_ADDR,
                          services=("db",)))
    assert [n.name for n in r.connectors_for("web")] == ["c2"]
    s = SessionRecord(session_id=b"12345678", service="web", agent="h1", connector="h3",
                      agent_name="alice", connector_name="c2")
    r.put_session(s)
    assert r.sessions_of("h1") == [s] == r.sessions_of("h3") and r.sessions_of("h2") == []
    assert r.remove_session(s.session_id) == s and r.sessions_of("h1") == []
    assert r.remove_node("h3") == c2 and r.connectors_for("web") == []
    assert r.node_by_identity("connector", "c2") is None and r.remove_node("h3") is None


def test_records_are_plain_serialisable_data():
    node = NodeRecord(handle="relay1/3", role="connector", name="office", addr=CONNECTOR_ADDR,
                      services=("web",), home="relay1", since=12.5)
    session = SessionRecord(session_id=b"\x00" * 7 + b"\x01", service="web", agent="relay1/1",
                            connector="relay1/3", agent_name="alice", connector_name="office",
                            home="relay1", created=3.0, offers=2, answers=1, punch_round=1,
                            punch_started=4.0, reported=("agent",), path="direct",
                            agent_token=token(5), connector_token=token(6))
    assert NodeRecord.from_dict(json.loads(json.dumps(node.to_dict()))) == node
    assert SessionRecord.from_dict(json.loads(json.dumps(session.to_dict()))) == session


def test_the_core_works_on_any_registry():
    class Spy(MemoryRegistry):
        calls = 0

        def put_session(self, record):
            Spy.calls += 1
            super().put_session(record)

    h = Harness()
    h.core = SignalingCore(acl=("*=*",), registry=Spy())
    h.pair()
    assert h.open()[0] is not None and Spy.calls == 1


# --- the shell: the real intermediate on loopback ---------------------------------------------

def _freeze(node):
    """What a kill -9 (or a pulled cable) looks like from outside: the node's socket goes
    silent both ways, without a goodbye."""
    endpoint = node.endpoint
    endpoint.loop.remove_reader(endpoint.sock.fileno())
    endpoint._send_outbox = endpoint._outbox.clear


def test_shell_refuses_a_second_live_copy_of_a_connector():
    import asyncio

    from aio_helpers import run, wait_for

    from mahole.config import ConnectorConfig, Service
    from mahole.demo import LocalDeployment, tcp_round_trip
    from mahole.roles.connector import Connector

    async def main():
        async with LocalDeployment() as d:
            first = d.intermediate.nodes[("connector", "connector1")].handle
            twin = Connector(ConnectorConfig(
                services=(Service.parse("echo=tcp:127.0.0.1:9"),),
                intermediate=d.intermediate.local_address[:2], bind=("127.0.0.1", 0),
                **d.creds("connector1")))
            await twin.start()

            def refusal():  # what the twin was told, wherever the node keeps it
                failed = getattr(twin, "failed", None)
                return " | ".join([twin.control.last_error or "",
                                   failed.result() if failed and failed.done() else ""])
            try:
                await wait_for(lambda: "already connected from" in refusal(), 10)
                assert "connector 'connector1' is already connected from 127.0.0.1:" in refusal()
                assert "and answering; stop the other copy or use another certificate" in \
                    refusal()
                assert d.intermediate.nodes[("connector", "connector1")].handle == first
                assert d.intermediate.counters["refused_conflict"] >= 1
                data = b"still the first one" * 1000
                assert await tcp_round_trip(d.forward_address(d.tcp_forward),
                                            data) == data
            finally:
                await twin.stop()
            await asyncio.sleep(0)
    run(main(), timeout=60)


def test_shell_a_frozen_connector_is_gone_within_the_dead_time_and_the_agent_told():
    import time

    from aio_helpers import run, wait_for

    from mahole.demo import LocalDeployment, tcp_round_trip
    from mahole.roles.agent import SessionError

    async def main():
        async with LocalDeployment(agent_kwargs={"relay_only": True}) as d:
            data = b"x" * 10000
            assert await tcp_round_trip(d.forward_address(d.tcp_forward), data) == data
            assert d.intermediate.status()["sessions"]["open"] == 1
            _freeze(d.connector)
            t0 = time.monotonic()
            await wait_for(lambda: not d.agent.sessions, 5)
            elapsed = time.monotonic() - t0
            assert elapsed < 3.0, elapsed
            assert d.intermediate.counters["nodes_dead"] == 1
            assert ("connector", "connector1") not in d.intermediate.nodes
            assert d.intermediate.status()["sessions"]["open"] == 0
            t1 = time.monotonic()
            try:
                await d.agent.session_for("echo")
            except SessionError as exc:
                assert "offline (stopped answering)" in str(exc)
            else:
                raise AssertionError("a session to a dead connector opened")
            assert time.monotonic() - t1 < 1.0
    run(main(), timeout=60)


# --- policy: which connectors may offer which services ------------------------------------

def _refusal(events):
    """(Error message, CloseNode) of a refusal."""
    [error] = [e.message for e in events if isinstance(e, SendMessage)]
    [close] = [e for e in events if isinstance(e, CloseNode)]
    return error, close


def test_a_connector_may_not_offer_a_service_no_offer_rule_allows(caplog):
    h = Harness(offers=("office=web", "office=db*"))
    caplog.set_level("INFO", logger="mahole.signaling")
    events = h.connect(9, "connector", "rogue", ("192.0.2.66", 4000), services=("web",))
    error, close = _refusal(events)
    text = "connector 'rogue' is not allowed to offer service 'web': no --offer rule matches"
    assert (error.code, error.message) == (control.ErrorCode.DENIED, text)
    assert close == CloseNode(9, signaling.CLOSE_DENIED, text)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", f"refused connector 'rogue' from 192.0.2.66:4000: {text}")]
    assert h.core.registry.nodes() == [] and h.core.counters["refused_offer"] == 1
    # The allowed connector registers; one service too many refuses the whole Register.
    h.connect(2, "connector", "office", CONNECTOR_ADDR, services=("web", "db-main"))
    assert h.core.registry.node_by_identity("connector", "office") is not None
    events = h.connect(3, "connector", "office2", CONNECTOR_ADDR, services=("a", "web", "b"))
    error, close = _refusal(events)
    assert error.message == ("connector 'office2' is not allowed to offer service 'a' "
                             "(and 2 more): no --offer rule matches")
    assert close.code == signaling.CLOSE_DENIED


def test_a_registered_connector_updates_its_services_within_the_offer_rules():
    h = Harness(offers=("office=web", "office=db*"))
    h.pair()
    assert h.open(service="db-main")[0] is None  # not offered yet
    assert h.say(2, control.UpdateServices(services=("web", "db-main"))) == []
    assert h.core.counters["services_updated"] == 1
    assert h.open(service="db-main", request_id=8)[0] is not None
    # A list the policy denies is refused whole: an Error, the old list kept, no close.
    events = h.say(2, control.UpdateServices(services=("web", "mail")))
    [error] = [e.message for e in events if isinstance(e, SendMessage)]
    assert error.code == control.ErrorCode.DENIED and "'mail'" in error.message
    assert not [e for e in events if isinstance(e, CloseNode)]
    record = h.core.registry.node_by_identity("connector", "office")
    assert record.services == ("web", "db-main") and h.core.counters["refused_offer"] == 1
    # Dropping a service: new sessions to it are refused as unknown.
    h.say(2, control.UpdateServices(services=("web",)))
    assert h.open(service="db-main", request_id=9)[0] is None
    # An agent cannot announce services.
    events = h.say(1, control.UpdateServices(services=("web",)))
    assert [e.message.code for e in events] == [control.ErrorCode.BAD_MESSAGE]


def test_without_offer_rules_any_connector_offers_anything_and_none_means_none():
    open_core = Harness()  # offers=None: as before
    open_core.connect(2, "connector", "anyone", CONNECTOR_ADDR, services=("web",))
    assert open_core.core.registry.connectors_for("web")
    closed = Harness(offers=())
    error, close = _refusal(closed.connect(2, "connector", "anyone", CONNECTOR_ADDR,
                                           services=("web",)))
    assert error.code == control.ErrorCode.DENIED and close.code == signaling.CLOSE_DENIED


def test_a_rogue_connector_never_gets_an_agents_session():
    """A rogue registered `web`, the real connector reconnected, and the next
    session went to the rogue. Now the rogue is refused every time; sessions go to the
    connector the policy names, and SessionOpened tells the agent which one that is (the agent
    checks it in the end-to-end handshake)."""
    h = Harness(acl=("alice=web",), offers=("office=web", "rogue=games"))
    h.connect(1, "agent", "alice", AGENT_ADDR)
    h.connect(2, "connector", "office", CONNECTOR_ADDR, services=("web",))
    assert _refusal(h.connect(3, "connector", "rogue", ("192.0.2.66", 4000),
                              services=("web", "games")))[1].code == signaling.CLOSE_DENIED
    h.connect(4, "connector", "rogue", ("192.0.2.66", 4001), services=("games",))  # allowed
    h.events()
    for attempt in range(3):
        h.core.node_disconnected(2, h.now)  # the real connector goes away ...
        h.events()
        _sid, events = h.open(request_id=100 + attempt)
        [error] = [e.message for e in events]
        assert error.code == control.ErrorCode.CONNECTOR_OFFLINE  # ... nobody takes over
        assert _refusal(h.connect(10 + attempt, "connector", "rogue", ("192.0.2.66", 5000),
                                  services=("web",)))[1].code == signaling.CLOSE_DENIED
        h.connect(2, "connector", "office", CONNECTOR_ADDR, services=("web",))  # ... is back
        h.events()
        session_id, events = h.open(request_id=200 + attempt)
        opened = {e.handle: e.message for e in events if isinstance(e, SendMessage)}
        assert set(opened) == {1, 2} and opened[1].connector == "office"
        assert h.core.registry.session(session_id).connector_name == "office"
    assert all(s.connector_name == "office" for s in h.core.registry.sessions())


def test_replicas_allowed_to_offer_a_service_share_its_sessions():
    h = Harness(offers=("office-*=web",))
    h.connect(1, "agent", "alice", AGENT_ADDR)
    h.connect(4, "agent", "bob", ("198.51.100.8", 40002))
    h.connect(5, "agent", "carol", ("198.51.100.9", 40003))
    h.connect(2, "connector", "office-a", CONNECTOR_ADDR, services=("web",))
    h.connect(3, "connector", "office-b", ("203.0.113.10", 50003), services=("web",))
    h.events()
    # The longest registered first, then the one with fewer sessions: spread.
    names = [h.core.registry.session(h.open(agent=a, request_id=a)[0]).connector_name
             for a in (1, 4, 5)]
    assert names == ["office-a", "office-b", "office-a"]
    # A replica that leaves takes no more sessions.
    h.core.node_disconnected(2, h.now)
    h.events()
    assert h.core.registry.sessions_of(1) == []  # alice's session went with office-a
    second, _ = h.open(request_id=9)
    assert h.core.registry.session(second).connector_name == "office-b"


def test_from_config_reads_the_policy_and_limits_and_warns_without_offer_rules(caplog):
    import types

    from mahole.config import IntermediateConfig

    cfg = types.SimpleNamespace(allow=("*=*",), offer=(), probe_timeout=1.0,
                                node_dead_after=2.0, sessions_per_agent=7)
    caplog.set_level("WARNING", logger="mahole.signaling")
    core = SignalingCore.from_config(cfg, home="relay1")
    assert core.offers is None and core.limits.sessions_per_agent == 7
    assert "no --offer rules: any connector of the deployment CA may offer any service" \
        in caplog.text
    caplog.clear()
    cfg.offer = ("office=web",)
    core = SignalingCore.from_config(cfg)
    assert [str(r) for r in core.offers] == ["office=web"] and caplog.text == ""
    defaults = IntermediateConfig()
    for field in ("connections_per_identity", "sessions_per_minute", "sessions_per_agent",
                  "sessions_per_connector", "signaling_rate", "signaling_burst",
                  "relay_rate_per_identity"):
        if hasattr(defaults, field):  # the config carries the same defaults
            assert getattr(defaults, field) == getattr(signaling.Limits(), field), field


def test_offer_rule_text():
    assert signaling.OfferRule("office-*=web").allows("office-2", "web")
    assert not signaling.OfferRule("office-*=web").allows("rogue", "web")
    for bad in ("office", "=web", "office="):
        with pytest.raises(ValueError, match="expected CONNECTOR_GLOB=SERVICE_GLOB"):
            signaling.OfferRule(bad)


# --- quotas per identity ------------------------------------------------------------------

def test_close_codes_are_distinct_and_never_no_error():
    codes = [signaling.CLOSE_SHUTDOWN, signaling.CLOSE_UNAUTHENTICATED,
             signaling.CLOSE_PROTOCOL_ERROR, signaling.CLOSE_RATE_LIMITED,
             signaling.CLOSE_CONFLICT, signaling.CLOSE_DENIED]
    assert len(set(codes)) == len(codes) and 0 not in codes
    assert codes == list(range(0x100, 0x106))
    assert signaling.PERMANENT_CLOSES == {signaling.CLOSE_UNAUTHENTICATED,
                                          signaling.CLOSE_CONFLICT, signaling.CLOSE_DENIED}
    for name in ("PROTOCOL_ERROR", "RATE_LIMITED", "CONFLICT", "DENIED"):
        # the connection module (which nodes use) mirrors them
        assert getattr(qc, f"ERROR_{name}") == getattr(signaling, f"CLOSE_{name}")
    assert qc.PERMANENT_ERRORS == signaling.PERMANENT_CLOSES


def test_control_connections_per_identity_are_bounded():
    h = Harness(limits=signaling.Limits(connections_per_identity=3))
    h.connect(1, "agent", "alice", AGENT_ADDR)
    for handle in (2, 3):  # idle, never registering
        h.connect(handle, "agent", "alice", AGENT_ADDR, register=False)
    h.events()
    h.core.node_connected(4, "agent", "alice", AGENT_ADDR, h.now)
    [close] = h.events()
    assert close == CloseNode(4, signaling.CLOSE_RATE_LIMITED,
                              "agent 'alice' already has 3 control connections here, the most "
                              "allowed (--connections-per-identity)")
    assert not h.core.is_connected(4) and h.core.counters["refused_connections"] == 1
    h.say(4, control.Register(role="agent", name="alice"))  # ignored: not a connection
    h.core.node_connected(5, "agent", "bob", AGENT_ADDR, h.now)  # other identities: fine
    assert h.core.is_connected(5)
    h.core.node_disconnected(3, h.now)
    h.core.node_connected(6, "agent", "alice", AGENT_ADDR, h.now)  # a slot is free again
    assert h.core.is_connected(6) and h.events() == []


def _opened(events):
    return sum(isinstance(e, SendMessage) and isinstance(e.message, control.SessionOpened)
               and e.handle == 1 for e in events)


def _limited(events):
    return [e.message for e in events if isinstance(e, SendMessage)
            and isinstance(e.message, control.Error)
            and e.message.code == control.ErrorCode.RATE_LIMITED]


def test_one_agent_opening_5000_sessions_is_rate_limited_and_another_keeps_working():
    """One agent opened 5,000 sessions in 7.5 s. With the default limits it gets
    120 at once, then one every half second (120 a minute), up to 256 open; the rest are
    RATE_LIMITED,
    and bob's session opens and signals as usual. Requests come at 40/s (under the
    control-message rate, so only the session quotas speak)."""
    h = Harness(acl=("*=*",))
    h.pair()
    h.connect(5, "agent", "bob", ("198.51.100.8", 40005))
    h.events()
    opened = limited = 0
    texts = set()
    for request_id in range(1, 5001):
        h.now += 0.025
        h.alive(1, 2, 5)
        events = h.say(1, control.OpenSession(request_id=request_id, service="web"))
        opened += _opened(events)
        errors = _limited(events)
        limited += len(errors)
        texts.update(e.message.split(";")[0] for e in errors)
        if request_id == 130:
            assert opened == 120 + 6  # the burst, and 2 a second for 3.25 s
    assert opened == 256 and limited == 5000 - 256
    assert texts == {"agent 'alice' opened 120 sessions within a minute, the most allowed "
                     "(--sessions-per-minute)",
                     "agent 'alice' has 256 open sessions, the most allowed "
                     "(--sessions-per-agent)"}
    assert len(h.core.registry.sessions()) == 256  # what /status lists stays bounded
    session_id, events = h.open(agent=5, request_id=1)
    assert session_id is not None
    assert h.say(5, offer(session_id))[0].handle == 2
    assert h.core.counters["signaling_dropped"] == 0


def test_a_control_message_flood_is_ignored_then_the_node_is_closed():
    h = Harness()
    h.pair()
    h.connect(5, "agent", "bob", ("198.51.100.8", 40005))
    bob_session, _ = h.open(agent=5, request_id=1)
    h.events()
    events = []
    for request_id in range(1, 5001):  # all at once
        events += h.say(1, control.OpenSession(request_id=request_id, service="web"))
    # The bucket's burst (400, less Register) is processed: the session rate opens 120 and
    # refuses the rest with an answer each; the next 401 are ignored, and the node is closed.
    assert _opened(events) == 120
    errors = [e.message for e in events if isinstance(e, SendMessage) and e.handle == 1
              and isinstance(e.message, control.Error)]
    assert len(errors) == 399 - 120 + 1
    [close] = [e for e in events if isinstance(e, CloseNode)]
    text = ("agent 'alice' sent control messages faster than 50/s (burst 400): 401 ignored "
            "within 10 s")
    assert (errors[-1].code, errors[-1].message) == (control.ErrorCode.RATE_LIMITED, text)
    assert close == CloseNode(1, signaling.CLOSE_RATE_LIMITED, text)
    assert h.core.counters["signaling_dropped"] == 401 and h.core.counters["nodes_flooding"] == 1
    assert [s.session_id for s in h.core.registry.sessions()] == [bob_session]
    assert h.say(5, offer(bob_session))[0].handle == 2  # bob's session carries on


def test_a_node_at_the_control_message_rate_is_never_dropped():
    h = Harness()
    h.pair()
    for i in range(3000):  # 50/s for a minute
        h.now += 0.02
        h.alive(1, 2)
        assert h.say(1, control.Ping(nonce=i)) == [SendMessage(1, control.Pong(nonce=i))]
    assert h.core.counters["signaling_dropped"] == 0
    # A short burst over the rate is ignored and counted, and the node stays.
    h.advance(3, keep_alive=(1, 2))  # the bucket fills up again
    events = [h.say(1, control.Ping(nonce=i)) for i in range(450)]
    assert sum(1 for e in events if e) == 400 and h.core.counters["signaling_dropped"] == 50
    assert h.core.is_connected(1)


def test_open_sessions_per_agent_and_per_connector_are_capped():
    h = Harness(limits=signaling.Limits(sessions_per_agent=3, sessions_per_connector=2,
                                        sessions_per_minute=1000))
    h.connect(1, "agent", "alice", AGENT_ADDR)
    h.connect(2, "connector", "office-a", CONNECTOR_ADDR, services=("web",))
    h.connect(3, "connector", "office-b", ("203.0.113.10", 50003), services=("web",))
    h.connect(5, "agent", "bob", ("198.51.100.8", 40005))
    h.events()
    ids = [h.open(request_id=i)[0] for i in (1, 2, 3)]
    assert [h.core.registry.session(s).connector_name for s in ids] == \
        ["office-a", "office-b", "office-a"]  # spread over the replicas
    _sid, events = h.open(request_id=4)
    assert [e.message for e in events] == [control.Error(
        code=control.ErrorCode.RATE_LIMITED, request_id=4,
        message="agent 'alice' has 3 open sessions, the most allowed (--sessions-per-agent)")]
    bob, _ = h.open(agent=5, request_id=1)  # office-b's second: both are full now
    _sid, events = h.open(agent=5, request_id=2)
    assert events[0].message.message == ("every connector of service 'web' serves 2 "
                                         "sessions, the most allowed (--sessions-per-connector)")
    h.say(1, control.SessionClosed(session_id=ids[0], reason="done"))
    assert h.open(agent=5, request_id=3)[0] is not None  # room again


def test_relay_bandwidth_per_identity_is_shared_among_its_sessions():
    cap = 1_000_000
    h = Harness(limits=signaling.Limits(relay_rate_per_identity=cap))
    h.pair()

    def shares(events):
        return {e.session_id: e.rate_bps for e in events
                if isinstance(e, signaling.RelaySetRate)}

    s1, events = h.open(request_id=1)
    assert shares(events) == {s1: cap}
    s2, events = h.open(request_id=2)
    assert shares(events) == {s1: cap // 2, s2: cap // 2}
    s3, events = h.open(request_id=3)
    assert shares(events) == {s1: cap // 4, s2: cap // 4, s3: cap // 4}
    s4, events = h.open(request_id=4)
    assert shares(events) == {s4: cap // 4}  # same power of two: the others stay
    rates = {}
    for event in h.log:
        if isinstance(event, signaling.RelaySetRate):
            rates[event.session_id] = event.rate_bps
            assert event.burst_bytes == max(event.rate_bps // 4, 64 * 1024)
    assert sum(rates.values()) <= cap
    for sid in (s4, s3):
        events = h.say(1, control.SessionClosed(session_id=sid, reason="done"))
    assert shares(events) == {s1: cap // 2, s2: cap // 2}
    assert Harness().core.limits.relay_rate_per_identity == 0  # off by default: no events
    h2 = Harness()
    h2.pair()
    assert shares(h2.open()[1]) == {}


def test_logs_name_sessions_by_a_short_hash_not_their_id(caplog):
    caplog.set_level("INFO", logger="mahole.signaling")
    h = Harness()
    h.pair()
    session_id, _ = h.open()
    h.say(2, answer(session_id))
    h.say(1, control.SessionClosed(session_id=session_id, reason="done"))
    assert session_id.hex() not in caplog.text
    assert f"session {signaling.session_tag(session_id)} closed" in caplog.text
