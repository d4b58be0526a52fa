"""`serve-app-haproxy`, the HAProxy the launch scripts give Serve (no Ray: the command alone).

That its `-dS` matters is tested behind a real HAProxy on the local cluster
(`test_cluster.test_clients_that_time_out_stop_their_generation_behind_haproxy`)."""

from __future__ import annotations

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
