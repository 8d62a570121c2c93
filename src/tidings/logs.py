"""Logging of client mistakes: quiet, and rate-limited.

A bad frame, a malformed request or an invalid token is the client's fault,
not the server's: it is logged at INFO or DEBUG, never at ERROR and never with
a traceback. And since a client can repeat its mistake as fast as the network
carries it, each kind of mistake is logged at most ``max_lines`` times per
``interval`` seconds; the rest of the interval's occurrences are counted and
summed up in one "suppressed" line when the interval ends. Without the limit,
one client sending 100,000 bad commands writes 100,000 lines — a way to fill a
disk or drown the lines that matter.

Every place that logs a client mistake goes through :func:`log_client_error`.

This module also holds how lines are written, chosen by the CLI alone (the
library configures nothing at import: an application embedding tidings keeps
its own logging): ``text`` for a terminal, ``json`` for a log pipeline
(:class:`JSONFormatter`, one object per line), and the optional access log of
HTTP requests (:class:`AccessLog`, logger ``tidings.access``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import msgspec

__all__ = [
    "FIELDS",
    "AccessLog",
    "ClientErrorLimiter",
    "JSONFormatter",
    "configure_logging",
    "log_client_error",
]

#: The structured fields a log call may attach (``extra={...}``), in the
#: order a JSON line shows them. ``client`` is the client id a session was
#: given, ``peer`` the address of the socket; the last six are the access log's.
FIELDS = (
    "client",
    "user",
    "transport",
    "channel",
    "code",
    "peer",
    "method",
    "path",
    "status",
    "bytes",
    "duration",
)

#: The line of ``--log-format text`` (the default): what a person reads in a terminal.
TEXT_FORMAT = "%(asctime)s %(levelname)-7s [%(process)d] %(name)s: %(message)s"


class _Window:
    """One kind of mistake: how often it was logged and suppressed in the current interval."""

    __slots__ = ("last", "level", "logged", "started", "suppressed", "timer")

    def __init__(self, started: float) -> None:
        self.started = started
        self.logged = 0
        self.suppressed = 0
        self.level = logging.DEBUG
        # The arguments of the last suppressed line, for the summary to show one.
        self.last: tuple[object, ...] = ()
        self.timer: asyncio.TimerHandle | None = None


class ClientErrorLimiter:
    """At most ``max_lines`` lines per kind of mistake per ``interval`` seconds.

    A kind is the logger and the format string, both written in our code, so
    the number of windows kept is bounded by the code, never by what clients
    send. The summary of an interval is written when it ends (a timer on the
    running loop) or, without a loop, by the next line of that kind.
    """

    __slots__ = ("_clock", "_windows", "interval", "max_lines")

    def __init__(
        self,
        max_lines: int = 10,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_lines = max_lines
        self.interval = interval
        self._clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}

    def log(
        self,
        logger: logging.Logger,
        level: int,
        msg: str,
        *args: object,
        fields: Mapping[str, object] | None = None,
    ) -> None:
        if not logger.isEnabledFor(level):
            return
        key = (logger.name, msg)
        now = self._clock()
        window = self._windows.get(key)
        if window is not None and now - window.started >= self.interval:
            self._summarise(logger, key)
            window = None
        if window is None:
            window = self._windows[key] = _Window(now)
        args = tuple(map(_printable, args))
        if window.logged < self.max_lines:
            window.logged += 1
            logger.log(level, msg, *args, extra=fields)
            return
        window.suppressed += 1
        window.level = max(window.level, level)
        window.last = args
        if window.timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            delay = max(0.0, window.started + self.interval - now)
            window.timer = loop.call_later(delay, self._summarise, logger, key)

    def _summarise(self, logger: logging.Logger, key: tuple[str, str]) -> None:
        """End the interval of ``key``: one line for what it suppressed."""
        window = self._windows.pop(key, None)
        if window is None:
            return
        if window.timer is not None:
            window.timer.cancel()
        if window.suppressed:
            logger.log(
                window.level,
                "suppressed %d similar messages in %gs; the last: " + key[1],
                window.suppressed,
                self.interval,
                *window.last,
            )


def _printable(arg: object) -> object:
    """Text from a client with its control characters escaped.

    A channel name, a field name or a decoder message may hold a newline, and
    a client could otherwise write a line of its own into our log.
    """
    if isinstance(arg, str | BaseException):
        text = str(arg)
        if not text.isprintable():
            return text.encode("unicode_escape").decode("ascii")
    return arg


_limiter = ClientErrorLimiter()


def log_client_error(
    logger: logging.Logger,
    msg: str,
    *args: object,
    level: int = logging.INFO,
    fields: Mapping[str, object] | None = None,
) -> None:
    """Log a client's mistake at ``level`` (INFO or DEBUG), rate-limited per ``msg``.

    ``msg`` must be a constant format string (the kind of mistake); what varies
    goes in ``args``. Never pass an exception for a traceback: the client's
    mistake is described by its message. ``fields`` (names from :data:`FIELDS`)
    become the JSON line's own keys, so a pipeline can filter on them.
    """
    _limiter.log(logger, level, msg, *args, fields=fields)


# -- how lines are written -------------------------------------------------------


def _unknown_to_text(value: object) -> str:
    return str(value)


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, pid, then :data:`FIELDS`.

    A dozen lines over msgspec rather than python-json-logger: msgspec is
    already a dependency and writes the object in one call; the fields are a
    fixed list, so nothing of the library's configurability is needed. The
    time is RFC 3339 in UTC with milliseconds, the form log pipelines (Loki,
    Elasticsearch, Cloud Logging) parse without a pattern. A newline inside a
    message or a traceback is escaped by the encoder: a line is always one record.
    """

    def __init__(self) -> None:
        super().__init__()
        self._encode = msgspec.json.Encoder(enc_hook=_unknown_to_text).encode

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry: dict[str, Any] = {
            "time": f"{seconds}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        attributes = record.__dict__
        for name in FIELDS:
            value = attributes.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return self._encode(entry).decode()


LogFormat = Literal["text", "json"]


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """Send every logger's lines at ``level`` and above to stderr, in ``log_format``.

    Called by ``tidings serve`` only: importing tidings, or running a
    ``tidings.Tidings`` inside an application, leaves logging as the
    application set it.
    """
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])


# -- the access log ------------------------------------------------------------------

#: Query parameters whose value is a credential: never written to a log.
_SECRET_PARAMETER = re.compile(rb"(^|[?&])([^=&]*(?:token|key|secret|password)[^=&]*)=[^&]*", re.I)

#: What the access log keeps of a request while it is answered: method, target,
#: and when the answer began (``time.monotonic()``).
AccessEntry = tuple[str, bytes, float]


def redact_target(target: bytes) -> str:
    """The request target with the values of credential parameters (``token=``,
    ``sub_token=``, ``api_key=``...) replaced by ``***``; control characters escaped."""
    text = _SECRET_PARAMETER.sub(rb"\1\2=***", target).decode("latin-1")
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


class AccessLog:
    """One INFO line per HTTP answer on logger ``tidings.access`` (``--access-log``).

    Off by default, and then no object exists and no connection pays for it:
    the HTTP connection asks its site whether one is set. A line is written
    when the answer is (a held long-poll's when it is answered; an SSE stream's
    or a WebSocket's when the socket is handed to it, with the bytes of the
    head only). Not rate-limited: an operator who turns it on asks for a line
    per request.
    """

    __slots__ = ("logger",)

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger("tidings.access")

    @staticmethod
    def begin(method: str, target: bytes) -> AccessEntry:
        return (method, target, time.monotonic())

    def record(
        self,
        entry: AccessEntry | None,
        status: int,
        size: int,
        peer: tuple[str, int] | None,
    ) -> None:
        """Write the line of one answer; ``entry`` None for a request that was never
        parsed (a malformed one refused with 400, 413, 431 or 408)."""
        if not self.logger.isEnabledFor(logging.INFO):
            return
        if entry is None:
            method, path, duration = "-", "-", 0.0
        else:
            method, path = entry[0], redact_target(entry[1])
            duration = time.monotonic() - entry[2]
        address = f"{peer[0]}:{peer[1]}" if peer is not None else "-"
        self.logger.info(
            '%s "%s %s" %d %d %.1fms',
            address,
            method,
            path,
            status,
            size,
            duration * 1000,
            extra={
                "peer": address,
                "method": method,
                "path": path,
                "status": status,
                "bytes": size,
                "duration": round(duration, 6),
            },
        )
