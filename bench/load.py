"""Load-generator worker: holds thousands of subscriber connections in one process.

The client must never be the bottleneck, so each connection is a raw
``asyncio.Protocol`` on uvloop with a few slots, no task and no coroutine; a
delivery costs one ``bytes.find`` and two ``int()`` calls. Several worker
processes (``multiprocessing``, spawn) share the load; each holds at most
``MAX_SOCKETS_PER_PROCESS`` sockets because a process may hold 20,000 open files
here, and binds its sockets to its own loopback source addresses (127.x.y.z)
with ``IP_BIND_ADDRESS_NO_PORT`` so neither the ephemeral port range nor ports
left in TIME_WAIT by an earlier run limit the count.

Every published message carries ``#S<seq>;T<monotonic_ns>;`` inside its data.
CLOCK_MONOTONIC is system-wide on Linux, so the receive time taken here and the
send time taken by the coordinator (another process) are comparable.

The coordinator (``run.py``) drives a worker over a ``multiprocessing`` pipe
with small commands; see ``Worker.dispatch``. Every command is bounded by a
timeout that travels with it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast

MAX_SOCKETS_PER_PROCESS = 19_000
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
monotonic_ns = time.monotonic_ns


@dataclass(frozen=True)
class Spec:
    """How one (server, transport) pair is subscribed to; built by ``servers.py``.

    ``kind`` is ``"sse"``, ``"ws"`` or ``"poll"``. ``ready`` is the byte string
    that proves the subscription is in place (``None``: the response head for
    SSE/poll, the 101 for WebSocket). ``ws_first`` is the text frame a
    WebSocket client sends right after the handshake (connect + subscribe), in
    a binary frame when ``ws_binary`` (Centrifugo's Protobuf form, whose pings
    are an empty binary message).
    ``poll_style`` is ``"cursor"`` (tidings/floor JSON cursor) or ``"nchan"``
    (If-Modified-Since / If-None-Match).
    """

    kind: str
    host: str
    port: int
    path: str
    ready: bytes | None = None
    ws_first: bytes | None = None
    poll_style: str = "cursor"
    headers: tuple[tuple[str, str], ...] = ()
    ws_binary: bool = False


@dataclass
class Stats:
    """Per-worker delivery bookkeeping, shared by all its connections."""

    counts: dict[int, int] = field(default_factory=dict)
    last_ns: dict[int, int] = field(default_factory=dict)
    latency_us: array = field(default_factory=lambda: array("q"))
    record_latency: bool = False
    ready: int = 0
    lost: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


STATS = Stats()


def scan(buf: bytes, start: int = 0) -> int:
    """Count every complete ``#S<seq>;T<ns>;`` token in ``buf`` from ``start``.

    Returns the index where an incomplete trailing token begins (or ``len(buf)``)
    so a streaming caller can keep just that tail.
    """
    i = buf.find(b"#S", start)
    if i < 0:
        return len(buf) if not buf.endswith(b"#") else len(buf) - 1
    now = monotonic_ns()
    st = STATS
    counts = st.counts
    while i >= 0:
        j = buf.find(b";", i)
        k = buf.find(b";", j + 1) if j >= 0 else -1
        if k < 0:
            return i
        seq = int(buf[i + 2 : j])
        counts[seq] = counts.get(seq, 0) + 1
        st.last_ns[seq] = now
        if st.record_latency:
            st.latency_us.append((now - int(buf[j + 2 : k])) // 1000)
        i = buf.find(b"#S", k)
    return len(buf) if not buf.endswith(b"#") else len(buf) - 1


def mask_frame(payload: bytes, opcode: int = 1) -> bytes:
    """A masked client frame (RFC 6455 requires clients to mask)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    if not n:
        return head + key
    full = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(full, "big")).to_bytes(n, "big")
    return head + key + masked


class Base(asyncio.Protocol):
    """Shared connection plumbing: ready future, loss accounting."""

    __slots__ = ("buf", "is_ready", "ready_fut", "spec", "transport")

    def __init__(self, spec: Spec, ready_fut: asyncio.Future[None]) -> None:
        self.spec = spec
        self.ready_fut = ready_fut
        self.buf = b""
        self.is_ready = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        transport.write(self.request())

    def request(self) -> bytes:
        s = self.spec
        extra = "".join(f"{k}: {v}\r\n" for k, v in s.headers)
        return f"GET {s.path} HTTP/1.1\r\nHost: {s.host}:{s.port}\r\n{extra}\r\n".encode()

    def set_ready(self) -> None:
        if not self.is_ready:
            self.is_ready = True
            STATS.ready += 1
            if not self.ready_fut.done():
                self.ready_fut.set_result(None)

    def fail(self, why: str) -> None:
        STATS.error(why)
        if not self.ready_fut.done():
            self.ready_fut.set_exception(ConnectionError(why))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.is_ready:
            self.is_ready = False
            STATS.ready -= 1
            STATS.lost += 1
        if not self.ready_fut.done():
            self.ready_fut.set_exception(ConnectionError(f"closed before ready: {exc}"))


class SSEClient(Base):
    """Server-Sent Events: check the status, wait for the ready marker, then scan."""

    __slots__ = ()

    def request(self) -> bytes:
        s = self.spec
        extra = "".join(f"{k}: {v}\r\n" for k, v in s.headers)
        return (
            f"GET {s.path} HTTP/1.1\r\nHost: {s.host}:{s.port}\r\n"
            f"Accept: text/event-stream\r\n{extra}\r\n"
        ).encode()

    def data_received(self, data: bytes) -> None:
        if self.is_ready:
            buf = self.buf + data if self.buf else data
            tail = scan(buf)
            self.buf = buf[tail:] if tail < len(buf) else b""
            return
        buf = self.buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self.buf = buf[-65536:]
            return
        if not buf.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
            self.fail("status " + buf[9:12].decode("latin-1", "replace"))
            return
        marker = self.spec.ready
        if marker is not None and buf.find(marker, end) < 0:
            self.buf = buf
            return
        self.buf = b""
        self.set_ready()
        tail = scan(buf, buf.find(marker, end) if marker else end)
        self.buf = buf[tail:] if tail < len(buf) else b""


class WSClient(Base):
    """WebSocket: handshake, send the subscribe frame, parse frames, answer pings.

    Pings come in three dialects and all are answered: the protocol-level ping
    opcode (websockets, uvicorn, Nchan), Centrifugo's ``{}`` text frame
    (tidings; an empty binary message in its Protobuf form) and Engine.IO's
    ``2`` (python-socketio).
    """

    __slots__ = ("upgraded",)

    def __init__(self, spec: Spec, ready_fut: asyncio.Future[None]) -> None:
        super().__init__(spec, ready_fut)
        self.upgraded = False

    def request(self) -> bytes:
        s = self.spec
        key = base64.b64encode(os.urandom(16)).decode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in s.headers)
        return (
            f"GET {s.path} HTTP/1.1\r\nHost: {s.host}:{s.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        ).encode()

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf[-65536:]
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.fail("status " + buf[9:12].decode("latin-1", "replace"))
                return
            self.upgraded = True
            if self.spec.ws_first is not None:
                opcode = 2 if self.spec.ws_binary else 1
                self.transport.write(mask_frame(self.spec.ws_first, opcode))
            if self.spec.ready is None:
                self.set_ready()
            buf = buf[end + 4 :]
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b1 = buf[pos + 1]
            ln = b1 & 0x7F
            hl = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                hl = 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hl = 10
            if n - pos < hl + ln:
                break
            op = buf[pos] & 0x0F
            payload = buf[pos + hl : pos + hl + ln]
            pos += hl + ln
            if op <= 2:
                self.on_text(payload)
            elif op == 9:
                self.transport.write(mask_frame(payload, 10))
            elif op == 8:
                self.transport.write(mask_frame(payload[:2], 8))
                self.transport.close()
                return
        self.buf = buf[pos:] if pos < n else b""

    def on_text(self, payload: bytes) -> None:
        if payload == b"{}":  # Centrifugo ping
            self.transport.write(mask_frame(b"{}"))
            return
        if payload == b"\x00" and self.spec.ws_binary:  # Centrifugo ping, Protobuf form
            self.transport.write(mask_frame(b"\x00", 2))
            return
        if payload == b"2":  # Engine.IO ping
            self.transport.write(mask_frame(b"3"))
            return
        if not self.is_ready:
            marker = self.spec.ready
            if marker is not None and marker in payload:
                self.set_ready()
            return
        scan(payload)


class PollClient(Base):
    """Long-poll: one request at a time on a keep-alive connection, re-armed at once.

    Ready once the first request is held (cursor style: after the immediate
    answer without cursor has been received and the second request sent; Nchan:
    once the first request is sent, since Nchan holds it from the start).
    """

    __slots__ = ("cursor", "etag", "modified")

    def __init__(self, spec: Spec, ready_fut: asyncio.Future[None]) -> None:
        super().__init__(spec, ready_fut)
        self.cursor = ""
        self.etag = ""
        self.modified = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.spec.poll_style == "nchan":
            self.set_ready()

    def request(self) -> bytes:
        s = self.spec
        path = s.path
        hdr = ""
        if s.poll_style == "cursor":
            if self.cursor:
                path += "&cursor=" + self.cursor
        elif self.etag:
            hdr = f"If-Modified-Since: {self.modified}\r\nIf-None-Match: {self.etag}\r\n"
        return f"GET {path} HTTP/1.1\r\nHost: {s.host}:{s.port}\r\n{hdr}\r\n".encode()

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end]
            clen = -1
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                k = k.strip().lower()
                if k == b"content-length":
                    clen = int(v)
                elif k == b"etag":
                    self.etag = v.strip().decode()
                elif k == b"last-modified":
                    self.modified = v.strip().decode()
            if clen < 0:
                self.fail("poll response without Content-Length")
                return
            if len(buf) < end + 4 + clen:
                break
            body = buf[end + 4 : end + 4 + clen]
            buf = buf[end + 4 + clen :]
            status = head[9:12]
            if status not in (b"200", b"304", b"408"):
                self.fail("status " + status.decode("latin-1", "replace"))
                return
            if self.spec.poll_style == "cursor":
                c = body.find(b'"cursor":"')
                if c >= 0:
                    self.cursor = body[c + 10 : body.find(b'"', c + 10)].decode()
            if self.is_ready:
                scan(body)
            self.transport.write(self.request())
            if not self.is_ready:
                self.set_ready()
        self.buf = buf


PROTOCOLS: dict[str, type[Base]] = {"sse": SSEClient, "ws": WSClient, "poll": PollClient}


class Worker:
    """One load-generator process: its connections and its command loop."""

    def __init__(self, conn: Connection, index: int) -> None:
        self.conn = conn
        self.index = index
        self.transports: list[asyncio.Transport] = []
        self.protocols: list[Base] = []
        self.done = asyncio.Event()
        self.tasks: set[asyncio.Future[None]] = set()  # keeps command tasks alive

    async def connect(
        self, spec: Spec, n: int, ips: list[str], concurrency: int, timeout: float
    ) -> dict[str, Any]:
        """Open ``n`` subscribers, at most ``concurrency`` handshakes in flight."""
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(concurrency)
        ok = 0
        failures: dict[str, int] = {}

        async def one(i: int) -> None:
            nonlocal ok
            async with sem:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.setblocking(False)
                    sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                    sock.bind((ips[i % len(ips)], 0))
                    await loop.sock_connect(sock, (spec.host, spec.port))
                except OSError as e:
                    sock.close()
                    key = type(e).__name__ + ":" + str(e.errno)
                    failures[key] = failures.get(key, 0) + 1
                    return
                fut: asyncio.Future[None] = loop.create_future()
                proto = PROTOCOLS[spec.kind](spec, fut)
                try:
                    tr, _ = await loop.create_connection(lambda: proto, sock=sock)
                    self.transports.append(cast(asyncio.Transport, tr))
                    self.protocols.append(proto)
                    await fut
                    ok += 1
                except Exception as e:  # counted and reported, one bad socket is no reason to stop
                    key = f"{type(e).__name__}: {e}"[:80]
                    failures[key] = failures.get(key, 0) + 1

        t0 = monotonic_ns()
        tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        if pending:
            failures["timeout"] = len(pending)
        t1 = monotonic_ns()
        return {"ok": ok, "failures": failures, "t0": t0, "t1": t1, "ready": STATS.ready}

    async def wait(self, seqs: list[int], timeout: float) -> dict[str, Any]:
        """Until every seq reached every live subscriber (or the timeout)."""
        deadline = time.monotonic() + timeout
        st = STATS
        while time.monotonic() < deadline:
            target = st.ready
            if all(st.counts.get(s, 0) >= target for s in seqs):
                break
            await asyncio.sleep(0.002)
        return self.snapshot(seqs)

    def snapshot(self, seqs: list[int]) -> dict[str, Any]:
        st = STATS
        return {
            "counts": {s: st.counts.get(s, 0) for s in seqs},
            "last_ns": {s: st.last_ns.get(s, 0) for s in seqs},
            "ready": st.ready,
            "lost": st.lost,
            "errors": dict(st.errors),
        }

    async def dispatch(self, cmd: str, args: dict[str, Any]) -> Any:
        """Run one command from the coordinator and return its JSON-able answer."""
        if cmd == "connect":
            spec = Spec(**args["spec"])
            return await self.connect(
                spec, args["n"], args["ips"], args["concurrency"], args["timeout"]
            )
        if cmd == "reset":
            STATS.counts.clear()
            STATS.last_ns.clear()
            STATS.latency_us = array("q")
            STATS.record_latency = bool(args.get("record_latency"))
            return {"ready": STATS.ready}
        if cmd == "wait":
            return await self.wait(args["seqs"], args["timeout"])
        if cmd == "latency":
            STATS.record_latency = False
            return {"latency_us": STATS.latency_us.tobytes(), **self.snapshot(args["seqs"])}
        if cmd == "close":
            for t in self.transports:
                t.abort()
            self.transports.clear()
            self.protocols.clear()
            await asyncio.sleep(0.05)  # let connection_lost run before zeroing
            STATS.ready = STATS.lost = 0
            STATS.errors.clear()
            return {"closed": True}
        if cmd == "exit":
            self.done.set()
            return {"exit": True}
        if cmd == "status":
            return {"ready": STATS.ready, "lost": STATS.lost}
        raise ValueError(f"unknown command {cmd!r}")

    def on_readable(self) -> None:
        try:
            cmd, args = self.conn.recv()
        except (EOFError, OSError):
            self.done.set()  # coordinator is gone: close everything and exit
            return

        async def run() -> None:
            try:
                answer = await self.dispatch(cmd, args)
            except Exception as e:  # reported to the coordinator, not swallowed
                answer = {"error": f"{type(e).__name__}: {e}"}
            # uvloop's add_reader made the pipe non-blocking; an answer larger
            # than the pipe buffer (latency samples) must not be cut short.
            os.set_blocking(self.conn.fileno(), True)
            with contextlib.suppress(OSError):
                self.conn.send(answer)

        task = asyncio.ensure_future(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.conn.fileno(), self.on_readable)
        await self.done.wait()
        loop.remove_reader(self.conn.fileno())
        for t in self.transports:
            t.abort()
        await asyncio.sleep(0.05)


def worker_main(conn: Connection, index: int) -> None:
    """Entry point of a worker process (multiprocessing target)."""
    run: Callable[[Any], Any]
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a tidings dependency
        run = asyncio.run

    async def go() -> None:
        await Worker(conn, index).main()

    run(go())
