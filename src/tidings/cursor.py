"""Resume cursors: every channel's position of a stream, in one opaque token.

The same cursor serves SSE (``id:`` / ``Last-Event-ID``) and ``/poll``
(``cursor=``), so a client may drop off one transport and resume on another.
It is URL-safe base64 of a JSON array of ``[channel, epoch, offset]``, so it
fits in a query string, a header and an SSE ``id:`` line (which may hold no
newline). Clients must treat it as opaque.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Annotated

import msgspec

from .errors import ErrorCode, ProtocolError
from .stream import Position

__all__ = ["decode_cursor", "encode_cursor"]

#: An offset is a uint64 (bounded at 2**63 - 1, the most msgspec checks).
_Offset = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
_Entries = list[tuple[str, str, _Offset]]
_decode_entries = msgspec.json.Decoder(_Entries).decode
_encode = msgspec.json.Encoder().encode
_MAX_LENGTH = 64 * 1024


def encode_cursor(positions: Mapping[str, Position]) -> str:
    entries = [(channel, pos.epoch, pos.offset) for channel, pos in positions.items()]
    return base64.urlsafe_b64encode(_encode(entries)).rstrip(b"=").decode("ascii")


def decode_cursor(token: str) -> dict[str, Position]:
    """Parse a cursor; a malformed one is a 400 with a clear message.

    The one place where what the decoders raise becomes that 400: base64
    errors (``binascii.Error``), a non-ASCII token, invalid UTF-8 or a lone
    surrogate escape in the JSON, a wrong shape or an offset out of range —
    all ``ValueError``. Deep nesting cannot reach msgspec's depth limit here:
    the typed decoder refuses the third ``[`` (a string is expected there).
    A cursor comes from the client, so it may hold anything.
    """
    if len(token) > _MAX_LENGTH:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "cursor too long")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        entries = _decode_entries(raw)
    except ValueError:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "malformed cursor") from None
    return {channel: Position(epoch, offset) for channel, epoch, offset in entries}
