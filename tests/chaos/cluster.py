"""The processes under test -- tidings nodes and redis-server -- and the faults done to them.

Nodes are started by the suite's own :class:`conftest.ServerLauncher` (so they get
the same environment, log files and kill-at-exit as every other test's servers),
Redis by :class:`brokers_support.RedisServer`. Each node keeps its port across
restarts, so the clients' proxies need not learn anything.

Fault kinds (:data:`FAULTS`), each an ``async`` method returning what it did:

* ``cut`` -- reset the connections of 1 to 3 clients at their proxies;
* ``node_kill`` -- SIGKILL a node, start it again on the same port;
* ``pubsub_kill`` -- ``CLIENT KILL ID`` the pub/sub connection of one node (found
  by matching Redis' ``CLIENT LIST`` addresses with the node's sockets in /proc);
* ``redis_pause`` -- SIGSTOP redis-server for a second, then SIGCONT;
* ``redis_restart`` -- ``SHUTDOWN SAVE`` and start again: the data survives;
* ``redis_wipe`` -- SIGKILL redis-server and start it without its data: history
  and epochs are gone, so clients must be told they were not recovered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import uuid
from collections.abc import Sequence
from pathlib import Path

import redis.asyncio as aioredis

from brokers_support import RedisServer, find_binary
from conftest import ServerLauncher, ServerProcess, free_port

from .clients import ChaosClient

#: Every fault kind, and the brokers it applies to.
FAULTS: dict[str, tuple[str, ...]] = {
    "cut": ("memory", "redis"),
    "node_kill": ("memory", "redis"),
    "pubsub_kill": ("redis",),
    "redis_pause": ("redis",),
    "redis_restart": ("redis",),
    "redis_wipe": ("redis",),
}
#: Seconds Redis stays stopped in ``redis_pause``.
PAUSE = 1.0
#: History kept per channel: long enough that a client reconnecting after a node
#: restart (about a second) is recovered, so ``unrecovered`` means "history was lost".
HISTORY = "size = 5000\nttl = 600.0\n"


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(int(link[8:-1]))
    return inodes


def local_ports(pid: int) -> set[int]:
    """The local TCP ports of ``pid``'s sockets (Linux /proc; IPv4 loopback is enough here)."""
    inodes = _socket_inodes(pid)
    ports = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if int(fields[9]) in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class Cluster:
    """``nodes`` tidings processes on one broker (``memory`` allows one node only)."""

    def __init__(self, workdir: Path, nodes: int, broker: str) -> None:
        if broker == "memory" and nodes != 1:
            raise ValueError("the memory broker lives in one process: use --nodes 1")
        self.workdir = workdir
        self.broker = broker
        self.launcher = ServerLauncher(workdir)
        self.ports = [free_port() for _ in range(nodes)]
        self.nodes: list[ServerProcess | None] = [None] * nodes
        self.redis: RedisServer | None = None
        self.config = ""
        self.restarts = 0

    @property
    def redis_url(self) -> str:
        assert self.redis is not None
        return self.redis.url

    async def start(self) -> None:
        history = f"[history]\n{HISTORY}"
        if self.broker == "redis":
            redis_dir = self.workdir / "redis"
            redis_dir.mkdir(exist_ok=True)
            self.redis = RedisServer(find_binary("redis-server", "redis-server"), redis_dir)
            await asyncio.to_thread(self.redis.start)
            self.config = (
                f'{history}\n[broker]\ntype = "redis"\nredis_url = "{self.redis.url}"\n'
                f'prefix = "chaos{uuid.uuid4().hex[:6]}"\n'
            )
        else:
            self.config = history
        for i in range(len(self.ports)):
            await self._start_node(i)

    async def _start_node(self, i: int) -> None:
        self.nodes[i] = await asyncio.to_thread(
            self.launcher.start, self.config, port=self.ports[i]
        )

    def logs(self) -> str:
        return "\n".join(srv.logs() for srv in self.launcher.servers)

    async def heal(self) -> None:
        """Everything running again, whatever the last fault left (end of the run)."""
        if self.redis is not None and self.redis.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.redis.proc.pid, signal.SIGCONT)
            if self.redis.proc.poll() is not None:
                await asyncio.to_thread(self.redis.start)
        for i, node in enumerate(self.nodes):
            if node is None or not node.alive():
                await self._start_node(i)

    def close(self) -> None:
        if self.redis is not None and self.redis.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.redis.proc.pid, signal.SIGCONT)
            self.redis.stop()
        self.launcher.close()

    # ------------------------------------------------------------------ faults

    async def inject(self, kind: str, clients: Sequence[ChaosClient], rng: random.Random) -> str:
        if kind == "cut":
            chosen = rng.sample(list(clients), k=min(len(clients), rng.randint(1, 3)))
            cut = [f"{c.name}:{c.proxy.cut()}" for c in chosen]
            return " ".join(cut)
        if kind == "node_kill":
            return await self.node_kill(rng.randrange(len(self.nodes)), rng.uniform(0, 0.5))
        if kind == "pubsub_kill":
            return await self.pubsub_kill(rng.randrange(len(self.nodes)))
        if kind == "redis_pause":
            return await self.redis_pause()
        if kind == "redis_restart":
            return await self.redis_restart(keep_data=True)
        if kind == "redis_wipe":
            return await self.redis_restart(keep_data=False)
        raise ValueError(f"unknown fault kind {kind!r}")

    async def node_kill(self, i: int, down_for: float) -> str:
        node = self.nodes[i]
        assert node is not None
        node.stop(signal.SIGKILL)
        await asyncio.sleep(down_for)
        await self._start_node(i)
        self.restarts += 1
        return f"node{i} down {down_for:.2f}s"

    async def _redis(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.redis_url, socket_timeout=5)

    async def pubsub_kill(self, i: int) -> str:
        node = self.nodes[i]
        assert node is not None
        ports = local_ports(node.proc.pid)
        client = await self._redis()
        try:
            killed = 0
            for entry in await client.client_list(_type="pubsub"):
                if int(entry["addr"].rsplit(":", 1)[1]) in ports:
                    killed += await client.client_kill_filter(_id=entry["id"])
        finally:
            await client.aclose()
        return f"node{i} pubsub links killed: {killed}"

    async def redis_pause(self) -> str:
        assert self.redis is not None and self.redis.proc is not None
        pid = self.redis.proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(PAUSE)
        finally:
            os.kill(pid, signal.SIGCONT)
        return f"paused {PAUSE}s"

    async def redis_restart(self, keep_data: bool) -> str:
        assert self.redis is not None and self.redis.proc is not None
        dump = self.redis.workdir / "dump.rdb"
        if keep_data:
            client = await self._redis()
            # Redis answers SHUTDOWN by closing the connection once the dump is written.
            with contextlib.suppress(Exception):
                await client.shutdown(save=True)
            await client.aclose()
            await asyncio.to_thread(self.redis.proc.wait, 10)
        else:
            self.redis.stop()
            dump.unlink(missing_ok=True)
        await asyncio.to_thread(self.redis.start)
        return "with its data" if keep_data else "without its data"
