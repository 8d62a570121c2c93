"""RFC 6455 / RFC 7692 framing for the server side — sans-I/O.

Bytes from a client go into :meth:`FrameReader.feed`; complete messages and
control frames come out as events (:class:`Message`, :class:`Ping`,
:class:`Pong`, :class:`CloseReceived`), or a :class:`FrameError` carrying the
close code the connection must fail with. Frames for the client are built by
:func:`frame` / :func:`close_frame`, compressed by :class:`Deflater`. No
sockets, no asyncio: the transport (``transports/websocket.py``) holds a
reader and writes what these functions return.

Why not websockets' own ``Protocol``/``Frame.parse``: its parser is a
generator over a ``StreamReader`` that keeps a buffer, a generator frame and
(with compression) zlib objects alive per connection. Measured with
tracemalloc after a handshake and one message: 2,309 bytes per
``ServerProtocol`` (2,558 with permessage-deflate), against 88 bytes for a
``FrameReader`` — and a budget of about 2 KiB per idle connection, all
included. This reader holds no buffer at all between frames.
Unmasking still uses websockets' C ``apply_mask``; UTF-8 is validated by
CPython's codec.

Every check fires at the earliest byte that decides it, so a hostile client
never makes the server buffer what it is going to refuse:

* the first two header bytes decide masking, reserved bits, opcode,
  control-frame length (> 125) and fragmentation, and continuation order → 1002;
* the (extended) length decides ``max_message_size``, including the running
  total of a fragmented message, before any payload is buffered → 1009;
* text is validated as UTF-8 fragment by fragment (an invalid byte in the
  first fragment fails before the second arrives) → 1007;
* compressed messages are inflated fragment by fragment with an output bound,
  never beyond ``max_message_size`` → 1009; corrupt deflate data → 1007.
"""

from __future__ import annotations

import codecs
import struct
import zlib
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

from .utf8 import check_utf8

try:  # websockets' C speedup; the same fallback as websockets.frames
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

__all__ = [
    "CLOSE_INVALID_DATA",
    "CLOSE_NORMAL",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_TOO_BIG",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "CloseReceived",
    "Deflater",
    "Event",
    "FrameError",
    "FrameReader",
    "Message",
    "Ping",
    "Pong",
    "close_frame",
    "frame",
    "valid_close_code",
]

# Frame opcodes (RFC 6455 §5.2).
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# Close codes (RFC 6455 §7.4.1) this module fails connections with.
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009

#: Codes a peer may put in a close frame: RFC 6455 §7.4.1 plus the IANA
#: registrations 1012-1014, and 3000-4999 (libraries, applications). 1004-1006
#: and 1015 are reserved for reporting, never sent (the same set as websockets').
_PEER_CLOSE_CODES = frozenset(
    (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014)
)

#: What a sync flush ends with; RFC 7692 §7.2.1 strips it from a message and
#: the receiver puts it back.
DEFLATE_TAIL = b"\x00\x00\xff\xff"

_pack_short = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack
_unpack_short = struct.Struct("!H").unpack_from
_unpack_long = struct.Struct("!Q").unpack_from
_new_utf8_decoder = codecs.getincrementaldecoder("utf-8")


def valid_close_code(code: int) -> bool:
    """May a peer send ``code`` in a close frame (RFC 6455 §7.4)?"""
    return code in _PEER_CLOSE_CODES or 3000 <= code < 5000


class FrameError(Exception):
    """The client broke RFC 6455/7692: fail the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


class Message(NamedTuple):
    """A complete data message: defragmented, decompressed, text validated as UTF-8."""

    payload: bytes
    text: bool


class Ping(NamedTuple):
    payload: bytes


class Pong(NamedTuple):
    payload: bytes


class CloseReceived(NamedTuple):
    """The client's close frame; ``code`` is None when it carried no payload."""

    code: int | None
    reason: str


Event = Message | Ping | Pong | CloseReceived

# NamedTuple's generated __new__ is Python code; this builds the same tuple
# from C (about 90 ns less per message, measured with timeit).
_new_message: Callable[[tuple[bytes, bool]], Message] = partial(tuple.__new__, Message)


def _check_utf8(data: bytes) -> None:
    """:func:`tidings.utf8.check_utf8` (the one UTF-8 rule), as a 1007 failure."""
    try:
        check_utf8(data)
    except UnicodeDecodeError as exc:
        raise FrameError(CLOSE_INVALID_DATA, f"invalid UTF-8 at byte {exc.start}") from None


class _Fragmented:
    """A data message split over several frames, while it is being received.

    Exists only between the first and the last frame of a fragmented message,
    so an idle reader carries none of this.
    """

    __slots__ = ("inflater", "parts", "size", "text", "utf8", "wire_size")

    def __init__(self, text: bool, inflater: zlib._Decompress | None) -> None:
        self.text = text
        self.inflater = inflater
        self.parts: list[bytes] = []
        self.size = 0  # bytes of message so far (after inflating)
        self.wire_size = 0  # bytes of payload received so far (before inflating)
        self.utf8 = _new_utf8_decoder() if text else None


class FrameReader:
    """Client frames in, events out: the receiving half of one server connection.

    ``deflate`` says permessage-deflate was negotiated (RSV1 then marks a
    compressed message); ``client_window_bits`` is the LZ77 window the client
    agreed to (``client_max_window_bits``), used to inflate. The handshake
    must have required ``client_no_context_takeover``: each message is
    inflated on its own, so no decompressor outlives a message.

    After a :class:`FrameError` or a :class:`CloseReceived`, the reader takes
    nothing more: later bytes are ignored (RFC 6455 §5.5.1: nothing follows
    a close frame).
    """

    __slots__ = ("_buf", "_done", "_frag", "_max", "_partial", "_wbits")

    def __init__(
        self, max_message_size: int, *, deflate: bool = False, client_window_bits: int = 15
    ) -> None:
        if deflate and not 8 <= client_window_bits <= 15:
            raise ValueError("client_window_bits must be between 8 and 15")
        self._max = max_message_size
        self._wbits = client_window_bits if deflate else 0  # 0: no compression
        self._buf: bytearray | None = None  # an incomplete frame; None between frames
        self._frag: _Fragmented | None = None
        self._done = False
        # While a text frame is incomplete: how many of its payload bytes were
        # validated already, and the decoder holding a split code point.
        self._partial: tuple[int, codecs.IncrementalDecoder] | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame and a fragmented message (for tests and metrics)."""
        held = len(self._buf) if self._buf is not None else 0
        frag = self._frag
        if frag is not None:
            held += frag.size
        return held

    def feed(self, data: bytes | bytearray) -> list[Event]:
        """Parse ``data`` (any split of the stream); return the events it completes.

        Raises :class:`FrameError` as soon as the bytes seen prove the stream
        invalid; the events completed before the offending frame are lost with
        it, as the connection fails anyway.
        """
        events: list[Event] = []
        if self._done:
            return events
        buf = self._buf
        if buf is None:
            view: bytes | bytearray = data
        else:
            # Only the tail of one frame is ever kept, so this append is the
            # only copy of the bytes before unmasking, however they are split.
            buf += data
            view = buf
        pos = 0
        end = len(view)
        try:
            while end - pos >= 2:
                b0 = view[pos]
                b1 = view[pos + 1]
                opcode = b0 & 0x0F
                if not b1 & 0x80:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
                length = b1 & 0x7F
                if opcode >= OP_CLOSE:
                    if opcode > OP_PONG:
                        raise FrameError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
                    if b0 & 0x70:
                        raise FrameError(CLOSE_PROTOCOL_ERROR, "reserved bits set")
                    if not b0 & 0x80:
                        raise FrameError(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
                    if length > 125:
                        raise FrameError(CLOSE_PROTOCOL_ERROR, "control frame over 125 bytes")
                    head = 2
                else:
                    frag = self._frag
                    if frag is not None or (b0 != 0x81 and b0 != 0x82):
                        self._check_data_header(b0, opcode)  # the uncommon cases
                    head = 2
                    if length == 126:
                        if end - pos < 4:
                            break
                        length = _unpack_short(view, pos + 2)[0]
                        head = 4
                    elif length == 127:
                        if end - pos < 10:
                            break
                        length = _unpack_long(view, pos + 2)[0]
                        if length >> 63:
                            raise FrameError(CLOSE_PROTOCOL_ERROR, "frame length over 2^63")
                        head = 10
                    # Held so far: the larger of what arrived and what it inflated
                    # to, so the reader never holds more than max_message_size
                    # plus one frame header.
                    so_far = max(frag.size, frag.wire_size) if frag is not None else 0
                    if so_far + length > self._max:
                        raise FrameError(CLOSE_TOO_BIG, f"message over {self._max} bytes")
                start = pos + head + 4
                stop = start + length
                if stop > end:
                    if opcode < OP_CLOSE and end > start:
                        self._check_arrived_text(b0, opcode, view, start, end)
                    break
                payload = apply_mask(view[start:stop], view[start - 4 : start])
                pos = stop
                if self._partial is not None:
                    self._partial = None
                if opcode >= OP_CLOSE:
                    if opcode == OP_CLOSE:
                        events.append(_parse_close(payload))
                        self._done = True
                        self._buf = None
                        return events
                    events.append(Ping(payload) if opcode == OP_PING else Pong(payload))
                elif b0 == 0x81 and frag is None:
                    # The hot path, inlined: a whole uncompressed text message.
                    if not payload.isascii():
                        _check_utf8(payload)
                    events.append(_new_message((payload, True)))
                else:
                    message = self._on_data(b0, opcode, payload)
                    if message is not None:
                        events.append(message)
        except FrameError:
            self._done = True
            self._buf = None
            self._frag = None
            self._partial = None
            raise
        if pos == end:
            self._buf = None  # on a frame boundary: nothing held
        elif buf is None:
            self._buf = bytearray(view[pos:])
        elif pos:
            # CPython deletes from the front of a bytearray by moving its
            # start pointer, so this does not copy the tail.
            del buf[:pos]
        return events

    # -- data frames --------------------------------------------------------

    def _check_data_header(self, b0: int, opcode: int) -> None:
        """What the first header byte of a data frame decides."""
        if opcode > OP_BINARY:
            raise FrameError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        if b0 & 0x30:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "reserved bits set")
        if opcode == OP_CONT:
            if self._frag is None:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "continuation without a message")
            if b0 & 0x40:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "RSV1 on a continuation frame")
        else:
            if self._frag is not None:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
            if b0 & 0x40 and not self._wbits:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "RSV1 set without permessage-deflate")

    def _check_arrived_text(
        self, b0: int, opcode: int, view: bytes | bytearray, start: int, end: int
    ) -> None:
        """Validate the payload bytes of an incomplete text frame as they arrive.

        So invalid UTF-8 fails the connection when it arrives, not when the
        frame ends (Autobahn 6.4.3/6.4.4): a client dribbling a large frame
        cannot hold the connection open on a message already known to be
        invalid. Only what arrived since the last call is unmasked and decoded;
        the complete payload is validated again when the frame ends (twice
        the work, only for frames split across reads).
        """
        frag = self._frag
        if frag is None:
            if opcode != OP_TEXT or b0 & 0x40:
                return  # binary, or compressed: validated once inflated
            base = None
        elif frag.utf8 is None or frag.inflater is not None:
            return
        else:
            base = frag.utf8
        decoder: codecs.IncrementalDecoder
        if self._partial is None:
            checked = 0
            decoder = _new_utf8_decoder()
            if base is not None:
                decoder.setstate(base.getstate())
        else:
            checked, decoder = self._partial
        first = start + checked
        if first >= end:
            return
        turn = checked % 4  # the mask key, rotated to where the new bytes start
        mask = bytes(view[start - 4 + turn : start]) + bytes(view[start - 4 : start - 4 + turn])
        _feed_utf8(decoder, apply_mask(view[first:end], mask), False)
        self._partial = (end - start, decoder)

    def _on_data(self, b0: int, opcode: int, payload: bytes) -> Message | None:
        fin = b0 & 0x80
        frag = self._frag
        if frag is None:
            if fin:  # the common case: a whole message in one frame
                text = opcode == OP_TEXT
                if b0 & 0x40:
                    one_shot = zlib.decompressobj(-self._wbits)
                    payload = self._inflate(one_shot, payload + DEFLATE_TAIL, 0)
                if text:
                    _check_utf8(payload)
                return Message(payload, text)
            inflater = zlib.decompressobj(-self._wbits) if b0 & 0x40 else None
            frag = self._frag = _Fragmented(opcode == OP_TEXT, inflater)
        frag.wire_size += len(payload)
        if frag.inflater is not None:
            if fin:
                payload += DEFLATE_TAIL
            payload = self._inflate(frag.inflater, payload, frag.size)
        frag.size += len(payload)
        if frag.utf8 is not None:
            _feed_utf8(frag.utf8, payload, bool(fin))
        if payload:
            frag.parts.append(payload)
        if not fin:
            return None
        self._frag = None
        parts = frag.parts
        return Message(parts[0] if len(parts) == 1 else b"".join(parts), frag.text)

    def _inflate(self, inflater: zlib._Decompress, data: bytes, so_far: int) -> bytes:
        """Inflate ``data``, refusing to produce more than the message may still grow by."""
        room = self._max - so_far
        try:
            # max_length room + 1: one byte more than allowed proves the
            # message too big without inflating the rest (a deflate bomb
            # costs at most max_message_size + 1 bytes).
            out = inflater.decompress(data, room + 1)
        except zlib.error as exc:
            raise FrameError(CLOSE_INVALID_DATA, f"bad compressed data: {exc}") from None
        if len(out) > room:
            raise FrameError(CLOSE_TOO_BIG, f"message over {self._max} bytes")
        return out


def _feed_utf8(decoder: codecs.IncrementalDecoder, data: bytes, final: bool) -> None:
    """Validate one fragment of a text message; fail on the first byte that cannot be UTF-8."""
    try:
        decoder.decode(data, final)
    except UnicodeDecodeError as exc:
        raise FrameError(CLOSE_INVALID_DATA, f"invalid UTF-8: {exc.reason}") from None
    if not final and data and data[-1] >= 0x80:
        # CPython's decoder rejects most impossible prefixes at once, but keeps
        # ED A0..BF (the start of a UTF-16 surrogate) pending: reject it here,
        # so a split surrogate fails at its first fragment too.
        pending = decoder.getstate()[0]
        if len(pending) >= 2 and pending[0] == 0xED and pending[1] >= 0xA0:
            raise FrameError(CLOSE_INVALID_DATA, "invalid UTF-8: surrogate")


def _parse_close(payload: bytes) -> CloseReceived:
    if not payload:
        return CloseReceived(None, "")
    if len(payload) == 1:
        raise FrameError(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = _unpack_short(payload)[0]
    if not valid_close_code(code):
        raise FrameError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(CLOSE_INVALID_DATA, "close reason is not UTF-8") from None
    return CloseReceived(code, reason)


# --------------------------------------------------------------------------- writing


def frame(first_byte: int, payload: bytes) -> bytes:
    """One unmasked (server-to-client) frame: ``first_byte`` is FIN|RSV1|opcode."""
    n = len(payload)
    if n < 126:
        return bytes((first_byte, n)) + payload
    if n < 65536:
        return _pack_short(first_byte, 126, n) + payload
    return _pack_long(first_byte, 127, n) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut to fit a control frame's 125 bytes, on a character."""
    encoded = reason.encode("utf-8")
    if len(encoded) > 123:
        encoded = encoded[:123].decode("utf-8", "ignore").encode("utf-8")
    return frame(0x80 | OP_CLOSE, code.to_bytes(2, "big") + encoded)


class Deflater:
    """A permessage-deflate compressor whose every message is a standalone stream.

    One per negotiated ``server_max_window_bits``, shared by every connection
    of that window size: the handshake always agrees to
    ``server_no_context_takeover``, and ``Z_FULL_FLUSH`` resets the dictionary
    after each message, so no message refers to an earlier one and the same
    compressed frame decodes in every client with that window.
    """

    __slots__ = ("_z", "window_bits")

    def __init__(self, window_bits: int = 15) -> None:
        if not 9 <= window_bits <= 15:
            # zlib turns a raw 8-bit window into 9 (RFC 7692 §7.1.2.1 pitfall).
            raise ValueError("window_bits must be between 9 and 15")
        self.window_bits = window_bits
        self._z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -window_bits, 8)

    def compress(self, data: bytes) -> bytes:
        """``data`` as one compressed message payload (without the sync-flush tail)."""
        out = self._z.compress(data) + self._z.flush(zlib.Z_FULL_FLUSH)
        return out[:-4] if out.endswith(DEFLATE_TAIL) else out
