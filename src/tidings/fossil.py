"""Fossil deltas (the format of Centrifugo's ``delta: "fossil"`` subscriptions).

The format is fossil-scm's (``www/delta_format.wiki``): the target's size,
then *copy* (``<n>@<offset>,``) and *insert* (``<n>:<bytes>``) commands, then
a checksum of the target (``<sum>;``), every number in Fossil's base-64
digits. The format fixes how a delta is read, not how matches are found, so
the encoder here is ours, written for Python rather than translated from C:

* what source and target share at both ends is found first, so that a new
  version of a document costs what its change costs, not its size;
* the rest of the source is indexed by its aligned 16-byte blocks (a dict of ``bytes``
  slices, hashed in C) instead of a rolling hash stepped byte by byte in the
  interpreter;
* a match found in the target is grown backwards and forwards by comparing
  slices in halving steps (``O(log n)`` comparisons done by ``memcmp``), not
  byte by byte.

Written by hand because no maintained library fits: ``fossil-delta`` 17.12.0
does not build on Python 3.11, and ``python-fossil-delta`` (CFFI over
fossil-scm's ``delta.c``, last released 2018) builds only from source with a
C compiler at install time. The price, measured by ``bench/delta_encoder.py``
(2-core machine, load ~4): a new version of a 3.3 kB JSON document with one
field changed costs 42 µs to encode (C: 5.6 µs), of 10.7 kB 66 µs (C: 15 µs),
most of it the checksum; 4 kB of random bytes against other random bytes, the
worst case, 614 µs (C: 38 µs). Deltas are the same size as C's or smaller.
A publication's delta is computed once for all its delta subscribers, and
only in namespaces that allow deltas.

Only the server's own publication data is encoded (never client input);
:func:`apply_delta` is for tests and clients, and refuses a malformed delta
with :class:`ValueError`.
"""

from __future__ import annotations

import struct

__all__ = ["apply_delta", "create_delta"]

#: Bytes per indexed source block: fossil-scm's NHASH; shorter matches are not copied.
BLOCK = 16

_DIGITS = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~"
_VALUE = {digit: value for value, digit in enumerate(_DIGITS)}


def _number(n: int) -> bytes:
    """``n`` in Fossil's base-64 digits, most significant first."""
    if n == 0:
        return b"0"
    out = bytearray()
    while n:
        out.append(_DIGITS[n & 63])
        n >>= 6
    out.reverse()
    return bytes(out)


def checksum(data: bytes) -> int:
    """fossil-scm's checksum: the sum, modulo 2**32, of ``data`` read as
    big-endian 32-bit words (the last one padded with zero bytes)."""
    padded = data + b"\0" * (-len(data) % 4)
    words: tuple[int, ...] = struct.unpack(f">{len(padded) // 4}I", padded)
    return sum(words) & 0xFFFFFFFF


def _common_length(a: bytes, a_start: int, b: bytes, b_start: int, limit: int) -> int:
    """How many bytes ``a[a_start:]`` and ``b[b_start:]`` share, at most ``limit``."""
    low, high = 0, limit
    while low < high:
        mid = (low + high + 1) // 2
        if a[a_start : a_start + mid] == b[b_start : b_start + mid]:
            low = mid
        else:
            high = mid - 1
    return low


def _common_suffix(a: bytes, a_end: int, b: bytes, b_end: int, limit: int) -> int:
    """How many bytes ``a[:a_end]`` and ``b[:b_end]`` share at their ends, at most ``limit``."""
    low, high = 0, limit
    while low < high:
        mid = (low + high + 1) // 2
        if a[a_end - mid : a_end] == b[b_end - mid : b_end]:
            low = mid
        else:
            high = mid - 1
    return low


def create_delta(source: bytes, target: bytes) -> bytes:
    """The Fossil delta that turns ``source`` into ``target``.

    What both share at their start and at their end is found first (a few
    slice comparisons): successive versions of a document mostly differ in
    a small middle, which is then written as it is when short, or searched
    for blocks of the source when long.
    """
    out = [_number(len(target)), b"\n"]
    shortest = min(len(source), len(target))
    prefix = _common_length(target, 0, source, 0, shortest)
    suffix = _common_suffix(target, len(target), source, len(source), shortest - prefix)
    prefix = prefix if prefix >= BLOCK else 0
    suffix = suffix if suffix >= BLOCK else 0
    if prefix:
        out += [_number(prefix), b"@0,"]
    middle_end = len(target) - suffix
    if middle_end - prefix > LITERAL_MIDDLE:
        _search_blocks(source, target, prefix, middle_end, out)
    elif middle_end > prefix:
        out += [_number(middle_end - prefix), b":", target[prefix:middle_end]]
    if suffix:
        out += [_number(suffix), b"@", _number(len(source) - suffix), b","]
    out += [_number(checksum(target)), b";"]
    return b"".join(out)


#: A differing middle up to this long is inserted as it is: searching it could
#: save at most its length less a copy command, and indexing the source costs
#: ~0.1 µs per 16 bytes of it.
LITERAL_MIDDLE = 64


def _search_blocks(source: bytes, target: bytes, start: int, end: int, out: list[bytes]) -> None:
    """Append the commands that make ``target[start:end]``: copies of source
    blocks found in it, inserts of what lies between."""
    blocks: dict[bytes, int] = {}
    for offset in range(0, len(source) - BLOCK + 1, BLOCK):
        blocks.setdefault(source[offset : offset + BLOCK], offset)
    pending = at = start  # ``pending``: the first target byte not yet written
    while at <= end - BLOCK:
        found = blocks.get(target[at : at + BLOCK])
        if found is None:
            at += 1
            continue
        back = _common_suffix(target, at, source, found, min(at - pending, found))
        length = BLOCK + back
        length += _common_length(
            target,
            at + BLOCK,
            source,
            found + BLOCK,
            min(end - at - BLOCK, len(source) - found - BLOCK),
        )
        at -= back
        if at > pending:
            out += [_number(at - pending), b":", target[pending:at]]
        out += [_number(length), b"@", _number(found - back), b","]
        pending = at = at + length
    if pending < end:
        out += [_number(end - pending), b":", target[pending:end]]


class _Reader:
    """The commands of a delta, read left to right."""

    __slots__ = ("at", "delta")

    def __init__(self, delta: bytes) -> None:
        self.delta = delta
        self.at = 0

    def number(self) -> int:
        value, start = 0, self.at
        while self.at < len(self.delta):
            digit = _VALUE.get(self.delta[self.at])
            if digit is None:
                break
            value = (value << 6) | digit
            self.at += 1
        if self.at == start:
            raise ValueError(f"fossil delta: a number expected at byte {start}")
        return value

    def symbol(self) -> int:
        if self.at >= len(self.delta):
            raise ValueError("fossil delta: truncated")
        self.at += 1
        return self.delta[self.at - 1]


def apply_delta(source: bytes, delta: bytes) -> bytes:
    """``source`` with ``delta`` applied; :class:`ValueError` for a delta that
    does not apply (malformed, out of range, or a checksum that differs)."""
    if not isinstance(source, bytes) or not isinstance(delta, bytes):
        raise TypeError("source and delta are bytes")
    reader = _Reader(delta)
    size = reader.number()
    if reader.symbol() != ord("\n"):
        raise ValueError("fossil delta: the size must end with a newline")
    out = bytearray()
    while True:
        count = reader.number()
        command = reader.symbol()
        if command == ord("@"):
            offset = reader.number()
            if reader.symbol() != ord(","):
                raise ValueError("fossil delta: a copy must end with a comma")
            if offset + count > len(source):
                raise ValueError("fossil delta: a copy past the end of the source")
            out += source[offset : offset + count]
        elif command == ord(":"):
            if reader.at + count > len(delta):
                raise ValueError("fossil delta: an insert past the end of the delta")
            out += delta[reader.at : reader.at + count]
            reader.at += count
        elif command == ord(";"):
            if len(out) != size:
                raise ValueError(f"fossil delta: {len(out)} bytes made, {size} announced")
            if count != checksum(bytes(out)):
                raise ValueError("fossil delta: checksum mismatch")
            return bytes(out)
        else:
            raise ValueError(f"fossil delta: unknown command {bytes([command])!r}")
        if len(out) > size:
            raise ValueError(f"fossil delta: more than the {size} bytes announced")
