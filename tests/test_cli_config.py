"""The command line (serve / publish / subscribe) and configuration precedence and errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import httpx
import pytest

from conftest import clean_env, free_port
from helpers import LineReader, api, publish, unique_channel, wait_subscribers

TIDINGS = [sys.executable, "-m", "tidings"]


def run_cli(args, env=None, timeout=30, cwd=None):
    """Run ``tidings ARGS`` to completion (killed after ``timeout``)."""
    try:
        return subprocess.run(
            TIDINGS + list(args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=clean_env(env),
            stdin=subprocess.DEVNULL,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"tidings {' '.join(args)} did not exit within {timeout}s") from exc


# --------------------------------------------------------------------------- publish / subscribe


def test_cli_publish(server):
    ch = unique_channel()
    out = run_cli(["publish", ch, '{"text": "from cli"}', "--url", server.url])
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    result = result.get("result", result)
    assert isinstance(result["offset"], int)
    hist = api(server, "history", {"channel": ch, "limit": -1}).json()["result"]
    assert [(p["data"], p["offset"]) for p in hist["publications"]] == [
        ({"text": "from cli"}, result["offset"])
    ]


def test_cli_publish_with_api_key(server_factory):
    srv = server_factory('api_key = "s3cret"\n')
    ch = unique_channel()
    bad = run_cli(["publish", ch, "1", "--url", srv.url])
    assert bad.returncode != 0
    good = run_cli(["publish", ch, "1", "--url", srv.url, "--api-key", "s3cret"])
    assert good.returncode == 0, good.stderr


def test_cli_publish_rejects_invalid_json(server):
    out = run_cli(["publish", unique_channel(), "{not json", "--url", server.url])
    assert out.returncode != 0
    assert "Traceback" not in out.stderr


def test_cli_publish_works_without_the_client_extra(server):
    """The CLI shares tidings.client's calls and SSE parser, which must not need httpx."""
    ch = unique_channel()
    without_httpx = (
        "import sys; sys.modules['httpx'] = None\n"  # makes `import httpx` fail
        "import tidings.client\n"
        "try:\n"
        "    tidings.client.APIClient\n"
        "except ImportError as exc:\n"
        "    print(exc, file=sys.stderr)\n"
        "from tidings.cli import main\n"
        f"sys.exit(main(['publish', {ch!r}, '7', '--url', {server.url!r}]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", without_httpx],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert out.returncode == 0, out.stderr
    assert "tidings.client needs httpx: pip install 'tidings[client]'" in out.stderr
    assert json.loads(out.stdout)["offset"] == 1
    hist = api(server, "history", {"channel": ch, "limit": -1}).json()["result"]
    assert [p["data"] for p in hist["publications"]] == [7]


def test_cli_publish_reports_the_server_error(server):
    out = run_cli(["publish", "bad channel", "1", "--url", server.url])
    assert out.returncode == 1
    assert out.stderr.startswith("tidings: error 107: "), out.stderr
    assert "Traceback" not in out.stderr


def test_cli_subscribe_prints_json_lines(server, spawn):
    a, b = unique_channel("a"), unique_channel("b")
    proc = spawn(
        [*TIDINGS, "subscribe", a, b, "--json", "--url", server.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=clean_env(),
    )
    lines = LineReader(proc)
    wait_subscribers(server, a)
    wait_subscribers(server, b)
    r1 = publish(server, a, {"n": 1})
    r2 = publish(server, b, {"n": 2})
    got = [json.loads(lines.next()) for _ in range(2)]
    assert [(p["channel"], p["offset"], p["data"]) for p in got] == [
        (a, r1["offset"], {"n": 1}),
        (b, r2["offset"], {"n": 2}),
    ]
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=10)


def test_cli_subscribe_reconnects_after_server_restart(server_factory, spawn):
    port = free_port()
    srv = server_factory(port=port)
    ch = unique_channel()
    proc = spawn(
        [*TIDINGS, "subscribe", ch, "--json", "--url", srv.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=clean_env(),
    )
    lines = LineReader(proc)
    wait_subscribers(srv, ch)
    publish(srv, ch, "before")
    assert json.loads(lines.next())["data"] == "before"
    assert srv.stop() == 0
    srv2 = server_factory(port=port)
    wait_subscribers(srv2, ch, timeout=20)
    publish(srv2, ch, "after")
    assert json.loads(lines.next())["data"] == "after"
    assert proc.poll() is None


# --------------------------------------------------------------------------- serve options


def test_serve_with_asyncio_loop(server_factory):
    from helpers import check_serving

    srv = server_factory(args=["--loop", "asyncio"])
    check_serving(srv)


def test_flag_overrides_file(server_factory):
    srv = server_factory(f"port = {free_port()}\n")  # the factory passes --port
    assert httpx.get(srv.url + "/health").status_code == 200


def test_env_overrides_file(server_factory):
    file_port, env_port = free_port(), free_port()
    srv = server_factory(
        f"port = {file_port}\n",
        env={"TIDINGS_PORT": str(env_port)},
        port=env_port,
        port_flag=False,
    )
    assert srv.port == env_port
    assert httpx.get(srv.url + "/health").status_code == 200


def test_flag_overrides_env(server_factory):
    srv = server_factory(env={"TIDINGS_PORT": str(free_port())})  # --port wins
    assert httpx.get(srv.url + "/health").status_code == 200


def test_nested_env_overrides_file(server_factory):
    srv = server_factory("[history]\nsize = 50\n", env={"TIDINGS_HISTORY__SIZE": "2"})
    ch = unique_channel()
    offsets = [publish(srv, ch, i)["offset"] for i in range(5)]
    hist = api(srv, "history", {"channel": ch, "limit": -1}).json()["result"]
    assert [p["offset"] for p in hist["publications"]] == offsets[-2:]


def test_file_sets_values(server_factory):
    srv = server_factory("[history]\nsize = 2\n")
    ch = unique_channel()
    offsets = [publish(srv, ch, i)["offset"] for i in range(4)]
    hist = api(srv, "history", {"channel": ch, "limit": -1}).json()["result"]
    assert [p["offset"] for p in hist["publications"]] == offsets[-2:]


# --------------------------------------------------------------------------- config errors


def config_error(tmp_path, toml=None, env=None, port_flag=True):
    cmd = ["serve", "--host", "127.0.0.1"]
    if port_flag:
        cmd += ["--port", str(free_port())]
    if toml is not None:
        path = tmp_path / "bad.toml"
        path.write_text(toml)
        cmd += ["--config", str(path)]
    out = run_cli(cmd, env=env)
    assert out.returncode == 2, f"exit {out.returncode}; stderr:\n{out.stderr}"
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{out.stderr}"
    return lines[0]


def test_invalid_port_in_file(tmp_path):
    line = config_error(tmp_path, 'port = "abc"\n', port_flag=False)
    assert "port" in line


def test_invalid_nested_value_in_file(tmp_path):
    line = config_error(tmp_path, '[limits]\nmax_body_size = "big"\n')
    assert "limits.max_body_size" in line


def test_invalid_port_in_env(tmp_path):
    line = config_error(tmp_path, env={"TIDINGS_PORT": "abc"}, port_flag=False)
    assert "port" in line


def test_invalid_nested_env(tmp_path):
    line = config_error(tmp_path, env={"TIDINGS_LIMITS__MAX_BODY_SIZE": "abc"})
    assert "limits.max_body_size" in line


def test_invalid_nested_env_names_its_variable(tmp_path):
    """The error names the variable to fix, not the section's prefix."""
    line = config_error(tmp_path, env={"TIDINGS_AUTH__LEEWAY": "abc"})
    assert line.startswith("tidings: config error: auth.leeway: "), line
    assert line.endswith("(from TIDINGS_AUTH__LEEWAY)"), line


def test_invalid_namespace_value_names_namespace_and_file(tmp_path):
    line = config_error(tmp_path, '[namespaces.chat]\nsubscribe = "bogus"\n')
    assert line.startswith("tidings: config error: namespaces.chat.subscribe: "), line
    assert line.endswith(f"(from {tmp_path / 'bad.toml'})"), line


def test_invalid_namespace_value_from_env_names_its_variable(tmp_path):
    line = config_error(tmp_path, env={"TIDINGS_NAMESPACES__CHAT__SUBSCRIBE": "bogus"})
    assert line.startswith("tidings: config error: namespaces.chat.subscribe: "), line
    assert line.endswith("(from TIDINGS_NAMESPACES__CHAT__SUBSCRIBE)"), line


def test_toml_syntax_error(tmp_path):
    config_error(tmp_path, "port = = 8000\n[limits\n")


def test_unknown_top_level_key(tmp_path):
    line = config_error(tmp_path, "bogus_key = 1\n")
    assert "bogus_key" in line


def test_unknown_nested_key(tmp_path):
    line = config_error(tmp_path, "[timeouts]\nnot_a_timeout = 1.0\n")
    assert "not_a_timeout" in line


def test_missing_config_file(tmp_path):
    out = run_cli(["serve", "--port", str(free_port()), "--config", str(tmp_path / "nope.toml")])
    assert out.returncode == 2, out.stderr
    assert "nope.toml" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("flag", [["--port", "abc"], ["--loop", "nonsense"]])
def test_invalid_flags_exit_2(flag):
    out = run_cli(["serve", *flag])
    assert out.returncode == 2
    assert "Traceback" not in out.stderr


def test_port_in_use_is_a_clear_error(server):
    out = run_cli(["serve", "--host", "127.0.0.1", "--port", str(server.port)])
    assert out.returncode != 0
    output = out.stderr + out.stdout
    assert "Traceback" not in output
    assert str(server.port) in output or "in use" in output.lower()


def test_unknown_env_var(tmp_path):
    line = config_error(tmp_path, env={"TIDINGS_NO_SUCH_SETTING": "1"})
    assert "TIDINGS_NO_SUCH_SETTING" in line


def test_log_level_flag(server_factory):
    quiet = server_factory(args=["--log-level", "warning"])
    assert httpx.get(quiet.url + "/health").status_code == 200
    assert "tidings listening on" not in quiet.logs()
    loud = server_factory(args=["--log-level", "info"])
    assert f"tidings listening on {loud.url}" in loud.logs()


def test_allowed_origins_from_env(server_factory):
    srv = server_factory(env={"TIDINGS_ALLOWED_ORIGINS": "https://a.example,https://b.example"})
    for origin in ("https://a.example", "https://b.example"):
        resp = httpx.get(srv.url + "/health", headers={"Origin": origin})
        assert resp.headers.get("access-control-allow-origin") == origin
    resp = httpx.get(srv.url + "/health", headers={"Origin": "https://c.example"})
    assert "access-control-allow-origin" not in resp.headers


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("workers = 2\n", "workers"),  # several processes need a shared broker
        ("[poll]\ndefault_timeout = 90.0\n", "default_timeout"),  # over max_timeout
        ("[limits]\nmax_body_size = -1\n", "limits.max_body_size"),
        ('loop = "twisted"\n', "loop"),
    ],
    ids=["workers-with-memory-broker", "poll-default-over-max", "negative-size", "bad-loop"],
)
def test_inconsistent_or_out_of_range_values(tmp_path, toml, key):
    line = config_error(tmp_path, toml)
    assert key in line


def test_check_config_prints_no_secret(tmp_path):
    """check-config is run in front of colleagues and pasted into tickets: every
    secret the configuration may hold is masked, URLs keep no password."""
    secrets = [
        "api-key-secret-1",
        "hmac-secret-0123456789abcdef0123456789",
        "webhook-secret-2",
        "proxy-static-secret-3",
        "redis-password-4",
        "proxy-url-password-5",
        "webhook-url-password-6",
    ]
    config = tmp_path / "tidings.toml"
    config.write_text(
        f'api_key = "{secrets[0]}"\n'
        f'[auth]\nhmac_secret = "{secrets[1]}"\n'
        f'[broker]\nredis_url = "redis://u:{secrets[4]}@127.0.0.1:6379/0"\n'
        f'[webhooks]\nurl = "http://hook:{secrets[6]}@127.0.0.1:9/h"\nsecret = "{secrets[2]}"\n'
        f'[proxy]\nconnect_url = "http://p:{secrets[5]}@127.0.0.1:9/c"\n'
        f'static_headers = {{ "X-Backend-Key" = "{secrets[3]}" }}\n'
    )
    done = run_cli(["check-config", "--config", str(config)])
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    for secret in secrets:
        assert secret not in done.stdout + done.stderr
    assert printed["webhooks"]["secret"] == "***"
    assert printed["proxy"]["static_headers"] == {"X-Backend-Key": "***"}
    assert printed["proxy"]["connect_url"] == "http://p:***@127.0.0.1:9/c"
