"""Centrifugo's bidirectional emulation over real sockets, with httpx as the client:
``POST /connection/http_stream``, ``GET /connection/sse`` and ``POST /emulation``,
and the hostile clients of each (oversize, invalid UTF-8, unknown sessions, a
stream that is never read), each with a bystander still served.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import httpx
import jwt

from helpers import (
    TIMEOUT,
    RawConn,
    api,
    check_serving,
    publish,
    request_bytes,
    rss_kib,
    unique_channel,
)
from tidings.centrifuge import client_pb2 as pb

CONNECT = b'{"id":1,"connect":{}}'


class EmulatedClient:
    """One emulated session driven by hand: the stream read by httpx, commands posted."""

    def __init__(self, http: httpx.Client, lines: Iterator[str]) -> None:
        self.http = http
        self.lines = lines
        connect = self.next()
        self.session = connect["connect"]["session"]
        self.node = connect["connect"]["node"]
        self.client = connect["connect"]["client"]

    def next(self) -> dict[str, Any]:
        """The next message, skipping the server's pings."""
        while True:
            line = next(self.lines).strip()
            if line.startswith("data: "):
                line = line[len("data: ") :]
            if line and line != "{}":
                return dict(json.loads(line))

    def post(self, *commands: dict[str, Any]) -> httpx.Response:
        data = "\n".join(json.dumps(c) for c in commands)
        body = {"session": self.session, "node": self.node, "data": data}
        return self.http.post("/emulation", json=body)


@contextmanager
def http_stream(srv: Any, body: bytes = CONNECT) -> Iterator[EmulatedClient]:
    with (
        httpx.Client(base_url=srv.url, timeout=TIMEOUT) as http,
        http.stream(
            "POST",
            "/connection/http_stream",
            content=body,
            headers={"Content-Type": "application/json"},
        ) as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers["transfer-encoding"] == "chunked"
        yield EmulatedClient(http, resp.iter_lines())


@contextmanager
def sse_stream(srv: Any) -> Iterator[EmulatedClient]:
    target = "/connection/sse?cf_connect=" + quote(CONNECT.decode())
    with (
        httpx.Client(base_url=srv.url, timeout=TIMEOUT) as http,
        http.stream("GET", target) as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        yield EmulatedClient(http, resp.iter_lines())


def _subscribe_publish_receive(srv: Any, client: EmulatedClient) -> None:
    ch = unique_channel("emu")
    assert client.post({"id": 2, "subscribe": {"channel": ch}}).status_code == 204
    reply = client.next()
    assert reply["id"] == 2 and reply["subscribe"]["recoverable"] is True
    res = publish(srv, ch, {"n": 1})
    push = client.next()["push"]
    assert push["channel"] == ch
    assert push["pub"]["data"] == {"n": 1} and push["pub"]["offset"] == res["offset"]
    client.post({"id": 3, "publish": {"channel": ch, "data": {"n": 2}}})
    replies = [client.next(), client.next()]
    assert {"id": 3, "publish": {}} in replies
    assert any(r.get("push", {}).get("pub", {}).get("data") == {"n": 2} for r in replies)


def test_http_stream_connects_subscribes_receives_and_publishes(server: Any) -> None:
    with http_stream(server) as client:
        assert client.session and client.node and client.client
        assert client.session != client.client  # the client id is public, the session secret
        _subscribe_publish_receive(server, client)


def test_sse_connects_from_the_url_and_takes_commands_by_post(server: Any) -> None:
    with sse_stream(server) as client:
        _subscribe_publish_receive(server, client)


def test_head_of_the_sse_endpoint_opens_no_session(server: Any) -> None:
    """A HEAD gets the head alone, and the connection stays an HTTP one: the
    request pipelined after it is answered (a session would have taken the
    socket over and streamed its connect reply instead)."""
    target = "/connection/sse?cf_connect=" + quote(CONNECT.decode())
    with RawConn(server) as conn:
        conn.send(request_bytes("HEAD", target) + request_bytes("GET", "/health"))
        head = conn.read_response(head=True)
        assert head.status == 200
        assert (head.header("content-type") or "").startswith("text/event-stream")
        assert conn.read_response().json()["status"] == "ok"


def test_unknown_session_is_404_and_others_are_served(server: Any) -> None:
    with http_stream(server) as client:
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
            body = {"session": "not-" + client.session, "data": '{"id":2,"subscribe":{}}'}
            resp = http.post("/emulation", json=body)
            # The client id is public (presence): it must not open the session.
            leaked = http.post("/emulation", json={"session": client.client, "data": "{}"})
        assert resp.status_code == 404 and leaked.status_code == 404
        assert resp.json()["error"]["message"] == "no such session on this node"
        _subscribe_publish_receive(server, client)
    check_serving(server)


def test_oversize_commands_are_413_before_any_is_run(server_factory: Any) -> None:
    srv = server_factory("[websocket]\nmax_message_size = 1024\n")
    ch = unique_channel("big")
    big = json.dumps({"id": 2, "publish": {"channel": ch, "data": "x" * 2000}})
    with http_stream(srv) as client:
        resp = client.post(json.loads(big))
        assert resp.status_code == 413
        _subscribe_publish_receive(srv, client)
    with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as http:
        opening = http.post("/connection/http_stream", content=CONNECT + b"\n" + big.encode())
        huge = http.post("/emulation", content=b"x" * (2 * 1024 * 1024))  # limits.max_body_size
        sse = http.get("/connection/sse?cf_connect=" + quote(big))
    assert opening.status_code == 413 and sse.status_code == 413
    assert huge.status_code == 413
    assert api(srv, "history", {"channel": ch, "limit": -1}).json()["result"]["publications"] == []
    check_serving(srv)


def test_invalid_utf8_is_400_and_nothing_is_published(server: Any) -> None:
    ch = unique_channel("utf8")
    bad_publish = b'{"id":2,"publish":{"channel":"' + ch.encode() + b'","data":"\xff\xfe"}}'
    with http_stream(server) as client:
        body = b'{"session":"' + client.session.encode() + b'","data":"\xc3\x28"}'
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
            resp = http.post("/emulation", content=body)
            opening = http.post("/connection/http_stream", content=CONNECT + b"\n" + bad_publish)
        assert resp.status_code == 400 and opening.status_code == 400
        assert "UTF-8" in opening.json()["error"]["message"]
        _subscribe_publish_receive(server, client)  # the session goes on
    history = api(server, "history", {"channel": ch, "limit": -1}).json()["result"]
    assert history["publications"] == []
    check_serving(server)


def test_a_broken_command_disconnects_with_a_push_and_ends_the_stream(server: Any) -> None:
    with http_stream(server) as client:
        client.post({"id": 2, "no_such_method": {}})
        disconnect = client.next()["push"]["disconnect"]
        assert disconnect == {"code": 3501, "reason": "unknown command"}
        assert list(client.lines) == []  # the response ended
        # The session is gone with its stream.
        assert client.post({"id": 3, "presence_stats": {"channel": "x"}}).status_code == 404
    check_serving(server)


def test_a_stream_that_is_never_read_is_cut_at_the_write_buffer(server_factory: Any) -> None:
    """A client that opens a stream, subscribes and stops reading: the server
    holds about limits.max_write_buffer for it, then cuts it off (the client
    would recover from history); a bystander keeps receiving every publication."""
    # History of one publication: what the server holds beyond it is the stream's.
    srv = server_factory("[limits]\nmax_write_buffer = 65536\n[history]\nsize = 1\n")
    ch = unique_channel("slow")
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.settimeout(TIMEOUT)
    slow.connect((srv.host, srv.port))
    slow.sendall(
        request_bytes(
            "POST",
            "/connection/http_stream",
            body=CONNECT,
            headers={"Content-Type": "application/json"},
        )
    )
    head = b""
    while b'"session":"' not in head:
        head += slow.recv(4096)
    session = head.split(b'"session":"')[1].split(b'"')[0].decode()
    with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as http:
        body = {"session": session, "data": json.dumps({"id": 2, "subscribe": {"channel": ch}})}
        assert http.post("/emulation", json=body).status_code == 204
    rss_before = rss_kib(srv)
    big = "x" * 100_000
    with http_stream(srv) as good:
        assert good.post({"id": 2, "subscribe": {"channel": ch}}).status_code == 204
        good.next()
        got: list[int] = []
        reader = threading.Thread(
            target=lambda: got.extend(good.next()["push"]["pub"]["data"]["i"] for _ in range(120))
        )
        reader.start()
        for i in range(120):  # 12 MB: far more than the kernel buffers and max_write_buffer
            publish(srv, ch, {"i": i, "pad": big})
        reader.join(TIMEOUT * 3)
        assert got == list(range(120))
    grown = rss_kib(srv) - rss_before
    assert grown < 6 * 1024, f"RSS grew {grown} KiB: the unread stream's bytes were held"
    closed = False
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            if not slow.recv(1 << 20):
                closed = True
                break
    except ConnectionResetError:
        closed = True
    finally:
        slow.close()
    assert closed, "a stream that was never read was never cut off"
    assert "write buffer over 65536 bytes" in srv.logs()
    check_serving(srv)


def _delimited(message: Any) -> bytes:
    data = message.SerializeToString()
    return _varint(len(data)) + data


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _replies(stream: Iterator[bytes]) -> Iterator[Any]:
    """Length-delimited Protobuf replies off an http_stream, pings skipped."""
    buf = b""
    for chunk in stream:
        buf += chunk
        while buf:
            length, pos = 0, 0
            for shift in range(0, 70, 7):
                if pos >= len(buf):
                    break
                byte = buf[pos]
                pos += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
            else:
                raise AssertionError("varint too long")
            if pos + length > len(buf) or (buf[pos - 1] & 0x80):
                break
            reply = pb.Reply()
            reply.ParseFromString(buf[pos : pos + length])
            buf = buf[pos + length :]
            if reply.ListFields():
                yield reply


def test_protobuf_http_stream_and_posts(server: Any) -> None:
    """centrifuge-js's Protobuf build posts ``application/octet-stream``: the
    commands length-delimited, later ones in an ``EmulationRequest``."""
    ch = unique_channel("pb")
    octet = {"Content-Type": "application/octet-stream"}
    connect = _delimited(pb.Command(id=1, connect=pb.ConnectRequest()))
    with (
        httpx.Client(base_url=server.url, timeout=TIMEOUT) as http,
        http.stream("POST", "/connection/http_stream", content=connect, headers=octet) as resp,
    ):
        assert resp.headers["content-type"] == "application/octet-stream"
        replies = _replies(resp.iter_raw())
        connected = next(replies).connect
        assert connected.session and connected.node

        def post(data: bytes) -> httpx.Response:
            request = pb.EmulationRequest(session=connected.session, node=connected.node, data=data)
            return http.post("/emulation", content=request.SerializeToString(), headers=octet)

        subscribe = pb.Command(id=2, subscribe=pb.SubscribeRequest(channel=ch))
        assert post(_delimited(subscribe)).status_code == 204
        assert next(replies).id == 2
        res = publish(server, ch, {"n": 1})
        push = next(replies).push
        assert push.channel == ch and push.pub.offset == res["offset"]
        assert json.loads(push.pub.data) == {"n": 1}

        # Not an EmulationRequest: 400, and the session goes on.
        bad = http.post("/emulation", content=b"\xff\xff\xff", headers=octet)
        assert bad.status_code == 400
        # Commands whose length prefix runs past the data: the session ends with a push.
        assert post(b"\x7f\x08").status_code == 204
        disconnect = next(replies).push.disconnect
        assert disconnect.code == 3501
    check_serving(server)


def test_shutdown_ends_streams_with_a_disconnect_push(server_factory: Any) -> None:
    """A graceful shutdown tells an emulated client to come back (3001), as a
    WebSocket's close code does, and ends its response."""
    srv = server_factory()
    with http_stream(srv) as client:
        srv.proc.send_signal(signal.SIGTERM)
        assert client.next()["push"]["disconnect"] == {"code": 3001, "reason": "shutdown"}
        assert list(client.lines) == []
    assert srv.proc.wait(TIMEOUT) == 0


def test_a_session_that_never_pongs_is_ended_and_one_that_does_is_kept(
    server_factory: Any,
) -> None:
    srv = server_factory("[websocket]\nping_interval = 1.0\n")
    with http_stream(srv) as silent, http_stream(srv) as alive:
        for _ in range(3):  # three pings answered by post, as centrifuge-js does
            line = next(alive.lines).strip()
            while line != "{}":
                line = next(alive.lines).strip()
            assert alive.post({}).status_code == 204
        assert silent.next()["push"]["disconnect"] == {"code": 3012, "reason": "no pong"}
        reply = alive.post({"id": 2, "presence_stats": {"channel": "x"}})
        assert reply.status_code == 204 and alive.next()["id"] == 2


SECRET = "emulation-test-secret-of-32-bytes!!"
ORIGIN = "https://app.example"


def test_tokens_and_origins_as_on_a_websocket(server_factory: Any) -> None:
    """A valid token connects; an invalid one ends the stream with 3500 (no
    reconnect); a browser of an allowed origin gets CORS headers on the stream
    and a preflight for its posts."""
    srv = server_factory(f'allowed_origins = ["{ORIGIN}"]\n[auth]\nhmac_secret = "{SECRET}"\n')
    token = jwt.encode({"sub": "42", "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    good = json.dumps({"id": 1, "connect": {"token": token}}).encode()
    with http_stream(srv, good) as client:
        assert client.client
    forged = jwt.encode({"sub": "42"}, "another-secret-of-32-bytes-at-least", algorithm="HS256")
    with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as http:
        bad = json.dumps({"id": 1, "connect": {"token": forged}})
        resp = http.post("/connection/http_stream", content=bad, headers={"Origin": ORIGIN})
        preflight = http.options(
            "/emulation",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
    assert resp.headers["access-control-allow-origin"] == ORIGIN
    lines = [json.loads(line) for line in resp.text.splitlines()]
    assert lines == [{"push": {"disconnect": {"code": 3500, "reason": "invalid token"}}}]
    assert preflight.status_code in (200, 204)
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
