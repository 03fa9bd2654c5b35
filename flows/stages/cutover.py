"""Cut-over of a staged deploy: the warm new service takes the app's port the moment the old one lets it go.

The new service (staged on the staging port preflight chose, `service/server.py`) is told first (SIGUSR1 to its
supervisor, which passes it on): from then on a thread of its own tries to bind the app's port every
millisecond, and its `/health` says `taking_over`. Only then is the old service stopped as always (TERM:
uvicorn stops listening at once and finishes the requests in flight; wait; KILL), so the port is free for
about a millisecond between the two; a new service that never says so fails the cut-over with the old one
still serving. The cut-over ends when `/health` on
the app's port is the new service (its model, listening on that port), within `new.cutover_timeout_s`; a
cut-over that does not get there raises, and the runbook puts the old service back (`stages/rollback.py`).

Also here: `discard_staged`, what a staged deploy that fails before the cut-over does: stop the staged
service (its supervisor), and nothing else: the old one was never touched.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.box.common import get_health, run_logger, service_url
from flows.box.hosts import Host
from flows.box.procs import is_running, stop_process
from flows.config.target import Target
from flows.errors import FlowError, RehearsedFailure
from flows.evidence.results import Cutover, ProcessInfo
from service.schema import ServiceHealth

TOLD_TIMEOUT_S = 10.0  # SIGUSR1 through the supervisor to the service's takeover thread


def serves_port(health: ServiceHealth | None, target: Target) -> bool:
    """Whether a `/health` body is the new service serving the app's port."""
    return health is not None and health.model == target.new.model and target.current.port in health.listening


def tell_take_over(host: Host, process: ProcessInfo) -> None:
    """SIGUSR1 to the new service's supervisor (only while that very process runs: PID and start time)."""
    if not is_running(host, process):
        raise FlowError(f"the new service {process.describe()} is not running")
    host.run(f"kill -s USR1 {int(process.pid)}")


@task(cache_policy=NO_CACHE)
def cut_over(
    host: Host,
    target: Target,
    new: ProcessInfo,
    old: ProcessInfo | None,
    stage_port: int,
    rehearse_failure: bool = False,
) -> Cutover:
    """Tell the new service (on `stage_port`) to take the app's port, stop the old one, wait for the new one
    to answer there.

    The app's port is watched from a second thread meanwhile, so `seconds` is when the new service answered
    there, not when the old process had finished exiting. `rehearse_failure` (fail_at="cutover"): fail after
    the old service stopped, the worst moment."""
    log = run_logger()
    started = time.monotonic()
    deadline = started + target.new.cutover_timeout_s
    done = threading.Event()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cutover-watch") as pool:
        try:
            tell_take_over(host, new)
            _wait_taking_over(host, target, stage_port, min(deadline, time.monotonic() + TOLD_TIMEOUT_S))
            watch = pool.submit(_wait_serving, host, target, deadline, done)
            stopped = (
                stop_process(host, old, target.current.stop_timeout_s) if old else "no old process was found"
            )
            log.info("cut-over: %s", stopped)
            if rehearse_failure:
                raise RehearsedFailure(
                    "failure injected at stage 'cutover' after the old service stopped (fail_at rehearsal)"
                )
            # commands run from this thread only; the watcher has its own way in (a port forward)
            while not watch.done():
                if not is_running(host, new):
                    raise FlowError(f"the new service {new.describe()} exited during the cut-over")
                wait([watch], timeout=0.25)
            health, seen_at = watch.result()
        finally:
            done.set()
    seconds = round(seen_at - started, 3)
    log.info(
        "cut-over: %s answers on port %d, %.2f s after being told",
        target.new.model,
        target.current.port,
        seconds,
    )
    return Cutover(stopped_old=stopped, seconds=seconds, health=health)


def _wait_taking_over(host: Host, target: Target, stage_port: int, deadline: float) -> None:
    """Poll `/health` on the staging port until the new service says it is binding the app's port."""
    health, seen_at = _poll_health(
        host,
        stage_port,
        lambda h: bool(h.taking_over) or serves_port(h, target),
        deadline,
    )
    if seen_at is None:
        raise FlowError(
            f"the new service did not say it was taking port {target.current.port} over within "
            f"{TOLD_TIMEOUT_S:.0f} s of SIGUSR1 (/health on port {stage_port}: "
            f"{health.model_dump() if health is not None else None}); "
            "the old service was not stopped"
        )


def _wait_serving(
    host: Host, target: Target, deadline: float, done: threading.Event
) -> tuple[ServiceHealth, float]:
    """Poll `/health` on the app's port until it is the new service; (its body, when it was first seen)."""
    health, seen_at = _poll_health(
        host, target.current.port, lambda h: serves_port(h, target), deadline, done
    )
    if seen_at is None:
        seen = f"/health answered {health.model_dump()}" if health is not None else "nothing answered"
        raise FlowError(
            f"the new service did not take port {target.current.port} over within "
            f"{target.new.cutover_timeout_s:.0f} s ({seen})"
        )
    return health or ServiceHealth(), seen_at


def _poll_health(
    host: Host,
    port: int,
    wanted: Callable[[ServiceHealth], bool],
    deadline: float,
    done: threading.Event | None = None,
) -> tuple[ServiceHealth | None, float | None]:
    """`/health` on a service port every 20 ms until a body is `wanted`, the deadline passes or `done` is set:
    (the last body, when the wanted one was seen, or None)."""
    health: ServiceHealth | None = None
    with service_url(host, port) as url:
        while not (done is not None and done.is_set()):
            try:
                health = get_health(url, timeout=5)
            except httpx.HTTPError:
                health = None
            if health is not None and wanted(health):
                return health, time.monotonic()
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
    return health, None


def discard_staged(host: Host, target: Target, process: ProcessInfo | None) -> str:
    """Stop the staged new service (its supervisor and the service: one process group); the old one
    serves on, untouched."""
    if process is None:
        return "no staged service was started"
    return stop_process(host, process, target.new.stop_timeout_s)
