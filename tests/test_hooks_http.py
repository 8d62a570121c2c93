"""The application's hooks on the HTTP transports: SSE, long-poll and poll.

Each server is a :func:`hooks_support.hooked_server` (the hooks are Python
callables in this process); clients are httpx (SSE streamed, long-poll and
poll), raw sockets where a test plays a client that stops reading, and once
the browser's own ``EventSource`` in headless Chromium, let in by a session
cookie the ``connect`` hook reads. What the hooks saw is recorded in a
:class:`hooks_support.Recorder` and waited on with a deadline.

What these transports add to the hooks' common rules (docs/hooks.md):

- ``connect`` runs once per SSE stream and once per poll request (transport
  ``longpoll`` for a poll with a cursor and a timeout above 0, else ``poll``):
  there is no connection between polls to remember its answer by;
- ``Refuse(code)`` is that code with the HTTP status it maps to (an
  application code 400-1999: 403), ``Disconnect(code, reason)`` is 403 with
  its code and reason, a hook that raises is 500 (code 100), one past its
  timeout 503 with ``Retry-After`` (code 100);
- an SSE stream whose ``expire_at`` (from the connect hook) came is put to the
  ``refresh`` hook; every SSE stream that ends is a ``disconnect`` event with
  a code that says why; polls, having no connection, have no disconnect event.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

import tidings.transports.common as common
import tidings.transports.sse as sse_module
from helpers import (
    Event as SSEEvent,
)
from helpers import (
    SSEClient,
    api,
    poll,
    pub_json,
    publish,
    request_bytes,
    unique_channel,
    wait_subscribers,
)
from hooks_support import Held, HookedServer, Recorder, hooked_server
from tidings.cursor import encode_cursor
from tidings.errors import ErrorCode
from tidings.hooks import (
    ConnectCall,
    ConnectReply,
    Disconnect,
    DisconnectEvent,
    Event,
    Hooks,
    RefreshCall,
    RefreshReply,
    Refuse,
    SubscribeCall,
    SubscribeReply,
)
from tidings.hub import Position
from tidings.transports.common import parse_cookies

TIMEOUT = 10.0
SECRET = "test-secret-for-the-http-hooks-tests"

#: Heartbeats (and so expiry checks) every 0.2 s; namespaces open to anyone,
#: to users only, and to subscription tokens only (a deferring hook leaves it
#: closed). Outside them (no ``:``) the default namespace, for users only.
CONFIG: dict[str, Any] = {
    "sse": {"heartbeat_interval": 0.2},
    "auth": {"hmac_secret": SECRET, "expiry_grace": 0},
    "limits": {"max_write_buffer": 65536},
    "namespaces": {
        "open": {"subscribe": "anonymous"},
        "members": {"subscribe": "authenticated"},
        "closed": {"subscribe": "token"},
    },
}

TRANSPORTS = ["sse", "longpoll", "poll"]


@pytest.fixture
def hooks() -> Hooks:
    return Hooks(timeout=2.0)


@pytest.fixture
def events(hooks: Hooks) -> Recorder:
    """Every disconnect event, as the application's ``on_disconnect`` receives it."""
    recorder = Recorder()

    async def on_disconnect(event: Event) -> None:
        recorder.add(event)

    hooks.on("disconnect", on_disconnect)
    return recorder


@pytest.fixture
def srv(hooks: Hooks) -> Iterator[HookedServer]:
    with hooked_server(hooks, CONFIG) as server:
        yield server


# -- clients -------------------------------------------------------------------


@dataclass
class Answer:
    """What one SSE, long-poll or poll request was answered: the status, and the
    error body or the publications (poll) when there is one."""

    status: int
    headers: httpx.Headers
    body: Any = None

    @property
    def error(self) -> dict[str, Any]:
        assert self.status != 200, self
        error: dict[str, Any] = self.body["error"]
        return error


def cursor_before_last(srv: HookedServer, channels: list[str]) -> str:
    """A cursor one publication behind each channel's head: a long-poll with it
    is answered at once (with that publication), yet is a long-poll."""
    positions = {}
    for channel in channels:
        publish(srv, channel, {"before": True})
        head = publish(srv, channel, {"last": True})
        positions[channel] = Position(head["epoch"], head["offset"] - 1)
    return encode_cursor(positions)


def ask(
    srv: HookedServer,
    transport: str,
    channels: list[str],
    headers: list[tuple[str, str]] | None = None,
) -> Answer:
    """One request of ``transport`` for ``channels``; an SSE stream is read up to
    its ``subscribed`` event, then closed."""
    params: list[tuple[str, Any]] = [("channel", channel) for channel in channels]
    with httpx.Client(timeout=TIMEOUT) as client:
        if transport == "sse":
            with client.stream("GET", f"{srv.url}/sse", params=params, headers=headers) as resp:
                if resp.status_code != 200:
                    resp.read()
                    return Answer(resp.status_code, resp.headers, resp.json())
                text = ""
                for chunk in resp.iter_text():
                    text += chunk
                    if "event: subscribed" in text:
                        return Answer(200, resp.headers)
                raise AssertionError(f"SSE stream ended before its subscribed event: {text!r}")
        if transport == "longpoll":
            params += [("cursor", cursor_before_last(srv, channels)), ("timeout", "5")]
        else:
            params.append(("timeout", "0"))
        resp = client.get(f"{srv.url}/poll", params=params, headers=headers)
        return Answer(resp.status_code, resp.headers, resp.json())


def until_eof(client: SSEClient, timeout: float = TIMEOUT) -> list[SSEEvent]:
    """The blocks an SSE stream sends until the server ends it, within ``timeout``
    (heartbeats every 0.2 s would keep a read timeout from ever firing)."""
    deadline = time.monotonic() + timeout
    got: list[SSEEvent] = []
    while time.monotonic() < deadline:
        try:
            got.append(client.next())
        except EOFError:
            return got
    raise AssertionError(f"the stream was not ended in {timeout}s: {[e.raw for e in got[-3:]]}")


def token(user: str, **claims: Any) -> str:
    return jwt.encode({"sub": user, **claims}, SECRET, algorithm="HS256")


def assert_others_served(srv: HookedServer) -> None:
    """A client the hooks let in is served: an SSE subscriber of an open channel
    gets a publication, and a poll answers."""
    channel = unique_channel("open:alive")
    with SSEClient(srv, [channel]) as client:
        client.subscribed()
        sent = publish(srv, channel, {"ok": True})
        body = pub_json(client.publications(1)[0])
        assert (body["offset"], body["data"]) == (sent["offset"], {"ok": True})
    assert poll(srv, [channel], timeout=0).status_code == 200


def session_hook(calls: Recorder, sessions: dict[str, str]) -> Any:
    """A connect hook that names the user of the ``session`` cookie, or has no opinion."""

    async def on_connect(call: ConnectCall) -> ConnectReply | None:
        calls.add(call)
        user = sessions.get(call.cookies.get("session", ""))
        return ConnectReply(user=user) if user else None

    return on_connect


# -- connect -------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_connect_hook_sees_the_request_and_names_the_user(
    hooks: Hooks, srv: HookedServer, transport: str
) -> None:
    """The hook gets the request's headers (lower-cased, repeats joined), its
    cookies (a malformed third-party cookie first does not hide the session),
    the peer; the user it names is the one the rules see: a channel limited
    to that user (``dialog#alice,...``) opens, and stays closed to others."""
    calls = Recorder()
    hooks.connect = session_hook(calls, {"s-alice": "alice", "s-carol": "carol"})
    dialog = f"dialog#alice,{unique_channel('u')}"
    cookie = 'tracker="a"b; ; session=s-alice'
    alice = ask(
        srv,
        transport,
        [dialog],
        headers=[("Cookie", cookie), ("X-Tag", "one"), ("X-Tag", "two")],
    )
    assert alice.status == 200, alice
    (call,) = calls.items
    assert (call.transport, call.protocol, call.client, call.user) == (transport, "http", "", "")
    assert call.cookies["session"] == "s-alice"
    assert call.headers["x-tag"] == "one, two"
    assert call.headers["cookie"] == cookie
    assert all(name == name.lower() for name in call.headers)
    assert call.remote == "127.0.0.1"
    assert call.data is None and call.data_json() is None

    carol = ask(srv, transport, [dialog], headers=[("Cookie", "session=s-carol")])
    assert (carol.status, carol.error["code"]) == (403, ErrorCode.PERMISSION_DENIED)
    nobody = ask(srv, transport, [dialog])
    assert nobody.status in (401, 403) and nobody.status != 200


def test_connect_hook_named_user_is_the_streams_user(hooks: Hooks, srv: HookedServer) -> None:
    """An SSE stream belongs to the user the hook named: the server API's
    ``disconnect`` of that user reaches it, with the code and reason given."""
    hooks.connect = session_hook(Recorder(), {"s-alice": "alice"})
    channel = unique_channel("members:")
    with SSEClient(srv, [channel], extra_headers={"Cookie": "session=s-alice"}) as client:
        client.subscribed()
        resp = api(
            srv, "disconnect", {"user": "alice", "disconnect": {"code": 4002, "reason": "x"}}
        )
        assert resp.status_code == 200, resp.text
        ends = until_eof(client)
        (disconnect,) = [ev for ev in ends if ev.event == "disconnect"]
        assert disconnect.json == {"code": 4002, "reason": "x"}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_connect_reply_channels_may_be_followed_without_a_token(
    hooks: Hooks, srv: HookedServer, transport: str
) -> None:
    """The reply's ``channels`` open even a token-only namespace, as a token's
    ``channels`` claim does; nothing else in it does."""
    granted, other = unique_channel("closed:granted"), unique_channel("closed:other")

    async def on_connect(call: ConnectCall) -> ConnectReply | None:
        return ConnectReply(user="", channels=[granted])

    hooks.connect = on_connect
    assert ask(srv, transport, [granted]).status == 200
    refused = ask(srv, transport, [granted, other])
    assert (refused.status, refused.error["code"]) == (403, ErrorCode.PERMISSION_DENIED)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_token_user_reaches_the_hook_and_a_bad_token_never_does(
    hooks: Hooks, srv: HookedServer, transport: str
) -> None:
    """The call's ``user`` is the verified token's; a hook with no opinion
    leaves the token's identity; an invalid token is refused before any hook."""
    calls = Recorder()
    hooks.connect = session_hook(calls, {})
    channel = f"dialog#42,{unique_channel('u')}"
    answer = ask(srv, transport, [channel], headers=[("Authorization", f"Bearer {token('42')}")])
    assert answer.status == 200, answer
    assert [call.user for call in calls.items] == ["42"]
    forged = jwt.encode(
        {"sub": "42"}, "another secret, long enough for HS256 keys", algorithm="HS256"
    )
    refused = ask(srv, transport, [channel], headers=[("Authorization", f"Bearer {forged}")])
    assert (refused.status, refused.error["code"]) == (401, ErrorCode.UNAUTHORIZED)
    assert len(calls.items) == 1


REFUSALS = [
    pytest.param(Refuse(1403, "log in first"), 403, 1403, "log in first", id="app-code"),
    pytest.param(Refuse(ErrorCode.UNAUTHORIZED), 401, 101, "unauthorized", id="unauthorized"),
    pytest.param(Disconnect(4403, "banned"), 403, 4403, "banned", id="disconnect"),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("raised", "status", "code", "message"), REFUSALS)
def test_connect_refused_with_a_code(
    hooks: Hooks,
    srv: HookedServer,
    transport: str,
    raised: Exception,
    status: int,
    code: int,
    message: str,
) -> None:
    """A refusal is the JSON error body with the code and message the hook gave,
    under the status its code maps to; clients the hook lets in are served."""

    async def on_connect(call: ConnectCall) -> ConnectReply | None:
        if call.headers.get("x-refuse"):
            raise raised
        return None

    hooks.connect = on_connect
    answer = ask(srv, transport, [unique_channel("open:")], headers=[("X-Refuse", "1")])
    assert answer.status == status, answer
    assert answer.headers["content-type"] == "application/json"
    assert answer.body == {"error": {"code": code, "message": message}}
    assert_others_served(srv)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_connect_hook_raising_is_an_internal_error_for_that_request_only(
    hooks: Hooks, srv: HookedServer, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def on_connect(call: ConnectCall) -> ConnectReply | None:
        if call.headers.get("x-bug"):
            raise KeyError("the application's bug")
        return None

    hooks.connect = on_connect
    answer = ask(srv, transport, [unique_channel("open:")], headers=[("X-Bug", "1")])
    assert (answer.status, answer.error["code"]) == (500, ErrorCode.INTERNAL)
    assert "bug" not in answer.error["message"]  # the application's details stay in its log
    assert any("connect hook failed" in r.getMessage() and r.exc_info for r in caplog.records)
    assert_others_served(srv)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_connect_hook_timing_out_is_a_503_with_retry_after(
    hooks: Hooks, srv: HookedServer, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    """503, not 500: the application is slow, not broken, and a retry may pass;
    ``Retry-After`` is what tidings.js and proxies wait on (a 500 reads as a bug)."""
    held = Held(srv)

    async def on_connect(call: ConnectCall) -> ConnectReply | None:
        if call.headers.get("x-slow"):
            await held.wait()
        return None

    hooks.connect = on_connect
    hooks.timeout = 0.3
    answer = ask(srv, transport, [unique_channel("open:")], headers=[("X-Slow", "1")])
    assert (answer.status, answer.error["code"]) == (503, ErrorCode.INTERNAL)
    assert answer.headers["retry-after"] == "1"
    assert answer.error["message"] == "connect hook timed out"
    (record,) = [r for r in caplog.records if "timed out" in r.getMessage()]
    assert record.levelname == "WARNING" and record.exc_info is None
    assert held.inside == 0  # the hook was cancelled, not left running
    assert_others_served(srv)


def test_slow_connect_hook_does_not_hold_other_sse_subscribers(
    hooks: Hooks, srv: HookedServer
) -> None:
    held = Held(srv)

    async def on_connect(call: ConnectCall) -> ConnectReply | None:
        if call.headers.get("x-slow"):
            await held.wait()
            return ConnectReply(user="slow")
        return None

    hooks.connect = on_connect
    hooks.timeout = 30.0
    channel = unique_channel("members:")
    fast_channel = unique_channel("open:")
    slow_answer: list[SSEClient] = []
    with SSEClient(srv, [fast_channel]) as fast:
        fast.subscribed()
        opener = threading.Thread(
            target=lambda: slow_answer.append(
                SSEClient(srv, [channel], extra_headers={"X-Slow": "1"})
            )
        )
        opener.start()
        assert held.waiting.wait(TIMEOUT)
        for n in range(3):  # the hook is still waiting: the other stream is served all along
            publish(srv, fast_channel, {"n": n})
            assert pub_json(fast.publications(1)[0])["data"] == {"n": n}
        assert held.inside == 1
        held.release()
        opener.join(TIMEOUT)
        with slow_answer[0] as slow:
            slow.subscribed()
            publish(srv, channel, {"late": True})
            assert pub_json(slow.publications(1)[0])["data"] == {"late": True}


def test_long_poll_held_after_the_hook_let_it_in(hooks: Hooks, srv: HookedServer) -> None:
    """A long-poll the hook let in is held like any other, and answered by the next
    publication; the hook ran once, as ``longpoll``."""
    calls = Recorder()
    hooks.connect = session_hook(calls, {"s-alice": "alice"})
    channel = unique_channel("members:")
    head = publish(srv, channel, {"n": 0})
    cursor = encode_cursor({channel: Position(head["epoch"], head["offset"])})
    answers: list[httpx.Response] = []
    with httpx.Client(cookies={"session": "s-alice"}) as client:
        waiter = threading.Thread(
            target=lambda: answers.append(poll(srv, [channel], cursor, 5, client=client))
        )
        waiter.start()
        wait_subscribers(srv, channel)
        publish(srv, channel, {"n": 1})
        waiter.join(TIMEOUT)
    (answer,) = answers
    assert answer.status_code == 200, answer.text
    assert [pub["data"] for pub in answer.json()["publications"]] == [{"n": 1}]
    assert [(call.transport, call.cookies["session"]) for call in calls.items] == [
        ("longpoll", "s-alice")
    ]


def test_without_hooks_no_call_is_built(srv: HookedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Zero cost without hooks: no call object, no copy of the headers, on any
    transport (the benchmark's figures are in the commit that made this so)."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a hook's call was built with no hook registered")

    monkeypatch.setattr(common, "connect_call", forbidden)
    monkeypatch.setattr(common, "_subscribe_call", forbidden)
    for transport in TRANSPORTS:
        channel = unique_channel("open:")
        assert ask(srv, transport, [channel], headers=[("Cookie", "a=b")]).status == 200


# -- subscribe -----------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_subscribe_hook_allows_refuses_and_defers(
    hooks: Hooks, srv: HookedServer, transport: str
) -> None:
    """Per channel no token grants: a reply opens even a token-only namespace,
    ``Refuse`` closes it with its code, ``None`` leaves it to the namespace."""
    calls = Recorder()

    async def on_subscribe(call: SubscribeCall) -> SubscribeReply | None:
        calls.add(call)
        verdict = call.channel.split(":")[1].split("-")[0]
        if verdict == "refuse":
            raise Refuse(1404, "no such room")
        if verdict == "bye":
            raise Disconnect(4404, "go away")
        if verdict == "allow":
            return SubscribeReply()
        return None

    hooks.subscribe = on_subscribe
    suffix = unique_channel("-")
    allowed = ask(srv, transport, [f"closed:allow{suffix}"])
    assert allowed.status == 200, allowed
    (call,) = calls.items
    assert (call.channel, call.transport, call.protocol, call.client, call.user, call.data) == (
        f"closed:allow{suffix}",
        transport,
        "http",
        "",
        "",
        None,
    )
    refused = ask(srv, transport, [f"open:fine{suffix}", f"closed:refuse{suffix}"])
    assert refused.status == 403
    assert refused.body == {"error": {"code": 1404, "message": "no such room"}}
    deferred_closed = ask(srv, transport, [f"closed:defer{suffix}"])
    assert (deferred_closed.status, deferred_closed.error["code"]) == (403, 103)
    assert ask(srv, transport, [f"open:defer{suffix}"]).status == 200
    gone = ask(srv, transport, [f"closed:bye{suffix}"])
    assert gone.status == 403
    assert gone.body == {"error": {"code": 4404, "message": "go away"}}
    asked = [call.channel.split(":")[1].split("-")[0] for call in calls.items]
    assert asked == ["allow", "fine", "refuse", "defer", "defer", "bye"]


def test_subscribe_hook_sees_the_connect_hooks_user(hooks: Hooks, srv: HookedServer) -> None:
    calls = Recorder()
    hooks.connect = session_hook(Recorder(), {"s-alice": "alice"})

    async def on_subscribe(call: SubscribeCall) -> SubscribeReply | None:
        calls.add(call)
        return SubscribeReply() if call.user == "alice" else None

    hooks.subscribe = on_subscribe
    channel = unique_channel("closed:")
    assert ask(srv, "sse", [channel], headers=[("Cookie", "session=s-alice")]).status == 200
    assert ask(srv, "poll", [channel]).status == 403
    assert [call.user for call in calls.items] == ["alice", ""]


# -- SSE disconnect events -------------------------------------------------------


def disconnects(events: Recorder, user: str, n: int = 1) -> list[DisconnectEvent]:
    """The first ``n`` disconnect events of ``user``, waited for."""
    mine = events.wait_for(lambda got: sum(ev.user == user for ev in got) >= n)
    found = [ev for ev in mine if ev.user == user]
    assert all(ev.transport == "sse" and ev.client == "" for ev in found), found
    return found


def open_stream(srv: HookedServer, user: str, channel: str) -> SSEClient:
    client = SSEClient(srv, [channel], extra_headers={"Cookie": f"session=s-{user}"})
    client.subscribed()
    return client


@pytest.fixture
def named(hooks: Hooks) -> None:
    """The connect hook names user X for the cookie ``session=s-X``."""

    async def on_connect(call: ConnectCall) -> ConnectReply | None:
        session = call.cookies.get("session", "")
        return ConnectReply(user=session[2:]) if session.startswith("s-") else None

    hooks.connect = on_connect


@pytest.mark.usefixtures("named")
def test_disconnect_event_when_the_client_goes_away(srv: HookedServer, events: Recorder) -> None:
    user = unique_channel("u")
    client = open_stream(srv, user, unique_channel("open:"))
    assert events.items == []
    client.close()
    (event,) = disconnects(events, user)
    assert (event.code, event.reason) == (3000, "connection closed")


@pytest.mark.usefixtures("named")
def test_disconnect_event_of_the_server_api(srv: HookedServer, events: Recorder) -> None:
    user = unique_channel("u")
    channel = unique_channel("open:")
    with open_stream(srv, user, channel) as client:
        params = {"user": user, "disconnect": {"code": 4321, "reason": "moderated"}}
        assert api(srv, "disconnect", params).status_code == 200
        until_eof(client)
    (event,) = disconnects(events, user)
    assert (event.code, event.reason) == (4321, "moderated")
    with open_stream(srv, user, channel) as client:
        assert api(srv, "unsubscribe", {"user": user, "channel": channel}).status_code == 200
        assert [ev.event for ev in until_eof(client) if ev.event and not ev.is_ping] == [
            "unsubscribed"
        ]
    second = disconnects(events, user, 2)[1]
    assert (second.code, second.reason) == (3011, "server unsubscribe")


@pytest.mark.usefixtures("named")
def test_disconnect_event_when_the_connection_expires(
    hooks: Hooks, srv: HookedServer, events: Recorder
) -> None:
    """Without a ``refresh`` hook, a stream the connect hook gave an expiry ends
    at it (after the token grace, 0 here) with a ``disconnect`` event, 3005."""

    async def on_connect(call: ConnectCall) -> ConnectReply | None:
        return ConnectReply(user="brief", expire_at=int(time.time()) + 1)

    hooks.connect = on_connect
    with SSEClient(srv, [unique_channel("open:")]) as client:
        client.subscribed()
        ends = until_eof(client)
    assert [ev.json for ev in ends if ev.event == "disconnect"] == [
        {"code": 3005, "reason": "connection expired"}
    ]
    (event,) = disconnects(events, "brief")
    assert (event.code, event.reason) == (3005, "connection expired")


@pytest.mark.usefixtures("named")
def test_disconnect_event_when_a_channel_skipped(srv: HookedServer, events: Recorder) -> None:
    """A channel's live stream skipped (a remote broker lost part of it: the hub
    tells each subscriber, as done here from the server's loop): the stream ends
    so that the client resumes from its last id, and the event says 3010."""
    user = unique_channel("u")
    with open_stream(srv, user, unique_channel("open:")) as client:
        (stream,) = srv.server.hub.clients_of(user)
        srv.loop.call_soon_threadsafe(stream.insufficient_state)  # type: ignore[attr-defined]
        until_eof(client)
    (event,) = disconnects(events, user)
    assert (event.code, event.reason) == (3010, "insufficient state")


def test_disconnect_event_at_shutdown(hooks: Hooks, events: Recorder) -> None:
    async def on_connect(call: ConnectCall) -> ConnectReply | None:
        return ConnectReply(user="leaving")

    hooks.connect = on_connect
    with hooked_server(hooks, CONFIG) as server:
        client = open_stream(server, "leaving", unique_channel("open:"))
    try:
        (event,) = disconnects(events, "leaving")
        assert (event.code, event.reason) == (3001, "shutdown")
    finally:
        client.close()


@pytest.mark.usefixtures("named")
def test_disconnect_event_of_a_slow_reader(srv: HookedServer, events: Recorder) -> None:
    """A subscriber that stops reading is cut off past ``limits.max_write_buffer``
    (64 KiB here) and its event says so: 3008."""
    user = unique_channel("u")
    channel = unique_channel("open:")
    host, port = srv.url.removeprefix("http://").split(":")
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.settimeout(TIMEOUT)
    slow.connect((host, int(port)))
    try:
        slow.sendall(
            request_bytes("GET", f"/sse?channel={channel}", headers={"Cookie": f"session=s-{user}"})
        )
        head = b""
        while b"event: subscribed" not in head:
            head += slow.recv(4096)
        pad = "x" * 100_000
        for n in range(60):  # 6 MB at most: past kernel buffers and max_write_buffer
            publish(srv, channel, {"n": n, "pad": pad})
            if any(ev.user == user for ev in events.items):
                break
        (event,) = disconnects(events, user)
        assert (event.code, event.reason) == (3008, "slow")
    finally:
        slow.close()
    assert_others_served(srv)


# -- refresh by hook -------------------------------------------------------------


def expiring_connect(user: str = "alice") -> Any:
    async def on_connect(call: ConnectCall) -> ConnectReply | None:
        return ConnectReply(user=user, expire_at=int(time.time()))

    return on_connect


def test_refresh_hook_extends_an_sse_stream(hooks: Hooks, srv: HookedServer) -> None:
    calls = Recorder()

    async def on_refresh(call: RefreshCall) -> RefreshReply | None:
        calls.add(call)
        return RefreshReply(expire_at=int(time.time()) + 3600)

    hooks.connect = expiring_connect()
    hooks.refresh = on_refresh
    channel = unique_channel("open:")
    with SSEClient(srv, [channel]) as client:
        client.subscribed()
        (call,) = calls.wait_for(lambda got: len(got) >= 1)
        assert (call.transport, call.protocol, call.client, call.user) == (
            "sse",
            "http",
            "",
            "alice",
        )
        heartbeats = 0
        while heartbeats < 3:  # three heartbeats later the stream is still open...
            heartbeats += bool(client.next().is_ping)
        publish(srv, channel, {"still": "here"})  # ...and delivering
        assert pub_json(client.publications(1)[0])["data"] == {"still": "here"}
    assert len(calls.items) == 1  # extended: not asked again


@pytest.mark.parametrize(
    ("answer", "code", "reason"),
    [
        pytest.param(RefreshReply(expired=True), 3005, "connection expired", id="expired"),
        pytest.param(None, 3005, "connection expired", id="no-opinion"),
        pytest.param(Refuse(), 3005, "connection expired", id="refused"),
        pytest.param(Disconnect(4100, "session revoked"), 4100, "session revoked", id="disconnect"),
    ],
)
def test_refresh_hook_ends_an_sse_stream(
    hooks: Hooks,
    srv: HookedServer,
    events: Recorder,
    answer: Any,
    code: int,
    reason: str,
) -> None:
    async def on_refresh(call: RefreshCall) -> RefreshReply | None:
        if isinstance(answer, Exception):
            raise answer
        reply: RefreshReply | None = answer
        return reply

    hooks.connect = expiring_connect("ending")
    hooks.refresh = on_refresh
    with SSEClient(srv, [unique_channel("open:")]) as client:
        client.subscribed()
        ends = until_eof(client)
    assert [ev.json for ev in ends if ev.event == "disconnect"] == [
        {"code": code, "reason": reason}
    ]
    (event,) = disconnects(events, "ending")
    assert (event.code, event.reason) == (code, reason)


def test_refresh_hook_failing_is_asked_again_and_the_stream_kept(hooks: Hooks) -> None:
    """A refresh hook that raises is a fault of the application, not a verdict:
    within ``auth.expiry_grace`` the stream stays and the hook is asked again
    at a later heartbeat."""
    calls = Recorder()

    async def on_refresh(call: RefreshCall) -> RefreshReply | None:
        calls.add(call)
        if len(calls.items) < 3:
            raise RuntimeError("the session store is down")
        return RefreshReply(expire_at=int(time.time()) + 3600)

    hooks.connect = expiring_connect()
    hooks.refresh = on_refresh
    channel = unique_channel("open:")
    graceful = {**CONFIG, "auth": {"hmac_secret": SECRET, "expiry_grace": 60}}
    with hooked_server(hooks, graceful) as srv, SSEClient(srv, [channel]) as client:
        client.subscribed()
        calls.wait_for(lambda got: len(got) >= 3)
        publish(srv, channel, {"kept": True})
        assert pub_json(client.publications(1)[0])["data"] == {"kept": True}


def test_refresh_hook_failing_past_the_grace_ends_the_stream(
    hooks: Hooks, srv: HookedServer, events: Recorder
) -> None:
    """...but not for ever: past the grace (0 here) a failed refresh ends it, 3005."""

    async def on_refresh(call: RefreshCall) -> RefreshReply | None:
        raise RuntimeError("the session store is down")

    hooks.connect = expiring_connect("failing")
    hooks.refresh = on_refresh
    with SSEClient(srv, [unique_channel("open:")]) as client:
        client.subscribed()
        ends = until_eof(client)
    assert [ev.json for ev in ends if ev.event == "disconnect"] == [
        {"code": 3005, "reason": "connection expired"}
    ]
    (event,) = disconnects(events, "failing")
    assert event.code == 3005


def test_refresh_calls_in_flight_are_bounded(
    hooks: Hooks, srv: HookedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However many streams expire together, at most ``MAX_REFRESHING`` refresh
    calls run at once (2 here, for 6 streams, with a hook that hangs); the
    others wait, still served, and are asked once the hook answers."""
    monkeypatch.setattr(sse_module, "MAX_REFRESHING", 2)
    held = Held(srv)
    calls = Recorder()

    async def on_refresh(call: RefreshCall) -> RefreshReply | None:
        calls.add(call)
        await held.wait()
        return RefreshReply(expire_at=int(time.time()) + 3600)

    hooks.connect = expiring_connect()
    hooks.refresh = on_refresh
    hooks.timeout = 60.0
    channel = unique_channel("open:")
    clients = [SSEClient(srv, [channel]) for _ in range(6)]
    try:
        for client in clients:
            client.subscribed()
        calls.wait_for(lambda got: len(got) >= 2)
        heartbeats = 0
        while heartbeats < 5:  # five heartbeats, each of which finds 6 expired streams
            heartbeats += bool(clients[-1].next().is_ping)
        assert (len(calls.items), held.inside) == (2, 2)
        publish(srv, channel, {"served": True})
        for client in clients:
            assert pub_json(client.publications(1)[0])["data"] == {"served": True}
        held.release()
        calls.wait_for(lambda got: len(got) >= 6)
        assert len(srv.server.sse.streams) == 6
    finally:
        for client in clients:
            client.close()


@pytest.mark.usefixtures("named")
def test_server_api_refresh_of_an_sse_stream(
    hooks: Hooks, srv: HookedServer, events: Recorder
) -> None:
    """The server API's ``refresh`` (``rt.refresh``) reaches a user's SSE streams:
    an expiry in the past ends them at the next heartbeat, ``expired`` at once."""
    user = unique_channel("u")
    with open_stream(srv, user, unique_channel("open:")) as client:
        params = {"user": user, "expire_at": int(time.time()) - 1}
        assert api(srv, "refresh", params).status_code == 200
        ends = until_eof(client)
    assert [ev.json for ev in ends if ev.event == "disconnect"] == [
        {"code": 3005, "reason": "connection expired"}
    ]
    with open_stream(srv, user, unique_channel("open:")) as client:
        assert api(srv, "refresh", {"user": user, "expired": True}).status_code == 200
        until_eof(client)
    assert [(ev.code, ev.reason) for ev in disconnects(events, user, 2)] == [
        (3005, "connection expired")
    ] * 2


# -- cookies -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "cookies"),
    [
        ("session=abc", {"session": "abc"}),
        ('tracker="a"b; session=abc', {"tracker": '"a"b', "session": "abc"}),
        ("a=1;;session=2", {"a": "1", "session": "2"}),
        ("a b=1; session=2", {"a b": "1", "session": "2"}),
        ("flag; session=2", {"session": "2"}),
        ('quoted="a\\054b"', {"quoted": "a,b"}),
        ("x=1; x=2", {"x": "2"}),
        ('t={"a":1}; s=v=w', {"t": '{"a":1}', "s": "v=w"}),
    ],
)
def test_cookies_are_read_as_browsers_send_them(header: str, cookies: dict[str, str]) -> None:
    """Not as ``http.cookies.SimpleCookie`` reads them: it drops every cookie after
    one it dislikes, which would hide a session behind a third-party cookie."""
    assert parse_cookies(header) == cookies


def test_the_auth_cookie_is_found_behind_a_malformed_one(srv: HookedServer) -> None:
    """The connection token's cookie is read by the same rule as the hook's."""
    channel = f"dialog#7,{unique_channel('u')}"
    cookie = f'tracker="a"b;; tidings_token={token("7")}'
    assert ask(srv, "poll", [channel], headers=[("Cookie", cookie)]).status == 200


# -- the browser ---------------------------------------------------------------


@pytest.mark.browser
def test_eventsource_in_chromium_is_let_in_by_its_session_cookie(
    hooks: Hooks, srv: HookedServer, tmp_path: Path
) -> None:
    """The browser's own EventSource, with the session cookie it holds for the
    site: the connect hook reads it and names the user, whose channel opens."""
    from browser_support import launch_browser

    calls = Recorder()

    async def on_connect(call: ConnectCall) -> ConnectReply | None:
        calls.add(call)
        if call.cookies.get("session") == "s-alice":
            return ConnectReply(user="alice")
        raise Refuse(1401, "no session")

    hooks.connect = on_connect
    channel = f"dialog#alice,{unique_channel('u')}"
    with launch_browser(tmp_path) as context:
        context.add_cookies([{"name": "session", "value": "s-alice", "url": srv.url}])
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.goto(srv.url + "/health")
        page.evaluate(
            """(channel) => {
                window.got = []; window.subscribed = false;
                const source = new EventSource('/sse?channel=' + encodeURIComponent(channel));
                source.addEventListener('subscribed', () => { window.subscribed = true; });
                source.onmessage = (e) => window.got.push(JSON.parse(e.data));
                window.source = source;
            }""",
            channel,
        )
        page.wait_for_function("() => window.subscribed")
        publish(srv, channel, {"hello": "alice"})
        page.wait_for_function("() => window.got.length >= 1")
        got = page.evaluate("() => window.got")
        page.evaluate("() => window.source.close()")
    assert [pub["data"] for pub in got] == [{"hello": "alice"}]
    call = calls.items[0]
    assert (call.transport, call.cookies.get("session")) == ("sse", "s-alice")
    assert "chrome" in call.headers["user-agent"].lower()
