"""SSE broadcast on Tornado: the generator-coroutine model.

Each subscriber is a ``RequestHandler`` whose ``get`` is a coroutine written
with ``@gen.coroutine`` and ``yield`` -- the form Tornado introduced before
Python had ``async def`` -- that waits on a shared ``tornado.locks.Condition``,
writes what was published since it last looked and ``flush()``es it. It reads
like the thread-per-connection server (``threaded_sse.py``), but a waiting
subscriber is a suspended generator and a future instead of a thread. Since
Tornado 5 the loop underneath is asyncio's (the default loop: Tornado does not
bring uvloop), so what this measures beside the floor is Tornado's HTTP layer,
its handler objects and the generator-coroutine runner.

Same endpoints as ``threaded_sse.py``: ``GET /sse`` (the one channel: the
query is not read), ``POST /api/publish`` with tidings' body, ``GET /health``.

Usage: ``python tornado_sse.py PORT``
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Generator
from typing import Any

from tornado import gen, locks, web
from tornado.iostream import StreamClosedError


class Latest:
    """The last publications by sequence number.

    A subscriber still flushing while more were published catches up from
    ``history`` instead of skipping them (as in ``threaded_sse.py``).
    """

    seq = 0
    history: dict[int, bytes] = {}
    published = locks.Condition()


class Stream(web.RequestHandler):
    """``GET /sse``: one suspended generator per subscriber."""

    @gen.coroutine
    def get(self) -> Generator[Any, Any, None]:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.write(b"retry: 3000\n\nevent: subscribed\ndata: {}\n\n")
        seen = Latest.seq
        try:
            yield self.flush()
            while True:
                if Latest.seq == seen:
                    yield Latest.published.wait()
                seq = Latest.seq
                self.write(b"".join(Latest.history.get(i, b"") for i in range(seen + 1, seq + 1)))
                seen = seq
                yield self.flush()
        except StreamClosedError:
            return


class Publish(web.RequestHandler):
    """``POST /api/publish``: log the event and wake every subscriber."""

    def post(self) -> None:
        data = json.loads(self.request.body)["data"]
        event = b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
        Latest.seq += 1
        Latest.history[Latest.seq] = event
        Latest.history.pop(Latest.seq - 100, None)
        Latest.published.notify_all()
        self.set_header("Content-Type", "application/json")
        self.write(b'{"result":{}}')


class Health(web.RequestHandler):
    def get(self) -> None:
        self.write({"status": "ok"})


async def main(port: int) -> None:
    app = web.Application(
        [(r"/sse", Stream), (r"/api/publish", Publish), (r"/health", Health)],
        # No access log (it would dominate the measurement, as in the threaded peer).
        log_function=lambda handler: None,
    )
    app.listen(port, "127.0.0.1", backlog=4096)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
