"""Autobahn section 9, adapted: limits, judged on the *announced* length (issue 10, item 2).

The server decides from a frame's header alone: a control frame announcing more than 125
bytes fails with 1002, a data frame (or the running total of a fragmented message) announcing
more than ``websocket.max_message_size`` fails with 1009 -- before a byte of payload is sent.
Whatever the client streams afterwards is not buffered: the server's RSS is measured while a
client keeps sending after the header, and a subscriber is still served meanwhile.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from compliance.support import (
    MAX_MESSAGE_SIZE,
    assert_still_served,
    open_client,
    rss_bytes,
    subscribed_client,
)
from compliance.wsclient import (
    OP_BINARY,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    deflate_message,
    frame_header,
)
from helpers import publish

#: Bytes a hostile client streams after a refused header.
STREAM_BYTES = 16 << 20
#: RSS growth allowed while it streams: noise of a Python process, far below STREAM_BYTES.
RSS_SLACK = 4 << 20


def publish_command(channel: str, size: int, command_id: int = 3) -> bytes:
    """A publish command of exactly ``size`` bytes (the data string pads it)."""
    empty = json.dumps({"id": command_id, "publish": {"channel": channel, "data": ""}}).encode()
    command = json.dumps(
        {"id": command_id, "publish": {"channel": channel, "data": "x" * (size - len(empty))}}
    ).encode()
    assert len(command) == size
    return command


def stream_garbage(sock: socket.socket, total: int) -> int:
    """Send up to ``total`` bytes after a refused header; returns how many the kernel took
    before the server's close showed (EPIPE, ECONNRESET) or the socket stopped taking them."""
    sock.settimeout(1.0)
    chunk = b"\xa5" * 65536
    sent = 0
    try:
        while sent < total:
            sent += sock.send(chunk)
    except OSError:  # reset or pipe closed: the server is gone, as it should be
        pass
    return sent


@pytest.mark.parametrize(
    ("prelude", "header", "code"),
    [
        pytest.param(b"", frame_header(OP_PING, 1 << 40), 1002, id="ping-announcing-2^40"),
        pytest.param(b"", frame_header(OP_PING, 126), 1002, id="ping-announcing-126"),
        pytest.param(b"", frame_header(OP_TEXT, 1 << 40), 1009, id="text-announcing-2^40"),
        pytest.param(
            b"", frame_header(OP_BINARY, MAX_MESSAGE_SIZE + 1), 1009, id="binary-over-limit"
        ),
        pytest.param(
            b"", frame_header(OP_TEXT, MAX_MESSAGE_SIZE + 1, fin=False), 1009, id="fragment-over"
        ),
        pytest.param(
            frame_header(OP_TEXT, 0, fin=False),
            frame_header(OP_CONT, 1 << 40),
            1009,
            id="continuation-announcing-2^40",
        ),
    ],
)
def test_header_over_a_bound_fails_before_its_payload_and_nothing_is_buffered(
    ws_server: Any, prelude: bytes, header: bytes, code: int
) -> None:
    watcher, channel = subscribed_client(ws_server)
    with watcher, open_client(ws_server) as attacker:
        attacker.connect()
        attacker.send_raw(prelude + header)  # the header only: no payload follows (yet)
        try:
            received: int | str | None = attacker.expect_close()
        except TimeoutError:
            received = "nothing"
        before = rss_bytes(ws_server)
        streamed = stream_garbage(attacker.sock, STREAM_BYTES)
        growth = rss_bytes(ws_server) - before
        pushed = publish(ws_server, channel, {"after": "attack"})
        push = next(m for m in watcher.messages() if "push" in m)
        assert push["push"]["pub"]["offset"] == pushed["offset"]
    print(
        f"header {header.hex()}: close {received}, then {streamed} bytes streamed, RSS {growth:+}"
    )
    problems = []
    if received != code:
        problems.append(f"close {received} at the header, expected {code}")
    if growth >= RSS_SLACK:
        problems.append(f"RSS grew {growth} bytes while the client streamed {streamed}")
    assert not problems, "; ".join(problems)


def test_64_bit_length_with_the_top_bit_set_fails_with_1002(ws_server: Any) -> None:
    """§5.2: the most significant bit of a 64-bit payload length MUST be 0."""
    with open_client(ws_server) as client:
        client.send_raw(frame_header(OP_BINARY, 1 << 63))
        assert client.expect_close() == 1002
    assert_still_served(ws_server)


def test_fragmented_message_passing_the_limit_fails_at_the_fragment_header(ws_server: Any) -> None:
    """9.x: every fragment fits; their running total does not. The server fails the message
    when the header of the fragment that crosses the limit arrives, before its payload."""
    with open_client(ws_server) as client:
        client.connect()
        first = MAX_MESSAGE_SIZE - 100
        client.send_frame(OP_TEXT, b'{"id":2,"x":"' + b"a" * (first - 13), fin=False)
        client.send_frame(OP_CONT, b"b" * 99, fin=False)  # MAX - 1 bytes so far: fine
        client.send_raw(frame_header(OP_CONT, 2, fin=True))  # + 2 > MAX
        assert client.expect_close() == 1009
    assert_still_served(ws_server)


@pytest.mark.parametrize("fragments", [1, 4, 256])
def test_message_of_exactly_the_limit_is_accepted(ws_server: Any, fragments: int) -> None:
    """The bound is inclusive: a publish of exactly ``max_message_size`` bytes is answered."""
    client, channel = subscribed_client(ws_server)
    with client:
        command = publish_command(channel, MAX_MESSAGE_SIZE)
        step = -(-len(command) // fragments)
        client.send_fragments([command[i : i + step] for i in range(0, len(command), step)])
        reply = client.reply(3)
        assert "publish" in reply, reply


def test_one_byte_over_the_limit_fails_with_1009(ws_server: Any) -> None:
    with open_client(ws_server) as client:
        client.connect()
        client.send_frame(OP_TEXT, publish_command("over", MAX_MESSAGE_SIZE + 1))
        assert client.expect_close() == 1009
    assert_still_served(ws_server)


@pytest.mark.parametrize("split", [False, True], ids=["one-frame", "fragmented"])
def test_compressed_message_inflating_past_the_limit_fails_with_1009(
    ws_server: Any, split: bool
) -> None:
    """A few hundred compressed bytes that inflate past the limit: the bound applies to the
    inflated size, and inflating stops there (no decompression bomb)."""
    with open_client(ws_server, "permessage-deflate") as client:
        assert client.deflate is not None
        client.connect()
        command = publish_command("bomb", 64 * MAX_MESSAGE_SIZE)
        compressed = deflate_message(command)
        assert len(compressed) < MAX_MESSAGE_SIZE // 4
        client.send_compressed(command, split=[len(compressed) // 2] if split else [])
        assert client.expect_close() == 1009
    assert_still_served(ws_server)
