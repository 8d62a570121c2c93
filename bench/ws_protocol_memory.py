"""What websockets' sans-I/O ``ServerProtocol`` would cost per connection if kept.

    .venv/bin/python bench/ws_protocol_memory.py

Builds N protocol objects, each past an accepted handshake (as the WebSocket
transport would keep them), and reports the Python memory they hold per
connection, traced with ``tracemalloc``. The transport throws the object away
after the handshake and keeps a ``FrameReader`` instead; this is the figure
quoted in ``tidings.transports.websocket``'s docstring.
"""

from __future__ import annotations

import base64
import os
import tracemalloc

from websockets.datastructures import Headers
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.http11 import Request
from websockets.server import ServerProtocol

N = 2000


def handshake(deflate: bool) -> Request:
    headers = Headers()
    headers["Host"] = "localhost"
    headers["Upgrade"] = "websocket"
    headers["Connection"] = "Upgrade"
    headers["Sec-WebSocket-Key"] = base64.b64encode(os.urandom(16)).decode()
    headers["Sec-WebSocket-Version"] = "13"
    if deflate:
        headers["Sec-WebSocket-Extensions"] = "permessage-deflate; client_max_window_bits"
    return Request("/connection/websocket", headers)


def per_connection(deflate: bool) -> float:
    kept = []
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(N):
        extensions = (
            [
                ServerPerMessageDeflateFactory(
                    server_no_context_takeover=True, client_no_context_takeover=True
                )
            ]
            if deflate
            else None
        )
        protocol = ServerProtocol(extensions=extensions)
        protocol.send_response(protocol.accept(handshake(deflate)))
        protocol.data_to_send()
        kept.append(protocol)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / N


if __name__ == "__main__":
    for deflate in (False, True):
        label = "permessage-deflate" if deflate else "plain"
        print(f"{label:>18}: {per_connection(deflate) / 1024:.2f} KiB per ServerProtocol")
