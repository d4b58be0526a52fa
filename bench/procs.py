"""Starting and stopping the servers under test, each a subprocess of the benchmark.

Every server runs in its own session (process group) on its own free loopback
port, so that stopping it never touches anything this benchmark did not start:
SIGTERM to the server's own pid first (each server shuts down its own children
then), and only what is left of *its* process group, plus any HAProxy whose
command line names *its* config file, is killed afterwards. Never `ray stop`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import urllib.error
import urllib.request

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else "python"


def free_port() -> int:
    """A port that is free on loopback right now (the server binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env(threads: int) -> dict[str, str]:
    """The environment every server gets: offline, the same torch thread count,
    Ray's token auth off (Ray 2.60 turns it on once a token file exists)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_AUTH_MODE="disabled",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")])),
               PYTHONUNBUFFERED="1")
    return env


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when GET url answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback only
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class Server:
    """One running server process; `stop()` is idempotent."""

    name: str
    proc: subprocess.Popen
    port: int
    log_path: Path
    cleanup_marks: list[str] = field(default_factory=list)
    remove_dirs: list[Path] = field(default_factory=list)
    settled: dict[str, float] | None = None  # how quiet the machine was when measuring began

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, probe: Callable[[], bool], timeout_s: float) -> None:
        """Poll `probe` until it passes; raise (with the log's tail) if the server dies or is too slow."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if probe():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the server's pid, wait; then whatever is left of its group and its HAProxy.
        Ctrl-C, SIGTERM and SIGHUP wait until it is done (they would skip the rest of it)."""
        with _signals_held():
            self._stop(grace_s)

    def _stop(self, grace_s: float) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        _kill_group(self.proc.pid)
        for mark in self.cleanup_marks:
            _kill_marked(mark)
        for folder in self.remove_dirs:  # Ray's session files; the server's own log stays in log_dir
            shutil.rmtree(folder, ignore_errors=True)


def start(name: str, argv: list[str], env: dict[str, str], port: int, log_dir: Path,
          cleanup_marks: list[str] | None = None, remove_dirs: list[Path] | None = None) -> Server:
    """Start `argv` in its own session with output to `log_dir/<name>.log`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - the child owns it for its whole life
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_term_when_orphaned)
    log.close()
    return Server(name, proc, port, log_path, list(cleanup_marks or []), list(remove_dirs or []))


PROC = Path("/proc")


def _cpu_times(proc: Path = PROC) -> tuple[int, int]:
    """(busy, total) jiffies of all cores, from /proc/stat: user, nice, system, irq and softirq
    are busy; idle and iowait are not; steal (other VMs' time) and guest (already in user) are
    left out, so a shared VM's steal does not read as this machine's load."""
    user, nice, system, idle, iowait, irq, softirq = (
        int(v) for v in (proc / "stat").read_text().split("\n", 1)[0].split()[1:8])
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait


def processes(proc: Path = PROC) -> list[tuple[bytes, Path]]:
    """(command line, /proc entry) of every process that can be read."""
    found = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                found.append(((entry / "cmdline").read_bytes(), entry))
            except OSError:
                continue
    return found


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LOAD_GENERATOR = "load generator"
OTHER = "other"


@dataclass(frozen=True)
class CpuReading:
    """CPU seconds used so far: every core's busy time (`_cpu_times`), and each readable
    process's (user + system, every thread) with the group its command line names, if any."""

    busy_s: float
    processes: dict[int, tuple[str | None, float]]
    groups: tuple[str, ...]


def read_cpu(groups: dict[str, str], proc: Path = PROC) -> CpuReading:
    """A `CpuReading`: a process whose command line contains a key of `groups` (the first that
    does) is in that key's group; this process (the load generator) is in LOAD_GENERATOR."""
    me, found = os.getpid(), {}
    for cmd, entry in processes(proc):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()  # the name may hold ")"
            seconds = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        pid = int(entry.name)
        found[pid] = (LOAD_GENERATOR if pid == me else next(
            (name for key, name in groups.items() if key.encode() in cmd), None), seconds)
    return CpuReading(_cpu_times(proc)[0] / CLOCK_TICKS, found, (*dict.fromkeys(groups.values()), LOAD_GENERATOR))


def cpu_by_group(before: CpuReading, after: CpuReading) -> dict[str, float]:
    """CPU seconds each group used between two readings, counted over the processes present in
    both (one that only one reading put in a group, as Ray retitles a replica while it runs a
    call, is in that group); OTHER is the rest of the cores' busy time (processes in no group,
    or started or ended meanwhile, and the kernel's own work, such as the loopback traffic), so
    the groups add up to "all", the cores' busy time."""
    used = dict.fromkeys(after.groups, 0.0)
    for pid, (group, seconds) in after.processes.items():
        if pid in before.processes:
            earlier_group, earlier = before.processes[pid]
            group = group or earlier_group
            if group is not None:
                used[group] = used.get(group, 0.0) + seconds - earlier
    used["all"] = after.busy_s - before.busy_s
    used[OTHER] = used["all"] - sum(v for k, v in used.items() if k != "all")
    return used


QUIET_BELOW = 0.25  # the share of the cores' time busy under which the machine counts as settled


def wait_quiet(busy_below: float = QUIET_BELOW, timeout_s: float = 30.0, window_s: float = 1.0) -> tuple[float, float]:
    """Wait until the machine's cores are busy less than `busy_below` of the time over one
    window (a Ray instance just up is still starting its agents and pushing its first
    metrics), at most `timeout_s`: (seconds waited, last busy fraction)."""
    began = time.monotonic()
    while True:
        busy0, total0 = _cpu_times()
        time.sleep(window_s)
        busy1, total1 = _cpu_times()
        busy = (busy1 - busy0) / max(1, total1 - total0)
        waited = time.monotonic() - began
        if busy < busy_below or waited >= timeout_s:
            return round(waited, 1), round(busy, 2)


HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@contextlib.contextmanager
def _signals_held():
    """Hold the signals that end the benchmark until the block is done; one that came meanwhile
    is delivered (and unwinds) after it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)


def _term_when_orphaned() -> None:
    """In the child, before exec: SIGTERM when the benchmark dies without stopping it (SIGKILL,
    out of memory), which its own session would otherwise outlive with Ray and HAProxy."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _kill_group(pgid: int) -> None:
    """Kill what is left of a process group this benchmark created (its leader's pid)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(1.0)


def _kill_marked(mark: str) -> None:
    """Kill processes whose command line contains `mark` (a path unique to this run)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if mark.encode() in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
