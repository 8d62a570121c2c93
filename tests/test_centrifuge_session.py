"""Unit tests of the session's command dispatch (``ROUTES`` in tidings/centrifuge/session.py).

Sans-I/O: a real Hub over the in-memory broker and a fake transport recording
what the session writes (``centrifuge_support.py``). Each request field of a
command is dispatched by one table; these tests hold it to the protocol: every
field is routed to its own handler, the first request present wins in today's
order, and a command the state or the missing id forbids closes with 3501.
"""

from __future__ import annotations

from typing import Any

import pytest

from centrifuge_support import FakeSession, connected, make_hub, run
from tidings.auth import Access
from tidings.centrifuge import Command, SessionOptions
from tidings.centrifuge.session import CLIENT_IDS, ROUTES
from tidings.config import Config, LimitsConfig, NamespaceConfig
from tidings.errors import DisconnectCode, ErrorCode

pytestmark = pytest.mark.unit

#: Development access with presence on, so that presence commands reach their handler's reply.
PRESENCE_OPTIONS = SessionOptions(
    access=Access(
        Config(
            channels=NamespaceConfig(presence=True),
            limits=LimitsConfig(max_channels_per_connection=8),
        )
    )
)

#: One valid request per command field, and the key of the reply its handler writes
#: (None: no reply at all). Written out here, not derived from ROUTES, so a route
#: pointing at the wrong handler fails.
REQUESTS: dict[str, tuple[Any, str | None]] = {
    "connect": ({}, "connect"),
    "refresh": ({"token": ""}, "refresh"),
    "subscribe": ({"channel": "other"}, "subscribe"),
    "unsubscribe": ({"channel": "room"}, "unsubscribe"),
    "publish": ({"channel": "room", "data": {"n": 1}}, "publish"),
    "presence": ({"channel": "room"}, "presence"),
    "presence_stats": ({"channel": "room"}, "presence_stats"),
    "history": ({"channel": "room"}, "history"),
    "rpc": ({"method": "m", "data": {}}, "error"),  # no RPC handler: error 108
    "sub_refresh": ({"channel": "room"}, "sub_refresh"),
    "ping": ({}, "ping"),
    "send": ({"data": {"x": 1}}, None),
}

REQUEST_FIELDS = [name for name in Command.__struct_fields__ if name != "id"]


async def in_room() -> FakeSession:
    """A connected session subscribed to ``room``, with nothing written since."""
    s = await connected(make_hub(), options=PRESENCE_OPTIONS)
    assert await s.send({"id": 2, "subscribe": {"channel": "room"}}) is None
    s.frames.clear()
    return s


def replies_to(s: FakeSession, cmd_id: int) -> list[dict[str, Any]]:
    return [message for frame in s.frames for message in frame if message.get("id") == cmd_id]


def test_every_command_field_is_routed_once() -> None:
    routed = [route.field for route in ROUTES]
    assert sorted(routed) == sorted(REQUEST_FIELDS)
    assert len(set(routed)) == len(routed)
    assert sorted(REQUESTS) == sorted(REQUEST_FIELDS)


@pytest.mark.parametrize("field", REQUEST_FIELDS)
def test_each_request_runs_its_own_handler(field: str) -> None:
    request, reply_key = REQUESTS[field]

    async def main() -> None:
        s = FakeSession(make_hub(), PRESENCE_OPTIONS) if field == "connect" else await in_room()
        assert await s.send({"id": 9, field: request}) is None
        assert s.fake.closed is None
        replies = replies_to(s, 9)
        if reply_key is None:
            assert replies == []
            return
        (reply,) = replies
        assert set(reply) == {"id", reply_key}, reply
        if reply_key == "error":
            assert reply["error"]["code"] == ErrorCode.NOT_AVAILABLE

    run(main())


def test_the_first_request_present_wins_in_todays_order() -> None:
    """Precedence is ROUTES' order: connect, refresh, subscribe, ... ping, send."""

    async def main() -> None:
        s = await in_room()
        await s.send({"id": 3, "subscribe": {"channel": "other"}, "refresh": {"token": ""}})
        (reply,) = replies_to(s, 3)
        assert "refresh" in reply and "other" not in (s.channels or set())
        await s.send({"id": 4, "ping": {}, "sub_refresh": {"channel": "room"}})
        (reply,) = replies_to(s, 4)
        assert "sub_refresh" in reply
        await s.send({"id": 5, "send": {"data": {}}, "ping": {}})
        (reply,) = replies_to(s, 5)
        assert "ping" in reply

    run(main())
    assert [route.field for route in ROUTES][:3] == ["connect", "refresh", "subscribe"]
    assert [route.field for route in ROUTES][-3:] == ["sub_refresh", "ping", "send"]


def test_an_unknown_command_closes_3501() -> None:
    async def main() -> None:
        s = await in_room()
        disconnect = await s.send({"id": 3, "frobnicate": {}})
        assert disconnect == (DisconnectCode.BAD_REQUEST, "unknown command")
        assert s.frames == []
        unconnected = FakeSession(make_hub())
        disconnect = await unconnected.send({"id": 1, "frobnicate": {}})
        assert disconnect == (DisconnectCode.BAD_REQUEST, "connect first")

    run(main())


@pytest.mark.parametrize("field", [f for f in REQUEST_FIELDS if f != "connect"])
def test_every_command_but_connect_needs_a_connected_client(field: str) -> None:
    async def main() -> None:
        s = FakeSession(make_hub(), PRESENCE_OPTIONS)
        disconnect = await s.send({"id": 1, field: REQUESTS[field][0]})
        assert disconnect == (DisconnectCode.BAD_REQUEST, "connect first")
        assert s.frames == [] and not s.connected

    run(main())


def test_connect_twice_closes_3501() -> None:
    async def main() -> None:
        s = await in_room()
        disconnect = await s.send({"id": 3, "connect": {}})
        assert disconnect == (DisconnectCode.BAD_REQUEST, "already connected")

    run(main())


@pytest.mark.parametrize("field", [f for f in REQUEST_FIELDS if f != "send"])
def test_a_command_without_id_closes_3501_unless_it_is_a_pong(field: str) -> None:
    async def main() -> None:
        s = await in_room()
        disconnect = await s.send({field: REQUESTS[field][0]})
        assert disconnect == (DisconnectCode.BAD_REQUEST, "command without id")
        assert s.frames == [] and s.pongs == 0

    run(main())


def test_a_pong_and_a_send_without_id_get_no_reply() -> None:
    async def main() -> None:
        s = await in_room()
        assert await s.send({}) is None
        assert s.pongs == 1
        assert await s.send({"send": {"data": {}}}) is None
        # As before the table: a send beside another request, without id, is accepted silently.
        assert await s.send({"send": {"data": {}}, "subscribe": {"channel": "other"}}) is None
        assert s.pongs == 1 and s.frames == [] and s.fake.closed is None
        unconnected = FakeSession(make_hub())
        disconnect = await unconnected.send({})
        assert disconnect == (DisconnectCode.BAD_REQUEST, "connect first")

    run(main())


def test_client_ids_are_uuid_shaped_unique_and_new_in_a_forked_worker() -> None:
    """Ids are compared across nodes and across a server's forked workers: a
    worker that kept its parent's head would hand out its parent's ids."""
    import os
    import uuid

    ids = [CLIENT_IDS.next() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    assert all(str(uuid.UUID(client_id)) == client_id for client_id in ids)
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the forked worker
        os.write(writer, CLIENT_IDS.next().encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    forked_id = os.read(reader, 64).decode()
    os.close(reader)
    assert forked_id[:24] != ids[0][:24]
    assert forked_id not in ids
