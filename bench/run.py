"""Run the benchmark: every server x transport x scenario, same N, same message.

    .venv/bin/python bench/run.py --quick              # N=1,000, under 2 minutes
    .venv/bin/python bench/run.py --full               # N=10,000 and N=19,000
    .venv/bin/python bench/run.py --servers tidings,floor --transports sse --n 5000
    .venv/bin/python bench/run.py --servers tidings,tidings-asgi --transports sse,ws  # rt.asgi()
    .venv/bin/python bench/run.py --scale --n 1000000   # workers + Redis, see scale.py
    .venv/bin/python bench/run.py --rooms          # 1,000 chat rooms x 10, rising publish rate

For each (server, transport) a fresh server process is started (RSS deltas are
only meaningful from a fresh start), warmed with one subscriber and one
publication, and then driven through the phases:

1. connect N subscribers (the *connection rate* scenario: handshake + subscribe);
2. hold them idle (*idle capacity*: RSS delta / N, kernel slab delta / N);
3. K broadcasts, one at a time (*fan-out*: server CPU per delivery, deliveries/s,
   time from publish to the last subscriber's receipt);
4. R publications/s for D seconds, open loop (*latency under load*).

Then the connections are closed and the server process tree is killed. Every
wait has a timeout; a server that dies or wedges is reported, not waited for.

``--scale`` is a separate scenario (issues 7 and 16): tidings with several
worker processes on one port and a Redis broker, N SSE and WebSocket
subscribers connected in steps, K broadcasts; see ``scale.py``. ``--rooms`` is
another (issue 16): many small channels and a rising publish rate until p99
publish -> deliver passes 50 ms; see ``rooms.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load
import measure
import report
from servers import HOST, SERVERS, ServerDef

SCENARIOS = ("idle", "fanout", "latency", "connrate")
PAD = "x" * 60  # message data is ~100 bytes of JSON, as in the fan-out probe


@dataclass
class Mode:
    """Sizes and durations of one run."""

    ns: list[int]
    broadcasts: int  # K
    gap: float  # seconds between broadcasts
    settle: float  # seconds idle before reading RSS
    latency_seconds: float  # D
    latency_deliveries_per_s: int  # R = this / N, clamped
    drain_timeout: float  # how long to wait for stragglers after a phase
    concurrency: int  # handshakes in flight per worker process


QUICK = Mode(
    [1000],
    broadcasts=20,
    gap=0.05,
    settle=0.7,
    latency_seconds=2.0,
    latency_deliveries_per_s=20_000,
    drain_timeout=4.0,
    concurrency=100,
)
FULL = Mode(
    [10_000, 19_000],
    broadcasts=20,
    gap=0.2,
    settle=3.0,
    latency_seconds=10.0,
    latency_deliveries_per_s=50_000,
    drain_timeout=15.0,
    concurrency=200,
)


def message(seq: int, sent_ns: int) -> dict[str, Any]:
    """The published data; ``load.scan`` finds the seq and the send time in it."""
    return {"m": f"#S{seq};T{sent_ns};", "p": PAD}


# --------------------------------------------------------------------------- workers


class WorkerHandle:
    """The coordinator's end of one load-generator process."""

    def __init__(self, ctx: Any, index: int, target: Callable[..., None]) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, index), daemon=True)
        self.proc.start()
        child.close()
        self.index = index

    async def call(self, cmd: str, wait_s: float, /, **args: Any) -> Any:
        """Send one command; wait for its answer at most ``wait_s`` seconds."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def readable() -> None:
            loop.remove_reader(self.conn.fileno())
            try:
                fut.set_result(self.conn.recv())
            except (EOFError, OSError) as e:
                fut.set_exception(RuntimeError(f"worker {self.index} died: {e}"))

        self.conn.send((cmd, args))
        loop.add_reader(self.conn.fileno(), readable)
        try:
            answer = await asyncio.wait_for(fut, wait_s)
        except TimeoutError:
            loop.remove_reader(self.conn.fileno())
            raise RuntimeError(f"worker {self.index}: {cmd} timed out after {wait_s}s") from None
        if isinstance(answer, dict) and "error" in answer and len(answer) == 1:
            raise RuntimeError(f"worker {self.index}: {cmd}: {answer['error']}")
        return answer

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(("exit", {}))
        self.proc.join(1.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(1.0)


class Pool:
    """All workers; commands go to all of them concurrently."""

    def __init__(self, n: int, target: Callable[..., None] = load.worker_main) -> None:
        """``target``: the load process's entry point (``rooms.worker_main`` adds room counts)."""
        ctx = mp.get_context("spawn")  # no inherited event loop or server sockets
        self.workers = [WorkerHandle(ctx, i, target) for i in range(n)]

    async def all(
        self, cmd: str, wait_s: float, /, per: list[dict[str, Any]] | None = None, **args: Any
    ) -> list[Any]:
        calls = [
            w.call(cmd, wait_s, **(per[i] if per else {}), **args)
            for i, w in enumerate(self.workers)
        ]
        return list(await asyncio.gather(*calls))

    def close(self) -> None:
        for w in self.workers:
            w.kill()


# --------------------------------------------------------------------------- publishing


class Publisher:
    """Keep-alive HTTP POST client with a small connection pool (open-loop capable)."""

    def __init__(self, host: str, port: int, path: str, body: Any, limit: int = 16) -> None:
        self.host, self.port, self.path, self.body = host, port, path, body
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.open = 0
        self.limit = limit
        self.errors: dict[str, int] = {}
        self.skipped = 0

    async def publish(self, seq: int, timeout: float = 30.0) -> int:
        """POST one message stamped with the send time; return the HTTP status (0: failed).

        A pooled connection may have been closed by the server's keep-alive
        timeout while idle; as any HTTP client does, that case is retried once
        on a new connection (the message is stamped again).
        """
        reused = bool(self.idle)
        status, stale = await self._publish_once(seq, timeout)
        if stale and reused:
            status, _ = await self._publish_once(seq, timeout)
        return status

    async def _publish_once(self, seq: int, timeout: float) -> tuple[int, bool]:
        """One attempt: (status or 0, whether the connection was found closed)."""
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), timeout
                )
            except (OSError, TimeoutError) as e:
                key = f"connect: {type(e).__name__}"
                self.errors[key] = self.errors.get(key, 0) + 1
                return 0, False
            self.open += 1
        sent = time.monotonic_ns()
        payload = self.body(message(seq, sent))
        writer.write(
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            status = int(head[9:12])
            clen, close = -1, False
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                k = k.strip().lower()
                if k == b"content-length":
                    clen = int(v)
                elif k == b"connection" and v.strip().lower() == b"close":
                    close = True
            if clen > 0:
                await asyncio.wait_for(reader.readexactly(clen), timeout)
            if close or clen < 0:
                writer.close()
                self.open -= 1
            else:
                self.idle.append((reader, writer))
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
            writer.close()
            self.open -= 1
            key = type(e).__name__
            self.errors[key] = self.errors.get(key, 0) + 1
            return 0, not isinstance(e, TimeoutError)
        if status >= 300:
            key = f"status {status}"
            self.errors[key] = self.errors.get(key, 0) + 1
        return status, False

    def can_start(self) -> bool:
        return bool(self.idle) or self.open < self.limit

    def close(self) -> None:
        for _, w in self.idle:
            w.close()
        self.idle.clear()


# --------------------------------------------------------------------------- server process


class ServerProc:
    """A started server: its process group, log and port."""

    def __init__(self, sdef: ServerDef, port: int, workdir: Path) -> None:
        self.sdef, self.port, self.workdir = sdef, port, workdir
        if sdef.setup:
            sdef.setup(port, workdir)
        self.log = open(workdir / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        # The bench's own settings (TIDINGS_BENCH_*) are not server settings:
        # tidings refuses unknown TIDINGS_* variables.
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_BENCH_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            sdef.command(port, workdir),
            cwd=workdir,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        self.pids = [self.proc.pid]

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Until the server answers HTTP on its port (and its publish port)."""
        deadline = time.monotonic() + timeout
        ports = {self.port, self.port + self.sdef.publish_port_offset}
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                for p in ports:
                    _, w = await asyncio.wait_for(asyncio.open_connection(HOST, p), 1.0)
                    w.close()
                break
            except (OSError, TimeoutError) as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not listening after {timeout}s: {self.log_tail()}") from e
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        self.pids = measure.process_tree(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kib(self) -> int:
        return measure.rss_kib(self.pids)

    def cpu(self) -> float:
        return measure.cpu_seconds(self.pids)

    def log_tail(self, n: int = 600) -> str:
        self.log.flush()
        try:
            return (self.workdir / "server.log").read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left."""
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        for pid in self.pids[1:]:  # children that left the group, if any
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.log.close()


def free_port(span: int = 2) -> int:
    """A port P such that P..P+span-1 are free on 127.0.0.1 right now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port + span > 65535:
            continue
        try:
            for p in range(port + 1, port + span):
                with socket.socket() as s:
                    s.bind((HOST, p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


# --------------------------------------------------------------------------- one combo


def source_ips(combo: int, worker: int) -> list[str]:
    """Loopback source addresses of one worker in one run: never shared."""
    return [f"127.{1 + combo % 250}.{1 + worker}.{2 + k}" for k in range(2)]


async def wait_seqs(pool: Pool, seqs: list[int], timeout: float) -> dict[str, Any]:
    """Merge the workers' per-seq counts and last receive times."""
    answers = await pool.all("wait", timeout + 5, seqs=seqs, timeout=timeout)
    counts = {s: sum(a["counts"][s] for a in answers) for s in seqs}
    last = {s: max(a["last_ns"][s] for a in answers) for s in seqs}
    errors: dict[str, int] = {}
    for a in answers:
        for k, v in a["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {
        "counts": counts,
        "last_ns": last,
        "ready": sum(a["ready"] for a in answers),
        "lost": sum(a["lost"] for a in answers),
        "errors": errors,
    }


async def warm_up(
    server: ServerProc, publisher: Publisher, pool: Pool, spec: load.Spec, combo: int, n: int = 1
) -> None:
    """n subscribers, one publication, close: imports and first-use allocations
    must not count as per-connection memory. Several workers behind one port
    need n well above their number for every one of them to be warmed."""
    await pool.workers[0].call(
        "connect",
        20,
        spec=spec.__dict__,
        n=n,
        ips=source_ips(combo, 99),
        concurrency=min(n, 50),
        timeout=10,
    )
    await pool.all("reset", 10)
    await publisher.publish(0)
    await wait_seqs(pool, [0], 3)
    await pool.all("close", 10)
    await asyncio.sleep(0.3)
    if not server.alive():
        raise RuntimeError(f"died during warm-up: {server.log_tail()}")


async def connect_all(
    server: ServerProc,
    pool: Pool,
    spec: load.Spec,
    n: int,
    combo: int,
    mode: Mode,
    timeout: float,
) -> dict[str, Any]:
    """The connection-rate scenario: n subscribers over all workers, each
    counted once subscribed (``spec.ready`` seen), within ``timeout`` seconds."""
    nw = len(pool.workers)
    per = [n // nw + (1 if i < n % nw else 0) for i in range(nw)]
    answers = await pool.all(
        "connect",
        timeout + 10,
        per=[{"n": per[i], "ips": source_ips(combo, i)} for i in range(nw)],
        spec=spec.__dict__,
        concurrency=mode.concurrency,
        timeout=timeout,
    )
    ok = sum(a["ok"] for a in answers)
    span = (max(a["t1"] for a in answers) - min(a["t0"] for a in answers)) / 1e9
    failures: dict[str, int] = {}
    for a in answers:
        for k, v in a["failures"].items():
            failures[k] = failures.get(k, 0) + v
    if ok == 0:
        raise RuntimeError(f"no subscriber connected: {failures} {server.log_tail(300)}")
    return {
        "ok": ok,
        "failures": failures,
        "seconds": round(span, 3),
        "per_s": round(ok / span, 1) if span > 0 else None,
    }


async def run_combo(
    sdef: ServerDef,
    transport: str,
    n: int,
    mode: Mode,
    scenarios: set[str],
    pool: Pool,
    combo: int,
    root: Path,
) -> dict[str, Any]:
    """Start one server, run the phases, stop it. Never raises: errors are recorded."""
    result: dict[str, Any] = {
        "server": sdef.name,
        "transport": transport,
        "n": n,
        "n_requested": n,
        "ok": False,
    }
    if sdef.max_n and n > sdef.max_n:
        result["n"] = n = sdef.max_n
        result["capped"] = f"N capped at {sdef.max_n}"
    workdir = Path(tempfile.mkdtemp(prefix=f"{sdef.name}-{transport}-", dir=root))
    port = free_port(1 + sdef.publish_port_offset)
    server: ServerProc | None = None
    publisher: Publisher | None = None
    try:
        server = ServerProc(sdef, port, workdir)
        await server.wait_ready()
        spec = sdef.specs(port)[transport]
        publisher = Publisher(
            HOST, port + sdef.publish_port_offset, sdef.publish_path, sdef.publish_body
        )
        await warm_up(server, publisher, pool, spec, combo)
        rss0, slab0 = server.rss_kib(), measure.slab_kib()
        result["rss_base_kib"] = rss0
        result["connect"] = await connect_all(server, pool, spec, n, combo, mode, 30 + n / 300)
        ok = result["connect"]["ok"]
        await asyncio.sleep(mode.settle)
        rss1, slab1 = server.rss_kib(), measure.slab_kib()
        result["idle"] = {
            "connections": ok,
            "rss_kib": rss1,
            "rss_per_conn_b": round((rss1 - rss0) * 1024 / ok, 1),
            "slab_per_conn_b": round((slab1 - slab0) * 1024 / ok, 1),
        }
        if not server.alive():
            raise RuntimeError(f"died holding {ok} connections: {server.log_tail()}")

        if "fanout" in scenarios:
            result["fanout"] = await fanout(server, publisher, pool, mode)
        if "latency" in scenarios:
            result["latency"] = await latency(publisher, pool, mode, ok)
        result["ok"] = server.alive()
        if not result["ok"]:
            result["error"] = f"server died: {server.log_tail()}"
    except Exception as e:  # one broken server must not stop the others
        result["error"] = f"{type(e).__name__}: {e}"
        if server is not None and "died" not in str(e):
            result["server_log"] = server.log_tail(400)
    finally:
        if server:
            server.stop()
        if publisher:
            publisher.close()
        if not WATCHDOG.fired:
            with contextlib.suppress(Exception):
                await pool.all("close", 20)
        # Closed sockets and the dead server's memory are freed lazily (RCU,
        # slab caches); let that happen before the next server's baseline.
        await asyncio.sleep(1.0)
    return result


async def fanout(
    server: ServerProc, publisher: Publisher, pool: Pool, mode: Mode
) -> dict[str, Any]:
    """K broadcasts, one at a time; each waits until the last subscriber has it."""
    await pool.all("reset", 10)
    ttl_ms: list[float] = []
    delivered = expected = 0
    pub_ms: list[float] = []
    per_round: list[int] = []
    cpu_marks: list[float] = []
    t_start = time.monotonic()
    for seq in range(1, mode.broadcasts + 1):
        ready_before = sum(a["ready"] for a in await pool.all("status", 10))
        cpu_marks.append(server.cpu())
        t0 = time.monotonic_ns()
        # A server that cannot even answer the publish within the drain timeout
        # fails the scenario (the threaded baseline at 10,000 does: GIL convoy).
        status = await publisher.publish(seq, timeout=mode.drain_timeout)
        pub_ms.append((time.monotonic_ns() - t0) / 1e6)
        if not 200 <= status < 300:
            raise RuntimeError(f"publish answered {status or 'nothing'}: {publisher.errors}")
        got = await wait_seqs(pool, [seq], mode.drain_timeout)
        delivered += got["counts"][seq]
        per_round.append(got["counts"][seq])
        expected += ready_before
        if got["last_ns"][seq]:
            ttl_ms.append((got["last_ns"][seq] - t0) / 1e6)
        await asyncio.sleep(mode.gap)
    cpu_marks.append(server.cpu())
    wall = time.monotonic() - t_start
    ttl_sorted = sorted(ttl_ms)
    # CPU per delivery per round (publish k .. publish k+1, so work a broadcast
    # leaves behind, like re-armed long-polls, is counted); the median resists
    # the bursts of other work on a shared 2-core machine better than the mean.
    rounds = sorted(
        (cpu_marks[i + 1] - cpu_marks[i]) * 1e6 / c for i, c in enumerate(per_round) if c
    )
    cpu_total = cpu_marks[-1] - cpu_marks[0]
    return {
        "broadcasts": mode.broadcasts,
        "delivered": delivered,
        "expected": expected,
        "lost_connections": got["lost"],
        "cpu_s": round(cpu_total, 3),
        "cpu_us_per_delivery": round(measure.percentile(rounds, 50), 3) if rounds else None,
        "cpu_us_per_delivery_mean": round(cpu_total * 1e6 / delivered, 3) if delivered else None,
        "cpu_us_per_delivery_range": [round(rounds[0], 3), round(rounds[-1], 3)]
        if rounds
        else None,
        "deliveries_per_s": round(delivered / (sum(ttl_ms) / 1e3), 1) if ttl_ms else None,
        "ttl_ms_median": round(measure.percentile(ttl_sorted, 50), 3),
        "ttl_ms_p99": round(measure.percentile(ttl_sorted, 99), 3),
        "ttl_ms_max": round(ttl_sorted[-1], 3) if ttl_sorted else None,
        "publish_call_ms_median": round(measure.percentile(sorted(pub_ms), 50), 3),
        "wall_s": round(wall, 3),
    }


async def latency(publisher: Publisher, pool: Pool, mode: Mode, n: int) -> dict[str, Any]:
    """R publications/s for D seconds, open loop: a late answer never delays the next."""
    rate = max(1.0, min(200.0, mode.latency_deliveries_per_s / max(n, 1)))
    total = max(1, int(rate * mode.latency_seconds))
    first = 1001
    seqs = list(range(first, first + total))
    answers = await pool.all("reset", 10, record_latency=True)
    ready = sum(a["ready"] for a in answers)
    tasks: set[asyncio.Task[int]] = set()
    skipped = 0
    t0 = time.monotonic()
    sent: dict[int, int] = {}
    for i, seq in enumerate(seqs):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if not publisher.can_start():
            skipped += 1  # server too slow to even answer publishes: counted, not queued
            continue
        sent[seq] = time.monotonic_ns()
        task = asyncio.ensure_future(publisher.publish(seq))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=mode.drain_timeout)
    for task in tuple(tasks):  # a saturated server: stop asking, count what arrived
        task.cancel()
    got = await wait_seqs(pool, list(sent), mode.drain_timeout)
    answers = await pool.all("latency", 30, seqs=[])
    lat = array("q")
    for a in answers:
        lat.frombytes(a["latency_us"])
    values = sorted(lat)
    ttl = sorted((got["last_ns"][s] - sent[s]) / 1e6 for s in sent if got["last_ns"][s])
    delivered = sum(got["counts"].values())
    return {
        "rate_per_s": round(rate, 2),
        "seconds": mode.latency_seconds,
        "published": len(sent),
        "skipped": skipped,
        "delivered": delivered,
        "expected": ready * len(sent),
        "p50_ms": round(measure.percentile(values, 50) / 1e3, 3),
        "p99_ms": round(measure.percentile(values, 99) / 1e3, 3),
        "max_ms": round(values[-1] / 1e3, 3) if values else None,
        "last_delivery_p99_ms": round(measure.percentile(ttl, 99), 3),
        "publish_errors": dict(publisher.errors),
    }


# --------------------------------------------------------------------------- scale-out


# The scale scenario itself is in scale.py; these two helpers are shared.


async def wait_workers(server: ServerProc, workers: int, timeout: float = 30.0) -> list[int]:
    """Until all ``workers`` listen on the port; returns their pids.

    ``wait_ready`` returns as soon as one worker accepts, while the others may
    still be importing; connecting then would pile every subscriber on the
    first one. Also refreshes ``server.pids`` so CPU and stop() cover them all.
    """
    deadline = time.monotonic() + timeout
    while (up := measure.listening_sockets(server.port)) < workers:
        if not server.alive():
            raise RuntimeError(f"exited with {server.proc.returncode}: {server.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{up} of {workers} workers listening after {timeout}s")
        await asyncio.sleep(0.1)
    server.pids = measure.process_tree(server.proc.pid)
    children = [p for p in server.pids if p != server.proc.pid]
    if len(children) != workers:
        raise RuntimeError(f"expected {workers} worker processes, found {len(children)}")
    return children


def alive(pid: int) -> bool:
    """Whether ``pid`` still exists as a running (non-zombie) process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


# --------------------------------------------------------------------------- main


class Watchdog:
    """Last line against a wedge: a SIGALRM budget per (server, transport).

    Every wait has its own timeout; this catches what slips through (a bug, a
    half-written pipe message). When the budget is spent, the combo's task is
    cancelled from the event loop (its ``finally`` stops the server), and if
    the main thread is stuck in a blocking pipe read the read is interrupted
    too. ``run`` records the error and replaces the worker pool, whose pipes
    may hold half a message.
    """

    def __init__(self) -> None:
        self.fired = False
        self.task: asyncio.Future[Any] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def _fire(self, signum: int, frame: FrameType | None) -> None:
        self.fired = True
        signal.alarm(30)  # and again, should cleanup wedge too
        if self.task is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)
        while frame is not None:  # raising elsewhere could break the event loop itself
            if frame.f_code.co_name in ("_recv", "_recv_bytes"):
                raise TimeoutError("watchdog: blocking pipe read interrupted")
            frame = frame.f_back

    def arm(self, seconds: float, task: asyncio.Future[Any]) -> None:
        self.task, self.loop = task, asyncio.get_running_loop()
        signal.signal(signal.SIGALRM, self._fire)
        signal.alarm(max(1, int(seconds)))

    def disarm(self) -> None:
        signal.alarm(0)
        self.task = None


WATCHDOG = Watchdog()


def combo_budget(mode: Mode, n: int) -> float:
    """Generous upper bound of one (server, transport) run, in seconds."""
    connect = 30 + n / 300
    fanout = mode.broadcasts * (mode.drain_timeout + mode.gap + 1)
    return 60 + connect + fanout + mode.latency_seconds + 3 * mode.drain_timeout


async def run(args: argparse.Namespace, mode: Mode) -> list[dict[str, Any]]:
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    scenarios = {s.strip() for s in args.scenarios.split(",") if s.strip()}
    unknown = (set(servers) - set(SERVERS)) | (scenarios - set(SCENARIOS))
    if unknown:
        raise SystemExit(f"unknown server or scenario: {', '.join(sorted(unknown))}")
    root = Path(tempfile.mkdtemp(prefix="tidings-bench-"))
    results: list[dict[str, Any]] = []
    combo = int(time.time()) % 97  # different source addresses from a run just before
    for n in mode.ns:
        nw = max(2, math.ceil(n / load.MAX_SOCKETS_PER_PROCESS))
        pool = Pool(nw)
        try:
            for name in servers:
                sdef = SERVERS[name]
                why = sdef.unavailable()
                for transport in transports:
                    if transport not in sdef.transports:
                        continue
                    combo += 1
                    if why:
                        results.append(
                            {
                                "server": name,
                                "transport": transport,
                                "n": n,
                                "ok": False,
                                "skipped": why,
                            }
                        )
                        print(f"  {name:14} {transport:5} N={n}: skipped: {why}", flush=True)
                        continue
                    t0 = time.monotonic()
                    task = asyncio.ensure_future(
                        run_combo(sdef, transport, n, mode, scenarios, pool, combo, root)
                    )
                    WATCHDOG.arm(combo_budget(mode, n), task)
                    try:
                        r = await task
                    except asyncio.CancelledError:
                        if not WATCHDOG.fired:
                            raise
                        r = {"server": name, "transport": transport, "n": n, "ok": False}
                    finally:
                        WATCHDOG.disarm()
                    if WATCHDOG.fired:  # its pipes may hold half a message: start afresh
                        r.setdefault("error", "watchdog: combo exceeded its time budget")
                        pool.close()
                        pool = Pool(nw)
                        WATCHDOG.fired = False
                    r["wall_s"] = round(time.monotonic() - t0, 1)
                    results.append(r)
                    print("  " + report.one_line(r), flush=True)
        finally:
            pool.close()
    if args.keep_tmp:
        print(f"server logs and configs kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="N=1,000, small K and D (default)")
    g.add_argument("--full", action="store_true", help="N=10,000 and 19,000")
    g.add_argument(
        "--scale",
        action="store_true",
        help="scale: tidings --workers W + Redis, N subscribers, SSE and WebSocket half each "
        "(default 100,000; --n 1000000 for the million); see scale.py",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="--scale: tidings worker processes (default: enough for N under the file limit)",
    )
    p.add_argument("--n", help="comma-separated N values (overrides the mode's)")
    p.add_argument("--servers", default=",".join(SERVERS), help="comma-separated, default all")
    p.add_argument("--transports", help="default sse,ws,poll (--scale: sse,ws)")
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="idle,fanout,latency,connrate (connect always runs: it is connrate)",
    )
    p.add_argument("--broadcasts", type=int, help="K, broadcasts in the fan-out phase")
    p.add_argument("--latency-seconds", type=float, help="D, duration of the latency phase")
    p.add_argument("--json", type=Path, help="write results here (default bench/results/)")
    p.add_argument("--no-charts", action="store_true")
    p.add_argument(
        "--keep-tmp", action="store_true", help="keep server logs and configs (temp directory)"
    )
    scale = p.add_argument_group("--scale: the million-subscriber scenario (bench/scale.py)")
    scale.add_argument("--step", type=int, help="subscribers connected per step (default N/5)")
    scale.add_argument(
        "--keepalive",
        type=float,
        default=300.0,
        help="SSE heartbeat and WebSocket ping interval in seconds (default 300)",
    )
    scale.add_argument("--no-raise", action="store_true", help="never raise a sysctl, even as root")
    scale.add_argument(
        "--memory-guard",
        type=float,
        default=0.85,
        metavar="FRACTION",
        help="stop connecting at this fraction of RAM in use (default 0.85)",
    )
    scale.add_argument(
        "--check-limits",
        action="store_true",
        help="only print the kernel limits N needs and whether each holds (exit 1 if not)",
    )
    scale.add_argument(
        "--priority",
        type=int,
        metavar="NICE",
        help="root: the run's sessions get this autogroup nice (e.g. -5) on a busy machine",
    )
    rooms = p.add_argument_group("--rooms: the chat-rooms scenario (bench/rooms.py)")
    rooms.add_argument(
        "--rooms",
        action="store_true",
        help="many rooms, publications to random rooms at a rising rate (with --quick: tiny)",
    )
    rooms.add_argument("--room-count", type=int, help="rooms (default 1,000; --quick 10)")
    rooms.add_argument("--per-room", type=int, help="subscribers per room (default 10)")
    rooms.add_argument("--step-seconds", type=float, help="duration of one rate step")
    rooms.add_argument(
        "--methods", default="publish,batch,inproc", help="tidings' publish methods to measure"
    )
    args = p.parse_args(argv)
    if args.transports is None and not args.scale:
        args.transports = "sse,ws,poll"
    if args.rooms:
        if args.full or args.scale:
            p.error("--rooms takes --quick or nothing")
        import rooms as rooms_scenario  # here: it imports this module, and tidings

        return rooms_scenario.main(args)
    if args.scale:
        import scale  # here: it imports this module

        return scale.main(args)
    base = FULL if args.full else QUICK
    mode = Mode(**base.__dict__)
    if args.n:
        mode.ns = [int(x) for x in args.n.split(",")]
    if args.broadcasts:
        mode.broadcasts = args.broadcasts
    if args.latency_seconds:
        mode.latency_seconds = args.latency_seconds
    label = "full" if args.full else "quick"
    t0 = time.monotonic()
    print(
        f"tidings bench ({label}): N={mode.ns} K={mode.broadcasts} D={mode.latency_seconds}s",
        flush=True,
    )
    results = asyncio.run(run(args, mode))
    meta = report.machine(label, mode.__dict__, time.monotonic() - t0)
    out = args.json or Path(__file__).resolve().parent / "results" / f"{label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print()
    print(report.tables(results))
    print(report.targets(results))
    if not args.no_charts:
        for path in report.charts(results, out.parent, label):
            print(f"chart: {path}")
    print(f"results: {out}  ({time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
