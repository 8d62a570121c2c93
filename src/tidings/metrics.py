"""Prometheus metrics: what moved (counters, durations) and what is live (gauges).

Two kinds of figures, kept in two ways (docs/observability.md lists them all):

- **What moves** — publications sent and received, reply errors, server
  disconnects, command durations, HTTP responses by status, refusals — is
  counted by the component where it happens, through the handles of one
  :class:`Metrics` the server builds and passes in (DESIGN principle 6: no
  registry looked up from a global). On the fan-out path a count moves once
  per publication, with the number of subscribers it reached, never inside
  the per-subscriber loop; and there it is not a prometheus_client object
  (which takes a lock per ``inc``/``observe``: 3.6 µs of a publication's
  metrics, a third of a delivery to one subscriber) but plain arithmetic on
  a ``__slots__`` tally (:class:`_Count`, :class:`_Observations`: 0.6 µs),
  copied into prometheus_client's objects when they are read — before a
  scrape, and with the live figures each second (:meth:`Metrics.refresh`).
- **What is live** — clients by transport, users, channels, subscriptions,
  held long-polls, open sockets — is never moved per connection: it is read
  from the registries that keep those things anyway (the hub's channels, each
  transport's set of streams) when Prometheus scrapes: a server hands
  :meth:`Metrics.read_live` the function that reads its :class:`Live`.

**Centrifugo's names.** Where a figure means what one of Centrifugo's does,
it has Centrifugo's name and labels, so its Grafana dashboard (13039) reads
tidings. Centrifugo's counters are named without ``_total`` (its Go client
adds none), and prometheus_client's ``Counter`` always appends it; so those
are kept in gauges and exposed as *untyped* families with the exact name
(:class:`_Exposition`): ``rate()`` treats them as it treats a counter. tidings'
own counters are ordinary ``Counter``\\ s (``tidings_…_total``).

**Several workers** (``--workers N``): prometheus_client's multiprocess mode.
The supervisor makes a temporary directory (:func:`multiprocess_directory`)
that every worker writes its counters to (memory-mapped files), and any
worker answering a scrape sums every worker's files, so one scrape shows the
whole machine. Live figures cannot be read at scrape time from other
processes; each worker copies its own into ``livesum`` gauges once a second
(:data:`REFRESH_INTERVAL`) and just before it answers a scrape, so a scrape
shows the other workers' live figures at most a second old — a dead
worker's live gauges are removed by the supervisor (:func:`forget_process`).
The alternative (the supervisor asking every worker at each scrape) needs a
channel between processes and a wait on the slowest worker in each scrape;
a second's staleness in a gauge scraped every 15 s is worth neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import tempfile
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    generate_latest,
)
from prometheus_client import values as _values
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .version import __version__

__all__ = [
    "CONTENT_TYPE",
    "MULTIPROCESS_ENV",
    "REFRESH_INTERVAL",
    "Live",
    "Metrics",
    "forget_process",
    "multiprocess_directory",
]

#: The exposition's media type (Prometheus text format 0.0.4).
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: prometheus_client's own variable: set, every process writes its figures there.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Seconds between two copies of a worker's live figures into the shared files,
#: and between two measures of the event loop's lag.
REFRESH_INTERVAL = 1.0

#: Centrifugo's counters, exposed untyped under their exact names (see the module docstring).
_CENTRIFUGO_COUNTERS = frozenset(
    {
        "centrifugo_node_messages_sent_count",
        "centrifugo_node_messages_received_count",
        "centrifugo_client_num_reply_errors",
        "centrifugo_client_num_server_disconnects",
        "centrifugo_client_num_server_unsubscribes",
        "centrifugo_client_recover",
        "centrifugo_transport_messages_sent",
        "centrifugo_transport_messages_sent_size",
        "centrifugo_transport_connect_count",
    }
)

#: Realtime transports, as the ``transport`` label names them.
TRANSPORTS = ("websocket", "emulation", "sse", "longpoll")

#: Webhook outcomes, as ``tidings_webhook_events_total{outcome}`` names them.
WEBHOOK_OUTCOMES = ("delivered", "dropped", "refused")

# Latency buckets from 0.1 ms (a local hook) to 10 s (a stalled backend).
_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Live(NamedTuple):
    """What a node holds now, read from its registries at scrape time."""

    #: Realtime clients by transport (:data:`TRANSPORTS`): WebSocket and
    #: emulation sessions, SSE streams, held long-polls. Not keep-alives.
    clients: Mapping[str, int]
    #: Every open socket (what ``limits.max_connections`` counts).
    connections: int
    users: int
    channels: int
    subscriptions: int
    #: Webhook events by outcome (:data:`WEBHOOK_OUTCOMES`); empty without webhooks.
    webhook_events: Mapping[str, int]
    #: Failed webhook POSTs sent again.
    webhook_retries: int


LiveSource = Callable[[], Live]


def _live_families(live: Live) -> Iterator[Metric]:
    """The families of one :class:`Live` reading: the one place their names are given."""
    total = sum(live.clients.values())
    yield GaugeMetricFamily(
        "centrifugo_node_num_clients",
        "Realtime clients on this node (WebSocket and emulation sessions, SSE streams, "
        "held long-polls).",
        value=total,
    )
    yield GaugeMetricFamily(
        "centrifugo_node_num_users", "Distinct users of this node's sessions.", value=live.users
    )
    yield GaugeMetricFamily(
        "centrifugo_node_num_channels",
        "Channels with one or more subscribers on this node.",
        value=live.channels,
    )
    yield GaugeMetricFamily(
        "centrifugo_node_num_subscriptions",
        "Subscriptions on this node (a client in a channel).",
        value=live.subscriptions,
    )
    yield GaugeMetricFamily(
        "centrifugo_node_num_nodes", "Nodes (processes) answering in this figure.", value=1
    )
    by_transport = GaugeMetricFamily(
        "tidings_clients", "Realtime clients by transport.", labels=["transport"]
    )
    for transport in TRANSPORTS:
        by_transport.add_metric([transport], live.clients.get(transport, 0))
    yield by_transport
    yield GaugeMetricFamily(
        "tidings_long_polls_held",
        "Long-polls held open waiting for a publication.",
        value=live.clients.get("longpoll", 0),
    )
    yield GaugeMetricFamily(
        "tidings_connections",
        "Open sockets of every kind, idle keep-alives included (what "
        "limits.max_connections counts).",
        value=live.connections,
    )
    if live.webhook_events:
        events = CounterMetricFamily(
            "tidings_webhook_events", "Webhook events by outcome.", labels=["outcome"]
        )
        for outcome in WEBHOOK_OUTCOMES:
            events.add_metric([outcome], live.webhook_events.get(outcome, 0))
        yield events
        yield CounterMetricFamily(
            "tidings_webhook_retries", "Webhook POSTs sent again.", value=live.webhook_retries
        )


class _LiveMirror:
    """A worker's live figures copied into the shared files (multiprocess mode).

    Gauges are ``livesum`` (a dead worker's are dropped, the others summed);
    the webhook counters move by what changed since the last copy.
    """

    def __init__(self) -> None:
        self._gauges: dict[str, Gauge] = {}
        self._counters: dict[str, Counter] = {}
        self._copied: dict[tuple[str, tuple[str, ...]], float] = {}

    def copy(self, live: Live) -> None:
        for family in _live_families(live):
            for sample in family.samples:
                if family.type == "counter":
                    if not sample.name.endswith("_total"):
                        continue  # _created
                    counter = self._counter(family)
                    labels = tuple(sample.labels.values())
                    key = (family.name, labels)
                    delta = sample.value - self._copied.get(key, 0.0)
                    self._copied[key] = sample.value
                    if delta > 0:
                        (counter.labels(*labels) if labels else counter).inc(delta)
                else:
                    gauge = self._gauge(family)
                    labels = tuple(sample.labels.values())
                    (gauge.labels(*labels) if labels else gauge).set(sample.value)

    def _gauge(self, family: Metric) -> Gauge:
        gauge = self._gauges.get(family.name)
        if gauge is None:
            labels = list(family.samples[0].labels) if family.samples else []
            gauge = Gauge(
                family.name,
                family.documentation,
                labels,
                registry=None,
                multiprocess_mode="livesum",
            )
            self._gauges[family.name] = gauge
        return gauge

    def _counter(self, family: Metric) -> Counter:
        counter = self._counters.get(family.name)
        if counter is None:
            labels = [name for name in family.samples[0].labels] if family.samples else []
            counter = Counter(family.name, family.documentation, labels, registry=None)
            self._counters[family.name] = counter
        return counter


class _ProcessMirror:
    """This worker's RSS and open descriptors, one series per pid (multiprocess
    mode, where prometheus_client's ProcessCollector would show the scraped
    worker's alone)."""

    def __init__(self) -> None:
        self._rss = Gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            registry=None,
            multiprocess_mode="liveall",
        )
        self._fds = Gauge(
            "process_open_fds",
            "Number of open file descriptors.",
            registry=None,
            multiprocess_mode="liveall",
        )
        self._page = os.sysconf("SC_PAGE_SIZE")

    def copy(self) -> None:
        with contextlib.suppress(OSError):
            with open("/proc/self/statm", "rb") as statm:
                self._rss.set(int(statm.read().split()[1]) * self._page)
            self._fds.set(len(os.listdir("/proc/self/fd")))


class _Count:
    """A counter of the fan-out path: an int moved by plain arithmetic, copied
    into its prometheus_client ``target`` when read (:meth:`copy`).

    The copy moves the target by what was counted since the last copy, so the
    count is never reset: an ``inc`` between the copy's read and its store is
    copied next time, not lost (one thread counts, one copies).
    """

    __slots__ = ("_copied", "_target", "value")

    def __init__(self, target: Gauge | Counter) -> None:
        self.value = 0
        self._copied = 0
        self._target = target

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def copy(self) -> None:
        value = self.value
        if value != self._copied:
            self._target.inc(value - self._copied)
            self._copied = value


class _Observations:
    """A histogram of the fan-out path: per-bucket counts and a sum moved by
    plain arithmetic, copied into its prometheus_client ``target`` when read.

    There is no public way to add n observations to a histogram's bucket
    (``observe`` takes one value, under a lock), so :meth:`copy` moves the
    target's own values, ``_buckets`` (one per bound, not cumulative, as
    ``Histogram.observe`` keeps them) and ``_sum``: prometheus_client 0.26's
    internals, which its collection and multiprocess files read.
    """

    __slots__ = ("_copied_counts", "_copied_sum", "_target", "bounds", "counts", "sum")

    def __init__(self, target: Histogram, buckets: tuple[float, ...]) -> None:
        self.bounds = (*buckets, math.inf)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self._copied_counts = [0] * len(self.bounds)
        self._copied_sum = 0.0
        self._target = target

    def observe(self, amount: float) -> None:
        # The first bound >= amount: the bucket Histogram.observe picks.
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount

    def copy(self) -> None:
        target_buckets = self._target._buckets
        for index, count in enumerate(self.counts):
            copied = self._copied_counts[index]
            if count != copied:
                target_buckets[index].inc(count - copied)
                self._copied_counts[index] = count
        total = self.sum
        if total != self._copied_sum:
            self._target._sum.inc(total - self._copied_sum)
            self._copied_sum = total


class _Exposition(Collector):
    """What a scrape shows: ``source``'s families, Centrifugo's counters untyped
    under their exact names (see the module docstring)."""

    def __init__(self, source: Collector) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        for family in self._source.collect():
            if family.name in _CENTRIFUGO_COUNTERS:
                family.type = "unknown"
            yield family


class Metrics:
    """Every figure a server moves, and its ``/metrics`` answer. See the module docstring.

    Components take the handles they need (resolved once here: a labelled
    child is a dict lookup under a lock each time it is asked for) and move
    them where the event happens.
    """

    def __init__(self, *, multiprocess: bool | None = None) -> None:
        """``multiprocess``: write to :data:`MULTIPROCESS_ENV`'s directory (the
        default when it is set, as a worker of ``--workers`` finds it)."""
        if multiprocess is None:
            multiprocess = bool(os.environ.get(MULTIPROCESS_ENV))
        self.multiprocess = multiprocess
        if multiprocess:
            # prometheus_client picks where values live when it is imported; the
            # supervisor sets the directory after that, before forking.
            if _values.ValueClass is _values.MutexValue:
                _values.ValueClass = _values.MultiProcessValue()  # type: ignore[no-untyped-call]
            store = None
        else:
            store = CollectorRegistry(auto_describe=False)
        self._store = store
        self._live: LiveSource | None = None
        self._live_mirror = _LiveMirror() if multiprocess else None
        self._process_mirror = _ProcessMirror() if multiprocess else None

        def counter_gauge(name: str, doc: str, labels: list[str]) -> Gauge:
            # A Centrifugo counter: exact name, no _total (see _Exposition); "sum"
            # across workers keeps a dead worker's counts, as a counter must.
            return Gauge(name, doc, labels, registry=store, multiprocess_mode="sum")

        # -- Centrifugo's ------------------------------------------------
        sent = counter_gauge(
            "centrifugo_node_messages_sent_count", "Messages sent to the broker.", ["type"]
        )
        # The fan-out path's figures are tallies (see the module docstring),
        # each copied by refresh() into the prometheus_client object it wraps.
        self.sent_publication = _Count(sent.labels("publication"))
        self.sent_join = _Count(sent.labels("join"))
        self.sent_leave = _Count(sent.labels("leave"))
        received = counter_gauge(
            "centrifugo_node_messages_received_count",
            "Messages received from the broker.",
            ["type"],
        )
        self.received_publication = _Count(received.labels("publication"))
        self.received_join = _Count(received.labels("join"))
        self.received_leave = _Count(received.labels("leave"))
        self.broadcast_duration = _Observations(
            Histogram(
                "centrifugo_node_broadcast_duration_seconds",
                "Time to fan one publication out to this node's subscribers.",
                buckets=_LATENCY_BUCKETS,
                registry=store,
            ),
            _LATENCY_BUCKETS,
        )
        self.pub_sub_lag = _Observations(
            Histogram(
                "centrifugo_node_pub_sub_lag_seconds",
                "From a publication's time to its fan-out on this node (clock skew between "
                "machines included).",
                buckets=_LATENCY_BUCKETS,
                registry=store,
            ),
            _LATENCY_BUCKETS,
        )
        messages_sent = counter_gauge(
            "centrifugo_transport_messages_sent",
            "Publications written to subscribers (counted per fan-out: transport all).",
            ["transport", "frame_type"],
        )
        self.transport_sent = _Count(messages_sent.labels("all", "publication"))
        sent_size = counter_gauge(
            "centrifugo_transport_messages_sent_size",
            "Bytes of publication data written to subscribers (data only, without framing).",
            ["transport", "frame_type"],
        )
        self.transport_sent_size = _Count(sent_size.labels("all", "publication"))
        self._tallies: tuple[_Count | _Observations, ...] = (
            self.sent_publication,
            self.sent_join,
            self.sent_leave,
            self.received_publication,
            self.received_join,
            self.received_leave,
            self.broadcast_duration,
            self.pub_sub_lag,
            self.transport_sent,
            self.transport_sent_size,
        )
        self.reply_errors = counter_gauge(
            "centrifugo_client_num_reply_errors",
            "Error replies to client commands.",
            ["method", "code"],
        )
        self.server_disconnects = counter_gauge(
            "centrifugo_client_num_server_disconnects",
            "Clients disconnected by the server, by code.",
            ["code"],
        )
        self.server_unsubscribes = counter_gauge(
            "centrifugo_client_num_server_unsubscribes",
            "Subscriptions ended by the server, by code.",
            ["code"],
        )
        self.command_duration = Summary(
            "centrifugo_client_command_duration_seconds",
            "Time to run a client command.",
            ["method"],
            registry=store,
        )
        recover = counter_gauge(
            "centrifugo_client_recover", "Subscriptions that asked to recover.", ["recovered"]
        )
        self.recovered = recover.labels("yes")
        self.not_recovered = recover.labels("no")
        self.transport_connects = counter_gauge(
            "centrifugo_transport_connect_count",
            "Realtime connections opened, by transport.",
            ["transport"],
        )
        self.connection_limit_reached = Counter(
            "centrifugo_client_connection_limit_reached",
            "Connections refused at limits.max_connections.",
            registry=store,
        )
        self.api_command_duration = Summary(
            "centrifugo_api_command_duration_seconds",
            "Time to run a server API command.",
            ["protocol", "method"],
            registry=store,
        )
        self.api_errors = Counter(
            "tidings_api_errors",
            "Server API calls answered with an error, by method and code.",
            ["method", "code"],
            registry=store,
        )
        build = Gauge(
            "centrifugo_node_build",
            "This node's version (always 1).",
            ["version"],
            registry=store,
            multiprocess_mode="livemax",
        )
        build.labels(__version__).set(1)

        # -- tidings' own --------------------------------------------------
        self.slow_disconnects = Counter(
            "tidings_slow_disconnects",
            "Clients disconnected for reading slower than they were sent to "
            "(limits.max_write_buffer), by transport.",
            ["transport"],
            registry=store,
        )
        self.unrecovered_resumes = Counter(
            "tidings_unrecovered_resumes",
            "Channels a client resumed from a position history no longer reaches, by transport.",
            ["transport"],
            registry=store,
        )
        self.http_responses = Counter(
            "tidings_http_responses",
            "HTTP responses by status (101 and 200 for a stream when it starts).",
            ["status"],
            registry=store,
        )
        self.refused = Counter(
            "tidings_connections_refused",
            "Connections refused at limits.max_connections: answered 503 "
            "(max_connections) or reset with too many refusals in flight (max_refusals).",
            ["reason"],
            registry=store,
        )
        self.broker_duration = Histogram(
            "tidings_broker_request_duration_seconds",
            "Round trip of a call to a remote broker (Redis, NATS), by operation.",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=store,
        )
        self.hook_duration = Histogram(
            "tidings_hook_duration_seconds",
            "Time a decision hook (Python or proxied to a backend) took, by hook.",
            ["hook"],
            buckets=_LATENCY_BUCKETS,
            registry=store,
        )
        self.hook_failures = Counter(
            "tidings_hook_failures",
            "Decision hooks that timed out or failed (not refusals), by hook and reason.",
            ["hook", "reason"],
            registry=store,
        )
        self.loop_lag = Histogram(
            "tidings_event_loop_lag_seconds",
            "How late the event loop ran a timer: what every callback waits behind.",
            buckets=_LATENCY_BUCKETS,
            registry=store,
        )
        # Tallies made as statuses and transports are first counted; copied by refresh().
        self._response_counts: dict[int, _Count] = {}
        self._connect_counts: dict[str, _Count] = {}
        self._command_timers: dict[str, Summary] = {}
        self._exposition = self._build_exposition()

    def _build_exposition(self) -> CollectorRegistry:
        exposition = CollectorRegistry(auto_describe=False)
        if self.multiprocess:
            source: Collector = MultiProcessCollector(None)  # type: ignore[no-untyped-call]
            exposition.register(_Exposition(source))
        else:
            assert self._store is not None
            exposition.register(_Exposition(self._store))
            exposition.register(_LiveSlot(self))
            ProcessCollector(registry=exposition)
        return exposition

    def read_live(self, source: LiveSource) -> None:
        """Read the node's live figures from ``source`` (the server's, once built)."""
        self._live = source

    # -- moved by components (each one line at its call site) ---------------

    def fanned_out(self, pub_time_ms: int, subscribers: int, size: int, started: float) -> None:
        """One publication fanned out to ``subscribers`` (``size`` data bytes each),
        the fan-out begun at ``started`` (``time.perf_counter()``)."""
        self.broadcast_duration.observe(time.perf_counter() - started)
        self.pub_sub_lag.observe(max(0.0, time.time() - pub_time_ms / 1000))
        self.transport_sent.value += subscribers
        self.transport_sent_size.value += subscribers * size

    def responded(self, status: int) -> None:
        """An HTTP response went out: a tally per status, as on the fan-out path
        (each long-poll delivery is a response; a prometheus_client ``inc``
        there, with its lock, was 7 % of the CPU per delivery: py-spy)."""
        count = self._response_counts.get(status)
        if count is None:
            target = self.http_responses.labels(str(status))
            count = self._response_counts[status] = _Count(target)
        count.value += 1

    def slow(self, transport: str) -> None:
        self.slow_disconnects.labels(transport).inc()

    def unrecovered(self, transport: str, channels: int = 1) -> None:
        if channels:
            self.unrecovered_resumes.labels(transport).inc(channels)

    def connected(self, transport: str) -> None:
        """A realtime connection opened (each held long-poll is one): a tally, as above."""
        count = self._connect_counts.get(transport)
        if count is None:
            target = self.transport_connects.labels(transport)
            count = self._connect_counts[transport] = _Count(target)
        count.value += 1

    def command_timer(self, method: str) -> Summary:
        """The duration summary of one client command, its child bound once per
        method (a session's methods are the schema's fields, a bounded set):
        ``.labels()`` per command was 16 us against 5 us for the observe itself
        (timeit on the loaded bench machine), paid twice per WebSocket connect."""
        timer = self._command_timers.get(method)
        if timer is None:
            timer = self._command_timers[method] = self.command_duration.labels(method)
        return timer

    def hook_decided(self, name: str, duration: float, failure: str | None) -> None:
        """A decision hook ran (``Hooks.observe``). The label is the hook's kind
        (``connect``, ``rpc``...): an RPC's method is the client's to choose,
        and a label must not take unbounded values."""
        hook = name.split(" ", 1)[0]
        self.hook_duration.labels(hook).observe(duration)
        if failure is not None:
            self.hook_failures.labels(hook, failure).inc()

    # -- the scrape ----------------------------------------------------------

    def render(self) -> bytes:
        """The ``/metrics`` body, in Prometheus' text format."""
        self.refresh()
        return generate_latest(self._exposition)

    def refresh(self) -> None:
        """Copy the fan-out path's tallies into their prometheus_client objects,
        and this worker's live figures into the shared files (multiprocess
        mode): before a scrape, and each second so that a scrape answered by
        another worker shows this one's figures at most a second old."""
        for tally in self._tallies:
            tally.copy()
        for count in (*self._response_counts.values(), *self._connect_counts.values()):
            count.copy()
        if self._live_mirror is not None and self._live is not None:
            self._live_mirror.copy(self._live())
        if self._process_mirror is not None:
            self._process_mirror.copy()

    async def run(self) -> None:
        """Measure the loop's lag (and copy live figures, with workers) until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + REFRESH_INTERVAL
            await asyncio.sleep(REFRESH_INTERVAL)
            self.loop_lag.observe(max(0.0, loop.time() - expected))
            self.refresh()


class _LiveSlot(Collector):
    """The live figures of whatever source the metrics were given (none yet: nothing)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        source = self._metrics._live
        if source is None:
            return iter(())
        return _live_families(source())


def multiprocess_directory() -> Callable[[], None]:
    """Make a fresh directory for the workers' figures and point
    :data:`MULTIPROCESS_ENV` at it (workers forked after this inherit it);
    return the function that removes it, for the supervisor's exit."""
    path = tempfile.mkdtemp(prefix="tidings-metrics-")
    os.environ[MULTIPROCESS_ENV] = path

    def remove() -> None:
        if os.environ.get(MULTIPROCESS_ENV) == path:
            del os.environ[MULTIPROCESS_ENV]
        shutil.rmtree(path, ignore_errors=True)

    return remove


def forget_process(pid: int) -> None:
    """Drop a dead worker's live gauges (its counters stay in the sums)."""
    path = os.environ.get(MULTIPROCESS_ENV)
    if path:
        mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
