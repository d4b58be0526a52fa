"""Errors clients may see, each with its HTTP status and OpenAI error type.

The type follows OpenAI's own answers: `invalid_request_error` for every 4xx (an unknown
model, a wrong API key included; `code` says which), `server_error` for every 5xx.

Model deployments use these too (a prompt longer than the context, an image
that does not decode): they cross Ray intact, keyword arguments included, so
the ingress answers them exactly like its own. `http_errors` maps any
exception to its reply.
"""

from __future__ import annotations

from http import HTTPStatus


class APIError(Exception):
    """An error with an HTTP status and an OpenAI-style type, safe to show a client."""

    status_code: int = 400
    default_code: str | None = None
    default_headers: dict[str, str] = {}

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)  # str(error) is the message; __reduce__ carries the rest
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = {**self.default_headers, **(headers or {})}

    @property
    def error_type(self) -> str:
        return "server_error" if self.status_code >= 500 else "invalid_request_error"

    def __reduce__(self):  # keep keyword-only arguments across Ray's pickling
        return (_rebuild, (type(self), self.message, self.param, self.code, self.headers))


def _rebuild(cls: type[APIError], message: str, param: str | None, code: str | None,
             headers: dict[str, str]) -> APIError:
    return cls(message, param=param, code=code, headers=headers)


class InvalidRequest(APIError):
    """400: the body or a parameter is wrong."""

    default_code = "invalid_value"


class AuthenticationFailed(APIError):
    """401: missing or wrong API key."""

    status_code = 401
    default_code = "invalid_api_key"


class NotFound(APIError):
    """404: unknown model, route or file."""

    status_code = 404
    default_code = "not_found"


def json_too_deep() -> InvalidRequest:
    """400 for valid JSON nested past what Python's parser takes (about 1,000 levels)."""
    return InvalidRequest("The request body's JSON is nested too deeply (more than about 1,000 levels of "
                          "arrays and objects).", code="invalid_json")


def json_not_parsed(cause: BaseException | None = None) -> InvalidRequest:
    """400 for a body Python's JSON parser refused; an integer past its 4,300 digits (valid JSON)
    is said as that, not as JSON that is not valid."""
    if isinstance(cause, ValueError) and "digits" in str(cause) and "integer" in str(cause):
        return InvalidRequest("A number in the request body has more than 4,300 digits, more than this server "
                              "reads.", code="invalid_json")
    return InvalidRequest("The request body is not valid JSON.", code="invalid_json")


def model_not_found(name: str) -> NotFound:
    """404 for the `model` parameter, worded and coded as OpenAI answers it."""
    return NotFound(f"The model {name!r} does not exist or is not available.",
                    param="model", code="model_not_found")


class MethodNotAllowed(APIError):
    """405: the route exists, the method does not."""

    status_code = 405
    default_code = "method_not_allowed"


class RequestTimeout(APIError):
    """408: the request did not arrive in full in time (headers or body sent too slowly)."""

    status_code = 408
    default_code = "request_timeout"


class PayloadTooLarge(APIError):
    """413: the body or an uploaded image is over its limit."""

    status_code = 413
    default_code = "payload_too_large"


class UnsupportedMediaType(APIError):
    """415: a body the server cannot read as sent (a compressed one)."""

    status_code = 415
    default_code = "unsupported_media_type"


class RangeNotSatisfiable(APIError):
    """416: a `Range` that starts past a file's end; `Content-Range` says how long it is."""

    status_code = 416
    default_code = "range_not_satisfiable"


class ClientClosedRequest(APIError):
    """499 (nginx's): the client went away before its request was whole. No one reads the
    answer; the status is what the access log and the metrics record, as Serve's own do."""

    status_code = 499
    default_code = "client_disconnected"


BODY_NEVER_ARRIVED = "The client disconnected before its request body arrived."


class Overloaded(APIError):
    """503: the model cannot take more work now; retry later."""

    status_code = 503
    default_code = "overloaded"


# OpenAI's clients retry every 5xx (twice by default) unless this header says otherwise.
NO_RETRY = {"x-should-retry": "false"}


class ModelFailed(APIError):
    """503: the model's deployment failed (its replicas could not start); it will not answer
    until an operator fixes and redeploys it, so the request is not kept waiting, nor retried
    by OpenAI's clients."""

    status_code = 503
    default_code = "model_failed"
    default_headers = NO_RETRY


class GatewayTimeout(APIError):
    """504: the model did not answer within the request timeout, which the caller has
    waited out already: OpenAI's clients are told not to wait it out twice more."""

    status_code = 504
    default_code = "timeout"
    default_headers = NO_RETRY


class ServerError(APIError):
    """500: a fault on our side; the message is generic on purpose."""

    status_code = 500
    default_code = "internal_error"


# Errors the model replicas raise: they live here, not beside the model code, because the
# ingress unpickles them by class and must not import torch or diffusers to do so.
class ContentFiltered(InvalidRequest):
    """The checkpoint's own safety checker blanked an image of this request."""

    default_code = "content_policy_violation"


class NotANumber(ServerError):
    """A row's logits hold NaN or +inf: the model computed nonsense for it. A 500 whose message
    says so (and what to set), not the generic one: the client's request was fine."""

    default_code = "model_output_not_a_number"


def status_phrase(status_code: int) -> str:
    """'Not Found' for 404: used where only a status is known."""
    try:
        return HTTPStatus(status_code).phrase
    except ValueError:
        return "Error"
