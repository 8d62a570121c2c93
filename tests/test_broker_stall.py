"""A real Redis paused with SIGSTOP: clients get a temporary error, not a hang (issue 12).

A paused Redis keeps its sockets open and answers nothing, the way a slow or
overloaded broker does, which no connection error reveals. ``timeouts.broker``
bounds every wait on it for a client: a publish over the server API and a
subscribe over WebSocket (the ``websockets`` client) both answer error 100,
nothing stays registered, ``/health`` keeps answering, and once Redis resumes
both work again.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import httpx
from websockets.sync.client import ClientConnection, connect

from conftest import ServerProcess
from helpers import api, unique_channel
from test_scaleout import redis_config

if TYPE_CHECKING:
    from brokers_support import RedisServer

WAIT = 15.0
TIMED_OUT = "broker unavailable: timed out after 0.5s"


@contextlib.contextmanager
def paused(redis: RedisServer) -> Iterator[None]:
    """Redis stopped (SIGSTOP) for the body, and continued whatever happens."""
    assert redis.proc is not None
    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)


def command(ws: ClientConnection, cmd: dict[str, Any]) -> dict[str, Any]:
    """Send one command and return its reply (pushes before it are skipped)."""
    ws.send(json.dumps(cmd))
    while True:
        for line in str(ws.recv(timeout=WAIT)).split("\n"):
            message: dict[str, Any] = json.loads(line)
            if message.get("id") == cmd["id"]:
                return message


def until_ok(attempt: Callable[[], dict[str, Any]], what: str) -> dict[str, Any]:
    """Retry ``attempt`` while it answers the temporary error, as clients do (bounded)."""
    deadline = time.monotonic() + WAIT
    while True:
        answer = attempt()
        if "error" not in answer:
            return answer
        assert answer["error"]["code"] == 100, answer
        assert time.monotonic() < deadline, f"{what} kept failing: {answer}"
        time.sleep(0.1)


def test_a_paused_redis_answers_temporary_errors_and_recovers(
    server_factory: Callable[..., ServerProcess], redis_server: RedisServer
) -> None:
    srv = server_factory(config=redis_config(redis_server, extra="[timeouts]\nbroker = 0.5\n"))
    channel = unique_channel("stall")
    ids = iter(range(1, 1000))
    with connect(srv.ws_url + "/connection/websocket") as ws:
        assert "connect" in command(ws, {"id": next(ids), "connect": {}})
        with paused(redis_server):
            published = api(srv, "publish", {"channel": channel, "data": {"n": 1}}).json()
            assert published == {"error": {"code": 100, "message": TIMED_OUT}}
            subscribed = command(ws, {"id": next(ids), "subscribe": {"channel": channel}})
            assert subscribed["error"] == {"code": 100, "message": TIMED_OUT, "temporary": True}
            # Nothing half-registered: no channel (not even one with no subscriber).
            channels = api(srv, "channels").json()["result"]["channels"]
            assert channel not in channels
            # The server still answers while Redis does not.
            assert httpx.get(srv.url + "/health", timeout=WAIT).status_code in (200, 503)
        reply = until_ok(
            lambda: command(ws, {"id": next(ids), "subscribe": {"channel": channel}}), "subscribe"
        )
        start = reply["subscribe"].get("offset", 0)
        result = until_ok(
            lambda: api(srv, "publish", {"channel": channel, "data": {"n": 2}}).json(), "publish"
        )
        offset = result["result"]["offset"]
        # The publish that timed out may have landed when Redis resumed; nothing else.
        assert offset in (start + 1, start + 2)
        pushes = [json.loads(str(ws.recv(timeout=WAIT)))["push"]["pub"]]
        while pushes[-1]["data"] != {"n": 2}:
            pushes.append(json.loads(str(ws.recv(timeout=WAIT)))["push"]["pub"])
        assert [p.get("offset") for p in pushes] == list(range(start + 1, offset + 1))
    assert "Traceback" not in srv.logs()
