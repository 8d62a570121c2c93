"""Unit tests of the sans-I/O Centrifugo protocol (src/tidings/centrifuge/).

A real Hub over the in-memory broker; the "transport" is a list of frames
(``centrifuge_support.py``).
"""

from __future__ import annotations

import json

import pytest

from centrifuge_support import FakeSession, connected, make_hub, run
from tidings.centrifuge import PING, BadRequest, decode_commands, publication_json, push_json
from tidings.hub import Publication

pytestmark = pytest.mark.unit


def test_connect_reply_has_client_ping_and_pong() -> None:
    async def main() -> None:
        s = await connected(make_hub())
        (reply,) = s.last()
        assert reply["id"] == 1
        res = reply["connect"]
        assert len(res["client"]) == 36 and res["client"] == s.client_id
        assert res["ping"] == 25 and res["pong"] is True
        assert "version" in res

    run(main())


def test_decode_commands_splits_lines_and_ignores_unknown_fields() -> None:
    cmds = decode_commands(
        b'{"id":1,"connect":{"name":"js","unknown":1}}\n'
        b'{"id":2,"subscribe":{"channel":"a","flag":1,"delta":"fossil"}}\n'
    )
    assert [c.id for c in cmds] == [1, 2]
    assert cmds[0].connect is not None and cmds[0].connect.name == "js"
    assert cmds[1].subscribe is not None and cmds[1].subscribe.flag == 1
    for bad in (b"", b"  \n", b"{not json", b"[1,2]", b'{"id":"x"}', b'{"id":-1}'):
        with pytest.raises(BadRequest):
            decode_commands(bad)


def test_connect_and_subscribe_in_one_frame_batch_replies() -> None:
    async def main() -> None:
        hub = make_hub()
        await hub.publish("news", b'{"n":1}')
        s = FakeSession(hub)
        await s.send({"id": 1, "connect": {}}, {"id": 2, "subscribe": {"channel": "news"}})
        assert len(s.frames) == 1
        connect, sub = s.frames[0]
        assert connect["id"] == 1 and sub["id"] == 2
        res = sub["subscribe"]
        assert res["recoverable"] is True and res["positioned"] is True
        assert res["offset"] == 1 and res["epoch"]
        assert "recovered" not in res and "was_recovering" not in res
        await hub.publish("news", b'{"n":2}')
        push = s.last()[0]["push"]
        assert push == {
            "channel": "news",
            "pub": {"data": {"n": 2}, "offset": 2, "time": push["pub"]["time"]},
        }

    run(main())


def test_command_before_connect_closes_3501() -> None:
    async def main() -> None:
        s = FakeSession(make_hub())
        d = await s.send({"id": 1, "subscribe": {"channel": "a"}})
        assert d is not None and d.code == 3501
        assert s.frames == []
        s2 = FakeSession(make_hub())
        d = await s2.handle(PING)  # a pong before connect is no better
        assert d is not None and d.code == 3501

    run(main())


def test_bad_frames_close_3501() -> None:
    async def main() -> None:
        hub = make_hub()
        for payload in (
            b"nope",
            b'{"id":5}',
            b'{"id":0,"subscribe":{"channel":"a"}}',
            b'{"id":2,"frobnicate":{}}',
            b'{"id":1,"connect":{}}',
        ):
            s = await connected(hub)
            frames = len(s.frames)
            d = await s.handle(payload)
            assert d is not None and d.code == 3501, payload
            assert len(s.frames) == frames

    run(main())


def test_replies_before_a_bad_command_are_written() -> None:
    async def main() -> None:
        s = await connected(make_hub())
        d = await s.handle(b'{"id":2,"subscribe":{"channel":"a"}}\n{"id":3,"nope":{}}')
        assert d is not None and d.code == 3501
        assert s.last()[0]["id"] == 2

    run(main())


def test_pong_and_send_need_no_reply() -> None:
    async def main() -> None:
        s = await connected(make_hub())
        frames = len(s.frames)
        assert await s.handle(b"{}") is None
        assert await s.send({"send": {"data": {"x": 1}}}) is None
        assert s.pongs == 1 and len(s.frames) == frames

    run(main())


def test_already_subscribed_and_channel_limit() -> None:
    async def main() -> None:
        s = await connected(make_hub())
        await s.send(
            {"id": 2, "subscribe": {"channel": "a"}},
            {"id": 3, "subscribe": {"channel": "a"}},
            {"id": 4, "subscribe": {"channel": "b"}},
            {"id": 5, "subscribe": {"channel": "c"}},
            {"id": 6, "subscribe": {"channel": "d"}},
            {"id": 7, "subscribe": {"channel": ""}},
        )
        replies = {r["id"]: r for r in s.last()}
        assert "subscribe" in replies[2]
        assert replies[3]["error"]["code"] == 105
        assert "subscribe" in replies[4] and "subscribe" in replies[5]
        assert replies[6]["error"]["code"] == 106
        assert replies[7]["error"]["code"] == 107
        # unsubscribing frees a slot
        await s.send(
            {"id": 8, "unsubscribe": {"channel": "a"}}, {"id": 9, "subscribe": {"channel": "d"}}
        )
        r8, r9 = s.last()
        assert r8 == {"id": 8, "unsubscribe": {}} and "subscribe" in r9

    run(main())


def test_recovery_returns_missed_publications() -> None:
    async def main() -> None:
        hub = make_hub()
        pos = await hub.publish("c", b"1")
        await hub.publish("c", b"2")
        await hub.publish("c", b"3")
        s = await connected(hub)
        await s.send(
            {
                "id": 2,
                "subscribe": {
                    "channel": "c",
                    "recover": True,
                    "epoch": pos.epoch,
                    "offset": pos.offset,
                },
            }
        )
        res = s.last()[0]["subscribe"]
        assert res["recovered"] is True and res["was_recovering"] is True
        assert [p["data"] for p in res["publications"]] == [2, 3]
        assert [p["offset"] for p in res["publications"]] == [2, 3]
        assert res["offset"] == 3 and res["epoch"] == pos.epoch

        # a wrong epoch: not recovered, no publications, the current position
        s2 = await connected(hub)
        await s2.send(
            {"id": 2, "subscribe": {"channel": "c", "recover": True, "epoch": "other", "offset": 1}}
        )
        res = s2.last()[0]["subscribe"]
        assert "recovered" not in res and res["was_recovering"] is True
        assert "publications" not in res and res["offset"] == 3

        # ... or error 112 when the SDK asked for it (flag rejectUnrecovered)
        s3 = await connected(hub)
        await s3.send(
            {
                "id": 2,
                "subscribe": {
                    "channel": "c",
                    "recover": True,
                    "flag": 3,
                    "epoch": "other",
                    "offset": 1,
                },
            }
        )
        assert s3.last()[0]["error"]["code"] == 112
        assert hub.num_subscribers("c") == 2

    run(main())


def test_publish_history_and_not_available() -> None:
    async def main() -> None:
        hub = make_hub()
        s = await connected(hub)
        await s.send(
            {"id": 2, "subscribe": {"channel": "h"}},
            {"id": 3, "publish": {"channel": "h", "data": {"text": "hi"}}},
        )
        # the subscribe reply goes out before the push of our own publication,
        # which comes before the publish reply
        assert s.frames[-3] == [{"id": 2, "subscribe": s.frames[-3][0]["subscribe"]}]
        push = s.frames[-2][0]["push"]["pub"]
        assert push["data"] == {"text": "hi"}
        assert push["info"]["client"] == s.client_id
        assert s.frames[-1] == [{"id": 3, "publish": {}}]
        await s.send(
            {"id": 4, "history": {"channel": "h", "limit": -1}},
            {"id": 5, "history": {"channel": "h"}},
            {"id": 6, "presence": {"channel": "h"}},
            {"id": 7, "presence_stats": {"channel": "h"}},
            {"id": 8, "rpc": {"method": "m", "data": {}}},
            {"id": 9, "refresh": {"token": ""}},
            {"id": 10, "sub_refresh": {"channel": "h"}},
            {"id": 11, "sub_refresh": {"channel": "zzz"}},
            {"id": 12, "publish": {"channel": "h"}},
            {"id": 13, "history": {"channel": "h", "since": {"epoch": "zz", "offset": 0}}},
        )
        r = {x["id"]: x for x in s.last()}
        hist = r[4]["history"]
        assert [p["data"] for p in hist["publications"]] == [{"text": "hi"}]
        assert hist["offset"] == 1 and hist["epoch"]
        # Only the position, and the empty list Centrifugo always sends.
        assert r[5]["history"] == {"publications": [], "epoch": hist["epoch"], "offset": 1}
        for i in (6, 7, 8):
            assert r[i]["error"]["code"] == 108
        assert r[9]["refresh"]["client"] == s.client_id
        assert r[10] == {"id": 10, "sub_refresh": {}}
        assert r[11]["error"]["code"] == 103
        assert r[12]["error"]["code"] == 107
        assert r[13]["error"]["code"] == 112

    run(main())


def test_release_unsubscribes_everything() -> None:
    async def main() -> None:
        hub = make_hub()
        s = await connected(hub)
        await s.send(
            {"id": 2, "subscribe": {"channel": "x"}}, {"id": 3, "subscribe": {"channel": "y"}}
        )
        assert hub.num_subscribers("x") == 1
        s.release()
        s.release()
        assert hub.num_subscribers("x") == 0 and hub.num_subscribers("y") == 0

    run(main())


def test_push_bytes_are_built_once_per_publication() -> None:
    async def main() -> None:
        hub = make_hub()
        sessions = [await connected(hub) for _ in range(3)]
        for s in sessions:
            await s.send({"id": 2, "subscribe": {"channel": "fan"}})
        await hub.publish("fan", b'{"big":true}')
        first = sessions[0].pushes[0]
        assert all(s.pushes[0] is first for s in sessions)

    run(main())


def test_publication_json_shape() -> None:
    pub = Publication("c", 7, "E", b'{"a":[1,2]}', tags={"k": "v"}, time_ms=5)
    assert json.loads(publication_json(pub)) == {
        "data": {"a": [1, 2]},
        "offset": 7,
        "tags": {"k": "v"},
        "time": 5,
    }
    assert json.loads(push_json(pub)) == {
        "push": {"channel": "c", "pub": json.loads(publication_json(pub))}
    }


def test_server_unsubscribe_pushes_and_leaves() -> None:
    async def main() -> None:
        hub = make_hub()
        s = await connected(hub)
        await s.send({"id": 2, "subscribe": {"channel": "u"}})
        assert s.server_unsubscribe("u") is True
        assert s.last() == [
            {
                "push": {
                    "channel": "u",
                    "unsubscribe": {"code": 2000, "reason": "server unsubscribe"},
                }
            }
        ]
        assert hub.num_subscribers("u") == 0
        assert s.server_unsubscribe("u") is False
        await s.send({"id": 3, "subscribe": {"channel": "u"}})  # may subscribe again
        assert "subscribe" in s.last()[0]

    run(main())
