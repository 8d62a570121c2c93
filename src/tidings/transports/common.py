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
from functools import partial
from http.cookies import _unquote
from typing import TYPE_CHECKING

from ..auth import Credentials
from ..cursor import decode_cursor, encode_cursor
from ..errors import ErrorCode, ProtocolError
from ..gate import Gate
from ..hooks import ConnectCall, Disconnect, SubscribeCall, TransportName
from ..http.messages import Disconnected
from ..hub import Hub, Position, Publication, Subscriber

if TYPE_CHECKING:
    from ..http import Request


def channel_names(request: Request) -> list[str]:
    """The ``channel`` query parameters, without repeats, in order; at least one.

    Only their presence is checked here, before anything is asked of the
    tokens or the application's hooks; the access rules check the names.
    """
    names = list(dict.fromkeys(request.query.get("channel", ())))
    if not names:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "at least one channel= parameter is required")
    return names


async def authorize_channels(
    request: Request,
    gate: Gate,
    credentials: Credentials,
    names: list[str],
    transport: TransportName,
) -> None:
    """May the client follow ``names``? Raises the first refusal.

    Subscription tokens come from ``?sub_token=`` (repeatable: each token
    names its channel); the gate decides, as it does for WebSocket: tokens,
    then the ``subscribe`` hook (asked per channel that no token grants), then
    the namespace's rules. A subscription's ``info`` and ``expire_at`` from
    the hook are not kept: these transports carry no presence, and an SSE
    stream is not refreshed per channel (the connection's expiry holds).
    """
    tokens = request.query.get("sub_token", ())
    if gate.hooks.subscribe is None:
        gate.access.authorize_subscribe(credentials, names, tokens)
        return
    make_call = partial(_subscribe_call, transport, credentials.user)
    try:
        await gate.subscribe(credentials, names, tokens, make_call=make_call)
    except Disconnect as exc:
        raise Disconnected(exc) from None


def _subscribe_call(transport: TransportName, user: str, channel: str) -> SubscribeCall:
    return SubscribeCall(
        transport=transport, protocol="http", client="", user=user, channel=channel
    )


async def admit(request: Request, gate: Gate, transport: TransportName) -> Credentials:
    """The client behind the request, as its connection token and the ``connect`` hook say.

    The token comes from ``Authorization: Bearer``, ``?token=`` or the auth
    cookie, in that order; an invalid one is refused before any hook runs.
    The hook is asked once per SSE stream and once per poll request: these
    transports have no connection that outlives a request to remember it by.
    Without a hook this is the token's check alone: no call is built, no
    header is copied.
    """
    token = connection_token(request, gate.access.cookie)
    if gate.hooks.connect is None:
        return gate.access.authenticate(token)
    try:
        admitted = await gate.connect(token, partial(connect_call, request, transport))
    except Disconnect as exc:
        raise Disconnected(exc) from None
    return admitted.credentials


def connect_call(request: Request, transport: TransportName, user: str) -> ConnectCall:
    """The ``connect`` hook's call for an HTTP request: its headers, cookies and peer.

    Repeated headers are joined with ``", "`` (RFC 9110, 5.3), as frameworks
    present them; ``remote`` is the peer's address without its port.
    """
    headers: dict[str, str] = {}
    for raw_name, raw_value in request.headers.raw:
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    cookie = "; ".join(request.headers.get_all("cookie"))
    return ConnectCall(
        transport=transport,
        protocol="http",
        client="",
        user=user,
        headers=headers,
        cookies=parse_cookies(cookie) if cookie else {},
        remote=request.client[0] if request.client else "",
    )


def parse_cookies(header: str) -> dict[str, str]:
    """A ``Cookie`` header's cookies by name, read as browsers write them.

    Not ``http.cookies.SimpleCookie``: it drops every cookie after one it
    dislikes (a ``"`` in a value, an empty ``;;`` pair, a space in a name),
    which browsers send, so a session or token cookie that came after a
    third-party one would vanish. This is Django's ``parse_cookie`` (and
    Starlette's): split on ``;``, then on the first ``=``; a value quoted the
    way ``SimpleCookie`` quotes when it sets one is unquoted. The last of
    repeated names wins, as in both frameworks.
    """
    cookies: dict[str, str] = {}
    for chunk in header.split(";"):
        name, equals, value = chunk.partition("=")
        name = name.strip()
        if equals and name:
            cookies[name] = _unquote(value.strip())
    return cookies


def connection_token(request: Request, cookie_name: str) -> str | None:
    scheme, _, value = (request.headers.get("authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    token = request.query_value("token")
    if token:
        return token
    header = request.headers.get("cookie")
    if header:
        return parse_cookies(header).get(cookie_name) or None
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
