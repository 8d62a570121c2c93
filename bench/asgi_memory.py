"""Where the memory of a connection served through the ASGI app goes (tracemalloc).

Runs tidings' ASGI app under uvicorn in this process, opens N idle SSE streams
or subscribed WebSockets from a thread, and prints the bytes allocated per
connection between two snapshots, by source line: uvicorn's objects against
tidings' own (``src/tidings/``). The benchmark (``bench/run.py --servers
tidings-asgi``) gives the RSS; this says whose it is.

    .venv/bin/python bench/asgi_memory.py sse      # or ws; N=500
"""

from __future__ import annotations

import os
import sys
import threading
import time
import tracemalloc

import uvicorn

from conn_memory import open_connection  # the same idle subscriber as natively
from tidings.asgi import ASGIApp
from tidings.config import Config
from tidings.server import Server

PORT = 8799
N = 500


def measure(kind: str) -> None:
    time.sleep(1.5)  # uvicorn starting
    sockets = [open_connection(PORT, kind) for _ in range(20)]  # warm-up: first-time allocations
    time.sleep(0.5)
    before = tracemalloc.take_snapshot()
    sockets += [open_connection(PORT, kind) for _ in range(N)]
    time.sleep(1.0)
    after = tracemalloc.take_snapshot()
    stats = after.compare_to(before, "lineno")
    total = sum(stat.size_diff for stat in stats)
    ours = sum(stat.size_diff for stat in stats if "/tidings/" in stat.traceback[0].filename)
    print(f"{kind}: {total / N:,.0f} B per connection, tidings' own {ours / N:,.0f} B")
    for stat in stats[:15]:
        print(f"{stat.size_diff / N:8,.0f} B  {stat.traceback}")
    sys.stdout.flush()
    os._exit(0)  # uvicorn would wait for the open streams


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else "sse"
    app = ASGIApp(Server(Config()))
    config = uvicorn.Config(
        app,
        port=PORT,
        loop="asyncio",
        http="httptools",
        ws="websockets-sansio",
        ws_ping_interval=None,
        log_level="warning",
        access_log=False,
    )
    tracemalloc.start(1)
    threading.Thread(target=measure, args=(kind,), daemon=True).start()
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
