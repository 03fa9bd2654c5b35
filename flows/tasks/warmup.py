"""Warm-up: stream the new service's log into the flow's log while it loads, wait for `/ready`, then send
warm-up requests (the first real generation compiles kernels and fills caches)."""

from __future__ import annotations

import time
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flows.hostfs import tail_bytes
from flows.hosts import Host
from flows.procs import is_running
from flows.target import Target
from flows.tasks.common import retry_transient, run_logger, service_url
from flows.tasks.deploy import Started
from service.client import ServiceClient

POLL_S = 0.5


class WarmupResult(BaseModel):
    ready_after_s: float
    health: dict[str, Any]
    warmup_s: list[float]
    log_offset: int


class ServiceDidNotStart(RuntimeError):
    """The new service exited, or was not ready in time; the message carries its last log lines."""


@task(cache_policy=NO_CACHE)
def warm_up(host: Host, target: Target, started: Started) -> WarmupResult:
    """Stream the service log while it loads, poll `/ready` (long timeout), then send warm-up requests."""
    log = run_logger()
    new = target.new
    began = time.monotonic()
    offset = started.log_offset
    recent: list[str] = []
    with (
        service_url(host, new.port) as url,
        ServiceClient(
            url, api_key=new.env.get("SDXL_API_KEY"), timeout=target.workload.request_timeout_s
        ) as client,
    ):
        while True:
            text, offset = tail_bytes(host, started.log_file, offset)
            for line in text.splitlines():
                log.info("[service] %s", line)
                recent = (recent + [line])[-20:]
            if client.ready():
                break
            if not is_running(host, started.process):
                text, offset = tail_bytes(host, started.log_file, offset)
                recent = (recent + text.splitlines())[-20:]
                raise ServiceDidNotStart(
                    "the new service exited while loading; last log lines:\n" + "\n".join(recent)
                )
            if time.monotonic() - began > new.ready_timeout_s:
                raise ServiceDidNotStart(
                    f"the new service was not ready after {new.ready_timeout_s:.0f} s; last log lines:\n"
                    + "\n".join(recent)
                )
            time.sleep(POLL_S)
        ready_after = time.monotonic() - began
        health = client.health()
        log.info("new service ready after %.1f s: %s", ready_after, health)
        timings = []
        for _ in range(target.workload.warmup_requests):
            t0 = time.perf_counter()
            client.generate(**target.workload.app_request)
            timings.append(round(time.perf_counter() - t0, 3))
        if timings:
            log.info("warm-up requests: %s s", timings)
    return WarmupResult(
        ready_after_s=round(ready_after, 2), health=health, warmup_s=timings, log_offset=offset
    )


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def new_service_health(host: Host, target: Target) -> dict[str, Any]:
    """The new service's `/health` answer."""
    with (
        service_url(host, target.new.port) as url,
        ServiceClient(url, api_key=target.new.env.get("SDXL_API_KEY"), timeout=30) as client,
    ):
        return client.health()
