"""The broker interface the hub is written against.

The hub never assumes one process: it asks the broker to stamp and store a
publication, and the broker hands every publication back to every node that
showed interest in its channel (on one node, at once; through Redis or NATS,
over the network). History reads are the broker's too, because only it knows
the true stream of a channel across nodes.

A broker holds no per-channel policy: how much history a channel keeps comes
with each publication (:class:`~tidings.hub.HistoryPolicy`), as in
Centrifugo's ``centrifuge`` library, so namespaces live in one place (the
configuration, read by the hub).
"""

from __future__ import annotations

import hashlib
import logging
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable

from ..errors import BrokerUnavailable, ErrorCode, ProtocolError
from ..stream import ClientInfo, HistoryPolicy, Position, PresenceEvent, Publication

log = logging.getLogger(__name__)

Deliver = Callable[[Publication], None]
DeliverPresence = Callable[[PresenceEvent], None]
Restarted = Callable[[str, Position], None]
#: A channel whose holders all lapsed (see :meth:`Broker.bind_lapsed`).
Lapsed = Callable[[str], None]
#: A message for this node alone (see :meth:`Broker.listen_node`).
NodeMessage = Callable[[bytes], None]


def unavailable(cause: object) -> BrokerUnavailable:
    """The error for a broker that cannot be reached: temporary (100), so clients retry."""
    return BrokerUnavailable(cause)


class Broker(ABC):
    """Stamps publications with ``(epoch, offset)``, keeps history, fans out to nodes."""

    #: Whether a call can wait on something outside this process (a network
    #: round trip). The hub bounds such calls with ``timeouts.broker``; a
    #: broker whose calls never wait is not bounded, because the bound is a
    #: loop timer made and cancelled per call: on the memory broker that was a
    #: third of a long-poll's CPU per delivery (bench/run.py --transports poll,
    #: N=5,000: 1.40x the unbounded hub's µs/delivery).
    remote: bool = True

    _deliver: Deliver | None = None
    _deliver_presence: DeliverPresence | None = None
    _restarted: Restarted | None = None
    _lapsed: Lapsed | None = None
    _lapsed_wanted: Callable[[], bool] = staticmethod(lambda: False)

    def bind(self, deliver: Deliver) -> None:
        """Register the node's fan-out; called once by the hub."""
        self._deliver = deliver

    def bind_presence(self, deliver: DeliverPresence) -> None:
        """Register the node's join/leave fan-out; called once by the hub."""
        self._deliver_presence = deliver

    def bind_restarted(self, restarted: Restarted) -> None:
        """Register the node's answer to a channel whose stream restarted; called once by the hub.

        A broker that can lose publications on their way to this node with no
        later publication to show it (NATS core: a slow consumer, a lost
        connection) calls ``restarted(channel, position)`` when it starts the
        channel's new epoch at ``position``, so that subscribers resync at once
        instead of at the next publication, or never.
        """
        self._restarted = restarted

    def bind_lapsed(self, lapsed: Lapsed, wanted: Callable[[], bool] = lambda: True) -> None:
        """Register the node's answer to a channel vacated by nodes that died.

        A broker that counts nodes per channel (Redis) and finds that every
        node holding a channel stopped refreshing its entry calls
        ``lapsed(channel)`` on one node of the cluster: the channel was
        vacated with nobody left to say so. It looks only while ``wanted()``
        (the node's events have a listener), so that a node nobody listens
        to never takes that news from one that would tell it. Unbound,
        nothing is swept.
        """
        self._lapsed = lapsed
        self._lapsed_wanted = wanted

    async def start(self) -> None:
        """Connect and start background work; the default has none."""

    # Messages between nodes, for a client whose requests reach another node
    # than the one holding its connection (Centrifugo's bidirectional
    # emulation: POST /emulation without sticky sessions). The default is
    # one process: no other node can be reached.

    async def listen_node(self, node: str, on_message: NodeMessage) -> None:
        """Receive from now on the messages :meth:`send_node` sends to ``node``."""

    async def send_node(self, node: str, message: bytes) -> bool:
        """Send ``message`` to ``node``; False when no node of that name listens."""
        return False

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
        history: HistoryPolicy,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
        skip_history: bool = False,
        exclude: frozenset[str] = frozenset(),
        idempotency_key: str = "",
    ) -> Publication | Position:
        """Stamp, store and fan out one publication; return it as stamped.

        ``history`` is how much of the channel's history to keep from this
        publication on: the caller's policy, so that a broker needs none.
        With ``skip_history`` it is fanned out and not stored, and takes no
        offset: it is stamped with the channel's current position
        (``Publication.transient``). ``exclude`` travels with it to every node
        (``Publication.exclude``). A repeat of ``idempotency_key`` in the
        channel within the broker's idempotency window publishes nothing and
        returns the first publication's :class:`Position` instead.
        """

    # Channel occupancy (the hub's channel events). The default is one node:
    # this node's first subscriber is the cluster's, its last one too.

    async def occupy(self, channel: str) -> bool:
        """This node has subscribers in ``channel`` now; True when no other node had."""
        return True

    async def vacate(self, channel: str) -> bool:
        """This node has none left; True when no other node has any."""
        return True

    @abstractmethod
    async def subscribe(self, channel: str) -> None:
        """Start receiving the channel's publications on this node.

        Returns once delivery is live, so that a history read made afterwards
        cannot miss a publication. From then on the channel has an epoch
        (history reports it even before the first publication), because
        clients remember the epoch of their subscribe reply.
        """

    def position(self, channel: str) -> Position | None:
        """The channel's position as this node knows it without asking anyone, or None.

        A position only where everything up to it has been delivered on this
        node and everything after it will be (or the hub told the stream
        restarted), so that a subscriber may join there instead of reading
        the broker's (:meth:`Hub.subscribe`: no round trip per subscriber to
        a channel the node already follows). None, the default, sends the
        hub to :meth:`history`.
        """
        return None

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

    # Presence. A broker that cannot share presence between nodes says so:
    # clients then get error 108 (not available) rather than a partial answer.

    async def add_presence(self, channel: str, client: str, info: ClientInfo) -> None:
        """Record ``client`` as present in ``channel``."""
        raise ProtocolError(ErrorCode.NOT_AVAILABLE, "this broker keeps no presence")

    def remove_presence(self, channel: str, client: str) -> None:
        """Forget ``client`` in ``channel``; must not block."""

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        """Everyone present in ``channel``, by client id."""
        raise ProtocolError(ErrorCode.NOT_AVAILABLE, "this broker keeps no presence")

    def announce(self, event: PresenceEvent) -> None:
        """Deliver a join/leave event to every node; the default reaches this node only."""
        if self._deliver_presence is not None:
            self._deliver_presence(event)


class IdempotencyTable:
    """Publish results by idempotency key, for a window, bounded in count and size.

    For the brokers that publish from one process (memory; NATS, where it is
    per node). Keys are kept as a 16-byte BLAKE2b digest of channel and key,
    so an entry costs the same whatever the length of the key a client sent
    (about 360 bytes of the process's RSS with its position, measured by
    tests/test_publish_options.py); at most ``max_keys`` are kept, the oldest
    forgotten first (a repeat of a forgotten key publishes again: the
    operator is warned once per episode). The window is the same for every
    key, so insertion order is expiry order and the expired leave from the
    front: O(1) amortised per publish.
    """

    __slots__ = ("_clock", "_entries", "_full", "_max_keys", "_window")

    def __init__(
        self,
        window: float,
        max_keys: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window = window
        self._max_keys = max(1, max_keys)
        self._clock = clock
        # Ordered: the oldest first. An OrderedDict, not a dict: a dict
        # emptied from the front keeps the deleted slots before its first
        # live one until it resizes, so each ``next(iter())`` would scan them.
        self._entries: OrderedDict[bytes, tuple[float, Position]] = OrderedDict()
        self._full = False

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def digest(channel: str, key: str) -> bytes:
        """The table's key for ``key`` in ``channel`` (also Redis' key suffix)."""
        material = channel.encode() + b"\0" + key.encode()
        return hashlib.blake2b(material, digest_size=16).digest()

    def get(self, channel: str, key: str) -> Position | None:
        """The position first published with ``key`` in ``channel``, within the window."""
        self._expire()
        entry = self._entries.get(self.digest(channel, key))
        return None if entry is None else entry[1]

    def put(self, channel: str, key: str, position: Position) -> None:
        """Remember ``position`` as the result of ``key`` in ``channel``."""
        entries = self._entries
        if len(entries) >= self._max_keys:
            if not self._full:
                self._full = True
                log.warning(
                    "idempotency keys: limits.max_idempotency_keys (%d) reached within the "
                    "window; the oldest are forgotten early",
                    self._max_keys,
                )
            entries.popitem(last=False)
        entries[self.digest(channel, key)] = (self._clock() + self._window, position)

    def forget(self, channel: str, key: str) -> None:
        """Drop ``key`` (its publish failed: a retry must go through)."""
        self._entries.pop(self.digest(channel, key), None)

    def _expire(self) -> None:
        entries = self._entries
        now = self._clock()
        while entries:
            digest = next(iter(entries))
            if entries[digest][0] > now:
                break
            del entries[digest]
        if self._full and len(entries) < self._max_keys // 2:
            self._full = False
