"""Listening sockets, and what happens when the process runs out of file descriptors.

A server that holds tens of thousands of connections will, some day, meet its
``RLIMIT_NOFILE`` (``accept`` fails with EMFILE, or ENFILE for the whole
system). ``limits.max_connections`` keeps tidings below it in the normal case
(tidings.connections), but descriptors are also spent by refusals in flight,
brokers, logs and the embedding program. At the limit the server must not
spin, must not stop listening, must say so — once per interval, not per
failed ``accept`` — and must serve again as soon as descriptors are freed.
The two event loops differ, measured with a ``tidings serve`` whose soft and
hard limit was 64 and 120 idle connections opened to it (what
``tests/test_capacity.py::test_accept_survives_running_out_of_file_descriptors``
does; with asyncio's own accept put back, that test fails at 2.38 s of CPU
in 3 s):

* **asyncio's selector loop gets it wrong**, so here tidings accepts by itself
  (:class:`Listener`). Its ``_accept_connection`` goes on calling ``accept()``
  after EMFILE for the rest of a batch of ``backlog`` (4096 here), logging an
  ERROR with a traceback and scheduling one more retry for each: 53,170
  tracebacks and 2.55 s of CPU in 3 s, the log growing by megabytes a second.
  :class:`Listener` stops accepting at the first EMFILE, logs one WARNING per
  interval, and tries again after :data:`RETRY_DELAY`, leaving the waiting
  connections in the kernel's backlog, to be served once descriptors are
  freed. Its transports are made as asyncio makes them
  (``loop._make_socket_transport``, what ``_accept_connection2`` calls): 5,000
  idle connections held no more memory than with asyncio's own accept
  (1.81 vs 1.97 KiB each, with the client sockets).
* **uvloop gets it right and says nothing**: libuv closes a descriptor it
  keeps in reserve, accepts every waiting connection and closes it at once,
  then takes its reserve back (``uv__emfile_trick``) — 0.0 s of CPU, the
  excess connections closed, the server serving again once descriptors were
  freed. Taking accept over there would cost 285 B per connection (a Python
  socket object that ``connect_accepted_socket`` keeps per transport), so
  the loop keeps accepting and :class:`DescriptorWatch` reports exhaustion:
  once a second it asks the kernel for one more descriptor, and logs when
  there is none.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .logs import ClientErrorLimiter

__all__ = ["RETRY_DELAY", "BoundSocket", "DescriptorWatch", "Listener", "Listening", "listen"]

log = logging.getLogger(__name__)

#: Seconds between attempts to accept while the process has no descriptor
#: left: one failed ``accept`` per attempt, nothing measurable on the CPU.
RETRY_DELAY = 0.5

#: Seconds between two looks at whether any descriptor is left (uvloop).
WATCH_INTERVAL = 1.0

#: ``accept`` errors that mean "no resources now", not "this connection failed".
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

#: Connections accepted per readiness event, so that a burst cannot starve the
#: connections already served (asyncio uses its ``backlog``, 4096 here). A
#: connection past the cap is reset from ``connection_made``, one loop
#: iteration after its accept, so up to two batches of them hold descriptors
#: at once during a flood: with 128, 2,000 connections past a cap of 50 took
#: the server to 328 descriptors (82 under uvloop); 32 keeps that to about 64.
_ACCEPT_BATCH = 32

#: One line per interval about descriptor exhaustion, however often accept fails.
_exhaustion_log = ClientErrorLimiter(max_lines=1)


def _log_exhausted(exc: OSError, what: str) -> None:
    _exhaustion_log.log(
        log,
        logging.WARNING,
        "out of file descriptors (%s): %s; raise the limit (ulimit -n) or lower "
        "limits.max_connections",
        os.strerror(exc.errno or 0),
        what,
    )


class BoundSocket(Protocol):
    """What is asked of a listening socket: its address (a socket or asyncio's wrapper)."""

    def getsockname(self) -> Any:
        """The address the socket is bound to."""


class Listening(Protocol):
    """What the server keeps of its listener: the addresses, and a way to stop."""

    @property
    def sockets(self) -> Sequence[BoundSocket]:
        """The listening sockets."""

    def close(self) -> None:
        """Stop accepting and close the listening sockets."""


class Listener:
    """Accepts connections on listening sockets itself (asyncio's selector loop).

    See the module docstring for why. Each accepted socket gets a protocol from
    ``protocol_factory`` and a transport made exactly as asyncio makes one.
    """

    __slots__ = ("_factory", "_loop", "_paused", "_retry", "sockets")

    def __init__(
        self,
        loop: asyncio.selector_events.BaseSelectorEventLoop,
        sockets: list[socket.socket],
        protocol_factory: Callable[[], asyncio.Protocol],
    ) -> None:
        self._loop = loop
        self.sockets = sockets
        self._factory = protocol_factory
        self._paused = False
        self._retry: asyncio.TimerHandle | None = None

    def start(self, backlog: int) -> None:
        for sock in self.sockets:
            sock.setblocking(False)
            sock.listen(backlog)
        self._watch()

    def _watch(self) -> None:
        self._paused = False
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # nobody else waiting
            except ConnectionAbortedError:
                continue  # the client gave up while waiting in the backlog
            except OSError as exc:
                if exc.errno not in _EXHAUSTED:
                    log.warning("accept failed: %s", exc)
                    return
                _log_exhausted(exc, f"not accepting for {RETRY_DELAY:g}s")
                self._pause()
                return
            conn.setblocking(False)
            # What asyncio's own accept does (BaseSelectorEventLoop._accept_connection2).
            self._loop._make_socket_transport(  # type: ignore[attr-defined]
                conn, self._factory(), extra={"peername": peer}
            )

    def _pause(self) -> None:
        """Stop watching the sockets for a while: the backlog keeps the waiting clients."""
        if self._paused:
            return
        self._paused = True
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
        self._retry = self._loop.call_later(RETRY_DELAY, self._resume)

    def _resume(self) -> None:
        self._retry = None
        self._watch()

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for sock in self.sockets:
            if not self._paused:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._paused = True


class DescriptorWatch:
    """Logs, once per interval, that the process has no file descriptor left (uvloop).

    libuv handles EMFILE in ``accept`` by itself and tells nobody (module
    docstring); a duplicate of a listening socket, made and closed once a
    second, shows whether the next ``accept`` can succeed.
    """

    __slots__ = ("_fd", "_loop", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self._loop = loop
        self._fd = fd
        self._timer: asyncio.TimerHandle | None = loop.call_later(WATCH_INTERVAL, self._look)

    def _look(self) -> None:
        self._timer = self._loop.call_later(WATCH_INTERVAL, self._look)
        try:
            os.close(os.dup(self._fd))
        except OSError as exc:
            if exc.errno in _EXHAUSTED:
                _log_exhausted(exc, "the event loop closes new connections unanswered")

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Native:
    """The loop's own server, plus the watch that reports descriptor exhaustion."""

    __slots__ = ("_server", "_watch")

    def __init__(self, server: asyncio.base_events.Server, watch: DescriptorWatch) -> None:
        self._server = server
        self._watch = watch

    @property
    def sockets(self) -> Sequence[BoundSocket]:
        return self._server.sockets

    def close(self) -> None:
        self._watch.close()
        self._server.close()


async def listen(
    protocol_factory: Callable[[], asyncio.Protocol],
    *,
    sock: socket.socket | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    backlog: int = 4096,
    reuse_port: bool = False,
) -> Listening:
    """Listen on ``sock``, or on ``host``:``port``; accepting as the module docstring says."""
    loop = asyncio.get_running_loop()
    if not isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
        if sock is not None:
            server = await loop.create_server(protocol_factory, sock=sock, backlog=backlog)
        else:
            server = await loop.create_server(
                protocol_factory,
                host,
                port,
                backlog=backlog,
                reuse_address=True,
                reuse_port=reuse_port or None,
            )
        fd = server.sockets[0].fileno()
        return _Native(server, DescriptorWatch(loop, fd))
    sockets = [sock] if sock is not None else await _bind(loop, host, port, reuse_port)
    listener = Listener(loop, sockets, protocol_factory)
    listener.start(backlog)
    return listener


async def _bind(
    loop: asyncio.AbstractEventLoop, host: str, port: int, reuse_port: bool
) -> list[socket.socket]:
    """Sockets bound to every address of ``host`` (as ``loop.create_server`` binds them)."""
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # Each address family on its own socket, as asyncio does.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
