"""The application builder named in `serve_config.yaml` (`import_path: serve_app.app:build_app`).

Ray validates the config's `args` against `AppConfig` before calling this
(the parameter's annotation tells it to), so a bad field fails the deploy with
pydantic's message naming it. Each model becomes its own deployment, with the
resources and scaling of its config; the ingress gets their handles.
"""

from __future__ import annotations

from ray.serve import Application

from serve_app.config import AppConfig, ChatModelConfig, ImageModelConfig
from serve_app.ingress import Ingress
from serve_app.registration import registrar_deployment

INGRESS_NAME = "ingress"


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


def build_app(args: AppConfig) -> Application:
    """One deployment per configured model, the ingress that routes to them, and
    (when registration is enabled) the one registrar that announces them to nodes."""
    if not isinstance(args, AppConfig):  # called directly from Python with a dict
        args = AppConfig.model_validate(args)
    models = {
        model.name: _model_deployment(model)
        .options(name=model.deployment_name, **model.deployment.serve_options())
        .bind(model)
        for model in args.models
    }
    ingress = args.ingress
    return Ingress.options(
        name=INGRESS_NAME,
        num_replicas=ingress.num_replicas,
        max_ongoing_requests=ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": ingress.num_cpus},
    ).bind(args, models, registrar_deployment(args))
