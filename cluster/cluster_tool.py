"""Helpers of `cluster/local_cluster.sh` (and of the cluster tests).

    cluster_tool.py render CONFIG OUT --http-port N [--http-host H]
    cluster_tool.py wait-nodes --dashboard URL --resources head node_a ... [--pid PID ...]
    cluster_tool.py wait-apps CONFIG --dashboard URL [--since EPOCH]
    cluster_tool.py check-ports [--host IP] PORT|FIRST-LAST ...
    cluster_tool.py kill-tagged CLUSTER_DIR
    cluster_tool.py now

Only the standard library, PyYAML and (for wait-nodes) Ray are used.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

LOCAL_HOSTS = {"127.0.0.1", "localhost", "0.0.0.0"}
# Written by `local_cluster.sh start` into the cluster's folder (same name there).
MARKER = ".serve_app_local_cluster"
TAG = "SERVE_APP_LOCAL_CLUSTER"


# --------------------------------------------------------------------------- render
def _absolute(value: str, base: Path) -> str:
    """A relative local path (`./x`, `../x`, `x/y` that exists) made absolute against `base`."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    if value.startswith(("./", "../")) or (base / path).exists():
        return str((base / path).resolve())
    return value  # a hub id such as org/name


def render_config(config: dict[str, Any], base: Path, http_port: int,
                  http_host: str | None = None) -> dict[str, Any]:
    """The Serve config as deployed on the local cluster.

    - `http_options.port` becomes `http_port` (and `host`, when given);
    - model `path`s and `image_dir` that are relative are made absolute against `base`
      (the config's folder), since replicas do not run in the caller's directory;
    - a loopback `public_base_url` on the config's old port follows the new port.
    """
    config = json.loads(json.dumps(config))  # deep copy
    http = config.setdefault("http_options", {}) or {}
    config["http_options"] = http
    old_port = int(http.get("port", 8000))
    http["port"] = int(http_port)
    if http_host:
        http["host"] = http_host
    for app in config.get("applications") or []:
        args = app.get("args")
        if not isinstance(args, dict):
            continue
        for model in args.get("models") or []:
            if isinstance(model, dict) and isinstance(model.get("path"), str):
                model["path"] = _absolute(model["path"], base)
        if isinstance(args.get("image_dir"), str):
            args["image_dir"] = str((base / Path(args["image_dir"]).expanduser()).resolve())
        url = args.get("public_base_url")
        if url is None and int(http_port) != 1088:
            args["public_base_url"] = f"http://127.0.0.1:{http_port}"
        elif isinstance(url, str):
            parts = urlsplit(url)
            if parts.hostname in LOCAL_HOSTS and (parts.port or 80) == old_port:
                args["public_base_url"] = urlunsplit(
                    parts._replace(netloc=f"{parts.hostname}:{http_port}"))
    return config


def missing_model_paths(config: dict[str, Any]) -> list[str]:
    """Local model folders of a rendered config that do not exist. Every node of the local
    cluster is this machine, so such a model would fail on every node, after the deploy."""
    return [f"model {model.get('name')!r}: {model['path']} does not exist"
            for app in config.get("applications") or [] if isinstance(app.get("args"), dict)
            for model in app["args"].get("models") or []
            if isinstance(model, dict) and isinstance(model.get("path"), str)
            and Path(model["path"]).is_absolute() and not Path(model["path"]).exists()]


def cmd_render(ns: argparse.Namespace) -> int:
    source = Path(ns.config).resolve()
    config = yaml.safe_load(source.read_text())
    rendered = render_config(config, source.parent, ns.http_port, ns.http_host)
    missing = missing_model_paths(rendered)
    if missing:
        print("\n".join(missing) + f"\n(relative paths are read from the config's folder, {source.parent})",
              file=sys.stderr)
        return 1
    Path(ns.out).write_text(
        f"# Rendered from {source} by cluster/cluster_tool.py for the local cluster.\n"
        + yaml.safe_dump(rendered, sort_keys=False))
    return 0


# --------------------------------------------------------------------------- waiting
def auth_headers() -> dict[str, str]:
    """The bearer token the dashboard wants when RAY_AUTH_MODE=token (none otherwise)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.exists() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def _get_json(url: str, timeout: float = 10.0) -> Any:
    request = urllib.request.Request(url, headers=auth_headers())
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def alive_node_resources(dashboard: str) -> list[dict[str, float]]:
    """`resources_total` of every alive node, read through the dashboard's state API."""
    from ray.util.state import list_nodes

    nodes = list_nodes(address=dashboard, limit=1000, raise_on_missing_output=False)
    return [dict(n.resources_total or {}) for n in nodes if n.state == "ALIVE"]


def cmd_wait_nodes(ns: argparse.Namespace) -> int:
    deadline = time.monotonic() + ns.timeout
    last_error = ""
    while time.monotonic() < deadline:
        for pid in ns.pid or []:
            if not _pid_alive(pid):
                print(f"node process {pid} exited", file=sys.stderr)
                return 1
        try:
            present = {key for res in alive_node_resources(ns.dashboard) for key in res}
            missing = [r for r in ns.resources if r not in present]
            if not missing:
                return 0
            last_error = f"waiting for nodes with {missing}"
        except Exception as exc:  # noqa: BLE001 - the dashboard is still starting
            last_error = f"{type(exc).__name__}: {exc}"
        time.sleep(1.0)
    print(f"timed out after {ns.timeout}s: {last_error}", file=sys.stderr)
    return 1


def serve_applications(dashboard: str) -> dict[str, Any]:
    """Serve's details (`GET /api/serve/applications/`): applications, deployments, replicas."""
    return _get_json(dashboard.rstrip("/") + "/api/serve/applications/")


def cmd_wait_apps(ns: argparse.Namespace) -> int:
    config = yaml.safe_load(Path(ns.config).read_text())
    names = [app["name"] for app in config.get("applications") or []]
    deadline = time.monotonic() + ns.timeout
    state = "no answer yet"
    while time.monotonic() < deadline:
        try:
            apps = serve_applications(ns.dashboard).get("applications") or {}
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                print(f"the dashboard refused us ({exc.code}): RAY_AUTH_MODE must match the cluster's",
                      file=sys.stderr)
                return 1
            state = f"HTTP {exc.code}"
            time.sleep(1.0)
            continue
        except (urllib.error.URLError, OSError, ValueError) as exc:
            state = f"{type(exc).__name__}: {exc}"
            time.sleep(1.0)
            continue
        pending = []
        for name in names:
            app = apps.get(name)
            if app is None or (app.get("last_deployed_time_s") or 0) < ns.since - 1:
                pending.append(f"{name}: not deployed yet")
            elif app.get("status") == "DEPLOY_FAILED":
                print(f"application {name} failed to deploy:\n{app.get('message', '')}", file=sys.stderr)
                return 1
            elif app.get("status") != "RUNNING":
                pending.append(f"{name}: {app.get('status')}")
        if not pending:
            return 0
        state = "; ".join(pending)
        time.sleep(1.0)
    print(f"timed out after {ns.timeout}s: {state}", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------- processes
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def belongs_to_cluster(cluster_dir: str, environ: list[bytes], argv: list[bytes],
                       marked: bool = True) -> bool:
    """Whether a process (its environment entries and argv) is part of the local cluster in
    `cluster_dir` (absolute, no symlinks): its environment carries SERVE_APP_LOCAL_CLUSTER=<dir>
    (exported by local_cluster.sh and inherited by every Ray process it starts), or, when the
    folder is `marked` as made by `start`, it was given a Ray temp dir inside the folder
    (`--temp-dir=<dir>/head`, `--temp_dir=<dir>/head`, `--temp-dir <dir>/head`).
    The folder's path anywhere else on a command line does not count."""
    if f"{TAG}={cluster_dir}".encode() in environ:
        return True
    if not marked:
        return False
    inside = (cluster_dir.rstrip("/") + "/").encode()
    for i, arg in enumerate(argv):
        for option in (b"--temp-dir", b"--temp_dir"):
            if arg.startswith(option + b"=" + inside):
                return True
            if arg == option and i + 1 < len(argv) and argv[i + 1].startswith(inside):
                return True
    return False


def tagged_processes(cluster_dir: str) -> list[int]:
    """Processes that belong to the local cluster in `cluster_dir` (see belongs_to_cluster);
    never this process or its ancestors."""
    cluster_dir = os.path.realpath(cluster_dir)
    marked = (Path(cluster_dir) / MARKER).is_file() and cluster_dir != "/"
    skip = _ancestors()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if belongs_to_cluster(cluster_dir, environ, argv, marked):
            found.append(int(entry.name))
    return found


def cmd_kill_tagged(ns: argparse.Namespace) -> int:
    pids = tagged_processes(ns.cluster_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
            time.sleep(0.2)
        pids = [p for p in pids if _pid_alive(p)]
        if not pids:
            break
    if pids:
        print(f"still running: {pids}", file=sys.stderr)
    return 0


def port_list(spec: str) -> list[int]:
    """`8275` -> [8275]; `20000-20030` -> [20000, ..., 20030] (both ends included)."""
    first, _, last = spec.partition("-")
    ports = list(range(int(first), int(last or first) + 1))
    if not ports or not all(0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError(f"not a port or port range: {spec}")
    return ports


TIME_WAIT = "06"  # the state's code in /proc/net/tcp


def tcp_states_by_port() -> dict[int, set[str]]:
    """The states of this machine's TCP sockets by local port (Linux's /proc/net/tcp{,6})."""
    states: dict[int, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            states.setdefault(int(fields[1].rpartition(":")[2], 16), set()).add(fields[3])
    return states


def cmd_check_ports(ns: argparse.Namespace) -> int:
    """Each port must be free on loopback and on the nodes' address (`--host`): a listener
    bound only to that address would go unseen on loopback, and fail `start` later.

    A `--skippable` port (Serve's direct-ingress ranges: its controller hands the next port to
    a replica that cannot bind one) may also be held by a stopped server's closed connections
    alone (TIME_WAIT, for a minute after a `stop`, where its listener had no SO_REUSEADDR), which
    made `start` refuse to run for a minute after every `stop`. Elsewhere such a port fails the
    check: the server meant to bind it would fail just the same."""
    busy = []
    hosts = list(dict.fromkeys(["127.0.0.1", ns.host]))
    states: dict[int, set[str]] | None = None
    checks = [(port, False) for ports in ns.ports for port in ports] + [
        (port, True) for ports in ns.skippable for port in ports]
    for port, skippable in checks:
        for host in hosts:
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((host, port))
                except OSError:
                    states = tcp_states_by_port() if states is None and skippable else states
                    if not skippable or (states or {}).get(port) != {TIME_WAIT}:
                        busy.append(port)
                        break
    if busy:
        print(f"ports in use: {busy}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("render")
    p.add_argument("config")
    p.add_argument("out")
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--http-host")
    p.set_defaults(func=cmd_render)
    p = sub.add_parser("wait-nodes")
    p.add_argument("--dashboard", required=True)
    p.add_argument("--resources", nargs="+", required=True)
    p.add_argument("--pid", type=int, action="append")
    p.add_argument("--timeout", type=float, default=120)
    p.set_defaults(func=cmd_wait_nodes)
    p = sub.add_parser("wait-apps")
    p.add_argument("config")
    p.add_argument("--dashboard", required=True)
    p.add_argument("--since", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=300)
    p.set_defaults(func=cmd_wait_apps)
    p = sub.add_parser("check-ports")
    p.add_argument("ports", type=port_list, nargs="*", metavar="PORT|FIRST-LAST")
    p.add_argument("--host", default="127.0.0.1", help="the nodes' address (checked beside loopback)")
    p.add_argument("--skippable", type=port_list, nargs="+", default=[], metavar="PORT|FIRST-LAST",
                   help="ports Serve skips when it cannot bind one: a port only closed connections hold is fine")
    p.set_defaults(func=cmd_check_ports)
    p = sub.add_parser("kill-tagged")
    p.add_argument("cluster_dir")
    p.set_defaults(func=cmd_kill_tagged)
    p = sub.add_parser("now")
    p.set_defaults(func=lambda ns: print(f"{time.time():.3f}") or 0)
    ns = parser.parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
