"""The NATS broker: fan-out between nodes over NATS core, and nothing else.

NATS core keeps no messages, so this broker has no shared history and no
shared offsets. It is the simple honest option, for deployments that need
fan-out only (notifications, live dashboards) and already run NATS:

* A publication goes to the subject ``<prefix>.<channel>``, the channel name
  base64url-encoded so that any name is one valid subject token (NATS reserves
  ``.``, ``*``, ``>`` and whitespace).
* Each node numbers the publications of a channel as they reach it, under an
  epoch of its own: positions are meaningful on that node only. A client that
  resumes on another node, or after the node lost its subscription (no
  subscribers left), is told "not recovered" — never handed a silent gap. A
  client that resumes on the same node having missed nothing is recovered.
* A publish is answered once nats-server has processed it, so that it went
  to every node whose link was up (a node whose link was down has a hole to
  report); the result has no position (offset 0, empty epoch), as Centrifugo
  answers for channels without history.
* Reading history (the server API's ``history``, the WebSocket ``history``
  command) is refused with ``NOT_AVAILABLE`` (code 108).
* Publish options: ``skip_history`` travels in the envelope and the
  receiving nodes stamp it with their current position without numbering it;
  ``exclude`` travels in the envelope; ``idempotency_key`` is remembered by
  the publishing node only (:class:`~tidings.brokers.base.IdempotencyTable`):
  a repeat sent to another node publishes again.
* Channel occupancy (the ``occupied``/``vacated`` events) is per node: NATS
  core keeps no shared state to count nodes in, so each node fires its own.

NATS core also drops messages on their way to a node: nats-py discards what
arrives while a subscription already holds ``pending_limit`` messages (a slow
consumer), and whatever is published while the connection is down never
arrives. Numbering on arrival would close such a hole without a trace and
tell clients "recovered" across it. Of the two honest answers — JetStream,
whose stream sequence would give real offsets and history, or telling
subscribers plainly — this broker does the second: each loss is detected
(nats-py's slow-consumer error, its disconnected callback) and restarts the
affected channels (the one whose subscription dropped; every channel on a
disconnect) at a new epoch. The hub is told at once
(:meth:`~tidings.brokers.base.Broker.bind_restarted`) and makes their
subscribers resync, and a resume from before the loss is "not recovered". One
WARNING per event, not per message. JetStream is the way to real history with
NATS; ``docs/deployment.md`` says what it would take.

Reconnection is nats-py's (forever, with a short wait); ``healthy`` follows
the connection. For history and recovery across nodes, use the Redis broker.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import time
from collections import deque
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.errors import FlushTimeoutError, NoRespondersError, SlowConsumerError

from ..errors import ErrorCode, ProtocolError
from ..stream import EMPTY, ClientInfo, HistoryPolicy, Position, Publication
from . import envelope
from .base import Broker, IdempotencyTable, NodeMessage, unavailable

__all__ = ["NatsBroker"]

log = logging.getLogger(__name__)

#: nats-py's own default: messages of one subscription held before it drops more.
DEFAULT_PENDING_LIMIT = 512 * 1024
#: Seconds a PING may wait for its PONG after our caller gave up (see _two_pongs).
PONG_PATIENCE = 600


class _Stream:
    """This node's numbering of one channel, and where it lost messages.

    A loss is noticed while the messages that came before it still wait in
    the subscription's queue (nats-py drops only when that queue is full, and
    a disconnect may leave some in it). Those are numbered in the current
    epoch as usual; the new epoch starts at the hole, right before the first
    message after it. Restarting at the moment of the loss instead would put
    the hole inside the new epoch: a client at the last queued message's
    position would resume "recovered" across it.
    """

    __slots__ = ("epoch", "handed", "holes", "offset", "seen", "sub")

    def __init__(self) -> None:
        self.epoch = secrets.token_urlsafe(6)
        self.offset = 0
        # Whether anyone may hold a position in this epoch: a publication was
        # numbered in it, or its position was read (a subscribe, a recovery).
        self.seen = False
        self.sub: Subscription | None = None
        # Messages the subscription has handed over (malformed ones too), and
        # the counts of handed messages after which a loss lies, oldest first.
        self.handed = 0
        self.holes: deque[int] = deque()

    def restart(self) -> bool:
        """Start a new epoch at a hole; False when the current one was never
        seen, so that no position in it can hide the loss and the previous
        restart's signal still holds (drops with no delivery between are one event)."""
        if not self.seen:
            return False
        self.epoch = secrets.token_urlsafe(6)
        self.offset = 0
        self.seen = False
        return True

    def read(self) -> Position:
        """The current position, which its reader may now hold."""
        self.seen = True
        return Position(self.epoch, self.offset)


class NatsBroker(Broker):
    """Fan-out through NATS core; no shared history. See the module docstring."""

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        prefix: str = "tidings",
        subscribe_timeout: float = 5.0,
        reconnect_wait: float = 0.5,
        pending_limit: int = DEFAULT_PENDING_LIMIT,
        idempotency_window: float = 300.0,
        max_idempotency_keys: int = 100_000,
    ) -> None:
        """``pending_limit`` is how many messages of one channel may wait in this
        node before nats-py drops more (a slow consumer, which restarts the channel)."""
        if pending_limit < 1:
            raise ValueError(f"broker.nats_pending_limit must be at least 1, not {pending_limit}")
        if not prefix or any(c in prefix for c in " \t\r\n*>") or ".." in f".{prefix}.":
            raise ValueError(f"broker.prefix {prefix!r} is not a valid NATS subject prefix")
        self._url = url
        self._prefix = prefix
        self._subscribe_timeout = subscribe_timeout
        self._reconnect_wait = reconnect_wait
        self._pending_limit = pending_limit
        self._idempotency = IdempotencyTable(idempotency_window, max_idempotency_keys)
        self._nc: NATS | None = None
        self._streams: dict[str, _Stream] = {}
        self._connector: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # False from a disconnect until the server has confirmed our resubscriptions.
        self._live = False
        # Set by close(): nats-py reports its own close as a disconnect too.
        self._closing = False
        #: This node's name and what it does with a message sent to it (listen_node).
        self._node: tuple[str, NodeMessage] | None = None

    def _subject(self, channel: str) -> str:
        token = base64.urlsafe_b64encode(channel.encode()).rstrip(b"=").decode()
        return f"{self._prefix}.{token}"

    # -- lifecycle ---------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._live and self._nc is not None and self._nc.is_connected

    async def start(self) -> None:
        self._connector = asyncio.get_running_loop().create_task(self._connect())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._connector), self._subscribe_timeout)
        if not self.healthy:
            log.warning("nats at %s is not reachable yet; retrying in the background", self._url)

    async def _connect(self) -> None:
        """The first connection; nats-py reconnects by itself after that."""
        failures = 0
        while True:
            try:
                self._nc = await nats.connect(
                    self._url,
                    name="tidings",
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=self._reconnect_wait,
                    connect_timeout=2,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    error_cb=self._on_error,
                )
            except (NatsError, OSError) as exc:
                if failures == 0:
                    log.warning("cannot reach nats at %s (%s); retrying", self._url, exc)
                failures += 1
                await asyncio.sleep(min(5.0, 0.1 * 2**failures))
                continue
            self._live = True
            log.info("connected to nats at %s", self._url)
            if self._node is not None:
                await self._subscribe_node(self._nc)
            return

    async def listen_node(self, node: str, on_message: NodeMessage) -> None:
        """Subscribe this node's own subject now, or on the first connection
        (nats-py resubscribes it after a reconnect, as every subscription)."""
        self._node = (node, on_message)
        nc = self._nc
        if nc is not None and nc.is_connected:
            await self._subscribe_node(nc)

    async def _subscribe_node(self, nc: NATS) -> None:
        assert self._node is not None
        node, on_message = self._node

        async def on_node_message(msg: Msg) -> None:
            on_message(msg.data)
            if msg.reply:
                await msg.respond(b"")  # the sender learns that a node got it

        try:
            await nc.subscribe(self._node_subject(node), cb=on_node_message)
        except (NatsError, OSError) as exc:
            log.warning("cannot subscribe this node's own subject: %s", exc)

    async def send_node(self, node: str, message: bytes) -> bool:
        """A request, not a publish: its answer says whether a node got it."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise unavailable("not connected to nats")
        try:
            await nc.request(self._node_subject(node), message, timeout=self._subscribe_timeout)
        except (NoRespondersError, TimeoutError):
            return False
        except (NatsError, OSError) as exc:
            raise unavailable(exc) from exc
        return True

    def _node_subject(self, node: str) -> str:
        # Three tokens (channels have two); the name base64 like a channel's.
        token = base64.urlsafe_b64encode(node.encode()).rstrip(b"=").decode()
        return f"{self._prefix}.n.{token}"

    async def close(self) -> None:
        self._closing = True
        if self._connector is not None:
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connector
        for task in list(self._tasks):
            task.cancel()
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.close()

    async def _on_disconnected(self) -> None:
        self._live = False
        if self._closing:
            return  # our own close(), not a lost connection
        # What is published while we are away never reaches us: every channel
        # has a hole behind the messages still queued. A copy: a subscriber told
        # to resync may leave at once, and the hub then drops its channel.
        restarting = [
            channel
            for channel, stream in list(self._streams.items())
            if self._lost(channel, stream)
        ]
        log.warning(
            "lost the nats connection; reconnecting. Publications meanwhile are lost "
            "to this node: %d channels start a new epoch, their subscribers resync",
            len(restarting),
        )

    def _lost(self, channel: str, stream: _Stream) -> bool:
        """Note a hole behind the messages of ``stream`` still queued; True when
        it is a new event (not the hole already noted, nor an unseen epoch)."""
        queued = 0 if stream.sub is None else stream.sub.pending_msgs
        at = stream.handed + queued
        if stream.holes and stream.holes[-1] >= at:
            return False
        if queued:
            stream.holes.append(at)
            return True
        return self._restart(channel, stream)

    def _restart(self, channel: str, stream: _Stream) -> bool:
        """Start the channel's new epoch and tell the hub, whose subscribers resync."""
        if not stream.restart():
            return False
        if self._restarted is not None:
            self._restarted(channel, Position(stream.epoch, stream.offset))
        return True

    async def _on_reconnected(self) -> None:
        task = asyncio.get_running_loop().create_task(self._confirm_resubscribed())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _confirm_resubscribed(self) -> None:
        """nats-py resent our SUBs; once the server answers a PING, delivery is live."""
        nc = self._nc
        if nc is None:
            return
        try:
            await self._server_has_our_commands(nc)
        except (NatsError, OSError) as exc:
            log.warning("nats reconnected but did not answer a ping: %s", exc)
            return
        self._live = True
        log.info("reconnected to nats; %d channels resubscribed", len(self._streams))

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, SlowConsumerError):
            self._dropped(exc)
            return
        # Connection errors are followed by the disconnected callback, which
        # says what matters; each failed reconnect attempt would repeat them.
        log.debug("nats: %s", exc)

    def _dropped(self, exc: SlowConsumerError) -> None:
        """nats-py dropped a message of a subscription that held ``pending_limit``."""
        channel = self._channel_of(exc.subject)
        stream = None if channel is None else self._streams.get(channel)
        if channel is None or stream is None or stream.sub is not exc.sub:
            return  # a subscription we have dropped meanwhile
        if self._lost(channel, stream):
            log.warning(
                "nats dropped messages of %s on this node (slow consumer: %d waiting): "
                "it starts a new epoch, its subscribers resync",
                channel,
                self._pending_limit,
            )

    def _channel_of(self, subject: str) -> str | None:
        token = subject.removeprefix(f"{self._prefix}.")
        try:
            return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        except ValueError:
            return None

    # -- publishing and reading --------------------------------------------

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
        """Send to every node; ``history`` is moot, NATS core keeps nothing.

        Answered once nats-server has processed the message, so that it went
        to every node whose link is up (a node whose link is down has a hole
        to report). Answering when nats-py has merely buffered it would lose a
        publication sent just as the link drops, with no node to notice.

        An ``idempotency_key`` is taken before the message is sent (results
        have no position here, so a repeat's answer is known at once) and
        given back if sending fails, so that a concurrent repeat cannot send
        it twice and a failed first attempt can be retried.
        """
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise unavailable("not connected to nats")
        if idempotency_key:
            if self._idempotency.get(channel, idempotency_key) is not None:
                return EMPTY
            self._idempotency.put(channel, idempotency_key, EMPTY)
        now_ms = int(time.time() * 1000)
        body = envelope.encode(data, info, tags, now_ms, exclude=exclude, transient=skip_history)
        try:
            await nc.publish(self._subject(channel), body)
            await self._server_has_our_commands(nc)
        except (NatsError, OSError) as exc:
            if idempotency_key:
                self._idempotency.forget(channel, idempotency_key)
            raise unavailable(exc) from exc
        return Publication(channel, 0, "", data, info, tags, now_ms)

    async def history(
        self,
        channel: str,
        *,
        since: Position | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> tuple[list[Publication], Position]:
        stream = self._streams.get(channel)
        top = EMPTY if stream is None else stream.read()
        if since is None and limit != 0:
            raise ProtocolError(
                ErrorCode.NOT_AVAILABLE, "history is not available with the nats broker"
            )
        # The position only (limit 0), or a recovery check: no publications are
        # kept, so only a client that missed nothing here is recovered.
        return [], top

    # -- subscribing -------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        nc = self._nc
        if nc is None or not self.healthy:
            raise unavailable("not connected to nats")
        stream = self._streams.get(channel)
        if stream is None:
            stream = self._streams[channel] = _Stream()
        if stream.sub is None:

            async def on_message(msg: Msg) -> None:
                self._on_message(channel, stream, msg)

            stream.sub = await nc.subscribe(
                self._subject(channel), cb=on_message, pending_msgs_limit=self._pending_limit
            )
        try:
            await self._server_has_our_commands(nc)
        except (NatsError, OSError) as exc:
            raise unavailable(exc) from exc

    async def _server_has_our_commands(self, nc: NATS) -> None:
        """Return once nats-server has processed every command sent so far (our SUBs).

        A PONG proves that the server processed what was on the wire before its
        PING. But nats-py writes ``flush()``'s PING straight to the socket, while
        a SUB waits in its pending buffer for the flusher task. So one flush can
        come back before the SUB has even been sent, and a publication made just
        after "subscribing" is silently missed (seen in nats-server's trace:
        PING, PONG, another client's PUB, then our SUB). By the first PONG the
        flusher has written the SUB, so the second PING follows it on the wire.
        """
        pongs = asyncio.get_running_loop().create_task(self._two_pongs(nc))
        self._tasks.add(pongs)
        pongs.add_done_callback(self._tasks.discard)
        try:
            await asyncio.wait_for(asyncio.shield(pongs), self._subscribe_timeout)
        except TimeoutError:
            raise FlushTimeoutError from None

    @staticmethod
    async def _two_pongs(nc: NATS) -> None:
        """Two PING/PONG round trips, left running when our caller gives up.

        nats-py 2.16 cancels a flush's future when its own timeout expires but
        leaves it in line for the next PONG; when that PONG comes, setting the
        cancelled future raises in the read loop, which logs an ERROR with a
        traceback and stops reading: the node would hear nothing more while
        looking connected. So our bound is on the wait (shielded), and the
        flush is given until nats-py's stale-connection check (two missed
        pings, 2 minutes apart) has replaced a dead link, which drops its
        PONGs' futures: past that, nothing can answer them.
        """
        await nc.flush(timeout=PONG_PATIENCE)
        await nc.flush(timeout=PONG_PATIENCE)

    def unsubscribe(self, channel: str) -> None:
        stream = self._streams.pop(channel, None)
        if stream is None or stream.sub is None:
            return
        task = asyncio.get_running_loop().create_task(self._drop(stream.sub))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _drop(sub: Subscription) -> None:
        with contextlib.suppress(NatsError, OSError):
            await sub.unsubscribe()

    def _on_message(self, channel: str, stream: _Stream, msg: Msg) -> None:
        if self._streams.get(channel) is not stream:
            return  # unsubscribed meanwhile
        stream.handed += 1
        try:
            body = envelope.read(msg.data)
        except envelope.MalformedEnvelope as exc:
            log.warning("dropped a malformed message on %s: %s", msg.subject, exc)
        else:
            if not body.transient:  # a live-only one takes no offset (Hub docstring)
                stream.offset += 1
            stream.seen = True
            if self._deliver is not None:
                self._deliver(body.stamped(channel, stream.offset, stream.epoch))
        if stream.holes and stream.holes[0] == stream.handed:
            # The last message before a hole: restart now, not at the next
            # message, which may be long in coming (or dropped too).
            stream.holes.popleft()
            self._restart(channel, stream)
