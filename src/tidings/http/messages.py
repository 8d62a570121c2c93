"""Requests and responses as plain values: nothing here touches a socket."""

from __future__ import annotations

import time
from collections.abc import Sequence
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

import msgspec

from ..errors import BrokerUnavailable, ErrorCode, ProtocolError
from ..hooks import Disconnect, HookTimedOut

__all__ = [
    "Disconnected",
    "Headers",
    "Request",
    "Response",
    "error_response",
    "json_response",
]

_encode = msgspec.json.Encoder().encode

#: Headers a proxy adds to say whom it relays (RFC 7239 and the common de-facto ones).
_PROXY_HEADERS = frozenset({b"forwarded", b"x-forwarded-for", b"x-real-ip"})


def _invalid_query() -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, "invalid UTF-8 in the query string")


#: Header names as asked for (``"Content-Length"``) to as stored
#: (``b"content-length"``): a request's headers are looked up four to six
#: times by name on a long-poll's path, and lower-casing and encoding the name
#: each time was ~2 % of its CPU. Callers name headers in code, so this stays
#: small; it is bounded all the same (:data:`_HEADER_KEYS_KEPT`).
_header_keys: dict[str, bytes] = {}
_HEADER_KEYS_KEPT = 256


def _header_key(name: str) -> bytes:
    key = _header_keys.get(name)
    if key is None:
        key = name.lower().encode("latin-1")
        if len(_header_keys) < _HEADER_KEYS_KEPT:
            _header_keys[name] = key
    return key


class Headers:
    """Request headers in arrival order; names are lower-cased once, at parse time."""

    __slots__ = ("raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.raw = raw

    def get(self, name: str) -> str | None:
        key = _header_key(name)
        for field, value in self.raw:
            if field == key:
                return value.decode("latin-1")
        return None

    def get_all(self, name: str) -> list[str]:
        key = _header_key(name)
        return [value.decode("latin-1") for field, value in self.raw if field == key]

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None


class Request:
    """One parsed HTTP request."""

    __slots__ = (
        "_query",
        "_query_text",
        "body",
        "client",
        "headers",
        "keep_alive",
        "method",
        "path",
        "target",
    )

    def __init__(
        self,
        method: str,
        target: bytes,
        path: str,
        query: str,
        headers: Headers,
        client: tuple[str, int] | None,
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.path = path
        self._query_text = query
        self._query: dict[str, list[str]] | None = None
        self.headers = headers
        self.client = client
        self.keep_alive = keep_alive
        self.body = b""

    @property
    def query(self) -> dict[str, list[str]]:
        """Query parameters, parsed on first use; a query that is not UTF-8 is a 400.

        Long-poll clients re-poll after every publication, so this is on a hot
        path: a query with nothing escaped (curl, our clients' cursors) is split
        directly; anything else goes through ``parse_qs``, decoding strictly —
        its default turns ``%FF`` into U+FFFD, which would name another channel
        than the one the client meant. Raw bytes that are not UTF-8 reach us
        already replaced by U+FFFD (the connection decodes the target leniently),
        so a U+FFFD in the query is refused too: no parameter we take holds one.
        """
        query = self._query
        if query is None:
            text = self._query_text
            if not text.isascii() and "\ufffd" in text:
                raise _invalid_query()
            if "%" in text or "+" in text:
                try:
                    query = parse_qs(text, keep_blank_values=True, errors="strict")
                except UnicodeDecodeError:
                    raise _invalid_query() from None
                if any("\ufffd" in value for values in query.values() for value in values):
                    raise _invalid_query()
            else:
                query = {}
                for part in text.split("&"):
                    if part:
                        name, _, value = part.partition("=")
                        query.setdefault(name, []).append(value)
            self._query = query
        return query

    def query_value(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None

    @property
    def is_loopback(self) -> bool:
        """The client, not merely the peer, is on this machine.

        A request that a proxy relayed says so in a header; behind a reverse
        proxy on the same host (docs/deployment.md) every peer is 127.0.0.1,
        and taking that for the client would make anything loopback-only
        public. So a request carrying any proxy header is never loopback —
        whatever the header says, since a client can send it too.
        """
        host = self.client[0] if self.client else ""
        if not (host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1")):
            return False
        return not any(field in _PROXY_HEADERS for field, _ in self.headers.raw)

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target.decode('latin-1')!r}>"


class Response:
    """A complete response; :meth:`encode` renders it for one request.

    One response may answer many requests (held long-polls woken by the same
    publication): its plain keep-alive rendering is kept and reused.
    """

    __slots__ = ("_plain", "body", "close", "headers", "status")

    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
        *,
        close: bool = False,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers or []
        self.close = close
        self._plain: bytes | None = None

    def encode(self, *, head: bool, keep_alive: bool, extra: Sequence[tuple[str, str]]) -> bytes:
        plain = not head and keep_alive and not extra
        if plain and self._plain is not None:
            return self._plain
        data = self._render(head=head, keep_alive=keep_alive, extra=extra)
        if plain:
            self._plain = data
        return data

    def _render(self, *, head: bool, keep_alive: bool, extra: Sequence[tuple[str, str]]) -> bytes:
        reason = HTTPStatus(self.status).phrase
        lines = [f"HTTP/1.1 {self.status} {reason}", f"Date: {http_date()}", "Server: tidings"]
        lines.extend(f"{name}: {value}" for name, value in self.headers)
        lines.extend(f"{name}: {value}" for name, value in extra)
        lines.append(f"Content-Length: {len(self.body)}")
        if not keep_alive:
            lines.append("Connection: close")
        head_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head_bytes if head else head_bytes + self.body


_date_cache: tuple[int, str] = (0, "")


def http_date() -> str:
    """The ``Date`` header, formatted once per second rather than per response."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


def json_response(payload: Any, status: int = 200, **kwargs: Any) -> Response:
    return Response(status, _encode(payload), [("Content-Type", "application/json")], **kwargs)


#: HTTP status for each error code, where an HTTP transport answers an error.
_STATUS = {
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.UNKNOWN_CHANNEL: 404,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.METHOD_NOT_FOUND: 404,
    ErrorCode.LIMIT_EXCEEDED: 400,
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.NOT_AVAILABLE: 404,
    ErrorCode.TOKEN_EXPIRED: 401,
    ErrorCode.TOO_MANY_REQUESTS: 429,
    ErrorCode.INTERNAL: 500,
}

#: Error code for each HTTP status the HTTP layer answers by itself.
_CODE = {
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.PERMISSION_DENIED,
    404: ErrorCode.METHOD_NOT_FOUND,
    405: ErrorCode.METHOD_NOT_FOUND,
    500: ErrorCode.INTERNAL,
}


class Disconnected(ProtocolError):
    """A hook's :class:`~tidings.hooks.Disconnect` on a request (SSE, long-poll, poll).

    An HTTP request has no connection to close with a code, so the request is
    refused instead: 403 (the application said no; the request was fine),
    the disconnect's code and reason in the usual error body. It is a
    :class:`ProtocolError` so that the HTTP layer's one ``except`` renders it
    here, with every other error.
    """

    def __init__(self, disconnect: Disconnect) -> None:
        super().__init__(ErrorCode.PERMISSION_DENIED, disconnect.reason)
        #: The code the client sees, 3000-4999.
        self.disconnect_code = disconnect.code


def error_response(
    error: ProtocolError | int,
    message: str | None = None,
    *,
    close: bool = False,
    headers: list[tuple[str, str]] | None = None,
) -> Response:
    """The JSON error body every HTTP endpoint uses: ``{"error": {code, message}}``.

    The HTTP status follows the error code (:data:`_STATUS`), except:

    - an unavailable broker or a hook past its timeout: 503 with
      ``Retry-After`` rather than code 100's 500, since both are known to
      pass (a hook that raised stays 500: the application's bug);
    - an application's code (400-1999, a hook's ``Refuse``): 403, since the
      application refused a request that was itself well-formed;
    - a hook's ``Disconnect``: 403 with its code (3000-4999) and reason.
    """
    extra: list[tuple[str, str]] = []
    code: int
    if isinstance(error, BrokerUnavailable | HookTimedOut):
        # Code 100 like any internal error, but known to pass: see the classes.
        status, code, text = 503, error.code, error.message
        extra.append(("Retry-After", str(error.RETRY_AFTER)))
    elif isinstance(error, Disconnected):
        status, code, text = 403, error.disconnect_code, error.message
    elif isinstance(error, ProtocolError):
        default = 400 if isinstance(error.code, ErrorCode) else 403
        status, code, text = _STATUS.get(error.code, default), error.code, error.message
    else:
        status, code = error, _CODE.get(error, ErrorCode.BAD_REQUEST)
        text = message or HTTPStatus(error).phrase.lower()
    body = _encode({"error": {"code": int(code), "message": text}})
    return Response(
        status,
        body,
        [("Content-Type", "application/json"), *extra, *(headers or [])],
        close=close,
    )
