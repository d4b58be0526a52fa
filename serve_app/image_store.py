"""Where generated images live, and the URLs clients fetch them from.

Images are written by the ingress (replicas hand back encoded PNG, JPEG or WebP bytes), to a file
with an unguessable name, via a temporary file that is flushed to disk and
then renamed, so that a reader never sees half an image and a crash never
leaves one under a real name. The files route only accepts names of the shape
this store makes, so a request cannot reach outside the folder.

Retention keeps the folder from filling the disk: `sweep` deletes images
older than `max_age_s`, then the oldest until the folder is under
`max_total_bytes`, and the leftovers of writes that died half way.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import secrets
import stat
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from serve_app.config import ImageRetentionOptions
from serve_app.errors import NotFound
from serve_app.periodic import every
from serve_app import routes

logger = logging.getLogger("ray.serve")

_NAME = re.compile(r"[A-Za-z0-9_-]{16,64}\.(png|jpeg|webp)")  # fullmatch: no trailing newline
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
TEMP_PREFIX = ".tmp-"
NOT_AN_IMAGE_HERE = frozenset({errno.ENOENT, errno.ENXIO, errno.EACCES, errno.EPERM, errno.ELOOP,
                               errno.ENOTDIR, errno.EISDIR})
"""Why opening a name may fail where this store holds no readable image of that name (404)."""
MAX_STORED_URL_CHARS = 4096
"""Longer than any URL of a stored image (a base URL, the files route, a 28-character name)."""
TEMP_GRACE_S = 60.0  # a temp file this old belongs to no write in progress


@dataclass(frozen=True)
class StoredImage:
    """An image found by its name: open, so that it can be sent whole even if swept meanwhile."""

    path: Path
    file: BinaryIO
    stat: os.stat_result


@dataclass(frozen=True)
class _Entry:
    path: Path
    size: int
    mtime: float


class ImageStore:
    def __init__(self, directory: str, public_base_url: str,
                 retention: ImageRetentionOptions | None = None) -> None:
        """`retention` None keeps images forever (sweeps still clear dead temp files)."""
        self.directory = Path(directory).resolve()
        self.public_base_url = public_base_url.rstrip("/")
        self.retention = retention
        self.directory.mkdir(parents=True, exist_ok=True)

    def save(self, data: bytes, extension: str = "png") -> str:
        """Store one image (`extension`: png, jpeg or webp) atomically and durably; returns its file
        name. Blocking: call off the event loop."""
        if extension not in MEDIA_TYPES:
            raise ValueError(f"not an image extension: {extension!r}")
        name = f"{secrets.token_urlsafe(18)}.{extension}"  # 144 random bits
        try:
            handle, temp_path = tempfile.mkstemp(dir=self.directory, prefix=TEMP_PREFIX, suffix=f".{extension}")
        except FileNotFoundError:  # the folder was deleted under the running server (a cleanup): made again
            self.directory.mkdir(parents=True, exist_ok=True)
            handle, temp_path = tempfile.mkstemp(dir=self.directory, prefix=TEMP_PREFIX, suffix=f".{extension}")
        try:
            # mkstemp makes it 0600: readable as other files are (a web server serving image_dir,
            # another node's user), as the URL makes it public anyway. Where the file system
            # keeps no modes (CIFS, vfat) it refuses: the file is still saved.
            with contextlib.suppress(OSError):
                os.fchmod(handle, 0o644)
            with os.fdopen(handle, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())  # the data is on disk before the name points at it
            os.replace(temp_path, self.directory / name)
        except BaseException:
            Path(temp_path).unlink(missing_ok=True)
            raise
        self._sync_directory()
        return name

    def url(self, name: str) -> str:
        return f"{self.public_base_url}{routes.FILES}/{name}"

    @staticmethod
    def media_type(name: str) -> str:
        return MEDIA_TYPES[name.rsplit(".", 1)[-1]]

    def open(self, name: str) -> StoredImage:
        """The file for a name from a URL, opened, with its stat (its size and time, for the
        reply's headers); 404 for anything this store did not make. Opened here, before the reply
        starts, so that a sweep deleting the file meanwhile cannot cut the reply off after its
        headers: an open file is read to its end on POSIX even once unlinked. Blocking."""
        if _NAME.fullmatch(name):
            path = (self.directory / name).resolve()
            if path.parent == self.directory:
                try:  # non-blocking: a FIFO under an image's name must not hang the open
                    handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
                except OSError as exc:  # gone, or not a file anyone may read (a socket: ENXIO; EACCES)
                    if exc.errno not in NOT_AN_IMAGE_HERE:
                        raise  # out of file descriptors, a disk error: the server's fault, not a missing image
                else:
                    info = os.fstat(handle)
                    if stat.S_ISREG(info.st_mode):
                        return StoredImage(path, os.fdopen(handle, "rb"), info)
                    os.close(handle)
        raise NotFound(f"No image named {name!r}.", param="name", code="file_not_found")

    @staticmethod
    def named_in(url: str) -> str | None:
        """The image name an http(s) URL or a bare path of the files route names (under any
        host and route prefix), else None. Names are 144 random bits: one this store holds
        was made here, whichever address the client reached the server by."""
        url = url.strip()
        # A data: URL (megabytes) names no stored image, nor does anything longer than this
        # store's URLs; urlsplit would also keep the last 128 URLs it parsed in its cache.
        if len(url) > MAX_STORED_URL_CHARS or url[:5].lower() == "data:":
            return None
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError:  # "http://[::1/x.png": the fetcher says what is wrong with it
            return None
        head, _, name = parts.path.rpartition("/")
        if parts.scheme.lower() in ("http", "https", "") and head.endswith(routes.FILES) and _NAME.fullmatch(name):
            return name
        return None

    def read(self, name: str) -> bytes | None:
        """A stored image's bytes, or None where this store holds no such image. Blocking."""
        try:
            found = self.open(name)
        except NotFound:
            return None
        with found.file:
            return found.file.read()

    def sweep(self, now: float | None = None) -> int:
        """Enforce retention once; returns how many files were deleted. Blocking: call off the event loop.

        Several ingress replicas may sweep the same folder at once, and files
        may vanish under a sweep: a file already gone is simply not counted. A file it may not
        delete is logged and skipped: being the oldest, it would otherwise stop every sweep.
        """
        now = time.time() if now is None else now
        images, temps = self._scan()
        images.sort(key=lambda entry: entry.mtime)
        deleted, failures = 0, []

        def delete(entry: _Entry) -> bool:
            """Whether the file is gone now (deleted here, or already)."""
            nonlocal deleted
            try:
                entry.path.unlink()
            except FileNotFoundError:
                return True
            except OSError as exc:  # one file it may not delete (a shared folder) stops no other
                failures.append(exc)
                return False
            deleted += 1
            return True

        for entry in temps:
            if entry.mtime < now - TEMP_GRACE_S:
                delete(entry)
        if self.retention is not None and self.retention.max_age_s is not None:
            cutoff = now - self.retention.max_age_s
            images = [entry for entry in images if entry.mtime >= cutoff or not delete(entry)]
        if self.retention is not None and self.retention.max_total_bytes is not None:
            total = sum(entry.size for entry in images)
            for entry in images:  # oldest first; one that stays still takes its room
                if total <= self.retention.max_total_bytes:
                    break
                if delete(entry):
                    total -= entry.size
        if failures:
            logger.warning("image retention could not delete %d file(s) from %s, first: %s",
                           len(failures), self.directory, failures[0])
        return deleted

    async def sweep_forever(self) -> None:
        """Run `sweep` off the event loop now and every `sweep_interval_s` until cancelled;
        a failure (a full or read-only disk) is logged and the next sweep still runs."""
        interval = self.retention.sweep_interval_s if self.retention else ImageRetentionOptions().sweep_interval_s
        await every(interval, self._sweep_off_loop, f"image retention sweep of {self.directory}", at_start=True)

    async def _sweep_off_loop(self) -> None:
        deleted = await asyncio.to_thread(self.sweep)
        if deleted:
            logger.info("image retention deleted %d file(s) from %s", deleted, self.directory)

    def _scan(self) -> tuple[list[_Entry], list[_Entry]]:
        """Regular files of this store: (images, temporary files). Anything else is left alone."""
        images: list[_Entry] = []
        temps: list[_Entry] = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:  # gone meanwhile, or not ours to read
                    continue
                if not stat.S_ISREG(info.st_mode):
                    continue
                record = _Entry(Path(entry.path), info.st_size, info.st_mtime)
                if _NAME.fullmatch(entry.name):
                    images.append(record)
                elif entry.name.startswith(TEMP_PREFIX):
                    temps.append(record)
        return images, temps

    def _sync_directory(self) -> None:
        """Make the rename itself durable (POSIX); skipped where directories cannot be opened."""
        try:
            handle = os.open(self.directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(handle)
        except OSError:
            pass
        finally:
            os.close(handle)
