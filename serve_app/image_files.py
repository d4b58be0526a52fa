"""The HTTP reply for a stored image: Starlette's `FileResponse`, failing as the API fails.

Starlette stats the file again as it answers (one deleted by the retention sweep in
between became a 500), answers a `Range` it cannot parse with a plain-text 400 and one
past the file's end with an empty 416. Here the route's own stat is used, a `Range`
Starlette cannot parse is ignored, as RFC 9110 lets a server do (the whole image is
sent, as nginx sends it), and one past the end is a 416 with the API's JSON error.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.datastructures import Headers
from starlette.responses import FileResponse, MalformedRangeHeader
from starlette.responses import RangeNotSatisfiable as UnsatisfiableRange
from starlette.types import Receive, Scope, Send

from serve_app.errors import RangeNotSatisfiable
from serve_app.http_errors import error_response


class StoredImageResponse(FileResponse):
    def __init__(self, path: Path, stat_result: os.stat_result, media_type: str) -> None:
        super().__init__(path, stat_result=stat_result, media_type=media_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
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
