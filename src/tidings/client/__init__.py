"""Python clients of tidings: the server API client and an async subscriber.

Needs the ``client`` extra (``pip install 'tidings[client]'``) for httpx::

    from tidings.client import APIClient, subscribe

    async with APIClient("http://localhost:8000", api_key="s3cret") as api:
        result = await api.publish("news", {"text": "hello"})

    async for pub in subscribe("http://localhost:8000", ["news"], transport="ws"):
        print(pub.channel, pub.offset, pub.data)
"""

from __future__ import annotations

from .api import (
    APIClient,
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
    SyncAPIClient,
)
from .subscriber import Publication, SubscriptionClosed, decode_cursor, encode_cursor, subscribe

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
    "SubscriptionClosed",
    "SyncAPIClient",
    "decode_cursor",
    "encode_cursor",
    "subscribe",
]
