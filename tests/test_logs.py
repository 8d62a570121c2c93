"""Logs made for production (issue 15, item 3), read from a real ``tidings serve``.

* ``--log-format json``: every line the server writes is one JSON object with
  time (RFC 3339, UTC), level, logger and message, and the fields the call site
  gives (client, user, transport, channel, code).
* A client's mistakes (a bad token, a bad frame, a refused subscription) are
  logged below ERROR, without a traceback, and carry those fields.
* ``--access-log``: one line per HTTP answer on ``tidings.access`` with method,
  path (credentials masked), status, the bytes written, duration and peer.
* The library configures no logging at import; logger names follow the modules.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from conftest import ServerProcess
from helpers import api, publish, request_bytes, unique_channel
from tidings.logs import FIELDS, JSONFormatter, redact_target

SECRET = "test-secret-for-the-log-tests-0123456789"
CONFIG = f"""
[auth]
hmac_secret = "{SECRET}"

[namespaces.private]
subscribe = "token"
"""
TIMEOUT = 10.0
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
SRC = Path(__file__).resolve().parent.parent / "src" / "tidings"


def token(user: str) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


def json_lines(srv: ServerProcess) -> list[dict[str, Any]]:
    """Every line of the server's output, each parsed as JSON (a line that is not fails)."""
    records = []
    for number, line in enumerate(srv.logs().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"line {number} is not JSON: {line!r}") from None
        assert isinstance(record, dict), line
        records.append(record)
    return records


def wait_record(
    srv: ServerProcess, match: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """The first JSON line ``match`` accepts, waiting (bounded) for it to be written."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        for record in json_lines(srv):
            if match(record):
                return record
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line for {what}:\n{srv.logs()}")
        time.sleep(0.05)


def wait_held_polls(srv: ServerProcess, n: int) -> None:
    """Wait (bounded) until the server holds ``n`` long-polls (its info says so)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        node = api(srv, "info").json()["result"]["nodes"][0]
        if node["clients_by_transport"].get("longpoll", 0) >= n:
            return
        assert time.monotonic() < deadline, f"no {n} held long-poll(s): {node}"
        time.sleep(0.05)


def ws_url(srv: ServerProcess) -> str:
    return srv.ws_url + "/connection/websocket"


def closed_with(send: list[str]) -> Callable[[ServerProcess], int]:
    """A client (the websockets library) that sends ``send`` and returns the close code."""

    def run(srv: ServerProcess) -> int:
        with connect(ws_url(srv), open_timeout=TIMEOUT) as ws:
            for message in send:
                ws.send(message)
            try:
                while True:
                    ws.recv(timeout=TIMEOUT)
            except ConnectionClosed as closed:
                assert closed.rcvd is not None
                return closed.rcvd.code
        raise AssertionError("unreachable")

    return run


# ---------------------------------------------------------------------------- JSON lines


def test_json_lines_parse_and_client_errors_are_below_error_with_their_fields(
    server_factory: Callable[..., ServerProcess],
) -> None:
    srv = server_factory(CONFIG, args=["--log-format", "json", "--log-level", "debug"])

    # A bad token: closed with 3500, one INFO line with the transport and the code.
    bad_token = json.dumps({"id": 1, "connect": {"token": "not-a-jwt"}})
    assert closed_with([bad_token])(srv) == 3500
    refused = wait_record(
        srv, lambda r: r.get("code") == 3500, "the connection refused for its token"
    )
    assert refused["level"] == "INFO" and refused["logger"] == "tidings.centrifuge.session"
    assert refused["transport"] == "websocket" and "invalid token" in refused["message"]

    # A frame that is not JSON: the bad-request close, logged with its code.
    assert closed_with(["{not json"])(srv) == 3501
    bad_frame = wait_record(
        srv, lambda r: r.get("code") == 3501 and "bad frame" in r["message"], "the bad frame"
    )
    assert bad_frame["level"] == "INFO" and bad_frame["transport"] == "websocket"

    # A connected user refused a channel: client, user and channel are fields.
    channel = f"private:{unique_channel()}"
    with connect(ws_url(srv), open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps({"id": 1, "connect": {"token": token("ann")}}))
        client = json.loads(ws.recv(timeout=TIMEOUT))["connect"]["client"]
        ws.send(json.dumps({"id": 2, "subscribe": {"channel": channel, "token": "forged"}}))
        reply = json.loads(ws.recv(timeout=TIMEOUT))
        assert reply["error"]["code"] == 103, reply
    subscribe = wait_record(srv, lambda r: r.get("channel") == channel, "the refused subscribe")
    assert (subscribe["level"], subscribe["client"], subscribe["user"]) == ("INFO", client, "ann")
    assert (subscribe["transport"], subscribe["code"]) == ("websocket", 103)

    # Connect and disconnect, at DEBUG, with the client's fields.
    connected = wait_record(
        srv, lambda r: r.get("client") == client and "connected as" in r["message"], "connect"
    )
    assert (connected["level"], connected["user"]) == ("DEBUG", "ann")
    left = wait_record(
        srv, lambda r: r.get("client") == client and "disconnected" in r["message"], "disconnect"
    )
    assert (left["level"], left["code"]) == ("DEBUG", 3000)

    records = json_lines(srv)
    for record in records:
        assert RFC3339_UTC.match(record["time"]), record
        assert {"time", "level", "logger", "message", "pid"} <= record.keys(), record
        assert record["pid"] == srv.proc.pid
        assert set(record) <= {"time", "level", "logger", "message", "pid", *FIELDS}, record
    assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL")], srv.logs()
    assert "Traceback" not in srv.logs()


def test_text_is_the_default_format(server_factory: Callable[..., ServerProcess]) -> None:
    srv = server_factory()
    first = srv.logs().splitlines()[0]
    assert not first.startswith("{") and " tidings.server: " in first, first


# ---------------------------------------------------------------------------- access log


def raw_exchange(srv: ServerProcess, request: bytes) -> tuple[bytes, tuple[str, int]]:
    """Send ``request``, read the whole answer until the server closes; the answer's
    bytes and our own address (the peer the server logs)."""
    with socket.create_connection((srv.host, srv.port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        host, port = sock.getsockname()[:2]
        return b"".join(chunks), (host, port)


def test_access_log_line_per_answer_without_credentials(
    server_factory: Callable[..., ServerProcess],
) -> None:
    srv = server_factory(CONFIG, args=["--log-format", "json", "--access-log"])
    credential = token("bob")
    channel = unique_channel()
    target = f"/poll?channel={channel}&token={credential}&timeout=0"
    answer, (host, port) = raw_exchange(
        srv, request_bytes("GET", target, headers={"Connection": "close"})
    )
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    line = wait_record(srv, lambda r: r.get("peer") == f"{host}:{port}", "the access line")
    assert (line["level"], line["logger"]) == ("INFO", "tidings.access")
    assert (line["method"], line["status"]) == ("GET", 200)
    assert line["path"] == f"/poll?channel={channel}&token=***&timeout=0"
    assert line["bytes"] == len(answer)
    assert isinstance(line["duration"], float) and line["duration"] >= 0
    assert credential not in srv.logs()

    # A held long-poll: its line is written when the publication answers it.
    cursor = json.loads(answer.partition(b"\r\n\r\n")[2])["cursor"]
    held = f"/poll?channel={channel}&cursor={cursor}&timeout=60&token="
    with socket.create_connection((srv.host, srv.port), timeout=TIMEOUT) as sock:
        sock.sendall(request_bytes("GET", held + credential, headers={"Connection": "close"}))
        wait_held_polls(srv, 1)
        publish(srv, channel, {"n": 1})
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        answer = b"".join(chunks)
        host, port = sock.getsockname()[:2]
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"n":1' in answer, answer
    line = wait_record(srv, lambda r: r.get("peer") == f"{host}:{port}", "the held poll's line")
    assert (line["method"], line["path"], line["status"]) == ("GET", held + "***", 200)
    assert line["bytes"] == len(answer)

    # Unparsable bytes: a line too, with what is known ("-"), and the 400 written.
    answer, (host, port) = raw_exchange(srv, b"NOT HTTP AT ALL\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    refused = wait_record(
        srv, lambda r: r.get("peer") == f"{host}:{port}", "the access line of the 400"
    )
    assert (refused["method"], refused["path"], refused["status"]) == ("-", "-", 400)
    assert refused["bytes"] == len(answer)

    # A stream is logged when the socket is handed to it: a WebSocket upgrade's 101.
    with connect(ws_url(srv) + "?token=" + credential, open_timeout=TIMEOUT):
        pass
    upgrade = wait_record(srv, lambda r: r.get("status") == 101, "the upgrade's line")
    assert upgrade["path"] == "/connection/websocket?token=***"
    assert credential not in srv.logs()


def test_no_access_log_by_default(server_factory: Callable[..., ServerProcess]) -> None:
    srv = server_factory(args=["--log-format", "json"])
    assert httpx.get(srv.url + "/health", timeout=TIMEOUT).status_code == 200
    # The line the server logs after the request: the request's line, had there been
    # one, was written before it.
    httpx.post(srv.url + "/api/publish", content=b"{not json", timeout=TIMEOUT)
    wait_record(srv, lambda r: r["logger"] == "tidings.api", "the API's refusal")
    assert not [r for r in json_lines(srv) if r["logger"] == "tidings.access"], srv.logs()


# ---------------------------------------------------------------------------- units


def test_json_formatter_keeps_a_record_on_one_line() -> None:
    formatter = JSONFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "tidings.x", logging.WARNING, __file__, 1, "a\nb %s", ("c\nd",), sys.exc_info()
        )
    record.channel = "chat:1"
    record.user = None  # a field the call site left empty is left out
    line = formatter.format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["message"] == "a\nb c\nd" and parsed["channel"] == "chat:1"
    assert "user" not in parsed and "ValueError: boom" in parsed["exception"]
    assert RFC3339_UTC.match(parsed["time"]) and parsed["level"] == "WARNING"


@pytest.mark.parametrize(
    ("target", "logged"),
    [
        (b"/sse?channel=a&token=x.y.z", "/sse?channel=a&token=***"),
        (b"/poll?sub_token=abc&channel=b", "/poll?sub_token=***&channel=b"),
        (b"/x?API_KEY=k&password=p&ok=1", "/x?API_KEY=***&password=***&ok=1"),
        (b"/plain/path", "/plain/path"),
        (b"/a?c=\x1b[2J", "/a?c=\\x1b[2J"),
    ],
)
def test_credentials_and_control_characters_never_reach_the_access_log(
    target: bytes, logged: str
) -> None:
    assert redact_target(target) == logged


def test_importing_the_library_configures_no_logging() -> None:
    code = (
        "import logging, tidings, tidings.server, tidings.app, tidings.cli, tidings.logs\n"
        "root = logging.getLogger()\n"
        "assert not root.handlers and root.level == logging.WARNING, root\n"
        "for name, logger in logging.root.manager.loggerDict.items():\n"
        "    if name.startswith('tidings') and isinstance(logger, logging.Logger):\n"
        "        assert logger.level == logging.NOTSET and not logger.handlers, name\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "ok", run.stderr


def test_logger_names_follow_the_modules() -> None:
    """Every ``logging.getLogger(...)`` in the package is named by ``__name__`` (or a
    child of it), so a logger's name says which module wrote the line — except
    the access log's own ``tidings.access``, the filter on httpx's logger, and the
    command line's handler on the client package's logger (``tidings.client``: its
    modules log under it)."""
    allowed = {"tidings.access", "httpx", "tidings.client"}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "getLogger"
                and node.args
            ):
                continue
            arg = node.args[0]
            source = ast.unparse(arg)
            by_module = source == "__name__" or (
                isinstance(arg, ast.JoinedStr) and source.startswith("f'{__name__}.")
            )
            literal = isinstance(arg, ast.Constant) and arg.value in allowed
            assert by_module or literal, f"{path}:{node.lineno}: getLogger({source})"
