"""The hub: channels, fan-out and recovery, with no sockets in sight.

Every transport meets every other here. A transport registers a
:class:`Subscriber` on a channel; the broker hands the hub each publication
exactly once per node; the hub calls ``deliver`` on every subscriber of that
channel. A subscriber's ``deliver`` only writes bytes that the publication has
already encoded for its wire format (:meth:`Publication.encoded`), so the cost
per recipient is one ``transport.write`` (DESIGN principle 2).

Recovery is the hub's second job. ``(epoch, offset)`` positions let a client
that dropped off come back: the hub asks the broker for what came after the
client's position and either returns all of it (``recovered=True``) or says
plainly that history no longer reaches (``recovered=False``). It never returns
a partial range. While the broker is being asked, publications keep arriving;
the hub buffers them for the subscriber being set up, so that nothing falls
between the history read and the live stream.

The hub trusts the channel names it is given: whoever speaks for a client
asks :class:`~tidings.auth.Access` first, which checks the name with every
permission question (one rule, in one place). A program embedding the hub
publishes to names it chose.

Each delivery is a :class:`Publication` that carries its own stream
position, so a transport that must tell its client where it stands (an SSE
event id, a poll cursor) builds that from what it was delivered, never from
the hub's current state or its lifetime rules.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Literal, NamedTuple, Protocol

from .brokers.base import Broker
from .stream import (
    DEFAULT_HISTORY,
    EMPTY,
    ClientInfo,
    EncodedOnce,
    HistoryPolicy,
    Position,
    PresenceEvent,
    Publication,
    follows,
    reaches,
)

# The stream's values are re-exported: ``from tidings.hub import Publication``
# is how programs embedding the hub have named them.
__all__ = [
    "DEFAULT_HISTORY",
    "EMPTY",
    "Client",
    "ClientInfo",
    "EncodedOnce",
    "HistoryPolicy",
    "Hub",
    "Position",
    "PresenceEvent",
    "Publication",
    "Recovery",
    "Subscriber",
    "follows",
    "reaches",
]

log = logging.getLogger(__name__)


class Client(Protocol):
    """A connection the server API can act on by user: any transport's."""

    client_id: str

    def close(self, code: int, reason: str) -> None: ...

    def server_unsubscribe(self, channel: str, code: int = 2000, reason: str = "") -> bool: ...


class Subscriber(Protocol):
    """What a transport registers on a channel: every hook the hub calls.

    All three are called synchronously from the hub's loops; none may raise
    or block: they write bytes (or note what to write) and return. Declared
    here, not looked up with ``getattr``, so that mypy checks every transport
    against the whole contract.
    """

    def deliver(self, pub: Publication) -> None:
        """A publication of a subscribed channel, in offset order."""

    def insufficient_state(self) -> None:
        """The channel's live stream skipped: make the client resume from its
        position, where it learns whether history still reaches it."""

    def deliver_presence(self, event: PresenceEvent) -> None:
        """A join or leave in a subscribed channel (protocols without
        join/leave pushes ignore it)."""


class Recovery(NamedTuple):
    """The outcome of joining a channel, possibly from an earlier position.

    ``publications`` are everything after the requested position (or after
    "now") up to the moment the subscriber went live; the caller writes them
    before anything else. ``recovered`` is true only when a position was given
    and history still reached it without a gap.
    """

    position: Position
    publications: list[Publication]
    recovered: bool


class _Channel:
    """Local state of a channel that has subscribers on this node."""

    __slots__ = ("catching_up", "pending", "subscribers", "top")

    def __init__(self, top: Position) -> None:
        self.subscribers: set[Subscriber] = set()
        # Buffers of subscribe() calls waiting on the broker.
        self.pending: list[list[Publication]] = []
        # Subscribers whose recovery ran ahead of live delivery (possible with
        # a remote broker): they go live once delivery passes their position.
        self.catching_up: dict[Subscriber, int] = {}
        self.top = top


class Hub:
    """Channels and fan-out for one node. See the module docstring."""

    def __init__(
        self,
        broker: Broker,
        *,
        history_for: Callable[[str], HistoryPolicy] = lambda channel: DEFAULT_HISTORY,
    ) -> None:
        """``history_for(channel)`` is the channel's history policy, sent with each publish."""
        self._broker = broker
        self._history_for = history_for
        self._channels: dict[str, _Channel] = {}
        self._users: dict[str, set[Client]] = {}
        broker.bind(self._deliver)
        broker.bind_presence(self._deliver_presence)

    @property
    def broker(self) -> Broker:
        return self._broker

    # -- publishing ------------------------------------------------------

    async def publish(
        self,
        channel: str,
        data: bytes,
        *,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
    ) -> Position:
        """Publish raw JSON ``data``; return the position the broker gave it."""
        pub = await self._broker.publish(
            channel, data, history=self._history_for(channel), info=info, tags=tags
        )
        return pub.position

    def _deliver(self, pub: Publication) -> None:
        """The fan-out path: called by the broker once per publication on this node."""
        state = self._channels.get(pub.channel)
        if state is None:
            return
        for buffer in state.pending:
            buffer.append(pub)
        top = state.top
        if pub.epoch == top.epoch and pub.offset <= top.offset:
            return  # already delivered (a broker may replay after a reconnect)
        state.top = Position(pub.epoch, pub.offset)
        if top != EMPTY and not follows(top, pub):
            # The live stream skipped: a remote broker lost history (new epoch)
            # or a message. Subscribers cannot be caught up here; make them
            # reconnect, so that their resume says plainly what was lost.
            log.warning("%s jumped from %s to %s: subscribers must resync", pub.channel, top, pub)
            self._lost_state(state)
            return
        if state.catching_up:
            self._promote(state, pub)
        # A copy, because a subscriber may leave while we iterate.
        for subscriber in tuple(state.subscribers):
            try:
                subscriber.deliver(pub)
            except Exception:
                log.exception("subscriber %r failed to take %r", subscriber, pub)

    @staticmethod
    def _lost_state(state: _Channel) -> None:
        for subscriber in (*state.subscribers, *state.catching_up):
            try:
                subscriber.insufficient_state()
            except Exception:
                log.exception("subscriber %r failed to resync", subscriber)

    @staticmethod
    def _promote(state: _Channel, pub: Publication) -> None:
        for subscriber, offset in list(state.catching_up.items()):
            if pub.offset > offset:
                del state.catching_up[subscriber]
                state.subscribers.add(subscriber)

    # -- subscribing -----------------------------------------------------

    async def subscribe(
        self, channel: str, subscriber: Subscriber, since: Position | None = None
    ) -> Recovery:
        """Join ``subscriber`` to ``channel``; see :class:`Recovery` for the result."""
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _Channel(EMPTY)
            fresh = True
        else:
            fresh = False
        buffer: list[Publication] = []
        state.pending.append(buffer)
        try:
            if fresh:
                await self._broker.subscribe(channel)
            recovery = await self._recover(channel, since)
        except BaseException:
            state.pending.remove(buffer)
            self._drop_if_unused(channel, state)
            raise
        state.pending.remove(buffer)
        if fresh and state.top == EMPTY:
            state.top = recovery.position
        recovery = self._merge(recovery, buffer)
        top = state.top
        if recovery.position.epoch == top.epoch and recovery.position.offset > top.offset:
            state.catching_up[subscriber] = recovery.position.offset
        else:
            state.subscribers.add(subscriber)
        return recovery

    @staticmethod
    def _merge(recovery: Recovery, buffer: list[Publication]) -> Recovery:
        """Append what arrived while the broker was being asked."""
        position, publications, recovered = recovery
        for pub in buffer:
            if follows(position, pub):
                publications.append(pub)
                position = pub.position
        return Recovery(position, publications, recovered)

    async def recover(self, channel: str, since: Position | None) -> Recovery:
        """What a client at ``since`` missed, without subscribing (for polling)."""
        return await self._recover(channel, since)

    async def _recover(self, channel: str, since: Position | None) -> Recovery:
        if since is None:
            _, top = await self._broker.history(channel, limit=0)
            return Recovery(top, [], False)
        publications, top = await self._broker.history(channel, since=since)
        if reaches(since, publications, top):
            return Recovery(top, publications, True)
        return Recovery(top, [], False)

    def unsubscribe(self, channel: str, subscriber: Subscriber) -> None:
        """Remove ``subscriber``; the channel goes when its last subscriber does."""
        state = self._channels.get(channel)
        if state is None:
            return
        state.subscribers.discard(subscriber)
        state.catching_up.pop(subscriber, None)
        self._drop_if_unused(channel, state)

    def _drop_if_unused(self, channel: str, state: _Channel) -> None:
        unused = not (state.subscribers or state.pending or state.catching_up)
        if unused and self._channels.get(channel) is state:
            del self._channels[channel]
            self._broker.unsubscribe(channel)

    # -- clients by user (for the server API) -------------------------------

    def add_client(self, user: str, client: Client) -> None:
        """Make an authenticated connection reachable by its user id."""
        if user:
            self._users.setdefault(user, set()).add(client)

    def remove_client(self, user: str, client: Client) -> None:
        clients = self._users.get(user)
        if clients is not None:
            clients.discard(client)
            if not clients:
                del self._users[user]

    def clients_of(self, user: str, client_id: str = "") -> list[Client]:
        """The user's connections on this node (only ``client_id``'s when given)."""
        clients = self._users.get(user, ())
        return [c for c in clients if not client_id or c.client_id == client_id]

    @property
    def num_users(self) -> int:
        return len(self._users)

    # -- presence --------------------------------------------------------

    async def add_presence(self, channel: str, client: str, info: ClientInfo) -> None:
        await self._broker.add_presence(channel, client, info)

    def remove_presence(self, channel: str, client: str) -> None:
        self._broker.remove_presence(channel, client)

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        return await self._broker.presence(channel)

    async def presence_stats(self, channel: str) -> tuple[int, int]:
        """``(num_clients, num_users)`` present in the channel."""
        entries = await self.presence(channel)
        return len(entries), len({info.user for info in entries.values()})

    def announce(self, channel: str, kind: Literal["join", "leave"], info: ClientInfo) -> None:
        """Tell the channel's subscribers on every node that a client came or went."""
        self._broker.announce(PresenceEvent(channel, kind, info))

    def _deliver_presence(self, event: PresenceEvent) -> None:
        state = self._channels.get(event.channel)
        if state is None:
            return
        for subscriber in tuple(state.subscribers):
            try:
                subscriber.deliver_presence(event)
            except Exception:
                log.exception("subscriber %r failed to take %s", subscriber, event.kind)

    # -- reading ---------------------------------------------------------

    async def history(
        self,
        channel: str,
        *,
        since: Position | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> tuple[list[Publication], Position]:
        return await self._broker.history(channel, since=since, limit=limit, reverse=reverse)

    def channels(self) -> Iterator[tuple[str, int]]:
        """Channels with subscribers on this node, with their subscriber counts."""
        for name, state in self._channels.items():
            yield name, len(state.subscribers) + len(state.catching_up)

    def top(self, channel: str) -> Position:
        """The position of the last publication delivered on this node (for
        inspection: transports build positions from their deliveries)."""
        state = self._channels.get(channel)
        return EMPTY if state is None else state.top

    @property
    def num_channels(self) -> int:
        return len(self._channels)

    def num_subscribers(self, channel: str) -> int:
        state = self._channels.get(channel)
        return 0 if state is None else len(state.subscribers) + len(state.catching_up)
