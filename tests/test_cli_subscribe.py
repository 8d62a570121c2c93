"""``tidings subscribe``: a tail of channels on every transport, as a user runs it.

The command runs as a child process (``python -m tidings subscribe``) against a
``tidings serve`` process; publications are made with the server API. What it
promises: one line per publication (``CHANNEL DATA``, or ``--json`` the whole
publication), resumed from ``--cursor`` on any transport, Ctrl-C ends it with
status 0 and nothing on stderr, a refusal or an unreachable server is one
clear ``tidings: ...`` line and status 1, a usage error status 2.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from conftest import ServerProcess, clean_env, free_port
from helpers import TIMEOUT, LineReader, publish, unique_channel
from tidings.client import encode_cursor

TIDINGS = [sys.executable, "-m", "tidings"]
TRANSPORTS = ["ws", "sse", "longpoll", "poll"]

Spawn = Callable[..., "subprocess.Popen[bytes]"]


def start(spawn: Spawn, *args: str) -> subprocess.Popen[bytes]:
    return spawn(
        [*TIDINGS, "subscribe", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )


def cursor_after(srv: ServerProcess, channel: str) -> str:
    """A cursor standing after a publication made now: the tail starts there on any
    transport, so nothing published afterwards can be missed while it connects."""
    head = publish(srv, channel, "before")
    return encode_cursor({channel: (head["epoch"], head["offset"])})


def interrupt(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    """Ctrl-C, as a user at a terminal; returns the exit status and stderr."""
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, stderr.decode()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_one_line_per_publication_and_ctrl_c_exits_0(
    server: ServerProcess, spawn: Spawn, transport: str
) -> None:
    channel = unique_channel(f"cli-{transport}-")
    proc = start(
        spawn, channel, "--transport", transport, "--cursor", cursor_after(server, channel),
        "--url", server.url,
    )  # fmt: skip
    lines = LineReader(proc)
    publish(server, channel, {"text": "hi"})
    publish(server, channel, "plain")
    assert [lines.next(), lines.next()] == [f'{channel} {{"text":"hi"}}', f'{channel} "plain"']
    assert interrupt(proc) == (0, "")


@pytest.mark.parametrize("transport", ["ws", "longpoll"])
def test_json_prints_the_whole_publication(
    server: ServerProcess, spawn: Spawn, transport: str
) -> None:
    a, b = unique_channel("a"), unique_channel("b")
    ca, cb = cursor_after(server, a), cursor_after(server, b)
    # One cursor for both channels, as the server's codec writes it.
    from tidings.client import decode_cursor

    both = encode_cursor({**decode_cursor(ca), **decode_cursor(cb)})
    proc = start(spawn, a, b, "--json", "--transport", transport, "--cursor", both,
                 "--url", server.url)  # fmt: skip
    lines = LineReader(proc)
    sent = [publish(server, a, {"n": 1}), publish(server, b, {"n": 2})]
    got: list[dict[str, Any]] = [json.loads(lines.next()) for _ in range(2)]
    assert sorted((p["channel"], p["offset"], p["epoch"], p["data"]) for p in got) == [
        (a, sent[0]["offset"], sent[0]["epoch"], {"n": 1}),
        (b, sent[1]["offset"], sent[1]["epoch"], {"n": 2}),
    ]
    assert interrupt(proc) == (0, "")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_refusal_is_one_line_and_status_1(
    server_factory: Callable[..., ServerProcess], spawn: Spawn, transport: str
) -> None:
    srv = server_factory(config='[auth]\nhmac_secret = "a-secret-long-enough-for-hs256-tokens"\n')
    proc = start(spawn, "private", "--transport", transport, "--url", srv.url)
    _, stderr = proc.communicate(timeout=TIMEOUT * 2)
    assert proc.returncode == 1, stderr
    assert stderr.decode().startswith("tidings: error 103: "), stderr
    assert b"Traceback" not in stderr


def test_an_unreachable_server_is_status_1(spawn: Spawn) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    proc = start(spawn, "news", "--url", url)
    _, stderr = proc.communicate(timeout=TIMEOUT * 2)
    assert proc.returncode == 1
    assert stderr.decode().startswith(f"tidings: cannot subscribe at {url}: "), stderr


def test_usage_errors_are_status_2(server: ServerProcess, spawn: Spawn) -> None:
    bad_cursor = start(spawn, "news", "--cursor", "not-a-cursor", "--url", server.url)
    _, stderr = bad_cursor.communicate(timeout=TIMEOUT * 2)
    assert (bad_cursor.returncode, stderr.decode()) == (2, "tidings: --cursor: malformed cursor\n")
    bad_transport = start(spawn, "news", "--transport", "pigeon", "--url", server.url)
    _, stderr = bad_transport.communicate(timeout=TIMEOUT * 2)
    assert bad_transport.returncode == 2 and b"invalid choice: 'pigeon'" in stderr
