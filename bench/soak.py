"""Soak: thousands of held connections with churn and publishes, for a long time.

    .venv/bin/python bench/soak.py                                  # N=10,000, 1800 s
    .venv/bin/python bench/soak.py --n 1000 --duration 60 --churn 20 --publish-rate 10
    .venv/bin/python bench/soak.py --broker redis --json /tmp/soak.json

A fresh ``tidings serve`` process (memory broker, or Redis with ``--broker
redis``) is warmed with a few subscribers, then N subscribers are opened over
the transports (``--split sse,ws,poll`` weights) and ``--channels`` channels by
load-generator processes from ``load.py`` (each holds at most
``load.MAX_SOCKETS_PER_PROCESS`` sockets, bound to its own 127.x.y.z source
addresses, as ``run.py`` does). For ``--duration`` seconds, ``--churn``
connections a second are aborted and reopened on the same transport and
channel, and ``--publish-rate`` publications a second go through the HTTP API,
round-robin over the channels. Every ``--sample`` seconds the server's RSS, its
open descriptors (``/proc/<pid>/fd``), the connections held and the deliveries
received are recorded. The server has no cheap way to report its asyncio task
count from outside (no API call returns it), so that column is left out.

Warm-up is not a fraction picked after the fact: it ends once every
publication in every channel's history ring was published during the run
(``history.size`` of the server's config for the soak's channels, publications
round-robin at ``--publish-rate``, so ``channels x size / rate`` seconds: one
rotation of the rings), plus one long-poll timeout (a churned long-poll whose
client half-closed is held until its timeout, so the number of those reaches
its steady level one timeout after churn starts). By default (``--prefill``)
the rings are filled before the clock starts, so RSS starts near its plateau
instead of growing with the rings; the rotation still counts as warm-up,
because the N = 10,000 run showed RSS rising by another ~4 % until the
prefilled publications had all been replaced, and flat after (docs/soak.md).

At the end every client leaves and the server's descriptors must come back to
the baseline taken before the first subscriber. The verdict, after warm-up:
RSS stays within ±5 % of its median there, and its least-squares line moves
less than half that band over the steady window (so the same run, twice as
long, would still be in the band); descriptors while held stay at baseline +
held connections (+ ``fd_slack``: the publisher's keep-alives and one churn
tick of reopens in flight); after the clients leave, descriptors return to within
``FD_AFTER_CLOSE`` of the baseline, and if they do not, what the server still
holds (descriptor kinds and TCP states) is in the report.

``--tracemalloc FRAMES`` runs the server with ``PYTHONTRACEMALLOC`` and a
``sitecustomize`` that writes a snapshot on SIGUSR1 (no source edited); the
soak takes one when the clock starts, one when warm-up ends and one at the end,
and reports the largest growth sites of both intervals. It inflates RSS
(tracemalloc's own books) and slows the server, so its RSS verdict means
nothing: use it to find a leak, not to measure one.

Output: a table on stdout, ``--json`` (everything), ``--csv`` (one row per
sample, written as the run goes so that an interrupted run keeps its figures)
and ``--png`` (RSS and descriptors over time, with the warm-up and the band;
matplotlib, from the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import itertools
import json
import math
import multiprocessing as mp
import os
import random
import signal
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load
import measure
from run import Pool, Publisher, ServerProc, WorkerHandle, free_port
from scale import worker_capacity
from servers import CENTRIFUGE_SUBSCRIBE, HOST, REDIS, SERVERS, tidings_scaled
from tidings.config import load_config

KINDS = ("sse", "ws", "poll")
#: Descriptors beyond baseline + held connections that a sample may see, besides
#: the reopens in flight (one churn tick's worth, opened at once and not yet
#: counted as held): the publisher's keep-alives (``Publisher.limit``, 16) and a
#: few for connections being accepted or torn down. The first N = 10,000 run at
#: the full 50 reopens/s saw up to 53 in all (docs/soak.md).
FD_SLACK = 24
#: Descriptors above the baseline allowed once every client has left.
FD_AFTER_CLOSE = 5
RSS_BAND = 0.05  # ± around the post-warm-up median
#: The server's ``sitecustomize`` under ``--tracemalloc``: a snapshot per SIGUSR1.
SNAPSHOT_HOOK = """\
import os, signal, tracemalloc

def _snapshot(signum, frame):
    if tracemalloc.is_tracing():
        _snapshot.n += 1
        path = os.path.join(os.environ["SOAK_SNAPSHOT_DIR"], f"snap-{_snapshot.n}.pickle")
        tracemalloc.take_snapshot().dump(path + ".tmp")
        os.replace(path + ".tmp", path)

_snapshot.n = 0
signal.signal(signal.SIGUSR1, _snapshot)
"""


# --------------------------------------------------------------------------- worker side


def channel_specs(port: int, channel: str, poll_timeout: int = 30) -> dict[str, load.Spec]:
    """The bench's tidings endpoints (``servers._centrifuge_like``) on ``channel``."""
    subscribe = CENTRIFUGE_SUBSCRIBE.replace(b'"bench"', json.dumps(channel).encode())
    return {
        "sse": load.Spec("sse", HOST, port, f"/sse?channel={channel}", ready=b"event: subscribed"),
        "ws": load.Spec(
            "ws", HOST, port, "/connection/websocket", ready=b'"id":2', ws_first=subscribe
        ),
        "poll": load.Spec("poll", HOST, port, f"/poll?channel={channel}&timeout={poll_timeout}"),
    }


class SoakWorker(load.Worker):
    """``load.Worker`` plus the soak's commands: open a mixed plan, churn, sample.

    Churn aborts connections that are ready and reopens each on its own spec,
    so the mix of transports and channels stays what the plan opened.
    """

    def __init__(self, conn: Connection, index: int) -> None:
        super().__init__(conn, index)
        self.ips: list[str] = []
        self.churned = 0
        self.reopened = 0
        self.churn_failures: dict[str, int] = {}
        self.rng = random.Random(index)

    async def open_plan(
        self, plan: list[tuple[dict[str, Any], int]], ips: list[str], timeout: float
    ) -> dict[str, Any]:
        """Open every (spec, count) group at once: one handshake in flight per group."""
        self.ips = ips
        answers = await asyncio.gather(
            *(self.connect(load.Spec(**spec), n, ips, 1, timeout) for spec, n in plan)
        )
        failures: dict[str, int] = {}
        for a in answers:
            for k, v in a["failures"].items():
                failures[k] = failures.get(k, 0) + v
        return {"ok": sum(a["ok"] for a in answers), "failures": failures}

    async def churn(self, k: int, timeout: float) -> dict[str, Any]:
        """Abort ``k`` ready connections, then reopen one on each one's spec."""
        pairs = zip(self.transports, self.protocols, strict=True)
        held = [(t, p) for t, p in pairs if not t.is_closing()]
        ready = [(t, p) for t, p in held if p.is_ready]
        victims = self.rng.sample(ready, min(k, len(ready)))
        for t, _ in victims:
            t.abort()
        gone = {id(p) for _, p in victims}
        # Connections still in their handshake stay listed: "close" must find them.
        keep = [(t, p) for t, p in held if id(p) not in gone]
        self.transports = [t for t, _ in keep]
        self.protocols = [p for _, p in keep]
        self.churned += len(victims)
        answers = await asyncio.gather(
            *(self.connect(p.spec, 1, self.ips, 1, timeout) for _, p in victims)
        )
        for a in answers:
            self.reopened += a["ok"]
            for key, v in a["failures"].items():
                self.churn_failures[key] = self.churn_failures.get(key, 0) + v
        return {"churned": len(victims)}

    def sample(self) -> dict[str, Any]:
        st = load.STATS
        return {
            "ready": st.ready,
            "lost": st.lost,
            "deliveries": sum(st.counts.values()),
            "errors": dict(st.errors),
            "churned": self.churned,
            "reopened": self.reopened,
            "churn_failures": dict(self.churn_failures),
        }

    async def dispatch(self, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "open_plan":
            plan = [(spec, n) for spec, n in args["plan"]]
            return await self.open_plan(plan, args["ips"], args["timeout"])
        if cmd == "churn":
            return await self.churn(args["k"], args["timeout"])
        if cmd == "sample":
            return self.sample()
        return await super().dispatch(cmd, args)


def soak_worker_main(conn: Connection, index: int) -> None:
    """Entry point of a soak worker process (as ``load.worker_main``)."""
    import uvloop

    async def go() -> None:
        await SoakWorker(conn, index).main()

    uvloop.run(go())


class SoakHandle(WorkerHandle):
    """``run.WorkerHandle`` starting a ``SoakWorker`` instead of a ``load.Worker``.

    Churn and sampling run concurrently here, while ``WorkerHandle.call``
    expects one command at a time on the pipe (answers are not tagged), so
    calls take turns.
    """

    def __init__(self, ctx: Any, index: int) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=soak_worker_main, args=(child, index), daemon=True)
        self.proc.start()
        child.close()
        self.index = index
        self.turn = asyncio.Lock()

    async def call(self, cmd: str, wait_s: float, /, **args: Any) -> Any:
        async with self.turn:
            return await super().call(cmd, wait_s, **args)


class SoakPublisher(Publisher):
    """``run.Publisher`` whose retry after a stale keep-alive goes to a new connection.

    The pool is LIFO, so at a steady rate a few connections carry every
    publish and the rest idle past the server's keep-alive timeout (5 s) and
    are closed by it. ``Publisher`` retries once on the next pooled one, as
    stale as the first: in 45 s at 20/s, 3-4 publishes of 900 failed with two
    ``IncompleteReadError``s each. Every idle connection is at least as old as
    the one found closed, so all of them are dropped and the retry opens one.
    """

    async def publish(self, seq: int, timeout: float = 30.0) -> int:
        reused = bool(self.idle)
        status, stale = await self._publish_once(seq, timeout)
        if stale and reused:
            self.open -= len(self.idle)
            self.close()
            status, _ = await self._publish_once(seq, timeout)
        return status


class SoakPool(Pool):
    def __init__(self, n: int) -> None:
        ctx = mp.get_context("spawn")
        self.workers = [SoakHandle(ctx, i) for i in range(n)]


# --------------------------------------------------------------------------- coordinator


@dataclass
class Settings:
    n: int = 10_000
    split: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channels: int = 100
    churn: float = 50.0
    publish_rate: float = 20.0
    duration: float = 1800.0
    sample: float = 10.0
    warmup: float | None = None  # seconds; None: until history is full + one poll timeout
    prefill: bool = True
    workers: int = 0  # 0: as many as the descriptor limit asks, at least 2
    broker: str = "memory"
    poll_timeout: int = 30
    csv_path: Path | None = None
    tracemalloc: int = 0  # frames per traceback; 0: off

    @property
    def history_size(self) -> int:
        """Publications the server keeps per soak channel (its config, as it will load it)."""
        path = os.environ.get("TIDINGS_BENCH_CONFIG") if self.broker == "memory" else None
        return load_config(path).history_for("soak-0").size

    @property
    def history_fill_s(self) -> float:
        """Seconds of publishing at ``publish_rate`` until every channel's ring is full."""
        return self.channels * self.history_size / self.publish_rate

    @property
    def warmup_s(self) -> float:
        """Seconds of the run left out of the RSS verdict (see the module docstring)."""
        if self.warmup is not None:
            return self.warmup
        return self.history_fill_s + self.poll_timeout


@dataclass
class Sample:
    t: float
    rss_kib: int
    fds: int
    held: int
    deliveries: int
    published: int
    churned: int
    lost_unexpected: int
    cpu_s: float


@dataclass
class Soak:
    settings: Settings
    samples: list[Sample] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)


def plan_for(s: Settings, port: int, workers: int) -> list[list[tuple[dict[str, Any], int]]]:
    """Spread N over transports (by weight), channels and workers; counts only."""
    total = sum(s.split)
    per_kind = [int(s.n * w / total) for w in s.split]
    per_kind[0] += s.n - sum(per_kind)
    plans: list[list[tuple[dict[str, Any], int]]] = [[] for _ in range(workers)]
    for kind, count in zip(KINDS, per_kind, strict=True):
        for c in range(s.channels):
            n_chan = count // s.channels + (1 if c < count % s.channels else 0)
            spec = channel_specs(port, f"soak-{c}", s.poll_timeout)[kind].__dict__
            for w in range(workers):
                share = n_chan // workers + (1 if w < n_chan % workers else 0)
                if share:
                    plans[(w + c) % workers].append((spec, share))
    return plans


def soak_ips(worker: int) -> list[str]:
    """Loopback sources of one soak worker (8 per worker: churn reuses ports quickly)."""
    return [f"127.251.{1 + worker}.{2 + k}" for k in range(8)]


def body_for(channels: int) -> Any:
    def body(data: dict[str, Any]) -> bytes:
        seq = int(data["m"][2:].split(";", 1)[0])
        return json.dumps(
            {"channel": f"soak-{seq % channels}", "data": data}, separators=(",", ":")
        ).encode()

    return body


def slope_per_hour(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over t, scaled to one hour."""
    if len(points) < 2:
        return 0.0
    ts = [p[0] for p in points]
    ys = [p[1] for p in points]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    if den == 0:
        return 0.0
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / den * 3600.0


async def wait_fds(pid: int, target: int, timeout: float) -> int:
    """Poll the server's descriptors until at most ``target`` (or the deadline)."""
    deadline = time.monotonic() + timeout
    fds = measure.open_files(pid)
    while fds > target and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        fds = measure.open_files(pid)
    return fds


TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


def held_descriptors(pid: int) -> dict[str, int]:
    """What ``pid``'s descriptors are, counted by kind: TCP sockets by state and peer
    address (``tcp CLOSE_WAIT 127.251.1.2``), pipes, anon inodes, files.

    The ``ls -l /proc/PID/fd`` + ``ss -tanp`` of a run whose descriptors did not
    come back, taken by the soak itself so that the report says what was held.
    """
    sockets: dict[str, str] = {}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as f:
            for line in itertools.islice(f, 1, None):
                cols = line.split()
                peer_hex = cols[2].split(":")[0]
                peer = (
                    ".".join(str(b) for b in reversed(bytes.fromhex(peer_hex)))
                    if len(peer_hex) == 8
                    else "v6"
                )
                sockets[cols[9]] = f"tcp {TCP_STATES.get(cols[3], cols[3])} {peer}"
    kinds: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                kind = sockets.get(target[8:-1], "socket (not tcp)")
            elif target.startswith("pipe:"):
                kind = "pipe"
            elif target.startswith("anon_inode:"):
                kind = target
            else:
                kind = "file"
            kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))


@contextlib.contextmanager
def traced_server_env(frames: int, workdir: Path) -> Iterator[Path | None]:
    """Environment for a server started inside: ``PYTHONTRACEMALLOC`` and the
    snapshot hook, if ``frames``; the directory its snapshots go to."""
    if not frames:
        yield None
        return
    hook_dir = workdir / "hook"
    snapshots = workdir / "snapshots"
    hook_dir.mkdir(exist_ok=True)
    snapshots.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(SNAPSHOT_HOOK)
    extra = {
        "PYTHONTRACEMALLOC": str(frames),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hook_dir), os.environ.get("PYTHONPATH")])),
        "SOAK_SNAPSHOT_DIR": str(snapshots),
    }
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield snapshots
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def take_snapshot(pid: int, snapshots: Path, n: int, timeout: float = 300.0) -> Path:
    """Signal the server's hook and wait for its ``n``-th snapshot file."""
    path = snapshots / f"snap-{n}.pickle"
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no tracemalloc snapshot {path} after {timeout}s")
        await asyncio.sleep(0.5)
    return path


def growth_sites(first: Path, last: Path, top: int = 15) -> dict[str, Any]:
    """Largest growth of live allocations between two snapshots: by line, and the
    tracebacks of the first few."""
    ignore = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
        tracemalloc.Filter(False, "<unknown>"),
    ]
    old = tracemalloc.Snapshot.load(str(first)).filter_traces(ignore)
    new = tracemalloc.Snapshot.load(str(last)).filter_traces(ignore)
    total_old = sum(st.size for st in old.statistics("filename"))
    total_new = sum(st.size for st in new.statistics("filename"))
    by_line = new.compare_to(old, "lineno")[:top]
    by_trace = new.compare_to(old, "traceback")[:5]
    return {
        "traced_kib": [round(total_old / 1024), round(total_new / 1024)],
        "by_line": [
            {
                "site": str(st.traceback[0]),
                "size_diff_kib": round(st.size_diff / 1024, 1),
                "size_kib": round(st.size / 1024, 1),
                "count_diff": st.count_diff,
            }
            for st in by_line
        ],
        "by_traceback": [
            {"size_diff_kib": round(st.size_diff / 1024, 1), "traceback": st.traceback.format()}
            for st in by_trace
        ],
    }


async def prefill(publisher: Publisher, count: int, lanes: int = 8) -> dict[int, int]:
    """Publish seqs 1..``count`` (``lanes`` at a time): with ``count`` = channels x
    history size, every ring is full before the clock starts."""
    seqs = iter(range(1, count + 1))
    statuses: dict[int, int] = {}

    async def lane() -> None:
        for seq in seqs:
            status = await publisher.publish(seq, 30.0)
            statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(lane() for _ in range(lanes)))
    return statuses


async def deliveries_settled(pool: SoakPool, timeout: float) -> int:
    """Until the subscribers' delivery count stops moving for a second (or the deadline)."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        now: int = sum(a["deliveries"] for a in await pool.all("sample", 30))
        if now == last:
            return now
        last = now
        await asyncio.sleep(1.0)
    return last


async def soak(s: Settings, workdir: Path, log: Any = print) -> Soak:
    """Run one soak and return its samples and verdict; every process is stopped."""
    capacity = worker_capacity() or load.MAX_SOCKETS_PER_PROCESS
    per_process = min(capacity, load.MAX_SOCKETS_PER_PROCESS)
    nworkers = s.workers or max(2, math.ceil(s.n / per_process))
    out = Soak(s)
    redis: ServerProc | None = None
    server: ServerProc | None = None
    pool: SoakPool | None = None
    publisher: SoakPublisher | None = None
    try:
        sdef = SERVERS["tidings"]
        if s.broker == "redis":
            redis_port = free_port(1)
            redis = ServerProc(REDIS, redis_port, workdir / "redis")
            await redis.wait_ready()
            sdef = tidings_scaled(1, redis_port)
        port = free_port(1)
        (workdir / "server").mkdir(exist_ok=True)
        with traced_server_env(s.tracemalloc, workdir) as snapshots:
            server = ServerProc(sdef, port, workdir / "server")
        await server.wait_ready(120.0 if s.tracemalloc else 20.0)  # tracing slows the start
        pid = server.proc.pid
        pool = SoakPool(nworkers)
        publisher = SoakPublisher(HOST, port, "/api/publish", body_for(s.channels))

        # Warm-up: one subscriber per (transport, channel 0), one publication,
        # close: first-use allocations are not what the soak looks for.
        warm = [(channel_specs(port, "soak-0", s.poll_timeout)[k].__dict__, 1) for k in KINDS]
        await pool.workers[0].call("open_plan", 30, plan=warm, ips=soak_ips(99), timeout=20)
        await publisher.publish(0)
        await pool.all("close", 10)
        await pool.all("reset", 10)
        # The warm-up's long-poll, half-closed, is held until its timeout: the
        # baseline is taken once no subscriber's socket is left.
        deadline = time.monotonic() + s.poll_timeout + 5.0
        while time.monotonic() < deadline and any(
            ".251." in kind for kind in held_descriptors(pid)
        ):
            await asyncio.sleep(0.2)
        baseline_fds = measure.open_files(pid)
        baseline_rss = server.rss_kib()
        baseline_held = held_descriptors(pid)
        log(f"server pid {pid} port {port}: baseline {baseline_fds} fds, {baseline_rss} KiB")

        plans = plan_for(s, port, nworkers)
        t0 = time.monotonic()
        opened = await pool.all(
            "open_plan",
            600,
            per=[{"plan": plans[i], "ips": soak_ips(i)} for i in range(nworkers)],
            timeout=540,
        )
        held = sum(a["ok"] for a in opened)
        failures = [a["failures"] for a in opened]
        log(f"opened {held}/{s.n} in {time.monotonic() - t0:.1f}s: {failures}")
        if held == 0:
            raise RuntimeError(f"no subscriber connected: {server.log_tail(400)}")
        out.result["opened"] = {"held": held, "seconds": round(time.monotonic() - t0, 1)}

        filled = s.channels * s.history_size if s.prefill else 0
        if filled:
            began = time.monotonic()
            statuses_prefill = await prefill(publisher, filled)
            delivered = await deliveries_settled(pool, 180.0)
            out.result["prefill"] = {
                "publications": filled,
                "statuses": statuses_prefill,
                "deliveries": delivered,
                "seconds": round(time.monotonic() - began, 1),
            }
            log(f"prefilled history: {out.result['prefill']}")
        warmup_s = s.warmup_s
        log(
            f"warm-up {warmup_s:.0f}s (history {s.history_size}/channel, "
            f"fill {s.history_fill_s:.0f}s at {s.publish_rate}/s, prefilled: {bool(filled)}, "
            f"poll timeout {s.poll_timeout}s)"
        )
        snaps: list[Path] = []
        if snapshots:
            snaps.append(await take_snapshot(pid, snapshots, 1))
            log("tracemalloc snapshot 1 at t=0")

        seq = itertools.count(filled + 1)
        published = 0
        inflight: set[asyncio.Task[int]] = set()
        statuses: dict[int, int] = {}

        def on_published(task: asyncio.Task[int]) -> None:
            nonlocal published
            inflight.discard(task)
            status = task.result() if not task.cancelled() and not task.exception() else 0
            statuses[status] = statuses.get(status, 0) + 1
            published += status == 200

        async def publishing() -> None:
            step = 1.0 / s.publish_rate
            nxt = time.monotonic()
            while True:
                nxt += step
                await asyncio.sleep(max(0.0, nxt - time.monotonic()))
                if not publisher.can_start():
                    publisher.skipped += 1
                    continue
                task = asyncio.ensure_future(publisher.publish(next(seq), 10.0))
                inflight.add(task)
                task.add_done_callback(on_published)

        stop_churn = asyncio.Event()
        churn_seconds: list[float] = []

        async def churning() -> None:
            """Stops between calls, never inside one: a call cancelled while its
            answer is in the pipe would hand that answer to the next call."""
            per_tick = s.churn / nworkers
            owed = 0.0
            nxt = time.monotonic()
            while not stop_churn.is_set():
                nxt += 1.0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop_churn.wait(), max(0.0, nxt - time.monotonic()))
                    return
                owed += per_tick
                k = int(owed)
                owed -= k
                if k:
                    began = time.monotonic()
                    await pool.all("churn", 30, k=k, timeout=20)
                    churn_seconds.append(time.monotonic() - began)

        writer = None
        csv_file = None
        if s.csv_path:
            csv_file = open(s.csv_path, "w", newline="")  # noqa: SIM115 - closed below
            writer = csv.writer(csv_file)
            writer.writerow(Sample.__dataclass_fields__.keys())
        start = time.monotonic()
        publish_task = asyncio.ensure_future(publishing())
        churn_task = asyncio.ensure_future(churning())
        try:
            while True:
                elapsed = time.monotonic() - start
                if not server.alive():
                    raise RuntimeError(f"server died: {server.log_tail(600)}")
                answers = await pool.all("sample", 30)
                churned = sum(a["churned"] for a in answers)
                smp = Sample(
                    t=round(elapsed, 1),
                    rss_kib=server.rss_kib(),
                    fds=measure.open_files(pid),
                    held=sum(a["ready"] for a in answers),
                    deliveries=sum(a["deliveries"] for a in answers),
                    published=published,
                    churned=churned,
                    lost_unexpected=sum(a["lost"] for a in answers) - churned,
                    cpu_s=round(server.cpu(), 1),
                )
                out.samples.append(smp)
                log(
                    f"t={smp.t:7.1f}s rss={smp.rss_kib / 1024:7.1f}MiB fds={smp.fds:6d} "
                    f"held={smp.held:6d} deliveries={smp.deliveries:9d} "
                    f"published={smp.published:6d} churned={smp.churned:6d} "
                    f"lost={smp.lost_unexpected} cpu={smp.cpu_s}s"
                )
                if writer and csv_file:
                    writer.writerow(smp.__dict__.values())
                    csv_file.flush()
                if snapshots and len(snaps) == 1 and elapsed >= warmup_s:
                    snaps.append(await take_snapshot(pid, snapshots, 2))
                    log(f"tracemalloc snapshot 2 at t={time.monotonic() - start:.0f}s")
                if elapsed >= s.duration:
                    break
                wake = min(start + len(out.samples) * s.sample, start + s.duration)
                await asyncio.sleep(max(0.0, wake - time.monotonic()))
        finally:
            publish_task.cancel()
            stop_churn.set()
            with contextlib.suppress(asyncio.CancelledError):
                await publish_task
            await churn_task
            if inflight:
                await asyncio.wait(inflight, timeout=15)
            if csv_file:
                csv_file.close()
        final = await pool.all("sample", 30)
        if snapshots and len(snaps) == 2:
            snaps.append(await take_snapshot(pid, snapshots, 3))
            out.result["tracemalloc"] = {
                "warmup": growth_sites(snaps[0], snaps[1]),
                "steady": growth_sites(snaps[1], snaps[2]),
            }
        publisher.close()
        await pool.all("close", 30)
        # A long-poll whose client closed (FIN) is held until its timeout: the
        # server answers what was asked before closing its half (eof_received).
        left = time.monotonic()
        target = baseline_fds + FD_AFTER_CLOSE
        out.result["after_close_held"] = {"0": held_descriptors(pid)}
        after_fds = await wait_fds(pid, target, s.poll_timeout + 15.0)
        out.result["after_close_seconds"] = round(time.monotonic() - left, 1)
        out.result["after_close_held"][str(out.result["after_close_seconds"])] = held_descriptors(
            pid
        )
        out.result["baseline_held"] = baseline_held
        out.result.update(
            verdict(s, out.samples, baseline_fds, baseline_rss, after_fds, held, final)
        )
        out.result["publish"] = {
            "statuses": statuses,
            "skipped": publisher.skipped,
            "errors": publisher.errors,
        }
        out.result["churn_call_seconds"] = {
            "median": round(statistics.median(churn_seconds), 3) if churn_seconds else None,
            "max": round(max(churn_seconds), 3) if churn_seconds else None,
        }
        out.result["server_log_tail"] = server.log_tail(2000)
        return out
    finally:
        if publisher:
            publisher.close()
        if pool:
            pool.close()
        if server:
            server.stop()
        if redis:
            redis.stop()


def verdict(
    s: Settings,
    samples: list[Sample],
    baseline_fds: int,
    baseline_rss: int,
    after_fds: int,
    held: int,
    final: list[dict[str, Any]],
) -> dict[str, Any]:
    """RSS band and slope after the warm-up; descriptors while held and after."""
    steady = steady_samples(samples, s.warmup_s)
    st = rss_steady(steady)
    median, worst, slope, drift = (
        st["median"],
        st["worst"],
        st["slope_kib_per_hour"],
        st["drift"],
    )
    fd_excess = [x.fds - baseline_fds - x.held for x in steady]
    fds_slope = slope_per_hour([(x.t, float(x.fds - x.held)) for x in steady])
    errors: dict[str, int] = {}
    churn_failures: dict[str, int] = {}
    for a in final:
        for k, v in a["errors"].items():
            errors[k] = errors.get(k, 0) + v
        for k, v in a["churn_failures"].items():
            churn_failures[k] = churn_failures.get(k, 0) + v
    return {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in s.__dict__.items()},
        "baseline": {"fds": baseline_fds, "rss_kib": baseline_rss},
        "held_at_open": held,
        "warmup": {
            "seconds": s.warmup_s,
            "history_size": s.history_size,
            "history_fill_s": s.history_fill_s,
            "prefilled": s.prefill,
        },
        "steady": {
            "from_s": steady[0].t if steady else None,
            "rss_median_kib": median,
            "rss_min_kib": st["min"],
            "rss_max_kib": st["max"],
            "rss_worst_deviation": round(worst, 4),
            "rss_slope_kib_per_hour": round(slope, 1),
            "rss_slope_percent_per_hour": round(100 * slope / median, 2),
            "rss_drift_over_window": round(drift, 4),
            "fd_excess_max": max(fd_excess),
            "fd_excess_min": min(fd_excess),
            "fd_excess_allowed": fd_slack(s),
            "fd_minus_held_slope_per_hour": round(fds_slope, 1),
        },
        "after_close_fds": after_fds,
        "client_errors": errors,
        "churn_failures": churn_failures,
        "ok": {
            "rss_within_band": worst <= RSS_BAND,
            "rss_slope_flat": drift <= RSS_BAND / 2,
            "fds_while_held": max(fd_excess) <= fd_slack(s),
            "fds_after_close": after_fds <= baseline_fds + FD_AFTER_CLOSE,
        },
    }


def fd_slack(s: Settings) -> int:
    """Descriptors above baseline + held that are not a leak (see ``FD_SLACK``)."""
    return FD_SLACK + math.ceil(s.churn)


def steady_samples(samples: Sequence[Sample], warmup_s: float) -> list[Sample]:
    """The samples after the warm-up (all of them if the run ended inside it)."""
    return [x for x in samples if x.t >= warmup_s] or list(samples)


def rss_steady(steady: Sequence[Sample]) -> dict[str, float]:
    """RSS median, band deviation, slope and drift over the steady window.

    ``drift`` is how far the least-squares line moves over the window, as a
    fraction of the median: at most half the band means the same trend, run
    as long again, would still stay within the band.
    """
    rss = [x.rss_kib for x in steady]
    median = statistics.median(rss)
    slope = slope_per_hour([(x.t, float(x.rss_kib)) for x in steady])
    window_h = (steady[-1].t - steady[0].t) / 3600.0
    return {
        "median": median,
        "min": min(rss),
        "max": max(rss),
        "worst": max(abs(r - median) / median for r in rss),
        "slope_kib_per_hour": slope,
        "drift": abs(slope) * window_h / median,
    }


def table(out: Soak) -> str:
    r = out.result
    st = r["steady"]
    last = out.samples[-1]
    rows = [
        ("connections held (open / end)", f"{r['held_at_open']} / {last.held}"),
        ("churned (reopened)", f"{last.churned}"),
        ("unexpected disconnects", f"{last.lost_unexpected}"),
        ("published (HTTP 200)", f"{last.published}"),
        ("deliveries received", f"{last.deliveries}"),
        (
            "baseline RSS / fds",
            f"{r['baseline']['rss_kib'] / 1024:.1f} MiB / {r['baseline']['fds']}",
        ),
        (
            f"RSS after warm-up (t >= {st['from_s']} s) min / median / max",
            f"{st['rss_min_kib'] / 1024:.1f} / {st['rss_median_kib'] / 1024:.1f} / "
            f"{st['rss_max_kib'] / 1024:.1f} MiB",
        ),
        ("RSS worst deviation from median", f"{100 * st['rss_worst_deviation']:.2f} %"),
        (
            "RSS slope after warm-up (drift over window)",
            f"{st['rss_slope_kib_per_hour']:.0f} KiB/h ({st['rss_slope_percent_per_hour']} %/h; "
            f"{100 * st['rss_drift_over_window']:.2f} %)",
        ),
        (
            "warm-up",
            f"{r['warmup']['seconds']:.0f} s (history {r['warmup']['history_size']}/channel, "
            f"fill {r['warmup']['history_fill_s']:.0f} s, prefilled: {r['warmup']['prefilled']})",
        ),
        ("fds - baseline - held (min..max)", f"{st['fd_excess_min']}..{st['fd_excess_max']}"),
        (
            "fds after every client left",
            f"{r['after_close_fds']} (baseline {r['baseline']['fds']}) "
            f"after {r['after_close_seconds']} s",
        ),
        ("server CPU", f"{last.cpu_s} s over {last.t} s"),
        ("verdict", ", ".join(f"{k}: {'ok' if v else 'FAIL'}" for k, v in r["ok"].items())),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k.ljust(width)} | {v} |" for k, v in rows)


def png(samples: Sequence[Sample], warmup_s: float, title: str, path: Path) -> None:
    """RSS (MiB, left) and descriptors minus held connections (right) over time,
    with the warm-up shaded and the ±5 % band around the steady median."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [x.t for x in samples]
    rss = [x.rss_kib / 1024 for x in samples]
    steady = steady_samples(samples, warmup_s)
    median = statistics.median(x.rss_kib for x in steady) / 1024
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=100)
    ax.axvspan(0, min(warmup_s, ts[-1]), color="#eeeeee", label="warm-up")
    ax.axhspan(
        median * (1 - RSS_BAND),
        median * (1 + RSS_BAND),
        color="#1f77b4",
        alpha=0.12,
        label=f"±{100 * RSS_BAND:.0f} % of steady median",
    )
    ax.plot(ts, rss, color="#1f77b4", linewidth=2, label="server RSS")
    ax.set_ylim(0, max(rss) * 1.15)
    ax.set_xlabel("seconds")
    ax.set_ylabel("server RSS (MiB)", color="#1f77b4")
    right = ax.twinx()
    right.plot(
        ts,
        [x.fds - x.held for x in samples],
        color="#d62728",
        linewidth=1,
        label="fds − held connections",
    )
    right.set_ylabel("descriptors − held connections", color="#d62728")
    extra = [x.fds - x.held for x in samples]
    right.set_ylim(min(0, min(extra)) * 1.5, max(extra) * 1.5 + 1)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=10_000, help="connections held (default 10,000)")
    p.add_argument("--split", default="1,1,1", help="sse,ws,poll weights (default 1,1,1)")
    p.add_argument("--channels", type=int, default=100)
    p.add_argument("--churn", type=float, default=50.0, help="reconnects per second (default 50)")
    p.add_argument("--publish-rate", type=float, default=20.0, help="per second (default 20)")
    p.add_argument("--duration", type=float, default=1800.0, help="seconds (default 1800)")
    p.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds left out of the RSS verdict (default: until history is full, "
        "plus one long-poll timeout)",
    )
    p.add_argument(
        "--prefill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fill every channel's history before the clock starts (default on)",
    )
    p.add_argument("--workers", type=int, default=0, help="load processes (0: automatic)")
    p.add_argument("--broker", choices=("memory", "redis"), default="memory")
    p.add_argument("--poll-timeout", type=int, default=30, help="long-poll hold, seconds")
    p.add_argument(
        "--tracemalloc",
        type=int,
        default=0,
        metavar="FRAMES",
        help="trace the server's allocations; report growth from warm-up to end",
    )
    p.add_argument("--json", type=Path)
    p.add_argument("--csv", type=Path)
    p.add_argument("--png", type=Path, help="RSS and fds chart (needs matplotlib)")
    p.add_argument("--from-csv", type=Path, help="read this --csv (e.g. a run still going)")
    a = p.parse_args(argv)
    weights = tuple(float(x) for x in a.split.split(","))
    if len(weights) != 3 or sum(weights) <= 0:
        p.error("--split takes three weights: sse,ws,poll")
    s = Settings(
        n=a.n,
        split=(weights[0], weights[1], weights[2]),
        channels=a.channels,
        churn=a.churn,
        publish_rate=a.publish_rate,
        duration=a.duration,
        sample=a.sample,
        warmup=a.warmup,
        prefill=a.prefill,
        workers=a.workers,
        broker=a.broker,
        poll_timeout=a.poll_timeout,
        csv_path=a.csv,
        tracemalloc=a.tracemalloc,
    )
    return s, a


def samples_from_csv(path: Path) -> list[Sample]:
    """The samples a run wrote so far (``--csv``), e.g. of a run still going."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        Sample(
            t=float(r["t"]),
            rss_kib=int(r["rss_kib"]),
            fds=int(r["fds"]),
            held=int(r["held"]),
            deliveries=int(r["deliveries"]),
            published=int(r["published"]),
            churned=int(r["churned"]),
            lost_unexpected=int(r["lost_unexpected"]),
            cpu_s=float(r["cpu_s"]),
        )
        for r in rows
    ]


def main(argv: list[str] | None = None) -> int:
    s, a = parse_args(argv)
    if a.from_csv:  # only read a CSV already written (same settings as its run)
        samples = samples_from_csv(a.from_csv)
        if a.png:
            png(samples, s.warmup_s, f"tidings soak: N={s.n}, {samples[-1].t:.0f} s", a.png)
        steady = steady_samples(samples, s.warmup_s)
        st = rss_steady(steady)
        med = st["median"]
        print(
            f"{len(samples)} samples to t={samples[-1].t}s; after t={steady[0].t}s: RSS "
            f"{st['min'] / 1024:.1f}..{st['max'] / 1024:.1f} MiB, median {med / 1024:.1f}, "
            f"worst {100 * st['worst']:.2f} %, slope {st['slope_kib_per_hour']:.0f} KiB/h "
            f"({100 * st['slope_kib_per_hour'] / med:.2f} %/h, drift {100 * st['drift']:.2f} %); "
            f"fds - held {min(x.fds - x.held for x in steady)}.."
            f"{max(x.fds - x.held for x in steady)}"
        )
        return 0
    with tempfile.TemporaryDirectory(prefix="tidings-soak-") as tmp:
        out = asyncio.run(soak(s, Path(tmp), log=lambda m: print(m, flush=True)))
    print(table(out))
    for phase, diff in out.result.get("tracemalloc", {}).items():
        print(f"tracemalloc, {phase}: traced KiB {diff['traced_kib']}")
        for site in diff["by_line"]:
            print(f"  {site['size_diff_kib']:+9.1f} KiB {site['count_diff']:+7d}  {site['site']}")
    if a.json:
        a.json.write_text(
            json.dumps({**out.result, "samples": [x.__dict__ for x in out.samples]}, indent=1)
        )
    if a.png:
        png(out.samples, s.warmup_s, f"tidings soak: N={s.n}, {s.duration:.0f} s", a.png)
    return 0 if all(out.result["ok"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
