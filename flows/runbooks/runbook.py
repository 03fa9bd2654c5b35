"""The `deploy-sdxl` flow: the runbook that upgrades the current service to SDXL on one host.

The flow body reads as the runbook it automates; each stage is a `with run.stage(...)` block, and a
failure names its stage in the flow run's message. `fail_at` is a rehearsal feature: it injects a failure at
the start of that stage (`cutover`: after the old service stopped), to watch the automatic recovery without
breaking anything. The stages' orders and the dry run's plan are in `flows/runbooks/plan.py`, the way back
after a failure in `flows/runbooks/recovery.py`; `verify-sdxl` and `rollback-sdxl` have modules of their own.

A deploy runs in one of two orders, decided in preflight (`flows/box/capacity.py`):
- staged (the box has room for both): the new service starts on its staging port beside the old one, is
  warmed up, benchmarked, compared and gated while the old one serves; then the cut-over hands it the app's
  port in about a second. A failure before the cut-over stops only the staged service; at or after it, the
  old service is put back.
- stop-first: the old service stops, the new one starts on the app's port; a failure from stopping on puts
  the old service back.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, ExitStack, nullcontext
from pathlib import Path

from prefect import flow

from flows.box.capacity import StartDecision, decide_start_mode
from flows.box.common import run_logger
from flows.box.deploy_state import interrupted_deploy
from flows.box.hosts import Host
from flows.box.model_check import check_new_model
from flows.box.releases import record_release, release_of
from flows.config.target import Target
from flows.errors import FlowError, GateFailed, RunFailed
from flows.evidence.gates import Evidence, GateReport, criteria_for_mode, judge_downtime, require_passed
from flows.record.approval import decide, require_promoted
from flows.record.deploy_record import DeployRecord
from flows.record.facts import CompileSkipped, CutoverFacts, PreflightFacts
from flows.record.prober import Prober, watch_downtime
from flows.record.rundir import RunRecord, RunSummary, StageFailed
from flows.runbooks.hostrun import choose_target, connect, finish_run, note_reconnects, take_lock
from flows.runbooks.plan import Stage, deploy_plan, stages_of
from flows.runbooks.recovery import after_failure, recover
from flows.stages.backup import backup_current
from flows.stages.benchmark import run_benchmark, scan_log
from flows.stages.compile import compile_functions
from flows.stages.cutover import cut_over
from flows.stages.deploy import (
    Release,
    build_wheel,
    check_compile,
    ship_release,
    start_new_service,
    stop_service,
)
from flows.stages.gates import evaluate_gates
from flows.stages.prefetch import prefetch_weights
from flows.stages.preflight import inspect_current, inspect_host, require_ready
from flows.stages.quality import assess_quality, collect_baseline, comparison_margin
from flows.stages.tunnel import check_app_path
from flows.stages.warmup import warm_up


@flow(name="deploy-sdxl", log_prints=True)
def deploy_sdxl(
    target: Target = Target(),
    target_file: str | None = None,
    dry_run: bool = False,
    fail_at: Stage | None = None,
    wheel: str | None = None,
    runs_dir: str = "runs",
    force_unlock: bool = False,
) -> RunSummary:
    """Upgrade the current service to SDXL: staged beside it and cut over when the box has room, else
    stop-first; a failure before the old service is touched stops only the new one, any later one rolls back.

    Args:
        target: The host, the current service and the new one (ignored when target_file is set).
        target_file: A YAML/JSON target file on the worker's machine.
        dry_run: Run the read-only preflight, print the plan, change nothing.
        fail_at: Rehearsal only: inject a failure at the start of this stage (cutover: after the old
            service stopped); it must be a stage of the order preflight chooses.
        wheel: A prebuilt wheel of this project to ship (default: build one now).
        runs_dir: Where the run directory (summary.json, report.md) is written.
        force_unlock: Clear the host's deploy lock even when its owner cannot be checked from here
            (taken from another machine); a lock whose owner provably ended is cleared anyway.
    """
    target = choose_target(target, target_file)
    run = DeployRecord("deploy-sdxl", target, runs_dir, fail_at)
    host: Host | None = None
    decision: StartDecision | None = None
    with ExitStack() as stack:
        try:
            with run.stage("preflight"):
                host, target = connect(stack, target)
                take_lock(stack, host, target, run, force_unlock)
                prober = None if dry_run else stack.enter_context(watch_downtime(run, host, target))
                interrupted = interrupted_deploy(host, target)
                if interrupted and not dry_run:
                    run.summary.facts.recovered = recover(host, target, interrupted)
                model = check_new_model(host, target)  # the target's own errors first: refused at once
                run.summary.facts.model = model
                run.summary.warnings += model.warnings
                host_facts = inspect_host(host, target)
                current = inspect_current(host, target)
                if interrupted and dry_run and current.problems:
                    current.problems.append(
                        f"an interrupted deploy ({interrupted.run_id}, stage {interrupted.stage}) left the host "
                        "as it is: a real deploy, or rollback-sdxl, restores the old service first"
                    )
                run.summary.facts.preflight = PreflightFacts(host=host_facts, current=current)
                require_ready(host_facts, current)
                decision = decide_start_mode(host, target, host_facts, model)
                run.summary.facts.start = decision
                print(f"start mode: {decision.mode} ({decision.reason})")
                print(f"compile step: {decision.compile_reason}")
                if prober:
                    prober.mode = decision.mode
                if fail_at and fail_at not in stages_of(decision):
                    raise ValueError(
                        f"fail_at {fail_at!r} is not a stage of a {decision.mode} deploy "
                        f"({', '.join(stages_of(decision))}); set new.start_mode to rehearse it"
                    )
            if dry_run:
                plan = deploy_plan(target, current.process.describe() if current.process else "?", decision)
                print(plan)
                run.write_text("plan.md", plan)
                return finish_run(run, "dry-run", "dry run: preflight passed; nothing was changed")

            staged = decision.mode == "staged"
            criteria = criteria_for_mode(target.criteria, decision.mode)
            serving = release_of(host, target, current.process)
            run.begin(
                host,
                target,
                old_process=current.process,
                previous_release=serving.id if serving else None,
                mode=decision.mode,
            )
            with run.stage("backup"):
                backup = backup_current(host, target, current.process)
                run.backed_up(backup.path)
            with run.stage("baseline"):
                baseline = collect_baseline(host, target, run.dir / "quality")
                run.summary.facts.quality_sizing = baseline.sizing if baseline else None
            with run.stage("ship"):
                release = ship_release(
                    host,
                    target,
                    Path(wheel) if wheel else build_wheel(run.dir / "wheel"),
                    fixes=host_facts.release_fixes,
                    box_torch=host_facts.packages.get("torch"),
                )
                run.shipped(release.release_id)
                run.summary.warnings += host_facts.notes
                if host_facts.gpus:  # the service compiles on CUDA only: check it before the old one stops
                    compiled = check_compile(host, release)
                    run.summary.facts.compile_check = compiled
                    if compiled.warning():
                        run.summary.warnings.append(compiled.warning())
            with run.stage("prefetch"):  # the weights onto the box while the old service serves
                fetched = prefetch_weights(host, target, release)
                run.summary.facts.prefetch = fetched
            compile_step = functools.partial(
                build_compiled,
                run,
                host,
                target,
                release,
                fetched.offline_ready,
                gpu=bool(host_facts.gpus),
                jobs=decision.compile_jobs,
            )
            compile_first = staged or decision.compile_beside
            if compile_first:  # while the old service serves: the new one only loads what the step built
                with run.stage("compile"):
                    compile_step("beside the old service" if staged else "before the old service stops")
            if staged:
                with run.stage("start_staged"):  # beside the old service, on the staging port
                    started = start_new_service(
                        host, target, release, decision.stage_port, offline=fetched.offline_ready
                    )
                    run.started(started.process, started.log_offset)
            else:
                with run.stage("stop_current"):
                    stop_service(host, current.process, target.current.port, target.current.stop_timeout_s)
                if not compile_first:
                    with run.stage("compile"):  # no room for it beside the old service: the app waits for it
                        compile_step("after the old service stopped (no room beside it)")
                with run.stage("start_new"):
                    started = start_new_service(host, target, release, offline=fetched.offline_ready)
                    run.started(started.process, started.log_offset)
            with run.stage("warmup"), quiet(prober):  # the warm-up's requests are the new service's first
                ready = warm_up(host, target, started)
                run.summary.facts.warmup = ready.facts()
            with run.stage("benchmark"):
                with quiet(prober):
                    bench = run_benchmark(host, target, started.port)
                log_scan = scan_log(host, started.log_file, started.log_offset)
                run.write_json("benchmark.json", bench.model_dump())
            with run.stage("tunnel"):
                app = check_app_path(host, target, started.port)
                if staged:  # the app's own way still reaches the old service, which serves until the cut-over
                    old_app = check_app_path(host, target, target.current.port)
                    run.summary.facts.app_path_before_cutover = old_app
                    if not (old_app.health_ok and old_app.generate_ok):
                        run.summary.warnings.append(
                            f"before the cut-over the old service did not answer the app's way: {old_app.detail}"
                        )
            with run.stage("gate"):
                with quiet(prober):
                    quality = assess_quality(
                        host, target, baseline, run.dir / "quality", comparison_margin(target), started.port
                    )
                evidence = Evidence(
                    health=ready.health,
                    benchmark=bench,
                    app=app,
                    log_scan=log_scan,
                    quality=quality,
                    downtime=prober.downtime() if prober else None,
                )
                gates = evaluate_gates(criteria, evidence)
                run.record_gates(gates)
                require_passed(gates)
            with run.stage("approval"):  # an enforced INCONCLUSIVE row: a person (or the target) decides
                approval = decide(gates, quality, target.quality)
                run.summary.facts.approval = approval
                require_promoted(approval)
            if staged:
                with run.stage("cutover", inject_at_start=False):
                    run.cutting_over()
                    cut = cut_over(
                        host,
                        target,
                        started.process,
                        current.process,
                        started.port,
                        rehearse_failure=fail_at == "cutover",
                    )
                    run.summary.facts.cutover = CutoverFacts(stopped_old=cut.stopped_old, seconds=cut.seconds)
                    check_after_cutover(run, host, target, prober, gates)
        except StageFailed as failure:
            after_failure(
                run,
                host,
                target,
                failure,
                decision.mode if decision else "stop-first",
                stages_of(decision) if decision else None,
            )
            raise RunFailed(f"deploy-sdxl {run.summary.message}", str(run.dir)) from None

        if started.launch is not None:
            record = record_release(
                host,
                target,
                release_id=release.release_id,
                release_path=release.path,
                launch=started.launch,
                process=started.process,
                run_id=run.dir.name,
            )
            run.summary.facts.release = record.id
        run.deployed()
        note_reconnects(run, host)
        run.summary.new_service_answering = True
        how = f"cut over in {cut.seconds:.2f} s; " if staged else ""
        return finish_run(
            run,
            "completed",
            f"deployed {target.new.model} on port {target.new.port} ({decision.mode}); {how}all gates passed",
        )


def build_compiled(
    run: RunRecord,
    host: Host,
    target: Target,
    release: Release,
    offline: bool,
    where: str,
    *,
    gpu: bool,
    jobs: int | None = None,
) -> None:
    """Run the compile step for the release's new service; its report is the stage's evidence (`summary.json`
    facts `compile`, report.md), its problems the run's warnings. A box without a GPU, whose target does not
    force the compile on (new.env SDXL_COMPILE), has nothing to build: the step is not run, and the record
    says so."""
    if not gpu and not compile_forced(target):
        run.summary.facts.compile = CompileSkipped(
            skipped="no GPU on the box and new.env does not set SDXL_COMPILE=on"
        )
        run_logger().info("compile step: skipped (no GPU on the box: the service serves uncompiled)")
        return
    result = compile_functions(host, target, release, offline=offline, where=where, jobs=jobs)
    run.summary.facts.compile = result
    run.summary.warnings += result.warnings()


def compile_forced(target: Target) -> bool:
    """Whether the target's new.env turns the compile on whatever the device (`SDXL_COMPILE`)."""
    return target.new.env.get("SDXL_COMPILE", "").strip().lower() in {"on", "true", "1", "yes"}


def check_after_cutover(
    run: RunRecord, host: Host, target: Target, prober: Prober | None, gates: GateReport
) -> None:
    """After the cut-over: the new service answers the app's request the app's way on the app's port, and
    the downtime, now including the cut-over's, is judged again (the gate saw only the time before it)."""
    app = check_app_path(host, target, target.current.port)
    run.summary.facts.app_path_after_cutover = app
    if not (app.health_ok and app.generate_ok):
        raise FlowError(
            f"after the cut-over the app's request failed on port {target.current.port}: {app.detail}"
        )
    if prober is None:
        return
    prober.wait_for_next_health_probe()
    gates = judge_downtime(gates, prober.downtime())
    run.record_gates(gates)
    row = next((r for r in gates.rows if r.criterion == "max_downtime_s"), None)
    if row is not None:
        if run.summary.facts.cutover is not None:
            run.summary.facts.cutover.max_downtime_s = row
        if row.verdict == "fail":
            raise GateFailed("after the cut-over: max_downtime_s failed (observed: the criteria table)")


def quiet(prober: Prober | None) -> AbstractContextManager[None]:
    """The prober's app requests held back while the flow sends its own: the warm-up's (the new service's
    first generations, so a crash names the warm-up request) and the timed ones; /health probes go on."""
    return prober.quiet() if prober else nullcontext()
