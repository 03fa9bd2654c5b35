"""What every single-host flow does around its stages: the target chosen, the run record opened, the host
connected and locked, and the run closed with its criteria table and report published."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Literal

from prefect.artifacts import create_markdown_artifact

from flows.box.common import run_logger
from flows.box.hostfs import home_dir
from flows.box.hosts import Host, open_host
from flows.box.lock import host_lock, new_owner
from flows.config.target import Target, load_target
from flows.errors import RunFailed
from flows.evidence.gates import GateReport
from flows.record.rundir import RunRecord, RunSummary, StageFailed, report_markdown
from flows.record.runlog import TOLD_BY_SUMMARY
from flows.stages.gates import publish_gates

GATES_ARTIFACT = {"deploy-sdxl": "sdxl-deploy-gates", "verify-sdxl": "sdxl-verify-gates"}


def choose_target(target: Target | None, target_file: str | None) -> Target:
    """The target file when one is given, else the `target` parameter."""
    if target_file:
        return load_target(target_file)
    return target or Target()


def open_run(
    flow: str, target: Target | None, target_file: str | None, runs_dir: str, fail_at: str | None = None
) -> tuple[RunRecord, Target]:
    """The run's record (its directory under `runs_dir`) and the target it runs against."""
    chosen = choose_target(target, target_file)
    return RunRecord(flow, chosen, runs_dir, fail_at), chosen


def connect(stack: ExitStack, target: Target) -> tuple[Host, Target]:
    """Open the host and resolve the target's `~/` paths there."""
    host = stack.enter_context(open_host(target.connection))
    return host, target.on_host(home_dir(host))


def take_lock(stack: ExitStack, host: Host, target: Target, run: RunRecord, force: bool) -> None:
    """Hold the host's deploy lock until the flow ends (refused, naming the holder, when another run has it)."""
    owner = new_owner(run.summary.flow, run.dir.name)
    stack.enter_context(host_lock(host, target.new.install_dir, owner, force))


@contextmanager
def failing_as(
    run: RunRecord, failed: type[RunFailed], note: Callable[[], str] = lambda: ""
) -> Iterator[None]:
    """A failed stage ends the run as failed (its message the stage's, then `note()`) and is raised as
    `failed`, naming the run directory."""
    try:
        yield
    except StageFailed as failure:
        finish_run(run, "failed", f"{failure}{note()}")
        raise failed(f"{run.summary.flow} {failure}", str(run.dir)) from None


def note_reconnects(run: RunRecord, host: Host | None) -> None:
    """Record how often the SSH link dropped and was re-established during the run."""
    if host is not None and getattr(host, "reconnects", 0):
        run.summary.facts.ssh_reconnects = host.reconnects  # type: ignore[attr-defined]


def finish_run(run: RunRecord, status: Literal["completed", "failed", "dry-run"], message: str) -> RunSummary:
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
