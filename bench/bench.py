#!/usr/bin/env python
"""Benchmark serve_app against the naive server and LitServe, in one run, on this machine.

    flock /tmp/serve_app_ray.lock .venv/bin/python bench/bench.py [--quick] [--concurrency 1,4,16,64]
        [--max-tokens N] [--out bench/results] [--serve-config-extra extra.yaml]

One system at a time, each a subprocess on its own loopback port, stopped when
its measurements are done: (1) serve_app with batching, (2) serve_app with max
batch size 1, (3) a naive FastAPI + transformers server, (4) LitServe with its
own batching; plus the serving path alone (echo, vs plain uvicorn) and images/s
(vs a naive sequential diffusers server). See bench/README.md for every row.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from bench import report, scenarios, systems  # noqa: E402
from bench.procs import PYTHON, QUIET_BELOW, Server, base_env, http_ok, read_cpu, wait_quiet  # noqa: E402
from bench.scenarios import Plan  # noqa: E402


def log(message: str) -> None:
    print(message, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="concurrency 1,4, fewer requests, 16 tokens (~4 min)")
    parser.add_argument("--concurrency", help="comma-separated client counts (default 1,4,16,64)")
    parser.add_argument("--max-tokens", type=int, help="output tokens per request (default 32, quick 16)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--serve-config-extra", type=Path,
                        help="YAML/JSON with keys chat, image, app, chat_batching_off, config merged into "
                             "the generated Serve config (see bench/README.md)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads of every server")
    parser.add_argument("--only", type=_subset, help=f"comma-separated subset: {','.join(PARTS)}")
    return parser.parse_args(argv)


PARTS = ("ray_batch", "ray_nobatch", "naive", "litserve", "echo", "images")


def _subset(text: str) -> set[str]:
    """`--only`'s parts; a misspelt one is an error, not a run that measures nothing."""
    parts = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(parts - set(PARTS))
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    return parts


def make_plan(args: argparse.Namespace) -> Plan:
    quick = args.quick
    conc = [int(c) for c in (args.concurrency or ("1,4" if quick else "1,4,16,64")).split(",")]
    return Plan(concurrency=conc, max_tokens=args.max_tokens or (16 if quick else 32),
                deadline_s=20.0 if quick else 120.0, waves=1 if quick else 2, min_requests=3 if quick else 6,
                echo_connections=(1, 32), echo_seconds=3.0 if quick else 6.0, image_requests=16 if quick else 96)


def ensure_ready(ctx: systems.Context, notes: list[str]) -> None:
    """The bench model (built if missing), and the bench extra (LitServe, matplotlib, aiohttp:
    installed into this venv if missing)."""
    if not (ctx.chat_path / "config.json").exists() or not (ctx.image_path / "model_index.json").exists():
        log("building models/bench-llama and models/tiny-sd ...")
        subprocess.run([PYTHON, "-m", "serve_app.tiny_models", str(ctx.chat_path.parent), "--chat-preset", "bench"],
                       cwd=ROOT, check=True, env=base_env(ctx.threads))
    missing = [module for module in ("litserve", "matplotlib", "aiohttp")
               if subprocess.run([PYTHON, "-c", f"import {module}"], capture_output=True).returncode != 0]
    if missing:  # the versions pyproject's `bench` extra names (LitServe's OpenAI spec changes between minors)
        log(f"installing the bench extra ({', '.join(missing)} missing) into the venv ...")
        done = subprocess.run([PYTHON, "-m", "pip", "install", "-q", "-e", f"{ROOT}[bench]"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            notes.append(f"{', '.join(missing)} missing and could not be installed: {done.stderr.strip()[-200:]}")


def run_inprocess(ctx: systems.Context, plan: Plan, prompts: list, tmp: Path) -> dict[str, Any]:
    """The in-process TTFT floor and the prompts that run max_tokens without EOS (bench/inprocess.py)."""
    prompts_file = tmp / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    done = subprocess.run([PYTHON, "-m", "bench.inprocess", "--model", str(ctx.chat_path), "--max-tokens",
                           str(plan.max_tokens), "--prompts", str(prompts_file),
                           "--probes", str(plan.chat_requests(1))], cwd=ROOT, capture_output=True,
                          text=True, env=base_env(ctx.threads), timeout=600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-1500:])
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextmanager
def running(server: Server, probe: Callable[[], bool], timeout_s: float) -> Iterator[Server]:
    """A started server, ready, and stopped on the way out whatever happens."""
    started = time.monotonic()
    try:
        server.wait_ready(probe, timeout_s)
        waited, busy = wait_quiet()  # every system is measured on a settled machine
        server.settled = {"waited_s": waited, "cores_busy": busy}
        log(f"  {server.name} ready on :{server.port} in {time.monotonic() - started:.1f}s; "
            f"cores {busy:.0%} busy after {waited}s")
        yield server
    finally:
        server.stop()
        log(f"  {server.name} stopped")


def start_ray(ctx: systems.Context, key: str, batching: bool, echo: bool, results: dict) -> tuple[Server, dict]:
    """Ray row with the fast switches; on failure to come up, once more with Ray's defaults."""
    prefixes = [systems.ECHO_PREFIX, systems.FLOOR_PREFIX] if echo else []
    for fast in (True, False):
        started = time.monotonic()
        server, settings = systems.launch_ray(ctx, key, batching=batching, echo=echo, fast=fast)
        try:
            server.wait_ready(lambda: systems.ray_probe(server, prefixes), 300)
        except BaseException as exc:  # Ctrl-C included: never leave a Ray behind
            server.stop()
            if not fast or not isinstance(exc, RuntimeError):
                raise
            results["notes"].append(f"{key}: did not start with {systems.FAST_ENV} ({str(exc)[-300:]}); "
                                    "fell back to Ray's defaults")
            continue
        try:
            settings["haproxy_running"] = systems.haproxy_running(settings["temp_dir"])
            settings["replica_omp_threads"] = systems.replica_threads(settings["temp_dir"])
        except BaseException:  # Ctrl-C before the caller holds the server: stopped here
            server.stop()
            raise
        settings["start_s"] = round(time.monotonic() - started, 1)
        log(f"  serve run up in {settings['start_s']}s (fast switches: {fast}, "
            f"haproxy running: {settings['haproxy_running']})")
        return server, settings
    raise AssertionError("unreachable")


def model_names(settings: dict[str, Any]) -> tuple[str, str]:
    """(chat, image) model names: the generated Serve config's, or any name for our own servers."""
    if "config" not in settings:
        return "bench", "bench-image"
    models = settings["config"]["applications"][0]["args"]["models"]
    chat = next(m for m in models if m["kind"] == "chat")
    settings["chat_batching"] = systems.effective_batching(chat)
    return chat["name"], next(m["name"] for m in models if m["kind"] == "image")


def measure_system(key: str, ctx: systems.Context, plan: Plan, prompts: list, results: dict,
                   wanted: set[str]) -> None:
    """Start one chat system, run its cells (and its extra scenarios), stop it."""
    log(f"\n== {report.LABELS[key]}")
    settings: dict[str, Any] = {}
    started = time.monotonic()
    if key.startswith("ray"):
        server, settings = start_ray(ctx, key, batching=key == "ray_batch", echo=False, results=results)
        probe: Callable[[], bool] = lambda: True  # noqa: E731 - start_ray waited already
    else:
        if key == "naive":
            server = systems.launch_naive(ctx, "images" in wanted)
        else:
            server, settings = systems.launch_litserve(ctx)
        probe = lambda: http_ok(server.base_url + "/health")  # noqa: E731
    try:
        with running(server, probe, 300):
            model, image_model = model_names(settings)
            url = server.base_url + "/v1/chat/completions"
            asyncio.run(scenarios.measure_chat(url, model, prompts, plan, log, out=results["chat"].setdefault(key, {})))
            if "images" in wanted and key in ("ray_batch", "naive"):
                name = "serve_app" if key == "ray_batch" else "naive"
                results["images"][name] = asyncio.run(scenarios.measure_images(
                    server.base_url + "/v1/images/generations", image_model, plan, log))
    finally:  # interrupted too: the settings of the cells kept
        _record_settled(results, key, server, settings)
        _record_system(results, key, settings, started)


def _record_settled(results: dict, key: str, server: Server, settings: dict[str, Any]) -> None:
    """How busy the cores were as `key`'s measuring began, into its settings; a note where
    something else still kept them busy (another job on the machine skews every figure)."""
    if server.settled is None:
        return
    settings["settled"] = server.settled
    if server.settled["cores_busy"] >= QUIET_BELOW:  # wait_quiet gave up waiting
        results["notes"].append(f"WARNING: {key} was measured on a busy machine: cores "
                                f"{server.settled['cores_busy']:.0%} busy after {server.settled['waited_s']} s")


def _record_system(results: dict, key: str, settings: dict[str, Any], started: float) -> None:
    settings["seconds"] = round(time.monotonic() - started, 1)
    results["systems"][key] = {k: v for k, v in settings.items() if k != "config"} | (
        {"serve_config": settings["config"]} if "config" in settings else {})


def measure_ray_echo(ctx: systems.Context, plan: Plan, results: dict) -> None:
    """The serving path (serve_app's echo model through HAProxy, ingress and model deployment),
    the same path with a minimal ingress (one FastAPI route: the issue's own setup), and Ray's
    handle floor, each with where the CPU went, on a Serve instance of their own: row 1's config
    plus the echo deployments, which the chat rows then run without (idle deployments cost CPU on
    2 cores)."""
    log("\n== serve_app echo (the full serving path), a minimal ingress, and Ray's handle floor")
    started = time.monotonic()
    server, settings = start_ray(ctx, "ray_echo", batching=True, echo=True, results=results)
    try:
        with running(server, lambda: True, 300):
            groups = systems.echo_cpu_groups(settings["config"])
            for key, prefix in (("serve_app", ""), ("ray_minimal", systems.ECHO_PREFIX)):
                cells = asyncio.run(scenarios.measure_echo(
                    server.base_url + prefix + "/v1/chat/completions", systems.ECHO_MODEL, plan, log,
                    label=f"{key} echo", cpu=functools.partial(read_cpu, groups[key])))
                results["echo"].update({f"{key}@{c}": cell for c, cell in cells.items()})
            floor = asyncio.run(scenarios.measure_handle_floor(server.base_url + systems.FLOOR_PREFIX, plan, log,
                                                               functools.partial(read_cpu, groups["ray_handle"])))
            results["echo"].update({f"ray_handle@{c}": cell for c, cell in floor.items()})
    finally:  # interrupted too, as measure_system
        _record_settled(results, "ray_echo", server, settings)
        _record_system(results, "ray_echo", settings, started)


def measure_plain_echo(ctx: systems.Context, plan: Plan, results: dict) -> None:
    log("\n== plain uvicorn echo (the same handler, no Ray)")
    server = systems.launch_plain_echo(ctx)
    settings: dict[str, Any] = {}
    try:
        with running(server, lambda: http_ok(server.base_url + "/health"), 60):
            cells = asyncio.run(scenarios.measure_echo(server.base_url + "/v1/chat/completions",
                                                       systems.ECHO_MODEL, plan, log, label="plain echo",
                                                       cpu=functools.partial(read_cpu, systems.PLAIN_ECHO_GROUPS)))
        results["echo"].update({f"plain@{c}": cell for c, cell in cells.items()})
    finally:  # interrupted too, as measure_system
        _record_settled(results, "plain_echo", server, settings)
        results["systems"]["plain_echo"] = settings


def measure_all(ctx: systems.Context, plan: Plan, wanted: set[str], results: dict[str, Any], run_dir: Path) -> None:
    """The in-process reference, then each wanted system in turn, into `results` as each finishes."""
    prompts = scenarios.candidate_prompts()
    try:
        results["inprocess"] = run_inprocess(ctx, plan, prompts, run_dir)
        kept = results["inprocess"]["keep"]
        if kept:
            prompts = [prompts[i] for i in kept]
        else:  # every system still gets the same prompts; the table flags cells that ended early
            results["notes"].append(f"no prompt ran {plan.max_tokens} tokens without an end token in-process: "
                                    "all are used")
        log(f"in-process generate: TTFT p50 {results['inprocess']['ttft_p50_ms']} ms, torch threads "
            f"{results['inprocess']['torch_threads']}, {len(kept)}/{len(scenarios.TOPICS)} prompts run "
            f"{plan.max_tokens} tokens without EOS, their first token text")
    except Exception as exc:  # noqa: BLE001 - the servers can still be measured
        results["skipped"]["inprocess"] = str(exc)[-500:]
        log(f"in-process reference skipped: {str(exc)[-300:]}")
    steps: list[tuple[str, Callable[[], None]]] = []
    if "images" in wanted and not {"ray_batch", "naive"} <= wanted:
        results["notes"].append("images are measured on the ray_batch and naive servers: --only needs both "
                                "beside images for the images row and its ratio")
    if "echo" in wanted:
        steps.append(("plain_echo", lambda: measure_plain_echo(ctx, plan, results)))
        steps.append(("ray_echo", lambda: measure_ray_echo(ctx, plan, results)))
    for key in ("naive", "litserve", "ray_batch", "ray_nobatch"):
        if key in wanted:
            steps.append((key, lambda key=key: measure_system(key, ctx, plan, prompts, results, wanted)))
    for key, step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - one broken system must not cost the others' rows
            results["skipped"][key] = f"{type(exc).__name__}: {str(exc)[-800:]}"
            log(f"  SKIPPED {key}: {type(exc).__name__}: {str(exc)[-800:]}")
    if "inprocess" in results and results["chat"]:
        # Once more at the end, on the same prompts: a shared VM's speed drifts over a run; the
        # first-token target compares with the lower of the two.
        try:
            results["inprocess_end"] = run_inprocess(ctx, plan, prompts, run_dir)
        except Exception as exc:  # noqa: BLE001 - only context is lost
            results["skipped"]["inprocess_end"] = str(exc)[-500:]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    wanted = args.only or set(PARTS)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    run_dir = Path(f"/tmp/serve_app_bench_{stamp}")
    extra = yaml.safe_load(args.serve_config_extra.read_text()) if args.serve_config_extra else {}
    ctx = systems.Context(chat_path=ROOT / "models" / "bench-llama", image_path=ROOT / "models" / "tiny-sd",
                          threads=args.threads, log_dir=run_dir, extra=extra or {})
    results: dict[str, Any] = {"meta": {"started": stamp, "plan": plan.__dict__, "threads": args.threads,
                                        "cpus": os.cpu_count(), "logs": str(run_dir), "argv": sys.argv[1:]},
                               "notes": [], "chat": {}, "echo": {}, "images": {}, "systems": {}, "skipped": {}}
    began = time.monotonic()
    run_dir.mkdir(parents=True, exist_ok=True)
    ensure_ready(ctx, results["notes"])
    log(f"plan: {plan}\nlogs: {run_dir}")
    interrupted = False
    try:
        measure_all(ctx, plan, wanted, results, run_dir)
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM, SIGHUP: the servers are stopped by now
        interrupted = True
        results["notes"].append(f"interrupted ({stop or 'Ctrl-C'}): the results measured so far")
        log(f"\ninterrupted ({stop or 'Ctrl-C'}): writing the results measured so far")
    results["meta"]["seconds"] = round(time.monotonic() - began, 1)
    finish(results, plan, args.out, stamp)
    return 130 if interrupted else 0


def finish(results: dict[str, Any], plan: Plan, out: Path, stamp: str) -> None:
    """Print the tables and the targets; write the JSON and the plot."""
    results["targets"] = report.targets(results)
    log("\n" + report.chat_table(results["chat"], plan.concurrency))
    unequal = report.unequal_work(results["chat"], plan.max_tokens)
    results["unequal_work"] = unequal
    for cell in unequal:
        log(f"WARNING: not the same work as the other rows ({plan.max_tokens} tokens per request, each "
            f"request's first token timed): {cell}")
    results["lossy_cells"] = report.lossy_cells(results)
    for cell in results["lossy_cells"]:
        log(f"WARNING: requests lost (the rate counts only the others): {cell}")
    if results["echo"]:
        log(report.simple_table("Serving path alone (echo)", results["echo"], "req/s") + "\n")
        cpu = report.cpu_table(results["echo"])
        if cpu:
            log(cpu + "\n")
    if results["images"]:
        log(report.simple_table(f"Images ({plan.image_size}, {plan.image_steps} steps)", results["images"],
                                "images/s") + "\n")
    if "inprocess" in results:
        again = results.get("inprocess_end", {}).get("ttft_p50_ms")
        log(f"In-process generate TTFT p50: {results['inprocess']['ttft_p50_ms']} ms at the start"
            + (f", {again} ms at the end" if again is not None else "") + "\n")
    log(report.targets_table(results["targets"]))
    for key, settings in results["systems"].items():
        if key.startswith("ray"):
            log(f"{key}: env {settings.get('env')} haproxy running: {settings.get('haproxy_running')} "
                f"chat batching {settings.get('chat_batching')} replica OMP_NUM_THREADS "
                f"{settings.get('replica_omp_threads')} started in {settings.get('start_s')}s "
                f"notes {settings.get('notes')}")
    for note in results["notes"]:
        log(f"note: {note}")
    for key, why in results["skipped"].items():
        log(f"skipped {key}: {why.splitlines()[0] if why else ''}")
    json_path = out / f"bench_{stamp}.json"
    report.write_json(json_path, results)
    why_not = report.plot(out / f"bench_{stamp}.png", results["chat"], plan.concurrency)
    log(f"\nwrote {json_path}" + (f" ({why_not})" if why_not else f" and {out / f'bench_{stamp}.png'}")
        + f"; total {results['meta']['seconds']}s")


def _unwind_on_sigterm() -> None:
    """SIGTERM (`timeout`, `kill`) and SIGHUP (a closed terminal or SSH session) unwind like
    Ctrl-C, so the `finally` of every started server runs and no Ray instance or HAProxy
    outlives the benchmark."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # under nohup it stays ignored
        signal.signal(signal.SIGHUP, interrupt)


if __name__ == "__main__":
    _unwind_on_sigterm()
    sys.exit(main())
