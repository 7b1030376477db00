"""A link with the character of a real one, for the lab: delay, jitter, random or bursty loss
and a rate limit, between two interfaces of a "wire" namespace.

This kernel has no netem, so the lab builds such links in user space: the two ends of a link
are veth pairs into a namespace of their own, and this program (one process per link) copies
every Ethernet frame from one interface to the other through AF_PACKET sockets, after a delay
drawn per frame, unless the loss model drops it. Frames keep their order (the delay of a frame
is never shorter than the one before it in the same direction, as on a real wire); a rate
limit serializes them and drops beyond a queue of `QUEUE_LIMIT` frames (tail drop).

Settings are per link and apply to each direction alike:
  rtt_ms      round-trip delay the link adds (half each way)
  jitter_ms   ± that much on the round trip (uniform, half each way, drawn anew every
              JITTER_SLOT seconds)
  loss        chance that a frame is lost, each way, independently (0-1)
  burst       Gilbert-Elliott bursts instead: (mean loss, mean burst length in frames);
              a frame is lost in the bad state and passes in the good one
  rate_kbit   line rate each way (0: none)
A seed makes the drawn delays and losses repeat from run to run (one generator each way).

    python wire.py IFACE_A IFACE_B --rtt-ms 60 --jitter-ms 10 --loss 0.01 --seed 1
"""

import argparse
import heapq
import json
import random
import select
import signal
import socket
import sys
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
VNET_HDR_LEN = 10  # struct virtio_net_hdr
PACKET_OUTGOING = 4  # the frame was sent by this host (our own copy out): not forwarded
# Jitter is drawn anew every JITTER_SLOT seconds, not per frame: a path's delay wanders
# (queues fill and drain) and frames of one flow keep their order, so a fresh draw for every
# frame, held back behind the one before, would only add the upper half of the jitter.
JITTER_SLOT = 0.02
QUEUE_LIMIT = 1000  # frames waiting for the line each way, with a rate limit
MAX_FRAME = 65536

# What the presets model. Delays are round trips added by the one link; losses are per
# direction. `lan` is a clean link (it still goes through the wire: its own cost is a few
# tens of microseconds).
LINKS = {
    "lan": {},
    "wifi": {"rtt_ms": 20, "loss": 0.005},
    "lte": {"rtt_ms": 60, "jitter_ms": 10, "loss": 0.01},
    "long": {"rtt_ms": 150},
    "satellite": {"rtt_ms": 600},
    "bursty": {"rtt_ms": 20, "burst": (0.05, 4.0)},
    "lossy": {"rtt_ms": 20, "loss": 0.05},
}


def settings(link):
    """The settings of ``link``: a preset name or a dict of settings (presets' keys)."""
    if isinstance(link, str):
        if link not in LINKS:
            raise ValueError(f"unknown link preset {link!r}; choose one of {', '.join(LINKS)}")
        return dict(LINKS[link])
    unknown = set(link) - {"rtt_ms", "jitter_ms", "loss", "burst", "rate_kbit", "seed"}
    if unknown:
        raise ValueError(f"unknown link settings {sorted(unknown)}")
    return dict(link)


def argv(link, seed=None):
    """Command-line arguments for this program from a preset or settings."""
    s = settings(link)
    args = ["--rtt-ms", str(s.get("rtt_ms", 0)), "--jitter-ms", str(s.get("jitter_ms", 0)),
            "--loss", str(s.get("loss", 0.0)), "--rate-kbit", str(s.get("rate_kbit", 0))]
    if "burst" in s:
        mean, length = s["burst"]
        args += ["--burst", f"{mean},{length}"]
    seed = s.get("seed", seed)
    if seed is not None:
        args += ["--seed", str(seed)]
    return args


class Direction:
    """One way of the link: its loss state, the time its line is busy until."""

    def __init__(self, out, args, seed):
        self.out = out
        # Losses and jitter from generators of their own: which frames are lost depends on
        # the frames' order only, not on when jitter happens to be drawn.
        self.rng = random.Random(seed)
        self.jitter_rng = random.Random(None if seed is None else seed + 1000)
        self.one_way = args.rtt_ms / 2000.0
        self.jitter = args.jitter_ms / 2000.0
        self.loss = args.loss
        self.rate = args.rate_kbit * 1000 / 8.0  # bytes/s
        self.burst = None
        if args.burst:
            mean, length = args.burst
            leave_bad = 1.0 / length  # bad -> good per frame: bursts of `length` on average
            # Stationary P(bad) = p / (p + r) = mean loss.
            self.burst = (mean * leave_bad / (1.0 - mean), leave_bad)
        self.bad = False
        self.jitter_since = -JITTER_SLOT
        self.jitter_now = 0.0
        self.last_release = 0.0
        self.busy_until = 0.0
        self.queued = 0
        self.counts = {"frames": 0, "lost": 0, "queue_drops": 0, "oversize": 0}

    def admit(self, frame, now):
        """When the frame leaves the far end, or None if the link loses it."""
        self.counts["frames"] += 1
        if self.burst is not None:
            enter_bad, leave_bad = self.burst
            self.bad = (self.rng.random() >= leave_bad) if self.bad \
                else (self.rng.random() < enter_bad)
            lost = self.bad
        else:
            lost = self.loss > 0 and self.rng.random() < self.loss
        if lost:
            self.counts["lost"] += 1
            return None
        start = now
        if self.rate:
            if self.queued >= QUEUE_LIMIT:
                self.counts["queue_drops"] += 1
                return None
            start = max(now, self.busy_until)
            self.busy_until = start + (len(frame) - VNET_HDR_LEN) / self.rate
            start = self.busy_until
        if self.jitter and now - self.jitter_since >= JITTER_SLOT:
            self.jitter_since = now
            self.jitter_now = self.jitter_rng.uniform(-self.jitter, self.jitter)
        delay = self.one_way + self.jitter_now
        release = max(start + max(delay, 0.0), self.last_release)  # frames keep their order
        self.last_release = release
        self.queued += 1
        return release


def _packet_socket(ifname):
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    # Frames from a veth may carry a checksum still to be computed (offloaded): with a
    # virtio-net header in front of each frame, received and sent as it came, the kernel
    # completes the checksum on the far side instead of the receiver dropping the frame.
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.bind((ifname, ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.setblocking(False)
    return sock


def _burst(text):
    mean, length = (float(v) for v in text.split(","))
    if not 0 < mean < 1 or length < 1:
        raise argparse.ArgumentTypeError("burst is MEAN_LOSS,MEAN_LENGTH (0<loss<1, len>=1)")
    return mean, length


def main(argv_=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("iface_a")
    parser.add_argument("iface_b")
    parser.add_argument("--rtt-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--burst", type=_burst, default=None)
    parser.add_argument("--rate-kbit", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv_)
    # One generator each way: what a direction draws depends on its own frames only, so a
    # seeded run repeats whatever the timing of the other direction.
    seeds = (None, None) if args.seed is None else (args.seed, args.seed + 1)
    a, b = _packet_socket(args.iface_a), _packet_socket(args.iface_b)
    ways = {a.fileno(): (a, Direction(b, args, seeds[0])),
            b.fileno(): (b, Direction(a, args, seeds[1]))}
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    heap = []  # (release time, seq, frame, direction)
    seq = 0
    print("ready", flush=True)
    while not stop:
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _release, _seq, frame, way = heapq.heappop(heap)
            way.queued -= 1
            try:
                way.out.send(frame)
            except OSError:
                way.counts["oversize"] += 1
        timeout = max(0.0, heap[0][0] - time.monotonic()) if heap else 0.5
        try:
            readable, _, _ = select.select([a, b], [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for sock in readable:
            _sock, way = ways[sock.fileno()]
            for _ in range(256):
                try:
                    frame, addr = sock.recvfrom(MAX_FRAME)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue
                release = way.admit(frame, now)
                if release is not None:
                    seq += 1
                    heapq.heappush(heap, (release, seq, frame, way))
    counts = {"a_to_b": ways[a.fileno()][1].counts, "b_to_a": ways[b.fileno()][1].counts}
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
