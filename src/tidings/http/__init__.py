"""HTTP/1.1 on ``asyncio.Protocol`` and httptools: the shell every transport lives in."""

from .connection import HTTPConnection
from .messages import Headers, Request, Response, error_response, json_response
from .routing import Exchange, Handler, Held, Router, UpgradeHandler
from .site import Site

__all__ = [
    "Exchange",
    "HTTPConnection",
    "Handler",
    "Headers",
    "Held",
    "Request",
    "Response",
    "Router",
    "Site",
    "UpgradeHandler",
    "error_response",
    "json_response",
]
