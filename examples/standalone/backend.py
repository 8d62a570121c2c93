"""The backend behind ``tidings serve``: Centrifugo's proxy format in, signed webhooks in.

Run it from the repository's root, next to tidings (README.md)::

    uvicorn examples.standalone.backend:app --port 9000
    tidings serve --config examples/standalone/tidings.toml

tidings asks this app every decision over HTTP (``[proxy]`` in tidings.toml),
in Centrifugo's proxy format, so this file would answer Centrifugo as well:

- ``POST /proxy/connect``: who the client is, from the ``session`` cookie
  that ``POST /login`` set (tidings forwards that cookie only);
- ``POST /proxy/subscribe``: ``chat:`` channels, for everyone logged in;
- ``POST /proxy/publish``: a message is ``{"text": ...}`` of 1-500
  characters; it is published as ``{user, text, time}``;
- ``POST /proxy/rpc``: ``whoami``.

And tidings tells it what happened: ``POST /webhooks`` (``[webhooks]``), a
signed JSON batch, checked as docs/webhooks.md says (signature, age, repeated
ids); ``GET /webhooks`` lists the events received, to look at.

Nothing here is tidings-specific Python: it could be any language.
Environment: ``PROXY_SECRET`` and ``WEBHOOK_SECRET`` (as in tidings.toml),
``MAX_SESSIONS`` (10000: past it the oldest session is forgotten).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger("backend")

PROXY_SECRET = os.environ.get("PROXY_SECRET", "change-me: the proxy secret backend.py checks")
WEBHOOK_SECRET = os.environ.get(
    "WEBHOOK_SECRET", "change-me: the webhook secret backend.py checks"
).encode()
#: A webhook body older than this (its signed ``time_ms``) is a replay.
MAX_AGE_MS = 5 * 60 * 1000
MAX_TEXT = 500
NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")

#: Session id -> user name, oldest first. A real backend keeps sessions in its database.
sessions: dict[str, str] = {}
MAX_SESSIONS = int(os.environ.get("MAX_SESSIONS", "10000"))
#: Webhook event ids seen, and when (dropped after twice MAX_AGE_MS).
seen_ids: dict[str, int] = {}
#: The last webhook events received, for GET /webhooks.
received: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)


def result(**fields: Any) -> JSONResponse:
    return JSONResponse({"result": fields})


def error(code: int, message: str) -> JSONResponse:
    """A refusal in Centrifugo's format: the client gets this error, stays connected."""
    return JSONResponse({"error": {"code": code, "message": message}})


async def from_tidings(request: Request) -> dict[str, Any] | None:
    """The proxy call's body, if it comes from tidings (the shared secret)."""
    secret = request.headers.get("x-proxy-secret", "")
    if not hmac.compare_digest(secret.encode(), PROXY_SECRET.encode()):
        return None
    body: dict[str, Any] = json.loads(await request.body())
    return body


# -- the application's own endpoints ----------------------------------------------


async def login(request: Request) -> Response:
    """``{"name": ...}`` → a session cookie. A demo: a real backend checks a password."""
    try:
        body = await request.json()
    except ValueError:
        body = None
    name = body.get("name") if isinstance(body, dict) else None
    if not isinstance(name, str) or not NAME.fullmatch(name):
        return JSONResponse({"error": "name: 1-32 letters, digits, '_', '.', '-'"}, 400)
    session = secrets.token_urlsafe(24)
    if len(sessions) >= MAX_SESSIONS:  # forget the oldest: logins cannot grow memory
        del sessions[next(iter(sessions))]
    sessions[session] = name
    response = JSONResponse({"user": name})
    response.set_cookie("session", session, httponly=True, samesite="lax")
    return response


# -- the proxy: tidings asks, in Centrifugo's format --------------------------------


async def connect(request: Request) -> Response:
    call = await from_tidings(request)
    if call is None:
        return Response(status_code=403)
    user = sessions.get(request.cookies.get("session", ""))
    if user is None:
        return error(101, "log in first")
    return result(user=user, info={"name": user})


async def subscribe(request: Request) -> Response:
    call = await from_tidings(request)
    if call is None:
        return Response(status_code=403)
    if not call["channel"].startswith("chat:"):
        return error(103, "permission denied")
    return result()


async def publish(request: Request) -> Response:
    call = await from_tidings(request)
    if call is None:
        return Response(status_code=403)
    if not call["channel"].startswith("chat:"):
        return error(103, "permission denied")
    data = call.get("data")
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str) or not 0 < len(text.strip()) <= MAX_TEXT:
        return error(1400, f'a message is {{"text": ...}} of 1 to {MAX_TEXT} characters')
    return result(data={"user": call["user"], "text": text.strip(), "time": time.time()})


async def rpc(request: Request) -> Response:
    call = await from_tidings(request)
    if call is None:
        return Response(status_code=403)
    if call["method"] == "whoami":
        return result(data={"user": call["user"]})
    return error(1404, f"no method {call['method']!r}")


# -- webhooks: tidings tells what happened -------------------------------------------


def accept(body: bytes, signature: str | None) -> list[dict[str, Any]]:
    """The new events of one webhook request; ValueError to answer 401 (docs/webhooks.md)."""
    expected = hmac.new(WEBHOOK_SECRET, body, hashlib.sha256).hexdigest()
    if signature is None or not hmac.compare_digest(expected, signature):
        raise ValueError("bad signature")
    batch = json.loads(body)
    now_ms = int(time.time() * 1000)
    if abs(now_ms - batch["time_ms"]) > MAX_AGE_MS:
        raise ValueError("too old: a replay, or a clock far off")
    for old in [i for i, at in seen_ids.items() if now_ms - at > 2 * MAX_AGE_MS]:
        del seen_ids[old]
    new = [event for event in batch["events"] if event["id"] not in seen_ids]
    for event in new:
        seen_ids[event["id"]] = now_ms
    return new


async def webhooks(request: Request) -> Response:
    try:
        events = accept(await request.body(), request.headers.get("x-tidings-signature"))
    except ValueError as exc:
        log.warning("webhook refused: %s", exc)
        return Response(str(exc), status_code=401)
    received.extend(events)
    for event in events:
        log.info("webhook: %s", event)
    return Response(status_code=204)


async def list_webhooks(request: Request) -> Response:
    return JSONResponse(list(received))


app = Starlette(
    routes=[
        Route("/login", login, methods=["POST"]),
        Route("/proxy/connect", connect, methods=["POST"]),
        Route("/proxy/subscribe", subscribe, methods=["POST"]),
        Route("/proxy/publish", publish, methods=["POST"]),
        Route("/proxy/rpc", rpc, methods=["POST"]),
        Route("/webhooks", webhooks, methods=["POST"]),
        Route("/webhooks", list_webhooks, methods=["GET"]),
    ]
)
