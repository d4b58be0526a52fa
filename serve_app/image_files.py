"""The HTTP reply for a stored image: Starlette's `FileResponse`, failing as the API fails.

Starlette stats and opens the file again as it answers (one deleted by the retention sweep
in between became a 500, or a reply cut off after its headers), answers a `Range` it cannot
parse with a plain-text 400 and one past the file's end with an empty 416. Here the file the
route opened and its stat are used, a `Range` Starlette cannot parse is ignored, as RFC 9110
lets a server do (the whole image is sent, as nginx sends it), and one past the end is a 416
with the API's JSON error. A conditional GET whose `If-None-Match` names the image's ETag
(a browser or cache that holds it) is a 304 without the image, which Starlette would resend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from anyio import AsyncFile  # at import, not lazily (anyio's default) on the first reply
from starlette.datastructures import Headers
from starlette.responses import FileResponse, MalformedRangeHeader, Response
from starlette.responses import RangeNotSatisfiable as UnsatisfiableRange
from starlette.types import Receive, Scope, Send

from serve_app.errors import RangeNotSatisfiable
from serve_app.http_errors import error_response
from serve_app.image_store import StoredImage


class StoredImageResponse(FileResponse):
    def __init__(self, image: StoredImage, media_type: str) -> None:
        super().__init__(image.path, stat_result=image.stat, media_type=media_type)
        self.file = image.file

    @asynccontextmanager
    async def _open_file(self) -> AsyncIterator[AsyncFile[bytes]]:
        """The file the route opened, not the path opened again (Starlette's hook for opening)."""
        yield AsyncFile(self.file)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._answer(scope, receive, send)
        finally:
            self.file.close()

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        # No `pathsend`: a server sending the file by its path would open it again.
        scope = {**scope, "extensions": {key: value for key, value in scope.get("extensions", {}).items()
                                         if key != "http.response.pathsend"}}
        headers = Headers(scope=scope)
        if _names_etag(headers.get("if-none-match"), self.headers.get("etag")):
            kept = {name: self.headers[name] for name in ("etag", "last-modified") if name in self.headers}
            return await Response(status_code=304, headers=kept)(scope, receive, send)
        requested, if_range = headers.get("range"), headers.get("if-range")
        # Checked as Starlette checks it, when Starlette would use it (a stale If-Range sends the whole file).
        if requested is not None and (if_range is None or self._should_use_range(if_range)):
            size = self.stat_result.st_size
            try:
                self._parse_range_header(requested, size)
            except MalformedRangeHeader:
                scope = {**scope, "headers": [(key, value) for key, value in scope["headers"] if key != b"range"]}
            except UnsatisfiableRange:
                error = RangeNotSatisfiable(f"The requested range starts past the image's end ({size} bytes).",
                                            param="range", headers={"Content-Range": f"bytes */{size}"})
                return await error_response(error)(scope, receive, send)
        await super().__call__(scope, receive, send)


def _names_etag(if_none_match: str | None, etag: str | None) -> bool:
    """Whether an `If-None-Match` list names `etag` (weak comparison, as RFC 9110 has it for
    this header) or is `*`."""
    if not if_none_match or not etag:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag.removeprefix("W/") in tags
