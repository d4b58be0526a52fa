"""Per-request guards that run before any route: API keys, body size; and the access log line (`access_log`).

They are plain ASGI middleware (no extra task per request, unlike
BaseHTTPMiddleware) and read their settings from `app.state`, which the
ingress fills from config when it starts: the FastAPI app object exists at
import time, the config only once the replica is constructed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import time
from typing import Any

from starlette.exceptions import HTTPException
from ray.exceptions import RayActorError
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.access_log import CURRENT, AccessRecord, app_path, header, log_access, note
from serve_app.config import AppConfig, CorsOptions
from serve_app.errors import (AuthenticationFailed, ClientClosedRequest, InvalidRequest, PayloadTooLarge,
                               RequestTimeout, UnsupportedMediaType)
from serve_app.http_errors import as_api_error, error_response
from serve_app import routes
from serve_app.routes import FILES as FILES_ROUTE
from serve_app.metrics import RequestMetrics

logger = logging.getLogger("ray.serve")

OPEN_PATHS = ("/health", "/ready")
DOC_PATHS = ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
"""FastAPI's schema and docs pages, open without a key (they hold no data)."""
CLIENT_CLOSED_REQUEST = ClientClosedRequest.status_code
"""The status a request Serve cancelled (its client left) is logged and counted with."""
IMAGE_ROUTES = (routes.EDITS, routes.GENERATIONS)


class ApiKeys:
    """The accepted keys, compared in constant time. Keys are never logged."""

    def __init__(self, config: AppConfig) -> None:
        extra = os.environ.get(config.auth.api_keys_env, "")
        # Stripped as the token a client sends is: a key pasted with a newline still matches.
        keys = [*(key.strip() for key in config.auth.api_keys), *(key.strip() for key in extra.split(","))]
        self._keys = [key.encode() for key in keys if key]
        self.protect_health = config.auth.protect_health
        self.protect_files = config.auth.protect_files
        # Said once at start: the variable is read here, in the ingress replica's environment,
        # which is not the environment of a shell running `serve deploy` against a running Ray.
        logger.info("API keys: %s", f"required ({len(self._keys)} accepted)" if self._keys else
                    f"off (no auth.api_keys, and ${config.auth.api_keys_env} is empty in the ingress replica)")

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def required_for(self, path: str) -> bool:
        """Every path but the probes and image files (each unless protected) and FastAPI's docs:
        a path the guard reads otherwise than the router (a mismatch of prefixes) is refused,
        not let through."""
        if not self.enabled:
            return False
        if path in OPEN_PATHS:
            return self.protect_health
        if path.startswith(FILES_ROUTE + "/"):
            return self.protect_files
        return path not in DOC_PATHS

    def accepts(self, authorization: bytes | None) -> bool:
        scheme, _, token = (authorization or b"").partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        token = token.strip()
        matched = False
        for key in self._keys:  # no early exit: timing says nothing about which key matched
            matched |= hmac.compare_digest(token, key)
        return matched


def _route_label(scope: Scope) -> str:
    """The template of the route that matched (`/v1/chat/completions`, `/v1/files/images/{name}`),
    else "other": a metrics label per raw path would let anyone mint label sets without end. A
    request answered before routing (a 401, a 413 by its Content-Length) counts under the
    template its path fits."""
    matched = scope.get("route")  # its template as OpenAPI writes it: `{model}`, not `{model:path}`
    route = getattr(matched, "path_format", None) or getattr(matched, "path", None)
    if route is None:
        path = app_path(scope)
        route = next((template for template, pattern in _route_templates(scope["app"]) if pattern.match(path)), None)
    return route or "other"


def _route_templates(app: Any) -> list[tuple[str, re.Pattern[str]]]:
    """The app's route templates with their patterns, from its OpenAPI schema (FastAPI's public
    view of its routes, built once and cached on the app). OpenAPI drops a parameter's
    convertor: a last parameter takes the rest of the path, as `/v1/models/{model:path}` does."""
    templates = getattr(app.state, "route_templates", None)
    if templates is None:
        openapi = getattr(app, "openapi", None)
        paths = openapi()["paths"] if callable(openapi) else {}
        templates = app.state.route_templates = [
            (template, compile_path(re.sub(r"\{(\w+)\}$", r"{\1:path}", template))[0]) for template in paths]
    return templates


class JsonCors(CORSMiddleware):
    """Starlette's CORS middleware, whose refused preflight (text/plain "Disallowed CORS origin")
    is answered in the envelope of every other error, with the same headers."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        headers = {name: value for name, value in response.headers.items()
                   if name.lower() not in ("content-length", "content-type")}
        return error_response(InvalidRequest(
            f"This cross-origin request is not allowed here (its {refused}): see the server's cors settings.",
            code="cors_not_allowed", headers=headers))


class ConfiguredCors:
    """Starlette's CORS middleware with the settings of `app.state.cors`, or none while no
    origin is configured. Outside the guard, so a preflight needs no API key and every answer,
    errors included, carries the headers a browser needs to read it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._cors: ASGIApp | None = None
        self._options: CorsOptions | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        options: CorsOptions | None = getattr(scope["app"].state, "cors", None) if scope["type"] == "http" else None
        if options is None or not options.allow_origins:
            await self.app(scope, receive, send)
            return
        if options is not self._options:  # built once per configuration
            self._options, self._cors = options, JsonCors(
                self.app, allow_origins=options.allow_origins, allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=options.allow_headers, allow_credentials=options.allow_credentials,
                expose_headers=["X-Request-Id", "Retry-After", "X-Should-Retry"], max_age=options.max_age_s)
        await self._cors(scope, receive, send)  # type: ignore[misc]


class HttpMiddleware:
    """A plain ASGI middleware (no extra task per request, unlike BaseHTTPMiddleware) for HTTP
    requests; anything else (lifespan) passes through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.http(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class RequestRecord(HttpMiddleware):
    """The access log line and the request metrics of every HTTP request, outermost, so that
    CORS preflights (answered by the CORS middleware itself) are logged and counted too; and
    the path without its trailing slash (see `_without_trailing_slash`) for all within."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope = _without_trailing_slash(_one_slash_root(scope))
        state = scope["app"].state  # Starlette sets scope["app"] before middleware runs
        started_at, response = time.perf_counter(), {"status": 500, "started": False}

        async def send_noting_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                response.update(status=message["status"], started=True)
            await send(message)

        record = AccessRecord()
        token = CURRENT.set(record)
        try:
            await self.app(scope, receive, send_noting_status)
        except asyncio.CancelledError:  # Serve cancels a request whose client hung up (or past its own
            if not response["started"]:  # http_options.request_timeout_s): not a server fault
                response["status"] = CLIENT_CLOSED_REQUEST
                note(error="request_cancelled")
            else:  # a stream after its 200: logged 200, counted as the 499 it ended as
                note(error="request_cancelled", error_status=CLIENT_CLOSED_REQUEST)
            raise
        finally:
            CURRENT.reset(token)
            seconds = time.perf_counter() - started_at
            if getattr(state, "access_log", False):
                log_access(scope, response["status"], seconds, record)
            metrics: RequestMetrics | None = getattr(state, "metrics", None)
            if metrics is not None:
                metrics.request(record.model, _route_label(scope), response["status"], record.fields, seconds)


class RequestGuard(HttpMiddleware):
    """API key check and body-size limits for every HTTP request, inside the CORS middleware
    (a preflight needs no key; every answer carries CORS headers); an error raised before the
    answer starts is answered here, in the envelope (Starlette would re-raise it to Serve)."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._guarded(scope, receive, send_noting_start, scope["app"].state)
        except Exception as exc:  # noqa: BLE001 - answer here: Starlette would re-raise it to Serve
            if started:
                raise
            await error_response(as_api_error(exc))(scope, receive, send_noting_start)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, state: Any) -> None:
        keys: ApiKeys | None = getattr(state, "api_keys", None)
        if keys is not None and keys.required_for(app_path(scope)):
            if not keys.accepts(header(scope, b"authorization")):
                error = AuthenticationFailed("A valid API key is required: send `Authorization: Bearer <key>`.",
                                             headers={"WWW-Authenticate": "Bearer"})
                await error_response(error)(scope, receive, send)
                return
        encoding = header(scope, b"content-encoding")
        if encoding and encoding.strip().lower() != b"identity":
            await error_response(_compressed(encoding))(scope, receive, send)
            return
        # An edit carries images; every other body is text, whose parsing costs the event loop per object.
        limit: int | None = getattr(state, "max_body_bytes" if _may_carry_images(scope) else "max_text_body_bytes",
                                    None)
        declared = header(scope, b"content-length")
        if limit and declared and declared.isdigit() and int(declared) > limit:
            await error_response(_too_large(limit))(scope, receive, send)
            return
        pause_s: float | None = getattr(state, "body_timeout_s", None)
        min_rate: int | None = getattr(state, "body_min_bytes_per_s", None)
        guard = limit or pause_s or min_rate
        await self.app(scope, _guarded_body(receive, limit, pause_s, min_rate) if guard else receive, send)


def _one_slash_root(scope: Scope) -> Scope:
    """A root path that begins with "//" (Serve's `http_options.root_path: "/"` before a
    `route_prefix: /ai` makes it "//ai") as "/ai", in the path too: FastAPI builds the docs
    pages' URLs from it, and a browser reads "//ai/openapi.json" as the host "ai"."""
    root = scope.get("root_path", "")
    if not root.startswith("//"):
        return scope
    single = "/" + root.lstrip("/")
    path = scope["path"]  # under it, as uvicorn gives it (a server that gives the path without it too)
    return {**scope, "root_path": single, "path": single + path[len(root):] if path.startswith(root) else path}


def _without_trailing_slash(scope: Scope) -> Scope:
    """`POST /v1/chat/completions/` is the route without its trailing slash, as a user means it.
    FastAPI would answer it with an empty 307 redirect, which curl (without `-L`) shows as no
    answer at all and which some clients follow as a GET, losing the body."""
    path = app_path(scope)
    if len(path) > 1 and path.endswith("/") and path.rstrip("/"):
        return {**scope, "path": scope["path"].rstrip("/")}
    return scope


def _may_carry_images(scope: Scope) -> bool:
    """An image route's body: an edit's, or a generation's (that route runs the edits sent to it,
    as the network's node forwards them there). Their JSON's cost is bounded by its values."""
    return app_path(scope) in IMAGE_ROUTES


def _guarded_body(receive: Receive, limit: int | None, pause_s: float | None,
                  min_rate: int | None = None) -> Receive:
    """A receive() that raises 413 once the body grows past `limit` (chunked bodies too), and 408
    when the body stops arriving for `pause_s` (`limits.body_timeout_s`) or arrives slower than
    `min_rate` bytes/s on average after that first `pause_s` (`limits.body_min_bytes_per_s`, as
    Apache's mod_reqtimeout's MinRate): a client that sends its headers and then too little, too
    slowly (a byte every few seconds), holds one of the ingress's `max_ongoing_requests` slots
    while it waits, and enough of them would take every slot. Once the body is whole, receive()
    waits as it did (for the client's hang-up).

    It raises HTTP exceptions, not our errors: FastAPI passes those on from its body parsing
    and turns any other exception there into a 400."""
    received, whole, waited = 0, False, 0.0

    async def guarded() -> Message:
        nonlocal received, whole, waited
        wait, slow = pause_s, False
        if min_rate and not whole:
            # Only the time spent waiting for the client counts against its rate: never the
            # server's own delays between reads (a busy event loop, a body read late).
            left = (pause_s or 0) + received / min_rate - waited
            if wait is None or left < wait:
                wait, slow = left, True
        started = time.monotonic()
        try:
            if whole or wait is None:
                message = await receive()
            else:
                async with asyncio.timeout(max(wait, 0)):
                    message = await receive()
        except TimeoutError:
            error = _body_too_slow(min_rate) if slow and min_rate else _body_stalled(pause_s or 0)
            raise HTTPException(408, detail=error.message) from None
        except RayActorError:  # Serve's Python proxy, which relays the client, was killed (a shutdown):
            return {"type": "http.disconnect"}  # the client is gone, not an error of this request's
        waited += time.monotonic() - started
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            whole = not message.get("more_body", False)
            if limit and received > limit:
                raise HTTPException(413, detail=_too_large(limit).message)
        return message

    return guarded


def _body_stalled(pause_s: float) -> RequestTimeout:
    return RequestTimeout(f"The request body stopped arriving: nothing came for {pause_s:g} s.")


def _body_too_slow(min_rate: int) -> RequestTimeout:
    return RequestTimeout(f"The request body arrived too slowly: slower than {min_rate} bytes/s on average.")


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than {limit} bytes.", code="body_too_large")


def _compressed(encoding: bytes) -> UnsupportedMediaType:
    """A compressed body (`Content-Encoding: gzip`) is refused by name: read as it is, it would
    be "not valid JSON", which sends its sender looking for a fault in the JSON; and inflating
    it would let a small upload grow past the body limits."""
    name = encoding.decode("latin-1").strip()[:40]
    return UnsupportedMediaType(f"Content-Encoding {name!r} is not supported: send the request body uncompressed.",
                                code="unsupported_content_encoding")
