"""Hole-punching timing on loopback: session request → first byte (over the relay), and
StartPunching → direct path in use; median and spread over repeated sessions.

One in-process deployment (intermediate on 127.0.0.1, agent on 127.0.0.1, connector on
127.0.0.2, so the peers have distinct host candidates); each repetition opens a new session
through the agent's TCP forward, waits for the direct path, then closes the session.

    python benchmarks/bench_punch.py [--quick] [--runs N]
"""

import argparse
import asyncio
import os
import sys
import time

try:
    import mahole  # noqa: F401
except ImportError:  # running from a source checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import _report
from mahole import _fast
from mahole.demo import LocalDeployment


async def one_session(deployment):
    """(ms to first echoed byte, ms StartPunching→direct as the agent measured it)."""
    agent = deployment.agent
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(*deployment.forward_address(deployment.tcp_forward))
    writer.write(b"x")
    await writer.drain()
    assert await reader.readexactly(1) == b"x"
    first_byte_ms = (time.perf_counter() - started) * 1000
    [session] = agent.sessions.values()
    async with asyncio.timeout(10):
        while session.punch_outcome is None:
            await asyncio.sleep(0.002)
    outcome = session.punch_outcome
    writer.close()
    session.close("benchmark round done")
    async with asyncio.timeout(5):  # the connector hears the session close
        while deployment.connector.sessions:
            await asyncio.sleep(0.002)
    if outcome.path != "direct":
        raise RuntimeError(f"hole punching did not reach the direct path: {outcome.reason}")
    return first_byte_ms, outcome.elapsed * 1000


async def measure(runs):
    deployment = LocalDeployment(agent_kwargs={"bind": ("127.0.0.1", 0)},
                                 connector_kwargs={"bind": ("127.0.0.2", 0)})
    async with deployment:
        await one_session(deployment)  # warm-up
        return [await one_session(deployment) for _ in range(runs)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--runs", type=int, help="sessions to time (default 30, quick 5)")
    parser.add_argument("--allow-twin", action="store_true",
                        help="run even if the compiled hot path is missing")
    args = parser.parse_args(argv)
    if not _fast.COMPILED and not args.allow_twin:
        print("bench_punch: the compiled hot path is not built", file=sys.stderr)
        return 2
    runs = args.runs or (5 if args.quick else 30)
    samples = asyncio.run(measure(runs))
    first_byte = [s[0] for s in samples]
    to_direct = [s[1] for s in samples]
    rows = []
    for name, values in (("session request -> first byte (relay)", first_byte),
                         ("StartPunching -> direct path", to_direct)):
        lo, hi = _report.spread(values)
        rows.append([name, _report.median(values), lo, hi])
    print(f"hole punching on loopback, {runs} sessions (compiled hot path: {_fast.COMPILED})")
    print(_report.table(["interval", "median ms", "min ms", "max ms"], rows))
    path = _report.write("punch" + ("-quick" if args.quick else ""), {
        "runs": runs, "compiled": _fast.COMPILED,
        "first_byte_ms": first_byte, "to_direct_ms": to_direct,
        "median_first_byte_ms": _report.median(first_byte),
        "median_to_direct_ms": _report.median(to_direct),
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
