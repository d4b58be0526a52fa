"""The one load generator every system is measured with: a closed loop of N
concurrent clients in one asyncio process (aiohttp, loopback only).

A cell sends up to `total` requests with at most `concurrency` in flight, issues
new ones only during `issue_window_s` (a rate test runs for a fixed time), and
stops hard at `deadline_s`: requests still running then are cancelled and
counted as `cut` (not as errors); the figures come from the requests that finished. Output
tokens are counted from what each server reports in `usage` (streams ask for
`stream_options.include_usage`; a stream without usage counts its content
chunks), so tokens/s is computed from real counts, never assumed.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import aiohttp

BodyFactory = Callable[[int], dict[str, Any]]


@dataclass
class Sample:
    """One request's outcome."""

    ok: bool
    latency_s: float
    ttft_s: float | None = None
    units: int = 0  # output tokens (chat), images (image route), 1 (echo)
    error: str | None = None


@dataclass
class CellResult:
    """Aggregate figures of one (system, mode, concurrency) cell."""

    concurrency: int
    sent: int
    ok: int
    errors: int
    cut: int
    wall_s: float
    units: int
    units_per_s: float
    req_per_s: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    units_per_request: float | None
    first_errors: list[str] = field(default_factory=list)
    ttft_samples: int = 0  # answered requests that showed text (the TTFT percentiles' sample)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation: p99 of 20 samples is the worst one)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 2)


def summarize(samples: list[Sample], concurrency: int, sent: int, wall_s: float) -> CellResult:
    good = [s for s in samples if s.ok]
    units = sum(s.units for s in good)
    ttfts = [s.ttft_s for s in good if s.ttft_s is not None]
    latencies = [s.latency_s for s in good]
    errors = [s for s in samples if not s.ok]
    wall = max(wall_s, 1e-9)
    return CellResult(
        concurrency=concurrency, sent=sent, ok=len(good), errors=len(errors), cut=sent - len(samples),
        wall_s=round(wall_s, 3), units=units, units_per_s=round(units / wall, 2),
        req_per_s=round(len(good) / wall, 2),
        latency_p50_ms=_ms(percentile(latencies, 50)), latency_p99_ms=_ms(percentile(latencies, 99)),
        ttft_p50_ms=_ms(percentile(ttfts, 50)), ttft_p99_ms=_ms(percentile(ttfts, 99)),
        units_per_request=round(units / len(good), 2) if good else None,
        first_errors=sorted({e.error or "?" for e in errors})[:3], ttft_samples=len(ttfts))


async def _read_json(response: aiohttp.ClientResponse, started: float, count: Callable[[dict], int]) -> Sample:
    if response.status != 200:  # its body may be no JSON (a proxy's HTML page): the status is what counts
        text = await response.text(errors="replace")
        return Sample(False, time.perf_counter() - started, error=f"HTTP {response.status}: {text[:120]}")
    payload = await response.json(content_type=None)
    return Sample(True, time.perf_counter() - started, units=count(payload))


async def _read_sse(response: aiohttp.ClientResponse, started: float) -> Sample:
    """Parse an OpenAI chat stream: TTFT is the first event with content; tokens from usage."""
    if response.status != 200:
        text = await response.text()
        return Sample(False, time.perf_counter() - started, error=f"HTTP {response.status}: {text[:120]}")
    ttft: float | None = None
    content_events = 0
    usage_tokens: int | None = None
    done = False
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            return Sample(False, time.perf_counter() - started, error=f"stream error: {str(event)[:120]}")
        if any((choice.get("delta") or {}).get("content") for choice in event.get("choices") or []):
            content_events += 1
            if ttft is None:
                ttft = time.perf_counter() - started
        if event.get("usage"):
            usage_tokens = int(event["usage"].get("completion_tokens") or 0)
    latency = time.perf_counter() - started
    if not done:
        return Sample(False, latency, ttft, error="stream ended without [DONE]")
    return Sample(True, latency, ttft, units=usage_tokens if usage_tokens is not None else content_events)


def chat_tokens(payload: dict) -> int:
    """Completion tokens a non-streamed chat answer reports."""
    return int((payload.get("usage") or {}).get("completion_tokens") or 0)


def image_count(payload: dict) -> int:
    return len(payload.get("data") or [])


def one(payload: dict) -> int:
    return 1


async def _request(session: aiohttp.ClientSession, url: str, body: dict[str, Any], stream: bool,
                   count: Callable[[dict], int]) -> Sample:
    started = time.perf_counter()
    try:
        async with session.post(url, json=body) as response:
            if stream:
                return await _read_sse(response, started)
            return await _read_json(response, started, count)
    except Exception as exc:  # noqa: BLE001 - anything (a malformed event too) is this request's error,
        # not a worker lost without a trace (its request would count as cut, and concurrency drop)
        return Sample(False, time.perf_counter() - started, error=f"{type(exc).__name__}: {exc}"[:160])


async def run_cell(url: str, make_body: BodyFactory, *, concurrency: int, total: int, deadline_s: float,
                   stream: bool = False, count: Callable[[dict], int] = chat_tokens,
                   issue_window_s: float | None = None) -> CellResult:
    """Closed loop: `concurrency` workers share `total` requests until done or `deadline_s`."""
    samples: list[Sample] = []
    issued = 0
    connector = aiohttp.TCPConnector(limit=concurrency + 4, force_close=False)
    timeout = aiohttp.ClientTimeout(total=deadline_s + 30)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal issued
        while issued < total and time.perf_counter() < issue_until:
            index = issued
            issued += 1
            samples.append(await _request(session, url, make_body(index), stream, count))

    started = time.perf_counter()
    issue_until = started + (issue_window_s if issue_window_s is not None else deadline_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        workers = [asyncio.create_task(worker(session)) for _ in range(min(concurrency, total))]
        _, pending = await asyncio.wait(workers, timeout=deadline_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - started
    if pending:  # cut short: the rate is over the deadline, the whole window the server was busy
        wall = deadline_s
    return summarize(samples, concurrency, issued, wall)


async def post_once(url: str, body: dict[str, Any], timeout_s: float) -> tuple[int, Any]:
    """One request (warm-up, drain probe, readiness); returns (status, parsed body or text)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        async with session.post(url, json=body) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text
