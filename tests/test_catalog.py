"""The /v1/models catalog follows what is live in Ray Serve, not the static config."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest
from ray.serve._private.common import DeploymentStatus, ReplicaState

from serve_app.catalog import LiveCatalog, served_routes
from serve_app.errors import InvalidRequest
from serve_app.config import AppConfig
from serve_app.ingress import Ingress
from tests.conftest import default_args


def _echo_models(cluster, prefix: str, names: list[str]) -> dict:
    """Chat models without weights (`engine: echo`): the catalog does not care what answers,
    and they redeploy in moments."""
    args = cluster.args(route_prefix=prefix)
    args["models"] = [{"name": name, "kind": "chat", "engine": "echo", "path": "echo",
                       "deployment": {"num_cpus": 0.05}} for name in names]
    return args


def test_removed_model_is_unlisted_and_404(cluster):
    from ray import serve

    try:
        base = cluster.deploy(_echo_models(cluster, "/catalog", ["chat-a", "chat-b"]), name="catalog_app",
                              route_prefix="/catalog")
        with httpx.Client(base_url=base, timeout=60) as http:
            listed = {m["model"] for m in http.get("/v1/models").json()["data"]}
            assert listed == {"chat-a", "chat-b"}
            unnamed = {"max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
            ambiguous = http.post("/v1/chat/completions", json=unnamed)
            assert ambiguous.status_code == 400 and ambiguous.json()["error"]["code"] == "missing_model"
            assert "'chat-a', 'chat-b'" in ambiguous.json()["message"]
            no_image_model = http.post("/v1/images/generations", json={"prompt": "otter"})
            assert no_image_model.status_code == 400 and "no image models" in no_image_model.json()["message"]
            cluster.deploy(_echo_models(cluster, "/catalog", ["chat-a"]), name="catalog_app",
                           route_prefix="/catalog")
            assert {m["model"] for m in http.get("/v1/models").json()["data"]} == {"chat-a"}
            gone = http.post("/v1/chat/completions",
                             json={"model": "chat-b", "messages": [{"role": "user", "content": "hi"}]})
            assert gone.status_code == 404 and gone.json()["error"]["param"] == "model"
            still = http.post("/v1/chat/completions", json={
                "model": "chat-a", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
            assert still.status_code == 200
            # With one chat model left, an unnamed request is its (as vLLM serves its one model).
            assert http.post("/v1/chat/completions", json=unnamed).json()["model"] == "chat-a"
    finally:
        serve.delete("catalog_app")


def test_an_image_model_serves_and_lists_only_its_routes(cluster):
    """A model configured `routes: [edits]` (as an inpainting-only checkpoint would be; the tiny SD
    here could do both): /v1/models lists only the
    edit route (its URL too), a generation is a 400 naming what it serves, an edit works."""
    import base64
    import io

    from PIL import Image
    from ray import serve

    args = cluster.args(route_prefix="/editor")
    image = next(m for m in args["models"] if m["kind"] == "image")
    image.update(name="editor", routes=["edits"], default_steps=2)
    image["deployment"]["num_cpus"] = 0.25
    args["models"] = [image]
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, "PNG")
    try:
        base = cluster.deploy(args, name="editor_app", route_prefix="/editor")
        with httpx.Client(base_url=base, timeout=120) as http:
            [card] = http.get("/v1/models").json()["data"]
            assert card["endpoints"] == ["/v1/images/edits"] and card["url"].endswith("/editor/v1/images/edits")
            refused = http.post("/v1/images/generations", json={"prompt": "otter", "size": "64x64"})
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "unsupported_route"
            assert "serves /v1/images/edits" in refused.json()["message"]
            edited = http.post("/v1/images/edits", json={
                "prompt": "otter", "size": "64x64", "response_format": "b64_json",
                "image": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()})
            assert edited.status_code == 200 and edited.json()["model"] == "editor"
    finally:
        serve.delete("editor_app")


def test_an_unnamed_request_goes_to_the_one_model_serving_its_route():
    """A text-to-image model beside an inpainting-only one (`routes: [edits]`): an edit that
    names no model is the editor's, a generation the other's; with no model serving the
    route, or several, the 400 says so, naming only those that serve it."""
    from serve_app.catalog import ModelRouter

    def config(*images: dict) -> AppConfig:
        return AppConfig.model_validate({**default_args(), "models": [
            {"name": name, "kind": "image", "path": "org/x", **fields} for name, fields in images]})

    def router(app: AppConfig) -> ModelRouter:
        handle = SimpleNamespace(options=lambda **_: handle)  # routing alone: nothing is called
        return ModelRouter(app, {model.name: handle for model in app.models})

    def refusal(route_router: ModelRouter, route: str) -> tuple[str, str]:
        with pytest.raises(InvalidRequest) as refused:
            route_router.resolve(None, route)
        return refused.value.code, refused.value.message

    pair = router(config(("SD", {"routes": ["generations"]}), ("SD-inpaint", {"routes": ["edits"]})))
    assert pair.resolve(None, "/v1/images/edits").config.name == "SD-inpaint"
    assert pair.resolve(None, "/v1/images/generations").config.name == "SD"
    assert pair.resolve("SD", "/v1/images/generations").config.name == "SD"
    with pytest.raises(InvalidRequest, match="does not serve /v1/images/edits; it serves /v1/images/generations"):
        pair.resolve("SD", "/v1/images/edits")
    both = router(config(("A", {}), ("B", {}), ("C", {"routes": ["generations"]})))
    assert refusal(both, "/v1/images/edits") == ("missing_model", "model is required: this server serves 'A', 'B' "
                                                                  "on /v1/images/edits.")
    assert refusal(router(config(("A", {"routes": ["generations"]}), ("C", {"routes": ["generations"]}))),
                   "/v1/images/edits") == ("unsupported_route", "No model here serves /v1/images/edits.")
    lone = router(config(("A", {"routes": ["generations"]})))
    assert refusal(lone, "/v1/images/edits")[0] == "unsupported_route"  # named: what it serves
    assert refusal(lone, "/v1/chat/completions") == ("missing_model", "model is required: this server serves "
                                                                      "no chat models.")
    listed = config(("A", {"routes": ["edits", "generations", "edits"]})).models[0]
    assert served_routes(listed) == ["/v1/images/generations", "/v1/images/edits"]  # in order, once each


def _status(app_name: str, deployments: dict, autoscaling: dict | None = None) -> dict:
    """Serve's details as the controller reports them (`get_serve_details()`): per deployment
    its status, its replicas' states and its applied config (`autoscaling` for every
    deployment), among fields the catalog does not read."""
    details = {name: {
        "name": name, "status": status, "status_trigger": "CONFIG_UPDATE_COMPLETED", "message": "",
        "deployment_config": {"name": name, "num_replicas": None if autoscaling else 1,
                              "autoscaling_config": autoscaling, "max_ongoing_requests": 5},
        "replicas": [{"state": state, "replica_id": f"{name}-{state}-{i}", "node_id": "n", "pid": 1}
                     for state, count in replicas.items() for i in range(count)]}
        for name, (status, replicas) in deployments.items()}
    app = {"name": app_name, "route_prefix": "/", "status": "RUNNING", "deployments": details,
           "last_deployed_time_s": 1700000000.5}
    return {"proxy_location": "EveryNode", "applications": {app_name: app}}


def test_deployments_without_a_running_replica_are_not_listed():
    """Serve's status as it reports failed, starting and healthy deployments. A deployment
    with a running replica serves, even while Serve calls it UNHEALTHY (one replica failed
    and its replacement is not up yet)."""
    config = AppConfig.model_validate(default_args())
    chat, image = config.models
    status = _status("app", {
        chat.deployment_name: (DeploymentStatus.HEALTHY, {ReplicaState.RUNNING: 1}),
        image.deployment_name: (DeploymentStatus.UNHEALTHY, {ReplicaState.STARTING: 1}),
    })
    catalog = LiveCatalog(config, "app", status=lambda: status)
    assert [m.config.name for m in asyncio.run(catalog.live_models())] == [chat.name]

    degraded = _status("app", {
        chat.deployment_name: (DeploymentStatus.DEPLOY_FAILED, {}),
        image.deployment_name: (DeploymentStatus.UNHEALTHY, {ReplicaState.RUNNING: 1, ReplicaState.STARTING: 1}),
    })
    live = asyncio.run(LiveCatalog(config, "app", status=lambda: degraded).live_models())
    assert [(m.config.name, m.scaled_to_zero) for m in live] == [(image.name, False)]

    # Scaled to zero on purpose: the autoscaling config in force, which the Serve config's
    # `deployments:` may set without the app's args saying so, allows zero replicas.
    zero = {"min_replicas": 0, "max_replicas": 2}
    idle = _status("app", {chat.deployment_name: (DeploymentStatus.HEALTHY, {})}, autoscaling=zero)
    failed = _status("app", {chat.deployment_name: (DeploymentStatus.DEPLOY_FAILED, {})}, autoscaling=zero)
    fixed = _status("app", {chat.deployment_name: (DeploymentStatus.HEALTHY, {})},
                    autoscaling={"min_replicas": 1, "max_replicas": 2})
    assert [(m.config.name, m.scaled_to_zero) for m in asyncio.run(
        LiveCatalog(config, "app", status=lambda: idle).live_models())] == [(chat.name, True)]
    assert asyncio.run(LiveCatalog(config, "app", status=lambda: failed).live_models()) == []
    assert asyncio.run(LiveCatalog(config, "app", status=lambda: fixed).live_models()) == []

    starting = _status("app", {
        chat.deployment_name: (DeploymentStatus.UPDATING, {ReplicaState.STARTING: 1}),
        image.deployment_name: (DeploymentStatus.UPSCALING, {ReplicaState.RUNNING: 2, ReplicaState.STARTING: 1}),
    })
    catalog = LiveCatalog(config, "app", status=lambda: starting)
    live = asyncio.run(catalog.live_models())
    assert [m.config.name for m in live] == [image.name] and live[0].created == 1700000000
    assert asyncio.run(LiveCatalog(config, "other-app", status=lambda: starting).live_models()) == []


def test_a_replica_moving_off_a_draining_node_still_serves_and_nothing_serves_without_an_ingress():
    """Serve keeps routing to a replica it is moving off a draining node (PENDING_MIGRATION)
    until its replacement runs, a whole model load later: the model stays listed (and
    registered). Without a running ingress no request reaches any model: nothing is live,
    so the registrar does not announce models whose routes answer nothing."""
    from serve_app.config import INGRESS_DEPLOYMENT as INGRESS_NAME

    config = AppConfig.model_validate(default_args())
    chat, image = config.models
    moving = {chat.deployment_name: (DeploymentStatus.UPDATING, {ReplicaState.PENDING_MIGRATION: 1,
                                                                   ReplicaState.STARTING: 1}),
              image.deployment_name: (DeploymentStatus.HEALTHY, {ReplicaState.RUNNING: 1})}

    def live(deployments) -> list[str]:
        status = _status("app", deployments)
        return [m.config.name for m in asyncio.run(LiveCatalog(config, "app", status=lambda: status).live_models())]

    assert live(moving) == [chat.name, image.name]
    assert live({**moving, INGRESS_NAME: (DeploymentStatus.HEALTHY, {ReplicaState.RUNNING: 1})}) == [chat.name, image.name]
    assert live({**moving, INGRESS_NAME: (DeploymentStatus.DEPLOY_FAILED, {ReplicaState.STARTING: 1})}) == []


def test_a_status_read_that_fails_keeps_the_last_catalog_and_is_retried_once_per_ttl(monkeypatch):
    """Serve's status raises (the controller restarting): /v1/models, /ready and the registrar
    keep the last catalog, and the absent controller is asked once per `catalog_ttl_s`, not
    once per request."""
    from serve_app import catalog as catalog_module

    config = AppConfig.model_validate({**default_args(), "catalog_ttl_s": 0.2})
    chat, image = config.models
    healthy = _status("app", {chat.deployment_name: (DeploymentStatus.HEALTHY, {ReplicaState.RUNNING: 1})})
    calls = []

    def status():
        calls.append(1)
        if len(calls) > 1:
            raise ConnectionError("the controller is away")
        return healthy

    catalog = LiveCatalog(config, "app", status=status)
    # The catalog's clock, not the machine's: a slow machine's stalls cannot add or drop a refresh.
    now = [0.0]
    monkeypatch.setattr(catalog_module, "time", SimpleNamespace(monotonic=lambda: now[0]))

    async def run() -> list[list[str]]:
        seen = []
        for step in range(12):  # 0.66 s, read every 0.06 s: stale at 0.24 and 0.48 (TTL 0.2)
            now[0] = step * 0.06
            seen.append([m.config.name for m in await catalog.live_models()])
        return seen

    assert asyncio.run(run()) == [[chat.name]] * 12
    assert len(calls) == 3, calls


def test_a_controller_that_does_not_answer_holds_no_caller_for_long(monkeypatch):
    """Serve's status hangs (GCS trouble): callers get the last catalog after a bounded wait,
    and the one refresh under way is not joined by another for each caller."""
    import threading

    from serve_app import catalog as catalog_module

    config = AppConfig.model_validate({**default_args(), "catalog_ttl_s": 0.01})
    chat, image = config.models
    healthy = _status("app", {chat.deployment_name: (DeploymentStatus.HEALTHY, {ReplicaState.RUNNING: 1})})
    calls, hang = [], threading.Event()

    def status():
        calls.append(1)
        if len(calls) > 1:
            hang.wait(30)
        return healthy

    monkeypatch.setattr(catalog_module, "STATUS_WAIT_S", 0.3)
    catalog = LiveCatalog(config, "app", status=status)

    async def run():
        first = await catalog.live_models()
        await asyncio.sleep(0.05)  # stale now
        started = asyncio.get_running_loop().time()
        later = await asyncio.gather(*(catalog.live_models() for _ in range(5)))
        waited = asyncio.get_running_loop().time() - started
        hang.set()
        return first, later, waited

    try:
        first, later, waited = asyncio.run(run())
    finally:
        hang.set()
    assert [m.config.name for m in first] == [chat.name] and all(models == first for models in later)
    assert waited < 5 and len(calls) == 2


@pytest.mark.parametrize("app_status", ["DEPLOYING", "DEPLOY_FAILED"])
def test_a_config_being_built_or_failed_to_build_keeps_the_catalog_before_it(app_status):
    """While Serve builds a redeployed config's application, and after that build fails, it
    lists none of the application's deployments, though the previous config's replicas serve
    on: the models stay listed, `/ready` stays 200 and the nodes keep them (found live: every
    `args` change emptied /v1/models for 6-10 s, and sent the nodes an empty model list)."""
    config = AppConfig.model_validate(default_args())
    chat, image = config.models
    serving = _status("app", {chat.deployment_name: (DeploymentStatus.HEALTHY, {ReplicaState.RUNNING: 1}),
                              image.deployment_name: (DeploymentStatus.HEALTHY, {ReplicaState.RUNNING: 1})})
    building = _status("app", {})
    building["applications"]["app"]["status"] = app_status
    failing = _status("app", {chat.deployment_name: (DeploymentStatus.DEPLOY_FAILED, {}),
                              image.deployment_name: (DeploymentStatus.HEALTHY, {ReplicaState.RUNNING: 1})})
    running_empty = _status("app", {})  # RUNNING, yet no deployment: nothing is live

    def names_after(*states: dict) -> list[str]:
        """The catalog after refreshing from each state in turn."""
        catalog = LiveCatalog(config, "app", status=lambda: state)
        for state in states:
            asyncio.run(catalog._refresh())  # noqa: SLF001 - each refresh reads the next state
        return [m.config.name for m in catalog._live]  # noqa: SLF001

    assert names_after(serving, building) == names_after(serving, building, building) == [chat.name, image.name]
    assert names_after(serving, running_empty) == [] and names_after(building) == []
    after_failure = LiveCatalog(config, "app", status=lambda: state)
    for state in (failing, building):  # what was failed before the build stays failed
        asyncio.run(after_failure._refresh())  # noqa: SLF001
    assert after_failure.has_failed(chat.name) and not after_failure.has_failed(image.name)


def test_a_model_is_failed_only_while_serve_gave_up_and_no_replica_runs():
    config = AppConfig.model_validate(default_args())
    chat, image = config.models

    def failed(status) -> list[str]:
        catalog = LiveCatalog(config, "app", status=lambda: status)
        asyncio.run(catalog.live_models())
        return [m.name for m in config.models if catalog.has_failed(m.name)]

    assert failed(_status("app", {chat.deployment_name: (DeploymentStatus.DEPLOY_FAILED, {}),
                                  image.deployment_name: (DeploymentStatus.UPDATING, {})})) == [chat.name]
    # Still running replicas of an older version serve; a rollout that has not given up may yet.
    assert failed(_status("app", {chat.deployment_name: (DeploymentStatus.DEPLOY_FAILED, {ReplicaState.RUNNING: 1}),
                                  image.deployment_name: (DeploymentStatus.UNHEALTHY, {})})) == []


def test_a_model_a_redeploy_removed_is_a_404_at_once_from_the_outgoing_ingress():
    """A redeploy dropped the chat model; this ingress replica, of the config before, still gets
    a request for it (HAProxy's pick while it drains): a 404 at once, as the new config's ingress
    answers, not a wait for a replica that never comes (until the drain ends, in plain text)."""
    from serve_app.errors import NotFound

    config = AppConfig.model_validate(default_args())
    chat, image = config.models
    running = (DeploymentStatus.HEALTHY, {ReplicaState.RUNNING: 1})
    status = _status("app", {"ingress": running, image.deployment_name: running})  # the chat model's is gone
    catalog = LiveCatalog(config, "app", status=lambda: status)
    asyncio.run(catalog.live_models())
    assert catalog.was_removed(chat.name) and not catalog.was_removed(image.name)
    other = LiveCatalog(config, "other", status=lambda: status)
    asyncio.run(other.live_models())
    assert not other.was_removed(chat.name)  # no such app in the status: no verdict

    cancelled = []
    ingress = SimpleNamespace(config=config, catalog=catalog)

    async def request() -> None:
        never = asyncio.get_running_loop().create_future()  # as a model call that no replica takes
        await Ingress.func_or_class._within_timeout(ingress, SimpleNamespace(config=chat), never,
                                                    lambda: cancelled.append(True))

    with pytest.raises(NotFound) as raised:
        asyncio.run(request())
    assert raised.value.code == "model_not_found" and cancelled == [True]


def test_a_request_waiting_for_a_starting_model_ends_once_it_fails_to_start(caplog):
    """The model is starting when the request comes; once the catalog sees Serve give up on it,
    the request is a 503 `model_failed` (not a wait for `request_timeout_s`), the call is
    cancelled, and the abandoned wait's own end (Serve raises its cancellation error into it)
    is no "exception never retrieved" in the log."""
    import gc
    import time

    from serve_app.errors import ModelFailed
    from serve_app.ingress import UNAVAILABLE_POLL_S

    config = AppConfig.model_validate({**default_args(), "catalog_ttl_s": 0.05})
    chat, image = config.models
    starting = _status("app", {"ingress": (DeploymentStatus.HEALTHY, {ReplicaState.RUNNING: 1}),
                               chat.deployment_name: (DeploymentStatus.UPDATING, {ReplicaState.STARTING: 1})})
    failed = _status("app", {"ingress": (DeploymentStatus.HEALTHY, {ReplicaState.RUNNING: 1}),
                             chat.deployment_name: (DeploymentStatus.DEPLOY_FAILED, {})})
    states = [starting]
    catalog = LiveCatalog(config, "app", status=lambda: states[-1])
    ingress = SimpleNamespace(config=config, catalog=catalog)
    cancelled = []

    async def model_call() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            raise RuntimeError("request cancelled") from None  # as Serve's RequestCancelledError

    async def request() -> float:
        await catalog.live_models()
        assert not await catalog.is_running(chat.name) and catalog.unavailable(chat.name) is None
        asyncio.get_running_loop().call_later(0.3, states.append, failed)
        started = time.monotonic()
        with pytest.raises(ModelFailed):
            await Ingress.func_or_class._within_timeout(ingress, SimpleNamespace(config=chat), model_call(),
                                                        lambda: cancelled.append(True))
        await asyncio.sleep(0.05)  # the abandoned wait ends
        return time.monotonic() - started

    with caplog.at_level("ERROR", logger="asyncio"):
        took = asyncio.run(request())
        gc.collect()
    assert took < 0.3 + 2 * UNAVAILABLE_POLL_S and cancelled == [True]
    assert "never retrieved" not in caplog.text


def test_a_request_waiting_on_a_running_model_ends_once_a_redeploy_removes_it(caplog):
    """The model is running when the request comes, so the ingress's catalog has no reason to
    doubt it; a redeploy then drops it, and this replica, of the config before, is left holding a
    request no replica will take (from live QA: each hung until the client gave up). Once the
    catalog sees the model gone, the request is a 404 `model_not_found`, the model call is
    cancelled, and a request whose client leaves meanwhile is still a cancellation."""
    import time

    from serve_app.errors import NotFound
    from serve_app.ingress import UNAVAILABLE_POLL_S

    config = AppConfig.model_validate({**default_args(), "catalog_ttl_s": 0.05})
    chat, image = config.models
    running = (DeploymentStatus.HEALTHY, {ReplicaState.RUNNING: 1})
    states = [_status("app", {"ingress": running, chat.deployment_name: running, image.deployment_name: running})]
    removed = _status("app", {"ingress": running, image.deployment_name: running})
    catalog = LiveCatalog(config, "app", status=lambda: states[-1])
    ingress = SimpleNamespace(config=config, catalog=catalog)
    cancelled, model_calls_ended = [], []

    async def model_call() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            model_calls_ended.append(True)

    async def request() -> None:
        await Ingress.func_or_class._within_timeout(ingress, SimpleNamespace(config=chat), model_call(),
                                                    lambda: cancelled.append(True))

    async def scenario() -> float:
        assert await catalog.is_running(chat.name) and catalog.unavailable(chat.name) is None
        left = asyncio.create_task(request())  # a client that leaves before the model is removed
        await asyncio.sleep(0.1)
        left.cancel()
        with pytest.raises(asyncio.CancelledError):
            await left
        asyncio.get_running_loop().call_later(0.3, states.append, removed)
        started = time.monotonic()
        with pytest.raises(NotFound) as raised:
            await request()
        assert raised.value.code == "model_not_found"
        return time.monotonic() - started

    async def reached_a_replica() -> str:
        """A call a replica of the removed model already runs: that replica finishes it (within
        its graceful_shutdown_timeout_s), so the request waits for its answer."""
        states.append(states[0])
        await asyncio.sleep(0.1)  # past the catalog's ttl: read again
        assert await catalog.is_running(chat.name)
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, states.append, removed)
        answer = loop.create_future()
        loop.call_later(2.5 * UNAVAILABLE_POLL_S, answer.set_result, "answered")
        answered = await Ingress.func_or_class._within_timeout(ingress, SimpleNamespace(config=chat), answer,
                                                               lambda: cancelled.append("reached"), reached=lambda: True)
        assert catalog.was_removed(chat.name)  # seen meanwhile, and the call left alone
        return answered

    with caplog.at_level("ERROR", logger="asyncio"):
        took = asyncio.run(scenario())
        assert asyncio.run(reached_a_replica()) == "answered"
    assert 0.3 <= took < 0.3 + 2 * UNAVAILABLE_POLL_S
    assert cancelled == [True, True] and model_calls_ended == [True, True]
    assert "never retrieved" not in caplog.text


def test_a_call_has_reached_a_replica_once_serves_router_has_handed_it_over():
    """Pins the private attribute `reached_a_replica` reads on Serve's responses (Serve has no
    public way to ask): a response whose replica future is done has reached a replica."""
    import concurrent.futures

    from ray.serve.handle import DeploymentResponse, DeploymentResponseGenerator

    from serve_app.ingress import reached_a_replica

    for kind in (DeploymentResponse, DeploymentResponseGenerator):
        future: concurrent.futures.Future = concurrent.futures.Future()
        response = kind(future, SimpleNamespace(request_id="r"))
        assert not reached_a_replica(response)
        future.set_result(object())
        assert reached_a_replica(response)
    assert not reached_a_replica(object())


def test_a_model_a_redeploy_adds_is_a_retryable_503_from_the_outgoing_ingress():
    """A redeploy adds a model; until the new config's ingress takes the requests (14-16 s in
    operator QA), this replica, of the config before, gets requests for it: a 503
    `model_starting` with Retry-After, which clients retry, not a 404, which they do not. A name
    the application has no deployment for is still a 404."""
    from serve_app.errors import NotFound, Overloaded
    from serve_app.catalog import ModelRouter

    config = AppConfig.model_validate(default_args())
    chat, image = config.models
    running = (DeploymentStatus.HEALTHY, {ReplicaState.RUNNING: 1})
    status = _status("app", {"ingress": running, chat.deployment_name: running, image.deployment_name: running,
                             "model_Llama-B": (DeploymentStatus.UPDATING, {ReplicaState.STARTING: 1})})
    catalog = LiveCatalog(config, "app", status=lambda: status)
    asyncio.run(catalog.live_models())
    assert catalog.being_added("Llama-B") and not catalog.being_added(chat.name)
    assert not catalog.being_added("Llama-C")
    # A name that sanitizes to a configured model's deployment is no model being added (from a review).
    args = default_args()
    args["models"][0]["name"] = "org/Llama3:8B"
    slashed = AppConfig.model_validate(args)
    named = _status("app", {"ingress": running, slashed.models[0].deployment_name: running})
    aliases = LiveCatalog(slashed, "app", status=lambda: named)
    asyncio.run(aliases.live_models())
    assert not aliases.being_added("org_Llama3_8B") and not aliases.being_added("org@Llama3+8B")
    handle = SimpleNamespace(options=lambda **kwargs: None)
    ingress = SimpleNamespace(config=config, catalog=catalog,
                              router=ModelRouter(config, {model.name: handle for model in config.models}))

    def target(name: str):
        body = SimpleNamespace(model=name)
        return Ingress.func_or_class._target(ingress, body, "/v1/chat/completions", lambda: "")

    with pytest.raises(Overloaded) as starting:
        target("Llama-B")
    assert starting.value.code == "model_starting" and starting.value.headers == {"Retry-After": "10"}
    with pytest.raises(NotFound):
        target("Llama-C")
    assert target(chat.name).config is chat


def test_ready_is_503_naming_the_models_without_a_live_replica():
    """`/ready` (a load balancer's readiness probe) as the ingress answers it, on Serve's
    status with the image model still starting, then with both running."""
    config = AppConfig.model_validate(default_args())
    chat, image = config.models
    status = _status("app", {chat.deployment_name: (DeploymentStatus.HEALTHY, {ReplicaState.RUNNING: 1}),
                             image.deployment_name: (DeploymentStatus.UPDATING, {ReplicaState.STARTING: 1})})
    ingress = SimpleNamespace(config=config, catalog=LiveCatalog(config, "app", status=lambda: status))
    starting = asyncio.run(Ingress.func_or_class.ready(ingress))
    assert starting.status_code == 503 and json.loads(starting.body) == {"ready": False, "missing": [image.name]}

    status = _status("app", {model.deployment_name: (DeploymentStatus.HEALTHY, {ReplicaState.RUNNING: 1})
                             for model in config.models})
    ingress.catalog = LiveCatalog(config, "app", status=lambda: status)
    ready = asyncio.run(Ingress.func_or_class.ready(ingress))
    assert ready.status_code == 200 and json.loads(ready.body) == {"ready": True, "missing": []}


def test_an_unreachable_controller_is_said_once_and_the_live_set_is_unknown_until_read(serve_caplog):
    """The registrar polls every second: an absent controller is logged once (with its
    traceback), and once more when it is back, not at every refresh; until Serve's state has
    been read, the live set is unknown (the registrar registers nothing), not empty."""
    import logging

    from serve_app.catalog import CatalogUnknown

    config = AppConfig.model_validate({**default_args(), "catalog_ttl_s": 0})
    chat, _ = config.models
    healthy = _status("app", {chat.deployment_name: (DeploymentStatus.HEALTHY, {ReplicaState.RUNNING: 1})})
    away = {"on": True}

    def status():
        if away["on"]:
            raise ConnectionError("the controller is away")
        return healthy

    catalog = LiveCatalog(config, "app", status=status)
    serve_caplog.set_level(logging.INFO, logger="ray.serve")

    async def run():
        for _ in range(4):
            with pytest.raises(CatalogUnknown):
                await catalog.known_live_models()
        away["on"] = False
        return await catalog.known_live_models()

    live = asyncio.run(run())
    assert [model.config.name for model in live] == [chat.name]
    said = [record.getMessage() for record in serve_caplog.records if "Serve status" in record.getMessage()]
    assert said == ["could not read Serve status; keeping the last catalog", "read Serve status again"], said
