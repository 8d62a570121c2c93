"""tidings' ASGI app (``tidings.asgi.ASGIApp``) under uvicorn: the slower path, measured.

The same server as ``tidings serve`` (config, hub, transports, sessions), but
the sockets, HTTP parsing and WebSocket framing are uvicorn's: httptools for
HTTP, websockets' sans-I/O protocol for WebSocket, uvloop, as tidings' own
listener uses. No access log, as tidings logs nothing per request.

Usage: ``python tidings_asgi.py PORT [CONFIG.toml]``
"""

from __future__ import annotations

import sys

import uvicorn

from tidings.asgi import ASGIApp
from tidings.config import load_config
from tidings.server import Server


def main() -> None:
    port = int(sys.argv[1])
    config = load_config(sys.argv[2] if len(sys.argv) > 2 else None)
    uvicorn.run(
        ASGIApp(Server(config)),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        ws="websockets-sansio",
        ws_max_size=config.websocket.max_message_size,
        # The Centrifugo pings are the app's (websocket.ping_interval); no second set.
        ws_ping_interval=None,
        backlog=4096,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
