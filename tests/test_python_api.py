"""``tidings.Tidings``: the Python API in process, the server API behind it, ``serve --app``.

In-process tests serve a ``Tidings`` in the test's own event loop
(``async with rt.serve(port=0)``) and drive it with clients we did not write:
httpx (HTTP API, SSE), centrifuge-python (WebSocket), uvicorn and FastAPI as
the host application. Every operation is run twice, once in Python and once
over ``POST /api/<method>``, and the answers compared: one implementation.
``tidings serve --app`` runs as a subprocess, on Redis with two workers too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from centrifuge import (
    Client,
    ClientEventHandler,
    ConnectingContext,
    DisconnectedContext,
    ServerPublicationContext,
    ServerSubscribedContext,
)

import tidings
from conftest import clean_env, free_port
from helpers import SSEClient, unique_channel
from tidings import (
    ConnectCall,
    ConnectReply,
    ErrorCode,
    ProtocolError,
    RPCCall,
    StreamPosition,
    Tidings,
)

pytestmark = pytest.mark.server

TIMEOUT = 10.0
ROOT = Path(__file__).resolve().parent.parent

#: A namespace with presence, for presence, presence_stats and join/leave.
CONFIG: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 0,
    "namespaces": {"room": {"presence": True}},
    "auth": {"expiry_grace": 0},
    "timeouts": {"shutdown": 2},
}


def make_app(**changes: Any) -> Tidings:
    """A Tidings whose connect hook names the user from the client's connect ``data``."""
    rt = Tidings.from_config({**CONFIG, **changes})

    @rt.on_connect
    async def connect(call: ConnectCall) -> ConnectReply | None:
        data = call.data_json() or {}
        if "user" not in data:
            return None
        return ConnectReply(user=data["user"], expire_at=data.get("expire_at", 0))

    return rt


class Events(ClientEventHandler):
    """What centrifuge-python's client tells, as queues a test awaits."""

    def __init__(self) -> None:
        self.subscribed: asyncio.Queue[ServerSubscribedContext] = asyncio.Queue()
        self.publications: asyncio.Queue[ServerPublicationContext] = asyncio.Queue()
        self.disconnected: asyncio.Queue[DisconnectedContext] = asyncio.Queue()
        #: Why the client went back to connecting (a close code below 3500).
        self.interrupted: asyncio.Queue[ConnectingContext] = asyncio.Queue()

    async def on_connecting(self, ctx: ConnectingContext) -> None:
        if ctx.code >= 3000:  # not the first connect, nor a transport hiccup
            await self.interrupted.put(ctx)

    async def on_subscribed(self, ctx: ServerSubscribedContext) -> None:
        await self.subscribed.put(ctx)

    async def on_publication(self, ctx: ServerPublicationContext) -> None:
        await self.publications.put(ctx)

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        await self.disconnected.put(ctx)


async def connect_client(url: str, user: str, **data: Any) -> tuple[Client, Events]:
    """A centrifuge-python client connected as ``user`` (through the connect hook)."""
    events = Events()
    ws_url = url.replace("http://", "ws://") + "/connection/websocket"
    client = Client(
        ws_url,
        events=events,
        data={"user": user, **data},
        proxy=None,
        min_reconnect_delay=0.1,
        max_reconnect_delay=0.5,
    )
    await client.connect()
    await client.ready(TIMEOUT)
    return client, events


async def next_item(queue: asyncio.Queue[Any]) -> Any:
    return await asyncio.wait_for(queue.get(), TIMEOUT)


@contextlib.asynccontextmanager
async def serving(rt: Tidings) -> AsyncIterator[httpx.AsyncClient]:
    """``rt`` served on a free port, and an HTTP client of its API."""
    async with rt.serve(), httpx.AsyncClient(base_url=rt.url, timeout=TIMEOUT) as http:
        yield http


async def http_api(http: httpx.AsyncClient, method: str, params: dict[str, Any]) -> Any:
    response = await http.post(f"/api/{method}", json=params)
    assert response.status_code in (200, 400), response.text
    return response.json()


def builtins(result: Any) -> Any:
    """A Python API result as the JSON the HTTP API sends for it."""
    return msgspec.json.decode(msgspec.json.encode(result))


# -- every operation: Python and HTTP give the same answer ----------------------


def test_every_operation_answers_as_the_http_api() -> None:
    async def main() -> None:
        rt = make_app()
        async with serving(rt) as http:
            room = unique_channel("room:")
            client, _ = await connect_client(rt.url, "alice")
            await rt.subscribe("alice", room)

            # publish: consecutive offsets in one stream, whichever door
            first = await rt.publish(room, {"n": 1}, tags={"k": "v"})
            second = await http_api(http, "publish", {"channel": room, "data": {"n": 2}})
            assert second["result"] == {"offset": first.offset + 1, "epoch": first.epoch}

            history = await rt.history(room, limit=-1)
            answer = await http_api(http, "history", {"channel": room, "limit": -1})
            assert builtins(history) == answer["result"]
            assert [p["data"] for p in answer["result"]["publications"]] == [{"n": 1}, {"n": 2}]
            assert history.publications[0].tags == {"k": "v"}
            since = StreamPosition(offset=first.offset, epoch=first.epoch)
            after = await rt.history(room, limit=-1, since=since)
            since_http = {"offset": first.offset, "epoch": first.epoch}
            answer = await http_api(
                http, "history", {"channel": room, "limit": -1, "since": since_http}
            )
            assert builtins(after) == answer["result"] and len(after.publications) == 1

            presence = await rt.presence(room)
            answer = await http_api(http, "presence", {"channel": room})
            assert builtins(presence) == answer["result"]
            assert [entry.user for entry in presence.presence.values()] == ["alice"]

            stats = await rt.presence_stats(room)
            answer = await http_api(http, "presence_stats", {"channel": room})
            assert builtins(stats) == answer["result"] == {"num_clients": 1, "num_users": 1}

            channels = await rt.channels(pattern="room:*")
            answer = await http_api(http, "channels", {"pattern": "room:*"})
            assert builtins(channels) == answer["result"]
            assert channels.channels[room].num_clients == 1

            info = (await rt.info()).nodes[0]
            (node,) = (await http_api(http, "info", {}))["result"]["nodes"]
            assert {k: node[k] for k in ("uid", "name", "version")} == {
                "uid": info.uid,
                "name": info.name,
                "version": tidings.__version__,
            }

            broadcast = await rt.broadcast([room, "bad name!"], {"n": 3})
            answer = await http_api(
                http, "broadcast", {"channels": [room, "bad name!"], "data": {"n": 4}}
            )
            assert broadcast.responses[0].result is not None
            assert answer["result"]["responses"][0]["result"]["offset"] == (
                broadcast.responses[0].result.offset + 1
            )
            assert builtins(broadcast)["responses"][1] == answer["result"]["responses"][1]
            assert broadcast.responses[1].error is not None
            assert broadcast.responses[1].error.code == ErrorCode.BAD_REQUEST
            await client.disconnect()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("method", "python_call", "params"),
    [
        ("publish", lambda rt: rt.publish("bad name!", 1), {"channel": "bad name!", "data": 1}),
        ("publish", lambda rt: rt.publish("nope:x", 1), {"channel": "nope:x", "data": 1}),
        ("presence", lambda rt: rt.presence("plain"), {"channel": "plain"}),
        ("history", lambda rt: rt.history("x", limit=-2), {"channel": "x", "limit": -2}),
        (
            "history",
            lambda rt: rt.history("x", limit=2**31),
            {"channel": "x", "limit": 2**31},
        ),
        (
            "publish",
            lambda rt: rt.publish("x", 1, idempotency_key="k" * 257),
            {"channel": "x", "data": 1, "idempotency_key": "k" * 257},
        ),
        (
            "disconnect",
            lambda rt: rt.disconnect("u", code=1000),
            {"user": "u", "disconnect": {"code": 1000, "reason": "r"}},
        ),
        ("subscribe", lambda rt: rt.subscribe("u", "nope:x"), {"user": "u", "channel": "nope:x"}),
        (
            "refresh",
            lambda rt: rt.refresh("u", expire_at=-1),
            {"user": "u", "expire_at": -1},
        ),
    ],
    ids=[
        "bad-name",
        "unknown-namespace",
        "presence-off",
        "negative-limit",
        "limit-past-int32",
        "idempotency-key-too-long",
        "disconnect-code",
        "subscribe-unknown-namespace",
        "refresh-negative-expiry",
    ],
)
def test_errors_are_the_http_api_errors(
    method: str, python_call: Callable[[Tidings], Any], params: dict[str, Any]
) -> None:
    """The same refusal, code and message, raised in Python as answered over HTTP."""

    async def main() -> None:
        rt = make_app()
        async with serving(rt) as http:
            with pytest.raises(ProtocolError) as raised:
                await python_call(rt)
            answer = await http_api(http, method, params)
            assert answer["error"] == {
                "code": int(raised.value.code),
                "message": raised.value.message,
            }

    asyncio.run(main())


def test_raw_json_data_is_checked_and_cannot_add_fields() -> None:
    """``bytes`` are raw JSON: published as they are when they are one JSON value;
    otherwise 107 with nothing published, even bytes that would make the call's
    body carry a field of their own choosing."""

    async def main() -> None:
        rt = make_app()
        async with serving(rt):
            channel, other = unique_channel(), unique_channel()
            result = await rt.publish(channel, b' {"raw": [1, 2.5, "\xc3\xa9"]} ')
            (pub,) = (await rt.history(channel, limit=-1)).publications
            assert bytes(pub.data) == '{"raw": [1, 2.5, "é"]}'.encode()
            assert pub.offset == result.offset
            hostile = [
                b'1,"channel":"' + other.encode() + b'"',
                b'{"a":',
                b'"\xff"',
                b'"\\ud800"',
                b"",
            ]
            for data in hostile:
                with pytest.raises(ProtocolError) as raised:
                    await rt.publish(channel, data)
                assert raised.value.code == ErrorCode.BAD_REQUEST, data
            assert (await rt.history(other, limit=-1)).offset == 0
            assert len((await rt.history(channel, limit=-1)).publications) == 1
            with pytest.raises(TypeError):
                await rt.publish(channel, object())

    asyncio.run(main())


# -- server-side subscribe, refresh, disconnect, unsubscribe ---------------------


def test_subscribe_makes_a_connected_client_receive_the_channel() -> None:
    async def main() -> None:
        rt = make_app()
        async with serving(rt) as http:
            one, two = unique_channel(), unique_channel()
            client, events = await connect_client(rt.url, "bob")
            await rt.subscribe("bob", one)
            assert (await next_item(events.subscribed)).channel == one
            published = await rt.publish(one, {"to": "bob"})
            pub = await next_item(events.publications)
            assert (pub.channel, pub.pub.data, pub.pub.offset) == (
                one,
                {"to": "bob"},
                published.offset,
            )
            # The HTTP API's subscribe is the same method.
            assert await http_api(http, "subscribe", {"user": "bob", "channel": two}) == {
                "result": {}
            }
            assert (await next_item(events.subscribed)).channel == two
            await rt.publish(two, "second")
            pub = await next_item(events.publications)
            assert (pub.channel, pub.pub.data) == (two, "second")
            # Another user's connections are not touched.
            await rt.subscribe("carol", unique_channel())
            await rt.unsubscribe("bob", one)
            await rt.publish(one, "after unsubscribe")
            await rt.publish(two, "marker")
            pub = await next_item(events.publications)
            assert (pub.channel, pub.pub.data) == (two, "marker")
            assert events.subscribed.empty()
            await client.disconnect()

    asyncio.run(main())


def test_refresh_extends_one_connection_and_expired_ends_it() -> None:
    """Two connections expire at the same second; the one refreshed outlives the
    other's expiry (3005), then ``expired=True`` ends it with 3005 too. Expiry
    is enforced on the WebSocket's periodic turn: one a second here."""

    async def main() -> None:
        rt = make_app(websocket={"ping_interval": 1})
        async with serving(rt) as http:
            expire_at = int(time.time()) + 2
            kept, kept_events = await connect_client(rt.url, "kept", expire_at=expire_at)
            gone, gone_events = await connect_client(rt.url, "gone", expire_at=expire_at)
            await rt.refresh("kept", expire_at=int(time.time()) + 3600)
            ended = await next_item(gone_events.interrupted)
            assert (ended.code, ended.reason) == (3005, "connection expired")
            await gone.disconnect()
            # A push after that turn reaches "kept": its connection outlived its expiry.
            channel = unique_channel()
            await rt.subscribe("kept", channel)
            assert (await next_item(kept_events.subscribed)).channel == channel
            assert kept_events.interrupted.empty()
            await rt.refresh("kept", expired=True)
            ended = await next_item(kept_events.interrupted)
            assert (ended.code, ended.reason) == (3005, "connection expired")
            await kept.disconnect()
            # The HTTP API's refresh is the same method.
            third, third_events = await connect_client(rt.url, "third")
            answer = await http_api(http, "refresh", {"user": "third", "expired": True})
            assert answer == {"result": {}}
            ended = await next_item(third_events.interrupted)
            assert (ended.code, ended.reason) == (3005, "connection expired")
            await third.disconnect()

    asyncio.run(main())


def test_disconnect_closes_the_users_connections_and_event_hooks_hear_of_it() -> None:
    """``disconnect`` closes every connection of the user with the code (4501:
    the SDK stays disconnected), no one else's; the event hooks registered
    with the decorators run: ``on_disconnect`` with that code, ``on_channel_occupied``
    and ``on_channel_vacated`` for the channel the user held."""

    async def main() -> None:
        rt = make_app(hooks={"vacated_delay": 0})
        heard: asyncio.Queue[Any] = asyncio.Queue()

        @rt.on_disconnect
        async def gone(event: tidings.DisconnectEvent) -> None:
            await heard.put(("disconnect", event.user, event.code, event.reason))

        @rt.on_channel_occupied
        async def occupied(event: tidings.ChannelEvent) -> None:
            await heard.put((event.kind, event.channel))

        @rt.on_channel_vacated
        async def vacated(event: tidings.ChannelEvent) -> None:
            await heard.put((event.kind, event.channel))

        async with serving(rt):
            channel = unique_channel()
            first, first_events = await connect_client(rt.url, "dave")
            second, second_events = await connect_client(rt.url, "dave")
            other, other_events = await connect_client(rt.url, "erin")
            await rt.subscribe("dave", channel, client=first.client_id)
            assert await next_item(heard) == ("occupied", channel)
            await rt.disconnect("dave", code=4501, reason="banned")
            for events in (first_events, second_events):
                ended = await next_item(events.disconnected)
                assert (ended.code, ended.reason) == (4501, "banned")
            told = {await next_item(heard) for _ in range(3)}
            assert told == {("disconnect", "dave", 4501, "banned"), ("vacated", channel)}
            await rt.subscribe("erin", unique_channel())
            assert other_events.disconnected.empty()
            with pytest.raises(RuntimeError, match="register hooks before serve"):
                rt.on_join(occupied)  # type: ignore[arg-type]
            for client in (first, second, other):
                await client.disconnect()

    asyncio.run(main())


def test_a_port_in_use_raises_and_leaves_nothing_serving() -> None:
    async def main() -> None:
        rt = make_app()
        async with rt.serve():
            port = int(rt.url.rsplit(":", 1)[1])
            second = make_app()
            with pytest.raises(OSError):
                async with second.serve(port=port):
                    raise AssertionError("served on a port in use")
            assert not second.serving
            with pytest.raises(RuntimeError, match="already serving"):
                async with rt.serve():
                    raise AssertionError("served twice at once")
            assert (await rt.publish("news", 1)).offset == 1
        async with second.serve(port=port):
            assert second.url == f"http://127.0.0.1:{port}"

    asyncio.run(main())


class _Connection:
    """A connection as the server API sees it (``hub.Client``), for a unit test."""

    def __init__(self, client_id: str, refuses: bool) -> None:
        self.client_id = client_id
        self.refuses = refuses
        self.joined: list[str] = []

    def close(self, code: int, reason: str) -> None:
        raise AssertionError("not asked")

    def server_unsubscribe(self, channel: str, code: int = 2000, reason: str = "") -> bool:
        raise AssertionError("not asked")

    def server_refresh(self, expire_at: int, info: bytes | None, expired: bool) -> bool:
        raise AssertionError("not asked")

    async def server_subscribe(self, channel: str) -> bool:
        if self.refuses:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED)
        for _ in range(3):  # joining takes a few turns of the loop (the broker)
            await asyncio.sleep(0)
        self.joined.append(channel)
        return True


def test_subscribe_reaches_every_connection_it_can_then_reports_a_refusal() -> None:
    """One of the user's connections refuses: the other still joins before the
    call raises the refusal (nothing left running behind the error)."""
    from tidings.api import ServerAPI
    from tidings.auth import Access
    from tidings.brokers.memory import MemoryBroker
    from tidings.hub import Hub

    async def main() -> None:
        hub = Hub(MemoryBroker())
        api = ServerAPI(hub, Access(tidings.Config()), "", lambda: None)  # type: ignore[arg-type,return-value]
        refusing, joining = _Connection("a", refuses=True), _Connection("b", refuses=False)
        for connection in (refusing, joining):
            hub.add_client("u", connection)
        with pytest.raises(ProtocolError) as raised:
            await api.subscribe(api.decode("subscribe", b'{"user": "u", "channel": "news"}'))
        assert raised.value.code == ErrorCode.LIMIT_EXCEEDED
        assert joining.joined == ["news"]

    asyncio.run(main())


# -- publish options ---------------------------------------------------------------


def test_publish_options_skip_history_exclude_and_idempotency_key() -> None:
    """Each option in Python, over HTTP and in a batch: ``skip_history`` reaches
    subscribers but not history; ``exclude`` skips the named client only; a
    repeated ``idempotency_key`` answers the first result and publishes once."""

    async def main() -> None:
        rt = make_app()
        async with serving(rt) as http:
            channel = unique_channel()
            skipped, skipped_events = await connect_client(rt.url, "sam")
            watcher, watcher_events = await connect_client(rt.url, "will")
            for user in ("sam", "will"):
                await rt.subscribe(user, channel)

            async def received(events: Events) -> Any:
                return (await next_item(events.publications)).pub.data

            await rt.publish(channel, "live only", skip_history=True)
            assert await received(watcher_events) == "live only"
            assert await received(skipped_events) == "live only"
            await http_api(
                http, "publish", {"channel": channel, "data": "also live", "skip_history": True}
            )
            assert await received(watcher_events) == "also live"
            assert await received(skipped_events) == "also live"
            assert (await rt.history(channel, limit=-1)).publications == []

            await rt.publish(channel, "not for sam", exclude=[skipped.client_id])
            assert await received(watcher_events) == "not for sam"
            batch = {
                "commands": [
                    {"publish": {"channel": channel, "data": "x", "exclude": [skipped.client_id]}},
                    {"broadcast": {"channels": [channel], "data": "y", "idempotency_key": "b1"}},
                ]
            }
            response = await http.post("/api/batch", json=batch)
            replies = response.json()["replies"]
            assert [sorted(reply) for reply in replies] == [["publish"], ["broadcast"]], replies
            assert await received(watcher_events) == "x"
            assert await received(watcher_events) == "y"
            assert await received(skipped_events) == "y"  # x never reached sam

            first = await rt.publish(channel, "once", idempotency_key="k1")
            again = await rt.publish(channel, "once", idempotency_key="k1")
            over_http = await http_api(
                http, "publish", {"channel": channel, "data": "once", "idempotency_key": "k1"}
            )
            assert again == first
            assert over_http["result"] == builtins(first)
            datas = [bytes(p.data) for p in (await rt.history(channel, limit=-1)).publications]
            assert datas.count(b'"once"') == 1
            await rt.publish(channel, "marker")
            assert await received(watcher_events) == "once"
            assert await received(watcher_events) == "marker"
            for client in (skipped, watcher):
                await client.disconnect()

    asyncio.run(main())


# -- serving inside a host application ------------------------------------------------


def test_serve_installs_no_signal_handler_and_serves_a_unix_socket(tmp_path: Path) -> None:
    async def main() -> None:
        rt = make_app()
        path = str(tmp_path / "tidings.sock")
        before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        loop = asyncio.get_running_loop()
        async with rt.serve(uds=path):
            assert rt.url == f"unix:{path}"
            assert {sig: signal.getsignal(sig) for sig in before} == before
            assert not getattr(loop, "_signal_handlers", {})
            transport = httpx.AsyncHTTPTransport(uds=path)
            async with httpx.AsyncClient(transport=transport, timeout=TIMEOUT) as http:
                health = await http.get("http://tidings/health")
                assert health.json()["status"] == "ok"
                channel = unique_channel()
                async with http.stream("GET", f"http://tidings/sse?channel={channel}") as stream:
                    lines = stream.aiter_lines()
                    while "subscribed" not in await anext(lines):
                        pass
                    result = await rt.publish(channel, {"over": "uds"})
                    async for line in lines:
                        if line.startswith("data:") and '"offset"' in line:
                            break
                    publication = msgspec.json.decode(line[5:])
                    assert (publication["data"], publication["offset"]) == (
                        {"over": "uds"},
                        result.offset,
                    )
        assert not os.path.exists(path)
        assert not rt.serving
        with pytest.raises(RuntimeError, match="not serving"):
            await rt.publish("x", 1)

    asyncio.run(main())


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_serve_starts_and_stops_twice_in_a_host_lifespan_without_leaks() -> None:
    """A Starlette app whose lifespan serves tidings, run by uvicorn in this
    process twice: each run serves an SSE subscriber and a WebSocket client,
    and after each stop the loop has no task and the process no descriptor
    more than after the first (the first loads what stays: modules, the
    selector)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    rt = make_app()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with rt.serve():
            yield

    async def send(request: Request) -> JSONResponse:
        result = await rt.publish(request.path_params["channel"], await request.json())
        return JSONResponse({"offset": result.offset, "url": rt.url})

    host = Starlette(routes=[Route("/send/{channel}", send, methods=["POST"])], lifespan=lifespan)

    async def run_once() -> tuple[set[str], set[asyncio.Task[Any]]]:
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(host, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        )
        task = asyncio.create_task(server.serve())
        deadline = time.monotonic() + TIMEOUT
        while not server.started:
            assert time.monotonic() < deadline and not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.02)
        channel = unique_channel()
        client, events = await connect_client(rt.url, "lifespan")
        await rt.subscribe("lifespan", channel)
        await next_item(events.subscribed)
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            sent = await http.post(f"http://127.0.0.1:{port}/send/{channel}", json={"n": 1})
            assert sent.json()["url"] == rt.url
            pub = await next_item(events.publications)
            assert (pub.pub.data, pub.pub.offset) == ({"n": 1}, sent.json()["offset"])
        await client.disconnect()
        server.should_exit = True
        await task
        assert not rt.serving
        return _open_fds(), asyncio.all_tasks() - {asyncio.current_task()}

    async def main() -> None:
        fds_first, tasks_first = await run_once()
        fds_second, tasks_second = await run_once()
        assert tasks_first == set() and tasks_second == set(), (tasks_first, tasks_second)
        assert fds_second == fds_first

    asyncio.run(main())


# -- decorators -------------------------------------------------------------------------


def test_decorators_register_and_return_the_function() -> None:
    rt = Tidings()

    async def connect(call: ConnectCall) -> ConnectReply | None:
        return None

    async def echo(call: RPCCall) -> Any:
        return call.data_json()

    async def anything(call: RPCCall) -> Any:
        return call.method

    assert rt.on_connect(connect) is connect
    assert rt.on_rpc("echo")(echo) is echo
    assert rt.on_rpc(anything) is anything
    assert rt.hooks.connect is connect
    assert rt.hooks.rpc == {"echo": echo}
    assert rt.hooks.rpc_fallback is anything
    with pytest.raises(ValueError, match="a connect hook is already registered"):
        rt.on_connect(connect)
    with pytest.raises(ValueError, match="already handled by"):
        rt.on_rpc("echo")(anything)
    with pytest.raises(ValueError, match="rpc_fallback"):
        rt.on_rpc(anything)


def test_from_config_reads_a_toml_file_and_names_a_bad_key(tmp_path: Path) -> None:
    path = tmp_path / "tidings.toml"
    path.write_text("port = 9100\n[namespaces.chat]\npresence = true\n[hooks]\ntimeout = 1.5\n")
    rt = Tidings.from_config(path)
    assert rt.config.port == 9100 and rt.config.namespaces["chat"].presence
    assert rt.hooks.timeout == 1.5
    with pytest.raises(tidings.ConfigError, match="leeway"):
        Tidings.from_config({"auth": {"leeway": "soon"}})
    env = {"TIDINGS_PORT": "9200"}
    assert Tidings.from_config({"port": 9100}, env=env).config.port == 9200


# -- a FastAPI application served by uvicorn, publishing in process -------------------

FASTAPI_APP = """
import contextlib
import os

from fastapi import FastAPI

from tidings import Tidings

rt = Tidings.from_config({"host": "127.0.0.1", "port": int(os.environ["REALTIME_PORT"])})


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    async with rt.serve():
        yield


app = FastAPI(lifespan=lifespan)


@app.post("/messages/{channel}")
async def send(channel: str, message: dict) -> dict:
    result = await rt.publish(channel, message)
    return {"offset": result.offset, "epoch": result.epoch}
"""


UVICORN = [sys.executable, "-m", "uvicorn"]


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()}"
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(url, timeout=1)
            return
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer:\n{log.read_text()}")


def test_fastapi_endpoint_publishes_to_sse_and_websocket_subscribers(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """uvicorn runs a FastAPI app whose lifespan serves tidings on a port of its
    own; a POST to the app's endpoint reaches an SSE subscriber (httpx) and a
    WebSocket subscriber (centrifuge-python) of tidings."""
    (tmp_path / "chat.py").write_text(FASTAPI_APP)
    app_port, realtime_port = free_port(), free_port()
    log = tmp_path / "uvicorn.log"
    with open(log, "wb") as out:
        proc = spawn(
            [*UVICORN, "chat:app", "--host", "127.0.0.1", "--port", str(app_port)],
            cwd=tmp_path,
            env=clean_env({"REALTIME_PORT": str(realtime_port)}),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    realtime = f"http://127.0.0.1:{realtime_port}"
    _wait_http(f"{realtime}/health", proc, log)
    _wait_http(f"http://127.0.0.1:{app_port}/docs", proc, log)
    channel = unique_channel()

    async def main() -> None:
        events = Events()
        client = Client(
            realtime.replace("http", "ws") + "/connection/websocket", events=events, proxy=None
        )
        subscription = client.new_subscription(channel)
        publications: asyncio.Queue[Any] = asyncio.Queue()
        subscription.events.on_publication = publications.put
        await client.connect()
        await subscription.subscribe()
        await subscription.ready(TIMEOUT)
        with SSEClient(type("Realtime", (), {"url": realtime}), [channel]) as sse:
            sse.subscribed()
            async with httpx.AsyncClient(timeout=TIMEOUT) as http:
                sent = await http.post(
                    f"http://127.0.0.1:{app_port}/messages/{channel}", json={"text": "hi"}
                )
            assert sent.status_code == 200, sent.text
            (event,) = await asyncio.to_thread(sse.publications, 1)
            assert (event.json["data"], event.json["offset"]) == (
                {"text": "hi"},
                sent.json()["offset"],
            )
        pub = (await asyncio.wait_for(publications.get(), TIMEOUT)).pub
        assert (pub.data, pub.offset) == ({"text": "hi"}, sent.json()["offset"])
        await client.disconnect()

    asyncio.run(main())
    proc.send_signal(signal.SIGINT)
    assert proc.wait(TIMEOUT) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


# -- tidings serve --app ----------------------------------------------------------------

HOOKED_APP = """
import os

from tidings import ConnectCall, ConnectReply, RPCCall, Refuse, Tidings

rt = Tidings.from_config({"port": 1, "namespaces": {"room": {"presence": True}}})
not_tidings = 42


@rt.on_connect
async def connect(call: ConnectCall) -> ConnectReply:
    name = (call.data_json() or {}).get("name")
    if not name:
        raise Refuse(1001, "say your name")
    return ConnectReply(user=name)


@rt.on_rpc("whoami")
async def whoami(call: RPCCall) -> dict:
    return {"user": call.user, "pid": os.getpid()}
"""


async def _whoami(url: str, name: str) -> dict[str, Any]:
    client = Client(
        url.replace("http", "ws") + "/connection/websocket", data={"name": name}, proxy=None
    )
    await client.connect()
    try:
        await client.ready(TIMEOUT)
        result: dict[str, Any] = (await client.rpc("whoami", None, timeout=TIMEOUT)).data
        return result
    finally:
        await client.disconnect()


def test_serve_app_runs_the_objects_hooks_with_cli_flags_over_its_config(
    tmp_path: Path, server_factory: Callable[..., Any]
) -> None:
    """The module says port 1; ``--port`` wins. Its connect hook names the
    user from the connect data and refuses a client without a name; its RPC
    handler answers centrifuge-python's ``rpc()``."""
    (tmp_path / "realtime.py").write_text(HOOKED_APP)
    srv = server_factory(args=["--app", "realtime:rt"])
    assert asyncio.run(_whoami(srv.url, "zoe"))["user"] == "zoe"
    refused = httpx.get(f"{srv.url}/sse", params={"channel": "x"}, timeout=TIMEOUT)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"] == {"code": 1001, "message": "say your name"}
    assert srv.stop() == 0
    assert "Traceback" not in srv.logs()


def test_serve_app_with_two_workers_on_redis_runs_hooks_in_both(
    tmp_path: Path, server_factory: Callable[..., Any], redis_server: Any
) -> None:
    """Each worker (forked after the import) answers RPCs with its own pid:
    connections spread by SO_REUSEPORT reach both, and the hooks run in both."""
    (tmp_path / "realtime.py").write_text(HOOKED_APP)
    srv = server_factory(
        args=["--app", "realtime:rt", "--workers", "2"],
        env={"TIDINGS_BROKER__TYPE": "redis", "TIDINGS_BROKER__REDIS_URL": redis_server.url},
    )

    async def main() -> set[int]:
        pids: set[int] = set()
        for attempt in range(100):
            answer = await _whoami(srv.url, f"user{attempt}")
            assert answer["user"] == f"user{attempt}"
            pids.add(answer["pid"])
            if len(pids) == 2:
                break
        return pids

    pids = asyncio.run(main())
    assert len(pids) == 2 and srv.proc.pid not in pids, pids
    assert srv.stop() == 0
    assert "Traceback" not in srv.logs()


@pytest.mark.parametrize(
    ("app", "message"),
    [
        ("realtime", 'expected "module:attribute", such as "myapp.realtime:rt"'),
        ("realtime:", 'expected "module:attribute", such as "myapp.realtime:rt"'),
        ("no_such_module:rt", "no module named 'no_such_module' (looked in '.' first)"),
        ("realtime:nothing", "module 'realtime' has no attribute 'nothing'"),
        ("realtime:not_tidings", "not_tidings is a int, not a tidings.Tidings"),
    ],
)
def test_serve_app_refuses_what_is_not_a_tidings(tmp_path: Path, app: str, message: str) -> None:
    (tmp_path / "realtime.py").write_text(HOOKED_APP)
    out = subprocess.run(
        [sys.executable, "-m", "tidings", "serve", "--app", app, "--port", str(free_port())],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 2, out
    assert out.stderr.strip() == f"tidings: --app {app}: {message}", out.stderr


def test_serve_app_dir_and_an_error_inside_the_module(tmp_path: Path) -> None:
    """``--app-dir`` is searched first; an ImportError raised by the module itself
    is its own, shown with its traceback, not taken for a missing module."""
    apps = tmp_path / "apps"
    apps.mkdir()
    (apps / "broken.py").write_text("import not_installed_anywhere\n")

    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tidings", "serve", *args, "--port", str(free_port())],
            cwd=tmp_path,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )

    (apps / "misconfigured.py").write_text(
        "from tidings import Tidings\n\nrt = Tidings.from_config({'port': 'eighty'})\n"
    )
    out = serve("--app", "misconfigured:rt", "--app-dir", "apps")
    assert out.returncode == 2, out
    assert out.stderr.startswith("tidings: --app misconfigured:rt: config error: "), out.stderr
    assert "port" in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = serve("--app", "broken:rt")
    assert out.returncode == 2 and "no module named 'broken'" in out.stderr, out.stderr
    out = serve("--app", "broken:rt", "--app-dir", "apps")
    assert out.returncode == 1, out
    assert "Traceback" in out.stderr and "not_installed_anywhere" in out.stderr, out.stderr


def test_serve_uds_from_the_command_line(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """``tidings serve --uds`` on both event loops: /health and a publish over
    the socket, SIGTERM exits 0 and removes the socket file; a stale socket
    file left at the path is replaced, a regular file there is not touched."""
    for loop in ("uvloop", "asyncio"):
        path = tmp_path / f"{loop}.sock"
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(path))
        stale.close()  # a socket file nobody listens on, as a crash leaves it
        log = tmp_path / f"{loop}.log"
        with open(log, "wb") as out:
            proc = spawn(
                [sys.executable, "-m", "tidings", "serve", "--uds", str(path), "--loop", loop],
                cwd=tmp_path,
                env=clean_env({"TIDINGS_API_KEY": "k"}),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), timeout=1) as http:
            deadline = time.monotonic() + TIMEOUT
            while True:
                assert proc.poll() is None, log.read_text()
                with contextlib.suppress(httpx.TransportError):
                    if http.get("http://tidings/health").status_code == 200:
                        break
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            answer = http.post(
                "http://tidings/api/publish",
                json={"channel": "news", "data": 1},
                headers={"X-API-Key": "k"},
            )
            assert answer.json()["result"]["offset"] == 1, answer.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0, log.read_text()
        assert not path.exists()
        assert f"tidings listening on unix:{path}" in log.read_text()
    regular = tmp_path / "not-a-socket"
    regular.write_text("keep me")
    out = subprocess.run(
        [sys.executable, "-m", "tidings", "serve", "--uds", str(regular)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 1 and "cannot listen on" in out.stderr, out.stderr
    assert regular.read_text() == "keep me"


# -- the types are usable ---------------------------------------------------------------------


# Two mypy runs, the first without a cache, alongside the suite's other workers: more than
# pytest's default 120 s on a loaded machine.
@pytest.mark.timeout(300)
def test_a_typed_program_using_the_api_passes_mypy_strict(tmp_path: Path) -> None:
    """tests/data/typed_app.py uses every decorator and operation as a user would;
    ``mypy --strict``, run where no project configuration applies (as in a
    user's project, tidings found installed), accepts it, and refuses the same
    program with a hook of the wrong shape."""
    typed_app = (ROOT / "tests" / "data" / "typed_app.py").read_text()
    # A cache of this test's own (new each run, so nothing stale): the second check reads
    # tidings and its dependencies from the first instead of analysing them again (~half
    # of this test's time).
    mypy = [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "mypy-cache")]

    def check(source: str) -> subprocess.CompletedProcess[str]:
        (tmp_path / "user_app.py").write_text(source)
        return subprocess.run(
            [*mypy, "user_app.py"], capture_output=True, text=True, cwd=tmp_path, timeout=300
        )

    out = check(typed_app)
    assert out.returncode == 0, out.stdout + out.stderr
    out = check(
        typed_app
        + textwrap.dedent(
            """

            @rt.on_subscribe
            async def wrong(call: ConnectCall) -> ConnectReply:
                return ConnectReply(user="x")
            """
        )
    )
    assert out.returncode == 1 and '"on_subscribe" of "Tidings"' in out.stdout, out.stdout


# -- the package's public names ------------------------------------------------------------


def test_every_public_name_imports_and_the_clients_do_not_load_the_server() -> None:
    """``tidings.__all__`` is what ``tidings._HOMES`` serves, each name resolves;
    importing the package or its clients (``tidings publish``) loads no server."""
    assert set(tidings.__all__) == set(tidings._HOMES) | {"__version__"}
    for name in tidings.__all__:
        assert getattr(tidings, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = tidings.Nope  # type: ignore[attr-defined]
    probe = (
        "import sys, tidings, tidings.client, tidings.cli; "
        "print(sorted(m for m in sys.modules if m in ('tidings.server', 'tidings.app')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=clean_env()
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# -- docs/python-api.md stays true --------------------------------------------------------

DOC = ROOT / "docs" / "python-api.md"


def test_the_reference_documents_every_public_member_and_nothing_else() -> None:
    """Each ``###`` heading names members (``rt.publish``, ``@rt.on_join``,
    ``Tidings.from_config``); with the attributes described in prose
    (``rt.config``, ``rt.serving``...) they are exactly Tidings' public ones."""
    text = DOC.read_text()
    headings = [line for line in text.splitlines() if line.startswith("### ")]
    in_headings = {name for h in headings for name in re.findall(r"(?:rt|Tidings)\.(\w+)", h)}
    in_prose = {"config", "hooks", "serving", "server"}
    public = {name for name in dir(Tidings) if not name.startswith("_")}
    public |= {name for name in vars(Tidings()) if not name.startswith("_")}
    assert in_headings <= public, sorted(in_headings - public)
    assert public == in_headings | in_prose, sorted(public ^ (in_headings | in_prose))
    for name in in_prose:
        assert f"`rt.{name}`" in text, name


def _recipe(title: str) -> str:
    """The first Python block after the recipe's heading in docs/python-api.md."""
    text = DOC.read_text()
    start = text.index(title)
    block = text[start:].split("```python\n", 1)[1].split("```", 1)[0]
    return block


def test_the_fastapi_and_aiohttp_recipes_serve_and_publish(tmp_path: Path) -> None:
    """The recipes as the page shows them (only the port changed), run in this
    process: the host app's endpoint publishes, a tidings client receives."""
    import importlib.util

    import uvicorn
    from aiohttp import web

    def load(name: str, source: str, port: int) -> Any:
        path = tmp_path / f"{name}.py"
        path.write_text(source.replace('"port": 8001', f'"port": {port}'))
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    async def receive_one(url: str, channel: str, send: Callable[[], Any]) -> Any:
        """What an SSE subscriber (httpx, in a thread: the loop serves tidings) receives."""
        sse = await asyncio.to_thread(SSEClient, type("Realtime", (), {"url": url}), [channel])
        try:
            await asyncio.to_thread(sse.subscribed)
            await send()
            (event,) = await asyncio.to_thread(sse.publications, 1)
            return event.json["data"]
        finally:
            sse.close()

    async def main() -> None:
        fastapi_recipe = load("fastapi_recipe", _recipe("### FastAPI"), free_port())
        app_port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(fastapi_recipe.app, port=app_port, log_level="warning")
        )
        task = asyncio.create_task(server.serve())
        deadline = time.monotonic() + TIMEOUT
        while not server.started:
            assert time.monotonic() < deadline and not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.02)
        rt: Tidings = fastapi_recipe.rt

        async def post_fastapi() -> None:
            async with httpx.AsyncClient() as http:
                sent = await http.post(f"http://127.0.0.1:{app_port}/messages/lobby", json={"a": 1})
                assert sent.status_code == 200, sent.text

        assert await receive_one(rt.url, "chat:lobby", post_fastapi) == {"a": 1}
        server.should_exit = True
        await task
        assert not rt.serving

        aiohttp_recipe = load("aiohttp_recipe", _recipe("### aiohttp"), free_port())
        rt = aiohttp_recipe.rt
        runner = web.AppRunner(aiohttp_recipe.app)
        await runner.setup()
        site_port = free_port()
        await web.TCPSite(runner, "127.0.0.1", site_port).start()

        async def post_aiohttp() -> None:
            async with httpx.AsyncClient() as http:
                sent = await http.post(f"http://127.0.0.1:{site_port}/send", json={"b": 2})
                assert sent.status_code == 200, sent.text

        assert await receive_one(rt.url, "news", post_aiohttp) == {"b": 2}
        await runner.cleanup()
        assert not rt.serving

    asyncio.run(main())


DJANGO_SETTINGS = """
SECRET_KEY = "test"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1"]
ROOT_URLCONF = "mysite.urls"
INSTALLED_APPS = []
"""

DJANGO_URLS = """
from django.http import JsonResponse
from django.urls import path

from mysite.realtime import rt


async def send(request):
    result = await rt.publish("news", {"from": "django"})
    return JsonResponse({"offset": result.offset, "url": rt.url})


urlpatterns = [path("send", send)]
"""


def test_the_django_recipe_serves_through_the_asgi_lifespan(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """The page's mysite/asgi.py, verbatim, under uvicorn: the lifespan starts
    tidings, an async Django view publishes, SSE (httpx) receives; SIGINT stops both."""
    site = tmp_path / "mysite"
    site.mkdir()
    (site / "__init__.py").write_text("")
    (site / "settings.py").write_text(DJANGO_SETTINGS)
    (site / "urls.py").write_text(DJANGO_URLS)
    realtime_port, app_port = free_port(), free_port()
    (site / "realtime.py").write_text(
        "from tidings import Tidings\n\n"
        f'rt = Tidings.from_config({{"host": "127.0.0.1", "port": {realtime_port}}})\n'
    )
    (site / "asgi.py").write_text(_recipe("### Django"))
    log = tmp_path / "uvicorn.log"
    with open(log, "wb") as out:
        proc = spawn(
            [*UVICORN, "mysite.asgi:application", "--host", "127.0.0.1", "--port", str(app_port)],
            cwd=tmp_path,
            env=clean_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    realtime = f"http://127.0.0.1:{realtime_port}"
    _wait_http(f"{realtime}/health", proc, log)
    with SSEClient(type("Realtime", (), {"url": realtime}), ["news"]) as sse:
        sse.subscribed()
        sent = httpx.get(f"http://127.0.0.1:{app_port}/send", timeout=TIMEOUT)
        assert sent.status_code == 200, sent.text + log.read_text()
        assert sent.json()["url"] == realtime
        (event,) = sse.publications(1)
        assert (event.json["data"], event.json["offset"]) == (
            {"from": "django"},
            sent.json()["offset"],
        )
    proc.send_signal(signal.SIGINT)
    assert proc.wait(TIMEOUT) == 0, log.read_text()
    logs = log.read_text()
    assert "Traceback" not in logs and "Application shutdown complete" in logs, logs
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{realtime}/health", timeout=TIMEOUT)
