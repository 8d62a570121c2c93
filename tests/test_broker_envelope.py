"""The publication envelope shared by the Redis and NATS brokers: unit tests, no sockets.

The malformed-envelope tests against the running brokers (a WARNING, the bad
message skipped, the next one delivered) are in test_broker_redis.py and
test_broker_nats.py.
"""

from __future__ import annotations

import msgspec
import pytest

from tidings.brokers import envelope
from tidings.hub import ClientInfo

pytestmark = pytest.mark.unit

INFO = ClientInfo(user="u", client="c", conn_info=msgspec.Raw(b'{"name":"\xc3\xa9"}'))


@pytest.mark.parametrize(
    ("info", "tags"),
    [(None, None), (INFO, None), (None, {"k": "v"}), (INFO, {"k": "v", "é": ""})],
    ids=["bare", "info", "tags", "both"],
)
def test_round_trip_keeps_everything_and_stamps_the_position(
    info: ClientInfo | None, tags: dict[str, str] | None
) -> None:
    wire = envelope.encode(b'{"n":[1,2]}', info, tags, 1_700_000_000_123)
    pub = envelope.decode("ns:room", 7, "ep", wire)
    assert (pub.channel, pub.offset, pub.epoch) == ("ns:room", 7, "ep")
    assert pub.data == b'{"n":[1,2]}' and pub.time == 1_700_000_000_123
    assert pub.info == info and pub.tags == tags


def test_wire_format_is_the_one_nodes_already_exchange() -> None:
    """Byte for byte what redis.py's and nats.py's copies wrote (at 8a4b620), so that
    nodes of both versions and history already in Redis keep being read."""
    assert envelope.encode(b'{"a":1}', None, None, 1_700_000_000_000) == bytes.fromhex(
        "94c4077b2261223a317dc0c0cf0000018bcfe56800"
    )
    assert envelope.encode(b"1", ClientInfo(user="u", client="c"), {"k": "v"}, 5) == bytes.fromhex(
        "94c40131c4197b2275736572223a2275222c22636c69656e74223a2263227d81a16ba17605"
    )


def _raw(data: object, info: object = None, tags: object = None, time: object = 1) -> bytes:
    return msgspec.msgpack.encode([data, info, tags, time])


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not msgpack \xc1", id="garbage"),
        pytest.param(msgspec.msgpack.encode({"data": b"1"}), id="a map, not the array"),
        pytest.param(msgspec.msgpack.encode([b"1", None, None]), id="a field short"),
        pytest.param(_raw("1"), id="data as text, not binary"),
        pytest.param(_raw(b'{"a":'), id="data not JSON"),
        pytest.param(_raw(b"1 2"), id="data with trailing bytes"),
        pytest.param(_raw(b'"\xff"'), id="data not UTF-8"),
        pytest.param(_raw(b'"\xed\xa0\x80"'), id="data with an encoded surrogate"),
        pytest.param(_raw(b"1", info=b"{"), id="info not JSON"),
        pytest.param(_raw(b"1", info=b'{"user":1}'), id="info of the wrong shape"),
        pytest.param(_raw(b"1", info=b'{"conn_info":"\xff"}'), id="info not UTF-8"),
        pytest.param(_raw(b"1", tags={"k": 1}), id="tags not strings"),
        pytest.param(_raw(b"1", time="now"), id="time not an integer"),
    ],
)
def test_malformed_envelopes_raise_one_clear_error(wire: bytes) -> None:
    with pytest.raises(envelope.MalformedEnvelope, match="malformed publication envelope"):
        envelope.decode("c", 1, "e", wire)


def test_the_error_is_a_value_error_so_brokers_catch_it_with_their_framing_errors() -> None:
    assert issubclass(envelope.MalformedEnvelope, ValueError)
