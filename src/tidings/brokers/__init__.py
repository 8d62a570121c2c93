"""Brokers: where publications get their offsets, where history lives, and how
they reach every node."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Broker
from .memory import MemoryBroker

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["Broker", "MemoryBroker", "make_broker"]


def make_broker(config: Config) -> Broker:
    """The broker the configuration names; remote ones are imported on demand."""
    history = config.history
    limits = config.limits
    kind = config.broker.type
    if kind == "redis":
        from .redis import RedisBroker  # type: ignore[import-not-found, unused-ignore]

        broker: Broker = RedisBroker(
            config.broker.redis_url,
            prefix=config.broker.prefix,
            meta_ttl=history.meta_ttl,
            presence_ttl=config.broker.presence_ttl,
            hold_limit=config.broker.redis_hold_limit,
            hold_bytes=config.broker.redis_hold_bytes,
            catch_up_batch=config.broker.redis_catch_up_batch,
            idempotency_window=limits.idempotency_window,
        )
        return broker
    if kind == "nats":
        from .nats import NatsBroker  # type: ignore[import-not-found, unused-ignore]

        broker = NatsBroker(
            config.broker.nats_url,
            prefix=config.broker.prefix,
            pending_limit=config.broker.nats_pending_limit,
            idempotency_window=limits.idempotency_window,
            max_idempotency_keys=limits.max_idempotency_keys,
        )
        return broker
    return MemoryBroker(
        meta_ttl=history.meta_ttl,
        max_channels=limits.max_channels,
        max_history_memory=limits.max_history_memory,
        idempotency_window=limits.idempotency_window,
        max_idempotency_keys=limits.max_idempotency_keys,
    )
