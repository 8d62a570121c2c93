"""Centrifugo's client protocol, Protobuf form (``centrifuge-protobuf``) — sans-I/O.

The mobile SDKs (centrifuge-swift, centrifuge-java, centrifuge-dart) speak
only this form; centrifuge-js's ``protobuf`` build and centrifuge-python's
``use_protobuf=True`` speak it too. A WebSocket message is a binary frame
holding one or more messages, each prefixed with its length as a varint
(``Command`` from the client, ``Reply`` from the server; a push is a
``Reply`` with id 0 and its ``push`` set), as Centrifugo's
``ProtobufCommandDecoder`` reads them. The messages are those of
``client.proto`` (vendored beside this module; ``client_pb2`` is generated
from it by ``grpc_tools.protoc``, see the header of ``client.proto``).

Decoding yields the **same** :class:`~tidings.centrifuge.schema.Command`
objects as the JSON decoder, so the session runs one code path for both
forms. Encoding takes the same :class:`~tidings.centrifuge.schema.Reply`
objects the JSON encoder takes. The library does the work (the official
``protobuf`` runtime, upb in C): this module only maps fields and frames.

Publication ``data`` is the one payload both forms share: the hub stores a
publication once and every subscriber gets its bytes, whatever its format,
so ``data`` from a Protobuf client must be JSON too (Centrifugo leaves that
to the application; here a JSON subscriber of the same channel would
otherwise receive a push that is not JSON). Protobuf subscribers receive it
as the JSON bytes it was published as.

Hostile input — a truncated or over-long varint, a length past the end of
the frame, a message Protobuf cannot parse, an offset past 2**63 - 1,
``data`` that is not JSON — closes with 3501 (bad request), as Centrifugo
does; invalid UTF-8 in a string field or in ``data`` closes with 1007, as
it does in the JSON form. Unknown fields are skipped, as Protobuf does. A
frame is never held beyond itself: lengths are checked against what is left
of the frame before anything is sliced, and each message's parse is bounded
by the frame (``websocket.max_message_size``) and upb's recursion limit.
"""

from __future__ import annotations

from typing import Protocol

import msgspec
from google.protobuf.message import DecodeError

from ..errors import DisconnectCode, ProtocolError
from ..stream import PresenceEvent, Publication
from ..utf8 import check_utf8
from . import client_pb2 as pb
from .schema import (
    BAD_REQUEST,
    BadRequest,
    ChannelRequest,
    Command,
    ConnectRequest,
    ConnectResult,
    Disconnect,
    HistoryRequest,
    PublishRequest,
    RefreshRequest,
    Reply,
    RPCRequest,
    SendRequest,
    ServerSubscription,
    StreamPosition,
    SubRefreshRequest,
    SubscribeRequest,
    SubscribeResult,
)
from .wire import Wire

__all__ = [
    "PING",
    "PROTOBUF",
    "SUBPROTOCOL",
    "decode_commands",
    "encode_reply",
    "error_reply",
    "publication_protobuf",
    "push_protobuf",
]

SUBPROTOCOL = "centrifuge-protobuf"

#: The server ping: an empty ``Reply`` (length 0). A client answers with an empty ``Command``.
PING = b"\x00"

#: The largest offset the JSON form accepts (``schema.UInt``); Protobuf's uint64 goes further.
_MAX_OFFSET = 2**63 - 1
#: A varint longer than this is no uint64 (Protobuf's own limit).
_MAX_VARINT_BYTES = 10

_NO_DATA = msgspec.Raw()
_PING_REQUEST = msgspec.Raw(b"{}")
_json_value = msgspec.json.Decoder(msgspec.Raw)


# --------------------------------------------------------------------------- framing


def _varint(value: int) -> bytes:
    """``value`` as a Protobuf varint (the length prefix of a message in a frame)."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(frame: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; at most 10 bytes are read."""
    value = shift = 0
    start = pos
    end = min(len(frame), pos + _MAX_VARINT_BYTES)
    while pos < end:
        byte = frame[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    if pos - start == _MAX_VARINT_BYTES:
        raise _bad("length prefix longer than 10 bytes")
    raise _bad("length prefix cut off by the end of the frame")


def _delimited(payload: bytes) -> bytes:
    return _varint(len(payload)) + payload


# --------------------------------------------------------------------------- commands


def decode_commands(payload: bytes) -> list[Command]:
    """Split a frame into its length-delimited ``Command`` messages and decode each.

    Raises :class:`~tidings.centrifuge.schema.BadRequest`, whose
    ``disconnect`` is the close code, for anything but a sequence of valid
    commands filling the frame exactly.
    """
    if not payload:
        raise _bad("empty frame")
    commands: list[Command] = []
    pos = 0
    size = len(payload)
    while pos < size:
        length, start = _read_varint(payload, pos)
        pos = start + length
        if pos > size:
            raise _bad(f"command of {length} bytes past the end of the frame")
        try:
            message = pb.Command.FromString(payload[start:pos])
        except DecodeError as exc:
            raise _refusal(exc) from None
        commands.append(_command(message))
    return commands


def _refusal(exc: DecodeError) -> BadRequest:
    """The one place where what Protobuf refused becomes a close code.

    upb names only the kind of failure: invalid UTF-8 in a ``string`` field
    closes with 1007, as the JSON form does for invalid UTF-8 anywhere;
    anything else (a truncated or malformed message, nesting past upb's
    limit) with 3501.
    """
    if "UTF-8" in str(exc):
        detail = "invalid UTF-8 in a string field"
        return BadRequest(Disconnect(DisconnectCode.INVALID_DATA, detail), detail)
    return _bad("malformed Protobuf command")


def _bad(detail: str) -> BadRequest:
    return BadRequest(BAD_REQUEST, detail)


def _data(value: bytes, field: str) -> msgspec.Raw:
    """A ``bytes`` payload as the JSON value the hub stores and every wire pushes."""
    if not value:
        return _NO_DATA
    try:
        check_utf8(value)
    except UnicodeDecodeError:
        detail = f"invalid UTF-8 in {field}"
        raise BadRequest(Disconnect(DisconnectCode.INVALID_DATA, detail), detail) from None
    try:
        return _json_value.decode(value)
    except (ValueError, RecursionError):
        raise _bad(f"{field} is not JSON") from None


def _offset(value: int, field: str) -> int:
    if value > _MAX_OFFSET:
        raise _bad(f"{field} past 2**63 - 1")
    return value


def _subscribe(req: pb.SubscribeRequest, field: str) -> SubscribeRequest:
    return SubscribeRequest(
        channel=req.channel,
        token=req.token,
        recover=req.recover,
        epoch=req.epoch,
        offset=_offset(req.offset, f"{field}.offset"),
        data=_data(req.data, f"{field}.data"),
        positioned=req.positioned,
        recoverable=req.recoverable,
        join_leave=req.join_leave,
        flag=req.flag,
        delta=req.delta,
    )


def _connect(req: pb.ConnectRequest) -> ConnectRequest:
    subs = {channel: _subscribe(sub, "connect.subs") for channel, sub in req.subs.items()}
    return ConnectRequest(
        token=req.token,
        data=_data(req.data, "connect.data"),
        subs=subs or None,
        name=req.name,
        version=req.version,
    )


def _history(req: pb.HistoryRequest) -> HistoryRequest:
    since = None
    if req.HasField("since"):
        since = StreamPosition(
            offset=_offset(req.since.offset, "history.since.offset"), epoch=req.since.epoch
        )
    return HistoryRequest(channel=req.channel, limit=req.limit, since=since, reverse=req.reverse)


def _command(message: pb.Command) -> Command:
    """The JSON decoder's :class:`Command` for one Protobuf ``Command``: present
    requests only, so the session's routing sees exactly what the client sent."""
    cmd = Command(id=message.id)
    if message.HasField("connect"):
        cmd.connect = _connect(message.connect)
    if message.HasField("subscribe"):
        cmd.subscribe = _subscribe(message.subscribe, "subscribe")
    if message.HasField("unsubscribe"):
        cmd.unsubscribe = ChannelRequest(channel=message.unsubscribe.channel)
    if message.HasField("publish"):
        publish = message.publish
        cmd.publish = PublishRequest(
            channel=publish.channel, data=_data(publish.data, "publish.data")
        )
    if message.HasField("presence"):
        cmd.presence = ChannelRequest(channel=message.presence.channel)
    if message.HasField("presence_stats"):
        cmd.presence_stats = ChannelRequest(channel=message.presence_stats.channel)
    if message.HasField("history"):
        cmd.history = _history(message.history)
    if message.HasField("ping"):
        cmd.ping = _PING_REQUEST
    if message.HasField("send"):
        cmd.send = SendRequest(data=_data(message.send.data, "send.data"))
    if message.HasField("rpc"):
        rpc = message.rpc
        cmd.rpc = RPCRequest(method=rpc.method, data=_data(rpc.data, "rpc.data"))
    if message.HasField("refresh"):
        cmd.refresh = RefreshRequest(token=message.refresh.token)
    if message.HasField("sub_refresh"):
        sub_refresh = message.sub_refresh
        cmd.sub_refresh = SubRefreshRequest(channel=sub_refresh.channel, token=sub_refresh.token)
    return cmd


# --------------------------------------------------------------------------- replies


class _Info(Protocol):
    """What a presence entry or a publisher's info carries (``ClientInfo`` and its kin)."""

    @property
    def user(self) -> str: ...
    @property
    def client(self) -> str: ...
    @property
    def conn_info(self) -> msgspec.Raw | None: ...
    @property
    def chan_info(self) -> msgspec.Raw | None: ...


def _fill_client_info(message: pb.ClientInfo, info: _Info) -> None:
    message.user = info.user
    message.client = info.client
    if info.conn_info:
        message.conn_info = bytes(info.conn_info)
    if info.chan_info:
        message.chan_info = bytes(info.chan_info)


def _publications(target: object, raws: list[msgspec.Raw] | None) -> None:
    """Fill a repeated ``Publication`` field from the cached encodings of :func:`publications`."""
    if raws:
        add = target.add  # type: ignore[attr-defined]
        for raw in raws:
            add().MergeFromString(bytes(raw))


def _subscribe_result(result: SubscribeResult) -> pb.SubscribeResult:
    message = pb.SubscribeResult(
        expires=result.expires,
        ttl=result.ttl,
        recoverable=result.recoverable,
        epoch=result.epoch,
        recovered=result.recovered,
        offset=result.offset,
        positioned=result.positioned,
        was_recovering=result.was_recovering,
        delta=result.delta,
    )
    _publications(message.publications, result.publications)
    return message


def _connect_result(result: ConnectResult) -> pb.ConnectResult:
    message = pb.ConnectResult(
        client=result.client,
        version=result.version,
        expires=result.expires,
        ttl=result.ttl,
        data=bytes(result.data) if result.data else b"",
        ping=result.ping,
        pong=result.pong,
        session=result.session,
        node=result.node,
    )
    if result.subs:
        for channel, sub in result.subs.items():
            message.subs[channel].CopyFrom(_subscribe_result(sub))
    return message


def _reply(reply: Reply) -> pb.Reply:
    """The Protobuf ``Reply`` of a :class:`Reply`, result by result."""
    message = pb.Reply(id=reply.id)
    if reply.error is not None:
        error = reply.error
        message.error.CopyFrom(
            pb.Error(code=error.code, message=error.message, temporary=error.temporary)
        )
    if reply.connect is not None:
        message.connect.CopyFrom(_connect_result(reply.connect))
    if reply.subscribe is not None:
        message.subscribe.CopyFrom(_subscribe_result(reply.subscribe))
    if reply.unsubscribe is not None:
        message.unsubscribe.SetInParent()
    if reply.publish is not None:
        message.publish.SetInParent()
    if reply.presence is not None:
        presence = message.presence
        presence.SetInParent()
        for client, info in reply.presence.presence.items():
            _fill_client_info(presence.presence[client], info)
    if reply.presence_stats is not None:
        stats = reply.presence_stats
        message.presence_stats.CopyFrom(
            pb.PresenceStatsResult(num_clients=stats.num_clients, num_users=stats.num_users)
        )
    if reply.history is not None:
        history = reply.history
        message.history.SetInParent()
        message.history.epoch = history.epoch
        message.history.offset = history.offset
        _publications(message.history.publications, history.publications)
    if reply.ping is not None:
        message.ping.SetInParent()
    if reply.refresh is not None:
        refresh = reply.refresh
        message.refresh.CopyFrom(
            pb.RefreshResult(
                client=refresh.client,
                version=refresh.version,
                expires=refresh.expires,
                ttl=refresh.ttl,
            )
        )
    if reply.sub_refresh is not None:
        sub_refresh = reply.sub_refresh
        message.sub_refresh.CopyFrom(
            pb.SubRefreshResult(expires=sub_refresh.expires, ttl=sub_refresh.ttl)
        )
    if reply.rpc is not None:
        # The handler's JSON as the bytes of ``RPCResult.data``, as publication data goes.
        message.rpc.SetInParent()
        if reply.rpc.data is not None:
            message.rpc.data = bytes(reply.rpc.data)
    return message


def encode_reply(reply: Reply) -> bytes:
    """One length-delimited ``Reply``: replies batched in a frame are simply joined."""
    return _delimited(_reply(reply).SerializeToString())


def error_reply(cmd_id: int, exc: ProtocolError) -> bytes:
    error = pb.Error(code=int(exc.code), message=exc.message, temporary=exc.temporary)
    return _delimited(pb.Reply(id=cmd_id, error=error).SerializeToString())


# --------------------------------------------------------------------------- pushes


def _fill_publication(message: pb.Publication, pub: Publication) -> None:
    """Set ``message``'s fields in place: building the nested messages where they
    live costs about half of passing new ones to the constructors, which copy
    them (``python bench/protobuf_push.py``)."""
    message.data = pub.data
    info = pub.info
    if info is not None:
        _fill_client_info(message.info, info)
    message.offset = pub.offset
    if pub.tags:
        message.tags.update(pub.tags)
    message.time = pub.time
    if pub.delta:
        message.delta = True


def publication_protobuf(pub: Publication) -> bytes:
    """Centrifugo's ``Publication`` message, not delimited; cache with ``pub.encoded``.

    What a subscribe (recovery) or history reply embeds: shared by every such
    reply, as :func:`~tidings.centrifuge.schema.publication_json` is for JSON.
    """
    message = pb.Publication()
    _fill_publication(message, pub)
    return message.SerializeToString()


def publications(pubs: list[Publication]) -> list[msgspec.Raw]:
    """``pubs`` as their cached Protobuf bytes, for :func:`encode_reply` to embed."""
    return [msgspec.Raw(pub.encoded(publication_protobuf)) for pub in pubs]


def push_protobuf(pub: Publication) -> bytes:
    """The whole push for ``pub``: a delimited ``Reply{push{channel, pub}}``.

    Cached per publication (``pub.encoded(push_protobuf)``) and shared by every
    Protobuf subscriber, like ``push_json``. The library builds it, since a
    hand-written encoder of the same bytes was slower: best of 7 on a busy
    2-core machine (Python 3.11, protobuf 7.36 on upb), 3.0-3.3 us per push
    against 7.1 us, and a whole delivery to one subscriber (the encoder's
    worst case: publish, encode, frame, send) 25-27 us against 28-38 us
    (``python bench/protobuf_push.py``, three runs).
    """
    reply = pb.Reply()
    push = reply.push
    push.channel = pub.channel
    _fill_publication(push.pub, pub)
    return _delimited(reply.SerializeToString())


def presence_push_protobuf(event: PresenceEvent) -> bytes:
    """A delimited ``Reply{push{channel, join|leave{info}}}``; cache with ``event.encoded``."""
    reply = pb.Reply()
    push = reply.push
    push.channel = event.channel
    presence = push.join if event.kind == "join" else push.leave
    _fill_client_info(presence.info, event.info)
    return _delimited(reply.SerializeToString())


def unsubscribe_push(channel: str, code: int, reason: str) -> bytes:
    """A delimited ``Reply{push{channel, unsubscribe{code, reason}}}``."""
    reply = pb.Reply()
    push = reply.push
    push.channel = channel
    push.unsubscribe.code = code
    push.unsubscribe.reason = reason
    return _delimited(reply.SerializeToString())


def subscribe_push(channel: str, subscription: ServerSubscription) -> bytes:
    """A delimited ``Reply{push{channel, subscribe{..}}}``: a server-side subscribe."""
    reply = pb.Reply()
    push = reply.push
    push.channel = channel
    sub = push.subscribe
    sub.recoverable = subscription.recoverable
    sub.epoch = subscription.epoch
    sub.offset = subscription.offset
    sub.positioned = subscription.positioned
    return _delimited(reply.SerializeToString())


def disconnect_push(code: int, reason: str) -> bytes:
    """A delimited ``Reply{push{disconnect{code, reason}}}``: how a stream
    without close codes (bidirectional emulation) ends a session."""
    reply = pb.Reply()
    reply.push.disconnect.code = code
    reply.push.disconnect.reason = reason
    return _delimited(reply.SerializeToString())


PROTOBUF = Wire(
    subprotocol=SUBPROTOCOL,
    binary=True,
    ping=PING,
    separator=b"",
    decode_commands=decode_commands,
    encode_reply=encode_reply,
    error_reply=error_reply,
    publications=publications,
    push=push_protobuf,
    presence_push=presence_push_protobuf,
    unsubscribe_push=unsubscribe_push,
    subscribe_push=subscribe_push,
)
