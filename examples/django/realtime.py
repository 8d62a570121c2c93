# mypy: disable-error-code="import-untyped, untyped-decorator"
# (Django ships no type information; django-stubs would need a mypy plugin.)
"""tidings for this Django project: the server object and its connect hook.

``rt`` is built from ``settings.TIDINGS``; ``asgi.py`` serves it for as long
as the ASGI server runs, and views publish with ``await rt.publish(...)``.
"""

from __future__ import annotations

from importlib import import_module

from django.conf import settings
from django.contrib.sessions.backends.base import SessionBase

from tidings import ConnectCall, ConnectReply, ErrorCode, Refuse, Tidings

#: The key of the session holding the logged-in user's name (views.login sets it).
SESSION_USER = "user"

rt = Tidings.from_config(settings.TIDINGS)


def session_store(session_key: str) -> SessionBase:
    """The session a cookie names, through the configured backend, as Django's
    SessionMiddleware opens it."""
    store: type[SessionBase] = import_module(settings.SESSION_ENGINE).SessionStore
    return store(session_key=session_key)


@rt.on_connect
async def connect(call: ConnectCall) -> ConnectReply:
    """A client is the user of its Django session; without one it is refused.

    The browser sends Django's session cookie with the WebSocket upgrade to
    tidings (cookies go to every port of a host). ``aget`` reads the session
    without blocking the loop: with signed cookies it only checks the
    signature; with DB sessions Django runs the query in a thread.
    """
    cookie = call.cookies.get(settings.SESSION_COOKIE_NAME)
    user = await session_store(cookie).aget(SESSION_USER) if cookie else None
    if not isinstance(user, str) or not user:
        raise Refuse(ErrorCode.UNAUTHORIZED, "log in first")
    return ConnectReply(user=user, info={"name": user})
