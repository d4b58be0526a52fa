"""serve_app: a multi-model inference server on Ray Serve (see README.md)."""

import logging
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

# transformers 5, imported by diffusers, says three times per process (six per default start)
# that its CLIP and SigLIP image processors fall back to PIL without torchvision, and to
# install it. The PIL ones are the processors transformers 4 always used (a Stable Diffusion
# safety checker's feature extractor is the only one a pipeline here runs), so the advice
# would only lead operators to a second multi-GB torch download. Dropped here, before any
# model module imports diffusers; transformers' other warnings pass.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage())
