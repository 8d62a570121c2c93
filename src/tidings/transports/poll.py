"""Long-polling and polling: ``GET /poll?channel=a&cursor=C&timeout=30``.

The response is ``{"publications": [...], "cursor": "...", "unrecovered": [...]}``
with the same cursor as SSE, so the two can be mixed. ``timeout=0`` is plain
polling.

A held long-poll is small on purpose (the benchmark holds tens of thousands):
a :class:`PollWaiter` of five slots registered on its channels, and nothing
else — no task, no coroutine, no timer and not the request (the connection
keeps only how to answer it). Deadlines are grouped by the second they fall
in, one loop timer per second that has any.

The cursor of an answer is built from what the waiter was given: the
positions its join returned (kept encoded, as the cursor it would have
answered with), advanced by each publication delivered, which carries its own
position. Waiters of the same channels, started at the same cursor and given
the same publications, get the same bytes: they are encoded once per wake-up
(DESIGN principle 2). The first publication wakes a waiter; it is answered on
the next loop iteration, so publications of one moment (a broadcast) travel in
one response.

The application's ``connect`` hook is asked on every request, as transport
``longpoll`` (a cursor and a timeout above 0: the request may be held) or
``poll``: there is no connection between two polls to remember its answer by.
For the same reason no disconnect event is emitted for either.
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from ..auth import Access
from ..codec import encode, http_publication_json
from ..config import PollConfig
from ..connections import Connections
from ..cursor import decode_cursor, encode_cursor
from ..errors import ErrorCode, ProtocolError
from ..gate import Gate
from ..hooks import Hooks, TransportName
from ..http import Response, Router
from ..hub import Hub, Position, PresenceEvent, Publication
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

_T = TypeVar("_T")

#: Answers built in one wake-up, by channels: (start cursor, publications, response).
Answers = dict[tuple[str, ...], tuple[str, list[Publication], Response]]


def poll_response(
    publications: list[Publication] | tuple[Publication, ...],
    positions: dict[str, Position],
    unrecovered: list[str],
) -> Response:
    """The poll body, built from each publication's shared HTTP encoding."""
    body = b"".join(
        [
            b'{"publications":[',
            b",".join(pub.encoded(http_publication_json) for pub in publications),
            b'],"cursor":',
            encode(encode_cursor(positions)),
            b',"unrecovered":',
            encode(unrecovered),
            b"}",
        ]
    )
    return Response(
        200, body, [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
    )


#: Distinct poll URLs whose reading is kept (:class:`PollQuery`), and the
#: longest URL kept: a client sending ever new URLs replaces the oldest, so
#: at most about ``_QUERIES * 3 * _QUERY_URL`` bytes are held for them.
_QUERIES = 256
_QUERY_URL = 1024


class PollQuery:
    """What a poll URL asks (channels, timeout, cursor), read once per distinct URL.

    After a broadcast every long-poll of a channel comes back with the same
    cursor, so with the same URL: reading it once for all of them saved
    ~4 % of the CPU per delivery (the query split, the timeout, the cursor's
    base64 and JSON). Only what the URL alone decides is kept; the token and
    the subscription tokens are checked on every request. Nothing here is
    changed once made: every request of that URL shares it.
    """

    __slots__ = ("channels", "cursor", "held", "since", "timeout", "transport")

    def __init__(self, request: Request, poll: PollTransport) -> None:
        # What the request says is checked before the token, the hooks or the hub are asked.
        self.channels = channel_names(request)
        #: The channels of a held poll, in the order its answers are shared by.
        self.held = tuple(sorted(self.channels))
        self.timeout = poll.timeout(request)
        cursor = request.query_value("cursor")
        self.since = requested_positions(cursor)
        #: Interned: the cursor a poll held at it answers from (PollWaiter.since).
        self.cursor = sys.intern(cursor) if cursor and self.since is not None else ""
        self.transport: TransportName = (
            "poll" if self.since is None or self.timeout == 0 else "longpoll"
        )


class PollWaiter:
    """A held long-poll: answered on the first publication or at its deadline."""

    __slots__ = ("channels", "conn", "deadline", "poll", "publications", "since", "skipped")

    #: Polls have no client id, which no publish ``exclude`` names (hub.Subscriber).
    client_id = ""

    def __init__(self, poll: PollTransport, conn: Exchange, channels: tuple[str, ...]):
        self.poll = poll
        self.conn = conn
        self.channels = channels
        self.publications: list[Publication] | None = None
        #: The cursor of the positions the join returned (set once joined).
        self.since = ""
        #: The second whose timer answers this waiter; 0 until held and once it has left.
        self.deadline = 0
        #: A channel already joined skipped while later ones were joining.
        self.skipped = False

    def deliver(self, pub: Publication) -> None:
        if self.skipped:
            return  # past the hole: the answer stops before it
        if self.publications is None:
            self.publications = [pub]
            if self.deadline:
                self.poll.wake(self)
        else:
            self.publications.append(pub)

    def insufficient_state(self) -> None:
        """The channel's stream skipped (a remote broker lost part of it): answer
        now with what was delivered before the skip, so the client re-polls from
        a cursor before it and learns there, as ``unrecovered``, what history no
        longer holds. Staying held would hand over the next publication of the
        new stream as if nothing had been lost.

        While the poll is still joining its channels (not held yet), the skip
        is remembered and the join's end answers at once, with nothing from
        past the hole: answering is the handler's then, and a signal dropped
        here let the next publication of the new stream through unannounced.
        """
        if self.deadline:
            self.poll.answer(self, {})
        else:
            self.skipped = True

    def deliver_presence(self, event: PresenceEvent) -> None:
        """Polls carry no join/leave events."""

    def answer_now(self) -> None:
        self.poll.answer(self, {})

    def cancel(self) -> None:
        self.poll.release(self)


class PollTransport:
    def __init__(
        self,
        hub: Hub,
        access: Access,
        connections: Connections,
        config: PollConfig,
        *,
        hooks: Hooks | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.hub = hub
        self.metrics = metrics or Metrics()
        self.access = access
        self.hooks = hooks = hooks or Hooks()
        #: Where the access rules and the application's hooks let clients in.
        self.gate = Gate(access, hooks)
        self.connections = connections
        self.default_timeout = config.default_timeout
        self.max_timeout = config.max_timeout
        #: Recent URLs read (bounded: _QUERIES), oldest first.
        self._queries: dict[bytes, PollQuery] = {}
        self._buckets: dict[int, set[PollWaiter]] = {}
        self._woken: list[PollWaiter] = []
        #: The loop, once known: asking asyncio for it is a getpid() system call.
        self._loop: asyncio.AbstractEventLoop | None = None

    def mount(self, router: Router) -> None:
        router.add("GET", "/poll", self.handle)

    async def start(self) -> None:
        """Nothing runs in the background: deadlines are loop timers made as polls are held."""

    async def stop(self) -> None:
        """Held polls are connections: graceful shutdown answers them."""

    def timeout(self, request: Request) -> float:
        text = request.query_value("timeout")
        if text is None:
            return self.default_timeout
        try:
            timeout = float(text)
        except ValueError:
            message = f"timeout={text!r} is not a number"
            raise ProtocolError(ErrorCode.BAD_REQUEST, message) from None
        if not 0 <= timeout <= self.max_timeout:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"timeout must be between 0 and {self.max_timeout:g}"
            )
        return timeout

    def handle(
        self, request: Request, conn: Exchange
    ) -> Response | Coroutine[Any, Any, Response | None] | None:
        """Answer or hold the poll; without a task when nothing on the way can wait.

        Nothing waits when no ``connect`` or ``subscribe`` hook is registered
        and the broker lives in this process (``Broker.remote`` false: its
        calls complete without waiting): then the coroutine below runs to its
        end here, synchronously, as an eager task would (Python 3.12), and the
        connection makes no task. A task per request, with the objects it kept
        alive until the loop ran it, was the largest part of a delivery's CPU
        (the garbage collector's full passes over them included).
        """
        answer = self._handle(request, conn)
        hooks = self.hooks
        if hooks.connect is not None or hooks.subscribe is not None or self.hub.broker.remote:
            return answer
        return completed(answer)

    def query(self, request: Request) -> PollQuery:
        """What ``request``'s URL asks, read once per distinct URL (bounded)."""
        url = request.target
        query = self._queries.get(url)
        if query is None:
            query = PollQuery(request, self)  # a bad URL raises: nothing is kept of it
            if len(url) <= _QUERY_URL:
                queries = self._queries
                if len(queries) >= _QUERIES:
                    del queries[next(iter(queries))]
                queries[url] = query
        return query

    async def _handle(self, request: Request, conn: Exchange) -> Response | None:
        hub = self.hub
        query = self.query(request)
        channels, since, timeout, transport = (
            query.channels,
            query.since,
            query.timeout,
            query.transport,
        )
        credentials = await admit(request, self.gate, transport)
        await authorize_channels(request, self.gate, credentials, channels, transport)
        if since is None or timeout == 0 or self.connections.stopping:
            joined = await join(hub, channels, since, None)
            self.metrics.unrecovered(transport, len(joined.unrecovered))
            return poll_response(joined.publications, joined.positions, joined.unrecovered)
        waiter = PollWaiter(self, conn, query.held)
        joined = await join(hub, channels, since, waiter)
        self.metrics.unrecovered(transport, len(joined.unrecovered))
        # With a remote broker, publications can reach the waiter mid-join.
        early = waiter.publications or []
        if joined.publications or joined.unrecovered or early or waiter.skipped:
            leave(hub, channels, waiter)
            positions = joined.positions | {pub.channel: pub.position for pub in early}
            return poll_response(joined.publications + early, positions, joined.unrecovered)
        # Interned: waiters held at the same positions (the usual case: every
        # subscriber of a channel at its head) share one string, instead of
        # 81 bytes each (tracemalloc, 2,000 held polls). Held where it asked
        # (the usual case again), the poll's own cursor is that string.
        if joined.positions == since:
            waiter.since = query.cursor
        else:
            waiter.since = sys.intern(joined.cursor)
        conn.hold(waiter, request)
        self._hold(waiter, timeout)
        self.metrics.connected("longpoll")
        return None

    @property
    def num_held(self) -> int:
        """Long-polls held now (read when metrics are scraped)."""
        return sum(len(bucket) for bucket in self._buckets.values())

    # -- held polls --------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _hold(self, waiter: PollWaiter, timeout: float) -> None:
        loop = self.loop
        second = math.ceil(loop.time() + timeout)
        bucket = self._buckets.get(second)
        if bucket is None:
            bucket = self._buckets[second] = set()
            loop.call_at(second, self._expire, second)
        bucket.add(waiter)
        waiter.deadline = second

    def _expire(self, second: int) -> None:
        answers: Answers = {}
        for waiter in self._buckets.pop(second, ()):
            self.answer(waiter, answers)

    def wake(self, waiter: PollWaiter) -> None:
        self._woken.append(waiter)
        if len(self._woken) == 1:
            self.loop.call_soon(self._answer_woken)

    def _answer_woken(self) -> None:
        woken, self._woken = self._woken, []
        answers: Answers = {}
        for waiter in woken:
            self.answer(waiter, answers)

    def release(self, waiter: PollWaiter) -> bool:
        """Take the waiter off its channels and its deadline; False if already done."""
        if not waiter.deadline:
            return False
        bucket = self._buckets.get(waiter.deadline)
        if bucket is not None:
            bucket.discard(waiter)
        waiter.deadline = 0
        leave(self.hub, waiter.channels, waiter)
        return True

    def answer(self, waiter: PollWaiter, answers: Answers) -> None:
        """Answer a held poll with what it got; ``answers`` shares bytes between waiters."""
        if not waiter.deadline:
            return  # answered or gone already
        self.release(waiter)
        publications = waiter.publications or []
        cached = answers.get(waiter.channels)
        # Lists of publications compare by identity (Publication has no __eq__), in C.
        if cached is not None and cached[0] == waiter.since and cached[1] == publications:
            response = cached[2]
        else:
            positions = decode_cursor(waiter.since)
            for pub in publications:
                positions[pub.channel] = pub.position
            response = poll_response(publications, positions, [])
            answers[waiter.channels] = (waiter.since, publications, response)
        waiter.conn.respond_held(response)


def completed(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """The result of a coroutine that cannot wait, run to its end without a task.

    A coroutine that never awaits anything pending finishes on its first
    step; one that stopped half-way (it awaited something that waits) would
    need a task to go on, and is a bug of the caller's promise: it is closed
    (its ``finally`` clauses run) and the error raised.
    """
    try:
        coroutine.send(None)
    except StopIteration as done:
        result: _T = done.value
        return result
    coroutine.close()
    raise RuntimeError(f"{coroutine!r} waited, but was run as one that cannot")
