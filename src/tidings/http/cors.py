"""Cross-origin policy: which browser origins may call us, in one place.

The same list governs CORS on the HTTP endpoints and the ``Origin`` check of
WebSocket handshakes (against cross-site WebSocket hijacking):

- empty (the default): same-origin only — no CORS headers, and a WebSocket
  handshake's ``Origin`` must name the host it was sent to;
- ``["*"]``: any origin, but never with credentials (cookies), since any web
  page could then read a logged-in user's streams;
- otherwise: exactly these origins (a trailing ``/`` is ignored), with
  credentials.

A request without ``Origin`` does not come from a browser page and is allowed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .messages import Request, Response, error_response

if TYPE_CHECKING:
    from .routing import Router


class CORS:
    __slots__ = ("_any", "_origins")

    def __init__(self, allowed_origins: list[str]) -> None:
        self._any = "*" in allowed_origins
        self._origins = frozenset(o.rstrip("/") for o in allowed_origins if o != "*")

    def allows(self, origin: str) -> bool:
        return self._any or origin.rstrip("/") in self._origins

    def allows_websocket(self, request: Request) -> bool:
        origin = request.headers.get("origin")
        if origin is None or self.allows(origin):
            return True
        if self._any or self._origins:
            return False
        return urlsplit(origin).netloc.lower() == (request.headers.get("host") or "").lower()

    def headers(self, request: Request) -> list[tuple[str, str]]:
        origin = request.headers.get("origin")
        if origin is None or not self.allows(origin):
            return []
        headers = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        if origin.rstrip("/") in self._origins:
            headers.append(("Access-Control-Allow-Credentials", "true"))
        return headers

    def preflight(self, request: Request, router: Router) -> Response:
        methods = router.allowed_methods(request.path)
        if methods is None:
            return error_response(404, f"no such path: {request.path}")
        allow = ", ".join([*methods, "OPTIONS"])
        origin = request.headers.get("origin")
        if origin is None:
            return Response(204, headers=[("Allow", allow)])
        if not self.allows(origin):
            return error_response(403, f"origin {origin} is not allowed")
        headers = [("Access-Control-Allow-Methods", allow), ("Access-Control-Max-Age", "600")]
        requested = request.headers.get("access-control-request-headers")
        if requested:
            headers.append(("Access-Control-Allow-Headers", requested))
        return Response(204, headers=headers)
