"""The broker interface the hub is written against.

The hub never assumes one process: it asks the broker to stamp and store a
publication, and the broker hands every publication back to every node that
showed interest in its channel (on one node, at once; through Redis or NATS,
over the network). History reads are the broker's too, because only it knows
the true stream of a channel across nodes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from ..hub import ClientInfo, Position, Publication

Deliver = Callable[[Publication], None]


class Broker(ABC):
    """Stamps publications with ``(epoch, offset)``, keeps history, fans out to nodes."""

    _deliver: Deliver | None = None

    def bind(self, deliver: Deliver) -> None:
        """Register the node's fan-out; called once by the hub."""
        self._deliver = deliver

    async def start(self) -> None:
        """Connect and start background work; the default has none."""

    async def close(self) -> None:
        """Stop background work and release connections."""

    @property
    def healthy(self) -> bool:
        return True

    @abstractmethod
    async def publish(
        self,
        channel: str,
        data: bytes,
        *,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
    ) -> Publication:
        """Stamp, store and fan out one publication; return it as stamped."""

    @abstractmethod
    async def subscribe(self, channel: str) -> None:
        """Start receiving the channel's publications on this node.

        Returns once delivery is live, so that a history read made afterwards
        cannot miss a publication. From then on the channel has an epoch
        (history reports it even before the first publication), because
        clients remember the epoch of their subscribe reply.
        """

    @abstractmethod
    def unsubscribe(self, channel: str) -> None:
        """Stop receiving the channel's publications; must not block."""

    @abstractmethod
    async def history(
        self,
        channel: str,
        *,
        since: Position | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> tuple[list[Publication], Position]:
        """Publications after ``since`` (all kept ones without it) and the stream top.

        ``limit=None`` means no limit, ``0`` only the position. With ``since``
        of another epoch, no publications are returned.
        """
