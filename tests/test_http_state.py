"""The HTTP connection's state machine (``tidings.http.state``), sans I/O.

The connection changes state only through ``advance``; these tests pin the
tables, so that a move the design does not allow fails loudly instead of
leaving a connection in a state nobody handles.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import pytest

from tidings.http.state import ANSWERING, READING, Answering, InvalidTransition, Reading, advance

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("table", "states"), [(READING, Reading), (ANSWERING, Answering)])
def test_every_state_has_a_row(table: Any, states: type[Enum]) -> None:
    assert set(table) == set(states)


def reachable(table: Any, start: Enum) -> set[Enum]:
    seen = {start}
    todo = [start]
    while todo:
        for nxt in table[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_state_is_reachable_and_every_state_can_end() -> None:
    assert reachable(READING, Reading.IDLE) == set(Reading)
    assert reachable(ANSWERING, Answering.READY) == set(Answering)
    for reading in Reading:
        assert reachable(READING, reading) & {Reading.STOPPED, Reading.ENDED}
    for answering in Answering:
        assert Answering.CLOSED in reachable(ANSWERING, answering)


def test_a_request_cycle_is_allowed() -> None:
    reading = Reading.IDLE
    for nxt in (Reading.HEAD, Reading.BODY, Reading.IDLE, Reading.HEAD, Reading.STOPPED):
        reading = advance(READING, reading, nxt)
    answering = Answering.READY
    for then in (
        Answering.HANDLING,
        Answering.HOLDING,
        Answering.READY,
        Answering.LINGERING,
        Answering.CLOSED,
    ):
        answering = advance(ANSWERING, answering, then)
    assert (reading, answering) == (Reading.STOPPED, Answering.CLOSED)


@pytest.mark.parametrize(
    ("table", "current", "new"),
    [
        (READING, Reading.IDLE, Reading.BODY),  # a body without a head
        (READING, Reading.STOPPED, Reading.IDLE),  # parsing again after a refusal
        (READING, Reading.ENDED, Reading.HEAD),  # a request after the peer's EOF
        (READING, Reading.ENDED, Reading.STOPPED),  # forgetting that the peer has left
        (ANSWERING, Answering.READY, Answering.READY),  # answering what nobody asked
        (ANSWERING, Answering.READY, Answering.HOLDING),  # holding without a handler
        (ANSWERING, Answering.LINGERING, Answering.READY),  # answering after the last answer
        (ANSWERING, Answering.CLOSED, Answering.LINGERING),  # anything after the end
    ],
)
def test_a_move_the_design_does_not_allow_raises(table: Any, current: Any, new: Any) -> None:
    with pytest.raises(InvalidTransition, match=f"{current.name} -> {new.name}"):
        advance(table, current, new)
