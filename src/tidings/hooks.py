"""Hooks: the application's say in who connects, what is subscribed, published and called.

A program embedding tidings (``tidings.Tidings``) registers async callables;
a backend in any language answers the same questions over HTTP (the proxy,
:mod:`tidings.proxy`, which registers its own callables here). Either way the
connection code asks one object, :class:`Hooks`, which it receives as a
dependency like the hub and the access rules.

Two kinds of hook:

**Decisions** run in the path of one client's command and change its outcome:
``connect``, ``refresh``, ``subscribe``, ``publish``, ``sub_refresh`` and the
``rpc`` handlers. Every decision hook follows one rule:

- it returns a reply (:class:`ConnectReply`, :class:`SubscribeReply`, ...):
  the hook decided, and the request is allowed on the reply's terms, whatever
  the namespace's rules would have said;
- it returns ``None``: the hook has no opinion, the usual rules decide (the
  connection token, the namespace's ``subscribe``/``publish`` policy);
- it raises :class:`Refuse` (an error reply with a code, the connection stays)
  or :class:`Disconnect` (the connection is closed with a code).

Anything else it raises is the application's bug: logged with its traceback,
and that one client gets an internal error (code 100, which SDKs retry). A
hook running past ``hooks.timeout`` seconds is cancelled and the client gets
the same temporary error. Other clients never wait on a hook: decisions run
in the task of the command that asked, never in the fan-out path.

**Events** are what happened: :class:`DisconnectEvent`, :class:`ChannelEvent`
(occupied, vacated), :class:`MemberEvent` (join, leave) and
:class:`PublicationEvent`. :meth:`Hooks.emit` hands each to every listener,
synchronously; a listener only queues (the Python ``on_*`` event hooks run as
bounded background tasks, webhooks batch their queue), so emitting costs the
emitter a function call per listener and nothing when there is none.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import msgspec

from .errors import ErrorCode, ProtocolError, TidingsError
from .logs import ClientErrorLimiter

__all__ = [
    "ChannelEvent",
    "ConnectCall",
    "ConnectReply",
    "Disconnect",
    "DisconnectEvent",
    "Event",
    "HookTimedOut",
    "Hooks",
    "MemberEvent",
    "PublicationEvent",
    "PublishCall",
    "PublishReply",
    "RPCCall",
    "RefreshCall",
    "RefreshReply",
    "Refuse",
    "SubRefreshCall",
    "SubRefreshReply",
    "SubscribeCall",
    "SubscribeReply",
    "encode_json",
]

log = logging.getLogger(__name__)

#: Transports as hooks and events name them (Centrifugo's names where it has them);
#: ``"http"`` is a call endpoint (``POST /call/<name>``), used by clients on SSE,
#: long-poll or poll for what they cannot send on their stream.
TransportName = Literal[
    "websocket", "sse", "longpoll", "poll", "http_stream", "sse_emulation", "http"
]


# -- what a hook may raise -----------------------------------------------------


class Refuse(ProtocolError):
    """Refuse the request with an error reply; the connection stays.

    ``code`` is one of :class:`~tidings.errors.ErrorCode` or an application
    code from 400 to 1999 (Centrifugo's range for custom errors). On the HTTP
    transports, codes map to statuses as the built-in errors do (103 → 403,
    101 → 401); an application code → 403 (the application refused: nothing
    is wrong with the request itself).
    """

    def __init__(
        self,
        code: int = ErrorCode.PERMISSION_DENIED,
        message: str = "",
        *,
        temporary: bool = False,
    ) -> None:
        known = code in ErrorCode._value2member_map_
        if not known and not 400 <= code <= 1999:
            raise ValueError(f"Refuse code {code}: a tidings error code or 400-1999")
        super().__init__(ErrorCode(code) if known else ErrorCode.PERMISSION_DENIED, message)
        #: The code the client sees (an application code stays itself).
        self.code = ErrorCode(code) if known else code  # type: ignore[assignment]
        if not message:
            self.message = "permission denied" if not known else self.message
        # Centrifugo's error ``temporary`` flag: SDKs retry (resubscribe) on it.
        self._temporary = temporary

    @property
    def temporary(self) -> bool:
        """Whether the SDK may retry: asked for, or a temporary code (100, 111)."""
        return self._temporary or super().temporary


class HookTimedOut(ProtocolError):
    """A decision hook ran past ``hooks.timeout``: code 100, as any internal error.

    A class of its own, as :class:`~tidings.errors.BrokerUnavailable` is,
    because it is known to pass (the application is slow, not broken): the
    HTTP transports answer it 503 with ``Retry-After``, which tidings.js and
    proxies retry on, where a hook that raised is a 500.
    """

    #: Seconds an HTTP client is asked to wait before retrying.
    RETRY_AFTER = 1

    def __init__(self, name: str) -> None:
        super().__init__(ErrorCode.INTERNAL, f"{name} hook timed out")


class Disconnect(TidingsError):
    """Close the client's connection with ``code`` (3000-4999) and ``reason``.

    On a WebSocket the close frame carries them; on the HTTP transports the
    request is answered 403 with the code and reason in the JSON error body.
    Codes from 3500 tell the SDKs not to reconnect; below, they reconnect.
    """

    def __init__(self, code: int = 3503, reason: str = "disconnected by the application") -> None:
        if not 3000 <= code <= 4999:
            raise ValueError(f"Disconnect code {code}: 3000-4999")
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


# -- calls (what a decision hook is asked) and replies ------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Call:
    #: How the client is connected.
    transport: TransportName
    #: ``"json"`` or ``"protobuf"`` (Centrifugo's protocol on WebSocket and its
    #: emulation); ``"http"`` for SSE, long-poll and poll.
    protocol: str
    #: The connection's id ("" on the HTTP transports, which have none).
    client: str
    #: The user id ("" for anonymous).
    user: str

    def data_json(self) -> Any:
        """The call's ``data`` decoded (None without data); see ``data``."""
        raw = getattr(self, "data", None)
        return None if not raw else msgspec.json.decode(raw)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConnectCall(_Call):
    """A client connecting (a WebSocket or emulation session, an SSE stream, a
    long-poll or poll request). ``user`` is the user of the connection token
    the client sent, verified ("" without one)."""

    #: Request headers, lowercased names (for the proxy: only its allowlist).
    headers: Mapping[str, str]
    #: Request cookies by name.
    cookies: Mapping[str, str]
    #: Raw JSON the client sent with its connect command (None without; always
    #: None on the HTTP transports). ``data_json()`` decodes it.
    data: bytes | None = None
    #: The peer address as the server saw it.
    remote: str = ""
    #: The SDK's ``name`` and ``version`` from its connect command, if any.
    name: str = ""
    version: str = ""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConnectReply:
    """Who the client is, as the application decided."""

    user: str
    #: Connection info, any JSON value: it travels with the client's
    #: publications, presence, joins and leaves.
    info: Any = None
    #: Unix time the connection expires at (then ``on_refresh`` is asked); 0: never.
    expire_at: int = 0
    #: Channels the server subscribes the client to (WebSocket and emulation);
    #: on SSE, long-poll and poll they are channels the client may follow.
    channels: Sequence[str] = ()
    #: Any JSON value returned to the client in its connect reply (WebSocket).
    data: Any = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RefreshCall(_Call):
    """A connection whose ``expire_at`` (from :class:`ConnectReply`) came."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RefreshReply:
    #: The new expiry (unix seconds); 0: never again.
    expire_at: int = 0
    #: New connection info; None keeps the old one.
    info: Any = None
    #: True: the connection is over (closed with 3005, the SDKs reconnect).
    expired: bool = False


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SubscribeCall(_Call):
    """A client asking for a channel it holds no subscription token for."""

    channel: str
    #: Raw JSON sent with the subscribe command (WebSocket), or None.
    data: bytes | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SubscribeReply:
    """The subscription is allowed; what it carries."""

    #: Channel info, any JSON value: in presence, joins and leaves.
    info: Any = None
    #: Unix time the subscription expires at (then ``on_sub_refresh``); 0: never.
    expire_at: int = 0
    #: Override the namespace's ``presence`` / ``join_leave`` for this subscription.
    presence: bool | None = None
    join_leave: bool | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SubRefreshCall(_Call):
    """A subscription whose ``expire_at`` (from :class:`SubscribeReply`) came."""

    channel: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SubRefreshReply:
    expire_at: int = 0
    info: Any = None
    #: True: the subscription is over (the client is unsubscribed, code 2501).
    expired: bool = False


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PublishCall(_Call):
    """A client publishing (WebSocket and emulation; the server API is not hooked)."""

    channel: str
    #: The raw JSON the client published.
    data: bytes


#: A :class:`PublishReply` field left as it was.
KEEP: Any = msgspec.UNSET


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PublishReply:
    """The publication is allowed, possibly changed."""

    #: Replacement data, any JSON value (``bytes`` are taken as raw JSON);
    #: :data:`KEEP` publishes what the client sent.
    data: Any = KEEP
    #: Not kept in history (delivered live only).
    skip_history: bool = False


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RPCCall(_Call):
    """A client's RPC (``client.rpc(method, data)`` in the SDKs)."""

    method: str
    #: Raw JSON sent with the call, or None.
    data: bytes | None = None


# -- events --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DisconnectEvent:
    """A connection ended (WebSocket and emulation sessions, SSE streams)."""

    kind: Literal["disconnect"] = "disconnect"
    client: str
    user: str
    transport: TransportName
    #: The close code and reason the client was given (3000 for a client that
    #: went away on its own, as Centrifugo's "connection closed").
    code: int
    reason: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ChannelEvent:
    """A channel got its first subscriber in the cluster, or lost its last one.

    Fired once per cluster (with Redis; per node with NATS, which keeps no
    shared state), by the node where it happened; ``vacated`` only after the
    channel stayed empty for ``hooks.vacated_delay`` seconds, so that a
    long-poll client between two polls does not make it flap.
    """

    kind: Literal["occupied", "vacated"]
    channel: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MemberEvent:
    """A client joined or left a channel's presence (namespaces with ``presence``
    or ``join_leave``), fired once by the node holding the client."""

    kind: Literal["join", "leave"]
    channel: str
    client: str
    user: str
    #: Raw JSON connection and channel info, or None.
    conn_info: bytes | None = None
    chan_info: bytes | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PublicationEvent:
    """A publication made on this node (once per cluster: the publishing node)."""

    kind: Literal["publication"] = "publication"
    channel: str
    #: Raw JSON data.
    data: bytes
    offset: int
    epoch: str
    user: str = ""
    client: str = ""


Event = DisconnectEvent | ChannelEvent | MemberEvent | PublicationEvent
EventKind = Literal["disconnect", "occupied", "vacated", "join", "leave", "publication"]

_Call_T = TypeVar("_Call_T")
_Reply_T = TypeVar("_Reply_T")

#: A decision hook: the call, then a reply, None (no opinion), or a raise.
Decision = Callable[[_Call_T], Awaitable[_Reply_T | None]]
ConnectHook = Decision[ConnectCall, ConnectReply]
RefreshHook = Decision[RefreshCall, RefreshReply]
SubscribeHook = Decision[SubscribeCall, SubscribeReply]
SubRefreshHook = Decision[SubRefreshCall, SubRefreshReply]
PublishHook = Decision[PublishCall, PublishReply]
#: An RPC handler returns any JSON value (``bytes`` are taken as raw JSON).
RPCHandler = Callable[[RPCCall], Awaitable[Any]]
#: Something told of every event; it must only queue, never block or raise.
Listener = Callable[[Event], None]
#: A Python event hook: awaited in a background task.
EventHook = Callable[[Any], Awaitable[None]]


def encode_json(value: Any) -> bytes | None:
    """An application's JSON value as raw JSON bytes (``bytes`` pass as they are).

    Refuses what cannot be encoded, or bytes that are not one JSON value, with
    a ``TypeError`` naming the problem: the hook's bug, reported as such.
    """
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            msgspec.json.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise TypeError(f"bytes returned by a hook are not one JSON value: {exc}") from None
        return raw
    return msgspec.json.encode(value)


class Hooks:
    """The registered hooks of one server and the listeners of its events.

    A server always has one; with nothing registered every check is one
    attribute read (``if hooks.connect is not None``), so a server without
    hooks costs what it did before they existed.
    """

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        vacated_delay: float = 5.0,
        max_pending_events: int = 10_000,
    ) -> None:
        #: Seconds a decision hook may run before its client gets a temporary error.
        self.timeout = timeout
        #: Seconds a channel must stay empty before ``vacated`` fires.
        self.vacated_delay = vacated_delay
        #: Python event hooks running at once; past it events are dropped (logged).
        self.max_pending_events = max_pending_events
        self.connect: ConnectHook | None = None
        self.refresh: RefreshHook | None = None
        self.subscribe: SubscribeHook | None = None
        self.sub_refresh: SubRefreshHook | None = None
        self.publish: PublishHook | None = None
        #: RPC handlers by method; ``rpc_fallback`` answers any other method
        #: (the proxy's one URL); with neither, an unknown method is 108.
        self.rpc: dict[str, RPCHandler] = {}
        self.rpc_fallback: RPCHandler | None = None
        #: True: a client that sent a connection token is admitted by the token
        #: alone and the ``connect`` hook is not asked (Centrifugo's connect
        #: proxy is only called for clients without a token; tidings.proxy sets it).
        self.connect_skips_tokens = False
        self._listeners: list[Listener] = []
        self._event_hooks: dict[str, list[EventHook]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._dropped = ClientErrorLimiter(max_lines=1)
        #: Namespaces whose publications are events ("" is the default one);
        #: None: none. Asked by the hub before it builds a PublicationEvent.
        self.publication_namespaces: frozenset[str] | None = None
        #: Told each decision's hook name, duration (seconds) and failure
        #: ("timeout", "error", or None for an answer or a refusal): the
        #: server's metrics (tidings.metrics); None: not timed.
        self.observe: Callable[[str, float, str | None], None] | None = None

    # -- decisions ---------------------------------------------------------

    @property
    def has_rpc(self) -> bool:
        return bool(self.rpc) or self.rpc_fallback is not None

    async def decide(self, name: str, hook: Callable[[Any], Awaitable[Any]], call: Any) -> Any:
        """Run one decision hook for one client: the one place hooks' failures are mapped.

        :class:`Refuse`, :class:`Disconnect` and other :class:`ProtocolError`
        pass through; a timeout is a temporary error (100), logged as a
        warning; any other exception is the application's bug, logged with its
        traceback, and an internal error (100) for this client only.
        """
        timeout = asyncio.timeout(self.timeout)
        started = time.perf_counter()
        failure: str | None = None
        try:
            async with timeout:
                return await hook(call)
        except (ProtocolError, Disconnect):
            raise
        except TimeoutError:
            failure = "error"
            if not timeout.expired():
                log.exception("%s hook failed", name)
                raise ProtocolError(ErrorCode.INTERNAL) from None
            failure = "timeout"
            log.warning("%s hook timed out after %gs (client %s)", name, self.timeout, call.client)
            raise HookTimedOut(name) from None
        except Exception:
            failure = "error"
            log.exception("%s hook failed (client %s)", name, call.client)
            raise ProtocolError(ErrorCode.INTERNAL) from None
        finally:
            if self.observe is not None:
                self.observe(name, time.perf_counter() - started, failure)

    async def call_rpc(self, call: RPCCall) -> bytes | None:
        """The handler of ``call.method`` (or the fallback); 108 when there is none."""
        handler = self.rpc.get(call.method, self.rpc_fallback)
        if handler is None:
            raise ProtocolError(ErrorCode.NOT_AVAILABLE)
        result = await self.decide(f"rpc {call.method!r}", handler, call)
        try:
            return encode_json(result)
        except TypeError:
            log.exception("rpc %r handler returned what is not JSON", call.method)
            raise ProtocolError(ErrorCode.INTERNAL) from None

    # -- events ------------------------------------------------------------

    @property
    def listening(self) -> bool:
        """Whether anything listens to events (emitters may skip building them)."""
        return bool(self._listeners)

    def add_listener(self, listener: Listener) -> None:
        """Be told of every event (webhooks); ``listener`` must only queue."""
        self._listeners.append(listener)

    def on(self, kind: EventKind, hook: EventHook) -> None:
        """Run ``hook(event)`` in a background task for every event of ``kind``."""
        if not self._event_hooks:
            self.add_listener(self._run_event_hooks)
        self._event_hooks.setdefault(kind, []).append(hook)

    def emit(self, event: Event) -> None:
        """Tell every listener; never raises, never blocks."""
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener %r failed on %s", listener, event.kind)

    def _run_event_hooks(self, event: Event) -> None:
        hooks = self._event_hooks.get(event.kind)
        if not hooks:
            return
        for hook in hooks:
            if len(self._tasks) >= self.max_pending_events:
                self._dropped.log(
                    log,
                    logging.WARNING,
                    "%d event hooks already running: %s event dropped (hooks.max_pending_events)",
                    len(self._tasks),
                    event.kind,
                )
                continue
            task = asyncio.get_running_loop().create_task(self._run_event_hook(hook, event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_event_hook(self, hook: EventHook, event: Event) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await hook(event)
        except TimeoutError:
            log.warning("on_%s hook timed out after %gs", event.kind, self.timeout)
        except Exception:
            log.exception("on_%s hook failed", event.kind)

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) for running event hooks: at shutdown."""
        if self._tasks:
            await asyncio.wait(tuple(self._tasks), timeout=timeout)
