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


def test_it_runs_serves_haproxy_with_splicing_off_and_every_argument_kept(monkeypatch):
    calls = []
    monkeypatch.setattr(haproxy_launcher.os, "execv", lambda path, argv: calls.append((path, argv)))
    monkeypatch.setattr(sys, "argv", [str(COMMAND), "-db", "-f", "/tmp/x/haproxy.cfg", "-sf", "12"])
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(COMMAND))  # as the launch scripts set it
    monkeypatch.setenv("SERVE_APP_HAPROXY_WRAPPED", "")  # unset, and restored: main() sets it
    haproxy_launcher.main()
    [(path, argv)] = calls
    assert Path(path).name == "haproxy" and Path(path).resolve() != COMMAND.resolve()
    assert argv == [path, "-dS", "-db", "-f", "/tmp/x/haproxy.cfg", "-sf", "12"]


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


SERVE_CONFIG = """global
    maxconn 4096
    tune.bufsize 16384
defaults
    mode http
    timeout connect 5s
    timeout client 3600s
    option abortonclose
    # Normalize 502/503/504 to 500 per Serve's default behavior.
    errorfile 502 {folder}/500.http
    errorfile 503 {folder}/500.http
    errorfile 504 {folder}/500.http
    balance leastconn
frontend http_frontend
    bind 127.0.0.1:18088
    default_backend default_backend
backend default_backend
    timeout server 30s
    http-request return status 404 content-type text/plain string "not found"
"""
"""The shape of the config Serve writes (its `defaults` section as Ray 2.60 fills it)."""


def parse_http_file(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status, dict(line.split(": ", 1) for line in lines), body


def test_it_makes_haproxy_wait_for_bodies_and_answer_its_own_errors_in_json(monkeypatch, tmp_path):
    """Serve's config forwards a request once its headers are in, so each client that stalls
    mid-body holds an ingress slot for up to an hour; HAProxy's own errors are text. The config
    HAProxy starts with holds the body first (408 after the timeout) and answers JSON."""
    (tmp_path / "500.http").write_bytes(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
    config = tmp_path / "haproxy.cfg"
    config.write_text(SERVE_CONFIG.format(folder=tmp_path))
    calls = []
    monkeypatch.setattr(haproxy_launcher.os, "execv", lambda path, argv: calls.append((path, argv)))
    monkeypatch.setattr(sys, "argv", [str(COMMAND), "-db", "-f", str(config), "-sf", "12"])
    monkeypatch.setenv("SERVE_APP_HAPROXY_WRAPPED", "")
    monkeypatch.delenv(haproxy_launcher.TIMEOUT_ENV, raising=False)
    haproxy_launcher.main()
    [(binary, argv)] = calls
    assert argv == [binary, "-dS", "-db", "-f", str(config), "-sf", "12"]  # Serve knows its HAProxy by that path
    text = config.read_text()
    defaults = text[text.index("defaults\n"):text.index("frontend ")]
    assert "    option http-buffer-request\n" in defaults and "    timeout http-request 30s\n" in defaults
    assert f"{tmp_path}/500.http" not in defaults  # Serve's text/plain 500 for every 502/503/504
    for status, code, retry in ((408, "request_timeout", None), (503, "service_unavailable", "1"),
                                (502, "service_unavailable", "1"), (504, "service_unavailable", "1"),
                                (500, "internal_error", None)):
        path = tmp_path / f"serve_app_{status}.http"
        assert f"    errorfile {status} {path}\n" in defaults
        line, headers, body = parse_http_file(path.read_bytes())
        answer = json.loads(body)
        sent = 503 if status in (502, 504) else status
        assert line.startswith(f"HTTP/1.1 {sent} ") and headers["Content-Type"] == "application/json"
        assert int(headers["Content-Length"]) == len(body) and headers.get("Retry-After") == retry
        assert answer["code"] == sent and answer["error"]["code"] == code and answer["message"], answer
    assert "within 30 s" in json.loads(parse_http_file((tmp_path / "serve_app_408.http").read_bytes())[2])["message"]
    # HAProxy itself takes the config; a second start (Serve reloads with the same file) adds nothing twice.
    checked = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    monkeypatch.setenv("SERVE_APP_HAPROXY_WRAPPED", "")  # the first start set it
    haproxy_launcher.main()
    assert config.read_text() == text


@pytest.mark.parametrize("value,kept", [("0", True), ("5", False)])
def test_the_request_timeout_comes_from_the_environment_and_0_keeps_serves_config(monkeypatch, tmp_path, value, kept):
    config = tmp_path / "haproxy.cfg"
    config.write_text(SERVE_CONFIG.format(folder=tmp_path))
    monkeypatch.setattr(haproxy_launcher.os, "execv", lambda path, argv: None)
    monkeypatch.setattr(sys, "argv", [str(COMMAND), "-db", "-f", str(config)])
    monkeypatch.setenv("SERVE_APP_HAPROXY_WRAPPED", "")
    monkeypatch.setenv(haproxy_launcher.TIMEOUT_ENV, value)
    haproxy_launcher.main()
    assert (config.read_text() == SERVE_CONFIG.format(folder=tmp_path)) is kept
    assert kept or "    timeout http-request 5s\n" in config.read_text()


def test_a_request_timeout_that_is_not_whole_seconds_stops_it(monkeypatch):
    monkeypatch.setenv(haproxy_launcher.TIMEOUT_ENV, "2.5")
    monkeypatch.setattr(haproxy_launcher.os, "execv", lambda *args: pytest.fail("started HAProxy"))
    monkeypatch.setenv("SERVE_APP_HAPROXY_WRAPPED", "")
    with pytest.raises(SystemExit, match="SERVE_APP_HAPROXY_REQUEST_TIMEOUT_S='2.5' is not a whole number"):
        haproxy_launcher.main()
