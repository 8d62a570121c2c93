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

One Lua script stamps a publication: it creates the epoch if the hash is
missing (and drops any history left from an older epoch), increments the
offset, appends to the stream, sets both TTLs and publishes — atomically, so
offsets are strictly increasing per channel and the pub/sub order is the
offset order. The all-or-nothing recovery promise follows from the epoch: if
Redis loses a channel's position (restart without persistence, expiry,
eviction), the next publication or subscribe creates a new epoch, history
reads with the old epoch return nothing, and the hub answers "not recovered".

Fan-out uses one dedicated pub/sub connection per node
(:class:`~tidings.brokers.redis_pubsub.RedisPubSub`, which owns subscribing,
reading and reconnecting). When it breaks, it reconnects with exponential
backoff and resubscribes every channel the node has subscribers for; then
this broker fills the hole in its live stream from history
(:meth:`RedisBroker._catch_up`): for each channel it reads what came after the
last publication it delivered and delivers it in order (the hub drops
duplicates by offset). If Redis lost the channel (new epoch), the node
delivers the new epoch's history from its start when history still holds all
of it; when history does not reach (more was published during the outage
than history keeps), nothing is delivered for the hole and a WARNING says so —
a client that resumes with its position is then told "not recovered", never
handed a silent gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..errors import ErrorCode, ProtocolError
from ..stream import EMPTY, ClientInfo, HistoryPolicy, Position, Publication, reaches
from . import envelope
from .base import Broker, unavailable
from .redis_pubsub import RedisPubSub

__all__ = ["RedisBroker"]

log = logging.getLogger(__name__)

# KEYS: meta, history. ARGV: new epoch, history size, history ttl (ms),
# meta ttl (ms), pub/sub channel, payload.
_PUBLISH = """
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch)
end
local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if tonumber(ARGV[2]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], offset .. '-0', 'p', ARGV[6])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
redis.call('PUBLISH', ARGV[5], offset .. '\\n' .. epoch .. '\\n' .. ARGV[6])
return {offset, epoch}
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


def _new_epoch() -> str:
    return secrets.token_urlsafe(6)


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
    ) -> None:
        self._presence_ttl_ms = max(1, int(presence_ttl * 1000))
        # This node's present clients: (channel, client) -> ClientInfo JSON.
        self._present: dict[tuple[str, str], bytes] = {}
        self._url = url
        self._prefix = prefix
        self._meta_ttl_ms = max(1, int(meta_ttl * 1000))
        no_retry = Retry(NoBackoff(), 0)
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=10, socket_connect_timeout=5, retry=no_retry
        )
        self._publish_script = self._redis.register_script(_PUBLISH)
        self._ensure_script = self._redis.register_script(_ENSURE)
        self._presence_script = self._redis.register_script(_PRESENCE)
        self._pubsub = RedisPubSub(
            url,
            on_message=self._on_message,
            on_resubscribed=self._catch_up,
            on_lost=self._drop_idle_connections,
            subscribe_timeout=subscribe_timeout,
            ping_interval=ping_interval,
            max_backoff=max_backoff,
        )
        # Channels with subscribers on this node -> last position delivered here.
        self._interest: dict[str, Position] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

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
        await self._pubsub.close()
        await self._redis.aclose()

    async def _drop_idle_connections(self) -> None:
        """The pub/sub connection broke: idle command connections to a Redis that
        went away are dead too; drop them so that the next command connects afresh."""
        await self._redis.connection_pool.disconnect(inuse_connections=False)

    # -- publishing and reading -------------------------------------------

    async def publish(
        self,
        channel: str,
        data: bytes,
        *,
        history: HistoryPolicy,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
    ) -> Publication:
        now_ms = int(time.time() * 1000)
        payload = envelope.encode(data, info, tags, now_ms)
        size = history.size
        ttl_ms = max(1, int(history.ttl * 1000))
        try:
            offset, epoch = await self._publish_script(
                keys=self._keys(channel),
                args=[
                    _new_epoch(),
                    size,
                    ttl_ms,
                    max(self._meta_ttl_ms, ttl_ms),
                    self._pubsub_name(channel),
                    payload,
                ],
            )
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        return Publication(channel, int(offset), epoch.decode(), data, info, tags, now_ms)

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
        low = f"{since.offset + 1}-0" if since is not None else "-"
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hmget(meta_key, ["e", "o"])
                if limit != 0:
                    if reverse:
                        pipe.xrevrange(history_key, "+", low, count=count)
                    else:
                        pipe.xrange(history_key, low, "+", count=count)
                results: list[Any] = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        epoch_raw, offset_raw = results[0]
        if epoch_raw is None:
            return [], EMPTY
        top = Position(epoch_raw.decode(), int(offset_raw or 0))
        if limit == 0 or (since is not None and since.epoch != top.epoch and since != EMPTY):
            return [], top
        publications = []
        for entry_id, fields in results[1]:
            offset = int(entry_id.split(b"-", 1)[0])
            try:
                publications.append(envelope.decode(channel, offset, top.epoch, fields[b"p"]))
            except (envelope.MalformedEnvelope, KeyError) as exc:
                # Left out, so a recovery across it is "not recovered" (``reaches``
                # counts), never a gap or invalid JSON forwarded to clients.
                log.warning("channel %r: skipped history entry %d: %s", channel, offset, exc)
        return publications, top

    # -- subscribing -------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        if channel not in self._interest:
            self._interest[channel] = EMPTY
        try:
            await self._pubsub.subscribe(self._pubsub_name(channel))
        except TimeoutError:
            raise ProtocolError(
                ErrorCode.INTERNAL, "broker unavailable: redis did not confirm the subscription"
            ) from None
        try:
            top = await self._ensure(channel)
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        self._advance(channel, top)

    def unsubscribe(self, channel: str) -> None:
        if self._interest.pop(channel, None) is not None:
            self._pubsub.unsubscribe(self._pubsub_name(channel))

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    async def _ensure(self, channel: str) -> Position:
        offset, epoch = await self._ensure_script(
            keys=self._keys(channel), args=[_new_epoch(), self._meta_ttl_ms]
        )
        return Position(epoch.decode(), int(offset))

    def _advance(self, channel: str, top: Position) -> None:
        """Remember ``top`` as delivered when nothing newer was delivered here."""
        last = self._interest.get(channel)
        if last is None:
            return
        if last == EMPTY or last.epoch != top.epoch or last.offset < top.offset:
            self._interest[channel] = top

    # -- what the pub/sub connection hands on ---------------------------------

    async def _catch_up(self, names: list[bytes]) -> None:
        """Deliver what each channel published while the connection was down."""
        for channel in map(self._channel_of, names):
            last = self._interest.get(channel)
            if last is None:
                continue
            top = await self._ensure(channel)
            if last.epoch == top.epoch and last.offset >= top.offset:
                continue
            since = last if last.epoch == top.epoch else Position(top.epoch, 0)
            pubs, top = await self.history(channel, since=since)
            if not reaches(since, pubs, top):
                log.warning(
                    "channel %r: publications made while redis was unreachable are no longer "
                    "in history; subscribers here missed them and resuming clients will be "
                    "told they were not recovered",
                    channel,
                )
                self._advance(channel, top)
                continue
            if since is not last:
                log.warning(
                    "channel %r: redis lost its position (epoch %s -> %s)",
                    channel,
                    last.epoch,
                    top.epoch,
                )
            for pub in pubs:
                self._deliver_once(pub)

    def _channel_of(self, name: bytes) -> str:
        return name.decode()[len(self._prefix) + 3 :]

    def _on_message(self, name: bytes, message: bytes) -> None:
        channel = self._channel_of(name)
        if channel not in self._interest:
            return
        try:
            offset, epoch, payload = message.split(b"\n", 2)
            pub = envelope.decode(channel, int(offset), epoch.decode(), payload)
        except ValueError as exc:  # split, int(), decode() or envelope.MalformedEnvelope
            log.warning("dropped a malformed message on %r: %s", name, exc)
            return
        self._deliver_once(pub)

    def _deliver_once(self, pub: Publication) -> None:
        last = self._interest.get(pub.channel)
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
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for channel in channels[start : start + 1000]:
                            pipe.pexpire(self._keys(channel)[0], self._meta_ttl_ms)
                        await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("could not refresh channel positions in redis: %s", exc)

    # -- presence ------------------------------------------------------------

    def _presence_keys(self, channel: str) -> list[str]:
        base = f"{self._prefix}:{{{channel}}}:"
        return [base + "pz", base + "ph"]

    async def add_presence(self, channel: str, client: str, info: ClientInfo) -> None:
        encoded = msgspec.json.encode(info)
        self._present[(channel, client)] = encoded
        try:
            await self._write_presence([(channel, client, encoded)])
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
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zrem(zset, client)
                pipe.hdel(table, client)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            # The entry expires within presence_ttl anyway.
            log.info("could not remove %s from %s presence now: %s", client, channel, exc)

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        try:
            flat = await self._presence_script(
                keys=self._presence_keys(channel), args=[int(time.time() * 1000)]
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
                    await self._write_presence(entries[start : start + 1000])
            except (RedisError, OSError) as exc:
                log.warning("could not refresh presence in redis: %s", exc)
