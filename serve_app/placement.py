"""Where a model's weights go: device and dtype from config and Ray's GPU assignment.

Ray sets CUDA_VISIBLE_DEVICES for a replica to the GPUs it was given, so inside
the replica `cuda` (index 0) is always one of *its* GPUs; a replica given no
GPU runs on the CPU even on a GPU machine, so `num_gpus` alone decides.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import torch

from serve_app.config import BaseModelConfig

logger = logging.getLogger("ray.serve")

T = TypeVar("T")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def assigned_gpu_ids() -> list[str]:
    """GPU ids Ray assigned to this process (empty outside Ray or without GPUs)."""
    try:
        import ray

        return [str(i) for i in ray.get_gpu_ids()] if ray.is_initialized() else []
    except Exception:  # noqa: BLE001 - outside a Ray worker there is simply no assignment
        return []


def resolve_device(config: BaseModelConfig) -> torch.device:
    """'auto' is cuda when this replica holds a GPU and CUDA works, else cpu."""
    if config.device != "auto":
        return torch.device(config.device)
    if config.deployment.num_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def weights_device_map(config: BaseModelConfig, device: torch.device) -> str | torch.device:
    """Where `from_pretrained` puts a transformers model's weights.

    A replica given several GPUs (`num_gpus: 2` or more, `device: auto`) spreads the
    model's layers over all of them with accelerate's `device_map="auto"`: that is why
    someone asks for more than one GPU per replica (a model too big for one). Its inputs
    still go to `device` (the first GPU) and its outputs come back there. Otherwise the
    weights go straight to `device`, with no full copy in CPU memory first.
    """
    if (config.device == "auto" and device.type == "cuda" and config.deployment.num_gpus > 1
            and torch.cuda.device_count() > 1):
        return "auto"
    return device


def resolve_dtype(config: BaseModelConfig, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 (or float16 where unsupported) on GPU, float32 on CPU."""
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def spread_devices(model) -> list[str]:
    """The devices a model loaded with a `device_map` spans (one for a model on one device)."""
    return sorted({str(device) for device in (getattr(model, "hf_device_map", None) or {}).values()})


def describe(config: BaseModelConfig, device: torch.device, dtype: torch.dtype, spread: list[str] | None = None) -> str:
    """One log line saying where a model landed, for operators checking GPU pinning."""
    where = f"{device}, layers spread over devices {', '.join(spread)}" if spread and len(spread) > 1 else device
    return (f"model {config.name!r} from {config.path} on {where} ({dtype}); "
            f"Ray GPU ids {assigned_gpu_ids() or 'none'}; torch CPU threads {torch.get_num_threads()}")


class ModelReplica:
    """What chat and image replicas share: placement, and one worker thread for torch.

    Torch work runs on a single worker thread: off the event loop, so the
    replica keeps answering health checks and accepting requests while it
    computes, and one job at a time, so a per-request `seed` really
    reproduces its output (torch's global RNG is not shared mid-run).
    """

    def __init__(self, config: BaseModelConfig) -> None:
        self.config = config
        self.device = resolve_device(config)
        self.dtype = resolve_dtype(config, self.device)
        if config.torch_threads is not None:
            # Ray sets OMP_NUM_THREADS from num_cpus (1 for a fraction): a CPU model given
            # `num_cpus: 0.5` to fit the scheduler would otherwise compute on one core.
            torch.set_num_threads(config.torch_threads)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"torch-{config.name}")

    async def run_on_worker(self, fn: Callable[..., T], *args) -> T:
        """Run `fn(*args)` on the model's worker thread and await its result."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def torch_threads(self) -> int:
        """The CPU threads torch computes with where the model runs (its worker thread)."""
        return await self.run_on_worker(torch.get_num_threads)

    def log_loaded(self, spread: list[str] | None = None) -> None:
        logger.info("loaded %s", describe(self.config, self.device, self.dtype, spread))
