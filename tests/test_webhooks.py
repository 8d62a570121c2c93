"""Webhooks (issue 14, docs/webhooks.md): events POSTed, signed, retried, bounded.

The receiver is written here (:class:`Receiver`, an aiohttp app on its own
loop in a thread) and checks every signature itself with the secret it was
given, as an application would. tidings runs as a real server on a socket:
in a thread of this process (``hooked_server``) when the test emits events
itself through ``server.hooks.emit``, or as a ``tidings serve`` process when
real clients cause them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import free_port
from helpers import SSEClient, check_serving, publish, rss_kib
from hooks_support import TIMEOUT, HookedServer, Recorder, hooked_server
from tidings.config import WebhooksConfig
from tidings.hooks import (
    ChannelEvent,
    DisconnectEvent,
    Event,
    Hooks,
    MemberEvent,
    PublicationEvent,
)
from tidings.webhooks import Outcome, WebhookSender, classify, encode_event

SECRET = "webhook-secret-for-tests"


# -- the receiver ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Answer:
    """How the receiver answers one POST."""

    status: int = 200
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Never answer (until the receiver closes): the sender must give up on its own.
    hang: bool = False
    #: Answer ``status`` with a body that never ends.
    endless: bool = False


@dataclasses.dataclass(frozen=True)
class Post:
    """One POST as the receiver saw it."""

    body: bytes
    signature: str | None
    #: The signature matched the receiver's own HMAC of the body.
    valid: bool
    #: What it answered (None: it never did).
    status: int | None

    @property
    def events(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = json.loads(self.body)["events"]
        return events

    @property
    def ids(self) -> list[str]:
        return [event["id"] for event in self.events]


class Receiver:
    """A webhook receiver: answers POSTs as scripted (then 200) and records them.

    It verifies each signature with *its* secret, which a test may set to
    something other than the server's to see the check fail.
    """

    def __init__(self, secret: str = SECRET, answers: Iterable[Answer] = ()) -> None:
        self.secret = secret.encode()
        self.answers = collections.deque(answers)
        self.posts = Recorder()
        #: Bytes of endless bodies written before the sender hung up.
        self.endless_sent = Recorder()
        self.loop = asyncio.new_event_loop()
        self._release: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    def __enter__(self) -> Receiver:
        ready = threading.Event()

        async def start() -> None:
            self._release = asyncio.Event()
            app = web.Application()
            app.router.add_post("/hook", self._handle)
            self._runner = web.AppRunner(app, shutdown_timeout=1.0)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            port = self._runner.addresses[0][1]
            self.url = f"http://127.0.0.1:{port}/hook"

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(start())
            ready.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, name="webhook-receiver", daemon=True)
        self._thread.start()
        assert ready.wait(TIMEOUT), "the receiver did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._release is not None and self._runner is not None
            self._release.set()
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT)
        self.loop.close()

    def verify(self, body: bytes, signature: str | None) -> bool:
        """What a receiver does first: the HMAC-SHA256 of the raw body, hex, compared."""
        expected = hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        return signature is not None and hmac.compare_digest(expected, signature)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        signature = request.headers.get("X-Tidings-Signature")
        answer = self.answers.popleft() if self.answers else Answer()
        valid = self.verify(body, signature)
        if answer.hang:
            self.posts.add(Post(body, signature, valid, None))
            assert self._release is not None
            await self._release.wait()
            return web.Response(status=503)
        self.posts.add(Post(body, signature, valid, answer.status))
        if answer.endless:
            response = web.StreamResponse(status=answer.status)
            await response.prepare(request)
            sent = 0
            chunk = b"x" * 65536
            try:
                while sent < 1 << 30:
                    await response.write(chunk)
                    sent += len(chunk)
            except (ConnectionError, RuntimeError):
                pass
            self.endless_sent.add(sent)
            return response
        return web.Response(status=answer.status, headers=answer.headers, text="ok")

    # -- what the test reads ----------------------------------------------------

    def accepted(self) -> list[dict[str, Any]]:
        """Events of the POSTs answered 2xx, in arrival order."""
        return [e for post in self.posts.items if post.status == 200 for e in post.events]

    def wait_accepted(self, n: int, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        """Block until at least ``n`` distinct events were accepted; those events, deduplicated."""

        def enough(posts: list[Post]) -> bool:
            ids = {i for post in posts if post.status == 200 for i in post.ids}
            return len(ids) >= n

        self.posts.wait_for(enough, timeout)
        return dedupe(self.accepted())

    def wait_for_name(self, name: str, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        """Block until an event called ``name`` was accepted; the accepted events, deduplicated."""

        def arrived(posts: list[Post]) -> bool:
            return any(e["name"] == name for p in posts if p.status == 200 for e in p.events)

        self.posts.wait_for(arrived, timeout)
        return dedupe(self.accepted())


def dedupe(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a receiver keeps: the first of each id."""
    seen: set[str] = set()
    kept = []
    for event in events:
        if event["id"] not in seen:
            seen.add(event["id"])
            kept.append(event)
    return kept


# -- the server --------------------------------------------------------------------


@contextlib.contextmanager
def webhook_server(url: str, shutdown: float = 5.0, **webhooks: Any) -> Iterator[HookedServer]:
    """A server in this process sending webhooks to ``url`` (more ``[webhooks]`` keys given).

    ``shutdown`` bounds its flush at the end: short where the receiver never takes
    the last batch, so that the test does not wait it out."""
    config = {
        "webhooks": {"url": url, "secret": SECRET, "retry_delay": 0.05, **webhooks},
        "timeouts": {"shutdown": shutdown},
        "namespaces": {"chat": {}},
    }
    with hooked_server(Hooks(), config=config) as srv:
        yield srv


def sender(srv: HookedServer) -> WebhookSender:
    assert srv.server.webhooks is not None
    return srv.server.webhooks


def emit(srv: HookedServer, events: Iterable[Event]) -> None:
    """Emit ``events`` on the server's loop in one go (one loop iteration: one batch forms)."""
    hooks = srv.server.hooks

    async def run() -> None:
        for event in events:
            hooks.emit(event)

    srv.call(run())


def emit_many(srv: HookedServer, make: Any, n: int, chunk: int = 5000) -> None:
    """Emit ``make(i)`` for i in range(n), yielding to the loop between chunks (the sender runs)."""
    hooks = srv.server.hooks

    async def run() -> None:
        for start in range(0, n, chunk):
            for i in range(start, min(n, start + chunk)):
                hooks.emit(make(i))
            await asyncio.sleep(0)

    srv.call(run(), timeout=120)


def occupied(i: int) -> ChannelEvent:
    return ChannelEvent(kind="occupied", channel=f"room{i}")


def rss_kib_self() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def wait_until(predicate: Any, what: str, timeout: float = TIMEOUT) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


EVERY_KIND: list[Event] = [
    ChannelEvent(kind="occupied", channel="chat:lobby"),
    MemberEvent(
        kind="join",
        channel="chat:lobby",
        client="c1",
        user="alice",
        conn_info=b'{"name":"Alice"}',
        chan_info=None,
    ),
    PublicationEvent(
        channel="chat:lobby", data=b'{"text":"hi"}', offset=7, epoch="ep", user="alice", client="c1"
    ),
    MemberEvent(kind="leave", channel="chat:lobby", client="c1", user="alice"),
    DisconnectEvent(client="c1", user="alice", transport="websocket", code=3000, reason="bye"),
    ChannelEvent(kind="vacated", channel="chat:lobby"),
]


# -- delivered and signed ------------------------------------------------------------


def test_every_kind_delivered_signed_in_order_with_the_documented_shape() -> None:
    with (
        Receiver() as receiver,
        webhook_server(receiver.url, publications=["chat"]) as srv,
    ):
        emit(srv, EVERY_KIND)
        events = receiver.wait_accepted(len(EVERY_KIND))
        posts = receiver.posts.items
        assert all(post.valid for post in posts), posts
        assert len(events) == len(EVERY_KIND)
        stripped = [{k: v for k, v in e.items() if k not in ("id", "time_ms")} for e in events]
        assert stripped == [
            {"name": "channel_occupied", "channel": "chat:lobby"},
            {
                "name": "member_added",
                "channel": "chat:lobby",
                "user_id": "alice",
                "client_id": "c1",
                "conn_info": {"name": "Alice"},
                "chan_info": None,
            },
            {
                "name": "publication",
                "channel": "chat:lobby",
                "offset": 7,
                "epoch": "ep",
                "data": {"text": "hi"},
                "user_id": "alice",
                "client_id": "c1",
            },
            {
                "name": "member_removed",
                "channel": "chat:lobby",
                "user_id": "alice",
                "client_id": "c1",
                "conn_info": None,
                "chan_info": None,
            },
            {
                "name": "client_disconnected",
                "client_id": "c1",
                "user_id": "alice",
                "transport": "websocket",
                "code": 3000,
                "reason": "bye",
            },
            {"name": "channel_vacated", "channel": "chat:lobby"},
        ]
        ids = [e["id"] for e in events]
        assert len(set(ids)) == len(ids)
        # A random prefix per process, then a sequence: in emission order.
        prefixes = {i.rsplit("-", 1)[0] for i in ids}
        assert len(prefixes) == 1 and len(prefixes.pop()) == 16
        assert [int(i.rsplit("-", 1)[1]) for i in ids] == list(range(1, len(ids) + 1))
        envelope = json.loads(posts[0].body)
        assert set(envelope) == {"time_ms", "events"}
        assert all(envelope["time_ms"] >= e["time_ms"] > 1.7e12 for e in envelope["events"])


def test_a_wrong_secret_fails_the_receivers_check_and_the_refusal_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The receiver holds another secret: the check fails; it answers 401, which is final."""
    caplog.set_level(logging.INFO)
    answers = [Answer(status=401)]
    with (
        Receiver(secret="not-the-servers-secret", answers=answers) as receiver,
        webhook_server(receiver.url) as srv,
    ):
        emit(srv, [occupied(1), occupied(2)])
        (post,) = receiver.posts.wait_for(lambda posts: len(posts) >= 1)
        assert post.signature is not None and not post.valid
        assert receiver.verify(post.body, post.signature) is False
        # The same body verifies with the server's secret: the check itself is right.
        assert Receiver(secret=SECRET).verify(post.body, post.signature)
        wait_until(lambda: sender(srv).refused == 2, "the refused batch to be counted")
        # A refusal is not retried: the next event is the next POST, delivered.
        emit(srv, [occupied(3)])
        posts = receiver.posts.wait_for(lambda posts: len(posts) >= 2)
        assert [p.ids for p in posts][1] == [posts[0].ids[-1].rsplit("-", 1)[0] + "-3"]
        wait_until(lambda: sender(srv).delivered == 1, "the next batch to be delivered")
    refusals = [r for r in caplog.records if "refused a batch" in r.getMessage()]
    assert refusals and all(r.levelno == logging.WARNING and not r.exc_info for r in refusals)
    assert "401" in refusals[0].getMessage()


def test_unsigned_without_a_secret_and_warned(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with Receiver() as receiver, webhook_server(receiver.url, secret="") as srv:
        emit(srv, [occupied(1)])
        (post,) = receiver.posts.wait_for(lambda posts: len(posts) >= 1)
        assert post.signature is None and not post.valid
    assert any("sent unsigned" in r.getMessage() for r in caplog.records)


def test_the_receiver_in_the_docs_accepts_a_real_batch_once_and_refuses_forgeries() -> None:
    """docs/webhooks.md's ``accept``: run as printed against what the server sends."""
    text = (Path(__file__).parent.parent / "docs" / "webhooks.md").read_text()
    section = text.split("## Checking the signature", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "docs/webhooks.md lost its receiver"
    namespace: dict[str, Any] = {}
    exec(compile(match.group(1), "docs/webhooks.md", "exec"), namespace)
    accept = namespace["accept"]
    secret = namespace["SECRET"].decode()
    with (
        Receiver(secret=secret) as receiver,
        webhook_server(receiver.url, secret=secret) as srv,
    ):
        emit(srv, EVERY_KIND[:2])
        (post,) = receiver.posts.wait_for(lambda posts: len(posts) >= 1)
    assert [e["name"] for e in accept(post.body, post.signature)] == [
        "channel_occupied",
        "member_added",
    ]
    assert accept(post.body, post.signature) == []  # a repeat: dropped by id
    with pytest.raises(ValueError, match="signature"):
        accept(post.body.replace(b"lobby", b"lobbx"), post.signature)
    with pytest.raises(ValueError, match="signature"):
        accept(post.body, None)
    sent = json.loads(post.body)["time_ms"]
    stale = post.body.replace(b'"time_ms":%d' % sent, b'"time_ms":%d' % (sent - 600_000), 1)
    with pytest.raises(ValueError, match="too old"):
        accept(stale, hmac.new(secret.encode(), stale, hashlib.sha256).hexdigest())


# -- retried, at least once ------------------------------------------------------------


def test_5xx_retried_until_delivered_with_the_same_ids_in_order() -> None:
    answers = [Answer(status=500), Answer(status=503)]
    with Receiver(answers=answers) as receiver, webhook_server(receiver.url) as srv:
        emit(srv, [occupied(i) for i in range(5)])
        events = receiver.wait_accepted(5)
        posts = receiver.posts.items
        # The one batch three times, the same events each time, the body re-signed.
        assert [p.status for p in posts] == [500, 503, 200]
        assert posts[0].ids == posts[1].ids == posts[2].ids == [e["id"] for e in events]
        assert all(p.valid for p in posts)
        assert [e["channel"] for e in events] == [f"room{i}" for i in range(5)]
        # At least once: each id accepted exactly once here (no answer was lost), and
        # seen no more often than the attempts it took.
        accepted = collections.Counter(e["id"] for e in receiver.accepted())
        assert set(accepted.values()) == {1}
        wait_until(lambda: sender(srv).delivered == 5, "the batch to count as delivered")
        assert sender(srv).retries == 2


def test_408_and_429_retried_honouring_retry_after() -> None:
    answers = [Answer(status=429, headers={"Retry-After": "1"}), Answer(status=408)]
    with Receiver(answers=answers) as receiver, webhook_server(receiver.url) as srv:
        emit(srv, [occupied(1)])
        receiver.wait_accepted(1)
        assert [p.status for p in receiver.posts.items] == [429, 408, 200]
        wait_until(lambda: sender(srv).delivered == 1, "the batch to count as delivered")
        assert sender(srv).refused == 0 and sender(srv).retries == 2


def test_a_lost_answer_gives_a_repeat_that_the_ids_let_the_receiver_drop() -> None:
    """The receiver takes the batch but its answer never comes: the sender gives up
    after ``timeout`` and sends it again; dedupe by id leaves each event once."""
    answers = [Answer(hang=True)]
    with (
        Receiver(answers=answers) as receiver,
        webhook_server(receiver.url, timeout=0.5) as srv,
    ):
        emit(srv, [occupied(i) for i in range(3)])
        receiver.wait_accepted(3)
        emit(srv, [occupied(i) for i in range(3, 6)])
        events = receiver.wait_accepted(6)
        seen = collections.Counter(i for post in receiver.posts.items for i in post.ids)
        # The first batch twice (once unanswered), the second once: no more.
        assert sorted(seen.values()) == [1, 1, 1, 2, 2, 2]
        assert [e["channel"] for e in events] == [f"room{i}" for i in range(6)]
        # Meanwhile other clients were served.
        assert httpx.get(f"{srv.url}/health", timeout=TIMEOUT).status_code == 200


def test_batches_keep_order_and_size_bounds() -> None:
    with (
        Receiver() as receiver,
        webhook_server(receiver.url, max_batch=40, max_batch_bytes=2000) as srv,
    ):
        emit(srv, [occupied(i) for i in range(250)])
        events = receiver.wait_accepted(250)
        assert [e["channel"] for e in events] == [f"room{i}" for i in range(250)]
        for post in receiver.posts.items:
            assert len(post.events) <= 40
            assert sum(len(msgspec.json.encode(e)) for e in post.events) <= 2000


def test_an_endless_answer_is_cut_short_and_the_batch_counts_as_delivered() -> None:
    """A receiver answering 200 with a body that never ends: the sender reads 64 KiB,
    hangs up, and goes on; it does not read for ``timeout`` seconds nor hold the body."""
    with (
        Receiver(answers=[Answer(endless=True)]) as receiver,
        webhook_server(receiver.url, timeout=30.0) as srv,
    ):
        emit(srv, [occupied(1)])
        (sent,) = receiver.endless_sent.wait_for(lambda sent: len(sent) >= 1)
        # What the receiver wrote before the hang-up: the cap plus the sockets' buffers.
        assert sent < 16 * 1024 * 1024, sent
        wait_until(lambda: sender(srv).delivered == 1, "the batch to count as delivered")
        emit(srv, [occupied(2)])
        assert [e["channel"] for e in receiver.wait_accepted(2)] == ["room1", "room2"]


class TricklingReceiver:
    """A raw receiver that reads a POST, then writes its status line one byte per
    0.1 s, forever: every read the sender makes gets a byte, so only a bound on the
    whole POST ends it. It counts the POSTs that reached it."""

    def __init__(self) -> None:
        self.connections = Recorder()
        self.loop = asyncio.new_event_loop()
        self.url = ""

    def __enter__(self) -> TricklingReceiver:
        ready = threading.Event()

        async def start() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            port = self._server.sockets[0].getsockname()[1]
            self.url = f"http://127.0.0.1:{port}/hook"

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(start())
            ready.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, name="trickling-receiver", daemon=True)
        self._thread.start()
        assert ready.wait(TIMEOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT)
        self.loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.add(await reader.readuntil(b"\r\n\r\n"))
        with contextlib.suppress(ConnectionError):
            while True:  # b"HTTP/1.1 200 OK" never completes
                for byte in b"HTTP/1.1 200 OK":
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.1)


def test_a_trickling_answer_is_abandoned_after_the_timeout_and_retried() -> None:
    """Each phase's timeout is never reached by a receiver trickling bytes: the POST
    as a whole is bounded by ``timeout``, then the batch is sent again."""
    with (
        TricklingReceiver() as receiver,
        webhook_server(receiver.url, shutdown=0.2, timeout=0.5) as srv,
    ):
        emit(srv, [occupied(1)])
        receiver.connections.wait_for(lambda heads: len(heads) >= 2)
        assert sender(srv).retries >= 1 and sender(srv).delivered == 0


# -- bounded ------------------------------------------------------------------------


def test_receiver_down_the_queue_stays_bounded_and_drops_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """200,000 events while nothing listens at the URL: at most max_queue wait, the
    rest are dropped oldest first, counted and logged; the process does not grow."""
    caplog.set_level(logging.INFO)
    url = f"http://127.0.0.1:{free_port()}/hook"
    with webhook_server(url, shutdown=0.2, max_queue=1000) as srv:
        webhooks = sender(srv)
        emit_many(srv, occupied, 20_000)
        before = rss_kib_self()
        emit_many(srv, occupied, 200_000)
        grown = rss_kib_self() - before
        assert webhooks.queued <= 1000
        # Every event is queued, in flight (one batch of max_batch at most), or dropped.
        assert 220_000 - webhooks.queued - 100 <= webhooks.dropped <= 220_000 - webhooks.queued
        # 200k encoded events held would be about 60 MiB.
        assert grown < 8 * 1024, f"grew {grown} KiB"
        assert webhooks.delivered == 0 and webhooks.retries >= 1
        assert httpx.get(f"{srv.url}/health", timeout=TIMEOUT).status_code == 200
        overflowed = webhooks.dropped
    lines = [r for r in caplog.records if "webhook queue full" in r.getMessage()]
    assert lines and all(r.levelno == logging.WARNING and not r.exc_info for r in lines)
    # Rate-limited: a few lines for 219,000 drops, not one each; together (the last
    # written at shutdown) they count every drop.
    assert len(lines) <= 5
    counts = [re.search(r"(\d+) oldest events dropped", r.getMessage()) for r in lines]
    assert sum(int(m.group(1)) for m in counts if m) == overflowed
    failures = [r for r in caplog.records if "webhook POST to" in r.getMessage()]
    assert failures and len(failures) <= 5


def test_large_publications_bounded_by_bytes() -> None:
    """Publications carry their data: the byte bound holds where the count bound would not."""
    url = f"http://127.0.0.1:{free_port()}/hook"
    data = msgspec.json.encode({"blob": "y" * 100_000})

    def publication(i: int) -> PublicationEvent:
        return PublicationEvent(channel="feed", data=data, offset=i, epoch="e")

    with webhook_server(url, shutdown=0.2, publications=[""], max_queue_bytes=1024 * 1024) as srv:
        webhooks = sender(srv)
        emit_many(srv, publication, 20, chunk=10)
        before = rss_kib_self()
        emit_many(srv, publication, 500, chunk=10)
        grown = rss_kib_self() - before
        assert webhooks.queued_bytes <= 1024 * 1024 and webhooks.queued <= 10
        assert webhooks.dropped >= 500
        # 500 x 100 kB held would be 50 MB.
        assert grown < 16 * 1024, f"grew {grown} KiB"


def test_publications_only_of_the_configured_namespaces() -> None:
    with Receiver() as receiver, webhook_server(receiver.url, publications=["chat"]) as srv:
        assert srv.server.hooks.publication_namespaces == frozenset({"chat"})
        emit(
            srv,
            [
                PublicationEvent(channel="news:x", data=b"1", offset=1, epoch="e"),
                PublicationEvent(channel="chat:x", data=b"2", offset=1, epoch="e"),
                PublicationEvent(channel="plain", data=b"3", offset=1, epoch="e"),
            ],
        )
        (event,) = receiver.wait_accepted(1)
        assert (event["channel"], event["data"]) == ("chat:x", 2)


def test_events_not_configured_are_not_sent() -> None:
    with Receiver() as receiver, webhook_server(receiver.url, events=["vacated"]) as srv:
        emit(srv, EVERY_KIND)
        (event,) = receiver.wait_accepted(1)
        assert event["name"] == "channel_vacated"
        assert event["id"].endswith("-1")  # events left out take no number: no gap
        assert srv.server.hooks.publication_namespaces is None


def test_nothing_to_send_listens_to_nothing() -> None:
    """With no events and no publications, emitters are not made to build events."""
    hooks = Hooks()
    WebhookSender(WebhooksConfig(url="http://x/", events=[])).install(hooks)
    assert not hooks.listening and hooks.publication_namespaces is None
    WebhookSender(WebhooksConfig(url="http://x/", events=["leave"])).install(hooks)
    assert hooks.listening


# -- shutdown --------------------------------------------------------------------------


def test_shutdown_flushes_what_is_queued() -> None:
    with (
        Receiver() as receiver,
        webhook_server(receiver.url, max_batch=10) as srv,
    ):
        emit(srv, [occupied(i) for i in range(300)])
        srv.call(srv.server.shutdown(), timeout=30)
        # Everything was accepted by the time shutdown returned: no waiting here.
        events = dedupe(receiver.accepted())
        assert [e["channel"] for e in events] == [f"room{i}" for i in range(300)]
        assert sender(srv).dropped == 0


def test_shutdown_with_the_receiver_down_gives_up_within_its_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    url = f"http://127.0.0.1:{free_port()}/hook"
    config = {
        "webhooks": {"url": url, "secret": SECRET, "retry_delay": 0.05},
        "timeouts": {"shutdown": 0.5},
    }
    with hooked_server(Hooks(), config=config) as srv:
        emit(srv, [occupied(i) for i in range(50)])
        srv.call(srv.server.shutdown(), timeout=30)
        assert sender(srv).dropped == 50 and sender(srv).queued == 0
    lines = [r for r in caplog.records if "not delivered within the shutdown" in r.getMessage()]
    assert len(lines) == 1 and "50 events" in lines[0].getMessage()


# -- config --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"url": "ftp://x/hook"}, "webhooks.url"),
        ({"url": "localhost:8000/hook"}, "webhooks.url"),
        ({"url": "http://x:99999/hook"}, "webhooks.url"),
        ({"url": "http://x:port/hook"}, "webhooks.url"),
        ({"url": "http://[zz/hook"}, "webhooks.url"),
        ({"url": "http:///hook"}, "webhooks.url"),
        ({"url": "http://exa mple/hook"}, "webhooks.url"),
        ({"url": "http://x/hook\n"}, "webhooks.url"),
        ({"url": "http://x/", "retry_delay": 5, "max_retry_delay": 1}, "retry_delay"),
        ({"url": "http://x/", "max_queue": 0}, "max_queue"),
    ],
)
def test_bad_webhooks_config_is_refused(tree: dict[str, Any], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert(tree, WebhooksConfig)


def test_credentials_in_the_url_stay_out_of_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    """The URL's user info and query are secrets to a log: no line names them, neither
    ours (which name the host and path) nor the HTTP client's."""
    caplog.set_level(logging.DEBUG)
    with Receiver(answers=[Answer(status=500)]) as receiver:
        url = receiver.url.replace("http://", "http://hookuser:hookpass@") + "?key=hookkey"
        with webhook_server(url) as srv:
            emit(srv, [occupied(1)])
            receiver.wait_accepted(1)
            httpx.get(f"{srv.url}/health", timeout=TIMEOUT)  # another httpx request
    # Every line of this process but the receiver's own access log.
    text = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("aiohttp"))
    assert "webhook POST to http://127.0.0.1:" in text and "/hook failed (status 500)" in text
    for secret in ("hookuser", "hookpass", "hookkey"):
        assert secret not in text
    assert "HTTP Request: GET http://127.0.0.1:" in text  # only the webhook's are quiet


def test_publications_of_an_unknown_namespace_are_refused() -> None:
    from tidings.config import Config

    with pytest.raises(msgspec.ValidationError, match=r"webhooks\.publications"):
        msgspec.convert({"webhooks": {"url": "http://x/", "publications": ["nope"]}}, Config)


# -- the pure parts -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.DELIVERED),
        (204, Outcome.DELIVERED),
        (301, Outcome.REFUSED),
        (400, Outcome.REFUSED),
        (401, Outcome.REFUSED),
        (404, Outcome.REFUSED),
        (413, Outcome.REFUSED),
        (408, Outcome.RETRY),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (503, Outcome.RETRY),
    ],
)
def test_classify(status: int, outcome: Outcome) -> None:
    assert classify(status) is outcome


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    webhooks = WebhookSender(WebhooksConfig(url="http://x/", retry_delay=0.5, max_retry_delay=4.0))
    webhooks.random = lambda low, high: high  # the most jitter
    assert [webhooks._backoff(n, None) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    webhooks.random = lambda low, high: low  # the least: half the ceiling, never zero
    assert [webhooks._backoff(n, None) for n in range(1, 5)] == [0.25, 0.5, 1.0, 2.0]
    assert webhooks._backoff(1, 3.0) == 3.0  # Retry-After, within the cap
    assert webhooks._backoff(1, 3600.0) == 4.0
    assert webhooks._backoff(10_000, None) <= 4.0


@settings(max_examples=200, deadline=None)
@given(
    max_queue=st.integers(1, 20),
    max_queue_bytes=st.integers(1, 2000),
    lengths=st.lists(st.integers(1, 400), max_size=60),
)
def test_the_queue_keeps_the_newest_within_both_bounds(
    max_queue: int, max_queue_bytes: int, lengths: list[int]
) -> None:
    """Whatever arrives: every event is queued or counted as dropped, and what is
    queued is the longest run of the newest events that fits both bounds, in order
    (an event too large for the whole queue is dropped at once)."""
    webhooks = WebhookSender(
        WebhooksConfig(url="http://x/", max_queue=max_queue, max_queue_bytes=max_queue_bytes)
    )
    pushed = [b"%d:" % n + b"x" * length for n, length in enumerate(lengths)]
    for raw in pushed:
        webhooks._push(raw)
    queued = list(webhooks._queue)
    assert webhooks.queued + webhooks.dropped == len(pushed)
    assert webhooks.queued_bytes == sum(map(len, queued))
    fitting = [raw for raw in pushed if len(raw) <= max_queue_bytes]
    expected: list[bytes] = []
    for raw in reversed(fitting):
        if len(expected) == max_queue or sum(map(len, expected)) + len(raw) > max_queue_bytes:
            break
        expected.insert(0, raw)
    assert queued == expected


def test_encoded_events_are_one_json_object_each() -> None:
    for n, event in enumerate(EVERY_KIND):
        decoded = json.loads(encode_event(event, f"p-{n}", 123))
        assert decoded["id"] == f"p-{n}" and decoded["time_ms"] == 123
        assert next(iter(decoded)) == "name"


# -- end to end: real clients, real processes -------------------------------------------


def e2e_config(url: str, extra: str = "") -> str:
    """A ``tidings serve`` config: webhooks to ``url``, a presence namespace, quick vacated."""
    return f"""{extra}
[webhooks]
url = "{url}"
secret = "{SECRET}"
retry_delay = 0.05
publications = ["room"]

[hooks]
vacated_delay = 0.2

[namespaces.room]
presence = true
join_leave = true
"""


def centrifuge_client(url: str) -> Any:
    from centrifuge import Client

    # proxy=None: never route loopback through an HTTP(S)_PROXY of the environment.
    return Client(url, proxy=None, min_reconnect_delay=0.1, max_reconnect_delay=0.5)


async def visit(ws_url: str, channel: str) -> str:
    """A centrifuge-python client connects, subscribes to ``channel``, and leaves; its id."""
    client = centrifuge_client(ws_url + "/connection/websocket")
    subscription = client.new_subscription(channel)
    await client.connect()
    await client.ready(TIMEOUT)
    await subscription.subscribe()
    await subscription.ready(TIMEOUT)
    client_id = str(client.client_id)
    await client.disconnect()
    return client_id


def names_of(events: list[dict[str, Any]], channel: str | None = None) -> list[str]:
    return [e["name"] for e in events if channel is None or e.get("channel") == channel]


def test_a_websocket_client_gives_occupied_join_publication_leave_disconnect_vacated(
    server_factory: Any,
) -> None:
    with Receiver() as receiver:
        srv = server_factory(e2e_config(receiver.url))

        async def main() -> str:
            client = centrifuge_client(srv.ws_url + "/connection/websocket")
            subscription = client.new_subscription("room:1")
            await client.connect()
            await client.ready(TIMEOUT)
            await subscription.subscribe()
            await subscription.ready(TIMEOUT)
            await asyncio.to_thread(publish, srv, "room:1", {"text": "hello"})
            client_id = str(client.client_id)
            await client.disconnect()
            return client_id

        client_id = asyncio.run(main())
        events = receiver.wait_accepted(6)
        assert all(post.valid for post in receiver.posts.items)
        names = names_of(events, "room:1")
        assert sorted(names) == sorted(
            ["channel_occupied", "member_added", "publication", "member_removed", "channel_vacated"]
        ), names
        # The cluster's occupancy is the broker's answer: channel_occupied may come just
        # before or just after the first join; the rest is in the order it happened.
        assert names.index("member_added") < names.index("publication")
        assert names.index("channel_occupied") < names.index("member_removed")
        assert names.index("publication") < names.index("member_removed")
        assert names[-1] == "channel_vacated"
        by_name = {e["name"]: e for e in events}
        assert by_name["member_added"]["client_id"] == client_id
        assert by_name["member_removed"]["client_id"] == client_id
        assert by_name["publication"]["data"] == {"text": "hello"}
        disconnected = by_name["client_disconnected"]
        assert (disconnected["client_id"], disconnected["transport"]) == (client_id, "websocket")
        assert isinstance(disconnected["code"], int) and disconnected["user_id"] == ""
        # The leave and the disconnect come before the (delayed) vacated.
        assert names_of(events).index("client_disconnected") < names_of(events).index(
            "channel_vacated"
        )


def test_an_sse_stream_that_ends_gives_client_disconnected(server_factory: Any) -> None:
    with Receiver() as receiver:
        srv = server_factory(e2e_config(receiver.url))
        with SSEClient(srv, ["news"]) as sse:
            sse.subscribed()
        events = receiver.wait_for_name("client_disconnected")
        (disconnected,) = [e for e in events if e["name"] == "client_disconnected"]
        assert (disconnected["transport"], disconnected["user_id"]) == ("sse", "")
        assert isinstance(disconnected["code"], int) and disconnected["reason"]


def test_sigterm_flushes_the_queue_of_a_tidings_process(server_factory: Any) -> None:
    """A client still connected when SIGTERM comes: its leave, its disconnect (3001)
    and the channel's vacated happen during the shutdown, and are delivered before
    the process exits, although the receiver answers 503 to the first POSTs."""
    answers = [Answer(status=503)] * 3
    with Receiver(answers=answers) as receiver:
        srv = server_factory(e2e_config(receiver.url))

        async def main() -> str:
            client = centrifuge_client(srv.ws_url + "/connection/websocket")
            subscription = client.new_subscription("room:flush")
            await client.connect()
            await client.ready(TIMEOUT)
            await subscription.subscribe()
            await subscription.ready(TIMEOUT)
            client_id = str(client.client_id)
            assert await asyncio.to_thread(srv.stop, signal.SIGTERM) == 0
            await client.disconnect()
            return client_id

        client_id = asyncio.run(main())
        # Everything was accepted by the time the process exited: no waiting here.
        events = dedupe(receiver.accepted())
        assert sorted(names_of(events, "room:flush")) == sorted(
            ["channel_occupied", "member_added", "member_removed", "channel_vacated"]
        ), events
        (disconnected,) = [e for e in events if e["name"] == "client_disconnected"]
        assert (disconnected["client_id"], disconnected["code"]) == (client_id, 3001)
        assert [p.status for p in receiver.posts.items][:3] == [503, 503, 503]


def test_occupied_and_vacated_once_per_cluster_with_two_nodes_on_redis(
    server_factory: Any, redis_server: Any
) -> None:
    """Two nodes, one receiver: a client on each node in one channel gives one
    channel_occupied and one channel_vacated, each node its own joins and leaves."""
    broker = f'[broker]\ntype = "redis"\nredis_url = "{redis_server.url}"\n'
    with Receiver() as receiver:
        nodes = [server_factory(e2e_config(receiver.url, broker)) for _ in range(2)]

        async def both() -> list[str]:
            clients = [centrifuge_client(n.ws_url + "/connection/websocket") for n in nodes]
            subscriptions = [c.new_subscription("room:shared") for c in clients]
            for client, subscription in zip(clients, subscriptions, strict=True):
                await client.connect()
                await client.ready(TIMEOUT)
                await subscription.subscribe()
                await subscription.ready(TIMEOUT)
            ids = [str(c.client_id) for c in clients]
            for client in clients:
                await client.disconnect()
            return ids

        ids = asyncio.run(both())
        receiver.wait_for_name("channel_vacated")
        # Then a marker publication through each node: each node sends in order, so
        # once both markers are in, anything either node fired before them is too.
        for n, node in enumerate(nodes):
            publish(node, "room:marker", {"node": n})

        def markers_in(posts: list[Post]) -> bool:
            got = {
                e["data"]["node"]
                for p in posts
                if p.status == 200
                for e in p.events
                if e["name"] == "publication"
            }
            return got == {0, 1}

        receiver.posts.wait_for(markers_in)
        events = dedupe(receiver.accepted())
        assert names_of(events, "room:shared").count("channel_occupied") == 1
        assert names_of(events, "room:shared").count("channel_vacated") == 1
        joined = [e["client_id"] for e in events if e["name"] == "member_added"]
        left = [e["client_id"] for e in events if e["name"] == "member_removed"]
        assert sorted(joined) == sorted(left) == sorted(ids)
        # Two senders (a prefix each), and each one's events in its own order.
        prefixes: dict[str, list[int]] = collections.defaultdict(list)
        for event in events:
            prefix, sequence = event["id"].rsplit("-", 1)
            prefixes[prefix].append(int(sequence))
        assert len(prefixes) == 2
        assert all(numbers == sorted(numbers) for numbers in prefixes.values())


def test_a_tidings_process_with_its_receiver_down_stays_bounded(server_factory: Any) -> None:
    """200,000 publication events (broadcasts of 1,000 channels through the server API)
    while nothing listens at the webhook URL: the process's RSS stays flat once the
    queue is full, the drops are logged, and other clients are served."""
    url = f"http://127.0.0.1:{free_port()}/hook"
    config = e2e_config(url).replace("retry_delay = 0.05", "retry_delay = 0.05\nmax_queue = 1000")
    config += "history_size = 0\n"  # [namespaces.room]: the hub keeps nothing itself
    srv = server_factory(config)
    channels = [f"room:c{i}" for i in range(1000)]

    def broadcast(times: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT * 3) as http:
            for _ in range(times):
                answer = http.post("/api/broadcast", json={"channels": channels, "data": {}})
                assert answer.status_code == 200, answer.text

    broadcast(20)
    before = rss_kib(srv)
    broadcast(200)
    grown = rss_kib(srv) - before
    # 200k events held would be some 40 MiB (about 200 bytes each, encoded).
    assert grown < 8 * 1024, f"grew {grown} KiB"
    check_serving(srv)
    wait_until(lambda: "since start" in srv.logs(), "the drops to be logged")
    lines = [line for line in srv.logs().splitlines() if "webhook queue full" in line]
    assert lines and all(" WARNING " in line for line in lines)
    assert "Traceback" not in srv.logs()
