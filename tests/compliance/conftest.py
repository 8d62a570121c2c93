"""The server every compliance module shares, and the check that it still serves others.

One ``tidings serve`` per module (``module_server_factory`` of ``tests/conftest.py``) with the
message limit set explicitly, so that the limit cases know the bound they attack.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from compliance.support import CONFIG

_ERROR_LINE = re.compile(r"^\S+ \S+ (ERROR|CRITICAL)", re.MULTILINE)


@pytest.fixture(scope="module")
def ws_server(module_server_factory: Callable[..., Any]) -> Iterator[Any]:
    """A server for the module's cases.

    After the module, its log must hold no traceback and no ERROR line: every hostile frame
    is a client mistake, logged below ERROR (issue 10, item 4).
    """
    srv = module_server_factory(config=CONFIG)
    yield srv
    logs = srv.logs()
    assert "Traceback" not in logs, f"unhandled exception in the server log:\n{logs[-8000:]}"
    assert not _ERROR_LINE.search(logs), f"ERROR logged for client input:\n{logs[-8000:]}"
