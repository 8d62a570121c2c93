"""The API client's calls without a server: what each method sends, how answers read.

``tidings.client.calls`` holds each method once; the httpx shells must only
send it. The shells are driven here through ``httpx.MockTransport`` (httpx's
own test transport), so the sync and async clients are seen to send the same
bytes and return the same results; tests/test_client_python.py runs them
against real servers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import pytest

from tidings.client import APIClient, APIError, PublishResult, SyncAPIClient, calls

pytestmark = pytest.mark.unit


def body_of(call: calls.Call[Any]) -> Any:
    return json.loads(call.body())


def test_parameters_left_unset_are_not_sent() -> None:
    assert body_of(calls.publish("news", {"a": 1})) == {"channel": "news", "data": {"a": 1}}
    assert body_of(calls.publish("news", None, tags={"k": "v"})) == {
        "channel": "news",
        "tags": {"k": "v"},
    }
    assert body_of(calls.history("news")) == {"channel": "news"}
    assert body_of(calls.history("news", limit=-1, since=("e", 4), reverse=True)) == {
        "channel": "news",
        "limit": -1,
        "since": {"epoch": "e", "offset": 4},
        "reverse": True,
    }
    assert body_of(calls.disconnect("u")) == {"user": "u"}
    assert body_of(calls.disconnect("u", client="c", code=4000)) == {
        "user": "u",
        "client": "c",
        "disconnect": {"code": 4000},
    }
    assert body_of(calls.channels()) == {}
    assert calls.info().method == "info"


def test_endpoint_url_and_api_key_header() -> None:
    endpoint = calls.Endpoint("http://h:1/", None)
    assert endpoint.url(calls.info()) == "http://h:1/api/info"
    assert "X-API-Key" not in endpoint.headers
    assert calls.Endpoint("http://h:1", "k").headers["X-API-Key"] == "k"


def test_a_result_is_typed() -> None:
    read = calls.publish("news", 1).read
    assert read(200, b'{"result":{"offset":3,"epoch":"e"}}') == PublishResult(offset=3, epoch="e")
    assert calls.disconnect("u").read(200, b'{"result":{}}') is None


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, b'{"error":{"code":107,"message":"bad request"}}', (107, "bad request", 200)),
        (401, b'{"error":{"code":101,"message":"unauthorized"}}', (101, "unauthorized", 401)),
        (502, b"<html>bad gateway</html>", (0, "HTTP 502: <html>bad gateway</html>", 502)),
        (200, b"[1, 2]", (0, "unexpected answer: [1, 2]", 200)),
        (200, b"{}", (0, "HTTP 200: {}", 200)),
        (500, b'{"result":{}}', (0, 'HTTP 500: {"result":{}}', 500)),
    ],
)
def test_errors_and_foreign_answers_raise_api_error(
    status: int, body: bytes, expected: tuple[int, str, int]
) -> None:
    with pytest.raises(APIError) as exc:
        calls.publish("news", 1).read(status, body)
    assert (exc.value.code, exc.value.message, exc.value.status) == expected


def test_a_foreign_answer_is_quoted_at_most_200_characters() -> None:
    with pytest.raises(APIError) as exc:
        calls.info().read(503, b"x" * 10_000)
    assert exc.value.message == "HTTP 503: " + "x" * 200


def test_broadcast_gives_one_result_or_error_per_channel() -> None:
    answer = {
        "result": {
            "responses": [
                {"result": {"offset": 1, "epoch": "e"}},
                {"error": {"code": 107, "message": "bad channel"}},
                {},
            ]
        }
    }
    results = calls.broadcast(["a", "b", "c"], 1).read(200, msgspec.json.encode(answer))
    assert results[0] == PublishResult(offset=1, epoch="e")
    assert isinstance(results[1], APIError) and (results[1].code, results[1].message) == (
        107,
        "bad channel",
    )
    assert results[2] == PublishResult()


# ------------------------------------------------------------- both shells send the same call

ANSWERS: dict[str, Any] = {
    "publish": {"offset": 1, "epoch": "e"},
    "broadcast": {"responses": [{"result": {"offset": 2, "epoch": "e"}}]},
    "history": {"publications": [{"data": 1, "offset": 1}], "epoch": "e", "offset": 1},
    "presence": {"presence": {"c1": {"user": "u", "client": "c1"}}},
    "presence_stats": {"num_clients": 1, "num_users": 1},
    "channels": {"channels": {"news": {"num_clients": 2}}},
    "info": {"nodes": [{"uid": "n", "version": "1"}]},
    "disconnect": {},
    "unsubscribe": {},
}

METHODS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("publish", ("news", {"a": 1}), {"tags": {"k": "v"}}),
    ("broadcast", (["news"], 2), {}),
    ("history", ("news",), {"limit": -1, "since": ("e", 0), "reverse": True}),
    ("presence", ("news",), {}),
    ("presence_stats", ("news",), {}),
    ("channels", ("n*",), {}),
    ("info", (), {}),
    ("disconnect", ("u",), {"client": "c", "code": 4000, "reason": "bye"}),
    ("unsubscribe", ("u", "news"), {"client": "c"}),
]

Seen = list[tuple[str, str, bytes, str | None]]


def recorder(seen: Seen) -> Callable[[httpx.Request], httpx.Response]:
    def handle(request: httpx.Request) -> httpx.Response:
        method = request.url.path.removeprefix("/api/")
        seen.append(
            (request.method, str(request.url), request.content, request.headers.get("x-api-key"))
        )
        return httpx.Response(200, json={"result": ANSWERS[method]})

    return handle


@pytest.mark.parametrize(("method", "args", "kwargs"), METHODS, ids=[m[0] for m in METHODS])
def test_sync_and_async_clients_send_the_call_and_return_its_result(
    method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    sync_seen: Seen = []
    async_seen: Seen = []
    with httpx.Client(transport=httpx.MockTransport(recorder(sync_seen))) as http:
        sync_result = getattr(SyncAPIClient("http://h:1", "k", client=http), method)(
            *args, **kwargs
        )

    async def run_async() -> Any:
        transport = httpx.MockTransport(recorder(async_seen))
        async with httpx.AsyncClient(transport=transport) as http:
            return await getattr(APIClient("http://h:1", "k", client=http), method)(*args, **kwargs)

    async_result = asyncio.run(run_async())
    call = getattr(calls, method)(*args, **kwargs)
    expected = ("POST", f"http://h:1/api/{method}", call.body(), "k")
    assert sync_seen == async_seen == [expected]
    assert (
        sync_result
        == async_result
        == call.read(200, msgspec.json.encode({"result": ANSWERS[method]}))
    )
