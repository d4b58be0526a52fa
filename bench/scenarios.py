"""What is measured against a running server: chat cells, the echo path, images.

All of it goes through `loadgen.run_cell`, so every system sees the same client,
the same bodies (fixed prompts, greedy decoding, per-request seeds, the same
`max_tokens`) and the same request counts and deadlines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from bench.loadgen import BodyFactory, CellResult, Sample, image_count, one, post_once, run_cell, summarize
from bench.procs import CpuReading, cpu_by_group

MODES = ("json", "stream")
TOPICS = ["a lighthouse", "the moon", "a red fox", "rain in the city", "an old clock", "a garden", "the sea",
          "a train at night", "a quiet library", "mountains", "a paper boat", "autumn leaves", "a violin",
          "the desert", "a snowy village", "a lost key"]


@dataclass(frozen=True)
class Plan:
    """Sizes and bounds of one run (default or --quick)."""

    concurrency: list[int]
    max_tokens: int
    deadline_s: float
    waves: int  # requests per client slot up to concurrency 16
    min_requests: int  # at least this many per cell (TTFT at concurrency 1 wants samples)
    echo_connections: tuple[int, ...]
    echo_seconds: float  # each echo cell issues requests for this long (at most 100,000)
    image_requests: int
    image_concurrency: int = 8
    image_size: str = "128x128"
    image_steps: int = 2

    def chat_requests(self, concurrency: int) -> int:
        """Enough requests to measure, bounded: `waves` per client up to 16 clients (so that at
        16, where the batching targets are, requests also arrive while a batch decodes, as in
        service), then one wave (a system without batching needs 64 x one request's time for
        64 clients), at least `min_requests`."""
        return max(self.min_requests, concurrency * (self.waves if concurrency <= 16 else 1))


def candidate_prompts() -> list[list[dict[str, str]]]:
    return [[{"role": "system", "content": "You are a helpful assistant."},
             {"role": "user", "content": f"Write a long story about {topic}."}] for topic in TOPICS]


def chat_bodies(model: str, max_tokens: int, prompts: list[list[dict[str, str]]], stream: bool) -> BodyFactory:
    """Request i: prompt i mod len, greedy, seed 1000+i. `ignore_eos`/`min_tokens` (vLLM's extensions,
    which serve_app honours) make every answer `max_tokens` long; tokens are counted from `usage` anyway."""
    def make(index: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "messages": prompts[index % len(prompts)], "max_tokens": max_tokens,
                                "temperature": 0, "seed": 1000 + index, "stream": stream,
                                "ignore_eos": True, "min_tokens": max_tokens}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body
    return make


def warmed(what: str, outcome: CellResult | tuple[int, Any]) -> None:
    """A warm-up that failed stops that system's measuring (reported as skipped): cells measured
    after it would time a cold (or broken) server, and nothing in their figures would say so."""
    if isinstance(outcome, tuple):
        if outcome[0] != 200:
            raise RuntimeError(f"warm-up of {what} answered {outcome[0]}: {str(outcome[1])[:300]}")
    elif outcome.errors or outcome.cut:
        raise RuntimeError(f"warm-up of {what}: {outcome.errors} errors, {outcome.cut} cut {outcome.first_errors}")


async def warm_up_chat(url: str, model: str, prompts: list, max_tokens: int) -> None:
    """Compile/allocate paths before timing: alone, streamed, and a small concurrent burst."""
    warmed("chat", await post_once(url, chat_bodies(model, max_tokens, prompts, False)(0), 300))
    warmed("chat (streamed)", await run_cell(url, chat_bodies(model, 4, prompts, True), concurrency=1, total=1,
                                             deadline_s=120, stream=True))
    warmed("chat (4 at once)", await run_cell(url, chat_bodies(model, 4, prompts, False), concurrency=4, total=4,
                                              deadline_s=120))


async def drain(url: str, model: str, prompts: list) -> None:
    """After a cut cell: one tiny request that queues behind whatever the server still works on."""
    try:
        await post_once(url, chat_bodies(model, 1, prompts, False)(0), 300)
    except Exception:  # noqa: BLE001 - best effort: the next cell reports any real problem
        pass


async def measure_chat(url: str, model: str, prompts: list, plan: Plan, log,
                       out: dict[str, dict[str, dict]]) -> None:
    """Every (mode, concurrency) cell for one system, into `out` as each completes (an interrupted
    run keeps those): {mode: {str(conc): CellResult dict}}."""
    await warm_up_chat(url, model, prompts, plan.max_tokens)
    for mode in MODES:
        out.setdefault(mode, {})
        bodies = chat_bodies(model, plan.max_tokens, prompts, mode == "stream")
        for conc in plan.concurrency:
            cell = await run_cell(url, bodies, concurrency=conc, total=plan.chat_requests(conc),
                                  deadline_s=plan.deadline_s, stream=mode == "stream")
            out[mode][str(conc)] = cell.as_dict()
            log(f"    {mode:<6} c={conc:<3} {cell.units_per_s:8.1f} tok/s  e2e p50 {cell.latency_p50_ms} ms  "
                f"ttft p50 {cell.ttft_p50_ms} ms  ok {cell.ok}/{cell.sent} err {cell.errors} cut {cell.cut}"
                + (f"  {cell.first_errors}" if cell.first_errors else ""))
            if cell.cut:
                await drain(url, model, prompts)


CpuMeter = Callable[[], CpuReading]


def cpu_use(before: CpuReading, after: CpuReading, requests: int, seconds: float) -> dict[str, Any]:
    """Where the CPU went between two readings (`procs.cpu_by_group`): milliseconds per request
    of each group, and how many cores were busy on average; nothing for a cell that answered no
    request."""
    if not requests:
        return {}
    used = cpu_by_group(before, after)
    return {"cpu_ms_per_request": {group: round(1000 * value / requests, 3) for group, value in used.items()
                                   if group != "all"},
            "cores_busy": round(used["all"] / seconds, 2)}


def _cpu_line(use: dict[str, Any]) -> str:
    shares = "  ".join(f"{group} {ms:.3f}" for group, ms in use["cpu_ms_per_request"].items())
    return f"      CPU ms per request: {shares}  (cores busy {use['cores_busy']})"


async def measure_echo(url: str, model: str, plan: Plan, log, label: str = "echo",
                       cpu: CpuMeter | None = None) -> dict[str, dict]:
    """Requests/s and latency of the echo route at each connection count ({conc: CellResult dict}),
    and with `cpu`, where the CPU went during each cell (`cpu_use`)."""
    body = {"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    warmed(label, await run_cell(url, lambda i: body, concurrency=8, total=200, deadline_s=30, count=one))
    out = {}
    for conc in plan.echo_connections:
        before, began = (cpu() if cpu else None), time.monotonic()
        cell = await run_cell(url, lambda i: body, concurrency=conc, total=100_000, count=one,
                              issue_window_s=plan.echo_seconds, deadline_s=plan.echo_seconds + 30)
        out[str(conc)] = cell.as_dict()
        log(f"    {label} c={conc:<3} {cell.req_per_s:8.1f} req/s  p50 {cell.latency_p50_ms} ms  "
            f"p99 {cell.latency_p99_ms} ms  err {cell.errors} cut {cell.cut}")
        if before is not None and (use := cpu_use(before, cpu(), cell.ok, time.monotonic() - began)):
            out[str(conc)] |= use
            log(_cpu_line(use))
    return out


async def measure_images(url: str, model: str, plan: Plan, log) -> dict:
    """Images/s at `image_concurrency` concurrent clients (n=1 each, fixed size and steps)."""
    def body(index: int) -> dict[str, Any]:
        return {"model": model, "prompt": f"{TOPICS[index % len(TOPICS)]}, oil painting", "n": 1,
                "size": plan.image_size, "steps": plan.image_steps, "seed": index, "response_format": "b64_json"}
    # Warm-up at the measured concurrency: a batching server meets its batch shapes here (CPU kernels
    # are set up per shape on first use), as the sequential server meets its one shape.
    warmed("images", await run_cell(url, body, concurrency=plan.image_concurrency, total=2 * plan.image_concurrency,
                                    deadline_s=120, count=image_count))
    cell = await run_cell(url, body, concurrency=plan.image_concurrency, total=plan.image_requests,
                          deadline_s=plan.deadline_s, count=image_count)
    log(f"    images c={plan.image_concurrency} {cell.units_per_s:.2f} images/s  p50 {cell.latency_p50_ms} ms  "
        f"err {cell.errors} cut {cell.cut}" + (f"  {cell.first_errors}" if cell.first_errors else ""))
    return cell.as_dict()


async def measure_handle_floor(base_url: str, plan: Plan, log, cpu: CpuMeter | None = None) -> dict[str, dict]:
    """Ray's floor for the model hop alone (bench/echo_app.py's caller loop), at each echo connection count,
    summarised like the echo cells so the same table prints it (and with `cpu`, where the CPU went, per call)."""
    import aiohttp

    async def run(concurrency: int, seconds: float) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=seconds + 60)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(f"{base_url}/run", params={"concurrency": concurrency, "seconds": seconds}) as reply:
                reply.raise_for_status()
                return await reply.json()

    await run(8, 1.0)  # warm-up
    out = {}
    for conc in plan.echo_connections:
        before, began = (cpu() if cpu else None), time.monotonic()
        floor = await run(conc, plan.echo_seconds)
        calls = [Sample(True, latency, units=1) for latency in floor["latencies_s"]]
        cell = summarize(calls, conc, len(calls), floor["wall_s"])
        out[str(conc)] = cell.as_dict()
        log(f"    handle floor c={conc:<3} {cell.req_per_s:8.1f} calls/s  p50 {cell.latency_p50_ms} ms  "
            f"p99 {cell.latency_p99_ms} ms")
        if before is not None and (use := cpu_use(before, cpu(), len(calls), time.monotonic() - began)):
            out[str(conc)] |= use
            log(_cpu_line(use))
    return out
