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
  burst       bursts instead: (mean loss, mean burst length in ms). A Gilbert-Elliott
              channel in time: each way is good or bad, for spells drawn from exponential
              distributions (bad: the burst length; good: so long that the link is bad
              `mean loss` of the time), and every frame that arrives in a bad spell is lost.
              The state moves on with the clock, not with frames: a fade of 30 ms loses
              whatever is sent in those 30 ms, a few frames of a bulk flow or one keepalive
              of a sparse one, as a Wi-Fi or LTE fade does.
  rate_kbit   line rate each way (0: none)
  spare       addresses (IPv4 or IPv6) whose frames pass unharmed: a frame whose IP source or
              destination is one of them (for ARP: sender or target address) is sent on at
              once, with no delay, loss or rate. Other frames, ARP and NDP included, get the
              link's character. A link then models a poor path to some hosts only: between two
              ISPs that peer badly, while both have a good path to the intermediate.
A seed makes the drawn delays and losses repeat from run to run (one generator each way).

    python wire.py IFACE_A IFACE_B --rtt-ms 60 --jitter-ms 10 --loss 0.01 --seed 1

With --control, stdin takes new settings while the link runs: one JSON object a line (the keys
above; a preset's name as a JSON string also works), answered on stdout with `ok` once they
apply or `error: …`. They apply to frames that arrive from then on; frames already queued keep
the delay they were given (and frames keep their order, so after the delay is cut new frames
wait behind the last old one). EOF on stdin ends the link.
"""

import argparse
import heapq
import ipaddress
import json
import os
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
ETH_HLEN = 14
ETHERTYPE_VLAN = (0x8100, 0x88A8)  # 802.1Q / 802.1ad tags: 4 bytes each before the type
ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_ARP = 0x0800, 0x86DD, 0x0806
KEYS = {"rtt_ms", "jitter_ms", "loss", "burst", "rate_kbit", "spare", "seed"}

# What the presets model. Delays are round trips added by the one link; losses are per
# direction. `lan` is a clean link (it still goes through the wire: its own cost is a few
# tens of microseconds).
LINKS = {
    "lan": {},
    "wifi": {"rtt_ms": 20, "loss": 0.005},
    "lte": {"rtt_ms": 60, "jitter_ms": 10, "loss": 0.01},
    "long": {"rtt_ms": 150},
    "satellite": {"rtt_ms": 600},
    "bursty": {"rtt_ms": 20, "burst": (0.05, 30.0)},  # 30 ms fades, 5 % of the time
    "lossy": {"rtt_ms": 20, "loss": 0.05},
}


def settings(link):
    """The settings of ``link``: a preset name or a dict of settings (presets' keys)."""
    if isinstance(link, str):
        if link not in LINKS:
            raise ValueError(f"unknown link preset {link!r}; choose one of {', '.join(LINKS)}")
        return dict(LINKS[link])
    unknown = set(link) - KEYS
    if unknown:
        raise ValueError(f"unknown link settings {sorted(unknown)}")
    link = dict(link)
    if "spare" in link:
        if isinstance(link["spare"], str):
            raise ValueError("spare is a list of addresses, not one string")
        link["spare"] = [str(ipaddress.ip_address(a)) for a in link["spare"]]
    return link


def argv(link, seed=None):
    """Command-line arguments for this program from a preset or settings."""
    s = settings(link)
    args = ["--rtt-ms", str(s.get("rtt_ms", 0)), "--jitter-ms", str(s.get("jitter_ms", 0)),
            "--loss", str(s.get("loss", 0.0)), "--rate-kbit", str(s.get("rate_kbit", 0))]
    if "burst" in s:
        mean, length = s["burst"]
        args += ["--burst", f"{mean},{length}"]
    if s.get("spare"):
        args += ["--spare", ",".join(s["spare"])]
    seed = s.get("seed", seed)
    if seed is not None:
        args += ["--seed", str(seed)]
    return args


def spared(frame, spare):
    """True if `frame` (virtio-net header, then Ethernet) is IPv4, IPv6 or ARP with a source or
    destination address in `spare` (a set of packed addresses)."""
    if not spare:
        return False
    off = VNET_HDR_LEN + ETH_HLEN
    ethertype = int.from_bytes(frame[off - 2:off], "big")
    while ethertype in ETHERTYPE_VLAN:
        off += 4
        ethertype = int.from_bytes(frame[off - 2:off], "big")
    if ethertype == ETHERTYPE_IPV4:
        return frame[off + 12:off + 16] in spare or frame[off + 16:off + 20] in spare
    if ethertype == ETHERTYPE_IPV6:
        return frame[off + 8:off + 24] in spare or frame[off + 24:off + 40] in spare
    if ethertype == ETHERTYPE_ARP:  # Ethernet/IPv4 ARP: sender at 14, target at 24
        return frame[off + 14:off + 18] in spare or frame[off + 24:off + 28] in spare
    return False


def conf(link):
    """What a Direction needs from settings (a preset name or a dict of them)."""
    s = settings(link)
    burst = s.get("burst")
    if burst is not None:
        burst = _burst(",".join(map(str, burst)))
    return {"rtt_ms": float(s.get("rtt_ms", 0)), "jitter_ms": float(s.get("jitter_ms", 0)),
            "loss": float(s.get("loss", 0.0)), "burst": burst,
            "rate_kbit": float(s.get("rate_kbit", 0)),
            "spare": {ipaddress.ip_address(a).packed for a in s.get("spare", ())}}


class Direction:
    """One way of the link: its loss state, the time its line is busy until."""

    def __init__(self, out, conf_, seed, now=None):
        self.out = out
        # Losses and jitter from generators of their own: which frames are lost depends on
        # the frames' order only, not on when jitter happens to be drawn.
        self.rng = random.Random(seed)
        self.jitter_rng = random.Random(None if seed is None else seed + 1000)
        # Bursts from a generator of their own too: the spells' lengths depend on the seed
        # only, so a seeded link is bad at the same times (from its start) in every run.
        self.burst_rng = random.Random(None if seed is None else seed + 2000)
        self.bad = False
        self.spell_ends = None  # when the present good or bad spell ends (monotonic s)
        self.jitter_since = -JITTER_SLOT
        self.jitter_now = 0.0
        self.last_release = 0.0
        self.busy_until = 0.0
        self.queued = 0
        self.counts = {"frames": 0, "lost": 0, "queue_drops": 0, "oversize": 0, "spared": 0}
        self.configure(conf_, now)

    def configure(self, conf_, now=None):
        """Apply settings (from conf()) to the frames that arrive from `now` (monotonic s, by
        default the present) on."""
        self.one_way = conf_["rtt_ms"] / 2000.0
        self.jitter = conf_["jitter_ms"] / 2000.0
        self.jitter_since = -JITTER_SLOT  # a new jitter is drawn for the next frame
        self.loss = conf_["loss"]
        self.rate = conf_["rate_kbit"] * 1000 / 8.0  # bytes/s
        self.spare = conf_["spare"]
        self.burst = None
        if conf_["burst"]:
            mean, length_ms = conf_["burst"]
            bad = length_ms / 1000.0
            # P(bad) = bad / (bad + good) = mean loss: mean spells of bad and good.
            self.burst = (bad, bad * (1.0 - mean) / mean)
            if self.spell_ends is None:  # the first spell: good or bad as the mean says
                self.bad = self.burst_rng.random() < mean
                self.spell_ends = (time.monotonic() if now is None else now) + self._spell()
        else:
            self.bad = False
            self.spell_ends = None

    def _spell(self):
        """A length for a spell of the present state (s)."""
        return self.burst_rng.expovariate(1.0 / self.burst[0 if self.bad else 1])

    def bad_at(self, now):
        """Whether the link is in a bad spell at `now`, moving through the spells since."""
        while now >= self.spell_ends:
            self.bad = not self.bad
            self.spell_ends += self._spell()
        return self.bad

    def admit(self, frame, now):
        """When the frame leaves the far end, or None if the link loses it."""
        self.counts["frames"] += 1
        if self.burst is not None:
            lost = self.bad_at(now)
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
    mean, length_ms = (float(v) for v in text.split(","))
    if not 0 < mean < 1 or length_ms <= 0:
        raise ValueError("burst is MEAN_LOSS,MEAN_BURST_MS (0 < loss < 1, ms > 0)")
    return mean, length_ms


def _spare(text):
    return [str(ipaddress.ip_address(a)) for a in text.split(",") if a]


def _control(buf, data, ways):
    """Apply each whole line of settings in `buf + data`; return what is left of a line."""
    buf += data
    while b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        if not line.strip():
            continue
        try:
            new = conf(json.loads(line))
        except (ValueError, TypeError) as exc:
            print(f"error: {exc}", flush=True)
            continue
        for _sock, way in ways.values():
            way.configure(new)
        print("ok", flush=True)
    return buf


def main(argv_=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("iface_a")
    parser.add_argument("iface_b")
    parser.add_argument("--rtt-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--burst", type=str, default=None)
    parser.add_argument("--rate-kbit", type=float, default=0.0)
    parser.add_argument("--spare", type=_spare, default=[])
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--control", action="store_true",
                        help="read new settings from stdin, one JSON object a line")
    args = parser.parse_args(argv_)
    start = {"rtt_ms": args.rtt_ms, "jitter_ms": args.jitter_ms, "loss": args.loss,
             "rate_kbit": args.rate_kbit, "spare": args.spare}
    if args.burst:
        start["burst"] = args.burst.split(",")
    try:
        start = conf(start)
    except ValueError as exc:
        parser.error(str(exc))
    # One generator each way: what a direction draws depends on its own frames only, so a
    # seeded run repeats whatever the timing of the other direction.
    seeds = (None, None) if args.seed is None else (args.seed, args.seed + 1)
    a, b = _packet_socket(args.iface_a), _packet_socket(args.iface_b)
    ways = {a.fileno(): (a, Direction(b, start, seeds[0])),
            b.fileno(): (b, Direction(a, start, seeds[1]))}
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    heap = []  # (release time, seq, frame, direction)
    seq = 0
    control = [sys.stdin.fileno()] if args.control else []
    pending = b""
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
            readable, _, _ = select.select([a, b, *control], [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for sock in readable:
            if control and sock == control[0]:
                data = os.read(control[0], 65536)
                if not data:
                    stop.append(True)
                pending = _control(pending, data, ways)
                continue
            _sock, way = ways[sock.fileno()]
            for _ in range(256):
                try:
                    frame, addr = sock.recvfrom(MAX_FRAME)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue
                if spared(frame, way.spare):  # no queue, no wait
                    way.counts["spared"] += 1
                    try:
                        way.out.send(frame)
                    except OSError:
                        way.counts["oversize"] += 1
                    continue
                release = way.admit(frame, now)
                if release is None:
                    continue
                seq += 1
                way.queued += 1
                heapq.heappush(heap, (release, seq, frame, way))
    counts = {"a_to_b": ways[a.fileno()][1].counts, "b_to_a": ways[b.fileno()][1].counts}
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
