"""Centrifugo's bidirectional emulation: the fallback of centrifuge-js where
WebSocket is blocked (a proxy that refuses upgrades).

Three endpoints make one Centrifugo session out of plain HTTP:

* ``POST /connection/http_stream`` — the body is the client's first commands
  (its ``connect``); the response is a stream of replies and pushes, one
  JSON message per line, in HTTP/1.1 chunks.
* ``GET /connection/sse?cf_connect=<commands>`` — the same with the first
  commands in the URL (``EventSource`` cannot POST); each message batch is
  one ``data:`` event.
* ``POST /emulation`` — ``{"session": .., "node": .., "data": "<commands>"}``:
  every later command of a session, found by the secret ``session`` id its
  connect reply carried.

The session behind a stream is the same :class:`~tidings.centrifuge.ClientSession`
as a WebSocket's (connect, subscribe with recovery, publish, presence,
refresh, expiry): :class:`EmulatedStream` is only another
:class:`~tidings.centrifuge.SessionTransport`, writing what the session says
onto an HTTP response instead of into WebSocket frames. Bounds are the
WebSocket's: ``websocket.max_message_size`` on every command payload (413),
``limits.max_write_buffer`` on what a stream holds unsent (then it is cut
with 3008 and the client recovers from history), ``websocket.ping_interval``
for the server's pings, answered by a pong posted to ``/emulation``.

Encode once (DESIGN principle 2): a publication's push line is framed once
per stream kind (:func:`stream_push`, :func:`sse_push` are the keys of
``pub.encoded``), so every emulated subscriber of a kind gets the same bytes.

No sticky sessions: a post for a session this process does not hold, naming
another node (the ``node`` of the connect reply), is handed to that node
through the broker (:meth:`~tidings.brokers.base.Broker.send_node`: a
per-node Redis pub/sub channel or NATS subject), which submits it to the
session. The memory broker is one process: there such a post is a 404.

A stream or post sent as ``application/octet-stream`` speaks Protobuf
(centrifuge-js's Protobuf build; http_stream only): length-delimited commands,
replies and pushes, and a Protobuf ``EmulationRequest`` as the post.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import msgspec
from google.protobuf.message import DecodeError as ProtobufDecodeError

from ..auth import Access
from ..brokers import Broker
from ..centrifuge import ClientSession, SessionOptions, protobuf, schema
from ..centrifuge import client_pb2 as pb
from ..centrifuge.protobuf import PROTOBUF
from ..centrifuge.schema import push_json
from ..centrifuge.session import (
    CLIENT_WENT_AWAY,
    NO_REQUEST_CONTEXT,
    Refreshes,
    RequestContext,
)
from ..centrifuge.wire import JSON, Wire
from ..config import LimitsConfig, WebSocketConfig
from ..connections import Connections
from ..errors import BrokerUnavailable, DisconnectCode
from ..gate import Gate
from ..hooks import Hooks, TransportName
from ..http import Response, Router, error_response
from ..http.cors import CORS
from ..hub import Hub, Publication
from ..logs import log_client_error
from ..metrics import Metrics
from ..utf8 import check_utf8
from .websocket import request_context

if TYPE_CHECKING:
    from ..http import Exchange, Request

__all__ = [
    "EMULATION_PATH",
    "HTTP_STREAM_PATH",
    "SSE_PATH",
    "EmulatedStream",
    "EmulationTransport",
    "sse_push",
    "stream_push",
]

log = logging.getLogger(__name__)

HTTP_STREAM_PATH = "/connection/http_stream"
SSE_PATH = "/connection/sse"
EMULATION_PATH = "/emulation"

#: Command payloads of one session waiting for the one running; past it a
#: post is answered 429 (a client sends one post per batch of commands).
MAX_QUEUED_PAYLOADS = 16


def _chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk (RFC 9112 §7.1)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def _sse_event(payload: bytes) -> bytes:
    """One ``data:`` event; a batch's lines become the event's lines (its data
    is then the batch, ``\\n``-joined, as a WebSocket frame would carry it)."""
    return b"data: " + payload.replace(b"\n", b"\ndata: ") + b"\n\n"


def stream_push(pub: Publication) -> bytes:
    """``pub``'s push as an http_stream line in its chunk; cached per publication."""
    return _chunk(pub.encoded(push_json) + b"\n")


def protobuf_stream_push(pub: Publication) -> bytes:
    """``pub``'s length-delimited Protobuf push in its chunk; cached per publication."""
    return _chunk(pub.encoded(PROTOBUF.push))


def sse_push(pub: Publication) -> bytes:
    """``pub``'s push as an SSE event; cached per publication."""
    return _sse_event(pub.encoded(push_json))


def _stream_frame(payload: bytes) -> bytes:
    return _chunk(payload + b"\n")


#: The push that ends an emulated session in each format (a stream has no close code).
_DISCONNECT_PUSH = {JSON: schema.disconnect_push, PROTOBUF: protobuf.disconnect_push}


class EmulationRequest(msgspec.Struct, forbid_unknown_fields=False):
    """The body of ``POST /emulation`` (centrifuge-js: ``{session, node, data}``)."""

    session: str
    data: str
    node: str = ""


class RoutedPost(msgspec.Struct, array_like=True):
    """A post handed to the node holding its session (bytes: Protobuf data too)."""

    session: str
    data: bytes


class _Post(NamedTuple):
    """``POST /emulation`` decoded, whatever its format."""

    session: str
    node: str
    data: bytes


def _wire_of(request: Request) -> Wire:
    """centrifuge-js's Protobuf build posts ``application/octet-stream``."""
    content_type = request.headers.get("content-type") or ""
    return PROTOBUF if "octet-stream" in content_type else JSON


def _decode_post(body: bytes, wire: Wire) -> _Post:
    """The body as JSON (``data`` a string of commands) or as Protobuf's
    ``EmulationRequest`` (``data`` the length-delimited commands)."""
    if wire is PROTOBUF:
        message = pb.EmulationRequest()
        message.ParseFromString(body)
        return _Post(message.session, message.node, message.data)
    check_utf8(body)
    request = _decode_request.decode(body)
    return _Post(request.session, request.node, request.data.encode())


_decode_request = msgspec.json.Decoder(EmulationRequest)
_decode_routed = msgspec.json.Decoder(RoutedPost)
_encode_routed = msgspec.json.Encoder().encode

#: The longest node name a post may route to (node ids are 16 hex digits).
_MAX_NODE_LENGTH = 64

# Stream states: open; ending (the last bytes are written, the socket closes); gone.
_OPEN, _ENDING, _CLOSED = 0, 1, 2


class EmulatedStream(asyncio.Protocol):
    """One emulated session's response stream: the session's transport.

    Commands come from the request that opened the stream and from later
    ``/emulation`` posts; they run in order in one short-lived task at a
    time (they may await the hub), as a WebSocket's messages do.
    """

    __slots__ = (
        "_ctx",
        "_frame",
        "_ping_at",
        "_push",
        "_queue",
        "_state",
        "_task",
        "session",
        "transport",
    )

    def __init__(
        self, ctx: EmulationTransport, transport: asyncio.Transport, sse: bool, wire: Wire = JSON
    ) -> None:
        self._ctx = ctx
        self.transport = transport
        self._frame: Callable[[bytes], bytes]
        self._push: Callable[[Publication], bytes]
        if wire is PROTOBUF:
            self._frame = _chunk
            self._push = protobuf_stream_push
        else:
            self._frame = _sse_event if sse else _stream_frame
            self._push = sse_push if sse else stream_push
        self.session = ClientSession(
            ctx.hub, ctx.options, self, wire, session_id=secrets.token_urlsafe(24)
        )
        self._state = _OPEN
        self._ping_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._queue: deque[bytes] | None = None

    def __repr__(self) -> str:
        return f"<EmulatedStream {self.session.client_id or 'unconnected'}>"

    @property
    def transport_name(self) -> TransportName:
        """Centrifugo's names: ``http_stream``, or ``sse`` as ``sse_emulation``
        (not to be confused with tidings' own SSE transport)."""
        return "sse_emulation" if self._frame is _sse_event else "http_stream"

    def request_context(self) -> RequestContext:
        """The opening request's headers and cookies, for the ``connect`` hook:
        handed over once, since a stream's session connects once (or ends)."""
        requests = self._ctx.requests
        return requests.pop(self, NO_REQUEST_CONTEXT) if requests else NO_REQUEST_CONTEXT

    # -- SessionTransport -----------------------------------------------------

    def write_publication(self, pub: Publication) -> None:
        if self._state == _OPEN:
            self.transport.write(pub.encoded(self._push))

    def write_payload(self, payload: bytes) -> None:
        if self._state == _OPEN:
            self.transport.write(self._frame(payload))

    def pong(self) -> None:
        self._ping_at = 0.0

    def close(self, code: int, reason: str) -> None:
        """Tell the client why in a ``disconnect`` push (a stream has no close
        code), end the response, and leave every channel."""
        if self._state != _OPEN:
            return
        self.transport.write(self._frame(_DISCONNECT_PUSH[self.session.wire](code, reason)))
        self._end(code, reason)
        log.debug("closing %r: %d %s", self, code, reason)

    def _end(self, code: int = CLIENT_WENT_AWAY[0], reason: str = CLIENT_WENT_AWAY[1]) -> None:
        self._state = _ENDING
        self.session.release(code, reason)
        self._queue = None
        self._ctx.forget(self)
        if self._frame is not _sse_event:
            self.transport.write(b"0\r\n\r\n")
        self.transport.close()

    # -- server hooks ---------------------------------------------------------

    def shutdown(self) -> None:
        self.close(DisconnectCode.SHUTDOWN, "shutdown")

    def ping(self, now: float) -> None:
        """The transport's periodic turn: expiry, the last ping's pong, the next ping."""
        if self._state != _OPEN or not self.session.client_id:
            return
        self.session.check_expiry()
        if self._state != _OPEN:
            return
        if self._ping_at:
            self.close(DisconnectCode.NO_PONG, "no pong")
            return
        self._ping_at = now
        self.transport.write(self._frame(self.session.wire.ping))

    # -- commands -------------------------------------------------------------

    def submit(self, payload: bytes) -> bool:
        """Run ``payload``'s commands after those before it; False when too many wait."""
        if self._state != _OPEN:
            return False
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(payload))
            return True
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        if len(queue) >= MAX_QUEUED_PAYLOADS:
            return False
        queue.append(payload)
        return True

    async def _run(self, payload: bytes) -> None:
        session = self.session
        try:
            while self._state == _OPEN:
                disconnect = await session.handle(payload)
                if disconnect is not None:
                    log_client_error(
                        log, "disconnecting %r: %d %s", self, disconnect.code, disconnect.reason
                    )
                    self.close(disconnect.code, disconnect.reason)
                    return
                if not session.client_id and self._state == _OPEN:
                    # The opening commands did not connect (the reply says why):
                    # a stream without a session has nothing more to carry.
                    self._end()
                    return
                queue = self._queue
                if not queue:
                    return
                payload = queue.popleft()
        except Exception:  # pragma: no cover - handle() answers errors itself
            log.exception("emulated session %r failed", self)
            self.close(DisconnectCode.INTERNAL, "internal server error")
        finally:
            self._task = None

    # -- asyncio.Protocol -------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Commands come by ``/emulation``; anything sent on the stream is ignored."""

    def eof_received(self) -> bool | None:
        return False  # the client went: close

    def pause_writing(self) -> None:
        # The client reads slower than we publish: past limits.max_write_buffer
        # it is cut off (it reconnects and recovers from history).
        if self._state == _OPEN:
            log_client_error(
                log, "closing %r: write buffer over %d bytes", self, self._ctx.max_write_buffer
            )
            self._state = _ENDING
            self._ctx.metrics.slow("emulation")
            self.session.release(DisconnectCode.SLOW, "slow")
            self._ctx.forget(self)
            self.transport.abort()

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self.session.release()
        self._queue = None
        self._ctx.forget(self)
        self._ctx.streams.discard(self)


class EmulationTransport:
    """The three emulation endpoints and this node's emulated sessions by id."""

    def __init__(
        self,
        hub: Hub,
        access: Access,
        cors: CORS,
        connections: Connections,
        ws: WebSocketConfig,
        limits: LimitsConfig,
        broker: Broker,
        node: str,
        *,
        hooks: Hooks | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.hub = hub
        self.metrics = metrics = metrics or Metrics()
        self.hooks = hooks = hooks or Hooks()
        #: Where the access rules and the application's hooks let clients in.
        self.gate = Gate(access, hooks)
        self.broker = broker
        self.node = node
        self.cors = cors
        self.connections = connections
        self.max_message_size = ws.max_message_size
        self.max_write_buffer = limits.max_write_buffer
        self.ping_interval = ws.ping_interval
        self.options = SessionOptions(
            access=access,
            ping_interval=max(1, round(ws.ping_interval)),
            node=node,
            gate=self.gate,
            refreshes=Refreshes(),
            metrics=metrics,
        )
        #: The opening request's headers, cookies and peer of each stream not
        #: yet connected, kept only while a ``connect`` hook is registered.
        self.requests: dict[EmulatedStream, RequestContext] = {}
        #: Streams of this node (the connection registry counts them).
        self.streams: set[EmulatedStream] = set()
        connections.include(self.streams)
        #: Open sessions by their secret id: where ``/emulation`` posts go.
        self.sessions: dict[str, EmulatedStream] = {}
        self._pinger: asyncio.Task[None] | None = None

    def mount(self, router: Router) -> None:
        router.add("POST", HTTP_STREAM_PATH, self.http_stream)
        router.add("GET", SSE_PATH, self.sse)
        router.add("POST", EMULATION_PATH, self.emulation)

    async def start(self) -> None:
        self._pinger = asyncio.get_running_loop().create_task(self._ping_forever())
        try:
            await self.broker.listen_node(self.node, self._from_another_node)
        except BrokerUnavailable as exc:
            log.warning("emulation: posts reaching other nodes cannot be routed here: %s", exc)

    async def stop(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pinger

    def forget(self, stream: EmulatedStream) -> None:
        """``stream`` takes no more commands."""
        if self.requests:
            self.requests.pop(stream, None)
        if self.sessions.get(stream.session.session_id) is stream:
            del self.sessions[stream.session.session_id]

    # -- endpoints --------------------------------------------------------------

    async def http_stream(self, request: Request, conn: Exchange) -> Response | None:
        return self._open(request, conn, request.body, sse=False, wire=_wire_of(request))

    async def sse(self, request: Request, conn: Exchange) -> Response | None:
        if request.method == "HEAD":  # the router hands a GET route its HEADs: no session
            return Response(200, headers=[("Content-Type", "text/event-stream; charset=utf-8")])
        commands = request.query_value("cf_connect")
        if commands is None:
            return error_response(400, "cf_connect (the connect command) is missing")
        return self._open(request, conn, commands.encode(), sse=True)

    def _open(
        self, request: Request, conn: Exchange, payload: bytes, *, sse: bool, wire: Wire = JSON
    ) -> Response | None:
        refused = self._check_payload(payload, wire)
        if refused is not None:
            log_client_error(log, "emulation stream refused for %s", request.client)
            return refused
        if self.connections.stopping:
            return error_response(503, "server shutting down")
        transport = conn.detach()
        stream = EmulatedStream(self, transport, sse, wire)
        if self.hooks.connect is not None:
            self.requests[stream] = request_context(
                request, "sse_emulation" if sse else "http_stream"
            )
        transport.set_protocol(stream)
        head = [
            b"HTTP/1.1 200 OK",
            b"Content-Type: text/event-stream; charset=utf-8"
            if sse
            else b"Content-Type: application/octet-stream"
            if wire is PROTOBUF
            else b"Content-Type: application/json",
            b"Cache-Control: no-cache",
            b"X-Accel-Buffering: no",
            b"Connection: close",
            *([] if sse else [b"Transfer-Encoding: chunked"]),
            *(f"{name}: {value}".encode("latin-1") for name, value in self.cors.headers(request)),
        ]
        transport.write(b"\r\n".join(head) + b"\r\n\r\n")
        transport.set_write_buffer_limits(high=self.max_write_buffer)
        self.streams.add(stream)
        self.sessions[stream.session.session_id] = stream
        self.metrics.connected("emulation")
        stream.submit(payload)
        return None

    def _check_payload(self, payload: bytes, wire: Wire = JSON) -> Response | None:
        """The one place a command payload's size and encoding are checked
        (Protobuf's string fields are checked by its decoder, in the session)."""
        if not (payload if wire is PROTOBUF else payload.strip()):
            return error_response(400, "no commands")
        if len(payload) > self.max_message_size:
            return error_response(413, f"commands larger than {self.max_message_size} bytes")
        if wire is JSON:
            try:
                check_utf8(payload)
            except UnicodeDecodeError:
                return error_response(400, "commands are not valid UTF-8")
        return None

    async def emulation(self, request: Request, conn: Exchange) -> Response:
        wire = _wire_of(request)
        try:
            post = _decode_post(request.body, wire)
        except (UnicodeDecodeError, msgspec.DecodeError, ProtobufDecodeError) as exc:
            log_client_error(log, "bad emulation request from %s: %s", request.client, exc)
            return error_response(400, "body must be an EmulationRequest: {session, node, data}")
        refused = self._check_payload(post.data, wire)
        if refused is not None:
            log_client_error(log, "emulation commands refused for %s", request.client)
            return refused
        stream = self.sessions.get(post.session)
        if stream is None and post.node and post.node != self.node:
            return await self._route(request, post)
        if stream is None:
            log_client_error(
                log, "emulation request for an unknown session from %s", request.client
            )
            return error_response(404, "no such session on this node")
        if not stream.submit(post.data):
            return error_response(429, "too many commands waiting in this session")
        return Response(204)

    async def _route(self, request: Request, post: _Post) -> Response:
        """Hand a post on to the node holding its session, through the broker.

        The node is the client's word, so it is bounded like any input; the
        holding node checks the session. A node nobody listens as is a 404.
        """
        if len(post.node) > _MAX_NODE_LENGTH:
            return error_response(400, "node name too long")
        message = _encode_routed(RoutedPost(post.session, post.data))
        if not await self.broker.send_node(post.node, message):
            log_client_error(log, "emulation request for an unknown node from %s", request.client)
            return error_response(404, "no such session on this node")
        return Response(204)

    def _from_another_node(self, message: bytes) -> None:
        """A post another node received for a session of this one. Its size and
        encoding were checked there; what fails here is a session that ended
        meanwhile, or a full queue (the client's command then times out)."""
        try:
            routed = _decode_routed.decode(message)
        except msgspec.DecodeError as exc:
            log.warning("emulation: dropped a malformed routed message: %s", exc)
            return
        stream = self.sessions.get(routed.session)
        if stream is None or not stream.submit(routed.data):
            log.debug("emulation: a routed post found no session or a full queue")

    # -- pings ------------------------------------------------------------------

    async def _ping_forever(self) -> None:
        """One task pings every stream each ``websocket.ping_interval``; a stream
        whose previous ping got no pong by then is closed (3012)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.ping_interval)
            now = loop.time()
            for stream in tuple(self.streams):
                stream.ping(now)
