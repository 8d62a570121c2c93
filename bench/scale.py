"""The scale scenario: ``bench/run.py --scale --n 1000000`` (issue 16, item 6).

N concurrent subscribers, SSE and WebSocket half each (``--transports``), held
by ``tidings serve --workers W`` with a Redis broker, the load generator on the
same machine; then K broadcasts that every subscriber must receive.

Why it is shaped like this:

* **Processes.** A process may hold 20,000 open files here (a hard limit), and
  every connection is one file at each end, so both sides are spread over
  processes: W tidings workers on one port (``SO_REUSEPORT``) and P load
  processes of ``load.MAX_SOCKETS_PER_PROCESS`` sockets at most. ``SO_REUSEPORT``
  spreads by a hash of the 4-tuple, so W keeps one spare worker for the skew.
* **Source addresses.** A (source address, destination) pair has as many
  connections as the ephemeral port range has ports, so each load process binds
  to its own few loopback addresses (127.a.b.c), enough for half the range.
* **Kernel limits first.** ``kernel_limits`` reads every limit the run depends
  on, says which would stop it at this N, and (as root) raises the ones that
  would, putting them back at the end.
* **Steps.** Subscribers are connected in steps (``--step``); after each one the
  memory of every party is sampled, so a run that cannot hold N still says how
  far it got, which resource ran out first, and what each connection cost.
* **A memory guard** stops connecting at 85 % of RAM in use (never swap, never
  the OOM killer on a shared machine) and ends the run at 92 %.
* **Every phase is bounded in time**: each step, each broadcast, the whole run
  (the SIGALRM watchdog of ``run.py``).

The load processes are ``load.Worker`` with a connect loop of their own
(``ScaleClient``): ``concurrency`` lanes pulling from one queue instead of one
task per connection, a ``SIGUSR1`` that stops connecting, and a slower poll
while waiting for a broadcast (53 processes polling at 500 Hz are a core's
tenth on this machine).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import json
import math
import os
import resource
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import load
import measure
import report
import run as bench
from servers import HOST, REDIS, SERVERS, ServerDef

#: Stop connecting once this fraction of RAM is in use (``--memory-guard``); end the
#: run at ``MEMORY_ABORT`` above it.
MEMORY_GUARD = 0.85
MEMORY_ABORT = 0.07
#: A worker's own files (listener, Redis, epoll, log, pipes) and SO_REUSEPORT's skew.
FILE_MARGIN = 500
#: Per-connection costs used only to predict, before the run, whether N fits in
#: memory (measured at N = 100,000-200,000 here; the run measures its own).
EST_KERNEL_B = 10_500  # slab, both ends of one loopback connection
EST_SERVER_B = 1_800  # tidings worker RSS per subscriber (SSE 1.4 KiB, WebSocket 2.1 KiB)
EST_CLIENT_B = 1_200  # load process RSS per connection
EST_WORKER_BASE_B = 45 << 20
EST_CLIENT_BASE_B = 30 << 20
#: Bytes of TCP buffer one subscriber's socket may hold while a broadcast is in flight
#: (one small skb on loopback); ``net.ipv4.tcp_mem`` is compared against N times this.
#: Measured peak: 13,592 pages for 168,933 subscribers (330 B each), so 3x that.
EST_TCP_BUFFER_B = 1_024
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclasses.dataclass
class Options:
    """Sizes and bounds of one scale run (from the command line)."""

    n: int
    transports: list[str]
    workers: int
    clients: int
    step: int
    broadcasts: int
    gap: float = 1.0  # lets 2 cores drain one broadcast's socket work before the next
    settle: float = 5.0
    concurrency: int = 100  # handshakes in flight per load process
    keepalive: float = 300.0  # SSE heartbeat and WebSocket ping interval, seconds
    raise_limits: bool = True
    priority: int | None = None  # autogroup nice of the run's sessions (root), see set_priority
    memory_guard: float = MEMORY_GUARD

    @property
    def connect_budget(self) -> float:
        """All steps together: at least 700 connections/s (measured 500-800/s on the 2
        cores shared with other work; 2,600/s when the machine was quiet)."""
        return 60 + self.n / 700

    @property
    def drain_timeout(self) -> float:
        """One broadcast, publish to last delivery: 1 s per 20,000 subscribers, plus 20 s."""
        return 20 + self.n / 20_000

    @property
    def budget(self) -> float:
        """The whole run, for the watchdog."""
        start = 120 + 2 * self.workers  # Redis, W workers importing, warm-up
        fan = self.broadcasts * (self.drain_timeout + self.gap + 5)
        return start + self.connect_budget + self.settle + fan + 120


# --------------------------------------------------------------------------- kernel limits


def sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctl(name: str) -> list[int] | None:
    try:
        return [int(x) for x in sysctl_path(name).read_text().split()]
    except (OSError, ValueError):
        return None


def meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in KiB."""
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0])
    return out


def sockstat_tcp() -> dict[str, int]:
    """The ``TCP:`` line of ``/proc/net/sockstat``: inuse, orphan, tw, alloc, mem (pages)."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()[1:]
                return {parts[i]: int(parts[i + 1]) for i in range(0, len(parts), 2)}
    return {}


def slab_caches() -> dict[str, int]:
    """Bytes in use in each slab cache (``/proc/slabinfo``, root only; empty otherwise).

    Active objects, not the slabs' pages: a cache keeps the free objects of
    sockets closed earlier (by this run's warm-up, by other programs), and new
    sockets reuse them before new pages are taken, so at small N the ``Slab``
    delta of ``/proc/meminfo`` undercounts and the objects' delta does not.
    """
    out: dict[str, int] = {}
    try:
        with open("/proc/slabinfo") as f:
            for line in f:
                if line.startswith(("slabinfo", "#")):
                    continue
                fields = line.split()
                out[fields[0]] = int(fields[1]) * int(fields[3])  # active_objs x objsize
    except OSError:
        pass
    return out


@dataclasses.dataclass
class Limit:
    """One kernel or process limit: what it is, what this run needs, and the verdict."""

    name: str
    value: str
    need: str
    ok: bool
    note: str = ""
    raised_from: str | None = None


class Limits:
    """The checks of ``kernel_limits`` and the sysctls raised for the run (restored after)."""

    def __init__(self) -> None:
        self.rows: list[Limit] = []
        self.raised: list[tuple[str, list[int]]] = []

    def try_raise(self, name: str, want: list[int]) -> list[int] | None:
        """Write ``want`` to the sysctl if allowed; the old value on success, else None."""
        old = read_sysctl(name)
        if old is None:
            return None
        try:
            sysctl_path(name).write_text(" ".join(str(v) for v in want))
        except OSError:
            return None
        self.raised.append((name, old))
        return old

    def restore(self) -> None:
        for name, old in reversed(self.raised):
            with contextlib.suppress(OSError):
                sysctl_path(name).write_text(" ".join(str(v) for v in old))
        self.raised.clear()

    def check(
        self, name: str, value: list[int] | None, need: int, index: int, opts: Options, note: str
    ) -> None:
        """Compare ``value[index]`` with ``need``; raise the sysctl if short and allowed."""
        if value is None:
            self.rows.append(Limit(name, "unreadable", f">= {need:,}", True, note))
            return
        shown = " ".join(f"{v:,}" for v in value)
        if value[index] >= need:
            self.rows.append(Limit(name, shown, f">= {need:,}", True, note))
            return
        want = list(value)
        want[index] = need
        for i in range(index + 1, len(want)):  # tcp_mem's thresholds stay ordered
            want[i] = max(want[i], want[i - 1])
        old = self.try_raise(name, want) if opts.raise_limits else None
        if old is not None:
            self.rows.append(
                Limit(name, " ".join(f"{v:,}" for v in want), f">= {need:,}", True, note, shown)
            )
        else:
            self.rows.append(Limit(name, shown, f">= {need:,}", False, note + " (not raised)"))

    def blocking(self) -> list[Limit]:
        return [r for r in self.rows if not r.ok]


def port_span() -> int:
    lo, hi = read_sysctl("net.ipv4.ip_local_port_range") or [32768, 60999]
    return hi - lo + 1


def ips_per_client(per_client: int) -> int:
    """Source addresses per load process: its connections over half the port range.

    With ``IP_BIND_ADDRESS_NO_PORT`` the port is picked at connect() for the full
    4-tuple; the kernel's search for a free one slows as the range fills, hence half.
    """
    return max(2, math.ceil(per_client / (port_span() / 2)))


def kernel_limits(opts: Options) -> Limits:
    """Every limit the run depends on, with what N needs of it (raised where allowed)."""
    n = opts.n
    lim = Limits()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    per_worker = math.ceil(n / max(1, opts.workers - 1)) if opts.workers > 1 else n
    per_client = math.ceil(n / opts.clients)
    lim.rows.append(
        Limit(
            "RLIMIT_NOFILE (hard)",
            f"{hard:,}" if hard != resource.RLIM_INFINITY else "unlimited",
            f">= {max(per_worker, per_client) + FILE_MARGIN:,} per process",
            hard == resource.RLIM_INFINITY or hard >= max(per_worker, per_client) + FILE_MARGIN,
            f"sets the processes: {opts.workers} workers, {opts.clients} load processes "
            f"(soft {soft:,}, raised to hard here)",
        )
    )
    nr_open = read_sysctl("fs.nr_open")
    lim.rows.append(
        Limit(
            "fs.nr_open",
            f"{nr_open[0]:,}" if nr_open else "unreadable",
            "-",
            True,
            "ceiling of any RLIMIT_NOFILE (the hard limit above is the one in force)",
        )
    )
    file_nr = read_sysctl("fs.file-nr") or [0]
    lim.check(
        "fs.file-max",
        read_sysctl("fs.file-max"),
        file_nr[0] + 2 * n + 20_000,
        0,
        opts,
        f"open files machine-wide: {file_nr[0]:,} now + 2 per connection (both ends)",
    )
    lim.check(
        "net.ipv4.tcp_mem",
        read_sysctl("net.ipv4.tcp_mem"),
        math.ceil(n * EST_TCP_BUFFER_B / PAGE),
        1,
        opts,
        f"pages; pressure threshold vs one queued message per subscriber "
        f"(~{EST_TCP_BUFFER_B} B) during a broadcast",
    )
    backlog = math.ceil(opts.concurrency * opts.clients / max(1, opts.workers)) * 4
    for name in ("net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog"):
        lim.check(
            name,
            read_sysctl(name),
            min(backlog, 4096),
            0,
            opts,
            f"handshakes in flight per listener ({opts.concurrency} x {opts.clients} "
            f"load processes / {opts.workers} workers, x4 for the skew)",
        )
    span = port_span()
    k = ips_per_client(per_client)
    lim.rows.append(
        Limit(
            "net.ipv4.ip_local_port_range",
            " ".join(str(v) for v in read_sysctl("net.ipv4.ip_local_port_range") or []),
            f">= {per_client / k:,.0f} ports per source address",
            span >= per_client / k,
            f"{span:,} ports per (source address, destination); "
            f"{k} addresses x {opts.clients} load processes",
        )
    )
    ct_count = read_sysctl("net.netfilter.nf_conntrack_count")
    ct_max = read_sysctl("net.netfilter.nf_conntrack_max")
    if ct_count is not None and ct_max is not None:
        tracking = ct_count[0] > 0
        lim.rows.append(
            Limit(
                "net.netfilter.nf_conntrack_max",
                f"{ct_max[0]:,} (tracking {ct_count[0]:,} now)",
                f">= {n:,}" if tracking else "- (nothing tracked: no rules)",
                not tracking or ct_max[0] >= n + ct_count[0],
                "a conntrack table counts every connection when netfilter rules are loaded",
            )
        )
    mem = meminfo()
    total_b, avail_b = mem["MemTotal"] * 1024, mem["MemAvailable"] * 1024
    usable = opts.memory_guard * total_b - (total_b - avail_b)
    fixed = opts.workers * EST_WORKER_BASE_B + opts.clients * EST_CLIENT_BASE_B
    per_conn = EST_KERNEL_B + EST_SERVER_B + EST_CLIENT_B
    need = fixed + n * per_conn
    fits = max(0, int((usable - fixed) / per_conn))
    lim.rows.append(
        Limit(
            "memory (MemAvailable)",
            f"{avail_b / 2**30:.1f} of {total_b / 2**30:.1f} GiB",
            f"~{need / 2**30:.1f} GiB",
            need <= usable,
            f"guard at {opts.memory_guard:.0%} in use leaves {usable / 2**30:.1f} GiB: ~{fits:,} "
            f"connections at ~{per_conn:,} B each (kernel {EST_KERNEL_B:,}, server "
            f"{EST_SERVER_B:,}, client {EST_CLIENT_B:,}) + processes",
        )
    )
    return lim


# --------------------------------------------------------------------------- load processes


def failure_key(e: BaseException) -> str:
    """A failure's resource-revealing name: the errno's symbol where there is one."""
    if isinstance(e, OSError) and e.errno in errno.errorcode:
        return errno.errorcode[e.errno]
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, ConnectionError):
        return str(e)[:60]  # "status 503", "closed before ready: ..."
    return type(e).__name__


class ScaleClient(load.Worker):
    """A load process of the scale run (see the module docstring for what differs)."""

    def __init__(self, conn: Any, index: int) -> None:
        super().__init__(conn, index)
        self.halted = False
        self.settled: asyncio.Future[None] | None = None  # one done future for every proto

    async def open(
        self,
        kinds: list[tuple[dict[str, Any], int]],
        ips: list[str],
        concurrency: int,
        timeout: float,
    ) -> dict[str, Any]:
        """Open ``n`` subscribers of each spec, interleaved, ``concurrency`` at a time."""
        self.halted = False
        loop = asyncio.get_running_loop()
        if self.settled is None:
            self.settled = loop.create_future()
            self.settled.set_result(None)
        deadline = time.monotonic() + timeout
        specs = [load.Spec(**d) for d, _ in kinds]
        counts = [n for _, n in kinds]
        jobs: list[int] = []  # spec indexes, interleaved so every kind fills at the same pace
        while any(counts):
            for i, c in enumerate(counts):
                if c:
                    jobs.append(i)
                    counts[i] -= 1
        ok = [0] * len(specs)
        failures: dict[str, int] = {}
        queue = iter(enumerate(jobs))

        async def one(i: int, spec: load.Spec) -> bool:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_IP, load.IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((ips[i % len(ips)], 0))
                await asyncio.wait_for(
                    loop.sock_connect(sock, (spec.host, spec.port)), deadline - time.monotonic()
                )
            except (OSError, TimeoutError) as e:
                sock.close()
                key = failure_key(e)
                failures[key] = failures.get(key, 0) + 1
                return False
            fut: asyncio.Future[None] = loop.create_future()
            proto = load.PROTOCOLS[spec.kind](spec, fut)
            try:
                tr, _ = await loop.create_connection(lambda: proto, sock=sock)
                self.transports.append(tr)
                self.protocols.append(proto)
                await asyncio.wait_for(fut, max(0.1, deadline - time.monotonic()))
                proto.ready_fut = self.settled  # the connection's own future can go (~100 B)
                return True
            except (OSError, TimeoutError) as e:  # counted: one bad socket is no reason to stop
                key = failure_key(e)
                failures[key] = failures.get(key, 0) + 1
                transport = getattr(proto, "transport", None)  # unset before connection_made
                if transport is not None:
                    transport.abort()
                return False

        unstarted = [0]  # jobs a lane took from the queue and then did not start

        async def lane() -> None:
            for i, kind in queue:  # one iterator shared by every lane
                if self.halted or time.monotonic() >= deadline:
                    unstarted[0] += 1
                    return
                if await one(i, specs[kind]):
                    ok[kind] += 1

        t0 = load.monotonic_ns()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        left = unstarted[0] + sum(1 for _ in queue)
        if left:
            failures["halted" if self.halted else "timeout"] = left
        return {
            "ok": sum(ok),
            "by_kind": ok,
            "failures": failures,
            "t0": t0,
            "t1": load.monotonic_ns(),
            "ready": load.STATS.ready,
        }

    async def wait(self, seqs: list[int], timeout: float) -> dict[str, Any]:
        """Until every seq reached every live subscriber; the receive times are taken
        as bytes arrive, so a 20 ms poll delays only this answer, not the figure."""
        deadline = time.monotonic() + timeout
        st = load.STATS
        while time.monotonic() < deadline:
            if all(st.counts.get(s, 0) >= st.ready for s in seqs):
                break
            await asyncio.sleep(0.02)
        return self.snapshot(seqs)

    async def dispatch(self, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "open":
            return await self.open(args["kinds"], args["ips"], args["concurrency"], args["timeout"])
        return await super().dispatch(cmd, args)

    def halt(self) -> None:
        self.halted = True


def client_main(conn: Any, index: int) -> None:
    """Entry point of a load process (``multiprocessing`` target)."""
    import uvloop

    async def go() -> None:
        client = ScaleClient(conn, index)
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, client.halt)
        await client.main()

    uvloop.run(go())


# --------------------------------------------------------------------------- the run


def tidings_scaled(
    workers: int, redis_port: int, keepalive: float, max_connections: int
) -> ServerDef:
    """tidings with ``workers`` processes on one port sharing channels through Redis.

    The heartbeat and ping intervals are ``keepalive`` seconds: at the defaults
    (15 s, 25 s) half a million SSE streams and half a million WebSockets cost
    53,000 keep-alive writes a second (and as many pongs to read), which on 2
    cores is more than the run's CPU; at 300 s (the default here) 3,300.
    ``max_connections`` per worker is set just under the file limit (the default
    keeps a 32nd of it in reserve, 625 here), since the subscribers are the load.
    """

    def setup(port: int, wd: Path) -> None:
        (wd / "tidings.toml").write_text(
            f"workers = {workers}\n"
            "[limits]\n"
            f"max_connections = {max_connections}\n"
            "[broker]\n"
            'type = "redis"\n'
            f'redis_url = "redis://{HOST}:{redis_port}/0"\n'
            'prefix = "bench"\n'
            "[sse]\n"
            f"heartbeat_interval = {keepalive}\n"
            "[websocket]\n"
            f"ping_interval = {keepalive}\n"
        )

    return dataclasses.replace(
        SERVERS["tidings"],
        setup=setup,
        note=f"tidings, {workers} workers (SO_REUSEPORT) + Redis broker",
    )


def client_ips(combo: int, client: int, count: int) -> list[str]:
    """Loopback source addresses of one load process in one run: never shared."""
    return [f"127.{1 + combo % 250}.{1 + client}.{2 + k}" for k in range(count)]


class Monitor:
    """Samples memory and TCP buffers every half second; trips the memory guard.

    Over ``guard`` it stops the load processes from connecting (SIGUSR1); at
    ``MEMORY_ABORT`` above it, it cancels the run, whose cleanup frees the memory.
    """

    def __init__(self, client_pids: list[int], run_task: asyncio.Future[Any], guard: float) -> None:
        self.guard = guard
        self.client_pids = client_pids
        self.run_task = run_task
        self.peak_used = 0.0
        self.peak_tcp_pages = 0
        self.peak_slab_kib = 0
        self.tripped: str | None = None
        self.task: asyncio.Task[None] | None = None

    def used(self) -> float:
        m = meminfo()
        return 1 - m["MemAvailable"] / m["MemTotal"]

    def sample(self) -> None:
        used = self.used()
        self.peak_used = max(self.peak_used, used)
        self.peak_tcp_pages = max(self.peak_tcp_pages, sockstat_tcp().get("mem", 0))
        self.peak_slab_kib = max(self.peak_slab_kib, measure.slab_kib())
        if used >= self.guard and self.tripped is None:
            self.tripped = f"memory: {used:.1%} of RAM in use (guard {self.guard:.0%})"
            for pid in self.client_pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR1)
        if used >= self.guard + MEMORY_ABORT:
            self.tripped = f"memory: {used:.1%} of RAM in use, run ended"
            self.run_task.cancel()

    async def loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.5)

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.loop())

    def stop(self) -> None:
        if self.task:
            self.task.cancel()

    def figures(self) -> dict[str, Any]:
        return {
            "peak_memory_used": round(self.peak_used, 4),
            "peak_tcp_mem_pages": self.peak_tcp_pages,
            "peak_slab_kib": self.peak_slab_kib,
        }


def snapshot(
    worker_pids: list[int], client_pids: list[int], redis: bench.ServerProc, files: bool
) -> dict[str, Any]:
    """Every party's memory and the kernel's, at one moment.

    The kernel's figures are read first: listing a process's fds (``files``)
    makes the kernel build a proc inode and a dentry per fd (about 2 KiB per
    socket in ``proc_inode_cache`` and ``dentry``), which would be counted as
    the sockets' slab. So fds are listed only when needed (before the run,
    after a failed step, at the end), after the slab has been read.
    """
    mem = meminfo()
    caches = slab_caches()
    tcp = sockstat_tcp()
    snap: dict[str, Any] = {
        "slab_kib": mem.get("Slab", 0),
        "mem_available_kib": mem["MemAvailable"],
        "mem_total_kib": mem["MemTotal"],
        "tcp": tcp,
        "file_nr": (read_sysctl("fs.file-nr") or [0])[0],
        "slab_caches": caches,
        "workers_rss_kib": measure.rss_kib(worker_pids),
        "workers_pss_kib": measure.pss_kib(worker_pids),
        "workers_rss_each_kib": [measure.rss_kib([p]) for p in worker_pids],
        "clients_rss_kib": measure.rss_kib(client_pids),
        "redis_rss_kib": redis.rss_kib(),
    }
    if files:
        snap["workers_files"] = [measure.open_files(p) for p in worker_pids]
    return snap


def step_calls(
    kinds: list[dict[str, Any]], ips: list[list[str]], total: int, asked: list[int]
) -> list[dict[str, Any]]:
    """One step's ``open`` arguments per load process: the kinds stay at 1:1 (to one
    subscriber) after every step, and each kind's share is spread evenly over the
    processes, its remainder starting at a different process for each kind.
    ``asked`` is updated."""
    nk, nc = len(kinds), len(ips)
    calls: list[dict[str, Any]] = [{"kinds": [], "ips": ips[i]} for i in range(nc)]
    for j in range(nk):
        amount = total // nk + (1 if j < total % nk else 0) - asked[j]
        asked[j] += amount
        for i in range(nc):
            share = amount // nc + (1 if (i - j) % nc < amount % nc else 0)
            calls[i]["kinds"].append((kinds[j], share))
    return calls


def which_resource(
    failures: dict[str, int], snap: dict[str, Any], monitor: Monitor, hard_files: int
) -> str | None:
    """The first resource that ran out, from the failures' errnos and the figures."""
    if monitor.tripped:
        return monitor.tripped
    if failures.get("EMFILE"):
        return f"fds: a load process hit its open-files limit ({failures['EMFILE']:,} EMFILE)"
    if failures.get("ENFILE"):
        return f"fds: fs.file-max reached ({failures['ENFILE']:,} ENFILE)"
    if max(snap.get("workers_files", []), default=0) >= hard_files - 5:
        return (
            f"fds: a tidings worker holds {max(snap['workers_files']):,} files "
            f"(limit {hard_files:,})"
        )
    refused = sum(v for k, v in failures.items() if k.startswith("status 503"))
    if refused:
        return (
            f"connections: tidings workers answered 503 to {refused:,} subscribers "
            "(max_connections, set just under the file limit: a worker is full)"
        )
    if failures.get("EADDRNOTAVAIL"):
        return f"ports: {failures['EADDRNOTAVAIL']:,} EADDRNOTAVAIL"
    if failures.get("ENOBUFS") or failures.get("ENOMEM"):
        return f"memory: the kernel refused a socket ({failures})"
    tcp_mem = read_sysctl("net.ipv4.tcp_mem") or [0, 0, 0]
    if snap["tcp"].get("mem", 0) >= tcp_mem[2]:
        return f"tcp_mem: {snap['tcp']['mem']:,} pages in use (max {tcp_mem[2]:,})"
    if failures.get("timeout"):
        return f"time: {failures['timeout']:,} subscribers not subscribed within the step's bound"
    if failures:
        return f"failures: {failures}"
    return None


def slab_breakdown(before: dict[str, int], after: dict[str, int], sockets: int) -> dict[str, float]:
    """The slab caches that grew most, in bytes per socket (both ends counted as sockets)."""
    grew = {k: after[k] - before.get(k, 0) for k in after}
    top = sorted(grew.items(), key=lambda kv: -kv[1])[:8]
    return {k: round(v / sockets, 1) for k, v in top if v > 0} if sockets else {}


def set_priority(pid: int, nice: int) -> str:
    """Give the session (autogroup) of ``pid`` the scheduler weight of ``nice``.

    With ``kernel.sched_autogroup_enabled`` the CPU is shared between sessions
    first: tidings' workers (one session, ``start_new_session``) get one
    session's share however many of them there are, and on a machine where ten
    other sessions are busy that is a tenth of it (measured: 12 workers at
    1.3 % CPU each, 270 connections/s, at load 20). ``--priority`` is for the
    one run meant to load the machine; the figures per connection and per
    delivery do not depend on it, time to connect and to deliver do.
    """
    try:
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write(str(nice))
        return "ok"
    except OSError as e:
        return f"not set: {e.strerror}"


async def run_scale(result: dict[str, Any], opts: Options, root: Path, limits: Limits) -> None:
    """Start Redis and tidings, connect N in steps, broadcast K times; fill ``result``."""
    combo = int(time.time()) % 97
    if opts.priority is not None:
        # The load processes inherit this session: a new one, so that the
        # priority given to it is not the calling shell's.
        with contextlib.suppress(OSError):
            os.setsid()
        result["priority"] = {"coordinator": set_priority(os.getpid(), opts.priority)}
    pool = bench.Pool(opts.clients, target=client_main)
    client_pids = [w.proc.pid for w in pool.workers]
    this = asyncio.current_task()
    assert this is not None
    monitor = Monitor(client_pids, this, opts.memory_guard)
    monitor.start()
    redis: bench.ServerProc | None = None
    server: bench.ServerProc | None = None
    publisher: bench.Publisher | None = None
    started: list[int] = list(client_pids)
    hard_files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    try:
        redis = bench.ServerProc(
            REDIS, bench.free_port(1), Path(tempfile.mkdtemp(prefix="redis-", dir=root))
        )
        started.append(redis.proc.pid)
        await redis.wait_ready()
        port = bench.free_port(1)
        sdef = tidings_scaled(opts.workers, redis.port, opts.keepalive, hard_files - 100)
        server = bench.ServerProc(sdef, port, Path(tempfile.mkdtemp(prefix="tidings-", dir=root)))
        started.append(server.proc.pid)
        await server.wait_ready(timeout=60 + opts.workers)
        if opts.priority is not None:
            result["priority"]["server"] = set_priority(server.proc.pid, opts.priority)
            result["priority"]["redis"] = set_priority(redis.proc.pid, opts.priority)
        pids = await bench.wait_workers(server, opts.workers, timeout=60 + 2 * opts.workers)
        started += pids
        specs = sdef.specs(port)
        kinds = [specs[t].__dict__ for t in opts.transports]
        publisher = bench.Publisher(HOST, port, sdef.publish_path, sdef.publish_body)
        ips = [
            client_ips(combo, i, ips_per_client(math.ceil(opts.n / opts.clients)))
            for i in range(opts.clients)
        ]

        # Warm-up: every worker imports and allocates what a first subscriber of each
        # kind and a first publication need, so that it is not counted per connection.
        warm = 20 * opts.workers
        await pool.workers[0].call(
            "open",
            60,
            kinds=[(k, warm) for k in kinds],
            ips=client_ips(combo, 99, 2),
            concurrency=50,
            timeout=50,
        )
        await pool.all("reset", 10)
        await publisher.publish(0)
        await bench.wait_seqs(pool, [0], 5)
        await pool.all("close", 30)
        await asyncio.sleep(1.0)
        if not server.alive():
            raise RuntimeError(f"died during warm-up: {server.log_tail()}")

        base = snapshot(pids, client_pids, redis, files=True)
        result["base"] = {k: v for k, v in base.items() if k != "slab_caches"}
        held = 0
        steps: list[dict[str, Any]] = []
        result["steps"] = steps
        connect_deadline = time.monotonic() + opts.connect_budget
        t_connect = time.monotonic()
        nk = len(kinds)
        by_kind = [0] * nk
        asked = [0] * nk  # subscribers of each kind asked for so far
        limit: str | None = None
        while held < opts.n:
            size = min(opts.step, opts.n - held)
            left = connect_deadline - time.monotonic()
            if left <= 0:
                limit = f"time: the connect budget ({opts.connect_budget:.0f} s) is spent"
                break
            calls = step_calls(kinds, ips, held + size, asked)
            t0 = time.monotonic()
            answers = await pool.all(
                "open", left + 30, per=calls, concurrency=opts.concurrency, timeout=left
            )
            seconds = time.monotonic() - t0
            ok = sum(a["ok"] for a in answers)
            for a in answers:
                for j in range(nk):
                    by_kind[j] += a["by_kind"][j]
            failures: dict[str, int] = {}
            for a in answers:
                for k, v in a["failures"].items():
                    failures[k] = failures.get(k, 0) + v
            status = await pool.all("status", 30)
            held = sum(a["ready"] for a in status)
            snap = snapshot(pids, client_pids, redis, files=bool(failures))
            step = {
                "asked": size,
                "opened": ok,
                "held": held,
                "lost": sum(a["lost"] for a in status),
                "seconds": round(seconds, 2),
                "per_s": round(ok / seconds, 1) if seconds > 0 else None,
                "failures": failures,
                "workers_rss_kib": snap["workers_rss_kib"],
                "clients_rss_kib": snap["clients_rss_kib"],
                "slab_kib": snap["slab_kib"],
                "memory_used": round(1 - snap["mem_available_kib"] / snap["mem_total_kib"], 4),
                "tcp_mem_pages": snap["tcp"].get("mem", 0),
                "worker_files_max": max(snap["workers_files"]) if failures else None,
            }
            steps.append(step)
            print(
                f"  step: {held:,} held (+{ok:,} in {seconds:.1f} s, {step['per_s']}/s), "
                f"memory {step['memory_used']:.1%}, workers {snap['workers_rss_kib'] / 1024:,.0f} "
                f"MiB, clients {snap['clients_rss_kib'] / 1024:,.0f} MiB, slab "
                f"{snap['slab_kib'] / 1024:,.0f} MiB"
                + (f", failures {failures}" if failures else ""),
                flush=True,
            )
            if not server.alive():
                limit = f"server: exited holding {held:,}: {server.log_tail(300)}"
                break
            if monitor.tripped or failures or ok < size:
                limit = which_resource(failures, snap, monitor, hard_files) or (
                    f"{size - ok:,} of a step not subscribed"
                )
                break
        connect_s = time.monotonic() - t_connect
        result["subscribed"] = held
        result["subscribed_by_transport"] = dict(zip(opts.transports, by_kind, strict=True))
        result["connect"] = {
            "seconds": round(connect_s, 2),
            "per_s": round(held / connect_s, 1) if connect_s > 0 else None,
        }
        result["largest_n_held"] = held
        if limit:
            result["limit"] = limit

        await asyncio.sleep(opts.settle)
        snap = snapshot(pids, client_pids, redis, files=True)
        t_count = time.monotonic()
        conns = measure.accepted_connections(pids, port)  # exact: sockets on the port
        result["count_connections_s"] = round(time.monotonic() - t_count, 1)
        result["workers_detail"] = [
            {"pid": p, "connections": c, "open_files": f, "rss_base_kib": rb, "rss_kib": r}
            for p, c, f, rb, r in zip(
                pids,
                conns,
                snap["workers_files"],
                base["workers_rss_each_kib"],
                snap["workers_rss_each_kib"],
                strict=True,
            )
        ]
        sockets = 2 * held
        result["memory"] = {
            "workers_rss_kib": snap["workers_rss_kib"],
            "workers_pss_kib": snap["workers_pss_kib"],
            "supervisor_rss_kib": measure.rss_kib([server.proc.pid]),
            "server_rss_per_conn_b": round(
                (snap["workers_rss_kib"] - base["workers_rss_kib"]) * 1024 / held, 1
            )
            if held
            else None,
            "server_pss_per_conn_b": round(
                (snap["workers_pss_kib"] - base["workers_pss_kib"]) * 1024 / held, 1
            )
            if held
            else None,
            "clients_rss_kib": snap["clients_rss_kib"],
            "client_rss_per_conn_b": round(
                (snap["clients_rss_kib"] - base["clients_rss_kib"]) * 1024 / held, 1
            )
            if held
            else None,
            "slab_per_socket_b": round((snap["slab_kib"] - base["slab_kib"]) * 1024 / sockets, 1)
            if sockets
            else None,
            "slab_per_conn_b": round((snap["slab_kib"] - base["slab_kib"]) * 2048 / sockets, 1)
            if sockets
            else None,
            "slab_objects_per_socket_b": round(
                (sum(snap["slab_caches"].values()) - sum(base["slab_caches"].values())) / sockets,
                1,
            )
            if sockets and snap["slab_caches"]
            else None,
            "slab_caches_per_socket_b": slab_breakdown(
                base["slab_caches"], snap["slab_caches"], sockets
            ),
            "machine_used_per_conn_b": round(
                (base["mem_available_kib"] - snap["mem_available_kib"]) * 1024 / held, 1
            )
            if held
            else None,
            "redis_rss_base_kib": base["redis_rss_kib"],
            "redis_rss_kib": snap["redis_rss_kib"],
            "tcp_mem_pages_idle": snap["tcp"].get("mem", 0),
        }
        if not server.alive():
            raise RuntimeError(f"died holding {held:,} connections: {server.log_tail()}")
        if held:
            mode = bench.Mode(
                [held],
                broadcasts=opts.broadcasts,
                gap=opts.gap,
                settle=opts.settle,
                latency_seconds=0.0,
                latency_deliveries_per_s=0,
                drain_timeout=opts.drain_timeout,
                concurrency=opts.concurrency,
            )
            clients_cpu0 = measure.cpu_seconds(client_pids)
            redis_cpu0 = redis.cpu()
            result["fanout"] = fan = await bench.fanout(server, publisher, pool, mode)
            delivered = fan["delivered"]
            if delivered:
                fan["clients_cpu_us_per_delivery"] = round(
                    (measure.cpu_seconds(client_pids) - clients_cpu0) * 1e6 / delivered, 3
                )
                fan["redis_cpu_ms"] = round((redis.cpu() - redis_cpu0) * 1e3, 1)
            result["memory"]["redis_rss_after_broadcasts_kib"] = redis.rss_kib()
            result["memory"]["tcp_mem_pages_peak"] = monitor.peak_tcp_pages
        fan = result.get("fanout", {})
        result["ok"] = (
            server.alive()
            and held == opts.n
            and fan.get("delivered") == opts.n * opts.broadcasts
            and not fan.get("lost_connections")
        )
        if not result["ok"] and "limit" not in result:
            result["error"] = (
                f"subscribed {held:,} of {opts.n:,}; delivered {fan.get('delivered', 0):,} "
                f"of {opts.n * opts.broadcasts:,}; lost {fan.get('lost_connections')}"
            )
    except asyncio.CancelledError:
        if monitor.tripped:
            result["limit"] = monitor.tripped
        raise
    except Exception as e:  # recorded, and everything below still runs
        result["error"] = f"{type(e).__name__}: {e}"
        if server is not None:
            result["server_log"] = server.log_tail(400)
    finally:
        monitor.stop()
        result["monitor"] = monitor.figures()
        for proc in (server, redis):
            if proc is not None:
                proc.stop()
        if publisher:
            publisher.close()
        pool.close()  # each load process aborts its sockets as it exits
        started += server.pids if server else []
        await asyncio.sleep(0.5)
        result["leftover_pids"] = sorted({p for p in started if bench.alive(p)})


def save(out: Path, meta: dict[str, Any], result: dict[str, Any]) -> None:
    """Add one run to ``out``, replacing an earlier one with the same N, workers and
    transports, so one file keeps the data points (1,000,000 mixed, 200,000 per kind...)."""
    runs: list[dict[str, Any]] = []
    if out.exists():
        with contextlib.suppress(ValueError):
            runs = json.loads(out.read_text()).get("runs", [])

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["n"], r["workers"], tuple(r.get("transports", [r.get("transport")])))

    runs = [r for r in runs if key(r["result"]) != key(result)]
    runs.append({"meta": meta, "result": result})
    runs.sort(key=lambda r: (-r["result"]["n"], r["result"]["workers"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs}, indent=1))


def worker_capacity() -> int | None:
    """Connections one process may hold: the hard open-files limit minus a margin.

    Raises this process's soft limit to the hard one first, so that the server
    and client processes started from here inherit it. ``None``: no limit.
    (bench/soak.py sizes its workers with it too.)
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return None
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every child
    return hard - FILE_MARGIN


def options(args: argparse.Namespace) -> Options:
    """The run's sizes from the command line, with the process counts the file limit sets."""
    n = int(args.n) if args.n else 100_000
    transports = [t.strip() for t in (args.transports or "sse,ws").split(",") if t.strip()]
    if not transports or set(transports) - {"sse", "ws"}:
        raise SystemExit("--scale takes --transports sse, ws or sse,ws")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    cap = worker_capacity() or 10**9
    workers = args.workers or max(2, math.ceil(n / cap) + 1)
    if n > workers * cap:
        raise SystemExit(
            f"{n:,} subscribers cannot fit in {workers} worker(s) here: a process may hold "
            f"{hard:,} open files (hard limit), so at most ~{cap:,} connections per worker; "
            f"use --workers {math.ceil(n / cap) + 1} (one spare because SO_REUSEPORT "
            "spreads connections by hash, not exactly evenly)"
        )
    per_client = min(load.MAX_SOCKETS_PER_PROCESS, cap)
    clients = max(2, math.ceil(n / per_client))
    step = args.step or max(1, min(n, 100_000, math.ceil(n / 5)))
    return Options(
        n=n,
        transports=transports,
        workers=workers,
        clients=clients,
        step=step,
        broadcasts=args.broadcasts or 5,
        keepalive=args.keepalive,
        raise_limits=not args.no_raise,
        priority=args.priority,
        memory_guard=args.memory_guard,
    )


def main(args: argparse.Namespace) -> int:
    """``--scale``: check the limits, run, print, merge into the JSON file."""
    opts = options(args)
    for sdef in (REDIS, SERVERS["tidings"]):
        if why := sdef.unavailable():
            raise SystemExit(f"{sdef.name}: {why}")
    if args.check_limits:
        opts.raise_limits = False
    limits = kernel_limits(opts)
    print(
        f"tidings bench (scale): N={opts.n:,} ({'+'.join(opts.transports)}) "
        f"workers={opts.workers} clients={opts.clients} step={opts.step:,} "
        f"K={opts.broadcasts} (budget {opts.budget:.0f} s)",
        flush=True,
    )
    print(report.limits_table([dataclasses.asdict(r) for r in limits.rows]), flush=True)
    for row in limits.rows:
        if row.raised_from is not None:
            print(f"raised {row.name}: {row.raised_from} -> {row.value} (restored at the end)")
    for row in limits.blocking():
        print(f"WOULD STOP THE RUN: {row.name} = {row.value}, needs {row.need}", flush=True)
    if args.check_limits:
        return 1 if limits.blocking() else 0
    result: dict[str, Any] = {
        "scenario": "scale",
        "transports": opts.transports,
        "n": opts.n,
        "workers": opts.workers,
        "client_processes": opts.clients,
        "broadcasts": opts.broadcasts,
        "step": opts.step,
        "keepalive_s": opts.keepalive,
        "limits": [dataclasses.asdict(r) for r in limits.rows],
        "ok": False,
    }
    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="tidings-scale-"))

    async def go() -> None:
        task = asyncio.ensure_future(run_scale(result, opts, root, limits))
        bench.WATCHDOG.arm(opts.budget, task)
        try:
            await task
        except asyncio.CancelledError:
            if bench.WATCHDOG.fired:
                result.setdefault("limit", "time: the run exceeded its budget (watchdog)")
            elif "limit" not in result:
                raise
        finally:
            bench.WATCHDOG.disarm()

    try:
        asyncio.run(go())
    finally:
        limits.restore()
    result["wall_s"] = round(time.monotonic() - t0, 1)
    if args.keep_tmp:
        print(f"server logs and configs kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    out = args.json or Path(__file__).resolve().parent / "results" / "scale.json"
    save(out, report.machine("scale", dataclasses.asdict(opts), result["wall_s"]), result)
    print()
    print(report.scale_table(result))
    if not args.no_charts and result.get("steps"):
        print(f"chart: {report.scale_chart(result, out.parent)}")
    print(f"results: {out}  ({result['wall_s']:.0f} s)")
    return 0 if result["ok"] else 1
