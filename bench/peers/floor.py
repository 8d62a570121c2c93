"""The floor: the least work a Python event loop can do to serve the scenarios.

One ``asyncio.Protocol`` per connection with two slots, no task per
connection, and one pre-built ``bytes`` object per wire format written to every
subscriber. Anything tidings does beyond this (routing, cursors, per-connection
bookkeeping, write-buffer checks) shows up as its ratio to this server.

It speaks just enough of tidings' endpoints for the load generator:

* ``GET /sse?...``                 SSE stream, ``event: subscribed`` first
* ``GET /connection/websocket``    RFC 6455 handshake; the client's first frame
                                   (connect + subscribe) is acknowledged with
                                   ``{"id":2,"subscribe":{}}``; later frames are ignored
* ``GET /poll?...[&cursor=C]``     long-poll with an integer cursor; a client
                                   behind gets what it missed (last 100)
* ``POST /api/publish``            ``{"channel":..,"data":..}``; fan-out happens
                                   before the 200 answer, like the probe's floor

The published messages have the same shape and size as tidings' (an ``id:``
line, the publication JSON with channel/offset/epoch), so bytes on the wire match
and CPU per delivery compares like for like.

Usage: ``python floor.py PORT``
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import sys
from typing import cast

try:
    import uvloop
except ImportError:  # pragma: no cover - the benchmark installs uvloop
    uvloop = None

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
    b"retry: 3000\n\nevent: subscribed\ndata: {}\n\n"
)
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B65"
# A cursor-sized id, so the SSE event is as long as tidings' own.
FAKE_CURSOR = b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"

# Connection states (ints, not an Enum: the floor avoids attribute lookups).
HTTP, SSE, WS_HANDSHAKEN, WS, POLL = range(5)


def ws_frame(payload: bytes) -> bytes:
    """Encode an unmasked server text frame."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload


WS_ACK = ws_frame(b'{"id":1,"connect":{}}\n{"id":2,"subscribe":{}}')


def http_response(status: bytes, body: bytes, ctype: bytes = b"application/json") -> bytes:
    """A keep-alive HTTP/1.1 response with Content-Length."""
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: "
        + ctype
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


class Hub:
    """Subscriber sets and the last publication; module-level singleton."""

    def __init__(self) -> None:
        self.sse: set[asyncio.Transport] = set()
        self.ws: set[asyncio.Transport] = set()
        self.polls: list[Conn] = []
        self.offset = 0
        self.history: dict[int, bytes] = {}  # offset -> publication JSON, last 100

    def publish(self, data: bytes) -> None:
        """Encode once per wire format, then write the same bytes everywhere."""
        self.offset += 1
        off = str(self.offset).encode()
        pub = b'{"channel":"bench","offset":' + off + b',"epoch":"floor","data":' + data + b"}"
        sse = b"id: " + FAKE_CURSOR + b"\ndata: " + pub + b"\n\n"
        frame = ws_frame(
            b'{"push":{"channel":"bench","pub":{"data":' + data + b',"offset":' + off + b"}}}"
        )
        self.history[self.offset] = pub
        self.history.pop(self.offset - 100, None)
        for t in self.sse:
            t.write(sse)
        for t in self.ws:
            t.write(frame)
        if self.polls:
            resp = http_response(b"200 OK", self.poll_body(self.offset - 1))
            polls, self.polls = self.polls, []
            for c in polls:
                c.state = HTTP
                c.transport.write(resp)

    def poll_body(self, cursor: int) -> bytes:
        """Every publication after ``cursor`` that history still holds."""
        pubs = b",".join(
            self.history[o] for o in range(cursor + 1, self.offset + 1) if o in self.history
        )
        off = str(self.offset).encode()
        return b'{"publications":[' + pubs + b'],"cursor":"' + off + b'","unrecovered":[]}'


HUB = Hub()


def query_param(target: bytes, name: bytes) -> bytes | None:
    """The first value of ``name`` in the query string, raw."""
    _, _, qs = target.partition(b"?")
    for part in qs.split(b"&"):
        k, _, v = part.partition(b"=")
        if k == name:
            return v
    return None


class Conn(asyncio.Protocol):
    """One client connection: a state and a buffer, nothing else."""

    __slots__ = ("buf", "state", "transport")

    def __init__(self) -> None:
        self.buf = b""
        self.state = HTTP

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == WS:
            return  # client pongs and frames after subscribe: ignored
        if state == WS_HANDSHAKEN:
            # The client's first frame is connect + subscribe; ack and join.
            self.state = WS
            self.transport.write(WS_ACK)
            HUB.ws.add(self.transport)
            return
        if state != HTTP:
            return
        buf = self.buf + data if self.buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            head = buf[:end]
            method, _, rest = head.partition(b" ")
            target = rest.split(b" ", 1)[0]
            body = b""
            if method == b"POST":
                clen = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        clen = int(v)
                if len(buf) < end + 4 + clen:
                    self.buf = buf
                    return
                body = buf[end + 4 : end + 4 + clen]
            buf = buf[end + 4 + len(body) :]
            self.buf = b""
            self.handle(method, target, head, body)
            if self.state != HTTP or not buf:
                return

    def handle(self, method: bytes, target: bytes, head: bytes, body: bytes) -> None:
        """Route one request."""
        path = target.split(b"?", 1)[0]
        t = self.transport
        if method == b"POST" and path == b"/api/publish":
            data = json.dumps(json.loads(body)["data"], separators=(",", ":")).encode()
            HUB.publish(data)
            t.write(http_response(b"200 OK", b'{"result":{}}'))
        elif path == b"/sse":
            self.state = SSE
            t.write(SSE_HEAD)
            HUB.sse.add(t)
        elif path == b"/connection/websocket":
            key = b""
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"sec-websocket-key":
                    key = v.strip()
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
            self.state = WS_HANDSHAKEN
            t.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
        elif path == b"/poll":
            cursor = query_param(target, b"cursor")
            if cursor is None:
                body = b'{"publications":[],"cursor":"%d","unrecovered":[]}' % HUB.offset
                t.write(http_response(b"200 OK", body))
            elif int(cursor) < HUB.offset:
                t.write(http_response(b"200 OK", HUB.poll_body(int(cursor))))
            else:
                self.state = POLL
                HUB.polls.append(self)
        elif path == b"/health":
            t.write(http_response(b"200 OK", b'{"status":"ok"}'))
        else:
            t.write(http_response(b"404 Not Found", b'{"error":{"code":404}}'))

    def connection_lost(self, exc: Exception | None) -> None:
        t = self.transport
        HUB.sse.discard(t)
        HUB.ws.discard(t)
        if self.state == POLL:
            with contextlib.suppress(ValueError):
                HUB.polls.remove(self)


async def main(port: int) -> None:
    """Serve until killed."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Conn, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if uvloop is not None:
        uvloop.run(main(int(sys.argv[1])))
    else:
        asyncio.run(main(int(sys.argv[1])))
