"""Helpers of the browser tests: headless Debian chromium via Playwright, and a TCP proxy.

The proxy stands between the browser and a tidings server like a real network
middlebox would: it forwards bytes, and on demand it cuts every connection
(``cut()``), refuses WebSocket upgrades (``block_websocket``), accepts and
then says nothing at all (``stall``, a buffering proxy), or silently stops
forwarding the connections open at that moment while keeping them open
(``stall_open_connections()``, a middlebox that drops an idle stream).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def require_browser() -> tuple[Any, str]:
    """The Playwright module and chromium's path; skips (outside CI) when either is missing."""
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    try:
        from playwright import sync_api
    except ImportError:
        if in_ci:
            pytest.fail("CI is set but Python playwright is not installed (see scripts/test)")
        pytest.skip("Python playwright is not installed (scripts/test installs it)")
    path = chromium_path()
    if path is None:
        if in_ci:
            pytest.fail("CI is set but chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium; scripts/test does)")
    return sync_api, path


@contextlib.contextmanager
def launch_browser(tmp: Path) -> Iterator[Any]:
    sync_api, path = require_browser()
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp / "profile"),
            executable_path=path,
            headless=True,
            args=CHROMIUM_ARGS,
        )
        try:
            yield context
        finally:
            context.close()


class _Path:
    """One proxied connection: the head of its latest request (lower case: a browser
    reuses a keep-alive connection for its stream), and whether it still forwards."""

    __slots__ = ("head", "lag", "stalled")

    def __init__(self, head: bytes, lag: float) -> None:
        self.head = head.lower()
        #: Seconds each chunk from the server waits before it is forwarded (latency).
        self.lag = lag
        self.stalled = False


class Proxy:
    """A threaded TCP proxy to ``127.0.0.1:upstream_port``."""

    def __init__(self, upstream_port: int | None, *, stall: bool = False) -> None:
        self.upstream_port = upstream_port
        self.stall = stall
        self.block_websocket = False
        #: WebSocket upgrades answered 403 while ``block_websocket`` was set.
        self.refused_websockets = 0
        #: Latency (seconds) added to what the server sends on WebSocket connections
        #: opened from now on: a slow path, not a broken one.
        self.websocket_lag = 0.0
        self.refuse = False
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._paths: set[_Path] = set()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = int(self.listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted = 0
        #: The request line of every request forwarded or refused, in order (lower case).
        self.requests: list[bytes] = []
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.add(sock)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            self._track(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            client.settimeout(30)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = client.recv(65536)
                if not chunk:
                    return self._drop(client)
                head += chunk
            client.settimeout(None)
            self._note(head)
            if self.refuse:
                return self._drop(client)
            if self.stall:
                return  # keep the socket open, say nothing (closed by cut() or close())
            if self.block_websocket and b"upgrade: websocket" in head.lower():
                self.refused_websockets += 1
                client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return self._drop(client)
            assert self.upstream_port is not None
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            upstream.settimeout(None)
            self._track(upstream)
            upstream.sendall(head)
        except OSError:
            return self._drop(client)
        lag = self.websocket_lag if b"upgrade: websocket" in head.lower() else 0.0
        path = _Path(head, lag)
        with self._lock:
            self._paths.add(path)
        threading.Thread(target=self._pump, args=(upstream, client, path), daemon=True).start()
        self._pump(client, upstream, path, requests=True)
        with self._lock:
            self._paths.discard(path)

    def _pump(
        self, src: socket.socket, dst: socket.socket, path: _Path, *, requests: bool = False
    ) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if requests and b" http/1.1\r\n" in data[:8192].lower():
                    path.head = data[:8192].lower()
                    self._note(data)
                if path.lag and not requests:
                    time.sleep(path.lag)  # the path's latency: this thread is the wire
                if not path.stalled:
                    dst.sendall(data)
        except OSError:
            pass
        if path.stalled:
            return  # a stalled path carries no close either: cut() or close() end it
        self._drop(src)
        self._drop(dst)

    def _note(self, head: bytes) -> None:
        self.requests.append(head.split(b"\r\n", 1)[0].lower())

    def count_requests(self, prefix: bytes) -> int:
        """How many requests so far had a request line starting with ``prefix``."""
        prefix = prefix.lower()
        return sum(1 for line in list(self.requests) if line.startswith(prefix))

    def stall_open_connections(self, marker: bytes) -> int:
        """Stop forwarding, in both directions, on every connection open now whose first
        request head contains ``marker`` (case-insensitive: ``b"get /sse"``,
        ``b"upgrade: websocket"``), without closing any: bytes are swallowed, a close
        from either end is not passed on. Other connections (the browser's idle
        keep-alives) and those opened later are forwarded. Returns how many stalled."""
        marker = marker.lower()
        with self._lock:
            paths = [path for path in self._paths if marker in path.head]
        for path in paths:
            path.stalled = True
        return len(paths)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()

    def cut(self) -> None:
        """Close every connection going through the proxy (the network dropped them)."""
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            self._drop(sock)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.listener.close()
        self.cut()
