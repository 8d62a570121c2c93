"""The admin page: ``/admin``, for an operator with the password (docs/admin.md).

Off unless ``[admin] enabled``. Everything the page does is a call of the
server API (``POST /admin/api/<method>`` runs :meth:`ServerAPI.answer`, the
implementation behind ``/api/``), so the page can do nothing the API cannot;
only who may call differs: a login session instead of the API key.

The rules, each in one place below:

- **Login** (:class:`AdminSessions`): ``POST /admin/login`` with the password
  sets a session cookie — ``HttpOnly`` (no script reads it), ``SameSite=Strict``
  (no other site's page sends it), ``Path=/admin``. Its value is an expiry and
  an HMAC of it under a key derived from the password with scrypt, so every
  worker process accepts it without shared state, a stolen cookie does not
  cheaply reveal the password, and changing the password ends every session.
  Failed logins are counted per client address (:class:`LoginLimiter`).
- **Same origin** (:func:`foreign_origin`): every request that acts or reads
  data (login, logout, the API, the tail) must come from this origin's own
  pages — ``Sec-Fetch-Site: same-origin`` where the browser sends it, and an
  ``Origin`` naming this host; a POST without either is refused, since every
  browser sends ``Origin`` with a POST. So a page of another origin cannot make
  a logged-in browser act (CSRF), even one of the same site, which
  ``SameSite=Strict`` alone would let through.
- **The live tail** (:class:`AdminAccess`): a channel is tailed through
  tidings.js over SSE at ``/admin/tail``, an SSE endpoint of its own whose
  connection token is the admin session cookie, and whose subscriptions the
  namespace rules, tokens and hooks do not refuse: an admin may tail any valid
  channel of a known namespace, whatever keys are configured (an HMAC secret to
  mint a token with may not exist: RSA and ECDSA keys only verify). Nobody
  without a session can use it: the session is its only credential.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import importlib.resources
import logging
import secrets
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import msgspec

from .api import ServerAPI
from .auth import Access, Credentials, Grant, InvalidToken
from .config import Config
from .connections import Connections
from .errors import ErrorCode, ProtocolError
from .hooks import Hooks
from .http import Response, Router, error_response, json_response
from .http.cors import CORS
from .hub import Hub
from .logs import log_client_error
from .metrics import Metrics
from .transports.common import parse_cookies
from .transports.sse import SSETransport

if TYPE_CHECKING:
    from .http import Exchange, Request

__all__ = [
    "ADMIN_COOKIE",
    "Admin",
    "AdminAccess",
    "AdminSessions",
    "LoginLimiter",
    "foreign_origin",
]

log = logging.getLogger(__name__)

#: The session cookie's name.
ADMIN_COOKIE = "tidings_admin"

#: scrypt's salt for the session key. Fixed, so that every worker (and every
#: restart) derives the same key from the same password; it only needs to keep
#: tidings' keys apart from other uses of the password.
_KEY_SALT = b"tidings admin session key v1"

#: Longest cookie value looked at; a real one is about 75 characters.
_MAX_COOKIE = 256

#: The API methods that only read: logged at DEBUG, the rest (publish,
#: disconnect...) at INFO as an audit trail of what operators did.
_READ_ONLY = frozenset({"info", "channels", "history", "presence", "presence_stats"})

#: Headers of every admin answer: never cached, never framed (clickjacking),
#: never sniffed into another type, no URL leaked to other sites.
_HEADERS = [
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
]

#: The page runs only its own files (no inline script: an injected one would
#: not run) and talks only to this origin.
_PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class AdminSessions:
    """Issues and checks session cookie values; no I/O and no clock of its own.

    A value is ``<expiry>.<nonce>.<mac>``: the Unix time it ends, 96 random
    bits so that no two are alike, and HMAC-SHA256 of both under a key derived
    from the password (scrypt, once at start: about 50 ms, so each guess at
    the password from a stolen cookie costs as much).
    """

    __slots__ = ("_key", "_password", "ttl")

    def __init__(self, password: str, ttl: float) -> None:
        secret = password.encode()
        self._password = hashlib.sha256(secret).digest()
        self._key = hashlib.scrypt(secret, salt=_KEY_SALT, n=2**14, r=8, p=1, dklen=32)
        self.ttl = ttl

    def password_matches(self, given: str) -> bool:
        """Whether ``given`` is the password, in time that does not depend on where they differ."""
        digest = hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest()
        return hmac.compare_digest(digest, self._password)

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).digest())

    def issue(self, now: float) -> tuple[str, int]:
        """A new session's cookie value and the Unix time it expires."""
        expires = int(now + self.ttl)
        payload = f"{expires}.{secrets.token_urlsafe(12)}"
        return f"{payload}.{self._mac(payload)}", expires

    def expiry(self, value: str | None, now: float) -> int | None:
        """The Unix time a valid, unexpired session ends; None for anything else."""
        if not value or len(value) > _MAX_COOKIE or not value.isascii():
            return None
        payload, _, mac = value.rpartition(".")
        expires_text, dot, _ = payload.partition(".")
        if not dot or not expires_text.isdigit():
            return None
        if not hmac.compare_digest(mac.encode(), self._mac(payload).encode()):
            return None
        expires = int(expires_text)
        return expires if expires > now else None


class LoginLimiter:
    """Failed logins per client address: past ``max_failures`` within ``window``
    seconds, that address is refused (429) until the window ends — the right
    password too, or the limit would not stop guessing.

    The table holds at most ``max_addresses`` addresses, the oldest forgotten
    first, so many addresses cost bounded memory. Behind a reverse proxy every
    client has the proxy's address: the limit is then the whole server's.
    """

    __slots__ = ("_failures", "max_addresses", "max_failures", "window")

    def __init__(
        self, max_failures: int = 10, window: float = 60.0, max_addresses: int = 10_000
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.max_addresses = max_addresses
        #: address -> (start of its window, failures in it), oldest first.
        self._failures: collections.OrderedDict[str, tuple[float, int]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def retry_after(self, address: str, now: float) -> float:
        """Seconds until ``address`` may try again; 0 when it may now."""
        entry = self._failures.get(address)
        if entry is None:
            return 0.0
        start, count = entry
        if now - start >= self.window:
            del self._failures[address]
            return 0.0
        return start + self.window - now if count >= self.max_failures else 0.0

    def failed(self, address: str, now: float) -> None:
        start, count = self._failures.pop(address, (now, 0))
        if now - start >= self.window:
            start, count = now, 0
        self._failures[address] = (start, count + 1)
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)


def foreign_origin(request: Request) -> str | None:
    """Why ``request`` does not come from this origin's own pages; None when it does.

    ``Sec-Fetch-Site`` (sent by current browsers on every request) must say
    ``same-origin``; an ``Origin`` must name the host the request was sent to
    (the scheme is not compared: behind a TLS-terminating proxy this server
    cannot know it). A POST with neither is refused: browsers send ``Origin``
    with every POST, so one without it is no page of ours; scripts use
    ``/api/`` with the API key instead.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None and site != "same-origin":
        return f"Sec-Fetch-Site is {site}"
    origin = request.headers.get("origin")
    if origin is not None:
        host = (request.headers.get("host") or "").lower()
        if not host or urlsplit(origin).netloc.lower() != host:
            return f"Origin {origin} is not this host"
    elif site is None and request.method == "POST":
        return "a POST without Origin"
    return None


class AdminAccess(Access):
    """The access rules of the admin tail: the admin session is the only credential.

    The tail is served by an :class:`SSETransport` of its own given this
    object; its connection token (read from the cookie named
    :data:`ADMIN_COOKIE`, or ``?token=``) must be a valid session, else 401.
    Any valid channel of a known namespace may then be followed (user-limited
    ones too): names, the per-connection channel count and unknown namespaces
    are still refused as everywhere. The stream ends (3005) when the session
    expires, after ``auth.expiry_grace``.
    """

    def __init__(self, config: Config, sessions: AdminSessions) -> None:
        super().__init__(config)
        self.sessions = sessions
        self.cookie = ADMIN_COOKIE

    def authenticate(self, token: str | None) -> Credentials:
        expires = self.sessions.expiry(token, time.time())
        if expires is None:
            raise InvalidToken("an admin login is required")
        return Credentials("", expires=expires)

    def check_subscribe(
        self, credentials: Credentials, channel: str, grant: Grant | None = None
    ) -> None:
        self.policy(channel)  # a bad name (107) or an unknown namespace (102)


class _Login(msgspec.Struct):
    password: str


_decode_login = msgspec.json.Decoder(_Login).decode


class Admin:
    """The ``/admin`` routes, and the tail's SSE endpoint (started and stopped with
    the server, as a transport is)."""

    def __init__(
        self,
        config: Config,
        api: ServerAPI,
        hub: Hub,
        cors: CORS,
        connections: Connections,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.api = api
        self.sessions = AdminSessions(config.admin.password, config.admin.session_ttl)
        self.limiter = LoginLimiter()
        self.tail = SSETransport(
            hub,
            AdminAccess(config, self.sessions),
            cors,
            connections,
            config.sse,
            config.limits,
            hooks=Hooks(),  # the application's hooks do not judge an operator
            # The server's figures: a tail's stream is an SSE connection like any
            # (one Metrics per process, since workers share their files).
            metrics=metrics,
        )
        files = importlib.resources.files("tidings") / "static"
        self._files = {
            name: (files / name).read_bytes() for name in ("admin.html", "admin.js", "admin.css")
        }
        if len(config.admin.password) < 16:
            log.warning("admin.password is shorter than 16 characters: it can be guessed")

    def mount(self, router: Router) -> None:
        router.add("GET", "/admin", self._page)
        router.add("GET", "/admin/", self._page)
        router.add("GET", "/admin/admin.js", self._script)
        router.add("GET", "/admin/admin.css", self._style)
        router.add("POST", "/admin/login", self._login)
        router.add("POST", "/admin/logout", self._logout)
        router.add("GET", "/admin/tail", self._tail)
        router.add_prefix("POST", "/admin/api/", self._call)

    async def start(self) -> None:
        await self.tail.start()

    async def stop(self) -> None:
        await self.tail.stop()

    # -- the page's files ------------------------------------------------

    def _file(self, name: str, content_type: str, *extra: tuple[str, str]) -> Response:
        headers = [("Content-Type", content_type), *_HEADERS, *extra]
        return Response(200, body=self._files[name], headers=headers)

    async def _page(self, request: Request, conn: Exchange) -> Response:
        return self._file(
            "admin.html", "text/html; charset=utf-8", ("Content-Security-Policy", _PAGE_POLICY)
        )

    async def _script(self, request: Request, conn: Exchange) -> Response:
        return self._file("admin.js", "application/javascript; charset=utf-8")

    async def _style(self, request: Request, conn: Exchange) -> Response:
        return self._file("admin.css", "text/css; charset=utf-8")

    # -- the rules -------------------------------------------------------

    def _refusal(self, request: Request, conn: Exchange) -> Response | None:
        """403 for a request from another origin's page."""
        why = foreign_origin(request)
        if why is None:
            return None
        log_client_error(log, "admin request refused from %s: %s", conn.client, why)
        return _secured(error_response(403, "admin requests must come from the admin page"))

    def _session(self, request: Request) -> int | None:
        """The expiry of the request's valid admin session, if it has one."""
        cookies = parse_cookies("; ".join(request.headers.get_all("cookie")))
        return self.sessions.expiry(cookies.get(ADMIN_COOKIE), time.time())

    # -- the routes ------------------------------------------------------

    async def _login(self, request: Request, conn: Exchange) -> Response:
        refused = self._refusal(request, conn)
        if refused is not None:
            return refused
        address = conn.client[0] if conn.client else ""
        now = time.monotonic()
        wait = self.limiter.retry_after(address, now)
        if wait:
            log_client_error(log, "admin login from %s refused: too many failures", conn.client)
            error = ProtocolError(ErrorCode.TOO_MANY_REQUESTS, "too many failed logins")
            return _secured(error_response(error, headers=[("Retry-After", str(int(wait) + 1))]))
        try:
            given = _decode_login(request.body).password
        except (ValueError, RecursionError):
            return _secured(error_response(400, 'a JSON body {"password": "..."} is expected'))
        if not self.sessions.password_matches(given):
            self.limiter.failed(address, now)
            log_client_error(log, "admin login from %s: wrong password", conn.client)
            return _secured(error_response(401, "wrong password"))
        self.limiter.succeeded(address)
        value, expires = self.sessions.issue(time.time())
        log.info("admin login from %s", conn.client)
        cookie = _cookie(request, value, int(self.sessions.ttl))
        return _secured(json_response({"result": {"expires": expires}}), cookie)

    async def _logout(self, request: Request, conn: Exchange) -> Response:
        """Forget the cookie in this browser (a copy of it stays valid until it expires)."""
        refused = self._refusal(request, conn)
        if refused is not None:
            return refused
        return _secured(json_response({"result": {}}), _cookie(request, "", 0))

    async def _call(self, request: Request, conn: Exchange) -> Response:
        refused = self._refusal(request, conn)
        if refused is not None:
            return refused
        if self._session(request) is None:
            log_client_error(log, "admin API call from %s without a login", conn.client)
            return _secured(error_response(401, "an admin login is required"))
        name = request.path.removeprefix("/admin/api/")
        level = logging.DEBUG if name in _READ_ONLY else logging.INFO
        log.log(level, "admin %s from %s", name, conn.client)
        return _secured(await self.api.answer(name, request.body, conn.client))

    async def _tail(self, request: Request, conn: Exchange) -> Response | None:
        """The tail's SSE stream; the session is checked by :class:`AdminAccess`."""
        refused = self._refusal(request, conn)
        if refused is not None:
            return refused
        return await self.tail.handle(request, conn)


def _cookie(request: Request, value: str, max_age: int) -> tuple[str, str]:
    """The session cookie (``max_age`` 0 removes it); ``Secure`` when the page
    was reached over HTTPS (a TLS-terminating proxy says so in a header)."""
    attributes = f"Path=/admin; Max-Age={max_age}; HttpOnly; SameSite=Strict"
    origin = request.headers.get("origin") or ""
    forwarded = (request.headers.get("x-forwarded-proto") or "").lower()
    if origin.startswith("https://") or forwarded == "https":
        attributes += "; Secure"
    return ("Set-Cookie", f"{ADMIN_COOKIE}={value}; {attributes}")


def _secured(response: Response, *extra: tuple[str, str]) -> Response:
    response.headers.extend((*_HEADERS, *extra))
    return response
