"""``tidings.Tidings``: tidings as a library, inside a Python program's own event loop.

One object holds the configuration (the same tree as the CLI's), the
application's hooks, and — while it serves — one :class:`~tidings.server.Server`.
Ways to run it (and :meth:`Tidings.asgi`, through an ASGI server), one code
path under each, and its operations:

- ``async with rt.serve(port=8001):`` inside a host application's loop (a
  FastAPI/Starlette ``lifespan``, aiohttp's ``cleanup_ctx``, Django's ASGI
  lifespan): its own listener, no signal handlers (the host owns them);
- ``tidings serve --app module:rt`` (``--workers N`` too), where the CLI
  calls :meth:`Tidings.run`, which waits for SIGTERM/SIGINT;
- the operations (:meth:`Tidings.publish`, :meth:`Tidings.history`, ...) while
  it serves: the server API's own methods (:class:`~tidings.api.ServerAPI`),
  called without HTTP. Their arguments are encoded and decoded by the API's
  decoders, so a call from Python is checked exactly as the same call over
  HTTP (3.6 µs per publish, see :meth:`Tidings._decode`), and errors are
  the same :class:`~tidings.errors.ProtocolError` with the same codes.

Hooks are registered with decorators before serving. Each server gets a
fresh :class:`~tidings.hooks.Hooks` filled from :attr:`Tidings.hooks` (see
:meth:`Tidings._hooks_for`), so that what one server adds to its hooks (the
proxy's callables, the webhooks' listener) never outlives it: serving twice
in one process starts from the same registrations.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar, overload

import msgspec

from .api import (
    BroadcastResult,
    ChannelsResult,
    HistoryResult,
    InfoResult,
    PublishResult,
    StreamPosition,
    decode_params,
)
from .asgi import ASGIApp
from .centrifuge.schema import PresenceResult, PresenceStatsResult
from .config import Config, ConfigError, load_config
from .errors import DisconnectCode
from .hooks import (
    ChannelEvent,
    ConnectHook,
    DisconnectEvent,
    EventHook,
    EventKind,
    Hooks,
    MemberEvent,
    PublishHook,
    RefreshHook,
    RPCHandler,
    SubRefreshHook,
    SubscribeHook,
)
from .server import Server

__all__ = ["Tidings"]

_Connect = TypeVar("_Connect", bound=ConnectHook)
_Refresh = TypeVar("_Refresh", bound=RefreshHook)
_Subscribe = TypeVar("_Subscribe", bound=SubscribeHook)
_SubRefresh = TypeVar("_SubRefresh", bound=SubRefreshHook)
_Publish = TypeVar("_Publish", bound=PublishHook)
_RPC = TypeVar("_RPC", bound=RPCHandler)
_OnDisconnect = TypeVar("_OnDisconnect", bound=Callable[[DisconnectEvent], Awaitable[None]])
_OnChannel = TypeVar("_OnChannel", bound=Callable[[ChannelEvent], Awaitable[None]])
_OnMember = TypeVar("_OnMember", bound=Callable[[MemberEvent], Awaitable[None]])

#: The decision hooks that take one callable each, by their attribute on Hooks.
_SINGLE = ("connect", "refresh", "subscribe", "sub_refresh", "publish")


class Tidings:
    """A tidings server as an object of your program. See the module docstring.

    ``config`` is the same tree as the CLI's configuration (``Config()``:
    the defaults). Register hooks with the decorators, then serve.
    """

    def __init__(self, config: Config | None = None) -> None:
        #: The configuration every :meth:`serve` starts from.
        self.config = config if config is not None else Config()
        #: The registered hooks (what the decorators fill).
        self.hooks = Hooks(
            timeout=self.config.hooks.timeout,
            vacated_delay=self.config.hooks.vacated_delay,
            max_pending_events=self.config.hooks.max_pending_events,
        )
        self._events: list[tuple[EventKind, EventHook]] = []
        self._server: Server | None = None

    @classmethod
    def from_config(
        cls,
        source: str | os.PathLike[str] | Mapping[str, Any],
        *,
        env: Mapping[str, str] | None = None,
    ) -> Tidings:
        """Build from a TOML file's path or a dict of the same tree.

        ``env`` (say ``os.environ``) adds the ``TIDINGS_*`` variables on top,
        as the CLI does; without it only ``source`` counts. An invalid value
        raises :class:`~tidings.errors.ConfigError` naming the key.
        """
        if isinstance(source, Mapping):
            try:
                base = msgspec.convert(dict(source), Config, strict=False)
            except (msgspec.ValidationError, ValueError) as exc:
                raise ConfigError(str(exc)) from None
            return cls(load_config(None, env, base=base) if env is not None else base)
        return cls(load_config(os.fspath(source), env))

    # -- decision hooks ----------------------------------------------------

    def _set(self, name: str, hook: Any) -> None:
        """One callable per decision: a second one is a mistake, said at once."""
        if self._server is not None:
            raise RuntimeError(f"on_{name}: register hooks before serve()")
        registered = getattr(self.hooks, name)
        if registered is not None:
            raise ValueError(
                f"on_{name}: a {name} hook is already registered "
                f"({_qualified(registered)}); a Tidings has one, so combine them in one function"
            )
        setattr(self.hooks, name, hook)

    def on_connect(self, hook: _Connect) -> _Connect:
        """``hook(ConnectCall)`` decides who a connecting client is (a
        :class:`~tidings.hooks.ConnectReply`), leaves it to the token (None),
        or raises :class:`~tidings.hooks.Refuse`/:class:`~tidings.hooks.Disconnect`."""
        self._set("connect", hook)
        return hook

    def on_refresh(self, hook: _Refresh) -> _Refresh:
        """``hook(RefreshCall)``: a connection's ``expire_at`` came; extend it or end it."""
        self._set("refresh", hook)
        return hook

    def on_subscribe(self, hook: _Subscribe) -> _Subscribe:
        """``hook(SubscribeCall)``: may the client subscribe to a channel it has no token for?"""
        self._set("subscribe", hook)
        return hook

    def on_sub_refresh(self, hook: _SubRefresh) -> _SubRefresh:
        """``hook(SubRefreshCall)``: a subscription's ``expire_at`` came."""
        self._set("sub_refresh", hook)
        return hook

    def on_publish(self, hook: _Publish) -> _Publish:
        """``hook(PublishCall)``: allow (maybe replacing the data), refuse, or no opinion."""
        self._set("publish", hook)
        return hook

    @overload
    def on_rpc(self, method: str) -> Callable[[_RPC], _RPC]: ...

    @overload
    def on_rpc(self, method: _RPC) -> _RPC: ...

    def on_rpc(self, method: str | _RPC) -> Callable[[_RPC], _RPC] | _RPC:
        """``@on_rpc("name")``: the handler of one RPC method; bare ``@on_rpc``:
        the handler of every method without its own. It returns any JSON value."""
        if not isinstance(method, str):
            self._set("rpc_fallback", method)
            return method
        name = method

        def register(handler: _RPC) -> _RPC:
            if self._server is not None:
                raise RuntimeError("on_rpc: register hooks before serve()")
            if name in self.hooks.rpc:
                raise ValueError(
                    f"on_rpc({name!r}): already handled by {_qualified(self.hooks.rpc[name])}"
                )
            self.hooks.rpc[name] = handler
            return handler

        return register

    # -- event hooks ---------------------------------------------------------

    def _on(self, kind: EventKind, hook: EventHook) -> None:
        if self._server is not None:
            raise RuntimeError(f"on_{kind}: register hooks before serve()")
        self._events.append((kind, hook))
        self.hooks.on(kind, hook)

    def on_disconnect(self, hook: _OnDisconnect) -> _OnDisconnect:
        """``hook(DisconnectEvent)`` after every disconnect, with its code and reason."""
        self._on("disconnect", hook)
        return hook

    def on_channel_occupied(self, hook: _OnChannel) -> _OnChannel:
        """``hook(ChannelEvent)`` when a channel gets its first subscriber (in the cluster)."""
        self._on("occupied", hook)
        return hook

    def on_channel_vacated(self, hook: _OnChannel) -> _OnChannel:
        """``hook(ChannelEvent)`` when a channel has stayed empty ``hooks.vacated_delay`` s."""
        self._on("vacated", hook)
        return hook

    def on_join(self, hook: _OnMember) -> _OnMember:
        """``hook(MemberEvent)`` when a client joins a channel's presence."""
        self._on("join", hook)
        return hook

    def on_leave(self, hook: _OnMember) -> _OnMember:
        """``hook(MemberEvent)`` when a client leaves a channel's presence."""
        self._on("leave", hook)
        return hook

    def _hooks_for(self, config: Config) -> Hooks:
        """A fresh Hooks for one server: the registrations, ``config``'s [hooks] settings."""
        hooks = Hooks(
            timeout=config.hooks.timeout,
            vacated_delay=config.hooks.vacated_delay,
            max_pending_events=config.hooks.max_pending_events,
        )
        for name in (*_SINGLE, "rpc_fallback"):
            setattr(hooks, name, getattr(self.hooks, name))
        hooks.rpc.update(self.hooks.rpc)
        for kind, hook in self._events:
            hooks.on(kind, hook)
        return hooks

    # -- serving -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def serve(
        self, host: str | None = None, port: int | None = None, *, uds: str | None = None
    ) -> AsyncIterator[Tidings]:
        """Serve in the running loop for the ``async with`` block; stop cleanly after it.

        ``host`` and ``port`` override the configuration's (``port=0``: any
        free port, see :attr:`url`); ``uds`` listens on a Unix socket at that
        path instead. No signal handler is installed: the host application
        owns the process. On exit connections are told to come back later
        (as on SIGTERM), within ``timeouts.shutdown`` seconds.
        """
        if self._server is not None:
            raise RuntimeError("this Tidings is already serving")
        changes: dict[str, Any] = {}
        if host is not None:
            changes["host"] = host
        if port is not None:
            changes["port"] = port
        config = msgspec.structs.replace(self.config, **changes) if changes else self.config
        server = Server(config, hooks=self._hooks_for(config))
        try:
            await server.start(uds=uds)
        except BaseException:
            await server.shutdown()
            raise
        self._server = server
        try:
            yield self
        finally:
            self._server = None
            await server.shutdown()
            await server.hooks.drain(config.timeouts.shutdown)

    async def run(
        self, config: Config | None = None, *, reuse_port: bool = False, uds: str | None = None
    ) -> None:
        """Serve until SIGTERM or SIGINT, then shut down: ``tidings serve`` (and each worker).

        ``config`` replaces :attr:`config` (the CLI's flags and environment
        merged over it); ``reuse_port`` lets worker processes share a port.
        """
        config = config if config is not None else self.config
        server = Server(config, hooks=self._hooks_for(config))
        await server.start(reuse_port=reuse_port, uds=uds)
        self._server = server
        try:
            await server.serve_forever()
        finally:
            self._server = None
            await server.hooks.drain(config.timeouts.shutdown)

    def asgi(self) -> ASGIApp:
        """This object as an ASGI application, for an existing ASGI server on its port.

        ``uvicorn module:app`` with ``app = rt.asgi()`` (hypercorn and granian
        alike): the same transports and protocols, the slower path
        (docs/asgi.md). The ASGI server's lifespan starts the server, built
        from the hooks registered by then, and stops it; meanwhile the
        operations (:meth:`publish`...) reach it as under :meth:`serve`.
        """
        if self._server is not None:
            raise RuntimeError("this Tidings is already serving")

        def serving(server: Server | None) -> None:
            self._server = server

        return ASGIApp(
            lambda: Server(self.config, hooks=self._hooks_for(self.config)), on_serving=serving
        )

    @property
    def serving(self) -> bool:
        return self._server is not None

    @property
    def server(self) -> Server:
        """The running server (its hub, connections...); RuntimeError when not serving."""
        if self._server is None:
            raise RuntimeError(
                "this Tidings is not serving: "
                "use `async with rt.serve(...)` or `tidings serve --app`"
            )
        return self._server

    @property
    def url(self) -> str:
        """``http://host:port`` of the listener (the real port with ``port=0``),
        or ``unix:/path`` on a Unix socket."""
        return self.server.url

    # -- operations: the server API's methods, without HTTP --------------------

    def _decode(self, method: str, fields: Mapping[str, Any]) -> Any:
        """``method``'s parameters, checked by the API's own decoder.

        Encoding the arguments and decoding them with the decoder of
        ``POST /api/<method>`` gives Python callers the same bounds, the same
        UTF-8 and raw-JSON checks and the same 107 messages as HTTP ones: one
        rule in one place. It costs 3.6 µs per small publish (4.1 µs, against
        0.5 µs to build ``PublishParams`` directly, best of 5 x 200,000 with
        ``timeit``), of 27.6 µs for a whole ``rt.publish`` to the memory
        broker, on this 2-core VM.
        """
        return self.server.api.decode(method, msgspec.json.encode(fields))

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        idempotency_key: str | None = None,
        skip_history: bool = False,
        tags: Mapping[str, str] | None = None,
        exclude: Iterable[str] = (),
    ) -> PublishResult:
        """Publish ``data`` (any JSON value, or ``bytes`` of raw JSON) to ``channel``.

        ``idempotency_key``: a repeat within the broker's window returns the
        first result without publishing again; ``skip_history``: delivered
        live only; ``exclude``: client ids that must not receive it.
        Raises :class:`~tidings.errors.ProtocolError` (107 bad data or name,
        102 unknown namespace, :class:`~tidings.errors.BrokerUnavailable`).
        """
        fields = _publish_fields(data, idempotency_key, skip_history, tags, exclude)
        fields["channel"] = channel
        return await self.server.api.publish(self._decode("publish", fields))

    async def broadcast(
        self,
        channels: Iterable[str],
        data: Any,
        *,
        idempotency_key: str | None = None,
        skip_history: bool = False,
        tags: Mapping[str, str] | None = None,
        exclude: Iterable[str] = (),
    ) -> BroadcastResult:
        """Publish the same ``data`` to each of ``channels``: one response per channel,
        each a ``result`` or an ``error`` (a failure of one does not stop the others)."""
        fields = _publish_fields(data, idempotency_key, skip_history, tags, exclude)
        fields["channels"] = list(channels)
        return await self.server.api.broadcast(self._decode("broadcast", fields))

    async def history(
        self,
        channel: str,
        *,
        limit: int | None = None,
        since: StreamPosition | None = None,
        reverse: bool = False,
    ) -> HistoryResult:
        """The channel's publications (``limit=-1``: all kept; None or 0: none, only the
        top position), after ``since`` when given (112 when history no longer reaches it)."""
        fields: dict[str, Any] = {"channel": channel, "reverse": reverse}
        if limit is not None:
            fields["limit"] = limit
        if since is not None:
            fields["since"] = since
        return await self.server.api.history(self._decode("history", fields))

    async def presence(self, channel: str) -> PresenceResult:
        """Who is subscribed, by client id (namespaces with ``presence``; else 108)."""
        return await self.server.api.presence(self._decode("presence", {"channel": channel}))

    async def presence_stats(self, channel: str) -> PresenceStatsResult:
        """How many clients and distinct users are subscribed."""
        params = self._decode("presence_stats", {"channel": channel})
        return await self.server.api.presence_stats(params)

    async def channels(self, pattern: str = "") -> ChannelsResult:
        """Channels with subscribers on this node (matching the glob ``pattern``)."""
        return await self.server.api.channels(self._decode("channels", {"pattern": pattern}))

    async def info(self) -> InfoResult:
        """This node: id, name, version, clients, channels, uptime."""
        return await self.server.api.info(self._decode("info", {}))

    async def disconnect(
        self,
        user: str,
        *,
        client: str = "",
        code: int = DisconnectCode.FORCE_DISCONNECT,
        reason: str = "force disconnect",
    ) -> None:
        """Close the user's connections (only ``client``'s when given) with ``code``
        (3000-4999; from 3500 the SDKs do not reconnect) on every transport."""
        fields = {"user": user, "client": client, "disconnect": {"code": code, "reason": reason}}
        await self.server.api.disconnect(self._decode("disconnect", fields))

    async def unsubscribe(self, user: str, channel: str, *, client: str = "") -> None:
        """Take the user's connections out of ``channel``."""
        fields = {"user": user, "channel": channel, "client": client}
        await self.server.api.unsubscribe(self._decode("unsubscribe", fields))

    async def subscribe(self, user: str, channel: str, *, client: str = "") -> None:
        """Subscribe the user's live connections (WebSocket and its emulation) to
        ``channel``; returns once each has joined, so a publication made next reaches it."""
        fields = {"user": user, "channel": channel, "client": client}
        await self.server.api.subscribe(self._decode("subscribe", fields))

    async def refresh(
        self,
        user: str,
        *,
        client: str = "",
        expire_at: int = 0,
        info: Any = None,
        expired: bool = False,
    ) -> None:
        """Give the user's connections a new expiry (Unix seconds; 0: never) and
        connection ``info`` (None keeps it), or end them now (``expired=True``)."""
        fields: dict[str, Any] = {
            "user": user,
            "client": client,
            "expire_at": expire_at,
            "expired": expired,
        }
        if info is not None:
            fields["info"] = _raw(info)
        await self.server.api.refresh(self._decode("refresh", fields))


#: Checks that bytes given as raw JSON are one JSON value, without building it.
_ONE_JSON_VALUE = msgspec.json.Decoder(msgspec.Raw)


def _raw(value: Any) -> Any:
    """``bytes`` are raw JSON, checked here to be one JSON value in UTF-8 (107
    otherwise) before they are embedded in the call's body, where bytes such
    as ``1,"channel":"x"`` would otherwise add fields of their own; anything
    else is a JSON value msgspec encodes (TypeError if it cannot)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return decode_params(_ONE_JSON_VALUE, bytes(value))
    return value


def _publish_fields(
    data: Any,
    idempotency_key: str | None,
    skip_history: bool,
    tags: Mapping[str, str] | None,
    exclude: Iterable[str],
) -> dict[str, Any]:
    fields: dict[str, Any] = {"data": _raw(data), "skip_history": skip_history}
    if idempotency_key is not None:
        fields["idempotency_key"] = idempotency_key
    if tags is not None:
        fields["tags"] = dict(tags)
    excluded = list(exclude)
    if excluded:
        fields["exclude"] = excluded
    return fields


def _qualified(hook: Any) -> str:
    return f"{getattr(hook, '__module__', '?')}.{getattr(hook, '__qualname__', repr(hook))}"
