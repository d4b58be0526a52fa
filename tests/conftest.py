"""Shared fixtures: tiny models, one Ray Serve instance per test session, real HTTP.

The suite starts its own Ray (and stops it), deploys `serve_config.yaml`'s
application with its paths and URLs pointed at this session's folders and a
free port, and talks to it over HTTP like any client.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The multi-node cluster's tests first, before the session's own Ray starts: that Ray
    stays up to the end, and its idle replicas and controller would share the cores with
    three more raylets (on 2 cores this made the cluster module half again as slow)."""
    items.sort(key=lambda item: item.get_closest_marker("cluster") is None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The tiny default models, built once (idempotent) where serve_config.yaml expects them."""
    from serve_app.tiny_models import build_all

    build_all(ROOT / "models")
    return ROOT / "models"


def default_args() -> dict[str, Any]:
    """The application args of the shipped serve_config.yaml."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    return copy.deepcopy(config["applications"][0]["args"])


class ServeCluster:
    """A Ray + Serve instance on a free port; deploys apps built from config args."""

    def __init__(self, port: int, image_dir: Path) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.image_dir = image_dir

    def args(self, route_prefix: str = "/", **overrides: Any) -> dict[str, Any]:
        args = default_args()
        for model in args["models"]:
            model["path"] = str(ROOT / model["path"])
        args.update(image_dir=str(self.image_dir),
                    public_base_url=self.base_url + route_prefix.rstrip("/"))
        args.update(overrides)
        return args

    def deploy(self, args: dict[str, Any], name: str = "serve_app", route_prefix: str = "/") -> str:
        """Deploy (or redeploy) an application and wait until it is running; returns its base URL."""
        from ray import serve

        from serve_app.app import build_app
        from serve_app.config import AppConfig

        serve.run(build_app(AppConfig.model_validate(args)), name=name, route_prefix=route_prefix)
        return self.base_url + route_prefix.rstrip("/")


@pytest.fixture
def serve_caplog(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    """`caplog` that sees the "ray.serve" logger: once Serve configures it in this process it
    stops propagating to the root logger, where pytest listens."""
    monkeypatch.setattr(logging.getLogger("ray.serve"), "propagate", True)
    return caplog


METRICS_REPORT_INTERVAL_MS = 1000  # Ray's floor
# As scripts/serve.sh runs Ray, unless the shell says otherwise: with it unset, Ray 2.60 turns
# token auth on, and the tests' ray.init would write ~/.ray/auth_token, which then switches
# token auth on for the user's own `ray start` and `serve deploy` (README, "Authentication").
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
SERVING_SWITCHES = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED")


@pytest.fixture(scope="session")
def cluster(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    import ray
    from ray import serve

    port = free_port()
    # Replica logs buffered as under RAY_SERVE_THROUGHPUT_OPTIMIZED (the default launch's), so
    # the tests read them as an operator would: written by the replicas' periodic flush.
    # Metrics exported every second rather than every 10: the metrics test waits for them to settle.
    # A Ray of its own (`address="local"`: never a cluster the shell's RAY_ADDRESS or a running
    # `ray start` offers, whose Serve apps the teardown would shut down), on Serve's default
    # proxy whatever the shell exports (the default launch's switches are tested on the
    # multi-node cluster, `test_cluster`).
    pinned = {name: os.environ.pop(name, None) for name in SERVING_SWITCHES}
    try:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 _system_config={"metrics_report_interval_ms": METRICS_REPORT_INTERVAL_MS},
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                           "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000"}})
    finally:
        os.environ.update({name: value for name, value in pinned.items() if value is not None})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield ServeCluster(port, tmp_path_factory.mktemp("images"))
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def server(cluster: ServeCluster) -> str:
    """Base URL of the default application (serve_config.yaml's models).

    Loopback is refused as an image URL by default; the tests allow 127.0.0.1 so that an
    edit can fetch from a test's own HTTP server (its images by URL are read from the store).
    """
    return cluster.deploy(cluster.args(image_input={"allowed_hosts": ["127.0.0.1"]}))


@pytest.fixture(scope="session")
def http(server: str):
    with httpx.Client(base_url=server, timeout=120) as client:
        yield client


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.5) -> bool:
    """Poll until `predicate()` is true; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def stream_in_flight(base_url: str, model: str, max_tokens: int = 400) -> Callable[[float], list[str]]:
    """Start a chat stream of `max_tokens` tokens (end of sequence held back) on a thread, and
    wait for its first event; returns a function that waits for its end and gives its events."""
    import threading

    events: list[str] = []
    opened = threading.Event()

    def read() -> None:
        with httpx.stream("POST", base_url + "/v1/chat/completions", timeout=120, json={
                "model": model, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
                "logit_bias": {"2": -100, "5": -100}, "messages": [{"role": "user", "content": "Hello!"}]}) as sse:
            for line in sse.iter_lines():
                events.extend([line] if line else [])
                opened.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert opened.wait(timeout=60), "the stream never began"

    def finished(timeout: float) -> list[str]:
        reader.join(timeout=timeout)
        return events

    return finished


def answered_in_full(events: list[str], tokens: int = 400) -> bool:
    """Whether a stream's events end with its usage (`tokens` made) and [DONE]."""
    import json

    return len(events) > 1 and events[-1] == "data: [DONE]" and \
        json.loads(events[-2].removeprefix("data: "))["usage"]["completion_tokens"] == tokens
