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

**Publish options** (:meth:`Hub.publish`):

- ``skip_history``: the publication is delivered live to every subscriber on
  every node and is not stored. It does *not* take an offset: it carries the
  position of the channel's last stored publication and leaves the stream
  where it was, as Centrifugo does (a publication without history gets no
  offset there; its SDKs keep their position). That is what keeps recovery
  whole: history's offsets stay consecutive, so a client resuming from any
  position before or after it is recovered with no hole where it was and no
  duplicate (it is not in history to be returned again); an SSE id or a poll
  cursor taken from it names a stored position, safe to resume from. Taking
  an offset instead would leave a hole in history at that offset, and every
  resume across it would be "not recovered". What it costs: a client that
  was away misses it (it is live-only by definition), and a delta subscriber
  gets the next stored publication in full rather than as a delta against it.
  The fan-out delivers it only to subscribers standing at the position it
  carries; one that arrives past the position of this node (the node missed
  a stored publication) is a skip, answered as one.
- ``exclude``: client ids that must not receive it, carried with it to every
  node. The fan-out tests one class attribute per publication
  (``Publication.directed``) and takes the excluding loop only then, so a
  plain publication costs what it did.
- ``idempotency_key``: a repeat of the key in the same channel within
  ``limits.idempotency_window`` returns the first publication's position and
  publishes nothing: atomically in Redis (the publish script), in a bounded
  table in one process (memory and NATS: see :class:`~tidings.brokers.base.IdempotencyTable`).

**Channel events**: when the application listens (``hooks.listening``), a
channel's first subscriber on this node and its last one leaving are told to
the broker (:meth:`Broker.occupy`, :meth:`Broker.vacate`), which answers
whether that made the channel occupied or vacated in the whole cluster: only
then is a :class:`~tidings.hooks.ChannelEvent` emitted, so each fires once per
cluster. See :class:`_Occupancy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Literal, NamedTuple, Protocol

from .brokers.base import Broker, unavailable
from .config import namespace_of
from .hooks import ChannelEvent, Hooks, PublicationEvent
from .metrics import Metrics
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

    def server_subscribe(self, channel: str) -> Awaitable[bool]: ...

    def server_refresh(self, expire_at: int, info: bytes | None, expired: bool) -> bool: ...


class Subscriber(Protocol):
    """What a transport registers on a channel: every hook the hub calls.

    All three are called synchronously from the hub's loops; none may raise
    or block: they write bytes (or note what to write) and return. Declared
    here, not looked up with ``getattr``, so that mypy checks every transport
    against the whole contract.
    """

    #: The connection's id (``ClientSession.client_id``), which the publish
    #: option ``exclude`` names; "" for subscribers without one (SSE, polls),
    #: which no ``exclude`` names.
    client_id: str

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
        #: A dict used as an ordered set: the fan-out walks it in the order
        #: subscribers joined, which is the order their objects were allocated,
        #: so it reads memory mostly forward. A set's hash order jumps about:
        #: 300 ns against 107 ns per delivery of Python around the write, 10,000
        #: SSE streams (a discarding C write in place of the socket's).
        self.subscribers: dict[Subscriber, None] = {}
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


def _excludes(pub: Publication, subscriber: Subscriber) -> bool:
    """Whether ``pub``'s ``exclude`` names ``subscriber`` (its client id read only then)."""
    exclude = pub.exclude
    return bool(exclude) and subscriber.client_id in exclude


class _Occupancy:
    """This node's part in telling when a channel is occupied or vacated in the cluster.

    The hub says when a channel gets its first subscriber on this node
    (:meth:`occupied`) and when its last one leaves (:meth:`emptied`); this
    tells the broker, which answers whether the cluster's occupancy changed
    (:meth:`Broker.occupy`, :meth:`Broker.vacate`), and emits the
    :class:`~tidings.hooks.ChannelEvent` when it did. Nothing here runs for a
    hub whose hooks have no listener: the hub calls :meth:`occupied` only
    then, and :meth:`emptied` finds nothing to do.

    ``vacated`` waits ``hooks.vacated_delay`` seconds of emptiness (a timer);
    a subscriber back within it cancels the timer and nothing is told, so a
    long-poll client between two polls does not make the channel flap.

    Never on the fan-out path, never awaited by a client: the broker is told
    by at most :data:`MAX_CALLS` worker tasks, each call bounded by the
    broker timeout. Per channel, one call at a time, in order: a worker takes
    the channel, compares what this node wants the broker to hold (``_want``)
    with what it last told it (``_told``), and makes the one call that
    closes the gap; a change meanwhile is picked up when the call returns.
    Flaps while a call is in flight thus coalesce, and no channel is ever
    told "vacate" before its "occupy" has returned. A broker error is
    logged; the node then takes the call as made (so that one failure does
    not become a loop of retries), and the event is not emitted.
    """

    __slots__ = (
        "_broker",
        "_busy",
        "_hooks",
        "_queue",
        "_timeout",
        "_timers",
        "_told",
        "_want",
        "_workers",
    )

    #: Broker calls in flight at once.
    MAX_CALLS = 8

    def __init__(self, broker: Broker, hooks: Hooks, timeout: float) -> None:
        self._broker = broker
        self._hooks = hooks
        self._timeout = timeout
        #: Channels occupied on this node (with those waiting out the delay).
        self._want: set[str] = set()
        #: Channels the broker holds for this node, as far as it was told.
        self._told: set[str] = set()
        #: Channels waiting out ``vacated_delay``, with their timers.
        self._timers: dict[str, asyncio.TimerHandle] = {}
        #: Channels to tell the broker about, in order (a dict as an ordered set).
        self._queue: dict[str, None] = {}
        #: Channels with a call in flight.
        self._busy: set[str] = set()
        self._workers: set[asyncio.Task[None]] = set()

    def occupied(self, channel: str) -> None:
        """``channel`` got its first subscriber on this node."""
        timer = self._timers.pop(channel, None)
        if timer is not None:
            timer.cancel()  # back within the delay: nothing happened
            return
        if channel in self._want:
            return
        self._want.add(channel)
        self._enqueue(channel)

    def emptied(self, channel: str) -> None:
        """``channel`` has no subscriber left on this node: vacated after the delay."""
        if channel not in self._want or channel in self._timers:
            return
        loop = asyncio.get_running_loop()
        self._timers[channel] = loop.call_later(
            self._hooks.vacated_delay, self._delay_over, channel
        )

    def state(self, channel: str) -> bool | None:
        """True: the broker holds this node for ``channel``; False: it does not;
        None: not settled yet (a call queued or in flight, or the delay running)."""
        if channel in self._busy or channel in self._queue or channel in self._timers:
            return None
        return channel in self._told

    def lapsed(self, channel: str) -> None:
        """The broker found ``channel`` vacated by nodes that died (``Broker.bind_lapsed``)."""
        if self._hooks.listening:
            self._hooks.emit(ChannelEvent(kind="vacated", channel=channel))

    def _delay_over(self, channel: str) -> None:
        del self._timers[channel]
        self._want.discard(channel)
        self._enqueue(channel)

    def _enqueue(self, channel: str) -> None:
        if channel in self._busy:
            return  # its worker looks again when the call returns
        self._queue[channel] = None
        workers = self._workers
        # A worker that just returned is still in the set until its done
        # callback runs: counted, it could leave this channel without one.
        if len(workers) < self.MAX_CALLS or any(task.done() for task in workers):
            task = asyncio.get_running_loop().create_task(self._work())
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)

    async def _work(self) -> None:
        while self._queue:
            channel = next(iter(self._queue))
            del self._queue[channel]
            self._busy.add(channel)
            try:
                while (wanted := channel in self._want) != (channel in self._told):
                    await self._tell(channel, wanted)
            finally:
                self._busy.discard(channel)

    async def _tell(self, channel: str, occupy: bool) -> None:
        """One broker call, and the event when the cluster's occupancy changed."""
        try:
            async with asyncio.timeout(self._timeout):
                if occupy:
                    changed = await self._broker.occupy(channel)
                else:
                    changed = await self._broker.vacate(channel)
        except Exception as exc:
            log.warning(
                "could not tell the broker that %s is %s on this node: %s",
                channel,
                "occupied" if occupy else "vacated",
                str(exc) or type(exc).__name__,
            )
            changed = False
        if occupy:
            self._told.add(channel)
        else:
            self._told.discard(channel)
        if changed:
            self._hooks.emit(
                ChannelEvent(kind="occupied" if occupy else "vacated", channel=channel)
            )

    async def close(self, timeout: float) -> None:
        """Vacate at once the channels waiting out the delay; wait for the calls."""
        for channel, timer in list(self._timers.items()):
            timer.cancel()
            self._delay_over(channel)
        if self._workers:
            await asyncio.wait(tuple(self._workers), timeout=timeout)


class Hub:
    """Channels and fan-out for one node. See the module docstring."""

    def __init__(
        self,
        broker: Broker,
        *,
        history_for: Callable[[str], HistoryPolicy] = lambda channel: DEFAULT_HISTORY,
        broker_timeout: float = 5.0,
        hooks: Hooks | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """``history_for(channel)`` is the channel's history policy, sent with each publish;
        ``broker_timeout`` bounds, in seconds, each call that waits on the broker for a client;
        ``hooks`` receives the channel and publication events (nothing is built for it
        while nothing listens)."""
        self._broker = broker
        self._history_for = history_for
        self._broker_timeout = broker_timeout
        self._hooks = hooks = hooks if hooks is not None else Hooks()
        #: Counted once per publication, never per subscriber (tidings.metrics).
        self._metrics = metrics if metrics is not None else Metrics()
        self._channels: dict[str, _Channel] = {}
        self._users: dict[str, set[Client]] = {}
        self._occupancy = _Occupancy(broker, hooks, broker_timeout)
        broker.bind(self._deliver)
        broker.bind_presence(self._deliver_presence)
        broker.bind_restarted(self._restarted)
        broker.bind_lapsed(self._occupancy.lapsed, lambda: hooks.listening)

    @property
    def broker(self) -> Broker:
        return self._broker

    async def close(self, timeout: float = 5.0) -> None:
        """Vacate now the channels waiting out ``hooks.vacated_delay`` (at shutdown,
        once the connections are gone), and wait at most ``timeout`` seconds for
        the broker calls in flight, so that their events are emitted before the
        listeners (webhooks) stop."""
        await self._occupancy.close(timeout)

    def occupancy(self, channel: str) -> bool | None:
        """Whether this node told the broker it has subscribers in ``channel`` (for
        inspection and tests): True or False once settled, None while a broker
        call is queued or in flight or the vacated delay runs. Always False
        while nothing listens to events: the broker is not told then."""
        return self._occupancy.state(channel)

    # -- publishing ------------------------------------------------------

    async def publish(
        self,
        channel: str,
        data: bytes,
        *,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
        idempotency_key: str = "",
        skip_history: bool = False,
        exclude: frozenset[str] = frozenset(),
    ) -> Position:
        """Publish raw JSON ``data``; return the position the broker gave it.

        With ``skip_history`` that is the position the channel stood at, which
        the publication does not advance (see the module docstring); with an
        ``idempotency_key`` seen in the channel within the window, the first
        publication's position, and nothing is published. ``exclude`` holds
        client ids that must not receive it ("" names no client: it is dropped).

        A publish that timed out may still land (the broker may have taken it
        before it stalled): the caller is told to retry, as with any broker
        error, and a retry may publish twice (unless it carries an
        ``idempotency_key``); a lost publication would be worse.
        """
        if exclude and "" in exclude:
            exclude = exclude - {""}
        history = self._history_for(channel)
        async with self._bounded("publish"):
            if skip_history or exclude or idempotency_key:
                pub = await self._broker.publish(
                    channel,
                    data,
                    history=history,
                    info=info,
                    tags=tags,
                    skip_history=skip_history,
                    exclude=exclude,
                    idempotency_key=idempotency_key,
                )
            else:
                # Without options, as brokers written before them are called.
                pub = await self._broker.publish(
                    channel, data, history=history, info=info, tags=tags
                )
        if isinstance(pub, Position):
            return pub  # a repeat: published once already
        self._metrics.sent_publication.inc()
        namespaces = self._hooks.publication_namespaces
        if namespaces is not None and namespace_of(channel) in namespaces:
            self._hooks.emit(
                PublicationEvent(
                    channel=channel,
                    data=data,
                    offset=pub.offset,
                    epoch=pub.epoch,
                    user=info.user if info is not None else "",
                    client=info.client if info is not None else "",
                )
            )
        return pub.position

    @contextlib.asynccontextmanager
    async def _bounded(self, op: str) -> AsyncIterator[None]:
        """Bound a wait on the broker: past ``broker_timeout``, the temporary
        error of an unavailable broker (code 100), which clients retry.

        The one place the bound is applied; a TimeoutError the broker raised
        itself is not ours to reword. A broker that never waits
        (:attr:`Broker.remote` false) is not bounded: see there why. A remote
        broker's round trip is timed here too, as ``op``
        (``tidings_broker_request_duration_seconds``).
        """
        if not self._broker.remote:
            yield
            return
        timeout = asyncio.timeout(self._broker_timeout)
        started = time.perf_counter()
        try:
            async with timeout:
                yield
        except TimeoutError:
            if not timeout.expired():
                raise
            raise unavailable(f"timed out after {self._broker_timeout:g}s") from None
        finally:
            duration = time.perf_counter() - started
            self._metrics.broker_duration.labels(op).observe(duration)

    def _deliver(self, pub: Publication) -> None:
        """The fan-out path: called by the broker once per publication on this node."""
        self._metrics.received_publication.inc()
        state = self._channels.get(pub.channel)
        if state is None:
            return
        for pending in state.pending:
            pending.buffer.append(pub)
        directed = pub.directed
        if directed and pub.transient:
            self._deliver_transient(state, pub)
            return
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
        if directed:
            self._fan_out_excluding(state, pub)
            return
        started = time.perf_counter()
        # A copy, because a subscriber may leave while we iterate.
        subscribers = tuple(state.subscribers)
        for subscriber in subscribers:
            try:
                subscriber.deliver(pub)
            except Exception:
                log.exception("subscriber %r failed to take %r", subscriber, pub)
        self._metrics.fanned_out(pub.time, len(subscribers), len(pub.data), started)

    def _fan_out_excluding(self, state: _Channel, pub: Publication) -> None:
        """The fan-out of a publication with ``exclude``: apart, so the plain
        loop above stays as it was (the hot path)."""
        started = time.perf_counter()
        delivered = 0
        for subscriber in tuple(state.subscribers):
            if _excludes(pub, subscriber):
                continue
            delivered += 1
            try:
                subscriber.deliver(pub)
            except Exception:
                log.exception("subscriber %r failed to take %r", subscriber, pub)
        self._metrics.fanned_out(pub.time, delivered, len(pub.data), started)

    def _deliver_transient(self, state: _Channel, pub: Publication) -> None:
        """A ``skip_history`` publication: to the subscribers standing where it was made.

        It carries the position of the stored publication before it. At this
        node's top, it goes to every live subscriber (not to those catching
        up: they stand past it). Behind the top it is stale (this node already
        delivered a later stored one): dropped, rather than delivered out of
        order. Past the top (another epoch, a later offset), this node missed
        stored publications: a skip like any other, and subscribers resync.
        """
        top = state.top
        position = Position(pub.epoch, pub.offset)
        if position != top and not (top == EMPTY and pub.offset == 0):
            if pub.epoch == top.epoch and pub.offset < top.offset:
                log.debug(
                    "%s: a live-only publication at %s came after %s", pub.channel, position, top
                )
                return
            if top != EMPTY or state.subscribers:
                state.top = position
                log.warning(
                    "%s jumped from %s to %s: subscribers must resync", pub.channel, top, position
                )
                self._lost_state(state)
                return
        self._fan_out_excluding(state, pub)

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
                state.subscribers[subscriber] = None
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
        known = self._known(channel, since) if state.subscribed is True else None
        if known is not None:
            recovery = known  # nothing awaited: nothing can arrive meanwhile
        else:
            state.pending.append(pending)
            try:
                async with self._bounded("subscribe"):
                    if state.subscribed is not True:
                        await self._subscribe_broker(channel, state)
                    recovery = await self._recover(channel, since)
            except BaseException:
                state.pending.remove(pending)
                self._drop_if_unused(channel, state)
                raise
            state.pending.remove(pending)
        merged = self._merge(recovery, pending.buffer, subscriber)
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
        first = not state.subscribers and not state.catching_up
        if top == EMPTY and first:
            state.top = top = merged.position  # the first to join: live delivery starts here
        if merged.position == top:
            state.subscribers[subscriber] = None
        else:
            state.catching_up[subscriber] = merged.position
        if first and self._hooks.listening:
            self._occupancy.occupied(channel)
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
    def _merge(
        recovery: Recovery, buffer: list[Publication], subscriber: Subscriber
    ) -> Recovery | None:
        """Append what arrived while the broker was being asked; None on a hole.

        A buffered publication at or before the recovered position is one
        history already returned. One beyond it that does not follow it (a
        later offset, another epoch) means the live stream lost what lies
        between: the subscriber cannot go live from here. A live-only
        (``skip_history``) one is appended when it was made at the position
        reached, and is a hole past it, like a stored one; one excluding
        ``client_id`` moves the position without being appended.
        """
        position, publications, recovered = recovery
        for pub in buffer:
            if pub.directed:
                if pub.transient:
                    at = Position(pub.epoch, pub.offset)
                    if at == position:
                        if not _excludes(pub, subscriber):
                            publications.append(pub)
                    elif pub.epoch != position.epoch or pub.offset > position.offset:
                        return None
                    continue
                if follows(position, pub):
                    if not _excludes(pub, subscriber):
                        publications.append(pub)
                    position = pub.position
                    continue
            if follows(position, pub):
                publications.append(pub)
                position = pub.position
            elif pub.epoch != position.epoch or pub.offset > position.offset:
                return None
        return Recovery(position, publications, recovered)

    async def recover(self, channel: str, since: Position | None) -> Recovery:
        """What a client at ``since`` missed, without subscribing (for polling)."""
        async with self._bounded("recover"):
            return await self._recover(channel, since)

    def _known(self, channel: str, since: Position | None) -> Recovery | None:
        """The recovery of a subscriber joining now (``since`` None) or resuming
        at the channel's position, when the node knows that position (see
        :meth:`Broker.position`); None when only the broker can answer.

        No round trip to the broker for each subscriber of a channel the node
        already follows (Redis: 2.6-3.9k connects/s with one), nor a bound on
        a wait that does not happen.
        """
        known = self._broker.position(channel)
        if known is None or (since is not None and since != known):
            return None
        return Recovery(known, [], since is not None)

    async def _recover(self, channel: str, since: Position | None) -> Recovery:
        known = self._known(channel, since)
        if known is not None:
            return known
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
        state.subscribers.pop(subscriber, None)
        state.catching_up.pop(subscriber, None)
        self._drop_if_unused(channel, state)

    def _drop_if_unused(self, channel: str, state: _Channel) -> None:
        unused = not (state.subscribers or state.pending or state.catching_up)
        if unused and self._channels.get(channel) is state:
            del self._channels[channel]
            self._broker.unsubscribe(channel)
            self._occupancy.emptied(channel)

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
        async with self._bounded("add_presence"):
            await self._broker.add_presence(channel, client, info)

    def remove_presence(self, channel: str, client: str) -> None:
        self._broker.remove_presence(channel, client)

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        async with self._bounded("presence"):
            return await self._broker.presence(channel)

    async def presence_stats(self, channel: str) -> tuple[int, int]:
        """``(num_clients, num_users)`` present in the channel."""
        entries = await self.presence(channel)
        return len(entries), len({info.user for info in entries.values()})

    def announce(self, channel: str, kind: Literal["join", "leave"], info: ClientInfo) -> None:
        """Tell the channel's subscribers on every node that a client came or went."""
        self._broker.announce(PresenceEvent(channel, kind, info))
        metrics = self._metrics
        (metrics.sent_join if kind == "join" else metrics.sent_leave).inc()

    def _deliver_presence(self, event: PresenceEvent) -> None:
        metrics = self._metrics
        (metrics.received_join if event.kind == "join" else metrics.received_leave).inc()
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
        async with self._bounded("history"):
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

    @property
    def num_subscriptions(self) -> int:
        """Subscribers summed over channels (read when metrics are scraped)."""
        return sum(len(s.subscribers) + len(s.catching_up) for s in self._channels.values())

    def num_subscribers(self, channel: str) -> int:
        state = self._channels.get(channel)
        return 0 if state is None else len(state.subscribers) + len(state.catching_up)
