"""Control-stream protocol: framing, strict JSON payloads, every message type."""

import dataclasses
import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mahole.wire import control
from mahole.wire.control import (
    MAX_PAYLOAD,
    MESSAGE_TYPES,
    Candidate,
    CandidateAnswer,
    CandidateOffer,
    ControlError,
    Error,
    ErrorCode,
    FrameDecoder,
    Message,
    NatSummary,
    ObservedAddress,
    OpenSession,
    Ping,
    Pong,
    PunchingResult,
    Register,
    UpdateServices,
    Registered,
    ResumeSession,
    SessionClosed,
    SessionHeld,
    SessionOpened,
    SessionResumed,
    StartPunching,
    decode,
    decode_payload,
    encode,
    encode_payload,
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SID = bytes.fromhex("0011223344556677")
SID_HEX = "0011223344556677"
TOKEN = bytes.fromhex("a1b2c3d4e5f60718")
UFRAG = "aB3+"
PWD = "abcdefghijklmnopqrst/+"  # 22 ice-chars, the RFC 8445 §5.3 minimum

HOST = Candidate("1", 1, "udp", 2130706431, ("192.168.1.10", 40000), "host")
SRFLX = Candidate(
    "2", 1, "udp", 1694498815, ("203.0.113.7", 61000), "srflx", ("192.168.1.10", 40000)
)
RELAY = Candidate("3", 1, "udp", 16777215, ("2001:db8::1", 4433), "relay", None)

# One valid example of every message type, filling optional fields both ways where it matters.
SAMPLES = [
    Register("agent", "laptop-7"),
    Register("connector", "office", ("web", "dns")),
    UpdateServices(("web", "dns", "mail")),
    UpdateServices(()),
    Registered("node-1f", ("198.51.100.4", 50000)),
    ObservedAddress(("2001:db8::42", 1)),
    OpenSession(7, "web"),
    SessionOpened(7, SID, "web", "laptop-7", "office", ("198.51.100.4", 50000), TOKEN),
    SessionOpened(0, SID, "web", "laptop-7", "office", None, TOKEN),
    SessionClosed(SID, "idle"),
    SessionClosed(SID, ""),
    ResumeSession(SID, "web", "laptop-7", "office", TOKEN),
    SessionResumed(SID),
    SessionHeld(SID, 6000),
    CandidateOffer(SID, UFRAG, PWD, (HOST, SRFLX, RELAY)),
    CandidateAnswer(SID, "x" * 256, "y" * 256, ()),
    StartPunching(SID, 0),
    StartPunching(SID, 120),
    StartPunching(SID, 0, "birthday", "connector"),
    StartPunching(SID, 0, "prediction", None),
    NatSummary("endpoint-dependent", "sequential", 1, None, False, False),
    NatSummary("endpoint-dependent", "random", None, "address-and-port-dependent", True, True),
    NatSummary(None, None, None, None, False, False),
    PunchingResult(SID, "direct", 12.5, 480.0, ("203.0.113.7", 61000)),
    PunchingResult(SID, "relay", None, 5000.0, None),
    Ping(0),
    Pong(2**53 - 1),
    Error(ErrorCode.UNKNOWN_SERVICE, "no service 'web'", 7, None),
    Error(ErrorCode.CONNECTOR_OFFLINE, "connector 'office' is offline", None, SID),
    Error(ErrorCode.INTERNAL, "oops"),
]


def _json(msg):
    return json.loads(encode_payload(msg))


def _sample(type_name):
    return next(m for m in SAMPLES if type(m).__name__ == type_name)


def _payload(type_name, drop=(), **changes):
    """JSON bytes of the sample of ``type_name`` with fields changed or dropped."""
    obj = _json(_sample(type_name))
    obj.update(changes)
    for key in drop:
        del obj[key]
    return json.dumps(obj).encode()


def _frame(payload):
    return len(payload).to_bytes(4, "big") + payload


# ---------------------------------------------------------------------------------------------
# Registry and round trips


def test_registry_lists_every_message_type_by_class_name():
    assert set(MESSAGE_TYPES) == {
        "Register", "UpdateServices", "Registered", "ObservedAddress", "OpenSession", "SessionOpened",
        "SessionClosed", "ResumeSession", "SessionResumed", "SessionHeld", "CandidateOffer", "CandidateAnswer", "StartPunching",
            "NatSummary",
        "PunchingResult", "Ping", "Pong", "Error",
    }  # fmt: skip
    for name, cls in MESSAGE_TYPES.items():
        assert cls.__name__ == name == cls.TYPE
        assert issubclass(cls, Message)
        assert dataclasses.is_dataclass(cls)
        assert any(a in (cls.__doc__ or "") for a in "→↔"), f"{name}: document who sends it"


def test_samples_cover_every_message_type():
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_every_message_type(msg):
    frame = encode(msg)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert decode(frame) == msg
    assert decode_payload(encode_payload(msg)) == msg
    assert type(decode(frame)) is type(msg)


def test_wire_format_is_compact_json_with_type_first():
    assert encode(Ping(7)) == b'\x00\x00\x00\x19{"type":"Ping","nonce":7}'
    assert _json(CandidateOffer(SID, UFRAG, PWD, (SRFLX,))) == {
        "type": "CandidateOffer",
        "session_id": SID_HEX,
        "ufrag": UFRAG,
        "pwd": PWD,
        "candidates": [
            {
                "foundation": "2",
                "component": 1,
                "transport": "udp",
                "priority": 1694498815,
                "addr": ["203.0.113.7", 61000],
                "type": "srflx",
                "related_addr": ["192.168.1.10", 40000],
            }
        ],
    }
    assert _json(Error(ErrorCode.DENIED, "no")) == {
        "type": "Error", "code": 403, "message": "no", "request_id": None, "session_id": None,
    }  # fmt: skip


def test_non_ascii_text_is_utf8_on_the_wire():
    msg = SessionClosed(SID, "connecteur arrêté ✓")
    assert "arrêté ✓".encode() in encode_payload(msg)
    assert decode(encode(msg)) == msg


def test_error_codes():
    assert {c.name: c.value for c in ErrorCode}.items() >= {
        "BAD_MESSAGE": 400, "UNAUTHENTICATED": 401, "DENIED": 403, "UNKNOWN_SERVICE": 404,
        "INTERNAL": 500, "CONNECTOR_OFFLINE": 503,
    }.items()  # fmt: skip
    decoded = decode_payload(_payload("Error", code=403))
    assert decoded.code is ErrorCode.DENIED
    # A code this version does not know is kept as a plain int, not refused.
    assert decode_payload(_payload("Error", code=418)).code == 418


def test_messages_are_frozen_and_hashable():
    msg = _sample("CandidateOffer")
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.ufrag = "zzzz"
    assert hash(msg) == hash(decode(encode(msg)))


def test_constructor_normalises_lists_addresses_and_numbers():
    reg = Register("connector", "office", ["web"])
    assert reg.services == ("web",)
    assert ObservedAddress(["2001:DB8:0:0::1", 5]).addr == ("2001:db8::1", 5)
    assert ObservedAddress(("::FFFF:192.0.2.1", 5)) == decode(encode(ObservedAddress(("::ffff:192.0.2.1", 5))))
    result = PunchingResult(SID, "relay", 3, 4, None)
    assert (type(result.rtt_ms), type(result.elapsed_ms)) == (float, float)
    assert SessionClosed(bytearray(SID), "x").session_id == SID
    assert Error(404, "x").code is ErrorCode.UNKNOWN_SERVICE


def test_scoped_ipv6_address_round_trips():
    msg = ObservedAddress(("fe80::1%eth0", 4433))
    assert decode(encode(msg)) == msg


def test_float_field_accepts_json_integer():
    obj = _json(_sample("PunchingResult"))
    obj["elapsed_ms"] = 480
    assert decode_payload(json.dumps(obj).encode()).elapsed_ms == 480.0


# ---------------------------------------------------------------------------------------------
# Construction refuses what decoding refuses


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: Register("agent", "laptop", ("web",)), "an agent registers no services"),
        (lambda: Register("admin", "x"), r"Register.role: must be one of 'agent', 'connector'"),
        (lambda: Ping(True), "Ping.nonce: must be an integer, got boolean"),
        (lambda: Ping(-1), r"Ping.nonce: must be in 0\.\.9007199254740991, got -1"),
        (lambda: SessionClosed(b"short", "x"), "SessionClosed.session_id: must be 8 bytes"),
        (lambda: SessionClosed(SID_HEX, "x"), "SessionClosed.session_id: must be bytes, got string"),
        (lambda: ObservedAddress(("localhost", 1)), "host is not an IP address: 'localhost'"),
        (lambda: PunchingResult(SID, "direct", 1.0, 2.0, None), "a direct result needs remote_addr"),
        (lambda: PunchingResult(SID, "relay", None, float("nan"), None), "must be a finite number"),
        (lambda: PunchingResult(SID, "relay", None, 10**400, None), "elapsed_ms: must be in"),
        (lambda: CandidateOffer(SID, UFRAG, PWD, (("1.2.3.4", 5),)), r"candidates\[0\]: must be a Candidate"),
        (lambda: Candidate("1", 1, "udp", 1, ("1.2.3.4", 5), "host", ("1.2.3.4", 6)), "host candidate has no related_addr"),
        (lambda: SessionClosed(SID, "\ud800"), "lone surrogate"),
    ],
)
def test_constructor_validates(build, match):
    with pytest.raises(ControlError, match=match):
        build()


def test_the_largest_valid_register_stays_far_below_the_payload_cap():
    services = tuple(f"{i:02d}" + "s" * 62 for i in range(control.MAX_SERVICES))
    fat = Register("connector", "n" * control.MAX_NAME_LEN, services)
    assert len(encode(fat)) < 5000 < MAX_PAYLOAD


def test_encode_refuses_payload_over_cap(monkeypatch):
    monkeypatch.setattr(control, "MAX_PAYLOAD", 100)
    with pytest.raises(ControlError, match="over the 100-byte cap"):
        encode(Register("connector", "office", tuple(f"web{i}" for i in range(20))))


def test_names_follow_the_command_line_grammar():
    from mahole import config

    assert config.NAME.pattern == control.NAME_RE.pattern  # one grammar (config imports it)
    for good in ("a", "web", "office-2", "db.internal", "A_1", "9" * 64):
        assert OpenSession(1, good).service == good
        assert config.Service.parse(f"{good}=tcp:127.0.0.1:80").name == good
    for bad in ("", "*", "web*", "../etc", "a/b", ".hidden", "-x", "_x", "a b", "é",
                "x" * 65, "web\n", "a:b", "a=b"):
        with pytest.raises(ControlError, match="OpenSession.service"):
            OpenSession(1, bad)
        with pytest.raises(ValueError):
            config.Service.parse(f"{bad}=tcp:127.0.0.1:80")


def test_a_register_with_64_long_hostile_service_names_is_undecodable():
    """A Register with 64 service names of 250 characters containing */../ was
    accepted. It is not even decodable now (the intermediate answers BAD_MESSAGE)."""
    hostile = [f"{i}*/../" + "x" * 240 for i in range(64)]
    payload = json.dumps({"type": "Register", "role": "connector", "name": "rogue",
                          "services": hostile}).encode()
    with pytest.raises(ValueError, match=r"Register.services\[0\]: length must be 1..64"):
        decode_payload(payload)
    short = json.dumps({"type": "Register", "role": "connector", "name": "rogue",
                        "services": ["web", "*/../x"]}).encode()
    with pytest.raises(ValueError, match=r"Register.services\[1\]: must contain only"):
        decode_payload(short)
    many = json.dumps({"type": "Register", "role": "connector", "name": "rogue",
                       "services": [f"s{i}" for i in range(65)]}).encode()
    with pytest.raises(ValueError, match="must have at most 64 items, got 65"):
        decode_payload(many)
    with pytest.raises(ControlError):
        FrameDecoder().feed(_frame(payload))


def test_encode_refuses_non_messages():
    with pytest.raises(TypeError):
        encode(HOST)


# ---------------------------------------------------------------------------------------------
# Payload validation: every rule, with the field named in the message

LONG = "n" * 256


def _candidate(**changes):
    obj = _json(_sample("CandidateOffer"))
    obj["candidates"][0].update(changes)
    return json.dumps(obj).encode()


BAD_PAYLOADS = [
    # envelope
    ("empty", b"", "payload is empty"),
    ("not utf-8", b'{"type":"Ping","nonce":1}\xff', "not valid UTF-8"),
    ("overlong utf-8", b'{"type":"Error","code":400,"message":"\xc0\xaf"}', "not valid UTF-8"),
    ("bad json", b'{"type":"Ping",', "not valid JSON"),
    ("trailing garbage", b'{"type":"Ping","nonce":1} x', "not valid JSON"),
    ("json array", b"[1, 2]", "must be a JSON object, got array"),
    ("json string", b'"Ping"', "must be a JSON object, got string"),
    ("json null", b"null", "must be a JSON object, got null"),
    ("json number", b"42", "must be a JSON object, got integer"),
    ("NaN", b'{"type":"Ping","nonce":NaN}', "NaN is not allowed"),
    ("Infinity", b'{"type":"PunchingResult","elapsed_ms":Infinity}', "Infinity is not allowed"),
    ("-Infinity", b'{"type":"Ping","nonce":-Infinity}', "-Infinity is not allowed"),
    ("huge exponent", b'{"type":"Ping","nonce":1e999}', "number '1e999' is out of range"),
    ("huge integer", b'{"type":"Ping","nonce":' + b"9" * 5000 + b"}", "not valid JSON"),
    ("duplicate key", b'{"type":"Ping","nonce":1,"nonce":2}', "duplicate key 'nonce'"),
    ("duplicate type", b'{"type":"Ping","type":"Pong","nonce":1}', "duplicate key 'type'"),
    ("deep nesting", b"[" * 60000, "nested too deeply|not valid JSON"),
    ("no type", b'{"nonce":1}', "no 'type' field"),
    ("type not string", b'{"type":3,"nonce":1}', "'type' must be a string, got integer"),
    ("unknown type", b'{"type":"Hello","nonce":1}', "unknown control message type 'Hello'"),
    ("type wrong case", b'{"type":"ping","nonce":1}', "unknown control message type 'ping'"),
    # fields present, exactly
    ("missing field", _payload("Ping", drop=["nonce"]), "Ping: missing field\\(s\\) 'nonce'"),
    ("missing optional", _payload("Error", drop=["session_id"]), "Error: missing field\\(s\\) 'session_id'"),
    ("extra field", _payload("Ping", extra=1), "Ping: unknown field\\(s\\) 'extra'"),
    # integers
    ("bool as int", _payload("Ping", nonce=True), "Ping.nonce: must be an integer, got boolean"),
    ("float as int", _payload("Ping", nonce=1.0), "Ping.nonce: must be an integer, got number"),
    ("string as int", _payload("OpenSession", request_id="7"), "OpenSession.request_id: must be an integer, got string"),
    ("negative int", _payload("Pong", nonce=-1), "Pong.nonce: must be in 0..9007199254740991, got -1"),
    ("int over 2**53", _payload("Pong", nonce=2**53), "Pong.nonce: must be in"),
    ("negative delay", _payload("StartPunching", delay_ms=-1), "StartPunching.delay_ms: must be in 0..60000"),
    ("huge delay", _payload("StartPunching", delay_ms=60001), "StartPunching.delay_ms: must be in 0..60000"),
    ("unknown strategy", _payload("StartPunching", strategy="scan"), "StartPunching.strategy: must be one of 'checks', 'prediction', 'mapped', 'birthday', 'relay', got 'scan'"),
    ("birthday without side", _payload("StartPunching", strategy="birthday"), "StartPunching: strategy 'birthday' needs hard_side"),
    ("side without strategy", _payload("StartPunching", hard_side="agent"), "StartPunching: hard_side without a strategy"),
    ("bad hard side", _payload("StartPunching", strategy="birthday", hard_side="both"), "StartPunching.hard_side: must be one of 'agent', 'connector'"),
    ("nat missing field", _payload("NatSummary", drop=["ipv6"]), "NatSummary: missing field\\(s\\) 'ipv6'"),
    ("nat bool as int", _payload("NatSummary", mapped_port=1), "NatSummary.mapped_port: must be a boolean, got integer"),
    ("nat step too big", _payload("NatSummary", step=17), "NatSummary.step: must be in -16..16, got 17"),
    ("nat step 0", _payload("NatSummary", step=0), "NatSummary: step must not be 0"),
    ("nat step random", _payload("NatSummary", allocation="random"), "NatSummary: step goes with a sequential allocation"),
    ("nat allocation of eim", _payload("NatSummary", mapping="endpoint-independent"), "NatSummary: an allocation is only known of an endpoint-dependent mapping"),
    ("nat unknown filtering", _payload("NatSummary", filtering="cone"), "NatSummary.filtering: must be one of"),
    ("code too low", _payload("Error", code=200), "Error.code: must be in 400..599, got 200"),
    ("code too high", _payload("Error", code=600), "Error.code: must be in 400..599"),
    ("bool request id", _payload("Error", request_id=False), "Error.request_id: must be an integer, got boolean"),
    # floats
    ("negative float", _payload("PunchingResult", rtt_ms=-0.5), "PunchingResult.rtt_ms: must be in 0..8.64e\\+07"),
    ("bool as float", _payload("PunchingResult", elapsed_ms=True), "PunchingResult.elapsed_ms: must be a number, got boolean"),
    ("string as float", _payload("PunchingResult", elapsed_ms="1"), "elapsed_ms: must be a number, got string"),
    # strings
    ("empty name", _payload("Register", name=""), "Register.name: length must be 1..64 characters, got 0"),
    ("long name", _payload("Register", name=LONG), "Register.name: length must be 1..64 characters, got 256"),
    ("control char in name", _payload("Register", name="a\nb"), "Register.name: must contain only A-Z a-z 0-9"),
    ("glob in service", _payload("OpenSession", service="w*"), "OpenSession.service: must contain only A-Z a-z 0-9"),
    ("path in name", _payload("SessionOpened", connector="../office"), "SessionOpened.connector: must contain only"),
    ("name not string", _payload("Register", name=["x"]), "Register.name: must be a string, got array"),
    ("bad role", _payload("Register", role="intermediate"), "Register.role: must be one of 'agent', 'connector', got 'intermediate'"),
    ("agent with services", _payload("Register", services=["web"]), "Register: an agent registers no services"),
    ("services not array", _payload("Register", services="web"), "Register.services: must be an array, got string"),
    ("long service", _payload("OpenSession", service=LONG), "OpenSession.service: length must be 1..64"),
    ("long reason", _payload("SessionClosed", reason="r" * 1025), "SessionClosed.reason: length must be 0..1024 characters, got 1025"),
    ("long message", _payload("Error", message="m" * 1025), "Error.message: length must be 0..1024"),
    ("lone surrogate", b'{"type":"SessionClosed","session_id":"0011223344556677","reason":"\\ud800"}', "SessionClosed.reason: contains a lone surrogate"),
    ("bad path", _payload("PunchingResult", path="tunnel"), "PunchingResult.path: must be one of 'direct', 'relay'"),
    # session ids
    ("uppercase hex", _payload("StartPunching", session_id=SID_HEX.upper().replace("00", "AA")), "StartPunching.session_id: must be 16 lowercase hex digits"),
    ("short hex", _payload("StartPunching", session_id="00112233"), "StartPunching.session_id: must be 16 lowercase hex digits, got '00112233'"),
    ("non-hex", _payload("StartPunching", session_id="00112233445566zz"), "must be 16 lowercase hex digits"),
    ("hex with newline", _payload("StartPunching", session_id=SID_HEX[:-1] + "\n"), "must be 16 lowercase hex digits"),
    ("session id number", _payload("StartPunching", session_id=1), "StartPunching.session_id: must be a hex string, got integer"),
    ("optional session id bad", _payload("Error", session_id="zz"), "Error.session_id: must be 16 lowercase hex digits"),
    # relay tokens: exactly 8 bytes, required
    ("short relay token", _payload("SessionOpened", relay_token="a1b2c3"), "SessionOpened.relay_token: must be 16 lowercase hex digits"),
    ("null relay token", _payload("SessionOpened", relay_token=None), "SessionOpened.relay_token: must be a hex string, got null"),
    ("no relay token", _payload("SessionOpened", drop=("relay_token",)), "SessionOpened: missing field\\(s\\) 'relay_token'"),
    # addresses
    ("hostname", _payload("ObservedAddress", addr=["example.com", 1]), "ObservedAddress.addr: host is not an IP address: 'example.com'"),
    ("ip with port text", _payload("ObservedAddress", addr=["1.2.3.4:5", 1]), "host is not an IP address"),
    ("leading zero ip", _payload("ObservedAddress", addr=["01.2.3.4", 1]), "host is not an IP address"),
    ("host as int", _payload("ObservedAddress", addr=[16909060, 1]), "host must be a string, got integer"),
    ("port too big", _payload("ObservedAddress", addr=["1.2.3.4", 65536]), "ObservedAddress.addr: port must be in 0..65535, got 65536"),
    ("negative port", _payload("ObservedAddress", addr=["1.2.3.4", -1]), "port must be in 0..65535"),
    ("port bool", _payload("ObservedAddress", addr=["1.2.3.4", True]), "port must be an integer, got boolean"),
    ("port string", _payload("ObservedAddress", addr=["1.2.3.4", "80"]), "port must be an integer, got string"),
    ("addr one item", _payload("Registered", observed_addr=["1.2.3.4"]), "Registered.observed_addr: must be \\[host, port\\]"),
    ("addr three items", _payload("Registered", observed_addr=["1.2.3.4", 1, 2]), "must be \\[host, port\\]"),
    ("addr object", _payload("Registered", observed_addr={"host": "1.2.3.4", "port": 1}), "must be \\[host, port\\]"),
    ("addr string", _payload("Registered", observed_addr="1.2.3.4:1"), "must be \\[host, port\\]"),
    ("null required addr", _payload("ObservedAddress", addr=None), "ObservedAddress.addr: must be \\[host, port\\], got None"),
    ("bad optional addr", _payload("SessionOpened", peer_addr=["::1", 70000]), "SessionOpened.peer_addr: port must be in 0..65535"),
    ("direct without remote", _payload("PunchingResult", path="direct", remote_addr=None), "PunchingResult: a direct result needs remote_addr"),
    ("relay with remote", _payload("PunchingResult", path="relay", remote_addr=["1.2.3.4", 5]), "PunchingResult: a relay result has no remote_addr"),
    # ICE credentials (RFC 8445 §5.3)
    ("ufrag too short", _payload("CandidateOffer", ufrag="abc"), "CandidateOffer.ufrag: length must be 4..256 characters, got 3"),
    ("ufrag too long", _payload("CandidateOffer", ufrag="a" * 257), "CandidateOffer.ufrag: length must be 4..256"),
    ("ufrag bad char", _payload("CandidateOffer", ufrag="ab-cd"), "CandidateOffer.ufrag: must contain only ice-chars"),
    ("pwd too short", _payload("CandidateAnswer", pwd="p" * 21), "CandidateAnswer.pwd: length must be 22..256 characters, got 21"),
    ("pwd bad char", _payload("CandidateAnswer", pwd="p" * 21 + "="), "CandidateAnswer.pwd: must contain only ice-chars"),
    # candidates
    ("candidates not array", _payload("CandidateOffer", candidates={}), "CandidateOffer.candidates: must be an array, got object"),
    ("too many candidates", _payload("CandidateOffer", candidates=[_json(_sample("CandidateOffer"))["candidates"][0]] * 65), "CandidateOffer.candidates: must have at most 64 items, got 65"),
    ("candidate not object", _payload("CandidateOffer", candidates=[["1.2.3.4", 5]]), r"CandidateOffer.candidates\[0\]: must be a JSON object, got array"),
    ("candidate missing field", _payload("CandidateOffer", candidates=[{"foundation": "1"}]), r"candidates\[0\]: missing field\(s\) 'component'"),
    ("candidate extra field", _candidate(generation=0), r"CandidateOffer.candidates\[0\]: unknown field\(s\) 'generation'"),
    ("candidate duplicate key", b'{"type":"CandidateOffer","session_id":"0011223344556677","ufrag":"aB3+","pwd":"abcdefghijklmnopqrst/+","candidates":[{"foundation":"1","foundation":"2"}]}', "duplicate key 'foundation'"),
    ("component 0", _candidate(component=0), r"candidates\[0\]: Candidate.component: must be in 1..256, got 0"),
    ("component 257", _candidate(component=257), "Candidate.component: must be in 1..256, got 257"),
    ("priority 2**32", _candidate(priority=2**32), "Candidate.priority: must be in 0..4294967295"),
    ("priority bool", _candidate(priority=True), "Candidate.priority: must be an integer, got boolean"),
    ("transport tcp", _candidate(transport="tcp"), "Candidate.transport: must be one of 'udp', got 'tcp'"),
    ("candidate type", _candidate(type="mdns"), "Candidate.type: must be one of 'host', 'srflx', 'prflx', 'relay'"),
    ("empty foundation", _candidate(foundation=""), "Candidate.foundation: length must be 1..32"),
    ("long foundation", _candidate(foundation="f" * 33), "Candidate.foundation: length must be 1..32"),
    ("foundation bad char", _candidate(foundation="a b"), "Candidate.foundation: must contain only ice-chars"),
    ("candidate bad addr", _candidate(addr=["1.2.3", 5]), r"candidates\[0\]: Candidate.addr: host is not an IP address"),
    ("host with related", _candidate(related_addr=["10.0.0.1", 1]), r"candidates\[0\]: Candidate: a host candidate has no related_addr"),
]


@pytest.mark.parametrize("payload, match", [p[1:] for p in BAD_PAYLOADS], ids=[p[0] for p in BAD_PAYLOADS])
def test_bad_payload_is_refused_with_a_clear_message(payload, match):
    with pytest.raises(ControlError, match=match) as info:
        decode_payload(payload)
    assert isinstance(info.value, ValueError)
    assert len(str(info.value)) < 300, "error text must stay one readable line"
    # The same payload inside a frame is refused by the stream decoder too.
    if 0 < len(payload) <= MAX_PAYLOAD:
        with pytest.raises(ValueError):
            FrameDecoder().feed(_frame(payload))


def test_payload_over_cap_is_refused():
    with pytest.raises(ControlError, match="65537 bytes, over the 65536-byte cap"):
        decode_payload(b" " * (MAX_PAYLOAD + 1))


def test_error_messages_truncate_huge_values():
    with pytest.raises(ControlError) as info:
        decode_payload(_payload("Register", role="x" * 10000))
    assert len(str(info.value)) < 200


def test_64_candidates_and_64_services_are_accepted():
    offer = CandidateOffer(SID, UFRAG, PWD, (SRFLX,) * 64)
    assert decode(encode(offer)) == offer
    reg = Register("connector", "office", tuple(f"svc{i}" for i in range(64)))
    assert decode(encode(reg)) == reg


def test_duplicate_services_are_refused():
    with pytest.raises(ControlError, match="Register.services: duplicate item 'web'"):
        decode_payload(_payload("Register", role="connector", services=["web", "dns", "web"]))


# ---------------------------------------------------------------------------------------------
# Framing

STREAM_MESSAGES = [Register("connector", "office", ("web",)), Ping(1), _sample("CandidateOffer"), Pong(1)]
STREAM = b"".join(encode(m) for m in STREAM_MESSAGES)


def test_several_frames_in_one_chunk():
    decoder = FrameDecoder()
    assert decoder.feed(STREAM) == STREAM_MESSAGES
    assert decoder.buffered == 0
    decoder.finish()


def test_split_at_every_byte_boundary():
    for cut in range(len(STREAM) + 1):
        decoder = FrameDecoder()
        got = decoder.feed(STREAM[:cut]) + decoder.feed(STREAM[cut:])
        assert got == STREAM_MESSAGES, f"cut at {cut}"
        assert decoder.buffered == 0


def test_split_at_every_pair_of_boundaries_of_one_frame():
    frame = encode(_sample("PunchingResult"))
    for a in range(len(frame) + 1):
        for b in range(a, len(frame) + 1):
            decoder = FrameDecoder()
            got = decoder.feed(frame[:a]) + decoder.feed(frame[a:b]) + decoder.feed(frame[b:])
            assert got == [_sample("PunchingResult")], (a, b)


def test_byte_by_byte():
    decoder = FrameDecoder()
    got = []
    for i in range(len(STREAM)):
        got += decoder.feed(STREAM[i : i + 1])
    assert got == STREAM_MESSAGES


def test_partial_frame_is_buffered_until_complete():
    frame = encode(Ping(9))
    decoder = FrameDecoder()
    assert decoder.feed(frame[:-1]) == []
    assert decoder.buffered == len(frame) - 1
    with pytest.raises(ControlError, match="ended inside a frame"):
        decoder.finish()
    assert decoder.feed(frame[-1:] + frame[:2]) == [Ping(9)]
    assert decoder.buffered == 2


def test_accepts_bytearray_and_memoryview():
    decoder = FrameDecoder()
    assert decoder.feed(bytearray(STREAM[:10])) + decoder.feed(memoryview(STREAM)[10:]) == STREAM_MESSAGES


def test_zero_length_is_refused():
    with pytest.raises(ControlError, match="length is 0"):
        FrameDecoder().feed(b"\x00\x00\x00\x00")


@pytest.mark.parametrize("length", [MAX_PAYLOAD + 1, 2**24, 2**32 - 1])
def test_oversize_length_is_refused_from_the_header_alone(length):
    decoder = FrameDecoder()
    header = length.to_bytes(4, "big")
    assert decoder.feed(header[:3]) == []  # not yet known
    with pytest.raises(ControlError, match=f"length {length} is over the 65536-byte cap"):
        decoder.feed(header[3:])  # no body bytes at all
    assert decoder.buffered == 0


def test_oversize_length_after_good_frames_in_same_chunk():
    with pytest.raises(ControlError, match="over the 65536-byte cap"):
        FrameDecoder().feed(encode(Ping(1)) + b"\xff\xff\xff\xff")


def test_max_size_payload_is_accepted():
    base = encode_payload(SessionClosed(SID, ""))
    payload = base[:-1] + b" " * (MAX_PAYLOAD - len(base)) + b"}"  # JSON allows whitespace
    assert len(payload) == MAX_PAYLOAD
    assert FrameDecoder().feed(_frame(payload)) == [SessionClosed(SID, "")]


def test_decoder_stays_failed_after_an_error():
    decoder = FrameDecoder()
    with pytest.raises(ControlError):
        decoder.feed(_frame(b'{"type":"Nope"}'))
    with pytest.raises(ControlError, match="already failed: unknown control message type 'Nope'"):
        decoder.feed(encode(Ping(1)))


def test_decode_wants_exactly_one_frame():
    assert decode(encode(Ping(3))) == Ping(3)
    with pytest.raises(ControlError, match="exactly one complete control frame"):
        decode(encode(Ping(3)) + encode(Ping(4)))
    with pytest.raises(ControlError, match="exactly one complete control frame"):
        decode(encode(Ping(3))[:-1])
    with pytest.raises(ControlError, match="exactly one complete control frame"):
        decode(b"")


# ---------------------------------------------------------------------------------------------
# Property tests

session_ids = st.binary(min_size=8, max_size=8)
names = st.from_regex(control.NAME_RE, fullmatch=True)
texts = st.text(st.characters(codec="utf-8"), max_size=1024)
ice = string.ascii_letters + string.digits + "+/"
safe_ints = st.integers(0, 2**53 - 1)
ports = st.integers(0, 65535)
addrs = st.tuples(st.ip_addresses().map(str), ports)
durations = st.floats(0, 86_400_000, allow_nan=False, allow_infinity=False)


@st.composite
def candidates(draw):
    kind = draw(st.sampled_from(["host", "srflx", "prflx", "relay"]))
    return Candidate(
        foundation=draw(st.text(ice, min_size=1, max_size=32)),
        component=draw(st.integers(1, 256)),
        transport="udp",
        priority=draw(st.integers(0, 2**32 - 1)),
        addr=draw(addrs),
        type=kind,
        related_addr=None if kind == "host" else draw(st.none() | addrs),
    )


def _exchange(cls):
    return st.builds(
        cls,
        session_id=session_ids,
        ufrag=st.text(ice, min_size=4, max_size=256),
        pwd=st.text(ice, min_size=22, max_size=256),
        candidates=st.lists(candidates(), max_size=8).map(tuple),
    )


@st.composite
def punching_results(draw):
    path = draw(st.sampled_from(["direct", "relay"]))
    return PunchingResult(
        session_id=draw(session_ids),
        path=path,
        rtt_ms=draw(st.none() | durations),
        elapsed_ms=draw(durations),
        remote_addr=draw(addrs) if path == "direct" else None,
    )


STRATEGIES = {
    Register: st.one_of(
        st.builds(Register, role=st.just("agent"), name=names, services=st.just(())),
        st.builds(
            Register,
            role=st.just("connector"),
            name=names,
            services=st.lists(names, max_size=8, unique=True).map(tuple),
        ),
    ),
    UpdateServices: st.builds(
        UpdateServices, services=st.lists(names, max_size=8, unique=True).map(tuple)),
    Registered: st.builds(Registered, node_id=names, observed_addr=addrs),
    ObservedAddress: st.builds(ObservedAddress, addr=addrs),
    OpenSession: st.builds(OpenSession, request_id=safe_ints, service=names),
    SessionOpened: st.builds(
        SessionOpened,
        request_id=safe_ints,
        session_id=session_ids,
        service=names,
        agent=names,
        connector=names,
        peer_addr=st.none() | addrs,
        relay_token=session_ids,
    ),
    SessionClosed: st.builds(SessionClosed, session_id=session_ids, reason=texts),
    ResumeSession: st.builds(ResumeSession, session_id=session_ids, service=names, agent=names,
                             connector=names, relay_token=session_ids),
    SessionResumed: st.builds(SessionResumed, session_id=session_ids),
    SessionHeld: st.builds(SessionHeld, session_id=session_ids, hold_ms=st.integers(0, 60_000)),
    CandidateOffer: _exchange(CandidateOffer),
    CandidateAnswer: _exchange(CandidateAnswer),
    StartPunching: st.builds(StartPunching, session_id=session_ids, delay_ms=st.integers(0, 60_000))
    | st.builds(StartPunching, session_id=session_ids, delay_ms=st.integers(0, 60_000),
                strategy=st.sampled_from(control.STRATEGIES),
                hard_side=st.sampled_from(control.ROLES)),
    NatSummary: st.builds(NatSummary, mapping=st.just("endpoint-dependent"),
                          allocation=st.just("sequential"),
                          step=st.integers(1, 16) | st.integers(-16, -1),
                          filtering=st.none() | st.sampled_from(control.FILTERINGS),
                          mapped_port=st.booleans(), ipv6=st.booleans())
    | st.builds(NatSummary, mapping=st.none() | st.just("endpoint-independent"),
                allocation=st.none(), step=st.none(), filtering=st.none(),
                mapped_port=st.booleans(), ipv6=st.booleans()),
    PunchingResult: punching_results(),
    Ping: st.builds(Ping, nonce=safe_ints),
    Pong: st.builds(Pong, nonce=safe_ints),
    Error: st.builds(
        Error,
        code=st.sampled_from(list(ErrorCode)) | st.integers(400, 599),
        message=texts,
        request_id=st.none() | safe_ints,
        session_id=st.none() | session_ids,
    ),
}
messages = st.one_of(*STRATEGIES.values())

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


def test_every_message_type_has_a_strategy():
    assert set(STRATEGIES) == set(MESSAGE_TYPES.values())


@FAST
@given(messages)
def test_round_trip_property(msg):
    frame = encode(msg)
    assert decode(frame) == msg
    assert encode(decode(frame)) == frame


@FAST
@given(st.lists(messages, min_size=1, max_size=4), st.data())
def test_stream_in_random_chunks(msgs, data):
    stream = b"".join(encode(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    decoder = FrameDecoder()
    got = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)]):
        got += decoder.feed(stream[a:b])
    assert got == msgs
    assert decoder.buffered == 0


def _decode_or_value_error(payload):
    """decode_payload raises only ValueError; whatever it accepts re-encodes to an equal message."""
    try:
        msg = decode_payload(payload)
    except ValueError:
        return None
    assert decode_payload(encode_payload(msg)) == msg
    return msg


@FAST
@given(st.binary(max_size=200))
def test_random_payload_bytes_raise_only_value_error(data):
    _decode_or_value_error(data)


@FAST
@given(st.lists(st.binary(max_size=40), max_size=6))
def test_random_stream_chunks_raise_only_value_error(chunks):
    decoder = FrameDecoder()
    try:
        for chunk in chunks:
            for msg in decoder.feed(chunk):
                assert isinstance(msg, Message)
    except ValueError:
        pass


@FAST
@given(messages, st.data())
def test_mutated_frames_raise_only_value_error(msg, data):
    frame = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        at = data.draw(st.integers(0, max(len(frame) - 1, 0)))
        if op == "flip" and frame:
            frame[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and frame:
            frame[at] = data.draw(st.integers(0, 255))
        elif op == "insert":
            frame[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and frame:
            del frame[at]
        elif op == "truncate":
            del frame[at:]
    decoder = FrameDecoder()
    try:
        decoder.feed(bytes(frame))
    except ValueError:
        pass
    _decode_or_value_error(bytes(frame[4:]))


@FAST
@given(messages, st.data())
def test_mutated_json_payloads_raise_only_value_error(msg, data):
    obj = json.loads(encode_payload(msg))
    op = data.draw(st.sampled_from(["replace", "drop", "add", "nested"]))
    key = data.draw(st.sampled_from(sorted(obj)))
    if op == "replace":
        obj[key] = data.draw(json_values)
    elif op == "drop":
        del obj[key]
    elif op == "add":
        obj[data.draw(st.text(max_size=8))] = data.draw(json_values)
    elif op == "nested" and obj.get("candidates"):
        cand = obj["candidates"][0]
        cand[data.draw(st.sampled_from(sorted(cand)))] = data.draw(json_values)
    payload = json.dumps(obj, ensure_ascii=data.draw(st.booleans())).encode("utf-8", "surrogatepass")
    _decode_or_value_error(payload)


# ---------------------------------------------------------------------------------------------
# Fields added by control protocol /3


def test_start_punching_without_a_strategy_is_the_older_versions_message():
    """An intermediate of /1 or /2 sends StartPunching without the /3 fields: a /3 node reads
    it (strategy null), and a /3 intermediate's message without a strategy is byte for byte
    what the older versions send, so their strict decoders take it."""
    older = b'{"type":"StartPunching","session_id":"0011223344556677","delay_ms":0}'
    assert decode_payload(older) == StartPunching(SID, 0)
    assert decode_payload(older).strategy is None
    assert encode_payload(StartPunching(SID, 0)) == older
    told = _json(StartPunching(SID, 0, "birthday", "agent"))
    assert told["strategy"] == "birthday" and told["hard_side"] == "agent"


def test_an_older_peer_refuses_the_added_fields_which_is_why_they_are_omitted():
    """The strictness the omission protects: a field unknown to a decoder is refused (here
    through a record of the /2 shape), so a /3 field must never reach a /2 peer."""
    with pytest.raises(ControlError, match="unknown field"):
        decode_payload(b'{"type":"Ping","nonce":1,"strategy":"checks"}')
