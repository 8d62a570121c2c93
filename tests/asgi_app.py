"""The ASGI apps the tests run under uvicorn and hypercorn: ``uvicorn asgi_app:app``
(``ASGIApp`` over a ``Server``), ``asgi_app:host`` (a host app around ``rt.asgi()``),
``asgi_app:starlette_host`` (mounted at ``/rt`` in Starlette).

The configuration file is ``ASGI_APP_CONFIG`` (optional); ``TIDINGS_*``
variables apply on top, as for ``tidings serve``. The ASGI servers configure
only their own loggers, so tidings' lines get a handler here (docs/asgi.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.routing import Mount

from tidings import ConnectCall, ConnectReply, Tidings
from tidings.asgi import ASGIApp
from tidings.config import load_config
from tidings.server import Server

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

app = ASGIApp(Server(load_config(os.environ.get("ASGI_APP_CONFIG") or None, env=os.environ)))


# -- rt.asgi(): a host application around a tidings.Tidings ------------------------

rt = Tidings(load_config(os.environ.get("ASGI_APP_CONFIG") or None, env=os.environ))


@rt.on_connect
async def connect(call: ConnectCall) -> ConnectReply | None:
    """The user is whoever the host's header says (a session cookie, in a real app)."""
    user = call.headers.get("x-user")
    return ConnectReply(user=user) if user else None


tidings_app = rt.asgi()


async def host(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The host's own route, ``POST /host/publish?channel=C&text=T``, publishes in
    process (``rt.publish``); everything else is tidings'."""
    if scope["type"] == "http" and scope["path"] == "/host/publish":
        query = parse_qs(scope["query_string"].decode())
        result = await rt.publish(query["channel"][0], {"text": query["text"][0]})
        body = json.dumps({"offset": result.offset}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})
        return
    await tidings_app(scope, receive, send)


# -- mounted in Starlette, started by the host's lifespan --------------------------

mounted_app = ASGIApp(
    Server(load_config(os.environ.get("ASGI_APP_CONFIG") or None, env=os.environ))
)


@contextlib.asynccontextmanager
async def _lifespan(host: Starlette) -> AsyncIterator[None]:
    async with mounted_app.running():  # Starlette passes no lifespan to a Mount
        yield


starlette_host = Starlette(routes=[Mount("/rt", mounted_app)], lifespan=_lifespan)
