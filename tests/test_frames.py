"""Unit tests of the sans-I/O frame codec (src/tidings/frames.py): bytes in, events or errors out.

Valid client frames are built by websockets' own serializer (a client we did
not write); frames it refuses to build (unmasked, reserved bits, oversized
control frames...) are assembled by :func:`raw_frame`.
"""

from __future__ import annotations

import os
import struct
import tracemalloc
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.frames import Close, Frame, Opcode
from websockets.streams import StreamReader

from tidings.frames import (
    CloseReceived,
    Deflater,
    Event,
    FrameError,
    FrameReader,
    Message,
    Ping,
    Pong,
    close_frame,
    frame,
    valid_close_code,
)
from ws_support import strict_inflate

pytestmark = pytest.mark.unit

MAX = 4096


def ws_frame(opcode: Opcode, data: bytes, *, fin: bool = True, rsv1: bool = False) -> bytes:
    """A masked client frame, serialized by websockets (which only sets RSV1 through its
    own compressor: compressed frames are assembled by :func:`raw_frame`)."""
    if rsv1:
        return raw_frame((0x80 if fin else 0) | 0x40 | opcode, data)
    return Frame(opcode, data, fin=fin).serialize(mask=True)


def raw_frame(
    first_byte: int, payload: bytes, *, masked: bool = True, length: int | None = None
) -> bytes:
    """A client frame built byte by byte, for what websockets refuses to serialize."""
    n = len(payload) if length is None else length
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((first_byte, mask_bit | n))
    elif n < 65536:
        head = struct.pack("!BBH", first_byte, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first_byte, mask_bit | 127, n)
    if not masked:
        return head + payload
    mask = b"\x01\x02\x03\x04"
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def deflate(data: bytes, wbits: int = 15) -> bytes:
    """What a permessage-deflate client sends: raw deflate, sync-flushed, tail stripped."""
    z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -wbits)
    out = z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def refused(reader: FrameReader, data: bytes) -> FrameError:
    with pytest.raises(FrameError) as info:
        reader.feed(data)
    return info.value


# --------------------------------------------------------------------------- messages


def test_text_message_in_one_frame_and_nothing_held_after_it() -> None:
    reader = FrameReader(MAX)
    assert reader.feed(ws_frame(Opcode.TEXT, b'{"id":1}')) == [Message(b'{"id":1}', True)]
    assert reader.buffered == 0
    assert reader._buf is None and reader._frag is None


def test_several_frames_in_one_read_and_one_frame_over_several_reads() -> None:
    reader = FrameReader(MAX)
    stream = (
        ws_frame(Opcode.TEXT, b"a") + ws_frame(Opcode.BINARY, b"\xff") + ws_frame(Opcode.PING, b"p")
    )
    assert reader.feed(stream) == [Message(b"a", True), Message(b"\xff", False), Ping(b"p")]
    big = ws_frame(Opcode.TEXT, b"x" * 3000)
    assert reader.feed(big[:1]) == []
    assert reader.feed(big[1:5]) == []
    assert reader.buffered == 5
    assert reader.feed(big[5:]) == [Message(b"x" * 3000, True)]
    assert reader.buffered == 0


def test_fragmented_text_with_interleaved_ping_and_pong() -> None:
    reader = FrameReader(MAX)
    stream = (
        ws_frame(Opcode.TEXT, b"he", fin=False)
        + ws_frame(Opcode.PING, b"1")
        + ws_frame(Opcode.CONT, b"ll", fin=False)
        + ws_frame(Opcode.PONG, b"2")
        + ws_frame(Opcode.CONT, b"o")
    )
    assert reader.feed(stream) == [Ping(b"1"), Pong(b"2"), Message(b"hello", True)]
    assert reader.buffered == 0 and reader._frag is None


def test_binary_message_is_not_utf8_validated() -> None:
    reader = FrameReader(MAX)
    assert reader.feed(ws_frame(Opcode.BINARY, b"\xff\xfe")) == [Message(b"\xff\xfe", False)]


def test_empty_messages() -> None:
    reader = FrameReader(MAX)
    stream = ws_frame(Opcode.TEXT, b"") + ws_frame(Opcode.TEXT, b"", fin=False)
    stream += ws_frame(Opcode.CONT, b"")
    assert reader.feed(stream) == [Message(b"", True), Message(b"", True)]


# --------------------------------------------------------------------------- 1002 at the header


def test_unmasked_frame_is_refused() -> None:
    error = refused(FrameReader(MAX), raw_frame(0x81, b"hi", masked=False))
    assert error.code == 1002


@pytest.mark.parametrize("first_byte", [0xC1, 0xA1, 0x91, 0xC9, 0xC0])
def test_reserved_bits_are_refused_without_deflate(first_byte: int) -> None:
    reader = FrameReader(MAX)
    if first_byte & 0x0F == 0:
        reader.feed(ws_frame(Opcode.TEXT, b"a", fin=False))
    assert refused(reader, raw_frame(first_byte, b"x")[:2]).code == 1002


@pytest.mark.parametrize("first_byte", [0xA1, 0x91, 0xC9, 0xC0])
def test_reserved_bits_other_than_rsv1_on_a_first_frame_are_refused_with_deflate(
    first_byte: int,
) -> None:
    reader = FrameReader(MAX, deflate=True)
    if first_byte & 0x0F == 0:
        reader.feed(ws_frame(Opcode.TEXT, deflate(b"a"), fin=False, rsv1=True))
    assert refused(reader, raw_frame(first_byte, b"x")[:2]).code == 1002


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcodes_are_refused_at_the_first_byte(opcode: int) -> None:
    assert refused(FrameReader(MAX), bytes((0x80 | opcode, 0x80))).code == 1002


@pytest.mark.parametrize("opcode", [0x8, 0x9, 0xA])
def test_control_frame_over_125_bytes_is_refused_at_the_header(opcode: int) -> None:
    """A 2^40-byte ping announcement fails on its 2-byte header, nothing buffered."""
    reader = FrameReader(MAX)
    header = raw_frame(0x80 | opcode, b"", length=2**40)
    assert refused(reader, header[:2]).code == 1002
    assert reader.buffered == 0
    assert reader.feed(b"\x00" * 1000) == []  # the reader takes nothing after an error
    assert reader.buffered == 0


def test_control_frame_of_125_bytes_is_fine() -> None:
    assert FrameReader(MAX).feed(ws_frame(Opcode.PING, b"p" * 125)) == [Ping(b"p" * 125)]


@pytest.mark.parametrize("opcode", [0x8, 0x9, 0xA])
def test_fragmented_control_frame_is_refused_at_the_header(opcode: int) -> None:
    assert refused(FrameReader(MAX), bytes((opcode, 0x81))).code == 1002


def test_continuation_without_a_message_is_refused() -> None:
    assert refused(FrameReader(MAX), ws_frame(Opcode.CONT, b"x")[:2]).code == 1002


@pytest.mark.parametrize("opcode", [Opcode.TEXT, Opcode.BINARY])
def test_new_message_inside_a_fragmented_one_is_refused(opcode: Opcode) -> None:
    reader = FrameReader(MAX)
    assert reader.feed(ws_frame(Opcode.TEXT, b"a", fin=False)) == []
    assert refused(reader, ws_frame(opcode, b"b")[:2]).code == 1002


def test_frame_length_with_the_top_bit_set_is_refused() -> None:
    header = struct.pack("!BBQ", 0x82, 0xFF, 1 << 63)
    assert refused(FrameReader(2**64), header).code == 1002


# --------------------------------------------------------------------------- 1009 before buffering


@pytest.mark.parametrize("length", [MAX + 1, 65536, 2**40])
def test_announced_length_over_the_limit_is_refused_before_the_payload(length: int) -> None:
    reader = FrameReader(MAX)
    header = raw_frame(0x82, b"", length=length)  # header only: no payload sent
    assert refused(reader, header).code == 1009
    assert reader.buffered == 0


def test_message_at_the_limit_is_accepted() -> None:
    data = b"x" * MAX
    assert FrameReader(MAX).feed(ws_frame(Opcode.TEXT, data)) == [Message(data, True)]


def test_running_total_of_a_fragmented_message_over_the_limit_is_refused_at_the_header() -> None:
    reader = FrameReader(MAX)
    assert reader.feed(ws_frame(Opcode.BINARY, b"x" * 3000, fin=False)) == []
    header = raw_frame(0x80, b"", length=MAX - 3000 + 1)
    assert refused(reader, header).code == 1009
    assert reader.buffered == 0


def test_running_total_at_the_limit_is_accepted() -> None:
    reader = FrameReader(MAX)
    stream = ws_frame(Opcode.BINARY, b"x" * 3000, fin=False)
    stream += ws_frame(Opcode.CONT, b"y" * (MAX - 3000))
    assert reader.feed(stream) == [Message(b"x" * 3000 + b"y" * (MAX - 3000), False)]


# --------------------------------------------------------------------------- UTF-8 (1007)


@pytest.mark.parametrize(
    "data",
    [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\xce", b"\xce\xba\xe1"],
)
def test_invalid_utf8_text_message_is_refused(data: bytes) -> None:
    assert refused(FrameReader(MAX), ws_frame(Opcode.TEXT, data)).code == 1007


def test_utf8_split_inside_a_code_point_across_fragments_is_accepted() -> None:
    text = "κόσμε 🙂".encode()
    for cut in range(1, len(text)):
        reader = FrameReader(MAX)
        stream = ws_frame(Opcode.TEXT, text[:cut], fin=False) + ws_frame(Opcode.CONT, text[cut:])
        assert reader.feed(stream) == [Message(text, True)], cut


@pytest.mark.parametrize("bad", [b"\xff", b"\xf4\x90", b"\xe0\x80", b"\xed\xa0", b"\xc0"])
def test_invalid_utf8_in_the_first_fragment_fails_before_the_last_arrives(bad: bytes) -> None:
    reader = FrameReader(MAX)
    assert refused(reader, ws_frame(Opcode.TEXT, b"valid " + bad, fin=False)).code == 1007


@pytest.mark.parametrize("cut", [3, 6, 7, 9])
def test_invalid_utf8_fails_when_it_arrives_not_when_its_frame_ends(cut: int) -> None:
    """Autobahn 6.4.3/6.4.4: a frame dribbled in; the connection fails on the bad byte."""
    data = "κόσμε".encode() + b"\xf4\x90\x80\x80" + b"x" * 1000
    wire = ws_frame(Opcode.TEXT, data)
    reader = FrameReader(MAX)
    head = len(wire) - len(data)
    assert reader.feed(wire[: head + cut]) == []  # the valid prefix, unmasked at any offset
    assert refused(reader, wire[head + cut : head + 12]).code == 1007


def test_invalid_utf8_in_an_incomplete_continuation_frame_fails_on_arrival() -> None:
    reader = FrameReader(MAX)
    assert reader.feed(ws_frame(Opcode.TEXT, b"ok \xce", fin=False)) == []  # a code point begun
    wire = ws_frame(Opcode.CONT, b"A" + b"x" * 500)  # ... and not continued
    assert refused(reader, wire[: len(wire) - 400]).code == 1007


def test_valid_text_dribbled_byte_by_byte_is_accepted() -> None:
    data = ("κόσμε 🙂 " * 40).encode()
    wire = ws_frame(Opcode.TEXT, data[:100], fin=False) + ws_frame(Opcode.CONT, data[100:])
    reader = FrameReader(MAX)
    events: list[Event] = []
    for i in range(len(wire)):
        events += reader.feed(wire[i : i + 1])
    assert events == [Message(data, True)]


def test_an_incomplete_binary_frame_is_not_validated() -> None:
    reader = FrameReader(MAX)
    wire = ws_frame(Opcode.BINARY, b"\xff" * 100)
    assert reader.feed(wire[:50]) == []
    assert reader.feed(wire[50:]) == [Message(b"\xff" * 100, False)]


def test_text_ending_inside_a_code_point_is_refused_on_the_last_fragment() -> None:
    reader = FrameReader(MAX)
    assert reader.feed(ws_frame(Opcode.TEXT, b"\xce", fin=False)) == []
    assert refused(reader, ws_frame(Opcode.CONT, b"")).code == 1007


def test_invalid_utf8_in_a_binary_fragmented_message_is_fine() -> None:
    reader = FrameReader(MAX)
    stream = ws_frame(Opcode.BINARY, b"\xff", fin=False) + ws_frame(Opcode.CONT, b"\xfe")
    assert reader.feed(stream) == [Message(b"\xff\xfe", False)]


# --------------------------------------------------------------------------- close frames


def test_close_frames() -> None:
    assert FrameReader(MAX).feed(ws_frame(Opcode.CLOSE, b"")) == [CloseReceived(None, "")]
    payload = Close(1001, "bye ✓").serialize()
    assert FrameReader(MAX).feed(ws_frame(Opcode.CLOSE, payload)) == [CloseReceived(1001, "bye ✓")]


def test_nothing_is_read_after_a_close_frame() -> None:
    reader = FrameReader(MAX)
    stream = ws_frame(Opcode.CLOSE, b"") + ws_frame(Opcode.TEXT, b"late") + b"\x00garbage"
    assert reader.feed(stream) == [CloseReceived(None, "")]
    assert reader.feed(ws_frame(Opcode.TEXT, b"later")) == []
    assert reader.buffered == 0


def test_close_frame_with_one_byte_is_refused() -> None:
    assert refused(FrameReader(MAX), raw_frame(0x88, b"\x03")).code == 1002


@pytest.mark.parametrize(
    "code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]
)
def test_invalid_close_codes_are_refused(code: int) -> None:
    assert not valid_close_code(code)
    error = refused(FrameReader(MAX), raw_frame(0x88, struct.pack("!H", code)))
    assert error.code == 1002


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1011, 1012, 1014, 3000, 4999])
def test_valid_close_codes_are_accepted(code: int) -> None:
    events = FrameReader(MAX).feed(raw_frame(0x88, struct.pack("!H", code)))
    assert events == [CloseReceived(code, "")]


def test_close_reason_that_is_not_utf8_is_refused() -> None:
    error = refused(FrameReader(MAX), raw_frame(0x88, b"\x03\xe8\xff"))
    assert error.code == 1007


# --------------------------------------------------------------------------- permessage-deflate


def test_compressed_message_in_one_frame() -> None:
    data = b'{"id":1,"publish":{"channel":"x","data":"' + b"a" * 500 + b'"}}'
    reader = FrameReader(MAX, deflate=True)
    assert reader.feed(ws_frame(Opcode.TEXT, deflate(data), rsv1=True)) == [Message(data, True)]


def test_compressed_fragmented_message_with_control_frames_between() -> None:
    data = "κόσμε ".encode() * 200
    compressed = deflate(data)
    third = len(compressed) // 3
    stream = (
        ws_frame(Opcode.TEXT, compressed[:third], fin=False, rsv1=True)
        + ws_frame(Opcode.PING, b"")
        + ws_frame(Opcode.CONT, compressed[third : 2 * third], fin=False)
        + ws_frame(Opcode.CONT, compressed[2 * third :])
    )
    reader = FrameReader(len(data), deflate=True)
    assert reader.feed(stream) == [Ping(b""), Message(data, True)]


def test_uncompressed_message_on_a_deflate_connection() -> None:
    reader = FrameReader(MAX, deflate=True)
    assert reader.feed(ws_frame(Opcode.TEXT, b"plain")) == [Message(b"plain", True)]


def test_deflate_bomb_is_refused_without_inflating_it_whole() -> None:
    """10 MB of zeros compress to ~10 kB: the reader stops at max_message_size + 1."""
    limit = 64 * 1024
    bomb = deflate(b"\x00" * 10_000_000)
    assert len(bomb) < limit
    reader = FrameReader(limit, deflate=True)
    tracemalloc.start()
    try:
        assert refused(reader, ws_frame(Opcode.BINARY, bomb, rsv1=True)).code == 1009
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * limit + 4 * len(bomb)


def test_fragmented_deflate_bomb_is_refused_on_the_fragment_that_overflows() -> None:
    limit = 64 * 1024
    bomb = deflate(b"\x00" * 1_000_000)
    reader = FrameReader(limit, deflate=True)
    half = len(bomb) // 2
    assert refused(reader, ws_frame(Opcode.BINARY, bomb[:half], fin=False, rsv1=True)).code == 1009


def test_inflated_size_at_the_limit_is_accepted() -> None:
    data = os.urandom(100) * 10
    reader = FrameReader(len(data), deflate=True)
    assert reader.feed(ws_frame(Opcode.BINARY, deflate(data), rsv1=True)) == [Message(data, False)]
    reader = FrameReader(len(data) - 1, deflate=True)
    assert refused(reader, ws_frame(Opcode.BINARY, deflate(data), rsv1=True)).code == 1009


def test_corrupt_deflate_data_is_refused_with_1007() -> None:
    reader = FrameReader(MAX, deflate=True)
    assert refused(reader, ws_frame(Opcode.TEXT, b"\xff\xff\xff\xff", rsv1=True)).code == 1007


def test_compressed_invalid_utf8_is_refused() -> None:
    reader = FrameReader(MAX, deflate=True)
    assert refused(reader, ws_frame(Opcode.TEXT, deflate(b"ok \xff"), rsv1=True)).code == 1007


def far_repeat() -> bytes:
    """2.5 kB between repeats: beyond a 9-bit (512-byte) window, within a 15-bit one."""
    far = os.urandom(1500)
    return far + b"-" * 1000 + far


def test_client_window_bits_are_used_when_inflating() -> None:
    data = far_repeat()
    for wbits in (9, 12, 15):
        reader = FrameReader(MAX, deflate=True, client_window_bits=wbits)
        events = reader.feed(ws_frame(Opcode.BINARY, deflate(data, wbits), rsv1=True))
        assert events == [Message(data, False)]


@pytest.mark.parametrize("wbits", [9, 10, 12, 15])
def test_deflater_output_inflates_within_its_window_and_each_message_stands_alone(
    wbits: int,
) -> None:
    deflater = Deflater(wbits)
    for data in [far_repeat(), far_repeat()[:1500], b'{"push":{}}' * 100]:
        # A fresh inflater per message: server_no_context_takeover.
        assert strict_inflate(deflater.compress(data), wbits) == data


def test_a_15_bit_deflater_is_not_readable_with_a_9_bit_window() -> None:
    """What the per-window-size compressors exist for (RFC 7692 §7.1.2.1)."""
    with pytest.raises(zlib.error, match="too far back"):
        strict_inflate(Deflater(15).compress(far_repeat()), 9)


# --------------------------------------------------------------------------- writing


def test_server_frames_parse_in_websockets() -> None:
    for size in (0, 125, 126, 65535, 65536):
        data = b"d" * size
        stream = StreamReader()
        stream.feed_data(frame(0x81, data))
        parser = Frame.parse(stream.read_exact, mask=False)
        with pytest.raises(StopIteration) as done:
            next(parser)
        parsed: Frame = done.value.value
        assert parsed.opcode == Opcode.TEXT and parsed.data == data and parsed.fin


def test_close_frame_reason_is_cut_on_a_character_boundary() -> None:
    built = close_frame(1000, "é" * 100)
    assert len(built) <= 2 + 125
    assert built[2:4] == b"\x03\xe8"
    built[4:].decode("utf-8")  # still valid UTF-8
    assert close_frame(3501, "bad request") == frame(0x88, b"\x0d\xadbad request")


# --------------------------------------------------------------------------- properties

_valid_frames = st.one_of(
    st.tuples(st.just(Opcode.TEXT), st.text(max_size=300).map(str.encode)),
    st.tuples(st.just(Opcode.BINARY), st.binary(max_size=300)),
    st.tuples(st.just(Opcode.PING), st.binary(max_size=125)),
    st.tuples(st.just(Opcode.PONG), st.binary(max_size=125)),
)


@st.composite
def valid_streams(draw: st.DrawFn, compression: bool = False) -> tuple[bytes, list[Event]]:
    """A stream of valid frames (some messages fragmented, some compressed when
    ``compression``) and the events it must give."""
    stream = b""
    events: list[Event] = []
    for opcode, data in draw(st.lists(_valid_frames, max_size=8)):
        if opcode in (Opcode.PING, Opcode.PONG):
            stream += ws_frame(opcode, data)
            events.append(Ping(data) if opcode == Opcode.PING else Pong(data))
            continue
        compressed = compression and draw(st.booleans())
        wire = deflate(data, draw(st.integers(9, 15))) if compressed else data
        cuts = sorted(draw(st.lists(st.integers(0, len(wire)), max_size=3)))
        pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
        for i, piece in enumerate(pieces):
            stream += ws_frame(
                opcode if i == 0 else Opcode.CONT,
                piece,
                fin=i == len(pieces) - 1,
                rsv1=compressed and i == 0,
            )
        events.append(Message(data, opcode == Opcode.TEXT))
    return stream, events


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.booleans(), st.lists(st.integers(1, 50), max_size=40))
def test_any_split_of_a_valid_stream_gives_the_same_events(
    data: st.DataObject, compression: bool, sizes: list[int]
) -> None:
    """Compressed or not, fragmented or not, cut anywhere: the same messages."""
    stream, expected = data.draw(valid_streams(compression))
    reader = FrameReader(MAX, deflate=compression)
    got: list[Event] = []
    pos = 0
    for size in sizes:
        got += reader.feed(stream[pos : pos + size])
        pos += size
    got += reader.feed(stream[pos:])
    assert got == expected
    assert reader.buffered == 0


@settings(max_examples=500)
@given(st.lists(st.binary(max_size=200), max_size=20), st.booleans())
def test_random_bytes_raise_only_frame_error_and_hold_at_most_a_message(
    chunks: list[bytes], compressed: bool
) -> None:
    limit = 300
    reader = FrameReader(limit, deflate=compressed)
    for chunk in chunks:
        try:
            reader.feed(chunk)
        except FrameError as error:
            assert error.code in (1002, 1007, 1009)
            return
        assert reader.buffered <= limit + 14


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(st.sampled_from([0x0, 0x1, 0x2, 0x80, 0x81, 0x82]), st.binary(max_size=150)),
        max_size=12,
    )
)
def test_masked_frames_with_random_headers_raise_only_frame_error(
    frames: list[tuple[int, bytes]],
) -> None:
    """Well-formed masked frames in any order: fragment rules and limits, never a crash."""
    limit = 300
    reader = FrameReader(limit)
    for first_byte, payload in frames:
        try:
            reader.feed(raw_frame(first_byte, payload))
        except FrameError as error:
            assert error.code in (1002, 1007, 1009)
            return
        assert reader.buffered <= limit + 14
