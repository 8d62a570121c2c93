"""Resume cursors: every channel's position of a stream, in one opaque token.

The same cursor serves SSE (``id:`` / ``Last-Event-ID``) and ``/poll``
(``cursor=``), so a client may drop off one transport and resume on another.
It is URL-safe base64 of a JSON array of ``[channel, epoch, offset]``, so it
fits in a query string, a header and an SSE ``id:`` line (which may hold no
newline). Clients must treat it as opaque.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

import msgspec

from .errors import ErrorCode, ProtocolError
from .hub import Position

__all__ = ["decode_cursor", "encode_cursor"]

_Entries = list[tuple[str, str, int]]
_decode_entries = msgspec.json.Decoder(_Entries).decode
_encode = msgspec.json.Encoder().encode
_MAX_LENGTH = 64 * 1024


def encode_cursor(positions: Mapping[str, Position]) -> str:
    entries = [(channel, pos.epoch, pos.offset) for channel, pos in positions.items()]
    return base64.urlsafe_b64encode(_encode(entries)).rstrip(b"=").decode("ascii")


def decode_cursor(token: str) -> dict[str, Position]:
    """Parse a cursor; a malformed one is a 400 with a clear message."""
    if len(token) > _MAX_LENGTH:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "cursor too long")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        entries = _decode_entries(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "malformed cursor") from None
    return {channel: Position(epoch, offset) for channel, epoch, offset in entries}
