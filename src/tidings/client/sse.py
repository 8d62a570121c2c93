"""The one ``text/event-stream`` parser of the clients: bytes in, events out, no I/O.

``tidings subscribe`` (blocking, ``http.client``) and the async subscriber
(httpx) both feed it the bytes they read and act on the events it returns, so
the rules of the format live here only. They are the WHATWG HTML standard's
"event stream interpretation" (§9.2.6): one leading BOM is dropped; lines end
with CRLF, LF or CR (a CRLF split between two reads is still one line end); a
line starting with ``:`` is a comment; a line without ``:`` is a field with an
empty value; one space after the colon is dropped; ``data`` lines join with
``\\n``; ``id`` persists across events (unless it contains NUL) and is what a
reconnect sends as ``Last-Event-ID``; ``retry`` takes ASCII digits only; a
blank line dispatches, and a block without ``data`` dispatches nothing; an
event cut off by the end of the stream is dropped.

Written by hand rather than taken from ``httpx-sse``: that package reads lines
with httpx (so it cannot serve the CLI, which needs nothing beyond the standard
library), buffers a line without limit (``aiter_lines``), and dispatches blocks
without data, unlike the standard. This parser bounds what one peer can make
it hold: a line longer than ``max_line`` bytes, or an event whose data exceeds
``max_event`` bytes, raises :class:`EventStreamError` instead of growing the
client without limit. Fast enough not to matter next to the JSON decoding of
each event: about 140k events/s (16 MB/s) of 130-byte publication events, and a
4 MiB line read 16 KiB at a time in 0.04 s, since each read's scan resumes where
the previous one ended (one core of the 2-core dev machine, see
tests/test_sse_parser.py for the behaviour).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_EVENT", "DEFAULT_MAX_LINE", "Event", "EventStreamError", "SSEParser"]

#: Four times the server's default ``limits.max_body_size``: room for the largest
#: publication a default server accepts, wrapped with its channel and position.
DEFAULT_MAX_LINE = 4 * 1024 * 1024
DEFAULT_MAX_EVENT = DEFAULT_MAX_LINE

_BOM = b"\xef\xbb\xbf"
_LINE_END = re.compile(rb"\r\n|\r|\n")


class EventStreamError(ValueError):
    """The peer broke a bound of the parser; the stream cannot be read further."""


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched event: its type (``message`` unless named), data and last event id."""

    data: str
    event: str = "message"
    id: str = ""


class SSEParser:
    """Turns the bytes of one event stream into :class:`Event` objects.

    Make one per HTTP response. ``last_event_id`` starts as the id the request
    resumed from (so a stream that sends no ``id`` keeps it) and afterwards
    holds the id of the last dispatched block, the value to send as
    ``Last-Event-ID`` on reconnect. ``retry`` is the reconnection time in
    milliseconds the server last asked for, or None.
    """

    __slots__ = (
        "_buffer",
        "_data",
        "_data_size",
        "_event_type",
        "_id_buffer",
        "_skip_lf",
        "_started",
        "last_event_id",
        "max_event",
        "max_line",
        "retry",
    )

    def __init__(
        self,
        *,
        last_event_id: str = "",
        max_line: int = DEFAULT_MAX_LINE,
        max_event: int = DEFAULT_MAX_EVENT,
    ) -> None:
        self.max_line = max_line
        self.max_event = max_event
        self.last_event_id = last_event_id
        self.retry: int | None = None
        self._buffer = bytearray()
        self._started = False  # the BOM check is done
        self._skip_lf = False  # the last read ended with CR: a leading LF belongs to it
        self._data: list[str] = []
        self._data_size = 0
        self._event_type = ""
        self._id_buffer = last_event_id

    def feed(self, chunk: bytes) -> list[Event]:
        """The events completed by ``chunk``; raises :class:`EventStreamError` past a bound."""
        buffer = self._buffer
        scanned = len(buffer)  # what earlier reads left: part of one line, no line end in it
        buffer += chunk
        if not self._started:
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                return []  # could still be a BOM: wait for more
            if buffer.startswith(_BOM):
                del buffer[: len(_BOM)]
            self._started, scanned = True, 0
        start = 0
        if self._skip_lf and buffer:
            self._skip_lf = False
            if buffer[0] == 0x0A:  # the LF of a CRLF split between two reads
                start = scanned = 1
        events: list[Event] = []
        while (end := _LINE_END.search(buffer, scanned)) is not None:
            if end.start() - start > self.max_line:
                break
            event = self._line(bytes(buffer[start : end.start()]))
            if event is not None:
                events.append(event)
            start = scanned = end.end()
            if start == len(buffer) and buffer[-1] == 0x0D:
                self._skip_lf = True
        del buffer[:start]
        if len(buffer) > self.max_line:
            raise EventStreamError(f"event stream line longer than {self.max_line} bytes")
        return events

    def _line(self, raw: bytes) -> Event | None:
        if not raw:
            return self._dispatch()
        if raw[0] == 0x3A:  # ":" starts a comment
            return None
        field, colon, value = raw.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._data_size += len(value) + 1
            if self._data_size > self.max_event:
                raise EventStreamError(f"event stream event larger than {self.max_event} bytes")
            self._data.append(value.decode("utf-8", "replace"))
        elif field == b"event":
            self._event_type = value.decode("utf-8", "replace")
        elif field == b"id":
            if b"\0" not in value:
                self._id_buffer = value.decode("utf-8", "replace")
        elif field == b"retry" and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> Event | None:
        self.last_event_id = self._id_buffer
        data, event_type = self._data, self._event_type
        self._data, self._data_size, self._event_type = [], 0, ""
        if not data:
            return None
        return Event(data="\n".join(data), event=event_type or "message", id=self.last_event_id)
