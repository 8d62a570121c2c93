"""``tidings top``: a running server's figures in a terminal, refreshed every second.

Used as ``redis-cli --stat`` is during an incident: how many clients, on
which transports, how many channels and users, how many deliveries a second,
how many slow subscribers were cut off. The figures come from ``/metrics``
when the server exposes it (parsed with prometheus_client's own text parser,
when that library is installed), else from the server API's ``info``, which
has fewer of them (no rates, no slow disconnects): a figure it lacks shows ``-``.

On a terminal the view is redrawn in place; when stdout is not a terminal
(a pipe, a file, a test), one plain row is printed per interval under one
header line, so the output can be read by a script. ``--once`` prints a
single snapshot and exits, for scripts and tests.

The module needs no server: it is a client (urllib), loaded by the CLI only
for ``tidings top``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

__all__ = ["Snapshot", "TopError", "fetch", "from_info", "from_metrics", "render", "run"]

#: Centrifugo's gauges of live things (its Grafana dashboard reads these names).
_GAUGES = {
    "centrifugo_node_num_clients": "clients",
    "centrifugo_node_num_users": "users",
    "centrifugo_node_num_channels": "channels",
    "centrifugo_node_num_subscriptions": "subscriptions",
    "centrifugo_node_num_nodes": "nodes",
}
#: Messages written to clients, by transport: a delivery each.
_DELIVERIES = "centrifugo_transport_messages_sent"
#: tidings' realtime clients by transport (tidings.metrics).
_BY_TRANSPORT = "tidings_clients"
#: tidings' slow-consumer disconnects, by transport; without it, Centrifugo's
#: server disconnects with code 3008 ("slow") say the same.
_SLOW = "tidings_slow_disconnects"
_DISCONNECTS = "centrifugo_client_num_server_disconnects"
_SLOW_CODE = "3008"
#: The transports in the order they are shown; others follow in name order.
_TRANSPORT_ORDER = ("websocket", "sse", "long-poll", "longpoll", "poll", "http-stream", "emulation")
_TIMEOUT = 5.0
_CLEAR = "\x1b[H\x1b[2J"


class TopError(Exception):
    """The server could not be asked (unreachable, refused, or an unreadable answer)."""


@dataclass(frozen=True)
class Snapshot:
    """One reading of a server's figures; None where the source does not say."""

    source: str
    #: ``time.monotonic()`` when it was read: rates divide by the time between two.
    taken: float
    clients: int | None = None
    users: int | None = None
    channels: int | None = None
    subscriptions: int | None = None
    nodes: int | None = None
    #: Connections by transport name.
    transports: dict[str, int] = field(default_factory=dict)
    #: Counters since the server started: rates come from two snapshots.
    deliveries: float | None = None
    slow_disconnects: float | None = None


# -- reading ---------------------------------------------------------------------


def _get(url: str, headers: dict[str, str], data: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=data, headers=headers, method="POST" if data is not None else "GET"
    )
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise TopError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None


def fetch(url: str, api_key: str = "", metrics_token: str = "") -> Snapshot:
    """Read the server at ``url``: ``/metrics`` if it answers and can be parsed, else
    the API's ``info``."""
    base = url.rstrip("/")
    metrics_headers = {"Authorization": f"Bearer {metrics_token}"} if metrics_token else {}
    status, body = _get(base + "/metrics", metrics_headers)
    if status == 200:
        snapshot = from_metrics(body.decode("utf-8", "replace"), time.monotonic())
        if snapshot is not None:
            return snapshot
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["X-API-Key"] = api_key
    status, body = _get(base + "/api/info", headers, b"{}")
    try:
        answer = json.loads(body)
    except ValueError:
        raise TopError(f"/api/info answered {status} with no JSON") from None
    if status != 200 or not isinstance(answer, dict) or "result" not in answer:
        error = answer.get("error", answer) if isinstance(answer, dict) else answer
        raise TopError(f"/api/info answered {status}: {error}")
    return from_info(answer["result"], time.monotonic())


def from_metrics(text: str, taken: float) -> Snapshot | None:
    """The figures of a Prometheus text exposition; None without prometheus_client
    or without Centrifugo's client gauge (not a tidings or Centrifugo scrape)."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return None
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError:
        return None
    gauges: dict[str, int] = {}
    transports: dict[str, int] = {}
    deliveries: float | None = None
    slow: float | None = None
    slow_by_code: float | None = None
    for family in families:
        values = [s for s in family.samples if not s.name.endswith(("_created", "_bucket"))]
        if family.name in _GAUGES:
            gauges[_GAUGES[family.name]] = int(sum(s.value for s in values))
        elif family.name == _DELIVERIES:
            deliveries = sum(s.value for s in values)
        elif family.name == _SLOW:
            slow = sum(s.value for s in values)
        elif family.name == _DISCONNECTS:
            slow_by_code = sum(s.value for s in values if s.labels.get("code") == _SLOW_CODE)
        elif family.name == _BY_TRANSPORT:
            for sample in values:
                name = sample.labels["transport"]
                transports[name] = transports.get(name, 0) + int(sample.value)
    if "clients" not in gauges:
        return None
    return Snapshot(
        source="/metrics",
        taken=taken,
        transports=transports,
        deliveries=deliveries,
        slow_disconnects=slow if slow is not None else slow_by_code,
        **gauges,
    )


def from_info(result: Any, taken: float) -> Snapshot:
    """The figures of the API's ``info`` result, summed over its nodes (with
    tidings' own ``clients_by_transport`` beside Centrifugo's fields)."""
    nodes = result.get("nodes") if isinstance(result, dict) else None
    if not isinstance(nodes, list):
        raise TopError(f"/api/info: no nodes in {result!r}")

    def total(key: str) -> int | None:
        values = [node.get(key) for node in nodes if isinstance(node, dict)]
        numbers = [value for value in values if isinstance(value, int)]
        return sum(numbers) if numbers else None

    transports: dict[str, int] = {}
    for node in nodes:
        counts = node.get("clients_by_transport") if isinstance(node, dict) else None
        if isinstance(counts, dict):
            for name, count in counts.items():
                if isinstance(count, int):
                    transports[str(name)] = transports.get(str(name), 0) + count
    return Snapshot(
        source="/api/info",
        taken=taken,
        transports=transports,
        clients=total("num_clients"),
        users=total("num_users"),
        channels=total("num_channels"),
        subscriptions=total("num_subscriptions"),
        nodes=len(nodes),
    )


# -- showing ---------------------------------------------------------------------


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _rate(now: Snapshot, before: Snapshot | None) -> str:
    """Deliveries a second between two snapshots; ``-`` from a single one."""
    if before is None or now.deliveries is None or before.deliveries is None:
        return "-"
    elapsed = now.taken - before.taken
    if elapsed <= 0:
        return "-"
    return f"{max(0.0, now.deliveries - before.deliveries) / elapsed:.1f}"


def _transports(snapshot: Snapshot) -> list[tuple[str, int]]:
    counts = snapshot.transports
    known = [(name, counts[name]) for name in _TRANSPORT_ORDER if name in counts]
    others = sorted(
        (name, count) for name, count in snapshot.transports.items() if name not in _TRANSPORT_ORDER
    )
    return known + others


def render(url: str, now: Snapshot, before: Snapshot | None = None) -> list[str]:
    """The block view: one figure a line, ``name value`` (easy to grep)."""
    clock = time.strftime("%H:%M:%S")
    lines = [f"tidings top  {url}  (from {now.source})  {clock}"]
    clients = f"clients           {_number(now.clients)}"
    if now.transports:
        clients += "   (" + "  ".join(f"{name} {n}" for name, n in _transports(now)) + ")"
    lines.append(clients)
    lines.append(f"users             {_number(now.users)}")
    lines.append(f"channels          {_number(now.channels)}")
    lines.append(f"subscriptions     {_number(now.subscriptions)}")
    lines.append(f"nodes             {_number(now.nodes)}")
    lines.append(f"deliveries/s      {_rate(now, before)}")
    lines.append(f"deliveries        {_number(now.deliveries)}")
    lines.append(f"slow disconnects  {_number(now.slow_disconnects)}")
    return lines


_COLUMNS = ("time", "clients", "users", "channels", "subs", "deliv/s", "slow", "transports")
_WIDTHS = (8, 8, 7, 9, 7, 9, 6, 0)


def header() -> str:
    return " ".join(
        name.rjust(width) if width else name for name, width in zip(_COLUMNS, _WIDTHS, strict=True)
    )


def row(now: Snapshot, before: Snapshot | None) -> str:
    """One line per interval (not a terminal): the figures under :func:`header`."""
    transports = " ".join(f"{name}={count}" for name, count in _transports(now))
    cells = (
        time.strftime("%H:%M:%S"),
        _number(now.clients),
        _number(now.users),
        _number(now.channels),
        _number(now.subscriptions),
        _rate(now, before),
        _number(now.slow_disconnects),
        transports or "-",
    )
    return " ".join(
        cell.rjust(width) if width else cell for cell, width in zip(cells, _WIDTHS, strict=True)
    )


def run(
    url: str,
    *,
    api_key: str = "",
    metrics_token: str = "",
    interval: float = 1.0,
    once: bool = False,
    out: IO[str],
    tty: bool,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Show the figures until interrupted (or once); :class:`TopError` if the server
    cannot be read."""
    before: Snapshot | None = None
    printed = 0
    while True:
        now = fetch(url, api_key, metrics_token)
        if once:
            out.write("\n".join(render(url, now)) + "\n")
            out.flush()
            return
        if tty:
            out.write(_CLEAR + "\n".join(render(url, now, before)) + "\n")
        else:
            if printed % 20 == 0:  # the header again now and then, as redis-cli --stat
                out.write(header() + "\n")
            out.write(row(now, before) + "\n")
            printed += 1
        out.flush()
        before = now
        sleep(interval)
