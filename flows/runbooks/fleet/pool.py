"""Host runs through a Prefect work pool: each host's deploy-sdxl or rollback-sdxl started as a flow run of its
deployment (`run_deployment`, a child of the fleet run), taken by a worker of the deployment's pool, waited for
until its final state.

The fleet reads the host run's summary from its run directory (`runs_dir` is a fleet parameter, so the path is
known): a worker on this machine (or on a shared filesystem) writes it where the fleet reads it; a worker on
another machine writes it on its own disk, and the fleet then has the run's final state only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State
from prefect.deployments import run_deployment
from prefect.states import Cancelled, Cancelling

# How long a host run cut by its deadline may take to stop once cancelled (the worker kills its process).
CANCEL_WAIT_S = 120.0


@dataclass
class PoolRun:
    """A host run's flow run on the pool: its id, its final state (or the last one seen), whether the
    deadline cut it."""

    flow_run_id: str
    state: State
    timed_out: bool = False


def run_on_pool(
    deployment: str,
    run_name: str,
    parameters: dict[str, Any],
    timeout_s: float | None,
    work_queue: str | None = None,
    poll_s: float = 2.0,
) -> PoolRun:
    """Start a flow run of `deployment` and wait for its final state; past `timeout_s`, cancel it and wait
    until it stopped (so nothing else runs on the host at the same time)."""
    flow_run = run_deployment(
        deployment,
        parameters=parameters,
        flow_run_name=run_name,
        timeout=timeout_s,
        poll_interval=poll_s,
        work_queue_name=work_queue,
    )
    state = flow_run.state
    if state is not None and state.is_final():
        return PoolRun(str(flow_run.id), state)
    return PoolRun(str(flow_run.id), _cancel(flow_run.id, f"past its deadline ({timeout_s:.0f} s)"), True)


def _cancel(flow_run_id: Any, why: str) -> State:
    """Cancel a flow run: one not started yet at once, a running one through its worker; its last state."""
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
        if state is None or state.is_scheduled() or state.is_pending():
            client.set_flow_run_state(flow_run_id, Cancelled(message=why), force=True)
        elif not state.is_final():
            client.set_flow_run_state(flow_run_id, Cancelling(message=why), force=True)
        end = time.monotonic() + CANCEL_WAIT_S
        while time.monotonic() < end:
            state = client.read_flow_run(flow_run_id).state
            if state is not None and state.is_final():
                return state
            time.sleep(1)
        return state
