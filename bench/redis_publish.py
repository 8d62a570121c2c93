"""What one publication costs the Redis broker, sequentially, over a local redis-server.

Usage: ``.venv/bin/python bench/redis_publish.py [--count 5000] [--repeat 5] [--loop uvloop]``

Starts a throw-away ``redis-server`` on a free loopback port (as
``bench/redis_pubsub_reader.py`` does) and awaits ``RedisBroker.publish`` of a
small payload ``--count`` times, one after another (one pooled connection, the
publish script's round trip each time). Prints, best of ``--repeat``, the wall
time and the process's CPU time per publication in microseconds: CPU time is
the figure to compare on a loaded machine, wall time includes Redis' side.
Written to price the pooled connection's liveness check made before each
command (``brokers/redis.py``, ``_Checked``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from redis_pubsub_reader import redis_server
from tidings.brokers.redis import RedisBroker
from tidings.hub import DEFAULT_HISTORY


async def run(url: str, count: int, repeat: int) -> tuple[float, float]:
    broker = RedisBroker(url, prefix="bench")
    try:
        await broker.publish("warm", b"0", history=DEFAULT_HISTORY)
        best_wall = best_cpu = float("inf")
        for _ in range(repeat):
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(count):
                await broker.publish("c", b'{"n":1}', history=DEFAULT_HISTORY)
            best_wall = min(best_wall, (time.perf_counter() - wall) / count * 1e6)
            best_cpu = min(best_cpu, (time.process_time() - cpu) / count * 1e6)
        return best_wall, best_cpu
    finally:
        await broker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    with redis_server() as url:
        coro = run(url, args.count, args.repeat)
        if args.loop == "uvloop":
            import uvloop

            wall, cpu = uvloop.run(coro)
        else:
            wall, cpu = asyncio.run(coro)
    print(f"{args.loop}: {wall:.1f} us wall, {cpu:.1f} us CPU per publish (best of {args.repeat})")


if __name__ == "__main__":
    main()
