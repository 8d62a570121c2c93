"""The envelope a publication travels in between nodes: one format for every broker.

Redis (its history stream and its pub/sub messages) and NATS carry the same
thing: a publication without its position, which the receiving side stamps
(Redis from its counters, NATS per node). One definition here, so that the
two brokers cannot drift apart and a node of one version reads what another
wrote.

The wire form is a MessagePack array ``[data, info, tags, time]``: ``data``
the publication's raw JSON as a binary string, ``info`` the publisher's
:class:`~tidings.hub.ClientInfo` as JSON bytes (it holds raw JSON, which
MessagePack cannot nest as such) or nil, ``tags`` a map of strings or nil,
``time`` milliseconds since the epoch; then, only when a publish option
asks for them, ``exclude`` (client ids that must not receive it, an array of
strings) and ``transient`` (true: delivered live only, stamped with the
channel's position rather than a new offset). A publication without options
is written as the four-field array it always was (msgspec 0.22 writes every
field of an ``array_like`` struct, ``omit_defaults`` or not, hence two
structs), and the reader takes four or six fields. Positional rather than a map: the
field names would double a small publication's size in Redis.

What arrives from a broker is input like any other: anyone who can write to
Redis or NATS can put bytes there. :func:`decode` checks everything the hub
will forward as JSON (the publication's data and the publisher's info must
be UTF-8 JSON), and raises :class:`MalformedEnvelope`, which the brokers log
at WARNING and skip. Validating ``data`` costs one JSON scan per publication
per node, not per subscriber: 0.8 us for 1 KiB of data (``timeit``, best of
3 x 100,000, ``msgspec.json.Decoder(msgspec.Raw).decode``), against 0.2 us
for decoding the envelope itself.
"""

from __future__ import annotations

import msgspec

from ..stream import ClientInfo, Publication, directed
from ..utf8 import check_utf8

__all__ = ["Body", "MalformedEnvelope", "decode", "decode_info", "encode", "read"]


class MalformedEnvelope(ValueError):
    """Bytes from a broker that are not a publication this server can forward."""


class _Envelope(msgspec.Struct, array_like=True):
    """A publication without its position. ``info`` is JSON (ClientInfo holds raw JSON)."""

    data: bytes
    info: bytes | None
    tags: dict[str, str] | None
    time: int


class _WithOptions(_Envelope, array_like=True):
    """The same with its publish options: written only when it has some, read always."""

    exclude: list[str] = []
    transient: bool = False


_ABSENT = msgspec.Raw()


class _InfoWire(msgspec.Struct):
    """:class:`ClientInfo` as it is decoded. msgspec (0.22) refuses any JSON value
    but ``null`` for a ``msgspec.Raw | None`` field ("Expected `null`, got
    `object`"), so ``ClientInfo`` itself cannot be decoded once it holds
    connection or channel info: receiving nodes dropped every such publication."""

    user: str = ""
    client: str = ""
    conn_info: msgspec.Raw = _ABSENT
    chan_info: msgspec.Raw = _ABSENT


_NULL = msgspec.Raw(b"null")


def _raw_or_none(raw: msgspec.Raw) -> msgspec.Raw | None:
    """``None`` for absent or ``null``; else a copy that does not pin the whole message."""
    if not len(raw) or raw == _NULL:
        return None
    return raw.copy()


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_WithOptions).decode
_decode_info_wire = msgspec.json.Decoder(_InfoWire).decode
_check_json = msgspec.json.Decoder(msgspec.Raw).decode


def encode(
    data: bytes,
    info: ClientInfo | None,
    tags: dict[str, str] | None,
    time: int,
    *,
    exclude: frozenset[str] = frozenset(),
    transient: bool = False,
) -> bytes:
    """The envelope of a publication of ``data`` made at ``time`` (ms since the epoch)."""
    info_json = msgspec.json.encode(info) if info is not None else None
    if exclude or transient:
        return _encode(_WithOptions(data, info_json, tags, time, sorted(exclude), transient))
    return _encode(_Envelope(data, info_json, tags, time))


class Body:
    """A checked envelope, not yet stamped: what a broker needs to know to stamp it."""

    __slots__ = ("_envelope", "info")

    def __init__(self, envelope: _WithOptions, info: ClientInfo | None) -> None:
        self._envelope = envelope
        self.info = info

    @property
    def transient(self) -> bool:
        """Live only: stamped with the channel's position, not a new offset."""
        return self._envelope.transient

    def stamped(self, channel: str, offset: int, epoch: str) -> Publication:
        """The publication, at ``(epoch, offset)`` in ``channel``."""
        body = self._envelope
        return directed(
            channel,
            offset,
            epoch,
            body.data,
            self.info,
            body.tags,
            body.time,
            exclude=frozenset(body.exclude),
            transient=body.transient,
        )


def read(envelope: bytes) -> Body:
    """The checked content of ``envelope``.

    Raises :class:`MalformedEnvelope` for anything that is not an envelope
    holding UTF-8 JSON ``data`` and a valid ``info``.
    """
    try:
        body = _decode(envelope)
        _check_json(body.data)
        check_utf8(body.data)
        info = None if body.info is None else decode_info(body.info)
    except (msgspec.DecodeError, UnicodeDecodeError, MalformedEnvelope) as exc:
        raise MalformedEnvelope(f"malformed publication envelope: {exc}") from None
    return Body(body, info)


def decode(channel: str, offset: int, epoch: str, envelope: bytes) -> Publication:
    """The publication in ``envelope``, stamped with ``(epoch, offset)`` in ``channel``
    (for a transient one, the position it was published at).

    Raises :class:`MalformedEnvelope` as :func:`read` does.
    """
    return read(envelope).stamped(channel, offset, epoch)


def decode_info(info_json: bytes) -> ClientInfo:
    """A :class:`ClientInfo` from its JSON (as :func:`encode` and Redis presence hold it).

    Raises :class:`MalformedEnvelope` unless it is UTF-8 JSON of that shape.
    """
    try:
        check_utf8(info_json)
        wire = _decode_info_wire(info_json)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MalformedEnvelope(f"malformed client info: {exc}") from None
    return ClientInfo(
        wire.user, wire.client, _raw_or_none(wire.conn_info), _raw_or_none(wire.chan_info)
    )
