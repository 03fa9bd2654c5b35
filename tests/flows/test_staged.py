"""The staged deploy: the new service starts beside the old one, is gated while the old one serves, and takes
the app's port over in a cut-over; a failure before it never touches the old service, one at it puts the old
one back. Real processes on the local host (the legacy stand-in as the old service, a real tiny-sdxl `serve`
under its supervisor), the real prober on the app's port with the app's request sent back to back (the `staged`
fixture, tests/support/flows.py). The staged deploy with compile on is tests/flows/test_staged_compile.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.box.deploy_state import DeployState, load_state, save_state
from flows.box.hosts import LocalHost
from flows.box.procs import find_service, is_running, listener_pids, start_detached
from flows.config.target import Target
from flows.evidence.downtime import Downtime
from flows.runbooks.recovery import recover
from flows.runbooks.runbook import deploy_sdxl
from flows.stages.rollback import current_answers, new_service_process
from tests.support.flows import is_legacy, summary_of

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fault_counts")]


@pytest.mark.parametrize("stage", ["warmup", "benchmark", "gate"])
def test_a_staged_deploy_failing_before_the_cut_over_never_touches_the_old_service(
    prefect_api: None, staged: tuple[LocalHost, Target], wheel: str, tmp_path: Path, stage: str
) -> None:
    host, target = staged
    old = find_service(host, target.current.port)
    state = deploy_sdxl(
        target=target, wheel=wheel, fail_at=stage, runs_dir=str(tmp_path / "runs"), return_state=True
    )
    assert state.is_failed() and f"stage '{stage}' failed" in state.message
    summary = summary_of(state)
    assert not summary["rolled_back"] and summary["old_service_answering"] is True
    assert "the old service was not touched" in summary["message"]
    assert summary["gates_passed"] is None and summary["gates"] == []  # failed before any was judged
    assert summary["downtime"]["failed_requests"] == 0 and summary["downtime"]["probes"] > 0
    assert find_service(host, target.current.port) == old and is_running(host, old)  # never restarted
    assert is_legacy(current_answers(host, target.current))
    new = load_state(host, target).new_process
    assert new is not None and not is_running(host, new)  # the staged service was stopped
    assert listener_pids(host, target.new.staging_port) == []
    assert load_state(host, target).status == "failed"


def test_a_failed_cut_over_puts_the_old_service_back(
    prefect_api: None, staged: tuple[LocalHost, Target], wheel: str, tmp_path: Path
) -> None:
    host, target = staged
    old = find_service(host, target.current.port)
    state = deploy_sdxl(
        target=target, wheel=wheel, fail_at="cutover", runs_dir=str(tmp_path / "runs"), return_state=True
    )
    assert state.is_failed() and "after the old service stopped" in state.message
    summary = summary_of(state)
    assert summary["rolled_back"] and summary["old_service_answering"] is True
    # One verdict: failed, whatever the gate said before the cut-over; the downtime row is the whole run's.
    downtime = next(row for row in summary["gates"] if row["criterion"] == "max_downtime_s")
    assert summary["gates_passed"] is False
    assert downtime["observed"] == Downtime.model_validate(summary["downtime"]).describe()
    assert not is_running(host, old)  # it was stopped at the cut-over, and started again
    assert is_legacy(current_answers(host, target.current))
    new = new_service_process(host, target)
    assert new is None or not is_running(host, new)
    assert summary["downtime"]["still_down"] is False
    assert load_state(host, target).status == "rolled_back"


def test_an_interrupted_staged_deploy_stops_only_its_staged_service(
    staged: tuple[LocalHost, Target], tmp_path: Path
) -> None:
    host, target = staged
    old = find_service(host, target.current.port)
    # What a control side that died during the warm-up leaves: a staged service, the state on the box.
    staged_process = start_detached(
        host,
        ["sleep", "300"],
        workdir=str(tmp_path),
        log_file=str(tmp_path / "s.log"),
        pid_file=str(tmp_path / "s.pid"),
    )
    save_state(
        host, target, DeployState(run_id="r1", stage="warmup", mode="staged", new_process=staged_process)
    )
    facts = recover(host, target, load_state(host, target))
    assert "stopped" in (facts.stopped_staged or "") and not is_running(host, staged_process)
    assert find_service(host, target.current.port) == old and is_running(host, old)
    assert load_state(host, target).status == "failed"


def test_a_second_staged_deploy_cuts_over_from_the_release_that_serves(
    prefect_api: None, staged: tuple[LocalHost, Target], wheel: str, tmp_path: Path
) -> None:
    """The old service is this project's own earlier release, under the same supervisor files: the staged one
    starts beside it, and the cut-over stops the old supervisor's whole group."""
    from flows.box.releases import load_releases, serving_now

    host, target = staged
    runs = str(tmp_path / "runs")
    first = deploy_sdxl(target=target, wheel=wheel, runs_dir=runs, return_state=True)
    assert first.is_completed(), first.message
    old = find_service(host, target.current.port)
    second = deploy_sdxl(target=target, wheel=wheel, runs_dir=runs, return_state=True)
    assert second.is_completed(), second.message
    summary = summary_of(second)
    assert summary["facts"]["start"]["mode"] == "staged"
    assert summary["downtime"]["failed_requests"] == 0 and summary["downtime"]["longest_outage_s"] < 2
    assert not is_running(host, old)
    records = load_releases(host, target)
    assert len(records) == 2 and not serving_now(host, records[0]) and serving_now(host, records[1])
    answer = current_answers(host, target.current)
    assert answer is not None and answer.listening == [target.current.port]
