"""A Centrifugo session with a fake transport, for the sans-I/O unit tests.

A real :class:`~tidings.hub.Hub` over the in-memory broker; the "transport"
records what the session writes, as parsed JSON.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tidings.auth import Access
from tidings.brokers.memory import MemoryBroker
from tidings.centrifuge import ClientSession, Disconnect, SessionOptions, push_json
from tidings.config import Config, LimitsConfig
from tidings.hub import HistoryPolicy, Hub, Publication

#: The development default: no keys, every namespace open.
DEV_ACCESS = Access(Config())
#: The same, with room for three channels per connection (the limit tests reach it).
SMALL_ACCESS = Access(Config(limits=LimitsConfig(max_channels_per_connection=3)))


class FakeTransport:
    """The session's transport: what it writes, as parsed JSON."""

    #: As a WebSocket connection names itself (hook calls and log lines carry it).
    transport_name = "websocket"

    def __init__(self) -> None:
        self.frames: list[list[dict[str, Any]]] = []
        self.pushes: list[bytes] = []
        self.pongs = 0
        self.closed: tuple[int, str] | None = None

    def write_payload(self, payload: bytes) -> None:
        self.frames.append([json.loads(line) for line in payload.split(b"\n")])

    def write_publication(self, pub: Publication) -> None:
        self.pushes.append(pub.encoded(push_json))
        self.frames.append([json.loads(pub.encoded(push_json))])

    def pong(self) -> None:
        self.pongs += 1

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


class FakeSession(ClientSession):
    """A session over a :class:`FakeTransport`, with helpers to send commands."""

    __slots__ = ("fake",)

    def __init__(self, hub: Hub, options: SessionOptions | None = None) -> None:
        self.fake = FakeTransport()
        super().__init__(
            hub,
            options or SessionOptions(access=SMALL_ACCESS, ping_interval=25),
            self.fake,
        )

    @property
    def frames(self) -> list[list[dict[str, Any]]]:
        return self.fake.frames

    @property
    def pushes(self) -> list[bytes]:
        return self.fake.pushes

    @property
    def pongs(self) -> int:
        return self.fake.pongs

    async def send(self, *commands: dict[str, Any]) -> Disconnect | None:
        return await self.handle(b"\n".join(json.dumps(c).encode() for c in commands))

    def last(self) -> list[dict[str, Any]]:
        return self.frames[-1]


def make_hub(size: int = 100) -> Hub:
    return Hub(MemoryBroker(), history_for=lambda channel: HistoryPolicy(size, 300.0))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def connected(hub: Hub, **kw: Any) -> FakeSession:
    s = FakeSession(hub, **kw)
    assert await s.send({"id": 1, "connect": {}}) is None
    return s
