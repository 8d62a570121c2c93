"""Is the protobuf library fast enough for the publication push? (issue 13, item 2)

    .venv/bin/python bench/protobuf_push.py

The push of a publication is the one Protobuf message on the hot path: it is
encoded once per publication and shared by every Protobuf subscriber (the
rest — replies, joins, history — is per request). The rule: hand-write it
only if the library costs more than 10 % per delivery. This script measures

* the push alone: ``tidings.centrifuge.protobuf.push_protobuf`` (the official
  runtime, upb) against a hand-written encoder of the same bytes (checked
  equal first);
* a whole delivery, worst case for the encoder (one subscriber, so every
  delivery pays a full encode): ``Hub.publish`` on the memory broker to one
  subscriber whose ``deliver`` frames the push and writes it to a socket
  (a ``socketpair``, drained by a thread), as the WebSocket transport does.

and prints the library's extra cost as a share of a delivery. Best of 7 runs.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import timeit

import msgspec

from tidings.brokers.memory import MemoryBroker
from tidings.centrifuge.protobuf import push_protobuf
from tidings.frames import OP_BINARY, frame
from tidings.hub import Hub
from tidings.stream import ClientInfo, Publication

DATA = b'{"text":"hello, world","user":"alice","n":12345}'
N = 20_000


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _info(info: ClientInfo) -> bytes:
    out = b""
    if info.user:
        out += _field(1, info.user.encode())
    if info.client:
        out += _field(2, info.client.encode())
    if info.conn_info:
        out += _field(3, bytes(info.conn_info))
    if info.chan_info:
        out += _field(4, bytes(info.chan_info))
    return out


def hand_push(pub: Publication) -> bytes:
    """The same bytes as ``push_protobuf``, written out field by field."""
    body = _field(4, pub.data) if pub.data else b""
    if pub.info is not None:
        body += _field(5, _info(pub.info))
    if pub.offset:
        body += b"\x30" + _varint(pub.offset)
    if pub.tags:
        for key, value in pub.tags.items():
            body += _field(7, _field(1, key.encode()) + _field(2, value.encode()))
    if pub.time:
        body += b"\x48" + _varint(pub.time)
    push = _field(2, pub.channel.encode()) + _field(4, body)
    reply = _field(4, push)
    return _varint(len(reply)) + reply


def _publication(offset: int) -> Publication:
    info = ClientInfo("alice", "0b5c0e54-8f6e-4d1c-9b8e-6a0e1f3c2d11", msgspec.Raw(b'{"a":1}'))
    return Publication("chat:room42", offset, "abcd", DATA, info, {"kind": "msg"})


def encode_only() -> tuple[float, float]:
    pubs = [_publication(i + 1) for i in range(1000)]
    assert all(hand_push(p) == push_protobuf(p) for p in pubs), "hand encoder differs"
    lib = min(timeit.repeat(lambda: [push_protobuf(p) for p in pubs], number=20, repeat=7))
    hand = min(timeit.repeat(lambda: [hand_push(p) for p in pubs], number=20, repeat=7))
    return lib / 20_000 * 1e6, hand / 20_000 * 1e6


class _Subscriber:
    """Frames the push once per publication (``pub.encoded``) and writes it."""

    __slots__ = ("encoder", "sock")

    def __init__(self, sock: socket.socket, encoder: object) -> None:
        self.sock = sock
        self.encoder = encoder

    def deliver(self, pub: Publication) -> None:
        self.sock.send(pub.encoded(self.encoder))  # type: ignore[arg-type]

    def insufficient_state(self) -> None:
        raise AssertionError("no skip expected")


def deliveries(encoders: dict[str, object]) -> dict[str, float]:
    """µs per publish-and-deliver with one subscriber, per encoder: best of 7
    rounds of N, the encoders taking turns in each round so that the load of
    a busy machine falls on both alike."""
    ours, theirs = socket.socketpair()

    def drain() -> None:
        while theirs.recv(1 << 20):
            pass

    threading.Thread(target=drain, daemon=True).start()
    info = ClientInfo("alice", "0b5c0e54-8f6e-4d1c-9b8e-6a0e1f3c2d11", msgspec.Raw(b'{"a":1}'))

    async def run() -> dict[str, float]:
        hub = Hub(MemoryBroker())
        for name, encoder in encoders.items():
            await hub.subscribe(name, _Subscriber(ours, encoder))
        best = dict.fromkeys(encoders, float("inf"))
        loop = asyncio.get_running_loop()
        for _ in range(7):
            for name in encoders:
                start = loop.time()
                for _ in range(N):
                    await hub.publish(name, DATA, info=info, tags={"kind": "msg"})
                best[name] = min(best[name], loop.time() - start)
        return {name: value / N * 1e6 for name, value in best.items()}

    try:
        return asyncio.run(run())
    finally:
        ours.close()


def main() -> None:
    lib, hand = encode_only()
    print(f"push encode: library {lib:.2f} us, hand-written {hand:.2f} us")

    def lib_frame(pub: Publication) -> bytes:
        return frame(0x80 | OP_BINARY, push_protobuf(pub))

    def hand_frame(pub: Publication) -> bytes:
        return frame(0x80 | OP_BINARY, hand_push(pub))

    both = deliveries({"library": lib_frame, "hand": hand_frame})
    with_lib, with_hand = both["library"], both["hand"]
    share = (with_lib - with_hand) / with_hand * 100
    print(
        f"delivery (publish + encode + frame + send, 1 subscriber): library {with_lib:.2f} us, "
        f"hand-written {with_hand:.2f} us; the library costs {share:+.1f} % per delivery"
    )


if __name__ == "__main__":
    main()
