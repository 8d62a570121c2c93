"""Server API: POST /api/<method> shapes, auth and errors."""

from __future__ import annotations

import re

import httpx
import pytest

from helpers import (
    SSEClient,
    api,
    check_serving,
    curl_publish,
    publish,
    unique_channel,
    wait_subscribers,
)


def test_publish_result_shape(server):
    ch = unique_channel()
    r1 = api(server, "publish", {"channel": ch, "data": {"x": 1}})
    assert r1.status_code == 200
    assert r1.headers["content-type"].startswith("application/json")
    res1 = r1.json()["result"]
    assert set(res1) >= {"offset", "epoch"}
    assert isinstance(res1["offset"], int) and isinstance(res1["epoch"], str) and res1["epoch"]
    res2 = publish(server, ch, {"x": 2})
    assert res2["offset"] > res1["offset"]
    assert res2["epoch"] == res1["epoch"]


def test_publish_with_curl(server):
    ch = unique_channel()
    result = curl_publish(server, ch, {"text": "hello"})
    hist = api(server, "history", {"channel": ch, "limit": -1}).json()["result"]
    assert [(p["data"], p["offset"]) for p in hist["publications"]] == [
        ({"text": "hello"}, result["offset"])
    ]


def test_publish_with_tags_reaches_sse(server):
    ch = unique_channel()
    with SSEClient(server, [ch]) as sse:
        sse.subscribed()
        resp = api(server, "publish", {"channel": ch, "data": "t", "tags": {"k": "v"}})
        assert resp.status_code == 200 and "result" in resp.json()
        (ev,) = sse.publications(1)
        assert ev.json["data"] == "t"
        assert ev.json.get("tags") == {"k": "v"}


def test_broadcast(server):
    a, b = unique_channel("a"), unique_channel("b")
    with SSEClient(server, [a, b]) as sse:
        sse.subscribed()
        resp = api(server, "broadcast", {"channels": [a, b], "data": {"all": 1}})
        assert resp.status_code == 200
        responses = resp.json()["result"]["responses"]
        assert len(responses) == 2
        for r in responses:
            assert isinstance(r["result"]["offset"], int)
            assert isinstance(r["result"]["epoch"], str)
        got = {ev.json["channel"]: ev.json for ev in sse.publications(2)}
    assert set(got) == {a, b}
    assert got[a]["offset"] == responses[0]["result"]["offset"]
    assert got[b]["offset"] == responses[1]["result"]["offset"]
    assert all(p["data"] == {"all": 1} for p in got.values())


def test_broadcast_reports_per_channel_errors(server):
    good = unique_channel()
    resp = api(server, "broadcast", {"channels": [good, "x" * 300], "data": 1})
    assert resp.status_code == 200
    responses = resp.json()["result"]["responses"]
    assert "result" in responses[0]
    assert isinstance(responses[1]["error"]["code"], int)


def test_history(server):
    ch = unique_channel()
    offsets = [publish(server, ch, {"i": i})["offset"] for i in range(5)]

    full = api(server, "history", {"channel": ch, "limit": -1}).json()["result"]
    assert [(p["data"], p["offset"]) for p in full["publications"]] == [
        ({"i": i}, o) for i, o in enumerate(offsets)
    ]
    assert full["offset"] == offsets[-1]
    assert isinstance(full["epoch"], str) and full["epoch"]

    pos = api(server, "history", {"channel": ch}).json()["result"]
    assert pos.get("publications", []) == []
    assert (pos["offset"], pos["epoch"]) == (full["offset"], full["epoch"])
    zero = api(server, "history", {"channel": ch, "limit": 0}).json()["result"]
    assert zero.get("publications", []) == []

    two = api(server, "history", {"channel": ch, "limit": 2}).json()["result"]
    assert len(two["publications"]) == 2

    since = {"offset": offsets[2], "epoch": full["epoch"]}
    after = api(server, "history", {"channel": ch, "limit": -1, "since": since}).json()["result"]
    assert [p["offset"] for p in after["publications"]] == offsets[3:]

    rev = api(server, "history", {"channel": ch, "limit": -1, "reverse": True}).json()["result"]
    assert [p["offset"] for p in rev["publications"]] == offsets[::-1]


def test_history_is_bounded_by_size(server_factory):
    srv = server_factory("[history]\nsize = 3\n")
    ch = unique_channel()
    offsets = [publish(srv, ch, i)["offset"] for i in range(10)]
    hist = api(srv, "history", {"channel": ch, "limit": -1}).json()["result"]
    assert [p["offset"] for p in hist["publications"]] == offsets[-3:]
    assert hist["offset"] == offsets[-1]


def test_channels_lists_subscribed_channels(server):
    a, b = unique_channel("a"), unique_channel("b")
    with SSEClient(server, [a, b]) as s1, SSEClient(server, [a]) as s2:
        s1.subscribed()
        s2.subscribed()
        wait_subscribers(server, a, 2)
        chans = api(server, "channels").json()["result"]["channels"]
        assert chans[a]["num_clients"] == 2
        assert chans[b]["num_clients"] == 1
        only = api(server, "channels", {"pattern": a}).json()["result"]["channels"]
        assert set(only) == {a}


def test_info(server):
    info = api(server, "info").json()["result"]
    assert len(info["nodes"]) == 1
    node = info["nodes"][0]
    assert set(node) >= {"uid", "name", "version", "num_clients", "num_channels", "uptime"}
    assert isinstance(node["uid"], str) and isinstance(node["version"], str)
    assert isinstance(node["num_clients"], int) and isinstance(node["num_channels"], int)


def test_malformed_json_is_400_code_107(server):
    resp = httpx.post(
        server.url + "/api/publish",
        content=b'{"channel": "x", "data": ',
        headers={"Content-Type": "application/json"},
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == 107
    assert resp.json()["error"]["message"]
    check_serving(server)


def test_unknown_method_is_404_code_104(server):
    resp = api(server, "no_such_method", {})
    assert resp.status_code == 404
    err = resp.json()["error"]
    assert err["code"] == 104
    assert err["message"].startswith("method not found"), err


def test_body_not_matching_the_method_is_400_code_107(server):
    for params in ({"data": 1}, {"channel": 5, "data": 1}, [1, 2]):
        resp = httpx.post(server.url + "/api/publish", json=params)
        assert resp.status_code == 400, params
        assert resp.json()["error"]["code"] == 107


def test_a_request_that_cannot_be_served_is_a_200_error(server):
    resp = api(server, "publish", {"channel": "x" * 300, "data": 1})  # channel name too long
    assert resp.status_code == 200
    err = resp.json()["error"]
    assert isinstance(err["code"], int) and err["message"]
    assert "result" not in resp.json()


def api_key_warnings(logs):
    return [
        line
        for line in logs.splitlines()
        if re.search(r"api[ _-]?key", line, re.I) and re.search(r"warn", line, re.I)
    ]


KEYED = 'api_key = "s3cret"\n'


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-API-Key": "wrong"}, {"Authorization": "apikey wrong"}, {"X-API-Key": ""}],
    ids=["none", "wrong-header", "wrong-authorization", "empty"],
)
def test_wrong_api_key_is_401(server_factory, headers):
    srv = server_factory(KEYED)
    ch = unique_channel()
    resp = api(srv, "publish", {"channel": ch, "data": 1}, **headers)
    assert resp.status_code == 401
    err = resp.json()["error"]
    assert err["code"] == 101
    assert err["message"].startswith("unauthorized")
    hist = api(srv, "history", {"channel": ch, "limit": -1}, **{"X-API-Key": "s3cret"})
    assert hist.json()["result"].get("publications", []) == []


def test_right_api_key_works(server_factory):
    srv = server_factory(KEYED)
    ch = unique_channel()
    r1 = publish(srv, ch, 1, **{"X-API-Key": "s3cret"})
    r2 = publish(srv, ch, 2, Authorization="apikey s3cret")
    assert r2["offset"] > r1["offset"]
    assert not api_key_warnings(srv.logs())


def test_api_key_from_environment(server_factory):
    srv = server_factory(env={"TIDINGS_API_KEY": "from-env"})
    ch = unique_channel()
    assert api(srv, "publish", {"channel": ch, "data": 1}).status_code == 401
    publish(srv, ch, 1, **{"X-API-Key": "from-env"})


def test_no_api_key_allows_loopback_and_warns(server):
    publish(server, unique_channel(), "loopback")  # no key header at all
    logs = server.logs()
    assert api_key_warnings(logs), f"no start-up warning about the missing API key in:\n{logs}"


def test_listening_line_is_logged(server):
    assert f"tidings listening on http://127.0.0.1:{server.port}" in server.logs()
