"""Fuzz targets: every decoder that reads bytes from the network, and the contract it keeps.

Contract (STYLE.md habit 2): a decoder given any bytes returns a result or raises `ValueError`
(or a subclass) and nothing else. Where a compiled module has a pure-Python twin, both get the
same input and must agree: the same result, or both `ValueError`. Decoders that can re-encode
what they decoded must round-trip. A broken rule raises `Finding`; any other exception escapes
as itself. Either way atheris reports it with the traceback and keeps the input as a reproducer.

Each target is `one_input(data: bytes) -> None`, registered in `TARGETS`. Targets that take
several datagrams read them from one input as records, `len (2 bytes, big endian) | bytes`,
after a flags byte (see `_records`); `python fuzz/make_corpus.py` writes the seeds.

  hot           classify + parse_header: compiled `_hot` vs pure `_hot_py`
  router        Router.dispatch of a batch, tables filled from the batch: compiled vs pure
  stun          mahole.wire.stun.decode (with and without a key), is_stun, re-encoding
  control       FrameDecoder (whole and in chunks), decode, decode_payload, re-encoding
  relay         mahole.wire.relay.decode_frame / encode_frame, and both Routers' relay path
  relay_engine  RelayEngine.poll on loopback sockets: compiled `_relay` vs pure `_relay_py`
"""

import select
import socket
import time

from mahole import _fast
from mahole._fast import _kinds
from mahole.wire import control, relay, stun

__all__ = ["TARGETS", "Finding", "twins"]


class Finding(AssertionError):
    """A decoder broke its contract (twins disagree, a round trip changed the message...)."""


def twins(module):
    """(compiled, pure) modules; compiled is None where it was not built."""
    impls = _fast.implementations(module)
    return impls.get("compiled"), impls["python"]


def _outcome(call, *args):
    """("ok", result) or ("ValueError", None); any other exception escapes as a crash."""
    try:
        return "ok", call(*args)
    except ValueError:
        return "ValueError", None


def _agree(what, data, compiled, pure):
    if compiled != pure:
        raise Finding(f"{what}: compiled and pure twins disagree on {bytes(data).hex()}\n"
                      f"  compiled: {compiled!r}\n  pure:     {pure!r}")


def _header_fields(header):
    return (header.version, header.packet_type, header.dcid, header.scid, header.token,
            header.length, header.packet_length, tuple(header.supported_versions))


def _records(data, limit=32):
    """(flags, [datagram, ...]) from `flags (1) | (len (2, big endian) | bytes)*`; the last
    record takes whatever is left if its length overruns."""
    if not data:
        return 0, []
    flags, pos, out = data[0], 1, []
    while pos < len(data) and len(out) < limit:
        if pos + 2 > len(data):
            out.append(data[pos:])
            break
        length = int.from_bytes(data[pos:pos + 2], "big")
        out.append(data[pos + 2:pos + 2 + length])
        pos += 2 + length
    return flags, out


def records(flags, datagrams):
    """The inverse of `_records`, for writing seeds."""
    return bytes((flags,)) + b"".join(len(d).to_bytes(2, "big") + d for d in datagrams)


_BUFFER_TYPES = (bytes, bytearray, memoryview)


# --- hot: classify + parse_header ----------------------------------------------------------

_HOT_COMPILED, _HOT_PURE = twins("hot")


def _hot_result(module, data, short_dcid_len):
    kind = module.classify(data)
    status, header = _outcome(module.parse_header, data, short_dcid_len)
    return kind, status, None if header is None else _header_fields(header)


def fuzz_hot(data):
    # 8 is the deployment's short DCID length; the second length varies with the input
    # (0..20, the range RFC 9000 §17.2 allows a connection ID).
    for short_dcid_len in (8, len(data) % 21):
        expected = _hot_result(_HOT_PURE, data, short_dcid_len)
        for buffer_type in _BUFFER_TYPES:
            given = buffer_type(data)
            pure = _hot_result(_HOT_PURE, given, short_dcid_len)
            _agree(f"pure parse_header({buffer_type.__name__}) vs bytes", data, pure, expected)
            if _HOT_COMPILED is not None:
                compiled = _hot_result(_HOT_COMPILED, given, short_dcid_len)
                _agree(f"classify/parse_header({buffer_type.__name__}, {short_dcid_len})",
                       data, compiled, expected)
        kind = expected[0]
        if kind != _kinds.KIND_UNKNOWN and kind != _HOT_PURE.classify(data[:1]):
            raise Finding(f"classify depends on more than the first byte: {data.hex()}")


# --- router: Router.dispatch ---------------------------------------------------------------

_SHORT_DCID_LENS = (8, 8, 4, 0)
ADDR = ("192.0.2.1", 4433)


def _fill(router, datagrams, mask, short_dcid_len):
    """Register the routing ids found in the batch itself, so that lookups hit: datagram i
    registers when bit (i % 4) of `mask` is set."""
    for i, d in enumerate(datagrams):
        if not mask >> (i % 4) & 1 or not d:
            continue
        handle = f"h{i}"
        if d[0] == _kinds.RELAY_FRAME_TYPE and len(d) > _kinds.RELAY_SESSION_ID_LEN:
            router.add_session(d[1:1 + _kinds.RELAY_SESSION_ID_LEN], handle)
        elif d[0] & 0x80 and len(d) > 6 and d[5] <= 20:
            router.add_connection(d[6:6 + d[5]], handle)
        elif len(d) >= 1 + short_dcid_len:
            router.add_connection(d[1:1 + short_dcid_len], handle)


def _dispatch_result(module, datagrams, flags):
    short_dcid_len = _SHORT_DCID_LENS[flags & 3]
    buffer_type = _BUFFER_TYPES[(flags >> 2) & 3 if (flags >> 2) & 3 < 3 else 0]
    router = module.Router(short_dcid_len)
    _fill(router, datagrams, flags >> 4, short_dcid_len)
    batch = [(buffer_type(d), ADDR) for d in datagrams]
    result = router.dispatch(batch)  # drops what it cannot route: never raises

    def plain(items):
        return [(bytes(d), addr) for d, addr in items]

    return {
        "quic": list(zip(result.quic_handles, plain(result.quic_datagrams))),
        "grouped": {h: plain(items) for h, items in result.grouped_quic().items()},
        "initials": [(_header_fields(h), bytes(d), a) for h, d, a in result.initials],
        "stun": plain(result.stun),
        "relay": [(e, bytes(d), a) for e, d, a in result.relay],
        "dropped": result.dropped,
        "counters": router.counters(),
        "tables": (router.connection_count, router.session_count),
    }


def fuzz_router(data):
    flags, datagrams = _records(data)
    pure = _dispatch_result(_HOT_PURE, datagrams, flags)
    total = (len(pure["quic"]) + len(pure["initials"]) + len(pure["stun"])
             + len(pure["relay"]) + pure["dropped"])
    if total != len(datagrams):
        raise Finding(f"dispatch accounted for {total} of {len(datagrams)} datagrams")
    if _HOT_COMPILED is not None:
        compiled = _dispatch_result(_HOT_COMPILED, datagrams, flags)
        _agree("Router.dispatch", data, compiled, pure)


# --- stun ----------------------------------------------------------------------------------

# RFC 5769 §2: the password of the test vectors, so that their MESSAGE-INTEGRITY verifies.
STUN_KEY = b"VOkJxbRl1RmTxUk/WvJxBt"
_COMPUTED = ("MESSAGE-INTEGRITY", "FINGERPRINT")


def fuzz_stun(data):
    status, message = _outcome(stun.decode, data)
    _outcome(stun.decode, data, STUN_KEY)
    for buffer_type in (bytearray, memoryview):
        again = _outcome(stun.decode, buffer_type(data))
        if again != (status, message):
            raise Finding(f"stun.decode({buffer_type.__name__}) differs from bytes: {data.hex()}")
    if message is None:
        return
    if not stun.is_stun(data):
        raise Finding(f"decode accepts what is_stun refuses: {data.hex()}")
    # Re-encoding: decode is liberal (long USERNAME, say), so encode may refuse with
    # StunError; what it does encode must decode to the same message, with a key too.
    attributes = {k: v for k, v in message.attributes.items() if k not in _COMPUTED}
    plain = stun.Message(message.method, message.message_class, message.transaction_id,
                         attributes)
    status, encoded = _outcome(stun.encode, plain, STUN_KEY)
    if encoded is None:
        return
    decoded = stun.decode(encoded, STUN_KEY)
    decoded.attributes = {k: v for k, v in decoded.attributes.items() if k not in _COMPUTED}
    if decoded != plain:
        raise Finding(f"STUN round trip changed the message: {data.hex()}\n"
                      f"  decoded:    {plain!r}\n  re-decoded: {decoded!r}")


# --- control -------------------------------------------------------------------------------


def _feed(chunks):
    """Messages from a FrameDecoder fed `chunks`, or ValueError; plus what stays buffered."""
    decoder = control.FrameDecoder()
    messages = []
    for chunk in chunks:
        status, got = _outcome(decoder.feed, chunk)
        if status != "ok":
            # The decoder failed for good: any later feed must fail too.
            if _outcome(decoder.feed, b"\x00\x00\x00\x01{")[0] == "ok":
                raise Finding("FrameDecoder accepted bytes after a failure")
            return "ValueError", messages, 0
        messages.extend(got)
    finished = _outcome(decoder.finish)[0]
    if (finished == "ok") != (decoder.buffered == 0):
        raise Finding("FrameDecoder.finish disagrees with buffered")
    return "ok", messages, decoder.buffered


def _round_trip(message, data):
    status, frame = _outcome(control.encode, message)
    if frame is None:
        # Decoding normalises (addresses, 1e2 -> 100.0), which can lengthen a payload just
        # under the cap past it; nothing else may stop a decoded message from encoding.
        problem = _cap_error(message)
        if "cap" not in problem:
            raise Finding(f"a decoded message does not encode ({problem}): {message!r} "
                          f"from {data.hex()}")
        return
    if control.decode(frame) != message:
        raise Finding(f"control round trip changed {message!r} (input {data.hex()})")


def _cap_error(message):
    try:
        control.encode_payload(message)
    except ValueError as exc:
        return str(exc)
    return ""


def fuzz_control(data):
    # The input as a payload on its own...
    status, message = _outcome(control.decode_payload, data)
    if message is not None:
        _round_trip(message, data)
    # ...and as a control stream: whole, and cut into chunks of a size the input decides.
    whole = _feed([data])
    step = 1 + len(data) % 13
    chunked = _feed([data[i:i + step] for i in range(0, len(data), step)])
    if whole[0] != chunked[0] or (whole[0] == "ok" and whole != chunked):
        raise Finding(f"FrameDecoder: whole and chunked feeds differ on {data.hex()}\n"
                      f"  whole:   {whole!r}\n  chunked: {chunked!r}")
    if whole[0] == "ok":
        for m in whole[1]:
            _round_trip(m, data)
        if len(whole[1]) == 1 and whole[2] == 0:
            if control.decode(data) != whole[1][0]:
                raise Finding(f"control.decode differs from FrameDecoder on {data.hex()}")
        elif _outcome(control.decode, data)[0] == "ok":
            raise Finding(f"control.decode accepted other than one frame: {data.hex()}")


# --- relay frames --------------------------------------------------------------------------


def fuzz_relay(data):
    status, frame = _outcome(relay.decode_frame, data)
    for buffer_type in (bytearray, memoryview):
        if _outcome(relay.decode_frame, buffer_type(data)) != (status, frame):
            raise Finding(f"decode_frame({buffer_type.__name__}) differs: {data.hex()}")
    well_formed = (len(data) > relay.HEADER_LEN and data[0] == relay.FRAME_TYPE)
    if (frame is not None) != well_formed:
        raise Finding(f"decode_frame: {status} for {data.hex()}")
    if frame is not None:
        session_id, token, inner = frame
        if relay.encode_frame(session_id, inner, token) != data:
            raise Finding(f"relay frame round trip changed {data.hex()}")
    if not data or data[0] != relay.FRAME_TYPE:
        return
    # The routers route by session id alone (the relay engine checks the sender's token; a
    # node's session drops what does not decrypt): they relay exactly the 0x10 datagrams
    # longer than type byte + session id.
    routable = len(data) > 1 + relay.SESSION_ID_LEN
    for module in (_HOT_COMPILED, _HOT_PURE):
        if module is None:
            continue
        router = module.Router()
        if len(data) > relay.SESSION_ID_LEN:
            router.add_session(data[1:1 + relay.SESSION_ID_LEN], "entry")
        result = router.dispatch([(data, ADDR)])
        relayed = [(e, bytes(d)) for e, d, _ in result.relay]
        if relayed != ([("entry", data)] if routable else []):
            raise Finding(f"{module.__name__}.Router relays {relayed!r} for {data.hex()}")


# --- relay engine --------------------------------------------------------------------------

ENGINE_SID = bytes.fromhex("0123456789abcdef")  # session between members A and B
HALF_SID = bytes.fromhex("fedcba9876543210")  # session whose member B is unknown
# Each member's relay token: a frame is relayed only from a member's address with its token.
TOKEN_A = bytes.fromhex("a1a1a1a1a1a1a1a1")
TOKEN_B = bytes.fromhex("b2b2b2b2b2b2b2b2")
ENGINE_MAX_DATAGRAM = (65535, 100)  # flags bit 0 picks; 100 makes long frames "truncated"
_WAIT = 2.0  # seconds; loopback delivery is immediate, this only bounds a failure


class _EngineBench:
    """Sockets A, B and a stranger, shared by one engine per (twin, max_datagram)."""

    def __init__(self):
        self.peers = [self._udp() for _ in range(3)]  # A, B, stranger
        self.names = [s.getsockname() for s in self.peers]
        self.engines = {}
        for name, module in zip(("compiled", "pure"), twins("relay")):
            if module is None:
                continue
            for max_datagram in ENGINE_MAX_DATAGRAM:
                sock = self._udp()
                engine = module.RelayEngine(sock, batch_size=32, max_datagram=max_datagram)
                engine.add_session(ENGINE_SID, self.names[0], self.names[1], TOKEN_A, TOKEN_B)
                engine.add_session(HALF_SID, self.names[0], None, TOKEN_A, TOKEN_B)
                self.engines[name, max_datagram] = (engine, sock)

    @staticmethod
    def _udp():
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        return sock

    def _who(self, addr):
        return self.names.index(addr) if addr in self.names else addr

    def _drain(self, sock):
        got = []
        while True:
            try:
                got.append(sock.recvfrom(70000))
            except BlockingIOError:
                return got

    def run(self, name, max_datagram, sent):
        """What the engine did with `sent` [(peer index, datagram)]: counter deltas, the
        datagrams poll returned, and the datagrams each peer received."""
        engine, sock = self.engines[name, max_datagram]
        for peer in self.peers:
            self._drain(peer)
        before = engine.counters()
        for peer, datagram in sent:
            self.peers[peer].sendto(datagram, sock.getsockname())
        returned = []
        deadline = time.monotonic() + _WAIT
        while engine.counters()["received"] - before["received"] < len(sent):
            returned.extend(engine.poll())
            if engine.last_batch_size == 0:
                if time.monotonic() > deadline:
                    raise Finding(f"{name} engine received "
                                  f"{engine.counters()['received'] - before['received']} "
                                  f"of {len(sent)} datagrams")
                select.select([sock], [], [], 0.05)
        after = engine.counters()
        delta = {key: after[key] - before[key] for key in after}
        arrived = [[] for _ in self.peers]
        deadline = time.monotonic() + _WAIT
        while True:
            for i, peer in enumerate(self.peers):
                arrived[i].extend((d, self._who(a)) for d, a in self._drain(peer))
            if sum(map(len, arrived)) >= delta["relayed_packets"]:
                break
            if time.monotonic() > deadline:
                raise Finding(f"{name} engine relayed {delta['relayed_packets']} frames, "
                              f"{sum(map(len, arrived))} arrived")
            select.select(self.peers, [], [], 0.05)
        return {"counters": delta, "returned": [(d, self._who(a)) for d, a in returned],
                "arrived": arrived}


_BENCH = None


def fuzz_relay_engine(data):
    global _BENCH
    if _BENCH is None:
        _BENCH = _EngineBench()
    flags, datagrams = _records(data, limit=16)
    # Each record's first byte picks the sender (A, B or a stranger); the rest is sent.
    sent = [(d[0] % 3, d[1:]) for d in datagrams if d]
    max_datagram = ENGINE_MAX_DATAGRAM[flags & 1]
    pure = _BENCH.run("pure", max_datagram, sent)
    # What a relay must do, from the pure engine: frames of ENGINE_SID from A or B, each with
    # its own token, reach the other member unchanged (and nothing else reaches anyone).
    expected = [[], [], []]
    for peer, d in sent:
        if (len(d) <= max_datagram and len(d) > relay.HEADER_LEN and d[0] == relay.FRAME_TYPE
                and d[1:1 + relay.SESSION_ID_LEN] == ENGINE_SID and peer in (0, 1)
                and d[1 + relay.SESSION_ID_LEN:relay.HEADER_LEN] == (TOKEN_A, TOKEN_B)[peer]):
            expected[1 - peer].append((d, "engine"))
    got = [[(d, "engine") for d, _ in arrived] for arrived in pure["arrived"]]
    if got != expected:
        raise Finding(f"pure relay engine delivered {got!r}, expected {expected!r}")
    if ("compiled", max_datagram) in _BENCH.engines:
        compiled = _BENCH.run("compiled", max_datagram, sent)
        for result in (pure, compiled):  # the engines have different addresses
            result["arrived"] = [[(d, "engine") for d, _ in a] for a in result["arrived"]]
        _agree("RelayEngine.poll", data, compiled, pure)


TARGETS = {
    "hot": fuzz_hot,
    "router": fuzz_router,
    "stun": fuzz_stun,
    "control": fuzz_control,
    "relay": fuzz_relay,
    "relay_engine": fuzz_relay_engine,
}
