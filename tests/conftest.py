"""Fixtures that run a REAL tidings server process.

Every test talks to ``python -m tidings serve`` over loopback sockets with real clients.

* ``server_factory`` -- ``start(config=None, env=None, args=()) -> ServerProcess``; the
  processes it starts are killed when the test ends.
* ``server`` -- one server with the default configuration, shared by a test module.
* ``spawn`` -- ``spawn(argv, **popen_kwargs) -> Popen`` for other child processes (curl,
  ``tidings subscribe``); they are killed when the test ends.

``TIDINGS_TEST_SERVER_ARGS`` (e.g. ``"--loop asyncio"``) adds flags to every server started,
to run the whole suite on the other event loop.

No child survives the test run: each is killed at teardown, and on Linux it also gets
SIGKILL from the kernel if the pytest process itself dies (PR_SET_PDEATHSIG).

Test tiers (markers registered in pyproject.toml, tiers in CONTRIBUTING.md): what a test needs
is read here, in one place, from the fixtures it requests -- ``server``/``server_factory``/
``spawn`` mark it ``server``, ``redis_server`` ``redis``, ``nats_server`` ``nats`` -- plus the
markers a file declares for needs no fixture shows (``node``, ``browser``, ``server`` for tests
that start processes themselves). A test that needs none of these is ``unit``. A file of unit
tests says so (``pytestmark = pytest.mark.unit``); a test in it that starts a process fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from ws_support import NodeClient, ensure_js_deps

#: The redis_server / nats_server fixtures (registered here, so that pytest
#: rewrites their asserts).
pytest_plugins = ["brokers_support"]

HOST = "127.0.0.1"
#: How long a server may take to answer /health: a deadline, not a wait (a healthy start takes
#: well under a second). The suite's parallel workers share the cores with each other and with
#: whatever else the machine runs; on a loaded 2-core machine an interpreter start has taken 15 s.
START_TIMEOUT = 60.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    # A suite started in the background of a non-interactive shell inherits
    # SIGINT ignored, and so would every child: then `proc.send_signal(SIGINT)`
    # (how the tests stop a CLI, as a user's Ctrl-C would) does nothing.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    """A port free now, for a server about to be started.

    Under pytest-xdist each worker takes only ports of its own residue ((port // 2) % workers):
    between this probe and the server's bind another worker's probe could otherwise be handed
    the same port, and two tests would talk to one server. The probes that did not fit stay
    bound until one does, so the kernel offers another port each time. Halved first because
    Linux hands ``bind(("", 0))`` odd ports by preference (even ones go to ``connect``): with
    an even worker count, ``port % workers`` left the even residues with no port at all.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    with contextlib.ExitStack() as probes:
        for _ in range(64 * workers):
            s = probes.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
            if (port // 2) % workers == worker % workers:
                return port
    raise RuntimeError(f"no free port of residue {worker} modulo {workers}")


def clean_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The test process environment without TIDINGS_* variables, plus ``env``."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    out["PYTHONUNBUFFERED"] = "1"
    out.update(env or {})
    return out


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


class ServerProcess:
    """A running ``tidings serve`` process listening on 127.0.0.1:port."""

    def __init__(self, proc: subprocess.Popen[bytes], host: str, port: int, log_path: Path) -> None:
        self.proc = proc
        self.host = host
        self.port = port
        self.log_path = log_path
        self.url = f"http://{host}:{port}"
        self.ws_url = f"ws://{host}:{port}"

    def __repr__(self) -> str:
        return f"<ServerProcess {self.url} pid={self.proc.pid}>"

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Send ``sig`` and wait up to ``timeout`` seconds; returns the exit code.

        A process still running after ``timeout`` is killed (its code is then -9).
        """
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill(self.proc)
        return int(self.proc.returncode)


def _answers_health(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


class ServerLauncher:
    """Starts servers and remembers them so that ``close()`` can kill them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers: list[ServerProcess] = []
        self._n = 0

    def start(
        self,
        config: str | None = None,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
        *,
        port: int | None = None,
        port_flag: bool = True,
        wait: bool = True,
    ) -> ServerProcess:
        """Start ``python -m tidings serve`` and wait until ``GET /health`` answers.

        ``config`` is TOML text written to a file passed with ``--config``. ``env`` is added
        to the environment (TIDINGS_* variables of the test process are not inherited).
        ``port_flag=False`` leaves ``--port`` out (the port then comes from config/env and
        must be given as ``port`` so the fixture knows where to look).
        """
        last_error = ""
        for _attempt in range(3):
            srv = self._launch(config, env, args, port, port_flag)
            if not wait:
                return srv
            error = self._wait_ready(srv)
            if error is None:
                return srv
            last_error = error
            # Another process may have taken the free port between probe and bind.
            if port is None and "in use" in error.lower():
                continue
            break
        raise RuntimeError(last_error)

    def _launch(
        self,
        config: str | None,
        env: dict[str, str] | None,
        args: Sequence[str],
        port: int | None,
        port_flag: bool,
    ) -> ServerProcess:
        self._n += 1
        n = self._n
        if port is None:
            if not port_flag:
                raise ValueError("port_flag=False needs the expected port")
            port = free_port()
        cmd = [sys.executable, "-m", "tidings", "serve", "--host", HOST]
        if port_flag:
            cmd += ["--port", str(port)]
        if config is not None:
            cfg = self.workdir / f"server{n}.toml"
            cfg.write_text(config)
            cmd += ["--config", str(cfg)]
        cmd += shlex.split(os.environ.get("TIDINGS_TEST_SERVER_ARGS", ""))
        cmd += list(args)
        log_path = self.workdir / f"server{n}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=clean_env(env),
                cwd=self.workdir,
                preexec_fn=_die_with_parent,
            )
        srv = ServerProcess(proc, HOST, port, log_path)
        self.servers.append(srv)
        return srv

    def _wait_ready(self, srv: ServerProcess) -> str | None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if srv.proc.poll() is not None:
                return (
                    f"tidings serve exited with code {srv.proc.returncode} before answering "
                    f"/health; log:\n{srv.logs()}"
                )
            if _answers_health(srv.url):
                return None
            time.sleep(0.05)
        srv.stop(signal.SIGKILL)
        return f"tidings serve did not answer /health within {START_TIMEOUT}s; log:\n{srv.logs()}"

    def close(self) -> None:
        for srv in self.servers:
            _kill(srv.proc)
        self.servers.clear()


def _attach_logs(request: pytest.FixtureRequest, servers: Sequence[ServerProcess]) -> None:
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for srv in servers:
            rep.sections.append((f"tidings log ({srv.url})", srv.logs()[-8000:]))


@pytest.fixture
def server_factory(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., ServerProcess]]:
    launcher = ServerLauncher(tmp_path)
    try:
        yield launcher.start
    finally:
        _attach_logs(request, launcher.servers)
        launcher.close()


@pytest.fixture(scope="module")
def module_server_factory() -> Iterator[Callable[..., ServerProcess]]:
    with tempfile.TemporaryDirectory(prefix="tidings-test-") as d:
        launcher = ServerLauncher(Path(d))
        try:
            yield launcher.start
        finally:
            launcher.close()


@pytest.fixture(scope="module")
def server(module_server_factory: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    """A server with the default configuration, shared by the tests of one module.

    After the module, its log must hold no traceback: whatever the tests threw at it,
    the server answered without an unhandled exception.
    """
    srv = module_server_factory()
    yield srv
    logs = srv.logs()
    assert "Traceback" not in logs, f"unhandled exception in the server log:\n{logs[-8000:]}"


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def _spawn(argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("preexec_fn", _die_with_parent)
        proc: subprocess.Popen[bytes] = subprocess.Popen(list(argv), **kwargs)  # type: ignore[call-overload]
        procs.append(proc)
        return proc

    try:
        yield _spawn
    finally:
        for proc in procs:
            _kill(proc)


@pytest.fixture(autouse=True)
def _show_server_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """Attach the logs of the servers a failing test used to its report."""
    yield
    if "server" in request.fixturenames:
        _attach_logs(request, [request.getfixturevalue("server")])


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep


@pytest.fixture
def node_clients() -> Iterator[list[NodeClient]]:
    """centrifuge-js clients under node that a test starts (append each
    :class:`ws_support.NodeClient`), closed after it; npm dependencies first."""
    ensure_js_deps()
    clients: list[NodeClient] = []
    yield clients
    for client in clients:
        client.close()


#: Fixtures that start a process, and the marker a test requesting one gets.
PROCESS_FIXTURES = {
    "node_clients": "node",
    "server": "server",
    "server_factory": "server",
    "module_server_factory": "server",
    "spawn": "server",
    "redis_server": "redis",
    "nats_server": "nats",
}
#: Markers saying a test needs more than Python; a test with none of them is ``unit``.
NEEDS_MORE_THAN_PYTHON = ("server", "redis", "nats", "node", "browser")


def _needs(item: pytest.Item) -> list[str]:
    return [name for name in NEEDS_MORE_THAN_PYTHON if item.get_closest_marker(name)]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with what it needs, and ``unit`` when that is only Python."""
    for item in items:
        for fixture in sorted(PROCESS_FIXTURES.keys() & set(getattr(item, "fixturenames", ()))):
            item.add_marker(PROCESS_FIXTURES[fixture])
        if not _needs(item):
            item.add_marker("unit")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test declared ``unit`` must not start a process: ``-m unit`` promises Python only."""
    needs = _needs(item)
    if item.get_closest_marker("unit") and needs:
        pytest.fail(
            f"{item.nodeid} is in a file marked unit but needs {', '.join(needs)}: "
            "move it to a file of server tests, or drop its process fixture",
            pytrace=False,
        )
