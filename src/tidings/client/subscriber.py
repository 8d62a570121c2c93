"""An async subscriber: ``async for pub in subscribe(url, channels, transport="ws"|"sse")``.

It reconnects with exponential backoff and jitter and resumes from the last
position of every channel, so within the server's history window nothing is
missed and nothing is delivered twice. When a channel cannot be recovered (the
epoch changed, or history no longer reaches back), ``on_unrecovered`` is called
with its name before the stream goes on from "now", so the application can
reload that channel's state.

``"ws"`` speaks Centrifugo's client protocol (JSON) with the ``websockets``
library; ``"sse"`` reads ``/sse`` with httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .. import cursor
from ..errors import ProtocolError
from ..hub import Position as HubPosition
from .calls import APIError
from .sse import DEFAULT_MAX_LINE, Event, EventStreamError, SSEParser

__all__ = ["Publication", "SubscriptionClosed", "decode_cursor", "encode_cursor", "subscribe"]

log = logging.getLogger(__name__)

Position = tuple[str, int]  # (epoch, offset)
TokenSource = Callable[[], Awaitable[str | None]]


@dataclass(frozen=True)
class Publication:
    channel: str
    data: Any
    offset: int
    epoch: str
    info: dict[str, Any] | None = None
    tags: dict[str, str] | None = None
    time: int | None = None


class SubscriptionClosed(APIError):
    """The server ended the subscription for good (a terminal disconnect code, or a refusal)."""


def encode_cursor(positions: dict[str, Position]) -> str:
    """The ``/sse`` and ``/poll`` cursor of per-channel positions (the server's codec)."""
    return cursor.encode_cursor({ch: HubPosition(e, o) for ch, (e, o) in positions.items()})


def decode_cursor(token: str) -> dict[str, Position]:
    """Per-channel positions of a cursor; raises ``ValueError`` if it is malformed."""
    try:
        decoded = cursor.decode_cursor(token)
    except ProtocolError as exc:
        raise ValueError(exc.message) from None
    return {channel: (pos.epoch, pos.offset) for channel, pos in decoded.items()}


def _terminal(code: int) -> bool:
    return 3500 <= code < 4000 or 4500 <= code < 5000


class _Retry(Exception):
    """The connection ended; reconnect (``established`` says whether it had worked)."""


@dataclass
class _State:
    channels: list[str]
    positions: dict[str, Position] = field(default_factory=dict)
    on_unrecovered: Callable[[list[str]], Any] | None = None

    def fresh(self, pub: Publication) -> bool:
        """Whether ``pub`` is new (and then record its position)."""
        last = self.positions.get(pub.channel)
        if last is not None and last[0] == pub.epoch and pub.offset <= last[1]:
            return False
        self.positions[pub.channel] = (pub.epoch, pub.offset)
        return True

    def unrecovered(self, channels: list[str]) -> None:
        if channels and self.on_unrecovered is not None:
            self.on_unrecovered(channels)

    def cursor(self) -> str | None:
        known = {ch: self.positions[ch] for ch in self.channels if ch in self.positions}
        return encode_cursor(known) if known else None


async def subscribe(
    url: str,
    channels: list[str] | str,
    transport: Literal["ws", "sse"] = "ws",
    token: str | None = None,
    *,
    get_token: TokenSource | None = None,
    on_unrecovered: Callable[[list[str]], Any] | None = None,
    cursor: str | None = None,
    min_backoff: float = 0.25,
    max_backoff: float = 20.0,
    read_timeout: float = 60.0,
    max_line: int = DEFAULT_MAX_LINE,
) -> AsyncIterator[Publication]:
    """Yield the publications of ``channels``, forever (until the loop is left).

    ``url`` is the server's HTTP base URL (``http://host:8000``). ``token`` is a
    connection token; ``get_token`` is awaited for a fresh one on every
    (re)connect instead. ``cursor`` resumes from a cursor saved earlier.
    ``max_line`` bounds, in bytes, one SSE line and one event's data: a server
    (or proxy) sending more is dropped and reconnected to, with a warning.
    Raises :class:`SubscriptionClosed` when the server refuses for good.
    """
    names = [channels] if isinstance(channels, str) else list(dict.fromkeys(channels))
    state = _State(names, on_unrecovered=on_unrecovered)
    if cursor:
        state.positions.update(decode_cursor(cursor))
    base = url.rstrip("/")
    failures = 0

    async def current_token() -> str | None:
        return (await get_token()) if get_token is not None else token

    run = _run_ws if transport == "ws" else functools.partial(_run_sse, max_line=max_line)
    if transport not in ("ws", "sse"):
        raise ValueError(f"transport must be 'ws' or 'sse', not {transport!r}")
    while True:
        queue: asyncio.Queue[Publication | BaseException | None] = asyncio.Queue()
        established = asyncio.Event()
        task = asyncio.ensure_future(
            run(base, state, await current_token(), queue, established, read_timeout)
        )
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, SubscriptionClosed):
                    raise item
                if isinstance(item, BaseException):
                    break
                yield item
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        failures = 0 if established.is_set() else failures + 1
        ceiling = min(max_backoff, min_backoff * 2 ** min(failures, 16))
        await asyncio.sleep(ceiling / 2 + random.random() * ceiling / 2)


async def _run_ws(
    base: str,
    state: _State,
    token: str | None,
    queue: asyncio.Queue[Publication | BaseException | None],
    established: asyncio.Event,
    read_timeout: float,
) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    ws_url = "ws" + base.removeprefix("http") + "/connection/websocket"
    epochs: dict[str, str] = {}
    try:
        async with connect(ws_url, open_timeout=10, close_timeout=2, ping_interval=None) as ws:
            connect_req: dict[str, Any] = {"name": "tidings-python"}
            if token:
                connect_req["token"] = token
            commands: list[dict[str, Any]] = [{"id": 1, "connect": connect_req}]
            for i, channel in enumerate(state.channels, start=2):
                req: dict[str, Any] = {"channel": channel}
                pos = state.positions.get(channel)
                if pos is not None:
                    req.update(recover=True, epoch=pos[0], offset=pos[1])
                commands.append({"id": i, "subscribe": req})
            await ws.send("\n".join(json.dumps(c) for c in commands))
            waiting = {c["id"]: c for c in commands}
            while True:
                frame = await asyncio.wait_for(ws.recv(), read_timeout)
                for line in (frame if isinstance(frame, str) else frame.decode()).split("\n"):
                    if not line:
                        continue
                    msg = json.loads(line)
                    if not msg:
                        await ws.send("{}")  # ping -> pong
                    elif "id" in msg:
                        cmd = waiting.pop(msg["id"], None)
                        if cmd is None:
                            continue
                        if "error" in msg:
                            err = msg["error"]
                            code = int(err.get("code", 0))
                            if code in (101, 102, 103, 107):
                                raise SubscriptionClosed(code, str(err.get("message", "")))
                            raise _Retry(f"error {code}")
                        if "subscribe" in cmd:
                            _on_subscribed(
                                cmd["subscribe"]["channel"], msg["subscribe"], state, epochs, queue
                            )
                        if not waiting:
                            established.set()
                    elif "push" in msg:
                        push = msg["push"]
                        channel = push.get("channel", "")
                        if "pub" in push:
                            pub = _publication(channel, epochs.get(channel, ""), push["pub"])
                            if state.fresh(pub):
                                queue.put_nowait(pub)
                        elif "unsubscribe" in push and push["unsubscribe"].get("code", 0) >= 2500:
                            raise _Retry("server asks to resubscribe")
                        elif "disconnect" in push:
                            d = push["disconnect"]
                            if _terminal(int(d.get("code", 0))):
                                raise SubscriptionClosed(int(d["code"]), str(d.get("reason", "")))
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd is not None else 1006
        if _terminal(code):
            reason = exc.rcvd.reason if exc.rcvd is not None else ""
            queue.put_nowait(SubscriptionClosed(code, reason))
            return
        queue.put_nowait(exc)
    except Exception as exc:  # SubscriptionClosed included: the consumer raises it
        queue.put_nowait(exc)


def _on_subscribed(
    channel: str,
    res: dict[str, Any],
    state: _State,
    epochs: dict[str, str],
    queue: asyncio.Queue[Publication | BaseException | None],
) -> None:
    epoch = str(res.get("epoch", ""))
    epochs[channel] = epoch
    if res.get("was_recovering") and not res.get("recovered"):
        state.unrecovered([channel])
    for p in res.get("publications") or []:
        pub = _publication(channel, epoch, p)
        if state.fresh(pub):
            queue.put_nowait(pub)
    offset = int(res.get("offset", 0))
    last = state.positions.get(channel)
    if last is None or last[0] != epoch or last[1] < offset:
        state.positions[channel] = (epoch, offset)


def _publication(channel: str, epoch: str, p: dict[str, Any]) -> Publication:
    return Publication(
        channel=channel,
        data=p.get("data"),
        offset=int(p.get("offset", 0)),
        epoch=epoch,
        info=p.get("info"),
        tags=p.get("tags"),
        time=p.get("time"),
    )


async def _run_sse(
    base: str,
    state: _State,
    token: str | None,
    queue: asyncio.Queue[Publication | BaseException | None],
    established: asyncio.Event,
    read_timeout: float,
    *,
    max_line: int,
) -> None:
    import httpx

    params: list[tuple[str, str | int | float | bool | None]] = [
        ("channel", ch) for ch in state.channels
    ]
    headers = {"Accept": "text/event-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    cursor = state.cursor()
    if cursor:
        headers["Last-Event-ID"] = cursor
    timeout = httpx.Timeout(10.0, read=read_timeout)
    try:
        async with (
            httpx.AsyncClient(timeout=timeout) as http,
            http.stream("GET", base + "/sse", params=params, headers=headers) as resp,
        ):
            if resp.status_code != 200:
                body = await resp.aread()
                try:
                    err = json.loads(body)["error"]
                    code, message = int(err["code"]), str(err["message"])
                except (ValueError, KeyError, TypeError):
                    code, message = resp.status_code, body.decode(errors="replace")[:200]
                if resp.status_code in (400, 401, 403) and code != 109:
                    queue.put_nowait(SubscriptionClosed(code, message, resp.status_code))
                else:
                    queue.put_nowait(APIError(code, message, resp.status_code))
                return
            parser = SSEParser(max_line=max_line, max_event=max_line)
            async for chunk in resp.aiter_bytes():
                for event in parser.feed(chunk):
                    _on_event(event, state, queue, established)
        queue.put_nowait(_Retry("stream ended"))
    except EventStreamError as exc:
        log.warning("%s: %s; reconnecting", base + "/sse", exc)
        queue.put_nowait(exc)
    except Exception as exc:  # SubscriptionClosed included: the consumer raises it
        queue.put_nowait(exc)


def _on_event(
    event: Event,
    state: _State,
    queue: asyncio.Queue[Publication | BaseException | None],
    established: asyncio.Event,
) -> None:
    name = event.event
    body = json.loads(event.data)
    if name == "subscribed":
        for channel, (epoch, offset) in decode_cursor(event.id).items():
            last = state.positions.get(channel)
            if last is None or last[0] != epoch:
                state.positions[channel] = (epoch, offset)
        established.set()
    elif name == "unrecovered":
        state.unrecovered(list(body.get("channels", [])))
    elif name == "disconnect":
        code = int(body.get("code", 0))
        if _terminal(code):
            raise SubscriptionClosed(code, str(body.get("reason", "")))
        raise _Retry("disconnected")
    elif name == "unsubscribed":
        if int(body.get("code", 0)) < 2500:
            state.channels = [c for c in state.channels if c != body.get("channel")]
            if not state.channels:
                raise SubscriptionClosed(
                    int(body.get("code", 0)), "unsubscribed from every channel"
                )
        raise _Retry("unsubscribed")
    elif name == "message":
        pub = Publication(
            channel=body["channel"],
            data=body.get("data"),
            offset=int(body["offset"]),
            epoch=str(body.get("epoch", "")),
            info=body.get("info"),
            tags=body.get("tags"),
            time=body.get("time"),
        )
        if state.fresh(pub):
            queue.put_nowait(pub)
