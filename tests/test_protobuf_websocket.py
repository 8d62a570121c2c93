"""The Protobuf form of Centrifugo's protocol over a real socket, with clients we did not write.

centrifuge-python with ``use_protobuf=True`` (the SDK's own generated
classes and framing) for the whole life of a client: connect, subscribe,
receive, publish, history, presence, recover after a cut; the ``websockets``
client, offering ``centrifuge-protobuf``, for the handshake, the frames as
they are on the wire, pings, compression, and the hostile client.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from centrifuge import Client
from centrifuge.protocol import client_pb2 as sdk
from google.protobuf.json_format import MessageToDict
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from helpers import check_serving, publish, rss_kib, unique_channel
from test_websocket_python import ClientEvents, Events, next_pub
from ws_support import Proxy

TIMEOUT = 10.0
PATH = "/connection/websocket"

PRESENCE_CONFIG = """
[websocket]
ping_interval = 1
pong_timeout = 5

[namespaces.room]
presence = true
join_leave = true
"""


def protobuf_client(url: str, events: Any = None, **kw: Any) -> Client:
    return Client(
        url,
        events=events,
        use_protobuf=True,
        proxy=None,
        min_reconnect_delay=0.1,
        max_reconnect_delay=0.5,
        **kw,
    )


async def api_publish(srv: Any, channel: str, data: Any) -> dict[str, Any]:
    return await asyncio.to_thread(publish, srv, channel, data)


@pytest.fixture
def proxy(server: Any) -> Iterator[Proxy]:
    p = Proxy(server.port)
    yield p
    p.close()


# --------------------------------------------------------------------------- raw frames


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def frame_of(*commands: sdk.Command) -> bytes:
    return b"".join(varint(len(b)) + b for b in (c.SerializeToString() for c in commands))


def replies(message: bytes | str) -> list[dict[str, Any]]:
    """A binary message read as the SDK reads it: length-delimited ``Reply``s."""
    assert isinstance(message, bytes), f"a text frame on a Protobuf connection: {message!r}"
    out = []
    pos = 0
    while pos < len(message):
        length = shift = 0
        while True:
            byte = message[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        out.append(
            MessageToDict(
                sdk.Reply.FromString(message[pos : pos + length]), preserving_proto_field_name=True
            )
        )
        pos += length
    assert pos == len(message)
    return out


def open_protobuf(srv: Any, **kw: Any) -> ClientConnection:
    kw.setdefault("compression", None)
    return connect(
        srv.ws_url + PATH,
        subprotocols=["centrifuge-protobuf"],  # type: ignore[list-item]
        open_timeout=TIMEOUT,
        max_size=None,
        legacy=True,  # a connection kept open across calls, not a context manager
        **kw,
    )


def connected(srv: Any, *channels: str, **kw: Any) -> ClientConnection:
    """A raw Protobuf connection, connected and subscribed to ``channels``."""
    ws = open_protobuf(srv, **kw)
    commands = [sdk.Command(id=1, connect=sdk.ConnectRequest())]
    commands += [
        sdk.Command(id=i + 2, subscribe=sdk.SubscribeRequest(channel=c))
        for i, c in enumerate(channels)
    ]
    ws.send(frame_of(*commands))
    got: list[dict[str, Any]] = []
    while len(got) < len(commands):
        got += replies(ws.recv(TIMEOUT))
    assert [r["id"] for r in got] == [c.id for c in commands], got
    assert all("error" not in r for r in got), got
    return ws


def next_push(ws: ClientConnection) -> dict[str, Any]:
    while True:
        for reply in replies(ws.recv(TIMEOUT)):
            if "push" in reply:
                return reply["push"]  # type: ignore[no-any-return]


def close_code(ws: ClientConnection) -> int | None:
    """Read until the server closes; its close code."""
    try:
        while True:
            ws.recv(TIMEOUT)
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None


# --------------------------------------------------------------------------- the SDK


def test_sdk_connects_subscribes_receives_publishes_and_reads_history(server: Any) -> None:
    async def main() -> None:
        channel = unique_channel("pb")
        c = protobuf_client(server.ws_url + PATH)
        ev = Events()
        sub = c.new_subscription(channel, ev)
        await c.connect()
        await c.ready(TIMEOUT)
        assert c.client_id
        await sub.subscribe()
        await sub.ready(TIMEOUT)

        first = await api_publish(server, channel, {"text": "from the api"})
        pub = (await next_pub(ev)).pub
        assert json.loads(pub.data) == {"text": "from the api"}
        assert pub.offset == first["offset"]

        await sub.publish(json.dumps({"text": "from the sdk"}).encode())
        pub = (await next_pub(ev)).pub
        assert json.loads(pub.data) == {"text": "from the sdk"}
        assert pub.offset == first["offset"] + 1
        assert pub.info is not None and pub.info.client == c.client_id

        hist = await sub.history(limit=-1)
        assert hist.epoch == first["epoch"]
        assert hist.offset == first["offset"] + 1
        assert [json.loads(p.data) for p in hist.publications] == [
            {"text": "from the api"},
            {"text": "from the sdk"},
        ]
        await c.disconnect()

    asyncio.run(main())


def test_sdk_presence_and_presence_stats(server_factory: Any) -> None:
    srv = server_factory(config=PRESENCE_CONFIG)

    async def main() -> None:
        channel = "room:" + unique_channel("pbp")
        c = protobuf_client(srv.ws_url + PATH)
        other = protobuf_client(srv.ws_url + PATH)
        sub = c.new_subscription(channel, Events())
        for client in (c, other):
            await client.connect()
            await client.ready(TIMEOUT)
        await sub.subscribe()
        await sub.ready(TIMEOUT)
        presence = await sub.presence()
        assert set(presence.clients) == {c.client_id}
        stats = await sub.presence_stats()
        assert (stats.num_clients, stats.num_users) == (1, 1)
        # A second client (anonymous too: one user, two clients).
        other_sub = other.new_subscription(channel, Events())
        await other_sub.subscribe()
        await other_sub.ready(TIMEOUT)
        presence = await other_sub.presence()
        assert set(presence.clients) == {c.client_id, other.client_id}
        stats = await sub.presence_stats()
        assert (stats.num_clients, stats.num_users) == (2, 1)
        for client in (c, other):
            await client.disconnect()

    asyncio.run(main())


def test_sdk_recovers_missed_publications_after_a_cut(server: Any, proxy: Proxy) -> None:
    async def main() -> None:
        channel = unique_channel("pbrec")
        await api_publish(server, channel, {"n": 0})
        c = protobuf_client(proxy.ws_url, ClientEvents())
        ev = Events()
        sub = c.new_subscription(channel, ev)
        await c.connect()
        await sub.subscribe()
        await sub.ready(TIMEOUT)
        first = await asyncio.wait_for(ev.subscribed.get(), TIMEOUT)
        assert first.recoverable and not first.was_recovering
        await api_publish(server, channel, {"n": 1})
        assert json.loads((await next_pub(ev)).pub.data) == {"n": 1}

        proxy.cut()  # no close frame: the SDK reconnects and recovers
        for n in (2, 3, 4):
            await api_publish(server, channel, {"n": n})
        proxy.restore()

        again = await asyncio.wait_for(ev.subscribed.get(), TIMEOUT)
        assert again.was_recovering and again.recovered
        got = [(await next_pub(ev)).pub for _ in range(3)]
        assert [json.loads(p.data) for p in got] == [{"n": 2}, {"n": 3}, {"n": 4}]
        assert [p.offset for p in got] == [3, 4, 5]
        await api_publish(server, channel, {"n": 5})
        assert json.loads((await next_pub(ev)).pub.data) == {"n": 5}
        assert ev.publications.empty()
        await c.disconnect()

    asyncio.run(main())


def test_json_and_protobuf_subscribers_get_the_same_publications(server: Any) -> None:
    """One channel, both formats: a publication from a Protobuf client reaches a JSON one."""

    async def main() -> None:
        channel = unique_channel("pbmix")
        pb_client = protobuf_client(server.ws_url + PATH)
        json_client = Client(server.ws_url + PATH, proxy=None)
        pb_events, json_events = Events(), Events()
        pb_sub = pb_client.new_subscription(channel, pb_events)
        json_sub = json_client.new_subscription(channel, json_events)
        for client, sub in ((pb_client, pb_sub), (json_client, json_sub)):
            await client.connect()
            await sub.subscribe()
            await sub.ready(TIMEOUT)
        await pb_sub.publish(b'{"from":"protobuf"}')
        await json_sub.publish({"from": "json"})
        for events in (pb_events, json_events):
            got = [(await next_pub(events)).pub for _ in range(2)]
            data = [p.data if isinstance(p.data, dict) else json.loads(p.data) for p in got]
            assert data == [{"from": "protobuf"}, {"from": "json"}]
            assert [p.offset for p in got] == [1, 2]
        await pb_client.disconnect()
        await json_client.disconnect()

    asyncio.run(main())


# --------------------------------------------------------------------------- the wire


def test_handshake_echoes_the_subprotocol_and_replies_are_binary(server: Any) -> None:
    with open_protobuf(server) as ws:
        assert ws.subprotocol == "centrifuge-protobuf"
        ws.send(frame_of(sdk.Command(id=1, connect=sdk.ConnectRequest())))
        message = ws.recv(TIMEOUT)
        (reply,) = replies(message)
        assert reply["id"] == 1 and reply["connect"]["client"]
    # A client offering both gets the first it named that we speak.
    with connect(
        server.ws_url + PATH,
        subprotocols=["centrifuge-json", "centrifuge-protobuf"],  # type: ignore[list-item]
        open_timeout=TIMEOUT,
    ) as ws:
        assert ws.subprotocol == "centrifuge-json"


def test_server_pings_with_an_empty_reply_and_takes_an_empty_command_as_pong(
    server_factory: Any,
) -> None:
    srv = server_factory(config=PRESENCE_CONFIG)  # pings every second
    ws = connected(srv)
    try:
        for _ in range(3):  # answered pings keep the connection: the next one comes
            assert ws.recv(TIMEOUT) == b"\x00"
            ws.send(b"\x00")
    finally:
        ws.close()


def test_a_publication_reaches_compressed_and_plain_protobuf_subscribers(server: Any) -> None:
    channel = unique_channel("pbz")
    plain = connected(server, channel)
    deflated = connected(server, channel, compression="deflate")
    assert deflated.protocol.extensions, "permessage-deflate was not negotiated"
    try:
        big = {"items": [{"id": i, "name": f"item number {i}"} for i in range(200)]}
        res = publish(server, channel, big)
        for ws in (plain, deflated):
            push = next_push(ws)
            assert push["channel"] == channel
            assert push["pub"]["offset"] == str(res["offset"])
            data = json.loads(bytes.fromhex(_b64_hex(push["pub"]["data"])))
            assert data == big
    finally:
        plain.close()
        deflated.close()


def _b64_hex(value: str) -> str:
    return base64.b64decode(value).hex()


# --------------------------------------------------------------------------- hostile client


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\x80", 3501),  # a truncated varint
        (b"\xff\xff\xff\xff\x0f\x08\x01", 3501),  # 4 GiB announced, 2 bytes sent
        (b"\x03\x08\x01", 3501),  # a length past the frame
        (b"\x02\x08\x80", 3501),  # a truncated field inside the command
        (b"\x07\x08\x01\x2a\x03\x0a\x01\xff", 1007),  # subscribe to a channel that is not UTF-8
        (frame_of(sdk.Command(id=1, connect=sdk.ConnectRequest(data=b"\x00bin"))), 3501),
    ],
)
def test_a_malformed_protobuf_frame_closes_and_others_are_served(
    server: Any, payload: bytes, code: int
) -> None:
    channel = unique_channel("pbbad")
    bystander = connected(server, channel)
    ws = open_protobuf(server)
    try:
        ws.send(payload)
        assert close_code(ws) == code
        res = publish(server, channel, {"still": "served"})
        assert next_push(bystander)["pub"]["offset"] == str(res["offset"])
        check_serving(server)
    finally:
        bystander.close()
        ws.close()
    logs = server.logs()
    assert "Traceback" not in logs


def test_unknown_fields_are_ignored_over_the_wire(server: Any) -> None:
    ws = open_protobuf(server)
    try:
        command = sdk.Command(id=1, connect=sdk.ConnectRequest()).SerializeToString()
        command += b"\xf8\x07\x01"  # field 127: in no version of client.proto
        ws.send(varint(len(command)) + command)
        (reply,) = replies(ws.recv(TIMEOUT))
        assert reply["id"] == 1 and "connect" in reply
    finally:
        ws.close()


def test_many_hostile_protobuf_clients_leave_memory_flat(server: Any) -> None:
    """200 connections each announcing a 2 GiB command in a 64 KiB frame: the server
    holds no more than it did (each is closed, nothing is kept)."""
    before = rss_kib(server)
    filler = os.urandom(60_000)
    for _ in range(200):
        ws = open_protobuf(server)
        try:
            ws.send(b"\xff\xff\xff\xff\x07" + filler)
            assert close_code(ws) == 3501
        finally:
            ws.close()
    check_serving(server)
    grown = rss_kib(server) - before
    assert grown < 8 * 1024, f"RSS grew by {grown} KiB over 200 hostile connections"
