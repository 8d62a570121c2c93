"""Bidirectional emulation with a Redis or NATS broker: one node serves
emulated sessions as with the memory broker, and a post that reaches another
node than the one holding its stream is routed there through the broker (no
sticky sessions).
"""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from helpers import TIMEOUT, publish, unique_channel
from test_emulation import http_stream
from ws_support import NodeClient, ensure_js_deps, node_available

if TYPE_CHECKING:
    from brokers_support import NatsServer, RedisServer


def _redis(server: RedisServer) -> str:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    return f'[broker]\ntype = "redis"\nredis_url = "{server.url}"\nprefix = "{prefix}"\n'


def _nats(server: NatsServer) -> str:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    return f'[broker]\ntype = "nats"\nnats_url = "{server.url}"\nprefix = "{prefix}"\n'


def _subscribe_and_receive(srv: Any, poster: Any) -> None:
    """Subscribe ``srv``'s emulated session by a post to ``poster``, then get a publication."""
    ch = unique_channel("emunode")
    with http_stream(srv) as client:
        body = {
            "session": client.session,
            "node": client.node,
            "data": f'{{"id":2,"subscribe":{{"channel":"{ch}"}}}}',
        }
        resp = httpx.post(poster.url + "/emulation", json=body, timeout=TIMEOUT)
        assert resp.status_code == 204, resp.text
        assert client.next()["id"] == 2
        publish(srv, ch, {"n": 1})  # offsets are per node with NATS: the data says it
        assert client.next()["push"]["pub"]["data"] == {"n": 1}


def test_one_node_on_redis_serves_emulated_sessions(
    server_factory: Any, redis_server: RedisServer
) -> None:
    srv = server_factory(_redis(redis_server))
    _subscribe_and_receive(srv, srv)


def test_a_post_to_another_node_reaches_the_session(
    server_factory: Any, redis_server: RedisServer
) -> None:
    config = _redis(redis_server)
    holder, other = server_factory(config), server_factory(config)
    _subscribe_and_receive(holder, other)


def test_a_post_naming_a_node_nobody_is_is_404(
    server_factory: Any, redis_server: RedisServer
) -> None:
    srv = server_factory(_redis(redis_server))
    body = {"session": "s", "node": "nobody", "data": '{"id":2,"presence":{"channel":"x"}}'}
    resp = httpx.post(srv.url + "/emulation", json=body, timeout=TIMEOUT)
    too_long = httpx.post(srv.url + "/emulation", json={**body, "node": "n" * 65}, timeout=TIMEOUT)
    assert resp.status_code == 404 and too_long.status_code == 400


@pytest.mark.node
@pytest.mark.skipif(
    not node_available() and not os.environ.get("CI"), reason="node and npm are needed"
)
@pytest.mark.parametrize("transport", ["http_stream", "sse"])
def test_js_streams_from_one_node_and_posts_to_another(
    server_factory: Any, redis_server: RedisServer, transport: str
) -> None:
    """centrifuge-js with its stream on one node and every later command posted
    to another, as a load balancer without sticky sessions would send them."""
    ensure_js_deps()
    config = _redis(redis_server)
    holder, other = server_factory(config), server_factory(config)
    ch = unique_channel("emujs")
    env = {"TIDINGS_JS_TRANSPORT": transport, "TIDINGS_JS_EMULATION_URL": other.url}
    js = NodeClient(holder.url, ch, env=env)
    try:
        js.wait(lambda e: e["event"] == "subscribed")
        res = publish(other, ch, {"n": 1})
        pub = js.wait(lambda e: e["event"] == "publication")
        assert pub["data"] == {"n": 1} and pub["offset"] == res["offset"]
        js.command(cmd="publish", channel=ch, data={"from": "node"})
        js.wait(lambda e: e["event"] == "publication" and e["data"] == {"from": "node"})
    finally:
        js.close()


def test_nats_routes_a_post_to_the_node_holding_the_session(
    server_factory: Any, nats_server: NatsServer
) -> None:
    config = _nats(nats_server)
    holder, other = server_factory(config), server_factory(config)
    _subscribe_and_receive(holder, other)
    body = {"session": "s", "node": "nobody", "data": '{"id":2,"presence":{"channel":"x"}}'}
    assert httpx.post(other.url + "/emulation", json=body, timeout=TIMEOUT).status_code == 404
