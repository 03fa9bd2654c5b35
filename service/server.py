"""Run the service under uvicorn with the settings' bind address, limits, timeouts and logging."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.app import create_app
from service.settings import ServiceSettings
from service.state import ServiceState
from service.takeover_signal import hold_takeover_signal, listen_for_takeover

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


TAKEOVER_POLL_S = 0.001  # how often a staged service, once told, tries to bind its own port


def listening_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on (host, port) with SO_REUSEADDR (a port whose old listener is gone but whose
    connections linger binds at once); OSError EADDRINUSE while another process listens there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=backlog)


class PortInUse(Exception):
    """The service cannot listen: its port (and its staging port, when it has one) is taken."""


class PortTakeoverServer(uvicorn.Server):
    """uvicorn that serves `settings.port`, or, when another process holds it at start and a `stage_port` is
    set, serves `stage_port` until SIGUSR1 tells it to take `port` over (the deploy's cut-over).

    Told, a thread of its own tries to bind and listen on `port` every `TAKEOVER_POLL_S` (1 ms), whatever the
    event loop is doing, and `/health` says `taking_over`: the deploy stops the old service only then. The
    moment the old one lets the port go, the new socket listens (the kernel queues connections from then on),
    the event loop serves it with the same app and state (the same protocol factory uvicorn uses), then
    closes the staging listener (connections already open there finish) so the next deploy can stage there.
    The ports it listens on are in `/health`'s `listening`.
    """

    def __init__(self, config: uvicorn.Config, settings: ServiceSettings, state: ServiceState) -> None:
        super().__init__(config)
        self.settings, self.state = settings, state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_ready = threading.Event()
        self._staging: asyncio.AbstractServer | None = None
        self._told_at: float | None = None
        self._binder: threading.Thread | None = None

    def bind(self) -> socket.socket:
        """The listening socket: `port`, else `stage_port` when `port` is held and a stage port is set."""
        host, port, stage_port = self.settings.host, self.settings.port, self.settings.stage_port
        try:
            sock = listening_socket(host, port, self.config.backlog)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            if stage_port is None:
                raise PortInUse(
                    f"port {port} on {host} is in use by another process: nothing was started "
                    "(stop that process, or choose another port)"
                ) from None
            try:
                sock = listening_socket(host, stage_port, self.config.backlog)
            except OSError as stage_exc:
                if stage_exc.errno != errno.EADDRINUSE:
                    raise
                raise PortInUse(
                    f"cannot stage: port {port} on {host} is held (the current service) and the staging "
                    f"port {stage_port} is in use too: nothing was started (free it, or choose another "
                    "staging port)"
                ) from None
            log.info(
                "port %d is held by another process: staged on port %d until told (SIGUSR1)", port, stage_port
            )
        self.state.listening = [sock.getsockname()[1]]
        return sock

    def request_takeover(self) -> None:
        """SIGUSR1 (from `listen_for_takeover`'s thread): take the service's own port over (before start-up too)."""
        if self._binder is not None or self.settings.port in self.state.listening:
            return  # already told, or serving its own port (it was free at start)
        self._told_at = time.monotonic()
        self.state.taking_over = True
        self._binder = threading.Thread(target=self._bind_own_port, name="port-takeover", daemon=True)
        self._binder.start()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self._loop = asyncio.get_running_loop()
        self._staging = self.servers[0] if self.servers else None
        self._loop_ready.set()

    def _protocol(self) -> asyncio.Protocol:
        """What uvicorn's own listener builds per connection: the same app, server state and lifespan state."""
        return self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )

    def _bind_own_port(self) -> None:
        """The takeover thread: bind and listen on the port as soon as it is free, then hand it to the loop."""
        port = self.settings.port
        log.info("told to take port %d over: binding it the moment it is free", port)
        while not self.should_exit:
            try:
                sock = listening_socket(self.settings.host, port, self.config.backlog)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    log.error("cannot bind port %d: %s", port, exc)
                    self.state.taking_over = False
                    return
                time.sleep(TAKEOVER_POLL_S)
                continue
            self._loop_ready.wait()
            assert self._loop is not None
            asyncio.run_coroutine_threadsafe(self._serve_own_port(sock), self._loop)
            return

    async def _serve_own_port(self, sock: socket.socket) -> None:
        port = self.settings.port
        loop = asyncio.get_running_loop()
        self.servers.append(await loop.create_server(self._protocol, sock=sock, backlog=self.config.backlog))
        staged = [p for p in self.state.listening if p != port]
        if self._staging is not None:
            self._staging.close()  # no new connections there; open ones finish
        self.state.listening, self.state.taking_over = [port], False
        log.info(
            "took port %d over %.3f s after being told; closed the staging port %s",
            port,
            time.monotonic() - (self._told_at or time.monotonic()),
            ", ".join(map(str, staged)) or "-",
        )


def serve(settings: ServiceSettings) -> None:
    """Start uvicorn in this process; returns when it stops (SIGTERM / Ctrl-C)."""
    hold_takeover_signal()  # the CLI did it before importing torch; again for callers that did not
    configure_logging(settings.log_level)
    state = ServiceState(settings)
    server = PortTakeoverServer(uvicorn_config(settings, create_app(settings, state)), settings, state)
    listen_for_takeover(server.request_takeover)
    sock = server.bind()
    log.info(
        "Starting image service: model=%s on http://%s:%d%s",
        settings.model,
        settings.host,
        state.listening[0],
        f" (staged; port {settings.port} on SIGUSR1)" if state.listening[0] != settings.port else "",
    )
    server.run(sockets=[sock])
