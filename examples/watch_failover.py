"""Watching a session's route with path_changes(): the session starts on the relay, moves
to the direct route when hole punching succeeds, and reports its end."""

from __future__ import annotations

import asyncio

import mahole
from _deployment import credentials, local_intermediate


async def main() -> list[mahole.PathChange]:
    changes: list[mahole.PathChange] = []
    async with local_intermediate() as (intermediate, certs):
        async with mahole.Connector(intermediate.address, **credentials(certs, "office"),
                                    bind=("127.0.0.1", 0),
                                    include_loopback=True) as connector:
            connector.serve_datagrams("ping", lambda data: data)
            await connector.wait_registered()
            agent = mahole.Agent(intermediate.address, **credentials(certs, "alice"),
                                 bind=("127.0.0.1", 0), include_loopback=True)
            async with agent:
                session = await agent.session("ping")
                print("starts on", session.path)

                async def watch() -> None:
                    async for change in session.path_changes():
                        print(f"now {change.path} ({change.reason})")
                        changes.append(change)
                watcher = asyncio.ensure_future(watch())
                deadline = asyncio.get_running_loop().time() + 10
                while (session.stats().punch_result is None
                       and asyncio.get_running_loop().time() < deadline):
                    await asyncio.sleep(0.05)
                print("stats:", session.stats())
            await asyncio.wait_for(watcher, 5)  # the agent closed: the session ended
    return changes


if __name__ == "__main__":
    asyncio.run(main())
