"""The run record's stage wrapper (flows/record/rundir.py): the one failure path every stage of the runbook
takes."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.errors import StageFailed
from flows.record.rundir import RunRecord
from flows.runbooks.commands import STAGE_NAMES
from flows.runbooks.demo import demo_target
from flows.runbooks.plan import STAGES, STAGES_OF, STOP_FIRST_COMPILE_AFTER_STOP


@pytest.mark.parametrize(
    "stage", [s for s in STAGES if s != "cutover"]
)  # cutover injects at its worst moment
def test_fail_at_fails_exactly_its_stage_through_the_one_failure_path(tmp_path: Path, stage: str) -> None:
    """The rehearsal can fail any stage of either order: the stage before it completes, the named one fails
    with the rehearsal's reason and is the summary's failed stage. (What the box looks like after a failure
    at each kind of stage is proven end to end: tests/flows/test_e2e.py, test_staged.py.)"""
    run = RunRecord("deploy-sdxl", demo_target(tmp_path, 7860), tmp_path / "runs", fail_at=stage)
    other = next(s for s in STAGES if s != stage)
    with run.stage(other):
        pass
    with pytest.raises(StageFailed, match="fail_at rehearsal") as failed, run.stage(stage):
        pytest.fail("the stage body ran despite fail_at")
    assert failed.value.stage == stage
    assert [(s.name, s.status) for s in run.summary.stages] == [(other, "completed"), (stage, "failed")]
    assert run.summary.failed_stage == stage


def test_every_order_is_made_of_the_stages_fail_at_and_the_cli_accept() -> None:
    """Both orders, and the stop-first order whose compile step runs after the stop (no room beside the old
    service), use only the stages fail_at (UI) and --fail-at (CLI) accept, and together every one of them; the
    compile step always comes after prefetch (the weights on the box) and before the new service starts."""
    orders = [*STAGES_OF.values(), STOP_FIRST_COMPILE_AFTER_STOP]
    assert set().union(*orders) == set(STAGES) == set(STAGE_NAMES.split(", "))
    for order in orders:
        start = "start_staged" if "start_staged" in order else "start_new"
        assert order.index("prefetch") < order.index("compile") < order.index(start)
    after_stop = STOP_FIRST_COMPILE_AFTER_STOP
    assert after_stop.index("stop_current") < after_stop.index("compile")
