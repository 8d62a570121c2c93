"""Real ``redis-server`` and ``nats-server`` processes for the broker tests.

Each server runs on a free loopback port in a temporary directory, with
persistence off, and is killed at teardown. A missing binary is installed with
apt-get (Debian packages ``redis-server`` and ``nats-server``) when we are root
or have sudo; otherwise the test fails with a message naming the package,
because a skipped broker test would hide a broken scale-out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import HOST, _die_with_parent, free_port
from tidings.hub import Publication

_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_apt_updated = False


def find_binary(name: str, package: str) -> str:
    """The path of ``name``, installing Debian ``package`` first if it is missing."""
    global _apt_updated
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))
    if path:
        return path
    sudo: list[str] = []
    if os.geteuid() != 0:
        if not shutil.which("sudo"):
            pytest.fail(f"{name} is missing and we cannot install it: apt-get install {package}")
        sudo = ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _apt_updated:
        subprocess.run([*sudo, "apt-get", "update", "-qq"], env=env, check=False, timeout=300)
        _apt_updated = True
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
        env=env,
        check=False,
        timeout=600,
    )
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))
    if not path:
        pytest.fail(f"could not install {name} (Debian package {package})")
    return path


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout}s")


class _ServerProcess:
    """A broker server on a fixed port that can be stopped and started again."""

    name = ""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        # The port may be taken again right after a stop (TIME_WAIT is fine for
        # a listener with SO_REUSEADDR, which both servers set); retry briefly.
        _wait_port(self.port, self.proc, self.name)

    def stop(self) -> None:
        """Kill the server at once (SIGKILL): nothing is saved, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class RedisServer(_ServerProcess):
    name = "redis-server"

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def argv(self) -> list[str]:
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
        ]


class NatsServer(_ServerProcess):
    name = "nats-server"

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    def argv(self) -> list[str]:
        return [self.binary, "-a", HOST, "-p", str(self.port)]


@contextlib.contextmanager
def running(server: _ServerProcess) -> Iterator[_ServerProcess]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A fresh redis-server for one test (tests restart and kill it)."""
    binary = find_binary("redis-server", "redis-server")
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    with running(server):
        yield server


@pytest.fixture
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A fresh nats-server for one test."""
    binary = find_binary("nats-server", "nats-server")
    server = NatsServer(binary, tmp_path_factory.mktemp("nats"))
    with running(server):
        yield server


async def until(predicate: Callable[[], bool], what: str, wait: float = 15.0) -> None:
    """Wait (bounded) until ``predicate()`` holds; fail naming ``what``."""
    try:
        async with asyncio.timeout(wait):
            while not predicate():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


class Node:
    """A broker under test plus what it delivered to its node, in order."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker
        self.got: list[Any] = []
        broker.bind(self.got.append)

    async def wait_for(self, n: int, wait: float = 10.0) -> list[Any]:
        await until(lambda: len(self.got) >= n, f"{n} publications", wait)
        return self.got


def run_nodes(
    make: Callable[[], Node], body: Callable[..., Awaitable[None]], nodes: int = 1
) -> None:
    """Start ``nodes`` brokers, run ``body(*nodes)``, and close them whatever happens."""

    async def main() -> None:
        made = [make() for _ in range(nodes)]
        for node in made:
            await node.broker.start()
        try:
            await body(*made)
        finally:
            for node in made:
                await node.broker.close()

    asyncio.run(main())


class Recorder:
    """A hub subscriber that notes what it was given and each resync."""

    client_id = ""

    def __init__(self) -> None:
        self.got: list[Publication] = []
        self.resyncs = 0

    def deliver(self, pub: Publication) -> None:
        self.got.append(pub)

    def insufficient_state(self) -> None:
        self.resyncs += 1

    def deliver_presence(self, event: object) -> None:
        pass
