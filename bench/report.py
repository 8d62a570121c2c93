"""Turn benchmark results into the printed tables, the target check and PNG charts.

Ratios are always *this server / the other*, so for every figure here (memory,
CPU, time) lower is better, except connections/s and deliveries/s where higher
is better; the column headers say which.

The printed Markdown is the form of ``RESULTS_PAGE``, which keeps the latest
run of each mode (the method is in docs/benchmarks.md): after a run worth
keeping, replace that mode's section there, with the date, commit and command.
"""

from __future__ import annotations

import math
import os
import platform
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

Result = dict[str, Any]

#: Where the latest figures of each mode are kept, named in every printed report.
RESULTS_PAGE = "docs/benchmark-results.md"

# (key, header, getter, higher_is_better)
Metric = tuple[str, str, Callable[[Result], float | None], bool]


def _get(*path: str) -> Callable[[Result], float | None]:
    def get(r: Result) -> float | None:
        v: Any = r
        for p in path:
            if not isinstance(v, dict) or p not in v:
                return None
            v = v[p]
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    return get


METRICS: list[Metric] = [
    ("conn_s", "conn/s", _get("connect", "per_s"), True),
    ("rss", "RSS B/conn", _get("idle", "rss_per_conn_b"), False),
    ("slab", "slab B/conn", _get("idle", "slab_per_conn_b"), False),
    ("cpu", "CPU µs/deliv", _get("fanout", "cpu_us_per_delivery"), False),
    ("dps", "deliv/s", _get("fanout", "deliveries_per_s"), True),
    ("ttl50", "last ms p50", _get("fanout", "ttl_ms_median"), False),
    ("ttl99", "last ms p99", _get("fanout", "ttl_ms_p99"), False),
    ("lat50", "lat ms p50", _get("latency", "p50_ms"), False),
    ("lat99", "lat ms p99", _get("latency", "p99_ms"), False),
    ("latmax", "lat ms max", _get("latency", "max_ms"), False),
]
RATIO_KEYS = ("rss", "cpu", "dps", "ttl99", "lat99")


def fmt(v: float | None) -> str:
    """Compact number: 3 significant figures, thousands separators for big ones."""
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def delivered(r: Result) -> str:
    """``delivered/expected`` over fan-out and latency phases."""
    d = e = 0
    for phase in ("fanout", "latency"):
        if phase in r:
            d += r[phase]["delivered"]
            e += r[phase]["expected"]
    return f"{d}/{e}" if e else "-"


def one_line(r: Result) -> str:
    """Progress line printed as each (server, transport) finishes."""
    head = f"{r['server']:14} {r['transport']:5} N={r['n']}"
    if r.get("skipped"):
        return f"{head}: skipped: {r['skipped']}"
    parts = [f"{h}={fmt(g(r))}" for k, h, g, _ in METRICS if k in ("conn_s", "rss", "cpu", "ttl99")]
    parts.append(f"delivered={delivered(r)}")
    if r.get("error"):
        parts.append(f"ERROR {r['error'][:200]}")
    return f"{head}: " + "  ".join(parts) + f"  ({r.get('wall_s', '?')} s)"


def _md_table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _by(results: list[Result]) -> dict[tuple[int, str, str], Result]:
    return {
        (r["n_requested"] if "n_requested" in r else r["n"], r["transport"], r["server"]): r
        for r in results
        if not r.get("skipped")
    }


def tables(results: list[Result]) -> str:
    """Absolute figures with ratio to the floor, then tidings against every peer."""
    out: list[str] = []
    by = _by(results)
    for n in sorted({k[0] for k in by}):
        for transport in ("sse", "ws", "poll"):
            rows = [r for (nn, t, _), r in by.items() if nn == n and t == transport]
            if not rows:
                continue
            floor = by.get((n, transport, "floor"))
            header = ["server"] + [h for _, h, _, _ in METRICS] + ["delivered"]
            body = []
            for r in rows:
                cells = [r["server"] + (f" (N={r['n']})" if r["n"] != n else "")]
                for key, _, g, _ in METRICS:
                    v = g(r)
                    cell = fmt(v)
                    if key in RATIO_KEYS and floor and r is not floor:
                        fv = g(floor)
                        if v is not None and fv:
                            cell += f" ({v / fv:.2f}x)"
                    cells.append(cell)
                cells.append(delivered(r) + (" ERR" if r.get("error") else ""))
                body.append(cells)
            out.append(f"\n### {transport.upper()}, N = {n:,}  (x = ratio to the floor)\n")
            out.append(_md_table(header, body))
            tid = by.get((n, transport, "tidings"))
            peers = [r for r in rows if r["server"] != "tidings"]
            if tid and peers:
                header = ["tidings / peer"] + [h for k, h, _, _ in METRICS if k in RATIO_KEYS]
                body = []
                for p in peers:
                    cells = [p["server"]]
                    for key, _, g, _ in METRICS:
                        if key not in RATIO_KEYS:
                            continue
                        a, b = g(tid), g(p)
                        cells.append(f"{a / b:.2f}" if a is not None and b else "-")
                    body.append(cells)
                out.append(
                    f"\ntidings / peer, {transport.upper()}, N = {n:,} "
                    "(below 1 is better for tidings except deliv/s)\n"
                )
                out.append(_md_table(header, body))
    errors = [r for r in results if r.get("error") or r.get("skipped")]
    if errors:
        out.append("\nNot measured / errors:")
        for r in errors:
            why = r.get("skipped") or r.get("error")
            out.append(f"- {r['server']} {r['transport']} N={r['n']}: {str(why)[:300]}")
    out.append(f"\n(Tables in the form of {RESULTS_PAGE}, which keeps the latest run per mode.)")
    return "\n".join(out)


TARGETS = "Targets (issue 6)"


def targets(results: list[Result]) -> str:
    """tidings against the targets of issue 6, per N."""
    by = _by(results)
    lines = [f"\n### {TARGETS}\n"]
    rows = []
    for n in sorted({k[0] for k in by}):
        for t, limit in (("sse", 2.5), ("poll", 2.5), ("ws", 4.0)):
            r = by.get((n, t, "tidings"))
            v = _get("idle", "rss_per_conn_b")(r) if r else None
            if v is not None:
                rows.append(
                    [
                        f"{n:,}",
                        f"RSS/idle conn {t.upper()} <= {limit} KiB",
                        f"{v / 1024:.2f} KiB",
                        "meets" if v <= limit * 1024 else "MISSES",
                    ]
                )
        for t in ("sse", "ws"):
            checks = (
                ("cpu", "floor", "CPU/delivery <= 1.15x floor", 1.15, False),
                ("dps", "nchan", "deliveries/s >= Nchan", 1.0, True),
                ("ttl99", "floor", "p99 publish-to-last <= 1.2x floor", 1.2, False),
            )
            for key, peer, label, bound, higher in checks:
                g = next(m[2] for m in METRICS if m[0] == key)
                r, p = by.get((n, t, "tidings")), by.get((n, t, peer))
                a, b = (g(r) if r else None), (g(p) if p else None)
                if a is None or not b:
                    if r:
                        rows.append(
                            [
                                f"{n:,}",
                                f"{label} ({t.upper()})",
                                f"{fmt(a)} vs {peer} -",
                                "not measured",
                            ]
                        )
                    continue
                ratio = a / b
                ok = ratio >= bound if higher else ratio <= bound
                measured = f"{fmt(a)} vs {fmt(b)} = {ratio:.2f}x"
                floor = by.get((n, t, "floor"))
                fv = g(floor) if floor and peer != "floor" else None
                if fv is not None:  # what the bare loop reaches in the same run
                    measured += f" (floor: {fv / b:.2f}x)"
                rows.append(
                    [f"{n:,}", f"{label} ({t.upper()})", measured, "meets" if ok else "MISSES"]
                )
    if not rows:
        return ""
    lines.append(_md_table(["N", "target", "measured", "verdict"], rows))
    return "\n".join(lines)


def charts(results: list[Result], outdir: Path, label: str) -> list[Path]:
    """Memory/conn, CPU/delivery and latency percentile bar charts (PNG, Agg)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no charts (run bench/setup.sh)", file=sys.stderr)
        return []
    by = _by(results)
    paths = []
    for n in sorted({k[0] for k in by}):
        combos = sorted(
            ((t, s) for (nn, t, s) in by if nn == n),
            key=lambda ts: (("sse", "ws", "poll").index(ts[0]), ts[1]),
        )
        names = [f"{s}\n{t}" for t, s in combos]
        colors = [
            "tab:red" if s == "tidings" else "tab:gray" if s == "floor" else "tab:blue"
            for _, s in combos
        ]
        for key, title, unit, get, scale in (
            (
                "memory",
                "server RSS per idle connection",
                "KiB",
                _get("idle", "rss_per_conn_b"),
                1 / 1024,
            ),
            (
                "cpu",
                "server CPU per delivered message (broadcast)",
                "µs",
                _get("fanout", "cpu_us_per_delivery"),
                1.0,
            ),
        ):
            raw = [get(by[(n, t, s)]) for t, s in combos]
            vals = [(v or 0) * scale for v in raw]
            fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.8), 4))
            ax.bar(range(len(names)), vals, color=colors)
            ax.set_xticks(range(len(names)), names, fontsize=7)
            ax.set_ylabel(unit)
            positive = [v for v in vals if v > 0]
            if positive and max(positive) > 20 * min(positive):
                ax.set_yscale("log")
            ax.set_title(f"{title}, N={n:,} ({label})")
            for i, v in enumerate(vals):
                label_text = fmt(v) if raw[i] is not None else "failed"
                ax.text(
                    i, v or min(positive or [1]), label_text, ha="center", va="bottom", fontsize=7
                )
            fig.tight_layout()
            path = outdir / f"{label}-n{n}-{key}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
        fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.8), 4))
        width = 0.27
        for j, (k, lab) in enumerate((("p50_ms", "p50"), ("p99_ms", "p99"), ("max_ms", "max"))):
            vals = [_get("latency", k)(by[(n, t, s)]) or 0 for t, s in combos]
            ax.bar([i + (j - 1) * width for i in range(len(names))], vals, width, label=lab)
        ax.set_xticks(range(len(names)), names, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title(f"publish-to-receive latency under load, N={n:,} ({label})")
        ax.legend()
        fig.tight_layout()
        path = outdir / f"{label}-n{n}-latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def machine(label: str, mode: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Where and how the figures were taken."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "mode": label,
        "params": mode,
        "seconds": round(seconds, 1),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
    }


def _mib(kib: float | None) -> str:
    return "-" if kib is None else f"{kib / 1024:,.1f} MiB"


def limits_table(rows: list[dict[str, Any]]) -> str:
    """The kernel and process limits the scale run checked, and the verdict on each."""
    body = [
        [
            r["name"],
            r["value"] + (f" (was {r['raised_from']})" if r.get("raised_from") else ""),
            r["need"],
            "ok" if r["ok"] else "**stops the run**",
            r.get("note", ""),
        ]
        for r in rows
    ]
    return _md_table(["limit", "value", "this run needs", "verdict", "why"], body)


def scale_table(r: Result) -> str:
    """The scale run: a summary, the connect steps, and the workers' spread."""
    n, k = r["n"], r["broadcasts"]
    mem, fan, conn = r.get("memory", {}), r.get("fanout", {}), r.get("connect", {})
    held = r.get("subscribed", 0)
    kinds = r.get("subscribed_by_transport", {})
    lost = fan.get("lost_connections")
    ttl = [_get("fanout", key)(r) for key in ("ttl_ms_median", "ttl_ms_p99", "ttl_ms_max")]
    detail = r.get("workers_detail", [])
    conns = [w["connections"] for w in detail]
    rows = [
        [
            "subscribers (subscribed / asked)",
            f"{held:,} / {n:,} (" + ", ".join(f"{t} {c:,}" for t, c in kinds.items()) + ")",
        ],
        [
            "processes",
            f"{r['workers']} tidings workers + Redis; {r['client_processes']} load processes",
        ],
        [
            "time to connect all (connect + subscribe)",
            f"{fmt(conn.get('seconds'))} s, {fmt(conn.get('per_s'))} conn/s",
        ],
        [
            "connections per worker",
            f"{min(conns):,} - {max(conns):,}" if conns else "-",
        ],
        [
            "server RSS per connection (user space)",
            f"{fmt(mem.get('server_rss_per_conn_b'))} B (workers' RSS delta / N; PSS "
            f"{fmt(mem.get('server_pss_per_conn_b'))} B); workers "
            f"{_mib(mem.get('workers_rss_kib'))} RSS, {_mib(mem.get('workers_pss_kib'))} PSS",
        ],
        [
            "kernel slab per socket",
            f"{fmt(mem.get('slab_per_socket_b'))} B ({fmt(mem.get('slab_per_conn_b'))} B per "
            "connection, both ends; Slab delta); objects in use "
            f"{fmt(mem.get('slab_objects_per_socket_b'))} B (slabinfo delta)",
        ],
        [
            "load generator RSS per connection",
            f"{fmt(mem.get('client_rss_per_conn_b'))} B ({_mib(mem.get('clients_rss_kib'))})",
        ],
        [
            "machine memory per connection (MemAvailable delta / N)",
            f"{fmt(mem.get('machine_used_per_conn_b'))} B",
        ],
        [
            "Redis RSS",
            f"{_mib(mem.get('redis_rss_kib'))} held, "
            f"{_mib(mem.get('redis_rss_after_broadcasts_kib'))} after the broadcasts",
        ],
        [
            "TCP buffer pages (sockstat mem)",
            f"{fmt(mem.get('tcp_mem_pages_idle'))} idle, {fmt(mem.get('tcp_mem_pages_peak'))} peak",
        ],
        [
            f"broadcast: publish to last delivery (K = {k})",
            "p50 {} / p99 {} / max {} ms".format(*(fmt(v) for v in ttl)),
        ],
        [
            "deliveries counted / N x K",
            f"{fan.get('delivered', 0):,} / {held * k:,}"
            + (f" (lost connections: {lost})" if lost else ""),
        ],
        [
            "server CPU per delivery",
            f"{fmt(fan.get('cpu_us_per_delivery'))} µs (median of rounds, all workers); load "
            f"generator {fmt(fan.get('clients_cpu_us_per_delivery'))} µs",
        ],
        ["largest N held", f"{r.get('largest_n_held', held):,}"],
    ]
    if r.get("limit"):
        rows.append(["what stopped it", str(r["limit"])])
    kinds_label = "+".join(r.get("transports", [r.get("transport", "sse")]))
    out = [f"\n### Scale: N = {n:,} ({kinds_label}), {r['workers']} workers + Redis\n"]
    out.append(_md_table(["figure", "value"], rows))
    steps = r.get("steps", [])
    if steps:
        out.append("")
        out.append(
            _md_table(
                ["held", "step conn/s", "workers RSS", "load RSS", "slab", "RAM used", "failures"],
                [
                    [
                        f"{s['held']:,}",
                        fmt(s.get("per_s")),
                        _mib(s["workers_rss_kib"]),
                        _mib(s["clients_rss_kib"]),
                        _mib(s["slab_kib"]),
                        f"{s['memory_used']:.1%}",
                        str(s["failures"] or "-"),
                    ]
                    for s in steps
                ],
            )
        )
    slab = mem.get("slab_caches_per_socket_b")
    if slab:
        out.append(
            "\nslab caches that grew, B per socket: "
            + ", ".join(f"{name} {fmt(v)}" for name, v in slab.items())
        )
    if r.get("error"):
        out.append(f"\nERROR: {r['error'][:500]}")
    if r.get("leftover_pids"):
        out.append(f"\nprocesses still alive after cleanup: {r['leftover_pids']}")
    return "\n".join(out)


def scale_chart(r: Result, outdir: Path) -> Path | None:
    """Memory held against subscribers, step by step: server, load generator, kernel slab."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no charts (run bench/setup.sh)", file=sys.stderr)
        return None
    base = r.get("base", {})
    steps = r["steps"]
    xs = [0] + [s["held"] / 1000 for s in steps]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, base_key, label in (
        ("slab_kib", "slab_kib", "kernel slab (both ends)"),
        ("workers_rss_kib", "workers_rss_kib", "tidings workers' RSS"),
        ("clients_rss_kib", "clients_rss_kib", "load generator RSS"),
    ):
        b = base.get(base_key, 0)
        ax.plot(xs, [0] + [(s[key] - b) / 2**20 for s in steps], marker="o", label=label)
    ax.set_xlabel("subscribers held (thousands)")
    ax.set_ylabel("GiB above the start")
    kinds = "+".join(r.get("transports", []))
    ax.set_title(f"memory while connecting, {kinds}, {r['workers']} workers + Redis")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = outdir / f"scale-n{r['n']}-memory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
