"""Graceful shutdown: streaming clients are told to reconnect, long-polls are answered."""

from __future__ import annotations

import signal
import threading

import httpx
import pytest

from helpers import RawConn, SSEClient, poll, poll_ok, publish, request_bytes, unique_channel


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_graceful_shutdown(server_factory, sig):
    srv = server_factory("[timeouts]\nshutdown = 5.0\n")
    ch = unique_channel()
    sse = SSEClient(srv, [ch])
    sse.subscribed()

    # A long-poll held on a connection the server has already accepted and served.
    cursor = poll_ok(srv, [ch])["cursor"]
    client = httpx.Client(base_url=srv.url, timeout=20)
    assert client.get("/health").status_code == 200
    result = {}

    def long_poll():
        try:
            result["resp"] = poll(
                srv, [ch], cursor=cursor, timeout=60, client=client, read_timeout=20
            )
        except Exception as exc:  # reported below
            result["exc"] = exc

    t = threading.Thread(target=long_poll)
    t.start()
    # An idle keep-alive connection must not hold the shutdown up either.
    idle = RawConn(srv)
    idle.send(request_bytes("GET", "/health"))
    assert idle.read_response().status == 200
    threading.Event().wait(0.3)  # let the long-poll request be read and held

    srv.proc.send_signal(sig)
    try:
        tail = sse.expect_eof()
        retries = [ev for ev in tail if ev.retry is not None]
        assert retries, f"no retry: before EOF; got {tail}"
        assert not [ev for ev in tail if ev.data is not None and not ev.is_ping], tail

        t.join(20)
        assert not t.is_alive()
        assert "exc" not in result, result.get("exc")
        resp = result["resp"]
        assert resp.status_code == 200
        assert resp.json()["publications"] == []
        assert isinstance(resp.json()["cursor"], str)

        code = srv.proc.wait(timeout=15)
        assert code == 0, srv.logs()
        assert idle.closed_by_peer(1.0)
    finally:
        sse.close()
        client.close()
        idle.close()


def test_shutdown_with_no_clients_exits_0(server_factory):
    srv = server_factory()
    assert srv.stop(signal.SIGTERM, timeout=15) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health", timeout=2)


def test_subscriber_can_resume_on_a_new_server_after_shutdown(server_factory):
    """After shutdown the client reconnects elsewhere; an in-memory restart is a new epoch."""
    from conftest import free_port

    port = free_port()
    srv = server_factory(port=port)
    ch = unique_channel()
    with SSEClient(srv, [ch]) as sse:
        sse.subscribed()
        publish(srv, ch, "on the old server")
        (ev,) = sse.publications(1)
        cursor = ev.id
    assert srv.stop() == 0
    srv2 = server_factory(port=port)
    with SSEClient(srv2, [ch], last_event_id=cursor) as sse:
        assert sse.subscribed().json["recovered"] is False
        unrec = sse.next_data()
        assert unrec.event == "unrecovered" and unrec.json["channels"] == [ch]
        res = publish(srv2, ch, "on the new server")
        (ev,) = sse.publications(1)
        assert (ev.json["offset"], ev.json["data"]) == (res["offset"], "on the new server")


def test_shutdown_is_bounded_with_a_half_sent_request(server_factory):
    """A client stuck mid-request cannot hold the process beyond timeouts.shutdown."""
    srv = server_factory("[timeouts]\nshutdown = 1.0\nrequest = 60.0\n")
    conn = RawConn(srv)
    try:
        conn.send(b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        threading.Event().wait(0.2)
        assert srv.stop(signal.SIGTERM, timeout=15) == 0, srv.logs()
        assert conn.closed_by_peer(5)
    finally:
        conn.close()
