"""Run the service under uvicorn with the settings' bind address, limits, timeouts and logging."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.app import create_app
from service.settings import ServiceSettings

log = logging.getLogger(__name__)


def configure_logging(level: str) -> None:
    """Timestamped lines on stderr: the deploy flow streams them from the service's log file."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a header read timeout (slowloris).

    A connection must deliver a complete request line and headers within `header_timeout_s` of its
    first byte (or of connecting); otherwise it gets `408` and is closed. Idle keep-alive connections
    are still closed by uvicorn's `timeout_keep_alive`, and bodies by `BodyLimit`'s body timeout.
    """

    header_timeout_s: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None
    _cycle_when_armed: Any = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm_head_timer()  # the first bytes of a new request on a kept-alive connection
        super().data_received(data)
        if self._head_timer is not None and self.cycle is not self._cycle_when_armed:
            self._disarm_head_timer()  # a new request's headers are complete

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._cycle_when_armed = self.cycle
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._on_head_timeout)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _on_head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.cycle is not self._cycle_when_armed:
            return
        log.warning("closed a connection whose request headers took over %g s", self.header_timeout_s)
        if self.conn.our_state in (h11.IDLE, h11.DONE) and self.conn.their_state is not h11.ERROR:
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"connection: close\r\ncontent-length: 25\r\n\r\nrequest headers too slow\n"
            )
        self.transport.close()


def protocol_with_header_timeout(seconds: float) -> type[HeaderTimeoutH11Protocol]:
    """The h11 protocol class with this header timeout."""
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout_s": seconds})


def uvicorn_config(settings: ServiceSettings, app: Any = None, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration of a service: bind address, limits and timeouts from the settings."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "log_config": None,
        "http": protocol_with_header_timeout(settings.header_timeout_s),
        "timeout_keep_alive": settings.keep_alive_s,
        # Bound open connections: queued work is bounded by max_queue, idle sockets by this.
        "limit_concurrency": settings.max_connections or settings.max_queue * 4 + 64,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "server_header": False,
        **overrides,
    }
    return uvicorn.Config(app if app is not None else create_app(settings), **options)


def serve(settings: ServiceSettings) -> None:
    """Start uvicorn in this process; returns when it stops (SIGTERM / Ctrl-C)."""
    configure_logging(settings.log_level)
    logging.getLogger(__name__).info(
        "Starting image service: model=%s on http://%s:%d", settings.model, settings.host, settings.port
    )
    uvicorn.Server(uvicorn_config(settings)).run()
