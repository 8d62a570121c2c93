"""Webhooks: what happened on the server, POSTed to the application's URL.

The server's events (:mod:`tidings.hooks`: a client disconnected, a channel
became occupied or vacated, a member joined or left, a publication was made)
are encoded as they happen and POSTed in JSON batches to ``webhooks.url``, in
Pusher's webhook shape with its event names where it has them
(docs/webhooks.md has the exact format)::

    {"time_ms": 1732752000123,
     "events": [{"name": "channel_occupied", "id": "5f0c...-17",
                 "time_ms": 1732751999870, "channel": "chat:lobby"}, ...]}

Why it is built the way it is:

- **Only queueing on the emitter's path.** :meth:`WebhookSender.enqueue` is a
  :data:`~tidings.hooks.Listener`: it filters, encodes the event once (so its
  size is known and its time is when it happened) and appends the bytes to a
  deque. One sender task does all the I/O; batches form by themselves while a
  POST is in flight, so an idle server sends an event at once and a busy one
  sends up to ``max_batch`` per POST, without a timer.
- **Bounded.** At most ``max_queue`` events and ``max_queue_bytes`` bytes wait;
  past either bound the *oldest* are dropped (the newest describe the present
  state best), counted in :attr:`WebhookSender.dropped` and logged as a
  rate-limited WARNING. A receiver that is down costs a fixed amount of memory,
  never more. The response body is read up to 64 KiB and otherwise abandoned,
  and the whole POST (connect to status) is under one ``timeout``, so a hostile
  or stuck receiver cannot make the server hold more either.
- **At-least-once.** A batch leaves the queue only when the receiver answered
  2xx; on a network error, a timeout, a 5xx, a 408 or a 429 it is sent again,
  unchanged but for the envelope's ``time_ms``, after an exponential backoff
  with jitter (``Retry-After`` is honoured, within ``max_retry_delay``). Batches
  go one at a time, so events arrive in the order they were emitted. Every
  event has an id unique across nodes and restarts (a random prefix per
  process, then a sequence number), so a receiver drops the repeats a lost
  response causes.
- **A refusal is final.** Any other status (3xx, 4xx) means the receiver looked
  at the request and will not take it: a wrong URL, a signature it rejects, a
  body it finds too large. Sending the same bytes again gets the same answer,
  and retrying forever would hold every later event behind that one batch; so
  the batch is logged (WARNING, with the status) and dropped, and counted in
  :attr:`WebhookSender.refused`.
- **Signed, with the time inside the signature.** ``X-Tidings-Signature`` is
  the hex HMAC-SHA256 of the raw body with ``webhooks.secret`` (Pusher's
  ``X-Pusher-Signature`` scheme). The body's ``time_ms`` is set at each attempt
  and covered by the signature: a receiver that refuses a body older than a few
  minutes, and remembers event ids for as long, is safe from a captured request
  being replayed. That is why there is no separate timestamp header (it would
  have to be signed too, as Stripe does, for the same effect) and no key
  header (Pusher's ``X-Pusher-Key`` names one of several apps; a tidings server
  has one secret).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import hashlib
import hmac
import logging
import random
import secrets
import time
from collections.abc import Callable

import httpx
import msgspec

from .config import WebhooksConfig, namespace_of
from .hooks import ChannelEvent, DisconnectEvent, Event, Hooks, MemberEvent, PublicationEvent
from .logs import ClientErrorLimiter
from .version import __version__

__all__ = ["Outcome", "WebhookSender", "classify", "encode_event", "sign"]

log = logging.getLogger(__name__)

#: Bytes of a receiver's response body read before the connection is given up:
#: enough for any acknowledgement, too little to matter in memory.
MAX_RESPONSE_BODY = 64 * 1024
#: Retry-After values above this many seconds are clipped to ``max_retry_delay``
#: anyway; this only keeps the float conversion sane.
_MAX_RETRY_AFTER = 24 * 3600.0
SIGNATURE_HEADER = "X-Tidings-Signature"
#: Seconds between two lines about a full queue (each counts the drops since the last).
DROPS_LOG_INTERVAL = 10.0


# -- the wire format -------------------------------------------------------------
#
# One Struct per event name: msgspec writes the tag ("name") first and every
# field in a fixed order, and Raw fields carry the application's JSON as it was
# published, without a decode and re-encode.


class _ChannelOccupied(msgspec.Struct, tag_field="name", tag="channel_occupied"):
    id: str
    time_ms: int
    channel: str


class _ChannelVacated(msgspec.Struct, tag_field="name", tag="channel_vacated"):
    id: str
    time_ms: int
    channel: str


class _MemberAdded(msgspec.Struct, tag_field="name", tag="member_added"):
    id: str
    time_ms: int
    channel: str
    user_id: str
    client_id: str
    conn_info: msgspec.Raw | None
    chan_info: msgspec.Raw | None


class _MemberRemoved(msgspec.Struct, tag_field="name", tag="member_removed"):
    id: str
    time_ms: int
    channel: str
    user_id: str
    client_id: str
    conn_info: msgspec.Raw | None
    chan_info: msgspec.Raw | None


class _ClientDisconnected(msgspec.Struct, tag_field="name", tag="client_disconnected"):
    id: str
    time_ms: int
    client_id: str
    user_id: str
    transport: str
    code: int
    reason: str


class _Publication(msgspec.Struct, tag_field="name", tag="publication"):
    id: str
    time_ms: int
    channel: str
    offset: int
    epoch: str
    data: msgspec.Raw
    user_id: str
    client_id: str


_encoder = msgspec.json.Encoder()


def _raw(value: bytes | None) -> msgspec.Raw | None:
    return None if value is None else msgspec.Raw(value)


def encode_event(event: Event, event_id: str, time_ms: int) -> bytes:
    """One event as the JSON object a receiver gets (docs/webhooks.md)."""
    wire: msgspec.Struct
    if isinstance(event, ChannelEvent):
        kind = _ChannelOccupied if event.kind == "occupied" else _ChannelVacated
        wire = kind(event_id, time_ms, event.channel)
    elif isinstance(event, MemberEvent):
        member = _MemberAdded if event.kind == "join" else _MemberRemoved
        wire = member(
            event_id,
            time_ms,
            event.channel,
            event.user,
            event.client,
            _raw(event.conn_info),
            _raw(event.chan_info),
        )
    elif isinstance(event, DisconnectEvent):
        wire = _ClientDisconnected(
            event_id, time_ms, event.client, event.user, event.transport, event.code, event.reason
        )
    else:
        wire = _Publication(
            event_id,
            time_ms,
            event.channel,
            event.offset,
            event.epoch,
            msgspec.Raw(event.data),
            event.user,
            event.client,
        )
    return _encoder.encode(wire)


def envelope(events: bytes, time_ms: int) -> bytes:
    """The POST body: ``events`` (encoded events joined by commas) and the send time."""
    return b'{"time_ms":%d,"events":[%b]}' % (time_ms, events)


def loggable_url(url: str) -> str:
    """``url`` without its user info and query: what may be written to a log.

    A receiver URL often carries a credential (``https://user:token@host/``,
    ``?key=...``); logs are read by more people than the config file.
    """
    parsed = httpx.URL(url)
    netloc = parsed.netloc.decode("ascii", "replace").rpartition("@")[2]
    return f"{parsed.scheme}://{netloc}{parsed.path}"


class _QuietRequests(logging.Filter):
    """Drops httpx's INFO line for each request to one URL.

    httpx logs every request at INFO with the URL whole, user info and query
    included: a credential in the log, and a line per POST. Our own lines say
    what matters (failures, refusals, drops) with :func:`loggable_url`. Only
    the webhook URL's lines go: an application's own httpx requests stay logged.
    """

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = httpx.URL(url)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (isinstance(args, tuple) and len(args) > 1 and args[1] == self.url)


def sign(secret: bytes, body: bytes) -> str:
    """The ``X-Tidings-Signature`` of ``body``: hex HMAC-SHA256 with ``secret``."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


class Outcome(enum.Enum):
    """What the sender does with a batch after one POST."""

    DELIVERED = "delivered"
    RETRY = "retry"
    REFUSED = "refused"


def classify(status: int) -> Outcome:
    """The one place a receiver's status decides a batch's fate (see the module docstring)."""
    if 200 <= status < 300:
        return Outcome.DELIVERED
    if status >= 500 or status in (408, 429):
        return Outcome.RETRY
    return Outcome.REFUSED


def _retry_after(response: httpx.Response) -> float | None:
    """A ``Retry-After`` in seconds (the HTTP-date form is ignored: the backoff applies)."""
    value = response.headers.get("retry-after", "").strip()
    if not value.isdigit():
        return None
    return min(float(value), _MAX_RETRY_AFTER)


class _State(enum.Enum):
    """The sender's life: built, then sending, then flushing at shutdown, then stopped."""

    IDLE = "idle"
    RUNNING = "running"
    FLUSHING = "flushing"
    STOPPED = "stopped"


class WebhookSender:
    """Queues the server's events and POSTs them in batches. See the module docstring.

    Built from ``[webhooks]`` by the server, which calls :meth:`install` with
    its hooks, :meth:`start` inside the running loop and :meth:`stop` at
    shutdown. The counters are read by tests and by whoever reports metrics.
    """

    __slots__ = (
        "_client",
        "_drops_report",
        "_id_prefix",
        "_inflight",
        "_kinds",
        "_log",
        "_logged_url",
        "_publication_namespaces",
        "_queue",
        "_queued_bytes",
        "_quiet",
        "_secret",
        "_sequence",
        "_state",
        "_task",
        "_unreported_drops",
        "_wake",
        "config",
        "delivered",
        "dropped",
        "random",
        "refused",
        "retries",
    )

    def __init__(self, config: WebhooksConfig) -> None:
        self.config = config
        self._secret = config.secret.encode()
        self._logged_url = loggable_url(config.url)
        self._quiet = _QuietRequests(config.url)
        self._kinds = frozenset(config.events) | (
            {"publication"} if config.publications else frozenset()
        )
        self._publication_namespaces = frozenset(config.publications)
        #: Encoded events waiting, oldest first; their total size.
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued_bytes = 0
        #: Events of the batch being POSTed (out of the queue, not yet delivered).
        self._inflight = 0
        # Ids: unique across nodes and restarts by the random prefix, ordered
        # (and gaps visible to a receiver) by the sequence number.
        self._id_prefix = secrets.token_hex(8)
        self._sequence = 0
        self._state = _State.IDLE
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._log = ClientErrorLimiter(max_lines=1, interval=10.0)
        # Drops not logged yet, and the timer that will (see _count_drops).
        self._unreported_drops = 0
        self._drops_report: asyncio.TimerHandle | None = None
        #: The jitter's source (a test may seed it).
        self.random: Callable[[float, float], float] = random.uniform
        #: Events the receiver acknowledged (2xx).
        self.delivered = 0
        #: Events dropped unsent: the queue was full, or the server stopped first.
        self.dropped = 0
        #: Events in batches the receiver refused (3xx, 4xx but 408 and 429).
        self.refused = 0
        #: POSTs that failed and were (or would have been) sent again.
        self.retries = 0

    @property
    def queued(self) -> int:
        """Events waiting (the batch in flight not included)."""
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    # -- the emitter's side ---------------------------------------------------

    def install(self, hooks: Hooks) -> None:
        """Listen to ``hooks``' events, and ask the hub for publications of our namespaces.

        With nothing to send (``events`` empty, no ``publications``) it does not
        listen, so that emitters keep skipping the events nobody wants.
        """
        if not self._kinds:
            return
        hooks.add_listener(self.enqueue)
        if self._publication_namespaces:
            wanted = hooks.publication_namespaces or frozenset()
            hooks.publication_namespaces = wanted | self._publication_namespaces

    def enqueue(self, event: Event) -> None:
        """Queue ``event`` if it is one we send (a :data:`~tidings.hooks.Listener`)."""
        if event.kind not in self._kinds or self._state is _State.STOPPED:
            return
        if (
            isinstance(event, PublicationEvent)
            and namespace_of(event.channel) not in self._publication_namespaces
        ):
            return  # another listener asked the hub for this namespace
        self._sequence += 1
        encoded = encode_event(
            event, f"{self._id_prefix}-{self._sequence}", time.time_ns() // 1_000_000
        )
        self._push(encoded)

    def _push(self, encoded: bytes) -> None:
        """Append one encoded event, dropping the oldest past either bound."""
        config, queue = self.config, self._queue
        size = len(encoded)
        dropped = 0
        if size > config.max_queue_bytes:
            dropped = 1  # larger than the whole queue may hold: not even alone
        else:
            while queue and (
                len(queue) >= config.max_queue or self._queued_bytes + size > config.max_queue_bytes
            ):
                self._queued_bytes -= len(queue.popleft())
                dropped += 1
            queue.append(encoded)
            self._queued_bytes += size
            self._wake.set()
        if dropped:
            self._count_drops(dropped)

    def _count_drops(self, dropped: int) -> None:
        """Count drops; log them at most once per :data:`DROPS_LOG_INTERVAL`.

        Not through :class:`~tidings.logs.ClientErrorLimiter`: with the queue
        full every event drops one, and the limiter's call on each made an
        enqueue into a full queue take 9.5-10.3 µs against 2.4-5.3 µs without
        it (timeit, 200,000 member_added events, same run, a loaded 2-core
        machine); here a drop is two additions while a report is pending, and
        the timer logs their sum.
        """
        self.dropped += dropped
        self._unreported_drops += dropped
        if self._drops_report is None:
            self._report_drops()

    def _report_drops(self) -> None:
        """One WARNING for the drops since the last, then a timer for the next ones."""
        self._drops_report = None
        if not self._unreported_drops:
            return
        config = self.config
        log.warning(
            "webhook queue full (webhooks.max_queue %d events, max_queue_bytes %d): "
            "%d oldest events dropped, %d since start",
            config.max_queue,
            config.max_queue_bytes,
            self._unreported_drops,
            self.dropped,
        )
        self._unreported_drops = 0
        if self._state is _State.STOPPED:
            return
        with contextlib.suppress(RuntimeError):  # no running loop: every drop is logged
            loop = asyncio.get_running_loop()
            self._drops_report = loop.call_later(DROPS_LOG_INTERVAL, self._report_drops)

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP client and start the one sender task."""
        if self._state is not _State.IDLE:
            raise RuntimeError(f"webhook sender already {self._state.value}")
        config = self.config
        self._client = httpx.AsyncClient(
            # The total per POST is enforced around it (_post); this bounds each phase.
            timeout=httpx.Timeout(config.timeout),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            follow_redirects=False,
            headers={"User-Agent": f"tidings/{__version__}", "Content-Type": "application/json"},
        )
        self._state = _State.RUNNING
        logging.getLogger("httpx").addFilter(self._quiet)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="webhooks")
        if not self._secret:
            log.warning(
                "webhooks.secret is empty: webhook bodies are sent unsigned, and a receiver "
                "cannot tell them from anyone's POST (docs/webhooks.md)"
            )
        log.info("webhooks: events %s to %s", ", ".join(sorted(self._kinds)), self._logged_url)

    async def stop(self, timeout: float) -> None:
        """Deliver what is queued, for at most ``timeout`` seconds; then drop the rest."""
        task = self._task
        if self._state is not _State.RUNNING or task is None:
            self._state = _State.STOPPED
            return
        self._state = _State.FLUSHING
        self._wake.set()
        done, _ = await asyncio.wait((task,), timeout=timeout)
        self._state = _State.STOPPED
        if self._drops_report is not None:
            self._drops_report.cancel()
            self._report_drops()
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        elif not task.cancelled() and task.exception() is not None:
            log.error("webhook sender failed", exc_info=task.exception())
        unsent = len(self._queue) + self._inflight
        if unsent:
            self.dropped += unsent
            log.warning(
                "webhooks: %d events not delivered within the shutdown timeout (%gs), dropped",
                unsent,
                timeout,
            )
        self._queue.clear()
        self._queued_bytes = 0
        self._inflight = 0
        if self._client is not None:
            await self._client.aclose()
        logging.getLogger("httpx").removeFilter(self._quiet)

    # -- the sender task -------------------------------------------------------

    async def _run(self) -> None:
        """Send batches, one at a time, until stopped with an empty queue."""
        while True:
            if not self._queue:
                if self._state is not _State.RUNNING:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._deliver(self._take_batch())

    def _take_batch(self) -> list[bytes]:
        """The oldest events, up to ``max_batch`` of them and ``max_batch_bytes`` (one at least)."""
        config, queue = self.config, self._queue
        batch = [queue.popleft()]
        size = len(batch[0])
        while queue and len(batch) < config.max_batch:
            nxt = len(queue[0])
            if size + nxt > config.max_batch_bytes:
                break
            batch.append(queue.popleft())
            size += nxt
        self._queued_bytes -= size
        self._inflight = len(batch)
        return batch

    async def _deliver(self, batch: list[bytes]) -> None:
        """POST one batch until it is delivered or refused (see :func:`classify`)."""
        events = b",".join(batch)
        attempt = 0
        while True:
            body = envelope(events, time.time_ns() // 1_000_000)
            status, retry_after, problem = await self._post(body)
            outcome = Outcome.RETRY if status is None else classify(status)
            if outcome is Outcome.DELIVERED:
                self.delivered += len(batch)
                break
            if outcome is Outcome.REFUSED:
                self.refused += len(batch)
                self._log.log(
                    log,
                    logging.WARNING,
                    "webhook receiver %s refused a batch of %d events with %s: dropped "
                    "(a refusal is not retried; docs/webhooks.md)",
                    self._logged_url,
                    len(batch),
                    status,
                )
                break
            attempt += 1
            self.retries += 1
            delay = self._backoff(attempt, retry_after)
            self._log.log(
                log,
                logging.WARNING,
                "webhook POST to %s failed (%s): attempt %d, retrying in %.2fs",
                self._logged_url,
                problem,
                attempt,
                delay,
            )
            await asyncio.sleep(delay)
        self._inflight = 0

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before attempt ``attempt + 1``: doubling, half of it jittered, capped.

        Half fixed so that a receiver that is down is never hit back to back;
        half random so that many nodes that failed together spread out.
        """
        config = self.config
        ceiling = min(config.max_retry_delay, config.retry_delay * 2.0 ** min(attempt - 1, 32))
        delay = ceiling / 2 + self.random(0.0, ceiling / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, config.max_retry_delay))
        return delay

    async def _post(self, body: bytes) -> tuple[int | None, float | None, str]:
        """One POST: (status, Retry-After, problem); status None when there was no answer."""
        client = self._client
        assert client is not None
        headers = {SIGNATURE_HEADER: sign(self._secret, body)} if self._secret else {}
        timeout = self.config.timeout
        status: int | None = None
        retry_after: float | None = None
        try:
            async with asyncio.timeout(timeout):
                async with client.stream(
                    "POST", self.config.url, content=body, headers=headers
                ) as response:
                    status = response.status_code
                    if classify(status) is Outcome.RETRY:
                        retry_after = _retry_after(response)
                    # Read a short acknowledgement so that the connection is
                    # kept alive; past the cap it is closed rather than drained.
                    read = 0
                    async for chunk in response.aiter_raw():
                        read += len(chunk)
                        if read > MAX_RESPONSE_BODY:
                            break
        except TimeoutError:
            if status is None:
                return None, None, f"no answer within webhooks.timeout {timeout:g}s"
        except httpx.HTTPError as exc:
            if status is None:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                return None, None, problem
        # The status decides even when its body was cut short: it was the answer.
        return status, retry_after, f"status {status}"
