"""`serve-app-haproxy`, the HAProxy the launch scripts give Serve (no Ray: the command alone).

That its `-dS` matters is tested behind a real HAProxy on the local cluster
(`test_cluster.test_clients_that_time_out_stop_their_generation_behind_haproxy`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve_app import haproxy_launcher

COMMAND = Path(sys.executable).parent / "serve-app-haproxy"


def test_it_runs_serves_haproxy_with_splicing_off_and_every_argument_kept(monkeypatch, tmp_path):
    calls = []
    config = str(tmp_path / "haproxy.cfg")  # none there: nothing to rewrite
    monkeypatch.setattr(haproxy_launcher.os, "execv", lambda path, argv: calls.append((path, argv)))
    monkeypatch.setattr(sys, "argv", [str(COMMAND), "-db", "-f", config, "-sf", "12"])
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(COMMAND))  # as the launch scripts set it
    monkeypatch.setenv("SERVE_APP_HAPROXY_WRAPPED", "")  # unset, and restored: main() sets it
    haproxy_launcher.main()
    [(path, argv)] = calls
    assert Path(path).name == "haproxy" and Path(path).resolve() != COMMAND.resolve()
    assert argv == [path, "-dS", "-db", "-f", config, "-sf", "12"]


@pytest.mark.skipif(not COMMAND.exists(), reason="the package's commands are not installed beside this python")
def test_the_installed_command_starts_haproxy_even_where_the_variable_names_it():
    """Ray's own lookup, which the command reuses, returns RAY_SERVE_HAPROXY_BINARY_PATH first:
    the command must not run itself (that looped, appending -dS, until Serve gave up)."""
    env = {**os.environ, "RAY_SERVE_HAPROXY_BINARY_PATH": str(COMMAND)}
    done = subprocess.run([str(COMMAND), "-v"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.startswith("HAProxy version"), done.stdout + done.stderr


def test_a_haproxy_that_runs_the_command_again_is_refused(monkeypatch):
    """A `haproxy` script on PATH that calls serve-app-haproxy: the second start stops at once."""
    monkeypatch.setenv("SERVE_APP_HAPROXY_WRAPPED", "1")
    monkeypatch.setattr(haproxy_launcher.os, "execv", lambda *args: pytest.fail("ran HAProxy again"))
    with pytest.raises(SystemExit, match="runs serve-app-haproxy again"):
        haproxy_launcher.main()


def serves_config(folder: Path, routed: bool = True) -> Path:
    """The HAProxy config Ray's Serve writes (its own generator, no Ray started), in `folder`:
    routing to an application at "/", or (`routed` false) to none yet, as while Serve starts."""
    from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig

    config = folder / "haproxy.cfg"
    backends = {"serve_app": BackendConfig(name="serve_app", path_prefix="/")} if routed else {}
    api = HAProxyApi(HAProxyConfig(socket_path=str(folder / "admin.sock"), server_state_base=str(folder),
                                   server_state_file=str(folder / "server-state")), config_file_path=str(config),
                     backend_configs=backends)
    api._generate_config_file_internal()
    return config


def defaults_of(config: Path) -> str:
    text = config.read_text()
    return text[text.index("\ndefaults\n"):text.index("\nfrontend ") + 1]


def parse_http_file(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status, dict(line.split(": ", 1) for line in lines), body


def start(monkeypatch, config: Path, timeout: str | None = None) -> list:
    """main() as Serve runs it on `config`, HAProxy's start recorded, not run."""
    calls: list = []
    monkeypatch.setattr(haproxy_launcher.os, "execv", lambda path, argv: calls.append((path, argv)))
    monkeypatch.setattr(sys, "argv", [str(COMMAND), "-db", "-f", str(config), "-sf", "12"])
    monkeypatch.setenv("SERVE_APP_HAPROXY_WRAPPED", "")
    if timeout is None:
        monkeypatch.delenv(haproxy_launcher.TIMEOUT_ENV, raising=False)
    else:
        monkeypatch.setenv(haproxy_launcher.TIMEOUT_ENV, timeout)
    haproxy_launcher.main()
    return calls


def test_it_makes_haproxy_wait_for_bodies_and_answer_its_own_errors_in_json(monkeypatch, tmp_path):
    """Serve's config forwards a request once its headers are in, so each client that stalls
    mid-body holds an ingress slot for up to an hour; HAProxy's own errors are text. The config
    HAProxy starts with holds the body first (408 after the timeout) and answers JSON."""
    config = serves_config(tmp_path)
    assert "errorfile 503" in defaults_of(config)  # Serve's text/plain 500 for 502/503/504
    [(binary, argv)] = start(monkeypatch, config)
    assert argv == [binary, "-dS", "-db", "-f", str(config), "-sf", "12"]  # Serve knows its HAProxy by that path
    defaults = defaults_of(config)
    for line in ("option http-buffer-request", "timeout http-request 30s", "option http-ignore-probes"):
        assert f"\n    {line}\n" in defaults
    for status, code, headers in ((408, "request_timeout", {}), (500, "internal_error", {}), (502, "bad_gateway", {}),
                                  (503, "service_unavailable", {"Retry-After": "1"}),
                                  (504, "timeout", {"x-should-retry": "false"})):
        path = tmp_path / f"serve_app_{status}.http"
        assert [line.split()[-1] for line in defaults.splitlines()
                if line.split()[:2] == ["errorfile", str(status)]] == [str(path)]  # Serve's own dropped
        line, sent, body = parse_http_file(path.read_bytes())
        answer = json.loads(body)
        assert line.startswith(f"HTTP/1.1 {status} ") and sent["Content-Type"] == "application/json"
        assert int(sent["Content-Length"]) == len(body) and headers.items() <= sent.items()
        assert answer["code"] == status and answer["error"]["code"] == code and answer["message"], answer
    assert "within 30 s" in json.loads(parse_http_file((tmp_path / "serve_app_408.http").read_bytes())[2])["message"]
    # A path outside every route_prefix: JSON, not Serve's text/plain 404.
    assert "status 404 content-type text/plain" not in config.read_text()
    assert f"status 404 content-type application/json hdr Cache-Control no-cache file {tmp_path}/serve_app_404.json" \
        in config.read_text()
    unrouted = json.loads((tmp_path / "serve_app_404.json").read_text())
    assert unrouted["code"] == 404 and unrouted["error"]["code"] == "route_not_found" and "route_prefix" in unrouted["message"]
    # Headers Serve decodes as UTF-8 are dropped where they hold other bytes: the frontend's first rules.
    frontend = config.read_text().split(haproxy_launcher.HTTP_FRONTEND + "\n", 1)[1]
    rules = [line.strip() for line in frontend.splitlines() if line.strip().startswith("http-request")]
    assert [rule.split()[2] for rule in rules[:2]] == list(haproxy_launcher.DECODED_HEADERS), rules[:3]
    # HAProxy itself takes the config; a second start (Serve reloads with the same file) adds nothing twice.
    checked = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    text = config.read_text()
    start(monkeypatch, config)
    assert config.read_text() == text


@pytest.mark.parametrize("folder_length, own_socket", [(75, True), (84, False)])
def test_each_haproxy_gets_an_admin_socket_of_its_own_where_its_path_fits(monkeypatch, folder_length, own_socket):
    """The drain's admin socket, one per HAProxy process (Serve's own is shared by the old and
    the new process through a reload). In Serve's default folder (/tmp/haproxy-serve/<node id>,
    75 characters) it fits HAProxy's 97-character limit, with the largest pid; in a longer
    folder there is none, and HAProxy still starts (a path too long is a fatal config error)."""
    import tempfile

    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        folder = base / ("n" * (folder_length - len(str(base)) - 1))
        folder.mkdir()
        config = serves_config(folder)
        monkeypatch.setattr(os, "getpid", lambda: 4194304)  # Linux's largest
        [(binary, _)] = start(monkeypatch, config)
        sockets = [line.split()[2] for line in config.read_text().splitlines() if line.split()[:2] == ["stats", "socket"]]
        assert (str(folder / "sa.4194304.sock") in sockets) is own_socket, sockets
        checked = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        # The next process (a reload) has its own in its place.
        monkeypatch.setattr(os, "getpid", lambda: 77)
        start(monkeypatch, config)
        sockets = [line.split()[2] for line in config.read_text().splitlines() if line.split()[:2] == ["stats", "socket"]]
        assert [s for s in sockets if "/sa." in s] == [str(folder / "sa.77.sock")]
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def test_while_no_application_is_routed_every_path_is_a_503_to_retry_not_a_404(monkeypatch, tmp_path):
    """Serve adds an application's route once its ingress replica is up: for about 10 s after
    `serve run` every request got the 404 `route_not_found`, which the openai client does not
    retry and a user takes for a wrong URL."""
    config = serves_config(tmp_path, routed=False)
    [(binary, _)] = start(monkeypatch, config)
    until = int((tmp_path / "serve_app_503.json").stat().st_mtime) + haproxy_launcher.STARTING_WINDOW_S
    text = config.read_text()
    # Only for the window after Serve first starts HAProxy: a route still missing after it is
    # none coming (an application that failed to deploy, or was deleted), the 404 again.
    starting_line = (f"status 503 content-type application/json hdr Cache-Control no-cache hdr Retry-After 1 "
                     f"file {tmp_path}/serve_app_503.json if {{ date lt {until} }}")
    assert starting_line in text and text.index(starting_line) < text.index("status 404 content-type application/json")
    starting = json.loads((tmp_path / "serve_app_503.json").read_text())
    assert starting["code"] == 503 and starting["error"]["code"] == "service_unavailable"
    assert "starting" in starting["message"]
    checked = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # A reload (`-sf OLD_PID`) keeps the window's start; gRPC's own backends route no application.
    os.utime(tmp_path / "serve_app_503.json", (until - 1000, until - 1000))
    serves_config(tmp_path, routed=False)
    monkeypatch.setattr(sys, "argv", [str(COMMAND), "-db", "-f", str(config), "-sf", "12"])
    haproxy_launcher.add_our_defaults(config, 30, first_start=False)
    assert f"if {{ date lt {until - 1000 + haproxy_launcher.STARTING_WINDOW_S} }}" in config.read_text()
    assert not haproxy_launcher.routes_an_application(
        "backend default_backend\nbackend default_grpc_backend\nbackend grpc_fallback_backend\nlisten stats\n")
    assert haproxy_launcher.routes_an_application("backend default_backend\nbackend serve_app-via-ingress-request-router\n")


@pytest.mark.parametrize("value,timeout", [("0", None), ("5", "5s"), ("2.5", "30s")])
def test_the_request_timeout_comes_from_the_environment_and_0_keeps_only_the_json_errors(
        monkeypatch, tmp_path, capsys, value, timeout):
    config = serves_config(tmp_path)
    start(monkeypatch, config, value)
    defaults = defaults_of(config)
    assert f"errorfile 503 {tmp_path}/serve_app_503.http" in defaults
    assert ("option http-buffer-request" in defaults) is (timeout is not None)
    assert timeout is None or f"timeout http-request {timeout}\n" in defaults
    assert ("is not a whole number of seconds; using 30" in capsys.readouterr().err) is (value == "2.5")


def test_a_config_it_cannot_rewrite_starts_haproxy_as_serve_wrote_it(monkeypatch, tmp_path, capsys):
    config = serves_config(tmp_path)
    written = config.read_text()
    monkeypatch.setattr(haproxy_launcher, "with_our_defaults", lambda *args: 1 / 0)
    assert start(monkeypatch, config)  # HAProxy started all the same
    assert config.read_text() == written and "left as Serve wrote it: ZeroDivisionError" in capsys.readouterr().err
