"""deploy-fleet with `rollout.host_runs.mode: work-pool`: each host's deploy-sdxl runs as a flow run of its
deployment on a process work pool, taken by one of two real `prefect worker start` processes (one work queue
per host, so each worker takes one host's run). Two local hosts (the SD1.5 stand-in) behind a real HAProxy,
real deploys of tiny models."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelling

from bench.launch import free_port
from flows.box.hosts import LocalHost
from flows.box.procs import find_service
from flows.config.fleet import Analysis, Fleet, FleetHost, HostRuns, LoadBalancer, Rollout
from flows.config.target import Target
from flows.runbooks.demo import TINY_REQUEST, start_current, stop_all
from flows.runbooks.fleet.flow import RUN_DIR_LABEL, deploy_fleet
from flows.runbooks.fleet.haproxy import HAProxyAPI
from flows.runbooks.fleet.summary import FleetSummary
from flows.runbooks.rollback import rollback_sdxl
from flows.runbooks.runbook import deploy_sdxl
from flows.stages.rollback import current_answers
from tests.support.flows import fast, is_legacy, legacy_target
from tests.support.haproxy import haproxy

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
POOL = "sdxl-fleet-test"
HOSTS = {"h1": "w1", "h2": "w2"}  # host -> the worker whose work queue (q-<host>) takes its runs


@pytest.fixture(scope="module")
def workers(prefect_api: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A process work pool with deploy-sdxl and rollback-sdxl deployed from this checkout, a work queue per
    host, and two real workers (one per queue); worker name -> its log file. Workers stopped afterwards."""
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process"), overwrite=True)
        for host in HOSTS:
            client.create_work_queue(name=f"q-{host}", work_pool_name=POOL)
    for flow_, module in ((deploy_sdxl, "runbook"), (rollback_sdxl, "rollback")):
        flow_.from_source(str(ROOT), f"flows/runbooks/{module}.py:{flow_.fn.__name__}").deploy(
            name=flow_.name, work_pool_name=POOL, print_next_steps=False
        )
    env = os.environ | {
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PYTHONPATH": str(ROOT),
    }
    logs, procs, tmp_path = {}, [], tmp_path_factory.mktemp("workers")
    try:
        for host, name in HOSTS.items():
            logs[name] = tmp_path / f"worker-{name}.log"
            with logs[name].open("wb") as log:
                command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL]
                command += ["--type", "process", "--name", name, "--work-queue", f"q-{host}"]
                procs.append(
                    subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
                )
        yield logs
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[dict[str, Target]]:
    """Two boxes running the SD1.5 stand-in; stopped afterwards."""
    targets = {}
    for name in HOSTS:
        target = fast(legacy_target(tmp_path / f"box-{name}", free_port()))
        targets[name] = target.model_copy(
            update={"workload": target.workload.model_copy(update={"app_request": TINY_REQUEST})}
        )
    try:
        for target in targets.values():
            start_current(LocalHost(), target)
        yield targets
    finally:
        for target in targets.values():
            stop_all(LocalHost(), target)


def run_fleet(hosts: dict[str, Target], wheel: str, tmp_path: Path, **params: object):
    """deploy-fleet over the two hosts behind a real HAProxy, host runs on the pool: (state, summary)."""
    started = time.monotonic()
    with haproxy({n: t.current.port for n, t in hosts.items()}, tmp_path / "haproxy") as proxy:
        balancer = LoadBalancer(socket=proxy.socket_path, drain_timeout_s=60, up_timeout_s=60)
        for name in HOSTS:
            HAProxyAPI(balancer).wait_up(name, 10)
        fleet = Fleet(
            hosts=[FleetHost(name=n, target=t, work_queue=f"q-{n}") for n, t in hosts.items()],
            load_balancer=balancer,
            rollout=Rollout(
                canary=1,
                analysis=Analysis(duration_s=1, min_requests=0, max_latency_ratio=None),
                host_runs=HostRuns(mode="work-pool", poll_s=1),
                progress_deadline_s=300,
            ),
        )
        state = deploy_fleet(
            fleet=fleet, wheel=wheel, runs_dir=str(tmp_path / "runs"), return_state=True, **params
        )
    print(f"fleet on the pool: {time.monotonic() - started:.0f} s")
    run_dir = Path(state.result(raise_on_failure=False).run_dir)  # a FleetSummary, or FleetFailed
    return state, FleetSummary.model_validate_json((run_dir / "summary.json").read_text())


def pool_runs(summary, flow_name: str) -> dict[str, str]:
    """Host -> the id of its `flow_name` flow run, as the fleet recorded it in the timeline."""
    ran = {}
    for event in summary.timeline:
        found = re.match(rf"(h\d): {flow_name} ran as flow run (\S+)", event.event)
        if found:
            ran[found[1]] = found[2]
    return ran


def test_host_runs_are_taken_by_two_workers_of_the_pool(
    workers: dict[str, Path], hosts: dict[str, Target], wheel: str, tmp_path: Path
) -> None:
    state, summary = run_fleet(hosts, wheel, tmp_path)
    assert state.is_completed(), summary.message

    assert [h.outcome for h in summary.hosts] == ["upgraded", "upgraded"]
    for target in hosts.values():
        health = current_answers(LocalHost(), target.current)
        assert health is not None and health.model == "tiny-sdxl"
    # The host runs' summaries were read from their run directories (a shared filesystem here).
    for record in summary.hosts:
        assert record.deploy_run_dir and record.deploy_run_dir.startswith(str(tmp_path / "runs"))
        assert record.gates_passed and any(s.name == "warmup" for s in record.stages)

    ran = pool_runs(summary, "deploy-sdxl")
    assert set(ran) == set(HOSTS)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("deploy-sdxl/deploy-sdxl")
        for host, run_id in ran.items():
            run = client.read_flow_run(run_id)
            assert run.deployment_id == deployment.id and run.state.is_completed()
            assert run.work_pool_name == POOL and run.work_queue_name == f"q-{host}"
            assert run.parent_task_run_id is not None  # a child of the fleet run
            # Run by a process the worker started, not by this one.
            assert run.infrastructure_pid and not run.infrastructure_pid.endswith(f":{os.getpid()}")
    for host, worker in HOSTS.items():
        log = workers[worker].read_text(errors="replace")
        assert f"Worker '{worker}' submitting flow run '{ran[host]}'" in log, log[-2000:]
        other = ran[next(h for h in HOSTS if h != host)]
        assert other not in log


def test_an_abort_rolls_the_canary_back_on_the_pool(
    workers: dict[str, Path], hosts: dict[str, Target], wheel: str, tmp_path: Path
) -> None:
    before = find_service(LocalHost(), hosts["h2"].current.port)
    state, summary = run_fleet(hosts, wheel, tmp_path, abort_after_canary=True)

    assert state.is_failed() and summary.aborted == "abort_after_canary"
    assert [a.verdict for a in summary.analyses] == ["pass"]  # the canary was fine: a person stopped it
    assert {h.name: h.outcome for h in summary.hosts} == {"h1": "rolled back", "h2": "not reached"}
    assert all(is_legacy(current_answers(LocalHost(), t.current)) for t in hosts.values())
    assert find_service(LocalHost(), hosts["h2"].current.port) == before  # never touched
    record = summary.hosts[0]
    assert record.rollback_run_dir and Path(record.rollback_run_dir, "summary.json").is_file()
    rollbacks = pool_runs(summary, "rollback-sdxl")
    assert list(rollbacks) == ["h1"]
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("rollback-sdxl/rollback-sdxl")
        run = client.read_flow_run(rollbacks["h1"])
        assert run.deployment_id == deployment.id and run.state.is_completed()
        assert run.work_queue_name == "q-h1" and run.parent_task_run_id is not None
    assert f"submitting flow run '{rollbacks['h1']}'" in workers["w1"].read_text(errors="replace")


def test_a_cancel_in_prefect_rolls_back_what_the_rollout_upgraded(
    workers: dict[str, Path], hosts: dict[str, Target], wheel: str, tmp_path: Path
) -> None:
    """deploy-fleet as a deployment on the pool (as the UI runs it), cancelled during the canary's analysis:
    the worker kills the run's process and runs the cancel hook in a process of its own, which reopens the
    rollout from its run directory and rolls the canary back; h2 is never touched, both serve in HAProxy."""
    deploy_fleet.from_source(str(ROOT), "flows/runbooks/fleet/flow.py:deploy_fleet").deploy(
        name="deploy-fleet", work_pool_name=POOL, work_queue_name="q-h1", print_next_steps=False
    )
    before = find_service(LocalHost(), hosts["h2"].current.port)
    with haproxy({n: t.current.port for n, t in hosts.items()}, tmp_path / "haproxy") as proxy:
        balancer = LoadBalancer(socket=proxy.socket_path, drain_timeout_s=60, up_timeout_s=60)
        api = HAProxyAPI(balancer)
        for name in HOSTS:
            api.wait_up(name, 10)
        fleet = Fleet(
            hosts=[FleetHost(name=n, target=t) for n, t in hosts.items()],
            load_balancer=balancer,
            rollout=Rollout(
                canary=1, analysis=Analysis(duration_s=600, min_requests=0), progress_deadline_s=300
            ),
        )
        parameters = {
            "fleet": fleet.model_dump(mode="json"),
            "wheel": wheel,
            "runs_dir": str(tmp_path / "runs"),
        }
        run = run_deployment("deploy-fleet/deploy-fleet", parameters=parameters, timeout=0)

        def summary() -> FleetSummary | None:
            with get_client(sync_client=True) as client:
                run_dir = client.read_flow_run(run.id).labels.get(RUN_DIR_LABEL)
            file = Path(run_dir or tmp_path, "summary.json")
            return FleetSummary.model_validate_json(file.read_text()) if file.is_file() else None

        def wait_for(what: str, check: Callable[[], bool], timeout_s: float) -> None:
            deadline = time.monotonic() + timeout_s
            while not check():
                assert time.monotonic() < deadline, f"{what}: {summary()}"
                time.sleep(1)

        # the canary is upgraded and back in the balancer: its analysis (600 s) runs when the person cancels
        wait_for(
            "h1 upgraded", lambda: "h1: ready" in [e.event for e in getattr(summary(), "timeline", [])], 400
        )
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run.id, Cancelling(message="a person cancelled in the UI"))

        def state() -> Any:
            with get_client(sync_client=True) as client:
                return client.read_flow_run(run.id).state

        # the worker marks the run Cancelled once the hook returned: the summary is final by then
        wait_for("cancelled", lambda: state().is_cancelled(), 300)
        done = summary()
        assert done is not None and done.status == "failed", done
        assert done.aborted == "cancelled in Prefect" and done.rolled_back == ["h1"], done.message
        assert {h.name: h.outcome for h in done.hosts} == {"h1": "rolled back", "h2": "not reached"}
        assert all(is_legacy(current_answers(LocalHost(), t.current)) for t in hosts.values())
        assert find_service(LocalHost(), hosts["h2"].current.port) == before  # never touched
        stats = api.stats()
        assert all(stats[name].status == "UP" for name in HOSTS), stats  # both serve in the balancer
