"""Warm-up: follow the new service's log while it loads, wait for `/ready`, then send warm-up requests (the
first real generation compiles kernels and fills caches).

The service's log lines go to the run directory's `run.log` (`flows.record.runlog.service_log`), not the
flow's log, and its last lines into the error when it fails to start; what the flow learns about the service's
start (compiling or not, the compile time) comes from its `/health` (`startup`,
`service.schema.StartupFacts`)."""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.box.common import get_health, retry_transient, run_logger, service_url
from flows.box.hostfs import tail_bytes
from flows.box.hosts import Host
from flows.box.procs import is_running
from flows.box.supervisor import read_restarts
from flows.config.secrets import api_key
from flows.config.target import Target
from flows.errors import HostUnreachable, ServiceDidNotStart
from flows.evidence.results import WarmupResult
from flows.record.runlog import service_log
from flows.stages.deploy import Started
from service.client import ServiceCallError, ServiceClient
from service.schema import HealthResponse, ServiceHealth

POLL_S = 0.5
LINK_GRACE_S = 120.0  # how long the SSH link may stay down during warm-up before it counts as a failure


@task(cache_policy=NO_CACHE)
def warm_up(host: Host, target: Target, started: Started) -> WarmupResult:
    """Follow the service log while it loads, poll `/ready` (long timeout), then send warm-up requests.

    Fails fast, with the last log lines, when the service exits or crashes while loading (the
    supervisor recorded a restart), or says its model failed to load. A dropped SSH link is not a
    failure: the host reconnects and the port forward is reopened, for up to `LINK_GRACE_S`.
    """
    log = run_logger()
    new = target.new
    began = time.monotonic()
    watch = _Watch(host, started, log)
    with ExitStack() as stack:
        client: ServiceClient | None = None
        link_down_since: float | None = None
        while True:
            try:
                watch.follow_log()
                client = client or _open_client(stack, host, target, started.port or target.new.port)
                try:
                    if _is_ready(client):
                        break
                except httpx.TransportError:
                    # Not listening yet, or the SSH link (and with it the port forward) dropped: the
                    # host reconnects on its next command; the forward is reopened next time round.
                    stack.close()
                    client = None
                watch.check_alive()
                if client is not None:
                    watch.saw(_check_loaded(client))
                link_down_since = None
            except HostUnreachable as exc:
                stack.close()
                client = None
                link_down_since = link_down_since or time.monotonic()
                log.warning("warm-up: %s", exc)
                if time.monotonic() - link_down_since > LINK_GRACE_S:
                    raise ServiceDidNotStart(
                        f"lost the link to {host.name} for more than {LINK_GRACE_S:.0f} s during warm-up"
                    ) from exc
            if time.monotonic() - began > new.ready_timeout_s:
                compiling = (
                    " while compiling (see SDXL_COMPILE / docs/BENCHMARKS.md)" if watch.compiling else ""
                )
                raise ServiceDidNotStart(
                    f"the new service was not ready after {new.ready_timeout_s:.0f} s{compiling}; "
                    "last log lines:\n" + watch.recent_text()
                )
            time.sleep(POLL_S)
        ready_after = time.monotonic() - began
        health = client.health()
        log.info(
            "new service ready after %.1f s: %s %s on %s",
            ready_after,
            health.model,
            health.status,
            health.device,
        )
        compile_s = health.startup.warmup_s
        if compile_s is not None:
            log.info(
                "the service compiled its models in %.1f s before /ready (cached on disk: the next start "
                "reuses it)",
                compile_s,
            )
        timings = []
        for number in range(1, target.workload.warmup_requests + 1):
            t0 = time.perf_counter()
            try:
                client.generate(**target.workload.app_request)
            except (httpx.HTTPError, ServiceCallError) as exc:
                watch.check_alive(f"during warm-up request {number}", settle_s=5.0)
                raise ServiceDidNotStart(f"warm-up request {number} failed: {exc}") from exc
            timings.append(round(time.perf_counter() - t0, 3))
        if timings:
            log.info("warm-up requests: %s s", timings)
        watch.check_alive("during the warm-up requests")
    return WarmupResult(
        ready_after_s=round(ready_after, 2),
        health=health,
        warmup_s=timings,
        log_offset=watch.offset,
        compile_s=compile_s,
    )


class _Watch:
    """The starting service as seen from here: its log (into the run log) and its supervisor's restart record."""

    def __init__(self, host: Host, started: Started, log: Any) -> None:
        self.host, self.started, self.log = host, started, log
        self.offset = started.log_offset
        self.recent: list[str] = []
        self.compiling = False  # the service said it is warming up (the first compile: minutes)

    def follow_log(self) -> None:
        text, self.offset = tail_bytes(self.host, self.started.log_file, self.offset)
        for line in text.splitlines():
            service_log().info("%s", line)
            self.recent = (self.recent + [line])[-20:]

    def saw(self, health: HealthResponse | None) -> None:
        """Note what the service's `/health` says about its start (None: no answer this time)."""
        phase = health.startup.phase if health is not None else None
        if phase == "warming_up" and not self.compiling:
            self.compiling = True
            self.log.info("warm-up: the service is compiling its models (first time: minutes, then cached)")

    def recent_text(self) -> str:
        return "\n".join(self.recent)

    def check_alive(self, when: str = "while loading", settle_s: float = 0.0) -> None:
        """Raise when the service exited, or crashed and was restarted by its supervisor; `settle_s`: how
        long to wait for the supervisor to record an exit that is on its way (a request just failed)."""
        deadline = time.monotonic() + settle_s
        while True:
            restarts = (
                read_restarts(self.host, self.started.install_dir) if self.started.install_dir else None
            )
            running = is_running(self.host, self.started.process)
            crashed = bool(restarts and (restarts.count or restarts.gave_up))
            if crashed or not running or time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        if restarts and crashed:
            self.follow_log()
            raise ServiceDidNotStart(
                f"the new service crashed {when} (exit code {restarts.last_exit}; supervisor: "
                f"{restarts.describe()}); last log lines:\n{self.recent_text()}"
            )
        if not running:
            self.follow_log()
            raise ServiceDidNotStart(f"the new service exited {when}; last log lines:\n{self.recent_text()}")


def _open_client(stack: ExitStack, host: Host, target: Target, port: int) -> ServiceClient:
    url = stack.enter_context(service_url(host, port))
    return stack.enter_context(
        ServiceClient(url, api_key=api_key(target.new), timeout=target.workload.request_timeout_s)
    )


def _is_ready(client: ServiceClient) -> bool:
    """`/ready` answers 200 (a transport error, not listening yet or a dead port forward, raises)."""
    return httpx.get(f"{client.base_url}/ready", timeout=15).status_code == 200


def _check_loaded(client: ServiceClient) -> HealthResponse | None:
    """`/health`'s answer (None when there is none yet); raise when it says the model failed to load (the
    process stays up, unhealthy)."""
    try:
        health = client.health()
    except (ServiceCallError, httpx.TransportError):
        return None
    if health.status == "unhealthy":
        raise ServiceDidNotStart(
            f"the new service could not load its model: {health.error or health.model_dump(mode='json')}"
        )
    return health


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def new_service_health(host: Host, target: Target, port: int | None = None) -> ServiceHealth:
    """The new service's `/health` answer (on `port`, default its own); the service may be an older release
    than these flows (verify runs against whatever is installed)."""
    with service_url(host, port or target.new.port) as url:
        return get_health(url, timeout=30)
