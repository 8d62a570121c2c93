"""Outputs shown in docs/ are what the server prints today.

Each test reads a block or line out of a document and compares it with what a
running ``tidings`` answers, so that the next change to either makes CI fail
instead of leaving a page that lies (issue 11, item 7: reviewers found docs
showing ``null`` where check-config prints values, a presence error text the
server never sends, a flags line without ``--demo``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect

from conftest import clean_env
from tidings import frames
from tidings.errors import BrokerUnavailable, DisconnectCode, ErrorCode, ProtocolError
from tidings.http.messages import error_response

DOCS = Path(__file__).resolve().parent.parent / "docs"
TIDINGS = [sys.executable, "-m", "tidings"]
TIMEOUT = 10.0


def run_tidings(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        TIDINGS + args,
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(env),
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


def code_block_after(document: str, heading: str) -> list[str]:
    """The lines of the first fenced block after ``heading`` in ``docs/document``."""
    text = (DOCS / document).read_text()
    start = text.index(heading)
    match = re.search(r"```[a-z]*\n(.*?)```", text[start:], re.DOTALL)
    assert match is not None, f"no code block after {heading!r} in {document}"
    return match.group(1).splitlines()


def test_configuration_error_lines_are_what_check_config_prints(tmp_path: Path) -> None:
    """Every line of configuration.md's Errors block, produced by the input it implies."""
    documented = code_block_after("configuration.md", "## Errors")
    cases: list[tuple[str | None, dict[str, str]]] = [
        ('[limits]\nmax_body_size = "big"\n', {}),
        (None, {"TIDINGS_PORT": "abc"}),
        (None, {"TIDINGS_AUTH__LEEWAY": "abc"}),
        ("bogus = 1\n", {}),
        ('[namespaces.chat]\nsubscribe = "bogus"\n', {}),
        ("port = = 8000\n", {}),
        (None, {"TIDINGS_NOPE": "1"}),
    ]
    printed = []
    for toml, env in cases:
        args = ["check-config"]
        if toml is not None:
            (tmp_path / "tidings.toml").write_text(toml)
            args += ["--config", "tidings.toml"]
        out = run_tidings(args, tmp_path, env)
        assert out.returncode == 2, out.stderr
        printed.append(out.stderr.strip())
    out = run_tidings(["check-config", "--config", "nope.toml"], tmp_path)
    assert out.returncode == 2, out.stderr
    printed.append(out.stderr.strip())
    assert printed == documented


def test_check_config_shows_the_resolved_policies_security_md_describes(tmp_path: Path) -> None:
    """security.md §6: unset subscribe/publish print as the secure mode's defaults."""
    section = (DOCS / "security.md").read_text().split("## 6. Check the configuration")[1]
    assert '`"subscribe": "authenticated"` and `"publish": "nobody"` in secure mode' in section
    (tmp_path / "tidings.toml").write_text(
        '[auth]\nhmac_secret = "a-secret-of-thirty-two-characters"\n[namespaces.chat]\n'
    )
    out = run_tidings(["check-config", "--config", "tidings.toml"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "tidings: configuration is valid (secure: HS256 mode)"
    settings = json.loads(out.stdout)
    for policy in (settings["channels"], settings["namespaces"]["chat"]):
        assert (policy["subscribe"], policy["publish"]) == ("authenticated", "nobody")


def test_flags_line_lists_every_serve_flag(tmp_path: Path) -> None:
    documented = " ".join(code_block_after("configuration.md", "## Flags"))
    help_text = run_tidings(["serve", "--help"], tmp_path).stdout
    flags = set(re.findall(r"\[(--[a-z-]+)", help_text))
    assert {"--port", "--demo"} <= flags, help_text
    assert sorted(f for f in flags if f not in documented) == []


def test_websocket_presence_error_is_what_the_server_answers(server: Any) -> None:
    """websocket.md's presence example: error 108 where presence is off."""
    text = (DOCS / "websocket.md").read_text()
    match = re.search(r'^< \{"id":10,"error":(\{.*\})\}$', text, re.MULTILINE)
    assert match is not None, "websocket.md lost its presence error example"
    documented = json.loads(match.group(1))
    with connect(f"{server.ws_url}/connection/websocket", open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps({"id": 1, "connect": {}}))
        ws.recv(timeout=TIMEOUT)
        ws.send(json.dumps({"id": 10, "presence": {"channel": "news:today"}}))
        reply = json.loads(ws.recv(timeout=TIMEOUT))
    assert reply == {"id": 10, "error": documented}


def test_server_api_405_allow_header_is_documented(server: Any) -> None:
    text = (DOCS / "server-api.md").read_text()
    match = re.search(r"^\| 405 .*`Allow: ([A-Z, ]+)`", text, re.MULTILINE)
    assert match is not None, "server-api.md lost its 405 row"
    resp = httpx.get(f"{server.url}/api/publish", timeout=TIMEOUT)
    assert resp.status_code == 405
    assert resp.headers["Allow"] == match.group(1)


def test_server_api_refuses_undeclared_namespaces_as_documented(server_factory: Any) -> None:
    """server-api.md: once a namespace is declared, publish/history answer 102 too."""
    text = (DOCS / "server-api.md").read_text()
    assert "every method answers\nerror 102 (`unknown namespace 'nowhere'`)" in text
    srv = server_factory("[namespaces.chat]\n")
    for method, params in (
        ("publish", {"channel": "nowhere:x", "data": {}}),
        ("history", {"channel": "nowhere:x"}),
        ("presence", {"channel": "nowhere:x"}),
    ):
        resp = httpx.post(f"{srv.url}/api/{method}", json=params, timeout=TIMEOUT)
        assert resp.json() == {"error": {"code": 102, "message": "unknown namespace 'nowhere'"}}
    resp = httpx.post(
        f"{srv.url}/api/broadcast",
        json={"channels": ["nowhere:x", "chat:a"], "data": {}},
        timeout=TIMEOUT,
    )
    first, second = resp.json()["result"]["responses"]
    assert first == {"error": {"code": 102, "message": "unknown namespace 'nowhere'"}}
    assert "result" in second


# --------------------------------------------------------------------------- code tables
#
# The error and close codes the docs list, against tidings.errors (the one place they are
# defined): each documented code exists there under the documented name, the HTTP status
# beside it is the one the server answers for it, and every code the server defines is
# documented -- in a table, or in websocket.md's list of codes it never sends.


def markdown_tables(document: str, section: str) -> list[list[list[str]]]:
    """The tables of ``## section`` in ``docs/document``: rows of cells, without the header."""
    text = (DOCS / document).read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    tables: list[list[list[str]]] = []
    rows: list[list[str]] = []
    for line in [*body.split("\n"), ""]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            tables.append(rows[2:])
            rows = []
    return tables


def same_name(enum_name: str, documented: str) -> bool:
    """``INVALID_DATA`` is "invalid payload data", ``METHOD_NOT_FOUND`` "not found": one
    name's words appear, in order, in the other's."""

    def within(short: list[str], long: list[str]) -> bool:
        rest = iter(long)
        return all(word in rest for word in short)

    ours = enum_name.lower().split("_")
    theirs = re.findall(r"[a-z]+", documented.lower())
    return bool(theirs) and (within(ours, theirs) or within(theirs, ours))


def numbered_names(text: str) -> dict[int, str]:
    """``"100 internal, 101 unauthorized, ..."`` as ``{100: "internal", ...}``."""
    flat = " ".join(text.split())
    return {int(n): name.strip() for n, name in re.findall(r"\b(\d{3}) ([a-z][a-z ]*)", flat)}


def never_sent() -> set[int]:
    """The codes websocket.md says tidings defines (Centrifugo's numbering) but never sends."""
    section = (DOCS / "websocket.md").read_text().split("\n## Not supported yet\n", 1)[1]
    match = re.search(r"^- close codes ([^;]*?), and errors ([^:;]*?):", section, re.M)
    assert match is not None, "websocket.md lost its list of codes never sent"
    codes: set[int] = set()
    for first, last in re.findall(r"(\d{3,4})(?:–(\d{3,4}))?", " ".join(match.groups())):
        codes.update(range(int(first), int(last or first) + 1))
    return codes


def test_websocket_error_table_names_codes_as_tidings_errors_does() -> None:
    [errors, closes] = markdown_tables("websocket.md", "Codes")
    for code, meaning in errors:
        name = re.split(r"[:(]", meaning)[0]
        assert int(code) in set(ErrorCode), f"websocket.md documents error {code}: no such code"
        assert same_name(ErrorCode(int(code)).name, name), (code, meaning)
    rfc6455 = {
        c: n.removeprefix("CLOSE_") for n, c in vars(frames).items() if n.startswith("CLOSE_")
    }
    for code, reason, _when in closes:
        name = DisconnectCode(int(code)).name if int(code) in set(DisconnectCode) else None
        name = name or rfc6455.get(int(code))
        assert name is not None, f"websocket.md documents close code {code}: no such code"
        assert same_name(name, reason), (code, reason)


def test_http_error_tables_pair_each_code_with_the_status_the_server_answers() -> None:
    tables = [
        *markdown_tables("http-transports.md", "Tokens"),
        *markdown_tables("server-api.md", "Requests and answers"),
    ]
    rows = [(row[0], row[1]) for table in tables for row in table if row[1].isdigit()]
    [statuses] = markdown_tables("http-transports.md", "Errors")
    rows += [
        (status, code) for status, when in statuses for code in re.findall(r"\((\d{3})\)", when)
    ]
    assert len(rows) >= 15, rows
    for status, code in rows:
        assert int(code) in set(ErrorCode), f"{status} {code}: no such error code"
        # The HTTP layer's one mapping: an error's status, or the code of a status it answers.
        # Code 100 answered 503 is the one temporary internal error, the broker's.
        temporary = (status, code) == ("503", str(int(ErrorCode.INTERNAL)))
        error = BrokerUnavailable("docs") if temporary else ProtocolError(ErrorCode(int(code)))
        by_error = error_response(error).status
        by_status = json.loads(error_response(int(status)).body)["error"]["code"]
        assert int(status) == by_error or int(code) == by_status, (status, code)


def test_prose_code_lists_name_codes_as_tidings_errors_does() -> None:
    lists = [
        (DOCS / "server-api.md").read_text().split("Error codes use Centrifugo's numbering:")[1],
        (DOCS / "http-transports.md").read_text().split("`code` uses Centrifugo's numbering")[1],
    ]
    for text in lists:
        named = numbered_names(text.split(";")[0].split(".\n")[0])
        assert len(named) >= 7, named
        for code, name in named.items():
            assert same_name(ErrorCode(code).name, name), (code, name)


def test_every_code_tidings_defines_is_documented() -> None:
    [errors, closes] = markdown_tables("websocket.md", "Codes")
    http = [
        *markdown_tables("http-transports.md", "Tokens"),
        *markdown_tables("server-api.md", "Requests and answers"),
    ]
    documented = {int(row[0]) for row in errors + closes}
    documented |= {int(row[1]) for table in http for row in table if row[1].isdigit()}
    silent = never_sent()
    assert not silent & documented, f"documented as sent and as never sent: {silent & documented}"
    for code in [*ErrorCode, *DisconnectCode]:
        assert int(code) in documented | silent, f"{int(code)} {code.name} is not documented"


def test_configuration_keys_block_is_every_key_with_its_default() -> None:
    """configuration.md's "complete file with the defaults" is exactly the
    defaults: every key of the configuration tree, each with its value (a key
    whose default is unset is named in a ``# key, key: unset`` comment)."""
    import tomllib

    import msgspec

    from tidings.config import Config

    block = "\n".join(code_block_after("configuration.md", "## Keys"))
    documented = tomllib.loads(block)
    defaults = msgspec.to_builtins(Config())
    unset: set[str] = set()
    section = ""
    for line in block.splitlines():
        if line.startswith("["):
            section = line.split("]")[0].strip("[") + "."
        elif line.startswith("# ") and ": unset" in line:
            names = line[2:].split(":")[0]
            unset.update(section + name.strip() for name in names.split(","))

    def leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            if isinstance(value, dict) and value and key != "static_headers":
                out.update(leaves(value, f"{prefix}{key}."))
            else:
                out[prefix + key] = value
        return out

    expected = {k: v for k, v in leaves(defaults).items() if k != "namespaces"}
    shown = leaves(documented)
    for key, value in expected.items():
        if value is None:
            assert key in unset, f"{key}: unset by default, not named as unset in the block"
        else:
            assert key in shown, f"{key} is missing from configuration.md's defaults block"
            assert shown[key] == value, (
                f"{key}: the block says {shown[key]!r}, the default is {value!r}"
            )
    assert not set(shown) - set(expected), f"keys that do not exist: {set(shown) - set(expected)}"
