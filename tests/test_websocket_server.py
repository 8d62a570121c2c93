"""The WebSocket transport against a real server: handshake, protocol errors, bounds, compression.

Clients: the ``websockets`` asyncio client, and a raw socket driving websockets'
sans-I/O ClientProtocol where a test needs to see the wire (RSV1, identical
bytes) or control the socket (a reader that stops reading).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import time
import zlib
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from helpers import (
    SSEClient,
    api,
    check_serving,
    poll_ok,
    pub_json,
    publish,
    rss_kib,
    unique_channel,
    wait_subscribers,
)
from ws_support import RawClient, connect_raw, strict_inflate

TIMEOUT = 10.0


def ws_url(srv: Any) -> str:
    return f"{srv.ws_url}/connection/websocket"


async def ws_connect(srv: Any, **kw: Any) -> ClientConnection:
    kw.setdefault("proxy", None)
    kw.setdefault("open_timeout", TIMEOUT)
    return await connect(ws_url(srv), **kw)


async def command(ws: ClientConnection, *cmds: dict[str, Any]) -> list[dict[str, Any]]:
    await ws.send("\n".join(json.dumps(c) for c in cmds))
    frame = await asyncio.wait_for(ws.recv(), TIMEOUT)
    return [json.loads(line) for line in str(frame).split("\n")]


async def closed_with(ws: ClientConnection) -> tuple[int | None, str | None]:
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
    rcvd = ws.protocol.close_rcvd
    return (rcvd.code, rcvd.reason) if rcvd else (None, None)


async def subscribed_watcher(srv: Any, channel: str) -> ClientConnection:
    ws = await ws_connect(srv)
    replies = await command(
        ws, {"id": 1, "connect": {}}, {"id": 2, "subscribe": {"channel": channel}}
    )
    assert "subscribe" in replies[1], replies
    return ws


async def still_served(srv: Any, watcher: ClientConnection, channel: str) -> None:
    res = await asyncio.to_thread(publish, srv, channel, {"still": "here"})
    push = json.loads(await asyncio.wait_for(watcher.recv(), TIMEOUT))
    assert push["push"]["pub"]["offset"] == res["offset"]


# --------------------------------------------------------------------------- protocol


def test_connect_and_subscribe_in_one_frame_get_one_batched_frame(server: Any) -> None:
    async def main() -> None:
        channel = unique_channel("ws")
        res = await asyncio.to_thread(publish, server, channel, {"n": 1})
        ws = await ws_connect(server, subprotocols=["centrifuge-json"])
        assert ws.subprotocol == "centrifuge-json"
        connect_reply, sub_reply = await command(
            ws, {"id": 1, "connect": {"name": "test"}}, {"id": 2, "subscribe": {"channel": channel}}
        )
        assert connect_reply["connect"]["pong"] is True and connect_reply["connect"]["ping"] > 0
        assert sub_reply["subscribe"]["epoch"] == res["epoch"]
        assert sub_reply["subscribe"]["offset"] == res["offset"]
        await ws.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("name", "frames", "code"),
    [
        ("invalid json", ['{"id":1,"connect":{}}', "{nope"], 3501),
        ("command before connect", ['{"id":1,"subscribe":{"channel":"a"}}'], 3501),
        ("unknown method", ['{"id":1,"connect":{}}', '{"id":2,"frobnicate":{}}'], 3501),
        ("id 0", ['{"id":1,"connect":{}}', '{"id":0,"subscribe":{"channel":"a"}}'], 3501),
        ("connect twice", ['{"id":1,"connect":{}}', '{"id":2,"connect":{}}'], 3501),
    ],
)
def test_protocol_errors_close_only_the_offender(
    server: Any, name: str, frames: list[str], code: int
) -> None:
    async def main() -> None:
        channel = unique_channel("ok")
        watcher = await subscribed_watcher(server, channel)
        ws = await ws_connect(server)
        for f in frames:
            await ws.send(f)
        got, _ = await closed_with(ws)
        assert got == code, name
        await still_served(server, watcher, channel)
        await watcher.close()

    asyncio.run(main())


def test_oversized_message_closes_1009(server: Any) -> None:
    async def main() -> None:
        channel = unique_channel("ok")
        watcher = await subscribed_watcher(server, channel)
        ws = await ws_connect(server, compression=None, max_size=None)
        await command(ws, {"id": 1, "connect": {}})
        big = json.dumps({"id": 2, "publish": {"channel": channel, "data": "x" * 70_000}})
        await ws.send(big)
        got, _ = await closed_with(ws)
        assert got == 1009
        await still_served(server, watcher, channel)
        await watcher.close()

    asyncio.run(main())


def test_compressed_message_over_the_limit_closes_1009(server: Any) -> None:
    async def main() -> None:
        ws = await ws_connect(server)  # compression negotiated: this tiny frame inflates to 70 kB
        await command(ws, {"id": 1, "connect": {}})
        await ws.send(json.dumps({"id": 2, "publish": {"channel": "z", "data": "x" * 70_000}}))
        got, _ = await closed_with(ws)
        assert got == 1009

    asyncio.run(main())


def test_client_compressed_commands_are_understood(server: Any) -> None:
    async def main() -> None:
        channel = unique_channel("zc")
        ws = await ws_connect(server)
        assert ws.response is not None
        assert "permessage-deflate" in (ws.response.headers.get("Sec-WebSocket-Extensions") or "")
        await command(ws, {"id": 1, "connect": {}}, {"id": 2, "subscribe": {"channel": channel}})
        data = {"text": "compress me " * 200}
        for i in range(3):  # several messages: no context is carried between them
            await ws.send(json.dumps({"id": 3 + i, "publish": {"channel": channel, "data": data}}))
        pushes: list[Any] = []
        while len(pushes) < 3:
            for line in str(await asyncio.wait_for(ws.recv(), TIMEOUT)).split("\n"):
                msg = json.loads(line)
                if "push" in msg:
                    pushes.append(msg["push"]["pub"]["data"])
        assert pushes == [data] * 3
        await ws.close()

    asyncio.run(main())


def test_pong_keeps_connection_and_silence_closes_3012(server_factory: Any) -> None:
    srv = server_factory("[websocket]\nping_interval = 1.0\npong_timeout = 0.6\n")

    async def main() -> None:
        silent = await ws_connect(srv)
        assert (await command(silent, {"id": 1, "connect": {}}))[0]["connect"]["ping"] == 1
        polite = await ws_connect(srv)
        await command(polite, {"id": 1, "connect": {}})
        start = time.monotonic()
        pings = 0
        while time.monotonic() - start < 3.5:
            msg = await asyncio.wait_for(polite.recv(), TIMEOUT)
            assert msg == "{}"
            pings += 1
            await polite.send("{}")
        assert pings >= 2
        got, reason = await closed_with(silent)
        assert got == 3012 and reason == "no pong"
        assert polite.protocol.close_rcvd is None
        await polite.close()

    asyncio.run(main())


def test_no_connect_in_time_closes_3502(server_factory: Any) -> None:
    srv = server_factory("[websocket]\nconnect_timeout = 0.5\n")

    async def main() -> None:
        ws = await ws_connect(srv)
        got, _ = await closed_with(ws)
        assert got == 3502

    asyncio.run(main())


@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_slow_reader_closes_3008_others_unaffected(server_factory: Any, loop: str) -> None:
    srv = server_factory("[limits]\nmax_write_buffer = 65536\n", args=("--loop", loop))
    channel = unique_channel("slow")

    async def main() -> None:
        fast = await subscribed_watcher(srv, channel)
        # A reader with a tiny receive buffer that stops reading after subscribing.
        slow = connect_raw(srv.ws_url, (channel,), rcvbuf=4096)
        payload = {"blob": "y" * 100_000}
        fast_got = 0
        published = 0
        deadline = time.monotonic() + 30
        while "write buffer over" not in srv.logs():
            assert time.monotonic() < deadline, "the slow reader was never closed"
            await asyncio.to_thread(publish, srv, channel, payload)
            published += 1
            while fast_got < published:  # the fast client keeps up with everything
                msg = json.loads(await asyncio.wait_for(fast.recv(), TIMEOUT))
                assert msg["push"]["pub"]["data"] == payload
                fast_got += 1
        # The slow client reads at last: its publications, then close 3008.
        code = await asyncio.to_thread(slow.read_until_closed, 20)
        assert code == 3008
        slow.close()
        await still_served(srv, fast, channel)
        await fast.close()

    asyncio.run(main())


def test_reader_that_never_drains_is_aborted(server_factory: Any) -> None:
    srv = server_factory(
        "[limits]\nmax_write_buffer = 65536\n[websocket]\nhandshake_timeout = 1.0\n"
    )
    channel = unique_channel("stuck")
    stuck = connect_raw(srv.ws_url, (channel,), rcvbuf=4096)

    def num_clients() -> int:
        body = api(srv, "info").json()
        return int(body["result"]["nodes"][0]["num_clients"])

    before = num_clients()  # the WebSocket, and the API request asking
    deadline = time.monotonic() + 30
    while "write buffer over" not in srv.logs():
        assert time.monotonic() < deadline, "the stuck reader was never closed"
        publish(srv, channel, {"blob": "z" * 100_000})
    # It never reads the close frame: after handshake_timeout its socket is aborted.
    deadline = time.monotonic() + 10
    while num_clients() >= before:
        assert time.monotonic() < deadline, "the stuck connection was not aborted"
        time.sleep(0.1)
    stuck.close()


def test_client_pipelining_commands_without_reading_is_bounded_and_cut_off(
    server_factory: Any,
) -> None:
    """A client that sends history commands forever (each answered with ~500 kB)
    and never reads: the server holds about max_write_buffer for it, closes it
    (3008), stops reading it, aborts it, and serves everyone else meanwhile."""
    srv = server_factory(
        "[limits]\nmax_write_buffer = 65536\n[websocket]\nhandshake_timeout = 1.0\n"
        "[history]\nsize = 50\n"
    )
    channel = unique_channel("big")
    for _ in range(50):
        publish(srv, channel, {"blob": "h" * 10_000})
    hostile = connect_raw(srv.ws_url, (channel,), rcvbuf=4096)
    hostile.sock.settimeout(2.0)
    before = rss_kib(srv)
    grown = sent = 0
    try:
        for n in range(100_000):  # bounded; the server stops reading long before
            hostile.send({"id": 10 + n, "history": {"channel": channel, "limit": 50}})
            sent += 1
            grown = max(grown, rss_kib(srv) - before)
    except OSError:  # the server stopped reading (send timed out) or reset us
        pass
    assert sent < 100_000, "the server kept reading a client that never reads"
    check_serving(srv)
    # Nothing more is taken from it, and its socket is aborted: EOF or reset.
    deadline = time.monotonic() + 15
    with contextlib.suppress(OSError):
        while hostile.sock.recv(65536):
            assert time.monotonic() < deadline, "the hostile connection was never cut off"
    hostile.close()
    assert grown < 8 * 1024, f"server RSS grew {grown} KiB for one client"
    assert "write buffer over" in srv.logs()


def test_channel_limit_is_error_106(server_factory: Any) -> None:
    srv = server_factory("[limits]\nmax_channels_per_connection = 2\n")

    async def main() -> None:
        ws = await ws_connect(srv)
        replies = await command(
            ws,
            {"id": 1, "connect": {}},
            *({"id": i, "subscribe": {"channel": f"lim{i}"}} for i in (2, 3, 4)),
            {"id": 5, "subscribe": {"channel": "lim2"}},
        )
        assert [("error" in r) for r in replies] == [False, False, False, True, True]
        assert replies[3]["error"]["code"] == 106 and replies[4]["error"]["code"] == 105
        await ws.close()

    asyncio.run(main())


# --------------------------------------------------------------------------- handshake


def test_empty_sec_websocket_protocol_header_is_tolerated(server: Any) -> None:
    client = RawClient(server.ws_url, headers={"Sec-WebSocket-Protocol": ""})
    assert client.response is not None and client.response.status_code == 101
    assert "Sec-WebSocket-Protocol" not in client.response.headers
    client.send({"id": 1, "connect": {}})
    assert "connect" in client.wait_for(lambda m: m.get("id") == 1)
    client.close()


def test_origin_allowlist(server_factory: Any) -> None:
    srv = server_factory('allowed_origins = ["https://good.example"]\n')

    async def main() -> None:
        with pytest.raises(InvalidStatus) as err:
            await ws_connect(srv, origin="https://evil.example")
        assert err.value.response.status_code == 403
        ok = await ws_connect(srv, origin="https://good.example")
        await command(ok, {"id": 1, "connect": {}})
        await ok.close()
        no_origin = await ws_connect(srv)  # not a browser: no cross-site risk
        await command(no_origin, {"id": 1, "connect": {}})
        await no_origin.close()

    asyncio.run(main())


def test_default_origin_rule_is_same_origin(server: Any) -> None:
    """With allowed_origins empty, a page of another site cannot open a socket."""
    host = f"{server.host}:{server.port}"

    async def main() -> None:
        with pytest.raises(InvalidStatus) as err:
            await ws_connect(server, origin="https://evil.example")
        assert err.value.response.status_code == 403
        same = await ws_connect(server, origin=f"http://{host}")
        await command(same, {"id": 1, "connect": {}})
        await same.close()

    asyncio.run(main())


def test_wildcard_origin_and_trailing_slash(server_factory: Any) -> None:
    anyone = server_factory('allowed_origins = ["*"]\n')
    listed = server_factory('allowed_origins = ["https://good.example/"]\n')

    async def main() -> None:
        ws = await ws_connect(anyone, origin="https://whatever.example")
        await ws.close()
        ws = await ws_connect(listed, origin="https://good.example")
        await ws.close()

    asyncio.run(main())
    # CORS: "*" answers any origin, but never lets the browser send cookies.
    resp = httpx.get(anyone.url + "/health", headers={"Origin": "https://whatever.example"})
    assert resp.headers["access-control-allow-origin"] == "https://whatever.example"
    assert "access-control-allow-credentials" not in resp.headers
    resp = httpx.get(listed.url + "/health", headers={"Origin": "https://good.example"})
    assert resp.headers["access-control-allow-credentials"] == "true"


def test_bad_handshake_gets_400(server: Any) -> None:
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as s:
        s.sendall(
            b"GET /connection/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 400"), head


@pytest.mark.parametrize("method", ["HEAD", "POST", "PUT"])
def test_upgrade_on_another_method_than_get_is_refused_405(server: Any, method: str) -> None:
    """RFC 6455 §4.1: the opening handshake is a GET. A HEAD gets its refusal without
    a body (RFC 9110 §9.3.2), or a client would read the body as its next answer."""
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as s:
        s.sendall(
            f"{method} /connection/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\nContent-Length: 0\r\n\r\n".encode()
        )
        received = b""
        while chunk := s.recv(65536):  # the server closes after its answer
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405"), received
    assert b"\r\nAllow: GET" in head
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    assert len(body) == (0 if method == "HEAD" else length), body
    check_serving(server)


def test_compression_can_be_turned_off(server_factory: Any) -> None:
    srv = server_factory("[websocket]\ncompression = false\n")

    async def main() -> None:
        ws = await ws_connect(srv)
        assert ws.response is not None
        assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
        await command(ws, {"id": 1, "connect": {}})
        await ws.close()

    asyncio.run(main())


# --------------------------------------------------------------------------- encode once


def test_one_compressed_frame_is_shared_by_every_connection(server: Any) -> None:
    channel = unique_channel("z")
    clients = [connect_raw(server.ws_url, (channel,), deflate=True) for _ in range(3)]
    plain = connect_raw(server.ws_url, (channel,))
    data = {"items": [{"id": i, "text": f"entry {i}"} for i in range(100)]}
    res = publish(server, channel, data)
    raws = []
    for c in [*clients, plain]:
        mark = len(c.raw)
        push = c.wait_for(lambda m: "push" in m)
        assert push["push"]["pub"]["data"] == data
        assert push["push"]["pub"]["offset"] == res["offset"]
        raws.append(c.raw[mark:] if mark else c.raw)
    # The deflated frame: RSV1 set, and the very same bytes on every deflate connection.
    frames = [r[r.index(b"\xc1") :] for r in raws[:3]]
    assert frames[0] == frames[1] == frames[2]
    assert len(frames[0]) < len(json.dumps(data)) / 2
    # Small publications go uncompressed (under websocket.compression_threshold).
    publish(server, channel, {"tiny": 1})
    for c in clients:
        mark = len(c.raw)
        c.wait_for(lambda m: m.get("push", {}).get("pub", {}).get("data") == {"tiny": 1})
        assert c.raw[mark] == 0x81  # FIN + text, RSV1 clear
    for c in [*clients, plain]:
        c.close()


# --------------------------------------------------------------------------- framing attacks


def test_ping_announcing_a_terabyte_is_refused_at_its_header_and_nothing_is_buffered(
    server_factory: Any,
) -> None:
    """Issue 10: a PING header announcing 2^40 bytes used to be buffered as it streamed in."""
    srv = server_factory()
    channel = unique_channel("ok")
    watcher = connect_raw(srv.ws_url, (channel,))
    attacker = connect_raw(srv.ws_url)
    before = rss_kib(srv)
    # FIN|PING, MASK|127, a 64-bit length, the mask key — and not one byte of payload:
    # the close must come from the header alone.
    attacker.sock.sendall(struct.pack("!BBQ", 0x89, 0xFF, 2**40) + b"\x00\x00\x00\x00")
    assert attacker.read_until_closed(5) == 1002
    # Keep streaming what the header announced (bounded: 64 MiB); the server reads none of it.
    chunk = b"\x00" * (1 << 20)
    with contextlib.suppress(OSError):
        attacker.sock.settimeout(2)
        for _ in range(64):
            attacker.sock.sendall(chunk)
    attacker.close()
    assert rss_kib(srv) - before < 8 * 1024
    res = publish(srv, channel, {"still": "served"})
    push = watcher.wait_for(lambda m: "push" in m)["push"]["pub"]
    assert push["offset"] == res["offset"]
    assert "control frame over 125 bytes" in srv.logs() and "Traceback" not in srv.logs()
    watcher.close()


@pytest.mark.parametrize("first_byte", [0x81, 0x01])  # a whole message, a first fragment
def test_data_frame_announced_over_the_limit_closes_1009_before_its_payload(
    server: Any, first_byte: int
) -> None:
    attacker = connect_raw(server.ws_url)
    attacker.sock.sendall(struct.pack("!BBQ", first_byte, 0xFF, 2**30) + b"\x00\x00\x00\x00")
    assert attacker.read_until_closed(5) == 1009
    attacker.close()


def _server_frames(raw: bytes) -> list[tuple[int, bytes]]:
    """``(first byte, payload)`` of each complete unmasked frame in ``raw``."""
    frames = []
    pos = 0
    while pos + 2 <= len(raw):
        length = raw[pos + 1] & 0x7F
        head = 2
        if length == 126:
            (length,) = struct.unpack_from("!H", raw, pos + 2)
            head = 4
        elif length == 127:
            (length,) = struct.unpack_from("!Q", raw, pos + 2)
            head = 10
        if pos + head + length > len(raw):
            break
        frames.append((raw[pos], raw[pos + head : pos + head + length]))
        pos += head + length
    return frames


@pytest.mark.parametrize("window_bits", [9, 12])
def test_a_small_server_window_offer_gets_pushes_compressed_within_that_window(
    server: Any, window_bits: int
) -> None:
    """RFC 7692 §7.1.2.1: agreeing to server_max_window_bits=N means never referring
    further back than 2^N bytes. Issue 10: a 9-bit offer was echoed, then pushes were
    compressed with a 15-bit window, and a strict 9-bit client failed."""
    channel = unique_channel("wbits")
    offer = [ClientPerMessageDeflateFactory(server_max_window_bits=window_bits)]
    small = [connect_raw(server.ws_url, (channel,), extensions=offer) for _ in range(2)]
    wide = connect_raw(server.ws_url, (channel,), deflate=True)
    for client in small:
        assert client.response is not None
        agreed = client.response.headers["Sec-WebSocket-Extensions"]
        assert f"server_max_window_bits={window_bits}" in agreed
    far = base64.b64encode(os.urandom(1200)).decode()
    data = {"a": far, "gap": "-" * 1000, "b": far}  # a repeat 2.6 kB back
    marks = [len(c.raw) for c in [*small, wide]]
    publish(server, channel, data)
    compressed = []
    for client, mark in zip([*small, wide], marks, strict=True):
        assert client.wait_for(lambda m: "push" in m)["push"]["pub"]["data"] == data
        (frame,) = [p for b0, p in _server_frames(client.raw[mark:]) if b0 == 0xC1]
        compressed.append(frame)
    push = json.loads(strict_inflate(compressed[2], 15))
    assert push["push"]["pub"]["data"] == data
    for frame in compressed[:2]:
        assert json.loads(strict_inflate(frame, window_bits)) == push
    # Encoded once per window size: both small-window clients got the very same bytes.
    assert compressed[0] == compressed[1]
    if window_bits == 9:  # what a 9-bit client would have got before: unreadable
        with pytest.raises(zlib.error, match="too far back"):
            strict_inflate(compressed[2], window_bits)
    for client in [*small, wide]:
        client.close()


def test_an_offer_of_an_8_bit_server_window_is_declined(server: Any) -> None:
    """zlib cannot compress with a raw 8-bit window: no compression rather than a lie."""
    channel = unique_channel("w8")
    offer = [ClientPerMessageDeflateFactory(server_max_window_bits=8)]
    client = connect_raw(server.ws_url, (channel,), extensions=offer)
    assert client.response is not None
    assert "Sec-WebSocket-Extensions" not in client.response.headers
    mark = len(client.raw)
    publish(server, channel, {"text": "compressible " * 100})
    client.wait_for(lambda m: "push" in m)
    assert client.raw[mark] == 0x81  # FIN + text, RSV1 clear
    client.close()


# --------------------------------------------------------------------------- one hub


def test_publication_reaches_ws_sse_and_poll_alike(server: Any) -> None:
    channel = unique_channel("all")
    start = poll_ok(server, [channel])
    ws = connect_raw(server.ws_url, (channel,))
    with SSEClient(server, [channel]) as sse:
        sse.subscribed()
        wait_subscribers(server, channel, 2)
        res = publish(server, channel, {"everyone": True})
        push = ws.wait_for(lambda m: "push" in m)["push"]
        (ev,) = sse.publications(1)
        sse_pub = pub_json(ev)
        polled = poll_ok(server, [channel], cursor=start["cursor"])["publications"]
    assert push["channel"] == channel
    assert push["pub"]["data"] == sse_pub["data"] == polled[0]["data"] == {"everyone": True}
    assert push["pub"]["offset"] == sse_pub["offset"] == polled[0]["offset"] == res["offset"]
    assert sse_pub["epoch"] == polled[0]["epoch"] == res["epoch"]
    ws.send({"id": 9, "history": {"channel": channel, "limit": -1}})
    hist = ws.wait_for(lambda m: m.get("id") == 9)["history"]
    assert hist["epoch"] == res["epoch"] and hist["offset"] == res["offset"]
    ws.close()


def test_graceful_shutdown_closes_3001(server_factory: Any) -> None:
    srv = server_factory()
    client = connect_raw(srv.ws_url, ("bye",))
    srv.proc.send_signal(__import__("signal").SIGTERM)
    assert client.read_until_closed(10) == 3001
    client.close()
    assert srv.proc.wait(15) == 0


# --------------------------------------------------------------------------- memory


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="Linux only")
def test_idle_subscribed_connection_costs_under_4_kib(server_factory: Any) -> None:
    """Resident memory of the server per idle, connected and subscribed WebSocket client."""
    srv = server_factory()
    n = 1000

    async def open_one(i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        from websockets.client import ClientProtocol
        from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
        from websockets.uri import parse_uri

        reader, writer = await asyncio.open_connection(srv.host, srv.port)
        proto = ClientProtocol(
            parse_uri(ws_url(srv)), extensions=[ClientPerMessageDeflateFactory()]
        )
        proto.send_request(proto.connect())
        for data in proto.data_to_send():
            writer.write(data)
        while proto.state.name == "CONNECTING":
            proto.receive_data(await reader.read(65536))
            list(proto.events_received())
        proto.send_text(
            b'{"id":1,"connect":{}}\n{"id":2,"subscribe":{"channel":"mem%d"}}' % (i % 50)
        )
        for data in proto.data_to_send():
            writer.write(data)
        while not proto.events_received():
            proto.receive_data(await reader.read(65536))
        return reader, writer

    async def main() -> float:
        conns = [await open_one(i) for i in range(50)]  # warm up allocator and caches
        await asyncio.sleep(0.5)
        before = rss_kib(srv)
        for i in range(n):
            conns.append(await open_one(i))
        await asyncio.sleep(0.5)
        after = rss_kib(srv)
        for _, writer in conns:
            writer.close()
        return (after - before) * 1024 / n

    per_connection = asyncio.run(main())
    print(f"server RSS per idle subscribed WebSocket connection: {per_connection:.0f} bytes")
    assert per_connection <= 4096
