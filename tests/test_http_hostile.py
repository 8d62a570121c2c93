"""Hostile HTTP clients against a real server: what one connection can make it hold.

Issue 10: a client that pipelined requests and never read its answers grew the
server by gigabytes (``/poll`` with history, ``/api/history``, ``/tidings.js``);
refused or closing connections whose peer never read were held forever; and
many pipelined requests before a head split across two writes got a false 431.

Each attack here plays the hostile client over a real socket against a
``tidings serve`` process with a small ``limits.max_write_buffer``, measures
what the server holds (RSS and sockets, from ``/proc/<pid>``), checks that the
connection is aborted, and that another client is served meanwhile. Attacks
stop early (and fail) as soon as the server grows past the bound, so a broken
server costs the test machine tens of MiB, not gigabytes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from conftest import ServerProcess
from helpers import RawConn, check_serving, publish, request_bytes, rss_kib, unique_channel
from tidings.cursor import encode_cursor
from tidings.hub import Position

MAX_WRITE_BUFFER = 64 * 1024
WRITE_TIMEOUT = 2.0
#: The server's ``_LINGER``: how long a refused connection drains before it is aborted.
LINGER = 2.0
#: History of the channel the attacks read: PUBLICATIONS x PAD bytes, about 300 kB.
PUBLICATIONS = 10
PAD = 30_000
#: Non-reading clients attacking at once.
HOSTILE = 4
#: Allocator noise and what each connection holds besides unsent bytes: the
#: parser, the queued requests (``max_pipelined_requests``), the unparsed read
#: chunk (uvloop reads up to 256 KiB at a time), a second copy of an answer
#: while it is encoded.
SLACK = 2 * 1024 * 1024

CONFIG = f"""
[limits]
max_write_buffer = {MAX_WRITE_BUFFER}

[timeouts]
write = {WRITE_TIMEOUT}
"""


# --------------------------------------------------------------------------- /proc


def rss(srv: ServerProcess) -> int:
    """Resident set size of the server process, in bytes."""
    return rss_kib(srv) * 1024


def holds_connection(srv: ServerProcess, client_port: int) -> bool:
    """Whether the server process still has a socket open for the client at ``client_port``."""
    inodes = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for row in table:
            fields = row.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if (
                int(local.rpartition(":")[2], 16) == srv.port
                and int(remote.rpartition(":")[2], 16) == client_port
            ):
                inodes.add(f"socket:[{inode}]")
    fd_dir = f"/proc/{srv.proc.pid}/fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            if os.readlink(f"{fd_dir}/{fd}") in inodes:
                return True
    return False


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --------------------------------------------------------------------------- the attack


def non_reading_socket(srv: ServerProcess) -> socket.socket:
    """A client socket with a tiny receive buffer, so that the kernel holds little for it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.connect((srv.host, srv.port))
    sock.setblocking(False)
    return sock


@dataclass
class Attack:
    growth: int = 0  #: the most server RSS grew over its value before the attack, in bytes
    ports: list[int] = field(default_factory=list)  #: the attacking clients' ports
    reset: set[int] = field(default_factory=set)  #: those the server aborted (reset seen)
    sent: int = 0  #: requests the clients got into their sockets
    served_meanwhile: bool = False


def pipeline_without_reading(
    srv: ServerProcess, request: bytes, bound: int, connections: int, deadline: float = 15.0
) -> Attack:
    """Send ``request`` over and over on ``connections`` sockets, never reading an answer.

    Stops when the server has reset every connection, when its RSS has grown
    past ``bound`` (it is then failing; no need to take the machine down), or
    after ``deadline`` seconds. Half a second in, while the attack is on,
    another client must be served.
    """
    socks = {}
    for _ in range(connections):
        sock = non_reading_socket(srv)
        socks[sock.getsockname()[1]] = sock
    base = rss(srv)
    burst = request * 16
    start = time.monotonic()
    attack = Attack(ports=list(socks))
    try:
        while socks and time.monotonic() - start < deadline:
            attack.growth = max(attack.growth, rss(srv) - base)
            if attack.growth > bound:
                break
            if not attack.served_meanwhile and time.monotonic() - start > 0.5:
                check_serving(srv)
                attack.served_meanwhile = True
            _, writable, _ = select.select([], list(socks.values()), [], 0.05)
            for sock in writable:
                port = sock.getsockname()[1]
                try:
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET:
                        raise ConnectionResetError
                    attack.sent += sock.send(burst) // len(request)
                except BlockingIOError:
                    continue
                except (ConnectionResetError, BrokenPipeError):
                    attack.reset.add(port)
                    socks.pop(port).close()
    finally:
        for sock in socks.values():
            sock.close()
    return attack


def big_history(srv: ServerProcess) -> tuple[str, Position]:
    """A channel with PUBLICATIONS x PAD bytes of history, and the position before it."""
    channel = unique_channel("big")
    first: dict[str, Any] = {}
    for i in range(PUBLICATIONS):
        result = publish(srv, channel, {"i": i, "pad": "x" * PAD})
        first = first or result
    return channel, Position(first["epoch"], first["offset"] - 1)


def poll_request(srv: ServerProcess) -> bytes:
    channel, before = big_history(srv)
    cursor = encode_cursor({channel: before})
    return request_bytes("GET", f"/poll?channel={channel}&cursor={cursor}&timeout=0")


def history_request(srv: ServerProcess) -> bytes:
    channel, _ = big_history(srv)
    body = json.dumps({"channel": channel, "limit": -1}).encode()
    return request_bytes("POST", "/api/history", body)


def static_request(srv: ServerProcess) -> bytes:
    return request_bytes("GET", "/tidings.js")


def answer_size(srv: ServerProcess, request: bytes) -> int:
    """Bytes of one answer to ``request``, read as a well-behaved client."""
    with RawConn(srv) as conn:
        conn.send(request)
        response = conn.read_response()
    assert response.status == 200, response.body[:200]
    return len(response.body) + 1024  # and its head


@pytest.mark.parametrize(
    "make_request",
    [poll_request, history_request, static_request],
    ids=["poll-with-history", "api-history", "static-file"],
)
def test_pipelining_without_reading_is_bounded_and_aborted(
    server_factory: Callable[..., ServerProcess], make_request: Callable[[ServerProcess], bytes]
) -> None:
    srv = server_factory(config=CONFIG)
    request = make_request(srv)
    response = answer_size(srv, request)
    # What each connection may hold (see http/connection.py): the buffer up to
    # the high-water mark plus the one answer that crossed it.
    bound = HOSTILE * (MAX_WRITE_BUFFER + response) + SLACK

    attack = pipeline_without_reading(srv, request, bound, connections=HOSTILE)

    assert attack.growth <= bound, (
        f"server RSS grew {attack.growth >> 10} KiB under {HOSTILE} non-reading clients "
        f"({attack.sent} requests sent); bound {bound >> 10} KiB"
    )
    assert attack.served_meanwhile
    assert attack.reset == set(attack.ports), (
        f"{len(attack.reset)} of {HOSTILE} aborted; {attack.sent} requests sent, "
        f"RSS +{attack.growth >> 10} KiB"
    )
    assert attack.sent > HOSTILE * 32, "the attack did not even fill the request queues"
    assert not any(holds_connection(srv, port) for port in attack.ports)
    assert "bytes unsent, not taken within" in srv.logs()
    check_serving(srv)
    assert "Traceback" not in srv.logs()


# --------------------------------------------------------------------------- closing


@pytest.mark.parametrize(
    ("last", "status", "half_close"),
    [
        (request_bytes("GET", "/health", headers={"X-Big": "a" * 20_000}), 431, False),
        (request_bytes("POST", "/api/publish", headers={"Content-Length": "99999999"}), 413, False),
        (request_bytes("GET", "/health", headers={"Connection": "close"}), 200, False),
        (request_bytes("GET", "/health"), 200, True),
    ],
    ids=["431", "413", "connection-close", "half-close"],
)
def test_closing_connection_whose_peer_never_reads_is_aborted(
    server_factory: Callable[..., ServerProcess], last: bytes, status: int, half_close: bool
) -> None:
    """The last answer is stuck unsent; the socket is released after the linger anyway.

    A big write buffer here, so that the server is never paused: the
    pipelined answers sit under the high-water mark, the closing answer is
    written behind them, and only the close itself can end the connection.
    (``half_close``: the client ends with a FIN instead of asking for a close.)
    """
    config = f"[limits]\nmax_write_buffer = {64 << 20}\n[timeouts]\nwrite = {WRITE_TIMEOUT}\n"
    srv = server_factory(config=config)
    request = static_request(srv)
    sock = non_reading_socket(srv)
    port = sock.getsockname()[1]
    try:
        sock.setblocking(True)
        sock.sendall(request * 100 + last)  # 100 x 28 kB answered, none read
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        assert wait_for(lambda: holds_connection(srv, port), timeout=5.0)
        closing = LINGER if status >= 400 else WRITE_TIMEOUT
        released = wait_for(lambda: not holds_connection(srv, port), timeout=closing + 8.0)
        assert released, f"the server still holds the socket {closing + 8.0}s after its {status}"
        with pytest.raises(ConnectionResetError):
            while sock.recv(65536):
                pass
    finally:
        sock.close()
    assert "aborting closing connection" in srv.logs()
    assert "Traceback" not in srv.logs()


def test_half_closed_client_gets_every_answer(server: ServerProcess) -> None:
    """A client that sends its requests, then its FIN, still reads all their answers."""
    with RawConn(server) as conn:
        conn.send(request_bytes("GET", "/health") * 5)
        conn.sock.shutdown(socket.SHUT_WR)
        statuses = [conn.read_response().status for _ in range(5)]
        assert conn.closed_by_peer(timeout=5.0)
    assert statuses == [200] * 5


def test_refused_upload_still_gets_its_413_before_the_abort(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """A client still sending its body when refused is drained, not reset, until it reads."""
    srv = server_factory(config=CONFIG)
    with RawConn(srv) as conn:
        conn.send(request_bytes("POST", "/api/publish", headers={"Content-Length": "99999999"}))
        for _ in range(128):  # 8 MiB, drained by the server after its refusal
            conn.send(b"x" * 65536)
        assert conn.read_response().status == 413
        assert conn.closed_by_peer(timeout=LINGER + 3.0)


# --------------------------------------------------------------------------- head size


def test_split_head_after_many_pipelined_requests_is_not_a_false_431(
    server: ServerProcess,
) -> None:
    """600 requests and the start of one more in one write, its end in another."""
    one = request_bytes("GET", "/health")
    with RawConn(server) as conn:
        conn.send(one * 600 + one[:20])
        # Once these are answered the server has read the first write, so the
        # rest of the head arrives in a read of its own.
        first = [conn.read_response().status for _ in range(600)]
        conn.send(one[20:])
        last = conn.read_response().status
    assert first == [200] * 600
    assert last == 200


def test_oversized_head_sent_byte_by_byte_is_431(server: ServerProcess) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (16 * 1024 + 100)
    with RawConn(server) as conn:
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for i in range(len(head)):
                conn.send(head[i : i + 1])
        response = conn.read_response()
    assert response.status == 431


def test_head_just_under_the_limit_after_pipelined_requests_is_served(
    server: ServerProcess,
) -> None:
    """Per-request counting has no false positive, wherever the chunk boundaries fall."""
    one = request_bytes("GET", "/health")
    # 16374 bytes of head, 10 under limits.max_request_head (16384).
    big = request_bytes("GET", "/health", headers={"X-Pad": "a" * 16324})
    assert len(big) == 16374
    before = 300
    stream = one * before + big + one
    with RawConn(server) as conn:
        for cut in range(0, len(stream), 4093):
            conn.send(stream[cut : cut + 4093])
        statuses = [conn.read_response().status for _ in range(before + 2)]
    assert statuses == [200] * (before + 2)


def test_partial_request_behind_an_answered_one_is_timed_out(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """A slowloris head that arrived while the request before it was handled gets 408 too."""
    srv = server_factory(config="[timeouts]\nrequest = 1.0\nkeepalive = 30.0\n")
    with RawConn(srv) as conn:
        conn.send(request_bytes("GET", "/health") + b"GET /health HTTP/1.1\r\nX-Slow: ")
        assert conn.read_response().status == 200
        conn.settimeout(6.0)
        assert conn.read_response().status == 408
        assert conn.closed_by_peer(timeout=LINGER + 3.0)


def test_blank_lines_do_not_keep_an_idle_connection_open(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """Empty lines before a request are allowed, but they are not a request: idle is idle."""
    srv = server_factory(config="[timeouts]\nrequest = 1.5\nkeepalive = 1.5\n")
    with RawConn(srv) as conn:
        closed = False
        for _ in range(10):  # 5 s of a CRLF every half second
            try:
                conn.send(b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if conn.closed_by_peer(timeout=0.5):
                closed = True
                break
        assert closed, "a connection sending only blank lines was kept open"
