"""The gate: where the access rules and the application's hooks decide together.

Every transport lets a client in, subscribes it and lets it publish through
the one :class:`Gate` the server gives it, so that a token, a namespace rule
and a hook are weighed in the same order everywhere:

- **connect**: the connection token is verified first (an invalid one is
  refused before any hook runs); then the ``connect`` hook, if any, may name
  the user (a reply), leave the token's identity (None), or refuse;
- **subscribe**: names, the channel count and subscription tokens are checked
  first (:meth:`Access.precheck_subscribe`); a channel granted by a token or
  by the connection's ``channels``, and a user-limited channel, are decided by
  the rules alone; for any other the ``subscribe`` hook may allow it (a
  reply), leave it to the namespace's rules (None), or refuse;
- **publish**: the channel must be valid and of a known namespace; then the
  ``publish`` hook may allow it with the data it returns, leave it to the
  namespace's ``publish`` rule, or refuse.

With no hook registered each door is the access rules' answer and one
attribute read more.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

from .auth import Access, Credentials, Grant
from .errors import ErrorCode, ProtocolError
from .hooks import (
    KEEP,
    ConnectCall,
    Hooks,
    PublishCall,
    SubscribeCall,
    encode_json,
)

__all__ = ["Admitted", "Gate", "Publishing"]

log = logging.getLogger(__name__)


class Admitted(NamedTuple):
    """A client let in: who it is, and what the hook returns to it (raw JSON)."""

    credentials: Credentials
    data: bytes | None = None


class Publishing(NamedTuple):
    """A publication let through: its data (possibly replaced by the hook)."""

    data: bytes
    skip_history: bool = False


class Gate:
    """The connect, subscribe and publish doors of one server. See the module docstring."""

    __slots__ = ("access", "hooks")

    def __init__(self, access: Access, hooks: Hooks) -> None:
        self.access = access
        self.hooks = hooks

    async def connect(self, token: str | None, make_call: Callable[[str], ConnectCall]) -> Admitted:
        """The client behind ``token`` (anonymous without one), as the hook may decide.

        ``make_call(user)`` builds the hook's call (headers, cookies...) only
        when a ``connect`` hook is registered; ``user`` is the token's. With
        ``hooks.connect_skips_tokens`` (the proxy), a token alone admits.
        """
        credentials = self.access.authenticate(token)
        hook = self.hooks.connect
        if hook is None or (token and self.hooks.connect_skips_tokens):
            return Admitted(credentials)
        reply = await self.hooks.decide("connect", hook, make_call(credentials.user))
        if reply is None:
            return Admitted(credentials)
        try:
            info, data = encode_json(reply.info), encode_json(reply.data)
        except TypeError as exc:
            raise _bug("connect", exc) from None
        return Admitted(
            Credentials(
                reply.user, info, int(reply.expire_at), tuple(reply.channels), by_hook=True
            ),
            data,
        )

    async def subscribe(
        self,
        credentials: Credentials,
        channels: Sequence[str],
        tokens: Sequence[str] = (),
        *,
        held: int = 0,
        make_call: Callable[[str], SubscribeCall] | None = None,
    ) -> dict[str, Grant]:
        """May ``credentials`` subscribe to ``channels``? Raises the first refusal.

        Returns the grants (a token's or the hook's info and expiry) by
        channel. ``make_call(channel)`` builds the ``subscribe`` hook's call;
        without it (or without a hook) this is :meth:`Access.authorize_subscribe`.
        """
        access = self.access
        hook = self.hooks.subscribe
        if hook is None or make_call is None:
            return access.authorize_subscribe(credentials, channels, tokens, held=held)
        grants = access.precheck_subscribe(credentials, channels, tokens, held=held)
        for channel in channels:
            grant = grants.get(channel)
            if not access.granted_without_rules(credentials, channel, grant):
                access.policy(channel)  # an unknown namespace stays 102
                reply = await self.hooks.decide("subscribe", hook, make_call(channel))
                if reply is not None:
                    try:
                        info = encode_json(reply.info)
                    except TypeError as exc:
                        raise _bug("subscribe", exc) from None
                    grants[channel] = Grant(
                        info,
                        int(reply.expire_at),
                        by_hook=True,
                        presence=reply.presence,
                        join_leave=reply.join_leave,
                    )
                    continue
            access.check_subscribe(credentials, channel, grant)
        return grants

    async def publish(
        self,
        credentials: Credentials,
        channel: str,
        data: bytes,
        *,
        subscribed: bool,
        make_call: Callable[[], PublishCall],
    ) -> Publishing:
        """May the client publish ``data`` to ``channel``, and what is published."""
        access = self.access
        access.policy(channel)  # a bad name (107) or an unknown namespace (102) first
        hook = self.hooks.publish
        if hook is not None:
            reply = await self.hooks.decide("publish", hook, make_call())
            if reply is not None:
                if reply.data is KEEP:
                    return Publishing(data, reply.skip_history)
                try:
                    replaced = encode_json(reply.data)
                except TypeError as exc:
                    raise _bug("publish", exc) from None
                if replaced is None:
                    raise _bug("publish", TypeError("data=None: return KEEP to keep the data"))
                return Publishing(replaced, reply.skip_history)
        access.check_publish(credentials, channel, subscribed)
        return Publishing(data)


def _bug(name: str, exc: Exception) -> Exception:
    """A hook's reply that cannot be used: the application's bug, an internal error."""
    log.error("%s hook returned an unusable reply: %s", name, exc)
    return ProtocolError(ErrorCode.INTERNAL)
