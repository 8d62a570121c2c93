"""tidings-shared.js in Chromium: the tabs of one origin share one server connection.

Pages of one Playwright browser context are tabs of one origin: they share the
SharedWorker (or, with ``sharedWorker: false``, elect a leader tab over Web Locks
and talk to it over a BroadcastChannel). Connections are counted on the server
(``/api/info``'s ``num_clients``), channels by ``/api/channels``; publications
come from the server API while the tabs subscribe, unsubscribe and close, and
each tab must get exactly its channels' publications, each once, in order.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from browser_support import launch_browser
from conftest import ServerProcess
from helpers import api, publish, unique_channel

pytestmark = pytest.mark.browser

WAIT_MS = 20_000
DEADLINE = 20.0  # seconds for a server-side figure to settle

FAST = {
    "openTimeout": 3000,
    "minBackoff": 100,
    "maxBackoff": 1000,
    "pollInterval": 300,
    "longPollTimeout": 5,
}

# options.callbacks: {option: name of a function exposed to the page}, e.g. getToken.
SETUP = """async ({callbacks, ...options}) => {
  const m = await import('/tidings-shared.js');
  window.got = {}; window.states = {}; window.transports = {}; window.errors = [];
  window.subs = {};
  for (const [option, name] of Object.entries(callbacks || {})) {
    options[option] = (...args) => window[name](...args);
  }
  window.client = new m.Tidings(location.origin, options);
}"""

SUBSCRIBE = """([name, channels]) => {
  window.got[name] = []; window.states[name] = []; window.transports[name] = [];
  window.subs[name] = window.client.subscribe(channels, (p) => window.got[name].push(p), {
    onState: (s) => window.states[name].push(s),
    onTransport: (t) => window.transports[name].push(t),
    onError: (e) => window.errors.push(String(e && e.message)),
  });
}"""

Tab = Any  # a Playwright page


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with launch_browser(tmp_path_factory.mktemp("chromium")) as context:
        yield context


@pytest.fixture
def tabs(browser: Any) -> Iterator[Callable[..., Tab]]:
    """Opens tabs on an origin with a tidings-shared.js client; closes them after the test."""
    opened: list[Tab] = []

    def open_tab(
        origin: str,
        prepare: tuple[str, ...] = (),
        expose: dict[str, Callable[..., Any]] | None = None,
        **options: Any,
    ) -> Tab:
        page = browser.new_page()
        page.set_default_timeout(WAIT_MS)
        opened.append(page)
        for name, function in (expose or {}).items():
            page.expose_function(name, function)
        page.goto(origin + "/health")
        for script in prepare:  # changes to the page before the client exists
            page.evaluate(script)
        page.evaluate(SETUP, {**FAST, **options})
        return page

    yield open_tab
    for page in opened:
        if not page.is_closed():
            page.close()


def subscribe(tab: Tab, name: str, channels: list[str]) -> None:
    tab.evaluate(SUBSCRIBE, [name, channels])
    tab.wait_for_function("(n) => window.subs[n].state === 'connected'", arg=name)


def received(tab: Tab, name: str) -> list[Any]:
    got: list[dict[str, Any]] = tab.evaluate("(n) => window.got[n]", name)
    return [(p["channel"], p["data"]) for p in got]


def wait_received(tab: Tab, name: str, expected: list[Any]) -> None:
    """Waits until ``name`` has as many publications as expected, then compares them."""
    try:
        tab.wait_for_function("([n, k]) => window.got[n].length >= k", arg=[name, len(expected)])
    except Exception as exc:
        raise AssertionError(f"{name}: {received(tab, name)} instead of {expected}") from exc
    assert received(tab, name) == expected


def num_clients(srv: ServerProcess) -> int:
    body = api(srv, "info").json()
    return int(sum(node["num_clients"] for node in body["result"]["nodes"]))


def channels_on_server(srv: ServerProcess) -> set[str]:
    return set(api(srv, "channels").json()["result"]["channels"])


def settle(what: str, read: Callable[[], Any], expected: Any) -> None:
    """Polls a server-side figure until it equals ``expected`` (a deadline, no fixed sleep)."""
    deadline = time.monotonic() + DEADLINE
    seen = read()
    while seen != expected:
        assert time.monotonic() < deadline, f"{what}: {seen!r}, expected {expected!r}"
        time.sleep(0.05)
        seen = read()


class Publisher:
    """Publishes 1, 2, 3... to a channel from a thread until stopped: the stream that
    runs across the switches the test makes."""

    def __init__(self, srv: ServerProcess, channel: str) -> None:
        self.srv = srv
        self.channel = channel
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self._stop.is_set():
                body = {"channel": self.channel, "data": self.sent + 1}
                resp = http.post(f"{self.srv.url}/api/publish", json=body)
                assert resp.status_code == 200, resp.text
                self.sent += 1
                self._stop.wait(0.02)  # a steady pace, not a synchronisation

    def __enter__(self) -> Publisher:
        self._thread.start()
        return self

    def wait_sent(self, n: int) -> None:
        deadline = time.monotonic() + DEADLINE
        while self.sent < n:
            assert time.monotonic() < deadline, f"only {self.sent} published"
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_three_tabs_share_one_connection_each_gets_its_channels(
    tabs: Callable[..., Tab], server_factory: Callable[..., ServerProcess]
) -> None:
    srv = server_factory()
    a, b, c = (unique_channel(f"sh-{x}-") for x in "abc")
    one, two, three = tabs(srv.url), tabs(srv.url), tabs(srv.url)
    subscribe(one, "s", [a])
    subscribe(two, "s", [b])
    subscribe(three, "s", [a, c])
    settle("connections held for three tabs", lambda: num_clients(srv), 1)
    assert [t.evaluate("() => window.client.sharing") for t in (one, two, three)] == ["worker"] * 3
    settle("channels on the server", lambda: channels_on_server(srv), {a, b, c})

    for channel, data in ((a, 1), (b, 2), (c, 3), (a, 4)):
        publish(srv, channel, data)
    wait_received(one, "s", [(a, 1), (a, 4)])
    wait_received(two, "s", [(b, 2)])
    wait_received(three, "s", [(a, 1), (c, 3), (a, 4)])
    # The app's callbacks, as with tidings.js: one transport, connected once.
    for tab in (one, two, three):
        assert tab.evaluate("() => window.transports.s") == ["websocket"]
        assert tab.evaluate("() => window.states.s") == ["connected"]
    # Calls go through the shared connection too, and open none of their own.
    history = three.evaluate(f"() => window.client.history({json.dumps(c)})")
    assert [p["data"] for p in history["publications"]] == [3]
    assert num_clients(srv) == 1


@pytest.mark.parametrize("transport", ["websocket", "sse", "longpoll"])
def test_union_grows_and_shrinks_without_loss(
    tabs: Callable[..., Tab], server_factory: Callable[..., ServerProcess], transport: str
) -> None:
    """Each change of the union reopens the shared stream from the current positions while
    publications keep coming, on each kind of transport (the resume is a WebSocket recover,
    an SSE or a poll cursor): the tab that stays sees every one of them, once, in order."""
    srv = server_factory()
    steady, grown, extra = (unique_channel(f"sh-{x}-") for x in ("steady", "grown", "extra"))
    one, two = tabs(srv.url, transports=[transport]), tabs(srv.url, transports=[transport])
    subscribe(one, "steady", [steady])
    with Publisher(srv, steady) as pub:
        pub.wait_sent(5)
        subscribe(two, "grown", [grown])  # the union grows: a new stream replaces the old
        settle("channels after growing", lambda: channels_on_server(srv), {steady, grown})
        publish(srv, grown, "g1")
        wait_received(two, "grown", [(grown, "g1")])
        pub.wait_sent(pub.sent + 5)
        subscribe(one, "extra", [extra, steady])  # a second subscription in the same tab
        pub.wait_sent(pub.sent + 5)
        two.evaluate("() => window.subs.grown.unsubscribe()")  # the union shrinks
        settle("channels after shrinking", lambda: channels_on_server(srv), {steady, extra})
        one.evaluate("() => window.subs.extra.unsubscribe()")
        settle("channels at the end", lambda: channels_on_server(srv), {steady})
        pub.wait_sent(pub.sent + 5)
    sent = pub.sent
    wait_received(one, "steady", [(steady, n) for n in range(1, sent + 1)])
    settle("connections at the end", lambda: num_clients(srv), 1)
    assert one.evaluate("() => window.states.steady") == ["connected"]
    assert one.evaluate("() => window.transports.steady") == [transport]


def test_leader_tab_closes_another_takes_over_without_loss(
    tabs: Callable[..., Tab], server_factory: Callable[..., ServerProcess]
) -> None:
    """Without SharedWorker: the leader tab holds the connection; when it closes, another
    tab is elected, and every tab resumes from what it had seen."""
    srv = server_factory()
    ch, other = unique_channel("sh-lead-"), unique_channel("sh-other-")
    group = [tabs(srv.url, sharedWorker=False) for _ in range(3)]
    for tab in group:
        subscribe(tab, "s", [ch])
    subscribe(group[2], "o", [other])
    settle("connections held for three tabs", lambda: num_clients(srv), 1)
    modes = [tab.evaluate("() => window.client.sharing") for tab in group]
    assert sorted(modes) == ["follower", "follower", "leader"], modes
    leader = group[modes.index("leader")]
    rest = [tab for tab in group if tab is not leader]

    with Publisher(srv, ch) as pub:
        pub.wait_sent(10)
        leader.close()
        pub.wait_sent(pub.sent + 10)  # published while the connection moves
        settle("connections after the hand-over", lambda: num_clients(srv), 1)
        pub.wait_sent(pub.sent + 5)
    sent = pub.sent
    for tab in rest:
        wait_received(tab, "s", [(ch, n) for n in range(1, sent + 1)])
    modes = sorted(tab.evaluate("() => window.client.sharing") for tab in rest)
    assert modes == ["follower", "leader"]
    if group[2] is not leader:  # its second subscription came along
        publish(srv, other, "still followed")
        wait_received(group[2], "o", [(other, "still followed")])


def test_shared_false_opens_one_connection_per_tab(
    tabs: Callable[..., Tab], server_factory: Callable[..., ServerProcess]
) -> None:
    srv = server_factory()
    ch = unique_channel("sh-off-")
    group = [tabs(srv.url, shared=False) for _ in range(3)]
    for tab in group:
        subscribe(tab, "s", [ch])
    settle("connections of three unshared tabs", lambda: num_clients(srv), 3)
    assert [t.evaluate("() => window.client.sharing") for t in group] == ["off"] * 3
    publish(srv, ch, "x")
    for tab in group:
        wait_received(tab, "s", [(ch, "x")])


# The tab's goodbye on pagehide is dropped, as when a tab crashes or is discarded.
NO_GOODBYE = """() => {
  const listen = window.addEventListener;
  window.addEventListener = function (type, ...rest) {
    if (type !== 'pagehide') return listen.call(this, type, ...rest);
  };
}"""
NO_LOCKS = "() => Object.defineProperty(Navigator.prototype, 'locks', {get: () => undefined})"


@pytest.mark.parametrize("locks", [True, False], ids=["tab-lock", "ping"])
def test_a_tab_gone_without_goodbye_leaves_no_channel_behind(
    tabs: Callable[..., Tab], server_factory: Callable[..., ServerProcess], locks: bool
) -> None:
    """A tab that dies sends neither unsubscribe nor its pagehide goodbye: the hub learns it
    is gone from the tab's Web Lock (granted to the hub once the tab's document is gone) or,
    where the tab has no Web Locks, from its silence to the hub's pings; either way its
    channels leave the shared stream while the other tab is served on."""
    srv = server_factory()
    kept, leaked = unique_channel("sh-kept-"), unique_channel("sh-leak-")
    stays = tabs(srv.url)
    subscribe(stays, "s", [kept])
    doomed = tabs(srv.url, (NO_GOODBYE,) if locks else (NO_GOODBYE, NO_LOCKS), pingInterval=300)
    subscribe(doomed, "s", [leaked])
    settle("channels with both tabs", lambda: channels_on_server(srv), {kept, leaked})
    doomed.close()
    settle("channels after the tab is gone", lambda: channels_on_server(srv), {kept})
    publish(srv, kept, "on")
    wait_received(stays, "s", [(kept, "on")])
    assert num_clients(srv) == 1


def test_a_worker_that_cannot_run_leaves_the_tab_on_its_own_connection(
    tabs: Callable[..., Tab], server_factory: Callable[..., ServerProcess], browser: Any
) -> None:
    """The worker script is not served (an older server, a CSP): the tab does not wait
    forever for a hub, it shares by leader election instead and is served."""
    srv = server_factory()
    ch = unique_channel("sh-noworker-")
    browser.route("**/tidings-worker.js", lambda route: route.fulfill(status=404, body="gone"))
    try:
        tab = tabs(srv.url)
        subscribe(tab, "s", [ch])
        assert tab.evaluate("() => window.client.sharing") in ("leader", "follower")
        publish(srv, ch, "served")
        wait_received(tab, "s", [(ch, "served")])
    finally:
        browser.unroute("**/tidings-worker.js")


def test_ten_demo_tabs_show_one_connection_held_by_the_server(
    server_factory: Callable[..., ServerProcess], browser: Any
) -> None:
    """Ten tabs of /demo (the issue's test): each says it shares, and shows the server's
    count of realtime clients: 1."""
    srv = server_factory(args=["--demo"])
    channel = unique_channel("demo:")
    pages = []
    for _ in range(10):
        page = browser.new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(f"{srv.url}/demo?channel={channel}")
        pages.append(page)
    try:
        settle("connections of ten demo tabs", lambda: num_clients(srv), 1)
        for page in pages:
            page.wait_for_function("() => document.getElementById('clients').textContent === '1'")
            assert page.text_content("#sharing") == "worker"
        publish(srv, channel, {"user": "api", "text": "to every tab"})
        for page in pages:
            page.wait_for_function(
                "() => document.getElementById('log').textContent.includes('api: to every tab')"
            )
    finally:
        for page in pages:
            page.close()


CALL = """async ([method, args]) => {
  try { return {ok: await window.client[method](...args)}; }
  catch (e) { return {error: {code: e.code, message: e.message}}; }
}"""


def test_tokens_calls_and_a_refused_channel_through_the_shared_connection(
    tabs: Callable[..., Tab], server_factory: Callable[..., ServerProcess]
) -> None:
    """getToken and getSubscriptionToken stay in the tabs and are asked by the hub; calls are
    answered with the server's result or error code; a channel the server refuses closes the
    subscription of the tab that asked for it (onError, closed), not the others'."""
    import jwt

    secret = "browser-test-secret-of-32-bytes!!"
    srv = server_factory(
        f'[auth]\nhmac_secret = "{secret}"\n[namespaces.priv]\nsubscribe = "token"\n'
    )
    open_ch = unique_channel("sh-open-")
    allowed, denied = "priv:" + unique_channel("ok-"), "priv:" + unique_channel("no-")

    def mint() -> str:
        return jwt.encode({"sub": "u1", "exp": int(time.time()) + 60}, secret, algorithm="HS256")

    def mint_sub(channel: str) -> str | None:
        if channel != allowed:
            return None
        return jwt.encode({"sub": "u1", "channel": channel}, secret, algorithm="HS256")

    expose = {"mintToken": mint, "mintSubToken": mint_sub}
    callbacks = {"getToken": "mintToken", "getSubscriptionToken": "mintSubToken"}
    group = [tabs(srv.url, expose=expose, callbacks=callbacks) for _ in range(3)]
    one, two, three = group
    subscribe(one, "s", [open_ch])
    subscribe(two, "s", [allowed])
    three.evaluate(SUBSCRIBE, ["s", [denied]])
    three.wait_for_function("() => window.subs.s.state === 'closed'")
    assert three.evaluate("() => window.errors") != []
    assert three.evaluate("() => window.states.s") == ["closed"]
    settle("channels on the server", lambda: channels_on_server(srv), {open_ch, allowed})
    settle("connections held", lambda: num_clients(srv), 1)

    publish(srv, open_ch, "o1")
    publish(srv, allowed, "a1")
    wait_received(one, "s", [(open_ch, "o1")])
    wait_received(two, "s", [(allowed, "a1")])
    assert one.evaluate("() => window.client.sharing") == "worker"
    history = three.evaluate(CALL, ["history", [open_ch]])
    assert [p["data"] for p in history["ok"]["publications"]] == ["o1"]
    # With an auth key, clients may not publish by default: the server's 103 comes back.
    refused = two.evaluate(CALL, ["publish", [open_ch, "not allowed"]])
    assert refused["error"]["code"] == 103, refused


def test_a_tab_whose_worker_dies_starts_another_and_resumes(
    tabs: Callable[..., Tab], server_factory: Callable[..., ServerProcess]
) -> None:
    """The SharedWorker is ended under the tabs (as a crash would): each tab learns it from
    the worker's Web Lock, starts a new worker and registers again from its positions."""
    srv = server_factory()
    ch = unique_channel("sh-crash-")
    one, two = tabs(srv.url), tabs(srv.url)
    subscribe(one, "s", [ch])
    subscribe(two, "s", [ch])
    settle("connections held", lambda: num_clients(srv), 1)
    cdp = one.context.new_cdp_session(one)

    def workers() -> list[str]:
        targets = cdp.send("Target.getTargets")["targetInfos"]
        mine = (t for t in targets if t["type"] == "shared_worker" and t["url"].startswith(srv.url))
        return [t["targetId"] for t in mine]

    with Publisher(srv, ch) as pub:
        pub.wait_sent(5)
        (worker,) = workers()
        cdp.send("Target.closeTarget", {"targetId": worker})
        pub.wait_sent(pub.sent + 10)
        settle("a new worker", lambda: len([w for w in workers() if w != worker]), 1)
        settle("connections after the new worker", lambda: num_clients(srv), 1)
        pub.wait_sent(pub.sent + 5)
    sent = pub.sent
    for tab in (one, two):
        wait_received(tab, "s", [(ch, n) for n in range(1, sent + 1)])


def test_the_shared_connection_keeps_within_the_servers_channel_limit(
    tabs: Callable[..., Tab], server_factory: Callable[..., ServerProcess]
) -> None:
    """All tabs' channels travel on one connection, bounded by the server's
    max_channels_per_connection: the subscription that would pass it is refused at once
    (onError with the server's code 106, state closed), the others are served on."""
    srv = server_factory("[limits]\nmax_channels_per_connection = 3\n")
    a, b, c, d = (unique_channel(f"sh-lim{x}-") for x in "abcd")
    one, two, three = (tabs(srv.url, maxChannels=3) for _ in range(3))
    subscribe(one, "s", [a, b])
    subscribe(two, "s", [c])
    three.evaluate(SUBSCRIBE, ["s", [d]])
    three.wait_for_function("() => window.subs.s.state === 'closed'")
    assert "limit exceeded" in three.evaluate("() => window.errors")[0]
    assert three.evaluate("() => window.states.s") == ["closed"]
    publish(srv, a, 1)
    publish(srv, c, 2)
    wait_received(one, "s", [(a, 1)])
    wait_received(two, "s", [(c, 2)])
    assert channels_on_server(srv) == {a, b, c}
    assert num_clients(srv) == 1
