"""An inconclusive quality verdict pauses the deploy for a person (real Prefect API, real services).

The current service is the stand-in of the user's SD1.5 script with seeded noise images (`--noise`), the
new one a real tiny-sdxl; the tiny random CLIP scores both. A sized comparison capped at 3 prompts and an
enforced margin of 0.05 CLIP points: the per-prompt differences go both ways (about -1.5, 0 and +1.0), so
the real statistics cannot tell (the CI reaches below -margin without showing the new model worse):
INCONCLUSIVE.
A thread plays the person (tests/support/person.py): it finds the paused flow run through the Prefect API
and resumes it with input.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect import flow, tags

from bench.launch import free_port
from evaluation.stats import comparison_size
from flows.box.hosts import LocalHost
from flows.box.procs import find_service
from flows.config.target import Criterion, QualityCheck, Target
from flows.errors import NotPromoted
from flows.evidence.gates import Evidence, judge
from flows.evidence.results import QualityResult
from flows.record.approval import Approval, ask_person, decide, needs_decision, require_promoted
from flows.runbooks.demo import start_current, stop_all
from flows.runbooks.runbook import deploy_sdxl
from flows.stages.rollback import current_answers
from tests.support.flows import fast, is_legacy, legacy_target, summary_of
from tests.support.person import Person

MARGIN = 0.05  # CLIP points


@pytest.fixture
def noisy_legacy(tmp_path: Path) -> Iterator[tuple[LocalHost, Target]]:
    """The stand-in of the user's script, answering seeded noise images; everything stopped afterwards."""
    host = LocalHost()
    target = legacy_target(tmp_path / "box", free_port())
    command = target.current.start_command + " --noise"
    target = target.model_copy(
        update={"current": target.current.model_copy(update={"start_command": command})}
    )
    start_current(host, target)
    try:
        yield host, target
    finally:
        stop_all(host, target)


def undecided(target: Target, **quality: Any) -> Target:
    """The target with a sized, too small comparison and the quality criterion enforced at MARGIN."""
    target = fast(target)
    criteria = [
        c.model_copy(update={"threshold": MARGIN, "enforce": True}) if c.name == "quality" else c
        for c in target.criteria
    ]
    check = target.quality.model_copy(
        update={"enabled": True, "prompt_limit": None, "sizing_batch": 2, "max_prompts": 3, **quality}
    )
    return target.model_copy(update={"quality": check, "criteria": criteria})


def _quality_row(summary: dict) -> dict:
    return next(g for g in summary["gates"] if g["criterion"] == "quality")


@pytest.mark.slow
@pytest.mark.usefixtures("fault_counts")
def test_an_inconclusive_deploy_pauses_until_a_person_promotes_it(
    prefect_api: None, noisy_legacy: tuple[LocalHost, Target], wheel: str, tmp_path: Path
) -> None:
    host, target = noisy_legacy
    person = Person({"decision": "promote", "note": "tester: looked at the report"})
    with tags(person.tag):  # a missed resume fails in 5 min, inside the test's time, not after an hour
        state = deploy_sdxl(
            target=undecided(target, approval_timeout_s=300),
            wheel=wheel,
            runs_dir=str(tmp_path / "runs"),
            return_state=True,
        )
    person.join(timeout=5)

    summary = summary_of(state)
    assert person.error is None, person.error
    assert state.is_completed(), (summary["message"], person.trouble[-3:])
    row = _quality_row(summary)
    assert row["verdict"] == "inconclusive" and row["enforce"], row
    # What the person read in the UI: the CI against the margin, and where the report is.
    assert "INCONCLUSIVE" in person.description and f"against the margin -{MARGIN:g}" in person.description
    assert "95% CI [" in person.description and "report.html" in person.description
    approval = summary["facts"]["approval"]
    assert approval["decision"] == "promote" and approval["decided_by"] == "person"
    assert approval["note"] == "tester: looked at the report" and approval["waited_s"] > 0
    assert [s["name"] for s in summary["stages"]][-2:] == ["gate", "approval"]
    # The comparison was sized from the baseline's first batch: 2 prompts first, capped at 3.
    sizing = summary["facts"]["quality_sizing"]
    assert sizing["mode"] == "sized" and sizing["first_batch"] == 2 and sizing["prompts"] == 3, sizing
    assert sizing["needed"] > 3 and sizing["capped"] and sizing["baseline_sd"] > 0
    assert sizing["needed"] == pytest.approx(comparison_size(sizing["baseline_sd"], MARGIN), rel=1e-3)
    assert "3 prompts x 1 seeds" in row["observed"]
    # The new service serves the app's port.
    health = current_answers(host, target.current)
    assert health is not None and not is_legacy(health)


@pytest.mark.slow
@pytest.mark.usefixtures("fault_counts")
def test_an_inconclusive_deploy_nobody_answers_times_out_and_the_old_service_serves(
    prefect_api: None, noisy_legacy: tuple[LocalHost, Target], wheel: str, tmp_path: Path
) -> None:
    host, target = noisy_legacy
    state = deploy_sdxl(
        target=undecided(target, approval_timeout_s=2),
        wheel=wheel,
        runs_dir=str(tmp_path / "runs"),
        return_state=True,
    )

    summary = summary_of(state)
    assert state.is_failed() and "stage 'approval' failed" in state.message, state.message
    assert "aborted by timeout" in summary["message"] and summary["failed_stage"] == "approval"
    assert _quality_row(summary)["verdict"] == "inconclusive"
    approval = summary["facts"]["approval"]
    assert approval["decision"] == "abort" and approval["decided_by"] == "timeout"
    assert approval["waited_s"] >= 2
    # The old service answers at the end (a stop-first deploy rolled back; a staged one never touched it).
    assert summary["old_service_answering"] is True
    assert is_legacy(current_answers(host, target.current)) and find_service(host, target.current.port)
    downtime = summary["downtime"]
    assert downtime["probes"] > 0 and not downtime["still_down"]
    if downtime["mode"] == "staged":  # the old service served throughout
        assert downtime["failed_requests"] == 0 and not summary["rolled_back"]
    else:
        assert summary["rolled_back"]


# ---------------------------------------------------------------- the decision itself (no deploy)


def _inconclusive_gates(enforce: bool = True) -> tuple[Any, QualityResult]:
    quality = QualityResult(
        current_score=30.0, new_score=29.8, passed=True, inconclusive=True,
        detail="inconclusive: CLIP 29.80 vs 30.00", mean_diff=-0.2, ci_low=-1.4, ci_high=0.9,
        margin=1.0, report="/runs/x/quality/report.html",
    )  # fmt: skip
    gates = judge([Criterion(name="quality", threshold=1.0, enforce=enforce)], Evidence(quality=quality))
    return gates, quality


def test_a_person_can_abort_from_the_terminal(prefect_api: None) -> None:
    gates, quality = _inconclusive_gates()

    @flow
    def waits_for_a_person() -> str:
        return ask_person(gates, quality, timeout_s=180)

    person = Person({"decision": "abort", "note": "too risky"}, cli=True)  # sdxl-deploy approve
    with tags(person.tag):
        decision = waits_for_a_person()
    assert decision == "abort", person.error
    person.join(timeout=5)
    assert person.error is None, person.error
    assert "[-1.40, +0.90] against the margin -1" in person.description
    assert "`/runs/x/quality/report.html`" in person.description


def test_unattended_runs_decide_by_the_target_and_warn_only_rows_never_ask() -> None:
    gates, quality = _inconclusive_gates()
    for rule in ("abort", "promote"):
        approval = decide(gates, quality, QualityCheck(on_inconclusive=rule))  # no flow run: no pause
        assert approval is not None and (approval.decision, approval.decided_by) == (rule, "target")
    with pytest.raises(NotPromoted, match="inconclusive quality aborted by target"):
        require_promoted(decide(gates, quality, QualityCheck(on_inconclusive="abort")))
    require_promoted(decide(gates, quality, QualityCheck(on_inconclusive="promote")))
    warn_only, _ = _inconclusive_gates(enforce=False)
    assert warn_only.inconclusive and not needs_decision(warn_only)
    assert decide(warn_only, quality, QualityCheck()) is None  # would pause if it asked: no flow run here
    require_promoted(None)
    assert Approval(decision="promote", decided_by="person").waited_s == 0.0
