"""The memory broker's history budget (``limits.max_history_memory``), attacked over real sockets.

In the development default an anonymous client may subscribe to any channel
and publish to it, up to ``websocket.max_message_size`` per message; channel
count, ring size and message size multiply to far more memory than a server
has. These tests play that client (the ``websockets`` client, and the server
API from loopback) with a small budget and large rings, and check that the
server's RSS stays within the budget while fifty times the budget goes
through, that the oldest publications in the process are the ones evicted,
that a client resuming from an evicted position is told "not recovered" (over
poll, WebSocket and SSE) rather than given a gap, and that live subscribers
still get every publication. Unit tests drive the broker alone through random
sequences and check its books after every step, the eviction order, and that
its eviction queue stays bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from websockets.sync.client import ClientConnection, connect

from helpers import (
    TIMEOUT,
    SSEClient,
    api,
    check_serving,
    poll_ok,
    pub_json,
    publish,
    rss_kib,
    unique_channel,
)
from tidings.brokers.memory import MemoryBroker, history_cost
from tidings.hub import DEFAULT_HISTORY, ClientInfo, HistoryPolicy, Publication

BUDGET = 2 * 1024 * 1024
#: What a hostile publisher sends per message: as much as a WebSocket frame may carry.
BLOB = "x" * 60_000

BUDGETED = f"""
[limits]
max_history_memory = {BUDGET}

[history]
size = 1000
"""

linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux only")


def charge(data_bytes: int) -> int:
    """What the broker charges for a publication of ``data_bytes`` (a stand-in for its data)."""
    return history_cost(Publication("c", 1, "e", b"x" * data_bytes))


#: Publications of ``{"blob": BLOB}`` the budget holds at once.
HELD = BUDGET // charge(len(json.dumps({"blob": BLOB}, separators=(",", ":"))))


def history_of(srv: Any, channel: str) -> dict[str, Any]:
    """The API's history of ``channel``: ``{"publications", "offset", "epoch"}``."""
    resp = api(srv, "history", {"channel": channel, "limit": -1})
    assert resp.status_code == 200, resp.text
    result: dict[str, Any] = resp.json()["result"]
    return result


def offsets(history: dict[str, Any]) -> list[int]:
    return [pub["offset"] for pub in history["publications"]]


@contextlib.contextmanager
def ws_client(srv: Any, channels: list[str]) -> Iterator[ClientConnection]:
    """An anonymous Centrifugo client, subscribed to ``channels`` (so that it may publish)."""
    with connect(srv.ws_url + "/connection/websocket", open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps({"id": 1, "connect": {}}))
        assert "connect" in json.loads(ws.recv(TIMEOUT)), "connect refused"
        if channels:
            ws.send(
                "\n".join(
                    json.dumps({"id": 2 + i, "subscribe": {"channel": channel}})
                    for i, channel in enumerate(channels)
                )
            )
            await_replies(ws, set(range(2, 2 + len(channels))))
        yield ws


def await_replies(ws: ClientConnection, ids: set[int]) -> None:
    """Read until every command in ``ids`` is answered (pushes are skipped); none may fail."""
    while ids:
        for line in str(ws.recv(TIMEOUT)).splitlines():
            reply = json.loads(line)
            if reply.get("id") in ids:
                assert "error" not in reply, reply
                ids.discard(reply["id"])


def ws_reply(ws: ClientConnection, cmd_id: int) -> dict[str, Any]:
    """The reply to command ``cmd_id`` (pushes are skipped); it must not be an error."""
    while True:
        for line in str(ws.recv(TIMEOUT)).splitlines():
            reply: dict[str, Any] = json.loads(line)
            if reply.get("id") == cmd_id:
                assert "error" not in reply, reply
                return reply


def ws_publish(ws: ClientConnection, ids: range, channels: list[str]) -> None:
    """Publish ``{"blob": BLOB}`` once per id, round-robin over ``channels``; await the replies."""
    for cmd_id in ids:
        channel = channels[cmd_id % len(channels)]
        ws.send(json.dumps({"id": cmd_id, "publish": {"channel": channel, "data": {"blob": BLOB}}}))
    await_replies(ws, set(ids))


@linux_only
def test_rss_stays_within_the_budget_while_50x_is_published_over_websocket(
    server_factory: Any,
) -> None:
    srv = server_factory(BUDGETED)
    channels = [unique_channel("flood") for _ in range(32)]
    total = 50 * BUDGET // len(BLOB) + 1
    before = rss_kib(srv)
    peak = before
    with ws_client(srv, channels) as attacker:
        # Subscribed to what it publishes, the attacker gets every publication
        # delivered: each then also caches its encoded forms, as in real use.
        next_id = 1000
        while next_id < 1000 + total:
            ws_publish(attacker, range(next_id, next_id + 25), channels)
            next_id += 25
            peak = max(peak, rss_kib(srv))
            # Checked as it goes: without the budget the server would reach
            # several hundred MiB before the end.
            assert peak - before <= (BUDGET + 12 * 1024 * 1024) // 1024, (before, peak)
    # The newest publications of the last channel published to are still
    # there, as a run of consecutive offsets up to the top; the oldest are not.
    last = channels[(next_id - 1) % len(channels)]
    history = history_of(srv, last)
    held = offsets(history)
    assert held and held[-1] == history["offset"], history["offset"]
    assert held == list(range(held[0], held[-1] + 1))
    assert held[0] > 1 and len(held) <= HELD
    assert history["publications"][-1]["data"] == {"blob": BLOB}
    check_serving(srv)
    logs = srv.logs()
    assert logs.count(f"limits.max_history_memory ({BUDGET} bytes) reached") == 1, logs[-2000:]
    assert "Traceback" not in logs and "ERROR" not in logs, logs[-2000:]


def flood_api(srv: Any, count: int) -> None:
    """Publish ``count`` large publications to fresh channels through the API (from loopback)."""
    for _ in range(count):
        publish(srv, unique_channel("other"), {"blob": BLOB})


def test_a_client_resuming_from_an_evicted_position_is_not_recovered(server_factory: Any) -> None:
    srv = server_factory(BUDGETED)
    resumed, untouched = unique_channel("resumed"), unique_channel("untouched")
    start = poll_ok(srv, [resumed, untouched])["cursor"]
    assert publish(srv, resumed, {"n": 1})["offset"] == 1
    after_first = poll_ok(srv, [resumed, untouched], cursor=start, timeout=0)
    assert after_first["unrecovered"] == [] and len(after_first["publications"]) == 1
    # Twice the budget of newer publications elsewhere evicts the oldest in the
    # process: the first publication of ``resumed``.
    flood_api(srv, 2 * HELD)
    second, third = (publish(srv, resumed, {"n": n}) for n in (2, 3))
    assert offsets(history_of(srv, resumed)) == [second["offset"], third["offset"]]
    kept = publish(srv, untouched, {"n": "kept"})
    # From before the evicted publication: told so, and given no partial range.
    body = poll_ok(srv, [resumed, untouched], cursor=start, timeout=0)
    assert body["unrecovered"] == [resumed], body
    got = [(pub["channel"], pub["offset"]) for pub in body["publications"]]
    assert got == [(untouched, kept["offset"])]
    # From just after it, what history holds is exactly what was missed.
    body = poll_ok(srv, [resumed, untouched], cursor=after_first["cursor"], timeout=0)
    assert body["unrecovered"] == [], body
    got = [(pub["channel"], pub["offset"]) for pub in body["publications"]]
    assert sorted(got) == sorted(
        [(resumed, second["offset"]), (resumed, third["offset"]), (untouched, kept["offset"])]
    )
    # The same over a WebSocket (Centrifugo's recover), from before and from after it.
    epoch = history_of(srv, resumed)["epoch"]
    with ws_client(srv, []) as ws:
        for cmd_id, offset in ((2, 0), (3, 1)):
            recover = {"channel": resumed, "recover": True, "epoch": epoch, "offset": offset}
            ws.send(json.dumps({"id": cmd_id, "subscribe": recover}))
            reply = ws_reply(ws, cmd_id)["subscribe"]
            recovered = [pub["offset"] for pub in reply.get("publications", [])]
            assert (reply.get("recovered", False), recovered) == (
                (False, []) if offset == 0 else (True, [second["offset"], third["offset"]])
            ), reply
            ws.send(json.dumps({"id": cmd_id + 10, "unsubscribe": {"channel": resumed}}))
            ws_reply(ws, cmd_id + 10)
    # The same over SSE, from the position before the eviction.
    with SSEClient(srv, [resumed, untouched], last_event_id=start) as sse:
        assert sse.subscribed().json == {
            "channels": [resumed, untouched],
            "recovered": False,
            "ping": 15.0,
        }
        unrecovered = sse.next_data()
        assert unrecovered.event == "unrecovered", unrecovered
        assert unrecovered.json["channels"] == [resumed]
        (replayed,) = sse.publications(1)
        assert (pub_json(replayed)["channel"], pub_json(replayed)["offset"]) == (
            untouched,
            kept["offset"],
        )


def test_a_subscriber_receives_every_live_publication_while_history_evicts(
    server_factory: Any,
) -> None:
    srv = server_factory(BUDGETED)
    channel = unique_channel("live")
    count = 4 * HELD
    with SSEClient(srv, [channel]) as subscriber:
        subscriber.subscribed()
        sent = [publish(srv, channel, {"blob": BLOB, "n": n})["offset"] for n in range(count)]
        received = [pub_json(event) for event in subscriber.publications(count)]
    assert [pub["offset"] for pub in received] == sent == list(range(1, count + 1))
    assert [pub["data"]["n"] for pub in received] == list(range(count))
    # History meanwhile kept only the newest that fit the budget.
    held = offsets(history_of(srv, channel))
    assert held == list(range(count - len(held) + 1, count + 1)) and len(held) <= HELD


# --------------------------------------------------------------------------- the broker alone


class Clock:
    """A clock the test advances, injected into the broker in place of ``time.monotonic``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def publish_now(
    broker: MemoryBroker,
    channel: str,
    data: bytes,
    extras: int = 0,
    history: HistoryPolicy = DEFAULT_HISTORY,
) -> Publication:
    """``MemoryBroker.publish`` never awaits: run it to completion without a loop.

    ``extras`` bytes each of tags and of the publisher's connection info go along.
    """
    if extras:
        info = ClientInfo("user", "client", conn_info=msgspec.Raw(b'"%s"' % (b"i" * extras)))
        coro = broker.publish(channel, data, history=history, info=info, tags={"tag": "t" * extras})
    else:
        coro = broker.publish(channel, data, history=history)
    with pytest.raises(StopIteration) as done:
        coro.send(None)
    pub: Publication = done.value.value
    return pub


def rings(broker: MemoryBroker) -> dict[str, list[Publication]]:
    return {channel: list(stream.history) for channel, stream in broker._streams.items()}


def check_books(broker: MemoryBroker, budget: int) -> None:
    """The broker's accounts agree with what its rings hold, and the rings are sound."""
    held = rings(broker)
    assert broker.history_memory == sum(history_cost(p) for ring in held.values() for p in ring)
    assert broker.history_memory <= budget
    for ring in held.values():
        if ring:
            assert [p.offset for p in ring] == list(range(ring[0].offset, ring[-1].offset + 1))
    # The eviction queue cannot outgrow what history holds by more than its slack.
    count = sum(map(len, held.values()))
    assert len(broker._stored) <= 2 * count + 1024 + 1


class BrokerBooks(RuleBasedStateMachine):
    """Publish, expire, sweep, subscribe in any order; the books must balance after each step."""

    budget = 200_000

    @initialize()
    def start(self) -> None:
        self.clock = Clock()
        self.broker = MemoryBroker(
            meta_ttl=30.0,
            max_history_memory=self.budget,
            clock=self.clock,
        )

    @rule(
        channel=st.sampled_from(["a", "b", "c", "small1", "small2"]),
        size=st.sampled_from([0, 10, 1_000, 5_000, 60_000]),
        times=st.integers(1, 30),
        extras=st.sampled_from([0, 0, 2_000]),
    )
    def publish(self, channel: str, size: int, times: int, extras: int) -> None:
        history = HistoryPolicy(4 if channel.startswith("small") else 50, 10.0)
        for _ in range(times):
            publish_now(self.broker, channel, b"x" * size, extras, history)

    @rule(
        channel=st.sampled_from(["a", "small1"]),
        ring=st.sampled_from([0, 1, 4, 50]),
        times=st.integers(1, 5),
    )
    def publish_with_another_policy(self, channel: str, ring: int, times: int) -> None:
        """A publication carries its own policy: a ring shrinks, grows or empties at once."""
        for _ in range(times):
            publish_now(self.broker, channel, b"x" * 1_000, 0, HistoryPolicy(ring, 10.0))
        assert len(rings(self.broker)[channel]) <= ring

    @rule(seconds=st.sampled_from([1.0, 5.0, 11.0, 40.0]))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule()
    def sweep(self) -> None:
        self.broker.sweep()

    @rule(channel=st.sampled_from(["a", "small1"]))
    def read(self, channel: str) -> None:
        coro = self.broker.history(channel)  # expires lazily, as a client's read does
        with pytest.raises(StopIteration):
            coro.send(None)

    @rule(channel=st.sampled_from(["a", "b"]), subscribed=st.booleans())
    def interest(self, channel: str, subscribed: bool) -> None:
        if subscribed:
            coro = self.broker.subscribe(channel)
            with pytest.raises(StopIteration):
                coro.send(None)
        else:
            self.broker.unsubscribe(channel)

    @invariant()
    def books_balance(self) -> None:
        check_books(self.broker, self.budget)


test_broker_books_balance_after_any_sequence = BrokerBooks.TestCase
test_broker_books_balance_after_any_sequence.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)


def test_the_budget_evicts_the_oldest_publications_in_the_process_first() -> None:
    """With rings and ttl too large to matter, history is exactly the newest suffix that fits."""
    budget = 300_000
    broker = MemoryBroker(max_history_memory=budget)
    unbounded = HistoryPolicy(size=100_000, ttl=1e9)
    rng = random.Random(10)
    published: list[Publication] = []
    for _ in range(5_000):
        channel = f"c{rng.randrange(40)}"
        data = b"x" * rng.choice([0, 100, 3_000, 30_000])
        published.append(publish_now(broker, channel, data, history=unbounded))
        # The longest suffix of everything published whose charges fit the budget.
        expected: list[Publication] = []
        total = 0
        for pub in reversed(published):
            total += history_cost(pub)
            if total > budget:
                break
            expected.append(pub)
        held = {id(p) for ring in rings(broker).values() for p in ring}
        assert held == {id(p) for p in expected}
        check_books(broker, budget)
        del published[: len(published) - len(expected)]


def test_a_publication_over_the_whole_budget_is_accepted_and_not_kept() -> None:
    broker = MemoryBroker(max_history_memory=10_000)
    kept = publish_now(broker, "a", b"x" * 100)
    huge = publish_now(broker, "b", b"x" * 20_000)
    assert huge.offset == 1  # published (and delivered), never refused
    assert rings(broker) == {"a": [], "b": []} and kept.offset == 1
    check_books(broker, 10_000)


def test_the_eviction_queue_stays_bounded_when_history_leaves_by_other_ways() -> None:
    """Ring overflow and expiry leave stale queue entries; compaction must drop them."""
    clock = Clock()
    broker = MemoryBroker(meta_ttl=20.0, clock=clock)
    for n in range(20_000):  # each ring overflows: all but 4 x 10 publications leave
        publish_now(broker, f"c{n % 10}", b"{}", history=HistoryPolicy(4, 10.0))
        check_books(broker, 256 * 1024 * 1024)
    assert len(broker._stored) <= 2 * 40 + 1024 + 1
    clock.now += 30.0  # everything expires, then every stream is forgotten
    broker.sweep()
    assert rings(broker) == {} and broker.history_memory == 0
    assert len(broker._stored) == 0


def test_tags_and_info_are_charged_as_data() -> None:
    """They are copied into every encoded form, so a large one must count like data."""
    broker = MemoryBroker(max_history_memory=10**9)
    plain = publish_now(broker, "a", b"{}")
    extra = publish_now(broker, "a", b"{}", extras=50_000)
    assert history_cost(extra) - history_cost(plain) >= 4 * 2 * 50_000


def test_a_stream_created_by_subscribe_keeps_what_the_first_publication_asks() -> None:
    """Subscribing creates a stream before any policy is known: it holds nothing and
    is charged nothing until a publication brings its size, then keeps that many."""
    broker = MemoryBroker()
    coro = broker.subscribe("a")
    with pytest.raises(StopIteration):
        coro.send(None)
    assert rings(broker) == {"a": []} and broker.history_memory == 0
    for _ in range(5):
        publish_now(broker, "a", b"{}", history=HistoryPolicy(3, 10.0))
    assert [p.offset for p in rings(broker)["a"]] == [3, 4, 5]
    publish_now(broker, "a", b"{}", history=HistoryPolicy(0, 10.0))
    assert rings(broker)["a"] == [] and broker.history_memory == 0
    check_books(broker, 256 * 1024 * 1024)
