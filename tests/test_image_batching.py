"""Image requests batched across callers: shared pipeline calls, each caller's own images.

The first tests drive the replica class directly (no Ray): a batch of mixed
jobs, seed reproducibility alone vs batched, one bad job among good ones. The
last one goes through the real server and counts pipeline calls.

A seeded image is compared with a tolerance, not byte for byte: the noise is
exactly the same alone or batched, but float kernels (oneDNN, cuBLAS) may pick
other algorithms for another batch size, which can move a few pixels by one
level after rounding to 8 bits.
"""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve_app.config import ImageModelConfig
from serve_app.errors import InvalidRequest
from serve_app.image_model import ImageModel
from serve_app.jobs import ImageJob, ImageResult

IMAGE = "SuperImage"


def pixels(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_same_image(a: bytes, b: bytes) -> None:
    """Equal up to rounding: at most one level off, on at most 1% of the values."""
    diff = np.abs(pixels(a) - pixels(b))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, (diff.max(), (diff > 0).mean())


def png_bytes(color: str, size: tuple[int, int] = (80, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def job(prompt: str = "an otter", n: int = 1, size: tuple[int, int] = (64, 64), **fields) -> ImageJob:
    return ImageJob(prompt=prompt, n=n, width=size[0], height=size[1], steps=2, **fields)


@pytest.fixture(scope="module")
def model(models_dir: Path) -> ImageModel:
    """The deployment's own class, built without Ray."""
    config = ImageModelConfig(name=IMAGE, path=str(models_dir / "tiny-sd"), default_steps=2)
    return ImageModel.func_or_class(config)


def calls_for(model: ImageModel, jobs: list[ImageJob]) -> tuple[list, int]:
    """Run one batch; return its outcomes and how many pipeline calls it took."""
    before = model.stats()["pipeline_calls"]
    outcomes = model.run_jobs(jobs)
    return outcomes, model.stats()["pipeline_calls"] - before


def test_mixed_batch_gives_each_job_its_own_images(model):
    jobs = [job("a", n=2), job("b", n=1, size=(96, 64)), job("c", n=3, seed=1),
            job("d", n=2, init_image=png_bytes("red"), strength=0.5), job("e", n=1, size=(96, 64), seed=2)]
    outcomes, calls = calls_for(model, jobs)
    assert calls == 3  # 64x64 text-to-image, 96x64 text-to-image, 64x64 edit
    for item, outcome in zip(jobs, outcomes):
        assert isinstance(outcome, ImageResult)
        assert len(outcome.images) == item.n
        assert {Image.open(io.BytesIO(png)).size for png in outcome.images} == {(item.width, item.height)}


def test_negative_prompt_presence_splits_groups(model):
    _, calls = calls_for(model, [job("a"), job("b", negative_prompt="blurry"), job("c", negative_prompt="dark")])
    assert calls == 2


@pytest.mark.parametrize("extra", [{}, {"init_image": png_bytes("blue"), "strength": 0.5}], ids=["t2i", "i2i"])
def test_seeded_job_same_alone_and_batched(model, extra):
    seeded = job("a seeded otter", n=2, seed=1234, **extra)
    [alone] = model.run_jobs([seeded])
    others = [job("x", n=3, **extra), job("y", n=1, seed=7, **extra)]
    outcomes, calls = calls_for(model, [others[0], seeded, others[1]])
    assert calls == 1
    batched = outcomes[1]
    assert len(alone.images) == len(batched.images) == 2
    for a, b in zip(alone.images, batched.images, strict=True):
        assert_same_image(a, b)
    # Each image has its own generator: the two images of the job differ, and so does another seed.
    [other_seed] = model.run_jobs([job("a seeded otter", n=1, seed=99, **extra)])
    assert np.abs(pixels(alone.images[0]) - pixels(alone.images[1])).mean() > 1
    assert np.abs(pixels(alone.images[0]) - pixels(other_seed.images[0])).mean() > 1


def test_every_bit_of_an_image_seed_counts(model):
    """Seeds 2**32 apart (which torch's CPU generator would take alike) make different images;
    the second image of seed s is the first of seed s + 1."""
    [pair] = model.run_jobs([job("an otter", n=2, seed=2**40)])
    [next_seed, far_seed] = model.run_jobs([job("an otter", n=1, seed=2**40 + 1), job("an otter", n=1, seed=2**40 + 2**32)])
    assert_same_image(pair.images[1], next_seed.images[0])
    assert np.abs(pixels(pair.images[0]) - pixels(far_seed.images[0])).mean() > 1


def test_an_edit_runs_at_least_one_step_whatever_its_strength(model):
    """An edit runs int(steps * strength) steps, and 161 * (1 / 161) is 0.999... in floating point."""
    edit = job("a", init_image=png_bytes("red"), strength=1 / 161)
    assert int(edit.pipeline_steps * edit.strength) == 1
    [result] = model.run_jobs([edit])
    assert isinstance(result, ImageResult) and len(result.images) == 1


def test_bad_job_fails_alone(model):
    good = [job("a", n=2, init_image=png_bytes("red"), strength=0.5), job("b", n=1)]
    bad = job("c", n=1, init_image=b"not an image", strength=0.5)
    bad_mask = job("d", n=1, init_image=png_bytes("red"), mask_image=b"nope", strength=0.5)
    outcomes, calls = calls_for(model, [good[0], bad, good[1], bad_mask])
    assert calls == 2
    assert isinstance(outcomes[1], InvalidRequest) and outcomes[1].param == "image"
    assert isinstance(outcomes[3], InvalidRequest) and outcomes[3].param == "mask"
    assert [len(outcomes[0].images), len(outcomes[2].images)] == [2, 1]


def test_a_job_whose_images_cannot_be_encoded_fails_alone(model):
    """Same pipeline call, formats chosen per job: one encoder failing leaves the others' images whole."""
    unencodable = job("b", n=2, output_format="no-such-format")
    outcomes, calls = calls_for(model, [job("a", output_format="jpeg"), unencodable, job("c", n=2)])
    assert calls == 1 and isinstance(outcomes[1], KeyError) and "NO-SUCH-FORMAT" in str(outcomes[1])  # Pillow's
    assert [Image.open(io.BytesIO(i)).format for o in (outcomes[0], outcomes[2]) for i in o.images] == ["JPEG", "PNG", "PNG"]


def test_a_request_cancelled_once_queued_is_not_made(model, monkeypatch):
    """A caller cancelled after Serve's batcher queued its job (the batcher itself drops those
    cancelled before) still has its job dropped before the pipeline call. Serve's batcher
    (which needs a replica) is stood in for by one that queues the job at once and then
    lingers: the moment between queueing and waiting for the outcome, widened."""
    gate = threading.Event()

    async def queue_then_linger(arrival):
        futures = model.submit([arrival[0]], [arrival[1]], *([list(arrival[2:])] if arrival[2:] else []))  # its future, if given
        await asyncio.sleep(30)
        return futures[0]

    queue_then_linger.set_max_batch_size = lambda size: None  # Serve's batcher's setters
    queue_then_linger.set_batch_wait_timeout_s = lambda seconds: None
    monkeypatch.setattr(model, "_queue_batch", queue_then_linger)
    model._worker.submit(gate.wait)  # the worker is busy, as during a pipeline call
    before = model.stats()["requests"]

    async def run():
        request = asyncio.ensure_future(model.generate(job("for nobody")))
        async with asyncio.timeout(10):
            while not model.queued:
                await asyncio.sleep(0.01)
        request.cancel()
        return await asyncio.gather(request, return_exceptions=True)

    try:
        [outcome] = asyncio.run(run())
    finally:
        gate.set()
    assert isinstance(outcome, asyncio.CancelledError)
    model._worker.submit(lambda: None).result(timeout=60)  # the queued run has run
    assert model.stats()["requests"] == before and not model.queued


def test_batches_queued_during_a_call_share_the_next_one(model):
    """Serve's batches that arrive while the worker is busy merge; a cancelled caller drops out."""
    gate = threading.Event()
    model._worker.submit(gate.wait)  # the worker is busy, as during a pipeline call
    try:
        before = model.stats()
        futures = [future for jobs in ([job("a")], [job("b", n=2)], [job("c"), job("d", n=3)])
                   for future in model.submit(jobs)]
        assert futures[0].cancel()
        time.sleep(0.2)  # they wait: their queue time
    finally:
        gate.set()  # else the module's model is blocked for every later test
    outcomes = [future.result(timeout=300) for future in futures[1:]]
    assert [len(outcome.images) for outcome in outcomes] == [2, 1, 3]
    after = model.stats()
    assert (after["pipeline_calls"] - before["pipeline_calls"], after["requests"] - before["requests"]) == (1, 3)
    # The metrics Ray gets at the next flush: the 3 requests waited, shared a call, and it took time.
    assert all(waited >= 0.2 for waited in model.metrics.values["image_queue_time_seconds", (IMAGE,)][-3:])
    assert model.metrics.values["image_batch_requests", (IMAGE,)][-1] == 3
    assert model.metrics.values["image_batch_seconds", (IMAGE,)][-1] > 0


def test_batch_size_one_runs_each_request_alone(model, monkeypatch):
    """`max_batch_size: 1` bypasses Serve's batch queue; a client's bad image is answered as the
    error (not raised: Serve would log it as a failed request), other failures are raised."""
    monkeypatch.setattr(model, "config", model.config.model_copy(update={"max_batch_size": 1}))
    before = model.stats()
    queued = len(model.metrics.values["image_queue_time_seconds", (IMAGE,)])
    result = asyncio.run(model.generate(job("a", n=2)))
    assert len(result.images) == 2 and model.stats()["pipeline_calls"] == before["pipeline_calls"] + 1
    assert len(model.metrics.values["image_queue_time_seconds", (IMAGE,)]) == queued + 1  # its wait, timed
    refused = asyncio.run(model.generate(job("b", init_image=b"junk")))
    assert isinstance(refused, InvalidRequest) and refused.param == "image"
    with pytest.raises(Exception, match="no-such-format|NO-SUCH-FORMAT"):
        asyncio.run(model.generate(job("c", output_format="no-such-format")))


# ------------------------------------------------------------------ through the server


def test_channels_last_leaves_3d_convolutions_as_they_are():
    """Qwen-Image's VAE is built of 3-D convolutions, whose 5-D weights torch refuses to put in
    channels-last layout: with `channels_last: true` (the default) the replica failed to start."""
    import torch
    from diffusers import AutoencoderKLQwenImage

    from serve_app.image_model import to_channels_last

    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False])
    assert to_channels_last(vae) is False
    conv = torch.nn.Conv2d(3, 4, 3)
    assert to_channels_last(conv) is True and conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_concurrent_requests_share_pipeline_calls(http):
    from ray import serve

    stats = serve.get_deployment_handle(f"model_{IMAGE}", "serve_app").stats

    def generate(n: int, seed: int | None = None) -> list[bytes]:
        response = http.post("/v1/images/generations", json={
            "model": IMAGE, "prompt": f"otter {n}", "n": n, "size": "64x64", "steps": 2, "seed": seed,
            "response_format": "b64_json"})
        assert response.status_code == 200, response.text
        return [base64.b64decode(item["b64_json"]) for item in response.json()["data"]]

    alone = generate(2, seed=42)
    before = stats.remote().result()
    requests = [(1, None), (2, 42), (1, 5), (2, None), (1, None), (2, 6)]
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda args: generate(*args), requests))
    after = stats.remote().result()

    for (n, _), images in zip(requests, results):
        assert len(images) == n
        assert {Image.open(io.BytesIO(png)).size for png in images} == {(64, 64)}
    for a, b in zip(alone, results[1], strict=True):
        assert_same_image(a, b)
    assert after["requests"] - before["requests"] == len(requests)
    assert after["images"] - before["images"] == sum(n for n, _ in requests)
    # Requests that queue while a call runs share the next one: at most half as many calls.
    assert after["pipeline_calls"] - before["pipeline_calls"] <= len(requests) // 2, (before, after)


def test_a_batch_waits_only_for_callers_the_replica_has_seen_together(cluster):
    """With a long `batch_wait_timeout_s` (5 s) and room for 8: a lone request starts at once; a
    group of 4 that comes back together is one call of 4, started as soon as the 4 are in, not
    after the timeout; lone callers after the group wait for it at most half a call each (see
    test_batch_gathering for the sizes and waits themselves). 20 steps: half a call is then
    some 100 ms, well above the few ms over which the group's requests arrive."""
    import httpx
    from ray import serve

    args = cluster.args(route_prefix="/gathering")
    image = next(m for m in args["models"] if m["kind"] == "image")
    image.update(name="gatherer", max_batch_size=8, batch_wait_timeout_s=5.0, default_steps=20)
    image["deployment"]["num_cpus"] = 0.25
    args["models"] = [image]
    try:
        base = cluster.deploy(args, name="gathering_app", route_prefix="/gathering")
        stats = serve.get_deployment_handle("model_gatherer", "gathering_app").stats
        with httpx.Client(base_url=base, timeout=60) as http:
            def timed(seed: int) -> float:
                started = time.monotonic()
                response = http.post("/v1/images/generations", json={
                    "model": "gatherer", "prompt": "otter", "size": "64x64", "seed": seed, "response_format": "b64_json"})
                assert response.status_code == 200, response.text
                return time.monotonic() - started

            def group(seeds: range) -> list[float]:
                barrier = threading.Barrier(len(seeds))

                def one(seed: int) -> float:
                    barrier.wait()
                    return timed(seed)
                with ThreadPoolExecutor(len(seeds)) as pool:
                    return list(pool.map(one, seeds))

            assert timed(1) < 3  # alone: no 5 s wait for company
            group(range(10, 14))  # a first group: the replica learns its size
            before = stats.remote().result()
            took = group(range(20, 24))
            after = stats.remote().result()
            assert max(took) < 3, took
            assert after["pipeline_calls"] - before["pipeline_calls"] == 1, (before, after)
            assert after["largest_call_requests"] == 4
            lone = [timed(30 + i) for i in range(3)]
            assert max(lone) < 3, lone
    finally:
        serve.delete("gathering_app")


def sideways_jpeg(size: tuple[int, int] = (80, 48)) -> bytes:
    """A photo as a phone stores it: pixels landscape, EXIF orientation 6 (turn 90° to view)."""
    image, exif = Image.new("RGB", size, "green"), Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def test_a_sideways_photo_is_edited_upright():
    from serve_app.image_check import inspect_image
    from serve_app.image_pixels import open_image

    data = sideways_jpeg()
    assert (inspect_image(data, param="image").width, inspect_image(data, param="image").height) == (48, 80)
    assert open_image(data, param="image").size == (48, 80)


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP", "PNG raw profile"])
def test_a_photo_turned_by_xmp_alone_is_sized_and_turned_alike(image_format):
    """An orientation given only in XMP (`tiff:Orientation`, which Pillow honours): the ingress
    sized the edit as stored while the replica turned the picture, squashing it (and a mask
    drawn for the upright picture was refused)."""
    from PIL import PngImagePlugin

    from serve_app.image_check import inspect_image
    from serve_app.image_pixels import open_image

    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    image, buffer = Image.new("RGB", (80, 48), "green"), io.BytesIO()
    image.paste((255, 0, 0), (0, 0, 10, 48))  # a red left edge: the top once turned upright
    if image_format == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", xmp)
        image.save(buffer, "PNG", pnginfo=info)
    elif image_format == "PNG raw profile":  # EXIF as ImageMagick writes it into a PNG: a hex text chunk
        exif = Image.Exif()
        exif[0x0112] = 6
        raw = b"Exif\x00\x00" + exif.tobytes()
        info = PngImagePlugin.PngInfo()
        info.add_text("Raw profile type exif", f"\nexif\n{len(raw):8d}\n{raw.hex()}\n")
        image.save(buffer, "PNG", pnginfo=info)
    else:
        image.save(buffer, image_format, xmp=xmp.encode())
    data = buffer.getvalue()
    checked, opened = inspect_image(data, param="image"), open_image(data, param="image")
    assert (checked.width, checked.height) == opened.size == (48, 80)
    assert opened.convert("RGB").getpixel((24, 2))[0] > 200  # turned, not stretched: red on top


def broken_exif(image_format: str) -> bytes:
    """A 64x48 picture whose EXIF block is not TIFF (as some editors and metadata strippers leave it)."""
    buffer, junk = io.BytesIO(), b"GARBAGE!"
    if image_format == "PNG":  # an eXIf chunk of junk, right after the header
        Image.new("RGB", (64, 48), "green").save(buffer, "PNG")
        data = buffer.getvalue()
        chunk = b"eXIf" + junk
        return data[:33] + struct.pack(">I", len(junk)) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]
    Image.new("RGB", (64, 48), "green").save(buffer, "JPEG", dpi=(72, 72))  # JFIF, then an APP1 "Exif" of junk
    data, segment = buffer.getvalue(), b"Exif\x00\x00" + junk
    return data[:20] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + data[20:]


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_a_broken_exif_block_is_read_as_no_orientation_not_a_server_fault(image_format):
    from serve_app.image_check import inspect_image
    from serve_app.image_pixels import open_image

    data = broken_exif(image_format)
    assert "exif" in Image.open(io.BytesIO(data)).info  # Pillow sees the block, which is not TIFF
    checked = inspect_image(data, param="image")
    assert (checked.width, checked.height) == open_image(data, param="image").size == (64, 48)


def test_options_a_pipeline_does_not_take_are_left_out_or_refused(model, monkeypatch):
    """diffusers' families take different options (a FLUX Kontext edit has no `strength`, FLUX.2
    no `negative_prompt`): what a pipeline lacks is not passed, and a negative prompt it cannot
    use is a 400, not a TypeError."""
    real = model.pipelines["i2i"]
    seen: list[set[str]] = []

    def no_strength(prompt, image, num_inference_steps, height, width, generator, output_type):
        seen.append({"prompt", "image", "height"})
        return real(prompt=prompt, image=image, num_inference_steps=num_inference_steps, height=height,
                    width=width, generator=generator, output_type=output_type, strength=1.0)

    monkeypatch.setitem(model.pipelines, "i2i", no_strength)
    [edited, refused] = model.run_jobs([job("a", init_image=png_bytes("red"), strength=0.5),
                                        job("b", init_image=png_bytes("red"), negative_prompt="blurry")])
    assert isinstance(edited, ImageResult) and len(edited.images) == 1 and seen
    assert isinstance(refused, InvalidRequest) and refused.param == "negative_prompt"
    # Its edits share a call whatever strengths they ask (it takes none).
    seen.clear()
    assert all(isinstance(outcome, ImageResult) for outcome in model.run_jobs([
        job("c", init_image=png_bytes("red"), strength=0.5), job("d", init_image=png_bytes("red"), strength=0.9)]))
    assert len(seen) == 1


def test_images_the_safety_checker_blanks_fail_their_request_alone(model, monkeypatch):
    """Stable Diffusion 1.x/2.x checkpoints ship a safety checker that blacks out what it flags;
    that request gets a 400 content_policy_violation, not a black image; its batch-mates their images."""
    real = model.pipelines["t2i"]

    def checked(**arguments):
        output = real(**arguments)
        output.nsfw_content_detected = [prompt == "flag me" for prompt in arguments["prompt"]]
        return output

    monkeypatch.setitem(model.pipelines, "t2i", checked)
    fine, flagged = model.run_jobs([job("fine", n=2), job("flag me")])
    assert isinstance(fine, ImageResult) and len(fine.images) == 2
    assert isinstance(flagged, InvalidRequest) and flagged.code == "content_policy_violation"


def test_images_that_overflowed_fail_their_request_alone_not_as_black_pictures(model, monkeypatch):
    """In float16 a checkpoint can overflow and decode NaN, which as a picture is black: that
    request gets a 500 saying what to set (model_output_not_a_number), its batch-mates their images."""
    real = model.pipelines["t2i"]

    def overflowing(**arguments):
        output = real(**arguments)
        for index, prompt in enumerate(arguments["prompt"]):
            if prompt == "overflow":
                output.images[index][:8, :8] = np.nan  # what a float16 overflow decodes to
        return output

    monkeypatch.setitem(model.pipelines, "t2i", overflowing)
    fine, overflowed = model.run_jobs([job("fine", n=2), job("overflow")])
    assert isinstance(fine, ImageResult) and len(fine.images) == 2
    assert pixels(fine.images[0]).std() > 0  # a real picture, not a blank one
    assert (overflowed.status_code, overflowed.code) == (500, "model_output_not_a_number") and "dtype" in str(overflowed)


def test_a_text_only_model_refuses_edits(model, monkeypatch):
    monkeypatch.setitem(model.pipelines, "i2i", None)
    monkeypatch.setitem(model.pipelines, "inpaint", None)
    [refused] = model.run_jobs([job("a", init_image=png_bytes("red"))])
    assert isinstance(refused, InvalidRequest) and refused.param == "image"


def test_a_model_without_inpainting_refuses_a_mask_and_edits_without_one(model, monkeypatch):
    monkeypatch.setitem(model.pipelines, "inpaint", None)
    masked, plain = model.run_jobs([job("a", init_image=png_bytes("red"), mask_image=png_bytes("white")),
                                    job("a", init_image=png_bytes("red"))])
    assert isinstance(masked, InvalidRequest) and (masked.param, str(masked)) == ("mask", "this model does not support masks")
    assert isinstance(plain, ImageResult) and len(plain.images) == 1  # an image-to-image edit


def test_a_model_whose_sides_are_multiples_of_16_needs_that_grid(monkeypatch, models_dir):
    # A model whose sides must be multiples of 16 (SD3, FLUX) with the default grid of 8 fails
    # to start, saying what to set, rather than answering odd sizes with a pipeline error.
    monkeypatch.setattr("serve_app.image_model.pixel_multiple", lambda pipeline: 16)
    with pytest.raises(ValueError, match="set size_multiple: 16"):
        ImageModel.func_or_class(ImageModelConfig(name=IMAGE, path=str(models_dir / "tiny-sd")))


def test_a_batch_out_of_gpu_memory_runs_each_request_alone(model, monkeypatch):
    """Together the requests' images do not fit; each alone does, and gets its own images."""
    import torch

    real = model.call_pipeline
    calls: list[int] = []

    def call_pipeline(group):
        calls.append(len(group))
        if len(group) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(group)

    monkeypatch.setattr(model, "call_pipeline", call_pipeline)
    counted = ("model_failures", (model.config.name, "out_of_memory"))
    failures = model.metrics.sums[counted]
    outcomes = model.run_jobs([job("a", n=2), job("b", n=1)])
    assert calls == [2, 1, 1]
    assert [len(outcome.images) for outcome in outcomes] == [2, 1]
    assert model.metrics.sums[counted] == failures + 1  # the call that ran out, for an operator's alerts


def inpainting_checkpoint(models_dir: Path, folder: Path) -> Path:
    """The tiny Stable Diffusion as an inpainting checkpoint (a 9-channel UNet), saved in `folder`."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel

    parts = StableDiffusionPipeline.from_pretrained(models_dir / "tiny-sd").components
    unet = UNet2DConditionModel.from_config({**parts["unet"].config, "in_channels": 9})
    StableDiffusionInpaintPipeline(**{**parts, "unet": unet}).save_pretrained(folder / "tiny-sd-inpaint")
    return folder / "tiny-sd-inpaint"


def test_an_inpainting_checkpoint_edits_and_refuses_text_to_image(models_dir, tmp_path):
    """A Stable Diffusion inpainting checkpoint (a 9-channel UNet: noise, mask, masked image)
    only inpaints: an edit without a mask repaints the whole image, a generation is a 400
    naming the edit route, rather than a channel-mismatch 500 on every request."""
    inpainting = ImageModel.func_or_class(ImageModelConfig(name=IMAGE, path=str(inpainting_checkpoint(
        models_dir, tmp_path)), default_steps=2))
    assert inpainting.pipelines["t2i"] is None and inpainting.pipelines["i2i"] is None
    mask = io.BytesIO()
    Image.new("L", (64, 64), 255).save(mask, "PNG")
    generated, unmasked, masked = inpainting.run_jobs([
        job("a"), job("b", init_image=png_bytes("red", (64, 64)), strength=0.5),
        job("c", init_image=png_bytes("red", (64, 64)), mask_image=mask.getvalue(), strength=0.5)])
    assert isinstance(generated, InvalidRequest) and "/v1/images/edits" in generated.message
    assert isinstance(unmasked, ImageResult) and isinstance(masked, ImageResult)
    # Without a strength, an unmasked edit keeps the picture as image-to-image does (at 1 it
    # would start from noise, the photo blanked by the all-white mask); a masked one repaints.
    red = png_bytes("red", (64, 64))
    assert inpainting.prepare(job("b", init_image=red)).job.strength == 0.75
    assert inpainting.prepare(job("c", init_image=red, mask_image=mask.getvalue())).job.strength == 1.0


def test_routes_a_checkpoint_cannot_serve_are_refused_at_start_or_warned_of(models_dir, tmp_path, serve_caplog):
    """An inpainting-only checkpoint: configured to serve generations it fails to start, saying
    what to set; left to the default it starts and warns; `routes: [edits]` starts quietly."""
    import logging

    checkpoint = inpainting_checkpoint(models_dir, tmp_path)

    def start(**fields) -> ImageModel:
        return ImageModel.func_or_class(ImageModelConfig(name=IMAGE, path=str(checkpoint), **fields))

    with pytest.raises(ValueError, match=r"cannot serve, generations \(an edit-only.*set routes: \['edits'\]"):
        start(routes=["generations", "edits"])
    with serve_caplog.at_level(logging.WARNING, logger="ray.serve"):
        start()
        start(routes=["edits"])
    [warning] = [r.getMessage() for r in serve_caplog.records if "set routes" in r.getMessage()]
    assert "cannot serve generations" in warning and "['edits']" in warning


def test_a_negative_prompt_turns_on_true_guidance_where_a_pipeline_needs_it(model, monkeypatch):
    """FLUX.1 uses a negative prompt only with `true_cfg_scale` above its default of 1: a
    request's negative prompt gets 4 (or the config's), a request without one nothing."""
    real, passed = model.pipelines["t2i"], []

    def flux_like(prompt, num_inference_steps, height, width, generator, output_type,
                  negative_prompt=None, true_cfg_scale: float = 1.0):
        passed.append(true_cfg_scale)
        return real(prompt=prompt, num_inference_steps=num_inference_steps, height=height, width=width,
                    generator=generator, output_type=output_type, negative_prompt=negative_prompt)

    monkeypatch.setitem(model.pipelines, "t2i", flux_like)
    model.run_jobs([job("a", negative_prompt="blurry"), job("b")])
    assert sorted(passed) == [1.0, 4.0]


def test_a_pipeline_guided_by_default_gets_a_blank_negative_prompt(model, monkeypatch):
    """Qwen-Image's true guidance (its default scale 4) runs only where a negative prompt is
    given: a request without one gets its model card's " ", and shares a call with one that
    gives its own; its guidance is the pipeline's 4."""
    real, passed = model.pipelines["t2i"], []

    def qwen_like(prompt, num_inference_steps, height, width, generator, output_type,
                  negative_prompt=None, true_cfg_scale: float = 4.0):
        passed.append((negative_prompt, true_cfg_scale))
        return real(prompt=prompt, num_inference_steps=num_inference_steps, height=height, width=width,
                    generator=generator, output_type=output_type, negative_prompt=negative_prompt)

    monkeypatch.setitem(model.pipelines, "t2i", qwen_like)
    outcomes, calls = calls_for(model, [job("a", negative_prompt="blurry"), job("b", n=2)])
    assert calls == 1 and passed == [(["blurry", " ", " "], 4.0)]
    assert [len(outcome.images) for outcome in outcomes] == [1, 2]
    # A distilled checkpoint (Qwen-Image-Lightning) runs unguided: true_cfg_scale 1 in its config.
    monkeypatch.setattr(model, "config", model.config.model_copy(update={"true_cfg_scale": 1.0}))
    passed.clear()
    plain, negative = model.run_jobs([job("b"), job("a", negative_prompt="blurry")])
    assert passed == [(None, 4.0)] and len(plain.images) == 1  # no negative prompt: diffusers guides nothing
    assert isinstance(negative, InvalidRequest) and negative.param == "negative_prompt"


def test_the_configured_guidance_scale_reaches_every_call(model, monkeypatch):
    """Turbo checkpoints want guidance 0 (at the pipeline's 7.5 their images burn): the
    config's `guidance_scale` is passed to every call, generation and edit; unset, none is."""
    passed = []
    for mode in ("t2i", "i2i"):
        real = model.pipelines[mode]

        def recording(real=real, **arguments):
            passed.append(arguments.get("guidance_scale"))
            return real(**arguments)
        monkeypatch.setitem(model.pipelines, mode, recording)
    model.run_jobs([job("a")])
    monkeypatch.setattr(model, "config", model.config.model_copy(update={"guidance_scale": 0.0}))
    model.run_jobs([job("b")])
    model.run_jobs([job("c", init_image=png_bytes("red"), strength=0.5)])
    assert passed == [None, 0.0, 0.0]


def test_an_edit_is_guided_as_its_checkpoints_generations(model, monkeypatch):
    """diffusers' FLUX.1 image-to-image defaults to guidance 7.0 where its text-to-image has 3.5:
    with the config silent, an edit runs at the text-to-image pipeline's default."""
    passed = []
    real_t2i, real_i2i = model.pipelines["t2i"], model.pipelines["i2i"]

    def flux_t2i(prompt, num_inference_steps, height, width, generator, output_type, guidance_scale: float = 3.5):
        passed.append(("t2i", guidance_scale))
        return real_t2i(prompt=prompt, num_inference_steps=num_inference_steps, height=height, width=width,
                        generator=generator, output_type=output_type)

    def flux_i2i(prompt, image, strength, num_inference_steps, height, width, generator, output_type,
                 guidance_scale: float = 7.0):
        passed.append(("i2i", guidance_scale))
        return real_i2i(prompt=prompt, image=image, strength=strength, num_inference_steps=num_inference_steps,
                        height=height, width=width, generator=generator, output_type=output_type)

    monkeypatch.setitem(model.pipelines, "t2i", flux_t2i)
    monkeypatch.setitem(model.pipelines, "i2i", flux_i2i)
    model.run_jobs([job("a")])
    model.run_jobs([job("c", init_image=png_bytes("red"), strength=0.5)])
    assert passed == [("t2i", 3.5), ("i2i", 3.5)]
    monkeypatch.setattr(model, "config", model.config.model_copy(update={"guidance_scale": 5.0}))
    model.run_jobs([job("c", init_image=png_bytes("red"), strength=0.5)])
    assert passed[-1] == ("i2i", 5.0)


def test_an_edit_without_strength_gets_its_kind_of_edit_default(model, monkeypatch):
    """OpenAI clients send no strength. A masked edit (a mask, or transparent pixels) repaints
    the masked area from scratch (`default_inpaint_strength`, 1), as OpenAI's edits do; an
    edit without a mask keeps the picture's layout (`default_strength`, 0.75). A strength the
    request gives is used as it is, either way."""
    real, passed = model.pipelines["inpaint"], []

    def recording(**arguments):
        passed.append(arguments["strength"])
        return real(**arguments)

    monkeypatch.setitem(model.pipelines, "inpaint", recording)
    mask = io.BytesIO()
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(mask, "PNG")
    see_through = io.BytesIO()
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(see_through, "PNG")
    red = png_bytes("red", (64, 64))
    masked, transparent, plain, given = (job("a", init_image=red, mask_image=mask.getvalue()),
                                         job("b", init_image=see_through.getvalue()),
                                         job("c", init_image=red), job("d", init_image=red, mask_image=mask.getvalue(),
                                                                       strength=0.5))
    assert [model.prepare(each).job.strength for each in (masked, transparent, plain, given)] == [1.0, 1.0, 0.75, 0.5]
    assert [model.prepare(each).mode for each in (masked, transparent, plain)] == ["inpaint", "inpaint", "i2i"]
    outcomes = model.run_jobs([masked, given])
    assert all(isinstance(outcome, ImageResult) for outcome in outcomes), outcomes
    assert sorted(passed) == [0.5, 1.0]


def rgba_png(alpha: int | Image.Image, size: tuple[int, int] = (64, 64)) -> bytes:
    image = Image.new("RGBA", size, (255, 0, 0, 255))
    image.putalpha(alpha)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_only_what_diffusers_repaints_counts_as_an_edits_mask(model):
    """diffusers binarizes a mask at half, so a pixel is repainted only where alpha is under
    128. A picture that is only translucent (saved at 90% opacity) is edited whole, as an
    opaque one is: read as its own mask it would repaint nothing, the prompt ignored, the
    picture handed back. A mask that marks no pixel to edit (soft transparency, all black) is
    a 400 naming the mask, rather than that same picture handed back."""
    holed = Image.new("L", (64, 64), 255)
    holed.paste(0, (0, 0, 32, 64))
    assert model.prepare(job(init_image=rgba_png(230))).mode == "i2i"
    cut = model.prepare(job(init_image=rgba_png(holed)))
    assert cut.mode == "inpaint"
    red = png_bytes("red", (64, 64))
    black = io.BytesIO()
    Image.new("L", (64, 64), 0).save(black, "PNG")
    for mask in (rgba_png(200), black.getvalue()):
        with pytest.raises(InvalidRequest, match="the mask marks nothing to edit") as refused:
            model.prepare(job(init_image=red, mask_image=mask))
        assert refused.value.param == "mask"
    soft_hole = Image.new("L", (64, 64), 255)
    soft_hole.paste(100, (0, 0, 32, 64))  # under half: repainted
    assert model.prepare(job(init_image=red, mask_image=rgba_png(soft_hole))).mode == "inpaint"
    # The two prompts make different pictures of the translucent one, as of an opaque one.
    first, second = model.run_jobs([job("a red otter", init_image=rgba_png(230), seed=4),
                                    job("a blue boat at sea", init_image=rgba_png(230), seed=4)])
    assert first.images != second.images


def test_a_blank_negative_prompt_is_none():
    """A form's empty field (or a node's zero value "") is no negative prompt: FLUX.1 would
    otherwise run true guidance (twice the compute) and SDXL drop its zero embeddings."""
    from serve_app.protocol import ImageEditRequest, ImageGenerationRequest

    for request in (ImageGenerationRequest, ImageEditRequest):
        assert request.model_validate({"prompt": "x", "negative_prompt": " "}).negative_prompt is None
        assert request.model_validate({"prompt": "x", "negative_prompt": "blurry"}).negative_prompt == "blurry"


def test_edits_on_a_reference_image_pipeline_run_alone_with_their_own_image(model, monkeypatch):
    """FLUX.2 (and Qwen-Image-Edit-Plus) read a call's `image` list as references for every
    image it makes: two requests' edits in one call would each be conditioned on the other's
    image. Each edit runs alone, its image given once and made `n` times; and such a pipeline
    takes no `strength`, so a small one does not raise the steps run."""
    real, calls = model.pipelines["i2i"], []

    class Flux2Pipeline:  # diffusers' FLUX.2 by name, as the replica recognises it
        def __call__(self, prompt, image, num_inference_steps, height, width, generator, output_type,
                     num_images_per_prompt=1):
            calls.append((prompt, image, num_images_per_prompt, num_inference_steps))
            return real(prompt=prompt, image=image, num_inference_steps=num_inference_steps, height=height,
                        width=width, generator=generator, output_type=output_type,
                        num_images_per_prompt=num_images_per_prompt, strength=1.0)

    monkeypatch.setitem(model.pipelines, "i2i", Flux2Pipeline())
    red, blue = png_bytes("red", (64, 64)), png_bytes("blue", (64, 64))
    outcomes = model.run_jobs([job("a", n=2, init_image=red, strength=0.01, seed=1),
                               job("b", init_image=blue, strength=0.01, seed=2), job("c")])
    assert [len(outcome.images) for outcome in outcomes] == [2, 1, 1]
    assert [(prompt, image.getpixel((0, 0)), n, steps) for prompt, image, n, steps in calls] == [
        ("a", (255, 0, 0), 2, 2), ("b", (0, 0, 255), 1, 2)]


def test_a_16_bit_grayscale_image_keeps_its_levels():
    """Pillow opens a 16-bit grayscale PNG as mode I;16 and its `convert` clips the levels, so
    anything above 255 of 65535 became white; they are scaled to 8 bits instead."""
    from serve_app.image_pixels import open_image, transparency

    levels = np.array([[0, 257 * 50, 30000, 65535]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, "PNG")
    opened = open_image(buffer.getvalue(), param="image")
    assert np.asarray(opened.convert("RGB"))[0, :, 0].tolist() == [0, 50, 117, 255]
    # Its transparent level (a tRNS key) stays transparent, as an 8-bit one does: an edit repaints there.
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, "PNG", transparency=30000)
    keyed = open_image(buffer.getvalue(), param="image")
    assert keyed.mode == "LA" and np.asarray(keyed.getchannel("A"))[0].tolist() == [255, 255, 0, 255]
    assert transparency(keyed) is not None


def test_an_edit_only_family_loads_and_refuses_generations(models_dir, monkeypatch):
    """diffusers has no text-to-image pipeline for an edit family (Qwen-Image-Edit): such a
    checkpoint serves edits and answers a generation with a 400, instead of failing to start;
    one for which diffusers has no pipeline at all fails to start saying so."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

    def no_pipeline(pipeline, **_):
        raise ValueError(f"AutoPipeline can't find a pipeline linked to {type(pipeline).__name__}")

    monkeypatch.setattr(AutoPipelineForText2Image, "from_pipe", no_pipeline)
    config = ImageModelConfig(name=IMAGE, path=str(models_dir / "tiny-sd"), default_steps=2, routes=["edits"])
    editor = ImageModel.func_or_class(config)
    generated, edited = editor.run_jobs([job("a"), job("b", init_image=png_bytes("red"), strength=0.5)])
    assert isinstance(generated, InvalidRequest) and "makes none from text" in generated.message
    assert isinstance(edited, ImageResult) and len(edited.images) == 1
    monkeypatch.setattr(AutoPipelineForImage2Image, "from_pipe", no_pipeline)
    monkeypatch.setattr(AutoPipelineForInpainting, "from_pipe", no_pipeline)
    with pytest.raises(ValueError, match="diffusers has no text-to-image, image-to-image or inpainting pipeline"):
        ImageModel.func_or_class(config)


def test_a_replica_whose_gpu_failed_answers_503_at_once(model, monkeypatch):
    """Until Serve replaces it (after three failed health checks), a replica whose CUDA context
    failed refuses at once with a 503 a client may retry, rather than fail on the GPU."""
    from serve_app.errors import Overloaded

    monkeypatch.setattr(model, "_device_failure", "CUDA error: an illegal memory access")
    refused = asyncio.run(model.generate(job("a")))
    assert isinstance(refused, Overloaded) and refused.code == "replica_failed"


def test_each_denoising_step_counts_as_progress_for_the_stall_check(model, monkeypatch):
    """A pipeline call may take minutes (many steps, a big batch); it is stalled only when a
    step takes `stall_timeout_s`, so each step the pipeline reports is progress."""
    steps: list[int] = []
    monkeypatch.setattr(model._worker, "progressed", lambda: steps.append(1))
    [made] = model.run_jobs([ImageJob(prompt="an otter", n=2, width=64, height=64, steps=3)])
    assert isinstance(made, ImageResult) and len(made.images) == 2
    assert len(steps) == 3 + 1 + 1  # each step, the call's end (decoding), the request's encoded images
    steps.clear()
    [edited] = model.run_jobs([ImageJob(prompt="an otter", n=1, width=64, height=64, steps=4,
                                        init_image=png_bytes("red"), strength=0.5)])
    assert isinstance(edited, ImageResult) and len(steps) == 2 + 1 + 1  # strength 0.5 runs half the steps


def test_a_pipeline_call_whose_caller_left_stops_at_its_next_step(model, monkeypatch):
    """A client that hangs up during its pipeline call frees the worker within a step, rather
    than hold every later request behind a call made for nobody (`max_batch_size: 1`, so
    Serve's batcher, which needs a replica, is not in the way; the batched path shares it)."""
    steps: list[int] = []
    monkeypatch.setattr(model._worker, "progressed", lambda: steps.append(1))
    monkeypatch.setattr(model, "config", model.config.model_copy(update={"max_batch_size": 1}))

    async def run():
        request = asyncio.ensure_future(model.generate(ImageJob(prompt="x", n=1, width=64, height=64, steps=100)))
        async with asyncio.timeout(60):
            while len(steps) < 2:  # the call is under way
                await asyncio.sleep(0.002)
        request.cancel()
        return await asyncio.gather(request, return_exceptions=True)

    [outcome] = asyncio.run(run())
    assert isinstance(outcome, asyncio.CancelledError)
    model._worker.submit(lambda: None).result(timeout=60)  # the worker is free again
    assert 2 <= len(steps) < 50, f"{len(steps)} of 100 steps ran for a caller that had left"
    assert not model.running and not model.abandoned


def leave_at_first_step(leaving: list) -> int:
    """A `progressed` stand-in: at the first step of the first pipeline call, its caller leaves
    (the future marked abandoned, as generate's cancellation marks a future the worker has
    taken), at a known point of the run rather than whenever a polling test thread wakes."""
    while leaving:
        model, future = leaving.pop()
        model.abandoned.add(future)
    return 1


def test_a_pipeline_call_goes_on_while_one_of_its_callers_remains(model, monkeypatch):
    """Two requests share a call; one caller leaves mid-call (generate's cancellation, stood in
    for: its future is already taken, so it is marked abandoned). The other gets its images."""
    gate, steps, leaving = threading.Event(), [], []
    monkeypatch.setattr(model._worker, "progressed", lambda: steps.append(leave_at_first_step(leaving)))
    model._worker.submit(gate.wait)  # busy, so both are queued for one call
    try:
        left, stays = model.submit([ImageJob(prompt=p, n=1, width=64, height=64, steps=20) for p in "ab"])
        leaving.append((model, left))
    finally:
        gate.set()
    assert len(stays.result(timeout=120).images) == 1
    assert not left.cancel()  # it was taken by the worker
    assert len(steps) == 20 + 1 + 2 and not model.abandoned  # every step, the call's end, each encoding


def test_a_group_whose_callers_left_is_not_run_while_another_groups_caller_waits(model, monkeypatch):
    """One run of the worker, two pipeline calls (two sizes). The second call's only caller
    leaves while the first call runs: the first still makes its images, the second never runs."""
    from serve_app.errors import ClientClosedRequest

    gate, steps, leaving = threading.Event(), [], []
    monkeypatch.setattr(model._worker, "progressed", lambda: steps.append(leave_at_first_step(leaving)))
    before = model.stats()["pipeline_calls"]
    model._worker.submit(gate.wait)  # busy, so both are queued for one run
    try:
        stays, leaves = model.submit([ImageJob(prompt="a", n=1, width=64, height=64, steps=20),
                                      ImageJob(prompt="b", n=1, width=96, height=64, steps=20)])
        leaving.append((model, leaves))
    finally:
        gate.set()
    assert len(stays.result(timeout=120).images) == 1
    assert not leaves.cancel()  # it was taken by the worker
    assert isinstance(leaves.result(timeout=60), ClientClosedRequest)
    assert model.stats()["pipeline_calls"] == before + 1 and not model.abandoned
    assert len(steps) == 20 + 1 + 1  # the first call's steps, its end, its encoding: not one step of the second


def test_each_request_is_answered_as_soon_as_its_outcome_is_known(model, monkeypatch):
    """A job refused by `prepare` (an unreadable image) and the jobs of a run's first pipeline
    call are answered before the run's later calls end, not when the whole run is over."""
    gate = threading.Event()
    done_at_each_call: list[list[bool]] = []
    call_pipeline = model.call_pipeline

    def watching(group):
        done_at_each_call.append([future.done() for future in futures])
        return call_pipeline(group)

    monkeypatch.setattr(model, "call_pipeline", watching)
    model._worker.submit(gate.wait)  # busy, so all three are queued for one run
    try:
        futures = model.submit([job("refused", init_image=b"not an image", strength=0.5),
                                job("first", size=(64, 64)), job("second", size=(96, 64))])
    finally:
        gate.set()
    outcomes = [future.result(timeout=120) for future in futures]
    assert isinstance(outcomes[0], InvalidRequest) and [len(o.images) for o in outcomes[1:]] == [1, 1]
    assert done_at_each_call == [[True, False, False], [True, True, False]]


def test_an_image_object_without_image_url_is_told_what_it_gave():
    """`{"url": ...}` (another API's shape) is told it lacks image_url, not about a file_id it never sent."""
    from pydantic import ValidationError

    from serve_app.protocol import ImageEditRequest

    for given, said in (({"url": "http://x"}, "the object given has 'url' but no image_url"),
                        ({"file_id": "f"}, "a file_id names nothing here"), ({}, "the object given is empty")):
        with pytest.raises(ValidationError, match=said):
            ImageEditRequest.model_validate({"prompt": "p", "image": given})
