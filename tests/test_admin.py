"""The admin page (issue 15): its rules over real sockets, and the page in headless chromium.

The server runs with an HMAC secret, so that its default namespace needs a
connection token: the admin tail has to work where an anonymous subscriber is
refused, and nobody without the admin session may use it. Hostile requests
(another origin with the cookie, no login, a user's token on the tail,
password guessing) are played with httpx against a real ``tidings serve``.

Browser tests are skipped, with the reason, when chromium or playwright is
missing and ``CI`` is not set (tests/browser_support.py). With
``TIDINGS_DOCS_SCREENSHOTS=1`` the screenshot test writes ``docs/admin.png``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import jwt
import pytest
from centrifuge import (
    Client,
    ClientEventHandler,
    DisconnectedContext,
)

from browser_support import launch_browser
from conftest import ServerProcess
from helpers import (
    TIMEOUT,
    SSEClient,
    SSEParser,
    api,
    pub_json,
    publish,
    unique_channel,
)
from tidings.admin import AdminAccess, AdminSessions, LoginLimiter, foreign_origin
from tidings.auth import InvalidToken
from tidings.config import ConfigError, load_config
from tidings.http import Headers, Request

PASSWORD = "correct horse battery staple"
SECRET = "an HMAC secret of at least thirty-two bytes"
CONFIG = f"""
[admin]
enabled = true
password = "{PASSWORD}"

[auth]
hmac_secret = "{SECRET}"

[namespaces.room]
presence = true
"""
WAIT_MS = 20_000
T = TypeVar("T")


def user_token(user: str) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")


def same_origin(srv: ServerProcess) -> dict[str, str]:
    """The headers chromium sends with a POST from the admin page itself."""
    return {"Origin": srv.url, "Sec-Fetch-Site": "same-origin"}


def login(srv: ServerProcess, password: str = PASSWORD) -> httpx.Response:
    return httpx.post(
        f"{srv.url}/admin/login",
        json={"password": password},
        headers=same_origin(srv),
        timeout=TIMEOUT,
    )


def session_cookie(srv: ServerProcess) -> str:
    resp = login(srv)
    assert resp.status_code == 200, resp.text
    return resp.cookies["tidings_admin"]


def admin_call(
    srv: ServerProcess,
    method: str,
    params: dict[str, Any],
    *,
    cookie: str | None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    cookies = {"tidings_admin": cookie} if cookie is not None else {}
    return httpx.post(
        f"{srv.url}/admin/api/{method}",
        json=params,
        headers=same_origin(srv) if headers is None else headers,
        cookies=cookies,
        timeout=TIMEOUT,
    )


def history_data(srv: ServerProcess, channel: str) -> list[Any]:
    body = api(srv, "history", {"channel": channel, "limit": -1}).json()
    return [pub["data"] for pub in body["result"]["publications"]]


@pytest.fixture(scope="module")
def admin_server(module_server_factory: Any) -> ServerProcess:
    srv: ServerProcess = module_server_factory(CONFIG)
    return srv


# -- the rules, without a server --------------------------------------------------


def test_session_values_verify_until_they_expire() -> None:
    sessions = AdminSessions(PASSWORD, ttl=3600)
    value, expires = sessions.issue(now=1_000_000)
    assert expires == 1_003_600
    assert sessions.expiry(value, now=1_003_599) == expires
    assert sessions.expiry(value, now=1_003_600) is None  # expired
    stamp, nonce, mac = value.split(".")
    assert sessions.expiry(f"{int(stamp) + 9999}.{nonce}.{mac}", now=1_000_000) is None
    assert AdminSessions("another password", 3600).expiry(value, now=1_000_000) is None
    for junk in ("", "x", "1.2", "..", "9" * 300, "é.a.b", None):
        assert sessions.expiry(junk, now=1_000_000) is None
    assert sessions.password_matches(PASSWORD)
    assert not sessions.password_matches(PASSWORD + " ")
    assert not sessions.password_matches("\udc80")  # a lone surrogate is no crash


def test_login_limiter_counts_per_address_and_is_bounded() -> None:
    limiter = LoginLimiter(max_failures=3, window=60, max_addresses=100)
    for _ in range(3):
        assert limiter.retry_after("10.0.0.1", now=0) == 0
        limiter.failed("10.0.0.1", now=0)
    assert limiter.retry_after("10.0.0.1", now=10) == 50
    assert limiter.retry_after("10.0.0.2", now=10) == 0  # another address is not held
    assert limiter.retry_after("10.0.0.1", now=60) == 0  # the window is over
    for n in range(10_000):  # an attacker with many addresses
        limiter.failed(f"2001:db8::{n:x}", now=1)
    assert len(limiter) == 100


def _request(method: str, **headers: str) -> Request:
    raw = [
        (name.lower().replace("_", "-").encode(), value.encode()) for name, value in headers.items()
    ]
    return Request(method, b"/admin/api/info", "/admin/api/info", "", Headers(raw), None, True)


def test_same_origin_rule() -> None:
    here = {"host": "tidings.example:8000"}
    assert foreign_origin(_request("POST", origin="http://tidings.example:8000", **here)) is None
    assert foreign_origin(_request("POST", sec_fetch_site="same-origin", **here)) is None
    assert foreign_origin(_request("GET", **here)) is None  # curl, a GET
    refused = [
        _request("POST", **here),  # a POST without Origin
        _request("POST", origin="http://evil.example", **here),
        _request("POST", origin="http://app.tidings.example:8000", **here),  # same site
        _request("POST", origin="null", **here),
        _request("POST", origin="http://tidings.example:8000", sec_fetch_site="same-site", **here),
        _request("GET", sec_fetch_site="cross-site", **here),
        _request("POST", origin="http://tidings.example:8000"),  # no Host to compare
    ]
    for request in refused:
        assert foreign_origin(request) is not None, request.headers.raw


def test_admin_access_takes_only_a_session() -> None:
    config = load_config(overrides={"admin.enabled": True, "admin.password": PASSWORD})
    sessions = AdminSessions(PASSWORD, 3600)
    access = AdminAccess(config, sessions)
    value, expires = sessions.issue(time.time())
    assert access.authenticate(value).expires == expires
    for token in (None, "", user_token("alice")):
        with pytest.raises(InvalidToken):
            access.authenticate(token)


def test_config_off_by_default_and_needs_a_password() -> None:
    assert load_config().admin.enabled is False
    with pytest.raises(ConfigError, match=r"admin\.password"):
        load_config(overrides={"admin.enabled": True})


@pytest.mark.server  # starts `tidings check-config`
def test_check_config_masks_the_password(tmp_path: Path) -> None:
    config = tmp_path / "tidings.toml"
    config.write_text(CONFIG)
    done = subprocess.run(
        [sys.executable, "-m", "tidings", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(done.stdout)["admin"] == {
        "enabled": True,
        "password": "***",
        "session_ttl": 28800.0,
    }
    assert PASSWORD not in done.stdout + done.stderr


# -- over HTTP ----------------------------------------------------------------------


def test_off_by_default(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/admin", timeout=TIMEOUT).status_code == 404
    assert httpx.get(f"{server.url}/admin/tail?channel=a", timeout=TIMEOUT).status_code == 404
    resp = httpx.post(
        f"{server.url}/admin/login", json={"password": ""}, headers=same_origin(server)
    )
    assert resp.status_code == 404


def test_page_headers_forbid_framing_and_inline_script(admin_server: ServerProcess) -> None:
    resp = httpx.get(f"{admin_server.url}/admin", timeout=TIMEOUT)
    assert resp.status_code == 200
    assert resp.headers["x-frame-options"] == "DENY"
    policy = resp.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy
    assert "'unsafe-inline'" not in policy
    assert resp.headers["cache-control"] == "no-store"


def test_without_the_password_everything_is_refused(admin_server: ServerProcess) -> None:
    srv, channel = admin_server, unique_channel("room:nopw")
    assert login(srv, "wrong").status_code == 401
    for cookie in (None, "", "1.2.3", "99999999999.abc.def"):
        resp = admin_call(srv, "publish", {"channel": channel, "data": 1}, cookie=cookie)
        assert resp.status_code == 401, resp.text
        assert resp.json()["error"]["code"] == 101
    assert admin_call(srv, "info", {}, cookie=None).status_code == 401
    assert history_data(srv, channel) == []
    resp = admin_call(srv, "publish", {"channel": channel, "data": 1}, cookie=session_cookie(srv))
    assert resp.status_code == 200, resp.text  # the same request, logged in, is served
    assert history_data(srv, channel) == [1]


def test_malformed_logins_are_400_and_no_error(admin_server: ServerProcess) -> None:
    srv = admin_server
    bodies = [
        b"",
        b"not json",
        b"[]",
        b'{"password": 1}',
        b'{"password": "\xff"}',  # invalid UTF-8
        b'{"password": "\\ud800"}',  # a lone surrogate: refused or a wrong password
        b"[" * 100_000,
    ]
    for body in bodies:
        resp = httpx.post(
            f"{srv.url}/admin/login", content=body, headers=same_origin(srv), timeout=TIMEOUT
        )
        assert resp.status_code in (400, 401), (body[:40], resp.text)
        assert "set-cookie" not in resp.headers
    too_big = httpx.post(
        f"{srv.url}/admin/login",
        content=b'{"password": "' + b"x" * 2_000_000 + b'"}',
        headers=same_origin(srv),
        timeout=TIMEOUT,
    )
    assert too_big.status_code == 413
    assert " ERROR " not in srv.logs() and "Traceback" not in srv.logs()
    check_serving_secured(srv)


def test_login_cookie_is_httponly_strict_and_scoped(admin_server: ServerProcess) -> None:
    resp = login(admin_server)
    assert resp.status_code == 200
    cookie = resp.headers["set-cookie"]
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/admin", "Max-Age=28800"):
        assert attribute in cookie, cookie
    logout = httpx.post(
        f"{admin_server.url}/admin/logout", headers=same_origin(admin_server), timeout=TIMEOUT
    )
    assert "Max-Age=0" in logout.headers["set-cookie"]


def test_another_origin_cannot_act_with_the_cookie(admin_server: ServerProcess) -> None:
    srv, channel = admin_server, unique_channel("room:csrf")
    cookie = session_cookie(srv)
    hostile = [
        {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
        {"Origin": "http://evil.example"},  # an older browser: no Sec-Fetch-Site
        {"Origin": f"http://localhost:{srv.port}", "Sec-Fetch-Site": "same-site"},
        {"Origin": "null"},
        {},  # no Origin at all on a POST
    ]
    for headers in hostile:
        resp = admin_call(
            srv, "publish", {"channel": channel, "data": "x"}, cookie=cookie, headers=headers
        )
        assert resp.status_code == 403, (headers, resp.text)
        resp = admin_call(srv, "disconnect", {"user": "alice"}, cookie=cookie, headers=headers)
        assert resp.status_code == 403, (headers, resp.text)
        resp = httpx.post(
            f"{srv.url}/admin/login", json={"password": PASSWORD}, headers=headers, timeout=TIMEOUT
        )
        assert resp.status_code == 403 and "set-cookie" not in resp.headers, headers
    assert history_data(srv, channel) == []  # nothing was published
    assert "admin request refused" in srv.logs()
    assert " ERROR " not in srv.logs()


@contextlib.contextmanager
def tail(
    srv: ServerProcess, channel: str, **kw: Any
) -> Iterator[tuple[httpx.Response, Iterator[Any]]]:
    """``GET /admin/tail`` with httpx: the response, and its SSE events as they come
    (without heartbeats)."""

    def events(resp: httpx.Response) -> Iterator[Any]:
        parser = SSEParser()
        for chunk in resp.iter_raw():
            yield from (ev for ev in parser.feed(chunk) if ev.data is not None and not ev.is_ping)

    params = {"channel": channel, **kw.pop("params", {})}
    with (
        httpx.Client(timeout=httpx.Timeout(5.0, read=TIMEOUT)) as client,
        client.stream("GET", f"{srv.url}/admin/tail", params=params, **kw) as resp,
    ):
        yield resp, events(resp)


def test_the_tail_follows_any_channel_for_the_admin_only(admin_server: ServerProcess) -> None:
    srv, channel = admin_server, unique_channel("secret")  # default namespace: token needed
    with SSEClient(srv, [channel]) as anonymous:
        assert anonymous.response.status_code == 403  # the ordinary door is shut
    refused: list[dict[str, Any]] = [
        {},
        {"params": {"token": user_token("alice")}},
        {"headers": {"Authorization": f"Bearer {user_token('alice')}"}},
        {"cookies": {"tidings_token": user_token("alice")}},
        {"cookies": {"tidings_admin": "4102444800.forged.mac"}},
    ]
    for kw in refused:
        with tail(srv, channel, **kw) as (resp, _):
            assert resp.status_code == 401, (kw, resp.read())
    cookie = session_cookie(srv)
    hostile = {"cookies": {"tidings_admin": cookie}, "headers": {"Origin": "http://evil.example"}}
    with tail(srv, channel, **hostile) as (resp, _):
        assert resp.status_code == 403
    with tail(srv, channel, cookies={"tidings_admin": cookie}) as (resp, events):
        assert resp.status_code == 200
        assert next(events).event == "subscribed"
        publish(srv, channel, {"n": 1})
        assert pub_json(next(events))["data"] == {"n": 1}
    check_serving_secured(srv)


def test_a_session_ends_at_its_expiry_and_its_tail_with_it(server_factory: Any) -> None:
    config = CONFIG.replace("[admin]", "[admin]\nsession_ttl = 2") + (
        "\n[sse]\nheartbeat_interval = 0.2\n"
    )
    config = config.replace("[auth]", "[auth]\nexpiry_grace = 0")
    srv: ServerProcess = server_factory(config)
    channel = unique_channel("room:exp")
    for _ in range(5):
        # A session lasts 1-2 s (its expiry is a whole second): on a loaded
        # machine the login, the info call and the tail's opening outlasted it
        # (seen twice under load). A refusal is then no failure, and another
        # login is tried; a refusal before the cookie's expiry still fails.
        cookie = session_cookie(srv)
        expires = int(cookie.partition(".")[0])
        status = admin_call(srv, "info", {}, cookie=cookie).status_code
        if status == 401 and time.time() >= expires:
            continue
        assert status == 200
        with tail(srv, channel, cookies={"tidings_admin": cookie}) as (resp, events):
            if resp.status_code == 401 and time.time() >= expires:
                continue
            assert resp.status_code == 200
            assert next(events).event == "subscribed"
            ending = next(events, None)  # read until the server ends the stream
            assert ending is not None, "the stream ended without a disconnect event"
            assert ending.event == "disconnect" and ending.json["code"] == 3005, ending
            break
    else:
        pytest.fail("five sessions in a row expired before their tail was opened")
    assert admin_call(srv, "info", {}, cookie=cookie).status_code == 401
    with tail(srv, "room:exp", cookies={"tidings_admin": cookie}) as (resp, _):
        assert resp.status_code == 401


def test_one_login_serves_every_worker(
    server_factory: Any, redis_server: Any, tmp_path: Path
) -> None:
    """``--workers 2``: the cookie one worker issued is accepted by the other (the
    key comes from the password, not from a process), and the tail delivers."""
    srv: ServerProcess = server_factory(
        CONFIG + f'[broker]\ntype = "redis"\nredis_url = "{redis_server.url}"\n',
        args=["--workers", "2"],
        env={"TMPDIR": str(tmp_path)},
    )
    cookie = session_cookie(srv)
    nodes: set[str] = set()
    deadline = time.monotonic() + 15
    while len(nodes) < 2:  # fresh connections, which the kernel spreads over both
        assert time.monotonic() < deadline, nodes
        resp = admin_call(srv, "info", {}, cookie=cookie)
        assert resp.status_code == 200, resp.text
        nodes.add(resp.json()["result"]["nodes"][0]["uid"])
    channel = unique_channel("room:workers")
    with tail(srv, channel, cookies={"tidings_admin": cookie}) as (resp, events):
        assert resp.status_code == 200
        assert next(events).event == "subscribed"
        for n in range(4):  # each publish may reach either worker
            resp = admin_call(srv, "publish", {"channel": channel, "data": n}, cookie=cookie)
            assert resp.status_code == 200, resp.text
        assert [pub_json(next(events))["data"] for _ in range(4)] == [0, 1, 2, 3]


def check_serving_secured(srv: ServerProcess) -> None:
    """An ordinary subscriber (with its token) is still served."""
    channel = unique_channel("alive")
    with SSEClient(srv, [channel], extra_params=[("token", user_token("zed"))]) as sse:
        sse.subscribed()
        publish(srv, channel, {"ok": True})
        assert pub_json(sse.publications(1)[0])["data"] == {"ok": True}


def test_password_guessing_is_limited(server_factory: Any) -> None:
    srv: ServerProcess = server_factory(CONFIG)
    statuses = [login(srv, f"guess {n}").status_code for n in range(10)]
    assert statuses == [401] * 10
    refused = login(srv, "guess 11")
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 61
    assert login(srv).status_code == 429  # the right password too, or guessing would go on
    # Another address is not held (127.0.0.2 reaches a 127.0.0.1 listener on Linux).
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(transport=transport, timeout=TIMEOUT) as elsewhere:
        resp = elsewhere.post(
            f"{srv.url}/admin/login", json={"password": PASSWORD}, headers=same_origin(srv)
        )
        assert resp.status_code == 200, resp.text
    assert " ERROR " not in srv.logs() and "Traceback" not in srv.logs()
    check_serving_secured(srv)


# -- the page in chromium ------------------------------------------------------------


class UserClient:
    """centrifuge-python connected as a user, on an event loop in a thread of its own
    (the browser is driven synchronously in the test's thread)."""

    def __init__(self, srv: ServerProcess, user: str, channel: str | None = None) -> None:
        self.disconnects: queue.Queue[int] = queue.Queue()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client: Client = self.run(self._connect(srv, user, channel))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(2 * TIMEOUT)

    async def _connect(self, srv: ServerProcess, user: str, channel: str | None) -> Client:
        disconnects = self.disconnects

        class Events(ClientEventHandler):
            async def on_disconnected(self, ctx: DisconnectedContext) -> None:
                disconnects.put(ctx.code)

        client = Client(
            srv.ws_url + "/connection/websocket",
            token=user_token(user),
            events=Events(),
            proxy=None,
        )
        await client.connect()
        await client.ready(TIMEOUT)
        if channel is not None:
            sub = client.new_subscription(channel)
            await sub.subscribe()
            await sub.ready(TIMEOUT)
        return client

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self.client.disconnect())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with launch_browser(tmp_path_factory.mktemp("chromium")) as context:
        yield context


@pytest.fixture
def page(browser: Any, admin_server: ServerProcess) -> Iterator[Any]:
    """The admin page, logged in."""
    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(f"{admin_server.url}/admin?refresh=300")
    page.wait_for_selector("#login:not([hidden]), #dashboard:not([hidden])")
    if page.is_visible("#login"):
        page.fill("#password", PASSWORD)
        page.click("#login-form button")
    page.wait_for_selector("#dashboard:not([hidden])")
    yield page
    page.close()


WAIT_TEXT = """([id, how, text]) => {
  const shown = document.getElementById(id).textContent;
  return how === "starts" ? shown.startsWith(text)
       : how === "ends" ? shown.endsWith(text) : shown.includes(text);
}"""


def wait_text(page: Any, element_id: str, how: str, text: str) -> None:
    """Wait until the element's text starts with, ends with or holds ``text``."""
    page.wait_for_function(WAIT_TEXT, arg=[element_id, how, text])


WAIT_COUNT = """([channel, n]) => {
  const cell = document.querySelector(
    `#channels tr[data-channel="${channel}"] td[data-field="num_clients"]`);
  return cell !== null && cell.textContent === String(n);
}"""


def wait_count(page: Any, channel: str, n: int) -> None:
    """Wait until the channels table shows ``n`` subscribers of ``channel``."""
    page.wait_for_function(WAIT_COUNT, arg=[channel, n])


def channel_count(page: Any, channel: str) -> int | None:
    cell = page.query_selector(
        f'#channels tr[data-channel="{channel}"] td[data-field="num_clients"]'
    )
    return None if cell is None else int(cell.inner_text())


@pytest.mark.browser
def test_page_loads_only_after_login(browser: Any, admin_server: ServerProcess) -> None:
    browser.clear_cookies()
    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)
    try:
        page.goto(f"{admin_server.url}/admin")
        page.wait_for_selector("#login:not([hidden])")
        assert page.is_hidden("#dashboard")
        page.fill("#password", "not the password")
        page.click("#login-form button")
        wait_text(page, "login-error", "has", "Wrong")
        assert page.is_hidden("#dashboard")
        page.fill("#password", PASSWORD)
        page.click("#login-form button")
        page.wait_for_selector("#nodes tbody tr")
        cookie = next(c for c in browser.cookies() if c["name"] == "tidings_admin")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert page.evaluate("() => document.cookie") == ""  # no script can read it
    finally:
        page.close()


SHOWN_CLIENTS = """([transport, least, most]) => {
  const span = document.querySelector(`#nodes span[data-transport="${transport}"]`);
  const n = span === null ? NaN : Number(span.textContent.split(" ")[1]);
  return n >= least && n <= most;
}"""


def wait_clients(page: Any, transport: str, least: int = 0, most: int = 10**9) -> int:
    """Wait until the node's row shows between ``least`` and ``most`` clients of
    ``transport``; the number shown."""
    page.wait_for_function(SHOWN_CLIENTS, arg=[transport, least, most])
    text = page.inner_text(f'#nodes span[data-transport="{transport}"]')
    return int(text.split()[1])


@pytest.mark.browser
def test_live_counts_change_as_clients_come_and_go(page: Any, admin_server: ServerProcess) -> None:
    srv, channel = admin_server, unique_channel("room:count")
    for transport in ("websocket", "emulation", "sse", "longpoll"):
        wait_clients(page, transport)
    assert channel_count(page, channel) is None
    token = [("token", user_token("alice"))]
    with SSEClient(srv, [channel], extra_params=token) as one:
        one.subscribed()
        wait_count(page, channel, 1)
        with SSEClient(srv, [channel], extra_params=token) as two:
            two.subscribed()
            wait_count(page, channel, 2)
            # The page's own tail is not counted: these two are at least 2 SSE clients.
            while_open = wait_clients(page, "sse", least=2)
            total = int(page.inner_text('#nodes td[data-field="num_clients"]'))
            assert total >= while_open
        wait_count(page, channel, 1)
    page.wait_for_selector(f'#channels tr[data-channel="{channel}"]', state="detached")
    wait_clients(page, "sse", most=while_open - 2)
    # The search narrows the list to the channels that match.
    with SSEClient(srv, [channel], extra_params=token) as again:
        again.subscribed()
        page.fill("#channel-search", channel[-6:])
        page.wait_for_selector(f'#channels tr[data-channel="{channel}"]')
        page.fill("#channel-search", "no-such-channel-anywhere")
        page.wait_for_selector(f'#channels tr[data-channel="{channel}"]', state="detached")


@pytest.mark.browser
def test_tails_a_channel_live(page: Any, admin_server: ServerProcess) -> None:
    srv, channel = admin_server, unique_channel("locked")  # needs a token at /sse
    page.fill("#channel", channel)
    page.click("#tail-start")
    wait_text(page, "tail-state", "ends", "tailing")
    hostile = {"html": '<img src=x onerror="window.pwned=1">'}
    for n in range(3):
        publish(srv, channel, {"n": n})
    publish(srv, channel, hostile)
    page.wait_for_selector("#tail li:nth-child(4)")
    rows = page.eval_on_selector_all("#tail li", "(rows) => rows.map((r) => r.textContent)")
    assert rows[:3] == [f'#{n + 1}{{"n":{n}}}' for n in range(3)]
    assert "<img" in rows[3]  # shown as text
    assert page.query_selector("#tail img") is None
    assert page.evaluate("() => window.pwned") is None
    page.click("#tail-stop")


@pytest.mark.browser
def test_the_tail_keeps_the_last_200_rows(page: Any, admin_server: ServerProcess) -> None:
    """A busy channel cannot grow the page: the oldest rows go first."""
    srv, channel = admin_server, unique_channel("room:busy")
    page.fill("#channel", channel)
    page.click("#tail-start")
    wait_text(page, "tail-state", "ends", "tailing")
    commands = [{"publish": {"channel": channel, "data": n}} for n in range(250)]
    replies = api(srv, "batch", {"commands": commands}).json()["replies"]
    assert all("publish" in reply for reply in replies), replies[:3]
    page.wait_for_selector('#tail li[data-offset="250"]')
    offsets = page.eval_on_selector_all("#tail li", "(rows) => rows.map((r) => r.dataset.offset)")
    assert offsets == [str(n) for n in range(51, 251)]
    page.click("#tail-stop")


@pytest.mark.browser
def test_publishes_from_the_page(page: Any, admin_server: ServerProcess) -> None:
    srv, channel = admin_server, unique_channel("room:pub")
    with SSEClient(srv, [channel], extra_params=[("token", user_token("bob"))]) as sse:
        sse.subscribed()
        page.fill("#channel", channel)
        page.fill("#publish-data", '{"from": "the admin page", "n": 7}')
        page.click("#publish")
        wait_text(page, "publish-result", "starts", "published")
        got = pub_json(sse.publications(1)[0])
        assert (got["channel"], got["data"]) == (channel, {"from": "the admin page", "n": 7})
    page.fill("#publish-data", "{not json")
    page.click("#publish")
    wait_text(page, "publish-result", "starts", "not JSON")
    assert history_data(srv, channel) == [{"from": "the admin page", "n": 7}]


@pytest.mark.browser
def test_history_and_presence_shown(page: Any, admin_server: ServerProcess) -> None:
    srv, channel = admin_server, unique_channel("room:hp")
    carol = UserClient(srv, "carol", channel)
    try:
        for n in range(3):
            publish(srv, channel, {"n": n})
        page.fill("#channel", channel)
        page.click("#history-load")
        page.wait_for_selector("#history li:nth-child(3)")
        rows = page.eval_on_selector_all("#history li", "(rows) => rows.map((r) => r.textContent)")
        assert rows == ['#3{"n":2}', '#2{"n":1}', '#1{"n":0}']  # newest first
        page.click("#presence-load")
        page.wait_for_selector('#presence tr[data-user="carol"]')
        shown = page.get_attribute('#presence tr[data-user="carol"]', "data-client")
        assert shown == carol.client.client_id
        # Presence off in the default namespace: the API's error is shown.
        page.fill("#channel", unique_channel("nopresence"))
        page.click("#presence-load")
        wait_text(page, "presence-result", "has", "code 108")
    finally:
        carol.close()


@pytest.mark.browser
def test_disconnects_a_user(page: Any, admin_server: ServerProcess) -> None:
    srv = admin_server
    dave, erin = UserClient(srv, "dave"), UserClient(srv, "erin")
    try:
        page.fill("#disconnect-user", "dave")
        page.click("#disconnect")
        wait_text(page, "disconnect-result", "starts", "disconnected")
        assert dave.disconnects.get(timeout=TIMEOUT) == 3503  # force disconnect, no reconnect
        assert erin.disconnects.empty()  # another user stays
    finally:
        dave.close()
        erin.close()


@pytest.mark.browser
def test_screenshot(page: Any, admin_server: ServerProcess, tmp_path: Path) -> None:
    """A populated page, saved (in docs/ with TIDINGS_DOCS_SCREENSHOTS=1)."""
    srv, channel = admin_server, "room:lobby"
    frank = UserClient(srv, "frank", channel)
    token = [("token", user_token("grace"))]
    try:
        with (
            SSEClient(srv, [channel], extra_params=token) as sse,
            SSEClient(srv, ["room:support"], extra_params=token) as other,
        ):
            sse.subscribed()
            other.subscribed()
            page.set_viewport_size({"width": 1280, "height": 980})
            page.fill("#channel", channel)
            page.click("#tail-start")
            wait_text(page, "tail-state", "ends", "tailing")
            for text in ("hello", "is anyone here?", "the deploy is done"):
                publish(srv, channel, {"user": "frank", "text": text})
            page.wait_for_selector("#tail li:nth-child(3)")
            page.click("#history-load")
            page.wait_for_selector("#history li")
            page.click("#presence-load")
            page.wait_for_selector('#presence tr[data-user="frank"]')
            page.wait_for_selector('#channels tr[data-channel="room:support"]')
            path = tmp_path / "admin.png"
            page.screenshot(path=str(path), full_page=True)
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            if os.environ.get("TIDINGS_DOCS_SCREENSHOTS") == "1":
                docs = Path(__file__).resolve().parent.parent / "docs" / "admin.png"
                docs.write_bytes(path.read_bytes())
    finally:
        frank.close()
