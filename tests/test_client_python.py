"""The Python client (tidings.client) against real server processes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from conftest import ServerProcess
from helpers import publish, unique_channel, wait_subscribers
from tidings.client import (
    APIClient,
    APIError,
    HistoryResult,
    Publication,
    PublishResult,
    SubscriptionClosed,
    SyncAPIClient,
    decode_cursor,
    encode_cursor,
    subscribe,
)

WAIT = 15.0


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


# --------------------------------------------------------------------------- API client


def test_sync_client_methods(server: ServerProcess) -> None:
    ch = unique_channel("py-sync-")
    with SyncAPIClient(server.url) as api:
        first = api.publish(ch, {"n": 1}, tags={"k": "v"})
        assert isinstance(first, PublishResult) and first.offset >= 1 and first.epoch
        second = api.publish(ch, {"n": 2})
        assert (second.epoch, second.offset) == (first.epoch, first.offset + 1)
        history = api.history(ch, limit=-1)
        assert isinstance(history, HistoryResult)
        assert [p.data for p in history.publications] == [{"n": 1}, {"n": 2}]
        assert history.publications[0].tags == {"k": "v"}
        assert (history.epoch, history.offset) == (second.epoch, second.offset)
        since = api.history(ch, limit=-1, since=(first.epoch, first.offset))
        assert [p.data for p in since.publications] == [{"n": 2}]
        position = api.history(ch)
        assert position.publications == [] and position.offset == second.offset
        info = api.info()
        assert info.nodes and info.nodes[0].version
        assert isinstance(api.channels().channels, dict)
        api.disconnect("nobody-at-all")
        api.unsubscribe("nobody-at-all", ch)


def test_errors_carry_the_server_code(server: ServerProcess) -> None:
    with SyncAPIClient(server.url) as api:
        with pytest.raises(APIError) as exc:
            api.publish("bad channel with spaces", 1)
        assert exc.value.code == 107
        with pytest.raises(APIError) as exc:
            api.presence(unique_channel())  # presence is off by default
        assert exc.value.code == 108
        with pytest.raises(APIError) as exc:
            api.history(unique_channel(), limit=-1, since=("no-such-epoch", 3))
        assert exc.value.code == 112
        results = api.broadcast([unique_channel(), "x" * 300], "hi")
        assert isinstance(results[0], PublishResult)
        assert isinstance(results[1], APIError) and results[1].code == 107


def test_api_key(server_factory: Callable[..., ServerProcess]) -> None:
    srv = server_factory('api_key = "k-123"\n')
    with SyncAPIClient(srv.url) as api, pytest.raises(APIError) as exc:
        api.info()
    assert (exc.value.code, exc.value.status) == (101, 401)
    with SyncAPIClient(srv.url, api_key="k-123") as api:
        assert api.info().nodes


def test_async_client_and_presence(server_factory: Callable[..., ServerProcess]) -> None:
    srv = server_factory("[namespaces.room]\npresence = true\n")
    ch = "room:" + unique_channel("p")

    async def main() -> None:
        async with APIClient(srv.url) as api:
            res = await api.publish(ch, "x")
            assert res.offset == 1
            stats = await api.presence_stats(ch)
            assert (stats.num_clients, stats.num_users) == (0, 0)
            assert (await api.presence(ch)).presence == {}
            got = await api.broadcast([ch, ch], {"b": True})
            assert [r.offset for r in got if isinstance(r, PublishResult)] == [2, 3]
            hist = await api.history(ch, limit=2, reverse=True)
            assert [p.offset for p in hist.publications] == [3, 2]
            assert (await api.info()).nodes[0].num_channels >= 0
            with pytest.raises(APIError) as exc:
                await api.history("", limit=1)
            assert exc.value.code == 107

    run(main())


def test_cursor_roundtrip_matches_the_server(server: ServerProcess) -> None:
    import httpx

    ch = unique_channel("py-cur-")
    res = publish(server, ch, 1)
    body = httpx.get(f"{server.url}/poll", params={"channel": ch}).json()
    assert decode_cursor(body["cursor"]) == {ch: (res["epoch"], res["offset"])}
    mine = encode_cursor({ch: (res["epoch"], res["offset"] - 1)})
    again = httpx.get(f"{server.url}/poll", params={"channel": ch, "cursor": mine}).json()
    assert [p["data"] for p in again["publications"]] == [1]


# --------------------------------------------------------------------------- subscriber


async def take(stream: AsyncIterator[Publication], n: int) -> list[Publication]:
    out = []
    async with asyncio.timeout(WAIT):
        async for pub in stream:
            out.append(pub)
            if len(out) == n:
                break
    return out


@contextlib.asynccontextmanager
async def stream_of(*args: Any, **kw: Any) -> AsyncIterator[AsyncIterator[Publication]]:
    gen = subscribe(*args, **kw)
    try:
        yield gen
    finally:
        await gen.aclose()  # type: ignore[attr-defined]


async def publish_when_subscribed(srv: ServerProcess, ch: str, items: list[Any]) -> None:
    await asyncio.to_thread(wait_subscribers, srv, ch)
    for item in items:
        await asyncio.to_thread(publish, srv, ch, item)


@pytest.mark.parametrize("transport", ["ws", "sse"])
def test_subscribe_delivers(server: ServerProcess, transport: str) -> None:
    ch = unique_channel(f"py-{transport}-")
    other = unique_channel("py-other-")

    async def main() -> None:
        async with stream_of(server.url, [ch, other], transport=transport) as stream:
            pub_task = asyncio.ensure_future(publish_when_subscribed(server, ch, [1, 2, 3]))
            got = await take(stream, 3)
            await pub_task
            assert [p.data for p in got] == [1, 2, 3]
            assert all(p.channel == ch and p.epoch for p in got)
            assert [p.offset for p in got] == [got[0].offset + i for i in range(3)]

    run(main())


@pytest.mark.parametrize("transport", ["ws", "sse"])
def test_subscribe_resumes_after_server_disconnect(server: ServerProcess, transport: str) -> None:
    """The server drops the connection; what is published meanwhile arrives exactly once."""
    ch = unique_channel(f"py-resume-{transport}-")
    unrecovered: list[str] = []

    async def main() -> None:
        async with stream_of(
            server.url, [ch], transport=transport, on_unrecovered=unrecovered.extend
        ) as stream:
            pub_task = asyncio.ensure_future(publish_when_subscribed(server, ch, ["a"]))
            got = await take(stream, 1)
            await pub_task
            async with APIClient(server.url) as api:
                # Anonymous clients are the user "": drop them all, and they should come back.
                await api.disconnect("", code=3011, reason="test reconnect")
                for item in ("b", "c"):
                    await api.publish(ch, item)
            got += await take(stream, 2)
            assert [p.data for p in got] == ["a", "b", "c"]
            assert unrecovered == []

    run(main())


def test_subscribe_resumes_from_a_saved_cursor(server: ServerProcess) -> None:
    ch = unique_channel("py-cursor-")
    first = publish(server, ch, "x")
    publish(server, ch, "y")
    cursor = encode_cursor({ch: (first["epoch"], first["offset"])})

    async def main() -> None:
        async with stream_of(server.url, ch, transport="ws", cursor=cursor) as stream:
            got = await take(stream, 1)
            assert [p.data for p in got] == ["y"]

    run(main())


@pytest.mark.parametrize("transport", ["ws", "sse"])
def test_subscribe_survives_a_restart_and_reports_unrecovered(
    server_factory: Callable[..., ServerProcess], transport: str
) -> None:
    srv = server_factory()
    ch = unique_channel("py-restart-")
    unrecovered: list[str] = []

    async def main() -> None:
        async with stream_of(
            srv.url, [ch], transport=transport, on_unrecovered=unrecovered.extend, min_backoff=0.1
        ) as stream:
            pub_task = asyncio.ensure_future(publish_when_subscribed(srv, ch, ["before"]))
            got = await take(stream, 1)
            await pub_task
            await asyncio.to_thread(srv.stop)
            srv2 = await asyncio.to_thread(server_factory, None, None, (), port=srv.port)
            pub_task = asyncio.ensure_future(publish_when_subscribed(srv2, ch, ["after"]))
            got += await take(stream, 1)
            await pub_task
            assert [p.data for p in got] == ["before", "after"]
            assert unrecovered == [ch]  # the memory broker's history died with the process

    run(main())


@pytest.mark.parametrize("transport", ["ws", "sse"])
def test_subscribe_with_tokens(
    server_factory: Callable[..., ServerProcess], transport: str
) -> None:
    import time

    import jwt

    secret = "python-client-secret-of-32-bytes!"
    srv = server_factory(f'[auth]\nhmac_secret = "{secret}"\n')
    ch = unique_channel("py-auth-")
    calls = 0

    async def get_token() -> str:
        nonlocal calls
        calls += 1
        return jwt.encode({"sub": "u7", "exp": int(time.time()) + 60}, secret, algorithm="HS256")

    async def main() -> None:
        async with stream_of(srv.url, [ch], transport=transport, get_token=get_token) as stream:
            pub_task = asyncio.ensure_future(publish_when_subscribed(srv, ch, ["secret"]))
            assert [p.data for p in await take(stream, 1)] == ["secret"]
            await pub_task
        assert calls >= 1
        # Without a token the server refuses for good: no endless reconnecting.
        with pytest.raises(SubscriptionClosed):
            async with stream_of(srv.url, [ch], transport=transport) as stream:
                await take(stream, 1)

    run(main())
