"""The registry of live connections: how many, whether there is room, whether stopping.

Graceful shutdown needs one list of everything long-lived — HTTP keep-alive
connections, held long-polls, SSE streams, WebSocket connections — and every
connection needs to know, when it answers, whether to keep its socket open.
Both live here, in one small object that the server creates and hands to the
HTTP layer and to each transport; nothing else needs the server.

The capacity rule lives here too (``limits.max_connections``): a connection is
admitted when it is accepted, if the registry holds fewer than the cap. One
that is not admitted is *refused*: the HTTP layer reads its first request head
for at most a short time and answers it 503 with ``Retry-After`` (a WebSocket
handshake included), then closes. Refusals in flight are bounded too
(:meth:`Connections.admit`), so that a flood past the cap cannot spend the file
descriptors kept in reserve for brokers and logs: beyond that bound a new
connection is reset at once.
"""

from __future__ import annotations

import enum
import itertools
import logging
import resource
from collections.abc import Collection, Iterator
from typing import Protocol

from .logs import ClientErrorLimiter

__all__ = [
    "RETRY_AFTER",
    "Admission",
    "Connection",
    "Connections",
    "default_max_connections",
]

log = logging.getLogger(__name__)

#: Seconds a refused client is asked to wait (``Retry-After``). Long enough for
#: idle keep-alive connections (``timeouts.keepalive``, 5 s) to free their
#: slots; clients add their own jitter on top (tidings.js waits 1 to 1.5 times it).
RETRY_AFTER = 5

#: File descriptors kept back from the ``RLIMIT_NOFILE`` soft limit when
#: ``limits.max_connections`` is left unset: a 32nd of the limit, at least 64.
#: They hold the listening sockets, the event loop's own (epoll, wake-up pipe),
#: broker connections (Redis pool and pub/sub, NATS), log files, and the
#: connections being refused (at most a 64th of the cap, see ``admit``).
_RESERVE_FRACTION = 32
_RESERVE_MIN = 64

#: One line per interval about refusals, however many there are: a flood of
#: thousands of connections past the cap writes one line and a count.
_capacity_log = ClientErrorLimiter(max_lines=1)


def default_max_connections() -> int:
    """The cap when ``limits.max_connections`` is unset: the soft file limit minus a reserve.

    0 (no cap) when the soft limit is unlimited; at least 1.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0
    reserve = max(_RESERVE_MIN, soft // _RESERVE_FRACTION)
    return max(1, soft - reserve)


class Admission(enum.Enum):
    """What :meth:`Connections.admit` decided for a new connection."""

    #: Room under the cap: served, and counted.
    ADMITTED = "admitted"
    #: Over the cap: answered 503 with ``Retry-After``, then closed.
    REFUSED = "refused"
    #: Over the cap, and too many refusals already in flight: reset at once.
    DROPPED = "dropped"


class Connection(Protocol):
    """Anything long-lived the server must wind down on graceful shutdown."""

    def shutdown(self) -> None:
        """Finish what is in flight and close; a client reconnects elsewhere and recovers."""


class Connections:
    """Every live connection of one server. See the module docstring.

    A transport that keeps a set of its own connections anyway (SSE keeps its
    streams for the heartbeat) lends it with :meth:`include` rather than
    adding each connection twice: a second set entry is 65 bytes per idle
    connection (tracemalloc, 2,000 SSE streams), 5 % of one.
    """

    __slots__ = ("_groups", "_live", "_refused", "max_connections", "max_refusals", "stopping")

    def __init__(self, max_connections: int = 0) -> None:
        self._live: set[Connection] = set()
        self._groups: list[Collection[Connection]] = []
        # Connections being answered 503: not counted, bounded by max_refusals.
        self._refused: set[Connection] = set()
        #: Live connections allowed at once; 0: no cap (the file limit still holds).
        self.max_connections = max_connections
        #: Refusals in flight allowed at once: a 64th of the cap, at least 16.
        self.max_refusals = max(16, max_connections // 64)
        #: Set once by :meth:`shutdown`: answer, then close; accept nothing new.
        self.stopping = False

    def admit(self, connection: Connection) -> Admission:
        """Add a newly accepted connection if there is room under the cap; say what to do."""
        if not self.max_connections or len(self) < self.max_connections:
            self._live.add(connection)
            return Admission.ADMITTED
        admission = Admission.REFUSED
        if len(self._refused) < self.max_refusals:
            self._refused.add(connection)
        else:
            admission = Admission.DROPPED
        _capacity_log.log(
            log,
            logging.WARNING,
            "at capacity (limits.max_connections = %d): new connections are %s",
            self.max_connections,
            "answered 503" if admission is Admission.REFUSED else "reset (too many refusals)",
        )
        return admission

    def refused(self, connection: Connection) -> bool:
        """Whether ``connection`` was refused by :meth:`admit` (and is being answered 503)."""
        return connection in self._refused

    def add(self, connection: Connection) -> None:
        """Count ``connection``, which replaces one already admitted (an upgraded socket)."""
        self._live.add(connection)

    def discard(self, connection: Connection) -> None:
        self._live.discard(connection)
        self._refused.discard(connection)

    def include(self, group: Collection[Connection]) -> None:
        """Count ``group``'s members as live connections too (its owner keeps it current)."""
        self._groups.append(group)

    def __len__(self) -> int:
        return len(self._live) + sum(len(group) for group in self._groups)

    def __iter__(self) -> Iterator[Connection]:
        return iter(tuple(itertools.chain(self._live, *self._groups)))

    def __contains__(self, connection: object) -> bool:
        return connection in self._live or any(connection in group for group in self._groups)

    def shutdown(self) -> None:
        """Mark the server stopping and ask every connection to wind down."""
        self.stopping = True
        for connection in self:
            connection.shutdown()
