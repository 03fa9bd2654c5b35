"""A deploy's way back: an interrupted deploy cleaned up before the next one starts, and a failed one's old
service put back (or, before a staged deploy's cut-over, only its staged service stopped)."""

from __future__ import annotations

from flows.box.deploy_state import DeployState, save_state
from flows.box.hosts import Host, open_host
from flows.config.target import StartMode, Target
from flows.record.deploy_record import DeployRecord
from flows.record.facts import Recovered
from flows.record.rundir import StageFailed
from flows.runbooks.hostrun import finish_run, note_reconnects
from flows.runbooks.plan import touches_old_service
from flows.stages.compile import step_pid_file, stop_leftover
from flows.stages.cutover import discard_staged
from flows.stages.rollback import current_answers, roll_back


def recover(host: Host, target: Target, interrupted: DeployState) -> Recovered:
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
    facts = Recovered(
        run_id=interrupted.run_id,
        stage=interrupted.stage,
        mode=interrupted.mode,
        stopped_compile=stop_leftover(host, step_pid_file(target.new.install_dir)),
    )
    if interrupted.mode == "staged" and not interrupted.cut_over:
        facts.stopped_staged = discard_staged(host, target, interrupted.new_process)
        interrupted.status = "failed"
        save_state(host, target, interrupted)
        return facts
    result = roll_back(host, target)
    return facts.model_copy(update=result.model_dump(exclude={"health"}))


def after_failure(
    run: DeployRecord,
    host: Host | None,
    target: Target,
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
    elif host is not None and run.state is not None and run.state.new_process is not None:
        try:
            stopped = discard_staged(host, target, run.state.new_process)
            run.summary.facts.discarded_staged = stopped
            outcome = f"; the staged new service was stopped ({stopped}); the old service was not touched"
        except Exception as exc:
            outcome = f"; STOPPING THE STAGED SERVICE FAILED: {type(exc).__name__}: {exc}"
    run.summary.old_service_answering = old_service_answers(host, target, port)
    run.ended_failed()
    note_reconnects(run, host)
    answering = {True: "; old service answering", False: "; OLD SERVICE NOT ANSWERING", None: ""}
    finish_run(run, "failed", f"{failure}{outcome}{answering[run.summary.old_service_answering]}")


def old_service_answers(host: Host | None, target: Target, port: int) -> bool | None:
    """Whether the old service answers healthy on `port` now (None when the host cannot be reached)."""
    service = target.current.model_copy(update={"port": port})
    try:
        if host is not None:
            return current_answers(host, service) is not None
        with open_host(target.connection) as fresh:
            return current_answers(fresh, service) is not None
    except Exception:
        return None
