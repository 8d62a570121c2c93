"""The client commands that need no connection: publish, history, presence, presence_stats, rpc.

A WebSocket client runs them in its session (:mod:`tidings.centrifuge.session`);
a client on SSE, long-poll or poll runs the same ones with one HTTP request each
(``POST /call/<name>``, :mod:`tidings.transports.calls`). Both call these
functions, so a request gets the same checks, the same hooks and the same error
codes whichever way it came. What differs is only what the caller passes in:

- who asks (:class:`Caller`): the session's client id and wire, or an HTTP
  request's credentials with no client id;
- whether the client counts as a *subscriber* of the channel for the
  namespace's ``"subscribers"`` rules: a session is one when it holds the
  subscription; a stateless HTTP client has none, so the call endpoints ask
  whether it *may* subscribe (the gate's subscribe door).

Sans-I/O like the session: these take decoded requests and return results
(or raise :class:`~tidings.errors.ProtocolError`); the caller encodes them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec

from ..auth import Access, Credentials
from ..errors import ErrorCode, ProtocolError
from ..gate import Gate
from ..hooks import Hooks, PublishCall, RPCCall, TransportName
from ..hub import Hub
from ..stream import ClientInfo, Position, Publication
from .schema import (
    ChannelRequest,
    HistoryRequest,
    PresenceResult,
    PresenceStatsResult,
    PublishRequest,
    RPCRequest,
    RPCResult,
    presence_entries,
)

__all__ = ["Caller", "history", "presence", "presence_stats", "publish", "rpc"]

#: The ``exclude`` of a publication every subscriber receives.
_EVERYONE: frozenset[str] = frozenset()


class Caller(NamedTuple):
    """Who runs a command: what its hook calls and its publications say of the client."""

    credentials: Credentials
    transport: TransportName
    #: ``"json"`` or ``"protobuf"`` on a session; ``"http"`` for a call endpoint.
    protocol: str
    #: The connection's id; ``""`` over HTTP, where there is no connection.
    client: str = ""

    def hook_fields(self) -> dict[str, Any]:
        """The fields every hook call of this client carries."""
        return {
            "transport": self.transport,
            "protocol": self.protocol,
            "client": self.client,
            "user": self.credentials.user,
        }

    def publisher(self) -> ClientInfo | None:
        """The ``info`` of this client's publications: none for an anonymous HTTP
        caller, which has no identity to show (as a server API publication)."""
        credentials = self.credentials
        return self.info() if self.client or credentials.user or credentials.info else None

    def info(self, chan_info: bytes | None = None) -> ClientInfo:
        """The client as Centrifugo describes it: user, client and connection info."""
        conn_info = self.credentials.info
        return ClientInfo(
            user=self.credentials.user,
            client=self.client,
            conn_info=msgspec.Raw(conn_info) if conn_info else None,
            chan_info=msgspec.Raw(chan_info) if chan_info else None,
        )


async def publish(
    gate: Gate, hub: Hub, caller: Caller, req: PublishRequest, *, subscribed: bool
) -> None:
    """Publish ``req.data`` to ``req.channel`` if the gate lets it through (hook, then rules)."""
    if not req.data:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "publish without data")
    channel, data = req.channel, bytes(req.data)
    publishing = await gate.publish(
        caller.credentials,
        channel,
        data,
        subscribed=subscribed,
        make_call=lambda: PublishCall(**caller.hook_fields(), channel=channel, data=data),
    )
    # echo_publications = false: every subscriber but the publisher's connection.
    echo = gate.access.policy(channel).echo_publications
    await hub.publish(
        channel,
        publishing.data,
        info=caller.publisher(),
        skip_history=publishing.skip_history,
        exclude=_EVERYONE if echo or not caller.client else frozenset((caller.client,)),
    )


async def history(
    access: Access, hub: Hub, caller: Caller, req: HistoryRequest, *, subscribed: bool
) -> tuple[list[Publication], Position]:
    """The publications ``req`` asks for and the stream's top (112 across an epoch change)."""
    access.check_history(caller.credentials, req.channel, subscribed)
    since = None
    if req.since is not None:
        since = Position(req.since.epoch, req.since.offset)
    # Centrifugo's limit: 0 = only the stream position, negative = everything.
    limit = req.limit if req.limit >= 0 else None
    pubs, top = await hub.history(req.channel, since=since, limit=limit, reverse=req.reverse)
    if since is not None and since.epoch != top.epoch and since.epoch and top.epoch:
        raise ProtocolError(ErrorCode.UNRECOVERABLE_POSITION)
    return pubs, top


async def presence(
    access: Access, hub: Hub, caller: Caller, req: ChannelRequest, *, subscribed: bool
) -> PresenceResult:
    access.check_presence(caller.credentials, req.channel, subscribed)
    return PresenceResult(presence=presence_entries(await hub.presence(req.channel)))


async def presence_stats(
    access: Access, hub: Hub, caller: Caller, req: ChannelRequest, *, subscribed: bool
) -> PresenceStatsResult:
    access.check_presence(caller.credentials, req.channel, subscribed)
    clients, users = await hub.presence_stats(req.channel)
    return PresenceStatsResult(num_clients=clients, num_users=users)


async def rpc(hooks: Hooks, caller: Caller, req: RPCRequest) -> RPCResult:
    """The application's handler of ``req.method`` answers (108 without one)."""
    if not hooks.has_rpc:
        raise ProtocolError(ErrorCode.NOT_AVAILABLE)
    call = RPCCall(**caller.hook_fields(), method=req.method, data=bytes(req.data) or None)
    data = await hooks.call_rpc(call)
    return RPCResult(data=msgspec.Raw(data) if data is not None else None)
