"""A real HAProxy on this machine's loopback, from a generated config: the demo's (and the tests') load
balancer in front of several local hosts. A fleet on real boxes uses the operator's own HAProxy instead.

One frontend on a free port, one backend with a server per host, HAProxy's own health check
(`option httpchk GET /ready`), and the runtime API on a unix socket with `level admin` (what
`flows.runbooks.fleet.haproxy` talks to). Started in the foreground (`-db`) as a child, stopped by its PID.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from flows.box.ports import free_port

HAPROXY = "/usr/sbin/haproxy"


def haproxy_config(
    port: int,
    servers: dict[str, int],
    socket_path: str,
    backend: str = "sdxl",
    check_path: str = "/ready",
    check_inter_ms: int = 200,
) -> str:
    """The config: `servers` maps each server name to its loopback port."""
    lines = [
        "global",
        f"    stats socket {socket_path} mode 600 level admin",
        "    maxconn 512",
        "",
        "defaults",
        "    mode http",
        "    timeout connect 2s",
        "    timeout client 300s",
        "    timeout server 300s",
        "    timeout queue 60s",
        "    retries 3",
        "    option redispatch",
        "",
        "frontend app",
        f"    bind 127.0.0.1:{port}",
        f"    default_backend {backend}",
        "",
        f"backend {backend}",
        "    balance roundrobin",
        f"    option httpchk GET {check_path}",
        "    http-check expect status 200",
        f"    default-server inter {check_inter_ms}ms fastinter {check_inter_ms}ms fall 2 rise 1",
    ]
    lines += [f"    server {name} 127.0.0.1:{server_port} check" for name, server_port in servers.items()]
    return "\n".join(lines) + "\n"


@dataclass
class LocalHAProxy:
    """One HAProxy process in a temporary folder; a context manager (stopped on exit)."""

    servers: dict[str, int]
    backend: str = "sdxl"
    check_path: str = "/ready"
    check_inter_ms: int = 200
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sdxl-haproxy-")))
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> str:
        return str(self.root / "admin.sock")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / "haproxy.log"

    def start(self, timeout_s: float = 15.0) -> LocalHAProxy:
        """Write the config, check it (`haproxy -c`), start it, wait for the frontend and the socket."""
        if not Path(HAPROXY).is_file():
            raise RuntimeError(
                f"{HAPROXY} is missing: run `make setup` (it installs the Debian package haproxy)"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):  # another process may take the free port before HAProxy binds it
            self.port = free_port()
            config = self.root / "haproxy.cfg"
            config.write_text(
                haproxy_config(
                    self.port,
                    self.servers,
                    self.socket_path,
                    self.backend,
                    self.check_path,
                    self.check_inter_ms,
                )
            )
            subprocess.run([HAPROXY, "-c", "-q", "-f", str(config)], check=True, capture_output=True)
            with self.log.open("ab") as log:
                self.process = subprocess.Popen(
                    [HAPROXY, "-db", "-f", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=log
                )
            if self._wait_ready(timeout_s):
                return self
            self.stop()
        raise RuntimeError(
            f"HAProxy did not start; its log {self.log}:\n{self.log.read_text(errors='replace')}"
        )

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            if Path(self.socket_path).exists():
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return True
                except OSError:
                    pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Stop HAProxy by its PID (SIGUSR1: a soft stop that lets requests in flight finish, then TERM)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGUSR1)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                try:
                    self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        self.process = None

    def remove(self) -> None:
        """Stop it and delete its folder."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalHAProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.remove()
