"""The wire schema of Centrifugo's client protocol v2, JSON form — sans-I/O.

* the command schema (msgspec Structs mirroring ``client.proto`` of
  ``centrifugal/protocol``; unknown fields are ignored, as protobuf's JSON
  mapping does, so newer SDKs sending ``flag``/``delta``/``tf`` still work),
  and :func:`decode_commands`, where every decoder error becomes a close code;
* reply and push encoding, with publications embedded as the raw JSON they
  were published as (never decoded and re-encoded).

This module knows the wire and the values it encodes (the hub's
``Publication``, ``ClientInfo`` and ``PresenceEvent``), nothing of the hub's
behaviour, access rules or the session: a second implementation of the
protocol's state (or a fuzzer) can use it alone.
"""

from __future__ import annotations

from typing import Annotated, NamedTuple

import msgspec

from ..codec import CentrifugoPublication
from ..errors import DisconnectCode, ProtocolError
from ..stream import ClientInfo, PresenceEvent, Publication
from ..utf8 import check_utf8, invalid_utf8_field

#: The server ping: an empty message. A client answers with an empty command.
PING = b"{}"

#: ``SubscribeRequest.flag`` bit: reject with error 112 instead of answering
#: ``recovered: false`` (centrifuge-js/-python set it when the app has getState).
FLAG_REJECT_UNRECOVERED = 2


class Disconnect(NamedTuple):
    """Close the connection with this WebSocket close code and reason."""

    code: int
    reason: str


BAD_REQUEST = Disconnect(DisconnectCode.BAD_REQUEST, "bad request")


# --------------------------------------------------------------------------- commands


class _Req(msgspec.Struct, kw_only=True):
    pass


#: An absent ``data``/``ping`` (msgspec cannot decode into ``Raw | None``).
_NO_DATA = msgspec.Raw()
#: The integer types of Centrifugo's client.proto: a command id is a uint32,
#: an offset a uint64 (bounded at 2**63 - 1, the most msgspec checks). JSON
#: integers are unbounded; without the bound a 50-digit id or offset would
#: travel on to the hub, a broker and the SDKs.
UInt = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
UInt32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]


class StreamPosition(_Req):
    offset: UInt = 0
    epoch: str = ""


class SubscribeRequest(_Req):
    channel: str = ""
    token: str = ""
    recover: bool = False
    epoch: str = ""
    offset: UInt = 0
    data: msgspec.Raw = _NO_DATA
    positioned: bool = False
    recoverable: bool = False
    join_leave: bool = False
    flag: int = 0
    #: ``"fossil"`` asks for Fossil deltas (granted where the namespace allows it).
    delta: str = ""


class ConnectRequest(_Req):
    token: str = ""
    data: msgspec.Raw = _NO_DATA
    subs: dict[str, SubscribeRequest] | None = None
    name: str = ""
    version: str = ""


class ChannelRequest(_Req):
    """unsubscribe, presence, presence_stats: only a channel."""

    channel: str = ""


class PublishRequest(_Req):
    channel: str = ""
    data: msgspec.Raw = _NO_DATA


class HistoryRequest(_Req):
    channel: str = ""
    limit: int = 0
    since: StreamPosition | None = None
    reverse: bool = False


class RPCRequest(_Req):
    method: str = ""
    data: msgspec.Raw = _NO_DATA


class RefreshRequest(_Req):
    token: str = ""


class SubRefreshRequest(_Req):
    channel: str = ""
    token: str = ""


class SendRequest(_Req):
    data: msgspec.Raw = _NO_DATA


class Command(_Req):
    """One client command: an ``id`` and (at most) one request, proto order first."""

    id: UInt32 = 0
    connect: ConnectRequest | None = None
    subscribe: SubscribeRequest | None = None
    unsubscribe: ChannelRequest | None = None
    publish: PublishRequest | None = None
    presence: ChannelRequest | None = None
    presence_stats: ChannelRequest | None = None
    history: HistoryRequest | None = None
    ping: msgspec.Raw = _NO_DATA
    send: SendRequest | None = None
    rpc: RPCRequest | None = None
    refresh: RefreshRequest | None = None
    sub_refresh: SubRefreshRequest | None = None


_command_decoder = msgspec.json.Decoder(Command)


class BadRequest(Exception):
    """The payload is no sequence of valid commands; :attr:`disconnect` closes the connection."""

    def __init__(self, disconnect: Disconnect, detail: str) -> None:
        super().__init__(detail)
        self.disconnect = disconnect


def decode_commands(payload: bytes) -> list[Command]:
    """Split a frame into commands (one JSON object per ``\\n``-separated line).

    The payload is checked as UTF-8 whole, before msgspec sees it: msgspec
    skips fields it keeps raw (``data``) or ignores, and those bytes would
    otherwise be stored and pushed as they came. The frame codec validates
    text frames too, but commands may arrive in binary frames, and this
    function must hold on its own.
    """
    try:
        if not payload.strip():
            raise BadRequest(BAD_REQUEST, "empty frame")
        check_utf8(payload)
        if b"\n" not in payload:
            return [_command_decoder.decode(payload)]
        return [_command_decoder.decode(line) for line in payload.split(b"\n") if line.strip()]
    except (ValueError, RecursionError) as exc:
        raise _refusal(exc, payload) from None


def _refusal(exc: ValueError | RecursionError, payload: bytes) -> BadRequest:
    """The one place where what the decoder raised becomes a close code.

    Invalid UTF-8 anywhere in the payload closes with 1007, as RFC 6455 §8.1
    requires for text and RFC 8259 §8.1 makes of JSON in any frame. Anything
    else the decoder refuses — malformed JSON, a lone surrogate escape, a
    wrong type or an out-of-range integer (``msgspec.DecodeError`` and
    ``ValidationError``, both ``ValueError``), nesting past msgspec's depth
    limit (``RecursionError``) — closes with 3501, as Centrifugo does.
    """
    if isinstance(exc, UnicodeDecodeError):
        # ``publish.data``: a command's method, then the field of its request.
        fields = (invalid_utf8_field(line, depth=2) for line in payload.split(b"\n"))
        field = next((name for name in fields if name), "")
        detail = f"invalid UTF-8 in {field}" if field else "invalid UTF-8"
        return BadRequest(Disconnect(DisconnectCode.INVALID_DATA, detail), detail)
    if isinstance(exc, RecursionError):
        return BadRequest(BAD_REQUEST, "JSON nested too deeply")
    return BadRequest(BAD_REQUEST, str(exc))


# --------------------------------------------------------------------------- replies


class _Res(msgspec.Struct, omit_defaults=True, kw_only=True):
    pass


class Error(_Res):
    code: int
    message: str
    temporary: bool = False


class SubscribeResult(_Res):
    expires: bool = False
    ttl: int = 0
    recoverable: bool = False
    epoch: str = ""
    publications: list[msgspec.Raw] | None = None
    recovered: bool = False
    offset: int = 0
    positioned: bool = False
    was_recovering: bool = False
    #: Delta compression negotiated: publications of this subscription come in
    #: their delta form (``Publication.for_delta_subscriber``).
    delta: bool = False


class ConnectResult(_Res):
    client: str
    version: str = ""
    expires: bool = False
    ttl: int = 0
    data: msgspec.Raw | None = None
    subs: dict[str, SubscribeResult] | None = None
    ping: int = 0
    pong: bool = False
    #: Bidirectional emulation only: the secret id later commands are posted
    #: with (``POST /emulation``), and the node holding the session.
    session: str = ""
    node: str = ""


class Empty(_Res):
    pass


class _Always(msgspec.Struct, kw_only=True):
    """A result whose fields Centrifugo always sends, zero or empty included.

    ``client.proto``'s Go JSON tags carry no ``omitempty`` on these fields, so
    the SDKs read them without a default: centrifuge-js reports
    ``numClients: undefined`` for an absent ``num_clients``.
    """


class HistoryResult(_Always):
    publications: list[msgspec.Raw] = msgspec.field(default_factory=list)
    epoch: str = ""
    offset: int = 0


class RefreshResult(_Res):
    client: str = ""
    version: str = ""
    expires: bool = False
    ttl: int = 0


class SubRefreshResult(_Res):
    expires: bool = False
    ttl: int = 0


class PresenceInfo(_Res):
    """``ClientInfo`` as a presence entry or a join/leave carries it: ``user`` and
    ``client`` always (an anonymous user is ``""``, not absent), the infos when set."""

    user: str
    client: str
    conn_info: msgspec.Raw | None = None
    chan_info: msgspec.Raw | None = None

    @classmethod
    def of(cls, info: ClientInfo) -> PresenceInfo:
        return cls(info.user, info.client, info.conn_info, info.chan_info)


def presence_entries(presence: dict[str, ClientInfo]) -> dict[str, PresenceInfo]:
    """The ``presence`` map of a presence result (client protocol and server API)."""
    return {client: PresenceInfo.of(info) for client, info in presence.items()}


class PresenceResult(_Always):
    presence: dict[str, PresenceInfo] = msgspec.field(default_factory=dict)


class RPCResult(_Res):
    """An RPC's answer: the handler's JSON value, embedded raw (absent for None)."""

    data: msgspec.Raw | None = None


class PresenceStatsResult(_Always):
    num_clients: int = 0
    num_users: int = 0


class Reply(_Res):
    id: int = 0
    error: Error | None = None
    connect: ConnectResult | None = None
    subscribe: SubscribeResult | None = None
    unsubscribe: Empty | None = None
    publish: Empty | None = None
    presence: PresenceResult | None = None
    presence_stats: PresenceStatsResult | None = None
    history: HistoryResult | None = None
    ping: Empty | None = None
    refresh: RefreshResult | None = None
    sub_refresh: SubRefreshResult | None = None
    rpc: RPCResult | None = None


_encode = msgspec.json.Encoder().encode


def encode_reply(reply: Reply) -> bytes:
    return _encode(reply)


def error_reply(cmd_id: int, exc: ProtocolError) -> bytes:
    return _encode(Reply(id=cmd_id, error=Error(int(exc.code), exc.message, exc.temporary)))


# --------------------------------------------------------------------------- publications


class _DeltaFormPublication(_Res):
    """``Publication`` as a JSON delta subscriber gets it: ``data`` is a JSON
    string holding the data's bytes (or the delta's), which centrifuge-js
    turns back into bytes to apply the next delta to (``delta`` says which)."""

    data: str
    offset: int = 0
    info: ClientInfo | None = None
    tags: dict[str, str] | None = None
    time: int = 0
    delta: bool = False


def publication_json(pub: Publication) -> bytes:
    """Centrifugo's ``Publication`` object; cache it with ``pub.encoded(publication_json)``."""
    if pub.delta_form:
        # UTF-8 by construction: JSON data, or a delta checked to be UTF-8.
        data = pub.data.decode()
        return _encode(
            _DeltaFormPublication(data, pub.offset, pub.info, pub.tags, pub.time, pub.delta)
        )
    return _encode(CentrifugoPublication.of(pub))


def push_json(pub: Publication) -> bytes:
    """The whole push message for ``pub``: ``{"push":{"channel":..,"pub":{..}}}``.

    Cached per publication (``pub.encoded(push_json)``) and shared by every
    WebSocket subscriber: the transport frames these bytes once.
    """
    return b"".join(
        (
            b'{"push":{"channel":',
            _encode(pub.channel),
            b',"pub":',
            pub.encoded(publication_json),
            b"}}",
        )
    )


class _Info(_Res):
    info: PresenceInfo


def presence_push_json(event: PresenceEvent) -> bytes:
    """``{"push":{"channel":..,"join"|"leave":{"info":{..}}}}``; cache with ``event.encoded``."""
    return b"".join(
        (
            b'{"push":{"channel":',
            _encode(event.channel),
            b',"' + event.kind.encode() + b'":',
            _encode(_Info(PresenceInfo.of(event.info))),
            b"}}",
        )
    )


class _Unsubscribe(_Res):
    code: int
    reason: str


class _UnsubscribePush(_Res):
    channel: str
    unsubscribe: _Unsubscribe


class _PushEnvelope(_Res):
    push: _UnsubscribePush


def unsubscribe_push(channel: str, code: int, reason: str) -> bytes:
    """``{"push":{"channel":..,"unsubscribe":{"code":..,"reason":..}}}``."""
    return _encode(_PushEnvelope(_UnsubscribePush(channel, _Unsubscribe(code, reason))))


class ServerSubscription(_Res):
    """Centrifugo's ``Subscribe`` push body: a subscription the server made
    (the SDKs turn it into a server-side subscription at this position)."""

    recoverable: bool = False
    epoch: str = ""
    offset: int = 0
    positioned: bool = False


class _SubscribePush(_Res):
    channel: str
    subscribe: ServerSubscription


class _SubscribeEnvelope(_Res):
    push: _SubscribePush


def subscribe_push(channel: str, subscription: ServerSubscription) -> bytes:
    """``{"push":{"channel":..,"subscribe":{..}}}``: a server-side subscribe."""
    return _encode(_SubscribeEnvelope(_SubscribePush(channel, subscription)))


class _DisconnectPush(_Res):
    disconnect: _Unsubscribe  # the same two fields: code, reason


class _DisconnectEnvelope(_Res):
    push: _DisconnectPush


def disconnect_push(code: int, reason: str) -> bytes:
    """``{"push":{"disconnect":{"code":..,"reason":..}}}``: how a stream without
    close codes (bidirectional emulation) ends a session."""
    return _encode(_DisconnectEnvelope(_DisconnectPush(_Unsubscribe(code, reason))))


def raw_publications(pubs: list[Publication]) -> list[msgspec.Raw]:
    """``pubs`` as the cached bytes a reply embeds, so a history or recovery is not re-encoded."""
    return [msgspec.Raw(pub.encoded(publication_json)) for pub in pubs]
