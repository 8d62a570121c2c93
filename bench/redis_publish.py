"""What one publication costs the Redis broker, sequentially, over a local redis-server,
with and without the liveness check of its pooled connections.

Usage: ``.venv/bin/python bench/redis_publish.py [--count 500] [--rounds 40] [--loop uvloop]``

Starts a throw-away ``redis-server`` on a free loopback port (as
``bench/redis_pubsub_reader.py`` does). Two brokers in one process, one with
its connections as the broker makes them (``checked``: a zero-timeout
``poll()`` of the socket each time the pool lends a connection, see
``_Checked`` in ``brokers/redis.py``), one with redis-py's plain connection
class put back (``unchecked``, as before the check). Each round awaits
``--count`` publications of a small payload one after another on each broker,
in turn, so that a machine whose load drifts slows both alike. Prints the
median over ``--rounds`` of the process's CPU time and the wall time per
publication in microseconds: CPU time is the figure to compare on a loaded
machine; wall time includes Redis' side.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from redis_pubsub_reader import redis_server
from tidings.brokers.redis import _CHECKED, RedisBroker
from tidings.hub import DEFAULT_HISTORY


def unchecked(broker: RedisBroker) -> RedisBroker:
    """``broker`` with redis-py's own connection class (no connection made yet)."""
    pool = broker._redis.connection_pool
    (plain,) = [kind for kind, checked in _CHECKED.items() if checked is pool.connection_class]
    pool.connection_class = plain
    return broker


async def publish_many(broker: RedisBroker, count: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        await broker.publish("c", b'{"n":1}', history=DEFAULT_HISTORY)
    return (time.process_time() - cpu) / count * 1e6, (time.perf_counter() - wall) / count * 1e6


async def run(url: str, count: int, rounds: int) -> dict[str, tuple[float, float]]:
    brokers = {
        "checked": RedisBroker(url, prefix="checked"),
        "unchecked": unchecked(RedisBroker(url, prefix="unchecked")),
    }
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in brokers}
    try:
        for broker in brokers.values():
            await publish_many(broker, count)  # warm-up: connection, script cache
        for _ in range(rounds):
            for name, broker in brokers.items():
                samples[name].append(await publish_many(broker, count))
    finally:
        for broker in brokers.values():
            await broker.close()
    return {
        name: (statistics.median(c for c, _ in got), statistics.median(w for _, w in got))
        for name, got in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    with redis_server() as url:
        coro = run(url, args.count, args.rounds)
        if args.loop == "uvloop":
            import uvloop

            results = uvloop.run(coro)
        else:
            results = asyncio.run(coro)
    for name, (cpu, wall) in results.items():
        print(f"{args.loop} {name:>9}: {cpu:6.1f} us CPU, {wall:6.1f} us wall per publish")


if __name__ == "__main__":
    main()
