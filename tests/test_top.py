"""``tidings top`` (issue 15, item 4): a running server's figures in a terminal.

Run as a user runs it (``python -m tidings top``) against a real server: one
snapshot with ``--once``; rows under a header when stdout is a pipe; exit 1
with a one-line message when the server cannot be reached. The reading of a
Prometheus scrape is checked on an exposition written by prometheus_client
itself, with Centrifugo's metric names.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack

import httpx
import pytest
from websockets.sync.client import connect

from conftest import ServerProcess, clean_env, free_port
from helpers import SSEClient, unique_channel, wait_subscribers
from tidings.top import Snapshot, TopError, fetch, from_info, from_metrics, render, row

TIMEOUT = 10.0


def top(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidings", "top", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )


def figures(output: str) -> dict[str, str]:
    """``--once``'s block, ``name value`` per line, as a dict."""
    out = {}
    for line in output.splitlines()[1:]:
        name, value = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        out[name] = value.split()[0]
    return out


def info(srv: ServerProcess) -> dict[str, int]:
    resp = httpx.post(srv.url + "/api/info", json={}, timeout=TIMEOUT)
    node: dict[str, int] = resp.json()["result"]["nodes"][0]
    return node


#: A server without /metrics: top reads the API's info.
NO_METRICS = "[metrics]\nenabled = false\n"


def connect_clients(srv: ServerProcess, stack: ExitStack) -> tuple[str, str]:
    """Three SSE streams on two channels and one WebSocket session, all connected."""
    first, second = unique_channel(), unique_channel()
    for channel in (first, first, second):
        sse = stack.enter_context(SSEClient(srv, [channel]))
        sse.subscribed()
    ws = stack.enter_context(connect(srv.ws_url + "/connection/websocket"))
    ws.send(json.dumps({"id": 1, "connect": {}}))
    assert "connect" in json.loads(ws.recv(timeout=TIMEOUT))
    wait_subscribers(srv, first, 2)
    wait_subscribers(srv, second, 1)
    return first, second


def test_once_from_metrics_shows_clients_by_transport(
    server_factory: Callable[..., ServerProcess],
) -> None:
    srv = server_factory()
    with ExitStack() as stack:
        connect_clients(srv, stack)
        run = top("--url", srv.url, "--once")
    assert run.returncode == 0, run.stderr
    assert "(from /metrics)" in run.stdout.splitlines()[0], run.stdout
    assert "clients           4   (websocket 1  sse 3  longpoll 0  emulation 0)" in run.stdout
    assert figures(run.stdout)["subscriptions"] == "3"  # the SSE streams; WebSocket none
    shown = figures(run.stdout)
    assert (shown["channels"], shown["nodes"], shown["slow disconnects"]) == ("2", "1", "0")


def test_once_from_the_api_without_metrics(server_factory: Callable[..., ServerProcess]) -> None:
    srv = server_factory(NO_METRICS)
    with ExitStack() as stack:
        connect_clients(srv, stack)
        run = top("--url", srv.url, "--once")
        reported = info(srv)
    assert run.returncode == 0, run.stderr
    assert "(from /api/info)" in run.stdout.splitlines()[0], run.stdout
    assert "clients           4   (websocket 1  sse 3  longpoll 0  emulation 0)" in run.stdout
    shown = figures(run.stdout)
    assert (shown["channels"], shown["nodes"]) == ("2", "1")
    assert reported["num_clients"] == 4  # the same figure the API gives
    # What info does not have is shown as unknown, not as 0.
    assert (shown["deliveries/s"], shown["slow disconnects"]) == ("-", "-")


def test_rows_under_a_header_when_stdout_is_not_a_terminal(
    server_factory: Callable[..., ServerProcess],
) -> None:
    srv = server_factory()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidings", "top", "--url", srv.url, "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert lines[0].split() == [
        "time",
        "clients",
        "users",
        "channels",
        "subs",
        "deliv/s",
        "slow",
        "transports",
    ]
    for line in lines[1:]:
        cells = line.split()
        assert re.fullmatch(r"\d\d:\d\d:\d\d", cells[0]) and cells[3] == "0", line
        assert "\x1b" not in line  # no terminal codes in a pipe


def test_a_terminal_gets_the_view_redrawn(server_factory: Callable[..., ServerProcess]) -> None:
    srv = server_factory()
    main, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidings", "top", "--url", srv.url, "--interval", "0.2"],
        stdout=terminal,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    os.close(terminal)
    seen = b""
    try:
        deadline = time.monotonic() + TIMEOUT
        while seen.count(b"\x1b[H\x1b[2J") < 2:  # two screens: the second is a redraw
            assert time.monotonic() < deadline, seen
            ready, _, _ = select.select([main], [], [], 1.0)
            if ready:
                seen += os.read(main, 65536)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        os.close(main)
    screen = seen.split(b"\x1b[H\x1b[2J")[1].decode()
    assert screen.startswith(f"tidings top  {srv.url}  (from /metrics)"), screen
    assert "clients           0" in screen and "deliveries/s" in screen


def test_unreachable_server_exits_1_with_one_line() -> None:
    run = top("--url", f"http://127.0.0.1:{free_port()}", "--once")
    assert run.returncode == 1
    assert run.stderr.startswith("tidings: cannot reach ") and run.stderr.count("\n") == 1
    assert run.stdout == ""


def test_api_refusal_is_reported(server_factory: Callable[..., ServerProcess]) -> None:
    srv = server_factory('api_key = "right-key-0123456789"\n' + NO_METRICS)
    run = top("--url", srv.url, "--api-key", "wrong", "--once")
    assert run.returncode == 1 and "/api/info answered 401" in run.stderr, run.stderr
    run = top("--url", srv.url, "--api-key", "right-key-0123456789", "--once")
    assert run.returncode == 0 and figures(run.stdout)["nodes"] == "1", run.stderr


def test_bad_interval_is_a_usage_error() -> None:
    assert top("--interval", "0").returncode == 2


# ---------------------------------------------------------------------------- units


def scrape() -> str:
    """An exposition as prometheus_client writes it, with Centrifugo's names."""
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()

    def gauge(name: str, value: float) -> None:
        prometheus_client.Gauge(name, name, registry=registry).set(value)

    gauge("centrifugo_node_num_clients", 7)
    gauge("centrifugo_node_num_users", 3)
    gauge("centrifugo_node_num_channels", 5)
    gauge("centrifugo_node_num_subscriptions", 11)
    gauge("centrifugo_node_num_nodes", 2)
    sent = prometheus_client.Counter(
        "centrifugo_transport_messages_sent", "sent", ["transport"], registry=registry
    )
    sent.labels("websocket").inc(40)
    sent.labels("sse").inc(2)
    disconnects = prometheus_client.Counter(
        "centrifugo_client_num_server_disconnects", "d", ["code"], registry=registry
    )
    disconnects.labels("3008").inc(4)
    disconnects.labels("3501").inc(9)
    by_transport = prometheus_client.Gauge("tidings_clients", "c", ["transport"], registry=registry)
    for transport, count in (("sse", 2), ("websocket", 4), ("longpoll", 1)):
        by_transport.labels(transport).set(count)
    gauge("tidings_connections", 30)  # sockets of every kind: not the clients
    slow = prometheus_client.Counter(
        "tidings_slow_disconnects", "s", ["transport"], registry=registry
    )
    slow.labels("sse").inc(1)
    slow.labels("websocket").inc(2)
    refused = prometheus_client.Counter(
        "tidings_refused_connections", "r", ["reason"], registry=registry
    )
    refused.labels("capacity").inc(6)
    text: str = prometheus_client.generate_latest(registry).decode()
    return text


def test_a_scrape_gives_each_figure() -> None:
    snapshot = from_metrics(scrape(), taken=100.0)
    assert snapshot is not None
    assert (snapshot.clients, snapshot.users, snapshot.channels) == (7, 3, 5)
    assert (snapshot.subscriptions, snapshot.nodes) == (11, 2)
    assert snapshot.transports == {"sse": 2, "websocket": 4, "longpoll": 1}
    # tidings' own count of slow disconnects wins over Centrifugo's code 3008.
    assert (snapshot.deliveries, snapshot.slow_disconnects) == (42.0, 3.0)
    block = render("http://x", snapshot)
    assert "clients           7   (websocket 4  sse 2  longpoll 1)" in block
    assert "deliveries/s      -" in block  # one reading has no rate


def test_deliveries_per_second_from_two_readings() -> None:
    before = Snapshot(source="/metrics", taken=10.0, clients=1, deliveries=100.0)
    now = Snapshot(source="/metrics", taken=12.0, clients=1, deliveries=350.0)
    assert "deliveries/s      125.0" in render("http://x", now, before)
    assert row(now, before).split()[5] == "125.0"


def test_slow_disconnects_from_centrifugos_code_without_tidings_own() -> None:
    text = "\n".join(
        line for line in scrape().splitlines() if "tidings_slow_disconnects" not in line
    )
    snapshot = from_metrics(text + "\n", taken=0.0)
    assert snapshot is not None and snapshot.slow_disconnects == 4.0


def test_not_a_tidings_scrape_falls_back() -> None:
    assert from_metrics("# nothing here\nother_metric 1\n", taken=0.0) is None
    assert from_metrics("not { the text format", taken=0.0) is None


def test_info_of_several_nodes_is_summed() -> None:
    nodes = [
        {"uid": "a", "num_clients": 3, "num_channels": 2, "clients_by_transport": {"sse": 3}},
        {
            "uid": "b",
            "num_clients": 4,
            "num_channels": 1,
            "clients_by_transport": {"sse": 1, "websocket": 3},
        },
    ]
    snapshot = from_info({"nodes": nodes}, taken=0.0)
    assert (snapshot.clients, snapshot.channels, snapshot.nodes) == (7, 3, 2)
    assert snapshot.transports == {"sse": 4, "websocket": 3}
    assert snapshot.users is None
    with pytest.raises(TopError):
        from_info({"nodes": "no"}, taken=0.0)


def test_fetch_names_what_went_wrong() -> None:
    with pytest.raises(TopError, match="cannot reach"):
        fetch(f"http://127.0.0.1:{free_port()}")
