"""What every HTTP connection of one listener shares.

An :class:`~tidings.http.HTTPConnection` is given one :class:`Site` and finds
there everything it consults: the routes, the CORS rule, its limits and
timeouts, and the registry it joins (which also says whether the server is
stopping). One reference per connection, and no way to reach the rest of the
server: the HTTP layer knows nothing of hubs, brokers or tokens.
"""

from __future__ import annotations

from ..config import LimitsConfig, TimeoutsConfig
from ..connections import Connections
from ..logs import AccessLog
from ..metrics import Metrics
from .cors import CORS
from .routing import Router

__all__ = ["Site"]


class Site:
    __slots__ = ("access_log", "connections", "cors", "limits", "metrics", "router", "timeouts")

    def __init__(
        self,
        router: Router,
        cors: CORS,
        limits: LimitsConfig,
        timeouts: TimeoutsConfig,
        connections: Connections,
        access_log: AccessLog | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.router = router
        self.cors = cors
        self.limits = limits
        self.timeouts = timeouts
        self.connections = connections
        #: The access log (``--access-log``); None by default, and then a connection
        #: pays one empty slot for it.
        self.access_log = access_log
        #: Responses by status and refusals are counted here (None: not counted).
        self.metrics = metrics
