"""Config is data validated by pydantic: mistakes fail loudly, naming the field."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig, ImageModelConfig, config_warnings
from tests.conftest import ROOT, default_args


def validate(mutate) -> AppConfig:
    args = default_args()
    mutate(args)
    return AppConfig.model_validate(args)


def test_shipped_config_is_valid_and_resolves_paths():
    config = validate(lambda a: None)
    assert [m.name for m in config.models] == ["Llama3-8B", "SuperImage"]
    assert all(m.path.startswith("/") for m in config.models)
    chat = config.models[0].deployment.serve_options()
    assert chat["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert chat["max_ongoing_requests"] == 512 and chat["num_replicas"] == 1
    # A chat model takes as many requests as the ingress passes on: those over its limit wait in
    # Ray's router, which hands them out at about 4 a second once the replica is full (300 chat
    # requests at once took 19-28 s with 64, 3 s with 512). An image model, two batches.
    assert [m.max_ongoing_requests for m in config.models] == [config.ingress.max_ongoing_requests, 16]


def test_max_ongoing_requests_defaults_by_kind():
    def unset(args):
        for model in args["models"]:
            del model["deployment"]["max_ongoing_requests"]
        args["models"][1]["max_batch_size"] = 12
    chat, image = validate(unset).models
    assert (chat.max_ongoing_requests, image.max_ongoing_requests) == (512, 24)
    assert (chat.serve_options()["max_ongoing_requests"], image.serve_options()["max_ongoing_requests"]) == (512, 24)
    assert image.serve_options()["max_queued_requests"] == -1
    assert "max_constructor_retry_count" not in chat and "health_check_period_s" not in chat  # Serve's defaults


def test_redeploys_let_requests_in_flight_finish_and_the_ingress_surges():
    """A replaced or removed replica finishes its requests for up to 120 s (Ray's 20 s would cut
    a long stream); the ingress starts its replacement before the old one stops (a tenth of a
    CPU), so a redeploy leaves no moment without a route; a model does so only when asked
    (its second copy needs a second GPU). Ray refuses max_queued_requests: 0 at deploy time;
    the config says so first."""
    from serve_app.app import build_app

    config = validate(lambda a: a["models"][1]["deployment"].update(max_surge_percent=100,
                                                                    graceful_shutdown_timeout_s=600))
    chat, image = (model.deployment.serve_options() for model in config.models)
    assert (chat["graceful_shutdown_timeout_s"], chat["max_surge_percent"]) == (120, 0)
    assert (image["graceful_shutdown_timeout_s"], image["max_surge_percent"]) == (600, 100)
    ingress = build_app(config)._bound_deployment
    assert ingress.name == "ingress"
    assert (ingress._deployment_config.max_surge_percent, ingress._deployment_config.graceful_shutdown_timeout_s) \
        == (100, 120)
    with pytest.raises(ValidationError, match="max_queued_requests must be -1 .unbounded. or at least 1"):
        validate(lambda a: a["models"][0]["deployment"].update(max_queued_requests=0))


def test_the_autoscaling_target_is_the_models_batch_by_default():
    """Ray's default of 2 requests per replica would add a GPU replica of a model that batches
    32 for every third request in flight; the target is the model's batch unless given."""
    from serve_app.app import build_app

    bounds = {"min_replicas": 1, "max_replicas": 4}
    config = validate(lambda a: (a["models"][0].update(max_batch_size=32, deployment={"autoscaling_config": bounds}),
                                 a["models"][1].update(deployment={"autoscaling_config": {
                                     **bounds, "target_ongoing_requests": 3}})))
    models = build_app(config)._bound_deployment.init_args[1]  # the ingress's handles, by model name
    targets = {name: model._bound_deployment._deployment_config.autoscaling_config.target_ongoing_requests
               for name, model in models.items()}
    assert targets == {"Llama3-8B": 32, "SuperImage": 3}


def test_serve_options_pass_retry_and_health_settings_on():
    options = validate(lambda a: a["models"][0]["deployment"].update(
        max_constructor_retry_count=2, health_check_period_s=5)).models[0].deployment.serve_options()
    assert options["max_constructor_retry_count"] == 2 and options["health_check_period_s"] == 5
    with pytest.raises(ValidationError, match="max_constructor_retry_count"):
        validate(lambda a: a["models"][0]["deployment"].update(max_constructor_retry_count=0))


def test_unknown_field_is_named():
    with pytest.raises(ValidationError, match="num_gpu"):
        validate(lambda a: a["models"][0]["deployment"].update(num_gpu=1))


def test_a_mistake_in_a_model_names_the_model():
    with pytest.raises(ValidationError) as mistakes:
        validate(lambda a: (a["models"][1]["deployment"].update(num_gpu=1), a["models"][0].update(max_n=0)))
    message = str(mistakes.value)
    assert "model 'Llama3-8B' (models[0]): max_n: Input should be greater than or equal to 1" in message
    assert "model 'SuperImage' (models[1]): deployment.num_gpu: Extra inputs are not permitted" in message


def test_duplicate_model_names_are_refused():
    with pytest.raises(ValidationError, match="not unique"):
        validate(lambda a: a["models"].append(dict(a["models"][0])))
    # Two names whose Ray deployment names would be one (unsafe characters become "_"):
    def clash(args):
        args["models"] = [{**args["models"][0], "name": "org/llama"}, {**args["models"][0], "name": "org_llama"}]
    with pytest.raises(ValidationError, match="model name 'org_llama' is not unique \\(clashes with 'org/llama'\\)"):
        validate(clash)


@pytest.mark.parametrize("url,ok", [("https://ai.example.com/", True), ("http://10.0.0.1:1088", True),
                                    ("ai.example.com", False), ("ftp://ai.example.com", False)])
def test_base_urls_are_http_without_a_trailing_slash(url, ok):
    if ok:
        assert validate(lambda a: a.update(public_base_url=url)).public_base_url == url.rstrip("/")
    else:
        with pytest.raises(ValidationError, match="must start with http:// or https://"):
            validate(lambda a: a.update(public_base_url=url))


def test_autoscaling_bounds_are_ordered():
    def bounds(args):
        del args["models"][0]["deployment"]["num_replicas"]
        args["models"][0]["deployment"]["autoscaling_config"] = {"min_replicas": 3, "max_replicas": 2}
    with pytest.raises(ValidationError, match="min_replicas must not exceed max_replicas"):
        validate(bounds)


def test_two_names_may_share_a_path():
    config = validate(lambda a: a["models"].append({**a["models"][0], "name": "other"}))
    assert config.models[0].path == config.models[2].path


def test_bad_kind_and_limits_are_refused():
    with pytest.raises(ValidationError, match="kind"):
        validate(lambda a: a["models"][0].update(kind="audio"))
    with pytest.raises(ValidationError, match="default_max_tokens"):
        validate(lambda a: a["models"][0].update(default_max_tokens=10, max_tokens_limit=5))


@pytest.mark.parametrize(("fields", "message"), [
    ({"default_size": "500x500"}, "default_size '500x500'"),  # not on the 8-pixel grid diffusers needs
    ({"max_side": 256}, "default_size '512x512'"),  # the default would be a size no request may ask for
    ({"allowed_sizes": ["768x768"]}, "must be one of allowed_sizes"),
    ({"allowed_sizes": ["512x512", "4096x4096"]}, "allowed_sizes '4096x4096'"),
    ({"min_side": 100}, "min_side 100 must be a multiple of size_multiple 8"),  # a small edit's size, off the grid
])
def test_image_sizes_in_the_config_obey_the_rules_requests_do(fields, message):
    with pytest.raises(ValidationError, match=message):
        validate(lambda a: a["models"][1].update(fields))
    validate(lambda a: a["models"][1].update(allowed_sizes=["512x512", "768x768"]))


def test_device_is_auto_cpu_or_cuda():
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        def set_device(args):
            args["models"][0].update(device=device)
            args["models"][0]["deployment"].update(num_gpus=0 if device == "cpu" else 2)
        assert validate(set_device).models[0].device == device
    with pytest.raises(ValidationError, match="device"):
        validate(lambda a: a["models"][0].update(device="gpu"))


def test_gpus_above_one_are_whole_gpus():
    for whole in (0, 0.25, 1, 2, 8):
        assert validate(lambda a: a["models"][0]["deployment"].update(num_gpus=whole)).models[0].deployment.num_gpus == whole
    with pytest.raises(ValidationError, match="whole number of GPUs"):
        validate(lambda a: a["models"][0]["deployment"].update(num_gpus=1.5))


def test_autoscaling_and_fixed_replicas_are_exclusive():
    def both(args):
        args["models"][0]["deployment"]["autoscaling_config"] = {"min_replicas": 0, "max_replicas": 2}

    with pytest.raises(ValidationError, match="either num_replicas or autoscaling_config"):
        validate(both)

    def auto_and_bounds(args):
        both(args)
        args["models"][0]["deployment"]["num_replicas"] = "auto"

    with pytest.raises(ValidationError, match="either num_replicas or autoscaling_config"):
        validate(auto_and_bounds)

    def auto_only(args):
        both(args)
        del args["models"][0]["deployment"]["num_replicas"]

    options = validate(auto_only).models[0].deployment.serve_options()
    assert options["autoscaling_config"]["min_replicas"] == 0 and "num_replicas" not in options


def test_default_strengths_leave_an_edit_a_step_within_max_steps():
    image = {"name": "i", "kind": "image", "path": "x", "max_steps": 10, "default_steps": 10}
    assert ImageModelConfig.model_validate({**image, "default_strength": 0.1}).default_strength == 0.1
    for name in ("default_strength", "default_inpaint_strength"):
        with pytest.raises(ValidationError, match=f"{name} must be at least 1/max_steps"):
            ImageModelConfig.model_validate({**image, name: 0.05})


def test_initial_replicas_lie_within_the_bounds():
    def autoscaling(**bounds):
        def mutate(args):
            del args["models"][0]["deployment"]["num_replicas"]
            args["models"][0]["deployment"]["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 2, **bounds}
        return mutate

    assert validate(autoscaling(initial_replicas=2)).models[0].deployment.autoscaling_config.initial_replicas == 2
    with pytest.raises(ValidationError, match="initial_replicas must lie between"):
        validate(autoscaling(initial_replicas=3))


def test_cors_refuses_credentials_for_every_origin():
    with pytest.raises(ValidationError, match="allow_credentials"):
        validate(lambda a: a.update(cors={"allow_origins": ["*"], "allow_credentials": True}))
    assert validate(lambda a: a.update(cors={"allow_origins": ["https://ui.example"], "allow_credentials": True})
                    ).cors.allow_credentials is True


def test_likely_mistakes_are_warned_about_not_refused(models_dir):
    """A path missing here may exist on the GPU nodes; batches that cannot fill still work."""
    assert config_warnings(validate(lambda a: None)) == []  # the shipped config, its models built

    def mutate(args):
        args["models"][0]["path"] = "./models/not-built"
        args["models"][1]["deployment"]["max_ongoing_requests"] = 4
        args["limits"] = {"max_prompt_chars": 2_000_000}  # a long-context model's, without a larger body limit
    warnings = config_warnings(validate(mutate))
    assert len(warnings) == 3 and "not-built does not exist here" in warnings[0]
    assert "max_ongoing_requests (4) is below max_batch_size (8)" in warnings[1]
    assert "chat body limit (4194304 bytes, max_text_body_bytes) is below 4 bytes per character of " \
        "limits.max_prompt_chars" in warnings[2]

    def short_look_back(args):
        args["models"][0]["deployment"] = {**args["models"][0]["deployment"], "num_replicas": None,
                                           "autoscaling_config": {"max_replicas": 2, "look_back_period_s": 5}}
    [warning] = config_warnings(validate(short_look_back))
    assert "look_back_period_s (5) is not above the 10 s at which replicas report their load" in warning


def test_registration_with_api_keys_is_warned_about(models_dir, monkeypatch):
    """The network's node forwards requests without a key: with keys on, each would be a 401."""
    monkeypatch.delenv("SERVE_APP_API_KEYS", raising=False)

    def registered(args, keys=()):
        args["registration"] = {"enabled": True}
        for model in args["models"]:
            model["cid"] = "cid-" + model["name"]
        args["auth"] = {"api_keys": list(keys)}
        args["limits"] = {"request_timeout_s": 170}
    assert config_warnings(validate(registered)) == []
    assert "refused (401)" in " ".join(config_warnings(validate(lambda a: registered(a, ["k"]))))
    monkeypatch.setenv("SERVE_APP_API_KEYS", "k1,k2")
    assert "refused (401)" in " ".join(config_warnings(validate(registered)))


def test_registration_with_a_request_timeout_past_the_nodes_is_warned_about(models_dir):
    """The node gives up on a chat after 180 s: a longer limit makes its timeout the answer."""
    def registered(args, timeout_s):
        args.update(registration={"enabled": True}, limits={"request_timeout_s": timeout_s})
        for model in args["models"]:
            model["cid"] = "cid-" + model["name"]
    assert config_warnings(validate(lambda a: registered(a, 179))) == []
    warnings = config_warnings(validate(lambda a: registered(a, 300)))
    assert len(warnings) == 1 and "limits.request_timeout_s (300) is not below the node's 180 s" in warnings[0]


@pytest.mark.parametrize("url", ["http://h:1088?x=1", "http://h:1088/#f", "http://h:1088/ai?"])
def test_a_base_url_with_a_query_or_fragment_is_refused(url):
    """Routes are appended to it: `http://h:1088?x=1/v1/files/images/...` reaches no image."""
    with pytest.raises(ValidationError, match="may not have a query or a fragment"):
        validate(lambda a: a.update(public_base_url=url))
    with pytest.raises(ValidationError, match="may not have a query or a fragment"):
        validate(lambda a: a.update(registration={"node_urls": [url]}))


def test_a_node_listed_twice_is_refused():
    with pytest.raises(ValidationError, match="http://127.0.0.1:7002 is listed twice"):
        validate(lambda a: a.update(registration={"node_urls": ["http://127.0.0.1:7002", "http://127.0.0.1:7002/"]}))
    with pytest.raises(ValidationError, match="listed twice"):
        validate(lambda a: a.update(registration={"node_urls": ["http://Node:7002/n", "http://node:7002/n/"]}))
    assert len(validate(lambda a: a.update(registration={"node_urls": ["http://n:7002/A", "http://n:7002/a"]}))
               .registration.node_urls) == 2  # a path's case counts


def test_gpu_config_requests_a_gpu():
    options = validate(lambda a: a["models"][0]["deployment"].update(num_gpus=1)).models[0].deployment.serve_options()
    assert options["ray_actor_options"]["num_gpus"] == 1


def test_registration_needs_cids():
    with pytest.raises(ValidationError, match="cid"):
        validate(lambda a: a.update(registration={"enabled": True}))


def _readme_section(readme: str, anchor: str) -> str:
    """From `anchor` to the end of its paragraph or table (the next blank line after it)."""
    start = readme.index(anchor)
    body = start + len(anchor)
    while readme[body] == "\n":  # a table starts after a blank line
        body += 1
    end = readme.find("\n\n", body)
    return readme[start:end]


def test_readme_documents_every_config_field():
    """The README's config reference must not fall behind the models: each option is named
    where its section documents it (a table row or its paragraph), not just anywhere."""
    readme = (ROOT / "README.md").read_text()
    from serve_app import config as c

    models_table = _readme_section(readme, "Each entry of `models`:")
    per_kind = _readme_section(readme, "Chat models also take")
    sections = {
        c.AppConfig: _readme_section(readme, "Top level of `args`:"),
        c.ChatModelConfig: models_table + per_kind,
        c.ImageModelConfig: models_table + per_kind,
        c.DeploymentOptions: _readme_section(readme, "`deployment` (per model):"),
        c.AutoscalingOptions: _readme_section(readme, "| `autoscaling_config` |").splitlines()[0],
        c.IngressOptions: _readme_section(readme, "`ingress`:"),
        c.RegistrationOptions: _readme_section(readme, "`registration` (announcing"),
        c.ImageInputOptions: _readme_section(readme, "`image_input`:"),
        c.ImageRetentionOptions: _readme_section(readme, "`image_retention`:"),
        c.AuthOptions: _readme_section(readme, "`auth`:"),
        c.CorsOptions: _readme_section(readme, "`cors` (off"),
        c.RequestLimits: _readme_section(readme, "`limits`:"),
    }
    undocumented = [f"{model.__name__}.{field}" for model, section in sections.items()
                    for field in model.model_fields
                    if f"| `{field}` |" not in section and not re.search(rf"`{field}`\s+\(", section)]
    assert not undocumented, f"README lacks {undocumented}"


@pytest.mark.parametrize(("device", "gpus", "ok"), [
    ("cuda", 1, True), ("cuda:0", 0.5, True), ("cuda:1", 2, True), ("auto", 0, True), ("cpu", 0, True),
    ("cuda", 0, False), ("cuda:1", 1, False), ("cuda:2", 2, False), ("cuda:1", 0.5, False),
    ("cpu", 1, False)])  # a GPU reserved and never used
def test_a_cuda_device_is_one_of_the_gpus_the_replica_reserves(device, gpus, ok):
    entry = {"name": "m", "kind": "chat", "path": "p", "device": device, "deployment": {"num_gpus": gpus}}
    if ok:
        AppConfig.model_validate({"models": [entry]})
    else:
        with pytest.raises(ValidationError, match="num_gpus"):
            AppConfig.model_validate({"models": [entry]})


def registered(args, **registration):
    args["registration"] = {"enabled": True, **registration}
    for model in args["models"]:
        model["cid"] = "cid-" + model["name"]


def test_registration_names_the_nodes_machine():
    """The node refuses a model URL at any host but localhost or its own IP addresses: a public
    host name would fail every registration, so the config says so at once."""
    assert validate(registered).registration.enabled  # the default public_base_url, 127.0.0.1
    with pytest.raises(ValidationError, match=r"not 'ai.example.com' \(public_base_url "):
        validate(lambda a: (registered(a), a.update(public_base_url="https://ai.example.com")))
    # The node's own address beside a public URL for clients' image links:
    assert validate(lambda a: (registered(a, public_base_url="http://10.1.2.3:1088"),
                               a.update(public_base_url="https://ai.example.com")))
    assert validate(lambda a: registered(a, public_base_url="http://localhost:1088"))
    assert validate(lambda a: registered(a, public_base_url="http://[::1]:1088"))
    with pytest.raises(ValidationError, match=r"registration.public_base_url 'http://node.lan:1088'"):
        validate(lambda a: registered(a, public_base_url="http://node.lan:1088"))
    # The node compares its interfaces' addresses (never 0.0.0.0) and `localhost` as written.
    for refused in ("http://0.0.0.0:1088", "http://[::]:1088", "http://LOCALHOST:1088"):
        with pytest.raises(ValidationError, match="the node accepts a model's URL only at localhost"):
            validate(lambda a: registered(a, public_base_url=refused))
    # Off, any URL goes.
    assert validate(lambda a: a.update(public_base_url="https://ai.example.com"))


def test_a_node_urls_password_must_be_percent_encoded():
    """`http://bob:pa/ss@host` never reached its node (httpx: "Invalid port: 'pa'"), and that
    error, shown in status and logs, gave away the password's start."""
    assert validate(lambda a: registered(a, node_urls=["http://bob:pa%2Fss@127.0.0.1:7002"]))
    with pytest.raises(ValidationError, match="must be percent-encoded") as caught:
        validate(lambda a: registered(a, node_urls=["http://bob:pa/ss@127.0.0.1:7002"]))
    assert "pa/ss" not in str(caught.value).split("input_value")[0]


@pytest.mark.parametrize("hosts,ok", [
    (["minio", "minio.internal.", "10.0.0.5", "10.0.0.0/8", "::1", "[fd00::1]", "fd00::/8"], True),
    (["http://10.0.0.5"], False), (["minio:9000"], False), (["minio/images"], False), ([""], False),
    (["*.internal"], False)])
def test_allowed_hosts_are_hosts(hosts, ok):
    """A URL's host is matched as it is: an entry with a scheme, port or path would never match."""
    if ok:
        assert validate(lambda a: a.update(image_input={"allowed_hosts": hosts})).image_input.allowed_hosts == hosts
    else:
        with pytest.raises(ValidationError, match="is not a host"):
            validate(lambda a: a.update(image_input={"allowed_hosts": hosts}))


@pytest.mark.parametrize("formats,named", [
    (["png", "jpg", "JPEG", "webp"], ["PNG", "JPEG", "WEBP"]), (["TIFF"], None), (["PNG", "TIFFF"], None), ([], None)])
def test_accepted_formats_are_the_ones_the_server_checks(formats, named):
    """Named as Pillow names them; a format whose costly shapes the server does not refuse
    before decoding (TIFF), a typo or none at all fails the config check, not an ingress replica."""
    if named:
        assert validate(lambda a: a.update(image_input={"accepted_formats": formats})).image_input.accepted_formats == named
    else:
        with pytest.raises(ValidationError, match="accepted_formats"):
            validate(lambda a: a.update(image_input={"accepted_formats": formats}))


@pytest.mark.parametrize("origin,ok", [
    ("https://chat.example.com", True), ("http://localhost:3000", True), ("http://[::1]:8080", True), ("*", True),
    ("null", True),  # file:// pages and sandboxed frames
    ("https://chat.example.com/", False), ("https://chat.example.com/app", False), ("chat.example.com", False),
    ("https://*.example.com", False), ("https://Chat.Example.com", False), ("https://chat.example.com:443", False),
    ("http://chat.example.com:80", False)])
def test_cors_origins_are_origins(origin, ok):
    """A browser's Origin is compared as text: a trailing slash or a path would never match."""
    if ok:
        assert validate(lambda a: a.update(cors={"allow_origins": [origin]})).cors.allow_origins == [origin]
    else:
        with pytest.raises(ValidationError, match="is not an origin"):
            validate(lambda a: a.update(cors={"allow_origins": [origin]}))


@pytest.mark.parametrize("count", [0, -1])
def test_a_fixed_replica_count_is_at_least_one(count):
    """0 would leave the model configured but never live (each request waiting out the timeout);
    scale to zero is autoscaling's min_replicas 0."""
    with pytest.raises(ValidationError, match=r"model 'Llama3-8B' \(models\[0\]\): deployment.num_replicas"):
        validate(lambda a: a["models"][0]["deployment"].update(num_replicas=count))


def test_the_config_check_passes_the_shipped_config_and_says_what_the_build_would_warn_of(tmp_path, monkeypatch):
    """`serve.sh` runs it before starting anything: the shipped config passes without a word; a
    model path missing here and GPUs this machine lacks are warnings on the console (a cluster's
    nodes may have both), a YAML mistake names its file and line, other applications are left alone."""
    import yaml

    from serve_app import check_config

    assert check_config.check(ROOT / "serve_config.yaml") == ([], [])
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    chat = config["applications"][0]["args"]["models"][0]
    chat.update(path=str(tmp_path / "no-such-model"), deployment={**chat["deployment"], "num_gpus": 1})
    config["applications"].append({"name": "other", "route_prefix": "/other", "import_path": "elsewhere:app",
                                   "args": {"anything": 1}})
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setattr(check_config, "has_gpu_here", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    problems, warnings = check_config.check(tmp_path / "edited.yaml")
    assert problems == [] and len(warnings) == 2, warnings
    assert "no-such-model does not exist here" in warnings[0] and "asks for 1 GPU(s)" in warnings[1]
    (tmp_path / "bad.yaml").write_text("applications:\n  - name: a\n   import_path: x\n")
    problems, _ = check_config.check(tmp_path / "bad.yaml")
    assert len(problems) == 1 and problems[0].startswith("not valid YAML") and "bad.yaml\", line 3" in problems[0]
    assert check_config.main([str(tmp_path / "bad.yaml")]) == 1 and check_config.main([str(tmp_path / "edited.yaml")]) == 0


def test_the_config_check_reads_the_deployments_overrides(tmp_path):
    """Serve's `deployments:` beside `args`: a name the application has no deployment of fails
    the whole deploy (Serve then lists none of its deployments); `num_replicas` on an
    autoscaled model is ignored; an `autoscaling_config` there replaces the model's whole one,
    so what it leaves out takes Ray's defaults (found live: target 4 -> 2, delays 3/15 s -> 30/600 s)."""
    import yaml

    from serve_app import check_config

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    app = config["applications"][0]
    chat = app["args"]["models"][0]
    chat["deployment"] = {**chat["deployment"], "num_replicas": None, "autoscaling_config": {
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4, "upscale_delay_s": 3}}
    del chat["deployment"]["num_replicas"]

    def findings(overrides: list[dict]) -> tuple[list[str], list[str]]:
        app["deployments"] = overrides
        (tmp_path / "overrides.yaml").write_text(yaml.safe_dump(config))
        return check_config.check(tmp_path / "overrides.yaml")

    problems, _ = findings([{"name": "model_Lama3-8B", "num_replicas": 2}])
    assert len(problems) == 1 and "'model_Lama3-8B' is no deployment of this application (ingress, " \
        "model_Llama3-8B, model_SuperImage)" in problems[0]
    assert findings([{"name": "ingress", "num_replicas": 2}, {"name": "model_SuperImage", "num_replicas": 2},
                     {"name": "model_Llama3-8B", "autoscaling_config": {
                         "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4, "upscale_delay_s": 3}}]
                    ) == ([], [])
    _, warnings = findings([{"name": "model_Llama3-8B", "num_replicas": 2}])
    assert len(warnings) == 1 and "num_replicas is ignored, the model autoscales" in warnings[0]
    _, warnings = findings([{"name": "model_Llama3-8B", "autoscaling_config": {"min_replicas": 1}}])
    assert len(warnings) == 1 and "give target_ongoing_requests 4, max_replicas 2, upscale_delay_s 3 there too" \
        in warnings[0] and "(Ray's: target_ongoing_requests 2, max_replicas 1, upscale_delay_s 30)" in warnings[0]
    _, warnings = findings([{"name": "model_SuperImage", "autoscaling_config": {"min_replicas": 1, "max_replicas": 2}}])
    assert len(warnings) == 1 and "give target_ongoing_requests 8 there" in warnings[0]  # its batch, not Ray's 2
    # null: Serve drops autoscaling, and the fixed count counts (both set: Serve's schema refuses it).
    assert findings([{"name": "model_Llama3-8B", "num_replicas": 2, "autoscaling_config": None}]) == ([], [])
    assert "Manually setting num_replicas is not allowed" in findings([{
        "name": "model_SuperImage", "num_replicas": 2, "autoscaling_config": {}}])[0][0]
    # A value whose Ray default is none (unset) is said as null, not a crash of the check.
    chat["deployment"]["autoscaling_config"]["downscale_to_zero_delay_s"] = 60
    _, warnings = findings([{"name": "model_Llama3-8B", "autoscaling_config": {
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4, "upscale_delay_s": 3}}])
    assert len(warnings) == 1 and "give downscale_to_zero_delay_s 60 there too (Ray's: downscale_to_zero_delay_s " \
        "null)" in warnings[0]
    _, warnings = findings([{"name": "model_SuperImage", "max_ongoing_requests": 4}])
    assert len(warnings) == 1 and "max_ongoing_requests 4 is below the model's max_batch_size (8)" in warnings[0]
    app["args"]["registration"] = {"enabled": True}
    for model in app["args"]["models"]:
        model["cid"] = "cid-" + model["name"]
    problems, _ = findings([{"name": "registrar", "num_replicas": 2}])
    assert len(problems) == 1 and "the registrar runs exactly one replica" in problems[0]
    assert findings([{"name": "registrar", "max_ongoing_requests": 10}])[0] == []
    del app["args"]["registration"]
    # num_replicas: auto is Ray's own autoscaling (its defaults, merged with a given autoscaling_config).
    chat["deployment"] = {key: value for key, value in chat["deployment"].items() if key != "autoscaling_config"}
    chat["deployment"]["num_replicas"] = "auto"

    def beside_auto(overrides: list[dict]) -> tuple[list[str], list[str]]:
        """The findings besides the warning of args' own 'auto' (Ray's defaults: a replica every 2 requests)."""
        problems, warnings = findings(overrides)
        auto = [warning for warning in warnings if "num_replicas 'auto' takes Ray's autoscaling defaults" in warning]
        assert len(auto) == 1 and "model 'Llama3-8B'" in auto[0]
        return problems, [warning for warning in warnings if warning not in auto]

    assert "is ignored" in beside_auto([{"name": "model_Llama3-8B", "num_replicas": 3}])[1][0]
    assert beside_auto([{"name": "model_Llama3-8B", "autoscaling_config": {"max_replicas": 3}}]) == ([], [])
    assert beside_auto([{"name": "model_SuperImage", "num_replicas": "auto", "autoscaling_config": {"max_replicas": 3}}]
                       ) == ([], [])


def test_the_config_check_warns_of_base_urls_missing_the_route_prefix(tmp_path):
    """Image URLs and the models' URLs given to the nodes are routes appended to the base URL:
    under a route prefix, a base URL without it hands out URLs that 404."""
    import yaml

    from serve_app import check_config

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    app = config["applications"][0]
    app["route_prefix"] = "/ai/"
    app["args"].update(registration={"enabled": True, "public_base_url": "http://127.0.0.1:1088"})
    for model in app["args"]["models"]:
        model["cid"] = "cid-" + model["name"]
    app["args"]["limits"] = {"request_timeout_s": 170}
    (tmp_path / "prefixed.yaml").write_text(yaml.safe_dump(config))
    problems, warnings = check_config.check(tmp_path / "prefixed.yaml")
    assert problems == [] and len(warnings) == 2, warnings
    assert "route_prefix is /ai but public_base_url (http://127.0.0.1:1088) does not end with it" in warnings[0]
    assert "registration.public_base_url" in warnings[1] and "(e.g. http://127.0.0.1:1088/ai)" in warnings[1]
    app["args"]["public_base_url"] = "http://127.0.0.1:1088/ai"
    app["args"]["registration"]["public_base_url"] = "http://127.0.0.1:1088/ai/"
    (tmp_path / "prefixed.yaml").write_text(yaml.safe_dump(config))
    assert check_config.check(tmp_path / "prefixed.yaml") == ([], [])


def test_a_local_folder_that_cannot_be_its_kind_of_model_is_named_plainly(models_dir, tmp_path):
    """transformers' error for a diffusers folder served as chat sends its reader to install
    sentencepiece; these say what the folder is and what to set (serve.sh refuses the config,
    a replica deployed otherwise fails with the same words while the other models serve)."""
    import shutil

    import yaml

    from serve_app import check_config
    from serve_app.chat_model import ChatModel
    from serve_app.config import ChatModelConfig, checkpoint_problem

    def problem(kind: str, path) -> str | None:
        model = {"name": "m", "kind": kind, "path": str(path)}
        return checkpoint_problem((ChatModelConfig if kind == "chat" else ImageModelConfig).model_validate(model))

    chat, image = models_dir / "tiny-llama", models_dir / "tiny-sd"
    assert problem("chat", chat) is None and problem("image", image) is None
    assert problem("chat", "org/some-hub-model") is None and problem("chat", tmp_path / "missing") is None
    assert problem("chat", image) == "is a diffusers pipeline (it has model_index.json): an image model, kind: image"
    assert problem("image", chat) == "is a transformers checkpoint (config.json, no model_index.json): a chat model, kind: chat"
    assert problem("chat", models_dir).startswith("has no config.json, so it is not a transformers checkpoint (it holds ")
    assert "tiny-llama" in problem("chat", models_dir) and "name the model's own folder" in problem("chat", models_dir)
    assert problem("image", tmp_path) == "has no model_index.json, so it is not a diffusers pipeline"
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(chat / name, weights_only / name)
    assert problem("chat", weights_only).startswith("has no tokenizer (tokenizer.json, tokenizer_config.json")

    with pytest.raises(ValueError, match="tiny-sd is a diffusers pipeline"):
        ChatModel.func_or_class(ChatModelConfig.model_validate({"name": "m", "kind": "chat", "path": str(image)}))
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["applications"][0]["args"]["models"][0]["path"] = str(image)
    (tmp_path / "swapped.yaml").write_text(yaml.safe_dump(config))
    problems, _ = check_config.check(tmp_path / "swapped.yaml")
    assert problems == [f"application 'serve_app': model 'Llama3-8B': {image} is a diffusers pipeline (it has "
                        "model_index.json): an image model, kind: image"]


def test_harmony_is_one_format_for_thinking_and_calls():
    """gpt-oss: `tool_call_parser: openai` (vLLM's docs' one flag) reads its thinking too; the
    harmony parsers do not mix with another format."""
    from serve_app.config import ChatModelConfig

    def chat(**parsers):
        return ChatModelConfig.model_validate({"name": "m", "kind": "chat", "path": "p", **parsers})

    assert chat(tool_call_parser="openai").reasoning_parser == "openai_gptoss"
    assert chat(reasoning_parser="openai_gptoss").tool_call_parser is None
    for parsers in ({"tool_call_parser": "openai", "reasoning_parser": "qwen3"},
                    {"tool_call_parser": "hermes", "reasoning_parser": "openai_gptoss"}):
        with pytest.raises(ValueError, match="harmony"):
            chat(**parsers)


def test_a_serve_deploy_of_bad_args_ends_with_the_problem_not_pydantics_echo():
    """`serve deploy` runs the builder in Serve's controller, whose log and `serve status` end
    with the exception: its last lines name the problem, without the input echoed back."""
    from serve_app.app import build_app

    args = {"models": [{"name": "m", "kind": "chat", "path": "x", "deployment": {"num_gpu": 0}}]}
    with pytest.raises(ValueError) as refused:
        build_app(args)
    assert str(refused.value).splitlines()[-1].endswith("deployment.num_gpu: Extra inputs are not permitted")
    assert "input_value" not in str(refused.value) and refused.value.__suppress_context__


def test_check_config_help_is_usage_not_a_file(capsys):
    from serve_app.check_config import main

    assert main(["--help"]) == 0 and "usage: python -m serve_app.check_config CONFIG" in capsys.readouterr().out


def test_cpus_reserved_past_the_machines_are_a_warning():
    """Replicas past the machine's CPUs wait, pending, with only Serve's log to say so; what a
    replica reserves is counted as Serve 2.60 applies a `deployments:` override."""
    from serve_app.check_config import cpu_warning, reserved_cpus
    from serve_app.config import AppConfig

    args = AppConfig.model_validate({"models": [
        {"name": "chat", "kind": "chat", "path": "x", "deployment": {"num_cpus": 0.5, "num_replicas": 2}},
        {"name": "img", "kind": "image", "path": "y", "deployment": {"num_cpus": 0.5, "autoscaling_config": {
            "min_replicas": 0, "max_replicas": 4}}}]})
    assert reserved_cpus(args, []) == pytest.approx(1.1)  # 0.1 + 2 x 0.5 + none of the image model at start
    assert cpu_warning(1.1, cpus=2) == [] and "reserve 1.1 CPUs" in cpu_warning(1.1, cpus=1)[0]
    for override, reserved in (
            ({"num_replicas": 4}, 2.1),  # a fixed count replaced
            ({"ray_actor_options": {"num_gpus": 0}}, 2.1),  # the dict replaced: num_cpus 1
            ({"num_replicas": "auto"}, 0.6),
            ({"autoscaling_config": {"min_replicas": 3}}, 1.6)):
        assert reserved_cpus(args, [{"name": "model_chat", **override}]) == pytest.approx(reserved), override
    assert reserved_cpus(args, [{"name": "model_img", "num_replicas": 3}]) == pytest.approx(1.1)  # it autoscales


def test_the_config_check_catches_what_would_misbehave_only_once_deployed(tmp_path, monkeypatch):
    """Mistakes Ray takes without a word, each found before anything starts (found by a review):
    the builder named in Ray's dotted form is checked too; a key given twice (a second
    `deployment:` block) is refused, as YAML would keep the last silently; a `deployments:`
    autoscaling_config Ray would refuse or ignore part of once started; a user_config the
    replicas cannot take; an empty API key (auth silently off); a GPU reserved by a CPU model.
    Warned of: a ray_actor_options override (it drops the app's own), a key or path holding a
    $variable nothing expands, a path that is no folder here nor a hub id, num_replicas auto (up
    to 100 replicas), a base URL ending in /v1 or naming a port the server does not listen on,
    more requests passed on than a chat model takes, a text body limit past the body limit,
    keys set in the application's runtime_env with registration on, and two applications
    registering one project with one node."""
    import copy

    import yaml

    from serve_app import check_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("SERVE_APP_API_KEYS", raising=False)
    base = yaml.safe_load((ROOT / "serve_config.yaml").read_text())

    def check(edit) -> tuple[list[str], list[str]]:
        config = copy.deepcopy(base)
        edit(config, config["applications"][0], config["applications"][0]["args"])
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config) if isinstance(config, dict) else config)
        return check_config.check(tmp_path / "c.yaml")

    def only_problem(edit) -> str:
        problems, _ = check(edit)
        assert len(problems) == 1, problems
        return problems[0]

    def only_warning(edit) -> str:
        problems, warnings = check(edit)
        assert problems == [] and len(warnings) == 1, (problems, warnings)
        return warnings[0]

    assert check(lambda c, app, args: None) == ([], [])

    def dotted(c, app, args):
        app["import_path"] = "serve_app.app.build_app"
        args["models"][0]["deployment"]["num_gpu"] = 1
    assert "deployment.num_gpu: Extra inputs are not permitted" in only_problem(dotted)

    text = (ROOT / "serve_config.yaml").read_text().replace("          deployment:\n", "          deployment: {}\n          deployment:\n", 1)
    (tmp_path / "twice.yaml").write_text(text)
    problems, _ = check_config.check(tmp_path / "twice.yaml")
    assert len(problems) == 1 and "the key 'deployment' is given twice" in problems[0] and "line" in problems[0]
    # YAML's merge keys are no duplicates: a key written beside `<<: *anchor` overrides the anchor's.
    merged = "x-common: &common {num_cpus: 0.5, num_gpus: 0, max_ongoing_requests: 64}\n" + (
        ROOT / "serve_config.yaml").read_text().replace("          deployment:\n", "          deployment:\n"
                                                     "            <<: *common\n", 1)
    (tmp_path / "merged.yaml").write_text(merged)
    assert check_config.check(tmp_path / "merged.yaml") == ([], [])
    assert check(lambda c, app, args: c["http_options"].update(port="1088")) == ([], [])  # as Serve reads it

    def override(entry: dict):
        return lambda c, app, args: app.update(deployments=[{"name": "model_Llama3-8B", **entry}])
    assert "min_replicas: Input should be a valid integer" in only_problem(
        override({"autoscaling_config": {"min_replicas": None, "max_replicas": 4}}))
    assert "max_replicas (2) must be greater than or equal to min_replicas (5)" in only_problem(
        override({"autoscaling_config": {"min_replicas": 5, "max_replicas": 2}}))
    assert "min_replica: not an autoscaling option" in only_problem(
        override({"autoscaling_config": {"min_replica": 1, "max_replicas": 4}}))
    assert "user_config is for deployments with a reconfigure method" in only_problem(override({"user_config": {"a": 1}}))
    assert "ray_actor_options here replaces the whole set" in only_warning(
        override({"ray_actor_options": {"num_cpus": 0.5}}))

    assert "auth.api_keys: holds an empty key" in only_problem(lambda c, app, args: args.update(auth={"api_keys": [""]}))
    assert "'${KEY}', which looks like an environment variable" in only_warning(
        lambda c, app, args: args.update(auth={"api_keys": ["${KEY}"]}))

    def cpu_with_a_gpu(c, app, args):
        args["models"][0].update(device="cpu")
        args["models"][0]["deployment"]["num_gpus"] = 1
    assert "device 'cpu' with deployment.num_gpus 1" in only_problem(cpu_with_a_gpu)

    for path, said in (("data/models/llama3", ""), ("$MODELS/llama3", " (nothing expands $variables in it)")):
        assert f"path {path!r} is neither a folder here nor a hub id (namespace/name){said}" in only_warning(
            lambda c, app, args: args["models"][0].update(path=path))
    assert check(lambda c, app, args: args["models"][0].update(path="meta-llama/Llama-3.1-8B-Instruct")) == ([], [])
    assert "num_replicas 'auto' takes Ray's autoscaling defaults" in only_warning(
        lambda c, app, args: args["models"][0]["deployment"].update(num_replicas="auto"))
    assert "ends in /v1" in only_warning(lambda c, app, args: args.update(public_base_url="http://127.0.0.1:1088/v1"))
    assert "names port 1088 of this machine but the server listens on 8000" in only_warning(
        lambda c, app, args: c["http_options"].update(port=8000))
    assert "the ingress passes on up to 1024 requests" in only_warning(
        lambda c, app, args: args.update(ingress={**args.get("ingress", {}), "num_replicas": 2}))
    assert "is above max_body_bytes" in only_warning(lambda c, app, args: args.update(max_text_body_bytes=30_000_000))

    def registered(c, app, args):
        args["registration"] = {"enabled": True}
        args.setdefault("limits", {})["request_timeout_s"] = 120  # within the node's wait
        for model in args["models"]:
            model["cid"] = "cid-" + model["name"]
    assert check(registered) == ([], [])

    def keys_in_runtime_env(c, app, args):
        registered(c, app, args)
        app["runtime_env"] = {"env_vars": {"SERVE_APP_API_KEYS": "secret"}}
    assert "API keys are required" in only_warning(keys_in_runtime_env)

    def node_password_from(where: dict[str, str], in_runtime_env: bool):
        def edit(c, app, args):
            registered(c, app, args)
            args["registration"]["node_urls"] = ["http://node:${QA_NODE_PASSWORD}@127.0.0.1:7002"]
            if in_runtime_env:
                app["runtime_env"] = {"env_vars": where}
            elif where:
                monkeypatch.setenv("QA_NODE_PASSWORD", where["QA_NODE_PASSWORD"])
            else:
                monkeypatch.delenv("QA_NODE_PASSWORD", raising=False)
        return edit
    for unset in ({}, {"QA_NODE_PASSWORD": ""}):
        assert "names $QA_NODE_PASSWORD, unset or empty here" in only_warning(node_password_from(unset, False))
    monkeypatch.delenv("QA_NODE_PASSWORD", raising=False)
    assert check(node_password_from({"QA_NODE_PASSWORD": "s"}, False)) == ([], [])
    assert "set in the application's runtime_env env_vars, which Ray Serve shows" in only_warning(
        node_password_from({"QA_NODE_PASSWORD": "s"}, True))

    def two_registering(c, app, args):
        registered(c, app, args)
        second = copy.deepcopy(app)
        second.update(name="second", route_prefix="/second")
        second["args"]["public_base_url"] = "http://127.0.0.1:1088/second"
        c["applications"].append(second)
    problems, warnings = check(two_registering)
    assert problems == [] and any("applications 'serve_app', 'second' each register project 'serve_app'" in warning
                                  for warning in warnings), warnings
