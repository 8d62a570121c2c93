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
  subscribers left, or a NATS disconnect, which starts a new epoch for every
  channel), is told "not recovered" — never handed a silent gap. A client that
  resumes on the same node having missed nothing is recovered.
* The publish result has no position (offset 0, empty epoch), as Centrifugo
  answers for channels without history.
* Reading history (the server API's ``history``, the WebSocket ``history``
  command) is refused with ``NOT_AVAILABLE`` (code 108).

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
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from ..errors import ErrorCode, ProtocolError
from ..stream import EMPTY, ClientInfo, HistoryPolicy, Position, Publication
from . import envelope
from .base import Broker, unavailable

__all__ = ["NatsBroker"]

log = logging.getLogger(__name__)


class _Stream:
    """This node's numbering of one channel."""

    __slots__ = ("epoch", "offset", "sub")

    def __init__(self) -> None:
        self.epoch = secrets.token_urlsafe(6)
        self.offset = 0
        self.sub: Subscription | None = None


class NatsBroker(Broker):
    """Fan-out through NATS core; no shared history. See the module docstring."""

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        prefix: str = "tidings",
        subscribe_timeout: float = 5.0,
        reconnect_wait: float = 0.5,
    ) -> None:
        if not prefix or any(c in prefix for c in " \t\r\n*>") or ".." in f".{prefix}.":
            raise ValueError(f"broker.prefix {prefix!r} is not a valid NATS subject prefix")
        self._url = url
        self._prefix = prefix
        self._subscribe_timeout = subscribe_timeout
        self._reconnect_wait = reconnect_wait
        self._nc: NATS | None = None
        self._streams: dict[str, _Stream] = {}
        self._connector: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # False from a disconnect until the server has confirmed our resubscriptions.
        self._live = False
        # Set by close(): nats-py reports its own close as a disconnect too.
        self._closing = False

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
            return

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
        log.warning("lost the nats connection; reconnecting")
        # What is published while we are away never reaches us: a new epoch for
        # every channel makes clients that resume from before it "not recovered".
        for stream in self._streams.values():
            stream.epoch = secrets.token_urlsafe(6)
            stream.offset = 0

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
        log.debug("nats: %s", exc)

    # -- publishing and reading --------------------------------------------

    async def publish(
        self,
        channel: str,
        data: bytes,
        *,
        history: HistoryPolicy,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
    ) -> Publication:
        """Send to every node; ``history`` is moot, NATS core keeps nothing."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise unavailable("not connected to nats")
        now_ms = int(time.time() * 1000)
        try:
            await nc.publish(self._subject(channel), envelope.encode(data, info, tags, now_ms))
        except (NatsError, OSError) as exc:
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
        top = EMPTY if stream is None else Position(stream.epoch, stream.offset)
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

            stream.sub = await nc.subscribe(self._subject(channel), cb=on_message)
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
        timeout = self._subscribe_timeout
        await nc.flush(timeout=timeout)  # type: ignore[arg-type]
        await nc.flush(timeout=timeout)  # type: ignore[arg-type]

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
        try:
            pub = envelope.decode(channel, stream.offset + 1, stream.epoch, msg.data)
        except envelope.MalformedEnvelope as exc:
            log.warning("dropped a malformed message on %s: %s", msg.subject, exc)
            return
        stream.offset += 1
        if self._deliver is not None:
            self._deliver(pub)
