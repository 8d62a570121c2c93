"""Prometheus metrics (issue 15, item 1): ``/metrics`` after a scripted run, read
with prometheus_client's own parser, every counter at its exact value; the
access rule; ``[metrics] port``; two workers on Redis summed in one scrape.

The scripted run counts what it does as it does it — each request answered
200 included, scrapes too — so that every figure of the final scrape can be
asserted equal to what the test caused, not merely present. It relies on the
memory broker delivering a publication before the publish call answers (so a
publish that returns has been fanned out) and on the hub counting once per
publication (``tidings.metrics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ServerProcess, free_port
from helpers import TIMEOUT, RawConn, SSEClient, poll, request_bytes, unique_channel
from test_emulation import http_stream
from test_scaleout import redis_config
from ws_support import connect_raw

if TYPE_CHECKING:
    from brokers_support import RedisServer

from tidings.cursor import encode_cursor
from tidings.stream import Position

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape by (name, sorted labels), through prometheus_client's parser."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 for a labelled child never moved (prometheus_client
    shows a labelled counter once it moved, as Centrifugo's Go client does)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class Tally:
    """The test's own count of what it caused, to compare with the server's."""

    def __init__(self, srv: ServerProcess) -> None:
        self.srv = srv
        self.ok = 0  # HTTP responses with status 200
        # One keep-alive connection for every scrape and API call: admitted
        # once, it is not refused when the test fills the server to its cap.
        self.client = httpx.Client(base_url=srv.url, timeout=TIMEOUT)

    def scrape(self) -> Samples:
        resp = self.client.get("/metrics")
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("text/plain")
        self.ok += 1
        return parse(resp.text)

    def publish(self, channel: str, data: bytes) -> dict[str, Any]:
        body = b'{"channel":' + json.dumps(channel).encode() + b',"data":' + data + b"}"
        resp = self.client.post("/api/publish", content=body)
        assert resp.status_code == 200, resp.text
        self.ok += 1
        result: dict[str, Any] = resp.json()["result"]
        return result

    def scrape_until(self, what: str, check: Any) -> Samples:
        """Scrape until ``check(samples)`` holds (each scrape tallied)."""
        deadline = time.monotonic() + 15
        while True:
            samples = self.scrape()
            if check(samples):
                return samples
            assert time.monotonic() < deadline, f"never: {what}"
            time.sleep(0.05)


CAP = 12
WRITE_BUFFER = 16384


@pytest.fixture
def run(server_factory: Any) -> Iterator[Tally]:
    srv = server_factory(
        f"[limits]\nmax_connections = {CAP}\nmax_write_buffer = {WRITE_BUFFER}\n"
        "[websocket]\nhandshake_timeout = 1.0\n"
    )
    tally = Tally(srv)
    try:
        yield tally
    finally:
        tally.client.close()


def test_a_scripted_run_is_counted_exactly(run: Tally) -> None:
    srv, tally = run.srv, run
    ch, slow_ch = unique_channel("m"), unique_channel("slow")
    data = b'{"n":1}'
    # What came before the script (the launcher's /health probe) is the baseline.
    before = value(tally.scrape(), "tidings_http_responses_total", status="200")

    # -- a client on each transport -------------------------------------------
    ws = connect_raw(srv.ws_url, (ch,))  # 101; connect, subscribe
    sse = SSEClient(srv, [ch])
    sse.subscribed()  # 200 when the stream starts
    tally.ok += 1
    streams = contextlib.ExitStack()
    emulated = streams.enter_context(http_stream(srv))  # 200 when the stream starts; connect
    tally.ok += 1
    assert emulated.post({"id": 2, "subscribe": {"channel": ch}}).status_code == 204
    assert emulated.next()["id"] == 2
    first = poll(srv, [ch])  # a plain poll: its cursor
    assert first.status_code == 200
    tally.ok += 1
    held: list[httpx.Response] = []
    poller = threading.Thread(
        target=lambda: held.append(poll(srv, [ch], cursor=first.json()["cursor"], timeout=30))
    )
    poller.start()
    waiting = tally.scrape_until(
        "the long-poll is held", lambda s: value(s, "tidings_long_polls_held") == 1
    )
    assert value(waiting, "tidings_clients", transport="longpoll") == 1
    assert value(waiting, "tidings_clients", transport="websocket") == 1
    assert value(waiting, "tidings_clients", transport="sse") == 1
    assert value(waiting, "tidings_clients", transport="emulation") == 1
    assert value(waiting, "centrifugo_node_num_clients") == 4

    # -- publications: the first reaches 4 subscribers, then 3 (the poll answered)
    pub = tally.publish(ch, data)
    poller.join(TIMEOUT)
    assert held and held[0].status_code == 200 and len(held[0].json()["publications"]) == 1
    tally.ok += 1
    tally.publish(ch, data)
    tally.publish(ch, data)
    ws.wait_for(lambda m: m.get("push", {}).get("pub", {}).get("offset") == 3)
    assert [e.json["offset"] for e in sse.publications(3)] == [1, 2, 3]
    assert [emulated.next()["push"]["pub"]["offset"] for _ in range(3)] == [1, 2, 3]

    # -- a slow reader kicked: big publications until it is ---------------------
    slow = connect_raw(srv.ws_url, (slow_ch,), rcvbuf=4096)  # 101; connect, subscribe
    big = json.dumps({"blob": "x" * 300_000}).encode()
    kicks = 0
    while True:
        tally.publish(slow_ch, big)
        kicks += 1
        if value(tally.scrape(), "tidings_slow_disconnects_total", transport="websocket"):
            break
        assert kicks < 20, "the slow reader was never disconnected"
    assert slow.read_until_closed(20) == 3008
    slow.close()

    # -- failed resumes, a recovery, a reply error, an API error ------------------
    bogus = {slow_ch: Position("bogus", 5)}
    sse_resumed = SSEClient(srv, [slow_ch], last_event_id=encode_cursor(bogus))
    assert sse_resumed.subscribed().json["recovered"] is False
    tally.ok += 1
    stale = poll(srv, [slow_ch], cursor=encode_cursor(bogus), timeout=0)
    assert stale.json()["unrecovered"] == [slow_ch]
    tally.ok += 1
    resumer = connect_raw(srv.ws_url)  # 101; connect
    resumer.send(
        {
            "id": 2,
            "subscribe": {"channel": ch, "recover": True, "epoch": pub["epoch"], "offset": 1},
        },
        {
            "id": 3,
            "subscribe": {"channel": slow_ch, "recover": True, "epoch": "bogus", "offset": 5},
        },
        {"id": 4, "subscribe": {"channel": ch}},
    )
    replies = {
        m["id"]: m for m in (resumer.wait_for(lambda m, i=i: m.get("id") == i) for i in (2, 3, 4))
    }
    assert replies[2]["subscribe"].get("recovered") is True
    assert not replies[3]["subscribe"].get("recovered")
    assert replies[4]["error"]["code"] == 105
    bad = tally.client.post("/api/publish", content=b'{"channel": 5}')
    assert bad.status_code == 400

    # -- a connection over the cap ----------------------------------------------
    # The WebSocket cut off as slow is gone once the server saw it go.
    tally.scrape_until(
        "the slow WebSocket is released",
        lambda s: value(s, "tidings_clients", transport="websocket") == 2,
    )
    fillers: list[RawConn] = []
    refused = None
    try:
        for _ in range(CAP + 1):
            conn = RawConn(srv)
            fillers.append(conn)
            conn.send(request_bytes("GET", "/health"))
            resp = conn.read_response()
            if resp.status == 503:
                refused = resp
                break
            assert resp.status == 200
            tally.ok += 1
        assert refused is not None, "no connection was refused at the cap"
        assert refused.header("retry-after")
    finally:
        for conn in fillers:
            conn.close()

    # -- the scrape -------------------------------------------------------------
    s = tally.scrape()
    published = 3 + kicks
    expected = {
        # Centrifugo's
        ("centrifugo_node_messages_sent_count", (("type", "publication"),)): published,
        ("centrifugo_node_messages_received_count", (("type", "publication"),)): published,
        ("centrifugo_node_messages_sent_count", (("type", "join"),)): 0,
        ("centrifugo_node_broadcast_duration_seconds_count", ()): published,
        ("centrifugo_node_pub_sub_lag_seconds_count", ()): published,
        (
            "centrifugo_transport_messages_sent",
            (("frame_type", "publication"), ("transport", "all")),
        ): 4 + 3 + 3 + kicks,
        (
            "centrifugo_transport_messages_sent_size",
            (("frame_type", "publication"), ("transport", "all")),
        ): 10 * len(data) + kicks * len(big),
        ("centrifugo_client_command_duration_seconds_count", (("method", "connect"),)): 4,
        ("centrifugo_client_command_duration_seconds_count", (("method", "subscribe"),)): 6,
        ("centrifugo_client_num_reply_errors", (("code", "105"), ("method", "subscribe"))): 1,
        ("centrifugo_client_num_server_disconnects", (("code", "3008"),)): 1,
        ("centrifugo_client_recover", (("recovered", "yes"),)): 1,
        ("centrifugo_client_recover", (("recovered", "no"),)): 1,
        ("centrifugo_transport_connect_count", (("transport", "websocket"),)): 3,
        ("centrifugo_transport_connect_count", (("transport", "sse"),)): 2,
        ("centrifugo_transport_connect_count", (("transport", "emulation"),)): 1,
        ("centrifugo_transport_connect_count", (("transport", "longpoll"),)): 1,
        ("centrifugo_client_connection_limit_reached_total", ()): 1,
        (
            "centrifugo_api_command_duration_seconds_count",
            (("method", "publish"), ("protocol", "http")),
        ): published,
        # tidings' own
        ("tidings_slow_disconnects_total", (("transport", "websocket"),)): 1,
        ("tidings_slow_disconnects_total", (("transport", "sse"),)): 0,
        ("tidings_unrecovered_resumes_total", (("transport", "websocket"),)): 1,
        ("tidings_unrecovered_resumes_total", (("transport", "sse"),)): 1,
        ("tidings_unrecovered_resumes_total", (("transport", "poll"),)): 1,
        ("tidings_api_errors_total", (("code", "107"), ("method", "publish"))): 1,
        ("tidings_connections_refused_total", (("reason", "max_connections"),)): 1,
        ("tidings_http_responses_total", (("status", "101"),)): 3,
        ("tidings_http_responses_total", (("status", "400"),)): 1,
        ("tidings_http_responses_total", (("status", "204"),)): 1,
        ("tidings_http_responses_total", (("status", "503"),)): 1,
        ("tidings_http_responses_total", (("status", "200"),)): before + tally.ok - 1,  # not itself
        # Live: 2 WebSockets (ws, resumer), 2 SSE streams, 1 emulated session;
        # ws, sse, emulated and the resumer in ch, the resumer and sse_resumed
        # in slow_ch.
        ("centrifugo_node_num_clients", ()): 5,
        ("tidings_clients", (("transport", "websocket"),)): 2,
        ("tidings_clients", (("transport", "sse"),)): 2,
        ("tidings_clients", (("transport", "longpoll"),)): 0,
        ("tidings_clients", (("transport", "emulation"),)): 1,
        ("tidings_long_polls_held", ()): 0,
        ("centrifugo_node_num_channels", ()): 2,
        ("centrifugo_node_num_subscriptions", ()): 6,
        ("centrifugo_node_num_users", ()): 0,
        ("centrifugo_node_num_nodes", ()): 1,
    }
    got = {key: s.get(key, 0.0) for key in expected}
    assert got == expected
    assert s["centrifugo_node_build", (("version", _version()),)] == 1
    # A client error is not counted as a server disconnect of another code.
    disconnects = {k: v for k, v in s.items() if k[0] == "centrifugo_client_num_server_disconnects"}
    assert disconnects == {("centrifugo_client_num_server_disconnects", (("code", "3008"),)): 1}
    assert s["process_resident_memory_bytes", ()] > 0
    assert s["tidings_event_loop_lag_seconds_count", ()] >= 0

    # /api/info counts the same realtime clients (not the keep-alive asking).
    info = tally.client.post("/api/info", json={}).json()["result"]["nodes"][0]
    assert info["num_clients"] == 5
    streams.close()
    for client in (ws, resumer):
        client.close()
    for stream in (sse, sse_resumed):
        stream.close()


def _version() -> str:
    from tidings import __version__

    return __version__


def test_centrifugo_counters_keep_their_exact_names(server: ServerProcess) -> None:
    """Centrifugo's counters have no ``_total`` (its Go client adds none), so its
    dashboard's queries find them; tidings' own counters are ordinary ones."""
    text = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families["centrifugo_node_messages_sent_count"] == "unknown"
    assert families["centrifugo_node_num_clients"] == "gauge"
    assert families["centrifugo_client_command_duration_seconds"] == "summary"
    assert families["tidings_http_responses"] == "counter"
    assert "# TYPE centrifugo_node_messages_sent_count untyped" in text


def test_access_rule_without_a_token_is_loopback_only(server: ServerProcess) -> None:
    """A request relayed by a proxy is not a loopback client (whatever its header
    says): refused 403, while the same request without the header is answered."""
    relayed = httpx.get(
        f"{server.url}/metrics", headers={"X-Forwarded-For": "203.0.113.9"}, timeout=TIMEOUT
    )
    assert relayed.status_code == 403
    assert "centrifugo_" not in relayed.text
    assert httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).status_code == 200


def test_access_rule_with_a_token(server_factory: Any) -> None:
    srv = server_factory('[metrics]\ntoken = "scrape-secret"\n')
    url = f"{srv.url}/metrics"
    missing = httpx.get(url, timeout=TIMEOUT)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "centrifugo_" not in missing.text
    wrong = httpx.get(url, headers={"Authorization": "Bearer scrape-secreT"}, timeout=TIMEOUT)
    assert wrong.status_code == 401
    other_scheme = httpx.get(url, headers={"Authorization": "Basic scrape-secret"}, timeout=TIMEOUT)
    assert other_scheme.status_code == 401
    good = httpx.get(url, headers={"Authorization": "Bearer scrape-secret"}, timeout=TIMEOUT)
    assert good.status_code == 200 and "centrifugo_node_num_clients" in good.text
    # With a token, a relayed request carrying it is answered (the token is the rule).
    relayed = httpx.get(
        url,
        headers={"Authorization": "Bearer scrape-secret", "X-Forwarded-For": "203.0.113.9"},
        timeout=TIMEOUT,
    )
    assert relayed.status_code == 200


def test_disabled_metrics_are_not_served(server_factory: Any) -> None:
    srv = server_factory("[metrics]\nenabled = false\n")
    assert httpx.get(f"{srv.url}/metrics", timeout=TIMEOUT).status_code == 404


def test_metrics_on_their_own_port(server_factory: Any) -> None:
    """``[metrics] port`` serves /metrics alone there, behind the same rule."""
    port = free_port()
    srv = server_factory(f"[metrics]\nport = {port}\n")
    url = f"http://{srv.host}:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            resp = httpx.get(url + "/metrics", timeout=TIMEOUT)
            break
        except httpx.ConnectError:
            assert time.monotonic() < deadline, "nothing listens on the metrics port"
            time.sleep(0.05)
    assert resp.status_code == 200 and "centrifugo_node_num_clients" in resp.text
    assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 404
    relayed = httpx.get(url + "/metrics", headers={"Forwarded": "for=1.2.3.4"}, timeout=TIMEOUT)
    assert relayed.status_code == 403


def test_two_workers_are_summed_in_one_scrape(
    server_factory: Any, redis_server: RedisServer, tmp_path: Path
) -> None:
    """``--workers 2`` on Redis: whichever worker answers, one scrape counts the
    clients of both (prometheus_client's multiprocess mode, live gauges copied
    each second), and the figures' directory is removed when the server stops."""
    srv = server_factory(
        redis_config(redis_server), args=["--workers", "2"], env={"TMPDIR": str(tmp_path)}
    )
    assert len(list(tmp_path.glob("tidings-metrics-*"))) == 1
    ch = unique_channel("w")
    clients = [SSEClient(srv, [ch]) for _ in range(20)]
    try:
        for client in clients:
            client.subscribed()
        # Each worker's own count, from /api/info on fresh connections (which
        # the kernel spreads): both hold some, so a sum of 20 spans both.
        per_worker: dict[str, int] = {}
        deadline = time.monotonic() + 15
        while len(per_worker) < 2:
            assert time.monotonic() < deadline, per_worker
            with httpx.Client(timeout=TIMEOUT) as fresh:
                node = fresh.post(srv.url + "/api/info", json={}).json()["result"]["nodes"][0]
            per_worker[node["uid"]] = node["num_clients"]
        assert sum(per_worker.values()) == 20 and all(per_worker.values()), per_worker

        def scrape() -> Samples:
            with httpx.Client(timeout=TIMEOUT) as fresh:
                return parse(fresh.get(srv.url + "/metrics").text)

        deadline = time.monotonic() + 15
        while True:
            s = scrape()
            if value(s, "centrifugo_node_num_clients") == 20:
                break
            assert time.monotonic() < deadline, value(s, "centrifugo_node_num_clients")
            time.sleep(0.1)
        assert value(s, "tidings_clients", transport="sse") == 20
        assert value(s, "centrifugo_node_num_nodes") == 2
        pids = {dict(k[1]).get("pid") for k in s if k[0] == "process_resident_memory_bytes"}
        assert len(pids) == 2, pids
        # Counters are summed too: one publication, received by each worker from Redis.
        # A worker copies its fan-out tallies each second (tidings.metrics), so the
        # scrape may be answered before the other worker's copy: scraped until
        # both received it, then every figure exact.
        httpx.post(srv.url + "/api/publish", json={"channel": ch, "data": {"x": 1}})
        for client in clients:
            client.publications(1)
        pub = (("type", "publication"),)
        key = (("frame_type", "publication"), ("transport", "all"))
        expected = {
            ("centrifugo_node_messages_sent_count", pub): 1,
            ("centrifugo_node_messages_received_count", pub): 2,
            ("centrifugo_transport_messages_sent", key): 20,
        }
        deadline = time.monotonic() + 15
        while any((s := scrape()).get(k, 0) < n for k, n in expected.items()):
            assert time.monotonic() < deadline, {k: s.get(k) for k in expected}
            time.sleep(0.1)
        assert s["centrifugo_node_messages_sent_count", pub] == 1
        assert s["centrifugo_node_messages_received_count", pub] == 2
        assert s["centrifugo_transport_messages_sent", key] == 20
        # The publish went to Redis once: one round trip timed.
        op = (("op", "publish"),)
        assert s["tidings_broker_request_duration_seconds_count", op] == 1
    finally:
        for client in clients:
            client.close()
    srv.stop()
    assert list(tmp_path.glob("tidings-metrics-*")) == []


def test_hooks_are_timed_and_their_failures_counted() -> None:
    """Every decision hook is timed by its kind; a hook that raises and one that
    times out are failures (an error, a timeout), a refusal is not."""
    from hooks_support import hooked_server
    from tidings.errors import ErrorCode, ProtocolError
    from tidings.hooks import ConnectCall, ConnectReply, Hooks, RPCCall

    hooks = Hooks(timeout=0.3)

    async def on_connect(call: ConnectCall) -> ConnectReply:
        return ConnectReply(user="u1")

    async def broken(call: RPCCall) -> Any:
        raise RuntimeError("the application's bug")

    async def slow(call: RPCCall) -> Any:
        await asyncio.sleep(5)

    async def refuse(call: RPCCall) -> Any:
        raise ProtocolError(ErrorCode.PERMISSION_DENIED)

    hooks.connect = on_connect
    hooks.rpc.update({"broken": broken, "slow": slow, "refuse": refuse})
    with hooked_server(hooks) as srv:
        client = connect_raw(srv.url.replace("http://", "ws://"))
        client.send(
            {"id": 2, "rpc": {"method": "broken"}},
            {"id": 3, "rpc": {"method": "slow"}},
            {"id": 4, "rpc": {"method": "refuse"}},
        )
        client.wait_for(lambda m: m.get("id") == 4)
        client.close()
        s = parse(httpx.get(srv.url + "/metrics", timeout=TIMEOUT).text)
    assert value(s, "tidings_hook_duration_seconds_count", hook="connect") == 1
    # The RPC's method is the client's to choose: one label for every method.
    assert value(s, "tidings_hook_duration_seconds_count", hook="rpc") == 3
    assert value(s, "tidings_hook_failures_total", hook="rpc", reason="error") == 1
    assert value(s, "tidings_hook_failures_total", hook="rpc", reason="timeout") == 1
    assert value(s, "tidings_hook_failures_total", hook="connect", reason="error") == 0
    assert value(s, "centrifugo_client_num_reply_errors", method="rpc", code="100") == 2
    assert value(s, "centrifugo_client_num_reply_errors", method="rpc", code="103") == 1
