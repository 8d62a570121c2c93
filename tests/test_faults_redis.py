"""The subscribe races of ``test_hub_faults.py`` and ``test_session_faults.py``
over a real Redis, with publications coming from another node (issue 12).

With a remote broker, a publication reaches this node over the pub/sub link
some time after the publishing node was answered; each test waits until the
hub has seen it before letting the held history read answer.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import TYPE_CHECKING, Any

import jwt
import pytest

from brokers_support import until
from centrifuge_support import FakeSession
from faults_support import HeldRedisBroker, Recorder, offsets
from test_session_faults import OPTIONS, SECRET
from tidings.brokers.redis import RedisBroker
from tidings.errors import ErrorCode, ProtocolError
from tidings.hub import Hub

if TYPE_CHECKING:
    from brokers_support import RedisServer


async def two_nodes(redis: RedisServer) -> tuple[HeldRedisBroker, RedisBroker]:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    held = HeldRedisBroker(redis.url, prefix=prefix, ping_interval=0.5, max_backoff=0.3)
    other = RedisBroker(redis.url, prefix=prefix, ping_interval=0.5, max_backoff=0.3)
    await held.start()
    await other.start()
    return held, other


def test_two_subscribes_in_flight_over_redis_each_get_every_publication_once(
    redis_server: RedisServer,
) -> None:
    async def scenario() -> None:
        held, other = await two_nodes(redis_server)
        try:
            hub, publisher = Hub(held), Hub(other)
            held.hold_history.add("a")
            first, second = Recorder(), Recorder()
            joining_first = asyncio.ensure_future(hub.subscribe("a", first))
            await held.held_reads(1)
            joining_second = asyncio.ensure_future(hub.subscribe("a", second))
            await held.held_reads(2)
            await publisher.publish("a", b"1")
            await until(lambda: hub.top("a").offset == 1, "offset 1 on the subscribing node")
            held.held[1].set()
            second_recovery = await joining_second
            await publisher.publish("a", b"2")
            await until(lambda: hub.top("a").offset == 2, "offset 2 on the subscribing node")
            held.held[0].set()
            first_recovery = await joining_first
            await publisher.publish("a", b"3")
            await until(lambda: len(first.received) + len(first_recovery.publications) >= 3, "3")
            await until(lambda: len(second.received) + len(second_recovery.publications) >= 3, "3")
            assert offsets(first_recovery.publications) + offsets(first.received) == [1, 2, 3]
            assert offsets(second_recovery.publications) + offsets(second.received) == [1, 2, 3]
            assert not hub._channels["a"].pending
        finally:
            await held.close()
            await other.close()

    asyncio.run(scenario())


def test_a_push_from_another_node_follows_the_connect_reply(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        held, other = await two_nodes(redis_server)
        try:
            hub, publisher = Hub(held), Hub(other)
            start = await publisher.publish("a", b'{"n":1}')
            await publisher.publish("a", b'{"n":2}')
            s = FakeSession(hub, OPTIONS)
            held.hold_history.add("b")
            claims = {"sub": "42", "exp": int(time.time()) + 600, "channels": ["a", "b"]}
            subs = {"a": {"recover": True, "epoch": start.epoch, "offset": 1}}
            connect: dict[str, Any] = {
                "id": 1,
                "connect": {"token": jwt.encode(claims, SECRET, algorithm="HS256"), "subs": subs},
            }
            connecting = asyncio.ensure_future(s.handle(json.dumps(connect).encode()))
            await held.held_reads(1)
            await publisher.publish("a", b'{"n":3}')
            await until(lambda: hub.top("a").offset == 3, "offset 3 on the connecting node")
            held.held[0].set()
            assert await connecting is None
            written = [message for frame in s.frames for message in frame]
            assert written[0]["id"] == 1
            recovered = written[0]["connect"]["subs"]["a"]
            assert [p["offset"] for p in recovered["publications"]] == [2]
            assert [m["push"]["pub"]["offset"] for m in written[1:]] == [3]
        finally:
            await held.close()
            await other.close()

    asyncio.run(scenario())


def test_a_message_lost_while_subscribing_over_redis_refuses_the_subscribe(
    redis_server: RedisServer,
) -> None:
    """Offset 2 never arrives on the pub/sub link while the subscribe waits on
    history; offset 3 does: the subscribe is refused (temporary), not live at 1."""

    async def scenario() -> None:
        held, other = await two_nodes(redis_server)
        try:
            hub, publisher = Hub(held), Hub(other)
            await publisher.publish("a", b"1")
            held.hold_history.add("a")
            late = Recorder()
            joining = asyncio.ensure_future(hub.subscribe("a", late))
            await held.held_reads(1)
            held.drop.add(("a", 2))
            await publisher.publish("a", b"2")
            await publisher.publish("a", b"3")
            await until(lambda: hub.top("a").offset == 3, "offset 3 on the subscribing node")
            held.held[0].set()
            with pytest.raises(ProtocolError) as refused:
                await joining
            assert refused.value.code == ErrorCode.INTERNAL
            assert hub.num_channels == 0
            held.hold_history.clear()
            retry = await hub.subscribe("a", late)
            assert retry.position.offset == 3
        finally:
            await held.close()
            await other.close()

    asyncio.run(scenario())
