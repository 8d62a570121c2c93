"""``tidings subscribe`` and ``tidings.client.subscribe`` against a hostile SSE server.

A loopback server answers the first ``/sse`` request with one good event and
then one endless line, the second with one good event. Each client must drop
the first stream once the line passes its bound (holding little while it
does), say why, reconnect from the last event it got, and go on delivering.
Without the bound, either client would hold the whole line: 64 MiB here.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import clean_env
from helpers import LineReader
from tidings.client import decode_cursor, subscribe
from tidings.client.sse import DEFAULT_MAX_LINE

ENDLESS = 64 * 1024 * 1024  # what the hostile server sends of its one line, at most
CHUNK = b"x" * 65536
MiB = 1024 * 1024
TIMEOUT = 30.0
HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n"
)


class EndlessLineServer:
    """Serves two ``/sse`` connections: events then an endless line, then events."""

    def __init__(
        self,
        first_events: bytes,
        second_events: bytes,
        before_first_response: Callable[[], None] = lambda: None,
    ) -> None:
        self.first_events = first_events
        self.second_events = second_events
        self.before_first_response = before_first_response
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests: list[bytes] = []
        self.endless_sent = 0
        self.cut_by_client = False
        self.second_served = threading.Event()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        self.listener.close()

    def _accept(self) -> socket.socket:
        conn, _ = self.listener.accept()
        conn.settimeout(TIMEOUT)
        head = b""
        while b"\r\n\r\n" not in head:
            data = conn.recv(4096)
            if not data:
                raise ConnectionError("client left before sending its request")
            head += data
        self.requests.append(head)
        return conn

    def _run(self) -> None:
        try:
            with self._accept() as conn:
                self.before_first_response()
                conn.sendall(HEAD + self.first_events + b"data: ")
                try:
                    while self.endless_sent < ENDLESS:
                        self.endless_sent += conn.send(CHUNK)
                except OSError:  # reset or broken pipe: the client closed the stream
                    self.cut_by_client = True
            with self._accept() as conn:
                conn.sendall(HEAD + self.second_events)
                self.second_served.set()
                self._stop.wait(TIMEOUT)
        except BaseException as exc:
            self.error = exc
            self.second_served.set()

    def wait_second(self) -> None:
        assert self.second_served.wait(TIMEOUT), "the client did not reconnect"
        if self.error is not None:
            raise AssertionError(f"hostile server failed: {self.error!r}")


def kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cli_subscribe_drops_an_endless_line_and_resumes(
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    baseline: list[int] = []
    proc: subprocess.Popen[bytes] | None = None

    def measure_baseline() -> None:  # the CLI is waiting for the response head
        assert proc is not None
        baseline.append(kib(proc.pid, "VmRSS"))

    server = EndlessLineServer(publication(1, "first"), publication(2, "second"), measure_baseline)
    try:
        proc = spawn(
            [sys.executable, "-m", "tidings", "subscribe", "news", "--url", server.url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=clean_env(),
        )
        lines = LineReader(proc)
        assert lines.next() == 'news "first"'
        server.wait_second()
        assert lines.next() == 'news "second"'
        peak_growth = kib(proc.pid, "VmHWM") - baseline[0]
        assert proc.poll() is None  # still running, reconnected
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        server.close()
    # What it held is its bound (4 MiB) plus one read, not the 64 MiB it was sent.
    assert peak_growth < 16 * 1024, f"the CLI grew by {peak_growth} KiB"
    assert server.cut_by_client and server.endless_sent < ENDLESS
    assert f"line longer than {DEFAULT_MAX_LINE} bytes" in stderr.decode(), stderr
    assert b"Traceback" not in stderr
    # Resumed after "first": the position the client reached, in the cursor format.
    resumed = re.search(rb"\r\nlast-event-id: ([^\r]*)\r\n", server.requests[1].lower())
    assert resumed is not None, server.requests[1]
    header = server.requests[1][resumed.start(1) : resumed.end(1)].decode()
    assert decode_cursor(header) == {"news": ("e1", 1)}


def publication(offset: int, data: str) -> bytes:
    body = f'{{"channel":"news","offset":{offset},"epoch":"e1","data":"{data}"}}'
    return f"id: c{offset}\ndata: {body}\n\n".encode()


def test_python_subscriber_drops_an_endless_line_and_resumes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = EndlessLineServer(publication(1, "first"), publication(2, "second"))
    max_line = 1 * MiB

    async def main() -> list[str]:
        got: list[str] = []
        stream = subscribe(
            server.url, ["news"], transport="sse", min_backoff=0.01, max_line=max_line
        )
        try:
            async with asyncio.timeout(TIMEOUT):
                async for pub in stream:
                    got.append(pub.data)
                    if len(got) == 2:
                        break
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        return got

    caplog.set_level(logging.WARNING, logger="tidings.client")
    tracemalloc.start()
    try:
        got = asyncio.run(main())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        server.close()
    assert got == ["first", "second"]
    assert peak < 16 * MiB, f"the subscriber held {peak / MiB:.1f} MiB at its peak"
    assert server.cut_by_client and server.endless_sent < ENDLESS
    warnings = [r for r in caplog.records if r.name == "tidings.client.subscriber"]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert f"line longer than {max_line} bytes" in warnings[0].getMessage()
    assert warnings[0].exc_info is None
    assert b"\r\nlast-event-id: " in server.requests[1].lower()  # resumed from its position
