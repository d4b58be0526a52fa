"""The model catalog: which models are live for `GET /v1/models`, and which handle serves a name.

Built from what Ray Serve reports right now, not from the static config: a
model whose deployment is gone, failed or has no running replica is not
listed, so a node never forwards traffic to a model that cannot answer.
Whether a model is scaled to zero on purpose comes from the scaling options in
force, which an operator may have changed under the Serve config's
`deployments:` without touching this app's args. Reading Serve's state is a
blocking call to the Serve controller, so it runs on a thread, and its answer
is cached for `catalog_ttl_s`; concurrent callers share one refresh.

The controller's answer is read into `ServeState`, a schema of only the fields
used here, not into Serve's own `ServeInstanceDetails`: building that one
cloudpickles each deployment's request router class, about 50 ms of CPU (and
of the GIL) per refresh on a 2-core machine, repeated every `catalog_ttl_s`
while requests arrive, which slowed the model replicas' work and the
ingress's other requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, Field
from ray.serve.context import _get_global_client
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ApplicationStatus, DeploymentStatus, ReplicaState

from serve_app.config import INGRESS_DEPLOYMENT, AppConfig, ChatModelConfig, ImageModelConfig, model_deployment_name
from serve_app.errors import APIError, InvalidRequest, ModelFailed, model_not_found
from serve_app import routes

logger = logging.getLogger("ray.serve")

ROUTES = {
    "chat": [routes.CHAT],
    "image": [routes.GENERATIONS, routes.EDITS],
}
"""The routes of each kind of model; an image model may serve fewer (`served_routes`)."""


def served_routes(model: ChatModelConfig | ImageModelConfig) -> list[str]:
    """The routes this model answers: its kind's, or those its config's `routes` names."""
    named = getattr(model, "routes", None)
    return [route for route in ROUTES[model.kind] if named is None or route.rsplit("/", 1)[1] in named]


ROUTE_KINDS = {route: kind for kind, kind_routes in ROUTES.items() for route in kind_routes}
KIND_NAMES = {"chat": "a chat model", "image": "an image model"}
_DOWN = {DeploymentStatus.UNHEALTHY.value, DeploymentStatus.DEPLOY_FAILED.value}
_BUILDING = {ApplicationStatus.DEPLOYING.value, ApplicationStatus.DEPLOY_FAILED.value}


@dataclass(frozen=True)
class LiveModel:
    config: ChatModelConfig | ImageModelConfig
    created: int
    scaled_to_zero: bool = False


class ReplicaInfo(BaseModel):
    state: str  # a `ReplicaState` value; a plain string, so a state a newer Ray adds still parses


STATUS_WAIT_S = 10.0
"""Longest a caller waits for Serve's status before it takes the last catalog."""
SERVING_STATES = frozenset({ReplicaState.RUNNING.value, ReplicaState.PENDING_MIGRATION.value})


class AppliedConfig(BaseModel):
    """The deployment config in force, overrides from the Serve config's `deployments:` included."""

    autoscaling_config: dict[str, Any] | None = None


class DeploymentState(BaseModel):
    status: str  # a `DeploymentStatus` value
    replicas: list[ReplicaInfo] = Field(default_factory=list)
    deployment_config: AppliedConfig = Field(default_factory=AppliedConfig)

    @property
    def running(self) -> int:
        """Replicas that take requests: running ones, and those Serve is moving off a draining
        node, which it keeps routing to until their replacement runs (a whole model load)."""
        return sum(replica.state in SERVING_STATES for replica in self.replicas)

    @property
    def min_replicas(self) -> int | None:
        """The autoscaling lower bound in force, or None for a fixed replica count."""
        return (self.deployment_config.autoscaling_config or {}).get("min_replicas")


class ApplicationState(BaseModel):
    status: str = ""  # an `ApplicationStatus` value
    last_deployed_time_s: float = 0.0
    deployments: dict[str, DeploymentState] = Field(default_factory=dict)

    @property
    def building(self) -> bool:
        """Serve lists an application's deployments from the config it is applying: none while
        a new config's application is being built (DEPLOYING, seconds), nor after that build
        failed (DEPLOY_FAILED, until the next deploy). Meanwhile the deployments of the config
        before serve on, unlisted: what they serve is unknown here, not nothing."""
        return not self.deployments and self.status in _BUILDING


class ServeState(BaseModel):
    """What the catalog reads of Serve's details (the shape of `serve status` and of Serve's
    REST API); every other field of the controller's answer is ignored."""

    applications: dict[str, ApplicationState] = Field(default_factory=dict)


def serve_details() -> dict[str, Any]:
    """Serve's state as the controller reports it to `serve.status()`, before that drops each
    deployment's applied config (the scaling options in force, overrides included)."""
    return _get_global_client().get_serve_details()


class CatalogUnknown(Exception):
    """Serve's state has not been read yet: what is live is unknown."""


class LiveCatalog:
    def __init__(self, config: AppConfig, app_name: str,
                 status: Callable[[], dict[str, Any]] = serve_details) -> None:
        self.config = config
        self.app_name = app_name
        self._status = status
        self._live: list[LiveModel] = []
        self._failed: frozenset[str] = frozenset()
        self._removed: frozenset[str] = frozenset()
        self._deployments: frozenset[str] = frozenset()  # the application's, as Serve last said
        self._fetched_at = float("-inf")
        self._refreshing: asyncio.Task | None = None
        self._read_once = False  # a read of Serve's state has succeeded: `_live` is known, not a start value
        self._failing = False  # the last read failed (said once per outage)

    async def live_models(self) -> list[LiveModel]:
        """Models with a running replica, or scaled to zero on purpose (cached briefly)."""
        refreshing = self._refresh_if_stale()
        if refreshing is not None:
            # A controller that does not answer (GCS trouble) must not hold up /v1/models, /ready
            # and the registrar: after a while they get the last catalog, and the one refresh
            # under way goes on (no second thread is started while it hangs).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(refreshing), STATUS_WAIT_S)
        return self._live

    async def known_live_models(self) -> list[LiveModel]:
        """`live_models`, but raising `CatalogUnknown` until Serve's state has been read once: the
        registrar must not take a controller it could not reach yet for "nothing is live" (it
        would register an empty list, taking live models off the network)."""
        live = await self.live_models()
        if not self._read_once:
            raise CatalogUnknown("Serve's state has not been read yet")
        return live

    def _refresh_if_stale(self) -> asyncio.Task | None:
        """The refresh under way, started if the cached state is older than `catalog_ttl_s`;
        None while it is fresh."""
        if time.monotonic() - self._fetched_at <= self.config.catalog_ttl_s:
            return None
        if self._refreshing is None or self._refreshing.done():
            # Its own context: shared by every caller, it is none of the first one's request.
            self._refreshing = asyncio.create_task(self._refresh(), context=contextvars.Context())
        return self._refreshing

    async def _refresh(self) -> None:
        try:
            status = await asyncio.to_thread(lambda: ServeState.model_validate(self._status()))
        except Exception:  # noqa: BLE001 - keep the last known catalog while the controller is away
            # Once per outage with its traceback, not at every refresh (one a TTL, for as long as it lasts).
            if not self._failing:
                logger.warning("could not read Serve status; keeping the last catalog", exc_info=True)
            self._failing = True
        else:
            if self._failing:
                logger.info("read Serve status again")
            self._failing = False
            app = status.applications.get(self.app_name)
            if app is None or not app.building:  # building: the catalog before it stands (see `building`)
                self._read_once = True
                self._live = self._from_status(status)
                self._failed = self._failed_from(status)
                self._removed = self._removed_from(status)
                self._deployments = frozenset(app.deployments) if app is not None else frozenset()
        self._fetched_at = time.monotonic()  # after a failure too: ask an absent controller once per TTL

    def _from_status(self, status: ServeState) -> list[LiveModel]:
        app = status.applications.get(self.app_name)
        if app is None:
            return []
        ingress = app.deployments.get(INGRESS_DEPLOYMENT)
        if ingress is not None and ingress.running == 0:  # no route reaches the models (what the registrar
            return []                                    # announces; an ingress asking is running itself)
        live = []
        for model in self.config.models:
            deployment = app.deployments.get(model.deployment_name)
            if deployment is None:
                continue
            # A running replica serves whatever the deployment's status: Serve calls a deployment
            # UNHEALTHY from one failed replica until its replacement is up, however many still run.
            running = deployment.running
            scaled_to_zero = running == 0 and deployment.min_replicas == 0 and deployment.status not in _DOWN
            if running > 0 or scaled_to_zero:  # a scaled-to-zero model wakes on its first request
                live.append(LiveModel(config=model, created=int(app.last_deployed_time_s),
                                      scaled_to_zero=scaled_to_zero))
        return live

    def _failed_from(self, status: ServeState) -> frozenset[str]:
        """Models whose deployment Serve gave up on (its replicas kept failing to start) and
        that have no replica left: no request to them can be answered."""
        app = status.applications.get(self.app_name)
        deployments = app.deployments if app is not None else {}
        return frozenset(
            model.name for model in self.config.models
            if (deployment := deployments.get(model.deployment_name)) is not None
            and deployment.status == DeploymentStatus.DEPLOY_FAILED.value and deployment.running == 0)

    def _removed_from(self, status: ServeState) -> frozenset[str]:
        """Models of this replica's config whose deployment the application no longer has: a
        redeploy dropped them, and this replica, of the config before, is on its way out. A
        request it still gets for one would wait for a replica that never comes."""
        app = status.applications.get(self.app_name)
        if app is None or not app.deployments:
            return frozenset()
        return frozenset(model.name for model in self.config.models if model.deployment_name not in app.deployments)

    def being_added(self, name: str) -> bool:
        """Whether a redeploy is adding a model this replica's config does not have: the
        application has its deployment, and this replica, of the config before, still takes
        requests while the new config's ingress starts (by the last known state)."""
        self._refresh_if_stale()
        deployment = model_deployment_name(name)  # two names can share one ('a b' and 'a_b'): not a new model
        return deployment in self._deployments and all(m.deployment_name != deployment for m in self.config.models)

    def was_removed(self, name: str) -> bool:
        """Whether a redeploy removed the model (see `_removed_from`), by the last known state."""
        self._refresh_if_stale()
        return name in self._removed

    def has_failed(self, name: str) -> bool:
        """Whether the model's deployment failed (see `_failed_from`), by the last known state:
        a request never waits on the controller for it; a stale state is refreshed in the
        background for the requests after."""
        self._refresh_if_stale()
        return name in self._failed

    def unavailable(self, name: str) -> APIError | None:
        """The error for a model no request to can be answered, by the last known state: one a
        redeploy removed (this replica, of the config before, is on its way out), or one whose
        replicas failed to start (a request would wait out its timeout in Serve's queue)."""
        if self.was_removed(name):
            return model_not_found(name)
        if self.has_failed(name):
            return ModelFailed(f"The model {name!r} is not available: its replicas failed to start. The server's "
                               "operator has to fix and redeploy it.")
        return None

    async def is_running(self, name: str) -> bool:
        """Whether the model has a running replica now (not scaled to zero, not starting)."""
        return any(m.config.name == name and not m.scaled_to_zero for m in await self.live_models())

    def url_for(self, model: ChatModelConfig | ImageModelConfig) -> str:
        """The route a client calls for this model (generations for image models that make them)."""
        return self.config.public_base_url + served_routes(model)[0]


@dataclass(frozen=True)
class Target:
    """A configured model and the cached handles that call it."""

    config: ChatModelConfig | ImageModelConfig
    generate: DeploymentHandle
    stream: DeploymentHandle | None  # chat models: `generate_stream`, a streaming handle


class ModelRouter:
    """Resolves a request's `model` to its deployment: the one place that does it.

    Targets (and their handles' `.options()` copies) are made once here, so a
    request costs one dict lookup.
    """

    def __init__(self, config: AppConfig, handles: dict[str, DeploymentHandle]) -> None:
        self._targets = {
            model.name: Target(
                model,
                handles[model.name].options(method_name="generate"),
                handles[model.name].options(method_name="generate_stream", stream=True)
                if model.kind == "chat" else None,
            )
            for model in config.models
        }

        self._names_by_kind = {kind: [m.name for m in config.models if m.kind == kind] for kind in ROUTES}
        self._names_by_route = {route: [m.name for m in config.models if route in served_routes(m)]
                                for route in ROUTE_KINDS}

    def resolve(self, name: str | None, route: str) -> Target:
        """The target named `name` for a request to `route`; an omitted name means the one model
        that serves the route, as vLLM serves its model and OpenAI's client may leave `model`
        out of an image request."""
        kind = ROUTE_KINDS[route]
        target = self._only(route) if not name else self._targets.get(name)
        if target is None:
            raise model_not_found(name or "")
        if target.config.kind != kind:
            raise InvalidRequest(
                f"The model {name!r} is {KIND_NAMES[target.config.kind]}; call "
                f"{served_routes(target.config)[0]} for it.", param="model", code="wrong_model_kind")
        served = served_routes(target.config)
        if route not in served:
            raise InvalidRequest(f"The model {target.config.name!r} does not serve {route}; it serves "
                                 f"{', '.join(served)}.", param="model", code="unsupported_route")
        return target

    def _only(self, route: str) -> Target:
        """The one model serving `route` (or, where none does, the one model of its kind, which
        `resolve` then refuses, naming what it serves)."""
        serving, kind = self._names_by_route[route], ROUTE_KINDS[route]
        of_kind = self._names_by_kind[kind]
        if len(serving) == 1 or (not serving and len(of_kind) == 1):
            return self._targets[(serving or of_kind)[0]]
        if not of_kind:
            raise InvalidRequest(f"model is required: this server serves no {kind} models.", param="model",
                                 code="missing_model")
        if not serving:
            raise InvalidRequest(f"No model here serves {route}.", param="model", code="unsupported_route")
        raise InvalidRequest(f"model is required: this server serves {', '.join(map(repr, serving))} on {route}.",
                             param="model", code="missing_model")
