"""A chat between an agent and a service served inside the connector's own process: no
port, no separate server, just a handler."""

from __future__ import annotations

import asyncio

import mahole
from _deployment import credentials, local_intermediate


async def chat_service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The connector's in-process service: answers each line. (The agent speaks first: a
    stream reaches the connector with its first bytes.)"""
    while line := await reader.readline():
        writer.write(b"office: got " + line)
        await writer.drain()


async def main() -> list[str]:
    heard = []
    async with local_intermediate() as (intermediate, certs):
        async with mahole.Connector(intermediate.address, **credentials(certs, "office"),
                                    bind=("127.0.0.1", 0)) as connector:
            connector.serve("chat", chat_service)
            await connector.wait_registered()
            async with mahole.Agent(intermediate.address, **credentials(certs, "alice"),
                                    bind=("127.0.0.1", 0)) as agent:
                reader, writer = await agent.open_connection("chat")
                for text in ("hi", "is the printer fixed?"):
                    writer.write(text.encode() + b"\n")
                    heard.append((await reader.readline()).decode().strip())
                writer.close()
    for line in heard:
        print(line)
    return heard


if __name__ == "__main__":
    asyncio.run(main())
