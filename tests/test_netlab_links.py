"""Links with delay, jitter and loss in the lab (netlab/wire.py), proved with probes.

A public host reaches an echo server on another through a link of each preset; UDP probes
(numbered, sent at a steady pace) measure the round trip and the loss. Each wire draws its
delays and losses from a fixed seed, so a run repeats exactly. Measured RTT and loss must be
within 10 % of the setting (RTT within 1 ms for links that add little).
"""

import statistics
import struct
import time

import pytest

from netlab import lab  # noqa: F401 - the fixture
from netlab import wire

ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(2048)
    s.sendto(data, addr)
"""
ECHO_PORT = 7007
WARM_UP = 0xFFFFFFFF


def probe(lab, link, count, interval):
    """(RTTs in s of the probes answered, fraction lost) across a link."""
    import subprocess

    server = lab.public_host()
    client = lab.public_host(link=link)
    proc = server.python(ECHO, str(ECHO_PORT), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    sock = client.udp_socket()
    sock.setblocking(False)
    sent_at, rtts = {}, {}
    settings = wire.settings(link)
    drain = 3 * (settings.get("rtt_ms", 0) + settings.get("jitter_ms", 0)) / 1000 + 0.3
    _warm_up(sock, (server.ip, ECHO_PORT), drain)
    start = time.monotonic()
    for seq in range(count):
        due = start + seq * interval
        while (now := time.monotonic()) < due:
            _collect(sock, sent_at, rtts)
            time.sleep(min(0.0005, due - now))
        sent_at[seq] = time.monotonic()
        sock.sendto(struct.pack("!I", seq) + bytes(60), (server.ip, ECHO_PORT))
    deadline = time.monotonic() + drain
    while time.monotonic() < deadline:
        _collect(sock, sent_at, rtts)
        time.sleep(0.001)
    return list(rtts.values()), 1 - len(rtts) / count


def _warm_up(sock, addr, wait):
    """Until an echo comes back: ARP is resolved across the link before probes count (the
    first probes would wait one link RTT for it)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        sock.sendto(struct.pack("!I", WARM_UP), addr)
        answer_by = time.monotonic() + wait
        while time.monotonic() < answer_by:
            try:
                if struct.unpack("!I", sock.recv(2048)[:4])[0] == WARM_UP:
                    time.sleep(wait)  # let late warm-up echoes pass
                    while True:
                        try:
                            sock.recv(2048)
                        except BlockingIOError:
                            return
            except BlockingIOError:
                time.sleep(0.001)
    raise AssertionError("no echo across the link within 10 s")


def _collect(sock, sent_at, rtts):
    while True:
        try:
            data = sock.recv(2048)
        except BlockingIOError:
            return
        seq = struct.unpack("!I", data[:4])[0]
        if seq in sent_at and seq not in rtts:
            rtts[seq] = time.monotonic() - sent_at[seq]


def round_trip_loss(settings):
    """The chance a probe or its echo is lost, from the link's settings."""
    mean = settings["burst"][0] if "burst" in settings else settings.get("loss", 0.0)
    return 1 - (1 - mean) ** 2


@pytest.mark.parametrize("preset, count, interval", [
    ("lan", 300, 0.002),
    ("wifi", 12000, 0.00025),
    ("lte", 6000, 0.0005),
    ("long", 300, 0.002),
    ("satellite", 300, 0.002),
    ("lossy", 4000, 0.0005),
    ("bursty", 16000, 0.00025),
])
def test_a_link_of_each_preset_measures_as_set(lab, preset, count, interval):
    settings = {**wire.LINKS[preset], "seed": 20261130}
    rtts, lost = probe(lab, settings, count, interval)
    rtt_ms = statistics.mean(rtts) * 1000
    want_ms = settings.get("rtt_ms", 0)
    want_loss = round_trip_loss(settings)
    print(f"{preset}: RTT {rtt_ms:.2f} ms (set {want_ms}), loss {lost:.4f} "
          f"(set {want_loss:.4f}), {count} probes")
    assert abs(rtt_ms - want_ms) <= max(0.1 * want_ms, 1.0), (rtt_ms, want_ms)
    if want_loss:
        assert abs(lost - want_loss) <= 0.1 * want_loss, (lost, want_loss)
    else:
        assert lost == 0
    if settings.get("jitter_ms"):
        spread = (max(rtts) - min(rtts)) * 1000
        assert 0.5 * settings["jitter_ms"] <= spread <= 2.5 * settings["jitter_ms"], spread


def test_bursty_loss_comes_in_bursts(lab):
    """Gilbert-Elliott: the same mean loss as `lossy` in runs of about four frames, where
    random loss rarely loses two probes in a row."""
    runs = {}
    for preset in ("lossy", "bursty"):
        settings = {**wire.LINKS[preset], "seed": 7}
        server_lost = _lost_runs(lab, settings)
        runs[preset] = server_lost
    assert statistics.mean(runs["bursty"]) > 2.0 * statistics.mean(runs["lossy"]), runs


def _lost_runs(lab, settings, count=4000, interval=0.0005):
    """Lengths of the runs of consecutive lost probes (one-way: probes, not echoes)."""
    import subprocess

    server = lab.public_host()
    client = lab.public_host(link=settings)
    sink = server.python("""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(2.0)
print("ready", flush=True)
got = set()
try:
    while True:
        got.add(int.from_bytes(s.recv(64)[:4], "big"))
except socket.timeout:
    pass
print(" ".join(map(str, sorted(got))), flush=True)
""", str(ECHO_PORT), stdout=subprocess.PIPE, text=True)
    assert sink.stdout.readline().strip() == "ready"
    sock = client.udp_socket()
    start = time.monotonic()
    for seq in range(count):
        while time.monotonic() < start + seq * interval:
            pass
        sock.sendto(struct.pack("!I", seq), (server.ip, ECHO_PORT))
    got = {int(v) for v in sink.stdout.readline().split()}
    runs, current = [], 0
    for seq in range(count):
        if seq in got:
            if current:
                runs.append(current)
            current = 0
        else:
            current += 1
    return runs or [0]
