"""Where a model's weights go: device and dtype from config and Ray's GPU assignment.

Ray sets CUDA_VISIBLE_DEVICES for a replica to the GPUs it was given, so inside
the replica `cuda` (index 0) is always one of *its* GPUs; a replica given no
GPU runs on the CPU even on a GPU machine, so `num_gpus` alone decides. Where an
operator told Ray not to (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES), the
replica narrows the view itself before CUDA starts (`see_only_assigned_gpus`).
"""

from __future__ import annotations

import logging
import os

import torch

from serve_app import NOSET_VISIBLE_DEVICES
from serve_app.config import BaseModelConfig

logger = logging.getLogger("ray.serve")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def assigned_gpu_ids() -> list[str]:
    """GPU ids Ray assigned to this process (empty outside Ray or without GPUs)."""
    try:
        import ray

        return [str(i) for i in ray.get_gpu_ids()] if ray.is_initialized() else []
    except Exception:  # noqa: BLE001 - outside a Ray worker there is simply no assignment
        return []


def see_only_assigned_gpus(config: BaseModelConfig) -> None:
    """With RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES set, Ray leaves every GPU of the node
    visible to every replica: each would load onto cuda:0 (physical GPU 0) and spread
    `device_map="auto"` over the other replicas' GPUs. Show this process only the GPUs Ray
    assigned it, as Ray would have; this works only before CUDA is initialised here, which
    nothing before a replica's constructor does."""
    if not os.environ.get(NOSET_VISIBLE_DEVICES) or config.deployment.num_gpus <= 0:
        return
    ids = sorted(assigned_gpu_ids(), key=lambda gpu: (not gpu.isdigit(), int(gpu) if gpu.isdigit() else 0, gpu))
    if not ids:
        return
    if torch.cuda.is_initialized():
        logger.warning("%s is set and CUDA is already initialised in this replica: it sees every GPU, "
                       "not only its own %s", NOSET_VISIBLE_DEVICES, ids)
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)


def resolve_device(config: BaseModelConfig) -> torch.device:
    """'auto' is cuda when this replica holds a GPU, else cpu. A replica that holds a GPU
    but cannot use CUDA (a CPU-only torch, a driver mismatch) fails to start, rather than
    computing on the CPU while the GPU it reserved idles."""
    wants_gpu = config.deployment.num_gpus > 0 and config.device in ("auto", "cuda") or config.device.startswith("cuda")
    if wants_gpu and not torch.cuda.is_available():
        raise RuntimeError(f"{config.name}: this replica holds a GPU (num_gpus={config.deployment.num_gpus}, "
                           f"device={config.device}) but torch {torch.__version__} cannot use CUDA here; "
                           "install a CUDA build of torch or set num_gpus: 0")
    if config.device == "cuda":  # with its index, as memory caps and device guards need
        return torch.device("cuda", 0)
    if config.device != "auto":
        return torch.device(config.device)
    return torch.device("cuda", 0) if config.deployment.num_gpus > 0 else torch.device("cpu")


def weights_device_map(config: BaseModelConfig, device: torch.device) -> str | torch.device:
    """Where `from_pretrained` puts a transformers model's weights.

    A replica given several GPUs (`num_gpus: 2` or more, `device: auto` or `cuda`) spreads the
    model's layers over all of them with accelerate's `device_map="auto"`: that is why
    someone asks for more than one GPU per replica (a model too big for one). Its inputs
    still go to `device` (the first GPU) and its outputs come back there. Otherwise the
    weights go straight to `device`, with no full copy in CPU memory first.
    """
    if (config.device in ("auto", "cuda") and device.type == "cuda" and config.deployment.num_gpus > 1
            and torch.cuda.device_count() > 1):
        return "auto"
    return device


def resolve_dtype(config: BaseModelConfig, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 (or float16 where unsupported) on GPU, float32 on CPU."""
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    if device.type == "cuda":
        # Not emulated bf16 (older GPUs "support" it slowly): fp16 there.
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        logger.warning("model %r: this GPU has no native bfloat16, so dtype auto is float16; checkpoints trained "
                       "in bfloat16 (Qwen2.5, Gemma) can overflow in float16 and answer garbage: set dtype: "
                       "float32 for them", config.name)
        return torch.float16
    return torch.float32


def spread_devices(model: torch.nn.Module) -> list[str]:
    """The devices a model loaded with a `device_map` spans (one for a model on one device)."""
    return sorted({str(device) for device in (getattr(model, "hf_device_map", None) or {}).values()})


def describe(config: BaseModelConfig, device: torch.device, dtype: torch.dtype, spread: list[str] | None = None) -> str:
    """One log line saying where a model landed, for operators checking GPU pinning."""
    where = f"{device}, layers spread over devices {', '.join(spread)}" if spread and len(spread) > 1 else device
    return (f"model {config.name!r} from {config.path} on {where} ({dtype}); "
            f"Ray GPU ids {assigned_gpu_ids() or 'none'}; torch CPU threads {torch.get_num_threads()}")
