"""The pictures of image requests, in and out: an input decoded upright at 8 bits, its
transparency read as OpenAI's edit mask, a pipeline's output checked and sized, encoded as
the request asks. Pillow and numpy only: no pipeline here.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageOps

from serve_app.errors import InvalidRequest, NotANumber
from serve_app.image_check import orientation, upright

JPEG_WEBP_QUALITY = 90  # when a request gives no `output_compression`


def encode_image(image: Image.Image, output_format: str = "png", quality: int | None = None,
                 png_compress_level: int = 6) -> bytes:
    """PNG (lossless at every level; the level only trades encoding time for size), JPEG or
    WebP at `quality`."""
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG", compress_level=png_compress_level)
    else:
        image.convert("RGB").save(buffer, format=output_format.upper(),
                                  quality=JPEG_WEBP_QUALITY if quality is None else quality)
    return buffer.getvalue()


def open_image(data: bytes, *, param: str) -> Image.Image:
    """An input image, decoded and turned upright as its header says (a phone's photo is
    stored sideways), read as the ingress read it to size the edit (`image_check.orientation`);
    any decoder failure is the client's bad input."""
    try:
        image = Image.open(io.BytesIO(data))
        turned_by = orientation(image)  # from the header, before decoding adds a PNG's late chunks
        image.load()
        return eight_bit(upright(image, turned_by))
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the client's bad input
        raise InvalidRequest(f"{param} is not a readable image", param=param) from exc


def eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (a 16-bit PNG, Pillow's mode I;16 or I) as 8-bit L, its
    levels scaled: Pillow's own `convert` clips them, which turns all but the darkest
    0.4% of the range white. A transparent level (a PNG's tRNS key) stays transparent: as
    LA, its pixels alpha 0 (the 8-bit level alone would no longer tell them apart)."""
    if image.mode not in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        return image
    levels = np.asarray(image).astype(np.int64)
    gray = Image.fromarray((np.clip(levels, 0, 65535) >> 8).astype(np.uint8), mode="L")
    key = image.info.get("transparency")
    if isinstance(key, int) and (levels == key).any():
        gray.putalpha(Image.fromarray(np.where(levels == key, 0, 255).astype(np.uint8), mode="L"))
    return gray


def picture(image: Any, size: tuple[int, int]) -> Image.Image | NotANumber:
    """A pipeline's image (an array of floats in [0, 1], or a picture from a family that makes
    only pictures) at `size`. An array with NaN or inf is the model's overflow, which as a
    picture would be black, answered as a success: its request fails saying so. (The pipeline's
    post-processing clamps inf into range; NaN stays NaN.)"""
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if not np.isfinite(array).all():
            return NotANumber("the image model's output is not numbers (NaN); in float16, checkpoints "
                              "trained in bfloat16 can overflow: set dtype to bfloat16 or float32")
        [image] = VaeImageProcessor.numpy_to_pil(array[None])  # as the pipeline makes its pictures
    return image.resize(size) if image.size != size else image


REPAINTED_FROM = 128
"""diffusers binarizes an inpainting mask at half (its `do_binarize`): a pixel is repainted
where the mask is at least 128, that is where a mask read from alpha has alpha 127 or less."""


def transparency(image: Image.Image) -> Image.Image | None:
    """The alpha channel (mode L) of an image that has at least one transparent pixel, else None
    (no alpha channel, or one that is opaque everywhere, as many editors save)."""
    if not image.has_transparency_data:
        return None
    alpha = image.convert("RGBA").getchannel("A")
    return alpha if alpha.getextrema()[0] < 255 else None


def own_mask(image: Image.Image) -> Image.Image | None:
    """The mask an edit's image makes of its own transparency, as OpenAI reads an image sent
    without a mask: its see-through pixels (alpha under half) are repainted. None where it has
    none: a picture that is only translucent (saved at 90% opacity, a soft vignette) is a
    picture to edit, not a mask that, binarized as diffusers binarizes it, repaints nothing."""
    alpha = transparency(image)
    return None if alpha is None or alpha.getextrema()[0] >= REPAINTED_FROM else ImageOps.invert(alpha)


def paint_mask(image: Image.Image) -> Image.Image:
    """An edit's mask as diffusers takes it (mode L, white = repaint, black = keep).

    OpenAI's rule comes first: where the mask has transparent pixels, those are where to
    edit. A mask without transparency is read as diffusers' own (white repaints), as
    masks drawn for Stable Diffusion are."""
    alpha = transparency(image)
    return image.convert("L") if alpha is None else ImageOps.invert(alpha)


def marks_nothing(mask: Image.Image) -> bool:
    """Whether a mask (as `paint_mask` makes it) repaints no pixel once diffusers binarizes it:
    the edit would hand the picture back as it came."""
    return mask.getextrema()[1] < REPAINTED_FROM


def fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """An input image at the requested (width, height)."""
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)
