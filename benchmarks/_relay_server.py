"""A minimal relay server around mahole's RelayEngine, for benchmarks/bench_relay.py.

    python benchmarks/_relay_server.py --member-a HOST:PORT --member-b HOST:PORT
        --token-a HEX --token-b HEX [--session HEX] [--listen HOST:PORT]
        [--batch-size N] [--rcvbuf BYTES] [--no-gso] [--allow-twin]

It binds one UDP socket, creates a `mahole._fast.RelayEngine` on it, installs one session
whose members are the two given addresses (with their relay tokens, checked on every frame
as at the intermediate, where every session has them), prints ``ready HOST PORT IMPL`` on
stdout and then relays: it blocks in epoll until the socket is readable (no busy spin when
idle), then calls poll() until `last_batch_size` is 0. Datagrams that are not relay frames
are counted and ignored. On SIGTERM, SIGINT or stdin closing it prints the engine's counters
as one JSON line (``counters {...}``) and exits 0.

The real intermediate (mahole/roles/intermediate.py) drives this same engine on its one
socket, the same way: there the non-relay datagrams go on to the control QUIC server and the
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
    parser.add_argument("--listen", type=_hostport, default=("127.0.0.1", 0))
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
    return args


def main(argv=None):
    args = _parse(argv)
    if not _fast.RELAY_COMPILED and not args.allow_twin:
        print("_relay_server: the compiled mahole._fast._relay module is not available "
              "(build it, or pass --allow-twin)", file=sys.stderr)
        return 2
    family = socket.AF_INET6 if ":" in args.listen[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, args.rcvbuf)
    except OSError:  # not privileged: capped at net.core.rmem_max
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
    sock.bind(args.listen)
    sock.setblocking(False)
    engine = _fast.RelayEngine(sock, batch_size=args.batch_size, gso=args.gso)
    engine.add_session(args.session, args.member_a, args.member_b, args.token_a, args.token_b)

    stop = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.append(True))
    # The handler only sets a flag; the wakeup pipe is what ends the epoll wait.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    ep = select.epoll()
    ep.register(sock.fileno(), select.EPOLLIN)
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
        print("counters " + json.dumps(counters), flush=True)
        ep.close()
        sock.close()
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
