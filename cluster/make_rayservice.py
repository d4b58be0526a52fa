"""Render the cluster manifests from serve_config.yaml and cluster/overrides.yaml.

    .venv/bin/python cluster/make_rayservice.py           # (re)write the files below
    .venv/bin/python cluster/make_rayservice.py --check   # exit 1 (and show a diff) when they are stale

Writes
  cluster/serve_config.cluster.yaml  serve_config.yaml adapted to a GPU cluster: model paths
                                     and image_dir on the shared volume, GPUs per model,
                                     HTTP on 0.0.0.0. `serve deploy` it on a `ray up` cluster.
  cluster/rayservice.yaml            a KubeRay RayService (plus the PersistentVolumeClaim of
                                     the shared volume) whose serveConfigV2 is that same config.

serve_config.yaml stays the single source of the models and their options; only the few
cluster differences live in overrides.yaml. Needs PyYAML; where serve_app is importable
(the project's .venv) the result is validated as the server will validate it.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import posixpath
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SERVE_CONFIG = ROOT / "serve_config.yaml"
OVERRIDES = HERE / "overrides.yaml"
RAYSERVICE = HERE / "rayservice.yaml"
CLUSTER_SERVE_CONFIG = HERE / "serve_config.cluster.yaml"
SERVE_PORT = 1088
# The local model folder of serve_config.yaml (./models, built by scripts/setup.sh): on the
# cluster its contents are at `serve.model_root` (built there by `init_models_command`).
LOCAL_MODEL_DIR = "models"


# --------------------------------------------------------------------------- serve config
def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: `extra` wins; nested dicts are merged, anything else replaced."""
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _replicas_as_overridden(model: dict[str, Any], override: dict[str, Any], notes: list[str] | None) -> None:
    """Serve takes a fixed `num_replicas` or an `autoscaling_config`, not both: the one an
    override sets replaces the other of serve_config.yaml (said in `notes`)."""
    deployment = model["deployment"]
    replaced = None
    if override.get("autoscaling_config") is not None and "num_replicas" not in override:
        replaced = "num_replicas" if isinstance(deployment.get("num_replicas"), int) else None
    elif isinstance(override.get("num_replicas"), int) and "autoscaling_config" not in override:
        replaced = "autoscaling_config" if deployment.get("autoscaling_config") is not None else None
    if replaced is None:
        return
    given = "autoscaling_config" if replaced == "num_replicas" else "num_replicas"
    if notes is not None:
        notes.append(f"{model['name']}: deployment.{replaced} {deployment[replaced]!r} dropped (overrides.yaml sets {given})")
    del deployment[replaced]


def _check(config: dict[str, Any]) -> None:
    """Validate each application's args as the server will (where serve_app is importable,
    as in the project's .venv), so a bad merge fails here, not after `kubectl apply`."""
    try:
        from pydantic import ValidationError

        from serve_app.check_config import override_findings
        from serve_app.config import AppConfig
    except ImportError:
        return

    for app in config.get("applications") or []:
        try:
            args = AppConfig.model_validate(app.get("args") or {})
        except ValidationError as exc:
            raise SystemExit(f"serve_config.yaml with overrides.yaml makes an invalid config for application "
                             f"{app.get('name')!r}:\n{exc}") from None
        # Serve's own `deployments:` list beside the args: what it would ignore or refuse.
        try:
            problems, warnings = override_findings(args, app.get("deployments") or [])
        except ImportError:  # no Ray beside serve_app here: Serve's defaults cannot be read
            problems, warnings = [], []
        for warning in warnings:
            print(f"warning: application {app.get('name')!r}: {warning}", file=sys.stderr)
        if problems:
            raise SystemExit(f"serve_config.yaml with overrides.yaml makes an invalid config for application "
                             f"{app.get('name')!r}:\n" + "\n".join(problems))


def _is_local_path(path: str, base: Path) -> bool:
    """Whether a model `path` of serve_config.yaml names a local folder rather than a hub id:
    `./x`, `../x`, `~/x` or absolute; under the local model folder (`models/x`, whether or not
    it is built on this machine: the output must not depend on that); a folder that exists
    relative to the config's folder `base` (`from_pretrained` loads an existing folder before
    asking the hub); or a path with two or more `/` (a hub id is `name` or `org/name`)."""
    return (path.startswith(("./", "../", "/", "~", LOCAL_MODEL_DIR + "/")) or path.count("/") >= 2
            or (base / path).exists())


def _model_path(path: str, model_root: str, base: Path = ROOT) -> str:
    """Where a model path of serve_config.yaml (relative to `base`, its folder) is on the
    cluster's shared volume. Absolute paths and hub ids stay. A relative local path keeps its
    structure under `model_root`, less its leading `models/` (the local model folder, which
    `model_root` stands for):

        ./models/tiny-llama -> <model_root>/tiny-llama      models/a/b -> <model_root>/a/b
        ./checkpoints/x     -> <model_root>/checkpoints/x   org/name   -> org/name (hub id)
    """
    if path.startswith(("/", "~")) or not _is_local_path(path, base):
        return path
    parts = [p for p in posixpath.normpath(path).split("/") if p not in ("", ".")]
    if parts and parts[0] == "..":
        raise SystemExit(f"model path {path!r} is outside {base}: give it an absolute path, or set "
                         "its cluster path in overrides.yaml (serve.models.<name>.path)")
    if parts and parts[0] == LOCAL_MODEL_DIR:
        parts = parts[1:]
    return posixpath.join(model_root, *parts) if parts else model_root


def cluster_serve_config(config: dict[str, Any], overrides: dict[str, Any], base: Path = ROOT,
                         notes: list[str] | None = None) -> dict[str, Any]:
    """serve_config.yaml (in folder `base`) as it runs on the GPU cluster.

    Each model's `deployment`, lowest to highest precedence: its own in serve_config.yaml,
    then `serve.deployment` of overrides.yaml (every model), then `serve.models.<name>`
    (one model). Values of the model that an override replaces are added to `notes`.
    """
    serve = overrides.get("serve") or {}
    config = copy.deepcopy(config)
    http = config.setdefault("http_options", {})
    http["host"] = serve.get("http_host", "0.0.0.0")
    http.setdefault("port", SERVE_PORT)
    per_model = serve.get("models") or {}
    cluster_wide = serve.get("deployment") or {}
    for app in config.get("applications") or []:
        args = app.setdefault("args", {})
        for key in ("image_dir", "public_base_url"):
            if serve.get(key) is not None:
                args[key] = serve[key]
        models = []
        for model in args.get("models") or []:
            model = copy.deepcopy(model)
            own = per_model.get(model["name"]) or {}
            if serve.get("model_root") and isinstance(model.get("path"), str) and "path" not in own:
                model["path"] = _model_path(model["path"], serve["model_root"], base)
            deployment = model.get("deployment") or {}
            if notes is not None:
                notes.extend(
                    f"{model['name']}: deployment.{key} {deployment[key]!r} -> {value!r} "
                    "(overrides.yaml serve.deployment)"
                    for key, value in cluster_wide.items()
                    if key in deployment and deployment[key] != value
                    and key not in (own.get("deployment") or {}))
            model["deployment"] = _merge(deployment, cluster_wide)
            _replicas_as_overridden(model, cluster_wide, notes)
            model = _merge(model, own)
            _replicas_as_overridden(model, own.get("deployment") or {}, notes)  # the model's own wins
            models.append(model)
        args["models"] = models
    unknown = set(per_model) - {m["name"] for a in config.get("applications") or []
                                for m in (a.get("args") or {}).get("models") or []}
    if unknown:
        raise SystemExit(f"overrides.yaml names models that serve_config.yaml lacks: {sorted(unknown)}")
    return config


# --------------------------------------------------------------------------- manifest
class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (serveConfigV2), no aliases."""

    def ignore_aliases(self, data: Any) -> bool:  # noqa: ARG002
        return True


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def _env(defaults: dict[str, Any], env: dict[str, Any]) -> list[dict[str, Any]]:
    """A container's env list: `defaults`, then overrides.yaml's `kuberay.env`, one entry per
    name (`kuberay.env` wins: Kubernetes' server-side apply refuses a list naming one twice).
    A value is plain, or a mapping taken as Kubernetes' `valueFrom`
    (`{secretKeyRef: {name: hf-token, key: token}}`), so a token stays in a Secret."""
    return [{"name": name, "valueFrom": value} if isinstance(value, dict) else {"name": name, "value": str(value)}
            for name, value in {**defaults, **env}.items()]


def _container(name: str, image: str, cpu: str, memory: str, gpus: int = 0,
               ports: list[dict[str, Any]] | None = None,
               env: dict[str, Any] | None = None) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "env": _env({
            # Every Ray process and the KubeRay operator must agree on auth (Ray 2.60
            # defaults to token auth once a token exists); see README.md, "Scaling and clusters".
            "RAY_AUTH_MODE": "disabled",
            "HF_HOME": "/data/huggingface",
            "TOKENIZERS_PARALLELISM": "false",
            # then overrides.yaml `kuberay.env`: Serve's fast serving path (as scripts/serve.sh);
            # Serve reads it at import in every controller, proxy and replica process.
        }, env or {}),
        "ports": ports or [],
        "resources": {"limits": limits, "requests": dict(limits)},
        "volumeMounts": [{"name": "shared-data", "mountPath": "/data"}],
    }
    return container


def rayservice_manifest(serve_config: dict[str, Any], overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """The PVC and the RayService, as two YAML documents."""
    kube = overrides["kuberay"]
    meta: dict[str, Any] = {"name": kube["name"]}
    if kube.get("namespace"):
        meta["namespace"] = kube["namespace"]
    pvc_meta = {**meta, "name": kube["pvc"]["name"]}
    pvc_spec: dict[str, Any] = {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": kube["pvc"]["size"]}},
    }
    if kube["pvc"].get("storage_class"):
        pvc_spec["storageClassName"] = kube["pvc"]["storage_class"]
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": pvc_meta, "spec": pvc_spec}

    port = int((serve_config.get("http_options") or {}).get("port", SERVE_PORT))
    volumes = [{"name": "shared-data", "persistentVolumeClaim": {"claimName": kube["pvc"]["name"]}}]
    env = kube.get("env") or {}
    # The Ray image runs as uid 1000, gid 100: a volume whose root is owned by root is
    # writable through the pod's fsGroup (where the volume type supports it).
    # OnRootMismatch: not a re-chown of every checkpoint on the volume at each pod start.
    security = ({"fsGroup": int(kube["fs_group"]), "fsGroupChangePolicy": "OnRootMismatch"}
                if kube.get("fs_group") is not None else None)
    # A deleted pod's `ray start` drains its node for RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S
    # (requests in flight finish); Kubernetes' SIGKILL must come after that, not at it.
    grace = kube.get("termination_grace_period_s")
    drain = env.get("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S")
    if isinstance(drain, dict):
        drain = None  # from a Secret or the like: not known here
    try:  # unset: Kubernetes' default and Ray's, 30 s each
        grace_s, drain_s = float(30 if grace is None else grace), float(30 if drain is None else drain)
    except (TypeError, ValueError):
        raise SystemExit(f"overrides.yaml: kuberay.termination_grace_period_s ({grace!r}) and "
                         f"kuberay.env.RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S ({drain!r}) are seconds") from None
    if drain is not None and drain_s >= grace_s:
        raise SystemExit(f"overrides.yaml: kuberay.termination_grace_period_s ({grace_s:g}) must be longer than "
                         f"kuberay.env.RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S ({drain_s:g}), or Kubernetes kills "
                         "a pod's Ray while it still drains")
    stopping = {"terminationGracePeriodSeconds": int(grace_s)} if grace is not None else {}
    head = _container("ray-head", kube["image"], kube["head"]["cpu"], kube["head"]["memory"], env=env, ports=[
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
        {"containerPort": port, "name": "serve"},  # KubeRay's serve service targets the port named `serve`
    ])
    head_pod: dict[str, Any] = {"containers": [head], "volumes": volumes, **stopping}
    if security:
        head_pod["securityContext"] = security
    if kube.get("init_models_command"):
        head_pod["initContainers"] = [{
            "name": "prepare-models",
            "image": kube["image"],
            "command": ["bash", "-c", kube["init_models_command"]],
            # `kuberay.env` too: a download of a gated checkpoint needs its HF_TOKEN.
            "env": _env({"HF_HOME": "/data/huggingface"}, env),
            # Small and stated: a namespace with a ResourceQuota refuses a pod without them.
            "resources": {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"cpu": "1", "memory": "4Gi"}},
            "volumeMounts": [{"name": "shared-data", "mountPath": "/data"}],
        }]
    gpu = kube["gpu_workers"]
    worker = _container("ray-worker", kube["image"], gpu["cpu"], gpu["memory"], gpus=int(gpu["gpus"]),
                        env=env, ports=[{"containerPort": port, "name": "serve"}])
    worker_pod: dict[str, Any] = {
        "containers": [worker],
        "volumes": volumes,
        **stopping,
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }
    if security:
        worker_pod["securityContext"] = security
    service = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": meta,
        "spec": {
            # The Serve config of serve_config.yaml, adapted by cluster/overrides.yaml.
            "serveConfigV2": dump(serve_config),
            "rayClusterConfig": {
                "rayVersion": str(kube["ray_version"]),
                # Serve autoscaling asks for replicas; the Ray autoscaler adds GPU pods for them.
                "enableInTreeAutoscaling": True,
                "headGroupSpec": {
                    # No GPU requested, yet on a GPU node whose runtime is NVIDIA's (the GPU
                    # Operator's default) the CUDA image sees every GPU: Ray would count them and
                    # place model replicas on GPUs the device plugin gave to worker pods.
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
                    "template": {"spec": head_pod},
                },
                "workerGroupSpecs": [{
                    "groupName": gpu["group"],
                    "replicas": int(gpu["replicas"]),
                    "minReplicas": int(gpu["min_replicas"]),
                    "maxReplicas": int(gpu["max_replicas"]),
                    "rayStartParams": {},
                    "template": {"spec": worker_pod},
                }],
            },
        },
    }
    return [pvc, service]


HEADER = """\
# GENERATED by cluster/make_rayservice.py from serve_config.yaml and cluster/overrides.yaml.
# Do not edit: change those and run `.venv/bin/python cluster/make_rayservice.py`.
"""

RAYSERVICE_HEADER = HEADER + """\
#
# KubeRay RayService for serve_app: a head pod, a GPU worker group (nvidia.com/gpu) that the
# Ray autoscaler grows for Serve replicas, and a ReadWriteMany volume mounted at /data on
# every pod for the models (/data/models) and generated images (/data/generated_images).
#   kubectl apply -f cluster/rayservice.yaml
#   kubectl port-forward svc/{name}-serve-svc {port}:{port}
"""

CLUSTER_CONFIG_HEADER = HEADER + """\
#
# serve_config.yaml for a GPU cluster whose nodes share /data (see README.md, "Scaling and clusters"):
#   serve deploy cluster/serve_config.cluster.yaml
"""


def render(serve_config_path: Path = SERVE_CONFIG, overrides_path: Path = OVERRIDES,
           notes: list[str] | None = None) -> dict[Path, str]:
    """{output path: text} for both generated files."""
    config = yaml.safe_load(serve_config_path.read_text())
    overrides = yaml.safe_load(overrides_path.read_text())
    adapted = cluster_serve_config(config, overrides, serve_config_path.resolve().parent, notes)
    _check(adapted)
    port = int(adapted["http_options"]["port"])
    docs = rayservice_manifest(adapted, overrides)
    manifest = RAYSERVICE_HEADER.format(name=overrides["kuberay"]["name"], port=port) + "---\n".join(
        dump(doc) for doc in docs)
    return {
        CLUSTER_SERVE_CONFIG: CLUSTER_CONFIG_HEADER + dump(adapted),
        RAYSERVICE: manifest,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 when a generated file differs from what is committed")
    parser.add_argument("--serve-config", type=Path, default=SERVE_CONFIG)
    parser.add_argument("--overrides", type=Path, default=OVERRIDES)
    ns = parser.parse_args(argv)
    stale = 0
    notes: list[str] = []
    for path, text in render(ns.serve_config, ns.overrides, notes).items():
        current = path.read_text() if path.exists() else ""
        if current == text:
            continue
        if ns.check:
            stale += 1
            sys.stdout.writelines(difflib.unified_diff(
                current.splitlines(keepends=True), text.splitlines(keepends=True),
                f"{path.name} (committed)", f"{path.name} (from serve_config.yaml + overrides.yaml)"))
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if not ns.check:
        for note in notes:  # not silent: what overrides.yaml replaced of serve_config.yaml
            print(f"note: {note}", file=sys.stderr)
    if stale:
        print(f"\n{stale} generated file(s) are stale: run .venv/bin/python cluster/make_rayservice.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
