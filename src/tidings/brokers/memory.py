"""The in-memory broker: one process, nothing else to run (the default).

Each channel's stream is a bounded ring of recent publications with a
time-to-live. A stream is created by its first publication. When it has no
subscribers, and no publication for ``meta_ttl`` seconds, it is forgotten; if
the channel comes back, it gets a new epoch, so a client holding an old
position learns that it cannot be recovered instead of silently missing what
happened in between. Subscribing creates the stream too, so that a subscriber
learns the epoch its later publications will carry (the Centrifugo SDKs take
the epoch from the subscribe reply only). Reading never creates a stream: a
channel without one is at position ``EMPTY``.

The number of streams is capped (``limits.max_channels``): see
:meth:`MemoryBroker._create`.
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

from ..errors import ErrorCode, ProtocolError
from ..hub import EMPTY, ClientInfo, Position, Publication
from .base import Broker

log = logging.getLogger("tidings.broker")


class _Stream:
    __slots__ = ("epoch", "expires", "forget_at", "history", "offset")

    def __init__(self, size: int) -> None:
        self.epoch = secrets.token_urlsafe(6)
        self.offset = 0
        self.history: deque[Publication] = deque(maxlen=size)
        self.expires = 0.0
        self.forget_at = 0.0

    @property
    def top(self) -> Position:
        return Position(self.epoch, self.offset)


class MemoryBroker(Broker):
    """History rings per channel in this process. See the module docstring."""

    def __init__(
        self,
        *,
        history_size: int = 100,
        history_ttl: float = 300.0,
        meta_ttl: float = 3600.0,
        sweep_interval: float = 5.0,
        history_for: Callable[[str], tuple[int, float]] | None = None,
        max_channels: int = 100_000,
    ) -> None:
        """``history_for(channel) -> (size, ttl)`` overrides the sizes per channel."""
        self._history_for = history_for or (lambda channel: (history_size, history_ttl))
        self._meta_ttl = meta_ttl
        self._sweep_interval = sweep_interval
        self._max_channels = max_channels
        # Whether the cap has refused a stream since the last sweep left room:
        # the operator is warned once per episode, not once per refusal.
        self._full = False
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

    def _stream(self, channel: str) -> _Stream:
        stream = self._streams.get(channel)
        if stream is None:
            return self._create(channel)
        self._expire(stream, time.monotonic())
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
        stream = self._streams[channel] = _Stream(self._history_for(channel)[0])
        return stream

    @staticmethod
    def _expire(stream: _Stream, now: float) -> None:
        if stream.history and now >= stream.expires:
            stream.history.clear()

    async def publish(
        self,
        channel: str,
        data: bytes,
        *,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
    ) -> Publication:
        stream = self._stream(channel)
        stream.offset += 1
        pub = Publication(channel, stream.offset, stream.epoch, data, info, tags)
        now = time.monotonic()
        ttl = self._history_for(channel)[1]
        stream.forget_at = now + max(self._meta_ttl, ttl)
        if stream.history.maxlen:
            stream.history.append(pub)
            stream.expires = now + ttl
        if self._deliver is not None:
            self._deliver(pub)
        return pub

    async def subscribe(self, channel: str) -> None:
        self._stream(channel)  # first: a refused stream must leave no interest behind
        self._interest.add(channel)

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
        self._expire(stream, time.monotonic())
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
        now = time.monotonic() if now is None else now
        for channel, stream in list(self._streams.items()):
            self._expire(stream, now)
            if now >= stream.forget_at and channel not in self._interest:
                del self._streams[channel]
        if len(self._streams) < self._max_channels:
            self._full = False

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            self.sweep()
