"""Autobahn sections 3 (reserved bits), 4 (opcodes) and 5 (fragmentation), adapted.

Every frame the RFC forbids fails the connection with 1002 (RFC 6455 §5.2, §5.4, §5.5),
whether or not a valid message came before it, and the next client is still served. Where
Autobahn echoes a fragmented message, here the fragments carry a Centrifugo command and the
reply is asserted; control frames between fragments are answered before the message ends.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from compliance.support import assert_accepted, assert_still_served, open_client, presence_stats
from compliance.wsclient import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    encode_frame,
)

CONNECT = b'{"id":1,"connect":{}}'
STATS = json.dumps(presence_stats()).encode()
GOOD = encode_frame(OP_TEXT, CONNECT)  # a valid message before the bad frame
PING = encode_frame(OP_PING, b"after")  # must never be answered once the bad frame is read


def text(payload: bytes = b"Hello", *, fin: bool = True, rsv: int = 0) -> bytes:
    return encode_frame(OP_TEXT, payload, fin=fin, rsv=rsv)


def cont(payload: bytes = b"fragment", *, fin: bool = True) -> bytes:
    return encode_frame(OP_CONT, payload, fin=fin)


def chunked(frame: bytes) -> list[bytes]:
    """A frame sent one byte per write: the server must judge it the same."""
    return [frame[i : i + 1] for i in range(len(frame))]


PROTOCOL_ERRORS: list[Any] = [
    # -- section 3: reserved bits, no extension negotiated
    pytest.param([text(rsv=1)], id="3.1-text-rsv3"),
    pytest.param([GOOD, text(rsv=2), PING], id="3.2-text-rsv2-after-valid"),
    pytest.param([GOOD, text(rsv=3), PING], id="3.3-text-rsv2+3"),
    pytest.param(chunked(text(rsv=4)), id="3.4-text-rsv1-byte-by-byte"),
    pytest.param([encode_frame(OP_BINARY, b"\xff" * 8, rsv=5)], id="3.5-binary-rsv1+3"),
    pytest.param([encode_frame(OP_PING, b"p", rsv=6)], id="3.6-ping-rsv1+2"),
    pytest.param([encode_frame(OP_CLOSE, b"\x03\xe8", rsv=7)], id="3.7-close-all-rsv"),
    # -- section 4: reserved opcodes
    *(pytest.param([encode_frame(op)], id=f"4.1-opcode-{op}-empty") for op in (3, 4, 5, 6, 7)),
    pytest.param([GOOD, encode_frame(5, b"payload"), PING], id="4.1.3-opcode-5-after-valid"),
    *(pytest.param([encode_frame(op)], id=f"4.2-opcode-{op}-empty") for op in range(11, 16)),
    pytest.param([GOOD, encode_frame(13, b"payload"), PING], id="4.2.3-opcode-13-after-valid"),
    # -- section 5: fragmentation
    pytest.param(
        [encode_frame(OP_PING, b"frag", fin=False), cont(b"ment")], id="5.1-fragmented-ping"
    ),
    pytest.param(
        [encode_frame(OP_PONG, b"frag", fin=False), cont(b"ment")], id="5.2-fragmented-pong"
    ),
    pytest.param([cont(fin=True), GOOD, PING], id="5.9-lone-final-continuation"),
    pytest.param([*chunked(cont(fin=True)), GOOD, PING], id="5.10-same-byte-by-byte"),
    pytest.param([cont(fin=False), GOOD, PING], id="5.12-lone-continuation"),
    pytest.param(
        [text(b"{", fin=False), cont(b"}"), cont(b"more", fin=False), text(), PING],
        id="5.15-continuation-after-the-message-ended",
    ),
    pytest.param(
        [cont(fin=False), text(fin=False), cont(fin=True)] * 2, id="5.16-continuations-first"
    ),
    pytest.param(
        [cont(fin=True), text(fin=False), cont(fin=True)] * 2, id="5.17-final-continuations-first"
    ),
    pytest.param([text(b"{", fin=False), text(b"}")], id="5.18-new-text-inside-a-message"),
    pytest.param(
        [text(b"{", fin=False), encode_frame(OP_BINARY, b"}")], id="new-binary-inside-a-message"
    ),
]


@pytest.mark.parametrize("frames", PROTOCOL_ERRORS)
def test_forbidden_frame_fails_the_connection_with_1002(
    ws_server: Any, frames: list[bytes]
) -> None:
    with open_client(ws_server) as client:
        for data in frames:
            try:
                client.send_raw(data)
            except OSError:
                break  # the server already failed the connection; what it said is read below
        assert client.expect_close() == 1002
    assert_still_served(ws_server)


@pytest.mark.parametrize("rsv", [1, 2, 3], ids=["rsv3", "rsv2", "rsv2+3"])
def test_unnegotiated_reserved_bits_fail_even_with_deflate(ws_server: Any, rsv: int) -> None:
    """RSV2/RSV3 mean nothing under permessage-deflate either."""
    with open_client(ws_server, "permessage-deflate") as client:
        assert client.deflate is not None
        client.send_raw(text(CONNECT, rsv=rsv | 4))
        assert client.expect_close() == 1002
    assert_still_served(ws_server)


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param([encode_frame(OP_PING, b"p", rsv=4)], id="rsv1-on-ping"),
        pytest.param(
            [text(b"{", fin=False), encode_frame(OP_CONT, b"}", rsv=4)], id="rsv1-on-continuation"
        ),
    ],
)
def test_rsv1_where_deflate_does_not_allow_it_fails_with_1002(
    ws_server: Any, frames: list[bytes]
) -> None:
    """RFC 7692 §6: RSV1 only on the first frame of a data message; never on control frames."""
    with open_client(ws_server, "permessage-deflate") as client:
        assert client.deflate is not None
        for data in frames:
            client.send_raw(data)
        assert client.expect_close() == 1002
    assert_still_served(ws_server)


# --------------------------------------------------------------------------- accepted


@pytest.mark.parametrize(
    "sizes",
    [
        pytest.param([1] * len(STATS), id="5.8-one-byte-fragments"),
        pytest.param([0, len(STATS), 0], id="empty-first-and-last-fragments"),
        pytest.param([10, 20, len(STATS)], id="5.3-three-fragments"),
    ],
)
def test_fragmented_command_is_reassembled_and_answered(ws_server: Any, sizes: list[int]) -> None:
    cuts = [0]
    for size in sizes:
        cuts.append(min(len(STATS), cuts[-1] + size))
    cuts[-1] = len(STATS)
    fragments = [STATS[a:b] for a, b in itertools.pairwise(cuts)]
    with open_client(ws_server) as client:
        client.connect()
        client.send_fragments(fragments)
        assert_accepted(client)


@pytest.mark.parametrize("control", [OP_PING, OP_PONG], ids=["5.6-ping", "5.7-pong"])
def test_control_frame_between_fragments_is_handled_before_the_message_ends(
    ws_server: Any, control: int
) -> None:
    """5.6/5.7/5.19/5.20: a ping inside a fragmented message is answered at once, before the
    last fragment is sent; a pong there is ignored; the message still completes."""
    with open_client(ws_server) as client:
        client.connect()
        client.send_frame(OP_TEXT, STATS[:7], fin=False)
        client.send_frame(control, b"in the middle")
        client.send_frame(OP_CONT, STATS[7:15], fin=False)
        if control == OP_PING:
            client.expect_pong(b"in the middle")
        client.send_frame(OP_PING, b"again")
        client.expect_pong(b"again")
        client.send_frame(OP_CONT, STATS[15:], fin=True)
        assert_accepted(client)
