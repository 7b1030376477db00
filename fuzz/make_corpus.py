"""Write the seed corpora, fuzz/corpus/<target>/, from the test suite's vectors.

    python fuzz/make_corpus.py     (from the repository root, with the dev venv's python)

Seeds: RFC 5769 STUN vectors and Binding messages (tests/test_stun.py), QUIC packets of a real
aioquic handshake plus Version Negotiation and Retry (tests/quic_samples.py), one control frame
of every message type and a multi-frame stream (tests/test_control.py), relay frames around
each. Every target directory is rewritten; the QUIC packets are random, so the files change.
"""

import pathlib
import shutil
import sys

FUZZ = pathlib.Path(__file__).resolve().parent
ROOT = FUZZ.parent
sys.path[:0] = [str(FUZZ), str(ROOT / "tests")]

import quic_samples  # noqa: E402
import targets  # noqa: E402
import test_control  # noqa: E402
import test_stun  # noqa: E402

from mahole.wire import control, relay, stun  # noqa: E402


def stun_seeds():
    seeds = {f"rfc5769-{i}": v for i, v in enumerate(test_stun.VECTORS)}
    tid = bytes(range(12))
    request = stun.binding_request(tid, username="remote:local", priority=0x6E0001FF,
                                   ice_controlling=7, use_candidate=True, software="mahole")
    seeds["binding-request-signed"] = stun.encode(request, integrity_key=targets.STUN_KEY)
    seeds["binding-request-plain"] = stun.encode(request, fingerprint=False)
    seeds["binding-success-v6"] = stun.encode(
        stun.binding_success(request, ("2001:db8::1", 4433)), integrity_key=targets.STUN_KEY)
    seeds["binding-success-v4-mapped"] = stun.encode(
        stun.binding_success(request, ("::ffff:192.0.2.1", 1)))
    seeds["binding-error-420"] = stun.encode(
        stun.binding_error(request, 420, "Unknown Attribute", unknown_attributes=(0x7777,)))
    seeds["binding-indication"] = stun.encode(stun.binding_indication())
    seeds["unknown-attributes"] = test_stun.raw_message(
        b"\x77\x77\x00\x03abc\x00", b"\x80\x99\x00\x00")
    return seeds


def quic_seeds():
    packets = quic_samples.handshake_packets() + quic_samples.synthetic_packets()
    seeds = {f"aioquic-{i}": p for i, p in enumerate(packets)}
    seeds["short-8"] = b"\x43" + bytes(range(8)) + b"short-header"
    seeds["long-initial-v1"] = (b"\xc3\x00\x00\x00\x01\x08" + bytes(8) + b"\x00"
                                + b"\x00" + b"\x04" + b"abcd")
    seeds["long-handshake-v2"] = (b"\xe0\x6b\x33\x43\xcf\x04abcd\x04efgh"
                                  + b"\x40\x05" + b"12345")
    return seeds


def control_seeds():
    seeds = {f"frame-{i}-{m.TYPE}": control.encode(m) for i, m in enumerate(test_control.SAMPLES)}
    seeds.update({f"payload-{i}-{m.TYPE}": control.encode_payload(m)
                  for i, m in enumerate(test_control.SAMPLES)})
    seeds["stream"] = test_control.STREAM
    return seeds


def write(target, seeds):
    directory = FUZZ / "corpus" / target
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for name, data in seeds.items():
        (directory / name).write_bytes(data)
    print(f"{target}: {len(seeds)} seeds in {directory.relative_to(ROOT)}")


def main():
    stun_ = stun_seeds()
    quic = quic_seeds()
    sid, half = targets.ENGINE_SID, targets.HALF_SID
    a, b = targets.TOKEN_A, targets.TOKEN_B
    frames = {f"frame-{name}": relay.encode_frame(sid, data, a)
              for name, data in list(quic.items())[:3] + list(stun_.items())[:2]}
    frames.update({"header-only": b"\x10" + sid + a, "type-only": b"\x10",
                   "one-byte": b"\x10" + sid + a + b"x", "no-token": b"\x10" + sid + b"x"})

    write("stun", stun_)
    write("hot", {**quic, "stun": stun_["rfc5769-0"], "relay": frames["one-byte"]})
    write("control", control_seeds())
    write("relay", frames)

    mixed = [quic["aioquic-0"], quic["short-8"], stun_["rfc5769-0"], frames["one-byte"],
             quic["long-initial-v1"], b"", b"\x20junk"]
    router = {f"flags-{flags:02x}": targets.records(flags, mixed)
              for flags in (0x00, 0xF0, 0x35, 0xA6, 0xFB)}
    router["handshake"] = targets.records(0xF0, list(quic_samples.handshake_packets()[:8]))
    write("router", router)

    def sent(*items):  # (sender index, datagram)
        return [bytes((peer,)) + d for peer, d in items]

    engine = {
        "a-to-b": targets.records(0, sent((0, frames["one-byte"]),
                                          (1, relay.encode_frame(sid, b"back", b)))),
        "gso-run": targets.records(0, sent(*[(0, relay.encode_frame(sid, bytes(40), a))] * 5,
                                           (0, relay.encode_frame(sid, bytes(10), a)))),
        "mixed": targets.records(1, sent((2, frames["one-byte"]), (0, stun_["rfc5769-0"]),
                                         (0, relay.encode_frame(half, b"nobody", a)),
                                         (1, b"\x10" + sid + b), (0, b""),
                                         (1, relay.encode_frame(sid, bytes(200), b)))),
        "wrong-token": targets.records(0, sent((0, relay.encode_frame(sid, b"spoof", b)),
                                               (1, relay.encode_frame(sid, b"spoof", a)),
                                               (2, relay.encode_frame(sid, b"spoof", a)))),
    }
    write("relay_engine", engine)


if __name__ == "__main__":
    main()
