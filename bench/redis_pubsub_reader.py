"""Our Redis pub/sub reader against redis-py's ``PubSub``: CPU per message, memory per channel.

Usage: ``.venv/bin/python bench/redis_pubsub_reader.py [--messages 200000] [--channels 20000]``

Starts a throw-away ``redis-server`` on a free loopback port. For each reader:

* CPU per message: the reader subscribes one channel; another *process*
  publishes ``--messages`` messages of 100 bytes (pipelined); the reader's
  process CPU time (``time.process_time``) from before the first message to
  the last one received, divided by the count. The publisher's work is not in it.
* memory per channel: ``--channels`` channels subscribed (and confirmed by
  Redis), the Python heap grown meanwhile (``tracemalloc``); the same for a
  quarter of them; the difference per channel.
* missed right after subscribe: for each of 1,000 channels, ``subscribe``
  returns, then another connection PUBLISHes to it; Redis answers how many
  subscribers received it, and a 0 is a publication this node missed. For
  redis-py this is its ``subscribe()`` as such (it does not wait for Redis).

The CPU figure is the best of ``--repeat`` runs. Both readers run on uvloop, as
the server does. redis-py's reader is driven as its documentation suggests:
``get_message(timeout=None)`` in a loop (``listen()`` is the same code path).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import redis
import redis.asyncio as aioredis
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from tidings.brokers.redis_pubsub import RedisPubSub

PAYLOAD = b"x" * 100
#: Long enough for 20,000 subscribes under tracemalloc; the memory figure is taken
#: once the timers of finished subscribes have expired (the loop keeps them until then).
SUBSCRIBE_TIMEOUT = 10.0
CHANNEL = b"bench:p:room"

_PUBLISHER = """
import sys, redis
r = redis.Redis.from_url(sys.argv[1])
n, channel, payload = int(sys.argv[2]), sys.argv[3].encode(), b"x" * 100
for start in range(0, n, 1000):
    pipe = r.pipeline(transaction=False)
    for _ in range(min(1000, n - start)):
        pipe.publish(channel, payload)
    pipe.execute()
"""


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as workdir:
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", workdir]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            deadline = time.monotonic() + 10
            while True:
                try:
                    redis.Redis.from_url(url).ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            yield url
        finally:
            proc.kill()
            proc.wait()


class Reader:
    """One way of reading pub/sub: subscribe, then count what arrives."""

    received = 0

    async def start(self) -> None: ...

    async def subscribe(self, names: list[bytes]) -> None: ...

    async def subscribe_only(self, name: bytes) -> None:
        """Subscribe as the reader's API does, without waiting beyond it."""
        await self.subscribe([name])

    async def close(self) -> None: ...


class Ours(Reader):
    def __init__(self, url: str) -> None:
        async def nothing(*args: object) -> None:
            return None

        self.pubsub = RedisPubSub(
            url,
            on_message=self._count,
            on_resubscribed=nothing,
            on_lost=nothing,
            subscribe_timeout=SUBSCRIBE_TIMEOUT,
        )

    def _count(self, channel: bytes, data: bytes) -> None:
        self.received += 1

    async def start(self) -> None:
        await self.pubsub.start()

    async def subscribe(self, names: list[bytes]) -> None:
        # One after the other, as a node's clients subscribe: a gather of 20,000
        # would measure the event loop's timer and task tables at that peak.
        for name in names:
            await self.pubsub.subscribe(name)

    async def close(self) -> None:
        await self.pubsub.close()


class RedisPy(Reader):
    def __init__(self, url: str) -> None:
        self.client = aioredis.Redis.from_url(url)
        self.pubsub = self.client.pubsub()
        self.task: asyncio.Task[None] | None = None
        self.confirmed = 0

    async def _read(self) -> None:
        while True:
            message = await self.pubsub.get_message(timeout=None)
            if message is None:
                continue
            if message["type"] == "message":
                self.received += 1
            elif message["type"] == "subscribe":
                self.confirmed += 1

    async def subscribe(self, names: list[bytes]) -> None:
        # Confirmed the same way as ours: wait for every "subscribe" reply.
        want = self.confirmed + len(names)
        for start in range(0, len(names), 1000):
            await self.pubsub.subscribe(*names[start : start + 1000])
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._read())
        while self.confirmed < want:
            await asyncio.sleep(0.001)

    async def subscribe_only(self, name: bytes) -> None:
        await self.pubsub.subscribe(name)
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._read())

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.pubsub.aclose()
        await self.client.aclose()


async def cpu_per_message(make: Callable[[], Reader], url: str, messages: int) -> float:
    reader = make()
    await reader.start()
    await reader.subscribe([CHANNEL])
    publisher = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _PUBLISHER, url, str(messages), CHANNEL.decode()
    )
    started = time.process_time()
    while reader.received < messages:
        await asyncio.sleep(0.005)
    spent = time.process_time() - started
    await publisher.wait()
    await reader.close()
    return spent / messages


async def memory_per_channel(make: Callable[[], Reader], channels: int) -> float:
    """The slope between ``channels`` and a quarter of it: the event loop's free
    lists and other fixed costs (about 1 MiB on uvloop) drop out."""
    few = channels // 4
    grown = await memory_grown(make, channels) - await memory_grown(make, few)
    return grown / (channels - few)


async def memory_grown(make: Callable[[], Reader], channels: int) -> float:
    reader = make()
    await reader.start()
    names = [b"bench:p:channel-%d" % n for n in range(channels)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    await reader.subscribe(names)
    await asyncio.sleep(SUBSCRIBE_TIMEOUT + 0.5)  # what stays, not what is in flight
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    await reader.close()
    # The names themselves are the caller's: both readers keep references only.
    return after - before


async def missed_after_subscribe(make: Callable[[], Reader], url: str) -> float:
    reader = make()
    await reader.start()
    publisher = aioredis.Redis.from_url(url)
    missed = 0
    for n in range(1000):
        name = b"bench:p:race-%d" % n
        await reader.subscribe_only(name)
        missed += await publisher.publish(name, PAYLOAD) == 0
    await publisher.aclose()
    await reader.close()
    return missed


async def main(args: argparse.Namespace) -> None:
    with redis_server() as url:
        readers: dict[str, Callable[[], Reader]] = {
            "ours (RedisPubSub)": lambda: Ours(url),
            "redis-py PubSub": lambda: RedisPy(url),
        }
        for name, make in readers.items():
            cpu = min([await cpu_per_message(make, url, args.messages) for _ in range(args.repeat)])
            mem = await memory_per_channel(make, args.channels)
            missed = await missed_after_subscribe(make, url)
            print(
                f"{name:20} {cpu * 1e6:6.2f} us CPU per message   {mem:6.0f} B per channel   "
                f"{missed:4.0f} of 1000 publications right after subscribe missed"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--channels", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    uvloop.run(main(parser.parse_args()))
