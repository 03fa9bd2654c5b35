"""The `verify-sdxl` flow: the running service against the success criteria (health, generation, the app's
path, the gates); it changes nothing."""

from __future__ import annotations

from contextlib import ExitStack

from prefect import flow

from flows.box.deploy_state import load_state
from flows.box.procs import find_service
from flows.box.supervisor import read_restarts
from flows.config.target import Target
from flows.errors import RunFailed
from flows.evidence.gates import Evidence, require_passed
from flows.record.rundir import RunRecord, RunSummary
from flows.runbooks.hostrun import connect, failing_as, finish_run, open_run
from flows.stages.benchmark import run_benchmark, scan_log
from flows.stages.gates import evaluate_gates
from flows.stages.tunnel import check_app_path
from flows.stages.warmup import new_service_health


@flow(name="verify-sdxl", log_prints=True)
def verify_sdxl(
    target: Target = Target(),
    target_file: str | None = None,
    runs_dir: str = "runs",
) -> RunSummary:
    """Check the running service against the success criteria: health, generation, tunnel, gates; no changes.

    Args:
        target: The host and the deployed service (ignored when target_file is set).
        target_file: A YAML/JSON target file on the worker's machine.
        runs_dir: Where the run directory (summary.json, report.md) is written.
    """
    run, target = open_run("verify-sdxl", target, target_file, runs_dir)
    with ExitStack() as stack, failing_as(run, RunFailed, lambda: restarts_note(run)):
        with run.stage("health"):
            host, target = connect(stack, target)
            restarts = read_restarts(host, target.new.install_dir)
            run.summary.facts.restarts = restarts
            if restarts.count or restarts.gave_up:
                print(f"the service was restarted by its supervisor: {restarts.describe()}")
            health = new_service_health(host, target)
            process = find_service(host, target.new.port, target.new.pid_file)
            run.summary.facts.process = process.describe() if process else None
        with run.stage("benchmark"):
            bench = run_benchmark(host, target)
            state = load_state(host, target)
            log_scan = scan_log(host, target.new.log_file, state.new_log_offset if state else 0)
            run.write_json("benchmark.json", bench.model_dump())
        with run.stage("tunnel"):
            app = check_app_path(host, target)
        with run.stage("gate"):
            evidence = Evidence(health=health, benchmark=bench, app=app, log_scan=log_scan)
            gates = evaluate_gates(target.criteria, evidence)
            run.record_gates(gates)
            require_passed(gates)
    run.summary.new_service_answering = True
    restarted = f"; supervisor: {restarts.describe()}" if restarts.count else "; no restarts"
    return finish_run(
        run,
        "completed",
        f"{target.new.model} on port {target.new.port} meets every enforced criterion{restarted}",
    )


def restarts_note(run: RunRecord) -> str:
    """The supervisor's restarts, as a failed verify's message ends, when the run read any."""
    recorded = run.summary.facts.restarts
    if recorded and (recorded.count or recorded.gave_up):
        return f"; supervisor: {recorded.describe()}"
    return ""
