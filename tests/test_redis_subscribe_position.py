"""A subscribe to a channel this node already follows over Redis costs no round trip
(issue 16 item 4), and never loses or reorders anything for it.

The node knows the channel's position: what it delivered from Redis' pub/sub
(``RedisBroker.position``). It uses it only while its view is current (the link
up, the channel not held for a catch-up); otherwise the subscriber reads Redis
as before. Against a real redis-server, two brokers as two nodes (a subscribing
one and a publishing one), with hubs on top.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest

from brokers_support import Recorder, until
from helpers import publish, unique_channel
from test_broker_redis import KEEP, run
from test_scaleout import redis_config, wait_health
from tidings.errors import ErrorCode, ProtocolError
from tidings.hub import Hub, Position, Recovery
from ws_support import connect_raw

if TYPE_CHECKING:
    from brokers_support import Node, RedisServer

#: Redis commands that read a channel's position or history (the subscribe's round trip).
READS = ("evalsha", "eval", "hmget", "xrange", "xrevrange", "multi", "exec")


async def reads(node: Node) -> int:
    """Calls of :data:`READS` Redis has served so far, from every node."""
    stats: dict[str, Any] = await node.broker._redis.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in READS)


def offsets(recovery: Recovery, sub: Recorder) -> list[int]:
    """Every offset a subscriber was given: in its subscribe reply, then live."""
    return [p.offset for p in recovery.publications] + [p.offset for p in sub.got]


def test_subscribers_of_a_followed_channel_join_without_a_redis_round_trip(
    redis_server: RedisServer,
) -> None:
    async def body(a: Node, b: Node) -> None:
        hub, publisher = Hub(a.broker), Hub(b.broker)
        first = Recorder()
        before_first = await reads(a)
        await hub.subscribe("f", first)
        assert await reads(a) > before_first  # the first subscriber reads Redis
        for n in range(2):
            await publisher.publish("f", str(n).encode())
        await until(lambda: len(first.got) == 2, "two publications on the subscribing node")
        epoch = first.got[0].epoch

        before = await reads(a)
        subs = [Recorder() for _ in range(50)]
        joined = [await hub.subscribe("f", sub) for sub in subs]
        # A client resuming at the node's position is recovered without a read too.
        resumer = Recorder()
        resumed = await hub.subscribe("f", resumer, Position(epoch, 2))
        assert await reads(a) == before
        assert all(r.position == Position(epoch, 2) and not r.recovered for r in joined)
        assert all(r.publications == [] for r in joined)
        assert resumed.recovered and resumed.publications == []

        await publisher.publish("f", b"2")
        everyone = [first, *subs, resumer]
        await until(lambda: all(s.got and s.got[-1].offset == 3 for s in everyone), "offset 3")
        assert [p.offset for p in first.got] == [1, 2, 3]
        assert all([p.offset for p in s.got] == [3] for s in [*subs, resumer])
        assert not any(s.resyncs for s in everyone)

    run(redis_server, body, nodes=2)


def test_a_subscriber_joining_while_the_link_is_cut_misses_nothing(
    redis_server: RedisServer,
) -> None:
    """While the node's view is behind Redis' (link down, then the hole being
    filled), a new subscriber reads Redis' position: the publications made
    meanwhile reach the node's subscribers in order, once, and the new one
    gets exactly those after the position it joined at."""

    async def body(a: Node, b: Node) -> None:
        hub, publisher = Hub(a.broker), Hub(b.broker)
        first = Recorder()
        await hub.subscribe("g", first)
        await publisher.publish("g", b"1")
        await until(lambda: len(first.got) == 1, "the first publication")
        # Cut the pub/sub links (Redis keeps running and keeps its data).
        await b.broker._redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await until(lambda: a.broker.position("g") is None, "the node to know its view is stale")
        for n in range(2, 5):
            await publisher.publish("g", str(n).encode())
        second = Recorder()
        joined = await hub.subscribe("g", second)
        await until(lambda: a.broker.position("g") is not None, "the node's view to be current")
        third = Recorder()
        joined_third = await hub.subscribe("g", third)
        assert joined_third.position == Position(first.got[0].epoch, 4)
        await publisher.publish("g", b"5")
        await until(lambda: first.got[-1].offset == 5, "offset 5 on the first subscriber")
        await until(lambda: bool(second.got) and second.got[-1].offset == 5, "offset 5, second")
        await until(lambda: bool(third.got), "offset 5 on the third subscriber")
        assert [p.offset for p in first.got] == [1, 2, 3, 4, 5]
        start = joined.position.offset
        assert offsets(joined, second) == list(range(start + 1, 6))
        assert offsets(joined_third, third) == [5]
        assert not (first.resyncs or second.resyncs or third.resyncs)

    run(redis_server, body, nodes=2)


def test_with_redis_stopped_a_subscriber_to_a_followed_channel_is_told_to_retry(
    redis_server: RedisServer,
) -> None:
    """What the client gets: the temporary error (code 100), which the SDKs retry,
    and nothing of the attempt stays behind. Redis comes back empty (a new
    epoch): the retry joins at the position the node knows, in the old epoch,
    and the new epoch's first publication tells it to resync with the others
    (whose resume then says what was lost), never hands it on as if it
    continued the old stream. A subscriber joining after that receives the new
    stream from where it joined."""

    async def body(a: Node, b: Node) -> None:
        hub, publisher = Hub(a.broker), Hub(b.broker)
        first = Recorder()
        await hub.subscribe("s", first)
        await publisher.publish("s", b"1")
        await until(lambda: len(first.got) == 1, "the first publication")
        old_epoch = first.got[0].epoch
        redis_server.stop()
        second = Recorder()
        try:
            await until(lambda: not a.broker.healthy, "the node to notice")
            assert a.broker.position("s") is None
            with pytest.raises(ProtocolError) as refused:
                await hub.subscribe("s", second)
            assert refused.value.code == ErrorCode.INTERNAL  # 100: temporary, retried
            assert hub.num_subscribers("s") == 1
        finally:
            redis_server.start()
        await until(lambda: a.broker.healthy and b.broker.healthy, "both nodes to reconnect")
        await until(lambda: a.broker.position("s") is not None, "the catch-up to finish")
        joined = await hub.subscribe("s", second)
        assert joined.position == Position(old_epoch, 1)
        stored = await publisher.publish("s", b"2")  # a Position
        assert stored.epoch != old_epoch  # Redis came back empty
        await until(lambda: bool(first.resyncs and second.resyncs), "both to be told to resync")
        assert [p.offset for p in first.got] == [1] and second.got == []
        third = Recorder()
        joined_third = await hub.subscribe("s", third)
        assert joined_third.position == stored
        again = await publisher.publish("s", b"3")
        await until(lambda: bool(third.got), "the new epoch's next publication")
        assert offsets(joined_third, third) == [again.offset] and third.got[0].epoch == stored.epoch

    run(redis_server, body, nodes=2)


def test_a_burst_of_first_subscribes_reads_the_positions_in_few_round_trips(
    redis_server: RedisServer,
) -> None:
    """Channels the node does not follow yet need Redis (their position, an epoch
    created where none is): subscribes asking in the same pass of the loop share
    one pipelined round trip, and each gets its own channel's position."""

    async def body(a: Node, b: Node) -> None:
        channels = [f"burst{n}" for n in range(300)]
        for n, channel in enumerate(channels[:30]):
            for _ in range(n % 3):
                await b.broker.publish(channel, b"1", history=KEEP)
        batches: list[list[str]] = []
        ensure_many = a.broker._ensure_many

        async def counted(names: list[str]) -> list[Any]:
            batches.append(names)
            result: list[Any] = await ensure_many(names)
            return result

        a.broker._ensure_many = counted
        await asyncio.gather(*(a.broker.subscribe(channel) for channel in channels))
        assert len(batches) <= 3 and sorted(name for batch in batches for name in batch) == sorted(
            channels
        )
        for n, channel in enumerate(channels):
            position = a.broker.position(channel)
            assert position is not None
            assert position.offset == (n % 3 if n < 30 else 0), channel
        # Each position is the one Redis holds (its epoch included).
        for channel in channels[:30:7]:
            _, top = await b.broker.history(channel, limit=0)
            assert a.broker.position(channel) == top

    run(redis_server, body, nodes=2)


def test_a_websocket_client_subscribing_while_redis_is_stopped_is_told_to_retry(
    redis_server: RedisServer, server_factory: Any
) -> None:
    """The same story as a client sees it, over a real server: while Redis is
    down, subscribing to a channel the node follows gets the temporary error
    100 and the client stays connected; once Redis is back the retry succeeds,
    at the position the node knows. Redis came back empty: the next publication
    starts a new epoch, and both subscribers are disconnected with 3010
    (insufficient state) rather than handed it as if it continued the old
    stream; a resume from the old position then says it was not recovered."""
    srv = server_factory(redis_config(redis_server))
    channel = unique_channel("down")
    first = connect_raw(srv.ws_url, (channel,))
    published = publish(srv, channel, {"n": 1})
    first.wait_for(lambda m: m.get("push", {}).get("pub", {}).get("data") == {"n": 1})
    second = connect_raw(srv.ws_url)
    redis_server.stop()
    try:
        wait_health(srv, 503)
        second.send({"id": 2, "subscribe": {"channel": channel}})
        refused = second.wait_for(lambda m: m.get("id") == 2)
        assert refused["error"]["code"] == 100, refused
    finally:
        redis_server.start()
    wait_health(srv, 200)
    second.send({"id": 3, "subscribe": {"channel": channel}})
    joined = second.wait_for(lambda m: m.get("id") == 3)["subscribe"]
    assert (joined.get("offset"), joined.get("epoch")) == (1, published["epoch"])
    again = publish(srv, channel, {"n": 2})
    assert again["epoch"] != published["epoch"]
    assert first.read_until_closed() == second.read_until_closed() == 3010
    resumed = connect_raw(srv.ws_url)
    resumed.send(
        {
            "id": 2,
            "subscribe": {
                "channel": channel,
                "recover": True,
                "offset": 1,
                "epoch": published["epoch"],
            },
        }
    )
    result = resumed.wait_for(lambda m: m.get("id") == 2)["subscribe"]
    assert result.get("recovered") is not True and result["epoch"] == again["epoch"]
    for client in (first, second, resumed):
        client.close()
