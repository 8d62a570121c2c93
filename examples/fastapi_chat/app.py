"""A chat: FastAPI for the pages and the REST endpoints, tidings for the realtime part.

Run it from the repository's root (README.md next to this file)::

    uvicorn examples.fastapi_chat.app:app --port 8000

and open http://127.0.0.1:8000. What it shows:

- **who is it**: ``POST /login`` sets a session cookie signed with HMAC
  (stdlib ``hmac``: no extra dependency); tidings' ``on_connect`` reads the
  same cookie from the WebSocket upgrade (or the SSE request) and names the
  user, or refuses the client (error 101, HTTP 401 on SSE);
- **what may be said**: ``on_publish`` checks a client's message (non-empty
  text, at most 500 characters once stripped), stores it in SQLite and
  publishes ``{id, user, text, time}`` instead of what the client sent;
- **what came before**: the ``load_older`` RPC pages back through the store
  (``client.rpc("load_older", {"channel": ..., "before": id})``), and so does
  ``GET /messages`` for the page (tidings.js has no RPC call);
- **the backend speaks too**: ``POST /announce`` publishes in-process with
  ``await rt.publish(...)``, no HTTP round trip to tidings;
- **who is here**: the ``chat`` namespace keeps presence (and history, so a
  client that drops off resumes where it was).

tidings runs inside this process, in uvicorn's event loop, started and
stopped by the app's lifespan (``async with rt.serve()``), on a port of its
own (8001 by default). Not mounted with ``rt.asgi()``: its own listener is
tidings' fast path, with every bound of the native server (docs/asgi.md);
the price is a second origin, so the tidings server lists this app's origin
in ``allowed_origins`` and the page uses WebSocket only (a browser sends the
cookie with a WebSocket upgrade to another port of the same host, but not
with a cross-origin ``EventSource``).

Environment: ``CHAT_SECRET`` (the cookie key: set it!), ``CHAT_DB`` (a file,
``chat.sqlite3`` by default, or ``:memory:``), ``CHAT_TIDINGS_PORT`` (8001),
``CHAT_ORIGINS`` (comma-separated origins of this app, for the browser).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import importlib.resources
import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import Cookie, FastAPI, HTTPException, Query, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

# pydantic (FastAPI's response models) needs this TypedDict on Python < 3.12.
from typing_extensions import TypedDict

from tidings import (
    ConnectCall,
    ConnectReply,
    ErrorCode,
    PublishCall,
    PublishReply,
    Refuse,
    RPCCall,
    Tidings,
)

log = logging.getLogger("chat")

HERE = Path(__file__).resolve().parent
#: The key signing session cookies. The default is for trying the example only.
SECRET = os.environ.get("CHAT_SECRET", "change-me: a long random string").encode()
DB_PATH = os.environ.get("CHAT_DB", "chat.sqlite3")
TIDINGS_PORT = int(os.environ.get("CHAT_TIDINGS_PORT", "8001"))
ORIGINS = os.environ.get("CHAT_ORIGINS", "http://127.0.0.1:8000,http://localhost:8000")

COOKIE = "chat_session"
#: Seconds a login lasts.
SESSION_AGE = 7 * 24 * 3600
MAX_TEXT = 500
#: Messages one ``load_older`` call returns at most.
PAGE = 50
NAMESPACE = "chat"


# -- sessions: a signed cookie -----------------------------------------------------


def _signature(payload: str) -> str:
    return hmac.new(SECRET, payload.encode(), hashlib.sha256).hexdigest()


def sign_session(user: str, now: float | None = None) -> str:
    """``<user, base64url>.<expiry>.<HMAC-SHA256 of both>``: the cookie's value.

    The expiry is inside the signed part, so a stolen old cookie stops working
    even if a browser kept it past ``Max-Age``.
    """
    expires = int((time.time() if now is None else now) + SESSION_AGE)
    name = base64.urlsafe_b64encode(user.encode()).decode().rstrip("=")
    payload = f"{name}.{expires}"
    return f"{payload}.{_signature(payload)}"


def session_user(cookie: str | None) -> str | None:
    """The user a cookie names, or None: absent, forged, malformed or expired."""
    if not cookie or cookie.count(".") != 2:
        return None
    payload, _, signature = cookie.rpartition(".")
    if not hmac.compare_digest(_signature(payload), signature):
        return None
    name, _, expires = payload.partition(".")
    if not expires.isdigit() or int(expires) < time.time():
        return None
    return base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()


# -- the messages: SQLite ------------------------------------------------------


class Message(TypedDict):
    """A message as stored, published and returned by ``load_older``."""

    id: int
    user: str
    text: str
    time: float


class MessageStore:
    """The chat's messages in SQLite.

    ``sqlite3`` blocks, and a blocked event loop would stall every tidings
    client of this process, so the coroutines run each query in a thread
    (``asyncio.to_thread``). One connection, shared under a lock: that is all
    SQLite lets writers do anyway, and it makes ``:memory:`` work (each
    connection to ``:memory:`` is a database of its own).
    """

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS messages ("
                " id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL,"
                " user TEXT NOT NULL, text TEXT NOT NULL, time REAL NOT NULL)"
            )

    def _add(self, channel: str, user: str, text: str) -> Message:
        now = round(time.time(), 3)
        with self._lock, self._db:
            cursor = self._db.execute(
                "INSERT INTO messages (channel, user, text, time) VALUES (?, ?, ?, ?)",
                (channel, user, text, now),
            )
        assert cursor.lastrowid is not None
        return Message(id=cursor.lastrowid, user=user, text=text, time=now)

    def _older(self, channel: str, before: int | None, limit: int) -> list[Message]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, user, text, time FROM messages WHERE channel = ? AND id < ?"
                " ORDER BY id DESC LIMIT ?",
                (channel, before if before is not None else 2**63 - 1, limit),
            ).fetchall()
        return [Message(id=r[0], user=r[1], text=r[2], time=r[3]) for r in reversed(rows)]

    async def add(self, channel: str, user: str, text: str) -> Message:
        return await asyncio.to_thread(self._add, channel, user, text)

    async def older(self, channel: str, before: int | None, limit: int = PAGE) -> list[Message]:
        """Up to ``limit`` messages of ``channel`` before id ``before``, oldest first."""
        return await asyncio.to_thread(self._older, channel, before, limit)

    def close(self) -> None:
        with self._lock:
            self._db.close()


store = MessageStore(DB_PATH)


# -- the rules, each in one place -------------------------------------------------


class InvalidMessage(ValueError):
    """What a client sent is not a message; the text says why."""


def clean_text(value: Any) -> str:
    """The text of a message: a string, stripped, 1 to 500 characters."""
    if not isinstance(value, str):
        raise InvalidMessage("text must be a string")
    text = value.strip()
    if not text:
        raise InvalidMessage("text is empty")
    if len(text) > MAX_TEXT:
        raise InvalidMessage(f"text is longer than {MAX_TEXT} characters")
    return text


def is_chat_channel(channel: str) -> bool:
    return channel.startswith(f"{NAMESPACE}:")


# -- tidings ---------------------------------------------------------------------

rt = Tidings.from_config(
    {
        "host": "127.0.0.1",
        "port": TIDINGS_PORT,
        # The page is served by this app, on another port: another origin.
        "allowed_origins": [o.strip() for o in ORIGINS.split(",") if o.strip()],
        "namespaces": {
            NAMESPACE: {
                "subscribe": "authenticated",
                "presence": True,
                "join_leave": True,
                "history_size": 100,
                "history_ttl": 3600,
            }
        },
    }
)


@rt.on_connect
async def connect(call: ConnectCall) -> ConnectReply:
    """Every client is a logged-in user: the session cookie says which."""
    user = session_user(call.cookies.get(COOKIE))
    if user is None:
        raise Refuse(ErrorCode.UNAUTHORIZED, "log in first")
    return ConnectReply(user=user, info={"name": user})


@rt.on_publish
async def publish(call: PublishCall) -> PublishReply:
    """A client's message: checked, stored, then published as the store has it."""
    if not is_chat_channel(call.channel):
        raise Refuse(ErrorCode.PERMISSION_DENIED, "clients publish to chat: channels only")
    data = call.data_json()
    try:
        text = clean_text(data.get("text") if isinstance(data, dict) else None)
    except InvalidMessage as exc:
        raise Refuse(1400, f'a message is {{"text": "..."}}: {exc}') from None
    return PublishReply(data=await store.add(call.channel, call.user, text))


@rt.on_rpc("load_older")
async def load_older(call: RPCCall) -> dict[str, list[Message]]:
    """``{"channel": "chat:...", "before": <id>}`` → ``{"messages": [...]}``, oldest first."""
    args = call.data_json()
    channel = args.get("channel") if isinstance(args, dict) else None
    before = args.get("before") if isinstance(args, dict) else None
    if not isinstance(channel, str) or not is_chat_channel(channel):
        raise Refuse(ErrorCode.BAD_REQUEST, "channel: a chat: channel")
    if before is not None and (type(before) is not int or before < 1):
        raise Refuse(ErrorCode.BAD_REQUEST, "before: a message id")
    return {"messages": await store.older(channel, before)}


# -- FastAPI ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """tidings serves while the app does: started before the first request,
    stopped (clients told to come back later) when uvicorn stops."""
    if "CHAT_SECRET" not in os.environ:
        log.warning("CHAT_SECRET is not set: session cookies are signed with a known key")
    async with rt.serve():
        log.info("tidings serving on %s", rt.url)
        yield
    store.close()


app = FastAPI(title="tidings chat example", lifespan=lifespan)

SessionCookie = Annotated[str | None, Cookie(alias=COOKIE)]


def current_user(cookie: str | None) -> str:
    user = session_user(cookie)
    if user is None:
        raise HTTPException(401, "log in first")
    return user


class Login(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")


class Announcement(BaseModel):
    text: str
    channel: str = f"{NAMESPACE}:lobby"


@app.get("/")
async def page() -> FileResponse:
    return FileResponse(HERE / "static" / "index.html")


@app.get("/tidings.js")
async def tidings_js() -> Response:
    """The browser client shipped in the tidings package, served from this origin."""
    source = importlib.resources.files("tidings") / "static" / "tidings.js"
    return Response(source.read_bytes(), media_type="text/javascript")


@app.post("/login")
async def login(body: Login, response: Response) -> dict[str, str]:
    """A demo login: any name. A real app checks a password here."""
    response.set_cookie(
        COOKIE, sign_session(body.name), max_age=SESSION_AGE, httponly=True, samesite="lax"
    )
    return {"user": body.name}


@app.post("/logout")
async def logout(response: Response) -> dict[str, bool]:
    response.delete_cookie(COOKIE)
    return {"ok": True}


@app.get("/me")
async def me(session: SessionCookie = None) -> dict[str, str]:
    """Who the page's user is, and where tidings listens (the page connects there)."""
    return {"user": current_user(session), "tidings_url": rt.url}


@app.get("/messages")
async def messages(
    channel: str = f"{NAMESPACE}:lobby",
    before: Annotated[int | None, Query(ge=1)] = None,
    session: SessionCookie = None,
) -> dict[str, list[Message]]:
    """What ``load_older`` answers, for the page (tidings.js has no RPC call)."""
    current_user(session)
    if not is_chat_channel(channel):
        raise HTTPException(400, "channel: a chat: channel")
    return {"messages": await store.older(channel, before)}


@app.post("/announce")
async def announce(body: Announcement, session: SessionCookie = None) -> dict[str, Any]:
    """Say something from the backend: stored, then published in-process."""
    user = current_user(session)
    if not is_chat_channel(body.channel):
        raise HTTPException(400, "channel: a chat: channel")
    try:
        text = clean_text(body.text)
    except InvalidMessage as exc:
        raise HTTPException(422, str(exc)) from None
    message = await store.add(body.channel, user, text)
    result = await rt.publish(body.channel, message)
    return {"message": message, "offset": result.offset, "epoch": result.epoch}
