"""tidings.js in a real browser: headless Debian chromium driven by Playwright.

The page is loaded through a TCP proxy (tests/browser_support.py) that can cut
every connection, refuse WebSocket upgrades or stall, so that each transport,
resume and fallback is exercised the way a real network would break it.
Skipped, with the reason, when chromium or playwright is missing and ``CI`` is
not set; under ``CI=true`` they must run.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from browser_support import Proxy, launch_browser
from conftest import ServerProcess, free_port
from helpers import SSEClient, api, publish, unique_channel
from hooks_support import HookedServer, hooked_server
from tidings.hooks import Hooks, RPCCall

pytestmark = pytest.mark.browser

WAIT_MS = 20_000

# Short timeouts so that fallbacks and reconnects happen quickly in the tests.
FAST = {
    "openTimeout": 3000,
    "minBackoff": 100,
    "maxBackoff": 1000,
    "pollInterval": 300,
    "longPollTimeout": 5,
}

SETUP = """async ({channels, options, transports}) => {
  const m = await import('/tidings.js');
  window.got = []; window.seen = []; window.unrecovered = []; window.errors = [];
  window.client = new m.Tidings(location.origin, options);
  window.sub = window.client.subscribe(channels, (p) => window.got.push(p), {
    transports: transports || undefined,
    onTransport: (n) => window.seen.push(n),
    onUnrecovered: (c) => window.unrecovered.push(...c),
    onError: (e) => window.errors.push(String(e && e.message)),
  });
}"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with launch_browser(tmp_path_factory.mktemp("chromium")) as context:
        yield context


@pytest.fixture
def proxies() -> Iterator[Callable[..., Proxy]]:
    made: list[Proxy] = []

    def make(upstream: int | None, **kw: Any) -> Proxy:
        proxy = Proxy(upstream, **kw)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    page.close()


def start(
    page: Any,
    origin: str,
    channels: list[str],
    transports: list[str] | None = None,
    **options: Any,
) -> None:
    page.goto(origin + "/health")
    page.evaluate(
        SETUP, {"channels": channels, "options": {**FAST, **options}, "transports": transports}
    )


def wait_connected(page: Any, transport: str | None = None) -> None:
    page.wait_for_function(
        "(t) => window.sub.state === 'connected' && (!t || window.sub.transport === t)",
        arg=transport,
    )


def wait_got(page: Any, n: int) -> list[dict[str, Any]]:
    try:
        page.wait_for_function("(n) => window.got.length >= n", arg=n)
    except Exception as exc:
        state = page.evaluate(
            "() => ({got: window.got, seen: window.seen, errors: window.errors,"
            " state: window.sub.state})"
        )
        raise AssertionError(f"fewer than {n} publications: {json.dumps(state)}") from exc
    got: list[dict[str, Any]] = page.evaluate("() => window.got")
    return got


def data_of(got: list[dict[str, Any]]) -> list[Any]:
    return [p["data"] for p in got]


TRANSPORTS = ["websocket", "sse", "longpoll", "poll"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_forced_transport_delivers_and_resumes_after_a_drop(
    page: Any, server: ServerProcess, proxies: Callable[..., Proxy], transport: str
) -> None:
    proxy = proxies(server.port)
    ch = unique_channel(f"br-{transport}-")
    start(page, proxy.url, [ch], [transport])
    wait_connected(page, transport)
    publish(server, ch, {"n": 1})
    assert data_of(wait_got(page, 1)) == [{"n": 1}]

    # The network drops every connection and refuses new ones for a while; what is
    # published meanwhile comes back from history on reconnect, exactly once, in order.
    proxy.refuse = True
    proxy.cut()
    for n in (2, 3, 4):
        publish(server, ch, {"n": n})
    proxy.refuse = False
    got = wait_got(page, 4)
    publish(server, ch, {"n": 5})
    got = wait_got(page, 5)
    assert data_of(got) == [{"n": n} for n in range(1, 6)]
    assert [p["offset"] for p in got] == sorted({p["offset"] for p in got})
    assert page.evaluate("() => window.unrecovered") == []
    assert page.evaluate("() => window.seen") == [transport]


def test_websocket_blocked_falls_back_to_sse(
    page: Any, server: ServerProcess, proxies: Callable[..., Proxy]
) -> None:
    proxy = proxies(server.port)
    proxy.block_websocket = True
    ch = unique_channel("br-fallback-")
    start(page, proxy.url, [ch])
    wait_connected(page, "sse")
    publish(server, ch, "hello")
    assert data_of(wait_got(page, 1)) == ["hello"]
    assert page.evaluate("() => window.seen") == ["sse"]


def test_websocket_at_a_dead_address_falls_back_to_sse(
    page: Any, server: ServerProcess, proxies: Callable[..., Proxy]
) -> None:
    dead_port = free_port()  # nothing listens there
    ch = unique_channel("br-deadws-")
    start(page, server.url, [ch], wsUrl=f"ws://127.0.0.1:{dead_port}/connection/websocket")
    wait_connected(page, "sse")
    publish(server, ch, 1)
    assert data_of(wait_got(page, 1)) == [1]


def test_stalled_sse_falls_back_to_long_poll(
    page: Any, server: ServerProcess, proxies: Callable[..., Proxy]
) -> None:
    proxy = proxies(server.port)
    proxy.block_websocket = True
    buffering = proxies(server.port, stall=True)  # accepts, then never answers
    ch = unique_channel("br-stall-")
    start(page, proxy.url, [ch], sseUrl=f"{buffering.url}/sse")
    wait_connected(page, "longpoll")
    publish(server, ch, {"x": 1})
    publish(server, ch, {"x": 2})
    assert data_of(wait_got(page, 2)) == [{"x": 1}, {"x": 2}]
    assert page.evaluate("() => window.seen") == ["longpoll"]
    assert buffering.accepted >= 1


def test_runtime_switch_resumes_without_loss(
    page: Any, server: ServerProcess, proxies: Callable[..., Proxy]
) -> None:
    """WebSocket works, then gets blocked mid-stream: SSE takes over from the same position."""
    proxy = proxies(server.port)
    ch = unique_channel("br-switch-")
    start(page, proxy.url, [ch])
    wait_connected(page, "websocket")
    publish(server, ch, 1)
    wait_got(page, 1)
    proxy.block_websocket = True
    proxy.refuse = True
    proxy.cut()
    publish(server, ch, 2)
    proxy.refuse = False
    wait_connected(page, "sse")
    publish(server, ch, 3)
    got = wait_got(page, 3)
    assert data_of(got) == [1, 2, 3]
    assert page.evaluate("() => window.seen") == ["websocket", "sse"]


@pytest.mark.parametrize("transport", ["websocket", "sse"])
def test_server_restart_is_survived(
    page: Any,
    server_factory: Callable[..., ServerProcess],
    tmp_path: Path,
    transport: str,
) -> None:
    """The memory broker loses history on restart: the app is told, and the stream goes on."""
    srv = server_factory()
    ch = unique_channel("br-restart-")
    start(page, srv.url, [ch], [transport])
    wait_connected(page, transport)
    publish(srv, ch, "before")
    wait_got(page, 1)
    srv.stop()
    srv2 = server_factory(port=srv.port)
    page.wait_for_function(f"() => window.unrecovered.includes({json.dumps(ch)})")
    wait_connected(page, transport)
    publish(srv2, ch, "after")
    got = wait_got(page, 2)
    assert data_of(got) == ["before", "after"]


@pytest.mark.parametrize("transport", ["websocket", "sse", "longpoll"])
def test_server_restart_with_redis_resumes_without_loss(
    page: Any,
    server_factory: Callable[..., ServerProcess],
    redis_server: Any,
    transport: str,
) -> None:
    """History outlives the server in Redis: what was published while the page's
    server was down arrives after the restart, once, in order, and nothing is
    reported unrecovered."""
    config = (
        f'[broker]\ntype = "redis"\nredis_url = "{redis_server.url}"\n'
        f'prefix = "{unique_channel("b")}"\n'
    )
    srv = server_factory(config)
    other = server_factory(config)  # a second node that stays up
    ch = unique_channel("br-redis-")
    start(page, srv.url, [ch], [transport])
    wait_connected(page, transport)
    publish(srv, ch, "before")
    wait_got(page, 1)
    srv.stop()
    publish(other, ch, "missed 1")
    publish(other, ch, "missed 2")
    srv2 = server_factory(config, port=srv.port)
    wait_got(page, 3)
    publish(srv2, ch, "after")
    got = wait_got(page, 4)
    assert data_of(got) == ["before", "missed 1", "missed 2", "after"]
    assert page.evaluate("() => window.unrecovered") == []


def test_publish_history_presence_over_websocket(
    page: Any, server_factory: Callable[..., ServerProcess]
) -> None:
    srv = server_factory("[namespaces.room]\npresence = true\n")
    ch = "room:" + unique_channel("p")
    start(page, srv.url, [ch])
    wait_connected(page, "websocket")
    page.evaluate(f"() => window.client.publish({json.dumps(ch)}, {{text: 'from the page'}})")
    assert data_of(wait_got(page, 1)) == [{"text": "from the page"}]
    history = page.evaluate(f"() => window.client.history({json.dumps(ch)})")
    assert [p["data"] for p in history["publications"]] == [{"text": "from the page"}]
    presence = page.evaluate(f"() => window.client.presence({json.dumps(ch)})")
    assert len(presence) >= 1


def test_token_callback_and_refresh(
    page: Any, server_factory: Callable[..., ServerProcess]
) -> None:
    """Short-lived tokens from getToken: the connection is refreshed before expiry."""
    import time

    import jwt

    secret = "browser-test-secret-of-32-bytes!!"
    srv = server_factory(f'[auth]\nhmac_secret = "{secret}"\nexpiry_grace = 1\n')
    ch = unique_channel("br-token-")

    def mint() -> str:
        return jwt.encode({"sub": "u1", "exp": int(time.time()) + 4}, secret, algorithm="HS256")

    page.expose_function("mintToken", mint)
    page.goto(srv.url + "/health")
    page.evaluate(
        """async ({ch, fast}) => {
      const m = await import('/tidings.js');
      window.got = []; window.seen = []; window.unrecovered = []; window.errors = [];
      window.minted = 0;
      window.client = new m.Tidings(location.origin, {...fast,
        getToken: async () => { window.minted++; return await window.mintToken(); }});
      window.states = [];
      window.sub = window.client.subscribe([ch], (p) => window.got.push(p), {
        onState: (s) => window.states.push(s),
        onError: (e) => window.errors.push(String(e && e.message)) });
    }""",
        {"ch": ch, "fast": FAST},
    )
    wait_connected(page, "websocket")
    # Stay connected past the first token's lifetime (plus the grace); refreshes keep it alive.
    page.wait_for_function("() => window.minted >= 3", timeout=WAIT_MS)
    publish(srv, ch, "still here")
    assert data_of(wait_got(page, 1)) == ["still here"]
    assert page.evaluate("() => window.errors") == []
    assert page.evaluate("() => window.states") == ["connected"]  # refreshed, never dropped


def test_demo_page(page: Any, server_factory: Callable[..., ServerProcess]) -> None:
    srv = server_factory(args=["--demo"])
    page.goto(srv.url + "/demo?channel=demo:test")
    page.wait_for_function("() => document.getElementById('transport').textContent === 'websocket'")
    page.fill("#name", "ann")
    page.fill("#text", "hello demo")
    page.click("text=Send")
    page.wait_for_function(
        "() => document.getElementById('log').textContent.includes('ann: hello demo')"
    )
    publish(srv, "demo:test", {"user": "api", "text": "from the API"})
    page.wait_for_function(
        "() => document.getElementById('log').textContent.includes('api: from the API')"
    )
    for transport in ("sse", "longpoll", "poll"):
        page.select_option("#force", transport)
        page.wait_for_function(
            "(t) => document.getElementById('transport').textContent === t", arg=transport
        )
        page.wait_for_function("() => window.demoSubscription.state === 'connected'")
        text = f"on {transport}"
        publish(srv, "demo:test", {"user": "api", "text": text})
        page.wait_for_function(
            "(t) => document.getElementById('log').textContent.includes(t)", arg=text
        )


def test_demo_is_off_by_default(server: ServerProcess) -> None:
    assert api(server, "info").status_code == 200
    import httpx

    assert httpx.get(server.url + "/demo").status_code == 404
    js = httpx.get(server.url + "/tidings.js")
    assert js.status_code == 200
    assert js.headers["content-type"].startswith("application/javascript")
    assert b"export class Tidings" in js.content


def test_at_capacity_the_client_waits_retry_after_and_does_not_fall_back(
    page: Any, server_factory: Callable[..., ServerProcess]
) -> None:
    """A server at limits.max_connections refuses the WebSocket handshake with 503 and
    Retry-After: 5. The browser hides that status, so tidings.js asks /health, gets the
    same 503, and waits at least 5 s (its own back-off here would be at most 1 s) instead
    of falling back to SSE; once a slot frees, it connects over WebSocket."""
    import httpx

    cap = 3
    srv = server_factory(f"[limits]\nmax_connections = {cap}\n[timeouts]\nkeepalive = 1.0\n")
    ch = unique_channel("br-capacity-")
    page.goto(srv.url + "/health")
    # Count the page's WebSocket attempts, with the time of each.
    page.evaluate(
        """async () => {
      await import('/tidings.js');
      window.attempts = [];
      const Native = window.WebSocket;
      window.WebSocket = function (...args) {
        window.attempts.push(performance.now());
        return new Native(...args);
      };
    }"""
    )

    def only_the_probe_connected() -> bool:
        # The browser's keep-alive connection is closed after 1 s; the probe is the one left.
        # (info's num_clients counts realtime clients only: the sockets are a metric.)
        scrape = httpx.get(srv.url + "/metrics", timeout=10).text
        families = {f.name: f for f in text_string_to_metric_families(scrape)}
        return families["tidings_connections"].samples[0].value == 1

    deadline = time.monotonic() + 10
    while not only_the_probe_connected():
        assert time.monotonic() < deadline, "the browser's connections were not closed"
        time.sleep(0.1)
    streams: list[SSEClient] = []
    try:
        while len(streams) < cap:  # fill the server (a probe's slot may still be held: retry)
            assert time.monotonic() < deadline + 10, f"only {len(streams)} streams admitted"
            stream = SSEClient(srv, [unique_channel("filler-")])
            if stream.response.status_code == 200:
                streams.append(stream)
            else:
                stream.close()
        assert httpx.get(srv.url + "/ready").status_code == 503

        page.evaluate(
            SETUP, {"channels": [ch], "options": FAST, "transports": ["websocket", "sse"]}
        )
        page.wait_for_function("() => window.attempts.length >= 2")
        attempts = page.evaluate("() => window.attempts")
        assert attempts[1] - attempts[0] >= 5000, attempts  # Retry-After, not the back-off
        assert page.evaluate("() => window.sub.state") == "connecting"

        streams.pop().close()  # a slot for the page
        streams.pop().close()  # and one for the publisher
        wait_connected(page, "websocket")
        publish(srv, ch, "after the wait")
        assert data_of(wait_got(page, 1)) == ["after the wait"]
        assert page.evaluate("() => window.seen") == ["websocket"]
    finally:
        for stream in streams:
            stream.close()


# -- self-healing: a silent path is noticed, a better transport is taken back --------

#: The server pings WebSocket clients and sends SSE `event: ping` every second, so a
#: client with a one-second margin notices a silent path within 2-3 s.
PINGING = "[websocket]\nping_interval = 1.0\npong_timeout = 60.0\n[sse]\nheartbeat_interval = 1.0\n"

#: What marks the proxied connection that carries each stream, and its request line.
STREAM_MARKERS = {"websocket": b"upgrade: websocket", "sse": b"get /sse", "longpoll": b"get /poll"}
STREAM_REQUESTS = {**STREAM_MARKERS, "websocket": b"get /connection/websocket"}


@pytest.mark.parametrize("transport", ["websocket", "sse", "longpoll"])
def test_a_stream_stalled_mid_way_is_detected_and_resumed(
    page: Any,
    server_factory: Callable[..., ServerProcess],
    proxies: Callable[..., Proxy],
    transport: str,
) -> None:
    """The proxy stops forwarding the live stream in both directions without closing it:
    the browser still calls it open, and only the silence tells. The watchdog (server ping
    interval + pingMargin) closes it and reconnects from the cursor: what was published
    into the black hole arrives once, in order, and nothing is reported unrecovered.
    A long-poll needs no ping: its request times out (requestTimeout + the hold)."""
    srv = server_factory(PINGING)
    proxy = proxies(srv.port)
    ch = unique_channel(f"br-silent-{transport}-")
    start(page, proxy.url, [ch], [transport], pingMargin=1000, requestTimeout=1000)
    wait_connected(page, transport)
    publish(srv, ch, 1)
    wait_got(page, 1)
    opened = proxy.count_requests(STREAM_REQUESTS[transport])

    stalled = proxy.stall_open_connections(STREAM_MARKERS[transport])
    # (Long-poll: the held request, and maybe an idle keep-alive that carried one.)
    assert stalled >= 1 if transport == "longpoll" else stalled == 1
    for n in (2, 3):
        publish(srv, ch, n)  # swallowed by the stalled path
    got = wait_got(page, 3)
    # A new stream brought them, from history (the stalled one is still open).
    assert proxy.count_requests(STREAM_REQUESTS[transport]) > opened
    publish(srv, ch, 4)
    got = wait_got(page, 4)
    assert data_of(got) == [1, 2, 3, 4]
    assert [p["offset"] for p in got] == sorted({p["offset"] for p in got})
    assert page.evaluate("() => window.unrecovered") == []
    assert page.evaluate("() => window.seen") == [transport]


def realtime_clients(srv: ServerProcess) -> int:
    """Realtime clients the server holds (WebSocket sessions, SSE streams, held polls)."""
    nodes = api(srv, "info").json()["result"]["nodes"]
    return int(sum(node["num_clients"] for node in nodes))


class Publisher:
    """Publishes 1, 2, 3, ... to a channel from a thread, back to back, until stopped: a
    stream dense enough that a transport switch happens while publications are in flight."""

    def __init__(self, srv: ServerProcess, channel: str, limit: int = 20_000) -> None:
        self.srv = srv
        self.channel = channel
        self.limit = limit
        self.sent = 0
        self._progress = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(base_url=self.srv.url, timeout=10) as http:
            while not self._stop.is_set() and self.sent < self.limit:
                n = self.sent + 1
                resp = http.post("/api/publish", json={"channel": self.channel, "data": n})
                assert resp.status_code == 200, resp.text
                with self._progress:
                    self.sent = n
                    self._progress.notify_all()

    def wait_sent(self, n: int, timeout: float = 15) -> None:
        """Block until ``n`` publications were accepted; fail after ``timeout`` seconds."""
        with self._progress:
            if not self._progress.wait_for(lambda: self.sent >= n, timeout):
                raise AssertionError(f"the publisher stopped at {self.sent} of {n}")

    def stop(self) -> int:
        """Stop and return how many were published."""
        self._stop.set()
        self._thread.join(15)
        return self.sent


def test_websocket_blocked_then_unblocked_falls_back_then_moves_back_up(
    page: Any, server: ServerProcess, proxies: Callable[..., Proxy]
) -> None:
    """A proxy refuses WebSocket: the page falls back to SSE, and its probe keeps trying
    WebSocket (backing off). Once upgrades pass again, the probe opens a WebSocket from
    the current position while SSE still delivers, switches, and closes the SSE stream.
    Publications flow back to back the whole time and the WebSocket path is slow (0.3 s),
    so while the new session subscribes the old one delivers what the new one's recovery
    brings again; each publication reaches the page exactly once, in order."""
    proxy = proxies(server.port)
    proxy.block_websocket = True
    proxy.websocket_lag = 0.3
    ch = unique_channel("br-moveup-")
    start(page, proxy.url, [ch], probeMinDelay=400, probeMaxDelay=1500)
    wait_connected(page, "sse")
    publisher = Publisher(server, ch)
    try:
        deadline = time.monotonic() + 15
        while proxy.refused_websockets < 3:  # the first attempt and two probes, refused
            assert time.monotonic() < deadline, "the probe does not retry WebSocket"
            assert page.evaluate("() => window.sub.transport") == "sse"
        proxy.block_websocket = False
        page.wait_for_function("() => window.sub.transport === 'websocket'")
        at_switch = publisher.sent
        # Go on past the switch for a tenth as many again as before it, at least ten.
        publisher.wait_sent(at_switch + max(10, at_switch // 10))
    finally:
        sent = publisher.stop()
    got = wait_got(page, sent)
    assert data_of(got) == list(range(1, sent + 1))
    assert page.evaluate("() => window.seen") == ["sse", "websocket"]
    assert page.evaluate("() => window.unrecovered") == []
    # The SSE stream was closed: the server holds the page's WebSocket only.
    deadline = time.monotonic() + 10
    while realtime_clients(server) != 1:
        assert time.monotonic() < deadline, f"{realtime_clients(server)} clients held"
        time.sleep(0.05)
    publish(server, ch, "last")
    assert data_of(wait_got(page, sent + 1))[-1] == "last"
    assert len(page.evaluate("() => window.got")) == sent + 1


# -- calls on every transport: rpc, publish, history, presence ------------------------


@pytest.fixture(scope="module")
def rpc_server() -> Iterator[HookedServer]:
    """A server whose Python hooks answer the RPC method ``add``, and ``slow`` past the hooks'
    timeout (a temporary failure); ``room:`` keeps presence."""
    hooks = Hooks(timeout=0.5)
    never = asyncio.Event()

    async def add(call: RPCCall) -> Any:
        args = call.data_json()
        return {"sum": args["a"] + args["b"]}

    async def slow(call: RPCCall) -> Any:
        await never.wait()  # cancelled by the hooks' timeout

    hooks.rpc = {"add": add, "slow": slow}
    with hooked_server(hooks, {"namespaces": {"room": {"presence": True}}}) as srv:
        yield srv


#: Counts the page's WebSocket constructions and records the URL of every fetch.
SPY = """() => {
  window.sockets = 0; window.fetched = [];
  const NativeWebSocket = window.WebSocket;
  window.WebSocket = function (...args) { window.sockets++; return new NativeWebSocket(...args); };
  const nativeFetch = window.fetch;
  window.fetch = (url, init) => {
    window.fetched.push(String(url));
    return nativeFetch(url, init);
  };
}"""

#: Runs one call of the page's client; its result, or the TidingsError it rejected with.
CALL = """async ([method, args]) => {
  const m = await import('/tidings.js');
  try {
    return {ok: await window.client[method](...args)};
  } catch (e) {
    return {error: {code: e.code, temporary: e.temporary, tidings: e instanceof m.TidingsError}};
  }
}"""


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rpc_publish_history_presence_on_every_transport(
    page: Any, rpc_server: HookedServer, transport: str
) -> None:
    """Each call answers the same on every transport: over the page's WebSocket when it
    is on WebSocket (and follows the channel), else as POST /call/<method> -- and then no
    WebSocket is ever opened, so a network that blocks WebSocket does not block calls. An
    unknown RPC method is 108, presence in a namespace without it 108, both as a
    TidingsError. A channel the page does not follow is asked over HTTP on WebSocket too,
    where the server counts a caller that may subscribe as a subscriber."""
    ch = "room:" + unique_channel(f"calls-{transport}-")
    page.goto(rpc_server.url + "/health")
    page.evaluate(SPY)
    page.evaluate(SETUP, {"channels": [ch], "options": FAST, "transports": [transport]})
    wait_connected(page, transport)

    def call(method: str, *args: Any) -> dict[str, Any]:
        result: dict[str, Any] = page.evaluate(CALL, [method, list(args)])
        return result

    assert call("rpc", "add", {"a": 2, "b": 3}) == {"ok": {"sum": 5}}
    assert call("rpc", "nope", {}) == {"error": {"code": 108, "temporary": False, "tidings": True}}
    assert call("rpc", "slow", {}) == {"error": {"code": 100, "temporary": True, "tidings": True}}
    assert call("publish", ch, {"text": "from the page"}) == {"ok": {}}
    assert data_of(wait_got(page, 1)) == [{"text": "from the page"}]
    history = call("history", ch)["ok"]
    assert [p["data"] for p in history["publications"]] == [{"text": "from the page"}]
    assert history["offset"] == page.evaluate("() => window.got[0].offset")
    presence = call("presence", ch)["ok"]
    assert isinstance(presence, dict)
    stats = call("presenceStats", ch)["ok"]
    assert stats["num_clients"] == len(presence)
    no_presence = unique_channel("plain-")
    assert call("presence", no_presence)["error"]["code"] == 108
    unfollowed = unique_channel("unfollowed-")  # history is for subscribers (the default)
    publish(rpc_server, unfollowed, "elsewhere")
    elsewhere = call("history", unfollowed)["ok"]
    assert [p["data"] for p in elsewhere["publications"]] == ["elsewhere"]

    posted = [url for url in page.evaluate("() => window.fetched") if "/call/" in url]
    if transport == "websocket":
        assert [url.rsplit("/call/", 1)[1] for url in posted] == ["presence", "history"]
        assert page.evaluate("() => window.sockets") == 1
    else:
        names = [url.rsplit("/call/", 1)[1] for url in posted]
        assert names == [
            "rpc",
            "rpc",
            "rpc",
            "publish",
            "history",
            "presence",
            "presence_stats",
            "presence",
            "history",
        ]
        assert page.evaluate("() => window.sockets") == 0


def test_http_calls_carry_the_subscription_token(
    page: Any, server_factory: Callable[..., ServerProcess]
) -> None:
    """A namespace that needs a subscription token and lets only subscribers publish and
    read: on SSE, the page's calls go over HTTP with ?sub_token= from getSubscriptionToken,
    so the server counts the page a subscriber; a channel it has no token for is 103."""
    import jwt

    secret = "browser-test-secret-of-32-bytes!!"
    srv = server_factory(
        f'[auth]\nhmac_secret = "{secret}"\n'
        '[namespaces.priv]\nsubscribe = "token"\npublish = "subscribers"\n'
        'history = "subscribers"\n'
    )
    ch = "priv:" + unique_channel("calls-")

    def mint(channel: str) -> str | None:
        if channel != ch:
            return None
        return jwt.encode({"sub": "u1", "channel": channel}, secret, algorithm="HS256")

    page.expose_function("mintSubToken", mint)
    page.goto(srv.url + "/health")
    page.evaluate(SPY)
    connection = jwt.encode({"sub": "u1"}, secret, algorithm="HS256")
    options = {**FAST, "token": connection}
    page.evaluate(
        """async ({ch, options}) => {
      const m = await import('/tidings.js');
      window.got = []; window.seen = []; window.errors = [];
      window.client = new m.Tidings(location.origin, {...options,
        getSubscriptionToken: (channel) => window.mintSubToken(channel)});
      window.sub = window.client.subscribe([ch], (p) => window.got.push(p), {
        transports: ['sse'], onTransport: (n) => window.seen.push(n),
        onError: (e) => window.errors.push(String(e && e.message))});
    }""",
        {"ch": ch, "options": options},
    )
    wait_connected(page, "sse")
    assert page.evaluate(CALL, ["publish", [ch, "mine"]]) == {"ok": {}}
    assert data_of(wait_got(page, 1)) == ["mine"]
    history = page.evaluate(CALL, ["history", [ch]])["ok"]
    assert [p["data"] for p in history["publications"]] == ["mine"]
    other = "priv:" + unique_channel("other-")
    refused = page.evaluate(CALL, ["publish", [other, "not mine"]])
    assert refused["error"]["code"] == 103
    assert page.evaluate("() => window.sockets") == 0
