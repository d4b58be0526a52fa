"""What chat and image replicas share: placement on their device, one worker thread for
torch, health (a failed GPU context, stalled work), metrics and log flushing, and errors
that cross back to the ingress without dragging torch along.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from pathlib import Path
from typing import Callable, NoReturn, TypeVar

import torch

from serve_app.config import BaseModelConfig
from serve_app.errors import APIError, Overloaded
from serve_app.metrics import ReplicaMetrics
from serve_app.model_worker import ModelWorker
from serve_app.periodic import in_background
from serve_app.placement import describe, resolve_device, resolve_dtype, see_only_assigned_gpus
from serve_app.serve_logs import flush_serve_log, start_flushing, summarize_rejections

logger = logging.getLogger("ray.serve")

T = TypeVar("T")

# A CUDA error that poisons the context; torch names it from 2.8 on (before, nothing is matched).
ACCELERATOR_ERROR: type[BaseException] | tuple[()] = getattr(torch, "AcceleratorError", ())


def failure_kind(exc: BaseException) -> str:
    """How model work failed, for `serve_app_model_failures_total`."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out_of_memory"
    return "accelerator" if isinstance(exc, ACCELERATOR_ERROR) else "other"


def raise_to_caller(exc: BaseException) -> NoReturn:
    """Raise `exc` to the model's caller, the ingress. Ray pickles a raised error by its
    class: one of torch, transformers or diffusers (CUDA out of memory) would make the ingress
    import those to read it, for seconds, holding the GIL on the event loop every stream uses.
    Such an error goes as a builtin RuntimeError naming it (chained to it in this replica's
    log; pickling drops the chain); ours and builtins go as they are."""
    if isinstance(exc, APIError) or type(exc).__module__ == "builtins" or not isinstance(exc, Exception):
        raise exc  # ours, builtins, and cancellation (asyncio's CancelledError) as they are
    raise RuntimeError(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}") from exc


class ModelReplica:
    """What chat and image replicas share: placement, and one worker thread for torch.

    Torch work runs on a single worker thread: off the event loop, so the
    replica keeps answering health checks and accepting requests while it
    computes, and one job at a time, so a per-request `seed` really
    reproduces its output (torch's global RNG is not shared mid-run).
    """

    def __init__(self, config: BaseModelConfig) -> None:
        self.config = config
        if Path(config.path).is_absolute() and not Path(config.path).exists():
            # Said as it is: transformers reads a missing folder as a malformed hub id ("Repo id
            # must be in the form 'repo_name'..."), which sends its reader looking in the wrong place.
            raise FileNotFoundError(f"model {config.name!r}: its path {config.path} does not exist on this node "
                                    f"(a local folder: the config's relative paths are read from where it is deployed)")
        see_only_assigned_gpus(config)
        self.device = resolve_device(config)
        self.dtype = resolve_dtype(config, self.device)
        if config.torch_threads is not None:
            # Ray sets OMP_NUM_THREADS from num_cpus (1 for a fraction): a CPU model given
            # `num_cpus: 0.5` to fit the scheduler would otherwise compute on one core.
            torch.set_num_threads(config.torch_threads)
        self._worker = ModelWorker(config.name)
        self._log_flusher = start_flushing()
        summarize_rejections()
        self.metrics: ReplicaMetrics | None = None  # a subclass's own, flushed here as well
        self._metrics_flusher: asyncio.Task | None = None
        self._device_failure: str | None = None
        share = config.deployment.num_gpus
        if self.device.type == "cuda" and 0 < share < 1:
            # Ray's GPU fractions are bookkeeping only: without this cap one replica's KV cache
            # or batch could take the memory of the replica sharing its GPU.
            torch.cuda.set_per_process_memory_fraction(share, self.device)

    def released(self, exc: BaseException) -> BaseException:
        """`exc`, made safe to keep past its handler (posted to a request, logged later).

        A kept exception keeps its traceback's frames alive, and with them the tensors of
        the failed pass (activations, a batch's KV cache): on a GPU the memory of an
        out-of-memory error would stay taken until a full garbage collection, and the next
        pass would run out too. The frames' locals are cleared; the traceback still prints.
        A CUDA error that poisons the context (an illegal address, a device-side assert)
        is noted for `check_health`.
        """
        traceback.clear_frames(exc.__traceback__)
        if isinstance(exc, ACCELERATOR_ERROR) and self._device_failure is None:
            self._device_failure = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, torch.cuda.OutOfMemoryError) and self.device.type == "cuda":
            torch.cuda.empty_cache()  # what the failed pass had reserved goes back to the GPU
        # A client's mistake is no failure, nor a cancellation (the replica shutting down).
        if self.metrics is not None and not (isinstance(exc, APIError) and exc.status_code < 500
                                             or isinstance(exc, asyncio.CancelledError)):
            self.metrics.failed(failure_kind(exc))
        return exc

    def _unhealthy(self) -> str | None:
        """Why this replica needs replacing, if it does: its GPU context failed, or its model
        work has made no progress for `stall_timeout_s` (a hung GPU raises nothing)."""
        if self._device_failure is not None:
            return f"the GPU context failed ({self._device_failure})"
        limit, stalled = self.config.deployment.stall_timeout_s, self._worker.stalled_for()
        if limit is not None and stalled > limit:
            return (f"its model work has made no progress for {stalled:.0f} s (stall_timeout_s: {limit:g}); "
                    "the GPU may hang")
        return None

    def refuse_if_unhealthy(self) -> None:
        """A replica whose GPU context failed, or whose model work hangs, answers 503 at once
        until Serve replaces it (Serve acts after three failed health checks, 30 s by default),
        rather than take each request to a GPU that fails or never answers it; a client's
        retry may find another replica."""
        if self._unhealthy() is not None:
            raise Overloaded(f"A replica of {self.config.name!r} failed and is being replaced; retry.",
                             code="replica_failed", headers={"Retry-After": "1"})

    def check_health(self) -> None:
        """Serve's health check: a replica whose CUDA context failed fails every later call
        on the GPU, and one whose worker hangs never answers, so it asks to be replaced rather
        than go on taking requests."""
        problem = self._unhealthy()
        if problem is not None:
            raise RuntimeError(f"{self.config.name}: {problem}; this replica needs replacing")

    def __del__(self) -> None:
        """Serve calls this on graceful shutdown (and Python again at garbage collection):
        the last log lines reach the file, and queued torch work nobody waits for is dropped.
        Not async: at garbage collection a coroutine would never run."""
        for name in ("_log_flusher", "_metrics_flusher"):
            flusher = getattr(self, name, None)  # absent when __init__ failed early
            if flusher is not None:
                with contextlib.suppress(RuntimeError):  # its event loop may be closed by now
                    flusher.cancel()
        if getattr(self, "metrics", None) is not None:
            try:
                self.metrics.flush()
            except Exception:  # noqa: BLE001 - the last values are lost; shutting down goes on
                logger.exception("recording the last metrics failed")
        flush_serve_log()
        for name in ("_worker", "_grammar_thread"):  # a compile under way ends on its own; none queued starts
            thread = getattr(self, name, None)
            if thread is not None:
                thread.shutdown(wait=False, cancel_futures=True)

    def record_metrics(self, metrics: ReplicaMetrics) -> None:
        """Keep `metrics`, handed to Ray every second from the replica's event loop."""
        self.metrics = metrics
        self._metrics_flusher = in_background(metrics.flush_forever(), "metrics flush")

    async def run_on_worker(self, fn: Callable[..., T], *args) -> T:
        """Run `fn(*args)` on the model's worker thread and await its result."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def torch_threads(self) -> int:
        """The CPU threads torch computes with where the model runs (its worker thread)."""
        return await self.run_on_worker(torch.get_num_threads)

    def log_loaded(self, spread: list[str] | None = None) -> None:
        logger.info("loaded %s", describe(self.config, self.device, self.dtype, spread))
        flush_serve_log()  # the line operators look for, in the file now
