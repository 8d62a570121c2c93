"""WebSocket transport: the thin asyncio shell around :mod:`tidings.centrifuge`.

The HTTP server hands over a socket whose request head asked for
``Upgrade: websocket`` (:func:`upgrade`). From there:

* **Handshake** — the ``websockets`` sans-I/O :class:`~websockets.server.ServerProtocol`
  checks the request (key, version, ``Origin`` allowlist, subprotocol
  ``centrifuge-json``, permessage-deflate negotiation) and builds the 101
  response. An *empty* ``Sec-WebSocket-Protocol`` header, which some
  centrifuge-js builds send and which ``websockets`` rejects, is dropped first.
  The ``ServerProtocol`` object is then thrown away.

* **Frames** — parsed here, by hand. Why not keep ``ServerProtocol`` for the
  life of the connection: it holds a stream reader, a parser generator, event
  and output lists and, with compression, a zlib decompressor per connection —
  several KiB per idle connection (and ~40 KiB with deflate), against a budget
  of about 4 KiB per idle subscribed connection. Parsing RFC 6455 client frames
  is a few lines of ``struct``; unmasking still uses websockets' C
  ``apply_mask`` and close payloads its :class:`~websockets.frames.Close`.
  An idle connection holds no read buffer at all.

* **Encode once** — a publication's push is framed once per wire variant
  (plain, or deflated) via ``pub.encoded(...)``; every subscriber of that
  variant gets the same ``bytes`` object, so ``deliver`` is one
  ``transport.write``.

* **Compression** — permessage-deflate is negotiated with
  ``server_no_context_takeover`` (so one compressed frame decodes in every
  client: each message is a standalone deflate stream, produced by ONE shared
  compressor reset with ``Z_FULL_FLUSH``) and ``client_no_context_takeover``
  (RFC 7692 §7.1.1.2 lets a server require it), so decompressing what a client
  sends needs no state kept between messages: a decompressor exists only
  while a compressed message is being read. Frames under
  ``websocket.compression_threshold`` bytes go uncompressed.

* **Timers** — no task and no timer per connection. One periodic callback per
  server walks a timing wheel: each tick pings one slot of connections with
  ``{}`` (the same 4 bytes for everyone), closes those that did not answer the
  previous ping within ``websocket.pong_timeout`` (3012), and checks the few
  connections with a deadline: no ``connect`` within
  ``websocket.connect_timeout`` (3502), or a close handshake that did not
  finish within ``websocket.handshake_timeout`` (then the socket is aborted).

* **Bounds** — a message over ``websocket.max_message_size`` closes with 1009;
  a write buffer over ``limits.max_write_buffer`` closes with 3008 (the client
  reconnects and recovers from history).

Commands of a frame run in a short-lived task (they may await the hub); frames
arriving meanwhile wait in a small queue, so commands run strictly in order.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import weakref
import zlib
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from websockets.datastructures import Headers as WSHeaders
from websockets.exceptions import ProtocolError as WSProtocolError
from websockets.extensions.permessage_deflate import (
    PerMessageDeflate,
    ServerPerMessageDeflateFactory,
)
from websockets.frames import Close
from websockets.http11 import Request as WSRequest
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from ..centrifuge import PING, ClientSession, Disconnect, SessionOptions, push_json
from ..errors import DisconnectCode
from ..hub import Publication

try:  # websockets' C speedup; same fallback as websockets.frames
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

if TYPE_CHECKING:
    from ..config import Config
    from ..http import Request
    from ..server import Server

__all__ = ["SUBPROTOCOL", "WebSocketConnection", "upgrade"]

log = logging.getLogger("tidings.websocket")
# websockets logs every handshake ("connection open") at INFO: too chatty for a
# server holding thousands of connections. Lower this logger's level to see them.
_handshake_log = logging.getLogger("tidings.websocket.handshake")
_handshake_log.setLevel(logging.WARNING)

SUBPROTOCOL = Subprotocol("centrifuge-json")

# Frame opcodes (RFC 6455 §5.2).
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# Close codes of RFC 6455 §7.4.1.
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_TOO_BIG = 1009

_DEFLATE_TAIL = b"\x00\x00\xff\xff"
_MAX_QUEUED_FRAMES = 16  # frames waiting for the running commands before we stop reading

# Connection states: open; close frame sent (still reading, for the client's close);
# transport closing (nothing more is read); lost.
_OPEN, _CLOSING, _DRAINING, _CLOSED = 0, 1, 2, 3

_pack_short = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack
_unpack_short = struct.Struct("!H").unpack_from
_unpack_long = struct.Struct("!Q").unpack_from


def frame(first_byte: int, payload: bytes) -> bytes:
    """One unmasked (server-to-client) frame: ``first_byte`` is FIN|RSV1|opcode."""
    n = len(payload)
    if n < 126:
        return bytes((first_byte, n)) + payload
    if n < 65536:
        return _pack_short(first_byte, 126, n) + payload
    return _pack_long(first_byte, 127, n) + payload


PING_FRAME = frame(0x80 | OP_TEXT, PING)


class _Deflater:
    """The one compressor of a server: each message comes out a standalone stream."""

    __slots__ = ("_z",)

    def __init__(self) -> None:
        self._z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15, 8)

    def compress(self, data: bytes) -> bytes:
        # Z_FULL_FLUSH resets the dictionary: no message refers to an earlier
        # one, which is what server_no_context_takeover promises the client.
        out = self._z.compress(data) + self._z.flush(zlib.Z_FULL_FLUSH)
        return out[:-4] if out.endswith(_DEFLATE_TAIL) else out


class WebSocketContext:
    """Per-server state shared by every WebSocket connection: encoders and the timer wheel."""

    def __init__(self, server: Server) -> None:
        config: Config = server.config
        ws = config.websocket
        self.server = server
        self.hub = server.hub
        self.loop: asyncio.AbstractEventLoop = server.loop or asyncio.get_running_loop()
        self.max_message_size = ws.max_message_size
        self.max_write_buffer = config.limits.max_write_buffer
        self.connect_timeout = ws.connect_timeout
        self.close_timeout = ws.handshake_timeout
        self.pong_timeout = ws.pong_timeout
        self.compression = ws.compression
        self.threshold = ws.compression_threshold
        self.options = SessionOptions(
            access=server.access,
            ping_interval=max(1, round(ws.ping_interval)),
            max_channels=config.limits.max_channels_per_connection,
        )
        self._deflater = _Deflater()
        # Encoders are bound methods of this context: Publication.encoded caches
        # by encoder, so the plain and deflated frames are each built once.
        self.push_plain: Callable[[Publication], bytes] = self._push_plain
        self.push_deflate: Callable[[Publication], bytes] = self._push_deflate
        # Timer wheel: a tick every `tick` seconds pings one slot.
        self.tick = max(0.05, min(1.0, ws.ping_interval, ws.pong_timeout / 2))
        self.slots: list[set[WebSocketConnection]] = [
            set() for _ in range(max(1, round(ws.ping_interval / self.tick)))
        ]
        self.slot_index = 0
        self.watched: set[WebSocketConnection] = set()  # connections with a deadline
        self.count = 0
        self._timer: asyncio.TimerHandle | None = None

    # -- encoders (the fan-out path) -----------------------------------------

    def _push_plain(self, pub: Publication) -> bytes:
        return frame(0x80 | OP_TEXT, pub.encoded(push_json))

    def _push_deflate(self, pub: Publication) -> bytes:
        payload = pub.encoded(push_json)
        if len(payload) < self.threshold:
            return pub.encoded(self.push_plain)
        compressed = self._deflater.compress(payload)
        if len(compressed) >= len(payload):
            return pub.encoded(self.push_plain)
        return frame(0xC0 | OP_TEXT, compressed)

    def text_frame(self, payload: bytes, deflate: bool) -> bytes:
        """A reply frame for one connection."""
        if deflate and len(payload) >= self.threshold:
            compressed = self._deflater.compress(payload)
            if len(compressed) < len(payload):
                return frame(0xC0 | OP_TEXT, compressed)
        return frame(0x80 | OP_TEXT, payload)

    # -- registry and timers ------------------------------------------------

    def add(self, conn: WebSocketConnection) -> None:
        self.count += 1
        self.server.connections.add(conn)
        conn._deadline = self.loop.time() + self.connect_timeout
        self.watched.add(conn)
        if self._timer is None:
            self._timer = self.loop.call_later(self.tick, self._on_tick)

    def activate(self, conn: WebSocketConnection) -> None:
        """``conn`` is connected: from waiting for connect to the ping wheel."""
        self.watched.discard(conn)
        # The slot pinged last: its next ping comes a whole interval from now.
        conn._slot = (self.slot_index - 1) % len(self.slots)
        self.slots[conn._slot].add(conn)

    def closing(self, conn: WebSocketConnection) -> None:
        if conn._slot >= 0:
            self.slots[conn._slot].discard(conn)
            conn._slot = -1
        conn._deadline = self.loop.time() + self.close_timeout
        self.watched.add(conn)

    def remove(self, conn: WebSocketConnection) -> None:
        self.count -= 1
        self.server.connections.discard(conn)
        self.watched.discard(conn)
        if conn._slot >= 0:
            self.slots[conn._slot].discard(conn)
            conn._slot = -1
        if self.count <= 0 and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_tick(self) -> None:
        self._timer = self.loop.call_later(self.tick, self._on_tick)
        now = self.loop.time()
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


_contexts: weakref.WeakKeyDictionary[Any, WebSocketContext] = weakref.WeakKeyDictionary()


def context(server: Server) -> WebSocketContext:
    ctx = _contexts.get(server)
    if ctx is None:
        ctx = _contexts[server] = WebSocketContext(server)
    return ctx


def _select_subprotocol(protocol: ServerProtocol, subprotocols: Any) -> Subprotocol | None:
    # Accept centrifuge-json when offered, and clients that offer nothing.
    return SUBPROTOCOL if SUBPROTOCOL in subprotocols else None


def upgrade(server: Server, transport: asyncio.Transport, request: Request, rest: bytes) -> None:
    """Take over ``transport`` from the HTTP server: answer the handshake, then serve frames."""
    ctx = context(server)
    headers = WSHeaders()
    for name, value in request.headers.raw:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        if key == "sec-websocket-protocol" and not text.strip():
            continue  # an empty offer (centrifuge-js) is no offer
        headers[key] = text
    extensions = None
    if ctx.compression:
        extensions = [
            ServerPerMessageDeflateFactory(
                server_no_context_takeover=True, client_no_context_takeover=True
            )
        ]
    handshake = ServerProtocol(
        extensions=extensions,
        subprotocols=[SUBPROTOCOL],
        select_subprotocol=_select_subprotocol,
        max_size=ctx.max_message_size,
        logger=_handshake_log,
    )
    target = request.target.decode("latin-1")
    if getattr(server, "stopping", False):
        response = handshake.reject(503, "Server shutting down\n")
    elif not server.cors.allows_websocket(request):
        # Cross-site WebSocket hijacking: see tidings.http.cors for the rule.
        response = handshake.reject(403, "Origin not allowed\n")
    else:
        response = handshake.accept(WSRequest(target, headers))
    handshake.send_response(response)
    head = b"".join(handshake.data_to_send())
    if response.status_code != 101:
        log.info(
            "websocket handshake refused (%d) for %s: %s",
            response.status_code,
            request.client,
            handshake.handshake_exc,
        )
        transport.write(head)
        transport.close()
        return
    deflate = any(isinstance(ext, PerMessageDeflate) for ext in handshake.extensions)
    conn = WebSocketConnection(ctx, transport, deflate)
    transport.set_protocol(conn)
    transport.set_write_buffer_limits(high=ctx.max_write_buffer)
    transport.write(head)
    ctx.add(conn)
    resume = getattr(transport, "resume_reading", None)
    if resume is not None:
        resume()
    if rest:
        conn.data_received(rest)


class WebSocketConnection(ClientSession, asyncio.Protocol):
    """One client connection after the handshake. Small on purpose: see the module docstring."""

    __slots__ = (
        "_buf",
        "_ctx",
        "_deadline",
        "_deflate",
        "_encoder",
        "_frag",
        "_frag_deflated",
        "_ping_at",
        "_queue",
        "_slot",
        "_state",
        "_task",
        "transport",
    )

    def __init__(self, ctx: WebSocketContext, transport: asyncio.Transport, deflate: bool) -> None:
        super().__init__(ctx.hub, ctx.options)
        self._ctx = ctx
        self.transport = transport
        self._deflate = deflate
        self._encoder = ctx.push_deflate if deflate else ctx.push_plain
        self._state = _OPEN
        self._buf: bytearray | None = None  # unparsed bytes; None when idle
        self._frag: bytearray | None = None  # a fragmented message being assembled
        self._frag_deflated = False
        self._task: asyncio.Task[None] | None = None
        self._queue: deque[bytes] | None = None
        self._slot = -1
        self._ping_at = 0.0
        self._deadline = 0.0

    def __repr__(self) -> str:
        return f"<WebSocketConnection {self.client_id or 'unconnected'}>"

    # -- hub and server hooks -------------------------------------------------

    def deliver(self, pub: Publication) -> None:
        """The fan-out path: write the shared frame bytes (after any pending replies)."""
        if self._state != _OPEN:
            return
        if self._out:
            self.flush()
        self.transport.write(pub.encoded(self._encoder))

    def send_payload(self, payload: bytes) -> None:
        if self._state == _OPEN:
            self.transport.write(self._ctx.text_frame(payload, self._deflate))

    def pong(self) -> None:
        self._ping_at = 0.0

    def shutdown(self) -> None:
        """Graceful server shutdown: clients reconnect (to another node) and recover."""
        self.close(DisconnectCode.SHUTDOWN, "shutdown")

    def insufficient_state(self) -> None:
        """A channel's stream skipped: the client reconnects and learns what it lost."""
        self.close(DisconnectCode.INSUFFICIENT_STATE, "insufficient state")

    # -- timers (called by the context's wheel) -----------------------------

    def ping(self, now: float) -> None:
        if self._state != _OPEN:
            return
        self.check_expiry()
        if self._state != _OPEN:
            return
        if self._ping_at:
            if self._pong_late(now):
                self.close(DisconnectCode.NO_PONG, "no pong")
            return
        self._ping_at = now
        self.transport.write(PING_FRAME)

    def _pong_late(self, now: float) -> bool:
        return bool(self._ping_at) and now - self._ping_at >= self._ctx.pong_timeout

    def deadline_passed(self) -> None:
        if self._state == _OPEN:
            self.close(DisconnectCode.STALE, "stale")
        else:
            # The close handshake did not finish (or the buffer never drained).
            self.transport.abort()

    # -- closing ------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Send a close frame, leave every channel, and wait (bounded) for the client's close."""
        if self._state != _OPEN:
            return
        self._state = _CLOSING
        self.release()
        self._queue = None
        self._frag = None
        payload = Close(int(code), reason).serialize()
        self.transport.write(frame(0x80 | OP_CLOSE, payload))
        self._ctx.closing(self)
        log.debug("closing %r: %d %s", self, code, reason)

    def _fail(self, code: int, reason: str) -> None:
        """Close for a protocol error and stop reading: nothing more from this client counts."""
        self.close(code, reason)
        self._drain()

    def _drain(self) -> None:
        """Flush what is written, then close the socket (aborted at the deadline if stuck)."""
        if self._state < _DRAINING:
            self._state = _DRAINING
            self._buf = None
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
        self.release()
        self._buf = None
        self._frag = None
        self._queue = None
        self._ctx.remove(self)

    def pause_writing(self) -> None:
        # The client reads slower than we publish: its write buffer passed
        # limits.max_write_buffer. Close now (the transport marked itself paused
        # before calling us, so the write of the close frame does not recurse).
        # The client reconnects and recovers from history.
        if self._state == _OPEN:
            log.info("closing %r: write buffer over %d bytes", self, self._ctx.max_write_buffer)
            self.close(DisconnectCode.SLOW, "slow")

    def resume_writing(self) -> None:
        pass

    def eof_received(self) -> bool | None:
        self._state = max(self._state, _DRAINING)
        self.release()
        return False  # close the transport

    def data_received(self, data: bytes | bytearray) -> None:
        if self._state >= _DRAINING:
            return
        if self._buf is not None:
            self._buf += data
            data = self._buf
            self._buf = None
        pos = 0
        end = len(data)
        max_size = self._ctx.max_message_size
        while end - pos >= 2:
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = _unpack_short(data, pos + 2)[0]
                head = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = _unpack_long(data, pos + 2)[0]
                head = 10
            if not b1 & 0x80:
                return self._fail(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
            opcode = b0 & 0x0F
            if length > max_size and opcode < OP_CLOSE:
                return self._fail(CLOSE_TOO_BIG, "message too big")
            if end - pos < head + 4 + length:
                break
            mask = data[pos + head : pos + head + 4]
            start = pos + head + 4
            pos = start + length
            payload = apply_mask(data[start:pos], mask)
            self._on_frame(b0, opcode, payload)
            if self._state >= _DRAINING:
                return
        if pos < end:
            self._buf = bytearray(data[pos:])

    # -- frames ---------------------------------------------------------------

    def _on_frame(self, b0: int, opcode: int, payload: bytes) -> None:
        fin = b0 & 0x80
        rsv1 = b0 & 0x40
        if b0 & 0x30 or (rsv1 and (not self._deflate or opcode in (OP_CONT,) or opcode >= 8)):
            return self._fail(CLOSE_PROTOCOL_ERROR, "reserved bits set")
        if opcode >= OP_CLOSE:
            if not fin or len(payload) > 125:
                return self._fail(CLOSE_PROTOCOL_ERROR, "bad control frame")
            if opcode == OP_CLOSE:
                return self._on_close(payload)
            if opcode == OP_PING:
                if self._state == _OPEN:
                    self.transport.write(frame(0x80 | OP_PONG, payload))
                return None
            if opcode == OP_PONG:
                return None
            return self._fail(CLOSE_PROTOCOL_ERROR, "unknown opcode")
        if self._state != _OPEN:
            return None  # closing: only the client's close frame matters now
        if opcode == OP_CONT:
            frag = self._frag
            if frag is None:
                return self._fail(CLOSE_PROTOCOL_ERROR, "unexpected continuation")
            frag += payload
            if len(frag) > self._ctx.max_message_size:
                return self._fail(CLOSE_TOO_BIG, "message too big")
            if not fin:
                return None
            self._frag = None
            payload = bytes(frag)
            rsv1 = self._frag_deflated
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._frag is not None:
                return self._fail(CLOSE_PROTOCOL_ERROR, "expected a continuation")
            if not fin:
                self._frag = bytearray(payload)
                self._frag_deflated = bool(rsv1)
                return None
        else:
            return self._fail(CLOSE_PROTOCOL_ERROR, "unknown opcode")
        if rsv1:
            # client_no_context_takeover: every message decompresses on its own,
            # so the decompressor lives only for this message.
            inflater = zlib.decompressobj(-15)
            limit = self._ctx.max_message_size
            try:
                payload = inflater.decompress(payload + _DEFLATE_TAIL, limit + 1)
            except zlib.error:
                return self._fail(CLOSE_PROTOCOL_ERROR, "bad compressed data")
            if len(payload) > limit:
                return self._fail(CLOSE_TOO_BIG, "message too big")
        self._on_message(payload)
        return None

    def _on_close(self, payload: bytes) -> None:
        if self._state == _OPEN:
            # The client closes: answer with its code (RFC 6455 §5.5.1).
            try:
                code = Close.parse(payload).code if payload else CLOSE_NORMAL
            except (WSProtocolError, UnicodeDecodeError):
                code = CLOSE_PROTOCOL_ERROR
            if code in (1005, 1006, 1015):
                code = CLOSE_NORMAL
            self.close(code, "")
        self._drain()

    # -- messages -----------------------------------------------------------

    def _on_message(self, payload: bytes) -> None:
        self._ping_at = 0.0  # any message shows the client is alive
        if self._task is not None:
            queue = self._queue
            if queue is None:
                queue = self._queue = deque()
            queue.append(payload)
            if len(queue) >= _MAX_QUEUED_FRAMES:
                self.transport.pause_reading()
            return
        if payload == PING and self.client_id:
            self.pong()  # the hot path: a pong needs no task
            return
        self._task = self._ctx.loop.create_task(self._run(payload))

    async def _run(self, payload: bytes) -> None:
        try:
            while self._state == _OPEN:
                disconnect = await self.handle(payload)
                if disconnect is not None:
                    self._disconnect(disconnect)
                    return
                if self._slot < 0 and self.client_id and self._state == _OPEN:
                    self._ctx.activate(self)
                queue = self._queue
                if not queue:
                    return
                if len(queue) == _MAX_QUEUED_FRAMES:
                    self.transport.resume_reading()
                payload = queue.popleft()
        except Exception:  # pragma: no cover - handle() answers errors itself
            log.exception("websocket connection %r failed", self)
            self.close(DisconnectCode.INTERNAL, "internal server error")
        finally:
            self._task = None

    def _disconnect(self, disconnect: Disconnect) -> None:
        log.info("disconnecting %r: %d %s", self, disconnect.code, disconnect.reason)
        self.close(disconnect.code, disconnect.reason)
