"""The proxy: tidings asks a backend over HTTP, in Centrifugo's proxy format.

The backend is a plain aiohttp application answering as a Centrifugo user's
backend would (tests/proxy_backend.py); tidings is a real ``tidings serve``
process with ``[proxy]`` URLs; the clients are centrifuge-python, centrifuge-js,
httpx, and a raw WebSocket client where the exact wire reply is the point.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest
from centrifuge import (
    Client,
    ClientEventHandler,
    ConnectedContext,
    ReplyError,
)

from conftest import ServerProcess, free_port
from helpers import SSEClient, publish, rss_kib, unique_channel
from proxy_backend import Backend, Huge, Raw, Stall, Trickle, backend_running
from test_websocket_python import Events, next_pub
from ws_support import NodeClient, RawClient

TIMEOUT = 10.0
SECRET = "proxy-test-secret-of-at-least-32-bytes!"

Launcher = Callable[..., ServerProcess]


@pytest.fixture
def backend() -> Iterator[Backend]:
    with backend_running() as running:
        yield running


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def start(
    server_factory: Launcher,
    backend: Backend,
    calls: tuple[str, ...],
    *,
    hooks_timeout: float = 5.0,
    extra: str = "",
    **proxy: Any,
) -> ServerProcess:
    """tidings with the backend's ``/<call>`` as the URL of each of ``calls``."""
    lines = ["[hooks]", f"timeout = {hooks_timeout}", "[proxy]"]
    lines += [f'{call}_url = "{backend.url(call)}"' for call in calls]
    lines += [f"{key} = {toml_value(value)}" for key, value in proxy.items()]
    return server_factory(config="\n".join(lines) + "\n" + extra)


def token(user: str) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


def raw_client(srv: ServerProcess, **kw: Any) -> RawClient:
    return RawClient(srv.ws_url, **kw)


def reply_to(client: RawClient, command_id: int) -> dict[str, Any]:
    return client.wait_for(lambda m: m.get("id") == command_id)


def connected_raw(srv: ServerProcess, **connect: Any) -> RawClient:
    """A raw WebSocket client whose connect command was accepted."""
    client = raw_client(srv)
    client.send({"id": 1, "connect": connect})
    reply = reply_to(client, 1)
    assert "connect" in reply, reply
    return client


def sdk(srv: ServerProcess, events: ClientEventHandler | None = None, **kw: Any) -> Client:
    return Client(
        srv.ws_url + "/connection/websocket",
        events=events,
        proxy=None,
        min_reconnect_delay=0.1,
        max_reconnect_delay=0.5,
        **kw,
    )


def assert_quiet_failures(srv: ServerProcess, fragment: str) -> None:
    """A backend failure is a WARNING naming it, never a traceback or an ERROR line."""
    deadline = time.monotonic() + TIMEOUT
    while fragment not in srv.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    logs = srv.logs()
    assert fragment in logs, logs[-4000:]
    line = next(line for line in logs.splitlines() if fragment in line)
    assert "WARNING" in line, line
    assert "Traceback" not in logs and " ERROR " not in logs, logs[-4000:]


# -- connect ----------------------------------------------------------------------


class Connected(ClientEventHandler):
    def __init__(self) -> None:
        self.connected: asyncio.Queue[ConnectedContext] = asyncio.Queue()

    async def on_connected(self, ctx: ConnectedContext) -> None:
        await self.connected.put(ctx)


def test_connect_user_info_and_data_from_the_backend(
    server_factory: Launcher, backend: Backend
) -> None:
    """centrifuge-python connects without a token; the backend names the user, the
    allowlisted header and cookie reach it (others don't), the static header too."""
    backend.answer(
        "connect",
        {"result": {"user": "56", "info": {"name": "Ann"}, "data": {"welcome": True}}},
    )
    srv = start(
        server_factory,
        backend,
        ("connect",),
        http_headers=["X-Allowed"],
        cookies=["session"],
        static_headers={"X-Proxy-Secret": "s3cret"},
        extra="[channels]\npresence = true\n",
    )
    channel = unique_channel("proxy")

    async def main() -> None:
        events, sub_events = Connected(), Events()
        headers = {
            "X-Allowed": "yes",
            "X-Other": "no",
            "Cookie": "tracking=xyz; session=abc",
        }
        client = sdk(srv, events, headers=headers, data={"hello": 1}, name="py-test")
        sub = client.new_subscription(channel, sub_events)
        await client.connect()
        ctx = await asyncio.wait_for(events.connected.get(), TIMEOUT)
        assert ctx.data == {"welcome": True}
        await sub.subscribe()
        await sub.ready(TIMEOUT)
        await sub.publish({"text": "hi"})
        pub = (await next_pub(sub_events)).pub
        assert pub.info is not None and pub.info.user == "56"
        presence = await sub.presence()
        [member] = presence.clients.values()
        assert member.user == "56" and member.conn_info == {"name": "Ann"}
        [seen] = backend.seen("connect")
        assert seen.body == {
            "client": client.client_id,
            "transport": "websocket",
            "protocol": "json",
            "encoding": "json",
            "name": "py-test",
            "data": {"hello": 1},
        }
        await client.disconnect()

    asyncio.run(main())
    headers = {k.lower(): v for k, v in backend.seen("connect")[0].headers.items()}
    assert headers["x-allowed"] == "yes"
    assert "x-other" not in headers
    assert headers["cookie"] == "session=abc"
    assert headers["x-proxy-secret"] == "s3cret"
    assert headers["content-type"] == "application/json"


def test_connect_with_a_token_does_not_ask_the_backend(
    server_factory: Launcher, backend: Backend
) -> None:
    """Centrifugo calls the connect proxy only for clients without a token."""
    backend.answer("connect", {"disconnect": {"code": 4501, "reason": "unauthorized"}})
    srv = start(server_factory, backend, ("connect",), extra=f'[auth]\nhmac_secret = "{SECRET}"\n')
    client = raw_client(srv)
    client.send({"id": 1, "connect": {"token": token("42")}})
    assert reply_to(client, 1)["connect"]["client"]
    anonymous = raw_client(srv)
    anonymous.send({"id": 1, "connect": {}})
    assert anonymous.read_until_closed() == 4501
    [asked] = backend.seen("connect")
    assert asked.body.get("transport") == "websocket", asked.body


def test_connect_refused_with_the_backends_error(
    server_factory: Launcher, backend: Backend
) -> None:
    backend.answer(
        "connect", {"error": {"code": 1000, "message": "custom error", "temporary": True}}
    )
    srv = start(server_factory, backend, ("connect",))
    client = raw_client(srv)
    client.send({"id": 1, "connect": {}})
    reply = reply_to(client, 1)
    assert reply["error"] == {"code": 1000, "message": "custom error", "temporary": True}


def test_connect_disconnect_answer_closes_with_its_code(
    server_factory: Launcher, backend: Backend
) -> None:
    backend.answer("connect", {"disconnect": {"code": 4501, "reason": "unauthorized"}})
    srv = start(server_factory, backend, ("connect",))
    client = raw_client(srv)
    client.send({"id": 1, "connect": {}})
    assert client.read_until_closed() == 4501
    assert client.protocol.close_rcvd is not None
    assert client.protocol.close_rcvd.reason == "unauthorized"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ({}, ("close", 3501)),  # Centrifugo's "no credentials": bad request
        ({"disconnect": {"code": 1000, "reason": "bye"}}, ("close", 3503)),
        ({"error": {"code": 5000, "message": "odd"}}, ("error", 103)),
    ],
    ids=["no result", "disconnect code out of range", "error code out of range"],
)
def test_connect_answers_tidings_cannot_take_as_they_are_fail_closed(
    server_factory: Launcher, backend: Backend, answer: dict[str, Any], expected: tuple[str, int]
) -> None:
    backend.answer("connect", answer)
    srv = start(server_factory, backend, ("connect",))
    client = raw_client(srv)
    client.send({"id": 1, "connect": {}})
    kind, code = expected
    if kind == "close":
        assert client.read_until_closed() == code
    else:
        assert reply_to(client, 1)["error"]["code"] == code
    assert "Traceback" not in srv.logs()


def test_connect_on_sse_and_poll(server_factory: Launcher, backend: Backend) -> None:
    """The HTTP transports ask the backend too; a refusal is a status, not a stream."""

    def decide(body: dict[str, Any]) -> dict[str, Any]:
        return {"result": {"user": "77"}}

    backend.answer("connect", decide)
    srv = start(server_factory, backend, ("connect",), cookies=["session"])
    channel = unique_channel("proxy")
    cookies = {"session": "abc", "other": "x"}
    response = httpx.get(
        f"{srv.url}/poll", params={"channel": channel}, cookies=cookies, timeout=TIMEOUT
    )
    assert response.status_code == 200, response.text
    [seen] = backend.wait_seen("connect")
    assert seen.body["transport"] == "poll" and seen.body["protocol"] == "json"
    assert "client" in seen.body
    assert {k.lower(): v for k, v in seen.headers.items()}["cookie"] == "session=abc"
    backend.answer("connect", {"error": {"code": 403, "message": "no session"}})
    with httpx.stream(
        "GET", f"{srv.url}/sse", params={"channel": channel}, timeout=TIMEOUT
    ) as stream:
        assert stream.status_code == 403
    assert backend.wait_seen("connect", 2)[1].body["transport"] == "sse"


def test_header_and_cookie_values_that_cannot_be_forwarded_are_left_out() -> None:
    """A header or cookie holding a control character aiohttp would refuse to
    send is left out, and the call still made. tidings' HTTP parser refuses
    such a request (400) before it gets here; a host ASGI server may not."""
    from tidings.config import ProxyConfig
    from tidings.hooks import ConnectCall
    from tidings.proxy import Proxy

    proxy = Proxy(ProxyConfig(http_headers=["X-Allowed", "X-Fine"], cookies=["a", "b"]))
    call = ConnectCall(
        transport="sse",
        protocol="http",
        client="",
        user="",
        headers={"x-allowed": "bad\x7fvalue", "x-fine": "tab\tok"},
        cookies={"a": "ok", "b": "bad\x00value"},
    )
    assert proxy._forwarded_headers(call) == {"x-fine": "tab\tok", "cookie": "a=ok"}


def test_sse_stream_subscribe_and_refresh_by_the_backend(
    server_factory: Launcher, backend: Backend
) -> None:
    """An SSE stream: connect, then subscribe for each channel (a refusal is a
    403 naming the backend's code), then refresh when the stream's expiry comes;
    ``expired`` ends the stream."""
    backend.answer("connect", lambda _: {"result": {"user": "56", "expire_at": int(time.time())}})

    def subscribe(body: dict[str, Any]) -> dict[str, Any]:
        if body["channel"].endswith("secret"):
            return {"error": {"code": 1403, "message": "not yours"}}
        return {"result": {}}

    backend.answer("subscribe", subscribe)
    backend.answer("refresh", {"result": {"expired": True}})
    srv = start(
        server_factory,
        backend,
        ("connect", "subscribe", "refresh"),
        extra="[sse]\nheartbeat_interval = 1.0\n",
    )
    channel = unique_channel("proxy")
    refused = httpx.get(f"{srv.url}/poll", params={"channel": channel + "secret"}, timeout=TIMEOUT)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == 1403
    with SSEClient(srv, [channel]) as stream:
        stream.subscribed()
        refresh = backend.wait_seen("refresh")[0].body
        assert refresh == {
            "client": "",
            "transport": "sse",
            "protocol": "json",
            "encoding": "json",
            "user": "56",
        }
        stream.expect_eof()
    subscribed = [r.body for r in backend.seen("subscribe")]
    assert subscribed[-1]["channel"] == channel and subscribed[-1]["transport"] == "sse"
    assert subscribed[-1]["user"] == "56"


# -- subscribe, publish, rpc ------------------------------------------------------


def test_subscribe_allowed_refused_and_namespaces_left_to_rules(
    server_factory: Launcher, backend: Backend
) -> None:
    def decide(body: dict[str, Any]) -> dict[str, Any]:
        if body["channel"].endswith("forbidden"):
            return {"error": {"code": 403, "message": "permission denied"}}
        return {"result": {"info": {"role": "reader"}}}

    backend.answer("subscribe", decide)
    srv = start(
        server_factory,
        backend,
        ("subscribe",),
        subscribe_namespaces=["guarded"],
        extra="[namespaces.guarded]\npresence = true\n[namespaces.open]\n",
    )
    client = connected_raw(srv)
    client.send(
        {"id": 2, "subscribe": {"channel": "guarded:room", "data": {"want": "in"}}},
        {"id": 3, "subscribe": {"channel": "guarded:forbidden"}},
        {"id": 4, "subscribe": {"channel": "open:room"}},
    )
    assert "subscribe" in reply_to(client, 2)
    assert reply_to(client, 3)["error"]["code"] == 403
    assert "subscribe" in reply_to(client, 4)
    bodies = [r.body for r in backend.seen("subscribe")]
    assert [b["channel"] for b in bodies] == ["guarded:room", "guarded:forbidden"]
    assert bodies[0]["data"] == {"want": "in"}
    assert bodies[0]["transport"] == "websocket" and bodies[0]["client"]
    # The result's info is this subscription's channel info, as presence shows it.
    client.send({"id": 5, "presence": {"channel": "guarded:room"}})
    [member] = reply_to(client, 5)["presence"]["presence"].values()
    assert member["chan_info"] == {"role": "reader"}


def test_subscribe_override_becomes_the_replys_presence_and_join_leave(backend: Backend) -> None:
    """The answer's ``override`` ({"value": bool} per option) reaches the reply
    the gate turns into the subscription's grant; an option left out stays None
    (the namespace decides). The proxy in this process, the backend over a socket."""
    from tidings.config import ProxyConfig
    from tidings.hooks import SubscribeCall, SubscribeReply
    from tidings.proxy import Proxy

    backend.answer(
        "subscribe",
        {"result": {"expire_at": 7, "override": {"presence": {"value": True}}}},
    )

    async def ask() -> SubscribeReply | None:
        proxy = Proxy(ProxyConfig(subscribe_url=backend.url("subscribe")))
        await proxy.start()
        try:
            call = SubscribeCall(
                transport="websocket", protocol="json", client="c1", user="u1", channel="room"
            )
            return await proxy.subscribe(call)
        finally:
            await proxy.close()

    reply = asyncio.run(ask())
    assert reply == SubscribeReply(info=None, expire_at=7, presence=True, join_leave=None)
    assert backend.seen("subscribe")[0].body == {
        "client": "c1",
        "transport": "websocket",
        "protocol": "json",
        "encoding": "json",
        "user": "u1",
        "channel": "room",
    }


def test_publish_data_replaced_by_the_backend(server_factory: Launcher, backend: Backend) -> None:
    def decide(body: dict[str, Any]) -> dict[str, Any]:
        if body["data"].get("text") == "spam":
            return {"error": {"code": 1001, "message": "spam"}}
        if body["data"].get("text") == "typing":
            return {"result": {"skip_history": True}}
        return {"result": {"data": {"text": body["data"]["text"].upper(), "checked": True}}}

    backend.answer("publish", decide)
    srv = start(server_factory, backend, ("publish",))
    channel = unique_channel("proxy")

    async def main() -> None:
        events = Events()
        client = sdk(srv)
        sub = client.new_subscription(channel, events)
        await client.connect()
        await sub.subscribe()
        await sub.ready(TIMEOUT)
        await sub.publish({"text": "hello"})
        pub = (await next_pub(events)).pub
        assert pub.data == {"text": "HELLO", "checked": True}
        with pytest.raises(ReplyError) as refused:
            await sub.publish({"text": "spam"})
        assert refused.value.code == 1001
        await sub.publish({"text": "typing"})  # delivered live, not kept
        assert (await next_pub(events)).pub.data == {"text": "typing"}
        history = await sub.history(limit=-1)
        assert [p.data for p in history.publications] == [{"text": "HELLO", "checked": True}]
        await client.disconnect()

    asyncio.run(main())
    body = backend.seen("publish")[0].body
    assert body["channel"] == channel and body["data"] == {"text": "hello"}


def test_rpc_answered_by_the_backend(server_factory: Launcher, backend: Backend) -> None:
    def decide(body: dict[str, Any]) -> dict[str, Any]:
        if body["method"] == "getCurrentPrice":
            return {"result": {"data": {"answer": "2019", "asked": body["data"]}}}
        return {"error": {"code": 404, "message": "no such method"}}

    backend.answer("rpc", decide)
    srv = start(server_factory, backend, ("rpc",))

    async def main() -> None:
        client = sdk(srv)
        await client.connect()
        await client.ready(TIMEOUT)
        result = await client.rpc("getCurrentPrice", {"params": {"object_id": 12}})
        assert result.data == {"answer": "2019", "asked": {"params": {"object_id": 12}}}
        with pytest.raises(ReplyError) as refused:
            await client.rpc("unknown", {})
        assert refused.value.code == 404
        await client.disconnect()

    asyncio.run(main())


def test_b64_fields_of_an_answer_are_decoded(server_factory: Launcher, backend: Backend) -> None:
    """``b64data`` answers (Centrifugo's binary mode) carry JSON too, and
    ``binary_encoding`` sends the client's data as ``b64data``."""
    answer = base64.b64encode(b'{"from": "b64"}').decode()
    backend.answer("rpc", {"result": {"b64data": answer}})
    srv = start(server_factory, backend, ("rpc",), binary_encoding=True)
    client = connected_raw(srv)
    client.send({"id": 2, "rpc": {"method": "m", "data": {"x": 1}}})
    assert reply_to(client, 2)["rpc"]["data"] == {"from": "b64"}
    body = backend.seen("rpc")[0].body
    assert body["encoding"] == "binary"
    assert json.loads(base64.b64decode(body["b64data"])) == {"x": 1}
    assert "data" not in body


# -- refresh, sub_refresh ---------------------------------------------------------

#: Lifetimes are enforced on a connection's ping turn: every second here, and a
#: raw client that never answers pings is not closed for it meanwhile.
QUICK_TURNS = "[websocket]\nping_interval = 1.0\npong_timeout = 60.0\n"


def test_refresh_by_the_backend_when_expire_at_comes(
    server_factory: Launcher, backend: Backend
) -> None:
    """The connection the backend gave an expiry is refreshed by asking it; when it
    answers ``expired`` the client is closed with 3005."""
    backend.answer("connect", lambda _: {"result": {"user": "56", "expire_at": int(time.time())}})

    def refresh(_body: dict[str, Any]) -> dict[str, Any]:
        if len(backend.seen("refresh")) == 1:  # this call is recorded before it is answered
            return {"result": {"expire_at": int(time.time()) + 2}}
        return {"result": {"expired": True}}

    backend.answer("refresh", refresh)
    srv = start(server_factory, backend, ("connect", "refresh"), extra=QUICK_TURNS)
    client = connected_raw(srv)
    client_id = backend.seen("connect")[0].body["client"]
    first = backend.wait_seen("refresh", 1)[0].body
    assert first == {
        "client": client_id,
        "transport": "websocket",
        "protocol": "json",
        "encoding": "json",
        "user": "56",
    }
    # Prolonged by the first answer: asked again only when that expiry comes.
    backend.wait_seen("refresh", 2, timeout=TIMEOUT + 5)
    assert client.read_until_closed() == 3005


def test_refresh_the_backend_fails_prolongs_the_connection(
    server_factory: Launcher, backend: Backend
) -> None:
    """As Centrifugo: a refresh call that fails gives the connection another
    minute (asked again then), rather than closing it or asking at every turn."""
    backend.answer("connect", lambda _: {"result": {"user": "56", "expire_at": int(time.time())}})
    backend.answer("refresh", Raw(500, b"down for maintenance"))
    srv = start(server_factory, backend, ("connect", "refresh"), extra=QUICK_TURNS)
    client = connected_raw(srv)
    backend.wait_seen("refresh")
    # Three ping turns later (each would have asked again): still one call, still open.
    pings_before = answered = sum(m == {} for m in client.messages())
    deadline = time.monotonic() + TIMEOUT
    while answered < pings_before + 3:
        assert time.monotonic() < deadline, list(client.messages())
        client.receive(deadline - time.monotonic())
        pings = sum(m == {} for m in client.messages())
        for _ in range(pings - answered):
            client.send({})  # the pong, as SDKs answer
        answered = pings
    assert len(backend.seen("refresh")) == 1
    assert client.protocol.close_rcvd is None
    assert_quiet_failures(srv, "refresh proxy call to")


def test_sub_refresh_by_the_backend(server_factory: Launcher, backend: Backend) -> None:
    channel = unique_channel("proxy")
    backend.answer("subscribe", lambda _: {"result": {"expire_at": int(time.time())}})
    backend.answer("sub_refresh", {"result": {"expired": True}})
    srv = start(server_factory, backend, ("subscribe", "sub_refresh"), extra=QUICK_TURNS)
    client = connected_raw(srv)
    client.send({"id": 2, "subscribe": {"channel": channel}})
    assert "subscribe" in reply_to(client, 2)
    body = backend.wait_seen("sub_refresh")[0].body
    assert body["channel"] == channel and body["client"]
    push = client.wait_for(lambda m: "unsubscribe" in m.get("push", {}))
    assert push["push"]["channel"] == channel
    assert push["push"]["unsubscribe"]["code"] == 2501


# -- a backend that fails ---------------------------------------------------------


def assert_token_client_served(srv: ServerProcess) -> None:
    """A client the backend is not asked about connects and receives publications."""
    channel = unique_channel("other")
    other = raw_client(srv)
    other.send(
        {"id": 1, "connect": {"token": token("7")}},
        {"id": 2, "subscribe": {"channel": channel}},
    )
    assert "connect" in reply_to(other, 1)
    assert "subscribe" in reply_to(other, 2)
    publish(srv, channel, {"n": 1})
    pub = other.wait_for(lambda m: "pub" in m.get("push", {}))
    assert pub["push"]["pub"]["data"] == {"n": 1}
    other.close()


AUTH = f'[auth]\nhmac_secret = "{SECRET}"\n'


def test_backend_down_is_a_temporary_error(server_factory: Launcher, backend: Backend) -> None:
    down = f"http://127.0.0.1:{free_port()}/connect"
    srv = server_factory(config=f'[proxy]\nconnect_url = "{down}"\n[hooks]\ntimeout = 5.0\n{AUTH}')
    client = raw_client(srv)
    client.send({"id": 1, "connect": {}})
    assert reply_to(client, 1)["error"] == {
        "code": 100,
        "message": "connect proxy unavailable",
        "temporary": True,
    }
    assert_token_client_served(srv)
    assert_quiet_failures(srv, "connect proxy call to")
    # A client repeating its connect as fast as it can does not flood the log.
    for attempt in range(30):
        client.send({"id": 2 + attempt, "connect": {}})
        assert reply_to(client, 2 + attempt)["error"]["code"] == 100
    assert srv.logs().count("connect proxy call to") <= 5


def test_backend_down_on_poll_and_sse_is_503_with_retry_after(server_factory: Launcher) -> None:
    """On the HTTP transports an unavailable backend is a 503 that clients retry,
    not a 500 (a bug) nor a refusal."""
    down = f"http://127.0.0.1:{free_port()}/connect"
    srv = server_factory(config=f'[proxy]\nconnect_url = "{down}"\n')
    channel = unique_channel("proxy")
    response = httpx.get(f"{srv.url}/poll", params={"channel": channel}, timeout=TIMEOUT)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == {"error": {"code": 100, "message": "connect proxy unavailable"}}
    with httpx.stream("GET", f"{srv.url}/sse", params={"channel": channel}, timeout=TIMEOUT) as sse:
        assert sse.status_code == 503
    assert_quiet_failures(srv, "connect proxy call to")


def test_backend_slow_past_the_timeout(server_factory: Launcher, backend: Backend) -> None:
    backend.answer("connect", Stall())
    srv = start(server_factory, backend, ("connect",), timeout=1.0, extra=AUTH)
    client = raw_client(srv)
    client.send({"id": 1, "connect": {}})
    backend.wait_seen("connect")
    # While the backend holds the call, another client is served.
    assert_token_client_served(srv)
    reply = reply_to(client, 1)
    assert reply["error"]["code"] == 100 and reply["error"]["temporary"] is True
    assert_quiet_failures(srv, "no answer within 1s")


def test_backend_trickling_its_answer_is_cut_at_the_timeout(
    server_factory: Launcher, backend: Backend
) -> None:
    """A backend answering a byte at a time (every read quick, the answer
    endless) is bounded by the timeout of the whole call, not of each read."""
    backend.answer("connect", Trickle())
    srv = start(server_factory, backend, ("connect",), timeout=1.0, extra=AUTH)
    client = raw_client(srv)
    client.send({"id": 1, "connect": {}})
    assert reply_to(client, 1)["error"]["code"] == 100
    assert_token_client_served(srv)
    assert_quiet_failures(srv, "no answer within 1s")


GARBAGE: dict[str, tuple[Raw | Huge, str]] = {
    "not JSON": (Raw(200, b"<html>oops</html>"), "not Centrifugo's connect response"),
    "HTTP 500": (Raw(500, b'{"result": {"user": "1"}}'), "HTTP status 500"),
    "wrong types": (Raw(200, b'{"result": {"user": 56}}'), "Expected `str`"),
    "bad base64": (Raw(200, b'{"result": {"user": "1", "b64info": "%%%"}}'), "b64info"),
    "a huge body": (Huge(64 * 1024 * 1024), "over proxy.max_response_size"),
}


@pytest.mark.parametrize("kind", GARBAGE)
def test_backend_garbage_is_a_temporary_error(
    server_factory: Launcher, backend: Backend, kind: str
) -> None:
    answer, logged = GARBAGE[kind]
    backend.answer("connect", answer)
    # Time enough to read the whole 64 MiB, were the size limit not enforced.
    srv = start(
        server_factory, backend, ("connect",), max_response_size=65536, timeout=4.0, extra=AUTH
    )
    before = rss_kib(srv)
    client = raw_client(srv)
    client.send({"id": 1, "connect": {}})
    reply = reply_to(client, 1)
    assert reply["error"]["code"] == 100 and reply["error"]["temporary"] is True
    # The 64 MiB body was not read: the server holds a few MiB more at most.
    assert rss_kib(srv) - before < 16 * 1024
    assert_token_client_served(srv)
    assert_quiet_failures(srv, logged)


def test_concurrent_calls_bounded_by_max_concurrency(
    server_factory: Launcher, backend: Backend
) -> None:
    """Thirty clients connect at once against a backend that holds every call:
    tidings keeps at most max_concurrency requests at the backend, the rest wait
    (within the timeout) and go through once it answers; others are served."""
    limit, clients_count = 4, 30
    backend.answer("connect", Stall())
    srv = start(
        server_factory,
        backend,
        ("connect",),
        max_concurrency=limit,
        timeout=8.0,
        hooks_timeout=10.0,
        extra=AUTH,
    )
    clients = [raw_client(srv) for _ in range(clients_count)]
    for client in clients:
        client.send({"id": 1, "connect": {}})
    backend.wait_seen("connect", limit)
    assert_token_client_served(srv)
    assert backend.max_in_flight == limit
    assert len(backend.seen("connect")) == limit
    backend.answer("connect", lambda body: {"result": {"user": body["client"][:8]}})
    backend.release()  # the held calls answer 503: their clients get code 100
    replies = [reply_to(client, 1) for client in clients]
    assert sum("connect" in r for r in replies) == clients_count - limit
    assert sum(r.get("error", {}).get("code") == 100 for r in replies) == limit
    assert backend.max_in_flight <= limit
    assert len(backend.seen("connect")) == clients_count
    assert_token_client_served(srv)
    for client in clients:
        client.close()


# -- configuration ----------------------------------------------------------------


def test_a_python_hook_and_a_proxy_url_for_one_decision_refuse_to_start() -> None:
    from tidings.config import Config, ProxyConfig
    from tidings.errors import ConfigError
    from tidings.hooks import Hooks
    from tidings.server import Server

    async def python_connect(call: Any) -> None:
        return None

    hooks = Hooks()
    hooks.connect = python_connect
    config = Config(proxy=ProxyConfig(connect_url="http://127.0.0.1:9/connect"))
    with pytest.raises(ConfigError, match="one decision has one owner"):
        Server(config, hooks=hooks)
    hooks.connect = None
    hooks.rpc_fallback = python_connect
    with pytest.raises(ConfigError, match=r"proxy\.rpc_url"):
        Server(Config(proxy=ProxyConfig(rpc_url="http://127.0.0.1:9/rpc")), hooks=hooks)


def test_proxy_timeout_not_below_hooks_timeout_is_a_config_error(
    server_factory: Launcher,
) -> None:
    config = (
        '[proxy]\nconnect_url = "http://127.0.0.1:9/c"\ntimeout = 5.0\n[hooks]\ntimeout = 5.0\n'
    )
    srv = server_factory(config=config, wait=False)
    assert srv.proc.wait(TIMEOUT) == 2
    assert "proxy.timeout (5s) must be below hooks.timeout (5s)" in srv.logs()
    bad_url = server_factory(config='[proxy]\nconnect_url = "ftp://x"\n', wait=False)
    assert bad_url.proc.wait(TIMEOUT) == 2
    assert "proxy.connect_url: an http:// or https:// URL" in bad_url.logs()


# -- centrifuge-js ----------------------------------------------------------------


@pytest.mark.parametrize("transport", ["websocket", "http_stream"])
def test_centrifuge_js_connects_and_calls_rpc_through_the_backend(
    server_factory: Launcher, backend: Backend, node_clients: list[NodeClient], transport: str
) -> None:
    """centrifuge-js over WebSocket and over its HTTP-streaming emulation."""
    backend.answer("connect", {"result": {"user": "js-user", "data": {"greeting": "hi"}}})
    backend.answer("rpc", lambda body: {"result": {"data": {"echo": body["data"]}}})
    srv = start(server_factory, backend, ("connect", "rpc"))
    channel = unique_channel("js")
    env = {"TIDINGS_JS_DATA": '{"a": 1}'}
    url = srv.ws_url + "/connection/websocket"
    if transport != "websocket":
        env["TIDINGS_JS_TRANSPORT"] = transport
        url = srv.url
    js = NodeClient(url, channel, env=env)
    node_clients.append(js)
    connected = js.wait(lambda e: e["event"] == "connected")
    assert connected["data"] == {"greeting": "hi"}
    js.command(cmd="rpc", method="echo", data={"b": 2})
    result = js.wait(lambda e: e["event"] == "rpc")
    assert result["data"] == {"echo": {"b": 2}}
    body = backend.seen("connect")[0].body
    assert body["data"] == {"a": 1} and body["name"] == "js"
    assert body["transport"] == transport
    assert backend.seen("rpc")[0].body["transport"] == transport
