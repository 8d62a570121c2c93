"""tidings as an ASGI application: the same transports behind uvicorn, hypercorn or granian.

For teams that must serve everything through their existing ASGI server on
one port. ``ASGIApp(server)`` (``rt.asgi()`` on a :class:`tidings.Tidings`)
answers HTTP and WebSocket scopes with the server's own handlers, routes and
sessions; only the socket end differs. It is the slower path, on purpose
kept thin (docs/asgi.md has the figures): an ASGI server runs a task and a
parser of its own per connection, and every byte crosses an ``await send``.

**Lifespan.** ``lifespan.startup`` starts what :meth:`Server.start` starts
except the listener (the broker, the proxy, webhooks, the transports);
``lifespan.shutdown`` is the server's graceful shutdown. A host that does not
pass lifespan events to a mounted app (Starlette's ``Mount``) calls
:meth:`ASGIApp.startup` and :meth:`ASGIApp.shutdown` from its own lifespan.

**HTTP.** A scope becomes a :class:`~tidings.http.Request`; the body is read
within ``limits.max_body_size`` (413 on the announced length, before reading;
413 as soon as the bytes received pass it) and ``timeouts.request`` (408); the
router's handler answers with a :class:`~tidings.http.Response`. The
:class:`ASGIExchange` each handler gets is the :class:`~tidings.http.Exchange`
of the native connection, so a handler cannot tell the two apart:

* ``hold``/``respond_held`` (a long-poll): the answer is sent when the
  handler's waiter gives it; a client that disconnects first releases it.
* ``detach`` (SSE): the exchange becomes the stream's transport. The stream
  writes its response head as HTTP/1.1 bytes, as it would to a socket; that
  head is parsed (httptools, as the native server parses requests) into
  ``http.response.start``, and later writes go out as body chunks (their
  chunk framing taken off first where the handler chunks its body itself, as
  the HTTP-stream emulation does: the ASGI server frames).

**Back-pressure.** ``write`` is synchronous (the stream's fan-out path) and
``send`` is a coroutine, so writes queue in the exchange and one short-lived
task per busy connection sends them, coalesced. The queue is bounded in
bytes as a socket's buffer is: a ``send`` the ASGI server does not return
from is a peer not reading (uvicorn blocks it while its own 64 KiB buffer is
full), and once more than ``limits.max_write_buffer`` bytes wait behind it,
the protocol's ``pause_writing`` runs: the SSE stream cuts the slow reader
off, the WebSocket closes 3008, as on a socket. A write while nothing is
blocked goes out whole, however large (as a socket takes a large write into
its kernel buffer). So a connection holds at most twice the limit plus one
write: what waits, and the batch the blocked ``send`` was given.

**WebSocket.** The ASGI server frames and answers pings; an
:class:`ASGIWebSocket` is the :class:`~tidings.centrifuge.session.SessionTransport`
of a :class:`~tidings.centrifuge.ClientSession`, as the native connection is:
the subprotocol picks the wire (``centrifuge-protobuf``: Protobuf in binary
messages), and a publication's ``websocket.send`` message is built once per
wire and shared by every subscriber (DESIGN principle 2). Its timers are the
native transport's wheel: the Centrifugo ping every ``websocket.ping_interval``,
close 3012 without pong, 3502 without connect in ``websocket.connect_timeout``;
a send queue over ``limits.max_write_buffer`` closes with 3008.

What the native listener bounds and an ASGI server does not let an app
bound: the WebSocket message size is checked after the server buffered it
(set uvicorn's ``--ws-max-size`` to ``websocket.max_message_size``), and a
client that never reads keeps its socket and the server's buffer until the
ASGI server notices (uvicorn has no write timeout). See docs/asgi.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, ClassVar, cast

import httptools

from .centrifuge import ClientSession
from .centrifuge.protobuf import PROTOBUF
from .centrifuge.session import CLIENT_WENT_AWAY, NO_REQUEST_CONTEXT, RequestContext
from .centrifuge.wire import JSON, Wire
from .connections import Admission
from .errors import DisconnectCode, ProtocolError
from .hooks import TransportName
from .http import Headers, Held, Request, Response, error_response
from .http.connection import _AT_CAPACITY, _EXPOSE_RETRY_AFTER
from .hub import Publication
from .logs import log_client_error
from .server import Server
from .transports.websocket import PATH as WEBSOCKET_PATH
from .transports.websocket import WIRES, WebSocketTransport, request_context

__all__ = ["ASGIApp", "ASGIExchange", "ASGIWebSocket"]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: The most bytes a streaming handler may write before its response head ends.
_MAX_HEAD = 16384

#: Response headers an ASGI server writes itself (or must not get, on HTTP/2).
_HOP_BY_HOP = frozenset({b"connection", b"content-length", b"transfer-encoding", b"keep-alive"})

#: Seconds a request cancelled by the ASGI server gets to end as a graceful shutdown would.
_WIND_DOWN = 1.0

#: The end of an HTTP response body.
_BODY_END: Message = {"type": "http.response.body", "body": b"", "more_body": False}


# -- HTTP ----------------------------------------------------------------------


class Phase(enum.Enum):
    """Where one ASGI HTTP request is; :data:`PHASES` says where it may go next."""

    #: The handler runs.
    HANDLING = "handling"
    #: The handler will answer later (a held long-poll).
    HOLDING = "holding"
    #: A response is being sent; done when it is.
    ANSWERING = "answering"
    #: The handler took the exchange over as a stream transport (SSE).
    STREAMING = "streaming"
    #: The stream was closed: what is queued is sent, then the body ends.
    CLOSING = "closing"
    #: Answered, cut off, or the client is gone: nothing more is sent.
    DONE = "done"


PHASES: dict[Phase, frozenset[Phase]] = {
    Phase.HANDLING: frozenset({Phase.HOLDING, Phase.ANSWERING, Phase.STREAMING, Phase.DONE}),
    Phase.HOLDING: frozenset({Phase.ANSWERING, Phase.DONE}),
    Phase.ANSWERING: frozenset({Phase.DONE}),
    Phase.STREAMING: frozenset({Phase.CLOSING, Phase.DONE}),
    Phase.CLOSING: frozenset({Phase.DONE}),
    Phase.DONE: frozenset(),
}


class ASGIExchange:
    """One ASGI HTTP request: its handler's :class:`~tidings.http.Exchange`,
    and after :meth:`detach` the ``asyncio.Transport`` of the stream that took it over."""

    __slots__ = (
        "_app",
        "_head",
        "_held",
        "_high",
        "_in_flight",
        "_paused",
        "_pending",
        "_pending_size",
        "_phase",
        "_protocol",
        "_reply_to",
        "_send",
        "_started",
        "_unchunk",
        "_writer",
        "client",
        "transport",
    )

    def __init__(self, app: ASGIApp, send: Send, client: tuple[str, int] | None) -> None:
        self._app = app
        self._send = send
        self._phase = Phase.HANDLING
        self.client = client
        #: Itself: the transport a stream handler writes to before and after detach.
        self.transport: asyncio.Transport | None = cast(asyncio.Transport, self)
        self._held: Held | None = None
        self._reply_to: tuple[bool, list[tuple[str, str]]] | None = None
        self._protocol: asyncio.Protocol | None = None
        self._pending: list[bytes] = []
        #: Bytes queued, and bytes ``send`` was given and has not returned from.
        self._pending_size = 0
        self._in_flight = 0
        self._high = app.server.config.limits.max_write_buffer
        self._paused = False
        self._head = b""
        self._started = False
        self._unchunk: _ResponseReader | None = None
        self._writer: asyncio.Task[None] | None = None

    def _enter(self, phase: Phase) -> None:
        if phase not in PHASES[self._phase]:
            raise RuntimeError(f"ASGIExchange: {self._phase.name} -> {phase.name}")
        self._phase = phase

    # -- Exchange ------------------------------------------------------------

    def hold(self, held: Held, request: Request) -> None:
        """The handler answers later through :meth:`respond_held`."""
        self._enter(Phase.HOLDING)
        self._held = held
        self._reply_to = (request.method == "HEAD", self._app.server.cors.headers(request))

    def respond_held(self, response: Response) -> None:
        """Send the held answer (from the waiter's callback: the send runs in a task)."""
        reply_to, self._reply_to = self._reply_to, None
        self._held = None
        if reply_to is None or self._phase is not Phase.HOLDING:
            return
        self._enter(Phase.ANSWERING)
        head, extra = reply_to
        self._writer = asyncio.get_running_loop().create_task(
            self._answer(response, head=head, extra=extra)
        )

    def detach(self) -> asyncio.Transport:
        """The stream handler takes the exchange over; it stops counting as a request
        (the stream's own registry counts it, as after a native detach)."""
        self._enter(Phase.STREAMING)
        self._app.server.connections.discard(self)
        return cast(asyncio.Transport, self)

    def shutdown(self) -> None:
        """Graceful shutdown: a held answer is given now; a request in flight finishes."""
        if self._held is not None:
            self._held.answer_now()

    # -- answering -----------------------------------------------------------

    async def respond(self, request: Request, response: Response) -> None:
        """Answer the request now."""
        self._enter(Phase.ANSWERING)
        await self._answer(
            response, head=request.method == "HEAD", extra=self._app.server.cors.headers(request)
        )

    async def _answer(
        self, response: Response, *, head: bool, extra: list[tuple[str, str]]
    ) -> None:
        server = self._app.server
        try:
            await self._send(_start_message(response, extra, server.stopping))
            if server.site.metrics is not None:
                server.site.metrics.responded(response.status)  # as the native connection counts
            body = response.body
            await self._send({"type": "http.response.body", "body": b"" if head else body})
        except Exception as exc:  # the ASGI server's way of saying the client is gone
            log.debug("answer to %s not sent: %r", self.client, exc)
        finally:
            self._writer = None
            if self._phase is not Phase.DONE:
                self._enter(Phase.DONE)

    async def watch(self, receive: Receive) -> None:
        """Wait until the response is complete or the client gone, whichever first.

        An ASGI server reports both as ``http.disconnect`` (uvicorn and
        hypercorn send it once the response is complete). A client gone while
        its answer is held releases the waiter; a stream's protocol is told
        its connection is lost, as a socket's would be.
        """
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except asyncio.CancelledError:
            _uncancel()
            await self._wind_down()
        finally:
            self._gone()

    async def _wind_down(self) -> None:
        """End the request as tidings' graceful shutdown would: a held long-poll is
        answered, a stream gets its ``retry:`` hint and its end, within a second."""
        held = self._held
        shutdown = getattr(self._protocol, "shutdown", None)
        if held is not None:
            held.answer_now()
        elif shutdown is not None and self._phase is Phase.STREAMING:
            shutdown()
        if self._writer is not None:
            await asyncio.wait([self._writer], timeout=_WIND_DOWN)

    def _gone(self) -> None:
        if self._phase is Phase.DONE:
            return
        held, self._held = self._held, None
        self._drop()
        if held is not None:
            held.cancel()

    def _drop(self) -> None:
        """Nothing more will be sent: forget the queue, tell the stream it is lost."""
        if self._phase is not Phase.DONE:
            self._enter(Phase.DONE)  # from any phase: answered, cut off, or the client is gone
        self._pending = []
        self._pending_size = 0
        writer = self._writer
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.connection_lost(None)

    # -- asyncio.Transport, for the stream after detach ----------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._phase is not Phase.STREAMING:
            return  # closing or gone: dropped, as a closing socket drops writes
        self._pending.append(bytes(data))
        self._pending_size += len(data)
        if self._in_flight and self._pending_size > self._high and not self._paused:
            self._paused = True
            if self._protocol is not None:
                self._protocol.pause_writing()  # the SSE stream cuts itself off here
        if self._writer is None and self._phase is Phase.STREAMING:
            self._writer = asyncio.get_running_loop().create_task(self._flush())

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def close(self) -> None:
        """Send what is queued, then end the body (the stream is over)."""
        if self._phase is not Phase.STREAMING:
            return
        self._enter(Phase.CLOSING)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._flush())

    def abort(self) -> None:
        """Cut the stream off: drop what is queued and release it at once.

        A socket would be reset. An ASGI app cannot reset; it ends the body
        after the chunk the server was last given (whole events, since each
        write is whole events), within ``timeouts.write``, and the client
        resumes from its last event id.
        """
        if self._phase not in (Phase.STREAMING, Phase.CLOSING):
            return
        blocked = self._writer
        self._drop()
        if self._started:
            self._writer = asyncio.get_running_loop().create_task(self._end_after(blocked))

    async def _end_after(self, blocked: asyncio.Task[None] | None) -> None:
        """End a cut-off stream's body once the send it was blocked on is cancelled."""
        try:
            if blocked is not None:
                await asyncio.wait([blocked])
            async with asyncio.timeout(self._app.server.config.timeouts.write):
                await self._send(_BODY_END)
        except Exception as exc:  # TimeoutError included
            log.debug("cut-off stream to %s not ended: %r", self.client, exc)
        finally:
            self._writer = None

    async def _flush(self) -> None:
        """Send what is queued, coalesced, until the queue is empty; end the body if closing."""
        try:
            while True:
                if self._pending:
                    chunks, self._pending = self._pending, []
                    self._in_flight, self._pending_size = self._pending_size, 0
                    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                    if not self._started:
                        data = await self._start(data)
                    elif self._unchunk is not None:
                        data = self._unchunk.unchunk(data)
                    if data:
                        await self._send(
                            {"type": "http.response.body", "body": data, "more_body": True}
                        )
                    self._in_flight = 0
                elif self._phase is Phase.CLOSING:
                    if not self._started:
                        await self._start(self._head + b"\r\n\r\n" if self._head else b"")
                    await self._send(_BODY_END)
                    self._drop()
                    return
                else:
                    return
        except Exception as exc:  # the ASGI server's way of saying the client is gone
            log.debug("stream to %s lost: %r", self.client, exc)
            self._drop()
        finally:
            if self._writer is asyncio.current_task():
                self._writer = None

    async def _start(self, data: bytes) -> bytes:
        """Send the response head the stream wrote; return the body bytes after it."""
        buffer = self._head + data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > _MAX_HEAD:
                raise ValueError(f"a stream wrote {len(buffer)} bytes without ending its head")
            self._head = buffer
            return b""
        self._head = b""
        self._started = True
        reader = _ResponseReader()
        await self._send(reader.start_message(buffer[: end + 4]))
        if reader.chunked:
            self._unchunk = reader  # kept only for a body that is chunked already
            return reader.unchunk(buffer[end + 4 :])
        return buffer[end + 4 :]

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol | None:
        return self._protocol

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is not None:
            self._high = high

    def get_write_buffer_size(self) -> int:
        return self._pending_size + self._in_flight

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._high // 4, self._high)

    def is_closing(self) -> bool:
        return self._phase is not Phase.STREAMING

    def can_write_eof(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.client if name == "peername" else default

    def pause_reading(self) -> None:
        """A stream reads nothing from its client."""

    def resume_reading(self) -> None:
        """A stream reads nothing from its client."""

    def is_reading(self) -> bool:
        return False


class _ResponseReader:
    """The response a stream handler writes to its socket, read back with httptools:
    its head's headers, less the framing ones (the ASGI server frames), and, when
    the handler chunks its body itself (Centrifugo's HTTP-stream emulation), the
    body without its chunk framing, which the ASGI server would otherwise double."""

    __slots__ = ("body", "chunked", "headers", "parser")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.chunked = False
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"transfer-encoding" and b"chunked" in value.lower():
            self.chunked = True
        if name not in _HOP_BY_HOP:
            self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def start_message(self, head: bytes) -> Message:
        """Read the head: ``http.response.start``."""
        self.parser.feed_data(head)
        return {
            "type": "http.response.start",
            "status": self.parser.get_status_code(),
            "headers": self.headers,
        }

    def unchunk(self, data: bytes) -> bytes:
        """The content of chunked body bytes (whole chunks or not)."""
        self.parser.feed_data(data)
        body, self.body = self.body, []
        return b"".join(body)


def _start_message(response: Response, extra: list[tuple[str, str]], stopping: bool) -> Message:
    """``http.response.start`` for ``response``: what ``Response.encode`` writes on a
    socket, less ``Date`` and ``Server``, which the ASGI server adds."""
    if extra and response.status == 503:
        extra = [*extra, _EXPOSE_RETRY_AFTER]  # the native connection's rule, same constant
    headers = [
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in (*response.headers, *extra)
    ]
    headers.append((b"content-length", b"%d" % len(response.body)))
    if response.close or stopping:
        headers.append((b"connection", b"close"))
    return {"type": "http.response.start", "status": response.status, "headers": headers}


# -- WebSocket -------------------------------------------------------------------

# Connection states, as the native connection's: open; close sent; gone.
_OPEN, _CLOSING, _CLOSED = 0, 1, 2


def _text_push(pub: Publication) -> Message:
    """A publication's JSON push as the message every JSON subscriber is sent."""
    return {"type": "websocket.send", "text": pub.encoded(JSON.push).decode()}


def _binary_push(pub: Publication) -> Message:
    """A publication's Protobuf push as the message every Protobuf subscriber is sent."""
    return {"type": "websocket.send", "bytes": pub.encoded(PROTOBUF.push)}


#: Per wire: the key of ``pub.encoded`` giving the shared send message (one
#: dict per publication and wire, built by the first subscriber), and the ping.
_PUSHES: dict[Wire, Callable[[Publication], Message]] = {JSON: _text_push, PROTOBUF: _binary_push}
_PINGS: dict[Wire, Message] = {
    JSON: {"type": "websocket.send", "text": JSON.ping.decode()},
    PROTOBUF: {"type": "websocket.send", "bytes": PROTOBUF.ping},
}


class ASGIWebSocket:
    """One Centrifugo client over an ASGI WebSocket: holds its session, as
    :class:`~tidings.transports.websocket.WebSocketConnection` does.

    It is a member of the native transport's timer wheel (``_deadline``,
    ``_slot``, :meth:`ping`, :meth:`_pong_late`, :meth:`deadline_passed`,
    :meth:`close` are what the wheel uses), so pings, pong and connect
    deadlines are the native ones, without a timer per connection.
    """

    __slots__ = (
        "_ctx",
        "_deadline",
        "_high",
        "_in_flight",
        "_pending",
        "_pending_size",
        "_ping_at",
        "_push",
        "_request",
        "_send",
        "_slot",
        "_state",
        "_writer",
        "session",
    )

    transport_name: ClassVar[TransportName] = "websocket"

    def __init__(
        self, ctx: WebSocketTransport, send: Send, wire: Wire, request: RequestContext | None
    ) -> None:
        self._ctx = ctx
        self._send = send
        self._push = _PUSHES[wire]
        self._request = request
        self.session = ClientSession(ctx.hub, ctx.options, self, wire)
        self._state = _OPEN
        self._pending: list[Message] = []
        self._pending_size = 0
        self._in_flight = 0
        self._high = ctx.max_write_buffer
        self._writer: asyncio.Task[None] | None = None
        self._slot = -1
        self._ping_at = 0.0
        self._deadline = 0.0

    def __repr__(self) -> str:
        return f"<ASGIWebSocket {self.session.client_id or 'unconnected'}>"

    # -- SessionTransport ------------------------------------------------------

    def write_publication(self, pub: Publication) -> None:
        """The fan-out path: the send message shared by every subscriber of this wire."""
        if self._state == _OPEN:
            message = cast(Message, pub.encoded(cast(Callable[[Any], bytes], self._push)))
            self._queue(message, len(message.get("text") or message["bytes"]))

    def write_payload(self, payload: bytes) -> None:
        if self._state == _OPEN:
            if self.session.wire.binary:
                self._queue({"type": "websocket.send", "bytes": payload}, len(payload))
            else:
                self._queue({"type": "websocket.send", "text": payload.decode()}, len(payload))

    def pong(self) -> None:
        self._ping_at = 0.0

    def close(self, code: int, reason: str) -> None:
        """Leave every channel and send the close (the ASGI server does the handshake)."""
        if self._state != _OPEN:
            return
        self._state = _CLOSING
        self.session.release(code, reason)
        self._queue({"type": "websocket.close", "code": int(code), "reason": reason}, 0)
        self._ctx.closing(self._member)
        log.debug("closing %r: %d %s", self, code, reason)

    def request_context(self) -> RequestContext:
        """The opening request's headers and cookies, for the ``connect`` hook."""
        return self._request or NO_REQUEST_CONTEXT

    def shutdown(self) -> None:
        """Graceful server shutdown: clients reconnect (to another node) and recover."""
        self.close(DisconnectCode.SHUTDOWN, "shutdown")

    # -- the wheel's calls -------------------------------------------------------

    @property
    def _member(self) -> Any:
        """Itself, as the wheel's (typed for the native connection) member."""
        return self

    def ping(self, now: float) -> None:
        if self._state != _OPEN:
            return
        self.session.check_expiry()
        if self._state != _OPEN:
            return
        if self._ping_at:
            if self._pong_late(now):
                self.close(DisconnectCode.NO_PONG, "no pong")
            return
        self._ping_at = now
        self._queue(_PINGS[self.session.wire], 1)

    def _pong_late(self, now: float) -> bool:
        return bool(self._ping_at) and now - self._ping_at >= self._ctx.pong_timeout

    def deadline_passed(self) -> None:
        if self._state == _OPEN:
            self.close(DisconnectCode.STALE, "stale")
        else:
            # The close did not get through in time (a client not reading): give
            # up what is queued; the ASGI server's own close timeout ends the rest.
            self._ctx.watched.discard(self._member)
            self._stop_writing()

    # -- the connection ----------------------------------------------------------

    async def serve(self, receive: Receive) -> None:
        """Read messages until the client or the ASGI server ends the connection."""
        ctx = self._ctx
        ctx.add(self._member)
        max_size = ctx.max_message_size
        try:
            while True:
                message = await receive()
                kind = message["type"]
                if kind == "websocket.receive":
                    if self._state != _OPEN:
                        continue
                    data = message.get("bytes")
                    if data is None:
                        data = (message.get("text") or "").encode()
                    if len(data) > max_size:
                        log_client_error(log, "closing %r: a message over %d bytes", self, max_size)
                        self.close(1009, "message too big")
                        continue
                    await self._on_message(data)
                elif kind == "websocket.disconnect":
                    return
        except asyncio.CancelledError:
            _uncancel()
            self.shutdown()
            if self._writer is not None:
                await asyncio.wait([self._writer], timeout=_WIND_DOWN)
        finally:
            self._lost()

    async def _on_message(self, payload: bytes) -> None:
        self._ping_at = 0.0  # any message shows the client is alive
        session = self.session
        if payload == session.wire.ping and session.client_id:
            return  # the answer to our ping
        try:
            disconnect = await session.handle(payload)
        except Exception:  # handle() answers errors itself: this is a bug of ours
            log.exception("websocket connection %r failed", self)
            self.close(DisconnectCode.INTERNAL, "internal server error")
            return
        if disconnect is not None:
            log_client_error(
                log, "disconnecting %r: %d %s", self, disconnect.code, disconnect.reason
            )
            self.close(disconnect.code, disconnect.reason)
        elif self._slot < 0 and session.client_id and self._state == _OPEN:
            self._ctx.activate(self._member)

    def _lost(self) -> None:
        if self._state == _CLOSED:
            return
        if self._state == _OPEN:
            self.session.release(*CLIENT_WENT_AWAY)
        self._state = _CLOSED
        self._stop_writing()
        self._ctx.remove(self._member)

    # -- sending -------------------------------------------------------------------

    def _queue(self, message: Message, size: int) -> None:
        self._pending.append(message)
        self._pending_size += size
        if self._in_flight and self._pending_size > self._high and self._state == _OPEN:
            # The client reads slower than we publish: close, as the native
            # connection does past the same bound; it reconnects and recovers.
            log_client_error(
                log,
                "closing %r: send queue over %d bytes",
                self,
                self._high,
                fields=self.session.log_fields(code=int(DisconnectCode.SLOW)),
            )
            self._ctx.metrics.slow("websocket")
            self.close(DisconnectCode.SLOW, "slow")
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                self._in_flight, self._pending_size = self._pending_size, 0
                for message in batch:
                    await self._send(message)
                self._in_flight = 0
        except Exception as exc:  # the ASGI server's way of saying the client is gone
            log.debug("%r: send failed: %r", self, exc)
            self._pending = []
        finally:
            self._writer = None

    def _stop_writing(self) -> None:
        self._pending = []
        self._pending_size = 0
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.cancel()


def _uncancel() -> None:
    """Take back the cancellation an ASGI server sends to requests still open at its
    graceful-shutdown timeout (uvicorn's ``--timeout-graceful-shutdown``, hypercorn's
    ``--graceful-timeout``): the request then ends as tidings' own shutdown ends it,
    within :data:`_WIND_DOWN`, and returns, instead of raising into the server (which
    logs every open stream as an exception with its traceback)."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def _select_wire(offered: list[str]) -> Wire | None:
    """The first wire format the client offers (an empty offer is none: some
    centrifuge-js builds send one); None, JSON without a subprotocol, when none."""
    return next((WIRES[name] for name in offered if name in WIRES), None)


# -- the application -------------------------------------------------------------


class ASGIApp:
    """An ASGI 3 application serving one :class:`~tidings.server.Server` (module docstring).

    ``server`` is the server, or a function building it at each startup (so
    that a :class:`tidings.Tidings` builds it from the hooks registered by
    then); ``on_serving`` is told the server once it serves, and None before
    it stops (``rt.asgi()`` uses it so that ``rt.publish`` and the other
    operations reach the server while the ASGI server runs it).
    """

    def __init__(
        self,
        server: Server | Callable[[], Server],
        *,
        on_serving: Callable[[Server | None], None] | None = None,
    ) -> None:
        self._source = server
        self._server = server if isinstance(server, Server) else None
        self._on_serving = on_serving
        #: Whether the server runs (between lifespan startup and shutdown).
        self.started = False

    @property
    def server(self) -> Server:
        """The server (RuntimeError before the first startup when built by a function)."""
        if self._server is None:
            raise RuntimeError("the ASGI app has not started: no lifespan startup yet")
        return self._server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    # -- lifespan ------------------------------------------------------------------

    async def startup(self) -> None:
        """Start the server without its listener: the ASGI server listens."""
        if self.started:
            raise RuntimeError("the ASGI app is already started")
        source = self._source
        server = self._server = source if isinstance(source, Server) else source()
        try:
            await server.start_services()
        except BaseException:
            await server.shutdown()
            raise
        self.started = True
        if self._on_serving is not None:
            self._on_serving(server)
        log.info("tidings serving through ASGI")

    async def shutdown(self) -> None:
        """The server's graceful shutdown (streams told to come back, WebSockets 3001)."""
        if not self.started:
            return
        self.started = False
        if self._on_serving is not None:
            self._on_serving(None)
        server = self.server
        await server.shutdown()
        await server.hooks.drain(server.config.timeouts.shutdown)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ASGIApp]:
        """``async with app.running():`` in a host's lifespan that does not pass
        lifespan events to a mounted app."""
        await self.startup()
        try:
            yield self
        finally:
            await self.shutdown()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("tidings failed to start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- HTTP ----------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = _request(scope, scope["method"])
        if not self.started:
            refusal = error_response(503, "tidings is not started (docs/asgi.md: the lifespan)")
            await send(_start_message(refusal, [], stopping=True))
            await send({"type": "http.response.body", "body": refusal.body})
            return
        exchange = ASGIExchange(self, send, request.client)
        server = self.server
        connections = server.connections
        if connections.admit(exchange) is not Admission.ADMITTED:
            connections.discard(exchange)
            await exchange.respond(request, _AT_CAPACITY)
            return
        try:
            response: Response | None = await self._read_body(request, receive)
            if response is None:
                response = await self._handle(request, exchange)
            if response is not None:
                await exchange.respond(request, response)
            elif exchange._phase is Phase.HANDLING:
                log.error("handler of %r answered nothing", request)
                await exchange.respond(request, error_response(500, "internal server error"))
            else:
                del request, response  # a stream's or a held poll's frame keeps neither
                await exchange.watch(receive)
        finally:
            connections.discard(exchange)

    async def _read_body(self, request: Request, receive: Receive) -> Response | None:
        """Read the body into ``request``; a refusal when it is too large or too slow."""
        limits, timeouts = self.server.config.limits, self.server.config.timeouts
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_size:
            return _refuse(request, 413, f"request body larger than {limits.max_body_size} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(timeouts.request):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        break  # the client is gone; the answer goes nowhere
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limits.max_body_size:
                        return _refuse(
                            request, 413, f"request body larger than {limits.max_body_size} bytes"
                        )
                    if chunk:
                        chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            return _refuse(request, 408, f"request not received within {timeouts.request:g}s")
        request.body = b"".join(chunks)
        return None

    async def _handle(self, request: Request, exchange: ASGIExchange) -> Response | None:
        """The router's answer, as the native connection dispatches it."""
        server = self.server
        if request.method == "OPTIONS":
            return server.cors.preflight(request, server.router)
        route = server.router.resolve(request)
        if isinstance(route, Response):
            return route
        try:
            outcome = route(request, exchange)
            if outcome is None or isinstance(outcome, Response):
                return outcome  # answered without waiting (routing.Handler)
            return await outcome
        except ProtocolError as exc:
            return error_response(exc)
        except Exception:
            log.exception("handler failed on %r", request)
            return error_response(500, "internal server error")

    # -- WebSocket -------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        request = _request(scope, "GET")
        if not self.started:
            log_client_error(log, "websocket refused for %s: not started", request.client)
            await send({"type": "websocket.close", "code": 1013, "reason": "not started"})
            return
        server = self.server
        ctx = server.websocket
        refusal = ""
        if server.stopping:
            refusal = "not serving"
        elif request.path != WEBSOCKET_PATH:
            refusal = f"no websocket endpoint at {request.path}"
        elif not server.cors.allows_websocket(request):
            refusal = "origin not allowed"
        if refusal:
            log_client_error(log, "websocket refused for %s: %s", request.client, refusal)
            await send({"type": "websocket.close", "code": 1008, "reason": refusal})
            return
        wire = _select_wire([p for p in scope.get("subprotocols", ()) if p.strip()])
        context = request_context(request, "websocket") if ctx.hooks.connect else None
        conn = ASGIWebSocket(ctx, send, wire or JSON, context)
        connections = server.connections
        try:
            if connections.admit(conn) is not Admission.ADMITTED:
                await send({"type": "websocket.close", "code": 1013, "reason": "at capacity"})
                return
            subprotocol = wire.subprotocol if wire else None
            await send({"type": "websocket.accept", "subprotocol": subprotocol})
            del request  # a long-lived frame: the connect hook has its context already
            await conn.serve(receive)
        finally:
            connections.discard(conn)


def _request(scope: Scope, method: str) -> Request:
    """An ASGI scope as the :class:`~tidings.http.Request` the handlers take.

    The path is relative to where the app is mounted (``root_path``); the
    query string is decoded leniently, as the native connection decodes the
    target (``Request.query`` refuses what is not UTF-8).
    """
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    query_bytes: bytes = scope.get("query_string", b"")
    raw_path: bytes = scope.get("raw_path") or path.encode("utf-8")
    target = raw_path + b"?" + query_bytes if query_bytes else raw_path
    client = scope.get("client")
    return Request(
        method=method,
        target=target,
        path=path,
        query=query_bytes.decode("utf-8", "replace"),
        headers=Headers([(name.lower(), value) for name, value in scope["headers"]]),
        client=(client[0], client[1]) if client else None,
        keep_alive=True,
    )


def _refuse(request: Request, status: int, message: str) -> Response:
    log_client_error(
        log,
        "refusing request from %s: %d %s",
        request.client,
        status,
        message,
        level=logging.INFO,
    )
    return error_response(status, message, close=True)
