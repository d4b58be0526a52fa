"""The benchmark's verdicts (bench/report.py, bench/bench.py's arguments), on made-up cells.

The benchmark itself is not part of the suite (it takes minutes and an idle machine); what
it concludes from its figures is plain Python, checked here: a target must not pass on
cells that lost requests without saying so, and a ratio must not rest on a cut cell.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bench import bench, report
from bench.loadgen import Sample, chat_tokens, summarize
from bench.loadgen import _read_json  # noqa: PLC2701 - the one reader of a non-streamed answer

MAX_TOKENS = 32


def cell(units_per_s: float, *, cut: int = 0, errors: int = 0, ok: int = 64) -> dict[str, Any]:
    return {"units_per_s": units_per_s, "req_per_s": units_per_s, "concurrency": 64, "cut": cut, "errors": errors,
            "ok": ok, "ttft_p50_ms": 50.0, "ttft_p99_ms": 90.0, "latency_p50_ms": 900.0, "latency_p99_ms": 1500.0,
            "units_per_request": float(MAX_TOKENS), "ttft_samples": ok}


def results(chat: dict[str, Any] | None = None, echo: dict[str, Any] | None = None,
            images: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"meta": {"plan": {"max_tokens": MAX_TOKENS}}, "chat": chat or {}, "echo": echo or {},
            "images": images or {}}


def verdict(rows: list[tuple[str, str, str]], name: str) -> str:
    return next(v for target, _, v in rows if target.startswith(name))


def test_no_ratio_rests_on_a_cell_cut_at_the_deadline() -> None:
    """A cut cell's rate counts only the requests that finished in time (the slowest missing):
    a ratio against it, on either side, would flatter or slight the other row."""
    chat = {"naive": {"json": {"64": cell(10.0, cut=30)}}, "ray_batch": {"json": {"64": cell(100.0)}}}
    row = next(line for line in report.chat_table(chat, [64]).splitlines() if line.startswith("1 serve_app"))
    assert "100.0" in row and "x)" not in row
    chat["naive"]["json"]["64"]["cut"] = 0
    row = next(line for line in report.chat_table(chat, [64]).splitlines() if line.startswith("1 serve_app"))
    assert "100.0 (10.00x)" in row


def test_echo_and_image_targets_resting_on_lost_requests_are_marked() -> None:
    echo = {"serve_app@32": cell(2000.0, errors=500), "plain@32": cell(8000.0),
            "serve_app@1": cell(500.0), "plain@1": cell(600.0)}
    images = {"serve_app": cell(30.0, errors=90), "naive": cell(10.0)}
    rows = report.targets(results(echo=echo, images=images))
    assert verdict(rows, "serving path @32") == "PASS*" and verdict(rows, "images @8") == "PASS*"
    assert verdict(rows, "serving path @1") == "PASS"
    assert report.lossy_cells(results(echo=echo, images=images)) == [
        "echo serve_app@32: 500 failed, 0 cut", "images serve_app: 90 failed, 0 cut"]
    assert "lost requests" in report.targets_table(rows)
    echo["serve_app@32"]["errors"] = images["serve_app"]["errors"] = 0
    rows = report.targets(results(echo=echo, images=images))
    assert verdict(rows, "serving path @32") == "PASS" and verdict(rows, "images @8") == "PASS"


def test_first_token_overhead_is_taken_over_the_lower_in_process_figure() -> None:
    """The in-process reference is taken before and after the servers; on a shared VM one of the
    two may come from a slower moment, which would shrink the servers' measured overhead."""
    chat = {"ray_batch": {"stream": {"1": {**cell(20.0), "ttft_p50_ms": 44.0}}}}
    before_only = {**results(chat=chat), "inprocess": {"ttft_p50_ms": 32.0}}
    assert verdict(report.targets(before_only), "TTFT @1") == "PASS"  # 12 ms
    both = {**before_only, "inprocess_end": {"ttft_p50_ms": 28.0}}
    assert verdict(report.targets(both), "TTFT @1") == "FAIL"  # 16 ms over the lower one


def test_a_cell_where_nothing_finished_shows_no_latency() -> None:
    empty = summarize([Sample(False, 1.0, error="HTTP 503")], concurrency=1, sent=1, wall_s=1.0).__dict__
    assert empty["latency_p50_ms"] is None
    line = report.simple_table("echo", {"serve_app@1": empty}, "req/s").splitlines()[-1]
    assert line.split()[3:5] == ["-", "-"]


def test_an_error_page_that_is_not_json_keeps_its_status() -> None:
    """A proxy's 502 page is HTML: the error says HTTP 502, not that JSON failed to parse."""
    import aiohttp

    async def bad_gateway(request: web.Request) -> web.Response:
        return web.Response(status=502, text="<html>502 Bad Gateway</html>", content_type="text/html")

    async def fetch() -> Sample:
        app = web.Application()
        app.router.add_post("/", bad_gateway)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - the port the OS chose
        try:
            async with aiohttp.ClientSession() as session, session.post(f"http://127.0.0.1:{port}/", json={}) as r:
                return await _read_json(r, 0.0, chat_tokens)
        finally:
            await runner.cleanup()

    sample = asyncio.run(fetch())
    assert not sample.ok and sample.error.startswith("HTTP 502: <html>")


@pytest.mark.parametrize("only,ok", [("echo,images", True), ("ray_batch, naive", True), ("eco", False), ("", False)])
def test_only_takes_the_known_parts(only: str, ok: bool, capsys: pytest.CaptureFixture[str]) -> None:
    """A misspelt part is an error, not a run that measures nothing and writes an empty result."""
    if ok:
        assert bench.parse_args(["--only", only]).only <= set(bench.PARTS)
    else:
        with pytest.raises(SystemExit):
            bench.parse_args(["--only", only])
        assert "choose from" in capsys.readouterr().err


def test_a_system_measured_on_a_busy_machine_is_flagged() -> None:
    """The benchmark waits up to 30 s for the cores to settle before each system; where they did
    not (another job on the machine), the run says so and the JSON keeps how busy they were."""
    from types import SimpleNamespace

    results: dict[str, Any] = {"notes": []}
    quiet, busy = {}, {}
    bench._record_settled(results, "naive", SimpleNamespace(settled={"waited_s": 1.0, "cores_busy": 0.05}), quiet)
    bench._record_settled(results, "litserve", SimpleNamespace(settled={"waited_s": 30.0, "cores_busy": 0.6}), busy)
    assert quiet["settled"]["cores_busy"] == 0.05 and busy["settled"]["cores_busy"] == 0.6
    assert results["notes"] == ["WARNING: litserve was measured on a busy machine: cores 60% busy after 30.0 s"]


def _fake_proc(root: Path, cores: tuple[int, ...], procs: dict[int, tuple[str, int, int]]) -> Path:
    """A /proc with a first /proc/stat line (user nice system idle iowait irq softirq steal) and
    processes (pid: command line, utime, stime), each named "a b) c" as a process may be."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "stat").write_text("cpu  " + " ".join(map(str, cores)) + "\ncpu0 0 0 0 0\n")
    for pid, (cmdline, utime, stime) in procs.items():
        (root / str(pid)).mkdir()
        (root / str(pid) / "cmdline").write_bytes(cmdline.encode())
        (root / str(pid) / "stat").write_text(f"{pid} (a b) c) S 1 1 1 0 -1 0 0 0 0 0 {utime} {stime} 0 0 20 0 1 0\n")
    return root


def test_cpu_is_counted_by_process_group(tmp_path: Path) -> None:
    """The serving-path cells say where the CPU went, from two readings of /proc: a process
    whose command line names a group counts under it (in either reading: Ray retitles a replica
    while it runs a call), the benchmark's own process under the load generator, and the rest
    of the cores' busy time (idle and iowait are not busy), processes that came or went between
    the readings included, under "other"."""
    from bench.procs import CLOCK_TICKS, LOAD_GENERATOR, OTHER, cpu_by_group, read_cpu
    from bench.scenarios import cpu_use

    groups = {"ServeReplica:app:ingress\0": "ingress", "/haproxy\0": "proxy", "ServeReplica:app:model\0": "model"}
    me = os.getpid()
    before = read_cpu(groups, _fake_proc(tmp_path / "1", (1000, 0, 500, 9000, 100, 50, 50, 7), {
        11: ("ray::ServeReplica:app:ingress\0", 300, 100), 12: ("/venv/haproxy\0-f\0cfg\0", 10, 10),
        13: ("ray::ServeReplica:app:model.check_health\0", 50, 50), 14: ("gone\0", 5, 5), me: ("python\0", 20, 0)}))
    after = read_cpu(groups, _fake_proc(tmp_path / "2", (1500, 0, 700, 99000, 900, 60, 70, 999), {
        11: ("ray::ServeReplica:app:ingress.handle_request\0", 500, 150), 12: ("/venv/haproxy\0-f\0cfg\0", 30, 20),
        13: ("ray::ServeReplica:app:model\0", 90, 60), 15: ("new\0", 40, 0), me: ("python\0", 60, 0)}))
    used = {group: round(value * CLOCK_TICKS) for group, value in cpu_by_group(before, after).items()}
    # busy = user + nice + system + irq + softirq: 1600 -> 2330; idle, iowait and steal do not count.
    assert used == {"ingress": 250, "proxy": 30, "model": 50, LOAD_GENERATOR: 40, "all": 730, OTHER: 360}
    use = cpu_use(before, after, requests=10, seconds=7.3 / CLOCK_TICKS * 100)
    assert use["cpu_ms_per_request"]["ingress"] == round(1000 * 250 / CLOCK_TICKS / 10, 3)
    assert use["cores_busy"] == 1.0
    assert cpu_use(before, after, requests=0, seconds=1.0) == {}  # a cell that answered nothing


def test_this_process_and_a_named_one_are_read_from_the_real_proc() -> None:
    """The same readings on this machine's /proc: a process that burns CPU is found by its
    command line, and this one's own CPU counts as the load generator's."""
    import subprocess
    import sys
    import time

    from bench.procs import LOAD_GENERATOR, cpu_by_group, read_cpu

    marker = "cpu-group-test-burner"
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass", marker])
    try:
        time.sleep(0.2)  # started and burning
        before = read_cpu({marker: "burner"})
        spinning_since = time.process_time()
        while time.process_time() - spinning_since < 0.2:  # the load generator's share: this process
            pass
        after = read_cpu({marker: "burner"})
    finally:
        burner.kill()
        burner.wait(timeout=30)
    used = cpu_by_group(before, after)
    assert used["burner"] >= 0.05 and used[LOAD_GENERATOR] >= 0.15
    assert used["all"] >= used["burner"] + used[LOAD_GENERATOR] - 0.05  # busy time covers what they used


def test_the_cpu_table_and_the_serving_path_budget() -> None:
    """The CPU table lists each measured cell's groups in a fixed order, "-" where a cell has no
    such process; the targets add what 20% of plain leaves each request of the cores and what
    Ray's handle hop alone used."""
    echo = {"plain@32": cell(10_000.0) | {"cpu_ms_per_request": {"load generator": 0.1, "server": 0.09, "other": 0.0},
                                          "cores_busy": 1.9},
            "ray_handle@32": cell(2_500.0) | {"cpu_ms_per_request": {"caller": 0.34, "model": 0.33, "other": 0.08},
                                              "cores_busy": 1.9},
            "serve_app@32": cell(1_000.0)}
    table = report.cpu_table(echo).splitlines()
    assert table[1].split() == ["what", "server", "caller", "model", "load", "generator", "other", "total", "cores",
                                "busy"]
    assert table[2].split() == ["plain@32", "0.090", "-", "-", "0.100", "0.000", "0.190", "1.90"]
    assert len(table) == 4  # serve_app@32 recorded no CPU
    assert report.cpu_table({"serve_app@32": cell(1_000.0)}) is None
    rows = report.targets(results(echo=echo) | {"meta": {"plan": {"max_tokens": MAX_TOKENS}, "cpus": 2}})
    measured = {name.strip(): value for name, value, _ in rows}
    assert measured["context: CPU ms a request may use at 20% of plain"] == "1.00"  # 2 cores / 2,000 req/s
    assert measured["context: CPU ms of Ray's handle hop alone @32"] == "0.67"
