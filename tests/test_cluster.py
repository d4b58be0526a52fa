"""Multi-node: the cluster manifests, and serve_app on a real three-raylet Ray cluster.

The fast tests check that cluster/rayservice.yaml and cluster/serve_config.cluster.yaml
are what cluster/make_rayservice.py makes of serve_config.yaml (so they cannot drift),
and that cluster/cluster-launcher.yaml passes Ray's own cluster-config schema.

The others start `cluster/local_cluster.sh` (a head and two worker raylets on this
machine, with the custom resources `node_a` / `node_b`), deploy configs onto it with
the script (`serve deploy`), and talk HTTP to it like any client. Run them alone with
`pytest -m cluster`; on a shared machine, under the Ray lock:

    flock /tmp/serve_app_ray.lock .venv/bin/python -m pytest tests/test_cluster.py -q
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import ROOT, free_port, wait_for

pytestmark = pytest.mark.cluster

CLUSTER = ROOT / "cluster"
SCRIPT = CLUSTER / "local_cluster.sh"
APP = "serve_app"
MESSAGES = [{"role": "user", "content": "Hello there"}]


def _load(name: str) -> ModuleType:
    """A module of cluster/ (not a package) by file name."""
    spec = importlib.util.spec_from_file_location(f"cluster_{name}", CLUSTER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- manifests (no Ray)
def test_rayservice_manifest_matches_serve_config(capsys):
    make = _load("make_rayservice")
    assert make.main(["--check"]) == 0, capsys.readouterr().out  # the diff, when stale

    source = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    overrides = yaml.safe_load((CLUSTER / "overrides.yaml").read_text())
    expected = make.cluster_serve_config(source, overrides)
    docs = list(yaml.safe_load_all((CLUSTER / "rayservice.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "RayService")
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve == expected == yaml.safe_load((CLUSTER / "serve_config.cluster.yaml").read_text())

    # Same models as serve_config.yaml, on GPUs, reading from and writing to the shared volume.
    names = [m["name"] for m in source["applications"][0]["args"]["models"]]
    args = serve["applications"][0]["args"]
    assert [m["name"] for m in args["models"]] == names
    assert all(m["deployment"]["num_gpus"] >= 1 for m in args["models"])
    assert all(m["path"].startswith("/data/") or not m["path"].startswith(("/", ".")) for m in args["models"])
    assert args["image_dir"].startswith("/data/")

    from serve_app.config import AppConfig

    AppConfig.model_validate(args)  # still a valid application config

    cluster = service["spec"]["rayClusterConfig"]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
    for pod in (cluster["headGroupSpec"]["template"]["spec"], worker):
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]]
        assert claims == [pvc["metadata"]["name"]]
        container = pod["containers"][0]
        assert {"name": "shared-data", "mountPath": "/data"} in container["volumeMounts"]
        assert {"name": "serve", "containerPort": serve["http_options"]["port"]} in container["ports"]
        assert {"name": "RAY_AUTH_MODE", "value": "disabled"} in container["env"]


def test_cluster_launcher_config_is_valid():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "cluster-launcher.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # with Ray's AWS defaults filled in, as `ray up` does
    assert config["available_node_types"]["ray.worker.gpu"]["node_config"]["InstanceType"].startswith("g")
    assert any("serve_app" in c for c in config["setup_commands"])


def test_local_config_rendering(tmp_path):
    tool = _load("cluster_tool")
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    rendered = tool.render_config(config, ROOT, http_port=18123, http_host="127.0.0.1")
    assert rendered["http_options"] == {"host": "127.0.0.1", "port": 18123}
    args = rendered["applications"][0]["args"]
    assert args["public_base_url"] == "http://127.0.0.1:18123"
    assert args["image_dir"] == str(ROOT / "generated_images")
    assert [m["path"] for m in args["models"]] == [str(ROOT / "models/tiny-llama"), str(ROOT / "models/tiny-sd")]
    assert tool.render_config({"applications": [{"name": "a", "args": {"models": [
        {"path": "org/model"}]}}]}, tmp_path, 1088)["applications"][0]["args"]["models"][0]["path"] == "org/model"


# --------------------------------------------------------------------------- the local cluster
class LocalCluster:
    """The cluster of cluster/local_cluster.sh, driven through the script and plain HTTP."""

    def __init__(self, cluster_dir: Path, image_dir: Path) -> None:
        self.dir = cluster_dir
        self.image_dir = image_dir
        self.http_port = free_port()
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        self.env = {
            **os.environ,
            "SERVE_APP_CLUSTER_DIR": str(cluster_dir),
            "SERVE_APP_GCS_PORT": str(free_port()),
            "SERVE_APP_DASHBOARD_PORT": self.dashboard.rsplit(":", 1)[1],
            "SERVE_APP_HTTP_PORT": str(self.http_port),
            "SERVE_APP_HTTP_HOST": "127.0.0.1",
            "SERVE_APP_PORT_BASE": "31000",  # not the script's default 30000: a user's cluster may run
            "SERVE_APP_DEPLOY_TIMEOUT_S": "240",
            # What a process that called ray.init() hands down; the script must not inherit it.
            "RAY_AUTH_MODE": "token",
            # Autoscaling reacts within seconds instead of Ray's 10 s metric pushes.
            "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
            "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
        }
        self.deployed: dict[str, Any] | None = None
        self._count = 0

    def script(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([str(SCRIPT), *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout)
        sys.stderr.write(f"$ local_cluster.sh {' '.join(args)} -> {result.returncode}\n"
                         f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
        if check and result.returncode != 0:
            raise AssertionError(f"local_cluster.sh {' '.join(args)} failed:\n{result.stderr[-4000:]}")
        return result

    # -- configs
    def config(self, models: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "proxy_location": "EveryNode",
            "http_options": {"host": "127.0.0.1", "port": self.http_port},
            "logging_config": {"encoding": "TEXT", "log_level": "INFO", "enable_access_log": False},
            "applications": [{
                "name": APP,
                "route_prefix": "/",
                "import_path": "serve_app.app:build_app",
                "args": {
                    "project": "cluster_test",
                    "public_base_url": self.base_url,
                    "image_dir": str(self.image_dir),
                    "catalog_ttl_s": 0.5,
                    "ingress": {"num_replicas": 1, "num_cpus": 0.1},
                    "models": models,
                },
            }],
        }

    def deploy(self, models: list[dict[str, Any]]) -> None:
        """`local_cluster.sh deploy` of a config with these models (skipped if it is live already)."""
        config = self.config(models)
        if config == self.deployed:
            return
        self._count += 1
        path = self.dir / f"test_config_{self._count}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.deployed = None
        self.script("deploy", str(path))
        self.deployed = config

    # -- what Serve reports
    def details(self) -> dict[str, Any]:
        return httpx.get(self.dashboard + "/api/serve/applications/", timeout=30).json()

    def replicas(self, model: str, state: str = "RUNNING") -> list[dict[str, Any]]:
        app = self.details()["applications"].get(APP) or {}
        deployment = (app.get("deployments") or {}).get(f"model_{model}") or {}
        return [r for r in deployment.get("replicas") or [] if r.get("state") == state]

    def node_with(self, resource: str) -> str:
        from ray.util.state import list_nodes

        nodes = [n for n in list_nodes(address=self.dashboard, limit=100)
                 if n.state == "ALIVE" and resource in (n.resources_total or {})]
        assert len(nodes) == 1, nodes
        return nodes[0].node_id

    def listed(self) -> dict[str, dict[str, Any]]:
        body = httpx.get(self.base_url + "/v1/models", timeout=30).json()
        return {m["id"]: m for m in body["data"]}


@pytest.fixture(scope="module")
def local_cluster(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    tool = _load("cluster_tool")
    # Short: Ray's socket paths live under it and Unix sockets allow ~107 bytes.
    cluster_dir = Path(tempfile.mkdtemp(prefix="sacl", dir="/tmp"))
    cluster = LocalCluster(cluster_dir, tmp_path_factory.mktemp("cluster_images"))
    started = time.monotonic()
    try:
        cluster.script("start", timeout=240)
        sys.stderr.write(f"cluster started in {time.monotonic() - started:.1f}s\n")
        yield cluster
    finally:
        cluster.script("stop", timeout=120, check=False)
        leftovers = tool.tagged_processes(str(cluster_dir))
        shutil.rmtree(cluster_dir, ignore_errors=True)
        assert not leftovers, f"local_cluster.sh stop left processes running: {leftovers}"


def chat_model(name: str = "chat-a", node: str = "node_a", **deployment: Any) -> dict[str, Any]:
    return {"name": name, "kind": "chat", "path": str(ROOT / "models" / "tiny-llama"),
            "default_max_tokens": 8,
            "deployment": {"num_cpus": 0.1, "resources": {node: 0.1}, "max_ongoing_requests": 4,
                           **deployment}}


def image_model(name: str = "image-b", node: str = "node_b") -> dict[str, Any]:
    return {"name": name, "kind": "image", "path": str(ROOT / "models" / "tiny-sd"),
            "default_size": "64x64", "default_steps": 1,
            "deployment": {"num_replicas": 1, "num_cpus": 0.1, "resources": {node: 0.1}}}


BASE = [chat_model(num_replicas=1), image_model()]
SCALED = [chat_model(num_replicas=2), image_model()]
# image-b removed; chat-a autoscales 1..3; chat-zero starts with no replica at all.
AUTOSCALED = [
    chat_model(max_ongoing_requests=2, autoscaling_config={
        "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1,
        "upscale_delay_s": 1, "downscale_delay_s": 3}),
    chat_model("chat-zero", node="node_b", autoscaling_config={
        "min_replicas": 0, "max_replicas": 1, "target_ongoing_requests": 1,
        "upscale_delay_s": 0, "downscale_delay_s": 600}),
]


def chat(client: httpx.Client, model: str, max_tokens: int = 4) -> httpx.Response:
    return client.post("/v1/chat/completions",
                       json={"model": model, "max_tokens": max_tokens, "messages": MESSAGES})


class RequestStream:
    """Chat requests back to back from `threads` threads until stopped; every failure is kept."""

    def __init__(self, base_url: str, model: str, threads: int = 2, max_tokens: int = 4) -> None:
        self.base_url, self.model, self.max_tokens = base_url, model, max_tokens
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=120) as client:
            while not self._stop.is_set():
                try:
                    response = chat(client, self.model, self.max_tokens)
                    failure = None if response.status_code == 200 else \
                        f"{response.status_code} {response.text[:300]}"
                except httpx.HTTPError as exc:
                    failure = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    if failure:
                        self.failures.append(failure)
                    else:
                        self.ok += 1

    def __enter__(self) -> "RequestStream":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=150)


def test_replicas_land_on_the_raylets_their_resources_name(local_cluster: LocalCluster):
    local_cluster.deploy(BASE)
    node_a, node_b = local_cluster.node_with("node_a"), local_cluster.node_with("node_b")
    assert node_a != node_b
    assert [r["node_id"] for r in local_cluster.replicas("chat-a")] == [node_a]
    assert [r["node_id"] for r in local_cluster.replicas("image-b")] == [node_b]

    with httpx.Client(base_url=local_cluster.base_url, timeout=120) as http:
        assert set(local_cluster.listed()) == {"chat-a", "image-b"}
        answer = chat(http, "chat-a")
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
        # The image is drawn on node_b; its URL is served through the ingress and proxies.
        image = http.post("/v1/images/generations", json={"model": "image-b", "prompt": "an otter"})
        assert image.status_code == 200, image.text
        url = image.json()["data"][0]["url"]
        assert url.startswith(local_cluster.base_url + "/v1/files/images/")
        for _ in range(3):  # new connections: any node's proxy may take them
            fetched = httpx.get(url, timeout=30)
            assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")


def test_more_replicas_by_redeploy_without_failing_requests(local_cluster: LocalCluster):
    local_cluster.deploy(BASE)
    node_a = local_cluster.node_with("node_a")
    image_replicas = [r["replica_id"] for r in local_cluster.replicas("image-b")]
    with RequestStream(local_cluster.base_url, "chat-a") as stream:
        assert wait_for(lambda: stream.ok >= 4, timeout=60)
        local_cluster.deploy(SCALED)  # waits until the application is RUNNING again
        assert wait_for(lambda: len(local_cluster.replicas("chat-a")) == 2, timeout=60)
        served = stream.ok
        assert wait_for(lambda: stream.ok >= served + 6, timeout=60)
    assert stream.failures == [], stream.failures[:5]
    assert [r["node_id"] for r in local_cluster.replicas("chat-a")] == [node_a, node_a]
    assert len(local_cluster.replicas("image-b")) == 1
    # Serve versions an application by its `args`: any change rolls every replica.
    restarted = image_replicas != [r["replica_id"] for r in local_cluster.replicas("image-b")]
    sys.stderr.write(f"scale-up: {stream.ok} requests, image-b replica restarted: {restarted}\n")


def test_removed_model_is_unlisted_and_404_while_the_other_serves(local_cluster: LocalCluster):
    local_cluster.deploy(SCALED)
    with RequestStream(local_cluster.base_url, "chat-a") as stream:
        assert wait_for(lambda: stream.ok >= 4, timeout=60)
        local_cluster.deploy(AUTOSCALED)
        assert wait_for(lambda: "image-b" not in local_cluster.listed(), timeout=30)
        served = stream.ok
        assert wait_for(lambda: stream.ok >= served + 6, timeout=60)
    assert stream.failures == [], stream.failures[:5]
    assert "chat-a" in local_cluster.listed()
    assert "model_image-b" not in local_cluster.details()["applications"][APP]["deployments"]
    gone = httpx.post(local_cluster.base_url + "/v1/images/generations",
                      json={"model": "image-b", "prompt": "an otter"}, timeout=60)
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "model"


def test_autoscaling_up_under_load_and_back_down(local_cluster: LocalCluster):
    local_cluster.deploy(AUTOSCALED)
    assert wait_for(lambda: len(local_cluster.replicas("chat-a")) == 1, timeout=120)
    peak = 0
    started = time.monotonic()
    with RequestStream(local_cluster.base_url, "chat-a", threads=6, max_tokens=16) as load:
        def scaled_up() -> bool:
            nonlocal peak
            peak = max(peak, len(local_cluster.replicas("chat-a")))
            return peak >= 2
        assert wait_for(scaled_up, timeout=120, interval=1), "no replica was added under load"
        up_s = time.monotonic() - started
    assert load.failures == [], load.failures[:5]
    assert all(r["node_id"] == local_cluster.node_with("node_a") for r in local_cluster.replicas("chat-a"))
    calm = time.monotonic()
    assert wait_for(lambda: len(local_cluster.replicas("chat-a")) == 1, timeout=150, interval=1), \
        "replicas were not removed after the load stopped"
    sys.stderr.write(f"autoscaling: up to {peak} in {up_s:.1f}s, {load.ok} requests; "
                     f"down to 1 in {time.monotonic() - calm:.1f}s\n")


def test_scaled_to_zero_model_is_listed_and_serves_its_first_request(local_cluster: LocalCluster):
    local_cluster.deploy(AUTOSCALED)
    assert local_cluster.replicas("chat-zero") == []
    assert wait_for(lambda: local_cluster.listed().get("chat-zero", {}).get("scaled_to_zero") is True,
                    timeout=30)
    started = time.monotonic()
    with httpx.Client(base_url=local_cluster.base_url, timeout=180) as http:
        first = chat(http, "chat-zero")
    assert first.status_code == 200, first.text
    sys.stderr.write(f"cold start of chat-zero: {time.monotonic() - started:.1f}s\n")
    assert len(local_cluster.replicas("chat-zero")) == 1
    assert wait_for(lambda: local_cluster.listed().get("chat-zero", {}).get("scaled_to_zero") is False,
                    timeout=30)
