"""The Python client on every transport: one cursor across WebSocket, SSE, long-poll and
poll; rpc, publish, history, presence and presence_stats on each; the sync iterator.

The server is real (a ``tidings serve`` process, or a server with Python hooks in
this process for RPC, ``hooks_support.hooked_server``); publications are made
through the server API with httpx. What the client promises (docs/clients.md):

- a program that stops a subscription and starts another, on any transport,
  from its ``cursor`` gets every publication exactly once and in order, even
  those published while no subscription was open and those already received
  but not yet taken from it;
- the commands go over the live WebSocket on ``ws`` (the hook sees transport
  ``websocket``), else to ``POST /call/<name>`` (transport ``http``), with the
  same results and the same error codes;
- ``subscribe_sync`` yields the same publications to a script without asyncio
  and leaves no thread behind when closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conftest import ServerProcess
from helpers import publish, unique_channel
from hooks_support import HookedServer, Recorder, hooked_server
from tidings.client import APIError, Subscription, encode_cursor, subscribe, subscribe_sync
from tidings.client.subscriber import TRANSPORTS, Transport
from tidings.hooks import Hooks, RPCCall

#: A deadline for each wait, generous: the suite shares two loaded cores.
TIMEOUT = 20.0

#: Quick reconnects and polls, so that a test waits on the server, not on back-off.
QUICK: dict[str, Any] = {"min_backoff": 0.01, "poll_interval": 0.05, "poll_timeout": 2}


async def take(sub: Subscription, n: int) -> list[Any]:
    """The data of the next ``n`` publications (markers of :func:`until_subscribed` skipped)."""
    got: list[Any] = []
    async with asyncio.timeout(TIMEOUT):
        async for pub in sub:
            if pub.data == "marker":
                continue
            got.append(pub.data)
            if len(got) == n:
                break
    return got


async def until_subscribed(srv: Any, sub: Subscription, channel: str) -> None:
    """Wait until ``sub`` follows ``channel``: a marker published until one arrives.

    A poll client is no subscriber the server could count, so the marker is
    the proof on every transport; the markers received are dropped.
    """
    async with asyncio.timeout(TIMEOUT):
        while True:
            await asyncio.to_thread(publish, srv, channel, "marker")
            try:
                async with asyncio.timeout(0.5):
                    async for pub in sub:
                        if pub.data == "marker":
                            return
            except TimeoutError:
                continue


# -- one cursor, four transports ---------------------------------------------------------


def test_switching_transports_with_the_cursor_loses_and_repeats_nothing(
    server: ServerProcess,
) -> None:
    """ws → sse → longpoll → poll → ws → sse: at each switch two publications are made
    while no subscription is open, and one more than the program took was sent to
    it before it stopped (received, not taken): all arrive once, in order."""
    channel = unique_channel("switch")
    order: list[Transport] = ["ws", "sse", "longpoll", "poll", "ws", "sse"]

    async def main() -> list[Any]:
        got: list[Any] = []
        cursor: str | None = None
        n = 0
        for stage, transport in enumerate(order):
            sub = subscribe(server.url, [channel], transport, cursor=cursor, **QUICK)
            try:
                if cursor is None:
                    await until_subscribed(server, sub, channel)
                else:
                    got += await take(sub, 2)  # the two made between subscriptions
                for _ in range(3):
                    n += 1
                    await asyncio.to_thread(publish, server, channel, f"{stage}-{n}")
                got += await take(sub, 2)  # the third is left in the subscription
                cursor = sub.cursor
            finally:
                await sub.aclose()
            for _ in range(2 if stage < len(order) - 1 else 0):
                n += 1
                await asyncio.to_thread(publish, server, channel, f"between-{n}")
            if stage < len(order) - 1:
                got.append("<switch>")
                # The third of this stage first: it was received, not taken.
                sub = subscribe(server.url, [channel], order[stage + 1], cursor=cursor, **QUICK)
                try:
                    got += await take(sub, 1)
                    cursor = sub.cursor
                finally:
                    await sub.aclose()
        return got

    got = asyncio.run(main())
    published = [data for data in got if data != "<switch>"]
    assert len(published) == len(set(published)), f"repeated: {got}"
    numbers = [int(str(data).rsplit("-", 1)[1]) for data in published]
    assert numbers == list(range(1, len(numbers) + 1)), f"lost or out of order: {got}"
    # All but the last stage's third, never taken.
    assert len(numbers) == 3 * len(order) - 1 + 2 * (len(order) - 1)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_each_transport_resumes_from_a_cursor_of_another(
    server: ServerProcess, transport: Transport
) -> None:
    channel = unique_channel(f"from-{transport}")
    first = publish(server, channel, "before")

    async def main() -> list[Any]:
        # A cursor standing at "before", as any transport's would.
        cursor = encode_cursor({channel: (first["epoch"], first["offset"])})
        await asyncio.to_thread(publish, server, channel, "after-1")
        await asyncio.to_thread(publish, server, channel, "after-2")
        async with subscribe(server.url, channel, transport, cursor=cursor, **QUICK) as sub:
            return await take(sub, 2)

    assert asyncio.run(main()) == ["after-1", "after-2"]


# -- commands on every transport ---------------------------------------------------------


@pytest.fixture
def hooks() -> Hooks:
    return Hooks(timeout=2.0)


@pytest.fixture
def hooked(hooks: Hooks) -> Iterator[HookedServer]:
    config = {"namespaces": {"room": {"presence": True}, "quiet": {}}}
    with hooked_server(hooks, config) as server:
        yield server


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_commands_on_each_transport(
    hooks: Hooks, hooked: HookedServer, transport: Transport
) -> None:
    calls = Recorder()

    async def echo(rpc: RPCCall) -> Any:
        calls.add(rpc)
        return {"echo": rpc.data_json()}

    hooks.rpc = {"echo": echo}
    channel = unique_channel("room:")

    async def main() -> None:
        async with subscribe(hooked.url, channel, transport, **QUICK) as sub:
            await until_subscribed(hooked, sub, channel)
            assert await sub.rpc("echo", {"n": 1}) == {"echo": {"n": 1}}
            await sub.publish(channel, {"from": "client"})
            assert await take(sub, 1) == [{"from": "client"}]
            history = await sub.history(channel, limit=-1)
            assert [p.data for p in history.publications][-1] == {"from": "client"}
            assert history.offset == history.publications[-1].offset and history.epoch
            since = await sub.history(channel, since=(history.epoch, history.offset - 1), limit=-1)
            assert [p.data for p in since.publications] == [{"from": "client"}]
            stats = await sub.presence_stats(channel)
            presence = await sub.presence(channel)
            if transport == "ws":  # the WebSocket client is in the channel's presence
                assert (stats.num_clients, len(presence.presence)) == (1, 1)
            else:  # an HTTP subscriber holds no presence
                assert (stats.num_clients, presence.presence) == (0, {})
            for failing, code in (
                (sub.rpc("missing"), 108),
                (sub.presence(unique_channel("quiet:")), 108),
                (sub.history("bad name"), 107),
            ):
                with pytest.raises(APIError) as refused:
                    await failing
                assert refused.value.code == code

    asyncio.run(main())
    (rpc,) = calls.items
    assert rpc.transport == ("websocket" if transport == "ws" else "http")


# -- the sync iterator --------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["ws", "sse", "longpoll"])
def test_subscribe_sync_yields_and_closes_cleanly(
    server: ServerProcess, transport: Transport
) -> None:
    channel = unique_channel("sync")
    start = publish(server, channel, "before")
    cursor = encode_cursor({channel: (start["epoch"], start["offset"])})
    before = set(threading.enumerate())
    with subscribe_sync(server.url, [channel], transport, cursor=cursor, **QUICK) as sub:
        for n in range(3):
            publish(server, channel, n)
        got = []
        for pub in sub:
            got.append(pub.data)
            if got[-3:] == [0, 1, 2]:
                break
        assert sub.history(channel, limit=-1).publications[-1].data == 2
    assert got[-3:] == [0, 1, 2]
    assert set(threading.enumerate()) <= before, "the subscriber's thread is still running"


def test_subscribe_sync_raises_a_refusal(server_factory: Callable[..., ServerProcess]) -> None:
    srv = server_factory(config='[auth]\nhmac_secret = "a-secret-long-enough-for-hs256-tokens"\n')
    with (
        subscribe_sync(srv.url, ["private"], "sse", **QUICK) as sub,
        pytest.raises(APIError) as refused,
    ):
        next(iter(sub))
    assert refused.value.code == 103


# -- the SSE watchdog -----------------------------------------------------------------------


class StallingProxy:
    """A loopback TCP proxy whose :meth:`stall` stops forwarding the connections it holds
    without closing them (a proxy or NAT that silently drops a stream); connections
    made afterwards are forwarded as usual."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.stalled: set[asyncio.StreamWriter] = set()
        self._open: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.port = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(TIMEOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._open.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if dst in self.stalled:
                        continue  # swallowed: the stream stays open and silent
                    dst.write(data)
                    await dst.drain()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def stall(self) -> None:
        """From now on, nothing more passes on the connections open now."""
        done = threading.Event()

        def _stall() -> None:
            self.stalled.update(self._open)
            done.set()

        self._loop.call_soon_threadsafe(_stall)
        assert done.wait(TIMEOUT)

    def close(self) -> None:
        def _stop() -> None:
            for writer in self._open:
                writer.transport.abort()
            self._loop.stop()

        self._loop.call_soon_threadsafe(_stop)
        self._thread.join(TIMEOUT)
        self._loop.close()


def test_a_silently_stalled_sse_stream_is_resumed_by_the_ping_watchdog(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """The server pings every 0.5 s; the proxy stalls the stream without closing it.
    The read timeout (60 s) would notice far past the test's deadline: the client
    reconnects after twice the ping interval of silence, and the publications made
    while the stream was stalled arrive once, in order."""
    srv = server_factory(config="[sse]\nheartbeat_interval = 0.5\n")
    proxy = StallingProxy(srv.port)
    channel = unique_channel("stall")

    async def main() -> list[Any]:
        sub = subscribe(proxy.url, channel, "sse", read_timeout=60.0, **QUICK)
        try:
            await until_subscribed(srv, sub, channel)
            await asyncio.to_thread(proxy.stall)
            for n in range(3):
                await asyncio.to_thread(publish, srv, channel, f"during-{n}")
            return await take(sub, 3)
        finally:
            await sub.aclose()

    try:
        assert asyncio.run(main()) == ["during-0", "during-1", "during-2"]
    finally:
        proxy.close()


def test_aclose_ends_even_when_a_layer_below_turns_the_cancel_into_an_error(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aclose() cancels the reconnect loop; a library below that answers the
    cancel with an error instead (Python 3.11's ``asyncio.timeout`` racing a
    cancel does so with TimeoutError) must not start a reconnect that aclose()
    then waits on for ever."""
    runs = 0
    running: asyncio.Event | None = None

    async def swallowing_run(self: Subscription, token: object, established: object) -> None:
        nonlocal runs
        runs += 1
        assert running is not None
        running.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise TimeoutError("the cancel, as a timeout") from None

    monkeypatch.setattr(Subscription, "_run_sse", swallowing_run)

    async def main() -> None:
        nonlocal running
        running = asyncio.Event()
        sub = subscribe(server.url, [unique_channel()], "sse", **QUICK)
        reader = asyncio.ensure_future(sub.__anext__())  # starts the reconnect loop
        async with asyncio.timeout(TIMEOUT):
            await running.wait()
            await sub.aclose()
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader

    asyncio.run(main())
    assert runs == 1  # closed, not reconnected
