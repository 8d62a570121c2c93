"""RedisBroker against a real redis-server: the memory broker's semantics, across nodes.

Each "node" is a RedisBroker instance with its own connections, as a separate
tidings process would have; the server-level tests are in test_scaleout.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from brokers_support import Node, run_nodes, until
from tidings.brokers import envelope
from tidings.brokers.redis import RedisBroker
from tidings.errors import ProtocolError
from tidings.hub import (
    DEFAULT_HISTORY,
    EMPTY,
    ClientInfo,
    HistoryPolicy,
    Hub,
    Position,
    Publication,
    reaches,
)

if TYPE_CHECKING:
    from brokers_support import RedisServer


WAIT = 10.0
#: The policy of direct broker publishes: what a hub sends for an unconfigured channel.
KEEP = DEFAULT_HISTORY


def redis_node(url: str, **kw: Any) -> Node:
    kw.setdefault("ping_interval", 0.5)
    kw.setdefault("max_backoff", 0.3)
    return Node(RedisBroker(url, prefix=kw.pop("prefix", "t"), **kw))


def run(
    redis: RedisServer, body: Callable[..., Awaitable[None]], nodes: int = 1, **kw: Any
) -> None:
    run_nodes(lambda: redis_node(redis.url, **kw), body, nodes)


def test_publish_stamps_offsets_and_history_reads_them(redis_server: RedisServer) -> None:
    async def body(a: Node) -> None:
        assert a.broker.healthy
        assert await a.broker.history("c") == ([], EMPTY)  # reading creates nothing
        info = ClientInfo(user="u1", client="c1")
        p1 = await a.broker.publish("c", b'{"n":1}', history=KEEP, info=info, tags={"k": "v"})
        p2 = await a.broker.publish("c", b'{"n":2}', history=KEEP)
        assert (p1.offset, p2.offset) == (1, 2) and p1.epoch == p2.epoch
        pubs, top = await a.broker.history("c")
        assert top == Position(p1.epoch, 2)
        assert [(p.offset, p.data) for p in pubs] == [(1, b'{"n":1}'), (2, b'{"n":2}')]
        assert pubs[0].info == info and pubs[0].tags == {"k": "v"} and pubs[0].time == p1.time
        assert pubs[0].channel == "c"
        # since / limit / reverse as the memory broker has them
        since_one, _ = await a.broker.history("c", since=Position(p1.epoch, 1))
        assert [p.offset for p in since_one] == [2]
        assert (await a.broker.history("c", limit=0)) == ([], top)
        rev, _ = await a.broker.history("c", reverse=True, limit=1)
        assert [p.offset for p in rev] == [2]
        assert (await a.broker.history("c", since=Position("other", 0))) == ([], top)
        from_empty, _ = await a.broker.history("c", since=EMPTY)
        assert reaches(EMPTY, from_empty, top)

    run(redis_server, body)


def test_history_is_bounded_and_gap_is_detected(redis_server: RedisServer) -> None:
    async def body(a: Node) -> None:
        for n in range(5):
            await a.broker.publish("c", str(n).encode(), history=HistoryPolicy(3, 300.0))
        pubs, top = await a.broker.history("c")
        assert [p.offset for p in pubs] == [3, 4, 5] and top.offset == 5
        since = Position(top.epoch, 1)
        got, top = await a.broker.history("c", since=since)
        assert not reaches(since, got, top)  # offsets 2 is gone: not recovered

    run(redis_server, body)


def test_subscribe_creates_epoch_and_fans_out_across_nodes(redis_server: RedisServer) -> None:
    async def body(a: Node, b: Node) -> None:
        await b.broker.subscribe("room")
        _, top = await b.broker.history("room", limit=0)
        assert top.epoch and top.offset == 0
        pub = await a.broker.publish("room", b'"hi"', history=KEEP)
        assert pub.epoch == top.epoch  # the epoch a subscriber learned is the one used
        (got,) = await b.wait_for(1)
        assert (got.channel, got.offset, got.data) == ("room", 1, b'"hi"')
        assert a.got == []  # a has no interest in "room"
        b.broker.unsubscribe("room")
        await asyncio.sleep(0.2)
        await a.broker.publish("room", b'"after"', history=KEEP)
        await asyncio.sleep(0.3)
        assert len(b.got) == 1

    run(redis_server, body, nodes=2)


def test_order_is_offset_order_under_concurrent_publishers(redis_server: RedisServer) -> None:
    async def body(a: Node, b: Node, c: Node) -> None:
        await c.broker.subscribe("x")
        await asyncio.gather(
            *(
                node.broker.publish("x", str(i).encode(), history=HistoryPolicy(200, 300.0))
                for i in range(50)
                for node in (a, b)
            )
        )
        got = await c.wait_for(100)
        assert [p.offset for p in got] == list(range(1, 101))

    run(redis_server, body, nodes=3)


def test_channel_names_with_odd_characters(redis_server: RedisServer) -> None:
    async def body(a: Node, b: Node) -> None:
        names = ["ns:room", "a{b}c", "with\nnewline?", "é/ü*>.", "}{"]
        for name in names:
            await b.broker.subscribe(name)
        for name in names:
            await a.broker.publish(name, b"1", history=KEEP)
        got = await b.wait_for(len(names))
        assert sorted(p.channel for p in got) == sorted(names)
        for name in names:
            pubs, top = await a.broker.history(name)
            assert [p.channel for p in pubs] == [name] and top.offset == 1

    run(redis_server, body, nodes=2)


def test_with_a_hub_recovery_works_from_another_node(redis_server: RedisServer) -> None:
    class Sub:
        def __init__(self) -> None:
            self.got: list[Publication] = []

        def deliver(self, pub: Publication) -> None:
            self.got.append(pub)

    async def body(a: Node, b: Node) -> None:
        hub_a, hub_b = Hub(a.broker), Hub(b.broker)
        sub = Sub()
        first = await hub_a.subscribe("ch", sub)
        for n in range(3):
            await hub_b.publish("ch", str(n).encode())
        await until(lambda: len(sub.got) == 3, "three live publications")
        hub_a.unsubscribe("ch", sub)
        position = sub.got[0].position
        await hub_b.publish("ch", b"3")
        # Resume on the other node from the position seen on the first one.
        again = Sub()
        rec = await hub_b.subscribe("ch", again, position)
        assert rec.recovered and [p.offset for p in rec.publications] == [2, 3, 4]
        assert first.position.epoch == rec.position.epoch

    run(redis_server, body, nodes=2)


def test_redis_restart_new_epoch_and_no_silent_gap(redis_server: RedisServer) -> None:
    async def body(a: Node, b: Node) -> None:
        await b.broker.subscribe("r")
        p1 = await a.broker.publish("r", b"1", history=KEEP)
        await b.wait_for(1)
        redis_server.restart()  # no persistence: every key is gone
        await until(lambda: not b.broker.healthy, "b to notice the restart")
        await until(lambda: a.broker.healthy and b.broker.healthy, "both to reconnect")
        p2 = await a.broker.publish("r", b"2", history=KEEP)
        assert p2.epoch != p1.epoch and p2.offset == 1
        got = await b.wait_for(2)
        assert got[1].position == p2.position
        # A client holding the old position is told it was not recovered.
        pubs, top = await b.broker.history("r", since=p1.position)
        assert pubs == [] and not reaches(p1.position, pubs, top)

    run(redis_server, body, nodes=2)


def test_reconnect_catches_up_from_history(redis_server: RedisServer) -> None:
    """Publications made while a node's pub/sub link was down reach it after reconnect."""

    async def body(a: Node, b: Node) -> None:
        await b.broker.subscribe("g")
        await a.broker.publish("g", b"1", history=KEEP)
        await b.wait_for(1)
        # Cut only b's pub/sub connection (Redis keeps running and keeps data).
        await a.broker._redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        for n in range(2, 6):
            await a.broker.publish("g", str(n).encode(), history=KEEP)
        got = await b.wait_for(5)
        await asyncio.sleep(0.3)
        assert [p.offset for p in got] == [1, 2, 3, 4, 5]  # in order, none twice

    run(redis_server, body, nodes=2)


def test_unreachable_redis_is_unhealthy_and_errors_are_protocol_errors(
    redis_server: RedisServer,
) -> None:
    async def body(a: Node) -> None:
        await a.broker.subscribe("d")
        redis_server.stop()
        await until(lambda: not a.broker.healthy, "unhealthy")
        with pytest.raises(ProtocolError) as err:
            await a.broker.publish("d", b"1", history=KEEP)
        assert err.value.temporary
        with pytest.raises(ProtocolError):
            await a.broker.subscribe("other")
        with pytest.raises(ProtocolError):
            await a.broker.history("d")
        redis_server.start()
        await until(lambda: a.broker.healthy, "healthy again")
        await a.broker.subscribe("other")
        await a.broker.publish("other", b"1", history=KEEP)
        await a.wait_for(1)

    run(redis_server, body, subscribe_timeout=1.0)


def test_start_with_redis_down_then_up(redis_server: RedisServer) -> None:
    redis_server.stop()

    async def main() -> None:
        node = redis_node(redis_server.url, subscribe_timeout=0.5)
        await node.broker.start()  # does not raise: /health tells
        try:
            assert not node.broker.healthy
            redis_server.start()
            await until(lambda: node.broker.healthy, "connected")
            await node.broker.subscribe("late")
            await node.broker.publish("late", b"1", history=KEEP)
            await node.wait_for(1)
        finally:
            await node.broker.close()

    asyncio.run(main())


def test_history_size_comes_with_each_publication(redis_server: RedisServer) -> None:
    """The broker keeps what each publish's policy says, per channel and from then on."""

    def history_for(channel: str) -> HistoryPolicy:
        return HistoryPolicy(0, 60.0) if channel.startswith("none:") else HistoryPolicy(2, 60.0)

    async def body(a: Node) -> None:
        for channel in ("none:x", "two:x"):
            for n in range(3):
                await a.broker.publish(channel, str(n).encode(), history=history_for(channel))
        pubs, top = await a.broker.history("none:x")
        assert pubs == [] and top.offset == 3
        pubs, top = await a.broker.history("two:x")
        assert [p.offset for p in pubs] == [2, 3] and top.offset == 3

        # A policy that grows keeps more from that publication on.
        for n in range(3):
            await a.broker.publish("two:x", str(n).encode(), history=HistoryPolicy(4, 60.0))
        pubs, top = await a.broker.history("two:x")
        assert [p.offset for p in pubs] == [3, 4, 5, 6] and top.offset == 6

    run(redis_server, body)


def test_malformed_messages_from_redis_are_logged_and_skipped(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone who can write to Redis can publish garbage on our pub/sub channel or
    into a history stream: a WARNING without traceback, the rest still delivered."""
    garbage = [
        b"no newlines at all",
        b"x\nepoch\n" + envelope.encode(b"1", None, None, 1),  # offset not a number
        b"1\nepoch\n\xc1\xc1",  # not msgpack
        b"1\nepoch\n" + msgspec.msgpack.encode([b'{"a":', None, None, 1]),  # data not JSON
    ]

    async def body(a: Node, b: Node) -> None:
        await b.broker.subscribe("m")
        for message in garbage:
            await a.broker._redis.execute_command("PUBLISH", "t:p:m", message)
        await a.broker._redis.execute_command(
            "XADD", "t:{m}:h", "1-0", "p", msgspec.msgpack.encode([b"{", None, None, 1])
        )
        await a.broker._redis.execute_command("HSET", "t:{m}:m", "o", 1)
        pub = await a.broker.publish("m", b'"fine"', history=KEEP)
        (got,) = await b.wait_for(1)
        assert (got.offset, got.data) == (2, b'"fine"') == (pub.offset, pub.data)
        pubs, top = await b.broker.history("m")
        assert [p.offset for p in pubs] == [2] and top.offset == 2  # the bad entry left out
        assert not reaches(EMPTY, pubs, top)  # so a recovery across it is refused, no gap
        assert b.broker.healthy

    with caplog.at_level("INFO", logger="tidings.brokers.redis"):
        run(redis_server, body, nodes=2)
    dropped = [r for r in caplog.records if "dropped a malformed" in r.getMessage()]
    skipped = [r for r in caplog.records if "skipped history entry" in r.getMessage()]
    assert len(dropped) == len(garbage) and len(skipped) == 1, caplog.text
    assert all(r.levelname == "WARNING" and r.exc_info is None for r in dropped + skipped)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_publisher_and_presence_info_with_connection_info_cross_nodes(
    redis_server: RedisServer,
) -> None:
    """ClientInfo holding raw JSON (a token's info) survives the trip through Redis."""
    info = ClientInfo(
        user="u",
        client="c",
        conn_info=msgspec.Raw(b'{"name":"\xc3\xa9","n":[1]}'),
        chan_info=msgspec.Raw(b'"room"'),
    )

    async def body(a: Node, b: Node) -> None:
        await b.broker.subscribe("i")
        await a.broker.publish("i", b"1", history=KEEP, info=info)
        (got,) = await b.wait_for(1)
        assert got.info == info
        (kept,), _ = await b.broker.history("i")
        assert kept.info == info
        await a.broker.add_presence("i", "c", info)
        assert await b.broker.presence("i") == {"c": info}

    run(redis_server, body, nodes=2)


def test_a_publication_right_after_subscribe_is_delivered(redis_server: RedisServer) -> None:
    """A publication made by another node right after subscribe() arrives, on 100
    channels (the NATS race, 8a4b620). A guard only: here the broker's own round trip
    after subscribing hides an early return; test_redis_pubsub.py's
    test_subscribe_does_not_return_before_redis_answers is the one that catches it."""
    channels = [f"race{n}" for n in range(100)]

    async def body(a: Node, b: Node) -> None:
        for channel in channels:
            await a.broker.subscribe(channel)
            await b.broker.publish(channel, b"1", history=KEEP)
        got = await a.wait_for(len(channels))
        assert sorted(p.channel for p in got) == sorted(channels)

    run(redis_server, body, nodes=2)
