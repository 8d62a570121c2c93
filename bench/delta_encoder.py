"""The Fossil delta encoder's cost: ``python bench/delta_encoder.py``.

Per delta, best of 7 rounds, for the documents a delta namespace carries (a
JSON document of ~4 kB and ~12.6 kB with one field changed, one with a field
inserted) and for the worst case (4 kB of random bytes against other random
bytes: no match, every byte looked up). Beside ours, the C encoder of
``python-fossil-delta`` when it is installed (it is not a dependency: it
builds only from source, see tidings/fossil.py).

Figures of one run: in tidings/fossil.py's docstring and docs/websocket.md.
"""

from __future__ import annotations

import json
import os
import timeit
from collections.abc import Callable

from tidings.fossil import apply_delta, create_delta


def document(version: int, fields: int) -> bytes:
    doc = {f"field{i}": {"value": i * 7, "label": f"label number {i}"} for i in range(fields)}
    doc["version"] = {"value": version, "label": "v"}
    return json.dumps(doc).encode()


def cases() -> dict[str, tuple[bytes, bytes]]:
    small, large = document(1, 60), document(1, 190)
    inserted = json.loads(large)
    inserted["field95"]["note"] = "added in this version"
    return {
        f"json {len(small):,} B, one field changed": (small, document(2, 60)),
        f"json {len(large):,} B, one field changed": (large, document(2, 190)),
        f"json {len(large):,} B, one field inserted": (large, json.dumps(inserted).encode()),
        "random 4,096 B vs random": (os.urandom(4096), os.urandom(4096)),
    }


def best_us(encode: Callable[[bytes, bytes], bytes], source: bytes, target: bytes) -> float:
    number = 200
    rounds = timeit.repeat(lambda: encode(source, target), number=number, repeat=7)
    return min(rounds) / number * 1e6


def main() -> None:
    try:
        import fossil_delta  # type: ignore[import-not-found, import-untyped, unused-ignore]

        c_encoder: Callable[[bytes, bytes], bytes] | None = fossil_delta.create_delta
    except ImportError:
        c_encoder = None
    print(f"{'case':<40} {'ours µs':>9} {'delta B':>8} {'C µs':>8} {'C delta B':>10}")
    for name, (source, target) in cases().items():
        ours = create_delta(source, target)
        assert apply_delta(source, ours) == target
        row = f"{name:<40} {best_us(create_delta, source, target):>9.1f} {len(ours):>8}"
        if c_encoder is not None:
            theirs = c_encoder(source, target)
            row += f" {best_us(c_encoder, source, target):>8.1f} {len(theirs):>10}"
        print(row)


if __name__ == "__main__":
    main()
