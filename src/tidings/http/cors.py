"""Cross-origin policy: which browser origins may call us, in one place.

``allowed_origins`` empty means same-origin only (no CORS headers at all);
``["*"]`` allows any origin; otherwise origins must match exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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

    def headers(self, request: Request) -> list[tuple[str, str]]:
        origin = request.headers.get("origin")
        if origin is None or not self.allows(origin):
            return []
        return [
            ("Access-Control-Allow-Origin", origin),
            ("Access-Control-Allow-Credentials", "true"),
            ("Vary", "Origin"),
        ]

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
