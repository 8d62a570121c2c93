"""Fossil deltas (the format of Centrifugo's ``delta: "fossil"`` subscriptions).

A typed façade over ``python-fossil-delta``: CFFI bindings of fossil-scm's own
``delta.c`` (D. Richard Hipp's reference encoder, the algorithm and format
published at fossil-scm.org ``www/delta_format.wiki``). It is the one PyPI
implementation that builds on Python 3.11 (``fossil-delta`` 17.12.0 ships
Cython 0.27 C that includes the removed ``longintrepr.h``), and as C it costs
23 us for a 4 kB JSON document with one changed field, where a pure-Python
rolling-hash encoder walks every byte in the interpreter. The library is
unmaintained since 2018; what we rely on is small and checked by
``tests/test_delta_fossil.py`` (published vectors, centrifuge-js's own
decoder, a Hypothesis round trip).

Only the server's own publication data goes in (never client-supplied
deltas): :func:`apply_delta` is here for tests and for the Python client.
"""

from __future__ import annotations

from typing import cast

import fossil_delta  # type: ignore[import-untyped]

__all__ = ["apply_delta", "create_delta"]


def create_delta(source: bytes, target: bytes) -> bytes:
    """The Fossil delta that turns ``source`` into ``target``."""
    return cast(bytes, fossil_delta.create_delta(source, target))


def apply_delta(source: bytes, delta: bytes) -> bytes:
    """``source`` with ``delta`` applied; ``ValueError`` for a delta that does not apply.

    The library raises a bare ``Exception`` (or fails an ``assert``) for a
    corrupt delta or a wrong source: both become ``ValueError`` here.
    """
    if not isinstance(source, bytes) or not isinstance(delta, bytes):
        raise TypeError("source and delta are bytes")
    try:
        return cast(bytes, fossil_delta.apply_delta(source, delta))
    except Exception as exc:  # the library's only error type
        raise ValueError(f"fossil delta does not apply: {exc}") from None
