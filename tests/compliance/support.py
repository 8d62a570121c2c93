"""What the compliance modules share: the server configuration, the "still served" check."""

from __future__ import annotations

import uuid
from typing import Any

from compliance.wsclient import WSClient
from helpers import rss_kib

#: ``websocket.max_message_size`` of the compliance server.
MAX_MESSAGE_SIZE = 16384

CONFIG = f"""
[websocket]
max_message_size = {MAX_MESSAGE_SIZE}
compression = true
compression_threshold = 256

[channels]
presence = true
presence_read = "any"
"""


def open_client(srv: Any, extensions: str | None = None) -> WSClient:
    return WSClient(srv.host, srv.port, extensions=extensions)


def presence_stats(channel: str = "compliance", command_id: int = 2) -> dict[str, Any]:
    """A command every connected client may send and get a result for (presence is on)."""
    return {"id": command_id, "presence_stats": {"channel": channel}}


def assert_accepted(client: WSClient, command_id: int = 2) -> None:
    """The command ``command_id`` (a :func:`presence_stats`) was understood and answered."""
    reply = client.reply(command_id)
    assert "presence_stats" in reply, reply


def assert_still_served(srv: Any) -> None:
    """A new client connects and gets a command answered: one bad client hurt no one else."""
    assert srv.alive(), "the server process died"
    with open_client(srv) as client:
        client.connect()
        client.send_commands(presence_stats())
        assert_accepted(client)


def rss_bytes(srv: Any) -> int:
    """The server process's resident set in bytes."""
    return rss_kib(srv) * 1024


def subscribed_client(srv: Any, extensions: str | None = None) -> tuple[WSClient, str]:
    """A connected client subscribed to a fresh channel, which it may publish to."""
    client = open_client(srv, extensions)
    channel = f"c-{uuid.uuid4().hex[:10]}"
    client.connect()
    client.send_commands({"id": 2, "subscribe": {"channel": channel}})
    reply = client.reply(2)
    assert "subscribe" in reply, reply
    return client, channel
