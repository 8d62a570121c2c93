"""SSE broadcast on Twisted: the callback model.

``twisted.web``: the subscribe resource answers ``NOT_DONE_YET`` and keeps the
``Request``; nothing waits anywhere, a connection is only objects the reactor
(epoll) calls back. A publish calls ``request.write`` on every kept request,
and ``notifyFinish()``'s errback forgets a subscriber whose connection dropped.
The response has no length, so Twisted frames it as HTTP/1.1 chunks, as any
Twisted SSE server does.

Same endpoints as ``threaded_sse.py``: ``GET /sse`` (the one channel: the
query is not read), ``POST /api/publish`` with tidings' body, ``GET /health``.

Usage: ``python twisted_sse.py PORT``
"""

# Twisted's web API is largely unannotated and its zope interfaces need the
# mypy-zope plugin to be seen as implemented; the bench does not bring it.
# mypy: disable-error-code="no-untyped-call,arg-type,misc"

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import reactor
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

SUBSCRIBERS: set[Request] = set()


class Stream(Resource):
    """``GET /sse``: keep the request open and remember it."""

    isLeaf = True

    def render_GET(self, request: Request) -> Any:
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.write(b"retry: 3000\n\nevent: subscribed\ndata: {}\n\n")
        SUBSCRIBERS.add(request)
        request.notifyFinish().addBoth(lambda _: SUBSCRIBERS.discard(request))
        return NOT_DONE_YET


class Publish(Resource):
    """``POST /api/publish``: write the event to every kept request, then answer."""

    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        data = json.loads(request.content.read())["data"]
        event = b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
        for subscriber in SUBSCRIBERS:
            subscriber.write(event)
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"result":{}}'


class Health(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"status":"ok"}'


class QuietSite(Site):
    """No access log (it would dominate the measurement, as in the threaded peer)."""

    def log(self, request: http.Request) -> None:
        pass


def main(port: int) -> None:
    api = Resource()
    api.putChild(b"publish", Publish())
    root = Resource()
    root.putChild(b"sse", Stream())
    root.putChild(b"api", api)
    root.putChild(b"health", Health())
    reactor.listenTCP(port, QuietSite(root), backlog=4096, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
