"""Hostile input against a real server: invalid UTF-8, lone surrogates, deep nesting, proxies.

Nothing invalid may be stored or forwarded: a publication whose ``data`` holds
invalid UTF-8 would be pushed inside a text frame, and every conforming
subscriber would then have to fail its own connection. Each test plays the
hostile client with a client we did not write (the ``websockets`` sync client,
httpx, curl-like raw sockets), then shows that a normal client is still served
and that the server logged the mistake quietly (no traceback, no ERROR line).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import msgspec
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from helpers import TIMEOUT, RawConn, api, check_serving, publish, request_bytes, unique_channel
from tidings.api import PublishParams, decode_params
from tidings.centrifuge import BadRequest, decode_commands
from tidings.errors import ErrorCode, ProtocolError
from tidings.http.messages import Headers, Request
from tidings.logs import ClientErrorLimiter
from tidings.utf8 import invalid_utf8_field
from ws_support import RawClient, connect_raw

#: Byte sequences that are not UTF-8: a byte that never occurs, an overlong
#: encoding of "/", a UTF-8-encoded surrogate (CESU-8), a truncated sequence.
INVALID_UTF8 = [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82"]


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def ws_connected(srv: Any) -> Iterator[ClientConnection]:
    """A ``websockets`` client that has sent ``connect`` and read the reply."""
    with connect(srv.ws_url + "/connection/websocket", open_timeout=TIMEOUT, proxy=None) as ws:
        ws.send('{"id":1,"connect":{}}')
        reply = json.loads(ws.recv(timeout=TIMEOUT))
        assert "connect" in reply, reply
        yield ws


def close_code(ws: ClientConnection) -> int | None:
    """Read until the server closes the connection; its close code."""
    with pytest.raises(ConnectionClosed):
        while True:
            ws.recv(timeout=TIMEOUT)
    rcvd = ws.protocol.close_rcvd
    return rcvd.code if rcvd is not None else None


def history(srv: Any, channel: str) -> list[dict[str, Any]]:
    body = api(srv, "history", {"channel": channel, "limit": -1}).json()
    pubs: list[dict[str, Any]] = body["result"].get("publications", [])
    return pubs


def assert_nothing_stored_or_pushed(srv: Any, channel: str, subscriber: RawClient) -> None:
    """History is empty, and the subscriber's first push is the valid one published now."""
    assert history(srv, channel) == []
    res = publish(srv, channel, {"valid": True})
    push = subscriber.wait_for(lambda m: "push" in m)
    assert push["push"]["pub"]["data"] == {"valid": True}, push
    assert push["push"]["pub"]["offset"] == res["offset"]


def log_mark(srv: Any) -> int:
    """Where the server's log stands now: the test checks what it logs from here."""
    return len(srv.logs())


def assert_logged_quietly(srv: Any, mark: int = 0) -> None:
    """No traceback and no ERROR line since ``mark``: client mistakes are logged quietly."""
    logs = srv.logs()[mark:]
    assert "Traceback" not in logs, logs[-4000:]
    assert not re.search(r"\b(ERROR|CRITICAL)\b", logs), logs[-4000:]


def api_raw(
    srv: Any, method: str, body: bytes = b"{}", headers: dict[str, str] | None = None
) -> httpx.Response:
    """``POST /api/<method>`` with ``body`` as it is (httpx's ``json=`` cannot send bad bytes)."""
    headers = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(f"{srv.url}/api/{method}", content=body, headers=headers, timeout=TIMEOUT)


# --------------------------------------------------------------------------- WebSocket


@pytest.mark.parametrize("bad", INVALID_UTF8)
@pytest.mark.parametrize(
    "template",
    [
        b'{"id":2,"subscribe":{"channel":"a%s"}}',
        b'{"id":2,"publish":{"channel":"a","data":{"text":"%s"}}}',
        b'{"id":2,"history":{"channel":"a"},"unknown":"%s"}',
        b'{"id":2,"rpc":{"method":"m","data":"%s"}}',
    ],
    ids=["str-field", "raw-data", "ignored-field", "rpc-data"],
)
def test_invalid_utf8_in_a_binary_command_frame_closes_1007(
    server: Any, template: bytes, bad: bytes
) -> None:
    mark = log_mark(server)
    channel = unique_channel("watch")
    watcher = connect_raw(server.ws_url, (channel,))
    with ws_connected(server) as ws:
        ws.send(template.replace(b"%s", bad))  # bytes: a binary frame
        assert close_code(ws) == 1007
    assert_nothing_stored_or_pushed(server, channel, watcher)
    watcher.close()
    assert_logged_quietly(server, mark)


@pytest.mark.parametrize("bad", INVALID_UTF8)
def test_invalid_utf8_in_ws_publish_data_is_neither_stored_nor_pushed(
    server: Any, bad: bytes
) -> None:
    mark = log_mark(server)
    channel = unique_channel("utf8")
    subscriber = connect_raw(server.ws_url, (channel,))
    with ws_connected(server) as ws:
        ws.send(b'{"id":2,"publish":{"channel":"%s","data":"x%sy"}}' % (channel.encode(), bad))
        assert close_code(ws) == 1007
    assert_nothing_stored_or_pushed(server, channel, subscriber)
    subscriber.close()
    assert_logged_quietly(server, mark)


@pytest.mark.parametrize(
    "command",
    [
        rb'{"id":2,"subscribe":{"channel":"\ud800"}}',
        rb'{"id":2,"publish":{"channel":"CH","data":"\udc00"}}',
        rb'{"id":2,"publish":{"channel":"CH","data":{"k":"\ud800x"}}}',
        b'{"id":2,"publish":{"channel":"CH","data":' + b"[" * 10_000 + b"]" * 10_000 + b"}}",
        b'{"id":2,"publish":{"channel":"CH","data":NaN}}',
        b'{"id":18446744073709551616,"publish":{"channel":"CH","data":1}}',
    ],
    ids=["surrogate-channel", "surrogate-data", "surrogate-nested", "deep", "nan", "huge-id"],
)
def test_undecodable_commands_close_3501_and_store_nothing(server: Any, command: bytes) -> None:
    """Valid UTF-8 on the wire, but no valid command: 3501 (never 3004 and a traceback)."""
    mark = log_mark(server)
    channel = unique_channel("esc")
    subscriber = connect_raw(server.ws_url, (channel,))
    with ws_connected(server) as ws:
        ws.send(command.replace(b"CH", channel.encode()).decode())  # a text frame
        assert close_code(ws) == 3501
    assert_nothing_stored_or_pushed(server, channel, subscriber)
    subscriber.close()
    assert_logged_quietly(server, mark)


# --------------------------------------------------------------------------- server API


@pytest.mark.parametrize("bad", INVALID_UTF8)
@pytest.mark.parametrize(
    ("method", "template", "field"),
    [
        ("publish", b'{"channel":"CH","data":{"text":"%s"}}', "data"),
        ("publish", b'{"channel":"CH","data":"ok","tags":{"t":"%s"}}', "tags"),
        ("broadcast", b'{"channels":["CH"],"data":"%s"}', "data"),
        ("broadcast", b'{"channels":["CH","%s"],"data":"ok"}', "channels"),
    ],
)
def test_invalid_utf8_in_an_api_body_is_400_naming_the_field(
    server: Any, method: str, template: bytes, field: str, bad: bytes
) -> None:
    mark = log_mark(server)
    channel = unique_channel("api")
    subscriber = connect_raw(server.ws_url, (channel,))
    body = template.replace(b"CH", channel.encode()).replace(b"%s", bad)
    resp = api_raw(server, method, body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == {"code": 107, "message": f"invalid UTF-8 in field {field}"}
    assert_nothing_stored_or_pushed(server, channel, subscriber)
    subscriber.close()
    assert_logged_quietly(server, mark)


@pytest.mark.parametrize(
    "body",
    [
        rb'{"channel":"CH","data":"\ud800"}',
        rb'{"channel":"CH","data":{"k":"\udc00"}}',
        rb'{"channel":"\ud800","data":1}',
        b'{"channel":"CH","data":' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        b'{"channel":"CH","data":Infinity}',
    ],
    ids=["surrogate-data", "surrogate-nested", "surrogate-channel", "deep", "infinity"],
)
def test_undecodable_api_bodies_are_400_and_store_nothing(server: Any, body: bytes) -> None:
    mark = log_mark(server)
    channel = unique_channel("api")
    subscriber = connect_raw(server.ws_url, (channel,))
    resp = api_raw(server, "publish", body.replace(b"CH", channel.encode()))
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == 107
    assert_nothing_stored_or_pushed(server, channel, subscriber)
    subscriber.close()
    assert_logged_quietly(server, mark)


@pytest.mark.parametrize("header", ["X-Forwarded-For", "X-Real-IP", "Forwarded"])
def test_a_proxied_api_request_is_not_trusted_as_loopback(server: Any, header: str) -> None:
    """Behind a reverse proxy on the same host every request comes from 127.0.0.1."""
    value = "for=203.0.113.7" if header == "Forwarded" else "203.0.113.7"
    assert api_raw(server, "info").status_code == 200  # loopback, no proxy header: trusted
    resp = api_raw(server, "info", headers={header: value})
    assert resp.status_code == 401, resp.text
    assert resp.json()["error"]["code"] == 101


def test_a_proxied_request_with_the_key_is_served(server_factory: Any) -> None:
    srv = server_factory(config='api_key = "k3y-for-the-proxy-test"\n')
    proxied = {"X-Forwarded-For": "203.0.113.7"}
    assert api_raw(srv, "info", headers=proxied).status_code == 401
    resp = api_raw(srv, "info", headers={**proxied, "X-API-Key": "k3y-for-the-proxy-test"})
    assert resp.status_code == 200, resp.text


# --------------------------------------------------------------------------- SSE and poll


@pytest.mark.parametrize(
    "escaped",
    ["%FF", "%C0%AF", "%ED%A0%80", "%E2%82", "%EF%BF%BD"],
    ids=["ff", "overlong", "surrogate", "truncated", "replacement-char"],
)
@pytest.mark.parametrize("path", ["/sse", "/poll"])
def test_invalid_utf8_in_a_query_channel_is_400(server: Any, path: str, escaped: str) -> None:
    """Never mangled into U+FFFD, which would name another channel."""
    mark = log_mark(server)
    with RawConn(server) as conn:
        conn.send(request_bytes("GET", f"{path}?channel=news{escaped}&timeout=0"))
        resp = conn.read_response()
    assert resp.status == 400, resp.body
    assert resp.json()["error"]["code"] == 107
    check_serving(server)
    assert_logged_quietly(server, mark)


@pytest.mark.parametrize(
    "raw",
    [b"[" * 10_000, b'[["ch","\\ud800",1]]', b'[["ch","e",1e400]]', b'[["ch","\xff",1]]'],
    ids=["deep", "surrogate", "huge-float", "invalid-utf8"],
)
def test_hostile_cursors_are_400(server: Any, raw: bytes) -> None:
    mark = log_mark(server)
    cursor = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    with RawConn(server) as conn:
        conn.send(request_bytes("GET", f"/poll?channel=news&timeout=0&cursor={cursor}"))
        resp = conn.read_response()
    assert resp.status == 400, resp.body
    assert resp.json()["error"] == {"code": 107, "message": "malformed cursor"}
    assert_logged_quietly(server, mark)


# --------------------------------------------------------------------------- signed tokens

TOKEN_SECRET = "a-test-secret-of-at-least-32-bytes!"
TOKEN_CONFIG = f"""
[auth]
hmac_secret = "{TOKEN_SECRET}"

[channels]
subscribe = "anonymous"
"""


def signed(claims: dict[str, Any]) -> str:
    return jwt.encode({"exp": int(time.time()) + 600, **claims}, TOKEN_SECRET, algorithm="HS256")


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "\ud800"},
        {"sub": "42", "info": {"name": "\udc00"}},
        {"sub": "42", "channels": ["\ud800"]},
    ],
    ids=["sub", "info", "channels"],
)
def test_a_signed_token_whose_claims_hold_a_lone_surrogate_is_invalid(
    server_factory: Any, claims: dict[str, Any]
) -> None:
    """JSON allows ``"\\ud800"`` and PyJWT's decoder accepts it, but no UTF-8 encoder
    can write it: such a user id or info would break every push that carries it."""
    srv = server_factory(config=TOKEN_CONFIG)
    good = signed({"sub": "42"})
    with connect(srv.ws_url + "/connection/websocket", open_timeout=TIMEOUT, proxy=None) as ws:
        ws.send(json.dumps({"id": 1, "connect": {"token": good}}))
        assert "connect" in json.loads(ws.recv(timeout=TIMEOUT))  # the same, unattacked
    with connect(srv.ws_url + "/connection/websocket", open_timeout=TIMEOUT, proxy=None) as ws:
        ws.send(json.dumps({"id": 1, "connect": {"token": signed(claims)}}))
        assert close_code(ws) == 3500
    resp = httpx.get(
        f"{srv.url}/poll", params={"channel": "news", "timeout": "0", "token": signed(claims)}
    )
    assert resp.status_code == 401, resp.text
    check_serving(srv)
    assert_logged_quietly(srv)


# --------------------------------------------------------------------------- log flooding


def _count(logs: str, needle: str) -> int:
    return sum(needle in line for line in logs.splitlines())


def test_500_bad_api_requests_log_a_bounded_number_of_lines(server_factory: Any) -> None:
    srv = server_factory()
    before = len(srv.logs().splitlines())
    with httpx.Client(timeout=TIMEOUT) as client:
        for _ in range(500):
            resp = client.post(f"{srv.url}/api/publish", content=b'{"channel":"a","data":"\xff"}')
            assert resp.status_code == 400
    check_serving(srv)
    # One summary line when the interval ends: wait for it (the flood's record).
    deadline = time.monotonic() + 30
    while "suppressed" not in srv.logs() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = srv.logs().splitlines()[before:]
    summaries = [line for line in lines if "suppressed" in line]
    refusals = [line for line in lines if "bad API request" in line and line not in summaries]
    assert 1 <= len(refusals) <= 10, lines
    assert len(summaries) == 1, lines
    assert f"suppressed {500 - len(refusals)} similar messages" in summaries[0]
    assert len(lines) <= 20, lines  # nothing else logs each refusal
    assert_logged_quietly(srv)


def test_500_bad_ws_commands_log_a_bounded_number_of_lines(server_factory: Any) -> None:
    srv = server_factory()
    mark = log_mark(srv)
    for _ in range(500):
        with ws_connected(srv) as ws:
            ws.send(b'{"id":2,"subscribe":{"channel":"\xff"}}')
            assert close_code(ws) == 1007
    check_serving(srv)
    logs = srv.logs()[mark:]
    assert 1 <= _count(logs, "tidings.centrifuge.session: bad frame") <= 10, logs[-4000:]
    # Each kind of line (the session's, the transport's) 10 times at most, and
    # a summary per kind whose interval ended meanwhile.
    assert len(logs.splitlines()) <= 30, logs[-4000:]
    assert_logged_quietly(srv)


def test_500_refused_http_requests_log_a_bounded_number_of_lines(server_factory: Any) -> None:
    srv = server_factory()
    for _ in range(500):
        with RawConn(srv) as conn:
            conn.send(
                b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n"
            )
            assert conn.read_response().status == 413  # logged at INFO (a 400 at DEBUG)
    check_serving(srv)
    logs = srv.logs()
    assert 1 <= _count(logs, "tidings.http.connection: refusing request") <= 10, logs[-4000:]
    assert_logged_quietly(srv)


# --------------------------------------------------------------------------- sans-I/O units


@pytest.mark.parametrize(
    ("payload", "code", "reason"),
    [
        (b'{"id":1,"publish":{"channel":"a","data":"\xff"}}', 1007,
         "invalid UTF-8 in publish.data"),
        (b'{"id":1,"connect":{}}\n{"id":2,"subscribe":{"channel":"\xc0\xaf"}}', 1007,
         "invalid UTF-8 in subscribe.channel"),
        (b'{"id":1,"\xff":1}', 1007, "invalid UTF-8"),
        (b'{"id":1,"publish":{"channel":"a","data":' + b"[" * 10_000 + b"]" * 10_000 + b"}}",
         3501, "bad request"),
        (rb'{"id":1,"subscribe":{"channel":"\ud800"}}', 3501, "bad request"),
        (b'{"id":4294967296}', 3501, "bad request"),
        (b'{"id":1,"history":{"channel":"a","since":{"offset":-1}}}', 3501, "bad request"),
        (b"[1]", 3501, "bad request"),
        (b"  \n ", 3501, "bad request"),
    ],
)  # fmt: skip
def test_decode_commands_maps_every_decoder_error_to_one_close(
    payload: bytes, code: int, reason: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        decode_commands(payload)
    assert caught.value.disconnect == (code, reason)


def test_decode_commands_keeps_valid_non_ascii_data() -> None:
    (cmd,) = decode_commands('{"id":1,"publish":{"channel":"é","data":"😀"}}'.encode())
    assert cmd.publish is not None and cmd.publish.channel == "é"
    assert bytes(cmd.publish.data).decode() == '"😀"'


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"channel":"a","data":{"x":"\xff"}}', "invalid UTF-8 in field data"),
        (b'{"channel":"a\xff","data":1}', "invalid UTF-8 in field channel"),
        (b'{"\xff":1}', "invalid UTF-8 in the body"),
        (b'{"channel":"a","data":' + b"[" * 10_000 + b"]" * 10_000 + b"}",
         "bad request: JSON nested too deeply"),
        (rb'{"channel":"a","data":"\udc00"}', "bad request: JSON is malformed"),
        (b'{"channel":"a"}', "bad request: Object missing required field `data`"),
    ],
)  # fmt: skip
def test_decode_params_maps_every_decoder_error_to_400(body: bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_params(msgspec.json.Decoder(PublishParams), body)
    assert caught.value.code == ErrorCode.BAD_REQUEST
    assert caught.value.message.startswith(message), caught.value.message


def test_invalid_utf8_field_names_at_most_64_bytes_of_a_client_chosen_path() -> None:
    long_name = "é" * 100
    document = b'{"%s":{"x":"\xff"}}' % long_name.encode()
    path = invalid_utf8_field(document, depth=2)
    assert path.startswith("éé") and path.endswith("...")
    assert len(path.encode()) <= 64


def _request(query: str = "", headers: list[tuple[bytes, bytes]] | None = None) -> Request:
    return Request("GET", b"/poll", "/poll", query, Headers(headers or []), ("127.0.0.1", 5), True)


@pytest.mark.parametrize(
    "query", ["channel=%FF", "channel=a%ED%A0%80", "channel=\ufffd", "c=%EF%BF%BD"]
)
def test_query_that_is_not_utf8_is_refused(query: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        _request(query).query  # noqa: B018 - the property parses
    assert caught.value.message == "invalid UTF-8 in the query string"


def test_query_keeps_escaped_utf8() -> None:
    assert _request("channel=caf%C3%A9&channel=b+c").query == {"channel": ["café", "b c"]}


@pytest.mark.parametrize("header", [b"forwarded", b"x-forwarded-for", b"x-real-ip"])
def test_proxied_request_is_not_loopback(header: bytes) -> None:
    assert _request().is_loopback
    assert not _request(headers=[(header, b"127.0.0.1")]).is_loopback


def test_limiter_logs_max_lines_per_interval_then_one_summary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    limiter = ClientErrorLimiter(max_lines=3, interval=10.0, clock=lambda: now[0])
    logger = logging.getLogger("tidings.test-limiter")
    with caplog.at_level(logging.DEBUG, logger=logger.name):
        for n in range(100):
            limiter.log(logger, logging.INFO, "bad thing %d", n)
        limiter.log(logger, logging.INFO, "another kind")  # its own budget
        now[0] = 10.0  # the interval is over: the next line sums it up
        limiter.log(logger, logging.INFO, "bad thing %d", 100)
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "bad thing 0",
        "bad thing 1",
        "bad thing 2",
        "another kind",
        "suppressed 97 similar messages in 10s; the last: bad thing 99",
        "bad thing 100",
    ]
    assert all(record.levelno == logging.INFO and not record.exc_info for record in caplog.records)


def test_limiter_escapes_control_characters_so_a_client_cannot_forge_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = ClientErrorLimiter()
    logger = logging.getLogger("tidings.test-limiter-escape")
    forged = "x\n2026-01-01 00:00:00,000 ERROR   [1] tidings: forged"
    with caplog.at_level(logging.INFO, logger=logger.name):
        limiter.log(logger, logging.INFO, "bad channel %s: %s", forged, ValueError(forged))
        limiter.log(logger, logging.INFO, "fine %s", "café")
    assert [record.getMessage() for record in caplog.records] == [
        "bad channel x\\n2026-01-01 00:00:00,000 ERROR   [1] tidings: forged: "
        "x\\n2026-01-01 00:00:00,000 ERROR   [1] tidings: forged",
        "fine café",
    ]
