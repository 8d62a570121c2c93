"""How long the SSE heartbeat holds a publication back: N idle streams, one probe.

    .venv/bin/python bench/sse_heartbeat_stall.py --n 5000 --interval 2 --seconds 12
    .venv/bin/python bench/sse_heartbeat_stall.py --src /path/to/other/checkout/src
    .venv/bin/python bench/sse_heartbeat_stall.py --turn --n 9000   # one loop turn's cost

Starts ``tidings serve`` (from ``--src`` when given, to compare two trees on
the same machine one after the other) with ``[sse] heartbeat_interval`` set
to ``--interval``, opens ``--n`` idle SSE streams on one channel and one probe
stream on another, then publishes to the probe's channel through the HTTP API
at ``--rate`` per second for ``--seconds``, each message stamped with the time
it was due. The probe's latency (due → received) shows any loop turn the
heartbeat takes: a sweep writing to every stream at once stalls the loop
once per interval (the rooms scenario's limit on SSE); a spread one does not.
The figure to read is the max and p99 against p50; the loop's own noise on a
shared machine shows in both servers alike.

``--turn`` measures the cause instead, in CPU time (which a loaded machine
disturbs far less than latency): one loop turn writing the heartbeat to
``--n`` streams (uvloop transports on socket pairs), as the sweep did, against
one turn writing to the slice of them that
:class:`tidings.transports.sse.HeartbeatWheel` gives a tick at the default
15 s interval.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

try:
    import uvloop
except ImportError:  # pragma: no cover - the benchmark installs uvloop
    uvloop = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Idle(asyncio.Protocol):
    """An idle subscriber: reads and forgets (its heartbeats included)."""

    def data_received(self, data: bytes) -> None:
        pass


class Probe(asyncio.Protocol):
    """The probe subscriber: each event's data carries the ns it was due."""

    def __init__(self) -> None:
        self.buf = b""
        self.latencies_ms: list[float] = []

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        buf = self.buf + data
        while (at := buf.find(b'"due":')) >= 0:
            end = buf.find(b"}", at)
            if end < 0:
                break
            self.latencies_ms.append((now - int(buf[at + 6 : end])) / 1e6)
            buf = buf[end:]
        self.buf = buf[-256:]


def sse_request(channel: str) -> bytes:
    return f"GET /sse?channel={channel} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


async def drive(port: int, args: argparse.Namespace) -> list[float]:
    loop = asyncio.get_running_loop()
    idle = []
    for _ in range(args.n):
        transport, _ = await loop.create_connection(Idle, "127.0.0.1", port)
        transport.write(sse_request("idle"))
        idle.append(transport)
    probe_transport, probe = await loop.create_connection(Probe, "127.0.0.1", port)
    probe_transport.write(sse_request("probe"))
    await asyncio.sleep(1.0)  # every stream's head written
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic_ns()
    total = int(args.rate * args.seconds)
    for i in range(total):
        due = t0 + int(i * 1e9 / args.rate)
        delay = (due - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        body = json.dumps({"channel": "probe", "data": {"due": due}}).encode()
        writer.write(
            b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    await asyncio.sleep(0.5)
    writer.close()
    probe_transport.close()
    for transport in idle:
        transport.close()
    return probe.latencies_ms


def turn_cost(n: int) -> None:
    """CPU and wall ms of one heartbeat turn over ``n`` streams, and over one slice."""
    from tidings.transports.sse import HEARTBEAT, HEARTBEAT_TICK

    async def measure() -> None:
        loop = asyncio.get_running_loop()
        transports, peers = [], []
        for _ in range(n):
            ours, theirs = socket.socketpair()
            transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
            transports.append(transport)
            peers.append(theirs)
        slice_len = n // round(15.0 / HEARTBEAT_TICK) + 1
        for _ in range(3):
            for part in (transports, transports[:slice_len]):
                cpu, wall = time.thread_time(), time.perf_counter()
                for transport in part:
                    transport.write(HEARTBEAT)
                cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
                print(
                    f"{len(part):6d} streams in one turn: "
                    f"CPU {cpu * 1e3:6.2f} ms, wall {wall * 1e3:6.2f} ms"
                )
            for peer in peers:  # drain, so the next round writes to empty buffers
                with contextlib.suppress(BlockingIOError):
                    while peer.recv(65536, socket.MSG_DONTWAIT):
                        pass
            await asyncio.sleep(0.2)

    run = uvloop.run if uvloop is not None else asyncio.run
    run(measure())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=5000, help="idle SSE streams")
    p.add_argument("--interval", type=float, default=2.0, help="[sse] heartbeat_interval")
    p.add_argument("--rate", type=float, default=50.0, help="probe publications per second")
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--src", help="a tree's src/ to import tidings from (default: installed)")
    p.add_argument("--turn", action="store_true", help="only one heartbeat turn's cost")
    args = p.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.turn:
        if args.src:
            sys.path.insert(0, str(Path(args.src).resolve()))
        turn_cost(args.n)
        return 0
    port = free_port()
    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = str(Path(args.src).resolve())
    with tempfile.TemporaryDirectory() as wd:
        config = Path(wd) / "tidings.toml"
        config.write_text(f"[sse]\nheartbeat_interval = {args.interval}\n")
        command = [sys.executable, "-m", "tidings", "serve", "--port", str(port)]
        command += ["--config", str(config), "--log-level", "error"]
        server = subprocess.Popen(command, env=env)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit("the server did not start") from None
                    time.sleep(0.1)
            run = uvloop.run if uvloop is not None else asyncio.run
            latencies = sorted(run(drive(port, args)))
        finally:
            server.terminate()
            server.wait(10)
    if not latencies:
        raise SystemExit("the probe received nothing")
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(
        f"src={args.src or 'installed'} n={args.n} interval={args.interval}s "
        f"probe {len(latencies)} msgs: p50 {statistics.median(latencies):.1f} ms, "
        f"p99 {p99:.1f} ms, max {latencies[-1]:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
