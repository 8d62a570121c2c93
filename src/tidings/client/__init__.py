"""Python clients of tidings: the server API client and a subscriber (async, or sync).

Needs the ``client`` extra (``pip install 'tidings[client]'``) for httpx::

    from tidings.client import APIClient, subscribe

    async with APIClient("http://localhost:8000", api_key="s3cret") as api:
        result = await api.publish("news", {"text": "hello"})

    async for pub in subscribe("http://localhost:8000", ["news"], transport="ws"):
        print(pub.channel, pub.offset, pub.data)

The modules without I/O — :mod:`.calls` (the API's methods) and :mod:`.sse`
(the event-stream parser) — need no httpx, so that ``tidings publish`` and
``tidings subscribe`` share them without the extra; the two httpx clients are
therefore imported on first use, which is where a missing httpx is reported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .calls import (
    APIError,
    ChannelInfo,
    ChannelsResult,
    ClientInfo,
    HistoryPublication,
    HistoryResult,
    InfoResult,
    NodeInfo,
    PresenceResult,
    PresenceStatsResult,
    PublishResult,
)
from .subscriber import (
    Publication,
    Subscription,
    SubscriptionClosed,
    SyncSubscription,
    decode_cursor,
    encode_cursor,
    subscribe,
    subscribe_sync,
)

if TYPE_CHECKING:
    from .api import APIClient, SyncAPIClient

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
    "Publication",
    "PublishResult",
    "Subscription",
    "SubscriptionClosed",
    "SyncAPIClient",
    "SyncSubscription",
    "decode_cursor",
    "encode_cursor",
    "subscribe",
    "subscribe_sync",
]

_NEED_HTTPX = frozenset({"APIClient", "SyncAPIClient"})


def __getattr__(name: str) -> Any:
    """``APIClient`` and ``SyncAPIClient``, imported (with httpx) when first asked for."""
    if name in _NEED_HTTPX:
        return getattr(importlib.import_module(".api", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
