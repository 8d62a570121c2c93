"""Autobahn section 6: UTF-8 in text messages (RFC 6455 §5.6, §8.1).

A text message that is not valid UTF-8 fails the connection with 1007 -- not 3501 "bad
request", even when the invalid bytes sit inside an otherwise valid Centrifugo command. The
check is incremental: a message whose first fragment is already invalid is failed before its
last fragment arrives. A code point split across fragments is fine, and arrives intact.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from compliance.support import assert_still_served, open_client, subscribed_client
from compliance.wsclient import OP_CONT, OP_TEXT, WSClient, encode_frame
from helpers import api, publish

#: Byte sequences that are not UTF-8 (Autobahn 6.3-6.21, Markus Kuhn's stress test).
INVALID = {
    "6.3-surrogate-in-text": b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
    "6.6-truncated-2-byte-at-end": b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce",
    "6.8-above-U+10FFFF": b"\xf8\x88\x80\x80\x80",
    "6.9-lone-continuation": b"\x80",
    "6.10-continuations": b"\x80\xbf\x80\xbf",
    "6.12-lone-start-bytes": b"\xc0 \xc1 \xc2 ",
    "6.14-truncated-3-byte": b"\xe0\x80",
    "6.16-fe-ff": b"\xfe\xff",
    "6.17-overlong-slash": b"\xc0\xaf",
    "6.18-overlong-nul": b"\xe0\x80\x80",
    "6.19-lone-high-surrogate": b"\xed\xa0\x80",
    "6.20-surrogate-pair": b"\xed\xa0\x80\xed\xb0\x80",
    "4-byte-above-U+10FFFF": b"\xf4\x90\x80\x80",
}

#: Valid UTF-8 that naive validators refuse (Autobahn 6.2, 6.5, 6.7, 6.23).
VALID = {
    "greek": "κόσμε",
    "boundaries": "\u0080\u07ff\u0800\uffff\U00010000\U0010ffff",
    "noncharacters": "\ufffe\uffff\ufdd0",
    "bom": "\ufeff",
    "4-byte": "𝄞𝄞",
}


def command_with(raw: bytes) -> bytes:
    """A Centrifugo presence_stats command whose channel name holds ``raw`` bytes."""
    return b'{"id":2,"presence_stats":{"channel":"c' + raw + b'"}}'


@pytest.mark.parametrize("raw", INVALID.values(), ids=INVALID.keys())
@pytest.mark.parametrize("inside_command", [False, True], ids=["bare", "in-command"])
def test_invalid_utf8_fails_the_connection_with_1007(
    ws_server: Any, raw: bytes, inside_command: bool
) -> None:
    with open_client(ws_server) as client:
        if inside_command:
            client.connect()
        client.send_frame(OP_TEXT, command_with(raw) if inside_command else raw)
        assert client.expect_close() == 1007
    assert_still_served(ws_server)


@pytest.mark.parametrize(
    ("fragments", "bad_index"),
    [
        pytest.param([command_with(b"\xc0\xaf")[:40], b"aaaa", b'"}}'], 0, id="first-of-3"),
        pytest.param([b'{"id":2,', b'"x":"\xed\xa0\x80', b'"}'], 1, id="second-of-3"),
        pytest.param([b'{"id":2,"x":"\xf4', b"\x90\x80\x80", b'"}'], 1, id="split-above-U+10FFFF"),
        pytest.param([b'{"id":2,"x":"\xe0', b"\x80\x80", b'"}'], 1, id="split-overlong"),
    ],
)
def test_invalid_utf8_fails_fast_before_the_last_fragment(
    ws_server: Any, fragments: list[bytes], bad_index: int
) -> None:
    """6.4: the server must not wait for the end of the message to see that it is invalid."""
    with open_client(ws_server) as client:
        client.connect()
        for i, chunk in enumerate(fragments[: bad_index + 1]):
            client.send_frame(OP_TEXT if i == 0 else OP_CONT, chunk, fin=False)
        # The rest of the message is never sent: only fail-fast can answer now.
        assert client.expect_close() == 1007
    assert_still_served(ws_server)


def test_invalid_utf8_at_the_end_of_a_fragmented_message_fails_with_1007(
    ws_server: Any,
) -> None:
    """A code point left unfinished by the final fragment is invalid (§8.1)."""
    with open_client(ws_server) as client:
        client.connect()
        client.send_fragments([b'{"id":2,"x":"', b"\xf0\x9d\x84"])
        assert client.expect_close() == 1007
    assert_still_served(ws_server)


def published_back(client: WSClient, command_id: int) -> Any:
    """The data of the push that the publish ``command_id`` caused, after its reply."""
    pushed: Any = None
    replied = False
    for message in client.messages():
        if message.get("id") == command_id:
            assert "error" not in message, message
            replied = True
        elif "push" in message:
            pushed = message["push"]["pub"]["data"]
        if replied and pushed is not None:
            return pushed
    raise AssertionError("unreachable")  # pragma: no cover


@pytest.mark.parametrize("text", VALID.values(), ids=VALID.keys())
@pytest.mark.parametrize("split", ["one-frame", "every-byte"])
def test_valid_utf8_split_anywhere_arrives_intact(ws_server: Any, text: str, split: str) -> None:
    """6.2/6.4-style: a publish whose data holds multi-byte code points, cut between every
    byte when ``every-byte`` (so inside each code point), comes back in the push unchanged."""
    client, channel = subscribed_client(ws_server)
    with client:
        command = {"id": 3, "publish": {"channel": channel, "data": {"text": text}}}
        payload = json.dumps(command, ensure_ascii=False).encode()
        if split == "one-frame":
            client.send_frame(OP_TEXT, payload)
        else:
            head = payload.index(text.encode())
            tail = head + len(text.encode())
            cuts = [payload[:head], *(payload[i : i + 1] for i in range(head, tail))]
            client.send_fragments([*cuts, payload[tail:]])
        assert published_back(client, 3) == {"text": text}


def test_code_point_split_across_fragments_with_a_ping_between(ws_server: Any) -> None:
    """The validator's state survives a control frame between the two halves of a character."""
    client, channel = subscribed_client(ws_server)
    with client:
        command = {"id": 3, "publish": {"channel": channel, "data": "a𝄞b"}}
        payload = json.dumps(command, ensure_ascii=False).encode()
        cut = payload.index("𝄞".encode()) + 2
        client.send_frame(OP_TEXT, payload[:cut], fin=False)
        client.send_raw(encode_frame(0x9, b"mid-character"))
        client.expect_pong(b"mid-character")
        client.send_frame(OP_CONT, payload[cut:], fin=True)
        assert published_back(client, 3) == "a𝄞b"


@pytest.mark.parametrize("fragmented", [False, True])
def test_invalid_utf8_in_published_data_reaches_no_subscriber_and_no_history(
    ws_server: Any, fragmented: bool
) -> None:
    """Issue 10: raw JSON ``data`` with invalid UTF-8 was stored and pushed to every subscriber.
    The publisher is failed with 1007; the subscriber's next push is the next valid publication,
    and history holds only that one."""
    subscriber, channel = subscribed_client(ws_server)
    publisher = open_client(ws_server)
    with subscriber, publisher:
        publisher.connect()
        publisher.send_commands({"id": 2, "subscribe": {"channel": channel}})
        assert "subscribe" in publisher.reply(2)
        bad = b'{"id":3,"publish":{"channel":"' + channel.encode() + b'","data":"\xc3\x28"}}'
        if fragmented:
            cut = bad.index(b"\xc3") + 1
            publisher.send_fragments([bad[:cut], bad[cut:]])
        else:
            publisher.send_frame(OP_TEXT, bad)
        assert publisher.expect_close() == 1007
        valid = publish(ws_server, channel, {"valid": True})
        push = next(m for m in subscriber.messages() if "push" in m)
        pub = push["push"]["pub"]
        assert (pub["data"], pub["offset"]) == ({"valid": True}, valid["offset"]), push
        history = api(ws_server, "history", {"channel": channel, "limit": -1}).json()
        assert [p["data"] for p in history["result"]["publications"]] == [{"valid": True}], history
