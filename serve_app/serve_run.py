"""Ray's `serve run`, stoppable with SIGINT whoever started it (what scripts/serve.sh runs).

`serve run` shuts Serve down gracefully (`serve.shutdown()`: replicas drain, the
registrar withdraws the models from the AI network's nodes) only on a
KeyboardInterrupt. A shell starts a background job with SIGINT ignored, and Python
keeps a signal that was ignored at startup ignored, so a `serve run` started from a
script, `nohup` or `&` could not be stopped gracefully at all. scripts/serve.sh runs
it through this module and turns its own SIGTERM or SIGINT into one SIGINT to it.

On that SIGINT, the registrars first withdraw the models from the AI network's nodes
(`serve_app.withdraw`), so that the nodes stop forwarding new requests to a server about
to refuse them. Then HAProxy (where Serve runs it) is drained: Serve's shutdown kills
it at once (Ray 2.60's `HAProxyManager.stop` sends SIGKILL), and with it every request
in flight, streams cut mid-answer, though the replicas behind it would have finished
them. The drain (`haproxy_drain`) refuses new connections and lets the requests HAProxy
holds finish; `serve run` shuts Serve down once every one has, or after
SERVE_APP_DRAIN_TIMEOUT_S (30). A second SIGINT stops waiting.

    python -m serve_app.serve_run CONFIG [serve run's options...]
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

from serve_app.haproxy_drain import Drained, drain_haproxy

DRAIN_ENV = "SERVE_APP_DRAIN_TIMEOUT_S"
DEFAULT_DRAIN_S = 30.0


def detach_from_a_gone_terminal() -> None:
    """Once the terminal has closed (SIGHUP), every write to it fails with EIO, and `serve run`
    logs a line before it shuts Serve down: the failed write would skip that shutdown (and the
    registrar's stop with it). So a stdout or stderr that no longer takes writes goes to
    /dev/null."""
    for fd in (1, 2):
        try:
            os.write(fd, b"")  # a hung-up terminal refuses even an empty write
        except OSError:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)


def say(line: str) -> None:
    """One line on stderr, where there still is one: after the terminal closed (SIGHUP) a write
    fails with EIO, which must not stop the graceful stop this line is about."""
    try:
        print(f"serve_run: {line}", file=sys.stderr, flush=True)
    except OSError:
        pass


def drain_timeout_s() -> float:
    try:
        return max(0.0, float(os.environ.get(DRAIN_ENV) or DEFAULT_DRAIN_S))
    except ValueError:
        say(f"{DRAIN_ENV}={os.environ[DRAIN_ENV]!r} is not a number of seconds; using {DEFAULT_DRAIN_S:g}")
        return DEFAULT_DRAIN_S


def drain(timeout_s: float) -> None:
    """Drain the HAProxy this `serve run` started (`haproxy_drain`), saying what it does."""

    drained = drain_haproxy(timeout_s)
    if drained.proxies:
        say(drained_line(drained, timeout_s))


def drained_line(drained: Drained, timeout_s: float) -> str:
    """What a drain of HAProxy processes (on one node or many) did, in a line."""
    said = f"{drained.proxies} HAProxy process(es) took no new connections"
    if drained.requests_cut:
        said += f", but {drained.requests_cut} request(s) still in flight after {timeout_s:g} s are cut"
    if drained.soft_stopped:
        said += (f"; {drained.soft_stopped} soft-stopped by a reload were still up after {timeout_s:g} s (for idle "
                 "keep-alive connections, or requests begun before the reload, which are cut)")
    return said if drained.cut else said + ", and their requests in flight have finished"


def withdraw_from_network() -> None:
    """Unregister the models from the AI network's nodes, where registration is on (nothing
    before `serve run` has connected to Ray). Its Ray calls run on a thread of their own: called
    from this signal handler, they could wait on a lock held by the code the signal interrupted."""
    connected = getattr(sys.modules.get("ray"), "is_initialized", None)  # None: not (fully) imported yet
    if connected is None or not connected():
        return
    from serve_app.withdraw import withdraw_registrations

    for _, line in withdraw_registrations():
        say(line)


_draining = False


def drain_then_interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGINT: withdraw the registrations, drain HAProxy, then the KeyboardInterrupt on which
    `serve run` shuts Serve down (at once, from a second SIGINT meanwhile)."""
    global _draining
    if _draining:
        raise KeyboardInterrupt
    _draining = True
    try:
        detach_from_a_gone_terminal()
        withdraw_from_network()
        drain(drain_timeout_s())
    except Exception as exc:  # noqa: BLE001 - whatever failed, Serve still shuts down gracefully
        say(f"the stop goes on without its first steps: {type(exc).__name__}: {exc}")
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    # First: importing Ray takes a second or more, and a SIGINT still ignored meanwhile is lost.
    signal.signal(signal.SIGINT, drain_then_interrupt)
    from ray.serve.scripts import cli  # Ray's own `serve` command line: `serve run` exactly as it is

    cli.main(args=["run", *(sys.argv[1:] if argv is None else argv)], prog_name="serve")


if __name__ == "__main__":
    main()
