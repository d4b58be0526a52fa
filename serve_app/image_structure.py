"""Images whose structure costs far more to read than any real file's, refused before Pillow reads them.

Pillow parses headers and checks chunks in Python, one call per marker, chunk or stray
byte (and decodes a run-length-coded BMP one run at a time): a 20 MiB upload of nothing but tiny JPEG segments, stuffed zeros or empty PNG chunks
held an ingress thread, and the GIL its event loop needs, for 2-4 s, and a JPEG repeating
one tiny scan thousands of times passes Pillow's header check yet takes the model's worker
minutes to decode. These counts run in C (regular expressions) or stop early, and a file
that passes them is one Pillow reads in milliseconds.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Sequence

from serve_app.errors import InvalidRequest

JPEG_START = b"\xff\xd8\xff"  # what Pillow takes for a JPEG
PNG_START = b"\x89PNG\r\n\x1a\n"
GIF_STARTS = (b"GIF87a", b"GIF89a")
MAX_JPEG_SCANS = 100
"""Most scans a JPEG may have: a progressive one has about 10, and each costs a pass over
every pixel when the replica decodes it (a 16-megapixel image repeating one tiny scan
thousands of times is a small file that takes minutes to decode)."""
MAX_JPEG_SEGMENTS = 1000
"""Most markers a JPEG may have before its first picture ends (restart markers inside
coded data not counted): a real file has a few dozen."""
MAX_JPEG_STRAY_BYTES = 64 * 1024
"""Most bytes outside any segment (junk, stuffed zeros, fill) a JPEG may have before its
first scan: a real file has none or a few. Pillow's header parser steps over them one
Python call per byte (3.7 s for 20 MiB)."""
MAX_PNG_CHUNKS = 50_000
"""Most chunks a PNG may have up to its end (IEND): an encoder writes its pixels in
chunks of 8-64 KiB (some in one per row), an animated PNG two per frame. Pillow reads
and checksums each in Python, about 1-2 us apiece (1.6-3.8 s for 20 MiB of empty ones)."""
MAX_GIF_STEPS = 10_000
"""Most blocks and stray bytes a GIF may have before its first picture: an animation's
loop count, a frame's timing, a comment, XMP metadata (which GIF readers step over in
hundreds of small blocks). Pillow reads each with a Python call (4.5 s for 20 MiB of
one-byte blocks)."""
BMP_START = b"BM"
BMP_RLE = (1, 2)
"""The BMP compressions (RLE8, RLE4) Pillow decodes in Python, one loop turn per run."""
MAX_BMP_RLE_PIXELS = 1024 * 1024
"""Largest run-length-coded BMP: one of single-pixel runs costs about 0.2 s per megapixel to
decode (3 s at 4096x4096, on the replica's worker, ahead of every request there)."""
MAX_BMP_RLE_BYTES = 2 * 1024 * 1024
"""Largest run-length-coded BMP file: Pillow's decoder turns once per two bytes whatever they
draw (an end-of-line escape repeated draws nothing), about 0.3 s per 2 MiB."""
# One 0xff, not `\xff+`: a long run of 0xff bytes would make the search backtrack quadratically.
_MARKER = re.compile(rb"\xff([^\x00\xff])")  # a marker, after any junk, stuffed zeros and fill bytes
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # the first marker after coded data (restarts go on)


def check_structure(data: bytes, *, param: str, formats: Sequence[str]) -> None:
    """Refuse (400 `invalid_image`) a JPEG, PNG, BMP or GIF among `formats` (Pillow's ids) that
    costs too much to read; other bytes pass untouched, for Pillow to recognise or refuse."""
    if data[:3] == JPEG_START and "JPEG" in formats:
        jpeg = jpeg_structure(data)
        if jpeg.segments > MAX_JPEG_SEGMENTS or jpeg.stray_bytes > MAX_JPEG_STRAY_BYTES:
            raise _malformed(param, f"a JPEG of more than {MAX_JPEG_SEGMENTS} markers or {MAX_JPEG_STRAY_BYTES} "
                                    "stray bytes before its picture; a photo has a few dozen markers and no "
                                    "stray bytes")
        if jpeg.scans > MAX_JPEG_SCANS:
            raise _malformed(param, f"a JPEG of more than {MAX_JPEG_SCANS} scans; a photo has about 10")
    elif data[:8] == PNG_START and "PNG" in formats and png_chunks(data) > MAX_PNG_CHUNKS:
        raise _malformed(param, f"a PNG of more than {MAX_PNG_CHUNKS} chunks; an image has a few hundred at most")
    elif data[:2] == BMP_START and "BMP" in formats and is_rle_bmp(data) and (
            bmp_pixels(data) > MAX_BMP_RLE_PIXELS or len(data) > MAX_BMP_RLE_BYTES):
        raise _malformed(param, f"a run-length-coded BMP of more than {MAX_BMP_RLE_PIXELS} pixels or "
                                f"{MAX_BMP_RLE_BYTES // 2**20} MiB, which takes seconds to decode; send it as PNG")
    elif data[:6] in GIF_STARTS and "GIF" in formats and gif_steps(data) > MAX_GIF_STEPS:
        raise _malformed(param, f"a GIF of more than {MAX_GIF_STEPS} blocks or stray bytes before its first "
                                "picture; an image has a few dozen")


def is_rle_bmp(data: bytes) -> bool:
    """Whether a BMP is run-length coded (RLE8/RLE4): its info header (40 bytes or more) says so
    at offset 30; the older 12-byte core header has no compression."""
    return (len(data) >= 34 and int.from_bytes(data[14:18], "little") >= 40
            and int.from_bytes(data[30:34], "little") in BMP_RLE)


def bmp_pixels(data: bytes) -> int:
    """A BMP's pixels by its info header (width and height at offsets 18 and 22; a negative
    height: rows top-down)."""
    width = int.from_bytes(data[18:22], "little", signed=True)
    height = int.from_bytes(data[22:26], "little", signed=True)
    return abs(width) * abs(height)


def png_chunks(data: bytes, limit: int = MAX_PNG_CHUNKS) -> int:
    """A PNG's chunks up to and including IEND (what Pillow's `verify` reads), counted up to
    `limit` + 1. Each chunk is 12 bytes plus its stated length, stepped over without a look."""
    pos, chunks, end = len(PNG_START), 0, len(data)
    while pos + 8 <= end and chunks <= limit:
        chunks += 1
        if data[pos + 4:pos + 8] == b"IEND":
            break
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
    return chunks


def gif_steps(data: bytes, limit: int = MAX_GIF_STEPS) -> int:
    """The reads Pillow makes before a GIF's first picture (its image descriptor), counted up
    to `limit` + 1: each extension's sub-blocks and each stray byte between blocks.

    Walked as Pillow walks them (`GifImageFile._seek`), quirks included, or a file could be
    read one way here and another there: after an extension's first sub-block, even an empty
    one, Pillow reads sub-blocks until an empty one (a comment's end at its first empty one),
    and after the NETSCAPE2.0 application block one more before that."""
    end = len(data)
    pos = 13 + (3 << ((data[10] & 7) + 1) if len(data) > 10 and data[10] & 0x80 else 0)  # global palette
    steps = 0

    def sub_block() -> bytes:  # Pillow's `data()`: a length byte, then that many bytes
        nonlocal pos, steps
        steps += 1
        size = data[pos] if pos < end else 0
        block = data[pos + 1:pos + 1 + size]
        pos += 1 + size
        return block

    while pos < end and steps <= limit:
        introducer, label = data[pos], data[pos + 1] if pos + 1 < end else 0
        if introducer in b",;":  # the first picture, or the end
            break
        if introducer != ord("!"):  # a stray byte, skipped
            steps, pos = steps + 1, pos + 1
            continue
        pos += 2
        block = sub_block()
        if label == 0xFE:  # a comment: its sub-blocks up to the first empty one
            while block and steps <= limit:
                block = sub_block()
            continue
        if label == 0xFF and block.startswith(b"NETSCAPE2.0"):
            sub_block()
        while sub_block() and steps <= limit:
            pass
    return steps


class JpegStructure(NamedTuple):
    scans: int
    """Scans (SOS segments) of the first picture, counted up to `MAX_JPEG_SCANS` + 1."""
    segments: int
    """Markers before the first picture ends, counted up to `MAX_JPEG_SEGMENTS` + 1."""
    stray_bytes: int
    """Bytes outside segments before the first scan: what Pillow's header parser steps over one by one."""


def jpeg_structure(data: bytes) -> JpegStructure:
    """What a JPEG's first picture costs to read: its scans, its markers and its stray bytes.

    Markers are found as libjpeg finds them (`next_marker`): stray bytes, stuffed zeros and
    fill bytes before one are skipped, as a decoder skips them, so junk cannot hide the
    scans after it. Segments are stepped over by their length, so bytes inside them (an
    EXIF thumbnail's scans, an ICC profile) are not taken for markers, and counting ends
    at the picture's end (EOI): a phone's second picture or a motion photo's video is not
    counted. In a scan's coded data a 0xff is followed by 0x00 or a restart marker; any
    other marker ends it. The searches are regular expressions, linear in the file's size,
    and stop once a limit is passed."""
    pos, scans, segments, stray, end = 2, 0, 0, 0, len(data)
    while scans <= MAX_JPEG_SCANS:
        found = _MARKER.search(data, pos)
        if not scans:  # up to the next marker, or to the end where none is left
            stray += (found.start() if found else end) - min(pos, end)
        if found is None or stray > MAX_JPEG_STRAY_BYTES:
            break
        marker, pos = found[1][0], found.end()
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:  # millions of tiny segments cost seconds to read
            break
        if marker == 0xD9:  # EOI: the first picture ends, unless it had no scan (a tables-only
            if scans:       # block, which libjpeg passes over to decode the picture after it)
                break
            continue
        # Without a length: TEM, RSTn, SOI, and those below SOF0, which libjpeg skips as junk (in
        # a scan at a restart boundary) or refuses: read as lengths, they would hide what follows.
        if marker < 0xC0 or 0xD0 <= marker <= 0xD8:
            continue
        if pos + 2 > end:
            break
        pos += int.from_bytes(data[pos:pos + 2], "big")
        if marker == 0xDA:
            scans += 1
            if (scan_end := _SCAN_END.search(data, pos)) is None:
                break
            pos = scan_end.start()
    return JpegStructure(scans, segments, stray)


def _malformed(param: str, problem: str) -> InvalidRequest:
    return InvalidRequest(f"{param} is {problem}.", param=param, code="invalid_image")
