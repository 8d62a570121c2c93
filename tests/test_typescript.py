"""tidings.js for TypeScript users and bundlers: its declarations and its package.json.

- ``tsc --noEmit`` (tests/js's pinned ``typescript``, strict and stricter) passes on
  tests/js/typed/example.ts, which imports ``tidings-client`` as a bundler user does (a
  node_modules link to src/tidings/static, resolved through its package.json ``exports``),
  uses every part of the API and asserts the exact types it gets;
- tsc rejects tests/js/typed/mistyped.ts with exactly the errors its lines name (a wrong
  option name, a wrong callback type, ...): the declarations are not ``any``;
- what each module exports when node imports it (through the same ``exports``) is what its
  declarations export, and of the same kind (class, function, value);
- the package.json stays valid, the Python package ships every file it names, the server
  serves the declarations beside the modules, and docs/clients.md's sizes are current.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import tomllib
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import httpx
import pytest

import tidings
from ws_support import JS_DIR, ensure_js_deps, node_available

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "src" / "tidings" / "static"
TYPED = JS_DIR / "typed"
BIN = JS_DIR / "node_modules" / ".bin"
#: The modules a page imports, by their package specifier, and their declarations.
MODULES = {
    "tidings-client": ("tidings.js", "tidings.d.ts"),
    "tidings-client/shared": ("tidings-shared.js", "tidings-shared.d.ts"),
}
#: tsc's diagnostics with --pretty false: ``file(line,col): error TSnnnn: message``.
DIAGNOSTIC = re.compile(
    r"^(?P<file>[^(\n]+)\((?P<line>\d+),\d+\): error (?P<code>TS\d+): (?P<msg>.*)$", re.M
)

# Skipped on a developer machine without node; in CI (CI=true) a missing node fails.
needs_node = pytest.mark.skipif(
    not node_available() and not os.environ.get("CI"), reason="node and npm are needed"
)


@pytest.fixture(scope="module")
def js_deps() -> None:
    ensure_js_deps()


def tsc(project: Path) -> subprocess.CompletedProcess[str]:
    """``tsc -p project`` (the config says --noEmit), run where the project is."""
    return subprocess.run(
        [str(BIN / "tsc"), "-p", project.name, "--pretty", "false"],
        cwd=project.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def diagnostics(output: str) -> list[tuple[str, int, str, str]]:
    return [
        (Path(m["file"]).name, int(m["line"]), m["code"], m["msg"])
        for m in DIAGNOSTIC.finditer(output)
    ]


def node_exports(specifier: str) -> dict[str, str]:
    """What node sees when it imports ``specifier`` from tests/js: each export's kind."""
    script = (
        f"const m = await import({json.dumps(specifier)});"
        "const kind = (v) => typeof v !== 'function' ? typeof v"
        "  : /^class\\b/.test(Function.prototype.toString.call(v)) ? 'class' : 'function';"
        "const kinds = Object.keys(m).map((k) => [k, kind(m[k])]);"
        "console.log(JSON.stringify(Object.fromEntries(kinds)));"
    )
    out = subprocess.run(
        ["node", "--input-type=module", "-e", script],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    exports: dict[str, str] = json.loads(out.stdout)
    return exports


#: How the generated check asks that an export be of its kind at run time.
KIND_CHECK = {
    "class": "abstract new (...args: never[]) => unknown",
    "function": "(...args: never[]) => unknown",
    "object": "object",
}


def exports_check(specifier: str, runtime: dict[str, str]) -> str:
    """TypeScript that compiles only when the declarations of ``specifier`` export exactly
    the names in ``runtime`` as values, each of its kind. A name tsc has to report appears
    in its message (``Type '"none"' is not assignable to type '"name"'``)."""
    names = " | ".join(json.dumps(name) for name in sorted(runtime)) or "never"
    lines = [
        f'import * as declared from "{specifier}";',
        f"type AtRuntime = {names};",
        "type Undeclared = Exclude<AtRuntime, keyof typeof declared>;",
        "type NotAtRuntime = Exclude<keyof typeof declared, AtRuntime>;",
        'type Report<T> = [T] extends [never] ? "none" : T;',
        'export const undeclared: Report<Undeclared> = "none";',
        'export const notAtRuntime: Report<NotAtRuntime> = "none";',
    ]
    for name, kind in sorted(runtime.items()):
        if kind in KIND_CHECK:
            lines.append(
                f"export const kind_{name} = declared.{name} satisfies {KIND_CHECK[kind]};"
            )
    return "\n".join(lines) + "\n"


def check_exports(
    tmp: Path, specifier: str, runtime: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """tsc on :func:`exports_check` under the typed example's settings, in ``tmp`` with a
    node_modules of its own that links ``tidings-client`` as tests/js's does."""
    modules = tmp / "node_modules"
    modules.mkdir(exist_ok=True)
    link = modules / "tidings-client"
    if not link.exists():
        link.symlink_to((JS_DIR / "node_modules" / "tidings-client").resolve())
    (tmp / "exports.ts").write_text(exports_check(specifier, runtime))
    config = {"extends": str(TYPED / "tsconfig.json"), "files": ["exports.ts"]}
    (tmp / "tsconfig.json").write_text(json.dumps(config))
    return tsc(tmp / "tsconfig.json")


# -- tsc ----------------------------------------------------------------------------------


@pytest.mark.node
@needs_node
def test_typed_example_compiles_in_strict_mode(js_deps: None) -> None:
    result = tsc(TYPED / "tsconfig.json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error" not in result.stdout


def test_typed_example_uses_the_package_exports_and_every_export() -> None:
    """The example imports what a bundler user imports, and every name either module
    declares, so that nothing declared goes unchecked."""
    example = (TYPED / "example.ts").read_text()
    imported = set(re.findall(r'from "(tidings-client[^"]*)"', example))
    assert imported == set(MODULES)
    assert '"moduleResolution": "bundler"' in (TYPED / "tsconfig.json").read_text()
    for _, declarations in MODULES.values():
        source = (STATIC / declarations).read_text()
        declared = set(
            re.findall(
                r"^export (?:declare )?(?:class|function|const|interface|type) (\w+)", source, re.M
            )
        )
        unused = {name for name in declared if not re.search(rf"\b{name}\b", example)}
        assert not unused, f"{declarations}: the example does not use {sorted(unused)}"


@pytest.mark.node
@needs_node
def test_mistyped_example_is_rejected_with_the_expected_errors(js_deps: None) -> None:
    source = (TYPED / "mistyped.ts").read_text().splitlines()
    expected = {
        (number, m[1])
        for number, line in enumerate(source, start=1)
        if (m := re.search(r"// (TS\d+)$", line))
    }
    assert len(expected) >= 10
    result = tsc(TYPED / "tsconfig.mistyped.json")
    assert result.returncode != 0
    found = diagnostics(result.stdout)
    assert {(line, code) for _, line, code, _ in found} == expected, result.stdout
    assert {file for file, *_ in found} == {"mistyped.ts"}
    messages = {line: msg for _, line, _, msg in found}
    wrong_option = next(n for n, text in enumerate(source, 1) if "openTimout" in text)
    assert "Did you mean to write 'openTimeout'?" in messages[wrong_option]
    wrong_callback = next(n for n, text in enumerate(source, 1) if "name: number" in text)
    assert (
        "'(name: number) => void' is not assignable to type '(name: Transport) => void'"
        in (messages[wrong_callback])
    )


@pytest.mark.node
@needs_node
@pytest.mark.parametrize("specifier", sorted(MODULES))
def test_runtime_exports_are_the_declared_exports(
    js_deps: None, specifier: str, tmp_path: Path
) -> None:
    runtime = node_exports(specifier)
    assert {"Tidings", "TidingsError", "default"} <= runtime.keys()
    result = check_exports(tmp_path, specifier, runtime)
    assert result.returncode == 0, result.stdout + result.stderr

    # The comparison can fail: a name only at run time, one only declared, a wrong kind.
    drifted = {k: v for k, v in runtime.items() if k != "backoff"}
    drifted["notDeclared"] = "function"
    drifted["TidingsError"] = "function"  # a class is not callable
    result = check_exports(tmp_path, specifier, drifted)
    assert result.returncode != 0
    assert "notDeclared" in result.stdout and "backoff" in result.stdout, result.stdout
    assert "typeof TidingsError" in result.stdout, result.stdout


def object_keys(source: str, const: str) -> list[str]:
    """The keys of ``const NAME = { ... };`` at the top of a module's source."""
    block = re.search(rf"^const {const} = \{{\n(.*?)^\}};", source, re.M | re.S)
    assert block, f"no {const} in the module"
    return re.findall(r"^  (\w+):", block[1], re.M)


def interface_members(source: str, name: str) -> dict[str, bool]:
    """Each member of ``interface name`` and whether a doc comment (``/** ... */``) precedes it."""
    block = re.search(rf"^export interface {name}\b[^{{]*\{{\n(.*?)^\}}", source, re.M | re.S)
    assert block, f"no interface {name}"
    members: dict[str, bool] = {}
    previous = ""
    for line in block[1].splitlines():
        if m := re.match(r"  (\w+)\??:", line):
            members[m[1]] = previous.endswith("*/")
        previous = line.strip()
    return members


@pytest.mark.parametrize(
    ("module", "defaults", "declarations", "interface"),
    [
        ("tidings.js", "DEFAULTS", "tidings.d.ts", "Options"),
        ("tidings-shared.js", "SHARE_DEFAULTS", "tidings-shared.d.ts", "SharedOptions"),
    ],
)
def test_every_option_is_declared_with_its_doc(
    module: str, defaults: str, declarations: str, interface: str
) -> None:
    """An option added to a module's defaults must be declared, with a doc comment, and a
    declared option must exist: the defaults object is where the module lists them."""
    keys = object_keys((STATIC / module).read_text(), defaults)
    members = interface_members((STATIC / declarations).read_text(), interface)
    assert len(keys) >= 3
    assert set(keys) == set(members), f"{module} {defaults} vs {declarations} {interface}"
    assert all(members.values()), (
        f"without a doc comment: {[k for k, v in members.items() if not v]}"
    )


# -- the package ----------------------------------------------------------------------------


def package_json() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((STATIC / "package.json").read_text())
    return data


def test_package_json_is_a_valid_module_package() -> None:
    pkg = package_json()
    assert pkg["name"] == "tidings-client"
    assert pkg["version"] == tidings.__version__, "give package.json tidings.__version__"
    assert pkg["type"] == "module"
    # No build step, nothing to install: the files are used as they are.
    assert not {"dependencies", "scripts", "peerDependencies", "bin"} & pkg.keys()
    exports = pkg["exports"]
    for specifier, (module, declarations) in MODULES.items():
        entry = exports["." + specifier.removeprefix("tidings-client")]
        assert list(entry) == ["types", "default"], "types must come first to be matched"
        assert entry == {"types": f"./{declarations}", "default": f"./{module}"}
    targets = [t for e in exports.values() for t in (e.values() if isinstance(e, dict) else [e])]
    targets += [pkg["main"], pkg["types"], *pkg["files"]]
    for target in targets:
        assert (STATIC / target).is_file(), f"package.json names {target}, which is missing"
    assert pkg["main"] == exports["."]["default"] and pkg["types"] == exports["."]["types"]


def test_package_files_include_what_the_modules_load() -> None:
    """A module loaded by another (imported, or a worker made from its URL) must be in
    ``files``, or a bundle built from the package misses it."""
    files = set(package_json()["files"])
    for name in sorted(files):
        if name.endswith(".js"):
            source = (STATIC / name).read_text()
            loaded = re.findall(
                r'from "\./([^"]+)"|new URL\("\./([^"]+)", import\.meta\.url\)', source
            )
            for imported in filter(None, (a or b for a, b in loaded)):
                assert imported in files, f"{name} loads {imported}, not in package.json files"
    assert {"tidings-worker.js", "tidings.d.ts", "tidings-shared.d.ts"} <= files


def test_python_package_ships_the_client_files() -> None:
    """pyproject's package-data covers the client's package: each file it names and
    its package.json end up in the wheel (checked by hand with ``pip wheel``)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["tidings"]
    for name in [*package_json()["files"], "package.json"]:
        assert any(glob_match(f"static/{name}", p) for p in patterns), f"static/{name} not shipped"


def glob_match(path: str, pattern: str) -> bool:
    """setuptools' glob: ``*`` stays within one folder."""
    parts, wanted = path.split("/"), pattern.split("/")
    return len(parts) == len(wanted) and all(map(fnmatchcase, parts, wanted))


# -- served -----------------------------------------------------------------------------------


def test_declarations_are_served_beside_the_modules(server: Any) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for module, declarations in MODULES.values():
            js = http.get(f"/{module}")
            assert js.status_code == 200
            assert js.headers["x-typescript-types"] == f"./{declarations}"
            dts = http.get(f"/{declarations}")
            assert dts.status_code == 200
            assert dts.headers["content-type"] == "application/typescript; charset=utf-8"
            assert dts.content == (STATIC / declarations).read_bytes()


# -- size -------------------------------------------------------------------------------------

#: docs/clients.md's size table: ``| `module` | minified | minified + gzip |`` in bytes.
SIZE_ROW = re.compile(
    r"^\| `(?P<module>[\w.-]+)`[^|]*\| (?P<minified>[\d,]+) \| (?P<gzipped>[\d,]+) \|", re.M
)


def minified_gzipped(module: str) -> tuple[int, int]:
    """The module bundled with what it imports and minified by esbuild, and that gzipped."""
    out = subprocess.run(
        [str(BIN / "esbuild"), "--bundle", "--minify", "--format=esm", str(STATIC / module)],
        capture_output=True,
        timeout=60,
        check=True,
    )
    return len(out.stdout), len(gzip.compress(out.stdout, compresslevel=9, mtime=0))


@pytest.mark.node
@needs_node
def test_documented_sizes_are_current(js_deps: None) -> None:
    """The sizes docs/clients.md gives are within 10% of what esbuild makes now."""
    documented = {
        m["module"]: (int(m["minified"].replace(",", "")), int(m["gzipped"].replace(",", "")))
        for m in SIZE_ROW.finditer((ROOT / "docs" / "clients.md").read_text())
    }
    assert {"tidings.js", "tidings-shared.js"} <= documented.keys()
    for module, (minified, gzipped) in documented.items():
        now = minified_gzipped(module)
        for said, measured in zip((minified, gzipped), now, strict=True):
            assert abs(said - measured) <= measured / 10, (
                f"docs/clients.md says {module} is {said} bytes, esbuild makes {measured}: "
                "update the table (the command is beside it)"
            )
