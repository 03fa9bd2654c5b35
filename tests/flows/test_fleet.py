"""deploy-fleet: three hosts (the user's SD1.5 stand-in on each, one reached over a real sshd) behind a real
HAProxy (tests/support/fleet.py), a steady client load through HAProxy over the whole rollout, and not one
failed request, in a rollout a person promotes after the canary; the failures that roll hosts back are in
tests/flows/test_fleet_failures.py, a person's abort in tests/flows/test_fleet_pool.py. Real deploys of tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect import tags

from flows.config.fleet import Analysis, Rollout
from flows.runbooks.demo import TINY_REQUEST
from flows.runbooks.fleet.analysis import GroupTraffic, judge
from flows.runbooks.fleet.flow import deploy_fleet
from flows.runbooks.fleet.load import SteadyLoad
from flows.runbooks.fleet.summary import FleetSummary
from tests.support.fleet import NAMES, FleetBed, model_of, run_under_load
from tests.support.person import Person

pytestmark = pytest.mark.slow


def test_fleet_rollout_upgrades_every_host_without_a_failed_request(
    prefect_api: None, bed: FleetBed, wheel: str, tmp_path: Path
) -> None:
    """`rollout.pause_after: canary`: the run pauses in Prefect after the canary passed; a person promotes it,
    and the next wave upgrades the other two hosts. (A person's abort: test_fleet_pool; a later wave's failure
    rolling back every upgraded host: test_fleet_failures.)"""
    fleet = bed.fleet(canary=1, wave_size=2, max_unavailable=2, pause_after="canary", approval_timeout_s=300)
    person = Person({"decision": "promote", "note": "canary looks fine"})
    with tags(person.tag):  # a missed resume aborts in 5 min, inside the test's time
        state, summary, report, load = run_under_load(bed, tmp_path, wheel, fleet)
    person.join(timeout=5)

    assert person.error is None, person.error
    assert "paused after the canary" in person.descriptions[0]
    assert "Still on the old release: h2, h3" in person.descriptions[0]
    assert state.is_completed(), summary.message
    assert summary.waves == [["h1"], ["h2", "h3"]]
    assert [h.outcome for h in summary.hosts] == ["upgraded"] * 3
    assert all(model_of(bed, name) == "tiny-sdxl" for name in NAMES)
    assert all(
        h.release_after.startswith("release #1: tiny-sdxl " + summary.release_id) for h in summary.hosts
    )
    assert all(h.release_before.startswith("sd15") for h in summary.hosts)
    assert [a.verdict for a in summary.analyses] == ["pass", "pass"]
    assert summary.analyses[0].new.servers == ["h1"] and summary.analyses[0].old.servers == ["h2", "h3"]
    assert summary.analyses[0].new.requests >= 1 and summary.analyses[0].old.requests >= 1
    stats = bed.api.stats()
    assert all(stats[name].status == "UP" for name in NAMES)  # every server back to ready, checked up
    events = [e.event for e in summary.timeline]
    for name in NAMES:
        assert events.index(f"{name}: drain") < events.index(f"{name}: ready")
    assert events.index("analysis of canary") < events.index("decision after the canary")
    assert events.index("decision after the canary") < events.index("h2: drain")
    assert "promote by person" in report
    for name in NAMES:
        assert f"| {name} ({name}) |" in report and f"**release #1: tiny-sdxl {summary.release_id}" in report
    assert "## Timeline" in report and "analysis of canary" in report

    # A rerun resumes from what the hosts record: every host already runs this release, none is touched, and
    # the run does not pause after the canary again (nobody answers now: a pause would time out and abort).
    serving = {name: bed.serving(name) for name in NAMES}
    with SteadyLoad(bed.url, TINY_REQUEST) as again_load:
        again = deploy_fleet(fleet=fleet, wheel=wheel, runs_dir=str(tmp_path / "runs2"), return_state=True)
    assert again.is_completed() and again_load.failed == 0
    resumed = again.result()
    assert [h.outcome for h in resumed.hosts] == ["already upgraded"] * 3
    assert not any(e.event.startswith("decision after") for e in resumed.timeline)
    assert {name: bed.serving(name) for name in NAMES} == serving


def test_analysis_verdicts() -> None:
    rules = Analysis(max_error_rate=0.05, max_latency_ratio=2.0, latency_slack_ms=10, min_requests=5)
    old = GroupTraffic(servers=["a"], requests=100, errors_5xx=0, avg_ms=100)
    good = GroupTraffic(servers=["b"], requests=50, errors_5xx=0, avg_ms=150)
    assert judge(0, 1.0, good, old, rules).verdict == "pass"
    erring = GroupTraffic(servers=["b"], requests=50, errors_5xx=5, avg_ms=150)
    assert judge(0, 1.0, erring, old, rules).reasons[0].startswith("5xx rate 10.0% > max_error_rate")
    slow = GroupTraffic(servers=["b"], requests=50, avg_ms=211)
    assert "average time 211 ms > 2 x old 100 ms + 10 ms" in judge(0, 1.0, slow, old, rules).reasons[0]
    idle = GroupTraffic(servers=["b"], requests=2, avg_ms=None)
    assert judge(0, 1.0, idle, old, rules).verdict == "fail"


def test_fleet_file_errors_name_the_field(tmp_path: Path) -> None:
    from flows.config.fleet import load_fleet
    from flows.errors import FleetFileError

    target = tmp_path / "h1.yaml"
    target.write_text("connection: {kind: local}\n")
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "hosts: [{name: h1, target_file: h1.yaml}, {name: h2, target_file: h1.yaml}]\n"
        "load_balancer: {socket: /run/haproxy.sock}\nrollout: {canary: [h9]}\n"
    )
    with pytest.raises(FleetFileError, match=r"rollout.canary: \['h9'\] are not hosts"):
        load_fleet(fleet)
    fleet.write_text(
        "hosts: [{name: h1, target_file: h1.yaml}, {name: h2, target_file: h1.yaml}]\n"
        "load_balancer: {socket: /run/haproxy.sock}\nrollout: {max_unavailable: 2}\n"
    )
    with pytest.raises(FleetFileError, match="max_unavailable: 2 would take every host out"):
        load_fleet(fleet)
    fleet.write_text("hosts: [{name: h1, target_file: h1.yaml}]\nload_balancer: {socket: /s}\n")
    loaded = load_fleet(fleet)
    assert loaded.hosts[0].target is not None and loaded.hosts[0].target.connection.kind == "local"
    assert [[h.name for h in wave] for wave in loaded.waves()] == [["h1"]]


def test_deploy_fleet_command_names_the_bad_field(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sdxl_deploy.cli import app

    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("hosts: []\nload_balancer: {socket: /run/haproxy.sock}\n")
    result = CliRunner().invoke(app, ["deploy-fleet", str(fleet)], env={"COLUMNS": "400"})
    assert result.exit_code == 2
    assert "hosts: List should have at least 1 item" in " ".join(result.output.split())


def test_pauses_come_after_the_chosen_steps_never_after_the_last() -> None:
    def pauses(pause_after: str, waves: int, canary: int = 1) -> list[int]:
        rollout = Rollout(pause_after=pause_after, canary=canary)
        return [n for n in range(waves) if rollout.pauses_after(n, waves)]

    assert pauses("none", 3) == []
    assert pauses("canary", 3) == [0]
    assert pauses("canary", 3, canary=0) == []  # wave 0 is no canary then
    assert pauses("every wave", 3) == [0, 1]
    assert pauses("canary", 1) == []  # a one-host fleet: nothing is left to promote


def test_the_fleet_demo_upgrades_three_hosts_under_load_without_a_failed_request(
    prefect_api: None, tmp_path: Path
) -> None:
    """`sdxl-deploy demo --fleet 3` as the README runs it: three hosts behind a real HAProxy that the demo
    starts, a steady load through it, the fleet's record in summary.json, everything stopped after."""
    from flows.runbooks.fleet.demo import run_fleet_demo

    result = run_fleet_demo(hosts=3, runs_dir=str(tmp_path / "runs"))

    summary, load = result.summary, result.summary.load
    assert summary.status == "completed", summary.message
    assert [h.outcome for h in summary.hosts] == ["upgraded"] * 3
    assert all(h.release_after.startswith("release #1: tiny-sdxl") for h in summary.hosts)
    assert load is not None and load.requests >= 10 and load.failed_requests == 0, load
    # the record in summary.json is the one returned
    assert FleetSummary.model_validate_json((Path(summary.run_dir) / "summary.json").read_text()) == summary
    assert len(result.stopped) == 3  # each host's new service, by its PID
