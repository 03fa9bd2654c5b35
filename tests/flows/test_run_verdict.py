"""The run's one verdict (flows/record/rundir.py `RunRecord.finish`, flows/evidence/gates.py
`judge_downtime`): a failed run never says its gates passed, the downtime gate is judged over the whole run
(rollback included), and the console table, `summary.json`, `gates.md` and `report.md` tell the same verdict.
Unit level: the run record is driven stage by stage as the runbook drives it, with the prober's record set
directly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from flows.config.target import StartMode, Target
from flows.errors import GateFailed, StageFailed
from flows.evidence.downtime import Downtime
from flows.evidence.gates import DESCRIPTIONS, Evidence, GateReport, GateRow, criteria_for_mode, judge
from flows.record.rundir import RunRecord, RunSummary
from flows.runbooks.commands import print_summary
from flows.runbooks.demo import demo_target
from flows.runbooks.plan import STAGES_OF, touches_old_service

# What the prober saw before the cut-over, and over the whole run once a rollback's outage is in it.
QUIET = {"longest_outage_s": 0.0, "failed_requests": 0, "probes": 185, "outages": 0, "total_outage_s": 0.0}
ROLLED_BACK = {
    "longest_outage_s": 7.51,
    "failed_requests": 30,
    "probes": 228,
    "outages": 1,
    "total_outage_s": 7.51,
}


def downtime(mode: StartMode, seen: dict[str, float]) -> Downtime:
    return Downtime(
        mode=mode,
        still_down=False,
        failed_app_requests=1 if seen["failed_requests"] else 0,
        app_requests=7,
        **seen,  # type: ignore[arg-type]
    )


def gate_rows(target: Target, mode: StartMode, seen: Downtime, failing: str | None = None) -> GateReport:
    """The gate's table as the gate stage records it: every row passes except `failing`; the downtime row
    judged on what the prober had seen by then."""
    rows = []
    for criterion in criteria_for_mode(target.criteria, mode):
        if criterion.name == "max_downtime_s":
            rows += judge([criterion], Evidence(downtime=seen)).rows
            continue
        verdict = "fail" if criterion.name == failing else "pass"
        rows.append(
            GateRow(
                criterion=criterion.name,
                description=DESCRIPTIONS[criterion.name],
                threshold=criterion.threshold,
                observed="as observed",
                enforce=criterion.enforce,
                verdict=verdict,
            )
        )
    return GateReport(rows=rows)


def run_until(tmp_path: Path, mode: StartMode, failed_stage: str | None) -> RunRecord:
    """A deploy's run record driven through the stages of `mode` up to `failed_stage`, which fails (the gate
    stage with an enforced row failing, as `require_passed` fails it); the prober records a rollback's
    outage when the failure may have touched the old service."""
    target = demo_target(tmp_path, 7860)
    run = RunRecord("deploy-sdxl", target, tmp_path / "runs")
    touched = failed_stage is not None and touches_old_service(mode, failed_stage)
    final = downtime(mode, ROLLED_BACK if touched else QUIET)
    run.before_finish.append(lambda: setattr(run.summary, "downtime", final))
    for stage in STAGES_OF[mode]:
        if stage == failed_stage:
            with pytest.raises(StageFailed), run.stage(stage):
                if stage == "gate":
                    run.record_gates(gate_rows(target, mode, downtime(mode, QUIET), failing="p95_seconds"))
                raise GateFailed(f"{stage} went wrong")
            return run
        with run.stage(stage):
            if stage == "gate":
                run.record_gates(gate_rows(target, mode, downtime(mode, QUIET)))
    return run


def row_of(summary: RunSummary, criterion: str) -> GateRow:
    return next(row for row in summary.gates if row.criterion == criterion)


@pytest.mark.parametrize(
    ("mode", "stage"), [(mode, stage) for mode, order in STAGES_OF.items() for stage in order]
)
def test_a_failed_run_never_says_its_gates_passed(tmp_path: Path, mode: StartMode, stage: str) -> None:
    """At every stage of either order: a failure before the gate leaves the criteria unjudged (null); from
    the gate on the verdict is false, and the downtime row is the whole run's, rollback included."""
    run = run_until(tmp_path, mode, stage)
    summary = run.finish("failed", f"stage {stage} failed")
    judged = STAGES_OF[mode].index(stage) >= STAGES_OF[mode].index("gate")
    assert summary.gates_passed is (False if judged else None)
    assert bool(summary.gates) is judged
    on_disk = json.loads((run.dir / "summary.json").read_text())
    assert on_disk["gates_passed"] is summary.gates_passed
    assert set(on_disk) == set(RunSummary.model_fields)
    if judged:
        row = row_of(summary, "max_downtime_s")
        assert summary.downtime is not None and row.observed == summary.downtime.describe()
        rolled_back = touches_old_service(mode, stage)
        assert ("30 of 228 probes failed" in row.observed) is rolled_back
        # over 5 s: enforced on a staged deploy, report-only on a stop-first one
        assert row.verdict == ("pass" if not rolled_back else "fail" if mode == "staged" else "warn")
        assert "## Success criteria: FAILED" in (run.dir / "report.md").read_text()


def test_the_cutover_rehearsal_reads_the_same_everywhere(tmp_path: Path) -> None:
    """A staged run whose gate passed with no outage, then failed at the cut-over and rolled back: the
    downtime row fails on the rollback's outage, and the console table, summary.json, gates.md and report.md
    all say so, the console once."""
    run = run_until(tmp_path, "staged", "cutover")
    run.summary.rolled_back = True
    run.finish("failed", "stage cutover failed; rolled back")
    on_disk = RunSummary.model_validate_json((run.dir / "summary.json").read_text())
    row = row_of(on_disk, "max_downtime_s")
    assert on_disk.gates_passed is False
    assert (
        row.verdict == "fail" and "longest outage 7.51 s" in row.observed and "0 of 185" not in row.observed
    )
    assert "| max_downtime_s | 5 | staged: longest outage 7.51 s" in (run.dir / "gates.md").read_text()
    report = (run.dir / "report.md").read_text()
    assert "## Success criteria: FAILED" in report and "| **fail** |" in report

    console = Console(record=True, width=250)
    print_summary(run.dir / "summary.json", console)
    shown = console.export_text()
    assert "success criteria: FAILED" in shown
    table_line = next(line for line in shown.splitlines() if "max_downtime_s" in line)
    assert "7.51 s" in table_line and "fail" in table_line and "pass" not in table_line
    # Told once: the row holds the whole run's downtime, so no line below the table repeats it.
    assert shown.count(on_disk.downtime.describe()) == 1 and "downtime:" not in shown  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["staged", "stop-first"])
def test_a_completed_run_passes_and_a_late_outage_is_not_hidden(tmp_path: Path, mode: StartMode) -> None:
    """A run that completed with every row passing says passed; a staged run whose app saw an outage after
    the last check says FAILED and warns, instead of keeping the gate's earlier pass."""
    run = run_until(tmp_path, mode, None)
    summary = run.finish("completed", "deployed")
    assert summary.gates_passed is True and not summary.warnings

    late = run_until(tmp_path / "late", mode, None)
    late.before_finish.append(lambda: setattr(late.summary, "downtime", downtime(mode, ROLLED_BACK)))
    summary = late.finish("completed", "deployed")
    assert summary.gates_passed is (mode != "staged")  # report-only on a stop-first deploy
    assert bool(summary.warnings) is (mode == "staged")
