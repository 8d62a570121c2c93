"""The application's hooks on WebSocket and its emulation, driven by real SDKs.

Each server is a :func:`hooks_support.hooked_server` (the hooks are Python
callables in this process); clients are centrifuge-python (JSON and Protobuf),
centrifuge-js under node (WebSocket in both builds, and the ``http_stream``
emulation), and, where a test must see the exact bytes (an error code, a
close code, a push), the raw WebSocket client of ``ws_support``. What the
hooks saw is recorded in a :class:`hooks_support.Recorder` and waited on
with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from centrifuge import (
    Client,
    ClientEventHandler,
    ConnectedContext,
    ConnectingContext,
    DisconnectedContext,
    PublicationContext,
    ReplyError,
    ServerPublicationContext,
    ServerSubscribedContext,
    SubscriptionEventHandler,
)

from helpers import unique_channel
from hooks_support import Held, HookedServer, Recorder, hooked_server
from tidings.errors import ErrorCode, ProtocolError
from tidings.hooks import (
    ConnectCall,
    ConnectReply,
    Disconnect,
    DisconnectEvent,
    Event,
    Hooks,
    MemberEvent,
    PublishCall,
    PublishReply,
    RefreshCall,
    RefreshReply,
    Refuse,
    RPCCall,
    SubRefreshCall,
    SubRefreshReply,
    SubscribeCall,
    SubscribeReply,
)
from ws_support import NodeClient, RawClient, node_available

TIMEOUT = 10.0

#: Namespaces the tests use: presence and join/leave, none (the hook's overrides
#: turn them on), subscribing by token only (a deferring hook leaves it closed),
#: and publications not echoed to their publisher.
CONFIG: dict[str, Any] = {
    # Expiry is enforced on the ping turn: every second here.
    # Connections that never connect are closed after 5 s (3502); raw clients
    # do not answer pings, so the pong timeout is out of the tests' way.
    "websocket": {"ping_interval": 1.0, "pong_timeout": 60.0, "connect_timeout": 5.0},
    "auth": {"expiry_grace": 0},
    "namespaces": {
        "room": {"presence": True, "join_leave": True, "publish": "subscribers"},
        "plain": {"publish": "subscribers"},
        "closed": {"subscribe": "token"},
        "quiet": {"publish": "subscribers", "echo_publications": False},
    },
}

SDKS = [pytest.param(False, id="json"), pytest.param(True, id="protobuf")]


@pytest.fixture
def hooks() -> Hooks:
    return Hooks(timeout=1.0)


@pytest.fixture
def events(hooks: Hooks) -> Recorder:
    """Every event the server emits."""
    recorder = Recorder()
    hooks.add_listener(recorder.add)
    return recorder


@pytest.fixture
def srv(hooks: Hooks) -> Iterator[HookedServer]:
    with hooked_server(hooks, CONFIG) as server:
        yield server


# -- helpers -------------------------------------------------------------------


def wire(value: Any, protobuf: bool) -> Any:
    """A JSON value as centrifuge-python sends it: itself, or its JSON bytes in Protobuf."""
    return json.dumps(value).encode() if protobuf else value


def unwire(value: Any, protobuf: bool) -> Any:
    return json.loads(value) if protobuf and value else value


class ClientEvents(ClientEventHandler):
    """A client's own events and its server-side subscriptions', queued."""

    def __init__(self) -> None:
        self.connected: asyncio.Queue[ConnectedContext] = asyncio.Queue()
        self.connecting: asyncio.Queue[ConnectingContext] = asyncio.Queue()
        self.disconnected: asyncio.Queue[DisconnectedContext] = asyncio.Queue()
        self.server_subscribed: asyncio.Queue[ServerSubscribedContext] = asyncio.Queue()
        self.server_publications: asyncio.Queue[ServerPublicationContext] = asyncio.Queue()

    async def on_connected(self, ctx: ConnectedContext) -> None:
        await self.connected.put(ctx)

    async def on_connecting(self, ctx: ConnectingContext) -> None:
        await self.connecting.put(ctx)

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        await self.disconnected.put(ctx)

    async def on_subscribed(self, ctx: ServerSubscribedContext) -> None:  # type: ignore[override]
        await self.server_subscribed.put(ctx)

    async def on_publication(self, ctx: ServerPublicationContext) -> None:  # type: ignore[override]
        await self.server_publications.put(ctx)


class SubEvents(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.publications: asyncio.Queue[PublicationContext] = asyncio.Queue()

    async def on_publication(self, ctx: PublicationContext) -> None:
        await self.publications.put(ctx)


def sdk(srv: HookedServer, protobuf: bool = False, **kw: Any) -> tuple[Client, ClientEvents]:
    """A centrifuge-python client (not connected yet) and its events."""
    ev = ClientEvents()
    client = Client(
        srv.ws_url,
        events=ev,
        use_protobuf=protobuf,
        proxy=None,
        min_reconnect_delay=0.1,
        max_reconnect_delay=0.5,
        **kw,
    )
    return client, ev


async def take(queue: asyncio.Queue[Any]) -> Any:
    return await asyncio.wait_for(queue.get(), TIMEOUT)


def hub_publish(srv: HookedServer, channel: str, data: Any) -> None:
    """Publish from the server's side (the hub), not through a client."""
    srv.call(srv.server.hub.publish(channel, msgspec.json.encode(data)))


async def apublish(srv: HookedServer, channel: str, data: Any) -> None:
    await asyncio.to_thread(hub_publish, srv, channel, data)


def raw_connect(srv: HookedServer, **connect: Any) -> tuple[RawClient, dict[str, Any]]:
    """A raw WebSocket client that sent connect; its connect reply."""
    raw = RawClient(srv.ws_url)
    raw.send({"id": 1, "connect": connect})
    return raw, raw.wait_for(lambda m: m.get("id") == 1)


def raw_subscribe(raw: RawClient, channel: str, cmd_id: int = 2) -> dict[str, Any]:
    raw.send({"id": cmd_id, "subscribe": {"channel": channel}})
    return raw.wait_for(lambda m: m.get("id") == cmd_id)


# -- connect -----------------------------------------------------------------


@pytest.mark.parametrize("protobuf", SDKS)
def test_connect_hook_sees_the_request_and_names_the_user(
    hooks: Hooks, srv: HookedServer, protobuf: bool
) -> None:
    calls, kept = Recorder(), Recorder()
    news = unique_channel("plain:news")

    requests = srv.server.websocket.requests

    async def on_connect(call: ConnectCall) -> ConnectReply:
        calls.add(call)
        kept.add(len(requests))  # the upgrade request is kept while connect runs
        return ConnectReply(
            user="u42", info={"name": "Ada"}, data={"welcome": call.data_json()}, channels=[news]
        )

    hooks.connect = on_connect

    async def main() -> None:
        client, ev = sdk(
            srv,
            protobuf,
            data=wire({"hello": 1}, protobuf),
            headers={"X-App": "yes", "Cookie": "session=abc; theme=dark"},
        )
        await client.connect()
        connected = await take(ev.connected)
        assert unwire(connected.data, protobuf) == {"welcome": {"hello": 1}}
        # The reply's channels are server-side subscriptions.
        assert (await take(ev.server_subscribed)).channel == news
        await apublish(srv, news, {"n": 1})
        assert unwire((await take(ev.server_publications)).pub.data, protobuf) == {"n": 1}
        (call,) = calls.items
        assert call.client == connected.client == client.client_id
        assert (call.transport, call.protocol) == ("websocket", "protobuf" if protobuf else "json")
        assert call.user == "" and call.name == "python"
        assert call.headers["x-app"] == "yes"
        assert call.cookies == {"session": "abc", "theme": "dark"}
        assert call.remote == "127.0.0.1"
        (session,) = srv.server.hub.clients_of("u42")
        assert session.client_id == client.client_id
        # Kept only until connect: the connected client's request is gone.
        assert kept.items == [1] and len(requests) == 0
        await client.disconnect()

    asyncio.run(main())


def test_connect_hook_refusal_is_an_error_reply_and_disconnect_closes(
    hooks: Hooks, srv: HookedServer
) -> None:
    async def on_connect(call: ConnectCall) -> ConnectReply:
        verdict = call.data_json()
        if verdict == "refuse":
            raise Refuse(1403, "not today")
        if verdict == "disconnect":
            raise Disconnect(4001, "go away")
        return ConnectReply(user="ok")

    hooks.connect = on_connect
    raw, reply = raw_connect(srv, data="refuse")
    assert reply["error"] == {"code": 1403, "message": "not today"}
    # Refused, not closed (Centrifugo's behaviour): connect may be sent again.
    raw.send({"id": 2, "connect": {"data": "yes"}})
    assert raw.wait_for(lambda m: m.get("id") == 2)["connect"]["client"]
    raw.close()

    raw = RawClient(srv.ws_url)
    raw.send({"id": 1, "connect": {"data": "disconnect"}})
    assert raw.read_until_closed() == 4001
    assert raw.protocol.close_rcvd is not None and raw.protocol.close_rcvd.reason == "go away"
    raw.close()

    async def sdk_sees_code() -> None:
        client, ev = sdk(srv, data="refuse")
        await client.connect()
        disconnected = await take(ev.disconnected)
        assert (disconnected.code, disconnected.reason) == (1403, "not today")

    asyncio.run(sdk_sees_code())


def test_connect_hook_raising_fails_that_client_only(
    hooks: Hooks, srv: HookedServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def on_connect(call: ConnectCall) -> ConnectReply | None:
        if call.headers.get("x-break"):
            raise RuntimeError("the application's bug")
        return None

    hooks.connect = on_connect
    channel = unique_channel()
    other, _ = raw_connect(srv)
    raw_subscribe(other, channel)

    bad = RawClient(srv.ws_url, headers={"X-Break": "1"})
    bad.send({"id": 1, "connect": {}})
    reply = bad.wait_for(lambda m: m.get("id") == 1)
    assert reply["error"] == {"code": 100, "message": "internal server error", "temporary": True}
    bad.close()

    hub_publish(srv, channel, {"still": "served"})
    push = other.wait_for(lambda m: "push" in m)
    assert push["push"]["pub"]["data"] == {"still": "served"}
    other.close()
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in failures] == [
        f"connect hook failed (client {reply_client(failures[0])})"
    ]
    assert failures[0].exc_info is not None  # the application's bug keeps its traceback


def reply_client(record: logging.LogRecord) -> str:
    """The client id a hook failure's log line names (it is made before connect ends)."""
    return str(record.args[-1]) if isinstance(record.args, tuple) else ""


def test_connect_hook_timing_out_is_a_temporary_error(hooks: Hooks, srv: HookedServer) -> None:
    held = Held(srv)

    async def on_connect(call: ConnectCall) -> ConnectReply:
        await held.wait()
        return ConnectReply(user="late")

    hooks.connect = on_connect
    hooks.timeout = 0.3
    raw, reply = raw_connect(srv)
    assert reply["error"] == {"code": 100, "message": "connect hook timed out", "temporary": True}
    assert srv.server.hub.clients_of("late") == []
    raw.close()


def test_slow_connect_hook_does_not_hold_other_clients(hooks: Hooks, srv: HookedServer) -> None:
    held = Held(srv)

    async def on_connect(call: ConnectCall) -> ConnectReply | None:
        if call.headers.get("x-slow"):
            await held.wait()
            return ConnectReply(user="slow")
        return None

    hooks.connect = on_connect
    hooks.timeout = 30.0
    channel = unique_channel()
    fast, _ = raw_connect(srv)
    raw_subscribe(fast, channel)

    slow = RawClient(srv.ws_url, headers={"X-Slow": "1"})
    slow.send({"id": 1, "connect": {}})
    assert held.waiting.wait(TIMEOUT)
    for n in range(3):  # the hook is still waiting: others are served all along
        hub_publish(srv, channel, {"n": n})
        push = fast.wait_for(
            lambda m, n=n: m.get("push", {}).get("pub", {}).get("data") == {"n": n}
        )
        assert push["push"]["channel"] == channel
    assert not held.event.is_set()
    held.release()
    assert slow.wait_for(lambda m: m.get("id") == 1)["connect"]["client"]
    assert len(srv.server.hub.clients_of("slow")) == 1
    fast.close()
    slow.close()


# -- subscribe ---------------------------------------------------------------


def test_subscribe_hook_allows_refuses_and_defers(hooks: Hooks, srv: HookedServer) -> None:
    calls = Recorder()

    async def on_subscribe(call: SubscribeCall) -> SubscribeReply | None:
        calls.add(call)
        verdict = call.data_json()
        if verdict == "refuse":
            raise Refuse(1404, "no such room")
        if verdict == "allow":
            return SubscribeReply()
        return None

    hooks.subscribe = on_subscribe
    raw, connected = raw_connect(srv)
    client_id = connected["connect"]["client"]
    allowed, refused, deferred = (unique_channel("closed:") for _ in range(3))
    raw.send({"id": 2, "subscribe": {"channel": allowed, "data": "allow"}})
    assert "subscribe" in raw.wait_for(lambda m: m.get("id") == 2)
    raw.send({"id": 3, "subscribe": {"channel": refused, "data": "refuse"}})
    assert raw.wait_for(lambda m: m.get("id") == 3)["error"] == {
        "code": 1404,
        "message": "no such room",
    }
    # None: the namespace's rules decide, and "closed" wants a subscription token.
    raw.send({"id": 4, "subscribe": {"channel": deferred, "data": "defer"}})
    assert raw.wait_for(lambda m: m.get("id") == 4)["error"]["code"] == 103
    assert [(c.channel, c.client, c.transport) for c in calls.items] == [
        (allowed, client_id, "websocket"),
        (refused, client_id, "websocket"),
        (deferred, client_id, "websocket"),
    ]
    hub_publish(srv, allowed, {"in": True})
    assert raw.wait_for(lambda m: "push" in m)["push"]["channel"] == allowed
    raw.close()


def test_subscribe_hook_overrides_presence_and_join_leave(
    hooks: Hooks, srv: HookedServer, events: Recorder
) -> None:
    """A grant's presence/join_leave overrides: presence entry, join, leave and
    the events all follow the override, in a namespace that has neither."""

    async def on_connect(call: ConnectCall) -> ConnectReply:
        return ConnectReply(user="ada", info={"name": "Ada"})

    async def on_subscribe(call: SubscribeCall) -> SubscribeReply:
        return SubscribeReply(info={"role": "host"}, presence=True, join_leave=True)

    hooks.connect, hooks.subscribe = on_connect, on_subscribe
    channel = unique_channel("plain:")
    watcher, _ = raw_connect(srv)
    raw_subscribe(watcher, channel)
    raw, connected = raw_connect(srv)
    client_id = connected["connect"]["client"]
    raw_subscribe(raw, channel)

    presence = srv.call(srv.server.hub.presence(channel))
    assert presence[client_id].user == "ada"
    assert json.loads(bytes(presence[client_id].chan_info)) == {"role": "host"}
    join = watcher.wait_for(lambda m: "join" in m.get("push", {}))
    assert join["push"]["join"]["info"]["client"] == client_id
    assert join["push"]["join"]["info"]["chan_info"] == {"role": "host"}

    raw.send({"id": 3, "unsubscribe": {"channel": channel}})
    raw.wait_for(lambda m: m.get("id") == 3)
    leave = watcher.wait_for(lambda m: "leave" in m.get("push", {}))
    assert leave["push"]["leave"]["info"]["client"] == client_id
    assert client_id not in srv.call(srv.server.hub.presence(channel))

    def member(kind: str) -> Any:
        return lambda items: any(
            isinstance(e, MemberEvent) and e.kind == kind and e.client == client_id for e in items
        )

    got = events.wait_for(member("leave"))
    joins = [e for e in got if isinstance(e, MemberEvent) and e.client == client_id]
    assert [(e.kind, e.channel, e.user) for e in joins] == [
        ("join", channel, "ada"),
        ("leave", channel, "ada"),
    ]
    assert all(json.loads(e.chan_info or b"null") == {"role": "host"} for e in joins)
    assert all(json.loads(e.conn_info or b"null") == {"name": "Ada"} for e in joins)
    watcher.close()
    raw.close()


# -- publish -----------------------------------------------------------------


@pytest.mark.parametrize("protobuf", SDKS)
def test_publish_hook_replaces_refuses_or_skips_history(
    hooks: Hooks, srv: HookedServer, protobuf: bool
) -> None:
    calls = Recorder()

    async def on_publish(call: PublishCall) -> PublishReply:
        calls.add(call)
        text = call.data_json()["text"]
        if text == "spam":
            raise Refuse(1429, "no spam")
        if text == "live only":
            return PublishReply(skip_history=True)  # the data as sent (KEEP)
        return PublishReply(data={"text": text.upper(), "checked": True})

    hooks.publish = on_publish
    channel = unique_channel("plain:")

    async def main() -> None:
        client, _ = sdk(srv, protobuf)
        ev = SubEvents()
        sub = client.new_subscription(channel, ev)
        await client.connect()
        await sub.subscribe()
        await sub.ready(TIMEOUT)
        await sub.publish(wire({"text": "hi"}, protobuf))
        got = await asyncio.wait_for(ev.publications.get(), TIMEOUT)
        assert unwire(got.pub.data, protobuf) == {"text": "HI", "checked": True}
        with pytest.raises(ReplyError) as refused:
            await sub.publish(wire({"text": "spam"}, protobuf))
        assert (refused.value.code, refused.value.message) == (1429, "no spam")
        await sub.publish(wire({"text": "live only"}, protobuf))
        got = await asyncio.wait_for(ev.publications.get(), TIMEOUT)
        assert unwire(got.pub.data, protobuf) == {"text": "live only"}
        history = await sub.history(limit=-1)
        assert [unwire(p.data, protobuf) for p in history.publications] == [
            {"text": "HI", "checked": True}
        ]
        (first, second, _) = calls.items
        assert (first.channel, first.client, json.loads(first.data)) == (
            channel,
            client.client_id,
            {"text": "hi"},
        )
        assert second.protocol == ("protobuf" if protobuf else "json")
        await client.disconnect()

    asyncio.run(main())


def test_publication_is_not_echoed_where_the_namespace_says_so(srv: HookedServer) -> None:
    channel = unique_channel("quiet:")
    publisher, _ = raw_connect(srv)
    raw_subscribe(publisher, channel)
    other, _ = raw_connect(srv)
    raw_subscribe(other, channel)
    publisher.send({"id": 3, "publish": {"channel": channel, "data": {"from": "me"}}})
    publisher.wait_for(lambda m: m.get("id") == 3)
    assert other.wait_for(lambda m: "push" in m)["push"]["pub"]["data"] == {"from": "me"}
    # The next publication the publisher receives is the server's, not its own.
    hub_publish(srv, channel, {"from": "server"})
    assert publisher.wait_for(lambda m: "push" in m)["push"]["pub"]["data"] == {"from": "server"}
    publisher.close()
    other.close()


# -- rpc ---------------------------------------------------------------------


@pytest.mark.parametrize("protobuf", SDKS)
def test_rpc_reaches_its_handler(hooks: Hooks, srv: HookedServer, protobuf: bool) -> None:
    calls = Recorder()

    async def echo(call: RPCCall) -> Any:
        calls.add(call)
        return {"echo": call.data_json(), "method": call.method}

    async def broken(call: RPCCall) -> Any:
        raise ValueError("the handler's bug")

    hooks.rpc = {"echo": echo, "broken": broken}

    async def main() -> None:
        client, _ = sdk(srv, protobuf)
        await client.connect()
        await client.ready(TIMEOUT)
        result = await client.rpc("echo", wire({"x": 1}, protobuf))
        assert unwire(result.data, protobuf) == {"echo": {"x": 1}, "method": "echo"}
        for method, code in (("missing", 108), ("broken", 100)):
            with pytest.raises(ReplyError) as err:
                await client.rpc(method, wire({}, protobuf))
            assert err.value.code == code
        (call,) = calls.items
        assert (call.client, call.protocol) == (
            client.client_id,
            "protobuf" if protobuf else "json",
        )
        await client.disconnect()

    asyncio.run(main())


# -- refresh -----------------------------------------------------------------


def test_refresh_hook_extends_then_expires_the_connection(
    hooks: Hooks, srv: HookedServer, events: Recorder
) -> None:
    calls = Recorder()

    async def on_connect(call: ConnectCall) -> ConnectReply:
        return ConnectReply(user="r", expire_at=int(time.time()) + 1)

    async def on_refresh(call: RefreshCall) -> RefreshReply:
        calls.add(call)
        if len(calls.items) == 1:
            return RefreshReply(expire_at=int(time.time()) + 1)
        return RefreshReply(expired=True)

    hooks.connect, hooks.refresh = on_connect, on_refresh

    async def main() -> None:
        client, ev = sdk(srv)
        await client.connect()
        connected = await take(ev.connected)
        # The SDK gets no expiry: the server extends this one with its hook.
        assert client._refresh_timer is None
        connecting = await take(ev.connecting)  # the connect attempt itself
        connecting = await take(ev.connecting)
        assert (connecting.code, connecting.reason) == (3005, "connection expired")
        await client.disconnect()
        return connected.client

    client_id = asyncio.run(main())
    assert [c.client for c in calls.items] == [client_id, client_id]
    got = events.wait_for(
        lambda items: any(isinstance(e, DisconnectEvent) and e.client == client_id for e in items)
    )
    (end,) = [e for e in got if isinstance(e, DisconnectEvent) and e.client == client_id]
    assert (end.code, end.reason, end.user) == (3005, "connection expired", "r")


def test_without_a_refresh_hook_a_hook_expiry_closes_3005(hooks: Hooks, srv: HookedServer) -> None:
    async def on_connect(call: ConnectCall) -> ConnectReply:
        return ConnectReply(user="r", expire_at=int(time.time()) + 1)

    hooks.connect = on_connect
    raw, reply = raw_connect(srv)
    assert "expires" not in reply["connect"]
    assert raw.read_until_closed() == 3005
    raw.close()


def test_sub_refresh_hook_extends_then_ends_the_subscription(
    hooks: Hooks, srv: HookedServer
) -> None:
    calls = Recorder()

    async def on_subscribe(call: SubscribeCall) -> SubscribeReply:
        return SubscribeReply(expire_at=int(time.time()) + 1)

    async def on_sub_refresh(call: SubRefreshCall) -> SubRefreshReply:
        calls.add(call)
        if len(calls.items) == 1:
            return SubRefreshReply(expire_at=int(time.time()) + 1)
        return SubRefreshReply(expired=True)

    hooks.subscribe, hooks.sub_refresh = on_subscribe, on_sub_refresh
    channel = unique_channel("closed:")
    raw, _ = raw_connect(srv)
    reply = raw_subscribe(raw, channel)
    assert "expires" not in reply["subscribe"]  # the server's to extend, not the SDK's
    push = raw.wait_for(lambda m: "unsubscribe" in m.get("push", {}), timeout=TIMEOUT)
    assert push["push"] == {
        "channel": channel,
        "unsubscribe": {"code": 2501, "reason": "subscription expired"},
    }
    assert [c.channel for c in calls.items] == [channel, channel]
    raw.close()


# -- events and the server API's side -----------------------------------------


def test_disconnect_events_say_what_the_client_was_told(
    hooks: Hooks, srv: HookedServer, events: Recorder
) -> None:
    async def on_subscribe(call: SubscribeCall) -> SubscribeReply:
        raise Disconnect(4002, "banned from this room")

    hooks.subscribe = on_subscribe
    leaving, left = raw_connect(srv)
    leaving.close()  # gone by itself, no close frame
    banned, connected = raw_connect(srv)
    banned.send({"id": 2, "subscribe": {"channel": unique_channel()}})
    assert banned.read_until_closed() == 4002
    banned.close()

    def ended(items: list[Event]) -> dict[str, tuple[int, str]]:
        return {e.client: (e.code, e.reason) for e in items if isinstance(e, DisconnectEvent)}

    ids = (left["connect"]["client"], connected["connect"]["client"])
    got = ended(events.wait_for(lambda items: set(ids) <= ended(items).keys()))
    assert got[ids[0]] == (3000, "connection closed")
    assert got[ids[1]] == (4002, "banned from this room")


def test_join_and_leave_events_in_a_presence_namespace(srv: HookedServer, events: Recorder) -> None:
    channel = unique_channel("room:")

    async def main() -> str:
        client, _ = sdk(srv)
        sub = client.new_subscription(channel, SubEvents())
        await client.connect()
        await sub.subscribe()
        await sub.ready(TIMEOUT)
        client_id = client.client_id
        assert client_id is not None
        await client.disconnect()
        return client_id

    client_id = asyncio.run(main())
    got = events.wait_for(
        lambda items: (
            any(isinstance(e, MemberEvent) and e.kind == "leave" for e in items)
            and any(isinstance(e, DisconnectEvent) for e in items)
        )
    )
    mine = [e for e in got if getattr(e, "client", None) == client_id]
    assert [(type(e).__name__, e.kind) for e in mine] == [
        ("MemberEvent", "join"),
        ("MemberEvent", "leave"),
        ("DisconnectEvent", "disconnect"),
    ]
    assert all(getattr(e, "channel", channel) == channel for e in mine)


def test_server_side_subscribe_and_refresh_reach_the_sdk(srv: HookedServer) -> None:
    channel = unique_channel("plain:")

    async def main() -> None:
        client, ev = sdk(srv)
        await client.connect()
        await client.ready(TIMEOUT)
        (session,) = await asyncio.to_thread(_sessions, srv, client.client_id)
        assert await asyncio.to_thread(srv.call, session.server_subscribe(channel))
        subscribed = await take(ev.server_subscribed)
        assert subscribed.channel == channel and subscribed.recoverable
        await apublish(srv, channel, {"server": "side"})
        got = await take(ev.server_publications)
        assert (got.channel, got.pub.data) == (channel, {"server": "side"})
        # Already subscribed: nothing to do.
        assert not await asyncio.to_thread(srv.call, session.server_subscribe(channel))
        srv.loop.call_soon_threadsafe(session.server_refresh, 0, None, True)
        connecting = await take(ev.connecting)
        connecting = await take(ev.connecting)
        assert connecting.code == 3005
        await client.disconnect()

    asyncio.run(main())


def _sessions(srv: HookedServer, client_id: str | None) -> list[Any]:
    """The session of ``client_id`` (anonymous clients are not indexed by user),
    read on the server's loop from the ping wheel's slots of connected clients."""

    async def find() -> list[Any]:
        slots = srv.server.websocket.slots
        return [c.session for slot in slots for c in slot if c.session.client_id == client_id]

    result: list[Any] = srv.call(find())
    return result


# -- centrifuge-js: WebSocket (both builds) and the http_stream emulation -------

JS = [
    pytest.param("websocket", False, id="ws-json"),
    pytest.param("websocket", True, id="ws-protobuf"),
    pytest.param("http_stream", False, id="http_stream"),
    pytest.param("sse", False, id="sse-emulation"),
]


@pytest.mark.node
@pytest.mark.skipif(
    not node_available() and not os.environ.get("CI"), reason="node and npm are needed"
)
@pytest.mark.parametrize(("transport", "protobuf"), JS)
def test_centrifuge_js_connect_data_rpc_refusal_and_disconnect_event(
    hooks: Hooks,
    srv: HookedServer,
    events: Recorder,
    node_clients: list[NodeClient],
    transport: str,
    protobuf: bool,
) -> None:
    calls = Recorder()

    async def on_connect(call: ConnectCall) -> ConnectReply:
        calls.add(call)
        if call.data_json() == {"let": "me out"}:
            raise Refuse(1403, "not you")
        return ConnectReply(user="js", data={"hi": call.data_json()})

    async def on_subscribe(call: SubscribeCall) -> SubscribeReply:
        return SubscribeReply()

    async def add(call: RPCCall) -> Any:
        data = call.data_json()
        return {"sum": data["a"] + data["b"]}

    hooks.connect, hooks.subscribe, hooks.rpc = on_connect, on_subscribe, {"add": add}
    channel = unique_channel("closed:")
    env = {"TIDINGS_JS_DATA": json.dumps({"let": "me in"})}
    url = srv.ws_url
    if transport != "websocket":
        env["TIDINGS_JS_TRANSPORT"] = transport
        url = srv.url
    if protobuf:
        env["TIDINGS_JS_PROTOBUF"] = "1"
    js = NodeClient(url, channel, env=env)
    node_clients.append(js)
    connected = js.wait(lambda e: e["event"] == "connected")
    assert connected["data"] == {"hi": {"let": "me in"}}
    js.wait(lambda e: e["event"] == "subscribed")
    hub_publish(srv, channel, {"to": "js"})
    js.wait(lambda e: e["event"] == "publication" and e["data"] == {"to": "js"})
    js.command(cmd="rpc", method="add", data={"a": 2, "b": 3})
    assert js.wait(lambda e: e["event"] == "rpc")["data"] == {"sum": 5}
    js.command(cmd="rpc", method="nope", data={})
    assert js.wait(lambda e: e["event"] == "command_error")["code"] == 108
    (call,) = calls.items
    expected = {"websocket": "websocket", "http_stream": "http_stream", "sse": "sse_emulation"}
    assert call.transport == expected[transport]
    assert call.protocol == ("protobuf" if protobuf else "json")
    assert call.client == connected["client"]
    assert call.headers  # the opening request's headers reached the hook

    refused = NodeClient(url, env={**env, "TIDINGS_JS_DATA": json.dumps({"let": "me out"})})
    node_clients.append(refused)
    gone = refused.wait(lambda e: e["event"] == "disconnected")
    assert (gone["code"], gone["reason"]) == (1403, "not you")

    # The SDK's own disconnect (a close frame, or the stream dropped): 3000.
    js.command(cmd="disconnect")
    got = events.wait_for(
        lambda items: any(
            isinstance(e, DisconnectEvent) and e.client == connected["client"] for e in items
        )
    )
    (end,) = [e for e in got if isinstance(e, DisconnectEvent)]
    assert (end.transport, end.user, end.code, end.reason) == (
        expected[transport],
        "js",
        3000,
        "connection closed",
    )


# -- bounds ------------------------------------------------------------------


def test_refresh_hooks_in_flight_are_bounded_and_the_rest_wait_their_turn(
    hooks: Hooks, srv: HookedServer
) -> None:
    """Five connections expire together while the refresh hook hangs: at most
    the transport's bound (lowered to 2 here) are being asked; the others are
    asked on later turns once those answer, and every connection stays."""
    held = Held(srv)
    asked = Recorder()

    async def on_connect(call: ConnectCall) -> ConnectReply:
        return ConnectReply(user=call.data_json(), expire_at=int(time.time()) + 1)

    async def on_refresh(call: RefreshCall) -> RefreshReply:
        asked.add(call.user)
        await held.wait()
        return RefreshReply(expire_at=int(time.time()) + 3600)

    hooks.connect, hooks.refresh, hooks.timeout = on_connect, on_refresh, 30.0
    refreshes = srv.server.websocket.options.refreshes
    assert refreshes is not None
    refreshes.limit = 2
    clients = [raw_connect(srv, data=f"user{n}")[0] for n in range(5)]
    asked.wait_for(lambda items: len(items) >= 2)
    # Turns pass (one a second) while the two hang: nobody else is asked.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert len(asked.items) == 2 and len(refreshes.pending) <= 2
        time.sleep(0.1)
    held.release()
    asked.wait_for(lambda items: len(set(items)) == 5)
    assert all(len(srv.server.hub.clients_of(f"user{n}")) == 1 for n in range(5))
    for raw in clients:
        raw.close()


def test_upgrade_requests_are_not_kept_past_the_connection(hooks: Hooks, srv: HookedServer) -> None:
    """With a connect hook, each upgraded connection's request is kept until it
    connects; connections that never do, and go away or stay silent, leave
    nothing behind: the count of kept requests returns to zero."""

    async def on_connect(call: ConnectCall) -> None:
        return None

    hooks.connect = on_connect
    big = {f"X-Pad-{n}": "p" * 1000 for n in range(6)}
    silent = [RawClient(srv.ws_url, headers=big) for _ in range(20)]
    requests = srv.server.websocket.requests
    assert len(requests) == 20
    for raw in silent[:10]:
        raw.close()  # gone without a word
    deadline = time.monotonic() + TIMEOUT
    while len(requests) > 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(requests) == 10
    # The rest never connect: the connect timeout closes them (3502) and drops them.
    assert [raw.read_until_closed() for raw in silent[10:]] == [3502] * 10
    deadline = time.monotonic() + TIMEOUT
    while requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert requests == {}
    for raw in silent[10:]:
        raw.close()


def test_server_side_subscribe_keeps_the_channel_bound() -> None:
    """The server's subscribe may not take a connection past
    ``limits.max_channels_per_connection``: 106, and the client is not subscribed."""
    config = {**CONFIG, "limits": {"max_channels_per_connection": 2}}
    with hooked_server(Hooks(), config) as srv:

        async def main() -> None:
            client, ev = sdk(srv)
            await client.connect()
            await client.ready(TIMEOUT)
            (session,) = await asyncio.to_thread(_sessions, srv, client.client_id)
            first, second, third = (unique_channel("plain:") for _ in range(3))
            for channel in (first, second):
                assert await asyncio.to_thread(srv.call, session.server_subscribe(channel))
                assert (await take(ev.server_subscribed)).channel == channel
            with pytest.raises(ProtocolError) as refused:
                await asyncio.to_thread(srv.call, session.server_subscribe(third))
            assert refused.value.code == ErrorCode.LIMIT_EXCEEDED
            assert session.channels == {first, second}
            await client.disconnect()

        asyncio.run(main())


def test_a_clients_publication_carries_its_connection_info(hooks: Hooks, srv: HookedServer) -> None:
    """As Centrifugo's: the publisher's user, client and connection info (here
    from the connect hook) reach every subscriber with its publication."""

    async def connect(call: ConnectCall) -> ConnectReply:
        return ConnectReply(user="ann", info={"name": "Ann"})

    hooks.connect = connect
    channel = unique_channel("plain:")

    async def main() -> None:
        client, _ = sdk(srv)
        await client.connect()
        sub_events = SubEvents()
        sub = client.new_subscription(channel, events=sub_events)
        await sub.subscribe()
        await sub.ready(TIMEOUT)
        await sub.publish({"text": "hi"})
        got = await take(sub_events.publications)
        assert got.pub.data == {"text": "hi"}
        assert got.pub.info is not None
        assert (got.pub.info.user, got.pub.info.conn_info) == ("ann", {"name": "Ann"})
        await client.disconnect()

    asyncio.run(main())
