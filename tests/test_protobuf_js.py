"""centrifuge-js's Protobuf build (``centrifuge/build/protobuf``, npm, unmodified) under node.

The same driver as the JSON tests (``tests/js/client.mjs``, with
``TIDINGS_JS_PROTOBUF=1``): the SDK offers ``centrifuge-protobuf`` and speaks
only Protobuf from then on, so every event below went through our encoder
and every command through our decoder. Publication data travels as the
UTF-8 bytes of its JSON.
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

PROTOBUF = {"TIDINGS_JS_PROTOBUF": "1"}


@pytest.fixture(scope="module", autouse=True)
def js_deps() -> None:
    ensure_js_deps()


def start(clients: list[NodeClient], url: str, *channels: str) -> NodeClient:
    c = NodeClient(url, *channels, env=PROTOBUF)
    clients.append(c)
    return c


def test_protobuf_sdk_connects_subscribes_receives_publishes_and_reads_history(
    server: Any, node_clients: list[NodeClient]
) -> None:
    channel = unique_channel("jspb")
    js = start(node_clients, server.ws_url + "/connection/websocket", channel)
    connected = js.wait(lambda e: e["event"] == "connected")
    assert connected["transport"] == "websocket" and connected["client"]
    sub = js.wait(lambda e: e["event"] == "subscribed")
    assert sub["recoverable"] is True and sub["wasRecovering"] is False

    res = publish(server, channel, {"hello": "protobuf"})
    pub = js.wait(lambda e: e["event"] == "publication")
    assert pub["data"] == {"hello": "protobuf"} and pub["offset"] == res["offset"]

    js.command(cmd="publish", channel=channel, data={"from": "node"})
    js.wait(lambda e: e["event"] == "publication" and e["data"] == {"from": "node"})
    js.command(cmd="history", channel=channel)
    hist = js.wait(lambda e: e["event"] == "history")
    assert hist["epoch"] == res["epoch"]
    assert [p["data"] for p in hist["publications"]] == [{"hello": "protobuf"}, {"from": "node"}]
    assert [p["offset"] for p in hist["publications"]] == [res["offset"], res["offset"] + 1]


def test_protobuf_sdk_recovers_missed_publications_after_a_cut(
    server: Any, node_clients: list[NodeClient]
) -> None:
    channel = unique_channel("jspbrec")
    assert_js_recovers_after_a_cut(
        server, channel, lambda proxy: start(node_clients, proxy.ws_url, channel)
    )


def test_protobuf_sdk_reads_presence_stats_and_zero_values(
    server_factory: Any, node_clients: list[NodeClient]
) -> None:
    srv = server_factory(config="[namespaces.room]\npresence = true\n")
    channel = "room:" + unique_channel("jspbp")
    js = start(node_clients, srv.ws_url + "/connection/websocket", channel)
    js.wait(lambda e: e["event"] == "subscribed")
    js.command(cmd="presence_stats", channel=channel)
    stats = js.wait(lambda e: e["event"] == "presence_stats")
    assert (stats["numClients"], stats["numUsers"]) == (1, 1)
    js.command(cmd="presence", channel=channel)
    presence = js.wait(lambda e: e["event"] == "presence")
    assert len(presence["clients"]) == 1


def test_protobuf_and_json_sdks_share_a_channel(
    server: Any, node_clients: list[NodeClient]
) -> None:
    channel = unique_channel("jspbmix")
    pb = start(node_clients, server.ws_url + "/connection/websocket", channel)
    js = NodeClient(server.ws_url + "/connection/websocket", channel)
    node_clients.append(js)
    for c in (pb, js):
        c.wait(lambda e: e["event"] == "subscribed")
    pb.command(cmd="publish", channel=channel, data={"from": "protobuf"})
    js.command(cmd="publish", channel=channel, data={"from": "json"})
    for c in (pb, js):
        for data in ({"from": "protobuf"}, {"from": "json"}):
            c.wait(lambda e, data=data: e["event"] == "publication" and e["data"] == data)
