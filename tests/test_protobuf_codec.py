"""Unit tests of the Protobuf wire (``tidings/centrifuge/protobuf.py``), sans-I/O.

Commands are built, and replies read, with the centrifuge-python SDK's own
generated classes (``centrifuge.protocol.client_pb2``), not ours: the bytes
must be Centrifugo's, whatever our copy of ``client.proto`` says. A frame
decodes to the same :class:`Command` objects as the JSON form of the same
commands; hostile frames close with the JSON form's codes and hold nothing
beyond the frame.
"""

from __future__ import annotations

import base64
import tracemalloc
from typing import Any

import msgspec
import pytest
from centrifuge.protocol import client_pb2 as sdk
from google.protobuf.json_format import MessageToDict, ParseDict

from tidings.centrifuge import protobuf
from tidings.centrifuge.protobuf import (
    PROTOBUF,
    decode_commands,
    encode_reply,
    error_reply,
    presence_push_protobuf,
    push_protobuf,
    unsubscribe_push,
)
from tidings.centrifuge.schema import (
    BadRequest,
    ConnectResult,
    Empty,
    HistoryResult,
    PresenceResult,
    PresenceStatsResult,
    RefreshResult,
    Reply,
    SubRefreshResult,
    SubscribeResult,
    presence_entries,
)
from tidings.centrifuge.schema import decode_commands as decode_json
from tidings.centrifuge.wire import JSON
from tidings.errors import DisconnectCode, ErrorCode, ProtocolError
from tidings.frames import OP_BINARY, OP_TEXT, Deflater
from tidings.stream import ClientInfo, PresenceEvent, Publication
from tidings.transports.websocket import PushEncoder
from ws_support import strict_inflate

pytestmark = pytest.mark.unit

BAD_REQUEST = DisconnectCode.BAD_REQUEST
INVALID_DATA = DisconnectCode.INVALID_DATA


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def delimited(*messages: bytes) -> bytes:
    return b"".join(varint(len(m)) + m for m in messages)


#: ``data`` fields: raw JSON in the JSON form, ``bytes`` (the JSON's bytes) in Protobuf.
_DATA_FIELDS = {"data"}


def _as_protobuf_dict(value: Any) -> Any:
    """A JSON command as ``ParseDict`` wants it: every ``data`` as base64 of its JSON bytes."""
    if isinstance(value, dict):
        return {
            key: base64.b64encode(msgspec.json.encode(item)).decode()
            if key in _DATA_FIELDS
            else _as_protobuf_dict(item)
            for key, item in value.items()
        }
    return value


def sdk_frame(*commands: dict[str, Any]) -> bytes:
    """A frame as centrifuge-python would send it: each command through the SDK's classes."""
    return delimited(
        *(ParseDict(_as_protobuf_dict(c), sdk.Command()).SerializeToString() for c in commands)
    )


def sdk_replies(frame: bytes) -> list[dict[str, Any]]:
    """Replies read as the SDK reads them (length-delimited, its own classes)."""
    replies = []
    pos = 0
    while pos < len(frame):
        length, pos = protobuf._read_varint(frame, pos)
        reply = sdk.Reply.FromString(frame[pos : pos + length])
        pos += length
        replies.append(MessageToDict(reply, preserving_proto_field_name=True))
    assert pos == len(frame), "a reply ran past the frame"
    return replies


def refused(payload: bytes) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        decode_commands(payload)
    return caught.value


# --------------------------------------------------------------------------- decoding

#: The JSON fuzz seeds' commands, and more: every request, every field the session reads.
COMMANDS: list[dict[str, Any]] = [
    {"id": 1, "connect": {"token": "x.y.z", "name": "swift", "version": "0.7", "data": {"a": 1}}},
    {
        "id": 1,
        "connect": {
            "subs": {"news": {"recover": True, "epoch": "e", "offset": 7, "flag": 2}},
        },
    },
    {
        "id": 2,
        "subscribe": {
            "channel": "news",
            "token": "t",
            "recover": True,
            "epoch": "ab",
            "offset": 2**63 - 1,
            "data": [1, "two"],
            "positioned": True,
            "recoverable": True,
            "join_leave": True,
            "flag": 2,
        },
    },
    {"id": 3, "unsubscribe": {"channel": "news"}},
    {"id": 4, "publish": {"channel": "news", "data": {"text": "héllo ✓"}}},
    {"id": 5, "presence": {"channel": "news"}},
    {"id": 6, "presence_stats": {"channel": "news"}},
    {"id": 7, "history": {"channel": "news", "limit": -1, "reverse": True}},
    {"id": 8, "history": {"channel": "news", "limit": 10, "since": {"offset": 3, "epoch": "e"}}},
    {"id": 9, "ping": {}},
    {"send": {"data": {"x": 1}}},
    {"id": 10, "rpc": {"method": "m", "data": {}}},
    {"id": 11, "refresh": {"token": "t"}},
    {"id": 12, "sub_refresh": {"channel": "news", "token": "t"}},
    {"id": 4294967295, "publish": {"channel": "", "data": 0}},
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: next(iter(c.keys() - {"id"}), "id"))
def test_a_command_decodes_to_what_its_json_form_decodes_to(command: dict[str, Any]) -> None:
    (from_json,) = decode_json(msgspec.json.encode(command))
    (from_protobuf,) = decode_commands(sdk_frame(command))
    assert from_protobuf == from_json


def test_a_frame_of_several_commands_and_a_pong_decodes_in_order() -> None:
    commands = decode_commands(sdk_frame(*COMMANDS[:4]) + b"\x00")
    assert [c.id for c in commands] == [1, 1, 2, 3, 0]
    assert commands[-1] == decode_json(b"{}")[0], "an empty command is the client's pong"
    assert PROTOBUF.ping == b"\x00", "the server's ping is an empty reply, its pong the same"


def test_unknown_fields_are_skipped() -> None:
    """Newer SDKs send fields we do not read (``tf``, map subscriptions, headers)."""
    subscribe = sdk.SubscribeRequest(channel="news", delta="fossil", tf=sdk.FilterNode(op="and"))
    # type = 1 and limit = 5 (map subscriptions, newer than the SDK's schema), field 127 = 1.
    subscribe_bytes = subscribe.SerializeToString() + b"\x78\x01\x90\x01\x05\xf8\x07\x01"
    command = b"\x08\x02\x2a" + varint(len(subscribe_bytes)) + subscribe_bytes + b"\xf8\x07\x01"
    (decoded,) = decode_commands(delimited(command))
    assert decoded == decode_json(b'{"id":2,"subscribe":{"channel":"news","delta":"fossil"}}')[0]


# --------------------------------------------------------------------------- hostile frames


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        (b"", "empty frame"),
        (b"\x80", "cut off"),  # a varint whose continuation bit promises more
        (b"\x05\x08\x01\x80", "past the end"),
        (b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
        (b"\xff\xff\xff\xff\x0f" + b"\x08\x01", "past the end"),  # 4 GiB announced
        (b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", "past the end"),  # 2**64 - 1
        (delimited(b"\x08"), "malformed"),  # a field key with no value
        (delimited(b"\x08\x80"), "malformed"),  # a truncated varint inside the command
        (delimited(b"\x2a\x05\x0a\x01"), "malformed"),  # subscribe longer than the command
        (delimited(b"\x0f"), "malformed"),  # wire type 7 does not exist
    ],
)
def test_a_malformed_frame_closes_with_bad_request(payload: bytes, detail: str) -> None:
    error = refused(payload)
    assert error.disconnect.code == BAD_REQUEST
    assert detail in str(error)


def test_commands_before_a_bad_one_do_not_make_the_frame_acceptable() -> None:
    good = sdk_frame({"id": 1, "connect": {}})
    assert refused(good + b"\x03\x08").disconnect.code == BAD_REQUEST


def test_invalid_utf8_in_a_string_field_closes_with_1007() -> None:
    command = sdk.Command(id=2, subscribe=sdk.SubscribeRequest(channel="news")).SerializeToString()
    broken = command.replace(b"news", b"ne\xffs")
    error = refused(delimited(broken))
    assert error.disconnect.code == INVALID_DATA
    assert "UTF-8" in str(error)
    # An encoded surrogate (U+D800) is no UTF-8 either.
    assert refused(delimited(command.replace(b"news", b"\xed\xa0\x80s"))).disconnect.code == (
        INVALID_DATA
    )


def test_invalid_utf8_in_data_closes_with_1007_and_names_the_field() -> None:
    command = sdk.Command(id=4, publish=sdk.PublishRequest(channel="a", data=b'"\xff"'))
    error = refused(delimited(command.SerializeToString()))
    assert error.disconnect.code == INVALID_DATA
    assert "publish.data" in str(error)


@pytest.mark.parametrize(
    "data", [b"\x00\x01binary", b"{", b'{"a":1} trailing', b"[" * 5000 + b"]" * 5000]
)
def test_data_that_is_not_json_closes_with_bad_request(data: bytes) -> None:
    """A JSON subscriber of the channel would otherwise receive what is not JSON."""
    command = sdk.Command(id=4, publish=sdk.PublishRequest(channel="a", data=data))
    error = refused(delimited(command.SerializeToString()))
    assert error.disconnect.code == BAD_REQUEST
    assert "publish.data is not JSON" in str(error)


def test_an_offset_past_the_json_forms_bound_closes_with_bad_request() -> None:
    for command in (
        sdk.Command(id=2, subscribe=sdk.SubscribeRequest(channel="a", offset=2**63)),
        sdk.Command(
            id=3,
            history=sdk.HistoryRequest(channel="a", since=sdk.StreamPosition(offset=2**64 - 1)),
        ),
    ):
        error = refused(delimited(command.SerializeToString()))
        assert error.disconnect.code == BAD_REQUEST
        assert "past 2**63 - 1" in str(error)


def test_nesting_past_the_parsers_limit_closes_with_bad_request() -> None:
    """``tf`` (FilterNode) nests without bound in the schema; upb stops at its limit."""
    node = b""
    for _ in range(200):
        node = b"\x32" + varint(len(node)) + node  # FilterNode.nodes = [node]
    subscribe = b"\x0a\x01a" + b"\x6a" + varint(len(node)) + node  # channel, tf
    command = b"\x08\x02" + b"\x2a" + varint(len(subscribe)) + subscribe
    assert refused(delimited(command)).disconnect.code == BAD_REQUEST


def test_a_huge_declared_length_is_refused_without_allocating_it() -> None:
    frame = b"\xff\xff\xff\xff\x07" + b"\x08\x01" * 100  # 2 GiB announced, 200 bytes sent
    tracemalloc.start()
    try:
        refused(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, f"{peak} bytes allocated for a 205-byte frame"


# --------------------------------------------------------------------------- encoding

INFO = ClientInfo("alice", "c1", msgspec.Raw(b'{"role":"admin"}'), msgspec.Raw(b'{"seat":3}'))


def publication(offset: int = 5) -> Publication:
    return Publication(
        "chat:room", offset, "ep", b'{"text":"hi"}', INFO, {"kind": "msg"}, time_ms=1_700_000
    )


def test_a_publication_push_reads_as_centrifugos_push() -> None:
    (reply,) = sdk_replies(push_protobuf(publication()))
    assert set(reply) == {"push"}, "a push is a Reply without id"
    push = reply["push"]
    assert push["channel"] == "chat:room"
    pub = push["pub"]
    assert base64.b64decode(pub["data"]) == b'{"text":"hi"}'
    assert pub["offset"] == "5"  # uint64, as json_format writes it
    assert pub["tags"] == {"kind": "msg"}
    assert pub["time"] == "1700000"
    assert pub["info"]["user"] == "alice"
    assert pub["info"]["client"] == "c1"
    assert base64.b64decode(pub["info"]["conn_info"]) == b'{"role":"admin"}'
    assert base64.b64decode(pub["info"]["chan_info"]) == b'{"seat":3}'


def test_a_publication_is_encoded_once_for_every_protobuf_subscriber() -> None:
    pub = publication()
    first = pub.encoded(PROTOBUF.push)
    assert pub.encoded(PROTOBUF.push) is first
    assert pub.encoded(PROTOBUF.push) is not pub.encoded(protobuf.publication_protobuf)


def test_a_push_without_info_or_tags_carries_neither() -> None:
    (reply,) = sdk_replies(push_protobuf(Publication("a", 1, "e", b"1", time_ms=0)))
    assert reply == {"push": {"channel": "a", "pub": {"data": "MQ==", "offset": "1"}}}


def test_replies_batched_in_a_frame_are_joined_as_the_sdk_splits_them() -> None:
    recovered = SubscribeResult(
        recoverable=True,
        epoch="ep",
        offset=6,
        recovered=True,
        positioned=True,
        was_recovering=True,
        publications=PROTOBUF.publications([publication(5), publication(6)]),
    )
    frame = PROTOBUF.separator.join(
        [
            encode_reply(Reply(id=2, subscribe=recovered)),
            error_reply(3, ProtocolError(ErrorCode.UNRECOVERABLE_POSITION)),
            encode_reply(Reply(id=4, history=HistoryResult(epoch="ep", offset=0))),
        ]
    )
    subscribe, error, history = sdk_replies(frame)
    assert subscribe["id"] == 2
    result = subscribe["subscribe"]
    assert [p["offset"] for p in result["publications"]] == ["5", "6"]
    assert result["recovered"] and result["was_recovering"] and result["positioned"]
    assert result["epoch"] == "ep" and result["offset"] == "6"
    assert error == {
        "id": 3,
        "error": {
            "code": int(ErrorCode.UNRECOVERABLE_POSITION),
            "message": "unrecoverable position",
        },
    }
    # An empty history is still a history result (Protobuf cannot tell empty from absent
    # inside it; the SDK reads the zero values).
    assert history == {"id": 4, "history": {"epoch": "ep"}}


def test_presence_results_and_pushes_read_as_centrifugos() -> None:
    presence = PresenceResult(presence=presence_entries({"c1": INFO}))
    stats = PresenceStatsResult(num_clients=0, num_users=0)
    replies = sdk_replies(
        encode_reply(Reply(id=5, presence=presence))
        + encode_reply(Reply(id=6, presence_stats=stats))
        + presence_push_protobuf(PresenceEvent("room", "join", INFO))
        + presence_push_protobuf(PresenceEvent("room", "leave", ClientInfo("", "c2")))
        + unsubscribe_push("room", 2501, "subscription expired")
    )
    entry = replies[0]["presence"]["presence"]["c1"]
    assert entry["user"] == "alice" and entry["client"] == "c1"
    assert replies[1] == {"id": 6, "presence_stats": {}}, "zero stats, present as a result"
    assert replies[2]["push"]["join"]["info"]["client"] == "c1"
    assert replies[3]["push"] == {"channel": "room", "leave": {"info": {"client": "c2"}}}
    assert replies[4]["push"] == {
        "channel": "room",
        "unsubscribe": {"code": 2501, "reason": "subscription expired"},
    }


# --------------------------------------------------------------------------- frames


def test_protobuf_pushes_are_binary_frames_encoded_once_per_variant() -> None:
    """The transport's encoders: binary frames, plain or deflated (RSV1), one ``bytes``
    object per publication per variant, shared by every subscriber of it."""
    plain = PushEncoder(PROTOBUF)
    deflated = PushEncoder(PROTOBUF, Deflater(15), threshold=0, plain=plain)
    json_plain = PushEncoder(JSON)
    pub = Publication("a", 1, "e", b'{"text":"' + b"x" * 500 + b'"}', time_ms=0)
    frame = pub.encoded(plain)
    assert frame[0] == 0x80 | OP_BINARY
    assert frame.endswith(push_protobuf(pub))
    assert pub.encoded(plain) is frame, "encoded once, shared"
    compressed = pub.encoded(deflated)
    assert compressed[0] == 0xC0 | OP_BINARY, "RSV1 and binary"
    assert compressed[1] < 126, "a short frame: 2 bytes of header"
    assert strict_inflate(compressed[2:], 15) == push_protobuf(pub)
    assert pub.encoded(json_plain)[0] == 0x80 | OP_TEXT
    assert plain.ping_frame == bytes((0x80 | OP_BINARY, 1)) + PROTOBUF.ping
    assert plain.message_frame(b"\x00")[0] == 0x80 | OP_BINARY


def test_every_other_result_reads_as_centrifugos() -> None:
    """connect (with server-side subscriptions), refresh, sub_refresh and the empty results."""
    sub = SubscribeResult(recoverable=True, positioned=True, epoch="ep", offset=3)
    connect = ConnectResult(
        client="c1", version="1.0", expires=True, ttl=60, subs={"#alice": sub}, ping=25, pong=True
    )
    frame = b"".join(
        [
            encode_reply(Reply(id=1, connect=connect)),
            encode_reply(Reply(id=2, refresh=RefreshResult(client="c1", expires=True, ttl=30))),
            encode_reply(Reply(id=3, sub_refresh=SubRefreshResult(expires=True, ttl=10))),
            encode_reply(Reply(id=4, unsubscribe=Empty())),
            encode_reply(Reply(id=5, publish=Empty())),
            encode_reply(Reply(id=6, ping=Empty())),
        ]
    )
    got = sdk_replies(frame)
    assert got[0] == {
        "id": 1,
        "connect": {
            "client": "c1",
            "version": "1.0",
            "expires": True,
            "ttl": 60,
            "subs": {
                "#alice": {"recoverable": True, "positioned": True, "epoch": "ep", "offset": "3"}
            },
            "ping": 25,
            "pong": True,
        },
    }
    assert got[1] == {"id": 2, "refresh": {"client": "c1", "expires": True, "ttl": 30}}
    assert got[2] == {"id": 3, "sub_refresh": {"expires": True, "ttl": 10}}
    assert got[3:] == [
        {"id": 4, "unsubscribe": {}},
        {"id": 5, "publish": {}},
        {"id": 6, "ping": {}},
    ], "an empty result is still there: the SDK matches the reply by its presence"
