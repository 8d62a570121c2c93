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
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from .auth import PRESENCE_OFF, Access
from .centrifuge.schema import presence_entries
from .codec import CentrifugoPublication
from .errors import BrokerUnavailable, DisconnectCode, ErrorCode, ProtocolError
from .http import Response, Router, error_response, json_response
from .hub import EMPTY, Hub, Position
from .logs import log_client_error
from .utf8 import check_utf8, invalid_utf8_field

if TYPE_CHECKING:
    from .http import Exchange, Request

log = logging.getLogger(__name__)

#: What ``info`` reports about this node; given by whoever runs the node.
NodeInfo = Callable[[], dict[str, Any]]

#: Centrifugo's types: an offset is a uint64 (bounded at 2**63 - 1, the most
#: msgspec checks), a history limit an int32.
Offset = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Limit = Annotated[int, msgspec.Meta(le=2**31 - 1)]


class _Body(msgspec.Struct):
    """Method parameters; unknown fields are ignored, as Centrifugo does."""


class PublishParams(_Body):
    channel: str
    data: msgspec.Raw
    tags: dict[str, str] | None = None


class BroadcastParams(_Body):
    channels: list[str]
    data: msgspec.Raw
    tags: dict[str, str] | None = None


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


Method = Callable[[Any], Awaitable[dict[str, Any]]]

#: Centrifugo's precedence when one batch command carries several methods.
BATCH_ORDER = (
    "publish",
    "broadcast",
    "unsubscribe",
    "disconnect",
    "history",
    "presence",
    "presence_stats",
    "info",
    "channels",
)

#: What a batch runs: a method's reply key, entry and decoded parameters; or an
#: error reply already decided while decoding (an empty or unknown command).
_BatchItem = tuple[str, Method, Any] | dict[str, Any]


class ServerAPI:
    """The ``/api/`` methods, over the hub and the access rules they are given."""

    def __init__(
        self,
        hub: Hub,
        access: Access,
        api_key: str,
        node_info: NodeInfo,
        *,
        max_batch_commands: int = 1000,
    ) -> None:
        self.hub = hub
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
            "info": (InfoParams, self.info),
        }
        assert set(BATCH_ORDER) == set(self.methods)
        self._decoders = {
            name: msgspec.json.Decoder(params) for name, (params, _) in self.methods.items()
        }
        self._batch_decoder = msgspec.json.Decoder(BatchParams)

    def mount(self, router: Router) -> None:
        router.add_prefix("POST", "/api/", self.handle)

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
        entry = self.methods.get(name)
        if entry is None:
            return error_response(404, f"method not found: {name}")
        try:
            params = decode_params(self._decoders[name], request.body or b"{}")
        except ProtocolError as exc:
            log_client_error(log, "bad API request from %s: %s", conn.client, exc.message)
            return error_response(exc)
        try:
            result = await entry[1](params)
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
        params = decode_params(self._decoders[name], bytes(command[name]))
        return name, self.methods[name][1], params

    @staticmethod
    async def _run_batch_item(item: _BatchItem) -> dict[str, Any]:
        if isinstance(item, dict):
            return item
        name, method, params = item
        try:
            return {name: await method(params)}
        except ProtocolError as exc:
            return _error_reply(exc)

    def _known(self, channel: str) -> None:
        """Refuse a bad name (107) or a channel of an unknown namespace (102), as
        every transport does."""
        self.access.policy(channel)

    async def publish(self, params: PublishParams) -> dict[str, Any]:
        self._known(params.channel)
        position = await self.hub.publish(params.channel, bytes(params.data), tags=params.tags)
        return {"offset": position.offset, "epoch": position.epoch}

    async def broadcast(self, params: BroadcastParams) -> dict[str, Any]:
        if not params.channels:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "channels is empty")
        data = bytes(params.data)
        responses: list[dict[str, Any]] = []
        for channel in params.channels:
            try:
                self._known(channel)
                position = await self.hub.publish(channel, data, tags=params.tags)
            except ProtocolError as exc:
                responses.append(_error_reply(exc))
            else:
                responses.append({"result": {"offset": position.offset, "epoch": position.epoch}})
        return {"responses": responses}

    async def history(self, params: HistoryParams) -> dict[str, Any]:
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
        return {
            "publications": [CentrifugoPublication.of(pub) for pub in pubs],
            "epoch": top.epoch,
            "offset": top.offset,
        }

    def _check_presence(self, channel: str) -> None:
        self._known(channel)
        if not self.access.policy(channel).presence:
            raise ProtocolError(ErrorCode.NOT_AVAILABLE, PRESENCE_OFF)

    async def presence(self, params: ChannelParams) -> dict[str, Any]:
        self._check_presence(params.channel)
        return {"presence": presence_entries(await self.hub.presence(params.channel))}

    async def presence_stats(self, params: ChannelParams) -> dict[str, Any]:
        self._check_presence(params.channel)
        clients, users = await self.hub.presence_stats(params.channel)
        return {"num_clients": clients, "num_users": users}

    async def disconnect(self, params: DisconnectParams) -> dict[str, Any]:
        """Close the user's connections on every transport (on this node)."""
        if not 3000 <= params.disconnect.code <= 4999:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "disconnect code must be in 3000-4999")
        for client in self.hub.clients_of(params.user, params.client):
            client.close(params.disconnect.code, params.disconnect.reason)
        return {}

    async def unsubscribe(self, params: UnsubscribeParams) -> dict[str, Any]:
        """Take the user out of a channel on every transport (on this node)."""
        self.access.validate_channel(params.channel)
        for client in self.hub.clients_of(params.user, params.client):
            client.server_unsubscribe(params.channel)
        return {}

    async def channels(self, params: ChannelsParams) -> dict[str, Any]:
        pattern = params.pattern
        return {
            "channels": {
                name: {"num_clients": count}
                for name, count in self.hub.channels()
                if not pattern or fnmatch.fnmatchcase(name, pattern)
            }
        }

    async def info(self, params: InfoParams) -> dict[str, Any]:
        return {"nodes": [self.node_info()]}


def _error_reply(exc: ProtocolError) -> dict[str, Any]:
    """A call that parsed but could not be served: ``{"error": {"code", "message"}}``."""
    return {"error": {"code": int(exc.code), "message": exc.message}}


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
