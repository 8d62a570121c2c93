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
    __slots__ = ("_prefixes", "_routes")

    def __init__(self) -> None:
        self._routes: dict[str, dict[str, Handler]] = {}
        self._prefixes: list[tuple[str, dict[str, Handler]]] = []

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
