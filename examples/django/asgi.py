# mypy: disable-error-code="import-untyped, untyped-decorator"
# (Django ships no type information; django-stubs would need a mypy plugin.)
"""The ASGI application: Django, with tidings served for as long as it runs.

``uvicorn examples.django.asgi:application --port 8000`` from the repository root.
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django.settings")
django_app = get_asgi_application()  # sets Django up: import models and hooks after it

from .lifespan import Lifespan  # noqa: E402
from .realtime import rt  # noqa: E402

application = Lifespan(django_app, rt.serve)
