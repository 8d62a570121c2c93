"""Server-Sent Events: stream head, publications, several channels, resume, overflow."""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import pytest

from helpers import (
    LineReader,
    SSEClient,
    check_serving,
    curl_publish,
    pub_json,
    publish,
    unique_channel,
)
from tidings.transports.sse import HEARTBEAT_TICK, HeartbeatWheel


def test_stream_head(server):
    ch = unique_channel()
    with SSEClient(server, [ch]) as sse:
        resp = sse.response
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-cache"
        first = sse.next()
        assert first.retry == 3000 and first.data is None, first
        ev = sse.subscribed()
        assert ev.json == {"channels": [ch], "recovered": False, "ping": 15.0}


def test_publication_arrives_with_id_and_position(server):
    ch = unique_channel()
    with SSEClient(server, [ch]) as sse:
        sub = sse.subscribed()
        data = {"text": "héllo", "n": [1, 2.5, None, True], "nested": {"a": {}}}
        res = publish(server, ch, data)
        assert isinstance(res["offset"], int) and isinstance(res["epoch"], str)
        (ev,) = sse.publications(1)
        body = pub_json(ev)
        assert body["channel"] == ch
        assert body["offset"] == res["offset"]
        assert body["epoch"] == res["epoch"]
        assert body["data"] == data
        assert ev.id and ev.id != sub.id


def test_publications_keep_order(server):
    ch = unique_channel()
    with SSEClient(server, [ch]) as sse:
        sse.subscribed()
        offsets = [publish(server, ch, i)["offset"] for i in range(20)]
        got = [pub_json(ev) for ev in sse.publications(20)]
    assert [p["data"] for p in got] == list(range(20))
    assert [p["offset"] for p in got] == offsets
    assert offsets == sorted(offsets) and len(set(offsets)) == 20


def test_two_channels_in_one_stream(server):
    a, b = unique_channel("a"), unique_channel("b")
    other = unique_channel("other")
    with SSEClient(server, [a, b]) as sse:
        assert sse.subscribed().json["channels"] == [a, b]
        publish(server, a, "to a")
        publish(server, other, "not for this stream")
        publish(server, b, "to b")
        got = [pub_json(ev) for ev in sse.publications(2)]
    assert [(p["channel"], p["data"]) for p in got] == [(a, "to a"), (b, "to b")]


def test_two_subscribers_get_the_same_events(server):
    ch = unique_channel()
    with SSEClient(server, [ch]) as s1, SSEClient(server, [ch]) as s2:
        s1.subscribed()
        s2.subscribed()
        publish(server, ch, "x")
        (e1,) = s1.publications(1)
        (e2,) = s2.publications(1)
    assert e1.data == e2.data and e1.id == e2.id


def _missed_while_away(server, mode):
    """Subscribe to a and b, read some, go away, publish more, come back with the last id."""
    a, b = unique_channel("a"), unique_channel("b")
    with SSEClient(server, [a, b]) as sse:
        sse.subscribed()
        publish(server, a, "a0")
        publish(server, b, "b0")
        seen = sse.publications(2)
        last_id = seen[-1].id
    # Disconnected: publish across both channels.
    missed = []
    for i in range(1, 7):
        ch = a if i % 3 else b
        res = publish(server, ch, f"{ch[0]}{i}")
        missed.append((ch, res["offset"], f"{ch[0]}{i}"))
    kwargs = {"last_event_id": last_id} if mode == "header" else {"query_last_event_id": last_id}
    return a, b, missed, kwargs


@pytest.mark.parametrize("mode", ["header", "query"])
def test_resume_gets_exactly_the_missed_publications(server, mode):
    a, b, missed, kwargs = _missed_while_away(server, mode)
    with SSEClient(server, [a, b], **kwargs) as sse:
        sub = sse.subscribed()
        assert sub.json == {"channels": [a, b], "recovered": True, "ping": 15.0}
        got = [pub_json(ev) for ev in sse.publications(len(missed))]
        # Nothing else was replayed: the next event is a fresh publication.
        sentinel = publish(server, a, "sentinel")
        (nxt,) = sse.publications(1)
        assert (pub_json(nxt)["data"], pub_json(nxt)["offset"]) == ("sentinel", sentinel["offset"])
    got_triples = [(p["channel"], p["offset"], p["data"]) for p in got]
    assert sorted(got_triples) == sorted(missed), "lost or duplicated publications"
    for ch in (a, b):  # per-channel order
        assert [t for t in got_triples if t[0] == ch] == [t for t in missed if t[0] == ch]


def test_resume_from_the_subscribed_id(server):
    ch = unique_channel()
    # Kept for meta_ttl by a stored publication: a stream only a subscription
    # made goes at the next sweep, and its epoch with it (see the overflow test).
    publish(server, ch, "before")
    with SSEClient(server, [ch]) as sse:
        cursor = sse.subscribed().id
    offsets = [publish(server, ch, i)["offset"] for i in range(3)]
    with SSEClient(server, [ch], last_event_id=cursor) as sse:
        assert sse.subscribed().json["recovered"] is True
        got = [pub_json(ev) for ev in sse.publications(3)]
    assert [p["offset"] for p in got] == offsets


def test_resume_with_nothing_missed(server):
    ch = unique_channel()
    with SSEClient(server, [ch]) as sse:
        sse.subscribed()
        publish(server, ch, 1)
        (ev,) = sse.publications(1)
    with SSEClient(server, [ch], last_event_id=ev.id) as sse:
        assert sse.subscribed().json["recovered"] is True
        publish(server, ch, 2)
        (nxt,) = sse.publications(1)
        assert nxt.json["data"] == 2


def test_every_id_is_a_resume_point(server):
    """Resuming from the id of the k-th event replays exactly the events after it."""
    a, b = unique_channel("a"), unique_channel("b")
    with SSEClient(server, [a, b]) as sse:
        sse.subscribed()
        for i in range(6):
            publish(server, (a, b)[i % 2], i)
        events = sse.publications(6)
    for k in (0, 2, 4):
        with SSEClient(server, [a, b], last_event_id=events[k].id) as sse:
            assert sse.subscribed().json["recovered"] is True
            replay = [ev.json["data"] for ev in sse.publications(5 - k)]
            assert sorted(replay) == list(range(k + 1, 6))


def test_history_overflow_is_reported(server_factory):
    srv = server_factory("[history]\nsize = 3\n")
    a, b = unique_channel("a"), unique_channel("b")
    # A stored publication keeps each stream (and its epoch) for meta_ttl; a
    # stream only a subscription made goes at the first sweep after the stream
    # below closes (every 5 s), and a resume at its epoch is then rightly not
    # recovered: under load that sweep fell between the close and b's
    # publication, and b was reported lost too.
    publish(srv, a, "before")
    publish(srv, b, "before")
    with SSEClient(srv, [a, b]) as sse:
        cursor = sse.subscribed().id
    for i in range(10):
        publish(srv, a, i)
    kept = publish(srv, b, "b-missed")
    with SSEClient(srv, [a, b], last_event_id=cursor) as sse:
        assert sse.subscribed().json == {"channels": [a, b], "recovered": False, "ping": 15.0}
        unrec = sse.next_data()
        assert unrec.event == "unrecovered", unrec
        assert unrec.json["channels"] == [a]
        # b was within its history: its missed publication is replayed.
        (ev,) = sse.publications(1)
        assert (pub_json(ev)["channel"], pub_json(ev)["offset"]) == (b, kept["offset"])
        # a continues from now.
        live = publish(srv, a, "live")
        (ev,) = sse.publications(1)
        assert (pub_json(ev)["channel"], pub_json(ev)["offset"]) == (a, live["offset"])
        # The stream's id now resumes from the new position: nothing is missing.
        resume_id = ev.id
    with SSEClient(srv, [a, b], last_event_id=resume_id) as sse:
        assert sse.subscribed().json["recovered"] is True


def test_idle_stream_gets_ping_events_and_is_told_their_interval(server_factory):
    """The heartbeat is an event ``EventSource`` dispatches (``ping``, data ``{}``),
    and ``subscribed`` says how long the silence between two may last."""
    srv = server_factory("[sse]\nheartbeat_interval = 0.5\n")
    ch = unique_channel()
    with SSEClient(srv, [ch], read_timeout=5) as sse:
        assert sse.subscribed().json["ping"] == 0.5
        for _ in range(2):
            ev = sse.next()
            assert (ev.event, ev.data, ev.id, ev.comments) == ("ping", "{}", None, []), ev


def test_every_idle_stream_gets_its_pings(server_factory):
    """The heartbeat visits one slice of the streams per tick: none is left out."""
    srv = server_factory("[sse]\nheartbeat_interval = 0.5\n")
    clients = [SSEClient(srv, [unique_channel()], read_timeout=5) for _ in range(12)]
    try:
        for sse in clients:
            sse.subscribed()
        for sse in clients:
            pings = [sse.next() for _ in range(2)]
            assert all(ev.is_ping for ev in pings), pings
    finally:
        for sse in clients:
            sse.close()


def test_a_stream_that_hears_publications_gets_no_ping_until_it_falls_silent(server_factory):
    """A publication is proof of life: no ping while they come more often than
    the interval, and one again once the stream has been silent for it."""
    interval = 1.5
    srv = server_factory(f"[sse]\nheartbeat_interval = {interval}\n")
    ch = unique_channel()
    with SSEClient(srv, [ch], read_timeout=10) as sse:
        sse.subscribed()
        # Publication k was fanned out between sent[k] and answered[k] (the
        # memory broker delivers before the API answers).
        sent, answered = [time.monotonic()], [time.monotonic()]
        deadline = sent[0] + 4.0  # past two intervals: two pings if sent regardless
        while time.monotonic() < deadline:
            sent.append(time.monotonic())
            publish(srv, ch, {"n": len(sent)})
            answered.append(time.monotonic())
            assert pub_json(sse.publications(1)[0])["data"] == {"n": len(sent)}
        heard = 0
        for ev in sse.seen:
            heard += ev.is_publication
            if ev.is_ping:
                # Only where the machine held two publications (or the head and
                # the first) an interval apart could the stream fall silent.
                until = answered[heard + 1] if heard + 1 < len(answered) else time.monotonic()
                assert until - sent[heard] >= interval - 0.1, (heard, sse.seen)
        assert sse.next().is_ping  # silent now: the ping is back


class Stream:
    """A stand-in for a stream in the wheel: hashable by identity, like SSEStream."""

    __slots__ = ("slice",)


def test_heartbeat_wheel_visits_each_stream_once_per_turn_a_turn_after_it_joined():
    slices = 150  # a 15 s interval at HEARTBEAT_TICK
    assert HEARTBEAT_TICK * slices == pytest.approx(15.0)
    wheel: HeartbeatWheel[Stream] = HeartbeatWheel(slices)
    joined: dict[Stream, int] = {}  # stream -> ticks so far when it joined
    first_visit: dict[Stream, int] = {}
    for tick in range(slices):  # 10,050 streams arriving at 67 per 0.1 s tick
        for _ in range(67):
            stream = Stream()
            stream.slice = wheel.add(stream)
            joined[stream] = tick
        for stream in wheel.advance():
            first_visit.setdefault(stream, tick)
    # The first batch comes round on the turn's last tick: a whole turn after it joined.
    assert first_visit == {s: slices - 1 for s, tick in joined.items() if tick == 0}
    gone = set(list(joined)[::7])
    for stream in gone:
        wheel.discard(stream, stream.slice)
    for _ in range(2):  # then each stream that stays exactly once per turn, at its phase
        visits = [wheel.advance() for _ in range(slices)]
        seen = [stream for visit in visits for stream in visit]
        assert len(seen) == len(set(seen)) == len(joined) - len(gone)
        assert set(seen) == set(joined) - gone
        for tick, visit in enumerate(visits):
            assert all(joined[stream] == (tick + 1) % slices for stream in visit)
        # No loop turn writes to more than the streams that joined during one tick.
        assert max(len(visit) for visit in visits) <= 67


@pytest.mark.parametrize("cursor", ["@@@", "Zm9vYmFy", "x" * 50])
@pytest.mark.parametrize("where", ["header", "query"])
def test_malformed_cursor_is_400(server, cursor, where):
    ch = unique_channel()
    headers = {"Last-Event-ID": cursor} if where == "header" else {}
    params = [("channel", ch)] + ([("last_event_id", cursor)] if where == "query" else [])
    resp = httpx.get(server.url + "/sse", params=params, headers=headers, timeout=5)
    assert resp.status_code == 400
    assert isinstance(resp.json()["error"]["code"], int)
    check_serving(server)


@pytest.mark.parametrize(
    "params",
    [
        [],
        [("channel", "")],
        [("channel", "x" * 300)],
        [("channel", f"c{i}") for i in range(129)],
    ],
    ids=["no-channel", "empty-channel", "long-channel", "too-many-channels"],
)
def test_bad_subscription_is_400(server, params):
    resp = httpx.get(server.url + "/sse", params=params, timeout=5)
    assert resp.status_code == 400
    assert "error" in resp.json()


def test_curl_sse_receives_curl_publish(server, spawn):
    ch = unique_channel()
    curl = spawn(
        ["curl", "-sN", f"{server.url}/sse?channel={ch}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    lines = LineReader(curl)
    lines.until(lambda line: line == "event: subscribed")
    result = curl_publish(server, ch, {"text": "hello"})
    data_line = lines.until(lambda line: line.startswith("data:") and '"hello"' in line)
    pub = json.loads(data_line.removeprefix("data:"))
    assert pub["channel"] == ch
    assert pub["data"] == {"text": "hello"}
    assert pub["offset"] == result["offset"]
    curl.kill()


# ("#" is left out: it marks a user-limited channel, see test_auth.py.)
@pytest.mark.parametrize("name", ["chat:room42", "ünïcode/ch&an=nel?%+"])
def test_channel_names_are_url_decoded(server, name):
    ch = name + unique_channel("-")
    with SSEClient(server, [ch]) as sse:
        assert sse.subscribed().json["channels"] == [ch]
        publish(server, ch, "named")
        (ev,) = sse.publications(1)
        assert ev.json["channel"] == ch


def test_fan_out_to_many_subscribers(server):
    """One publication reaches 100 concurrent SSE streams (raw sockets)."""
    import selectors
    import socket

    from helpers import request_bytes

    ch = unique_channel()
    n = 100
    socks = []
    sel = selectors.DefaultSelector()
    try:
        for _ in range(n):
            s = socket.create_connection((server.host, server.port), timeout=10)
            s.sendall(request_bytes("GET", f"/sse?channel={ch}"))
            socks.append(s)
        bufs = {s: b"" for s in socks}

        def read_until(marker: bytes) -> None:
            pending = {s for s in socks if marker not in bufs[s]}
            for s in pending:
                sel.register(s, selectors.EVENT_READ)
            deadline = time.monotonic() + 20
            while pending and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=1):
                    s = key.fileobj
                    chunk = s.recv(65536)
                    assert chunk, "stream closed"
                    bufs[s] += chunk
                    if marker in bufs[s]:
                        pending.discard(s)
                        sel.unregister(s)
            assert not pending, f"{len(pending)} of {n} streams lack {marker!r}"

        read_until(b"event: subscribed")
        res = publish(server, ch, {"fan": "out"})
        read_until(b'"offset":%d' % res["offset"])
    finally:
        sel.close()
        for s in socks:
            s.close()


def test_closed_streams_leave_their_channels(server):
    from helpers import api, wait_subscribers

    a, b = unique_channel("a"), unique_channel("b")
    with SSEClient(server, [a, b]) as sse:
        sse.subscribed()
        wait_subscribers(server, a)
        wait_subscribers(server, b)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        chans = api(server, "channels").json()["result"]["channels"]
        if all(chans.get(c, {}).get("num_clients", 0) == 0 for c in (a, b)):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"subscribers left behind: {chans}")
    publish(server, a, "no one is here")  # and publishing to it now is harmless
    check_serving(server)
