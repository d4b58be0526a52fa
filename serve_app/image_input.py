"""Input images for edits: fetched from a URL, unpacked from a data: URL, or uploaded.

This runs in the ingress, before any model work: a URL that cannot be fetched
or bytes that are not an image are the client's mistake and get a 400 naming
the parameter, without a model replica ever seeing them. Formats are
recognised from the bytes, never from a declared content type (a network node
re-sends every upload as application/octet-stream).

A URL comes from a stranger, so fetching it must not turn this server into a
proxy into its own network (SSRF): only http(s), every address the host
resolves to must be public unless the operator allow-listed the host, the
connection goes to the very address that was checked (a second DNS answer
cannot swap in 127.0.0.1), and every redirect hop is checked again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

from serve_app.config import ImageInputOptions
from serve_app.image_check import InputImage, inspect_image
from serve_app.url_guard import HostPolicy, IPAddress
from serve_app.errors import InvalidRequest, PayloadTooLarge

REDIRECTS = {301, 302, 303, 307, 308}
UNUSABLE_REDIRECT = "URL redirects to something that is not a valid http(s) URL"
MAX_DOWNLOADS = 16
"""Image URLs one ingress replica downloads at once; the rest wait (within their
`timeout_s`). Each holds up to `max_bytes` (twice, while it is joined): without a bound,
`max_ongoing_requests` edits pointing at large public images pin gigabytes."""
RESOLVER_THREADS = 8
"""Threads that resolve image URLs' host names. A lookup cannot be cancelled: a name whose
DNS server never answers holds its thread until the system resolver gives up, long after
the request's 400. On threads of their own, such names can stall only other lookups, never
the event loop's shared pool (image encoding, uploads, file responses, Serve's status)."""

ASCII_WHITESPACE = str.maketrans("", "", " \t\n\f\r")


def forgiving_base64(payload: str) -> str:
    """A data: URL's base64 as browsers read it (WHATWG's forgiving-base64): line breaks and
    spaces ignored (`base64` in a shell wraps at 76 columns), padding optional. Anything else
    that is not base64 is still refused by the decoder."""
    payload = payload.translate(ASCII_WHITESPACE)
    if len(payload) % 4 == 0:
        payload = payload.removesuffix("=").removesuffix("=")
    if len(payload) % 4 == 1:
        raise ValueError("a base64 payload cannot be one character past a whole group")
    return payload + "=" * (-len(payload) % 4)


# ---------------------------------------------------------------------------- fetcher


class ImageFetcher:
    """Turns an `image` / `mask` string into a checked image, within the limits of `options`.

    A URL that times out (`timeout_s`, for resolving, connecting, every redirect
    and the whole download together) is a 400 `image_url_timeout`, not a 408: 408
    says the client was slow to send its request, while here the server the
    client pointed us at was slow, which is a bad parameter like any other.
    """

    def __init__(self, options: ImageInputOptions, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        """`transport` replaces the network (tests; a custom TLS setup). Proxies from the
        environment are ignored on purpose: a proxy would connect to addresses nobody checked."""
        self.options = options
        self.max_bytes = options.max_bytes
        self.formats = tuple(options.accepted_formats)
        self.hosts = HostPolicy(options.allowed_hosts)
        self._resolver = ThreadPoolExecutor(RESOLVER_THREADS, thread_name_prefix="image-url-dns")
        self._downloads = asyncio.Semaphore(MAX_DOWNLOADS)
        self._client = httpx.AsyncClient(
            transport=transport, timeout=options.timeout_s, follow_redirects=False, trust_env=False,
            # No state shared between strangers' fetches: no cookies, and no pooled connection
            # (one made for name A's TLS check must not serve name B on the same address).
            cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
            limits=httpx.Limits(max_keepalive_connections=0),
            headers={"User-Agent": "serve_app-image-fetch", "Accept": "image/*",
                     "Accept-Encoding": "identity"})

    async def load(self, source: str, *, param: str) -> InputImage:
        source = source.strip()
        if source[:5].lower() == "data:":  # decoding megabytes of base64 is no work for the event loop
            return await asyncio.to_thread(lambda: self.check_upload(self._from_data_url(source, param=param),
                                                                     param=param))
        data = await self._download(self._web_url(source, param=param), param=param)
        return await asyncio.to_thread(self.check_upload, data, param=param)

    def check_upload(self, data: bytes, *, param: str) -> InputImage:
        """Bytes from any source: the size cap, then the image checks. Blocking (PIL)."""
        if len(data) > self.max_bytes:
            raise self._too_large(param)
        return inspect_image(data, param=param, accepted_formats=self.formats,
                             max_pixels=self.options.max_pixels)

    async def aclose(self) -> None:
        await self._client.aclose()
        self._resolver.shutdown(wait=False, cancel_futures=True)

    def _too_large(self, param: str) -> PayloadTooLarge:
        return PayloadTooLarge(f"{param} is larger than {self.max_bytes} bytes.", param=param)

    def _from_data_url(self, source: str, *, param: str) -> bytes:
        """The bytes of a data: URL as a browser reads them (WHATWG fetch): the payload is
        percent-decoded first (a URL-encoded base64, `%2B` for `+`, or a plain data: URL's
        `%89PNG`), then base64-decoded where the header ends in `;base64`."""
        header, _, payload = source.partition(",")
        if len(payload) > 3 * self.max_bytes + 1024:  # past any encoding of max_bytes: decode nothing
            raise self._too_large(param)
        if payload.count("%") > MAX_PERCENT_ESCAPES:  # decoding is a Python loop per escape, holding the GIL
            raise _bad_url(param, f"data: URL is percent-encoded in more than {MAX_PERCENT_ESCAPES} places: send "
                                  "the image base64-encoded (data:image/png;base64,...)")
        if not header.rstrip().lower().endswith(";base64"):
            return _percent_decoded(payload, param=param)  # check_upload applies the size cap
        if "%" in payload:
            payload = _percent_decoded(payload, param=param).decode("latin-1")
        try:
            payload = forgiving_base64(payload)
        except ValueError as exc:
            raise _bad_url(param, "data: URL is not valid base64") from exc
        if len(payload) * 3 // 4 > self.max_bytes:  # line breaks do not count
            raise self._too_large(param)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _bad_url(param, "data: URL is not valid base64") from exc

    @staticmethod
    def _web_url(source: str, *, param: str) -> httpx.URL:
        """An absolute http(s) URL with a host; anything else (file:, paths, ftp:) is refused."""
        try:
            url = httpx.URL(source)
        except (httpx.InvalidURL, TypeError, ValueError) as exc:
            raise _bad_url(param, "is not a valid URL") from exc
        if url.scheme not in ("http", "https") or not url.raw_host:
            raise _bad_url(param, "must be an http(s) URL, a data: URL or an uploaded file")
        if url.port is not None and not 0 < url.port < 65536:
            raise _bad_url(param, f"has no valid port ({url.port})")
        return url

    async def _download(self, url: httpx.URL, *, param: str) -> bytes:
        try:
            return await asyncio.wait_for(self._follow(url, param=param), self.options.timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException) as exc:
            raise InvalidRequest(f"Fetching {param} took longer than {self.options.timeout_s} s.",
                                 param=param, code="image_url_timeout") from exc
        except httpx.HTTPError as exc:
            raise _bad_url(param, "URL could not be fetched") from exc

    async def _follow(self, url: httpx.URL, *, param: str) -> bytes:
        """Redirects by hand, so that each target's scheme and addresses are checked like the first;
        at most `MAX_DOWNLOADS` at once."""
        async with self._downloads:
            for _ in range(self.options.max_redirects + 1):
                outcome = await self._fetch_once(url, param=param)
                if isinstance(outcome, bytes):
                    return outcome
                url = self._web_url(str(outcome), param=param)
        raise InvalidRequest(f"Fetching {param} was redirected more than {self.options.max_redirects} times.",
                             param=param, code="too_many_redirects")

    async def _fetch_once(self, url: httpx.URL, *, param: str) -> bytes | httpx.URL:
        """One hop: the body of a 200, or the absolute target of a redirect."""
        response = await self._connect(url, await self._checked_addresses(url, param=param), param=param)
        try:
            if response.status_code in REDIRECTS:
                location = response.headers.get("location")
                if not location:
                    raise _bad_url(param, f"URL answered HTTP {response.status_code} without a Location")
                try:
                    return url.join(location)
                except (httpx.InvalidURL, ValueError) as exc:  # IDNA's errors are ValueErrors
                    raise _bad_url(param, UNUSABLE_REDIRECT) from exc
            if response.status_code != 200:
                raise _bad_url(param, f"URL answered HTTP {response.status_code}")
            return await self._read_body(response, param=param)
        finally:
            await response.aclose()

    async def _checked_addresses(self, url: httpx.URL, *, param: str) -> list[IPAddress]:
        """Every address the host resolves to, each one allowed; else a 400 before any connection is made."""
        host = url.raw_host.decode("ascii")
        addresses = await self._resolve(host, url.port or (443 if url.scheme == "https" else 80), param=param)
        if not addresses or not all(self.hosts.allows(host, address) for address in addresses):
            raise InvalidRequest(f"{param} points to an address this server may not fetch from "
                                 "(private, loopback, link-local or metadata).",
                                 param=param, code="image_url_forbidden")
        return addresses

    async def _resolve(self, host: str, port: int, *, param: str) -> list[IPAddress]:
        """The host's addresses: an IP literal as is, a name through DNS on the resolver's threads."""
        try:
            return [ipaddress.ip_address(host.strip("[]"))]
        except ValueError:
            pass
        try:
            infos = await asyncio.get_running_loop().run_in_executor(
                self._resolver, lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (socket.gaierror, UnicodeError) as exc:
            raise _bad_url(param, "URL names a host that does not resolve") from exc
        found = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        return list(dict.fromkeys(found))

    async def _connect(self, url: httpx.URL, addresses: list[IPAddress], *, param: str) -> httpx.Response:
        """Send the GET to the checked addresses in turn, never to a name DNS could re-answer.

        The URL keeps its name in the Host header and, for https, in SNI and the
        certificate check, so virtual hosts and TLS work as if by name.
        """
        name = url.raw_host.decode("ascii")
        extensions = {"sni_hostname": name} if url.scheme == "https" else {}
        error: httpx.ConnectError | None = None
        for address in addresses:
            request = self._client.build_request(
                "GET", url.copy_with(host=str(address)), extensions=extensions,
                headers={"Host": url.netloc.decode("ascii")})
            try:
                return await self._client.send(request, stream=True)
            except httpx.ConnectError as exc:
                error = exc
            except (httpx.InvalidURL, ValueError) as exc:
                # httpx reads a redirect's Location even when it does not follow it, and raises
                # on one it cannot parse (`javascript:x`, `http://xn--/`): the server's answer.
                raise _bad_url(param, UNUSABLE_REDIRECT) from exc
        raise _bad_url(param, "URL could not be connected to") from error

    async def _read_body(self, response: httpx.Response, *, param: str) -> bytes:
        """The raw body, refused early when its declared length is over the cap, else cut at the cap."""
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise _bad_url(param, f"URL answered with Content-Encoding {encoding!r}; images must come uncompressed")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise self._too_large(param)
        chunks, size = [], 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > self.max_bytes:
                raise self._too_large(param)
            chunks.append(chunk)
        return b"".join(chunks)


MAX_PERCENT_ESCAPES = 1 << 18
"""Most %XX escapes a data: URL may hold (a URL-encoded base64 has one per `+`, `/` and `=`,
about 3% of it; an image sent as percent-encoded bytes, one per byte of most of it). Decoding
them is a Python loop that holds the GIL: 8.7 million (a 25 MiB edit body of them) held it for
2.2 s, slowing the ingress's event loop, which serves every request, about fourfold meanwhile;
this many take about 0.07 s."""


def _percent_decoded(payload: str, *, param: str) -> bytes:
    try:
        return urllib.parse.unquote_to_bytes(payload)
    except UnicodeError as exc:  # a lone surrogate (JSON's "\ud800") is no character to encode
        raise _bad_url(param, "data: URL holds text that is not valid Unicode") from exc


def _bad_url(param: str, problem: str) -> InvalidRequest:
    return InvalidRequest(f"{param} {problem}.", param=param, code="invalid_image_url")
