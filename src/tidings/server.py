"""The running server: one listener, one hub, the transports, the API.

This is the only module that knows every part; each part knows only the hub
and the server object it is given. Embed tidings in a program with::

    server = Server(load_config())
    await server.start()
    await server.hub.publish("news", b'{"text": "hello"}')
    ...
    await server.shutdown()
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import os
import secrets
import signal
import socket
import time
from typing import Any, Protocol

from .api import ServerAPI
from .auth import Access
from .brokers import Broker, make_broker
from .config import Config
from .http import HTTPConnection, Request, Response, Router, error_response, json_response
from .http.cors import CORS
from .hub import Hub
from .transports import websocket
from .transports.poll import PollTransport
from .transports.sse import SSETransport

log = logging.getLogger("tidings")


class Connection(Protocol):
    """Anything long-lived the server must wind down on graceful shutdown."""

    def shutdown(self) -> None: ...


class Server:
    def __init__(self, config: Config, broker: Broker | None = None) -> None:
        self.config = config
        self.broker = broker or make_broker(config)
        self.hub = Hub(
            self.broker,
            max_channel_length=config.limits.max_channel_length,
            history_for=config.history_for,
        )
        self.access = Access(config)
        self.cors = CORS(config.allowed_origins)
        self.router = Router()
        self.connections: set[Connection] = set()
        self.stopping = False
        self.uid = secrets.token_hex(8)
        self.name = f"{socket.gethostname()}_{os.getpid()}"
        self.started_at = time.monotonic()
        self.sse = SSETransport(self)
        self.poll = PollTransport(self)
        self.api = ServerAPI(self)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._listener: asyncio.base_events.Server | None = None
        self._stopped = asyncio.Event()
        self._static = _read_static("tidings.js", "demo.html")
        self._add_routes()

    def _add_routes(self) -> None:
        router = self.router
        router.add("GET", "/health", self._health)
        router.add("GET", "/sse", self.sse.handle)
        router.add("GET", "/poll", self.poll.handle)
        router.add("GET", "/connection/websocket", self._websocket_without_upgrade)
        router.add_prefix("POST", "/api/", self.api.handle)
        router.add("GET", "/tidings.js", self._tidings_js)
        router.add("GET", "/demo", self._demo)

    # -- lifecycle -------------------------------------------------------

    async def start(self, sock: socket.socket | None = None, *, reuse_port: bool = False) -> None:
        """Start the broker and the transports, then listen.

        ``reuse_port`` lets several worker processes listen on one port.
        """
        self.loop = loop = asyncio.get_running_loop()
        await self.broker.start()
        self.sse.start()
        if sock is not None:
            self._listener = await loop.create_server(
                lambda: HTTPConnection(self), sock=sock, backlog=4096
            )
        else:
            self._listener = await loop.create_server(
                lambda: HTTPConnection(self),
                self.config.host,
                self.config.port,
                backlog=4096,
                reuse_address=True,
                reuse_port=reuse_port or None,
            )
        self.started_at = time.monotonic()
        if not self.config.api_key:
            log.warning(
                "no api_key configured: the server API answers unproxied loopback clients "
                "only, a development default; set api_key (config or TIDINGS_API_KEY) for "
                "any deployment, since a same-host process or a proxy misconfiguration "
                "would otherwise reach it (docs/security.md)"
            )
        if 0 < len(self.config.auth.hmac_secret.encode()) < 32:
            log.warning(
                "auth.hmac_secret is shorter than 32 bytes: HS256 tokens can be brute-forced"
            )
        if not self.access.secure:
            log.warning(
                "no auth keys configured: anonymous clients may subscribe to any channel and "
                "subscribers may publish (a development default; see docs/security.md)"
            )
        elif self.access.open_namespaces():
            log.info(
                "namespaces open to anonymous subscribers: %s",
                ", ".join(self.access.open_namespaces()),
            )
        log.info("tidings listening on %s", self.url)

    @property
    def port(self) -> int:
        assert self._listener is not None and self._listener.sockets
        return int(self._listener.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    @property
    def num_clients(self) -> int:
        return len(self.connections) + len(self.sse.streams)

    async def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            await self._stopped.wait()
            await self.shutdown()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    def _on_signal(self, signum: int) -> None:
        if self._stopped.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s received: shutting down", signal.Signals(signum).name)
        self._stopped.set()

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to shut down."""
        self._stopped.set()

    async def shutdown(self) -> None:
        """Stop accepting, tell every client to come back later, and wait a bounded time.

        SSE streams get a ``retry:`` hint and are closed; held long-polls are
        answered with what they have; WebSocket clients get close code 3001;
        idle keep-alive connections are closed; requests in flight finish.
        """
        self.stopping = True
        if self._listener is not None:
            self._listener.close()
        self.sse.shutdown()
        for connection in tuple(self.connections):
            connection.shutdown()
        deadline = time.monotonic() + self.config.timeouts.shutdown
        while (self.connections or self.sse.streams) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.connections or self.sse.streams:
            log.warning(
                "shutdown timeout: dropping %d connections",
                len(self.connections) + len(self.sse.streams),
            )
        await self.sse.stop()
        await self.broker.close()
        if self._listener is not None:
            self._listener.close()
        log.info("tidings stopped")

    # -- routes kept here because they concern the whole server ------------

    async def _health(self, request: Request, conn: HTTPConnection) -> Response:
        healthy = self.broker.healthy and not self.stopping
        payload: dict[str, Any] = {
            "status": "ok" if healthy else "unavailable",
            "broker": {"type": type(self.broker).__name__, "healthy": self.broker.healthy},
        }
        return json_response(payload, 200 if healthy else 503)

    async def _tidings_js(self, request: Request, conn: HTTPConnection) -> Response:
        return _static_response(self._static["tidings.js"], "application/javascript; charset=utf-8")

    async def _demo(self, request: Request, conn: HTTPConnection) -> Response:
        if not self.config.demo:
            return error_response(404, "the demo is off: start the server with --demo")
        return _static_response(self._static["demo.html"], "text/html; charset=utf-8")

    async def _websocket_without_upgrade(self, request: Request, conn: HTTPConnection) -> Response:
        response = error_response(426, "this endpoint speaks WebSocket: send an Upgrade request")
        response.headers.append(("Upgrade", "websocket"))
        return response

    def upgrade_websocket(self, conn: HTTPConnection, request: Request, rest: bytes) -> None:
        """Hand a WebSocket upgrade request to the WebSocket transport."""
        if request.path != "/connection/websocket":
            request.keep_alive = False
            conn.respond(request, error_response(404, f"no WebSocket endpoint at {request.path}"))
            return
        if request.method != "GET":
            # RFC 6455 §4.1: the opening handshake is a GET. Refused here, as
            # plain HTTP, so that a HEAD gets its answer without a body.
            request.keep_alive = False
            response = error_response(405, "a WebSocket handshake must be a GET request")
            response.headers.append(("Allow", "GET"))
            conn.respond(request, response)
            return
        transport = conn.detach()
        websocket.upgrade(self, transport, request, rest)


def _read_static(*names: str) -> dict[str, bytes]:
    """The browser files shipped in the package, read once at start."""
    files = importlib.resources.files("tidings") / "static"
    return {name: (files / name).read_bytes() for name in names}


def _static_response(body: bytes, content_type: str) -> Response:
    headers = [("Content-Type", content_type), ("Cache-Control", "no-cache")]
    return Response(200, body=body, headers=headers)


__all__ = ["Connection", "Server"]
