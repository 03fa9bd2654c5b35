"""deploy-fleet's failures under load: a failed canary, a canary a person aborts, a failed second wave and a
host past its progress deadline are each rolled back with not one failed request through HAProxy (the bed:
tests/support/fleet.py).
Real deploys of tiny models; a file of its own so that it runs beside tests/flows/test_fleet.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect import tags

from tests.support.fleet import NAMES, FleetBed, answers_legacy, run_under_load
from tests.support.person import Person

pytestmark = pytest.mark.slow


def test_failed_canary_is_rolled_back_alone(
    prefect_api: None, bed: FleetBed, wheel: str, tmp_path: Path
) -> None:
    fleet = bed.fleet(canary=["h2"], wave_size=1, max_unavailable=1)
    state, summary, report, _load = run_under_load(bed, tmp_path, wheel, fleet, fail_at={"h2": "warmup"})

    assert state.is_failed() and "canary failed on ['h2']" in summary.message
    outcomes = {h.name: h.outcome for h in summary.hosts}
    assert outcomes == {"h1": "not reached", "h2": "deploy failed", "h3": "not reached"}
    canary = next(h for h in summary.hosts if h.name == "h2")
    assert any(s.name == "warmup" and s.status == "failed" for s in canary.stages)
    assert summary.rolled_back == []  # nothing was upgraded: the canary's own deploy rolled it back
    assert all(answers_legacy(bed, name) for name in NAMES)
    # The other hosts never left the old release: the very same processes serve, nothing was installed.
    for name in ("h1", "h3"):
        assert bed.serving(name) == bed.before[name]
        install = Path(bed.targets[name].new.install_dir)
        assert not (install / "releases").exists() and not (install / "deploy-state.json").exists()
    assert all(s.status == "UP" for s in bed.api.stats().values())
    assert "sd15" in next(h for h in summary.hosts if h.name == "h2").release_after
    assert "**aborted**: canary failed on ['h2']" in report


def test_a_person_aborts_after_the_canary_and_it_is_rolled_back_alone(
    prefect_api: None, bed: FleetBed, wheel: str, tmp_path: Path
) -> None:
    """`rollout.pause_after: canary`: the run pauses in Prefect after the canary passed; the person aborts, and
    the upgraded canary is rolled back from its own backup while the other hosts are never touched."""
    fleet = bed.fleet(canary=1, pause_after="canary", approval_timeout_s=300)
    person = Person({"decision": "abort", "note": "app team: hold the rollout"})
    with tags(person.tag):  # a missed resume aborts in 5 min, inside the test's time
        state, summary, report, _load = run_under_load(bed, tmp_path, wheel, fleet)
    person.join(timeout=5)

    assert person.error is None, person.error
    assert "paused after the canary" in person.descriptions[0]
    assert "Still on the old release: h2, h3" in person.descriptions[0]
    assert state.is_failed() and summary.aborted == "canary aborted by person (app team: hold the rollout)"
    assert [a.verdict for a in summary.analyses] == ["pass"]  # the person, not the analysis, stopped it
    assert {h.name: h.outcome for h in summary.hosts} == {
        "h1": "rolled back",
        "h2": "not reached",
        "h3": "not reached",
    }
    assert all(answers_legacy(bed, name) for name in NAMES)
    assert all(bed.serving(name) == bed.before[name] for name in ("h2", "h3"))
    assert all(s.status == "UP" for s in bed.api.stats().values())
    assert "abort by person" in report


def test_second_wave_failure_rolls_back_every_upgraded_host(
    prefect_api: None, bed: FleetBed, wheel: str, tmp_path: Path
) -> None:
    fleet = bed.fleet(canary=1, wave_size=2, max_unavailable=2)
    state, summary, report, _load = run_under_load(bed, tmp_path, wheel, fleet, fail_at={"h3": "warmup"})

    assert state.is_failed() and "wave 1 failed on ['h3']" in summary.message
    outcomes = {h.name: h.outcome for h in summary.hosts}
    assert outcomes == {"h1": "rolled back", "h2": "rolled back", "h3": "deploy failed"}
    assert sorted(summary.rolled_back) == ["h1", "h2"]
    assert all(answers_legacy(bed, name) for name in NAMES)
    assert all(h.release_after.startswith("sd15") for h in summary.hosts)
    assert all(s.status == "UP" for s in bed.api.stats().values())
    for name in ("h1", "h2"):
        record = next(h for h in summary.hosts if h.name == name)
        assert record.rollback_run_dir and Path(record.rollback_run_dir, "summary.json").is_file()
    events = [e.event for e in summary.timeline]
    assert events.index("abort") < events.index("h1: ready", events.index("abort"))


def test_a_host_past_its_deadline_is_rolled_back(
    prefect_api: None, bed: FleetBed, wheel: str, tmp_path: Path
) -> None:
    # The canary's deploy is cut by its progress deadline (a few seconds: mid-deploy, before its gates).
    fleet = bed.fleet(canary=1).model_copy()
    fleet.rollout.progress_deadline_s = 8
    state, summary, report, _load = run_under_load(bed, tmp_path, wheel, fleet)

    assert state.is_failed() and "canary failed on ['h1']" in summary.message
    canary = next(h for h in summary.hosts if h.name == "h1")
    assert canary.outcome == "rolled back" and "past its progress deadline (8 s)" in canary.message
    assert canary.rollback_run_dir and Path(canary.rollback_run_dir, "summary.json").is_file()
    assert [h.outcome for h in summary.hosts[1:]] == ["not reached", "not reached"]
    assert all(answers_legacy(bed, name) for name in NAMES)
    assert all(s.status == "UP" for s in bed.api.stats().values())
