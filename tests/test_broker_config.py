"""The ``[broker]`` keys reach the broker they configure (unit: no broker is started)."""

from __future__ import annotations

import pytest

from tidings.brokers import make_broker
from tidings.brokers.redis import RedisBroker
from tidings.config import ConfigError, load_config

pytestmark = pytest.mark.unit


def test_redis_catch_up_bounds_come_from_the_configuration() -> None:
    config = load_config(
        env={
            "TIDINGS_BROKER__TYPE": "redis",
            "TIDINGS_BROKER__REDIS_HOLD_LIMIT": "7",
            "TIDINGS_BROKER__REDIS_HOLD_BYTES": "4096",
            "TIDINGS_BROKER__REDIS_CATCH_UP_BATCH": "3",
        }
    )
    broker = make_broker(config)
    assert isinstance(broker, RedisBroker)
    assert (broker._hold_limit, broker._hold_bytes, broker._catch_up_batch) == (7, 4096, 3)


@pytest.mark.parametrize("key", ["REDIS_HOLD_LIMIT", "REDIS_HOLD_BYTES", "REDIS_CATCH_UP_BATCH"])
def test_a_redis_catch_up_bound_below_one_is_refused_by_name(key: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(env={f"TIDINGS_BROKER__{key}": "0"})
    assert key.lower() in str(refused.value)
