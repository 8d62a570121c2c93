"""python-socketio peer: ``AsyncServer`` under uvicorn, the way its docs deploy it.

Subscribers are Socket.IO clients over the WebSocket transport
(``/socket.io/?EIO=4&transport=websocket``); every connected client is in the
default room, so ``emit()`` without ``to=`` is the broadcast. The trigger is an
ordinary ASGI route, ``POST /api/publish`` with tidings' body shape, mounted as
socketio's ``other_asgi_app``.

Usage: ``python socketio_peer.py PORT``
"""

from __future__ import annotations

import json
import sys
from typing import Any

import socketio
import uvicorn

sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins="*")


async def publish_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``POST /api/publish`` -> ``sio.emit('message', data)``; ``GET /health``."""
    if scope["type"] != "http":
        return
    if scope["method"] == "POST" and scope["path"] == "/api/publish":
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        await sio.emit("message", json.loads(body)["data"])
        status, out = 200, b'{"result":{}}'
    elif scope["path"] == "/health":
        status, out = 200, b'{"status":"ok"}'
    else:
        status, out = 404, b"{}"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": out})


app = socketio.ASGIApp(sio, other_asgi_app=publish_app)

if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_level="warning",
        loop="uvloop",
        http="httptools",
        backlog=4096,
    )
