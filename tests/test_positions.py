"""SSE event ids and poll cursors are built from what was delivered (unit).

Each publication carries its own position; a transport that tells its client
where it stands builds that from the positions its join returned plus the
publications it delivered — never from the hub's current state, so neither the
order of the hub's bookkeeping nor when it forgets a channel can corrupt a
cursor (issue 11, item 3). Sans-I/O: no server; the hub here is a stand-in
with no ``top`` at all, so a transport that still asked the hub would fail.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tidings.config import PollConfig
from tidings.connections import Connections
from tidings.cursor import decode_cursor, encode_cursor
from tidings.http import Response
from tidings.stream import Position, Publication
from tidings.transports.poll import PollTransport, PollWaiter
from tidings.transports.sse import Feed

pytestmark = pytest.mark.unit


def pub(channel: str, offset: int, epoch: str = "e") -> Publication:
    return Publication(channel, offset, epoch, b'{"n":%d}' % offset)


def event_id(event: bytes) -> dict[str, Position]:
    first = event.split(b"\n", 1)[0]
    assert first.startswith(b"id: "), event
    return decode_cursor(first[4:].decode())


# --------------------------------------------------------------------------- SSE


def test_feed_ids_advance_from_the_join_positions_by_each_publication() -> None:
    feed = Feed(("a", "b"))
    feed.go_live({"b": Position("e", 7), "a": Position("e", 3)})
    assert event_id(feed.event(pub("a", 4))) == {"a": Position("e", 4), "b": Position("e", 7)}
    assert event_id(feed.event(pub("b", 8))) == {"a": Position("e", 4), "b": Position("e", 8)}


def test_feed_encodes_each_publication_once_for_all_its_streams() -> None:
    feed = Feed(("a",))
    feed.go_live({"a": Position("e", 0)})
    p = pub("a", 1)
    assert feed.event(p) is feed.event(p)


def test_a_second_live_stream_shares_the_feeds_positions() -> None:
    """Live streams of one feed saw the same publications: the first one's
    positions stand (a later joiner may only be ahead while catching up)."""
    feed = Feed(("a", "b"))
    feed.go_live({"a": Position("e", 3), "b": Position("e", 7)})
    feed.event(pub("a", 4))
    # Its history read ran ahead of live delivery (a remote broker): the
    # streams already live have not been given a:5 and a:6.
    feed.go_live({"a": Position("e", 6), "b": Position("e", 7)})
    assert event_id(feed.event(pub("b", 8))) == {"a": Position("e", 4), "b": Position("e", 8)}


def test_a_feed_whose_live_streams_left_takes_the_next_streams_positions() -> None:
    feed = Feed(("a",))
    feed.go_live({"a": Position("e", 3)})
    feed.live -= 1  # the stream left (SSETransport.remove does this)
    feed.go_live({"a": Position("f", 10)})  # history was reset meanwhile
    assert event_id(feed.event(pub("a", 11, "f"))) == {"a": Position("f", 11)}


# --------------------------------------------------------------------------- poll


class NoTopHub:
    """A hub with subscriptions but no current state to read."""

    def unsubscribe(self, channel: str, subscriber: Any) -> None:
        pass


class HeldConnection:
    def __init__(self) -> None:
        self.answers: list[Response] = []

    def respond_held(self, response: Response) -> None:
        self.answers.append(response)


def poll_transport() -> PollTransport:
    return PollTransport(NoTopHub(), None, Connections(), PollConfig())  # type: ignore[arg-type]


def held(poll: PollTransport, channels: tuple[str, ...], since: str) -> tuple[PollWaiter, Any]:
    conn = HeldConnection()
    waiter = PollWaiter(poll, conn, channels)  # type: ignore[arg-type]
    waiter.since = since
    waiter.deadline = 1  # held: registered on a deadline
    return waiter, conn


def answered(conn: HeldConnection) -> dict[str, Any]:
    (response,) = conn.answers
    body: dict[str, Any] = json.loads(response.body)
    return body


def in_loop(test: Any) -> None:
    """Run ``test`` inside a loop: a delivery schedules the waiter's wake-up."""

    async def main() -> None:
        test()

    asyncio.run(main())


def test_a_poll_answer_is_its_start_cursor_advanced_by_what_it_was_given() -> None:
    def test() -> None:
        poll = poll_transport()
        since = encode_cursor({"a": Position("e", 3), "b": Position("e", 7)})
        waiter, conn = held(poll, ("a", "b"), since)
        waiter.deliver(pub("a", 4))
        waiter.deliver(pub("a", 5))
        poll.answer(waiter, {})
        body = answered(conn)
        assert [p["offset"] for p in body["publications"]] == [4, 5]
        assert decode_cursor(body["cursor"]) == {"a": Position("e", 5), "b": Position("e", 7)}

    in_loop(test)


def test_waiters_share_an_answer_only_from_the_same_start() -> None:
    def test() -> None:
        poll = poll_transport()
        p = pub("a", 4)
        start = encode_cursor({"a": Position("e", 3)})
        first, first_conn = held(poll, ("a",), start)
        same, same_conn = held(poll, ("a",), encode_cursor({"a": Position("e", 3)}))
        behind, behind_conn = held(poll, ("a",), encode_cursor({"a": Position("e", 2)}))
        answers: dict[Any, Any] = {}
        for waiter in (first, same, behind):
            waiter.deliver(p)
            poll.answer(waiter, answers)
        assert first_conn.answers[0] is same_conn.answers[0]  # encoded once for both
        assert behind_conn.answers[0] is not first_conn.answers[0]
        # Both cursors stand right after what each was given (offset 4).
        assert decode_cursor(answered(behind_conn)["cursor"]) == {"a": Position("e", 4)}

    in_loop(test)


def test_an_answer_is_built_after_the_waiter_left_its_channels() -> None:
    """The hub may forget a channel with its last subscriber; the answer must not care."""
    left: list[str] = []

    class ForgetfulHub(NoTopHub):
        def unsubscribe(self, channel: str, subscriber: Any) -> None:
            left.append(channel)

    def test() -> None:
        poll = PollTransport(ForgetfulHub(), None, Connections(), PollConfig())  # type: ignore[arg-type]
        waiter, conn = held(poll, ("a",), encode_cursor({"a": Position("e", 3)}))
        waiter.deliver(pub("a", 4))
        poll.answer(waiter, {})
        assert left == ["a"]
        assert decode_cursor(answered(conn)["cursor"]) == {"a": Position("e", 4)}

    in_loop(test)
