"""The runbook flows: `deploy-sdxl`, `verify-sdxl` and `rollback-sdxl`.

Each flow body reads as the runbook it automates; each stage is a `with run.stage(...)` block, and a
failure names its stage in the flow run's message. `fail_at` (deploy) is a rehearsal feature: it injects
a failure at the start of that stage (`cutover`: after the old service stopped), to watch the automatic
recovery without breaking anything.

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
from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.box.capacity import StartDecision, decide_start_mode
from flows.box.common import run_logger
from flows.box.deploy_state import DeployState, interrupted_deploy, load_state, save_state
from flows.box.hostfs import home_dir
from flows.box.hosts import Host, open_host
from flows.box.lock import host_lock, new_owner
from flows.box.model_check import check_new_model
from flows.box.procs import find_service
from flows.box.releases import record_release, release_of
from flows.box.supervisor import Restarts, read_restarts
from flows.config.target import StartMode, Target, load_target
from flows.errors import CutoverFailed, DeployFailed, GateFailed, RollbackFailed, VerifyFailed
from flows.evidence.gates import Evidence, GateReport, criteria_for_mode, judge_downtime, require_passed
from flows.record.approval import decide, require_promoted
from flows.record.prober import Prober, watch_downtime
from flows.record.rundir import RunRecord, RunSummary, StageFailed, report_markdown
from flows.record.runlog import TOLD_BY_SUMMARY
from flows.stages.backup import backup_current
from flows.stages.benchmark import run_benchmark, scan_log
from flows.stages.compile import compile_argv, compile_functions, step_pid_file, stop_leftover
from flows.stages.cutover import cut_over, discard_staged
from flows.stages.deploy import (
    Release,
    Started,
    build_wheel,
    check_compile,
    serve_argv,
    ship_release,
    start_new_service,
    stop_service,
)
from flows.stages.gates import evaluate_gates, publish_gates
from flows.stages.prefetch import prefetch_weights
from flows.stages.preflight import inspect_current, inspect_host, require_ready
from flows.stages.quality import assess_quality, collect_baseline, comparison_margin
from flows.stages.rollback import current_answers, roll_back
from flows.stages.tunnel import check_app_path
from flows.stages.warmup import new_service_health, warm_up

Stage = Literal[
    "preflight",
    "backup",
    "baseline",
    "ship",
    "prefetch",
    "compile",
    "stop_current",
    "start_new",
    "start_staged",
    "warmup",
    "benchmark",
    "tunnel",
    "gate",
    "approval",
    "cutover",
]
STAGES: tuple[str, ...] = Stage.__args__  # every stage of either order (what fail_at accepts)
# The two orders: the same stages before the new service starts and after it is warm; they differ in
# how it starts (beside the old one, or after stopping it) and in the staged order's cut-over at the end.
# The compile step runs before the old service stops, except in a stop-first deploy whose box has no room for
# it beside the old service (flows/box/capacity.py): there it runs after the stop.
_BEFORE_START = ("preflight", "backup", "baseline", "ship", "prefetch")
_AFTER_START = ("warmup", "benchmark", "tunnel", "gate", "approval")
STOP_FIRST_STAGES: tuple[str, ...] = (*_BEFORE_START, "compile", "stop_current", "start_new", *_AFTER_START)
STAGED_STAGES: tuple[str, ...] = (*_BEFORE_START, "compile", "start_staged", *_AFTER_START, "cutover")
STAGES_OF: dict[str, tuple[str, ...]] = {"stop-first": STOP_FIRST_STAGES, "staged": STAGED_STAGES}
STOP_FIRST_COMPILE_AFTER_STOP: tuple[str, ...] = (
    *_BEFORE_START,
    "stop_current",
    "compile",
    "start_new",
    *_AFTER_START,
)
# From this stage on the old service may be down: a failure puts it back.
TOUCHES_OLD_FROM: dict[str, str] = {"stop-first": "stop_current", "staged": "cutover"}


def stages_of(decision: StartDecision) -> tuple[str, ...]:
    """The stages of the order preflight chose, the compile step where it runs."""
    if decision.mode == "stop-first" and not decision.compile_beside:
        return STOP_FIRST_COMPILE_AFTER_STOP
    return STAGES_OF[decision.mode]


def touches_old_service(mode: StartMode, stage: str, order: tuple[str, ...] | None = None) -> bool:
    """Whether a failure at `stage` of a deploy in `mode` (its stages `order`, default the mode's) may have
    left the old service down."""
    order = order or STAGES_OF[mode]
    return stage in order and order.index(stage) >= order.index(TOUCHES_OLD_FROM[mode])


def choose_target(target: Target | None, target_file: str | None) -> Target:
    """The target file when one is given, else the `target` parameter."""
    if target_file:
        return load_target(target_file)
    return target or Target()


def connect(stack: ExitStack, target: Target) -> tuple[Host, Target]:
    """Open the host and resolve the target's `~/` paths there."""
    host = stack.enter_context(open_host(target.connection))
    return host, target.on_host(home_dir(host))


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
    run = RunRecord("deploy-sdxl", target, runs_dir, fail_at)
    state: DeployState | None = None
    host: Host | None = None
    decision: StartDecision | None = None

    def record_progress(stage: str) -> None:
        if state and host:
            state.stage = stage
            save_state(host, target, state)

    run.on_stage = record_progress
    with ExitStack() as stack:
        try:
            with run.stage("preflight"):
                host, target = connect(stack, target)
                take_lock(stack, host, target, run, force_unlock)
                prober = None if dry_run else stack.enter_context(watch_downtime(run, host, target))
                interrupted = interrupted_deploy(host, target)
                if interrupted and not dry_run:
                    run.summary.facts["recovered"] = recover(host, target, interrupted)
                model = check_new_model(host, target)  # the target's own errors first: refused at once
                run.summary.facts["model"] = model.model_dump()
                run.summary.warnings += model.warnings
                host_facts = inspect_host(host, target)
                current = inspect_current(host, target)
                if interrupted and dry_run and current.problems:
                    current.problems.append(
                        f"an interrupted deploy ({interrupted.run_id}, stage {interrupted.stage}) left the host "
                        "as it is: a real deploy, or rollback-sdxl, restores the old service first"
                    )
                run.summary.facts["preflight"] = {
                    "host": host_facts.model_dump(),
                    "current": current.model_dump(),
                }
                require_ready(host_facts, current)
                decision = decide_start_mode(host, target, host_facts, model)
                run.summary.facts["start"] = decision.model_dump()
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
                return _finish(run, "dry-run", "dry run: preflight passed; nothing was changed")

            staged = decision.mode == "staged"
            criteria = criteria_for_mode(target.criteria, decision.mode)
            serving = release_of(host, target, current.process)
            state = save_state(
                host,
                target,
                DeployState(
                    run_id=run.dir.name,
                    stage="backup",
                    old_process=current.process,
                    previous_release=serving.id if serving else None,
                    mode=decision.mode,
                ),
            )
            with run.stage("backup"):
                backup = backup_current(host, target, current.process)
                state.backup_dir = run.summary.backup_dir = backup.path
            with run.stage("baseline"):
                baseline = collect_baseline(host, target, run.dir / "quality")
                run.summary.facts["quality_sizing"] = baseline.sizing if baseline else None
            with run.stage("ship"):
                release = ship_release(
                    host,
                    target,
                    Path(wheel) if wheel else build_wheel(run.dir / "wheel"),
                    fixes=host_facts.release_fixes,
                    box_torch=host_facts.packages.get("torch"),
                )
                state.release_id = run.summary.release_id = release.release_id
                run.summary.warnings += host_facts.notes
                if host_facts.gpus:  # the service compiles on CUDA only: check it before the old one stops
                    compiled = check_compile(host, release)
                    run.summary.facts["compile_check"] = compiled.model_dump()
                    if compiled.warning():
                        run.summary.warnings.append(compiled.warning())
            with run.stage("prefetch"):  # the weights onto the box while the old service serves
                fetched = prefetch_weights(host, target, release)
                run.summary.facts["prefetch"] = fetched.model_dump()
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
                    note_started(host, target, state, started)
            else:
                with run.stage("stop_current"):
                    stop_service(host, current.process, target.current.port, target.current.stop_timeout_s)
                if not compile_first:
                    with run.stage("compile"):  # no room for it beside the old service: the app waits for it
                        compile_step("after the old service stopped (no room beside it)")
                with run.stage("start_new"):
                    started = start_new_service(host, target, release, offline=fetched.offline_ready)
                    note_started(host, target, state, started)
            with run.stage("warmup"), quiet(prober):  # the warm-up's requests are the new service's first
                ready = warm_up(host, target, started)
                run.summary.facts["warmup"] = ready.model_dump(exclude={"health"})
            with run.stage("benchmark"):
                with quiet(prober):
                    bench = run_benchmark(host, target, started.port)
                log_scan = scan_log(host, started.log_file, started.log_offset)
                run.write_json("benchmark.json", bench.model_dump())
            with run.stage("tunnel"):
                app = check_app_path(host, target, started.port)
                if staged:  # the app's own way still reaches the old service, which serves until the cut-over
                    old_app = check_app_path(host, target, target.current.port)
                    run.summary.facts["app_path_before_cutover"] = old_app.model_dump()
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
                run.summary.facts["approval"] = approval.model_dump() if approval else None
                require_promoted(approval)
            if staged:
                with run.stage("cutover", inject_at_start=False):
                    state.cut_over = True  # from here on a failure (or an interruption) puts the old one back
                    save_state(host, target, state)
                    cut = cut_over(
                        host,
                        target,
                        started.process,
                        current.process,
                        started.port,
                        rehearse_failure=fail_at == "cutover",
                    )
                    run.summary.facts["cutover"] = cut.model_dump(exclude={"health"})
                    check_after_cutover(run, host, target, prober, gates)
        except StageFailed as failure:
            _after_failure(
                run,
                host,
                target,
                state,
                failure,
                decision.mode if decision else "stop-first",
                stages_of(decision) if decision else None,
            )
            raise DeployFailed(f"deploy-sdxl {run.summary.message}", str(run.dir)) from None

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
            run.summary.facts["release"] = record.id
        state.status, state.stage = "deployed", "done"
        save_state(host, target, state)
        note_reconnects(run, host)
        run.summary.new_service_answering = True
        how = f"cut over in {run.summary.facts['cutover']['seconds']:.2f} s; " if staged else ""
        return _finish(
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
        run.summary.facts["compile"] = {
            "skipped": "no GPU on the box and new.env does not set SDXL_COMPILE=on"
        }
        run_logger().info("compile step: skipped (no GPU on the box: the service serves uncompiled)")
        return
    result = compile_functions(host, target, release, offline=offline, where=where, jobs=jobs)
    run.summary.facts["compile"] = result.model_dump()
    run.summary.warnings += result.warnings()


def compile_forced(target: Target) -> bool:
    """Whether the target's new.env turns the compile on whatever the device (`SDXL_COMPILE`)."""
    return target.new.env.get("SDXL_COMPILE", "").strip().lower() in {"on", "true", "1", "yes"}


def note_started(host: Host, target: Target, state: DeployState, started: Started) -> None:
    """Record the new service's process on the host at once (a recovery must find it)."""
    state.new_process, state.new_log_offset = started.process, started.log_offset
    save_state(host, target, state)


def check_after_cutover(
    run: RunRecord, host: Host, target: Target, prober: Prober | None, gates: GateReport
) -> None:
    """After the cut-over: the new service answers the app's request the app's way on the app's port, and
    the downtime, now including the cut-over's, is judged again (the gate saw only the time before it)."""
    app = check_app_path(host, target, target.current.port)
    run.summary.facts["app_path_after_cutover"] = app.model_dump()
    if not (app.health_ok and app.generate_ok):
        raise CutoverFailed(
            f"after the cut-over the app's request failed on port {target.current.port}: {app.detail}"
        )
    if prober is None:
        return
    prober.wait_for_next_health_probe()
    gates = judge_downtime(gates, prober.downtime())
    run.record_gates(gates)
    row = next((r for r in gates.rows if r.criterion == "max_downtime_s"), None)
    if row is not None:
        run.summary.facts["cutover"]["max_downtime_s"] = row.model_dump()
        if row.verdict == "fail":
            raise GateFailed("after the cut-over: max_downtime_s failed (observed: the criteria table)")


def quiet(prober: Prober | None) -> AbstractContextManager[None]:
    """The prober's app requests held back while the flow sends its own: the warm-up's (the new service's
    first generations, so a crash names the warm-up request) and the timed ones; /health probes go on."""
    return prober.quiet() if prober else nullcontext()


def take_lock(stack: ExitStack, host: Host, target: Target, run: RunRecord, force: bool) -> None:
    """Hold the host's deploy lock until the flow ends (refused, naming the holder, when another run has it)."""
    owner = new_owner(run.summary.flow, run.dir.name)
    stack.enter_context(host_lock(host, target.new.install_dir, owner, force))


def recover(host: Host, target: Target, interrupted: DeployState) -> dict[str, Any]:
    """Clean up after a deploy that died without finishing (control side killed, link lost): a staged one
    that never reached its cut-over only had its staged service started, which is stopped; any other puts
    the old service back."""
    print(
        f"found an interrupted deploy: run {interrupted.run_id} stopped at stage {interrupted.stage} "
        f"(last update {interrupted.updated_at}); "
        + (
            "stopping the service it staged (the old one was never touched)"
            if interrupted.mode == "staged" and not interrupted.cut_over
            else "restoring the old service first"
        )
    )
    facts: dict[str, Any] = {
        "run_id": interrupted.run_id,
        "stage": interrupted.stage,
        "mode": interrupted.mode,
        "stopped_compile": stop_leftover(host, step_pid_file(target.new.install_dir)),
    }
    if interrupted.mode == "staged" and not interrupted.cut_over:
        facts["stopped_staged"] = discard_staged(host, target, interrupted.new_process)
        interrupted.status = "failed"
        save_state(host, target, interrupted)
        return facts
    result = roll_back(host, target)
    return {**facts, **result.model_dump(exclude={"health"})}


def note_reconnects(run: RunRecord, host: Host | None) -> None:
    """Record how often the SSH link dropped and was re-established during the run."""
    if host is not None and getattr(host, "reconnects", 0):
        run.summary.facts["ssh_reconnects"] = host.reconnects  # type: ignore[attr-defined]


def _after_failure(
    run: RunRecord,
    host: Host | None,
    target: Target,
    state: DeployState | None,
    failure: StageFailed,
    mode: StartMode,
    order: tuple[str, ...] | None = None,
) -> None:
    """Put the old service back when it may have been touched; before that (a staged deploy before its
    cut-over) stop only the staged new service. Record whether the old service answers afterwards."""
    touched = touches_old_service(mode, failure.stage, order)
    outcome = ""
    port = target.current.port
    if host is not None and touched:
        try:
            result = roll_back(host, target)
            run.summary.rolled_back = True
            outcome = f"; rolled back: {result.restarted}"
            port = result.port or port
        except Exception as exc:  # report both failures: the stage's and the rollback's
            outcome = f"; ROLLBACK FAILED: {type(exc).__name__}: {exc}"
    elif host is not None and state is not None and state.new_process is not None:
        try:
            stopped = discard_staged(host, target, state.new_process)
            run.summary.facts["discarded_staged"] = stopped
            outcome = f"; the staged new service was stopped ({stopped}); the old service was not touched"
        except Exception as exc:
            outcome = f"; STOPPING THE STAGED SERVICE FAILED: {type(exc).__name__}: {exc}"
    run.summary.old_service_answering = _old_service_answers(host, target, port)
    if host is not None and state:
        state.status = "rolled_back" if run.summary.rolled_back else "failed"
        try:
            save_state(host, target, state)
        except Exception as exc:  # the link may be gone: the next deploy or rollback finds "in_progress"
            print(f"could not record the final deploy state: {exc}")
    note_reconnects(run, host)
    answering = {True: "; old service answering", False: "; OLD SERVICE NOT ANSWERING", None: ""}
    _finish(run, "failed", f"{failure}{outcome}{answering[run.summary.old_service_answering]}")


def _old_service_answers(host: Host | None, target: Target, port: int) -> bool | None:
    """Whether the old service answers healthy on `port` now (None when the host cannot be reached)."""
    service = target.current.model_copy(update={"port": port})
    try:
        if host is not None:
            return current_answers(host, service) is not None
        with open_host(target.connection) as fresh:
            return current_answers(fresh, service) is not None
    except Exception:
        return None


GATES_ARTIFACT = {"deploy-sdxl": "sdxl-deploy-gates", "verify-sdxl": "sdxl-verify-gates"}


def _finish(run: RunRecord, status: Literal["completed", "failed", "dry-run"], message: str) -> RunSummary:
    """Close the run record and publish what it says: the criteria table and the report."""
    summary = run.finish(status, message)
    if summary.gates and summary.flow in GATES_ARTIFACT:
        publish_gates(GateReport(rows=summary.gates), summary.gates_passed, GATES_ARTIFACT[summary.flow])
    create_markdown_artifact(
        key=f"{summary.flow}-summary", markdown=report_markdown(summary), description=message[:200]
    )
    run_logger().info(
        "%s %s: %s\nrun directory: %s",
        summary.flow,
        status,
        message,
        summary.run_dir,
        extra={TOLD_BY_SUMMARY: True},  # the CLI prints the summary instead
    )
    return summary


def deploy_plan(target: Target, current_process: str, decision: StartDecision) -> str:
    """What a deploy would do, step by step (printed by a dry run)."""
    new, cur, check = target.new, target.current, target.quality
    python = f"{new.install_dir}/releases/<release>/venv/bin/python"
    staged, stage_port = decision.mode == "staged", decision.stage_port
    stop = f"stop the current service {current_process} (TERM, wait {cur.stop_timeout_s:.0f} s, KILL)"
    start = (
        f"start `{' '.join(serve_argv(target, python, stage_port))}` detached"
        + (f" beside the old service, on the staging port {stage_port}" if staged else "")
        + f"; log {new.log_file}, pid file {new.pid_file}"
    )
    port = new.port if stage_port is None else stage_port
    compile_step = (
        f"build the compiled functions the new service loads: `{' '.join(compile_argv(serve_argv(target, python), decision.compile_jobs))}` "
        f"in the release folder with the service's environment (up to {new.compile_timeout_s:.0f} s; functions "
        f"already on disk for the same model structure, GPU, torch and diffusers are reused); "
        f"{decision.compile_reason}"
        + (
            ""
            if staged or decision.compile_beside
            else "; a first SDXL build takes minutes (10-20 on a 24 GiB card), seconds when an earlier release "
            "built its functions"
        )
    )
    if staged:
        starting = [compile_step, start]
    else:
        starting = [compile_step, stop, start] if decision.compile_beside else [stop, compile_step, start]
    steps = [
        f"start mode: {decision.mode} ({decision.reason})",
        f"back up {', '.join(cur.files) or '(no files)'}, the start command, process info, {cur.log_file} and "
        f"pip freeze to {target.paths.backup_root}/{cur.name}-<timestamp>/ (keep {target.paths.keep_backups})",
        (
            f"send {check.prompt_limit or f'{check.sizing_batch}-{check.max_prompts} (sized by their spread)'} "
            f"prompts x {check.seeds} seed(s) to the current service for the CLIP comparison ({check.scorer})"
            if check.enabled
            else "no quality comparison (quality.enabled is off)"
        ),
        f"build this project's wheel; make the release environment {new.install_dir}/releases/<release>/venv "
        f"with {new.python} (which is not modified) and install the wheel and the service's pinned "
        "dependencies into it"
        + (f" from the wheelhouse {new.wheelhouse}" if new.wheelhouse else "")
        + "; on a GPU, check torch.compile with it",
        (
            f"download the hub files {new.model} loads into the box's Hugging Face cache while the current "
            f"service serves (free disk checked first, {new.prefetch.retries} retries that keep finished "
            "files); the new service then starts with HF_HUB_OFFLINE=1"
            if new.prefetch.enabled
            else "no prefetch (new.prefetch.enabled is off): the new service downloads its weights itself"
        ),
        *starting,
        f"stream the log and wait for /ready on port {port} (up to {new.ready_timeout_s:.0f} s), "
        f"{target.workload.warmup_requests} warm-up request(s)",
        f"benchmark {target.workload.benchmark_runs} generations at "
        f"{target.workload.size[0]}x{target.workload.size[1]} on port {port}, scan the log for CUDA errors",
        f"send /health and the app's request to port {port} "
        + ("through an SSH port forward" if target.connection.kind == "ssh" else "directly (local target)")
        + (f"; and to the old service on the app's port {cur.port}" if staged else ""),
        "judge the success criteria: "
        + ", ".join(
            f"{c.name}{'' if c.threshold is None else f' {c.threshold:g}'}{'' if c.enforce else ' (warn)'}"
            for c in criteria_for_mode(target.criteria, decision.mode)
        ),
    ]
    putting_back = (
        "stop the new service and start again what served before: the "
        f"recorded release serving now (`sdxl-deploy releases`), else `{cur.start_command}` in {cur.workdir}; "
        f"wait for {cur.health_path} on its port"
    )
    if staged:
        steps += [
            f"cut over: tell the new service to take port {cur.port} (SIGUSR1), {stop[0].lower()}{stop[1:]}, "
            f"wait (up to {new.cutover_timeout_s:.0f} s) for /health on port {cur.port} to be {new.model}; "
            "send the app's request there and judge max_downtime_s again",
            "on a failure before the cut-over: stop the staged new service only (the old one serves on, "
            f"untouched); at or after it: {putting_back}",
        ]
    else:
        steps.append(f"on any failure from stopping on: {putting_back}")
    return (
        "Deploy plan for "
        + target.connection.describe()
        + ":\n"
        + "\n".join(f"  {i}. {step}" for i, step in enumerate(steps, 1))
        + "\n"
    )


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
    target = choose_target(target, target_file)
    run = RunRecord("verify-sdxl", target, runs_dir)
    with ExitStack() as stack:
        try:
            with run.stage("health"):
                host, target = connect(stack, target)
                restarts = read_restarts(host, target.new.install_dir)
                run.summary.facts["restarts"] = restarts.model_dump()
                if restarts.count or restarts.gave_up:
                    print(f"the service was restarted by its supervisor: {restarts.describe()}")
                health = new_service_health(host, target)
                process = find_service(host, target.new.port, target.new.pid_file)
                run.summary.facts["process"] = process.describe() if process else None
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
        except StageFailed as failure:
            restarts_note = ""
            recorded = Restarts(**run.summary.facts["restarts"]) if "restarts" in run.summary.facts else None
            if recorded and (recorded.count or recorded.gave_up):
                restarts_note = f"; supervisor: {recorded.describe()}"
            _finish(run, "failed", f"{failure}{restarts_note}")
            raise VerifyFailed(f"verify-sdxl {failure}", str(run.dir)) from None
    run.summary.new_service_answering = True
    restarted = f"; supervisor: {restarts.describe()}" if restarts.count else "; no restarts"
    return _finish(
        run,
        "completed",
        f"{target.new.model} on port {target.new.port} meets every enforced criterion{restarted}",
    )


@flow(name="rollback-sdxl", log_prints=True)
def rollback_sdxl(
    target: Target = Target(),
    target_file: str | None = None,
    backup: str | None = None,
    runs_dir: str = "runs",
    force_unlock: bool = False,
) -> RunSummary:
    """Put the old service back: stop the new one, start the release that served before it (recorded on the
    box), or, when none did or `backup` is named, restore the current service from its backup; verify.

    Args:
        target: The host and both services (ignored when target_file is set).
        target_file: A YAML/JSON target file on the worker's machine.
        backup: A backup name under backup_root (or a path) of the current service to restore, even when
            a recorded release served before; default: the release before, else this deploy's backup.
        runs_dir: Where the run directory (summary.json, report.md) is written.
        force_unlock: Clear the host's deploy lock even when its owner cannot be checked from here.
    """
    target = choose_target(target, target_file)
    run = RunRecord("rollback-sdxl", target, runs_dir)
    with ExitStack() as stack:
        try:
            with run.stage("rollback"):
                host, target = connect(stack, target)
                take_lock(stack, host, target, run, force_unlock)
                stack.enter_context(watch_downtime(run, host, target))
                # an interrupted deploy's compile step would hold memory beside the service put back
                stop_leftover(host, step_pid_file(target.new.install_dir))
                result = roll_back(host, target, backup)
                run.summary.facts["rollback"] = result.model_dump()
                run.summary.backup_dir = result.backup_dir
                run.summary.rolled_back = True
                run.summary.old_service_answering = result.answering
        except StageFailed as failure:
            _finish(run, "failed", str(failure))
            raise RollbackFailed(f"rollback-sdxl {failure}", str(run.dir)) from None
    return _finish(run, "completed", f"{result.restarted}; old service answering on port {result.port}")
