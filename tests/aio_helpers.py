"""Running asyncio tests with deadlines: no test waits for ever, none sleeps and hopes."""

import asyncio


def run(coro, timeout=90):
    """asyncio.run(coro), failing if it takes longer than timeout seconds."""
    async def bounded():
        async with asyncio.timeout(timeout):
            return await coro
    return asyncio.run(bounded())


async def wait_for(condition, timeout=10.0, interval=0.01):
    """Wait until condition() is true, or fail after timeout seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(interval)
