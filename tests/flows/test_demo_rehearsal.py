"""`demo --simulate-failure STAGE` can rehearse every stage of the runbook (flows/runbooks/demo.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.runbooks.demo import demo_target, rehearsal_target
from flows.runbooks.plan import STAGES, STAGES_OF


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_is_a_stage_of_the_order_the_demo_deploys(tmp_path: Path, stage: str) -> None:
    """The demo's box has room to stage (auto stages there); a stage only the stop-first order has makes the
    rehearsal deploy stop-first, so the flow never refuses it with "set new.start_mode"."""
    target = rehearsal_target(demo_target(tmp_path, 7860), stage)
    mode = "stop-first" if target.new.start_mode == "stop-first" else "staged"
    assert stage in STAGES_OF[mode]
    assert target.new.start_mode == ("stop-first" if stage in ("stop_current", "start_new") else "auto")
