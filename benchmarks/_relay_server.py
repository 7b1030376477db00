"""A minimal relay server around mahole's RelayEngine, for benchmarks/bench_relay.py.

    python benchmarks/_relay_server.py --member-a HOST:PORT --member-b HOST:PORT
        --token-a HEX --token-b HEX [--session HEX] [--flow HEX,HOST:PORT,HOST:PORT ...]
        [--listen HOST:PORT] [--relay-threads N] [--batch-size N] [--rcvbuf BYTES]
        [--no-gso] [--allow-twin]

It binds one UDP socket, creates a `mahole._fast.RelayEngine` on it, installs one session
whose members are the two given addresses (with their relay tokens, checked on every frame
as at the intermediate, where every session has them), and one more per --flow (its
session id and members; the same tokens), prints ``ready HOST PORT IMPL`` on stdout and
then relays: it blocks in epoll until the socket is readable (no busy spin when idle), then
calls poll() until `last_batch_size` is 0. With --relay-threads N it binds N - 1 more
sockets to the same address with SO_REUSEPORT, as the intermediate does, each read by a
relay thread of the engine. Datagrams that are not relay frames are counted and ignored. On
SIGTERM, SIGINT or stdin closing it prints the engine's counters as one JSON line
(``counters {...}``) and exits 0.

The real intermediate (mahole/roles/intermediate.py) drives this same engine on its
socket (and --relay-threads sockets), the same way: there the non-relay datagrams go on to the control QUIC server and the
STUN responder, and sessions come from signaling instead of the command line.
"""

import argparse
import json
import os
import select
import signal
import socket
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
try:
    import mahole  # noqa: F401 - prefer the installed package
except ImportError:
    sys.path.insert(0, str(HERE.parent))

from mahole import _fast  # noqa: E402

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; root may exceed rmem_max
DRAIN_MAX = 256  # polls per wake-up before stdin and signals are looked at again


def _hostport(text):
    host, _, port = text.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}") from None


def _parse(argv):
    parser = argparse.ArgumentParser(prog="_relay_server.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--member-a", type=_hostport, required=True)
    parser.add_argument("--member-b", type=_hostport, required=True)
    parser.add_argument("--session", default="0123456789abcdef", help="session id, 16 hex digits")
    parser.add_argument("--token-a", required=True, help="member A's relay token, 16 hex digits")
    parser.add_argument("--token-b", required=True, help="member B's relay token, 16 hex digits")
    parser.add_argument("--flow", action="append", default=[],
                        help="another session: HEX,HOST:PORT,HOST:PORT (id, member A, B)")
    parser.add_argument("--listen", type=_hostport, default=("127.0.0.1", 0))
    parser.add_argument("--relay-threads", type=int, default=1,
                        help="sockets on the address (SO_REUSEPORT), each with a thread")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rcvbuf", type=int, default=2 << 20, help="SO_RCVBUF wanted (bytes)")
    parser.add_argument("--no-gso", dest="gso", action="store_false",
                        help="send one datagram per msghdr (no UDP GSO runs)")
    parser.add_argument("--allow-twin", action="store_true",
                        help="run the pure-Python twin if the compiled engine is missing")
    args = parser.parse_args(argv)
    try:
        args.session = bytes.fromhex(args.session)
    except ValueError:
        parser.error("--session must be hex")
    if len(args.session) != 8:
        parser.error("--session must be 8 bytes (16 hex digits)")
    for name in ("token_a", "token_b"):
        try:
            value = bytes.fromhex(getattr(args, name))
        except ValueError:
            value = b""
        if len(value) != 8 or value == bytes(8):
            parser.error(f"--{name.replace('_', '-')} must be 8 bytes (16 hex digits), "
                         "not all zeros")
        setattr(args, name, value)
    flows = []
    for text in args.flow:
        try:
            sid, a, b = text.split(",")
            flows.append((bytes.fromhex(sid), _hostport(a), _hostport(b)))
        except (ValueError, argparse.ArgumentTypeError):
            parser.error(f"--flow must be HEX,HOST:PORT,HOST:PORT, not {text!r}")
    args.flow = flows
    if not 1 <= args.relay_threads <= 64:
        parser.error("--relay-threads must be 1-64")
    return args


def _bind(family, address, rcvbuf, reuse_port):
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    except OSError:  # not privileged: capped at net.core.rmem_max
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(address)
    sock.setblocking(False)
    return sock


def main(argv=None):
    args = _parse(argv)
    if not _fast.RELAY_COMPILED and not args.allow_twin:
        print("_relay_server: the compiled mahole._fast._relay module is not available "
              "(build it, or pass --allow-twin)", file=sys.stderr)
        return 2
    family = socket.AF_INET6 if ":" in args.listen[0] else socket.AF_INET
    threads = args.relay_threads
    sock = _bind(family, args.listen, args.rcvbuf, threads > 1)
    workers = [_bind(family, sock.getsockname()[:2], args.rcvbuf, True)
               for _ in range(threads - 1)]
    engine = _fast.RelayEngine(sock, batch_size=args.batch_size, gso=args.gso,
                               worker_sockets=workers)
    for worker in workers:
        worker.close()  # the engine reads its own duplicates
    engine.add_session(args.session, args.member_a, args.member_b, args.token_a, args.token_b)
    for sid, a, b in args.flow:
        engine.add_session(sid, a, b, args.token_a, args.token_b)

    stop = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.append(True))
    # The handler only sets a flag; the wakeup pipe is what ends the epoll wait.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    ep = select.epoll()
    ep.register(sock.fileno(), select.EPOLLIN)
    for fd in engine.reader_fds():
        ep.register(fd, select.EPOLLIN)
    ep.register(wake_r, select.EPOLLIN)
    stdin = sys.stdin.fileno()
    ep.register(stdin, select.EPOLLIN | select.EPOLLHUP)
    impl = ("compiled" if _fast.RELAY_COMPILED else "python") + ("+gso" if engine.gso else "")
    host, port = sock.getsockname()[:2]
    rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    print(f"ready {host} {port} {impl} rcvbuf={rcvbuf}", flush=True)
    other = 0
    poll = engine.poll
    try:
        while not stop:
            try:
                events = ep.poll()  # blocks: no spinning while idle
            except InterruptedError:
                continue
            for fd, _ in events:
                if fd == wake_r:
                    os.read(wake_r, 512)
                    continue
                if fd == stdin:
                    if not os.read(stdin, 4096):  # closed: the benchmark is done
                        stop.append(True)
                    continue
                for _ in range(DRAIN_MAX):
                    other += len(poll())
                    if engine.last_batch_size == 0 or stop:
                        break
    finally:
        counters = engine.counters()
        counters["ignored_other"] = other
        counters["session"] = engine.session_stats(args.session)
        counters["flows"] = [engine.session_stats(sid) for sid, _, _ in args.flow]
        print("counters " + json.dumps(counters), flush=True)
        ep.close()
        engine.close()
        sock.close()
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
