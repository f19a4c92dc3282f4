"""The sync client keeps its connection to a peer: every delta message used to open
a new TCP connection (and, to an ``https://`` peer, a new TLS handshake), because
the reply's keep-alive was read after llhttp had reset it. A real TCP peer counts
the connections it accepts."""

from __future__ import annotations

import asyncio

from bucketmesh.replication.link import HttpLink


class CountingPeer:
    """An HTTP/1.1 peer on loopback that answers every request with a small 200."""

    def __init__(self, *, close: bool = False) -> None:
        self.connections = 0
        self.requests = 0
        self.close = close

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                self.requests += 1
                extra = b"Connection: close\r\n" if self.close else b""
                writer.write(b"HTTP/1.1 200 OK\r\n" + extra + b"Content-Length: 2\r\n\r\nok")
                await writer.drain()
                if self.close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _posts(peer: CountingPeer, n: int) -> None:
    server = await asyncio.start_server(peer.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    link = HttpLink(f"http://127.0.0.1:{port}", timeout_s=5)
    try:
        for _ in range(n):
            assert await link.post("/v1/sync/deltas", b"x" * 100) == (200, b"ok")
    finally:
        link.close()
        server.close()
        await server.wait_closed()


def test_the_sync_client_sends_every_message_on_one_keep_alive_connection() -> None:
    peer = CountingPeer()
    asyncio.run(_posts(peer, 10))
    assert (peer.requests, peer.connections) == (10, 1)


def test_a_peer_that_closes_gets_a_new_connection_per_message() -> None:
    peer = CountingPeer(close=True)
    asyncio.run(_posts(peer, 3))
    assert (peer.requests, peer.connections) == (3, 3)
