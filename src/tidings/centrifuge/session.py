"""The Centrifugo protocol state of one client connection — sans-I/O.

:class:`ClientSession`, the per-connection protocol state machine: it takes
a frame's payload, runs the commands in order against the hub and hands
back the reply frame payload through :meth:`ClientSession.send_payload`,
or a :class:`~tidings.centrifuge.schema.Disconnect` when the client broke
the protocol. The bytes of commands, replies and pushes are the
:class:`~tidings.centrifuge.wire.Wire`'s the connection chose (JSON,
:mod:`tidings.centrifuge.schema`, or Protobuf,
:mod:`tidings.centrifuge.protobuf`); the commands and replies are the
same objects in both.

No sockets, no timers: the transport (``transports/websocket.py``) owns those.
Frames may carry several messages (``\\n``-separated JSON, length-prefixed
Protobuf); replies to one frame are batched into one frame.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, Protocol

import msgspec

from ..version import __version__
from ..auth import ANONYMOUS, Access, Credentials, Grant, InvalidToken, UnverifiedToken
from ..errors import DisconnectCode, ErrorCode, ProtocolError
from ..hub import ClientInfo, Hub, Position, PresenceEvent, Publication
from ..logs import log_client_error
from .schema import (
    FLAG_REJECT_UNRECOVERED,
    BadRequest,
    ChannelRequest,
    Command,
    ConnectRequest,
    ConnectResult,
    Disconnect,
    Empty,
    HistoryRequest,
    HistoryResult,
    PresenceResult,
    PresenceStatsResult,
    PublishRequest,
    RefreshRequest,
    RefreshResult,
    Reply,
    RPCRequest,
    SendRequest,
    SubRefreshRequest,
    SubRefreshResult,
    SubscribeRequest,
    SubscribeResult,
    presence_entries,
)
from .wire import JSON, Wire

log = logging.getLogger(__name__)

VERSION = __version__

#: Pushes (publications, joins and leaves, unsubscribes) a connecting session
#: holds until its connect reply is written. They arrive only while connect
#: waits on the broker for the token's later channels, so this is far more
#: than a connect sees unless the broker is stalled; past it the client is
#: closed with insufficient state and resumes from history. Each held push is
#: a reference to shared bytes or a shared publication: 8 bytes.
MAX_HELD_PUSHES = 1024

#: What a closed session holds in place of pushes: nothing, and nothing is added.
_CLOSED: tuple[()] = ()


class SessionOptions(NamedTuple):
    """What the protocol needs from the configuration; shared by every session."""

    access: Access
    ping_interval: int = 25
    version: str = VERSION
    #: This node's id, sent in the connect reply of emulated sessions.
    node: str = ""


class SessionTransport(Protocol):
    """What a session needs from the connection it speaks through.

    The session *is held* by its connection and holds it back through this
    narrow interface (as a ``centrifuge`` Client holds its Transport with
    ``Write``/``Close``), so the protocol state machine knows nothing of
    frames, sockets or timers, and a test can stand in for the transport.
    """

    def write_payload(self, payload: bytes) -> None:
        """Write one message (a reply batch or a per-connection push)."""

    def write_publication(self, pub: Publication) -> None:
        """Write ``pub``'s push in the bytes shared by every connection of its wire format."""

    def pong(self) -> None:
        """The client answered a ping."""

    def close(self, code: int, reason: str) -> None:
        """Close the connection with a disconnect code and reason."""


class ClientSession:
    """The Centrifugo protocol state of one client connection.

    The hub and the server API see the session (it is what subscribes to
    channels and what :meth:`Hub.add_client` registers); it writes through
    the :class:`SessionTransport` it is given. Replies are collected while a
    frame's commands run and written as one message when they are done — or
    earlier, right before a push, so a client never sees a publication of a
    channel before the reply that subscribed it.
    """

    __slots__ = (
        "_held",
        "_out",
        "channels",
        "client_id",
        "closed",
        "credentials",
        "deltas",
        "hub",
        "join_leave_asked",
        "options",
        "session_id",
        "sub_expiries",
        "transport",
        "wire",
    )

    def __init__(
        self,
        hub: Hub,
        options: SessionOptions,
        transport: SessionTransport,
        wire: Wire = JSON,
        session_id: str = "",
    ) -> None:
        self.hub = hub
        #: Bidirectional emulation: the secret its later commands are posted
        #: with; "" on a WebSocket, whose commands come on the connection itself.
        self.session_id = session_id
        self.options = options
        self.transport = transport
        # The wire format the client chose (JSON or Protobuf): it decodes
        # commands and encodes replies and pushes; the protocol is the same.
        self.wire = wire
        self.client_id = ""  # set by connect; "" means not connected yet
        self.credentials: Credentials = ANONYMOUS
        # Unix expiry of subscriptions granted by expiring subscription tokens.
        self.sub_expiries: dict[str, int] | None = None
        # Channels subscribed with ``join_leave: true``: their own join is pushed too.
        self.join_leave_asked: set[str] | None = None
        self.channels: set[str] | None = None
        # Channels subscribed with delta compression, each with the publication
        # the client received last there (its next delta's base); None for none.
        self.deltas: dict[str, Publication | None] | None = None
        self.closed = False
        self._out: list[bytes] | None = None
        # Pushes held while connect subscribes the token's channels, since
        # nothing may reach the client before its connect reply; _CLOSED once
        # the session is closed; None while pushes are written at once.
        self._held: list[Publication | bytes] | tuple[()] | None = None

    def __repr__(self) -> str:
        return f"<ClientSession {self.client_id or 'unconnected'}>"

    # -- hooks: the hub and the server API call these -----------------------

    def send_payload(self, payload: bytes) -> None:
        """Write one message holding ``payload``."""
        self.transport.write_payload(payload)

    def deliver(self, pub: Publication) -> None:
        """The fan-out path: the pending replies first, then the shared push bytes.

        Runs once per subscriber per publication, so one test stands between a
        connected, open session and its write: ``_held`` covers both a session
        still connecting (the push is held) and a closed one (it is dropped).
        """
        if self._held is not None:
            self._hold(pub)
            return
        if self._out:
            self.flush()
        if self.deltas is not None:
            pub = self._delta_form(pub)
        self.transport.write_publication(pub)

    def _delta_form(self, pub: Publication) -> Publication:
        """``pub`` as this client receives it: its delta form in a delta subscription."""
        deltas = self.deltas
        if deltas is None or pub.channel not in deltas:
            return pub
        previous = deltas[pub.channel]
        deltas[pub.channel] = pub
        return pub.for_delta_subscriber(previous)

    def _push(self, payload: bytes) -> None:
        """A per-connection push: after the replies so far, and never before connect's."""
        if self._held is not None:
            self._hold(payload)
            return
        self.flush()
        self.send_payload(payload)

    def _hold(self, push: Publication | bytes) -> None:
        """Keep a push for after the connect reply (bounded); drop it once closed."""
        held = self._held
        if not isinstance(held, list):
            return
        if len(held) < MAX_HELD_PUSHES:
            held.append(push)
            return
        log_client_error(
            log, "closing %s: over %d pushes while connecting", self.client_id, MAX_HELD_PUSHES
        )
        self._held = _CLOSED  # nothing more reaches the client, whatever the transport does
        self.close(DisconnectCode.INSUFFICIENT_STATE, "insufficient state")

    def insufficient_state(self) -> None:
        """A channel's stream skipped: the client reconnects and learns what it lost."""
        self.close(DisconnectCode.INSUFFICIENT_STATE, "insufficient state")

    def pong(self) -> None:
        """The client answered a ping (an empty command)."""
        self.transport.pong()

    def close(self, code: int, reason: str) -> None:
        """Disconnect the client with a close code and reason."""
        self.transport.close(code, reason)

    # -- state -------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return bool(self.client_id)

    def flush(self) -> None:
        """Write the replies collected so far as one frame."""
        out = self._out
        if out:
            self._out = None
            self.send_payload(out[0] if len(out) == 1 else self.wire.separator.join(out))

    def _reply(self, data: bytes) -> None:
        if self._out is None:
            self._out = [data]
        else:
            self._out.append(data)

    def server_unsubscribe(
        self, channel: str, code: int = 2000, reason: str = "server unsubscribe"
    ) -> bool:
        """Leave ``channel`` on the server's initiative and tell the client (an
        ``unsubscribe`` push; codes from 2500 make the SDK subscribe again).
        Returns False when the connection was not subscribed to it.
        """
        channels = self.channels
        if self.closed or channels is None or channel not in channels:
            return False
        channels.discard(channel)
        self._leave(channel)
        self._push(self.wire.unsubscribe_push(channel, code, reason))
        return True

    def release(self) -> None:
        """Leave every channel (the connection is gone). Idempotent."""
        self.closed = True
        self._out = None
        self._held = _CLOSED
        self.hub.remove_client(self.credentials.user, self)
        channels, self.channels = self.channels, None
        if channels:
            for channel in channels:
                self._leave(channel)

    def deliver_presence(self, event: PresenceEvent) -> None:
        """A join/leave push; rare enough to be framed per connection.

        Others' joins and leaves go to every subscriber of a ``join_leave``
        namespace. Its own join reaches a client only where Centrifugo sends
        it: the namespace forces join/leave pushes (``force_push_join_leave``)
        or the client asked for them (``join_leave`` in its subscribe, the
        SDKs' ``joinLeave`` option).
        """
        if self.closed:
            return
        if event.info.client == self.client_id and not self._wants_own_presence(event.channel):
            return
        self._push(event.encoded(self.wire.presence_push))

    def _wants_own_presence(self, channel: str) -> bool:
        asked = self.join_leave_asked
        if asked is not None and channel in asked:
            return True
        try:
            return self.options.access.policy(channel).force_push_join_leave
        except ProtocolError:
            return False

    def check_expiry(self) -> None:
        """Enforce token lifetimes; the transport calls this on its periodic turn.

        A connection past its token (plus the grace period) is closed with
        3005; a subscription past its subscription token is ended with 2501,
        which makes the SDKs subscribe again with a fresh token.
        """
        access = self.options.access
        if access.expired(self.credentials):
            self.close(DisconnectCode.CONNECTION_EXPIRED, "connection expired")
            return
        expiries = self.sub_expiries
        if expiries:
            deadline = time.time() - access.expiry_grace
            for channel in [c for c, expires in expiries.items() if expires < deadline]:
                self.server_unsubscribe(channel, 2501, "subscription expired")

    def _remember_expiry(self, channel: str, grant: Grant | None) -> None:
        if grant is not None and grant.expires:
            if self.sub_expiries is None:
                self.sub_expiries = {}
            self.sub_expiries[channel] = grant.expires
        elif self.sub_expiries is not None:
            self.sub_expiries.pop(channel, None)

    def _leave(self, channel: str) -> None:
        """Unsubscribe, and take the client out of the channel's presence."""
        self.hub.unsubscribe(channel, self)
        if self.sub_expiries is not None:
            self.sub_expiries.pop(channel, None)
        if self.join_leave_asked is not None:
            self.join_leave_asked.discard(channel)
        if self.deltas is not None:
            self.deltas.pop(channel, None)
        try:
            policy = self.options.access.policy(channel)
        except ProtocolError:
            return
        if policy.presence:
            self.hub.remove_presence(channel, self.client_id)
        if policy.join_leave:
            self.hub.announce(channel, "leave", self._info())

    def _info(self, chan_info: bytes | None = None) -> ClientInfo:
        conn_info = self.credentials.info
        return ClientInfo(
            user=self.credentials.user,
            client=self.client_id,
            conn_info=msgspec.Raw(conn_info) if conn_info else None,
            chan_info=msgspec.Raw(chan_info) if chan_info else None,
        )

    # -- commands ----------------------------------------------------------

    async def handle(self, payload: bytes) -> Disconnect | None:
        """Run every command of one frame in order; write the replies as one frame.

        Returns a :class:`Disconnect` when the client broke the protocol (the
        replies to the commands before the offending one are still written).
        """
        try:
            commands = self.wire.decode_commands(payload)
        except BadRequest as exc:
            log_client_error(log, "bad frame from %s: %s", self.client_id or "new client", exc)
            return exc.disconnect
        try:
            for cmd in commands:
                if self.closed:
                    return None
                disconnect = await self.handle_command(cmd)
                if disconnect is not None:
                    return disconnect
            return None
        finally:
            if not self.closed:
                self.flush()

    async def handle_command(self, cmd: Command) -> Disconnect | None:
        """Run one command: its first request in :data:`ROUTES` order, if the state allows it."""
        requests = _requests(cmd)
        if cmd.id == 0:
            return await self._handle_no_id(requests)
        route, req = requests[0] if requests else (None, None)
        if not self.client_id and (route is None or route.connected):
            return CONNECT_FIRST
        if route is None:
            # No method we know: Centrifugo closes the connection too.
            return Disconnect(DisconnectCode.BAD_REQUEST, "unknown command")
        if self.client_id and not route.connected:
            return Disconnect(DisconnectCode.BAD_REQUEST, "already connected")
        return await self._run(route, cmd.id, req)

    async def _handle_no_id(self, requests: list[tuple[Route, object]]) -> Disconnect | None:
        """A command without id: a pong (no request), an asynchronous message, or an error."""
        if not self.client_id:
            return CONNECT_FIRST
        if not requests:
            self.pong()
            return None
        for route, req in requests:
            if not route.needs_id:
                return await self._run(route, 0, req)
        return Disconnect(DisconnectCode.BAD_REQUEST, "command without id")

    async def _run(self, route: Route, cmd_id: int, req: object) -> Disconnect | None:
        """Run a handler; the one place where what it raised becomes a reply or a close."""
        try:
            reply = await route.run(self, cmd_id, req)
            if reply is not None:
                self._reply(reply)
        except InvalidToken as exc:
            log_client_error(log, "closing %s: %s", self.client_id or "new client", exc.message)
            return Disconnect(DisconnectCode.INVALID_TOKEN, "invalid token")
        except ProtocolError as exc:
            if not self.closed:
                self._reply(self.wire.error_reply(cmd_id, exc))
        except Exception:
            log.exception("command %d of %s failed", cmd_id, self.client_id)
            if not self.closed:
                self._reply(self.wire.error_reply(cmd_id, ProtocolError(ErrorCode.INTERNAL)))
        return None

    async def _connect(self, cmd_id: int, req: ConnectRequest) -> None:
        """Authenticate, subscribe the token's channels, then reply.

        The token's channels are live as soon as each is subscribed, while
        connect still waits on the broker for the next one (or for presence):
        their pushes are held and written right after the connect reply, whose
        ``subs`` carry each channel's recovered publications, so the client
        sees every publication once and in order. If connect fails half-way
        (a broker timing out), the session is left as it was before it: not
        connected, in no channel, and the client may connect again.
        """
        access = self.options.access
        credentials = access.authenticate(req.token or None)
        # The token's channels (and the personal channel) obey the rules of any
        # subscription (a claim grants a namespace's token requirement, not a
        # user-limited channel of others), and are all checked before the client
        # counts as connected.
        server_channels = access.server_channels(credentials)
        access.authorize_subscribe(credentials, server_channels)
        self.credentials = credentials
        self.client_id = str(uuid.uuid4())
        self.channels = set()
        self.hub.add_client(credentials.user, self)
        subs: dict[str, SubscribeResult] = {}
        self._held = []
        try:
            # Server-side subscriptions: the token's channels claim and the personal
            # channel, recovered from the positions the SDK sends back in
            # connect.subs on a reconnect.
            for channel in server_channels:
                if self.closed:
                    break
                previous = (req.subs or {}).get(channel)
                sub = await self._subscribe_channel(channel, previous, None)
                if sub is None:
                    break
                subs[channel] = sub
                await self._join(channel, None)
        except BaseException:
            if not self.closed:
                self._held = None
            self._disconnect_session()
            raise
        expires, ttl = _ttl(credentials.expires)
        result = ConnectResult(
            client=self.client_id,
            version=self.options.version,
            expires=expires,
            ttl=ttl,
            subs=subs or None,
            ping=self.options.ping_interval,
            pong=self.options.ping_interval > 0,
            session=self.session_id,
            node=self.options.node if self.session_id else "",
        )
        self._reply(self.wire.encode_reply(Reply(id=cmd_id, connect=result)))
        held = self._held
        if not isinstance(held, list):
            return None  # closed while connecting
        self._held = None
        if held:
            self.flush()
            for push in held:
                if isinstance(push, bytes):
                    self.send_payload(push)
                else:
                    self.transport.write_publication(self._delta_form(push))
        return None

    def _disconnect_session(self) -> None:
        """Undo a connect that failed half-way: leave its channels, forget the client."""
        channels, self.channels = self.channels, None
        if channels and not self.closed:
            for channel in channels:
                self._leave(channel)
        self.hub.remove_client(self.credentials.user, self)
        self.client_id = ""
        self.credentials = ANONYMOUS
        self.sub_expiries = None
        self.join_leave_asked = None
        self.deltas = None

    async def _refresh(self, cmd_id: int, req: RefreshRequest) -> bytes:
        credentials = self.options.access.authenticate(req.token or None)
        if credentials.user != self.credentials.user:
            raise InvalidToken("a refreshed token must be for the same user")
        self.credentials = credentials
        expires, ttl = _ttl(credentials.expires)
        result = RefreshResult(
            client=self.client_id, version=self.options.version, expires=expires, ttl=ttl
        )
        return self.wire.encode_reply(Reply(id=cmd_id, refresh=result))

    async def _subscribe(self, cmd_id: int, req: SubscribeRequest) -> None:
        channel = req.channel
        channels = self.channels
        assert channels is not None
        if channel in channels:
            raise ProtocolError(ErrorCode.ALREADY_SUBSCRIBED)
        tokens = (req.token,) if req.token else ()
        try:
            grants = self.options.access.authorize_subscribe(
                self.credentials, (channel,), tokens, held=len(channels)
            )
        except UnverifiedToken as exc:
            # Centrifugo's answer: this subscribe fails, the connection stays
            # (a token for another user or channel still closes it, 3500).
            log_client_error(log, "subscribe of %s to %s: %s", self, channel, exc.message)
            raise ProtocolError(ErrorCode.PERMISSION_DENIED) from None
        grant = grants.get(channel)
        # Centrifugo's negotiation: a delta type the namespace does not allow
        # (or an unknown one) is not an error, the subscription is plain.
        delta = req.delta == "fossil" and self.options.access.policy(channel).fossil_delta
        result = await self._subscribe_channel(channel, req, grant, delta)
        if result is None:
            return
        # No await between the hub's answer and this: the reply is queued before
        # the first live publication can reach deliver(), which flushes it first.
        self._reply(self.wire.encode_reply(Reply(id=cmd_id, subscribe=result)))
        self._remember_expiry(channel, grant)
        if req.join_leave:
            if self.join_leave_asked is None:
                self.join_leave_asked = set()
            self.join_leave_asked.add(channel)
        await self._join(channel, grant)

    async def _subscribe_channel(
        self,
        channel: str,
        req: SubscribeRequest | None,
        grant: Grant | None,
        delta: bool = False,
    ) -> SubscribeResult | None:
        """Join the hub (recovering from ``req``'s position); None if the client left.

        With ``delta``, recovered publications go in their full delta form
        (each one stands alone, as Centrifugo's first one does) and the last
        of them is the base of the first live delta.
        """
        channels = self.channels
        assert channels is not None
        recover = req is not None and req.recover
        since = Position(req.epoch, req.offset) if req is not None and recover else None
        channels.add(channel)  # taken before the await: a second subscribe gets 105
        try:
            recovery = await self.hub.subscribe(channel, self, since)
        except BaseException:
            channels.discard(channel)
            raise
        if self.closed:
            # The connection went away while the hub was being asked.
            self.hub.unsubscribe(channel, self)
            return None
        if (
            req is not None
            and recover
            and not recovery.recovered
            and req.flag & FLAG_REJECT_UNRECOVERED
        ):
            self.hub.unsubscribe(channel, self)
            channels.discard(channel)
            raise ProtocolError(ErrorCode.UNRECOVERABLE_POSITION)
        position = recovery.position
        publications = recovery.publications
        if delta:
            if self.deltas is None:
                self.deltas = {}
            self.deltas[channel] = publications[-1] if publications else None
            publications = [pub.for_delta_subscriber(None) for pub in publications]
        expires, ttl = _ttl(grant.expires if grant is not None else 0)
        return SubscribeResult(
            expires=expires,
            ttl=ttl,
            recoverable=True,
            positioned=True,
            epoch=position.epoch,
            offset=position.offset,
            recovered=recovery.recovered,
            was_recovering=recover,
            publications=self.wire.publications(publications) or None,
            delta=delta,
        )

    async def _join(self, channel: str, grant: Grant | None) -> None:
        """Enter the channel's presence and announce the join, where the namespace says so."""
        policy = self.options.access.policy(channel)
        if not (policy.presence or policy.join_leave):
            return
        info = self._info(grant.info if grant is not None else None)
        if policy.presence:
            try:
                await self.hub.add_presence(channel, self.client_id, info)
            except ProtocolError as exc:
                # The subscription stands (its reply is sent); presence is what
                # the broker cannot keep, and presence queries will say so.
                log.warning("presence of %s in %s not recorded: %s", self, channel, exc.message)
                return
            if self.closed or self.channels is None or channel not in self.channels:
                self.hub.remove_presence(channel, self.client_id)  # left while we waited
                return
        if policy.join_leave:
            self.hub.announce(channel, "join", info)

    async def _unsubscribe(self, cmd_id: int, req: ChannelRequest) -> bytes:
        channels = self.channels
        if channels is not None and req.channel in channels:
            channels.discard(req.channel)
            self._leave(req.channel)
        return self.wire.encode_reply(Reply(id=cmd_id, unsubscribe=Empty()))

    async def _publish(self, cmd_id: int, req: PublishRequest) -> bytes:
        if not req.data:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "publish without data")
        subscribed = self.channels is not None and req.channel in self.channels
        self.options.access.check_publish(self.credentials, req.channel, subscribed)
        info = ClientInfo(user=self.credentials.user, client=self.client_id)
        await self.hub.publish(req.channel, bytes(req.data), info=info)
        return self.wire.encode_reply(Reply(id=cmd_id, publish=Empty()))

    async def _history(self, cmd_id: int, req: HistoryRequest) -> bytes:
        subscribed = self.channels is not None and req.channel in self.channels
        self.options.access.check_history(self.credentials, req.channel, subscribed)
        since = None
        if req.since is not None:
            since = Position(req.since.epoch, req.since.offset)
        # Centrifugo's limit: 0 = only the stream position, negative = everything.
        limit = req.limit if req.limit >= 0 else None
        pubs, top = await self.hub.history(
            req.channel, since=since, limit=limit, reverse=req.reverse
        )
        if since is not None and since.epoch != top.epoch and since.epoch and top.epoch:
            raise ProtocolError(ErrorCode.UNRECOVERABLE_POSITION)
        result = HistoryResult(
            publications=self.wire.publications(pubs), epoch=top.epoch, offset=top.offset
        )
        return self.wire.encode_reply(Reply(id=cmd_id, history=result))

    async def _presence(self, cmd_id: int, req: ChannelRequest) -> bytes:
        self._check_presence(req.channel)
        result = PresenceResult(presence=presence_entries(await self.hub.presence(req.channel)))
        return self.wire.encode_reply(Reply(id=cmd_id, presence=result))

    async def _presence_stats(self, cmd_id: int, req: ChannelRequest) -> bytes:
        self._check_presence(req.channel)
        clients, users = await self.hub.presence_stats(req.channel)
        result = PresenceStatsResult(num_clients=clients, num_users=users)
        return self.wire.encode_reply(Reply(id=cmd_id, presence_stats=result))

    def _check_presence(self, channel: str) -> None:
        subscribed = self.channels is not None and channel in self.channels
        self.options.access.check_presence(self.credentials, channel, subscribed)

    async def _rpc(self, cmd_id: int, req: RPCRequest) -> bytes:
        """No RPC handler is configured (the proxy issue adds one)."""
        raise ProtocolError(ErrorCode.NOT_AVAILABLE)

    async def _ping(self, cmd_id: int, req: msgspec.Raw) -> bytes:
        """A client ping (protocol v1 SDKs); v2 SDKs only answer ours."""
        return self.wire.encode_reply(Reply(id=cmd_id, ping=Empty()))

    async def _send(self, cmd_id: int, req: SendRequest) -> None:
        """An asynchronous message, with or without an id: no handler yet, no reply by design."""

    async def _sub_refresh(self, cmd_id: int, req: SubRefreshRequest) -> bytes:
        if self.channels is None or req.channel not in self.channels:
            raise ProtocolError(ErrorCode.PERMISSION_DENIED, "not subscribed")
        grant = (
            self.options.access.subscription_grant(req.token, self.credentials, req.channel)
            if req.token
            else None
        )
        self._remember_expiry(req.channel, grant)
        expires, ttl = _ttl(grant.expires if grant is not None else 0)
        return self.wire.encode_reply(
            Reply(id=cmd_id, sub_refresh=SubRefreshResult(expires=expires, ttl=ttl))
        )


#: What a command's request runs. Every handler takes the command id and the
#: request and returns the reply's bytes, or None when it queued its own reply
#: (subscribe, whose reply must precede the first push) or there is none (send).
Handler = Callable[[ClientSession, int, Any], Awaitable[bytes | None]]


class Route(NamedTuple):
    """One request field of :class:`Command`, what runs it and when it may."""

    #: The :class:`Command` field holding the request.
    field: str
    run: Handler
    #: The state the client must be in: connected for all but ``connect``.
    connected: bool = True
    #: Only an asynchronous message (``send``) may come without an id.
    needs_id: bool = True


#: Every request a command can carry, once. The order is the precedence when
#: a command carries several (the first one present runs), as it always was.
ROUTES: tuple[Route, ...] = (
    Route("connect", ClientSession._connect, connected=False),
    Route("refresh", ClientSession._refresh),
    Route("subscribe", ClientSession._subscribe),
    Route("unsubscribe", ClientSession._unsubscribe),
    Route("publish", ClientSession._publish),
    Route("presence", ClientSession._presence),
    Route("presence_stats", ClientSession._presence_stats),
    Route("history", ClientSession._history),
    Route("rpc", ClientSession._rpc),
    Route("sub_refresh", ClientSession._sub_refresh),
    Route("ping", ClientSession._ping),
    Route("send", ClientSession._send, needs_id=False),
)

CONNECT_FIRST = Disconnect(DisconnectCode.BAD_REQUEST, "connect first")


def _requests(cmd: Command) -> list[tuple[Route, object]]:
    """The requests ``cmd`` carries, in :data:`ROUTES` order.

    An absent request is None, an absent ``ping`` the empty ``msgspec.Raw``:
    both are false, and every request Struct is true.
    """
    return [(route, req) for route in ROUTES if (req := getattr(cmd, route.field))]


def _ttl(expires_at: int) -> tuple[bool, int]:
    """Centrifugo's ``expires``/``ttl`` pair for a token expiring at ``expires_at``."""
    if not expires_at:
        return False, 0
    return True, max(1, int(expires_at - time.time()))
