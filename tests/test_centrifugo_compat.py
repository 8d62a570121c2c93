"""Centrifugo compatibility (issue 13, items 1 and 5): what the SDKs and ``cent`` rely on.

Against a real server, with clients we did not write where they exist —
centrifuge-python, ``cent`` (Centrifugo's API client), httpx and the
``websockets`` sans-I/O client (``RawClient``) to see the exact replies; the
centrifuge-js cases are in ``test_websocket_js.py``:

* zero values present: ``num_clients``/``num_users`` 0, ``presence: {}``,
  ``publications: []`` with epoch and offset, on the client protocol and the
  server API; a presence entry's ``user`` is ``""`` for an anonymous client;
* a connection token without ``sub`` (or with an empty one) is an anonymous
  user authenticated by its token; a subscription token likewise;
* a subscription token that does not verify fails that subscribe with 103
  and the connection stays; an expired one is 109; one for another user or
  channel still closes 3500; an invalid connection token closes 3500, an
  expired one is error 109;
* server-side subscriptions: the personal channel (``personal:#<user>``) and
  ``force_push_join_leave`` (a client hears its own join);
* ``POST /api/batch``, sequential and parallel, bounded.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from cent import (
    BatchRequest,
    HistoryRequest,
    PresenceRequest,
    PresenceStatsRequest,
    PublishRequest,
)
from cent import (
    Client as CentClient,
)
from cent.exceptions import CentTransportError
from centrifuge import (
    Client,
    ClientEventHandler,
    ConnectedContext,
    JoinContext,
    ServerPublicationContext,
    ServerSubscribedContext,
    SubscriptionEventHandler,
    UnsubscribedContext,
)

from helpers import TIMEOUT, api, check_serving, publish, rss_kib, unique_channel
from tidings.auth import Access, Credentials
from tidings.client import calls
from tidings.client.api import APIError, HistoryResult, PublishResult, SyncAPIClient
from tidings.config import ConfigError, load_config
from ws_support import RawClient

SECRET = "compat-test-secret-of-sufficient-length"
MAX_BATCH = 5

CONFIG = f"""
[auth]
hmac_secret = "{SECRET}"

[limits]
max_batch_commands = {MAX_BATCH}

[channels]
subscribe = "anonymous"

[namespaces.room]
subscribe = "anonymous"
publish = "any"
presence = true
presence_read = "any"
history = "any"
join_leave = true

[namespaces.loud]
subscribe = "anonymous"
presence = true
join_leave = true
force_push_join_leave = true

[namespaces.members]

[namespaces.private]
subscribe = "token"

[namespaces.personal]

[client.subscribe_to_user_personal_channel]
enabled = true
personal_channel_namespace = "personal"
"""


def token(claims: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode({"exp": int(time.time()) + 600, **claims}, secret, algorithm="HS256")


@pytest.fixture(scope="module")
def srv(module_server_factory: Any) -> Iterator[Any]:
    server = module_server_factory(CONFIG)
    yield server
    logs = server.logs()
    assert "Traceback" not in logs, logs[-8000:]


@pytest.fixture
def raw(srv: Any) -> Iterator[list[RawClient]]:
    clients: list[RawClient] = []
    yield clients
    for client in clients:
        client.close()


def ws(srv: Any, clients: list[RawClient], connect: dict[str, Any] | None = None) -> RawClient:
    """A raw client that sent ``connect`` (not yet read)."""
    client = RawClient(srv.ws_url)
    clients.append(client)
    client.send({"id": 1, "connect": connect or {}})
    return client


def reply(client: RawClient, cmd_id: int, **request: Any) -> dict[str, Any]:
    client.send({"id": cmd_id, **request})
    return client.wait_for(lambda m: m.get("id") == cmd_id)


def connected(srv: Any, clients: list[RawClient], token_: str | None = None) -> dict[str, Any]:
    client = ws(srv, clients, {"token": token_} if token_ else {})
    return client.wait_for(lambda m: m.get("id") == 1)


# --------------------------------------------------------------------------- zero values


def test_zero_values_are_present_in_client_protocol_replies(srv: Any, raw: list[RawClient]) -> None:
    client = ws(srv, raw)
    empty = f"room:{unique_channel()}"
    stats = reply(client, 2, presence_stats={"channel": empty})
    assert stats == {"id": 2, "presence_stats": {"num_clients": 0, "num_users": 0}}
    presence = reply(client, 3, presence={"channel": empty})
    assert presence == {"id": 3, "presence": {"presence": {}}}
    history = reply(client, 4, history={"channel": empty, "limit": -1})["history"]
    assert set(history) == {"publications", "epoch", "offset"}
    assert history["publications"] == [] and history["offset"] == 0
    # An anonymous client's presence entry says user "", as Centrifugo's ClientInfo does.
    reply(client, 5, subscribe={"channel": empty})
    entries = reply(client, 6, presence={"channel": empty})["presence"]["presence"]
    (entry,) = entries.values()
    assert entry["user"] == "" and entry["client"]


def test_zero_values_are_present_in_server_api_answers(srv: Any) -> None:
    empty = f"room:{unique_channel()}"
    stats = api(srv, "presence_stats", {"channel": empty}).json()
    assert stats == {"result": {"num_clients": 0, "num_users": 0}}
    assert api(srv, "presence", {"channel": empty}).json() == {"result": {"presence": {}}}
    history = api(srv, "history", {"channel": empty, "limit": -1}).json()["result"]
    assert set(history) == {"publications", "epoch", "offset"}
    assert history["publications"] == [] and history["offset"] == 0


def test_cent_reads_zero_values_and_anonymous_presence(srv: Any, raw: list[RawClient]) -> None:
    empty = f"room:{unique_channel()}"
    cent = CentClient(srv.url + "/api", api_key="")
    stats = cent.presence_stats(PresenceStatsRequest(channel=empty))
    assert (stats.num_clients, stats.num_users) == (0, 0)
    assert cent.presence(PresenceRequest(channel=empty)).presence == {}
    assert cent.history(HistoryRequest(channel=empty, limit=-1)).publications == []
    client = ws(srv, raw)
    reply(client, 2, subscribe={"channel": empty})
    (info,) = cent.presence(PresenceRequest(channel=empty)).presence.values()
    assert info.user == ""


# --------------------------------------------------------------------------- tokens


@pytest.mark.parametrize("claims", [{}, {"sub": ""}], ids=["no sub", "empty sub"])
def test_a_connection_token_without_sub_is_an_anonymous_user(
    srv: Any, raw: list[RawClient], claims: dict[str, Any]
) -> None:
    granted = f"private:{unique_channel()}"
    connect = connected(srv, raw, token({**claims, "channels": [granted]}))
    # Its claims hold (a server-side subscription to a token-only channel)...
    assert granted in connect["connect"]["subs"] and connect["connect"]["expires"] is True
    client = raw[-1]
    # ...and it is anonymous: a namespace for authenticated users stays closed to it.
    refused = reply(client, 2, subscribe={"channel": f"members:{unique_channel()}"})
    assert refused["error"]["code"] == 103
    # A subscription token without sub is the same anonymous user's.
    private = f"private:{unique_channel()}"
    sub = reply(client, 3, subscribe={"channel": private, "token": token({"channel": private})})
    assert "subscribe" in sub, sub


def test_centrifuge_python_connects_with_a_token_without_sub(srv: Any) -> None:
    async def main() -> None:
        client = Client(srv.ws_url + "/connection/websocket", token=token({}), proxy=None)
        try:
            await client.connect()
            await client.ready(TIMEOUT)
            assert client.client_id
        finally:
            await client.disconnect()

    asyncio.run(main())


SUB_TOKEN_ANSWERS = {
    "wrong signature": (lambda ch: token({"sub": "u1", "channel": ch}, "x" * 40), "error 103"),
    "garbage": (lambda ch: "not-a-token", "error 103"),
    "expired": (
        lambda ch: token({"sub": "u1", "channel": ch, "exp": int(time.time()) - 600}),
        "error 109",
    ),
    "another user's": (lambda ch: token({"sub": "u2", "channel": ch}), "close 3500"),
    "another channel's": (lambda ch: token({"sub": "u1", "channel": ch + "x"}), "close 3500"),
}


@pytest.mark.parametrize("case", list(SUB_TOKEN_ANSWERS))
def test_subscription_token_answers_as_centrifugo(
    srv: Any, raw: list[RawClient], case: str
) -> None:
    make, expected = SUB_TOKEN_ANSWERS[case]
    connected(srv, raw, token({"sub": "u1"}))
    client = raw[-1]
    channel = f"private:{unique_channel()}"
    client.send({"id": 2, "subscribe": {"channel": channel, "token": make(channel)}})
    try:
        answer = client.wait_for(lambda m: m.get("id") == 2)
    except AssertionError:
        assert client.read_until_closed() == int(expected.split()[1])
        assert expected.startswith("close")
        return
    assert f"error {answer['error']['code']}" == expected
    # The connection stays up and is served: a good token subscribes.
    good = token({"sub": "u1", "channel": channel})
    assert "subscribe" in reply(client, 3, subscribe={"channel": channel, "token": good})


@pytest.mark.parametrize(
    ("connect_token", "expected"),
    [
        (token({"sub": "u1"}, "y" * 40), "close 3500"),
        (token({"sub": "u1", "exp": int(time.time()) - 600}), "error 109"),
    ],
    ids=["invalid", "expired"],
)
def test_connection_token_answers_as_centrifugo(
    srv: Any, raw: list[RawClient], connect_token: str, expected: str
) -> None:
    client = ws(srv, raw, {"token": connect_token})
    try:
        answer = client.wait_for(lambda m: m.get("id") == 1)
    except AssertionError:
        assert f"close {client.read_until_closed()}" == expected
        return
    assert f"error {answer['error']['code']}" == expected


class SubEvents(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.unsubscribed: asyncio.Queue[UnsubscribedContext] = asyncio.Queue()
        self.joins: asyncio.Queue[JoinContext] = asyncio.Queue()

    async def on_unsubscribed(self, ctx: UnsubscribedContext) -> None:
        await self.unsubscribed.put(ctx)

    async def on_join(self, ctx: JoinContext) -> None:
        await self.joins.put(ctx)


def test_centrifuge_python_keeps_its_connection_after_an_invalid_subscription_token(
    srv: Any,
) -> None:
    async def main() -> None:
        client = Client(
            srv.ws_url + "/connection/websocket", token=token({"sub": "u1"}), proxy=None
        )
        events = SubEvents()
        channel = f"private:{unique_channel()}"
        bad = client.new_subscription(channel, events, token=token({"channel": channel}, "z" * 40))
        try:
            await client.connect()
            await client.ready(TIMEOUT)
            first_id = client.client_id
            await bad.subscribe()
            # The SDK ends a subscription refused for good with the error's code.
            refused = await asyncio.wait_for(events.unsubscribed.get(), TIMEOUT)
            assert refused.code == 103, refused
            other = f"room:{unique_channel()}"
            good = client.new_subscription(other)
            await good.subscribe()
            await good.ready(TIMEOUT)
            assert client.client_id == first_id  # the same connection all along
        finally:
            await client.disconnect()

    asyncio.run(main())


# ------------------------------------------------------------------- server-side subscriptions


class ServerEvents(ClientEventHandler):
    def __init__(self) -> None:
        self.subscribed: asyncio.Queue[ServerSubscribedContext] = asyncio.Queue()
        self.publications: asyncio.Queue[ServerPublicationContext] = asyncio.Queue()
        self.connected: asyncio.Queue[ConnectedContext] = asyncio.Queue()

    async def on_subscribed(self, ctx: ServerSubscribedContext) -> None:
        await self.subscribed.put(ctx)

    async def on_publication(self, ctx: ServerPublicationContext) -> None:
        await self.publications.put(ctx)

    async def on_connected(self, ctx: ConnectedContext) -> None:
        await self.connected.put(ctx)


def test_a_user_is_subscribed_to_its_personal_channel(srv: Any, raw: list[RawClient]) -> None:
    user = unique_channel("user")

    async def main() -> None:
        events = ServerEvents()
        client = Client(
            srv.ws_url + "/connection/websocket", events, token=token({"sub": user}), proxy=None
        )
        try:
            await client.connect()
            subscribed = await asyncio.wait_for(events.subscribed.get(), TIMEOUT)
            assert subscribed.channel == f"personal:#{user}"
            res = await asyncio.to_thread(publish, srv, f"personal:#{user}", {"to": user})
            pub = await asyncio.wait_for(events.publications.get(), TIMEOUT)
            assert (pub.channel, pub.pub.data, pub.pub.offset) == (
                f"personal:#{user}",
                {"to": user},
                res["offset"],
            )
        finally:
            await client.disconnect()

    asyncio.run(main())
    # An anonymous client has no personal channel; another user cannot subscribe to this one.
    assert "subs" not in connected(srv, raw)["connect"]
    connected(srv, raw, token({"sub": "intruder"}))
    refused = reply(raw[-1], 2, subscribe={"channel": f"personal:#{user}"})
    assert refused["error"]["code"] == 103


def test_force_push_join_leave_pushes_a_client_its_own_join(srv: Any, raw: list[RawClient]) -> None:
    loud = f"loud:{unique_channel()}"
    client = ws(srv, raw)
    my_id = client.wait_for(lambda m: m.get("id") == 1)["connect"]["client"]
    reply(client, 2, subscribe={"channel": loud})
    join = client.wait_for(lambda m: "join" in m.get("push", {}))
    assert join["push"] == {"channel": loud, "join": {"info": {"user": "", "client": my_id}}}
    # Without the option (room: join_leave only), a client hears others, not itself,
    # unless it asked with join_leave (the SDKs' joinLeave option).
    room = f"room:{unique_channel()}"
    quiet = ws(srv, raw)
    quiet.wait_for(lambda m: m.get("id") == 1)
    reply(quiet, 2, subscribe={"channel": room})
    asking = ws(srv, raw)
    asking_id = asking.wait_for(lambda m: m.get("id") == 1)["connect"]["client"]
    reply(asking, 2, subscribe={"channel": room, "join_leave": True})
    own = asking.wait_for(lambda m: "join" in m.get("push", {}))
    assert own["push"]["join"]["info"]["client"] == asking_id
    heard = quiet.wait_for(lambda m: "join" in m.get("push", {}))
    assert heard["push"]["join"]["info"]["client"] == asking_id
    # The quiet client's own join never came: the one join it holds is the other's.
    assert [m for m in quiet.messages() if "join" in m.get("push", {})] == [heard]


def test_centrifuge_python_hears_its_own_join_where_forced(srv: Any) -> None:
    async def main() -> None:
        client = Client(srv.ws_url + "/connection/websocket", proxy=None)
        events = SubEvents()
        sub = client.new_subscription(f"loud:{unique_channel()}", events)
        try:
            await client.connect()
            await client.ready(TIMEOUT)
            await sub.subscribe()
            join = await asyncio.wait_for(events.joins.get(), TIMEOUT)
            assert join.info.client == client.client_id
        finally:
            await client.disconnect()

    asyncio.run(main())


# --------------------------------------------------------------------------- batch


def batch(srv: Any, body: Any) -> httpx.Response:
    return httpx.post(f"{srv.url}/api/batch", json=body, timeout=TIMEOUT)


def test_batch_answers_each_command_in_order(srv: Any) -> None:
    channel = f"room:{unique_channel()}"
    answer = batch(
        srv,
        {
            "commands": [
                {"publish": {"channel": channel, "data": {"n": 1}}},
                {"publish": {"channel": "nowhere:x", "data": {}}},
                {"frobnicate": {}},
                None,
                {"history": {"channel": channel, "limit": -1}},
            ]
        },
    )
    assert answer.status_code == 200
    replies = answer.json()["replies"]
    assert len(replies) == 5
    assert replies[0]["publish"]["offset"] == 1
    assert replies[1]["error"]["code"] == 102
    assert replies[2]["error"]["code"] == 104
    assert replies[3]["error"]["code"] == 107
    pubs = replies[4]["history"]["publications"]
    assert [p["data"] for p in pubs] == [{"n": 1}]


def test_parallel_batch_keeps_the_order_of_replies(srv: Any) -> None:
    channels = [f"room:{unique_channel()}" for _ in range(MAX_BATCH)]
    commands = [{"publish": {"channel": c, "data": {"c": c}}} for c in channels]
    replies = batch(srv, {"commands": commands, "parallel": True}).json()["replies"]
    assert [r["publish"]["offset"] for r in replies] == [1] * MAX_BATCH
    for channel in channels:
        history = api(srv, "history", {"channel": channel, "limit": -1}).json()["result"]
        assert [p["data"] for p in history["publications"]] == [{"c": channel}]


def test_cent_batch(srv: Any) -> None:
    channel = f"room:{unique_channel()}"
    cent = CentClient(srv.url + "/api", api_key="")
    result = cent.batch(
        BatchRequest(
            requests=[
                PublishRequest(channel=channel, data={"n": 1}),
                PublishRequest(channel=channel, data={"n": 2}),
                PresenceStatsRequest(channel=channel),
                HistoryRequest(channel=channel, limit=-1),
            ],
            parallel=False,
        )
    )
    first, second, stats, history = result.replies
    assert (first.offset, second.offset) == (1, 2)  # type: ignore[attr-defined]
    assert (stats.num_clients, stats.num_users) == (0, 0)  # type: ignore[attr-defined]
    assert [p.data for p in history.publications] == [{"n": 1}, {"n": 2}]  # type: ignore[attr-defined]


def test_tidings_client_batch_reads_each_reply_as_its_call(srv: Any) -> None:
    channel = f"room:{unique_channel()}"
    with SyncAPIClient(srv.url) as client:
        published, refused, history = client.batch(
            [
                calls.publish(channel, {"n": 1}),
                calls.publish("nowhere:x", {}),
                calls.history(channel, limit=-1),
            ],
            parallel=False,
        )
        assert isinstance(published, PublishResult) and published.offset == 1
        assert isinstance(refused, APIError) and refused.code == 102
        assert isinstance(history, HistoryResult)
        assert [p.data for p in history.publications] == [{"n": 1}]
        with pytest.raises(APIError) as too_many:
            client.batch([calls.info()] * (MAX_BATCH + 1))
        assert (too_many.value.code, too_many.value.status) == (106, 400)


def test_a_batch_over_the_command_limit_is_refused_whole(srv: Any) -> None:
    channel = f"room:{unique_channel()}"
    commands = [{"publish": {"channel": channel, "data": {"n": n}}} for n in range(MAX_BATCH + 1)]
    answer = batch(srv, {"commands": commands})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == 106
    history = api(srv, "history", {"channel": channel, "limit": -1}).json()["result"]
    assert history["publications"] == []  # nothing ran
    cent = CentClient(srv.url + "/api", api_key="")
    requests: list[Any] = [PublishRequest(channel=channel, data={}) for _ in range(MAX_BATCH + 1)]
    with pytest.raises(CentTransportError) as refused:
        cent.batch(BatchRequest(requests=requests))
    assert refused.value.status_code == 400


def test_a_malformed_command_refuses_the_whole_batch(srv: Any) -> None:
    channel = f"room:{unique_channel()}"
    answer = batch(
        srv,
        {
            "commands": [
                {"publish": {"channel": channel, "data": {"n": 1}}},
                {"publish": {"channel": 42, "data": {}}},
            ]
        },
    )
    assert answer.status_code == 400 and answer.json()["error"]["code"] == 107
    history = api(srv, "history", {"channel": channel, "limit": -1}).json()["result"]
    assert history["publications"] == []
    for body in (b"[]", b'{"commands": {}}', b'{"commands": [1]}', b"\xff"):
        raw = httpx.post(f"{srv.url}/api/batch", content=body, timeout=TIMEOUT)
        assert raw.status_code == 400 and raw.json()["error"]["code"] == 107, body


def test_hostile_batches_hold_nothing_and_others_are_served(srv: Any) -> None:
    """Batches as large as the body limit allows, all over the command bound,
    many times over: refused before anything runs; memory back where it was."""
    channel = f"room:{unique_channel()}"
    one = json.dumps({"publish": {"channel": channel, "data": {"pad": "x" * 64}}})
    count = (1024 * 1024 - 64) // (len(one) + 1)
    body = ('{"commands":[' + ",".join([one] * count) + "]}").encode()
    assert len(body) <= 1024 * 1024
    check_serving(srv)
    before = rss_kib(srv)
    with httpx.Client(timeout=TIMEOUT) as http:
        for _ in range(20):
            answer = http.post(f"{srv.url}/api/batch", content=body)
            assert answer.status_code == 400 and answer.json()["error"]["code"] == 106
    check_serving(srv)
    grown = rss_kib(srv) - before
    # 20 MiB went through; what stays is one decode's worth at most (~ a few MiB).
    assert grown < 8 * 1024, f"RSS grew by {grown} KiB"
    history = api(srv, "history", {"channel": channel, "limit": -1}).json()["result"]
    assert history["publications"] == []
    too_big = b'{"commands":[' + b" " * (1024 * 1024) + b"]}"
    answer = httpx.post(f"{srv.url}/api/batch", content=too_big, timeout=TIMEOUT)
    assert answer.status_code == 413


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            "[client.subscribe_to_user_personal_channel]\nenabled = true\n"
            'personal_channel_namespace = "personal"\n',
            "'personal' is not a configured namespace",
        ),
        (
            "[client.subscribe_to_user_personal_channel]\nsingle_connection = true\n",
            "single_connection: not supported",
        ),
        ("[limits]\nmax_batch_commands = 0\n", "limits.max_batch_commands"),
    ],
    ids=["undeclared namespace", "single connection", "no batch"],
)
def test_compat_keys_are_validated(tmp_path: Any, toml: str, message: str) -> None:
    path = tmp_path / "tidings.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as refused:
        load_config(str(path))
    assert message in str(refused.value)


def test_the_personal_channel_follows_its_namespace(tmp_path: Any) -> None:
    path = tmp_path / "tidings.toml"
    path.write_text("[client.subscribe_to_user_personal_channel]\nenabled = true\n")
    access = Access(load_config(str(path)))
    assert access.server_channels(Credentials("42", channels=("a",))) == ("a", "#42")
    assert access.server_channels(Credentials("42", channels=("#42",))) == ("#42",)
    assert access.server_channels(Credentials("", channels=("a",))) == ("a",)
    assert Access(load_config(None)).server_channels(Credentials("42")) == ()
