"""The Redis broker across a broken pub/sub link (issue 12), against a real redis-server.

Each test cuts the node's link with ``CLIENT KILL TYPE pubsub`` (Redis and its
data stay up) and injects the bad timing with a wrapper around one step of the
node — a history read held, a publication made between two SUBSCRIBE batches —
so the interleaving that failed in chaos runs happens every time.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from brokers_support import Node, until
from tidings.brokers.redis import RedisBroker
from tidings.hub import DEFAULT_HISTORY, Position

if TYPE_CHECKING:
    from brokers_support import RedisServer

KEEP = DEFAULT_HISTORY


def make_node(url: str, prefix: str, **kw: Any) -> Node:
    return Node(RedisBroker(url, prefix=prefix, ping_interval=0.5, max_backoff=0.3, **kw))


def offsets(node: Node, channel: str) -> list[int]:
    return [pub.offset for pub in node.got if pub.channel == channel]


def run_two(
    redis_server: RedisServer, body: Callable[[Node, Node, str], Awaitable[None]], **kw: Any
) -> None:
    """Nodes ``a`` (the publisher) and ``b`` (the one whose link is cut, made with
    ``kw``) on a fresh prefix."""
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        a = make_node(redis_server.url, prefix)
        b = make_node(redis_server.url, prefix, **kw)
        await a.broker.start()
        await b.broker.start()
        try:
            await body(a, b, prefix)
        finally:
            await a.broker.close()
            await b.broker.close()

    asyncio.run(main())


async def numsub(client: aioredis.Redis, name: str) -> int:
    ((_, count),) = await client.pubsub_numsub(name)
    return int(count)


async def cut_and_wait_resubscribed(client: aioredis.Redis, name: str) -> None:
    """Kill every pub/sub link; return once Redis has ``name`` subscribed again."""
    await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
    assert await numsub(client, name) == 0  # CLIENT KILL has closed it by its reply
    deadline = time.monotonic() + 10
    while await numsub(client, name) == 0:
        assert time.monotonic() < deadline, f"{name} was not subscribed again"
        await asyncio.sleep(0.02)


async def subscribe_all(node: Node, channels: list[str]) -> None:
    for start in range(0, len(channels), 100):
        await asyncio.gather(*(node.broker.subscribe(c) for c in channels[start : start + 100]))


def test_a_first_subscribe_in_flight_across_a_reconnect_replays_nothing(
    redis_server: RedisServer,
) -> None:
    """A channel whose first subscribe has not finished when the link breaks has
    delivered nothing on this node: the catch-up must not hand the node its whole
    history (the chaos run's client at 617 that received 1…620)."""

    async def body(a: Node, b: Node, prefix: str) -> None:
        for n in range(20):
            await a.broker.publish("h", b"%d" % n, history=KEEP)
        await b.broker.subscribe("x")  # a channel that has delivered, so a catch-up runs
        await a.broker.publish("x", b"1", history=KEEP)
        await b.wait_for(1)

        # b's subscribe to "h" is confirmed by Redis but waits on its position read.
        reading = asyncio.Event()
        release = asyncio.Event()
        ensure_many = b.broker._ensure_many

        async def held_ensure_many(channels: list[str]) -> list[Any]:
            if "h" in channels and not reading.is_set():  # the subscribe's read only
                reading.set()
                await release.wait()
            result: list[Any] = await ensure_many(channels)
            return result

        b.broker._ensure_many = held_ensure_many
        subscribing = asyncio.create_task(b.broker.subscribe("h"))
        await reading.wait()
        await cut_and_wait_resubscribed(a.broker._redis, f"{prefix}:p:h")
        # The catch-up has run once this reaches b: "x" is caught up in the same round.
        await a.broker.publish("x", b"2", history=KEEP)
        await until(lambda: offsets(b, "x") == [1, 2], "x's publication after the reconnect")
        release.set()
        await subscribing
        await a.broker.publish("h", b"21", history=KEEP)
        await until(lambda: bool(offsets(b, "h")), "h's live publication")
        assert offsets(b, "h") == [21]

    run_two(redis_server, body)


def test_a_live_message_between_two_subscribe_batches_waits_for_the_hole(
    redis_server: RedisServer,
) -> None:
    """With 1,500 channels the resubscribe takes two SUBSCRIBE commands; a
    publication on a channel of the first batch, read while the node waits for
    the second, must not be delivered before the hole before it is filled."""
    channels = [f"c{n}" for n in range(1500)]

    async def body(a: Node, b: Node, prefix: str) -> None:
        await subscribe_all(b, channels)
        await a.broker.publish("c0", b"1", history=KEEP)
        await b.wait_for(1)
        client = a.broker._redis
        write = b.broker._pubsub._write
        batches = 0

        async def spying_write(*args: bytes) -> None:
            nonlocal batches
            if args[0] == b"SUBSCRIBE":
                batches += 1
                if batches == 1:
                    # Before the link is back: offset 2 is the hole.
                    await a.broker.publish("c0", b"2", history=KEEP)
                elif batches == 2:
                    # c0 is live again (first batch) while the second is not yet
                    # confirmed: offset 3 is read during the wait.
                    deadline = time.monotonic() + 10
                    while await numsub(client, f"{prefix}:p:c0") == 0:
                        assert time.monotonic() < deadline, "c0 was not subscribed again"
                        await asyncio.sleep(0.01)
                    await a.broker.publish("c0", b"3", history=KEEP)
            await write(*args)

        b.broker._pubsub._write = spying_write
        await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await until(lambda: batches >= 2, "the two SUBSCRIBE batches")
        await until(lambda: b.broker.healthy, "b to be resubscribed")
        await a.broker.publish("c0", b"4", history=KEEP)
        await until(lambda: 4 in offsets(b, "c0"), "offset 4")
        assert offsets(b, "c0") == [1, 2, 3, 4]
        assert all(offsets(b, channel) == [] for channel in channels[1:])

    run_two(redis_server, body)


def test_commands_in_flight_when_the_link_breaks_are_not_cut(redis_server: RedisServer) -> None:
    """Publications racing a pub/sub loss all succeed while Redis is up: the node
    once disconnected its idle command connections on that loss, under commands
    that had just taken one ("Error UNKNOWN while writing to socket")."""

    async def body(a: Node, b: Node, prefix: str) -> None:
        await b.broker.subscribe("w")
        errors: list[str] = []
        published = 0
        cutting = True

        async def publisher() -> None:
            nonlocal published
            while cutting:
                try:
                    await b.broker.publish("w", b"1", history=KEEP)
                    published += 1
                except Exception as exc:
                    errors.append(str(exc))

        publishers = [asyncio.create_task(publisher()) for _ in range(20)]
        try:
            for _ in range(10):
                await cut_and_wait_resubscribed(a.broker._redis, f"{prefix}:p:w")
        finally:
            cutting = False
            await asyncio.gather(*publishers)
        assert published > 0
        assert errors == []

    run_two(redis_server, body)


async def publish_all(node: Node, channels: list[str], data: bytes) -> None:
    for start in range(0, len(channels), 50):
        batch = channels[start : start + 50]
        await asyncio.gather(*(node.broker.publish(c, data, history=KEEP) for c in batch))


def test_thousands_of_channels_are_caught_up_in_order_with_publications_right_after(
    redis_server: RedisServer,
) -> None:
    """3,000 channels (three SUBSCRIBE batches): each missed offset 2 while the
    link was down, and offset 3 is published the moment Redis has confirmed the
    resubscribe, before the catch-up runs (the SUB race, for a resubscribe).
    Every channel gets 1, 2, 3, in order, once."""
    channels = [f"k{n}" for n in range(3000)]

    async def body(a: Node, b: Node, prefix: str) -> None:
        await subscribe_all(b, channels)
        await publish_all(a, channels, b"1")
        await b.wait_for(len(channels))
        write = b.broker._pubsub._write
        resubscribed = b.broker._pubsub._on_resubscribed
        missed = False

        async def spying_write(*args: bytes) -> None:
            nonlocal missed
            if args[0] == b"SUBSCRIBE" and not missed:
                missed = True
                await publish_all(a, channels, b"2")
            await write(*args)

        async def publish_then_catch_up(names: list[bytes]) -> None:
            await publish_all(a, channels, b"3")
            await resubscribed(names)

        b.broker._pubsub._write = spying_write
        b.broker._pubsub._on_resubscribed = publish_then_catch_up
        started = time.monotonic()
        await a.broker._redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await b.wait_for(3 * len(channels), wait=30)
        print(f"caught up {len(channels)} channels in {time.monotonic() - started:.2f}s")
        got: dict[str, list[int]] = {}
        for pub in b.got:
            got.setdefault(pub.channel, []).append(pub.offset)
        assert got == {channel: [1, 2, 3] for channel in channels}

    run_two(redis_server, body)


async def pubsub_output_buffer(client: aioredis.Redis, subscriptions: int) -> int:
    """Bytes Redis holds for the pub/sub link with ``subscriptions`` channels (b's)."""
    links = [
        link
        for link in await client.client_list(_type="pubsub")
        if int(link["sub"]) == subscriptions
    ]
    assert len(links) == 1, links
    return int(links[0]["omem"])


def test_the_link_is_read_while_the_hole_is_filled(redis_server: RedisServer) -> None:
    """While the catch-up waits on Redis, 18 MB published on a caught-up channel
    are read off the link, not left in Redis' output buffer for the link (whose
    ``client-output-buffer-limit pubsub`` would cut it again); they reach the node
    after the hole, in order."""
    payload = b'"' + b"x" * 20_000 + b'"'

    async def body(a: Node, b: Node, prefix: str) -> None:
        await subscribe_all(b, ["q", "r"])
        await a.broker.publish("q", b"1", history=KEEP)
        await b.wait_for(1)
        resubscribed = b.broker._pubsub._on_resubscribed
        catching_up = asyncio.Event()
        release = asyncio.Event()

        async def held_catch_up(names: list[bytes]) -> None:
            catching_up.set()
            await release.wait()
            await resubscribed(names)

        b.broker._pubsub._on_resubscribed = held_catch_up
        await a.broker._redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await catching_up.wait()
        peak = 0
        for _ in range(900):
            await a.broker.publish("q", payload, history=KEEP)
            peak = max(peak, await pubsub_output_buffer(a.broker._redis, 2))
        print(f"pub/sub output buffer peak while catching up: {peak} B")
        release.set()
        await b.wait_for(901, wait=30)
        assert offsets(b, "q") == list(range(1, 902))
        assert peak < 1_000_000

    run_two(redis_server, body)


def test_past_the_hold_limit_the_channel_goes_live_and_the_hub_is_told(
    redis_server: RedisServer,
) -> None:
    """Holding live publications while a hole waits for its catch-up is bounded:
    the sixth one past ``hold_limit=5`` lets the channel go live at once, and the
    hub hears that the stream restarted after the hole (its subscribers resync
    and recover offset 2 from history themselves) instead of waiting on it."""

    async def body(a: Node, b: Node, prefix: str) -> None:
        restarted: list[tuple[str, Position]] = []
        b.broker.bind_restarted(lambda channel, position: restarted.append((channel, position)))
        await b.broker.subscribe("q")
        await a.broker.publish("q", b"1", history=KEEP)
        await b.wait_for(1)
        write = b.broker._pubsub._write
        resubscribed = b.broker._pubsub._on_resubscribed
        catching_up = asyncio.Event()
        release = asyncio.Event()

        async def spying_write(*args: bytes) -> None:
            if args[0] == b"SUBSCRIBE" and not catching_up.is_set():
                await a.broker.publish("q", b"2", history=KEEP)  # the hole
            await write(*args)

        async def held_catch_up(names: list[bytes]) -> None:
            catching_up.set()
            await release.wait()
            await resubscribed(names)

        b.broker._pubsub._write = spying_write
        b.broker._pubsub._on_resubscribed = held_catch_up
        await a.broker._redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await catching_up.wait()
        for n in range(3, 9):
            await a.broker.publish("q", b"%d" % n, history=KEEP)
        await until(lambda: offsets(b, "q")[-1:] == [8], "the held publications, released")
        epoch = b.got[0].epoch
        assert restarted == [("q", Position(epoch, 2))]
        assert offsets(b, "q") == [1, 3, 4, 5, 6, 7, 8]
        release.set()
        await a.broker.publish("q", b"9", history=KEEP)
        await until(lambda: offsets(b, "q")[-1:] == [9], "a live publication after the catch-up")
        assert offsets(b, "q") == [1, 3, 4, 5, 6, 7, 8, 9]

    run_two(redis_server, body, hold_limit=5)


def test_past_hold_bytes_over_all_channels_the_receiving_channel_goes_live(
    redis_server: RedisServer,
) -> None:
    """What a node holds back while holes wait for their catch-up is bounded
    over all channels too: with ``hold_bytes`` = 100 kB, five channels each
    receiving five 20 kB publications during the wait (and five receiving
    small ones) never make the node hold more than 100 kB, summed from what it
    holds, not from its own count. Each channel whose publication pushes past
    the bound goes live at once and the hub is told it restarted after its
    hole (offset 2); the channels that stayed within it are caught up whole."""
    channels = [f"c{n}" for n in range(10)]
    big, small = channels[:5], channels[5:]
    payload = b'"' + b"x" * 20_000 + b'"'
    hold_bytes = 100_000

    async def body(a: Node, b: Node, prefix: str) -> None:
        restarted: list[tuple[str, Position]] = []
        b.broker.bind_restarted(lambda channel, position: restarted.append((channel, position)))
        await subscribe_all(b, channels)
        await publish_all(a, channels, b"1")
        await b.wait_for(len(channels))
        epochs = {pub.channel: pub.epoch for pub in b.got}
        write = b.broker._pubsub._write
        resubscribed = b.broker._pubsub._on_resubscribed
        catching_up = asyncio.Event()
        release = asyncio.Event()

        async def spying_write(*args: bytes) -> None:
            if args[0] == b"SUBSCRIBE" and not catching_up.is_set():
                await publish_all(a, channels, b"2")  # the holes
            await write(*args)

        async def held_catch_up(names: list[bytes]) -> None:
            catching_up.set()
            await release.wait()
            await resubscribed(names)

        def read_by_b(channel: str, offset: int) -> bool:
            held = b.broker._held.get(channel, [])
            return any(pub.offset == offset for pub in held) or offset in offsets(b, channel)

        b.broker._pubsub._write = spying_write
        b.broker._pubsub._on_resubscribed = held_catch_up
        await a.broker._redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await catching_up.wait()
        peak = 0
        for offset in range(3, 8):
            for channel in small + big:
                data = payload if channel in big else b'"s"'
                await a.broker.publish(channel, data, history=KEEP)
                await until(
                    functools.partial(read_by_b, channel, offset), f"{channel} {offset} read"
                )
                held = sum(len(pub.data) for pubs in b.broker._held.values() for pub in pubs)
                peak = max(peak, held)
        print(f"held at most {peak} B of {hold_bytes} B")
        assert peak <= hold_bytes
        gone_live = {channel for channel, _ in restarted}
        assert gone_live, "no channel went live: the bound was not reached"
        assert gone_live <= set(big)
        release.set()
        for channel in channels:
            await until(functools.partial(read_by_b, channel, 7), f"{channel} offset 7")
        await until(lambda: not b.broker._held, "the catch-up")
        assert sorted(restarted) == sorted((ch, Position(epochs[ch], 2)) for ch in gone_live)
        for channel in channels:
            if channel in gone_live:
                assert offsets(b, channel) == [1, 3, 4, 5, 6, 7], channel
            else:
                assert offsets(b, channel) == [1, 2, 3, 4, 5, 6, 7], channel

    run_two(redis_server, body, hold_bytes=hold_bytes)
