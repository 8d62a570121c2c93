"""Centrifugo client protocol v2, JSON form — sans-I/O.

Everything the WebSocket transport needs to speak to the Centrifugo SDKs
(centrifuge-js, centrifuge-python, the mobile SDKs) that is not I/O lives here,
in two modules:

* :mod:`.schema`, the wire: command Structs, :func:`decode_commands`, reply and
  push encoders. It knows nothing of the hub's behaviour, access or sessions.
* :mod:`.session`, :class:`ClientSession`, the per-connection protocol state
  machine, which runs decoded commands against the hub and writes through a
  :class:`SessionTransport`.

The names below are the package's public surface (``from tidings.centrifuge
import ...``), used by the WebSocket transport, the tests and the fuzzer.
"""

from __future__ import annotations

from .schema import (
    PING,
    BadRequest,
    Command,
    Disconnect,
    decode_commands,
    encode_reply,
    publication_json,
    push_json,
)
from .session import ClientSession, SessionOptions, SessionTransport

__all__ = [
    "PING",
    "BadRequest",
    "ClientSession",
    "Command",
    "Disconnect",
    "SessionOptions",
    "SessionTransport",
    "decode_commands",
    "encode_reply",
    "publication_json",
    "push_json",
]
