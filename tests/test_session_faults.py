"""A connecting session under a slow broker: nothing before the connect reply (issue 12).

A token's ``channels`` claim subscribes the connection during connect, one
channel after another, each waiting on the broker. The first channel is live
while connect still waits for the next: these tests hold that wait open
(:class:`~faults_support.FaultyBroker`) and publish meanwhile, then check what
the client was written, in order. Sans-I/O, as ``test_centrifuge_session.py``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
import pytest

from centrifuge_support import FakeSession
from faults_support import FaultyBroker
from tidings.auth import Access
from tidings.centrifuge import SessionOptions
from tidings.centrifuge.session import MAX_HELD_PUSHES
from tidings.config import AuthConfig, Config, NamespaceConfig
from tidings.errors import DisconnectCode, ErrorCode
from tidings.hub import Hub

pytestmark = pytest.mark.unit

SECRET = "session-faults-secret-of-some-length"
OPTIONS = SessionOptions(
    access=Access(
        Config(auth=AuthConfig(hmac_secret=SECRET), channels=NamespaceConfig(join_leave=True))
    )
)


def token(channels: list[str]) -> str:
    claims = {"sub": "42", "exp": int(time.time()) + 600, "channels": channels}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def connect_command(channels: list[str], subs: dict[str, Any] | None = None) -> dict[str, Any]:
    request: dict[str, Any] = {"token": token(channels)}
    if subs:
        request["subs"] = subs
    return {"id": 1, "connect": request}


def messages(s: FakeSession) -> list[dict[str, Any]]:
    """Everything written to the client, in order, one message each."""
    return [message for frame in s.frames for message in frame]


def test_pushes_of_token_channels_follow_the_connect_reply() -> None:
    async def scenario() -> None:
        broker = FaultyBroker()
        hub = Hub(broker)
        for n in (1, 2):
            start = await hub.publish("a", b'{"n":%d}' % n)
        s = FakeSession(hub, OPTIONS)
        broker.hold_history.add("b")
        # A reconnecting SDK: it was at a's offset 1, it asks for recovery.
        subs = {"a": {"recover": True, "epoch": start.epoch, "offset": 1}}
        connecting = asyncio.ensure_future(s.send(connect_command(["a", "b"], subs)))
        await broker.held_reads(1)  # a is live; connect waits on b's history
        await hub.publish("a", b'{"n":3}')
        broker.held[0].set()
        assert await connecting is None
        written = messages(s)
        assert written[0]["id"] == 1
        recovered = written[0]["connect"]["subs"]["a"]
        assert recovered["recovered"] is True
        assert [p["offset"] for p in recovered["publications"]] == [2]
        assert "b" in written[0]["connect"]["subs"]
        pushes = [m["push"]["pub"]["offset"] for m in written[1:]]
        assert pushes == [3]
        # Live from here on, without holding.
        await hub.publish("a", b'{"n":4}')
        assert messages(s)[-1]["push"]["pub"]["offset"] == 4

    asyncio.run(scenario())


def test_a_join_during_connect_follows_the_connect_reply() -> None:
    async def scenario() -> None:
        broker = FaultyBroker()
        hub = Hub(broker)
        s = FakeSession(hub, OPTIONS)
        broker.hold_history.add("b")
        connecting = asyncio.ensure_future(s.send(connect_command(["a", "b"])))
        await broker.held_reads(1)
        other = FakeSession(hub, OPTIONS)
        assert await other.send(connect_command(["a"])) is None
        broker.held[0].set()
        assert await connecting is None
        written = messages(s)
        assert written[0]["id"] == 1
        assert [m["push"]["join"]["info"]["client"] for m in written[1:]] == [other.client_id]

    asyncio.run(scenario())


def test_too_many_pushes_while_connecting_close_with_insufficient_state() -> None:
    async def scenario() -> None:
        broker = FaultyBroker()
        hub = Hub(broker)
        s = FakeSession(hub, OPTIONS)
        broker.hold_history.add("b")
        connecting = asyncio.ensure_future(s.send(connect_command(["a", "b"])))
        await broker.held_reads(1)
        for n in range(MAX_HELD_PUSHES):
            await hub.publish("a", b"%d" % n)
        assert s.fake.closed is None
        await hub.publish("a", b'"one too many"')
        assert s.fake.closed == (DisconnectCode.INSUFFICIENT_STATE, "insufficient state")
        assert messages(s) == []  # nothing reached the client before its connect reply
        s.release()  # what the transport does once it closed
        broker.held[0].set()
        await connecting
        assert hub.num_channels == 0

    asyncio.run(scenario())


def test_a_connect_timing_out_on_the_broker_leaves_nothing_behind() -> None:
    async def scenario() -> None:
        broker = FaultyBroker()
        hub = Hub(broker, broker_timeout=0.05)
        s = FakeSession(hub, OPTIONS)
        broker.hold_history.add("b")  # a subscribes, b's history never answers
        async with asyncio.timeout(5):
            assert await s.send(connect_command(["a", "b"])) is None
        (reply,) = messages(s)
        assert reply["error"]["code"] == ErrorCode.INTERNAL
        assert reply["error"]["message"] == "broker unavailable: timed out after 0.05s"
        assert not s.connected and hub.num_channels == 0 and hub.num_users == 0
        # The client connects again once the broker answers.
        broker.hold_history.clear()
        assert await s.send(connect_command(["a", "b"])) is None
        assert s.connected and sorted(messages(s)[-1]["connect"]["subs"]) == ["a", "b"]
        assert hub.num_channels == 2

    asyncio.run(scenario())


def test_a_subscribe_refused_by_a_skip_answers_a_temporary_error_and_can_be_retried() -> None:
    async def scenario() -> None:
        broker = FaultyBroker()
        hub = Hub(broker)
        s = FakeSession(hub, OPTIONS)
        assert await s.send({"id": 1, "connect": {"token": token([])}}) is None
        await hub.publish("room", b"1")
        broker.hold_history.add("room")
        subscribing = asyncio.ensure_future(s.send({"id": 2, "subscribe": {"channel": "room"}}))
        await broker.held_reads(1)
        broker.drop.add(("room", 2))
        await hub.publish("room", b"2")
        await hub.publish("room", b"3")
        broker.held[0].set()
        assert await subscribing is None
        (refused,) = messages(s)[1:]
        assert refused["id"] == 2
        assert refused["error"]["code"] == ErrorCode.INTERNAL and refused["error"]["temporary"]
        assert s.channels == set() and hub.num_channels == 0
        broker.hold_history.clear()
        assert await s.send({"id": 3, "subscribe": {"channel": "room"}}) is None
        assert messages(s)[-1]["subscribe"]["offset"] == 3

    asyncio.run(scenario())
