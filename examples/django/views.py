# mypy: disable-error-code="import-untyped, untyped-decorator"
# (Django ships no type information; django-stubs would need a mypy plugin.)
"""The board's views: log in (a session), post a notice (published to tidings), the page.

The views are async: ``await rt.publish(...)`` runs in the same event loop as
tidings, so publishing is a function call, not an HTTP request.
"""

from __future__ import annotations

import importlib.resources
import re
import time

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from .realtime import SESSION_USER, rt

CHANNEL = "board:lobby"
MAX_TEXT = 500
NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")


async def _user(request: HttpRequest) -> str | None:
    user = await request.session.aget(SESSION_USER)
    return user if isinstance(user, str) else None


@require_GET
async def board(request: HttpRequest) -> HttpResponse:
    context = {
        "user": await _user(request),
        "channel": CHANNEL,
        "tidings_url": f"http://{request.get_host().split(':')[0]}:{settings.TIDINGS_PORT}",
    }
    return render(request, "board.html", context)


@require_POST
async def login(request: HttpRequest) -> HttpResponse:
    """A demo login: any well-formed name. A real site uses django.contrib.auth."""
    name = request.POST.get("name", "")
    if not NAME.fullmatch(name):
        return HttpResponseBadRequest("a name is 1-32 letters, digits, '_', '.' or '-'")
    await request.session.acycle_key()
    await request.session.aset(SESSION_USER, name)
    return redirect("board")


@require_POST
async def logout(request: HttpRequest) -> HttpResponse:
    await request.session.aflush()
    return redirect("board")


@require_POST
async def notify(request: HttpRequest) -> HttpResponse:
    """Post a notice: published in-process to everyone following the board."""
    user = await _user(request)
    if user is None:
        return JsonResponse({"error": "log in first"}, status=401)
    text = request.POST.get("text", "").strip()
    if not 0 < len(text) <= MAX_TEXT:
        return JsonResponse({"error": f"text: 1 to {MAX_TEXT} characters"}, status=400)
    notice = {"user": user, "text": text, "time": round(time.time(), 3)}
    result = await rt.publish(CHANNEL, notice)
    if request.headers.get("accept") == "application/json":
        return JsonResponse({"offset": result.offset, "epoch": result.epoch})
    return redirect("board")


@require_GET
async def tidings_js(request: HttpRequest) -> HttpResponse:
    """The browser client shipped in the tidings package, served from this origin."""
    source = importlib.resources.files("tidings") / "static" / "tidings.js"
    return HttpResponse(source.read_bytes(), content_type="text/javascript")
