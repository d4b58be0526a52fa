"""Where a model's weights go (no Ray): one device, or spread over a replica's GPUs.

No GPU here: the GPU count torch sees is patched, and the spread engine is checked
on the tiny model with a device map naming two GPUs; the real multi-GPU load runs
only on a GPU machine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import subprocess
import sys

import pytest
import torch

from serve_app.chat_engine import DecodeBatch
from serve_app.config import ChatModelConfig
from serve_app import NOSET_VISIBLE_DEVICES
from serve_app.errors import ContentFiltered, NotANumber
from serve_app.model_replica import raise_to_caller
from serve_app.placement import (
    describe,
    resolve_device,
    resolve_dtype,
    spread_devices,
    weights_device_map,
)


def chat_config(**fields) -> ChatModelConfig:
    return ChatModelConfig.model_validate({"name": "m", "kind": "chat", "path": "p", **fields})


@pytest.mark.parametrize(("fields", "device", "visible_gpus", "expected"), [
    ({"deployment": {"num_gpus": 2}}, "cuda:0", 2, "auto"),
    ({"deployment": {"num_gpus": 4}}, "cuda:0", 4, "auto"),
    ({"deployment": {"num_gpus": 1}}, "cuda:0", 1, "cuda:0"),
    ({"deployment": {"num_gpus": 0.5}}, "cuda:0", 1, "cuda:0"),
    ({"deployment": {"num_gpus": 2}, "device": "cuda"}, "cuda:0", 2, "auto"),  # any of its GPUs
    ({"deployment": {"num_gpus": 2}, "device": "cuda:1"}, "cuda:1", 2, "cuda:1"),  # pinned by the operator
    ({"deployment": {"num_gpus": 2}}, "cuda:0", 1, "cuda:0"),  # only one visible after all
    ({"deployment": {"num_gpus": 0}}, "cpu", 0, "cpu"),
])
def test_a_replica_given_several_gpus_spreads_its_layers_over_them(monkeypatch, fields, device, visible_gpus, expected):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible_gpus)
    assert str(weights_device_map(chat_config(**fields), torch.device(device))) == expected


def test_a_spread_model_selects_its_rows_with_an_index_any_device_accepts():
    """A GPU index tensor only indexes tensors on its own GPU, and a spread model keeps each
    layer's cache on that layer's GPU."""
    spread = torch.nn.Linear(1, 1)
    spread.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": 1}
    single = torch.nn.Linear(1, 1)
    single.hf_device_map = {"": "cpu"}
    assert spread_devices(spread) == ["0", "1"]
    assert DecodeBatch(spread, 0, torch.device("cuda", 0)).row_index_device == torch.device("cpu")
    assert DecodeBatch(single, 0, torch.device("cuda", 0)).row_index_device == torch.device("cuda", 0)
    assert "layers spread over devices 0, 1" in describe(chat_config(), torch.device("cuda", 0), torch.float16,
                                                         spread_devices(spread))


@pytest.mark.parametrize("fields", [{"deployment": {"num_gpus": 1}}, {"deployment": {"num_gpus": 0.5}, "device": "cuda"}])
def test_a_replica_holding_a_gpu_it_cannot_use_refuses_to_start(fields, monkeypatch):
    """Not a silent fall back to the CPU while the reserved GPU idles (a CPU-only torch, a driver mismatch)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="cannot use CUDA"):
        resolve_device(chat_config(**fields))
    assert resolve_device(chat_config()) == torch.device("cpu")


@pytest.mark.parametrize(("device", "expected"), [("cuda", "cuda:0"), ("cuda:1", "cuda:1"), ("auto", "cuda:0")])
def test_a_gpu_device_has_an_index(monkeypatch, device, expected):
    """`device: cuda` is the replica's first GPU by index: the memory cap of a GPU shared with
    `num_gpus: 0.5` (set_per_process_memory_fraction) refuses a device without one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    resolved = resolve_device(chat_config(device=device, deployment={"num_gpus": 2}))
    assert str(resolved) == expected and resolved.index is not None


def test_a_replica_sees_only_its_gpus_when_ray_leaves_them_all_visible(monkeypatch):
    """RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: Ray does not narrow CUDA_VISIBLE_DEVICES,
    so the replica does, before CUDA starts; cuda:0 is then the first GPU Ray gave it."""
    from serve_app import placement

    monkeypatch.delenv(NOSET_VISIBLE_DEVICES, raising=False)
    monkeypatch.setattr(placement, "assigned_gpu_ids", lambda: ["10", "3"])
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7,8,9,10,11")
    placement.see_only_assigned_gpus(chat_config(deployment={"num_gpus": 2}))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7,8,9,10,11"  # Ray narrowed it: left alone

    monkeypatch.setenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")
    placement.see_only_assigned_gpus(chat_config(deployment={"num_gpus": 0}))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7,8,9,10,11"  # a CPU replica: nothing to narrow
    placement.see_only_assigned_gpus(chat_config(deployment={"num_gpus": 2}))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,10"


def test_gpu_replicas_count_gpus_without_starting_cuda_where_they_narrow_their_view():
    """The CUDA driver reads CUDA_VISIBLE_DEVICES once, at its start, and importing diffusers
    starts it (torch.cuda.is_available) before the replica's constructor narrows the view:
    under Ray's NOSET switch, importing serve_app makes torch count GPUs by NVML instead."""
    probe = ("import os, sys, serve_app, torch; "
             "print(os.environ.get('PYTORCH_NVML_BASED_CUDA_CHECK'), torch.cuda._nvml_based_avail())")
    env = {k: v for k, v in os.environ.items() if k not in (NOSET_VISIBLE_DEVICES, "PYTORCH_NVML_BASED_CUDA_CHECK")}
    plain = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    noset = subprocess.run([sys.executable, "-c", probe], env={**env, NOSET_VISIBLE_DEVICES: "1"},
                           capture_output=True, text=True, check=True)
    assert (plain.stdout.split(), noset.stdout.split()) == (["None", "False"], ["1", "True"])


def test_auto_dtype_on_a_gpu_without_bf16_is_float16_with_a_warning(monkeypatch, caplog):
    """fp16 overflows for some bf16-trained checkpoints: the operator is told how to avoid it."""
    monkeypatch.setattr(logging.getLogger("ray.serve"), "propagate", True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert resolve_dtype(chat_config(), torch.device("cuda:0")) == torch.float16
    assert "set dtype: float32" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_dtype(chat_config(), torch.device("cuda:0")) == torch.bfloat16


def test_the_errors_a_model_raises_are_read_at_the_ingress_without_torch():
    """Ray pickles an error a replica raises by its class, and the ingress, which never loads
    torch, unpickles it: a CUDA out-of-memory error goes as a builtin RuntimeError naming it,
    and the replicas' own errors live with the others in serve_app.errors."""
    with pytest.raises(RuntimeError) as raised:
        raise_to_caller(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert type(raised.value) is RuntimeError and "OutOfMemoryError: CUDA out of memory" in str(raised.value)
    with pytest.raises(ValueError):  # builtins and ours as they are
        raise_to_caller(ValueError("x"))
    with pytest.raises(asyncio.CancelledError):  # a cancellation stays one, not a 500
        raise_to_caller(asyncio.CancelledError())
    errors = [raised.value, NotANumber("nan"), ContentFiltered("flagged", param="prompt")]
    read = subprocess.run([sys.executable, "-c", (
        "import pickle, sys; errors = pickle.loads(sys.stdin.buffer.read()); "
        "print([type(e).__name__ for e in errors], sorted(m for m in ('torch', 'diffusers', 'transformers') "
        "if m in sys.modules))")], input=pickle.dumps(errors), capture_output=True, check=True)
    assert read.stdout.decode().split() == ["['RuntimeError',", "'NotANumber',", "'ContentFiltered']", "[]"]
