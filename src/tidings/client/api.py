"""A client of the server API (``POST /api/<method>``), async and sync, with typed results.

Every method returns a msgspec Struct, or raises :class:`APIError` carrying the
server's error code (Centrifugo numbering: 101 unauthorized, 107 bad request,
108 not available, 112 unrecoverable position, ...)::

    async with APIClient("http://localhost:8000", api_key="s3cret") as api:
        res = await api.publish("news", {"text": "hello"})   # PublishResult(offset, epoch)

    with SyncAPIClient("http://localhost:8000") as api:
        print(api.history("news", limit=-1).publications)

Both classes are thin shells over :mod:`tidings.client.calls`, where each
method's parameters and answer decoding are written once: a method here only
sends the :class:`~tidings.client.calls.Call` it gets there, with
``httpx.AsyncClient`` or ``httpx.Client``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

try:
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("tidings.client needs httpx: pip install 'tidings[client]'") from exc

from . import calls
from .calls import (
    APIError,
    Call,
    ChannelInfo,
    ChannelsResult,
    ClientInfo,
    Endpoint,
    HistoryPublication,
    HistoryResult,
    InfoResult,
    NodeInfo,
    PresenceResult,
    PresenceStatsResult,
    PublishResult,
)

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
        self._endpoint = Endpoint(url, api_key)
        self._own = client is None
        self._http = client or httpx.AsyncClient(timeout=timeout)

    async def __aenter__(self) -> APIClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own:
            await self._http.aclose()

    async def send(self, call: Call[T]) -> T:
        """Send a :class:`~tidings.client.calls.Call` and return its decoded result."""
        response = await self._http.post(
            self._endpoint.url(call), content=call.body(), headers=self._endpoint.headers
        )
        return call.read(response.status_code, response.content)

    async def call(self, method: str, params: dict[str, Any], result_type: type[T]) -> T:
        """Any API method: POST ``params`` and decode the result as ``result_type``."""
        return await self.send(calls.call(method, params, result_type))

    async def publish(
        self, channel: str, data: Any, *, tags: dict[str, str] | None = None
    ) -> PublishResult:
        return await self.send(calls.publish(channel, data, tags=tags))

    async def broadcast(
        self, channels: list[str], data: Any, *, tags: dict[str, str] | None = None
    ) -> list[PublishResult | APIError]:
        """One result per channel, in order: a :class:`PublishResult` or an :class:`APIError`."""
        return await self.send(calls.broadcast(channels, data, tags=tags))

    async def batch(self, commands: Sequence[Call[Any]], *, parallel: bool = False) -> list[Any]:
        """Several calls in one request, e.g. ``[calls.publish(...), calls.history(...)]``:
        each call's result or :class:`APIError`, in order (see :func:`calls.batch`)."""
        return await self.send(calls.batch(commands, parallel=parallel))

    async def history(
        self,
        channel: str,
        *,
        limit: int | None = None,
        since: tuple[str, int] | None = None,
        reverse: bool = False,
    ) -> HistoryResult:
        """``limit``: None/0 position only, -1 all, N at most N. ``since``: ``(epoch, offset)``."""
        return await self.send(calls.history(channel, limit=limit, since=since, reverse=reverse))

    async def presence(self, channel: str) -> PresenceResult:
        return await self.send(calls.presence(channel))

    async def presence_stats(self, channel: str) -> PresenceStatsResult:
        return await self.send(calls.presence_stats(channel))

    async def channels(self, pattern: str | None = None) -> ChannelsResult:
        return await self.send(calls.channels(pattern))

    async def info(self) -> InfoResult:
        return await self.send(calls.info())

    async def disconnect(
        self,
        user: str,
        *,
        client: str | None = None,
        code: int | None = None,
        reason: str | None = None,
    ) -> None:
        await self.send(calls.disconnect(user, client=client, code=code, reason=reason))

    async def unsubscribe(self, user: str, channel: str, *, client: str | None = None) -> None:
        await self.send(calls.unsubscribe(user, channel, client=client))


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
        self._endpoint = Endpoint(url, api_key)
        self._own = client is None
        self._http = client or httpx.Client(timeout=timeout)

    def __enter__(self) -> SyncAPIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own:
            self._http.close()

    def send(self, call: Call[T]) -> T:
        """Send a :class:`~tidings.client.calls.Call` and return its decoded result."""
        response = self._http.post(
            self._endpoint.url(call), content=call.body(), headers=self._endpoint.headers
        )
        return call.read(response.status_code, response.content)

    def call(self, method: str, params: dict[str, Any], result_type: type[T]) -> T:
        """Any API method: POST ``params`` and decode the result as ``result_type``."""
        return self.send(calls.call(method, params, result_type))

    def publish(
        self, channel: str, data: Any, *, tags: dict[str, str] | None = None
    ) -> PublishResult:
        return self.send(calls.publish(channel, data, tags=tags))

    def broadcast(
        self, channels: list[str], data: Any, *, tags: dict[str, str] | None = None
    ) -> list[PublishResult | APIError]:
        """One result per channel, in order: a :class:`PublishResult` or an :class:`APIError`."""
        return self.send(calls.broadcast(channels, data, tags=tags))

    def batch(self, commands: Sequence[Call[Any]], *, parallel: bool = False) -> list[Any]:
        """Several calls in one request, e.g. ``[calls.publish(...), calls.history(...)]``:
        each call's result or :class:`APIError`, in order (see :func:`calls.batch`)."""
        return self.send(calls.batch(commands, parallel=parallel))

    def history(
        self,
        channel: str,
        *,
        limit: int | None = None,
        since: tuple[str, int] | None = None,
        reverse: bool = False,
    ) -> HistoryResult:
        """``limit``: None/0 position only, -1 all, N at most N. ``since``: ``(epoch, offset)``."""
        return self.send(calls.history(channel, limit=limit, since=since, reverse=reverse))

    def presence(self, channel: str) -> PresenceResult:
        return self.send(calls.presence(channel))

    def presence_stats(self, channel: str) -> PresenceStatsResult:
        return self.send(calls.presence_stats(channel))

    def channels(self, pattern: str | None = None) -> ChannelsResult:
        return self.send(calls.channels(pattern))

    def info(self) -> InfoResult:
        return self.send(calls.info())

    def disconnect(
        self,
        user: str,
        *,
        client: str | None = None,
        code: int | None = None,
        reason: str | None = None,
    ) -> None:
        self.send(calls.disconnect(user, client=client, code=code, reason=reason))

    def unsubscribe(self, user: str, channel: str, *, client: str | None = None) -> None:
        self.send(calls.unsubscribe(user, channel, client=client))
