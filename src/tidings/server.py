"""The running server: the one place where the parts are built and wired.

Each part is given what it needs and nothing more — the hub, the access
rules, the CORS rule, its configuration section, the connection registry —
so no module but this one (and the Python API above it, which the CLI runs)
knows the whole. A program embedding tidings uses that API,
``tidings.Tidings`` (docs/python-api.md), which builds one of these each time
it serves.

A transport is an object with ``mount(router)``, ``start()`` and ``stop()``
(:class:`Transport`); adding one is a module plus one line in
:meth:`Server.__init__` (docs/architecture.md has the recipe).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import logging
import os
import secrets
import signal
import socket
import stat
import time
from typing import TYPE_CHECKING, Any, Protocol

from .api import NodeInfo, ServerAPI
from .auth import Access
from .brokers import Broker, make_broker
from .config import Config
from .connections import Connections, default_max_connections
from .hooks import Hooks
from .http import (
    Exchange,
    HTTPConnection,
    Request,
    Response,
    Router,
    Site,
    error_response,
    json_response,
)
from .http.cors import CORS
from .hub import Hub
from .listener import Listening, listen
from .logs import AccessLog
from .metrics import CONTENT_TYPE, Live, Metrics
from .transports.calls import CallTransport
from .transports.emulation import EmulationTransport
from .transports.poll import PollTransport
from .transports.sse import SSETransport
from .transports.websocket import WebSocketTransport
from .version import __version__

if TYPE_CHECKING:
    from .admin import Admin
    from .proxy import Proxy
    from .webhooks import WebhookSender

# _OPTIONAL: the proxy (aiohttp), webhooks (httpx) and the admin page are
# imported where they are built, when their configuration turns them on. A
# server using none of them starts without those libraries: `import
# tidings.server` loads 437 modules instead of 573, its import time summed by
# `python -X importtime` falls from 556 to 283 ms (best of 5) and the process
# holds 45 MB instead of 56 MB; and it holds less per connection (bench/run.py
# --quick --n 2000, two runs: SSE 1,546/1,575 -> 1,165/1,096 B, WebSocket
# 2,329/2,322 -> 1,849/1,900 B) though it makes the same Python objects per
# connection (bench/conn_memory.py): the heap they are placed on differs.

log = logging.getLogger(__name__)


class Transport(Protocol):
    """What the server asks of a transport: its routes, then a start and a stop
    around the time it serves."""

    def mount(self, router: Router) -> None:
        """Add the transport's routes (and upgrade routes) to ``router``."""

    async def start(self) -> None:
        """Begin background work, if any; called inside the running loop."""

    async def stop(self) -> None:
        """End background work; connections were already wound down."""


class Server:
    def __init__(
        self, config: Config, broker: Broker | None = None, hooks: Hooks | None = None
    ) -> None:
        self.config = config
        self.broker = broker or make_broker(config)
        #: Prometheus figures (tidings.metrics): handed to the parts that count.
        self.metrics = metrics = Metrics()
        #: The application's hooks (tidings.Tidings registers them; the proxy
        #: and webhooks add theirs); empty, they cost nothing.
        self.hooks = hooks = hooks or Hooks(
            timeout=config.hooks.timeout,
            vacated_delay=config.hooks.vacated_delay,
            max_pending_events=config.hooks.max_pending_events,
        )
        #: Events POSTed to ``[webhooks] url`` (None without one).
        self.webhooks: WebhookSender | None = None
        if config.webhooks.url:
            from .webhooks import WebhookSender  # httpx: imported only when used (_OPTIONAL)

            self.webhooks = WebhookSender(config.webhooks)
            self.webhooks.install(hooks)
        #: The decisions of ``[proxy]`` URLs, as HTTP calls to a backend (None without any).
        self.proxy: Proxy | None = None
        if config.proxy.hook_names:
            from .proxy import Proxy  # aiohttp: imported only when used (_OPTIONAL)

            proxy = Proxy(config.proxy)
            proxy.install(hooks)  # ConfigError if a Python hook takes the same decision
            self.proxy = proxy
        hooks.observe = metrics.hook_decided
        self.hub = Hub(
            self.broker,
            history_for=config.history_for,
            broker_timeout=config.timeouts.broker,
            hooks=hooks,
            metrics=metrics,
        )
        self.access = access = Access(config)
        self.cors = cors = CORS(config.allowed_origins)
        max_connections = config.limits.max_connections
        if max_connections is None:
            max_connections = default_max_connections()
        self.connections = connections = Connections(max_connections)
        self.router = Router()
        access_log = AccessLog() if config.access_log else None
        self.site = Site(
            self.router, cors, config.limits, config.timeouts, connections, access_log, metrics
        )
        self.uid = secrets.token_hex(8)
        self.name = f"{socket.gethostname()}_{os.getpid()}"
        self.started_at = time.monotonic()
        hub, limits = self.hub, config.limits
        self.sse = SSETransport(
            hub, access, cors, connections, config.sse, limits, hooks=hooks, metrics=metrics
        )
        self.poll = PollTransport(
            hub, access, connections, config.poll, hooks=hooks, metrics=metrics
        )
        self.websocket = WebSocketTransport(
            hub, access, cors, connections, config.websocket, limits, hooks=hooks, metrics=metrics
        )
        self.api = ServerAPI(
            hub,
            access,
            config.api_key,
            self.node_info,
            max_batch_commands=config.limits.max_batch_commands,
            metrics=metrics,
        )
        self.emulation = EmulationTransport(
            hub,
            access,
            cors,
            connections,
            config.websocket,
            limits,
            self.broker,
            self.uid,
            hooks=hooks,
            metrics=metrics,
        )
        #: ``POST /call/<name>``: RPC, publish, history, presence for clients
        #: on SSE, long-poll and poll (tidings.transports.calls).
        self.calls = CallTransport(hub, access, hooks=hooks, metrics=metrics)
        self.transports: tuple[Transport, ...] = (
            self.sse,
            self.poll,
            self.websocket,
            self.emulation,
            self.calls,
        )
        #: The admin page (tidings.admin), when ``[admin] enabled``; its live tail
        #: is an SSE endpoint started and stopped as a transport is.
        self.admin: Admin | None = None
        if config.admin.enabled:
            from .admin import Admin  # imported only when used (_OPTIONAL)

            self.admin = Admin(config, self.api, self.hub, cors, connections, metrics=metrics)
            self.transports += (self.admin,)
        self._listener: Listening | None = None
        #: The ``[metrics] port`` listener, serving /metrics alone.
        self._metrics_listener: Listening | None = None
        self._metrics_task: asyncio.Task[None] | None = None
        self._uds: str | None = None
        self._stopped = asyncio.Event()
        #: Set by a signal when ``timeouts.drain`` is on: /ready says 503 while serving goes on.
        self._draining = False
        self._static = _read_static(
            "tidings.js",
            "tidings-shared.js",
            "tidings-worker.js",
            "demo.html",
            "tidings.d.ts",
            "tidings-shared.d.ts",
        )
        for transport in self.transports:
            transport.mount(self.router)
        self.api.mount(self.router)
        self.router.add("GET", "/health", self._health)
        self.router.add("GET", "/ready", self._ready)
        self.router.add("GET", "/tidings.js", self._tidings_js)
        # One connection per browser: the tab side and the SharedWorker of tidings-shared.js.
        self.router.add("GET", "/tidings-shared.js", self._tidings_shared_js)
        self.router.add("GET", "/tidings-worker.js", self._tidings_worker_js)
        # Their TypeScript declarations, beside them (docs/clients.md).
        self.router.add("GET", "/tidings.d.ts", self._tidings_d_ts)
        self.router.add("GET", "/tidings-shared.d.ts", self._tidings_shared_d_ts)
        self.router.add("GET", "/demo", self._demo)
        if config.metrics.enabled:
            metrics.read_live(self.live)
            self.router.add("GET", "/metrics", self._metrics)

    @property
    def stopping(self) -> bool:
        return self.connections.stopping

    # -- lifecycle -------------------------------------------------------

    async def start(
        self,
        sock: socket.socket | None = None,
        *,
        reuse_port: bool = False,
        uds: str | None = None,
    ) -> None:
        """Start the broker and the transports, then listen.

        ``reuse_port`` lets several worker processes listen on one port;
        ``uds`` listens on a Unix socket at that path instead of host:port
        (as uvicorn's ``--uds``), for a reverse proxy on the same machine.
        """
        if uds is not None:
            sock = _unix_socket(uds)
        self._uds = uds
        await self.start_services()
        site = self.site
        # tidings.listener: accepting survives running out of file descriptors.
        self._listener = await listen(
            lambda: HTTPConnection(site),
            sock=sock,
            host=self.config.host,
            port=self.config.port,
            backlog=4096,
            reuse_port=reuse_port,
        )
        log.info("tidings listening on %s", self.url)
        metrics_port = self.config.metrics.port
        if self.config.metrics.enabled and metrics_port is not None:
            await self._listen_for_metrics(metrics_port, reuse_port)
        cap = self.connections.max_connections
        source = "from the file limit" if self.config.limits.max_connections is None else "set"
        if cap:
            log.info("limits.max_connections = %d (%s)", cap, source)
        else:
            log.info("limits.max_connections = 0 (%s): no cap but the file limit", source)

    async def start_services(self) -> None:
        """Start everything but the listener: the broker, the proxy, webhooks, the
        transports. :meth:`start` listens after it; the ASGI app
        (:mod:`tidings.asgi`) calls it alone, since its ASGI server listens."""
        await self.broker.start()
        if self.proxy is not None:
            await self.proxy.start()
        if self.webhooks is not None:
            await self.webhooks.start()
        for transport in self.transports:
            await transport.start()
        self._metrics_task = asyncio.get_running_loop().create_task(self.metrics.run())
        self.started_at = time.monotonic()
        self._warn_about_development_defaults()

    def _warn_about_development_defaults(self) -> None:
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

    @property
    def port(self) -> int:
        assert self._listener is not None and self._listener.sockets
        assert self._uds is None, "a server on a Unix socket has no port"
        return int(self._listener.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """``http://host:port``, or ``unix:/path`` on a Unix socket (uvicorn's wording)."""
        if self._uds is not None:
            return f"unix:{self._uds}"
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    @property
    def num_clients(self) -> int:
        """Realtime clients: WebSocket and emulation sessions, SSE streams, held
        long-polls — not idle keep-alives, nor the request asking."""
        return sum(self.clients_by_transport().values())

    def clients_by_transport(self) -> dict[str, int]:
        """Realtime clients of each transport, read from the transports' own registries."""
        return {
            "websocket": self.websocket.count,
            "emulation": len(self.emulation.sessions),
            "sse": len(self.sse.streams),
            "longpoll": self.poll.num_held,
        }

    def live(self) -> Live:
        """What this node holds now, for a scrape (tidings.metrics reads it then)."""
        webhooks = self.webhooks
        return Live(
            clients=self.clients_by_transport(),
            connections=len(self.connections),
            users=self.hub.num_users,
            channels=self.hub.num_channels,
            subscriptions=self.hub.num_subscriptions,
            webhook_events={}
            if webhooks is None
            else {
                "delivered": webhooks.delivered,
                "dropped": webhooks.dropped,
                "refused": webhooks.refused,
            },
            webhook_retries=0 if webhooks is None else webhooks.retries,
        )

    def node_info(self) -> NodeInfo:
        """This node as the API's ``info`` reports it."""
        return NodeInfo(
            uid=self.uid,
            name=self.name,
            version=__version__,
            num_clients=self.num_clients,
            num_channels=self.hub.num_channels,
            uptime=int(time.monotonic() - self.started_at),
            clients_by_transport=self.clients_by_transport(),
        )

    async def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            await self._stopped.wait()
            await self._drain()
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

    async def _drain(self) -> None:
        """Go on serving for ``timeouts.drain`` seconds while ``/ready`` answers 503.

        A load balancer or Kubernetes sends new clients elsewhere once its
        readiness probe fails; until then it still sends them here, and a
        listener closed at once would refuse them. 0 (the default) skips it.
        """
        delay = self.config.timeouts.drain
        if delay > 0:
            self._draining = True
            log.info("draining: /ready answers 503 for %gs, then shutting down", delay)
            await asyncio.sleep(delay)

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to shut down."""
        self._stopped.set()

    async def shutdown(self) -> None:
        """Stop accepting, tell every client to come back later, and wait a bounded time.

        SSE streams get a ``retry:`` hint and are closed; held long-polls are
        answered with what they have; WebSocket clients get close code 3001;
        idle keep-alive connections are closed; requests in flight finish.
        """
        if self._listener is not None:
            self._listener.close()
        if self._metrics_listener is not None:
            self._metrics_listener.close()
        if self._metrics_task is not None:
            self._metrics_task.cancel()
        if self._uds is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._uds)
        self.connections.shutdown()
        deadline = time.monotonic() + self.config.timeouts.shutdown
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.connections:
            log.warning("shutdown timeout: dropping %d connections", len(self.connections))
        for transport in self.transports:
            await transport.stop()
        # Before the broker: channels left empty by the shutdown are vacated now.
        await self.hub.close(self.config.timeouts.shutdown)
        await self.broker.close()
        if self.proxy is not None:
            await self.proxy.close()
        if self.webhooks is not None:
            # Last: the disconnects and vacated channels of the shutdown are queued by now.
            await self.webhooks.stop(self.config.timeouts.shutdown)
        log.info("tidings stopped")

    # -- routes kept here because they concern the whole server ------------

    def unready_reasons(self) -> list[str]:
        """Why this node should get no new clients now; empty when it should.

        The connection cap counts the asking connection: a node is unready when
        the next connection after it would be refused. (A probe arriving over
        the cap never gets here: the capacity rule answers it 503 first.)
        """
        reasons = []
        if not self.broker.healthy:
            reasons.append("broker unreachable")
        if self.stopping or self._draining:
            reasons.append("shutting down")
        cap = self.connections.max_connections
        if cap and len(self.connections) >= cap:
            reasons.append("at limits.max_connections")
        return reasons

    async def _health(self, request: Request, conn: Exchange) -> Response:
        """Liveness: 200 whenever the process answers at all.

        Not the broker's state: an orchestrator restarts a process whose
        liveness fails, and restarting every node because Redis is down only
        adds reconnect storms to the outage. That question is ``/ready``'s.
        """
        payload: dict[str, Any] = {
            "status": "ok",
            "broker": {"type": type(self.broker).__name__, "healthy": self.broker.healthy},
        }
        return json_response(payload)

    async def _ready(self, request: Request, conn: Exchange) -> Response:
        """Readiness: 200 while this node should be sent new clients, else 503 with
        the reasons (broker unreachable, shutting down, at the connection cap)."""
        reasons = self.unready_reasons()
        payload: dict[str, Any] = {"status": "unavailable" if reasons else "ready"}
        if reasons:
            payload["reasons"] = reasons
        return json_response(payload, 503 if reasons else 200)

    def metrics_allowed(self, request: Request) -> bool:
        """``/metrics``' own access rule: ``Authorization: Bearer <metrics.token>``
        when a token is set (compared in constant time), else loopback clients only."""
        token = self.config.metrics.token
        if not token:
            return request.is_loopback
        scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.encode()
        )

    async def _metrics(self, request: Request, conn: Exchange) -> Response:
        if not self.metrics_allowed(request):
            if self.config.metrics.token:
                response = error_response(401, "unauthorized: missing or wrong metrics token")
                response.headers.append(("WWW-Authenticate", "Bearer"))
                return response
            return error_response(403, "forbidden: /metrics answers loopback clients only")
        body = self.metrics.render()
        return Response(200, body=body, headers=[("Content-Type", CONTENT_TYPE)])

    async def _listen_for_metrics(self, port: int, reuse_port: bool) -> None:
        """``/metrics`` alone on ``[metrics] port`` (same access rule), e.g. for a
        scrape network apart from the clients' one."""
        router = Router()
        router.add("GET", "/metrics", self._metrics)
        config = self.config
        site = Site(router, self.cors, config.limits, config.timeouts, self.connections)
        self._metrics_listener = await listen(
            lambda: HTTPConnection(site),
            host=config.host,
            port=port,
            reuse_port=reuse_port,
        )
        log.info("metrics on port %d", self._metrics_listener.sockets[0].getsockname()[1])

    async def _tidings_js(self, request: Request, conn: Exchange) -> Response:
        return _static_response(
            self._static["tidings.js"], "application/javascript; charset=utf-8", "./tidings.d.ts"
        )

    async def _tidings_shared_js(self, request: Request, conn: Exchange) -> Response:
        return _static_response(
            self._static["tidings-shared.js"],
            "application/javascript; charset=utf-8",
            "./tidings-shared.d.ts",
        )

    async def _tidings_worker_js(self, request: Request, conn: Exchange) -> Response:
        return _static_response(
            self._static["tidings-worker.js"], "application/javascript; charset=utf-8"
        )

    async def _tidings_d_ts(self, request: Request, conn: Exchange) -> Response:
        return _static_response(self._static["tidings.d.ts"], _TYPESCRIPT)

    async def _tidings_shared_d_ts(self, request: Request, conn: Exchange) -> Response:
        return _static_response(self._static["tidings-shared.d.ts"], _TYPESCRIPT)

    async def _demo(self, request: Request, conn: Exchange) -> Response:
        if not self.config.demo:
            return error_response(404, "the demo is off: start the server with --demo")
        return _static_response(self._static["demo.html"], "text/html; charset=utf-8")


def _unix_socket(path: str) -> socket.socket:
    """A stream socket bound at ``path``; a stale socket file left there is replaced.

    Only a socket file is removed (as uvicorn does), never a regular file
    someone pointed ``--uds`` at by mistake.
    """
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    return sock


def _read_static(*names: str) -> dict[str, bytes]:
    """The browser files shipped in the package, read once at start."""
    files = importlib.resources.files("tidings") / "static"
    return {name: (files / name).read_bytes() for name in names}


#: TypeScript has no registered media type, and the mime tables give ``.ts`` to MPEG transport
#: streams (``video/mp2t``); this is the type Deno serves and reads for TypeScript.
_TYPESCRIPT = "application/typescript; charset=utf-8"


def _static_response(body: bytes, content_type: str, types: str | None = None) -> Response:
    """A shipped file; ``types`` names its declarations (``X-TypeScript-Types``, relative
    to the module's URL), which Deno reads to type a module imported by URL."""
    headers = [("Content-Type", content_type), ("Cache-Control", "no-cache")]
    if types is not None:
        headers.append(("X-TypeScript-Types", types))
    return Response(200, body=body, headers=headers)


__all__ = ["Server", "Transport"]
