"""Where the memory of a connection served through the ASGI app goes (tracemalloc).

Runs tidings' ASGI app under uvicorn in this process, opens N idle SSE streams
or subscribed WebSockets from a thread, and prints the bytes allocated per
connection between two snapshots, by source line: uvicorn's objects against
tidings' own (``src/tidings/``). The benchmark (``bench/run.py --servers
tidings-asgi``) gives the RSS; this says whose it is.

    .venv/bin/python bench/asgi_memory.py sse      # or ws; N=500
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import tracemalloc

import uvicorn

from tidings.asgi import ASGIApp
from tidings.config import Config
from tidings.server import Server

PORT = 8799
N = 500
SUBSCRIBE = b'{"id":1,"connect":{}}\n{"id":2,"subscribe":{"channel":"bench"}}'


def open_connection(kind: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", PORT))
    if kind == "sse":
        sock.sendall(b"GET /sse?channel=bench HTTP/1.1\r\nHost: x\r\n\r\n")
        until = b"subscribed"
    else:
        sock.sendall(
            b"GET /connection/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(4096)
        # One masked text frame (a zero mask) with connect and subscribe.
        sock.sendall(bytes([0x81, 0x80 | len(SUBSCRIBE)]) + b"\0\0\0\0" + SUBSCRIBE)
        until = b'"id":2'
    received = b""
    while until not in received:
        received += sock.recv(4096)
    return sock


def measure(kind: str) -> None:
    time.sleep(1.5)  # uvicorn starting
    sockets = [open_connection(kind) for _ in range(20)]  # warm-up: first-time allocations
    time.sleep(0.5)
    before = tracemalloc.take_snapshot()
    sockets += [open_connection(kind) for _ in range(N)]
    time.sleep(1.0)
    after = tracemalloc.take_snapshot()
    stats = after.compare_to(before, "lineno")
    total = sum(stat.size_diff for stat in stats)
    ours = sum(stat.size_diff for stat in stats if "/tidings/" in stat.traceback[0].filename)
    print(f"{kind}: {total / N:,.0f} B per connection, tidings' own {ours / N:,.0f} B")
    for stat in stats[:15]:
        print(f"{stat.size_diff / N:8,.0f} B  {stat.traceback}")
    sys.stdout.flush()
    os._exit(0)  # uvicorn would wait for the open streams


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else "sse"
    app = ASGIApp(Server(Config()))
    config = uvicorn.Config(
        app,
        port=PORT,
        loop="asyncio",
        http="httptools",
        ws="websockets-sansio",
        ws_ping_interval=None,
        log_level="warning",
        access_log=False,
    )
    tracemalloc.start(1)
    threading.Thread(target=measure, args=(kind,), daemon=True).start()
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
