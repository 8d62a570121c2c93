"""Publish options over real servers: ``skip_history``, ``exclude``, ``idempotency_key``.

Each test runs on one node with the memory broker and on two nodes sharing one
Redis (subscribers on the first node, publications made on the second, so that
every option crosses the broker). Publications are made with ``Hub.publish``
on the server's loop (what the Python API, the server API and the session
call); the subscribers are real clients on real sockets: SSE over httpx, and
Centrifugo's protocol over a WebSocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from faults_support import HoldsHistory
from helpers import SSEClient, api, check_serving, pub_json, rss_kib, unique_channel
from hooks_support import HookedServer, hooked_server
from test_websocket_python import TIMEOUT, Events, next_pub
from test_websocket_python import client as sdk_client
from tidings.brokers import envelope
from tidings.brokers.base import IdempotencyTable
from tidings.brokers.memory import MemoryBroker
from tidings.hub import Hub, Position, Publication
from ws_support import Proxy, RawClient, connect_raw

BROKERS = ["memory", "redis"]


@contextlib.contextmanager
def nodes(
    kind: str, request: pytest.FixtureRequest, config: dict[str, Any] | None = None
) -> Iterator[tuple[HookedServer, HookedServer]]:
    """(the subscribers' node, the publishers' node): one node twice with the
    memory broker, two nodes on one Redis or one NATS otherwise."""
    tree = dict(config or {})
    if kind == "memory":
        with hooked_server(config=tree) as node:
            yield node, node
        return
    broker = request.getfixturevalue(f"{kind}_server")
    tree["broker"] = {"type": kind, f"{kind}_url": broker.url}
    with hooked_server(config=tree) as first, hooked_server(config=tree) as second:
        yield first, second


def publish(node: HookedServer, channel: str, data: bytes, **options: Any) -> Position:
    position: Position = node.call(node.server.hub.publish(channel, data, **options))
    return position


def ws_client(node: HookedServer, channel: str) -> tuple[RawClient, str]:
    """A WebSocket client subscribed to ``channel``, and its client id."""
    client = connect_raw(node.ws_url, (channel,))
    (reply,) = [m for m in client.messages() if m.get("id") == 1]
    return client, reply["connect"]["client"]


def ws_publications(client: RawClient, n: int) -> list[dict[str, Any]]:
    """The first ``n`` publication pushes the client received (waiting for them)."""

    def pubs() -> list[dict[str, Any]]:
        return [m["push"]["pub"] for m in client.messages() if "pub" in m.get("push", {})]

    deadline = time.monotonic() + 10
    while len(pubs()) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not client.receive(left):
            raise AssertionError(f"{len(pubs())} publications of {n}: {pubs()}")
    return pubs()[:n]


@pytest.mark.parametrize("kind", BROKERS)
def test_skip_history_is_delivered_live_not_stored_and_a_resume_across_it_is_whole(
    kind: str, request: pytest.FixtureRequest
) -> None:
    channel = unique_channel("skip")
    with nodes(kind, request) as (here, there), SSEClient(here, [channel]) as sse:
        sse.subscribed()
        ws, _ = ws_client(here, channel)
        first = publish(there, channel, b'{"n":1}')
        live_only = publish(there, channel, b'{"n":2}', skip_history=True)
        third = publish(there, channel, b'{"n":3}')
        # Live: every subscriber, on the other node too, gets all three in order.
        events = sse.publications(3)
        assert [pub_json(ev)["data"] for ev in events] == [{"n": 1}, {"n": 2}, {"n": 3}]
        pushes = ws_publications(ws, 3)
        assert [p["data"] for p in pushes] == [{"n": 1}, {"n": 2}, {"n": 3}]
        ws.close()
        # It takes no offset: it stands where the stored one before it stands.
        assert live_only == first and third.offset == first.offset + 1
        assert events[1].id == events[0].id
        assert pushes[1]["offset"] == pushes[0]["offset"] == first.offset


def test_with_nats_a_live_only_publication_takes_no_offset_on_the_receiving_node(
    request: pytest.FixtureRequest,
) -> None:
    """NATS numbers publications per node, as they arrive: a live-only one is
    numbered like the stored one before it there too."""
    channel = unique_channel("skip")
    with nodes("nats", request) as (here, there), SSEClient(here, [channel]) as sse:
        sse.subscribed()
        publish(there, channel, b'{"n":1}')
        publish(there, channel, b'{"n":2}', skip_history=True)
        publish(there, channel, b'{"n":3}')
        events = sse.publications(3)
        assert [pub_json(ev)["data"] for ev in events] == [{"n": 1}, {"n": 2}, {"n": 3}]
        assert [pub_json(ev)["offset"] for ev in events] == [1, 1, 2]
        assert events[1].id == events[0].id != events[2].id


@pytest.mark.parametrize("kind", BROKERS)
def test_a_skipped_publication_is_absent_from_history_and_resumes_neither_gap_nor_repeat(
    kind: str, request: pytest.FixtureRequest
) -> None:
    channel = unique_channel("skip")
    with nodes(kind, request) as (here, there):
        with SSEClient(here, [channel]) as sse:
            head = sse.subscribed()
            publish(there, channel, b'{"n":1}')
            publish(there, channel, b'{"n":2}', skip_history=True)
            publish(there, channel, b'{"n":3}')
            events = sse.publications(3)
        pubs, top = here.call(here.server.hub.history(channel))
        assert [(p.offset, p.data) for p in pubs] == [(1, b'{"n":1}'), (2, b'{"n":3}')]
        assert top.offset == 2
        # From before all three, from the stored one, from the skipped one's id:
        # recovered every time, with exactly the stored publications after it.
        for since, expected in [
            (head.id, [{"n": 1}, {"n": 3}]),
            (events[0].id, [{"n": 3}]),
            (events[1].id, [{"n": 3}]),
        ]:
            with SSEClient(here, [channel], last_event_id=since) as resumed:
                assert resumed.subscribed().json["recovered"] is True
                got = [pub_json(ev)["data"] for ev in resumed.publications(len(expected))]
                assert got == expected
                # Nothing more was replayed: the next event is the next publication.
                publish(there, channel, b'{"marker":true}')
                (after,) = resumed.publications(1)
                assert pub_json(after)["data"] == {"marker": True}


@pytest.mark.parametrize("kind", [*BROKERS, "nats"])
def test_exclude_keeps_a_publication_from_the_named_clients_only(
    kind: str, request: pytest.FixtureRequest
) -> None:
    channel = unique_channel("excl")
    with nodes(kind, request) as (here, there), SSEClient(here, [channel]) as sse:
        sse.subscribed()
        excluded, excluded_id = ws_client(here, channel)
        other, other_id = ws_client(here, channel)
        assert excluded_id != other_id
        publish(there, channel, b'{"n":1}', exclude=frozenset({excluded_id, "not-a-client"}))
        publish(there, channel, b'{"n":2}')
        assert [p["data"] for p in ws_publications(other, 2)] == [{"n": 1}, {"n": 2}]
        assert [pub_json(ev)["data"] for ev in sse.publications(2)] == [{"n": 1}, {"n": 2}]
        # The excluded client's first publication is the second one.
        assert [p["data"] for p in ws_publications(excluded, 1)] == [{"n": 2}]
        excluded.close()
        other.close()


@pytest.mark.parametrize("kind", BROKERS)
def test_an_idempotency_key_publishes_once_within_the_window_and_again_after_it(
    kind: str, request: pytest.FixtureRequest
) -> None:
    channel = unique_channel("idem")
    config = {"limits": {"idempotency_window": 2.0}}
    with nodes(kind, request, config) as (here, there), SSEClient(there, [channel]) as sse:
        sse.subscribed()
        first = publish(here, channel, b'{"n":1}', idempotency_key="order-17")
        # The repeat (through the other node with Redis) answers the first result...
        assert publish(there, channel, b'{"n":1}', idempotency_key="order-17") == first
        # ...and is not published: the next publication follows the first.
        marker = publish(there, channel, b'{"marker":1}')
        assert marker.offset == first.offset + 1
        got = [pub_json(ev)["data"] for ev in sse.publications(2)]
        assert got == [{"n": 1}, {"marker": 1}]
        # The same key in another channel is another key.
        assert publish(here, channel + "x", b"{}", idempotency_key="order-17").offset == 1
        # Past the window the key publishes again (polled, with a deadline).
        deadline = time.monotonic() + 15
        while (again := publish(there, channel, b'{"n":2}', idempotency_key="order-17")) == first:
            assert time.monotonic() < deadline, "the key was still remembered after 15 s"
            time.sleep(0.1)
        assert again.offset == marker.offset + 1
        (ev,) = sse.publications(1)
        assert pub_json(ev)["data"] == {"n": 2}


def _batch_publish(client: httpx.Client, url: str, channel: str, keys: range) -> None:
    commands = [
        {"publish": {"channel": channel, "data": {"k": key}, "idempotency_key": f"key-{key}"}}
        for key in keys
    ]
    resp = client.post(f"{url}/api/batch", json={"commands": commands})
    assert resp.status_code == 200, resp.text
    replies = resp.json()["replies"]
    assert all("publish" in reply for reply in replies), replies[:3]


def test_many_distinct_idempotency_keys_keep_the_table_bounded(server_factory: Any) -> None:
    """The attack: 100,000 distinct keys in the window; the server remembers at
    most ``limits.max_idempotency_keys`` of them and its memory stays flat."""
    srv = server_factory(config="[limits]\nmax_idempotency_keys = 1000\n")
    channel = unique_channel("idem")
    with httpx.Client(timeout=60) as client:
        for start in (0, 1000):  # warm: the table is full
            _batch_publish(client, srv.url, channel, range(start, start + 1000))
        before = rss_kib(srv)
        bystander = unique_channel("calm")
        with SSEClient(srv, [bystander]) as sse:
            sse.subscribed()
            for start in range(2000, 100_000, 1000):
                _batch_publish(client, srv.url, channel, range(start, start + 1000))
                if start % 10_000 == 0:  # another client is served all along
                    _api_publish(srv, bystander, {"at": start})
                    (ev,) = sse.publications(1)
                    assert pub_json(ev)["data"] == {"at": start}
        grown = rss_kib(srv) - before
        # Without the bound the 98,000 keys grew it by 34 MiB (measured, about
        # 360 B per key); with it, by 112 KiB.
        assert grown < 8 * 1024, f"RSS grew by {grown} KiB over 98,000 idempotency keys"
        # The newest keys are remembered (a repeat answers the same offset)...
        repeat = {"channel": channel, "data": {}, "idempotency_key": "key-99999"}
        first_offset = 100_000
        resp = client.post(f"{srv.url}/api/publish", json=repeat)
        assert resp.json()["result"]["offset"] == first_offset, resp.text
        # ...the oldest were forgotten: that key publishes again.
        oldest = {"channel": channel, "data": {}, "idempotency_key": "key-0"}
        resp = client.post(f"{srv.url}/api/publish", json=oldest)
        assert resp.json()["result"]["offset"] == first_offset + 1, resp.text
    check_serving(srv)
    assert "Traceback" not in srv.logs()


# -- the sans-I/O parts, in process ------------------------------------------


def test_the_idempotency_table_forgets_a_key_after_the_window_and_the_oldest_when_full() -> None:
    now = [100.0]
    table = IdempotencyTable(window=10.0, max_keys=3, clock=lambda: now[0])
    for n in range(3):
        table.put("ch", f"k{n}", Position("e", n + 1))
    assert [table.get("ch", f"k{n}") for n in range(3)] == [Position("e", n + 1) for n in range(3)]
    assert table.get("other", "k0") is None  # a key is per channel
    table.put("ch", "k3", Position("e", 4))  # full: k0 goes first
    assert table.get("ch", "k0") is None and table.get("ch", "k3") == Position("e", 4)
    now[0] += 10.0  # the window passed for all of them
    assert [table.get("ch", f"k{n}") for n in range(1, 4)] == [None, None, None]
    assert len(table) == 0


def test_a_long_key_costs_what_a_short_one_does() -> None:
    short, long = IdempotencyTable.digest("ch", "k"), IdempotencyTable.digest("ch", "k" * 100_000)
    assert len(short) == len(long) == 16 and short != long
    assert IdempotencyTable.digest("a", "b:c") != IdempotencyTable.digest("a:b", "c")


def test_publish_options_travel_in_the_envelope_and_a_plain_one_is_unchanged() -> None:
    wire = envelope.encode(b"{}", None, None, 5, exclude=frozenset({"b", "a"}), transient=True)
    pub = envelope.decode("ch", 3, "ep", wire)
    assert (pub.directed, pub.transient, pub.exclude, pub.offset) == (
        True,
        True,
        frozenset({"a", "b"}),
        3,
    )
    plain = envelope.decode("ch", 3, "ep", envelope.encode(b"{}", None, None, 5))
    assert (plain.directed, plain.transient, plain.exclude) == (False, False, frozenset())
    assert type(plain) is Publication  # no slots paid for options it does not use


class HeldMemory(HoldsHistory, MemoryBroker):
    """The memory broker with history reads held and live deliveries dropped on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.init_faults()


class Subscriber:
    """A hub subscriber with a client id, remembering what it was given."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.received: list[bytes] = []
        self.resyncs = 0

    def deliver(self, pub: Publication) -> None:
        self.received.append(pub.data)

    def insufficient_state(self) -> None:
        self.resyncs += 1

    def deliver_presence(self, event: object) -> None:
        pass


def test_a_subscriber_joining_meanwhile_gets_live_only_and_excluding_publications_right() -> None:
    """While a subscriber's history read is held, a live-only publication, one
    excluding it and a plain one arrive: it gets the live-only one at its place,
    not the one excluding it, each once; then goes live."""

    async def scenario() -> None:
        broker = HeldMemory()
        hub = Hub(broker)
        already = Subscriber("already")
        await hub.subscribe("a", already)
        start = await hub.publish("a", b"1")
        broker.hold_history.add("a")
        joiner = Subscriber("joiner")
        joining = asyncio.ensure_future(hub.subscribe("a", joiner, since=Position(start.epoch, 0)))
        await broker.held_reads(1)  # history read: [1]
        await hub.publish("a", b"2", skip_history=True)
        await hub.publish("a", b"3", exclude=frozenset({"joiner"}))
        await hub.publish("a", b"4")
        broker.held[0].set()
        recovery = await joining
        assert [(p.offset, p.data) for p in recovery.publications] == [
            (1, b"1"),
            (1, b"2"),
            (3, b"4"),
        ]
        assert recovery.recovered and recovery.position == Position(start.epoch, 3)
        await hub.publish("a", b"5")
        assert joiner.received == [b"5"]
        assert already.received == [b"1", b"2", b"3", b"4", b"5"]

    asyncio.run(scenario())


def test_a_live_only_publication_past_what_a_node_delivered_makes_its_subscribers_resync() -> None:
    """A node that missed a stored publication learns it from the live-only one
    after it (it carries that position): its subscribers resync rather than be
    handed it as if nothing was missing."""

    async def scenario() -> None:
        broker = HeldMemory()
        hub = Hub(broker)
        subscriber = Subscriber("s")
        await hub.subscribe("a", subscriber)
        await hub.publish("a", b"1")
        broker.drop.add(("a", 2))
        await hub.publish("a", b"2")  # stored, lost on its way to this node
        broker.drop.clear()
        await hub.publish("a", b"3", skip_history=True)  # at offset 2
        assert subscriber.received == [b"1"] and subscriber.resyncs == 1

    asyncio.run(scenario())


def _api_publish(srv: Any, channel: str, data: Any, **options: Any) -> dict[str, Any]:
    resp = api(srv, "publish", {"channel": channel, "data": data, **options})
    assert resp.status_code == 200 and "result" in resp.json(), resp.text
    result: dict[str, Any] = resp.json()["result"]
    return result


def test_centrifuge_python_recovers_across_a_live_only_publication(server_factory: Any) -> None:
    """The SDK, unmodified, over the server API's ``skip_history``: live, it gets
    the live-only publication at the offset of the one before; after a network
    cut it recovers what history holds, with no hole where the live-only one
    was and nothing twice."""
    srv = server_factory()
    proxy = Proxy(srv.port)

    async def publish_now(data: Any, **options: Any) -> dict[str, Any]:
        return await asyncio.to_thread(_api_publish, srv, channel, data, **options)

    async def main() -> None:
        await publish_now({"n": 0})  # the stream exists, with an epoch
        sdk = sdk_client(proxy.ws_url)
        events = Events()
        sub = sdk.new_subscription(channel, events)
        await sdk.connect()
        await sub.subscribe()
        await sub.ready(TIMEOUT)
        first = await asyncio.wait_for(events.subscribed.get(), TIMEOUT)
        assert first.recoverable
        await publish_now({"n": 1})
        await publish_now({"n": 2}, skip_history=True)
        await publish_now({"n": 3})
        live = [(await next_pub(events)).pub for _ in range(3)]
        assert [(p.data, p.offset) for p in live] == [({"n": 1}, 2), ({"n": 2}, 2), ({"n": 3}, 3)]

        proxy.cut()
        await publish_now({"n": 4})
        await publish_now({"n": 5}, skip_history=True)  # live only: nobody to see it
        await publish_now({"n": 6})
        proxy.restore()
        again = await asyncio.wait_for(events.subscribed.get(), TIMEOUT)
        assert again.was_recovering and again.recovered
        got = [(await next_pub(events)).pub for _ in range(2)]
        assert [(p.data, p.offset) for p in got] == [({"n": 4}, 4), ({"n": 6}, 5)]
        await publish_now({"n": 7})
        assert (await next_pub(events)).pub.data == {"n": 7}
        assert events.publications.empty()
        await sdk.disconnect()

    channel = unique_channel("pyskip")
    try:
        asyncio.run(main())
    finally:
        proxy.close()
