"""The application builder named in `serve_config.yaml` (`import_path: serve_app.app:build_app`).

The config's `args` are validated as `AppConfig` here, first, so a bad field
fails the deploy with pydantic's message naming it. Each model becomes its own deployment, with the
resources and scaling of its config; the ingress gets their handles.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
from pydantic import ValidationError
from ray.serve import Application

from serve_app.check_config import validation_problems
from serve_app.config import INGRESS_DEPLOYMENT, AppConfig, ChatModelConfig, ImageModelConfig, config_warnings
from serve_app.ingress import Ingress
from serve_app.registration import registrar_deployment

logger = logging.getLogger("ray.serve")

# Under RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (the default launch) the ingress and the model replicas
# talk gRPC, which caps a message at 4 MiB unless this says otherwise: one edit upload or a
# few PNGs are more. What bounds a request is the ingress's body limit, so this one is set
# as high as gRPC allows (Ray's own gRPC servers default to the same); the environment may
# still set it.
GRPC_MESSAGE_LIMIT_ENV = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"
GRPC_MESSAGE_LIMIT = 2**31 - 1


def application_runtime_env() -> dict[str, Any]:
    """The runtime_env the application is built in: the Serve config's `runtime_env` for the
    application (and the job's), as `serve deploy` / `serve run` hand it to the build."""
    return dict(ray.get_runtime_context().runtime_env or {}) if ray.is_initialized() else {}


def _with_replica_env(actor_options: dict[str, Any], inherited: dict[str, Any]) -> dict[str, Any]:
    """`ray_actor_options` whose runtime_env is the application's (`inherited`) plus the
    environment every replica that handles payloads needs.

    Serve gives a deployment that states a runtime_env of its own nothing of the
    application's but its `working_dir`: without the merge here, the application's
    `env_vars` (an API key variable, HF_TOKEN), `pip` and the rest would never reach a replica."""
    own = actor_options.get("runtime_env") or {}
    runtime_env = {**inherited, **own}
    runtime_env["env_vars"] = {
        GRPC_MESSAGE_LIMIT_ENV: os.environ.get(GRPC_MESSAGE_LIMIT_ENV, str(GRPC_MESSAGE_LIMIT)),
        **(inherited.get("env_vars") or {}),
        **(own.get("env_vars") or {}),
    }
    return {**actor_options, "runtime_env": runtime_env}


def _model_deployment(model: ChatModelConfig | ImageModelConfig):
    """The deployment class for a model, imported lazily: the ingress must not load torch."""
    if model.kind == "image":
        from serve_app.image_model import ImageModel

        return ImageModel
    if model.engine == "echo":
        from serve_app.echo_model import EchoModel

        return EchoModel
    from serve_app.chat_model import ChatModel

    return ChatModel


def validated_args(args: dict[str, Any]) -> AppConfig:
    """The application's args as config; invalid ones are a ValueError whose last lines (what
    `serve status` and the controller's log end with) name each problem, one a line, without
    pydantic's echo of the input (the whole model list) and without a chained traceback."""
    try:
        return AppConfig.model_validate(args)
    except ValidationError as error:
        problems = "\n".join(f"  {line}" for line in validation_problems(error))
        raise ValueError(f"serve_app's args in the Serve config are not valid:\n{problems}") from None


def build_app(args: AppConfig | dict[str, Any]) -> Application:
    """One deployment per configured model, the ingress that routes to them, and
    (when registration is enabled) the one registrar that announces them to nodes."""
    if not isinstance(args, AppConfig):  # the YAML's args, as Ray hands them over
        args = validated_args(args)
    for warning in config_warnings(args):
        logger.warning(warning)
    models = {}
    inherited = application_runtime_env()
    for model in args.models:
        options = model.serve_options()
        options["ray_actor_options"] = _with_replica_env(options["ray_actor_options"], inherited)
        models[model.name] = _model_deployment(model).options(name=model.deployment_name, **options).bind(model)
    ingress = args.ingress
    return Ingress.options(
        name=INGRESS_DEPLOYMENT,
        num_replicas=ingress.num_replicas,
        max_ongoing_requests=ingress.max_ongoing_requests,
        graceful_shutdown_timeout_s=ingress.graceful_shutdown_timeout_s,
        max_surge_percent=ingress.max_surge_percent,
        ray_actor_options=_with_replica_env({"num_cpus": ingress.num_cpus}, inherited),
    ).bind(args, models, registrar_deployment(args))
