"""Hostile image input and image storage, without Ray: the fetcher and the store called directly.

Fetches go to real HTTP servers on 127.0.0.1. Every fetcher here sends through
`LoopbackOnly`, which fails the test instead of letting a request leave for any
other address: a URL the fetcher should have refused can never reach
169.254.169.254 or 10.0.0.1 because of a bug, it fails the test instead.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import ipaddress
import logging
import os
import shutil
import socket
import stat
import ssl
import struct
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, quote, urlparse

import httpx
import pytest
from PIL import Image, ImageFile

from serve_app.config import ImageInputOptions, ImageRetentionOptions
from serve_app.errors import APIError, InvalidRequest, NotFound, PayloadTooLarge
from serve_app.image_check import InputImage, inspect_image
from serve_app.image_input import HostPolicy, ImageFetcher
from serve_app.url_guard import is_forbidden_address
from serve_app.image_store import ImageStore


def image_bytes(size: tuple[int, int] = (40, 30), fmt: str = "PNG", mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose header claims width x height: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


PNG = image_bytes()


# ------------------------------------------------------------------------- a real server


class Handler(BaseHTTPRequestHandler):
    """Routes by path; HTTP/1.0, so a body without Content-Length ends when the connection closes."""

    hits: list[str] = []

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        Handler.hits.append(self.path)
        url = urlparse(self.path)
        route = ROUTES.get(url.path)
        if route is None:
            self.send_error(404)
            return
        route(self, parse_qs(url.query))

    def reply(self, body: bytes, *, status: int = 200, length: int | None = None, **headers: str) -> None:
        self.send_response(status)
        if length is not None:
            self.send_header("Content-Length", str(length))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)


def _redirect(handler: Handler, query: dict[str, list[str]]) -> None:
    handler.reply(b"", status=302, length=0, Location=query["to"][0])


def _chain(handler: Handler, query: dict[str, list[str]]) -> None:
    left = int(query["n"][0])
    if left == 0:
        handler.reply(PNG, length=len(PNG))
    else:
        handler.reply(b"", status=302, length=0, Location=f"/chain?n={left - 1}")


def _drip(handler: Handler, query: dict[str, list[str]]) -> None:
    """Headers at once, then a byte every 0.1 s: no single read is slow, the whole is."""
    handler.reply(b"", length=10_000)
    for _ in range(50):
        handler.wfile.write(b"x")
        handler.wfile.flush()
        time.sleep(0.1)


ROUTES: dict[str, Callable[[Handler, dict[str, list[str]]], None]] = {
    "/ok.png": lambda h, q: h.reply(PNG, length=len(PNG), Content_Type="text/plain"),
    "/text": lambda h, q: h.reply(b"hello, not an image", length=19, Content_Type="image/png"),
    "/missing": lambda h, q: h.reply(b"gone", status=404, length=4),
    "/redirect": _redirect,
    "/chain": _chain,
    "/declared-huge": lambda h, q: h.reply(b"x" * 10, length=10**9),
    "/streamed-huge": lambda h, q: h.reply(b"x" * 50_000),
    "/gzip": lambda h, q: h.reply(zlib.compress(PNG), length=len(zlib.compress(PNG)), Content_Encoding="deflate"),
    "/slow": lambda h, q: (time.sleep(3), h.reply(PNG, length=len(PNG))),
    "/drip": _drip,
}


@pytest.fixture(scope="module")
def origin() -> str:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _clear_hits() -> None:
    Handler.hits.clear()


class LoopbackOnly(httpx.AsyncBaseTransport):
    """The real network, but only to 127.0.0.1; records what was sent."""

    def __init__(self, verify: ssl.SSLContext | bool = True) -> None:
        self.inner = httpx.AsyncHTTPTransport(verify=verify)
        self.sent: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert request.url.host == "127.0.0.1", f"the fetcher tried to connect to {request.url}"
        self.sent.append(request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def fetch(url: str, transport: httpx.AsyncBaseTransport | None = None, **options: Any) -> InputImage:
    async def run() -> InputImage:
        fetcher = ImageFetcher(ImageInputOptions(**options), transport=transport or LoopbackOnly())
        try:
            return await fetcher.load(url, param="image")
        finally:
            await fetcher.aclose()

    return asyncio.run(run())


def expect(error: type[APIError], status: int, code: str, run: Callable[[], Any], param: str = "image") -> APIError:
    with pytest.raises(error) as caught:
        run()
    assert caught.value.status_code == status and caught.value.param == param
    assert caught.value.code == code, caught.value.message
    return caught.value


def forbidden(run: Callable[[], Any]) -> None:
    expect(InvalidRequest, 400, "image_url_forbidden", run)


# ------------------------------------------------------------------------ addresses


@pytest.mark.parametrize("address,refused", [
    ("8.8.8.8", False), ("2606:4700::1111", False), ("127.0.0.1", True), ("127.9.9.9", True),
    ("10.0.0.1", True), ("172.16.0.1", True), ("192.168.1.1", True), ("100.64.0.1", True),
    ("169.254.169.254", True), ("0.0.0.0", True), ("224.0.1.1", True), ("240.0.0.1", True),
    ("255.255.255.255", True), ("::1", True), ("::", True), ("fe80::1", True), ("fd00:ec2::254", True),
    ("ff02::1", True), ("::ffff:127.0.0.1", True), ("::ffff:169.254.169.254", True),
    ("::ffff:8.8.8.8", False), ("64:ff9b::a00:1", True), ("64:ff9b:1:a9fe:a9:fe00:808:808", True), ("fec0::1", True), ("2002:7f00:1::", True), ("2002:808:808::", False),
])
def test_address_classification(address: str, refused: bool) -> None:
    assert is_forbidden_address(ipaddress.ip_address(address)) is refused


def test_allowed_networks_never_reopen_metadata_but_exact_entries_do() -> None:
    policy = HostPolicy(["10.0.0.0/8", "169.254.0.0/16", "images.internal", "[::1]"])
    ip = ipaddress.ip_address
    assert policy.allows("x", ip("10.1.2.3")) and policy.allows("x", ip("169.254.1.1"))
    assert not policy.allows("x", ip("169.254.169.254")) and not policy.allows("x", ip("192.168.0.1"))
    assert policy.allows("Images.Internal.", ip("192.168.0.1")) and policy.allows("::1", ip("::1"))
    assert HostPolicy(["169.254.169.254"]).allows("169.254.169.254", ip("169.254.169.254"))
    wrapping = HostPolicy(["::ffff:0:0/96", "64:ff9b::/96"])  # IPv4 over IPv6: mapped, NAT64
    assert wrapping.allows("x", ip("::ffff:10.0.0.1")) and wrapping.allows("x", ip("64:ff9b::a00:1"))
    assert not wrapping.allows("x", ip("::ffff:169.254.169.254"))
    assert not wrapping.allows("x", ip("64:ff9b::a9fe:a9fe"))  # 169.254.169.254


# ---------------------------------------------------------------- hostile URLs, default


@pytest.mark.parametrize("path", ["http://127.0.0.1:{port}/ok.png", "http://localhost:{port}/ok.png",
                                  "http://[::1]:{port}/ok.png", "http://[::ffff:127.0.0.1]:{port}/ok.png",
                                  "http://2130706433:{port}/ok.png", "http://0.0.0.0:{port}/ok.png",
                                  "http://LOCALHOST:{port}/ok.png", "http://0x7f000001:{port}/ok.png",
                                  "http://127.1:{port}/ok.png", "https://127.0.0.1:{port}/ok.png"])
def test_loopback_refused_before_connecting(origin: str, path: str) -> None:
    transport = LoopbackOnly()
    forbidden(lambda: fetch(path.format(port=origin.rsplit(":", 1)[1]), transport))
    assert transport.sent == [] and Handler.hits == []


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.png",
                                 "http://[fd00:ec2::254]/latest/meta-data/", "http://192.168.0.1:8080/a.png",
                                 "http://[::ffff:169.254.169.254]/", "http://100.100.100.200/latest/"])
def test_private_and_metadata_refused_before_connecting(url: str) -> None:
    transport = LoopbackOnly()
    forbidden(lambda: fetch(url, transport))
    assert transport.sent == []


@pytest.mark.parametrize("url", ["file:///etc/passwd", "/etc/passwd", "../../etc/passwd", "ftp://example.com/a.png",
                                 "gopher://127.0.0.1:70/", "http:///ok.png", "https://...", "javascript:alert(1)",
                                 "data:image/png;base64,!!!!"])
def test_only_http_and_base64_data_urls(url: str) -> None:
    expect(InvalidRequest, 400, "invalid_image_url", lambda: fetch(url))


def test_data_urls_are_read_as_browsers_read_them() -> None:
    """Line-wrapped base64 (`base64` in a shell wraps at 76 columns) and unpadded base64 are
    what a browser accepts in a data: URL; a group one character short is not base64."""
    encoded = base64.b64encode(PNG).decode()
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    assert len(encoded) % 4 == 0 and encoded.endswith("=")  # so that unpadding changes something
    for payload in (wrapped, encoded.rstrip("="), " " + wrapped.replace("\n", "\r\n") + "\t"):
        assert fetch("data:image/png;base64," + payload).data == PNG
    one_past = encoded + "A"  # whole groups and one character more
    expect(InvalidRequest, 400, "invalid_image_url", lambda: fetch("data:image/png;base64," + one_past))
    # Percent-encoded as a URL (`%2B` for `+`, `%3D` for `=`), and a plain data: URL's bytes.
    assert fetch("data:image/png;base64," + quote(encoded, safe="")).data == PNG
    assert fetch("DATA:image/png;BASE64 ," + encoded).data == PNG
    assert fetch("data:image/png," + quote(PNG)).data == PNG
    expect(InvalidRequest, 400, "invalid_image", lambda: fetch("data:image/png,notanimage"))
    for lone_surrogate in ("data:image/png,\ud800", "data:image/png;base64,%41\ud800", "data:image/png;base64,\ud800"):
        expect(InvalidRequest, 400, "invalid_image_url", lambda: fetch(lone_surrogate))
    # Decoding escapes holds the GIL per escape (from a security review): past MAX_PERCENT_ESCAPES none are.
    from serve_app.image_input import MAX_PERCENT_ESCAPES

    escaped = "data:image/png;base64," + "%41" * (MAX_PERCENT_ESCAPES + 4)
    error = expect(InvalidRequest, 400, "invalid_image_url", lambda: fetch(escaped))
    assert "base64-encoded" in error.message


# ------------------------------------------------------------- hostile URLs, allowed host


def test_allowed_loopback_fetch_succeeds_and_ignores_declared_type(origin: str) -> None:
    image = fetch(origin + "/ok.png", allowed_hosts=["127.0.0.1"])
    assert (image.width, image.height, image.data) == (40, 30, PNG)


def test_allowed_by_name_connects_to_the_resolved_address(origin: str) -> None:
    transport = LoopbackOnly()
    fetch(origin.replace("127.0.0.1", "localhost") + "/ok.png", transport, allowed_hosts=["localhost"])
    assert transport.sent[0].headers["host"] == "localhost:" + origin.rsplit(":", 1)[1]


@pytest.mark.parametrize("target", ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.png",
                                    "http://127.0.0.2:1/ok.png", "http://[::1]/ok.png"])
def test_redirect_from_allowed_host_to_forbidden_one_refused(origin: str, target: str) -> None:
    transport = LoopbackOnly()
    forbidden(lambda: fetch(f"{origin}/redirect?to={target}", transport, allowed_hosts=["127.0.0.1"]))
    assert len(transport.sent) == 1


# httpx reads a redirect's Location even when it does not follow it: the last five raised
# httpx.InvalidURL or IDNA's errors, which were 500s.
@pytest.mark.parametrize("target", ["file:///etc/passwd", "http://[::1", "//[zz]/", "javascript:x", "mailto:a@b",
                                    "data:x", "http://xn--/", "https://xn--a/"])
def test_redirect_to_a_file_or_malformed_url_refused(origin: str, target: str) -> None:
    expect(InvalidRequest, 400, "invalid_image_url",
           lambda: fetch(f"{origin}/redirect?to={quote(target)}", allowed_hosts=["127.0.0.1"]))


def test_redirects_followed_up_to_the_limit(origin: str) -> None:
    assert fetch(f"{origin}/chain?n=2", allowed_hosts=["127.0.0.1"], max_redirects=2).width == 40
    expect(InvalidRequest, 400, "too_many_redirects",
           lambda: fetch(f"{origin}/chain?n=3", allowed_hosts=["127.0.0.1"], max_redirects=2))
    assert len(Handler.hits) == 3 + 3  # the refused chain stopped after max_redirects + 1 requests


@pytest.mark.parametrize("path,error,status,code", [
    ("/declared-huge", PayloadTooLarge, 413, "payload_too_large"),
    ("/streamed-huge", PayloadTooLarge, 413, "payload_too_large"),
    ("/text", InvalidRequest, 400, "invalid_image"),
    ("/missing", InvalidRequest, 400, "invalid_image_url"),
    ("/gzip", InvalidRequest, 400, "invalid_image_url"),
])
def test_bad_downloads(origin: str, path: str, error: type[APIError], status: int, code: str) -> None:
    expect(error, status, code, lambda: fetch(origin + path, allowed_hosts=["127.0.0.1"], max_bytes=4096))


@pytest.mark.parametrize("path", ["/slow", "/drip"])
def test_slow_server_times_out_in_total(origin: str, path: str) -> None:
    started = time.monotonic()
    expect(InvalidRequest, 400, "image_url_timeout",
           lambda: fetch(origin + path, allowed_hosts=["127.0.0.1"], timeout_s=0.5))
    assert time.monotonic() - started < 3  # 0.5 s in total, not per read; the slack is for a loaded machine


# ------------------------------------------------------------- DNS: check, then pin


class Recorder(httpx.AsyncBaseTransport):
    """Answers every request with a PNG, without any network; records the requests."""

    def __init__(self) -> None:
        self.sent: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        return httpx.Response(200, stream=httpx.ByteStream(PNG))


def fetch_resolving(url: str, answers: list[list[str]]) -> Recorder:
    """Fetch with DNS answering `answers` in turn (one list of addresses per lookup)."""
    transport, lookups = Recorder(), iter(answers)

    async def resolve(host: str, port: int, *, param: str) -> list[Any]:
        return [ipaddress.ip_address(a) for a in next(lookups)]

    async def run() -> None:
        fetcher = ImageFetcher(ImageInputOptions(), transport=transport)
        fetcher._resolve = resolve  # type: ignore[method-assign]
        await fetcher.load(url, param="image")

    asyncio.run(run())
    return transport


def test_any_private_answer_refuses_the_name() -> None:
    forbidden(lambda: fetch_resolving("http://images.example/a.png", [["93.184.216.34", "10.0.0.1"]]))


def test_connection_goes_to_the_checked_address_with_name_in_host_and_sni() -> None:
    sent = fetch_resolving("https://images.example:8443/a.png", [["93.184.216.34"], ["127.0.0.1"]]).sent
    assert len(sent) == 1 and sent[0].url.host == "93.184.216.34" and sent[0].url.port == 8443
    assert sent[0].headers["host"] == "images.example:8443"
    assert sent[0].extensions["sni_hostname"] == "images.example"


def self_signed(name: str) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for DNS name `name`."""
    from cryptography import x509  # a dev dependency: the TLS test runs, never skips
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.mark.parametrize("cert_name,works", [("localhost", True), ("images.test", False)])
def test_https_pinned_to_the_address_still_verifies_the_name(tmp_path: Path, cert_name: str, works: bool) -> None:
    cert, key = self_signed(cert_name)
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = server_tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    transport = LoopbackOnly(verify=ssl.create_default_context(cadata=cert.decode()))
    url = f"https://localhost:{server.server_address[1]}/ok.png"
    try:
        if works:
            assert fetch(url, transport, allowed_hosts=["localhost"]).width == 40
            assert transport.sent[0].url.host == "127.0.0.1"
        else:  # the certificate is checked against the URL's name, not the address connected to
            expect(InvalidRequest, 400, "invalid_image_url", lambda: fetch(url, transport, allowed_hosts=["localhost"]))
    finally:
        server.shutdown()
        server.server_close()


# -------------------------------------------------------------------- bytes and bombs


def loader(**options: Any) -> Callable[[bytes], Callable[[], InputImage]]:
    fetcher = ImageFetcher(ImageInputOptions(**options), transport=Recorder())
    return lambda data: lambda: fetcher.check_upload(data, param="mask")


def test_png_bomb_refused_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[object] = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self))
    for bomb in (png_claiming(100_000, 100_000), png_claiming(5000, 5000)):
        assert len(bomb) < 200
        expect(PayloadTooLarge, 413, "image_too_many_pixels", loader()(bomb), param="mask")
    assert decoded == []


def test_real_one_bit_bomb_and_pixel_limit_from_config() -> None:
    bomb = image_bytes((5000, 5000), mode="1")
    assert len(bomb) < 10_000
    expect(PayloadTooLarge, 413, "image_too_many_pixels", loader()(bomb), param="mask")
    expect(PayloadTooLarge, 413, "image_too_many_pixels", loader(max_pixels=64 * 64)(image_bytes((80, 60))),
           param="mask")
    assert loader(max_pixels=64 * 64)(image_bytes((64, 64)))().width == 64


def test_bomb_in_a_data_url_refused() -> None:
    url = "data:image/png;base64," + base64.b64encode(png_claiming(100_000, 100_000)).decode()
    expect(PayloadTooLarge, 413, "image_too_many_pixels", lambda: fetch(url))


def test_formats_and_upload_size_from_config() -> None:
    only_png = loader(accepted_formats=["PNG"])
    expect(InvalidRequest, 400, "invalid_image", only_png(image_bytes(fmt="JPEG")), param="mask")
    assert only_png(PNG)().height == 30 and loader(accepted_formats=["jpg"])(image_bytes(fmt="JPEG"))()
    expect(InvalidRequest, 400, "invalid_image", loader()(image_bytes(fmt="TIFF")), param="mask")
    expect(InvalidRequest, 400, "invalid_image", loader()(PNG[:60]), param="mask")
    expect(PayloadTooLarge, 413, "payload_too_large", loader(max_bytes=1024)(b"\0" * 1025), param="mask")
    with pytest.raises(ValueError, match="NOPE"):
        ImageFetcher(ImageInputOptions(accepted_formats=["PNG", "NOPE"]))


def test_a_jpeg_of_endless_scans_is_refused_without_decoding() -> None:
    """Each scan of a progressive JPEG is a pass over every pixel: one tiny refinement scan
    repeated thousands of times in a 16-megapixel frame is a small file whose decoding holds
    the model's worker for minutes. A progressive photo (about 10 scans) still passes."""
    import numpy as np

    from serve_app.image_structure import jpeg_structure

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "teal").save(buffer, "JPEG", progressive=True)
    photo = buffer.getvalue()
    assert inspect_image(photo, param="image").width == 64 and 1 < photo.count(b"\xff\xda") < 20
    end = photo.rindex(b"\xff\xd9")
    last_scan = photo[photo.rindex(b"\xff\xda"):end]
    endless = photo[:end] + last_scan * 200 + photo[end:]
    assert Image.open(io.BytesIO(endless)).size == (64, 48)  # a well-formed header: what the ingress reads
    expect(InvalidRequest, 400, "invalid_image", lambda: inspect_image(endless, param="image"))
    # Junk before a marker hides nothing: libjpeg skips it (stray bytes, stuffed zeros) and decodes on.
    first_scan = endless.index(b"\xff\xda")
    for junk in (b"\x00", b"\xff\x00", b"junk"):
        hidden = endless[:first_scan] + junk + endless[first_scan:]
        assert Image.open(io.BytesIO(hidden)).size == (64, 48)
        expect(InvalidRequest, 400, "invalid_image", lambda: inspect_image(hidden, param="image"))
    # A tables-only block before the picture (libjpeg decodes the picture after its EOI) hides
    # nothing, nor do millions of tiny segments cost seconds to count.
    expect(InvalidRequest, 400, "invalid_image", lambda: inspect_image(b"\xff\xd8\xff\xd9" + endless, param="image"))
    started = time.monotonic()
    assert jpeg_structure(photo[:end] + b"\xff\xfe\x00\x02" * (5 * 2**20) + photo[end:]).segments > 1000
    assert time.monotonic() - started < 1
    # A marker below SOF0 in coded data, at a restart, is skipped by libjpeg as junk: read as a
    # segment with a length, it would hide the scans within that length from the count.
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, "JPEG", progressive=True, restart_marker_rows=2)
    restarting = buffer.getvalue()
    restart = restarting.index(b"\xff\xd0", restarting.index(b"\xff\xda"))
    hidden = restarting[:restart] + b"\xff\x02\xfe\x00" + restarting[restart:]
    decoded = Image.open(io.BytesIO(hidden))
    assert np.array_equal(np.asarray(decoded), np.asarray(Image.open(io.BytesIO(restarting))))  # all scans read
    assert jpeg_structure(hidden).scans == jpeg_structure(restarting).scans > 5
    # The same as the first picture of an MPO (a phone's multi-picture JPEG), which Pillow opens as such.
    second = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(second, "MPO", save_all=True, progressive=True,
                                           append_images=[Image.new("RGB", (64, 48), "blue")])
    mpo = second.getvalue()
    assert Image.open(io.BytesIO(mpo)).format == "MPO" and inspect_image(mpo, param="image").width == 64
    eoi = mpo.index(b"\xff\xda")
    eoi = mpo.index(b"\xff\xd9", eoi)  # the first picture's end
    scan = mpo[mpo.rindex(b"\xff\xda", 0, eoi):eoi]
    expect(InvalidRequest, 400, "invalid_image",
           lambda: inspect_image(mpo[:eoi] + scan * 200 + mpo[eoi:], param="image"))
    # Bytes that look like scan markers outside the picture's own segments (in an EXIF block,
    # after its end: a motion photo's video) are not scans.
    exif = Image.Exif()
    exif[0x927C] = b"\xff\xda" * 300  # MakerNote: bytes a camera writes as it likes
    described = io.BytesIO()
    Image.new("RGB", (64, 48), "teal").save(described, "JPEG", progressive=True, exif=exif.tobytes())
    trailing = described.getvalue() + b"\xff\xda" * 300
    assert trailing.count(b"\xff\xda") > 600 and inspect_image(trailing, param="image").height == 48


def test_counting_scans_takes_linear_time_on_runs_of_0xff() -> None:
    """A run of 0xff bytes made a `\\xff+` search backtrack quadratically (2.4 s for 30 KB,
    holding the GIL): the count must take a moment even over the largest upload."""
    from serve_app.image_structure import jpeg_structure

    started = time.monotonic()
    for tail in (b"\x00", b""):
        jpeg_structure(b"\xff\xd8" + b"\xff" * (4 * 2**20) + tail)
        jpeg_structure(b"\xff\xd8\xff\xda\x00\x02" + b"\xff" * (4 * 2**20) + tail)
    assert time.monotonic() - started < 2


def test_a_jpeg_header_padded_with_junk_is_refused_before_pillow_reads_it() -> None:
    """Pillow's JPEG header parser steps over bytes outside segments one Python call at a time:
    20 MiB of stuffed zeros or tiny comments before the picture held an ingress thread (and the
    GIL its event loop needs) for seconds. They are counted first, in C, and refused; a few
    stray bytes, which libjpeg skips with a warning, still pass."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "teal").save(buffer, "JPEG")
    photo = buffer.getvalue()
    after_app0 = 4 + int.from_bytes(photo[4:6], "big")
    for padding in (b"\xff\x00" * (10 * 2**20), b"\xff\xfe\x00\x02" * (5 * 2**20), b"\x00" * (20 * 2**20)):
        padded = photo[:after_app0] + padding + photo[after_app0:]
        started = time.monotonic()
        error = expect(InvalidRequest, 400, "invalid_image", lambda: inspect_image(padded, param="image"))
        assert time.monotonic() - started < 1.5 and "stray bytes" in error.message
    assert inspect_image(photo[:after_app0] + b"\x00" * 100 + photo[after_app0:], param="image").width == 64


def test_a_png_of_countless_chunks_is_refused_before_pillow_reads_them() -> None:
    """Pillow reads and checksums a PNG's chunks one Python call each: 20 MiB of empty chunks,
    before or after the pixels, took 1.6-3.8 s of an ingress thread. A PNG written a chunk
    per row still passes."""
    import struct
    import zlib

    import numpy as np

    def chunk(kind: bytes, data: bytes = b"") -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    first_pixels, end = PNG.index(b"IDAT") - 4, PNG.rindex(b"IEND") - 4
    for at in (first_pixels, end):
        for kind in (b"abCd", b"IDAT"):
            padded = PNG[:at] + chunk(kind) * (20 * 2**20 // 12) + PNG[at:]
            started = time.monotonic()
            error = expect(InvalidRequest, 400, "invalid_image", lambda: inspect_image(padded, param="image"))
            assert time.monotonic() - started < 1 and "chunks" in error.message
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (4096, 16, 3), dtype=np.uint8)).save(buffer, "PNG")
    noisy = buffer.getvalue()
    pos = start = noisy.index(b"IDAT") - 4
    pixels = b""
    while noisy[pos + 4:pos + 8] == b"IDAT":
        length = int.from_bytes(noisy[pos:pos + 4], "big")
        pixels, pos = pixels + noisy[pos + 8:pos + 8 + length], pos + 12 + length
    # A chunk per row's bytes (3 x 16 and a filter byte; noise does not compress).
    per_row = noisy[:start] + b"".join(chunk(b"IDAT", pixels[i:i + 49]) for i in range(0, len(pixels), 49)) + noisy[pos:]
    assert per_row.count(b"IDAT") > 4000 and inspect_image(per_row, param="image").height == 4096
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(per_row))), np.asarray(Image.open(io.BytesIO(noisy))))


def test_a_gif_of_countless_blocks_before_its_picture_is_refused_before_pillow_reads_them() -> None:
    """Pillow reads a GIF's blocks before its first picture one Python call each: 20 MiB of
    one-byte comment blocks took 4.5 s of an ingress thread. Counted as Pillow reads them,
    quirks included (after an empty extension block it reads on to the next empty one), so
    a file cannot be read one way by the count and another by Pillow. An animation with its
    loop count, frame timing and a long comment still passes."""
    frames = [Image.new("P", (32, 24), index) for index in range(40)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], loop=0, duration=40,
                   comment=b"x" * 200_000)  # 785 blocks of 255 bytes
    animation = buffer.getvalue()
    assert inspect_image(animation, param="image").width == 32
    assert Image.open(io.BytesIO(animation)).info["loop"] == 0
    picture = animation.index(b",", animation.index(b"!\xf9"))  # the first image descriptor, after its timing
    tiny_blocks = b"\x01a" * (10 * 2**20)
    for padding in (b"!\xfe" + tiny_blocks + b"\x00",  # one comment of tiny blocks
                    b"!\xfe\x01a\x00" * (4 * 2**20),  # countless comments
                    b"\x00" * (20 * 2**20),  # stray bytes
                    b"!\x01\x00" + tiny_blocks + b"\x00"):  # an empty extension, then Pillow reads on
        padded = animation[:picture] + padding + animation[picture:]
        started = time.monotonic()
        error = expect(InvalidRequest, 400, "invalid_image", lambda: inspect_image(padded, param="image"))
        assert time.monotonic() - started < 1 and "blocks" in error.message


def test_inspect_image_defaults() -> None:
    assert inspect_image(PNG, param="image") == InputImage(PNG, 40, 30)


# -------------------------------------------------------------------------- storage


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_saves_are_unguessable_complete_and_leave_no_temp_files(tmp_path: Path) -> None:
    store = ImageStore(str(tmp_path), "http://h/")
    names = {store.save(PNG) for _ in range(50)}
    assert len(names) == 50 and all(len(name) >= 28 for name in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    name = names.pop()
    assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644  # as other files: not mkstemp's 0600
    with store.open(name).file as file:
        assert file.read() == PNG and store.url(name) == f"http://h/v1/files/images/{name}"


def test_a_file_system_that_keeps_no_modes_still_stores_the_image(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """CIFS and vfat refuse chmod (EPERM): the image is saved all the same, with the mode it got."""
    def refused(fd: int, mode: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchmod", refused)
    store = ImageStore(str(tmp_path), "http://h/")
    name = store.save(PNG)
    with store.open(name).file as file:
        assert file.read() == PNG
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        ImageStore(str(tmp_path), "http://h").save(PNG)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../x.png", "..%2Fx.png", "%2e%2e%2fetc%2fpasswd", "/etc/passwd",
                                  "../../../../etc/passwd", "AAAAAAAAAAAAAAAAAAAA.png/../x", "",
                                  "nothere1234567890123.png", "link_outside_0000000.png", ".tmp-abcdefgh.png",
                                  "a_folder_00000000000.png", "a_fifo_0000000000000.png", "a_socket_00000000000.png"])
def test_unknown_or_escaping_names_are_404(tmp_path: Path, name: str) -> None:
    (tmp_path / "outside.png").write_bytes(PNG)
    store = ImageStore(str(tmp_path / "store"), "http://h")
    (store.directory / "link_outside_0000000.png").symlink_to(tmp_path / "outside.png")
    (store.directory / ".tmp-abcdefgh.png").write_bytes(PNG)
    (store.directory / "a_folder_00000000000.png").mkdir()
    os.mkfifo(store.directory / "a_fifo_0000000000000.png")  # opening it for reading must not hang
    listener = socket.socket(socket.AF_UNIX)  # opening one fails with ENXIO, which was a 500
    listener.bind(str(store.directory / "a_socket_00000000000.png"))
    try:
        expect(NotFound, 404, "file_not_found", lambda: store.open(name), param="name")
    finally:
        listener.close()


@pytest.mark.parametrize("headers, status, body", [
    ({}, 200, PNG), ({"Range": "bytes=1-4"}, 206, PNG[1:5]), ({"Range": "bytes=x"}, 200, PNG)])
def test_an_image_swept_as_it_is_sent_is_still_sent_whole(tmp_path: Path, headers: dict[str, str],
                                                            status: int, body: bytes) -> None:
    """The retention sweep may delete a file between the route finding it and the reply reading
    it: the reply still carries the image, not headers and then a cut connection."""
    from starlette.applications import Starlette
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from serve_app.image_files import StoredImageResponse

    store = ImageStore(str(tmp_path), "http://h")
    name = store.save(PNG)

    def image_file(request: Any) -> StoredImageResponse:
        image = store.open(request.path_params["name"])
        (tmp_path / name).unlink()  # swept
        return StoredImageResponse(image, media_type="image/png")

    with TestClient(Starlette(routes=[Route("/{name}", image_file)])) as client:
        response = client.get(f"/{name}", headers=headers)
    assert (response.status_code, response.content) == (status, body)


def test_sweep_by_age_then_total_size_and_dead_temp_files(tmp_path: Path) -> None:
    retention = ImageRetentionOptions(max_age_s=3600, max_total_bytes=3 * len(PNG))
    store = ImageStore(str(tmp_path), "http://h", retention)
    names = [store.save(PNG) for _ in range(6)]
    for index, name in enumerate(names):  # names[0] oldest ... names[5] newest
        age(tmp_path / name, 100 - index)
    age(tmp_path / names[0], 7200)
    dead, live = tmp_path / ".tmp-dead.png", tmp_path / ".tmp-live.png"
    for temp in (dead, live):
        temp.write_bytes(b"half")
    age(dead, 120)
    (tmp_path / "notes.txt").write_text("not ours")
    assert store.sweep() == 1 + 2 + 1  # too old, over the size (the two oldest left), the dead temp file
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names[3:], live.name, "notes.txt"])
    assert store.sweep() == 0


def test_a_file_the_sweep_may_not_delete_is_logged_and_the_others_still_go(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The oldest file comes first in every sweep: where it could not be deleted (a shared
    folder), each sweep stopped there and the folder grew without bound."""
    store = ImageStore(str(tmp_path), "http://h", ImageRetentionOptions(max_age_s=60))
    names = [store.save(PNG) for _ in range(3)]
    for index, name in enumerate(names):
        age(tmp_path / name, 3600 - index)
    stuck, unlink = tmp_path / names[0], Path.unlink

    def refusing(path: Path, *args: Any, **kwargs: Any) -> None:
        if path == stuck:
            raise PermissionError(1, "Operation not permitted", str(path))
        unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", refusing)
    monkeypatch.setattr(logging.getLogger("ray.serve"), "propagate", True)
    assert store.sweep() == 2 and [p.name for p in tmp_path.iterdir()] == [stuck.name]
    assert f"could not delete 1 file(s) from {tmp_path}, first: [Errno 1] Operation not permitted" in caplog.text
    # By size: the file that stays still takes its room, so the next oldest goes in its place.
    by_size = ImageStore(str(tmp_path), "http://h", ImageRetentionOptions(max_total_bytes=2 * len(PNG)))
    newer = [by_size.save(PNG) for _ in range(2)]
    age(tmp_path / newer[0], 100)
    assert by_size.sweep() == 1 and sorted(p.name for p in tmp_path.iterdir()) == sorted([stuck.name, newer[1]])


def test_without_retention_images_stay(tmp_path: Path) -> None:
    store = ImageStore(str(tmp_path), "http://h")
    name = store.save(PNG)
    age(tmp_path / name, 10**8)
    assert store.sweep() == 0
    store.open(name).file.close()


def test_sweep_forever_runs_until_cancelled(tmp_path: Path) -> None:
    store = ImageStore(str(tmp_path), "http://h", ImageRetentionOptions(max_age_s=10, sweep_interval_s=0.05))

    async def run() -> None:
        task = asyncio.create_task(store.sweep_forever())
        name = store.save(PNG)
        age(tmp_path / name, 60)
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not (tmp_path / name).exists():
                break
        task.cancel()
        assert not (tmp_path / name).exists()

    asyncio.run(run())


def test_names_that_never_resolve_leave_the_shared_threads_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DNS lookup cannot be cancelled: image URLs naming hosts whose DNS never answers hold
    their threads long after their 400s. They run on the fetcher's own threads, so the event
    loop's shared pool (image encoding, uploads, file responses) keeps working."""
    import socket

    release, real = threading.Event(), socket.getaddrinfo

    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        if host.endswith(".stuck.test"):
            release.wait(30)
            raise socket.gaierror("no answer")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)

    async def main() -> tuple[float, list[Any]]:
        fetcher = ImageFetcher(ImageInputOptions(timeout_s=0.5))
        fetches = [asyncio.ensure_future(fetcher.load(f"http://h{i}.stuck.test/x.png", param="image"))
                   for i in range(40)]
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await asyncio.wait_for(asyncio.to_thread(lambda: None), 5)
        took = time.monotonic() - started
        outcomes = await asyncio.gather(*fetches, return_exceptions=True)
        release.set()
        await fetcher.aclose()
        return took, outcomes

    try:
        took, outcomes = asyncio.run(main())
    finally:
        release.set()
    assert took < 1, took
    assert all(isinstance(o, InvalidRequest) and o.code == "image_url_timeout" for o in outcomes), outcomes


def test_downloads_at_once_are_bounded(origin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each image download holds up to `max_bytes`: one replica runs at most MAX_DOWNLOADS at
    once, the others wait their turn (within their timeout) and still succeed."""
    from serve_app.image_input import MAX_DOWNLOADS

    lock, release, active, most = threading.Lock(), threading.Event(), [0], [0]

    def held(handler: Handler, query: dict[str, list[str]]) -> None:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        release.wait(10)
        with lock:
            active[0] -= 1
        handler.reply(PNG, length=len(PNG))

    monkeypatch.setitem(ROUTES, "/held", held)

    async def run() -> list[InputImage]:
        fetcher = ImageFetcher(ImageInputOptions(allowed_hosts=["127.0.0.1"]), transport=LoopbackOnly())
        loads = [asyncio.ensure_future(fetcher.load(f"{origin}/held?i={i}", param="image"))
                 for i in range(MAX_DOWNLOADS + 8)]
        async with asyncio.timeout(10):
            while most[0] < MAX_DOWNLOADS and not any(load.done() for load in loads):
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # time for any download over the bound to start
        release.set()
        try:
            return await asyncio.gather(*loads)
        finally:
            await fetcher.aclose()

    try:
        loaded = asyncio.run(run())
    finally:
        release.set()
    assert most[0] == MAX_DOWNLOADS and all(image.width == 40 for image in loaded), most


def test_importing_the_image_model_does_not_tell_operators_to_install_torchvision() -> None:
    """transformers' PIL fallback notice (three per process) is dropped; its other warnings are not."""
    script = ("import logging, serve_app.image_model\n"
              "logging.getLogger('transformers.utils.import_utils').warning('another warning')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torchvision" not in done.stderr and "another warning" in done.stderr, done.stderr


def test_a_large_run_length_coded_bmp_is_refused_before_it_is_decoded() -> None:
    """Pillow decodes RLE8/RLE4 BMPs in Python, a loop turn per run: a 4096x4096 one of
    single-pixel runs passes the ingress's header check and then takes seconds of the
    replica's worker. Up to a megapixel, and any uncompressed BMP, still pass."""
    def rle8_bmp(width: int, height: int) -> bytes:
        row = b"".join(bytes([1, i % 2]) for i in range(width)) + b"\x00\x00"  # one-pixel runs, end of line
        pixels = row * height + b"\x00\x01"  # end of bitmap
        palette = b"\x00\x00\x00\x00\xff\xff\xff\x00" + b"\x00" * (254 * 4)
        offset = 14 + 40 + len(palette)
        info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
        return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels

    small = rle8_bmp(64, 48)
    assert Image.open(io.BytesIO(small)).convert("L").getpixel((1, 0)) == 255  # a real RLE8 BMP
    assert inspect_image(small, param="image").width == 64
    started = time.monotonic()
    error = expect(InvalidRequest, 400, "invalid_image", lambda: inspect_image(rle8_bmp(2048, 1024), param="image"))
    assert "run-length-coded BMP" in error.message and time.monotonic() - started < 1
    # A small picture whose rows are padded with megabytes of end-of-line escapes (each a turn of
    # Pillow's decoder, drawing nothing) is refused by its size.
    padded = small[:-2] + b"\x00\x00" * (2**20) + small[-2:]
    error = expect(InvalidRequest, 400, "invalid_image", lambda: inspect_image(padded, param="image"))
    assert "2 MiB" in error.message
    plain = io.BytesIO()
    Image.new("RGB", (1100, 1000), "teal").save(plain, "BMP")
    assert inspect_image(plain.getvalue(), param="image").width == 1100


def test_a_data_url_is_never_taken_for_a_stored_image_nor_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """urlsplit keeps its last 128 results: every edit's data: URL (up to 25 MiB) stayed in the
    ingress's memory, about 6 GB once the cache filled, and was parsed on its event loop."""
    import urllib.parse

    name = "A" * 24 + ".png"
    parsed: list[str] = []
    real = urllib.parse.urlsplit
    monkeypatch.setattr(urllib.parse, "urlsplit", lambda url, *a, **k: parsed.append(url) or real(url, *a, **k))
    big = "data:image/png;base64," + "A" * (1 << 20)
    assert ImageStore.named_in(big) is None and ImageStore.named_in(f"DATA:,/v1/files/images/{name}") is None
    assert ImageStore.named_in("http://h/v1/files/images/" + name + "?" + "x" * 5000) is None
    assert parsed == []
    assert ImageStore.named_in(f" http://10.0.0.2:1088/ai/v1/files/images/{name}") == name
    assert ImageStore.named_in(f"/v1/files/images/{name}") == name
    # Not a URL urlsplit can read (it raised ValueError: a 500): the fetcher refuses it by name.
    assert ImageStore.named_in(f"http://[::1/v1/files/images/{name}") is None


def test_a_store_read_failing_for_the_servers_own_reason_is_not_a_404(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of file descriptors or a disk error is the server's fault (a 500), not a missing image:
    a 404 would tell the client its image is gone for good, and an edit would then fetch the URL."""
    import errno

    store = ImageStore(str(tmp_path), "http://h")
    name = store.save(PNG)
    real_open = os.open

    def exhausted(*args: Any, **kwargs: Any) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "open", exhausted)
    with pytest.raises(OSError, match="Too many open files"):
        store.open(name)
    with pytest.raises(OSError, match="Too many open files"):
        store.read(name)
    monkeypatch.setattr(os, "open", real_open)
    assert store.read(name) == PNG


def test_an_image_folder_deleted_under_the_server_is_made_again(tmp_path: Path) -> None:
    store = ImageStore(str(tmp_path / "images"), "http://h")
    shutil.rmtree(tmp_path / "images")
    name = store.save(PNG)
    assert store.read(name) == PNG


def test_a_broken_exif_block_writes_nothing_to_the_log() -> None:
    """From a security review: Pillow warned once per broken EXIF entry it skipped, each naming
    its tag, so one upload of a few hundred KB wrote 127k lines to each process's log; a broken
    EXIF block says nothing (upright), quietly. Run in a process of its own: Python prints a
    warning once per process, and this one's filters are pytest's."""
    import subprocess
    import sys

    script = """
import io, struct
from PIL import Image
from serve_app.image_check import orientation
entries = 2000  # each claims more data than the file holds
ifd = struct.pack("<H", entries) + b"".join(struct.pack("<HHII", 1000 + i, 4, 100000, 8) for i in range(entries))
buffer = io.BytesIO()
Image.new("RGB", (8, 8)).save(buffer, "PNG", exif=b"II*\\0" + struct.pack("<I", 8) + ifd + b"\\0" * 4)
print(orientation(Image.open(io.BytesIO(buffer.getvalue()))))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "1"
    assert done.stderr == ""
