"""tidings: a realtime event server for Python.

A backend publishes an event to a channel; tidings pushes it to every
subscriber over WebSocket, Server-Sent Events, long-polling or polling, with
history that lets a client that dropped off get exactly what it missed.

The public names of the Python API are here: :class:`Tidings` (serve inside
your program's event loop, register hooks, publish without HTTP), the calls
and replies its hooks see and return, the events, and the errors to catch.
"""

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:
    from .api import (
        BroadcastResponse,
        BroadcastResult,
        ChannelInfo,
        ChannelsResult,
        Error,
        HistoryResult,
        InfoResult,
        NodeInfo,
        PublishResult,
        StreamPosition,
    )
    from .app import Tidings
    from .centrifuge.schema import PresenceInfo, PresenceResult, PresenceStatsResult
    from .codec import CentrifugoPublication
    from .config import Config
    from .errors import BrokerUnavailable, ConfigError, DisconnectCode, ErrorCode, ProtocolError
    from .hooks import (
        KEEP,
        ChannelEvent,
        ConnectCall,
        ConnectReply,
        Disconnect,
        DisconnectEvent,
        Event,
        MemberEvent,
        PublicationEvent,
        PublishCall,
        PublishReply,
        RefreshCall,
        RefreshReply,
        Refuse,
        RPCCall,
        SubRefreshCall,
        SubRefreshReply,
        SubscribeCall,
        SubscribeReply,
    )

#: Where each public name lives. They are imported on first use (PEP 562),
#: not here: ``tidings.Tidings`` builds on the whole server, and importing it
#: with the package made ``import tidings.client`` and ``tidings publish``
#: load it too (0.50 s instead of 0.16 s for ``import tidings.client``).
_HOMES = {
    "BroadcastResponse": ".api",
    "BroadcastResult": ".api",
    "ChannelInfo": ".api",
    "ChannelsResult": ".api",
    "Error": ".api",
    "HistoryResult": ".api",
    "InfoResult": ".api",
    "NodeInfo": ".api",
    "PublishResult": ".api",
    "StreamPosition": ".api",
    "Tidings": ".app",
    "PresenceInfo": ".centrifuge.schema",
    "PresenceResult": ".centrifuge.schema",
    "PresenceStatsResult": ".centrifuge.schema",
    "CentrifugoPublication": ".codec",
    "Config": ".config",
    "BrokerUnavailable": ".errors",
    "ConfigError": ".errors",
    "DisconnectCode": ".errors",
    "ErrorCode": ".errors",
    "ProtocolError": ".errors",
    "ChannelEvent": ".hooks",
    "ConnectCall": ".hooks",
    "ConnectReply": ".hooks",
    "Disconnect": ".hooks",
    "DisconnectEvent": ".hooks",
    "Event": ".hooks",
    "KEEP": ".hooks",
    "MemberEvent": ".hooks",
    "PublicationEvent": ".hooks",
    "PublishCall": ".hooks",
    "PublishReply": ".hooks",
    "RPCCall": ".hooks",
    "RefreshCall": ".hooks",
    "RefreshReply": ".hooks",
    "Refuse": ".hooks",
    "SubRefreshCall": ".hooks",
    "SubRefreshReply": ".hooks",
    "SubscribeCall": ".hooks",
    "SubscribeReply": ".hooks",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'tidings' has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "KEEP",
    "BroadcastResponse",
    "BroadcastResult",
    "BrokerUnavailable",
    "CentrifugoPublication",
    "ChannelEvent",
    "ChannelInfo",
    "ChannelsResult",
    "Config",
    "ConfigError",
    "ConnectCall",
    "ConnectReply",
    "Disconnect",
    "DisconnectCode",
    "DisconnectEvent",
    "Error",
    "ErrorCode",
    "Event",
    "HistoryResult",
    "InfoResult",
    "MemberEvent",
    "NodeInfo",
    "PresenceInfo",
    "PresenceResult",
    "PresenceStatsResult",
    "ProtocolError",
    "PublicationEvent",
    "PublishCall",
    "PublishReply",
    "PublishResult",
    "RPCCall",
    "RefreshCall",
    "RefreshReply",
    "Refuse",
    "StreamPosition",
    "SubRefreshCall",
    "SubRefreshReply",
    "SubscribeCall",
    "SubscribeReply",
    "Tidings",
    "__version__",
]
