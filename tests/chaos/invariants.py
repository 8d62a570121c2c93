"""The invariant, checked after the run against what the server API acknowledged.

Per client and per channel, the recording is a sequence of publications
``(epoch, offset)`` and *signals* (an SSE ``unrecovered`` event, a poll
``unrecovered`` entry, a WebSocket ``recovered: false``). Within one epoch,
offsets must follow each other (+1): a repeat is a *duplicate*, a step back a
*reorder*, a step over a *gap*; an epoch change must come after a signal. A
signal excuses what it skips: the rest of the old epoch, and the head of the new
one up to the first publication received after it.

Then every acknowledged publication of the channel must have been received by
the client (every client is subscribed before the publisher starts and stays
subscribed to the end), unless a signal excused it: otherwise it is *lost*.

Sans-I/O on purpose: the recordings and the acknowledgements are plain data, so
the checker has unit tests of its own (``test_invariants.py``) and can be run
again over a saved JSON recording.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The violations, in the order the report lists them.
VIOLATIONS = ("lost", "duplicated", "reordered", "gap", "silent_epoch_change")


@dataclass(frozen=True, slots=True)
class Pub:
    """A publication as a client received it."""

    t: float
    epoch: str
    offset: int


@dataclass(frozen=True, slots=True)
class Signal:
    """An explicit "you missed something" for the channel (``kind`` names its form)."""

    t: float
    kind: str


Record = Pub | Signal


@dataclass(frozen=True, slots=True)
class Ack:
    """A publication the server API acknowledged."""

    t: float
    channel: str
    epoch: str
    offset: int


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken promise: what, to whom, where and when (for attributing it to a fault)."""

    kind: str
    client: str
    transport: str
    channel: str
    epoch: str
    offset: int
    t: float


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault injected: its kind, when it started, and what it did."""

    kind: str
    t: float
    detail: str = ""


@dataclass
class Recording:
    """What one client received, per channel."""

    client: str
    transport: str
    channels: dict[str, list[Record]]
    resumes: int = 0


@dataclass
class ChannelVerdict:
    checked: int = 0
    excused: int = 0
    signals: int = 0
    replayed_after_signal: int = 0
    violations: list[Violation] = field(default_factory=list)


def _excused(ranges: dict[str, list[tuple[int, float]]], epoch: str, offset: int) -> bool:
    return any(lo <= offset <= hi for lo, hi in ranges.get(epoch, ()))


def check_channel(
    client: str, transport: str, channel: str, records: Sequence[Record], acks: Sequence[Ack]
) -> ChannelVerdict:
    """Check one client's recording of one channel against the channel's acknowledgements."""
    verdict = ChannelVerdict()
    seen: dict[str, set[int]] = defaultdict(set)
    excused: dict[str, list[tuple[int, float]]] = defaultdict(list)
    last_epoch: str | None = None
    last_offset = 0
    signalled = False
    had_signal = False

    def violation(kind: str, epoch: str, offset: int, t: float) -> None:
        verdict.violations.append(Violation(kind, client, transport, channel, epoch, offset, t))

    for rec in records:
        if isinstance(rec, Signal):
            signalled = had_signal = True
            verdict.signals += 1
            continue
        epoch, offset = rec.epoch, rec.offset
        if offset in seen[epoch]:
            if signalled:
                verdict.replayed_after_signal += 1
            else:
                violation("duplicated", epoch, offset, rec.t)
            continue
        if last_epoch is None or epoch != last_epoch:
            if signalled or last_epoch is None:
                # The first publication (every client subscribes before the publisher
                # starts, so it is offset 1 unless a signal came first) or the first
                # after a signal: what lies before it was excused.
                if last_epoch is not None:
                    excused[last_epoch].append((last_offset + 1, math.inf))
                if signalled:
                    excused[epoch].append((1, offset - 1))
                elif offset != 1:
                    for missing in range(1, offset):
                        violation("gap", epoch, missing, rec.t)
            else:
                violation("silent_epoch_change", epoch, offset, rec.t)
        elif offset < last_offset:
            violation("reordered", epoch, offset, rec.t)
            seen[epoch].add(offset)
            continue
        elif offset > last_offset + 1:
            if signalled:
                excused[epoch].append((last_offset + 1, offset - 1))
            else:
                for missing in range(last_offset + 1, offset):
                    violation("gap", epoch, missing, rec.t)
        seen[epoch].add(offset)
        last_epoch, last_offset = epoch, offset
        signalled = False
    if signalled and last_epoch is not None:
        # Told at the end, nothing received since: the rest of its epoch is excused.
        excused[last_epoch].append((last_offset + 1, math.inf))

    for ack in acks:
        received = seen.get(ack.epoch)
        if received is not None and ack.offset in received:
            verdict.checked += 1
        elif _excused(excused, ack.epoch, ack.offset) or (had_signal and received is None):
            # An epoch the client never saw, lived and gone between two of its
            # connections: the signal that came with the next epoch covers it.
            verdict.excused += 1
        else:
            violation("lost", ack.epoch, ack.offset, ack.t)
    return verdict


def attribute(faults: Sequence[Fault], t: float) -> str:
    """The kind of the last fault injected at or before ``t`` ("none" before the first).

    Approximate by nature: a violation is charged to the most recent fault, which
    is the usual cause when faults are spaced by more than the recovery time.
    """
    times = [f.t for f in faults]
    i = bisect.bisect_right(times, t)
    return faults[i - 1].kind if i else "none"


@dataclass
class Report:
    """Counts per transport and per fault kind, and every violation (for the JSON file)."""

    duration: float
    faults: list[Fault]
    acks: int
    publish_failures: int
    rows: dict[str, Counter[str]]
    by_fault: dict[str, Counter[str]]
    violations: list[Violation]
    notes: list[str] = field(default_factory=list)
    #: Tracebacks in the nodes' logs: an unhandled exception is a failure of its own.
    tracebacks: int = 0
    #: For the first violation of each kind of each client and channel: what that
    #: client received around it (for diagnosis in the JSON file).
    contexts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def totals(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for row in self.rows.values():
            total.update(row)
        return total

    @property
    def ok(self) -> bool:
        return not self.violations

    def table(self) -> str:
        """The report as plain-text tables: per transport, then per fault kind."""
        cols = (
            "clients",
            "resumes",
            "checked",
            "excused",
            "signals",
            "replayed_after_signal",
            *VIOLATIONS,
        )
        lines = [
            f"chaos run: {self.duration:.0f} s, {len(self.faults)} faults, "
            f"{self.acks} publications acknowledged ({self.publish_failures} publishes refused)",
            "",
            "faults injected: "
            + ", ".join(
                f"{k} {v}" for k, v in sorted(Counter(f.kind for f in self.faults).items())
            ),
            "",
            f"{'transport':<18}" + "".join(f"{c:>{len(c) + 2}}" for c in cols),
        ]
        for name, row in [*sorted(self.rows.items()), ("total", self.totals)]:
            lines.append(f"{name:<18}" + "".join(f"{row[c]:>{len(c) + 2}}" for c in cols))
        lines += ["", "violations by the last fault before them:"]
        lines.append(f"{'fault':<18}" + "".join(f"{c:>{len(c) + 2}}" for c in VIOLATIONS))
        for kind, row in sorted(self.by_fault.items()):
            lines.append(f"{kind:<18}" + "".join(f"{row[c]:>{len(c) + 2}}" for c in VIOLATIONS))
        lines += self.notes
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "duration": self.duration,
            "faults": dict(Counter(f.kind for f in self.faults)),
            "acknowledged": self.acks,
            "publish_failures": self.publish_failures,
            "per_transport": {k: dict(v) for k, v in self.rows.items()},
            "violations_by_fault": {k: dict(v) for k, v in self.by_fault.items()},
            "violations": [
                {
                    "kind": v.kind,
                    "client": v.client,
                    "transport": v.transport,
                    "channel": v.channel,
                    "epoch": v.epoch,
                    "offset": v.offset,
                    "t": round(v.t, 3),
                    "after_fault": attribute(self.faults, v.t),
                }
                for v in self.violations[:2000]
            ],
            "fault_log": [
                {"kind": f.kind, "t": round(f.t, 3), "detail": f.detail} for f in self.faults
            ],
            "tracebacks": self.tracebacks,
            "contexts": self.contexts,
            "notes": self.notes,
        }


def check(
    recordings: Iterable[Recording],
    acks: Sequence[Ack],
    faults: Sequence[Fault],
    duration: float,
    publish_failures: int = 0,
) -> Report:
    """Check every recording; count per transport and per fault kind."""
    by_channel: dict[str, list[Ack]] = defaultdict(list)
    for ack in acks:
        by_channel[ack.channel].append(ack)
    rows: dict[str, Counter[str]] = defaultdict(Counter)
    by_fault: dict[str, Counter[str]] = defaultdict(Counter)
    violations: list[Violation] = []
    contexts: list[dict[str, Any]] = []
    for rec in recordings:
        row = rows[rec.transport]
        row["clients"] += 1
        row["resumes"] += rec.resumes
        for channel, records in rec.channels.items():
            verdict = check_channel(
                rec.client, rec.transport, channel, records, by_channel.get(channel, [])
            )
            row["checked"] += verdict.checked
            row["excused"] += verdict.excused
            row["signals"] += verdict.signals
            row["replayed_after_signal"] += verdict.replayed_after_signal
            for v in verdict.violations:
                row[v.kind] += 1
                by_fault[attribute(faults, v.t)][v.kind] += 1
            violations += verdict.violations
            firsts = {v.kind: v for v in reversed(verdict.violations)}
            for first in firsts.values():
                if len(contexts) < MAX_CONTEXTS:
                    contexts.append(_context(first, records, faults))
    report = Report(
        duration, list(faults), len(acks), publish_failures, dict(rows), dict(by_fault), violations
    )
    report.contexts = contexts
    return report


#: Violation contexts kept in a report, and records either side of each.
MAX_CONTEXTS = 50
CONTEXT = 12


def _context(
    first: Violation, records: Sequence[Record], faults: Sequence[Fault]
) -> dict[str, Any]:
    """What the client received around its first violation on a channel, and the faults then."""
    i = bisect.bisect_left([r.t for r in records], first.t)
    around = records[max(0, i - CONTEXT) : i + CONTEXT]
    return {
        "violation": f"{first.kind} {first.client} {first.channel} {first.epoch}:{first.offset}",
        "t": round(first.t, 3),
        "received": [
            f"{r.t:.3f} {r.epoch}:{r.offset}" if isinstance(r, Pub) else f"{r.t:.3f} {r.kind}"
            for r in around
        ],
        "faults": [f"{f.t:.3f} {f.kind} {f.detail}" for f in faults if abs(f.t - first.t) < 3],
    }
