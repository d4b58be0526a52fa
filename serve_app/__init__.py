"""serve_app: a multi-model inference server on Ray Serve (see README.md)."""

import os

# Where set, Ray leaves every GPU of a node visible to every replica, and a GPU replica narrows
# its own CUDA_VISIBLE_DEVICES in its constructor (placement.see_only_assigned_gpus). The CUDA
# driver reads that once, when it starts, and Serve imports a model's module before the
# constructor runs: importing diffusers already asks torch whether CUDA is available, which
# starts the driver. Torch's NVML-based check counts the GPUs without starting it. Set here,
# in the replica's own process (where Ray's setting is), before any model module is imported.
NOSET_VISIBLE_DEVICES = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
if os.environ.get(NOSET_VISIBLE_DEVICES):
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
