"""Announcing the live models to the AI network's communication node(s) (issue 6).

A node (DeepBrainChain's AIComputingNode) forwards traffic only to the models a
project has registered with it, and a node that restarts may have forgotten
them. So the registrar keeps every node's copy of the project in step with
what Ray Serve reports live: it registers when the live set changes and again
every `interval_s`, retries a failing node with capped exponential back-off,
and unregisters the project when the application is deleted, or earlier, when a
stopping server asks it to (`withdraw`, before it drains its requests in flight). A node that is
down or refuses never touches serving: each failure is logged, kept for
`status()` and retried.

`Registrar` is plain asyncio, testable without Ray; `RegistrarDeployment`
runs exactly one of it per application.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Literal, Sequence
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.schema import ApplicationStatus

from serve_app.catalog import CatalogUnknown, LiveCatalog, LiveModel, served_routes
from serve_app.config import REGISTRAR_DEPLOYMENT, AppConfig, shown_url, with_credentials
from serve_app.periodic import every
from serve_app import routes
from serve_app.serve_logs import flush_serve_log, start_flushing

logger = logging.getLogger("ray.serve")

REGISTER_PATH = "/api/v0/ai/project/register"
UNREGISTER_PATH = "/api/v0/ai/project/unregister"
NODE_TYPES = {routes.CHAT: 0, routes.GENERATIONS: 1, routes.EDITS: 2}
"""The node's `type` of each route a model serves (`served_routes`): chat, text-to-image, image edit."""
FIRST_RETRY_S = 1.0
UNREGISTER_TIMEOUT_S = 2.0
STATUS_TIMEOUT_S = 10.0
"""How long a stopping registrar waits for Serve to say whether its application stays."""
HEAD_NODE_RESOURCE_NAME = "node:__internal_head__"  # Ray's resource of the head node (what Serve pins its controller with)

LiveSource = Callable[[], Awaitable[Sequence[LiveModel]]]
NodeStateName = Literal["pending", "registered", "failing", "disabled", "withdrawn"]


class NodeModel(BaseModel):
    """One entry of a project's model list on the node: one model, one URL, one task type."""

    model_config = ConfigDict(frozen=True)
    model: str = Field(min_length=1)
    api: str = Field(min_length=1)
    type: Literal[0, 1, 2]
    cid: str = Field(min_length=1)


class ProjectRegistration(BaseModel):
    """`POST /api/v0/ai/project/register`: replaces the project's whole model list on the node."""

    model_config = ConfigDict(frozen=True)
    project: str = Field(min_length=1)
    models: tuple[NodeModel, ...]


class ProjectUnregistration(BaseModel):
    """`POST /api/v0/ai/project/unregister`."""
    project: str = Field(min_length=1)


class NodeReply(BaseModel):
    """The node's answer. Its success omits `code` (Go's omitempty), so a missing code means 0."""

    model_config = ConfigDict(extra="ignore")
    code: int = 0
    message: str = ""


class NodeStatus(BaseModel):
    """One node, as `GET /v1/registration` shows it."""

    url: str
    state: NodeStateName
    last_success: float | None = Field(description="Unix time of the last accepted registration.")
    last_error: str | None
    attempts: int
    consecutive_failures: int
    models: list[NodeModel] = Field(description="What the node was last told to hold.")


class RegistrationStatus(BaseModel):
    """`GET /v1/registration`: the registration of the live models with each node."""

    enabled: bool
    project: str
    nodes: list[NodeStatus] = []


class NodeError(Exception):
    """A node call that failed; the text is what `status()` and the log show."""


def project_registration(project: str, base_url: str, live: Sequence[LiveModel]) -> ProjectRegistration:
    """The node payload for these live models: one entry per model and route (image models twice).

    A model that both generates and edits gives the generations URL for both: the node looks a
    model up by its name alone, whatever the task, and forwards generations and edits alike to
    the first entry it finds; the generations route runs an edit it is sent (a multipart form or
    an `image` in the JSON) as an edit, where the edits route would refuse a generation."""
    entries = []
    for m in live:
        served = served_routes(m.config)
        for route in served:
            url = routes.GENERATIONS if route == routes.EDITS and routes.GENERATIONS in served else route
            entries.append(NodeModel(model=m.config.name, api=base_url + url, type=NODE_TYPES[route],
                                     cid=m.config.cid or ""))
    return ProjectRegistration(project=project, models=tuple(entries))


def node_client(timeout_s: float) -> httpx.AsyncClient:
    """A client for the nodes that ignores HTTP(S)_PROXY and the like from the environment: a
    node is on this machine or its network (it only takes URLs of its own machine), and a proxy
    set for the replicas' downloads would carry, or refuse, calls meant for it."""
    return httpx.AsyncClient(timeout=timeout_s, trust_env=False)


REGISTER_LIMIT = "timeout_s"
UNREGISTER_LIMIT = f"the unregister limit, timeout_s or at most {UNREGISTER_TIMEOUT_S:g} s"


async def call_node(client: httpx.AsyncClient, url: str, path: str, body: BaseModel,
                    limit: str = REGISTER_LIMIT) -> NodeReply:
    """POST one request to a node; raises `NodeError` unless it answers 200 with code 0.
    `limit` names the setting behind the client's timeout, for the error a timeout raises."""
    try:
        target = httpx.URL(with_credentials(url, os.environ) + path)
    except LookupError as unset:
        raise NodeError(f"the node URL's user or password names ${{{unset.args[0]}}}, which is unset or empty in "
                        "this replica's environment (set it where Ray starts)") from None
    # A user and password in the node's URL go as Basic auth (as httpx would send them), and
    # the URL without them is what httpx's own request log shows.
    auth = httpx.BasicAuth(target.username, target.password) if target.userinfo else None
    try:
        # The whole call within the limit: httpx's timeout bounds each read, and a node that
        # trickles its answer a byte at a time would hold the call (a withdraw, a stop) for ever.
        async with asyncio.timeout(client.timeout.read):
            response = await client.post(target.copy_with(userinfo=b""), content=body.model_dump_json(),
                                         headers={"Content-Type": "application/json"}, auth=auth)
    except (httpx.TimeoutException, TimeoutError) as exc:  # httpx's own text is empty: say which limit it was
        raise NodeError(f"Timeout: the node did not answer within {limit} ({client.timeout.read:g} s)") from exc
    except httpx.HTTPError as exc:
        raise NodeError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from exc
    try:
        reply: NodeReply | None = NodeReply.model_validate_json(response.content)
    except ValidationError:
        reply = None
    if response.status_code != 200 or reply is None or reply.code != 0:
        detail = f"code {reply.code}: {reply.message}" if reply else f"not a node reply: {response.text[:200]!r}"
        raise NodeError(f"HTTP {response.status_code}, {detail}")
    return reply


def node_identity(url: str) -> str:
    """Which node a URL reaches, however it is written: without its user and password (rotated
    credentials), host in lower case, `localhost` as 127.0.0.1, the port explicit, no trailing
    slash. Two spellings of one node must not read as a node dropped from the config, whose
    unregister would take the project off the node the new config registers with."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    host = "127.0.0.1" if host == "localhost" else host
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    return f"{parts.scheme.lower()}://{host}:{port}{parts.path.rstrip('/')}"


def dropped(before: set[tuple[str, str]], now: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (project, node URL) pairs of `before` whose project is no longer announced to that
    node in `now` (compared by `node_identity`)."""
    kept = {(project, node_identity(url)) for project, url in now}
    return sorted(pair for pair in before if (pair[0], node_identity(pair[1])) not in kept)


KV_NAMESPACE = "serve_app"


def _record_key(app_name: str) -> str:
    return f"registration/{app_name}"


def _read_record(app_name: str) -> set[tuple[str, str]] | None:
    """The (project, node URL) pairs this application last announced, from Ray's KV store
    (in the GCS, so it outlives the replicas that wrote it); None when there is no record.
    Blocking."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return None
    raw = _internal_kv_get(_record_key(app_name), namespace=KV_NAMESPACE)
    return {(project, url) for project, url in json.loads(raw)} if raw else None


def _write_record(app_name: str, pairs: set[tuple[str, str]] | None) -> None:
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_initialized, _internal_kv_put

    if not _internal_kv_initialized():
        return
    if pairs is not None:  # an empty record says "nothing announced", which no record does not
        _internal_kv_put(_record_key(app_name), json.dumps(sorted(pairs)), overwrite=True, namespace=KV_NAMESPACE)
    else:
        _internal_kv_del(_record_key(app_name), namespace=KV_NAMESPACE)


async def unregister_pairs(pairs: Sequence[tuple[str, str]], timeout_s: float,
                           why: str) -> list[NodeReply | BaseException]:
    """Unregister each (project, node URL), concurrently, waiting at most `UNREGISTER_TIMEOUT_S`
    (a stopping server has little time); each outcome logged and returned, none raised."""
    async with node_client(min(timeout_s, UNREGISTER_TIMEOUT_S)) as client:
        results = await asyncio.gather(*(call_node(client, url, UNREGISTER_PATH, ProjectUnregistration(
            project=project), UNREGISTER_LIMIT) for project, url in pairs), return_exceptions=True)
    for (project, url), result in zip(pairs, results):
        logger.log(logging.WARNING if isinstance(result, BaseException) else logging.INFO,
                   "unregistering project %r from node %s, %s: %s", project, shown_url(url), why,
                   result if isinstance(result, BaseException) else result.message or "done")
    return results


async def unregister_stale(app_name: str, current: set[tuple[str, str]], timeout_s: float) -> None:
    """Record `current`, then unregister what this application announced under an earlier
    config and announces no more (another project name, a node dropped from `node_urls`,
    registration turned off). A redeploy keeps the application up, so its outgoing registrar
    leaves the nodes alone; this is where the new config's owner cleans up. The record comes
    first: the outgoing registrar, whose loops may announce an old pair again during these
    unregisters, withdraws as it stops whatever it holds that the record does not list, so it
    must read the new record, not the old one. Never raises."""
    try:
        previous = await asyncio.to_thread(_read_record, app_name) or set()
        if previous != current:  # an empty record where pairs were: what the outgoing registrar reads
            await asyncio.to_thread(_write_record, app_name, current)
        await unregister_pairs(dropped(previous, current), timeout_s, "no longer in the config")
        for other, pairs in (await asyncio.to_thread(_shared_pairs, app_name, current)).items():
            logger.warning("application %r registers the same project with the same node as this one (%s): "
                           "each registration replaces the other's model list, so the node routes to one "
                           "application's models at a time; give each application its own `project` "
                           "(or `registration.project`)", other,
                           ", ".join(f"{project} at {shown_url(url)}" for project, url in sorted(pairs)))
    except Exception:  # noqa: BLE001 - cleanup of an old config must never stop serving
        logger.warning("could not clean up registrations of an earlier config", exc_info=True)


def _shared_pairs(app_name: str, pairs: set[tuple[str, str]]) -> dict[str, set[tuple[str, str]]]:
    """Other applications of this Ray cluster whose record holds any of `pairs`. Blocking."""
    from ray.experimental.internal_kv import _internal_kv_initialized, _internal_kv_list

    if not pairs or not _internal_kv_initialized():
        return {}
    prefix = _record_key("")
    others = (key.decode().removeprefix(prefix) for key in _internal_kv_list(prefix, namespace=KV_NAMESPACE))
    shared = {other: (_read_record(other) or set()) & pairs for other in others if other != app_name}
    return {other: both for other, both in shared.items() if both}


@dataclass
class NodeState:
    """What one node holds of the project, and how talking to it has gone."""

    url: str
    state: NodeStateName = "pending"
    registered: ProjectRegistration | None = None
    """What this registrar last had the node hold; None: unknown (the node keeps registrations
    across restarts of either side, so it may hold what an earlier run announced)."""
    registered_at: float = float("-inf")  # monotonic
    retry_at: float = float("-inf")  # monotonic; back-off after a failure
    last_success: float | None = None  # wall clock, for humans
    last_error: str | None = None
    attempts: int = 0
    failures: int = 0  # consecutive
    in_doubt: bool = False
    """The last call failed: the node may hold `registered`, or what that call sent (a
    register that timed out here may have been applied there), so the next is sent whatever."""
    in_flight: asyncio.Future[NodeReply] | None = None
    """The register call under way: a stop lets it end before unregistering, else the node
    could apply it after the unregister, and keep the project."""

    def due(self, payload: ProjectRegistration, now: float, interval_s: float) -> bool:
        """Register now? On a change, or when the interval passed; never while backing off.

        An empty model list is sent too, at start as well: the node keeps what an earlier run
        of this application announced (its registrations outlive both sides' restarts), and
        would otherwise send traffic for models that are not live, or no longer configured.
        """
        if now < self.retry_at:
            return False
        if payload == self.registered and not self.in_doubt:
            return now - self.registered_at >= interval_s
        return True

    def as_status(self) -> NodeStatus:
        return NodeStatus(url=shown_url(self.url), state=self.state, last_success=self.last_success, last_error=self.last_error,
                          attempts=self.attempts, consecutive_failures=self.failures,
                          models=list(self.registered.models) if self.registered else [])


class Registrar:
    """Keeps every configured node's registration of the project equal to the live models."""

    def __init__(self, config: AppConfig, live: LiveSource, poll_s: float = 1.0) -> None:
        self.options = config.registration
        self.project = self.options.project or config.project
        self.base_url = self.options.public_base_url or config.public_base_url
        self._live = live
        self._poll_s = poll_s
        initial: NodeStateName = "pending" if self.options.enabled else "disabled"
        self._nodes = [NodeState(url, state=initial) for url in self.options.node_urls]
        self._payload: ProjectRegistration | None = None
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start one background loop per node on the running event loop (nothing when disabled)."""
        if not self.options.enabled or self._tasks:
            return
        self._client = node_client(self.options.timeout_s)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._node_loop(node), name=f"register {shown_url(node.url)}")
                       for node in self._nodes]

    async def stop(self, unregister: bool = True) -> None:
        """Stop the loops (so nothing re-registers afterwards), then unregister if asked. Never raises."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        # A register already sent ends first (within timeout_s): cut short here, the node could
        # still apply it, after the unregister below.
        await asyncio.gather(*(node.in_flight for node in self._nodes if node.in_flight is not None),
                             return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if unregister and self.options.enabled:
            await self.unregister()

    async def unregister(self, why: str = "the application is going away",
                         then: NodeStateName = "pending") -> dict[str, str | None]:
        """Tell every node the project is gone, but those that took a `withdraw` already: best
        effort, bounded by a short timeout. A node that fails is left `failing` (a later call
        tries it again). Returns each node's error by its `shown_url`, None where it took the unregister."""
        nodes = [node for node in self._nodes if node.state != "withdrawn"]
        results = await unregister_pairs([(self.project, node.url) for node in nodes], self.options.timeout_s, why)
        for node, result in zip(nodes, results):
            if isinstance(result, BaseException):  # it may still hold what it held: `registered` stays
                node.state, node.last_error, node.failures = "failing", str(result), node.failures + 1
            else:
                node.state, node.registered, node.failures, node.last_error = then, None, 0, None
        return {shown_url(node.url): str(result) if isinstance(result, BaseException) else None
                for node, result in zip(nodes, results)}

    async def withdraw(self) -> dict[str, str | None]:
        """Take the project off every node and keep it off: the loops stop first, so nothing
        registers it again. Returns each node's error, None where it took this unregister or
        an earlier one."""
        await self.stop(unregister=False)
        if not self.options.enabled:
            return {}
        told = await self.unregister("the server is stopping", then="withdrawn")
        return {shown_url(node.url): told.get(shown_url(node.url)) for node in self._nodes}

    def owned(self) -> set[tuple[str, str]]:
        """The (project, node URL) pairs this registrar keeps registered."""
        return {(self.project, node.url) for node in self._nodes} if self.options.enabled else set()

    def status(self) -> RegistrationStatus:
        """The registration with every node, for `GET /v1/registration`."""
        return RegistrationStatus(enabled=self.options.enabled, project=self.project,
                                  nodes=[node.as_status() for node in self._nodes])

    async def _node_loop(self, node: NodeState) -> None:
        """Poll the live set and register with this node when due; survives anything but cancellation."""
        await every(self._poll_s, lambda: self._register_if_due(node), f"registration loop for node {shown_url(node.url)}",
                    at_start=True)

    async def _register_if_due(self, node: NodeState) -> None:
        payload = await self._current_payload()
        if payload is not None and node.due(payload, time.monotonic(), self.options.interval_s):
            await self._register(node, payload)

    async def _current_payload(self) -> ProjectRegistration | None:
        """What the nodes should hold now; the last known payload while the live source fails
        (none, so nothing is sent, until it is first known)."""
        try:
            self._payload = project_registration(self.project, self.base_url, await self._live())
        except CatalogUnknown:  # Serve's state not read yet (a controller away, an application being built)
            pass
        except Exception:  # noqa: BLE001 - keep registering what was live
            logger.warning("could not read the live models; keeping the last known set", exc_info=True)
        return self._payload

    async def _register(self, node: NodeState, payload: ProjectRegistration) -> None:
        node.attempts += 1
        assert self._client is not None, "start() creates the client before any loop runs"
        # Its own task, which a stop lets finish (see `stop`), shielded from the loop's cancellation.
        node.in_flight = asyncio.ensure_future(call_node(self._client, node.url, REGISTER_PATH, payload))
        try:
            await asyncio.shield(node.in_flight)
        except NodeError as exc:
            self._record_failure(node, str(exc))
        except Exception as exc:  # noqa: BLE001 - anything else (a URL httpx refuses, ...): backed off and shown too
            if not node.failures:  # its traceback once in a run of failures, not at every retry
                logger.warning("registering with node %s failed", shown_url(node.url), exc_info=True)
            self._record_failure(node, _said(exc))
        else:
            self._record_success(node, payload)

    def _record_failure(self, node: NodeState, error: str) -> None:
        node.failures, node.in_doubt = node.failures + 1, True
        node.state, node.last_error = "failing", error
        first = min(FIRST_RETRY_S, self.options.retry_max_s)
        delay = min(self.options.retry_max_s, first * 2 ** min(node.failures - 1, 30))
        node.retry_at = time.monotonic() + delay
        logger.warning("registering project %r with node %s failed (%d in a row): %s; retrying in %.1fs",
                       self.project, shown_url(node.url), node.failures, error, delay)

    def _record_success(self, node: NodeState, payload: ProjectRegistration) -> None:
        """A change or a recovery is news (info); the periodic refresh is not (debug)."""
        failed = node.failures
        news = payload != node.registered or failed > 0
        node.state, node.registered, node.failures, node.in_doubt = "registered", payload, 0, False
        node.registered_at, node.last_success, node.retry_at = time.monotonic(), time.time(), float("-inf")
        entries = ", ".join(f"{m.model} (type {m.type})" for m in payload.models) or "no models"
        after = f" (after {failed} failed attempt{'s' * (failed > 1)})" if failed else ""
        logger.log(logging.INFO if news else logging.DEBUG, "registered project %r with node %s%s: %s",
                   self.project, shown_url(node.url), after, entries)


def _said(exc: BaseException) -> str:
    """An error as one line: an exception group (anyio's task groups raise them) by what it holds."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


@serve.deployment
class RegistrarDeployment:
    """The application's one `Registrar`, on a replica's event loop (bound by `registrar_deployment`)."""

    def __init__(self, config: AppConfig) -> None:
        self._app_name = serve.get_replica_context().app_name
        self._registrar = Registrar(config, LiveCatalog(config, self._app_name).known_live_models)
        self._registrar.start()
        self._log_flusher = start_flushing()
        self._cleanup = asyncio.get_running_loop().create_task(
            unregister_stale(self._app_name, self._registrar.owned(), config.registration.timeout_s))

    async def status(self) -> RegistrationStatus:
        return self._registrar.status()

    async def withdraw(self) -> dict[str, str | None]:
        """Unregister the project from every node now, ahead of a stop (`serve_app.withdraw`):
        a node then stops forwarding new traffic here while the requests already forwarded
        finish, where an unregister only at the replica's shutdown comes after the server has
        stopped taking connections, and the node's traffic meanwhile is refused. The
        registrations stay withdrawn for the rest of this replica's life; a node that did not
        take the unregister is tried again as the replica stops. Returns each node's error, None
        where it took the unregister. Shielded: a caller that stops waiting (its own timeout)
        does not cut the nodes' calls short."""
        outcome = await asyncio.shield(self._registrar.withdraw())
        flush_serve_log()
        return outcome

    async def __del__(self) -> None:
        """Serve awaits this on graceful replica shutdown (replica.py `call_destructor`)."""
        registrar = getattr(self, "_registrar", None)  # absent when __init__ failed
        flusher = getattr(self, "_log_flusher", None)
        if flusher is not None:
            flusher.cancel()
        if registrar is not None:
            # The loops stop first: asking Serve may take seconds, in which they would send the
            # old config's payload after the successor's (same project: nothing withdraws it).
            await registrar.stop(unregister=False)
            if await self._app_is_going_away():
                await registrar.unregister()  # the nodes a withdraw (before the server's drain) did not reach
                try:  # nothing is registered any more: forget the record too
                    await asyncio.to_thread(_write_record, self._app_name, None)
                except Exception:  # noqa: BLE001 - harmless: the next start withdraws its pairs again
                    logger.warning("could not delete the registration record of %r", self._app_name, exc_info=True)
            else:
                await self._withdraw_what_the_successor_dropped(registrar)
        flush_serve_log()  # the last unregister lines too

    async def _withdraw_what_the_successor_dropped(self, registrar: Registrar) -> None:
        """A redeploy: the new config's owner withdrew the pairs it no longer announces and
        recorded its own, but this replica's loops ran until now and may have announced an
        old pair again since. Whatever this replica holds that the record no longer lists is
        withdrawn here (before the successor's record is written, nothing is: it withdraws
        them itself). Never raises."""
        try:
            recorded = await asyncio.to_thread(_read_record, self._app_name)
            if recorded is None:  # no owner recorded anything: nothing tells what the new config dropped
                return
            await unregister_pairs(dropped(registrar.owned(), recorded), registrar.options.timeout_s,
                                   "dropped by the new config after this replica announced it again")
        except Exception:  # noqa: BLE001 - a replica going away must not fail on cleanup
            logger.warning("could not withdraw registrations the new config dropped", exc_info=True)

    async def _app_is_going_away(self) -> bool:
        """Unregister unless Serve says the application stays up.

        A redeploy replaces this replica while the application lives on; its
        successor registers the new set, which an unregister from here could
        arrive after and wipe. A controller that is gone means the whole server
        is going away; one that is slow to answer (busy with the redeploy on a
        loaded machine, seen taking over 2 s) does not.
        """
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), STATUS_TIMEOUT_S)
        except TimeoutError:
            logger.warning("Serve did not say within %.0f s whether application %r stays; leaving its "
                           "registrations to its successor", STATUS_TIMEOUT_S, self._app_name)
            return False
        except Exception:  # noqa: BLE001 - controller gone: the whole server is going away
            return True
        app = status.applications.get(self._app_name)
        return app is None or app.status == ApplicationStatus.DELETING


def registrar_deployment(config: AppConfig) -> Application | None:
    """The bound registrar (one replica, no CPU reserved) when registration is enabled, else None.

    It runs on the head node, as Serve's controller does: a node's URL such as the default
    `http://127.0.0.1:7002` names the machine the operator runs the node on, which on a
    cluster is the head's (the address clients reach), not whichever worker Serve picked,
    nor a different one after a restart."""
    if not config.registration.enabled:
        return None
    return RegistrarDeployment.options(
        name=REGISTRAR_DEPLOYMENT, num_replicas=1,
        ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE_NAME: 0.001}},
    ).bind(config)
