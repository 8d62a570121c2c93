"""``POST /call/<name>``: rpc, publish, history, presence and presence_stats over plain HTTP.

The clients are httpx and curl (``--json``); the WebSocket side of the parity
tests is a raw Centrifugo client (``ws_support.RawClient``). A server with
Python hooks runs in this process (``hooks_support.hooked_server``), the others
are ``tidings serve`` processes. What the calls promise (docs/http-transports.md,
"Calls"):

- the same request and result objects as the Centrifugo commands, and for the
  same request the same error code as a WebSocket session gives;
- credentials read as the subscribe transports read them (Bearer, ``?token=``,
  the auth cookie), an anonymous client allowed where the namespace is open;
- a namespace rule for *subscribers* granted to a client that may subscribe
  (``?sub_token=`` honoured), nobody else;
- RPC through the application's handlers, with their refusals, failures and
  timeouts as HTTP statuses; a slow handler holds no other client;
- hostile bodies (too large, not JSON, not UTF-8, wrong types, another content
  type) refused with a precise status and code 107, nothing buffered past the
  limit, nothing published, no ERROR logged, others served meanwhile.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest

from conftest import ServerProcess
from helpers import (
    RawConn,
    SSEClient,
    api,
    pub_json,
    publish,
    request_bytes,
    rss_kib,
    unique_channel,
)
from hooks_support import Held, HookedServer, Recorder, hooked_server
from test_asgi import asgi  # noqa: F401  (the fixture)
from tidings.errors import ErrorCode
from tidings.hooks import Disconnect, Hooks, PublishCall, PublishReply, Refuse, RPCCall
from ws_support import RawClient

TIMEOUT = 10.0
SECRET = "test-secret-for-the-http-call-endpoints"

#: Namespaces whose publish, history and presence are for subscribers, each
#: open to a different kind of subscriber; ``public`` reads history for anyone
#: and is published to by nobody; ``quiet`` keeps no presence.
NAMESPACES = {
    "open": {"subscribe": "anonymous"},
    "members": {"subscribe": "authenticated"},
    "closed": {"subscribe": "token"},
}
CONFIG_TOML = f"""
[auth]
hmac_secret = "{SECRET}"
cookie = "session"

[namespaces.public]
subscribe = "authenticated"
history = "any"
publish = "nobody"
presence = true
presence_read = "any"

[namespaces.quiet]
subscribe = "anonymous"
publish = "subscribers"
""" + "".join(
    f"""
[namespaces.{name}]
subscribe = "{rule["subscribe"]}"
publish = "subscribers"
history = "subscribers"
presence = true
presence_read = "subscribers"
"""
    for name, rule in NAMESPACES.items()
)

HOOKED_CONFIG: dict[str, Any] = {
    "auth": {"hmac_secret": SECRET},
    "hooks": {"timeout": 1.0},
    "namespaces": {
        name: {**rule, "publish": "subscribers", "presence": True}
        for name, rule in NAMESPACES.items()
    },
}


def token(user: str, **claims: Any) -> str:
    return jwt.encode({"sub": user, **claims}, SECRET, algorithm="HS256")


def sub_token(user: str, channel: str, **claims: Any) -> str:
    return jwt.encode({"sub": user, "channel": channel, **claims}, SECRET, algorithm="HS256")


def call(
    srv: Any,
    name: str,
    body: Any,
    *,
    bearer: str | None = None,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    sent = dict(headers or {})
    if bearer is not None:
        sent["Authorization"] = f"Bearer {bearer}"
    return httpx.post(
        f"{srv.url}/call/{name}", json=body, params=params, headers=sent, timeout=TIMEOUT
    )


def error_of(resp: httpx.Response) -> tuple[int, int]:
    """``(HTTP status, error code)`` of a refused call, checking the body's shape."""
    assert resp.headers["content-type"] == "application/json", resp.headers
    body = resp.json()
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str), body
    return resp.status_code, body["error"]["code"]


def served(srv: Any) -> None:
    """Another client is served: an SSE subscriber of an open channel gets a publication."""
    channel = unique_channel("open:alive")
    with SSEClient(srv, [channel]) as sse:
        sse.subscribed()
        sent = publish(srv, channel, {"ok": True})
        pub = pub_json(sse.publications(1)[0])
        assert (pub["offset"], pub["data"]) == (sent["offset"], {"ok": True})


@pytest.fixture(scope="module")
def srv(module_server_factory: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    server = module_server_factory(config=CONFIG_TOML)
    yield server
    assert "Traceback" not in server.logs(), server.logs()


# -- the calls work ------------------------------------------------------------------


def test_publish_reaches_subscribers_and_history_returns_it(srv: ServerProcess) -> None:
    channel = unique_channel("members:")
    alice = token("alice")
    with SSEClient(srv, [channel], extra_params=[("token", alice)]) as sse:
        sse.subscribed()
        resp = call(srv, "publish", {"channel": channel, "data": {"text": "hi"}}, bearer=alice)
        assert (resp.status_code, resp.json()) == (200, {}), resp.text
        pub = pub_json(sse.publications(1)[0])
        assert pub["data"] == {"text": "hi"}
        assert pub["info"]["user"] == "alice"  # the publisher, as Centrifugo's pushes carry it
    history = call(srv, "history", {"channel": channel, "limit": -1}, bearer=alice)
    assert history.status_code == 200, history.text
    body = history.json()
    assert set(body) == {"publications", "epoch", "offset"}
    assert [p["data"] for p in body["publications"]] == [{"text": "hi"}]
    assert body["offset"] == pub["offset"] and body["epoch"] == pub["epoch"]
    assert body["publications"][0]["info"]["user"] == "alice"


def test_history_since_limit_and_reverse(srv: ServerProcess) -> None:
    channel = unique_channel("public:")
    sent = [publish(srv, channel, {"n": n}) for n in range(5)]
    epoch = sent[0]["epoch"]
    alice = token("alice")

    def read(**request: Any) -> list[int]:
        resp = call(srv, "history", {"channel": channel, **request}, bearer=alice)
        assert resp.status_code == 200, resp.text
        return [p["data"]["n"] for p in resp.json()["publications"]]

    assert read(limit=-1) == [0, 1, 2, 3, 4]
    assert read(limit=2) == [0, 1]
    assert read(limit=0) == []  # only the stream's position, as Centrifugo
    assert read(limit=2, reverse=True) == [4, 3]
    assert read(limit=-1, since={"offset": sent[2]["offset"], "epoch": epoch}) == [3, 4]
    other_epoch = call(
        srv, "history", {"channel": channel, "since": {"offset": 1, "epoch": "x"}}, bearer=alice
    )
    assert error_of(other_epoch) == (400, 112)


def test_presence_and_stats_list_the_websocket_subscribers(srv: ServerProcess) -> None:
    channel = unique_channel("members:")
    ws = RawClient(srv.ws_url)
    try:
        ws.send({"id": 1, "connect": {"token": token("bob", info={"name": "Bob"})}})
        ws.send({"id": 2, "subscribe": {"channel": channel}})
        ws.wait_for(lambda m: m.get("id") == 2 and "subscribe" in m)
        resp = call(srv, "presence", {"channel": channel}, bearer=token("alice"))
        assert resp.status_code == 200, resp.text
        (entry,) = resp.json()["presence"].values()
        assert entry["user"] == "bob" and entry["conn_info"] == {"name": "Bob"}
        stats = call(srv, "presence_stats", {"channel": channel}, bearer=token("alice"))
        assert stats.json() == {"num_clients": 1, "num_users": 1}
    finally:
        ws.close()
    off = call(srv, "presence", {"channel": unique_channel("quiet:")})
    assert error_of(off) == (404, 108)


def test_curl_publishes_and_reads_history(srv: ServerProcess) -> None:
    channel = unique_channel("public:")
    publish(srv, channel, {"from": "api"})
    out = subprocess.run(
        ["curl", "-sS", "--json", json.dumps({"channel": channel, "limit": -1}),
         "-H", f"Authorization: Bearer {token('carol')}", f"{srv.url}/call/history"],
        capture_output=True, timeout=30, check=True,
    )  # fmt: skip
    assert [p["data"] for p in json.loads(out.stdout)["publications"]] == [{"from": "api"}]
    # curl -d sends application/x-www-form-urlencoded: refused, told why.
    refused = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", "-d", json.dumps({"channel": channel}),
         f"{srv.url}/call/history"],
        capture_output=True, timeout=30, check=True,
    )  # fmt: skip
    body, status = refused.stdout.rsplit(b"\n", 1)
    assert status == b"415" and json.loads(body)["error"]["code"] == 107


# -- credentials and the "subscribers" rules ------------------------------------------


@pytest.mark.parametrize("how", ["bearer", "query", "cookie"])
def test_credentials_are_read_as_the_subscribe_transports_read_them(
    srv: ServerProcess, how: str
) -> None:
    channel = unique_channel("members:")
    publish(srv, channel, {"x": 1})
    alice = token("alice")
    ways: dict[str, dict[str, Any]] = {
        "bearer": {"bearer": alice},
        "query": {"params": {"token": alice}},
        "cookie": {"headers": {"Cookie": f"other=1; session={alice}"}},
    }
    where = ways[how]
    assert call(srv, "history", {"channel": channel}, **where).status_code == 200
    # Without credentials the namespace (for users) is closed to the caller: 403.
    assert error_of(call(srv, "history", {"channel": channel})) == (403, 103)


def test_anonymous_client_is_a_subscriber_where_anyone_may_subscribe(srv: ServerProcess) -> None:
    channel = unique_channel("open:")
    with SSEClient(srv, [channel]) as sse:
        sse.subscribed()
        assert call(srv, "publish", {"channel": channel, "data": [1]}).status_code == 200
        pub = pub_json(sse.publications(1)[0])
        assert pub["data"] == [1] and "info" not in pub  # no identity to show
    assert call(srv, "history", {"channel": channel}).status_code == 200
    assert call(srv, "presence_stats", {"channel": channel}).status_code == 200


def test_sub_token_makes_a_subscriber_of_a_token_namespace(srv: ServerProcess) -> None:
    channel = unique_channel("closed:")
    alice = token("alice")
    assert error_of(call(srv, "history", {"channel": channel}, bearer=alice)) == (403, 103)
    granted = {"sub_token": sub_token("alice", channel)}
    assert (
        call(srv, "history", {"channel": channel}, bearer=alice, params=granted).status_code == 200
    )
    published = call(srv, "publish", {"channel": channel, "data": 1}, bearer=alice, params=granted)
    assert published.status_code == 200
    # A token of another channel or user is invalid, not merely insufficient (401).
    other = {"sub_token": sub_token("alice", channel + "x")}
    assert error_of(call(srv, "history", {"channel": channel}, bearer=alice, params=other)) == (
        401,
        101,
    )
    expired = {"sub_token": sub_token("alice", channel, exp=int(time.time()) - 60)}
    assert error_of(call(srv, "history", {"channel": channel}, bearer=alice, params=expired)) == (
        401,
        109,
    )


def test_rules_that_do_not_ask_for_a_subscriber(srv: ServerProcess) -> None:
    channel = unique_channel("public:")
    # history = "any": no token needed even though subscribing needs a user.
    assert call(srv, "history", {"channel": channel}).status_code == 200
    assert call(srv, "presence", {"channel": channel}).status_code == 200
    # publish = "nobody": a user who may subscribe still may not publish.
    refused = call(srv, "publish", {"channel": channel, "data": 1}, bearer=token("alice"))
    assert error_of(refused) == (403, 103)
    assert api(srv, "history", {"channel": channel}).json()["result"]["publications"] == []


def test_bad_tokens_and_unknown_namespaces(srv: ServerProcess) -> None:
    channel = unique_channel("members:")
    assert error_of(call(srv, "history", {"channel": channel}, bearer="not.a.jwt")) == (401, 101)
    expired = token("alice", exp=int(time.time()) - 60)
    assert error_of(call(srv, "history", {"channel": channel}, bearer=expired)) == (401, 109)
    unknown = call(srv, "history", {"channel": "nowhere:x"}, bearer=token("alice"))
    assert error_of(unknown) == (404, 102)


#: Requests whose WebSocket error code the HTTP call must give too: (call, body,
#: whether the caller holds alice's token).
SAME_AS_WEBSOCKET = [
    ("history", {"channel": "nowhere:x"}, True),  # 102
    ("history", {"channel": "bad name"}, True),  # 107
    ("history", {"channel": "members:{ch}"}, False),  # 103: not a subscriber
    ("publish", {"channel": "public:{ch}", "data": 1}, True),  # 103: nobody
    ("publish", {"channel": "members:{ch}"}, True),  # 107: no data
    ("presence", {"channel": "quiet:{ch}"}, True),  # 108: presence off
    ("presence_stats", {"channel": "closed:{ch}"}, True),  # 103: a token namespace
    ("rpc", {"method": "nothing"}, True),  # 108: no handler
    ("history", {"channel": "public:{ch}", "since": {"offset": 1, "epoch": "x"}}, True),  # 112
]


@pytest.mark.parametrize(("name", "template", "user"), SAME_AS_WEBSOCKET)
def test_the_same_error_code_as_a_websocket_session(
    srv: ServerProcess, name: str, template: dict[str, Any], user: bool
) -> None:
    suffix = unique_channel("")
    body = json.loads(json.dumps(template).replace("{ch}", suffix))
    if "since" in body:
        publish(srv, body["channel"], "an epoch to differ from")
    ws = RawClient(srv.ws_url)
    try:
        ws.send({"id": 1, "connect": {"token": token("alice")} if user else {}})
        ws.send({"id": 2, name: body})
        reply = ws.wait_for(lambda m: m.get("id") == 2)
    finally:
        ws.close()
    assert "error" in reply, reply
    resp = call(srv, name, body, bearer=token("alice") if user else None)
    assert error_of(resp)[1] == reply["error"]["code"], (resp.text, reply)


# -- RPC and the hooks ----------------------------------------------------------------


@pytest.fixture
def hooks() -> Hooks:
    return Hooks(timeout=1.0)


@pytest.fixture
def hooked(hooks: Hooks) -> Iterator[HookedServer]:
    with hooked_server(hooks, HOOKED_CONFIG) as server:
        yield server


def test_rpc_reaches_the_handler_with_who_asks(hooks: Hooks, hooked: HookedServer) -> None:
    seen = Recorder()

    async def add(rpc: RPCCall) -> Any:
        seen.add(rpc)
        args = rpc.data_json()
        return {"sum": args["a"] + args["b"]}

    async def refuse(rpc: RPCCall) -> Any:
        raise Refuse(1001, "not today")

    async def broken(rpc: RPCCall) -> Any:
        raise RuntimeError("the application's bug")

    async def leave(rpc: RPCCall) -> Any:
        raise Disconnect(4500, "go away")

    async def throttle(rpc: RPCCall) -> Any:
        raise Refuse(ErrorCode.TOO_MANY_REQUESTS, "slow down")

    hooks.rpc = {
        "add": add,
        "refuse": refuse,
        "broken": broken,
        "leave": leave,
        "throttle": throttle,
    }
    resp = call(hooked, "rpc", {"method": "add", "data": {"a": 2, "b": 3}}, bearer=token("ann"))
    assert (resp.status_code, resp.json()) == (200, {"data": {"sum": 5}})
    (rpc,) = seen.items
    assert (rpc.transport, rpc.protocol, rpc.client, rpc.user) == ("http", "http", "", "ann")
    assert error_of(call(hooked, "rpc", {"method": "missing"})) == (404, 108)
    assert error_of(call(hooked, "rpc", {"method": "refuse"})) == (403, 1001)
    assert error_of(call(hooked, "rpc", {"method": "broken"})) == (500, 100)
    assert error_of(call(hooked, "rpc", {"method": "leave"})) == (403, 4500)
    assert error_of(call(hooked, "rpc", {"method": "throttle"})) == (429, 111)


def test_slow_rpc_times_out_503_and_holds_no_other_client(
    hooks: Hooks, hooked: HookedServer
) -> None:
    held = Held(hooked)

    async def slow(rpc: RPCCall) -> Any:
        await held.wait()
        return "late"

    async def fast(rpc: RPCCall) -> Any:
        return "quick"

    hooks.rpc = {"slow": slow, "fast": fast}
    answers: list[httpx.Response] = []
    waiting = threading.Thread(
        target=lambda: answers.append(call(hooked, "rpc", {"method": "slow"}))
    )
    waiting.start()
    try:
        assert held.waiting.wait(TIMEOUT)
        # While the slow handler runs, others are answered.
        assert call(hooked, "rpc", {"method": "fast"}).json() == {"data": "quick"}
        served(hooked)
        waiting.join(TIMEOUT)
        (answer,) = answers
        assert error_of(answer) == (503, 100)
        assert answer.headers["retry-after"] == "1"
    finally:
        held.release()
        waiting.join(TIMEOUT)


def test_publish_hook_sees_the_call_and_may_replace_the_data(
    hooks: Hooks, hooked: HookedServer
) -> None:
    seen = Recorder()

    async def on_publish(publishing: PublishCall) -> PublishReply:
        seen.add(publishing)
        return PublishReply(data={"checked": publishing.data_json()})

    hooks.publish = on_publish
    channel = unique_channel("closed:")  # the hook decides, whatever the namespace says
    resp = call(hooked, "publish", {"channel": channel, "data": {"x": 1}}, bearer=token("ann"))
    assert resp.status_code == 200, resp.text
    (publishing,) = seen.items
    assert (publishing.transport, publishing.user, publishing.channel) == ("http", "ann", channel)
    (stored,) = api(hooked, "history", {"channel": channel, "limit": -1}).json()["result"][
        "publications"
    ]
    assert stored["data"] == {"checked": {"x": 1}}


def test_the_subscribe_hook_decides_who_counts_as_a_subscriber(
    hooks: Hooks, hooked: HookedServer
) -> None:
    asked = Recorder()

    async def on_subscribe(subscribing: Any) -> Any:
        asked.add(subscribing)
        if subscribing.user != "ann":
            raise Refuse()
        from tidings.hooks import SubscribeReply

        return SubscribeReply()

    hooks.subscribe = on_subscribe
    channel = unique_channel("members:")
    assert call(hooked, "history", {"channel": channel}, bearer=token("ann")).status_code == 200
    assert error_of(call(hooked, "history", {"channel": channel}, bearer=token("bob"))) == (
        403,
        103,
    )
    assert [(c.transport, c.user, c.channel) for c in asked.items] == [
        ("http", "ann", channel),
        ("http", "bob", channel),
    ]


# -- hostile bodies ---------------------------------------------------------------------


def test_refused_bodies_get_400_and_code_107(srv: ServerProcess) -> None:
    channel = unique_channel("open:")

    def send(body: bytes, content_type: str = "application/json") -> tuple[int, int]:
        resp = httpx.post(
            f"{srv.url}/call/publish",
            content=body,
            headers={"Content-Type": content_type},
            timeout=TIMEOUT,
        )
        return error_of(resp)

    assert send(b"{not json") == (400, 107)
    assert send(b"") == (400, 107)
    assert send(b"[1, 2]") == (400, 107)
    assert send(json.dumps({"channel": 5, "data": 1}).encode()) == (400, 107)
    assert send(json.dumps({"channel": channel}).encode()) == (400, 107)  # no data
    assert send(b'{"channel": "' + channel.encode() + b'", "data": "\xff\xfe"}') == (400, 107)
    assert send(b'{"channel": "x", "data": "\\ud800"}') == (400, 107)  # a lone surrogate
    assert send(b"[" * 100_000 + b"]" * 100_000) == (400, 107)  # nested past msgspec's depth
    assert send(json.dumps({"channel": channel, "data": 1}).encode(), "text/plain") == (415, 107)
    # Nothing of it was published.
    assert api(srv, "history", {"channel": channel}).json()["result"]["publications"] == []
    detail = httpx.post(
        f"{srv.url}/call/publish",
        content=b'{"channel": "a", "data": {"t": "\xc3\x28"}}',
        headers={"Content-Type": "application/json"},
    ).json()["error"]["message"]
    assert "UTF-8" in detail and "data" in detail
    served(srv)


def test_not_a_call_is_404_and_a_get_is_405(srv: ServerProcess) -> None:
    assert error_of(call(srv, "subscribe", {"channel": "open:x"})) == (404, 104)
    assert error_of(call(srv, "connect", {})) == (404, 104)
    got = httpx.get(f"{srv.url}/call/history", timeout=TIMEOUT)
    assert got.status_code == 405 and "POST" in got.headers["allow"]


def test_huge_bodies_are_refused_before_they_are_buffered(srv: ServerProcess) -> None:
    """An announced 1 GiB body is 413 at once; a chunked body is cut off at the limit
    (1 MiB by default), after at most that was read: the server's RSS does not grow
    by what the clients sent."""
    before = rss_kib(srv)
    with RawConn(srv) as conn:
        conn.send(
            request_bytes(
                "POST",
                "/call/publish",
                headers={"Content-Type": "application/json", "Content-Length": str(1 << 30)},
            )
        )
        refused = conn.read_response()
        assert refused.status == 413 and refused.json()["error"]["code"] == 107
    chunk = b"x" * 65536
    sent = 0
    with socket.create_connection((srv.host, srv.port), timeout=TIMEOUT) as sock:
        sock.sendall(
            b"POST /call/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        answer = b""
        try:
            while sent < 64 << 20 and not answer:  # 64 MiB offered, until the answer comes
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                if select.select([sock], [], [], 0)[0]:
                    answer = sock.recv(65536)
        except OSError:
            pass  # cut off
        sock.settimeout(TIMEOUT)
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # Refused at the limit: what was sent past it sat in the sockets' buffers.
    assert sent < 16 << 20, f"answered after {sent >> 20} MiB"
    grown = rss_kib(srv) - before
    assert grown < 8 * 1024, f"RSS grew by {grown} KiB"
    served(srv)


def test_client_mistakes_log_below_error_without_traceback(
    hooks: Hooks, hooked: HookedServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="tidings"):
        call(hooked, "history", {"channel": 5})
        call(hooked, "history", {"channel": "members:x"})
        call(hooked, "rpc", {"method": "none"})
        httpx.post(
            f"{hooked.url}/call/rpc", content=b"\xff", headers={"Content-Type": "application/json"}
        )
    mine = [r for r in caplog.records if r.name == "tidings.transports.calls"]
    assert mine, "the refusals are logged"
    assert all(r.levelno < logging.ERROR and r.exc_info is None for r in caplog.records), [
        (r.name, r.levelname, r.getMessage()) for r in caplog.records
    ]


# -- CORS -----------------------------------------------------------------------------


def test_cors_preflight_and_answer(server_factory: Callable[..., ServerProcess]) -> None:
    srv = server_factory(config='allowed_origins = ["https://app.example"]\n')
    preflight = httpx.options(
        f"{srv.url}/call/rpc",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 204
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert preflight.headers["access-control-allow-headers"] == "authorization, content-type"
    answer = call(
        srv, "history", {"channel": unique_channel()}, headers={"Origin": "https://app.example"}
    )
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == "https://app.example"
    assert answer.headers["access-control-allow-credentials"] == "true"
    foreign = httpx.options(
        f"{srv.url}/call/rpc",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert foreign.status_code == 403


# -- behind an ASGI server ---------------------------------------------------------------


@pytest.mark.parametrize("app", ["asgi_app:app", "asgi_app:host"])
def test_calls_under_uvicorn(asgi: Callable[..., ServerProcess], app: str) -> None:  # noqa: F811
    """``ASGIApp`` and ``rt.asgi()`` (a host app around it) serve the calls, bounds included."""
    srv = asgi(app=app)
    channel = unique_channel()
    published = call(srv, "publish", {"channel": channel, "data": {"via": "asgi"}})
    assert (published.status_code, published.json()) == (200, {}), published.text
    history = call(srv, "history", {"channel": channel, "limit": -1})
    assert [p["data"] for p in history.json()["publications"]] == [{"via": "asgi"}]
    assert error_of(call(srv, "rpc", {"method": "none"})) == (404, 108)
    huge = httpx.post(
        f"{srv.url}/call/publish",
        content=b"x" * (2 << 20),
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert huge.status_code == 413


# -- metrics -------------------------------------------------------------------------------


def test_calls_are_timed_and_their_errors_counted_as_client_commands(srv: ServerProcess) -> None:
    """A call is a client command in ``/metrics``: its duration under its name, an
    error under its name and code, as a WebSocket session's command would be."""

    def scrape() -> dict[str, float]:
        samples: dict[str, float] = {}
        for line in httpx.get(f"{srv.url}/metrics", timeout=TIMEOUT).text.splitlines():
            if line.startswith(("centrifugo_client_command_duration_seconds_count",
                                "centrifugo_client_num_reply_errors")):  # fmt: skip
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples

    count = 'centrifugo_client_command_duration_seconds_count{method="presence_stats"}'
    errors = 'centrifugo_client_num_reply_errors{code="103",method="presence_stats"}'
    before = scrape()
    channel = unique_channel("members:")
    assert call(srv, "presence_stats", {"channel": channel}, bearer=token("a")).status_code == 200
    assert error_of(call(srv, "presence_stats", {"channel": channel})) == (403, 103)
    after = scrape()
    assert after[count] - before.get(count, 0) == 2
    assert after[errors] - before.get(errors, 0) == 1
