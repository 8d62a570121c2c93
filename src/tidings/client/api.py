"""A client of the server API (``POST /api/<method>``), async and sync, with typed results.

Every method returns a msgspec Struct, or raises :class:`APIError` carrying the
server's error code (Centrifugo numbering: 101 unauthorized, 107 bad request,
108 not available, 112 unrecoverable position, ...)::

    async with APIClient("http://localhost:8000", api_key="s3cret") as api:
        res = await api.publish("news", {"text": "hello"})   # PublishResult(offset, epoch)

    with SyncAPIClient("http://localhost:8000") as api:
        print(api.history("news", limit=-1).publications)
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

try:
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("tidings.client needs httpx: pip install 'tidings[client]'") from exc

__all__ = [
    "APIClient",
    "APIError",
    "ChannelInfo",
    "ChannelsResult",
    "ClientInfo",
    "HistoryPublication",
    "HistoryResult",
    "InfoResult",
    "NodeInfo",
    "PresenceResult",
    "PresenceStatsResult",
    "PublishResult",
    "SyncAPIClient",
]

T = TypeVar("T")


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


def _params(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


def _parse(response: httpx.Response, result_type: type[T]) -> T:
    """The ``result`` of an answer as ``result_type``; :class:`APIError` for an ``error``."""
    try:
        body = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        raise APIError(
            0, f"HTTP {response.status_code}: {response.text[:200]}", response.status_code
        ) from None
    if not isinstance(body, dict):
        raise APIError(0, f"unexpected answer: {response.text[:200]}", response.status_code)
    error = body.get("error")
    if error is not None:
        err = msgspec.convert(error, _ErrorBody)
        raise APIError(err.code, err.message, response.status_code)
    if response.status_code != 200 or "result" not in body:
        raise APIError(
            0, f"HTTP {response.status_code}: {response.text[:200]}", response.status_code
        )
    return msgspec.convert(body["result"], result_type)


def _broadcast_results(res: _BroadcastResult) -> list[PublishResult | APIError]:
    out: list[PublishResult | APIError] = []
    for item in res.responses:
        if item.error is not None:
            out.append(APIError(item.error.code, item.error.message))
        else:
            out.append(item.result or PublishResult())
    return out


class _Requests:
    """What both clients share: URLs, headers and the parameters of each method."""

    def __init__(self, url: str, api_key: str | None) -> None:
        self.base = url.rstrip("/") + "/api/"
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["X-API-Key"] = api_key

    @staticmethod
    def history_params(
        channel: str, limit: int | None, since: tuple[str, int] | None, reverse: bool
    ) -> dict[str, Any]:
        since_obj = {"epoch": since[0], "offset": since[1]} if since is not None else None
        return _params(channel=channel, limit=limit, since=since_obj, reverse=reverse or None)

    @staticmethod
    def disconnect_params(
        user: str, client: str | None, code: int | None, reason: str | None
    ) -> dict[str, Any]:
        disconnect = _params(code=code, reason=reason) or None
        return _params(user=user, client=client, disconnect=disconnect)


class APIClient:
    """The server API over HTTP, async (httpx). Use as ``async with`` or call :meth:`aclose`."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._req = _Requests(url, api_key)
        self._own = client is None
        self._http = client or httpx.AsyncClient(timeout=timeout)

    async def __aenter__(self) -> APIClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own:
            await self._http.aclose()

    async def call(self, method: str, params: dict[str, Any], result_type: type[T]) -> T:
        """Any API method: POST ``params`` and decode the result as ``result_type``."""
        resp = await self._http.post(
            self._req.base + method, content=_encode(params), headers=self._req.headers
        )
        return _parse(resp, result_type)

    async def publish(
        self, channel: str, data: Any, *, tags: dict[str, str] | None = None
    ) -> PublishResult:
        return await self.call(
            "publish", _params(channel=channel, data=data, tags=tags), PublishResult
        )

    async def broadcast(
        self, channels: list[str], data: Any, *, tags: dict[str, str] | None = None
    ) -> list[PublishResult | APIError]:
        """One result per channel, in order: a :class:`PublishResult` or an :class:`APIError`."""
        res = await self.call(
            "broadcast", _params(channels=channels, data=data, tags=tags), _BroadcastResult
        )
        return _broadcast_results(res)

    async def history(
        self,
        channel: str,
        *,
        limit: int | None = None,
        since: tuple[str, int] | None = None,
        reverse: bool = False,
    ) -> HistoryResult:
        """``limit``: None/0 position only, -1 all, N at most N. ``since``: ``(epoch, offset)``."""
        params = self._req.history_params(channel, limit, since, reverse)
        return await self.call("history", params, HistoryResult)

    async def presence(self, channel: str) -> PresenceResult:
        return await self.call("presence", {"channel": channel}, PresenceResult)

    async def presence_stats(self, channel: str) -> PresenceStatsResult:
        return await self.call("presence_stats", {"channel": channel}, PresenceStatsResult)

    async def channels(self, pattern: str | None = None) -> ChannelsResult:
        return await self.call("channels", _params(pattern=pattern), ChannelsResult)

    async def info(self) -> InfoResult:
        return await self.call("info", {}, InfoResult)

    async def disconnect(
        self,
        user: str,
        *,
        client: str | None = None,
        code: int | None = None,
        reason: str | None = None,
    ) -> None:
        params = self._req.disconnect_params(user, client, code, reason)
        await self.call("disconnect", params, _Empty)

    async def unsubscribe(self, user: str, channel: str, *, client: str | None = None) -> None:
        params = _params(user=user, channel=channel, client=client)
        await self.call("unsubscribe", params, _Empty)


class SyncAPIClient:
    """The same API, blocking (httpx). Use as ``with`` or call :meth:`close`."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        client: httpx.Client | None = None,
    ) -> None:
        self._req = _Requests(url, api_key)
        self._own = client is None
        self._http = client or httpx.Client(timeout=timeout)

    def __enter__(self) -> SyncAPIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own:
            self._http.close()

    def call(self, method: str, params: dict[str, Any], result_type: type[T]) -> T:
        resp = self._http.post(
            self._req.base + method, content=_encode(params), headers=self._req.headers
        )
        return _parse(resp, result_type)

    def publish(
        self, channel: str, data: Any, *, tags: dict[str, str] | None = None
    ) -> PublishResult:
        return self.call("publish", _params(channel=channel, data=data, tags=tags), PublishResult)

    def broadcast(
        self, channels: list[str], data: Any, *, tags: dict[str, str] | None = None
    ) -> list[PublishResult | APIError]:
        res = self.call(
            "broadcast", _params(channels=channels, data=data, tags=tags), _BroadcastResult
        )
        return _broadcast_results(res)

    def history(
        self,
        channel: str,
        *,
        limit: int | None = None,
        since: tuple[str, int] | None = None,
        reverse: bool = False,
    ) -> HistoryResult:
        params = self._req.history_params(channel, limit, since, reverse)
        return self.call("history", params, HistoryResult)

    def presence(self, channel: str) -> PresenceResult:
        return self.call("presence", {"channel": channel}, PresenceResult)

    def presence_stats(self, channel: str) -> PresenceStatsResult:
        return self.call("presence_stats", {"channel": channel}, PresenceStatsResult)

    def channels(self, pattern: str | None = None) -> ChannelsResult:
        return self.call("channels", _params(pattern=pattern), ChannelsResult)

    def info(self) -> InfoResult:
        return self.call("info", {}, InfoResult)

    def disconnect(
        self,
        user: str,
        *,
        client: str | None = None,
        code: int | None = None,
        reason: str | None = None,
    ) -> None:
        self.call("disconnect", self._req.disconnect_params(user, client, code, reason), _Empty)

    def unsubscribe(self, user: str, channel: str, *, client: str | None = None) -> None:
        self.call("unsubscribe", _params(user=user, channel=channel, client=client), _Empty)
