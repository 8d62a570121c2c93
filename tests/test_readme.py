"""The README's quick start, run as written against a real server, so the next drift fails CI.

The README is the first page a newcomer reads (docs/quickstart.md mirrors its quick start
and is checked the same way), and its walk-through is a transcript: commands in ```sh blocks
and, in the plain block after each, what the terminal shows. This test reads those blocks in
order, starts the server with the README's own command (``./scripts/serve``, on a free port
instead of 8000), runs every walk-through command (curl, ``.venv/bin/tidings``) with the port
substituted, and compares each output with the block the README shows.

Epochs, cursors and times differ on every run ("Cursors and epochs are opaque; yours will
differ"), so they are compared by identity, not by value: each cursor is decoded (base64url
JSON of ``[[channel, epoch, offset], ...]``) and each distinct epoch becomes ``<epoch N>``,
numbered in order of appearance on each side. So the README must show the same epoch
wherever the server answers the same epoch, the offsets the server answers, and a cursor
that names the channels and offsets it really names. A README cursor used in a later command
(``cursor=``, ``Last-Event-ID:``) is replaced by the cursor the server gave at the same place.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import json
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import HOST, ServerProcess, clean_env, free_port
from helpers import LineReader, wait_subscribers

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: The documents that show the walk-through: (path, its first heading, what follows it).
WALK_THROUGHS = [
    (README, "## Quick start", "## Documentation"),
    (ROOT / "docs" / "quickstart.md", "# Quick start", "Next:"),
]
#: ./scripts/serve may first create .venv or reinstall after a pyproject.toml change.
SERVE_START_TIMEOUT = 120.0
TIMEOUT = 10.0
README_PORT = "8000"


# --------------------------------------------------------------------------- the README's blocks


@dataclass
class Block:
    """One fenced block: ``sh`` for commands, empty for what the terminal shows."""

    lang: str
    text: str
    where: str  # "README.md:42", for messages

    def lines(self) -> list[str]:
        return self.text.split("\n")[:-1]

    def commands(self) -> list[str]:
        """The command lines, each without its trailing ``# comment``."""
        return [strip_comment(line) for line in self.lines() if line.strip()]


def strip_comment(line: str) -> str:
    return re.sub(r"\s+#\s.*$", "", line).strip()


def readme_blocks(document: Path, start: str, end: str) -> list[Block]:
    text = document.read_text()
    begin = text.index(start)
    stop = text.index(end, begin)
    blocks = []
    for match in re.finditer(r"^```(\w*)\n(.*?)^```$", text[begin:stop], re.M | re.S):
        line = text.count("\n", 0, begin + match.start()) + 1
        where = f"{document.relative_to(ROOT)}:{line}"
        blocks.append(Block(match.group(1), match.group(2), where))
    return blocks


class Walk:
    """The blocks of a README section, taken in order, each checked to be what the step expects."""

    def __init__(self, blocks: list[Block]) -> None:
        self.blocks = blocks
        self.taken = 0

    def _next(self, lang: str, what: str) -> Block:
        assert self.taken < len(self.blocks), f"README has no block for {what} any more"
        block = self.blocks[self.taken]
        self.taken += 1
        assert block.lang == lang, (
            f"{block.where}: expected a {lang or 'plain'} block ({what}), found:\n{block.text}"
        )
        return block

    def commands(self, first_starts: str) -> list[str]:
        block = self._next("sh", f"commands starting with {first_starts!r}")
        commands = block.commands()
        assert commands[0].startswith(first_starts), f"{block.where}: {commands}"
        return commands

    def output(self, what: str) -> Block:
        return self._next("", what)


# --------------------------------------------------------------------------- opaque values


def decode_cursor(text: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (binascii.Error, ValueError):
        return None


_CURSOR = re.compile(r"(?<=^id: )[A-Za-z0-9_-]+$|(?<=\"cursor\":\")[A-Za-z0-9_-]+(?=\")", re.M)
_EPOCH = re.compile(r'("epoch":\s*")([^"]*)(")')
_TIME = re.compile(r'("time":\s*)\d+')
EPOCHS_HINT = "<epoch N>: the Nth distinct epoch on that side, so a number that differs "
EPOCHS_HINT += "means the document shows a new epoch where the server repeats one, or the reverse"


@dataclass
class Opaque:
    """One side's numbering of epochs, so two transcripts compare by identity, not value."""

    epochs: dict[str, int] = field(default_factory=dict)

    def epoch(self, value: str) -> str:
        return f"<epoch {self.epochs.setdefault(value, len(self.epochs) + 1)}>"

    def cursor(self, text: str) -> str:
        streams = decode_cursor(text)
        if not isinstance(streams, list) or not all(
            isinstance(s, list) and len(s) == 3 for s in streams
        ):
            return f"<not a cursor: {text}>"
        return "<cursor " + " ".join(f"{c}@{self.epoch(e)}:{o}" for c, e, o in streams) + ">"

    def abstract(self, text: str) -> tuple[str, list[str]]:
        """``text`` with its opaque values named, and the cursors it holds, in order."""
        cursors = _CURSOR.findall(text)
        text = _CURSOR.sub(lambda m: self.cursor(m.group(0)), text)
        text = _EPOCH.sub(lambda m: m.group(1) + self.epoch(m.group(2)) + m.group(3), text)
        return _TIME.sub(r"\1<time>", text), cursors


@dataclass
class Transcript:
    """The README's side and the server's side of the walk-through, compared block by block."""

    readme: Opaque = field(default_factory=Opaque)
    actual: Opaque = field(default_factory=Opaque)
    #: README cursor -> the cursor the server gave where the README shows it.
    cursors: dict[str, str] = field(default_factory=dict)

    def check(self, block: Block, actual_lines: list[str]) -> None:
        shown, shown_cursors = self.readme.abstract("\n".join(block.lines()))
        got, got_cursors = self.actual.abstract("\n".join(actual_lines))
        if shown != got:
            diff = "\n".join(
                difflib.unified_diff(
                    shown.split("\n"), got.split("\n"), "documented", "server", lineterm=""
                )
            )
            raise AssertionError(
                f"{block.where} shows what the server no longer does ({EPOCHS_HINT}):\n{diff}"
            )
        self.cursors.update(zip(shown_cursors, got_cursors, strict=True))

    def substitute(self, command: str, port: int) -> list[str]:
        """The README's command line as argv, on our port and with the server's cursors."""
        for cursor in re.findall(r"\bW1[A-Za-z0-9_-]{8,}", command):
            assert cursor in self.cursors, (
                f"README command uses a cursor it never showed: {command}"
            )
            command = command.replace(cursor, self.cursors[cursor])
        return shlex.split(command.replace(f"localhost:{README_PORT}", f"localhost:{port}"))


# --------------------------------------------------------------------------- processes


def run(argv: list[str], env: dict[str, str]) -> list[str]:
    """Run a command that ends by itself; its standard output lines."""
    done = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, f"{argv} exited {done.returncode}: {done.stderr}"
    return done.stdout.rstrip("\n").split("\n")


def read_lines(reader: LineReader, n: int) -> list[str]:
    """Up to ``n`` lines; fewer if the stream ends or stalls, so the diff shows what is missing."""
    lines: list[str] = []
    try:
        while len(lines) < n:
            lines.append(reader.next())
    except (AssertionError, EOFError):
        pass
    return lines


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl-C, as the README says."""
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=TIMEOUT)


def wait_until_listening(srv: ServerProcess) -> None:
    deadline = time.monotonic() + SERVE_START_TIMEOUT
    while time.monotonic() < deadline:
        assert srv.alive(), f"./scripts/serve exited; log:\n{srv.logs()}"
        try:
            if httpx.get(f"{srv.url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"./scripts/serve not listening after {SERVE_START_TIMEOUT}s")


@pytest.fixture
def serve(
    spawn: Callable[..., subprocess.Popen[bytes]], tmp_path: Path
) -> Iterator[Callable[..., ServerProcess]]:
    """Start the server with the README's command, on a free port; its log is checked after."""
    started: list[ServerProcess] = []

    def start(command: str, *extra: str) -> ServerProcess:
        port = free_port()
        log_path = tmp_path / f"serve{len(started)}.log"
        argv = [*shlex.split(command), "--port", str(port), *extra]
        argv += shlex.split(os.environ.get("TIDINGS_TEST_SERVER_ARGS", ""))
        with open(log_path, "wb") as log:
            proc = spawn(argv, cwd=ROOT, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
        srv = ServerProcess(proc, HOST, port, log_path)
        started.append(srv)
        wait_until_listening(srv)
        return srv

    yield start
    for srv in started:
        assert "Traceback" not in srv.logs(), srv.logs()


def spawn_output(
    spawn: Callable[..., subprocess.Popen[bytes]], argv: list[str], env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], LineReader]:
    proc = spawn(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return proc, LineReader(proc)


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize(
    ("document", "start", "end"),
    WALK_THROUGHS,
    ids=[str(d.relative_to(ROOT)) for d, *_ in WALK_THROUGHS],
)
def test_quick_start_and_curl_walk_through_show_what_the_server_answers(
    serve: Callable[..., ServerProcess],
    spawn: Callable[..., subprocess.Popen[bytes]],
    document: Path,
    start: str,
    end: str,
) -> None:
    walk = Walk(readme_blocks(document, start, end))
    text = document.read_text().split(start, 1)[1].split(end, 1)[0]
    transcript = Transcript()

    serve_command, test_command = walk.commands("./scripts/serve")
    assert serve_command == "./scripts/serve" and test_command == "./scripts/test"
    assert "http://127.0.0.1:8000" in text
    srv = serve(serve_command)
    env = clean_env({"TIDINGS_URL": srv.url})

    def argv(command: str) -> list[str]:
        return transcript.substitute(command, srv.port)

    # Watch a channel over SSE, then publish to it with curl.
    [watch] = walk.commands("curl -N")
    sse, sse_out = spawn_output(spawn, argv(watch), env)
    subscribed = walk.output("the SSE stream's first lines")
    transcript.check(subscribed, read_lines(sse_out, len(subscribed.lines())))
    [publish] = walk.commands("curl -X POST")
    transcript.check(walk.output("the publish answer"), run(argv(publish), env))
    delivered = walk.output("the publication on the SSE stream")
    transcript.check(delivered, read_lines(sse_out, len(delivered.lines())))

    # Long-polling: a cursor first, then a request held until the next publication.
    [ask] = walk.commands("curl 'localhost")
    transcript.check(walk.output("the first poll answer"), run(argv(ask), env))
    [wait] = walk.commands("curl 'localhost")
    assert "timeout=30" in wait
    held, held_out = spawn_output(spawn, argv(wait), env)
    again = re.search(r"publish `(\{.*?\})` from the other terminal", text)
    assert again is not None, "README no longer says what to publish during the long-poll"
    publish_again = publish.replace('{"text":"hello"}', again.group(1))
    assert publish_again != publish
    run(argv(publish_again), env)
    transcript.check(walk.output("the long-poll answer"), [held_out.next()])
    held.wait(timeout=TIMEOUT)

    # Polling: the same request with timeout=0 answers at once.
    [poll_now] = walk.commands("curl 'localhost")
    assert "timeout=0" in poll_now
    transcript.check(walk.output("the poll answer"), run(argv(poll_now), env))

    # Resume: stop the SSE stream, publish twice, reconnect with the last id seen.
    stop(sse)
    *missed, resume = walk.commands("curl -X POST")
    for command in missed:
        run(argv(command), env)
    assert "Last-Event-ID" in resume
    _resumed, resumed_out = spawn_output(spawn, argv(resume), env)
    replay = walk.output("the resumed SSE stream")
    transcript.check(replay, read_lines(resumed_out, len(replay.lines())))

    # The command-line clients.
    subscribe_command, publish_command = walk.commands(".venv/bin/tidings subscribe")
    _subscriber, subscriber_out = spawn_output(spawn, argv(subscribe_command), env)
    wait_subscribers(srv, "news", n=2)  # the resumed curl and this subscriber
    printed = re.search(r"# prints (\{.*\})", text)
    assert printed is not None, "README no longer shows what tidings publish prints"
    shown = Block("", printed.group(1) + "\n", walk.blocks[walk.taken - 1].where)
    transcript.check(shown, run(argv(publish_command), env))
    transcript.check(walk.output("what tidings subscribe prints"), [subscriber_out.next()])
    assert walk.taken == len(walk.blocks), f"README blocks not checked: {walk.blocks[walk.taken :]}"


def test_demo_flag_serves_the_demo_page(serve: Callable[..., ServerProcess]) -> None:
    """The README's "./scripts/serve --demo ... open /demo": the page is served."""
    assert "`./scripts/serve --demo`" in README.read_text()
    srv = serve("./scripts/serve", "--demo")
    resp = httpx.get(f"{srv.url}/demo", timeout=TIMEOUT)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    # The page's client module (the shared-connection wrapper of tidings.js) is served too.
    module = re.search(r'import \{ Tidings \} from "(/[\w.-]+\.js)"', resp.text)
    assert module is not None, "the demo page no longer imports the client"
    script = httpx.get(f"{srv.url}{module.group(1)}", timeout=TIMEOUT)
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]


# --------------------------------------------------------------------------- links


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a page: lower case, punctuation dropped,
    spaces as hyphens, a repeated heading numbered (``-1``, ``-2``)."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", without_code(markdown), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def without_code(markdown: str) -> str:
    return re.sub(r"^```.*?^```$", "", markdown, flags=re.M | re.S)


def test_every_relative_link_in_the_docs_leads_somewhere() -> None:
    """A page moved or a heading renamed (benchmarks.md split from its results, say)
    must not leave a link to nowhere."""
    pages = [README, ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md"]
    pages += sorted((ROOT / "docs").glob("*.md"))
    checked, broken = 0, []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", without_code(page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            checked += 1
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and anchor not in heading_anchors(linked.read_text()):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert checked > 50, checked
    assert broken == []
