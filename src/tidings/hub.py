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
between the history read and the live stream. If that live stream skips
meanwhile, or the buffer does not continue what history returned, the
subscribe is refused with a temporary error (see :meth:`Hub.subscribe`):
never a silent gap.

Every call that waits on the broker for a client is bounded by
``broker_timeout`` (``[timeouts] broker``): a slow broker answers the client
a temporary error, not a request that hangs, and leaves nothing registered.

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

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Literal, NamedTuple, Protocol

from .brokers.base import Broker, unavailable
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


class _Pending:
    """One subscribe() waiting on the broker, and what arrived meanwhile.

    An object of its own, compared by identity: two subscribes whose buffers
    hold equal publications are still two, and each removes only its own.
    """

    __slots__ = ("buffer",)

    def __init__(self) -> None:
        self.buffer: list[Publication] = []


class _Channel:
    """Local state of a channel that has subscribers on this node.

    The invariant the fan-out rests on: a subscriber in :attr:`subscribers`
    stands at :attr:`top`, so the next publication that follows ``top`` is
    the next one it needs. One that joined at another position (its history
    read ran ahead of live delivery, or live delivery has not started) waits
    in :attr:`catching_up` until the live stream reaches it.
    """

    __slots__ = ("catching_up", "pending", "subscribed", "subscribers", "top")

    def __init__(self, top: Position) -> None:
        self.subscribers: set[Subscriber] = set()
        # subscribe() calls waiting on the broker.
        self.pending: list[_Pending] = []
        # Subscribers at a position other than ``top``, by that position.
        self.catching_up: dict[Subscriber, Position] = {}
        self.top = top
        #: The broker subscription: False until asked for (or after it failed),
        #: a future while asked, True once live delivery is on (a plain flag
        #: then, not the done future: a future per channel was ~100 bytes per
        #: SSE connection in the benchmark, one channel each).
        self.subscribed: asyncio.Future[bool] | bool = False


class Hub:
    """Channels and fan-out for one node. See the module docstring."""

    def __init__(
        self,
        broker: Broker,
        *,
        history_for: Callable[[str], HistoryPolicy] = lambda channel: DEFAULT_HISTORY,
        broker_timeout: float = 5.0,
    ) -> None:
        """``history_for(channel)`` is the channel's history policy, sent with each publish;
        ``broker_timeout`` bounds, in seconds, each call that waits on the broker for a client."""
        self._broker = broker
        self._history_for = history_for
        self._broker_timeout = broker_timeout
        self._channels: dict[str, _Channel] = {}
        self._users: dict[str, set[Client]] = {}
        broker.bind(self._deliver)
        broker.bind_presence(self._deliver_presence)
        broker.bind_restarted(self._restarted)

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
        """Publish raw JSON ``data``; return the position the broker gave it.

        A publish that timed out may still land (the broker may have taken it
        before it stalled): the caller is told to retry, as with any broker
        error, and a retry may publish twice; a lost publication would be worse.
        """
        async with self._bounded():
            pub = await self._broker.publish(
                channel, data, history=self._history_for(channel), info=info, tags=tags
            )
        return pub.position

    @contextlib.asynccontextmanager
    async def _bounded(self) -> AsyncIterator[None]:
        """Bound a wait on the broker: past ``broker_timeout``, the temporary
        error of an unavailable broker (code 100), which clients retry.

        The one place the bound is applied; a TimeoutError the broker raised
        itself is not ours to reword. A broker that never waits
        (:attr:`Broker.remote` false) is not bounded: see there why.
        """
        if not self._broker.remote:
            yield
            return
        timeout = asyncio.timeout(self._broker_timeout)
        try:
            async with timeout:
                yield
        except TimeoutError:
            if not timeout.expired():
                raise
            raise unavailable(f"timed out after {self._broker_timeout:g}s") from None

    def _deliver(self, pub: Publication) -> None:
        """The fan-out path: called by the broker once per publication on this node."""
        state = self._channels.get(pub.channel)
        if state is None:
            return
        for pending in state.pending:
            pending.buffer.append(pub)
        top = state.top
        if pub.epoch == top.epoch and pub.offset <= top.offset:
            return  # already delivered (a broker may replay after a reconnect)
        state.top = Position(pub.epoch, pub.offset)
        if not follows(top, pub) and (top != EMPTY or state.subscribers):
            # The live stream skipped: a remote broker lost history (new epoch)
            # or a message. Subscribers cannot be caught up here; make them
            # reconnect, so that their resume says plainly what was lost.
            # (Before any live delivery, subscribers stand at the empty
            # stream: a first publication past offset 1 skipped for them too.)
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

    def _restarted(self, channel: str, position: Position) -> None:
        """The broker lost part of the channel's stream on this node, which
        restarts at ``position`` (a new epoch): a skip that no publication
        shows, answered as one. The broker has logged it, once per event.

        A subscribe waiting on the broker meanwhile is not told: a broker that
        calls this reads positions without awaiting (NATS does), so the
        position it goes live at is read after the restart, never before it.
        """
        state = self._channels.get(channel)
        if state is None:
            return
        state.top = position
        self._lost_state(state)

    @staticmethod
    def _lost_state(state: _Channel) -> None:
        for subscriber in (*state.subscribers, *state.catching_up):
            try:
                subscriber.insufficient_state()
            except Exception:
                log.exception("subscriber %r failed to resync", subscriber)

    @staticmethod
    def _promote(state: _Channel, pub: Publication) -> None:
        """Live delivery reached ``pub``: subscribers it continues go live with
        it; one it passed without continuing (live delivery began past its
        position) is told, like a skip."""
        for subscriber, position in list(state.catching_up.items()):
            if follows(position, pub):
                del state.catching_up[subscriber]
                state.subscribers.add(subscriber)
            elif (pub.epoch == position.epoch or position == EMPTY) and (
                pub.offset > position.offset
            ):
                del state.catching_up[subscriber]
                try:
                    subscriber.insufficient_state()
                except Exception:
                    log.exception("subscriber %r failed to resync", subscriber)

    # -- subscribing -----------------------------------------------------

    async def subscribe(
        self, channel: str, subscriber: Subscriber, since: Position | None = None
    ) -> Recovery:
        """Join ``subscriber`` to ``channel``; see :class:`Recovery` for the result.

        Raises the temporary error (code 100) when the broker does not answer
        within ``broker_timeout``, or when the channel's live stream did not
        continue what history returned while the broker was being asked (a
        skip: a message lost, a new epoch); the subscriber is then not
        registered and nothing of the call stays behind.

        A skip reaches a waiting subscribe through its buffer, which
        :meth:`_deliver` fills before it looks for skips: the skipping
        publication is in every buffer, so :meth:`_merge` sees it beyond the
        recovered position. When history already returned past it, there is
        no hole for this subscriber, and it goes live although the channel's
        other subscribers were told to resync.

        Refusing, rather than registering the subscriber and making it resync
        at once, is the answer every transport already gives its client in the
        right order: a WebSocket subscribe gets an error reply that the SDKs
        retry with their position (where history decides plainly what was
        recovered); an SSE or poll join fails before anything is written. A
        resync during the subscribe would reach a WebSocket client before the
        reply it resyncs, and an SSE stream before its head.
        """
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _Channel(EMPTY)
        pending = _Pending()
        state.pending.append(pending)
        try:
            async with self._bounded():
                if state.subscribed is not True:
                    await self._subscribe_broker(channel, state)
                recovery = await self._recover(channel, since)
        except BaseException:
            state.pending.remove(pending)
            self._drop_if_unused(channel, state)
            raise
        state.pending.remove(pending)
        merged = self._merge(recovery, pending.buffer)
        top = state.top
        behind = merged is not None and (
            merged.position.epoch == top.epoch and merged.position.offset < top.offset
        )
        if behind:
            merged = None  # live delivery passed what history returned
        if merged is None:
            self._drop_if_unused(channel, state)
            log.warning("%s skipped while a subscriber joined: it must subscribe again", channel)
            # Temporary like an unreachable broker (code 100, over HTTP 503):
            # the subscribe again finds the stream whole or says what is lost.
            raise unavailable("the channel's stream skipped while subscribing")
        if top == EMPTY and not state.subscribers and not state.catching_up:
            state.top = top = merged.position  # the first to join: live delivery starts here
        if merged.position == top:
            state.subscribers.add(subscriber)
        else:
            state.catching_up[subscriber] = merged.position
        return merged

    async def _subscribe_broker(self, channel: str, state: _Channel) -> None:
        """Return once the broker delivers ``channel`` live to this node.

        Every subscriber waits for it, not only the one that asked: a history
        read made before the broker subscription took effect (Redis: before
        SUBSCRIBE was confirmed) can miss publications that live delivery
        will not bring either, a silent gap (chaos run, pubsub_kill).
        """
        while True:
            subscribed = state.subscribed
            if subscribed is True:
                return
            if subscribed is False:
                asked = state.subscribed = asyncio.get_running_loop().create_future()
                try:
                    await self._broker.subscribe(channel)
                except BaseException:
                    state.subscribed = False  # the next subscribe asks again
                    asked.set_result(False)
                    raise
                state.subscribed = True
                asked.set_result(True)
                return
            if await asyncio.shield(subscribed):
                return

    @staticmethod
    def _merge(recovery: Recovery, buffer: list[Publication]) -> Recovery | None:
        """Append what arrived while the broker was being asked; None on a hole.

        A buffered publication at or before the recovered position is one
        history already returned. One beyond it that does not follow it (a
        later offset, another epoch) means the live stream lost what lies
        between: the subscriber cannot go live from here.
        """
        position, publications, recovered = recovery
        for pub in buffer:
            if follows(position, pub):
                publications.append(pub)
                position = pub.position
            elif pub.epoch != position.epoch or pub.offset > position.offset:
                return None
        return Recovery(position, publications, recovered)

    async def recover(self, channel: str, since: Position | None) -> Recovery:
        """What a client at ``since`` missed, without subscribing (for polling)."""
        async with self._bounded():
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
        async with self._bounded():
            await self._broker.add_presence(channel, client, info)

    def remove_presence(self, channel: str, client: str) -> None:
        self._broker.remove_presence(channel, client)

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        async with self._bounded():
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
        async with self._bounded():
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
