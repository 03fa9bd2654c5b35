"""The record of one flow run: `runs/<UTC time>-<flow>/summary.json` (+ report.md and other files), the
stages with status and timings, the gate table, and whether the old service answered at the end.

`RunRecord.stage(name)` wraps each runbook stage: it times it, logs it, records it, turns any error into
`StageFailed` (whose message names the stage), and, for rehearsals, raises an injected failure at the
start of the stage named by `fail_at`. From its start to `finish` the run logs into `run.log` in its
directory (`flows/record/runlog.py`): a failed stage's traceback is there, not on the console.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from flows.box.common import run_logger
from flows.config.target import Target
from flows.errors import RehearsedFailure, StageFailed
from flows.evidence.downtime import Downtime
from flows.evidence.gates import GateReport, GateRow, gates_markdown, judge_downtime, shown_passed
from flows.evidence.results import CompileResult
from flows.record.facts import RunFacts
from flows.record.runlog import TOLD_BY_SUMMARY, close_run_log, open_run_log

RunStatus = Literal["running", "completed", "failed", "dry-run"]


class StageRecord(BaseModel):
    name: str
    status: Literal["completed", "failed"]
    started_at: str
    seconds: float
    detail: str = ""


class RunSummary(BaseModel):
    flow: str
    run_dir: str
    target: str
    current_service: str
    new_model: str
    started_at: str
    finished_at: str | None = None
    seconds: float | None = None
    status: RunStatus = "running"
    message: str = ""
    failed_stage: str | None = None
    stages: list[StageRecord] = Field(default_factory=list)
    gates: list[GateRow] = Field(default_factory=list)
    gates_passed: bool | None = None
    rolled_back: bool = False
    old_service_answering: bool | None = None
    new_service_answering: bool | None = None
    backup_dir: str | None = None
    release_id: str | None = None
    downtime: Downtime | None = None
    warnings: list[str] = Field(default_factory=list)  # worth reading, not a failure (e.g. compile check)
    facts: RunFacts = Field(default_factory=RunFacts)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def make_run_dir(root: str | Path, flow: str) -> Path:
    """A new `<root>/<YYYYmmdd-HHMMSS>-<flow>` directory (suffixed when two runs share a second)."""
    base = Path(root).expanduser().resolve()
    base.mkdir(parents=True, exist_ok=True)
    stamp = f"{_now():%Y%m%d-%H%M%S}"
    for attempt in range(1, 1000):
        path = base / (f"{stamp}-{flow}" if attempt == 1 else f"{stamp}-{flow}-{attempt}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run directory under {base}")


class RunRecord:
    """One run's directory and summary, kept up to date as stages run."""

    def __init__(self, flow: str, target: Target, runs_dir: str | Path, fail_at: str | None = None) -> None:
        self.dir = make_run_dir(runs_dir, flow)
        self.log_file = open_run_log(self.dir)
        self.fail_at = fail_at
        self.on_stage: Callable[[str], None] | None = None
        self.before_finish: list[Callable[[], None]] = []  # e.g. the downtime prober's last record
        self._started = time.monotonic()
        self.summary = RunSummary(
            flow=flow,
            run_dir=str(self.dir),
            target=target.connection.describe(),
            current_service=f"{target.current.name} on port {target.current.port}",
            new_model=target.new.model,
            started_at=_now().isoformat(timespec="seconds"),
        )
        self.save()

    @contextmanager
    def stage(self, name: str, inject_at_start: bool = True) -> Iterator[None]:
        """Run one stage: time it, record it, and raise `StageFailed(name, why)` on any error.
        `inject_at_start` False: the stage injects its `fail_at` rehearsal itself, at its worst moment."""
        log = run_logger()
        log.info("stage %s: start", name)
        started_at, t0 = _now().isoformat(timespec="seconds"), time.monotonic()
        try:
            if self.on_stage:
                self.on_stage(name)
            if name == self.fail_at and inject_at_start:
                raise RehearsedFailure(f"failure injected at stage {name!r} (fail_at rehearsal)")
            yield
        except Exception as exc:
            reason = exc.reason if isinstance(exc, StageFailed) else f"{type(exc).__name__}: {exc}"
            self._record(name, "failed", started_at, t0, reason)
            took = f"stage {name}: failed after {time.monotonic() - t0:.1f} s"
            log.error(  # a console the summary follows leaves the cause to the summary's stage table
                "%s: %s",
                took,
                reason,
                exc_info=exc,
                extra={TOLD_BY_SUMMARY: f"{took} (why: the summary below)"},
            )
            raise StageFailed(name, reason) from exc
        self._record(name, "completed", started_at, t0)
        log.info("stage %s: done in %.1f s", name, time.monotonic() - t0)

    def _record(
        self, name: str, status: Literal["completed", "failed"], started_at: str, t0: float, detail: str = ""
    ) -> None:
        self.summary.stages.append(
            StageRecord(
                name=name,
                status=status,
                started_at=started_at,
                seconds=round(time.monotonic() - t0, 2),
                detail=detail,
            )
        )
        if status == "failed":
            self.summary.failed_stage = name
        self.save()

    def record_gates(self, report: GateReport) -> None:
        self.summary.gates = report.rows
        self.summary.gates_passed = gates_verdict(self.summary.status, report.rows)
        self.write_text("gates.md", gates_markdown(report) + "\n")
        self.save()

    def write_text(self, name: str, text: str) -> Path:
        path = self.dir / name
        path.write_text(text, encoding="utf-8")
        return path

    def write_json(self, name: str, data: Any) -> Path:
        return self.write_text(name, json.dumps(data, indent=2, default=str) + "\n")

    def finish(self, status: RunStatus, message: str) -> RunSummary:
        for hook in self.before_finish:
            hook()
        self.summary.status = status
        self.summary.message = message
        if self.summary.gates:  # the downtime gate over the whole run, rollback included
            self.record_gates(judge_downtime(GateReport(rows=self.summary.gates), self.summary.downtime))
            if status == "completed" and not self.summary.gates_passed:
                failed = ", ".join(
                    f"{r.criterion} ({r.observed})" for r in self.summary.gates if r.verdict == "fail"
                )
                self.summary.warnings.append(f"after the last check, enforced criteria failed: {failed}")
        self.summary.finished_at = _now().isoformat(timespec="seconds")
        self.summary.seconds = round(time.monotonic() - self._started, 1)
        self.write_text("report.md", report_markdown(self.summary))
        self.save()
        close_run_log(self.log_file)
        return self.summary

    def save(self) -> None:
        (self.dir / "summary.json").write_text(
            self.summary.model_dump_json(indent=2) + "\n", encoding="utf-8"
        )


def gates_verdict(status: RunStatus, rows: list[GateRow]) -> bool | None:
    """The run's one verdict on its criteria (`gates_passed`): None when none was judged, False for a failed
    run whatever its rows say, else whether no enforced row failed."""
    if not rows:
        return None
    return status != "failed" and not any(row.verdict == "fail" for row in rows)


def report_markdown(summary: RunSummary) -> str:
    """The run as a short Markdown report (also published as the flow's markdown artifact)."""
    lines = [
        f"# {summary.flow}: {summary.status}",
        "",
        f"- target: {summary.target}; current: {summary.current_service}; new model: {summary.new_model}",
        f"- started {summary.started_at}, took {summary.seconds} s",
    ]
    if summary.message:
        lines.append(f"- {summary.message}")
    if summary.backup_dir:
        lines.append(f"- backup: `{summary.backup_dir}`")
    for row in summary.gates:
        if row.verdict == "inconclusive":
            lines.append(f"- {row.criterion}: **INCONCLUSIVE**, a person should look: {row.observed}")
    if summary.downtime:
        lines.append(f"- downtime: {summary.downtime.describe()}")
    compiled = summary.facts.compile  # the compile step's report (flows/stages/compile.py)
    if isinstance(compiled, CompileResult) and compiled.summary:
        lines.append(f"- compile step ({compiled.where}): {compiled.summary}")
    if summary.failed_stage or summary.rolled_back:
        lines.append(
            f"- rolled back: {'yes' if summary.rolled_back else 'no'}; old service answering afterwards: "
            f"{_yes_no(summary.old_service_answering)}"
        )
    lines += [f"- warning: {warning}" for warning in summary.warnings]
    lines += ["", "## Stages", "", "| stage | status | seconds | detail |", "|---|---|---|---|"]
    for stage in summary.stages:
        detail = stage.detail.replace("|", "\\|").replace("\n", " ")[:300]
        lines.append(f"| {stage.name} | {stage.status} | {stage.seconds} | {detail} |")
    if summary.gates:
        lines += [
            "",
            f"## Success criteria: {shown_passed(summary.gates_passed)}",
            "",
            gates_markdown(GateReport(rows=summary.gates)),
        ]
    return "\n".join(lines) + "\n"


def _yes_no(value: bool | None) -> str:
    return "unknown" if value is None else "yes" if value else "NO"
