"""Real uvicorn servers for tests: in a thread of the test process, or as a `sdxl-deploy serve` process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from service.server import uvicorn_config
from service.settings import ServiceSettings

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, timeout: float = 180.0, proc: subprocess.Popen | None = None) -> None:
    """Poll `/ready` until 200; fail early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout} s")


@contextmanager
def thread_server(settings: ServiceSettings, *, wait: bool = True) -> Iterator[str]:
    """Serve `settings` with real uvicorn on a free loopback port in a background thread, configured
    exactly as `sdxl-deploy serve` (limits and timeouts from `service.server.uvicorn_config`)."""
    port = free_port()
    config = uvicorn_config(settings, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True, name=f"uvicorn-{port}")
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        if wait:
            wait_ready(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@contextmanager
def process_server(
    model: str, *, env: dict[str, str] | None = None, log: Path | None = None
) -> Iterator[str]:
    """Run `python -m sdxl_deploy.cli serve` as its own process, as the deploy flow does; yields its URL."""
    with served_process(model, env=env, log=log) as (url, _):
        yield url


@contextmanager
def served_process(
    model: str, *, env: dict[str, str] | None = None, log: Path | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`process_server`, yielding the process too (for tests that watch its memory or its life)."""
    port = free_port()
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdxl_deploy.cli", "serve", "--model", model, "--port", str(port)],
        env=full_env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc=proc)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()


def settings_for(model: str, cache_dir: Path, **overrides: object) -> ServiceSettings:
    return ServiceSettings(model=model, cache_dir=cache_dir, **overrides)
