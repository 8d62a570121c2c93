"""One chaos run: start the cluster and the clients, publish, inject faults, check.

The phases, in order: every client subscribed (so each must receive offset 1 of
each of its channels, or be told why not); the publisher and the injector run
for ``duration``; the injector stops and everything is brought back up; after a
quiet second the publisher stops; the clients get up to ``settle`` seconds to
receive the last acknowledged publication of each channel; then the recordings
are checked (:mod:`chaos.invariants`). Every process is killed in a ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .clients import TRANSPORTS, ChaosClient, WebSocketChaosClient
from .cluster import FAULTS, Cluster
from .invariants import Ack, Fault, Report, check

#: Publishes in flight at once, at most (a node that hangs must not pile up tasks).
MAX_IN_FLIGHT = 64


@dataclass
class ChaosConfig:
    duration: float = 60.0
    nodes: int = 2
    broker: str = "redis"
    transports: Sequence[str] = ("sse", "longpoll", "poll", "websocket")
    clients_per_transport: int = 2
    channels: int = 8
    channels_per_client: int = 4
    rate: float = 150.0
    fault_interval: tuple[float, float] = (0.5, 2.0)
    #: Relative weights of the fault kinds (kinds not applicable to the broker are dropped).
    faults: dict[str, float] = field(
        default_factory=lambda: {
            "cut": 4,
            "node_kill": 1,
            "pubsub_kill": 2,
            "redis_pause": 1,
            "redis_restart": 1,
            "redis_wipe": 1,
        }
    )
    settle: float = 20.0
    #: Stop injecting after this many faults (the run then ends before ``duration``).
    max_faults: int | None = None
    seed: int | None = None
    workdir: Path | None = None


class Publisher:
    """Publishes at a steady rate through ``POST /api/publish``, nodes in turn."""

    def __init__(self, node_ports: Sequence[int], channels: Sequence[str], rate: float) -> None:
        self.urls = [f"http://127.0.0.1:{p}/api/publish" for p in node_ports]
        self.channels = list(channels)
        self.rate = rate
        self.acks: list[Ack] = []
        self.failures: Counter[str] = Counter()
        self._seq = 0

    async def run(self, stop: asyncio.Event) -> None:
        in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        tasks: set[asyncio.Task[None]] = set()
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as http:
            next_at = time.monotonic()
            while not stop.is_set():
                next_at += 1 / self.rate
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if in_flight.locked():
                    self.failures["skipped: too many in flight"] += 1
                    continue
                await in_flight.acquire()
                task = asyncio.create_task(self._one(http, in_flight))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks)

    async def _one(self, http: httpx.AsyncClient, in_flight: asyncio.Semaphore) -> None:
        self._seq += 1
        seq = self._seq
        channel = random.choice(self.channels)
        url = self.urls[seq % len(self.urls)]
        try:
            resp = await http.post(url, json={"channel": channel, "data": {"seq": seq}})
            body = resp.json()
            if resp.status_code == 200 and "result" in body:
                res = body["result"]
                self.acks.append(Ack(time.monotonic(), channel, res["epoch"], res["offset"]))
            else:
                self.failures[f"{resp.status_code} {str(body.get('error'))[:80]}"] += 1
        except (httpx.HTTPError, OSError, ValueError) as exc:
            self.failures[type(exc).__name__] += 1
        finally:
            in_flight.release()


class FaultInjector:
    """Injects a fault of a random kind every ``interval`` seconds (uniform), one at a time."""

    def __init__(
        self,
        cluster: Cluster,
        clients: Sequence[ChaosClient],
        weights: dict[str, float],
        interval: tuple[float, float],
        rng: random.Random,
        max_faults: int | None = None,
    ) -> None:
        self.cluster = cluster
        self.clients = clients
        self.kinds = [k for k, w in weights.items() if w > 0 and cluster.broker in FAULTS[k]]
        self.weights = [weights[k] for k in self.kinds]
        self.interval = interval
        self.rng = rng
        self.max_faults = max_faults
        self.faults: list[Fault] = []

    async def run(self, stop: asyncio.Event) -> None:
        if not self.kinds:
            return
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rng.uniform(*self.interval))
            if stop.is_set():
                return
            kind = self.rng.choices(self.kinds, self.weights)[0]
            t = time.monotonic()
            detail = await self.cluster.inject(kind, self.clients, self.rng)
            self.faults.append(Fault(kind, t, detail))
            if self.max_faults is not None and len(self.faults) >= self.max_faults:
                return


def _caught_up(clients: Sequence[ChaosClient], acks: Sequence[Ack]) -> bool:
    final: dict[str, tuple[str, int]] = {}
    for ack in acks:  # the last acknowledged publication of each channel
        if ack.channel not in final or ack.offset > final[ack.channel][1]:
            final[ack.channel] = (ack.epoch, ack.offset)
    return all(
        client.last(ch) == final[ch] for client in clients for ch in client.channels if ch in final
    )


def _notes(cluster: Cluster, clients: Sequence[ChaosClient], publisher: Publisher) -> list[str]:
    notes = []
    logs = cluster.logs()
    tracebacks = logs.count("Traceback")
    notes.append(f"\ntracebacks in node logs: {tracebacks}; node restarts: {cluster.restarts}")
    if tracebacks:
        first = logs.index("Traceback")
        notes.append(logs[first : first + 5000])
    if publisher.failures:
        notes.append(f"publish failures: {dict(publisher.failures.most_common(8))}")
    errors: Counter[str] = Counter()
    for client in clients:
        errors.update(e[:90] for e in client.errors)
        notes += client.notes()
        if isinstance(client, WebSocketChaosClient) and client.disconnects:
            notes.append(f"{client.name} disconnect codes: {client.disconnects}")
    if errors:
        notes.append(f"client errors (most common): {dict(errors.most_common(6))}")
    return notes


async def run_chaos(cfg: ChaosConfig) -> Report:
    """One run with ``cfg``; returns the report (the caller decides what fails)."""
    rng = random.Random(cfg.seed)
    with contextlib.ExitStack() as stack:
        workdir = cfg.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        cluster = Cluster(workdir, cfg.nodes, cfg.broker)
        stack.callback(cluster.close)
        await cluster.start()
        run_id = f"c{rng.getrandbits(32):08x}"
        channels = [f"{run_id}-{i}" for i in range(cfg.channels)]
        clients: list[ChaosClient] = []
        for transport in cfg.transports:
            for n in range(cfg.clients_per_transport):
                followed = rng.sample(channels, cfg.channels_per_client)
                clients.append(TRANSPORTS[transport](f"{transport}{n}", followed, cluster.ports))
        try:
            for client in clients:
                await client.start()
            await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for c in clients)), timeout=30)
            publisher = Publisher(cluster.ports, channels, cfg.rate)
            injector = FaultInjector(
                cluster, clients, cfg.faults, cfg.fault_interval, rng, cfg.max_faults
            )
            stop_faults, stop_publishing = asyncio.Event(), asyncio.Event()
            started = time.monotonic()
            publishing = asyncio.create_task(publisher.run(stop_publishing))
            injecting = asyncio.create_task(injector.run(stop_faults))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(injecting), cfg.duration)
            stop_faults.set()
            await injecting  # a fault in progress finishes (and raises if it failed)
            await cluster.heal()
            await asyncio.sleep(1.0)  # a quiet second of publishing with every node up
            stop_publishing.set()
            await publishing
            deadline = time.monotonic() + cfg.settle
            while time.monotonic() < deadline and not _caught_up(clients, publisher.acks):
                await asyncio.sleep(0.1)
            duration = time.monotonic() - started
        finally:
            await asyncio.gather(*(c.stop() for c in clients), return_exceptions=True)
        report = check(
            [c.recording for c in clients],
            publisher.acks,
            injector.faults,
            duration,
            sum(publisher.failures.values()),
        )
        report.notes += _notes(cluster, clients, publisher)
        report.tracebacks = cluster.logs().count("Traceback")
        return report


def save(report: Report, path: Path) -> None:
    path.write_text(json.dumps(report.to_json(), indent=1))
