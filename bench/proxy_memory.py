"""What the connect proxy costs an idle connection: RSS per WebSocket connection.

The same ``tidings serve`` configuration twice (an HMAC key, so that tokens
are verified): once with N clients connecting with a token of user 56, once
with N clients connecting without one while ``[proxy] connect_url`` points at
a minimal aiohttp backend that answers user 56. The difference is what the
proxy keeps per connection (by design, nothing: the headers and cookies go
with the connect call and are not kept). Run from the repository's root::

    .venv/bin/python bench/proxy_memory.py [N]
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt
import websockets

# bench/ is on sys.path: the script's own directory.
from proxy_roundtrip import free_port, wait_listening

BACKEND = """
import sys
from aiohttp import web

async def connect(request):
    await request.read()
    return web.json_response({"result": {"user": "56"}})

app = web.Application()
app.router.add_post("/connect", connect)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""

SECRET = "bench-secret-of-forty-bytes-at-least-xxxx"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def open_connections(url: str, n: int, token: str) -> list[Any]:
    connections = []
    for _ in range(n):
        ws = await websockets.connect(url, compression=None)
        await ws.send(json.dumps({"id": 1, "connect": {"token": token} if token else {}}))
        reply = json.loads(await ws.recv())
        assert "connect" in reply, reply
        connections.append(ws)
    return connections


async def measure(port: int, pid: int, n: int, token: str) -> float:
    url = f"ws://127.0.0.1:{port}/connection/websocket"
    warm = await open_connections(url, 50, token)
    before = rss_kib(pid)
    connections = await open_connections(url, n, token)
    after = rss_kib(pid)
    for ws in (*warm, *connections):
        await ws.close()
    return (after - before) * 1024 / n


def serve_and_measure(config: str, n: int, token: str) -> float:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tidings.toml"
        path.write_text(config)
        command = [sys.executable, "-m", "tidings", "serve", "--port", str(port)]
        server = subprocess.Popen(
            [*command, "--config", str(path), "--log-level", "warning"], stderr=subprocess.DEVNULL
        )
        try:
            wait_listening(port)
            return asyncio.run(measure(port, server.pid, n, token))
        finally:
            server.terminate()
            server.wait(10)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    backend_port = free_port()
    backend = subprocess.Popen([sys.executable, "-c", BACKEND, str(backend_port)])
    try:
        wait_listening(backend_port)
        auth = f'[auth]\nhmac_secret = "{SECRET}"\n'
        token = jwt.encode({"sub": "56", "exp": int(time.time()) + 3600}, SECRET, "HS256")
        by_token = serve_and_measure(auth, n, token)
        print(f"token of user 56, no proxy:        {by_token:.0f} B per connection ({n})")
        proxied = f'{auth}[proxy]\nconnect_url = "http://127.0.0.1:{backend_port}/connect"\n'
        by_proxy = serve_and_measure(proxied, n, "")
        print(f"connect proxy answering user 56:   {by_proxy:.0f} B per connection ({n})")
    finally:
        backend.terminate()
        backend.wait(10)


if __name__ == "__main__":
    main()
