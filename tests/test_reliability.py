"""Hostile input, keys, overload and a crashing replica, against a real server.

A second application (`/secure`) runs with API keys and a chat model with a
tiny queue, beside the default one, on the session's Ray Serve.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import struct
import time
import uuid
import zlib
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import wait_for
from tests.test_server import CHAT, IMAGE, SEED_CHAT

KEY = "test-key-0123456789"
UI = "https://ui.example"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def secure(cluster, tmp_path_factory) -> str:
    from ray import serve

    args = cluster.args(route_prefix="/secure", auth={"api_keys": [KEY]},
                        limits={"max_messages": 8, "max_prompt_chars": 2000, "request_timeout_s": 60},
                        catalog_ttl_s=0.2, log_prompts=True, cors={"allow_origins": [UI]},
                        # Its own folder, whose images expire quickly (the sweep runs in the ingress).
                        image_dir=str(tmp_path_factory.mktemp("secure_images")),
                        image_retention={"max_age_s": RETENTION_S, "sweep_interval_s": 0.5})
    chat, image = args["models"]
    chat["deployment"].update(num_cpus=0.25, max_ongoing_requests=2, max_queued_requests=4)
    image["deployment"].update(num_cpus=0.25)
    image["allowed_sizes"] = ["64x64", "128x128", "512x512"]
    try:
        yield cluster.deploy(args, name="secure_app", route_prefix="/secure")
    finally:
        serve.delete("secure_app")


RETENTION_S = 6.0


@pytest.fixture(scope="module")
def shttp(secure: str):
    with httpx.Client(base_url=secure, timeout=120, headers=AUTH) as client:
        yield client


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header claims a huge image (the pixels are never there)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def gif_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "TIFF")
    return buffer.getvalue()


def png_bytes(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, "PNG")
    return buffer.getvalue()


MESSAGES_9 = [{"role": "user", "content": "x"}] * 9
SECURE_CASES = [
    # (method, path, kwargs, headers, status, param)
    ("post", "/v1/chat/completions", {"json": SEED_CHAT}, {}, 401, None),
    ("post", "/v1/chat/completions", {"json": SEED_CHAT}, {"Authorization": "Bearer wrong"}, 401, None),
    ("post", "/v1/chat/completions", {"json": SEED_CHAT}, {"Authorization": KEY}, 401, None),
    ("get", "/v1/models", {}, {}, 401, None),
    ("get", f"/v1/models/{CHAT}", {}, {}, 401, None),
    ("get", f"/v1/models/{CHAT}", {}, {"Authorization": "Bearer wrong"}, 401, None),
    ("post", "/v1/images/edits", {"data": {"model": IMAGE, "prompt": "x"}, "files": {"image": ("a.png", b"x")}}, {}, 401, None),
    ("get", "/v1/nothing", {}, {}, 401, None),  # any other path too: a key is asked before the router runs
    ("post", "/v1/images/generations", {"json": {"model": IMAGE, "prompt": "x"}}, {}, 401, None),
    ("post", "/v1/images/edits", {"json": {"model": IMAGE, "prompt": "x"}}, {}, 401, None),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "messages": MESSAGES_9}}, AUTH, 400, "messages"),
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "messages": [{"role": "user", "content": "x" * 2001}]}}, AUTH, 400, "messages"),
    # Tools' definitions are prompt text too (the chat template is given them).
    ("post", "/v1/chat/completions", {"json": {**SEED_CHAT, "tools": [{"type": "function", "function": {
        "name": "f", "description": "x" * 2001}}]}}, AUTH, 400, "messages"),
    ("post", "/v1/images/generations", {"json": {"model": IMAGE, "prompt": "x", "size": "256x256"}}, AUTH, 400, "size"),
    ("post", "/v1/images/generations", {"json": {"model": IMAGE, "prompt": "x" * 5000}}, AUTH, 400, "prompt"),
    ("post", "/v1/images/generations", {"json": {"model": IMAGE, "prompt": "x", "n": 50}}, AUTH, 400, "n"),
    ("post", "/v1/images/edits", {"json": {"model": IMAGE, "prompt": "x", "image": "http://169.254.169.254/latest/meta-data/"}}, AUTH, 400, "image"),
    ("post", "/v1/images/edits", {"json": {"model": IMAGE, "prompt": "x", "image": "file:///etc/passwd"}}, AUTH, 400, "image"),
    ("post", "/v1/images/edits", {"json": {"model": IMAGE, "prompt": "x", "image": "http://127.0.0.1:1/x.png"}}, AUTH, 400, "image"),
    ("post", "/v1/images/edits", {"json": {"model": IMAGE, "prompt": "x", "image": "http://[::1]/x.png"}}, AUTH, 400, "image"),
    ("post", "/v1/images/edits", {"json": {"model": IMAGE, "prompt": "x", "image": data_url(png_bomb())}}, AUTH, 413, "image"),
    ("post", "/v1/images/edits", {"data": {"model": IMAGE, "prompt": "x"}, "files": {"image": ("b.png", png_bomb())}}, AUTH, 413, "image"),
    ("post", "/v1/images/edits", {"json": {"model": IMAGE, "prompt": "x", "image": data_url(gif_bytes(), "image/tiff")}}, AUTH, 400, "image"),
    ("post", "/v1/images/edits", {"json": {"model": IMAGE, "prompt": "x", "image": "data:image/png;base64,!!!"}}, AUTH, 400, "image"),
    ("get", "/v1/files/images/..%2F..%2F..%2Fetc%2Fpasswd", {}, AUTH, 404, None),
    ("get", "/v1/files/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd", {}, AUTH, 404, None),
]


@pytest.mark.parametrize("method,path,kwargs,headers,status,param", SECURE_CASES,
                         ids=[f"{i}-{case[1]}-{case[4]}" for i, case in enumerate(SECURE_CASES)])
def test_hostile_input_gets_a_clear_error(secure, method, path, kwargs, headers, status, param):
    with httpx.Client(base_url=secure, timeout=60) as client:
        response = client.request(method.upper(), path, headers=headers, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert isinstance(body["code"], int) and body["code"] != 0 and body["message"]
    assert body["error"]["message"] and "Traceback" not in response.text
    if param:
        assert body["error"]["param"] == param
    if response.status_code == 401:
        assert response.headers["www-authenticate"] == "Bearer"


def test_the_api_docs_need_no_key(secure):
    with httpx.Client(base_url=secure, timeout=60) as anonymous:
        schema = anonymous.get("/openapi.json")
        assert schema.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"], schema.text
        for page in ("/docs", "/redoc"):
            shown = anonymous.get(page)
            assert shown.status_code == 200 and shown.headers["content-type"].startswith("text/html"), (page, shown.text)


def test_an_edit_without_a_size_makes_an_allowed_size(shttp):
    """The input image's size (80x60) is not one this model makes: the nearest one it does."""
    response = shttp.post("/v1/images/edits", data={"model": IMAGE, "prompt": "x", "response_format": "b64_json"},
                          files={"image": ("a.png", png_bytes((80, 60)))})
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))).size == (64, 64)


def test_keys_let_the_openai_client_in_and_health_stays_open(secure, shttp):
    client = openai.OpenAI(base_url=secure + "/v1", api_key=KEY, max_retries=0)
    assert {m.id for m in client.models.list()} == {CHAT, IMAGE}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=secure + "/v1", api_key="nope", max_retries=0).models.list()
    made = shttp.post("/v1/images/generations", json={"model": IMAGE, "prompt": "x", "size": "64x64"}).json()
    with httpx.Client(base_url=secure, timeout=60) as anonymous:
        assert anonymous.get("/health").json() == {"status": "ok"}
        assert anonymous.get("/ready").json() == {"ready": True, "missing": []}
        # Image URLs work without a key by default (`protect_files`): their names are unguessable.
        assert anonymous.get(made["data"][0]["url"]).headers["content-type"] == "image/png"


def test_generated_images_expire_as_image_retention_says(shttp):
    """The running server deletes its images once they are `max_age_s` old: an image URL
    works when returned, and is a 404 in the error envelope after that."""
    made = time.monotonic()
    url = shttp.post("/v1/images/generations", json={"model": IMAGE, "prompt": "x", "size": "64x64"}
                     ).json()["data"][0]["url"]
    assert shttp.get(url).status_code == 200
    assert wait_for(lambda: shttp.get(url).status_code == 404, timeout=RETENTION_S + 30, interval=0.5)
    assert time.monotonic() - made >= RETENTION_S - 1  # not before its time (file times are whole seconds at worst)
    assert shttp.get(url).json()["error"]["code"] == "file_not_found"


@pytest.mark.parametrize("protect_health,protect_files", [(False, False), (True, True)])
def test_which_paths_need_a_key(monkeypatch, protect_health, protect_files):
    """Keys from the config and from the environment variable; /v1 always needs one, health
    and image files only when protected."""
    from serve_app.config import AppConfig
    from serve_app.request_guards import ApiKeys

    monkeypatch.setenv("MY_KEYS", " env-key-1 , env-key-2,")
    keys = ApiKeys(AppConfig.model_validate({"models": [{"name": "m", "kind": "chat", "path": "p"}], "auth": {
        "api_keys": ["config-key"], "api_keys_env": "MY_KEYS",
        "protect_health": protect_health, "protect_files": protect_files}}))
    assert all(keys.accepts(f"Bearer {key}".encode()) for key in ("config-key", "env-key-1", "env-key-2"))
    assert not any(keys.accepts(value) for value in (b"Bearer nope", b"Bearer ", b"config-key", None))
    assert keys.required_for("/v1/models") and keys.required_for("/v1/chat/completions")
    assert keys.required_for("/health") is keys.required_for("/ready") is protect_health
    assert keys.required_for("/v1/files/images/abc.png") is protect_files
    # Any other path needs a key (what the guard reads otherwise than the router is refused), but the docs.
    assert keys.required_for("//v1/models") and keys.required_for("/anything")
    assert not any(keys.required_for(path) for path in ("/openapi.json", "/docs", "/redoc"))
    # A configured key pasted with a newline matches, as the sent token is stripped too.
    pasted = ApiKeys(AppConfig.model_validate({"models": [{"name": "m", "kind": "chat", "path": "p"}],
                                               "auth": {"api_keys": ["k3y\n"], "api_keys_env": "MY_KEYS"}}))
    assert pasted.accepts(b"Bearer k3y")


@pytest.mark.parametrize("path, root_path, inside", [
    ("/v1/models", "", "/v1/models"), ("/api/v1/models", "/api", "/v1/models"), ("/api", "/api", "/"),
    ("/api/", "/api/", "/"),
    # Under a prefix that ends inside a segment (Serve's replica port matches prefixes by plain string),
    # the router still sees /v1/models: so must the key check, which took "1/models" for no API route.
    ("/v1/models", "/v", "/v1/models"), ("/v1/models/m", "/v1/m", "/v1/models/m"),
    # A root_path ending in "/" (http_options.root_path "/" or "/api/"): uvicorn puts it before the path,
    # and the router cuts it whole, so the key check (which saw "//v1/...", no API route) must too.
    ("//v1/chat/completions", "/", "/v1/chat/completions"), ("/api//ready", "/api/", "/ready")])
def test_the_path_the_guards_check_is_the_one_the_router_routes(path, root_path, inside):
    from starlette._utils import get_route_path

    from serve_app.access_log import app_path

    scope = {"type": "http", "path": path, "root_path": root_path}
    assert app_path(scope) == inside == (get_route_path(scope) or "/")


def test_a_root_path_of_two_slashes_is_one_for_the_docs_pages():
    """`http_options.root_path: "/"` before `route_prefix: /ai` makes the root path "//ai": FastAPI
    built the docs pages' schema URL from it ("//ai/openapi.json", which a browser reads as the
    host "ai"). The middleware makes it "/ai", and the routes still match."""
    import asyncio

    from fastapi import FastAPI

    from serve_app.request_guards import RequestRecord

    app = FastAPI()
    app.add_middleware(RequestRecord)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"ok": True}

    async def get(path: str) -> dict:
        """The path under the root path, as uvicorn (Serve's server) puts it in the scope."""
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        await app({"type": "http", "method": "GET", "path": "//ai" + path, "root_path": "//ai", "query_string": b"",
                   "headers": [], "scheme": "http", "server": ("test", 80)}, receive, send)
        return {"status": sent[0]["status"], "body": b"".join(m.get("body", b"") for m in sent[1:]).decode()}

    docs = asyncio.run(get("/docs"))
    assert docs["status"] == 200 and "'/ai/openapi.json'" in docs["body"] and "//ai" not in docs["body"]
    assert json.loads(asyncio.run(get("/openapi.json"))["body"])["servers"] == [{"url": "/ai"}]
    assert json.loads(asyncio.run(get("/v1/models"))["body"]) == {"ok": True}


def _serve_logs_mentioning(marker: str) -> list[Path]:
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    return [path for path in logs.glob("*.log") if marker in path.read_text(errors="replace")]


def _access_lines(request_id: str) -> list[str]:
    """The access log lines of one request (the ingress's; Serve's own lines name it too)."""
    return [line for path in _serve_logs_mentioning(request_id) for line in path.read_text().splitlines()
            if request_id in line and " access request_id=" in line]


def _model_lines(app: str, model: str, request_id: str) -> list[str]:
    """The lines a model replica of `app` wrote holding `request_id` (Serve's CALL line for that
    request), or any other text."""
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    return [line for path in logs.glob(f"replica_{app}_model_{model}_*.log")
            for line in path.read_text(errors="replace").splitlines() if request_id in line]


def test_prompts_are_logged_only_where_log_prompts_is_on(shttp, http):
    secret, quoted, request_id = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
    assert http.post("/v1/chat/completions", headers={"X-Request-Id": request_id}, json={
        **SEED_CHAT, "max_tokens": 1, "messages": [{"role": "user", "content": secret}]}).status_code == 200
    assert shttp.post("/v1/chat/completions", json={**SEED_CHAT, "max_tokens": 1, "messages": [
        {"role": "user", "content": f'say "{quoted}"\nplease'}]}).status_code == 200
    assert wait_for(lambda: _serve_logs_mentioning(quoted), timeout=10)
    line = next(line for path in _serve_logs_mentioning(quoted) for line in path.read_text().splitlines() if quoted in line)
    assert "access request_id=" in line and f'prompt="say \\"{quoted}\\"\\nplease"' in line, line
    assert wait_for(lambda: _access_lines(request_id), timeout=10)  # its access line is written
    # and the model replica's own line for it: its buffer, where a prompt it logged would be, is flushed
    assert wait_for(lambda: _model_lines("serve_app", CHAT, request_id), timeout=10)
    assert not _serve_logs_mentioning(secret)  # the default application keeps prompts out of its logs


def test_the_access_log_cannot_be_forged_and_keeps_image_names_out(http):
    """The server decodes `%0A` and `%20` in a path: logged as they came, a path could write a
    second, forged line. And an image's unguessable name is all that guards it (with
    `protect_files` off), so its line names the route, not the file."""
    forged, fetched = uuid.uuid4().hex, uuid.uuid4().hex
    assert http.get("/v1/x%0Aaccess%20request_id%3Dfake%20status%3D200",
                    headers={"X-Request-Id": forged}).status_code == 404
    url = http.post("/v1/images/generations", json={"model": IMAGE, "prompt": "x", "size": "64x64"}).json()["data"][0]["url"]
    assert http.get(url, headers={"X-Request-Id": fetched}).status_code == 200
    assert wait_for(lambda: _access_lines(forged) and _access_lines(fetched), timeout=10)
    [line] = _access_lines(forged)
    assert "path=/v1/x%0Aaccess%20request_id%3Dfake%20status%3D200 " in line, line
    [line] = _access_lines(fetched)
    assert "path=/v1/files/images/{name} " in line and url.rsplit("/", 1)[1] not in line, line


def test_a_streamed_completion_counts_its_tokens_in_the_access_log(shttp):
    request_id = uuid.uuid4().hex
    with shttp.stream("POST", "/v1/chat/completions", headers={"X-Request-Id": request_id}, json={
            **SEED_CHAT, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert response.status_code == 200 and events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert wait_for(lambda: _access_lines(request_id), timeout=10)  # the model replica's lines may come first
    [line] = _access_lines(request_id)
    assert (f"prompt_tokens={usage['prompt_tokens']} completion_tokens={usage['completion_tokens']}" in line
            and usage["completion_tokens"] > 0), line


def test_a_client_mistake_found_by_a_model_is_not_logged_as_a_server_error(http):
    """A 400 the model replica finds (a token id the vocabulary lacks) is not Serve's
    "Request failed" ERROR with a traceback: operators watch ERROR lines for real failures."""
    request_id = uuid.uuid4().hex
    answer = http.post("/v1/chat/completions", headers={"X-Request-Id": request_id},
                       json={**SEED_CHAT, "max_tokens": 2, "logit_bias": {"99999999": 5}})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "logit_bias"
    assert wait_for(lambda: _access_lines(request_id), timeout=10)  # the ingress's log is flushed
    assert wait_for(lambda: _model_lines("serve_app", CHAT, request_id), timeout=10)  # and the model replica's
    lines = [line for path in _serve_logs_mentioning(request_id) for line in path.read_text().splitlines()
             if request_id in line]
    assert lines and not [line for line in lines if "ERROR" in line], lines


def test_a_browser_ui_on_an_allowed_origin_may_call_the_api(secure, http):
    """Preflight without a key (browsers send none), then the call; errors carry the headers too,
    so the page can read them. The default application lists no origin: no CORS headers."""
    preflight = httpx.options(secure + "/v1/chat/completions", timeout=60, headers={
        "Origin": UI, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == UI
    assert "POST" in preflight.headers["access-control-allow-methods"]
    answered = httpx.get(secure + "/v1/models", headers={"Origin": UI, **AUTH}, timeout=60)
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == UI
    refused = httpx.get(secure + "/v1/models", headers={"Origin": UI}, timeout=60)
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == UI
    preflight_id = uuid.uuid4().hex
    elsewhere = httpx.options(secure + "/v1/chat/completions", timeout=60, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST", "X-Request-Id": preflight_id})
    assert elsewhere.status_code == 400 and "access-control-allow-origin" not in elsewhere.headers
    # Logged as every request is (a wrong allow_origins, which breaks a browser UI, shows in the log).
    assert wait_for(lambda: _access_lines(preflight_id), timeout=10)
    [line] = _access_lines(preflight_id)
    assert "method=OPTIONS" in line and "status=400" in line, line
    assert elsewhere.headers["content-type"] == "application/json" and elsewhere.json()["code"] == 400
    assert elsewhere.json()["error"]["code"] == "cors_not_allowed" and "(its origin)" in elsewhere.json()["message"]
    assert "access-control-allow-origin" not in http.get("/v1/models", headers={"Origin": UI}).headers


def test_request_id_is_echoed(shttp):
    response = shttp.post("/v1/chat/completions", json={**SEED_CHAT, "max_tokens": 2},
                          headers={"X-Request-Id": "trace-me-123"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-me-123"
    assert shttp.get("/v1/models").headers.get("x-request-id")


async def _mixed_load(base: str, count: int, answered: asyncio.Event | None = None,
                      chat_timings: list[tuple[int | str, float]] | None = None,
                      errors: list[tuple[str, str | None]] | None = None) -> list[int | str]:
    """`count` concurrent requests (chat, and every fourth `/v1/models`); `answered` is set at the first chat 200;
    `chat_timings` gets each chat request's (outcome, seconds); `errors` each 503's (error code, Retry-After)."""
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=120, limits=limits) as client:
        async def one(i: int) -> int | str:
            started = time.monotonic()
            try:
                if i % 4 == 3:
                    response = await client.get("/v1/models")
                else:
                    response = await client.post("/v1/chat/completions",
                                                 json={**SEED_CHAT, "max_tokens": 8, "seed": i})
            except httpx.HTTPError as exc:
                return type(exc).__name__
            if chat_timings is not None and i % 4 != 3:
                chat_timings.append((response.status_code, time.monotonic() - started))
            if response.status_code == 503:
                assert response.headers.get("content-type") == "application/json", (response.headers, response.text)
                assert response.json()["code"] == 503 and response.headers.get("retry-after")
                if errors is not None:
                    errors.append((response.json()["error"]["code"], response.headers.get("retry-after")))
            elif response.status_code == 200:
                assert response.json()["code"] == 0
                if answered is not None and i % 4 != 3:
                    answered.set()
            return response.status_code

        return await asyncio.gather(*(one(i) for i in range(count)))


def test_overload_answers_503_at_once_and_loses_nothing(secure, http):
    chat: list[tuple[int | str, float]] = []
    errors: list[tuple[str, str | None]] = []
    outcomes = asyncio.run(_mixed_load(secure, 200, chat_timings=chat, errors=errors))
    assert len(outcomes) == 200 and len(chat) == 150
    assert set(outcomes) <= {200, 503}, outcomes
    # Each refusal says why, and when to come back (README: `overloaded`, Retry-After 1).
    assert len(errors) == outcomes.count(503) and set(errors) == {("overloaded", "1")}, set(errors)
    assert outcomes[3::4] == [200] * 50, "the catalog must answer under a chat overload"
    refused = sorted(seconds for status, seconds in chat if status == 503)
    served = [seconds for status, seconds in chat if status == 200]
    # The model takes 2 at a time and queues 4: at least that many are served, and far fewer than all.
    assert len(served) >= 6 and len(refused) >= 50, (len(served), len(refused))
    print(f"503 after p50 {refused[len(refused) // 2]:.2f}s, max {refused[-1]:.2f}s; "
          f"200 after max {max(served):.2f}s")
    # At once: a refusal never waits for a slot to free (up to request_timeout_s, 60 s). Here,
    # 200 requests arriving together are all answered within about 5 s on 2 busy cores.
    assert refused[-1] < 20, refused
    # The other application's models are unaffected.
    assert http.post("/v1/chat/completions", json={**SEED_CHAT, "max_tokens": 2}).status_code == 200
    # Serve's warning for each request the full replica turned away is summarized, one per 10 s
    # (it wrote one per rejection and retry: 8 lines for this burst, hundreds for bigger ones).
    def rejections() -> list[str]:
        return _model_lines("secure_app", "Llama3-8B", "Replica at capacity")
    assert wait_for(rejections, timeout=10)  # the first is logged (the replica's log is flushed every second)
    assert len(rejections()) <= 2, rejections()


def _replica_pids(app: str, deployment: str) -> list[int]:
    """Process ids of a deployment's live replicas (Serve names its actors after them)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    pids = []
    for name in names:
        try:
            actor = ray.get_actor(name, namespace="serve")
            pids.append(ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10))
        except Exception:  # noqa: BLE001 - a replica that is just going away
            continue
    return pids


def test_killed_replica_recovers_and_failures_are_bounded(secure, shttp):
    (pid,) = _replica_pids("secure_app", "model_Llama3-8B")
    waves: list[tuple[list[int | str], list[tuple[str, str | None]]]] = [([], []) for _ in range(4)]

    async def load_with_kill() -> None:
        answered = asyncio.Event()

        async def kill_mid_load() -> None:  # once the replica has answered, with the wave's others in flight
            await answered.wait()
            os.kill(pid, signal.SIGKILL)

        killer = asyncio.create_task(kill_mid_load())
        waves[0][0].extend(await _mixed_load(secure, 12, answered, errors=waves[0][1]))
        await asyncio.wait_for(killer, 10)
        for outcomes, errors in waves[1:]:
            outcomes.extend(await _mixed_load(secure, 12, errors=errors))

    asyncio.run(load_with_kill())
    print("per wave:", [(outcomes, errors) for outcomes, errors in waves])
    outcomes = [outcome for wave, _ in waves for outcome in wave]
    assert set(outcomes) <= {200, 503}, outcomes  # failures are clean 503 envelopes, never a hang or 500
    assert outcomes[3::4] == [200] * 12, "only the killed model's requests may fail; the catalog answers throughout"
    # Each failure says why and when to retry (README): the kill's `model_unavailable` (5 s), or the
    # small queue's `overloaded` (1 s; 9 chats a wave are more than its 2 running + 4 queued).
    errors = [error for _, wave_errors in waves for error in wave_errors]
    assert set(errors) <= {("model_unavailable", "5"), ("overloaded", "1")}, errors
    # Bounded: the kill loses only requests the replica held then (2 running and 4 queued at most),
    # all of the wave in flight at the kill; every later wave has a served model again.
    lost = [[error for error in wave_errors if error[0] == "model_unavailable"] for _, wave_errors in waves]
    assert len(lost[0]) <= 6 and lost[1:] == [[], [], []], lost
    assert all(200 in [o for i, o in enumerate(wave) if i % 4 != 3] for wave, _ in waves[1:]), waves
    assert wait_for(lambda: shttp.post("/v1/chat/completions", json={**SEED_CHAT, "max_tokens": 2}).status_code == 200,
                    timeout=90, interval=1)
    assert wait_for(lambda: _replica_pids("secure_app", "model_Llama3-8B") not in ([], [pid]), timeout=30)
    # Recovered: a load within the replica's capacity (2 running + 4 queued) is served in full.
    assert asyncio.run(_mixed_load(secure, 4)) == [200] * 4


@pytest.fixture(scope="module")
def redirector():
    """A loopback server (allowed in the tests' config) that redirects to whatever `?to=` says."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Redirect(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", self.path.split("to=", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize(("target", "code"), [
    ("http://127.0.0.2:1/x.png", "image_url_forbidden"), ("http://[::1]:1/x.png", "image_url_forbidden"),
    ("http://169.254.169.254/latest/meta-data/", "image_url_forbidden"), ("file:///etc/passwd", "invalid_image_url")])
def test_redirect_to_a_forbidden_target_is_refused(http, redirector, target, code):
    """Refused before any connection (the code says why), not merely failing to connect."""
    response = http.post("/v1/images/edits", json={"model": IMAGE, "prompt": "x", "image": f"{redirector}/r?to={target}"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "image", response.text
    assert response.json()["error"]["code"] == code, response.text


def test_a_slow_model_answers_504_not_a_hang(cluster):
    from ray import serve

    args = cluster.args(route_prefix="/slow", limits={"request_timeout_s": 0.3})
    chat = next(m for m in args["models"] if m["kind"] == "chat")
    chat["deployment"]["num_cpus"] = 0.25
    args["models"] = [chat]
    try:
        base = cluster.deploy(args, name="slow_app", route_prefix="/slow")
        with httpx.Client(base_url=base, timeout=60) as client:
            started = time.monotonic()
            response = client.post("/v1/chat/completions", json={**SEED_CHAT, "max_tokens": 1000, "temperature": 0,
                                                                 "stop": ["\u2603\u2603\u2603"],
                                                                 "logit_bias": {"2": -100, "5": -100}})  # no end
            assert time.monotonic() - started < 10
            assert response.status_code == 504 and response.headers["content-type"] == "application/json"
            assert response.json()["code"] == 504 and response.json()["error"]["type"] == "server_error"
            assert response.json()["error"]["code"] == "timeout" and response.headers["x-should-retry"] == "false"
            # The answer given up on stops costing compute: its generation ends, well short of 1000 tokens.
            model = serve.get_deployment_handle("model_Llama3-8B", app_name="slow_app")
            assert wait_for(lambda: model.stats.remote().result()["active_requests"] == 0, timeout=10, interval=0.05)
            steps = model.stats.remote().result()["decode_steps"]
            time.sleep(0.3)
            assert model.stats.remote().result()["decode_steps"] == steps and 0 < steps < 500  # it had begun
            # Within 0.3 s on a loaded machine too: retried, as a client would after a 504.
            assert wait_for(lambda: client.post("/v1/chat/completions", json={**SEED_CHAT, "max_tokens": 1}
                                                ).status_code == 200, timeout=30, interval=0.5)
    finally:
        serve.delete("slow_app")


def test_a_model_waking_from_zero_answers_503_model_starting_not_504(cluster):
    """A model scaled to zero is listed; a request that times out while its first replica
    starts is told to come back (503 with Retry-After), not that the model failed (504)."""
    from ray import serve

    args = cluster.args(route_prefix="/waking", limits={"request_timeout_s": 0.5}, catalog_ttl_s=0.2)
    chat = next(m for m in args["models"] if m["kind"] == "chat")
    chat["deployment"] = {"num_cpus": 0.25, "autoscaling_config": {
        "min_replicas": 0, "max_replicas": 1, "upscale_delay_s": 0, "downscale_delay_s": 600}}
    args["models"] = [chat]
    try:
        base = cluster.deploy(args, name="waking_app", route_prefix="/waking")
        with httpx.Client(base_url=base, timeout=60) as client:
            [card] = client.get("/v1/models").json()["data"]
            assert card["scaled_to_zero"] is True
            response = client.post("/v1/chat/completions", json={**SEED_CHAT, "max_tokens": 1})
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "model_starting" and response.headers["retry-after"] == "10"
    finally:
        serve.delete("waking_app")


def test_a_model_whose_replicas_cannot_start_is_503_model_failed_at_once(cluster):
    """A configured model Serve gave up on (here: weights that are not there) is not kept
    waiting for `request_timeout_s` in Serve's queue; its neighbour serves on."""
    from ray import serve

    args = cluster.args(route_prefix="/broken", catalog_ttl_s=0.2)
    args["models"] = [
        {"name": "broken", "kind": "chat", "path": "/nonexistent/checkpoint",
         "deployment": {"num_cpus": 0.05, "max_constructor_retry_count": 1}},  # given up after one start
        {"name": "echo", "kind": "chat", "engine": "echo", "path": "echo", "deployment": {"num_cpus": 0.05}},
    ]
    try:
        with pytest.raises(RuntimeError):  # serve.run reports the failed deploy
            cluster.deploy(args, name="broken_app", route_prefix="/broken")
        with httpx.Client(base_url=cluster.base_url + "/broken", timeout=60) as client:
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["echo"]
            ready = client.get("/ready")  # a load balancer's probe: not ready, and which model is missing
            assert (ready.status_code, ready.json()) == (503, {"ready": False, "missing": ["broken"]})
            started = time.monotonic()
            response = client.post("/v1/chat/completions", json={**SEED_CHAT, "model": "broken"})
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "model_failed" and time.monotonic() - started < 10
            assert "/nonexistent" not in response.text  # the cause is in Serve's status, not told to clients
            assert client.post("/v1/chat/completions", json={**SEED_CHAT, "model": "echo"}).status_code == 200
        # OpenAI's client retries a 5xx twice by default; this one it is told not to retry.
        sent: list[httpx.Request] = []
        with httpx.Client(event_hooks={"request": [sent.append]}) as counted:
            client = openai.OpenAI(base_url=cluster.base_url + "/broken/v1", api_key="unused", http_client=counted)
            with pytest.raises(openai.InternalServerError) as failed:
                client.chat.completions.create(model="broken", messages=SEED_CHAT["messages"])
        assert failed.value.status_code == 503 and failed.value.code == "model_failed"
        assert len(sent) == 1
    finally:
        serve.delete("broken_app")


def test_a_request_waiting_for_a_model_that_then_fails_to_start_is_told_so_then(cluster):
    """Sent while the model's replicas are still trying to start, a request gets 503
    `model_failed` once Serve gives up on them, not `model_starting` after `request_timeout_s`."""
    import threading

    from ray import serve

    args = cluster.args(route_prefix="/failing", catalog_ttl_s=0.2, limits={"request_timeout_s": 120})
    args["models"] = [{"name": "broken", "kind": "chat", "path": "/nonexistent/checkpoint",
                       "deployment": {"num_cpus": 0.05, "max_constructor_retry_count": 4}}]
    from ray.serve.schema import DeploymentStatus

    deployed: list[BaseException | None] = []  # the deploy's outcome: serve.run must report the failure

    def deploy() -> None:
        try:
            cluster.deploy(args, name="failing_app", route_prefix="/failing")
        except BaseException as exc:  # noqa: BLE001 - judged after the join
            deployed.append(exc)
        else:
            deployed.append(None)

    def model_status():
        app = serve.status().applications.get("failing_app")
        deployment = app and app.deployments.get("model_broken")
        return deployment and deployment.status

    deploying = threading.Thread(target=deploy)
    deploying.start()
    try:
        with httpx.Client(base_url=cluster.base_url + "/failing", timeout=150) as client:
            assert wait_for(lambda: client.get("/health").status_code == 200, timeout=60, interval=0.05)
            # Sent while Serve still tries to start it: the request waits for it, then hears it failed.
            assert model_status() not in (None, DeploymentStatus.DEPLOY_FAILED), model_status()
            started = time.monotonic()
            response = client.post("/v1/chat/completions", json={**SEED_CHAT, "model": "broken"})
            assert response.status_code == 503 and response.json()["error"]["code"] == "model_failed", response.text
            assert time.monotonic() - started < 60
            assert model_status() == DeploymentStatus.DEPLOY_FAILED
    finally:
        deploying.join(timeout=120)
        serve.delete("failing_app")
    assert not deploying.is_alive() and len(deployed) == 1 and isinstance(deployed[0], RuntimeError), deployed


def test_the_applications_runtime_env_reaches_its_replicas(cluster):
    """What a Serve config gives an application in `runtime_env` (env_vars: an API key
    variable, HF_TOKEN) reaches the ingress and the models. Serve builds the application in
    a task that runs in that runtime_env, and gives a deployment that states a runtime_env of
    its own (each of ours does) only the application's working_dir of it; here the task
    is made as Serve makes it, and the key reaches the ingress only through the app's merge."""
    import ray
    from ray import serve

    from serve_app.app import build_app
    from serve_app.config import AppConfig

    variable, key = "SERVE_APP_TEST_APP_KEYS", "key-from-the-app-runtime-env"
    args = cluster.args(route_prefix="/envapp", auth={"api_keys_env": variable})
    args["models"] = [{"name": "echo", "kind": "chat", "engine": "echo", "path": "echo",
                       "deployment": {"num_cpus": 0.05}}]

    @ray.remote(num_cpus=0, runtime_env={"env_vars": {variable: key}})
    def build_and_run() -> None:
        serve.run(build_app(AppConfig.model_validate(args)), name="env_app", route_prefix="/envapp")

    try:
        ray.get(build_and_run.remote(), timeout=120)
        with httpx.Client(base_url=cluster.base_url + "/envapp", timeout=60) as http:
            assert http.get("/v1/models").status_code == 401
            assert http.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["data"]
    finally:
        serve.delete("env_app")


def test_a_body_refused_for_a_field_is_logged_under_the_model_it_names(http):
    """A 400 from a field's range is still the named model's error in the access log (and the
    metrics, which take the same label); a name this server does not serve stays `-`."""
    ids = {kind: uuid.uuid4().hex for kind in ("chat", "image", "edit", "unknown")}
    assert http.post("/v1/chat/completions", headers={"X-Request-Id": ids["chat"]},
                     json={**SEED_CHAT, "temperature": 5}).status_code == 400
    assert http.post("/v1/images/generations", headers={"X-Request-Id": ids["image"]},
                     json={"model": IMAGE, "prompt": "x", "n": -1}).status_code == 400
    assert http.post("/v1/images/edits", headers={"X-Request-Id": ids["edit"]},
                     json={"model": IMAGE, "prompt": "x", "image": "http://h/x.png", "n": -1}).status_code == 400
    assert http.post("/v1/chat/completions", headers={"X-Request-Id": ids["unknown"]},
                     json={**SEED_CHAT, "model": "made-up", "temperature": 5}).status_code == 400
    assert wait_for(lambda: all(_access_lines(request_id) for request_id in ids.values()), timeout=10)
    lines = {kind: _access_lines(request_id)[0] for kind, request_id in ids.items()}
    assert f" model={SEED_CHAT['model']} status=400 " in lines["chat"], lines["chat"]
    assert f" model={IMAGE} status=400 " in lines["image"] and f" model={IMAGE} status=400 " in lines["edit"], lines
    assert " model=- status=400 " in lines["unknown"], lines["unknown"]
