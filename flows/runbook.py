"""The runbook flows: `deploy-sdxl`, `verify-sdxl` and `rollback-sdxl`.

Each flow body reads as the runbook it automates; each stage is a `with run.stage(...)` block, and a
failure names its stage in the flow run's message. `fail_at` (deploy) is a rehearsal feature: it injects
a failure at the start of that stage, to watch the automatic rollback without breaking anything.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack, nullcontext
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.approval import decide, require_promoted
from flows.deploy_state import DeployState, interrupted_deploy, load_state, save_state
from flows.errors import DeployFailed, RollbackFailed, VerifyFailed
from flows.hostfs import home_dir
from flows.hosts import Host
from flows.lock import host_lock, new_owner
from flows.prober import Prober, watch_downtime
from flows.procs import find_service
from flows.releases import record_release, release_of
from flows.rundir import RunRecord, RunSummary, StageFailed, report_markdown
from flows.supervisor import Restarts, read_restarts
from flows.target import Target, load_target
from flows.tasks.backup import backup_current
from flows.tasks.benchmark import run_benchmark, scan_log
from flows.tasks.deploy import (
    build_wheel,
    check_compile,
    serve_argv,
    ship_release,
    start_new_service,
    stop_service,
)
from flows.tasks.gates import Evidence, evaluate_gates, require_passed
from flows.tasks.preflight import inspect_current, inspect_host, require_ready
from flows.tasks.quality import assess_quality, collect_baseline
from flows.tasks.rollback import current_answers, roll_back
from flows.tasks.tunnel import check_app_path
from flows.tasks.warmup import new_service_health, warm_up

Stage = Literal[
    "preflight",
    "backup",
    "baseline",
    "ship",
    "stop_current",
    "start_new",
    "warmup",
    "benchmark",
    "tunnel",
    "gate",
    "approval",
]
STAGES: tuple[str, ...] = Stage.__args__
# From this stage on the old service may be down: a failure rolls back.
ROLLBACK_FROM = STAGES.index("stop_current")


def choose_target(target: Target | None, target_file: str | None) -> Target:
    """The target file when one is given, else the `target` parameter."""
    if target_file:
        return load_target(target_file)
    return target or Target()


def quality_margin(target: Target) -> float:
    """The `quality` criterion's threshold: how many CLIP points worse still counts as not worse."""
    threshold = next((c.threshold for c in target.criteria if c.name == "quality"), None)
    return 1.0 if threshold is None else threshold


def connect(stack: ExitStack, target: Target) -> tuple[Host, Target]:
    """Open the host and resolve the target's `~/` paths there."""
    host = stack.enter_context(target.connection.open())
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
    """Upgrade the current service to SDXL; any failure after the old service stopped rolls back.

    Args:
        target: The host, the current service and the new one (ignored when target_file is set).
        target_file: A YAML/JSON target file on the worker's machine.
        dry_run: Run the read-only preflight, print the plan, change nothing.
        fail_at: Rehearsal only: inject a failure at the start of this stage.
        wheel: A prebuilt wheel of this project to ship (default: build one now).
        runs_dir: Where the run directory (summary.json, report.md) is written.
        force_unlock: Clear the host's deploy lock even when its owner cannot be checked from here
            (taken from another machine); a lock whose owner provably ended is cleared anyway.
    """
    target = choose_target(target, target_file)
    run = RunRecord("deploy-sdxl", target, runs_dir, fail_at)
    state: DeployState | None = None
    host: Host | None = None

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
            if dry_run:
                plan = deploy_plan(target, current.process.describe() if current.process else "?")
                print(plan)
                run.write_text("plan.md", plan)
                return _finish(run, "dry-run", "dry run: preflight passed; nothing was changed")

            serving = release_of(host, target, current.process)
            state = save_state(
                host,
                target,
                DeployState(
                    run_id=run.dir.name,
                    stage="backup",
                    old_process=current.process,
                    previous_release=serving.id if serving else None,
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
            with run.stage("stop_current"):
                stop_service(host, current.process, target.current.port, target.current.stop_timeout_s)
            with run.stage("start_new"):
                started = start_new_service(host, target, release)
                state.new_process, state.new_log_offset = started.process, started.log_offset
                save_state(host, target, state)
            with run.stage("warmup"), quiet(prober):  # the warm-up's requests are the new service's first
                ready = warm_up(host, target, started)
                run.summary.facts["warmup"] = ready.model_dump(exclude={"health"})
            with run.stage("benchmark"):
                with quiet(prober):
                    bench = run_benchmark(host, target)
                log_scan = scan_log(host, started.log_file, started.log_offset)
                run.write_json("benchmark.json", bench.model_dump())
            with run.stage("tunnel"):
                app = check_app_path(host, target)
            with run.stage("gate"):
                with quiet(prober):
                    quality = assess_quality(
                        host, target, baseline, run.dir / "quality", quality_margin(target)
                    )
                evidence = Evidence(
                    health=ready.health,
                    benchmark=bench,
                    app=app,
                    log_scan=log_scan,
                    quality=quality,
                    downtime=prober.downtime() if prober else None,
                )
                gates = evaluate_gates(target.criteria, evidence, artifact_key="sdxl-deploy-gates")
                run.record_gates(gates)
                require_passed(gates)
            with run.stage("approval"):  # an enforced INCONCLUSIVE row: a person (or the target) decides
                approval = decide(gates, quality, target.quality)
                run.summary.facts["approval"] = approval.model_dump() if approval else None
                require_promoted(approval)
        except StageFailed as failure:
            _after_failure(run, host, target, state, failure)
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
        return _finish(
            run, "completed", f"deployed {target.new.model} on port {target.new.port}; all gates passed"
        )


def quiet(prober: Prober | None) -> AbstractContextManager[None]:
    """The prober's app requests held back while the flow sends its own: the warm-up's (the new service's
    first generations, so a crash names the warm-up request) and the timed ones; /health probes go on."""
    return prober.quiet() if prober else nullcontext()


def take_lock(stack: ExitStack, host: Host, target: Target, run: RunRecord, force: bool) -> None:
    """Hold the host's deploy lock until the flow ends (refused, naming the holder, when another run has it)."""
    owner = new_owner(run.summary.flow, run.dir.name)
    stack.enter_context(host_lock(host, target.new.install_dir, owner, force))


def recover(host: Host, target: Target, interrupted: DeployState) -> dict[str, Any]:
    """Put the old service back after a deploy that died without finishing (control side killed, link lost)."""
    print(
        f"found an interrupted deploy: run {interrupted.run_id} stopped at stage {interrupted.stage} "
        f"(last update {interrupted.updated_at}); restoring the old service first"
    )
    result = roll_back(host, target)
    return {"run_id": interrupted.run_id, "stage": interrupted.stage, **result.model_dump(exclude={"health"})}


def note_reconnects(run: RunRecord, host: Host | None) -> None:
    """Record how often the SSH link dropped and was re-established during the run."""
    if host is not None and getattr(host, "reconnects", 0):
        run.summary.facts["ssh_reconnects"] = host.reconnects  # type: ignore[attr-defined]


def _after_failure(
    run: RunRecord, host: Host | None, target: Target, state: DeployState | None, failure: StageFailed
) -> None:
    """Roll back when the old service may have been touched; record whether it answers afterwards."""
    touched = STAGES.index(failure.stage) >= ROLLBACK_FROM
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
        with target.connection.open() as fresh:
            return current_answers(fresh, service) is not None
    except Exception:
        return None


def _finish(run: RunRecord, status: Literal["completed", "failed", "dry-run"], message: str) -> RunSummary:
    summary = run.finish(status, message)
    create_markdown_artifact(
        key=f"{summary.flow}-summary", markdown=report_markdown(summary), description=message[:200]
    )
    print(f"{summary.flow} {status}: {message}\nrun directory: {summary.run_dir}")
    return summary


def deploy_plan(target: Target, current_process: str) -> str:
    """What a deploy would do, step by step (printed by a dry run)."""
    new, cur, check = target.new, target.current, target.quality
    steps = [
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
        f"stop the current service {current_process} (TERM, wait {cur.stop_timeout_s:.0f} s, KILL)",
        f"start `{' '.join(serve_argv(target, f'{new.install_dir}/releases/<release>/venv/bin/python'))}` detached; log {new.log_file}, pid file {new.pid_file}",
        f"stream the log and wait for /ready (up to {new.ready_timeout_s:.0f} s), "
        f"{target.workload.warmup_requests} warm-up request(s)",
        f"benchmark {target.workload.benchmark_runs} generations at "
        f"{target.workload.size[0]}x{target.workload.size[1]}, scan the log for CUDA errors",
        "send /health and the app's request "
        + ("through an SSH port forward" if target.connection.kind == "ssh" else "directly (local target)"),
        "judge the success criteria: "
        + ", ".join(
            f"{c.name}{'' if c.threshold is None else f' {c.threshold:g}'}{'' if c.enforce else ' (warn)'}"
            for c in target.criteria
        ),
        "on any failure from stopping on: stop the new service and start again what served before: the "
        f"recorded release serving now (`sdxl-deploy releases`), else `{cur.start_command}` in {cur.workdir}; "
        f"wait for {cur.health_path} on its port",
    ]
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
                gates = evaluate_gates(target.criteria, evidence, artifact_key="sdxl-verify-gates")
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
                result = roll_back(host, target, backup)
                run.summary.facts["rollback"] = result.model_dump()
                run.summary.backup_dir = result.backup_dir
                run.summary.rolled_back = True
                run.summary.old_service_answering = result.answering
        except StageFailed as failure:
            _finish(run, "failed", str(failure))
            raise RollbackFailed(f"rollback-sdxl {failure}", str(run.dir)) from None
    return _finish(run, "completed", f"{result.restarted}; old service answering on port {result.port}")
