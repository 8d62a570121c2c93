"""tidings.js in headless Chromium as chaos clients: one browser, one page per client.

Each client is a page whose origin is the client's own :class:`~chaos.proxy.CuttableProxy`
(``http://127.0.0.1:<proxy port>/health``), so ``/tidings.js`` and every connection
the page makes -- WebSocket, EventSource, ``fetch`` -- go through that proxy, and a
``cut`` resets them all. The page runs tidings.js unmodified, as an app would: one
``Tidings(...).subscribe(channels, onPublication, handlers)``; tidings.js chooses,
reconnects, resumes and deduplicates by itself. What the page records is what the
*app* sees: each ``onPublication`` as ``(channel, epoch, offset)``, each
``onUnrecovered(channels)`` as a signal on those channels.

The kinds (:data:`chaos.clients.BROWSER_KINDS`): ``browser`` leaves the choice to tidings.js
(WebSocket first; a transport that cannot be established while ``/ready`` answers
is given up for the next one, for the life of the page), and ``browser-websocket``,
``browser-sse``, ``browser-longpoll``, ``browser-poll`` pin it with the
``transports`` handler option, so a cut never moves the client off its transport.

The page keeps its records in an array; the harness's event loop drains it every
:data:`DRAIN_INTERVAL` seconds (``page.evaluate``), so ``ready`` and ``last()`` --
which the harness polls while the clients settle -- stay live, and once more at
``stop()``. A record's time is the page's ``performance.now()`` mapped onto
``time.monotonic()`` by an offset measured when the page starts (both are the
system's monotonic clock on Linux), so violations are attributed to the fault
before them like any other client's. One Chromium (launched on the first
``start()``, closed on the last ``stop()``) holds every client's page: a browser
per client would cost a few hundred MB and a core each.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

from playwright.async_api import Browser, BrowserContext, Page, Playwright, async_playwright

from browser_support import CHROMIUM_ARGS, chromium_path

from .clients import BACKOFF, BROWSER_KINDS, LONG_POLL_TIMEOUT, POLL_INTERVAL, ChaosClient
from .invariants import Pub, Signal

#: Seconds between two drains of a page's records (the harness polls ``last()`` every 0.1 s).
DRAIN_INTERVAL = 0.2
#: Milliseconds for a page action (navigation, evaluate) before it counts as failed.
PAGE_TIMEOUT_MS = 20_000
#: Attempts at loading the page (a node restarted by an earlier run may still be starting).
LOAD_ATTEMPTS = 5

#: tidings.js options: its back-off and poll timings set like the other chaos clients'.
OPTIONS: dict[str, Any] = {
    "openTimeout": 3000,
    "requestTimeout": 5000,
    "minBackoff": int(BACKOFF[0] * 1000),
    "maxBackoff": int(BACKOFF[1] * 2 * 1000),
    "longPollTimeout": LONG_POLL_TIMEOUT,
    "pollInterval": int(POLL_INTERVAL * 1000),
}

# The app in the page. Records are arrays (cheap to build, cheap to ship over CDP):
# ["p", t, channel, epoch, offset] or ["u", t, channel]; t is performance.now() in ms.
SETUP = """async ({channels, options, transports}) => {
  const m = await import('/tidings.js');
  const state = window.__chaos = {records: [], errors: [], transports: [], connected: 0, masked: 0};
  const client = new m.Tidings(location.origin, options);
  window.__chaosSub = client.subscribe(channels, (p) => {
    state.records.push(['p', performance.now(), p.channel, p.epoch, p.offset]);
  }, {
    transports: transports || undefined,
    onUnrecovered: (chs) => {
      const t = performance.now();
      for (const c of chs) state.records.push(['u', t, c]);
    },
    onTransport: (name) => state.transports.push(name),
    onState: (s) => { if (s === 'connected') state.connected += 1; },
    onError: (e) => state.errors.push(String((e && e.message) || e)),
  });
  // tidings.js drops a publication at or before the position it has delivered: count
  // those, so that a repeat by the server is seen even though the app never sees it.
  const sub = window.__chaosSub, deliver = sub._deliver.bind(sub);
  sub._deliver = (p) => {
    const last = sub.positions.get(p.channel);
    if (last && last.epoch === p.epoch && p.offset <= last.offset) state.masked += 1;
    deliver(p);
  };
}"""

DRAIN = """() => {
  const state = window.__chaos;
  const out = {records: state.records, errors: state.errors, transports: state.transports,
               connected: state.connected, masked: state.masked};
  state.records = []; state.errors = []; state.transports = [];
  return out;
}"""

STOP = "() => { if (window.__chaosSub) window.__chaosSub.unsubscribe(); }"


class SharedChromium:
    """One headless Chromium for every browser client of a run, reference-counted."""

    __slots__ = ("_browser", "_context", "_lock", "_playwright", "_users")

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._users = 0
        self._playwright: Playwright | None = None
        self._browser: Browser | None = None
        self._context: BrowserContext | None = None

    @property
    def in_use(self) -> bool:
        return self._users > 0

    async def acquire(self) -> BrowserContext:
        async with self._lock:
            if self._context is None:
                path = chromium_path()
                if path is None:
                    raise RuntimeError("chromium is not installed (apt-get install chromium)")
                self._playwright = await async_playwright().start()
                self._browser = await self._playwright.chromium.launch(
                    executable_path=path, headless=True, args=CHROMIUM_ARGS
                )
                self._context = await self._browser.new_context()
            self._users += 1
            return self._context

    async def release(self) -> None:
        async with self._lock:
            self._users -= 1
            if self._users > 0:
                return
            with contextlib.suppress(Exception):
                if self._browser is not None:
                    await self._browser.close()
            with contextlib.suppress(Exception):
                if self._playwright is not None:
                    await self._playwright.stop()
            self._playwright = self._browser = self._context = None


#: The browser of the run in progress (a run is one event loop; the lock binds to it).
_shared: SharedChromium | None = None


def _chromium() -> SharedChromium:
    global _shared
    if _shared is None or not _shared.in_use:
        _shared = SharedChromium()
    return _shared


class BrowserChaosClient(ChaosClient):
    """tidings.js in a Chromium page; ``kind`` (a key of :data:`~chaos.clients.BROWSER_KINDS`)
    says which transports it may use."""

    def __init__(
        self, name: str, channels: Sequence[str], node_ports: Sequence[int], kind: str
    ) -> None:
        self.transport = kind  # before the base class builds the recording under that name
        #: The ``transports`` handler option given to tidings.js (None: its default order).
        self.pinned = BROWSER_KINDS[kind]
        super().__init__(name, channels, node_ports)
        #: Transports tidings.js reported using, in order (``onTransport``).
        self.transports_used: list[str] = []
        #: Publications tidings.js received again and did not pass on (a server repeat).
        self.masked_repeats = 0
        self._page: Page | None = None
        self._browser: SharedChromium | None = None
        #: ``time.monotonic()`` minus the page's ``performance.now()``, in seconds.
        self._clock_offset = 0.0
        #: Per channel, the time of the last record (kept non-decreasing for the checker).
        self._last_t: dict[str, float] = {}

    async def start(self) -> None:
        self.port = await self.proxy.start()
        shared = _chromium()
        context = await shared.acquire()
        self._browser = shared
        self._page = page = await context.new_page()
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        await self._load(page)
        self._clock_offset = await self._measure_clock(page)
        await page.evaluate(
            SETUP,
            {
                "channels": self.channels,
                "options": OPTIONS,
                "transports": list(self.pinned) if self.pinned else None,
            },
        )
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def _load(self, page: Page) -> None:
        for attempt in range(LOAD_ATTEMPTS):
            try:
                await page.goto(self.base_url + "/health")
                return
            except Exception as exc:  # playwright's Error: the node not up yet, say
                if attempt == LOAD_ATTEMPTS - 1:
                    raise
                self._error(f"page load: {exc}")
                await self.backoff()

    @staticmethod
    async def _measure_clock(page: Page) -> float:
        """The offset from the page's clock to ours: the midpoint of the tightest of 5 reads."""
        best: tuple[float, float] | None = None
        for _ in range(5):
            before = time.monotonic()
            page_now: float = await page.evaluate("() => performance.now()")
            after = time.monotonic()
            if best is None or after - before < best[0]:
                best = (after - before, (before + after) / 2 - page_now / 1000)
        assert best is not None
        return best[1]

    async def _run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(DRAIN_INTERVAL)
            await self.drain()

    async def drain(self) -> None:
        """Move the page's records into the recording."""
        if self._page is None:
            return
        try:
            out: dict[str, Any] = await self._page.evaluate(DRAIN)
        except Exception as exc:  # the page crashed or was closed: nothing more will come
            self._error(f"drain: {exc}")
            return
        for record in out["records"]:
            channel = record[2]
            t = max(self._clock_offset + record[1] / 1000, self._last_t.get(channel, 0.0))
            self._last_t[channel] = t
            if record[0] == "p":
                self._add(channel, Pub(t, record[3], int(record[4])))
            else:
                self._add(channel, Signal(t, "js-unrecovered"))
        for error in out["errors"]:
            self._error(f"tidings.js: {error}")
        self.transports_used += out["transports"]
        self.masked_repeats = int(out["masked"])
        connected = int(out["connected"])
        # Every establishment after the first is a reconnect that resumed from a position.
        self.recording.resumes = max(0, connected - 1)
        if connected:
            self.ready.set()

    def notes(self) -> list[str]:
        # Which transport tidings.js was on matters for the unpinned kind: a WebSocket
        # that fails while /ready answers is given up for the next transport for good.
        used = " -> ".join(self.transports_used) or "none"
        return [
            f"{self.name} transports: {used}; repeats dropped by tidings.js: {self.masked_repeats}"
        ]

    def _add(self, channel: str, record: Pub | Signal) -> None:
        records = self.recording.channels.get(channel)
        if records is None:
            self._error(f"record of a channel not followed: {channel}")
        else:
            records.append(record)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.drain()  # what arrived since the last periodic drain
        page, self._page = self._page, None
        if page is not None:
            with contextlib.suppress(Exception):
                await page.evaluate(STOP)
            with contextlib.suppress(Exception):
                await page.close()
        if self._browser is not None:
            await self._browser.release()
            self._browser = None
        await self.proxy.close()
