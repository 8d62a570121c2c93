"""A memory broker with faults injected at chosen moments, for the race tests.

The races of a remote broker are about *when* things happen: a publication
landing while a history read is in flight, a pub/sub message lost, a broker
that stops answering. :class:`FaultyBroker` makes each of those happen at the
moment a test chooses, deterministically, over the in-memory broker's real
semantics (offsets, epochs, history); :class:`HeldRedisBroker` does the first
two over a real Redis.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tidings.brokers.base import Broker
from tidings.brokers.memory import MemoryBroker
from tidings.brokers.redis import RedisBroker
from tidings.hub import ClientInfo, Position, Publication
from tidings.stream import HistoryPolicy


class HoldsHistory(Broker):
    """Over any broker: history reads held, deliveries dropped, at a test's choosing.

    * ``hold_history``: channels whose history reads are held *after* reading,
      each until its gate in :attr:`held` is set (in the order they were read).
    * ``drop``: ``(channel, offset)`` of publications stored in history but
      never delivered live (a message lost on a pub/sub link).
    * ``unsubscribed``: channels whose publications are not delivered live,
      as Redis pub/sub delivers nothing before its SUBSCRIBE takes effect.

    Mixed in before a real broker class (``class X(HoldsHistory, RedisBroker)``).
    """

    hold_history: set[str]
    held: list[asyncio.Event]
    drop: set[tuple[str, int]]
    unsubscribed: set[str]

    def init_faults(self) -> None:
        self.hold_history = set()
        self.held = []
        self.drop = set()
        self.unsubscribed = set()

    def bind(self, deliver: Any) -> None:
        def lossy(pub: Publication) -> None:
            if (pub.channel, pub.offset) not in self.drop and pub.channel not in self.unsubscribed:
                deliver(pub)

        super().bind(lossy)

    def position(self, channel: str) -> Position | None:
        """None for a channel whose history reads are held: its subscribes read history."""
        if channel in self.hold_history:
            return None
        return super().position(channel)

    async def held_reads(self, n: int) -> None:
        """Wait (bounded) until ``n`` history reads are held in total."""
        async with asyncio.timeout(5):
            while len(self.held) < n:
                await asyncio.sleep(0.001)

    async def history(
        self,
        channel: str,
        *,
        since: Position | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> tuple[list[Publication], Position]:
        result = await super().history(  # type: ignore[safe-super]
            channel, since=since, limit=limit, reverse=reverse
        )
        if channel in self.hold_history:
            gate = asyncio.Event()
            self.held.append(gate)
            await gate.wait()
        return result


class FaultyBroker(HoldsHistory, MemoryBroker):
    """The memory broker with :class:`HoldsHistory`'s faults, and two more:
    ``running``, while cleared, makes every call that would reach a remote
    broker (publish, subscribe, history, presence) wait, as a paused Redis does;
    ``hold_subscribe`` holds the broker subscription of its channels until
    their gate in :attr:`held_subscribes` is set, delivering nothing live
    meanwhile, as a SUBSCRIBE not yet confirmed.
    """

    remote = True  # its calls can wait, so the hub bounds them

    def __init__(self) -> None:
        super().__init__()
        self.init_faults()
        self.running = asyncio.Event()
        self.running.set()
        self.hold_subscribe: set[str] = set()
        self.held_subscribes: list[asyncio.Event] = []

    async def publish(
        self,
        channel: str,
        data: bytes,
        *,
        history: HistoryPolicy,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
    ) -> Publication:
        await self.running.wait()
        return await super().publish(channel, data, history=history, info=info, tags=tags)

    def position(self, channel: str) -> Position | None:
        """None: a remote broker's subscribers read history (where the faults are)."""
        return None

    async def subscribe(self, channel: str) -> None:
        await self.running.wait()
        if channel in self.hold_subscribe:
            gate = asyncio.Event()
            self.held_subscribes.append(gate)
            self.unsubscribed.add(channel)
            try:
                await gate.wait()
            finally:
                self.unsubscribed.discard(channel)
        await super().subscribe(channel)

    async def history(
        self,
        channel: str,
        *,
        since: Position | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> tuple[list[Publication], Position]:
        await self.running.wait()
        return await super().history(channel, since=since, limit=limit, reverse=reverse)

    async def add_presence(self, channel: str, client: str, info: ClientInfo) -> None:
        await self.running.wait()
        await super().add_presence(channel, client, info)

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        await self.running.wait()
        return await super().presence(channel)


class HeldRedisBroker(HoldsHistory, RedisBroker):
    """A real Redis broker whose history reads and deliveries a test controls."""

    def __init__(self, url: str, **kw: Any) -> None:
        super().__init__(url, **kw)
        self.init_faults()


class Recorder:
    """A subscriber that remembers what it was given, and how often it was told to resync."""

    def __init__(self) -> None:
        self.received: list[Publication] = []
        self.resyncs = 0

    def deliver(self, pub: Publication) -> None:
        self.received.append(pub)

    def insufficient_state(self) -> None:
        self.resyncs += 1

    def deliver_presence(self, event: object) -> None:
        pass


def offsets(pubs: list[Publication]) -> list[int]:
    return [pub.offset for pub in pubs]
