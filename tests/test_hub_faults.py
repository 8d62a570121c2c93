"""The hub's races under a slow or lossy broker, made deterministic (issue 12).

Each test drives a :class:`~faults_support.FaultyBroker` so that the fault
lands at the one moment that matters: two subscribes in flight at once, a
publication lost while a subscribe waits on history, a broker that stops
answering. No sockets; the same races over real Redis are in
``test_session_faults.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from brokers_support import until
from faults_support import FaultyBroker, Recorder, offsets
from tidings.errors import BrokerUnavailable, ErrorCode, ProtocolError
from tidings.hub import ClientInfo, Hub, Position, Publication

pytestmark = pytest.mark.unit


def pending_of(hub: Hub, channel: str) -> int:
    """How many subscribes of ``channel`` the hub still buffers for."""
    state = hub._channels.get(channel)
    return 0 if state is None else len(state.pending)


def test_two_subscribes_in_flight_each_get_every_publication_once() -> None:
    """Both buffers hold equal publications; each subscribe removes its own."""

    async def scenario() -> None:
        broker = FaultyBroker()
        hub = Hub(broker)
        broker.hold_history.add("a")
        first, second = Recorder(), Recorder()
        joining_first = asyncio.ensure_future(hub.subscribe("a", first))
        await broker.held_reads(1)
        joining_second = asyncio.ensure_future(hub.subscribe("a", second))
        await broker.held_reads(2)
        await hub.publish("a", b"1")  # lands in both buffers: equal lists
        broker.held[1].set()  # the second subscribe ends first
        second_recovery = await joining_second
        await hub.publish("a", b"2")  # the first subscribe is still waiting
        broker.held[0].set()
        first_recovery = await joining_first
        await hub.publish("a", b"3")
        assert offsets(first_recovery.publications) + offsets(first.received) == [1, 2, 3]
        assert offsets(second_recovery.publications) + offsets(second.received) == [1, 2, 3]
        assert pending_of(hub, "a") == 0

    asyncio.run(scenario())


def test_a_skip_while_a_subscribe_waits_refuses_it_for_a_retry() -> None:
    """The live stream loses offset 2 while the late subscribe waits on history."""

    async def scenario() -> None:
        broker = FaultyBroker()
        hub = Hub(broker)
        watcher = Recorder()
        await hub.subscribe("a", watcher)
        await hub.publish("a", b"1")
        broker.hold_history.add("a")
        late = Recorder()
        joining = asyncio.ensure_future(hub.subscribe("a", late))
        await broker.held_reads(1)  # it read history at offset 1
        broker.drop.add(("a", 2))
        await hub.publish("a", b"2")
        await hub.publish("a", b"3")  # 1 -> 3: the channel's subscribers resync
        assert watcher.resyncs == 1
        broker.held[0].set()
        with pytest.raises(ProtocolError) as refused:
            await joining
        assert refused.value.code == ErrorCode.INTERNAL  # temporary: the client retries
        assert isinstance(refused.value, BrokerUnavailable)  # over HTTP: 503, Retry-After
        assert pending_of(hub, "a") == 0
        assert hub.num_subscribers("a") == 1  # the watcher only
        await hub.publish("a", b"4")
        assert late.received == [] and late.resyncs == 0
        # The retry goes live at the true position.
        broker.hold_history.clear()
        retry = await hub.subscribe("a", late)
        assert retry.position.offset == 4
        await hub.publish("a", b"5")
        assert offsets(late.received) == [5]

    asyncio.run(scenario())


def test_a_hole_behind_what_history_returned_is_never_dropped_silently() -> None:
    """A fresh channel: the first live message seen is no "skip" for the hub's
    top, but it does not follow what the history read returned."""

    async def scenario() -> None:
        broker = FaultyBroker()
        hub = Hub(broker)
        await hub.publish("a", b"1")
        broker.hold_history.add("a")
        late = Recorder()
        joining = asyncio.ensure_future(hub.subscribe("a", late, since=Position("", 0)))
        await broker.held_reads(1)  # history: offset 1
        broker.drop.add(("a", 2))
        await hub.publish("a", b"2")
        await hub.publish("a", b"3")  # buffered: 3 does not follow 1
        broker.held[0].set()
        with pytest.raises(ProtocolError) as refused:
            await joining
        assert refused.value.code == ErrorCode.INTERNAL
        assert hub.num_channels == 0 and pending_of(hub, "a") == 0
        assert "a" not in broker._interest
        broker.hold_history.clear()
        retry = await hub.subscribe("a", late, since=Position("", 0))
        assert retry.recovered and offsets(retry.publications) == [1, 2, 3]

    asyncio.run(scenario())


def test_a_buffered_publication_history_already_returned_is_not_a_hole() -> None:
    """The counterpart of the hole: an offset at or before the recovered position
    is a duplicate of history, skipped without refusing the subscribe."""

    async def scenario() -> None:
        broker = FaultyBroker()
        hub = Hub(broker)
        watcher = Recorder()
        await hub.subscribe("a", watcher)
        broker.hold_history.add("a")
        late = Recorder()
        joining = asyncio.ensure_future(hub.subscribe("a", late))
        await broker.held_reads(1)
        await hub.publish("a", b"1")
        broker.held[0].set()
        recovery = await joining
        assert offsets(recovery.publications) == [1]
        late_epoch = recovery.position.epoch
        # The same publication once more (a broker replaying after a reconnect).
        hub._deliver(Publication("a", 1, late_epoch, b"1"))
        await hub.publish("a", b"2")
        assert offsets(late.received) == [2] and late.resyncs == 0

    asyncio.run(scenario())


BROKER_CALLS: dict[str, Callable[[Hub], Awaitable[Any]]] = {
    "publish": lambda hub: hub.publish("a", b"1"),
    "subscribe": lambda hub: hub.subscribe("a", Recorder()),
    "recover": lambda hub: hub.recover("a", Position("", 0)),
    "history": lambda hub: hub.history("a"),
    "add_presence": lambda hub: hub.add_presence("a", "c", ClientInfo(user="u")),
    "presence": lambda hub: hub.presence("a"),
    "presence_stats": lambda hub: hub.presence_stats("a"),
}


@pytest.mark.parametrize("call", sorted(BROKER_CALLS))
def test_a_stalled_broker_answers_a_temporary_error_then_recovers(call: str) -> None:
    async def scenario() -> None:
        broker = FaultyBroker()
        hub = Hub(broker, broker_timeout=0.05)
        broker.running.clear()
        # The outer bound only keeps a hub without its own from hanging the test.
        with pytest.raises(ProtocolError) as refused:
            async with asyncio.timeout(5):
                await BROKER_CALLS[call](hub)
        assert refused.value.code == ErrorCode.INTERNAL
        assert refused.value.message == "broker unavailable: timed out after 0.05s"
        # Nothing half-registered: no channel, no buffer, no broker interest.
        assert hub.num_channels == 0 and not broker._interest
        broker.running.set()
        await BROKER_CALLS[call](hub)

    asyncio.run(scenario())


def test_a_subscribe_timing_out_on_history_leaves_the_channel_to_its_subscribers() -> None:
    async def scenario() -> None:
        broker = FaultyBroker()
        hub = Hub(broker, broker_timeout=0.05)
        watcher = Recorder()
        await hub.subscribe("a", watcher)
        broker.hold_history.add("a")  # the read completes, its answer never comes
        late = Recorder()
        with pytest.raises(ProtocolError) as refused:
            async with asyncio.timeout(5):
                await hub.subscribe("a", late)
        assert refused.value.code == ErrorCode.INTERNAL
        assert pending_of(hub, "a") == 0 and hub.num_subscribers("a") == 1
        assert "a" in broker._interest
        await hub.publish("a", b"1")
        assert offsets(watcher.received) == [1] and late.received == []

    asyncio.run(scenario())


def test_a_skip_that_history_already_covered_lets_the_subscribe_go_live() -> None:
    """The channel's subscribers resync, but the one joining read history past
    the skip: it has no hole, so it is not refused."""

    async def scenario() -> None:
        broker = FaultyBroker()
        hub = Hub(broker)
        watcher = Recorder()
        await hub.subscribe("a", watcher)
        await hub.publish("a", b"1")
        broker.drop.update({("a", 2), ("a", 3)})
        await hub.publish("a", b"2")
        third = await hub.publish("a", b"3")
        broker.running.clear()  # the history read waits before reading
        late = Recorder()
        joining = asyncio.ensure_future(hub.subscribe("a", late))
        await until(lambda: pending_of(hub, "a") == 1, "the subscribe to wait on history")
        # Offset 3 arrives late on the live link: 1 -> 3 is a skip.
        hub._deliver(Publication("a", 3, third.epoch, b"3"))
        assert watcher.resyncs == 1
        broker.running.set()
        recovery = await joining
        assert recovery.position == third and recovery.publications == []
        await hub.publish("a", b"4")
        assert offsets(late.received) == [4] and late.resyncs == 0

    asyncio.run(scenario())


def test_a_subscriber_joining_while_the_broker_subscription_is_in_flight_waits_for_it() -> None:
    """A second subscribe of a channel whose broker subscription is still
    being made must not read history before live delivery is on: what is
    published in between reaches neither. (It did: its read at offset 1,
    the first subscriber's at 3 set the live position, and offset 4 went to
    the second with 2 and 3 never seen — the chaos run's long-poll gaps
    after a pub/sub link was killed.)"""

    async def scenario() -> None:
        broker = FaultyBroker()
        hub = Hub(broker)
        await hub.publish("a", b"1")
        broker.hold_subscribe.add("a")
        first, second = Recorder(), Recorder()
        joining_first = asyncio.ensure_future(hub.subscribe("a", first))
        await until(lambda: len(broker.held_subscribes) == 1, "the broker subscription")
        joining_second = asyncio.ensure_future(hub.subscribe("a", second))
        await until(
            lambda: joining_second.done() or pending_of(hub, "a") == 2, "the second subscribe"
        )
        await hub.publish("a", b"2")  # published, never delivered live
        await hub.publish("a", b"3")
        broker.held_subscribes[0].set()
        async with asyncio.timeout(5):
            joined = await asyncio.gather(joining_first, joining_second)
        await hub.publish("a", b"4")
        for recovery, recorder in zip(joined, (first, second), strict=True):
            assert recovery.position.offset == 3
            assert offsets(recorder.received) == [4]

    asyncio.run(scenario())
