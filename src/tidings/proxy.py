"""The proxy: the application's decisions as HTTP calls to a backend in any language.

Centrifugo's proxy format, so that a backend written for Centrifugo's HTTP
proxy answers tidings unchanged: each decision is a ``POST`` of a JSON object
(``client``, ``transport``, ``protocol``, ``encoding``, ``user``, ``channel``,
``data`` or ``b64data``, ``name``, ``version``, ``method``) to the URL
configured for it in ``[proxy]``, and the backend answers
``{"result": {...}}``, ``{"error": {"code", "message", "temporary"}}`` or
``{"disconnect": {"code", "reason"}}``. docs/proxy.md lists which fields
tidings sends and honours.

The proxy is one more source of hook callables: :meth:`Proxy.install` puts
its functions in a :class:`~tidings.hooks.Hooks` (``connect``, ``refresh``,
``subscribe``, ``publish``, ``sub_refresh``, ``rpc_fallback``), and from
then on the transports cannot tell it from Python hooks. Each function always
decides — a reply, :class:`~tidings.hooks.Refuse` or
:class:`~tidings.hooks.Disconnect`, never "no opinion" — except for channels
of namespaces the configuration leaves out of the subscribe, publish or
sub_refresh calls, which keep the namespace's rules.

A backend that is down, slow, or answers what is not Centrifugo's format
costs the one client asking a temporary error (code 100, which the SDKs
retry), and the server a rate-limited warning: never a traceback, never a
wait past ``proxy.timeout``, never more than ``proxy.max_concurrency``
requests in flight, never more than ``proxy.max_response_size`` bytes read.
A refresh the backend cannot answer prolongs the connection by a minute, as
Centrifugo does, so that a backend restart does not close every connection.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import aiohttp
import msgspec

from .config import ProxyConfig, namespace_of
from .errors import ConfigError, DisconnectCode, ErrorCode, ProtocolError
from .hooks import (
    KEEP,
    ConnectCall,
    ConnectReply,
    Disconnect,
    Hooks,
    HookTimedOut,
    PublishCall,
    PublishReply,
    RefreshCall,
    RefreshReply,
    Refuse,
    RPCCall,
    SubRefreshCall,
    SubRefreshReply,
    SubscribeCall,
    SubscribeReply,
)
from .logs import ClientErrorLimiter

__all__ = ["Proxy", "ProxyUnavailable"]

log = logging.getLogger(__name__)

#: Seconds a connection or subscription is prolonged when its refresh call
#: fails (Centrifugo's figure): the call is made again then.
REFRESH_RETRY = 60

# -- Centrifugo's request bodies (empty fields left out, as Go's omitempty does) --


class _Request(msgspec.Struct, omit_defaults=True, kw_only=True):
    client: str
    transport: str
    protocol: str
    encoding: str
    user: str = ""
    channel: str = ""
    method: str = ""
    name: str = ""
    version: str = ""
    #: UNSET, not an empty Raw: omit_defaults leaves out only what equals the default.
    data: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    b64data: str = ""


# -- Centrifugo's response bodies (unknown fields ignored: newer backends) ------


class _Error(msgspec.Struct):
    code: int = 0
    message: str = ""
    temporary: bool = False


class _Disconnect(msgspec.Struct):
    code: int = 0
    reason: str = ""


class _BoolValue(msgspec.Struct):
    value: bool = False


class _Override(msgspec.Struct):
    presence: _BoolValue | None = None
    join_leave: _BoolValue | None = None


class _ConnectResult(msgspec.Struct):
    user: str = ""
    expire_at: int = 0
    info: msgspec.Raw = msgspec.Raw()
    b64info: str = ""
    data: msgspec.Raw = msgspec.Raw()
    b64data: str = ""
    channels: list[str] = []
    #: Server-side subscriptions with options; tidings takes the channel names.
    subs: dict[str, msgspec.Raw] = {}


class _RefreshResult(msgspec.Struct):
    expired: bool = False
    expire_at: int = 0
    info: msgspec.Raw = msgspec.Raw()
    b64info: str = ""


class _SubscribeResult(msgspec.Struct):
    expire_at: int = 0
    info: msgspec.Raw = msgspec.Raw()
    b64info: str = ""
    override: _Override | None = None


class _PublishResult(msgspec.Struct):
    data: msgspec.Raw = msgspec.Raw()
    b64data: str = ""
    skip_history: bool = False


class _RPCResult(msgspec.Struct):
    data: msgspec.Raw = msgspec.Raw()
    b64data: str = ""


_Result = TypeVar("_Result")


class _Response(msgspec.Struct, Generic[_Result]):
    result: _Result | None = None
    error: _Error | None = None
    disconnect: _Disconnect | None = None


_encoder = msgspec.json.Encoder()

#: Control characters aiohttp refuses in a header value (HTAB is allowed): a
#: client's header or cookie holding one is left out rather than failing the call.
_UNSENDABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class ProxyUnavailable(HookTimedOut):
    """The backend gave no usable answer: code 100, which the SDKs retry.

    A :class:`~tidings.hooks.HookTimedOut`, so that the HTTP transports answer
    it 503 with ``Retry-After`` as they answer a slow hook: a backend that is
    restarting or overloaded is the common case, and it passes.
    """

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.message = f"{kind} proxy unavailable"
        self.args = (f"{int(self.code)} {self.message}",)


class _Failed(Exception):
    """A call the backend did not answer usably; the message says how."""


class Proxy:
    """The ``[proxy]`` section's hook functions and the HTTP client they share.

    Built from the configuration, :meth:`install`-ed into the server's
    :class:`~tidings.hooks.Hooks`, :meth:`start`-ed before the server
    listens and :meth:`close`-d after its transports stopped.
    """

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.timeout = config.timeout
        self.max_response_size = config.max_response_size
        self._encoding = "binary" if config.binary_encoding else "json"
        # Lowercased once: request headers reach the calls with lowercased names.
        self._header_allowlist = tuple(dict.fromkeys(h.lower() for h in config.http_headers))
        self._cookie_allowlist = tuple(dict.fromkeys(config.cookies))
        # Static headers first: a forwarded header of the same name overrides
        # one (Centrifugo's precedence); the body is always JSON.
        self._static_headers: dict[str, str] = {
            **{name.lower(): value for name, value in config.static_headers.items()},
            "accept-encoding": "identity",
        }
        # One semaphore bounds the requests of every kind: the backend's load
        # is what max_concurrency protects, whatever the calls are for.
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._warnings = ClientErrorLimiter(max_lines=5, interval=10.0)
        self._namespaces = {
            "subscribe": _namespace_set(config.subscribe_namespaces),
            "publish": _namespace_set(config.publish_namespaces),
            "sub_refresh": _namespace_set(config.sub_refresh_namespaces),
        }
        self._decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {
            result: msgspec.json.Decoder(_Response[result])  # type: ignore[valid-type]
            for result in (
                _ConnectResult,
                _RefreshResult,
                _SubscribeResult,
                _PublishResult,
                _RPCResult,
            )
        }

    @property
    def hook_names(self) -> tuple[str, ...]:
        """The decisions this proxy takes (those with a URL)."""
        return self.config.hook_names

    # -- lifecycle -------------------------------------------------------

    def install(self, hooks: Hooks) -> None:
        """Put the functions of the configured URLs into ``hooks``.

        Refuses (:class:`ConfigError`) a decision a Python hook already takes
        (one decision, one owner), and a ``proxy.timeout`` that is not below
        ``hooks.timeout`` (the hook's deadline would cut the call short, and
        a failed refresh would close connections instead of prolonging them).
        """
        if self.hook_names and self.timeout >= hooks.timeout:
            raise ConfigError(
                f"proxy.timeout ({self.timeout:g}s) must be below hooks.timeout "
                f"({hooks.timeout:g}s), which bounds every decision"
            )
        functions: dict[str, Callable[[Any], Any]] = {
            "connect": self.connect,
            "refresh": self.refresh,
            "subscribe": self.subscribe,
            "publish": self.publish,
            "sub_refresh": self.sub_refresh,
            "rpc": self.rpc,
        }
        for name in self.hook_names:
            attribute = "rpc_fallback" if name == "rpc" else name
            if getattr(hooks, attribute) is not None:
                raise ConfigError(
                    f"proxy.{name}_url is set and a Python {name} hook is registered: "
                    "one decision has one owner, remove one of them"
                )
        for name in self.hook_names:
            setattr(hooks, "rpc_fallback" if name == "rpc" else name, functions[name])
        if "connect" in self.hook_names:
            hooks.connect_skips_tokens = True

    async def start(self) -> None:
        """Open the HTTP client: a pool of keep-alive connections to the backend.

        aiohttp's client rather than httpx's: RPC round trips through tidings
        to a backend (bench/proxy_roundtrip.py 2000 20, this 2-core machine
        loaded by other work, both runs back to back) made 943 calls/s one
        client at a time and 1,405 with 20 clients at once with aiohttp,
        against 179 and 130 with httpx 0.28 (whose 20-client run also had 7
        calls past the 1 s timeout); a reconnect storm is exactly many connect
        calls at once.
        """
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.config.max_concurrency),
                # asyncio.timeout in _exchange bounds each call, slot wait included.
                timeout=aiohttp.ClientTimeout(total=None),
                # Raw bytes, counted as they come: a compressed answer must not
                # be inflated past the size limit (identity is asked for anyway).
                auto_decompress=False,
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
            )

    async def close(self) -> None:
        """Close the HTTP client and its connections."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- the hook functions ----------------------------------------------

    async def connect(self, call: ConnectCall) -> ConnectReply:
        """Centrifugo's connect proxy: who the client is, from its headers and cookies."""
        request = self._request(call, data=call.data, name=call.name, version=call.version)
        response = await self._decide(
            "connect", call.client, request, _ConnectResult, self._forwarded_headers(call)
        )
        result = response.result
        if result is None:
            # Centrifuge admits no client without credentials: bad request.
            raise Disconnect(DisconnectCode.BAD_REQUEST, "bad request")
        info = self._json(result.info, result.b64info, "connect", "info")
        data = self._json(result.data, result.b64data, "connect", "data")
        return ConnectReply(
            user=result.user,
            info=info,
            expire_at=result.expire_at,
            channels=tuple(dict.fromkeys([*result.channels, *result.subs])),
            data=data,
        )

    async def refresh(self, call: RefreshCall) -> RefreshReply:
        """Centrifugo's refresh proxy: prolong the connection, or let it expire."""
        try:
            request = self._request(call)
            response = await self._exchange("refresh", call.client, request, _RefreshResult)
        except _Failed:
            return RefreshReply(expire_at=int(time.time()) + REFRESH_RETRY)
        result = response.result
        if result is None or result.expired:
            # Centrifugo: no result (an error or a disconnect) expires it too.
            return RefreshReply(expired=True)
        info = self._json(result.info, result.b64info, "refresh", "info")
        return RefreshReply(expire_at=result.expire_at, info=info)

    async def subscribe(self, call: SubscribeCall) -> SubscribeReply | None:
        """Centrifugo's subscribe proxy: may the client follow ``call.channel``."""
        if not self._covers("subscribe", call.channel):
            return None
        request = self._request(call, channel=call.channel, data=call.data)
        response = await self._decide("subscribe", call.client, request, _SubscribeResult)
        result = response.result or _SubscribeResult()
        override = result.override or _Override()
        return SubscribeReply(
            info=self._json(result.info, result.b64info, "subscribe", "info"),
            expire_at=result.expire_at,
            presence=None if override.presence is None else override.presence.value,
            join_leave=None if override.join_leave is None else override.join_leave.value,
        )

    async def publish(self, call: PublishCall) -> PublishReply | None:
        """Centrifugo's publish proxy: may the client publish, and what."""
        if not self._covers("publish", call.channel):
            return None
        request = self._request(call, channel=call.channel, data=call.data)
        response = await self._decide("publish", call.client, request, _PublishResult)
        result = response.result or _PublishResult()
        data = self._json(result.data, result.b64data, "publish", "data")
        return PublishReply(data=KEEP if data is None else data, skip_history=result.skip_history)

    async def sub_refresh(self, call: SubRefreshCall) -> SubRefreshReply | None:
        """Centrifugo's sub_refresh proxy: prolong the subscription, or end it."""
        if not self._covers("sub_refresh", call.channel):
            return None
        request = self._request(call, channel=call.channel)
        try:
            response = await self._exchange("sub_refresh", call.client, request, _RefreshResult)
        except _Failed:
            return SubRefreshReply(expire_at=int(time.time()) + REFRESH_RETRY)
        result = response.result
        if result is None or result.expired:
            return SubRefreshReply(expired=True)
        info = self._json(result.info, result.b64info, "sub_refresh", "info")
        return SubRefreshReply(expire_at=result.expire_at, info=info)

    async def rpc(self, call: RPCCall) -> bytes | None:
        """Centrifugo's RPC proxy: the backend's answer to ``call.method``."""
        request = self._request(call, method=call.method, data=call.data)
        response = await self._decide("rpc", call.client, request, _RPCResult)
        result = response.result or _RPCResult()
        return self._json(result.data, result.b64data, "rpc", "data")

    # -- the wire --------------------------------------------------------

    def _request(self, call: Any, *, data: bytes | None = None, **fields: str) -> bytes:
        """The JSON body of a call: the connection's fields, then the call's own."""
        raw: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
        b64 = ""
        if data:
            if self.config.binary_encoding:
                b64 = base64.b64encode(data).decode("ascii")
            else:
                raw = msgspec.Raw(data)
        request = _Request(
            client=call.client,
            transport=call.transport,
            # Centrifugo's protocols are json and protobuf: tidings' own HTTP
            # transports speak JSON.
            protocol="json" if call.protocol == "http" else call.protocol,
            encoding=self._encoding,
            user=call.user,
            data=raw,
            b64data=b64,
            **fields,
        )
        return _encoder.encode(request)

    def _forwarded_headers(self, call: ConnectCall) -> dict[str, str]:
        """The client's allowlisted headers, and its allowlisted cookies as a
        ``Cookie`` header (unless ``cookie`` itself is allowlisted)."""
        headers: dict[str, str] = {}
        for name in self._header_allowlist:
            value = call.headers.get(name)
            if value is not None and not _UNSENDABLE.search(value):
                headers[name] = value
        if "cookie" not in headers and self._cookie_allowlist:
            cookies = call.cookies
            pairs = [
                f"{name}={cookies[name]}"
                for name in self._cookie_allowlist
                if name in cookies and not _UNSENDABLE.search(cookies[name])
            ]
            if pairs:
                headers["cookie"] = "; ".join(pairs)
        return headers

    async def _decide(
        self,
        kind: str,
        client: str,
        body: bytes,
        result_type: type[_Result],
        forwarded: Mapping[str, str] | None = None,
    ) -> _Response[_Result]:
        """A call whose answer may refuse: ``disconnect``, then ``error``, raise."""
        try:
            response = await self._exchange(kind, client, body, result_type, forwarded)
        except _Failed:
            raise ProxyUnavailable(kind) from None
        if response.disconnect is not None:
            raise self._disconnect(kind, response.disconnect)
        if response.error is not None:
            raise self._refusal(kind, response.error)
        return response

    async def _exchange(
        self,
        kind: str,
        client: str,
        body: bytes,
        result_type: type[Any],
        forwarded: Mapping[str, str] | None = None,
    ) -> _Response[Any]:
        """POST ``body`` to the URL of ``kind`` and decode the answer.

        Raises :class:`_Failed` (logged, rate-limited) when the backend is
        down, slow past ``proxy.timeout`` (waiting for a slot included),
        answers another status than 200, more than ``max_response_size``
        bytes, or what is not Centrifugo's response of that kind.
        """
        url: str = getattr(self.config, f"{kind}_url")
        headers = {**self._static_headers, **(forwarded or {})}
        headers["content-type"] = "application/json"
        try:
            async with asyncio.timeout(self.timeout):
                async with self._slots:
                    raw = await self._post(url, body, headers)
            return self._decoders[result_type].decode(raw)  # type: ignore[no-any-return]
        except TimeoutError:
            reason = f"no answer within {self.timeout:g}s"
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            reason = f"not Centrifugo's {kind} response ({exc})"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            # ValueError: aiohttp refusing a request it cannot send (a static
            # header with a control character); after msgspec's, which are ValueErrors.
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except _Failed as exc:
            reason = str(exc)
        self._warnings.log(
            log,
            logging.WARNING,
            "%s proxy call to %s failed (client %s): %s",
            kind,
            url,
            client,
            reason,
        )
        raise _Failed(reason)

    async def _post(self, url: str, body: bytes, headers: Mapping[str, str]) -> bytes:
        """The body of a 200 answer, read up to ``max_response_size`` bytes.

        Leaving early (another status, too long) releases the connection
        unread, which closes it: nothing more of that answer is read.
        """
        session = self._session
        if session is None:
            raise _Failed("the proxy is not started")
        limit = self.max_response_size
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as response:
            if response.status != 200:
                raise _Failed(f"HTTP status {response.status}")
            declared = response.content_length
            if declared is not None and declared > limit:
                raise _Failed(f"answer of {declared} bytes, over proxy.max_response_size")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.content.iter_chunked(65536):
                size += len(chunk)
                if size > limit:
                    raise _Failed(f"answer over {limit} bytes (proxy.max_response_size)")
                chunks.append(chunk)
            return b"".join(chunks)

    # -- the answer's parts ----------------------------------------------

    def _covers(self, kind: str, channel: str) -> bool:
        namespaces = self._namespaces[kind]
        return namespaces is None or namespace_of(channel) in namespaces

    def _json(self, raw: msgspec.Raw, b64: str, kind: str, field: str) -> bytes | None:
        """A result's JSON value (``field`` or ``b64<field>``) as raw JSON; None without one.

        Base64 wins when both are set (Centrifugo's rule). Decoded base64 must
        be one JSON value, since tidings carries JSON only: otherwise the
        answer is unusable, the client gets the temporary error.
        """
        if b64:
            try:
                value = base64.b64decode(b64, validate=True)
                msgspec.json.decode(value)
            except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
                self._warnings.log(
                    log,
                    logging.WARNING,
                    "%s proxy answer unusable: b64%s is not base64 of one JSON value (%s)",
                    kind,
                    field,
                    exc,
                )
                raise ProxyUnavailable(kind) from None
            return value
        value = bytes(raw)
        return None if not value or value == b"null" else value

    def _refusal(self, kind: str, error: _Error) -> ProtocolError:
        message = error.message[:256]
        try:
            return Refuse(error.code, message, temporary=error.temporary)
        except ValueError:
            # Fail closed: the backend meant to refuse, with a code SDKs cannot take.
            self._warnings.log(
                log,
                logging.WARNING,
                "%s proxy answered error code %d, not 400-1999 nor a tidings code: refused as 103",
                kind,
                error.code,
            )
            return Refuse(ErrorCode.PERMISSION_DENIED, message)

    def _disconnect(self, kind: str, disconnect: _Disconnect) -> Disconnect:
        reason = disconnect.reason or "disconnected by the application"
        try:
            return Disconnect(disconnect.code, reason)
        except ValueError:
            self._warnings.log(
                log,
                logging.WARNING,
                "%s proxy answered disconnect code %d, not 3000-4999: closed with 3503",
                kind,
                disconnect.code,
            )
            return Disconnect(DisconnectCode.FORCE_DISCONNECT, reason)


def _namespace_set(names: list[str] | None) -> frozenset[str] | None:
    return None if names is None else frozenset(names)
