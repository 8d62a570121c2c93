"""centrifuge-js (npm, unmodified) under node, forced onto its WebSocket
fallbacks — the ``http_stream`` and ``sse`` transports of Centrifugo's
bidirectional emulation — with WebSocket out of its transport list.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from helpers import publish, unique_channel
from ws_support import (
    NodeClient,
    assert_js_recovers_after_a_cut,
    ensure_js_deps,
    node_available,
)

pytestmark = [
    pytest.mark.node,
    pytest.mark.skipif(
        not node_available() and not os.environ.get("CI"), reason="node and npm are needed"
    ),
]

#: (transport, Protobuf build): centrifuge-js has Protobuf for http_stream, not for SSE.
EMULATED = [("http_stream", False), ("sse", False), ("http_stream", True)]


@pytest.fixture(scope="module", autouse=True)
def js_deps() -> None:
    ensure_js_deps()


def start(
    clients: list[NodeClient], transport: str, protobuf: bool, url: str, *channels: str
) -> NodeClient:
    env = {"TIDINGS_JS_TRANSPORT": transport}
    if protobuf:
        env["TIDINGS_JS_PROTOBUF"] = "1"
    c = NodeClient(url, *channels, env=env)
    clients.append(c)
    return c


@pytest.mark.parametrize(("transport", "protobuf"), EMULATED)
def test_js_connects_subscribes_receives_and_publishes(
    server: Any, node_clients: list[NodeClient], transport: str, protobuf: bool
) -> None:
    channel = unique_channel("emujs")
    js = start(node_clients, transport, protobuf, server.url, channel)
    connected = js.wait(lambda e: e["event"] == "connected")
    assert connected["transport"] == transport and connected["client"]
    sub = js.wait(lambda e: e["event"] == "subscribed")
    assert sub["recoverable"] is True and sub["wasRecovering"] is False

    res = publish(server, channel, {"hello": transport})
    pub = js.wait(lambda e: e["event"] == "publication")
    assert pub["data"] == {"hello": transport} and pub["offset"] == res["offset"]

    # Commands after connect travel by POST /emulation.
    js.command(cmd="publish", channel=channel, data={"from": "node"})
    js.wait(lambda e: e["event"] == "publication" and e["data"] == {"from": "node"})
    js.command(cmd="history", channel=channel)
    hist = js.wait(lambda e: e["event"] == "history")
    assert hist["epoch"] == res["epoch"]
    assert [p["data"] for p in hist["publications"]] == [{"hello": transport}, {"from": "node"}]


@pytest.mark.parametrize(("transport", "protobuf"), EMULATED)
def test_js_recovers_missed_publications_after_a_cut(
    server: Any, node_clients: list[NodeClient], transport: str, protobuf: bool
) -> None:
    channel = unique_channel("emurec")
    url = "http://127.0.0.1:{}"
    assert_js_recovers_after_a_cut(
        server,
        channel,
        lambda proxy: start(node_clients, transport, protobuf, url.format(proxy.port), channel),
    )
