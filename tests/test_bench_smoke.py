"""Smoke test of the benchmark harness: quick mode, tiny N, tidings alone.

Keeps ``bench/`` from rotting without making a benchmark part of the test
suite: it asserts that every phase produced numbers and that every published
message reached every subscriber, never how fast (no duration is asserted).
Peers that need apt packages (Nchan) are not started here (the tests must not
install them); the lecture's models (Twisted, Tornado, gevent: pip packages of
the ``bench`` extra) are, each at the same tiny N.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from brokers_support import find_binary

pytestmark = pytest.mark.server  # runs bench/run.py, which starts the servers it measures

ROOT = Path(__file__).resolve().parent.parent
N = 50
K = 3


def run_bench(tmp_path: Path, transport: str, server: str = "tidings") -> dict[str, Any]:
    """``bench/run.py --quick`` for one server and transport; returns its single result."""
    out = tmp_path / f"{server}-{transport}.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "run.py"),
        "--quick",
        "--n",
        str(N),
        "--servers",
        server,
        "--transports",
        transport,
        "--broadcasts",
        str(K),
        "--latency-seconds",
        "0.5",
        "--no-charts",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert len(results) == 1, results
    result: dict[str, Any] = results[0]
    return result


def check(result: dict[str, Any]) -> None:
    assert result.get("error") is None, result.get("error")
    assert result["ok"] is True
    assert result["connect"]["ok"] == N
    assert result["connect"]["per_s"] > 0
    assert result["idle"]["connections"] == N
    assert isinstance(result["idle"]["rss_per_conn_b"], float)
    fan = result["fanout"]
    assert fan["expected"] == K * N
    assert fan["delivered"] == fan["expected"]
    assert fan["cpu_us_per_delivery"] > 0
    assert fan["ttl_ms_median"] > 0
    lat = result["latency"]
    assert lat["published"] > 0
    assert lat["expected"] == lat["published"] * N
    assert lat["delivered"] == lat["expected"]
    assert lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"]


@pytest.mark.timeout(180)
def test_bench_quick_sse(tmp_path: Path) -> None:
    check(run_bench(tmp_path, "sse"))


@pytest.mark.timeout(180)
def test_bench_quick_poll(tmp_path: Path) -> None:
    check(run_bench(tmp_path, "poll"))


@pytest.mark.timeout(180)
def test_bench_quick_websocket(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "ws")
    if "status 404" in str(result.get("error")):
        pytest.skip("server answers 404 on /connection/websocket (WebSocket transport missing)")
    check(result)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("peer", ["twisted", "tornado", "gevent"])
def test_bench_quick_lecture_model(tmp_path: Path, peer: str) -> None:
    """Each of the lecture's models (bench/peers/<peer>_sse.py, server and library of that
    name) starts, takes N SSE subscribers and delivers every broadcast and every
    publication of the latency phase."""
    # The test extra installs the three libraries: a missing one is a failure, not a skip.
    check(run_bench(tmp_path, "sse", peer))


@pytest.mark.redis
@pytest.mark.timeout(180)
def test_bench_scale(tmp_path: Path) -> None:
    """``--scale`` at tiny N: 2 workers + Redis, SSE and WebSocket half each, connected in
    two steps; every broadcast counted on every subscriber, the kernel limits checked,
    nothing left running."""
    find_binary("redis-server", "redis-server")  # the scenario starts its own
    out = tmp_path / "scale.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "run.py"),
        "--scale",
        "--n",
        str(N),
        "--step",
        str(N // 2),
        "--workers",
        "2",
        "--broadcasts",
        str(K),
        "--no-raise",  # a test never changes the machine's sysctls
        "--no-charts",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 1, runs
    result = runs[0]["result"]
    assert result.get("error") is None, result.get("error")
    assert result.get("limit") is None, result.get("limit")
    assert result["ok"] is True
    assert result["subscribed"] == N
    assert result["subscribed_by_transport"] == {"sse": N // 2, "ws": N - N // 2}
    assert [s["held"] for s in result["steps"]] == [N // 2, N]
    assert sum(w["connections"] for w in result["workers_detail"]) == N
    assert result["fanout"]["delivered"] == N * K
    checked = {row["name"] for row in result["limits"]}
    assert {"fs.file-max", "net.ipv4.tcp_mem", "net.ipv4.ip_local_port_range"} <= checked
    assert all(row["raised_from"] is None for row in result["limits"])
    assert result["leftover_pids"] == []


ROOMS, PER_ROOM = 10, 5  # bench/rooms.py's QUICK sizes


@pytest.mark.timeout(300)
def test_bench_rooms_quick(tmp_path: Path) -> None:
    """``--rooms --quick`` against tidings, every transport and publish method: each
    step published what it scheduled, and each publication reached every subscriber
    of its room and no one else. How fast, and so how many steps ran, is not asserted."""
    out = tmp_path / "rooms.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "run.py"),
        "--rooms",
        "--quick",
        "--servers",
        "tidings",
        "--transports",
        "sse,ws,poll",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [r["transport"] for r in results] == ["sse", "ws", "poll"]
    for result in results:
        assert result.get("error") is None, result.get("error")
        assert result["ok"] is True
        assert result["subscribed"] == ROOMS * PER_ROOM
        assert set(result["methods"]) == {"publish", "batch", "inproc"}
        for method, got in result["methods"].items():
            assert got["steps"], method
            for step in got["steps"]:
                where = (result["transport"], method, step["rate"])
                assert step["errors"] == {}, where
                assert step["skipped"] == 0, where
                assert step["published"] == step["scheduled"] > 0, where
                assert step["expected"] == step["published"] * PER_ROOM, where
                assert step["delivered"] == step["expected"], where
                assert step["extra"] == 0, where
                assert step["p50_ms"] <= step["p99_ms"] <= step["max_ms"], where
