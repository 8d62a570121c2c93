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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

__all__ = ["ClientErrorLimiter", "log_client_error"]


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

    def log(self, logger: logging.Logger, level: int, msg: str, *args: object) -> None:
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
            logger.log(level, msg, *args)
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
    logger: logging.Logger, msg: str, *args: object, level: int = logging.INFO
) -> None:
    """Log a client's mistake at ``level`` (INFO or DEBUG), rate-limited per ``msg``.

    ``msg`` must be a constant format string (the kind of mistake); what varies
    goes in ``args``. Never pass an exception for a traceback: the client's
    mistake is described by its message.
    """
    _limiter.log(logger, level, msg, *args)
