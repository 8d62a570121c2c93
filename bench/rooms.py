"""The chat-rooms scenario (issue 16, item 5): many small channels, a rising publish rate.

    .venv/bin/python bench/run.py --rooms                       # 1,000 rooms x 10, every transport
    .venv/bin/python bench/run.py --rooms --quick               # 10 rooms x 5, two short steps
    .venv/bin/python bench/run.py --rooms --servers tidings --transports sse --methods batch

Broadcast to one channel is the fan-out scenario; a chat server mostly does
the opposite: many channels with a few subscribers each, and publications to
random rooms at a rate that matters more than the size of one fan-out. Per
(server, transport) a fresh server is started and ``rooms x per_room``
subscribers join room ``room<i>`` (subscriber ``k`` in room ``k % rooms``).
Then, per publish method, a step schedule: ``rate`` publications/s to rooms
drawn at random (seeded), open loop, for ``step_seconds``; the rate
is multiplied by ``factor`` after each good step, and the schedule stops at the
first step that is not good. A step is good when every publication reached
every subscriber of its room and no one else (counted per seq by the load
workers), the publisher kept the schedule (nothing skipped for lack of a free
connection, the last message sent within 5 % of the step's duration), no
publish failed, and the p99 of publish -> deliver latency, over every delivery
of the step, is at most ``SLO_MS``. The *sustainable rate* is the last good
step's rate.

Latency runs from the send time the publisher stamps in each message
(``CLOCK_MONOTONIC`` ns, system-wide) to the subscriber's receipt, as in the
broadcast scenarios (``load.scan``).

Publish methods:

* ``publish``: one HTTP POST per message on a pool of keep-alive connections
  (tidings' ``/api/publish``; Nchan's ``/pub/<room>``, the data as body);
* ``batch``: tidings' ``POST /api/batch``, one request every ``BATCH_TICK_S``
  carrying the publications due since the previous one, each stamped when the
  batch is written (the wait for the tick is the application's, not counted);
* ``inproc``: ``Tidings.publish`` called inside the server process. The server
  is ``tidings serve --app rooms:rt`` with :class:`RoomsApp`, a ``Tidings``
  that also listens on PORT+1 for a schedule (one JSON line) and runs it in
  the server's own event loop; the only thing timed is the in-process call
  and what follows it. The same server (same process, same subscribers) also
  serves the two HTTP methods, so the three are compared on one set of
  connections.

The HTTP publisher runs in the coordinator process (``bench/run.py``), one
Python event loop; its CPU share is reported per step (``client_cpu``) so a
ceiling set by the client rather than the server shows in the results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import shutil
import sys
import tempfile
import time
from array import array
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import load
import measure
import report
import run
from servers import HERE, HOST, SERVERS, ServerDef, _tidings_cmd
from tidings import Tidings
from tidings.config import Config
from tidings.errors import TidingsError

SLO_MS = 50.0  # a step whose p99 publish -> deliver latency is above this is not good
BATCH_TICK_S = 0.01  # how often the batch method sends what is due
HTTP_CONNECTIONS = 256  # the HTTP publisher's keep-alive pool: covers a 0.6 s stall at 400/s
METHODS = ("publish", "batch", "inproc")
CONTROL_LINE_LIMIT = 1 << 24  # a schedule is one JSON line: ~5 bytes per publication
ROOM_SERVERS = ("tidings", "nchan")  # the servers that publish to any channel by name


@dataclass
class RoomsMode:
    """Sizes and schedule of one rooms run."""

    rooms: int
    per_room: int
    first_rate: float  # publications/s of the first step
    factor: float  # rate multiplier between steps
    max_rate: float  # no step above this
    step_seconds: float
    drain_timeout: float  # how long deliveries of a step may still arrive after its end
    concurrency: int  # handshakes in flight per load process


FULL = RoomsMode(
    rooms=1000,
    per_room=10,
    first_rate=100,
    factor=2,
    max_rate=102_400,
    step_seconds=3.0,
    drain_timeout=10.0,
    concurrency=200,
)
QUICK = RoomsMode(
    rooms=10,
    per_room=5,
    first_rate=20,
    factor=2,
    max_rate=40,
    step_seconds=0.5,
    drain_timeout=5.0,
    concurrency=50,
)


def room_name(room: int) -> str:
    return f"room{room}"


def room_spec(base: load.Spec, room: int) -> load.Spec:
    """``base`` (a subscription to channel ``bench``) made a subscription to ``room``."""
    name = room_name(room)
    first = base.ws_first.replace(b'"bench"', f'"{name}"'.encode()) if base.ws_first else None
    return dataclasses.replace(base, path=base.path.replace("bench", name), ws_first=first)


ROOM_RADIX = 100_000  # a message's seq is n * ROOM_RADIX + room: every receiver can check it


def seq_of(n: int, room: int) -> int:
    """The seq of the ``n``-th publication of a run, to ``room``."""
    return n * ROOM_RADIX + room


def room_key(spec: load.Spec) -> tuple[str, bytes | None]:
    """What tells one room's subscription from another's: the path (SSE, long-poll,
    Nchan) or the subscribe frame (tidings' WebSocket, one path for all)."""
    return spec.path, spec.ws_first


# --------------------------------------------------------------------------- load worker

#: Per load process: the room of each subscription (filled by ``connect_rooms``
#: before connecting), and the room of the connection whose bytes are being scanned.
ROOM_OF_SPEC: dict[tuple[str, bytes | None], int] = {}
RECEIVING_ROOM = [-1]
WRONG_ROOM = "delivered to the wrong room"
_count_seqs = load.scan


def scan_in_room(buf: bytes, start: int = 0) -> int:
    """``load.scan``, and each token's room checked against the receiving connection's.

    Replaces ``load.scan`` in a rooms load process (``worker_main``); a
    delivery to a subscriber of another room is counted in ``STATS.errors``.
    """
    end = _count_seqs(buf, start)
    room = RECEIVING_ROOM[0]
    i = buf.find(b"#S", start)
    while 0 <= i < end:
        j = buf.find(b";", i)
        if int(buf[i + 2 : j]) % ROOM_RADIX != room:
            load.STATS.error(WRONG_ROOM)
        i = buf.find(b"#S", j)
    return end


def in_room(cls: type[load.Base]) -> type[load.Base]:
    """``cls`` with its room: set once connected, published while it reads."""

    class InRoom(cls):  # type: ignore[valid-type,misc]
        __slots__ = ("room",)

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.room = ROOM_OF_SPEC[room_key(self.spec)]
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            RECEIVING_ROOM[0] = self.room
            super().data_received(data)

    InRoom.__name__ = f"InRoom{cls.__name__}"
    return InRoom


class RoomsWorker(load.Worker):
    """A load process that knows each connection's room, to count deliveries per room."""

    async def dispatch(self, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "connect_rooms":
            return await self.connect_rooms(
                load.Spec(**args["spec"]),
                args["groups"],
                args["ips"],
                args["concurrency"],
                args["timeout"],
            )
        if cmd == "wait_rooms":
            return await self.wait_rooms(args["seqs"], args["timeout"])
        if cmd == "reset":  # a step's wrong-room count is the step's own
            load.STATS.errors.pop(WRONG_ROOM, None)
        return await super().dispatch(cmd, args)

    async def connect_rooms(
        self,
        base: load.Spec,
        groups: list[tuple[int, int]],
        ips: list[str],
        concurrency: int,
        timeout: float,
    ) -> dict[str, Any]:
        """``count`` subscribers to each ``(room, count)``, about ``concurrency`` at a time."""
        t0 = load.monotonic_ns()
        deadline = time.monotonic() + timeout
        ok = 0
        failures: Counter[str] = Counter()
        i = 0
        while i < len(groups):
            wave: list[tuple[int, int]] = []
            in_flight = 0
            while i < len(groups) and (not wave or in_flight + groups[i][1] <= concurrency):
                wave.append(groups[i])
                in_flight += groups[i][1]
                i += 1
            left = max(1.0, deadline - time.monotonic())
            calls = []
            for room, count in wave:
                spec = room_spec(base, room)
                ROOM_OF_SPEC[room_key(spec)] = room
                calls.append(self.connect(spec, count, ips, count, left))
            for answer in await asyncio.gather(*calls):
                ok += answer["ok"]
                failures.update(answer["failures"])
        return {
            "ok": ok,
            "failures": dict(failures),
            "t0": t0,
            "t1": load.monotonic_ns(),
            "ready": load.STATS.ready,
        }

    def ready_by_room(self) -> Counter[int]:
        return Counter(p.room for p in self.protocols if p.is_ready)  # type: ignore[attr-defined]

    async def wait_rooms(self, seqs: list[int], timeout: float) -> dict[str, Any]:
        """Until each seq reached every live subscriber here of its room.

        ``extra``: deliveries beyond that (a duplicate) plus deliveries to a
        subscriber of another room.
        """
        deadline = time.monotonic() + timeout
        counts = load.STATS.counts
        pending = seqs
        ready = self.ready_by_room()
        while pending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            ready = self.ready_by_room()
            pending = [s for s in pending if counts.get(s, 0) < ready[s % ROOM_RADIX]]
        expected = delivered = 0
        extra = load.STATS.errors.get(WRONG_ROOM, 0)
        for seq in seqs:
            want, got = ready[seq % ROOM_RADIX], counts.get(seq, 0)
            expected += want
            delivered += min(want, got)
            extra += max(0, got - want)
        return {
            "expected": expected,
            "delivered": delivered,
            "extra": extra,
            "ready": load.STATS.ready,
            "lost": load.STATS.lost,
            "errors": dict(load.STATS.errors),
        }


def worker_main(conn: Any, index: int) -> None:
    """Entry point of a rooms load process (multiprocessing target): ``load``'s
    worker with room-aware connections and the room check in every scan."""
    import uvloop

    load.scan = scan_in_room
    for kind, cls in list(load.PROTOCOLS.items()):
        load.PROTOCOLS[kind] = in_room(cls)

    async def go() -> None:
        await RoomsWorker(conn, index).main()

    uvloop.run(go())


# --------------------------------------------------------------------------- in-process publisher


class RoomsApp(Tidings):
    """``tidings serve --app rooms:rt``: tidings, plus a schedule runner on PORT+1.

    The runner is a coroutine in the server's event loop that calls
    :meth:`Tidings.publish`: the in-process API is what is measured, with
    nothing between the schedule and the call.
    """

    async def run(
        self, config: Config | None = None, *, reuse_port: bool = False, uds: str | None = None
    ) -> None:
        config = config if config is not None else self.config
        control = await asyncio.start_server(
            self._control, config.host, config.port + 1, limit=CONTROL_LINE_LIMIT
        )
        try:
            await super().run(config, reuse_port=reuse_port, uds=uds)
        finally:
            control.close()

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One JSON schedule per line in, one JSON answer per line out."""
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                order = json.loads(line)
                answer = await self.run_schedule(order["first"], order["rate"], order["rooms"])
                writer.write(json.dumps(answer).encode() + b"\n")
        writer.close()

    async def run_schedule(self, first: int, rate: float, rooms: list[int]) -> dict[str, Any]:
        """Publish the ``first + i``-th message to ``rooms[i]`` at ``t0 + i / rate``, open loop.

        Each call is awaited before the next, as an application's handler
        would. Each message is stamped with the time it was *due*, not the
        time of the call: the publisher shares the server's event loop, so a
        loop busy elsewhere (a heartbeat sweep over every SSE stream) delays
        the call itself, and that wait is the server's, as an HTTP request
        waiting in its socket is. A publisher that falls behind catches up
        without sleeping; ``elapsed`` tells whether it kept the rate.
        """
        publish = self.publish
        failed: list[int] = []
        errors: Counter[str] = Counter()
        t0 = time.monotonic()
        t0_ns = time.monotonic_ns()
        for i, room in enumerate(rooms):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                data = run.message(seq_of(first + i, room), t0_ns + int(i * 1e9 / rate))
                await publish(room_name(room), data)
            except TidingsError as exc:
                failed.append(i)
                errors[type(exc).__name__] += 1
        return {"elapsed": time.monotonic() - t0, "failed": failed, "errors": dict(errors)}


rt = RoomsApp()


def _rooms_tidings_cmd(port: int, wd: Path) -> list[str]:
    """``tidings serve`` as the bench starts it, with ``--app rooms:rt`` (this module)."""
    cmd = _tidings_cmd(port, wd)
    at = cmd.index("serve") + 1
    return [*cmd[:at], "--app", "rooms:rt", "--app-dir", str(HERE), *cmd[at:]]


def rooms_servers() -> dict[str, tuple[ServerDef, tuple[str, ...]]]:
    """Each server of this scenario and its publish methods."""
    tidings = dataclasses.replace(
        SERVERS["tidings"],
        command=_rooms_tidings_cmd,
        publish_port_offset=1,
        note="tidings serve --app rooms:rt (in-process schedule runner on PORT+1)",
    )
    defs = {"tidings": (tidings, METHODS), "nchan": (SERVERS["nchan"], ("publish",))}
    baseline = SERVERS.get("tidings-baseline")
    if baseline is not None:  # TIDINGS_BENCH_BASELINE: the same scenario on another tree
        defs[baseline.name] = (
            dataclasses.replace(
                tidings,
                name=baseline.name,
                # ["env", "PYTHONPATH=<tree>/src"] before the rooms command
                command=lambda port, wd: [
                    *baseline.command(port, wd)[:2],
                    *_rooms_tidings_cmd(port, wd),
                ],
                note=f"{tidings.note}, {baseline.note}",
            ),
            METHODS,
        )
    return defs


# --------------------------------------------------------------------------- HTTP publisher


class _HTTPConn(asyncio.Protocol):
    """One keep-alive connection of :class:`HTTPPublisher`: one request in flight."""

    __slots__ = ("buf", "pending", "pool", "retry", "transport")

    def __init__(self, pool: HTTPPublisher) -> None:
        self.pool = pool
        self.buf = b""
        self.pending = b""  # the request in flight, to send again if the server closed first
        self.retry = False  # whether ``pending`` is already a second attempt

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self.buf = buf
            return
        head = buf[:end].lower()
        length = 0
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop >= 0 else end])
        if len(buf) < end + 4 + length:
            self.buf = buf
            return
        self.buf = buf[end + 4 + length :]
        self.pending = b""
        self.pool.answered(self, int(buf[9:12]), buf[end + 4 : end + 4 + length])

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.lost(self)


class HTTPPublisher:
    """A pool of keep-alive connections, each with at most one request in flight.

    Hand-written on ``asyncio.Protocol`` rather than httpx because the
    client must not be the ceiling it measures: httpx's ``AsyncClient`` spends
    several hundred µs of CPU per POST, the publisher's whole budget at a few
    thousand publications/s on these two shared cores. A send that finds no
    idle connection is counted as ``skipped``: the server is not answering as
    fast as the schedule asks, and the step fails.

    Connections are used in turn (oldest idle first) so that none sits idle
    for the server's keep-alive timeout (tidings: 5 s) while a step runs; one
    the server closes anyway is replaced, and a request it closed without
    answering (the keep-alive race every HTTP client meets) is sent once more
    on another connection, still stamped with its first send time.
    """

    def __init__(self, host: str, port: int, connections: int = HTTP_CONNECTIONS) -> None:
        self.host, self.port, self.size = host, port, connections
        self.idle: deque[_HTTPConn] = deque()
        self.busy: set[_HTTPConn] = set()
        self.opening = 0
        self.closed = False
        self.head = f"HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        self.skipped = 0
        self.errors: Counter[str] = Counter()
        self.drained = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        self.opening += 1
        try:
            _, conn = await loop.create_connection(lambda: _HTTPConn(self), self.host, self.port)
        except OSError as exc:
            self.errors[f"connect: {type(exc).__name__}"] += 1
            return
        finally:
            self.opening -= 1
        if self.closed:
            conn.transport.abort()
        else:
            self.idle.append(conn)

    async def fill(self) -> None:
        """Open connections up to the pool size (the server may have closed idle ones)."""
        while len(self.idle) + len(self.busy) + self.opening < self.size:
            await self._open()

    def send(self, path: str, body: bytes) -> bool:
        request = f"POST {path} {self.head}Content-Length: {len(body)}\r\n\r\n".encode() + body
        return self._write(request, retry=False)

    def _write(self, request: bytes, retry: bool) -> bool:
        if not self.idle:
            self.skipped += 1
            return False
        conn = self.idle.popleft()
        self.busy.add(conn)
        self.drained.clear()
        conn.pending, conn.retry = request, retry
        conn.transport.write(request)
        return True

    def answered(self, conn: _HTTPConn, status: int, body: bytes) -> None:
        if status >= 300:
            self.errors[f"status {status}"] += 1
        elif b'"error"' in body:  # tidings: an error reply, or one in a batch's replies
            self.errors["error reply"] += body.count(b'"error"')
        self.busy.discard(conn)
        self.idle.append(conn)
        if not self.busy:
            self.drained.set()

    def lost(self, conn: _HTTPConn) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        if conn in self.busy:
            self.busy.discard(conn)
            if conn.pending and not conn.retry and not self.closed:
                self._write(conn.pending, retry=True)
            elif conn.pending:
                self.errors["connection lost"] += 1
            if not self.busy:
                self.drained.set()
        if not self.closed:  # keep the pool at its size
            task = asyncio.ensure_future(self._open())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def drain(self, timeout: float) -> None:
        if self.busy:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drained.wait(), timeout)
        for conn in list(self.busy):  # never answered: counted, and not reused
            self.errors["no answer"] += 1
            conn.pending = b""
            conn.transport.abort()

    def close(self) -> None:
        self.closed = True
        for task in self.tasks:
            task.cancel()
        for conn in [*self.idle, *self.busy]:
            conn.transport.abort()


def _tidings_publish(room: int, data: dict[str, Any]) -> bytes:
    return json.dumps({"channel": room_name(room), "data": data}, separators=(",", ":")).encode()


async def send_http(
    publisher: HTTPPublisher,
    server: str,
    batch: bool,
    first: int,
    rate: float,
    rooms: list[int],
) -> tuple[list[int], float]:
    """The open-loop schedule over HTTP; returns (indices sent, seconds to the last send).

    Per message: each POST is written when due. Batch: every ``BATCH_TICK_S``,
    one POST with everything due since the last one.
    """
    sent: list[int] = []
    t0 = time.monotonic()
    last = 0.0
    done = 0
    total = len(rooms)
    while done < total:
        now = time.monotonic()
        due = min(total, int((now - t0) * rate) + 1)
        if due > done:
            if batch:
                stamp = time.monotonic_ns()
                commands = [
                    {
                        "publish": {
                            "channel": room_name(rooms[i]),
                            "data": run.message(seq_of(first + i, rooms[i]), stamp),
                        }
                    }
                    for i in range(done, due)
                ]
                body = json.dumps({"commands": commands}, separators=(",", ":")).encode()
                if publisher.send("/api/batch", body):
                    sent.extend(range(done, due))
                else:  # a whole batch not sent: each of its messages is skipped
                    publisher.skipped += due - done - 1
            else:
                for i in range(done, due):
                    data = run.message(seq_of(first + i, rooms[i]), time.monotonic_ns())
                    if server == "nchan":
                        ok = publisher.send(
                            f"/pub/{room_name(rooms[i])}",
                            json.dumps(data, separators=(",", ":")).encode(),
                        )
                    else:
                        ok = publisher.send("/api/publish", _tidings_publish(rooms[i], data))
                    if ok:
                        sent.append(i)
            last = time.monotonic() - t0
            done = due
        if done < total:
            wait = t0 + done / rate - time.monotonic()
            await asyncio.sleep(max(wait, BATCH_TICK_S if batch else 0.0))
    return sent, last


async def send_inproc(port: int, first: int, rate: float, rooms: list[int]) -> dict[str, Any]:
    """Hand the schedule to :class:`RoomsApp` in the server; its answer when it is done."""
    reader, writer = await asyncio.open_connection(HOST, port, limit=CONTROL_LINE_LIMIT)
    try:
        order = {"first": first, "rate": rate, "rooms": rooms}
        writer.write(json.dumps(order).encode() + b"\n")
        line = await asyncio.wait_for(reader.readline(), 60 + len(rooms) / rate * 3)
    finally:
        writer.close()
    if not line:
        raise RuntimeError("the in-process publisher closed its control connection")
    answer: dict[str, Any] = json.loads(line)
    return answer


# --------------------------------------------------------------------------- one combo


async def connect_rooms(
    server: run.ServerProc,
    pool: run.Pool,
    spec: load.Spec,
    mode: RoomsMode,
    combo: int,
) -> dict[str, Any]:
    """Every room's subscribers, spread over the load processes; counted once subscribed."""
    nw = len(pool.workers)
    per: list[list[tuple[int, int]]] = [[] for _ in range(nw)]
    for room in range(mode.rooms):  # subscriber k of the room goes to process (room + k) % nw
        counts = Counter((room + k) % nw for k in range(mode.per_room))
        for w, c in counts.items():
            per[w].append((room, c))
    n = mode.rooms * mode.per_room
    timeout = 30 + n / 300
    answers = await pool.all(
        "connect_rooms",
        timeout + 10,
        per=[{"groups": per[i], "ips": run.source_ips(combo, i)} for i in range(nw)],
        spec=spec.__dict__,
        concurrency=mode.concurrency,
        timeout=timeout,
    )
    ok = sum(a["ok"] for a in answers)
    span = (max(a["t1"] for a in answers) - min(a["t0"] for a in answers)) / 1e9
    failures: Counter[str] = Counter()
    for a in answers:
        failures.update(a["failures"])
    if ok == 0:
        raise RuntimeError(f"no subscriber connected: {dict(failures)} {server.log_tail(300)}")
    return {"ok": ok, "failures": dict(failures), "seconds": round(span, 3)}


async def run_step(
    server: run.ServerProc,
    pool: run.Pool,
    publisher: HTTPPublisher,
    name: str,
    method: str,
    rate: float,
    first: int,
    mode: RoomsMode,
    rng: random.Random,
) -> dict[str, Any]:
    """One step of the schedule at ``rate``; the figures and whether it was good."""
    total = max(1, round(rate * mode.step_seconds))
    rooms = [rng.randrange(mode.rooms) for _ in range(total)]
    await pool.all("reset", 10, record_latency=True)
    cpu0, client0, skipped0 = server.cpu(), time.process_time(), publisher.skipped
    errors0 = Counter(publisher.errors)
    wall0 = time.monotonic()
    if method == "inproc":
        answer = await send_inproc(server.port + 1, first, rate, rooms)
        failed = set(answer["failed"])
        sent = [i for i in range(total) if i not in failed]  # a failed call counts as an error
        last, errors = answer["elapsed"], Counter(answer["errors"])
    else:
        await publisher.fill()
        sent, last = await send_http(publisher, name, method == "batch", first, rate, rooms)
        await publisher.drain(mode.drain_timeout)
        errors = Counter(publisher.errors)
        errors.subtract(errors0)
    send_wall = time.monotonic() - wall0
    wait_s = mode.drain_timeout
    seqs = [seq_of(first + i, rooms[i]) for i in sent]
    answers = await pool.all("wait_rooms", wait_s + 10, seqs=seqs, timeout=wait_s)
    cpu1, client1 = server.cpu(), time.process_time()
    samples = array("q")
    for a in await pool.all("latency", 30, seqs=[]):
        samples.frombytes(a["latency_us"])
    values = sorted(samples)
    delivered = sum(a["delivered"] for a in answers)
    expected = sum(a["expected"] for a in answers)
    extra = sum(a["extra"] for a in answers)
    skipped = publisher.skipped - skipped0 if method != "inproc" else 0
    p99 = measure.percentile(values, 99) / 1e3
    kept = last <= mode.step_seconds * 1.05 + 1 / rate
    why = []
    if not values:
        why.append("nothing delivered")
    elif p99 > SLO_MS:
        why.append(f"p99 {p99:.1f} ms > {SLO_MS:.0f} ms")
    if delivered < expected:
        why.append(f"{expected - delivered} of {expected} deliveries missing")
    if extra:
        why.append(f"{extra} deliveries to the wrong room or twice")
    if skipped:
        why.append(f"{skipped} not sent: no free connection")
    if not kept:
        why.append(f"schedule not kept: last sent at {last:.2f} s of {mode.step_seconds} s")
    if +errors:
        why.append(f"publish errors {dict(+errors)}")
    if not server.alive():
        why.append("server died")
    return {
        "rate": rate,
        "scheduled": total,
        "published": len(sent),
        "skipped": skipped,
        "errors": dict(+errors),
        "last_send_s": round(last, 3),
        "expected": expected,
        "delivered": delivered,
        "extra": extra,
        "p50_ms": round(measure.percentile(values, 50) / 1e3, 3),
        "p99_ms": round(p99, 3),
        "max_ms": round(values[-1] / 1e3, 3) if values else None,
        "server_cpu": round((cpu1 - cpu0) / send_wall, 3) if send_wall > 0 else None,
        "client_cpu": round((client1 - client0) / send_wall, 3) if send_wall > 0 else None,
        "ok": not why,
        "why": "; ".join(why),
    }


async def run_method(
    server: run.ServerProc,
    pool: run.Pool,
    publisher: HTTPPublisher,
    name: str,
    method: str,
    mode: RoomsMode,
    seed: int,
) -> dict[str, Any]:
    """The whole step schedule of one method: rising rates until the first bad step."""
    rng = random.Random(seed)
    # Warm-up: first-use costs (imports, allocations, connection set-up) out of step 1.
    await run_step(server, pool, publisher, name, method, mode.first_rate, 1, mode, rng)
    steps: list[dict[str, Any]] = []
    rate, first = mode.first_rate, 1_000_000
    while rate <= mode.max_rate:
        step = await run_step(server, pool, publisher, name, method, rate, first, mode, rng)
        steps.append(step)
        print(
            f"    {method:8} {rate:>9,.0f}/s p99 {step['p99_ms']:8.1f} ms "
            f"delivered {step['delivered']:,}/{step['expected']:,} "
            f"server cpu {step['server_cpu']} client cpu {step['client_cpu']} {step['why']}",
            flush=True,
        )
        if not step["ok"]:
            break
        first += step["scheduled"]
        rate *= mode.factor
    good = [s for s in steps if s["ok"]]
    return {
        "steps": steps,
        "sustained_per_s": good[-1]["rate"] if good else None,
        "p99_ms_at_sustained": good[-1]["p99_ms"] if good else None,
        "limit": steps[-1]["why"] if steps and not steps[-1]["ok"] else "max_rate reached",
    }


async def run_combo(
    sdef: ServerDef,
    methods: tuple[str, ...],
    transport: str,
    mode: RoomsMode,
    pool: run.Pool,
    combo: int,
    root: Path,
) -> dict[str, Any]:
    """Start one server, subscribe every room, run each method's schedule, stop."""
    n = mode.rooms * mode.per_room
    result: dict[str, Any] = {"server": sdef.name, "transport": transport, "n": n, "ok": False}
    workdir = Path(tempfile.mkdtemp(prefix=f"rooms-{sdef.name}-{transport}-", dir=root))
    port = run.free_port(1 + sdef.publish_port_offset)
    server: run.ServerProc | None = None
    publisher: HTTPPublisher | None = None
    try:
        server = run.ServerProc(sdef, port, workdir)
        await server.wait_ready()
        spec = sdef.specs(port)[transport]
        result["connect"] = await connect_rooms(server, pool, spec, mode, combo)
        result["subscribed"] = sum(a["ready"] for a in await pool.all("status", 10))
        publisher = HTTPPublisher(HOST, port)
        result["methods"] = {}
        for method in methods:
            result["methods"][method] = await run_method(
                server, pool, publisher, sdef.name, method, mode, seed=combo
            )
        result["ok"] = server.alive() and result["subscribed"] == n
        if not result["ok"]:
            result["error"] = f"subscribed {result['subscribed']} of {n}; alive {server.alive()}"
    except Exception as e:  # one broken server must not stop the others
        result["error"] = f"{type(e).__name__}: {e}"
        if server is not None:
            result["server_log"] = server.log_tail(400)
    finally:
        if publisher is not None:
            publisher.close()
        if server is not None:
            server.stop()
        if not run.WATCHDOG.fired:
            with contextlib.suppress(Exception):
                await pool.all("close", 20)
        await asyncio.sleep(1.0)
    return result


def combo_budget(mode: RoomsMode, methods: int) -> float:
    """Generous upper bound of one (server, transport) run, in seconds."""
    steps = 1
    rate = mode.first_rate
    while rate <= mode.max_rate:
        steps += 1
        rate *= mode.factor
    per_step = mode.step_seconds * 1.5 + mode.drain_timeout + 15
    return 60 + mode.rooms * mode.per_room / 300 + methods * steps * per_step


def table(results: list[dict[str, Any]]) -> str:
    """Sustainable publish rate per transport (rows) and server + method (columns)."""
    columns = [(r["server"], m) for r in results for m in r.get("methods", {})]
    columns = list(dict.fromkeys(columns))
    head = "| transport | " + " | ".join(f"{s} {m}" for s, m in columns) + " |"
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    for transport in dict.fromkeys(r["transport"] for r in results):
        cells = []
        for s, m in columns:
            r = next((r for r in results if r["server"] == s and r["transport"] == transport), {})
            got = r.get("methods", {}).get(m)
            if not got:
                cells.append(r.get("error", "-")[:40] if r else "-")
            elif got["sustained_per_s"] is None:
                cells.append("none")
            else:
                cells.append(
                    f"{got['sustained_per_s']:,.0f}/s (p99 {got['p99_ms_at_sustained']:.1f} ms)"
                )
        lines.append(f"| {transport} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


async def run_all(args: argparse.Namespace, mode: RoomsMode, root: Path) -> list[dict[str, Any]]:
    defs = rooms_servers()
    given = args.servers if args.servers != ",".join(SERVERS) else ",".join(ROOM_SERVERS)
    names = [s.strip() for s in given.split(",") if s.strip()]
    unknown = set(names) - set(defs)
    if unknown:
        raise SystemExit(f"the rooms scenario runs {', '.join(ROOM_SERVERS)}; not {unknown}")
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    wanted = {m.strip() for m in args.methods.split(",") if m.strip()}
    if wanted - set(METHODS):
        raise SystemExit(f"unknown method: {', '.join(sorted(wanted - set(METHODS)))}")
    n = mode.rooms * mode.per_room
    nw = max(2, -(-n // load.MAX_SOCKETS_PER_PROCESS))
    pool = run.Pool(nw, target=worker_main)
    results: list[dict[str, Any]] = []
    combo = int(time.time()) % 97
    try:
        for name in names:
            sdef, methods = defs[name]
            methods = tuple(m for m in methods if m in wanted)
            why = sdef.unavailable()
            for transport in transports:
                if transport not in ("sse", "ws", "poll") or not methods:
                    continue
                combo += 1
                if why:
                    results.append({"server": name, "transport": transport, "skipped": why})
                    print(f"  {name:8} {transport:5}: skipped: {why}", flush=True)
                    continue
                print(f"  {name:8} {transport:5} {mode.rooms} rooms x {mode.per_room}", flush=True)
                t0 = time.monotonic()
                task = asyncio.ensure_future(
                    run_combo(sdef, methods, transport, mode, pool, combo, root)
                )
                run.WATCHDOG.arm(combo_budget(mode, len(methods)), task)
                try:
                    r = await task
                except asyncio.CancelledError:
                    if not run.WATCHDOG.fired:
                        raise
                    r = {"server": name, "transport": transport, "n": n, "ok": False}
                finally:
                    run.WATCHDOG.disarm()
                if run.WATCHDOG.fired:
                    r.setdefault("error", "watchdog: combo exceeded its time budget")
                    pool.close()
                    pool = run.Pool(nw, target=worker_main)
                    run.WATCHDOG.fired = False
                r["wall_s"] = round(time.monotonic() - t0, 1)
                if r.get("error"):
                    print(f"  {name:8} {transport:5}: error: {r['error']}", flush=True)
                results.append(r)
    finally:
        pool.close()
    return results


def main(args: argparse.Namespace) -> int:
    """``bench/run.py --rooms``: run, print the table, write ``bench/results/rooms*.json``."""
    base = QUICK if args.quick else FULL
    mode = RoomsMode(**base.__dict__)
    if args.room_count:
        mode.rooms = args.room_count
    if args.per_room:
        mode.per_room = args.per_room
    if not 0 < mode.rooms <= ROOM_RADIX:
        raise SystemExit(f"--room-count: 1 to {ROOM_RADIX:,}")
    if args.step_seconds:
        mode.step_seconds = args.step_seconds
    label = "rooms-quick" if args.quick else "rooms"
    print(
        f"tidings bench ({label}): {mode.rooms} rooms x {mode.per_room} subscribers, "
        f"rates from {mode.first_rate:,.0f}/s x{mode.factor:g} up to {mode.max_rate:,.0f}/s, "
        f"{mode.step_seconds} s per step, p99 <= {SLO_MS:.0f} ms",
        flush=True,
    )
    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="tidings-rooms-"))
    results = asyncio.run(run_all(args, mode, root))
    if args.keep_tmp:
        print(f"server logs and configs kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    meta = report.machine(label, mode.__dict__, time.monotonic() - t0)
    meta["slo_ms"] = SLO_MS
    with contextlib.suppress(OSError):
        meta["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    out = args.json or Path(__file__).resolve().parent / "results" / f"{label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print()
    print(table(results))
    print(f"results: {out}  ({time.monotonic() - t0:.0f} s)")
    return 0 if all(r.get("ok") or r.get("skipped") for r in results) else 1


if __name__ == "__main__":  # pragma: no cover - run through bench/run.py --rooms
    sys.exit(run.main([*sys.argv[1:], "--rooms"]))
