"""Whether bytes are an image this server accepts, how large, and which way up.

Used where an edit's images arrive (the ingress checks each before any model work:
bytes that are not an image, or a decompression bomb, are the client's mistake, named by
its parameter) and where the model decodes them (`orientation`, `upright`: turned as the
ingress measured them). Only headers are parsed here; no pixel is decoded.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

from PIL import Image

from serve_app.config import ImageInputOptions
from serve_app.errors import InvalidRequest, PayloadTooLarge
from serve_app.image_structure import check_structure

# Pillow warns once per EXIF entry it skips, each naming its tag: a 786 KB upload whose EXIF
# held 65,535 broken entries wrote 127k lines (12.6 MB) to the log of each process reading it
# (a security review). Its TIFF reader is used here for EXIF only, and a broken EXIF block says
# nothing (`orientation`), so what it warns of is of no use to the operator.
warnings.filterwarnings("ignore", category=UserWarning, module="PIL.TiffImagePlugin")

_DEFAULTS = ImageInputOptions()
ACCEPTED_FORMATS: tuple[str, ...] = tuple(_DEFAULTS.accepted_formats)

EXIF_ORIENTATION = 0x0112
SIDEWAYS = {5, 6, 7, 8}  # orientations that swap width and height (`upright` turns them upright)
UPRIGHT_BY = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
"""How each EXIF orientation is turned upright (as `ImageOps.exif_transpose` turns it)."""
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')  # as Pillow finds it


def orientation(image: Image.Image) -> int:
    """A picture's orientation, from what its header says (EXIF, or a PNG's ImageMagick raw
    profile of it; else XMP's tiff:Orientation, as
    Pillow reads them), before a pixel is decoded; 1 (upright) when it says nothing. The ingress
    sizes an edit by it and the replica turns the picture by it: read the same way in both, an
    image is never sized one way and turned another (a PNG's chunks after its pixels, which
    Pillow reads once it decodes them, are not asked)."""
    turned = None
    with contextlib.suppress(Exception):  # a broken EXIF block says nothing, as a missing one (browsers agree)
        if "exif" in image.info:
            turned = image.getexif().get(EXIF_ORIENTATION)
        elif "Raw profile type exif" in image.info:  # ImageMagick's PNG text chunk: hex, after three header lines
            exif = Image.Exif()
            exif.load(bytes.fromhex("".join(image.info["Raw profile type exif"].split("\n")[3:])))
            turned = exif.get(EXIF_ORIENTATION)
    if isinstance(turned, int):
        return turned
    xmp = image.info.get("XML:com.adobe.xmp") or image.info.get("xmp")
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8", "surrogatepass")
    match = _XMP_ORIENTATION.search(xmp) if xmp else None
    return int(match[2]) if match else 1


def upright(image: Image.Image, turned_by: int) -> Image.Image:
    """The decoded picture turned as its header's `orientation` says (a phone's photo is stored sideways)."""
    method = UPRIGHT_BY.get(turned_by)
    return image.transpose(method) if method is not None else image


@dataclass(frozen=True)
class InputImage:
    data: bytes
    width: int
    height: int


# ------------------------------------------------------------------------------ bytes


def inspect_image(data: bytes, *, param: str, accepted_formats: Sequence[str] = ACCEPTED_FORMATS,
                  max_pixels: int = _DEFAULTS.max_pixels) -> InputImage:
    """Check that bytes are an image of an accepted format and not too many pixels.

    Only the header is parsed: the size is read and checked before anything
    else, so a small file claiming 100000x100000 pixels (a decompression bomb)
    is refused without decoding a single pixel. Only the accepted formats'
    parsers are tried, which keeps Pillow's rarer decoders away from strangers.
    """
    check_structure(data, param=param, formats=accepted_formats)  # before Pillow reads a byte of it
    try:
        image = Image.open(io.BytesIO(data), formats=list(accepted_formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(param, max_pixels) from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad input
        raise _unreadable(param, accepted_formats) from exc
    with image:
        width, height = image.size
        # Stored sideways (a phone's photo): the model sees it upright.
        if orientation(image) in SIDEWAYS:
            width, height = height, width
        if width * height > max_pixels:
            raise _too_many_pixels(param, max_pixels)
        try:
            image.verify()  # structure and checksums; does not decode the pixels
        except Exception as exc:  # noqa: BLE001
            raise _unreadable(param, accepted_formats) from exc
    return InputImage(data=data, width=width, height=height)


def _unreadable(param: str, formats: Iterable[str]) -> InvalidRequest:
    return InvalidRequest(f"{param} is not a readable image in an accepted format "
                          f"({', '.join(sorted(formats))}).", param=param, code="invalid_image")


def _too_many_pixels(param: str, max_pixels: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{param} has more than {max_pixels} pixels.", param=param,
                           code="image_too_many_pixels")
