"""`sdxl-deploy demo --fleet N`: N local hosts (tiny-sd15 today, tiny-sdxl to deploy) behind a real HAProxy
that the demo starts, a steady load through HAProxy over the whole `deploy-fleet` rollout, then everything
stopped by its PID. The fleet run's summary.json gets the load's record (`FleetSummary.load`: requests,
failed requests, answers by status). With a simulated failure the canary fails at that stage: only it is rolled back."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from flows.box.hosts import LocalHost
from flows.box.ports import free_port
from flows.config.fleet import Analysis, Fleet, FleetHost, LoadBalancer, Rollout
from flows.config.target import Target
from flows.runbooks.demo import TINY_REQUEST, demo_target, rehearsal_target, stop_all
from flows.runbooks.fleet.haproxy import HAProxyAPI
from flows.runbooks.fleet.load import SteadyLoad
from flows.runbooks.fleet.local_lb import LocalHAProxy
from flows.runbooks.fleet.summary import DemoLoad, FleetSummary

# One client, this long between its requests: a steady load that leaves the 2-core demo machine's CPU to the
# deploys (each tiny request costs the hosts ~0.4 s of CPU).
LOAD_PAUSE_S = 1.0


@dataclass
class FleetDemoResult:
    summary_path: Path
    summary: FleetSummary
    stopped: list[str]


def fleet_demo_target(box: Path) -> Target:
    """The single-host demo's target, lean: one benchmark run, no CLIP comparison, one torch CPU thread per
    service (six services share the machine: measured on 2 cores, a tiny request costs 0.18 s of CPU with
    one thread against 0.44 s with torch's default pool, whose threads spin between ops; the demo took
    210-217 s with it, 120 s without)."""
    target = demo_target(box, free_port(), torch_threads=1)
    return target.model_copy(
        update={
            "workload": target.workload.model_copy(update={"benchmark_runs": 1}),
            "quality": target.quality.model_copy(update={"enabled": False}),
        }
    )


def demo_fleet(targets: dict[str, Target], socket_path: str) -> Fleet:
    """One canary, then the rest in one wave, upgraded side by side (the canary alone serves meanwhile)."""
    count = len(targets)
    return Fleet(
        hosts=[FleetHost(name=name, target=target) for name, target in targets.items()],
        load_balancer=LoadBalancer(socket=socket_path, drain_timeout_s=60, up_timeout_s=120),
        rollout=Rollout(
            canary=1,
            wave_size=max(count - 1, 1),
            max_unavailable=max(count - 1, 1),
            # random-weight tiny models: latency is reported, not judged
            analysis=Analysis(duration_s=60, requests=1, min_requests=1, max_latency_ratio=None),
            progress_deadline_s=600,
        ),
    )


def start_all(host: LocalHost, targets: list[Target]) -> None:
    """Start every host's current service at once, then wait until each answers."""
    from flows.stages.rollback import restart_current, wait_healthy

    started = [(t, restart_current(host, t.current, t.new.install_dir)) for t in targets]
    for target, process in started:
        wait_healthy(host, target.current, process)


def _api_up() -> None:
    """The Prefect API answers (the temporary server started, when no PREFECT_API_URL is set)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.api_healthcheck()


def run_fleet_demo(
    hosts: int = 3, simulate_failure: str | None = None, runs_dir: str = "runs", keep_box: bool = False
) -> FleetDemoResult:
    """Start N tiny-sd15 hosts and HAProxy, run deploy-fleet under a steady load, stop everything."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.runbooks.fleet.flow import deploy_fleet

    if hosts < 2:
        raise ValueError(f"--fleet: a fleet needs at least 2 hosts, got {hosts}")
    box = Path(tempfile.mkdtemp(prefix="sdxl-fleet-demo-"))
    targets = {f"host{i}": fleet_demo_target(box / f"host{i}") for i in range(1, hosts + 1)}
    targets["host1"] = rehearsal_target(targets["host1"], simulate_failure)  # the canary fails, if asked
    local = LocalHost()
    stopped: list[str] = []
    prefect_up = threading.Thread(target=_api_up, name="prefect-api", daemon=True)
    prefect_up.start()  # Prefect's temporary server starts while the hosts do
    try:
        start_all(local, list(targets.values()))
        servers = {name: target.current.port for name, target in targets.items()}
        with LocalHAProxy(servers=servers, root=box / "haproxy") as proxy:
            fleet = demo_fleet(targets, proxy.socket_path)
            api = HAProxyAPI(fleet.load_balancer)
            for name in targets:  # /ready answers once each old service is warm
                api.wait_up(name, fleet.load_balancer.up_timeout_s)
            fail_at = {"host1": simulate_failure} if simulate_failure else None
            prefect_up.join()
            with SteadyLoad(proxy.url, TINY_REQUEST, pause_s=LOAD_PAUSE_S) as load:
                state = deploy_fleet(fleet=fleet, fail_at=fail_at, runs_dir=runs_dir, return_state=True)
            outcome = state.result(raise_on_failure=False)
    finally:
        for target in targets.values():
            stopped += stop_all(local, target)
        local.close()
        if not keep_box:
            shutil.rmtree(box, ignore_errors=True)
    run_dir = getattr(outcome, "run_dir", None)
    if run_dir is None:
        raise RuntimeError(f"deploy-fleet ended without a run directory: {outcome!r}")
    summary_path = Path(run_dir) / "summary.json"
    summary = FleetSummary.model_validate_json(summary_path.read_text(encoding="utf-8"))
    summary.load = DemoLoad(
        requests=load.requests,
        failed_requests=load.failed,
        statuses={str(k): v for k, v in load.statuses.items()},
        failures=load.failures[:20],
    )
    summary_path.write_text(summary.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return FleetDemoResult(summary_path=summary_path, summary=summary, stopped=stopped)
