"""Links with delay, jitter and loss in the lab (netlab/wire.py), proved with probes.

A public host reaches an echo server on another through a link of each preset; UDP probes
(numbered, sent at a steady pace) measure the round trip and the loss. Each wire draws its
delays and losses from a fixed seed, so a run repeats exactly. Measured RTT and loss must be
within 10 % of the setting (RTT within 1 ms for links that add little).

Bursty loss is a state that moves with the clock (fades of a duration), so its probes must
span many fades: 15 s of them for `bursty`, whose fades come about every 0.6 s. The model is
also checked on its own, without a lab, over 1000 simulated seconds.
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
    server = lab.public_host()
    client = lab.public_host(link=link)
    echo(server)
    sock = client.udp_socket()
    sock.setblocking(False)
    return measure(sock, server, link, count, interval)


def echo(host):
    """Start a UDP echo server on `host`:ECHO_PORT."""
    import subprocess

    proc = host.python(ECHO, str(ECHO_PORT), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"


def measure(sock, server, link, count, interval):
    """(RTTs in s of the probes answered, fraction lost) from `sock` to an echo on `server`,
    across a link of settings `link`."""
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
    ("bursty", 15000, 0.001),
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
        # From the 1st to the 99th percentile: a scheduling hiccup of the forwarder (one
        # process on a shared machine) delays a few probes, and is no jitter of the link.
        ordered = sorted(rtts)
        spread = (ordered[len(ordered) * 99 // 100] - ordered[len(ordered) // 100]) * 1000
        assert 0.5 * settings["jitter_ms"] <= spread <= 2.5 * settings["jitter_ms"], spread


def test_bursty_loss_comes_in_fades_of_a_duration(lab):
    """`bursty` loses whatever is sent during a fade: probes every 1 ms are lost in runs that
    last about the set 30 ms (about 30 probes), where random loss (`lossy`, the same mean)
    rarely loses two probes in a row."""
    runs = {}
    for preset in ("lossy", "bursty"):
        settings = {**wire.LINKS[preset], "seed": 7}
        runs[preset] = _lost_runs(lab, settings, count=10000, interval=0.001)
    burst_ms = statistics.mean(runs["bursty"]) * 1.0  # probes 1 ms apart
    print(f"lost runs: lossy mean {statistics.mean(runs['lossy']):.2f} probes; bursty mean "
          f"{burst_ms:.1f} ms over {len(runs['bursty'])} fades (set "
          f"{wire.LINKS['bursty']['burst'][1]} ms)")
    assert statistics.mean(runs["lossy"]) < 1.2, runs["lossy"]
    assert 0.5 * 30 <= burst_ms <= 2 * 30, runs["bursty"]
    assert len(runs["bursty"]) >= 8, runs["bursty"]


def test_bursts_last_a_time_not_a_number_of_frames():
    """The model alone, on a simulated clock (1000 s): mean loss within 5 % of the setting and
    fades of the set mean length for a flow of a frame every ms; and a sparse flow (a frame
    every 0.5 s, as keepalives) loses single frames, not runs: a fade is over long before the
    next frame, so losing one says next to nothing about the next."""
    mean, burst_ms = wire.LINKS["bursty"]["burst"]
    frame = bytes(wire.VNET_HDR_LEN + 100)
    dense = wire.Direction(None, wire.conf("bursty"), seed=3, now=0.0)
    lost = [dense.admit(frame, i * 0.001) is None for i in range(1_000_000)]
    runs = _runs(lost)
    print(f"dense: loss {sum(lost) / len(lost):.4f}, fades {statistics.mean(runs):.1f} ms")
    assert abs(sum(lost) / len(lost) - mean) <= 0.05 * mean
    assert abs(statistics.mean(runs) - burst_ms) <= 0.1 * burst_ms
    sparse = wire.Direction(None, wire.conf("bursty"), seed=4, now=0.0)
    lost = [sparse.admit(frame, i * 0.5) is None for i in range(20000)]
    after_loss = [b for a, b in zip(lost, lost[1:]) if a]
    print(f"sparse: loss {sum(lost) / len(lost):.4f}, lost after a loss "
          f"{sum(after_loss)}/{len(after_loss)}")
    assert abs(sum(lost) / len(lost) - mean) <= 0.15 * mean
    assert sum(after_loss) / len(after_loss) < 2 * mean


def _runs(lost):
    """Lengths of the runs of True in `lost`."""
    runs, current = [], 0
    for bad in lost:
        if bad:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


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
    return _runs([seq not in got for seq in range(count)]) or [0]


def test_spared_hosts_cross_the_link_unharmed(lab):
    """One link, two peers: the one in `spare` sees no delay and no loss, the other the link's
    100 ms and 20 % loss (as a poor path between two ISPs, while both reach the intermediate
    well)."""
    far, spared = lab.public_host(), lab.public_host()
    echo(far)
    echo(spared)
    link = {"rtt_ms": 100, "loss": 0.1, "spare": [spared.ip], "seed": 5}
    client = lab.public_host(link=link)
    sock = client.udp_socket()
    sock.setblocking(False)
    rtts_far, lost_far = measure(sock, far, link, 400, 0.002)
    rtts_spared, lost_spared = measure(sock, spared, link, 400, 0.002)
    far_ms, spared_ms = statistics.mean(rtts_far) * 1000, statistics.mean(rtts_spared) * 1000
    print(f"far: RTT {far_ms:.2f} ms, loss {lost_far:.3f}; spared: RTT {spared_ms:.2f} ms, "
          f"loss {lost_spared:.3f}")
    assert abs(far_ms - 100) <= 10, far_ms
    assert abs(lost_far - round_trip_loss(link)) <= 0.05, lost_far
    assert spared_ms <= 1.0 and max(rtts_spared) < 0.01, rtts_spared
    assert lost_spared == 0


def test_a_link_changed_while_it_runs_measures_as_newly_set(lab):
    """site.set_link() mid-run: the RTT follows the new setting within 10 %, both ways (worse,
    then better); a probe already on the way keeps the delay it was given."""
    server = lab.public_host()
    echo(server)
    client_site = lab.site("none", link={"rtt_ms": 20})
    sock = client_site.host.udp_socket()
    sock.setblocking(False)
    for rtt_ms in (20, 200, 40):
        if rtt_ms != 20:
            client_site.set_link({"rtt_ms": rtt_ms})
        rtts, lost = measure(sock, server, {"rtt_ms": rtt_ms}, 200, 0.002)
        got_ms = statistics.mean(rtts) * 1000
        print(f"set {rtt_ms} ms: RTT {got_ms:.2f} ms")
        assert abs(got_ms - rtt_ms) <= 0.1 * rtt_ms and lost == 0, (got_ms, rtt_ms, lost)
    # A probe sent at 300 ms (150 each way), then the link is cut to none at once: the probe
    # keeps its 150 ms out, its echo comes back through the new, clean link.
    client_site.set_link({"rtt_ms": 300})
    _warm_up(sock, (server.ip, ECHO_PORT), 1.0)
    sent = time.monotonic()
    sock.sendto(struct.pack("!I", 1) + bytes(60), (server.ip, ECHO_PORT))
    client_site.set_link("lan")
    sock.setblocking(True)
    sock.settimeout(2.0)
    assert struct.unpack("!I", sock.recv(2048)[:4])[0] == 1
    rtt_ms = (time.monotonic() - sent) * 1000
    print(f"probe queued before the change: RTT {rtt_ms:.2f} ms")
    assert 140 <= rtt_ms <= 200, rtt_ms
