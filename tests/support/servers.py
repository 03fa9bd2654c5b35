"""Real uvicorn servers for tests: in a thread of the test process, or as a `sdxl-deploy serve` process
(started and stopped by `bench.launch`, the one launcher the benchmark uses too)."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from bench.launch import REPO, ServiceProcess, free_port, wait_ready
from service.server import uvicorn_config
from service.settings import ServiceSettings

__all__ = [
    "REPO",
    "free_port",
    "wait_ready",
    "thread_server",
    "process_server",
    "served_process",
    "settings_for",
]


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
    with ServiceProcess(model, env=env, log=log) as service:
        assert service.proc is not None
        yield service.url, service.proc


def settings_for(model: str, cache_dir: Path, **overrides: object) -> ServiceSettings:
    return ServiceSettings(model=model, cache_dir=cache_dir, **overrides)
