"""The server API: ``POST /api/<method>`` with a JSON body and an API key.

Shapes follow Centrifugo's HTTP API where they overlap, so its clients (such
as ``cent``) work: ``{"result": {...}}`` on success; a request that parses but
cannot be served is HTTP 200 with ``{"error": {"code", "message"}}``; a body
that is not valid JSON for the method is HTTP 400 with code 107; a wrong key is
HTTP 401 with code 101. An unavailable broker is HTTP 503 with
``Retry-After`` and code 100 (a ``batch`` or ``broadcast`` answers 200, with
code 100 in the replies it concerns, since the others may have succeeded).

Nothing invalid is stored: the body is checked as UTF-8 whole before it is
decoded (``data`` is kept as the raw JSON it arrived as, and msgspec does not
look inside it), and integers are bounded to what the brokers and the SDKs
can hold.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from .auth import PRESENCE_OFF, Access
from .centrifuge.schema import PresenceResult, PresenceStatsResult, presence_entries
from .codec import CentrifugoPublication
from .errors import BrokerUnavailable, DisconnectCode, ErrorCode, ProtocolError
from .http import Response, Router, error_response, json_response
from .hub import EMPTY, Hub, Position
from .logs import log_client_error
from .metrics import Metrics
from .utf8 import check_utf8, invalid_utf8_field

if TYPE_CHECKING:
    from .http import Exchange, Request

log = logging.getLogger(__name__)

#: Centrifugo's types: an offset is a uint64 (bounded at 2**63 - 1, the most
#: msgspec checks), a history limit an int32.
Offset = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Limit = Annotated[int, msgspec.Meta(le=2**31 - 1)]


class _Body(msgspec.Struct):
    """Method parameters; unknown fields are ignored, as Centrifugo does."""


#: Centrifugo leaves the key's length open; a bound keeps the broker's
#: idempotency records small (the body limit would allow a megabyte).
IdempotencyKey = Annotated[str, msgspec.Meta(max_length=256)]
#: A Unix time in seconds (an int64 in Centrifugo's schema).
UnixTime = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class _PublishOptions(_Body, kw_only=True):
    tags: dict[str, str] | None = None
    #: Centrifugo's: a repeat within the broker's window is not published
    #: again, and answers the first publication's position.
    idempotency_key: IdempotencyKey = ""
    #: Centrifugo's: delivered live, not kept in history.
    skip_history: bool = False
    #: Ours: client ids that must not receive the publication.
    exclude: list[str] = msgspec.field(default_factory=list)


class PublishParams(_PublishOptions, kw_only=True):
    channel: str
    data: msgspec.Raw


class BroadcastParams(_PublishOptions, kw_only=True):
    channels: list[str]
    data: msgspec.Raw


class StreamPosition(msgspec.Struct):
    offset: Offset = 0
    epoch: str = ""


class HistoryParams(_Body):
    channel: str
    limit: Limit | None = None
    since: StreamPosition | None = None
    reverse: bool = False


class ChannelParams(_Body):
    channel: str


class DisconnectReason(msgspec.Struct):
    code: int = DisconnectCode.FORCE_DISCONNECT
    reason: str = "force disconnect"


class DisconnectParams(_Body):
    user: str
    client: str = ""
    disconnect: DisconnectReason = msgspec.field(default_factory=DisconnectReason)


class UnsubscribeParams(_Body):
    user: str
    channel: str
    client: str = ""


class SubscribeParams(_Body):
    """Centrifugo's ``subscribe``: the user's live connections join ``channel``.

    Only ``user``, ``channel`` and ``client`` are read; Centrifugo's ``info``,
    ``data``, ``recover_since`` and ``override`` are ignored like any unknown
    field (a server-side subscription here starts at the channel's top).
    """

    user: str
    channel: str
    client: str = ""


class RefreshParams(_Body):
    """Centrifugo's ``refresh``: extend (or end, ``expired``) the user's connections."""

    user: str
    client: str = ""
    expired: bool = False
    #: The new expiry, Unix seconds; 0: never.
    expire_at: UnixTime = 0
    #: New connection info (raw JSON); absent keeps the old one.
    info: msgspec.Raw | None = None


class ChannelsParams(_Body):
    pattern: str = ""


class InfoParams(_Body):
    pass


class BatchParams(_Body):
    """``{"commands": [{"<method>": {params}}, ...], "parallel": bool}``, as Centrifugo.

    Each command stays raw until the whole batch is known to fit the bound,
    then is decoded by its method's decoder; a null command is a bad request.
    """

    commands: list[dict[str, msgspec.Raw] | None] = msgspec.field(default_factory=list)
    parallel: bool = False


# -- results: typed, rendered by the HTTP layer, returned by the Python API --


class Error(msgspec.Struct):
    """An error object: ``{"code": 107, "message": "bad request: ..."}``."""

    code: int
    message: str

    @classmethod
    def of(cls, exc: ProtocolError) -> Error:
        return cls(int(exc.code), exc.message)


class PublishResult(msgspec.Struct):
    """Where the publication went: its offset in the channel's stream and the epoch."""

    offset: int
    epoch: str


class BroadcastResponse(msgspec.Struct, omit_defaults=True):
    """One channel of a broadcast: a ``result`` or an ``error``, never both."""

    result: PublishResult | None = None
    error: Error | None = None


class BroadcastResult(msgspec.Struct):
    #: One response per channel, in the order the channels were given.
    responses: list[BroadcastResponse]


class HistoryResult(msgspec.Struct):
    """Publications (``data`` is the raw JSON published), and the stream's top."""

    publications: list[CentrifugoPublication]
    epoch: str
    offset: int


class ChannelInfo(msgspec.Struct):
    num_clients: int


class ChannelsResult(msgspec.Struct):
    #: Channels with subscribers on this node, by name.
    channels: dict[str, ChannelInfo]


class NodeInfo(msgspec.Struct):
    """One node as ``info`` reports it."""

    uid: str
    name: str
    version: str
    num_clients: int
    num_channels: int
    uptime: int
    #: tidings' own: ``num_clients`` by transport (``websocket``, ``emulation``,
    #: ``sse``, ``longpoll``), which the admin page shows.
    clients_by_transport: dict[str, int] = msgspec.field(default_factory=dict)


class InfoResult(msgspec.Struct):
    nodes: list[NodeInfo]


class Done(msgspec.Struct):
    """The result of a call that only acts (``disconnect``, ``subscribe``, ...): ``{}``."""


DONE = Done()

#: What ``info`` reports about this node; given by whoever runs the node.
NodeInfoSource = Callable[[], NodeInfo]

Method = Callable[[Any], Awaitable[msgspec.Struct]]

#: Centrifugo's precedence when one batch command carries several methods.
BATCH_ORDER = (
    "publish",
    "broadcast",
    "subscribe",
    "unsubscribe",
    "disconnect",
    "history",
    "presence",
    "presence_stats",
    "info",
    "refresh",
    "channels",
)

#: What a batch runs: a method's reply key, entry and decoded parameters; or an
#: error reply already decided while decoding (an empty or unknown command).
_BatchItem = tuple[str, Method, Any] | dict[str, Any]

#: A batch reply: ``{"<method>": result}`` or ``{"error": {...}}``.
_BatchReply = dict[str, msgspec.Struct | dict[str, Any]]


class ServerAPI:
    """The server API's methods, over the hub and the access rules they are given.

    One implementation behind two doors: :meth:`handle` decodes an HTTP
    request and renders the result as JSON; ``tidings.Tidings`` calls the
    same methods in process (after :meth:`decode`, so that its arguments
    pass the same checks). A method takes its decoded parameters and returns
    a typed result, or raises :class:`~tidings.errors.ProtocolError`.
    """

    def __init__(
        self,
        hub: Hub,
        access: Access,
        api_key: str,
        node_info: NodeInfoSource,
        *,
        max_batch_commands: int = 1000,
        metrics: Metrics | None = None,
    ) -> None:
        self.hub = hub
        self.metrics = metrics or Metrics()
        self.access = access
        self.node_info = node_info
        self.max_batch_commands = max_batch_commands
        self._key = api_key.encode()
        self.methods: dict[str, tuple[type[_Body], Method]] = {
            "publish": (PublishParams, self.publish),
            "broadcast": (BroadcastParams, self.broadcast),
            "history": (HistoryParams, self.history),
            "channels": (ChannelsParams, self.channels),
            "presence": (ChannelParams, self.presence),
            "presence_stats": (ChannelParams, self.presence_stats),
            "disconnect": (DisconnectParams, self.disconnect),
            "unsubscribe": (UnsubscribeParams, self.unsubscribe),
            "subscribe": (SubscribeParams, self.subscribe),
            "refresh": (RefreshParams, self.refresh),
            "info": (InfoParams, self.info),
        }
        assert set(BATCH_ORDER) == set(self.methods)
        self._decoders = {
            name: msgspec.json.Decoder(params) for name, (params, _) in self.methods.items()
        }
        self._batch_decoder = msgspec.json.Decoder(BatchParams)

    def mount(self, router: Router) -> None:
        router.add_prefix("POST", "/api/", self.handle)

    def decode(self, method: str, body: bytes) -> Any:
        """``method``'s parameters from a JSON body; a bad one raises the API's 107."""
        return decode_params(self._decoders[method], body)

    def authorized(self, request: Request) -> bool:
        """The API key in constant time; with no key configured, loopback only."""
        if not self._key:
            return request.is_loopback
        given = request.headers.get("x-api-key")
        if given is None:
            scheme, _, value = (request.headers.get("authorization") or "").partition(" ")
            given = value.strip() if scheme.lower() == "apikey" else ""
        return hmac.compare_digest(given.encode(), self._key)

    async def handle(self, request: Request, conn: Exchange) -> Response:
        if not self.authorized(request):
            log_client_error(log, "API request refused from %s: wrong or missing key", conn.client)
            return error_response(401, "unauthorized: missing or wrong API key")
        name = request.path.removeprefix("/api/")
        if name == "batch":
            return await self._handle_batch(request, conn)
        return await self.answer(name, request.body, conn.client)

    async def answer(self, name: str, body: bytes, client: object) -> Response:
        """Run method ``name`` on a JSON ``body`` from an authorized caller; its HTTP answer.

        The one rendering of a call's outcome, for ``/api/`` and for the admin
        page's ``/admin/api/`` (tidings.admin), which authorize differently.
        ``client`` names the caller in logs.
        """
        entry = self.methods.get(name)
        if entry is None:
            return error_response(404, f"method not found: {name}")
        try:
            params = self.decode(name, body or b"{}")
        except ProtocolError as exc:
            log_client_error(log, "bad API request from %s: %s", client, exc.message)
            self._count_error(name, exc)
            return error_response(exc)
        try:
            result = await self._timed(name, entry[1], params)
        except BrokerUnavailable as exc:
            # 503 with Retry-After, same body: the transports' answer to the
            # same fault, which retrying HTTP clients and proxies understand.
            return error_response(exc)
        except ProtocolError as exc:
            return json_response(_error_reply(exc))
        return json_response({"result": result})

    async def _handle_batch(self, request: Request, conn: Exchange) -> Response:
        """``POST /api/batch``: ``{"replies": [...]}``, one reply per command, in order.

        Each reply is ``{"<method>": result}`` or ``{"error": {code, message}}``,
        as in Centrifugo (which answers the batch itself without a ``result``
        wrapper). Every command is decoded before any runs, so a malformed one
        refuses the whole batch (400, 107) with nothing done; more than
        ``limits.max_batch_commands`` commands is 400 with 106. ``parallel``
        runs the commands concurrently; replies keep the commands' order.
        """
        try:
            batch = decode_params(self._batch_decoder, request.body or b"{}")
            if len(batch.commands) > self.max_batch_commands:
                raise ProtocolError(
                    ErrorCode.LIMIT_EXCEEDED,
                    f"more than {self.max_batch_commands} commands in one batch",
                )
            items = [self._batch_item(command) for command in batch.commands]
        except ProtocolError as exc:
            log_client_error(log, "bad API batch from %s: %s", conn.client, exc.message)
            self._count_error("batch", exc)
            return error_response(exc)
        if batch.parallel:
            replies = list(await asyncio.gather(*(self._run_batch_item(i) for i in items)))
        else:
            replies = [await self._run_batch_item(item) for item in items]
        return json_response({"replies": replies})

    def _batch_item(self, command: dict[str, msgspec.Raw] | None) -> _BatchItem:
        """Decode one batch command (raises the batch's 400 on bad parameters)."""
        if not command:
            return _error_reply(ProtocolError(ErrorCode.BAD_REQUEST, "empty command"))
        name = next((name for name in BATCH_ORDER if name in command), None)
        if name is None:
            unknown = ", ".join(sorted(command))
            return _error_reply(
                ProtocolError(ErrorCode.METHOD_NOT_FOUND, f"method not found: {unknown}")
            )
        params = self.decode(name, bytes(command[name]))
        return name, self.methods[name][1], params

    async def _run_batch_item(self, item: _BatchItem) -> _BatchReply:
        if isinstance(item, dict):
            return item
        name, method, params = item
        try:
            return {name: await self._timed(name, method, params)}
        except ProtocolError as exc:
            return _error_reply(exc)

    async def _timed(self, name: str, method: Method, params: Any) -> msgspec.Struct:
        """Run one call, timed (``centrifugo_api_command_duration_seconds``) and its
        error counted (``tidings_api_errors_total``): the one place for both."""
        started = time.perf_counter()
        try:
            return await method(params)
        except ProtocolError as exc:
            self._count_error(name, exc)
            raise
        finally:
            duration = time.perf_counter() - started
            self.metrics.api_command_duration.labels("http", name).observe(duration)

    def _count_error(self, name: str, exc: ProtocolError) -> None:
        self.metrics.api_errors.labels(name, str(int(exc.code))).inc()

    def _known(self, channel: str) -> None:
        """Refuse a bad name (107) or a channel of an unknown namespace (102), as
        every transport does."""
        self.access.policy(channel)

    async def _publish(self, channel: str, data: bytes, options: _PublishOptions) -> PublishResult:
        self._known(channel)
        position = await self.hub.publish(
            channel,
            data,
            tags=options.tags,
            idempotency_key=options.idempotency_key,
            skip_history=options.skip_history,
            exclude=frozenset(options.exclude),
        )
        return PublishResult(position.offset, position.epoch)

    async def publish(self, params: PublishParams) -> PublishResult:
        return await self._publish(params.channel, bytes(params.data), params)

    async def broadcast(self, params: BroadcastParams) -> BroadcastResult:
        """The same data to each channel; a failure of one is its response alone.

        With an ``idempotency_key``, each channel's publication is keyed by it
        (the key is per channel in the broker), as in Centrifugo.
        """
        if not params.channels:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "channels is empty")
        data = bytes(params.data)
        responses: list[BroadcastResponse] = []
        for channel in params.channels:
            try:
                result = await self._publish(channel, data, params)
            except ProtocolError as exc:
                responses.append(BroadcastResponse(error=Error.of(exc)))
            else:
                responses.append(BroadcastResponse(result=result))
        return BroadcastResult(responses)

    async def history(self, params: HistoryParams) -> HistoryResult:
        limit = params.limit or 0
        if limit < -1:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "limit must be -1, 0 or positive")
        self._known(params.channel)
        since = None
        if params.since is not None:
            since = Position(params.since.epoch, params.since.offset)
        pubs, top = await self.hub.history(
            params.channel,
            since=since,
            limit=None if limit == -1 else limit,
            reverse=params.reverse,
        )
        if since is not None and since.epoch != top.epoch and since != EMPTY:
            raise ProtocolError(ErrorCode.UNRECOVERABLE_POSITION)
        return HistoryResult([CentrifugoPublication.of(pub) for pub in pubs], top.epoch, top.offset)

    def _check_presence(self, channel: str) -> None:
        self._known(channel)
        if not self.access.policy(channel).presence:
            raise ProtocolError(ErrorCode.NOT_AVAILABLE, PRESENCE_OFF)

    async def presence(self, params: ChannelParams) -> PresenceResult:
        self._check_presence(params.channel)
        return PresenceResult(presence=presence_entries(await self.hub.presence(params.channel)))

    async def presence_stats(self, params: ChannelParams) -> PresenceStatsResult:
        self._check_presence(params.channel)
        clients, users = await self.hub.presence_stats(params.channel)
        return PresenceStatsResult(num_clients=clients, num_users=users)

    async def disconnect(self, params: DisconnectParams) -> Done:
        """Close the user's connections on every transport (on this node)."""
        if not 3000 <= params.disconnect.code <= 4999:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "disconnect code must be in 3000-4999")
        for client in self.hub.clients_of(params.user, params.client):
            client.close(params.disconnect.code, params.disconnect.reason)
        return DONE

    async def unsubscribe(self, params: UnsubscribeParams) -> Done:
        """Take the user out of a channel on every transport (on this node)."""
        self.access.validate_channel(params.channel)
        for client in self.hub.clients_of(params.user, params.client):
            client.server_unsubscribe(params.channel)
        return DONE

    async def subscribe(self, params: SubscribeParams) -> Done:
        """Subscribe the user's live connections to a channel (on this node).

        The server decides, so no token, hook or namespace rule is asked; the
        channel must be valid and of a known namespace. Connections that
        cannot take a server-side subscription (the HTTP transports, whose
        channels are in their URL) are left as they are, as are connections
        already subscribed. Waits until each connection has joined (its
        ``subscribe`` push is sent), so that a publication made after this
        returns reaches it. A connection that cannot join (its channel limit,
        the broker) does not keep the others out: every one is tried, then
        the first refusal is raised.
        """
        self._known(params.channel)
        clients = self.hub.clients_of(params.user, params.client)
        outcomes = await asyncio.gather(
            *(client.server_subscribe(params.channel) for client in clients),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return DONE

    async def refresh(self, params: RefreshParams) -> Done:
        """Set the expiry (and info) of the user's connections, or end them (``expired``)."""
        info = None if params.info is None else bytes(params.info)
        for client in self.hub.clients_of(params.user, params.client):
            client.server_refresh(params.expire_at, info, params.expired)
        return DONE

    async def channels(self, params: ChannelsParams) -> ChannelsResult:
        pattern = params.pattern
        return ChannelsResult(
            {
                name: ChannelInfo(count)
                for name, count in self.hub.channels()
                if not pattern or fnmatch.fnmatchcase(name, pattern)
            }
        )

    async def info(self, params: InfoParams) -> InfoResult:
        return InfoResult([self.node_info()])


def _error_reply(exc: ProtocolError) -> dict[str, Any]:
    """A call that parsed but could not be served: ``{"error": {"code", "message"}}``."""
    return {"error": Error.of(exc)}


def decode_params(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    """Decode a method's parameters; the one place where decoder errors become the API's 400.

    Invalid UTF-8 anywhere in the body is refused naming the field that holds
    it; what msgspec refuses (malformed JSON, a lone surrogate escape such as
    ``"\\ud800"``, a wrong type, an integer out of range: ``DecodeError`` and
    ``ValidationError``, both ``ValueError``) and nesting past its depth limit
    (``RecursionError``) are a plain bad request. Never a 500.
    """
    try:
        check_utf8(body)
        return decoder.decode(body)
    except UnicodeDecodeError:
        field = invalid_utf8_field(body)
        message = f"invalid UTF-8 in field {field}" if field else "invalid UTF-8 in the body"
    except RecursionError:
        message = "bad request: JSON nested too deeply"
    except ValueError as exc:
        message = f"bad request: {exc}"
    raise ProtocolError(ErrorCode.BAD_REQUEST, message)
