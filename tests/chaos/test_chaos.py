"""Short chaos runs in the suite: no publication lost, duplicated or reordered, no silent gap.

Real processes only: two ``tidings serve`` nodes on one ``redis-server``, and one
node on the memory broker; clients on every transport (SSE, long-poll, poll,
WebSocket through centrifuge-python) each follow 4 of 8 channels through a
cuttable proxy; a publisher at 150/s through ``POST /api/publish``; faults at
random. Together the two runs inject well over 200 faults (each test asserts its
share), across every kind below and every transport. The long run is
``bench/chaos.py`` (docs/chaos.md).

Fault kinds run here: ``cut``, ``node_kill``, ``pubsub_kill``, ``redis_pause``,
``redis_restart`` (with its data) and ``redis_wipe`` (without: clients must be
told ``unrecovered``) on Redis; ``cut`` and ``node_kill`` on the memory broker.

Known failures (issue 12): none of the kinds above broke the invariant on
``main`` when this file was written; see docs/chaos.md for the runs and what
each would have shown.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chaos.harness import ChaosConfig, run_chaos, save
from chaos.invariants import Report

#: Per run: long enough for ~100+ faults, short enough for the suite (minutes).
REDIS_SECONDS = 75.0
MEMORY_SECONDS = 40.0
#: Faults come quicker than in the long run so that a short run reaches its count.
INTERVAL = (0.1, 0.4)


def run(cfg: ChaosConfig, tmp_path: Path) -> Report:
    import asyncio

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
    assert report.ok, f"{len(report.violations)} violations\n{table}"


@pytest.mark.server
@pytest.mark.redis
@pytest.mark.timeout(REDIS_SECONDS + 120)
def test_two_nodes_on_redis_under_every_fault(tmp_path: Path) -> None:
    cfg = ChaosConfig(
        duration=REDIS_SECONDS, nodes=2, broker="redis", fault_interval=INTERVAL, workdir=tmp_path
    )
    report = run(cfg, tmp_path)
    assert_kept_promise(
        report,
        min_faults=130,
        kinds={"cut", "node_kill", "pubsub_kill", "redis_pause", "redis_restart", "redis_wipe"},
    )
    # redis_wipe loses history: each wipe must have been announced to the clients.
    assert report.totals["signals"] > 0, report.table()


@pytest.mark.server
@pytest.mark.timeout(MEMORY_SECONDS + 120)
def test_one_node_on_memory_broker_cut_and_killed(tmp_path: Path) -> None:
    cfg = ChaosConfig(
        duration=MEMORY_SECONDS,
        nodes=1,
        broker="memory",
        fault_interval=INTERVAL,
        faults={"cut": 4, "node_kill": 1},
        workdir=tmp_path,
    )
    report = run(cfg, tmp_path)
    assert_kept_promise(report, min_faults=80, kinds={"cut", "node_kill"})
    # A restarted memory broker has lost its history: clients are told so.
    assert report.totals["signals"] > 0, report.table()
