"""Forged, expired and misused tokens, sent over real sockets on every transport.

The server verifies with an HMAC secret, an RSA and an EC public key at once,
the configuration where algorithm confusion would bite. Each case first sends
the same token with the attack undone (the same claims correctly signed, the
untampered token, the right user or channel) and sees it accepted, then sends
the attack and sees it refused with the code ``docs/security.md`` documents:

==============================  ===================  =====================
refusal                         WebSocket            SSE, long-poll, poll
==============================  ===================  =====================
invalid (forged, not yet valid, close 3500           401, code 101
another user or channel)
expired                         error 109 (stays     401, code 109
                                open)
==============================  ===================  =====================

Connection tokens travel in ``connect`` (WebSocket), ``?token=`` and
``Authorization: Bearer`` (HTTP); subscription tokens in ``subscribe`` and
``?sub_token=``. The WebSocket client is the ``websockets`` library's; the HTTP
one is httpx.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from helpers import TIMEOUT, publish, unique_channel
from tidings.cursor import encode_cursor
from tidings.hub import EMPTY

SECRET = "wire-test-secret-of-sufficient-length"


def _private_keys() -> tuple[Any, Any]:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048), ec.generate_private_key(
        ec.SECP256R1()
    )


def _pem(private_key: Any) -> bytes:
    public: bytes = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return public


RSA_KEY, EC_KEY = _private_keys()
OTHER_RSA_KEY, OTHER_EC_KEY = _private_keys()
RSA_PUBLIC, EC_PUBLIC = _pem(RSA_KEY), _pem(EC_KEY)

#: The key the server verifies each algorithm with, as a backend signs with it.
SIGNING_KEYS: dict[str, Any] = {"HS256": SECRET, "RS256": RSA_KEY, "ES256": EC_KEY}
#: A key of the same kind that the server does not know.
WRONG_KEYS: dict[str, Any] = {
    "HS256": "another-secret-of-sufficient-length!",
    "RS256": OTHER_RSA_KEY,
    "ES256": OTHER_EC_KEY,
}

CONFIG = f"""
[auth]
hmac_secret = "{SECRET}"
rsa_public_key = '''{RSA_PUBLIC.decode()}'''
ecdsa_public_key = '''{EC_PUBLIC.decode()}'''

[channels]
subscribe = "authenticated"

[namespaces.private]
subscribe = "token"
"""


@pytest.fixture(scope="module")
def secure(module_server_factory: Any) -> Iterator[Any]:
    srv = module_server_factory(CONFIG)
    yield srv
    logs = srv.logs()
    assert "Traceback" not in logs and " ERROR " not in logs, logs[-8000:]


# --------------------------------------------------------------------------- tokens


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def signed(claims: dict[str, Any], alg: str = "HS256", key: Any = None) -> str:
    return jwt.encode(claims, SIGNING_KEYS[alg] if key is None else key, algorithm=alg)


def hmac_signed(claims: dict[str, Any], secret: bytes) -> str:
    """HS256 as RFC 7515 builds it: HMAC-SHA256 over ``header.payload``, keyed by ``secret``.

    Keyed by a public key's PEM bytes, this is the algorithm-confusion token: a
    verifier that takes the key for the algorithm the header names accepts it.
    """
    signing_input = segment({"alg": "HS256", "typ": "JWT"}) + "." + segment(claims)
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(mac)


def unsigned(claims: dict[str, Any]) -> str:
    return segment({"alg": "none", "typ": "JWT"}) + "." + segment(claims) + "."


def with_payload(token: str, claims: dict[str, Any]) -> str:
    header, _, signature = token.split(".")
    return f"{header}.{segment(claims)}.{signature}"


def with_flipped_bit(token: str) -> str:
    head, _, signature = token.rpartition(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[len(raw) // 2] ^= 0x01
    return f"{head}.{b64url(bytes(raw))}"


Refusal = Literal["invalid", "expired"]


class Attack(NamedTuple):
    """``genuine(claims)`` is accepted; ``forged(claims)`` is refused as ``refusal``."""

    genuine: Callable[[dict[str, Any]], str]
    forged: Callable[[dict[str, Any]], str]
    refusal: Refusal = "invalid"


def _now() -> int:
    return int(time.time())


def _tampered_signature(alg: str) -> Attack:
    return Attack(lambda c: signed(c, alg), lambda c: with_flipped_bit(signed(c, alg)))


def _wrong_key(alg: str) -> Attack:
    return Attack(lambda c: signed(c, alg), lambda c: signed(c, alg, WRONG_KEYS[alg]))


ATTACKS: dict[str, Attack] = {
    "alg none": Attack(signed, unsigned),
    "HS256 keyed with the RSA public key": Attack(
        lambda c: signed(c, "RS256"), lambda c: hmac_signed(c, RSA_PUBLIC)
    ),
    "HS256 keyed with the EC public key": Attack(
        lambda c: signed(c, "ES256"), lambda c: hmac_signed(c, EC_PUBLIC)
    ),
    "expired": Attack(
        lambda c: signed({**c, "exp": _now() + 600}),
        lambda c: signed({**c, "exp": _now() - 60}),  # past the 5 s leeway
        "expired",
    ),
    "not yet valid": Attack(
        lambda c: signed({**c, "nbf": _now() - 60}),
        lambda c: signed({**c, "nbf": _now() + 60}),  # past the 5 s leeway
    ),
    "tampered payload": Attack(
        signed, lambda c: with_payload(signed(c), {**c, "exp": c["exp"] + 10 * 365 * 86400})
    ),
    **{f"tampered signature {alg}": _tampered_signature(alg) for alg in SIGNING_KEYS},
    **{f"wrong key {alg}": _wrong_key(alg) for alg in SIGNING_KEYS},
}


def test_confusion_tokens_are_real_hs256_signatures_by_the_public_keys() -> None:
    """The forged tokens would pass a verifier that keyed HS256 with the public key."""
    claims = {"sub": "42", "exp": _now() + 600}
    for public in (RSA_PUBLIC, EC_PUBLIC):
        token = hmac_signed(claims, public)
        signing_input, _, signature = token.rpartition(".")
        expected = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
        assert base64.urlsafe_b64decode(signature + "=") == expected
        assert json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "==")) == claims


# --------------------------------------------------------------------------- transports


class Attempt(NamedTuple):
    channel: str
    connection_token: str
    subscription_token: str | None = None


def _ws_reply(ws: ClientConnection, cmd_id: int) -> dict[str, Any]:
    while True:
        for line in str(ws.recv(TIMEOUT)).splitlines():
            reply: dict[str, Any] = json.loads(line)
            if reply.get("id") == cmd_id:
                return reply


def over_websocket(srv: Any, attempt: Attempt) -> str:
    """Connect with the connection token, then subscribe (with the subscription token)."""
    with connect(srv.ws_url + "/connection/websocket", open_timeout=TIMEOUT) as ws:
        try:
            ws.send(json.dumps({"id": 1, "connect": {"token": attempt.connection_token}}))
            reply = _ws_reply(ws, 1)
            if "error" in reply:
                return f"error {reply['error']['code']}"
            subscribe: dict[str, Any] = {"channel": attempt.channel}
            if attempt.subscription_token is not None:
                subscribe["token"] = attempt.subscription_token
            ws.send(json.dumps({"id": 2, "subscribe": subscribe}))
            reply = _ws_reply(ws, 2)
            if "error" in reply:
                return f"error {reply['error']['code']}"
            assert "subscribe" in reply, reply
            return "accepted"
        except ConnectionClosed as closed:
            return f"close {closed.rcvd.code if closed.rcvd else None}"


#: Query parameters as httpx takes them.
Params = list[tuple[str, str | int | float | bool | None]]


def _query(attempt: Attempt) -> Params:
    params: Params = [("channel", attempt.channel)]
    if attempt.subscription_token is not None:
        params.append(("sub_token", attempt.subscription_token))
    return params


def _outcome(resp: httpx.Response) -> str:
    if resp.status_code == 200:
        return "accepted"
    return f"{resp.status_code} {resp.json()['error']['code']}"


def _sse(srv: Any, params: Params, headers: dict[str, str]) -> str:
    with httpx.stream(
        "GET", f"{srv.url}/sse", params=params, headers=headers, timeout=TIMEOUT
    ) as resp:
        if resp.status_code == 200:
            first = next(resp.iter_lines())
            assert first.startswith(("retry:", "event: subscribed")), first
        else:
            resp.read()
        return _outcome(resp)


def over_sse_query(srv: Any, attempt: Attempt) -> str:
    return _sse(srv, [*_query(attempt), ("token", attempt.connection_token)], {})


def over_sse_bearer(srv: Any, attempt: Attempt) -> str:
    return _sse(srv, _query(attempt), {"Authorization": f"Bearer {attempt.connection_token}"})


def over_long_poll(srv: Any, attempt: Attempt) -> str:
    """A long-poll (it subscribes) whose cursor is behind, so that it answers at once."""
    publish(srv, attempt.channel, {"behind": True})
    params: Params = [
        *_query(attempt),
        ("cursor", encode_cursor({attempt.channel: EMPTY})),
        ("timeout", "30"),
    ]
    headers = {"Authorization": f"Bearer {attempt.connection_token}"}
    resp = httpx.get(f"{srv.url}/poll", params=params, headers=headers, timeout=TIMEOUT)
    if resp.status_code == 200:
        assert [p["data"] for p in resp.json()["publications"]] == [{"behind": True}]
    return _outcome(resp)


def over_poll(srv: Any, attempt: Attempt) -> str:
    params: Params = [*_query(attempt), ("timeout", "0"), ("token", attempt.connection_token)]
    return _outcome(httpx.get(f"{srv.url}/poll", params=params, timeout=TIMEOUT))


TRANSPORTS: dict[str, Callable[[Any, Attempt], str]] = {
    "websocket": over_websocket,
    "sse ?token=": over_sse_query,
    "sse bearer": over_sse_bearer,
    "long-poll bearer": over_long_poll,
    "poll ?token=": over_poll,
}


def refused(transport: str, refusal: Refusal, *, subscription: bool = False) -> str:
    """The documented answer (docs/security.md, "What each error means").

    Over WebSocket a subscription token that does not verify fails only its
    subscribe, with 103, as Centrifugo answers it.
    """
    if transport == "websocket":
        if refusal == "invalid":
            return "error 103" if subscription else "close 3500"
        return "error 109"
    return "401 101" if refusal == "invalid" else "401 109"


# --------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_connection_token_attack(secure: Any, transport: str, attack: str) -> None:
    """The connection token is attacked; the channel needs an authenticated client."""
    genuine, forged, refusal = ATTACKS[attack]
    claims = {"sub": unique_channel("user"), "exp": _now() + 600}
    send = TRANSPORTS[transport]
    assert send(secure, Attempt(unique_channel(), genuine(claims))) == "accepted"
    assert send(secure, Attempt(unique_channel(), forged(claims))) == refused(transport, refusal)


@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_subscription_token_attack(secure: Any, transport: str, attack: str) -> None:
    """The subscription token is attacked; the connection token is valid."""
    genuine, forged, refusal = ATTACKS[attack]
    user = unique_channel("user")
    connection = signed({"sub": user, "exp": _now() + 600})
    send = TRANSPORTS[transport]
    refusal_answer = refused(transport, refusal, subscription=True)
    for make, expected in ((genuine, "accepted"), (forged, refusal_answer)):
        channel = f"private:{unique_channel()}"
        claims = {"sub": user, "channel": channel, "exp": _now() + 600}
        assert send(secure, Attempt(channel, connection, make(claims))) == expected


MISUSES = {
    "another user's subscription token": {"sub": "someone-else"},
    "a subscription token for another channel": {"channel": "private:elsewhere"},
}


@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize("misuse", list(MISUSES))
def test_subscription_token_misused(secure: Any, transport: str, misuse: str) -> None:
    """A genuine subscription token, for someone or somewhere else, is an invalid token."""
    user = unique_channel("user")
    connection = signed({"sub": user, "exp": _now() + 600})
    send = TRANSPORTS[transport]
    channel = f"private:{unique_channel()}"
    claims = {"sub": user, "channel": channel, "exp": _now() + 600}
    assert send(secure, Attempt(channel, connection, signed(claims))) == "accepted"
    channel = f"private:{unique_channel()}"
    claims = {"sub": user, "channel": channel, "exp": _now() + 600, **MISUSES[misuse]}
    assert send(secure, Attempt(channel, connection, signed(claims))) == refused(
        transport, "invalid"
    )


def test_expired_connect_leaves_the_websocket_open_for_a_fresh_token(secure: Any) -> None:
    """Error 109 is not a close: the SDKs fetch a new token and connect on the same socket."""
    claims = {"sub": unique_channel("user")}
    with connect(secure.ws_url + "/connection/websocket", open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps({"id": 1, "connect": {"token": signed({**claims, "exp": _now() - 60})}}))
        assert _ws_reply(ws, 1)["error"]["code"] == 109
        ws.send(json.dumps({"id": 2, "connect": {"token": signed({**claims, "exp": _now() + 60})}}))
        assert "client" in _ws_reply(ws, 2)["connect"]
