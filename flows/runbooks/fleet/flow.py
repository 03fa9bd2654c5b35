"""The `deploy-fleet` flow: upgrade every host of a fleet behind HAProxy, canary first, then in waves.

Per host of a wave (hosts of one wave in parallel, at most `min(wave_size, max_unavailable)` at once):
drain it in HAProxy, wait until its current sessions reach 0, run the single-host `deploy-sdxl` flow on it
as a subflow (its own run, artifacts, lock, backup, automatic rollback), wait until HAProxy's own health
check sees it up, set it `ready`. Then the analysis (the wave's hosts against the hosts still on the old
release, over the live traffic), then the next wave.

Host runs: subflows in this run's process by default; with `rollout.host_runs.mode: work-pool` flow runs of
the deploy-sdxl / rollback-sdxl deployments, children of this run, taken by the workers of their pool
(flows/runbooks/fleet/pool.py).

A person can hold the rollout after a step (`rollout.pause_after`: the canary, or every wave): the run
pauses in Prefect (Resume with promote or abort, or `sdxl-deploy approve`) while the upgraded hosts serve.

A failed canary or wave, a host past its progress deadline, a failed analysis, a person's abort at a pause
(or its timeout) or `abort_after_canary` rolls back every host this rollout upgraded, each with
`rollback-sdxl` from its own record, drained first and put back `ready` after. Hosts not reached are untouched.

Resume: before the first wave each host is asked what serves on it now. A host whose serving process is
the recorded release (`releases.json`, matched by PID and start time) with this rollout's release id (the
wheel's `<version>-<sha256 prefix>`, as `ship_release` names it) is already upgraded: it is skipped (put
back `ready` if a dead run left it drained) and counts as upgraded for a rollback. A host with an
interrupted deploy (`deploy-state.json` in_progress) is upgraded again; its deploy restores the old
service first. So a rerun after the control side died must ship the same wheel: pass `wheel`, e.g. the
one the first run built (`<fleet run>/wheel/*.whl`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.context import FlowRunContext

from flows.config.fleet import Fleet, load_fleet
from flows.errors import FleetFileError, RunFailed
from flows.record.rundir import make_run_dir
from flows.runbooks.fleet.analysis import analyse
from flows.runbooks.fleet.rollout import Rollout
from flows.runbooks.fleet.summary import FleetSummary
from flows.stages.deploy import build_wheel

# The rollouts running in this process, by flow run id: what a Prefect cancel must roll back.
_RUNNING: dict[str, Rollout] = {}
# On the fleet's flow run: where a cancel hook in another process finds the rollout's record.
RUN_DIR_LABEL = "sdxl-deploy.run-dir"


def _on_cancel(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect cancel (`on_cancellation`): roll back every host this rollout upgraded, as an abort does, and
    each host whose deploy the cancel cut mid-way.

    Where the hook runs in the run's own process (Prefect's engine owns the cancel), the rollout is in
    memory. Where a worker ran the run (a deployment triggered from the UI), the worker kills the run's
    process and runs the hook in a process of its own: the rollout is reopened from its run directory (the
    flow run's `sdxl-deploy.run-dir` label) and the fleet from the run's parameters (tested:
    tests/flows/test_fleet_pool.py)."""
    rollout = _RUNNING.pop(str(flow_run.id), None)
    if rollout is None:
        rollout = _reopen(flow_run)
        if rollout is None:
            print(f"fleet: cancel of {flow_run.id}: no record of its rollout, nothing rolled back")
            return
    try:
        rollout.roll_back_all("cancelled in Prefect", rollout.cut_mid_deploy())
    finally:
        rollout.close()
    rollout.finish("failed", f"cancelled in Prefect; rolled back: {rollout.summary.rolled_back or 'none'}")


def _reopen(flow_run: Any) -> Rollout | None:
    """The rollout of a flow run whose process is gone: its record and its fleet (from the parameters)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.id)
    run_dir = (run.labels or {}).get(RUN_DIR_LABEL)
    if not run_dir or not Path(run_dir, "summary.json").is_file():
        return None
    params = run.parameters or {}
    fleet = (
        load_fleet(params["fleet_file"])
        if params.get("fleet_file")
        else Fleet.model_validate(params["fleet"])
    )
    return Rollout.reopen(fleet, Path(run_dir))


def _label_run(run_dir: Path) -> str:
    """This flow run's id, with its run directory recorded on it as a label (for a cancel hook elsewhere)."""
    context = FlowRunContext.get()
    if not context or not context.flow_run:
        return ""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run_labels(context.flow_run.id, {RUN_DIR_LABEL: str(run_dir.resolve())})
    except Exception as exc:  # an older Prefect server: only a cancel handled in this process rolls back
        print(f"fleet: warning: could not label the run with its run directory ({type(exc).__name__}: {exc})")
    return str(context.flow_run.id)


@flow(name="deploy-fleet", log_prints=True, on_cancellation=[_on_cancel])
def deploy_fleet(
    fleet: Fleet | None = None,
    fleet_file: str | None = None,
    wheel: str | None = None,
    runs_dir: str = "runs",
    fail_at: dict[str, str] | None = None,
    abort_after_canary: bool = False,
    dry_run: bool = False,
) -> FleetSummary:
    """Upgrade every host of the fleet behind HAProxy: canary, analysis, waves; any failure rolls back
    every host this rollout upgraded.

    Args:
        fleet: The hosts, the load balancer and the rollout (ignored when fleet_file is set).
        fleet_file: A YAML/JSON fleet file on the worker's machine.
        wheel: A prebuilt wheel of this project to ship to every host (default: build one now). A rerun
            that should resume must ship the same wheel.
        runs_dir: Where the fleet's run directory (summary.json, report.md, each host's runs) is written.
        fail_at: Rehearsal only: host name -> the deploy stage to fail on that host.
        abort_after_canary: Stop after the canary's analysis and roll the canary back (a rehearsal of a
            person's abort, or a canary to look at only).
        dry_run: Run every host's deploy preflight (its model, app request, facts, current service and start
            mode) and check the balancer's servers; build, ship and change nothing.
    """
    if fleet_file:
        fleet = load_fleet(fleet_file)
    if fleet is None:
        raise FleetFileError("deploy-fleet needs a fleet or a fleet_file")
    unknown = sorted(set(fail_at or {}) - {h.name for h in fleet.hosts})
    if unknown:
        raise FleetFileError(f"fail_at: {unknown} are not hosts of this fleet")
    run_dir = make_run_dir(runs_dir, "deploy-fleet")
    if dry_run:
        checking = Rollout(fleet, Path(wheel) if wheel else None, run_dir, {})
        try:
            return checking.dry_run()
        finally:
            checking.close()
    wheel_path = Path(wheel) if wheel else build_wheel(run_dir / "wheel")
    rollout = Rollout(fleet, wheel_path, run_dir, dict(fail_at or {}))
    flow_run_id = _label_run(run_dir)
    _RUNNING[flow_run_id] = rollout
    try:
        rollout.preflight()
        waves = fleet.waves()
        has_canary = bool(fleet.rollout.canary)
        for number, wave in enumerate(waves):
            failed = rollout.run_wave(number, wave)
            name = "canary" if number == 0 and has_canary else f"wave {number}"
            if failed:
                rollout.roll_back_all(f"{name} failed on {failed}")
                break
            upgraded = [h.server_name for h in rollout.upgraded()]
            old = [h.server_name for h in fleet.hosts if h.server_name not in upgraded]
            result = analyse(rollout.api, number, upgraded, old, fleet.rollout.analysis)
            rollout.summary.analyses.append(result)
            rollout.event(f"analysis of {name}", result.describe())
            if result.verdict == "fail":
                rollout.roll_back_all(f"the analysis of {name} failed")
                break
            if number == 0 and abort_after_canary:
                rollout.roll_back_all("abort_after_canary")
                break
            # a person decides on what this run changed: a wave whose hosts all ran the release already (a
            # rerun) is not paused on again
            changed = any(rollout.record(h).outcome == "upgraded" for h in wave)
            if (
                changed
                and fleet.rollout.pauses_after(number, len(waves))
                and not rollout.ask_person(name, number, result)
            ):
                break
    except Exception as exc:  # the balancer or a host became unreachable: return what was upgraded
        # the abort's reason, which the closing message tells, unless the rollout was aborted already
        rollout.event("error", f"{type(exc).__name__}: {exc}", rollout.summary.aborted is None)
        if rollout.summary.aborted is None:
            rollout.roll_back_all(f"{type(exc).__name__}: {exc}")
    # not reached when a Prefect cancel (TerminationSignal) ends the run: _on_cancel rolls back then
    _RUNNING.pop(flow_run_id, None)
    rollout.close()
    if rollout.summary.aborted:
        rolled = rollout.summary.rolled_back
        summary = rollout.finish(
            "failed", f"{rollout.summary.aborted}; upgraded hosts rolled back: {rolled or 'none'}"
        )
        raise RunFailed(f"deploy-fleet failed: {summary.message}", str(run_dir))
    return rollout.finish("completed", f"{len(fleet.hosts)} host(s) on release {rollout.summary.release_id}")
