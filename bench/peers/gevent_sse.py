"""SSE broadcast on gevent: the green-thread model.

A plain WSGI app under ``gevent.pywsgi``: every connection runs in its own
greenlet, and the SSE response is a generator that blocks on its own
``gevent.queue.Queue`` -- code written as for threads, with a greenlet (a
slice of C stack copied to the heap when it switches out) where a thread would
be. A publish puts the event on every subscriber's queue; each greenlet wakes
in turn and pywsgi writes the chunk to its socket. As with threads, a greenlet
blocked on its queue does not see its socket close, so it wakes every 15 s to
send a comment (as ``threaded_sse.py`` does); a failed write ends the
generator and its ``finally`` unsubscribes it.

Same endpoints as ``threaded_sse.py``: ``GET /sse`` (the one channel: the
query is not read), ``POST /api/publish`` with tidings' body, ``GET /health``.

Usage: ``python gevent_sse.py PORT``
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from gevent.pywsgi import WSGIServer  # type: ignore[import-untyped]
from gevent.queue import Empty, Queue  # type: ignore[import-untyped]

SUBSCRIBERS: set[Queue] = set()
HEARTBEAT_SECONDS = 15

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def stream() -> Iterator[bytes]:
    """One subscriber's response body, produced in its own greenlet."""
    queue: Queue = Queue()
    SUBSCRIBERS.add(queue)
    try:
        yield b"retry: 3000\n\nevent: subscribed\ndata: {}\n\n"
        while True:
            try:
                yield queue.get(timeout=HEARTBEAT_SECONDS)
            except Empty:
                yield b":\n\n"
    finally:
        SUBSCRIBERS.discard(queue)


def json_response(start_response: StartResponse, status: str, body: bytes) -> list[bytes]:
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path, method = environ["PATH_INFO"], environ["REQUEST_METHOD"]
    if path == "/sse" and method == "GET":
        start_response(
            "200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
        )
        return stream()
    if path == "/api/publish" and method == "POST":
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        data = json.loads(body)["data"]
        event = b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
        for queue in SUBSCRIBERS:
            queue.put(event)
        return json_response(start_response, "200 OK", b'{"result":{}}')
    if path == "/health":
        return json_response(start_response, "200 OK", b'{"status":"ok"}')
    return json_response(start_response, "404 Not Found", b'{"error":{"code":404}}')


if __name__ == "__main__":
    # log=None: no access log (it would dominate the measurement, as in the threaded peer).
    WSGIServer(("127.0.0.1", int(sys.argv[1])), app, log=None, backlog=4096).serve_forever()
