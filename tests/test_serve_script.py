"""The README's run command, `scripts/serve.sh`, as a user runs it: it starts Ray Serve on
the fast path (HAProxy), says when every model is live, serves, and a SIGTERM stops it all
gracefully (the models withdrawn from the AI network's node), freeing the port.

Marked `cluster` so that it runs before the session's own Ray starts (see conftest), with a
Ray of its own (its own temp dir) on a free port.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from serve_app.registration import UNREGISTER_PATH
from tests.conftest import ROOT, answered_in_full, free_port, stream_in_flight, wait_for
from tests.fake_node import FakeNode

pytestmark = pytest.mark.cluster

READY_LINE = "serve.sh: ready: every model is live at"


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def stall(port: int, path: str, sent: int, length: int) -> socket.socket:
    """A client that sends its headers and `sent` bytes of a `length`-byte body, then waits."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode() + b" " * sent)
    return sock


def answer_of(sock: socket.socket, timeout: float) -> tuple[int, bytes, dict]:
    """The status, headers and JSON body of the answer that comes on `sock`."""
    sock.settimeout(timeout)
    data = b""
    with sock:
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
                re.search(rb"(?i)content-length: *(\d+)", data.partition(b"\r\n\r\n")[0]).group(1)):
            chunk = sock.recv(65536)
            assert chunk, f"closed without a whole answer: {data!r}"
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.lower(), json.loads(body)


def test_serve_script_says_when_ready_serves_and_stops_gracefully(models_dir: Path, tmp_path: Path):
    node = FakeNode().start()
    port = free_port()
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args.update(public_base_url=f"http://127.0.0.1:{port}", image_dir=str(tmp_path / "images"),
                registration={"enabled": True, "node_urls": [node.url], "timeout_s": 2},
                limits={"body_timeout_s": 4})
    args["ingress"]["max_ongoing_requests"] = 4  # fewer slots than the stalling clients below
    for model in args["models"]:
        model["cid"] = f"cid-{model['name']}"
    config_file = tmp_path / "serve_config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    ray_tmp = tempfile.mkdtemp(prefix="sss_", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "SERVE_APP_HAPROXY_REQUEST_TIMEOUT_S": "2"}
    env.pop("RAY_ADDRESS", None)  # its own Ray, never a cluster the shell names
    haproxy_dirs = set(Path("/tmp").glob("sa-hap.*"))
    # Relative to the caller's folder, as the README allows; models resolve from the repo root.
    server = subprocess.Popen([str(ROOT / "scripts" / "serve.sh"), config_file.name], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(server.stderr), daemon=True)
    reader.start()
    try:
        assert wait_for(lambda: any(READY_LINE in line for line in lines) or server.poll() is not None,
                        timeout=240, interval=0.5), "no ready line"
        assert server.poll() is None, "".join(lines[-30:])
        # Said only once /ready holds: both models answer at once.
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/ready").json() == {"ready": True, "missing": []}
        # Serve's HAProxy keeps its files in a folder of this run's (not in /tmp/haproxy-serve for ever).
        ours = set(Path("/tmp").glob("sa-hap.*")) - haproxy_dirs
        assert len(ours) == 1 and list(ours.pop().glob("*/haproxy.cfg")), ours
        answer = httpx.post(base + "/v1/chat/completions", timeout=60, json={
            "model": "Llama3-8B", "max_tokens": 4, "messages": [{"role": "user", "content": "Hello!"}]})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
        # Clients that stall mid-body, more than the ingress has slots: HAProxy holds a small
        # body's request until it is whole, never taking a slot, and answers 408 after 2 s; the
        # ingress times out a large one's pause (4 s); every other client is answered at once.
        small = [stall(port, "/v1/chat/completions", 10, 100) for _ in range(6)]
        large = stall(port, "/v1/images/edits", 40_000, 1_000_000)  # past HAProxy's 16 KiB buffer
        assert httpx.get(base + "/health", timeout=1.5).status_code == 200
        assert httpx.post(base + "/v1/chat/completions", timeout=30, json={
            "model": "Llama3-8B", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}).status_code == 200
        for sock, by_haproxy in [*((sock, True) for sock in small), (large, False)]:
            status, head, body = answer_of(sock, timeout=15)
            assert (status, body["code"], body["error"]["code"]) == (408, 408, "request_timeout"), body
            assert (b"x-request-id" not in head) is by_haproxy, head  # the ingress names each request
        assert node.wait_for(lambda: len(node.models_of("serve_app") or []) == 3, timeout=30), node.projects
        # A stream in flight when the stop comes is answered in full: HAProxy is drained before
        # Serve's shutdown kills it (which used to cut every request in flight at once).
        finished = stream_in_flight(base, "Llama3-8B")
        # What the server answers at the moment the node is told the models are gone.
        at_unregister: list[int | str] = []

        def look(path: str, body: Any) -> None:
            if path == UNREGISTER_PATH:
                try:
                    # Quick (HAProxy answers in milliseconds): the registrar waits 2 s for this node.
                    at_unregister.append(httpx.get(base + "/health", timeout=1.0).status_code)
                except httpx.HTTPError as exc:
                    at_unregister.append(type(exc).__name__)

        node.on_request = look
        # As a supervisor stops it; a terminal's Ctrl-C reaches `serve run` as the same one SIGINT
        # (test_each_stop_signal_reaches_serve_run_as_one_sigint_and_a_second_stops_it_at_once).
        server.send_signal(signal.SIGTERM)
        events = finished(90)
        assert answered_in_full(events), events[-3:]
        assert server.wait(timeout=90) == 0, "".join(lines[-30:])
        reader.join(timeout=10)
        assert any(line.startswith("serve.sh: stopping: Serve shuts down gracefully") for line in lines), lines[-30:]
        # Serve stopped gracefully: the registrar withdrew the project before its replica went.
        # (SIGTERM used to end `serve run` at once, and Ctrl-C spent Serve's whole 30 s shutdown
        # on the ingress's drain: either way the node kept forwarding to a dead port.)
        assert node.bodies(UNREGISTER_PATH) == [{"project": "serve_app"}] and node.models_of("serve_app") is None
        # ... and before the drain: while the node still forwarded, the server still answered
        # (an unregister at the replica's shutdown came after HAProxy had closed its port).
        assert at_unregister == [200], (at_unregister, [line for line in lines if "serve_run" in line])
        assert any("withdrawn from the AI network's node " + node.url in line for line in lines), lines[-30:]
        # HAProxy (a child of Serve's proxy) goes too: the port is free again, its folder removed.
        assert wait_for(lambda: port_is_free(port), timeout=30), "the port is still held"
        assert set(Path("/tmp").glob("sa-hap.*")) <= haproxy_dirs
    finally:
        if server.poll() is None:  # a failed test: stopped as a user would, else killed
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        # `serve run` ran in a process group of its own (serve.sh's `set -m`): Ray's processes
        # left by a failed stop are found by the temp dir named on their command lines.
        subprocess.run(["pkill", "-KILL", "-f", ray_tmp], check=False)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        node.stop()
    assert sum(READY_LINE in line for line in lines) == 1


@pytest.mark.parametrize("mistake,named", [
    ({"max_batch_sise": 8}, "model 'Llama3-8B' (models[0]): max_batch_sise: Extra inputs are not permitted"),
    ({"kind": "imgae"}, "model 'Llama3-8B' (models[0]): Input tag 'imgae' found using 'kind'"),
    ({"name": "SuperImage"}, "args: model name 'SuperImage' is not unique")])
def test_serve_script_refuses_a_broken_config_at_once_and_starts_nothing(tmp_path: Path, mistake, named):
    """`serve run` would start Ray and wait for ever on an application its controller cannot
    build, the error only in a retried task's traceback; serve.sh names the mistake and exits."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["applications"][0]["args"]["models"][0].update(mistake)
    config_file = tmp_path / "broken.yaml"
    config_file.write_text(yaml.safe_dump(config))
    ray_tmp = Path(tempfile.mkdtemp(prefix="sss_", dir="/tmp"))
    try:
        done = subprocess.run([str(ROOT / "scripts" / "serve.sh"), str(config_file)], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "RAY_TMPDIR": str(ray_tmp)})
        assert done.returncode == 1, done.stderr
        assert named in done.stderr, done.stderr
        assert "nothing was started" in done.stderr and not any(ray_tmp.iterdir())  # no Ray session
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# `.venv/bin/python` for a copy of serve.sh: the config check passes, the config's address is
# a port nobody listens on, and `serve_app.serve_run` stands in for `serve run`, logging each
# signal it gets (a first SIGINT: it keeps running, as a graceful stop under way does).
FAKE_PYTHON = """#!/usr/bin/env bash
case "$1 $2" in
  "-m serve_app.check_config"*) exit 0 ;;
  "- "*) cat >/dev/null; echo "127.0.0.1 1 /"; exit 0 ;;
esac
log="$(dirname "$0")/../../signals.log"
trap 'echo INT >>"$log"' INT
trap 'echo TERM >>"$log"; exit 0' TERM
echo "started $$" >>"$log"
while :; do sleep 0.05; done
"""


@pytest.mark.parametrize("signum, to_group", [(signal.SIGHUP, False), (signal.SIGQUIT, False),
                                             (signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True)],
                         ids=["SIGHUP", "SIGQUIT", "SIGTERM", "SIGINT", "ctrl_c"])
def test_each_stop_signal_reaches_serve_run_as_one_sigint_and_a_second_stops_it_at_once(tmp_path: Path, signum,
                                                                                      to_group):
    """Whatever stops serve.sh (the terminal closed: SIGHUP; a supervisor: SIGTERM; `kill -INT`;
    Ctrl-C: SIGINT to the terminal's foreground process group, serve.sh's) becomes the one
    SIGINT on which `serve run` stops gracefully; a second signal ends it at once (SIGTERM)."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "serve.sh", tmp_path / "scripts" / "serve.sh")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    log = tmp_path / "signals.log"
    said = tmp_path / "stderr.log"
    with said.open("w") as stderr:
        script = subprocess.Popen([str(tmp_path / "scripts" / "serve.sh")], cwd=tmp_path, stderr=stderr,
                                  stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_for(lambda: log.exists() and "started" in log.read_text(), timeout=20)
        def stop() -> None:
            os.killpg(script.pid, signum) if to_group else script.send_signal(signum)

        stop()
        assert wait_for(lambda: "INT" in log.read_text(), timeout=10), log.read_text()
        assert script.poll() is None  # waiting for the graceful stop
        stop()
        assert script.wait(timeout=10) == 0
        assert [line.split()[0] for line in log.read_text().splitlines()] == ["started", "INT", "TERM"]
        assert "serve.sh: stopping: Serve shuts down gracefully" in said.read_text()
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
            script.wait()
        # The stand-in runs in a process group of its own (serve.sh's `set -m`).
        for line in log.read_text().splitlines() if log.exists() else []:
            if line.startswith("started "):
                subprocess.run(["pkill", "-KILL", "-g", line.split()[1]], check=False)


def test_a_closed_terminal_does_not_stop_the_graceful_stop_from_writing():
    """After the terminal closes, a write to it fails (EIO); `serve run` logs before it shuts
    Serve down, so that failure skipped the shutdown. The stop sends output to /dev/null first."""
    import pty

    from serve_app.serve_run import detach_from_a_gone_terminal

    pid, terminal = pty.fork()
    if pid == 0:  # the child: stdout and stderr are the terminal
        code = 3
        try:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as serve_run, which serve.sh signals itself
            time.sleep(1.0)  # the terminal closes meanwhile
            try:
                os.write(2, b"")
                code = 4  # the terminal still takes writes: nothing tested
            except OSError:
                detach_from_a_gone_terminal()
                print("Got KeyboardInterrupt, shutting down...", file=sys.stderr, flush=True)
                print("and on stdout", flush=True)
                code = 0
        finally:
            os._exit(code)
    time.sleep(0.3)
    os.close(terminal)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_an_haproxy_that_ended_is_not_waited_on_though_its_parent_has_not_reaped_it():
    """The drain waits on HAProxy processes that are Serve's proxy's children, not its own: one
    that has ended stays a zombie until its parent reaps it, and psutil's wait waited on it to
    the drain's timeout."""
    import psutil

    from serve_app.haproxy_drain import _running

    ended = subprocess.Popen(["true"])  # ended, and not reaped until wait() below
    try:
        assert wait_for(lambda: psutil.Process(ended.pid).status() == psutil.STATUS_ZOMBIE, timeout=10, interval=0.05)
        assert not _running(psutil.Process(ended.pid))
        assert _running(psutil.Process())
    finally:
        ended.wait()
