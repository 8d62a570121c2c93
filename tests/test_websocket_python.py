"""The centrifuge-python SDK (from PyPI, unmodified) against a real tidings server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from centrifuge import (
    Client,
    ClientEventHandler,
    ConnectedContext,
    DisconnectedContext,
    PublicationContext,
    SubscribedContext,
    SubscriptionEventHandler,
)

from helpers import publish, unique_channel
from ws_support import Proxy

TIMEOUT = 10.0


class Events(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.publications: asyncio.Queue[PublicationContext] = asyncio.Queue()
        self.subscribed: asyncio.Queue[SubscribedContext] = asyncio.Queue()

    async def on_publication(self, ctx: PublicationContext) -> None:
        await self.publications.put(ctx)

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        await self.subscribed.put(ctx)


class ClientEvents(ClientEventHandler):
    def __init__(self) -> None:
        self.connected: asyncio.Queue[ConnectedContext] = asyncio.Queue()
        self.disconnected: asyncio.Queue[DisconnectedContext] = asyncio.Queue()

    async def on_connected(self, ctx: ConnectedContext) -> None:
        await self.connected.put(ctx)

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        await self.disconnected.put(ctx)


def client(url: str, events: ClientEventHandler | None = None) -> Client:
    # proxy=None: never route loopback through an HTTP(S)_PROXY of the environment.
    return Client(url, events=events, proxy=None, min_reconnect_delay=0.1, max_reconnect_delay=0.5)


async def api_publish(srv: Any, channel: str, data: Any) -> dict[str, Any]:
    return await asyncio.to_thread(publish, srv, channel, data)


async def next_pub(events: Events) -> PublicationContext:
    return await asyncio.wait_for(events.publications.get(), TIMEOUT)


@pytest.fixture
def proxy(server: Any) -> Iterator[Proxy]:
    p = Proxy(server.port)
    yield p
    p.close()


def test_connect_subscribe_receive_publish_history(server: Any) -> None:
    async def main() -> None:
        channel = unique_channel("py")
        c = client(server.ws_url + "/connection/websocket")
        ev = Events()
        sub = c.new_subscription(channel, ev)
        await c.connect()
        await c.ready(TIMEOUT)
        assert c.client_id
        await sub.subscribe()
        await sub.ready(TIMEOUT)
        first = await api_publish(server, channel, {"text": "from the api"})
        pub = (await next_pub(ev)).pub
        assert pub.data == {"text": "from the api"}
        assert pub.offset == first["offset"]

        await sub.publish({"text": "from the sdk"})
        pub = (await next_pub(ev)).pub
        assert pub.data == {"text": "from the sdk"}
        assert pub.offset == first["offset"] + 1
        assert pub.info is not None and pub.info.client == c.client_id

        hist = await sub.history(limit=-1)
        assert hist.epoch == first["epoch"]
        assert hist.offset == first["offset"] + 1
        assert [p.data for p in hist.publications] == [
            {"text": "from the api"},
            {"text": "from the sdk"},
        ]
        only_position = await sub.history()
        assert only_position.publications == [] and only_position.offset == hist.offset
        await c.disconnect()

    asyncio.run(main())


def test_presence_and_rpc_not_available(server: Any) -> None:
    from centrifuge import ReplyError

    async def main() -> None:
        channel = unique_channel("py")
        c = client(server.ws_url + "/connection/websocket")
        sub = c.new_subscription(channel, Events())
        await c.connect()
        await sub.subscribe()
        await sub.ready(TIMEOUT)
        for call in (sub.presence(), sub.presence_stats(), c.rpc("method", {})):
            with pytest.raises(ReplyError) as err:
                await call
            assert err.value.code == 108
        await c.disconnect()

    asyncio.run(main())


def test_recovers_missed_publications_after_network_loss(server: Any, proxy: Proxy) -> None:
    async def main() -> None:
        channel = unique_channel("pyrec")
        await api_publish(server, channel, {"n": 0})  # the stream exists, with an epoch
        cev = ClientEvents()
        c = client(proxy.ws_url, cev)
        ev = Events()
        sub = c.new_subscription(channel, ev)
        await c.connect()
        await sub.subscribe()
        await sub.ready(TIMEOUT)
        first = await asyncio.wait_for(ev.subscribed.get(), TIMEOUT)
        assert first.recoverable and not first.was_recovering
        await api_publish(server, channel, {"n": 1})
        assert (await next_pub(ev)).pub.data == {"n": 1}

        proxy.cut()  # the network goes away: no close frame, the SDK reconnects
        for n in (2, 3, 4):
            await api_publish(server, channel, {"n": n})
        proxy.restore()

        again = await asyncio.wait_for(ev.subscribed.get(), TIMEOUT)
        assert again.was_recovering and again.recovered
        got = [(await next_pub(ev)).pub for _ in range(3)]
        assert [p.data for p in got] == [{"n": 2}, {"n": 3}, {"n": 4}]
        assert [p.offset for p in got] == [3, 4, 5]
        await api_publish(server, channel, {"n": 5})
        assert (await next_pub(ev)).pub.data == {"n": 5}
        assert ev.publications.empty()
        await c.disconnect()

    asyncio.run(main())


def test_shared_compressed_frames_decode_in_sdk_clients(server: Any) -> None:
    async def main() -> None:
        channel = unique_channel("pyz")
        clients = [client(server.ws_url + "/connection/websocket") for _ in range(3)]
        handlers = []
        for c in clients:
            ev = Events()
            handlers.append(ev)
            sub = c.new_subscription(channel, ev)
            await c.connect()
            await sub.subscribe()
            await sub.ready(TIMEOUT)
        big = {"items": [{"id": i, "name": f"item number {i}"} for i in range(200)]}
        await api_publish(server, channel, big)
        for ev in handlers:
            assert (await next_pub(ev)).pub.data == big
        for c in clients:
            await c.disconnect()

    asyncio.run(main())


def test_recovers_when_subscribed_before_first_publication(server: Any, proxy: Proxy) -> None:
    async def main() -> None:
        channel = unique_channel("pyfresh")
        c = client(proxy.ws_url)
        ev = Events()
        sub = c.new_subscription(channel, ev)
        await c.connect()
        await sub.subscribe()
        await sub.ready(TIMEOUT)
        await asyncio.wait_for(ev.subscribed.get(), TIMEOUT)
        await api_publish(server, channel, {"n": 1})
        assert (await next_pub(ev)).pub.data == {"n": 1}
        proxy.cut()
        await api_publish(server, channel, {"n": 2})
        proxy.restore()
        again = await asyncio.wait_for(ev.subscribed.get(), TIMEOUT)
        try:
            assert again.recovered
            assert (await next_pub(ev)).pub.data == {"n": 2}
        finally:
            await c.disconnect()

    asyncio.run(main())
