"""CI-sized fuzzing: every target of ``targets.py``, a few thousand inputs each.

Two kinds of input per target, both from Hypothesis: arbitrary bytes, and the
target's seed corpus (valid examples) mutated the way a fuzzer mutates —
bytes flipped, inserted, deleted, repeated, spliced with another seed. Random
bytes alone almost never make a well-formed HTTP request or frame, so the
seeds carry the runs deep into the code; the bytes keep the shallow paths
honest. The long, coverage-guided campaign (``scripts/fuzz``) runs the same
targets a million times each.

``test_reproducer`` replays the minimal inputs the campaign found, one case
per finding, so each stays fixed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from targets import TARGETS, InvariantBroken, Target, check, frames_available

pytestmark = pytest.mark.unit

HERE = Path(__file__).resolve().parent

#: Examples per strategy and target, sized so that the whole file runs in well
#: under a minute on two busy cores.
_EXAMPLES = {
    "http": 600,
    "frames": 2000,
    "commands": 2000,
    "session": 800,
    "protobuf_commands": 2000,
    "protobuf_session": 800,
    "cursor": 2000,
    "query": 2000,
}


def _fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,  # no .hypothesis/ in the tree; failures print their input
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@st.composite
def _mutated(draw: st.DrawFn, seeds: list[bytes], max_len: int) -> bytes:
    """A seed after one to four fuzzer-style mutations."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(("flip", "insert", "delete", "repeat", "splice", "cut")))
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif kind == "repeat":
            size = draw(st.integers(1, 64))
            data[at:at] = data[at : at + size] * draw(st.integers(1, 40))
        elif kind == "splice":
            other = draw(st.sampled_from(seeds))
            data[at:] = other[draw(st.integers(0, len(other))) :]
        elif kind == "cut":
            del data[at:]
    return bytes(data[:max_len])


def _fuzz_tests(name: str) -> tuple[Callable[..., None], Callable[..., None]]:
    target: Target = TARGETS[name]
    examples = _EXAMPLES[name]

    @_fuzz_settings(examples)
    @given(st.binary(max_size=target.max_len))
    def on_bytes(data: bytes) -> None:
        target.run(data)

    @_fuzz_settings(examples)
    @given(_mutated(target.seeds, target.max_len))
    def on_mutated_seeds(data: bytes) -> None:
        target.run(data)

    return on_bytes, on_mutated_seeds


_needs_frames = pytest.mark.skipif(not frames_available(), reason="tidings.frames is not there yet")

test_http_bytes, test_http_mutated_seeds = _fuzz_tests("http")
test_frames_bytes, test_frames_mutated_seeds = (
    _needs_frames(test) for test in _fuzz_tests("frames")
)
test_commands_bytes, test_commands_mutated_seeds = _fuzz_tests("commands")
test_session_bytes, test_session_mutated_seeds = _fuzz_tests("session")
test_protobuf_commands_bytes, test_protobuf_commands_mutated_seeds = _fuzz_tests(
    "protobuf_commands"
)
test_protobuf_session_bytes, test_protobuf_session_mutated_seeds = _fuzz_tests("protobuf_session")
test_cursor_bytes, test_cursor_mutated_seeds = _fuzz_tests("cursor")
test_query_bytes, test_query_mutated_seeds = _fuzz_tests("query")


@pytest.mark.parametrize(
    ("name", "seed"),
    [(name, seed) for name, target in TARGETS.items() for seed in target.seeds],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_seed_is_accepted(name: str, seed: bytes) -> None:
    """Each seed is a valid input the target handles without a finding: a
    broken seed would quietly make the mutated runs shallow."""
    if name == "frames" and not frames_available():
        pytest.skip("tidings.frames is not there yet")
    TARGETS[name].run(seed)


def test_check_raises_on_a_broken_promise() -> None:
    """The invariant helper is what makes every target able to fail."""
    with pytest.raises(InvariantBroken, match="the promise"):
        check(False, "the promise")


#: Minimal inputs the campaign found, with what each one broke. They replay
#: through the same targets, so each finding stays fixed once it is.
REPRODUCERS = [
    pytest.param(
        "commands",
        b'{"id":1,"connect":{"name":"\xff"}}',
        id="invalid-utf8-string-field-escapes-decode_commands",
    ),
    pytest.param(
        "session",
        b'{"id":1,"connect":{}}\n{"id":2,"subscribe":{"channel":"news"}}\n'
        b'{"id":3,"publish":{"channel":"news","data":{"text":"\xe9"}}}',
        id="invalid-utf8-publish-data-pushed-to-subscribers",
    ),
    pytest.param(
        "http",
        b"\x02POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 31\r\n\r\n"
        b'{"channel":"n\xd6","data":{"t":1}}',
        id="invalid-utf8-api-body-500-with-traceback",
    ),
    pytest.param(
        "http",
        b"\x01" + b"GET /tidings.js HTTP/1.1\r\nHost: x\r\n\r\n" * 60,
        id="pipelined-requests-queued-past-the-limit",
    ),
    pytest.param(
        "http",
        b"\x00GET /poll?channel=s&cursor=W1sibmV3cyIsImUiLDBdXQ HTTP/1.1\r\nt:\r\n\r\n"
        b"GET /poll?channel=s&cursor=W1sibmV3cyIsImUiLDBdXQ\n\r\n",
        id="second-pipelined-long-poll-answered-on-shutdown",
    ),
    pytest.param(
        "http",
        b"\x00HEAD /connection/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 14\r\n\r\n",
        id="refused-websocket-handshake-answers-head-with-a-body",
    ),
    pytest.param(
        "http",
        b"\x00POST /connection/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n",
        id="websocket-upgrade-accepted-on-post",
    ),
]


@pytest.mark.parametrize(("name", "data"), REPRODUCERS)
def test_reproducer(name: str, data: bytes) -> None:
    TARGETS[name].run(data)


def test_campaign_runs_and_reports(tmp_path: Path) -> None:
    """``scripts/fuzz``'s driver: a short run of one target under atheris
    gives the figures the long campaign reports, and exits 0 when clean."""
    pytest.importorskip("atheris")
    command = [sys.executable, str(HERE / "campaign.py"), "cursor", "-n", "3000"]
    done = subprocess.run(
        [*command, "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [result] = json.loads((tmp_path / "results.json").read_text())
    assert result["target"] == "cursor"
    assert result["inputs"] == 3000
    assert result["findings"] == 0
    assert result["rss_start_mib"] > 0
    assert "cursor: 3000 inputs in" in done.stdout
