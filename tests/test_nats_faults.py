"""NATS loses a message, every client hears of it (issue 12, item 1, NATS).

Real ``tidings serve`` processes on a real ``nats-server``, and clients we did
not write: centrifuge-python over WebSocket, httpx for SSE and polls. NATS core
keeps nothing, so what it drops cannot be recovered; the promise is that no
client is handed the hole as if nothing happened:

* a WebSocket client is disconnected with 3010 (insufficient state) and its
  SDK's resubscribe answers ``recovered: false``;
* an SSE stream ends, and its resume says ``unrecovered``;
* a poll from a cursor before the loss says ``unrecovered``, and so does one
  of the polls of a long-poll client following across it.

Two losses: a slow consumer (``broker.nats_pending_limit`` tiny and a burst
from another node, which nats-py drops past the limit) and a NATS restart
while publications flow. Each is logged once at WARNING, without a traceback.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from centrifuge import (
    Client,
    ClientEventHandler,
    ConnectingContext,
    PublicationContext,
    SubscribedContext,
    SubscriptionEventHandler,
)

from brokers_support import until
from conftest import ServerProcess
from helpers import (
    SSEClient,
    api,
    poll,
    poll_ok,
    pub_json,
    publish,
    unique_channel,
    wait_subscribers,
)
from test_scaleout import wait_health
from tidings.brokers.nats import NatsBroker
from tidings.errors import DisconnectCode
from tidings.hub import DEFAULT_HISTORY
from ws_support import Proxy

if TYPE_CHECKING:
    from brokers_support import NatsServer

Factory = Callable[..., ServerProcess]
WAIT = 15.0
#: Far past the pending limit below: nats-py on the subscribing node drops most.
BURST = 400


def nats_config(server: NatsServer, prefix: str, pending_limit: int | None = None) -> str:
    limit = "" if pending_limit is None else f"nats_pending_limit = {pending_limit}\n"
    return f'[broker]\ntype = "nats"\nnats_url = "{server.url}"\nprefix = "{prefix}"\n{limit}'


class WebSocketFollower(ClientEventHandler, SubscriptionEventHandler):
    """A centrifuge-python client on one channel, noting everything in order.

    ``events`` holds ``("pub", data)``, ``("subscribed", ctx)`` and
    ``("connecting", code)``; the SDK resubscribes by itself, with recovery.
    """

    def __init__(self, srv: ServerProcess, channel: str) -> None:
        self.events: list[tuple[str, Any]] = []
        # proxy=None: never route loopback through an HTTP(S)_PROXY of the environment.
        self.client = Client(
            srv.ws_url + "/connection/websocket",
            events=self,
            proxy=None,
            min_reconnect_delay=0.1,
            max_reconnect_delay=0.5,
        )
        self.sub = self.client.new_subscription(channel, self)

    async def start(self) -> None:
        await self.client.connect()
        await self.sub.subscribe()
        await self.sub.ready(WAIT)

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.events.append(("pub", ctx.pub.data))

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        self.events.append(("subscribed", ctx))

    async def on_connecting(self, ctx: ConnectingContext) -> None:
        self.events.append(("connecting", ctx.code))

    def published(self) -> list[Any]:
        return [data for kind, data in self.events if kind == "pub"]

    def resubscribes(self) -> list[SubscribedContext]:
        return [ctx for kind, ctx in self.events if kind == "subscribed" and ctx.was_recovering]

    def told_insufficient_state(self) -> bool:
        return ("connecting", int(DisconnectCode.INSUFFICIENT_STATE)) in self.events


def sse_resume(srv: ServerProcess, channel: str, last_id: str) -> SSEClient:
    """Resume an SSE stream from ``last_id``, retrying while the broker is away."""
    deadline = time.monotonic() + WAIT
    while True:
        sse = SSEClient(srv, [channel], last_event_id=last_id, read_timeout=WAIT)
        if sse.response.status_code == 200:
            return sse
        sse.close()
        assert time.monotonic() < deadline, "the SSE resume never succeeded"
        time.sleep(0.1)


def poll_when_possible(srv: ServerProcess, channel: str, cursor: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while True:
        resp = poll(srv, [channel], cursor=cursor, timeout=0)
        if resp.status_code == 200:
            body: dict[str, Any] = resp.json()
            return body
        assert time.monotonic() < deadline, f"polls kept failing: {resp.text}"
        time.sleep(0.1)


def sse_segments(events: list[Any]) -> list[list[int]]:
    """The ``n`` of SSE publications, split at every ``unrecovered`` event."""
    segments: list[list[int]] = [[]]
    for ev in events:
        if ev.event == "unrecovered":
            segments.append([])
        elif ev.is_publication:
            segments[-1].append(pub_json(ev)["data"]["n"])
    return segments


def assert_told_of_every_gap(
    segments: list[list[int]], what: str, unacknowledged: set[int] | None = None
) -> None:
    """Within a segment (no loss signal), no acknowledged publication is
    missing; across segments they only move forward: a gap is always behind a
    signal. ``unacknowledged``: publishes answered with an error, which may or
    may not have landed (the publisher moved on rather than retry them)."""
    maybe = unacknowledged or set()
    seen = [n for segment in segments for n in segment]
    assert seen == sorted(set(seen)), f"{what}: duplicated or reordered: {seen}"
    for segment in segments:
        for before, after in itertools.pairwise(segment):
            missing = set(range(before + 1, after)) - maybe
            assert not missing, f"{what}: {sorted(missing)} silently missing in {segment}"


def websocket_segments(follower: WebSocketFollower) -> list[list[int]]:
    """Publications split at every resubscribe that was not recovered."""
    segments: list[list[int]] = [[]]
    for kind, value in follower.events:
        if kind == "subscribed" and value.was_recovering:
            assert value.recovered is False, "recovered across a loss NATS cannot replay"
            segments.append([])
        elif kind == "pub":
            segments[-1].append(value["n"])
    return segments


def warnings_in(srv: ServerProcess, text: str) -> list[str]:
    return [line for line in srv.logs().splitlines() if text in line]


def assert_logged_cleanly(srv: ServerProcess) -> None:
    logs = srv.logs()
    assert "Traceback" not in logs, logs
    assert not re.search(r" (ERROR|CRITICAL) ", logs), logs


def test_a_slow_consumer_is_told_to_every_subscriber(
    server_factory: Factory, nats_server: NatsServer
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    node = server_factory(nats_config(nats_server, prefix, pending_limit=2))
    channel = unique_channel("slow")

    async def main() -> None:
        ws = WebSocketFollower(node, channel)
        await ws.start()
        sse = await asyncio.to_thread(SSEClient, node, [channel], None, None, WAIT)
        try:
            await asyncio.to_thread(sse.subscribed)
            for n in range(2):
                await asyncio.to_thread(publish, node, channel, {"n": n})
            await until(lambda: len(ws.published()) == 2, "the WebSocket's first two")
            before = await asyncio.to_thread(sse.publications, 2)
            cursor = (await asyncio.to_thread(poll_ok, node, [channel]))["cursor"]
            final = {"n": 2 + BURST}
            polled: list[list[int]] = [[]]

            done_polling = threading.Event()

            def follow_by_long_polls() -> None:
                """A long-poll client: each answer's cursor is the next poll's.

                Each poll is short, so that the client stops soon after it is
                told to. With NATS alone, a channel that no one else follows
                on the node restarts between polls: each poll then says
                "unrecovered", plainly, and carries no publication.
                """
                at = cursor
                while not done_polling.is_set():
                    body = poll(node, [channel], cursor=at, timeout=1).json()
                    if body["unrecovered"]:
                        polled.append([])
                    polled[-1] += [pub["data"]["n"] for pub in body["publications"]]
                    at = body["cursor"]

            follower = threading.Thread(target=follow_by_long_polls)
            follower.start()
            await asyncio.to_thread(wait_subscribers, node, channel, 3)

            # Another node's burst: nats-py writes it out at once, and the
            # subscribing node's subscription holds 2 at most.
            other = NatsBroker(nats_server.url, prefix=prefix)
            await other.start()
            try:
                # Concurrent: nats-py buffers them in order and writes them together.
                await asyncio.gather(
                    *(
                        other.publish(channel, b'{"n":%d}' % n, history=DEFAULT_HISTORY)
                        for n in range(2, 2 + BURST)
                    )
                )
            finally:
                await other.close()

            # WebSocket: 3010, then the SDK's resubscribe is not recovered.
            await until(lambda: ws.resubscribes() != [], "the WebSocket resubscribe", WAIT)
            assert ws.told_insufficient_state(), ws.events
            # One more after the burst: it follows the last hole, which no
            # position handed out before it may span.
            await asyncio.to_thread(publish, node, channel, final)
            await until(lambda: ws.published()[-1:] == [final], "the publication after")
            assert_told_of_every_gap(websocket_segments(ws), "WebSocket")

            # SSE: the stream ends; its resume says "unrecovered".
            tail = await asyncio.to_thread(sse.expect_eof)
            assert_told_of_every_gap(sse_segments(before + tail), "SSE before the resume")
            last = [ev.id for ev in before + tail if ev.id][-1]
            resumed = await asyncio.to_thread(sse_resume, node, channel, last)
            try:
                assert (await asyncio.to_thread(resumed.subscribed)).json["recovered"] is False
                assert (await asyncio.to_thread(resumed.next_data)).event == "unrecovered"
            finally:
                resumed.close()

            # Polls: from before the burst, "unrecovered"; a long-poll client
            # following across it is told of every gap, and reaches the end.
            assert poll_ok(node, [channel], cursor=cursor)["unrecovered"] == [channel]
            done_polling.set()
            await asyncio.to_thread(follower.join, WAIT)
            assert_told_of_every_gap(polled, "long-poll")
            assert len(polled) > 1, "the long-poll client was never told"
        finally:
            sse.close()
            await ws.client.disconnect()

    asyncio.run(main())
    told = warnings_in(node, "slow consumer")
    assert told and all(" WARNING " in line for line in told), node.logs()
    assert len(told) < BURST // 4, "one WARNING per event, not per dropped message"
    assert_logged_cleanly(node)


def test_a_nats_restart_while_publications_flow_is_told_to_every_subscriber(
    server_factory: Factory, nats_server: NatsServer
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    config = nats_config(nats_server, prefix)
    node, publisher = server_factory(config), server_factory(config)
    channel = unique_channel("restart")
    acknowledged: list[int] = []
    unacknowledged: set[int] = set()
    stop = threading.Event()

    def publish_steadily() -> None:
        """Publish n = 0, 1, 2, ... through the other node. One that fails is
        not retried (a retry of one that landed anyway would be a duplicate):
        it is noted as unacknowledged, and the next number goes out."""
        n = 0
        while not stop.is_set():
            body = api(publisher, "publish", {"channel": channel, "data": {"n": n}}).json()
            if "result" in body:
                acknowledged.append(n)
            else:
                assert body["error"]["code"] == 100, body
                unacknowledged.add(n)
                time.sleep(0.05)
            n += 1
            time.sleep(0.01)

    async def main() -> None:
        ws = WebSocketFollower(node, channel)
        await ws.start()
        sse = await asyncio.to_thread(SSEClient, node, [channel], None, None, WAIT)
        seen: list[Any] = []
        steady = threading.Thread(target=publish_steadily)
        try:
            await asyncio.to_thread(sse.subscribed)
            await asyncio.to_thread(wait_subscribers, node, channel, 2)
            steady.start()
            await until(lambda: len(ws.published()) >= 10, "publications flowing")
            seen += await asyncio.to_thread(sse.publications, 10)
            cursor = (await asyncio.to_thread(poll_ok, node, [channel]))["cursor"]

            # From this thread, not a worker's: the server dies with the thread
            # that started it (PR_SET_PDEATHSIG), and workers end with the loop.
            nats_server.stop()
            await asyncio.to_thread(wait_health, node, 503)
            nats_server.start()
            await asyncio.to_thread(wait_health, node, 200)

            await until(lambda: ws.resubscribes() != [], "the WebSocket resubscribe", WAIT)
            assert ws.told_insufficient_state(), ws.events
            seen += await asyncio.to_thread(sse.expect_eof)
            last = [ev.id for ev in seen if ev.id][-1]
            resumed = await asyncio.to_thread(sse_resume, node, channel, last)
            try:
                assert (await asyncio.to_thread(resumed.subscribed)).json["recovered"] is False
                total = len(acknowledged)
                await until(lambda: len(acknowledged) >= total + 20, "publications after")
                stop.set()
                await asyncio.to_thread(steady.join, WAIT)
                final = acknowledged[-1]
                deadline = time.monotonic() + WAIT
                while not (seen[-1].is_publication and pub_json(seen[-1])["data"]["n"] >= final):
                    assert time.monotonic() < deadline, f"SSE never got {final}"
                    seen.append(await asyncio.to_thread(resumed.next_data))
            finally:
                resumed.close()
            await until(lambda: ws.published()[-1]["n"] >= final, "the WebSocket's last")

            assert_told_of_every_gap(websocket_segments(ws), "WebSocket", unacknowledged)
            assert len(websocket_segments(ws)) == 2  # one loss, one signal
            segments = sse_segments(seen)
            assert_told_of_every_gap(segments, "SSE", unacknowledged)
            assert len(segments) == 2
            assert poll_when_possible(node, channel, cursor)["unrecovered"] == [channel]
        finally:
            stop.set()
            sse.close()
            await ws.client.disconnect()

    asyncio.run(main())
    # The node lost the link once: one WARNING, however many channels and messages.
    assert len(warnings_in(node, "lost the nats connection")) == 1, node.logs()
    assert_logged_cleanly(node)
    assert_logged_cleanly(publisher)


def test_a_long_poll_held_while_the_link_is_cut_is_told_of_what_it_lost(
    server_factory: Factory, nats_server: NatsServer
) -> None:
    """Node A reaches NATS through a proxy, node B directly. A long-poll is held
    on A after publication 0; A's link is cut, B publishes 1 (acknowledged, lost
    to A), the link comes back, B publishes 2. The held poll's answer must not
    hand over 2 as if 1 had never existed."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    proxy = Proxy(nats_server.port)
    answers: list[dict[str, Any]] = []
    try:
        via_proxy = nats_config(nats_server, prefix).replace(
            nats_server.url, f"nats://127.0.0.1:{proxy.port}"
        )
        node, other = server_factory(via_proxy), server_factory(nats_config(nats_server, prefix))
        channel = unique_channel("cut")
        publish(other, channel, {"n": 0})
        cursor = poll_ok(node, [channel])["cursor"]

        def hold() -> None:
            answers.append(poll(node, [channel], cursor=cursor, timeout=WAIT).json())

        held = threading.Thread(target=hold)
        held.start()
        wait_subscribers(node, channel, 1)
        proxy.cut()
        wait_health(node, 503)
        assert "result" in api(other, "publish", {"channel": channel, "data": {"n": 1}}).json()
        proxy.restore()
        wait_health(node, 200)
        publish(other, channel, {"n": 2})
        held.join(WAIT)
    finally:
        proxy.close()
    (answer,) = answers
    got = [pub["data"]["n"] for pub in answer["publications"]]
    assert answer["unrecovered"] or 2 not in got, f"publication 1 silently missing: {answer}"
