"""Error and disconnect codes, and the exceptions that carry them.

The numbering is Centrifugo's (client protocol v2), so that the existing SDKs
react to our errors as they would to Centrifugo's: refresh a token on 109,
reconnect on 3001–3499, give up on 3500–3999. Every layer — the WebSocket
protocol, the HTTP transports, the server API — raises these and never invents
its own numbers.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Errors answered to a command or an API call; the connection stays open."""

    INTERNAL = 100
    UNAUTHORIZED = 101
    UNKNOWN_CHANNEL = 102
    PERMISSION_DENIED = 103
    METHOD_NOT_FOUND = 104
    ALREADY_SUBSCRIBED = 105
    LIMIT_EXCEEDED = 106
    BAD_REQUEST = 107
    NOT_AVAILABLE = 108
    TOKEN_EXPIRED = 109
    EXPIRED = 110
    TOO_MANY_REQUESTS = 111
    UNRECOVERABLE_POSITION = 112


#: Errors a client may retry as they are: the condition is expected to pass.
TEMPORARY_ERRORS = frozenset({ErrorCode.INTERNAL, ErrorCode.TOO_MANY_REQUESTS})

_ERROR_MESSAGES = {
    ErrorCode.INTERNAL: "internal server error",
    ErrorCode.UNAUTHORIZED: "unauthorized",
    ErrorCode.UNKNOWN_CHANNEL: "unknown channel",
    ErrorCode.PERMISSION_DENIED: "permission denied",
    ErrorCode.METHOD_NOT_FOUND: "method not found",
    ErrorCode.ALREADY_SUBSCRIBED: "already subscribed",
    ErrorCode.LIMIT_EXCEEDED: "limit exceeded",
    ErrorCode.BAD_REQUEST: "bad request",
    ErrorCode.NOT_AVAILABLE: "not available",
    ErrorCode.TOKEN_EXPIRED: "token expired",
    ErrorCode.EXPIRED: "expired",
    ErrorCode.TOO_MANY_REQUESTS: "too many requests",
    ErrorCode.UNRECOVERABLE_POSITION: "unrecoverable position",
}


class DisconnectCode(IntEnum):
    """WebSocket close codes. Clients reconnect below 3500 and give up from 3500."""

    #: RFC 6455's "invalid frame payload data": a message (or a command in it)
    #: that is not UTF-8. The SDKs reconnect, as after any code below 3500.
    INVALID_DATA = 1007
    SHUTDOWN = 3001
    INTERNAL = 3004
    CONNECTION_EXPIRED = 3005
    SUBSCRIPTION_EXPIRED = 3006
    SLOW = 3008
    WRITE_ERROR = 3009
    INSUFFICIENT_STATE = 3010
    FORCE_RECONNECT = 3011
    NO_PONG = 3012
    TOO_MANY_REQUESTS = 3013
    INVALID_TOKEN = 3500
    BAD_REQUEST = 3501
    STALE = 3502
    FORCE_DISCONNECT = 3503
    CONNECTION_LIMIT = 3504
    CHANNEL_LIMIT = 3505
    INAPPROPRIATE_PROTOCOL = 3506
    PERMISSION_DENIED = 3507
    NOT_AVAILABLE = 3508
    TOO_MANY_ERRORS = 3509


class TidingsError(Exception):
    """Base class of every error tidings raises on purpose."""


class ProtocolError(TidingsError):
    """A request that cannot be served, with the code the client sees.

    Raised by the hub and the transports alike; each transport renders it in
    its own wire format (a WebSocket error reply, a JSON error body with an
    HTTP status, an API error object).
    """

    def __init__(self, code: ErrorCode, message: str | None = None) -> None:
        self.code = code
        self.message = message or _ERROR_MESSAGES[code]
        super().__init__(f"{int(code)} {self.message}")

    @property
    def temporary(self) -> bool:
        return self.code in TEMPORARY_ERRORS


class BrokerUnavailable(ProtocolError):
    """The broker cannot be reached now (down, or paused past ``timeouts.broker``).

    Its code stays Centrifugo's 100, which the SDKs retry; it is a class of its
    own because code 100 also reports real internal errors, and only this one
    is known to pass by itself: over HTTP it is 503 Service Unavailable with
    ``Retry-After: RETRY_AFTER`` (tidings.http.messages), the answer proxies,
    curl's ``--retry`` and tidings.js retry on, where a 500 reads as a bug.
    """

    #: Seconds a client is asked to wait before retrying. A floor, not a
    #: schedule: tidings.js waits the larger of this and its own growing
    #: backoff, so it only keeps the first retries of every client from
    #: arriving at once. Two seconds cover a Redis restart with little data
    #: and the node's first pub/sub reconnect attempts (50 ms, doubling); the
    #: capacity refusal asks for 5 s because idle keep-alive connections take
    #: that long to free their slots, while here waiting longer than the
    #: outage only delays recovery.
    RETRY_AFTER = 2

    def __init__(self, cause: object) -> None:
        super().__init__(ErrorCode.INTERNAL, f"broker unavailable: {cause}")


class ConfigError(TidingsError):
    """An invalid configuration value; the message names the key."""
