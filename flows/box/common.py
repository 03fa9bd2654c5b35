"""What the flows share: the run logger, the retry policy (transient errors only), HTTP to a service port."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from flows.box.hosts import Host
from flows.errors import FlowError
from service.schema import ServiceHealth

# Errors from outside flows that may pass on their own (network blips, a connection refused while a port
# re-opens); the flows' own errors say it themselves with `FlowError.transient` (a dropped SSH link does).
OTHER_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (httpx.TransportError, ConnectionError)


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task run; a plain logger outside one."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("flows")


def is_transient(error: BaseException) -> bool:
    """Whether a retry may get past `error`: a flows error marked `transient`, or a network error."""
    if isinstance(error, FlowError):
        return error.transient
    return isinstance(error, OTHER_TRANSIENT_ERRORS)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only when the task failed on a transient error."""
    try:
        state.result()
    except BaseException as error:
        return is_transient(error)
    return False


@contextmanager
def service_url(host: Host, port: int) -> Iterator[str]:
    """A local base URL for a service port on the host (through an SSH port forward when remote)."""
    with host.forward(port) as local_port:
        yield f"http://127.0.0.1:{local_port}"


def get_health(base_url: str, path: str = "/health", timeout: float = 10.0) -> ServiceHealth:
    """GET the health endpoint of any service (this release, an older one, the user's script): its body (empty
    for a non-JSON 200). Raises on non-200; `serving(...)` says whether it serves."""
    response = httpx.get(f"{base_url}{path}", timeout=timeout)
    response.raise_for_status()
    try:
        body = response.json()
    except ValueError:
        return ServiceHealth()
    return ServiceHealth.of(body)
