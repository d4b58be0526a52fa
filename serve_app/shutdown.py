"""A graceful stop of Serve on a running Ray cluster, what `serve.sh`'s stop does for `serve run`.

`serve shutdown` alone cuts every request in flight where Serve runs HAProxy (Ray 2.60's
`HAProxyManager.stop` sends it SIGKILL), and withdraws the models from the AI network's nodes
only as the registrar's replica stops, after the ingress, so the nodes keep forwarding to a
port that refuses them meanwhile. This command does the three steps in the right order, on
every node of the cluster, through Ray itself:

1. the registrars unregister the models from the AI network's nodes (`serve_app.withdraw`);
2. each node's HAProxy is drained (`haproxy_drain`: new connections refused, the requests it
   holds finish) by a task pinned to that node, which waits up to `--drain-timeout` (30 s, or
   SERVE_APP_DRAIN_TIMEOUT_S) for them;
3. `serve.shutdown()`: the replicas drain and stop.

    python -m serve_app.shutdown [--address ADDRESS] [--drain-timeout SECONDS]

Run it on a node of the cluster (a Ray driver needs a Ray node on its machine): `ray exec
cluster/cluster-launcher.yaml 'python -m serve_app.shutdown'`, `kubectl exec <head pod> -c
ray-head -- python -m serve_app.shutdown`, or on the machine of a `ray start` + `serve deploy`.
"""

from __future__ import annotations

import argparse
import sys

from serve_app.haproxy_drain import Drained, drain_haproxy
from serve_app.serve_run import drain_timeout_s, drained_line
from serve_app.withdraw import add_address_argument, connect, withdraw_registrations

PROG = "python -m serve_app.shutdown"


def _drain_this_node(timeout_s: float) -> Drained | None:
    """On one node: drain the HAProxy processes of this node's Ray (its raylet's descendants,
    never another Ray's on the same machine). None where this task finds no raylet above it."""
    import psutil

    # A task's worker runs under its node's raylet (through a shell, or `uv run`, for some runtime envs).
    raylet = next((p for p in psutil.Process().parents() if p.name().startswith("raylet")), None)
    return None if raylet is None else drain_haproxy(timeout_s, under=raylet)


def drain_every_node(timeout_s: float) -> tuple[list[str], bool]:
    """Drain HAProxy on every alive node at once, waiting for their requests in flight.
    Returns a line per node that could not be drained, then one in all; and whether every
    request in flight has finished on every node (where there was HAProxy to drain)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    drain = ray.remote(num_cpus=0, max_retries=0)(_drain_this_node)
    nodes = [node["NodeID"] for node in ray.nodes() if node.get("Alive")]
    pending = {drain.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(timeout_s):
               node for node in nodes}
    done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s + 30)
    lines, drained = [], Drained()
    for ref, node in pending.items():
        try:
            found = ray.get(ref) if ref in done else "no answer"
        except Exception as exc:  # noqa: BLE001 - a node that failed to drain still shuts down with Serve
            found = f"{type(exc).__name__}: {exc}"
        if isinstance(found, Drained):
            drained += found
        else:
            lines.append(f"node {node}: HAProxy not drained ({found or 'no raylet above the task'}); "
                         "its requests in flight are cut as Serve shuts down")
    if not drained.proxies:
        lines.append(f"no HAProxy on the {len(nodes)} node(s) (RAY_SERVE_ENABLE_HA_PROXY=0?): nothing drains, "
                     "and Serve's shutdown cuts the requests in flight")
    else:
        lines.append(drained_line(drained, timeout_s).replace(" took", f" on {len(nodes)} node(s) took", 1))
    return lines, not drained.requests_cut and len(lines) == 1


def serve_is_down() -> bool:
    """Whether Serve's controller is gone (`serve.shutdown` gives up after 30 s with a warning)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=(
        "Stop Serve gracefully: withdraw the models from the AI network's nodes, drain every node's "
        "HAProxy, then shut Serve down."))
    add_address_argument(parser)
    parser.add_argument("--drain-timeout", type=float, default=drain_timeout_s(),
                        help="seconds the requests in flight get to finish (default: SERVE_APP_DRAIN_TIMEOUT_S, "
                             "else 30)")
    ns = parser.parse_args(argv)
    failed = connect(ns.address, "shutdown")
    if failed is not None:
        return failed
    from ray import serve

    if serve_is_down():
        print("shutdown: Serve is not running on this Ray cluster: nothing to stop", file=sys.stderr)
        return 0
    withdrawn = withdraw_registrations()
    for _, line in withdrawn:
        print(f"shutdown: {line}", file=sys.stderr)
    lines, drained = drain_every_node(max(0.0, ns.drain_timeout))
    for line in lines:
        print(f"shutdown: {line}", file=sys.stderr)
    serve.shutdown()
    if not serve_is_down():
        print("shutdown: Serve's controller is still there after its 30 s shutdown: run this again, or see "
              "`serve status`", file=sys.stderr)
        return 1
    print("shutdown: Serve is shut down", file=sys.stderr)
    # 2: shut down, but not as gracefully as asked (a node not told, requests cut or not drained).
    return 0 if drained and all(ok for ok, _ in withdrawn) else 2


if __name__ == "__main__":
    sys.exit(main())
