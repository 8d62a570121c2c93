"""Server-Sent Events: ``GET /sse?channel=a&channel=b``.

After the response head, the HTTP connection object is dropped and the socket
belongs to an :class:`SSEStream` — a protocol object with four slots, the
whole per-connection cost of an idle subscriber besides the transport itself.

Each event's ``id:`` is a cursor holding the position of every channel of the
stream, so ``Last-Event-ID`` alone resumes all of them. That makes the event
bytes depend on the stream's channel set, not only on the publication; streams
with the same channel set share a :class:`Feed`, which encodes each
publication once for all of them (DESIGN principle 2).

An event's cursor is built from what was delivered, never from the hub's
state: a stream starts at the positions its join returned, and each
publication carries its own position. Live streams of one feed have received
the same publications in the same order, so the feed keeps one set of
positions for all of them, advanced by each publication it encodes.

Heartbeats are written by one periodic task, not a timer per connection, and
spread over the interval by a :class:`HeartbeatWheel`: each tick visits one
slice of the streams, so no loop turn writes to all of them at once (at
10,000 streams that turn held every publication back for tens of ms, capping
bench ``--rooms`` at 400 publications/s on SSE). The same visit finds the
streams whose connection expired: a token's are closed (3005); one the
``connect`` hook gave an ``expire_at`` is put to the ``refresh`` hook first, in
a bounded number of tasks of its own, so a slow hook never delays a heartbeat.

The application hears of every stream that ends (:class:`DisconnectEvent`,
only when something listens) with the code and reason that say why: the
client went away (3000), shutdown (3001), expired (3005), a slow reader
(3008), a stream that skipped (3010), a server unsubscribe (3011) or the
server API's disconnect (its code).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import TYPE_CHECKING, Generic, TypeVar

from ..auth import Access, Credentials
from ..codec import encode, http_publication_json
from ..config import LimitsConfig, SSEConfig
from ..connections import Connections
from ..cursor import encode_cursor
from ..errors import DisconnectCode, ProtocolError
from ..gate import Gate
from ..hooks import Disconnect, DisconnectEvent, Hooks, RefreshCall, Refuse, encode_json
from ..http import Response, Router
from ..http.cors import CORS
from ..hub import Hub, Position, PresenceEvent, Publication
from ..logs import log_client_error
from ..metrics import Metrics
from .common import (
    admit,
    authorize_channels,
    channel_names,
    join,
    leave,
    requested_positions,
)

if TYPE_CHECKING:
    from ..http import Exchange, Request

log = logging.getLogger(__name__)

T = TypeVar("T")

#: What a stream hears when it would otherwise be silent. A named event, not
#: the ``:`` comment it used to be: ``EventSource`` never exposes comments, so
#: a stream a proxy stalled went unnoticed. Its ``data`` is ``{}`` because an
#: event with empty data is not dispatched. The ``subscribed`` event's
#: ``ping`` says how long the silence between two may last (a contract with
#: tidings.js's watchdog and the Python client, which ignores ``ping``).
HEARTBEAT = b"event: ping\ndata: {}\n\n"

#: ``refresh`` hook calls running at once (as many as the Centrifugo sessions'
#: per transport). Streams expiring beyond it wait for a later heartbeat (still
#: open, still receiving): a hook that hangs holds at most this many tasks,
#: whatever the number of streams that expire together.
MAX_REFRESHING = 1024

#: Seconds between two heartbeat ticks, each visiting one slice of the streams:
#: a stream's ping comes every ``heartbeat_interval`` to within about a tick.
#: 0.1 s makes 150 slices of a 15 s interval, ~70 streams a turn at 10,000.
#: One turn writing to 9,000 streams took 20 ms of CPU (44-106 ms of wall
#: time on the shared machine), one slice of 61 took 0.16 ms
#: (``bench/sse_heartbeat_stall.py --turn --n 9000``).
HEARTBEAT_TICK = 0.1


class HeartbeatWheel(Generic[T]):
    """The streams in ``slices`` groups, one visited per tick (sans-I/O).

    A stream joins the slice visited last, so its first visit comes a whole
    turn after it joined (its head was just written: a ping now would say
    nothing, and a client's test that reads what follows the head sees no
    heartbeat before the interval); streams arriving over time fill the
    slices in turn. :meth:`add` returns the slice, which the caller keeps to
    :meth:`discard` the stream (an int on the stream, rather than a lookup
    table here). :meth:`advance` gives the next slice in turn, so each stream
    is visited exactly once per turn of the wheel.
    """

    __slots__ = ("_next", "_slices")

    def __init__(self, slices: int) -> None:
        self._slices: list[set[T]] = [set() for _ in range(max(1, slices))]
        #: The slice the next tick visits.
        self._next = 0

    def add(self, item: T, ticks: int = 0) -> int:
        """Put ``item`` in the slice visited ``ticks`` ticks from now (0: a whole turn)."""
        index = (self._next - 1 + ticks) % len(self._slices)
        self._slices[index].add(item)
        return index

    def discard(self, item: T, index: int) -> None:
        self._slices[index].discard(item)

    def advance(self) -> tuple[T, ...]:
        """The next slice's members (a copy: visiting one may remove it)."""
        due = tuple(self._slices[self._next])
        self._next = (self._next + 1) % len(self._slices)
        return due

    def __len__(self) -> int:
        return len(self._slices)


def event(data: bytes, *, id: str | None = None, name: str | None = None) -> bytes:
    """One SSE event; ``data`` is single-line JSON, so one ``data:`` line suffices."""
    head = b""
    if id is not None:
        head += b"id: " + id.encode("ascii") + b"\n"
    if name is not None:
        head += b"event: " + name.encode("ascii") + b"\n"
    return head + b"data: " + data + b"\n\n"


class Feed:
    """The event bytes shared by every stream that follows the same channels."""

    __slots__ = (
        "_last_event",
        "_last_pub",
        "channels",
        "last_at",
        "live",
        "positions",
        "streams",
    )

    def __init__(self, channels: tuple[str, ...]) -> None:
        self.channels = channels
        #: Streams using the feed, joining or live; the feed goes with the last.
        self.streams = 0
        #: Streams past their backlog, whose positions are :attr:`positions`.
        self.live = 0
        self.positions: dict[str, Position] = {}
        self._last_pub: Publication | None = None
        self._last_event = b""
        #: When (``time.monotonic()``) its live streams were last written a
        #: publication: proof of life that spares them a ping until the
        #: interval has passed since (one clock read per publication, not per
        #: delivery).
        self.last_at = 0.0

    def go_live(self, positions: dict[str, Position]) -> None:
        """A stream is live at ``positions``: the feed's, unless it has live streams already.

        Live streams have seen the same publications, so their positions
        agree; a stream that joined as history ran ahead of live delivery (a
        remote broker) is ahead only until live delivery passes it.
        """
        if self.live == 0:
            self.positions = {channel: positions[channel] for channel in self.channels}
        self.live += 1

    def event(self, pub: Publication) -> bytes:
        """``pub``'s event, its id the positions right after it; encoded once per feed."""
        if pub is self._last_pub:
            return self._last_event
        self.positions[pub.channel] = pub.position
        cursor = encode_cursor(self.positions)
        self._last_event = event(pub.encoded(http_publication_json), id=cursor)
        self._last_pub = pub
        self.last_at = time.monotonic()
        return self._last_event


class SSEStream(asyncio.Protocol):
    """One subscriber's event stream, once its head and backlog are written."""

    __slots__ = (
        "_backlog",
        "_skipped",
        "credentials",
        "feed",
        "heartbeat_slice",
        "sse",
        "transport",
    )

    #: SSE streams have no client id; the server API reaches them by user.
    client_id = ""

    def __init__(
        self,
        sse: SSETransport,
        feed: Feed,
        transport: asyncio.Transport,
        credentials: Credentials,
    ) -> None:
        self.sse = sse
        self.feed = feed
        self.transport = transport
        self.credentials = credentials
        # Publications that arrive while the stream is still joining its channels.
        self._backlog: list[Publication] | None = []
        #: A channel already joined skipped while later ones were joining.
        self._skipped = False
        #: Its slice of the transport's heartbeat wheel, once live.
        self.heartbeat_slice = -1

    def deliver(self, pub: Publication) -> None:
        if self._backlog is None:
            self.transport.write(self.feed.event(pub))
        elif not self._skipped:
            self._backlog.append(pub)

    def go_live(self, positions: dict[str, Position]) -> None:
        """The stream's head is written and it stands at ``positions``: write what
        arrived meanwhile (with this stream's own cursors), then share the feed's."""
        backlog, self._backlog = self._backlog, None
        if backlog:
            positions = dict(positions)
            for pub in backlog:
                positions[pub.channel] = pub.position
                cursor = encode_cursor(positions)
                self.transport.write(event(pub.encoded(http_publication_json), id=cursor))
        self.feed.go_live(positions)
        if self._skipped:
            self.insufficient_state()

    @property
    def live(self) -> bool:
        return self._backlog is None

    def data_received(self, data: bytes) -> None:
        """A client has nothing to say on an event stream; ignore it."""

    def pause_writing(self) -> None:
        # A slow reader: it cannot flush what we hold, so cut it off; it
        # resumes from its last event id and loses nothing within history.
        # Rate-limited: a thousand slow readers must not write a thousand lines.
        peer = self.transport.get_extra_info("peername")
        log_client_error(
            log,
            "closing slow SSE client %s: over %d bytes unsent",
            peer,
            self.sse.max_write_buffer,
            fields={
                "user": self.credentials.user or None,
                "transport": "sse",
                "code": int(DisconnectCode.SLOW),
                "peer": f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else None,
            },
        )
        self.sse.metrics.slow("sse")
        self.sse.ending(self, DisconnectCode.SLOW, "slow")
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.sse.remove(self)

    def shutdown(self) -> None:
        self.sse.ending(self, DisconnectCode.SHUTDOWN, "shutdown")
        self.transport.write(self.sse.retry_line)
        self.transport.close()

    def insufficient_state(self) -> None:
        """A channel's stream skipped: reconnecting with the last id reports the loss.

        While the stream is still joining, the head is not written yet: the
        backlog stops at the skip (what follows it would be written with ids
        past the hole) and the stream ends once its head and that backlog are
        written, so the resume starts from before the skip.
        """
        if self._backlog is not None:
            self._skipped = True
            return
        self.sse.ending(self, DisconnectCode.INSUFFICIENT_STATE, "insufficient state")
        self.transport.write(self.sse.retry_line)
        self.transport.close()

    def deliver_presence(self, event: PresenceEvent) -> None:
        """SSE carries no join/leave events."""

    def close(self, code: int, reason: str) -> None:
        """Disconnect on the server's initiative, saying why in a ``disconnect`` event."""
        self.sse.ending(self, code, reason)
        self.transport.write(event(encode({"code": code, "reason": reason}), name="disconnect"))
        self.transport.close()

    def server_unsubscribe(self, channel: str, code: int = 2000, reason: str = "") -> bool:
        """An event stream cannot drop one channel: say which, and end the stream.

        Its event ids must keep describing every channel of the stream, so it
        closes with an ``unsubscribed`` event; a client reconnects without the
        channel (tidings.js does), and any new subscription is checked afresh.
        """
        if channel not in self.feed.channels:
            return False
        payload = {"channel": channel, "code": code, "reason": reason or "server unsubscribe"}
        self.sse.ending(self, DisconnectCode.FORCE_RECONNECT, "server unsubscribe")
        self.transport.write(event(encode(payload), name="unsubscribed"))
        self.transport.close()
        return True

    async def server_subscribe(self, channel: str) -> bool:
        """A stream's channels are its URL's: it takes no server-side subscription."""
        return False

    def server_refresh(self, expire_at: int, info: bytes | None, expired: bool) -> bool:
        """Set the stream's expiry (and info, unless None) on the server's
        initiative, or end it now with 3005 (``expired``), as a session's.

        The heartbeat enforces the new expiry as it does a token's: past it
        (and ``auth.expiry_grace``) the stream ends with 3005, or, for a
        stream the ``connect`` hook let in, the ``refresh`` hook is asked.
        """
        if self not in self.sse.streams:
            return False
        if expired:
            self.close(DisconnectCode.CONNECTION_EXPIRED, "connection expired")
            return True
        credentials = self.credentials
        self.credentials = credentials._replace(
            expires=int(expire_at), info=info if info is not None else credentials.info
        )
        return True


class SSETransport:
    """The SSE endpoint and the registry of its live streams."""

    def __init__(
        self,
        hub: Hub,
        access: Access,
        cors: CORS,
        connections: Connections,
        config: SSEConfig,
        limits: LimitsConfig,
        *,
        hooks: Hooks | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.hub = hub
        self.metrics = metrics = metrics or Metrics()
        self.access = access
        self.hooks = hooks = hooks or Hooks()
        #: Where the access rules and the application's hooks let clients in.
        self.gate = Gate(access, hooks)
        self.cors = cors
        self.heartbeat_interval = float(config.heartbeat_interval)
        self.max_write_buffer = limits.max_write_buffer
        self.streams: set[SSEStream] = set()
        connections.include(self.streams)
        self.feeds: dict[tuple[str, ...], Feed] = {}
        self.retry_line = b"retry: %d\n\n" % config.retry_ms
        self._heartbeat: asyncio.Task[None] | None = None
        self._wheel: HeartbeatWheel[SSEStream] = HeartbeatWheel(
            round(self.heartbeat_interval / HEARTBEAT_TICK)
        )
        #: Why the server ended a stream, until its connection is lost and the
        #: disconnect event says so (filled only while something listens).
        self._endings: dict[SSEStream, tuple[int, str]] = {}
        #: Streams whose ``refresh`` hook call is running, and its task.
        self._refreshing: dict[SSEStream, asyncio.Task[None]] = {}

    def mount(self, router: Router) -> None:
        router.add("GET", "/sse", self.handle)

    async def start(self) -> None:
        self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_forever())

    async def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        for task in tuple(self._refreshing.values()):
            task.cancel()

    async def handle(self, request: Request, conn: Exchange) -> Response | None:
        hub = self.hub
        # What the request says is checked before the token, the hooks or the hub are asked.
        channels = channel_names(request)
        since = requested_positions(
            request.headers.get("last-event-id") or request.query_value("last_event_id")
        )
        credentials = await admit(request, self.gate, "sse")
        await authorize_channels(request, self.gate, credentials, channels, "sse")
        if request.method == "HEAD":
            return Response(200, headers=[("Content-Type", "text/event-stream; charset=utf-8")])
        key = tuple(sorted(channels))
        feed = self.feeds.get(key)
        if feed is None:
            feed = self.feeds[key] = Feed(key)
        assert conn.transport is not None
        stream = SSEStream(self, feed, conn.transport, credentials)
        feed.streams += 1
        try:
            joined = await join(hub, channels, since, stream)
        except BaseException:
            self._release(feed)
            raise
        transport = conn.detach()
        transport.set_protocol(stream)
        self.streams.add(stream)
        stream.heartbeat_slice = self._wheel.add(stream)
        self.metrics.connected("sse")
        if joined.unrecovered:
            self.metrics.unrecovered("sse", len(joined.unrecovered))
        hub.add_client(credentials.user, stream)
        head = [
            b"HTTP/1.1 200 OK",
            b"Content-Type: text/event-stream; charset=utf-8",
            b"Cache-Control: no-cache",
            b"X-Accel-Buffering: no",
            b"Connection: close",
            *(f"{name}: {value}".encode("latin-1") for name, value in self.cors.headers(request)),
        ]
        parts = [b"\r\n".join(head) + b"\r\n\r\n", self.retry_line]
        recovered = since is not None and not joined.unrecovered
        subscribed = encode(
            {"channels": channels, "recovered": recovered, "ping": self.heartbeat_interval}
        )
        parts.append(event(subscribed, id=encode_cursor(joined.start), name="subscribed"))
        if joined.unrecovered:
            parts.append(event(encode({"channels": joined.unrecovered}), name="unrecovered"))
        for pub, cursor in joined.cursors():
            parts.append(event(pub.encoded(http_publication_json), id=cursor))
        transport.write(b"".join(parts))
        transport.set_write_buffer_limits(high=self.max_write_buffer)
        stream.go_live(joined.positions)
        return None

    def remove(self, stream: SSEStream) -> None:
        if stream in self.streams:
            self.streams.discard(stream)
            self._wheel.discard(stream, stream.heartbeat_slice)
            self.hub.remove_client(stream.credentials.user, stream)
            leave(self.hub, stream.feed.channels, stream)
            if stream.live:
                stream.feed.live -= 1
            self._release(stream.feed)
            refreshing = self._refreshing.pop(stream, None)
            if refreshing is not None:
                refreshing.cancel()
            ending = self._endings.pop(stream, None)
            if self.hooks.listening:
                code, reason = ending or (3000, "connection closed")
                self.hooks.emit(
                    DisconnectEvent(
                        client="",
                        user=stream.credentials.user,
                        transport="sse",
                        code=code,
                        reason=reason,
                    )
                )

    def ending(self, stream: SSEStream, code: int, reason: str) -> None:
        """The server is ending ``stream`` with ``code``: what its disconnect event
        will say (the first reason given wins: it is the cause, not a consequence)."""
        if self.hooks.listening and stream in self.streams:
            self._endings.setdefault(stream, (code, reason))

    def _release(self, feed: Feed) -> None:
        feed.streams -= 1
        if feed.streams == 0 and self.feeds.get(feed.channels) is feed:
            del self.feeds[feed.channels]

    async def _heartbeat_forever(self) -> None:
        """One slice of the streams per tick; ticks on a fixed schedule, so a
        late tick is caught up one slice per loop turn, never all at once."""
        loop = asyncio.get_running_loop()
        wheel = self._wheel
        tick = self.heartbeat_interval / len(wheel)
        due = loop.time()
        while True:
            due += tick
            await asyncio.sleep(due - loop.time())
            self._beat(wheel.advance())

    def _beat(self, streams: tuple[SSEStream, ...]) -> None:
        """End or refresh the expired of ``streams``; ping the others that were
        silent for the interval.

        A stream whose feed wrote it a publication within the interval needs
        no ping (it is proof of life): it moves to the slice visited when the
        interval since that publication ends, so the silence a client sees
        still never exceeds the interval (plus a tick), and the visit (with its
        expiry check) still comes at least once an interval. In a broadcast
        every stream hears often, and no ping competes with the fan-out.
        """
        expired = self.access.expired
        by_hook = self.hooks.refresh is not None
        now = time.time()
        wheel = self._wheel
        interval = self.heartbeat_interval
        tick = interval / len(wheel)
        quiet_since = time.monotonic() - interval
        for stream in streams:
            credentials = stream.credentials
            if credentials.expires:
                if credentials.by_hook and by_hook:
                    # The hook's expiry is the time to ask it, without the
                    # grace a client gets to bring a new token.
                    if now >= credentials.expires:
                        self._refresh(stream)
                elif expired(credentials):
                    stream.close(DisconnectCode.CONNECTION_EXPIRED, "connection expired")
                    continue
            heard = stream.feed.last_at - quiet_since  # how long until the interval is up
            if heard > tick:
                wheel.discard(stream, stream.heartbeat_slice)
                stream.heartbeat_slice = wheel.add(stream, math.ceil(heard / tick))
            else:
                stream.transport.write(HEARTBEAT)

    # -- refresh by hook -------------------------------------------------

    def _refresh(self, stream: SSEStream) -> None:
        """Ask the ``refresh`` hook about ``stream`` in a task, unless one already
        asks or :data:`MAX_REFRESHING` do (then a later heartbeat asks)."""
        if stream in self._refreshing or len(self._refreshing) >= MAX_REFRESHING:
            return
        task = asyncio.get_running_loop().create_task(self._ask_refresh(stream))
        self._refreshing[stream] = task

    async def _ask_refresh(self, stream: SSEStream) -> None:
        """Extend the stream's expiry as the hook says, or close it.

        ``None``, ``expired=True`` or a :class:`Refuse`: the connection is over
        (3005, as without a hook); a :class:`Disconnect`: closed with its code.
        A hook that fails or times out is asked again at the next heartbeat,
        the stream kept meanwhile, until the expiry plus ``auth.expiry_grace``
        is past (then 3005): a short fault of the application must not cut
        every stream that expires during it (EventSource gives up on the error
        its reconnection would meet), nor may a lasting one keep them forever.
        """
        hooks = self.hooks
        assert hooks.refresh is not None
        credentials = stream.credentials
        call = RefreshCall(transport="sse", protocol="http", client="", user=credentials.user)
        try:
            reply = await hooks.decide("refresh", hooks.refresh, call)
            info = None if reply is None else encode_json(reply.info)
        except Disconnect as exc:
            stream.close(exc.code, exc.reason)
            return
        except Refuse:
            reply, info = None, None
        except ProtocolError:
            # Failed or timed out (logged by ``decide``): asked again at a later
            # heartbeat, until the grace a token's connection would get is past.
            if self.access.expired(credentials):
                stream.close(DisconnectCode.CONNECTION_EXPIRED, "connection expired")
            return
        except TypeError as exc:
            log.error("refresh hook returned an unusable reply: %s", exc)
            return
        finally:
            self._refreshing.pop(stream, None)
        if reply is None or reply.expired:
            stream.close(DisconnectCode.CONNECTION_EXPIRED, "connection expired")
            return
        stream.credentials = credentials._replace(
            expires=int(reply.expire_at), info=credentials.info if info is None else info
        )


__all__ = ["Feed", "HeartbeatWheel", "SSEStream", "SSETransport", "event"]
