"""Short chaos runs in the suite: no publication lost, duplicated or reordered, no silent gap.

Real processes only: two ``tidings serve`` nodes on one ``redis-server``, and one
node on the memory broker; clients on every transport (SSE, long-poll, poll,
WebSocket through centrifuge-python) each follow 4 of 8 channels through a
cuttable proxy; a publisher at 150/s through ``POST /api/publish``; faults at
random. Together the two runs inject over 200 faults (each test asserts its
share), across every kind below and every transport. The long run is
``bench/chaos.py`` (docs/chaos.md).

Fault kinds run here, all passing on ``main`` when this file was written:
``cut``, ``node_kill`` and ``redis_pause`` on Redis; ``cut`` and ``node_kill`` on
the memory broker.

Known failures, left out here and NOT marked xfail (issue 12); all break long-poll
only, SSE, poll and WebSocket clients kept the promise in the same runs:

* ``redis_restart`` (Redis restarted with its data; its clients' pub/sub links
  drop): intermittent, one episode in a 600 s run with 36 restarts, none in two
  90 s runs with 36. One held long-poll answer repeats offsets (407..410, 409..411:
  issue 12 "A long-poll cursor goes backwards"), at once in both long-poll clients.
* ``pubsub_kill`` (a node's Redis pub/sub link killed), mixed with cuts, node kills
  and Redis restarts: a held long-poll is answered with the channel's whole history
  again (offsets 50..56 then 1..56 in one answer: issue 12 "Whole history
  replayed"); once, a silent gap in one answer (339..342 then 344: "A silent gap").
  Intermittent, about one run of 90 s in two. Re-run at 514462e (catch-up fixed):
  no replay, but one silent gap (474, 476), one offset twice in one answer, and a
  node traceback (``redis_pubsub._flush`` writing on a closed transport)::

    .venv/bin/python bench/chaos.py --duration 90 --transports longpoll --clients 4
        --faults cut=3,node_kill=1,pubsub_kill=3,redis_pause=1,redis_restart=1
        --interval 0.1,0.3 --seed 12    (one command)

* ``redis_wipe`` (Redis restarted without its data): a held long-poll is answered
  with the new epoch's publications from offset 2 on, without ``unrecovered``: a
  silent epoch change, and offset 1 lost. Every run::

    .venv/bin/python bench/chaos.py --duration 60 --faults redis_wipe=1 --transports longpoll

Once fixed, add them to ``REDIS_FAULTS``.

tidings.js in headless Chromium (:mod:`chaos.browser`) has runs of its own, marked
``browser`` like ``tests/test_browser.py``: one client of each browser kind (the
transport tidings.js picks, and each transport pinned), ``cut`` and ``node_kill``,
on Redis and on the memory broker.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from browser_support import require_browser
from chaos.clients import BROWSER_KINDS
from chaos.harness import ChaosConfig, run_chaos, save
from chaos.invariants import Report

#: Per run: long enough for its share of the 200 faults, short enough for the suite.
REDIS_SECONDS = 90.0
MEMORY_SECONDS = 45.0
#: Faults come quicker than in the long run (and cuts, which take no time, more
#: often) so that a short run reaches its count.
INTERVAL = (0.1, 0.3)
REDIS_FAULTS: dict[str, float] = {"cut": 6, "node_kill": 1, "redis_pause": 1}
MEMORY_FAULTS: dict[str, float] = {"cut": 4, "node_kill": 1}
#: The browser runs: shorter (five pages in one Chromium are most of the machine's load).
#: Cuts take no time, a node kill waits for the restarted node (seconds on a loaded
#: machine): more cuts, so that the count of faults depends less on the load.
BROWSER_SECONDS = 40.0
BROWSER_FAULTS: dict[str, float] = {"cut": 8, "node_kill": 1}


def run(cfg: ChaosConfig, tmp_path: Path) -> Report:
    report = asyncio.run(run_chaos(cfg))
    save(report, tmp_path / "chaos-report.json")
    print(report.table())
    return report


def assert_kept_promise(report: Report, min_faults: int, kinds: set[str]) -> None:
    table = report.table()
    seen = {f.kind for f in report.faults}
    assert len(report.faults) >= min_faults, f"only {len(report.faults)} faults\n{table}"
    assert seen == kinds, f"fault kinds injected: {seen}, expected {kinds}\n{table}"
    for transport, row in report.rows.items():
        assert row["checked"] > 0, f"{transport} checked nothing\n{table}"
    # The records around the first violations say what happened (the JSON file in
    # tmp_path has them all, but a shared /tmp may rotate it away).
    contexts = json.dumps(report.contexts[:3], indent=1)
    assert not report.violations, f"{len(report.violations)} violations\n{table}\n{contexts}"
    assert report.tracebacks == 0, f"unhandled exception in a node\n{table}"


@pytest.mark.server
@pytest.mark.redis
@pytest.mark.timeout(REDIS_SECONDS + 120)
def test_two_nodes_on_redis_under_every_fault(tmp_path: Path) -> None:
    cfg = ChaosConfig(
        duration=REDIS_SECONDS,
        nodes=2,
        broker="redis",
        fault_interval=INTERVAL,
        faults=REDIS_FAULTS,
        workdir=tmp_path,
    )
    report = run(cfg, tmp_path)
    assert_kept_promise(report, min_faults=120, kinds=set(REDIS_FAULTS))


@pytest.mark.server
@pytest.mark.timeout(MEMORY_SECONDS + 120)
def test_one_node_on_memory_broker_cut_and_killed(tmp_path: Path) -> None:
    cfg = ChaosConfig(
        duration=MEMORY_SECONDS,
        nodes=1,
        broker="memory",
        fault_interval=INTERVAL,
        faults=MEMORY_FAULTS,
        workdir=tmp_path,
    )
    report = run(cfg, tmp_path)
    assert_kept_promise(report, min_faults=80, kinds=set(MEMORY_FAULTS))
    # A restarted memory broker has lost its history: clients are told so.
    assert report.totals["signals"] > 0, report.table()


@pytest.mark.server
@pytest.mark.browser
@pytest.mark.timeout(BROWSER_SECONDS + 150)
@pytest.mark.parametrize("broker", [pytest.param("redis", marks=pytest.mark.redis), "memory"])
def test_tidings_js_in_chromium_cut_and_killed(tmp_path: Path, broker: str) -> None:
    require_browser()
    cfg = ChaosConfig(
        duration=BROWSER_SECONDS,
        nodes=2 if broker == "redis" else 1,
        broker=broker,
        transports=tuple(BROWSER_KINDS),
        clients_per_transport=1,
        fault_interval=INTERVAL,
        faults=BROWSER_FAULTS,
        workdir=tmp_path,
    )
    report = run(cfg, tmp_path)
    assert_kept_promise(report, min_faults=30, kinds=set(BROWSER_FAULTS))
    assert set(report.rows) == set(BROWSER_KINDS), report.table()
    if broker == "memory":
        # A restarted memory broker has lost its history: tidings.js says so.
        assert report.totals["signals"] > 0, report.table()
