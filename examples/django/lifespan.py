"""An ASGI wrapper that answers lifespan events for an app that does not.

Django's ``ASGIHandler`` handles ``http`` scopes only: given a ``lifespan``
scope it raises (uvicorn then logs "ASGI 'lifespan' protocol appears
unsupported" and goes on without one). tidings must start before the first
request and stop when the server does, so this wrapper takes the lifespan
scope itself: on ``lifespan.startup`` it enters ``serving()`` (here
``rt.serve()``), on ``lifespan.shutdown`` it leaves it, and every other scope
goes to the wrapped app unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger(__name__)


class Lifespan:
    """``Lifespan(app, serving)``: ``app`` with ``serving()`` entered for its lifetime."""

    def __init__(
        self, app: ASGIApp, serving: Callable[[], contextlib.AbstractAsyncContextManager[Any]]
    ) -> None:
        self.app = app
        self.serving = serving

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        async with contextlib.AsyncExitStack() as stack:
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    try:
                        await stack.enter_async_context(self.serving())
                    except Exception as exc:
                        # The ASGI server prints the message and exits: a port
                        # in use, an invalid configuration...
                        await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                        return
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await stack.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
