"""The Redis broker's command connections when Redis closes them, or they are
cut under a command, while Redis is up (issue 12: "broker unavailable: Error
UNKNOWN while writing to socket").

Against a real redis-server, each fault placed at the exact moment that made
it fail: a pooled connection Redis closed before the event loop has read the
close, a connection closed between the pool lending it and the write (the
"Error UNKNOWN while writing to socket. Connection lost." itself), a reply lost
after Redis ran the publish (which must not be sent again: it would publish
twice), and commands cancelled by ``timeouts.broker`` while Redis is paused.
The broker tests run under asyncio and uvloop, whose transports differ; one
test does the first fault to a ``tidings serve`` process, with httpx and the
``websockets`` client.
"""

from __future__ import annotations

import asyncio
import json
import select
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any
from unittest import mock

import pytest
import redis
import uvloop
from websockets.sync.client import connect

from conftest import ServerProcess
from helpers import publish, unique_channel
from test_broker_stall import WAIT, command, paused
from test_scaleout import redis_config
from tidings.brokers.redis import RedisBroker
from tidings.errors import BrokerUnavailable
from tidings.hub import DEFAULT_HISTORY

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

    from brokers_support import RedisServer

KEEP = DEFAULT_HISTORY

LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


def run(loop: str, main: Coroutine[Any, Any, None]) -> None:
    if loop == "uvloop":
        uvloop.run(main)
    else:
        asyncio.run(main)


def with_broker(
    url: str, body: Callable[[RedisBroker], Awaitable[None]]
) -> Coroutine[Any, Any, None]:
    """``body`` with a broker on a fresh prefix; its commands only (the pub/sub
    link is not started: these faults are about the command pool)."""

    async def main() -> None:
        broker = RedisBroker(url, prefix=f"t{uuid.uuid4().hex[:8]}")
        try:
            await body(broker)
        finally:
            await broker.close()

    return main()


async def history_offsets(broker: RedisBroker, channel: str) -> list[int]:
    pubs, _ = await broker.history(channel, since=None)
    return [pub.offset for pub in pubs]


def idle_connection(broker: RedisBroker) -> AbstractConnection:
    """The one connection in the broker's pool (commands so far ran one at a time)."""
    (conn,) = broker._redis.connection_pool._available_connections
    return conn


def connections_received(admin: redis.Redis) -> int:
    return int(admin.info("stats")["total_connections_received"])


@LOOPS
def test_a_connection_redis_closed_in_the_pool_is_replaced_before_the_write(
    redis_server: RedisServer, loop: str
) -> None:
    """Redis closes the idle pooled connection (``CLIENT KILL``, as its
    ``timeout`` setting or a restart would) and its FIN is in this host's
    kernel, but the event loop has not run since: the next publish must go out
    on a new connection, not into the closed one ("Connection closed by
    server." while Redis is up). The kill is made with a blocking client, and
    the FIN awaited with ``poll()``, so the loop cannot read the close first."""
    admin = redis.Redis.from_url(redis_server.url)

    async def body(broker: RedisBroker) -> None:
        for _ in range(5):
            await broker.publish("c", b"1", history=KEEP)
            conn = idle_connection(broker)
            conn_id = await broker._redis.client_id()
            assert admin.client_kill_filter(_id=str(conn_id)) == 1
            writer = conn._writer
            assert writer is not None
            sock = writer.transport.get_extra_info("socket")
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            assert poller.poll(5000), "the FIN of the killed connection did not arrive"
            await broker.publish("c", b"2", history=KEEP)
            assert idle_connection(broker) is conn  # the same object, connected afresh
            assert await broker._redis.client_id() != conn_id
        assert await history_offsets(broker, "c") == list(range(1, 11))

    run(loop, with_broker(redis_server.url, body))


@LOOPS
def test_a_write_on_a_connection_closed_under_it_is_sent_once_on_a_new_one(
    redis_server: RedisServer, loop: str
) -> None:
    """Issue 12's "Error UNKNOWN while writing to socket. Connection lost.":
    the transport of a connection is closed after the pool lent it and before
    the command's write (the node once disconnected its idle connections on a
    pub/sub loss; a task doing that snapshots them, then closes each one a loop
    turn later, after a command may have taken one). asyncio drops the bytes of
    a write on a closing transport, so Redis got nothing: the publish is sent
    again on a new connection, and is in history once."""
    admin = redis.Redis.from_url(redis_server.url)

    async def body(broker: RedisBroker) -> None:
        await broker.publish("c", b"1", history=KEEP)
        before = connections_received(admin)
        pool = broker._redis.connection_pool
        closing = asyncio.create_task(pool.disconnect(inuse_connections=False))
        await asyncio.sleep(0)  # the task has taken the idle connection to close it
        publication = await broker.publish("c", b"2", history=KEEP)
        await closing
        assert publication.offset == 2
        assert connections_received(admin) == before + 1  # the write failed and was resent
        assert await history_offsets(broker, "c") == [1, 2]

    run(loop, with_broker(redis_server.url, body))


class ReplyDroppingProxy:
    """A loopback TCP proxy to Redis that, once armed, forwards the next command
    containing ``marker`` and then, instead of forwarding Redis' reply to it,
    resets the client's connection: Redis ran the command, the client lost the
    reply."""

    def __init__(self, port: int, marker: bytes) -> None:
        self.target = port
        self.marker = marker
        self.armed = False
        self.dropped = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        marked = asyncio.Event()

        async def upstream() -> None:
            while data := await reader.read(65536):
                if self.armed and self.marker in data:
                    self.armed = False
                    marked.set()
                up_writer.write(data)
            up_writer.close()

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                if marked.is_set():
                    self.dropped += 1
                    writer.transport.abort()
                    return
                writer.write(data)
            writer.close()

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        up_writer.close()
        self._tasks.difference_update(tasks)


@LOOPS
def test_a_publish_whose_reply_is_lost_is_not_sent_again(
    redis_server: RedisServer, loop: str
) -> None:
    """Redis ran the publish script and the connection broke before its reply
    came back: the broker cannot know whether it ran, so it answers broker
    unavailable rather than send it again (which here would publish offset 2
    twice); the next publish gets offset 3. A history read losing its reply
    the same way is read again (reads may run twice)."""

    async def main() -> None:
        proxy = ReplyDroppingProxy(redis_server.port, b"EVALSHA")
        await proxy.start()

        async def body(broker: RedisBroker) -> None:
            await broker.publish("c", b"1", history=KEEP)
            proxy.armed = True
            with pytest.raises(BrokerUnavailable):
                await broker.publish("c", b"2", history=KEEP)
            assert proxy.dropped == 1
            assert await history_offsets(broker, "c") == [1, 2]  # it ran once
            assert (await broker.publish("c", b"3", history=KEEP)).offset == 3
            proxy.marker = b"XRANGE"
            proxy.armed = True
            assert await history_offsets(broker, "c") == [1, 2, 3]
            assert proxy.dropped == 2

        try:
            await with_broker(f"redis://127.0.0.1:{proxy.port}/0", body)
        finally:
            await proxy.close()

    run(loop, main())


@LOOPS
def test_commands_cancelled_while_redis_is_paused_leave_no_reply_behind(
    redis_server: RedisServer, loop: str
) -> None:
    """``timeouts.broker`` cancels publishes and history reads while Redis is
    paused (SIGSTOP), each with its command written and its reply not read.
    Once Redis resumes, every command reads its own reply: a connection given
    back to the pool with a reply still to come would hand it to the next
    command (a publish answered with another's offset, a read with a publish's
    reply)."""

    async def body(broker: RedisBroker) -> None:
        await broker.publish("c", b"0", history=KEEP)

        async def bounded(call: Awaitable[object]) -> None:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await call

        with paused(redis_server):
            await asyncio.gather(
                *(bounded(broker.publish("c", b"x", history=KEEP)) for _ in range(4)),
                *(bounded(broker.history("c", since=None)) for _ in range(4)),
            )
        # What Redis ran of the cancelled publishes is unknown to their callers
        # (they were told "unavailable"); from here on every answer must be exact.
        for _ in range(20):
            publication, top_before = await asyncio.gather(
                broker.publish("c", b"1", history=KEEP), broker.history("c", limit=0)
            )
            _, top = await broker.history("c", limit=0)
            assert top.offset == publication.offset
            assert top_before[1].offset in (publication.offset - 1, publication.offset)

    run(loop, with_broker(redis_server.url, body))


def test_a_node_publishes_after_redis_closed_its_command_connections(
    server_factory: Callable[..., ServerProcess], redis_server: RedisServer
) -> None:
    """``CLIENT KILL TYPE normal`` closes every command connection of a running
    node (its pub/sub link, subscribed, is kept): the next publication over the
    server API is stored and delivered, not answered "broker unavailable", and
    so on five times over. The WebSocket subscriber gets every offset once."""
    srv = server_factory(config=redis_config(redis_server))
    admin = redis.Redis.from_url(redis_server.url)
    channel = unique_channel("stale")
    with connect(srv.ws_url + "/connection/websocket") as ws:
        assert "connect" in command(ws, {"id": 1, "connect": {}})
        assert "subscribe" in command(ws, {"id": 2, "subscribe": {"channel": channel}})
        offsets = [publish(srv, channel, {"n": 0})["offset"]]
        for n in range(1, 6):
            killed = admin.client_kill_filter(_type="normal", skipme=True)
            assert killed >= 1
            offsets.append(publish(srv, channel, {"n": n})["offset"])
        pushed = [json.loads(str(ws.recv(timeout=WAIT)))["push"]["pub"] for _ in offsets]
    assert offsets == list(range(1, 7))
    assert [pub["offset"] for pub in pushed] == offsets
    assert [pub["data"] for pub in pushed] == [{"n": n} for n in range(6)]
    assert "broker unavailable" not in srv.logs()
    assert "Traceback" not in srv.logs()


@LOOPS
def test_a_publish_after_a_redis_restart_goes_out_on_a_new_connection(
    redis_server: RedisServer, loop: str
) -> None:
    """Redis restarts (killed, started again on its port, data lost) between
    two publications: the first one after it is stored, in a new epoch, rather
    than written into the connection the old process closed. The restart
    blocks the loop, so the loop has not read that close when the publish
    takes the connection (the check has to ask the kernel)."""

    async def body(broker: RedisBroker) -> None:
        first = await broker.publish("c", b"1", history=KEEP)
        redis_server.restart()
        second = await broker.publish("c", b"2", history=KEEP)
        assert (second.offset, second.epoch != first.epoch) == (1, True)
        assert await history_offsets(broker, "c") == [1]

    run(loop, with_broker(redis_server.url, body))


@LOOPS
def test_a_connection_closed_while_it_connects_is_a_broker_error_not_a_crash(
    redis_server: RedisServer, loop: str
) -> None:
    """Redis goes away between the TCP connect and the handshake's HELLO (the
    chaos run's Redis kills): under uvloop the write raised RuntimeError
    through redis-py, a traceback and a 500. Now it is a write not sent: sent
    once more on a new connection (or, if that fails too, the temporary error)."""

    async def body(broker: RedisBroker) -> None:
        pool = broker._redis.connection_pool
        connection_class = pool.connection_class
        original: Callable[[AbstractConnection], Awaitable[None]] = connection_class._connect
        closed: list[AbstractConnection] = []

        async def connect_then_lose_it(self: AbstractConnection) -> None:
            await original(self)
            if not closed:
                closed.append(self)
                assert self._writer is not None
                self._writer.transport.close()

        await pool.disconnect()
        with mock.patch.object(connection_class, "_connect", connect_then_lose_it):
            try:
                publication = await broker.publish("c", b"1", history=KEEP)
            except BrokerUnavailable:
                publication = None  # asyncio: the HELLO's reply never comes
        assert closed
        if publication is not None:
            assert await history_offsets(broker, "c") == [1]
        if loop == "uvloop":
            assert publication is not None and publication.offset == 1

    run(loop, with_broker(redis_server.url, body))
