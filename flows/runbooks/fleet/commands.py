"""CLI command `deploy-fleet` and the fleet demo's output (heavy imports inside)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flows.runbooks.cli_run import run_flow

if TYPE_CHECKING:
    from flows.runbooks.fleet.summary import FleetSummary


def _fail_at(values: list[str]) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, sep, stage = value.partition("=")
        if not sep or not name or not stage:
            raise typer.BadParameter(f"{value!r}: use HOST=STAGE, e.g. h1=warmup", param_hint="--fail-at")
        pairs[name] = stage
    return pairs


def deploy_fleet(
    fleet_file: Annotated[
        Path, typer.Argument(help="Fleet file (YAML or JSON): hosts, load balancer, rollout.")
    ],
    wheel: Annotated[
        Path | None,
        typer.Option(help="Ship this prebuilt wheel (a rerun that resumes must ship the same one)."),
    ] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run directories are written.")] = Path("runs"),
    fail_at: Annotated[
        list[str],
        typer.Option(help="Rehearsal: HOST=STAGE fails that host's deploy at that stage (repeatable)."),
    ] = [],  # noqa: B006 - typer's way to declare a repeatable option
    abort_after_canary: Annotated[
        bool, typer.Option(help="Stop after the canary's analysis and roll the canary back.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(help="Run every host's deploy preflight and check the balancer; change nothing."),
    ] = False,
) -> None:
    """Upgrade every host of a fleet behind HAProxy: canary, analysis, waves; a failure rolls back every
    host the rollout upgraded."""
    from flows.config.fleet import load_fleet
    from flows.errors import FleetFileError
    from flows.runbooks.fleet.flow import deploy_fleet as flow

    try:
        fleet = load_fleet(fleet_file)
    except FleetFileError as exc:
        raise typer.BadParameter(str(exc), param_hint="FLEET_FILE") from None
    run_flow(
        flow,
        print_fleet,
        fleet=fleet,
        wheel=str(wheel) if wheel else None,
        runs_dir=str(runs_dir),
        fail_at=_fail_at(fail_at) or None,
        abort_after_canary=abort_after_canary,
        dry_run=dry_run,
    )


def print_fleet(summary_path: Path, console: Any = None) -> FleetSummary:
    """Print the fleet's hosts (outcome, release before and at the end) and where its report is."""
    from rich.console import Console
    from rich.table import Table

    from flows.runbooks.fleet.summary import FleetSummary

    console = console or Console()
    summary = FleetSummary.model_validate_json(summary_path.read_text(encoding="utf-8"))
    colour = {"completed": "green", "dry-run": "cyan"}.get(summary.status, "red")
    table = Table(title=f"deploy-fleet: [{colour}]{summary.status}[/]", title_justify="left")
    for column in ("host", "wave", "outcome", "release before", "release at the end"):
        table.add_column(column, overflow="fold")
    for host in summary.hosts:
        wave = "" if host.wave is None else str(host.wave)
        table.add_row(host.name, wave, host.outcome, host.release_before, host.release_after)
    console.print(table)
    for analysis in summary.analyses:
        console.print(f"analysis of wave {analysis.wave}: {analysis.verdict}", markup=False)
    console.print(summary.message, markup=False)
    console.print(f"report: {Path(summary.run_dir) / 'report.md'}  (summary.json beside it)")
    return summary


def fleet_demo(hosts: int, stage: str | None, runs_dir: Path, keep_box: bool) -> None:
    """The `demo --fleet N` body: run it, print it, exit 1 unless it ended as expected."""
    from rich.console import Console

    from flows.runbooks.fleet.demo import run_fleet_demo

    console = Console()
    console.print(
        f"[bold]fleet demo:[/] {hosts} tiny-sd15 hosts behind a real HAProxy, a steady load through it; "
        "deploy-fleet upgrades them to tiny-sdxl, canary first"
        + (f", the canary failing at stage [bold]{stage}[/]" if stage else "")
    )
    result = run_fleet_demo(hosts=hosts, simulate_failure=stage, runs_dir=str(runs_dir), keep_box=keep_box)
    summary = print_fleet(result.summary_path, console)
    load = summary.load
    assert load is not None  # the demo writes it
    console.print(f"requests through HAProxy: {load.requests}, failed: {load.failed_requests}")
    console.print(f"stopped: {'; '.join(result.stopped) or 'nothing was left running'}")
    outcomes = [h.outcome for h in summary.hosts]
    expected = ["deploy failed"] + ["not reached"] * (hosts - 1) if stage else ["upgraded"] * hosts
    if outcomes != expected or load.failed_requests:
        raise typer.Exit(1)
