"""Several real tidings processes sharing channels through a real Redis or NATS.

Fan-out between processes, history and recovery across processes, ``--workers``
on one port, and broker faults: Redis restarted (data lost: clients are told
they were not recovered), Redis dropping only the pub/sub links (data kept:
nothing is lost), NATS restarted.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
import redis

from conftest import ServerProcess
from helpers import SSEClient, api, pub_json, publish, unique_channel, wait_subscribers

if TYPE_CHECKING:
    from brokers_support import NatsServer, RedisServer


WAIT = 15.0
Factory = Callable[..., ServerProcess]


def redis_config(server: RedisServer, prefix: str | None = None, extra: str = "") -> str:
    prefix = prefix or f"t{uuid.uuid4().hex[:8]}"
    return f'{extra}\n[broker]\ntype = "redis"\nredis_url = "{server.url}"\nprefix = "{prefix}"\n'


def nats_config(server: NatsServer) -> str:
    return (
        f'[broker]\ntype = "nats"\nnats_url = "{server.url}"\nprefix = "t{uuid.uuid4().hex[:8]}"\n'
    )


def health(srv: ServerProcess, path: str = "/health") -> tuple[int, dict[str, Any]]:
    resp = httpx.get(srv.url + path, timeout=5)
    body: dict[str, Any] = resp.json()
    return resp.status_code, body


def wait_health(srv: ServerProcess, status: int) -> dict[str, Any]:
    """Wait until readiness (``/ready``) answers ``status``; its body then.

    Liveness (``/health``) stays 200 while the broker is down: a node is not
    restarted for Redis' outage, it is taken out of the load balancer.
    """
    deadline = time.monotonic() + WAIT
    last: Any = None
    while time.monotonic() < deadline:
        code, last = health(srv, "/ready")
        if code == status:
            return last
        time.sleep(0.05)
    raise AssertionError(f"/ready never answered {status}; last: {last}")


def publish_when_possible(srv: ServerProcess, channel: str, data: Any) -> dict[str, Any]:
    """Publish, retrying while the broker is unavailable (error code 100)."""
    deadline = time.monotonic() + WAIT
    while True:
        body = api(srv, "publish", {"channel": channel, "data": data}).json()
        if "result" in body:
            result: dict[str, Any] = body["result"]
            return result
        assert body["error"]["code"] == 100, body
        assert time.monotonic() < deadline, f"publish kept failing: {body}"
        time.sleep(0.1)


def assert_clean(*servers: ServerProcess) -> None:
    for srv in servers:
        logs = srv.logs()
        assert "Traceback" not in logs, f"unhandled exception in {srv}:\n{logs[-6000:]}"


# --------------------------------------------------------------------------- Redis


def test_redis_fan_out_between_processes(server_factory: Factory, redis_server: RedisServer):
    config = redis_config(redis_server)
    a, b = server_factory(config), server_factory(config)
    assert health(a)[1]["broker"] == {"type": "RedisBroker", "healthy": True}
    ch = unique_channel()
    with SSEClient(b, [ch]) as on_b, SSEClient(a, [ch]) as on_a:
        on_b.subscribed()
        on_a.subscribed()
        results = [publish(a if n % 2 else b, ch, {"n": n}) for n in range(6)]
        for sse in (on_a, on_b):
            got = [pub_json(ev) for ev in sse.publications(6)]
            assert [p["data"] for p in got] == [{"n": n} for n in range(6)]
            assert (
                [p["offset"] for p in got] == [r["offset"] for r in results] == [1, 2, 3, 4, 5, 6]
            )
            assert {p["epoch"] for p in got} == {results[0]["epoch"]}
    assert_clean(a, b)


def test_redis_history_and_recovery_across_processes(
    server_factory: Factory, redis_server: RedisServer
):
    config = redis_config(redis_server)
    a, b = server_factory(config), server_factory(config)
    ch = unique_channel()
    with SSEClient(a, [ch]) as sse:
        sse.subscribed()
        publish(b, ch, {"n": 1})
        (ev,) = sse.publications(1)
        cursor = ev.id
    for n in (2, 3):
        publish(a, ch, {"n": n})
    # History is the same from every process.
    hist_a = api(a, "history", {"channel": ch, "limit": -1}).json()["result"]
    hist_b = api(b, "history", {"channel": ch, "limit": -1}).json()["result"]
    assert hist_a == hist_b and [p["offset"] for p in hist_a["publications"]] == [1, 2, 3]
    # The cursor taken on A resumes on B with exactly what was missed.
    with SSEClient(b, [ch], last_event_id=cursor) as sse:
        assert sse.subscribed().json == {"channels": [ch], "recovered": True, "ping": 15.0}
        got = [pub_json(e) for e in sse.publications(2)]
        assert [(p["offset"], p["data"]) for p in got] == [(2, {"n": 2}), (3, {"n": 3})]
        publish(a, ch, {"n": 4})
        assert pub_json(sse.publications(1)[0])["offset"] == 4
    assert_clean(a, b)


def test_workers_share_one_port_through_redis(server_factory: Factory, redis_server: RedisServer):
    srv = server_factory(redis_config(redis_server), args=["--workers", "2"])
    # Both workers answer on the port (the kernel spreads new connections).
    # Both workers answer on the port (the kernel spreads new connections); the
    # second may still be starting when the first answers /health.
    uids: set[str] = set()
    deadline = time.monotonic() + WAIT
    while len(uids) < 2 and time.monotonic() < deadline:
        with httpx.Client() as client:
            info = client.post(srv.url + "/api/info", json={}).json()
        uids.add(info["result"]["nodes"][0]["uid"])
        time.sleep(0.02)
    assert len(uids) == 2, uids
    ch = unique_channel()
    clients = [SSEClient(srv, [ch]) for _ in range(20)]
    try:
        for sse in clients:
            sse.subscribed()
        res = publish(srv, ch, {"hello": "all"})
        for sse in clients:
            (ev,) = sse.publications(1)
            assert pub_json(ev)["data"] == {"hello": "all"}
            assert pub_json(ev)["offset"] == res["offset"]
    finally:
        for sse in clients:
            sse.close()
    assert_clean(srv)


def test_redis_restart_loses_history_and_clients_are_told(
    server_factory: Factory, redis_server: RedisServer
):
    """Redis without persistence restarts: nodes reconnect, the epoch changes, and a
    client resuming from before the restart gets ``unrecovered`` -- never a silent gap."""
    config = redis_config(redis_server)
    a, b = server_factory(config), server_factory(config)
    ch = unique_channel()
    with SSEClient(a, [ch], read_timeout=WAIT) as live:
        live.subscribed()
        before = publish(b, ch, {"n": 1})
        (ev,) = live.publications(1)
        old_cursor = ev.id

        redis_server.stop()
        assert wait_health(a, 503)["reasons"] == ["broker unreachable"]
        assert health(a) == (
            200,
            {"status": "ok", "broker": {"type": "RedisBroker", "healthy": False}},
        )
        wait_health(b, 503)
        err = api(b, "publish", {"channel": ch, "data": {"n": "lost"}}).json()
        assert err["error"]["code"] == 100, err  # refused, not accepted and lost

        redis_server.start()
        wait_health(a, 200)
        wait_health(b, 200)
        after = publish_when_possible(b, ch, {"n": 2})
        assert after["epoch"] != before["epoch"] and after["offset"] == 1
        # The live subscriber on A cannot know what the lost epoch held after its
        # position: its stream ends (no publication of the new epoch is passed
        # off as a continuation), so that its resume says what happened.
        assert [e for e in live.expect_eof() if e.data and not e.is_ping] == []

    for srv in (a, b):
        with SSEClient(srv, [ch], last_event_id=old_cursor) as sse:
            assert sse.subscribed().json == {"channels": [ch], "recovered": False, "ping": 15.0}
            ev = sse.next_data()
            assert ev.event == "unrecovered" and ev.json == {"channels": [ch]}, ev
            publish(b, ch, {"n": 3})
            assert pub_json(sse.publications(1)[0])["data"] == {"n": 3}
    for srv in (a, b):
        logs = srv.logs()
        assert "lost the redis pub/sub connection" in logs, logs[-3000:]
        assert "reconnected to redis" in logs, logs[-3000:]
    assert_clean(a, b)


def test_redis_pubsub_link_drop_loses_nothing(server_factory: Factory, redis_server: RedisServer):
    """Redis keeps its data but drops the nodes' pub/sub connections: what was published
    meanwhile reaches live subscribers from history, in order, exactly once."""
    config = redis_config(redis_server)
    a, b = server_factory(config), server_factory(config)
    ch = unique_channel()
    control = redis.Redis.from_url(redis_server.url)
    try:
        with SSEClient(a, [ch], read_timeout=WAIT) as live:
            live.subscribed()
            publish(b, ch, {"n": 1})
            live.publications(1)
            for n in range(2, 7):
                control.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
                publish(b, ch, {"n": n})
            got = [pub_json(ev) for ev in live.publications(5)]
            assert [p["offset"] for p in got] == [2, 3, 4, 5, 6]
            assert [p["data"] for p in got] == [{"n": n} for n in range(2, 7)]
            publish(b, ch, {"n": 7})
            assert pub_json(live.publications(1)[0])["offset"] == 7  # no duplicate before it
    finally:
        control.close()
    assert_clean(a, b)


# --------------------------------------------------------------------------- NATS


def test_nats_fan_out_between_processes(server_factory: Factory, nats_server: NatsServer):
    config = nats_config(nats_server)
    a, b = server_factory(config), server_factory(config)
    assert health(a)[1]["broker"] == {"type": "NatsBroker", "healthy": True}
    ch = unique_channel("ns:") + ".with*odd>chars"
    with SSEClient(b, [ch]) as on_b, SSEClient(a, [ch]) as on_a:
        on_b.subscribed()
        on_a.subscribed()
        wait_subscribers(b, ch)
        for n in range(4):
            publish(a if n % 2 else b, ch, {"n": n})
        for sse in (on_a, on_b):
            got = [pub_json(ev) for ev in sse.publications(4)]
            assert [p["data"] for p in got] == [{"n": n} for n in range(4)]
            assert all(p["channel"] == ch for p in got)
    # History is not available with NATS alone: refused with code 108.
    body = api(a, "history", {"channel": ch, "limit": 10}).json()
    assert body["error"]["code"] == 108, body
    assert_clean(a, b)


def test_nats_restart_reconnects(server_factory: Factory, nats_server: NatsServer):
    config = nats_config(nats_server)
    a, b = server_factory(config), server_factory(config)
    ch = unique_channel()
    with SSEClient(b, [ch], read_timeout=WAIT) as sse:
        sse.subscribed()
        publish(a, ch, {"n": 1})
        last = sse.publications(1)[0].id
        nats_server.stop()
        wait_health(a, 503)
        wait_health(b, 503)
        nats_server.start()
        wait_health(a, 200)
        wait_health(b, 200)
        # NATS keeps nothing: publications of the outage are gone, and B's
        # channel starts a new epoch. The live stream ends so that the client's
        # resume reports the loss instead of carrying on as if nothing happened.
        publish(a, ch, {"n": 2})
        assert [e for e in sse.expect_eof() if e.data and not e.is_ping] == []
    with SSEClient(b, [ch], last_event_id=last) as sse:
        assert sse.subscribed().json["recovered"] is False
        assert sse.next_data().event == "unrecovered"
        publish(a, ch, {"n": 3})
        assert pub_json(sse.publications(1)[0])["data"] == {"n": 3}
    assert_clean(a, b)


# --------------------------------------------------------------------------- presence

PRESENCE_NS = '[namespaces.room]\npresence = true\njoin_leave = true\npresence_read = "any"\n'


def presence_of(srv: ServerProcess, channel: str) -> dict[str, Any]:
    body = api(srv, "presence", {"channel": channel}).json()
    result: dict[str, Any] = body["result"]["presence"]
    return result


def wait_presence_count(srv: ServerProcess, channel: str, count: int) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while True:
        entries = presence_of(srv, channel)
        if len(entries) == count:
            return entries
        assert time.monotonic() < deadline, f"presence stayed {entries}, wanted {count}"
        time.sleep(0.1)


def test_presence_across_processes_and_a_crashed_node_expires(
    server_factory: Factory, redis_server: RedisServer
) -> None:
    from ws_support import RawClient

    config = redis_config(redis_server, extra=PRESENCE_NS) + "presence_ttl = 1.5\n"
    a, b = server_factory(config), server_factory(config)
    channel = f"room:{unique_channel()}"
    on_a, on_b = RawClient(a.ws_url), RawClient(b.ws_url)
    try:
        ids = []
        for client in (on_a, on_b):
            client.send({"id": 1, "connect": {}}, {"id": 2, "subscribe": {"channel": channel}})
            ids.append(client.wait_for(lambda m: m.get("id") == 1)["connect"]["client"])
            client.wait_for(lambda m: m.get("id") == 2)
        # Both processes see both clients, whichever holds them.
        assert set(wait_presence_count(a, channel, 2)) == set(ids)
        assert set(presence_of(b, channel)) == set(ids)
        stats = api(b, "presence_stats", {"channel": channel}).json()["result"]
        assert stats == {"num_clients": 2, "num_users": 1}
        # A normal leave on B is gone at once, everywhere.
        on_b.close()
        assert set(wait_presence_count(a, channel, 1)) == {ids[0]}
        # A crash of A (no goodbye at all): its client expires after presence_ttl.
        a.proc.kill()
        a.proc.wait(timeout=WAIT)
        assert wait_presence_count(b, channel, 0) == {}
    finally:
        on_a.close()
        on_b.close()
    assert_clean(b)
