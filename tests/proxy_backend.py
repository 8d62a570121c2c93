"""A backend answering tidings' proxy calls in Centrifugo's format, for the tests.

Written as a Centrifugo user would write one — a plain aiohttp application
with a ``POST`` route per call — and run on its own event loop in a thread of
the test process, on a free loopback port. Each test says what a route
answers (:meth:`Backend.answer`): a JSON object, a status and raw bytes, a
stall until released, or a body of a given size; every request is recorded
(path, body, headers) for the test to wait on, and the requests in flight are
counted, the largest count kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from aiohttp import web

from hooks_support import TIMEOUT, Recorder

__all__ = ["Backend", "Huge", "Raw", "Stall", "Trickle", "backend_running"]


@dataclasses.dataclass(frozen=True)
class Raw:
    """Answer ``body`` with ``status`` as they are."""

    status: int = 200
    body: bytes = b""


@dataclasses.dataclass(frozen=True)
class Stall:
    """Answer nothing until :meth:`Backend.release` (or the caller gives up)."""


@dataclasses.dataclass(frozen=True)
class Huge:
    """A 200 whose body is ``size`` bytes of JSON-looking whitespace, streamed."""

    size: int


@dataclasses.dataclass(frozen=True)
class Trickle:
    """A 200 whose body comes one byte every ``interval`` seconds, until
    :meth:`Backend.release` or the caller gives up: each read is quick, the
    answer never ends."""

    interval: float = 0.05


@dataclasses.dataclass(frozen=True)
class Seen:
    """One request the backend received."""

    path: str
    body: dict[str, Any]
    headers: Mapping[str, str]


Answer = dict[str, Any] | Raw | Stall | Huge | Trickle
Handler = Callable[[dict[str, Any]], Answer]


class Backend:
    """The running backend: its URLs, what it answers, what it saw."""

    def __init__(self) -> None:
        self.requests = Recorder()
        self._answers: dict[str, Handler] = {}
        self._lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.base_url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._released: asyncio.Event | None = None

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path}"

    def answer(self, path: str, handler: Handler | Answer) -> None:
        """What ``POST /<path>`` answers: ``handler(body)``, or a fixed answer."""
        with self._lock:
            self._answers[path] = handler if callable(handler) else (lambda _body: handler)

    def seen(self, path: str) -> list[Seen]:
        return [r for r in self.requests.items if r.path == path]

    def wait_seen(self, path: str, n: int = 1, timeout: float = TIMEOUT) -> list[Seen]:
        """The requests to ``path`` once there are ``n`` of them."""
        self.requests.wait_for(lambda items: sum(r.path == path for r in items) >= n, timeout)
        return self.seen(path)

    def release(self) -> None:
        """Let every stalled request go (they answer 503) and stall no more."""
        loop, released = self._loop, self._released
        if loop is not None and released is not None:
            loop.call_soon_threadsafe(released.set)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"_not_json": raw.decode("latin-1")}
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            handler = self._answers.get(path)
        try:
            self.requests.add(Seen(path, body, dict(request.headers)))
            answer: Answer = handler(body) if handler is not None else Raw(404)
            if isinstance(answer, Stall):
                assert self._released is not None
                await self._released.wait()
                return web.Response(status=503)
            if isinstance(answer, Raw):
                return web.Response(status=answer.status, body=answer.body)
            if isinstance(answer, Trickle):
                assert self._released is not None
                response = web.StreamResponse()
                response.enable_chunked_encoding()
                await response.prepare(request)
                await response.write(b'{"result": ')
                while not self._released.is_set():
                    await response.write(b" ")
                    await asyncio.sleep(answer.interval)
                return response
            if isinstance(answer, Huge):
                response = web.StreamResponse()
                response.content_length = answer.size
                await response.prepare(request)
                chunk = b" " * 65536
                left = answer.size
                while left > 0:
                    await response.write(chunk[:left])
                    left -= len(chunk)
                return response
            return web.json_response(answer)
        finally:
            with self._lock:
                self.in_flight -= 1


@contextlib.contextmanager
def backend_running() -> Iterator[Backend]:
    """A :class:`Backend` on 127.0.0.1, stopped on exit."""
    backend = Backend()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def start() -> web.AppRunner:
        backend._released = asyncio.Event()
        app = web.Application()
        app.router.add_post("/{path}", backend._handle)
        # Cancelled when tidings gives up and closes the connection: the
        # requests in flight are then those tidings still waits on.
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        backend.base_url = f"http://127.0.0.1:{port}"
        return runner

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            holder["runner"] = loop.run_until_complete(start())
        except BaseException as exc:  # pragma: no cover - reported to the test
            holder["error"] = exc
            ready.set()
            return
        backend._loop = loop
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="proxy-backend", daemon=True)
    thread.start()
    if not ready.wait(TIMEOUT) or "error" in holder:
        raise RuntimeError(f"backend did not start: {holder.get('error')}")
    try:
        yield backend
    finally:
        backend.release()
        runner = holder["runner"]
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()
