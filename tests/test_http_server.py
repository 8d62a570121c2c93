"""The HTTP/1.1 layer: keep-alive, pipelining, bodies, HEAD, CORS, errors and bounds.

Malformed input is written with raw sockets; after every bad case a normal client must
still be served (``check_serving``: an SSE subscriber receives an API publication).
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from helpers import (
    RawConn,
    api,
    check_serving,
    publish_request,
    request_bytes,
    unique_channel,
)

SLOW_CONFIG = """
[timeouts]
request = 1.0
keepalive = 1.0
"""
# Generous upper bound for "the server closed it": timeouts above are 1 s.
CLOSE_WITHIN = 8.0


def test_health(server):
    resp = httpx.get(server.url + "/health")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json()["status"] == "ok"


def test_keep_alive_serves_several_requests_on_one_connection(server):
    ch = unique_channel()
    with RawConn(server) as conn:
        offsets = []
        for i in range(3):
            conn.send(request_bytes("GET", "/health"))
            resp = conn.read_response()
            assert resp.status == 200
            assert resp.json()["status"] == "ok"
            conn.send(publish_request(ch, {"i": i}))
            resp = conn.read_response()
            assert resp.status == 200, resp
            offsets.append(resp.json()["result"]["offset"])
        assert offsets == sorted(offsets) and len(set(offsets)) == 3
        # Still open after all that: one more request is answered.
        conn.send(request_bytes("GET", "/health"))
        assert conn.read_response().status == 200


def test_httpx_client_reuses_connection(server):
    ch = unique_channel()
    with httpx.Client(base_url=server.url) as client:
        streams = set()
        for i in range(5):
            resp = client.post("/api/publish", json={"channel": ch, "data": i})
            assert resp.status_code == 200
            streams.add(id(resp.extensions["network_stream"]))
        assert len(streams) == 1


def test_pipelined_requests_are_answered_in_order(server):
    ch = unique_channel()
    with RawConn(server) as conn:
        conn.send(
            publish_request(ch, "first")
            + request_bytes("GET", "/no/such/path")
            + publish_request(ch, "third")
        )
        r1, r2, r3 = (conn.read_response() for _ in range(3))
    assert r1.status == 200 and r2.status == 404 and r3.status == 200
    assert r3.json()["result"]["offset"] > r1.json()["result"]["offset"]
    hist = api(server, "history", {"channel": ch, "limit": -1}).json()["result"]
    assert [p["data"] for p in hist["publications"]] == ["first", "third"]


def test_pipelined_gets(server):
    with RawConn(server) as conn:
        conn.send(request_bytes("GET", "/health") * 3)
        for _ in range(3):
            resp = conn.read_response()
            assert resp.status == 200 and resp.json()["status"] == "ok"


def test_chunked_request_body(server):
    ch = unique_channel()
    body = json.dumps({"channel": ch, "data": {"text": "chunked" * 50}}).encode()
    parts = [body[:7], body[7:100], body[100:]]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    head = request_bytes(
        "POST",
        "/api/publish",
        headers={"Transfer-Encoding": "chunked", "Content-Type": "application/json"},
    )
    with RawConn(server) as conn:
        conn.send(head)
        for i in range(0, len(chunked), 40):  # trickle the chunks in several writes
            conn.send(chunked[i : i + 40])
        resp = conn.read_response()
        assert resp.status == 200, resp
        assert resp.json()["result"]["offset"] >= 1
        # Keep-alive survives a chunked body.
        conn.send(request_bytes("GET", "/health"))
        assert conn.read_response().status == 200
    hist = api(server, "history", {"channel": ch, "limit": -1}).json()["result"]
    assert [p["data"] for p in hist["publications"]] == [{"text": "chunked" * 50}]


def test_httpx_streamed_body_is_accepted(server):
    ch = unique_channel()
    payload = json.dumps({"channel": ch, "data": [1, 2, 3]}).encode()

    def gen():
        yield payload[:10]
        yield payload[10:]

    resp = httpx.post(server.url + "/api/publish", content=gen())
    assert resp.status_code == 200, resp.text
    assert "offset" in resp.json()["result"]


def test_head_health_has_no_body(server):
    with RawConn(server) as conn:
        conn.send(request_bytes("HEAD", "/health") + request_bytes("GET", "/health"))
        head = conn.read_response(head=True)
        assert head.status == 200
        # The next bytes on the wire must be the GET's status line, not a body.
        get = conn.read_response()
        assert get.status == 200 and get.json()["status"] == "ok"
        if head.header("content-length") is not None:
            assert int(head.header("content-length") or 0) == len(get.body)


def test_unknown_path_is_404(server):
    resp = httpx.get(server.url + "/nope")
    assert resp.status_code == 404
    assert isinstance(resp.json()["error"]["code"], int)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("POST", "/health", "GET"), ("GET", "/api/publish", "POST"), ("DELETE", "/sse", "GET")],
)
def test_wrong_method_is_405_with_allow(server, method, path, allowed):
    resp = httpx.request(method, server.url + path)
    assert resp.status_code == 405
    allow = resp.headers.get("allow")
    assert allow is not None, resp.headers
    assert allowed in [m.strip() for m in allow.split(",")]
    assert "error" in resp.json()


def test_cors_preflight(server_factory):
    srv = server_factory('allowed_origins = ["https://app.example"]\n')
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, x-api-key",
    }
    ok = httpx.options(
        srv.url + "/api/publish", headers={"Origin": "https://app.example", **preflight}
    )
    assert ok.status_code in (200, 204), ok
    assert ok.headers.get("access-control-allow-origin") == "https://app.example"
    assert "POST" in ok.headers.get("access-control-allow-methods", "").upper()
    allowed_headers = ok.headers.get("access-control-allow-headers", "").lower()
    assert "content-type" in allowed_headers or allowed_headers == "*"

    bad = httpx.options(
        srv.url + "/api/publish", headers={"Origin": "https://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in bad.headers

    # Simple (non-preflight) requests from an allowed origin carry the header too.
    ch = unique_channel()
    simple = httpx.get(
        srv.url + "/poll", params={"channel": ch}, headers={"Origin": "https://app.example"}
    )
    assert simple.status_code == 200
    assert simple.headers.get("access-control-allow-origin") == "https://app.example"
    other = httpx.get(
        srv.url + "/poll", params={"channel": ch}, headers={"Origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in other.headers
    check_serving(srv)


def test_no_cors_headers_by_default(server):
    resp = httpx.get(server.url + "/health", headers={"Origin": "https://app.example"})
    assert resp.status_code == 200
    assert "access-control-allow-origin" not in resp.headers


# --------------------------------------------------------------------------- bounds


def test_huge_header_is_431(server):
    with RawConn(server) as conn:
        conn.send(request_bytes("GET", "/health", headers={"X-Big": "a" * 20_000}))
        resp = conn.read_response()
        assert resp.status == 431
    check_serving(server)


def test_many_headers_over_the_head_limit_is_431(server):
    headers = {f"X-H{i}": "v" * 100 for i in range(200)}  # ~21 KB of small headers
    with RawConn(server) as conn:
        conn.send(request_bytes("GET", "/health", headers=headers))
        assert conn.read_response().status == 431
    check_serving(server)


def test_huge_request_line_is_431(server):
    with RawConn(server) as conn:
        conn.send(request_bytes("GET", "/health?x=" + "a" * 20_000))
        assert conn.read_response().status == 431
    check_serving(server)


def test_body_over_max_body_size_is_413(server_factory):
    srv = server_factory("[limits]\nmax_body_size = 1024\n")
    ch = unique_channel()
    body = json.dumps({"channel": ch, "data": "x" * 4000}).encode()
    with RawConn(srv) as conn:
        conn.send(request_bytes("POST", "/api/publish", body))
        resp = conn.read_response()
        assert resp.status == 413
    # Chunked bodies are bounded as well.
    chunked = (
        b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 500]), body[i : i + 500])
            for i in range(0, len(body), 500)
        )
        + b"0\r\n\r\n"
    )
    with RawConn(srv) as conn:
        conn.send(
            request_bytes("POST", "/api/publish", headers={"Transfer-Encoding": "chunked"})
            + chunked
        )
        assert conn.read_response().status == 413
    # A body under the limit still works, and nothing over it was published.
    small = httpx.post(srv.url + "/api/publish", json={"channel": ch, "data": "ok"})
    assert small.status_code == 200
    hist = api(srv, "history", {"channel": ch, "limit": -1}).json()["result"]
    assert [p["data"] for p in hist["publications"]] == ["ok"]
    check_serving(srv)


def test_garbage_is_400_then_close(server):
    with RawConn(server) as conn:
        conn.send(b"HELLO\r\n\r\n")
        resp = conn.read_response()
        assert resp.status == 400
        assert conn.closed_by_peer(CLOSE_WITHIN)
    check_serving(server)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(40)) + b"\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET /health HTTP/1.1\r\nBad Header Line\r\n\r\n",
        b"POST /api/publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n",
    ],
    ids=["tls-hello", "bad-content-length", "bad-header", "bad-chunk"],
)
def test_malformed_requests_are_400_then_close(server, garbage):
    with RawConn(server) as conn:
        conn.send(garbage)
        resp = conn.read_response()
        assert resp.status == 400
        assert conn.closed_by_peer(CLOSE_WITHIN)
    check_serving(server)


def test_slowloris_is_closed_after_request_timeout(server_factory):
    srv = server_factory(SLOW_CONFIG)
    with RawConn(srv) as conn:
        conn.send(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        deadline = time.monotonic() + CLOSE_WITHIN
        closed = False
        i = 0
        while time.monotonic() < deadline:
            try:
                conn.send(b"X-Trickle-%d: y\r\n" % i)
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            i += 1
            if conn.closed_by_peer(0.3):
                closed = True
                break
        assert closed, "a client trickling its headers was never closed"
    check_serving(srv)


def test_slow_body_is_closed_after_request_timeout(server_factory):
    srv = server_factory(SLOW_CONFIG)
    with RawConn(srv) as conn:
        conn.send(request_bytes("POST", "/api/publish", headers={"Content-Length": "1000"}))
        conn.send(b'{"channel":')
        assert conn.closed_by_peer(CLOSE_WITHIN)
    check_serving(srv)


def test_idle_keepalive_connection_is_closed(server_factory):
    srv = server_factory(SLOW_CONFIG)
    with RawConn(srv) as conn:
        conn.send(request_bytes("GET", "/health"))
        assert conn.read_response().status == 200
        assert conn.closed_by_peer(CLOSE_WITHIN)
    check_serving(srv)


def test_connection_that_never_sends_is_closed(server_factory):
    srv = server_factory(SLOW_CONFIG)
    with RawConn(srv) as conn:
        assert conn.closed_by_peer(CLOSE_WITHIN)
    check_serving(srv)


def test_streams_are_not_closed_by_request_timeouts(server_factory):
    """SSE is a long response, not a slow request: timeouts.request must not cut it."""
    from helpers import SSEClient, publish

    srv = server_factory(SLOW_CONFIG + "[sse]\nheartbeat_interval = 0.5\n")
    ch = unique_channel()
    with SSEClient(srv, [ch]) as sse:
        sse.subscribed()
        # Wait for heartbeats past both 1 s timeouts.
        beats = 0
        while beats < 4:
            ev = sse.next()
            if ev.is_ping:
                beats += 1
        publish(srv, ch, "still here")
        (ev,) = sse.publications(1)
        assert ev.json["data"] == "still here"


def test_many_bad_clients_do_not_disturb_a_subscriber(server):
    from helpers import SSEClient, publish

    ch = unique_channel()
    with SSEClient(server, [ch]) as sse:
        sse.subscribed()
        for bad in (b"HELLO\r\n\r\n", b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n"):
            for _ in range(5):
                with RawConn(server) as conn:
                    conn.send(bad)
                    assert conn.read_response().status in (400, 431)
        publish(server, ch, 1)
        (ev,) = sse.publications(1)
        assert ev.json["data"] == 1


def test_pipelined_request_behind_a_held_long_poll_waits_its_turn(server):
    from helpers import poll_ok

    ch = unique_channel()
    cursor = poll_ok(server, [ch])["cursor"]
    with RawConn(server) as conn:
        conn.send(
            request_bytes("GET", f"/poll?channel={ch}&cursor={cursor}&timeout=1")
            + request_bytes("GET", "/health")
        )
        first = conn.read_response()
        second = conn.read_response()
    assert first.status == 200 and first.json()["publications"] == []
    assert second.status == 200 and second.json()["status"] == "ok"


def test_http_1_0_and_connection_close_are_honoured(server):
    with RawConn(server) as conn:
        conn.send(b"GET /health HTTP/1.0\r\n\r\n")
        assert conn.read_response().status == 200
        assert conn.closed_by_peer(CLOSE_WITHIN)
    with RawConn(server) as conn:
        conn.send(request_bytes("GET", "/health", headers={"Connection": "close"}))
        resp = conn.read_response()
        assert resp.status == 200
        assert (resp.header("connection") or "").lower() == "close"
        assert conn.closed_by_peer(CLOSE_WITHIN)


def test_expect_100_continue(server):
    ch = unique_channel()
    body = json.dumps({"channel": ch, "data": "continued"}).encode()
    with RawConn(server) as conn:
        conn.send(
            request_bytes(
                "POST",
                "/api/publish",
                headers={
                    "Content-Length": str(len(body)),
                    "Content-Type": "application/json",
                    "Expect": "100-continue",
                },
            )
        )
        interim = conn.read_response()
        assert interim.status == 100
        conn.send(body)
        resp = conn.read_response()
        assert resp.status == 200 and "offset" in resp.json()["result"]


def test_head_on_stream_endpoints_has_no_body(server):
    ch = unique_channel()
    with RawConn(server) as conn:
        conn.send(
            request_bytes("HEAD", f"/sse?channel={ch}")
            + request_bytes("HEAD", f"/poll?channel={ch}")
            + request_bytes("GET", "/health")
        )
        sse = conn.read_response(head=True)
        assert sse.status == 200
        assert (sse.header("content-type") or "").startswith("text/event-stream")
        assert conn.read_response(head=True).status == 200
        assert conn.read_response().json()["status"] == "ok"


def test_slow_sse_reader_is_cut_off_and_others_are_not(server_factory):
    """A subscriber that stops reading is disconnected once its buffer is full."""
    import socket

    from helpers import SSEClient, publish

    srv = server_factory("[limits]\nmax_write_buffer = 65536\n")
    ch = unique_channel()
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.settimeout(10)
    slow.connect((srv.host, srv.port))
    slow.sendall(request_bytes("GET", f"/sse?channel={ch}"))
    head = b""
    while b"event: subscribed" not in head:
        head += slow.recv(4096)
    big = "x" * 100_000
    with SSEClient(srv, [ch]) as good:
        good.subscribed()
        got: list[int] = []
        reader = threading.Thread(
            target=lambda: got.extend(ev.json["data"]["i"] for ev in good.publications(60))
        )
        reader.start()  # the good subscriber reads while we publish
        for i in range(60):  # 6 MB: more than kernel buffers and max_write_buffer
            publish(srv, ch, {"i": i, "pad": big})
        reader.join(30)
        assert got == list(range(60))
    # The slow reader's connection was closed (reset) by the server.
    closed = False
    deadline = time.monotonic() + CLOSE_WITHIN
    try:
        while time.monotonic() < deadline:
            if not slow.recv(1 << 20):
                closed = True
                break
    except ConnectionResetError:
        closed = True
    except TimeoutError:
        pass
    finally:
        slow.close()
    assert closed, "a subscriber that stopped reading was never disconnected"
    assert "slow" in srv.logs().lower()
    check_serving(srv)


def test_many_pipelined_requests_are_all_answered(server):
    """More pipelined requests than limits.max_pipelined_requests (32): backpressure, no loss."""
    ch = unique_channel()
    n = 200
    with RawConn(server) as conn:
        conn.send(b"".join(publish_request(ch, i) for i in range(n)))
        offsets = []
        for _ in range(n):
            resp = conn.read_response()
            assert resp.status == 200
            offsets.append(resp.json()["result"]["offset"])
    assert offsets == sorted(offsets) and len(set(offsets)) == n
    hist = api(server, "history", {"channel": ch, "limit": -1}).json()["result"]
    assert [p["data"] for p in hist["publications"]] == list(range(n - 100, n))  # history.size


def test_content_length_with_chunked_is_refused(server):
    """Both framings at once is how requests get smuggled: refuse with 400."""
    body = b'{"channel":"x","data":1}'
    with RawConn(server) as conn:
        conn.send(
            b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        )
        assert conn.read_response().status == 400
    check_serving(server)
