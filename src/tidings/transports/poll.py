"""Long-polling and polling: ``GET /poll?channel=a&cursor=C&timeout=30``.

A held long-poll is a :class:`PollWaiter` registered on its channels plus one
timer — no task and no coroutine while it waits. The first publication wakes
it; it answers on the next loop iteration, so publications of the same moment
(a broadcast) travel in one response. ``timeout=0`` is plain polling.

The response is ``{"publications": [...], "cursor": "...", "unrecovered": [...]}``
with the same cursor as SSE, so the two can be mixed.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..codec import encode, http_publication_json
from ..cursor import encode_cursor
from ..errors import ErrorCode, ProtocolError
from ..http import Response
from ..hub import Position, Publication
from .common import join, leave, requested_channels, requested_positions

if TYPE_CHECKING:
    from ..http import HTTPConnection, Request
    from ..server import Server


def poll_response(
    publications: list[Publication], positions: dict[str, Position], unrecovered: list[str]
) -> Response:
    """The poll body, built from each publication's shared HTTP encoding."""
    body = b"".join(
        [
            b'{"publications":[',
            b",".join(pub.encoded(http_publication_json) for pub in publications),
            b'],"cursor":',
            encode(encode_cursor(positions)),
            b',"unrecovered":',
            encode(unrecovered),
            b"}",
        ]
    )
    return Response(
        200, body, [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
    )


class PollWaiter:
    """A held long-poll: answers on the first publication or at its deadline."""

    __slots__ = ("channels", "conn", "poll", "positions", "publications", "request", "timer")

    def __init__(
        self, poll: PollTransport, conn: HTTPConnection, request: Request, channels: list[str]
    ) -> None:
        self.poll = poll
        self.conn = conn
        self.request = request
        self.channels = channels
        self.positions: dict[str, Position] = {}
        self.publications: list[Publication] = []
        self.timer: asyncio.TimerHandle | None = None

    def deliver(self, pub: Publication) -> None:
        self.publications.append(pub)
        self.positions[pub.channel] = pub.position
        if len(self.publications) == 1:
            asyncio.get_running_loop().call_soon(self.answer_now)

    def answer_now(self) -> None:
        if self._release():
            self.conn.respond(self.request, poll_response(self.publications, self.positions, []))

    def cancel(self) -> None:
        self._release()

    def _release(self) -> bool:
        """Leave the channels once; False if that already happened."""
        if self.timer is None:
            return False
        self.timer.cancel()
        self.timer = None
        leave(self.poll.server.hub, self.channels, self)
        self.poll.waiters.discard(self)
        return True


class PollTransport:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.waiters: set[PollWaiter] = set()

    def _timeout(self, request: Request) -> float:
        config = self.server.config.poll
        text = request.query_value("timeout")
        if text is None:
            return config.default_timeout
        try:
            timeout = float(text)
        except ValueError:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"timeout={text!r} is not a number"
            ) from None
        if not 0 <= timeout <= config.max_timeout:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"timeout must be between 0 and {config.max_timeout:g}"
            )
        return timeout

    async def handle(self, request: Request, conn: HTTPConnection) -> Response | None:
        hub = self.server.hub
        channels = requested_channels(request, self.server)
        timeout = self._timeout(request)
        since = requested_positions(request.query_value("cursor"))
        if since is None or timeout == 0 or self.server.stopping:
            joined = await join(hub, channels, since, None)
            return poll_response(joined.publications, joined.positions, joined.unrecovered)
        waiter = PollWaiter(self, conn, request, channels)
        joined = await join(hub, channels, since, waiter)
        # With a remote broker, publications can reach the waiter mid-join.
        early = waiter.publications
        positions = joined.positions | {pub.channel: pub.position for pub in early}
        if joined.publications or joined.unrecovered or early:
            leave(hub, channels, waiter)
            return poll_response(joined.publications + early, positions, joined.unrecovered)
        waiter.positions = positions
        waiter.timer = asyncio.get_running_loop().call_later(timeout, waiter.answer_now)
        self.waiters.add(waiter)
        conn.hold(waiter)
        return None
