"""Registration with the communication node (issue 6), against a real HTTP fake node.

The `Registrar` tests run without Ray: a list stands in for the live catalog,
so each scenario (start, change, node down, node errors, node restart,
shutdown) takes a fraction of a second. One end-to-end test runs the whole
application on Ray Serve and watches the node.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import logging
import re
import socket
import threading
import time
from typing import Any, Callable, Iterator

import httpx
import pytest

from tests.conftest import wait_for
from tests.fake_node import FakeNode
from serve_app.catalog import LiveModel
from serve_app.config import AppConfig, config_warnings, with_credentials
from serve_app.registration import REGISTER_PATH, UNREGISTER_PATH, Registrar, registrar_deployment, shown_url

PROJECT = "TestProject"
BASE = "http://127.0.0.1:1088"
CHAT = {"model": "Llama3-8B", "api": f"{BASE}/v1/chat/completions", "type": 0, "cid": "cid-llama"}
IMAGE_GEN = {"model": "SuperImage", "api": f"{BASE}/v1/images/generations", "type": 1, "cid": "cid-sd"}
# An image model that also generates names its generations URL for edits too (the node finds
# an entry by model name alone, and that route takes both); an editor alone names its own.
IMAGE_EDIT = {"model": "SuperImage", "api": f"{BASE}/v1/images/generations", "type": 2, "cid": "cid-sd"}
EDITOR_ONLY = {**IMAGE_EDIT, "api": f"{BASE}/v1/images/edits"}


def make_config(node_urls: list[str], base_url: str = BASE, **registration: Any) -> AppConfig:
    options = {"enabled": True, "node_urls": node_urls, "interval_s": 30, "timeout_s": 1, "retry_max_s": 0.2}
    return AppConfig.model_validate({
        "project": PROJECT, "public_base_url": base_url,
        "registration": {**options, **registration},
        "models": [
            {"name": "Llama3-8B", "kind": "chat", "path": "org/tiny-llama", "cid": "cid-llama"},
            {"name": "SuperImage", "kind": "image", "path": "org/tiny-sd", "cid": "cid-sd"},
        ],
    })


class FakeLive:
    """The live catalog as the registrar sees it: the configured models named in `names`."""

    def __init__(self, config: AppConfig, *names: str) -> None:
        self.config, self.names = config, set(names)

    async def __call__(self) -> list[LiveModel]:
        return [LiveModel(config=m, created=0) for m in self.config.models if m.name in self.names]


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def node() -> Iterator[FakeNode]:
    fake = FakeNode().start()
    yield fake
    fake.stop()


def started(config: AppConfig, live: FakeLive) -> Registrar:
    registrar = Registrar(config, live, poll_s=0.02)
    registrar.start()
    return registrar


def node_status(registrar: Registrar, index: int = 0) -> dict[str, Any]:
    return registrar.status().model_dump()["nodes"][index]


# ---------------------------------------------------------------- Registrar, no Ray


@pytest.mark.anyio
async def test_registers_each_live_model_once_per_type_then_unregisters(node: FakeNode) -> None:
    config = make_config([node.url])
    registrar = started(config, FakeLive(config, "Llama3-8B", "SuperImage"))
    await eventually(lambda: node.models_of(PROJECT) is not None)
    await asyncio.sleep(0.2)  # several polls with no change: still one registration

    assert node.bodies(REGISTER_PATH) == [{"project": PROJECT, "models": [CHAT, IMAGE_GEN, IMAGE_EDIT]}]
    status = node_status(registrar)
    assert status["state"] == "registered" and status["last_error"] is None
    assert status["models"] == [CHAT, IMAGE_GEN, IMAGE_EDIT] and status["last_success"] > 0

    await registrar.stop()
    assert node.bodies(UNREGISTER_PATH) == [{"project": PROJECT}]
    assert node.models_of(PROJECT) is None
    assert node_status(registrar)["state"] == "pending"


@pytest.mark.anyio
async def test_a_nodes_user_and_password_go_as_basic_auth_and_are_shown_nowhere(
        node: FakeNode, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """`GET /v1/registration` (open where registration is on), the logs and the withdraw
    command showed a node URL's password."""
    monkeypatch.setattr(logging.getLogger("ray.serve"), "propagate", True)
    caplog.set_level(logging.DEBUG)
    down = FakeNode().start()
    down.stop()
    with_password = node.url.replace("//", "//node-user:S3cret@")
    config = make_config([with_password, down.url.replace("//", "//node-user:S3cret@")])
    registrar = started(config, FakeLive(config, "Llama3-8B"))
    try:
        await eventually(lambda: node.models_of(PROJECT) == [CHAT] and node_status(registrar, 1)["attempts"])
        assert node.authorizations[0] == "Basic " + base64.b64encode(b"node-user:S3cret").decode()
        assert [n["url"] for n in registrar.status().model_dump()["nodes"]] == [
            node.url.replace("//", "//***@"), down.url.replace("//", "//***@")]
        assert set(await registrar.withdraw()) == {node.url.replace("//", "//***@"), down.url.replace("//", "//***@")}
        assert node.models_of(PROJECT) is None
    finally:
        await registrar.stop(unregister=False)
    assert "registering project" in caplog.text and "S3cret" not in caplog.text
    assert shown_url("http://u:pa/ss@127.0.0.1:7002") == "http://***@127.0.0.1:7002"  # no "/" ends the password
    assert shown_url("https://127.0.0.1:7002/ai") == "https://127.0.0.1:7002/ai"


@pytest.mark.anyio
async def test_a_nodes_credentials_can_come_from_the_environment(
        node: FakeNode, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Serve writes an application's args whole into its controller's log and dashboard, so
    a node URL's user and password may name environment variables of the registrar instead,
    read at each call (any character, "/" and "@" included, needs no encoding there); one that
    is unset fails the registration with that node, naming the variable, and the config check
    says so before a start."""
    monkeypatch.setattr(logging.getLogger("ray.serve"), "propagate", True)
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("NODE_USER", "node-user")
    monkeypatch.setenv("NODE_PASSWORD", "S3/cr@t:x")
    monkeypatch.setenv("NODE_MISSING", "")  # empty counts as unset: a template's variable left blank
    other = FakeNode().start()
    try:
        config = make_config([node.url.replace("//", "//${NODE_USER}:${NODE_PASSWORD}@"),
                              other.url.replace("//", "//${NODE_USER}:${NODE_MISSING}@")])
        warnings = config_warnings(config, {"NODE_USER": "u", "NODE_PASSWORD": "p", "NODE_MISSING": ""})
        assert [w for w in warnings if "NODE_MISSING" in w] and not [w for w in warnings if "NODE_PASSWORD" in w]
        registrar = started(config, FakeLive(config, "Llama3-8B"))
        try:
            await eventually(lambda: node.models_of(PROJECT) == [CHAT] and node_status(registrar, 1)["attempts"])
            assert node.authorizations[0] == "Basic " + base64.b64encode(b"node-user:S3/cr@t:x").decode()
            failing = node_status(registrar, 1)
            assert failing["state"] != "registered" and "${NODE_MISSING}" in failing["last_error"]
            assert other.models_of(PROJECT) is None and not other.authorizations
            monkeypatch.setenv("NODE_MISSING", "late")  # read at each call: set, the next retry registers
            await eventually(lambda: other.models_of(PROJECT) == [CHAT])
            assert other.authorizations[-1] == "Basic " + base64.b64encode(b"node-user:late").decode()
        finally:
            await registrar.stop()
    finally:
        other.stop()
    assert "S3/cr@t" not in caplog.text and "node-user" not in caplog.text
    # Values go percent-encoded into the URL, so the node gets them as set; "${" written %24{ stays literal.
    assert with_credentials("http://%24{LIT}:${P}@h:1/x@y", {"P": "a b/%@"}) == "http://%24{LIT}:a%20b%2F%25%40@h:1/x@y"
    assert httpx.URL(with_credentials("http://%24{LIT}:${P}@h:1", {"P": "a b/%@"})).password == "a b/%@"
    with pytest.raises(LookupError, match="^P$"):
        with_credentials("http://u:${P}@h:1", {"P": ""})


@pytest.mark.anyio
async def test_a_withdrawn_project_stays_off_every_node_whatever_goes_live(node: FakeNode) -> None:
    """What a stopping server asks before it drains: the nodes stop forwarding to it, and no
    loop puts the models back meanwhile (a change of the live set, the periodic refresh). A
    node that was down then is told as the registrar stops; one told already is not again."""
    down = FakeNode().start()
    config = make_config([node.url, down.url], interval_s=0.05)
    live = FakeLive(config, "Llama3-8B")
    registrar = started(config, live)
    try:
        await eventually(lambda: node.models_of(PROJECT) == [CHAT] and down.models_of(PROJECT) == [CHAT])
        down.stop()

        outcome = await registrar.withdraw()
        assert outcome[node.url] is None and "ConnectError" in outcome[down.url]
        assert node.models_of(PROJECT) is None and node.bodies(UNREGISTER_PATH) == [{"project": PROJECT}]
        registered = len(node.bodies(REGISTER_PATH))
        live.names = {"Llama3-8B", "SuperImage"}
        await asyncio.sleep(0.3)  # many polls and refresh intervals
        assert len(node.bodies(REGISTER_PATH)) == registered and node.models_of(PROJECT) is None
        nodes = registrar.status().model_dump()["nodes"]
        assert [n["state"] for n in nodes] == ["withdrawn", "failing"]
        assert nodes[0]["models"] == [] and nodes[1]["models"] == [CHAT]  # what each may still hold
        assert nodes[1]["consecutive_failures"] == 1 and "ConnectError" in nodes[1]["last_error"]
        assert await registrar.withdraw() == {node.url: None, down.url: outcome[down.url]}  # asked again
        assert node.bodies(UNREGISTER_PATH) == [{"project": PROJECT}]  # told once

        down.start()
        assert await registrar.unregister() == {down.url: None}  # what the replica's stop does
        assert down.models_of(PROJECT) is None and down.bodies(UNREGISTER_PATH) == [{"project": PROJECT}]
        assert node.bodies(UNREGISTER_PATH) == [{"project": PROJECT}]
    finally:
        await registrar.stop(unregister=False)
        down.stop()


def test_an_image_model_is_registered_for_the_routes_it_serves() -> None:
    """An inpainting-only checkpoint (`routes: [edits]`) is announced as an editor only: the
    node would otherwise send it text-to-image traffic it refuses."""
    from serve_app.registration import project_registration

    config = make_config(["http://127.0.0.1:1"])
    editor = config.models[1].model_copy(update={"routes": ["edits"]})
    payload = project_registration(PROJECT, BASE, [LiveModel(config=config.models[0], created=0),
                                                   LiveModel(config=editor, created=0)])
    assert [entry.model_dump() for entry in payload.models] == [CHAT, EDITOR_ONLY]


@pytest.mark.anyio
async def test_reregisters_when_the_live_set_changes(node: FakeNode) -> None:
    config = make_config([node.url])
    live = FakeLive(config)
    node.projects[PROJECT] = [CHAT]  # what an earlier run announced: the node keeps it across restarts
    registrar = started(config, live)
    # Nothing is live yet: the node must not go on routing to what an earlier run announced.
    await eventually(lambda: node.models_of(PROJECT) == [] and node_status(registrar)["state"] == "registered")

    for names, expected in [({"Llama3-8B"}, [CHAT]),
                            ({"Llama3-8B", "SuperImage"}, [CHAT, IMAGE_GEN, IMAGE_EDIT]),
                            ({"SuperImage"}, [IMAGE_GEN, IMAGE_EDIT]),
                            (set(), [])]:  # all gone: the node must stop routing to them
        live.names = names
        await eventually(lambda: node.models_of(PROJECT) == expected)
    assert len(node.bodies(REGISTER_PATH)) == 5
    await registrar.stop(unregister=False)


@pytest.mark.anyio
async def test_node_down_at_start_gets_registration_when_up(node: FakeNode, serve_caplog) -> None:
    serve_caplog.set_level(logging.INFO, logger="ray.serve")
    node.stop()
    config = make_config([node.url])
    registrar = started(config, FakeLive(config, "Llama3-8B"))
    await eventually(lambda: node_status(registrar)["attempts"] >= 3)  # retried with back-off
    status = node_status(registrar)
    assert status["state"] == "failing" and "ConnectError" in status["last_error"]

    node.start()
    # The node stores the models before the registrar has read its answer: wait for both.
    await eventually(lambda: node.models_of(PROJECT) == [CHAT] and node_status(registrar)["state"] == "registered")
    assert node_status(registrar)["consecutive_failures"] == 0
    # Said as what happened: it was never registered, so nothing "recovered".
    line = next(r.getMessage() for r in serve_caplog.records if r.getMessage().startswith("registered project"))
    assert re.search(rf"with node {re.escape(node.url)} \(after \d+ failed attempts\): Llama3-8B", line), line
    assert "recovered" not in serve_caplog.text
    await registrar.stop()


@pytest.mark.anyio
async def test_node_answering_500_is_reported_and_retried(node: FakeNode) -> None:
    node.fail_status = 500
    config = make_config([node.url])
    registrar = started(config, FakeLive(config, "Llama3-8B"))
    await eventually(lambda: node_status(registrar)["attempts"] >= 3)
    status = node_status(registrar)
    assert status["state"] == "failing"
    assert status["last_error"] == "HTTP 500, code 5000: fake node failure"

    node.fail_status = None
    await eventually(lambda: node_status(registrar)["state"] == "registered")
    assert node.models_of(PROJECT) == [CHAT]
    await registrar.stop()


@pytest.mark.anyio
async def test_any_failure_to_reach_a_node_is_reported_and_backed_off(node: FakeNode, monkeypatch) -> None:
    """Not only the node's own errors: whatever a call raises (here what httpx raises for a
    URL it cannot use, which is no HTTPError) shows in the status and waits its back-off,
    rather than a traceback every poll."""
    import serve_app.registration as registration

    async def refusing(*args, **kwargs):
        raise httpx.InvalidURL("Invalid non-printable ASCII character in URL")

    monkeypatch.setattr(registration, "call_node", refusing)
    config = make_config([node.url])
    registrar = started(config, FakeLive(config, "Llama3-8B"))
    await eventually(lambda: node_status(registrar)["attempts"] >= 1)
    first = time.monotonic()
    status = node_status(registrar)
    assert status["state"] == "failing"
    assert status["last_error"] == "InvalidURL: Invalid non-printable ASCII character in URL"
    await eventually(lambda: node_status(registrar)["attempts"] >= 2)
    assert time.monotonic() - first > 0.1  # the back-off (retry_max_s 0.2 here), not the next 0.02 s poll
    await registrar.stop(unregister=False)


@pytest.mark.anyio
async def test_node_refusing_the_payload_is_reported_and_retried(node: FakeNode) -> None:
    config = make_config([node.url], base_url="http://10.11.12.13:1088")  # not the node's machine
    registrar = started(config, FakeLive(config, "Llama3-8B"))
    await eventually(lambda: node_status(registrar)["attempts"] >= 3)
    status = node_status(registrar)
    assert status["state"] == "failing" and status["models"] == []
    assert status["last_error"] == "HTTP 400, code 1002: the AI model and the node are not on the same machine"
    await registrar.stop(unregister=False)


@pytest.mark.anyio
async def test_a_node_too_slow_to_answer_is_said_to_be_past_timeout_s() -> None:
    """httpx's ReadTimeout has no text: the error names the limit the node ran past (the whole
    call's, which a node trickling its answer cannot stretch)."""
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        config = make_config([f"http://127.0.0.1:{silent.getsockname()[1]}"], timeout_s=0.3)
        registrar = started(config, FakeLive(config, "Llama3-8B"))
        await eventually(lambda: node_status(registrar)["state"] == "failing")
        assert node_status(registrar)["last_error"] == \
            "Timeout: the node did not answer within timeout_s (0.3 s)"
        await registrar.stop(unregister=False)


@pytest.mark.anyio
async def test_an_unregister_past_its_short_limit_says_which_limit() -> None:
    """Unregistering waits at most 2 s whatever timeout_s is: the error says so, not `timeout_s (2 s)`
    where the operator set 5."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        config = make_config([f"http://127.0.0.1:{silent.getsockname()[1]}"], timeout_s=5.0)
        registrar = Registrar(config, FakeLive(config))
        started_at = time.monotonic()
        await registrar.unregister()
        assert time.monotonic() - started_at < 4
        assert node_status(registrar)["last_error"] == (
            "Timeout: the node did not answer within the unregister limit, timeout_s or at most 2 s (2 s)")


@pytest.mark.anyio
async def test_one_failing_node_does_not_hold_back_another(node: FakeNode) -> None:
    down = FakeNode().start()
    down.stop()
    config = make_config([down.url, node.url], timeout_s=0.5)
    registrar = started(config, FakeLive(config, "Llama3-8B"))
    # The node stores the models before the registrar has read its answer: wait for both.
    await eventually(lambda: node.models_of(PROJECT) == [CHAT]
                     and [n.state for n in registrar.status().nodes] == ["failing", "registered"])
    started_at = time.monotonic()
    await registrar.stop()  # unregister is best effort: the down node costs no more than its timeout
    assert time.monotonic() - started_at < 2.5
    assert node.models_of(PROJECT) is None


@pytest.mark.anyio
async def test_periodic_reregistration_after_the_node_forgot(node: FakeNode,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A node whose registry was reset holds the models again within `interval_s`; a proxy
    in the environment (for the replicas' downloads) does not carry the calls to the node."""
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    for name in ("NO_PROXY", "no_proxy"):  # a CI's exemption of loopback would hide the proxy
        monkeypatch.delenv(name, raising=False)
    config = make_config([node.url], interval_s=0.3)
    registrar = started(config, FakeLive(config, "Llama3-8B"))
    await eventually(lambda: node.models_of(PROJECT) == [CHAT])
    node.restart()
    assert node.models_of(PROJECT) is None
    await eventually(lambda: node.models_of(PROJECT) == [CHAT], timeout=2)
    await registrar.stop()


@pytest.mark.anyio
async def test_unregistering_an_unknown_project_is_success(node: FakeNode) -> None:
    config = make_config([node.url])
    registrar = Registrar(config, FakeLive(config))
    await registrar.unregister()
    assert node.bodies(UNREGISTER_PATH) == [{"project": PROJECT}]
    assert node_status(registrar)["last_error"] is None


@pytest.mark.anyio
async def test_disabled_registrar_does_nothing(node: FakeNode) -> None:
    config = make_config([node.url], enabled=False)
    registrar = started(config, FakeLive(config, "Llama3-8B"))
    await asyncio.sleep(0.1)
    await registrar.stop()
    assert node.received == []
    assert registrar.status().enabled is False and node_status(registrar)["state"] == "disabled"
    assert registrar_deployment(config) is None


@pytest.mark.parametrize(("answer", "going_away"), [
    ("slow", False),  # a controller busy with the redeploy: the app stays, the successor's work stays
    ("dead", True),  # no controller: the whole server is going away
    ("deleting", True), ("running", False), ("absent", True)])
def test_a_stopping_registrar_unregisters_only_when_its_app_goes_away(monkeypatch, answer, going_away) -> None:
    import types

    from serve_app import registration

    def status():
        if answer == "slow":
            time.sleep(1)
        if answer == "dead":
            raise RuntimeError("controller is dead")
        apps = {} if answer == "absent" else {"app": types.SimpleNamespace(status=answer.upper())}
        return types.SimpleNamespace(applications=apps)

    monkeypatch.setattr(registration.serve, "status", status)
    monkeypatch.setattr(registration, "STATUS_TIMEOUT_S", 0.2)
    replica = types.SimpleNamespace(_app_name="app")
    assert asyncio.run(registration.RegistrarDeployment.func_or_class._app_is_going_away(replica)) is going_away


@pytest.mark.parametrize(("record", "withdrawn"), [
    ({("NewName", "node")}, [{"project": PROJECT}]),  # the new config renamed the project: the old name goes
    ({(PROJECT, "node")}, []),  # the new config still announces it: left alone
    (None, []),  # no owner recorded anything yet: the successor withdraws what it drops itself
])
def test_an_outgoing_registrar_withdraws_what_its_successor_dropped(monkeypatch, node: FakeNode, record, withdrawn):
    """A rolling redeploy: the old registrar's loops may announce an old pair again after the
    new config's owner withdrew it; the old replica withdraws, as it goes, what the record no
    longer lists."""
    import types

    from serve_app import registration

    record = {(project, node.url if url == "node" else url) for project, url in record} if record else record
    monkeypatch.setattr(registration, "_read_record", lambda app_name: record)
    config = make_config([node.url])

    async def run():
        registrar = started(config, FakeLive(config, "Llama3-8B"))
        await eventually(lambda: node.models_of(PROJECT) is not None)
        await registrar.stop(unregister=False)  # the app stays: as __del__ stops it
        replica = types.SimpleNamespace(_app_name="app")
        await registration.RegistrarDeployment.func_or_class._withdraw_what_the_successor_dropped(replica, registrar)

    asyncio.run(run())
    assert node.bodies(UNREGISTER_PATH) == withdrawn


@pytest.mark.anyio
async def test_project_and_base_url_can_be_overridden_for_the_node(node: FakeNode) -> None:
    """What the node receives: the overriding project, and model URLs on the overriding base."""
    config = make_config([node.url], project="NodeProject", public_base_url="http://localhost:9000/")
    registrar = started(config, FakeLive(config, "Llama3-8B"))
    await eventually(lambda: node.models_of("NodeProject") is not None)
    [body] = node.bodies(REGISTER_PATH)
    assert body["project"] == "NodeProject" and node.models_of(PROJECT) is None
    assert [m["api"] for m in body["models"]] == ["http://localhost:9000/v1/chat/completions"]
    await registrar.stop()


# ---------------------------------------------------------------- the fake node itself


@pytest.mark.parametrize("body, status, code", [
    ({"project": "P", "models": [CHAT]}, 200, None),
    ({"project": "P", "models": []}, 200, None),
    ({"project": "", "models": [CHAT]}, 400, 1002),
    ({"project": "P", "models": [{**CHAT, "cid": ""}]}, 400, 1002),
    ({"project": "P", "models": [{**CHAT, "api": "http://192.0.2.1:1088/v1/chat/completions"}]}, 400, 1002),
    ({"project": "P", "models": [{**CHAT, "type": 3}]}, 400, 1002),
    ({"project": "P", "models": [{**CHAT, "type": "0"}]}, 400, 1001),
    ("not an object", 400, 1001),
])
def test_fake_node_validates_like_the_node(node: FakeNode, body: Any, status: int, code: int | None) -> None:
    reply = httpx.post(node.url + REGISTER_PATH, json=body)
    assert reply.status_code == status
    assert reply.json().get("code") == code  # success carries no `code` at all
    assert reply.headers["content-type"].startswith("application/json")


def test_fake_node_model_endpoints(node: FakeNode) -> None:
    post = lambda path, body: httpx.post(node.url + path, json=body).json()  # noqa: E731
    assert post("/api/v0/ai/model/register", {"project": "P", **CHAT}) == {"message": "ok"}
    assert post("/api/v0/ai/model/register", {"project": "P", **CHAT}) == {"message": "ok"}
    assert node.models_of("P") == [CHAT]
    forget = {"project": "P", "model": CHAT["model"], "cid": CHAT["cid"]}
    assert post("/api/v0/ai/model/unregister", forget) == {"message": "ok"}
    assert post("/api/v0/ai/model/unregister", forget) == {"message": "not existed"}
    assert post(UNREGISTER_PATH, {"project": "P"}) == {"message": "ok"}
    assert post(UNREGISTER_PATH, {"project": "P"}) == {"message": "not existed"}


# ---------------------------------------------------------------- end to end on Ray Serve


def _registrar_replicas(app_name: str) -> list[str]:
    """Names of the live actors of this application's registrar replicas (Serve names them so)."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#registrar#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


@pytest.mark.slow
def test_registration_through_ray_serve(cluster, node: FakeNode) -> None:
    from ray import serve

    project = "RegProject"
    args = cluster.args(route_prefix="/reg", project=project, registration={
        "enabled": True, "node_urls": [node.url], "interval_s": 2, "timeout_s": 1, "retry_max_s": 1})
    for model in args["models"]:
        model["cid"] = "cid-" + model["name"]
        if model["kind"] == "chat":  # what registers is the name and route: no weights needed
            # Restarted by the redeploy below beside its old replica, as a model with room for a
            # second copy is (`max_surge_percent`).
            model.update(engine="echo", path="echo", deployment={"num_cpus": 0.05, "max_surge_percent": 100})
    try:
        base = cluster.deploy(args, name="reg_app", route_prefix="/reg")

        def entries() -> list[tuple[str, str, int]] | None:
            models = node.models_of(project)
            return None if models is None else sorted((m["model"], m["api"], m["type"]) for m in models)

        everything = sorted((m["name"], base + route, kind)
                            for m in args["models"]
                            for kind, route in ([(0, "/v1/chat/completions")] if m["kind"] == "chat" else
                                                [(1, "/v1/images/generations"), (2, "/v1/images/generations")]))
        assert node.wait_for(lambda: entries() == everything, timeout=60), entries()
        status = httpx.get(base + "/v1/registration", timeout=30).json()
        assert status["project"] == project and status["nodes"][0]["state"] == "registered"

        chat_only = copy.deepcopy(args)
        chat_only["models"] = [m for m in args["models"] if m["kind"] == "chat"]
        cluster.deploy(chat_only, name="reg_app", route_prefix="/reg")
        expected = [e for e in everything if e[2] == 0]
        assert node.wait_for(lambda: entries() == expected, timeout=60), entries()
        # The replaced registrar leaves its successor's work alone, also once it is gone for good.
        assert wait_for(lambda: len(_registrar_replicas("reg_app")) == 1, timeout=60)
        time.sleep(3)  # an interval and more: a stray unregister would have landed
        assert node.bodies(UNREGISTER_PATH) == [] and entries() == expected
        # The redeploy restarted the ingress and the chat model too (their args changed): each
        # replacement started before the old replica stopped, so at no moment was nothing live.
        # (A body that is not JSON was cut off as Serve stopped the registrar replica sending it.)
        # (Before the first models were live, the first registrar may have sent an empty list.)
        registered = [body for body in node.bodies(REGISTER_PATH) if body is not None]
        announced = registered[[bool(body["models"]) for body in registered].index(True):]
        assert all(body["models"] for body in announced), node.bodies(REGISTER_PATH)

        serve.delete("reg_app")
        assert node.wait_for(lambda: node.bodies(UNREGISTER_PATH) == [{"project": project}], timeout=30)
        assert node.models_of(project) is None
    finally:
        serve.delete("reg_app")  # a no-op when the test got that far; else nothing is left running


@pytest.mark.slow
def test_a_redeploy_withdraws_what_the_new_config_no_longer_announces(cluster, node: FakeNode) -> None:
    """The application stays up across a redeploy, so nothing unregisters the old project on
    its way out; the new config's side does: the new registrar for a renamed project, the
    ingress once registration is off."""
    from ray import serve

    def deploy(project: str, enabled: bool = True) -> None:
        args = cluster.args(route_prefix="/rereg", project=project, registration={
            "enabled": enabled, "node_urls": [node.url], "interval_s": 2, "timeout_s": 1, "retry_max_s": 1})
        args["models"] = [{"name": "echo", "kind": "chat", "engine": "echo", "path": "echo", "cid": "cid-echo",
                           "deployment": {"num_cpus": 0.05}}]  # no weights: quick to redeploy
        cluster.deploy(args, name="rereg_app", route_prefix="/rereg")

    def withdrawn() -> list[str]:
        """Projects unregistered, in order, each once: the new config's owner and the outgoing
        registrar may both withdraw a pair (the second in case its loops announced it again),
        and a node takes a repeated unregister as a no-op."""
        return list(dict.fromkeys(body["project"] for body in node.bodies(UNREGISTER_PATH)))

    try:
        deploy("OldName")
        assert node.wait_for(lambda: node.models_of("OldName") is not None, timeout=60)
        deploy("NewName")
        assert node.wait_for(lambda: node.models_of("NewName") is not None and node.models_of("OldName") is None,
                             timeout=60), node.bodies(UNREGISTER_PATH)
        assert withdrawn() == ["OldName"]
        deploy("NewName", enabled=False)
        assert node.wait_for(lambda: node.models_of("NewName") is None, timeout=60), node.bodies(UNREGISTER_PATH)
        assert withdrawn() == ["OldName", "NewName"]
        time.sleep(3)  # an interval and more: nothing announces either project again
        assert node.models_of("NewName") is None and node.models_of("OldName") is None
    finally:
        serve.delete("rereg_app")


@pytest.mark.slow
def test_two_applications_registering_one_project_with_one_node_are_warned_about(cluster, serve_caplog) -> None:
    """Each registration replaces the project's whole model list on the node: two applications
    announcing one project to one node would take turns holding it. The second to start says so."""
    from serve_app.registration import _write_record, unregister_stale

    pairs = {("SharedProject", "http://127.0.0.1:7002")}
    try:
        asyncio.run(unregister_stale("shared_a", pairs, timeout_s=1))
        assert "registers the same project" not in serve_caplog.text
        asyncio.run(unregister_stale("shared_b", {("OtherProject", "http://127.0.0.1:7002")}, timeout_s=1))
        assert "registers the same project" not in serve_caplog.text
        asyncio.run(unregister_stale("shared_c", pairs | {("X", "http://127.0.0.1:7002")}, timeout_s=1))
        assert "application 'shared_a' registers the same project with the same node as this one " \
               "(SharedProject at http://127.0.0.1:7002)" in serve_caplog.text
    finally:
        for app in ("shared_a", "shared_b", "shared_c"):
            _write_record(app, None)


def test_a_new_config_records_what_it_announces_before_withdrawing_the_rest(monkeypatch):
    """The outgoing registrar withdraws, as it stops, what it holds that the record does not
    list; it may announce an old pair again while the new owner's unregisters are under way,
    so the new record must be written before them, or it would read the old one and keep it."""
    from serve_app import registration

    events: list[tuple] = []
    monkeypatch.setattr(registration, "_read_record", lambda app: {("old", "http://n")})
    monkeypatch.setattr(registration, "_write_record", lambda app, pairs: events.append(("record", pairs)))
    monkeypatch.setattr(registration, "_shared_pairs", lambda app, pairs: {})

    async def unregister(pairs, timeout_s, why):
        events.append(("unregister", pairs))

    monkeypatch.setattr(registration, "unregister_pairs", unregister)
    asyncio.run(registration.unregister_stale("app", {("new", "http://n")}, 1.0))
    assert events == [("record", {("new", "http://n")}), ("unregister", [("old", "http://n")])]


@pytest.mark.anyio
async def test_a_register_under_way_at_a_withdraw_ends_before_the_unregister(node: FakeNode) -> None:
    """A withdraw (a stop) while a register is with a slow node: that register ends first, so
    the node never applies it after the unregister and keeps a project whose server is gone."""
    config = make_config([node.url], timeout_s=2)
    live = FakeLive(config, "Llama3-8B")
    registrar = started(config, live)
    await eventually(lambda: PROJECT in node.projects)
    arrived = threading.Event()

    def slow_register(path: str, body: Any) -> None:
        if path == REGISTER_PATH:
            arrived.set()
            time.sleep(0.5)  # then applied, whether or not the caller still waits

    node.on_request = slow_register
    live.names.add("SuperImage")  # a change: a register goes out
    await eventually(arrived.is_set)
    told = await registrar.withdraw()
    assert told == {node.url: None}
    await asyncio.sleep(0.8)  # anything still under way at the node has landed
    assert not node.projects.get(PROJECT), node.projects
    assert [r.path for r in node.received][-2:] == [REGISTER_PATH, UNREGISTER_PATH]


@pytest.mark.anyio
async def test_a_register_that_timed_out_is_sent_again_even_if_the_live_set_went_back(node: FakeNode) -> None:
    """A register the node applied but answered too late: the node may hold it, so the next
    call goes out after the back-off even though the live set is back to what the node last
    confirmed, instead of leaving a model that is not live registered until the next refresh."""
    config = make_config([node.url], timeout_s=0.3, interval_s=60)
    live = FakeLive(config, "Llama3-8B")
    registrar = started(config, live)
    await eventually(lambda: PROJECT in node.projects)
    node.on_request = lambda path, body: time.sleep(0.5) if path == REGISTER_PATH and len(body["models"]) > 1 else None
    live.names.add("SuperImage")
    await eventually(lambda: node_status(registrar)["state"] == "failing")
    live.names.discard("SuperImage")  # back to what the node last confirmed
    await eventually(lambda: node_status(registrar)["state"] == "registered")
    await asyncio.sleep(0.6)  # the late register has landed by now
    assert {m["model"] for m in node.projects[PROJECT]} == {"Llama3-8B"}, node.projects
    await registrar.stop(unregister=False)


@pytest.mark.anyio
async def test_a_node_trickling_its_answer_is_cut_at_timeout_s() -> None:
    """httpx's timeout bounds each read: a node sending a byte every 0.1 s would hold the call,
    and a withdraw, for ever. The whole call is bounded."""
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    try:
        config = make_config([f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"], timeout_s=0.5)
        registrar = started(config, FakeLive(config, "Llama3-8B"))
        await eventually(lambda: node_status(registrar)["state"] == "failing", timeout=3)
        assert node_status(registrar)["last_error"].startswith("Timeout: the node did not answer within timeout_s")
        started_at = time.monotonic()
        await registrar.withdraw()
        assert time.monotonic() - started_at < 2.5
    finally:
        server.close()


@pytest.mark.anyio
async def test_nothing_is_registered_before_the_live_models_are_known(node: FakeNode) -> None:
    """Until Serve's state has been read (a controller not reachable yet, an application being
    built), the live models are unknown, not none: an empty list registered then would take
    the models a node holds off the network."""
    from serve_app.catalog import CatalogUnknown

    config = make_config([node.url])
    known = FakeLive(config, "Llama3-8B")
    reads = 0

    async def live() -> list[LiveModel]:
        nonlocal reads
        reads += 1
        if reads <= 5:
            raise CatalogUnknown("Serve's state has not been read yet")
        return await known()

    registrar = started(config, live)
    await eventually(lambda: PROJECT in node.projects)
    assert reads > 5 and [r.body["models"][0]["model"] for r in node.received if r.path == REGISTER_PATH][:1] == \
        ["Llama3-8B"]  # the first register carries the live model, never an empty list
    await registrar.stop(unregister=False)


def test_node_urls_with_a_bad_port_are_refused_and_passwords_never_shown():
    from pydantic import ValidationError

    for url, said in (("http://127.0.0.1:99999", "port from 1 to 65535"), ("http://127.0.0.1:abc", "port"),
                      ("http://", "needs a host")):
        with pytest.raises(ValidationError, match=said):
            make_config([url])
    from serve_app.check_config import validation_problems

    # As the config check (and a failed build) says them: without the input, so without the password.
    with pytest.raises(ValidationError) as twice:
        make_config(["http://user:S3cret@127.0.0.1:7002", "http://user:S3cret@127.0.0.1:7002/"])
    said = " ".join(validation_problems(twice.value))
    assert "S3cret" not in said and "http://***@127.0.0.1:7002 is listed twice" in said, said
    with pytest.raises(ValidationError) as scheme:
        make_config(["ftp://user:S3cret@127.0.0.1:7002"])
    assert "S3cret" not in " ".join(validation_problems(scheme.value))


def test_a_node_written_another_way_is_not_a_node_dropped_from_the_config():
    """Rotated credentials, `localhost` for 127.0.0.1, a host's case or a trailing slash: the
    same node, whose project must not be unregistered as if the node had left the config."""
    from serve_app.registration import dropped

    before = {(PROJECT, "http://u:old@127.0.0.1:7002"), (PROJECT, "http://10.0.0.5:7002"), ("Old", "http://127.0.0.1:7002")}
    now = {(PROJECT, "http://u:new@localhost:7002/"), (PROJECT, "http://10.0.0.6:7002")}
    assert dropped(before, now) == [("Old", "http://127.0.0.1:7002"), (PROJECT, "http://10.0.0.5:7002")]
    assert dropped({(PROJECT, "http://Node.Example:80")}, {(PROJECT, "http://node.example")}) == []
