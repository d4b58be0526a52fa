"""Where generated images live, and the URLs clients fetch them from.

Images are written by the ingress (replicas hand back PNG bytes), to a file
with an unguessable name, via a temporary file and a rename so that a reader
never sees half an image. The files route only accepts names of the shape
this store makes, so a request cannot reach outside the folder.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from pathlib import Path

from serve_app.errors import NotFound

FILES_ROUTE = "/v1/files/images"
_NAME = re.compile(r"^[A-Za-z0-9_-]{16,64}\.png$")


class ImageStore:
    def __init__(self, directory: str, public_base_url: str) -> None:
        self.directory = Path(directory)
        self.public_base_url = public_base_url.rstrip("/")
        self.directory.mkdir(parents=True, exist_ok=True)

    def save(self, png: bytes) -> str:
        """Store one PNG atomically; returns its file name. Blocking: call off the event loop."""
        name = f"{secrets.token_urlsafe(18)}.png"
        handle, temp_path = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".png")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(png)
            os.replace(temp_path, self.directory / name)
        except BaseException:
            Path(temp_path).unlink(missing_ok=True)
            raise
        return name

    def url(self, name: str) -> str:
        return f"{self.public_base_url}{FILES_ROUTE}/{name}"

    def path(self, name: str) -> Path:
        """The file for a name from a URL; 404 for anything this store did not make."""
        path = self.directory / name
        if not _NAME.match(name) or not path.is_file():
            raise NotFound(f"No image named {name!r}.", param="name", code="file_not_found")
        return path
