"""The chaos checker on hand-made recordings: each violation is found, each signal excuses.

The checker decides whether a chaos run passes, so it is tested on its own: a
checker that saw nothing would make every run green.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from chaos.invariants import (
    Ack,
    ChannelVerdict,
    Fault,
    Pub,
    Record,
    Recording,
    Signal,
    attribute,
    check,
    check_channel,
)

pytestmark = pytest.mark.unit


def pubs(epoch: str, *offsets: int) -> list[Record]:
    return [Pub(float(o), epoch, o) for o in offsets]


def acks(epoch: str, *offsets: int) -> list[Ack]:
    return [Ack(float(o), "ch", epoch, o) for o in offsets]


def verdict(records: Sequence[Record], acked: Sequence[Ack]) -> ChannelVerdict:
    return check_channel("c", "sse", "ch", records, acked)


def kinds(v: ChannelVerdict) -> list[tuple[str, int]]:
    return [(x.kind, x.offset) for x in v.violations]


def test_everything_in_order_passes() -> None:
    v = verdict(pubs("A", 1, 2, 3), acks("A", 1, 2, 3))
    assert kinds(v) == [] and v.checked == 3


def test_duplicate() -> None:
    assert kinds(verdict(pubs("A", 1, 2, 2, 3), acks("A", 1, 2, 3))) == [("duplicated", 2)]


def test_reorder() -> None:
    v = verdict(pubs("A", 1, 3, 2), acks("A", 1, 2, 3))
    assert ("reordered", 2) in kinds(v)


def test_silent_gap_and_loss() -> None:
    v = verdict(pubs("A", 1, 4), acks("A", 1, 2, 3, 4))
    assert kinds(v) == [("gap", 2), ("gap", 3), ("lost", 2), ("lost", 3)]


def test_missing_start_is_a_gap() -> None:
    # Every client subscribes before the first publication: it must get offset 1.
    assert kinds(verdict(pubs("A", 2, 3), acks("A", 2, 3))) == [("gap", 1)]


def test_tail_not_received_is_lost() -> None:
    assert kinds(verdict(pubs("A", 1, 2), acks("A", 1, 2, 3))) == [("lost", 3)]


def test_unsignalled_epoch_change() -> None:
    v = verdict([*pubs("A", 1, 2), *pubs("B", 1)], [*acks("A", 1, 2, 3), *acks("B", 1)])
    assert kinds(v) == [("silent_epoch_change", 1), ("lost", 3)]


def test_signal_excuses_the_gap_it_announces() -> None:
    records = [*pubs("A", 1, 2), Signal(2.5, "sse-unrecovered"), *pubs("A", 6, 7)]
    v = verdict(records, acks("A", *range(1, 8)))
    assert kinds(v) == [] and v.excused == 3 and v.signals == 1


def test_signal_excuses_a_new_epoch() -> None:
    records = [*pubs("A", 1, 2), Signal(2.5, "poll-unrecovered"), *pubs("B", 3, 4)]
    v = verdict(records, [*acks("A", 1, 2, 3), *acks("B", 1, 2, 3, 4)])
    assert kinds(v) == [] and v.excused == 3


def test_signal_excuses_only_once() -> None:
    records = [*pubs("A", 1), Signal(1.5, "ws-recovered-false"), *pubs("A", 3, 5)]
    assert kinds(verdict(records, acks("A", 1, 2, 3, 4, 5))) == [("gap", 4), ("lost", 4)]


def test_replay_after_signal_is_counted_not_failed() -> None:
    records = [*pubs("A", 1, 2), Signal(2.5, "poll-unrecovered"), *pubs("A", 2, 3)]
    v = verdict(records, acks("A", 1, 2, 3))
    assert kinds(v) == [] and v.replayed_after_signal == 1


def test_report_counts_per_transport_and_fault() -> None:
    faults = [Fault("cut", 0.5), Fault("node_kill", 2.5)]
    recordings = [
        Recording("s", "sse", {"ch": pubs("A", 1, 2, 3)}),
        Recording("p", "poll", {"ch": pubs("A", 1, 3, 3)}),
    ]
    report = check(recordings, acks("A", 1, 2, 3), faults, duration=4.0)
    assert not report.ok
    assert report.rows["sse"]["checked"] == 3 and report.rows["sse"]["lost"] == 0
    assert report.rows["poll"]["duplicated"] == 1 and report.rows["poll"]["lost"] == 1
    assert report.by_fault["node_kill"]["duplicated"] == 1  # received at t=3, after the kill
    assert report.by_fault["cut"]["lost"] == 1  # acknowledged at t=2, after the cut
    assert "poll" in report.table() and report.to_json()["violations"][0]["after_fault"]


def test_attribute() -> None:
    faults = [Fault("cut", 1.0), Fault("redis_wipe", 2.0)]
    assert [attribute(faults, t) for t in (0.5, 1.0, 1.5, 9.0)] == [
        "none",
        "cut",
        "cut",
        "redis_wipe",
    ]


def test_signal_excuses_an_epoch_never_seen() -> None:
    # A node restarted twice while the client was away: epoch B lived and went.
    records = [*pubs("A", 1), Signal(1.5, "sse-unrecovered"), *pubs("C", 2)]
    v = verdict(records, [*acks("A", 1), *acks("B", 1, 2), *acks("C", 1, 2)])
    assert kinds(v) == [] and v.excused == 3


def test_an_epoch_never_seen_without_signal_is_lost() -> None:
    records = [*pubs("A", 1), *pubs("C", 1)]
    v = verdict(records, [*acks("A", 1), *acks("B", 1), *acks("C", 1)])
    assert kinds(v) == [("silent_epoch_change", 1), ("lost", 1)]
