"""A real uvicorn server with the production limits and timeouts (`service.server.uvicorn_config`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from service.server import uvicorn_config
from service.settings import ServiceSettings
from tests.servers import free_port, wait_ready


@contextmanager
def hardened_server(settings: ServiceSettings, *, wait: bool = True) -> Iterator[str]:
    """Serve `settings` on a free loopback port in a thread, configured exactly as `sdxl-deploy serve`."""
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
