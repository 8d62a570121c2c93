"""Autobahn section 2: ping and pong (RFC 6455 §5.5.2, §5.5.3).

A ping is answered with a pong carrying the same payload, whatever state the Centrifugo
session is in; an unsolicited pong is ignored; a ping over 125 bytes fails the connection.
"""

from __future__ import annotations

from typing import Any

import pytest

from compliance.support import assert_still_served, open_client
from compliance.wsclient import OP_PING, OP_PONG, Message, ServerFrame, encode_frame


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="2.1-empty"),
        pytest.param(b"Hello, world!", id="2.2-text"),
        pytest.param(bytes([0x00, 0xFF, 0xFE, 0xFD, 0xFC, 0xFB, 0x00, 0xFF]), id="2.3-binary"),
        pytest.param(bytes(range(125)), id="2.4-125-bytes"),
    ],
)
def test_ping_is_answered_with_its_payload(ws_server: Any, payload: bytes) -> None:
    with open_client(ws_server) as client:
        client.send_frame(OP_PING, payload)
        client.expect_pong(payload)


def test_ping_in_one_byte_chunks_is_answered(ws_server: Any) -> None:
    """2.6: the frame arrives a byte at a time; the server reassembles it."""
    payload = b"\xfe" * 125
    with open_client(ws_server) as client:
        for byte in encode_frame(OP_PING, payload):
            client.send_raw(bytes([byte]))
        client.expect_pong(payload)


def test_ping_is_answered_in_a_connected_session(ws_server: Any) -> None:
    """A connected session answers pings too (control frames bypass the command queue)."""
    with open_client(ws_server) as client:
        client.connect()
        client.send_frame(OP_PING, b"session")
        client.expect_pong(b"session")


def test_ping_of_126_bytes_fails_the_connection(ws_server: Any) -> None:
    """2.5: control frames carry at most 125 bytes (§5.5)."""
    with open_client(ws_server) as client:
        client.send_frame(OP_PING, b"\xfe" * 126)
        assert client.expect_close() == 1002
    assert_still_served(ws_server)


@pytest.mark.parametrize(
    "payload", [pytest.param(b"", id="2.7-empty"), pytest.param(b"unsolicited", id="2.8-payload")]
)
def test_unsolicited_pong_is_ignored(ws_server: Any, payload: bytes) -> None:
    """2.7-2.9: a pong nobody asked for changes nothing; the next ping is answered."""
    with open_client(ws_server) as client:
        client.send_frame(OP_PONG, payload)
        client.send_frame(OP_PING, b"after")
        client.expect_pong(b"after")


@pytest.mark.parametrize("pause_between", [False, True], ids=["2.10-burst", "2.11-paced"])
def test_ten_pings_are_answered_in_order(ws_server: Any, pause_between: bool) -> None:
    """2.10/2.11: a server may skip pongs for pings it has not answered yet (§5.5.3), but
    every pong it sends answers one of them, in order, and the last ping is answered."""
    payloads = [f"ping {i}".encode() for i in range(10)]
    with open_client(ws_server) as client:
        if pause_between:
            for payload in payloads:
                client.send_frame(OP_PING, payload)
                client.expect_pong(payload)
            return
        client.send_raw(b"".join(encode_frame(OP_PING, p) for p in payloads))
        answered: list[bytes] = []
        while payloads[-1] not in answered:
            frame = client.recv_message()
            if isinstance(frame, Message):
                continue  # a Centrifugo ping or push, not an answer
            assert isinstance(frame, ServerFrame), "the server closed the TCP connection"
            assert frame.opcode == OP_PONG, frame
            answered.append(frame.payload)
        positions = [payloads.index(p) for p in answered]
        assert positions == sorted(set(positions)), answered
