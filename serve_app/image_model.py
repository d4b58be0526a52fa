"""Image model deployment: one diffusers checkpoint for generations and edits.

The replica loads the pipeline once with `DiffusionPipeline.from_pretrained`
and derives text-to-image, image-to-image and inpainting pipelines from it with
`from_pipe`, which shares the loaded weights instead of loading them again.

Concurrent requests are batched: Ray Serve's `@serve.batch` gathers those
that arrive together, and the worker thread takes up to `max_batch_size`
queued requests at a time. Those that can share a pipeline call (same mode,
size, steps, strength and negative-prompt presence) run as ONE call with one
prompt per image, and the output is split back so each request gets exactly
its own `n` images. Every image has its own `torch.Generator`, seeded
`seed + i` for a request's i-th image, so a seeded request draws the same
noise alone or batched with others.

Images leave the replica encoded (PNG, or JPEG/WebP when asked): storage and URLs are
the ingress's business.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, cast

import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DiffusionPipeline,
)
from PIL import Image
from ray import serve

from serve_app.batch_gathering import BatchGathering
from serve_app.config import ImageModelConfig, require_loadable
from serve_app.errors import APIError, ClientClosedRequest, ContentFiltered, InvalidRequest, NotANumber
from serve_app.image_pixels import (REPAINTED_FROM, encode_image, fit, marks_nothing, open_image, own_mask, paint_mask,
                                    picture)
from serve_app.jobs import ImageJob, ImageResult, generator_seed
from serve_app.metrics import ImageMetrics
from serve_app.model_replica import ModelReplica, raise_to_caller

logger = logging.getLogger("ray.serve")

Outcome = ImageResult | Exception


DEFAULT_TRUE_CFG_SCALE = 4.0  # Qwen-Image's own default
REFERENCE_IMAGE_PIPELINES = frozenset({
    "Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinKVPipeline", "QwenImageEditPlusPipeline"})
"""Pipelines whose `image` list is a set of reference images that every prompt of the call
sees (FLUX.2 joins them into one sequence for each row), not one image per prompt: two
requests' edits cannot share a call, or each would be conditioned on the other's image."""


def takes_reference_images(pipeline: DiffusionPipeline | None) -> bool:
    """Whether the pipeline reads an `image` list as references for every prompt (see
    `REFERENCE_IMAGE_PIPELINES`); a subclass of one does too."""
    return any(cls.__name__ in REFERENCE_IMAGE_PIPELINES for cls in type(pipeline).__mro__)


@functools.lru_cache(maxsize=16)
def call_signature(pipeline: Any) -> Mapping[str, inspect.Parameter]:
    """The parameters of a pipeline's call (its `__call__`), read once per pipeline (a loaded
    one never changes); none for a callable whose signature Python cannot read."""
    try:
        return inspect.signature(pipeline).parameters
    except (TypeError, ValueError):
        return {}


def call_parameters(pipeline: DiffusionPipeline) -> frozenset[str] | None:
    """The keyword arguments a pipeline's call names (None when it takes any): diffusers'
    families differ (FLUX Kontext edits take no `strength`, FLUX.2 no `negative_prompt`)."""
    parameters = call_signature(pipeline)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return frozenset(parameters)


def numeric_default(pipeline: Any, name: str) -> float | None:
    """The default of the call's `name` argument where it is a number; else (no such argument,
    or a default such as None) None."""
    parameter = call_signature(pipeline).get(name)
    default = parameter.default if parameter is not None else None
    return float(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else None


def reports_steps(pipeline: DiffusionPipeline) -> bool:
    """Whether the pipeline calls diffusers' `callback_on_step_end` after each step (every
    current family does; one that takes only `**kwargs` might drop or misuse it)."""
    return "callback_on_step_end" in call_signature(pipeline)


def pixel_multiple(pipeline: DiffusionPipeline) -> int:
    """What a side of this pipeline's images must be a multiple of: the VAE's downscaling,
    times the transformer's patch (SD3: 16) or the 2x2 latent packing of FLUX-like pipelines."""
    vae_scale = int(getattr(pipeline, "vae_scale_factor", 8) or 8)
    patch = getattr(getattr(getattr(pipeline, "transformer", None), "config", None), "patch_size", None) or 1
    packing = 2 if hasattr(pipeline, "_pack_latents") else 1
    return vae_scale * max(int(patch) if isinstance(patch, int) else 1, packing)


@dataclass(frozen=True)
class PreparedJob:
    """A job checked and decoded on its own, so a bad input fails only that job.

    `key` says which jobs may share one pipeline call: everything that is one
    value per call in diffusers (pipeline, size, steps, strength) must match,
    and so must the presence of a negative prompt, since a missing one is not
    always the same as "" (SDXL uses zero embeddings for it). An edit on a
    pipeline that takes its images as references (`alone`) shares no call.
    """

    job: ImageJob
    mode: str  # "t2i" | "i2i" | "inpaint"
    steps: int
    init_image: Image.Image | None = None
    mask_image: Image.Image | None = None
    alone: bool = False

    @property
    def key(self) -> tuple[Any, ...]:
        strength = None if self.mode == "t2i" else self.job.strength
        return (self.mode, self.job.width, self.job.height, self.steps, strength,
                self.job.negative_prompt is not None, id(self) if self.alone else None)


BLANK_NEGATIVE_PROMPT = " "
"""The negative prompt of a request without one, for a pipeline guided by default (Qwen-Image's)."""


def guided_by_default(pipeline: Any) -> bool:
    """Whether a pipeline's true classifier-free guidance is on by default (`true_cfg_scale`
    above 1: Qwen-Image's 4, where FLUX.1's is 1), so that it needs a negative prompt on every
    call: diffusers guides only where one is given."""
    default = numeric_default(pipeline, "true_cfg_scale")
    return default is not None and default > 1


def per_image(group: list[PreparedJob], value: Callable[[PreparedJob], Any]) -> list[Any]:
    """One entry per output image, in order: a job's value repeated `n` times.

    One prompt per image (rather than `num_images_per_prompt`) works for any
    mix of `n` and keeps image i, its prompt and its generator aligned.
    """
    return [value(item) for item in group for _ in range(item.job.n)]


def to_channels_last(module: torch.nn.Module) -> bool:
    """Put a module's weights in channels-last layout, faster for 2-D convolutions on GPUs; one
    with 3-D convolutions (5-D weights: Qwen-Image's VAE, video VAEs) is left as it is, as torch
    refuses that layout for them (the replica failed to start). Returns whether it moved."""
    if any(parameter.dim() == 5 for parameter in module.parameters()):
        return False
    module.to(memory_format=torch.channels_last)
    return True


@serve.deployment
class ImageModel(ModelReplica):
    """One replica of one image model; `max_batch_size` requests share a pipeline call."""

    metrics: ImageMetrics

    def __init__(self, config: ImageModelConfig) -> None:
        super().__init__(config)
        require_loadable(config)  # said plainly, before diffusers' own error
        if config.deployment.num_gpus > 1:
            logger.warning("image model %r: a pipeline runs on one GPU; num_gpus %s leaves the others idle, "
                           "use num_replicas to use more GPUs", config.name, config.deployment.num_gpus)
        # On a GPU the weights load straight onto it: otherwise every component is built in host
        # memory first (FLUX.1's ~33 GB, more than a GPU node's pod may have). diffusers' device_map
        # takes a device type only: "cuda" is cuda:0, this replica's first GPU.
        straight_to_gpu = {"device_map": "cuda"} if self.device == torch.device("cuda", 0) else {}
        base = DiffusionPipeline.from_pretrained(config.path, dtype=self.dtype, **straight_to_gpu).to(self.device)
        if config.channels_last:
            for name in ("unet", "vae"):  # the convolutional parts; transformer-based pipelines have no unet
                module = getattr(base, name, None)
                if isinstance(module, torch.nn.Module):
                    to_channels_last(module)
        multiple = pixel_multiple(base)
        if config.size_multiple % multiple:
            raise ValueError(f"image model {config.name!r}: size_multiple is {config.size_multiple}, but this "
                             f"model's sides must be multiples of {multiple}: set size_multiple: {multiple} "
                             "(and sizes on that grid) in its config")
        # An inpainting checkpoint (its UNet also reads the mask and the masked image: 9 input
        # channels) only inpaints: text-to-image and image-to-image built on it would fail.
        inpaint_only = getattr(getattr(getattr(base, "unet", None), "config", None), "in_channels", None) == 9
        self.pipelines: dict[str, DiffusionPipeline | None] = {}
        for mode, auto in (("t2i", AutoPipelineForText2Image), ("i2i", AutoPipelineForImage2Image),
                           ("inpaint", AutoPipelineForInpainting)):
            try:
                self.pipelines[mode] = None if inpaint_only and mode != "inpaint" else auto.from_pipe(base)
            except (ValueError, KeyError):  # a family without this variant: Sana has no image-to-image,
                self.pipelines[mode] = None  # an edit family (Qwen-Image-Edit) no text-to-image
        if not any(self.pipelines.values()):
            raise ValueError(f"image model {config.name!r}: diffusers has no text-to-image, image-to-image or "
                             f"inpainting pipeline for {type(base).__name__}")
        for pipeline in self.pipelines.values():  # `from_pipe` does not copy this setting
            if pipeline is not None:
                pipeline.set_progress_bar_config(disable=True)
        self._check_routes(config)
        vae = getattr(base, "vae", None)
        if self.device.type == "cuda" and hasattr(vae, "use_slicing"):  # enable_slicing raises without it
            # Decoding a whole batch's latents at once is the call's memory peak (8 requests x
            # 4 images at 2048 px); one image at a time costs little time on a GPU.
            vae.enable_slicing()
        # Serve creates the batch queue lazily inside the replica; these only set its limits (the
        # size a batch waits for is then set per request, from `self.gathering`).
        self._queue_batch.set_max_batch_size(config.max_batch_size)
        self._queue_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.queued: deque[tuple[ImageJob, float, Future[Outcome]]] = deque()  # job, its arrival, its outcome
        self.taken: list[Future[Outcome]] = []  # the outcomes the worker's current run will set, by job
        self.running: list[Future[Outcome]] = []  # those of its current pipeline call
        self.abandoned: set[Future[Outcome]] = set()  # of those taken, the ones whose caller went away
        self.gathering = BatchGathering(config.max_batch_size, config.batch_wait_timeout_s)
        self.gathering_told = (config.max_batch_size, config.batch_wait_timeout_s)  # what Serve's batcher was last told
        self.counters = {"requests": 0, "pipeline_calls": 0, "images": 0, "largest_call_requests": 0}
        self.record_metrics(ImageMetrics(config.name))
        self.log_loaded()

    async def generate(self, job: ImageJob) -> ImageResult | APIError:
        """Make `job.n` images without blocking the replica's event loop.

        With `max_batch_size: 1` the job skips Serve's batch queue (and its
        wait) and runs alone, exactly as an unbatched server would. A client's
        mistake (an unreadable input image) comes back as a value: raised, Serve
        would log it as a failed request, with a traceback, at ERROR.

        A caller that goes away (its client hung up) has its job dropped while it
        waits, and once every caller of the running pipeline call has gone, the
        call stops at its next step (`_step_done`) instead of running on for nobody.
        """
        try:
            self.refuse_if_unhealthy()
        except APIError as refused:
            return refused
        arrived = time.monotonic()
        # The future is this call's from the start: cancelled between Serve's batcher queueing
        # the job and the wait below, it is still dropped, not made for nobody.
        future: Future[Outcome] = Future()
        gather = self.gathering.arrived()
        try:
            if self.config.max_batch_size == 1:
                self.submit([job], [arrived], [future])
            else:
                # Read by Serve's batcher as a batch's first request comes; each setter only where
                # its value changed (the size's also runs a check of Serve's on every call).
                size, wait = gather, self.gathering.wait_s()
                if size != self.gathering_told[0]:
                    self._queue_batch.set_max_batch_size(size)
                if wait != self.gathering_told[1]:
                    self._queue_batch.set_batch_wait_timeout_s(wait)
                self.gathering_told = (size, wait)
                await self._queue_batch((job, arrived, future))
            outcome = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if not future.cancel() and not future.done():  # the worker has it: its call may stop
                self.abandoned.add(future)
            raise
        finally:
            self.gathering.answered()
        if isinstance(outcome, Exception) and not isinstance(outcome, APIError):
            raise_to_caller(outcome)
        return outcome

    @serve.batch  # its limits come from the config, set in __init__
    async def _queue_batch(self, arrivals: list[tuple[ImageJob, float, Future[Outcome]]]) -> list[Future[Outcome]]:
        """Serve hands over the jobs that arrived together; each gets a future of its outcome.

        The batch is queued for the worker rather than run here, because Serve
        forms the next batch while this one would still be running: under load
        those batches would each get their own pipeline call. Queued instead,
        everything that arrived during a call shares the next one. The size a batch
        waits for (`generate` sets it) follows the replica's traffic: `BatchGathering`.
        """
        self.gathering.handed_over()
        return self.submit([job for job, _, _ in arrivals], [arrived for _, arrived, _ in arrivals],
                           [future for _, _, future in arrivals])

    def submit(self, jobs: list[ImageJob], arrived: list[float] | None = None,
               futures: list[Future[Outcome]] | None = None) -> list[Future[Outcome]]:
        """Queue jobs (that reached the replica at `arrived`, else now) for the worker thread,
        each to set its future (given, else made here); it runs them with whatever else is queued."""
        futures = futures if futures is not None else [Future() for _ in jobs]
        now = time.monotonic()
        self.queued.extend(zip(jobs, arrived or [now] * len(jobs), futures))
        self._worker.submit(self.run_queued)
        return futures

    def run_queued(self) -> None:
        """On the worker: run up to `max_batch_size` queued jobs, oldest first.

        Each `submit` queues one run and adds at most `max_batch_size` jobs,
        so its own jobs are taken by its run at the latest. Jobs whose caller
        went away (their future was cancelled) are dropped before the call.
        """
        # Only the futures taken below can be abandoned from here on: one a caller marked just as
        # its run ended (see `generate`) is let go now, with its outcome.
        self.abandoned.clear()
        taken: list[tuple[ImageJob, float, Future[Outcome]]] = []
        while self.queued and len(taken) < self.config.max_batch_size:
            job, arrived, future = self.queued.popleft()
            if future.set_running_or_notify_cancel():
                taken.append((job, arrived, future))
        self.taken = [future for _, _, future in taken]

        def settle(index: int, outcome: Outcome) -> None:  # answered the moment it is decided
            future = self.taken[index]
            self.abandoned.discard(future)
            future.set_result(outcome)

        failure: Outcome = RuntimeError("the image batch failed")
        try:
            self.run_jobs([job for job, _, _ in taken], [arrived for _, arrived, _ in taken], settle)
        except Exception as exc:  # noqa: BLE001 - never leave a caller waiting
            failure = exc
            self.released(exc)
        finally:  # whatever failed, every caller gets an outcome
            for index, future in enumerate(self.taken):
                if not future.done():
                    settle(index, failure)
            self.taken = []

    def stats(self) -> dict[str, int]:
        """Counters of requests, pipeline calls and images, to observe batching."""
        return dict(self.counters)

    def run_jobs(self, jobs: list[ImageJob], arrived: list[float] | None = None,
                 settle: Callable[[int, Outcome], None] | None = None) -> list[Outcome]:
        """Run jobs on the worker thread: one pipeline call per group of compatible jobs.
        `arrived`: when each reached the replica, for its queue time. `settle(index, outcome)`
        is told each job's outcome as soon as it is known: a job refused by `prepare`, or whose
        group ran first, need not wait for the pipeline calls of the others."""
        now = time.monotonic()
        for at in arrived or []:
            self.metrics.queued(now - at)
        self.counters["requests"] += len(jobs)
        outcomes: list[Outcome | None] = [None] * len(jobs)

        def decided(index: int, outcome: Outcome) -> None:
            outcomes[index] = outcome
            if settle is not None:
                settle(index, outcome)

        groups: dict[tuple[Any, ...], list[tuple[int, PreparedJob]]] = {}
        for index, job in enumerate(jobs):
            try:
                prepared = self.prepare(job)
            except Exception as exc:  # noqa: BLE001 - reported to this job's caller only
                decided(index, self.released(exc))
            else:
                groups.setdefault(prepared.key, []).append((index, prepared))
        for members in groups.values():
            self._run_group(members, decided)
        return cast(list[Outcome], outcomes)

    def _run_group(self, members: list[tuple[int, PreparedJob]], decided: Callable[[int, Outcome], None]) -> None:
        """One pipeline call for `members` (their index among the run's jobs, job), each outcome `decided`.
        Out of GPU memory together, each is tried once alone: a call's memory grows with its
        images, so one request's images may fit where the batch's did not. A group whose every
        caller has gone is not run; one whose callers all go during the call stops there."""
        watched = [self.taken[index] for index, _ in members] if self.taken else []
        if watched and all(future in self.abandoned for future in watched):
            for index, _ in members:
                decided(index, ClientClosedRequest("every caller of this pipeline call went away before it began"))
            return
        self.running = watched
        try:
            images = iter(self.call_pipeline([prepared for _, prepared in members]))
        except Exception as exc:  # noqa: BLE001 - the call failed for the whole group
            self.released(exc)
            if len(members) > 1 and isinstance(exc, torch.cuda.OutOfMemoryError):
                logger.warning("image model %r: out of memory for %d requests together; running each alone",
                               self.config.name, len(members))
                for member in members:
                    self._run_group([member], decided)
                return
            for index, _ in members:
                decided(index, exc)
            return
        finally:
            self.running = []
        for index, prepared in members:
            job = prepared.job
            made = [next(images) for _ in range(job.n)]  # taken first: the next job's start where they end
            overflowed = next((image for image in made if isinstance(image, NotANumber)), None)
            if overflowed is not None:
                decided(index, self.released(overflowed))
                continue
            if any(image is None for image in made):
                decided(index, ContentFiltered(
                    "The model's safety checker flagged an image made for this request, so none is "
                    "returned; change the prompt.", param="prompt"))
                continue
            try:
                result = ImageResult(images=[
                    encode_image(image, job.output_format, job.quality, self.config.png_compress_level)
                    for image in made])
            except Exception as exc:  # noqa: BLE001 - this job's encoding failed, not its batch-mates'
                decided(index, self.released(exc))
            else:
                self._worker.progressed()  # encoding 32 large PNGs takes a while too
                decided(index, result)

    def prepare(self, job: ImageJob) -> PreparedJob:
        """Choose the pipeline and decode the input images of one job.

        As OpenAI's edits do, an image sent without a mask that has transparent pixels is
        its own mask: those pixels are repainted (by a model that can inpaint; others
        redraw the whole image, as for any image without a mask)."""
        if job.init_image is None:
            if self.pipelines["t2i"] is None:
                raise InvalidRequest("this model edits images (/v1/images/edits) but makes none from "
                                     "text alone", param="model")
            return self._prepared(job, "t2i")
        if self.pipelines["i2i"] is None and self.pipelines["inpaint"] is None:
            raise InvalidRequest("this model makes images from text only; it cannot edit one", param="image")
        size = (job.width, job.height)
        source = open_image(job.init_image, param="image")
        init_image = fit(source.convert("RGB"), size)
        strength = self.config.default_inpaint_strength  # what a masked edit repaints by default
        if job.mask_image is not None:
            if self.pipelines["inpaint"] is None:
                raise InvalidRequest("this model does not support masks", param="mask")
            mask = fit(paint_mask(open_image(job.mask_image, param="mask")), size)
            if marks_nothing(mask):
                raise InvalidRequest(
                    "the mask marks nothing to edit: a mask with transparency is edited where it is transparent "
                    f"(alpha below {REPAINTED_FROM}), one without where it is white (at least {REPAINTED_FROM}), "
                    "and this one has no such pixel", param="mask")
        else:
            holes = own_mask(source) if self.pipelines["inpaint"] is not None else None
            if holes is not None:
                mask = holes
            elif self.pipelines["i2i"] is not None:
                job = self._with_strength(job, self.config.default_strength)
                return self._prepared(job, "i2i", init_image)
            else:  # an inpainting checkpoint repaints the whole image, as an image-to-image edit would,
                mask = Image.new("L", size, 255)  # keeping the picture (at 1 it would start from noise)
                strength = self.config.default_strength
        job = self._with_strength(job, strength)
        return self._prepared(job, "inpaint", init_image, fit(mask, size))

    @staticmethod
    def _with_strength(job: ImageJob, default: float) -> ImageJob:
        """The job with its strength: the request's, else this kind of edit's default."""
        return job if job.strength is not None else replace(job, strength=default)

    def _check_routes(self, config: ImageModelConfig) -> None:
        """What the config says this model serves (what /v1/models and the nodes are told) must
        be what the checkpoint can do: a route it names and cannot serve stops the start, saying
        what to set; one it lacks by default is a warning (its requests get a 400 from here)."""
        lacking = {"generations": "an edit-only checkpoint (inpainting, or an edit family as Qwen-Image-Edit): "
                                  "it makes no image from text alone",
                   "edits": "a pipeline family without image-to-image or inpainting"}
        if self.pipelines["t2i"] is not None:
            del lacking["generations"]
        if self.pipelines["i2i"] is not None or self.pipelines["inpaint"] is not None:
            del lacking["edits"]
        if not lacking:
            return
        able = [route for route in ("generations", "edits") if route not in lacking]
        why = "; ".join(f"{route} ({reason})" for route, reason in lacking.items())
        if config.routes is None:
            logger.warning("image model %r cannot serve %s: set routes: %s in its config, so that /v1/models and "
                           "the nodes are not told it does", config.name, why, able)
        elif lacking.keys() & set(config.routes):
            raise ValueError(f"image model {config.name!r}: its routes name what this checkpoint cannot serve, "
                             f"{why}: set routes: {able}")

    def _true_cfg_scale(self, mode: str) -> float | None:
        """For a pipeline with true classifier-free guidance (FLUX.1, Qwen-Image), the scale a
        negative prompt needs to count: the config's (1: guidance off, for a distilled
        checkpoint), else the pipeline's default where that uses it (Qwen-Image's 4), else 4
        (FLUX.1's default of 1 ignores a negative prompt)."""
        if "true_cfg_scale" not in call_signature(self.pipelines[mode]):
            return None
        if self.config.true_cfg_scale is not None:
            return self.config.true_cfg_scale
        default = numeric_default(self.pipelines[mode], "true_cfg_scale")
        return default if default is not None and default > 1 else DEFAULT_TRUE_CFG_SCALE

    def _guidance_scale(self, mode: str) -> float | None:
        """The config's guidance scale; unset, an edit takes the text-to-image pipeline's default
        (None: each pipeline its own). diffusers' edit pipelines default to other values than
        their family's generation: FLUX.1's image-to-image and inpainting 7.0 against its 3.5,
        SDXL's inpainting 7.5 against 5, so a checkpoint's edits ran at twice its guidance."""
        if self.config.guidance_scale is not None or mode == "t2i" or self.pipelines["t2i"] is None:
            return self.config.guidance_scale
        return numeric_default(self.pipelines["t2i"], "guidance_scale")

    def _prepared(self, job: ImageJob, mode: str, init_image: Image.Image | None = None,
                  mask_image: Image.Image | None = None) -> PreparedJob:
        """A job for the `mode` pipeline, checked against what that pipeline takes: a negative
        prompt the model cannot use is refused rather than dropped; an edit on a pipeline
        without `strength` (FLUX Kontext, Qwen-Image-Edit) runs `steps` as asked, not the
        more a small strength would need to make one of them run."""
        pipeline = self.pipelines[mode]
        parameters = call_parameters(pipeline)
        if job.negative_prompt is not None and parameters is not None and "negative_prompt" not in parameters:
            raise InvalidRequest("this model takes no negative_prompt", param="negative_prompt")
        true_cfg = self._true_cfg_scale(mode)
        if job.negative_prompt is not None and true_cfg is not None and true_cfg <= 1:
            raise InvalidRequest("this model takes no negative_prompt: its true guidance is off (true_cfg_scale 1 "
                                 "in its config)", param="negative_prompt")
        if job.negative_prompt is None and guided_by_default(pipeline) and true_cfg is not None and true_cfg > 1:
            # Qwen-Image runs its true guidance (scale 4) only with a negative prompt: its model card
            # gives " " where there is none; without one every step ran unguided.
            job = replace(job, negative_prompt=BLANK_NEGATIVE_PROMPT)
        if parameters is None or "strength" in parameters:
            steps = job.pipeline_steps
        else:  # and edits of any strength share its calls
            steps, job = job.steps, replace(job, strength=None)
        return PreparedJob(job, mode, steps, init_image, mask_image,
                           alone=init_image is not None and takes_reference_images(pipeline))

    def call_pipeline(self, group: list[PreparedJob]) -> list[Image.Image | None]:
        """One pipeline call for a group of compatible jobs: their images, in job order (None
        for an image the checkpoint's safety checker blanked)."""
        first = group[0]
        size = (first.job.width, first.job.height)

        def each(value: Callable[[PreparedJob], Any]) -> Any:
            """One value per image; for a job that runs alone (its image a reference for every
            prompt, see `REFERENCE_IMAGE_PIPELINES`), its own value once, made `n` times."""
            return value(first) if first.alone else per_image(group, value)

        arguments: dict[str, Any] = {
            "prompt": each(lambda item: item.job.prompt),
            "num_inference_steps": first.steps,
            "height": first.job.height,
            "width": first.job.width,
            "generator": [self.generator(item.job, i) for item in group for i in range(item.job.n)],
            "output_type": "np",  # made into pictures by `picture`, which sees NaN first
        }
        if first.alone:
            arguments["num_images_per_prompt"] = first.job.n
        if first.job.negative_prompt is not None:
            arguments["negative_prompt"] = each(lambda item: item.job.negative_prompt)
            scale = self._true_cfg_scale(first.mode)
            if scale is not None:
                arguments["true_cfg_scale"] = scale
        guidance = self._guidance_scale(first.mode)
        if guidance is not None:
            arguments["guidance_scale"] = guidance
        if first.mode != "t2i":
            arguments["image"] = each(lambda item: item.init_image)
            arguments["strength"] = first.job.strength
        if first.mode == "inpaint":
            arguments["mask_image"] = each(lambda item: item.mask_image)
        pipeline = self.pipelines[first.mode]
        assert pipeline is not None, "prepare() refuses modes this model lacks"
        expected, parameters = sum(item.job.n for item in group), call_parameters(pipeline)
        if parameters is not None:  # what this family does not take (a FLUX Kontext edit: strength, size)
            arguments = {name: value for name, value in arguments.items() if name in parameters}
        if reports_steps(pipeline):  # each step is progress (see `stall_timeout_s`)
            arguments["callback_on_step_end"] = self._step_done
        started, complete = time.monotonic(), False
        self.gathering.call_started()
        try:
            with torch.inference_mode():
                output = pipeline(**arguments)
            self._worker.progressed()  # the decode and safety check after the last step are work too
            complete = True
        finally:
            took = time.monotonic() - started
            self.metrics.pipeline_call(len(group), took)
            self.gathering.call_ended(took, complete)
        images = output.images
        if len(images) != expected:
            raise RuntimeError(f"the pipeline made {len(images)} images for {expected} prompts")
        self.counters["pipeline_calls"] += 1
        self.counters["images"] += len(images)
        self.counters["largest_call_requests"] = max(self.counters["largest_call_requests"], len(group))
        # A checkpoint's safety checker (Stable Diffusion 1.x/2.x) blanks what it flags; say so.
        flagged = getattr(output, "nsfw_content_detected", None) or [False] * len(images)
        return [None if flag else picture(image, size) for image, flag in zip(images, flagged)]

    def _step_done(self, pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        """diffusers' step callback: a long call that still denoises is not stalled, and one
        whose every caller has gone stops here (the worker is free for the next call)."""
        self._worker.progressed()
        if self.running and all(future in self.abandoned for future in self.running):
            raise ClientClosedRequest(f"every caller of this pipeline call went away; stopped after step {step + 1}")
        return tensors

    def generator(self, job: ImageJob, index: int) -> torch.Generator:
        """The generator of a job's `index`-th image: `seed + index`, or random without a seed.
        On the CPU whatever the model's device (diffusers draws the noise there and moves it),
        so a seed makes the same image on CPU and GPU replicas."""
        generator = torch.Generator()
        if job.seed is None:
            generator.seed()
        else:
            generator.manual_seed(generator_seed(job.seed, index))
        return generator
