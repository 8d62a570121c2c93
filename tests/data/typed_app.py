"""A program using tidings' Python API as a user would; ``mypy --strict`` checks it
(tests/test_python_api.py::test_a_typed_program_using_the_api_passes_mypy_strict)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from tidings import (
    KEEP,
    ChannelEvent,
    ConnectCall,
    ConnectReply,
    Disconnect,
    DisconnectEvent,
    MemberEvent,
    ProtocolError,
    PublishCall,
    PublishReply,
    PublishResult,
    RefreshCall,
    RefreshReply,
    Refuse,
    RPCCall,
    StreamPosition,
    SubRefreshCall,
    SubRefreshReply,
    SubscribeCall,
    SubscribeReply,
    Tidings,
)

rt = Tidings.from_config({"namespaces": {"chat": {"presence": True}}})


@rt.on_connect
async def connect(call: ConnectCall) -> ConnectReply | None:
    session = call.cookies.get("session")
    if session is None:
        return None
    if session == "banned":
        raise Disconnect(4501, "banned")
    return ConnectReply(user=session, info={"name": session}, channels=["chat:lobby"])


@rt.on_refresh
async def refresh(call: RefreshCall) -> RefreshReply:
    return RefreshReply(expire_at=0)


@rt.on_subscribe
async def subscribe(call: SubscribeCall) -> SubscribeReply:
    if not call.user:
        raise Refuse(403, "log in first")
    return SubscribeReply(info={"joined": True})


@rt.on_sub_refresh
async def sub_refresh(call: SubRefreshCall) -> SubRefreshReply | None:
    return None


@rt.on_publish
async def publish(call: PublishCall) -> PublishReply:
    message = call.data_json()
    if not isinstance(message, dict) or "text" not in message:
        raise Refuse(400, "a message has a text")
    return PublishReply(data=KEEP)


@rt.on_rpc("echo")
async def echo(call: RPCCall) -> Any:
    return call.data_json()


@rt.on_rpc
async def anything_else(call: RPCCall) -> dict[str, str]:
    return {"method": call.method}


@rt.on_disconnect
async def gone(event: DisconnectEvent) -> None:
    print(event.user, event.code, event.reason)


@rt.on_channel_occupied
async def occupied(event: ChannelEvent) -> None:
    print(event.channel)


@rt.on_channel_vacated
async def vacated(event: ChannelEvent) -> None:
    print(event.channel)


@rt.on_join
async def joined(event: MemberEvent) -> None:
    print(event.channel, event.user)


@rt.on_leave
async def left(event: MemberEvent) -> None:
    print(event.channel, event.user)


@contextlib.asynccontextmanager
async def lifespan(app: object) -> AsyncIterator[None]:
    async with rt.serve(host="127.0.0.1", port=8001):
        yield


async def operations() -> int:
    result: PublishResult = await rt.publish(
        "chat:lobby", {"text": "hi"}, idempotency_key="k", tags={"a": "b"}, exclude=["c"]
    )
    await rt.publish("chat:lobby", b'{"text": "raw"}', skip_history=True)
    replies = await rt.broadcast(["chat:a", "chat:b"], {"text": "all"})
    offsets = [r.result.offset for r in replies.responses if r.result is not None]
    since = StreamPosition(offset=result.offset, epoch=result.epoch)
    history = await rt.history("chat:lobby", limit=10, since=since, reverse=False)
    texts = [bytes(p.data) for p in history.publications]
    presence = await rt.presence("chat:lobby")
    users = {entry.user for entry in presence.presence.values()}
    stats = await rt.presence_stats("chat:lobby")
    channels = await rt.channels("chat:*")
    counts = {name: c.num_clients for name, c in channels.channels.items()}
    node = (await rt.info()).nodes[0]
    await rt.subscribe("alice", "chat:news")
    await rt.unsubscribe("alice", "chat:news", client="")
    await rt.refresh("alice", expire_at=2_000_000_000, info={"name": "Alice"})
    await rt.disconnect("alice", code=4000, reason="bye")
    try:
        await rt.publish("bad name", 1)
    except ProtocolError as exc:
        print(exc.code, exc.message)
    print(rt.url, texts, users, counts, node.uid, offsets)
    return stats.num_clients + stats.num_users
