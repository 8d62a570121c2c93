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

import asyncio
import itertools
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Literal, NamedTuple, Protocol

import msgspec

from ..auth import ANONYMOUS, Access, Credentials, Grant, InvalidToken, UnverifiedToken
from ..errors import DisconnectCode, ErrorCode, ProtocolError
from ..gate import Gate
from ..hooks import (
    ConnectCall,
    DisconnectEvent,
    Hooks,
    MemberEvent,
    RefreshCall,
    SubRefreshCall,
    SubscribeCall,
    TransportName,
    encode_json,
)
from ..hooks import Disconnect as HookDisconnect
from ..hub import ClientInfo, Hub, Position, PresenceEvent, Publication
from ..logs import log_client_error
from ..metrics import Metrics
from ..version import __version__
from . import commands
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
    PublishRequest,
    RefreshRequest,
    RefreshResult,
    Reply,
    RPCRequest,
    SendRequest,
    ServerSubscription,
    SubRefreshRequest,
    SubRefreshResult,
    SubscribeRequest,
    SubscribeResult,
)
from .wire import JSON, Wire

log = logging.getLogger(__name__)

VERSION = __version__


class _ClientIds:
    """Client ids as unique as uuid4's, without a uuid4 per connection.

    Centrifugo's ids are uuid4 strings and its SDKs treat them as opaque, but
    presence and a Redis/NATS broker compare them across nodes, so an id must
    be unique among every node's. Each process draws 74 random bits once (the
    head of a uuid4: ids keep the uuid4 shape) and counts in the last 48 bits;
    a forked worker draws its own head. ``str(uuid.uuid4())`` costs 50 us per
    connect on the loaded 2-core bench machine, this 7 us (timeit, same run).
    """

    __slots__ = ("_counter", "_head")

    def __init__(self) -> None:
        self._head = ""
        self._counter: itertools.count[int] = itertools.count()
        self.renew()

    def renew(self) -> None:
        """Draw a new random head and restart the count (at start and in a forked child)."""
        self._head = str(uuid.uuid4())[:24]
        self._counter = itertools.count()

    def next(self) -> str:
        """A new client id, never handed out before by any process."""
        return f"{self._head}{next(self._counter) & 0xFFFFFFFFFFFF:012x}"


CLIENT_IDS = _ClientIds()
os.register_at_fork(after_in_child=CLIENT_IDS.renew)

#: Pushes (publications, joins and leaves, unsubscribes) a connecting session
#: holds until its connect reply is written. They arrive only while connect
#: waits on the broker for the token's later channels, so this is far more
#: than a connect sees unless the broker is stalled; past it the client is
#: closed with insufficient state and resumes from history. Each held push is
#: a reference to shared bytes or a shared publication: 8 bytes.
MAX_HELD_PUSHES = 1024

#: What a closed session holds in place of pushes: nothing, and nothing is added.
_CLOSED: tuple[()] = ()


#: Refresh hooks (``refresh``, ``sub_refresh``) running at once per transport;
#: an expiry found while this many run waits for the next periodic turn.
MAX_PENDING_REFRESHES = 1024

#: The code and reason of a session whose client went away by itself (its
#: socket closed, its close frame came, its stream was dropped): what the
#: ``disconnect`` event says, as Centrifugo's "connection closed".
CLIENT_WENT_AWAY = (3000, "connection closed")


class RequestContext(NamedTuple):
    """What a ``connect`` hook sees of the HTTP request that opened a session.

    Kept by the transport only while a ``connect`` hook is registered, and only
    until the session is connected (see :meth:`SessionTransport.request_context`).
    """

    headers: Mapping[str, str]
    cookies: Mapping[str, str]
    remote: str = ""


NO_REQUEST_CONTEXT = RequestContext({}, {})


class Refreshes:
    """The ``refresh`` and ``sub_refresh`` hook calls in flight for one transport.

    Expiries are found on the transport's periodic turn, which must never wait
    on a hook: each expired connection (or subscription) gets a task of its
    own, at most :data:`MAX_PENDING_REFRESHES` at once; one already asked is not
    asked again until its task ends. Empty, it holds an empty dict.
    """

    __slots__ = ("limit", "pending")

    def __init__(self, limit: int = MAX_PENDING_REFRESHES) -> None:
        self.limit = limit
        self.pending: dict[tuple[ClientSession, str], asyncio.Task[None]] = {}

    def start(self, key: tuple[ClientSession, str], work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` for ``key`` unless it runs already or too many do (then next turn)."""
        pending = self.pending
        if key in pending or len(pending) >= self.limit:
            work.close()
            return
        task = asyncio.get_running_loop().create_task(work)
        pending[key] = task
        task.add_done_callback(lambda _: pending.pop(key, None))


class SessionOptions(NamedTuple):
    """What the protocol needs from the configuration; shared by every session."""

    access: Access
    ping_interval: int = 25
    version: str = VERSION
    #: This node's id, sent in the connect reply of emulated sessions.
    node: str = ""
    #: The doors of the access rules and the application's hooks; None: the
    #: rules alone (a session built without a server, in unit tests).
    gate: Gate | None = None
    #: The refresh hooks in flight (a transport's; None: a session of its own).
    refreshes: Refreshes | None = None
    #: Where commands, errors, recoveries and server disconnects are counted
    #: (the server's; None: counted nowhere anyone reads, in unit tests).
    metrics: Metrics | None = None

    def counted(self) -> Metrics:
        """The metrics sessions count in (a private set when none was given)."""
        metrics = self.metrics
        return metrics if metrics is not None else _uncounted()

    def doors(self) -> Gate:
        """The gate sessions go through (the rules alone when none was given)."""
        gate = self.gate
        return gate if gate is not None else Gate(self.access, _NO_HOOKS)


_NO_HOOKS = Hooks()
_UNCOUNTED: list[Metrics] = []


def _uncounted() -> Metrics:
    """Metrics for sessions built without a server (made on first use)."""
    if not _UNCOUNTED:
        _UNCOUNTED.append(Metrics(multiprocess=False))
    return _UNCOUNTED[0]


_NO_REFRESHES = Refreshes()


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

    @property
    def transport_name(self) -> TransportName:
        """How the client is connected, as hooks and events name it."""

    def request_context(self) -> RequestContext:
        """The opening request's headers, cookies and peer, for the ``connect``
        hook (asked only when one is registered)."""


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
        "grants",
        "hub",
        "join_leave_asked",
        "options",
        "session_id",
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
        # The grants of subscriptions that carry something to remember: an
        # expiry (a subscription token's, or the subscribe hook's) or the hook's
        # presence/join_leave overrides. None while no subscription has any.
        self.grants: dict[str, Grant] | None = None
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
        self.options.counted().server_unsubscribes.labels(str(code)).inc()
        return True

    def release(self, code: int = CLIENT_WENT_AWAY[0], reason: str = CLIENT_WENT_AWAY[1]) -> None:
        """Leave every channel (the connection is gone). Idempotent.

        ``code`` and ``reason`` are what the client was told (the transport
        passes its close code; a client that went away by itself is
        :data:`CLIENT_WENT_AWAY`): the ``disconnect`` event carries them.
        """
        if self.closed:
            return
        self.closed = True
        self._out = None
        self._held = _CLOSED
        if code != CLIENT_WENT_AWAY[0]:
            self.options.counted().server_disconnects.labels(str(int(code))).inc()
        self.hub.remove_client(self.credentials.user, self)
        if self.client_id and log.isEnabledFor(logging.DEBUG):
            log.debug(
                "client %s disconnected: %d %s",
                self.client_id,
                code,
                reason,
                extra=self.log_fields(code=int(code)),
            )
        channels, self.channels = self.channels, None
        if channels:
            for channel in channels:
                self._leave(channel)
        hooks = self.options.doors().hooks
        if self.client_id and hooks.listening:
            hooks.emit(
                DisconnectEvent(
                    client=self.client_id,
                    user=self.credentials.user,
                    transport=self.transport.transport_name,
                    code=int(code),
                    reason=reason,
                )
            )

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
        """Enforce lifetimes; the transport calls this on its periodic turn.

        A connection past its token (plus the grace period) is closed with
        3005; a subscription past its subscription token is ended with 2501,
        which makes the SDKs subscribe again with a fresh token. A lifetime
        the application's hooks gave (``credentials.by_hook``, a grant's
        ``by_hook``) is extended by asking its ``refresh`` / ``sub_refresh``
        hook as soon as it ends, in a task of its own (:class:`Refreshes`);
        without that hook it ends as a token's does.
        """
        access = self.options.access
        credentials = self.credentials
        now = time.time()
        if credentials.expires and now > credentials.expires:
            hooks = self.options.doors().hooks
            if credentials.by_hook and hooks.refresh is not None:
                self._refreshes().start((self, ""), self._refresh_by_hook(hooks))
            elif access.expired(credentials):
                self.close(DisconnectCode.CONNECTION_EXPIRED, "connection expired")
                return
        grants = self.grants
        if grants:
            deadline = now - access.expiry_grace
            hooks = self.options.doors().hooks
            for channel, grant in list(grants.items()):
                if not grant.expires or grant.expires >= now:
                    continue
                if grant.by_hook and hooks.sub_refresh is not None:
                    work = self._sub_refresh_by_hook(hooks, channel)
                    self._refreshes().start((self, channel), work)
                elif grant.expires < deadline:
                    self.server_unsubscribe(channel, 2501, "subscription expired")

    def _refreshes(self) -> Refreshes:
        refreshes = self.options.refreshes
        return refreshes if refreshes is not None else _NO_REFRESHES

    async def _refresh_by_hook(self, hooks: Hooks) -> None:
        """Ask the ``refresh`` hook for a new expiry; close 3005 when it says the
        connection is over (or has no opinion). A hook that fails is asked
        again on a later turn, until the grace period is past."""
        hook = hooks.refresh
        if hook is None or self.closed:
            return
        try:
            reply = await hooks.decide("refresh", hook, RefreshCall(**self._who()))
        except (ProtocolError, HookDisconnect) as exc:
            if isinstance(exc, HookDisconnect):
                self.close(exc.code, exc.reason)
            elif self.options.access.expired(self.credentials):
                self.close(DisconnectCode.CONNECTION_EXPIRED, "connection expired")
            return
        if self.closed:
            return
        if reply is None or reply.expired:
            self.close(DisconnectCode.CONNECTION_EXPIRED, "connection expired")
            return
        try:
            info = encode_json(reply.info)
        except TypeError as exc:
            log.error("refresh hook returned an unusable reply: %s", exc)
            return
        self.server_refresh(int(reply.expire_at), info, False)

    async def _sub_refresh_by_hook(self, hooks: Hooks, channel: str) -> None:
        """Ask the ``sub_refresh`` hook for a new expiry of ``channel``; 2501
        when the subscription is over (or the hook has no opinion)."""
        hook = hooks.sub_refresh
        if hook is None or self.closed:
            return
        call = SubRefreshCall(**self._who(), channel=channel)
        try:
            reply = await hooks.decide("sub_refresh", hook, call)
        except HookDisconnect as exc:
            self.close(exc.code, exc.reason)
            return
        except ProtocolError:
            grant = (self.grants or {}).get(channel)
            if grant is not None and grant.expires < time.time() - self.options.access.expiry_grace:
                self.server_unsubscribe(channel, 2501, "subscription expired")
            return
        grants = self.grants
        grant = grants.get(channel) if grants is not None else None
        if self.closed or grants is None or grant is None:
            return  # unsubscribed meanwhile
        if reply is None or reply.expired:
            self.server_unsubscribe(channel, 2501, "subscription expired")
            return
        try:
            info = encode_json(reply.info)
        except TypeError as exc:
            log.error("sub_refresh hook returned an unusable reply: %s", exc)
            return
        # The new info goes with the leave; the presence entry keeps the join's.
        grants[channel] = grant._replace(
            expires=int(reply.expire_at), info=info if info is not None else grant.info
        )

    def _remember_grant(self, channel: str, grant: Grant | None) -> None:
        """Keep ``channel``'s grant when it carries an expiry or overrides."""
        if grant is not None and (
            grant.expires or grant.presence is not None or grant.join_leave is not None
        ):
            if self.grants is None:
                self.grants = {}
            self.grants[channel] = grant
        elif self.grants is not None:
            self.grants.pop(channel, None)

    def _joins(self, channel: str, grant: Grant | None) -> tuple[bool, bool]:
        """``(presence, join_leave)`` of this subscription: the namespace's, or
        the ``subscribe`` hook's overrides. One rule for the join and the leave."""
        policy = self.options.access.policy(channel)
        presence, join_leave = policy.presence, policy.join_leave
        if grant is not None:
            if grant.presence is not None:
                presence = grant.presence
            if grant.join_leave is not None:
                join_leave = grant.join_leave
        return presence, join_leave

    def _leave(self, channel: str) -> None:
        """Unsubscribe, and take the client out of the channel's presence."""
        self.hub.unsubscribe(channel, self)
        grant = self.grants.pop(channel, None) if self.grants is not None else None
        if self.join_leave_asked is not None:
            self.join_leave_asked.discard(channel)
        if self.deltas is not None:
            self.deltas.pop(channel, None)
        try:
            presence, join_leave = self._joins(channel, grant)
        except ProtocolError:
            return
        if not (presence or join_leave):
            return
        if presence:
            self.hub.remove_presence(channel, self.client_id)
        info = self._info(grant.info if grant is not None else None)
        if join_leave:
            self.hub.announce(channel, "leave", info)
        self._member_event("leave", channel, info)

    def _member_event(self, kind: Literal["join", "leave"], channel: str, info: ClientInfo) -> None:
        """A join or leave for the listeners: fired here, by the node holding
        the client, so once per cluster."""
        hooks = self.options.doors().hooks
        if hooks.listening:
            hooks.emit(
                MemberEvent(
                    kind=kind,
                    channel=channel,
                    client=info.client,
                    user=info.user,
                    conn_info=bytes(info.conn_info) if info.conn_info else None,
                    chan_info=bytes(info.chan_info) if info.chan_info else None,
                )
            )

    def _info(self, chan_info: bytes | None = None) -> ClientInfo:
        return self._caller().info(chan_info)

    def _caller(self) -> commands.Caller:
        """This client as the commands shared with the HTTP calls see it."""
        return commands.Caller(
            self.credentials,
            self.transport.transport_name,
            "protobuf" if self.wire.binary else "json",
            self.client_id,
        )

    def log_fields(self, **more: object) -> dict[str, object]:
        """The fields of this client's log lines (tidings.logs.FIELDS): a JSON
        log line carries them as keys, for a pipeline to filter on."""
        return {
            "client": self.client_id or None,
            "user": self.credentials.user or None,
            "transport": self.transport.transport_name,
            **more,
        }

    def _who(self) -> dict[str, Any]:
        """The fields every hook call of this session carries."""
        return self._caller().hook_fields()

    # -- the server API's side (hub.Client) ---------------------------------

    async def server_subscribe(self, channel: str) -> bool:
        """Subscribe the client to ``channel`` on the server's initiative.

        Centrifugo's server-side subscription: no permission check (the
        server decided), a ``subscribe`` push the SDKs turn into a server-side
        subscription (centrifuge-js emits ``subscribed`` on the client;
        centrifuge-python calls ``on_subscribed`` of its client handler), then
        presence and the join as for any subscription. Returns False when the
        session is not connected, is closed, or already follows ``channel``;
        a name that is invalid or of an unknown namespace raises its
        :class:`ProtocolError` (107, 102), and one past ``limits.max_channels_per_connection`` 106.
        """
        access = self.options.access
        access.policy(channel)
        channels = self.channels
        if self.closed or not self.client_id or channels is None or channel in channels:
            return False
        if self._held is not None:
            return False  # still connecting: its connect reply is not written yet
        if len(channels) >= access.max_channels:
            # The server decided the channel, not the bound: a connection
            # still holds at most limits.max_channels_per_connection.
            raise ProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"more than {access.max_channels} channels on one connection",
            )
        result = await self._subscribe_channel(channel, None, None)
        if result is None:
            return False
        self._push(
            self.wire.subscribe_push(
                channel,
                ServerSubscription(
                    recoverable=True,
                    positioned=True,
                    epoch=result.epoch,
                    offset=result.offset,
                ),
            )
        )
        await self._join(channel, None)
        return True

    def server_refresh(self, expire_at: int, info: bytes | None, expired: bool) -> bool:
        """Set the connection's expiry (and info, unless None) on the server's
        initiative, or end it now with 3005 (``expired``). Returns False when
        the session is not connected or already closed."""
        if self.closed or not self.client_id:
            return False
        if expired:
            self.close(DisconnectCode.CONNECTION_EXPIRED, "connection expired")
            return True
        credentials = self.credentials
        self.credentials = credentials._replace(
            expires=int(expire_at), info=info if info is not None else credentials.info
        )
        return True

    # -- commands ----------------------------------------------------------

    async def handle(self, payload: bytes) -> Disconnect | None:
        """Run every command of one frame in order; write the replies as one frame.

        Returns a :class:`Disconnect` when the client broke the protocol (the
        replies to the commands before the offending one are still written).
        """
        try:
            commands = self.wire.decode_commands(payload)
        except BadRequest as exc:
            log_client_error(
                log,
                "bad frame from %s: %s",
                self.client_id or "new client",
                exc,
                fields=self.log_fields(code=int(exc.disconnect.code)),
            )
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
        """Run a handler, timed (``centrifugo_client_command_duration_seconds``)."""
        started = time.perf_counter()
        try:
            return await self._answer(route, cmd_id, req)
        finally:
            duration = time.perf_counter() - started
            self.options.counted().command_timer(route.field).observe(duration)

    async def _answer(self, route: Route, cmd_id: int, req: object) -> Disconnect | None:
        """Run a handler; the one place where what it raised becomes a reply or a close."""
        try:
            reply = await route.run(self, cmd_id, req)
            if reply is not None:
                self._reply(reply)
        except InvalidToken as exc:
            log_client_error(
                log,
                "closing %s: %s",
                self.client_id or "new client",
                exc.message,
                fields=self.log_fields(code=int(DisconnectCode.INVALID_TOKEN)),
            )
            return Disconnect(DisconnectCode.INVALID_TOKEN, "invalid token")
        except HookDisconnect as exc:
            # The application's hook closes the connection, with its code and reason.
            return Disconnect(exc.code, exc.reason)
        except ProtocolError as exc:
            self._count_error(route, int(exc.code))
            if not self.closed:
                self._reply(self.wire.error_reply(cmd_id, exc))
        except Exception:
            log.exception("command %d of %s failed", cmd_id, self.client_id)
            self._count_error(route, int(ErrorCode.INTERNAL))
            if not self.closed:
                self._reply(self.wire.error_reply(cmd_id, ProtocolError(ErrorCode.INTERNAL)))
        return None

    def _count_error(self, route: Route, code: int) -> None:
        self.options.counted().reply_errors.labels(route.field, str(code)).inc()

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
        client_id = CLIENT_IDS.next()

        def make_call(user: str) -> ConnectCall:
            request = self.transport.request_context()
            return ConnectCall(
                transport=self.transport.transport_name,
                protocol="protobuf" if self.wire.binary else "json",
                client=client_id,
                user=user,
                headers=request.headers,
                cookies=request.cookies,
                data=bytes(req.data) or None,
                remote=request.remote,
                name=req.name,
                version=req.version,
            )

        admitted = await self.options.doors().connect(req.token or None, make_call)
        if self.closed:
            return None  # the client left while the hook decided
        credentials = admitted.credentials
        # The token's channels (and the personal channel) obey the rules of any
        # subscription (a claim grants a namespace's token requirement, not a
        # user-limited channel of others), and are all checked before the client
        # counts as connected.
        server_channels = access.server_channels(credentials)
        access.authorize_subscribe(credentials, server_channels)
        self.credentials = credentials
        self.client_id = client_id
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
        # A lifetime the hook gave is the server's to extend (the refresh hook):
        # the client is not told, or its SDK would refresh it with a token.
        expires, ttl = _ttl(0 if credentials.by_hook else credentials.expires)
        result = ConnectResult(
            client=self.client_id,
            version=self.options.version,
            expires=expires,
            ttl=ttl,
            data=msgspec.Raw(admitted.data) if admitted.data is not None else None,
            subs=subs or None,
            ping=self.options.ping_interval,
            pong=self.options.ping_interval > 0,
            session=self.session_id,
            node=self.options.node if self.session_id else "",
        )
        self._reply(self.wire.encode_reply(Reply(id=cmd_id, connect=result)))
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "client %s connected as user %r over %s",
                client_id,
                credentials.user,
                self.transport.transport_name,
                extra=self.log_fields(),
            )
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
        self.grants = None
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

        def make_call(name: str) -> SubscribeCall:
            return SubscribeCall(**self._who(), channel=name, data=bytes(req.data) or None)

        try:
            grants = await self.options.doors().subscribe(
                self.credentials, (channel,), tokens, held=len(channels), make_call=make_call
            )
        except UnverifiedToken as exc:
            # Centrifugo's answer: this subscribe fails, the connection stays
            # (a token for another user or channel still closes it, 3500).
            log_client_error(
                log,
                "subscribe of %s to %s: %s",
                self,
                channel,
                exc.message,
                fields=self.log_fields(channel=channel, code=int(ErrorCode.PERMISSION_DENIED)),
            )
            raise ProtocolError(ErrorCode.PERMISSION_DENIED) from None
        if self.closed:
            return  # the client left while the hook decided
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
        self._remember_grant(channel, grant)
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
        if recover:
            metrics = self.options.counted()
            if recovery.recovered:
                metrics.recovered.inc()
            else:
                metrics.not_recovered.inc()
                metrics.unrecovered(self.transport.transport_name)
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
        # A lifetime the hook gave is extended by the server (sub_refresh hook).
        expires, ttl = _ttl(grant.expires if grant is not None and not grant.by_hook else 0)
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
        """Enter the channel's presence and announce the join, where the namespace
        (or the ``subscribe`` hook's overrides) says so."""
        presence, join_leave = self._joins(channel, grant)
        if not (presence or join_leave):
            return
        info = self._info(grant.info if grant is not None else None)
        if presence:
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
        if join_leave:
            self.hub.announce(channel, "join", info)
        self._member_event("join", channel, info)

    async def _unsubscribe(self, cmd_id: int, req: ChannelRequest) -> bytes:
        channels = self.channels
        if channels is not None and req.channel in channels:
            channels.discard(req.channel)
            self._leave(req.channel)
        return self.wire.encode_reply(Reply(id=cmd_id, unsubscribe=Empty()))

    async def _publish(self, cmd_id: int, req: PublishRequest) -> bytes:
        await commands.publish(
            self.options.doors(), self.hub, self._caller(), req, subscribed=self._holds(req.channel)
        )
        return self.wire.encode_reply(Reply(id=cmd_id, publish=Empty()))

    async def _history(self, cmd_id: int, req: HistoryRequest) -> bytes:
        pubs, top = await commands.history(
            self.options.access, self.hub, self._caller(), req, subscribed=self._holds(req.channel)
        )
        result = HistoryResult(
            publications=self.wire.publications(pubs), epoch=top.epoch, offset=top.offset
        )
        return self.wire.encode_reply(Reply(id=cmd_id, history=result))

    async def _presence(self, cmd_id: int, req: ChannelRequest) -> bytes:
        result = await commands.presence(
            self.options.access, self.hub, self._caller(), req, subscribed=self._holds(req.channel)
        )
        return self.wire.encode_reply(Reply(id=cmd_id, presence=result))

    async def _presence_stats(self, cmd_id: int, req: ChannelRequest) -> bytes:
        result = await commands.presence_stats(
            self.options.access, self.hub, self._caller(), req, subscribed=self._holds(req.channel)
        )
        return self.wire.encode_reply(Reply(id=cmd_id, presence_stats=result))

    def _holds(self, channel: str) -> bool:
        """Whether this connection is subscribed to ``channel`` (the "subscribers" rules)."""
        return self.channels is not None and channel in self.channels

    async def _rpc(self, cmd_id: int, req: RPCRequest) -> bytes:
        """The application's handler of ``req.method`` answers (108 without one)."""
        result = await commands.rpc(self.options.doors().hooks, self._caller(), req)
        return self.wire.encode_reply(Reply(id=cmd_id, rpc=result))

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
        held = self.grants.get(req.channel) if self.grants is not None else None
        if held is not None and held.by_hook:
            # The hook's lifetime is the server's to extend (sub_refresh hook), and
            # its presence/join_leave overrides must stay for the leave to match.
            grant = (
                held
                if grant is None
                else grant._replace(presence=held.presence, join_leave=held.join_leave)
            )
        self._remember_grant(req.channel, grant)
        expires, ttl = _ttl(grant.expires if grant is not None and not grant.by_hook else 0)
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
