"""The states of one HTTP/1.1 server connection and the only moves between them.

Sans-I/O, as h11's ``_state.py``: two enums and their transition tables, and
one function that moves a state or raises. :class:`~tidings.http.connection.HTTPConnection`
keeps one value of each and changes it only through :func:`advance`, so every
question "may this happen now?" is answered here, not by a flag checked in a
dozen places (the scattered flags were where the unbounded-buffer bugs hid).

Two machines, because the two directions of a pipelined connection move
independently — the parser may be halfway through request 3 while request 1 is
still being answered:

* :class:`Reading` — where the parser is in the incoming byte stream.
* :class:`Answering` — what the connection is doing about the request at the
  head of the line.

Backpressure (the peer not taking our bytes) is not a state of either: it can
start during any write, in any state. The connection keeps it as one flag set
by ``pause_writing`` and cleared by ``resume_writing``, the transport's own
signals; while it is set nothing new is read or answered.
"""

from __future__ import annotations

import enum
from typing import TypeVar

__all__ = [
    "ANSWERING",
    "NOT_PARSING",
    "READING",
    "Answering",
    "InvalidTransition",
    "Reading",
    "advance",
]


class Reading(enum.Enum):
    """Where the parser is in the request byte stream."""

    #: Members are singletons: hashed by identity, in C. Enum's own ``__hash__``
    #: is a Python call (hash of the name), and every transition looks two up:
    #: 1.9 -> 0.23 µs per :func:`advance` (timeit), ~4 % of a long-poll's CPU.
    __hash__ = object.__hash__

    #: Between requests: the next byte starts a new one.
    IDLE = "idle"
    #: Inside a request line and headers; bounded by ``limits.max_request_head``.
    HEAD = "head"
    #: Headers complete, body arriving; bounded by ``limits.max_body_size``.
    BODY = "body"
    #: Nothing more will be parsed: the request stream was refused or upgraded,
    #: or the connection is closing. Bytes still arriving are drained unread.
    STOPPED = "stopped"
    #: The peer sent EOF: nothing more will come, and a response held for it
    #: is abandoned (the client went away); what it asked otherwise is still
    #: answered. Nothing is parsed, as in :attr:`STOPPED`, which it may follow.
    ENDED = "ended"


class Answering(enum.Enum):
    """What the connection is doing about the request at the head of the line."""

    __hash__ = object.__hash__  # as Reading's

    #: No handler runs: the next queued request may be answered.
    READY = "ready"
    #: A handler task runs for the request at the head of the line.
    HANDLING = "handling"
    #: The handler will answer later (a held long-poll; see ``Held``), unless
    #: the peer sends EOF first: then the answer is abandoned (LINGERING).
    HOLDING = "holding"
    #: The last response is written and the socket is closing: it gets a bounded
    #: time to deliver it (and, after a refusal, to drain what the peer still
    #: sends), then it is aborted.
    LINGERING = "lingering"
    #: The socket is gone, or was handed to a stream protocol (SSE, WebSocket).
    CLOSED = "closed"


READING: dict[Reading, frozenset[Reading]] = {
    Reading.IDLE: frozenset({Reading.HEAD, Reading.STOPPED, Reading.ENDED}),
    Reading.HEAD: frozenset({Reading.BODY, Reading.STOPPED, Reading.ENDED}),
    Reading.BODY: frozenset({Reading.IDLE, Reading.STOPPED, Reading.ENDED}),
    Reading.STOPPED: frozenset({Reading.ENDED}),
    Reading.ENDED: frozenset(),
}

#: The reading states in which nothing more is parsed.
NOT_PARSING = frozenset({Reading.STOPPED, Reading.ENDED})

ANSWERING: dict[Answering, frozenset[Answering]] = {
    Answering.READY: frozenset({Answering.HANDLING, Answering.LINGERING, Answering.CLOSED}),
    Answering.HANDLING: frozenset({Answering.READY, Answering.HOLDING, Answering.CLOSED}),
    # HOLDING -> LINGERING: the peer sent EOF while its answer was held (abandoned).
    Answering.HOLDING: frozenset({Answering.READY, Answering.LINGERING, Answering.CLOSED}),
    Answering.LINGERING: frozenset({Answering.CLOSED}),
    Answering.CLOSED: frozenset(),
}


class InvalidTransition(RuntimeError):
    """A move the tables above do not allow: a bug in the connection, never the client's doing."""


_S = TypeVar("_S", Reading, Answering)


def advance(table: dict[_S, frozenset[_S]], current: _S, new: _S) -> _S:
    """Return ``new`` if ``table`` allows ``current`` → ``new``; raise otherwise."""
    if new not in table[current]:
        raise InvalidTransition(f"{type(current).__name__}: {current.name} -> {new.name}")
    return new
