"""One HTTP/1.1 connection: an ``asyncio.Protocol`` driving an httptools parser.

Why not asyncio streams or an ASGI server: a stream reader and a task per
connection cost kilobytes that an idle subscriber does not need (DESIGN
principle 3). Here the parser's callbacks build :class:`Request` values;
requests queue up in arrival order and are answered one after another, which
gives pipelining its required ordering for free.

A request's handler may answer at once, answer later (a held long-poll calls
:meth:`HTTPConnection.respond`), or take the socket over entirely (SSE and
WebSocket call :meth:`HTTPConnection.detach`, after which this object and its
parser are garbage and the stream's own small protocol object remains).

Every bound answers clearly and closes only the offending connection: a head
over ``limits.max_request_head`` gets 431, a body over ``limits.max_body_size``
413, unparsable bytes 400; a request that arrives too slowly (slowloris) is
cut off after ``timeouts.request``, an idle keep-alive connection after
``timeouts.keepalive``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

import httptools

from ..errors import ProtocolError
from .messages import Headers, Request, Response, error_response

if TYPE_CHECKING:
    from ..server import Server

__all__ = ["HTTPConnection", "Held"]

log = logging.getLogger("tidings.http")


#: Seconds a refused connection is drained before it is closed.
_LINGER = 2.0


class Held(Protocol):
    """A response the handler will give later, such as a held long-poll."""

    def cancel(self) -> None:
        """The client went away: release whatever the response was waiting on."""

    def answer_now(self) -> None:
        """Answer at once with what there is (graceful shutdown)."""


class _Refusal(Exception):
    """Raised inside a parser callback to stop parsing and answer with an error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class HTTPConnection(asyncio.Protocol):
    __slots__ = (
        "_body",
        "_body_size",
        "_busy",
        "_closing",
        "_head_size",
        "_headers",
        "_held",
        "_in_head",
        "_queue",
        "_raw_head",
        "_reply_to",
        "_request",
        "_stopped",
        "_task",
        "_timer",
        "_url",
        "client",
        "parser",
        "server",
        "transport",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.client: tuple[str, int] | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._raw_head = 0
        self._in_head = False
        self._body: list[bytes] = []
        self._body_size = 0
        self._request: Request | None = None
        # Requests waiting their turn (pipelining). A list, not a deque: it is
        # almost always empty or one long, and an empty deque costs 760 bytes
        # on every connection.
        self._queue: list[Request | Response] = []
        # Set when the byte stream must not be parsed any further (a refusal,
        # an upgrade we do not speak): the parser is gone for good.
        self._stopped = False
        self._busy = False
        self._closing = False
        self._held: Held | None = None
        # How to answer a held request: (HEAD?, keep-alive?, CORS headers), so
        # that the Request itself need not be kept while it waits.
        self._reply_to: tuple[bool, bool, list[tuple[str, str]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        self.server.connections.add(self)
        self._arm(self.server.config.timeouts.request, self._on_request_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self._cancel_timer()
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._held is not None:
            held, self._held = self._held, None
            held.cancel()
        self.parser = None

    def data_received(self, data: bytes) -> None:
        if self._closing or self._stopped:
            return
        if self.parser is None:
            # Dropped while a long-poll was held; we are at a message boundary.
            self.parser = httptools.HttpRequestParser(self)
        if not self._in_head and not self._body_size and self._timer is not None:
            # First bytes of a new request: from now on it must arrive in time.
            self._arm(self.server.config.timeouts.request, self._on_request_timeout)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._on_upgrade(data[upgrade.args[0] :])
            return
        except _Refusal as refusal:
            self._refuse(refusal.status, refusal.message)
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refusal):
                self._refuse(cause.status, cause.message)
            else:
                self._refuse(400, f"malformed HTTP request: {exc}")
        else:
            # httptools buffers a header until it ends; bound what it may buffer.
            if self._in_head:
                self._raw_head += len(data)
                if self._raw_head > self.server.config.limits.max_request_head:
                    self._refuse(431, "request line and headers too large")
        self._process()

    # -- httptools callbacks ---------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._raw_head = 0
        self._in_head = True
        self._body = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > self.server.config.limits.max_request_head:
            raise _Refusal(431, "request line too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.server.config.limits.max_request_head:
            raise _Refusal(431, "request headers too large")
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self._in_head = False
        limits = self.server.config.limits
        url = httptools.parse_url(self._url)
        headers = Headers(self._headers)
        request = Request(
            method=self.parser.get_method().decode("ascii"),
            target=self._url,
            path=url.path.decode("utf-8", "replace") if url.path else "/",
            query=url.query.decode("utf-8", "replace") if url.query else "",
            headers=headers,
            client=self.client,
            keep_alive=self.parser.should_keep_alive(),
        )
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_size:
            raise _Refusal(413, f"request body larger than {limits.max_body_size} bytes")
        expect = headers.get("expect")
        if expect is not None and expect.lower() == "100-continue" and self.transport:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._request = request
        # The Request owns them now; an idle connection keeps nothing of its last request.
        self._url = b""
        self._headers = []

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.server.config.limits.max_body_size:
            raise _Refusal(
                413, f"request body larger than {self.server.config.limits.max_body_size} bytes"
            )
        self._body.append(body)

    def on_message_complete(self) -> None:
        request = self._request
        if request is None:
            return
        self._request = None
        request.body = b"".join(self._body)
        self._body = []
        self._body_size = 0
        self._cancel_timer()
        self._queue.append(request)
        if len(self._queue) >= self.server.config.limits.max_pipelined_requests and self.transport:
            self.transport.pause_reading()

    # -- answering -------------------------------------------------------

    def _process(self) -> None:
        """Answer queued requests in order; stop at one still being handled."""
        while self._queue and not self._busy and not self._closing:
            item = self._queue.pop(0)
            if isinstance(item, Response):
                self._write(item, head=False, keep_alive=False, extra=[])
                return
            self._dispatch(item)
        if self.transport is not None and not self._closing and not self._busy:
            if len(self._queue) < self.server.config.limits.max_pipelined_requests:
                self.transport.resume_reading()
            if not self._queue and not self._in_head and self._timer is None:
                self._arm(self.server.config.timeouts.keepalive, self._on_idle_timeout)

    def _dispatch(self, request: Request) -> None:
        cors = self.server.cors
        if request.method == "OPTIONS":
            self._send(request, cors.preflight(request, self.server.router))
            return
        route = self.server.router.resolve(request)
        if isinstance(route, Response):
            self._send(request, route)
            return
        self._busy = True
        self._task = asyncio.get_running_loop().create_task(self._run(route, request))

    async def _run(self, handler: object, request: Request) -> None:
        try:
            response = await handler(request, self)  # type: ignore[operator]
        except ProtocolError as exc:
            response = error_response(exc)
        except Exception:
            log.exception("handler failed on %r", request)
            response = error_response(500, "internal server error")
        self._task = None
        if response is not None:
            self.respond(request, response)

    def respond(self, request: Request, response: Response) -> None:
        """Send the answer to the request being handled, then go on with the next."""
        self._held = None
        if self.transport is None or self.transport.is_closing():
            return
        self._busy = False
        self._send(request, response)
        self._process()

    def hold(self, held: Held, request: Request) -> None:
        """The handler will answer later (:meth:`respond_held`); ``held`` is told
        if the client goes first."""
        self._held = held
        if not self._queue and not self._in_head:
            # Nothing more to parse until the answer: a held long-poll should
            # cost what its socket costs, and a parser is ~900 bytes.
            self.parser = None
        self._reply_to = (
            request.method == "HEAD",
            request.keep_alive,
            self.server.cors.headers(request),
        )

    def respond_held(self, response: Response) -> None:
        """Answer the held request, then go on with the next."""
        reply_to, self._reply_to = self._reply_to, None
        self._held = None
        if reply_to is None or self.transport is None or self.transport.is_closing():
            return
        self._busy = False
        head, keep_alive, extra = reply_to
        keep_alive = keep_alive and not self.server.stopping
        self._write(response, head=head, keep_alive=keep_alive, extra=extra)
        self._process()

    def _send(self, request: Request, response: Response) -> None:
        keep_alive = request.keep_alive and not response.close and not self.server.stopping
        extra = self.server.cors.headers(request)
        self._write(response, head=request.method == "HEAD", keep_alive=keep_alive, extra=extra)

    def _write(
        self, response: Response, *, head: bool, keep_alive: bool, extra: list[tuple[str, str]]
    ) -> None:
        if self.transport is None:
            return
        self.transport.write(response.encode(head=head, keep_alive=keep_alive, extra=extra))
        if keep_alive:
            return
        self._closing = True
        self._queue.clear()
        if response.status < 400 or not self.transport.can_write_eof():
            self.transport.close()
            return
        # A refused client may still be sending: closing now would answer its
        # bytes with a reset that can destroy our response before it is read.
        # Half-close, drain and discard for a moment, then close.
        self.transport.write_eof()
        self.transport.resume_reading()
        self._arm(_LINGER, self.transport.close)

    def _refuse(self, status: int, message: str) -> None:
        """Stop reading and queue an error answer after those already due."""
        level = logging.INFO if status >= 413 else logging.DEBUG
        log.log(level, "refusing request from %s: %d %s", self.client, status, message)
        self.parser = None
        self._stopped = True
        self._in_head = False
        if self.transport is not None:
            self.transport.pause_reading()
        self._queue.append(error_response(status, message, close=True))

    def _on_upgrade(self, rest: bytes) -> None:
        request = self._queue.pop() if self._queue else None
        if request is None or isinstance(request, Response):
            self._refuse(400, "malformed upgrade request")
            self._process()
            return
        upgrade = (request.headers.get("upgrade") or "").lower()
        if upgrade != "websocket" or self._queue or self._busy:
            # Not a protocol we speak (or pipelined in a way we won't untangle):
            # answer it as plain HTTP, then close, since the parser stopped here.
            request.keep_alive = False
            self.parser = None
            self._stopped = True
            self._queue.append(request)
            self._process()
            return
        self.server.upgrade_websocket(self, request, rest)

    def detach(self) -> asyncio.Transport:
        """Hand the socket to a stream protocol; this object stops serving it."""
        assert self.transport is not None
        transport = self.transport
        self.server.connections.discard(self)
        self._cancel_timer()
        self._closing = True
        self._busy = False
        self._task = None
        self.parser = None
        self._queue.clear()
        return transport

    # -- timers and shutdown ---------------------------------------------

    def _arm(self, delay: float, callback: object) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(delay, callback)  # type: ignore[arg-type]

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_request_timeout(self) -> None:
        self._timer = None
        if self.transport is None or self._closing:
            return
        if self._in_head or self._body_size or self._request is not None:
            log.info(
                "closing %s: request not received within %ss",
                self.client,
                self.server.config.timeouts.request,
            )
            self._write(
                error_response(408, "request not received in time"),
                head=False,
                keep_alive=False,
                extra=[],
            )
        elif not self._busy and not self._queue:
            self.transport.close()

    def _on_idle_timeout(self) -> None:
        self._timer = None
        if self.transport is not None and not self._busy and not self._queue and not self._in_head:
            self._closing = True
            self.transport.close()

    def shutdown(self) -> None:
        """Graceful shutdown: finish what is in flight, close what is idle."""
        if self._held is not None:
            self._held.answer_now()
        elif not self._busy and not self._queue and self.transport is not None:
            self._closing = True
            self.transport.close()
