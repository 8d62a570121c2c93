"""The client's event-stream parser (tidings.client.sse), against the WHATWG standard.

The examples are the standard's own (HTML §9.2.5–9.2.6); Hypothesis checks that
the way a stream is cut into reads never changes the events, and compares the
parser with a literal transcription of the standard's algorithm on decoded text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidings.client.sse import Event, EventStreamError, SSEParser

pytestmark = pytest.mark.unit


def parse(stream: bytes) -> tuple[list[Event], SSEParser]:
    parser = SSEParser()
    return parser.feed(stream), parser


# ------------------------------------------------------------------------ the standard's examples


def test_spec_stock_ticker_joins_data_lines() -> None:
    events, _ = parse(b"data: YHOO\ndata: +2\ndata: 10\n\n")
    assert events == [Event(data="YHOO\n+2\n10")]


def test_spec_comment_id_and_reset_of_the_id() -> None:
    stream = (
        b": test stream\n\n"
        b"data: first event\nid: 1\n\n"
        b"data:second event\nid\n\n"
        b"data:  third event\n\n"
    )
    events, parser = parse(stream)
    assert events == [
        Event(data="first event", id="1"),
        Event(data="second event", id=""),
        Event(data=" third event", id=""),
    ]
    assert parser.last_event_id == ""


def test_spec_empty_data_lines_and_an_unterminated_block() -> None:
    events, _ = parse(b"data\n\ndata\ndata\n\ndata:")
    assert events == [Event(data=""), Event(data="\n")]


def test_spec_space_after_colon_is_optional() -> None:
    events, _ = parse(b"data:test\n\ndata: test\n\n")
    assert events == [Event(data="test"), Event(data="test")]


def test_event_type_id_and_retry_fields() -> None:
    events, parser = parse(b"retry: 2500\nid: c-1\nevent: subscribed\ndata: {}\n\n")
    assert events == [Event(data="{}", event="subscribed", id="c-1")]
    assert parser.retry == 2500
    _, parser = parse(b"retry: 25x\nretry:\nretry: -3\ndata: x\n\n")
    assert parser.retry is None  # only ASCII digits count


def test_only_one_space_is_stripped_and_a_second_colon_is_data() -> None:
    events, _ = parse(b"data:   a: b\n\n")
    assert events == [Event(data="  a: b")]


def test_line_ends_crlf_cr_lf_mixed() -> None:
    events, _ = parse(b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\r")
    assert events == [Event(data="a\nb\nc"), Event(data="d")]


def test_crlf_split_between_reads_is_one_line_end() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []  # the LF of the CRLF, not a blank line
    assert parser.feed(b"\r\n") == [Event(data="a")]


def test_block_without_data_dispatches_nothing_but_sets_the_id() -> None:
    events, parser = parse(b"id: 7\n\nevent: x\n\n")
    assert events == []
    assert parser.last_event_id == "7"


def test_id_persists_until_changed_and_starts_as_resumed() -> None:
    parser = SSEParser(last_event_id="resume-me")
    assert parser.feed(b"data: a\n\n") == [Event(data="a", id="resume-me")]
    assert parser.feed(b"id: 2\ndata: b\n\ndata: c\n\n") == [
        Event(data="b", id="2"),
        Event(data="c", id="2"),
    ]


def test_id_with_nul_is_ignored() -> None:
    events, _ = parse(b"id: 1\n\nid: a\0b\ndata: x\n\n")
    assert events == [Event(data="x", id="1")]


def test_event_type_does_not_leak_into_the_next_event() -> None:
    events, _ = parse(b"event: unrecovered\ndata: 1\n\ndata: 2\n\n")
    assert [e.event for e in events] == ["unrecovered", "message"]


def test_unknown_fields_and_comments_are_ignored() -> None:
    events, _ = parse(b":ping\nfoo: bar\nDATA: no\ndata: yes\n:\n\n")
    assert events == [Event(data="yes")]


def test_one_leading_bom_is_dropped_even_split_across_reads() -> None:
    parser = SSEParser()
    assert parser.feed(b"\xef") == []
    assert parser.feed(b"\xbb") == []
    assert parser.feed(b"\xbfdata: a\n\n") == [Event(data="a")]
    # A second BOM is part of the first field's name, which then is not "data".
    events, _ = parse(b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\ndata: b\n\n")
    assert events == [Event(data="b")]


def test_invalid_utf8_becomes_replacement_characters() -> None:
    events, _ = parse(b"data: caf\xc3\xa9 \xff\n\n")
    assert events == [Event(data="café \ufffd")]


# --------------------------------------------------------------------------- bounds


def test_an_endless_line_raises_before_the_buffer_outgrows_the_bound() -> None:
    parser = SSEParser(max_line=10_000)
    chunk = b"x" * 1000
    with pytest.raises(EventStreamError, match="longer than 10000 bytes"):
        for _ in range(1000):
            parser.feed(chunk)
            assert len(parser._buffer) <= 10_000  # what it holds between reads
    # Without the bound the same feed is held whole: the test measures the bound.
    unbounded = SSEParser(max_line=10**9)
    for _ in range(100):
        unbounded.feed(chunk)
    assert len(unbounded._buffer) == 100_000


def test_a_complete_line_over_the_bound_in_one_read_raises() -> None:
    with pytest.raises(EventStreamError):
        SSEParser(max_line=100).feed(b"data: " + b"x" * 200 + b"\n\n")


def test_a_line_of_exactly_max_line_is_accepted() -> None:
    line = b"data:" + b"y" * 95
    assert SSEParser(max_line=100).feed(line + b"\n\n") == [Event(data="y" * 95)]


def test_endless_short_data_lines_raise_past_max_event() -> None:
    parser = SSEParser(max_event=1000)
    with pytest.raises(EventStreamError, match="larger than 1000 bytes"):
        for _ in range(1000):
            parser.feed(b"data: 0123456789\n")
    events = SSEParser(max_event=1000).feed(b"data: 0123456789\n" * 50 + b"\n")
    assert len(events) == 1  # 50 lines of 11 bytes each fit


def test_endless_comments_hold_nothing() -> None:
    parser = SSEParser(max_line=100, max_event=100)
    for _ in range(10_000):
        assert parser.feed(b": keepalive\n") == []
    assert len(parser._buffer) == 0


# --------------------------------------------------------------------------- properties


@dataclass
class Reference:
    """The standard's algorithm, transcribed literally onto the decoded text."""

    events: list[Event] = field(default_factory=list)
    last_event_id: str = ""
    retry: int | None = None

    def run(self, stream: bytes) -> Reference:
        text = stream.decode("utf-8-sig", "replace")  # drops one leading BOM
        lines = re.split("\r\n|\r|\n", text)[:-1]  # the last piece is an unterminated line
        data, event_type, id_buffer = "", "", ""
        for line in lines:
            if line == "":
                self.last_event_id = id_buffer
                if data == "":
                    event_type = ""
                    continue
                self.events.append(
                    Event(data=data.removesuffix("\n"), event=event_type or "message", id=id_buffer)
                )
                data, event_type = "", ""
                continue
            if line.startswith(":"):
                continue
            name, colon, value = line.partition(":")
            if colon and value.startswith(" "):
                value = value[1:]
            if name == "event":
                event_type = value
            elif name == "data":
                data += value + "\n"
            elif name == "id" and "\0" not in value:
                id_buffer = value
            elif name == "retry" and value and all(c in "0123456789" for c in value):
                self.retry = int(value)
        return self


FIELD_NAMES = [b"data", b"event", b"id", b"retry", b"", b"dat", b"x"]
LINE_ENDS = [b"\n", b"\r", b"\r\n"]

values = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12).map(str.encode),
    st.sampled_from([b"", b" ", b"  x", b"12", b"\0", b"\xff\xfe", b": y", b"\xef\xbb\xbf"]),
)
lines = st.one_of(
    st.tuples(st.sampled_from(FIELD_NAMES), st.sampled_from([b":", b": ", b""]), values).map(
        b"".join
    ),
    st.just(b""),  # blank lines dispatch
    values.map(lambda v: b":" + v),  # comments
)
streams = st.tuples(
    st.sampled_from([b"", b"\xef\xbb\xbf"]),
    st.lists(st.tuples(lines, st.sampled_from(LINE_ENDS)).map(b"".join), max_size=25),
    values,  # maybe an unterminated last line
).map(lambda parts: parts[0] + b"".join(parts[1]) + parts[2])


def feed_in_pieces(stream: bytes, cuts: list[int]) -> tuple[list[Event], SSEParser]:
    parser = SSEParser()
    events: list[Event] = []
    previous = 0
    for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
        events += parser.feed(stream[previous:cut])
        previous = cut
    return events, parser


@given(streams, st.lists(st.integers(min_value=0), max_size=12))
def test_any_split_into_reads_yields_the_same_events(stream: bytes, cuts: list[int]) -> None:
    whole, whole_parser = parse(stream)
    pieces, pieces_parser = feed_in_pieces(stream, cuts)
    assert pieces == whole
    assert (pieces_parser.last_event_id, pieces_parser.retry) == (
        whole_parser.last_event_id,
        whole_parser.retry,
    )


@given(streams, st.lists(st.integers(min_value=0), max_size=12))
def test_matches_the_standard_transcribed(stream: bytes, cuts: list[int]) -> None:
    expected = Reference().run(stream)
    events, parser = feed_in_pieces(stream, cuts)
    assert events == expected.events
    assert (parser.last_event_id, parser.retry) == (expected.last_event_id, expected.retry)


@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=8))
def test_arbitrary_bytes_match_the_standard(stream: bytes, cuts: list[int]) -> None:
    events, _ = feed_in_pieces(stream, cuts)
    assert events == Reference().run(stream).events
