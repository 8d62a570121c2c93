"""Fuzz targets: plain functions taking ``bytes``, shared by the suite and the long campaign.

Each target feeds one hostile input to one decoder (or to a whole connection)
and checks the invariants that decoder promises; a broken invariant raises
:class:`InvariantBroken`, any other exception escaping is a finding as well.
The pytest runner (``test_fuzz.py``, Hypothesis) and the coverage-guided
campaign (``campaign.py``, atheris, driven by ``scripts/fuzz``) call the same
functions, so every rule lives here once.

Inputs that need more than a byte stream take their parameters from the first
byte (the *plan* byte: chunking seed, peer behaviour, decoder options). Keeping
them inside the input makes every finding reproducible from its bytes alone.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import re
import zlib
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import h11
import httptools
import msgspec
from centrifuge.protocol import client_pb2 as sdk_pb
from google.protobuf.json_format import ParseDict
from google.protobuf.message import DecodeError
from websockets import exceptions as ws_exceptions
from websockets import frames as ws_frames
from websockets.streams import StreamReader

from tidings.centrifuge import (
    BadRequest,
    ClientSession,
    Command,
    Disconnect,
    SessionOptions,
    decode_commands,
)
from tidings.centrifuge import protobuf as centrifuge_protobuf
from tidings.centrifuge.session import NO_REQUEST_CONTEXT, RequestContext
from tidings.centrifuge.wire import JSON, Wire
from tidings.config import load_config
from tidings.cursor import decode_cursor, encode_cursor
from tidings.errors import ProtocolError
from tidings.hooks import TransportName
from tidings.http import HTTPConnection, Request
from tidings.http.messages import Headers
from tidings.hub import Position, Publication
from tidings.server import Server
from tidings.transports.common import (
    admit,
    authorize_channels,
    channel_names,
    requested_positions,
)

__all__ = ["SEEDS", "TARGETS", "InvariantBroken", "Target"]

T = TypeVar("T")


class InvariantBroken(AssertionError):
    """A target saw the code under test break one of its promises."""


def check(condition: object, message: str) -> None:
    """``assert`` that survives ``python -O`` and names the broken promise."""
    if not condition:
        raise InvariantBroken(message)


# --------------------------------------------------------------------------- shared runtime


class _Watch(logging.Handler):
    """Records what must never happen on client input: ERROR logs and tracebacks.

    DESIGN principle 5: client mistakes are logged below ERROR and without a
    traceback, since tracebacks on demand are a way to flood the logs.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.bad.append(f"{record.levelname} log with traceback: {record.getMessage()}")


#: Limits small enough for inputs of a few kilobytes to cross them (the
#: defaults — 16 KiB heads, 1 MiB bodies and write buffers — are out of reach).
_TIGHT_LIMITS = {
    "limits.max_request_head": 1024,
    "limits.max_body_size": 64,
    "limits.max_pipelined_requests": 2,
    "limits.max_write_buffer": 4096,
    "limits.max_channels_per_connection": 2,
    "websocket.max_message_size": 128,
}

#: Inputs served by one Server before a fresh one replaces it: the memory
#: broker keeps the history a fuzzed publish stored, and that must not pile up
#: across a million inputs and pass for growth in the code under test.
_SERVER_LIFETIME = 1000


class _Runtime:
    """One event loop and one (never started) Server, reused across inputs."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._on_loop_error)
        self.loop_errors: list[str] = []
        self.watch = _Watch()
        # Added, never replacing: pytest's own log capture keeps working.
        logger = logging.getLogger("tidings")
        logger.addHandler(self.watch)
        if logger.getEffectiveLevel() > logging.DEBUG:
            logger.setLevel(logging.DEBUG)  # to see a traceback logged below ERROR too
        self.configs = (load_config(), load_config(overrides=_TIGHT_LIMITS))
        self._servers: list[Server | None] = [None, None]
        self._served = [0, 0]

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.loop_errors.append(
            f"loop exception handler: {context.get('message')!r} {context.get('exception')!r}"
        )

    def server(self, tight: bool = False) -> Server:
        """The default server, or one whose limits a fuzzed input can reach."""
        kind = int(tight)
        self._served[kind] += 1
        server = self._servers[kind]
        if server is None or self._served[kind] > _SERVER_LIFETIME:
            server = self._servers[kind] = Server(self.configs[kind])
            server.websocket.loop = self.loop
            self._served[kind] = 1
        return server

    def run(self, coroutine: Any) -> Any:
        """Run one input's coroutine; report what went wrong on the side."""
        self.loop_errors.clear()
        self.watch.bad.clear()
        result = self.loop.run_until_complete(coroutine)
        problems = self.loop_errors + self.watch.bad
        check(not problems, "; ".join(problems))
        return result


_runtime: _Runtime | None = None


def runtime() -> _Runtime:
    global _runtime
    if _runtime is None:
        _runtime = _Runtime()
    return _runtime


async def _settle(turns: int = 2000) -> bool:
    """Let handlers run until no task but ours is pending (or ``turns`` pass).

    Returns False when something is still pending: a held long-poll or a
    handler waiting on a timer, which the caller then winds down.
    """
    current = asyncio.current_task()
    for _ in range(turns):
        await asyncio.sleep(0)
        if all(task is current or task.done() for task in asyncio.all_tasks()):
            await asyncio.sleep(0)  # callbacks scheduled by the last task
            return True
    return False


def _chunks(data: bytes, seed: int) -> Iterator[bytes]:
    """Split ``data`` the way a network might: seed 0 is one read, others vary."""
    if seed == 0 or not data:
        yield data
        return
    rng = random.Random(seed)
    sizes = (1, 2, 3, 5, 8, 13, 64, 512, 4096)
    start = 0
    while start < len(data):
        end = start + rng.choice(sizes)
        yield data[start:end]
        start = end


# --------------------------------------------------------------------------- 1. HTTP


#: The peer addresses a fuzzed connection may come from: loopback reaches the
#: server API without a key (the default), anything else does not.
_LOOPBACK = ("127.0.0.1", 40000)
_REMOTE = ("203.0.113.7", 40000)


class FakeTransport(asyncio.Transport):
    """What a protocol sees of a socket, with a peer that reads or does not.

    A peer that reads drains everything at once; one that never reads leaves
    every written byte unsent, and the transport tells the protocol to pause
    writing above the high-water mark as asyncio's socket transports do.
    """

    __slots__ = (
        "aborted",
        "closing",
        "high_water",
        "largest_write",
        "loop",
        "paused_reading",
        "peer",
        "peer_reads",
        "protocol",
        "unsent",
        "writes_after_close",
        "writing_paused",
        "written",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol: asyncio.BaseProtocol,
        *,
        peer_reads: bool,
        peer: tuple[str, int],
    ) -> None:
        super().__init__()
        self.loop = loop
        self.protocol = protocol
        self.peer_reads = peer_reads
        self.peer = peer
        self.written = bytearray()
        self.unsent = 0
        self.largest_write = 0
        self.high_water = 64 * 1024
        self.paused_reading = False
        self.writing_paused = False
        self.closing = False
        self.aborted = False
        self.writes_after_close = 0

    # -- what a protocol calls ---------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing:
            self.writes_after_close += 1
            return
        self.written += data
        self.largest_write = max(self.largest_write, len(data))
        if not self.peer_reads:
            self.unsent += len(data)
            if self.unsent > self.high_water and not self.writing_paused:
                self.writing_paused = True
                self.protocol.pause_writing()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self.high_water // 4, self.high_water)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high_water = 64 * 1024 if high is None else high

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.paused_reading = True

    def resume_reading(self) -> None:
        self.paused_reading = False

    def is_reading(self) -> bool:
        return not self.paused_reading and not self.closing

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.peer
        if name == "sockname":
            return ("127.0.0.1", 8000)
        return default


@dataclass(slots=True)
class _SentRequest:
    """A complete request as an independent parser read it from the input."""

    method: bytes
    headers: list[tuple[bytes, bytes]]


class _RequestLog:
    """httptools callbacks that list the complete requests of a byte stream."""

    def __init__(self) -> None:
        self.requests: list[_SentRequest] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.parser = httptools.HttpRequestParser(self)

    def on_message_begin(self) -> None:
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        self.requests.append(_SentRequest(self.parser.get_method(), self.headers))


def _complete_requests(stream: bytes) -> list[_SentRequest]:
    """The requests a conforming server must answer (up to the first error or upgrade)."""
    log = _RequestLog()
    try:
        log.parser.feed_data(stream)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        pass
    return log.requests


#: Request headers copied into the h11 replay, so that h11 reads the answers
#: the way the real client would (an upgrade, an expectation).
_REPLAYED = {b"upgrade", b"connection", b"expect"}
#: A header value h11 accepts to send (visible ASCII, no edge whitespace).
_H11_VALUE = re.compile(rb"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")


def _check_responses(requests: list[_SentRequest], output: bytes, *, complete: bool) -> None:
    """Read the server's bytes with h11 as the client of ``requests``.

    Every complete request gets one well-formed response, in order, until a
    response that closes the connection (``Connection: close``, an error, an
    upgrade, an SSE stream). At most one extra response may follow the last
    complete request, an error refusing what came after it. Unless
    ``complete`` (a peer that reads, a connection not aborted), the responses
    may stop anywhere: a server rightly stops answering a peer that does not
    read.
    """
    client = h11.Connection(h11.CLIENT)
    client.receive_data(output)
    # The transport is closed by now: EOF is given when h11 asks (for h11, no data is EOF).
    at_eof = not output
    extra = _SentRequest(b"GET", [])
    for index, request in enumerate([*requests, extra]):
        headers = [(b"host", b"fuzz")]
        headers += [
            (n.lower(), v)
            for n, v in request.headers
            if n.lower() in _REPLAYED and _H11_VALUE.fullmatch(v)
        ]
        client.send(h11.Request(method=request.method, target=b"/", headers=headers))
        client.send(h11.EndOfMessage())
        status = 0
        closes = False
        while True:
            try:
                event = client.next_event()
            except h11.RemoteProtocolError as exc:
                if status or not at_eof or client.trailing_data[0]:
                    raise InvariantBroken(
                        f"response {index + 1} is not valid HTTP/1.1: {exc}"
                    ) from None
                event = h11.ConnectionClosed()  # nothing at all came for this request
            if event is h11.NEED_DATA and not at_eof:
                client.receive_data(b"")
                at_eof = True
                continue
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                last = index == len(requests)
                check(
                    last or not complete,
                    f"request {index + 1} of {len(requests)} got no response",
                )
                return
            if isinstance(event, h11.Response):
                status = event.status_code
                closes = any(n == b"connection" and b"close" in v.lower() for n, v in event.headers)
            elif isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                method = request.method
                check(
                    method == b"GET", f"a WebSocket upgrade accepted on {method!r} (RFC 6455 §4.1)"
                )
                _check_server_frames(bytes(client.trailing_data[0]), event.headers, complete)
                return
            elif isinstance(event, h11.EndOfMessage):
                break
            if client.our_state is h11.SWITCHED_PROTOCOL:
                return
        if index == len(requests):
            check(status >= 400, f"a response ({status}) without a request")
            check(closes, "an error after the last request does not close the connection")
        if closes or client.their_state is h11.MUST_CLOSE:
            rest = client.trailing_data[0]
            check(not rest, f"bytes after a closing response: {bytes(rest[:60])!r}")
            return
        client.start_next_cycle()


#: Close codes a server may send (RFC 6455 §7.4.1; 1005 and 1006 never go on the wire).
_SERVER_CLOSE = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}


def _check_server_frames(stream: bytes, headers: Any, complete: bool) -> None:
    """Read what followed a 101 as the client would, with websockets' frame parser.

    Every frame is well-formed and unmasked, every text message valid UTF-8,
    the close frame's code one a server may send, and nothing follows it.
    Compressed sessions are left to the compliance suite: inflating them here
    would mean re-negotiating the fuzzed offer.
    """
    if any(name == b"sec-websocket-extensions" for name, _ in headers):
        return
    reader = StreamReader()
    reader.feed_data(stream)
    reader.feed_eof()
    text: bytearray | None = None
    while reader.buffer:
        parser = ws_frames.Frame.parse(reader.read_exact, mask=False, extensions=[])
        try:
            next(parser)
        except StopIteration as done:
            frame: ws_frames.Frame = done.value
        except EOFError:
            check(not complete, f"the server stopped in the middle of a frame: {stream[-40:]!r}")
            return
        except (ws_exceptions.ProtocolError, ValueError) as exc:
            raise InvariantBroken(f"the server sent an invalid frame: {exc}") from None
        else:
            check(not complete, "the server stopped in the middle of a frame")
            return
        if frame.opcode is ws_frames.Opcode.TEXT:
            text = bytearray()
        if frame.opcode in (ws_frames.Opcode.TEXT, ws_frames.Opcode.CONT) and text is not None:
            text += frame.data
            if frame.fin:
                try:
                    text.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise InvariantBroken(
                        f"the server sent text that is not UTF-8: {exc}"
                    ) from None
                text = None
        elif frame.opcode is ws_frames.Opcode.CLOSE:
            if frame.data:
                try:
                    close = ws_frames.Close.parse(frame.data)
                except (ws_exceptions.ProtocolError, UnicodeDecodeError) as exc:
                    raise InvariantBroken(f"the server sent an invalid close: {exc}") from None
                code = close.code
                check(code in _SERVER_CLOSE or 3000 <= code <= 4999, f"close code {code} sent")
            left = len(reader.buffer)
            check(not left, f"{left} bytes sent after the close frame")
            return


def _connection_state_bounded(
    conn: HTTPConnection, server: Server, transport: FakeTransport
) -> None:
    """What one connection may hold while its requests wait (DESIGN principle 4)."""
    limits = server.config.limits
    if not transport.aborted:
        check(
            transport.unsent <= limits.max_write_buffer + transport.largest_write,
            f"{transport.unsent} bytes unsent to a peer that does not read "
            f"(limits.max_write_buffer {limits.max_write_buffer})",
        )
    queue = getattr(conn, "_queue", None)
    if queue is not None:
        # Requests waiting their turn, plus at most one refusal queued behind them.
        check(
            len(queue) <= limits.max_pipelined_requests + 1,
            f"{len(queue)} requests queued (limit {limits.max_pipelined_requests})",
        )


async def _serve_http(data: bytes) -> None:
    plan, stream = data[0], data[1:]
    server = runtime().server(tight=bool(plan & 4))
    conn = HTTPConnection(server.site)
    transport = FakeTransport(
        asyncio.get_running_loop(),
        conn,
        peer_reads=not plan & 1,
        peer=_LOOPBACK if plan & 2 else _REMOTE,
    )
    conn.connection_made(transport)
    delivered = 0
    for chunk in _chunks(stream, plan >> 3):
        if transport.closing:
            break
        if transport.paused_reading:
            await _settle()
            if transport.paused_reading:
                break  # a real socket would leave the rest unread
        protocol = transport.protocol
        assert isinstance(protocol, asyncio.Protocol)
        protocol.data_received(chunk)
        delivered += len(chunk)
        _connection_state_bounded(conn, server, transport)
        await _settle()
        _connection_state_bounded(conn, server, transport)
    # Wind down as a graceful shutdown does: held polls answer, in-flight
    # requests finish, and (the server stopping) none is held any more.
    protocol = transport.protocol
    shutdown: Callable[[], None] | None = getattr(protocol, "shutdown", None)
    if shutdown is not None and not transport.closing:
        server.connections.stopping = True
        try:
            shutdown()
            await _settle()
        finally:
            server.connections.stopping = False
    _connection_state_bounded(conn, server, transport)
    transport.close()
    await _settle()
    check(conn not in server.connections, "a closed connection is still registered")
    check(not server.sse.streams, "a closed SSE stream is still registered")
    _check_responses(
        _complete_requests(stream[:delivered]),
        bytes(transport.written),
        complete=transport.peer_reads and not transport.aborted,
    )


def http_request(data: bytes) -> None:
    """Raw bytes, in the chunking the plan byte picks, into one HTTP connection.

    Plan byte: bit 0 set = the peer never reads; bit 1 set = it connects from
    loopback (the API answers without a key); bit 2 set = the server has
    tight limits (``_TIGHT_LIMITS``); bits 3-7 seed the chunking.
    """
    if not data:
        return
    runtime().run(_serve_http(data))


# --------------------------------------------------------------------------- 3. commands


class _RecordingTransport:
    """The connection a fuzzed session speaks through: it records what it would send.

    A publication is recorded as the push bytes every WebSocket subscriber
    of its wire format would get, so invalid data a fuzzed publish stored
    shows up here.
    """

    __slots__ = ("closed_with", "push", "sent")

    def __init__(self, wire: Wire = JSON) -> None:
        self.sent: list[bytes] = []
        self.closed_with: tuple[int, str] | None = None
        self.push = wire.push

    def write_payload(self, payload: bytes) -> None:
        self.sent.append(payload)

    def write_publication(self, pub: Publication) -> None:
        self.sent.append(self.push(pub))

    def pong(self) -> None:
        pass

    def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)

    @property
    def transport_name(self) -> TransportName:
        return "websocket"

    def request_context(self) -> RequestContext:
        return NO_REQUEST_CONTEXT


def _valid_json_lines(payload: bytes, what: str) -> None:
    """Nothing invalid leaves the server: every line is UTF-8 JSON (principle 5)."""
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvariantBroken(f"{what} is not valid UTF-8: {exc}: {payload[:80]!r}") from None
    for line in payload.split(b"\n"):
        try:
            msgspec.json.decode(line)
        except msgspec.DecodeError as exc:
            raise InvariantBroken(f"{what} holds invalid JSON ({exc}): {line[:80]!r}") from None


def command_decoder(data: bytes) -> None:
    """``decode_commands`` raises :class:`BadRequest` or returns commands, nothing else."""
    try:
        commands = decode_commands(data)
    except BadRequest:
        return
    check(commands, "a frame decoded to no command")
    check(all(isinstance(cmd, Command) for cmd in commands), "decoded a non-command")


async def _run_session(data: bytes) -> None:
    server = runtime().server()
    transport = _RecordingTransport()
    session = ClientSession(server.hub, SessionOptions(access=server.access), transport)
    try:
        outcome = await session.handle(data)
        check(outcome is None or isinstance(outcome, Disconnect), f"handle gave {outcome!r}")
        await _settle()
        for payload in transport.sent:
            _valid_json_lines(payload, "a frame sent to the client")
    finally:
        session.release()


def command_session(data: bytes) -> None:
    """One frame of commands through a session on a real (memory) hub.

    The session subscribes to what the frame asks and receives its own
    publications, so invalid data stored by a publish shows up in a push.
    """
    runtime().run(_run_session(data))


# --------------------------------------------------------------------------- 3b. Protobuf

#: What the Protobuf decoder may close with: bad request, or invalid UTF-8.
_PROTOBUF_CLOSE_CODES = {3501, 1007}


def _check_json_data(commands: list[Command]) -> None:
    """Every ``data`` a Protobuf command carries is what the JSON form would accept:
    UTF-8 JSON (the hub stores it and JSON subscribers receive it as it is)."""
    for cmd in commands:
        requests = (cmd.connect, cmd.subscribe, cmd.publish, cmd.rpc, cmd.send)
        subs = list((cmd.connect.subs or {}).values()) if cmd.connect is not None else []
        for req in (*requests, *subs):
            data = getattr(req, "data", None)
            if data:
                raw = bytes(data)
                try:
                    raw.decode("utf-8")
                    msgspec.json.decode(raw)
                except (UnicodeDecodeError, msgspec.DecodeError) as exc:
                    raise InvariantBroken(f"data accepted that is not JSON: {raw[:80]!r}") from exc


def protobuf_command_decoder(data: bytes) -> None:
    """``protobuf.decode_commands`` raises :class:`BadRequest` (3501 or 1007) or returns
    commands whose data is JSON and whose offsets the JSON form would accept."""
    try:
        commands = centrifuge_protobuf.decode_commands(data)
    except BadRequest as exc:
        code = exc.disconnect.code
        check(code in _PROTOBUF_CLOSE_CODES, f"BadRequest closing with {code}")
        return
    check(commands, "a frame decoded to no command")
    check(all(isinstance(cmd, Command) for cmd in commands), "decoded a non-command")
    _check_json_data(commands)
    for cmd in commands:
        offsets = [cmd.subscribe.offset] if cmd.subscribe is not None else []
        if cmd.history is not None and cmd.history.since is not None:
            offsets.append(cmd.history.since.offset)
        check(all(0 <= o <= 2**63 - 1 for o in offsets), f"offsets {offsets} accepted")


def _sdk_replies(payload: bytes, what: str) -> list[Any]:
    """``payload`` read as centrifuge-python reads a Protobuf frame; InvariantBroken if it can't.
    Every ``data`` in a push must be JSON (a JSON subscriber gets the same bytes)."""
    replies = []
    pos = 0
    while pos < len(payload):
        length, pos = centrifuge_protobuf._read_varint(payload, pos)
        check(pos + length <= len(payload), f"{what}: a reply runs past the frame")
        try:
            reply = sdk_pb.Reply.FromString(payload[pos : pos + length])
        except DecodeError as exc:
            raise InvariantBroken(f"{what}: not a Reply: {payload[:80]!r}") from exc
        pos += length
        if reply.HasField("push") and reply.push.HasField("pub"):
            try:
                msgspec.json.decode(reply.push.pub.data)
            except msgspec.DecodeError as exc:
                raise InvariantBroken(f"{what}: a push whose data is not JSON") from exc
        replies.append(reply)
    return replies


async def _run_protobuf_session(data: bytes) -> None:
    server = runtime().server()
    transport = _RecordingTransport(centrifuge_protobuf.PROTOBUF)
    session = ClientSession(
        server.hub, SessionOptions(access=server.access), transport, centrifuge_protobuf.PROTOBUF
    )
    try:
        outcome = await session.handle(data)
        check(outcome is None or isinstance(outcome, Disconnect), f"handle gave {outcome!r}")
        await _settle()
        for payload in transport.sent:
            _sdk_replies(payload, "a frame sent to the client")
    finally:
        session.release()


def protobuf_session(data: bytes) -> None:
    """One Protobuf frame of commands through a session on a real (memory) hub; what
    the client would receive reads as Protobuf replies to centrifuge-python."""
    runtime().run(_run_protobuf_session(data))


# --------------------------------------------------------------------------- 4. cursor


def cursor(data: bytes) -> None:
    """``decode_cursor`` raises ProtocolError or returns positions that re-encode.

    Plan byte: odd = the rest is what the cursor carries (it is base64-encoded
    first, so mutations reach the JSON inside, not only the base64 around it);
    even = the rest is the token itself, as a query string or header brings it.
    """
    if not data:
        return
    if data[0] & 1:
        token = base64.urlsafe_b64encode(data[1:]).rstrip(b"=").decode("ascii")
    else:
        token = data[1:].decode("utf-8", "replace")
    try:
        positions = decode_cursor(token)
    except ProtocolError:
        return
    check(isinstance(positions, dict), "decode_cursor returned no dict")
    for channel, position in positions.items():
        check(isinstance(channel, str), f"channel {channel!r} is no str")
        check(isinstance(position, Position), f"position {position!r}")
        check(isinstance(position.offset, int), f"offset {position.offset!r}")
    check(decode_cursor(encode_cursor(positions)) == positions, "cursor does not round-trip")


# --------------------------------------------------------------------------- 5. query


def query(data: bytes) -> None:
    """A query string through ``Request.query`` and the subscribe transports' readers."""
    try:
        url = httptools.parse_url(b"/poll?" + data)
    except httptools.HttpParserInvalidURLError:
        return  # the HTTP target covers URLs the parser refuses (400)
    text = url.query.decode("utf-8", "replace") if url.query else ""
    server = runtime().server()
    request = Request("GET", b"/poll", "/poll", text, Headers([]), _REMOTE, True)
    try:
        params = request.query
    except ProtocolError:
        return  # not UTF-8: a 400
    check(
        all(isinstance(k, str) and all(isinstance(v, str) for v in vs) for k, vs in params.items()),
        "query is not a dict of str lists",
    )
    gate = server.poll.gate
    channels: list[str] | None
    try:
        names = channel_names(request)
        credentials = _without_waiting(admit(request, gate, "poll"))
        _without_waiting(authorize_channels(request, gate, credentials, names, "poll"))
        channels = names
    except ProtocolError:
        channels = None
    if channels is not None:
        limit = server.config.limits.max_channels_per_connection
        check(0 < len(channels) <= limit, f"{len(channels)} channels accepted")
        check(len(set(channels)) == len(channels), "a channel accepted twice")
        for channel in channels:
            server.access.validate_channel(channel)  # raises if one slipped through
            check("\ufffd" not in channel, f"channel {channel!r} holds what was not UTF-8")
    try:
        positions = requested_positions(request.query_value("cursor"))
    except ProtocolError:
        return
    check(positions is None or isinstance(positions, dict), "positions not a dict")


def _without_waiting(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never waits: the subscribe transports'
    readers, without hooks, decide without suspending (no loop needed)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coro.close()
    raise InvariantBroken("a reader suspended although no hook is registered")


# --------------------------------------------------------------------------- 2. frames


def _frame(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False) -> bytes:
    """A masked client frame (RFC 6455 §5.2), for the seed corpus."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    length = len(payload)
    if length < 126:
        head = bytes([first, 0x80 | length])
    elif length < 1 << 16:
        head = bytes([first, 0x80 | 126]) + length.to_bytes(2, "big")
    else:
        head = bytes([first, 0x80 | 127]) + length.to_bytes(8, "big")
    mask = b"\x37\xfa\x21\x3d"
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _deflated(payload: bytes) -> bytes:
    """permessage-deflate body of one message (RFC 7692 §7.2.1)."""
    compressor = zlib.compressobj(wbits=-15)
    return (compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


#: ``frames.FrameReader`` is being written in parallel; the target is skipped
#: (and said so) until the module exists.
try:
    from tidings import frames as _frames
except ImportError:  # pragma: no cover - until frames.py lands
    _frames = None  # type: ignore[assignment]

#: Close codes a FrameError may carry: protocol error, invalid data, too big.
_FRAME_ERROR_CODES = {1002, 1007, 1009}
#: Largest frame header: 2 bytes, 8 of extended length, 4 of mask.
_MAX_HEADER = 14


def frames_available() -> bool:
    return _frames is not None


#: Close codes a client may send (RFC 6455 §7.4.1, IANA registry, 3000-4999).
_VALID_CLOSE = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}


def frame_reader(data: bytes) -> None:
    """Client bytes into ``FrameReader``; only FrameError may escape.

    Plan byte: bit 0 = permessage-deflate negotiated; bits 1-3 pick the client
    window bits (8 + n, capped at 15); bits 4-7 seed the chunking. The message
    size limit is small (1024) so that fuzzed inputs reach it.
    """
    if not data or _frames is None:
        return
    plan, stream = data[0], data[1:]
    max_size = 1024
    reader = _frames.FrameReader(
        max_size, deflate=bool(plan & 1), client_window_bits=min(15, 8 + ((plan >> 1) & 7))
    )
    finished = False
    for chunk in _chunks(stream, plan >> 4):
        try:
            events = reader.feed(chunk)
        except _frames.FrameError as exc:
            check(exc.code in _FRAME_ERROR_CODES, f"FrameError with close code {exc.code}")
            check(not finished, "a FrameError after the reader had finished")
            finished = True
            continue  # what follows must be ignored, not parsed
        check(not (finished and events), f"events after the end of the stream: {events!r}")
        for event in events:
            _check_frame_event(event, max_size)
            if isinstance(event, _frames.CloseReceived):
                finished = True
        held = max(reader.buffered, _held_bytes(reader))
        check(
            held <= max_size + _MAX_HEADER,
            f"reader holds {held} bytes (limit {max_size} + {_MAX_HEADER})",
        )


def _check_frame_event(event: object, max_size: int) -> None:
    if isinstance(event, _frames.Message):
        check(len(event.payload) <= max_size, f"a {len(event.payload)}-byte message")
        if event.text:
            try:
                bytes(event.payload).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvariantBroken(f"a text message is not UTF-8: {exc}") from None
    elif isinstance(event, _frames.Ping | _frames.Pong):
        check(len(event.payload) <= 125, f"a {len(event.payload)}-byte control frame")
    elif isinstance(event, _frames.CloseReceived):
        code = event.code
        check(
            code is None or code in _VALID_CLOSE or 3000 <= code <= 4999,
            f"close code {code} accepted",
        )
        check(isinstance(event.reason, str), "close reason is not text")
    else:
        raise InvariantBroken(f"unknown event {event!r}")


def _held_bytes(obj: object, depth: int = 2) -> int:
    """Bytes an object holds, measured from outside: its bytes-like slots, and
    those of the slotted objects it refers to (the reader's fragment state)."""
    total = 0
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            value = getattr(obj, name, None)
            if isinstance(value, bytes | bytearray | memoryview):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(v) for v in value if isinstance(v, bytes | bytearray))
            elif depth and value is not None and hasattr(type(value), "__slots__"):
                total += _held_bytes(value, depth - 1)
    return total


# --------------------------------------------------------------------------- seeds


def _http_seeds() -> list[bytes]:
    get = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    poll = b"GET /poll?channel=news&timeout=0 HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b'{"channel":"news","data":{"text":"hi"}}'
    chunked = (
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % 10
        + body[:10]
        + b"\r\n"
        + b"%x\r\n" % (len(body) - 10)
        + body[10:]
        + b"\r\n0\r\n\r\n"
    )
    sse = b"GET /sse?channel=news HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
    ws = (
        b"GET /connection/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n" + _frame(0x1, b'{"id":1,"connect":{}}')
    )
    held = (
        b"GET /poll?channel=news&cursor="
        + encode_cursor({"news": Position("e", 0)}).encode()
        + b"&timeout=5 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    expect = (
        b"POST /api/info HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}"
    )
    return [
        b"\x00" + get,
        b"\x02" + get + poll,  # a pipelined pair, from loopback
        b"\x0a" + chunked,  # from loopback, in reads of varied sizes
        b"\x00" + sse,
        b"\x08" + ws,
        b"\x00" + held,
        b"\x02" + expect,
        b"\x01" + b"GET /tidings.js HTTP/1.1\r\nHost: x\r\n\r\n" * 4,
        b"\x00" + b"HEAD /health HTTP/1.0\r\n\r\n",
        # The same against tight limits (plan bit 2), where fuzzed inputs reach them.
        b"\x04" + get + poll,
        b"\x06" + chunked,
        b"\x05" + b"GET /tidings.js HTTP/1.1\r\nHost: x\r\n\r\n" * 2,
    ]


def _frame_seeds() -> list[bytes]:
    hello = b'{"id":1,"connect":{}}'
    compressed = _deflated(
        b'{"id":2,"publish":{"channel":"news","data":{"t":"' + b"x" * 200 + b'"}}}'
    )
    third = len(compressed) // 3
    return [
        b"\x00" + _frame(0x1, hello),  # a masked text frame
        b"\x00" + _frame(0x9, b"ping") + _frame(0x8, b"\x03\xe8bye"),
        b"\x00"
        + _frame(0x1, hello[:5], fin=False)
        + _frame(0x9, b"")
        + _frame(0x0, hello[5:]),  # fragmented, a ping in between
        b"\x1f"  # compressed, fragmented in three, 15-bit window
        + _frame(0x1, compressed[:third], fin=False, rsv1=True)
        + _frame(0x0, compressed[third : 2 * third], fin=False)
        + _frame(0x0, compressed[2 * third :]),
        b"\x00" + _frame(0x2, bytes(range(200))),
        # At the size limit (1024), whole and in two fragments: one repeated
        # fragment or one byte more of length must be refused with 1009.
        b"\x00" + _frame(0x1, b"a" * 1024),
        b"\x00" + _frame(0x2, b"b" * 512, fin=False) + _frame(0x0, b"c" * 512),
        b"\x00" + _frame(0x1, "héllo wörld ✓".encode()),
    ]


def _command_seeds() -> list[bytes]:
    return [
        b'{"id":1,"connect":{"name":"js"}}',
        b'{"id":1,"connect":{}}\n{"id":2,"subscribe":{"channel":"news"}}\n'
        b'{"id":3,"publish":{"channel":"news","data":{"text":"hi"}}}',
        b'{"id":1,"connect":{}}\n{"id":2,"subscribe":{"channel":"news","recover":true,'
        b'"epoch":"e","offset":0}}\n{"id":3,"history":{"channel":"news","limit":10}}',
        b'{"id":1,"connect":{}}\n{"id":2,"presence":{"channel":"news"}}\n{}',
        b'{"id":1,"connect":{"token":"x.y.z"}}',
        b'{"id":1,"connect":{}}\n{"id":2,"subscribe":{"channel":"a"}}\n'
        b'{"id":3,"unsubscribe":{"channel":"a"}}\n{"id":4,"presence_stats":{"channel":"a"}}\n'
        b'{"id":5,"rpc":{"method":"m","data":{}}}\n{"send":{"data":{"x":1}}}\n'
        b'{"id":6,"refresh":{"token":"t"}}\n{"id":7,"sub_refresh":{"channel":"a","token":"t"}}\n'
        b'{"id":8,"ping":{}}',
    ]


def _protobuf_seeds() -> list[bytes]:
    """The command seeds in Protobuf form, built with centrifuge-python's classes."""

    def as_protobuf(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                key: base64.b64encode(msgspec.json.encode(item)).decode()
                if key == "data"
                else as_protobuf(item)
                for key, item in value.items()
            }
        return value

    seeds = []
    for seed in _command_seeds():
        frame = b""
        for line in seed.split(b"\n"):
            command = ParseDict(as_protobuf(msgspec.json.decode(line)), sdk_pb.Command())
            body = command.SerializeToString()
            frame += centrifuge_protobuf._varint(len(body)) + body
        seeds.append(frame)
    return seeds


def _cursor_seeds() -> list[bytes]:
    one = encode_cursor({"news": Position("abc", 3)})
    two = encode_cursor({"news": Position("abc", 3), "chat:room": Position("", 0)})
    return [
        b"\x00" + one.encode(),
        b"\x00" + two.encode(),
        b"\x00",
        b'\x01[["news","abc",3]]',
        b'\x01[["news","abc",3],["chat:room","",0]]',
    ]


def _query_seeds() -> list[bytes]:
    token = encode_cursor({"news": Position("abc", 3)}).encode()
    return [
        b"channel=news",
        b"channel=news&channel=chat%3Aroom&cursor=" + token + b"&timeout=0",
        b"channel=a+b&sub_token=x&token=y",
        b"channel=%E2%9C%93&channel=news",
    ]


@dataclass(frozen=True, slots=True)
class Target:
    """A fuzz target, its seed corpus, and the longest input worth trying."""

    run: Callable[[bytes], None]
    seeds: list[bytes]
    max_len: int


TARGETS: dict[str, Target] = {
    "http": Target(http_request, _http_seeds(), 8192),
    "frames": Target(frame_reader, _frame_seeds(), 4096),
    "commands": Target(command_decoder, _command_seeds(), 4096),
    "session": Target(command_session, _command_seeds(), 4096),
    "protobuf_commands": Target(protobuf_command_decoder, _protobuf_seeds(), 4096),
    "protobuf_session": Target(protobuf_session, _protobuf_seeds(), 4096),
    "cursor": Target(cursor, _cursor_seeds(), 2048),
    "query": Target(query, _query_seeds(), 2048),
}

SEEDS = {name: target.seeds for name, target in TARGETS.items()}
