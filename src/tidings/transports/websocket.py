"""WebSocket transport: the thin asyncio shell around two sans-I/O objects.

The HTTP server hands over a socket whose request head asked for
``Upgrade: websocket`` (:meth:`WebSocketTransport.upgrade`, an upgrade route).
From there a
:class:`WebSocketConnection` *holds* a :class:`~tidings.frames.FrameReader`
(RFC 6455/7692 framing: bytes in, messages out) and a
:class:`~tidings.centrifuge.ClientSession` (the Centrifugo protocol: messages
in, replies out), and does only the I/O between them:

* **Handshake** — the ``websockets`` sans-I/O :class:`~websockets.server.ServerProtocol`
  checks the request (key, version, ``Origin`` allowlist, subprotocol,
  permessage-deflate negotiation) and builds the 101 response. The
  subprotocol picks the connection's wire format
  (:class:`~tidings.centrifuge.wire.Wire`): ``centrifuge-protobuf`` for
  Protobuf in binary frames (the mobile SDKs), ``centrifuge-json`` or none
  for JSON in text frames; the one chosen is echoed. An *empty*
  ``Sec-WebSocket-Protocol`` header, which some centrifuge-js builds send
  and which ``websockets`` rejects, is dropped first.
  The ``ServerProtocol`` object is then thrown away, for two reasons. It
  frames and compresses every message for its one connection, which rules
  out framing a publication once for all its subscribers (encode once,
  below). And kept, it would hold 1.8 KiB per connection (2.2 KiB with
  permessage-deflate; ``python bench/ws_protocol_memory.py``, tracemalloc over
  2,000 handshaken objects), nearly doubling a whole idle WebSocket
  connection (1.96 KiB of RSS, docs/benchmark-results.md), where a
  ``FrameReader`` holds a few integers.

* **Encode once** — a publication's push is encoded once per wire format
  and framed once per variant of it (plain, or deflated with one window
  size) by a :class:`PushEncoder`, via ``pub.encoded(encoder)``; every
  subscriber of that variant gets the same ``bytes`` object, so a delivery
  is one ``transport.write``.

* **Compression** — permessage-deflate is negotiated with
  ``server_no_context_takeover`` (each compressed message is a standalone
  deflate stream, so one frame decodes in every client) and
  ``client_no_context_takeover`` (RFC 7692 §7.1.1.2 lets a server require it;
  no decompressor outlives a message). The server window is whatever the
  client asked for (``server_max_window_bits``, 9 to 15; an offer of 8 is
  declined, zlib cannot produce it): one shared compressor per window size
  actually negotiated, so the server never uses a window it did not agree to
  (RFC 7692 §7.1.2.1). Frames under ``websocket.compression_threshold`` bytes
  go uncompressed.

* **Timers** — no task and no timer per connection. One periodic callback per
  server walks a timing wheel: each tick pings one slot of connections with
  an empty message (``{}`` in JSON, an empty reply in Protobuf: one frame
  per format, the same bytes for everyone), closes those that did not answer
  the previous ping within ``websocket.pong_timeout`` (3012), and checks the few
  connections with a deadline: no ``connect`` within
  ``websocket.connect_timeout`` (3502), or a close handshake that did not
  finish within ``websocket.handshake_timeout`` (then the socket is aborted).

* **Bounds and errors** — every :class:`~tidings.frames.FrameError` (1002,
  1007, 1009: see :mod:`tidings.frames` for which byte decides what) becomes a
  close with its code in :meth:`WebSocketConnection._frame_error`; then
  nothing more is read and the socket is closed. A write buffer over
  ``limits.max_write_buffer`` closes with 3008 (the client reconnects and
  recovers from history).

Commands of a message run in a short-lived task (they may await the hub);
messages arriving meanwhile wait in a small queue, so commands run strictly in order.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import math
from base64 import b64decode
from collections import deque
from typing import TYPE_CHECKING, Any, ClassVar

from websockets.datastructures import Headers as WSHeaders
from websockets.extensions.permessage_deflate import (
    PerMessageDeflate,
    ServerPerMessageDeflateFactory,
)
from websockets.http11 import Request as WSRequest
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol
from websockets.utils import accept_key

from ..auth import Access
from ..centrifuge import ClientSession, Disconnect, SessionOptions
from ..centrifuge.protobuf import PROTOBUF
from ..centrifuge.session import (
    CLIENT_WENT_AWAY,
    NO_REQUEST_CONTEXT,
    Refreshes,
    RequestContext,
)
from ..centrifuge.wire import JSON, Wire
from ..config import LimitsConfig, WebSocketConfig
from ..connections import Connections
from ..errors import DisconnectCode
from ..frames import (
    CLOSE_NORMAL,
    OP_BINARY,
    OP_PONG,
    OP_TEXT,
    CloseReceived,
    Deflater,
    FrameError,
    FrameReader,
    Message,
    Ping,
    close_frame,
    frame,
)
from ..gate import Gate
from ..hooks import Hooks, TransportName
from ..http import Response, Router, error_response
from ..http.cors import CORS
from ..http.messages import http_date
from ..hub import Hub, Publication
from ..logs import log_client_error
from ..metrics import Metrics
from .common import connect_call

if TYPE_CHECKING:
    from ..http import Exchange, Request

__all__ = ["PATH", "SUBPROTOCOL", "PushEncoder", "WebSocketConnection", "WebSocketTransport"]

log = logging.getLogger(__name__)

#: The endpoint Centrifugo's SDKs connect to by default.
PATH = "/connection/websocket"


class _HandshakeLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The logger ``websockets`` writes handshakes to, one level quieter.

    It logs every handshake ("connection open") at INFO: for a server holding
    tens of thousands of connections that is noise, so INFO becomes DEBUG.
    It logs a client's bad handshake at DEBUG with a traceback: a client
    mistake gets a line, never a traceback, so that goes (the refusal itself
    is logged by :meth:`WebSocketTransport.upgrade`). Errors stay errors. A
    wrapper, not a level set on a logger at import: the application owns its
    logging configuration.
    """

    def info(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self.debug(msg, *args, **kwargs)

    def debug(self, msg: object, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("exc_info", None)
        super().debug(msg, *args, **kwargs)


_handshake_log = _HandshakeLog(logging.getLogger(f"{__name__}.handshake"))

SUBPROTOCOL = Subprotocol(JSON.subprotocol)
#: The wire format of each subprotocol a client may offer.
WIRES: dict[str, Wire] = {JSON.subprotocol: JSON, PROTOBUF.subprotocol: PROTOBUF}

_MAX_QUEUED_MESSAGES = 16  # messages waiting for the running commands before we stop reading

# Connection states: open; close frame sent (still reading, for the client's close);
# transport closing (nothing more is read); lost.
_OPEN, _CLOSING, _DRAINING, _CLOSED = 0, 1, 2, 3


#: ``Connection`` tokens of the handshakes :func:`plain_handshake` answers itself
#: (``Upgrade`` alone from most clients, with ``keep-alive`` from Firefox).
_CONNECTION_TOKENS = frozenset({b"upgrade", b"keep-alive"})
#: The wire of each subprotocol offer :func:`plain_handshake` answers itself.
_PLAIN_OFFERS: dict[bytes, Wire] = {name.encode(): wire for name, wire in WIRES.items()}


def plain_handshake(raw: list[tuple[bytes, bytes]], compression: bool) -> tuple[bytes, Wire] | None:
    """The 101 response and wire format of a plain, valid opening handshake, or
    None: then ``websockets``' :class:`~websockets.server.ServerProtocol` decides.

    Why by hand: building ``websockets``' ``Headers`` and ``ServerProtocol`` and
    running ``accept()`` was 17 % of the server's CPU in the WebSocket
    connection-rate benchmark (py-spy, N = 10,000: handshake + connect +
    subscribe), more than any other step but the two socket writes.

    It answers only the shape every client we know sends, and only when
    ``websockets`` would accept it with the same bytes (tests/test_websocket_handshake.py
    checks this against ``websockets``, example by example and with generated
    headers): exactly one of each of ``Upgrade`` (``websocket``, any case),
    ``Connection`` (``upgrade``, optionally with ``keep-alive``),
    ``Sec-WebSocket-Key`` (base64 of 16 bytes) and ``Sec-WebSocket-Version`` (13),
    at most one ``Origin`` (the CORS rule has already judged it), at most one
    non-empty ``Sec-WebSocket-Protocol`` naming exactly one wire format we
    speak, and no ``Sec-WebSocket-Extensions`` offer while compression is on
    (negotiating permessage-deflate stays with ``websockets``). Anything else,
    valid or not, goes to ``websockets``, which accepts it or refuses it with
    its precise status.
    """
    key = version = upgrade = connection = protocol = None
    origins = 0
    for name, value in raw:
        if not name.startswith((b"sec-websocket-", b"upgrade", b"connection", b"origin")):
            continue
        if name == b"sec-websocket-key":
            if key is not None:
                return None
            key = value
        elif name == b"sec-websocket-version":
            if version is not None:
                return None
            version = value
        elif name == b"upgrade":
            if upgrade is not None:
                return None
            upgrade = value
        elif name == b"connection":
            if connection is not None:
                return None
            connection = value
        elif name == b"sec-websocket-protocol":
            if not value.strip():
                continue  # an empty offer (centrifuge-js) is no offer
            if protocol is not None:
                return None
            protocol = value
        elif name == b"sec-websocket-extensions":
            if compression:
                return None
        elif name == b"origin":
            origins += 1
    if (
        key is None
        or version != b"13"
        or upgrade is None
        or upgrade.lower() != b"websocket"
        or connection is None
        or origins > 1
        or len(key) != 24
    ):
        return None
    tokens = [token.strip() for token in connection.lower().split(b",")]
    if b"upgrade" not in tokens or not _CONNECTION_TOKENS.issuperset(tokens):
        return None
    try:
        if len(b64decode(key, validate=True)) != 16:
            return None
    except binascii.Error:
        return None
    if protocol is None:
        wire, protocol_line = JSON, b""
    else:
        chosen = _PLAIN_OFFERS.get(protocol)
        if chosen is None:
            return None
        wire, protocol_line = chosen, b"Sec-WebSocket-Protocol: " + protocol + b"\r\n"
    head = b"".join(
        (
            b"HTTP/1.1 101 Switching Protocols\r\nDate: ",
            http_date().encode(),
            b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
            accept_key(key.decode()).encode(),
            b"\r\n",
            protocol_line,
            b"\r\n",
        )
    )
    return head, wire


class PushEncoder:
    """Frames for every connection of one wire variant: one wire format (JSON
    in text frames, Protobuf in binary ones), plain or deflated with one window.

    Instances are the keys of ``Publication.encoded``'s cache (they are
    callable), so a push is encoded once per format, framed once per variant
    and shared.
    """

    __slots__ = ("_deflater", "_opcode", "_plain", "_push", "_threshold", "ping_frame", "wire")

    def __init__(
        self,
        wire: Wire = JSON,
        deflater: Deflater | None = None,
        threshold: int = 0,
        plain: PushEncoder | None = None,
    ) -> None:
        self.wire = wire
        self._push = wire.push
        self._opcode = OP_BINARY if wire.binary else OP_TEXT
        self._deflater = deflater
        self._threshold = threshold
        # Pushes too small (or too random) to compress share the plain frame.
        self._plain = plain if plain is not None else self
        #: The server's ping in this format (the same bytes for every connection).
        self.ping_frame = frame(0x80 | self._opcode, wire.ping)

    def __call__(self, pub: Publication) -> bytes:
        if self._deflater is None:
            return frame(0x80 | self._opcode, pub.encoded(self._push))
        compressed = self._compress(pub.encoded(self._push))
        return compressed if compressed is not None else pub.encoded(self._plain)

    def message_frame(self, payload: bytes) -> bytes:
        """A frame for one connection (replies, per-connection pushes)."""
        compressed = self._compress(payload)
        return compressed if compressed is not None else frame(0x80 | self._opcode, payload)

    def _compress(self, payload: bytes) -> bytes | None:
        deflater = self._deflater
        if deflater is None or len(payload) < self._threshold:
            return None
        compressed = deflater.compress(payload)
        if len(compressed) >= len(payload):
            return None
        return frame(0xC0 | self._opcode, compressed)


class WebSocketTransport:
    """The WebSocket endpoint: what every connection shares — encoders, the timer
    wheel — and the registry of connections the wheel turns."""

    def __init__(
        self,
        hub: Hub,
        access: Access,
        cors: CORS,
        connections: Connections,
        ws: WebSocketConfig,
        limits: LimitsConfig,
        *,
        hooks: Hooks | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.hub = hub
        self.metrics = metrics = metrics or Metrics()
        self.hooks = hooks = hooks or Hooks()
        #: Where the access rules and the application's hooks let clients in.
        self.gate = Gate(access, hooks)
        self.cors = cors
        self.connections = connections
        self.loop: asyncio.AbstractEventLoop | None = None
        self.max_message_size = ws.max_message_size
        self.max_write_buffer = limits.max_write_buffer
        self.connect_timeout = ws.connect_timeout
        self.close_timeout = ws.handshake_timeout
        self.pong_timeout = ws.pong_timeout
        self.compression = ws.compression
        self.threshold = ws.compression_threshold
        self.options = SessionOptions(
            access=access,
            ping_interval=max(1, round(ws.ping_interval)),
            gate=self.gate,
            refreshes=Refreshes(),
            metrics=metrics,
        )
        #: The upgrade request's headers, cookies and peer of each connection
        #: not yet connected, kept only while a ``connect`` hook is registered
        #: (here, not in a slot: a server without hooks pays nothing for them).
        self.requests: dict[WebSocketConnection, RequestContext] = {}
        #: The plain (uncompressed) encoder of each wire format.
        self.plain = {wire: PushEncoder(wire) for wire in WIRES.values()}
        # One compressor per wire format and server window size in use (at most
        # 7 sizes: 9 to 15 bits).
        self._deflate_encoders: dict[tuple[Wire, int], PushEncoder] = {}
        # Timer wheel: a tick every `tick` seconds pings one slot.
        self.tick = max(0.05, min(1.0, ws.ping_interval, ws.pong_timeout / 2))
        self.slots: list[set[WebSocketConnection]] = [
            set() for _ in range(max(1, round(ws.ping_interval / self.tick)))
        ]
        self.slot_index = 0
        self.watched: set[WebSocketConnection] = set()  # connections with a deadline
        self.count = 0
        self._timer: asyncio.TimerHandle | None = None

    def mount(self, router: Router) -> None:
        router.add("GET", PATH, self._without_upgrade)
        router.add_upgrade(PATH, "websocket", self.upgrade)

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        """Stop the wheel (connections were closed by the graceful shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _without_upgrade(self, request: Request, conn: Exchange) -> Response:
        response = error_response(426, "this endpoint speaks WebSocket: send an Upgrade request")
        response.headers.append(("Upgrade", "websocket"))
        return response

    def deflate_encoder(self, window_bits: int, wire: Wire = JSON) -> PushEncoder:
        """The shared encoder of connections of ``wire`` whose server window is ``window_bits``."""
        encoder = self._deflate_encoders.get((wire, window_bits))
        if encoder is None:
            encoder = PushEncoder(wire, Deflater(window_bits), self.threshold, self.plain[wire])
            self._deflate_encoders[wire, window_bits] = encoder
        return encoder

    def upgrade(self, request: Request, transport: asyncio.Transport, rest: bytes) -> None:
        """Take over ``transport`` from the HTTP server: answer the handshake, then serve frames."""
        if not self.connections.stopping and self.cors.allows_websocket(request):
            plain = plain_handshake(request.headers.raw, self.compression)
            if plain is not None:
                head, wire = plain
                self._serve(
                    transport,
                    head,
                    rest,
                    request,
                    FrameReader(self.max_message_size),
                    self.plain[wire],
                )
                return
        self._negotiate(request, transport, rest)

    def _negotiate(self, request: Request, transport: asyncio.Transport, rest: bytes) -> None:
        """The handshakes :func:`plain_handshake` leaves to ``websockets``: it
        negotiates compression, and refuses what is invalid with its status."""
        handshake = handshake_protocol(self.compression, self.max_message_size)
        target = request.target.decode("latin-1")
        if self.connections.stopping:
            response = handshake.reject(503, "Server shutting down\n")
        elif not self.cors.allows_websocket(request):
            # Cross-site WebSocket hijacking: see tidings.http.cors for the rule.
            response = handshake.reject(403, "Origin not allowed\n")
        else:
            response = handshake.accept(WSRequest(target, handshake_headers(request.headers.raw)))
        handshake.send_response(response)
        head = b"".join(handshake.data_to_send())
        if response.status_code != 101:
            log_client_error(
                log,
                "websocket handshake refused (%d) for %s: %s",
                response.status_code,
                request.client,
                handshake.handshake_exc,
            )
            transport.write(head)
            transport.close()
            return
        wire = WIRES.get(handshake.subprotocol or "", JSON)
        negotiated = [ext for ext in handshake.extensions if isinstance(ext, PerMessageDeflate)]
        if negotiated:
            ext = negotiated[0]
            encoder = self.deflate_encoder(ext.local_max_window_bits, wire)
            reader = FrameReader(
                self.max_message_size, deflate=True, client_window_bits=ext.remote_max_window_bits
            )
        else:
            encoder = self.plain[wire]
            reader = FrameReader(self.max_message_size)
        self._serve(transport, head, rest, request, reader, encoder)

    def _serve(
        self,
        transport: asyncio.Transport,
        head: bytes,
        rest: bytes,
        request: Request,
        reader: FrameReader,
        encoder: PushEncoder,
    ) -> None:
        """Send the 101 ``head`` and serve the connection's frames from now on."""
        conn = WebSocketConnection(self, transport, reader, encoder)
        if self.hooks.connect is not None:
            self.requests[conn] = request_context(request, "websocket")
        transport.set_protocol(conn)
        transport.set_write_buffer_limits(high=self.max_write_buffer)
        transport.write(head)
        self.add(conn)
        resume = getattr(transport, "resume_reading", None)
        if resume is not None:
            resume()
        if rest:
            conn.data_received(rest)

    # -- registry and timers ------------------------------------------------

    def add(self, conn: WebSocketConnection) -> None:
        loop = self._loop()
        self.count += 1
        self.metrics.connected("websocket")
        self.connections.add(conn)
        conn._deadline = loop.time() + self.connect_timeout
        self.watched.add(conn)
        if self._timer is None:
            self._timer = loop.call_later(self.tick, self._on_tick)

    def _loop(self) -> asyncio.AbstractEventLoop:
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        return loop

    def activate(self, conn: WebSocketConnection) -> None:
        """``conn`` is connected: from waiting for connect to the ping wheel."""
        if self.requests:
            self.requests.pop(conn, None)
        self.watched.discard(conn)
        conn._deadline = 0.0  # the shared constant: an idle connection keeps no float
        # The slot pinged last: its next ping comes a whole interval from now.
        conn._slot = (self.slot_index - 1) % len(self.slots)
        self.slots[conn._slot].add(conn)

    def closing(self, conn: WebSocketConnection) -> None:
        if self.requests:
            self.requests.pop(conn, None)
        if conn._slot >= 0:
            self.slots[conn._slot].discard(conn)
            conn._slot = -1
        conn._deadline = self._loop().time() + self.close_timeout
        self.watched.add(conn)

    def remove(self, conn: WebSocketConnection) -> None:
        if self.requests:
            self.requests.pop(conn, None)
        self.count -= 1
        self.connections.discard(conn)
        self.watched.discard(conn)
        if conn._slot >= 0:
            self.slots[conn._slot].discard(conn)
            conn._slot = -1
        if self.count <= 0 and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_tick(self) -> None:
        loop = self._loop()
        self._timer = loop.call_later(self.tick, self._on_tick)
        now = loop.time()
        try:
            if self.watched:
                for conn in [c for c in self.watched if now >= c._deadline]:
                    conn.deadline_passed()
            slots = self.slots
            n = len(slots)
            self.slot_index = index = (self.slot_index + 1) % n
            # Pong deadlines of the slot pinged pong_timeout ago.
            lag = min(n - 1, math.ceil(self.pong_timeout / self.tick))
            if lag:
                for conn in [c for c in slots[(index - lag) % n] if c._pong_late(now)]:
                    conn.close(DisconnectCode.NO_PONG, "no pong")
            for conn in list(slots[index]):
                conn.ping(now)
        except Exception:  # pragma: no cover - the wheel must keep turning
            log.exception("websocket timer tick failed")


def handshake_protocol(compression: bool, max_size: int) -> ServerProtocol:
    """The ``websockets`` handshake of a request :func:`plain_handshake` does not answer."""
    extensions = None
    if compression:
        # server_max_window_bits left open: websockets then agrees to the
        # window the client asks for (9-15; it declines 8) and says so in the
        # response, and upgrade() picks the compressor of that window.
        extensions = [
            ServerPerMessageDeflateFactory(
                server_no_context_takeover=True, client_no_context_takeover=True
            )
        ]
    return ServerProtocol(
        extensions=extensions,
        subprotocols=[Subprotocol(name) for name in WIRES],
        select_subprotocol=_select_subprotocol,
        max_size=max_size,
        logger=_handshake_log,
    )


def handshake_headers(raw: list[tuple[bytes, bytes]]) -> WSHeaders:
    """The request's headers as ``websockets`` reads them, without an empty
    ``Sec-WebSocket-Protocol`` (some centrifuge-js builds send one, and
    ``websockets`` refuses it: an empty offer is no offer)."""
    headers = WSHeaders()
    for name, value in raw:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        if key == "sec-websocket-protocol" and not text.strip():
            continue
        headers[key] = text
    return headers


def request_context(request: Request, transport: TransportName) -> RequestContext:
    """What a ``connect`` hook will see of the request that opened a session
    (the HTTP transports' rule for headers, cookies and the peer)."""
    call = connect_call(request, transport, "")
    return RequestContext(call.headers, call.cookies, call.remote)


def _select_subprotocol(protocol: ServerProtocol, subprotocols: Any) -> Subprotocol | None:
    """The first wire format the client offers that we speak; None (JSON, and no
    header in the response) when it offers none of them or nothing at all."""
    return next((offer for offer in subprotocols if offer in WIRES), None)


class WebSocketConnection(asyncio.Protocol):
    """One client connection after the handshake: holds its frame reader and its session.

    It is the session's :class:`~tidings.centrifuge.SessionTransport`; the hub
    and the server API talk to the session. Small on purpose: see the module
    docstring.
    """

    __slots__ = (
        "_ctx",
        "_deadline",
        "_encoder",
        "_ping_at",
        "_queue",
        "_reader",
        "_slot",
        "_state",
        "_task",
        "session",
        "transport",
    )

    def __init__(
        self,
        ctx: WebSocketTransport,
        transport: asyncio.Transport,
        reader: FrameReader,
        encoder: PushEncoder,
    ) -> None:
        self._ctx = ctx
        self.transport = transport
        self._reader = reader
        self._encoder = encoder
        self.session = ClientSession(ctx.hub, ctx.options, self, encoder.wire)
        self._state = _OPEN
        self._task: asyncio.Task[None] | None = None
        self._queue: deque[bytes] | None = None
        self._slot = -1
        self._ping_at = 0.0
        self._deadline = 0.0

    #: How hooks and events name this transport.
    transport_name: ClassVar[TransportName] = "websocket"

    def __repr__(self) -> str:
        return f"<WebSocketConnection {self.session.client_id or 'unconnected'}>"

    def request_context(self) -> RequestContext:
        """The upgrade request's headers and cookies, for the ``connect`` hook."""
        return self._ctx.requests.get(self, NO_REQUEST_CONTEXT)

    # -- SessionTransport: what the session writes through --------------------

    def write_publication(self, pub: Publication) -> None:
        """The fan-out path: the frame bytes shared by every connection of this encoder."""
        if self._state == _OPEN:
            self.transport.write(pub.encoded(self._encoder))

    def write_payload(self, payload: bytes) -> None:
        if self._state == _OPEN:
            self.transport.write(self._encoder.message_frame(payload))

    def pong(self) -> None:
        self._ping_at = 0.0

    def close(self, code: int, reason: str) -> None:
        """Send a close frame, leave every channel, and wait (bounded) for the client's close."""
        if self._state != _OPEN:
            return
        self._state = _CLOSING
        self.session.release(code, reason)
        self._queue = None
        self.transport.write(close_frame(int(code), reason))
        self._ctx.closing(self)
        log.debug("closing %r: %d %s", self, code, reason)

    # -- server hooks ---------------------------------------------------------

    def shutdown(self) -> None:
        """Graceful server shutdown: clients reconnect (to another node) and recover."""
        self.close(DisconnectCode.SHUTDOWN, "shutdown")

    # -- timers (called by the context's wheel) -----------------------------

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
        self.transport.write(self._encoder.ping_frame)

    def _pong_late(self, now: float) -> bool:
        return bool(self._ping_at) and now - self._ping_at >= self._ctx.pong_timeout

    def deadline_passed(self) -> None:
        if self._state == _OPEN:
            self.close(DisconnectCode.STALE, "stale")
        else:
            # The close handshake did not finish (or the buffer never drained).
            self.transport.abort()

    # -- closing ------------------------------------------------------------

    def _frame_error(self, error: FrameError) -> None:
        """The one place a framing error becomes a close: its code, then stop reading."""
        log_client_error(
            log,
            "websocket protocol error from %r: %d %s",
            self,
            error.code,
            error.reason,
            fields=self.session.log_fields(code=int(error.code)),
        )
        self.close(error.code, error.reason)
        self._drain()

    def _close_received(self, event: CloseReceived) -> None:
        if self._state == _OPEN:
            # The client closes: answer with its code (RFC 6455 §5.5.1). It went
            # away by itself: that is what the session's end says, not its code.
            self.session.release(*CLIENT_WENT_AWAY)
            self.close(event.code if event.code is not None else CLOSE_NORMAL, "")
        self._drain()

    def _drain(self) -> None:
        """Flush what is written, then close the socket (aborted at the deadline if stuck)."""
        if self._state < _DRAINING:
            self._state = _DRAINING
            self.transport.close()

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover
        pass  # set_protocol() does not call it; upgrade() did the work

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        if exc is not None:
            log.debug("%r lost: %s", self, exc)
        self.session.release()
        self._queue = None
        self._ctx.remove(self)

    def pause_writing(self) -> None:
        # The client reads slower than we publish: its write buffer passed
        # limits.max_write_buffer. Close now (the transport marked itself paused
        # before calling us, so the write of the close frame does not recurse).
        # The client reconnects and recovers from history.
        if self._state == _OPEN:
            log_client_error(
                log,
                "closing %r: write buffer over %d bytes",
                self,
                self._ctx.max_write_buffer,
                fields=self.session.log_fields(code=int(DisconnectCode.SLOW)),
            )
            self._ctx.metrics.slow("websocket")
            self.close(DisconnectCode.SLOW, "slow")

    def resume_writing(self) -> None:
        pass

    def eof_received(self) -> bool | None:
        self._state = max(self._state, _DRAINING)
        self.session.release()
        return False  # close the transport

    def data_received(self, data: bytes | bytearray) -> None:
        if self._state >= _DRAINING:
            return
        try:
            events = self._reader.feed(data)
        except FrameError as error:
            self._frame_error(error)
            return
        for event in events:
            if type(event) is Message:
                if self._state == _OPEN:  # closing: only the client's close matters now
                    self._on_message(event.payload)
            elif type(event) is Ping:
                if self._state == _OPEN:
                    self.transport.write(frame(0x80 | OP_PONG, event.payload))
            elif type(event) is CloseReceived:
                self._close_received(event)
                return
            # Pong: an unsolicited or late pong needs no answer (RFC 6455 §5.5.3).

    # -- messages -----------------------------------------------------------

    def _on_message(self, payload: bytes) -> None:
        self._ping_at = 0.0  # any message shows the client is alive
        if self._task is not None:
            queue = self._queue
            if queue is None:
                queue = self._queue = deque()
            queue.append(payload)
            if len(queue) >= _MAX_QUEUED_MESSAGES:
                self.transport.pause_reading()
            return
        if payload == self.session.wire.ping and self.session.client_id:
            return  # the hot path: the answer to our ping needs no task
        self._task = self._ctx._loop().create_task(self._run(payload))

    async def _run(self, payload: bytes) -> None:
        session = self.session
        try:
            while self._state == _OPEN:
                disconnect = await session.handle(payload)
                if disconnect is not None:
                    self._disconnect(disconnect)
                    return
                if self._slot < 0 and session.client_id and self._state == _OPEN:
                    self._ctx.activate(self)
                queue = self._queue
                if not queue:
                    return
                if len(queue) == _MAX_QUEUED_MESSAGES:
                    self.transport.resume_reading()
                payload = queue.popleft()
        except Exception:  # pragma: no cover - handle() answers errors itself
            log.exception("websocket connection %r failed", self)
            self.close(DisconnectCode.INTERNAL, "internal server error")
        finally:
            self._task = None

    def _disconnect(self, disconnect: Disconnect) -> None:
        log_client_error(
            log,
            "disconnecting %r: %d %s",
            self,
            disconnect.code,
            disconnect.reason,
            fields=self.session.log_fields(code=int(disconnect.code)),
        )
        self.close(disconnect.code, disconnect.reason)
