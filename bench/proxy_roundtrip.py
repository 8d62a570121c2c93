"""What a proxy call costs a client: RPC round trips through tidings to a backend.

Starts a minimal aiohttp backend in a process of its own answering
Centrifugo's RPC format (echoing the data), a ``tidings serve`` process with ``[proxy] rpc_url``
pointing at it, and one WebSocket client (the ``websockets`` library) that
sends N RPC commands one after another; then the same N with C clients at
once. Prints the median and 99th percentile round trip and the calls per
second. Run from the repository root::

    .venv/bin/python bench/proxy_roundtrip.py [N] [C]
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import websockets

BACKEND = """
import sys
from aiohttp import web

async def rpc(request):
    body = await request.json()
    return web.json_response({"result": {"data": body.get("data")}})

app = web.Application()
app.router.add_post("/rpc", rpc)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


async def client_calls(url: str, n: int, timings: list[float], errors: list[int]) -> None:
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"id": 1, "connect": {}}))
        json.loads(await ws.recv())
        for i in range(n):
            started = time.perf_counter()
            await ws.send(json.dumps({"id": i + 2, "rpc": {"method": "m", "data": {"i": i}}}))
            while True:
                reply = json.loads(await ws.recv())
                if reply.get("id") == i + 2:
                    break
            if "error" in reply:
                errors.append(reply["error"]["code"])  # 100: past proxy.timeout (1 s)
                continue
            assert reply["rpc"]["data"] == {"i": i}, reply
            timings.append(time.perf_counter() - started)


async def run(url: str, n: int, clients: int) -> None:
    for count in (1, clients):
        timings: list[float] = []
        errors: list[int] = []
        started = time.perf_counter()
        await asyncio.gather(
            *(client_calls(url, n // count, timings, errors) for _ in range(count))
        )
        elapsed = time.perf_counter() - started
        timings.sort()
        p99 = timings[int(len(timings) * 0.99) - 1]
        median = statistics.median(timings) * 1e6
        print(
            f"{count:3d} client(s), {len(timings)} rpc answered, {len(errors)} errors:"
            f" median {median:.0f} µs, p99 {p99 * 1e6:.0f} µs,"
            f" {len(timings) / elapsed:.0f} calls/s"
        )


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    clients = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    backend_port, port = free_port(), free_port()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        processes.append(subprocess.Popen([sys.executable, "-c", BACKEND, str(backend_port)]))
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "tidings.toml"
            config.write_text(f'[proxy]\nrpc_url = "http://127.0.0.1:{backend_port}/rpc"\n')
            command = [sys.executable, "-m", "tidings", "serve", "--port", str(port)]
            processes.append(
                subprocess.Popen(
                    [*command, "--config", str(config), "--log-level", "warning"],
                    stderr=subprocess.DEVNULL,
                )
            )
            wait_listening(backend_port)
            wait_listening(port)
            asyncio.run(run(f"ws://127.0.0.1:{port}/connection/websocket", n, clients))
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


if __name__ == "__main__":
    main()
