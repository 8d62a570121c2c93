"""A real server with Python hooks, on a real socket, in a thread of the test process.

Hooks are Python callables, so the server that runs them must share the
test's process: :func:`hooked_server` starts a :class:`~tidings.server.Server`
built with the given :class:`~tidings.hooks.Hooks` on its own event loop in a
background thread, listening on 127.0.0.1 on a free port. Tests then drive it
with any client — blocking (httpx, curl) or async (centrifuge-python, the
``websockets`` client), or a Node or browser process — exactly as they would
a ``tidings serve`` process. What the hooks saw is recorded in thread-safe
structures (:class:`Recorder`) that tests wait on with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from tidings.config import Config
from tidings.hooks import Hooks
from tidings.server import Server

TIMEOUT = 10.0


class HookedServer:
    """A running in-thread server: its URL, its loop, the server object."""

    def __init__(self, server: Server, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.url = server.url
        self.ws_url = self.url.replace("http://", "ws://") + "/connection/websocket"

    def call(self, coro: Any, timeout: float = TIMEOUT) -> Any:
        """Run a coroutine on the server's loop and return its result (from the test thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextlib.contextmanager
def hooked_server(
    hooks: Hooks | None = None, config: dict[str, Any] | None = None
) -> Iterator[HookedServer]:
    """A server with ``hooks`` and ``config`` (a dict of the TOML tree), stopped on exit."""
    tree = {"host": "127.0.0.1", "port": 0, **(config or {})}
    built = msgspec.convert(tree, Config, strict=False)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def start() -> None:
            server = Server(built, hooks=hooks)
            await server.start()
            holder["server"] = server

        try:
            loop.run_until_complete(start())
        except BaseException as exc:  # pragma: no cover - reported to the test
            holder["error"] = exc
            ready.set()
            return
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="hooked-server", daemon=True)
    thread.start()
    if not ready.wait(TIMEOUT) or "error" in holder:
        raise RuntimeError(f"server did not start: {holder.get('error')}")
    running = HookedServer(holder["server"], loop)
    try:
        yield running
    finally:
        with contextlib.suppress(Exception):
            running.call(running.server.shutdown(), timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()


class Recorder:
    """What hooks were called with, shared between the server thread and the test."""

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._changed = threading.Condition()

    def add(self, item: Any) -> None:
        with self._changed:
            self._items.append(item)
            self._changed.notify_all()

    @property
    def items(self) -> list[Any]:
        with self._changed:
            return list(self._items)

    def wait_for(
        self, predicate: Callable[[list[Any]], bool], timeout: float = TIMEOUT
    ) -> list[Any]:
        """Block until ``predicate(items)`` holds; fail the test after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self._items):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting; recorded: {self._items!r}")
                self._changed.wait(left)
            return list(self._items)


class Held:
    """An ``asyncio.Event`` a hook awaits on the server's loop, released by the test.

    ``waiting`` tells the test (a thread) that the hook is inside; a hook held
    this way is how a test plays a slow application without sleeping.
    """

    def __init__(self, srv: HookedServer) -> None:
        self.srv = srv
        self.event = asyncio.Event()
        self.waiting = threading.Event()
        #: Hooks inside :meth:`wait` now (read from the test thread).
        self.inside = 0

    async def wait(self) -> None:
        self.inside += 1
        self.waiting.set()
        try:
            await self.event.wait()
        finally:
            self.inside -= 1

    def release(self) -> None:
        self.srv.loop.call_soon_threadsafe(self.event.set)
