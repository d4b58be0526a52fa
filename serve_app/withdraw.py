"""Taking the server's models off the AI network's nodes ahead of a stop.

A stopping server drains first: HAProxy takes no new connections while the requests
in flight finish (`serve_run`, `local_cluster.sh stop`), and only then does Serve shut
down, the registrar's replica with it, which is when it used to unregister. All that
time the nodes still held the project and forwarded new requests to a port that
refused them. So a stop now first asks each application's registrar to unregister
(`RegistrarDeployment.withdraw`), and drains after: the nodes stop sending new traffic
while what they sent already is answered.

`serve_run` calls `withdraw_registrations` in the `serve run` process; ahead of any
other stop (`local_cluster.sh stop`, a KubeRay deletion, maintenance), on a node of the Ray
cluster (a Ray driver needs a Ray node on its machine; `kubectl exec` into the head pod):

    python -m serve_app.withdraw [--address ADDRESS] [--timeout SECONDS]

The registrations stay withdrawn until the application starts again or is redeployed
with changed `args` (a new registrar replica).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import threading

from serve_app.config import REGISTRAR_DEPLOYMENT

WITHDRAW_TIMEOUT_S = 10.0
"""The longest a stop waits for the registrars (each node's unregister is bounded at 2 s)."""


def withdraw_registrations(timeout_s: float = WITHDRAW_TIMEOUT_S) -> list[tuple[bool, str]]:
    """Ask the registrar of every Serve application that has one to unregister it from its
    nodes, all at once, waiting up to `timeout_s` in all. Needs a Ray connection, and runs an
    event loop of its own, on a thread of its own (Serve's throughput-optimized mode routes a
    handle's calls on the caller's loop). Blocking. Returns a line per node and application for
    the operator (or one saying there is none), each with whether it went well; never raises
    (a stop goes on whatever happens)."""
    loop = asyncio.new_event_loop()
    # It runs as long as the process: Serve's routers long-poll its controller on it, and log
    # an ERROR when the loop they are bound to stops.
    threading.Thread(target=loop.run_forever, name="withdraw loop", daemon=True).start()
    try:
        return asyncio.run_coroutine_threadsafe(_withdraw_all(timeout_s), loop).result(timeout_s + 5) or [
            (True, "no application of this Ray cluster registers with a node")]
    except Exception as exc:  # noqa: BLE001 - a stop goes on
        return [(False, f"the registrars did not answer ({type(exc).__name__}); they unregister as Serve shuts down")]


async def _withdraw_all(timeout_s: float) -> list[tuple[bool, str]]:
    from ray import serve
    from ray.serve.handle import DeploymentHandle

    async def withdraw(app: str) -> dict[str, str | None]:
        # A handle of its own, not serve.get_deployment_handle's cached one, whose router
        # Serve's shutdown would stop on the loop it lives on: this one, from another thread.
        handle = DeploymentHandle(REGISTRAR_DEPLOYMENT, app)
        try:
            return await handle.withdraw.remote()
        finally:
            await handle.shutdown_async()

    try:
        apps = [name for name, app in serve.status().applications.items() if REGISTRAR_DEPLOYMENT in app.deployments]
    except Exception as exc:  # noqa: BLE001 - no Serve, or its controller gone: nothing to withdraw from here
        return [(False, f"could not reach Serve's registrars ({type(exc).__name__}: {exc}); "
                        "they unregister as Serve shuts down")]
    tasks = {app: asyncio.create_task(withdraw(app)) for app in apps}
    if tasks:
        await asyncio.wait(tasks.values(), timeout=timeout_s)
    lines: list[tuple[bool, str]] = []
    for app, task in tasks.items():
        if not task.done():
            task.cancel()  # the registrar goes on (it shields its nodes' calls) and retries as it stops
            lines.append((False, f"application {app!r}: its registrar did not withdraw within {timeout_s:g} s; "
                                 "the nodes it has not told are told as Serve shuts down"))
        elif task.exception() is not None:
            lines.append((False, f"application {app!r}: its registrar could not withdraw "
                                 f"({type(task.exception()).__name__}: {task.exception()}); "
                                 "it unregisters as Serve shuts down"))
        else:
            lines += [(True, f"application {app!r}: withdrawn from the AI network's node {url}") if error is None else
                      (False, f"application {app!r}: node {url} did not take the unregister ({error}); "
                              "it is tried again as Serve shuts down")
                      for url, error in task.result().items()]
    return lines


def add_address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or "auto",
                        help="the Ray cluster (default: RAY_ADDRESS, else the one on this machine)")


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # and empty SETTINGS


def _speaks_grpc(host: str, port: int) -> bool:
    """Whether the server at host:port answers HTTP/2's preface with its SETTINGS, as Ray's GCS
    and Ray client (gRPC) do; an HTTP/1 server (the dashboard) does not. Raises OSError where
    nothing listens."""
    with socket.create_connection((host, port), timeout=5) as conn:
        conn.sendall(HTTP2_PREFACE)
        try:
            head = conn.recv(9)
        except TimeoutError:
            return False
    return len(head) >= 4 and head[3] == 0x04  # a frame header: length (3 bytes), then its type


def connect(address: str, prog: str) -> int | None:
    """Connect this process to the Ray cluster at `address` as a driver, for the stop commands
    (`withdraw`, `shutdown`). Returns None once connected, else the exit status, having said why
    on stderr in one line (no traceback)."""
    if address.startswith(("http://", "https://")):
        print(f"{prog}: {address} is a dashboard's address; give the cluster's (its GCS, HOST:6379, "
              "or auto), on a node of the cluster", file=sys.stderr)
        return 1
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if host and port.isdigit():  # Ray would retry an address nobody listens on for a minute
        try:
            grpc = _speaks_grpc(host.strip("[]"), int(port))
        except OSError as exc:
            print(f"{prog}: no Ray at {address}: {exc}", file=sys.stderr)
            return 1
        if not grpc and os.environ.get("RAY_USE_TLS", "0") in ("0", ""):  # and for ever on another server's port
            print(f"{prog}: {address} is no Ray cluster's address (what answers there does not speak gRPC): give "
                  "its GCS (HOST:6379 by default) or Ray client (ray://HOST:10001), not its dashboard's port",
                  file=sys.stderr)
            return 1
    import ray
    import ray.serve  # noqa: F401 - it sets its logger to INFO at import: quieted after that

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no INFO lines of its handles' start
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - said plainly, no traceback
        print(f"{prog}: cannot connect to Ray at {address}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.withdraw", description=(
        "Unregister every Serve application's models from the AI network's nodes, ahead of a stop."))
    add_address_argument(parser)
    parser.add_argument("--timeout", type=float, default=WITHDRAW_TIMEOUT_S, help="seconds to wait at most")
    ns = parser.parse_args(argv)
    failed = connect(ns.address, "withdraw")
    if failed is not None:
        return failed
    lines = withdraw_registrations(ns.timeout)
    for _, line in lines:
        print(f"withdraw: {line}", file=sys.stderr)
    return 0 if all(ok for ok, _ in lines) else 2


if __name__ == "__main__":
    sys.exit(main())
