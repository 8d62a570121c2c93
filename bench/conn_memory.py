"""Python bytes per idle connection of the native listener (tracemalloc), by source file.

``bench/run.py`` reports RSS per connection: what the operator pays, but a
figure that moves with the heap's layout. Importing one more library *after*
the transports (httpx, for webhooks) raised the SSE figure at N = 2,000 from
1,100 to 1,470 B/conn, reproducibly, while importing it *before* them left it
at 1,120 — with the same objects per connection. This tool counts what
Python allocates per connection instead, so a change can be checked for what
it really adds (``PYTHONPATH=<tree>/src`` for the tree to measure):

    .venv/bin/python bench/conn_memory.py sse          # or ws; --n 1000

It runs the server on the asyncio loop in this process (tracemalloc does not
see libuv's own allocations under uvloop), opens ``--n`` idle SSE streams or
subscribed WebSockets from a thread, and prints the bytes per connection
between two snapshots, by file.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import socket
import tracemalloc

from tidings.config import Config
from tidings.server import Server

WS_SUBSCRIBE = b'{"id":1,"connect":{}}\n{"id":2,"subscribe":{"channel":"bench"}}'


def open_connection(port: int, kind: str) -> socket.socket:
    """One idle subscriber of ``bench``: returns once the server confirmed it."""
    sock = socket.create_connection(("127.0.0.1", port))
    if kind == "sse":
        sock.sendall(b"GET /sse?channel=bench HTTP/1.1\r\nHost: x\r\n\r\n")
        until = b"subscribed"
    else:
        sock.sendall(
            b"GET /connection/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        # One masked text frame (zero mask) carrying connect and subscribe.
        sock.sendall(bytes([0x81, 0x80 | len(WS_SUBSCRIBE)]) + b"\0\0\0\0" + WS_SUBSCRIBE)
        until = b'"id":2'
    received = b""
    while until not in received:
        received += sock.recv(65536)
    return sock


async def measure(kind: str, n: int) -> None:
    server = Server(Config(host="127.0.0.1", port=0))
    await server.start()
    sockets: list[socket.socket] = []

    def connect(count: int) -> None:
        sockets.extend(open_connection(server.port, kind) for _ in range(count))

    try:
        await asyncio.to_thread(connect, 50)  # warm caches (feeds, encoders, interned names)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        await asyncio.to_thread(connect, n)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        for sock in sockets:
            sock.close()
        await server.shutdown()
    stats = after.compare_to(before, "filename")
    print(f"{kind}: {sum(s.size_diff for s in stats) / n:.0f} B per connection (Python, traced)")
    for stat in stats[:8]:
        print(f"  {stat.size_diff / n:7.0f}  {stat.traceback[0].filename}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["sse", "ws"])
    parser.add_argument("--n", type=int, default=1000, help="connections to open (default 1000)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the development-mode warnings are not news here
    asyncio.run(measure(args.kind, args.n))


if __name__ == "__main__":
    main()
