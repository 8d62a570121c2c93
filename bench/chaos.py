"""The long chaos run: ``python bench/chaos.py --duration 600 --nodes 2 --broker redis``.

Starts real ``tidings serve`` nodes (and redis-server), clients on every transport
through cuttable proxies, a publisher at a steady rate and a fault injector; prints
the report (per transport, per fault kind) and writes it as JSON. Exit status 1
when any publication was lost, duplicated or reordered, or a gap was silent.
The harness itself is ``tests/chaos/`` (see docs/chaos.md).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
# Before bench/ (this script's directory), where this very file is also called chaos.
sys.path.insert(0, str(TESTS))

from chaos.cluster import FAULTS  # noqa: E402
from chaos.harness import ChaosConfig, run_chaos, save  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of faults")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--broker", choices=("redis", "memory"), default="redis")
    parser.add_argument("--rate", type=float, default=150.0, help="publications per second")
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=4, help="channels each client follows")
    parser.add_argument("--clients", type=int, default=2, help="clients per transport")
    parser.add_argument(
        "--transports", default="sse,longpoll,poll,websocket", help="comma-separated"
    )
    parser.add_argument(
        "--faults",
        default="cut=4,node_kill=1,pubsub_kill=2,redis_pause=1,redis_restart=1,redis_wipe=1",
        help=f"kind=weight,... of {', '.join(FAULTS)} (weight 0 or absent: never)",
    )
    parser.add_argument("--interval", default="0.5,2.0", help="seconds between faults: min,max")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--max-faults", type=int, default=None, help="end the run once this many were injected"
    )
    parser.add_argument("--json", type=Path, default=Path("chaos-report.json"))
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the nodes' logs and Redis' files here (default: a temporary directory)",
    )
    args = parser.parse_args(argv)

    weights = {}
    for item in filter(None, args.faults.split(",")):
        kind, _, weight = item.partition("=")
        if kind not in FAULTS:
            parser.error(f"unknown fault kind {kind!r}")
        weights[kind] = float(weight or 1)
    low, high = (float(x) for x in args.interval.split(","))
    cfg = ChaosConfig(
        duration=args.duration,
        nodes=args.nodes,
        broker=args.broker,
        transports=tuple(args.transports.split(",")),
        clients_per_transport=args.clients,
        channels=args.channels,
        channels_per_client=args.per_client,
        rate=args.rate,
        fault_interval=(low, high),
        faults=weights,
        seed=args.seed,
        workdir=args.workdir,
        max_faults=args.max_faults,
    )
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(run_chaos(cfg))
    print(report.table())
    save(report, args.json)
    print(f"\nreport written to {args.json}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
