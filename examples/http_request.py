"""An HTTP request to a private web server through mahole: the agent's open_connection
gives asyncio streams to the service, wherever the connector is."""

from __future__ import annotations

import asyncio

import mahole
from _deployment import credentials, local_intermediate


async def private_web_server(reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
    """The private app: a tiny HTTP server only the connector can reach."""
    await reader.readuntil(b"\r\n\r\n")
    body = b"hello from the private network\n"
    writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    writer.close()


async def main() -> str:
    web = await asyncio.start_server(private_web_server, "127.0.0.1", 0)
    port = web.sockets[0].getsockname()[1]
    async with local_intermediate() as (intermediate, certs):
        async with mahole.Connector(intermediate.address, **credentials(certs, "office"),
                                    bind=("127.0.0.1", 0)) as connector:
            connector.expose("web", f"tcp:127.0.0.1:{port}")
            await connector.wait_registered()
            async with mahole.Agent(intermediate.address, **credentials(certs, "alice"),
                                    bind=("127.0.0.1", 0)) as agent:
                reader, writer = await agent.open_connection("web")
                writer.write(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")
                response: str = (await reader.read()).decode()
                writer.close()
                session = await agent.session("web")
                print(response.splitlines()[0], "via", session.path)
                print(response.split("\r\n\r\n", 1)[1], end="")
    web.close()
    return response


if __name__ == "__main__":
    asyncio.run(main())
