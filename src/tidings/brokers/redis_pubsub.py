"""The Redis pub/sub connection of one node: subscribe, read, reconnect.

One dedicated connection (RESP2, so that pub/sub replies arrive as ordinary
replies), read by one task. :meth:`RedisPubSub.subscribe` returns only once
Redis has confirmed *that* SUBSCRIBE on the live connection: Redis answers the
commands of a connection in order, so every SUBSCRIBE queues a future for its
channel and each ``subscribe`` reply resolves the oldest one. A publication
made by any node after ``subscribe`` returns is therefore delivered (the race
the NATS broker had, 8a4b620). A future queued on a connection that breaks
fails, and its caller subscribes again on the next connection.

When the connection breaks, it is replaced with exponential backoff; every
channel still wanted is subscribed again in batches, all confirmations are
awaited (publications arriving meanwhile are handed on), and only then is the
owner told (``on_resubscribed``), so that the history it reads to fill the
hole overlaps the live stream instead of leaving a gap. The owner fills the
hole in a task while the connection keeps being read: it is the owner that
holds back live publications of a channel until its hole is filled. A connection silent for
three ping intervals is taken for dead (a PING is sent whenever it is idle).

Why not redis-py's ``PubSub``: not for speed or memory, where they are equal,
but because three things this node needs are missing from it, and adding them
around it would leave all of this class and lean on its internals besides:

* its ``subscribe()`` returns once SUBSCRIBE is written, not once Redis has
  it: a publication made right after it is missed now and then;
* it reconnects silently inside its next read and resubscribes without
  waiting for Redis, where this node must know when every channel is live
  again to fill the hole from history;
* a ``subscribe()`` cancelled while the socket buffer is full makes redis-py
  drop the connection (``send_packed_command`` disconnects on any
  ``BaseException``), so one client leaving mid-subscribe would cut the whole
  node's fan-out. Here one flusher task writes for everybody.

Measured with ``.venv/bin/python bench/redis_pubsub_reader.py --repeat 3``
(local redis-server 7.0, redis-py 8.1, uvloop, a loaded 2-core machine; see the
script for the method), ours then redis-py's ``PubSub``:

* CPU per message received (100 B): 18.1 vs 20.4 us; with ``hiredis``
  installed (redis-py then parses in C) 7.5 vs 7.1 us. The parser dominates.
* memory per subscribed channel: 30 vs 29 B.
* publications made right after ``subscribe`` returned, missed: 0 of 9,000
  vs 9 of 9,000 (runs of 1,000: 0 to 4 each).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

__all__ = ["RedisPubSub"]

log = logging.getLogger(__name__)

#: Channels per SUBSCRIBE command (a burst of subscribes, a resubscription).
_BATCH = 1000

OnMessage = Callable[[bytes, bytes], None]
OnResubscribed = Callable[[list[bytes]], Coroutine[Any, Any, None]]


class _ConnectionLost(Exception):
    """A SUBSCRIBE's connection broke before Redis confirmed it."""


class RedisPubSub:
    """The pub/sub connection of one node. See the module docstring.

    ``on_message(channel, data)`` gets every publication, in Redis' order.
    ``on_resubscribed(channels)`` starts after a reconnect, once Redis has
    confirmed every channel wanted at that moment, as a task: the connection
    keeps being read (and ``on_message`` called) while it runs, and it is
    cancelled if the connection breaks again. ``on_lost()`` runs when the
    connection breaks, before anything of the next connection is read.
    """

    def __init__(
        self,
        url: str,
        *,
        on_message: OnMessage,
        on_resubscribed: OnResubscribed,
        on_lost: Callable[[], Awaitable[None]],
        subscribe_timeout: float = 5.0,
        ping_interval: float = 5.0,
        max_backoff: float = 5.0,
    ) -> None:
        self._url = url
        self._on_message = on_message
        self._on_resubscribed = on_resubscribed
        self._on_lost = on_lost
        self._subscribe_timeout = subscribe_timeout
        self._ping_interval = ping_interval
        self._max_backoff = max_backoff
        self._pool: ConnectionPool = ConnectionPool.from_url(
            url,
            socket_timeout=None,
            socket_connect_timeout=5,
            retry=Retry(NoBackoff(), 0),
            protocol=2,
        )
        #: The channels this node wants, whether or not Redis has confirmed them.
        #: A dict as a set: its compact table costs about 30 B per channel, a set's
        #: about 100 (tracemalloc, 5,000 channels).
        self._wanted: dict[bytes, None] = {}
        #: Per channel, one future per SUBSCRIBE sent on the current connection and
        #: not yet confirmed, oldest first (replies come in command order).
        self._awaiting: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._conn: AbstractConnection | None = None
        self._connected = asyncio.Event()
        #: Set when the current connection breaks; a new one for each connection.
        self._lost = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._last_read = 0.0
        self._reader: asyncio.Task[None] | None = None
        #: The owner's ``on_resubscribed`` after the last reconnect, while it runs.
        self._resubscribed: asyncio.Task[None] | None = None
        #: SUBSCRIBEs to send, and the task sending them (see ``_queue_subscribe``).
        self._outbox: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._ever_connected = False

    @property
    def healthy(self) -> bool:
        """Connected, with every channel wanted at the (re)connect confirmed."""
        return self._connected.is_set()

    @property
    def ever_connected(self) -> bool:
        """Whether a connection was ever up: only a reconnect is followed by ``on_resubscribed``."""
        return self._ever_connected

    async def start(self) -> None:
        """Start connecting; wait up to ``subscribe_timeout`` for the first connection."""
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._run(), name="tidings-redis-pubsub")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), self._subscribe_timeout)

    async def close(self) -> None:
        self._closing = True
        tasks = (self._reader, self._flusher, self._resubscribed, *self._tasks)
        for task in tasks:
            if task is not None:
                task.cancel()
        # Closed before waiting: should a cancellation get lost in a callback
        # or in redis-py, the reader's next read fails and it sees ``_closing``.
        await self._drop_connection()
        for task in tasks:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._reader = None
        await self._pool.disconnect()

    # -- subscribing ---------------------------------------------------------

    async def subscribe(self, channel: bytes) -> None:
        """Return once Redis has confirmed a SUBSCRIBE to ``channel`` on the live connection.

        Raises :class:`TimeoutError` after ``subscribe_timeout`` (Redis down);
        the channel stays wanted until :meth:`unsubscribe`.
        """
        self._wanted[channel] = None
        async with asyncio.timeout(self._subscribe_timeout):
            while True:
                await self._connected.wait()
                lost = self._lost
                confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._queue_subscribe(channel, confirmed)
                try:
                    await confirmed
                except _ConnectionLost:
                    # The reader failed every future queued on the broken
                    # connection; subscribe again on the next one.
                    await lost.wait()
                    continue
                return

    def _queue_subscribe(self, channel: bytes, confirmed: asyncio.Future[None]) -> None:
        """Have SUBSCRIBE ``channel`` sent, and ``confirmed`` resolved by its reply.

        The caller does not write itself: redis-py drops the connection when a
        send is cancelled half-way, and a caller may be cancelled (its client
        left, or its timeout ran out) while the socket buffer is full. One
        flusher task writes what is queued, up to ``_BATCH`` channels per
        command, so a burst of subscriptions also costs few commands.
        """
        self._outbox.append((channel, confirmed))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._outbox:
            batch = self._outbox[:_BATCH]
            del self._outbox[:_BATCH]
            async with self._write_lock:
                if self._lost.is_set() or self._conn is None:
                    for _, confirmed in batch:
                        _fail(confirmed)
                    continue
                # Queued in the order written: Redis replies in command order.
                for channel, confirmed in batch:
                    self._awaiting.setdefault(channel, deque()).append(confirmed)
                # On failure the reader finds the connection broken and fails
                # every future queued on it, these with the rest. A link killed
                # under us (CLIENT KILL) may already have a closed transport,
                # which asyncio reports as RuntimeError (seen by the chaos run).
                with contextlib.suppress(RedisError, OSError, RuntimeError):
                    await self._write(b"SUBSCRIBE", *(channel for channel, _ in batch))

    def unsubscribe(self, channel: bytes) -> None:
        """Stop wanting ``channel``; the UNSUBSCRIBE is sent in the background."""
        if channel not in self._wanted:
            return
        del self._wanted[channel]
        if self._connected.is_set() and not self._closing:
            task = asyncio.get_running_loop().create_task(self._unsubscribe_later(channel))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _unsubscribe_later(self, channel: bytes) -> None:
        async with self._write_lock:
            # Wanted again meanwhile: keep the subscription.
            if channel in self._wanted or self._conn is None:
                return
            with contextlib.suppress(RedisError, OSError, RuntimeError):
                await self._write(b"UNSUBSCRIBE", channel)

    # -- the connection ------------------------------------------------------

    async def _write(self, *args: bytes) -> None:
        """Send one command; the caller holds ``_write_lock``."""
        conn = self._conn
        if conn is None:
            raise ConnectionError("not connected")
        await conn.send_command(*args, check_health=False)

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect()

    def _fail_awaiting(self) -> None:
        awaiting, self._awaiting = self._awaiting, {}
        for futures in awaiting.values():
            for future in futures:
                _fail(future)

    async def _run(self) -> None:
        failures = 0
        while not self._closing:
            try:
                await self._connect_and_resubscribe()
                failures = 0
                await self._read_forever()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                was_connected = self._connected.is_set()
                self._connected.clear()
                self._lost.set()
                await self._stop_resubscribed()
                self._fail_awaiting()
                await self._drop_connection()
                with contextlib.suppress(Exception):
                    await self._on_lost()
                if self._closing:
                    return
                if was_connected:
                    log.warning("lost the redis pub/sub connection (%s); reconnecting", exc)
                elif failures == 0:
                    log.warning("cannot reach redis at %s (%s); retrying", self._url, exc)
                failures += 1
                delay = min(self._max_backoff, 0.05 * 2**failures) * random.uniform(0.5, 1.0)
                await asyncio.sleep(delay)

    async def _stop_resubscribed(self) -> None:
        """Cancel the owner's catch-up of the connection that just broke: it
        starts again, from what was delivered by then, after the next one."""
        task, self._resubscribed = self._resubscribed, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if not task.cancelled() and task.exception() is not None:
            log.error("catching up after a reconnect failed", exc_info=task.exception())

    async def _connect_and_resubscribe(self) -> None:
        conn: AbstractConnection = self._pool.make_connection()  # type: ignore[no-untyped-call]
        await conn.connect()  # type: ignore[no-untyped-call]
        self._conn = conn
        self._lost = asyncio.Event()
        self._last_read = time.monotonic()
        channels = list(self._wanted)
        if channels:
            loop = asyncio.get_running_loop()
            confirmations: list[asyncio.Future[None]] = []
            async with self._write_lock:
                for start in range(0, len(channels), _BATCH):
                    batch = channels[start : start + _BATCH]
                    for channel in batch:
                        confirmed = loop.create_future()
                        self._awaiting.setdefault(channel, deque()).append(confirmed)
                        confirmations.append(confirmed)
                    await self._write(b"SUBSCRIBE", *batch)
            # Every confirmation before anything else, so that the history the
            # owner reads next and the live stream overlap instead of leaving a hole.
            for confirmed in confirmations:
                while not confirmed.done():
                    self._dispatch(await self._read(conn))
        self._connected.set()
        if self._ever_connected:
            log.info("reconnected to redis; resubscribed %d channels", len(channels))
            # A task, so that this connection is read while the owner fills the
            # hole: with thousands of channels that takes many round trips, and
            # a link left unread meanwhile fills Redis' pub/sub output buffer
            # until Redis cuts it again (client-output-buffer-limit pubsub).
            self._resubscribed = asyncio.get_running_loop().create_task(
                self._on_resubscribed(channels), name="tidings-redis-catch-up"
            )
        else:
            log.info("connected to redis at %s", self._url)
        self._ever_connected = True

    async def _read_forever(self) -> None:
        conn = self._conn
        assert conn is not None
        watchdog = asyncio.get_running_loop().create_task(self._watch())
        try:
            while not self._closing:
                self._dispatch(await self._read(conn))
        finally:
            watchdog.cancel()

    def _dispatch(self, reply: Any) -> None:
        """Hand on a publication; match a ``subscribe`` reply to its SUBSCRIBE."""
        if not isinstance(reply, list):
            return  # a PONG while nothing is subscribed
        kind = reply[0]
        if kind == b"message":
            self._on_message(reply[1], reply[2])
        elif kind == b"subscribe":
            futures = self._awaiting.get(reply[1])
            if futures:
                confirmed = futures.popleft()
                if not futures:
                    del self._awaiting[reply[1]]
                    if not self._awaiting:
                        self._awaiting = {}  # a dict keeps its table after a burst
                if not confirmed.done():  # its caller may have timed out
                    confirmed.set_result(None)

    async def _read(self, conn: AbstractConnection) -> Any:
        """The next reply; a connection silent for three ping intervals is dead."""
        try:
            async with asyncio.timeout(3 * self._ping_interval):
                reply = await conn.read_response(disable_decoding=True)
        except TimeoutError:
            raise ConnectionError("redis did not answer a ping") from None
        self._last_read = time.monotonic()
        return reply

    async def _watch(self) -> None:
        """Ping the connection when it has been idle, so that ``_read`` hears from Redis."""
        while True:
            await asyncio.sleep(self._ping_interval / 2)
            if time.monotonic() - self._last_read >= self._ping_interval:
                with contextlib.suppress(RedisError, OSError):
                    async with self._write_lock:
                        await self._write(b"PING")


def _fail(confirmed: asyncio.Future[None]) -> None:
    """Tell a waiting ``subscribe`` that its connection broke (if it still waits)."""
    if not confirmed.done():
        confirmed.set_exception(_ConnectionLost())
        confirmed.exception()  # marked retrieved: its caller may have left
