"""Autobahn section 7: the closing handshake (RFC 6455 §5.5.1, §7).

A client's close is answered with the same code (with none, when it sent none), nothing is
answered after it, and the server then closes the TCP connection. A close payload of one
byte, over 125 bytes, with a code that may not be sent (§7.4), or with a reason that is not
UTF-8 fails the connection with 1002 (1007 for the reason).
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from compliance.support import assert_still_served, open_client, presence_stats
from compliance.wsclient import OP_CLOSE, OP_CONT, OP_PING, OP_TEXT, encode_frame

#: Codes a client may send (§7.4.1, §7.4.2 and the IANA registry): echoed back.
VALID_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]
VALID_CODES += [3000, 3999, 4000, 4999]
#: Codes that must never be on the wire, or are unassigned below 3000 or out of range.
INVALID_CODES = [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


@pytest.mark.parametrize("code", VALID_CODES)
def test_close_code_is_echoed(ws_server: Any, code: int) -> None:
    """7.7.x: the server answers a client's close with the code it received."""
    with open_client(ws_server) as client:
        client.connect()
        client.send_frame(OP_CLOSE, close_payload(code, b"bye"))
        assert client.expect_close() == code


def test_empty_close_is_answered_without_a_code_or_with_1000(ws_server: Any) -> None:
    """7.3.1: no code received, none to echo (1005 is how an empty payload parses)."""
    with open_client(ws_server) as client:
        client.send_frame(OP_CLOSE, b"")
        assert client.expect_close() in (1000, 1005)


@pytest.mark.parametrize(
    "reason",
    [pytest.param(b"", id="7.3.3-no-reason"), pytest.param(b"x" * 123, id="7.3.5-123-bytes")],
)
def test_normal_close_with_a_reason_up_to_125_bytes_is_echoed(
    ws_server: Any, reason: bytes
) -> None:
    with open_client(ws_server) as client:
        client.send_frame(OP_CLOSE, close_payload(1000, reason))
        assert client.expect_close() == 1000


@pytest.mark.parametrize("code", INVALID_CODES)
def test_forbidden_close_code_fails_with_1002(ws_server: Any, code: int) -> None:
    """7.9.x, 7.13.x: §7.4.1 forbids 1005, 1006 and 1015 on the wire; 0-999 are unused;
    1016-2999 are for future RFCs; nothing above 4999 exists."""
    with open_client(ws_server) as client:
        client.send_frame(OP_CLOSE, close_payload(code))
        assert client.expect_close() == 1002
    assert_still_served(ws_server)


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        pytest.param(b"\x03", 1002, id="7.3.2-one-byte"),
        pytest.param(close_payload(1000, b"x" * 124), 1002, id="7.3.6-126-bytes"),
        pytest.param(
            close_payload(1000, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce"), 1007, id="7.5.1-bad-utf8"
        ),
    ],
)
def test_malformed_close_payload_fails_the_connection(
    ws_server: Any, payload: bytes, code: int
) -> None:
    with open_client(ws_server) as client:
        client.send_raw(encode_frame(OP_CLOSE, payload))
        assert client.expect_close() == code
    assert_still_served(ws_server)


@pytest.mark.parametrize(
    "after",
    [
        pytest.param(encode_frame(OP_CLOSE, close_payload(1001)), id="7.1.2-second-close"),
        pytest.param(encode_frame(OP_PING, b"too late"), id="7.1.3-ping"),
        pytest.param(
            encode_frame(OP_TEXT, b'{"id":2,"presence_stats":{"channel":"a"}}'), id="7.1.4-text"
        ),
        pytest.param(encode_frame(OP_TEXT, b"\xff"), id="invalid-text"),
        pytest.param(encode_frame(0x5), id="reserved-opcode"),
    ],
)
def test_nothing_after_the_clients_close_is_answered(ws_server: Any, after: bytes) -> None:
    """7.1.2-7.1.4: once the client closed, the server answers its close (with the client's
    code, 1000) and nothing else, even a frame that would fail an open connection."""
    with open_client(ws_server) as client:
        client.connect()
        client.send_raw(encode_frame(OP_CLOSE, close_payload(1000)) + after)
        assert client.expect_close() == 1000  # and no pong, reply or second close before EOF


def test_close_inside_a_fragmented_message_is_answered(ws_server: Any) -> None:
    """7.1.5: a close between the fragments of a message ends the connection there."""
    with open_client(ws_server) as client:
        client.connect()
        client.send_raw(
            encode_frame(OP_TEXT, b'{"id":2,', fin=False)
            + encode_frame(OP_CLOSE, close_payload(1000))
            + encode_frame(OP_CONT, b'"presence_stats":{"channel":"a"}}')
        )
        assert client.expect_close() == 1000


def test_no_reply_comes_after_the_close_frame(ws_server: Any) -> None:
    """7.1.6-style: commands before the close are answered (or dropped) before the close
    frame, never after it."""
    with open_client(ws_server) as client:
        client.connect()
        for i in range(2, 12):
            client.send_commands(presence_stats(command_id=i))
        client.send_frame(OP_CLOSE, close_payload(1000))
        assert client.expect_close() == 1000
