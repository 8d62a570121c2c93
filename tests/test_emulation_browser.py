"""centrifuge-js (its npm ``dist`` build, unmodified) in headless chromium,
through a proxy that refuses WebSocket upgrades: it falls back to the
bidirectional emulation, receives, publishes and recovers after a cut.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from browser_support import Proxy, launch_browser
from helpers import publish, unique_channel

pytestmark = pytest.mark.browser

WAIT_MS = 20_000
SDK = Path(__file__).resolve().parent / "js" / "node_modules" / "centrifuge" / "dist"

SETUP = """async ({channel, transports}) => {
  window.events = [];
  const endpoints = transports.map((t) => ({
    transport: t, endpoint: location.origin + '/connection/' + t,
  }));
  const c = new Centrifuge(endpoints, {
    emulationEndpoint: location.origin + '/emulation',
    minReconnectDelay: 100, maxReconnectDelay: 500, timeout: 5000,
  });
  c.on('connected', (ctx) => window.events.push({event: 'connected', transport: ctx.transport}));
  c.on('connecting', () => window.events.push({event: 'connecting'}));
  const sub = c.newSubscription(channel);
  sub.on('subscribed', (ctx) => window.events.push(
    {event: 'subscribed', recovered: ctx.recovered, wasRecovering: ctx.wasRecovering}));
  sub.on('publication', (ctx) => window.events.push(
    {event: 'publication', data: ctx.data, offset: ctx.offset}));
  sub.subscribe();
  c.connect();
  window.sub = sub;
}"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with launch_browser(tmp_path_factory.mktemp("chromium")) as context:
        yield context


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    page.close()


def wait_event(page: Any, predicate: str, start: int = 0) -> Any:
    """The first event from ``start`` on for which the JS ``predicate(e)`` holds."""
    script = f"([s]) => window.events.slice(s).find((e) => {predicate})"
    page.wait_for_function(script, arg=[start])
    return page.evaluate(script, [start])


@pytest.mark.parametrize("fallback", ["http_stream", "sse"])
def test_websocket_blocked_falls_back_to_emulation_and_recovers(
    page: Any, server: Any, fallback: str
) -> None:
    proxy = Proxy(server.port)
    proxy.block_websocket = True
    try:
        channel = unique_channel("emubr")
        publish(server, channel, {"n": 0})  # the stream exists, with an epoch
        page.goto(proxy.url + "/health")
        page.add_script_tag(path=str(SDK / "centrifuge.js"))
        page.evaluate(SETUP, {"channel": channel, "transports": ["websocket", fallback]})
        connected = wait_event(page, "e.event === 'connected'")
        assert connected["transport"] == fallback
        wait_event(page, "e.event === 'subscribed'")
        publish(server, channel, {"n": 1})
        wait_event(page, "e.event === 'publication' && e.data.n === 1")
        page.evaluate("() => window.sub.publish({n: 2})")  # a command by POST /emulation
        wait_event(page, "e.event === 'publication' && e.data.n === 2")

        mark = page.evaluate("() => window.events.length")
        proxy.cut()
        wait_event(page, "e.event === 'connecting'", mark)
        for n in (3, 4, 5):
            publish(server, channel, {"n": n})
        again = wait_event(page, "e.event === 'subscribed'", mark)
        assert again["wasRecovering"] is True and again["recovered"] is True
        publish(server, channel, {"n": 6})
        wait_event(page, "e.event === 'publication' && e.data.n === 6", mark)
        events = page.evaluate("([s]) => window.events.slice(s)", [mark])
        got = [e["data"]["n"] for e in events if e["event"] == "publication"]
        assert got == [3, 4, 5, 6]
    finally:
        proxy.close()
