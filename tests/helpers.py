"""Small real clients used by the tests: SSE over httpx, raw HTTP/1.1 over sockets, the API."""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

TIMEOUT = 10.0


def unique_channel(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------- server API


def api(
    srv: Any, method: str, params: dict[str, Any] | None = None, **headers: str
) -> httpx.Response:
    return httpx.post(
        f"{srv.url}/api/{method}", json=params or {}, headers=headers, timeout=TIMEOUT
    )


def publish(srv: Any, channel: str, data: Any, **headers: str) -> dict[str, Any]:
    """Publish through the server API; returns the result ``{"offset", "epoch"}``."""
    resp = api(srv, "publish", {"channel": channel, "data": data}, **headers)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert "result" in body, body
    result: dict[str, Any] = body["result"]
    return result


def wait_subscribers(srv: Any, channel: str, n: int = 1, timeout: float = TIMEOUT) -> None:
    """Wait until the server reports at least ``n`` clients on ``channel``."""
    deadline = time.monotonic() + timeout
    seen: Any = None
    while time.monotonic() < deadline:
        seen = api(srv, "channels", {}).json()
        info = seen.get("result", {}).get("channels", {}).get(channel)
        if info and info.get("num_clients", 0) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} subscriber(s) on {channel!r}; last channels answer: {seen}")


# --------------------------------------------------------------------------- poll


def poll(
    srv: Any,
    channels: Iterable[str],
    cursor: str | None = None,
    timeout: float | str | None = None,
    client: httpx.Client | None = None,
    read_timeout: float = TIMEOUT,
) -> httpx.Response:
    params: list[tuple[str, str]] = [("channel", c) for c in channels]
    if cursor is not None:
        params.append(("cursor", cursor))
    if timeout is not None:
        params.append(("timeout", str(timeout)))
    get = client.get if client is not None else httpx.get
    return get(f"{srv.url}/poll", params=params, timeout=read_timeout)


def poll_ok(srv: Any, channels: Iterable[str], **kw: Any) -> dict[str, Any]:
    resp = poll(srv, channels, **kw)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = resp.json()
    assert isinstance(body["publications"], list), body
    assert isinstance(body["cursor"], str) and body["cursor"], body
    return body


# --------------------------------------------------------------------------- SSE


@dataclass
class Event:
    """One SSE block (the text between blank lines)."""

    id: str | None = None
    event: str | None = None
    data: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)
    raw: str = ""

    @property
    def json(self) -> Any:
        assert self.data is not None, self
        return json.loads(self.data)

    @property
    def is_ping(self) -> bool:
        """The heartbeat: ``event: ping`` with ``data: {}``."""
        return self.event == "ping"

    @property
    def is_publication(self) -> bool:
        return self.data is not None and self.event in (None, "message")


class SSEParser:
    """Incremental text/event-stream parser that keeps comments and ``retry:`` blocks."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[Event]:
        self._buf += chunk.replace(b"\r\n", b"\n")
        out = []
        while b"\n\n" in self._buf:
            block, self._buf = self._buf.split(b"\n\n", 1)
            out.append(self._parse(block.decode()))
        return out

    @staticmethod
    def _parse(block: str) -> Event:
        ev = Event(raw=block)
        data: list[str] = []
        for line in block.split("\n"):
            if line.startswith(":"):
                ev.comments.append(line[1:])
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "id":
                ev.id = value
            elif name == "event":
                ev.event = value
            elif name == "data":
                data.append(value)
            elif name == "retry":
                ev.retry = int(value)
        if data:
            ev.data = "\n".join(data)
        return ev


class SSEClient:
    """An httpx streaming client for ``GET /sse``.

    ``next()`` returns the next block of any kind; ``next_data()`` skips comments,
    ``retry:``-only blocks and heartbeats (``event: ping``); ``expect_eof()`` reads
    until the server closes the stream.
    """

    def __init__(
        self,
        srv: Any,
        channels: Iterable[str],
        last_event_id: str | None = None,
        query_last_event_id: str | None = None,
        read_timeout: float = TIMEOUT,
        extra_params: list[tuple[str, str]] | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> None:
        params = [("channel", c) for c in channels]
        if query_last_event_id is not None:
            params.append(("last_event_id", query_last_event_id))
        params += extra_params or []
        headers = {"Accept": "text/event-stream", **(extra_headers or {})}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        self.client = httpx.Client(timeout=httpx.Timeout(5.0, read=read_timeout))
        self._stream = self.client.stream("GET", f"{srv.url}/sse", params=params, headers=headers)
        self.response = self._stream.__enter__()
        self._chunks: Iterator[bytes] = self.response.iter_raw()
        self._parser = SSEParser()
        self._pending: list[Event] = []
        self.eof = False
        self.seen: list[Event] = []

    def __enter__(self) -> SSEClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stream.__exit__(None, None, None)
        self.client.close()

    def _fill(self) -> bool:
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self.eof = True
            return False
        self._pending.extend(self._parser.feed(chunk))
        return True

    def next(self) -> Event:
        while not self._pending:
            if self.eof or not self._fill():
                tail = [ev.raw[:200] for ev in self.seen[-5:]]
                raise EOFError(f"SSE stream closed after {len(self.seen)} blocks; last: {tail}")
        ev = self._pending.pop(0)
        self.seen.append(ev)
        return ev

    def next_data(self) -> Event:
        while True:
            ev = self.next()
            if ev.data is not None and not ev.is_ping:
                return ev

    def subscribed(self) -> Event:
        """Read the stream head up to the ``subscribed`` event and check its shape."""
        assert self.response.status_code == 200, self.response.read()
        ev = self.next_data()
        assert ev.event == "subscribed", ev
        assert ev.id, f"subscribed event without id: {ev}"
        body = ev.json
        assert isinstance(body["channels"], list), body
        assert isinstance(body["recovered"], bool), body
        return ev

    def publications(self, n: int) -> list[Event]:
        out = []
        while len(out) < n:
            ev = self.next_data()
            assert ev.is_publication, f"expected a publication, got {ev}"
            assert ev.id, f"publication without id: {ev}"
            out.append(ev)
        return out

    def expect_eof(self) -> list[Event]:
        """Read until the server closes the stream; returns the blocks read meanwhile."""
        got = []
        with contextlib.suppress(EOFError):
            while True:
                got.append(self.next())
        return got


def pub_json(ev: Event) -> dict[str, Any]:
    body: dict[str, Any] = ev.json
    for key in ("channel", "offset", "epoch", "data"):
        assert key in body, f"publication lacks {key!r}: {body}"
    return body


def rss_kib(srv: Any) -> int:
    """A server process's resident set in KiB, from /proc (Linux): what an attack made it hold."""
    with open(f"/proc/{srv.proc.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS line for pid {srv.proc.pid}")


def check_serving(srv: Any) -> None:
    """A normal client is served: an SSE subscriber receives a publication made via the API."""
    ch = unique_channel("alive")
    with SSEClient(srv, [ch]) as sse:
        sse.subscribed()
        res = publish(srv, ch, {"ok": True})
        (ev,) = sse.publications(1)
        body = pub_json(ev)
        assert (body["channel"], body["offset"], body["data"]) == (ch, res["offset"], {"ok": True})


# --------------------------------------------------------------------------- raw HTTP/1.1


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)


class RawConn:
    """A plain TCP connection speaking hand-written HTTP/1.1."""

    def __init__(self, srv: Any, timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection((srv.host, srv.port), timeout=timeout)
        self.rfile = self.sock.makefile("rb")

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.rfile.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def settimeout(self, t: float) -> None:
        self.sock.settimeout(t)

    def read_response(self, head: bool = False) -> RawResponse:
        line = self.rfile.readline(65536)
        if not line:
            raise EOFError("connection closed before a response")
        version, status, reason = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        assert version.startswith("HTTP/1."), line
        headers = []
        while True:
            h = self.rfile.readline(65536).decode("latin-1").rstrip("\r\n")
            if not h:
                break
            k, _, v = h.partition(":")
            headers.append((k.strip(), v.strip()))
        resp = RawResponse(int(status), reason, headers, b"")
        if head or resp.status in (204, 304) or 100 <= resp.status < 200:
            return resp
        te = (resp.header("transfer-encoding") or "").lower()
        if "chunked" in te:
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
            resp.body = body
        elif resp.header("content-length") is not None:
            resp.body = self.rfile.read(int(resp.header("content-length") or 0))
        else:
            resp.body = self.rfile.read()
        return resp

    def closed_by_peer(self, timeout: float) -> bool:
        """True if the server closes the connection within ``timeout`` (reads pending bytes).

        Reads the socket directly: bytes already buffered by ``read_response`` are not
        needed here, and a socket (unlike its file object) survives a timeout.
        """
        deadline = time.monotonic() + timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(TIMEOUT)
        return False


def request_bytes(
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    host: str = "127.0.0.1",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    hdrs = dict(headers or {})
    if body is not None:
        hdrs.setdefault("Content-Length", str(len(body)))
        hdrs.setdefault("Content-Type", "application/json")
    lines += [f"{k}: {v}" for k, v in hdrs.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def publish_request(channel: str, data: Any) -> bytes:
    return request_bytes(
        "POST", "/api/publish", json.dumps({"channel": channel, "data": data}).encode()
    )


# --------------------------------------------------------------------------- processes


class LineReader:
    """Reads a child's stdout lines on a thread so that tests can wait with a timeout."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            self._q.put(line.decode(errors="replace").rstrip("\r\n"))
        self._q.put(None)

    def next(self, timeout: float = TIMEOUT) -> str:
        try:
            line = self._q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"no output line within {timeout}s; so far: {self.lines}"
            ) from None
        if line is None:
            self._q.put(None)
            raise EOFError(f"output ended; lines so far: {self.lines}")
        self.lines.append(line)
        return line

    def until(self, pred: Any, timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.next(timeout=max(0.01, deadline - time.monotonic()))
            if pred(line):
                return line


def curl_publish(srv: Any, channel: str, data: Any) -> dict[str, Any]:
    """Publish with the curl command line, as the README does; returns the result."""
    out = subprocess.run(
        [
            "curl", "-sS", "-X", "POST", f"{srv.url}/api/publish",
            "-d", json.dumps({"channel": channel, "data": data}),
        ],
        capture_output=True, timeout=30, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout)["result"]
    return result
