"""Thread-per-connection SSE server from the standard library.

``http.server.ThreadingHTTPServer``: every subscriber holds an OS thread (and
its stack) blocked on a ``threading.Condition``; a publish wakes them all and
each writes the same pre-encoded bytes to its own socket. This is the model that
asyncio replaces; the benchmark shows what holding N connections this way costs.

Usage: ``python threaded_sse.py PORT``
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar


class Latest:
    """The last publications by sequence number; guarded by ``COND``.

    A thread that was busy writing while more publications arrived catches up
    from ``history`` instead of skipping them.
    """

    seq = 0
    history: ClassVar[dict[int, bytes]] = {}


COND = threading.Condition()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Silence per-request logging (it would dominate the measurement)."""

    def do_GET(self) -> None:
        if not self.path.startswith("/sse"):
            body = b'{"status":"ok"}'
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        with COND:
            seen = Latest.seq
        self.wfile.write(b"retry: 3000\n\nevent: subscribed\ndata: {}\n\n")
        self.wfile.flush()
        self.close_connection = True
        while True:
            with COND:
                if Latest.seq == seen:
                    COND.wait(timeout=15)
                seq = Latest.seq
                msg = b"".join(Latest.history.get(i, b"") for i in range(seen + 1, seq + 1))
            try:
                if seq == seen:
                    self.wfile.write(b":\n\n")  # heartbeat finds dead peers
                else:
                    seen = seq
                    self.wfile.write(msg)
                self.wfile.flush()
            except OSError:
                return

    def do_POST(self) -> None:
        data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        payload = json.dumps(json.loads(data)["data"], separators=(",", ":")).encode()
        with COND:
            Latest.seq += 1
            Latest.history[Latest.seq] = b"data: " + payload + b"\n\n"
            Latest.history.pop(Latest.seq - 100, None)
            COND.notify_all()
        body = b'{"result":{}}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 4096

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        super().server_bind()


if __name__ == "__main__":
    Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
