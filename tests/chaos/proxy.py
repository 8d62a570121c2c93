"""A TCP proxy per client: cut its connections without its cooperation, rotate its nodes.

Each client talks to its own proxy (one listening port), so the injector can cut
*that* client's connections -- a reset, as a lost network would give, with no
close frame and no end of stream. Every new connection goes to the next node of
the list, so a client that reconnects after a cut (or after its node died) lands
on another node: resuming across nodes is part of every run.

It runs in the harness's event loop (unlike ``tests/ws_support.Proxy``, which has
its own thread and a single target): the injector and the clients share one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence

HOST = "127.0.0.1"


class CuttableProxy:
    """Forwards each accepted connection to the next of ``target_ports``, round robin."""

    __slots__ = ("_handlers", "_server", "_targets", "_transports", "connections")

    def __init__(self, target_ports: Sequence[int]) -> None:
        self._targets = itertools.cycle(list(target_ports))
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()
        #: Connections accepted so far (each a connect or a reconnect of the client).
        self.connections = 0

    async def start(self) -> int:
        """Listen on a free loopback port; returns it."""
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._forward(writer, reader)
        except asyncio.CancelledError:
            writer.transport.abort()  # close(): the client sees a reset, as in a cut
        finally:
            self._handlers.discard(task)

    async def _forward(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> None:
        target = next(self._targets)
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, target)
        except OSError:
            # The node is down: the client sees its connection reset and tries again.
            writer.transport.abort()
            return
        pair = (writer.transport, up_writer.transport)
        self._transports.update(pair)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._transports.difference_update(pair)

    def cut(self) -> int:
        """Reset every connection of this client, both ways; returns how many were open."""
        transports = list(self._transports)
        for transport in transports:
            transport.abort()
        return len(transports) // 2

    async def close(self) -> None:
        """Stop listening, reset every connection, and wait for the forwarding tasks."""
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except OSError:
        # Reset (a cut, or a node killed): pass the reset on.
        dst.transport.abort()
    else:
        # An orderly end: pass it on once what is buffered has been written.
        dst.close()
