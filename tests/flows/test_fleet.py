"""deploy-fleet: three hosts (the user's SD1.5 stand-in on each, one reached over a real sshd) behind a real
HAProxy, a steady client load through HAProxy over the whole rollout, and not one failed request, in a
successful rollout, a canary failure and a second-wave failure. Real deploys of tiny models."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prefect import tags

from bench.launch import free_port
from flows.demo import TINY_REQUEST, start_current, stop_all
from flows.fleet.analysis import GroupTraffic, judge
from flows.fleet.flow import deploy_fleet
from flows.fleet.haproxy import HAProxyAPI
from flows.fleet.load import SteadyLoad
from flows.fleet.summary import FleetSummary
from flows.fleet.target import Analysis, Fleet, FleetHost, LoadBalancer, Rollout
from flows.hosts import LocalHost
from flows.procs import ProcessInfo, find_service
from flows.target import Target
from flows.tasks.rollback import current_answers
from tests.support.flows import fast, is_legacy, legacy_target, ssh_connection
from tests.support.haproxy import haproxy
from tests.support.person import Person
from tests.support.sshd import SSHServer

pytestmark = pytest.mark.slow

NAMES = ("h1", "h2", "h3")


@dataclass
class FleetBed:
    targets: dict[str, Target]
    api: HAProxyAPI
    url: str
    balancer: LoadBalancer
    before: dict[str, ProcessInfo]

    def fleet(self, **rollout: object) -> Fleet:
        analysis = Analysis(duration_s=20, requests=3, min_requests=1, max_latency_ratio=None)
        return Fleet(
            hosts=[FleetHost(name=name, target=target) for name, target in self.targets.items()],
            load_balancer=self.balancer,
            rollout=Rollout(analysis=analysis, progress_deadline_s=300, **rollout),
        )

    def serving(self, name: str) -> ProcessInfo | None:
        target = self.targets[name]
        return find_service(LocalHost(), target.current.port)


@pytest.fixture
def bed(tmp_path: Path, sshd: SSHServer) -> Iterator[FleetBed]:
    """Three boxes running the legacy stand-in (h3 reached over SSH) behind a real HAProxy."""
    host = LocalHost()
    targets = {}
    for name in NAMES:
        target = fast(legacy_target(tmp_path / f"box-{name}", free_port()))
        target = target.model_copy(
            update={"workload": target.workload.model_copy(update={"app_request": TINY_REQUEST})}
        )
        if name == "h3":
            target = target.model_copy(update={"connection": ssh_connection(sshd)})
        targets[name] = target
    try:
        for target in targets.values():
            start_current(host, target)
        servers = {name: t.current.port for name, t in targets.items()}
        with haproxy(servers, tmp_path / "haproxy") as proxy:
            balancer = LoadBalancer(socket=proxy.socket_path, drain_timeout_s=60, up_timeout_s=60)
            api = HAProxyAPI(balancer)
            for name in NAMES:
                api.wait_up(name, 10)
            before = {name: find_service(host, t.current.port) for name, t in targets.items()}
            yield FleetBed(targets, api, proxy.url, balancer, before)
    finally:
        for target in targets.values():
            stop_all(host, target)


def run_under_load(bed: FleetBed, tmp_path: Path, wheel: str, fleet: Fleet, **params: object):
    with SteadyLoad(bed.url, TINY_REQUEST) as load:
        state = deploy_fleet(
            fleet=fleet, wheel=wheel, runs_dir=str(tmp_path / "runs"), return_state=True, **params
        )
    outcome = state.result(raise_on_failure=False)
    run_dir = Path(outcome.run_dir)
    summary = FleetSummary.model_validate_json((run_dir / "summary.json").read_text())
    assert load.failed == 0, load.failures[:5]
    assert load.requests >= 20, load.summary()
    return state, summary, (run_dir / "report.md").read_text(), load


def answers_legacy(bed: FleetBed, name: str) -> bool:
    return is_legacy(current_answers(LocalHost(), bed.targets[name].current))


def model_of(bed: FleetBed, name: str) -> str | None:
    health = current_answers(LocalHost(), bed.targets[name].current)
    return health.get("model") if health else None


def test_fleet_rollout_upgrades_every_host_without_a_failed_request(
    prefect_api: None, bed: FleetBed, wheel: str, tmp_path: Path
) -> None:
    fleet = bed.fleet(canary=1, wave_size=2, max_unavailable=2)
    state, summary, report, load = run_under_load(bed, tmp_path, wheel, fleet)

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
    assert events.index("analysis of canary") < events.index("h2: drain")
    for name in NAMES:
        assert f"| {name} ({name}) |" in report and f"**release #1: tiny-sdxl {summary.release_id}" in report
    assert "## Timeline" in report and "analysis of canary" in report

    # A rerun resumes from what the hosts record: every host already runs this release, none is touched.
    serving = {name: bed.serving(name) for name in NAMES}
    with SteadyLoad(bed.url, TINY_REQUEST) as again_load:
        again = deploy_fleet(fleet=fleet, wheel=wheel, runs_dir=str(tmp_path / "runs2"), return_state=True)
    assert again.is_completed() and again_load.failed == 0
    resumed = again.result()
    assert [h.outcome for h in resumed.hosts] == ["already upgraded"] * 3
    assert {name: bed.serving(name) for name in NAMES} == serving


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
    from flows.errors import FleetFileError
    from flows.fleet.target import load_fleet

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


def test_deploy_fleet_command_names_the_bad_field(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sdxl_deploy.cli import app

    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("hosts: []\nload_balancer: {socket: /run/haproxy.sock}\n")
    result = CliRunner().invoke(app, ["deploy-fleet", str(fleet)], env={"COLUMNS": "400"})
    assert result.exit_code == 2
    assert "hosts: List should have at least 1 item" in " ".join(result.output.split())


def test_a_person_promotes_the_canary_then_aborts_the_next_wave(
    prefect_api: None, bed: FleetBed, wheel: str, tmp_path: Path
) -> None:
    """`rollout.pause_after: every wave`: the run pauses in Prefect after each passed step. The person
    promotes the canary, then fails wave 1 by hand: both upgraded hosts are rolled back, h3 never touched."""
    fleet = bed.fleet(canary=1, pause_after="every wave", approval_timeout_s=300)
    person = Person(
        {"decision": "promote", "note": "canary looks fine"},
        {"decision": "abort", "note": "app team: hold the rollout"},
    )
    with tags(person.tag):  # a missed resume aborts in 5 min, inside the test's time
        state, summary, report, _load = run_under_load(bed, tmp_path, wheel, fleet)
    person.join(timeout=5)

    assert person.error is None, person.error
    first, second = person.descriptions
    assert "paused after the canary" in first and "Still on the old release: h2, h3" in first
    assert "On the new release, serving live traffic now: h1, h2" in second and "wave 2" in second
    assert state.is_failed() and summary.aborted == "wave 1 aborted by person (app team: hold the rollout)"
    assert [a.verdict for a in summary.analyses] == [
        "pass",
        "pass",
    ]  # the person, not the analysis, stopped it
    events = [e.event for e in summary.timeline]
    assert events.index("decision after the canary") < events.index("h2: drain")
    assert "decision after wave 1" in events and "h3: drain" not in events
    assert {h.name: h.outcome for h in summary.hosts} == {
        "h1": "rolled back",
        "h2": "rolled back",
        "h3": "not reached",
    }
    assert all(answers_legacy(bed, name) for name in NAMES)
    assert bed.serving("h3") == bed.before["h3"]
    assert all(s.status == "UP" for s in bed.api.stats().values())
    assert "promote by person" in report and "abort by person" in report


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
    from flows.fleet.demo import run_fleet_demo

    result = run_fleet_demo(hosts=3, runs_dir=str(tmp_path / "runs"))

    fleet = result.summary["fleet"]
    assert result.summary["status"] == "completed", result.summary["message"]
    assert [h["outcome"] for h in fleet["hosts"]] == ["upgraded"] * 3
    assert all(h["release_after"].startswith("release #1: tiny-sdxl") for h in fleet["hosts"])
    assert fleet["requests"] >= 10 and fleet["failed_requests"] == 0, fleet["failures"]
    assert len(result.stopped) == 3  # each host's new service, by its PID
