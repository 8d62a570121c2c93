"""Unit tests of the sans-I/O hub and the memory broker: no sockets."""

from __future__ import annotations

import asyncio

import pytest

from faults_support import Recorder, offsets
from tidings.brokers.memory import MemoryBroker
from tidings.cursor import decode_cursor, encode_cursor
from tidings.errors import ProtocolError
from tidings.hub import DEFAULT_HISTORY, EMPTY, HistoryPolicy, Hub, Position, Publication

pytestmark = pytest.mark.unit


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_publish_assigns_increasing_offsets_in_one_epoch() -> None:
    async def scenario() -> None:
        hub = Hub(MemoryBroker())
        first = await hub.publish("a", b"1")
        second = await hub.publish("a", b"2")
        other = await hub.publish("b", b"3")
        assert (first.offset, second.offset) == (1, 2)
        assert first.epoch == second.epoch != ""
        assert other.offset == 1 and other.epoch != first.epoch

    run(scenario())


def test_subscriber_gets_live_publications_in_order() -> None:
    async def scenario() -> None:
        hub = Hub(MemoryBroker())
        sub = Recorder()
        recovery = await hub.subscribe("a", sub)
        # A subscribed channel has an epoch before its first publication,
        # because SDKs keep the epoch of their subscribe reply.
        assert recovery.position.epoch and recovery.position.offset == 0
        assert not recovery.recovered
        for i in range(5):
            await hub.publish("a", str(i).encode())
        await hub.publish("b", b"elsewhere")
        assert offsets(sub.received) == [1, 2, 3, 4, 5]
        assert [pub.data for pub in sub.received] == [b"0", b"1", b"2", b"3", b"4"]
        assert {pub.epoch for pub in sub.received} == {recovery.position.epoch}

    run(scenario())


def test_recovery_returns_exactly_what_was_missed() -> None:
    async def scenario() -> None:
        hub = Hub(MemoryBroker())
        for i in range(3):
            await hub.publish("a", str(i).encode())
        _, top = await hub.history("a", limit=0)
        for i in range(4):
            await hub.publish("a", str(i).encode())
        recovery = await hub.subscribe("a", Recorder(), since=top)
        assert recovery.recovered
        assert offsets(recovery.publications) == [4, 5, 6, 7]
        assert recovery.position.offset == 7

    run(scenario())


def test_recovery_from_empty_position_covers_a_channel_born_since() -> None:
    async def scenario() -> None:
        hub = Hub(MemoryBroker())
        await hub.publish("a", b"1")
        recovery = await hub.recover("a", EMPTY)
        assert recovery.recovered and offsets(recovery.publications) == [1]

    run(scenario())


def test_recovery_is_refused_when_history_was_evicted() -> None:
    async def scenario() -> None:
        hub = Hub(MemoryBroker(), history_for=lambda channel: HistoryPolicy(3, 300.0))
        first = await hub.publish("a", b"1")
        for i in range(5):
            await hub.publish("a", str(i).encode())
        recovery = await hub.recover("a", first)
        assert not recovery.recovered
        assert recovery.publications == []
        assert recovery.position.offset == 6

    run(scenario())


def test_recovery_is_refused_on_another_epoch() -> None:
    async def scenario() -> None:
        hub = Hub(MemoryBroker())
        await hub.publish("a", b"1")
        recovery = await hub.recover("a", Position("old-epoch", 1))
        assert not recovery.recovered and recovery.publications == []

    run(scenario())


def test_history_expires_after_ttl() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        hub = Hub(broker, history_for=lambda channel: HistoryPolicy(100, 0.05))
        first = await hub.publish("a", b"1")
        await hub.publish("a", b"2")
        await asyncio.sleep(0.1)
        pubs, top = await hub.history("a", limit=-1)
        assert pubs == [] and top.offset == 2
        assert not (await hub.recover("a", first)).recovered

    run(scenario())


def test_forgotten_channel_gets_a_new_epoch() -> None:
    async def scenario() -> None:
        broker = MemoryBroker(meta_ttl=0.01)
        hub = Hub(broker, history_for=lambda channel: HistoryPolicy(100, 0.01))
        old = await hub.publish("a", b"1")
        await asyncio.sleep(0.05)
        broker.sweep()
        new = await hub.publish("a", b"2")
        assert new.epoch != old.epoch and new.offset == 1
        assert not (await hub.recover("a", old)).recovered

    run(scenario())


def test_a_stream_only_a_subscription_made_goes_at_the_next_sweep() -> None:
    """Ordered as test_sse's history-overflow test ran under load: the stream
    closes, a sweep runs, then the channel's first publication. The empty
    stream is forgotten (its epoch with it), so a resume at that epoch is not
    recovered; a stream with a stored publication is kept for ``meta_ttl``."""

    async def scenario() -> None:
        broker = MemoryBroker()
        hub = Hub(broker)
        await hub.publish("kept", b"before")
        sub = Recorder()
        empty = await hub.subscribe("empty", sub)
        kept = await hub.subscribe("kept", sub)
        hub.unsubscribe("empty", sub)
        hub.unsubscribe("kept", sub)
        broker.sweep()
        await hub.publish("empty", b"first")
        await hub.publish("kept", b"missed")
        assert not (await hub.recover("empty", empty.position)).recovered
        resumed = await hub.recover("kept", kept.position)
        assert resumed.recovered and offsets(resumed.publications) == [2]

    run(scenario())


def test_channel_is_dropped_with_its_last_subscriber() -> None:
    async def scenario() -> None:
        hub = Hub(MemoryBroker())
        one, two = Recorder(), Recorder()
        await hub.subscribe("a", one)
        await hub.subscribe("a", two)
        assert dict(hub.channels()) == {"a": 2}
        hub.unsubscribe("a", one)
        assert hub.num_subscribers("a") == 1
        hub.unsubscribe("a", two)
        assert hub.num_channels == 0

    run(scenario())


def test_encoded_is_computed_once_per_format() -> None:
    pub = Publication("a", 1, "e", b"{}")
    calls: list[int] = []

    def encoder(p: Publication) -> bytes:
        calls.append(1)
        return b"x" + p.data

    assert pub.encoded(encoder) is pub.encoded(encoder)
    assert len(calls) == 1


class SlowBroker(MemoryBroker):
    """A broker whose history read yields to the loop, as a remote one does.

    While the read is in flight, another publication lands; the hub must hand
    it to the new subscriber exactly once.
    """

    remote = True

    def __init__(self) -> None:
        super().__init__()
        self.during_read: bytes | None = None

    async def history(self, channel, **kwargs):  # type: ignore[no-untyped-def, override]
        result = await super().history(channel, **kwargs)
        if self.during_read is not None:
            data, self.during_read = self.during_read, None
            await self.publish(channel, data, history=DEFAULT_HISTORY)
        await asyncio.sleep(0)
        return result


def test_publication_during_history_read_is_neither_lost_nor_repeated() -> None:
    async def scenario() -> None:
        broker = SlowBroker()
        hub = Hub(broker)
        watcher = Recorder()
        await hub.subscribe("a", watcher)
        start = await hub.publish("a", b"1")
        await hub.publish("a", b"2")
        broker.during_read = b"3"
        late = Recorder()
        recovery = await hub.subscribe("a", late, since=start)
        assert recovery.recovered
        await hub.publish("a", b"4")
        seen = offsets(recovery.publications) + offsets(late.received)
        assert seen == [2, 3, 4]
        assert offsets(watcher.received) == [1, 2, 3, 4]

    run(scenario())


def test_cursor_round_trip_and_malformed_cursor() -> None:
    positions = {"a": Position("e1", 3), "b:c#1": Position("", 0)}
    token = encode_cursor(positions)
    assert "=" not in token and "\n" not in token
    assert decode_cursor(token) == positions
    for bad in ["!!!", "bm90IGpzb24", encode_cursor({})[:-1] + "x"]:
        with pytest.raises(ProtocolError):
            decode_cursor(bad)


class Resyncing(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.resyncs = 0

    def insufficient_state(self) -> None:
        self.resyncs += 1


def test_a_skip_in_the_live_stream_makes_subscribers_resync() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        hub = Hub(broker)
        sub = Resyncing()
        await hub.subscribe("a", sub)
        first = await hub.publish("a", b"1")
        # A remote broker that lost a message (or its data) hands the hub a gap.
        hub._deliver(Publication("a", first.offset + 2, first.epoch, b"3"))
        hub._deliver(Publication("a", 1, "new-epoch", b"x"))
        assert offsets(sub.received) == [1]
        assert sub.resyncs == 2

    run(scenario())
