"""Liveness and readiness (issue 15, item 5), asked of a real ``tidings serve``.

``/health`` is liveness: 200 while the process answers, whatever its broker
does (an orchestrator restarts a process whose liveness fails). ``/ready`` is
readiness: 503, with the reasons, while the broker is unreachable, while the
server shuts down, or when the next connection would be over
``limits.max_connections``; 200 again once that is over.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import httpx

from brokers_support import RedisServer
from conftest import ServerProcess
from helpers import RawConn, poll_ok, request_bytes, unique_channel, wait_subscribers

TIMEOUT = 10.0
#: How long the broker's loss or return may take to show (the Redis client's
#: reconnect back-off included).
BROKER_NOTICE = 30.0


def ready(srv: ServerProcess) -> httpx.Response:
    return httpx.get(srv.url + "/ready", timeout=TIMEOUT)


def wait_ready_status(srv: ServerProcess, status: int, within: float) -> httpx.Response:
    """Ask /ready (each time on a new connection) until it answers ``status``."""
    deadline = time.monotonic() + within
    while True:
        resp = ready(srv)
        if resp.status_code == status or time.monotonic() > deadline:
            assert resp.status_code == status, (resp.status_code, resp.text, srv.logs()[-3000:])
            return resp
        time.sleep(0.1)


def test_ready_and_healthy_by_default(server: ServerProcess) -> None:
    resp = ready(server)
    assert (resp.status_code, resp.json()) == (200, {"status": "ready"})
    health = httpx.get(server.url + "/health", timeout=TIMEOUT)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_ready_follows_redis_while_health_stays_200(
    server_factory: Callable[..., ServerProcess], redis_server: RedisServer
) -> None:
    srv = server_factory(f'[broker]\ntype = "redis"\nredis_url = "{redis_server.url}"\n')
    wait_ready_status(srv, 200, BROKER_NOTICE)

    redis_server.stop()
    down = wait_ready_status(srv, 503, BROKER_NOTICE)
    assert down.json() == {"status": "unavailable", "reasons": ["broker unreachable"]}
    health = httpx.get(srv.url + "/health", timeout=TIMEOUT)
    assert health.status_code == 200, health.text
    assert health.json()["broker"]["healthy"] is False

    redis_server.start()
    assert wait_ready_status(srv, 200, BROKER_NOTICE).json() == {"status": "ready"}
    assert "Traceback" not in srv.logs()


def idle_connections(srv: ServerProcess, n: int, stack: ExitStack) -> Iterator[RawConn]:
    """``n`` keep-alive connections, each served once, then left idle (still counted)."""
    for _ in range(n):
        conn = stack.enter_context(RawConn(srv))
        conn.send(request_bytes("GET", "/health"))
        assert conn.read_response().status == 200
        yield conn


def test_ready_is_503_when_the_next_connection_would_be_refused(
    server_factory: Callable[..., ServerProcess],
) -> None:
    # The idle keep-alive connections stay open for the whole test.
    srv = server_factory("[limits]\nmax_connections = 3\n[timeouts]\nkeepalive = 60.0\n")
    with ExitStack() as stack:
        conns = list(idle_connections(srv, 1, stack))
        # One held, plus the probe: a third connection would still be admitted.
        assert ready(srv).status_code == 200
        conns += idle_connections(srv, 1, stack)
        # Two held, plus the probe: the cap is reached, the next one would get 503.
        full = ready(srv)
        assert full.status_code == 503
        assert full.json() == {"status": "unavailable", "reasons": ["at limits.max_connections"]}
        # The connections held are still served.
        conns[0].send(request_bytes("GET", "/health"))
        assert conns[0].read_response().status == 200
        # One leaves: ready again (the registry may take a moment to see it go).
        conns.pop().close()
        wait_ready_status(srv, 200, TIMEOUT)


def test_ready_is_503_while_draining_before_the_shutdown(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """With ``timeouts.drain``, SIGTERM first turns /ready to 503 while the server still
    accepts and serves (a load balancer's probe sends clients elsewhere), then shuts down."""
    srv = server_factory("[timeouts]\ndrain = 4.0\nshutdown = 5.0\n")
    assert ready(srv).status_code == 200
    srv.proc.send_signal(signal.SIGTERM)
    draining = wait_ready_status(srv, 503, TIMEOUT)  # each probe a new connection: accepted
    assert draining.json() == {"status": "unavailable", "reasons": ["shutting down"]}
    # Still serving meanwhile: liveness, and a subscriber's poll.
    assert httpx.get(srv.url + "/health", timeout=TIMEOUT).status_code == 200
    poll_ok(srv, [unique_channel()])
    assert srv.proc.wait(timeout=20) == 0, srv.logs()
    assert "draining" in srv.logs()


def test_without_drain_the_listener_closes_at_once(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """The default (drain 0): a held long-poll is answered and its connection closed;
    the process is gone soon after, so nothing is ready (the probe is refused)."""
    srv = server_factory("[timeouts]\nshutdown = 5.0\n")
    channel = unique_channel()
    cursor = poll_ok(srv, [channel])["cursor"]
    with RawConn(srv, timeout=20) as conn:
        target = f"/poll?channel={channel}&cursor={cursor}&timeout=60"
        conn.send(request_bytes("GET", target))
        wait_subscribers(srv, channel)
        srv.proc.send_signal(signal.SIGTERM)
        answer = conn.read_response()
        assert answer.status == 200 and answer.header("connection") == "close"
    assert srv.proc.wait(timeout=15) == 0, srv.logs()
    assert "draining" not in srv.logs()
