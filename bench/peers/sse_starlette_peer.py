"""sse-starlette peer: Starlette + ``EventSourceResponse`` under uvicorn.

The idiomatic pattern from its docs and most tutorials: one ``asyncio.Queue``
and one async generator (so one task) per subscriber; publishing puts the
message on every queue. The JSON is encoded once per publication and each
generator yields that same string; sse-starlette frames it per subscriber.

Usage: ``python sse_starlette_peer.py PORT``
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator

import uvicorn
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

QUEUES: set[asyncio.Queue[str]] = set()


async def sse(request: Request) -> EventSourceResponse:
    """Register a queue, then stream whatever is put on it."""

    async def events() -> AsyncIterator[dict[str, str]]:
        q: asyncio.Queue[str] = asyncio.Queue()
        QUEUES.add(q)
        try:
            yield {"event": "subscribed", "data": "{}"}
            while True:
                yield {"data": await q.get()}
        finally:
            QUEUES.discard(q)

    return EventSourceResponse(events())


async def publish(request: Request) -> JSONResponse:
    """Encode once, enqueue everywhere."""
    data = json.dumps((await request.json())["data"], separators=(",", ":"))
    for q in QUEUES:
        q.put_nowait(data)
    return JSONResponse({"result": {}})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[
        Route("/sse", sse),
        Route("/api/publish", publish, methods=["POST"]),
        Route("/health", health),
    ]
)

if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_level="warning",
        loop="uvloop",
        http="httptools",
        backlog=4096,
    )
