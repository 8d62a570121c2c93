"""The servers under test: how to start each, subscribe to it and publish to it.

Every server implements the same scenario: subscribers join channel ``bench``
over SSE, WebSocket or long-poll; an HTTP POST publishes one message that
every subscriber receives. Each entry says which transports it has, the
command line that starts it on a given port, the subscribe request per
transport (a ``load.Spec``) and the publish request.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shlex
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from load import Spec

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"
HOST = "127.0.0.1"
NCHAN_MODULE = "/usr/lib/nginx/modules/ngx_nchan_module.so"
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")  # Debian puts nginx and redis-server here
CENTRIFUGE_SUBSCRIBE = b'{"id":1,"connect":{}}\n{"id":2,"subscribe":{"channel":"bench"}}'
#: The same two commands in Protobuf form (``centrifuge-protobuf``), each prefixed with its
#: length: Command{id: 1, connect: {}} and Command{id: 2, subscribe: {channel: "bench"}}.
CENTRIFUGE_SUBSCRIBE_PROTOBUF = b"\x04\x08\x01\x22\x00" + b"\x0b\x08\x02\x2a\x07\x0a\x05bench"


def tidings_body(data: dict[str, Any]) -> bytes:
    """tidings' ``/api/publish`` body (the peers written here accept it too)."""
    return json.dumps({"channel": "bench", "data": data}, separators=(",", ":")).encode()


def raw_body(data: dict[str, Any]) -> bytes:
    """Nchan publishes the request body itself as the message."""
    return json.dumps(data, separators=(",", ":")).encode()


@dataclass
class ServerDef:
    """One server under test."""

    name: str
    transports: tuple[str, ...]
    command: Callable[[int, Path], list[str]]
    specs: Callable[[int], dict[str, Spec]]
    publish_path: str = "/api/publish"
    publish_body: Callable[[dict[str, Any]], bytes] = tidings_body
    publish_port_offset: int = 0
    needs: tuple[str, ...] = ()  # importable modules
    binaries: tuple[tuple[str, str], ...] = ()  # (executable, Debian package providing it)
    max_n: int | None = None  # larger N is capped (and reported)
    note: str = ""
    setup: Callable[[int, Path], None] | None = field(default=None)

    def unavailable(self) -> str | None:
        """Why this server cannot run here, or ``None``."""
        for mod in self.needs:
            if importlib.util.find_spec(mod) is None:
                return f"python module {mod!r} missing (run bench/setup.sh)"
        for exe, package in self.binaries:
            if not binary(exe):
                return f"{exe} not installed (apt package {package}; run bench/setup.sh)"
        if self.name == "nchan" and not os.path.exists(NCHAN_MODULE):
            return "libnginx-mod-nchan not installed (run bench/setup.sh)"
        return None


def binary(name: str) -> str | None:
    """Path of an executable, also looking in sbin directories a user's PATH may lack."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def _py(script: str) -> Callable[[int, Path], list[str]]:
    return lambda port, _wd: [sys.executable, str(PEERS / script), str(port)]


def _tidings_cmd(port: int, wd: Path) -> list[str]:
    cfg = wd / "tidings.toml"
    cmd = [sys.executable, "-m", "tidings", "serve", "--host", HOST, "--port", str(port)]
    if cfg.exists():
        cmd += ["--config", str(cfg)]
    return [*cmd, "--log-level", "warning"]


def _tidings_asgi_cmd(port: int, wd: Path) -> list[str]:
    """tidings' ASGI app under uvicorn (peers/tidings_asgi.py), with the same config."""
    cfg = wd / "tidings.toml"
    cmd = [sys.executable, str(PEERS / "tidings_asgi.py"), str(port)]
    return [*cmd, str(cfg)] if cfg.exists() else cmd


def _tidings_setup(port: int, wd: Path) -> None:
    """Optional settings for the run, from TIDINGS_BENCH_CONFIG (a TOML path)."""
    src = os.environ.get("TIDINGS_BENCH_CONFIG")
    if src:
        shutil.copy(src, wd / "tidings.toml")


def _centrifuge_like(port: int) -> dict[str, Spec]:
    """tidings' own endpoints (the floor speaks the same ones)."""
    return {
        "sse": Spec("sse", HOST, port, "/sse?channel=bench", ready=b"event: subscribed"),
        "ws": Spec(
            "ws",
            HOST,
            port,
            "/connection/websocket",
            ready=b'"id":2',
            ws_first=CENTRIFUGE_SUBSCRIBE,
        ),
        "poll": Spec("poll", HOST, port, "/poll?channel=bench&timeout=60"),
    }


def _tidings_specs(port: int) -> dict[str, Spec]:
    """tidings' endpoints, and WebSocket in the Protobuf form too (``wspb``): the
    subscribe reply is the first reply with id 2 (``\\x08\\x02``)."""
    specs = _centrifuge_like(port)
    specs["wspb"] = Spec(
        "ws",
        HOST,
        port,
        "/connection/websocket",
        ready=b"\x08\x02",
        ws_first=CENTRIFUGE_SUBSCRIBE_PROTOBUF,
        headers=(("Sec-WebSocket-Protocol", "centrifuge-protobuf"),),
        ws_binary=True,
    )
    return specs


def _sse_only(port: int) -> dict[str, Spec]:
    """The lecture's models (peers/twisted_sse.py, tornado_sse.py, gevent_sse.py): SSE only."""
    return {"sse": Spec("sse", HOST, port, "/sse?channel=bench", ready=b"event: subscribed")}


def _nchan_cmd(port: int, wd: Path) -> list[str]:
    nginx = binary("nginx") or "nginx"
    return [nginx, "-p", str(wd), "-c", str(wd / "nginx.conf"), "-g", "daemon off;"]


def _nchan_setup(port: int, wd: Path) -> None:
    conf = (PEERS / "nchan.conf.in").read_text()
    conf = conf.replace("@PORT@", str(port)).replace("@MODULE@", f"load_module {NCHAN_MODULE};")
    (wd / "nginx.conf").write_text(conf)


SERVERS: dict[str, ServerDef] = {
    s.name: s
    for s in [
        ServerDef(
            "tidings",
            ("sse", "ws", "wspb", "poll"),
            _tidings_cmd,
            _tidings_specs,
            needs=("tidings",),
            setup=_tidings_setup,
        ),
        ServerDef(
            "tidings-asgi",
            ("sse", "ws", "wspb", "poll"),
            _tidings_asgi_cmd,
            _tidings_specs,
            needs=("tidings", "uvicorn"),
            setup=_tidings_setup,
            note="tidings' ASGI app (rt.asgi()) under uvicorn: httptools, websockets, uvloop",
        ),
        ServerDef(
            "floor",
            ("sse", "ws", "poll"),
            _py("floor.py"),
            _centrifuge_like,
            needs=("uvloop",),
            note="raw asyncio Protocol on uvloop writing pre-built bytes",
        ),
        ServerDef(
            "nchan",
            ("sse", "ws", "poll"),
            _nchan_cmd,
            lambda port: {
                "sse": Spec("sse", HOST, port, "/sub/bench", ready=b": hi"),
                "ws": Spec("ws", HOST, port, "/sub/bench"),
                "poll": Spec("poll", HOST, port, "/sub/bench", poll_style="nchan"),
            },
            publish_path="/pub/bench",
            publish_body=raw_body,
            binaries=(("nginx", "nginx"),),
            setup=_nchan_setup,
            note="nginx + Nchan, 1 worker",
        ),
        ServerDef(
            "socketio",
            ("ws",),
            _py("socketio_peer.py"),
            lambda port: {
                "ws": Spec(
                    "ws",
                    HOST,
                    port,
                    "/socket.io/?EIO=4&transport=websocket",
                    ready=b"40{",
                    ws_first=b"40",
                ),
            },
            needs=("socketio", "uvicorn"),
            note="python-socketio AsyncServer under uvicorn",
        ),
        ServerDef(
            "sse-starlette",
            ("sse",),
            _py("sse_starlette_peer.py"),
            lambda port: {
                "sse": Spec("sse", HOST, port, "/sse", ready=b"event: subscribed"),
            },
            needs=("sse_starlette", "uvicorn"),
            note="Starlette + sse-starlette under uvicorn",
        ),
        ServerDef(
            "websockets",
            ("ws",),
            _py("websockets_peer.py"),
            lambda port: {
                "ws": Spec("ws", HOST, port, "/", ready=b'"id":2', ws_first=CENTRIFUGE_SUBSCRIBE),
            },
            publish_port_offset=1,
            needs=("websockets", "uvloop"),
            note="websockets asyncio server + broadcast()",
        ),
        ServerDef(
            "threaded",
            ("sse",),
            _py("threaded_sse.py"),
            lambda port: {
                "sse": Spec("sse", HOST, port, "/sse", ready=b"event: subscribed"),
            },
            note="stdlib ThreadingHTTPServer, one OS thread per subscriber",
        ),
        ServerDef(
            "twisted",
            ("sse",),
            _py("twisted_sse.py"),
            _sse_only,
            needs=("twisted",),
            note="Twisted web Resource kept open, request.write per subscriber (callbacks)",
        ),
        ServerDef(
            "tornado",
            ("sse",),
            _py("tornado_sse.py"),
            _sse_only,
            needs=("tornado",),
            note="Tornado RequestHandler, @gen.coroutine waiting on a Condition, flush()",
        ),
        ServerDef(
            "gevent",
            ("sse",),
            _py("gevent_sse.py"),
            _sse_only,
            needs=("gevent",),
            note="gevent.pywsgi, a greenlet and a gevent Queue per subscriber",
        ),
    ]
}


def _baseline() -> ServerDef | None:
    """tidings from another source tree, to measure a change before and after in one run.

    ``TIDINGS_BENCH_BASELINE=/path/to/checkout`` (e.g. a ``git worktree`` of the
    commit before the change) adds the server ``tidings-baseline``: the same
    command, config and endpoints as ``tidings``, importing that tree's
    ``src/`` first.
    """
    root = os.environ.get("TIDINGS_BENCH_BASELINE")
    if not root:
        return None
    src = str(Path(root).resolve() / "src")
    tidings = SERVERS["tidings"]
    return dataclasses.replace(
        tidings,
        name="tidings-baseline",
        command=lambda port, wd: ["env", f"PYTHONPATH={src}", *tidings.command(port, wd)],
        note=f"tidings from {root}",
    )


_baseline_def = _baseline()
if _baseline_def is not None:
    SERVERS[_baseline_def.name] = _baseline_def


# --------------------------------------------------------------------------- scale-out


def _redis_cmd(port: int, wd: Path) -> list[str]:
    """Persistence off, as in tests/brokers_support.py: nothing may touch the disk mid-run."""
    return [
        binary("redis-server") or "redis-server",
        "--port",
        str(port),
        "--bind",
        HOST,
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(wd),
        "--daemonize",
        "no",
        "--protected-mode",
        "no",
    ]


REDIS = ServerDef(
    "redis",
    (),
    _redis_cmd,
    lambda port: {},
    binaries=(("redis-server", "redis-server"),),
    note="redis-server, persistence off (the broker of the scale-out scenario)",
)


def tidings_scaled(workers: int, redis_port: int) -> ServerDef:
    """tidings with ``workers`` processes on one port sharing channels through Redis.

    Same command, endpoints and publish request as the ``tidings`` entry; only
    its config differs, so TIDINGS_BENCH_CONFIG does not apply here.
    """

    def setup(port: int, wd: Path) -> None:
        (wd / "tidings.toml").write_text(
            f"workers = {workers}\n"
            "[broker]\n"
            'type = "redis"\n'
            f'redis_url = "redis://{HOST}:{redis_port}/0"\n'
            'prefix = "bench"\n'
        )

    return dataclasses.replace(
        SERVERS["tidings"],
        setup=setup,
        note=f"tidings, {workers} workers (SO_REUSEPORT) + Redis broker",
    )


# --------------------------------------------------------------------------- tidings on Redis

#: Waits (10 s at most) until something listens on 127.0.0.1:<argv[1]>.
_WAIT_FOR_PORT = (
    "import socket, sys, time\n"
    "deadline = time.monotonic() + 10\n"
    "while True:\n"
    "    try:\n"
    "        socket.create_connection(('127.0.0.1', int(sys.argv[1])), 0.2).close()\n"
    "        break\n"
    "    except OSError:\n"
    "        if time.monotonic() > deadline: sys.exit('redis did not start')\n"
    "        time.sleep(0.02)\n"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _tidings_redis_setup(port: int, wd: Path) -> None:
    """One tidings process on the Redis broker, with a Redis of its own for the run."""
    redis_port = _free_port()
    (wd / "redis.port").write_text(str(redis_port))
    (wd / "tidings.toml").write_text(
        f'[broker]\ntype = "redis"\nredis_url = "redis://{HOST}:{redis_port}/0"\nprefix = "bench"\n'
    )


def _tidings_redis_cmd(port: int, wd: Path) -> list[str]:
    """redis-server, then (once it listens) tidings, in one process group: the
    run stops both with the server, and its RSS figures include Redis'."""
    redis_port = int((wd / "redis.port").read_text())
    redis = shlex.join(_redis_cmd(redis_port, wd))
    wait = shlex.join([sys.executable, "-c", _WAIT_FOR_PORT, str(redis_port)])
    return ["sh", "-c", f"{redis} & {wait} && exec {shlex.join(_tidings_cmd(port, wd))}"]


SERVERS["tidings-redis"] = dataclasses.replace(
    SERVERS["tidings"],
    name="tidings-redis",
    command=_tidings_redis_cmd,
    setup=_tidings_redis_setup,
    binaries=(("redis-server", "redis-server"),),
    note="tidings, 1 process, [broker] type = redis (its own redis-server; RSS includes it)",
)

if _baseline_def is not None:
    # The same on Redis from the baseline tree (TIDINGS_BENCH_BASELINE): before/after in one run.
    _baseline_src = str(Path(os.environ["TIDINGS_BENCH_BASELINE"]).resolve() / "src")
    SERVERS["tidings-baseline-redis"] = dataclasses.replace(
        SERVERS["tidings-redis"],
        name="tidings-baseline-redis",
        command=lambda port, wd: [
            "env",
            f"PYTHONPATH={_baseline_src}",
            *_tidings_redis_cmd(port, wd),
        ],
        note=f"tidings-redis from {_baseline_src}",
    )
