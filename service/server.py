"""Run the service under uvicorn with the settings' bind address, limits and logging."""

from __future__ import annotations

import logging

import uvicorn

from service.app import create_app
from service.settings import ServiceSettings


def configure_logging(level: str) -> None:
    """Timestamped lines on stderr: the deploy flow streams them from the service's log file."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


def serve(settings: ServiceSettings) -> None:
    """Start uvicorn in this process; returns when it stops (SIGTERM / Ctrl-C)."""
    configure_logging(settings.log_level)
    logging.getLogger(__name__).info(
        "Starting image service: model=%s on http://%s:%d", settings.model, settings.host, settings.port
    )
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,
        timeout_keep_alive=5,
        # Bound open connections: queued work is bounded by max_queue, idle sockets by this.
        limit_concurrency=settings.max_queue * 4 + 64,
        h11_max_incomplete_event_size=16 * 1024,
        server_header=False,
    )
    uvicorn.Server(config).run()
