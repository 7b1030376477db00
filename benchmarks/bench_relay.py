"""Relay forwarding rate on loopback: mahole's RelayEngine against coturn (TURN ChannelData).

    python benchmarks/bench_relay.py [--quick] [--allow-twin] [--reps N] [--duration S] [--no-pin]
        [--relay-threads N [--drains-only]] [--flows F] [--receiver-gro]

How it measures. Three processes besides this one, all on 127.0.0.1: a sender, a receiver
and the relay under test. For mahole the relay is benchmarks/_relay_server.py (a RelayEngine
on one UDP socket with one session whose members are the sender and the receiver, each
with its relay token, which the engine checks on every frame as the intermediate does); the
sender sends relay frames (0x10, session id, the sender's relay token, 1200-byte inner packet)
and the receiver gets them unchanged. For coturn the sender makes a TURN allocation (Allocate with the long-term
credential, CreatePermission and ChannelBind for the receiver's address) and sends
ChannelData (4-byte header, the same 1200-byte payload); the receiver gets the payload from
coturn's relayed address. The receiver checks the bytes of the first datagram of every batch.

  saturated  the sender blasts as fast as it can for --duration seconds; reported: packets/s
             forwarded at the receiver (first to last arrival) and the loss.
  lossless   the highest offered rate (a paced sender, binary search from 1.25 x the best
             saturated forwarding rate down) at which less than 0.1% of the packets are lost.

Also measured (not with --quick): "mahole-nogso", the same engine with gso=False, which
sends one datagram per msghdr of its sendmmsg instead of UDP GSO runs, to show what GSO adds.

Fairness. Both relays get the same load: the sender uses UDP GSO to stay cheap (the relays
still receive separate datagrams), the mahole relay asks for the SO_RCVBUF coturn asks for
(2 MiB), and with 3+ CPUs relay, sender and receiver are pinned to CPUs of their own (coturn
with all its threads on the relay's CPU); with fewer the scheduler shares them (--no-pin
forces that). Loopback makes every send pay for the receiving side too, so absolute rates
here are far below a NIC's; the ratio measured in the same run is the result.

Relay threads (--relay-threads N, N > 1). The load is F flows (--flows, default 8): the
sender has F sockets and the receiver F sockets, flow i going from sender socket i to
receiver socket i through a session of its own (for coturn an allocation of its own), so the
kernel's SO_REUSEPORT hash spreads them over the relay's sockets. Four relays are measured
in the same run, interleaved: mahole with 1 and with N relay threads (benchmarks/
_relay_server.py --relay-threads, the intermediate's sockets and threads) and coturn with
--relay-threads 1 and N; the ratios N/1 (target >= 1.7 on 2 cores, lossless) and mahole/coturn
at the same thread count (target >= 2.0) are reported. For each run the relay process's CPU
(all threads) is read from /proc: "cores" is how much of the machine it had, and CPU us per
packet what forwarding cost it. On a machine with as many cores as relay threads the load
generators take CPU the relay would need: read the cores column next to the rates.
Then (not with --quick) a drain: mahole with 1 and with N threads is stopped (SIGSTOP), the
sender puts 6,000 datagrams a flow into its sockets (256 MiB buffers here, so nothing is
lost), and the relay is let go (SIGCONT): the rate it forwards them at, with no sender
running beside it, is what the threads do with the CPUs the receiver leaves them.
Then "drain, relay alone": the relay AND the receiver are stopped while the sender puts
DRAIN_ALONE_TOTAL datagrams in all (so that one thread drains for about 0.5 s) into the
relay's sockets (1 GiB buffers, SO_RCVBUFFORCE), then only the relay is let go, with
nothing else of the benchmark running: the stopped receiver's sockets (1 GiB too) take
everything it forwards. The drain is over when the relay's receive queues are empty and the
receiver's have stopped growing (/proc/net/udp, every 20 ms); then the receiver is let go and
reads it all, so loss is still checked (lossless: every datagram arrived, no drops at relay
or receiver). The rate comes from the receiver's kernel timestamps (SO_TIMESTAMPNS, taken
when each datagram was put into its socket, by the relay's own send on loopback): exact, and
free while the relay runs, where timing by polling would take CPU from it and be no finer than
the poll. The relay's CPU is summed over its threads (/proc/PID/task/*/schedstat, in ns): its
cores is that over the time from SIGCONT to the last datagram. Two things kept out of the
figure, both measured here: the sender fills flow i from CPU i mod the CPUs, since freeing a buffer
another CPU allocated costs a relay thread about a third more; and the N-thread relay is
restarted (a new port) until the kernel's SO_REUSEPORT hash spreads the flows evenly over its
sockets, since 8 flows split 4:4 on about 1 port in 4 (70 of 256 ways), 5:3 or worse
otherwise, and 5:3 caps 2 threads at 8/5 of one.
The flows each socket got, and every split tried, are reported. coturn is not drained: it
sets its own sockets' buffers, too small to hold a fill. --drains-only runs the two drains
and nothing else (JSON: bench_relay-threads-drains.json).
--receiver-gro sets UDP_GRO on the receiver's sockets, so a UDP GSO run that mahole sends
arrives as one buffer and the receiver costs less (coturn sends datagrams one by one, which
GRO does not merge on loopback): it favours mahole, and is off by default.

Saturated runs alternate between the systems, --reps times each, so drift hits all alike.
Per-socket kernel drop counters (/proc/net/udp) say where packets were lost: at the relay's
socket or at the receiver's. The report gives the ratio mahole/coturn (target >= 2.0:
the relay stays at least twice coturn's rate with the relay-token check on).
coturn is measured only if `turnserver` is on PATH (it runs with -n and its own temporary
files, on non-default loopback ports, and is killed by PID at the end). --quick measures
mahole saturated only, briefly. JSON goes to benchmarks/results/bench_relay.json
(bench_relay-threads.json with --relay-threads N > 1; -quick before .json for --quick).
"""

import argparse
import hashlib
import json
import multiprocessing
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
try:
    import mahole  # noqa: F401 - prefer the installed package
except ImportError:
    sys.path.insert(0, str(HERE.parent))

import _report  # noqa: E402
from mahole import _fast  # noqa: E402
from mahole.wire import stun  # noqa: E402
from mahole.wire.relay import encode_frame  # noqa: E402

NAME = "bench_relay"
INNER_SIZE = 1200  # QUIC clients pad Initial datagrams to at least 1200 bytes (RFC 9000 §14.1)
SESSION_ID = bytes.fromhex("0123456789abcdef")
TOKEN_SENDER = bytes.fromhex("a1a2a3a4a5a6a7a8")  # member A's relay token: on every frame sent
TOKEN_RECEIVER = bytes.fromhex("b1b2b3b4b5b6b7b8")
SENDER_BATCH = 64
RCVBUF_RECEIVER = 32 << 20
# The mahole relay socket's SO_RCVBUF: what coturn asks for its sockets (UR_SERVER_SOCK_BUF_SIZE,
# 64 KiB x 32), so that both relays absorb bursts alike.
RCVBUF_RELAY = 2 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
IDLE = 0.3  # seconds without a datagram: the receiver has everything
LOSSLESS = 0.001  # "lossless" = less than 0.1% lost
TRIAL_S = 0.5  # seconds per lossless trial
SEARCH_STEPS = 6
CEILING_OVER_SATURATED = 1.25  # the search starts at this times the best saturated rx rate
PACE_TICK = 0.001  # the paced sender sends a burst about every millisecond
TARGET = 2.0  # mahole / coturn: at least twice coturn's rate with tokens checked
BUDGET_S = 80.0  # the whole run stays under 90 s
BUDGET_THREADS_S = 170.0  # with --relay-threads: four relays, under three minutes
THREADS_TARGET = 1.7  # mahole with N threads / with one, lossless, on a 2-core machine
DRAIN_REPS = 5
DRAIN_PER_FLOW = 6000  # datagrams a flow puts into the stopped relay
# The drain relay's sockets (SO_RCVBUFFORCE, which the kernel doubles) hold every drain,
# however the flows spread: DRAIN_ALONE_TOTAL x about 2 KiB of kernel memory a datagram.
DRAIN_RCVBUF = 1 << 30
# "Drain, relay alone": datagrams in all, so that one relay thread takes about 0.5 s or more
# (it forwards some 500,000 a second here). The relay's sockets hold them, then the stopped
# receiver's: about 2 x 0.7 GB of kernel memory at the peak, far below this machine's and the
# UDP limit (net.ipv4.udp_mem).
DRAIN_ALONE_TOTAL = 320_000
DRAIN_ALONE_WAIT = 20.0  # seconds a drain may take before the run gives up
DRAIN_ALONE_POLL = 0.02  # seconds between looks at the relay's receive queues
EVEN_TRIES = 12  # relay starts to find an even split of the flows over the sockets
EVEN_PROBE = 2000  # datagrams in all a probe drain puts in, to see the split
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; SCM_TIMESTAMPNS is the same

# TURN (RFC 8656): methods (§17) and attributes (§18); ChannelData (§12.4).
TURN_ALLOCATE, TURN_CREATE_PERMISSION, TURN_CHANNEL_BIND = 0x003, 0x008, 0x009
ATTR_CHANNEL_NUMBER, ATTR_LIFETIME, ATTR_XOR_PEER_ADDRESS = 0x000C, 0x000D, 0x0012
ATTR_REALM, ATTR_NONCE, ATTR_XOR_RELAYED_ADDRESS = 0x0014, 0x0015, 0x0016
ATTR_REQUESTED_TRANSPORT = 0x0019
UDP_TRANSPORT = bytes((17, 0, 0, 0))  # RFC 8656 §18.7: protocol number 17 (UDP), RFFU
CHANNEL = 0x4000  # RFC 8656 §12: channel numbers 0x4000-0x4FFF
TURN_USER, TURN_PASSWORD, TURN_REALM = "u", "p", "mahole"
# RFC 8489 §9.2.2: long-term key = MD5(username ":" realm ":" password).
TURN_KEY = hashlib.md5(f"{TURN_USER}:{TURN_REALM}:{TURN_PASSWORD}".encode()).digest()


def _payload():
    return bytes((0x40 | (i & 0x3F)) if i == 0 else (i * 7) & 0xFF for i in range(INNER_SIZE))


# --- TURN client (sender side) ---------------------------------------------------------------


def _xor_address(addr):
    """XOR-PEER-ADDRESS value for an IPv4 (host, port) (RFC 8489 §14.2)."""
    host, port = addr
    cookie = stun.MAGIC_COOKIE.to_bytes(4, "big")
    x_addr = bytes(a ^ b for a, b in zip(socket.inet_aton(host), cookie))
    return bytes((0, 1)) + (port ^ (stun.MAGIC_COOKIE >> 16)).to_bytes(2, "big") + x_addr


def _unxor_address(value):
    if len(value) != 8 or value[1] != 1:
        raise ValueError(f"expected an IPv4 XOR address, got {value.hex()}")
    cookie = stun.MAGIC_COOKIE.to_bytes(4, "big")
    host = socket.inet_ntoa(bytes(a ^ b for a, b in zip(value[4:8], cookie)))
    return host, int.from_bytes(value[2:4], "big") ^ (stun.MAGIC_COOKIE >> 16)


def _transaction(sock, server, message, key=None, timeout=5.0):
    """Send a STUN request (retransmitting, RFC 8489 §6.2.1) and return the decoded answer."""
    data = stun.encode(message, integrity_key=key)
    deadline = time.monotonic() + timeout
    rto = 0.1
    while time.monotonic() < deadline:
        sock.sendto(data, server)
        wait_until = min(deadline, time.monotonic() + rto)
        while True:
            remaining = wait_until - time.monotonic()
            if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
                break
            reply, _ = sock.recvfrom(65535)
            try:
                answer = stun.decode(reply)
            except ValueError:
                continue
            if answer.transaction_id == message.transaction_id:
                return answer
        rto = min(2 * rto, 1.0)
    raise TimeoutError(f"no TURN answer from {server[0]}:{server[1]} in {timeout:g}s")


def _turn_setup(sock, server, peer):
    """Allocate, CreatePermission and ChannelBind for peer; returns the relayed address."""
    def request(method, attributes, nonce_holder):
        for _ in range(3):  # 401 first, maybe 438 (stale nonce), then the answer
            attrs = dict(attributes)
            if nonce_holder:
                attrs.update({"USERNAME": TURN_USER, ATTR_REALM: nonce_holder["realm"],
                              ATTR_NONCE: nonce_holder["nonce"]})
            message = stun.Message(method, stun.CLASS_REQUEST, attributes=attrs)
            answer = _transaction(sock, server, message, TURN_KEY if nonce_holder else None)
            if answer.message_class == stun.CLASS_SUCCESS:
                return answer
            code, reason = answer.attributes.get("ERROR-CODE", (0, "no ERROR-CODE"))
            if code in (401, 438) and ATTR_NONCE in answer.attributes:
                nonce_holder["realm"] = answer.attributes.get(ATTR_REALM,
                                                              TURN_REALM.encode())
                nonce_holder["nonce"] = answer.attributes[ATTR_NONCE]
                continue
            raise RuntimeError(f"TURN method 0x{method:03x} refused: {code} {reason}")
        raise RuntimeError(f"TURN method 0x{method:03x}: authentication kept failing")

    credentials = {}
    answer = request(TURN_ALLOCATE, {ATTR_REQUESTED_TRANSPORT: UDP_TRANSPORT}, credentials)
    relayed = _unxor_address(answer.attributes[ATTR_XOR_RELAYED_ADDRESS])
    request(TURN_CREATE_PERMISSION, {ATTR_XOR_PEER_ADDRESS: _xor_address(peer)}, credentials)
    request(TURN_CHANNEL_BIND, {ATTR_CHANNEL_NUMBER: CHANNEL.to_bytes(2, "big") + b"\0\0",
                                ATTR_XOR_PEER_ADDRESS: _xor_address(peer)}, credentials)
    return relayed


def channel_data(payload):
    """RFC 8656 §12.4: channel number, length, data (no padding needed over UDP)."""
    return CHANNEL.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload


# --- sender and receiver processes -----------------------------------------------------------


def _pin(cpus):
    if cpus:
        os.sched_setaffinity(0, cpus)


def _sender(conn, cpus, flows):
    """Child process: sends from `flows` sockets (one per flow, each its own source port)
    to whatever relay the parent names, as told."""
    _pin(cpus)
    socks = []
    try:
        for _ in range(flows):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            sock.bind(("127.0.0.1", 0))
        conn.send([sock.getsockname() for sock in socks])
        while True:
            msg = conn.recv()
            if msg[0] == "turn":  # an allocation per flow, each bound to its receiver
                try:
                    relayed = []
                    for sock, peer in zip(socks, msg[2]):
                        sock.setblocking(True)
                        relayed.append(_turn_setup(sock, msg[1], peer))
                    conn.send(("ok", relayed))
                except (OSError, RuntimeError, ValueError) as exc:
                    conn.send(("error", f"{type(exc).__name__}: {exc}"))
                continue
            for sock in socks:
                sock.setblocking(False)
            if msg[0] not in ("blast", "paced", "fill"):
                break
            sends = [_Sends(sock, dest, data) for sock, (dest, data) in zip(socks, msg[1])]
            if msg[0] == "blast":
                conn.send(_blast(sends, msg[2]))
            elif msg[0] == "fill":
                conn.send(_fill(sends, *msg[2:]))
            else:
                conn.send(_paced(sends, msg[2], msg[3]))
    finally:
        for sock in socks:
            sock.close()


class _Sends:
    """send(n): n copies of one datagram to one address, as cheaply as the kernel allows.

    With UDP GSO (UDP_SEGMENT, Linux 4.18+) one sendmsg carries up to GSO_SEGMENTS
    datagrams and the kernel cuts them apart: on loopback that makes the sender about three
    times cheaper than sendmmsg, so the relay, not the load generator, is the bottleneck.
    The relay receives ordinary, separate datagrams either way. Falls back to BatchSocket.
    """

    GSO_SEGMENTS = 48  # 48 x 1209 bytes stays under the 64 KiB of one UDP send

    def __init__(self, sock, dest, data):
        self.sock, self.dest, self.data = sock, dest, data
        self.gso = hasattr(socket, "SOL_UDP")  # until the kernel refuses it
        self.cmsg = [(socket.SOL_UDP, UDP_SEGMENT, len(data).to_bytes(2, sys.byteorder))]
        self.bufs = [data] * self.GSO_SEGMENTS
        self.bsock = _fast.BatchSocket(sock, batch_size=SENDER_BATCH)
        self.full = [(data, dest)] * SENDER_BATCH

    def send(self, n):
        """Send up to n; returns how many went (fewer when the socket buffer is full)."""
        sent = 0
        while sent < n:
            k = min(n - sent, self.GSO_SEGMENTS if self.gso else SENDER_BATCH)
            if self.gso:
                try:
                    self.sock.sendmsg(self.bufs[:k], self.cmsg if k > 1 else [], 0, self.dest)
                    done = k
                except BlockingIOError:
                    done = 0
                except OSError:  # no UDP GSO here: nothing was sent, use sendmmsg
                    self.gso = False
                    continue
            else:
                done = self.bsock.send_batch(self.full[:k])
            sent += done
            if done < k:
                select.select([], [self.sock], [], 0.01)
                break
        return sent


UDP_SEGMENT = 103  # <netinet/udp.h>
UDP_GRO = 104


def _blast(sends, duration):
    """Every flow in turn, as fast as the sockets take it."""
    sent = 0
    start = time.perf_counter()
    end = start + duration
    rounds = max(1, 8 // len(sends))
    while True:
        for _ in range(rounds):
            for flow in sends:
                sent += flow.send(SENDER_BATCH)
        now = time.perf_counter()
        if now >= end:
            return sent, now - start


def _fill(sends, per_flow, spread=False):
    """per_flow datagrams on every flow, as fast as they go (into a stopped relay).

    spread: flow i is sent from CPU i mod the CPUs this process may use. The kernel
    allocates a datagram's buffer on the CPU that sends it and the relay frees it where it
    reads it, and freeing another CPU's buffer costs more (one relay thread drained the same
    datagrams in 0.47-0.59 s of CPU on the sender's CPU, 0.63-0.84 s on the other): spread,
    every relay thread, wherever the scheduler puts it, frees about as many of each."""
    sent = 0
    start = time.perf_counter()
    cpus = sorted(os.sched_getaffinity(0)) if spread and hasattr(os, "sched_setaffinity") else []
    try:
        for i, flow in enumerate(sends):
            if len(cpus) > 1:
                os.sched_setaffinity(0, {cpus[i % len(cpus)]})
            left = per_flow
            while left > 0:
                done = flow.send(min(left, _Sends.GSO_SEGMENTS))
                left -= done
                sent += done
    finally:
        if len(cpus) > 1:
            os.sched_setaffinity(0, cpus)
    return sent, time.perf_counter() - start


def _paced(sends, rate, count):
    """`rate` datagrams a second in all, a burst about every PACE_TICK, the flows in turn."""
    burst = max(1, min(SENDER_BATCH, int(rate * PACE_TICK)))
    sent = 0
    turn = 0
    start = time.perf_counter()
    while sent < count:
        due = start + sent / rate
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        sent += sends[turn % len(sends)].send(min(burst, count - sent))
        turn += 1
    return sent, time.perf_counter() - start


def _receiver(conn, cpus, flows, gro):
    """Child process: counts what arrives on its `flows` sockets in one measurement,
    checking the bytes. With gro (UDP_GRO, Linux 5.0+) a run the relay sent with UDP GSO
    arrives as one buffer of several datagrams: one receive instead of one per datagram."""
    _pin(cpus)
    socks = []
    try:
        for _ in range(flows):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(sock)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_RECEIVER)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_RECEIVER)
            if gro:
                sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
        bsocks = [_fast.BatchSocket(sock, batch_size=64) for sock in socks]
        conn.send([sock.getsockname() for sock in socks])
        while True:
            msg = conn.recv()
            if msg[0] == "alone":  # before the drains with the receiver stopped
                for sock in socks:
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, msg[1])
                    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                conn.send(min(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                              for sock in socks))
            elif msg[0] == "stamped":
                conn.send(_count_stamped(socks, msg[1], 65535 if gro else 2048))
            elif msg[0] == "count":
                conn.send(_count(bsocks, socks, *msg[1:]))
            else:
                break
    finally:
        for sock in socks:
            sock.close()


def _count(bsocks, socks, expected, first_timeout):
    """Datagrams received on every socket until IDLE seconds pass with none; expected[i]:
    what flow i's datagrams are (a GRO buffer holds several of them back to back)."""
    count = bad = 0
    first = last = None
    by_fd = {sock.fileno(): (bsock.recv_batch, want, len(want))
             for sock, bsock, want in zip(socks, bsocks, expected)}
    wait = first_timeout
    while True:
        ready = select.select(socks, [], [], wait)[0]
        if not ready:
            break
        wait = IDLE
        for sock in ready:
            recv_batch, want, size = by_fd[sock.fileno()]
            while True:
                batch = recv_batch()
                if not batch:
                    break
                last = time.perf_counter()
                if first is None:
                    first = last
                for data, _ in batch:
                    count += -(-len(data) // size)
                if batch[0][0][:size] != want:
                    bad += 1
    seconds = (last - first) if count > 1 else 0.0
    return {"received": count, "bad_batches": bad, "seconds": seconds}


def _count_stamped(socks, expected, bufsize):
    """Everything queued on the sockets (until IDLE / 3 passes with nothing more), with the
    kernel's receive timestamps (SO_TIMESTAMPNS) of the first and the last datagram: when
    each was put into its socket, that is when the relay sent it (on loopback the sender's
    system call delivers), not when this process reads it."""
    count = bad = 0
    first = last = None
    space = socket.CMSG_SPACE(16)
    by_fd = {sock.fileno(): (want, len(want)) for sock, want in zip(socks, expected)}
    while select.select(socks, [], [], IDLE / 3)[0]:
        for sock in socks:
            want, size = by_fd[sock.fileno()]
            while True:
                try:
                    data, ancdata, _, _ = sock.recvmsg(bufsize, space)
                except BlockingIOError:
                    break
                count += -(-len(data) // size)
                if data[:size] != want:
                    bad += 1
                for level, kind, value in ancdata:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        sec, nsec = struct.unpack("@ll", value[:16])
                        stamp = sec + nsec * 1e-9
                        first = stamp if first is None else min(first, stamp)
                        last = stamp if last is None else max(last, stamp)
    return {"received": count, "bad_batches": bad, "first": first, "last": last}


# --- the relays under test -------------------------------------------------------------------


def _free_port_range(size):
    """A base port such that UDP base..base+size-1 on 127.0.0.1 are free right now."""
    rng = random.Random()
    for _ in range(50):
        base = rng.randrange(40000, 60000 - size)
        socks = []
        try:
            for port in range(base, base + size):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free UDP port range on 127.0.0.1")


def _flow_session(i):
    """Flow i's session id (flow 0: SESSION_ID)."""
    return SESSION_ID if i == 0 else bytes([0x5A]) + i.to_bytes(7, "big")


class MaholeRelay:
    def __init__(self, sender_addrs, receiver_addrs, allow_twin, cpus, gso=True, threads=0,
                 rcvbuf=RCVBUF_RELAY, suffix=""):
        """threads 0: the single-flow comparison's relay (named mahole / mahole-nogso);
        N >= 1: named "mahole xN", with N sockets and threads."""
        self.name = (("mahole" if gso else "mahole-nogso") if not threads
                     else f"mahole x{threads}") + suffix
        cmd = [sys.executable, str(HERE / "_relay_server.py"),
               "--member-a", "%s:%d" % sender_addrs[0],
               "--member-b", "%s:%d" % receiver_addrs[0],
               "--session", SESSION_ID.hex(), "--token-a", TOKEN_SENDER.hex(),
               "--token-b", TOKEN_RECEIVER.hex(), "--rcvbuf", str(rcvbuf),
               "--relay-threads", str(max(1, threads))]
        for i in range(1, len(sender_addrs)):
            cmd += ["--flow", "%s,%s:%d,%s:%d" % (_flow_session(i).hex(), *sender_addrs[i],
                                                  *receiver_addrs[i])]
        if allow_twin:
            cmd.append("--allow-twin")
        if not gso:
            cmd.append("--no-gso")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     preexec_fn=(lambda: _pin(cpus)) if cpus else None)
        ready = _readline(self.proc.stdout, 10.0)
        if not ready.startswith("ready "):
            _end_pid(self.proc)
            raise RuntimeError(f"the mahole relay server did not start: "
                               f"{ready or self.proc.stderr.read().strip()!r}")
        _, host, port, self.impl, rcvbuf = ready.split()
        self.address = (host, int(port))
        self.rcvbuf = int(rcvbuf.split("=")[1])
        self.ports = {self.address[1]}
        frames = [encode_frame(_flow_session(i), _payload(), TOKEN_SENDER)
                  for i in range(len(sender_addrs))]
        self.targets = [(self.address, frame) for frame in frames]
        self.expected = frames  # forwarded unchanged
        self.counters = None
        self.splits = None  # see _even_relay

    def stop(self):
        """Close stdin (the server prints its counters), then end it by PID."""
        proc = self.proc
        try:
            proc.stdin.close()
            line = _readline(proc.stdout, 5.0)
            if line.startswith("counters "):
                self.counters = json.loads(line[len("counters "):])
        except (OSError, ValueError):
            pass
        _end_pid(proc)


class Coturn:
    def __init__(self, tmp, cpus, flows=1, threads=0):
        """threads 0: coturn's default (one relay thread per CPU), named coturn; N: named
        "coturn xN", with --relay-threads N."""
        self.name = "coturn" if not threads else f"coturn x{threads}"
        self.binary = shutil.which("turnserver")
        size = flows + 4  # listening, alternate, and a relay port for every allocation
        base = _free_port_range(size)
        self.port = base
        self.log = Path(tmp) / f"turnserver-{threads}.log"
        cmd = [self.binary, "-n", "--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1",
               "--listening-port", str(base), "--alt-listening-port", str(base + 1),
               "--min-port", str(base + 2), "--max-port", str(base + size - 1),
               "--no-tls", "--no-dtls", "--no-tcp", "--no-tcp-relay", "--no-cli",
               "--lt-cred-mech", "--user", f"{TURN_USER}:{TURN_PASSWORD}",
               "--realm", TURN_REALM, "--allow-loopback-peers", "--no-rfc5780",
               "--log-file", str(self.log), "--simple-log", "--no-stdout-log",
               "--pidfile", str(Path(tmp) / f"turnserver-{threads}.pid"),
               "--db", str(Path(tmp) / f"turndb-{threads}")]
        if threads:
            cmd += ["--relay-threads", str(threads)]
        # Pinned before exec, so that every thread coturn starts shares the relay's CPUs.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL,
                                     preexec_fn=(lambda: _pin(cpus)) if cpus else None)
        self.address = ("127.0.0.1", base)
        self.ports = {base}
        self.targets = [(self.address, channel_data(_payload()))] * flows
        self.expected = [_payload()] * flows  # coturn strips the ChannelData header
        self.impl = _version(self.binary)
        self.relayed = None

    def stop(self):
        _end_pid(self.proc)


def _version(binary):
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5)
        return "coturn " + (out.stdout or out.stderr).strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "coturn"


def _readline(stream, timeout):
    if not select.select([stream], [], [], timeout)[0]:
        return ""
    return stream.readline().strip()


def _end_pid(proc, grace=3.0):
    """End a child by its PID: SIGTERM, then SIGKILL after `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(grace)
    except ProcessLookupError:
        pass


def _udp_sockets(ports):
    """(bytes queued to be read, kernel receive drops) of each local UDP socket bound to one
    of these ports (several for a SO_REUSEPORT group)."""
    out = []
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) in ports:
                out.append((int(fields[4].split(":")[1], 16), int(fields[-1])))
    return out


def _udp_queues(ports):
    """(bytes queued to be read, kernel receive drops), summed over the local UDP sockets
    bound to these ports."""
    rows = _udp_sockets(ports)
    return sum(q for q, _ in rows), sum(d for _, d in rows)


def _udp_drops(ports):
    """Kernel receive drops summed over the local UDP sockets bound to these ports."""
    return _udp_queues(ports)[1]


def _wait_state(pid, state, timeout=5.0):
    """Until /proc says the process is in `state` (T: stopped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == state:
                return
        except OSError:
            return
        select.select([], [], [], 0.001)
    raise TimeoutError(f"process {pid} did not reach state {state}")


def _cpu_seconds(pid):
    """User + system CPU seconds of a process, all its threads (/proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _thread_cpu_ns(pid):
    """CPU nanoseconds of each thread of a process (/proc/PID/task/*/schedstat: exact, where
    /proc/PID/stat counts clock ticks of 10 ms)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out[task.name] = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


def _cpu_plan(pin):
    """CPU sets with 3 or more CPUs: relay, sender and receiver each on CPUs of their own.

    On loopback the sender pays for delivering into the relay's socket and the relay for
    delivering into the receiver's, so on shared CPUs the scheduler decides how much of the
    box the relay gets. Pinned, the result is what one CPU of relay does, for mahole and
    coturn (all its threads) alike. With 2 CPUs pinning would leave sender and receiver
    sharing one CPU and the sender, not the relay, would be the bottleneck: not pinned.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not pin or len(cpus) < 3:
        return {"relay": None, "sender": None, "receiver": None}
    return {"relay": {cpus[-1]}, "sender": {cpus[0]}, "receiver": set(cpus[1:-1])}


# --- measurements ----------------------------------------------------------------------------


class Harness:
    def __init__(self, sender, receiver, receiver_ports, receiver_pid=None):
        self.sender, self.receiver, self.receiver_ports = sender, receiver, set(receiver_ports)
        self.receiver_pid = receiver_pid

    def run(self, relay, command):
        """One measurement: receiver counts while the sender does `command`."""
        drops_before = (_udp_drops(relay.ports), _udp_drops(self.receiver_ports))
        cpu_before, wall_before = _cpu_seconds(relay.proc.pid), time.perf_counter()
        self.receiver.send(("count", relay.expected, 3.0))
        self.sender.send(command)
        sent, send_s = self.sender.recv()
        got = self.receiver.recv()
        cpu = _cpu_seconds(relay.proc.pid) - cpu_before
        wall = time.perf_counter() - wall_before - IDLE  # the receiver's last IDLE: no load
        drops_after = (_udp_drops(relay.ports), _udp_drops(self.receiver_ports))
        return {
            # the relay process's CPU (every thread), and per datagram it forwarded
            "relay_cores": cpu / wall if wall > 0 else 0.0,
            "relay_cpu_us_per_packet": 1e6 * cpu / got["received"] if got["received"] else None,
            "sent": sent,
            "offered_pps": sent / send_s if send_s else 0.0,
            "received": got["received"],
            "rx_pps": got["received"] / got["seconds"] if got["seconds"] else 0.0,
            "loss": (sent - got["received"]) / sent if sent else 0.0,
            "bad_batches": got["bad_batches"],
            "drops_at_relay": drops_after[0] - drops_before[0],
            "drops_at_receiver": drops_after[1] - drops_before[1],
        }

    def saturated(self, relay, duration):
        return self.run(relay, ("blast", relay.targets, duration))

    def paced(self, relay, rate):
        return self.run(relay, ("paced", relay.targets, rate, max(100, int(rate * TRIAL_S))))

    def drain(self, relay, per_flow):
        """The relay stopped (SIGSTOP) while per_flow datagrams a flow fill its sockets,
        then let go (SIGCONT): the rate it forwards them at with no sender running beside
        it, and the cores it had meanwhile."""
        pid = relay.proc.pid
        drops_before = (_udp_drops(relay.ports), _udp_drops(self.receiver_ports))
        os.kill(pid, signal.SIGSTOP)
        try:
            _wait_state(pid, "T")
            self.sender.send(("fill", relay.targets, per_flow))
            sent, _ = self.sender.recv()
            self.receiver.send(("count", relay.expected, 3.0))
            cpu_before, wall_before = _cpu_seconds(pid), time.perf_counter()
        finally:
            os.kill(pid, signal.SIGCONT)
        got = self.receiver.recv()
        cpu = _cpu_seconds(pid) - cpu_before
        wall = time.perf_counter() - wall_before - IDLE
        drops_after = (_udp_drops(relay.ports), _udp_drops(self.receiver_ports))
        return {
            "sent": sent,
            "received": got["received"],
            "rx_pps": got["received"] / got["seconds"] if got["seconds"] else 0.0,
            "relay_cores": cpu / wall if wall > 0 else 0.0,
            "drops_at_relay": drops_after[0] - drops_before[0],
            "drops_at_receiver": drops_after[1] - drops_before[1],
            "bad_batches": got["bad_batches"],
        }

    def drain_alone(self, relay, per_flow):
        """The relay and the receiver stopped while per_flow datagrams a flow fill the
        relay's sockets, then the relay alone let go: nothing else of the benchmark runs
        while it forwards them into the receiver's sockets (which hold them all). When the
        relay's receive queues are empty and the receiver's have stopped growing, the
        receiver is let go and reads everything with its kernel timestamps: the rate is what
        arrived over the first to last timestamp, and the cores the relay's threads' CPU
        over the time from SIGCONT to the last timestamp."""
        pid, receiver_pid = relay.proc.pid, self.receiver_pid
        drops_before = (_udp_drops(relay.ports), _udp_drops(self.receiver_ports))
        stopped = []
        try:
            for p in (pid, receiver_pid):
                os.kill(p, signal.SIGSTOP)
                stopped.append(p)
                _wait_state(p, "T")
            self.sender.send(("fill", relay.targets, per_flow, True))
            sent, _ = self.sender.recv()
            by_socket = sorted(q for q, _ in _udp_sockets(relay.ports))
            cpu_before = _thread_cpu_ns(pid)
            let_go = time.time()  # CLOCK_REALTIME, as the SO_TIMESTAMPNS stamps
            os.kill(pid, signal.SIGCONT)
            stopped.remove(pid)
            deadline = time.monotonic() + DRAIN_ALONE_WAIT
            at_receiver = -1
            while True:
                select.select([], [], [], DRAIN_ALONE_POLL)
                queued, _ = _udp_queues(relay.ports)
                grown, _ = _udp_queues(self.receiver_ports)
                if queued == 0 and grown == at_receiver:
                    break
                at_receiver = grown
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{relay.name} did not drain {sent} datagrams in "
                                       f"{DRAIN_ALONE_WAIT:g}s")
            cpu_after = _thread_cpu_ns(pid)
            resumed = time.time()
        finally:
            for p in stopped:
                os.kill(p, signal.SIGCONT)
        os.kill(receiver_pid, signal.SIGCONT)
        self.receiver.send(("stamped", relay.expected))
        got = self.receiver.recv()
        drops_after = (_udp_drops(relay.ports), _udp_drops(self.receiver_ports))
        first, last = got["first"], got["last"]
        if first is None or last > resumed:
            raise RuntimeError("receive timestamps missing or taken when the receiver read")
        threads = sorted((cpu_after.get(t, 0) - cpu_before.get(t, 0)) / 1e9 for t in cpu_after)
        span = last - let_go
        return {
            "sent": sent,
            "received": got["received"],
            # how the kernel's SO_REUSEPORT hash spread the flows over the relay's sockets:
            # the fullest socket's thread has that share of the work, and ends the drain
            "backlog_share": [q / sum(by_socket) for q in by_socket] if sum(by_socket) else [],
            "rx_pps": got["received"] / (last - first) if last > first else 0.0,
            "seconds": last - first,
            "wake_s": first - let_go,  # SIGCONT to the first datagram out
            "relay_cores": sum(threads) / span if span > 0 else 0.0,
            # the busiest threads last: one near `seconds` and the rest idle is one core
            "thread_cpu_s": [t for t in threads if t > 0.001],
            "drops_at_relay": drops_after[0] - drops_before[0],
            "drops_at_receiver": drops_after[1] - drops_before[1],
            "bad_batches": got["bad_batches"],
        }

    def lossless(self, relay, ceiling, deadline):
        """Binary search of the offered rate below `ceiling` for loss < LOSSLESS."""
        trials = []
        best = None
        lo, hi = 0.0, ceiling
        rate = ceiling
        for _ in range(SEARCH_STEPS + 1):
            if time.monotonic() > deadline:
                break
            trial = self.paced(relay, rate)
            trial["target_pps"] = rate
            trial["lossless"] = trial["loss"] < LOSSLESS and trial["bad_batches"] == 0
            trial["at_ceiling"] = rate == ceiling
            trials.append(trial)
            if trial["lossless"]:
                if best is None or trial["offered_pps"] > best["offered_pps"]:
                    best = trial
                if rate == ceiling:
                    break
                lo = rate
            else:
                hi = rate
            rate = (lo + hi) / 2
        return best, trials


# --- main -------------------------------------------------------------------------------------


def _parse(argv):
    parser = argparse.ArgumentParser(prog="bench_relay.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: mahole saturated only, briefly; no coturn, no search")
    parser.add_argument("--allow-twin", action="store_true",
                        help="measure the pure-Python twin if the compiled engine is missing")
    parser.add_argument("--reps", type=int, default=3, help="saturated runs per system")
    parser.add_argument("--duration", type=float, default=2.0,
                        help="seconds per saturated run")
    parser.add_argument("--relay-threads", type=int, default=1, metavar="N",
                        help="N > 1: measure mahole and coturn each with 1 and with N relay "
                             "threads, under --flows flows (default: 1, the single-flow "
                             "comparison)")
    parser.add_argument("--flows", type=int, default=0, metavar="F",
                        help="sender/receiver socket pairs, each its own session (default: 8 "
                             "with --relay-threads N > 1, else 1)")
    parser.add_argument("--drains-only", action="store_true",
                        help="with --relay-threads N > 1: only the two drains (no saturated "
                             "runs, no lossless search, no coturn)")
    parser.add_argument("--receiver-gro", action="store_true",
                        help="UDP_GRO on the receiver's sockets: a GSO run mahole sends "
                             "arrives as one buffer (coturn sends none)")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="let the scheduler place the processes (default with 3+ CPUs: "
                             "relay, sender and receiver each get CPUs of their own)")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.duration = 1, 0.5
    if not 1 <= args.reps <= 5 or not 0 < args.duration <= 5:
        parser.error("--reps must be 1-5 and --duration in (0, 5] (the run is bounded)")
    if not 1 <= args.relay_threads <= 16:
        parser.error("--relay-threads must be 1-16")
    args.flows = args.flows or (8 if args.relay_threads > 1 else 1)
    if args.drains_only and (args.relay_threads == 1 or args.quick):
        parser.error("--drains-only needs --relay-threads N > 1 and no --quick")
    if not 1 <= args.flows <= 64:
        parser.error("--flows must be 1-64")
    return args


def main(argv=None):
    args = _parse(argv)
    if not _fast.RELAY_COMPILED and not args.allow_twin:
        print("bench_relay: the compiled mahole._fast._relay module is not available "
              "(build it, or pass --allow-twin to measure the pure-Python twin)",
              file=sys.stderr)
        return 2
    started = time.monotonic()
    threads = args.relay_threads
    budget = BUDGET_S if threads == 1 else BUDGET_THREADS_S
    deadline = started + budget
    plan = _cpu_plan(args.pin)
    ctx = multiprocessing.get_context("spawn")
    children, relays = [], []
    coturn_note = None
    results = {}
    drains, drains_alone, splits = {}, {}, []
    tmp = tempfile.mkdtemp(prefix="mahole-bench-relay-")
    s_parent = r_parent = None
    try:
        s_parent, s_child = ctx.Pipe()
        r_parent, r_child = ctx.Pipe()
        for target, conn, extra in ((_sender, s_child, (plan["sender"], args.flows)),
                                    (_receiver, r_child, (plan["receiver"], args.flows,
                                                          args.receiver_gro))):
            proc = ctx.Process(target=target, args=(conn, *extra), daemon=True)
            proc.start()
            children.append(proc)
            conn.close()  # the child's end: a dead child then reads as EOFError here
        sender_addrs, receiver_addrs = s_parent.recv(), r_parent.recv()
        harness = Harness(s_parent, r_parent, [addr[1] for addr in receiver_addrs],
                          children[1].pid)

        if args.drains_only:
            pass
        elif threads == 1:
            relays.append(MaholeRelay(sender_addrs, receiver_addrs, args.allow_twin,
                                      plan["relay"]))
            if not args.quick:  # the same engine sending one datagram per msghdr, for scale
                relays.append(MaholeRelay(sender_addrs, receiver_addrs, args.allow_twin,
                                          plan["relay"], gso=False))
        else:  # one thread and N, under the same flows, in the same run
            for n in (1, threads):
                relays.append(MaholeRelay(sender_addrs, receiver_addrs, args.allow_twin,
                                          plan["relay"], threads=n))
        if args.quick or args.drains_only:
            coturn_note = "coturn skipped: " + ("--quick" if args.quick else "--drains-only")
        elif shutil.which("turnserver") is None:
            coturn_note = ("coturn skipped: `turnserver` is not on PATH "
                           "(apt-get install coturn to compare)")
        else:
            for n in ((0,) if threads == 1 else (1, threads)):
                coturn = Coturn(tmp, plan["relay"], args.flows, n)
                relays.append(coturn)
                s_parent.send(("turn", coturn.address, receiver_addrs))
                status, value = s_parent.recv()
                if status == "ok":
                    coturn.relayed = value
                else:
                    relays.remove(coturn)
                    coturn.stop()
                    coturn_note = (f"coturn skipped: TURN setup failed ({value}); "
                                   f"log: {coturn.log}")
                    break

        for relay in relays:
            results[relay.name] = {"impl": relay.impl, "saturated": [], "lossless": None,
                                   "lossless_trials": []}
        for _ in range(args.reps):  # interleaved: drift hits every relay alike
            if time.monotonic() > deadline - 20:
                break
            for relay in relays:
                results[relay.name]["saturated"].append(harness.saturated(relay, args.duration))
        if not args.quick:
            for i, relay in enumerate(relays):
                sat = results[relay.name]["saturated"]
                if not any(r["received"] for r in sat):
                    continue  # it forwarded nothing: no search
                # Nothing forwards losslessly much above what it forwards when flooded.
                ceiling = min(max(r["offered_pps"] for r in sat),
                              CEILING_OVER_SATURATED * max(r["rx_pps"] for r in sat))
                share = started + budget - 5 - time.monotonic()
                share_deadline = time.monotonic() + share / (len(relays) - i)
                best, trials = harness.lossless(relay, ceiling, min(deadline, share_deadline))
                results[relay.name]["lossless"] = best
                results[relay.name]["lossless_trials"] = trials
        if threads > 1 and not args.quick:
            drains, drains_alone, splits = _drains(args, harness, sender_addrs,
                                                   receiver_addrs, plan, deadline)
    except (RuntimeError, TimeoutError, EOFError, OSError) as exc:
        print(f"bench_relay: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        for relay in relays:
            relay.stop()
        for conn in (s_parent, r_parent):
            if conn is not None:
                try:
                    conn.send(("quit",))
                except OSError:
                    pass
        for proc in children:
            proc.join(3)
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(3)
        shutil.rmtree(tmp, ignore_errors=True)

    return _report_results(args, results, relays, coturn_note, time.monotonic() - started, plan,
                           drains, drains_alone, splits)


def _drains(args, harness, sender_addrs, receiver_addrs, plan, deadline):
    """mahole with one relay thread and with N, each draining sockets filled while it was
    stopped, DRAIN_REPS times alternately: what the threads forward with the CPUs to
    themselves but for the receiver (drain), then with the receiver stopped too (drain,
    relay alone). Their sockets get DRAIN_RCVBUF to hold it all. Returns the two modes'
    runs by relay name."""
    runs, alone, splits = {}, {}, []
    relays = []
    per_flow = DRAIN_ALONE_TOTAL // args.flows
    try:
        for n in (1, args.relay_threads):
            relays.append(MaholeRelay(sender_addrs, receiver_addrs, args.allow_twin,
                                      plan["relay"], threads=n, rcvbuf=DRAIN_RCVBUF,
                                      suffix=" drain"))
            runs[relays[-1].name] = []
            alone[relays[-1].name + " alone"] = []
        for _ in range(DRAIN_REPS):
            if time.monotonic() > deadline - 5:
                break
            for relay in relays:
                runs[relay.name].append(harness.drain(relay, DRAIN_PER_FLOW))
        harness.receiver.send(("alone", DRAIN_RCVBUF))
        harness.receiver.recv()
        even = _even_relay(args, harness, relays[1], sender_addrs, receiver_addrs, plan)
        if even is not relays[1]:
            relays.append(even)
        splits = even.splits
        for _ in range(DRAIN_REPS):
            if time.monotonic() > deadline - 8:
                break
            for relay in (relays[0], even):
                alone[relay.name + " alone"].append(harness.drain_alone(relay, per_flow))
    finally:
        for relay in relays:
            relay.stop()
    return runs, alone, splits


def _even_relay(args, harness, relay, sender_addrs, receiver_addrs, plan):
    """The N-thread drain relay, or one started anew (another port, so another hash) until
    the kernel's SO_REUSEPORT hash gives none of its sockets more than its share of the flows
    (plus one in 16): up to EVEN_TRIES starts, else the most even. 8 flows on 2 sockets split
    4:4 on about 1 port in 4, and with 5:3 the socket with 5 ends the drain at 8/5 = 1.6x one
    thread's rate however fast the threads are; a relay with many sessions spreads them
    evenly. relay.splits: the flows on each socket of every relay tried, fullest first."""
    n = args.relay_threads
    allowed = -(-args.flows // n) + args.flows // 16
    tried, best, best_top = [], relay, None
    candidate = relay
    for attempt in range(EVEN_TRIES):
        probe = harness.drain_alone(candidate, max(1, EVEN_PROBE // args.flows))
        split = sorted((round(share * args.flows) for share in probe["backlog_share"]),
                       reverse=True)
        tried.append(split)
        top = split[0] if split else args.flows
        if best_top is None or top < best_top:
            if best is not relay and best is not candidate:
                best.stop()
            best, best_top = candidate, top
        elif candidate is not relay:
            candidate.stop()
        if top <= allowed or attempt == EVEN_TRIES - 1:
            break
        candidate = MaholeRelay(sender_addrs, receiver_addrs, args.allow_twin, plan["relay"],
                                threads=n, rcvbuf=DRAIN_RCVBUF, suffix=" drain")
    best.splits = tried
    return best


def _report_results(args, results, relays, coturn_note, elapsed, plan, drains=None,
                    drains_alone=None, splits=()):
    summary = {}
    rows = []
    for relay in relays:
        res = results[relay.name]
        sat = res["saturated"]
        rx = [r["rx_pps"] for r in sat]
        lo, hi = _report.spread(rx)
        best = res["lossless"]
        summary[relay.name] = {
            "saturated_rx_pps": _report.median(rx),
            "saturated_offered_pps": _report.median([r["offered_pps"] for r in sat]),
            "saturated_loss": _report.median([r["loss"] for r in sat]),
            "saturated_relay_cores": _report.median([r["relay_cores"] for r in sat]),
            "lossless_relay_cores": best["relay_cores"] if best else None,
            "lossless_relay_cpu_us_per_packet": (best["relay_cpu_us_per_packet"]
                                                 if best else None),
            "lossless_pps": best["offered_pps"] if best else (None if args.quick else 0.0),
            # lossless even at the top of the search: the relay may do more than this
            "lossless_at_ceiling": bool(best and best["at_ceiling"]),
            # no loss while blasting: the sender, not the relay, was the bottleneck
            "saturated_sender_bound": _report.median([r["loss"] for r in sat]) < LOSSLESS,
        }
        s = summary[relay.name]
        lossless_cell = "-" if s["lossless_pps"] is None else s["lossless_pps"]
        if s["lossless_at_ceiling"]:
            lossless_cell = f">= {s['lossless_pps']:,.0f} *"
        rows.append([
            f"{relay.name} ({relay.impl})",
            s["saturated_rx_pps"], lo, hi,
            s["saturated_offered_pps"],
            f"{100 * s['saturated_loss']:.1f}%",
            sum(r["drops_at_relay"] for r in sat),
            sum(r["drops_at_receiver"] for r in sat),
            lossless_cell,
            s["saturated_relay_cores"],
            "-" if s["lossless_relay_cores"] is None else s["lossless_relay_cores"],
            "-" if not s["lossless_relay_cpu_us_per_packet"]
            else s["lossless_relay_cpu_us_per_packet"],
            sum(r["bad_batches"] for r in sat),
        ])
    n = args.relay_threads
    if n == 1:
        pairs = [("mahole", "coturn", TARGET)]
    else:
        pairs = [(f"mahole x{n}", "mahole x1", THREADS_TARGET),
                 (f"mahole x{n}", f"coturn x{n}", TARGET),
                 ("mahole x1", "coturn x1", TARGET),
                 (f"coturn x{n}", "coturn x1", None)]
    by_pair = {}
    for a, b, target in pairs:
        if a not in summary or b not in summary:
            continue
        m, c = summary[a], summary[b]
        ratio = {"target": target}
        ratio["saturated"] = m["saturated_rx_pps"] / c["saturated_rx_pps"] if c[
            "saturated_rx_pps"] else None
        if m["lossless_pps"] is not None and c["lossless_pps"]:
            ratio["lossless"] = m["lossless_pps"] / c["lossless_pps"]
        by_pair[f"{a} / {b}"] = ratio
    # The single-flow run's JSON keeps its former shape: {"saturated": x, "lossless": y}.
    ratios = ({k: v for k, v in by_pair.get("mahole / coturn", {}).items() if k != "target"}
              if n == 1 else {})

    print(f"relay forwarding on loopback, {INNER_SIZE}-byte inner packets (relay tokens "
          f"checked), {args.flows} flow(s) (each its own sender and receiver socket and "
          f"session){', receivers with UDP_GRO' if args.receiver_gro else ''}, "
          f"{args.reps} x {args.duration:g}s saturated per system, "
          f"lossless = offered rate with < {100 * LOSSLESS:g}% loss")
    print("CPUs: " + (", ".join(f"{k} {sorted(v)}" for k, v in plan.items()) if plan["relay"]
                      else f"not pinned ({len(os.sched_getaffinity(0))} available)"))
    print(_report.table(
        ["relay", "saturated rx pkt/s", "min", "max", "offered pkt/s", "loss",
         "drops@relay", "drops@receiver", "lossless pkt/s", "cores sat.", "cores lossless",
         "CPU us/pkt lossless", "bad"], rows))
    if any(s["lossless_at_ceiling"] for s in summary.values()):
        print("* no loss at the top of the search (the sender's top rate, or 1.25 x the "
              "saturated rate): the relay's own limit is at least this")
    for name, s in summary.items():
        if s["saturated_sender_bound"]:
            print(f"note: {name} lost nothing while flooded: the sender, not the relay, was "
                  f"the bottleneck, and its saturated rate understates it")
    if coturn_note:
        print(coturn_note)
    for pair, ratio in by_pair.items():
        for kind in ("saturated", "lossless"):
            value = ratio.get(kind)
            if value is None:
                continue
            target = ratio["target"]
            verdict = "" if target is None else (
                f" (target >= {target:g}x {'met' if value >= target else 'MISSED'})")
            print(f"{pair} {kind}: {value:.2f}x{verdict}")
    drain_summary = {}
    if drains:
        drow = []
        for name, runs_ in drains.items():
            if not runs_:
                continue
            rx = [r["rx_pps"] for r in runs_]
            drain_summary[name] = {"rx_pps": _report.median(rx),
                                   "relay_cores": _report.median([r["relay_cores"]
                                                                  for r in runs_]),
                                   "lost": sum(r["sent"] - r["received"] for r in runs_)}
            lo, hi = _report.spread(rx)
            drow.append([name, drain_summary[name]["rx_pps"], lo, hi,
                         drain_summary[name]["relay_cores"], drain_summary[name]["lost"]])
        print(f"drain: {DRAIN_PER_FLOW:,} datagrams a flow put into the stopped relay, then "
              f"forwarded with no sender running ({len(next(iter(drains.values())))} runs "
              f"each, alternating)")
        print(_report.table(["relay", "drain pkt/s", "min", "max", "cores", "lost"], drow))
        a, b = f"mahole x{n} drain", "mahole x1 drain"
        if a in drain_summary and b in drain_summary and drain_summary[b]["rx_pps"]:
            ratio = drain_summary[a]["rx_pps"] / drain_summary[b]["rx_pps"]
            by_pair[f"{a} / {b}"] = {"target": None, "drain": ratio}
            print(f"{a} / {b}: {ratio:.2f}x")
    alone_summary = _report_alone(args, drains_alone, splits, by_pair)
    path = _report.write(NAME + ("-threads" if n > 1 else "") + ("-quick" if args.quick else "")
                         + ("-drains" if args.drains_only else ""), {
        "inner_size": INNER_SIZE,
        "compiled": _fast.RELAY_COMPILED,
        "quick": args.quick,
        "reps": args.reps,
        "duration_s": args.duration,
        "lossless_threshold": LOSSLESS,
        "cpus": {k: sorted(v) if v else None for k, v in plan.items()},
        "elapsed_s": elapsed,
        "coturn": coturn_note or "measured",
        "relay_rcvbuf": {r.name: r.rcvbuf for r in relays if isinstance(r, MaholeRelay)},
        "summary": summary,
        "ratios": ratios,
        "ratios_by_pair": by_pair,
        "relay_threads": n,
        "flows": args.flows,
        "receiver_gro": args.receiver_gro,
        "target": TARGET,
        "targets_met": {k: (r is not None and r >= TARGET) for k, r in ratios.items()},
        "mahole_server_counters": {r.name: r.counters for r in relays
                                   if isinstance(r, MaholeRelay)},
        "runs": results,
        "drain": {"per_flow": DRAIN_PER_FLOW, "summary": drain_summary, "runs": drains or {}},
        "drain_alone": {"per_flow": DRAIN_ALONE_TOTAL // args.flows, "summary": alone_summary,
                        "flows_by_socket_tried": list(splits), "runs": drains_alone or {}},
    })
    print(f"wrote {path}")
    return 0


def _report_alone(args, drains_alone, splits, by_pair):
    """The "drain, relay alone" table and ratios; returns its summary by relay name."""
    summary = {}
    if not drains_alone or not any(drains_alone.values()):
        return summary
    rows = []
    for name, runs in drains_alone.items():
        if not runs:
            continue
        rx = [r["rx_pps"] for r in runs]
        s = summary[name] = {
            "rx_pps": _report.median(rx),
            "seconds": _report.median([r["seconds"] for r in runs]),
            "relay_cores": _report.median([r["relay_cores"] for r in runs]),
            "cpu_s": _report.median([sum(r["thread_cpu_s"]) for r in runs]),
            # the thread that ends the drain: the one with the most to do
            "busiest_thread_cpu_s": _report.median([max(r["thread_cpu_s"], default=0.0)
                                                    for r in runs]),
            "flows_by_socket": sorted((round(share * args.flows)
                                       for share in runs[0]["backlog_share"]), reverse=True),
            "lost": sum(r["sent"] - r["received"] for r in runs),
            "drops": sum(r["drops_at_relay"] + r["drops_at_receiver"] for r in runs),
            "bad_batches": sum(r["bad_batches"] for r in runs),
        }
        s["lossless"] = not (s["lost"] or s["drops"] or s["bad_batches"])
        lo, hi = _report.spread(rx)
        rows.append([name, s["rx_pps"], lo, hi, f"{s['seconds']:.2f}", s["relay_cores"],
                     f"{s['cpu_s']:.3f}", f"{s['busiest_thread_cpu_s']:.3f}",
                     ":".join(map(str, s["flows_by_socket"])), s["lost"], s["drops"]])
    n = args.relay_threads
    print(f"drain, relay alone: {DRAIN_ALONE_TOTAL // args.flows:,} datagrams a flow put into "
          f"the relay while it and the receiver were stopped, then forwarded by the relay with "
          f"nothing else of the benchmark running ({len(next(iter(drains_alone.values())))} runs each, alternating; "
          f"rate over the receiver's kernel timestamps; CPU medians; x{n}'s flows spread "
          f"evenly over its sockets: splits tried {', '.join(':'.join(map(str, t)) for t in splits)})")
    print(_report.table(["relay", "drain pkt/s", "min", "max", "seconds", "cores", "CPU s",
                         "busiest thread CPU s", "flows by socket", "lost", "drops"], rows))
    a, b = f"mahole x{n} drain alone", "mahole x1 drain alone"
    if a in summary and b in summary and summary[b]["rx_pps"]:
        ratio = summary[a]["rx_pps"] / summary[b]["rx_pps"]
        # what the ratio would be if every thread had a core of its own throughout
        bound = (summary[b]["cpu_s"] / summary[a]["busiest_thread_cpu_s"]
                 if summary[a]["busiest_thread_cpu_s"] else None)
        by_pair[f"{a} / {b}"] = {"target": THREADS_TARGET, "drain_alone": ratio,
                                 "drain_alone_cpu_bound": bound}
        print(f"{a} / {b}: {ratio:.2f}x (target >= {THREADS_TARGET:g}x "
              f"{'met' if ratio >= THREADS_TARGET else 'MISSED'}; "
              f"{'all lossless' if summary[a]['lossless'] and summary[b]['lossless'] else 'LOSS'})"
              + (f"; one thread's CPU / the busiest of {n} threads' CPU: {bound:.2f}x"
                 if bound else ""))
    return summary


if __name__ == "__main__":
    sys.exit(main())
