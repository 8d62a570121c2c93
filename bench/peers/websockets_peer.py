"""``websockets`` peer: the library's own asyncio server and ``broadcast()``.

Each connection runs the library's handler task (its model); the handler reads
the client's connect + subscribe frame, acknowledges it and joins the set that
``websockets.broadcast()`` writes to. The library's HTTP parser only accepts
GET, so the ``POST /api/publish`` trigger listens on PORT+1 in the same process
and the same event loop (a few lines of raw asyncio, not on the hot path).

Usage: ``python websockets_peer.py PORT``   (trigger on PORT+1)
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import cast

import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve

CLIENTS: set[ServerConnection] = set()
ACK = '{"id":1,"connect":{}}\n{"id":2,"subscribe":{}}'


async def handler(ws: ServerConnection) -> None:
    """Wait for the subscribe frame, then stay in the broadcast set until closed."""
    await ws.recv()
    await ws.send(ACK)
    CLIENTS.add(ws)
    try:
        await ws.wait_closed()
    finally:
        CLIENTS.discard(ws)


class Trigger(asyncio.Protocol):
    """Minimal keep-alive HTTP: ``POST /api/publish`` -> ``broadcast()``."""

    def __init__(self) -> None:
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].decode("latin-1")
            clen = 0
            for line in head.split("\r\n")[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    clen = int(v)
            if len(self.buf) < end + 4 + clen:
                return
            body = self.buf[end + 4 : end + 4 + clen]
            self.buf = self.buf[end + 4 + clen :]
            if head.startswith("POST /api/publish"):
                msg = json.dumps(
                    {"push": {"channel": "bench", "pub": {"data": json.loads(body)["data"]}}},
                    separators=(",", ":"),
                )
                broadcast(CLIENTS, msg)
            out = b'{"result":{}}'
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d"
                b"\r\n\r\n%s" % (len(out), out)
            )


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    trigger = await loop.create_server(Trigger, "127.0.0.1", port + 1)
    async with trigger, serve(handler, "127.0.0.1", port, backlog=4096) as server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
