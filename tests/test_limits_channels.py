"""The memory broker's channel cap (``limits.max_channels``), attacked over real sockets.

In the development default anyone may subscribe to any channel, and here (as
with ``publish = "any"``) publish to any channel: every channel created costs the
server a stream (epoch, offset, a history ring) until it expires. These tests
play the client that creates channels without end, over the server API, a
WebSocket (the ``websockets`` client) and SSE, and check that the server
refuses the channel past the cap with error 106, keeps serving the channels
that exist, frees slots as channels expire, and does not grow while refusing.
A unit test of the broker alone pins down what holds a slot and what frees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from helpers import TIMEOUT, SSEClient, api, pub_json, rss_kib, unique_channel
from tidings.brokers.memory import MemoryBroker
from tidings.errors import ErrorCode, ProtocolError
from tidings.hub import EMPTY, HistoryPolicy, Hub, Publication

CAP = 50
LIMIT_EXCEEDED = 106

#: Anonymous clients may publish anywhere, and history outlives everything in the test.
CAPPED = f"""
[limits]
max_channels = {CAP}

[channels]
publish = "any"
"""

#: The same, with history and its meta expiring within seconds.
EXPIRING = (
    CAPPED
    + """
[history]
ttl = 0.5
meta_ttl = 2.0
"""
)

linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux only")


def api_publish(srv: Any, channel: str, data: Any = 1) -> dict[str, Any]:
    """The API's answer to a publish: ``{"result": ...}`` or ``{"error": ...}``."""
    resp = api(srv, "publish", {"channel": channel, "data": data})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def broadcast(srv: Any, channels: list[str], data: Any = 1) -> list[dict[str, Any]]:
    resp = api(srv, "broadcast", {"channels": channels, "data": data})
    assert resp.status_code == 200, resp.text
    responses: list[dict[str, Any]] = resp.json()["result"]["responses"]
    return responses


def assert_limit_exceeded(answer: dict[str, Any]) -> None:
    assert "result" not in answer, answer
    assert answer["error"]["code"] == LIMIT_EXCEEDED, answer
    assert "limits.max_channels" in answer["error"]["message"], answer


def history_of(srv: Any, channel: str) -> dict[str, Any]:
    result: dict[str, Any] = api(srv, "history", {"channel": channel, "limit": -1}).json()["result"]
    return result


@contextlib.contextmanager
def ws_client(srv: Any) -> Iterator[ClientConnection]:
    """An anonymous Centrifugo client, connected, over the ``websockets`` client."""
    with connect(srv.ws_url + "/connection/websocket", open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps({"id": 1, "connect": {}}))
        assert "connect" in json.loads(ws.recv(TIMEOUT)), "connect refused"
        yield ws


def ws_command(ws: ClientConnection, command: dict[str, Any]) -> dict[str, Any]:
    ws.send(json.dumps(command))
    while True:
        for line in str(ws.recv(TIMEOUT)).splitlines():
            reply: dict[str, Any] = json.loads(line)
            if reply.get("id") == command["id"]:
                return reply


def until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_channel_past_the_cap_is_refused_on_every_path(server_factory: Any) -> None:
    srv = server_factory(CAPPED)
    channels = [unique_channel("cap") for _ in range(CAP)]
    for channel in channels:
        assert api_publish(srv, channel, {"n": 1})["result"]["offset"] == 1
    # The 51st channel: refused over the API, and nothing of it is stored.
    extra = unique_channel("over")
    assert_limit_exceeded(api_publish(srv, extra, {"n": 1}))
    assert history_of(srv, extra) == {"publications": [], "offset": 0, "epoch": ""}
    # Over a WebSocket: a publish and a subscribe that would create a channel get 106.
    with ws_client(srv) as ws:
        assert_limit_exceeded(ws_command(ws, {"id": 2, "publish": {"channel": extra, "data": 1}}))
        assert_limit_exceeded(ws_command(ws, {"id": 3, "subscribe": {"channel": extra}}))
        # The channels that exist keep working, for publishers and subscribers alike.
        assert ws_command(ws, {"id": 4, "publish": {"channel": channels[0], "data": 2}}) == {
            "id": 4,
            "publish": {},
        }
        assert "subscribe" in ws_command(ws, {"id": 5, "subscribe": {"channel": channels[1]}})
        # Over SSE, a stream that would create a channel is 400 with code 106.
        with SSEClient(srv, [extra]) as refused:
            assert refused.response.status_code == 400
            assert_limit_exceeded(json.loads(refused.response.read()))
        # A subscriber of an existing channel is still served.
        with SSEClient(srv, [channels[2]]) as sse:
            sse.subscribed()
            assert api_publish(srv, channels[2], {"n": 2})["result"]["offset"] == 2
            (event,) = sse.publications(1)
            assert pub_json(event)["data"] == {"n": 2}
    assert history_of(srv, channels[0])["offset"] == 2
    assert history_of(srv, extra)["offset"] == 0
    logs = srv.logs()
    assert logs.count("limits.max_channels (50) reached") == 1, logs  # once, not per refusal
    assert "Traceback" not in logs and "ERROR" not in logs, logs


def test_expired_channels_free_their_slots_and_subscribed_ones_keep_theirs(
    server_factory: Any,
) -> None:
    srv = server_factory(EXPIRING)
    kept = unique_channel("kept")
    with SSEClient(srv, [kept]) as subscriber:
        subscriber.subscribed()  # one slot held by a subscription, never published to
        channels = [unique_channel("gone") for _ in range(CAP - 1)]
        fresh = unique_channel("fresh")
        first = broadcast(srv, channels)
        assert all("result" in answer for answer in first), first
        assert_limit_exceeded(api_publish(srv, unique_channel("over")))
        # Once history and meta have expired, the sweep forgets the published
        # channels, and a new channel is accepted again.
        until(lambda: "result" in api_publish(srv, fresh))
        # The forgotten channels come back as new streams (offset 1, a new epoch)...
        second = broadcast(srv, channels[: CAP - 2])
        for before, after in zip(first[: CAP - 2], second, strict=True):
            assert after["result"]["offset"] == 1, after
            assert after["result"]["epoch"] != before["result"]["epoch"], (before, after)
        # ...while the subscribed channel kept its slot: the table is full again.
        assert_limit_exceeded(api_publish(srv, unique_channel("over")))
        assert api_publish(srv, kept, {"still": "served"})["result"]["offset"] == 1
        (event,) = subscriber.publications(1)
        assert pub_json(event)["data"] == {"still": "served"}


def flood(ws: ClientConnection, names: list[str], batch: int = 500) -> list[int]:
    """Publish once to each channel, ``batch`` commands per frame; the error codes answered."""
    codes: list[int] = []
    for start in range(0, len(names), batch):
        chunk = names[start : start + batch]
        frame = "\n".join(
            json.dumps({"id": start + i + 2, "publish": {"channel": name, "data": {"i": i}}})
            for i, name in enumerate(chunk)
        )
        ws.send(frame)
        replies: list[dict[str, Any]] = []
        while len(replies) < len(chunk):
            replies += [json.loads(line) for line in str(ws.recv(TIMEOUT)).splitlines()]
        codes += [reply.get("error", {}).get("code", 0) for reply in replies]
    return codes


@linux_only
def test_rss_stays_flat_while_a_client_tries_20000_channels(server_factory: Any) -> None:
    srv = server_factory(CAPPED)
    channels = [unique_channel("cap") for _ in range(CAP)]
    assert all("result" in answer for answer in broadcast(srv, channels))
    with SSEClient(srv, [channels[0]]) as bystander, ws_client(srv) as attacker:
        bystander.subscribed()
        # A first round warms up what a connection allocates while it works.
        assert set(flood(attacker, [unique_channel("warm") for _ in range(2_000)])) == {
            LIMIT_EXCEEDED
        }
        before = rss_kib(srv)
        codes = flood(attacker, [unique_channel("flood") for _ in range(20_000)])
        grown = rss_kib(srv) - before
        assert codes == [LIMIT_EXCEEDED] * 20_000
        # Holding 20,000 channels costs tens of MiB (measured: +26 MiB, 1.3 KiB each).
        assert grown < 4 * 1024, f"server RSS grew by {grown} KiB"
        assert api_publish(srv, channels[0], {"after": "flood"})["result"]["offset"] == 2
        (event,) = bystander.publications(1)
        assert pub_json(event)["data"] == {"after": "flood"}
    assert "Traceback" not in srv.logs()


# --------------------------------------------------------------------------- the broker alone


class Recorder:
    """A subscriber that keeps nothing: the broker's bookkeeping is under test."""

    def deliver(self, pub: Publication) -> None:
        pass

    def insufficient_state(self) -> None:
        pass

    def deliver_presence(self, event: object) -> None:
        pass


async def refused(action: Awaitable[object]) -> None:
    with pytest.raises(ProtocolError) as info:
        await action
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED


def test_broker_counts_every_stream_and_the_sweep_frees_unsubscribed_ones() -> None:
    async def scenario() -> None:
        broker = MemoryBroker(max_channels=3, meta_ttl=60.0)
        hub = Hub(broker, history_for=lambda channel: HistoryPolicy(100, 10.0))
        subscriber = Recorder()
        await hub.publish("a", b"1")
        await hub.publish("b", b"1")
        await hub.subscribe("c", subscriber)  # a subscription holds a slot too
        await refused(hub.publish("d", b"1"))
        await refused(hub.subscribe("e", Recorder()))
        assert hub.num_channels == 1  # the refused subscription left nothing behind
        assert (await hub.publish("a", b"2")).offset == 2  # existing channels work
        assert (await hub.publish("c", b"1")).offset == 1
        # Past meta_ttl, the sweep forgets a and b; c stays while subscribed.
        later = time.monotonic() + 61.0
        broker.sweep(later)
        assert (await broker.history("a"))[1] == EMPTY
        assert (await broker.history("c"))[1].offset == 1
        await hub.publish("d", b"1")
        await hub.publish("e", b"1")  # refused to subscribe before: no interest kept
        await refused(hub.publish("f", b"1"))
        hub.unsubscribe("c", subscriber)
        broker.sweep(later + 61.0)
        for channel in "cde":
            assert (await broker.history(channel))[1] == EMPTY, channel
        await hub.publish("f", b"1")

    asyncio.run(scenario())
