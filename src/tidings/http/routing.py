"""Exact-path routing with 404 and 405 answered in one place.

Two kinds of route: a handler answers a request (or holds it, or takes the
socket over after answering it itself, as SSE does); an *upgrade* route takes
the socket of a request that asked to switch protocols (``Upgrade:``), with
any bytes that followed its head, as WebSocket does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from .messages import Request, Response, error_response

__all__ = ["Exchange", "Handler", "Held", "Router", "UpgradeHandler"]


class Held(Protocol):
    """A response the handler will give later, such as a held long-poll."""

    def cancel(self) -> None:
        """The client went away: release whatever the response was waiting on."""

    def answer_now(self) -> None:
        """Answer at once with what there is (graceful shutdown)."""


class Exchange(Protocol):
    """What a handler may do with the connection its request came on.

    Answering is returning a :class:`Response`; beyond that a handler may
    hold the answer for later (a long-poll) or take the socket over (a
    stream). Declared here, where handlers are typed, so that routes and
    handlers need not import the connection class (which imports the routes).
    """

    #: The peer's address, for logs.
    client: tuple[str, int] | None
    #: The socket, until the connection is lost.
    transport: asyncio.Transport | None

    def hold(self, held: Held, request: Request) -> None:
        """The handler answers later, through :meth:`respond_held`."""

    def respond_held(self, response: Response) -> None:
        """Answer the held request, then go on with the next."""

    def detach(self) -> asyncio.Transport:
        """Take the socket over; the connection stops serving it."""


#: A handler answers with a Response, or with None when it has taken the
#: connection over (a stream) or will answer later (a held long-poll). One
#: that may wait returns an awaitable of that (an ``async def`` does), which
#: the connection runs in a task; one that can answer without waiting (a
#: long-poll with no hook to ask, on a broker in this process) returns the
#: answer itself, so that no task is made for it.
Handler = Callable[[Request, Exchange], Response | Awaitable[Response | None] | None]

#: Takes over a socket whose request asked to switch protocols: ``(request,
#: transport, bytes read past the head)``. It answers the handshake itself.
UpgradeHandler = Callable[[Request, asyncio.Transport, bytes], None]


class Router:
    __slots__ = ("_prefixes", "_routes", "_upgrades")

    def __init__(self) -> None:
        self._routes: dict[str, dict[str, Handler]] = {}
        self._prefixes: list[tuple[str, dict[str, Handler]]] = []
        self._upgrades: dict[str, dict[str, UpgradeHandler]] = {}

    def add(self, method: str, path: str, handler: Handler) -> None:
        methods = self._routes.setdefault(path, {})
        methods[method] = handler
        if method == "GET":
            methods.setdefault("HEAD", handler)

    def add_prefix(self, method: str, prefix: str, handler: Handler) -> None:
        """Route every path under ``prefix`` (e.g. the API's ``/api/``) to ``handler``."""
        for known, methods in self._prefixes:
            if known == prefix:
                methods[method] = handler
                return
        self._prefixes.append((prefix, {method: handler}))

    def add_upgrade(self, path: str, protocol: str, handler: UpgradeHandler) -> None:
        """Hand requests to ``path`` asking ``Upgrade: <protocol>`` to ``handler``."""
        self._upgrades.setdefault(path, {})[protocol.lower()] = handler

    def upgrades(self, protocol: str) -> bool:
        """Whether any route speaks ``protocol``; other upgrade requests are plain HTTP."""
        protocol = protocol.lower()
        return any(protocol in handlers for handlers in self._upgrades.values())

    def resolve_upgrade(self, request: Request, protocol: str) -> UpgradeHandler | Response:
        """The upgrade handler for ``request``, or the 404/405 response to send instead.

        RFC 6455 §4.1 (and RFC 9110's Upgrade generally, for a request without
        a body): the handshake is a GET. Refused as plain HTTP, so that a HEAD
        gets its answer without a body.
        """
        handler = self._upgrades.get(request.path, {}).get(protocol.lower())
        if handler is None:
            return error_response(404, f"no {protocol} endpoint at {request.path}")
        if request.method != "GET":
            return error_response(
                405, f"a {protocol} handshake must be a GET request", headers=[("Allow", "GET")]
            )
        return handler

    def _methods(self, path: str) -> dict[str, Handler] | None:
        methods = self._routes.get(path)
        if methods is None:
            for prefix, handlers in self._prefixes:
                if path.startswith(prefix):
                    return handlers
        return methods

    def resolve(self, request: Request) -> Handler | Response:
        """The handler for ``request``, or the 404/405 response to send instead."""
        methods = self._methods(request.path)
        if methods is None:
            return error_response(404, f"no such path: {request.path}")
        handler = methods.get(request.method)
        if handler is None:
            allow = ", ".join(sorted({*methods, "OPTIONS"}))
            return error_response(
                405, f"method {request.method} not allowed here", headers=[("Allow", allow)]
            )
        return handler

    def allowed_methods(self, path: str) -> list[str] | None:
        methods = self._methods(path)
        return sorted(methods) if methods is not None else None
