"""One place for the JSON shapes of a publication on every wire.

Two shapes exist. The HTTP transports (SSE, long-poll, poll) carry the channel
and epoch in each publication, because one stream follows several channels.
The Centrifugo shape (WebSocket pushes, history replies, the server API) leaves
them to the envelope. ``data`` is embedded as the raw JSON it was published
as, never decoded and re-encoded.
"""

from __future__ import annotations

import msgspec

from .stream import ClientInfo, Publication

__all__ = ["CentrifugoPublication", "HTTPPublication", "encode", "http_publication_json"]

encode = msgspec.json.Encoder().encode


class HTTPPublication(msgspec.Struct, omit_defaults=True):
    channel: str
    offset: int
    epoch: str
    data: msgspec.Raw
    info: ClientInfo | None = None
    tags: dict[str, str] | None = None
    time: int = 0

    @classmethod
    def of(cls, pub: Publication) -> HTTPPublication:
        return cls(
            pub.channel, pub.offset, pub.epoch, msgspec.Raw(pub.data), pub.info, pub.tags, pub.time
        )


class CentrifugoPublication(msgspec.Struct, omit_defaults=True):
    """``Publication`` of Centrifugo's client.proto, in its JSON form."""

    data: msgspec.Raw
    offset: int = 0
    info: ClientInfo | None = None
    tags: dict[str, str] | None = None
    time: int = 0

    @classmethod
    def of(cls, pub: Publication) -> CentrifugoPublication:
        return cls(msgspec.Raw(pub.data), pub.offset, pub.info, pub.tags, pub.time)


def http_publication_json(pub: Publication) -> bytes:
    """The HTTP transports' publication object; cache with ``pub.encoded``."""
    return encode(HTTPPublication.of(pub))
