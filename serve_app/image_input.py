"""Input images for edits: fetched from a URL, unpacked from a data: URL, or uploaded.

This runs in the ingress, before any model work: a URL that cannot be fetched
or bytes that are not an image are the client's mistake and get a 400 naming
the parameter, without a model replica ever seeing them. Formats are
recognised from the bytes, never from a declared content type (a network node
re-sends every upload as application/octet-stream).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from dataclasses import dataclass

import httpx
from PIL import Image

from serve_app.config import ImageInputOptions
from serve_app.errors import InvalidRequest, PayloadTooLarge

ACCEPTED_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP"}


@dataclass(frozen=True)
class InputImage:
    data: bytes
    width: int
    height: int


def inspect_image(data: bytes, *, param: str) -> InputImage:
    """Check that bytes are an image of an accepted format; read its size from the header."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            fmt, (width, height) = image.format, image.size
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad input
        raise InvalidRequest(f"{param} is not a readable image.", param=param,
                             code="invalid_image") from exc
    if fmt not in ACCEPTED_FORMATS:
        raise InvalidRequest(f"{param} is a {fmt} image; accepted formats are "
                             f"{', '.join(sorted(ACCEPTED_FORMATS))}.", param=param, code="invalid_image")
    return InputImage(data=data, width=width, height=height)


class ImageFetcher:
    """Turns an `image` / `mask` string into bytes, within a size cap and a timeout."""

    def __init__(self, options: ImageInputOptions) -> None:
        self.options = options
        self.max_bytes = options.max_bytes
        self._client = httpx.AsyncClient(timeout=options.timeout_s, follow_redirects=True,
                                         headers={"User-Agent": "serve_app-image-fetch"})

    async def load(self, source: str, *, param: str) -> InputImage:
        source = source.strip()
        if source.startswith("data:"):
            data = self._from_data_url(source, param=param)
        elif source.startswith(("http://", "https://")):
            data = await self._download(source, param=param)
        else:
            raise InvalidRequest(f"{param} must be an http(s) URL, a data: URL or an uploaded file.",
                                 param=param, code="invalid_image_url")
        return await asyncio.to_thread(inspect_image, data, param=param)

    def check_upload(self, data: bytes, *, param: str) -> InputImage:
        """An uploaded file: same size cap and checks as a fetched one. Blocking (PIL)."""
        if len(data) > self.max_bytes:
            raise self._too_large(param)
        return inspect_image(data, param=param)

    def _too_large(self, param: str) -> PayloadTooLarge:
        return PayloadTooLarge(f"{param} is larger than {self.max_bytes} bytes.", param=param)

    def _from_data_url(self, source: str, *, param: str) -> bytes:
        header, _, payload = source.partition(",")
        if not header.endswith(";base64"):
            raise InvalidRequest(f"{param} data: URLs must be base64 encoded.", param=param,
                                 code="invalid_image_url")
        if len(payload) * 3 // 4 > self.max_bytes:
            raise self._too_large(param)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequest(f"{param} is not valid base64.", param=param,
                                 code="invalid_image_url") from exc

    async def _download(self, url: str, *, param: str) -> bytes:
        try:
            async with self._client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise InvalidRequest(f"Fetching {param} answered HTTP {response.status_code}.",
                                         param=param, code="invalid_image_url")
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise self._too_large(param)
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as exc:
            raise InvalidRequest(f"Could not fetch {param} from its URL.", param=param,
                                 code="invalid_image_url") from exc
