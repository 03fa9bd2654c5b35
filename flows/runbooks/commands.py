"""CLI commands of the runbook: `deploy`, `verify`, `rollback`, `releases`, `compile`, `demo` (heavy imports
inside)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flows.runbooks.cli_run import run_flow

if TYPE_CHECKING:
    from flows.box.hosts.base import Host
    from flows.config.target import Target
    from flows.evidence.results import CompileResult
    from flows.record.rundir import RunSummary

# Every stage of either order: staged (start_staged ... cutover) and stop-first (stop_current, start_new).
STAGE_NAMES = (
    "preflight, backup, baseline, ship, prefetch, compile, stop_current, start_new, start_staged, warmup, benchmark, "
    "tunnel, gate, approval, cutover"
)

TargetOption = Annotated[Path, typer.Option("--target", "-t", help="Target file (YAML or JSON).")]
RunsOption = Annotated[Path, typer.Option(help="Where run directories are written.")]
ForceUnlockOption = Annotated[
    bool,
    typer.Option(
        help="Clear the host's deploy lock even when its owner cannot be checked from here (taken from "
        "another machine). A lock whose run provably ended is cleared without it."
    ),
]


def _check_stage(value: str | None) -> str | None:
    if value is not None and value not in STAGE_NAMES.split(", "):
        raise typer.BadParameter(f"{value!r} is not a stage; choose one of: {STAGE_NAMES}")
    return value


def _load(target_file: Path) -> Any:
    from flows.config.target import load_target
    from flows.errors import TargetFileError

    try:
        return load_target(target_file)
    except TargetFileError as exc:
        raise typer.BadParameter(str(exc), param_hint="--target") from None


def deploy(
    target_file: TargetOption,
    dry_run: Annotated[bool, typer.Option(help="Preflight and print the plan; change nothing.")] = False,
    fail_at: Annotated[
        str | None, typer.Option(help=f"Rehearsal: inject a failure at this stage ({STAGE_NAMES}).")
    ] = None,
    wheel: Annotated[
        Path | None, typer.Option(help="Ship this prebuilt wheel instead of building one.")
    ] = None,
    runs_dir: RunsOption = Path("runs"),
    force_unlock: ForceUnlockOption = False,
) -> None:
    """Upgrade the target's current service to SDXL (rolls back by itself on any failure)."""
    from flows.runbooks.runbook import deploy_sdxl

    run_flow(
        deploy_sdxl,
        print_summary,
        target=_load(target_file),
        dry_run=dry_run,
        fail_at=_check_stage(fail_at),
        wheel=str(wheel) if wheel else None,
        runs_dir=str(runs_dir),
        force_unlock=force_unlock,
    )


def verify(target_file: TargetOption, runs_dir: RunsOption = Path("runs")) -> None:
    """Check the running service against the success criteria (changes nothing)."""
    from flows.runbooks.verify import verify_sdxl

    run_flow(verify_sdxl, print_summary, target=_load(target_file), runs_dir=str(runs_dir))


def rollback(
    target_file: TargetOption,
    backup: Annotated[str | None, typer.Option(help="Backup name or path (default: latest).")] = None,
    runs_dir: RunsOption = Path("runs"),
    force_unlock: ForceUnlockOption = False,
) -> None:
    """Put back what served before the last deploy: the earlier release, else the old service from its backup."""
    from flows.runbooks.rollback import rollback_sdxl

    run_flow(
        rollback_sdxl,
        print_summary,
        target=_load(target_file),
        backup=backup,
        runs_dir=str(runs_dir),
        force_unlock=force_unlock,
    )


def approve(
    flow_run: Annotated[str, typer.Argument(help="The paused run's flow run id (its log names it).")],
    promote: Annotated[
        bool,
        typer.Option(
            "--promote/--abort", help="Go on (the new service, the next wave), or fail the run (rolled back)."
        ),
    ],
    note: Annotated[str, typer.Option(help="Who decides and why (kept in the run's summary.json).")] = "",
) -> None:
    """Answer a paused run: a deploy on an INCONCLUSIVE quality verdict, or deploy-fleet after a step
    (`rollout.pause_after`). The Prefect API in PREFECT_API_URL."""
    from flows.record.approval import answer

    decision = "promote" if promote else "abort"
    try:
        answer(flow_run, decision, note)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="FLOW_RUN") from None
    print(f"flow run {flow_run}: {decision} sent; the run goes on from its pause")


def releases(target_file: TargetOption) -> None:
    """List the releases recorded on the box by successful deploys, and which one serves now."""
    from contextlib import ExitStack

    from rich.console import Console

    from flows.box.hostfs import home_dir
    from flows.box.hosts import open_host
    from flows.box.releases import load_releases, releases_table, serving_now

    target = _load(target_file)
    with ExitStack() as stack:
        host = stack.enter_context(open_host(target.connection))
        target = target.on_host(home_dir(host))
        records = load_releases(host, target)
        serving = {record.id: serving_now(host, record) for record in records}
    console = Console()
    console.print(releases_table(records, serving))
    if not any(serving.values()):
        console.print(
            f"no recorded release serves now: the current service ({target.current.name}) or nothing"
        )


def compile_release(
    target_file: TargetOption,
    force: Annotated[
        bool,
        typer.Option(
            help="Run it even where the box's room for it beside the serving release is too small or not known."
        ),
    ] = False,
    force_unlock: ForceUnlockOption = False,
) -> None:
    """Run the compile step on the box for the release that serves now, beside it: build the compiled functions
    it loads at its next start (those on disk are reused); print them. Exit 1 when the step fails."""
    import logging
    from contextlib import ExitStack

    from rich.console import Console
    from rich.logging import RichHandler

    from flows.box.hostfs import home_dir
    from flows.box.hosts import open_host
    from flows.box.lock import host_lock, new_owner
    from flows.errors import FlowError
    from flows.stages.compile import functions_table

    target = _load(target_file)
    console = Console()
    progress = RichHandler(console=console, show_path=False, markup=False)
    logger = logging.getLogger("flows")  # the step's progress (outside a flow run)
    logger.addHandler(progress)
    logger.setLevel(logging.INFO)
    try:
        with ExitStack() as stack:
            host = stack.enter_context(open_host(target.connection))
            target = target.on_host(home_dir(host))
            owner = new_owner("compile", "sdxl-deploy compile")
            stack.enter_context(host_lock(host, target.new.install_dir, owner, force_unlock))
            result = compile_serving_release(host, target, force)
    except FlowError as exc:
        console.print(f"compile failed: {exc}", markup=False)
        raise typer.Exit(1) from None
    finally:
        logger.removeHandler(progress)
    console.print(functions_table(result))


def compile_serving_release(host: Host, target: Target, force: bool = False) -> CompileResult:
    """Run the compile step of the release that serves now on the box (recorded in releases.json, its process
    the one on `new.port`), beside it: refused, saying why, where the card's room for it is too small or not
    known, unless `force`. The caller holds the host's deploy lock."""
    from flows.box.capacity import step_room
    from flows.box.procs import find_service
    from flows.box.releases import load_releases, release_of
    from flows.errors import FlowError, ReleaseError
    from flows.stages.compile import run_step, step_launch

    process = find_service(host, target.new.port, target.new.pid_file)
    record = release_of(host, target, process)
    if record is None:
        recorded = ", ".join(r.describe() for r in load_releases(host, target)[-3:]) or "none recorded"
        serving = process.describe() if process else "nothing"
        raise ReleaseError(
            f"no recorded release serves on port {target.new.port} of {host.name} ({serving} does; releases: "
            f"{recorded}): deploy first, the deploy's stage compile runs the step"
        )
    fits, why = step_room(host, record.model, target.new.vram_margin_gb)
    if not fits and not force:
        raise FlowError(
            f"the compile step cannot run beside {record.describe()}: {why}; --force runs it anyway (the serving "
            "release may run out of memory), or deploy the release again (its stage compile runs before it starts)"
        )
    return run_step(
        host, step_launch(record.launch), target.new.compile_timeout_s, f"beside {record.describe()} ({why})"
    )


def demo(
    simulate_failure: Annotated[
        str | None, typer.Option(help=f"Rehearse a failure at this stage ({STAGE_NAMES}).")
    ] = None,
    runs_dir: RunsOption = Path("runs"),
    keep_box: Annotated[bool, typer.Option(help="Keep the demo's temporary box directory.")] = False,
    fleet: Annotated[
        int, typer.Option(help="Run deploy-fleet instead: this many local hosts behind a real HAProxy.")
    ] = 0,
) -> None:
    """Run deploy-sdxl here: tiny-sd15 today -> tiny-sdxl staged beside it, gates, cut-over (a failure before
    it leaves the old service untouched; one after it rolls back); leaves nothing running."""
    stage = _check_stage(simulate_failure)
    if fleet:  # the fleet demo (flows/runbooks/fleet/demo.py); with a failure, the canary fails at that stage
        from flows.runbooks.fleet.commands import fleet_demo

        return fleet_demo(fleet, stage, runs_dir, keep_box)
    from rich.console import Console

    from flows.record.runlog import console_view
    from flows.runbooks.demo import run_demo

    console = Console()
    console.print(
        "[bold]demo:[/] tiny-sd15 plays the current service; deploy-sdxl upgrades it to tiny-sdxl"
        + (f", with a failure injected at stage [bold]{stage}[/]" if stage else "")
    )
    with console_view(summary_follows=True):
        result = run_demo(simulate_failure=stage, runs_dir=str(runs_dir), keep_box=keep_box)
    summary = print_summary(result.summary_path, console)
    if result.old_answering_after is not None:
        console.print(
            "old service answering /health afterwards: "
            + ("[green]yes[/]" if result.old_answering_after else "[red]NO[/]")
            + ("" if result.old_untouched is None else "; the same process as before (never restarted): ")
            + (
                ""
                if result.old_untouched is None
                else "[green]yes[/]"
                if result.old_untouched
                else "no (restarted)"
            )
        )
    console.print(f"stopped: {'; '.join(result.stopped) or 'nothing was left running'}")
    expected = "failed" if stage else "completed"
    if summary.status != expected or (stage and not result.old_answering_after):
        raise typer.Exit(1)


def _outcome(summary: RunSummary) -> str:
    """The run's message; for a failed stage, its cause (the stage table's detail) not said again."""
    message, stage = summary.message, summary.failed_stage
    details = [s.detail for s in summary.stages if s.name == stage and s.status == "failed"]
    cause = f"stage {stage!r} failed: {details[-1]}" if details else None
    if cause and message.startswith(cause):
        return f"stage {stage!r} failed (why: the table above){message[len(cause) :]}"
    return message


def print_summary(summary_path: Path, console: Any = None) -> RunSummary:
    """Print a run's stages and gate table (rich), what was done and where its report is; return the summary.
    Each thing once: a failed stage's cause and a failed row whole in their tables, the downtime below them
    only when no row tells it, what was done in the closing line."""
    from rich.console import Console
    from rich.table import Table

    from flows.evidence.gates import shown_passed, shown_verdict
    from flows.record.rundir import RunSummary

    console = console or Console()
    summary = RunSummary.model_validate_json(summary_path.read_text(encoding="utf-8"))
    colour = {"completed": "green", "failed": "red", "dry-run": "cyan"}.get(summary.status, "yellow")
    stages = Table(title=f"{summary.flow}: [{colour}]{summary.status}[/]", title_justify="left")
    for column in ("stage", "status", "seconds", "detail"):
        stages.add_column(column, overflow="fold")
    for stage in summary.stages:
        mark = "green" if stage.status == "completed" else "red"
        detail = stage.detail if stage.status == "failed" else stage.detail[:200]
        stages.add_row(stage.name, f"[{mark}]{stage.status}[/]", f"{stage.seconds:.1f}", detail)
    console.print(stages)
    if summary.gates:
        gates = Table(title=f"success criteria: {shown_passed(summary.gates_passed)}", title_justify="left")
        for column in ("criterion", "threshold", "observed", "mode", "verdict"):
            gates.add_column(column, overflow="fold")
        verdict_colour = {
            "pass": "green",
            "fail": "red",
            "warn": "yellow",
            "n/a": "dim",
            "inconclusive": "magenta",
        }
        for row in summary.gates:
            threshold = "" if row.threshold is None else f"{row.threshold:g}"
            verdict = row.verdict
            gates.add_row(
                row.criterion,
                threshold,
                row.observed if verdict == "fail" else row.observed[:120],
                "enforce" if row.enforce else "warn",
                f"[{verdict_colour[verdict]}]{shown_verdict(verdict)}[/]",
            )
        console.print(gates)
    downtime = summary.downtime.describe() if summary.downtime else None
    if downtime and not any(row.observed == downtime for row in summary.gates):
        console.print(f"downtime: {downtime}", markup=False)
    console.print(_outcome(summary), markup=False)  # the runbook's closing line: what was done
    console.print(f"report: {Path(summary.run_dir) / 'report.md'}  (summary.json beside it)")
    return summary
