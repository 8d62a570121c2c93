"""Helpers of the WebSocket tests: a TCP proxy that can drop the network, raw clients.

Owned by the WebSocket transport (tests/test_websocket_*.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from helpers import publish

JS_DIR = Path(__file__).parent / "js"
TIMEOUT = 10.0


def strict_inflate(compressed: bytes, window_bits: int) -> bytes:
    """Inflate a permessage-deflate message as a client holding only a ``2**window_bits``
    window does. zlib checks a match's distance against the window only when the match
    reaches before the current output buffer, so a one-shot inflate accepts any distance;
    taking the output 64 bytes at a time makes the window exact."""
    inflater = zlib.decompressobj(-window_bits)
    out = b""
    pending = compressed + b"\x00\x00\xff\xff"
    while pending:
        out += inflater.decompress(pending, 64)
        pending = inflater.unconsumed_tail
    return out


class Proxy:
    """A loopback TCP proxy to a server; :meth:`cut` drops every connection like a network loss.

    While cut, new connections are accepted and closed at once (the client
    sees a failed handshake and keeps retrying with backoff).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.down = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.base_events.Server | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(TIMEOUT)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/connection/websocket"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))

    def cut(self) -> None:
        """Drop every proxied connection (RST, no close frame) and refuse new ones."""

        def _cut() -> None:
            self.down = True
            for w in list(self._writers):
                transport = w.transport
                with contextlib.suppress(Exception):
                    transport.abort()
            self._writers.clear()

        self._loop.call_soon_threadsafe(_cut)
        time.sleep(0.1)

    def restore(self) -> None:
        self._loop.call_soon_threadsafe(setattr, self, "down", False)

    def close(self) -> None:
        self.cut()

        def _stop() -> None:
            if self._server is not None:
                self._server.close()
            self._loop.stop()

        self._loop.call_soon_threadsafe(_stop)
        self._thread.join(TIMEOUT)


class RawClient:
    """A WebSocket client over a plain socket with the websockets sans-I/O ClientProtocol.

    Lets a test control the socket (a tiny receive buffer, not reading) and see
    frames as they are on the wire (RSV1 of compressed frames, raw bytes).
    """

    def __init__(
        self,
        ws_url: str,
        *,
        deflate: bool = False,
        rcvbuf: int | None = None,
        headers: dict[str, str] | None = None,
        extensions: list[ClientPerMessageDeflateFactory] | None = None,
    ) -> None:
        uri = parse_uri(ws_url + "/connection/websocket" if ws_url.count("/") == 2 else ws_url)
        if extensions is None and deflate:
            extensions = [ClientPerMessageDeflateFactory()]
        self.protocol = ClientProtocol(uri, extensions=extensions, max_size=None)
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect((uri.host, uri.port))
        request = self.protocol.connect()
        for name, value in (headers or {}).items():
            request.headers[name] = value
        self.protocol.send_request(request)
        self._flush()
        self.raw = b""  # every byte received after the handshake response
        self.response: Response | None = None
        while self.response is None:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed during the handshake")
            self.protocol.receive_data(data)
            for event in self.protocol.events_received():
                if isinstance(event, Response):
                    self.response = event
        self.frames: list[Frame] = []

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.sock.sendall(data)

    def send(self, *messages: dict[str, Any]) -> None:
        self.protocol.send_text("\n".join(json.dumps(m) for m in messages).encode())
        self._flush()

    def send_raw_text(self, payload: bytes) -> None:
        self.protocol.send_text(payload)
        self._flush()

    def receive(self, timeout: float = TIMEOUT) -> bool:
        """Read once; feed the protocol. Returns False at EOF."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except (ConnectionResetError, TimeoutError, OSError):
            data = b""
        if data:
            self.raw += data
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        for event in self.protocol.events_received():
            if isinstance(event, Frame):
                self.frames.append(event)
        self._flush_quietly()
        return bool(data)

    def _flush_quietly(self) -> None:
        with contextlib.suppress(OSError):
            self._flush()

    def messages(self) -> Iterator[dict[str, Any]]:
        for f in self.frames:
            if f.opcode == Opcode.TEXT:
                for line in bytes(f.data).split(b"\n"):
                    if line:
                        yield json.loads(line)

    def wait_for(self, predicate: Any, timeout: float = TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            msgs = list(self.messages())
            for m in msgs[seen:]:
                if predicate(m):
                    return m
            seen = len(msgs)
            left = deadline - time.monotonic()
            if left <= 0 or not self.receive(left):
                raise AssertionError(f"no matching message; got {msgs}")

    def read_until_closed(self, timeout: float = TIMEOUT) -> int | None:
        """Read until the server's close frame (or EOF); return its code."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rcvd = self.protocol.close_rcvd
            if rcvd is not None:
                return int(rcvd.code)
            if not self.receive(max(0.01, deadline - time.monotonic())):
                rcvd = self.protocol.close_rcvd
                return int(rcvd.code) if rcvd is not None else None
        return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def connect_raw(ws_url: str, channels: tuple[str, ...] = (), **kw: Any) -> RawClient:
    """A raw client that has connected and subscribed to ``channels``."""
    client = RawClient(ws_url, **kw)
    cmds: list[dict[str, Any]] = [{"id": 1, "connect": {}}]
    cmds += [{"id": i + 2, "subscribe": {"channel": c}} for i, c in enumerate(channels)]
    client.send(*cmds)
    last = len(cmds)
    client.wait_for(lambda m: m.get("id") == last)
    return client


def node_available() -> bool:
    return shutil.which("node") is not None and shutil.which("npm") is not None


#: What tests/js/package.json installs that tests use: one missing means an install.
JS_PACKAGES = ("centrifuge", "ws", "eventsource", "typescript", "esbuild", "tidings-client")


def ensure_js_deps() -> None:
    """Install tests/js/node_modules (pinned by package-lock.json) when a package is missing.

    pytest-xdist workers may ask at once: a file lock lets one install while the others
    wait, then find it done. ``npm ci`` only when node_modules is absent, since it deletes
    the folder another worker's node may be running from; ``npm install`` adds what is
    missing to a clone installed before a package was added."""

    def installed() -> bool:
        return all((JS_DIR / "node_modules" / name).is_dir() for name in JS_PACKAGES)

    if installed():
        return
    lock_path = Path(tempfile.gettempdir()) / f"tidings-npm-{os.getuid()}.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed():
            return
        fresh = not (JS_DIR / "node_modules").is_dir() and (JS_DIR / "package-lock.json").exists()
        cmd = ["npm", "ci" if fresh else "install", "--no-audit", "--no-fund"]
        subprocess.run(cmd, cwd=JS_DIR, check=True, timeout=300, env=dict(os.environ))


class NodeClient:
    """tests/js/client.mjs in a child process: events out as JSON lines, commands in."""

    def __init__(self, ws_url: str, *channels: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            ["node", str(JS_DIR / "client.mjs"), ws_url, *channels],
            cwd=JS_DIR,
            env={**os.environ, **(env or {})},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.events.append(json.loads(line))
                self._lock.notify_all()

    def command(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        self.proc.stdin.flush()

    def wait(self, predicate: Any, timeout: float = TIMEOUT, start: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for e in self.events[start:]:
                    if predicate(e):
                        return e
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    stderr = b""
                    if self.proc.poll() is not None and self.proc.stderr is not None:
                        stderr = self.proc.stderr.read()
                    raise AssertionError(
                        f"node client: no matching event; events={self.events} "
                        f"stderr={stderr.decode(errors='replace')}"
                    )
                self._lock.wait(left)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.command(cmd="exit")
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def assert_js_recovers_after_a_cut(
    server: Any, channel: str, connect: Callable[[Proxy], NodeClient]
) -> None:
    """centrifuge-js, whichever build and transport ``connect`` starts it with
    through the cuttable ``proxy``: cut after offset 2, three publications while
    it is away, then it resubscribes recovered with them, and the next one live.

    One scenario for the JSON, Protobuf and emulated forms of the SDK."""
    publish(server, channel, {"n": 0})  # the stream exists, with an epoch
    proxy = Proxy(server.port)
    try:
        js = connect(proxy)
        js.wait(lambda e: e["event"] == "subscribed")
        publish(server, channel, {"n": 1})
        js.wait(lambda e: e["event"] == "publication" and e["data"] == {"n": 1})
        mark = len(js.events)

        proxy.cut()
        js.wait(lambda e: e["event"] == "connecting", start=mark)
        for n in (2, 3, 4):
            publish(server, channel, {"n": n})
        proxy.restore()

        again = js.wait(lambda e: e["event"] == "subscribed", start=mark)
        assert again["wasRecovering"] is True and again["recovered"] is True
        publish(server, channel, {"n": 5})
        js.wait(lambda e: e["event"] == "publication" and e["data"] == {"n": 5}, start=mark)
        got = [e for e in js.events[mark:] if e["event"] == "publication"]
        assert [e["data"]["n"] for e in got] == [2, 3, 4, 5]
        assert [e["offset"] for e in got] == [3, 4, 5, 6]
    finally:
        proxy.close()
