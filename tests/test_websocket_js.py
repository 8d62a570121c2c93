"""centrifuge-js (npm, unmodified) under node with the `ws` package, against a real server.

tests/js/package.json pins the SDK; ``npm ci --prefix tests/js`` installs it (the
first test does so itself when node_modules is missing).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jwt
import pytest

from helpers import publish, unique_channel
from ws_support import (
    NodeClient,
    assert_js_recovers_after_a_cut,
    ensure_js_deps,
    node_available,
)

# Skipped on a developer machine without node; in CI (CI=true) a missing node fails.
pytestmark = [
    pytest.mark.node,
    pytest.mark.skipif(
        not node_available() and not os.environ.get("CI"), reason="node and npm are needed"
    ),
]


@pytest.fixture(scope="module", autouse=True)
def js_deps() -> None:
    ensure_js_deps()


def start(clients: list[NodeClient], url: str, *channels: str) -> NodeClient:
    c = NodeClient(url, *channels)
    clients.append(c)
    return c


def test_connect_subscribe_receive_publish_history(
    server: Any, node_clients: list[NodeClient]
) -> None:
    channel = unique_channel("js")
    js = start(node_clients, server.ws_url + "/connection/websocket", channel)
    connected = js.wait(lambda e: e["event"] == "connected")
    assert connected["transport"] == "websocket" and connected["client"]
    sub = js.wait(lambda e: e["event"] == "subscribed")
    assert sub["recoverable"] is True and sub["wasRecovering"] is False

    res = publish(server, channel, {"hello": "node"})
    pub = js.wait(lambda e: e["event"] == "publication")
    assert pub["data"] == {"hello": "node"} and pub["offset"] == res["offset"]

    js.command(cmd="publish", channel=channel, data={"from": "node"})
    js.wait(lambda e: e["event"] == "publication" and e["data"] == {"from": "node"})
    js.command(cmd="history", channel=channel)
    hist = js.wait(lambda e: e["event"] == "history")
    assert hist["epoch"] == res["epoch"]
    assert [p["data"] for p in hist["publications"]] == [{"hello": "node"}, {"from": "node"}]


def test_recovers_missed_publications_after_network_loss(
    server: Any, node_clients: list[NodeClient]
) -> None:
    channel = unique_channel("jsrec")
    assert_js_recovers_after_a_cut(
        server, channel, lambda proxy: start(node_clients, proxy.ws_url, channel)
    )


def test_compressed_shared_frame_decodes_in_node(
    server: Any, node_clients: list[NodeClient]
) -> None:
    channel = unique_channel("jsz")
    clients = [
        start(node_clients, server.ws_url + "/connection/websocket", channel) for _ in range(2)
    ]
    for c in clients:
        c.wait(lambda e: e["event"] == "subscribed")
    big = {"rows": [{"id": i, "label": f"row {i} of the table"} for i in range(300)]}
    publish(server, channel, big)
    for c in clients:
        assert c.wait(lambda e: e["event"] == "publication")["data"] == big


# ------------------------------------------------------------------ Centrifugo compatibility

COMPAT_SECRET = "js-compat-secret-of-sufficient-length"
COMPAT_CONFIG = f"""
[auth]
hmac_secret = "{COMPAT_SECRET}"

[channels]
subscribe = "anonymous"

[namespaces.room]
subscribe = "anonymous"
presence = true
presence_read = "any"
join_leave = true
force_push_join_leave = true

[namespaces.private]
subscribe = "token"
"""


def compat_token(claims: dict[str, Any], secret: str = COMPAT_SECRET) -> str:
    return jwt.encode({"exp": int(time.time()) + 600, **claims}, secret, algorithm="HS256")


@pytest.fixture(scope="module")
def compat(module_server_factory: Any) -> Any:
    return module_server_factory(COMPAT_CONFIG)


def test_presence_stats_of_an_empty_channel_are_zeros_in_js(
    compat: Any, node_clients: list[NodeClient]
) -> None:
    """centrifuge-js reads num_clients without a default: an absent field was ``undefined``."""
    js = start(node_clients, compat.ws_url + "/connection/websocket")
    js.wait(lambda e: e["event"] == "connected")
    empty = f"room:{unique_channel()}"
    js.command(cmd="presence_stats", channel=empty)
    stats = js.wait(lambda e: e["event"] == "presence_stats")
    assert (stats["numClients"], stats["numUsers"]) == (0, 0)
    js.command(cmd="presence", channel=empty)
    assert js.wait(lambda e: e["event"] == "presence")["clients"] == {}


def test_js_connects_with_a_token_without_sub(compat: Any, node_clients: list[NodeClient]) -> None:
    granted = f"private:{unique_channel()}"
    js = NodeClient(
        compat.ws_url + "/connection/websocket",
        env={"TIDINGS_JS_TOKEN": compat_token({"channels": [granted]})},
    )
    node_clients.append(js)
    assert js.wait(lambda e: e["event"] == "connected")["client"]
    assert js.wait(lambda e: e["event"] == "server_subscribed")["channel"] == granted
    res = publish(compat, granted, {"to": "anonymous"})
    pub = js.wait(lambda e: e["event"] == "server_publication")
    assert (pub["channel"], pub["data"], pub["offset"]) == (
        granted,
        {"to": "anonymous"},
        res["offset"],
    )


def test_js_invalid_subscription_token_fails_the_subscription_not_the_connection(
    compat: Any, node_clients: list[NodeClient]
) -> None:
    private = f"private:{unique_channel()}"
    room = f"room:{unique_channel()}"
    forged = compat_token({"channel": private}, secret="f" * 40)
    js = NodeClient(
        compat.ws_url + "/connection/websocket",
        private,
        room,
        env={
            "TIDINGS_JS_TOKEN": compat_token({"sub": "u1"}),
            "TIDINGS_JS_SUB_TOKENS": json.dumps({private: forged}),
        },
    )
    node_clients.append(js)
    refused = js.wait(lambda e: e["event"] == "unsubscribed" and e["channel"] == private)
    assert refused["code"] == 103
    # The same connection goes on: the room (no token needed) subscribes and delivers.
    assert js.wait(lambda e: e["event"] == "subscribed" and e["channel"] == room)
    res = publish(compat, room, {"still": "connected"})
    pub = js.wait(lambda e: e["event"] == "publication" and e["channel"] == room)
    assert pub["offset"] == res["offset"]
    # One connection all along: connected once, never disconnected.
    lifecycle = [e["event"] for e in js.events if e["event"] in ("connected", "disconnected")]
    assert lifecycle == ["connected"]


def test_js_hears_its_own_join_where_forced(compat: Any, node_clients: list[NodeClient]) -> None:
    room = f"room:{unique_channel()}"
    js = start(node_clients, compat.ws_url + "/connection/websocket", room)
    me = js.wait(lambda e: e["event"] == "connected")["client"]
    join = js.wait(lambda e: e["event"] == "join")
    assert (join["channel"], join["client"], join["user"]) == (room, me, "")
