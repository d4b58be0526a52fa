"""The one access-log line per request, and what routes tell it (`note`).

A route learns facts its request's line should carry (the model, tokens, images, an
error's code); `note` adds them to the record the request guard made for the request,
found through a context variable, so no route passes it around. The line is written
when the response is done: every value in it is the server's own or escaped, so a
client's path or request id cannot forge a second line or a field.
"""

from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass, field
from typing import Any, Collection
from urllib.parse import quote

from starlette.types import Scope

from serve_app.routes import FILES as FILES_ROUTE

logger = logging.getLogger("ray.serve")

REQUEST_ID_CHARS = 128
"""Longest request id the line quotes (a client may send any X-Request-Id)."""
ID_CHARS_KEPT = "/:+@.,;~!$&'()*[]"
"""What a request id keeps as it came (a path-like or URL-ish id still greps as sent): all
but whitespace, `=`, double quotes and `%`, which could start a field of its own."""


@dataclass
class AccessRecord:
    """What a route learns about its request, for the one access-log line."""

    model: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


CURRENT = contextvars.ContextVar[AccessRecord | None]("serve_app_access", default=None)


def note(**fields: Any) -> None:
    """Add facts (model, tokens, images, ...) to this request's access-log line."""
    record = CURRENT.get()
    if record is not None:
        record.model = fields.pop("model", record.model)
        record.fields.update(fields)


def note_named_model(body: Any, served: Collection[str]) -> None:
    """Note the model a body names before it is validated, so that a body refused for another
    field is still logged and counted under its model. Only a name this server serves is
    noted: any other stays `-`, so a client's text never becomes a metrics label."""
    name = body.get("model") if isinstance(body, dict) else None
    if isinstance(name, str) and name in served:
        note(model=name)


def serve_request_id() -> str | None:
    """Ray Serve's id for the request being handled (the client's X-Request-Id when it sent
    one; the access log line carries it too); None outside a Serve request."""
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or None
    except Exception:  # noqa: BLE001 - outside Serve (in-process tests) there is none
        return None


def app_path(scope: Scope) -> str:
    """The path inside this application (without the route prefix it is mounted at), cut where
    Starlette's router cuts it: at a segment boundary only. Under a prefix `/v`, `/v1/models`
    is the application's `/v1/models` (Serve's replica-port server matches prefixes by plain
    string), not `1/models`, which the key check did not recognise as an API route."""
    path, root = scope["path"], scope.get("root_path", "")  # as it came: a root_path ending in "/"
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("", "/"):  # ("/", "/api/") is
        return path[len(root):] or "/"  # cut as the router cuts it, or the key check saw "//v1/..."
    return path


def header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope.get("headers") or [] if key == name), None)


def _logged_request_id(scope: Scope) -> str:
    """Ray Serve's id for this request (outside Serve, the client's X-Request-Id), escaped as
    the path is: Serve takes the client's header as it came, spaces and `status=` included.
    (Serve's own TEXT log prefix still shows it raw; its JSON encoding quotes it.)"""
    request_id = serve_request_id() or (header(scope, b"x-request-id") or b"-").decode("latin-1")
    return quote(request_id[:REQUEST_ID_CHARS], safe=ID_CHARS_KEPT)


def _logged_path(scope: Scope) -> str:
    """The path as the access log shows it: percent-encoded again (the server decoded it), so
    an encoded newline or space cannot forge a log line or field; an image file's name left out,
    since with `protect_files` off the name is all that guards the image."""
    path = app_path(scope)
    if path.startswith(FILES_ROUTE + "/"):
        return FILES_ROUTE + "/{name}"
    return quote(path, safe="/")


def log_access(scope: Scope, status: int, seconds: float, record: AccessRecord) -> None:
    extras = " ".join(f"{key}={value}" for key, value in record.fields.items())
    logger.info("access request_id=%s method=%s path=%s model=%s status=%d latency_ms=%.1f %s",
                _logged_request_id(scope), scope["method"], _logged_path(scope), record.model or "-", status,
                seconds * 1000, extras)
