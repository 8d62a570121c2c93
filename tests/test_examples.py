"""The examples (examples/), started as their READMEs say and driven by clients we did not write.

Each example runs as a user runs it, in subprocesses from the repository's
root: ``uvicorn examples.fastapi_chat.app:app``, ``uvicorn
examples.django.asgi:application``, ``uvicorn examples.standalone.backend:app``
next to ``tidings serve --config examples/standalone/tidings.toml``. The
clients are centrifuge-python (WebSocket, with the login cookie in its
upgrade headers), httpx (the apps' REST endpoints, SSE) and the apps' own
login flows. Every process's log must end without a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import re
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from centrifuge import (
    Client,
    DisconnectedContext,
    PublicationContext,
    ReplyError,
    UnsubscribedContext,
)

from browser_support import launch_browser
from conftest import ServerProcess, _die_with_parent, _kill, clean_env, free_port
from helpers import SSEClient, pub_json, unique_channel
from test_websocket_python import ClientEvents, Events

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0
START_TIMEOUT = 30.0
CHAT_SECRET = "a test secret, long enough"
#: Messages one load_older answer holds at most (examples/fastapi_chat/app.py).
PAGE = 50


# -- running an example ---------------------------------------------------------


@dataclass
class Running:
    """An example's process: where it answers, its log."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # it answered, if not 200
    except OSError:
        return False


@contextlib.contextmanager
def running(argv: list[str], port: int, log_path: Path, env: dict[str, str]) -> Iterator[Running]:
    """``argv`` started from the repository's root, until ``http://127.0.0.1:port/`` answers;
    killed on exit, after which its log must hold no traceback."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=clean_env(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
    example = Running(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(example.url + "/"):
            assert proc.poll() is None, f"{argv} exited:\n{example.logs()}"
            assert time.monotonic() < deadline, f"{argv} did not answer:\n{example.logs()}"
            time.sleep(0.1)
        yield example
    finally:
        _kill(proc)
    assert "Traceback" not in example.logs(), example.logs()[-8000:]


def uvicorn(app: str, port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]


def sdk_client(ws_url: str, cookie: str | None, events: ClientEvents | None = None) -> Client:
    """centrifuge-python with ``cookie`` in its WebSocket upgrade, as a browser sends it."""
    return Client(
        ws_url + "/connection/websocket",
        events=events,
        headers={"Cookie": cookie} if cookie else None,
        proxy=None,
        min_reconnect_delay=0.1,
        max_reconnect_delay=0.5,
    )


async def next_data(events: Events) -> Any:
    context: PublicationContext = await asyncio.wait_for(events.publications.get(), TIMEOUT)
    return context.pub.data


async def refused_code(ws_url: str, cookie: str | None) -> int:
    """The code a client connecting with ``cookie`` is disconnected with (it must be)."""
    events = ClientEvents()
    client = sdk_client(ws_url, cookie, events)
    await client.connect()
    try:
        outcomes = [asyncio.ensure_future(events.disconnected.get())]
        outcomes.append(asyncio.ensure_future(events.connected.get()))
        done, pending = await asyncio.wait(
            outcomes, timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        for waiting in pending:
            waiting.cancel()
        assert done, f"neither connected nor refused within {TIMEOUT}s"
        assert outcomes[0] in done, f"connected with cookie {cookie!r}: {outcomes[1].result()}"
        disconnected: DisconnectedContext = outcomes[0].result()
    finally:
        await client.disconnect()
    return int(disconnected.code)


class SubscriptionEvents(Events):
    """Publications, and why a subscription ended."""

    def __init__(self) -> None:
        super().__init__()
        self.unsubscribed: asyncio.Queue[UnsubscribedContext] = asyncio.Queue()

    async def on_unsubscribed(self, ctx: UnsubscribedContext) -> None:
        await self.unsubscribed.put(ctx)


# -- the FastAPI chat ---------------------------------------------------------------


@dataclass
class Chat:
    app: Running
    #: tidings, served by the app's lifespan on a port of its own.
    tidings_url: str

    @property
    def ws_url(self) -> str:
        return self.tidings_url.replace("http://", "ws://")

    def login(self, name: str) -> str:
        """``chat_session=<signed value>`` for ``name``, from the app's login endpoint."""
        response = httpx.post(f"{self.app.url}/login", json={"name": name}, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        return f"chat_session={response.cookies['chat_session']}"


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chat]:
    tmp = tmp_path_factory.mktemp("chat")
    port, tidings_port = free_port(), free_port()
    env = {
        "CHAT_DB": str(tmp / "chat.sqlite3"),
        "CHAT_TIDINGS_PORT": str(tidings_port),
        "CHAT_SECRET": CHAT_SECRET,
        "CHAT_ORIGINS": f"http://127.0.0.1:{port}",
    }
    argv = uvicorn("examples.fastapi_chat.app:app", port)
    with running(argv, port, tmp / "chat.log", env) as app:
        yield Chat(app, f"http://127.0.0.1:{tidings_port}")


def test_chat_publication_is_checked_stored_and_replaced(chat: Chat) -> None:
    """A message goes through on_publish: stripped, stored in SQLite, published as
    ``{id, user, text, time}``; what the hook refuses reaches nobody and is not stored."""
    channel = unique_channel("chat:")

    async def main() -> None:
        alice = sdk_client(chat.ws_url, chat.login("alice"))
        bob = sdk_client(chat.ws_url, chat.login("bob"))
        bob_events = Events()
        bob_sub = bob.new_subscription(channel, bob_events)
        alice_sub = alice.new_subscription(channel, Events())
        for client, sub in ((alice, alice_sub), (bob, bob_sub)):
            await client.connect()
            await sub.subscribe()
            await sub.ready(TIMEOUT)

        await alice_sub.publish({"text": "  hello bob  "})
        first = await next_data(bob_events)
        assert first == {
            "id": first["id"],
            "user": "alice",
            "text": "hello bob",
            "time": first["time"],
        }
        assert isinstance(first["id"], int) and abs(first["time"] - time.time()) < 60

        for invalid in ({"text": ""}, {"text": "   "}, {"text": "x" * 501}, {"nope": 1}, "hi"):
            with pytest.raises(ReplyError) as refused:
                await alice_sub.publish(invalid)
            assert refused.value.code == 1400, invalid
        with pytest.raises(ReplyError) as refused:
            await alice.publish(unique_channel("elsewhere"), {"text": "hi"})
        assert refused.value.code == 103

        await alice_sub.publish({"text": "x" * 500})  # the longest allowed
        assert (await next_data(bob_events))["text"] == "x" * 500  # next, nothing between

        presence = await bob_sub.presence()
        assert sorted(info.user for info in presence.clients.values()) == ["alice", "bob"]
        await alice.disconnect()
        await bob.disconnect()

    asyncio.run(main())
    stored = httpx.get(
        f"{chat.app.url}/messages",
        params={"channel": channel},
        headers={"Cookie": chat.login("carol")},
        timeout=TIMEOUT,
    ).json()["messages"]
    assert [(m["user"], m["text"]) for m in stored] == [
        ("alice", "hello bob"),
        ("alice", "x" * 500),
    ]


def test_chat_load_older_pages_back_through_the_store(chat: Chat) -> None:
    channel = unique_channel("chat:")

    async def main() -> None:
        client = sdk_client(chat.ws_url, chat.login("dora"))
        events = Events()
        sub = client.new_subscription(channel, events)
        await client.connect()
        await sub.subscribe()
        await sub.ready(TIMEOUT)
        sent = []
        for text in ("one", "two", "three"):
            await sub.publish({"text": text})
            sent.append(await next_data(events))

        older = await client.rpc("load_older", {"channel": channel, "before": sent[2]["id"]})
        assert older.data == {"messages": sent[:2]}
        everything = await client.rpc("load_older", {"channel": channel})
        assert everything.data == {"messages": sent}
        none = await client.rpc("load_older", {"channel": channel, "before": sent[0]["id"]})
        assert none.data == {"messages": []}
        for n in range(PAGE):  # more than one page: an answer holds PAGE at most
            await sub.publish({"text": f"more {n}"})
        latest = [await next_data(events) for _ in range(PAGE)]
        page = await client.rpc("load_older", {"channel": channel})
        assert page.data == {"messages": latest}
        before_page = {"channel": channel, "before": latest[0]["id"]}
        assert (await client.rpc("load_older", before_page)).data == {"messages": sent}

        for bad in ({"channel": "news"}, {"channel": channel, "before": "x"}, None):
            with pytest.raises(ReplyError) as refused:
                await client.rpc("load_older", bad)
            assert refused.value.code == 107, bad
        await client.disconnect()

    asyncio.run(main())


def test_chat_announce_reaches_an_sse_subscriber(chat: Chat) -> None:
    """``POST /announce`` publishes in-process (``await rt.publish``); an SSE stream
    opened with the session cookie receives it."""
    channel = unique_channel("chat:")
    cookie = chat.login("erin")
    tidings = types.SimpleNamespace(url=chat.tidings_url)
    with SSEClient(tidings, [channel], extra_headers={"Cookie": cookie}) as sse:
        sse.subscribed()
        response = httpx.post(
            f"{chat.app.url}/announce",
            json={"channel": channel, "text": " doors open at nine "},
            headers={"Cookie": cookie},
            timeout=TIMEOUT,
        )
        assert response.status_code == 200, response.text
        announced = response.json()
        (event,) = sse.publications(1)
        publication = pub_json(event)
        assert publication["data"] == announced["message"]
        assert publication["data"]["text"] == "doors open at nine"
        assert publication["offset"] == announced["offset"]

    def announce(text: str, cookie: str | None) -> int:
        headers = {"Cookie": cookie} if cookie else {}
        body = {"channel": channel, "text": text}
        url = f"{chat.app.url}/announce"
        return httpx.post(url, json=body, headers=headers, timeout=TIMEOUT).status_code

    assert announce("hi", None) == 401
    assert announce("   ", cookie) == 422


def test_chat_refuses_clients_without_a_valid_session(chat: Chat) -> None:
    """No cookie, a forged one, or an expired one: refused with 101 on WebSocket and
    401 on SSE; a logged-in client is served meanwhile."""
    good = chat.login("frank")
    value = good.removeprefix("chat_session=")
    name, expires, signature = value.split(".")
    forged = f"chat_session=Ym9i.{expires}.{signature}"  # "bob", frank's signature
    payload = f"{name}.{int(time.time()) - 1}"  # frank's, signed with the key, expired
    mac = hmac.new(CHAT_SECRET.encode(), payload.encode(), hashlib.sha256).hexdigest()
    expired = f"chat_session={payload}.{mac}"

    async def main() -> None:
        for cookie in (None, forged, expired, "chat_session=garbage", good + "0"):
            assert await refused_code(chat.ws_url, cookie) == 101, cookie
        client = sdk_client(chat.ws_url, good)
        await client.connect()
        await client.ready(TIMEOUT)
        await client.disconnect()

    asyncio.run(main())
    for cookie in ({}, {"Cookie": forged}):
        response = httpx.get(
            f"{chat.tidings_url}/sse", params={"channel": "chat:lobby"}, headers=cookie
        )
        assert response.status_code == 401
        assert response.json()["error"]["code"] == 101


def test_chat_login_refuses_bad_names(chat: Chat) -> None:
    for name in ("", "x" * 33, "<b>", "a b", "é", None, 7):
        response = httpx.post(f"{chat.app.url}/login", json={"name": name}, timeout=TIMEOUT)
        assert response.status_code == 422, (name, response.text)
        assert "set-cookie" not in response.headers
    garbage = httpx.post(f"{chat.app.url}/login", content=b"{not json", timeout=TIMEOUT)
    assert garbage.status_code == 422


def test_chat_page_and_client_script(chat: Chat) -> None:
    """The page imports /tidings.js from the app, which serves the package's file."""
    page = httpx.get(chat.app.url + "/", timeout=TIMEOUT)
    assert page.status_code == 200 and 'from "/tidings.js"' in page.text
    script = httpx.get(chat.app.url + "/tidings.js", timeout=TIMEOUT)
    assert script.headers["content-type"].startswith("text/javascript")
    assert script.content == (ROOT / "src/tidings/static/tidings.js").read_bytes()
    me = httpx.get(chat.app.url + "/me", headers={"Cookie": chat.login("gus")}, timeout=TIMEOUT)
    assert me.json() == {"user": "gus", "tidings_url": chat.tidings_url}


@pytest.mark.browser
def test_chat_page_in_a_browser(chat: Chat, tmp_path: Path) -> None:
    """The page as a user meets it, in chromium: log in, say something (over the
    WebSocket, which carries the session cookie to tidings' port), see it come
    back as the store has it, see a refusal, see an announcement from the backend."""
    with launch_browser(tmp_path) as browser:
        page = browser.new_page()
        page.goto(chat.app.url + "/")
        page.fill("#name", "ivy")
        page.click("#login button")
        page.wait_for_selector("#chat:not([hidden])", timeout=TIMEOUT * 1000)
        page.wait_for_function(
            "document.getElementById('transport').textContent === 'via websocket'",
            timeout=TIMEOUT * 1000,
        )
        page.fill("#text", "  from the page  ")
        page.click("#say button")
        line = page.locator("#log p", has_text="from the page").last
        line.wait_for(timeout=TIMEOUT * 1000)
        assert line.inner_text().endswith("ivy: from the page")  # stripped by on_publish

        page.fill("#text", " ")
        page.click("#say button")
        page.wait_for_function(
            "document.getElementById('error').textContent !== ''", timeout=TIMEOUT * 1000
        )
        assert "text is empty" in page.inner_text("#error")

        response = httpx.post(
            f"{chat.app.url}/announce",
            json={"text": "from the backend"},
            headers={"Cookie": chat.login("jack")},
            timeout=TIMEOUT,
        )
        assert response.status_code == 200, response.text
        page.locator("#log p", has_text="jack: from the backend").wait_for(timeout=TIMEOUT * 1000)
        page.wait_for_function(
            "document.getElementById('online').textContent === 'ivy'", timeout=TIMEOUT * 1000
        )


# -- the Django board ---------------------------------------------------------------


def csrf_token(page: str) -> str:
    found = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def test_django_login_then_a_view_publishes(tmp_path: Path) -> None:
    """Log in through Django's view (CSRF and all), connect to tidings with Django's
    session cookie, and receive what the notify view publishes in-process."""
    port, tidings_port = free_port(), free_port()
    env = {"BOARD_TIDINGS_PORT": str(tidings_port), "DJANGO_SECRET_KEY": "a test key"}
    argv = uvicorn("examples.django.asgi:application", port)
    ws_url = f"ws://127.0.0.1:{tidings_port}"
    with (
        running(argv, port, tmp_path / "board.log", env) as board,
        httpx.Client(base_url=board.url, timeout=TIMEOUT) as browser,
    ):
        token = csrf_token(browser.get("/").text)
        denied = browser.post("/notify", data={"text": "hi", "csrfmiddlewaretoken": token})
        assert denied.status_code == 401
        logged_in = browser.post("/login", data={"name": "hana", "csrfmiddlewaretoken": token})
        assert logged_in.status_code == 302, logged_in.text
        session = f"sessionid={browser.cookies['sessionid']}"

        async def main() -> None:
            assert await refused_code(ws_url, None) == 101
            assert await refused_code(ws_url, "sessionid=forged") == 101
            client = sdk_client(ws_url, session)
            events = Events()
            sub = client.new_subscription("board:lobby", events)
            await client.connect()
            await sub.subscribe()
            await sub.ready(TIMEOUT)
            presence = (await sub.presence()).clients[client.client_id]
            assert (presence.user, presence.conn_info) == ("hana", {"name": "hana"})

            def notify() -> httpx.Response:
                token = csrf_token(browser.get("/").text)
                return browser.post(
                    "/notify",
                    data={"text": "  lunch is served ", "csrfmiddlewaretoken": token},
                    headers={"Accept": "application/json"},
                )

            response = await asyncio.to_thread(notify)
            assert response.status_code == 200, response.text
            context = await asyncio.wait_for(events.publications.get(), TIMEOUT)
            assert context.pub.offset == response.json()["offset"]
            data = context.pub.data
            assert data == {"user": "hana", "text": "lunch is served", "time": data["time"]}
            with pytest.raises(ReplyError) as refused:  # the board's namespace: server only
                await sub.publish({"text": "from a client"})
            assert refused.value.code == 103
            await client.disconnect()

        asyncio.run(main())


# -- tidings serve with the proxy and webhooks ---------------------------------------------


def test_standalone_proxy_decides_and_webhooks_arrive_signed(
    tmp_path: Path, server_factory: Callable[..., ServerProcess]
) -> None:
    """``tidings serve --config examples/standalone/tidings.toml`` in front of the
    backend: the backend's session admits the client, its publish answer replaces
    the data, its RPC answers; the events come back as webhooks whose signature the
    backend checked (a forged batch is refused and not kept)."""
    backend_port = free_port()
    config = (ROOT / "examples/standalone/tidings.toml").read_text()
    assert "127.0.0.1:9000" in config
    config = config.replace("127.0.0.1:9000", f"127.0.0.1:{backend_port}")
    argv = uvicorn("examples.standalone.backend:app", backend_port)
    env = {"MAX_SESSIONS": "2"}
    with running(argv, backend_port, tmp_path / "backend.log", env) as backend:
        tidings = server_factory(config=config)
        for bad in (b"{not json", b"[]", b'{"name": "<b>"}'):
            refused_login = httpx.post(f"{backend.url}/login", content=bad, timeout=TIMEOUT)
            assert refused_login.status_code == 400, bad
        cookies = []
        for name in ("early", "ivan", "ivan"):  # one more than the backend keeps
            login = httpx.post(f"{backend.url}/login", json={"name": name}, timeout=TIMEOUT)
            cookies.append(f"session={login.cookies['session']}")
        forgotten, session = cookies[0], cookies[-1]
        channel = unique_channel("chat:")

        async def main() -> None:
            assert await refused_code(tidings.ws_url, None) == 101
            assert await refused_code(tidings.ws_url, forgotten) == 101
            client = sdk_client(tidings.ws_url, session)
            events = SubscriptionEvents()
            sub = client.new_subscription(channel, events)
            await client.connect()
            await sub.subscribe()
            await sub.ready(TIMEOUT)
            await sub.publish({"text": " through the proxy "})
            data = await next_data(events)
            assert data == {"user": "ivan", "text": "through the proxy", "time": data["time"]}
            with pytest.raises(ReplyError) as refused:
                await sub.publish({"text": ""})
            assert refused.value.code == 1400
            assert (await client.rpc("whoami", None)).data == {"user": "ivan"}
            elsewhere = SubscriptionEvents()
            denied = client.new_subscription(unique_channel("news"), elsewhere)
            await denied.subscribe()
            ended = await asyncio.wait_for(elsewhere.unsubscribed.get(), TIMEOUT)
            assert ended.code == 103
            await client.disconnect()

        asyncio.run(main())

        forged = b'{"time_ms": 0, "events": [{"name": "forged", "id": "x-1", "time_ms": 0}]}'
        refused = httpx.post(
            f"{backend.url}/webhooks",
            content=forged,
            headers={"X-Tidings-Signature": "00" * 32},
            timeout=TIMEOUT,
        )
        assert refused.status_code == 401

        wanted = {"channel_occupied", "member_added", "publication", "client_disconnected"}
        deadline = time.monotonic() + TIMEOUT
        received: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            received = httpx.get(f"{backend.url}/webhooks", timeout=TIMEOUT).json()
            if wanted <= {event["name"] for event in received}:
                break
            time.sleep(0.1)
        by_name = {event["name"]: event for event in received}
        assert wanted <= by_name.keys(), received
        assert "forged" not in by_name
        assert by_name["channel_occupied"]["channel"] == channel
        assert (by_name["member_added"]["channel"], by_name["member_added"]["user_id"]) == (
            channel,
            "ivan",
        )
        assert by_name["publication"]["data"]["text"] == "through the proxy"
        assert by_name["client_disconnected"]["user_id"] == "ivan"
    assert "Traceback" not in tidings.logs(), tidings.logs()[-8000:]
