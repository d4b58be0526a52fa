"""The one mapping from an exception to an HTTP reply.

Every failure leaves the server through `error_response`: the standard's
non-zero `code` and human `message`, OpenAI's `error` object, the right
status, and exactly `Content-Type: application/json` (a network node compares
that header as a string). Validation errors become 400 naming the parameter,
not FastAPI's 422. Unexpected errors are logged with the request id as their
reference and answered with a generic 500 that carries no internal text.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
import grpc
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from ray.exceptions import (
    LocalRayletDiedError,
    NodeDiedError,
    ObjectLostError,
    RayActorError,
    RayTaskError,
    WorkerCrashedError,
)
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Match

from serve_app.access_log import note, note_named_model, serve_request_id
from serve_app.errors import (
    BODY_NEVER_ARRIVED,
    APIError,
    ClientClosedRequest,
    InvalidRequest,
    MethodNotAllowed,
    ModelFailed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServerError,
    json_not_parsed,
    json_too_deep,
    status_phrase,
)
from serve_app.protocol import TOO_MANY_FILES, ErrorResponse, error_body

logger = logging.getLogger("ray.serve")

JSON = "application/json"


def json_response(body: BaseModel, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Serialise a wire model with pydantic; the media type is exactly application/json."""
    return Response(body.model_dump_json(), status_code=status_code, media_type=JSON, headers=headers)


def error_response(error: APIError) -> Response:
    """The error's reply; its code goes in the access-log line (503 `overloaded`, `model_starting`
    and `replica_failed` are one status, and an operator tells them apart there)."""
    note(error=error.code)
    return json_response(error_body(error), error.status_code, error.headers)


# A model replica died, or the way to it broke, while it had the request: a replica that died
# (Ray's actor errors; Serve turns gRPC's UNAVAILABLE into one), its worker or node that crashed,
# the answer's object lost with it.
REPLICA_LOST = (RayActorError, WorkerCrashedError, NodeDiedError, LocalRayletDiedError, ObjectLostError)


def _replica_lost(exc: BaseException) -> bool:
    """Also a gRPC call between replicas (RAY_SERVE_THROUGHPUT_OPTIMIZED) that a replica shutting
    down cancelled; gRPC's other codes are faults, answered and logged as such."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() == grpc.StatusCode.CANCELLED
    return isinstance(exc, REPLICA_LOST)


def as_api_error(exc: BaseException) -> APIError:
    """Classify any exception; unknown ones become a generic 500 (and are logged)."""
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException):
        exc = exc.cause  # a model replica raised it: classify the original
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (RequestValidationError, ValidationError)):
        return validation_error(exc)
    if isinstance(exc, StarletteHTTPException):
        return http_error(exc)
    if isinstance(exc, BackPressureError):
        return Overloaded("The model is handling too many requests; retry shortly.",
                          headers={"Retry-After": "1"})
    if isinstance(exc, DeploymentUnavailableError):  # a deployment that failed for good (or was just deleted)
        return ModelFailed("The model is not available: its deployment failed or was removed; the server's "
                           "operator has to redeploy it.")
    if _replica_lost(exc):
        logger.warning("a model replica was lost with a request: %s", str(exc).splitlines()[0] if str(exc) else
                       type(exc).__name__)
        return Overloaded("The model is restarting or unavailable; retry shortly.",
                          code="model_unavailable", headers={"Retry-After": "5"})
    reference = serve_request_id() or uuid.uuid4().hex[:12]
    logger.error("unhandled error (reference %s)", reference, exc_info=exc)
    return ServerError(f"Internal server error (reference {reference}).")


_TYPE_NAMES = {"str", "int", "float", "bool", "bytes", "list", "dict", "none"}


def _is_union_branch(part: str | int) -> bool:
    """pydantic names the branch of a union it tried in an error's location ('str',
    'list[ContentPart]', 'ContentPart'); wire fields are lower-case identifiers."""
    return isinstance(part, str) and (part in _TYPE_NAMES or not part.isidentifier() or part[:1].isupper())


def validation_error(exc: RequestValidationError | ValidationError) -> InvalidRequest:
    """A pydantic error as a 400 whose `param` is the field path, e.g. messages[0].role.

    The first error, except where a union failed: each branch then reports its own error,
    and the deepest one says what is wrong (a bad content part rather than "not a string")."""
    errors = exc.errors()
    first: dict[str, Any] = errors[0] if errors else {}
    if any(_is_union_branch(part) for error in errors for part in error.get("loc", ())):
        first = max(errors, key=lambda error: len(error.get("loc", ())))
    if first.get("type") == "json_invalid":
        return InvalidRequest("The request body is not valid JSON.", code="invalid_json")
    parts = [p for p in first.get("loc", ()) if p != "body" and not _is_union_branch(p)]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or None
    if param is None and first.get("type") in ("missing", "model_type", "model_attributes_type", "dict_type"):
        return InvalidRequest("The request body must be a JSON object, sent with Content-Type: application/json.",
                              code="invalid_body")
    message = str(first.get("msg", "Invalid request"))
    message = message.removeprefix("Value error, ")
    code = first["type"] if first.get("type") in ERROR_CODES_FROM_VALIDATORS else None
    return InvalidRequest(f"{param}: {message}" if param else message, param=param, code=code)


# The error types the protocol's validators raise (as pydantic's `PydanticCustomError`) that are
# also the answer's `code`: the same mistake gets the same code in JSON and in a multipart form.
ERROR_CODES_FROM_VALIDATORS = frozenset({TOO_MANY_FILES})


# FastAPI's detail for a JSON body its parser gave up on other than by a JSONDecodeError (not
# UTF-8, nesting past the recursion limit); Starlette's multipart 400s keep their own words.
FASTAPI_UNPARSED_BODY = "There was an error parsing the body"


def http_error(exc: StarletteHTTPException) -> APIError:
    if exc.status_code == 404:
        return NotFound("No such route.", code="route_not_found")
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow")  # Starlette names the route's methods; HTTP wants them sent
        return MethodNotAllowed(f"Method not allowed on this route{f' (it takes {allowed})' if allowed else ''}.",
                                headers={"Allow": allowed} if allowed else None)
    if exc.status_code == 413:
        return PayloadTooLarge(str(exc.detail), code="body_too_large")
    if exc.status_code == 408:
        return RequestTimeout(str(exc.detail))
    if exc.status_code == 400 and exc.detail == FASTAPI_UNPARSED_BODY:
        if isinstance(exc.__cause__, ClientDisconnect):  # FastAPI's 400 for a client that hung up mid-body
            return ClientClosedRequest(BODY_NEVER_ARRIVED)
        if isinstance(exc.__cause__, RecursionError):
            return json_too_deep()
        return json_not_parsed(exc.__cause__)
    if exc.status_code == 400:  # Starlette's own: a multipart form it could not parse, in its words
        return InvalidRequest(str(exc.detail), code="invalid_body")
    error = APIError(str(exc.detail) if exc.detail else status_phrase(exc.status_code))
    error.status_code = exc.status_code
    return error


HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def methods_at(request: Request) -> str | None:
    """Every method some route at this request's path takes, for a 405's `Allow`. Starlette
    names only the first route's: `/health`'s HEAD route (kept apart from its GET so the
    OpenAPI schema has no duplicate operation) made it `Allow: HEAD`. Asked of each route
    with each method, as the router itself matches them."""
    routes = request.app.router.routes
    allowed = [method for method in HTTP_METHODS
               if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)]
    return ", ".join(allowed) or None


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception FastAPI/Starlette can raise through `error_response`."""

    async def on_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, RequestValidationError):  # FastAPI refused the body before the route ran
            note_named_model(exc.body, getattr(request.app.state, "model_names", ()))
        if isinstance(exc, StarletteHTTPException) and exc.status_code == 405:
            allowed = methods_at(request)
            if allowed:
                exc.headers = {**(exc.headers or {}), "Allow": allowed}
        return error_response(as_api_error(exc))

    # FastAPI has handlers of its own for the first three; Exception catches the rest.
    for kind in (RequestValidationError, ValidationError, StarletteHTTPException, APIError, Exception):
        app.add_exception_handler(kind, on_error)


def error_schema() -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for routes: each error status with the envelope's schema."""
    return {status: {"model": ErrorResponse, "description": status_phrase(status)}
            for status in (400, 401, 404, 413, 416, 500, 503, 504)}

