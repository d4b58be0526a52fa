"""Image model deployment: one diffusers checkpoint for generations and edits.

The replica loads the pipeline once with `DiffusionPipeline.from_pretrained`
and derives text-to-image, image-to-image and inpainting pipelines from it with
`from_pipe`, which shares the loaded weights instead of loading them again.
All `n` images of a request come from one batched pipeline call
(`num_images_per_prompt`), and leave the replica as PNG bytes: storage and
URLs are the ingress's business.
"""

from __future__ import annotations

import io
import math

import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DiffusionPipeline,
)
from PIL import Image
from ray import serve

from serve_app.config import ImageModelConfig
from serve_app.errors import InvalidRequest
from serve_app.jobs import ImageJob, ImageResult
from serve_app.placement import ModelReplica


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_rgb(data: bytes, size: tuple[int, int], *, param: str, mode: str = "RGB") -> Image.Image:
    """Decode an input image and fit it to the requested (width, height)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the client's bad input
        raise InvalidRequest(f"{param} is not a readable image", param=param) from exc
    return image.convert(mode).resize(size, Image.Resampling.LANCZOS)


@serve.deployment
class ImageModel(ModelReplica):
    """One replica of one image model."""

    def __init__(self, config: ImageModelConfig) -> None:
        super().__init__(config)
        base = DiffusionPipeline.from_pretrained(config.path, torch_dtype=self.dtype).to(self.device)
        base.set_progress_bar_config(disable=True)
        self.text_to_image = AutoPipelineForText2Image.from_pipe(base)
        self.image_to_image = AutoPipelineForImage2Image.from_pipe(base)
        try:
            self.inpaint = AutoPipelineForInpainting.from_pipe(base)
        except (ValueError, KeyError):  # some families have no inpainting variant
            self.inpaint = None
        self.log_loaded()

    async def generate(self, job: ImageJob) -> ImageResult:
        """Make `job.n` images without blocking the replica's event loop."""
        return await self.run_on_worker(self._generate, job)

    def _generate(self, job: ImageJob) -> ImageResult:
        size = (job.width, job.height)
        arguments = {
            "prompt": job.prompt,
            "negative_prompt": job.negative_prompt,
            "num_images_per_prompt": job.n,
            "num_inference_steps": job.steps,
            "height": job.height,
            "width": job.width,
            "output_type": "pil",
        }
        if job.seed is not None:
            arguments["generator"] = torch.Generator(device=self.device).manual_seed(job.seed)
        pipeline = self.text_to_image
        if job.init_image is not None:
            pipeline = self.image_to_image
            arguments["image"] = decode_rgb(job.init_image, size, param="image")
            arguments["strength"] = job.strength
            # Edits run int(steps * strength) steps; never let that round down to zero.
            arguments["num_inference_steps"] = max(job.steps, math.ceil(1 / job.strength))
            if job.mask_image is not None:
                if self.inpaint is None:
                    raise InvalidRequest("this model does not support masks", param="mask")
                pipeline = self.inpaint
                arguments["mask_image"] = decode_rgb(job.mask_image, size, param="mask", mode="L")
        with torch.inference_mode():
            images = pipeline(**arguments).images
        return ImageResult(images=[encode_png(image.resize(size) if image.size != size else image)
                                   for image in images])
