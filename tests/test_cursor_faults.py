"""Every SSE id and poll cursor is safe to resume from when it is written (issue 12).

Two failures of c6dae06 came from cursors built out of the hub's current
state (``hub.top``) instead of what the client was given: a long-poll answer
whose cursor went backwards after a resubscribe (duplicates), and SSE backlog
events — publications that arrived while a multi-channel stream was still
joining — whose ids named positions past later events (resuming from the
first skipped the rest). Issue 11 built cursors from deliveries; these tests
create the timing with :class:`~faults_support.FaultyBroker` (a history read
held at a chosen moment) under a real server on a real socket, and read the
stream as bytes.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from faults_support import FaultyBroker
from tidings.config import Config
from tidings.cursor import decode_cursor
from tidings.server import Server
from tidings.stream import Position, Publication

TIMEOUT = 10.0


async def serve(broker: FaultyBroker) -> Server:
    server = Server(Config(host="127.0.0.1", port=0), broker=broker)
    await server.start()
    return server


async def read_events(reader: asyncio.StreamReader, n: int) -> list[dict[str, Any]]:
    """``n`` SSE events after the head, each as {id, event, data}."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(TIMEOUT):
        await reader.readuntil(b"\r\n\r\n")
        while len(events) < n:
            block = (await reader.readuntil(b"\n\n")).decode()
            event: dict[str, Any] = {}
            for line in block.splitlines():
                name, _, value = line.partition(": ")
                if name in ("id", "event", "data"):
                    event[name] = value
            if "data" in event:
                events.append(event)
    return events


def test_sse_backlog_events_carry_the_cursor_right_after_each() -> None:
    """Publications of one channel that arrive while another channel's join
    waits on the broker are written after the join, each with its own id."""

    async def main() -> None:
        broker = FaultyBroker()
        server = await serve(broker)
        try:
            broker.hold_history.add("b")
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /sse?channel=a&channel=b HTTP/1.1\r\nHost: t\r\n\r\n")
            await broker.held_reads(1)  # "a" is live; "b"'s history read is held
            for n in (1, 2, 3):
                await server.hub.publish("a", b'{"n":%d}' % n)
            broker.held[0].set()
            events = await read_events(reader, 4)  # subscribed + a:1..3
            writer.close()
        finally:
            await server.shutdown()
        subscribed, *pushes = events
        assert subscribed["event"] == "subscribed"
        offsets = [json.loads(e["data"])["offset"] for e in pushes]
        assert offsets == [1, 2, 3]
        epoch = json.loads(pushes[0]["data"])["epoch"]
        cursors = [decode_cursor(e["id"]) for e in pushes]
        # Each id stands right after its own event: resuming from the first
        # must not skip the second and third.
        assert [c["a"] for c in cursors] == [Position(epoch, n) for n in (1, 2, 3)], cursors
        assert all(c["b"].offset == 0 for c in cursors), cursors

    asyncio.run(main())


def test_a_poll_cursor_never_goes_behind_what_the_client_sent() -> None:
    """A held poll answered with a publication returns a cursor at that
    publication for its channel and at least where the client stood for the
    others, whatever the node's own view of those channels."""

    async def main() -> None:
        broker = FaultyBroker()
        server = await serve(broker)
        try:
            for _ in range(5):
                await server.hub.publish("c2", b"{}")
            first = await _poll(server.port, "channel=c1&channel=c2&timeout=0")
            assert decode_cursor(first["cursor"])["c2"].offset == 5
            held = asyncio.ensure_future(
                _poll(server.port, f"channel=c1&channel=c2&cursor={first['cursor']}&timeout=5")
            )
            async with asyncio.timeout(TIMEOUT):
                while server.hub.num_subscribers("c1") == 0:
                    await asyncio.sleep(0.01)
            await server.hub.publish("c1", b"{}")
            answer = await held
        finally:
            await server.shutdown()
        cursor = decode_cursor(answer["cursor"])
        assert [p["offset"] for p in answer["publications"]] == [1]
        assert cursor["c1"].offset == 1 and cursor["c2"].offset == 5, cursor

    asyncio.run(main())


async def _poll(port: int, query: str) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /poll?{query} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    async with asyncio.timeout(TIMEOUT):
        raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw
    result: dict[str, Any] = json.loads(body)
    return result


def skip(server: Server, channel: str) -> None:
    """What a node sees when a remote broker lost the channel's stream (Redis
    restarted without its data): the next publications come in a new epoch."""
    for offset in (7, 8):
        server.hub._deliver(Publication(channel, offset, "new-epoch", b"{}"))


def test_a_skip_while_a_poll_joins_its_other_channels_answers_before_the_hole() -> None:
    """Channel a is joined, b's history read is held, a skips: the poll is
    answered at once with nothing past the hole, so the client's next poll is
    told plainly. (It was held and answered with a:8 of the new epoch, a:7
    never seen and nothing said: the chaos run's redis_wipe failure.)"""

    async def main() -> None:
        broker = FaultyBroker()
        server = await serve(broker)
        try:
            await server.hub.publish("a", b"{}")
            first = await _poll(server.port, "channel=a&channel=b&timeout=0")
            broker.hold_history.add("b")
            held = asyncio.ensure_future(
                _poll(server.port, f"channel=a&channel=b&cursor={first['cursor']}&timeout=5")
            )
            await broker.held_reads(1)
            skip(server, "a")
            broker.held[0].set()
            answer = await held
        finally:
            await server.shutdown()
        assert answer["publications"] == []
        cursor = decode_cursor(answer["cursor"])
        assert cursor["a"] == decode_cursor(first["cursor"])["a"] and cursor["b"].offset == 0

    asyncio.run(main())


def test_a_skip_while_an_sse_stream_joins_its_other_channels_ends_it_before_the_hole() -> None:
    """The same skip on an SSE stream: its head and what came before the
    skip are written, then the stream ends with its retry line, so the client
    resumes from before the hole. (The retry line was written before the HTTP
    head, and what came after the skip would have followed.)"""

    async def main() -> None:
        broker = FaultyBroker()
        server = await serve(broker)
        try:
            broker.hold_history.add("b")
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /sse?channel=a&channel=b HTTP/1.1\r\nHost: t\r\n\r\n")
            await broker.held_reads(1)
            await server.hub.publish("a", b"{}")
            skip(server, "a")
            broker.held[0].set()
            events = await read_events(reader, 2)  # subscribed + a:1
            async with asyncio.timeout(TIMEOUT):
                rest = await reader.read()
            writer.close()
        finally:
            await server.shutdown()
        assert [e.get("event") for e in events] == ["subscribed", None]
        assert json.loads(events[1]["data"])["offset"] == 1
        assert rest.startswith(b"retry:") and b"data:" not in rest, rest

    asyncio.run(main())
