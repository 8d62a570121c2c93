"""centrifuge-js (npm, unmodified) under node with the `ws` package, against a real server.

tests/js/package.json pins the SDK; ``npm ci --prefix tests/js`` installs it (the
first test does so itself when node_modules is missing).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import publish, unique_channel
from ws_support import NodeClient, Proxy, ensure_js_deps, node_available

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


@pytest.fixture
def node_clients() -> Iterator[list[NodeClient]]:
    clients: list[NodeClient] = []
    yield clients
    for c in clients:
        c.close()


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
    publish(server, channel, {"n": 0})  # the stream exists, with an epoch
    proxy = Proxy(server.port)
    try:
        js = start(node_clients, proxy.ws_url, channel)
        js.wait(lambda e: e["event"] == "subscribed")
        publish(server, channel, {"n": 1})
        js.wait(lambda e: e["event"] == "publication" and e["data"] == {"n": 1})
        mark = len(js.events)

        proxy.cut()
        js.wait(lambda e: e["event"] == "connecting", start=mark)
        for n in (2, 3, 4):
            publish(server, channel, {"n": n})
        proxy.restore()

        again = js.wait(lambda e: e["event"] == "subscribed", start=mark)
        assert again["wasRecovering"] is True and again["recovered"] is True
        publish(server, channel, {"n": 5})
        js.wait(lambda e: e["event"] == "publication" and e["data"] == {"n": 5}, start=mark)
        got = [e for e in js.events[mark:] if e["event"] == "publication"]
        assert [e["data"]["n"] for e in got] == [2, 3, 4, 5]
        assert [e["offset"] for e in got] == [3, 4, 5, 6]
    finally:
        proxy.close()


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
