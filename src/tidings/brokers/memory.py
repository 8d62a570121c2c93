"""The in-memory broker: one process, nothing else to run (the default).

Each channel's stream is a bounded ring of recent publications with a
time-to-live; its size and time-to-live come with each publication
(:class:`~tidings.hub.HistoryPolicy`), so the broker knows no namespaces. A
stream is created by its first publication. When it has no
subscribers, and no publication for ``meta_ttl`` seconds, it is forgotten; if
the channel comes back, it gets a new epoch, so a client holding an old
position learns that it cannot be recovered instead of silently missing what
happened in between. Subscribing creates the stream too, so that a subscriber
learns the epoch its later publications will carry (the Centrifugo SDKs take
the epoch from the subscribe reply only); such a stream keeps no history until
a publication says how much (its ring starts at size 0, and each publication
resizes it to its policy's size if that differs). Reading never creates a
stream: a channel without one is at position ``EMPTY``.

The number of streams is capped (``limits.max_channels``): see
:meth:`MemoryBroker._create`. The bytes all history holds are capped too
(``limits.max_history_memory``): see :meth:`MemoryBroker._evict_for_budget`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Final

from ..errors import ErrorCode, ProtocolError
from ..stream import EMPTY, ClientInfo, HistoryPolicy, Position, Publication, directed
from .base import Broker, IdempotencyTable

log = logging.getLogger(__name__)

#: Copies of ``data`` a publication in history is charged for. Measured with
#: tracemalloc (64 KiB JSON ``data``, 2,000 publications): stored and never
#: delivered, a publication holds 1.0 x its data (+210 B); delivered over a
#: plain WebSocket it also caches its publication JSON, its push JSON and its
#: frame (``EncodedOnce``), 4.5 x data (+720 B); read over SSE or poll as well,
#: 6.0 x (1 KiB data: 5.2 x and 6.8 x, the fixed part weighing more). Charging
#: the typical delivered cost (4 x data + the overhead below) keeps what
#: history really holds within 1.5 x the budget in the worst of these cases
#: (1.04 x for a 1 KiB publication delivered over WebSocket); an undelivered
#: one is over-charged about 4 x, which errs on the side of the bound. Over
#: the wire: a subscribed anonymous client publishing 320 MiB of 60 KB
#: messages over WebSocket grew the server's RSS by 31 MiB under a 32 MiB
#: budget (by 200 MiB for just 64 MiB published, without one).
DATA_COPIES: Final = 4
#: Bytes a publication in history is charged beyond its data: the
#: ``Publication`` object, its slot in its ring, its entry in the broker's
#: eviction queue (tuple and int), the encoded-forms dict and the ``bytes``
#: headers of data and its encodings (measured 720-1,240 B; rounded up).
PUBLICATION_OVERHEAD: Final = 1024
#: Stale entries the eviction queue may hold beyond the publications held.
_STALE_SLACK: Final = 1024


def history_cost(pub: Publication) -> int:
    """What ``pub`` is charged against ``limits.max_history_memory`` while in history.

    A function of the publication alone, fixed when it is stored, so that
    every way out of history can give back exactly what was charged. Tags
    and the publisher's connection and channel info are copied into every
    encoded form as data is, so they are charged as data; the user and client
    ids are short and within the overhead.
    """
    size = len(pub.data)
    tags = pub.tags
    if tags:
        size += sum(len(key) + len(value) for key, value in tags.items())
    info = pub.info
    if info is not None:
        if info.conn_info is not None:
            size += len(info.conn_info)
        if info.chan_info is not None:
            size += len(info.chan_info)
    return DATA_COPIES * size + PUBLICATION_OVERHEAD


class _Stream:
    __slots__ = ("epoch", "expires", "forget_at", "held", "history", "offset")

    def __init__(self) -> None:
        self.epoch = secrets.token_urlsafe(6)
        self.offset = 0
        # Consecutive offsets, oldest first: publications leave only from the
        # front (or all at once), which ``history()`` slicing relies on. Its
        # ``maxlen`` is the size the last publication asked for (0 before any).
        self.history: deque[Publication] = deque(maxlen=0)
        #: ``history_cost`` summed over ``history``.
        self.held = 0
        self.expires = 0.0
        self.forget_at = 0.0

    @property
    def top(self) -> Position:
        return Position(self.epoch, self.offset)


class MemoryBroker(Broker):
    """History rings per channel in this process. See the module docstring."""

    remote = False  # every call completes without waiting: nothing to bound

    def __init__(
        self,
        *,
        meta_ttl: float = 3600.0,
        sweep_interval: float = 5.0,
        max_channels: int = 100_000,
        max_history_memory: int = 256 * 1024 * 1024,
        idempotency_window: float = 300.0,
        max_idempotency_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` is injectable so that tests can drive expiry without waiting."""
        self._idempotency = IdempotencyTable(idempotency_window, max_idempotency_keys, clock)
        self._meta_ttl = meta_ttl
        self._sweep_interval = sweep_interval
        self._max_channels = max_channels
        self._max_history_memory = max_history_memory
        self._clock = clock
        # Whether the cap has refused a stream since the last sweep left room:
        # the operator is warned once per episode, not once per refusal.
        self._full = False
        # Likewise for the history budget: set when it starts evicting, reset
        # by a sweep that finds history below half the budget.
        self._evicting = False
        #: ``history_cost`` summed over every ring, and how many publications they hold.
        self._held_bytes = 0
        self._held_count = 0
        # Every publication stored, oldest first, as (its stream, its offset):
        # the order the budget evicts in. Entries whose publication already
        # left by another way (ring overflow, expiry, a forgotten stream) are
        # skipped when they reach the front, and compacted away once they
        # outnumber the live ones. Holding the offset rather than the
        # publication lets an expired publication's memory go at once.
        self._stored: deque[tuple[_Stream, int]] = deque()
        self._streams: dict[str, _Stream] = {}
        self._interest: set[str] = set()
        self._presence: dict[str, dict[str, ClientInfo]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    @property
    def history_memory(self) -> int:
        """Bytes charged for all history now held (see ``history_cost``)."""
        return self._held_bytes

    def _stream(self, channel: str) -> _Stream:
        stream = self._streams.get(channel)
        if stream is None:
            return self._create(channel)
        self._expire(stream, self._clock())
        return stream

    def _create(self, channel: str) -> _Stream:
        """A new stream for ``channel``, unless the broker already holds ``max_channels``.

        Every stream counts, whether a publication or a subscription created
        it: the cap is then one invariant (``len(streams) <= max_channels``)
        that no order of commands can get around. Counting only streams with
        history would not be enough: a subscription's stream outlives it until
        the next sweep (so that a client reconnecting at once keeps its
        epoch), so subscribe/unsubscribe churn would grow the table bounded
        only by time; and a subscribed stream turns into a history-bearing one
        at its first publication, which the cap would then have to refuse on a
        channel that already exists. So creating a stream past the cap, by
        publishing or by subscribing, is error 106, while channels that exist
        keep working. A stream counts until it is forgotten: ``meta_ttl`` (or
        its history's ttl, if longer) after its last publication, once nobody
        on this node is subscribed; sweeping is what frees slots.

        The hub's own per-channel state needs no cap of its own: it exists
        only for channels with subscribers on this node, each of which has a
        stream here.
        """
        if len(self._streams) >= self._max_channels:
            if not self._full:
                self._full = True
                log.warning(
                    "refusing new channels: limits.max_channels (%d) reached; "
                    "slots free as channels expire (history.meta_ttl)",
                    self._max_channels,
                )
            raise ProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"too many channels on this server (limits.max_channels = {self._max_channels})",
            )
        stream = self._streams[channel] = _Stream()
        return stream

    def _expire(self, stream: _Stream, now: float) -> None:
        if stream.history and now >= stream.expires:
            self._clear(stream)

    def _clear(self, stream: _Stream) -> None:
        """Drop all of ``stream``'s history (expired, or the stream forgotten)."""
        self._held_bytes -= stream.held
        self._held_count -= len(stream.history)
        stream.held = 0
        stream.history.clear()

    def _pop_oldest(self, stream: _Stream) -> None:
        """Drop the front of ``stream``'s ring (overflow, or the budget)."""
        cost = history_cost(stream.history.popleft())
        stream.held -= cost
        self._held_bytes -= cost
        self._held_count -= 1

    def _resize(self, stream: _Stream, size: int) -> None:
        """Give ``stream``'s ring room for ``size`` publications, dropping the oldest over it.

        Runs when a publication's policy differs from the ring's size: at a
        stream's first publication, and if a channel's policy ever changes.
        The dropped ones leave from the front, charged back, as an overflow.
        """
        while len(stream.history) > size:
            self._pop_oldest(stream)
        stream.history = deque(stream.history, maxlen=size)

    def _store(self, stream: _Stream, pub: Publication) -> None:
        """Append ``pub`` to its ring, charged, evicting for the ring's size and the budget.

        The hot path of every publish, so written flat. Measured with timeit
        (1000 channels x 100, 1 KiB data, rings overflowing on every publish):
        1.75 us per ``publish`` before the budget, 2.4 us with it, 2.5 us while
        it evicts on every publish (best of 3 x 200,000, on a loaded 2-core box).
        """
        history = stream.history
        cost = history_cost(pub)
        if len(history) == history.maxlen:
            # What ``maxlen`` would drop silently, given back.
            cost -= history_cost(history.popleft())
        else:
            self._held_count += 1
        history.append(pub)
        stream.held += cost
        self._held_bytes += cost
        stored = self._stored
        stored.append((stream, pub.offset))
        if self._held_bytes > self._max_history_memory:
            self._evict_for_budget()
        if len(stored) > 2 * self._held_count + _STALE_SLACK:
            self._compact()

    @staticmethod
    def _holds(stream: _Stream, offset: int) -> bool:
        """Whether ``stream``'s ring still holds the publication at ``offset``.

        A ring holds consecutive offsets and loses them only from the front,
        and a forgotten stream is cleared, so this is one comparison.
        """
        history = stream.history
        return bool(history) and history[0].offset <= offset

    def _evict_for_budget(self) -> None:
        """Evict the oldest publications in the process until history fits the budget.

        Publishing is never refused for memory: a backend's publish must not
        fail because an anonymous client filled history. The victims go from
        the front of their rings, so every ring keeps consecutive offsets and
        a client resuming from an evicted position is told "not recovered"
        (the hub's all-or-nothing ``reaches``), never given a gap. The
        publication being stored is the newest, so it goes last, and only if
        it alone is over the budget.
        """
        if not self._evicting:
            self._evicting = True
            log.warning(
                "evicting the oldest history: limits.max_history_memory (%d bytes) reached; "
                "clients resuming from evicted positions are told it is not recovered",
                self._max_history_memory,
            )
        stored = self._stored
        while self._held_bytes > self._max_history_memory:
            stream, offset = stored.popleft()
            if self._holds(stream, offset):
                self._pop_oldest(stream)  # the front is that very publication

    def _compact(self) -> None:
        """Drop queue entries of publications gone by other ways, once they dominate.

        Called when the queue holds more than twice the publications held
        (plus a constant): each compaction removes at least half of what it
        walks, so the queue stays bounded by what history holds, at O(1)
        amortised per publication.
        """
        # ``_holds`` inlined: 59 ns per entry instead of 157 (timeit, 200,000
        # entries), and a ring overflowing on every publish walks two per publish.
        self._stored = deque(
            [e for e in self._stored if (ring := e[0].history) and ring[0].offset <= e[1]]
        )

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
        if idempotency_key:
            first = self._idempotency.get(channel, idempotency_key)
            if first is not None:
                return first
        if skip_history:
            pub = self._publish_live(channel, data, info, tags, exclude)
        else:
            pub = self._publish(channel, data, history, info, tags, exclude)
        if idempotency_key:
            self._idempotency.put(channel, idempotency_key, pub.position)
        return pub

    def _publish(
        self,
        channel: str,
        data: bytes,
        history: HistoryPolicy,
        info: ClientInfo | None,
        tags: dict[str, str] | None,
        exclude: frozenset[str],
    ) -> Publication:
        stream = self._stream(channel)
        stream.offset += 1
        pub = directed(channel, stream.offset, stream.epoch, data, info, tags, exclude=exclude)
        now = self._clock()
        stream.forget_at = now + max(self._meta_ttl, history.ttl)
        if stream.history.maxlen != history.size:
            self._resize(stream, history.size)
        if history.size:
            self._store(stream, pub)
            stream.expires = now + history.ttl
        if self._deliver is not None:
            self._deliver(pub)
        return pub

    def _publish_live(
        self,
        channel: str,
        data: bytes,
        info: ClientInfo | None,
        tags: dict[str, str] | None,
        exclude: frozenset[str],
    ) -> Publication:
        """``skip_history``: stamped with the stream's position, which it leaves alone.

        A channel without a stream has no subscriber (subscribing creates
        one) and nobody to deliver to: no stream is created for it, and its
        position is ``EMPTY``.
        """
        stream = self._streams.get(channel)
        if stream is None:
            return directed(channel, 0, "", data, info, tags, exclude=exclude, transient=True)
        self._expire(stream, self._clock())
        pub = directed(
            channel,
            stream.offset,
            stream.epoch,
            data,
            info,
            tags,
            exclude=exclude,
            transient=True,
        )
        if self._deliver is not None:
            self._deliver(pub)
        return pub

    async def subscribe(self, channel: str) -> None:
        self._stream(channel)  # first: a refused stream must leave no interest behind
        self._interest.add(channel)

    def position(self, channel: str) -> Position | None:
        """What ``history(channel, limit=0)`` answers, without a coroutine and
        the broker bound around it (3 % of the server's CPU in the WebSocket
        connect-rate run): the stream is here, so the view is always current."""
        stream = self._streams.get(channel)
        if stream is None or channel not in self._interest:
            return None
        self._expire(stream, self._clock())
        return stream.top

    def unsubscribe(self, channel: str) -> None:
        self._interest.discard(channel)

    async def history(
        self,
        channel: str,
        *,
        since: Position | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> tuple[list[Publication], Position]:
        stream = self._streams.get(channel)
        if stream is None:
            return [], EMPTY
        self._expire(stream, self._clock())
        top = stream.top
        if limit == 0 or (since is not None and since.epoch != stream.epoch and since != EMPTY):
            return [], top
        history = stream.history
        if since is None or not history:
            pubs = list(history)
        else:
            # The ring holds consecutive offsets: slice instead of scanning, since
            # every long-poll re-poll reads from its cursor.
            skip = max(0, since.offset - history[0].offset + 1)
            pubs = list(itertools.islice(history, skip, None)) if skip < len(history) else []
        if reverse:
            pubs.reverse()
        if limit is not None and limit > 0:
            pubs = pubs[:limit]
        return pubs, top

    async def add_presence(self, channel: str, client: str, info: ClientInfo) -> None:
        self._presence.setdefault(channel, {})[client] = info

    def remove_presence(self, channel: str, client: str) -> None:
        entries = self._presence.get(channel)
        if entries is not None:
            entries.pop(client, None)
            if not entries:
                del self._presence[channel]

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        return dict(self._presence.get(channel, {}))

    def sweep(self, now: float | None = None) -> None:
        """Expire old history; forget streams nobody uses or publishes to."""
        now = self._clock() if now is None else now
        for channel, stream in list(self._streams.items()):
            self._expire(stream, now)
            if now >= stream.forget_at and channel not in self._interest:
                self._clear(
                    stream
                )  # empty already (forget_at >= expires); the books must not rely on it
                del self._streams[channel]
        if len(self._streams) < self._max_channels:
            self._full = False
        if self._held_bytes <= self._max_history_memory // 2:
            self._evicting = False
        # No slack here: what expired goes from the queue too, even when little
        # is published afterwards (the sweep walks every stream anyway).
        if len(self._stored) > 2 * self._held_count:
            self._compact()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            self.sweep()
