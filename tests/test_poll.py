"""Long-polling and polling on GET /poll, and cursors shared with SSE."""

from __future__ import annotations

import threading

import httpx
import pytest

from helpers import (
    SSEClient,
    check_serving,
    poll,
    poll_ok,
    pub_json,
    publish,
    unique_channel,
    wait_subscribers,
)


def pub_json_obj(p):
    for key in ("channel", "offset", "epoch", "data"):
        assert key in p, p
    return p


def test_without_cursor_answers_at_once_with_a_cursor(server):
    ch = unique_channel()
    publish(server, ch, "old")  # history before "now" is not returned
    body = poll_ok(server, [ch], timeout=30, read_timeout=10)
    assert body == {"publications": [], "cursor": body["cursor"], "unrecovered": []}


def test_long_poll_times_out_empty(server):
    ch = unique_channel()
    # Kept for meta_ttl by a stored publication: a stream only a subscription
    # made goes at the next memory-broker sweep after it, and its epoch with it.
    publish(server, ch, "before")
    cursor = poll_ok(server, [ch])["cursor"]
    body = poll_ok(server, [ch], cursor=cursor, timeout=1)
    assert body["publications"] == []
    assert body["unrecovered"] == []
    # The returned cursor is still a valid position: nothing is missed with it.
    res = publish(server, ch, "after")
    again = poll_ok(server, [ch], cursor=body["cursor"], timeout=0)
    assert [(p["offset"], p["data"]) for p in again["publications"]] == [(res["offset"], "after")]


def test_publication_wakes_a_held_long_poll(server):
    ch = unique_channel()
    cursor = poll_ok(server, [ch])["cursor"]
    result = {}

    def long_poll():
        # The read timeout (15 s) is shorter than the poll timeout (30 s): only a
        # wake-up by the publication can answer in time.
        result["resp"] = poll(server, [ch], cursor=cursor, timeout=30, read_timeout=15)

    t = threading.Thread(target=long_poll)
    t.start()
    threading.Event().wait(0.3)  # let the request reach the server and be held
    res = publish(server, ch, {"wake": True})
    t.join(20)
    assert not t.is_alive()
    resp = result["resp"]
    assert resp.status_code == 200
    body = resp.json()
    for p in body["publications"]:
        pub_json_obj(p)
    assert [(p["channel"], p["offset"], p["epoch"], p["data"]) for p in body["publications"]] == [
        (ch, res["offset"], res["epoch"], {"wake": True})
    ]
    assert body["cursor"] != cursor


def test_polling_with_timeout_zero(server):
    ch = unique_channel()
    cursor = poll_ok(server, [ch], timeout=0)["cursor"]
    empty = poll_ok(server, [ch], cursor=cursor, timeout=0)
    assert empty["publications"] == []
    r1 = publish(server, ch, 1)
    r2 = publish(server, ch, 2)
    body = poll_ok(server, [ch], cursor=empty["cursor"], timeout=0)
    assert [(p["offset"], p["data"]) for p in body["publications"]] == [
        (r1["offset"], 1),
        (r2["offset"], 2),
    ]
    after = poll_ok(server, [ch], cursor=body["cursor"], timeout=0)
    assert after["publications"] == []


def drain(server, channels, cursor):
    """Poll with timeout=0 until nothing is left; returns (publications, cursor)."""
    got = []
    for _ in range(50):
        body = poll_ok(server, channels, cursor=cursor, timeout=0)
        assert body["unrecovered"] == [], body
        cursor = body["cursor"]
        if not body["publications"]:
            return got, cursor
        got += body["publications"]
    raise AssertionError("poll never drained")


def test_resume_across_two_channels(server):
    a, b = unique_channel("a"), unique_channel("b")
    cursor = poll_ok(server, [a, b])["cursor"]
    sent = []
    for i in range(8):
        ch = (a, b)[i % 3 == 0]
        sent.append((ch, publish(server, ch, i)["offset"], i))
    got, cursor = drain(server, [a, b], cursor)
    triples = [(p["channel"], p["offset"], p["data"]) for p in map(pub_json_obj, got)]
    assert sorted(triples) == sorted(sent), "lost or duplicated publications"
    for ch in (a, b):
        assert [t for t in triples if t[0] == ch] == [t for t in sent if t[0] == ch]
    # And once more, from the cursor returned at the end.
    more = publish(server, b, "more")
    got, _ = drain(server, [a, b], cursor)
    assert [(p["channel"], p["offset"]) for p in got] == [(b, more["offset"])]


def test_history_overflow_lists_unrecovered(server_factory):
    srv = server_factory("[history]\nsize = 3\n")
    a, b = unique_channel("a"), unique_channel("b")
    cursor = poll_ok(srv, [a, b])["cursor"]
    for i in range(10):
        publish(srv, a, i)
    kept = publish(srv, b, "kept")
    body = poll_ok(srv, [a, b], cursor=cursor, timeout=0)
    assert body["unrecovered"] == [a]
    assert [(p["channel"], p["offset"]) for p in body["publications"]] == [(b, kept["offset"])]
    # a continues from now with the new cursor.
    live = publish(srv, a, "live")
    nxt = poll_ok(srv, [a, b], cursor=body["cursor"], timeout=0)
    assert nxt["unrecovered"] == []
    assert [(p["channel"], p["offset"]) for p in nxt["publications"]] == [(a, live["offset"])]


def test_sse_cursor_works_in_poll(server):
    a, b = unique_channel("a"), unique_channel("b")
    publish(server, b, "before")  # kept for meta_ttl, not only until the next sweep
    with SSEClient(server, [a, b]) as sse:
        sse.subscribed()
        publish(server, a, "seen")
        (ev,) = sse.publications(1)
    r1 = publish(server, b, "missed-b")
    r2 = publish(server, a, "missed-a")
    got, _ = drain(server, [a, b], ev.id)
    assert sorted((p["channel"], p["offset"]) for p in got) == sorted(
        [(b, r1["offset"]), (a, r2["offset"])]
    )


def test_poll_cursor_works_in_sse(server):
    a, b = unique_channel("a"), unique_channel("b")
    cursor = poll_ok(server, [a, b])["cursor"]
    r1 = publish(server, a, 1)
    r2 = publish(server, b, 2)
    with SSEClient(server, [a, b], last_event_id=cursor) as sse:
        assert sse.subscribed().json["recovered"] is True
        got = [pub_json(ev) for ev in sse.publications(2)]
        # The SSE id can go back to /poll: nothing is repeated.
        last_id = sse.seen[-1].id
    assert sorted((p["channel"], p["offset"]) for p in got) == sorted(
        [(a, r1["offset"]), (b, r2["offset"])]
    )
    r3 = publish(server, a, 3)
    got, _ = drain(server, [a, b], last_id)
    assert [(p["channel"], p["offset"]) for p in got] == [(a, r3["offset"])]


@pytest.mark.parametrize(
    "extra",
    [
        [("timeout", "61")],
        [("timeout", "abc")],
        [("timeout", "-1")],
        [("cursor", "@@@")],
        [("cursor", "Zm9vYmFy")],
    ],
    ids=["timeout-too-long", "timeout-nan", "timeout-negative", "cursor-bad", "cursor-garbage"],
)
def test_bad_poll_is_400(server, extra):
    ch = unique_channel()
    resp = httpx.get(server.url + "/poll", params=[("channel", ch), *extra], timeout=5)
    assert resp.status_code == 400
    assert isinstance(resp.json()["error"]["code"], int)
    check_serving(server)


@pytest.mark.parametrize(
    "params",
    [[], [("channel", "")], [("channel", f"c{i}") for i in range(129)]],
    ids=["no-channel", "empty-channel", "too-many-channels"],
)
def test_bad_channels_are_400(server, params):
    resp = httpx.get(server.url + "/poll", params=params, timeout=5)
    assert resp.status_code == 400
    assert "error" in resp.json()


def test_max_timeout_is_configurable(server_factory):
    srv = server_factory("[poll]\nmax_timeout = 2.0\ndefault_timeout = 1.0\n")
    ch = unique_channel()
    assert poll(srv, [ch], timeout=3).status_code == 400
    cursor = poll_ok(srv, [ch])["cursor"]
    assert poll_ok(srv, [ch], cursor=cursor, timeout=1)["publications"] == []


def test_many_concurrent_long_polls_all_wake(server):
    ch = unique_channel()
    cursor = poll_ok(server, [ch])["cursor"]
    results = []
    lock = threading.Lock()

    def long_poll():
        resp = poll(server, [ch], cursor=cursor, timeout=30, read_timeout=15)
        with lock:
            results.append(resp)

    threads = [threading.Thread(target=long_poll) for _ in range(20)]
    for t in threads:
        t.start()
    threading.Event().wait(0.3)
    res = publish(server, ch, "all")
    for t in threads:
        t.join(20)
    assert len(results) == 20
    for resp in results:
        assert resp.status_code == 200
        assert [p["offset"] for p in resp.json()["publications"]] == [res["offset"]]


def test_history_expires_by_age(server_factory):
    srv = server_factory("[history]\nttl = 0.5\n")
    a, b = unique_channel("a"), unique_channel("b")
    cursor = poll_ok(srv, [a, b])["cursor"]
    publish(srv, a, "expires")
    threading.Event().wait(1.2)  # past history.ttl
    fresh = publish(srv, b, "fresh")
    body = poll_ok(srv, [a, b], cursor=cursor, timeout=0)
    assert body["unrecovered"] == [a]
    assert [(p["channel"], p["offset"]) for p in body["publications"]] == [(b, fresh["offset"])]


def test_long_poll_on_two_channels_wakes_on_either(server):
    a, b = unique_channel("a"), unique_channel("b")
    cursor = poll_ok(server, [a, b])["cursor"]
    result = {}

    def long_poll():
        result["resp"] = poll(server, [a, b], cursor=cursor, timeout=30, read_timeout=15)

    t = threading.Thread(target=long_poll)
    t.start()
    threading.Event().wait(0.3)
    res = publish(server, b, "on b")
    t.join(20)
    body = result["resp"].json()
    assert [(p["channel"], p["offset"]) for p in body["publications"]] == [(b, res["offset"])]


def test_client_leaving_a_held_long_poll_is_forgotten(server):
    from helpers import RawConn, request_bytes

    ch = unique_channel()
    cursor = poll_ok(server, [ch])["cursor"]
    for _ in range(5):
        conn = RawConn(server)
        conn.send(request_bytes("GET", f"/poll?channel={ch}&cursor={cursor}&timeout=30"))
        threading.Event().wait(0.1)
        conn.close()  # gone while held
    res = publish(server, ch, "nobody listening")
    body = poll_ok(server, [ch], cursor=cursor, timeout=0)
    assert [p["offset"] for p in body["publications"]] == [res["offset"]]
    check_serving(server)


def test_ever_new_poll_urls_do_not_grow_the_server(server):
    """A poll URL is read once per distinct URL and kept (PollTransport.query);
    a client sending ever new ones (a different padding parameter each time,
    each URL just under the length kept) replaces the oldest: 20,000 of them,
    20 MB of URLs, leave the server's RSS where 500 left it, and a long-poll
    held meanwhile by another client is still answered."""
    from helpers import RawConn, request_bytes, rss_kib

    ch = unique_channel()
    publish(server, ch, "the channel's stream begins")
    cursor = poll_ok(server, [ch])["cursor"]
    prefix = f"/poll?channel={ch}&cursor={cursor}&timeout=0&pad="

    def urls(start: int, count: int) -> list[bytes]:
        return [
            request_bytes("GET", prefix + f"{i:d}".rjust(1000 - len(prefix), "x"))
            for i in range(start, start + count)
        ]

    def attack(conn: RawConn, start: int, count: int, batch: int = 250) -> None:
        for first in range(start, start + count, batch):
            conn.send(b"".join(urls(first, batch)))
            for _ in range(batch):
                response = conn.read_response()
                assert response.status == 200, response.body
                assert response.json()["cursor"] == cursor

    result: dict[str, httpx.Response] = {}
    waiting = threading.Thread(
        target=lambda: result.update(resp=poll(server, [ch], cursor=cursor, timeout=30))
    )
    with RawConn(server) as conn:
        attack(conn, 0, 500)
        before = rss_kib(server)
        waiting.start()
        attack(conn, 500, 20_000)
        grown = rss_kib(server) - before
    assert grown < 4096, f"the server grew by {grown} KiB for 20,000 distinct poll URLs"
    wait_subscribers(server, ch, 1)
    res = publish(server, ch, "still served")
    waiting.join(30)
    body = result["resp"].json()
    assert [p["offset"] for p in body["publications"]] == [res["offset"]]
    check_serving(server)
