"""Capacity: ``limits.max_connections`` and running out of file descriptors (issue 12, item 2).

Each test plays the client a full server meets — the one that arrives over
the cap, the flood of idle connections past it, the process at its
``RLIMIT_NOFILE`` — against a real ``tidings serve``, with clients we did not
write (httpx, curl, the ``websockets`` client) where an answer is read, and
measures what the server holds (descriptors and RSS from ``/proc``) while a
client that arrives after others leave is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import ServerProcess
from helpers import RawConn, request_bytes, rss_kib
from tidings import connections as registry
from tidings.connections import Admission, Connections

#: Seconds a refused connection may take, from accept to close: its request
#: head within the server's ``_LINGER`` (2 s), then 2 s of lingering.
REFUSAL_LIFETIME = 4.0
#: The server's ``RETRY_AFTER``.
RETRY_AFTER = "5"
ORIGIN = "http://page.example"


def config(cap: int, *extra: str) -> str:
    """A server with a small cap whose idle admitted connections stay for the test."""
    return "\n".join(
        [
            f"allowed_origins = [{json.dumps(ORIGIN)}]",
            "[limits]",
            f"max_connections = {cap}",
            "[timeouts]",
            "request = 60.0",
            "keepalive = 60.0",
            *extra,
        ]
    )


def fds(srv: ServerProcess) -> int:
    return len(os.listdir(f"/proc/{srv.proc.pid}/fd"))


def cpu_seconds(srv: ServerProcess) -> float:
    """User plus system CPU time the server process has used, from /proc/<pid>/stat."""
    with open(f"/proc/{srv.proc.pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def served(srv: ServerProcess) -> bool:
    """A new client gets an answer other than 503 (a fresh connection every time)."""
    try:
        return httpx.get(f"{srv.url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


@contextlib.contextmanager
def admitted(srv: ServerProcess, n: int) -> Iterator[list[RawConn]]:
    """``n`` keep-alive connections the server admitted (each was answered 200), kept idle.

    A connection a probe of the test just closed may not have left the
    registry yet: a 503 is retried (with a fresh connection) until a deadline.
    """
    conns: list[RawConn] = []

    def admit_one() -> bool:
        conn = RawConn(srv)
        conn.send(request_bytes("GET", "/health"))
        if conn.read_response().status == 200:
            conns.append(conn)
            return True
        conn.close()
        return False

    try:
        for _ in range(n):
            assert wait_for(admit_one, 10), f"only {len(conns)} of {n} admitted"
        yield conns
    finally:
        for conn in conns:
            conn.close()


def assert_capacity_answer(status: int, headers: httpx.Headers, body: bytes) -> None:
    assert status == 503, body
    assert headers["retry-after"] == RETRY_AFTER
    assert headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == 111  # temporary: too many requests


def log_lines(srv: ServerProcess, text: str) -> list[str]:
    return [line for line in srv.logs().splitlines() if text in line]


# --------------------------------------------------------------------------- the rule


class _Conn:
    def shutdown(self) -> None:
        pass


def test_admission_counts_every_kind_and_bounds_refusals():
    """Unit: the cap counts connections lent through ``include`` (SSE streams) too; past
    it connections are refused, past ``max_refusals`` dropped; a departure frees a slot."""
    connections = Connections(max_connections=2)
    streams: set[_Conn] = set()
    connections.include(streams)
    first = _Conn()
    assert connections.admit(first) is Admission.ADMITTED
    streams.add(_Conn())
    refused = _Conn()
    assert connections.admit(refused) is Admission.REFUSED
    assert connections.refused(refused) and len(connections) == 2
    for _ in range(connections.max_refusals - 1):
        assert connections.admit(_Conn()) is Admission.REFUSED
    assert connections.admit(_Conn()) is Admission.DROPPED
    connections.discard(refused)
    assert not connections.refused(refused)
    connections.discard(first)
    assert connections.admit(_Conn()) is Admission.ADMITTED
    assert Connections(0).admit(_Conn()) is Admission.ADMITTED  # 0: no cap


@pytest.mark.parametrize(
    ("soft", "cap"),
    [(64, 1), (1024, 960), (20_000, 19_375), (65_536, 63_488), (resource.RLIM_INFINITY, 0)],
)
def test_default_cap_is_the_file_limit_minus_a_reserve(monkeypatch, soft, cap):
    """Unit: the figures docs/configuration.md gives for an unset limits.max_connections."""
    monkeypatch.setattr(registry.resource, "getrlimit", lambda _which: (soft, soft))
    assert registry.default_max_connections() == cap


# --------------------------------------------------------------------------- the 503


def test_over_the_cap_httpx_and_curl_get_503_with_retry_after(server_factory, spawn):
    srv = server_factory(config(3))
    with admitted(srv, 3) as conns:
        resp = httpx.get(f"{srv.url}/health", timeout=5)
        assert_capacity_answer(resp.status_code, resp.headers, resp.content)

        curl = subprocess.run(
            ["curl", "-sS", "-i", f"{srv.url}/poll?channel=a"],
            capture_output=True, timeout=30, check=True,
        )  # fmt: skip
        head, _, body = curl.stdout.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 503"), curl.stdout
        headers = httpx.Headers([tuple(line.split(": ", 1)) for line in lines[1:]])
        assert_capacity_answer(503, headers, body)

        # The connections already admitted are still served.
        for conn in conns:
            conn.send(request_bytes("GET", "/health"))
            assert conn.read_response().status == 200

        # One leaves: the next client is served.
        conns.pop().close()
        assert wait_for(lambda: served(srv), 10), "not served after a connection left"
    assert not log_lines(srv, "ERROR") and not log_lines(srv, "Traceback"), srv.logs()


def test_refused_connection_is_closed_and_a_page_can_read_retry_after(server_factory):
    srv = server_factory(config(1))
    with admitted(srv, 1):
        # A cross-origin page: CORS headers, and Retry-After exposed to its script.
        with RawConn(srv) as conn:
            conn.send(request_bytes("GET", "/poll?channel=a", headers={"Origin": ORIGIN}))
            resp = conn.read_response()
            assert resp.status == 503
            assert resp.header("access-control-allow-origin") == ORIGIN
            assert resp.header("access-control-expose-headers") == "Retry-After"
            assert conn.closed_by_peer(REFUSAL_LIFETIME + 2)
        # HEAD: the same answer without a body.
        with RawConn(srv) as conn:
            conn.send(request_bytes("HEAD", "/health"))
            resp = conn.read_response(head=True)
            assert (resp.status, resp.header("retry-after")) == (503, RETRY_AFTER)
            assert conn.closed_by_peer(REFUSAL_LIFETIME + 2)
        # A connection over the cap that never asks anything is not kept either.
        with RawConn(srv) as conn:
            assert conn.closed_by_peer(REFUSAL_LIFETIME + 2)


def test_websocket_handshake_over_the_cap_is_refused_503(server_factory):
    srv = server_factory(config(2))

    async def handshake() -> None:
        async with connect(f"{srv.ws_url}/connection/websocket", open_timeout=5):
            pass

    def handshake_succeeds() -> bool:
        try:
            asyncio.run(handshake())
        except InvalidStatus:
            return False
        return True

    with admitted(srv, 2) as conns:
        with pytest.raises(InvalidStatus) as refused:
            asyncio.run(handshake())
        response = refused.value.response
        assert response.status_code == 503
        assert response.headers["Retry-After"] == RETRY_AFTER
        conns.pop().close()
        # A slot is free: a handshake succeeds.
        assert wait_for(handshake_succeeds, 10)


# --------------------------------------------------------------------------- the flood

CAP = 50
FLOOD = 2000
#: What the server holds besides its connections: listening socket, epoll,
#: wake-up pipe, log file, /dev/null, the test's own /proc reads in flight;
#: and under asyncio, the sockets of two accept batches (tidings.listener's
#: ``_ACCEPT_BATCH``, 32) that wait one loop iteration to be reset.
FD_SLACK = 16 + 2 * 32
#: RSS the flood may add: the refusals in flight, allocator noise.
RSS_SLACK_KIB = 6 * 1024


def test_thousands_of_idle_connections_past_the_cap(server_factory):
    """2,000 idle connections past a cap of 50: the server holds the 50, a bounded
    number of refusals in flight and nothing else, logs a line per interval, and
    serves the client that comes after one of the 50 leaves."""
    srv = server_factory(config(CAP))
    assert wait_for(lambda: served(srv), 5)
    base_fds, base_rss = fds(srv), rss_kib(srv)
    max_refusals = max(16, CAP // 64)  # Connections.max_refusals
    flood: list[socket.socket] = []
    try:
        with admitted(srv, CAP) as conns:
            most_fds = most_rss = 0
            for i in range(FLOOD):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect((srv.host, srv.port))
                flood.append(sock)
                if i % 100 == 0:
                    most_fds, most_rss = max(most_fds, fds(srv)), max(most_rss, rss_kib(srv))
            for _ in range(20):  # and while the flood sits there
                most_fds, most_rss = max(most_fds, fds(srv)), max(most_rss, rss_kib(srv))
                time.sleep(0.1)
            print(
                f"\nflood of {FLOOD} past a cap of {CAP}: server fds {base_fds} -> at most "
                f"{most_fds}, RSS {base_rss} -> at most {most_rss} KiB"
            )
            assert most_fds <= base_fds + CAP + max_refusals + FD_SLACK
            assert most_rss <= base_rss + RSS_SLACK_KIB

            # One of the fifty leaves: a client that comes now is served.
            conns.pop().close()
            assert wait_for(lambda: served(srv), 10), "not served after a connection left"
    finally:
        for sock in flood:
            sock.close()
    lines = log_lines(srv, "at capacity")
    assert lines, srv.logs()
    assert len(lines) <= 4, lines  # one per 5 s interval, and its summary
    assert not log_lines(srv, "ERROR") and not log_lines(srv, "Traceback")


# --------------------------------------------------------------------------- EMFILE

#: The server's file limit in the EMFILE test; it starts with about 15 open.
NOFILE = 64


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_accept_survives_running_out_of_file_descriptors(server_factory, loop):
    """At RLIMIT_NOFILE the server neither spins nor dies, logs once per interval,
    and serves again once descriptors are freed."""
    srv = server_factory(config(0), args=["--loop", loop])
    resource.prlimit(srv.proc.pid, resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    window = 3.0
    idle_start = cpu_seconds(srv)
    time.sleep(window)  # measuring the idle CPU over the same window, not waiting for an event
    idle = cpu_seconds(srv) - idle_start

    socks = []
    try:
        for _ in range(2 * NOFILE):
            socks.append(socket.create_connection((srv.host, srv.port), timeout=5))
        assert wait_for(lambda: fds(srv) >= NOFILE, 5), f"server at {fds(srv)} fds"
        assert wait_for(lambda: bool(log_lines(srv, "out of file descriptors")), 5), srv.logs()
        start = cpu_seconds(srv)
        time.sleep(window)  # measuring CPU at the limit
        at_limit = cpu_seconds(srv) - start
        print(
            f"\n{loop}: server CPU over {window:g}s idle {idle:.2f}s, at the limit {at_limit:.2f}s"
        )
        assert srv.alive()
        # asyncio's own accept spent 2.55 s of 3 here (tidings.listener); a loose bound.
        assert at_limit < window / 4
    finally:
        for sock in socks:
            sock.close()
    assert wait_for(lambda: served(srv), 10), "not served after descriptors were freed"
    lines = log_lines(srv, "out of file descriptors")
    assert 1 <= len(lines) <= 4, lines  # once per 5 s interval, and its summary
    assert not re.search(r"ERROR|Traceback", srv.logs()), srv.logs()[-3000:]
