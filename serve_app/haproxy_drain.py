"""Draining Serve's HAProxy ahead of Serve's shutdown, so that the requests in flight finish.

Serve's shutdown kills HAProxy at once (Ray 2.60's `HAProxyManager.stop` sends SIGKILL),
and every request in flight with it, streams cut mid-answer, though the replicas behind it
would have finished them. So a stop (`serve_run` for `serve.sh`, `serve_app.shutdown` on
every node of a cluster) drains HAProxy first, through its own admin socket (which
serve-app-haproxy adds to Serve's config: `haproxy_launcher`): `disable frontend` for each
frontend (new connections are refused; connections already open are served), then `show
sess` until no request is in flight, or the timeout. An HAProxy without that socket, or one
a reload has soft-stopped already (its sockets closed: it may still carry requests that
began before the reload), is soft-stopped and waited on until it ends.

HAProxy's own soft stop (SIGUSR1) is not enough: Serve's config has `option
idle-close-on-response`, which keeps idle keep-alive connections open through a soft stop
(until the next request or `timeout http-keep-alive`, 90 s), so a soft-stopped HAProxy stayed
up for any pooling client, and the stop waited out its whole timeout with nothing in flight.
And a soft-stopped HAProxy closes its admin socket, so its requests in flight cannot be
counted. SIGUSR1 remains the way where the admin socket cannot be used.
"""

from __future__ import annotations

import signal
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

POLL_S = 0.1


@dataclass
class Drained:
    """What a drain found: HAProxy processes, and what was still open when it gave up (`cut`):
    requests in flight, and soft-stopped HAProxy processes still up (`soft_stopped`, also
    counted in `cut`), whose requests in flight cannot be told from idle keep-alive connections
    (after a reload by Serve, the old process stays up for those)."""

    proxies: int = 0
    cut: int = 0
    soft_stopped: int = 0

    @property
    def requests_cut(self) -> int:
        """Requests known to be in flight still."""
        return self.cut - self.soft_stopped

    def __iadd__(self, other: Drained) -> Drained:
        self.proxies, self.cut = self.proxies + other.proxies, self.cut + other.cut
        self.soft_stopped += other.soft_stopped
        return self


class AdminSocket:
    """One HAProxy's admin socket (its config's `stats socket`) and its frontends."""

    def __init__(self, path: str, frontends: list[str]) -> None:
        self.path, self.frontends = path, frontends

    @classmethod
    def of(cls, process: psutil.Process) -> AdminSocket | None:
        """The process's own admin socket (`haproxy_launcher.admin_socket`, beside the config it
        was started with, `-f FILE`) and the config's frontends; None where it has none (an
        HAProxy not started by serve-app-haproxy)."""
        from serve_app.haproxy_launcher import admin_socket, config_path

        try:
            config = config_path(process.cmdline())
            path = None if config is None else admin_socket(config, process.pid)
            if path is None or not path.exists():
                return None
            frontends = [line.split()[1] for line in config.read_text().splitlines()
                         if line.split()[:1] in (["frontend"], ["listen"]) and len(line.split()) > 1]
        except Exception:  # noqa: BLE001 - psutil's errors, a config gone: no socket then
            return None
        return cls(str(path), frontends)

    def ask(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as admin:
            admin.settimeout(5)
            admin.connect(self.path)
            admin.sendall(command.encode() + b"\n")
            answer = b""
            while chunk := admin.recv(65536):
                answer += chunk
        return answer.decode(errors="replace")

    def refuse_new_connections(self) -> None:
        for frontend in self.frontends:
            self.ask(f"disable frontend {frontend}")

    def in_flight(self) -> int:
        """Requests HAProxy is handling (its sessions, less the admin socket's own; an idle
        keep-alive connection holds none)."""
        return sum(1 for line in self.ask("show sess").splitlines()
                   if line.startswith("0x") and " fe=GLOBAL " not in f"{line} ")


def drain_haproxy(timeout_s: float, under: psutil.Process | None = None) -> Drained:
    """Drain the HAProxy processes under `under` (default: this process, the `serve run` that
    started its Ray; on a cluster's node its raylet: never another server's), waiting up to
    `timeout_s` for their requests in flight. Processes are looked for again at every poll: a
    reload by Serve meanwhile starts a new HAProxy, whose frontends are open (it is drained
    too), and soft-stops the old one (its admin socket closes: it is waited on until it ends)."""
    import psutil  # Ray's own dependency

    root = under or psutil.Process()
    admins: dict[int, AdminSocket] = {}  # by pid: drained through their own admin socket
    signalled: dict[int, psutil.Process] = {}  # soft-stopped: waited on until they end
    seen: set[int] = set()

    def take_new() -> None:
        try:
            proxies = [p for p in root.children(recursive=True) if p.name() == "haproxy"]
        except psutil.Error:
            return
        for proxy in (p for p in proxies if p.pid not in seen):
            seen.add(proxy.pid)
            admin = AdminSocket.of(proxy)
            try:
                if admin is None:
                    raise OSError("no admin socket")
                admin.refuse_new_connections()
                admins[proxy.pid] = admin
            except OSError:
                soft_stop(proxy)

    def soft_stop(proxy: psutil.Process) -> None:
        try:
            proxy.send_signal(signal.SIGUSR1)  # its soft stop: it ends once its connections have
            signalled[proxy.pid] = proxy
        except psutil.Error:
            pass

    def left() -> Drained:
        counted = 0
        for pid, admin in list(admins.items()):
            try:
                counted += admin.in_flight()
            except OSError:  # its socket closed: soft-stopped by a reload, or gone
                del admins[pid]
                soft_stop(psutil.Process(pid)) if psutil.pid_exists(pid) else None
        take_new()
        return Drained(cut=counted + sum(map(_running, signalled.values())),
                       soft_stopped=sum(map(_running, signalled.values())))

    take_new()
    deadline = time.monotonic() + timeout_s
    while (remaining := left()).cut and time.monotonic() < deadline:
        time.sleep(POLL_S)
    remaining.proxies = len(seen)
    return remaining


def _running(process: psutil.Process) -> bool:
    """Alive and not a zombie: an HAProxy that has ended, which its parent (Serve's proxy, not
    this process) has not reaped yet, is done (psutil's wait would wait on it to the timeout)."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
