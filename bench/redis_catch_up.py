"""How long the Redis broker takes to fill the hole of N channels after a pub/sub reconnect.

Usage: ``.venv/bin/python bench/redis_catch_up.py [--channels 1000 5000] [--repeat 3]``

Starts a throw-away ``redis-server`` on a free loopback port (as
``bench/redis_pubsub_reader.py`` does). A node subscribes N channels and
receives one publication on each; then one more publication per channel is
made that the node has not received (the hole). Timed, best of ``--repeat``:

* ``pipelined``: the broker's catch-up (``RedisBroker._catch_up``) with every
  channel held, as after a reconnect: one pipelined round trip per
  ``catch_up_batch`` channels (500), each an ``_ENSURE`` and an ``XRANGE``.
* ``before``: what the catch-up did before (until e6fbf2c): for each channel
  one after another, ``_ensure`` then ``history`` — two round trips per channel.

Then ``reconnect``: the whole fault, timed from ``CLIENT KILL TYPE pubsub``
to the last channel's missed publication delivered (backoff, resubscribe in
batches of 1,000, catch-up), with a publisher making 2,000 publications/s
(of 1 kB, round robin over the channels) meanwhile and Redis' output buffer
for the link (``omem`` in ``CLIENT LIST``) sampled every 5 ms: its peak.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).parent))
from redis_pubsub_reader import redis_server
from tidings.brokers.redis import RedisBroker
from tidings.hub import DEFAULT_HISTORY, Publication


async def prepare(
    url: str, prefix: str, channels: list[str]
) -> tuple[RedisBroker, RedisBroker, list[Publication]]:
    publisher = RedisBroker(url, prefix=prefix)
    node = RedisBroker(url, prefix=prefix)
    got: list[Publication] = []
    node.bind(got.append)
    await publisher.start()
    await node.start()
    for start in range(0, len(channels), 50):
        await asyncio.gather(*(node.subscribe(c) for c in channels[start : start + 50]))
    await publish_each(publisher, channels)
    while len(got) < len(channels):
        await asyncio.sleep(0.01)
    return publisher, node, got


async def publish_each(publisher: RedisBroker, channels: list[str]) -> None:
    for start in range(0, len(channels), 50):
        batch = channels[start : start + 50]
        await asyncio.gather(*(publisher.publish(c, b"1", history=DEFAULT_HISTORY) for c in batch))


async def catch_up(url: str, n: int, pipelined: bool) -> float:
    channels = [f"c{i}" for i in range(n)]
    publisher, node, got = await prepare(url, f"b{time.monotonic_ns()}", channels)
    try:
        # The hole: publications the node does not hear of (unsubscribed meanwhile in Redis).
        await node._pubsub.close()
        await publish_each(publisher, channels)
        before = len(got)
        started = time.perf_counter()
        if pipelined:
            node._held = {c: [] for c in channels}
            await node._catch_up([])
        else:
            for channel in channels:
                last = node._interest[channel]
                await node._ensure(channel)
                pubs, _ = await node.history(channel, since=last)
                for pub in pubs:
                    node._deliver_once(pub)
        elapsed = time.perf_counter() - started
        assert len(got) - before == n, (len(got) - before, n)
        return elapsed
    finally:
        await publisher.close()
        await node.close()


async def reconnect(url: str, n: int) -> tuple[float, int]:
    channels = [f"c{i}" for i in range(n)]
    publisher, node, got = await prepare(url, f"r{time.monotonic_ns()}", channels)
    client = aioredis.Redis.from_url(url)
    peak = 0
    done = False

    async def sample() -> None:
        nonlocal peak
        while not done:
            for link in await client.client_list(_type="pubsub"):
                if int(link["sub"]) == n:
                    peak = max(peak, int(link["omem"]))
            await asyncio.sleep(0.005)

    async def load() -> None:
        payload = b'"' + b"x" * 1000 + b'"'
        i = 0
        while not done:
            await asyncio.gather(
                *(
                    publisher.publish(channels[(i + k) % n], payload, history=DEFAULT_HISTORY)
                    for k in range(20)
                )
            )
            i += 20
            await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(sample()), asyncio.create_task(load())]
    try:
        started = time.perf_counter()
        await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
        await publish_each(publisher, channels)  # a marker per channel, made during the outage
        marked: set[str] = set()
        while len(marked) < n:
            marked.update(p.channel for p in got if p.data == b"1" and p.offset > 1)
            await asyncio.sleep(0.005)
        return time.perf_counter() - started, peak
    finally:
        done = True
        await asyncio.gather(*tasks)
        await client.aclose()
        await publisher.close()
        await node.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--channels", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--reconnect-only", action="store_true", help="only the whole fault (runs on older trees)"
    )
    args = parser.parse_args()
    with redis_server() as url:
        for n in args.channels:
            for pipelined in () if args.reconnect_only else (True, False):
                best = min([await catch_up(url, n, pipelined) for _ in range(args.repeat)])
                name = "pipelined" if pipelined else "before"
                print(f"{n:>6} channels  {name:<9}  catch-up {best * 1000:8.1f} ms")
            took, peak = await reconnect(url, n)
            print(
                f"{n:>6} channels  reconnect  {took * 1000:8.1f} ms, "
                f"pub/sub output buffer peak {peak / 1024:.0f} KiB"
            )


if __name__ == "__main__":
    asyncio.run(main())
