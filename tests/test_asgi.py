"""tidings' ASGI app (``tidings.asgi.ASGIApp``) under uvicorn, and once under hypercorn.

The app is ``tests/asgi_app.py`` run by the ASGI server's own CLI in a
subprocess, as a team would run it; every client is one we did not write
(httpx, centrifuge-python, ``cent``) but where a test must play a hostile
client on a raw socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cent import Client as CentClient
from cent import HistoryRequest, InfoRequest, PublishRequest
from centrifuge import Client
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from conftest import HOST, ServerProcess, _die_with_parent, _kill, clean_env, free_port
from helpers import (
    RawConn,
    SSEClient,
    api,
    check_serving,
    poll_ok,
    pub_json,
    publish,
    request_bytes,
    rss_kib,
    unique_channel,
    wait_subscribers,
)
from test_emulation import _subscribe_publish_receive
from test_emulation import http_stream as emulated_http_stream
from test_emulation import sse_stream as emulated_sse
from test_websocket_python import ClientEvents, Events, next_pub
from ws_support import Proxy, connect_raw

pytestmark = pytest.mark.server

TESTS = Path(__file__).parent
TIMEOUT = 10.0

Launch = Callable[..., ServerProcess]


def _ready(srv: ServerProcess, health: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert srv.alive(), f"the ASGI server exited:\n{srv.logs()}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(srv.url + health, timeout=2).status_code == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"the ASGI server did not answer /health:\n{srv.logs()}")


@pytest.fixture
def asgi(tmp_path: Path) -> Iterator[Launch]:
    """``asgi(config, kind="uvicorn", args, app="asgi_app:app")``: an app of
    tests/asgi_app.py under an ASGI server's CLI."""
    procs: list[ServerProcess] = []

    def launch(
        config: str = "",
        kind: str = "uvicorn",
        args: tuple[str, ...] = (),
        app: str = "asgi_app:app",
        health: str = "/health",
    ) -> ServerProcess:
        port = free_port()
        cfg = tmp_path / f"asgi{len(procs)}.toml"
        cfg.write_text(config)
        if kind == "uvicorn":
            argv = ["-m", "uvicorn", app, "--host", HOST, "--port", str(port)]
        else:
            argv = ["-m", "hypercorn", app, "--bind", f"{HOST}:{port}"]
        log_path = tmp_path / f"asgi{len(procs)}.log"
        env = clean_env({"ASGI_APP_CONFIG": str(cfg), "PYTHONPATH": str(TESTS)})
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, *argv, *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=TESTS,
                preexec_fn=_die_with_parent,
            )
        srv = ServerProcess(proc, HOST, port, log_path)
        procs.append(srv)
        _ready(srv, health)
        return srv

    try:
        yield launch
    finally:
        for srv in procs:
            _kill(srv.proc)
        for srv in procs:
            # Whatever a test threw at it, the app answered without a traceback.
            assert "Traceback" not in srv.logs(), srv.logs()[-6000:]


def _client(url: str, events: Any = None, **kw: Any) -> Client:
    return Client(
        url, events=events, proxy=None, min_reconnect_delay=0.1, max_reconnect_delay=0.5, **kw
    )


def _data(pub: Any) -> Any:
    """A publication's data as the SDK gives it: decoded JSON, or raw bytes with Protobuf."""
    return json.loads(pub.data) if isinstance(pub.data, bytes) else pub.data


def _num_clients(srv: ServerProcess, channel: str) -> int:
    channels = api(srv, "channels", {}).json()["result"]["channels"]
    return int(channels.get(channel, {}).get("num_clients", 0))


# -- SSE ---------------------------------------------------------------------------


def test_sse_streams_and_resumes_by_last_event_id(asgi: Launch) -> None:
    srv = asgi()
    ch = unique_channel("asse")
    with SSEClient(srv, [ch]) as sse:
        sse.subscribed()
        assert sse.response.headers["content-type"].startswith("text/event-stream")
        first = [publish(srv, ch, {"n": n}) for n in range(3)]
        events = sse.publications(3)
        assert [pub_json(ev)["data"] for ev in events] == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert [pub_json(ev)["offset"] for ev in events] == [r["offset"] for r in first]
        last_id = events[-1].id
    wait_subscribers_gone(srv, ch)
    for n in (3, 4):
        publish(srv, ch, {"n": n})
    with SSEClient(srv, [ch], last_event_id=last_id) as again:
        assert again.subscribed().json["recovered"] is True
        assert [pub_json(ev)["data"] for ev in again.publications(2)] == [{"n": 3}, {"n": 4}]


def wait_subscribers_gone(srv: ServerProcess, channel: str) -> None:
    """The stream a client closed is gone from the hub (the ASGI server told the app)."""
    deadline = time.monotonic() + TIMEOUT
    while _num_clients(srv, channel):
        assert time.monotonic() < deadline, "a closed SSE client is still subscribed"
        time.sleep(0.05)


@pytest.mark.parametrize("kind", ["uvicorn", "hypercorn"])
def test_slow_sse_reader_is_cut_off_while_another_is_served(asgi: Launch, kind: str) -> None:
    """A subscriber that stops reading is cut off once the app's send queue passes
    ``limits.max_write_buffer``: the hub lets go of it, the server's memory stays
    bounded, a reading subscriber gets everything, and the slow one, once it reads
    again, finds whole events, the end of the stream, and resumes from its last id."""
    srv = asgi("[limits]\nmax_write_buffer = 65536\n", kind=kind)
    ch = unique_channel("aslow")
    slow = _small_socket(srv)
    slow.sendall(request_bytes("GET", f"/sse?channel={ch}"))
    head = b""
    while b"event: subscribed" not in head:
        head += slow.recv(4096)
    big = "x" * 100_000
    rss_before = rss_kib(srv)
    n = 60  # 6 MB: more than the kernel's buffers, uvicorn's and max_write_buffer
    with SSEClient(srv, [ch]) as good:
        good.subscribed()
        got: list[int] = []
        reader = threading.Thread(
            target=lambda: got.extend(ev.json["data"]["i"] for ev in good.publications(n))
        )
        reader.start()
        for i in range(n):
            publish(srv, ch, {"i": i, "pad": big})
        reader.join(30)
        assert got == list(range(n))
        # The slow reader is no longer subscribed; the good one still is.
        assert _num_clients(srv, ch) == 1
        grown = rss_kib(srv) - rss_before
        assert grown < 20_000, f"the server grew {grown} KiB for a reader that does not read"
    assert "closing slow SSE client" in srv.logs()
    # Reading again, the slow client finds whole events, then the end of its stream.
    received = head
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := slow.recv(1 << 20):
            received += chunk
    slow.close()
    assert received.endswith(b"0\r\n\r\n"), "the cut-off stream did not end"
    body = _dechunk(received.split(b"\r\n\r\n", 1)[1])
    ids = [line[4:].decode() for line in body.split(b"\n") if line.startswith(b"id: ")]
    seen = body.count(b'"pad"')
    assert 0 < seen < n and len(ids) == seen + 1  # the subscribed event's id, then one per event
    with SSEClient(srv, [ch], last_event_id=ids[-1]) as resumed:
        assert resumed.subscribed().json["recovered"] is True
        rest = [pub_json(ev)["data"]["i"] for ev in resumed.publications(n - seen)]
        assert rest == list(range(seen, n))
    check_serving(srv)


def _dechunk(data: bytes) -> bytes:
    """An HTTP/1.1 chunked body's content (the test reads the raw socket)."""
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


def test_uvicorn_graceful_timeout_ends_a_stream_as_tidings_shutdown_would(asgi: Launch) -> None:
    """uvicorn cancels requests still open at ``--timeout-graceful-shutdown``: an SSE
    stream then ends with its ``retry:`` hint, and nothing is logged as an exception."""
    srv = asgi(args=("--timeout-graceful-shutdown", "1"))
    with SSEClient(srv, [unique_channel("ashut")]) as sse:
        sse.subscribed()
        srv.proc.send_signal(signal.SIGTERM)
        tail = sse.expect_eof()
    assert tail and tail[-1].retry is not None, tail
    # uvicorn re-raises the signal once shut down: killed by SIGTERM, after the lifespan.
    assert srv.proc.wait(TIMEOUT) == -signal.SIGTERM
    assert "tidings stopped" in srv.logs()
    assert "Exception in ASGI application" not in srv.logs()


# -- long-poll and poll ------------------------------------------------------------


def test_poll_and_long_poll(asgi: Launch) -> None:
    srv = asgi()
    ch = unique_channel("apoll")
    start = poll_ok(srv, [ch], timeout=0)
    assert start["publications"] == []
    with httpx.Client(timeout=TIMEOUT) as client:
        held: list[dict[str, Any]] = []
        waiter = threading.Thread(
            target=lambda: held.append(
                client.get(
                    f"{srv.url}/poll",
                    params={"channel": ch, "cursor": start["cursor"], "timeout": "8"},
                ).json()
            )
        )
        waiter.start()
        wait_subscribers(srv, ch)  # the long-poll is held
        sent = publish(srv, ch, {"hello": "poll"})
        waiter.join(TIMEOUT)
    (answer,) = held
    assert [p["data"] for p in answer["publications"]] == [{"hello": "poll"}]
    assert answer["publications"][0]["offset"] == sent["offset"]
    again = poll_ok(srv, [ch], cursor=answer["cursor"], timeout=0)
    assert again["publications"] == [] and again["cursor"] == answer["cursor"]


def test_a_client_leaving_a_held_long_poll_releases_it(asgi: Launch) -> None:
    srv = asgi()
    ch = unique_channel("aleave")
    cursor = poll_ok(srv, [ch], timeout=0)["cursor"]
    conn = socket.create_connection((srv.host, srv.port), timeout=TIMEOUT)
    conn.sendall(request_bytes("GET", f"/poll?channel={ch}&cursor={cursor}&timeout=60"))
    wait_subscribers(srv, ch)
    conn.close()
    wait_subscribers_gone(srv, ch)
    check_serving(srv)


# -- WebSocket -----------------------------------------------------------------------


@pytest.mark.parametrize("protobuf", [False, True], ids=["json", "protobuf"])
def test_websocket_sdk_connects_subscribes_publishes_and_recovers(
    asgi: Launch, protobuf: bool
) -> None:
    srv = asgi()
    proxy = Proxy(srv.port)

    async def main() -> None:
        channel = unique_channel("aws")
        events = ClientEvents()
        c = _client(proxy.ws_url, events, use_protobuf=protobuf)
        ev = Events()
        sub = c.new_subscription(channel, ev)
        await c.connect()
        await c.ready(TIMEOUT)
        assert c.client_id
        await sub.subscribe()
        await sub.ready(TIMEOUT)
        first = await asyncio.to_thread(publish, srv, channel, {"text": "from the api"})
        pub = (await next_pub(ev)).pub
        assert (_data(pub), pub.offset) == ({"text": "from the api"}, first["offset"])
        sdk_data = {"text": "from the sdk"}
        await sub.publish(json.dumps(sdk_data).encode() if protobuf else sdk_data)
        pub = (await next_pub(ev)).pub
        assert (_data(pub), pub.offset) == ({"text": "from the sdk"}, first["offset"] + 1)
        assert pub.info is not None and pub.info.client == c.client_id

        proxy.cut()  # the network goes away; the SDK reconnects and recovers
        for n in (1, 2, 3):
            await asyncio.to_thread(publish, srv, channel, {"n": n})
        proxy.restore()
        await asyncio.wait_for(events.connected.get(), TIMEOUT)  # the first connect
        await asyncio.wait_for(events.connected.get(), TIMEOUT)  # the reconnect
        got = [(await next_pub(ev)).pub for _ in range(3)]
        assert [_data(p) for p in got] == [{"n": 1}, {"n": 2}, {"n": 3}]
        assert [p.offset for p in got] == [first["offset"] + 2 + i for i in range(3)]
        hist = await sub.history(limit=-1)
        assert len(hist.publications) == 5
        await c.disconnect()

    try:
        asyncio.run(main())
    finally:
        proxy.close()


def _raw_ws(srv: ServerProcess, **kw: Any) -> Any:
    return ws_connect(
        f"ws://{srv.host}:{srv.port}/connection/websocket", open_timeout=TIMEOUT, **kw
    )


def _small_socket(srv: ServerProcess) -> socket.socket:
    """A socket that takes little: its receive buffer is set before it connects
    (after, the window is already agreed and the kernel would absorb megabytes)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(TIMEOUT)
    sock.connect((srv.host, srv.port))
    return sock


def test_websocket_timers_connect_timeout_ping_and_no_pong(asgi: Launch) -> None:
    """The native transport's wheel drives the ASGI connections: a client that never
    sends connect is closed 3502; a connected one is pinged, and closed 3012 when it
    does not answer."""
    srv = asgi("[websocket]\nconnect_timeout = 1\nping_interval = 1\npong_timeout = 1\n")
    with _raw_ws(srv) as silent:
        with pytest.raises(ConnectionClosed) as closed:
            silent.recv(timeout=TIMEOUT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 3502
    with _raw_ws(srv) as mute:
        mute.send('{"id":1,"connect":{}}')
        assert '"connect"' in str(mute.recv(timeout=TIMEOUT))
        assert mute.recv(timeout=TIMEOUT) == "{}"  # the server's ping
        with pytest.raises(ConnectionClosed) as closed:
            mute.recv(timeout=TIMEOUT)  # no pong sent
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 3012
    with _raw_ws(srv) as polite:
        polite.send('{"id":1,"connect":{}}')
        polite.recv(timeout=TIMEOUT)
        for _ in range(3):  # answered pings keep it open past several pong timeouts
            assert polite.recv(timeout=TIMEOUT) == "{}"
            polite.send("{}")


def test_websocket_message_over_max_message_size_closes_1009(asgi: Launch) -> None:
    srv = asgi("[websocket]\nmax_message_size = 1024\n")
    with _raw_ws(srv) as ws:
        ws.send('{"id":1,"connect":{}}')
        ws.recv(timeout=TIMEOUT)
        ws.send('{"id":2,"publish":{"channel":"x","data":"' + "y" * 2000 + '"}}')
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=TIMEOUT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert "a message over 1024 bytes" in srv.logs()


def test_websocket_from_a_foreign_origin_is_refused(asgi: Launch) -> None:
    srv = asgi()
    with pytest.raises(Exception) as refused:
        _raw_ws(srv, origin="http://evil.example")
    assert "403" in str(refused.value)
    with _raw_ws(srv) as ws:  # no Origin: not a browser page, allowed
        ws.send('{"id":1,"connect":{}}')
        assert '"client"' in str(ws.recv(timeout=TIMEOUT))


def test_slow_websocket_consumer_is_closed_3008_while_another_is_served(asgi: Launch) -> None:
    """A WebSocket client that stops reading is closed 3008 once the app's send queue
    passes ``limits.max_write_buffer``; an SDK client keeps receiving everything, and
    the server's memory stays bounded."""
    srv = asgi("[limits]\nmax_write_buffer = 65536\n")
    ch = unique_channel("aslowws")
    slow = connect_raw(srv.ws_url, (ch,), rcvbuf=4096)  # subscribes, then stops reading
    rss_before = rss_kib(srv)

    async def main() -> int:
        c = _client(srv.ws_url + "/connection/websocket")
        ev = Events()
        sub = c.new_subscription(ch, ev)
        await c.connect()
        await sub.subscribe()
        await sub.ready(TIMEOUT)
        big = "x" * 100_000
        published = 0
        deadline = time.monotonic() + 60
        while "send queue over 65536 bytes" not in srv.logs():
            assert time.monotonic() < deadline, "the slow reader was never closed"
            await asyncio.to_thread(publish, srv, ch, {"i": published, "pad": big})
            assert (await next_pub(ev)).pub.data["i"] == published  # the SDK keeps up
            published += 1
        await c.disconnect()
        return published

    published = asyncio.run(main())
    assert published > 1
    grown = rss_kib(srv) - rss_before
    assert grown < 20_000, f"the server grew {grown} KiB for a reader that does not read"
    # The slow client reads at last: what was queued, then close 3008.
    assert slow.read_until_closed(20) == 3008
    slow.close()
    scrape = httpx.get(srv.url + "/metrics", timeout=TIMEOUT).text
    assert 'tidings_slow_disconnects_total{transport="websocket"} 1.0' in scrape
    assert 'tidings_http_responses_total{status="200"}' in scrape
    check_serving(srv)


def test_emulation_streams_take_commands_by_post(asgi: Launch) -> None:
    """Centrifugo's bidirectional emulation (HTTP stream and SSE, commands posted
    to ``/emulation``) through the same exchange as the other streams."""
    srv = asgi()
    with emulated_http_stream(srv) as client:
        _subscribe_publish_receive(srv, client)
    with emulated_sse(srv) as client:
        _subscribe_publish_receive(srv, client)


# -- the server API and the other routes ---------------------------------------------


def test_server_api_with_cent_and_other_routes(asgi: Launch) -> None:
    srv = asgi()
    ch = unique_channel("acent")
    cent = CentClient(srv.url + "/api", api_key="")
    first = cent.publish(PublishRequest(channel=ch, data={"via": "cent"}))
    assert first.offset == 1
    history = cent.history(HistoryRequest(channel=ch, limit=-1))
    assert [p.data for p in history.publications] == [{"via": "cent"}]
    (node,) = cent.info(InfoRequest()).nodes
    assert node.num_channels >= 0
    js = httpx.get(srv.url + "/tidings.js", timeout=TIMEOUT)
    assert js.status_code == 200 and js.headers["content-type"].startswith("application/javascript")
    missing = httpx.get(srv.url + "/nowhere", timeout=TIMEOUT)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == 104
    wrong = httpx.delete(srv.url + "/sse", timeout=TIMEOUT)
    assert wrong.status_code == 405 and "GET" in wrong.headers["allow"]


def test_oversized_body_is_refused(asgi: Launch) -> None:
    """``limits.max_body_size`` holds under ASGI: an announced length over it is refused
    before the body is read, and a chunked body as soon as the bytes pass it."""
    srv = asgi("[limits]\nmax_body_size = 4096\n")
    ch = unique_channel("abody")
    with RawConn(srv) as announced:
        announced.send(b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        answer = announced.read_response()  # without the body: the answer must not wait for it
        assert answer.status == 413 and answer.header("connection") == "close"
        assert answer.json()["error"]["message"] == "request body larger than 4096 bytes"
    with RawConn(srv) as chunked:
        chunked.send(b"POST /api/publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(5):  # 5 KiB, past the limit, and the body never ends
            chunked.send(b"400\r\n" + b"a" * 1024 + b"\r\n")
        answer = chunked.read_response()
        assert answer.status == 413
        assert answer.json()["error"]["message"] == "request body larger than 4096 bytes"
    assert "larger than 4096 bytes" in srv.logs()
    ok = httpx.post(srv.url + "/api/publish", json={"channel": ch, "data": "small"}, timeout=5)
    assert ok.status_code == 200, ok.text


# -- rt.asgi() ---------------------------------------------------------------------


def test_rt_asgi_in_a_host_app_hooks_and_in_process_publish(asgi: Launch) -> None:
    """``rt.asgi()`` mounted in a host ASGI app: the ``connect`` hook names the user
    from the host's header, and ``rt.publish`` from a host route reaches an SSE and
    a WebSocket subscriber of the same process."""
    srv = asgi(app="asgi_app:host")
    ch = unique_channel("art")
    with SSEClient(srv, [ch]) as sse, _raw_ws(srv, additional_headers={"X-User": "alice"}) as ws:
        sse.subscribed()
        ws.send('{"id":1,"connect":{}}')
        ws.recv(timeout=TIMEOUT)
        ws.send(json.dumps({"id": 2, "subscribe": {"channel": ch}}))
        ws.recv(timeout=TIMEOUT)
        answer = httpx.post(f"{srv.url}/host/publish", params={"channel": ch, "text": "hi"})
        assert answer.status_code == 200, answer.text
        offset = answer.json()["offset"]
        (event,) = sse.publications(1)
        assert (pub_json(event)["data"], pub_json(event)["offset"]) == ({"text": "hi"}, offset)
        push = json.loads(ws.recv(timeout=TIMEOUT))["push"]
        assert push["pub"]["data"] == {"text": "hi"} and push["pub"]["offset"] == offset
        # The hook's user is the publisher's, on the client's own publication.
        ws.send(json.dumps({"id": 3, "publish": {"channel": ch, "data": {"from": "ws"}}}))
        messages = [
            json.loads(line) for _ in range(2) for line in ws.recv(timeout=TIMEOUT).split("\n")
        ]
        (pub,) = [m["push"]["pub"] for m in messages if "push" in m]
        assert pub["info"]["user"] == "alice"


def test_mounted_in_starlette_under_a_path(asgi: Launch) -> None:
    """``Mount("/rt", app)`` in Starlette, started from the host's lifespan: tidings'
    routes answer under the mount's path (``root_path``), streams and WebSocket too."""
    srv = asgi(app="asgi_app:starlette_host", health="/rt/health")
    assert httpx.get(srv.url + "/rt/health", timeout=TIMEOUT).json()["status"] == "ok"
    assert httpx.get(srv.url + "/health", timeout=TIMEOUT).status_code == 404  # the host's
    ch = unique_channel("amount")
    with (
        httpx.Client(timeout=TIMEOUT) as http,
        http.stream("GET", f"{srv.url}/rt/sse", params={"channel": ch}) as stream,
    ):
        lines = stream.iter_lines()
        assert any("event: subscribed" in line for line in itertools.islice(lines, 6))
        sent = http.post(f"{srv.url}/rt/api/publish", json={"channel": ch, "data": {"m": 1}})
        assert sent.status_code == 200, sent.text
        data = next(line for line in lines if line.startswith('data: {"channel"'))
        assert json.loads(data[len("data: ") :])["data"] == {"m": 1}
    with ws_connect(f"ws://{srv.host}:{srv.port}/rt/connection/websocket") as ws:
        ws.send('{"id":1,"connect":{}}')
        assert '"client"' in str(ws.recv(timeout=TIMEOUT))


def test_capacity_is_refused_503_and_1013(asgi: Launch) -> None:
    """``limits.max_connections`` counts held requests and streams: past it a request
    is answered 503 with ``Retry-After``, a WebSocket handshake refused, until one ends."""
    srv = asgi("[limits]\nmax_connections = 2\n")
    ch = unique_channel("acap")
    with SSEClient(srv, [ch]) as one, SSEClient(srv, [ch]) as two:
        one.subscribed()
        two.subscribed()
        full = httpx.get(srv.url + "/health", timeout=TIMEOUT)
        assert full.status_code == 503 and full.headers["retry-after"]
        assert full.json()["error"]["code"] == 111
        with pytest.raises(Exception) as refused:
            _raw_ws(srv)
        assert "403" in str(refused.value)
    wait_subscribers_gone(srv, ch)
    assert httpx.get(srv.url + "/health", timeout=TIMEOUT).status_code == 200


# -- hypercorn -----------------------------------------------------------------------


def test_under_hypercorn_sse_poll_websocket_and_api(asgi: Launch) -> None:
    srv = asgi(kind="hypercorn")
    ch = unique_channel("ahyp")

    async def main() -> None:
        c = _client(f"ws://{srv.host}:{srv.port}/connection/websocket", use_protobuf=True)
        ev = Events()
        sub = c.new_subscription(ch, ev)
        await c.connect()
        await sub.subscribe()
        await sub.ready(TIMEOUT)
        with SSEClient(srv, [ch]) as sse:
            sse.subscribed()
            sent = await asyncio.to_thread(publish, srv, ch, {"to": "all"})
            assert _data((await next_pub(ev)).pub) == {"to": "all"}
            (event,) = sse.publications(1)
            assert pub_json(event)["offset"] == sent["offset"]
        await c.disconnect()

    asyncio.run(main())
    body = poll_ok(srv, [ch], cursor=None, timeout=0)
    assert body["publications"] == [] and body["cursor"]
    check_serving(srv)
