"""Chaos clients, one per transport, that record what they receive per channel.

Each follows its channels through its own :class:`~chaos.proxy.CuttableProxy` and
reconnects after any failure (a cut, a node killed, an error answer), resuming
from its last position the way that transport's documentation says:

* SSE: ``Last-Event-ID`` = the last ``id:`` received (httpx; the stream is parsed
  by ``tidings.client.sse.SSEParser``, the parser the project ships);
* long-poll and poll: ``/poll`` with the last ``cursor`` (httpx);
* WebSocket: centrifuge-python, unmodified, with its built-in recovery;
* ``browser`` and ``browser-<transport>``: tidings.js, unmodified, in headless
  Chromium (:mod:`chaos.browser`), on the transport it picks or on the one pinned.

A client implements :class:`ChaosClient`: ``start()``, ``stop()``, ``ready`` and a
:class:`Recording`; :data:`TRANSPORTS` maps its kind to what makes one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
from centrifuge import (  # type: ignore[import-untyped]
    Client,
    ClientEventHandler,
    DisconnectedContext,
    PublicationContext,
    SubscribedContext,
    SubscriptionEventHandler,
)

from tidings.client.sse import SSEParser

from .invariants import Pub, Recording, Signal
from .proxy import CuttableProxy

#: Seconds a long-poll asks the server to hold it.
LONG_POLL_TIMEOUT = 3
#: Seconds between two short polls (the client's polling interval, not a synchronisation).
POLL_INTERVAL = 0.1
#: Backoff after a failed connection or an error answer, seconds (uniform in this range).
BACKOFF = (0.05, 0.25)


class ChaosClient:
    """A client following ``channels`` through its own proxy; records per channel."""

    transport = ""

    def __init__(self, name: str, channels: Sequence[str], node_ports: Sequence[int]) -> None:
        self.name = name
        self.channels = list(channels)
        self.proxy = CuttableProxy(node_ports)
        self.recording = Recording(name, self.transport, {ch: [] for ch in self.channels})
        #: Set once the client is subscribed to every channel for the first time.
        self.ready = asyncio.Event()
        self.errors: list[str] = []
        self.port = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pub(self, channel: str, epoch: str, offset: int) -> None:
        records = self.recording.channels.get(channel)
        if records is None:
            self.errors.append(f"publication of a channel not followed: {channel}")
            return
        records.append(Pub(time.monotonic(), epoch, offset))

    def signal(self, channel: str, kind: str) -> None:
        if channel in self.recording.channels:
            self.recording.channels[channel].append(Signal(time.monotonic(), kind))

    def last(self, channel: str) -> tuple[str, int] | None:
        """The last publication received on ``channel``, as ``(epoch, offset)``."""
        for rec in reversed(self.recording.channels[channel]):
            if isinstance(rec, Pub):
                return rec.epoch, rec.offset
        return None

    async def start(self) -> None:
        self.port = await self.proxy.start()
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.proxy.close()

    async def _run(self) -> None:
        raise NotImplementedError

    def notes(self) -> list[str]:
        """Lines about this client for the end of the report (what the table cannot say)."""
        return []

    def _error(self, what: str) -> None:
        # Bounded: a client in a reconnect loop against a dead node must not grow memory.
        if len(self.errors) < 200:
            self.errors.append(what)

    @staticmethod
    async def backoff() -> None:
        await asyncio.sleep(random.uniform(*BACKOFF))


def _http_client(read_timeout: float) -> httpx.AsyncClient:
    # trust_env=False: never route loopback through an HTTP(S)_PROXY of the environment.
    return httpx.AsyncClient(
        timeout=httpx.Timeout(5.0, read=read_timeout),
        trust_env=False,
        limits=httpx.Limits(max_connections=2, max_keepalive_connections=1),
    )


class SSEChaosClient(ChaosClient):
    """``GET /sse``; resumes with ``Last-Event-ID``."""

    transport = "sse"

    async def _run(self) -> None:
        cursor: str | None = None
        params = httpx.QueryParams([("channel", c) for c in self.channels])
        async with _http_client(read_timeout=30.0) as http:
            while not self._stopping:
                headers = {"Accept": "text/event-stream"}
                if cursor is not None:
                    headers["Last-Event-ID"] = cursor
                    self.recording.resumes += 1
                try:
                    async with http.stream(
                        "GET", self.base_url + "/sse", params=params, headers=headers
                    ) as resp:
                        if resp.status_code != 200:
                            self._error(f"sse {resp.status_code}: {(await resp.aread())[:200]!r}")
                        else:
                            parser = SSEParser()
                            async for chunk in resp.aiter_raw():
                                for ev in parser.feed(chunk):
                                    cursor = self._event(ev.event, ev.data, ev.id, cursor)
                except (httpx.HTTPError, OSError, ValueError) as exc:
                    self._error(f"sse: {exc!r}")
                await self.backoff()

    def _event(self, event: str, data: str, event_id: str, cursor: str | None) -> str | None:
        if event == "message":
            body = json.loads(data)
            self.pub(body["channel"], body["epoch"], body["offset"])
            return event_id or cursor
        if event == "subscribed":
            self.ready.set()
            return event_id or cursor
        if event == "unrecovered":
            for channel in json.loads(data)["channels"]:
                self.signal(channel, "sse-unrecovered")
        else:  # disconnect, unsubscribed: the stream ends; reconnect and resume
            self._error(f"sse event {event}: {data}")
        return cursor


class PollChaosClient(ChaosClient):
    """``GET /poll`` with the last cursor: long-poll (held) or poll (``timeout=0``)."""

    transport = "longpoll"
    hold = LONG_POLL_TIMEOUT

    async def _run(self) -> None:
        cursor: str | None = None
        channels = httpx.QueryParams([("channel", c) for c in self.channels])
        async with _http_client(read_timeout=self.hold + 10.0) as http:
            while not self._stopping:
                query = channels
                if cursor is not None:
                    query = query.merge({"cursor": cursor, "timeout": str(self.hold)})
                try:
                    resp = await http.get(self.base_url + "/poll", params=query)
                except (httpx.HTTPError, OSError) as exc:
                    self._error(f"poll: {exc!r}")
                    self.recording.resumes += cursor is not None
                    await self.backoff()
                    continue
                if resp.status_code != 200:
                    self._error(f"poll {resp.status_code}: {resp.text[:200]}")
                    await self.backoff()
                    continue
                body: dict[str, Any] = resp.json()
                # Unrecovered channels continue from "now": the signal comes before
                # the publications of the same answer.
                for channel in body.get("unrecovered", []):
                    self.signal(channel, "poll-unrecovered")
                for pub in body["publications"]:
                    self.pub(pub["channel"], pub["epoch"], pub["offset"])
                cursor = body["cursor"]
                self.ready.set()
                if not self.hold:
                    await asyncio.sleep(POLL_INTERVAL)


class ShortPollChaosClient(PollChaosClient):
    transport = "poll"
    hold = 0


class _SubscriptionEvents(SubscriptionEventHandler):  # type: ignore[misc]
    def __init__(self, owner: WebSocketChaosClient, channel: str) -> None:
        self.owner = owner
        self.channel = channel
        self.epoch = ""

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        if ctx.stream_position is not None:
            self.epoch = ctx.stream_position.epoch
        if ctx.was_recovering:
            self.owner.recording.resumes += 1
            if not ctx.recovered:
                self.owner.signal(self.channel, "ws-recovered-false")
        self.owner.subscribed.add(self.channel)
        if self.owner.subscribed >= set(self.owner.channels):
            self.owner.ready.set()

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.owner.pub(self.channel, self.epoch, ctx.pub.offset)


class _ClientEvents(ClientEventHandler):  # type: ignore[misc]
    def __init__(self, owner: WebSocketChaosClient) -> None:
        self.owner = owner

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        self.owner.disconnects[ctx.code] = self.owner.disconnects.get(ctx.code, 0) + 1


class WebSocketChaosClient(ChaosClient):
    """centrifuge-python, unmodified: it reconnects and recovers by itself."""

    transport = "websocket"

    def __init__(self, name: str, channels: Sequence[str], node_ports: Sequence[int]) -> None:
        super().__init__(name, channels, node_ports)
        self.subscribed: set[str] = set()
        #: Disconnect codes seen (3010 "insufficient state" among them), for the report.
        self.disconnects: dict[int, int] = {}
        self._client: Client | None = None

    async def _run(self) -> None:
        client = Client(
            f"ws://127.0.0.1:{self.port}/connection/websocket",
            events=_ClientEvents(self),
            proxy=None,
            min_reconnect_delay=BACKOFF[0],
            max_reconnect_delay=BACKOFF[1] * 2,
        )
        self._client = client
        subs = [client.new_subscription(ch, _SubscriptionEvents(self, ch)) for ch in self.channels]
        await client.connect()
        for sub in subs:
            await sub.subscribe()
        await asyncio.Event().wait()  # the SDK runs on its own until stop()

    async def stop(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.disconnect(), 5)
        await super().stop()


#: tidings.js in Chromium: kind → the ``transports`` it may use (None: tidings.js's own order).
BROWSER_KINDS: dict[str, tuple[str, ...] | None] = {
    "browser": None,
    "browser-websocket": ("websocket",),
    "browser-sse": ("sse",),
    "browser-longpoll": ("longpoll",),
    "browser-poll": ("poll",),
}

#: What makes a client: ``(name, channels, node_ports)`` → a :class:`ChaosClient`.
ClientFactory = Callable[[str, Sequence[str], Sequence[int]], ChaosClient]


class _BrowserKind:
    """Makes a :class:`chaos.browser.BrowserChaosClient` of one kind.

    Imported on first use, not above: that module extends :class:`ChaosClient`
    (importing it here would be circular) and needs playwright, which the other
    kinds do not.
    """

    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(
        self, name: str, channels: Sequence[str], node_ports: Sequence[int]
    ) -> ChaosClient:
        from .browser import BrowserChaosClient

        return BrowserChaosClient(name, channels, node_ports, self.kind)


#: Client kind → what makes one.
TRANSPORTS: dict[str, ClientFactory] = {
    "sse": SSEChaosClient,
    "longpoll": PollChaosClient,
    "poll": ShortPollChaosClient,
    "websocket": WebSocketChaosClient,
    **{kind: _BrowserKind(kind) for kind in BROWSER_KINDS},
}
