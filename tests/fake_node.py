"""A real HTTP stand-in for the AI network's communication node (AIComputingNode), on loopback.

It implements the node's four registration endpoints with the node's own
validation and reply shapes (success is `{"message": "ok"}` with no `code`),
so the registrar is tested against what it will meet, over real sockets. Tests
can make it fail (`fail_status = 500`), look around as a request arrives
(`on_request`, called before the node answers), take it down (`stop()`: connection
refused) and bring it back on the same port (`start()`), or restart it with an
empty registry (`restart()`, a reset), and read what it received (`received`) and what
it holds (`projects`). Written independently of `serve_app.registration` on
purpose: a shared model would hide a shared mistake.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import urlsplit

LOCAL_HOSTS = {"localhost", "127.0.0.1"}
"""The node accepts only `api` URLs on its own machine: `localhost` or one of its IPs."""
PARSE_ERROR, PARAM_ERROR, INTERNAL_ERROR = 1001, 1002, 5000

Reply = tuple[int, dict[str, Any]]


@dataclass(frozen=True)
class Received:
    path: str
    body: Any  # the decoded JSON, or None when the body was not JSON


class BadRequest(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _text(body: dict[str, Any], key: str, what: str) -> str:
    """A required non-empty string field; a wrong JSON type is a parse error, as in Go."""
    value = body.get(key, "")
    if not isinstance(value, str):
        raise BadRequest(PARSE_ERROR, "Parse request json failed")
    if not value:
        raise BadRequest(PARAM_ERROR, f"{what} can not be empty")
    return value


def _model_entry(body: dict[str, Any]) -> dict[str, Any]:
    """Validate one model as the node does: name, local `api`, type, non-empty `cid`."""
    model = _text(body, "model", "model name")
    api = _text(body, "api", "model api")
    node_type = body.get("type", 0)
    if not isinstance(node_type, int) or isinstance(node_type, bool):
        raise BadRequest(PARSE_ERROR, "Parse request json failed")
    if node_type not in (0, 1, 2):
        raise BadRequest(PARAM_ERROR, f"unknown model type {node_type}")
    host = urlsplit(api).hostname
    if host not in LOCAL_HOSTS:
        raise BadRequest(PARAM_ERROR, "the AI model and the node are not on the same machine")
    cid = _text(body, "cid", "cid represents the docker container id, which")
    return {"model": model, "api": api, "type": node_type, "cid": cid}


class FakeNode:
    """The node's registration API on 127.0.0.1, with switches for failures and restarts."""

    def __init__(self) -> None:
        self.port = 0  # chosen by the OS at the first start, kept across restarts
        self.received: list[Received] = []
        self.authorizations: list[str | None] = []  # each request's Authorization header
        self.projects: dict[str, list[dict[str, Any]]] = {}
        self.fail_status: int | None = None  # e.g. 500: answer every request with that error
        self.on_request: Callable[[str, Any], None] | None = None  # (path, JSON body), before the answer
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._routes: dict[str, Callable[[dict[str, Any]], str]] = {
            "/api/v0/ai/project/register": self._register_project,
            "/api/v0/ai/project/unregister": self._unregister_project,
            "/api/v0/ai/model/register": self._register_model,
            "/api/v0/ai/model/unregister": self._unregister_model,
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "FakeNode":
        """Listen (again) on the node's port; the registry is kept."""
        node = self

        class Handler(_Handler):
            fake = node

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fake-node-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Go down: the port refuses connections until `start()`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def restart(self) -> None:
        """A node whose registry was reset (the real node keeps registrations in its config
        file across a plain restart; one reinstalled, or its file replaced, forgets them)."""
        self.stop()
        with self._lock:
            self.projects.clear()
        self.start()

    # ------------------------------------------------------------------ queries

    def bodies(self, path: str) -> list[Any]:
        """The JSON bodies received on one path, oldest first."""
        with self._lock:
            return [r.body for r in self.received if r.path == path]

    def models_of(self, project: str) -> list[dict[str, Any]] | None:
        with self._lock:
            models = self.projects.get(project)
            return None if models is None else list(models)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Poll `predicate` until it holds (for tests in synchronous code)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    # ------------------------------------------------------------------ the API

    def handle(self, path: str, raw: bytes) -> Reply:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if self.on_request is not None:
            self.on_request(path, body)
        with self._lock:
            self.received.append(Received(path, body))
            route = self._routes.get(path)
            if route is None:
                return 404, {"message": "404 page not found"}
            if self.fail_status is not None:
                return self.fail_status, {"code": INTERNAL_ERROR, "message": "fake node failure"}
            try:
                if not isinstance(body, dict):
                    raise BadRequest(PARSE_ERROR, "Parse request json failed")
                return 200, {"message": route(body)}
            except BadRequest as exc:
                return 400, {"code": exc.code, "message": str(exc)}

    def _register_project(self, body: dict[str, Any]) -> str:
        project = _text(body, "project", "project name")
        models = body.get("models") or []
        if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
            raise BadRequest(PARSE_ERROR, "Parse request json failed")
        self.projects[project] = [_model_entry(m) for m in models]
        return "ok"

    def _unregister_project(self, body: dict[str, Any]) -> str:
        project = _text(body, "project", "project name")
        return "ok" if self.projects.pop(project, None) is not None else "not existed"

    def _register_model(self, body: dict[str, Any]) -> str:
        project = _text(body, "project", "project name")
        entry = _model_entry(body)
        models = self.projects.setdefault(project, [])
        models[:] = [m for m in models if (m["model"], m["cid"]) != (entry["model"], entry["cid"])] + [entry]
        return "ok"

    def _unregister_model(self, body: dict[str, Any]) -> str:
        project = _text(body, "project", "project name")
        key = (_text(body, "model", "model name"), _text(body, "cid", "cid"))
        models = self.projects.get(project, [])
        kept = [m for m in models if (m["model"], m["cid"]) != key]
        if len(kept) == len(models):
            return "not existed"
        self.projects[project] = kept
        return "ok"


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.0, one request per connection: a stopped node leaves no pooled connection behind."""

    fake: FakeNode

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.fake.authorizations.append(self.headers.get("Authorization"))
        status, body = self.fake.handle(self.path, raw)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")  # what gin's c.JSON sends
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
        pass
