"""tidings: a realtime event server (WebSocket, SSE, long-polling, polling).

``serve`` behaves like uvicorn (--host, --port, --uds, --log-level, --loop,
--workers, and --app module:attribute for a ``tidings.Tidings`` with its
hooks); ``publish`` and ``subscribe`` are the curl of tidings, for trying
things from a shell; ``token`` and ``check-config`` help secure a deployment; ``top`` watches a
running server's figures.
Exit codes: 0 success, 1 runtime failure (server unreachable, port taken, API
error), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .config import Config, ConfigError, load_config
from .logs import configure_logging
from .version import __version__

if TYPE_CHECKING:
    from .app import Tidings

DEFAULT_URL = "http://127.0.0.1:8000"

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidings", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tidings {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error", "critical"])
    serve.add_argument(
        "--log-format", choices=["text", "json"], help="text (default), or one JSON object a line"
    )
    serve.add_argument(
        "--access-log",
        action="store_true",
        default=None,
        help="log every HTTP answer at INFO on logger tidings.access",
    )
    serve.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], help="event loop")
    serve.add_argument(
        "--workers", type=int, help="processes sharing the port (needs a redis or nats broker)"
    )
    serve.add_argument(
        "--demo", action="store_true", default=None, help="serve the demo page at /demo"
    )
    serve.add_argument(
        "--uds", metavar="PATH", help="listen on a Unix socket at PATH instead of host:port"
    )
    serve.add_argument(
        "--app",
        metavar="MODULE:ATTRIBUTE",
        help="run this tidings.Tidings object with its hooks and config (like uvicorn's app)",
    )
    serve.add_argument(
        "--app-dir",
        metavar="DIR",
        default=".",
        help="look for the --app module in DIR first (default: the current directory)",
    )
    serve.set_defaults(run=_serve)

    url_help = f"server URL (default $TIDINGS_URL or {DEFAULT_URL})"
    publish = commands.add_parser("publish", help="publish JSON data to a channel")
    publish.add_argument("channel")
    publish.add_argument("data", help='JSON, e.g. \'{"text": "hi"}\'')
    publish.add_argument("--url", default=os.environ.get("TIDINGS_URL", DEFAULT_URL), help=url_help)
    publish.add_argument(
        "--api-key",
        default=os.environ.get("TIDINGS_API_KEY", ""),
        help="API key ($TIDINGS_API_KEY)",
    )
    publish.set_defaults(run=_publish)

    subscribe = commands.add_parser(
        "subscribe",
        help="print the publications of channels, one line each, until Ctrl-C",
        description=(
            "Print each publication of the channels on a line: 'CHANNEL DATA' (DATA as "
            "JSON), or with --json the whole publication as a JSON object. Reconnects and "
            "resumes without loss. Exit status: 0 after Ctrl-C, 1 when the server refuses "
            "or cannot be reached, 2 for a usage error."
        ),
    )
    subscribe.add_argument("channels", nargs="+", metavar="CHANNEL")
    subscribe.add_argument(
        "--url", default=os.environ.get("TIDINGS_URL", DEFAULT_URL), help=url_help
    )
    subscribe.add_argument(
        "--transport",
        choices=("ws", "sse", "longpoll", "poll"),
        default="sse",
        help="how to follow the channels (default sse)",
    )
    subscribe.add_argument(
        "--json", action="store_true", help="print each publication as one JSON object"
    )
    subscribe.add_argument(
        "--token",
        default=os.environ.get("TIDINGS_TOKEN", ""),
        help="connection token (JWT) ($TIDINGS_TOKEN)",
    )
    subscribe.add_argument(
        "--cursor", help="resume from this cursor (an SSE event id or a poll cursor)"
    )
    subscribe.set_defaults(run=_subscribe)

    token = commands.add_parser(
        "token", help="mint a connection or subscription token (for development)"
    )
    token.add_argument("--user", required=True, help="the user id (the sub claim)")
    token.add_argument("--channel", help="make a subscription token for this channel")
    token.add_argument(
        "--channels", help="comma-separated channels the server subscribes the client to"
    )
    token.add_argument("--ttl", default="1h", help="lifetime: 3600, 90s, 30m, 12h, 7d (default 1h)")
    token.add_argument("--info", help="JSON info attached to the user")
    token.add_argument("--config", metavar="FILE", help="TOML file with [auth] hmac_secret")
    token.add_argument(
        "--private-key", metavar="PEM", help="sign with this RSA or EC private key instead"
    )
    token.set_defaults(run=_token)

    top = commands.add_parser(
        "top", help="a running server's figures, refreshed (like redis-cli --stat)"
    )
    top.add_argument("--url", default=os.environ.get("TIDINGS_URL", DEFAULT_URL), help=url_help)
    top.add_argument(
        "--api-key",
        default=os.environ.get("TIDINGS_API_KEY", ""),
        help="API key, for /api/info when /metrics is not there ($TIDINGS_API_KEY)",
    )
    top.add_argument(
        "--metrics-token",
        default=os.environ.get("TIDINGS_METRICS__TOKEN", ""),
        help="bearer token of /metrics, metrics.token ($TIDINGS_METRICS__TOKEN)",
    )
    top.add_argument(
        "--interval", type=float, default=1.0, help="seconds between readings (default 1)"
    )
    top.add_argument("--once", action="store_true", help="print one snapshot and exit")
    top.set_defaults(run=_top)

    check = commands.add_parser(
        "check-config", help="validate the configuration and print it, secrets masked"
    )
    check.add_argument("--config", metavar="FILE", help="TOML configuration file")
    check.set_defaults(run=_check_config)
    return parser


# -- serve -----------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    # Here, not at the top: the server is not loaded for `tidings publish`.
    from .app import Tidings

    app: Tidings | None = None
    if args.app is not None:
        try:
            app = _load_app(args.app, args.app_dir)
        except AppNotFound as exc:
            print(f"tidings: --app {args.app}: {exc}", file=sys.stderr)
            return 2
        except ConfigError as exc:  # the module's Tidings.from_config(...)
            print(f"tidings: --app {args.app}: config error: {exc}", file=sys.stderr)
            return 2
    overrides = {
        "host": args.host,
        "port": args.port,
        "log_level": args.log_level,
        "log_format": args.log_format,
        "access_log": args.access_log,
        "loop": args.loop,
        "workers": args.workers,
        "demo": args.demo,
    }
    try:
        config = load_config(
            args.config, os.environ, overrides, base=None if app is None else app.config
        )
    except ConfigError as exc:
        print(f"tidings: config error: {exc}", file=sys.stderr)
        return 2
    if args.uds is not None and config.workers > 1:
        print("tidings: --uds serves one process: --workers needs a port", file=sys.stderr)
        return 2
    if app is None:
        app = Tidings(config)
    configure_logging(config.log_level, config.log_format)
    loop_factory = _loop_factory(config)
    if loop_factory is None:
        return 2
    if config.workers > 1:
        from .workers import run_workers

        return run_workers(config, loop_factory, app)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        try:
            runner.run(app.run(config, uds=args.uds))
        except ConfigError as exc:  # found while building the server (e.g. a key file)
            print(f"tidings: config error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            where = args.uds or f"{config.host}:{config.port}"
            log.error("cannot listen on %s: %s", where, exc.strerror or exc)
            return 1
    return 0


class AppNotFound(Exception):
    """``--app`` names no ``Tidings``: the message says what was wrong."""


def _load_app(spec: str, app_dir: str) -> Tidings:
    """The object ``--app module:attribute`` names, imported as uvicorn imports its app.

    ``app_dir`` goes first on ``sys.path``. A missing module or attribute, or
    an object that is not a :class:`~tidings.Tidings`, raises
    :class:`AppNotFound`; an error raised by the module itself while it is
    imported is the application's, and propagates with its traceback.
    """
    from .app import Tidings

    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise AppNotFound('expected "module:attribute", such as "myapp.realtime:rt"')
    sys.path.insert(0, os.path.abspath(app_dir))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
            raise  # the module exists and imports something missing: its own error
        raise AppNotFound(f"no module named {exc.name!r} (looked in {app_dir!r} first)") from None
    target: object = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise AppNotFound(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(target, Tidings):
        raise AppNotFound(f"{attribute} is a {type(target).__name__}, not a tidings.Tidings")
    return target


def _loop_factory(config: Config) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if config.loop == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if config.loop == "uvloop":
            print("tidings: --loop uvloop, but uvloop is not installed", file=sys.stderr)
            return None
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


# -- publish ---------------------------------------------------------------


def _publish(args: argparse.Namespace) -> int:
    """Publish with the API client's own call (request and answer rules), sent with urllib."""
    import msgspec

    from .client import calls

    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        print(f"tidings: DATA is not valid JSON: {exc}", file=sys.stderr)
        return 2
    # Written by json, as always (the README shows its spacing); msgspec would also write
    # NaN as null, which the server would store where it refuses json's NaN.
    call = calls.publish(args.channel, msgspec.Raw(json.dumps(data).encode()))
    endpoint = calls.Endpoint(args.url, args.api_key)
    request = urllib.request.Request(
        endpoint.url(call), data=call.body(), headers=endpoint.headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        print(f"tidings: cannot reach {args.url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
    try:
        result = call.read(status, body)
    except calls.APIError as exc:
        http_status = f" (HTTP {exc.status})" if exc.code and exc.status != 200 else ""
        print(f"tidings: error {exc}{http_status}", file=sys.stderr)
        return 1
    print(json.dumps(msgspec.to_builtins(result)))
    return 0


# -- subscribe -------------------------------------------------------------


def _subscribe(args: argparse.Namespace) -> int:
    """Tail channels on any transport with the Python client (tidings.client), which
    reconnects and resumes from its position; print one line per publication."""
    from .client.subscriber import Subscription

    _client_logging()
    try:
        subscription = Subscription(
            args.url,
            args.channels,
            args.transport,
            args.token or None,
            cursor=args.cursor,
            on_unrecovered=_print_unrecovered,
            fail_fast=True,
        )
    except ValueError as exc:
        print(f"tidings: --cursor: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_tail(subscription, as_json=args.json))
    except KeyboardInterrupt:
        return 0  # Ctrl-C: how a tail ends, quietly
    except BrokenPipeError:
        # The reader went away (`| head`): as a tail ends, without Python's complaint
        # when the interpreter flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


async def _tail(subscription: Any, *, as_json: bool) -> int:
    from .client.calls import APIError

    try:
        async for pub in subscription:
            print(_publication_line(pub, as_json=as_json), flush=True)
    except APIError as exc:
        http_status = f" (HTTP {exc.status})" if exc.status not in (0, 200) else ""
        print(f"tidings: error {exc}{http_status}", file=sys.stderr)
        return 1
    except ConnectionError as exc:
        print(f"tidings: cannot subscribe at {subscription.base}: {exc}", file=sys.stderr)
        return 1
    finally:
        await subscription.aclose()
    return 0


def _publication_line(pub: Any, *, as_json: bool) -> str:
    """``CHANNEL DATA`` (DATA as compact JSON), or the whole publication as a JSON object."""
    data = json.dumps(pub.data, separators=(",", ":"), ensure_ascii=False)
    if not as_json:
        return f"{pub.channel} {data}"
    fields: dict[str, Any] = {"channel": pub.channel, "offset": pub.offset, "epoch": pub.epoch}
    fields["data"] = pub.data
    for name in ("info", "tags", "time"):
        value = getattr(pub, name)
        if value is not None:
            fields[name] = value
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False)


def _print_unrecovered(channels: list[str]) -> None:
    print(
        f"tidings: not recovered, missed publications lost: {', '.join(channels)}",
        file=sys.stderr,
        flush=True,
    )


def _client_logging() -> None:
    """The client's notices (a reconnect, a stream dropped for an endless line) on
    stderr as ``tidings: ...`` lines; ``serve`` configures its own logging."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("tidings: %(message)s"))
    client_log = logging.getLogger("tidings.client")
    client_log.addHandler(handler)
    client_log.setLevel(logging.INFO)
    client_log.propagate = False


# -- top -------------------------------------------------------------------


def _top(args: argparse.Namespace) -> int:
    from .top import TopError, run

    if not args.interval > 0:
        print("tidings: --interval must be a positive number of seconds", file=sys.stderr)
        return 2
    try:
        run(
            args.url,
            api_key=args.api_key,
            metrics_token=args.metrics_token,
            interval=args.interval,
            once=args.once,
            out=sys.stdout,
            tty=sys.stdout.isatty(),
        )
    except TopError as exc:
        print(f"tidings: {exc}", file=sys.stderr)
        return 1
    return 0


# -- token and check-config ------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
SECRET_KEYS = ("api_key", "hmac_secret")


def _seconds(text: str) -> int:
    unit = _UNITS.get(text[-1:].lower())
    number = text[:-1] if unit else text
    if not number.isdigit() or int(number) <= 0:
        raise ValueError(f"--ttl {text!r}: expected a positive number with s, m, h or d")
    return int(number) * (unit or 1)


def _token(args: argparse.Namespace) -> int:
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        config = load_config(args.config, os.environ)
        ttl = _seconds(args.ttl)
        info = json.loads(args.info) if args.info else None
    except (ConfigError, ValueError) as exc:
        print(f"tidings: {exc}", file=sys.stderr)
        return 2
    now = int(time.time())
    claims: dict[str, Any] = {"sub": args.user, "iat": now, "exp": now + ttl}
    if info is not None:
        claims["info"] = info
    if args.channel:
        claims["channel"] = args.channel
    if args.channels:
        claims["channels"] = [c.strip() for c in args.channels.split(",") if c.strip()]
    key: Any
    if args.private_key:
        try:
            with open(args.private_key, "rb") as file:
                key = load_pem_private_key(file.read(), password=None)
        except (OSError, ValueError) as exc:
            print(f"tidings: cannot load {args.private_key}: {exc}", file=sys.stderr)
            return 2
        if isinstance(key, rsa.RSAPrivateKey):
            algorithm = "RS256"
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            algorithm = "ES256"
        else:
            print("tidings: --private-key must be an RSA or EC key", file=sys.stderr)
            return 2
    elif config.auth.hmac_secret:
        key, algorithm = config.auth.hmac_secret, "HS256"
    else:
        print(
            "tidings: no [auth] hmac_secret in the configuration (or TIDINGS_AUTH__HMAC_SECRET);"
            " pass --private-key to sign with RS256 or ES256",
            file=sys.stderr,
        )
        return 2
    print(jwt.encode(claims, key, algorithm=algorithm))
    return 0


def _check_config(args: argparse.Namespace) -> int:
    import msgspec

    from .auth import Access

    try:
        config = load_config(args.config, os.environ)
        access = Access(config)
    except ConfigError as exc:
        print(f"tidings: config error: {exc}", file=sys.stderr)
        return 2
    settings = msgspec.to_builtins(config)
    # Show the policy in force, not "unset": the defaults depend on the mode.
    named = [("", settings["channels"]), *settings["namespaces"].items()]
    for name, section in named:
        policy = access.policy(f"{name}:x" if name else "x")
        section.update(subscribe=policy.subscribe, publish=policy.publish)
    settings["broker"]["redis_url"] = _without_password(settings["broker"]["redis_url"])
    settings["broker"]["nats_url"] = _without_password(settings["broker"]["nats_url"])
    settings["auth"]["rsa_public_key"] = _masked(settings["auth"]["rsa_public_key"], pem=True)
    settings["auth"]["ecdsa_public_key"] = _masked(settings["auth"]["ecdsa_public_key"], pem=True)
    for section in (settings, settings["auth"]):
        for key in SECRET_KEYS:
            if key in section:
                section[key] = _masked(section[key])
    settings["admin"]["password"] = _masked(settings["admin"]["password"])
    settings["webhooks"]["secret"] = _masked(settings["webhooks"]["secret"])
    settings["webhooks"]["url"] = _without_password(settings["webhooks"]["url"])
    proxy = settings["proxy"]
    # Static headers carry what the backend checks the proxy by: a secret.
    proxy["static_headers"] = {name: "***" for name in proxy["static_headers"]}
    for key in [key for key in proxy if key.endswith("_url")]:
        proxy[key] = _without_password(proxy[key])
    if "token" in settings.get("metrics", {}):
        settings["metrics"]["token"] = _masked(settings["metrics"]["token"])
    print(json.dumps(settings, indent=2, sort_keys=True))
    mode = "secure: " + ", ".join(access.tokens.algorithms) if access.secure else "development"
    print(f"tidings: configuration is valid ({mode} mode)", file=sys.stderr)
    return 0


def _without_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if not parts.password:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (
        f":{parts.port}" if parts.port else ""
    )
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _masked(value: str, pem: bool = False) -> str:
    if not value:
        return ""
    if pem and not value.lstrip().startswith("-----BEGIN"):
        return value  # a file path is not a secret
    return "***" if not pem else "<PEM key>"
