"""What the HTTP subscribe transports (SSE, long-poll, poll) share.

They follow several channels at once and resume from one cursor, so they share
how channels are read from the query string and how a stream joins its
channels: every channel is recovered from the cursor's position, the missed
publications are merged into one sequence (each channel in offset order), and
channels whose history no longer reaches are named, never skipped silently.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING

from ..auth import Access, Credentials
from ..cursor import decode_cursor, encode_cursor
from ..errors import ErrorCode, ProtocolError
from ..hub import Hub, Position, Publication, Subscriber

if TYPE_CHECKING:
    from ..http import Request


def requested_channels(request: Request, access: Access, credentials: Credentials) -> list[str]:
    """The ``channel`` query parameters the client may follow, without repeats, in order.

    Subscription tokens come from ``?sub_token=`` (repeatable: each token
    names its channel); :meth:`Access.authorize_subscribe` decides, as it does
    for WebSocket.
    """
    names = list(dict.fromkeys(request.query.get("channel", ())))
    if not names:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "at least one channel= parameter is required")
    access.authorize_subscribe(credentials, names, request.query.get("sub_token", ()))
    return names


def request_credentials(request: Request, access: Access) -> Credentials:
    """The client behind the request's connection token; anonymous without one.

    The token comes from ``Authorization: Bearer``, ``?token=`` or the auth
    cookie, in that order.
    """
    return access.authenticate(connection_token(request, access.cookie))


def connection_token(request: Request, cookie_name: str) -> str | None:
    scheme, _, value = (request.headers.get("authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    token = request.query_value("token")
    if token:
        return token
    header = request.headers.get("cookie")
    if header:
        cookies = SimpleCookie()
        try:
            cookies.load(header)
        except CookieError:
            return None
        morsel = cookies.get(cookie_name)
        if morsel is not None and morsel.value:
            return morsel.value
    return None


def requested_positions(token: str | None) -> dict[str, Position] | None:
    return decode_cursor(token) if token else None


class Joined:
    """The outcome of joining (or just recovering) a set of channels."""

    __slots__ = ("positions", "publications", "start", "unrecovered")

    def __init__(self) -> None:
        self.start: dict[str, Position] = {}
        self.positions: dict[str, Position] = {}
        self.publications: list[Publication] = []
        self.unrecovered: list[str] = []

    @property
    def cursor(self) -> str:
        return encode_cursor(self.positions)

    def cursors(self) -> Iterable[tuple[Publication, str]]:
        """Each missed publication with the cursor that stands right after it."""
        positions = dict(self.start)
        for pub in self.publications:
            positions[pub.channel] = pub.position
            yield pub, encode_cursor(positions)


async def join(
    hub: Hub,
    channels: list[str],
    since: dict[str, Position] | None,
    subscriber: Subscriber | None,
) -> Joined:
    """Recover every channel from ``since``; subscribe ``subscriber`` when given.

    If anything fails half-way (a bad channel, the client leaving), the
    channels already joined are left again, so nothing stays subscribed.
    """
    joined = Joined()
    per_channel: list[list[Publication]] = []
    done: list[str] = []
    try:
        for channel in channels:
            position = since.get(channel) if since is not None else None
            if subscriber is not None:
                recovery = await hub.subscribe(channel, subscriber, position)
                done.append(channel)
            else:
                recovery = await hub.recover(channel, position)
            if position is not None and not recovery.recovered:
                joined.unrecovered.append(channel)
            pubs = recovery.publications
            first = pubs[0] if pubs else None
            joined.start[channel] = (
                Position(first.epoch, first.offset - 1) if first is not None else recovery.position
            )
            joined.positions[channel] = recovery.position
            per_channel.append(pubs)
    except BaseException:
        if subscriber is not None:
            for channel in done:
                hub.unsubscribe(channel, subscriber)
        raise
    if len(per_channel) == 1:
        joined.publications = per_channel[0]
    else:
        joined.publications = list(heapq.merge(*per_channel, key=lambda pub: pub.time))
    return joined


def leave(hub: Hub, channels: Iterable[str], subscriber: Subscriber) -> None:
    for channel in channels:
        hub.unsubscribe(channel, subscriber)
