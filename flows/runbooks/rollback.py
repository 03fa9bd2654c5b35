"""The `rollback-sdxl` flow: the old service put back on the host, from the release record or a backup."""

from __future__ import annotations

from contextlib import ExitStack

from prefect import flow

from flows.config.target import Target
from flows.errors import RunFailed
from flows.record.prober import watch_downtime
from flows.record.rundir import RunSummary
from flows.runbooks.hostrun import connect, failing_as, finish_run, open_run, take_lock
from flows.stages.compile import step_pid_file, stop_leftover
from flows.stages.rollback import roll_back


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
    run, target = open_run("rollback-sdxl", target, target_file, runs_dir)
    with ExitStack() as stack, failing_as(run, RunFailed), run.stage("rollback"):
        host, target = connect(stack, target)
        take_lock(stack, host, target, run, force_unlock)
        stack.enter_context(watch_downtime(run, host, target))
        # an interrupted deploy's compile step would hold memory beside the service put back
        stop_leftover(host, step_pid_file(target.new.install_dir))
        result = roll_back(host, target, backup)
        run.summary.facts.rollback = result
        run.summary.backup_dir = result.backup_dir
        run.summary.rolled_back = True
        run.summary.old_service_answering = result.answering
    return finish_run(run, "completed", f"{result.restarted}; old service answering on port {result.port}")
