"""`python -m serve_app.check_config CONFIG`: a Serve config checked before Ray starts.

`serve run` hands an application's `args` to `build_app` only once Ray and Serve are up; when
the build fails, Serve's controller retries it and logs the error, and `serve run` goes on
waiting for ever, its console showing a traceback under "the task will be retried". So
`scripts/serve.sh` runs this first: a typo, a duplicate model name or a bad value fails in
about a second with the message naming it and a non-zero exit, before anything is started.
What the build would warn of (a local model path that does not exist here) is said on the
console too, where Serve's throughput-optimized logging would keep it in the controller's log.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import ValidationError

from serve_app.config import (INGRESS_DEPLOYMENT, REGISTRAR_DEPLOYMENT, AppConfig, checkpoint_problem, config_warnings,
                              credential_variables, deployment_names, shown_url)

BUILDER = "serve_app.app:build_app"


def builds_this_app(import_path: Any) -> bool:
    """Whether an application's `import_path` names `build_app`, in either form Ray takes
    (`module:attribute` or `module.attribute`)."""
    return isinstance(import_path, str) and import_path.replace(":", ".") == BUILDER.replace(":", ".")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: YAML (and Ray) would keep
    the last silently, so a second `deployment:` block added to a model drops the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if not isinstance(key, (str, int, float, bool)):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping (the last would silently win)",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def validation_problems(error: ValidationError, within: str = "") -> list[str]:
    """Each of pydantic's errors as one line: where (under `within`), then what (no input
    echoed back: a model list's repr is pages long)."""
    lines = []
    for item in error.errors(include_url=False, include_input=False):
        where = ".".join([within] * bool(within) + [str(part) for part in item.get("loc", ())])
        message = str(item.get("msg", "")).removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if where else message)
    return lines


def has_gpu_here() -> bool:
    """Whether this machine shows an NVIDIA GPU (its device files), without importing torch."""
    return any(Path("/dev").glob("nvidia[0-9]*"))


def prefix_warnings(args: AppConfig, route_prefix: str | None) -> list[str]:
    """The base URLs the app hands out (image URLs; the models' URLs the nodes call) are the
    routes appended to them, so under a `route_prefix` they must end with it."""
    prefix = (route_prefix or "/").rstrip("/")
    if not prefix:
        return []
    bases = [("public_base_url", args.public_base_url)]
    if args.registration.enabled and args.registration.public_base_url:
        bases.append(("registration.public_base_url", args.registration.public_base_url))
    return [f"route_prefix is {prefix} but {field} ({url}) does not end with it: the URLs built from it "
            f"(image URLs, the models' URLs registered with the nodes) will not reach this app; set it to "
            f"the address clients reach the app at, ending with {prefix} (e.g. {origin(url)}{prefix})"
            for field, url in bases if not urlsplit(url).path.endswith(prefix)]


def cpus_here() -> float:
    """The CPUs a Ray started here gets by default (its count, within a container's limits)."""
    try:
        from ray._private.utils import get_num_cpus  # Ray's own count, cgroup quotas included
    except ImportError:  # a Ray that moved it
        return float(os.cpu_count() or 1)
    return float(get_num_cpus())


def reserved_cpus(args: AppConfig, overrides: list[dict[str, Any]]) -> float:
    """The CPUs an application's deployments reserve at start: each replica its `num_cpus`, as
    Serve 2.60 applies a `deployments:` override (its `ray_actor_options` replace the whole dict,
    `num_cpus` 1 where it leaves it out; its `autoscaling_config` starts `initial_replicas`, else
    `min_replicas`; its `num_replicas` counts only where nothing autoscales, "auto" as one)."""
    overridden = {override.get("name"): override for override in overrides}
    started = [(INGRESS_DEPLOYMENT, args.ingress.num_cpus, args.ingress.num_replicas, False)]
    for model in args.models:
        options, scaling = model.deployment, model.deployment.autoscaling_config
        replicas = (options.num_replicas if isinstance(options.num_replicas, int) else
                    (scaling.initial_replicas if scaling.initial_replicas is not None else scaling.min_replicas)
                    if scaling is not None else 1)
        started.append((model.deployment_name, options.num_cpus, replicas,
                        scaling is not None or options.num_replicas == "auto"))
    total = 0.0
    for name, num_cpus, replicas, autoscaled in started:
        override = overridden.get(name) or {}
        if "ray_actor_options" in override:
            num_cpus = (override["ray_actor_options"] or {}).get("num_cpus")
            num_cpus = 1.0 if num_cpus is None else num_cpus
        scaling = override.get("autoscaling_config")
        if isinstance(scaling, dict):
            first = scaling.get("initial_replicas")
            replicas = first if first is not None else scaling.get("min_replicas", 1)
        elif override.get("num_replicas") == "auto":
            replicas = 1
        elif isinstance(override.get("num_replicas"), int) and not autoscaled:
            replicas = override["num_replicas"]
        total += float(num_cpus or 0) * replicas
    return total


def cpu_warning(reserved: float, cpus: float) -> list[str]:
    """Past the machine's CPUs, replicas wait, pending, for CPUs no one frees, and Serve only
    logs that they have not been scheduled."""
    if reserved <= cpus + 1e-9:
        return []
    return [f"the deployments reserve {reserved:g} CPUs at start (num_cpus per replica times replicas) and this "
            f"machine has {cpus:g}: the replicas past that wait, pending, until CPUs free up (Serve logs that they "
            "have not been scheduled); lower num_cpus (fractions are fine) or the replicas"]


def override_findings(args: AppConfig, overrides: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(problems, warnings) of an application's `deployments:` (Serve's per-deployment overrides):
    a name the application has no deployment of fails the whole deploy (and from then on
    Serve lists none of its deployments); a `num_replicas` beside an `autoscaling_config` is
    ignored; an `autoscaling_config` there replaces the one `args` gives, so what it leaves
    out takes Ray's defaults (a target of 2 ongoing requests, where `args` aims at the batch)."""
    from ray.serve.config import AutoscalingConfig  # Ray's own defaults

    names = deployment_names(args)
    models = {model.deployment_name: model for model in args.models}
    ray_defaults = AutoscalingConfig().model_dump()
    problems, warnings = [], []
    for override in overrides:
        name = override.get("name")
        if name not in names:
            problems.append(f"deployments: {name!r} is no deployment of this application ({', '.join(names)}): "
                            "Serve would fail the whole deploy")
            continue
        if "user_config" in override:
            problems.append(f"deployments: {name}: user_config is for deployments with a reconfigure method, which "
                            "this application's have none of: Serve would fail every replica; set the model's "
                            "options in args")
        if "ray_actor_options" in override and name != REGISTRAR_DEPLOYMENT:
            warnings.append(f"deployments: {name}: ray_actor_options here replaces the whole set the application "
                            "gives the replica (the GPUs and CPUs of its deployment in args, which the replica also "
                            "reads, and the gRPC message size that bodies past 4 MiB need); set num_cpus / num_gpus "
                            "under the model's (or the ingress's) deployment in args instead")
        scaling_problems = autoscaling_problems(override.get("autoscaling_config"))
        problems += [f"deployments: {name}: autoscaling_config: {problem}" for problem in scaling_problems]
        if scaling_problems:
            continue
        if name == REGISTRAR_DEPLOYMENT and override.keys() & {"num_replicas", "autoscaling_config"}:
            problems.append(f"deployments: {name}: the registrar runs exactly one replica (two would each "
                            "register and unregister the project); leave its replica count alone")
        model = models.get(name)
        if model is None:
            continue
        ongoing = override.get("max_ongoing_requests")
        if isinstance(ongoing, int) and ongoing < model.max_batch_size:
            warnings.append(f"deployments: {name}: max_ongoing_requests {ongoing} is below the model's "
                            f"max_batch_size ({model.max_batch_size}), so a replica never gets enough requests "
                            "to fill a batch")
        own = model.serve_options().get("autoscaling_config")
        args_auto = model.deployment.num_replicas == "auto"  # Ray's own autoscaling defaults
        scaling = override.get("autoscaling_config", "unset")
        # The override's autoscaling_config, where given, decides (null: fixed replicas; a
        # mapping, even {}: autoscaling); else the model's in `args`.
        autoscales = isinstance(scaling, dict) if scaling != "unset" else (own is not None or args_auto)
        if isinstance(override.get("num_replicas"), int) and autoscales:
            warnings.append(f"deployments: {name}: num_replicas is ignored, the model autoscales; change "
                            "autoscaling_config's min_replicas / max_replicas")
        if isinstance(scaling, dict) and not args_auto and override.get("num_replicas") != "auto":
            wanted = own or {"target_ongoing_requests": model.max_batch_size}
            lost = [key for key, value in wanted.items() if key not in scaling and value != ray_defaults.get(key)]
            if lost:
                def listed(values: dict[str, Any]) -> str:
                    return ", ".join(f"{key} {_shown(values.get(key))}" for key in lost)

                warnings.append(f"deployments: {name}: this autoscaling_config replaces the model's whole one, and "
                                f"what it leaves out takes Ray's defaults; give {listed(wanted)} there too "
                                f"(Ray's: {listed(ray_defaults)})")
    return problems, warnings


def autoscaling_problems(scaling: Any) -> list[str]:
    """What Ray would refuse in a `deployments:` override's `autoscaling_config` once it has
    started (its schema takes any mapping there), and keys it would ignore (a misspelt bound)."""
    if not isinstance(scaling, dict):
        return []
    from ray.serve.config import AutoscalingConfig

    unknown = sorted(str(key) for key in scaling if key not in AutoscalingConfig.model_fields)
    if unknown:
        return [f"{', '.join(unknown)}: not an autoscaling option (Ray would ignore it); the options are "
                f"{', '.join(sorted(AutoscalingConfig.model_fields))}"]
    try:
        AutoscalingConfig.model_validate(scaling)
    except ValidationError as exc:
        return validation_problems(exc)
    return []


def port_warnings(args: AppConfig, http_options: Any) -> list[str]:
    """A base URL at this machine's loopback names the port clients reach the server at, which
    is the Serve config's `http_options.port` (Serve's 8000 where unset)."""
    try:  # as Serve's schema reads it ("1088" is 1088)
        port = int(http_options.get("port", 8000) if isinstance(http_options, dict) else 8000)
    except (TypeError, ValueError):
        return []
    found = []
    for field, url in (("public_base_url", args.public_base_url),
                       ("registration.public_base_url", args.registration.public_base_url)):
        parts = urlsplit(url or "")
        if parts.hostname not in ("localhost", "127.0.0.1", "::1"):
            continue  # another address may be a proxy's, in front of this port
        given = parts.port or (443 if parts.scheme == "https" else 80)
        if given != port:
            host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
            found.append(f"{field} ({url}) names port {given} of this machine but the server listens on {port} "
                         "(http_options.port): the URLs built from it (image URLs, the models' URLs registered "
                         f"with the nodes) would not reach it; set it to {parts.scheme}://{host}:{port}")
    return found


def _shown(value: Any) -> str:
    """A config value as YAML would read it back: 30 for 30.0, null for None."""
    if value is None:
        return "null"
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def check(path: Path) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the Serve config at `path`: YAML, Serve's schema, and the `args`
    of every application built by `serve_app.app:build_app`."""
    try:
        with path.open() as file:  # read from the file, YAML's messages name it
            config: Any = yaml.load(file, Loader=_UniqueKeyLoader)
    except OSError as exc:
        return [f"cannot read it: {exc.strerror or exc}"], []
    except yaml.YAMLError as exc:
        return [f"not valid YAML: {exc}"], []
    from ray.serve.schema import ServeDeploySchema  # imported here: the YAML's own mistakes come first, fast

    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        return [f"not a Serve config: {line}" for line in validation_problems(exc)], []
    gpus_here = has_gpu_here() or bool(os.environ.get("RAY_ADDRESS"))  # a cluster's GPUs are elsewhere
    problems: list[str] = []
    warnings: list[str] = []
    reserved = 0.0  # CPUs, by all the applications together
    registering: dict[tuple[str, str], list[str]] = {}  # (project, node URL): the applications registering it
    for app in config.get("applications") or []:
        if not builds_this_app(app.get("import_path")):
            continue
        name = app.get("name", "default")
        try:
            args = AppConfig.model_validate(app.get("args") or {})
        except ValidationError as exc:
            problems += [f"application {name!r}: {line}" for line in validation_problems(exc, "args")]
        else:
            env_vars = ((app.get("runtime_env") or {}).get("env_vars") or {}) if isinstance(app.get("runtime_env"), dict) else {}
            environ = {**os.environ, **{str(key): str(value) for key, value in env_vars.items()}}  # the replicas'
            warnings += [f"application {name!r}: {warning}" for warning in config_warnings(args, environ)]
            exposed = sorted({variable for node in args.registration.node_urls
                              for variable in credential_variables(node)} & set(map(str, env_vars)))
            if args.registration.enabled and exposed:
                warnings.append(f"application {name!r}: the node URLs' credentials come from "
                                f"{', '.join('$' + variable for variable in exposed)}, set in the application's "
                                "runtime_env env_vars, which Ray Serve shows (dashboard, controller log) as it does "
                                "the args: set it in the environment Ray starts in instead")
            warnings += [f"application {name!r}: {warning}" for warning in port_warnings(args, config.get("http_options"))]
            if args.registration.enabled:
                for node in args.registration.node_urls:
                    registering.setdefault((args.registration.project or args.project, node), []).append(name)
            warnings += [f"application {name!r}: {warning}" for warning in prefix_warnings(args, app.get("route_prefix"))]
            found = [f"application {name!r}: model {model.name!r}: {model.path} {problem}"
                     for model in args.models if (problem := checkpoint_problem(model))]
            if os.environ.get("RAY_ADDRESS"):  # a cluster's nodes may hold other copies of the folder
                warnings += found
            else:
                problems += found
            override_problems, override_warnings = override_findings(args, app.get("deployments") or [])
            problems += [f"application {name!r}: {problem}" for problem in override_problems]
            warnings += [f"application {name!r}: {warning}" for warning in override_warnings]
            if not override_problems:  # their values are not counted before they are known to be numbers
                reserved += reserved_cpus(args, app.get("deployments") or [])
            warnings += [f"application {name!r}: model {model.name!r} asks for {model.deployment.num_gpus:g} GPU(s) "
                         "per replica and this machine has none: its replicas wait, pending, until a node with "
                         "GPUs joins the Ray cluster" for model in args.models if model.deployment.num_gpus and not gpus_here]
    if not os.environ.get("RAY_ADDRESS"):  # a cluster's CPUs are its nodes'
        warnings += cpu_warning(reserved, cpus_here())
    for (project, node), apps in registering.items():
        if len(apps) > 1:
            warnings.append(f"applications {', '.join(map(repr, apps))} each register project {project!r} with the "
                            f"node {shown_url(node)}: each registration replaces the other's model list, so the node routes to "
                            "one application's models at a time; give each application its own project (or "
                            "registration.project)")
    return problems, warnings


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in (["-h"], ["--help"]):
        print("usage: python -m serve_app.check_config CONFIG\n\nChecks a Serve config (serve_config.yaml) before "
              "Ray starts: prints each problem and warning, exits 1 if there is a problem.")
        return 0
    if len(args) != 1:
        print("usage: python -m serve_app.check_config CONFIG", file=sys.stderr)
        return 2
    problems, warnings = check(Path(args[0]))
    for warning in warnings:
        print(f"{args[0]}: warning: {warning}", file=sys.stderr)
    for problem in problems:
        print(f"{args[0]}: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
