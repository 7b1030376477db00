"""QUIC sender and receiver CPU per GB: building, protecting and decrypting packets with
aioquic's own code against mahole's compiled packets module.

Two mahole connections (the agent's and the connector's kind) are pumped against each other
in memory, without sockets or a clock of their own, while the client sends one stream of
--mib MiB at 1,200-byte packets (QUIC's minimum, where per-packet work costs the most). What
is timed is the CPU the client spends in `datagrams_to_send` (filling, building,
encrypting and registering every packet) and the CPU the server spends in
`receive_datagram`, per GB of stream data; ACKs are processed in the client's receive, which
is not timed. "aioquic" runs aioquic's own code (the pure twin, `mahole._fast._packets_py`);
"mahole" runs mahole._fast's compiled packets module: PacketBuilder, decrypter,
write_application, payload_received and ack_receiver (what a mahole connection uses). The two are measured interleaved, --reps times each, in one process; both
deliver the stream intact (checked). The rest of a tunnel's per-packet cost (sockets,
the event loop, the TCP side) is not in these figures: benchmarks/bench_tunnel.py has it.

    python benchmarks/bench_packets.py [--quick] [--allow-twin] [--mib N] [--reps N]

Writes benchmarks/results/packets.json (packets-quick.json for --quick).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

try:
    import mahole  # noqa: F401
except ImportError:  # running from a source checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import _report
from aioquic.quic import events as qe

from mahole import _fast, connection, identity
from mahole.demo import issue_certificates

CLIENT_ADDR, SERVER_ADDR = ("127.0.0.1", 5000), ("127.0.0.1", 4478)
STEP = 0.002  # fake seconds between two exchanges: ACKs come back at this RTT


def make_pair(directory):
    """(client, server) handshaken and confirmed, both NodeQuicConnections."""
    issue_certificates(directory)
    ca = str(directory / "ca.crt")
    alice = identity.load_identity(directory / "alice.crt", directory / "alice.key")
    conn1 = identity.load_identity(directory / "connector1.crt", directory / "connector1.key")
    client = connection.NodeQuicConnection(configuration=connection.configuration(
        alice, ca, is_client=True, alpn=connection.ALPN_E2E, server_name="connector1"))
    client.connect(SERVER_ADDR, now=0.0)
    server = connection.NodeQuicConnection(
        configuration=connection.configuration(conn1, ca, is_client=False,
                                               alpn=connection.ALPN_E2E),
        original_destination_connection_id=client.original_destination_connection_id)
    now = 0.0
    while not client._handshake_confirmed:
        now += 0.01
        exchange(client, server, now)
        if now > 5:
            raise RuntimeError("no handshake")
    return client, server, now


def exchange(client, server, now, clock=None):
    """Datagrams both ways once; the stream bytes the server received. `clock` adds the
    client's send CPU and the server's receive CPU to clock[0] and clock[1]."""
    received = 0
    for sender, receiver, source, slot in ((client, server, CLIENT_ADDR, 0),
                                           (server, client, SERVER_ADDR, None)):
        start = time.process_time()
        datagrams = sender.datagrams_to_send(now=now)
        if clock is not None and slot == 0:
            clock[0] += time.process_time() - start
        for data, _addr in datagrams:
            start = time.process_time()
            receiver.receive_datagram(data, source, now=now)
            if clock is not None and slot == 0:
                clock[1] += time.process_time() - start
    for conn in (client, server):
        for event in iter(conn.next_event, None):
            if conn is server and isinstance(event, qe.StreamDataReceived):
                received += len(event.data)
    return received


# What mahole.connection takes from mahole._fast's packets module.
PACKETS_API = ("PacketBuilder", "decrypter", "write_application", "payload_received",
               "ack_receiver")


def use(code):
    """Make mahole.connection use `code`: {name in PACKETS_API: what to use}."""
    for name, value in code.items():
        setattr(connection, name, value)


def transfer(module, size):
    """(send s/GB, receive s/GB, packets) for one stream of `size` bytes, with `module`'s
    implementation of the packets module (compiled or pure)."""
    use({name: getattr(module, name) for name in PACKETS_API})
    with tempfile.TemporaryDirectory() as tmp:
        client, server, now = make_pair(Path(tmp))
        packets_before = client._packet_number
        client.send_stream_data(0, os.urandom(size), end_stream=True)
        clock = [0.0, 0.0]
        received = 0
        deadline = time.monotonic() + 120
        while received < size:
            now += STEP
            received += exchange(client, server, now, clock)
            if time.monotonic() > deadline:
                raise RuntimeError("the stream did not arrive")
        if received != size:
            raise RuntimeError(f"{received} bytes arrived, {size} sent")
        gb = size / 1e9
        return clock[0] / gb, clock[1] / gb, client._packet_number - packets_before


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (1 MiB x 2)")
    parser.add_argument("--allow-twin", action="store_true",
                        help="run even if the compiled module is missing")
    parser.add_argument("--mib", type=int, help="MiB per transfer (default 16)")
    parser.add_argument("--reps", type=int, help="transfers per system (default 7)")
    args = parser.parse_args(argv)
    impls = _fast.implementations("packets")
    if "compiled" not in impls and not args.allow_twin:
        print("bench_packets: the compiled packets module is not built (build it, or pass "
              "--allow-twin to measure aioquic's code twice)", file=sys.stderr)
        return 2
    size = (args.mib or (1 if args.quick else 16)) << 20
    reps = args.reps or (2 if args.quick else 7)
    original = {name: getattr(connection, name) for name in PACKETS_API}
    systems = {"aioquic": impls["python"], "mahole": impls.get("compiled", impls["python"])}
    runs = {name: [] for name in systems}
    try:
        for _ in range(reps):
            for name, module in systems.items():  # interleaved: drift hits both alike
                runs[name].append(transfer(module, size))
    finally:
        use(original)

    summary, rows = {}, []
    for name, results in runs.items():
        send = _report.median([r[0] for r in results])
        receive = _report.median([r[1] for r in results])
        packets = results[0][2]
        summary[name] = {"send_cpu_s_per_gb": send, "receive_cpu_s_per_gb": receive,
                         "send_us_per_packet": send * (size / 1e9) / packets * 1e6,
                         "receive_us_per_packet": receive * (size / 1e9) / packets * 1e6,
                         "packets": packets}
        rows.append([name, send, *_report.spread([r[0] for r in results]),
                     summary[name]["send_us_per_packet"], receive,
                     *_report.spread([r[1] for r in results]),
                     summary[name]["receive_us_per_packet"]])
    ratios = {}
    for side in ("send", "receive"):
        base = summary["aioquic"][f"{side}_cpu_s_per_gb"]
        ratios[side] = summary["mahole"][f"{side}_cpu_s_per_gb"] / base if base else None
    print(f"QUIC CPU per GB, {size:,} bytes per stream x {reps} runs, 1,200-byte packets, "
          f"in memory (compiled: {'compiled' in impls})")
    print(_report.table(["system", "send s/GB", "min", "max", "us/packet", "receive s/GB",
                         "min", "max", "us/packet"], rows))
    if all(ratios.values()):
        print(f"mahole / aioquic CPU per GB: sender x{ratios['send']:.2f}, "
              f"receiver x{ratios['receive']:.2f}")
    path = _report.write("packets-quick" if args.quick else "packets", {
        "bytes": size, "reps": reps, "compiled": "compiled" in impls, "summary": summary,
        "cpu_ratios": ratios,
        "runs": {name: [list(r) for r in results] for name, results in runs.items()}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
