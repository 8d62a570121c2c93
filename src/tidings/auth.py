"""Who may do what: tokens, namespaces and user-limited channels.

One :class:`Access` object per server answers every permission question, so
WebSocket, SSE, long-poll, poll and the server API enforce the same rules with
the same codes. Subscribing goes through one door,
:meth:`Access.authorize_subscribe`, whatever the transport:

- a channel name is 1 to ``limits.max_channel_length`` printable characters
  without spaces (error 107): checked here, by every permission question,
  and nowhere else — the hub trusts the names it is given;
- at most ``limits.max_channels_per_connection`` channels per connection
  (error 106), counted before any token is verified (a signature check is
  the costly part, so it comes last);
- a channel's namespace (the part before ``:``) must be configured, else
  error 102 (HTTP 404) — except in the zero-configuration development mode
  (no auth key and no namespace configured), where every namespace follows
  the default policy;
- ``dialog#42,43`` may be subscribed only by users 42 and 43, no token needed;
- a subscription token for the channel, or the connection token's
  ``channels`` claim, grants a subscription in any namespace;
- otherwise the namespace's ``subscribe`` policy decides: ``anonymous``
  (anyone), ``authenticated`` (a connection token with a non-empty ``sub``),
  ``token`` (a subscription token only);
- an expired token is error 109 (HTTP 401), which SDKs answer by refreshing;
  a connection token without ``sub`` (or with an empty one) is an anonymous
  user whose token verified (user ``""``), as Centrifugo has it;
- any other invalid token is :class:`InvalidToken` (WebSocket close 3500,
  HTTP 401) — except that the WebSocket session, as Centrifugo, answers a
  subscription token that does not verify (:class:`UnverifiedToken`) with
  error 103 and keeps the connection.

Token verification is PyJWT's; this module only fixes which key and which
single algorithm may verify a token, so that ``alg: none`` and HS/RS
confusion cannot pass.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jwt
import msgspec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .config import (
    AuthConfig,
    Config,
    ConfigError,
    NamespaceConfig,
    Subscribers,
    Who,
    namespace_of,
)
from .errors import ErrorCode, ProtocolError

#: The one message for presence asked where its namespace does not keep it.
PRESENCE_OFF = "presence is not enabled for this channel"

__all__ = [
    "ANONYMOUS",
    "PRESENCE_OFF",
    "Access",
    "Credentials",
    "InvalidToken",
    "Policy",
    "TokenVerifier",
    "UnverifiedToken",
]


class InvalidToken(ProtocolError):
    """A token that is not merely expired: forged, malformed, for another channel."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNAUTHORIZED, f"invalid token: {message}")


class UnverifiedToken(InvalidToken):
    """A token that does not verify at all: bad signature, malformed, a claim
    of the wrong type. (A token that verifies but names another user or
    channel is a plain :class:`InvalidToken`.) The distinction exists because
    Centrifugo answers an unverifiable *subscription* token with error 103 and
    keeps the connection, but closes it (3500) for a mismatched one."""


class Credentials(NamedTuple):
    """What a connection token (or the application's ``connect`` hook) says about a client."""

    user: str
    info: bytes | None = None
    #: Unix time the token expires at; 0 for never.
    expires: int = 0
    #: Channels the server subscribes the client to (the ``channels`` claim).
    channels: tuple[str, ...] = ()
    #: Given by the ``connect`` hook, not a token: its expiry is extended by
    #: the ``refresh`` hook, not by the client presenting a new token.
    by_hook: bool = False


ANONYMOUS = Credentials("")


class Grant(NamedTuple):
    """A subscription allowed, with what a subscription token (or the
    application's ``subscribe`` hook) added."""

    info: bytes | None = None
    expires: int = 0
    #: Given by the ``subscribe`` hook: its expiry is extended by ``sub_refresh``.
    by_hook: bool = False
    #: The hook's overrides of the namespace's ``presence`` and ``join_leave``.
    presence: bool | None = None
    join_leave: bool | None = None


def _json(value: Any) -> bytes | None:
    return None if value is None else msgspec.json.encode(value)


class TokenVerifier:
    """Verifies connection and subscription tokens with the configured keys."""

    def __init__(self, config: AuthConfig) -> None:
        self._leeway = config.leeway
        self._keys: dict[str, Any] = {}
        if config.hmac_secret:
            self._keys["HS256"] = config.hmac_secret.encode()
        if config.rsa_public_key:
            self._keys["RS256"] = _public_key(config.rsa_public_key, "auth.rsa_public_key")
        if config.ecdsa_public_key:
            self._keys["ES256"] = _public_key(config.ecdsa_public_key, "auth.ecdsa_public_key")

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def algorithms(self) -> list[str]:
        return sorted(self._keys)

    def _decode(self, token: str, required: list[str]) -> dict[str, Any]:
        if not self._keys:
            raise UnverifiedToken("this server has no keys configured to verify tokens")
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
        except jwt.InvalidTokenError as exc:
            raise UnverifiedToken(str(exc)) from None
        if not isinstance(algorithm, str) or algorithm not in self._keys:
            raise UnverifiedToken(f"algorithm {algorithm!r} is not accepted")
        key = self._keys[algorithm]
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                leeway=self._leeway,
                options={"require": required, "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise ProtocolError(ErrorCode.TOKEN_EXPIRED) from None
        except jwt.InvalidTokenError as exc:
            raise UnverifiedToken(str(exc)) from None
        # JSON allows a lone surrogate escape ("\ud800") and PyJWT's decoder
        # accepts it, but no UTF-8 encoder can write it: a user id or info
        # holding one would break every reply and push that carries it.
        try:
            msgspec.json.encode(claims)
        except UnicodeEncodeError:
            raise UnverifiedToken("a claim holds a lone surrogate") from None
        return claims

    def connection(self, token: str) -> Credentials:
        """The client a connection token describes.

        ``sub`` may be missing or empty: the client is then an anonymous user
        (``""``) whose token verified, as Centrifugo has it — its ``channels``,
        ``info`` and expiry hold, and namespaces open to ``authenticated``
        users stay closed to it.
        """
        claims = self._decode(token, [])
        user, channels = _subject(claims), claims.get("channels", [])
        if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
            raise UnverifiedToken("channels must be a list of strings")
        return Credentials(user, _json(claims.get("info")), _expiry(claims), tuple(channels))

    def subscription(self, token: str, credentials: Credentials) -> tuple[str, Grant]:
        """The channel a subscription token grants, checked against the holder.

        A missing ``sub`` is the anonymous user ``""``, as in a connection
        token, so an anonymous client may hold a subscription token too.
        """
        claims = self._decode(token, ["channel"])
        channel = claims["channel"]
        if not isinstance(channel, str) or not channel:
            raise UnverifiedToken("channel must be a non-empty string")
        if _subject(claims) != credentials.user:
            raise InvalidToken("the subscription token belongs to another user")
        return channel, Grant(_json(claims.get("info")), _expiry(claims))


def _subject(claims: dict[str, Any]) -> str:
    """The user a token names: ``sub``, or ``""`` (anonymous) when it is missing."""
    user = claims.get("sub", "")
    if not isinstance(user, str):
        raise UnverifiedToken("sub must be a string")
    return user


def _expiry(claims: dict[str, Any]) -> int:
    exp = claims.get("exp")
    return int(exp) if isinstance(exp, int | float) else 0


def _public_key(value: str, key: str) -> Any:
    text = value if value.lstrip().startswith("-----BEGIN") else _read(value, key)
    try:
        return load_pem_public_key(text.encode())
    except ValueError as exc:
        raise ConfigError(f"{key}: not a PEM public key ({exc})") from None


def _read(path: str, key: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None


class Policy(NamedTuple):
    """A namespace's rules with the defaults filled in."""

    subscribe: Subscribers
    publish: Who
    history: Who
    presence: bool
    presence_read: Who
    join_leave: bool
    force_push_join_leave: bool = False
    #: ``allowed_delta_types`` holds ``"fossil"``.
    fossil_delta: bool = False
    #: A client's own publications reach its connection too.
    echo_publications: bool = True

    @classmethod
    def of(cls, config: NamespaceConfig, secure: bool) -> Policy:
        return cls(
            config.subscribe or ("authenticated" if secure else "anonymous"),
            config.publish or ("nobody" if secure else "subscribers"),
            config.history,
            config.presence,
            config.presence_read,
            config.join_leave,
            config.force_push_join_leave,
            "fossil" in config.allowed_delta_types,
            config.echo_publications,
        )


def user_boundary(channel: str) -> frozenset[str] | None:
    """The users of a user-limited channel (``dialog#42,43``), or None."""
    _, hash_, users = channel.rpartition("#")
    return frozenset(u for u in users.split(",") if u) if hash_ else None


class Access:
    """Every permission decision of one server. See the module docstring."""

    def __init__(self, config: Config) -> None:
        self.tokens = TokenVerifier(config.auth)
        self.cookie = config.auth.cookie
        self.expiry_grace = config.auth.expiry_grace
        self.max_channel_length = config.limits.max_channel_length
        self.max_channels = config.limits.max_channels_per_connection
        secure = self.tokens.enabled
        self._default = Policy.of(config.channels, secure)
        self._namespaces = {
            name: Policy.of(namespace, secure) for name, namespace in config.namespaces.items()
        }
        self._strict = secure or bool(config.namespaces)
        personal = config.client.subscribe_to_user_personal_channel
        #: The personal channel's name before the user id, or None when off.
        self._personal_prefix = (
            (
                f"{personal.personal_channel_namespace}:#"
                if personal.personal_channel_namespace
                else "#"
            )
            if personal.enabled
            else None
        )

    @property
    def secure(self) -> bool:
        return self.tokens.enabled

    def open_namespaces(self) -> list[str]:
        """Namespaces anyone may subscribe to (logged as a warning at start)."""
        named = [("(default)", self._default), *self._namespaces.items()]
        return [name for name, policy in named if policy.subscribe == "anonymous"]

    def validate_channel(self, name: str) -> None:
        """Refuse names that are empty, too long, or hold spaces or control characters.

        Every permission question below asks this first (through
        :meth:`policy`), so no client-supplied name reaches the hub unchecked.
        """
        if not name:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "channel name is empty")
        if len(name) > self.max_channel_length:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"channel name longer than {self.max_channel_length} characters",
            )
        if not name.isprintable() or " " in name:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"channel name {name!r} has spaces or control characters"
            )

    def policy(self, channel: str) -> Policy:
        """The rules of a valid channel's namespace (error 102 for an unknown one)."""
        self.validate_channel(channel)
        namespace = namespace_of(channel)
        if not namespace:
            return self._default
        policy = self._namespaces.get(namespace)
        if policy is None:
            if not self._strict:
                return self._default
            raise ProtocolError(ErrorCode.UNKNOWN_CHANNEL, f"unknown namespace {namespace!r}")
        return policy

    def expired(self, credentials: Credentials) -> bool:
        """Whether a connection outlived its token by more than the grace period."""
        expires = credentials.expires
        return bool(expires) and time.time() > expires + self.expiry_grace

    def authenticate(self, token: str | None) -> Credentials:
        """The client behind a connection token; anonymous without one."""
        return self.tokens.connection(token) if token else ANONYMOUS

    def server_channels(self, credentials: Credentials) -> tuple[str, ...]:
        """The channels the server subscribes a connecting client to: the token's
        ``channels`` claim, then the user's personal channel (``#<user>``, a
        user-limited channel, so the usual rules admit its user and nobody else)
        when ``client.subscribe_to_user_personal_channel`` is on. Anonymous
        clients have no personal channel, as in Centrifugo.
        """
        prefix = self._personal_prefix
        if prefix is None or not credentials.user:
            return credentials.channels
        personal = prefix + credentials.user
        if personal in credentials.channels:
            return credentials.channels
        return (*credentials.channels, personal)

    def authorize_subscribe(
        self,
        credentials: Credentials,
        channels: Sequence[str],
        tokens: Sequence[str] = (),
        *,
        held: int = 0,
    ) -> dict[str, Grant]:
        """May ``credentials`` subscribe to ``channels``? The one door of every transport.

        ``tokens`` are subscription tokens, each naming one of ``channels``;
        ``held`` is how many channels the connection already follows. Raises
        the first refusal — a bad name (107), too many channels (106), an
        expired token (109), an invalid token (:class:`InvalidToken`; one that
        does not verify at all is an :class:`UnverifiedToken`), an unknown
        namespace (102), a subscription the rules deny (103) — and returns the
        grants the tokens carried (their ``info`` and expiry), by channel.
        """
        grants = self.precheck_subscribe(credentials, channels, tokens, held=held)
        for channel in channels:
            self.check_subscribe(credentials, channel, grants.get(channel))
        return grants

    def precheck_subscribe(
        self,
        credentials: Credentials,
        channels: Sequence[str],
        tokens: Sequence[str] = (),
        *,
        held: int = 0,
    ) -> dict[str, Grant]:
        """What comes before the permission decision: names (107), the count
        (106), then the subscription tokens (the costly part, last)."""
        for channel in channels:
            self.validate_channel(channel)
        if held + len(channels) > self.max_channels:
            raise ProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"more than {self.max_channels} channels on one connection",
            )
        return self.subscription_grants(tokens, credentials, channels)

    def granted_without_rules(
        self, credentials: Credentials, channel: str, grant: Grant | None
    ) -> bool:
        """Whether ``channel`` is settled before the namespace's rules (and the
        ``subscribe`` hook) are asked: a grant, the connection's ``channels``,
        or a user-limited channel (whose boundary nothing overrides)."""
        return (
            grant is not None
            or channel in credentials.channels
            or user_boundary(channel) is not None
        )

    def subscription_grant(self, token: str, credentials: Credentials, channel: str) -> Grant:
        """The grant of a subscription token presented for ``channel`` (``sub_refresh``)."""
        return self.subscription_grants([token], credentials, (channel,))[channel]

    def subscription_grants(
        self, tokens: Sequence[str], credentials: Credentials, channels: Collection[str]
    ) -> dict[str, Grant]:
        """Subscription tokens by the channel each one grants, all among ``channels``.

        A token names the one channel it grants; presented for another, it is
        invalid (3500 / 401), not merely insufficient (403): the client holds a
        token that does not say what it claims. The HTTP transports take tokens
        and channels as separate lists (``?sub_token=`` repeated), so each
        token must name one of the channels requested.
        """
        grants: dict[str, Grant] = {}
        for token in tokens:
            granted, grant = self.tokens.subscription(token, credentials)
            if granted not in channels:
                raise InvalidToken("the subscription token is for another channel")
            grants[granted] = grant
        return grants

    def check_subscribe(
        self, credentials: Credentials, channel: str, grant: Grant | None = None
    ) -> None:
        policy = self.policy(channel)
        users = user_boundary(channel)
        if users is not None:
            if credentials.user and credentials.user in users:
                return
            raise ProtocolError(ErrorCode.PERMISSION_DENIED, "channel limited to other users")
        if grant is not None or channel in credentials.channels:
            return  # PyJWT checked the grant's expiry, with the configured leeway
        if policy.subscribe == "anonymous":
            return
        if policy.subscribe == "authenticated" and credentials.user:
            return
        needed = "a subscription token" if policy.subscribe == "token" else "a connection token"
        raise ProtocolError(ErrorCode.PERMISSION_DENIED, f"subscribing to {channel} needs {needed}")

    def check_publish(self, credentials: Credentials, channel: str, subscribed: bool) -> None:
        _allow(self.policy(channel).publish, subscribed, "publishing")

    def check_history(self, credentials: Credentials, channel: str, subscribed: bool) -> None:
        _allow(self.policy(channel).history, subscribed, "reading history")

    def check_presence(self, credentials: Credentials, channel: str, subscribed: bool) -> None:
        policy = self.policy(channel)
        if not policy.presence:
            raise ProtocolError(ErrorCode.NOT_AVAILABLE, PRESENCE_OFF)
        _allow(policy.presence_read, subscribed, "reading presence")


def _allow(who: str, subscribed: bool, what: str) -> None:
    if who == "any" or (who == "subscribers" and subscribed):
        return
    detail = "is not allowed here" if who == "nobody" else "is for subscribers only"
    raise ProtocolError(ErrorCode.PERMISSION_DENIED, f"{what} {detail}")
