"""The per-packet hot path: compiled with Cython, with a pure-Python twin of the same API.

The compiled modules (`_hot`, `_batch`) are chosen at import time when they were built;
`MAHOLE_NO_EXTENSIONS=1` forces the twins (`_hot_py`, `_batch_py`). `COMPILED` says whether
the compiled classify/parse/route module is active, `BATCH_COMPILED` whether the
recvmmsg/sendmmsg socket is (Linux only).

Public API (identical in both twins):
  classify(data) -> int                  one of the KIND_* constants, from the first byte
  parse_header(data, short_dcid_len=8)   QUIC header (RFC 9000 §17) or ValueError
  Router                                 DCID / relay-session tables + batch dispatch
  BatchSocket                            recvmmsg/sendmmsg batches on a UDP socket
  PacketBuilder                          QUIC packet builder (aioquic's own as the twin)
  decrypter(pair)                        what to call for pair.decrypt_packet (1-RTT packets)
  write_application(conn, builder, path, now)  aioquic's QuicConnection._write_application
  payload_received(conn, context, plain)  aioquic's QuicConnection._payload_received
  ack_receiver(recovery)                 what to call for recovery.on_ack_received
"""

import os

from ._kinds import (  # noqa: F401
    KIND_QUIC_LONG,
    KIND_QUIC_SHORT,
    KIND_RELAY,
    KIND_STUN,
    KIND_UNKNOWN,
    KIND_NAMES,
)

NO_EXTENSIONS = os.environ.get("MAHOLE_NO_EXTENSIONS", "") not in ("", "0")


def _load(compiled_name, twin_name):
    """Import the compiled module unless disabled or unavailable; else the twin."""
    import importlib

    if not NO_EXTENSIONS:
        try:
            return importlib.import_module(f"{__name__}.{compiled_name}"), True
        except ImportError:
            pass
    return importlib.import_module(f"{__name__}.{twin_name}"), False


_hot, COMPILED = _load("_hot", "_hot_py")
_batch, BATCH_COMPILED = _load("_batch", "_batch_py")
_relay, RELAY_COMPILED = _load("_relay", "_relay_py")
_sched, SCHED_COMPILED = _load("_sched", "_sched_py")
_packets, PACKETS_COMPILED = _load("_packets", "_packets_py")

classify = _hot.classify
parse_header = _hot.parse_header
QuicHeader = _hot.QuicHeader
Router = _hot.Router
DispatchResult = _hot.DispatchResult
BatchSocket = _batch.BatchSocket
RelayEngine = _relay.RelayEngine
Scheduler = _sched.Scheduler
PacketBuilder = _packets.PacketBuilder
decrypter = _packets.decrypter
write_application = _packets.write_application
payload_received = _packets.payload_received
ack_receiver = _packets.ack_receiver


def implementations(module="hot"):
    """Every importable implementation of a module, as {"compiled"|"python": module}.

    Tests parametrise over this so that both twins pass the same suite.
    """
    import importlib

    names = {"hot": ("_hot", "_hot_py"), "batch": ("_batch", "_batch_py"),
             "relay": ("_relay", "_relay_py"), "sched": ("_sched", "_sched_py"),
             "packets": ("_packets", "_packets_py")}[module]
    found = {}
    try:
        found["compiled"] = importlib.import_module(f"{__name__}.{names[0]}")
    except ImportError:
        pass
    found["python"] = importlib.import_module(f"{__name__}.{names[1]}")
    return found
