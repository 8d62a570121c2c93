"""An async subscriber: ``async for pub in subscribe(url, channels, transport=...)``.

It reconnects with exponential backoff and jitter and resumes from the last
position of every channel, so within the server's history window nothing is
missed and nothing is delivered twice. When a channel cannot be recovered (the
epoch changed, or history no longer reaches back), ``on_unrecovered`` is called
with its name before the stream goes on from "now", so the application can
reload that channel's state.

Four transports, one position: ``"ws"`` speaks Centrifugo's client protocol
(JSON) with the ``websockets`` library; ``"sse"`` reads ``/sse``, ``"longpoll"``
and ``"poll"`` ask ``/poll``, with httpx. :attr:`Subscription.cursor` is the
position of every channel in the cursor format of the HTTP transports, so a
program may stop on one transport and go on with another from the same cursor.

A :class:`Subscription` also sends the client's commands: :meth:`~Subscription.rpc`,
:meth:`~Subscription.publish`, :meth:`~Subscription.history`,
:meth:`~Subscription.presence` and :meth:`~Subscription.presence_stats` go over
the live WebSocket when there is one, else to the server's call endpoints
(``POST /call/<name>``, docs/http-transports.md): same requests, same results,
same error codes (:class:`~tidings.client.calls.APIError`).

For a script without asyncio, :func:`subscribe_sync` runs one on a thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import queue
import random
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgspec

from .. import cursor
from ..errors import ProtocolError
from ..hub import Position as HubPosition
from .calls import APIError, HistoryResult, PresenceResult, PresenceStatsResult
from .sse import DEFAULT_MAX_LINE, Event, EventStreamError, SSEParser

if TYPE_CHECKING:
    import httpx
    from websockets.asyncio.client import ClientConnection

__all__ = [
    "Publication",
    "Subscription",
    "SubscriptionClosed",
    "SyncSubscription",
    "Transport",
    "decode_cursor",
    "encode_cursor",
    "subscribe",
    "subscribe_sync",
]

log = logging.getLogger(__name__)

Position = tuple[str, int]  # (epoch, offset)
TokenSource = Callable[[], Awaitable[str | None]]
Transport = Literal["ws", "sse", "longpoll", "poll"]
TRANSPORTS: tuple[Transport, ...] = ("ws", "sse", "longpoll", "poll")
T = TypeVar("T")

#: Error codes after which reconnecting cannot help: unauthorized, unknown
#: channel, permission denied, bad request.
_REFUSALS = (101, 102, 103, 107)


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
    """The connection ended; reconnect."""


@dataclass
class _State:
    """The channels and the position reached in each: what every transport resumes from."""

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

    def reached(self, channel: str, epoch: str, offset: int) -> None:
        """The server puts ``channel`` at ``(epoch, offset)``; never back within an epoch."""
        last = self.positions.get(channel)
        if last is None or last[0] != epoch or last[1] < offset:
            self.positions[channel] = (epoch, offset)

    def unrecovered(self, channels: list[str]) -> None:
        if channels and self.on_unrecovered is not None:
            self.on_unrecovered(channels)

    def cursor(self) -> str | None:
        known = {ch: self.positions[ch] for ch in self.channels if ch in self.positions}
        return encode_cursor(known) if known else None


def _error(status: int, body: bytes) -> APIError:
    """An HTTP error answer as an :class:`APIError` (its body's code, or the status)."""
    try:
        err = json.loads(body)["error"]
        return APIError(int(err["code"]), str(err["message"]), status)
    except (ValueError, KeyError, TypeError):
        return APIError(status, body.decode(errors="replace")[:200], status)


def _refusal(status: int, body: bytes) -> APIError:
    """A subscribe transport's error answer: for good (a refusal) or to retry."""
    error = _error(status, body)
    if status in (400, 401, 403, 404) and error.code != 109:
        return SubscriptionClosed(error.code, error.message, status)
    return error


def _http_publication(body: dict[str, Any]) -> Publication:
    """A publication as SSE and poll carry it (``channel`` and ``epoch`` included)."""
    return Publication(
        channel=body["channel"],
        data=body.get("data"),
        offset=int(body["offset"]),
        epoch=str(body.get("epoch", "")),
        info=body.get("info"),
        tags=body.get("tags"),
        time=body.get("time"),
    )


def _publication(channel: str, epoch: str, p: dict[str, Any]) -> Publication:
    """A publication as Centrifugo's protocol carries it (channel and epoch from around it)."""
    return Publication(
        channel=channel,
        data=p.get("data"),
        offset=int(p.get("offset", 0)),
        epoch=epoch,
        info=p.get("info"),
        tags=p.get("tags"),
        time=p.get("time"),
    )


def _describe(exc: BaseException) -> str:
    """An error in a few words for a log line: its message, or its type without one."""
    return str(exc) or type(exc).__name__


class _Live:
    """The WebSocket of the current connection, for commands sent while it is open."""

    __slots__ = ("next_id", "pending", "ws")

    def __init__(self, ws: ClientConnection, next_id: int) -> None:
        self.ws = ws
        self.next_id = next_id
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}

    async def command(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        self.next_id += 1
        cmd_id = self.next_id
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[cmd_id] = reply
        try:
            await self.ws.send(json.dumps({"id": cmd_id, name: request}))
            answer = await reply
        finally:
            self.pending.pop(cmd_id, None)
        if "error" in answer:
            err = answer["error"]
            raise APIError(int(err.get("code", 0)), str(err.get("message", "")))
        result: dict[str, Any] = answer.get(name) or {}
        return result

    def answered(self, msg: dict[str, Any]) -> bool:
        reply = self.pending.get(int(msg["id"]))
        if reply is None:
            return False
        if not reply.done():
            reply.set_result(msg)
        return True

    def lost(self) -> None:
        for reply in self.pending.values():
            if not reply.done():
                reply.set_exception(ConnectionError("the WebSocket closed before the reply"))


class Subscription:
    """Publications of some channels, over one transport, resumed across reconnects.

    Iterate it (``async for``) for :class:`Publication` objects; send commands
    with its methods; :meth:`aclose` it (or use ``async with``) when done.
    Made by :func:`subscribe`; the connection opens on the first iteration.
    """

    def __init__(
        self,
        url: str,
        channels: list[str] | str,
        transport: Transport = "ws",
        token: str | None = None,
        *,
        get_token: TokenSource | None = None,
        on_unrecovered: Callable[[list[str]], Any] | None = None,
        cursor: str | None = None,
        min_backoff: float = 0.25,
        max_backoff: float = 20.0,
        read_timeout: float = 60.0,
        max_line: int = DEFAULT_MAX_LINE,
        poll_timeout: float = 25.0,
        poll_interval: float = 1.0,
        fail_fast: bool = False,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
        names = [channels] if isinstance(channels, str) else list(dict.fromkeys(channels))
        self.transport: Transport = transport
        self.base = url.rstrip("/")
        self._state = _State(names, on_unrecovered=on_unrecovered)
        if cursor:
            self._state.positions.update(decode_cursor(cursor))
        self._token = token
        self._get_token = get_token
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._read_timeout = read_timeout
        self._max_line = max_line
        self._poll_timeout = poll_timeout
        self._poll_interval = poll_interval
        # Raise the first connection's failure instead of retrying it (the CLI:
        # a wrong URL is an error to report, not a server to wait for).
        self._fail_fast = fail_fast
        self._queue: asyncio.Queue[Publication | BaseException] = asyncio.Queue()
        # Positions of the publications queued and not yet yielded, per channel:
        # the cursor stands before the first of them (see :attr:`cursor`).
        self._pending: dict[str, collections.deque[Position]] = {}
        self._task: asyncio.Task[None] | None = None
        self._live: _Live | None = None
        self._http: httpx.AsyncClient | None = None
        self._closed = False

    @property
    def channels(self) -> list[str]:
        return list(self._state.channels)

    @property
    def cursor(self) -> str | None:
        """The position of every channel after the last publication yielded (None before any).

        Pass it as ``cursor=`` to a new subscription, on any transport, to go on
        from here: nothing yielded is yielded again, nothing missed is lost.
        """
        state = self._state
        known: dict[str, Position] = {}
        for channel in state.channels:
            pending = self._pending.get(channel)
            if pending:
                epoch, offset = pending[0]
                known[channel] = (epoch, offset - 1)
            elif channel in state.positions:
                known[channel] = state.positions[channel]
        return encode_cursor(known) if known else None

    # -- iteration ---------------------------------------------------------------------

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Publication:
        if self._closed:
            raise StopAsyncIteration
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        item = await self._queue.get()
        if isinstance(item, BaseException):
            await self.aclose()
            raise item
        self._pending[item.channel].popleft()
        return item

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection; iteration ends. Idempotent."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    # -- the reconnect loop --------------------------------------------------------------

    async def _current_token(self) -> str | None:
        return (await self._get_token()) if self._get_token is not None else self._token

    async def _run(self) -> None:
        failures = 0
        connected = False
        while True:
            established = asyncio.Event()
            try:
                token = await self._current_token()
                if self.transport == "ws":
                    await self._run_ws(token, established)
                elif self.transport == "sse":
                    await self._run_sse(token, established)
                else:
                    await self._run_poll(token, established)
            except SubscriptionClosed as exc:
                self._queue.put_nowait(exc)
                return
            except EventStreamError as exc:
                log.warning("%s: %s; reconnecting", self.base + "/sse", exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closed:
                    # aclose() cancelled us and a layer below turned the cancel
                    # into an error (Python 3.11's asyncio.timeout racing a
                    # cancel does): reconnecting would keep aclose() waiting.
                    return
                connected = connected or established.is_set()
                if self._fail_fast and not connected:
                    failed = exc if isinstance(exc, APIError) else ConnectionError(_describe(exc))
                    self._queue.put_nowait(failed)
                    return
                log.info("%s: connection lost (%s); reconnecting", self.base, _describe(exc))
            connected = connected or established.is_set()
            failures = 0 if established.is_set() else failures + 1
            ceiling = min(self._max_backoff, self._min_backoff * 2 ** min(failures, 16))
            await asyncio.sleep(ceiling / 2 + random.random() * ceiling / 2)

    def _deliver(self, pub: Publication) -> None:
        """Queue ``pub`` for the program unless it was queued before (a replay)."""
        if self._state.fresh(pub):
            self._pending.setdefault(pub.channel, collections.deque()).append(
                (pub.epoch, pub.offset)
            )
            self._queue.put_nowait(pub)

    # -- WebSocket -----------------------------------------------------------------------

    async def _run_ws(self, token: str | None, established: asyncio.Event) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        state = self._state
        ws_url = "ws" + self.base.removeprefix("http") + "/connection/websocket"
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
                live = _Live(ws, len(commands))
                try:
                    await self._read_ws(ws, waiting, live, epochs, established)
                finally:
                    self._live = None
                    live.lost()
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else 1006
            if _terminal(code):
                reason = exc.rcvd.reason if exc.rcvd is not None else ""
                raise SubscriptionClosed(code, reason) from None
            raise _Retry(f"closed with {code}") from None

    async def _read_ws(
        self,
        ws: ClientConnection,
        waiting: dict[int, dict[str, Any]],
        live: _Live,
        epochs: dict[str, str],
        established: asyncio.Event,
    ) -> None:
        while True:
            frame = await asyncio.wait_for(ws.recv(), self._read_timeout)
            for line in (frame if isinstance(frame, str) else frame.decode()).split("\n"):
                if not line:
                    continue
                msg = json.loads(line)
                if not msg:
                    await ws.send("{}")  # ping -> pong
                elif "id" in msg:
                    if live.answered(msg):
                        continue
                    cmd = waiting.pop(msg["id"], None)
                    if cmd is None:
                        continue
                    if "error" in msg:
                        err = msg["error"]
                        code = int(err.get("code", 0))
                        if code in _REFUSALS:
                            raise SubscriptionClosed(code, str(err.get("message", "")))
                        raise _Retry(f"error {code}")
                    if "subscribe" in cmd:
                        channel = cmd["subscribe"]["channel"]
                        self._on_ws_subscribed(channel, msg["subscribe"], epochs)
                    if not waiting:
                        self._live = live
                        established.set()
                elif "push" in msg:
                    push = msg["push"]
                    channel = push.get("channel", "")
                    if "pub" in push:
                        pub = _publication(channel, epochs.get(channel, ""), push["pub"])
                        self._deliver(pub)
                    elif "unsubscribe" in push and push["unsubscribe"].get("code", 0) >= 2500:
                        raise _Retry("server asks to resubscribe")
                    elif "disconnect" in push:
                        d = push["disconnect"]
                        if _terminal(int(d.get("code", 0))):
                            raise SubscriptionClosed(int(d["code"]), str(d.get("reason", "")))

    def _on_ws_subscribed(
        self,
        channel: str,
        res: dict[str, Any],
        epochs: dict[str, str],
    ) -> None:
        state = self._state
        epoch = str(res.get("epoch", ""))
        epochs[channel] = epoch
        if res.get("was_recovering") and not res.get("recovered"):
            state.unrecovered([channel])
        for p in res.get("publications") or []:
            self._deliver(_publication(channel, epoch, p))
        state.reached(channel, epoch, int(res.get("offset", 0)))

    # -- SSE -----------------------------------------------------------------------------

    def _headers(self, token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def _run_sse(self, token: str | None, established: asyncio.Event) -> None:
        """Read ``/sse``; the server's ``ping`` events keep a watchdog quiet: a stream
        silent for twice the interval the ``subscribed`` event gave is reconnected to
        (a proxy may stall a stream without closing it)."""
        import httpx

        state = self._state
        params: list[tuple[str, str | int | float | bool | None]]
        params = [("channel", ch) for ch in state.channels]
        headers = {"Accept": "text/event-stream", **self._headers(token)}
        resume = state.cursor()
        if resume:
            headers["Last-Event-ID"] = resume
        silence = self._read_timeout
        timeout = httpx.Timeout(10.0, read=None)
        async with (
            httpx.AsyncClient(timeout=timeout) as http,
            http.stream("GET", self.base + "/sse", params=params, headers=headers) as resp,
        ):
            if resp.status_code != 200:
                raise _refusal(resp.status_code, await resp.aread())
            parser = SSEParser(max_line=self._max_line, max_event=self._max_line)
            chunks = resp.aiter_bytes()
            while True:
                try:
                    async with asyncio.timeout(silence):
                        chunk = await anext(chunks, None)
                except TimeoutError:
                    raise _Retry(f"no byte in {silence:g}s") from None
                if chunk is None:
                    raise _Retry("stream ended")
                for event in parser.feed(chunk):
                    ping = self._on_sse_event(event, established)
                    if ping:
                        silence = 2 * ping

    def _on_sse_event(self, event: Event, established: asyncio.Event) -> float:
        """Act on one event; returns the heartbeat interval of a ``subscribed`` event, else 0."""
        state = self._state
        name = event.event
        if name == "ping":
            return 0
        body = json.loads(event.data)
        if name == "subscribed":
            for channel, (epoch, offset) in decode_cursor(event.id).items():
                last = state.positions.get(channel)
                if last is None or last[0] != epoch:
                    state.positions[channel] = (epoch, offset)
            established.set()
            ping = body.get("ping") if isinstance(body, dict) else None
            return float(ping) if isinstance(ping, int | float) and ping > 0 else 0
        if name == "unrecovered":
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
            self._deliver(_http_publication(body))
        return 0

    # -- long-poll and poll --------------------------------------------------------------

    async def _run_poll(self, token: str | None, established: asyncio.Event) -> None:
        """Ask ``/poll`` in a loop, from the position reached: held up to ``poll_timeout``
        (long-poll), or at once every ``poll_interval`` seconds (poll)."""
        import httpx

        state = self._state
        long = self.transport == "longpoll"
        held = self._poll_timeout if long else 0.0
        timeout = httpx.Timeout(10.0, read=held + 10.0)
        async with httpx.AsyncClient(timeout=timeout, headers=self._headers(token)) as http:
            while True:
                params: list[tuple[str, str | int | float | bool | None]]
                params = [("channel", ch) for ch in state.channels]
                resume = state.cursor()
                if resume:
                    params.append(("cursor", resume))
                params.append(("timeout", f"{held:g}" if resume else "0"))
                resp = await http.get(self.base + "/poll", params=params)
                if resp.status_code != 200:
                    raise _refusal(resp.status_code, resp.content)
                established.set()
                body = resp.json()
                state.unrecovered(list(body.get("unrecovered") or []))
                for p in body.get("publications") or []:
                    self._deliver(_http_publication(p))
                for channel, (epoch, offset) in decode_cursor(body["cursor"]).items():
                    state.reached(channel, epoch, offset)
                if not long and resume:
                    await asyncio.sleep(self._poll_interval)

    # -- commands ------------------------------------------------------------------------

    async def _call(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        """One command: on the live WebSocket if there is one, else ``POST /call/<name>``."""
        live = self._live
        if live is not None:
            return await live.command(name, request)
        import httpx

        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=self._read_timeout))
        resp = await self._http.post(
            f"{self.base}/call/{name}",
            json=request,
            headers=self._headers(await self._current_token()),
        )
        if resp.status_code != 200:
            raise _error(resp.status_code, resp.content)
        result: dict[str, Any] = resp.json()
        return result

    async def rpc(self, method: str, data: Any = None) -> Any:
        """Call the server's RPC handler of ``method``; its answer (None without data)."""
        request: dict[str, Any] = {"method": method}
        if data is not None:
            request["data"] = data
        return (await self._call("rpc", request)).get("data")

    async def publish(self, channel: str, data: Any) -> None:
        """Publish ``data`` to ``channel`` as this client (the namespace must allow it)."""
        await self._call("publish", {"channel": channel, "data": data})

    async def history(
        self,
        channel: str,
        *,
        limit: int | None = None,
        since: Position | None = None,
        reverse: bool = False,
    ) -> HistoryResult:
        """A channel's history: ``limit`` publications (all with -1), after ``since``."""
        request: dict[str, Any] = {"channel": channel, "reverse": reverse}
        if limit is not None:
            request["limit"] = limit
        if since is not None:
            request["since"] = {"epoch": since[0], "offset": since[1]}
        return msgspec.convert(await self._call("history", request), HistoryResult)

    async def presence(self, channel: str) -> PresenceResult:
        return msgspec.convert(await self._call("presence", {"channel": channel}), PresenceResult)

    async def presence_stats(self, channel: str) -> PresenceStatsResult:
        result = await self._call("presence_stats", {"channel": channel})
        return msgspec.convert(result, PresenceStatsResult)


def subscribe(
    url: str,
    channels: list[str] | str,
    transport: Transport = "ws",
    token: str | None = None,
    **options: Any,
) -> Subscription:
    """The publications of ``channels``, forever (until the loop is left or it is closed).

    ``url`` is the server's HTTP base URL (``http://host:8000``). ``token`` is a
    connection token; ``get_token`` is awaited for a fresh one on every
    (re)connect instead. ``cursor`` resumes from a cursor saved earlier (any
    transport's). ``max_line`` bounds, in bytes, one SSE line and one event's
    data: a server (or proxy) sending more is dropped and reconnected to, with
    a warning. ``poll_timeout`` is how long a long-poll is held, ``poll_interval``
    the pause between polls. Iterating raises :class:`SubscriptionClosed` when
    the server refuses for good. See :class:`Subscription` for the commands.
    """
    return Subscription(url, channels, transport, token, **options)


class SyncSubscription:
    """A :class:`Subscription` for a script without asyncio: a thread runs its loop.

    Iterate it for publications; ``close()`` (or leaving ``with``) stops the
    thread and closes the connection. The commands block until answered.
    """

    def __init__(self, subscription: Subscription) -> None:
        self._subscription = subscription
        self._items: queue.Queue[Publication | BaseException | None] = queue.Queue()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._pump = asyncio.run_coroutine_threadsafe(self._forward(), self._loop)
        self._closed = False

    async def _forward(self) -> None:
        try:
            async for pub in self._subscription:
                self._items.put(pub)
        except Exception as exc:
            self._items.put(exc)
        finally:
            self._items.put(None)

    def __iter__(self) -> Iterator[Publication]:
        return self

    def __next__(self) -> Publication:
        if self._closed:
            raise StopIteration
        item = self._items.get()
        if item is None:
            self._items.put(None)  # every later call ends too
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def __enter__(self) -> SyncSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def cursor(self) -> str | None:
        return self._subscription.cursor

    def _run(self, work: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout)

    def rpc(self, method: str, data: Any = None) -> Any:
        return self._run(self._subscription.rpc(method, data))

    def publish(self, channel: str, data: Any) -> None:
        self._run(self._subscription.publish(channel, data))

    def history(self, channel: str, **options: Any) -> HistoryResult:
        return self._run(self._subscription.history(channel, **options))

    def presence(self, channel: str) -> PresenceResult:
        return self._run(self._subscription.presence(channel))

    def presence_stats(self, channel: str) -> PresenceStatsResult:
        return self._run(self._subscription.presence_stats(channel))

    def close(self) -> None:
        """Close the connection and stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pump.cancel()
        with contextlib.suppress(Exception):
            self._run(self._subscription.aclose(), timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def subscribe_sync(
    url: str,
    channels: list[str] | str,
    transport: Transport = "ws",
    token: str | None = None,
    **options: Any,
) -> SyncSubscription:
    """``for pub in subscribe_sync(url, channels): ...``: :func:`subscribe` for scripts."""
    return SyncSubscription(Subscription(url, channels, transport, token, **options))
