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

At the end every client leaves and the server's descriptors must come back to
the baseline taken before the first subscriber. The verdict: after the warm-up
(the first ``--warmup`` fraction of the run) RSS stays within ±5 % of its
median there and its least-squares slope is reported; descriptors while held
stay at baseline + held connections (+ a small slack for the publisher's
keep-alive connections and refusals in flight); after the clients leave,
descriptors return to within ``FD_SLACK`` of the baseline.

Output: a table on stdout, ``--json`` (everything), ``--csv`` (one row per
sample, written as the run goes so that an interrupted run keeps its figures)
and ``--svg`` (RSS and descriptors over time; matplotlib is not installed
here, and an SVG polyline needs no library).
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
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load
import measure
from run import Pool, Publisher, ServerProc, WorkerHandle, free_port, worker_capacity
from servers import CENTRIFUGE_SUBSCRIBE, HOST, REDIS, SERVERS, tidings_scaled

KINDS = ("sse", "ws", "poll")
FD_SLACK = 40  # publisher keep-alives (16), churn handshakes in flight, the broker link
RSS_BAND = 0.05  # ± around the post-warm-up median


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
    warmup: float = 0.2
    workers: int = 0  # 0: as many as the descriptor limit asks, at least 2
    broker: str = "memory"
    poll_timeout: int = 30
    csv_path: Path | None = None


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


async def soak(s: Settings, workdir: Path, log: Any = print) -> Soak:
    """Run one soak and return its samples and verdict; every process is stopped."""
    capacity = worker_capacity() or load.MAX_SOCKETS_PER_PROCESS
    per_process = min(capacity, load.MAX_SOCKETS_PER_PROCESS)
    nworkers = s.workers or max(2, math.ceil(s.n / per_process))
    out = Soak(s)
    redis: ServerProc | None = None
    server: ServerProc | None = None
    pool: SoakPool | None = None
    publisher: Publisher | None = None
    try:
        sdef = SERVERS["tidings"]
        if s.broker == "redis":
            redis_port = free_port(1)
            redis = ServerProc(REDIS, redis_port, workdir / "redis")
            await redis.wait_ready()
            sdef = tidings_scaled(1, redis_port)
        port = free_port(1)
        (workdir / "server").mkdir(exist_ok=True)
        server = ServerProc(sdef, port, workdir / "server")
        await server.wait_ready()
        pid = server.proc.pid
        pool = SoakPool(nworkers)
        publisher = Publisher(HOST, port, "/api/publish", body_for(s.channels))

        # Warm-up: one subscriber per (transport, channel 0), one publication,
        # close: first-use allocations are not what the soak looks for.
        warm = [(channel_specs(port, "soak-0")[k].__dict__, 1) for k in KINDS]
        await pool.workers[0].call("open_plan", 30, plan=warm, ips=soak_ips(99), timeout=20)
        await publisher.publish(0)
        await pool.all("close", 10)
        await pool.all("reset", 10)
        baseline_fds = await wait_fds(pid, 0, 1.0)
        with contextlib.suppress(TimeoutError):
            baseline_fds = await wait_fds(pid, baseline_fds - 1, 2.0)
        baseline_rss = server.rss_kib()
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

        seq = itertools.count(1)
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
        publisher.close()
        await pool.all("close", 30)
        # A long-poll whose client closed (FIN) is held until its timeout: the
        # server answers what was asked before closing its half (eof_received).
        left = time.monotonic()
        after_fds = await wait_fds(pid, baseline_fds + FD_SLACK // 8, s.poll_timeout + 15.0)
        out.result["after_close_seconds"] = round(time.monotonic() - left, 1)
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
    end = samples[-1].t if samples else 0.0
    steady = [x for x in samples if x.t >= s.warmup * end] or samples
    rss = [x.rss_kib for x in steady]
    median = statistics.median(rss)
    worst = max(abs(r - median) / median for r in rss)
    slope = slope_per_hour([(x.t, float(x.rss_kib)) for x in steady])
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
        "steady": {
            "from_s": steady[0].t if steady else None,
            "rss_median_kib": median,
            "rss_min_kib": min(rss),
            "rss_max_kib": max(rss),
            "rss_worst_deviation": round(worst, 4),
            "rss_slope_kib_per_hour": round(slope, 1),
            "rss_slope_percent_per_hour": round(100 * slope / median, 2),
            "fd_excess_max": max(fd_excess),
            "fd_excess_min": min(fd_excess),
            "fd_minus_held_slope_per_hour": round(fds_slope, 1),
        },
        "after_close_fds": after_fds,
        "client_errors": errors,
        "churn_failures": churn_failures,
        "ok": {
            "rss_within_band": worst <= RSS_BAND,
            "fds_while_held": max(fd_excess) <= FD_SLACK,
            "fds_after_close": after_fds <= baseline_fds + FD_SLACK // 8,
        },
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
            "RSS slope after warm-up",
            f"{st['rss_slope_kib_per_hour']:.0f} KiB/h ({st['rss_slope_percent_per_hour']} %/h)",
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


def svg(samples: Sequence[Sample], title: str) -> str:
    """RSS (MiB, left) and fds - held (right) over time, as two polylines."""
    w, h, pad = 760, 320, 50
    tmax = max(x.t for x in samples) or 1.0
    rss = [x.rss_kib / 1024 for x in samples]
    lo, hi = 0.0, max(rss) * 1.1
    extra = [x.fds - x.held for x in samples]
    elo, ehi = min(0, min(extra)), max(extra) * 1.2 + 1

    def px(t: float) -> float:
        return pad + (w - 2 * pad) * t / tmax

    def py(v: float, a: float, b: float) -> float:
        return h - pad - (h - 2 * pad) * (v - a) / (b - a)

    rss_pts = " ".join(
        f"{px(x.t):.1f},{py(r, lo, hi):.1f}" for x, r in zip(samples, rss, strict=True)
    )
    fd_pts = " ".join(
        f"{px(x.t):.1f},{py(e, elo, ehi):.1f}" for x, e in zip(samples, extra, strict=True)
    )
    ticks = "".join(
        f'<text x="{pad - 6}" y="{py(v, lo, hi) + 4:.1f}" text-anchor="end">{v:.0f}</text>'
        f'<line x1="{pad}" x2="{w - pad}" y1="{py(v, lo, hi):.1f}" y2="{py(v, lo, hi):.1f}" '
        'stroke="#ddd"/>'
        for v in (hi * k / 5 for k in range(6))
    )
    tticks = "".join(
        f'<text x="{px(t):.1f}" y="{h - pad + 16}" text-anchor="middle">{t:.0f}</text>'
        for t in (tmax * k / 6 for k in range(7))
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        'font-family="sans-serif" font-size="11">'
        f'<rect width="{w}" height="{h}" fill="white"/>{ticks}{tticks}'
        f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="13">{title}</text>'
        f'<text x="{w / 2}" y="{h - 10}" text-anchor="middle">seconds</text>'
        f'<text x="12" y="{h / 2}" transform="rotate(-90 12 {h / 2})" text-anchor="middle" '
        'fill="#1f77b4">server RSS (MiB)</text>'
        f'<text x="{w - 12}" y="{h / 2}" transform="rotate(90 {w - 12} {h / 2})" '
        f'text-anchor="middle" fill="#d62728">fds - held ({elo:.0f}..{ehi:.0f})</text>'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{rss_pts}"/>'
        f'<polyline fill="none" stroke="#d62728" stroke-width="1" points="{fd_pts}"/>'
        "</svg>\n"
    )


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=10_000, help="connections held (default 10,000)")
    p.add_argument("--split", default="1,1,1", help="sse,ws,poll weights (default 1,1,1)")
    p.add_argument("--channels", type=int, default=100)
    p.add_argument("--churn", type=float, default=50.0, help="reconnects per second (default 50)")
    p.add_argument("--publish-rate", type=float, default=20.0, help="per second (default 20)")
    p.add_argument("--duration", type=float, default=1800.0, help="seconds (default 1800)")
    p.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=0.2, help="fraction left out of the verdict")
    p.add_argument("--workers", type=int, default=0, help="load processes (0: automatic)")
    p.add_argument("--broker", choices=("memory", "redis"), default="memory")
    p.add_argument("--poll-timeout", type=int, default=30, help="long-poll hold, seconds")
    p.add_argument("--json", type=Path)
    p.add_argument("--csv", type=Path)
    p.add_argument("--svg", type=Path)
    p.add_argument("--svg-from", type=Path, help="draw --svg from this --csv, run nothing")
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
        workers=a.workers,
        broker=a.broker,
        poll_timeout=a.poll_timeout,
        csv_path=a.csv,
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
    if a.svg_from:  # only draw a CSV already written
        samples = samples_from_csv(a.svg_from)
        if a.svg:
            a.svg.write_text(svg(samples, f"tidings soak: N={s.n}, {samples[-1].t:.0f} s"))
        steady = [x for x in samples if x.t >= s.warmup * samples[-1].t]
        rss = [x.rss_kib for x in steady]
        med = statistics.median(rss)
        slope = slope_per_hour([(x.t, float(x.rss_kib)) for x in steady])
        print(
            f"{len(samples)} samples to t={samples[-1].t}s; after t={steady[0].t}s: RSS "
            f"{min(rss) / 1024:.1f}..{max(rss) / 1024:.1f} MiB, median {med / 1024:.1f}, "
            f"worst {100 * max(abs(r - med) / med for r in rss):.2f} %, slope {slope:.0f} KiB/h "
            f"({100 * slope / med:.2f} %/h); fds - held "
            f"{min(x.fds - x.held for x in steady)}..{max(x.fds - x.held for x in steady)}"
        )
        return 0
    with tempfile.TemporaryDirectory(prefix="tidings-soak-") as tmp:
        out = asyncio.run(soak(s, Path(tmp), log=lambda m: print(m, flush=True)))
    print(table(out))
    if a.json:
        a.json.write_text(
            json.dumps({**out.result, "samples": [x.__dict__ for x in out.samples]}, indent=1)
        )
    if a.svg:
        a.svg.write_text(svg(out.samples, f"tidings soak: N={s.n}, {s.duration:.0f} s"))
    return 0 if all(out.result["ok"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
