"""Tokens, namespaces and user-limited channels: the same rules on every transport.

Unit tests attack the token verifier directly; the matrix below runs each rule
against a real server over SSE, long-poll/poll and WebSocket.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from helpers import TIMEOUT, publish, unique_channel
from tidings.auth import Access, InvalidToken, user_boundary
from tidings.config import load_config
from tidings.errors import ErrorCode, ProtocolError
from ws_support import RawClient

SECRET = "unit-test-secret-of-sufficient-length"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PUBLIC = (
    RSA_KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC_PUBLIC = (
    EC_KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)

CONFIG = f"""
[auth]
hmac_secret = "{SECRET}"
rsa_public_key = '''{RSA_PUBLIC}'''
ecdsa_public_key = '''{EC_PUBLIC}'''

[channels]
subscribe = "authenticated"

[namespaces.public]
subscribe = "anonymous"

[namespaces.private]
subscribe = "token"

[namespaces.chat]
subscribe = "authenticated"
publish = "subscribers"
history = "subscribers"
"""


def hs256(claims: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode({"exp": int(time.time()) + 600, **claims}, secret, algorithm="HS256")


def access() -> Access:
    # A directory of its own: a fixed path in /tmp is shared with every other run of the suite
    # on the machine (parallel workers, other checkouts), which could read it half written.
    with tempfile.TemporaryDirectory(prefix="tidings-test-auth-") as directory:
        path = os.path.join(directory, "auth.toml")
        with open(path, "w") as file:
            file.write(CONFIG)
        return Access(load_config(path))


# --------------------------------------------------------------------------- attacks


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def confusion_token(public_pem: str, claims: dict[str, Any]) -> str:
    """The algorithm-confusion forgery: HS256 keyed with a public key's PEM text.

    HMAC-SHA256 over ``base64url(header) + "." + base64url(payload)``, as a real
    HS256 token is signed, so that a verifier keying HS256 with the public key
    would accept it.
    """
    signing_input = _b64({"alg": "HS256", "typ": "JWT"}) + "." + _b64(claims)
    mac = hmac.new(public_pem.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def test_confusion_tokens_are_hs256_signatures_by_the_public_keys() -> None:
    """Keyed with the public key as an HMAC secret, the forged token verifies.

    So a verifier that let the header pick the algorithm for a public key would
    accept it, and the refusal below shows that ours does not.
    """
    for public in (RSA_PUBLIC, EC_PUBLIC):
        token = confusion_token(public, {"sub": "42"})
        signing_input, _, signature = token.rpartition(".")
        expected = hmac.new(public.encode(), signing_input.encode(), hashlib.sha256).digest()
        assert base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)) == expected
        assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_valid_tokens_in_each_accepted_algorithm() -> None:
    verifier = access().tokens
    assert verifier.algorithms == ["ES256", "HS256", "RS256"]
    claims = {"sub": "42", "exp": int(time.time()) + 60, "info": {"name": "Ann"}}
    keys: list[tuple[Any, str]] = [(SECRET, "HS256"), (RSA_KEY, "RS256"), (EC_KEY, "ES256")]
    for key, alg in keys:
        creds = verifier.connection(jwt.encode(claims, key, algorithm=alg))
        assert creds.user == "42" and creds.info == b'{"name":"Ann"}'


ATTACKS: dict[str, Callable[[], str]] = {
    "alg none": lambda: _b64({"alg": "none", "typ": "JWT"}) + "." + _b64({"sub": "42"}) + ".",
    "HS256 signed with the RSA public key": lambda: confusion_token(RSA_PUBLIC, {"sub": "42"}),
    "HS256 signed with the EC public key": lambda: confusion_token(EC_PUBLIC, {"sub": "42"}),
    "wrong key": lambda: hs256({"sub": "42"}, secret="another-secret-of-sufficient-length!"),
    "tampered payload": lambda: (
        lambda t: (
            t.split(".")[0] + "." + _b64({"sub": "1", "exp": 9999999999}) + "." + t.split(".")[2]
        )
    )(hs256({"sub": "42"})),
    "not yet valid": lambda: hs256({"sub": "42", "nbf": int(time.time()) + 3600}),
    # A missing sub is an anonymous user (test_centrifugo_compat.py); a wrong type is not.
    "sub not a string": lambda: hs256({"sub": 42}),
    "unsupported algorithm": lambda: jwt.encode({"sub": "42"}, SECRET * 2, algorithm="HS512"),
    "garbage": lambda: "not-a-token",
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_forged_connection_tokens_are_invalid(attack: str) -> None:
    with pytest.raises(InvalidToken):
        access().tokens.connection(ATTACKS[attack]())


def test_expired_token_is_109_not_invalid() -> None:
    token = hs256({"sub": "42", "exp": int(time.time()) - 60})
    with pytest.raises(ProtocolError) as info:
        access().tokens.connection(token)
    assert info.value.code == ErrorCode.TOKEN_EXPIRED
    assert not isinstance(info.value, InvalidToken)


def test_leeway_accepts_a_token_expired_a_moment_ago() -> None:
    token = hs256({"sub": "42", "exp": int(time.time()) - 2})
    assert access().tokens.connection(token).user == "42"


def test_subscription_token_must_match_user_and_name_its_channel() -> None:
    acc = access()
    alice = acc.authenticate(hs256({"sub": "alice"}))
    token = hs256({"sub": "alice", "channel": "private:x"})
    channel, grant = acc.tokens.subscription(token, alice)
    assert channel == "private:x"
    acc.check_subscribe(alice, "private:x", grant)
    bob = acc.authenticate(hs256({"sub": "bob"}))
    with pytest.raises(InvalidToken):
        acc.tokens.subscription(token, bob)
    with pytest.raises(InvalidToken):
        acc.tokens.subscription(hs256({"sub": "alice"}), alice)  # no channel claim
    assert acc.subscription_grant(token, alice, "private:x") == grant
    with pytest.raises(InvalidToken):
        acc.subscription_grant(token, alice, "private:y")  # presented for another channel
    with pytest.raises(InvalidToken):
        acc.subscription_grants([token], alice, ["private:y", "private:z"])


def test_policy_decisions() -> None:
    acc = access()
    anon = acc.authenticate(None)
    user = acc.authenticate(hs256({"sub": "42", "channels": ["private:granted"]}))
    acc.check_subscribe(anon, "public:news")
    acc.check_subscribe(user, "chat:room")
    acc.check_subscribe(user, "private:granted")  # the connection token's channels claim
    acc.check_subscribe(user, "dialog#42,43")
    denied = [(anon, "chat:room"), (anon, "news"), (user, "private:other"), (user, "dialog#1,2")]
    for creds, channel in denied:
        with pytest.raises(ProtocolError) as info:
            acc.check_subscribe(creds, channel)
        assert info.value.code == ErrorCode.PERMISSION_DENIED, channel
    with pytest.raises(ProtocolError) as info:
        acc.check_subscribe(user, "nowhere:x")
    assert info.value.code == ErrorCode.UNKNOWN_CHANNEL
    acc.check_publish(user, "chat:room", subscribed=True)
    with pytest.raises(ProtocolError):
        acc.check_publish(user, "chat:room", subscribed=False)
    with pytest.raises(ProtocolError):
        acc.check_publish(user, "public:news", subscribed=True)  # secure default: nobody


def test_user_boundary_parsing() -> None:
    assert user_boundary("dialog#42,43") == frozenset({"42", "43"})
    assert user_boundary("chat:dm#7") == frozenset({"7"})
    assert user_boundary("plain") is None


# --------------------------------------------------------------------------- the matrix

Check = Callable[[Any, str, str | None, list[str]], int]
#: Query parameters as httpx takes them.
Params = list[tuple[str, str | int | float | bool | None]]


def sse_status(srv: Any, channel: str, token: str | None, sub_tokens: list[str]) -> int:
    params: Params = [("channel", channel), *(("sub_token", t) for t in sub_tokens)]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.stream(
        "GET", f"{srv.url}/sse", params=params, headers=headers, timeout=TIMEOUT
    ) as resp:
        return resp.status_code


def poll_status(srv: Any, channel: str, token: str | None, sub_tokens: list[str]) -> int:
    params: Params = [("channel", channel), ("timeout", "0")]
    params += [("sub_token", t) for t in sub_tokens]
    if token:
        params.append(("token", token))
    return httpx.get(f"{srv.url}/poll", params=params, timeout=TIMEOUT).status_code


def poll_cookie_status(srv: Any, channel: str, token: str | None, sub_tokens: list[str]) -> int:
    params: Params = [("channel", channel), ("timeout", "0")]
    params += [("sub_token", t) for t in sub_tokens]
    cookies = {"tidings_token": token} if token else {}
    with httpx.Client(cookies=cookies) as client:
        return client.get(f"{srv.url}/poll", params=params, timeout=TIMEOUT).status_code


#: The HTTP status each WebSocket error code corresponds to, for one matrix.
WS_TO_HTTP = {None: 200, 102: 404, 103: 403, 109: 401, 3500: 401}


def ws_status(srv: Any, channel: str, token: str | None, sub_tokens: list[str]) -> int:
    client = RawClient(srv.ws_url)
    try:
        connect: dict[str, Any] = {"token": token} if token else {}
        sub: dict[str, Any] = {"channel": channel}
        if sub_tokens:
            sub["token"] = sub_tokens[0]
        client.send({"id": 1, "connect": connect})
        try:
            reply = client.wait_for(lambda m: m.get("id") == 1)
        except AssertionError:
            return WS_TO_HTTP[client.read_until_closed()]
        if channel in reply.get("connect", {}).get("subs", {}):
            return 200  # subscribed by the server at connect (the token's channels claim)
        if "error" not in reply:
            client.send({"id": 2, "subscribe": sub})
            reply = client.wait_for(lambda m: m.get("id") == 2)
        return WS_TO_HTTP[reply.get("error", {}).get("code")]
    finally:
        client.close()


TRANSPORTS: dict[str, Check] = {
    "sse": sse_status,
    "poll": poll_status,
    "poll-cookie": poll_cookie_status,
    "websocket": ws_status,
}


@pytest.fixture(scope="module")
def secure(module_server_factory: Any) -> Any:
    return module_server_factory(CONFIG)


RULES: list[tuple[str, str, Callable[[str], tuple[str | None, list[str]]], int]] = [
    ("anonymous in an open namespace", "public:{}", lambda ch: (None, []), 200),
    ("anonymous where auth is needed", "chat:{}", lambda ch: (None, []), 403),
    ("anonymous in the default namespace", "{}", lambda ch: (None, []), 403),
    ("authenticated", "chat:{}", lambda ch: (hs256({"sub": "42"}), []), 200),
    ("token namespace without token", "private:{}", lambda ch: (hs256({"sub": "42"}), []), 403),
    (
        "token namespace with subscription token",
        "private:{}",
        lambda ch: (hs256({"sub": "42"}), [hs256({"sub": "42", "channel": ch})]),
        200,
    ),
    (
        "channels claim of the connection token",
        "private:{}",
        lambda ch: (hs256({"sub": "42", "channels": [ch]}), []),
        200,
    ),
    (
        "user-limited channel, a listed user",
        "dm{}#42,43",
        lambda ch: (hs256({"sub": "43"}), []),
        200,
    ),
    ("user-limited channel, another user", "dm{}#42,43", lambda ch: (hs256({"sub": "7"}), []), 403),
    ("unknown namespace", "nowhere:{}", lambda ch: (hs256({"sub": "42"}), []), 404),
    (
        "expired connection token",
        "chat:{}",
        lambda ch: (hs256({"sub": "42", "exp": int(time.time()) - 60}), []),
        401,
    ),
    (
        "forged connection token",
        "chat:{}",
        lambda ch: (hs256({"sub": "42"}, secret="forged-secret-of-sufficient-len!"), []),
        401,
    ),
]


@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize("rule", [rule[0] for rule in RULES])
def test_rule_on_transport(secure: Any, transport: str, rule: str) -> None:
    _, pattern, credentials, expected = next(r for r in RULES if r[0] == rule)
    channel = pattern.format(unique_channel())
    token, sub_tokens = credentials(channel)
    assert TRANSPORTS[transport](secure, channel, token, sub_tokens) == expected


def test_websocket_forged_token_closes_with_3500(secure: Any) -> None:
    client = RawClient(secure.ws_url)
    try:
        client.send({"id": 1, "connect": {"token": hs256({"sub": "1"}, secret="x" * 40)}})
        assert client.read_until_closed() == 3500
    finally:
        client.close()


def test_websocket_client_publish_follows_the_namespace(secure: Any) -> None:
    channel = f"chat:{unique_channel()}"
    client = RawClient(secure.ws_url)
    try:
        client.send(
            {"id": 1, "connect": {"token": hs256({"sub": "42"})}},
            {"id": 2, "publish": {"channel": channel, "data": {"early": True}}},
            {"id": 3, "subscribe": {"channel": channel}},
            {"id": 4, "publish": {"channel": channel, "data": {"n": 1}}},
            {"id": 5, "publish": {"channel": f"public:{unique_channel()}", "data": 1}},
        )
        replies = {
            m["id"]: m
            for m in (client.wait_for(lambda m, i=i: m.get("id") == i) for i in (2, 4, 5))
        }
        assert replies[2]["error"]["code"] == 103  # not subscribed yet
        assert "error" not in replies[4]
        assert replies[5]["error"]["code"] == 103  # nobody publishes in public
        push = client.wait_for(lambda m: "push" in m)
        assert push["push"]["pub"]["data"] == {"n": 1}
        assert push["push"]["pub"]["info"]["user"] == "42"
    finally:
        client.close()


def test_refresh_keeps_the_user_and_refuses_another(secure: Any) -> None:
    client = RawClient(secure.ws_url)
    try:
        client.send({"id": 1, "connect": {"token": hs256({"sub": "42"})}})
        connect = client.wait_for(lambda m: m.get("id") == 1)["connect"]
        assert connect["expires"] is True and 0 < connect["ttl"] <= 600
        client.send({"id": 2, "refresh": {"token": hs256({"sub": "42"})}})
        assert client.wait_for(lambda m: m.get("id") == 2)["refresh"]["expires"] is True
        client.send({"id": 3, "refresh": {"token": hs256({"sub": "99"})}})
        assert client.read_until_closed() == 3500
    finally:
        client.close()


def test_server_api_publish_reaches_an_authorised_sse_subscriber(secure: Any) -> None:
    channel = f"chat:{unique_channel()}"
    token = hs256({"sub": "42"})
    with httpx.stream(
        "GET",
        f"{secure.url}/sse",
        params={"channel": channel},
        headers={"Authorization": f"Bearer {token}"},
        timeout=TIMEOUT,
    ) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert any(line.startswith("event: subscribed") for line in lines)
        publish(secure, channel, {"hello": "auth"})
        data = next(line for line in lines if line.startswith('data: {"channel"'))
        assert json.loads(data[6:])["data"] == {"hello": "auth"}


# --------------------------------------------------------------------------- presence

PRESENCE_CONFIG = """
[namespaces.room]
presence = true
join_leave = true
presence_read = "any"

[namespaces.quiet]
"""


@pytest.fixture(scope="module")
def rooms(module_server_factory: Any) -> Any:
    return module_server_factory(PRESENCE_CONFIG)


def api_result(srv: Any, method: str, params: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = httpx.post(
        f"{srv.url}/api/{method}", json=params, timeout=TIMEOUT
    ).json()
    return body


def wait_presence(srv: Any, channel: str, clients: int) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while True:
        result = api_result(srv, "presence", {"channel": channel})["result"]["presence"]
        if len(result) == clients or time.monotonic() > deadline:
            return dict(result)
        time.sleep(0.05)


def joined(srv: Any, channel: str, token_user: str | None = None) -> tuple[RawClient, str]:
    client = RawClient(srv.ws_url)
    client.send({"id": 1, "connect": {}}, {"id": 2, "subscribe": {"channel": channel}})
    client_id = client.wait_for(lambda m: m.get("id") == 1)["connect"]["client"]
    client.wait_for(lambda m: m.get("id") == 2)
    return client, client_id


def test_presence_tracks_clients_through_normal_and_abnormal_leaving(rooms: Any) -> None:
    channel = f"room:{unique_channel()}"
    first, first_id = joined(rooms, channel)
    second, second_id = joined(rooms, channel)
    try:
        entries = wait_presence(rooms, channel, 2)
        assert set(entries) == {first_id, second_id}
        assert entries[first_id]["client"] == first_id
        stats = api_result(rooms, "presence_stats", {"channel": channel})["result"]
        assert stats == {"num_clients": 2, "num_users": 1}  # both anonymous: user ""
        # The first client hears the second's leave when it unsubscribes...
        second.send({"id": 3, "unsubscribe": {"channel": channel}})
        leave = first.wait_for(lambda m: "leave" in m.get("push", {}))
        assert leave["push"]["leave"]["info"]["client"] == second_id
        assert set(wait_presence(rooms, channel, 1)) == {first_id}
        # ...and an abnormal drop (socket closed without a close frame) clears it too.
        first.sock.close()
        assert wait_presence(rooms, channel, 0) == {}
    finally:
        first.close()
        second.close()


def test_join_is_pushed_to_other_subscribers(rooms: Any) -> None:
    channel = f"room:{unique_channel()}"
    first, _ = joined(rooms, channel)
    try:
        second, second_id = joined(rooms, channel)
        join = first.wait_for(lambda m: "join" in m.get("push", {}))
        assert join["push"]["channel"] == channel
        assert join["push"]["join"]["info"]["client"] == second_id
        second.close()
    finally:
        first.close()


def test_presence_over_websocket_and_not_available_where_disabled(rooms: Any) -> None:
    channel = f"room:{unique_channel()}"
    client, client_id = joined(rooms, channel)
    try:
        client.send(
            {"id": 3, "presence": {"channel": channel}},
            {"id": 4, "presence_stats": {"channel": channel}},
            {"id": 5, "presence": {"channel": f"quiet:{unique_channel()}"}},
        )
        presence = client.wait_for(lambda m: m.get("id") == 3)["presence"]["presence"]
        assert list(presence) == [client_id]
        stats = client.wait_for(lambda m: m.get("id") == 4)["presence_stats"]
        assert stats == {"num_clients": 1, "num_users": 1}
        assert client.wait_for(lambda m: m.get("id") == 5)["error"]["code"] == 108
    finally:
        client.close()
    off = api_result(rooms, "presence", {"channel": f"quiet:{unique_channel()}"})
    assert off["error"]["code"] == 108


# ------------------------------------------------------------- the server API acting on clients

EXPIRY_CONFIG = f"""
[auth]
hmac_secret = "{SECRET}"
expiry_grace = 0.0

[channels]
subscribe = "authenticated"

[namespaces.short]
subscribe = "authenticated"
history_size = 2

[namespaces.vip]
subscribe = "token"

[websocket]
ping_interval = 0.5

[sse]
heartbeat_interval = 0.3
"""


@pytest.fixture(scope="module")
def expiring(module_server_factory: Any) -> Any:
    return module_server_factory(EXPIRY_CONFIG)


def ws_connected(srv: Any, token: str, channel: str | None = None) -> RawClient:
    client = RawClient(srv.ws_url)
    commands: list[dict[str, Any]] = [{"id": 1, "connect": {"token": token}}]
    if channel:
        commands.append({"id": 2, "subscribe": {"channel": channel}})
    client.send(*commands)
    client.wait_for(lambda m: m.get("id") == len(commands) and "error" not in m)
    return client


def sse_lines(srv: Any, channel: str, token: str) -> Any:
    return httpx.stream(
        "GET",
        f"{srv.url}/sse",
        params={"channel": channel},
        headers={"Authorization": f"Bearer {token}"},
        timeout=TIMEOUT,
    )


def test_api_disconnect_closes_the_users_connections_on_every_transport(expiring: Any) -> None:
    user = unique_channel("u")
    channel = unique_channel()
    token = hs256({"sub": user})
    bystander = ws_connected(expiring, hs256({"sub": "someone-else"}), channel)
    client = ws_connected(expiring, token, channel)
    try:
        with sse_lines(expiring, channel, token) as resp:
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith("event: subscribed"))
            params = {"user": user, "disconnect": {"code": 4000, "reason": "bye"}}
            assert api_result(expiring, "disconnect", params) == {"result": {}}
            assert client.read_until_closed() == 4000
            rest = list(lines)  # the stream ends after a disconnect event
            assert "event: disconnect" in rest
            assert json.loads(rest[rest.index("event: disconnect") + 1][6:]) == {
                "code": 4000,
                "reason": "bye",
            }
        # Others are untouched and still receive.
        publish(expiring, channel, {"still": "here"})
        assert bystander.wait_for(lambda m: "push" in m)["push"]["pub"]["data"] == {"still": "here"}
    finally:
        client.close()
        bystander.close()


def test_api_unsubscribe_on_websocket_and_sse(expiring: Any) -> None:
    user = unique_channel("u")
    channel = unique_channel()
    token = hs256({"sub": user})
    client = ws_connected(expiring, token, channel)
    try:
        with sse_lines(expiring, channel, token) as resp:
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith("event: subscribed"))
            result = api_result(expiring, "unsubscribe", {"user": user, "channel": channel})
            assert result == {"result": {}}
            push = client.wait_for(lambda m: "unsubscribe" in m.get("push", {}))
            assert push["push"]["channel"] == channel
            assert push["push"]["unsubscribe"]["code"] == 2000
            rest = list(lines)
            assert "event: unsubscribed" in rest
        publish(expiring, channel, {"n": 1})
        client.send({"id": 9, "presence_stats": {"channel": channel}})
        client.wait_for(lambda m: m.get("id") == 9)
        assert not any("pub" in m.get("push", {}) for m in client.messages())
    finally:
        client.close()


def test_connection_is_closed_when_its_token_expires(expiring: Any) -> None:
    channel = unique_channel()
    token = hs256({"sub": "42", "exp": int(time.time()) + 2})
    client = ws_connected(expiring, token, channel)
    try:
        with sse_lines(expiring, channel, token) as resp:
            lines = list(resp.iter_lines())  # ends when the server closes the stream
        assert "event: disconnect" in lines
        assert json.loads(lines[lines.index("event: disconnect") + 1][6:])["code"] == 3005
        assert client.read_until_closed() == 3005
    finally:
        client.close()


def test_token_channels_are_subscribed_at_connect(expiring: Any) -> None:
    channel = f"short:{unique_channel()}"
    client = RawClient(expiring.ws_url)
    try:
        client.send({"id": 1, "connect": {"token": hs256({"sub": "42", "channels": [channel]})}})
        connect = client.wait_for(lambda m: m.get("id") == 1)["connect"]
        assert set(connect["subs"]) == {channel}
        publish(expiring, channel, {"server": "side"})
        push = client.wait_for(lambda m: "push" in m)
        assert push["push"]["channel"] == channel
        assert push["push"]["pub"]["data"] == {"server": "side"}
    finally:
        client.close()


def test_history_size_follows_the_namespace(expiring: Any) -> None:
    short, default = f"short:{unique_channel()}", unique_channel()
    for i in range(5):
        publish(expiring, short, i)
        publish(expiring, default, i)
    kept = [
        len(api_result(expiring, "history", {"channel": c, "limit": -1})["result"]["publications"])
        for c in (short, default)
    ]
    assert kept == [2, 5]


def test_subscription_ends_with_2501_when_its_token_expires_unrefreshed(expiring: Any) -> None:
    channel = f"vip:{unique_channel()}"
    soon = int(time.time()) + 2
    client = RawClient(expiring.ws_url)
    try:
        client.send(
            {"id": 1, "connect": {"token": hs256({"sub": "42"})}},
            {
                "id": 2,
                "subscribe": {
                    "channel": channel,
                    "token": hs256({"sub": "42", "channel": channel, "exp": soon}),
                },
            },
        )
        sub = client.wait_for(lambda m: m.get("id") == 2)["subscribe"]
        assert sub["expires"] is True and 0 < sub["ttl"] <= 2
        push = client.wait_for(lambda m: "unsubscribe" in m.get("push", {}))
        assert push["push"] == {
            "channel": channel,
            "unsubscribe": {"code": 2501, "reason": "subscription expired"},
        }
    finally:
        client.close()


def test_sub_refresh_extends_a_subscription(expiring: Any) -> None:
    channel = f"vip:{unique_channel()}"
    client = RawClient(expiring.ws_url)
    try:
        short = hs256({"sub": "42", "channel": channel, "exp": int(time.time()) + 2})
        client.send(
            {"id": 1, "connect": {"token": hs256({"sub": "42"})}},
            {"id": 2, "subscribe": {"channel": channel, "token": short}},
        )
        client.wait_for(lambda m: m.get("id") == 2)
        longer = hs256({"sub": "42", "channel": channel, "exp": int(time.time()) + 600})
        client.send({"id": 3, "sub_refresh": {"channel": channel, "token": longer}})
        assert client.wait_for(lambda m: m.get("id") == 3)["sub_refresh"]["ttl"] > 500
        time.sleep(3)  # past the first token's expiry: the subscription must still be live
        publish(expiring, channel, {"still": "subscribed"})
        push = client.wait_for(lambda m: "push" in m)
        assert push["push"]["pub"]["data"] == {"still": "subscribed"}
    finally:
        client.close()


def test_token_channels_are_checked_before_connecting(secure: Any) -> None:
    foreign = f"dm{unique_channel()}#1,2"
    fine = f"private:{unique_channel()}"
    client = RawClient(secure.ws_url)
    try:
        token = hs256({"sub": "42", "channels": [fine, foreign]})
        client.send({"id": 1, "connect": {"token": token}})
        reply = client.wait_for(lambda m: m.get("id") == 1)
        assert reply["error"]["code"] == 103
        # Not connected, and nothing was subscribed: the next command is refused.
        client.send({"id": 2, "subscribe": {"channel": fine}})
        assert client.read_until_closed() == 3501
    finally:
        client.close()
    channels = httpx.post(f"{secure.url}/api/channels", json={}, timeout=TIMEOUT).json()
    assert fine not in channels["result"]["channels"]


def test_server_api_refuses_unknown_namespaces(secure: Any) -> None:
    for method, params in [
        ("publish", {"channel": "nowhere:x", "data": 1}),
        ("history", {"channel": "nowhere:x", "limit": -1}),
        ("presence", {"channel": "nowhere:x"}),
    ]:
        body = httpx.post(f"{secure.url}/api/{method}", json=params, timeout=TIMEOUT).json()
        assert body["error"]["code"] == 102, (method, body)
    body = httpx.post(
        f"{secure.url}/api/broadcast",
        json={"channels": ["nowhere:x", "public:ok"], "data": 1},
        timeout=TIMEOUT,
    ).json()
    responses = body["result"]["responses"]
    assert responses[0]["error"]["code"] == 102 and "result" in responses[1]
