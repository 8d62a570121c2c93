"""Exact-path routing with 404 and 405 answered in one place."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .messages import Request, Response, error_response

if TYPE_CHECKING:
    from .connection import HTTPConnection

#: A handler answers with a Response, or with None when it has taken the
#: connection over (a stream) or will answer later (a held long-poll).
Handler = Callable[[Request, "HTTPConnection"], Awaitable[Response | None]]


class Router:
    __slots__ = ("_routes",)

    def __init__(self) -> None:
        self._routes: dict[str, dict[str, Handler]] = {}

    def add(self, method: str, path: str, handler: Handler) -> None:
        methods = self._routes.setdefault(path, {})
        methods[method] = handler
        if method == "GET":
            methods.setdefault("HEAD", handler)

    def resolve(self, request: Request) -> Handler | Response:
        """The handler for ``request``, or the 404/405 response to send instead."""
        methods = self._routes.get(request.path)
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
        methods = self._routes.get(path)
        return sorted(methods) if methods is not None else None
