"""The server API's methods without I/O: what each call sends, and how its answer reads.

Each method (``publish``, ``history``, ...) is written once here, as a
function returning a :class:`Call`: the API method name, its parameters, and
``read``, which turns the HTTP status and body of the answer into the typed
result or raises :class:`APIError`. The clients in :mod:`tidings.client.api`
(httpx, async and sync) and ``tidings publish`` (the standard library's
``urllib``) only send a call's bytes and hand the answer to ``read`` — the
shape of ``httpx`` itself, whose ``Client`` and ``AsyncClient`` share request
building and response handling and differ only in how they wait.

Nothing here needs httpx, so the CLI works without the ``client`` extra.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

__all__ = [
    "APIError",
    "Call",
    "ChannelInfo",
    "ChannelsResult",
    "ClientInfo",
    "Endpoint",
    "HistoryPublication",
    "HistoryResult",
    "InfoResult",
    "NodeInfo",
    "PresenceResult",
    "PresenceStatsResult",
    "PublishResult",
    "batch",
    "broadcast",
    "call",
    "channels",
    "disconnect",
    "history",
    "info",
    "presence",
    "presence_stats",
    "publish",
    "unsubscribe",
]

T = TypeVar("T")
R = TypeVar("R")


class APIError(Exception):
    """An error answer of the server API: ``code`` is the server's, ``status`` the HTTP one."""

    def __init__(self, code: int, message: str, status: int = 200) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


class _Result(msgspec.Struct, kw_only=True):
    pass


class PublishResult(_Result):
    offset: int = 0
    epoch: str = ""


class ClientInfo(_Result):
    user: str = ""
    client: str = ""
    conn_info: Any = None
    chan_info: Any = None


class HistoryPublication(_Result):
    data: Any = None
    offset: int = 0
    info: ClientInfo | None = None
    tags: dict[str, str] | None = None
    time: int | None = None


class HistoryResult(_Result):
    publications: list[HistoryPublication] = msgspec.field(default_factory=list)
    epoch: str = ""
    offset: int = 0


class PresenceResult(_Result):
    presence: dict[str, ClientInfo] = msgspec.field(default_factory=dict)


class PresenceStatsResult(_Result):
    num_clients: int = 0
    num_users: int = 0


class ChannelInfo(_Result):
    num_clients: int = 0


class ChannelsResult(_Result):
    channels: dict[str, ChannelInfo] = msgspec.field(default_factory=dict)


class NodeInfo(_Result):
    uid: str = ""
    name: str = ""
    version: str = ""
    num_clients: int = 0
    #: Realtime clients by transport (``websocket``, ``sse``, ``longpoll``, ...).
    clients_by_transport: dict[str, int] = msgspec.field(default_factory=dict)
    num_channels: int = 0
    uptime: int = 0


class InfoResult(_Result):
    nodes: list[NodeInfo] = msgspec.field(default_factory=list)


class _Empty(_Result):
    pass


class _ErrorBody(msgspec.Struct):
    code: int = 0
    message: str = ""


class _BroadcastItem(msgspec.Struct):
    result: PublishResult | None = None
    error: _ErrorBody | None = None


class _BroadcastResult(_Result):
    responses: list[_BroadcastItem] = msgspec.field(default_factory=list)


_encode = msgspec.json.Encoder().encode


class Endpoint:
    """Where calls go and the headers they carry: the server's URL and API key."""

    __slots__ = ("base", "headers")

    def __init__(self, url: str, api_key: str | None) -> None:
        self.base = url.rstrip("/") + "/api/"
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["X-API-Key"] = api_key

    def url(self, call: Call[Any]) -> str:
        return self.base + call.method


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One API call: ``POST /api/<method>`` with ``params`` as JSON; ``read`` decodes the answer.

    ``read(status, body)`` returns the result or raises :class:`APIError`
    (the server's error, or code 0 for an answer that is not the API's).
    """

    method: str
    params: dict[str, Any]
    read: Callable[[int, bytes], T]

    def body(self) -> bytes:
        return _encode(self.params)


def _result(status: int, body: bytes, result_type: type[T]) -> T:
    """The ``result`` of an answer as ``result_type``; :class:`APIError` for an ``error``."""

    def unexpected(prefix: str) -> APIError:
        return APIError(0, prefix + body.decode(errors="replace")[:200], status)

    try:
        decoded = msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise unexpected(f"HTTP {status}: ") from None
    if not isinstance(decoded, dict):
        raise unexpected("unexpected answer: ")
    error = decoded.get("error")
    if error is not None:
        err = msgspec.convert(error, _ErrorBody)
        raise APIError(err.code, err.message, status)
    if status != 200 or "result" not in decoded:
        raise unexpected(f"HTTP {status}: ")
    return msgspec.convert(decoded["result"], result_type)


def _params(**kw: Any) -> dict[str, Any]:
    """Only the parameters given: an option left unset is left out, for the server's default."""
    return {k: v for k, v in kw.items() if v is not None}


def call(method: str, params: dict[str, Any], result_type: type[T]) -> Call[T]:
    """Any API method: POST ``params`` and decode the result as ``result_type``."""
    return Call(method, params, lambda status, body: _result(status, body, result_type))


def _then(
    method: str, params: dict[str, Any], result_type: type[R], convert: Callable[[R], T]
) -> Call[T]:
    """A call whose decoded result is reshaped by ``convert`` before it is returned."""
    return Call(method, params, lambda status, body: convert(_result(status, body, result_type)))


def publish(channel: str, data: Any, *, tags: dict[str, str] | None = None) -> Call[PublishResult]:
    return call("publish", _params(channel=channel, data=data, tags=tags), PublishResult)


def _broadcast_results(res: _BroadcastResult) -> list[PublishResult | APIError]:
    out: list[PublishResult | APIError] = []
    for item in res.responses:
        if item.error is not None:
            out.append(APIError(item.error.code, item.error.message))
        else:
            out.append(item.result or PublishResult())
    return out


def broadcast(
    channels: list[str], data: Any, *, tags: dict[str, str] | None = None
) -> Call[list[PublishResult | APIError]]:
    """One result per channel, in order: a :class:`PublishResult` or an :class:`APIError`."""
    params = _params(channels=channels, data=data, tags=tags)
    return _then("broadcast", params, _BroadcastResult, _broadcast_results)


def history(
    channel: str,
    *,
    limit: int | None = None,
    since: tuple[str, int] | None = None,
    reverse: bool = False,
) -> Call[HistoryResult]:
    """``limit``: None/0 position only, -1 all, N at most N. ``since``: ``(epoch, offset)``."""
    since_obj = {"epoch": since[0], "offset": since[1]} if since is not None else None
    params = _params(channel=channel, limit=limit, since=since_obj, reverse=reverse or None)
    return call("history", params, HistoryResult)


def presence(channel: str) -> Call[PresenceResult]:
    return call("presence", {"channel": channel}, PresenceResult)


def presence_stats(channel: str) -> Call[PresenceStatsResult]:
    return call("presence_stats", {"channel": channel}, PresenceStatsResult)


def channels(pattern: str | None = None) -> Call[ChannelsResult]:
    return call("channels", _params(pattern=pattern), ChannelsResult)


def info() -> Call[InfoResult]:
    return call("info", {}, InfoResult)


def _nothing(_: _Empty) -> None:
    return None


def disconnect(
    user: str, *, client: str | None = None, code: int | None = None, reason: str | None = None
) -> Call[None]:
    params = _params(user=user, client=client, disconnect=_params(code=code, reason=reason) or None)
    return _then("disconnect", params, _Empty, _nothing)


def unsubscribe(user: str, channel: str, *, client: str | None = None) -> Call[None]:
    params = _params(user=user, channel=channel, client=client)
    return _then("unsubscribe", params, _Empty, _nothing)


def batch(calls: Sequence[Call[Any]], *, parallel: bool = False) -> Call[list[Any]]:
    """Several calls in one request (``POST /api/batch``), answered in order.

    Each element of the result is what that call alone would return, or the
    :class:`APIError` it would raise (one failed command does not fail the
    others): each reply is read by its own call's ``read``, so a method's
    answer is decoded in one place whether it comes alone or in a batch. An
    error of the batch itself (too many commands, a malformed one) raises.
    """
    pending = tuple(calls)
    commands = [{c.method: c.params} for c in pending]

    def read(status: int, body: bytes) -> list[Any]:
        replies = _batch_replies(status, body, len(pending))
        return [_read_reply(c, reply) for c, reply in zip(pending, replies, strict=True)]

    return Call("batch", {"commands": commands, "parallel": parallel}, read)


def _batch_replies(status: int, body: bytes, count: int) -> list[dict[str, Any]]:
    """The ``replies`` of a batch answer, one object per command; raises as :func:`_result`."""
    try:
        decoded = msgspec.json.decode(body)
    except msgspec.DecodeError:
        decoded = None
    if isinstance(decoded, dict) and "error" in decoded:
        err = msgspec.convert(decoded["error"], _ErrorBody)
        raise APIError(err.code, err.message, status)
    replies = decoded.get("replies") if isinstance(decoded, dict) else None
    if (
        status != 200
        or not isinstance(replies, list)
        or len(replies) != count
        or not all(isinstance(reply, dict) for reply in replies)
    ):
        raise APIError(0, f"HTTP {status}: " + body.decode(errors="replace")[:200], status)
    return replies


def _read_reply(call_: Call[Any], reply: dict[str, Any]) -> Any:
    """One batch reply, as its call reads a lone answer: the result, or the APIError."""
    if "error" in reply:
        answer = {"error": reply["error"]}
    else:
        answer = {"result": reply.get(call_.method, {})}
    try:
        return call_.read(200, _encode(answer))
    except APIError as exc:
        return exc
