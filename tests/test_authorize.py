"""Access.authorize_subscribe, the one door every transport subscribes through (unit).

Sans-I/O: an :class:`~tidings.auth.Access` built from a config, no server. The
transports' wire behaviour (status and close codes per transport) is tested
over real sockets in ``test_tokens_wire.py``, ``test_sse.py``, ``test_poll.py``
and ``test_websocket_protocol.py``; here, the rule itself: what is refused,
with which code, in which order, and what a grant carries.
"""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from tidings.auth import Access, Credentials, InvalidToken
from tidings.config import AuthConfig, Config, LimitsConfig, NamespaceConfig
from tidings.errors import ErrorCode, ProtocolError

pytestmark = pytest.mark.unit

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def make_access(max_channels: int = 4) -> Access:
    return Access(
        Config(
            auth=AuthConfig(hmac_secret=SECRET),
            limits=LimitsConfig(max_channels_per_connection=max_channels, max_channel_length=16),
            namespaces={
                "public": NamespaceConfig(subscribe="anonymous"),
                "private": NamespaceConfig(subscribe="token"),
            },
        )
    )


def token(claims: dict[str, Any]) -> str:
    return jwt.encode({"exp": int(time.time()) + 600, **claims}, SECRET, algorithm="HS256")


ALICE = Credentials("alice")
ANONYMOUS = Credentials("")


def refusal(access: Access, *args: Any, **kwargs: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        access.authorize_subscribe(*args, **kwargs)
    return info.value


def test_allowed_channels_return_no_grants_without_tokens() -> None:
    access = make_access()
    assert access.authorize_subscribe(ALICE, ["public:a", "news", "dialog#alice,bob"]) == {}


@pytest.mark.parametrize("name", ["", "a b", "tab\there", "x" * 17, "new\nline", "nul\x00"])
def test_a_bad_name_is_107_wherever_it_stands(name: str) -> None:
    access = make_access()
    error = refusal(access, ALICE, ["public:a", name])
    assert error.code == ErrorCode.BAD_REQUEST
    # The same rule answers every other permission question: it lives in one place.
    with pytest.raises(ProtocolError) as info:
        access.policy(name)
    assert info.value.code == ErrorCode.BAD_REQUEST


def test_the_channel_count_includes_what_the_connection_holds() -> None:
    access = make_access(max_channels=4)
    access.authorize_subscribe(ALICE, ["public:a", "public:b"], held=2)
    error = refusal(access, ALICE, ["public:a", "public:b"], held=3)
    assert error.code == ErrorCode.LIMIT_EXCEEDED
    assert "more than 4 channels" in error.message


def test_the_count_is_refused_before_any_token_is_verified() -> None:
    """A signature check is the costly part: too many channels never reaches it."""
    access = make_access(max_channels=1)
    error = refusal(access, ALICE, ["private:a", "private:b"], ["not-even-a-jwt"])
    assert error.code == ErrorCode.LIMIT_EXCEEDED and not isinstance(error, InvalidToken)


def test_a_name_is_refused_before_the_count() -> None:
    """Today's order on every transport: 107 for a bad name even at the limit."""
    access = make_access(max_channels=1)
    assert refusal(access, ALICE, [""], held=1).code == ErrorCode.BAD_REQUEST


def test_a_subscription_token_grants_its_channel_with_its_info_and_expiry() -> None:
    access = make_access()
    expires = int(time.time()) + 600
    sub = token({"sub": "alice", "channel": "private:x", "info": {"role": "x"}, "exp": expires})
    grants = access.authorize_subscribe(ALICE, ["private:x", "public:y"], [sub])
    assert set(grants) == {"private:x"}
    assert grants["private:x"].info == b'{"role":"x"}'
    assert grants["private:x"].expires == expires


def test_without_its_token_a_token_namespace_is_403() -> None:
    error = refusal(make_access(), ALICE, ["private:x"])
    assert error.code == ErrorCode.PERMISSION_DENIED
    assert "needs a subscription token" in error.message


def test_a_token_for_a_channel_not_requested_is_invalid_not_forbidden() -> None:
    sub = token({"sub": "alice", "channel": "private:other"})
    error = refusal(make_access(), ALICE, ["private:x"], [sub])
    assert isinstance(error, InvalidToken)


def test_a_token_of_another_user_is_invalid() -> None:
    sub = token({"sub": "bob", "channel": "private:x"})
    assert isinstance(refusal(make_access(), ALICE, ["private:x"], [sub]), InvalidToken)


def test_an_unknown_namespace_is_102() -> None:
    assert refusal(make_access(), ALICE, ["nowhere:x"]).code == ErrorCode.UNKNOWN_CHANNEL


def test_a_user_limited_channel_admits_its_users_only() -> None:
    access = make_access()
    access.authorize_subscribe(ALICE, ["dialog#alice,bob"])
    assert refusal(access, Credentials("carol"), ["dialog#alice,bob"]).code == 103
    assert refusal(access, ANONYMOUS, ["dialog#alice,bob"]).code == 103


def test_the_connection_tokens_channels_claim_grants_any_namespace() -> None:
    user = Credentials("alice", channels=("private:granted",))
    make_access().authorize_subscribe(user, user.channels)
    assert refusal(make_access(), user, ["private:other"]).code == ErrorCode.PERMISSION_DENIED


def test_every_refusal_names_its_rule_in_its_message() -> None:
    """A client is told which rule refused it (a plain 103 helps nobody debug)."""
    access = make_access(max_channels=1)
    messages = [
        refusal(access, ALICE, [" "]).message,
        refusal(access, ALICE, ["public:a", "public:b"]).message,
        refusal(access, ALICE, ["nowhere:x"]).message,
        refusal(access, ANONYMOUS, ["news"]).message,
    ]
    assert "spaces or control characters" in messages[0]
    assert "channels on one connection" in messages[1]
    assert "unknown namespace" in messages[2]
    assert "needs a connection token" in messages[3]
