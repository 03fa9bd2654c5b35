"""The deploy's two orders of stages (what `fail_at` accepts, where the old service may be down) and the plan
a dry run prints."""

from __future__ import annotations

from typing import Literal

from flows.box.capacity import StartDecision
from flows.config.target import StartMode, Target
from flows.evidence.gates import criteria_for_mode
from flows.stages.compile import compile_argv
from flows.stages.deploy import serve_argv

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
