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

import contextvars
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext

from flows.box.common import run_logger
from flows.box.deploy_state import interrupted_deploy
from flows.box.hostfs import home_dir
from flows.box.hosts import open_host
from flows.box.procs import find_service
from flows.box.releases import release_of
from flows.config.fleet import Fleet, FleetHost, load_fleet
from flows.config.target import Target
from flows.errors import BalancerError, FleetFailed, FleetFileError, HostError, PreflightRefused
from flows.record.approval import wait_for_person
from flows.record.rundir import RunSummary, make_run_dir
from flows.record.runlog import TOLD_BY_SUMMARY
from flows.runbooks.fleet.analysis import AnalysisResult, analyse
from flows.runbooks.fleet.haproxy import HAProxyAPI, ServerStat
from flows.runbooks.fleet.pool import run_on_pool
from flows.runbooks.fleet.preflight import check_hosts
from flows.runbooks.fleet.report import fleet_markdown
from flows.runbooks.fleet.summary import Event, FleetSummary, HostRecord
from flows.runbooks.runbook import deploy_sdxl, rollback_sdxl
from flows.stages.deploy import build_wheel, sha256_file


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def release_id_of(wheel: Path) -> str:
    """The release id `ship_release` gives this wheel on every host: `<version>-<sha256 prefix>`."""
    return f"{wheel.name.split('-')[1]}-{sha256_file(wheel)[:12]}"


def serving_release(target: Target) -> tuple[str, str | None]:
    """(what serves on the host now, in words; its recorded release id or None for the current service)."""
    with open_host(target.connection) as host:
        target = target.on_host(home_dir(host))
        process = find_service(host, target.new.port, target.new.pid_file) or find_service(
            host, target.current.port, target.current.pid_file
        )
        if process is None:
            return "nothing answering", None
        record = release_of(host, target, process)
    if record is None:
        return f"{target.current.name} (the service before any recorded release)", None
    return f"release #{record.id}: {record.model} {record.release_id}", record.release_id


class Rollout:
    """One deploy-fleet run: the balancer, the hosts' records, the timeline, the run directory."""

    def __init__(
        self,
        fleet: Fleet,
        wheel: Path | None,
        run_dir: Path,
        fail_at: dict[str, str],
        summary: FleetSummary | None = None,
    ) -> None:
        self.fleet, self.wheel, self.run_dir, self.fail_at = fleet, wheel, run_dir, fail_at
        self.balancer = fleet.load_balancer
        self._lb_host = open_host(fleet.load_balancer.via) if fleet.load_balancer.via else None
        self.api = HAProxyAPI(self.balancer, self._lb_host)
        self._lock = threading.Lock()
        self.started = time.monotonic()
        if summary is not None:  # reopened: what the run recorded so far
            self.summary = summary
            return
        self.summary = FleetSummary(
            run_dir=str(run_dir),
            release_id=release_id_of(wheel) if wheel else "",
            started_at=_now(),
            waves=[[h.name for h in wave] for wave in fleet.waves()],
            hosts=[
                HostRecord(name=h.name, server=h.server_name, target=self.target(h).connection.describe())
                for h in fleet.hosts
            ],
        )
        self.save()

    @classmethod
    def reopen(cls, fleet: Fleet, run_dir: Path) -> Rollout:
        """The rollout of an earlier process (killed by a Prefect cancel), from its run directory."""
        summary = FleetSummary.model_validate_json((run_dir / "summary.json").read_text(encoding="utf-8"))
        wheels = sorted((run_dir / "wheel").glob("*.whl"))
        return cls(fleet, wheels[0] if wheels else run_dir, run_dir, {}, summary)

    def target(self, host: FleetHost) -> Target:
        return self.fleet.host_target(host)

    def record(self, host: FleetHost) -> HostRecord:
        return next(r for r in self.summary.hosts if r.name == host.name)

    def event(self, event: str, detail: str = "", told_by_summary: str | bool = False) -> None:
        """Add an event to the timeline and tell it. `told_by_summary`: its detail is in the run's closing
        message, which the summary the CLI prints shows: that console shows this line instead (True: none)."""
        with self._lock:
            self.summary.timeline.append(Event(at=_now(), event=event, detail=detail))
            _tell(f"fleet: {event}{': ' + detail if detail else ''}", told_by_summary)
            self.save()

    def save(self) -> None:
        """Rewrite summary.json whole (a process killed meanwhile leaves the previous one, never half)."""
        part = self.run_dir / "summary.json.part"
        part.write_text(self.summary.model_dump_json(indent=2) + "\n", encoding="utf-8")
        part.replace(self.run_dir / "summary.json")

    def close(self) -> None:
        if self._lb_host is not None:
            self._lb_host.close()

    # --- one host ------------------------------------------------------------------------------------

    def _drain(self, host: FleetHost, deadline: float) -> float:
        self.api.set_state(host.server_name, "drain")
        self.event(f"{host.name}: drain", f"{self.balancer.backend}/{host.server_name}")
        return self.api.wait_drained(host.server_name, min(self.balancer.drain_timeout_s, _left(deadline)))

    def _back_in(self, host: FleetHost, deadline: float | None = None) -> float:
        """Wait for HAProxy's check to see the host up, then set it ready; the seconds the wait took."""
        timeout = (
            self.balancer.up_timeout_s
            if deadline is None
            else min(self.balancer.up_timeout_s, _left(deadline))
        )
        up = self.api.wait_up(host.server_name, timeout)
        self.api.set_state(host.server_name, "ready")
        self.event(f"{host.name}: ready", f"HAProxy's check saw it up after {up:.1f} s")
        return up

    def upgrade(self, host: FleetHost, wave: int) -> bool:
        """Drain, deploy-sdxl, wait for the check, ready. True when the host runs the new release."""
        record = self.record(host)
        record.wave = wave
        deadline = time.monotonic() + self.fleet.rollout.progress_deadline_s
        try:
            record.drain_s = round(self._drain(host, deadline), 2)
        except Exception as exc:
            record.outcome, record.message = "deploy failed", f"drain: {exc}"
            self._try_back_in(host, record)
            return False
        state, run_dir, timed_out = self._deploy(host, deadline)
        self._note_run(record, state, run_dir)
        if state.is_completed():
            try:
                record.up_s = round(self._back_in(host, deadline), 2)
            except Exception as exc:
                record.outcome, record.message = "deploy failed", f"after the deploy: {exc}"
                self.event(f"{host.name}: FAILED", record.message)
                return False
            record.outcome = "upgraded"
            with self._lock:
                self.save()
            return True
        record.outcome = "deploy failed"
        self.event(f"{host.name}: deploy FAILED", record.message)
        if self._left_unrestored(record):  # cut by the deadline: its deploy never reached its own rollback
            if timed_out:
                record.message = (
                    f"past its progress deadline ({self.fleet.rollout.progress_deadline_s:.0f} s)"
                )
            self.roll_back(host)
            return False
        self._try_back_in(host, record)
        return False

    def _deploy(self, host: FleetHost, deadline: float) -> tuple[Any, str | None, bool]:
        """The host's deploy-sdxl, in this process or on the work pool: (its final state, its run directory
        when known, whether the progress deadline cut it)."""
        kwargs = {
            "target": self.target(host),
            "wheel": str(self.wheel),
            "runs_dir": str(self.run_dir / host.name),
            "fail_at": self.fail_at.get(host.name),
        }
        runs = self.fleet.rollout.host_runs
        if runs.mode == "work-pool":
            kwargs["target"] = kwargs["target"].model_dump(mode="json")
            run = run_on_pool(
                runs.deploy,
                f"deploy-sdxl-{host.name}",
                kwargs | {"dry_run": False},  # the deployment's default is a dry run
                max(_left(deadline), 1.0),
                host.work_queue,
                runs.poll_s,
            )
            self.event(f"{host.name}: deploy-sdxl ran as flow run {run.flow_run_id}", run.state.name or "")
            return run.state, None, run.timed_out
        state = deploy_sdxl.with_options(
            flow_run_name=f"deploy-sdxl-{host.name}", timeout_seconds=max(_left(deadline), 1.0)
        )(**kwargs, return_state=True)
        run_dir = getattr(state.result(raise_on_failure=False), "run_dir", None)
        return state, run_dir, state.name == "TimedOut"

    def _rollback(self, host: FleetHost) -> tuple[Any, str | None]:
        """The host's rollback-sdxl, in this process or on the work pool: (its final state, its run directory
        when known)."""
        kwargs = {"target": self.target(host), "runs_dir": str(self.run_dir / host.name)}
        runs = self.fleet.rollout.host_runs
        if runs.mode == "work-pool":
            kwargs["target"] = kwargs["target"].model_dump(mode="json")
            run = run_on_pool(
                runs.rollback, f"rollback-sdxl-{host.name}", kwargs, None, host.work_queue, runs.poll_s
            )
            self.event(f"{host.name}: rollback-sdxl ran as flow run {run.flow_run_id}", run.state.name or "")
            return run.state, _newest_run(self.run_dir / host.name, "rollback-sdxl")
        state = rollback_sdxl.with_options(flow_run_name=f"rollback-sdxl-{host.name}")(
            **kwargs, return_state=True
        )
        return state, getattr(state.result(raise_on_failure=False), "run_dir", None)

    @staticmethod
    def _left_unrestored(record: HostRecord) -> bool:
        """Whether the host's deploy ended without saying the old service answers (a timeout cuts the
        deploy with a BaseException, past its stages' own rollback); rollback-sdxl is safe to run anyway."""
        summary_file = Path(record.deploy_run_dir or "", "summary.json")
        if not record.deploy_run_dir or not summary_file.is_file():
            return True

        summary = RunSummary.model_validate_json(summary_file.read_text(encoding="utf-8"))
        return summary.status != "failed" or summary.old_service_answering is not True

    def _try_back_in(self, host: FleetHost, record: HostRecord) -> None:
        """After a failure on the host: back in the balancer when its (old) service answers the check."""
        try:
            record.up_s = round(self._back_in(host), 2)
        except Exception as exc:
            record.message += f"; left drained: {exc}"
            self.event(f"{host.name}: left drained", str(exc))

    def _note_run(self, record: HostRecord, state: Any, run_dir: str | None) -> None:
        if run_dir is None:  # a pool run, or the progress deadline cut the run: its newest run directory
            run_dir = _newest_run(self.run_dir / record.name, "deploy-sdxl")
        record.deploy_run_dir = run_dir
        summary_file = Path(run_dir) / "summary.json" if run_dir else None
        if summary_file and summary_file.is_file():
            summary = RunSummary.model_validate_json(summary_file.read_text(encoding="utf-8"))
            record.stages, record.gates_passed = summary.stages, summary.gates_passed
            record.downtime = summary.downtime.describe() if summary.downtime else None
            record.message = summary.message
        if not state.is_completed() and not record.message:
            record.message = state.message or str(state.name)

    def roll_back(self, host: FleetHost) -> None:
        """Drain, rollback-sdxl (from the host's own record), wait for the check, ready."""
        record = self.record(host)
        try:
            self._drain(host, time.monotonic() + self.balancer.drain_timeout_s)
            state, record.rollback_run_dir = self._rollback(host)
            if not state.is_completed():
                raise RuntimeError(state.message)
            self._back_in(host)
            record.outcome = "rolled back"
            self.summary.rolled_back.append(host.name)
        except Exception as exc:
            record.outcome = "rollback failed"
            record.message = f"{record.message}; rollback: {exc}" if record.message else f"rollback: {exc}"
            self.event(f"{host.name}: ROLLBACK FAILED", str(exc))
            self._try_back_in(host, record)

    # --- the rollout ---------------------------------------------------------------------------------

    def require_servers(self) -> dict[str, ServerStat]:
        """The backend's servers, by name; `FleetFileError` naming a host the backend lacks."""
        stats = self.api.stats()
        for host in self.fleet.hosts:
            if host.server_name not in stats:
                raise FleetFileError(
                    f"host {host.name!r}: HAProxy backend {self.balancer.backend!r} has no server "
                    f"{host.server_name!r} (servers: {sorted(stats)})"
                )
        return stats

    def preflight(self) -> None:
        """Every server is in the backend; what each host serves now; hosts already upgraded are skipped; every
        other host passes its deploy's preflight (`check_hosts`) before the canary is touched."""
        stats = self.require_servers()
        for host in self.fleet.hosts:
            record = self.record(host)
            record.release_before, release_id = serving_release(self.target(host))
            if release_id == self.summary.release_id:
                record.outcome = "already upgraded"
                if stats[host.server_name].status != "UP":
                    self._back_in(host)
                self.event(f"{host.name}: already on release {release_id}", "skipped (a rerun resumes)")
        for host in self.fleet.hosts:  # a host still starting: give HAProxy's check the time to see it up
            if not stats[host.server_name].up:
                try:
                    self.api.wait_up(host.server_name, self.balancer.up_timeout_s)
                except BalancerError as exc:
                    self.event("warning", f"{host.name} is down before the rollout: {exc}")
        todo = [h for h in self.fleet.hosts if self.record(h).outcome != "already upgraded"]
        for plan in check_hosts(self.fleet, todo):
            self.event(f"{plan.host}: preflight passed", plan.describe())
        self.event("preflight", f"release {self.summary.release_id}; waves {self.summary.waves}")

    def dry_run(self) -> FleetSummary:
        """Every host's deploy preflight, then the balancer's servers and what each host serves; read-only.
        `FleetFailed` naming each host (and field) that would refuse its deploy."""
        try:
            plans = check_hosts(self.fleet)
            self.require_servers()
        except (PreflightRefused, FleetFileError, BalancerError, HostError) as exc:
            self.event("preflight refused", str(exc), "fleet: preflight refused (why: the summary below)")
            summary = self.finish("failed", f"dry run refused: {exc}")
            raise FleetFailed(f"deploy-fleet {summary.message}", str(self.run_dir)) from None
        for plan in plans:
            host = next(h for h in self.fleet.hosts if h.name == plan.host)
            self.record(host).release_before, _ = serving_release(self.target(host))
            self.record(host).message = f"would deploy {plan.describe()}"
            self.event(f"{plan.host}: preflight passed", plan.describe())
        return self.finish(
            "dry-run",
            f"dry run: preflight passed on {len(plans)} host(s), waves {self.summary.waves}; nothing was changed",
        )

    def run_wave(self, number: int, wave: list[FleetHost]) -> list[str]:
        """Upgrade the wave's hosts (in parallel up to the limit); the names of those that failed."""
        todo = [h for h in wave if self.record(h).outcome != "already upgraded"]
        self.event(
            f"wave {number}", f"hosts {[h.name for h in wave]}" + ("" if todo else " (all already upgraded)")
        )
        with ThreadPoolExecutor(
            max_workers=self.fleet.rollout.parallelism, thread_name_prefix="fleet"
        ) as pool:
            # each host's subflow runs in a copy of this flow's context, so it is a child run of deploy-fleet
            futures = {
                h.name: pool.submit(contextvars.copy_context().run, self.upgrade, h, number) for h in todo
            }
            return [name for name, future in futures.items() if not _result(future)]

    def ask_person(self, name: str, number: int, result: AnalysisResult) -> bool:
        """Pause for a person after a step whose analysis passed (`rollout.pause_after`): True to go on;
        an abort (theirs, or the timeout's) rolls back every upgraded host and gives False."""
        timeout_s = self.fleet.rollout.approval_timeout_s
        step = "the canary" if name == "canary" else name
        upgraded = [h.name for h in self.upgraded()]
        left = [r.name for r in self.summary.hosts if r.name not in upgraded]
        description = "\n\n".join(
            [
                f"**deploy-fleet paused after {step}** (release {self.summary.release_id}): its analysis "
                f"passed. {result.describe()}",
                f"On the new release, serving live traffic now: {', '.join(upgraded)}. "
                f"Still on the old release: {', '.join(left)}.",
                f"Choose **promote** to go on with wave {number + 1}, or **abort** to roll back every upgraded "
                f"host ({', '.join(upgraded)}) from its own backup. No answer within {timeout_s:.0f} s aborts.",
                f"The rollout's record: `{self.run_dir / 'summary.json'}`",
            ]
        )
        approval = wait_for_person(
            f"deploy-fleet after {step}", description, timeout_s, f"fleet-after-wave-{number}"
        )
        note = f" ({approval.note})" if approval.note else ""
        self.event(
            f"decision after {step}",
            f"{approval.decision} by {approval.decided_by} after {approval.waited_s:.0f} s{note}",
        )
        if approval.decision == "promote":
            return True
        self.roll_back_all(f"{name} aborted by {approval.decided_by}{note}")
        return False

    def upgraded(self) -> list[FleetHost]:
        return [h for h in self.fleet.hosts if self.record(h).outcome in ("upgraded", "already upgraded")]

    def cut_mid_deploy(self) -> list[FleetHost]:
        """Hosts whose deploy was started and never ended (a Prefect cancel killed the run's process) and that
        need rollback-sdxl: the box records the deploy as interrupted, or serves this rollout's release.
        The others (cut before the deploy changed anything) only go back into the balancer."""
        hosts = []
        for host in self.fleet.hosts:
            record = self.record(host)
            if record.wave is None or record.outcome != "not reached":
                continue
            target = self.target(host)
            try:
                with open_host(target.connection) as box:
                    interrupted = interrupted_deploy(box, target.on_host(home_dir(box))) is not None
                touched = interrupted or serving_release(target)[1] == self.summary.release_id
            except Exception as exc:  # unreachable: rollback-sdxl says what it can, the others go on
                self.event(f"{host.name}: state unknown after the cancel", f"{type(exc).__name__}: {exc}")
                touched = True
            if touched:
                hosts.append(host)
            else:
                self._try_back_in(host, record)
        return hosts

    def roll_back_all(self, why: str, cut: list[FleetHost] | None = None) -> None:
        """Roll back every host this rollout upgraded, and the `cut` ones (a host at a time per allowed
        unavailable host)."""
        self.summary.aborted = why
        hosts = self.upgraded() + (cut or [])
        back = f"rolling back {[h.name for h in hosts] or 'no host'}"
        self.event("abort", f"{why}; {back}", f"fleet: abort, {back} (why: the summary below)")
        with ThreadPoolExecutor(
            max_workers=self.fleet.rollout.max_unavailable, thread_name_prefix="fleet"
        ) as pool:
            for future in [pool.submit(contextvars.copy_context().run, self.roll_back, h) for h in hosts]:
                future.result()

    def finish(self, status: Literal["completed", "failed", "dry-run"], message: str) -> FleetSummary:
        for host in self.fleet.hosts:
            record = self.record(host)
            try:
                record.release_after, _ = serving_release(self.target(host))
            except Exception as exc:
                record.release_after = f"unknown ({type(exc).__name__}: {exc})"
        self.summary.status, self.summary.message = status, message
        self.summary.finished_at = _now()
        self.summary.seconds = round(time.monotonic() - self.started, 1)
        self.save()
        report = fleet_markdown(self.summary)
        (self.run_dir / "report.md").write_text(report, encoding="utf-8")
        create_markdown_artifact(key="deploy-fleet-summary", markdown=report, description=message[:200])
        _tell(f"deploy-fleet {status}: {message}\nrun directory: {self.run_dir}", True)
        return self.summary


def _tell(line: str, told_by_summary: str | bool = False) -> None:
    """Tell `line` in the flow run's log (printed outside a run: a cancel hook in a worker's process).
    `told_by_summary`: what the line says is in the summary the CLI prints after the run, so that console
    shows this instead (True: nothing)."""
    if told_by_summary and FlowRunContext.get() is not None:
        run_logger().info("%s", line, extra={TOLD_BY_SUMMARY: told_by_summary})
    else:
        print(line)


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


def _newest_run(runs_dir: Path, flow_name: str) -> str | None:
    """The newest run directory of this flow under runs_dir (on this machine), if any."""
    runs = sorted(runs_dir.glob(f"*-{flow_name}*"))
    return str(runs[-1]) if runs else None


def _result(future: Any) -> bool:
    try:
        return bool(future.result())
    except Exception as exc:  # a bug or a lost balancer: the host counts as failed
        print(f"fleet: host upgrade raised {type(exc).__name__}: {exc}")
        return False


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
        raise FleetFailed(f"deploy-fleet failed: {summary.message}", str(run_dir))
    return rollout.finish("completed", f"{len(fleet.hosts)} host(s) on release {rollout.summary.release_id}")
