"""HTTP/1.1 on ``asyncio.Protocol`` and httptools: the shell every transport lives in."""

from .connection import HTTPConnection
from .messages import Headers, Request, Response, error_response, json_response
from .routing import Router, UpgradeHandler
from .site import Site

__all__ = [
    "HTTPConnection",
    "Headers",
    "Request",
    "Response",
    "Router",
    "Site",
    "UpgradeHandler",
    "error_response",
    "json_response",
]
