"""NatsBroker against a real nats-server: fan-out only, node-local positions, honest refusals."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
from nats.aio.msg import Msg
from nats.errors import SlowConsumerError

from brokers_support import Node, Recorder, run_nodes, until
from tidings.brokers import envelope
from tidings.brokers.nats import NatsBroker, _Stream
from tidings.errors import ErrorCode, ProtocolError
from tidings.hub import DEFAULT_HISTORY, EMPTY, ClientInfo, Hub, Position, Publication, reaches

if TYPE_CHECKING:
    from brokers_support import NatsServer


WAIT = 10.0


def nats_node(url: str, **kw: Any) -> Node:
    kw.setdefault("reconnect_wait", 0.2)
    return Node(NatsBroker(url, prefix=kw.pop("prefix", "t.n"), **kw))


def run(server: NatsServer, body: Callable[..., Awaitable[None]], nodes: int = 1) -> None:
    run_nodes(lambda: nats_node(server.url), body, nodes)


def test_fan_out_between_nodes_with_odd_channel_names(nats_server: NatsServer) -> None:
    names = ["room", "ns:a.b", "x*y>z", "sp ace", "é/ü", ".", ">"]

    async def body(a: Node, b: Node) -> None:
        assert a.broker.healthy and b.broker.healthy
        for name in names:
            await b.broker.subscribe(name)
        info = ClientInfo(user="u")
        for name in names:
            pub = await a.broker.publish(
                name, b'{"k":1}', history=DEFAULT_HISTORY, info=info, tags={"t": "1"}
            )
            assert (pub.offset, pub.epoch) == (0, "")  # no shared position with NATS
        got = await b.wait_for(len(names))
        assert sorted(p.channel for p in got) == sorted(names)
        assert all(p.offset == 1 and p.info == info and p.tags == {"t": "1"} for p in got)
        assert a.got == []

    run(nats_server, body, nodes=2)


def test_positions_are_node_local_and_history_is_refused(nats_server: NatsServer) -> None:
    async def body(a: Node, b: Node) -> None:
        assert await a.broker.history("c", limit=0) == ([], EMPTY)
        await a.broker.subscribe("c")
        _, start = await a.broker.history("c", limit=0)
        assert start.epoch and start.offset == 0
        for n in range(3):
            await b.broker.publish("c", str(n).encode(), history=DEFAULT_HISTORY)
        got = await a.wait_for(3)
        assert [p.offset for p in got] == [1, 2, 3] and {p.epoch for p in got} == {start.epoch}
        with pytest.raises(ProtocolError) as err:
            await a.broker.history("c")
        assert err.value.code == ErrorCode.NOT_AVAILABLE
        with pytest.raises(ProtocolError):
            await a.broker.history("c", limit=10, reverse=True)
        # Recovery: only a client that missed nothing is recovered.
        top = Position(start.epoch, 3)
        pubs, now = await a.broker.history("c", since=top)
        assert reaches(top, pubs, now)
        behind = Position(start.epoch, 1)
        pubs, now = await a.broker.history("c", since=behind)
        assert not reaches(behind, pubs, now)

    run(nats_server, body, nodes=2)


def test_disconnect_starts_a_new_epoch_and_subscribers_resync_at_once(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """What is published while the link is down never arrives: the subscriber
    is told when the link drops, with no later publication needed to show the
    hole, and a resume from before it is not recovered. One WARNING for the event."""

    async def body(a: Node, b: Node) -> None:
        hub = Hub(a.broker)
        sub = Recorder()
        await hub.subscribe("d", sub)
        await b.broker.publish("d", b"1", history=DEFAULT_HISTORY)
        await until(lambda: len(sub.got) == 1, "first publication")
        before = sub.got[0].position
        nats_server.stop()
        await until(lambda: sub.resyncs == 1, "resync when the link drops")
        assert not a.broker.healthy and len(sub.got) == 1
        with pytest.raises(ProtocolError):
            await b.broker.publish("d", b"lost", history=DEFAULT_HISTORY)
        nats_server.start()
        await until(lambda: a.broker.healthy and b.broker.healthy, "both reconnected")
        # A client at the position from before the outage is not recovered.
        rec = await hub.recover("d", before)
        assert not rec.recovered and rec.position.epoch != before.epoch
        # The new epoch continues from its start: delivered, not a second resync.
        await b.broker.publish("d", b"2", history=DEFAULT_HISTORY)
        await until(lambda: len(sub.got) == 2, "the publication after the reconnect")
        assert sub.got[1].position == Position(rec.position.epoch, 1)
        assert sub.resyncs == 1

    with caplog.at_level("INFO", logger="tidings.brokers.nats"):
        run(nats_server, body, nodes=2)
    lost = [r for r in caplog.records if "lost the nats connection" in r.getMessage()]
    # Each node lost the link once: one WARNING each, without a traceback.
    assert len(lost) == 2, caplog.text
    assert all(r.levelname == "WARNING" and r.exc_info is None for r in lost)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_slow_consumer_restarts_the_channel_at_the_hole_never_a_silent_gap(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """nats-py drops what arrives while a subscription holds ``pending_limit``
    messages. A burst far past it, then one more publication: within each
    epoch, consecutive offsets carry consecutive publications (the new epoch
    starts at the hole, after the messages that were queued before it), the
    subscriber resyncs, a resume from before the burst is not recovered, and
    the WARNINGs count events (a restart needs a delivery since the last one),
    not dropped messages."""
    burst = 400

    async def body(a: Node, b: Node) -> None:
        hub = Hub(a.broker)
        sub = Recorder()
        await hub.subscribe("s", sub)
        await b.broker.publish("s", b"0", history=DEFAULT_HISTORY)
        await until(lambda: len(sub.got) == 1, "the publication before the burst")
        before = sub.got[0].position
        nc = a.broker._nc
        assert nc is not None
        received = nc.stats["in_msgs"]
        # Concurrent, so that nats-py buffers them in order and writes them
        # out together: they reach the other node faster than its
        # subscription hands them over.
        await asyncio.gather(
            *(
                b.broker.publish("s", str(n).encode(), history=DEFAULT_HISTORY)
                for n in range(1, burst + 1)
            )
        )
        await until(lambda: nc.stats["in_msgs"] == received + burst, "the burst at node a")
        # One more, once the burst has drained: it comes after the last hole.
        await until(lambda: not a.broker._streams["s"].sub.pending_msgs, "the queue drained")
        delivered = len(sub.got)
        await b.broker.publish("s", str(burst + 1).encode(), history=DEFAULT_HISTORY)
        await until(lambda: len(sub.got) == delivered + 1, "the publication after the burst")
        assert len(sub.got) < burst  # some were dropped: the test made a slow consumer
        assert sub.resyncs >= 1
        by_epoch: dict[str, list[Publication]] = {}
        for pub in sub.got:
            by_epoch.setdefault(pub.epoch, []).append(pub)
        assert len(by_epoch) == sub.resyncs + 1
        for pubs in by_epoch.values():
            assert [p.offset for p in pubs] == list(range(1, len(pubs) + 1))
            first = int(pubs[0].data)
            assert [int(p.data) for p in pubs] == list(range(first, first + len(pubs))), (
                f"a hole inside an epoch: {[p.data for p in pubs]}"
            )
        assert sub.resyncs <= len(sub.got)  # each restart after a delivery
        rec = await hub.recover("s", before)
        assert not rec.recovered
        log_restarts = [r for r in caplog.records if "slow consumer" in r.getMessage()]
        assert len(log_restarts) == sub.resyncs, caplog.text
        assert burst + 2 - len(sub.got) > sub.resyncs  # told per event, not per message

    with caplog.at_level("INFO", logger="tidings.brokers.nats"):
        run_nodes(
            lambda: nats_node(nats_server.url, pending_limit=2),
            body,
            nodes=2,
        )
    warned = [r for r in caplog.records if "slow consumer" in r.getMessage()]
    assert warned and all(r.levelname == "WARNING" and r.exc_info is None for r in warned)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def process_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat: "T" once a SIGSTOP has taken effect."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def test_a_publish_is_answered_once_nats_server_has_it(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """nats-py buffers a publish and writes it later: answering then would
    acknowledge a publication that a link dropping just after loses, with no
    node to notice. With nats-server frozen (SIGSTOP: the link looks alive),
    the publish is a temporary error, not a success; once it thaws, the same
    connection publishes again."""
    assert nats_server.proc is not None
    frozen = False

    async def body(a: Node) -> None:
        nonlocal frozen
        await a.broker.publish("p", b"1", history=DEFAULT_HISTORY)
        nats_server.proc.send_signal(signal.SIGSTOP)
        frozen = True
        await until(lambda: process_state(nats_server.proc.pid) == "T", "nats-server stopped")
        with pytest.raises(ProtocolError) as err:
            await a.broker.publish("p", b"2", history=DEFAULT_HISTORY)
        assert err.value.temporary
        nats_server.proc.send_signal(signal.SIGCONT)
        frozen = False
        await a.broker.publish("p", b"3", history=DEFAULT_HISTORY)
        assert a.broker.healthy

    try:
        with caplog.at_level("INFO"):
            run_nodes(lambda: nats_node(nats_server.url, subscribe_timeout=0.5), body)
    finally:
        if frozen:
            nats_server.proc.send_signal(signal.SIGCONT)
    # The late PONG of the given-up wait must not break nats-py's read loop
    # (which logs an ERROR with a traceback and stops reading).
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_subscribe_without_nats_is_a_clear_error(nats_server: NatsServer) -> None:
    nats_server.stop()

    async def main() -> None:
        node = nats_node(nats_server.url, subscribe_timeout=0.5)
        await node.broker.start()
        try:
            assert not node.broker.healthy
            with pytest.raises(ProtocolError) as err:
                await node.broker.subscribe("x")
            assert err.value.temporary
            nats_server.start()
            await until(lambda: node.broker.healthy, "connected")
            await node.broker.subscribe("x")
            await node.broker.publish("x", b"1", history=DEFAULT_HISTORY)
            await node.wait_for(1)
        finally:
            await node.broker.close()

    asyncio.run(main())


def test_bad_prefix_is_refused() -> None:
    with pytest.raises(ValueError):
        NatsBroker("nats://127.0.0.1:1", prefix="a b")
    with pytest.raises(ValueError):
        NatsBroker("nats://127.0.0.1:1", prefix="a..b")
    with pytest.raises(ValueError):
        NatsBroker("nats://127.0.0.1:1", pending_limit=0)


def test_closing_the_broker_is_not_reported_as_a_lost_connection(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """nats-py calls its disconnected callback on a normal close too; a graceful
    shutdown must not log a WARNING that the connection was lost."""

    async def body(a: Node) -> None:
        assert a.broker.healthy

    with caplog.at_level("INFO", logger="tidings.brokers.nats"):
        run(nats_server, body)
    assert "connected to nats" in caplog.text  # the logger is captured at all
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text


def test_a_publication_right_after_subscribe_is_delivered(nats_server: NatsServer) -> None:
    """subscribe() returns only once nats-server has the SUB: a publication made by
    another node right after it must arrive (NATS core keeps nothing to recover
    it from). Many channels, so that a race between SUB and PUB shows every run."""
    channels = [f"race{n}" for n in range(100)]

    async def body(a: Node, b: Node) -> None:
        for channel in channels:
            await a.broker.subscribe(channel)
            await b.broker.publish(channel, b"1", history=DEFAULT_HISTORY)
        got = await a.wait_for(len(channels))
        assert sorted(p.channel for p in got) == sorted(channels)

    run(nats_server, body, nodes=2)


def test_malformed_messages_from_nats_are_logged_and_skipped(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone who can publish to NATS can send garbage on our subjects: a WARNING
    without traceback, no offset spent on it, the next publication delivered."""
    info = ClientInfo(user="u", conn_info=msgspec.Raw(b'{"name":"x"}'))
    garbage = [
        b"\xc1",
        msgspec.msgpack.encode([b'{"a":', None, None, 1]),
        msgspec.msgpack.encode([b"1", b'{"conn_info":"\xff"}', None, 1]),
    ]

    async def body(a: Node, b: Node) -> None:
        await b.broker.subscribe("m")
        nc = a.broker._nc
        for message in garbage:
            await nc.publish(b.broker._subject("m"), message)
        await a.broker.publish("m", b'"fine"', history=DEFAULT_HISTORY, info=info)
        (got,) = await b.wait_for(1)
        assert (got.offset, got.data, got.info) == (1, b'"fine"', info)

    with caplog.at_level("INFO", logger="tidings.brokers.nats"):
        run(nats_server, body, nodes=2)
    dropped = [r for r in caplog.records if "dropped a malformed" in r.getMessage()]
    assert len(dropped) == len(garbage), caplog.text
    assert all(r.levelname == "WARNING" and r.exc_info is None for r in dropped)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


class QueuedSubscription:
    """Stands in for nats-py's Subscription: only what the loss detection reads."""

    def __init__(self) -> None:
        self.pending_msgs = 0

    async def unsubscribe(self) -> None:
        """Nothing to tell a server."""


class LossScript:
    """A NatsBroker with one subscribed channel and no network: messages handed
    over and drops reported as nats-py would, the hub's view recorded."""

    def __init__(self) -> None:
        self.broker = NatsBroker("nats://127.0.0.1:1")
        self.sub = QueuedSubscription()
        self.stream = _Stream()
        self.stream.sub = self.sub  # type: ignore[assignment]
        self.broker._streams["c"] = self.stream
        self.subject = self.broker._subject("c")
        self.log: list[Any] = []
        self.broker.bind(lambda pub: self.log.append(int(pub.data)))
        self.broker.bind_restarted(lambda channel, at: self.log.append(("restart", at.offset)))
        self.stream.read()  # a subscriber now holds the epoch's position

    def queue(self, n: int) -> None:
        """Message ``n`` waits in the subscription's queue (its number is for the reader)."""
        self.sub.pending_msgs += 1

    def hand(self, n: int) -> None:
        self.sub.pending_msgs -= 1
        msg = Msg(
            _client=None, subject=self.subject, data=envelope.encode(str(n).encode(), None, None, 0)
        )  # type: ignore[arg-type]
        self.broker._on_message("c", self.stream, msg)

    def drop(self) -> None:
        error = SlowConsumerError(subject=self.subject, reply="", sid=1, sub=self.sub)  # type: ignore[arg-type]
        self.broker._dropped(error)


@pytest.mark.unit
def test_a_drop_restarts_the_channel_after_the_messages_queued_before_it() -> None:
    """Two queued, then drops: both are numbered in the old epoch, the restart
    comes right after the second (not at the next message, which may never
    come), and the drops with no delivery between them are one event."""
    script = LossScript()
    epoch = script.stream.epoch
    script.queue(1)
    script.queue(2)
    script.drop()
    script.drop()
    assert script.log == []  # nothing restarts while 1 and 2 wait
    script.hand(1)
    assert script.log == [1]
    script.hand(2)
    assert script.log == [1, 2, ("restart", 0)]
    assert script.stream.epoch != epoch
    script.queue(3)
    script.hand(3)
    assert script.log[-1] == 3 and script.stream.offset == 1


@pytest.mark.unit
def test_a_drop_with_nothing_queued_restarts_at_once_and_an_unseen_epoch_is_not_restarted() -> None:
    script = LossScript()
    script.drop()
    assert script.log == [("restart", 0)]
    script.drop()  # nobody holds a position in the new epoch yet: the same event
    assert script.log == [("restart", 0)]
    script.queue(1)
    script.hand(1)
    script.drop()
    assert script.log == [("restart", 0), 1, ("restart", 0)]


@pytest.mark.unit
def test_a_subscriber_leaving_when_told_does_not_break_the_disconnect_handling() -> None:
    """A subscriber told to resync may leave at once (the hub then drops the
    channel): the disconnect callback must still finish, or nats-py's
    reconnect, which awaits it, dies with it and the node never reconnects."""
    script = LossScript()
    told: list[str] = []

    def leave(channel: str, at: Position) -> None:
        told.append(channel)
        script.broker.unsubscribe(channel)

    script.broker.bind_restarted(leave)
    script.broker._streams["d"] = second = _Stream()
    second.read()

    async def disconnect() -> None:
        await script.broker._on_disconnected()

    asyncio.run(disconnect())
    assert sorted(told) == ["c", "d"]
