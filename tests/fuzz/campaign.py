"""The long fuzzing campaign: each target of ``targets.py`` under atheris (libFuzzer).

Run it through ``scripts/fuzz`` (see ``docs/fuzzing.md``)::

    ./scripts/fuzz                 # every target, 1,000,000 inputs each
    ./scripts/fuzz http -n 50000   # one target, a shorter run

The driver starts one child process per target, so that a hang, a crash of
the interpreter or a blown memory limit in one target is reported and the
next target still runs. Each child runs libFuzzer coverage-guided over the
tidings package (``atheris.instrument_imports``) starting from the target's
seed corpus, with a per-input timeout (``-timeout``: a hang is a finding) and
a memory ceiling (``-rss_limit_mb``). The child catches what a target raises,
keeps one reproducer per distinct failure and goes on, so one run counts
every finding rather than stopping at the first; it samples its RSS as it
goes, so growth across the run shows as start and end figures.

The driver exits non-zero on any finding, hang or crash.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_RUNS = 1_000_000
#: Seconds one input may take before libFuzzer calls it a hang.
INPUT_TIMEOUT = 10
#: The child is killed past this RSS (libFuzzer's own guard against growth).
RSS_LIMIT_MB = 2048
#: Inputs between RSS samples and progress snapshots.
SAMPLE_EVERY = 5000
_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_LIBFUZZER_ERROR = re.compile(r"ERROR: libFuzzer: .*|Uncaught Python exception.*")


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class _Child:
    """Runs one target under atheris and keeps its figures in a JSON file."""

    def __init__(self, name: str, runs: int, stats_path: Path, findings: Path) -> None:
        import atheris  # type: ignore[import-untyped]

        with atheris.instrument_imports(include=["tidings"]):
            import targets  # imported here, inside the context, to be instrumented

        self.target = targets.TARGETS[name]
        self.name = name
        self.runs = runs
        self.stats_path = stats_path
        self.findings_dir = findings
        self.count = 0
        self.signatures: dict[str, dict[str, Any]] = {}
        self.rss: list[tuple[int, int]] = []
        self.started = time.monotonic()

    def one_input(self, data: bytes) -> None:
        self.count += 1
        try:
            self.target.run(data)
        except Exception as exc:  # every exception is a finding; keep going
            self._record(data, exc)
        if self.count % SAMPLE_EVERY == 0 or self.count == 1000 or self.count >= self.runs:
            self.rss.append((self.count, _rss_kib()))
            self.save()

    def _record(self, data: bytes, exc: Exception) -> None:
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        message = str(exc).splitlines()[0] if str(exc) else ""
        # Numbers and the input's bytes in messages would split one bug into thousands.
        message = re.sub(r"0x[0-9a-f]+|[0-9]+", "N", message)[:60]
        signature = f"{type(exc).__name__} at {where}: {message}"
        seen = self.signatures.get(signature)
        if seen is not None:
            seen["count"] += 1
            return
        self.findings_dir.mkdir(parents=True, exist_ok=True)
        path = self.findings_dir / f"{self.name}-{hashlib.sha1(data).hexdigest()[:12]}.bin"
        path.write_bytes(data)
        self.signatures[signature] = {
            "count": 1,
            "first_input": self.count,
            "reproducer": str(path),
            "example": repr(data[:300]),
            "traceback": "".join(traceback.format_exception(exc))[-3000:],
        }
        print(f"\nFINDING in {self.name}: {signature}\n  reproducer: {path}", file=sys.stderr)
        self.save()

    def save(self) -> None:
        stats = {
            "target": self.name,
            "inputs": self.count,
            "seconds": round(time.monotonic() - self.started, 1),
            "findings": sum(s["count"] for s in self.signatures.values()),
            "distinct_findings": self.signatures,
            "rss_kib": self.rss,
        }
        temporary = self.stats_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(stats, indent=1))
        temporary.replace(self.stats_path)


def run_child(args: argparse.Namespace) -> None:
    import atheris

    child = _Child(args.target, args.runs, Path(args.stats), Path(args.findings))
    # Client mistakes are logged at INFO by design; a million of them would
    # bury libFuzzer's report. The targets' own handler still sees them all.
    logging.getLogger("tidings").propagate = False
    corpus = Path(args.corpus)
    corpus.mkdir(parents=True, exist_ok=True)
    Path(args.findings).mkdir(parents=True, exist_ok=True)
    for index, seed in enumerate(child.target.seeds):
        (corpus / f"seed-{index}").write_bytes(seed)
    argv = [
        sys.argv[0],
        f"-runs={args.runs}",
        f"-max_len={child.target.max_len}",
        f"-timeout={INPUT_TIMEOUT}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-seed={args.seed}",
        # Keep every seed even when it adds no coverage libFuzzer can see: the
        # cursor and command decoders are C (base64, msgspec) under a few lines
        # of Python, and without their seeds the runs start from 2 tiny inputs.
        "-keep_seed=1",
        # A hang's or a crash's input goes with the reproducers, not into the tree.
        f"-artifact_prefix={Path(args.findings)}/",
        "-print_final_stats=1",
        str(corpus),
    ]
    atheris.Setup(argv, child.one_input)
    atheris.Fuzz()


def _figures(stats: dict[str, Any], log: str, wall: float, code: int) -> dict[str, Any]:
    done = _DONE.findall(log)
    inputs = int(done[-1][0]) if done else stats.get("inputs", 0)
    rss = stats.get("rss_kib") or [(0, 0)]
    stopped = _LIBFUZZER_ERROR.search(log)
    return {
        "target": stats.get("target"),
        "inputs": inputs,
        "seconds": round(wall, 1),
        "inputs_per_s": round(inputs / wall) if wall else 0,
        "findings": stats.get("findings", 0),
        "distinct": list(stats.get("distinct_findings", {})),
        "rss_start_mib": round(rss[0][1] / 1024, 1),
        "rss_end_mib": round(rss[-1][1] / 1024, 1),
        "rss_max_mib": round(max(kib for _, kib in rss) / 1024, 1),
        "exit_code": code,
        "hang_or_crash": code != 0,
        # libFuzzer's own verdict when it stopped the run: timeout, out-of-memory, ...
        "libfuzzer_error": stopped.group(0) if stopped else None,
    }


def drive(args: argparse.Namespace) -> int:
    import targets

    names = args.targets or list(targets.TARGETS)
    unknown = [name for name in names if name not in targets.TARGETS]
    if unknown:
        print(f"unknown target(s): {', '.join(unknown)}; known: {', '.join(targets.TARGETS)}")
        return 2
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        if name == "frames" and not targets.frames_available():
            print("frames: tidings.frames is not there yet; skipped")
            continue
        stats_path = work / f"{name}.json"
        stats_path.unlink(missing_ok=True)
        log_path = work / f"{name}.log"
        command = [
            sys.executable,
            __file__,
            "--child",
            name,
            "-n",
            str(args.runs),
            "--stats",
            str(stats_path),
            "--findings",
            str(work / "findings"),
            "--corpus",
            str(work / "corpus" / name),
            "--seed",
            str(args.seed),
        ]
        print(f"{name}: {args.runs} inputs, log in {log_path}", flush=True)
        started = time.monotonic()
        with open(log_path, "w") as log_file:
            code = subprocess.call(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=HERE)
        wall = time.monotonic() - started
        stats = json.loads(stats_path.read_text()) if stats_path.exists() else {"target": name}
        figures = _figures(stats, log_path.read_text(errors="replace"), wall, code)
        results.append(figures)
        print(
            "{target}: {inputs} inputs in {seconds} s ({inputs_per_s}/s), findings {findings}, "
            "RSS {rss_start_mib} -> {rss_end_mib} MiB (max {rss_max_mib}), exit {exit_code}".format(
                **figures
            ),
            flush=True,
        )
        for signature in figures["distinct"]:
            print(f"  finding: {signature}")
        if figures["libfuzzer_error"]:
            print(f"  stopped by libFuzzer: {figures['libfuzzer_error']}")
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"results: {work / 'results.json'}")
    failed = [r["target"] for r in results if r["findings"] or r["hang_or_crash"]]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help="targets to run (default: all)")
    parser.add_argument("-n", "--runs", type=int, default=DEFAULT_RUNS, help="inputs per target")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    parser.add_argument(
        "--workdir",
        default=os.environ.get("TIDINGS_FUZZ_DIR", "/tmp/tidings-fuzz"),
        help="corpora, logs, reproducers and results (default: /tmp/tidings-fuzz)",
    )
    parser.add_argument("--child", dest="target", help=argparse.SUPPRESS)
    parser.add_argument("--stats", help=argparse.SUPPRESS)
    parser.add_argument("--findings", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    if args.target:
        run_child(args)
    else:
        sys.exit(drive(args))


if __name__ == "__main__":
    main()
