"""The two wire formats of Centrifugo's client protocol, as values — sans-I/O.

A WebSocket client picks its format with the subprotocol it offers:
``centrifuge-json`` (text frames, ``\\n``-separated JSON objects) or
``centrifuge-protobuf`` (binary frames, varint-length-delimited Protobuf
messages). Everything else — the commands' meaning, the replies' content,
the order of pushes — is the same protocol, so the session runs on one set
of command objects (:class:`~tidings.centrifuge.schema.Command`) and builds
one set of reply objects (:class:`~tidings.centrifuge.schema.Reply`), and a
:class:`Wire` turns them into and out of bytes.

A connection holds its wire (composition: the session is given one, as a
connection is given its frame reader), and the transport frames what the
wire's encoders return. The encoders that take a ``Publication`` or a
``PresenceEvent`` are the keys of ``EncodedOnce.encoded``: plain functions,
so a publication is encoded once per format and every subscriber of that
format gets the same bytes (a bound method would be a new key object on
every call).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import msgspec

from ..errors import ProtocolError
from ..stream import PresenceEvent, Publication
from . import schema
from .schema import Command, Reply


class Wire(NamedTuple):
    """One wire format: the decoder of client messages and the encoders of the server's."""

    #: The ``Sec-WebSocket-Protocol`` value that selects it.
    subprotocol: str
    #: Frames are binary (Protobuf) or text (JSON).
    binary: bool
    #: The server's ping, an empty reply; the client's pong is the same bytes.
    ping: bytes
    #: What goes between encoded replies batched into one frame (each Protobuf
    #: reply carries its own length prefix, so nothing goes between those).
    separator: bytes
    #: A frame's payload into its commands; raises ``schema.BadRequest``.
    decode_commands: Callable[[bytes], list[Command]]
    encode_reply: Callable[[Reply], bytes]
    error_reply: Callable[[int, ProtocolError], bytes]
    #: Publications as a subscribe or history reply embeds them (each cached per format).
    publications: Callable[[list[Publication]], list[msgspec.Raw]]
    #: A publication's whole push message; the key of ``pub.encoded``.
    push: Callable[[Publication], bytes]
    #: A join or leave push; the key of ``event.encoded``.
    presence_push: Callable[[PresenceEvent], bytes]
    unsubscribe_push: Callable[[str, int, str], bytes]
    #: A server-side subscribe push (the server API's ``subscribe``).
    subscribe_push: Callable[[str, schema.ServerSubscription], bytes]


JSON = Wire(
    subprotocol="centrifuge-json",
    binary=False,
    ping=schema.PING,
    separator=b"\n",
    decode_commands=schema.decode_commands,
    encode_reply=schema.encode_reply,
    error_reply=schema.error_reply,
    publications=schema.raw_publications,
    push=schema.push_json,
    presence_push=schema.presence_push_json,
    unsubscribe_push=schema.unsubscribe_push,
    subscribe_push=schema.subscribe_push,
)
