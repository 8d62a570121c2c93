"""The Redis broker: several processes and machines share channels through Redis.

Layout, per channel ``C`` under the prefix ``P`` (the ``{C}`` hash tag keeps a
channel's two keys in one Redis Cluster slot):

``P:{C}:m``  a hash ``{e: epoch, o: offset}``, the channel's position. Expires
             ``meta_ttl`` after the last publication (refreshed while some node
             has subscribers), like the memory broker's stream.
``P:{C}:h``  a stream of the last ``size`` publications; entry ID
             ``<offset>-0``, so history reads are ``XRANGE`` by offset.
             Expires ``ttl`` after the last publication (both from the
             :class:`~tidings.hub.HistoryPolicy` each publish carries).
``P:p:C``    the pub/sub channel every node interested in ``C`` subscribes to.
``P:{C}:pz`` presence: a sorted set of client ids scored by the time (ms) their
             entry expires, and ``P:{C}:ph`` a hash of their ``ClientInfo``.
             Each node refreshes its own clients' scores every third of
             ``presence_ttl``; a crashed node's clients expire within
             ``presence_ttl`` and are swept when presence is read.
``P:{C}:i:<digest>`` an idempotency key's result (``offset:epoch``), for
             ``idempotency_window``; the digest is BLAKE2b of channel and key.
``P:{C}:o``  occupancy: a sorted set of the nodes with subscribers in ``C``,
             scored by when their entry expires (ms), refreshed like
             presence; ``P:occupied`` a sorted set of the channels occupied
             anywhere, scored by their latest entry's expiry, so that some
             node finds the channels of a node that died (see
             :meth:`RedisBroker.occupy`). That index is one key for the
             whole deployment, outside the channels' slots: the occupancy
             scripts name it with a channel's key, which one Redis runs but
             a Redis Cluster would refuse (tidings speaks to one Redis today).

One Lua script stamps a publication: it creates the epoch if the hash is
missing (and drops any history left from an older epoch), increments the
offset, appends to the stream, sets both TTLs and publishes — atomically, so
offsets are strictly increasing per channel and the pub/sub order is the
offset order. The all-or-nothing recovery promise follows from the epoch: if
Redis loses a channel's position (restart without persistence, expiry,
eviction), the next publication or subscribe creates a new epoch, history
reads with the old epoch return nothing, and the hub answers "not recovered".
The same script checks and records an ``idempotency_key`` (a repeat returns
the first position and publishes nothing), and publishes a ``skip_history``
publication without taking an offset or storing it: it goes out stamped with
the channel's current position (see :class:`~tidings.hub.Hub`).

Fan-out uses one dedicated pub/sub connection per node
(:class:`~tidings.brokers.redis_pubsub.RedisPubSub`, which owns subscribing,
reading and reconnecting). When it breaks, every channel this node delivered
something on is *held*: its live publications are kept back, in order, until
its hole is filled. The link reconnects with exponential backoff and
resubscribes every channel; then this broker fills the holes from history
(:meth:`RedisBroker._catch_up`) while the link keeps being read: it reads, in
pipelined batches, what each channel published after the last publication
delivered here, delivers it, then what was held back (the hub drops
duplicates by offset), and releases the channel. So the hub sees every
channel's offsets in order, and a channel with no delivery yet (its first
subscribe still in flight) is not caught up at all: its subscriber's own
history read comes after the resubscribe.

If Redis lost the channel (new epoch), the node delivers the new epoch's
history from its start when history still holds all of it. When history does
not reach (more was published during the outage than history keeps), when
more than ``hold_limit`` publications arrive for one channel before its
catch-up (or the node holds more than ``hold_bytes`` of publication data
over all its channels: then each channel that receives one more), or when
the catch-up cannot read Redis, the hub is told the stream
restarted (``bind_restarted``): subscribers resync at once and learn from
their own resume what was recovered — never a silent gap, never a replay of
what this node already delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import select
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.maint_notifications import MaintNotificationsConfig

from ..errors import ProtocolError
from ..stream import EMPTY, ClientInfo, HistoryPolicy, Position, Publication, directed, reaches
from . import envelope
from .base import Broker, IdempotencyTable, NodeMessage, unavailable
from .redis_pubsub import RedisPubSub

__all__ = ["RedisBroker"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# KEYS: meta, history[, idempotency key]. ARGV: new epoch, history size,
# history ttl (ms), meta ttl (ms), pub/sub channel, payload, "1" for a
# live-only publication (skip_history), idempotency window (ms).
# Returns {offset, epoch, 1 for a repeat of the idempotency key else 0}.
_PUBLISH = """
if KEYS[3] then
  local first = redis.call('GET', KEYS[3])
  if first then
    local colon = string.find(first, ':', 1, true)
    return {tonumber(string.sub(first, 1, colon - 1)), string.sub(first, colon + 1), 1}
  end
end
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch)
end
local offset
if ARGV[7] == '1' then
  offset = tonumber(redis.call('HGET', KEYS[1], 'o') or '0')
else
  offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
  if tonumber(ARGV[2]) > 0 then
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], offset .. '-0', 'p', ARGV[6])
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', ARGV[5], offset .. '\\n' .. epoch .. '\\n' .. ARGV[6])
if KEYS[3] then
  redis.call('SET', KEYS[3], offset .. ':' .. epoch, 'PX', ARGV[8])
end
return {offset, epoch, 0}
"""

# KEYS: meta, history. ARGV: new epoch, meta ttl (ms). Returns the position.
_ENSURE = """
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {tonumber(redis.call('HGET', KEYS[1], 'o') or '0'), epoch}
"""


# Occupancy (RedisBroker.occupy). KEYS: the channel's node set, the index
# of occupied channels. ARGV: node, now (ms), this entry's expiry (ms), the
# set's ttl (ms), channel. Returns {1 when no other live node holds the
# channel, 1 when the nodes that held it had all lapsed (a dead node's
# channel, vacated now)}.
_OCCUPY = """
local lapsed = 0
if redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2]) > 0
    and redis.call('ZCARD', KEYS[1]) == 0 then
  lapsed = 1
end
local mine = redis.call('ZSCORE', KEYS[1], ARGV[1])
local others = redis.call('ZCARD', KEYS[1])
if mine then others = others - 1 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], 'GT', ARGV[3], ARGV[5])
local first = 0
if others == 0 and not mine then first = 1 end
return {first, lapsed}
"""

# KEYS: the channel's node set. ARGV: node, now (ms). Returns 1 when the set
# is empty now and this call emptied it (this node left, or lapsed entries
# went): the cluster's last holder is gone.
_VACATE = """
local purged = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
if (removed + purged) > 0 and redis.call('ZCARD', KEYS[1]) == 0 then
  return 1
end
return 0
"""

# KEYS: the channel's node set, the index. ARGV: now (ms), channel. Drops
# lapsed nodes; returns 1 when that emptied the set (the channel's holders
# all died: vacated), and takes an empty channel out of the index.
_SWEEP = """
local purged = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) > 0 then
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[2])
if purged > 0 then
  return 1
end
return 0
"""

#: Channels of the index one sweep looks at (the oldest expiries first).
_SWEEP_BATCH = 500

#: redis-py's socket timeout for commands: a command has an answer or an error by then.
_COMMAND_TIMEOUT = 10.0


class _NotSent(RedisConnectionError):
    """A command's write failed: Redis has not received the whole command."""


class _Checked(AbstractConnection):
    """A pooled command connection that is not used once Redis has closed it,
    and that tells a failed write from a failed read (mixed into the class the
    URL picks: TCP, TLS or a Unix socket, see ``_CHECKED``).

    A connection Redis closed while it sat in the pool (``CLIENT KILL``, its
    ``timeout`` setting, a restart) is lent by redis-py as long as the event loop
    has not yet read the close: redis-py asks the stream whether it has data or
    EOF, and the stream knows only what the loop has read. The command then
    goes out into a half-closed socket and fails on its read ("Connection
    closed by server.") while Redis is up. :meth:`can_read` also asks the
    kernel whether the socket is readable; an idle connection with nothing
    left to read never is, so readable means closed, reset, or a stray reply:
    redis-py's pool then connects afresh before writing anything.

    A write error is raised as :class:`_NotSent`, which the client retries
    once on a new connection (``Retry(..., supported_errors=(_NotSent,))``).
    That retry is safe even for the publish script, which must not run twice
    (it increments the offset): the write raises only when the command's bytes
    did not all reach the socket. Either the transport was already closed
    (asyncio drops the bytes: the "Error UNKNOWN while writing to socket.
    Connection lost." of issue 12), or ``send()`` failed (nothing of that call
    was sent), or the stream was still paused for flow control when the
    connection was lost (unsent bytes were still buffered here). Redis runs a
    command only once it has read all of it, and a dead connection delivers
    no more. A failed *read* is not retried here: Redis may have run the
    command and lost only the reply (idempotent commands are retried by
    :meth:`RedisBroker._idempotent`).
    """

    async def can_read(self) -> bool:
        return await super().can_read() or self._socket_readable()

    def _socket_readable(self) -> bool:
        """Whether the kernel holds anything for this idle socket (EOF and
        resets included) that the loop has not read yet.

        One ``poll`` with a zero timeout: ``select()`` cannot take the
        descriptors above 1,023 that a server holding many clients hands out.
        """
        writer = self._writer
        if writer is None:
            return False
        sock = writer.transport.get_extra_info("socket")
        if sock is None:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        if not self.is_connected:
            # Connect errors pass unchanged: not connected is not "not sent".
            await self.connect_check_health(check_health=False)
        try:
            await super().send_packed_command(command, check_health)
        except _NotSent:
            raise
        except RedisConnectionError as exc:
            raise _NotSent(*exc.args) from exc
        except RuntimeError as exc:
            # uvloop refuses a write on a transport already closed ("unable to
            # perform operation on <TCPTransport closed=True>") where asyncio
            # drops the bytes: not sent either, and not a bug of ours (the
            # chaos run: Redis killed while a connection said HELLO).
            raise _NotSent(f"write on a closed connection: {exc}") from exc


class _CheckedTCP(_Checked, aioredis.Connection):
    """``redis://``."""


class _CheckedTLS(_Checked, aioredis.SSLConnection):
    """``rediss://``."""


class _CheckedUnix(_Checked, aioredis.UnixDomainSocketConnection):
    """``unix://``."""


#: The checked form of each connection class ``redis_url`` can choose.
_CHECKED: dict[type[AbstractConnection], type[_Checked]] = {
    aioredis.Connection: _CheckedTCP,
    aioredis.SSLConnection: _CheckedTLS,
    aioredis.UnixDomainSocketConnection: _CheckedUnix,
}


def _new_epoch() -> str:
    return secrets.token_urlsafe(6)


def _before(pub: Publication) -> Position:
    """The position of the stream right before ``pub``: where a hole before it ends.

    A live-only (``skip_history``) publication carries the position of the
    stored one before it; any other sits one offset past it.
    """
    return Position(pub.epoch, pub.offset if pub.transient else pub.offset - 1)


# KEYS: presence zset, presence hash. ARGV: now (ms). Sweeps, then lists.
_PRESENCE = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for i = 1, #expired, 1000 do
  local last = math.min(i + 999, #expired)
  redis.call('HDEL', KEYS[2], unpack(expired, i, last))
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
return redis.call('HGETALL', KEYS[2])
"""


class RedisBroker(Broker):
    """Channels shared through one Redis. See the module docstring."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "tidings",
        meta_ttl: float = 3600.0,
        subscribe_timeout: float = 5.0,
        ping_interval: float = 5.0,
        max_backoff: float = 5.0,
        presence_ttl: float = 60.0,
        hold_limit: int = 1000,
        hold_bytes: int = 64 * 1024 * 1024,
        catch_up_batch: int = 500,
        idempotency_window: float = 300.0,
    ) -> None:
        self._presence_ttl_ms = max(1, int(presence_ttl * 1000))
        self._idempotency_window_ms = max(1, int(idempotency_window * 1000))
        #: This node's name in the channels' occupancy sets.
        self._node_id = secrets.token_hex(8)
        #: Channels this node holds in their occupancy sets (refreshed like presence).
        self._occupied: set[str] = set()
        # This node's present clients: (channel, client) -> ClientInfo JSON.
        self._present: dict[tuple[str, str], bytes] = {}
        self._url = url
        self._prefix = prefix
        self._meta_ttl_ms = max(1, int(meta_ttl * 1000))
        self._redis = self._command_client()
        self._pubsub = RedisPubSub(
            url,
            on_message=self._on_message,
            on_resubscribed=self._catch_up,
            on_lost=self._hold_all,
            subscribe_timeout=subscribe_timeout,
            ping_interval=ping_interval,
            max_backoff=max_backoff,
        )
        # Channels with subscribers on this node -> last position delivered here.
        self._interest: dict[str, Position] = {}
        #: Channels waiting for their catch-up after a reconnect -> the live
        #: publications read meanwhile, kept back so that the hub sees offsets in order.
        self._held: dict[str, list[Publication]] = {}
        #: The data bytes of every publication in ``_held``: bounded by
        #: ``hold_bytes`` over all channels, as ``hold_limit`` bounds one.
        self._held_bytes = 0
        self._hold_limit = max(1, hold_limit)
        self._hold_bytes = max(1, hold_bytes)
        self._catch_up_batch = max(1, catch_up_batch)
        self._tasks: list[asyncio.Task[None]] = []
        #: First subscribes waiting for their channel's position (:meth:`_ensured`),
        #: and the task reading them from Redis, one batch a round trip.
        self._ensuring: list[tuple[str, asyncio.Future[Position]]] = []
        self._ensurer: asyncio.Task[None] | None = None
        self._closing = False
        #: This node's own pub/sub channel and what it does with a message there.
        self._node_name = b""
        self._on_node_message: NodeMessage | None = None

    def _command_client(self) -> aioredis.Redis:
        """A command client and its scripts (the connection pool for every command).

        Its connections check, when the pool lends them, that Redis has not
        closed them meanwhile, and every command whose write fails is sent once
        more on a new connection: see :class:`_Checked`.
        """
        client: aioredis.Redis = aioredis.Redis.from_url(
            self._url,
            socket_timeout=_COMMAND_TIMEOUT,
            socket_connect_timeout=5,
            retry=Retry(NoBackoff(), 1, supported_errors=(_NotSent,)),
            # Off, not redis-py 8.1's "auto": while a pool has this on, it lends
            # connections that hold data or EOF instead of replacing them
            # (redis/redis-py#4252). One plain Redis sends no maintenance events.
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
        )
        pool = client.connection_pool
        pool.connection_class = _CHECKED[pool.connection_class]  # before any connection
        self._publish_script = client.register_script(_PUBLISH)
        self._ensure_script = client.register_script(_ENSURE)
        self._presence_script = client.register_script(_PRESENCE)
        self._occupy_script = client.register_script(_OCCUPY)
        self._vacate_script = client.register_script(_VACATE)
        self._sweep_script = client.register_script(_SWEEP)
        return client

    @staticmethod
    async def _idempotent(call: Callable[[], Awaitable[_T]]) -> _T:
        """``call()``, once more on a new connection if its connection breaks.

        Only for commands that may run twice: reads, the ``_ENSURE`` script
        (it creates an epoch only where none is, so a second run answers what
        the first did), presence writes and TTL refreshes. A broken connection
        is closed by redis-py before the error reaches here, so the pool lends
        a new one. Not for the publish script, which may have run before its
        reply was lost (see :class:`_Checked` for what is retried there).
        """
        try:
            return await call()
        except RedisConnectionError as exc:
            log.info("redis connection broke under a command (%s); retrying once", exc)
            return await call()

    # -- names -------------------------------------------------------------

    def _keys(self, channel: str) -> list[str]:
        base = f"{self._prefix}:{{{channel}}}:"
        return [base + "m", base + "h"]

    def _pubsub_name(self, channel: str) -> bytes:
        return f"{self._prefix}:p:{channel}".encode()

    # -- lifecycle ---------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._pubsub.healthy

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._keep_meta(), name="tidings-redis-meta"),
            loop.create_task(self._keep_presence(), name="tidings-redis-presence"),
            loop.create_task(self._keep_occupancy(), name="tidings-redis-occupancy"),
        ]
        # Start-up waits briefly for Redis so the first requests find it, but a
        # Redis that is down does not stop the server: /health says so.
        await self._pubsub.start()
        if not self._pubsub.healthy:
            log.warning("redis at %s is not reachable yet; retrying in the background", self._url)

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._ensurer is not None:
            self._ensurer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ensurer
        await self._pubsub.close()
        await self._redis.aclose()

    async def _hold_all(self) -> None:
        """The pub/sub link broke: hold back every channel's live stream until its
        hole is filled (see the module docstring).

        The command connections are left alone: a pool connection that Redis
        closed too (a restart) is replaced when the pool lends it
        (:class:`_Checked`). Disconnecting the pool's idle connections
        here, as this once did, raced with commands taking one at that moment:
        their write failed with "Error UNKNOWN while writing to socket.
        Connection lost." while Redis was up (tests/test_redis_stale.py).
        """
        if self._closing or not self._pubsub.ever_connected:
            # Before the first connection no subscribe has gone live: nothing to
            # catch up, and no catch-up would follow to release a hold.
            return
        # What a cancelled catch-up had held back is read again from history.
        self._held = {channel: [] for channel in self._interest}
        self._held_bytes = 0

    # -- publishing and reading -------------------------------------------

    async def publish(
        self,
        channel: str,
        data: bytes,
        *,
        history: HistoryPolicy,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
        skip_history: bool = False,
        exclude: frozenset[str] = frozenset(),
        idempotency_key: str = "",
    ) -> Publication | Position:
        now_ms = int(time.time() * 1000)
        payload = envelope.encode(data, info, tags, now_ms, exclude=exclude, transient=skip_history)
        size = history.size
        ttl_ms = max(1, int(history.ttl * 1000))
        keys = self._keys(channel)
        if idempotency_key:
            digest = IdempotencyTable.digest(channel, idempotency_key).hex()
            keys.append(f"{self._prefix}:{{{channel}}}:i:{digest}")
        try:
            offset, epoch, repeat = await self._publish_script(
                keys=keys,
                args=[
                    _new_epoch(),
                    size,
                    ttl_ms,
                    max(self._meta_ttl_ms, ttl_ms),
                    self._pubsub_name(channel),
                    payload,
                    "1" if skip_history else "0",
                    self._idempotency_window_ms,
                ],
            )
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        if repeat:
            return Position(epoch.decode(), int(offset))
        return directed(
            channel,
            int(offset),
            epoch.decode(),
            data,
            info,
            tags,
            now_ms,
            exclude=exclude,
            transient=skip_history,
        )

    async def history(
        self,
        channel: str,
        *,
        since: Position | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> tuple[list[Publication], Position]:
        meta_key, history_key = self._keys(channel)
        count = limit if limit is not None and limit > 0 else None
        low = self._low(since)

        async def read() -> list[Any]:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hmget(meta_key, ["e", "o"])
                if limit != 0:
                    if reverse:
                        pipe.xrevrange(history_key, "+", low, count=count)
                    else:
                        pipe.xrange(history_key, low, "+", count=count)
                results: list[Any] = await pipe.execute()
                return results

        try:
            results = await self._idempotent(read)
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        epoch_raw, offset_raw = results[0]
        if epoch_raw is None:
            return [], EMPTY
        top = Position(epoch_raw.decode(), int(offset_raw or 0))
        if limit == 0 or (since is not None and since.epoch != top.epoch and since != EMPTY):
            return [], top
        return self._decode_entries(channel, top.epoch, results[1]), top

    @staticmethod
    def _low(since: Position | None) -> str:
        """The first stream entry ID after ``since``."""
        return f"{since.offset + 1}-0" if since is not None else "-"

    def _high(self, channel: str) -> str:
        """The last stream entry ID a catch-up of ``channel`` needs: the one
        before what it held back, or the stream's end."""
        held = self._held.get(channel)
        return f"{_before(held[0]).offset}-0" if held else "+"

    @staticmethod
    def _decode_entries(channel: str, epoch: str, entries: list[Any]) -> list[Publication]:
        publications = []
        for entry_id, fields in entries:
            offset = int(entry_id.split(b"-", 1)[0])
            try:
                publications.append(envelope.decode(channel, offset, epoch, fields[b"p"]))
            except (envelope.MalformedEnvelope, KeyError) as exc:
                # Left out, so a recovery across it is "not recovered" (``reaches``
                # counts), never a gap or invalid JSON forwarded to clients.
                log.warning("channel %r: skipped history entry %d: %s", channel, offset, exc)
        return publications

    # -- subscribing -------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        if channel not in self._interest:
            self._interest[channel] = EMPTY
        try:
            await self._pubsub.subscribe(self._pubsub_name(channel))
        except TimeoutError:
            raise unavailable("redis did not confirm the subscription") from None
        try:
            top = await self._ensured(channel)
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        self._advance(channel, top)

    def _ensured(self, channel: str) -> asyncio.Future[Position]:
        """The channel's position, read by one pipelined round trip for every
        first subscribe that asks in the same pass of the loop (a burst of new
        channels: a reconnecting client's, or many clients') rather than one each."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Position] = loop.create_future()
        self._ensuring.append((channel, future))
        if self._ensurer is None:
            self._ensurer = loop.create_task(self._ensure_batches(), name="tidings-redis-ensure")
        return future

    async def _ensure_batches(self) -> None:
        """Answer the waiting :meth:`_ensured` calls, ``catch_up_batch`` channels a round trip."""
        try:
            while self._ensuring:
                size = self._catch_up_batch
                batch, self._ensuring = self._ensuring[:size], self._ensuring[size:]
                channels = [channel for channel, _ in batch]
                try:
                    results = await self._idempotent(functools.partial(self._ensure_many, channels))
                except (RedisError, OSError) as exc:
                    for _, future in batch:
                        if not future.done():  # a caller cancelled (its bound) is gone
                            future.set_exception(RedisConnectionError(str(exc)))
                    continue
                for (_, future), (offset, epoch) in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(Position(epoch.decode(), int(offset)))
        finally:
            self._ensurer = None
            waiting, self._ensuring = self._ensuring, []
            for _, future in waiting:  # only when cancelled (close)
                if not future.done():
                    future.set_exception(RedisConnectionError("the broker is closing"))

    async def _ensure_many(self, channels: list[str]) -> list[Any]:
        """One pipelined round trip: the ``_ENSURE`` script of each channel."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for channel in channels:
                await self._ensure_script(
                    keys=self._keys(channel), args=[_new_epoch(), self._meta_ttl_ms], client=pipe
                )
            results: list[Any] = await pipe.execute()
            return results

    def position(self, channel: str) -> Position | None:
        """The last position delivered here, while this node's view is current.

        Current means: the channel's subscription is live (its position was
        read from Redis once, by :meth:`subscribe`), the pub/sub link is up with
        every channel confirmed, and the channel is not held for a catch-up.
        Then every publication after that position comes over the link, in
        offset order, and a new subscriber that joins there misses nothing
        (it may receive publications made a moment before it asked, never
        fewer). While the link is down or a hole is being filled, the position
        may be behind Redis': None, and the subscriber reads Redis, as before.
        """
        last = self._interest.get(channel)
        if last is None or last == EMPTY or channel in self._held or not self._pubsub.healthy:
            return None
        return last

    def unsubscribe(self, channel: str) -> None:
        self._take_held(channel)
        if self._interest.pop(channel, None) is not None:
            self._pubsub.unsubscribe(self._pubsub_name(channel))

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    def _advance(self, channel: str, top: Position) -> None:
        """Remember ``top`` as delivered when nothing newer was delivered here.

        Not while the channel is held: its catch-up reads from the last
        publication delivered, and moving that past the hole would skip it.
        """
        last = self._interest.get(channel)
        if last is None:
            return
        if last == EMPTY or (
            channel not in self._held and (last.epoch != top.epoch or last.offset < top.offset)
        ):
            self._interest[channel] = top

    # -- what the pub/sub connection hands on ---------------------------------

    async def _catch_up(self, names: list[bytes]) -> None:
        """Fill each held channel's hole from history, then release it.

        Runs while the pub/sub link is read (live publications of a held
        channel wait in ``_held``). One pipelined round trip per
        ``catch_up_batch`` channels, each an ``_ENSURE`` (the position, a new
        epoch if Redis lost it) and an ``XRANGE`` from the last offset delivered.
        """
        del names  # the held channels are the ones to catch up
        try:
            while self._held:
                batch = list(self._held)[: self._catch_up_batch]
                since = {channel: self._interest.get(channel, EMPTY) for channel in batch}
                results = await self._idempotent(functools.partial(self._read_holes, batch, since))
                for n, channel in enumerate(batch):
                    offset, epoch = results[2 * n]
                    top = Position(epoch.decode(), int(offset))
                    await self._fill(channel, since[channel], top, results[2 * n + 1])
        except (RedisError, OSError, ProtocolError) as exc:
            # The link is up (else this task was cancelled) but commands fail:
            # subscribers resync rather than wait on a hole nobody fills.
            log.warning(
                "could not catch up %d channels after a reconnect: %s", len(self._held), exc
            )
            for channel in list(self._held):
                self._release_unfilled(channel)

    async def _read_holes(self, batch: list[str], since: dict[str, Position]) -> list[Any]:
        """One pipelined round trip: each channel's position and what it missed."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for channel in batch:
                keys = self._keys(channel)
                await self._ensure_script(
                    keys=keys, args=[_new_epoch(), self._meta_ttl_ms], client=pipe
                )
                if since[channel] == EMPTY:  # no hole (see _fill): an empty range
                    pipe.xrange(keys[1], "+", "-")
                else:
                    pipe.xrange(keys[1], self._low(since[channel]), self._high(channel))
            results: list[Any] = await pipe.execute()
            return results

    async def _fill(self, channel: str, since: Position, top: Position, entries: list[Any]) -> None:
        """Deliver ``channel``'s hole after ``since`` (up to ``top``), then what it held back."""
        if channel not in self._held:
            return  # released meanwhile (overflow, unsubscribe)
        if self._interest.get(channel) != since:
            return  # a first subscribe set its position meanwhile: the next round reads it
        if since == EMPTY:
            # Nothing delivered here yet: its first subscribe is in flight, and
            # its subscriber's own history read comes after the resubscribe.
            self._release(channel)
            return
        if since.epoch == top.epoch:
            pubs = self._decode_entries(channel, top.epoch, entries)
        else:
            log.warning(
                "channel %r: redis lost its position (epoch %s -> %s)",
                channel,
                since.epoch,
                top.epoch,
            )
            since = Position(top.epoch, 0)
            pubs, top = await self.history(channel, since=since)
            if channel not in self._held:
                return
        # The hole ends where what the channel held back begins: history has to
        # reach that far only (it may keep less than the live stream brought since).
        held = self._held[channel]
        if held and held[0].epoch == top.epoch and held[0].offset <= top.offset:
            top = _before(held[0])
        pubs = [pub for pub in pubs if pub.offset <= top.offset]
        if not reaches(since, pubs, top):
            log.warning(
                "channel %r: publications made while redis was unreachable are no longer "
                "in history; subscribers here resync and resuming clients will be told "
                "they were not recovered",
                channel,
            )
            self._interest[channel] = top
            if self._restarted is not None:
                self._restarted(channel, top)
        else:
            for pub in pubs:
                self._deliver_once(pub)
        self._release(channel)

    def _take_held(self, channel: str) -> list[Publication] | None:
        """Stop holding ``channel``: what it held back, if it was held."""
        held = self._held.pop(channel, None)
        if held:
            self._held_bytes -= sum(len(pub.data) for pub in held)
        return held

    def _release(self, channel: str) -> None:
        """Deliver what ``channel`` held back (the hub's order), and let it go live."""
        for pub in self._take_held(channel) or ():
            self._deliver_once(pub)

    def _release_unfilled(self, channel: str) -> None:
        """Let ``channel`` go live with its hole unfilled, and say so to the hub."""
        held = self._take_held(channel)
        last = self._interest.get(channel)
        if held is None or last is None:
            return
        if last == EMPTY:  # nothing delivered here yet: no hole to speak of
            for pub in held:
                self._deliver_once(pub)
            return
        log.warning(
            "channel %r: live stream resumed without catching up; subscribers resync", channel
        )
        position = _before(held[0]) if held else last
        self._interest[channel] = position
        if self._restarted is not None:
            self._restarted(channel, position)
        for pub in held:
            self._deliver_once(pub)

    def _channel_of(self, name: bytes) -> str:
        return name.decode()[len(self._prefix) + 3 :]

    async def listen_node(self, node: str, on_message: NodeMessage) -> None:
        """Subscribe this node's own pub/sub channel (``<prefix>:n:<node>``),
        resubscribed after a reconnect like every channel."""
        self._on_node_message = on_message
        self._node_name = self._node_channel(node)
        await self._pubsub.subscribe(self._node_name)

    async def send_node(self, node: str, message: bytes) -> bool:
        try:
            receivers = await self._redis.publish(self._node_channel(node), message)
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        return bool(receivers)

    def _node_channel(self, node: str) -> bytes:
        return f"{self._prefix}:n:{node}".encode()

    def _on_message(self, name: bytes, message: bytes) -> None:
        if name == self._node_name and self._on_node_message is not None:
            self._on_node_message(message)
            return
        channel = self._channel_of(name)
        if channel not in self._interest:
            return
        try:
            offset, epoch, payload = message.split(b"\n", 2)
            pub = envelope.decode(channel, int(offset), epoch.decode(), payload)
        except ValueError as exc:  # split, int(), decode() or envelope.MalformedEnvelope
            log.warning("dropped a malformed message on %r: %s", name, exc)
            return
        held = self._held.get(channel)
        if held is None:
            self._deliver_once(pub)
            return
        held.append(pub)
        self._held_bytes += len(pub.data)
        if len(held) > self._hold_limit or self._held_bytes > self._hold_bytes:
            # Bounded: past hold_limit publications on this channel, or
            # hold_bytes on all, this channel goes live at once and its
            # subscribers resync instead of the node holding more.
            self._release_unfilled(channel)

    def _deliver_once(self, pub: Publication) -> None:
        last = self._interest.get(pub.channel)
        if pub.directed and pub.transient:
            # Live only, at the position of the stored one before it: it moves
            # nothing here; the hub delivers it at that position or not at all.
            if last is not None and self._deliver is not None:
                self._deliver(pub)
            return
        if last is None or (last.epoch == pub.epoch and pub.offset <= last.offset):
            return
        self._interest[pub.channel] = pub.position
        if self._deliver is not None:
            self._deliver(pub)

    async def _keep_meta(self) -> None:
        """Keep the position of channels with subscribers here from expiring."""
        interval = min(60.0, self._meta_ttl_ms / 3000)
        while True:
            await asyncio.sleep(interval)
            channels = list(self._interest)
            if not channels or not self._pubsub.healthy:
                continue
            try:
                for start in range(0, len(channels), 1000):
                    part = channels[start : start + 1000]
                    await self._idempotent(functools.partial(self._refresh_meta, part))
            except (RedisError, OSError) as exc:
                log.warning("could not refresh channel positions in redis: %s", exc)

    async def _refresh_meta(self, channels: list[str]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for channel in channels:
                pipe.pexpire(self._keys(channel)[0], self._meta_ttl_ms)
            await pipe.execute()

    # -- presence ------------------------------------------------------------

    def _presence_keys(self, channel: str) -> list[str]:
        base = f"{self._prefix}:{{{channel}}}:"
        return [base + "pz", base + "ph"]

    async def add_presence(self, channel: str, client: str, info: ClientInfo) -> None:
        encoded = msgspec.json.encode(info)
        self._present[(channel, client)] = encoded
        try:
            await self._idempotent(lambda: self._write_presence([(channel, client, encoded)]))
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc

    async def _write_presence(self, entries: list[tuple[str, str, bytes]]) -> None:
        expires = int(time.time() * 1000) + self._presence_ttl_ms
        async with self._redis.pipeline(transaction=False) as pipe:
            for channel, client, encoded in entries:
                zset, table = self._presence_keys(channel)
                pipe.zadd(zset, {client: expires})
                pipe.hset(table, client, encoded)
                pipe.pexpire(zset, 2 * self._presence_ttl_ms)
                pipe.pexpire(table, 2 * self._presence_ttl_ms)
            await pipe.execute()

    def remove_presence(self, channel: str, client: str) -> None:
        if self._present.pop((channel, client), None) is None or self._closing:
            return
        task = asyncio.get_running_loop().create_task(self._remove_presence(channel, client))
        self._tasks.append(task)
        task.add_done_callback(self._forget_task)

    async def _remove_presence(self, channel: str, client: str) -> None:
        zset, table = self._presence_keys(channel)

        async def remove() -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zrem(zset, client)
                pipe.hdel(table, client)
                await pipe.execute()

        try:
            await self._idempotent(remove)
        except (RedisError, OSError) as exc:
            # The entry expires within presence_ttl anyway.
            log.info("could not remove %s from %s presence now: %s", client, channel, exc)

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        try:
            flat = await self._idempotent(
                lambda: self._presence_script(
                    keys=self._presence_keys(channel), args=[int(time.time() * 1000)]
                )
            )
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        present = {}
        for i in range(0, len(flat), 2):
            client = flat[i].decode(errors="replace")
            try:
                present[client] = envelope.decode_info(flat[i + 1])
            except envelope.MalformedEnvelope as exc:
                log.warning("channel %r: skipped presence entry %r: %s", channel, client, exc)
        return present

    async def _keep_presence(self) -> None:
        """Refresh this node's clients so their entries outlive it only if it dies."""
        interval = self._presence_ttl_ms / 3000
        while True:
            await asyncio.sleep(interval)
            entries = [(ch, cl, info) for (ch, cl), info in self._present.items()]
            if not entries or not self._pubsub.healthy:
                continue
            try:
                for start in range(0, len(entries), 1000):
                    part = entries[start : start + 1000]
                    await self._idempotent(functools.partial(self._write_presence, part))
            except (RedisError, OSError) as exc:
                log.warning("could not refresh presence in redis: %s", exc)

    # -- channel occupancy (the hub's occupied / vacated events) --------------

    def _occupancy_key(self, channel: str) -> str:
        return f"{self._prefix}:{{{channel}}}:o"

    def _occupancy_index(self) -> str:
        return f"{self._prefix}:occupied"

    async def occupy(self, channel: str) -> bool:
        """Add this node to the channel's node set; True when no other live node was in it.

        Atomic (one script), so that of two nodes occupying at once exactly
        one is first. Nodes that lapsed (died without leaving) are dropped on
        the way; if they were the channel's last holders, the channel was
        vacated when they died and nobody has said so yet: this node says it
        (``bind_lapsed``) before its own ``occupied``.
        """
        self._occupied.add(channel)
        now = int(time.time() * 1000)
        try:
            first, lapsed = await self._idempotent(
                lambda: self._occupy_script(
                    keys=[self._occupancy_key(channel), self._occupancy_index()],
                    args=[
                        self._node_id,
                        now,
                        now + self._presence_ttl_ms,
                        2 * self._presence_ttl_ms,
                        channel,
                    ],
                )
            )
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        if lapsed and self._lapsed is not None:
            self._lapsed(channel)
        return bool(first)

    async def vacate(self, channel: str) -> bool:
        """Remove this node from the channel's node set; True when that emptied it."""
        self._occupied.discard(channel)
        try:
            emptied = await self._idempotent(
                lambda: self._vacate_script(
                    keys=[self._occupancy_key(channel)],
                    args=[self._node_id, int(time.time() * 1000)],
                )
            )
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        return bool(emptied)

    async def _keep_occupancy(self) -> None:
        """Refresh this node's entries, and find channels whose holders all died.

        Every third of ``presence_ttl``, as presence: a node that dies stops
        refreshing, and its entries lapse within ``presence_ttl``. Each node
        then sweeps the channels of the index whose latest entry has expired;
        the script that empties a channel's set answers 1 to one node only,
        which says ``vacated`` for the dead.
        """
        interval = self._presence_ttl_ms / 3000
        while True:
            await asyncio.sleep(interval)
            if not self._pubsub.healthy:
                continue
            try:
                channels = list(self._occupied)
                for start in range(0, len(channels), 1000):
                    part = channels[start : start + 1000]
                    await self._idempotent(functools.partial(self._refresh_occupancy, part))
                if self._lapsed is not None and self._lapsed_wanted():
                    await self._sweep_occupancy()
            except (RedisError, OSError) as exc:
                log.warning("could not refresh channel occupancy in redis: %s", exc)

    async def _refresh_occupancy(self, channels: list[str]) -> None:
        expires = int(time.time() * 1000) + self._presence_ttl_ms
        index = self._occupancy_index()
        async with self._redis.pipeline(transaction=False) as pipe:
            for channel in channels:
                key = self._occupancy_key(channel)
                pipe.zadd(key, {self._node_id: expires})
                pipe.pexpire(key, 2 * self._presence_ttl_ms)
                pipe.zadd(index, {channel: expires}, gt=True)
            await pipe.execute()

    async def _sweep_occupancy(self) -> None:
        """One batch of the index's lapsed channels; ``vacated`` for those this emptied."""
        now = int(time.time() * 1000)
        index = self._occupancy_index()
        names = await self._idempotent(
            lambda: self._redis.zrangebyscore(index, "-inf", now, start=0, num=_SWEEP_BATCH)
        )
        if not names:
            return
        channels = [
            name.decode(errors="replace") if isinstance(name, bytes) else str(name)
            for name in names
        ]

        async def sweep() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for channel in channels:
                    await self._sweep_script(
                        keys=[self._occupancy_key(channel), index],
                        args=[now, channel],
                        client=pipe,
                    )
                results: list[Any] = await pipe.execute()
                return results

        for channel, emptied in zip(channels, await self._idempotent(sweep), strict=True):
            if emptied and self._lapsed is not None:
                log.info("channel %r: the nodes holding it stopped refreshing: vacated", channel)
                self._lapsed(channel)
