"""Multi-node: the cluster manifests, and serve_app on a real three-raylet Ray cluster.

The fast tests check that cluster/rayservice.yaml and cluster/serve_config.cluster.yaml
are what cluster/make_rayservice.py makes of serve_config.yaml (so they cannot drift),
that cluster/cluster-launcher.yaml passes Ray's own cluster-config schema, and drive
cluster/local_cluster.sh with a stand-in `ray` (no Ray runs): which folder it uses,
its ports and environment, and the order in which `stop` ends the nodes.

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
import signal
import socket
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

from serve_app.registration import UNREGISTER_PATH
from tests import disconnect
from tests.conftest import ROOT, answered_in_full, free_port, stream_in_flight, wait_for
from tests.fake_node import FakeNode

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

    app = AppConfig.model_validate(args)  # still a valid application config

    cluster = service["spec"]["rayClusterConfig"]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
    # The head requests no GPU, so it must count none, even where its container sees a node's GPUs.
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    for pod in (cluster["headGroupSpec"]["template"]["spec"], worker):
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]]
        assert claims == [pvc["metadata"]["name"]]
        container = pod["containers"][0]
        assert {"name": "shared-data", "mountPath": "/data"} in container["volumeMounts"]
        assert {"name": "serve", "containerPort": serve["http_options"]["port"]} in container["ports"]
        assert {"name": "RAY_AUTH_MODE", "value": "disabled"} in container["env"]
        # Serve's fast path, as scripts/serve.sh sets it, in the environment of `ray start`.
        assert {"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "1"} in container["env"]
        assert {"name": "RAY_SERVE_THROUGHPUT_OPTIMIZED", "value": "1"} in container["env"]
        assert {"name": "RAY_SERVE_HAPROXY_BINARY_PATH",  # the image's pip install puts it there
                "value": "/home/ray/anaconda3/bin/serve-app-haproxy"} in container["env"]
        # The Ray image runs as uid 1000 / gid 100: the volume is group-writable for it, and a pod
        # start does not re-chown every checkpoint on it.
        assert pod["securityContext"] == {"fsGroup": 100, "fsGroupChangePolicy": "OnRootMismatch"}
        # A deleted pod's Ray drains its node as long as a replaced replica finishes its requests,
        # and Kubernetes kills it only after that (its default 30 s ended Ray's default drain).
        drain = next(float(e["value"]) for e in container["env"] if e["name"] == "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S")
        assert drain >= max(model.deployment.graceful_shutdown_timeout_s for model in app.models)
        assert pod["terminationGracePeriodSeconds"] > drain


def test_a_grace_period_shorter_than_the_drain_is_refused():
    make = _load("make_rayservice")
    source = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    overrides = yaml.safe_load((CLUSTER / "overrides.yaml").read_text())
    overrides["kuberay"]["termination_grace_period_s"] = 60
    with pytest.raises(SystemExit, match="termination_grace_period_s .60. must be longer than"):
        make.rayservice_manifest(source, overrides)
    overrides["kuberay"]["termination_grace_period_s"] = None  # Kubernetes' 30 s
    with pytest.raises(SystemExit, match="termination_grace_period_s .30. must be longer than"):
        make.rayservice_manifest(source, overrides)
    overrides["kuberay"]["termination_grace_period_s"] = "soon"
    with pytest.raises(SystemExit, match="are seconds"):
        make.rayservice_manifest(source, overrides)


def test_kuberay_env_takes_plain_values_and_secret_references():
    make = _load("make_rayservice")
    source = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    overrides = yaml.safe_load((CLUSTER / "overrides.yaml").read_text())
    overrides["kuberay"]["env"] = {"HF_TOKEN": {"secretKeyRef": {"name": "hf-token", "key": "token"}}, "N": 2,
                                   "HF_HOME": "/models/hf"}  # one the manifest sets too: this one wins
    docs = make.rayservice_manifest(source, overrides)
    cluster = next(d for d in docs if d["kind"] == "RayService")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    # The model-preparing init container too: a gated checkpoint's download needs the token.
    for container in (head["containers"][0], cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0],
                      head["initContainers"][0]):
        env = container["env"]
        assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}} in env
        assert {"name": "N", "value": "2"} in env
        # Each name once (server-side apply refuses a list naming one twice), the operator's value.
        names = [entry["name"] for entry in env]
        assert len(names) == len(set(names)), names
        assert {"name": "HF_HOME", "value": "/models/hf"} in env


def test_cluster_model_paths_keep_their_structure(tmp_path):
    make = _load("make_rayservice")
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "ckpt").mkdir()
    cases = {
        "./models/tiny-llama": "/data/models/tiny-llama",
        "./models/a/b": "/data/models/a/b",
        "models/mine": "/data/models/mine",        # exists here: a local folder, not a hub id
        "models/unbuilt": "/data/models/unbuilt",  # the local model folder's, built here or not
        "models/a/b": "/data/models/a/b",          # two slashes: never a hub id
        "ckpt": "/data/models/ckpt",
        "./other/x": "/data/models/other/x",
        "org/name": "org/name",                    # hub id
        "name": "name",                            # hub id
        "/abs/path": "/abs/path",
    }
    assert {path: make._model_path(path, "/data/models", tmp_path) for path in cases} == cases
    with pytest.raises(SystemExit, match="outside"):
        make._model_path("../elsewhere/x", "/data/models", tmp_path)


def test_cluster_overrides_precedence_is_model_then_cluster_wide_then_per_model(tmp_path):
    make = _load("make_rayservice")
    config = {"applications": [{"name": "a", "args": {"models": [
        {"name": "m1", "path": "./models/m1", "deployment": {"num_gpus": 0, "num_cpus": 0.5,
                                                             "max_ongoing_requests": 7}},
        {"name": "m2", "path": "../outside/m2", "deployment": {"num_gpus": 2}},
    ]}}]}
    overrides = {"serve": {"model_root": "/data/models", "deployment": {"num_gpus": 1, "num_cpus": 1},
                           "models": {"m2": {"path": "/data/big/m2", "deployment": {"num_gpus": 2}}}}}
    notes: list[str] = []
    models = make.cluster_serve_config(config, overrides, tmp_path, notes)["applications"][0]["args"]["models"]
    assert models[0]["deployment"] == {"num_gpus": 1, "num_cpus": 1, "max_ongoing_requests": 7}
    assert models[1] == {"name": "m2", "path": "/data/big/m2", "deployment": {"num_gpus": 2, "num_cpus": 1}}
    # What serve.deployment replaced is said, not silent (m2's num_gpus is its own override's).
    assert notes == ["m1: deployment.num_gpus 0 -> 1 (overrides.yaml serve.deployment)",
                     "m1: deployment.num_cpus 0.5 -> 1 (overrides.yaml serve.deployment)"]


def test_cluster_overrides_that_scale_replace_the_fixed_count_and_bad_merges_fail_early(tmp_path, capsys):
    """An override's autoscaling_config replaces serve_config.yaml's num_replicas (Serve takes
    one of them), and a merge the server would refuse fails the generator, naming the field."""
    make = _load("make_rayservice")
    source = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    overrides = yaml.safe_load((CLUSTER / "overrides.yaml").read_text())
    autoscaling = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    overrides["serve"]["models"] = {"Llama3-8B": {"deployment": {"num_gpus": 2, "autoscaling_config": autoscaling}}}
    notes: list[str] = []
    adapted = make.cluster_serve_config(source, overrides, ROOT, notes)
    chat = adapted["applications"][0]["args"]["models"][0]
    assert chat["deployment"]["autoscaling_config"] == autoscaling and "num_replicas" not in chat["deployment"]
    assert "Llama3-8B: deployment.num_replicas 1 dropped (overrides.yaml sets autoscaling_config)" in notes
    make._check(adapted)  # valid as the server reads it
    # Serve's own `deployments:` beside the args is checked too: a fixed count there is ignored
    # once the model autoscales, and a deployment the application has not fails the deploy.
    adapted["applications"][0]["deployments"] = [{"name": "model_Llama3-8B", "num_replicas": 2}]
    make._check(adapted)
    assert "model_Llama3-8B: num_replicas is ignored, the model autoscales" in capsys.readouterr().err
    adapted["applications"][0]["deployments"] = [{"name": "model_Llama3-9B", "num_replicas": 2}]
    with pytest.raises(SystemExit, match="'model_Llama3-9B' is no deployment of this application"):
        make._check(adapted)
    # Cluster-wide autoscaling, one model pinned to a fixed count: the model's own wins.
    overrides["serve"]["deployment"] = {**overrides["serve"]["deployment"], "autoscaling_config": autoscaling}
    overrides["serve"]["models"] = {"SuperImage": {"deployment": {"num_replicas": 2}}}
    chat, image = make.cluster_serve_config(source, overrides, ROOT)["applications"][0]["args"]["models"]
    assert "num_replicas" not in chat["deployment"] and chat["deployment"]["autoscaling_config"] == autoscaling
    assert image["deployment"]["num_replicas"] == 2 and "autoscaling_config" not in image["deployment"]

    overrides["serve"]["models"] = {"Llama3-8B": {"device": "cuda:1"}}  # one GPU per replica: cuda:0 only
    (tmp_path / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    with pytest.raises(SystemExit, match=r"(?s)invalid config for application 'serve_app'.*cuda:1"):
        make.render(ROOT / "serve_config.yaml", tmp_path / "overrides.yaml")


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
    # Workers are launched by the autoscaler under Ray's instance role, which may not read SSM
    # parameters: an id the README's commands write, never `resolve:ssm:`.
    for node_type in config["available_node_types"].values():
        assert not node_type["node_config"]["ImageId"].startswith("resolve:")
    assert "--gpus all" in config["docker"]["worker_run_options"]
    # What the nodes need, not the checkout: `ray up` hashes every mounted file, .venv too.
    assert "." not in config["file_mounts"].values()
    assert {"./serve_app", "./pyproject.toml", "./cluster"} <= set(config["file_mounts"].values())
    # Serve reads its fast-path switches at import: every node's `ray start` must have them.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        assert "RAY_SERVE_ENABLE_HA_PROXY=${RAY_SERVE_ENABLE_HA_PROXY:-1}" in start
        assert "RAY_SERVE_THROUGHPUT_OPTIMIZED=${RAY_SERVE_THROUGHPUT_OPTIMIZED:-1}" in start
        assert "--metrics-export-port=8080" in start  # where the README's Prometheus scrapes
    # HAProxy is serve-app-haproxy where it is installed; where it is not, the variable stays
    # unset (set but empty, Serve would find no HAProxy at all, not even its own).
    for installed in (True, False):
        assert _launcher_start_env(config, installed).get("RAY_SERVE_HAPROXY_BINARY_PATH") == (
            "/opt/bin/serve-app-haproxy" if installed else None)


def _launcher_start_env(config: dict[str, Any], haproxy_installed: bool) -> dict[str, str]:
    """The environment the launcher's head and worker `ray start` get (a stand-in `ray` on a
    PATH with or without serve-app-haproxy); the same for both, or the test fails."""
    envs = []
    with tempfile.TemporaryDirectory() as folder:
        bin_dir = Path(folder) / "opt" / "bin"
        bin_dir.mkdir(parents=True)
        (bin_dir / "ray").write_text('#!/bin/sh\nenv > "$(dirname "$0")/env.txt"\n')
        if haproxy_installed:
            (bin_dir / "serve-app-haproxy").write_text("#!/bin/sh\n")
        for tool in bin_dir.iterdir():
            tool.chmod(0o755)
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            start = next(c for c in config[key] if "ray start" in c)
            env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "RAY_HEAD_IP": "10.0.0.1"}
            subprocess.run(["bash", "-c", start], env=env, check=True, timeout=30)
            lines = (bin_dir / "env.txt").read_text().splitlines()
            envs.append(dict(line.split("=", 1) for line in lines if "=" in line))
    head, worker = envs
    assert head["RAY_AUTH_MODE"] == worker["RAY_AUTH_MODE"] == "disabled"
    assert head.get("RAY_SERVE_HAPROXY_BINARY_PATH") == worker.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    found = head.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    return {**head, **({"RAY_SERVE_HAPROXY_BINARY_PATH": found.replace(str(bin_dir), "/opt/bin")} if found else {})}


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
    # Every node is this machine: a local model folder that is not here fails before the deploy.
    assert tool.missing_model_paths(rendered) == []
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text(yaml.safe_dump(config))  # ./models/... read from tmp_path, where there are none
    out = tmp_path / "rendered.yaml"
    assert tool.main(["render", str(elsewhere), str(out), "--http-port", "18123"]) == 1 and not out.exists()
    assert tool.main(["render", str(ROOT / "serve_config.yaml"), str(out), "--http-port", "18123"]) == 0


# --------------------------------------------------------------------------- the script, without Ray
FAKE_RAY = """#!/usr/bin/env bash
# Stands in for `ray` (no Ray runs): `ray start` logs its node, arguments, environment and
# SIGTERM (then exits after FAKE_DRAIN_S, or ignores it with FAKE_IGNORE_TERM=1) and runs
# until then; any other `ray` command does nothing.
[[ "${1:-}" == start ]] || exit 0
args=" $* "; name="${args#* --temp-dir }"; name="$(basename "${name%% *}")"
log="$SERVE_APP_LOCAL_CLUSTER/fake_ray.log"
echo "$name start $*" >>"$log"
env | grep -E '^(RAY_SERVE_|RAY_AUTH_MODE=|HF_HUB_OFFLINE=)' | sed "s/^/$name env /" >>"$log"
echo "$name logged" >>"$log"
if [[ "${FAKE_IGNORE_TERM:-0}" == 1 ]]; then
  trap 'echo "$name TERM" >>"$log"' TERM
else
  trap 'echo "$name TERM" >>"$log"; sleep "${FAKE_DRAIN_S:-0}"; echo "$name exit" >>"$log"; exit 0' TERM
fi
while :; do sleep 0.1; done
"""

# The venv's python, except `cluster_tool.py wait-nodes` and `-m serve_app.shutdown`, which
# need a real cluster (the latter logs beside the fake `serve`, and hangs if told to).
FAKE_PYTHON = """#!/bin/sh
if [ "$2" = wait-nodes ]; then
  case "${FAKE_WAIT_NODES:-ok}" in ok) exit 0 ;; hang) exec sleep 60 ;; *) exit 1 ;; esac
fi
if [ "$2" = serve_app.shutdown ]; then
  echo "python $*" >>"$SERVE_APP_LOCAL_CLUSTER/fake_serve.log"
  [ "${FAKE_SERVE_HANG:-0}" = 1 ] && exec sleep 600
  exit 0
fi
exec "%s" "$@"
"""

FAKE_SERVE = """#!/bin/sh
echo "serve $*" >>"$SERVE_APP_LOCAL_CLUSTER/fake_serve.log"
exit 0
"""


class FakeCluster:
    """cluster/local_cluster.sh with stand-ins for `ray`, `serve` and waiting on nodes."""

    def __init__(self, tmp_path: Path) -> None:
        bin_dir = tmp_path / "venv" / "bin"
        bin_dir.mkdir(parents=True)
        for name, text in (("ray", FAKE_RAY), ("serve", FAKE_SERVE), ("python", FAKE_PYTHON % sys.executable)):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        self.dir = Path(tempfile.mkdtemp(prefix="sacl", dir="/tmp"))
        self.http_port = free_port()
        self.env = {key: value for key, value in os.environ.items() if key not in (
            "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED", "HF_HUB_OFFLINE")}
        self.env.update({
            "SERVE_APP_VENV": str(bin_dir.parent),
            "SERVE_APP_CLUSTER_DIR": str(self.dir),
            "SERVE_APP_GCS_PORT": str(free_port()),
            "SERVE_APP_DASHBOARD_PORT": str(free_port()),
            "SERVE_APP_HTTP_PORT": str(self.http_port),
            "SERVE_APP_PORT_BASE": "24000",
            "SERVE_APP_STOP_TIMEOUT_S": "10",
            "FAKE_DRAIN_S": "1",
        })

    def script(self, *args: str, timeout: float = 60, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
        done = subprocess.run([str(SCRIPT), *args], env={**self.env, **env}, capture_output=True,
                              text=True, timeout=timeout, cwd=cwd)
        if args[:1] == ("start",) and done.returncode == 0:
            # The fake nodes' waits return at once: `start` may end before they logged their start.
            deadline = time.monotonic() + 30
            while not all(f"{node} logged" in self.log() for node in ("head", "node_a", "node_b")):
                assert time.monotonic() < deadline, self.log()
                time.sleep(0.05)
        return done

    def log(self) -> list[str]:
        path = self.dir / "fake_ray.log"
        return path.read_text().splitlines() if path.exists() else []

    def node_env(self, node: str) -> dict[str, str]:
        prefix = f"{node} env "
        return dict(line[len(prefix):].split("=", 1) for line in self.log() if line.startswith(prefix))

    def events(self) -> list[str]:
        return [line for line in self.log() if line.split()[1] in ("TERM", "exit")]


@pytest.fixture
def fake_cluster(tmp_path: Path):
    tool = _load("cluster_tool")
    cluster = FakeCluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.script("stop", FAKE_DRAIN_S="0", SERVE_APP_STOP_TIMEOUT_S="2")
        leftovers = tool.tagged_processes(str(cluster.dir))
        shutil.rmtree(cluster.dir, ignore_errors=True)
        assert not leftovers, f"local_cluster.sh stop left processes running: {leftovers}"


def test_script_start_ports_environment_and_stop_order(fake_cluster: FakeCluster):
    tool = _load("cluster_tool")
    started = fake_cluster.script("start")
    assert started.returncode == 0, started.stderr
    assert (fake_cluster.dir / ".serve_app_local_cluster").is_file()
    (fake_cluster.dir / "test_config_1.yaml").write_text("kept: true\n")  # not made by start

    base = 24000
    envs = {node: fake_cluster.node_env(node) for node in ("head", "node_a", "node_b")}
    for env in envs.values():
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
        assert env["HF_HUB_OFFLINE"] == "0"  # as scripts/serve.sh
        assert env["RAY_AUTH_MODE"] == "disabled"
    head = envs["head"]
    ingress_http = range(int(head["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]),
                         int(head["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]))
    ingress_grpc = range(int(head["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"]),
                         int(head["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"]))
    # Every fixed port of every node, Ray's worker port ranges and Serve's ranges: no overlap.
    used: list[int] = [int(fake_cluster.http_port), int(head["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"]),
                       int(head["RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"]), *ingress_http, *ingress_grpc]
    for node, env in envs.items():
        args = next(line for line in fake_cluster.log() if line.startswith(f"{node} start ")).split()
        value = {key: int(args[i + 1]) for i, key in enumerate(args[:-1]) if key.endswith("-port")}
        used += [port for key, port in value.items()
                 if key not in ("--min-worker-port", "--max-worker-port", "--port", "--dashboard-port")]
        used += range(value["--min-worker-port"], value["--max-worker-port"] + 1)
        used += [int(env[key]) for key in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")]
        if node != "head":  # Serve applies these on worker nodes only
            used += [int(env[key]) for key in ("RAY_SERVE_WORKER_PROXY_HTTP_PORT", "RAY_SERVE_WORKER_PROXY_GRPC_PORT")]
        assert env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"].startswith(f"{fake_cluster.dir}/h{node[-1]}/")
    assert len(used) == len(set(used)), sorted(p for p in set(used) if used.count(p) > 1)
    assert all(base <= port < base + 2000 for port in used if port != fake_cluster.http_port)
    assert not set(used) & set(range(30000, 31000))  # Serve's default direct-ingress range

    status = fake_cluster.script("status")
    assert status.returncode == 0 and "node_b: running" in status.stderr

    stopped = fake_cluster.script("stop")
    assert stopped.returncode == 0, stopped.stderr
    # Serve is shut down gracefully first, with the nodes still up (the order of its steps is
    # serve_app.shutdown's, tested on the real cluster below).
    shutdown = (fake_cluster.dir / "fake_serve.log").read_text().splitlines()[-1]
    assert shutdown == "python -m serve_app.shutdown --drain-timeout 30", shutdown
    events = fake_cluster.events()
    # The workers' `ray start` get SIGTERM (and drain) first; the head's only once they are gone.
    assert events.index("head TERM") > max(events.index("node_a exit"), events.index("node_b exit")), events
    assert "head exit" in events
    assert not tool.tagged_processes(str(fake_cluster.dir))
    assert not list(fake_cluster.dir.glob("*.pid"))
    assert (fake_cluster.dir / "test_config_1.yaml").exists() and (fake_cluster.dir / "head.log").exists()

    # A second start clears what the first one made, and only that.
    (fake_cluster.dir / "head" / "old_session").mkdir(parents=True)
    assert fake_cluster.script("start").returncode == 0
    assert not (fake_cluster.dir / "head" / "old_session").exists()
    assert (fake_cluster.dir / "test_config_1.yaml").exists()


def test_script_stop_goes_on_when_serve_shutdown_hangs(fake_cluster: FakeCluster):
    """A wedged dashboard must not hold `stop`: the shutdown is cut off and the nodes still stop."""
    assert fake_cluster.script("start").returncode == 0
    started_at = time.monotonic()
    stopped = fake_cluster.script("stop", FAKE_SERVE_HANG="1", SERVE_APP_SHUTDOWN_TIMEOUT_S="2",
                                  SERVE_APP_DRAIN_TIMEOUT_S="1")
    assert stopped.returncode == 0, stopped.stderr
    assert time.monotonic() - started_at < 20
    assert "the graceful stop failed or took over 3s; stopping the nodes anyway" in stopped.stderr
    assert {line.split()[0] for line in fake_cluster.events() if line.endswith(" exit")} == {
        "head", "node_a", "node_b"}
    assert not _load("cluster_tool").tagged_processes(str(fake_cluster.dir))


def test_script_takes_a_venv_relative_to_where_it_is_run(fake_cluster: FakeCluster, tmp_path: Path):
    """`start` cds to the repo root; a relative SERVE_APP_VENV still names the caller's venv."""
    started = fake_cluster.script("start", cwd=tmp_path, SERVE_APP_VENV="venv")
    assert started.returncode == 0, started.stderr
    assert {line.split()[0] for line in fake_cluster.log() if " start " in line} == {"head", "node_a", "node_b"}


def test_script_stop_kills_a_node_that_ignores_sigterm(fake_cluster: FakeCluster):
    tool = _load("cluster_tool")
    assert fake_cluster.script("start", FAKE_IGNORE_TERM="1").returncode == 0
    started = time.monotonic()
    stopped = fake_cluster.script("stop", SERVE_APP_STOP_TIMEOUT_S="2")
    assert stopped.returncode == 0, stopped.stderr
    assert "killing its process group" in stopped.stderr
    assert time.monotonic() - started < 30
    assert not tool.tagged_processes(str(fake_cluster.dir))


def test_script_start_refuses_a_folder_it_did_not_make(fake_cluster: FakeCluster):
    precious = fake_cluster.dir / "precious.txt"
    precious.write_text("keep me")
    result = fake_cluster.script("start")
    assert result.returncode == 1 and "was not made by" in result.stderr, result.stderr
    assert precious.read_text() == "keep me"
    assert fake_cluster.log() == [] and not (fake_cluster.dir / ".serve_app_local_cluster").exists()
    stopped = fake_cluster.script("stop")
    assert stopped.returncode == 0 and "no cluster of this script" in stopped.stderr
    assert precious.exists()


def test_script_start_refuses_a_busy_http_port(fake_cluster: FakeCluster):
    with socket.socket() as sock:  # as Serve binds it: SO_REUSEPORT would let a second one share it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", fake_cluster.http_port))
        sock.listen()
        result = fake_cluster.script("start")
    assert result.returncode == 1 and "ports in use" in result.stderr, result.stderr
    assert str(fake_cluster.http_port) in result.stderr
    assert fake_cluster.log() == []


def test_script_failed_or_interrupted_start_stops_what_it_started(fake_cluster: FakeCluster):
    tool = _load("cluster_tool")
    failed = fake_cluster.script("start", FAKE_WAIT_NODES="fail")
    assert failed.returncode == 1 and "the head did not come up" in failed.stderr, failed.stderr
    assert fake_cluster.events() == ["head TERM", "head exit"]
    assert not tool.tagged_processes(str(fake_cluster.dir))

    # Ctrl-C while it waits for the head: SIGINT to the script's process group.
    (fake_cluster.dir / "fake_ray.log").unlink()
    process = subprocess.Popen([str(SCRIPT), "start"], env={**fake_cluster.env, "FAKE_WAIT_NODES": "hang"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        assert wait_for(lambda: any(" start " in line for line in fake_cluster.log()), timeout=20)
        time.sleep(0.5)
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    assert fake_cluster.events() == ["head TERM", "head exit"]
    assert not tool.tagged_processes(str(fake_cluster.dir))


def test_script_deploy_takes_no_wait_anywhere(fake_cluster: FakeCluster, tmp_path: Path):
    assert "not running" in fake_cluster.script("deploy", "--no-wait").stderr
    assert fake_cluster.script("start").returncode == 0
    config = tmp_path / "config.yaml"
    shutil.copy(ROOT / "serve_config.yaml", config)
    (tmp_path / "models").symlink_to(ROOT / "models")  # its relative model paths, read from its folder
    for args in (["--no-wait"], ["--no-wait", str(config)], [str(config), "--no-wait"]):
        result = fake_cluster.script("deploy", *args)
        assert result.returncode == 0, (args, result.stderr)
    deployed = (fake_cluster.dir / "fake_serve.log").read_text().splitlines()
    assert deployed == [f"serve deploy {fake_cluster.dir}/deployed_config.yaml -a "
                        f"http://127.0.0.1:{fake_cluster.env['SERVE_APP_DASHBOARD_PORT']}"] * 3
    assert "no config file" in fake_cluster.script("deploy", "--no-wait", str(tmp_path / "none.yaml")).stderr
    assert "unknown option" in fake_cluster.script("deploy", "--bogus").stderr


def test_kill_tagged_matches_only_this_cluster(tmp_path):
    tool = _load("cluster_tool")
    here, other = "/tmp/sacl_a", "/tmp/sacl_ab"
    env = [b"PATH=/usr/bin"]
    belongs = tool.belongs_to_cluster
    assert belongs(here, [*env, f"SERVE_APP_LOCAL_CLUSTER={here}".encode()], [b"python"])
    assert not belongs(here, [*env, f"SERVE_APP_LOCAL_CLUSTER={other}".encode()], [b"python"])
    assert belongs(here, env, [b"raylet", f"--temp_dir={here}/head".encode()])
    assert belongs(here, env, [b"python", b"--temp-dir", f"{here}/node_a".encode()])
    assert not belongs(here, env, [b"raylet", f"--temp_dir={other}/head".encode()])
    # The folder named elsewhere on a command line (an editor, `tail -f`) is not the cluster.
    assert not belongs(here, env, [b"tail", b"-f", f"{here}/head.log".encode()])
    assert not belongs(here, env, [b"less", f"--log={here}/x".encode()])
    # Without start's marker only the environment tag counts.
    assert not belongs(here, env, [b"raylet", f"--temp_dir={here}/head".encode()], marked=False)
    assert tool.port_list("20000-20002") == [20000, 20001, 20002] and tool.port_list("1088") == [1088]


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
            "SERVE_APP_PORT_BASE": "22000",  # not the script's default 20000: a user's cluster may run
            "SERVE_APP_DEPLOY_TIMEOUT_S": "240",
            # What a process that called ray.init() hands down; the script must not inherit it.
            "RAY_AUTH_MODE": "token",
            # Autoscaling reacts within seconds instead of Ray's 10 s metric pushes.
            "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
            "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
        }
        self.deployed: dict[str, Any] | None = None
        self._count = 0
        self.node = FakeNode().start()  # the AI network's node the application registers with

    def script(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([str(SCRIPT), *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout)
        sys.stderr.write(f"$ local_cluster.sh {' '.join(args)} -> {result.returncode}\n"
                         f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
        if check and result.returncode != 0:
            raise AssertionError(f"local_cluster.sh {' '.join(args)} failed:\n{result.stderr[-4000:]}")
        return result

    # -- configs
    def config(self, models: list[dict[str, Any]], overrides: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """A Serve config of these models; `overrides` is its `deployments:` list (Serve's own
        per-deployment options, applied on top of what the app's args say)."""
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
                    "registration": {"enabled": True, "node_urls": [self.node.url], "timeout_s": 2},
                    "models": [{"cid": f"cid-{model['name']}", **model} for model in models],
                },
                **({"deployments": overrides} if overrides else {}),
            }],
        }

    def deploy(self, models: list[dict[str, Any]], overrides: list[dict[str, Any]] | None = None) -> None:
        """`local_cluster.sh deploy` of a config with these models (skipped if it is live already)."""
        config = self.config(models, overrides)
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
        cluster.node.stop()
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
# Scaled as the README says, in Serve's `deployments:`: a change there restarts no replica.
SCALED_UP = [{"name": "model_chat-a", "num_replicas": 2}]
# image-b removed; chat-a autoscales 1..3; chat-zero starts with no replica at all, by an
# override its args do not know of (they say one replica).
AUTOSCALED = [
    chat_model(max_ongoing_requests=2, autoscaling_config={
        "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1,
        "upscale_delay_s": 1, "downscale_delay_s": 3}),
    chat_model("chat-zero", node="node_b"),
]
TO_ZERO = [{"name": "model_chat-zero", "autoscaling_config": {
    "min_replicas": 0, "max_replicas": 1, "target_ongoing_requests": 1,
    "upscale_delay_s": 0, "downscale_delay_s": 600}}]


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
        # A request id Serve cannot decode as UTF-8 made every route a text/plain 500, logged nowhere:
        # HAProxy drops it, and the request gets an id of HAProxy's own.
        odd = http.get("/v1/models", headers={"X-Request-Id": b"caf\xe9"})
        assert odd.status_code == 200 and odd.json()["code"] == 0 and odd.headers["x-request-id"] not in ("", "caf"), \
            (odd.status_code, odd.text)
        answer = chat(http, "chat-a")
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
        # The image is drawn on node_b; its URL is served through the ingress and proxies.
        image = http.post("/v1/images/generations", json={"model": "image-b", "prompt": "an otter"})
        assert image.status_code == 200, image.text
        url = image.json()["data"][0]["url"]
        assert url.startswith(local_cluster.base_url + "/v1/files/images/")
        for _ in range(3):  # new connections, through the head's proxy to any ingress replica
            fetched = httpx.get(url, timeout=30)
            assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")


def test_image_payloads_over_grpcs_default_4_mib_cross_between_replicas(local_cluster: LocalCluster):
    """The cluster runs the default launch's throughput-optimized Serve, where the ingress and
    the model replicas talk gRPC, whose default cap is 4 MiB a message: an edit's upload and
    a few PNGs are bigger than that, in each direction."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    local_cluster.deploy(BASE)
    noise = np.random.default_rng(0).integers(0, 256, (1400, 1400, 3), dtype=np.uint8)
    upload = io.BytesIO()
    Image.fromarray(noise).save(upload, "PNG")
    assert upload.tell() > 5 * 2**20
    with httpx.Client(base_url=local_cluster.base_url, timeout=180) as http:
        edit = http.post("/v1/images/edits", data={"model": "image-b", "prompt": "an otter"},
                         files={"image": ("big.png", upload.getvalue(), "image/png")})
        assert edit.status_code == 200, edit.text[:500]
        # 4 PNGs of 768x768 (random weights draw noise, which does not compress): over 6 MiB back.
        drawn = http.post("/v1/images/generations", json={
            "model": "image-b", "prompt": "an otter", "n": 4, "size": "768x768", "response_format": "b64_json"})
        assert drawn.status_code == 200, drawn.text[:500]
        images = [base64.b64decode(item["b64_json"]) for item in drawn.json()["data"]]
        assert len(images) == 4 and sum(map(len, images)) > 4 * 2**20


@pytest.fixture(scope="module")
def hang_ups(local_cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    """What the chat replica did when a client hung up mid-generation, streamed and not, as
    a driver of the cluster's own found it (`tests/disconnect.py`: it reads the replica's
    counters through a handle, so it must join the cluster's Ray)."""
    local_cluster.deploy(BASE)
    env = {**local_cluster.env, "RAY_AUTH_MODE": "disabled",
           "RAY_ADDRESS": f"127.0.0.1:{local_cluster.env['SERVE_APP_GCS_PORT']}"}
    done = subprocess.run([sys.executable, "-m", "tests.disconnect", "--app", APP, "--model", "chat-a",
                           "--port", str(local_cluster.http_port)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["stream", "json"])
def test_a_client_hanging_up_stops_its_generation_behind_haproxy(hang_ups: dict[str, dict[str, Any]], mode: str):
    """The default launch's path (HAProxy, the ingress's own HTTP server, gRPC to the model)
    passes a hang-up on to the chat replica, as Serve's Python proxy does (test_chat_serving)."""
    disconnect.check(hang_ups[mode])


def test_clients_that_time_out_stop_their_generation_behind_haproxy(hang_ups: dict[str, dict[str, Any]]):
    """A client that gives up on a non-streamed answer (a timeout, then a retry) closes its
    connection: HAProxy must pass that on every time. With Serve's kernel splicing on, about
    half went unseen and ran to their end (scripts/serve.sh's serve-app-haproxy turns it off)."""
    disconnect.check_timed_out(hang_ups["timed_out"])


def test_more_replicas_by_redeploy_without_restarts_or_failing_requests(local_cluster: LocalCluster):
    local_cluster.deploy(BASE)
    node_a = local_cluster.node_with("node_a")

    def replica_ids(deployment: str) -> set[str]:
        replicas = local_cluster.details()["applications"][APP]["deployments"][deployment]["replicas"]
        return {r["replica_id"] for r in replicas if r["state"] == "RUNNING"}

    before = {name: replica_ids(name) for name in ("model_chat-a", "model_image-b", "ingress")}
    with RequestStream(local_cluster.base_url, "chat-a") as stream:
        assert wait_for(lambda: stream.ok >= 4, timeout=60)
        local_cluster.deploy(BASE, SCALED_UP)  # waits until the application is RUNNING again
        assert wait_for(lambda: len(local_cluster.replicas("chat-a")) == 2, timeout=60)
        served = stream.ok
        assert wait_for(lambda: stream.ok >= served + 6, timeout=60)
    assert stream.failures == [], stream.failures[:5]
    assert [r["node_id"] for r in local_cluster.replicas("chat-a")] == [node_a, node_a]
    # Only the one replica was added: every replica that ran before runs on, its model loaded.
    assert replica_ids("model_chat-a") > before["model_chat-a"]
    assert replica_ids("model_image-b") == before["model_image-b"]
    assert replica_ids("ingress") == before["ingress"]


def test_removed_model_is_unlisted_and_404_while_the_other_serves(local_cluster: LocalCluster):
    local_cluster.deploy(BASE, SCALED_UP)
    with RequestStream(local_cluster.base_url, "chat-a") as stream:
        assert wait_for(lambda: stream.ok >= 4, timeout=60)
        local_cluster.deploy(AUTOSCALED, TO_ZERO)
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
    local_cluster.deploy(AUTOSCALED, TO_ZERO)
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
    local_cluster.deploy(AUTOSCALED, TO_ZERO)
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


def test_stop_withdraws_the_models_from_the_network_while_the_cluster_still_answers(local_cluster: LocalCluster):
    """The last test of the cluster: it stops it. The AI network's node is told first, while
    the cluster still answers what the node sent it; an unregister at the registrar's shutdown
    came after HAProxy's drain had closed the port, and the node's traffic meanwhile was refused."""
    if local_cluster.deployed is None:  # run alone
        local_cluster.deploy(BASE)
    node = local_cluster.node
    assert wait_for(lambda: bool(node.models_of("cluster_test")), timeout=30), node.projects
    at_unregister: list[int | str] = []

    def look(path: str, body: Any) -> None:
        if path == UNREGISTER_PATH:
            try:
                # Quick (HAProxy answers in milliseconds): the registrar waits 2 s for this node.
                at_unregister.append(httpx.get(local_cluster.base_url + "/health", timeout=1.0).status_code)
            except httpx.HTTPError as exc:
                at_unregister.append(type(exc).__name__)

    node.on_request = look
    # A stream in flight when the stop comes is answered in full: every node's HAProxy is
    # drained before Serve's shutdown kills it (serve_app.shutdown).
    finished = stream_in_flight(local_cluster.base_url, "chat-a")
    stopped = local_cluster.script("stop", timeout=180)
    events = finished(60)
    assert answered_in_full(events), (events[-3:], stopped.stderr[-2000:])
    assert "shutdown: 3 HAProxy process(es) on 3 node(s)" in stopped.stderr, stopped.stderr[-2000:]
    assert at_unregister == [200], (at_unregister, stopped.stderr[-2000:])
    assert node.bodies(UNREGISTER_PATH) == [{"project": "cluster_test"}] and node.models_of("cluster_test") is None
    assert f"shutdown: application '{APP}': withdrawn from the AI network's node {node.url}" in stopped.stderr



def test_check_ports_sees_a_listener_on_the_nodes_address_only():
    """A port held on the nodes' address (SERVE_APP_NODE_IP) but not on loopback is busy."""
    tool = _load("cluster_tool")
    with socket.socket() as held:
        held.bind(("127.0.0.2", 0))  # another loopback address, as a node IP stands in for
        held.listen()
        port = held.getsockname()[1]
        assert tool.main(["check-ports", str(port)]) == 0  # free on 127.0.0.1
        assert tool.main(["check-ports", "--host", "127.0.0.2", str(port)]) == 1
    assert tool.main(["check-ports", "--host", "127.0.0.2", str(port)]) == 0


def test_check_ports_takes_a_skippable_port_only_a_stopped_servers_closed_connections_hold():
    """Right after a `stop`, ports of the old cluster sit in TIME_WAIT for a minute, and a bind
    fails there even with SO_REUSEADDR (where the old listener did not set it): `start` refused
    a direct-ingress port as "in use", though nothing listens and Serve skips such a port. A
    fixed port in that state stays refused: the server meant to bind it would fail too."""
    tool = _load("cluster_tool")
    with socket.socket() as listener:  # no SO_REUSEADDR, as the old server's
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        served.close()  # the server closes first: its side of the connection goes to TIME_WAIT
        client.recv(1)
        client.close()
    assert wait_for(lambda: tool.tcp_states_by_port().get(port) == {tool.TIME_WAIT}, timeout=5)
    with socket.socket() as again, pytest.raises(OSError):
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
    assert tool.main(["check-ports", "--skippable", str(port)]) == 0
    assert tool.main(["check-ports", str(port)]) == 1


def slow_backend(seconds: float):
    """A keep-alive HTTP server (as Serve's replicas) answering "done", after `seconds` on /slow."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Slow(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            time.sleep(seconds if self.path == "/slow" else 0)
            self.send_response(200)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"done")

    backend = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    return backend


@pytest.mark.parametrize("wrapped", [True, False], ids=["serve-app-haproxy", "plain haproxy"])
def test_drain_haproxy_lets_the_requests_in_flight_finish_and_leaves_other_haproxies(tmp_path, wrapped):
    """A stop drains the HAProxy processes under one process (`serve run`'s, or on each node of
    a cluster its raylet: serve_app.shutdown) before Serve's shutdown, which kills them and
    every request in flight: a slow request through one is answered in full, an idle
    keep-alive connection (which Serve's config keeps open through a soft stop) does not hold
    the stop, a request still in flight at the timeout is counted as cut, and an HAProxy that
    is not under that process goes on. serve-app-haproxy's own admin socket drains it; a plain
    HAProxy is soft-stopped and waited on. Real HAProxy processes, no Ray."""
    import psutil

    from serve_app.haproxy_drain import drain_haproxy
    from serve_app.haproxy_launcher import haproxy_binary

    backend = slow_backend(1.5)
    binary, proxies = haproxy_binary(), {}
    ours_binary = str(Path(sys.executable).parent / "serve-app-haproxy") if wrapped else binary
    try:
        for name in ("ours", "other"):
            port = free_port()
            config = tmp_path / name / "haproxy.cfg"
            config.parent.mkdir()
            # Serve's settings that matter here: a long client timeout, idle connections kept
            # through a soft stop.
            config.write_text(f"global\n    maxconn 100\ndefaults\n    mode http\n    timeout connect 5s\n"
                              f"    timeout client 3600s\n    timeout server 30s\n    timeout http-keep-alive 90s\n"
                              f"    option idle-close-on-response\nfrontend f\n    bind 127.0.0.1:{port}\n"
                              f"    default_backend b\nbackend b\n    server s 127.0.0.1:{backend.server_address[1]}\n")
            # Ours under a parent of its own (as Serve's under its raylet); the other beside it.
            command = ["sh", "-c", f'"{ours_binary}" -db -f "{config}"; exit $?'] if name == "ours" else [
                binary, "-db", "-f", str(config)]
            proxies[name] = (subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port)

        def serves(port: int) -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/x", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        for process, port in proxies.values():
            assert wait_for(lambda: process.poll() is None and serves(port), timeout=20, interval=0.2)
        ours, port = proxies["ours"]
        idle = socket.create_connection(("127.0.0.1", port))  # a pooling client's idle connection
        idle.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"done" in idle.recv(1000)
        answers: list[httpx.Response] = []
        slow = threading.Thread(target=lambda: answers.append(httpx.get(f"http://127.0.0.1:{port}/slow", timeout=30)))
        slow.start()
        time.sleep(0.3)  # in flight at the backend
        started = time.monotonic()
        drained = drain_haproxy(20 if wrapped else 3, under=psutil.Process(ours.pid))
        slow.join(timeout=30)
        assert [(a.status_code, a.text) for a in answers] == [(200, "done")]
        assert (drained.proxies, drained.cut) == (1, 0 if wrapped else 1)
        if wrapped:  # done once its request was: the idle connection does not hold it
            assert time.monotonic() - started < 10
            with pytest.raises(OSError):  # and it takes no new connection
                socket.create_connection(("127.0.0.1", port), timeout=2)
            # A request still in flight when the drain gives up is counted as cut.
            idle.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.3)
            assert drain_haproxy(0.2, under=psutil.Process(ours.pid)).cut == 1
        # (A plain HAProxy, soft-stopped, stays up for the idle connection: counted as not done.)
        idle.close()
        other, other_port = proxies["other"]
        assert other.poll() is None and serves(other_port)
    finally:
        for process, _ in proxies.values():
            for child in psutil.Process(process.pid).children(recursive=True) if process.poll() is None else []:
                child.kill()
            process.kill()
            process.wait()
        backend.shutdown()


def test_a_reload_during_the_drain_is_drained_too_and_the_old_haproxy_waited_on(tmp_path):
    """Serve reloads HAProxy (a new process, frontends open; the old one soft-stopped, its own
    admin socket closed) when its backends change, as replicas stop. A drain under way takes
    the new process too (no new connection gets in), and waits for the old one's request in
    flight rather than counting its closed socket as nothing left. Real HAProxy, no Ray."""
    import psutil

    from serve_app.haproxy_drain import drain_haproxy

    backend = slow_backend(3)
    wrapper, port = str(Path(sys.executable).parent / "serve-app-haproxy"), free_port()
    config = tmp_path / "haproxy.cfg"
    text = (f"global\n    maxconn 100\ndefaults\n    mode http\n    timeout connect 5s\n    timeout client 3600s\n"
              f"    timeout server 30s\nfrontend f\n    bind 127.0.0.1:{port}\n    default_backend b\n"
              f"backend b\n    server s 127.0.0.1:{backend.server_address[1]}\n")
    config.write_text(text)
    started: list[subprocess.Popen] = []
    try:
        started.append(subprocess.Popen([wrapper, "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL))
        def serves() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/x", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(lambda: started[0].poll() is None and serves(), timeout=20, interval=0.2)
        answers: list[httpx.Response] = []
        slow = threading.Thread(target=lambda: answers.append(httpx.get(f"http://127.0.0.1:{port}/slow", timeout=30)))
        slow.start()
        time.sleep(0.3)  # in flight on the first process
        results: list[Any] = []
        drain = threading.Thread(target=lambda: results.append(drain_haproxy(20, under=psutil.Process())))
        drain.start()
        time.sleep(0.5)
        config.write_text(text)  # as Serve rewrites it before a reload
        started.append(subprocess.Popen([wrapper, "-db", "-f", str(config), "-sf", str(started[0].pid)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        drain.join(timeout=30)
        slow.join(timeout=30)
        [drained] = results
        assert [(a.status_code, a.text) for a in answers] == [(200, "done")]
        assert (drained.proxies, drained.cut) == (2, 0)
        # The drain waited for the old process to end, which it did once its request was answered.
        assert started[0].poll() is not None
        with pytest.raises(OSError):  # and the new one takes no new connection
            socket.create_connection(("127.0.0.1", port), timeout=2)
    finally:
        for process in started:
            process.kill()
            process.wait()
        backend.shutdown()
