"""One HTTP/1.1 connection: an ``asyncio.Protocol`` driving an httptools parser.

Why not asyncio streams or an ASGI server: a stream reader and a task per
connection cost kilobytes that an idle subscriber does not need (DESIGN
principle 3). Here the parser's callbacks build :class:`Request` values;
requests queue up in arrival order and are answered one after another, which
gives pipelining its required ordering for free.

A request's handler may answer at once, answer later (a held long-poll calls
:meth:`HTTPConnection.respond_held`), or take the socket over entirely (SSE and
WebSocket call :meth:`HTTPConnection.detach`, after which this object and its
parser are garbage and the stream's own small protocol object remains).

The connection's state is two values from :mod:`tidings.http.state` (where the
parser is; what is being answered), changed only through its transition
tables, plus the transport's backpressure signal.

Every bound answers clearly and closes only the offending connection: a head
over ``limits.max_request_head`` gets 431, a body over ``limits.max_body_size``
413, unparsable bytes 400; a request that arrives too slowly (slowloris) is
cut off after ``timeouts.request``, an idle keep-alive connection after
``timeouts.keepalive``.

What one connection may make the server hold, whatever its peer does:

* **Unsent bytes: at most ``limits.max_write_buffer`` plus one response.** The
  transport's high-water mark is ``limits.max_write_buffer``. A response is
  only started while the buffer is under it; the response that crosses it is
  written whole (a history answer may legitimately be larger than the limit),
  then ``pause_writing`` stops reading and answering until the peer drains the
  buffer under a quarter of the mark. A peer that has not done so within
  ``timeouts.write`` is aborted. (The only other bytes written are 25-byte
  ``100 Continue`` lines, one per request read, and nothing is read while
  paused.)
* **Queued requests: at most ``limits.max_pipelined_requests``** (plus one
  refusal): bytes beyond the request that fills the queue stay unparsed, and
  the socket is not read, until the queue has room.
* **A request head: at most ``limits.max_request_head`` plus one parser slice**
  (:data:`_SLICE`), counted per request, whatever its chunking.
* **A held answer: only while the peer is there.** EOF from the peer while
  a long-poll is held (or while its handler still joins) releases the waiter
  and closes at once (:meth:`HTTPConnection.eof_received`), instead of
  holding both until the poll's timeout; requests answered at once are still
  answered after a half-close.
* **A closing socket: a bounded time.** After its last response a connection
  gets ``timeouts.write`` (after a refusal, :data:`_LINGER`) to take it, then it
  is aborted; a peer that never reads cannot keep its socket.

**Capacity** (``limits.max_connections``, decided by
:meth:`~tidings.connections.Connections.admit` when the socket is accepted): a
connection accepted over the cap is served one answer, whatever it asks — 503
with ``Retry-After`` and ``Connection: close``, with its CORS headers, so that
a browser page can read it (a WebSocket handshake gets the same answer). Its
request head must arrive within :data:`_LINGER`; then it lingers like any
refusal. So a refused connection is gone within twice :data:`_LINGER`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, cast

import httptools

from ..connections import RETRY_AFTER, Admission
from ..errors import ErrorCode, ProtocolError
from ..logs import AccessEntry, log_client_error
from .messages import Headers, Request, Response, error_response, json_response
from .routing import Held
from .state import ANSWERING, NOT_PARSING, READING, Answering, Reading, advance

if TYPE_CHECKING:
    from .site import Site

__all__ = ["HTTPConnection"]

log = logging.getLogger(__name__)

#: Seconds a refused connection drains what its peer still sends (so that our
#: answer is not destroyed by a reset) before it is aborted.
_LINGER = 2.0

#: Most bytes handed to the parser at once. httptools tells nothing of where in
#: the fed bytes a request began, so a request head is measured in whole
#: slices; 4 KiB keeps that error small. Slicing costs nothing measurable:
#: 1 MiB of body fed in 4 KiB slices took 0.09 ms, in one piece 0.68 ms.
_SLICE = 4096

#: The fewest bytes a complete request takes: llhttp accepts the HTTP/0.9
#: form "GET /\r\n\r\n" (9 bytes, and nothing may follow it on the
#: connection); a keep-alive request takes 18. Feeding at most
#: ``room * _SHORTEST_REQUEST`` bytes cannot complete more than ``room``
#: requests, which keeps the queue within its bound exactly.
_SHORTEST_REQUEST = 9

#: SO_LINGER on, zero seconds: close() resets the connection and drops unsent bytes.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)

#: ``_raw_head`` while the head in progress began inside the slice being fed.
_BEGAN_IN_SLICE = -1

#: The answer to every request on a connection accepted over ``limits.max_connections``.
#: 503 is the status of a server that cannot serve *now*; the error code is
#: Centrifugo's temporary "too many requests", so clients retry.
_AT_CAPACITY = json_response(
    {
        "error": {
            "code": int(ErrorCode.TOO_MANY_REQUESTS),
            "message": "server at capacity: retry later",
        }
    },
    503,
    close=True,
)
_AT_CAPACITY.headers.append(("Retry-After", str(RETRY_AFTER)))
#: Lets a cross-origin page read ``Retry-After`` (not a CORS-safelisted header).
_EXPOSE_RETRY_AFTER = ("Access-Control-Expose-Headers", "Retry-After")


#: How early a loop timer may fire and still run what is due (uvloop's clock
#: counts milliseconds): earlier, it is made again for the rest.
_TIMER_SLACK = 0.001

#: How to answer a held request: (HEAD?, keep-alive?, CORS headers).
_ReplyTo = tuple[bool, bool, Sequence[tuple[str, str]]]

#: The same without CORS headers, by HEAD? and keep-alive?: shared.
_PLAIN: tuple[tuple[_ReplyTo, _ReplyTo], tuple[_ReplyTo, _ReplyTo]] = (
    ((False, False, ()), (False, True, ())),
    ((True, False, ()), (True, True, ())),
)


class _Refusal(Exception):
    """Raised inside a parser callback to stop parsing and answer with an error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class HTTPConnection(asyncio.Protocol):
    __slots__ = (
        "_access",
        "_answering",
        "_body",
        "_body_size",
        "_due",
        "_head_size",
        "_headers",
        "_held",
        "_loop",
        "_on_due",
        "_queue",
        "_raw_head",
        "_reading",
        "_reply_to",
        "_request",
        "_sending_paused",
        "_task",
        "_timer",
        "_unparsed",
        "_url",
        "client",
        "parser",
        "site",
        "transport",
    )

    def __init__(self, site: Site) -> None:
        self.site = site
        self.transport: asyncio.Transport | None = None
        # The loop, kept: asyncio.get_running_loop() makes a getpid() system
        # call each time (CPython 3.11), 6 % of a long-poll's CPU when asked
        # per request (py-spy --native, bench/run.py --transports poll).
        self._loop = asyncio.get_running_loop()
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.client: tuple[str, int] | None = None
        self._reading = Reading.IDLE
        self._answering = Answering.READY
        # Set by the transport's pause_writing (over high water), cleared by
        # resume_writing; see the module docstring for the bound it gives.
        self._sending_paused = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        # Raw bytes of the head in progress (a lower bound; see _feed).
        self._raw_head = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._request: Request | None = None
        # Requests waiting their turn (pipelining). A list, not a deque: it is
        # almost always empty or one long, and an empty deque costs 760 bytes
        # on every connection.
        self._queue: list[Request | Response] = []
        # Bytes received but not parsed while the queue is full or the peer is
        # not reading our answers: a view, so that taking a request off its
        # front does not copy the rest (that was quadratic in the read size).
        self._unparsed: memoryview | bytes = b""
        self._held: Held | None = None
        # How to answer a held request: (HEAD?, keep-alive?, CORS headers), so
        # that the Request itself need not be kept while it waits.
        self._reply_to: _ReplyTo | None = None
        self._task: asyncio.Task[None] | None = None
        # The connection's one deadline (see _arm): what runs, when, and the
        # loop timer that fires by then (made only when none fires in time).
        self._on_due: Callable[[HTTPConnection], None] | None = None
        self._due = 0.0
        self._timer: asyncio.TimerHandle | None = None
        # The request being answered, for its access log line (only with --access-log).
        self._access: AccessEntry | None = None

    # -- state -----------------------------------------------------------

    def _enter(self, state: Answering) -> None:
        self._answering = advance(ANSWERING, self._answering, state)

    def _read_to(self, state: Reading) -> None:
        self._reading = advance(READING, self._reading, state)

    def _stop_reading(self) -> None:
        """Parse nothing more on this connection."""
        if self._reading not in NOT_PARSING:
            self._read_to(Reading.STOPPED)
        self.parser = None
        self._unparsed = b""

    def _may_read(self) -> bool:
        """Whether more requests may be parsed now (see the bounds in the module docstring)."""
        return (
            self._reading not in NOT_PARSING
            and self._answering not in (Answering.LINGERING, Answering.CLOSED)
            and not self._sending_paused
            and len(self._queue) < self.site.limits.max_pipelined_requests
        )

    # -- asyncio.Protocol ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = writable = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        writable.set_write_buffer_limits(high=self.site.limits.max_write_buffer)
        admission = self.site.connections.admit(self)
        if admission is Admission.ADMITTED:
            self._arm(self.site.timeouts.request, HTTPConnection._on_request_timeout)
            return
        metrics = self.site.metrics
        if admission is Admission.REFUSED:
            # Over the cap: one request head, read within _LINGER, gets the 503.
            self._arm(_LINGER, HTTPConnection._on_request_timeout)
            if metrics is not None:
                metrics.refused.labels("max_connections").inc()
                metrics.connection_limit_reached.inc()
        else:
            self._abort()  # too many refusals in flight already: a reset costs nothing
            if metrics is not None:
                metrics.refused.labels("max_refusals").inc()
                metrics.connection_limit_reached.inc()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._answering is not Answering.CLOSED:
            self._enter(Answering.CLOSED)
            self._release()

    def _release(self) -> None:
        """Let go of everything the connection holds (it is CLOSED now)."""
        self.site.connections.discard(self)
        self._stop_timer()
        self._stop_reading()
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._held is not None:
            held, self._held = self._held, None
            held.cancel()
        self._reply_to = None

    def pause_writing(self) -> None:
        """Over high water: read and answer nothing more until the peer drains."""
        self._sending_paused = True
        if self._answering in (Answering.LINGERING, Answering.CLOSED):
            return  # closing anyway, on its own deadline
        assert self.transport is not None
        self.transport.pause_reading()
        self._arm(self.site.timeouts.write, HTTPConnection._on_write_timeout)

    def resume_writing(self) -> None:
        """Drained under low water: go on reading and answering."""
        self._sending_paused = False
        if self._answering in (Answering.LINGERING, Answering.CLOSED):
            return
        self._cancel_timer()
        self._process(answered=True)

    def data_received(self, data: bytes) -> None:
        if self._reading in NOT_PARSING:
            return  # refused, upgraded or closing: drained unread
        if self._unparsed:  # not read while paused, so rare: a copy is fine
            self._unparsed, data = b"", b"".join((self._unparsed, data))
        self._feed(data)
        self._process()

    def eof_received(self) -> bool:
        """The peer sent its last byte: answer what it asked, then close —
        except a held response, which is abandoned at once.

        HTTP/1.1 lets a client half-close after its request, so requests are
        still answered. But a held long-poll can wait up to
        ``poll.max_timeout``, and EOF there almost always means the client is
        gone (a killed curl, a closed tab, a proxy giving up): answering at
        the deadline kept the socket and the waiter for nobody until then.
        So, as nginx (``proxy_ignore_client_abort off``) and uvicorn do, EOF
        while a response is held releases it and closes. A handler still
        running learns it when it holds (:meth:`hold`) or takes the socket
        over (:meth:`detach`).

        Returning True keeps our half of the socket open for the answers
        (asyncio's default would close it, and a peer that never reads would
        then hold it, and our unsent answers, forever).
        """
        if self._answering in (Answering.LINGERING, Answering.CLOSED):
            return False
        self.parser = None
        self._unparsed = b""
        self._read_to(Reading.ENDED)
        if self._answering is Answering.HOLDING:
            self._abandon()
        else:
            self._process()
        return True

    # -- parsing ---------------------------------------------------------

    def _feed(self, data: bytes | memoryview) -> None:
        """Parse ``data`` slice by slice; keep what must wait for room in the queue.

        Slices let the head in progress be measured per request (a chunk may
        end one request, hold 600 more, and begin another) and let parsing stop
        at the request that fills the queue.
        """
        assert self.transport is not None
        limits = self.site.limits
        view = memoryview(data)
        start = 0
        while start < len(view):
            if self._reading in NOT_PARSING:
                return
            room = limits.max_pipelined_requests - len(self._queue)
            if self._sending_paused or room <= 0:
                self._unparsed = view[start:]
                self.transport.pause_reading()
                return
            if self.parser is None:
                # Dropped while a long-poll was held; we are at a message boundary.
                self.parser = httptools.HttpRequestParser(self)
            piece = view[start : start + min(_SLICE, room * _SHORTEST_REQUEST)]
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade as upgrade:
                self._on_upgrade(bytes(view[start + upgrade.args[0] :]))
                return
            except _Refusal as refusal:
                self._refuse(refusal.status, refusal.message)
                return
            except httptools.HttpParserError as exc:
                cause = exc.__context__
                if isinstance(cause, _Refusal):
                    self._refuse(cause.status, cause.message)
                else:
                    self._refuse(400, f"malformed HTTP request: {exc}")
                return
            start += len(piece)
            if self._reading is Reading.HEAD:
                # httptools buffers a header line until it ends, whatever its
                # length: bound it. A head that began in this slice counts one
                # byte here (where it began is unknown), so this is a lower
                # bound, exact from the next slice on: no false 431, and at
                # most max_request_head + _SLICE bytes are buffered.
                began = self._raw_head == _BEGAN_IN_SLICE
                self._raw_head = 1 if began else self._raw_head + len(piece)
                if self._raw_head > limits.max_request_head:
                    self._refuse(431, "request line and headers too large")
                    return

    def on_message_begin(self) -> None:
        self._read_to(Reading.HEAD)
        if (
            self._answering is Answering.READY
            and not self._queue
            and not self._sending_paused
            and not self.site.connections.refused(self)  # its deadline runs from the accept
        ):
            # First byte of a request on an idle connection: from now on it
            # must arrive in time. (Not on any byte: blank lines between
            # requests would then keep an idle connection open forever.)
            self._arm(self.site.timeouts.request, HTTPConnection._on_request_timeout)
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._raw_head = _BEGAN_IN_SLICE
        self._body = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > self.site.limits.max_request_head:
            raise _Refusal(431, "request line too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.site.limits.max_request_head:
            raise _Refusal(431, "request headers too large")
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self._read_to(Reading.BODY)
        limits = self.site.limits
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
        if self._body_size > self.site.limits.max_body_size:
            raise _Refusal(413, f"request body larger than {self.site.limits.max_body_size} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._read_to(Reading.IDLE)
        request = self._request
        if request is None:
            return
        self._request = None
        request.body = b"".join(self._body)
        self._body = []
        self._body_size = 0
        if not self._sending_paused:
            self._cancel_timer()  # the request timer: it arrived in time
        self._queue.append(request)

    # -- answering -------------------------------------------------------

    def _process(self, *, answered: bool = False) -> None:
        """Answer queued requests in order while the peer keeps up, parse what
        waited for room, then choose what to read and which timer runs.

        ``answered``: a response was just written, so an emptied queue starts
        the keep-alive (or request) timer.
        """
        while True:
            while self._queue and self._answering is Answering.READY and not self._sending_paused:
                answered = True
                item = self._queue.pop(0)
                if isinstance(item, Response):
                    self._write(item, head=False, keep_alive=False, extra=[])
                    return  # a refusal: lingering now
                self._dispatch(item)
            if not (self._unparsed and self._may_read()):
                break
            data, self._unparsed = self._unparsed, b""
            self._feed(data)
        if self._answering is not Answering.READY:
            if self._may_read():  # parse ahead while a handler runs
                assert self.transport is not None
                self.transport.resume_reading()
            return
        if self._reading in NOT_PARSING and not self._queue:
            # Nothing more will come (the peer sent EOF) and all is answered.
            self._finish(drain=False)
            return
        assert self.transport is not None
        if self._may_read():
            self.transport.resume_reading()
        if answered and not self._queue and not self._sending_paused:
            if self._reading is Reading.IDLE:
                self._arm(self.site.timeouts.keepalive, HTTPConnection._on_idle_timeout)
            else:
                # Part of the next request came while this one was answered.
                self._arm(self.site.timeouts.request, HTTPConnection._on_request_timeout)

    def _dispatch(self, request: Request) -> None:
        if self.site.access_log is not None:
            self._access = self.site.access_log.begin(request.method, request.target)
        cors = self.site.cors
        if self.site.connections.refused(self):
            self._refuse_at_capacity(request)
            return
        if request.method == "OPTIONS":
            self._send(request, cors.preflight(request, self.site.router))
            return
        route = self.site.router.resolve(request)
        if isinstance(route, Response):
            self._send(request, route)
            return
        self._enter(Answering.HANDLING)
        try:
            outcome = route(request, self)
        except Exception as exc:
            outcome = _failure(exc, request)
        if outcome is None:
            return  # held, or the socket taken over
        if isinstance(outcome, Response):
            # Answered without waiting: no task (a long-poll answered or held
            # at once; see Handler).
            self._held = None
            self._enter(Answering.READY)
            self._send(request, outcome)
            return
        self._task = self._loop.create_task(self._run(outcome, request))

    async def _run(self, outcome: Awaitable[Response | None], request: Request) -> None:
        try:
            response = await outcome
        except Exception as exc:
            response = _failure(exc, request)
        if response is not None:
            self.respond(request, response)

    def respond(self, request: Request, response: Response) -> None:
        """Send the answer to the request being handled, then go on with the next."""
        self._held = None
        if self._answering in (Answering.LINGERING, Answering.CLOSED):
            return  # the peer is gone, or was cut off
        self._enter(Answering.READY)
        self._task = None
        self._send(request, response)
        self._process(answered=True)

    def hold(self, held: Held, request: Request) -> None:
        """The handler will answer later (:meth:`respond_held`); ``held`` is told
        if the client goes first."""
        self._enter(Answering.HOLDING)
        self._task = None
        self._held = held
        if self._reading is Reading.ENDED:
            # The peer left while the handler ran. Abandoned on the next loop
            # iteration, not now: the handler may register what ``cancel``
            # releases after this call (the long-poll sets its deadline then).
            self._loop.call_soon(self._abandon_if_held, held)
        if not self._queue and self._reading is Reading.IDLE and not self._unparsed:
            # Nothing more to parse until the answer: a held long-poll should
            # cost what its socket costs, and a parser is ~900 bytes.
            self.parser = None
        if not self._sending_paused:
            # Nothing is due while the answer is held (its deadline is the
            # handler's), and a loop timer left to lapse costs ~400 bytes
            # until it fires: RSS per held long-poll 2,386 -> 2,787 bytes
            # with it (bench/run.py --transports poll --n 5000).
            self._stop_timer()
        head = request.method == "HEAD"
        extra = self.site.cors.headers(request)
        # Shared when there are no CORS headers: a held poll allocates nothing
        # here that outlives its request (objects that live long are what the
        # garbage collector's full passes cost).
        self._reply_to = (
            (head, request.keep_alive, extra) if extra else _PLAIN[head][request.keep_alive]
        )

    def _abandon_if_held(self, held: Held) -> None:
        if self._answering is Answering.HOLDING and self._held is held:
            self._abandon()

    def _abandon(self) -> None:
        """The peer sent EOF while its answer was held: release what the answer
        waits on and close now (see :meth:`eof_received`)."""
        log.debug("client %s left while its answer was held: abandoned", self.client)
        held, self._held = self._held, None
        self._reply_to = None
        if held is not None:
            held.cancel()
        self._finish(drain=False)

    def respond_held(self, response: Response) -> None:
        """Answer the held request, then go on with the next."""
        reply_to, self._reply_to = self._reply_to, None
        self._held = None
        if reply_to is None or self._answering is not Answering.HOLDING:
            return
        self._enter(Answering.READY)
        head, keep_alive, extra = reply_to
        keep_alive = keep_alive and not self.site.connections.stopping
        self._write(response, head=head, keep_alive=keep_alive, extra=extra)
        self._process(answered=True)

    def _send(self, request: Request, response: Response) -> None:
        keep_alive = (
            request.keep_alive and not response.close and not self.site.connections.stopping
        )
        extra = self.site.cors.headers(request)
        self._write(response, head=request.method == "HEAD", keep_alive=keep_alive, extra=extra)

    def _write(
        self, response: Response, *, head: bool, keep_alive: bool, extra: Sequence[tuple[str, str]]
    ) -> None:
        assert self.transport is not None
        if extra and response.status == 503:
            # Cross-origin: a page may read Retry-After only if it is exposed.
            extra = [*extra, _EXPOSE_RETRY_AFTER]
        data = response.encode(head=head, keep_alive=keep_alive, extra=extra)
        self.transport.write(data)
        if self.site.metrics is not None:
            self.site.metrics.responded(response.status)
        if self.site.access_log is not None:
            entry, self._access = self._access, None
            self.site.access_log.record(entry, response.status, len(data), self.client)
        if not keep_alive:
            self._finish(drain=response.status >= 400)

    def _finish(self, *, drain: bool) -> None:
        """The last response is written: close, and abort if the peer does not take it in time.

        ``drain``: after a refusal the client may still be sending, and
        closing at once would answer its bytes with a reset that can destroy
        our response before it is read; so half-close, and read and discard
        for :data:`_LINGER` seconds first.
        """
        assert self.transport is not None
        self._enter(Answering.LINGERING)
        self._stop_reading()
        self._queue.clear()
        if drain and self.transport.can_write_eof():
            self.transport.write_eof()
            self.transport.resume_reading()
            self._arm(_LINGER, HTTPConnection._on_linger_end)
        else:
            self.transport.close()
            self._arm(self.site.timeouts.write, HTTPConnection._on_linger_end)

    def _refuse(self, status: int, message: str) -> None:
        """Stop reading and queue an error answer after those already due."""
        level = logging.INFO if status >= 408 else logging.DEBUG
        log_client_error(
            log, "refusing request from %s: %d %s", self.client, status, message, level=level
        )
        self._stop_reading()
        if self.transport is not None:
            self.transport.pause_reading()
        self._queue.append(error_response(status, message, close=True))

    def _refuse_at_capacity(self, request: Request) -> None:
        """Answer 503 with ``Retry-After`` and close: this connection came over the cap."""
        extra = self.site.cors.headers(request)
        self._write(_AT_CAPACITY, head=request.method == "HEAD", keep_alive=False, extra=extra)

    def _on_upgrade(self, rest: bytes) -> None:
        request = self._queue.pop() if self._queue else None
        if request is None or isinstance(request, Response):
            self._refuse(400, "malformed upgrade request")
            return
        protocol = (request.headers.get("upgrade") or "").lower()
        if self.site.access_log is not None:
            self._access = self.site.access_log.begin(request.method, request.target)
        self._stop_reading()
        request.keep_alive = False  # whatever happens, the parser stopped here
        if self.site.connections.refused(self) and not self._queue:
            # A WebSocket handshake over the cap: refused at the HTTP level (docs/limits.md).
            self._refuse_at_capacity(request)
            return
        if (
            not self.site.router.upgrades(protocol)
            or self._queue
            or self._answering is not Answering.READY
            or self._sending_paused
        ):
            # Not a protocol we speak (or pipelined in a way we won't untangle):
            # answer it as plain HTTP, then close.
            self._queue.append(request)
            return
        route = self.site.router.resolve_upgrade(request, protocol)
        if isinstance(route, Response):
            self._send(request, route)  # a HEAD gets it without a body; then lingering
            return
        self._enter(Answering.HANDLING)
        route(request, self.detach(101), rest)

    def detach(self, status: int = 200) -> asyncio.Transport:
        """Hand the socket to a stream protocol; this object stops serving it.

        ``status``: what the stream answers, for the access log — 200 for an
        event stream, 101 for an upgrade (a handshake its transport refuses
        after this logs its own line).
        """
        assert self.transport is not None
        if self.site.metrics is not None:
            self.site.metrics.responded(status)
        if self.site.access_log is not None:
            # The stream writes its own head after this: its bytes are not counted.
            entry, self._access = self._access, None
            self.site.access_log.record(entry, status, 0, self.client)
        ended = self._reading is Reading.ENDED
        self._enter(Answering.CLOSED)
        # Called from the handler task itself (SSE): it must not be cancelled.
        self._task = None
        self._release()
        if ended:
            # The peer's EOF came here while the handler ran; the protocol that
            # takes the socket would never hear of it, so it is passed on once
            # that protocol is set (by the caller, right after this returns).
            self._loop.call_soon(_pass_on_eof, self.transport)
        return self.transport

    # -- timers and shutdown ---------------------------------------------

    def _arm(self, delay: float, callback: Callable[[HTTPConnection], None]) -> None:
        """Run ``callback`` after ``delay``: the connection's one deadline, replaced by each call.

        A loop timer is made only when none is pending that fires by the new
        deadline; one that fires early finds the deadline moved and makes the
        next (:meth:`_on_timer`). A keep-alive connection re-arms twice per
        request (the request's deadline, then the keep-alive's), and a loop
        timer made and cancelled each time was 5 µs of a long-poll's CPU per
        delivery (uvloop, timeit on this machine); now it is one timer per
        keep-alive interval.
        """
        loop = self._loop
        due = loop.time() + delay
        self._due = due
        self._on_due = callback
        timer = self._timer
        if timer is None or timer.when() > due:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(due, self._on_timer)

    def _cancel_timer(self) -> None:
        """Nothing is due any more; a pending loop timer lapses when it fires."""
        self._on_due = None

    def _stop_timer(self) -> None:
        """Cancel the loop timer too: it holds the connection until it fires."""
        self._on_due = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        callback = self._on_due
        if callback is None:
            return
        loop = self._loop
        if self._due - loop.time() > _TIMER_SLACK:
            self._timer = loop.call_at(self._due, self._on_timer)  # the deadline moved on
            return
        self._on_due = None
        callback(self)

    def _abort(self) -> None:
        """Drop the socket now, unsent bytes and all, with a reset.

        A plain close would leave the kernel's own send buffer (megabytes on
        loopback) to an orphan socket that keeps probing a peer that does not
        read; a zero linger time makes the close a reset and frees it too.
        """
        assert self.transport is not None
        self._enter(Answering.CLOSED)
        self._release()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        self.transport.abort()

    def _on_request_timeout(self) -> None:
        if self._answering is not Answering.READY or self._sending_paused:
            return
        if self._reading is Reading.HEAD or self._reading is Reading.BODY:
            timeout = self.site.timeouts.request
            self._refuse(408, f"request not received within {timeout:g}s")
            self._process()
        elif not self._queue:
            self._finish(drain=False)  # connected, and never asked anything

    def _on_idle_timeout(self) -> None:
        if (
            self._answering is Answering.READY
            and self._reading is Reading.IDLE
            and not self._queue
            and not self._sending_paused
        ):
            self._finish(drain=False)

    def _on_write_timeout(self) -> None:
        if not self._sending_paused or self._answering in (Answering.LINGERING, Answering.CLOSED):
            return
        assert self.transport is not None
        log_client_error(
            log,
            "aborting %s: %d bytes unsent, not taken within %gs",
            self.client,
            self.transport.get_write_buffer_size(),
            self.site.timeouts.write,
        )
        self._abort()

    def _on_linger_end(self) -> None:
        if self._answering is not Answering.LINGERING:
            return
        assert self.transport is not None
        unsent = self.transport.get_write_buffer_size()
        log_client_error(
            log,
            "aborting closing connection %s: %d bytes unsent",
            self.client,
            unsent,
            level=logging.INFO if unsent else logging.DEBUG,
        )
        self._abort()

    def shutdown(self) -> None:
        """Graceful shutdown: finish what is in flight, close what is idle."""
        if self._held is not None:
            self._held.answer_now()
        elif self._answering is Answering.READY and not self._queue and self.transport is not None:
            self._finish(drain=False)


def _failure(exc: Exception, request: Request) -> Response:
    """The answer to a handler's exception: the client's error, or a 500 that is logged."""
    if isinstance(exc, ProtocolError):
        return error_response(exc)
    log.error("handler failed on %r", request, exc_info=exc)
    return error_response(500, "internal server error")


def _pass_on_eof(transport: asyncio.Transport) -> None:
    """Tell the protocol now holding ``transport`` of the EOF its peer sent
    earlier, as the loop would have: closed unless it asks to stay half-open."""
    if transport.is_closing():
        return
    protocol = cast(asyncio.Protocol, transport.get_protocol())
    if not protocol.eof_received():
        transport.close()
