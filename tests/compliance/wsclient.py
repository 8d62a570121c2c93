"""A WebSocket client that can break the rules: the hostile peer of the compliance suite.

What comes from ``websockets`` (a library we did not write): the handshake key and its
expected accept value, HTTP response parsing (``Response.parse`` over its ``StreamReader``),
``Sec-WebSocket-Extensions`` parsing, close-payload parsing (``Close.parse``) and masking
(``apply_mask``).

What is built here, and why: **frames**. ``websockets.frames.Frame.serialize`` calls
``Frame.check()`` and refuses exactly the frames this suite has to send -- reserved bits,
control frames over 125 bytes or fragmented -- and it cannot announce a length other than the
payload's (a header alone, announcing 2^40 bytes). ``Frame.parse`` likewise refuses a frame with
RSV1 set unless websockets' own deflate extension decodes it, while the suite must see RSV1 on
the wire and inflate with a window it chooses. So frame headers are a few lines of ``struct``
here, and so is permessage-deflate (a fresh ``zlib`` object per message, at the window the
handshake agreed on -- the check the suite exists to make).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import socket
import struct
import time
import zlib
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import Any, TypeVar

from websockets.datastructures import Headers
from websockets.frames import Close
from websockets.headers import parse_extension
from websockets.http11 import Response
from websockets.streams import StreamReader
from websockets.typing import ExtensionParameter
from websockets.utils import accept_key, generate_key

try:  # websockets' C speedup, as the server uses
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "TIMEOUT",
    "Deflate",
    "HandshakeRefused",
    "Message",
    "ServerFrame",
    "WSClient",
    "deflate_message",
    "encode_frame",
    "frame_header",
]

TIMEOUT = 10.0
#: A server failing a connection answers at once; this only bounds the wait when it does not.
CLOSE_TIMEOUT = 5.0
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
SUBPROTOCOL = "centrifuge-json"
_DEFLATE_TAIL = b"\x00\x00\xff\xff"
_T = TypeVar("_T")


# --------------------------------------------------------------------------- frames out


def frame_header(
    opcode: int,
    length: int,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes = b"\x37\xfa\x21\x3d",
) -> bytes:
    """The header of a masked client frame announcing ``length`` payload bytes.

    ``rsv`` is the three reserved bits as a number 0-7 (4 = RSV1, 2 = RSV2, 1 = RSV3), as
    Autobahn numbers them. Nothing is checked: announcing 2^40 bytes is the point.
    """
    b0 = (0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0x0F)
    if length < 126:
        head = struct.pack("!BB", b0, 0x80 | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", b0, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, length)
    return head + mask


def encode_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes = b"\x37\xfa\x21\x3d",
) -> bytes:
    """One masked client frame, valid or not (see :func:`frame_header`)."""
    return frame_header(opcode, len(payload), fin=fin, rsv=rsv, mask=mask) + apply_mask(
        payload, mask
    )


def deflate_message(
    payload: bytes,
    window_bits: int = 15,
    *,
    level: int = zlib.Z_DEFAULT_COMPRESSION,
    final: bool = False,
) -> bytes:
    """``payload`` compressed as one permessage-deflate message (RFC 7692 §7.2.1).

    A fresh compressor per message: valid whether or not the server asked for
    ``client_no_context_takeover``. zlib refuses a raw window of 8 bits, hence the floor of 9.
    ``level=0`` makes stored blocks (§7.2.3.2); ``final`` ends the data with a block that has
    BFINAL set instead of an empty sync block (§7.2.3.3): a server must accept both.
    """
    compressor = zlib.compressobj(level, zlib.DEFLATED, -max(9, window_bits))
    if final:
        return compressor.compress(payload) + compressor.flush(zlib.Z_FINISH)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(_DEFLATE_TAIL)
    return data[:-4]


# --------------------------------------------------------------------------- frames in


@dataclasses.dataclass(frozen=True, slots=True)
class ServerFrame:
    """A frame as the server put it on the wire (payload not inflated)."""

    opcode: int
    payload: bytes
    fin: bool
    rsv: int
    masked: bool

    def close(self) -> Close:
        """The code and reason of a close frame (1005 for an empty payload)."""
        assert self.opcode == OP_CLOSE, self
        return Close.parse(self.payload)


def _read_server_frame(
    read_exact: Callable[[int], Generator[None, None, bytearray]],
) -> Generator[None, None, ServerFrame]:
    head = yield from read_exact(2)
    b0, b1 = head[0], head[1]
    length = b1 & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", (yield from read_exact(2)))
    elif length == 127:
        (length,) = struct.unpack("!Q", (yield from read_exact(8)))
    mask = (yield from read_exact(4)) if b1 & 0x80 else b""
    payload = bytes((yield from read_exact(length)))
    if mask:
        payload = apply_mask(payload, bytes(mask))
    return ServerFrame(b0 & 0x0F, payload, bool(b0 & 0x80), (b0 >> 4) & 7, bool(mask))


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """A data message, assembled from its frames and inflated."""

    opcode: int
    payload: bytes
    compressed: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Deflate:
    """permessage-deflate as the server agreed to it (RFC 7692 §7.1)."""

    params: tuple[ExtensionParameter, ...]

    def _value(self, name: str) -> str | None:
        return next((v for k, v in self.params if k == name), None)

    @property
    def server_no_context_takeover(self) -> bool:
        return any(k == "server_no_context_takeover" for k, _ in self.params)

    @property
    def server_window_bits(self) -> int:
        """The window the server promised to compress within (15 when it said nothing)."""
        value = self._value("server_max_window_bits")
        return int(value) if value is not None else 15


class HandshakeRefused(Exception):
    """The server answered the opening handshake with something other than 101."""

    def __init__(self, response: Response) -> None:
        super().__init__(f"{response.status_code} {response.reason_phrase}")
        self.response = response


class WSClient:
    """One raw WebSocket connection over a blocking socket.

    Sends whatever frames a test builds; reads the server's frames as they are on the wire;
    assembles and inflates messages strictly (the window and context takeover the handshake
    agreed on, nothing more generous).
    """

    __slots__ = (
        "_fragments",
        "_inflater",
        "_reader",
        "deflate",
        "extensions_header",
        "response",
        "sock",
    )

    def __init__(
        self,
        host: str,
        port: int,
        *,
        extensions: str | None = None,
        path: str = "/connection/websocket",
        timeout: float = TIMEOUT,
    ) -> None:
        """Open the connection; ``extensions`` is sent verbatim as Sec-WebSocket-Extensions."""
        self._reader = StreamReader()
        self._inflater: zlib._Decompress | None = None
        self._fragments: list[ServerFrame] = []  # a server message being assembled
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = generate_key()
        headers = Headers()
        headers["Host"] = f"{host}:{port}"
        headers["Upgrade"] = "websocket"
        headers["Connection"] = "Upgrade"
        headers["Sec-WebSocket-Key"] = key
        headers["Sec-WebSocket-Version"] = "13"
        headers["Sec-WebSocket-Protocol"] = SUBPROTOCOL
        if extensions is not None:
            headers["Sec-WebSocket-Extensions"] = extensions
        head = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.raw_items())
        self.sock.sendall(head.encode() + b"\r\n")
        reader = self._reader
        self.response = self._drive(
            Response.parse(reader.read_line, reader.read_exact, reader.read_to_eof), timeout
        )
        if self.response.status_code != 101:
            self.sock.close()
            raise HandshakeRefused(self.response)
        assert self.response.headers["Sec-WebSocket-Accept"] == accept_key(key)
        self.extensions_header = self.response.headers.get("Sec-WebSocket-Extensions")
        self.deflate: Deflate | None = None
        if self.extensions_header is not None:
            accepted = parse_extension(self.extensions_header)
            assert [name for name, _ in accepted] == ["permessage-deflate"], accepted
            self.deflate = Deflate(tuple(accepted[0][1]))

    # -- plumbing -----------------------------------------------------------

    def _drive(self, parser: Generator[None, None, _T], timeout: float) -> _T:
        """Run a websockets-style generator parser, reading the socket whenever it waits."""
        deadline = time.monotonic() + timeout
        try:
            next(parser)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"nothing complete from the server within {timeout}s")
                self.sock.settimeout(left)
                try:
                    data = self.sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if data:
                    self._reader.feed_data(data)
                else:
                    self._reader.feed_eof()
                next(parser)
        except StopIteration as done:
            result: _T = done.value
            return result

    def close_socket(self) -> None:
        self.sock.close()

    def __enter__(self) -> WSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_socket()

    # -- sending ------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(
        self, opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0
    ) -> None:
        self.sock.sendall(encode_frame(opcode, payload, fin=fin, rsv=rsv))

    def send_fragments(
        self, fragments: Sequence[bytes], *, opcode: int = OP_TEXT, rsv1: bool = False
    ) -> None:
        """One message in ``len(fragments)`` frames (RSV1 on the first only, §6 of RFC 7692)."""
        for i, chunk in enumerate(fragments):
            self.send_frame(
                opcode if i == 0 else OP_CONT,
                chunk,
                fin=i == len(fragments) - 1,
                rsv=4 if rsv1 and i == 0 else 0,
            )

    def send_compressed(self, payload: bytes, *, split: Iterable[int] = (), **deflate: Any) -> None:
        """``payload`` deflated as one message (``deflate``: options of
        :func:`deflate_message`), cut at the ``split`` offsets of the compressed bytes into
        fragments (an offset of 0 or the end makes an empty first or last fragment)."""
        data = deflate_message(payload, **deflate)
        cuts = [0, *sorted(split), len(data)]
        self.send_fragments([data[a:b] for a, b in itertools.pairwise(cuts)], rsv1=True)

    def send_commands(self, *commands: dict[str, Any]) -> None:
        self.send_frame(OP_TEXT, "\n".join(json.dumps(c) for c in commands).encode())

    # -- receiving ----------------------------------------------------------

    def recv_frame(self, timeout: float = TIMEOUT) -> ServerFrame | None:
        """The next frame; None when the server closed the TCP connection first."""
        try:
            return self._drive(_read_server_frame(self._reader.read_exact), timeout)
        except EOFError:
            return None

    def recv_message(self, timeout: float = TIMEOUT) -> Message | ServerFrame | None:
        """The next complete data message, assembled and inflated; or the next control frame
        (which may come between the fragments of a message: those are kept for the next
        call); or None at EOF. Asserts what RFC 6455 demands of server frames."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.recv_frame(max(0.01, deadline - time.monotonic()))
            if frame is None:
                assert not self._fragments, "the server closed the TCP connection mid-message"
                return None
            assert not frame.masked, f"server frames must not be masked: {frame}"
            assert frame.rsv & 3 == 0, f"server set RSV2/RSV3: {frame}"
            if frame.opcode >= OP_CLOSE:
                assert frame.fin and frame.rsv == 0 and len(frame.payload) <= 125, frame
                return frame
            if not self._fragments:
                assert frame.opcode in (OP_TEXT, OP_BINARY), f"unexpected continuation {frame}"
            else:
                assert frame.opcode == OP_CONT and frame.rsv == 0, frame
            self._fragments.append(frame)
            if frame.fin:
                break
        first, *_ = fragments = self._fragments
        self._fragments = []
        payload = b"".join(f.payload for f in fragments)
        compressed = bool(first.rsv & 4)
        if compressed:
            payload = self.inflate(payload)
        if first.opcode == OP_TEXT:
            payload.decode("utf-8")  # the server must never send invalid UTF-8 as text
        return Message(first.opcode, payload, compressed)

    def inflate(self, payload: bytes) -> bytes:
        """Inflate one compressed message, holding the server to the window it agreed on.

        zlib checks a back-reference against its window only across calls: within one call,
        all the output produced so far counts as history, so a one-shot
        ``decompressobj(-9).decompress()`` accepts a 15-bit stream. Drawing the output one
        byte per call makes the window exact: a reference further back than
        ``2**server_max_window_bits`` fails ("invalid distance too far back"). With
        ``server_no_context_takeover`` every message must also inflate on a fresh object.
        """
        assert self.deflate is not None, "RSV1 set although permessage-deflate was not agreed"
        if self._inflater is None or self.deflate.server_no_context_takeover:
            self._inflater = zlib.decompressobj(-self.deflate.server_window_bits)
        inflater = self._inflater
        out = bytearray()
        pending = payload + _DEFLATE_TAIL
        while True:
            byte = inflater.decompress(pending, 1)
            pending = inflater.unconsumed_tail
            if not byte and not pending:
                return bytes(out)
            out += byte

    def messages(self, timeout: float = TIMEOUT) -> Generator[dict[str, Any], None, None]:
        """Centrifugo JSON messages of the text frames that arrive (control frames skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no more messages")
            got = self.recv_message(left)
            if got is None:
                raise EOFError("the server closed the connection")
            if isinstance(got, ServerFrame):
                if got.opcode == OP_CLOSE:
                    raise EOFError(f"the server closed the connection: {got.close()}")
                continue
            assert got.opcode == OP_TEXT, got
            for line in got.payload.split(b"\n"):
                if line:
                    yield json.loads(line)

    def reply(self, command_id: int, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The reply to command ``command_id`` (pushes and server pings are skipped)."""
        for message in self.messages(timeout):
            if message.get("id") == command_id:
                return message
        raise AssertionError("unreachable")  # pragma: no cover

    def connect(self) -> dict[str, Any]:
        """Start the Centrifugo session: most commands need it first."""
        self.send_commands({"id": 1, "connect": {}})
        reply = self.reply(1)
        assert "connect" in reply, reply
        return reply

    def expect_pong(self, payload: bytes, timeout: float = TIMEOUT) -> None:
        """The next control frame is a pong carrying ``payload`` (text frames skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.recv_message(max(0.01, deadline - time.monotonic()))
            if isinstance(got, Message):
                continue  # a server ping ({}) or a push
            assert got is not None, "the server closed the connection instead of answering"
            assert got.opcode == OP_PONG, f"expected a pong, got {got}"
            assert got.payload == payload, got
            return

    def expect_close(self, timeout: float = CLOSE_TIMEOUT) -> int | None:
        """Read until the server's close frame; return its code (None: TCP closed without one).

        Text frames before it are skipped; a pong before it is a failure (the cases that
        call this expect the connection to fail, not a ping to be answered). After the close
        frame the server must also close the TCP connection (RFC 6455 §7.1.1).
        """
        deadline = time.monotonic() + timeout
        while True:
            frame = self.recv_frame(max(0.01, deadline - time.monotonic()))
            if frame is None:
                return None
            if frame.opcode == OP_CLOSE:
                code = int(frame.close().code)
                assert self.recv_frame(max(0.01, deadline - time.monotonic())) is None, (
                    "data after the close frame"
                )
                return code
            assert frame.opcode in (OP_TEXT, OP_CONT), f"expected a close, got {frame}"
