"""Settings of the example: one page, sessions in signed cookies, tidings' configuration.

Sessions use Django's signed-cookie backend, so the example needs no
database; with DB sessions (``django.contrib.sessions`` and SQLite) the
connect hook works unchanged, since it reads the session through the same
``SessionStore`` API (``realtime.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Signs the session cookies. The default is for trying the example only.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "change-me: a long random string for Django")
DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS: list[str] = []
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
ROOT_URLCONF = "examples.django.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [HERE / "templates"],
    }
]
DATABASES: dict[str, dict[str, str]] = {}
SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
USE_TZ = True

#: Where tidings listens (its own port, next to Django's).
TIDINGS_PORT = int(os.environ.get("BOARD_TIDINGS_PORT", "8001"))
#: The origins of this site, which the page's WebSocket to tidings comes from.
BOARD_ORIGINS = os.environ.get("BOARD_ORIGINS", "http://127.0.0.1:8000,http://localhost:8000")

#: tidings' configuration: the same tree as tidings.toml (docs/configuration.md).
TIDINGS = {
    "host": "127.0.0.1",
    "port": TIDINGS_PORT,
    "allowed_origins": [o.strip() for o in BOARD_ORIGINS.split(",") if o.strip()],
    # Only logged-in users follow the board, and see who else does (presence);
    # only the server publishes to it.
    "namespaces": {"board": {"subscribe": "authenticated", "publish": "nobody", "presence": True}},
}
