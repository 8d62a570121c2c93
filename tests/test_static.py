"""The code's own standards, checked on every CI run: ruff (lint and format) and mypy --strict.

Run as tests so that ``.ci/run`` — the README's test command — is the one
place CI is defined; a lint regression fails the build like any other bug.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize(
    "command",
    [
        ("ruff", "check", "src", "tests", "bench", "examples"),
        ("ruff", "format", "--check", "src", "tests", "bench", "examples"),
        ("mypy",),  # files and strictness from pyproject.toml
        # The examples are read and copied: they are held to the same types.
        ("mypy", "--strict", "examples"),
    ],
    ids=["ruff-check", "ruff-format", "mypy-strict", "mypy-strict-examples"],
)
# As long as the command's own timeout: mypy without a cache, sharing the cores with the
# suite's other workers, has taken more than pytest's default 120 s.
@pytest.mark.timeout(300)
def test_static_check_passes(command: tuple[str, ...]) -> None:
    result = _run(*command)
    assert result.returncode == 0, result.stdout + result.stderr
