"""Autobahn sections 12-13, adapted: permessage-deflate (RFC 7692).

Negotiation: every offer the RFC makes the server decline is declined (the connection opens
without the extension); every response the server gives is one the RFC allows for the offer
(checked by hand and by websockets' own client factory); and the server *honours* what it
agreed to -- its compressed pushes inflate with a strict ``zlib.decompressobj(-bits)`` at the
window it announced, fresh for every message when it promised no context takeover.

Messages: compressed commands in one frame or in fragments (with a ping between them) are
understood; a compressed message with invalid UTF-8 fails with 1007; RSV1 is judged in
test_framing, the inflated size in test_limits.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.headers import parse_extension

from compliance.support import (
    assert_accepted,
    assert_still_served,
    open_client,
    presence_stats,
    subscribed_client,
)
from compliance.wsclient import OP_CONT, OP_PING, OP_TEXT, Message, WSClient, deflate_message
from helpers import publish

PMD = "permessage-deflate"
STATS = json.dumps(presence_stats()).encode()

#: Offers the server may accept: (offer, websockets factory making the same offer).
VALID_OFFERS: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": (PMD, {}),
    "client_max_window_bits": (f"{PMD}; client_max_window_bits", {"client_max_window_bits": True}),
    "client_max_window_bits=9": (f"{PMD}; client_max_window_bits=9", {"client_max_window_bits": 9}),
    "server_no_context_takeover": (
        f"{PMD}; server_no_context_takeover",
        {"server_no_context_takeover": True},
    ),
    "client_no_context_takeover": (
        f"{PMD}; client_no_context_takeover",
        {"client_no_context_takeover": True},
    ),
    **{
        f"server_max_window_bits={bits}": (
            f"{PMD}; server_max_window_bits={bits}",
            {"server_max_window_bits": bits},
        )
        for bits in (8, 9, 10, 12, 15)
    },
    "everything": (
        f"{PMD}; server_no_context_takeover; client_no_context_takeover; "
        "server_max_window_bits=9; client_max_window_bits=9",
        {
            "server_no_context_takeover": True,
            "client_no_context_takeover": True,
            "server_max_window_bits": 9,
            "client_max_window_bits": 9,
        },
    ),
}

#: Offers RFC 7692 §7 makes the server decline (the connection still opens, uncompressed).
INVALID_OFFERS = {
    "server_max_window_bits=7": f"{PMD}; server_max_window_bits=7",
    "server_max_window_bits=16": f"{PMD}; server_max_window_bits=16",
    "server_max_window_bits-no-value": f"{PMD}; server_max_window_bits",
    "server_max_window_bits=09": f"{PMD}; server_max_window_bits=09",
    "client_max_window_bits=16": f"{PMD}; client_max_window_bits=16",
    "client_max_window_bits=abc": f"{PMD}; client_max_window_bits=abc",
    "no_context_takeover-with-value": f"{PMD}; server_no_context_takeover=1",
    "duplicate-parameter": f"{PMD}; client_no_context_takeover; client_no_context_takeover",
    "unknown-parameter": f"{PMD}; x_foo=1",
    "unknown-extension": "x-webkit-deflate-frame",
}

_WINDOW_PARAMS = ("server_max_window_bits", "client_max_window_bits")
_FLAG_PARAMS = ("server_no_context_takeover", "client_no_context_takeover")


def assert_response_allowed(offer: str, client: WSClient) -> None:
    """The response is one RFC 7692 §7.1 allows for ``offer`` (one offer, permessage-deflate)."""
    assert client.deflate is not None
    offered = dict(parse_extension(offer)[0][1])
    params = client.deflate.params
    names = [name for name, _ in params]
    assert len(names) == len(set(names)), f"duplicate parameters: {params}"
    for name, value in params:
        assert name in _WINDOW_PARAMS + _FLAG_PARAMS, f"unknown parameter {name}"
        if name in _FLAG_PARAMS:
            assert value is None, params
        else:
            assert value is not None and value.isdigit() and 8 <= int(value) <= 15, params
            assert value == str(int(value)), params
    answered = dict(params)
    if "server_no_context_takeover" in offered:  # §7.1.1.1: MUST be in the response
        assert "server_no_context_takeover" in answered, params
    if offered.get("server_max_window_bits"):  # §7.1.2.1: MUST answer with <= the offer
        window = answered.get("server_max_window_bits")
        assert window is not None, params
        assert int(window) <= int(offered["server_max_window_bits"] or 15), params
    if "client_max_window_bits" not in offered:  # §7.1.2.2: MUST NOT answer it unasked
        assert "client_max_window_bits" not in answered, params
    elif offered["client_max_window_bits"] and "client_max_window_bits" in answered:
        assert int(answered["client_max_window_bits"] or 15) <= int(
            offered["client_max_window_bits"]
        ), params


def compressed_push(client: WSClient, srv: Any, channel: str, data: Any) -> Any:
    """Publish ``data`` through the API; return the push as the client inflated it (at the
    agreed window), having checked that it came compressed."""
    publish(srv, channel, data)
    while True:
        message = client.recv_message()
        assert isinstance(message, Message), f"expected the push, got {message}"
        pushes = [json.loads(line) for line in message.payload.split(b"\n") if line]
        pushed = [m["push"]["pub"]["data"] for m in pushes if "push" in m]
        if pushed:
            assert message.compressed, f"a {len(message.payload)}-byte push not compressed"
            return pushed[0]


def far_repeats() -> dict[str, str]:
    """2.4 kB whose only redundancy is 1,200 bytes back: a compressor with a window over
    512 bytes refers that far, and a strict 9-bit inflater then fails "distance too far back"."""
    block = secrets.token_hex(600)
    return {"blob": block + block}


@pytest.mark.parametrize("name", VALID_OFFERS)
def test_valid_offer_is_declined_or_accepted_and_honoured(ws_server: Any, name: str) -> None:
    offer, factory_options = VALID_OFFERS[name]
    client, channel = subscribed_client(ws_server, offer)
    with client:
        if client.deflate is None:
            return  # declining an offer is always allowed (§5); the connection is open
        assert_response_allowed(offer, client)
        ClientPerMessageDeflateFactory(**factory_options).process_response_params(
            list(client.deflate.params), []
        )
        for _ in range(2):  # two messages: no_context_takeover, when promised, is kept
            data = far_repeats()
            assert compressed_push(client, ws_server, channel, data) == data


def test_plain_offer_is_accepted(ws_server: Any) -> None:
    """The default configuration compresses (websocket.compression = true)."""
    with open_client(ws_server, PMD) as client:
        assert client.deflate is not None, client.response.headers


@pytest.mark.parametrize("offer", INVALID_OFFERS.values(), ids=INVALID_OFFERS.keys())
def test_invalid_offer_is_declined_and_the_connection_opens(ws_server: Any, offer: str) -> None:
    with open_client(ws_server, offer) as client:
        assert client.extensions_header is None, client.extensions_header
        client.connect()
        client.send_commands(presence_stats())
        assert_accepted(client)


def test_invalid_first_offer_falls_back_to_the_next(ws_server: Any) -> None:
    """§5.1: offers are in order of preference; a declined one does not end negotiation."""
    offer = f"{PMD}; server_max_window_bits=16, {PMD}; client_no_context_takeover"
    with open_client(ws_server, offer) as client:
        assert client.deflate is not None, "the valid second offer was not accepted"
        assert_response_allowed(f"{PMD}; client_no_context_takeover", client)


def test_server_max_window_bits_9_push_inflates_with_a_9_bit_window(ws_server: Any) -> None:
    """The finding of issue 10: an offer of 9 bits accepted, then a 15-bit stream sent."""
    client, channel = subscribed_client(ws_server, f"{PMD}; server_max_window_bits=9")
    with client:
        if client.deflate is not None:
            assert client.deflate.server_window_bits <= 9, client.deflate
            data = far_repeats()
            assert compressed_push(client, ws_server, channel, data) == data


# --------------------------------------------------------------------------- client messages


@pytest.mark.parametrize(
    ("deflate", "cuts"),
    [
        pytest.param({}, [], id="one-frame"),
        pytest.param({}, [1, 5], id="three-fragments"),
        pytest.param({}, None, id="one-byte-fragments"),
        pytest.param({}, [0], id="empty-first-fragment"),
        pytest.param({}, [-1], id="empty-last-fragment"),
        pytest.param({"window_bits": 9}, [], id="window-9"),
        pytest.param({"level": 0}, [], id="stored-blocks"),
        pytest.param({"final": True}, [], id="bfinal-block"),
        pytest.param({"final": True, "level": 0}, [3], id="bfinal-stored-fragmented"),
    ],
)
def test_compressed_command_is_understood(
    ws_server: Any, deflate: dict[str, Any], cuts: list[int] | None
) -> None:
    """A compressed command, cut at ``cuts`` (None: between every byte; -1: the end) into
    fragments, in each form RFC 7692 §7.2.3 lets a client produce."""
    offer = f"{PMD}; client_max_window_bits" if "window_bits" in deflate else PMD
    with open_client(ws_server, offer) as client:
        assert client.deflate is not None
        client.connect()
        size = len(deflate_message(STATS, **deflate))
        split = range(1, size) if cuts is None else [size if c < 0 else c for c in cuts]
        client.send_compressed(STATS, split=split, **deflate)
        assert_accepted(client)
        client.send_commands(presence_stats(command_id=3))  # uncompressed: allowed too
        assert_accepted(client, 3)


def test_ping_between_compressed_fragments_is_answered_first(ws_server: Any) -> None:
    with open_client(ws_server, PMD) as client:
        client.connect()
        data = deflate_message(STATS)
        client.send_frame(OP_TEXT, data[:3], fin=False, rsv=4)
        client.send_frame(OP_PING, b"compressed")
        client.expect_pong(b"compressed")
        client.send_frame(OP_CONT, data[3:], fin=True)
        assert_accepted(client)


@pytest.mark.parametrize("fragmented", [False, True])
def test_compressed_invalid_utf8_fails_with_1007(ws_server: Any, fragmented: bool) -> None:
    with open_client(ws_server, PMD) as client:
        client.connect()
        payload = b'{"id":2,"presence_stats":{"channel":"\xed\xa0\x80"}}'
        client.send_compressed(payload, split=[4] if fragmented else [])
        assert client.expect_close() == 1007
    assert_still_served(ws_server)


def test_corrupt_deflate_data_fails_the_connection(ws_server: Any) -> None:
    """RFC 7692 §8 requires failing the connection without naming a code: 1002 (websockets'
    choice) or 1007 (the data is invalid) are both read as right."""
    with open_client(ws_server, PMD) as client:
        client.connect()
        # BFINAL=1, BTYPE=11: a reserved block type. Valid UTF-8 (BEL, "bad") if RSV1 were lost.
        client.send_frame(OP_TEXT, b"\x07bad", rsv=4)
        assert client.expect_close() in (1002, 1007)
    assert_still_served(ws_server)
