"""``POST /call/<name>``: a client's commands over plain HTTP, for SSE, long-poll and poll clients.

A WebSocket client sends ``rpc``, ``publish``, ``history``, ``presence`` and
``presence_stats`` as commands on its connection. A client that follows its
channels over SSE, long-poll or poll has no channel back to the server, and a
network that blocks WebSocket would block a WebSocket opened just for them;
so each is one stateless POST here, with the same request object and the same
result object as the Centrifugo command, and the same error codes:

- ``POST /call/rpc`` ``{"method", "data"}`` → ``{"data": ...}``;
- ``POST /call/publish`` ``{"channel", "data"}`` → ``{}``;
- ``POST /call/history`` ``{"channel", "limit"?, "since"?: {"offset", "epoch"}, "reverse"?}``
  → ``{"publications": [...], "epoch", "offset"}``;
- ``POST /call/presence`` ``{"channel"}`` → ``{"presence": {...}}``;
- ``POST /call/presence_stats`` ``{"channel"}`` → ``{"num_clients", "num_users"}``.

What a call does is :mod:`tidings.centrifuge.commands`, shared with the
WebSocket session; this module only reads the request (credentials as the
subscribe transports read them, through :func:`~tidings.transports.common.admit`)
and answers. An error is the body every HTTP endpoint answers,
``{"error": {"code", "message"}}``, its status from the code
(:func:`tidings.http.error_response`, the one table).

The body must be ``Content-Type: application/json``: a cross-origin page can
then send it only after a CORS preflight the configured origins decide, so a
page elsewhere cannot make a logged-in browser (its auth cookie) publish or
call (cross-site request forgery). Anything else is 415.

A stateless client holds no subscription, so the namespace rules granted to
*subscribers* (``publish``, ``history``, ``presence_read`` = ``"subscribers"``)
are granted to a client that *may subscribe* to the channel: the gate's
subscribe door (tokens, ``?sub_token=``, the ``subscribe`` hook, the
namespace's ``subscribe`` rule) is asked, and only when the rule needs it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from ..api import decode_params
from ..auth import Access, Credentials
from ..centrifuge import commands
from ..centrifuge.commands import Caller
from ..centrifuge.schema import (
    ChannelRequest,
    Empty,
    HistoryRequest,
    PublishRequest,
    RPCRequest,
)
from ..centrifuge.schema import HistoryResult as CommandHistoryResult
from ..centrifuge.wire import JSON
from ..errors import ErrorCode, ProtocolError
from ..gate import Gate
from ..hooks import Disconnect, Hooks, Refuse
from ..http import Response, Router, error_response
from ..http.messages import Disconnected
from ..hub import Hub
from ..logs import log_client_error
from ..metrics import Metrics
from .common import admit, authorize_channels

if TYPE_CHECKING:
    from ..http import Exchange, Request

__all__ = ["CALLS", "PREFIX", "CallTransport"]

log = logging.getLogger(__name__)

#: Where the calls are mounted: ``POST /call/<name>``.
PREFIX = "/call/"

_encode = msgspec.json.Encoder().encode
_JSON_HEADERS = [("Content-Type", "application/json")]

#: A call's work: the transport, the request, who asks, the decoded body → the result.
Run = Callable[["CallTransport", "Request", Caller, Any], Awaitable[msgspec.Struct]]


class Call(NamedTuple):
    """One endpoint: the decoder of its body and what it runs."""

    decoder: msgspec.json.Decoder[Any]
    run: Run


class CallTransport:
    """The call endpoints of one server: given the hub, the access rules and the hooks."""

    def __init__(
        self,
        hub: Hub,
        access: Access,
        hooks: Hooks | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.hub = hub
        self.access = access
        self.gate = Gate(access, hooks if hooks is not None else Hooks())
        #: A call is a client command: timed and its errors counted as the
        #: session's are (``centrifugo_client_command_duration_seconds{method}``,
        #: ``centrifugo_client_num_reply_errors{method,code}``).
        self.metrics = metrics if metrics is not None else Metrics(multiprocess=False)

    def mount(self, router: Router) -> None:
        for name, call in CALLS.items():
            router.add("POST", PREFIX + name, self._endpoint(name, call))

    async def start(self) -> None:
        """No background work: every call is one request."""

    async def stop(self) -> None:
        """Nothing held between requests."""

    def _endpoint(
        self, name: str, call: Call
    ) -> Callable[[Request, Exchange], Awaitable[Response]]:
        async def handle(request: Request, conn: Exchange) -> Response:
            metrics = self.metrics
            started = time.perf_counter()
            try:
                return await self.answer(request, call)
            except ProtocolError as exc:
                metrics.reply_errors.labels(name, str(int(exc.code))).inc()
                if exc.code != ErrorCode.INTERNAL:  # an internal error was logged where it arose
                    log_client_error(
                        log,
                        "call %s from %s refused: %s",
                        name,
                        conn.client,
                        exc.message,
                        fields={"code": int(exc.code), "transport": "http"},
                    )
                return error_response(exc)
            finally:
                metrics.command_timer(name).observe(time.perf_counter() - started)

        return handle

    async def answer(self, request: Request, call: Call) -> Response:
        """Read, admit, run: the request's own mistakes first, before any hook runs."""
        content_type = (request.headers.get("content-type") or "").partition(";")[0]
        if content_type.strip().lower() != "application/json":
            log_client_error(log, "call refused from %s: not JSON", request.client)
            return error_response(415, "the body must be Content-Type: application/json")
        body = decode_params(call.decoder, request.body)
        credentials = await admit(request, self.gate, "http")
        caller = Caller(credentials, "http", "http")
        try:
            result = await call.run(self, request, caller, body)
        except Disconnect as exc:  # a hook ends the "connection": a request has none
            raise Disconnected(exc) from None
        return Response(200, _encode(result), list(_JSON_HEADERS))

    async def subscriber(
        self,
        request: Request,
        credentials: Credentials,
        channel: str,
        check: Callable[[bool], None],
    ) -> bool:
        """Whether to count the client as a subscriber of ``channel`` for ``check``.

        ``check(subscribed)`` is the namespace rule (``Access.check_history``...).
        The subscribe door is asked only when the answer changes the outcome:
        not when the rule refuses a subscriber too (``"nobody"``, presence off),
        nor when it allows anyone (``"any"``).
        """
        try:
            check(True)
        except ProtocolError:
            return False  # refused whatever: the rule itself says so
        try:
            check(False)
        except ProtocolError:
            return await self.may_subscribe(request, credentials, channel)
        return False

    async def may_subscribe(self, request: Request, credentials: Credentials, channel: str) -> bool:
        """Would the subscribe door let the client follow ``channel``? Its refusal (103,
        or the hook's ``Refuse``) is a no; anything else it raises is the call's error
        (a bad or expired ``?sub_token=`` 401, a hook that failed 500/503...)."""
        try:
            await authorize_channels(request, self.gate, credentials, [channel], "http")
        except Disconnected:
            raise
        except ProtocolError as exc:
            if isinstance(exc, Refuse) or exc.code == ErrorCode.PERMISSION_DENIED:
                return False
            raise
        return True


async def _rpc(calls: CallTransport, request: Request, caller: Caller, req: RPCRequest) -> Any:
    return await commands.rpc(calls.gate.hooks, caller, req)


async def _publish(
    calls: CallTransport, request: Request, caller: Caller, req: PublishRequest
) -> Any:
    access, credentials, channel = calls.access, caller.credentials, req.channel
    access.policy(channel)  # a bad name (107) or an unknown namespace (102) first
    subscribed = await calls.subscriber(
        request,
        credentials,
        channel,
        lambda subscribed: access.check_publish(credentials, channel, subscribed),
    )
    await commands.publish(calls.gate, calls.hub, caller, req, subscribed=subscribed)
    return Empty()


async def _history(
    calls: CallTransport, request: Request, caller: Caller, req: HistoryRequest
) -> Any:
    access, credentials, channel = calls.access, caller.credentials, req.channel
    subscribed = await calls.subscriber(
        request,
        credentials,
        channel,
        lambda subscribed: access.check_history(credentials, channel, subscribed),
    )
    pubs, top = await commands.history(access, calls.hub, caller, req, subscribed=subscribed)
    return CommandHistoryResult(
        publications=JSON.publications(pubs), epoch=top.epoch, offset=top.offset
    )


async def _presence(
    calls: CallTransport, request: Request, caller: Caller, req: ChannelRequest
) -> Any:
    subscribed = await _presence_subscriber(calls, request, caller, req.channel)
    return await commands.presence(calls.access, calls.hub, caller, req, subscribed=subscribed)


async def _presence_stats(
    calls: CallTransport, request: Request, caller: Caller, req: ChannelRequest
) -> Any:
    subscribed = await _presence_subscriber(calls, request, caller, req.channel)
    return await commands.presence_stats(
        calls.access, calls.hub, caller, req, subscribed=subscribed
    )


async def _presence_subscriber(
    calls: CallTransport, request: Request, caller: Caller, channel: str
) -> bool:
    access, credentials = calls.access, caller.credentials
    return await calls.subscriber(
        request,
        credentials,
        channel,
        lambda subscribed: access.check_presence(credentials, channel, subscribed),
    )


#: Every call by its name in the path, once.
CALLS: dict[str, Call] = {
    "rpc": Call(msgspec.json.Decoder(RPCRequest), _rpc),
    "publish": Call(msgspec.json.Decoder(PublishRequest), _publish),
    "history": Call(msgspec.json.Decoder(HistoryRequest), _history),
    "presence": Call(msgspec.json.Decoder(ChannelRequest), _presence),
    "presence_stats": Call(msgspec.json.Decoder(ChannelRequest), _presence_stats),
}
