"""The ASGI app the tests run under uvicorn and hypercorn: ``uvicorn asgi_app:app``.

The configuration file is ``ASGI_APP_CONFIG`` (optional); ``TIDINGS_*``
variables apply on top, as for ``tidings serve``. The ASGI servers configure
only their own loggers, so tidings' lines get a handler here (docs/asgi.md).
"""

from __future__ import annotations

import logging
import os

from tidings.asgi import ASGIApp
from tidings.config import load_config
from tidings.server import Server

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

app = ASGIApp(Server(load_config(os.environ.get("ASGI_APP_CONFIG") or None, env=os.environ)))
