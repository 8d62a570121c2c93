"""Configuration: one typed tree, validated once, from four layers.

Precedence, lowest to highest: built-in defaults, the TOML file, ``TIDINGS_*``
environment variables, command-line flags. msgspec validates the merged tree,
so every bound lives in the type annotations below and an invalid value is
reported once, naming the key and where it came from.

Environment variables map to keys by name: ``TIDINGS_PORT`` is ``port``,
``TIDINGS_LIMITS__MAX_BODY_SIZE`` is ``limits.max_body_size`` (a double
underscore descends into a section). List values are comma-separated.
"""

from __future__ import annotations

import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from .errors import ConfigError
from .stream import HistoryPolicy

__all__ = ["Config", "ConfigError", "Subscribers", "Who", "load_config"]

PositiveFloat = Annotated[float, Meta(gt=0)]
NonNegativeFloat = Annotated[float, Meta(ge=0)]
Size = Annotated[int, Meta(ge=1)]

#: Environment variables read by the client commands, not by the server.
CLIENT_ENV = frozenset({"TIDINGS_URL"})


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class LimitsConfig(_Section):
    """Every bound on what a client may make the server hold (DESIGN principle 4)."""

    max_request_head: Annotated[int, Meta(ge=1024)] = 16 * 1024
    max_body_size: Size = 1024 * 1024
    max_channels_per_connection: Size = 128
    max_write_buffer: Annotated[int, Meta(ge=4096)] = 1024 * 1024
    max_channel_length: Annotated[int, Meta(ge=1, le=1024)] = 255
    max_pipelined_requests: Size = 32
    #: Channels the memory broker holds at once (published to or subscribed); past it, 106.
    max_channels: Size = 100_000
    #: Bytes all history of the memory broker may hold; past it the oldest is evicted.
    max_history_memory: Size = 256 * 1024 * 1024
    #: Connections of every kind this process holds at once (HTTP keep-alive, held
    #: polls, SSE streams, WebSockets); past it a new one is answered 503 with
    #: Retry-After. Unset: the RLIMIT_NOFILE soft limit minus a reserve of an
    #: 32nd of it, at least 64 (tidings.connections.default_max_connections);
    #: 0: no cap, only the file limit.
    max_connections: Annotated[int, Meta(ge=0)] | None = None
    #: Commands one ``POST /api/batch`` may carry; past it the whole batch is
    #: refused (400, code 106). The body limit bounds it too.
    max_batch_commands: Size = 1000
    #: Seconds a publish's ``idempotency_key`` is remembered per channel: a
    #: repeat within it returns the first result and publishes nothing
    #: (Centrifugo's window is 5 minutes).
    idempotency_window: PositiveFloat = 300.0
    #: Idempotency keys one process remembers at once (memory and NATS
    #: brokers; Redis keeps them in Redis); past it the oldest are forgotten
    #: early. About 360 bytes each, whatever the key's length.
    max_idempotency_keys: Size = 100_000


class TimeoutsConfig(_Section):
    keepalive: PositiveFloat = 5.0
    request: PositiveFloat = 10.0
    shutdown: PositiveFloat = 5.0
    #: Seconds an HTTP client may leave answers untaken (over the buffer limit, or closing).
    write: PositiveFloat = 30.0
    #: Seconds a publish, subscribe, recovery, history or presence call waits on
    #: the broker for a client before answering the temporary error (code 100).
    broker: PositiveFloat = 5.0
    #: Seconds between SIGTERM and the start of the shutdown, during which the
    #: server still accepts and serves but ``/ready`` answers 503, so a load
    #: balancer or Kubernetes stops sending clients first (docs/deployment.md).
    drain: NonNegativeFloat = 0.0


class SSEConfig(_Section):
    retry_ms: Annotated[int, Meta(ge=0)] = 3000
    heartbeat_interval: PositiveFloat = 15.0


class PollConfig(_Section):
    default_timeout: NonNegativeFloat = 30.0
    max_timeout: NonNegativeFloat = 60.0


class HistoryConfig(_Section):
    """History kept per channel, so that clients that drop off can resume."""

    size: Annotated[int, Meta(ge=0)] = 100
    ttl: PositiveFloat = 300.0
    #: How long a channel's epoch and offset outlive its last publication when
    #: nobody is subscribed; a client coming back later is told "not recovered".
    meta_ttl: PositiveFloat = 3600.0


class WebSocketConfig(_Section):
    ping_interval: PositiveFloat = 25.0
    pong_timeout: PositiveFloat = 8.0
    connect_timeout: PositiveFloat = 10.0
    handshake_timeout: PositiveFloat = 10.0
    compression: bool = True
    compression_threshold: Annotated[int, Meta(ge=0)] = 256
    max_message_size: Annotated[int, Meta(ge=125)] = 65536


class AuthConfig(_Section):
    """Keys that verify client tokens (JWT). Configuring any key turns on secure defaults.

    Each key accepts exactly one algorithm: ``hmac_secret`` HS256,
    ``rsa_public_key`` RS256, ``ecdsa_public_key`` ES256 (PEM text or a path
    to a PEM file). A token signed with any other algorithm, ``none``
    included, is refused, so an RSA public key can never be used as an HMAC
    secret.
    """

    hmac_secret: str = ""
    rsa_public_key: str = ""
    ecdsa_public_key: str = ""
    #: Clock skew tolerated on ``exp``, ``nbf`` and ``iat``, in seconds.
    leeway: Annotated[float, Meta(ge=0, le=300)] = 5.0
    #: Cookie that may carry the connection token on the HTTP transports.
    cookie: str = "tidings_token"
    #: Seconds a connection may outlive its token before it is closed (3005),
    #: the time a client has to refresh.
    expiry_grace: NonNegativeFloat = 10.0

    @property
    def enabled(self) -> bool:
        return bool(self.hmac_secret or self.rsa_public_key or self.ecdsa_public_key)


Who = Literal["nobody", "subscribers", "any"]
#: Who may subscribe to a namespace's channels without a subscription token.
Subscribers = Literal["anonymous", "authenticated", "token"]


class NamespaceConfig(_Section):
    """The policy of a namespace: the part of a channel name before ``:``.

    ``subscribe`` and ``publish`` default to the development values
    (``anonymous`` and ``subscribers``) when no auth key is configured, and to
    ``authenticated`` and ``nobody`` once one is.
    """

    subscribe: Subscribers | None = None
    publish: Who | None = None
    #: History kept per channel of the namespace; unset means the [history] values.
    history_size: Annotated[int, Meta(ge=0)] | None = None
    history_ttl: PositiveFloat | None = None
    history: Who = "subscribers"
    presence: bool = False
    presence_read: Who = "subscribers"
    join_leave: bool = False
    #: With ``join_leave``: a subscriber is pushed its own join too (Centrifugo's
    #: option of this name; its SDKs' ``joinLeave`` subscription option asks the same).
    force_push_join_leave: bool = False
    #: Delta compression a subscriber may ask for (``delta: "fossil"`` in its
    #: subscribe, Centrifugo's option of this name): then each publication
    #: reaches it as a Fossil delta against the channel's previous one. Off by
    #: default: a delta costs the server one encoding per publication.
    allowed_delta_types: list[Literal["fossil"]] = msgspec.field(default_factory=list)
    #: A client's own publications reach it too (false: they reach every other
    #: subscriber but not the connection that published; centrifugo #274).
    echo_publications: bool = True


class BrokerConfig(_Section):
    """Where publications get their offsets and how they reach every process.

    ``memory`` (the default) keeps everything in this process; ``redis`` and
    ``nats`` let several processes and machines share channels.
    """

    type: Literal["memory", "redis", "nats"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    nats_url: str = "nats://127.0.0.1:4222"
    #: Messages of one channel that may wait in a node before NATS drops more
    #: (a slow consumer: the channel restarts and its subscribers resync).
    nats_pending_limit: Annotated[int, Meta(ge=1)] = 512 * 1024
    #: After a lost Redis pub/sub link, live publications of one channel a
    #: node holds while it reads what the link missed; past it the channel
    #: restarts and its subscribers resync (docs/deployment.md).
    redis_hold_limit: Annotated[int, Meta(ge=1)] = 1000
    #: The same bound in bytes of publication data, over all channels at once.
    redis_hold_bytes: Annotated[int, Meta(ge=1)] = 64 * 1024 * 1024
    #: Channels whose missed publications are read in one pipelined round trip.
    redis_catch_up_batch: Annotated[int, Meta(ge=1)] = 500
    #: Prefix of every key and subject, so several deployments can share a broker.
    prefix: str = "tidings"
    #: Seconds a presence entry outlives the last refresh of its node (Redis):
    #: how long a crashed node's clients stay listed.
    presence_ttl: Annotated[float, Meta(ge=1.0)] = 60.0


class PersonalChannelConfig(_Section):
    """Centrifugo's ``client.subscribe_to_user_personal_channel``.

    When enabled, a WebSocket client connecting as a user (a token with a
    non-empty ``sub``) is subscribed by the server to its personal channel,
    ``#<user>`` or ``<namespace>:#<user>``, as to a token's ``channels``.
    """

    enabled: bool = False
    #: The namespace of the personal channel; "" for the default one.
    personal_channel_namespace: str = ""
    #: Centrifugo's "one connection per user"; not supported (must stay false).
    single_connection: bool = False


class ClientConfig(_Section):
    """What the server does for a WebSocket client on its own initiative."""

    subscribe_to_user_personal_channel: PersonalChannelConfig = msgspec.field(
        default_factory=PersonalChannelConfig
    )


class HooksConfig(_Section):
    """How the application's hooks (Python or the HTTP proxy) are run (docs/hooks.md)."""

    #: Seconds a decision hook (connect, subscribe, publish, rpc, refresh) may
    #: take; past it the client gets a temporary error (code 100).
    timeout: PositiveFloat = 5.0
    #: Seconds a channel must stay without subscribers before ``vacated`` fires.
    vacated_delay: NonNegativeFloat = 5.0
    #: Python event hooks (on_disconnect, on_join, ...) running at once; past
    #: it events are dropped and a warning is logged.
    max_pending_events: Size = 10_000


class ProxyConfig(_Section):
    """The hooks as HTTP calls to a backend, in Centrifugo's proxy format (docs/proxy.md).

    Each URL left empty leaves that decision to the tokens and namespace rules.
    """

    connect_url: str = ""
    refresh_url: str = ""
    subscribe_url: str = ""
    publish_url: str = ""
    rpc_url: str = ""
    sub_refresh_url: str = ""
    #: Seconds one proxy call may take, waiting for a free slot included (then
    #: the client gets a temporary error). Centrifugo's default; it must stay
    #: below ``hooks.timeout``, which bounds every decision.
    timeout: PositiveFloat = 1.0
    #: Request headers forwarded to the backend with the connect call (an
    #: allowlist, case-insensitive).
    http_headers: list[str] = msgspec.field(default_factory=list)
    #: Cookies forwarded to the backend with the connect call, by name (an allowlist).
    cookies: list[str] = msgspec.field(default_factory=list)
    #: Headers added to every proxy request (say, a secret the backend checks).
    static_headers: dict[str, str] = msgspec.field(default_factory=dict)
    #: Proxy calls in flight at once; more wait (bounded by the timeout).
    max_concurrency: Size = 64
    #: Bytes of a backend's answer read at most; a longer one is a failed call.
    max_response_size: Size = 1024 * 1024
    #: Centrifugo's ``binary_encoding``: client data goes as ``b64data``
    #: (base64) and ``encoding`` is ``"binary"``.
    binary_encoding: bool = False
    #: Namespaces whose channels the subscribe, publish and sub_refresh calls
    #: are made for ("" is the default namespace); unset: every namespace.
    #: Centrifugo's ``subscribe_proxy_enabled`` / ``publish_proxy_enabled`` /
    #: ``sub_refresh_proxy_enabled``, listed here instead of in each namespace.
    subscribe_namespaces: list[str] | None = None
    publish_namespaces: list[str] | None = None
    sub_refresh_namespaces: list[str] | None = None

    @property
    def hook_names(self) -> tuple[str, ...]:
        """The decisions proxied (those with a URL): none, no proxy is built,
        and aiohttp is not imported (tidings.server)."""
        names = ("connect", "refresh", "subscribe", "publish", "rpc", "sub_refresh")
        return tuple(name for name in names if getattr(self, f"{name}_url"))

    def __post_init__(self) -> None:
        for key in ("connect", "refresh", "subscribe", "publish", "rpc", "sub_refresh"):
            url = getattr(self, f"{key}_url")
            if url and not re.match(r"https?://[^/?#\s]+", url):
                raise ValueError(f"proxy.{key}_url: an http:// or https:// URL, not {url!r}")


class WebhooksConfig(_Section):
    """Events POSTed to a URL as signed JSON batches (docs/webhooks.md)."""

    #: Where batches are POSTed (http or https); empty: no webhooks.
    url: str = ""
    events: list[Literal["disconnect", "occupied", "vacated", "join", "leave"]] = msgspec.field(
        default_factory=lambda: ["disconnect", "occupied", "vacated", "join", "leave"]
    )
    #: Namespaces whose publications are sent too ("" is the default namespace).
    publications: list[str] = msgspec.field(default_factory=list)
    #: HMAC-SHA256 key signing each body (header ``X-Tidings-Signature``).
    secret: str = ""
    #: Seconds one POST may take, from connecting to the response's status.
    timeout: PositiveFloat = 5.0
    #: Events held while the receiver is slow or down; past it the oldest are
    #: dropped, counted and logged.
    max_queue: Size = 10_000
    #: Bytes those events may hold (publications carry their data); past it,
    #: the oldest are dropped as well.
    max_queue_bytes: Size = 16 * 1024 * 1024
    #: Events in one POST.
    max_batch: Size = 100
    #: Bytes of events in one POST (a larger single event goes alone).
    max_batch_bytes: Size = 1024 * 1024
    #: Seconds before the first retry of a failed POST; doubled at each
    #: failure, with jitter, up to ``max_retry_delay``.
    retry_delay: PositiveFloat = 0.5
    max_retry_delay: PositiveFloat = 30.0

    def __post_init__(self) -> None:
        if self.url and not _is_http_url(self.url):
            raise ValueError(f"webhooks.url: an http:// or https:// URL, not {self.url!r}")
        if self.retry_delay > self.max_retry_delay:
            raise ValueError("webhooks.retry_delay must not exceed webhooks.max_retry_delay")


class AdminConfig(_Section):
    """The admin page at ``/admin`` (docs/admin.md): off unless enabled, with a password.

    A password, not a token: a person types it once into the login form and
    the browser then holds an HttpOnly, SameSite=Strict session cookie that no
    script can read, where a token would live in the page's storage or its
    URL. The cookie is signed with a key derived from the password, so every
    worker accepts it and changing the password ends every session.
    """

    enabled: bool = False
    password: str = ""
    #: Seconds a login lasts; then the page asks for the password again.
    session_ttl: Annotated[float, Meta(ge=1)] = 8 * 3600.0

    def __post_init__(self) -> None:
        if self.enabled and not self.password:
            raise ValueError("admin.password: required when admin.enabled is true")


class MetricsConfig(_Section):
    """Prometheus metrics at ``/metrics`` (docs/observability.md).

    Without a token, only loopback clients are answered (a Prometheus on the
    same host or a sidecar); with one, any client sending
    ``Authorization: Bearer <token>``. ``port``: also serve ``/metrics`` alone
    on that port (of ``host``), for a scrape network apart from clients'.
    """

    enabled: bool = True
    token: str = ""
    port: Annotated[int, Meta(ge=0, le=65535)] | None = None


def _is_http_url(url: str) -> bool:
    """An absolute http(s) URL with a host and, if any, a port number in range."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number or out of range
    except ValueError:  # also a bracketed host that is no IPv6 address
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and url.isprintable()
        and not any(c.isspace() for c in url)
    )


class Config(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8000
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    #: ``text`` for a terminal; ``json``: one object per line for a log pipeline
    #: (tidings.logs.JSONFormatter). Read by ``tidings serve`` only.
    log_format: Literal["text", "json"] = "text"
    #: One INFO line per HTTP answer on logger ``tidings.access`` (method, path
    #: with credentials masked, status, bytes, duration, peer).
    access_log: bool = False
    loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    #: Processes sharing the port (SO_REUSEPORT); more than one needs a shared broker.
    workers: Annotated[int, Meta(ge=1, le=256)] = 1
    api_key: str = ""
    allowed_origins: list[str] = msgspec.field(default_factory=list)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = msgspec.field(default_factory=TimeoutsConfig)
    sse: SSEConfig = msgspec.field(default_factory=SSEConfig)
    poll: PollConfig = msgspec.field(default_factory=PollConfig)
    history: HistoryConfig = msgspec.field(default_factory=HistoryConfig)
    websocket: WebSocketConfig = msgspec.field(default_factory=WebSocketConfig)
    broker: BrokerConfig = msgspec.field(default_factory=BrokerConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    #: The namespace of channels without ``:`` in their name.
    channels: NamespaceConfig = msgspec.field(default_factory=NamespaceConfig)
    namespaces: dict[str, NamespaceConfig] = msgspec.field(default_factory=dict)
    client: ClientConfig = msgspec.field(default_factory=ClientConfig)
    hooks: HooksConfig = msgspec.field(default_factory=HooksConfig)
    proxy: ProxyConfig = msgspec.field(default_factory=ProxyConfig)
    webhooks: WebhooksConfig = msgspec.field(default_factory=WebhooksConfig)
    #: Serve the demo page at ``/demo``.
    demo: bool = False
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)

    def namespace(self, channel: str) -> NamespaceConfig | None:
        """The namespace configuration of ``channel``; None for an unknown namespace."""
        name = namespace_of(channel)
        return self.channels if not name else self.namespaces.get(name)

    def history_for(self, channel: str) -> HistoryPolicy:
        """The history ``channel`` keeps, from its namespace or [history]; the hub sends
        it with each publish, so that brokers need no configuration of their own."""
        namespace = self.namespace(channel) or self.channels
        size = namespace.history_size
        ttl = namespace.history_ttl
        return HistoryPolicy(
            self.history.size if size is None else size,
            self.history.ttl if ttl is None else ttl,
        )

    def __post_init__(self) -> None:
        if self.poll.default_timeout > self.poll.max_timeout:
            raise ValueError("poll.default_timeout must not exceed poll.max_timeout")
        for name in self.namespaces:
            if not name or ":" in name or not name.isprintable():
                raise ValueError(f"namespaces.{name}: a namespace name is non-empty, without ':'")
        personal = self.client.subscribe_to_user_personal_channel
        if personal.single_connection:
            raise ValueError(
                "client.subscribe_to_user_personal_channel.single_connection: not supported"
            )
        namespace = personal.personal_channel_namespace
        if namespace and namespace not in self.namespaces:
            raise ValueError(
                "client.subscribe_to_user_personal_channel.personal_channel_namespace: "
                f"{namespace!r} is not a configured namespace"
            )
        for key in ("subscribe", "publish", "sub_refresh"):
            for namespace in getattr(self.proxy, f"{key}_namespaces") or ():
                if namespace and namespace not in self.namespaces:
                    raise ValueError(
                        f"proxy.{key}_namespaces: {namespace!r} is not a configured namespace"
                    )
        for namespace in self.webhooks.publications:
            if namespace and namespace not in self.namespaces:
                raise ValueError(
                    f"webhooks.publications: {namespace!r} is not a configured namespace"
                )
        if self.workers > 1 and self.broker.type == "memory":
            raise ValueError(
                "workers: more than one process needs a shared broker "
                '(set broker.type = "redis" or "nats"); the memory broker lives in one process'
            )


def namespace_of(channel: str) -> str:
    """The namespace of a channel: the part before its first ``:``, or "" for none."""
    name, colon, _ = channel.partition(":")
    return name if colon else ""


def load_config(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    base: Config | None = None,
) -> Config:
    """Build the configuration from a TOML file, the environment and flags.

    ``overrides`` holds dotted keys (``{"port": 9000}``) from the command line;
    ``None`` values are skipped so that unset flags do not mask other layers.
    ``base``, when given, replaces the built-in defaults as the lowest layer
    (``tidings serve --app``: the application's own configuration).
    Raises :class:`ConfigError` with a message that names the offending key.
    """
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if base is not None:
        _merge(merged, msgspec.to_builtins(base), origin, lambda key: "the application")
    if path is not None:
        file_layer = _read_toml(path)
        _merge(merged, file_layer, origin, lambda key: path)
    if env is not None:
        _merge(merged, _env_layer(env), origin, lambda key: _env_name(key))
    if overrides:
        flags = _unflatten({k: v for k, v in overrides.items() if v is not None})
        _merge(merged, flags, origin, lambda key: "command line")
    try:
        return msgspec.convert(merged, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe(exc, origin, merged)) from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _env_name(key: str) -> str:
    return "TIDINGS_" + key.upper().replace(".", "__")


def _env_layer(env: Mapping[str, str]) -> dict[str, Any]:
    """Turn ``TIDINGS_*`` variables into a nested dict of strings."""
    layer: dict[str, Any] = {}
    sections = {f.name: f.type for f in msgspec.structs.fields(Config)}
    for name, value in env.items():
        if not name.startswith("TIDINGS_") or name in CLIENT_ENV:
            continue
        parts = name[len("TIDINGS_") :].lower().split("__")
        if parts[0] not in sections:
            raise ConfigError(f"{name}: unknown setting")
        if len(parts) == 1 and parts[0] == "allowed_origins":
            layer["allowed_origins"] = [o.strip() for o in value.split(",") if o.strip()]
            continue
        target = layer
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return layer


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        target = nested
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return nested


def _merge(
    into: dict[str, Any],
    layer: Mapping[str, Any],
    origin: dict[str, str],
    source: Any,
    prefix: str = "",
) -> None:
    """Deep-merge ``layer`` into ``into``, recording which layer set each key."""
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            # Recurse even into a new section, so each leaf records its own
            # source: an error then names TIDINGS_AUTH__LEEWAY, not TIDINGS_AUTH.
            if not isinstance(into.get(key), dict):
                into[key] = {}
            _merge(into[key], value, origin, source, dotted + ".")
        else:
            into[key] = value
        origin[dotted] = source(dotted)


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<field>[^`]+)`")


def _describe(
    exc: msgspec.ValidationError, origin: Mapping[str, str], merged: Mapping[str, Any]
) -> str:
    """Rewrite msgspec's ``... - at `$.a.b``` into ``a.b: ...`` with its source."""
    match = _AT.match(str(exc))
    message, path = (match["msg"], match["path"] or "") if match else (str(exc), "")
    path = _name_namespace(path, merged)
    key = re.sub(r"\[\d+\]$", "", path.lstrip("."))
    unknown = _UNKNOWN.match(message)
    if unknown:
        key = f"{key}.{unknown['field']}" if key else unknown["field"]
        message = "unknown key"
    where = None
    parts = key.split(".")
    while parts and where is None:  # a whole section may have come from one layer
        where = origin.get(".".join(parts))
        parts.pop()
    suffix = f" (from {where})" if where else ""
    return f"{key or 'config'}: {message}{suffix}"


def _name_namespace(path: str, merged: Mapping[str, Any]) -> str:
    """msgspec writes a dict key as ``[...]``: put back the failing namespace's name."""
    namespaces = merged.get("namespaces")
    if not path.startswith(".namespaces[...]") or not isinstance(namespaces, dict):
        return path
    for name, section in namespaces.items():
        try:
            msgspec.convert(section, NamespaceConfig, strict=False)
        except msgspec.ValidationError:
            return path.replace("[...]", f".{name}", 1)
    return path
