"""docs/architecture.md stays true to the tree, and the tree keeps the shape it describes.

The document is the map a new engineer reads first, so a stale entry is worse
than none: every file path it names must exist, every ``tidings.module.Name``
it names must import, every relative link must resolve, its layout table must
have exactly one row per module of ``src/tidings/`` (a new module without a row
fails here), and the transport its recipe prints must serve a subscriber. The
import graph checks hold the code to the layout the document draws: imports
point down the layers of the table, there is no cycle, and only the
composition roots import ``tidings.server``.

Pure Python: no server process. The recipe's transport is served in process,
on loopback, to an httpx client."""

from __future__ import annotations

import ast
import asyncio
import importlib
import importlib.util
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from tidings.config import load_config
from tidings.server import Server

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
PACKAGE = ROOT / "src" / "tidings"

#: The modules that may build a ``Server``: ``tidings.Tidings`` (the Python
#: API, which the CLI and each ``--workers`` process run), the CLI and its
#: supervisor, and ``tidings.asgi`` (a server run by an ASGI server). The
#: version lives in ``tidings.version``, which core modules
#: import, so that none imports the package's ``__init__`` (the public names,
#: which build on the server). Every other module gets its dependencies
#: passed in (issue 11, item 1).
COMPOSITION_ROOTS = {"tidings.app", "tidings.asgi", "tidings.cli", "tidings.workers"}

# `tidings.hub.Hub.subscribe` or `tidings.hub.Hub.subscribe()`: a dotted code reference.
_REFERENCE = re.compile(r"`(tidings(?:\.[A-Za-z_]\w*)+)(?:\(\))?`")
# src/tidings/... anywhere in the text, in code spans, links or prose.
_SRC_PATH = re.compile(r"src/tidings(?:/[\w.-]+)*/?")
# Markdown links with a relative target: [text](target) or [text](target#anchor).
_LINK = re.compile(r"\]\(((?!https?://|#|mailto:)[^)\s#]+)(?:#[^)]*)?\)")


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    modules: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("tidings", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _resolve(reference: str) -> object:
    """Import the longest module prefix of ``reference``, then walk attributes."""
    parts = reference.split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj: object = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                continue  # that prefix is not a module: try a shorter one
            raise
        for attribute in parts[split:]:
            obj = getattr(obj, attribute)
        return obj
    raise AssertionError(f"{reference}: no module")


def test_every_named_object_imports() -> None:
    references = sorted(set(_REFERENCE.findall(_doc())))
    assert len(references) >= 20, "the document should name the code it describes"
    missing = []
    for reference in references:
        try:
            _resolve(reference)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{reference}: {exc}")
    assert not missing, "docs/architecture.md names what does not exist:\n" + "\n".join(missing)


def test_every_named_path_exists() -> None:
    paths = sorted(set(_SRC_PATH.findall(_doc())))
    assert paths, "the document should name source files"
    missing = [path for path in paths if not (ROOT / path.rstrip("/.")).exists()]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_every_relative_link_resolves() -> None:
    targets = sorted(set(_LINK.findall(_doc())))
    assert targets
    missing = [target for target in targets if not (DOC.parent / target).exists()]
    assert not missing, f"docs/architecture.md links to nothing: {missing}"


def _layout() -> list[tuple[str, str]]:
    """(module path relative to src/tidings/, layer) for each row of the layout table."""
    text = _doc()
    start = text.index("\n## 2. The layout")
    end = text.index("\n## ", start + 1)
    rows = []
    for line in text[start:end].splitlines():
        if not line.startswith("| ["):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        links = re.findall(r"\(\.\./src/tidings/([\w/.]+\.py)\)", cells[0])
        assert len(links) == 1, f"a layout row names one module: {line}"
        assert len(cells) == 3, f"a layout row is | module | owns | layer |: {line}"
        rows.append((links[0], cells[2]))
    return rows


def _layout_rows() -> list[str]:
    return [path for path, _ in _layout()]


def test_layout_table_has_one_row_per_module() -> None:
    rows = _layout_rows()
    duplicates = sorted({row for row in rows if rows.count(row) > 1})
    assert not duplicates, f"modules with more than one row: {duplicates}"
    on_disk = {path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")}
    without_row = sorted(on_disk - set(rows))
    assert not without_row, (
        "modules of src/tidings/ without a row in docs/architecture.md's layout table "
        f"(add one saying which rule it owns): {without_row}"
    )
    stale = sorted(set(rows) - on_disk)
    assert not stale, f"rows for modules that no longer exist: {stale}"


#: Which layers a module of each layer may import (the layout's "layer" column):
#: the sans-I/O core imports only itself; the shell (client sockets) imports
#: the core; the roots build everything; the Python clients use core values.
MAY_IMPORT = {
    "core": {"core"},
    "shell": {"core", "shell"},
    "root": {"core", "shell", "root", "client"},
    "client": {"core", "client"},
}


def _dotted(path: str) -> str:
    parts = ("tidings", *Path(path).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_imports_point_down_the_layers() -> None:
    """No core module imports a shell or root module, and so on, as the table says."""
    layer = {_dotted(path): name for path, name in _layout()}
    unknown = sorted(
        f"{module}: {name}" for module, name in layer.items() if name not in MAY_IMPORT
    )
    assert not unknown, f"layers are {sorted(MAY_IMPORT)}: {unknown}"
    upward = [
        f"{module} ({layer[module]}) imports {imported} ({layer[imported]})"
        for module, imports in sorted(_graph().items())
        for imported in sorted(imports)
        if module in layer
        and imported in layer
        and layer[imported] not in MAY_IMPORT[layer[module]]
    ]
    assert not upward, "imports against the layers of docs/architecture.md:\n" + "\n".join(upward)


def _imports(module: str, path: Path) -> set[str]:
    """The package's modules that ``module`` imports, anywhere in its file.

    Every import statement counts: at top level, inside functions, and under
    ``if TYPE_CHECKING:`` (a type-only import is still a dependency a reader
    has to understand, and the cycle it hides is still a cycle of the design).
    ``from .pkg import name`` depends on ``pkg.name`` when that is a module,
    on ``pkg`` (its ``__init__``) otherwise.
    """
    known = _modules()
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base_parts = package[: len(package) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                if candidate in known:
                    found.add(candidate)
                elif base in known:
                    found.add(base)
    found.discard(module)
    return found


def _graph() -> dict[str, set[str]]:
    return {module: _imports(module, path) for module, path in _modules().items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_cycle_finder_finds_a_cycle() -> None:
    """The checker itself: a two-module cycle and a three-module cycle are found."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert _cycles(graph) == [["a", "b"], ["c", "d", "e"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_type_checking_imports_count(tmp_path: Path) -> None:
    """An import under ``if TYPE_CHECKING:`` is an edge of the graph."""
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from ..hub import Hub\n"
        "if TYPE_CHECKING:\n"
        "    from ..server import Server\n"
    )
    assert _imports("tidings.transports.mod", source) == {"tidings.hub", "tidings.server"}


def test_import_graph_has_no_cycle() -> None:
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles in src/tidings/: {cycles}"


def test_only_composition_roots_import_the_server() -> None:
    importers = sorted(
        module for module, imported in _graph().items() if "tidings.server" in imported
    )
    assert set(importers) <= COMPOSITION_ROOTS, (
        f"modules importing tidings.server besides {sorted(COMPOSITION_ROOTS)}: "
        f"{sorted(set(importers) - COMPOSITION_ROOTS)}"
    )


def _recipe_module(tmp_path: Path) -> ModuleType:
    """The first Python block of "4. Adding a transport", imported as a module."""
    text = _doc()
    section = text[text.index("\n## 4. Adding a transport") : text.index("\n## 5. ")]
    block = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert block is not None, "section 4 shows the recipe as code"
    path = tmp_path / "ndjson_transport.py"
    path.write_text(block.group(1))
    spec = importlib.util.spec_from_file_location("ndjson_transport", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


async def _until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_the_recipe_transport_serves_a_subscriber(tmp_path: Path) -> None:
    """The documented transport, added as step 6 says, delivers a publication and refuses
    a bad channel name through the one authorization path."""
    module = _recipe_module(tmp_path)

    async def scenario() -> None:
        server = Server(load_config(overrides={"port": 0}))
        ndjson = module.NDJSONTransport(
            server.hub, server.access, server.connections, server.config.limits
        )
        # Step 6's line, from outside: in the tuple the server mounts, starts and stops.
        ndjson.mount(server.router)
        server.transports = (*server.transports, ndjson)
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
                refused = await client.get("/ndjson", params={"channel": "bad name"})
                assert refused.status_code == 400
                assert refused.json()["error"]["code"] == 107
                async with client.stream("GET", "/ndjson", params={"channel": "news"}) as stream:
                    assert stream.status_code == 200
                    assert stream.headers["content-type"] == "application/x-ndjson"
                    await _until(lambda: server.hub.num_subscribers("news") == 1, "the join")
                    published = await client.post(
                        "/api/publish", json={"channel": "news", "data": {"text": "hello"}}
                    )
                    assert published.status_code == 200
                    line = await asyncio.wait_for(anext(stream.aiter_lines()), 5)
                pub = json.loads(line)
                assert pub["channel"] == "news"
                assert pub["data"] == {"text": "hello"}
                assert pub["offset"] == published.json()["result"]["offset"]
                await _until(lambda: server.hub.num_subscribers("news") == 0, "the leave")
        finally:
            await server.shutdown()

    asyncio.run(scenario())


def test_optional_parts_are_imported_only_when_configured() -> None:
    """A server without the proxy, webhooks or the admin page does not import
    them (nor aiohttp, httpx): 273 ms and 11 MB less at start, and the heap
    layout the benchmark's RSS per connection was measured with."""
    import subprocess

    optional = ["aiohttp", "httpx", "tidings.proxy", "tidings.webhooks", "tidings.admin"]
    probe = (
        "import sys\n"
        "from tidings.config import load_config\n"
        "from tidings.server import Server\n"
        "Server(load_config(overrides={'port': 0}))\n"
        f"print(sorted(set({optional!r}) & set(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout
