"""The hand-written opening handshake (``plain_handshake``) against ``websockets``' own.

``plain_handshake`` answers the plain handshakes itself (it is cheaper: see its
docstring) and leaves every other one to ``websockets``. What must hold: it
never accepts a request ``websockets`` would refuse, and when it answers, its
101 is byte for byte the one ``websockets`` would send (the ``Date`` aside,
which depends on the second), with the same subprotocol and no extension.
And it does answer what real clients send, or it would save nothing.
"""

from __future__ import annotations

import re
from base64 import b64encode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.http11 import Request as WSRequest

from tidings.centrifuge.wire import JSON
from tidings.transports.websocket import (
    WIRES,
    handshake_headers,
    handshake_protocol,
    plain_handshake,
)

pytestmark = pytest.mark.unit

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
PLAIN = [
    (b"host", b"127.0.0.1:8000"),
    (b"upgrade", b"websocket"),
    (b"connection", b"Upgrade"),
    (b"sec-websocket-key", KEY),
    (b"sec-websocket-version", b"13"),
]
_DATE = re.compile(rb"Date: [^\r]*\r\n")


def websockets_answer(
    raw: list[tuple[bytes, bytes]], compression: bool
) -> tuple[int, bytes, str | None, int]:
    """What the server's ``websockets`` path answers: status, head, subprotocol, extensions."""
    protocol = handshake_protocol(compression, 1 << 20)
    response = protocol.accept(WSRequest("/connection/websocket", handshake_headers(raw)))
    protocol.send_response(response)
    head = b"".join(protocol.data_to_send())
    return response.status_code, head, protocol.subprotocol, len(protocol.extensions)


def assert_same_as_websockets(raw: list[tuple[bytes, bytes]], compression: bool) -> bool:
    """Check the fast answer against ``websockets``; whether the fast path answered."""
    fast = plain_handshake(raw, compression)
    if fast is None:
        return False
    head, wire = fast
    status, expected, subprotocol, extensions = websockets_answer(raw, compression)
    assert status == 101, (raw, expected)
    assert _DATE.sub(b"", head) == _DATE.sub(b"", expected)
    assert _DATE.search(head), head
    assert wire is WIRES.get(subprotocol or "", JSON)
    assert extensions == 0
    return True


@pytest.mark.parametrize("compression", [True, False])
@pytest.mark.parametrize(
    "extra",
    [
        [],
        [(b"sec-websocket-protocol", b"centrifuge-json")],
        [(b"sec-websocket-protocol", b"centrifuge-protobuf")],
        [(b"sec-websocket-protocol", b"")],  # centrifuge-js' empty offer
        [(b"origin", b"http://127.0.0.1:8000")],
        [(b"user-agent", b"Mozilla/5.0"), (b"upgrade-insecure-requests", b"1")],
    ],
)
def test_what_clients_send_takes_the_fast_path_and_matches_websockets(
    extra: list[tuple[bytes, bytes]], compression: bool
) -> None:
    assert assert_same_as_websockets(PLAIN + extra, compression)


def test_firefox_connection_header_and_any_case_upgrade_take_the_fast_path() -> None:
    raw = [
        (b"upgrade", b"WebSocket") if name == b"upgrade" else (name, value) for name, value in PLAIN
    ]
    raw = [
        (b"connection", b"keep-alive, Upgrade") if n == b"connection" else (n, v) for n, v in raw
    ]
    assert assert_same_as_websockets(raw, compression=True)


def test_an_extension_offer_goes_to_websockets_only_while_compression_is_on() -> None:
    raw = [*PLAIN, (b"sec-websocket-extensions", b"permessage-deflate; client_max_window_bits")]
    assert plain_handshake(raw, compression=True) is None
    _, _, _, extensions = websockets_answer(raw, compression=True)
    assert extensions == 1  # websockets negotiates it
    assert assert_same_as_websockets(raw, compression=False)  # ignored by both


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"sec-websocket-key", b"tooshort"),
        (b"sec-websocket-key", b"!!!!!!!!!!!!!!!!!!!!!!=="),
        (b"sec-websocket-key", b64encode(b"x" * 17)),
        (b"sec-websocket-version", b"8"),
        (b"upgrade", b"h2c"),
        (b"connection", b"close"),
    ],
)
def test_invalid_handshakes_go_to_websockets_which_refuses_them(name: bytes, value: bytes) -> None:
    raw = [(n, value if n == name else v) for n, v in PLAIN]
    assert plain_handshake(raw, compression=False) is None
    status, _, _, _ = websockets_answer(raw, compression=False)
    assert status in (400, 426)


def test_an_unusual_valid_handshake_goes_to_websockets_which_accepts_it() -> None:
    raw = [(n, b"Upgrade," if n == b"connection" else v) for n, v in PLAIN]  # an empty list item
    assert plain_handshake(raw, compression=False) is None
    assert websockets_answer(raw, compression=False)[0] == 101


@pytest.mark.parametrize(
    "name", [b"sec-websocket-key", b"sec-websocket-version", b"upgrade", b"connection"]
)
def test_a_missing_or_repeated_header_goes_to_websockets(name: bytes) -> None:
    missing = [(n, v) for n, v in PLAIN if n != name]
    assert plain_handshake(missing, compression=False) is None
    assert websockets_answer(missing, compression=False)[0] in (400, 426)
    repeated = [*PLAIN, next((n, v) for n, v in PLAIN if n == name)]
    assert plain_handshake(repeated, compression=False) is None


# Values each header may take: valid, nearly valid, invalid, and arbitrary bytes.
_VALUES = {
    b"upgrade": [b"websocket", b"WebSocket", b"websocket, h2c", b" websocket", b""],
    b"connection": [b"Upgrade", b"upgrade", b"keep-alive, Upgrade", b"Upgrade, close", b"x"],
    b"sec-websocket-key": [KEY, b64encode(b"k" * 16), b64encode(b"k" * 15), KEY + b" ", b""],
    b"sec-websocket-version": [b"13", b"13, 8", b" 13", b"12"],
    b"sec-websocket-protocol": [
        b"centrifuge-json",
        b"centrifuge-protobuf",
        b"centrifuge-json, centrifuge-protobuf",
        b"other",
        b"centrifuge-json,",
        b" ",
        b"",
    ],
    b"sec-websocket-extensions": [b"permessage-deflate", b"permessage-deflate; x=1", b"bad;;"],
    b"origin": [b"http://127.0.0.1:8000", b"null"],
}
#: A header value as the HTTP parser passes it on (httptools refuses control characters).
_header_bytes = st.lists(
    st.sampled_from([9, *range(0x20, 0x7F), *range(0x80, 0x100)]), max_size=30
).map(bytes)


@st.composite
def requests(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """A valid plain handshake with up to four changes (a header dropped,
    repeated, added or given another value: a listed one or arbitrary bytes),
    in any order, so that both paths and the border between them are exercised."""
    raw = list(PLAIN)
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(list(_VALUES)))
        value = draw(st.one_of(st.sampled_from(_VALUES[name]), _header_bytes))
        change = draw(st.sampled_from(["drop", "repeat", "set", "add"]))
        present = [i for i, (n, _) in enumerate(raw) if n == name]
        if change == "drop" and present:
            del raw[present[0]]
        elif change == "repeat" and present:
            raw.append(raw[present[0]])
        elif change == "set" and present:
            raw[present[0]] = (name, value)
        else:
            raw.append((name, value))
    return draw(st.permutations(raw))


@settings(max_examples=3000, deadline=None)
@given(raw=requests(), compression=st.booleans())
def test_the_fast_path_never_answers_differently_from_websockets(
    raw: list[tuple[bytes, bytes]], compression: bool
) -> None:
    assert_same_as_websockets(raw, compression)
