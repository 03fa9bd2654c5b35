"""The embedded demo: the whole `deploy-sdxl` runbook on this machine, with tiny random-weight models.

Everything lives in a throwaway "box" directory that stands in for the GPU box's home: the "current"
service (tiny-sd15, started from a small launcher script that plays the user's `working-sd-api.py`),
the install dir, backups and logs. Nothing touches the real `~`, and every process the demo started is
stopped by its PID before it returns.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flows.box.hosts import Host, LocalHost, q
from flows.box.ports import free_port
from flows.box.procs import find_service, listener_pids, stop_process, wait_port_free
from flows.config.target import (
    DEFAULT_CRITERIA,
    Connection,
    CurrentService,
    NewService,
    Paths,
    QualityCheck,
    Target,
    Workload,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]

TINY_REQUEST = {
    "prompt": "professional basketball player shooting a three pointer",
    "num_inference_steps": 2,
    "width": 64,
    "height": 64,
    "use_refiner": True,
    "use_face_restoration": False,
    "hires_fix": False,
}


def demo_target(
    box: Path, port: int, python: str = sys.executable, torch_threads: int | None = None
) -> Target:
    """A local target inside `box`: tiny-sd15 today, tiny-sdxl to deploy, thresholds for 64 px images.
    `torch_threads`: OMP_NUM_THREADS for both services (default: torch's own choice)."""
    from service.settings import default_cache_dir

    threads = {"OMP_NUM_THREADS": str(torch_threads)} if torch_threads else {}

    launcher = box / "app" / "working-sd-api.sh"
    launcher.parent.mkdir(parents=True, exist_ok=True)
    cache = str(default_cache_dir())
    launcher.write_text(
        "#!/bin/sh\n# Stands in for the user's working-sd-api.py: the SD1.5 service the app talks to today.\n"
        f"PYTHONPATH={q(str(PROJECT_ROOT))} SDXL_DEPLOY_CACHE={q(cache)} "
        + "".join(f"{name}={value} " for name, value in threads.items())
        + f"exec {q(python)} -m sdxl_deploy.cli serve "
        f"--model tiny-sd15 --host 127.0.0.1 --port {port}\n"
    )
    # 64 px images; and random-weight models and CLIP give no quality signal, so the quality row warns only
    overrides = {"resolution": {"threshold": 64}, "quality": {"enforce": False}}
    criteria = [c.model_copy(update=overrides.get(c.name, {})) for c in DEFAULT_CRITERIA]
    return Target(
        connection=Connection(kind="local"),
        current=CurrentService(
            name="sd15",
            start_command=f"sh {q(str(launcher))}",
            workdir=str(box / "app"),
            files=[str(launcher)],
            pid_file=str(box / "run" / "sd-api.pid"),
            log_file=str(box / "logs" / "sd-api.log"),
            port=port,
            health_timeout_s=180,
        ),
        new=NewService(
            model="tiny-sdxl",
            port=port,
            python=python,
            env={"SDXL_DEPLOY_CACHE": cache, **threads},
            install_dir=str(box / "sdxl-deploy"),
            log_dir=str(box / "sdxl-deploy" / "logs"),
            min_free_disk_gb=0.5,
            ready_timeout_s=180,
        ),
        workload=Workload(
            app_request=TINY_REQUEST,
            baseline_size=64,
            warmup_requests=1,
            benchmark_runs=3,
            request_timeout_s=60,
        ),
        paths=Paths(backup_root=str(box / "backups"), keep_backups=3),
        quality=QualityCheck(prompt_limit=2, seeds=1, scorer="tiny-random-clip", scorer_weights=None),
        criteria=criteria,
    )


def rehearsal_target(target: Target, simulate_failure: str | None) -> Target:
    """`target` as the rehearsal of a failure at `simulate_failure` needs it: a stage only the stop-first
    order has (stopping the old service, starting the new one in its place) is rehearsed in that order, since
    the demo's box has room to stage and `auto` would never reach it."""
    from flows.runbooks.plan import STAGED_STAGES, STOP_FIRST_STAGES

    if simulate_failure not in set(STOP_FIRST_STAGES) - set(STAGED_STAGES):
        return target
    print(f"{simulate_failure} is a stage of the stop-first order: this rehearsal deploys stop-first")
    return target.model_copy(update={"new": target.new.model_copy(update={"start_mode": "stop-first"})})


def start_current(host: Host, target: Target) -> None:
    """Start the current service the way a rollback does, and wait until it answers."""
    from flows.stages.rollback import restart_current, wait_healthy

    process = restart_current(host, target.current, target.new.install_dir)
    wait_healthy(host, target.current, process)


def stop_all(host: Host, target: Target) -> list[str]:
    """Stop whatever serves the demo's port (the old or the new service), by PID; what was stopped."""
    stopped = []
    for _ in range(3):
        process = find_service(host, target.current.port, target.current.pid_file) or find_service(
            host, target.new.port, target.new.pid_file
        )
        if process is None:
            break
        stopped.append(stop_process(host, process, timeout_s=15))
    wait_port_free(host, target.current.port)
    if listener_pids(host, target.current.port):
        raise RuntimeError(f"port {target.current.port} still in use after the demo")
    return stopped


@dataclass
class DemoResult:
    summary_path: Path
    old_answering_after: bool | None
    stopped: list[str]
    old_untouched: bool | None = None  # after a failure: the old service is the very process it was before


def run_demo(
    simulate_failure: str | None = None, runs_dir: str = "runs", keep_box: bool = False
) -> DemoResult:
    """Start tiny-sd15, run deploy-sdxl to tiny-sdxl (staged beside it: both fit on a CPU; optionally failing at
    a stage, stop-first for a stage only that order has), stop everything."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.runbooks.runbook import deploy_sdxl
    from flows.stages.rollback import current_answers

    box = Path(tempfile.mkdtemp(prefix="sdxl-demo-box-"))
    target = rehearsal_target(demo_target(box, free_port()), simulate_failure)
    host = LocalHost()
    old_untouched = None
    try:
        start_current(host, target)
        before = find_service(host, target.current.port, target.current.pid_file)
        state = deploy_sdxl(target=target, fail_at=simulate_failure, runs_dir=runs_dir, return_state=True)
        outcome = state.result(raise_on_failure=False)
        run_dir = Path(outcome.run_dir) if hasattr(outcome, "run_dir") else None
        old_answering = current_answers(host, target.current) is not None if simulate_failure else None
        if simulate_failure:
            now = find_service(host, target.current.port, target.current.pid_file)
            old_untouched = before is not None and now == before
    finally:
        stopped = stop_all(host, target)
        host.close()
        if not keep_box:
            shutil.rmtree(box, ignore_errors=True)
    if run_dir is None:
        raise RuntimeError(f"deploy-sdxl ended without a run directory: {outcome!r}")
    return DemoResult(
        summary_path=run_dir / "summary.json",
        old_answering_after=old_answering,
        stopped=stopped,
        old_untouched=old_untouched,
    )
