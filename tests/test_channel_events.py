"""Channel events: ``occupied`` and ``vacated`` once per cluster, and publication events.

Two servers with Python hooks (``hooks_support.hooked_server``) share one Redis;
each records the events its hooks see (a :class:`Recorder` listener). Real
clients subscribe and leave: SSE streams over httpx, long-polls over httpx. A
node that dies is a real process killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from helpers import SSEClient, poll_ok, unique_channel
from hooks_support import HookedServer, Recorder, hooked_server
from tidings.brokers.memory import MemoryBroker
from tidings.errors import BrokerUnavailable
from tidings.hooks import ChannelEvent, Hooks, PublicationEvent
from tidings.hub import ClientInfo, Hub

TIMEOUT = 15.0


class Node:
    """A hooked server and the events its hooks were told of."""

    def __init__(self, server: HookedServer, recorder: Recorder) -> None:
        self.server = server
        self.recorder = recorder

    def occupancy(self, channel: str) -> bool | None:
        async def read() -> bool | None:
            return self.server.server.hub.occupancy(channel)

        result: bool | None = self.server.call(read())
        return result

    def channel_events(self, channel: str) -> list[str]:
        return [
            event.kind
            for event in self.recorder.items
            if isinstance(event, ChannelEvent) and event.channel == channel
        ]


@contextlib.contextmanager
def redis_nodes(
    redis_url: str, count: int = 2, vacated_delay: float = 0.3, listen: bool = True
) -> Iterator[list[Node]]:
    config = {"broker": {"type": "redis", "redis_url": redis_url, "presence_ttl": 1.0}}
    with contextlib.ExitStack() as stack:
        nodes = []
        for _ in range(count):
            hooks = Hooks(vacated_delay=vacated_delay)
            recorder = Recorder()
            if listen:
                hooks.add_listener(recorder.add)
            nodes.append(Node(stack.enter_context(hooked_server(hooks, config)), recorder))
        yield nodes


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def all_events(nodes: list[Node], channel: str) -> list[tuple[int, str]]:
    """(node index, kind) of every channel event of ``channel``, node by node."""
    return [(i, kind) for i, node in enumerate(nodes) for kind in node.channel_events(channel)]


def test_a_channel_is_occupied_once_and_vacated_once_across_two_nodes(redis_server: Any) -> None:
    channel = unique_channel("occ")
    with redis_nodes(redis_server.url) as nodes:
        a, b = nodes
        with SSEClient(a.server, [channel]) as on_a:
            on_a.subscribed()
            wait_until(lambda: a.occupancy(channel) is True, "node a to hold the channel")
            assert all_events(nodes, channel) == [(0, "occupied")]
            with SSEClient(b.server, [channel]) as on_b:
                on_b.subscribed()
                wait_until(lambda: b.occupancy(channel) is True, "node b to hold it too")
                assert all_events(nodes, channel) == [(0, "occupied")]  # b was not first
            # b's last subscriber left: after the delay b lets go; a still holds it.
            wait_until(lambda: b.occupancy(channel) is False, "node b to let go")
            assert all_events(nodes, channel) == [(0, "occupied")]
        a.recorder.wait_for(lambda _: "vacated" in a.channel_events(channel))
        wait_until(lambda: a.occupancy(channel) is False, "node a to let go")
        assert all_events(nodes, channel) == [(0, "occupied"), (0, "vacated")]


def test_a_long_poll_between_its_polls_does_not_flap_the_channel(redis_server: Any) -> None:
    """A long-poll client leaves its channel at every answer and joins again at
    the next poll; the vacated delay (1 s here) absorbs that: one ``occupied``
    while it polls, one ``vacated`` after it stopped."""
    channel = unique_channel("flap")
    with redis_nodes(redis_server.url, count=1, vacated_delay=1.0) as nodes:
        (node,) = nodes
        cursor = poll_ok(node.server, [channel], timeout=0)["cursor"]
        for polls in range(1, 5):  # each held about a second (the poll timer's tick)
            body = poll_ok(node.server, [channel], cursor=cursor, timeout=0.5)
            assert body["publications"] == []
            if polls == 1:
                node.recorder.wait_for(lambda _: bool(node.channel_events(channel)))
            assert node.channel_events(channel) == ["occupied"], f"after {polls} polls"
        node.recorder.wait_for(lambda _: "vacated" in node.channel_events(channel))
        assert node.channel_events(channel) == ["occupied", "vacated"]


NODE_SCRIPT = """
import asyncio, json, sys
import msgspec
from tidings.config import Config
from tidings.hooks import ChannelEvent, Hooks
from tidings.server import Server

async def main():
    config = msgspec.convert(json.loads(sys.argv[1]), Config, strict=False)
    hooks = Hooks(vacated_delay=0.3)
    def tell(event):
        if isinstance(event, ChannelEvent):
            print(json.dumps({"kind": event.kind, "channel": event.channel}), flush=True)
    hooks.add_listener(tell)
    server = Server(config, hooks=hooks)
    await server.start()
    print(json.dumps({"url": server.url}), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_a_killed_node_does_not_keep_its_channel_occupied(redis_server: Any, spawn: Any) -> None:
    """A node holding a channel dies (SIGKILL: it vacates nothing). Once its
    entry lapses (``broker.presence_ttl``, 1 s here) a surviving node says
    ``vacated`` for it, and the channel is occupied and vacated anew after."""
    channel = unique_channel("dead")
    config = {
        "host": "127.0.0.1",
        "port": 0,
        "broker": {"type": "redis", "redis_url": redis_server.url, "presence_ttl": 1.0},
    }
    with redis_nodes(redis_server.url, count=1) as nodes:
        (survivor,) = nodes
        doomed: subprocess.Popen[bytes] = spawn(
            [sys.executable, "-c", NODE_SCRIPT, json.dumps(config)], stdout=subprocess.PIPE
        )
        assert doomed.stdout is not None
        started = json.loads(doomed.stdout.readline())

        class Doomed:
            url = started["url"]

        with SSEClient(Doomed, [channel]) as sse:
            sse.subscribed()
            told = json.loads(doomed.stdout.readline())
            assert told == {"kind": "occupied", "channel": channel}
            doomed.send_signal(signal.SIGKILL)
            doomed.wait(TIMEOUT)
        survivor.recorder.wait_for(lambda _: survivor.channel_events(channel) == ["vacated"])
        with SSEClient(survivor.server, [channel]) as sse:
            sse.subscribed()
            survivor.recorder.wait_for(lambda _: "occupied" in survivor.channel_events(channel))
        survivor.recorder.wait_for(lambda _: len(survivor.channel_events(channel)) == 3)
        assert survivor.channel_events(channel) == ["vacated", "occupied", "vacated"]


def test_without_a_listener_the_broker_is_not_asked(redis_server: Any) -> None:
    """No listener, no cost: no occupancy entry in Redis, none in the hub."""
    channel = unique_channel("quiet")
    with redis_nodes(redis_server.url, count=1, listen=False) as nodes:
        (node,) = nodes
        with SSEClient(node.server, [channel]) as sse:
            sse.subscribed()
            assert node.occupancy(channel) is False
            client = redis.Redis.from_url(redis_server.url)
            try:
                assert client.keys("*:o") == [] and client.exists("tidings:occupied") == 0
            finally:
                client.close()


def test_channel_events_on_one_node_with_the_memory_broker() -> None:
    channel = unique_channel("mem")
    hooks = Hooks(vacated_delay=0.2)
    recorder = Recorder()
    hooks.add_listener(recorder.add)
    with hooked_server(hooks) as srv:
        node = Node(srv, recorder)
        with SSEClient(srv, [channel]) as first, SSEClient(srv, [channel]) as second:
            first.subscribed()
            second.subscribed()
            wait_until(lambda: node.occupancy(channel) is True, "the channel to be held")
        recorder.wait_for(lambda _: "vacated" in node.channel_events(channel))
        assert node.channel_events(channel) == ["occupied", "vacated"]


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_publications_of_chosen_namespaces_are_events_of_the_publishing_node_only(
    kind: str, request: pytest.FixtureRequest
) -> None:
    config: dict[str, Any] = {"namespaces": {"news": {}, "chat": {}}}
    if kind == "redis":
        redis_url = request.getfixturevalue("redis_server").url
        config["broker"] = {"type": "redis", "redis_url": redis_url}
    with contextlib.ExitStack() as stack:
        nodes = []
        for _ in range(2 if kind == "redis" else 1):
            hooks = Hooks()
            hooks.publication_namespaces = frozenset({"news"})
            recorder = Recorder()
            hooks.add_listener(recorder.add)
            nodes.append(Node(stack.enter_context(hooked_server(hooks, config)), recorder))
        publisher = nodes[0].server
        news, chat = unique_channel("news:"), unique_channel("chat:")
        with contextlib.ExitStack() as subscribers:
            streams = []
            for node in nodes:  # every node delivers it; only the publisher tells
                sse = subscribers.enter_context(SSEClient(node.server, [news, chat]))
                sse.subscribed()
                streams.append(sse)
            info = ClientInfo(user="ann", client="c1")
            chat_at = publisher.call(publisher.server.hub.publish(chat, b'{"c":1}', info=info))
            news_at = publisher.call(publisher.server.hub.publish(news, b'{"n":1}', info=info))
            assert chat_at.offset == news_at.offset == 1

            def publications(node: Node) -> list[PublicationEvent]:
                return [e for e in node.recorder.items if isinstance(e, PublicationEvent)]

            nodes[0].recorder.wait_for(lambda _: bool(publications(nodes[0])))
            (event,) = publications(nodes[0])
            assert (event.channel, event.data, event.offset, event.epoch) == (
                news,
                b'{"n":1}',
                1,
                news_at.epoch,
            )
            assert (event.user, event.client) == ("ann", "c1")
            # A later publication marks the end: the chat one was no event.
            publisher.call(publisher.server.hub.publish(news, b'{"n":2}'))
            nodes[0].recorder.wait_for(lambda _: len(publications(nodes[0])) == 2)
            assert [e.channel for e in publications(nodes[0])] == [news, news]
            for sse in streams:
                assert len(sse.publications(3)) == 3  # delivered everywhere...
            for other in nodes[1:]:
                assert publications(other) == []  # ...told by the publishing node only


class FailingOccupancy(MemoryBroker):
    """A broker whose occupancy calls fail, as a Redis that errors would."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def occupy(self, channel: str) -> bool:
        self.calls.append("occupy")
        raise BrokerUnavailable("occupancy store down")

    async def vacate(self, channel: str) -> bool:
        self.calls.append("vacate")
        raise BrokerUnavailable("occupancy store down")


class Taker:
    client_id = ""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def deliver(self, pub: Any) -> None:
        self.received.append(pub.data)

    def insufficient_state(self) -> None:
        pass

    def deliver_presence(self, event: object) -> None:
        pass


def test_a_failing_broker_call_is_logged_once_and_never_reaches_the_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each transition is tried once: the failure is a warning (no traceback),
    no event is emitted, the subscriber is served, and nothing retries in a loop."""

    async def scenario() -> None:
        broker = FailingOccupancy()
        hooks = Hooks(vacated_delay=0)
        events: list[Any] = []
        hooks.add_listener(events.append)
        hub = Hub(broker, hooks=hooks)
        taker = Taker()
        await hub.subscribe("a", taker)
        await hub.publish("a", b"1")
        assert taker.received == [b"1"]
        async with asyncio.timeout(TIMEOUT):
            while hub.occupancy("a") is not True:
                await asyncio.sleep(0.01)
        hub.unsubscribe("a", taker)
        async with asyncio.timeout(TIMEOUT):
            while hub.occupancy("a") is not False:
                await asyncio.sleep(0.01)
        assert broker.calls == ["occupy", "vacate"] and events == []

    with caplog.at_level(logging.WARNING, logger="tidings.hub"):
        asyncio.run(scenario())
    warnings = [r for r in caplog.records if r.name == "tidings.hub"]
    assert [r.levelno for r in warnings] == [logging.WARNING, logging.WARNING]
    assert all(r.exc_info is None and "occupancy store down" in r.getMessage() for r in warnings)
