"""How each system under test is launched, and the Serve config it gets.

The Ray rows run `serve run <generated config>` exactly as a user runs the
server, with the config generated from the shipped `serve_config.yaml` (only
the chat model's path, ports and folders replaced), each in its own Ray temp
dir with Ray's fast-path switches in the environment. Optional keys come from
`--serve-config-extra` so knobs that do not exist yet can be set later.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.procs import PYTHON, ROOT, Server, base_env, free_port, http_ok, processes, start

ECHO_MODEL = "bench-echo"
ECHO_PREFIX = "/bench-echo"
FLOOR_PREFIX = "/bench-floor"
# As scripts/serve.sh: HAProxy with kernel splicing off (serve_app/haproxy_launcher.py), where installed.
HAPROXY_COMMAND = Path(PYTHON).parent / "serve-app-haproxy"
FAST_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"} | (
    {"RAY_SERVE_HAPROXY_BINARY_PATH": str(HAPROXY_COMMAND)} if HAPROXY_COMMAND.is_absolute() and HAPROXY_COMMAND.exists()
    else {})


@dataclass
class Context:
    """What every launcher needs: models, threads, where logs and temp files go."""

    chat_path: Path
    image_path: Path
    threads: int
    log_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)
    litserve_batch: int | None = None  # None: row 1's chat max_batch_size, so both batch alike


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """`patch` over `base`, recursively for nested mappings (a copy)."""
    merged = copy.deepcopy(base)
    for key, value in (patch or {}).items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else copy.deepcopy(value)
    return merged


def _model_fields(kind: str) -> set[str]:
    from serve_app import config

    return set((config.ChatModelConfig if kind == "chat" else config.ImageModelConfig).model_fields)


def effective_batching(entry: dict[str, Any]) -> dict[str, Any]:
    """The batching knobs a chat model entry ends up with (its own or serve_app's defaults)."""
    from serve_app.config import ChatModelConfig

    model = ChatModelConfig.model_validate(entry)
    return {k: getattr(model, k) for k in ("max_batch_size", "batch_wait_timeout_s") if hasattr(model, k)}


# A tenth of a core and a deep queue, like the ingress: on 2 cores the default of one CPU per
# replica would leave whichever replica comes last unplaced.
ECHO_ENTRY = {"name": ECHO_MODEL, "kind": "chat", "engine": "echo", "path": "echo",
              "deployment": {"num_cpus": 0.1, "max_ongoing_requests": 512}}
MINIMAL_APP, FLOOR_APP = "bench_echo", "bench_floor"
# What takes the connections: HAProxy (its binary, and Ray's actor managing it), or without it Serve's proxy.
PROXY_GROUPS = {"/haproxy\0": "proxy", "HAProxyManager": "proxy", "ProxyActor": "proxy"}


def serve_config(ctx: Context, port: int, image_dir: Path, *, batching: bool, echo: bool) -> tuple[dict, list[str]]:
    """The Serve config of a Ray row, validated by serve_app's own schema; and notes on it."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": port}
    config.setdefault("logging_config", {})["enable_access_log"] = False
    app = config["applications"][0]
    args = app["args"]
    args.update(public_base_url=f"http://127.0.0.1:{port}", image_dir=str(image_dir), access_log=False)
    notes: list[str] = []
    for i, model in enumerate(args["models"]):
        patch = dict(ctx.extra.get(model["kind"], {}))
        if model["kind"] == "chat":
            model.update(path=str(ctx.chat_path), max_tokens_limit=max(model.get("max_tokens_limit", 0), 4096))
            if not batching:
                if "max_batch_size" in _model_fields("chat"):
                    patch["max_batch_size"] = 1
                else:
                    notes.append("serve_app has no max_batch_size knob: the 'batching off' row runs the same config")
                patch = deep_merge(patch, ctx.extra.get("chat_batching_off", {}))
        else:
            model["path"] = str(ctx.image_path)
        args["models"][i] = deep_merge(model, patch)
    app["args"] = deep_merge(args, ctx.extra.get("app", {}))
    if echo:
        app["args"]["models"].append(copy.deepcopy(ECHO_ENTRY))
        config["applications"].append({"name": MINIMAL_APP, "route_prefix": ECHO_PREFIX,
                                       "import_path": "bench.echo_app:build_ray_app", "args": {}})
        config["applications"].append({"name": FLOOR_APP, "route_prefix": FLOOR_PREFIX,
                                       "import_path": "bench.echo_app:build_handle_floor_app", "args": {}})
        notes.append("echo: serve_app's echo model; beside it on the same Serve instance, bench/echo_app.py's "
                     "minimal ingress (one FastAPI route) + echo deployments, and Ray's handle floor (a caller "
                     "deployment + echo deployment)")
    config = deep_merge(config, ctx.extra.get("config", {}))
    from serve_app.config import AppConfig

    AppConfig.model_validate(config["applications"][0]["args"])  # fail here, with pydantic's message
    return config, notes


def echo_cpu_groups(config: dict[str, Any]) -> dict[str, dict[str, str]]:
    """For `procs.cpu_by_group`, per echo system of a Ray row's `config`: its ingress (or caller)
    and echo model replicas, by the process titles Ray gives them, and HAProxy."""
    from serve_app.config import INGRESS_DEPLOYMENT, ChatModelConfig

    def replicas(app: str, ingress: str, model: str, front: str = "ingress") -> dict[str, str]:
        # A replica's title is ray::ServeReplica:<app>:<deployment>, and <deployment>.<method> while it
        # runs an actor call (a health check, say); the keys end there, so no longer name matches.
        return {f"ServeReplica:{app}:{deployment}{end}": group for deployment, group in ((ingress, front), (model, "model"))
                for end in ("\0", ".")} | PROXY_GROUPS

    serve_app = config["applications"][0]["name"]
    return {"serve_app": replicas(serve_app, INGRESS_DEPLOYMENT, ChatModelConfig.model_validate(ECHO_ENTRY).deployment_name),
            "ray_minimal": replicas(MINIMAL_APP, "EchoIngress", "EchoModel"),
            "ray_handle": replicas(FLOOR_APP, "FloorCaller", "FloorEcho", front="caller")}


PLAIN_ECHO_APP = "bench.echo_app:plain_app"
PLAIN_ECHO_GROUPS = {PLAIN_ECHO_APP: "server"}


def launch_ray(ctx: Context, name: str, *, batching: bool, echo: bool, fast: bool) -> tuple[Server, dict]:
    """`serve run` of a generated config in its own Ray temp dir; returns the server and its settings."""
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="sab_", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    try:
        config, notes = serve_config(ctx, port, tmp / "images", batching=batching, echo=echo)
    except BaseException:  # a config that does not validate (--serve-config-extra): no folder left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    config_path = tmp / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = base_env(ctx.threads) | {"RAY_TMPDIR": str(tmp / "ray")}
    if fast:
        haproxy = tmp / "haproxy"
        env |= FAST_ENV | {
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(haproxy / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(haproxy / "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(haproxy / "server-state"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(haproxy / "metrics.sock"),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port())}
    serve_bin = str(Path(PYTHON).parent / "serve")
    server = start(name, [serve_bin, "run", str(config_path)], env, port, ctx.log_dir, cleanup_marks=[str(tmp)],
                   remove_dirs=[tmp])
    settings = {"config": config, "notes": notes, "env": {k: v for k, v in env.items() if k.startswith("RAY_SERVE_")
                                                          and k in FAST_ENV}, "temp_dir": str(tmp)}
    return server, settings


def ray_probe(server: Server, extra_prefixes: list[str]) -> bool:
    """Ready when serve_app says every model is live (and the bench's extra apps answer)."""
    if not http_ok(server.base_url + "/ready"):
        return False
    return all(http_ok(server.base_url + prefix + "/health") for prefix in extra_prefixes)


def haproxy_running(mark: str) -> bool:
    """True when an HAProxy started for this Ray instance (its config path names `mark`) is alive."""
    return any(b"haproxy" in cmd.split(b"\0")[0] and mark.encode() in cmd for cmd, _ in processes())


def replica_threads(mark: str) -> dict[str, str]:
    """OMP_NUM_THREADS as each model replica of this Ray instance (RAY_TMPDIR under `mark`) sees it."""
    threads = {}
    for cmd, entry in processes():
        if b"ServeReplica" not in cmd or b"model_" not in cmd:
            continue
        try:
            env = dict(item.split(b"=", 1) for item in (entry / "environ").read_bytes().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if env.get(b"RAY_TMPDIR", b"").startswith(mark.encode()):
            name = cmd.split(b"\0")[0].decode(errors="replace").split(":")[-1]
            threads[name] = env.get(b"OMP_NUM_THREADS", b"unset").decode()
    return threads


def launch_naive(ctx: Context, with_images: bool = True) -> Server:
    port = free_port()
    argv = [PYTHON, "-m", "bench.naive_server", "--model", str(ctx.chat_path), "--port", str(port)]
    if with_images:
        argv += ["--image-model", str(ctx.image_path)]
    return start("naive", argv, base_env(ctx.threads), port, ctx.log_dir)


def row1_chat_batch(ctx: Context) -> int:
    """The chat model's max_batch_size in row 1's config (serve_config.yaml's, with --serve-config-extra)."""
    config, _ = serve_config(ctx, 0, Path("/tmp"), batching=True, echo=False)
    chat = next(m for m in config["applications"][0]["args"]["models"] if m["kind"] == "chat")
    return effective_batching(chat)["max_batch_size"]


def launch_litserve(ctx: Context) -> tuple[Server, dict[str, Any]]:
    """LitServe, and its batching settings for the results (row 1's batch size unless told)."""
    port = free_port()
    settings = {"max_batch_size": ctx.litserve_batch or row1_chat_batch(ctx), "batch_timeout_s": 0.01,
                "fast_queue": True}  # runs up to 2026-12-06 (run J) had LitServe's default, False
    argv = [PYTHON, "-m", "bench.litserve_server", "--model", str(ctx.chat_path), "--port", str(port),
            "--max-batch-size", str(settings["max_batch_size"]), "--batch-timeout", str(settings["batch_timeout_s"])]
    return start("litserve", argv, base_env(ctx.threads), port, ctx.log_dir), settings


def launch_plain_echo(ctx: Context) -> Server:
    port = free_port()
    argv = [PYTHON, "-m", "uvicorn", PLAIN_ECHO_APP, "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", "--no-access-log"]
    return start("plain_echo", argv, base_env(ctx.threads), port, ctx.log_dir)
