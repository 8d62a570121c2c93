"""Short chaos runs in the suite: no publication lost, duplicated or reordered, no silent gap.

Real processes only: two ``tidings serve`` nodes on one ``redis-server``, and one
node on the memory broker; clients on every transport (SSE, long-poll, poll,
WebSocket through centrifuge-python) each follow 4 of 8 channels through a
cuttable proxy; a publisher at 150/s through ``POST /api/publish``; faults at
random. Together the two runs inject over 200 faults (each test asserts its
share), across every kind below and every transport. The long run is
``bench/chaos.py`` (docs/chaos.md).

Every fault kind runs here: ``cut``, ``node_kill``, ``pubsub_kill``,
``redis_pause``, ``redis_restart`` and ``redis_wipe`` on Redis; ``cut`` and
``node_kill`` on the memory broker. Each run is counted in faults, not seconds
(``max_faults``; ``duration`` is only a cap): a node restart takes seconds on a
loaded machine, and a run of fixed length then injected too few to mean much.

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

#: Faults per run (together over 200), and the cap on each run's seconds of faults.
REDIS_COUNT, REDIS_CAP = 140, 300.0
MEMORY_COUNT, MEMORY_CAP = 70, 200.0
#: Faults come quicker than in the long run (and cuts, which take no time, more
#: often) so that a short run reaches its count.
INTERVAL = (0.1, 0.3)
REDIS_FAULTS: dict[str, float] = {
    "cut": 6,
    "node_kill": 1,
    "pubsub_kill": 2,
    "redis_pause": 1,
    "redis_restart": 1,
    "redis_wipe": 1,
}
MEMORY_FAULTS: dict[str, float] = {"cut": 4, "node_kill": 1}
#: The browser runs (five pages in one Chromium are most of the machine's load).
BROWSER_COUNT, BROWSER_CAP = 40, 200.0
BROWSER_FAULTS: dict[str, float] = {"cut": 8, "node_kill": 1}


def run(cfg: ChaosConfig, tmp_path: Path) -> Report:
    report = asyncio.run(run_chaos(cfg))
    save(report, tmp_path / "chaos-report.json")
    print(report.table())
    return report


def assert_kept_promise(report: Report, count: int, kinds: set[str]) -> None:
    table = report.table()
    seen = {f.kind for f in report.faults}
    assert len(report.faults) == count, f"{len(report.faults)} faults within the cap\n{table}"
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
@pytest.mark.timeout(REDIS_CAP + 120)
def test_two_nodes_on_redis_under_every_fault(tmp_path: Path) -> None:
    cfg = ChaosConfig(
        duration=REDIS_CAP,
        max_faults=REDIS_COUNT,
        nodes=2,
        broker="redis",
        fault_interval=INTERVAL,
        faults=REDIS_FAULTS,
        workdir=tmp_path,
    )
    report = run(cfg, tmp_path)
    assert_kept_promise(report, REDIS_COUNT, kinds=set(REDIS_FAULTS))
    # Redis restarted without its data lost history: clients are told so.
    assert report.totals["signals"] > 0, report.table()


@pytest.mark.server
@pytest.mark.timeout(MEMORY_CAP + 120)
def test_one_node_on_memory_broker_cut_and_killed(tmp_path: Path) -> None:
    cfg = ChaosConfig(
        duration=MEMORY_CAP,
        max_faults=MEMORY_COUNT,
        nodes=1,
        broker="memory",
        fault_interval=INTERVAL,
        faults=MEMORY_FAULTS,
        workdir=tmp_path,
    )
    report = run(cfg, tmp_path)
    assert_kept_promise(report, MEMORY_COUNT, kinds=set(MEMORY_FAULTS))
    # A restarted memory broker has lost its history: clients are told so.
    assert report.totals["signals"] > 0, report.table()


@pytest.mark.server
@pytest.mark.browser
@pytest.mark.timeout(BROWSER_CAP + 150)
@pytest.mark.parametrize("broker", [pytest.param("redis", marks=pytest.mark.redis), "memory"])
def test_tidings_js_in_chromium_cut_and_killed(tmp_path: Path, broker: str) -> None:
    require_browser()
    cfg = ChaosConfig(
        duration=BROWSER_CAP,
        max_faults=BROWSER_COUNT,
        nodes=2 if broker == "redis" else 1,
        broker=broker,
        transports=tuple(BROWSER_KINDS),
        clients_per_transport=1,
        fault_interval=INTERVAL,
        faults=BROWSER_FAULTS,
        workdir=tmp_path,
    )
    report = run(cfg, tmp_path)
    assert_kept_promise(report, BROWSER_COUNT, kinds=set(BROWSER_FAULTS))
    assert set(report.rows) == set(BROWSER_KINDS), report.table()
    if broker == "memory":
        # A restarted memory broker has lost its history: tidings.js says so.
        assert report.totals["signals"] > 0, report.table()
