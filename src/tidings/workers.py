"""``--workers N``: N server processes on one port, like uvicorn's and gunicorn's.

Each worker is a full server (its own event loop, hub and connections) with a
listening socket bound with ``SO_REUSEPORT``, so the kernel spreads new
connections over the workers without a proxy in front. Workers share channels
only through the broker, which is why more than one needs Redis or NATS. The
parent supervises: it forwards SIGTERM/SIGINT, and restarts a worker that dies
unexpectedly so that one crash does not take a port's capacity away for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

from .config import Config
from .metrics import forget_process, multiprocess_directory

if TYPE_CHECKING:
    from .app import Tidings

log = logging.getLogger(__name__)

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def run_workers(config: Config, loop_factory: LoopFactory, app: Tidings) -> int:
    """Run ``app`` in ``config.workers`` forked processes until SIGTERM/SIGINT.

    The processes are forked after the application's module was imported
    (``--app``), so each worker has its hooks without importing it again.
    """
    if config.port == 0:
        log.error("--workers needs a fixed --port: each worker would otherwise pick its own")
        return 2
    context = multiprocessing.get_context("fork")
    stopping = False
    # One scrape shows every worker: each writes its figures to files here
    # (tidings.metrics, prometheus_client's multiprocess mode), removed at exit.
    remove_metrics = multiprocess_directory()

    def start(index: int) -> BaseProcess:
        process = context.Process(
            target=_worker,
            args=(config, loop_factory, app, os.getpid()),
            name=f"tidings-worker-{index}",
        )
        process.start()
        return process

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for process in workers:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    workers = [start(index) for index in range(config.workers)]
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("started %d workers on port %d", config.workers, config.port)
    while not stopping:
        for index, process in enumerate(workers):
            if not process.is_alive() and not stopping:
                log.error("worker %s exited with %s; restarting it", process.pid, process.exitcode)
                if process.pid is not None:
                    forget_process(process.pid)
                workers[index] = start(index)
        time.sleep(0.2)
    deadline = time.monotonic() + config.timeouts.shutdown + 2
    for process in workers:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
    remove_metrics()
    return 0


def _die_with_parent(parent: int) -> None:
    """Get SIGTERM when the supervisor dies, even by SIGKILL (Linux only)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _worker(config: Config, loop_factory: LoopFactory, app: Tidings, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; SIGTERM stops us
    _die_with_parent(parent)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(app.run(config, reuse_port=True))
