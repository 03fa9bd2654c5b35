"""`Rollout`: one deploy-fleet run's work on its hosts and its record. Per host: drain in HAProxy, the host's
deploy-sdxl (in this process or on the work pool), HAProxy's check, ready; per wave, the hosts in parallel;
the abort path (rollback-sdxl per upgraded host); the person's pause after a step; the fleet's summary.json and
report. The order of the waves and the analyses between them are the flow's (`flows/runbooks/fleet/flow.py`)."""

from __future__ import annotations

import contextvars
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext

from flows.box.common import run_logger
from flows.box.deploy_state import interrupted_deploy
from flows.box.hostfs import home_dir
from flows.box.hosts import open_host
from flows.box.procs import find_service
from flows.box.releases import release_of
from flows.config.fleet import Fleet, FleetHost
from flows.config.target import Target
from flows.errors import BalancerError, FleetFileError, HostError, PreflightRefused, RunFailed
from flows.record.approval import wait_for_person
from flows.record.rundir import RunSummary
from flows.record.runlog import TOLD_BY_SUMMARY
from flows.runbooks.fleet.analysis import AnalysisResult
from flows.runbooks.fleet.haproxy import HAProxyAPI, ServerStat
from flows.runbooks.fleet.pool import run_on_pool
from flows.runbooks.fleet.preflight import check_hosts
from flows.runbooks.fleet.report import fleet_markdown
from flows.runbooks.fleet.summary import Event, FleetSummary, HostRecord
from flows.runbooks.rollback import rollback_sdxl
from flows.runbooks.runbook import deploy_sdxl
from flows.stages.deploy import sha256_file


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
        `RunFailed` naming each host (and field) that would refuse its deploy."""
        try:
            plans = check_hosts(self.fleet)
            self.require_servers()
        except (PreflightRefused, FleetFileError, BalancerError, HostError) as exc:
            self.event("preflight refused", str(exc), "fleet: preflight refused (why: the summary below)")
            summary = self.finish("failed", f"dry run refused: {exc}")
            raise RunFailed(f"deploy-fleet {summary.message}", str(self.run_dir)) from None
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
