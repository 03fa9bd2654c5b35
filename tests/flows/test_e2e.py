"""The runbook end to end: real Prefect (test harness), real services, the local host and a real sshd.

The "current" service is either tiny-sd15 (the demo) or the stand-in of the user's foreign SD1.5 script
(`tests/support/legacy_api.py`, starts in a blink); the new one is always a real tiny-sdxl `serve` process.
Every test stops what it started, by PID.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from bench.launch import free_port
from flows.box.deploy_state import DeployState, load_state, save_state
from flows.box.hosts import LocalHost, open_host
from flows.box.procs import find_service, is_running, listener_pids
from flows.config.target import Target
from flows.runbooks.commands import print_summary
from flows.runbooks.demo import run_demo, start_current, stop_all
from flows.runbooks.plan import STAGED_STAGES, STOP_FIRST_STAGES, touches_old_service
from flows.runbooks.rollback import rollback_sdxl
from flows.runbooks.runbook import deploy_sdxl
from flows.runbooks.verify import verify_sdxl
from flows.stages.backup import backup_current, list_backups, verify_backup
from flows.stages.deploy import ship_release, start_new_service, stop_service
from flows.stages.preflight import inspect_current
from flows.stages.rollback import current_answers, new_service_process
from tests.support.flows import cli_console, is_legacy, legacy_target, ssh_connection, summary_of
from tests.support.sshd import SSHServer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fault_counts")]


def test_demo_upgrades_tiny_sd15_to_tiny_sdxl(prefect_api: None, tmp_path: Path) -> None:
    result = run_demo(runs_dir=str(tmp_path / "runs"))
    summary = json.loads(result.summary_path.read_text())
    assert summary["status"] == "completed", summary["message"]
    # Both tiny services fit on a CPU: the demo stages the new one beside the old and cuts over.
    assert summary["facts"]["start"]["mode"] == "staged"
    assert [s["name"] for s in summary["stages"]] == list(STAGED_STAGES)
    assert all(s["status"] == "completed" for s in summary["stages"])
    gates = {g["criterion"]: g for g in summary["gates"]}
    assert {name: gate["verdict"] for name, gate in gates.items() if name != "quality"} == {
        "model_loaded": "pass",
        "resolution": "pass",
        "p95_seconds": "pass",
        "valid_image": "pass",
        "tunnel": "n/a",
        "app_request": "pass",
        "no_cuda_errors": "pass",
        "peak_vram_gb": "n/a",
        "max_downtime_s": "pass",  # staged: enforced, judged again after the cut-over
    }
    downtime = summary["downtime"]
    assert downtime["mode"] == "staged" and downtime["probes"] > 0
    assert downtime["failed_requests"] == 0 and downtime["longest_outage_s"] <= 2
    # The CLIP comparison ran (tiny-sd15 before the switch, tiny-sdxl after); warn-only, so any verdict.
    assert (
        gates["quality"]["verdict"] in ("pass", "warn", "inconclusive")
        and "CLIP" in gates["quality"]["observed"]
    )
    assert (result.summary_path.parent / "quality" / "evaluation.json").exists()
    assert summary["release_id"] and summary["backup_dir"] and not summary["rolled_back"]
    assert {"summary.json", "report.md", "gates.md", "benchmark.json"} <= {
        p.name for p in result.summary_path.parent.iterdir()
    }
    # The demo left nothing running: the tiny-sdxl service it deployed was stopped by its PID.
    port = int(re.search(r"port (\d+)", summary["current_service"]).group(1))
    assert listener_pids(LocalHost(), port) == []
    assert any("tiny-sdxl" in line for line in result.stopped)


# One stage for each state a stop-first deploy can leave the box in when it fails (every stage takes the same
# failure path, tests/flows/test_rundir.py): no backup yet; backed up and shipped, old untouched; failing as it
# stops the old service; old stopped, new not started; new started; the last stage before the end.
BOX_STATES = ("backup", "prefetch", "stop_current", "start_new", "warmup", "approval")


@pytest.mark.parametrize("stage", BOX_STATES)
def test_injected_failure_leaves_the_old_service_answering(
    prefect_api: None,
    legacy: tuple[LocalHost, Target],
    wheel: str,
    tmp_path: Path,
    stage: str,
    request: pytest.FixtureRequest,
) -> None:
    """And the console as the CLI shows the run (log and summary): the failure once, no traceback. Failing
    to start the new one, the old service is down until the rollback: over SSH there, so the prober's port
    forwards are refused meanwhile, and no paramiko line reaches the console."""
    host, target = legacy
    if stage == "start_new":
        sshd: SSHServer = request.getfixturevalue("sshd")
        target = target.model_copy(update={"connection": ssh_connection(sshd)})
    before = find_service(host, target.current.port)
    with cli_console() as log:
        state = deploy_sdxl(
            target=target, fail_at=stage, wheel=wheel, runs_dir=str(tmp_path / "runs"), return_state=True
        )

    assert state.is_failed()
    assert f"stage '{stage}' failed" in state.message and "fail_at rehearsal" in state.message
    summary = summary_of(state)
    shown = Console(record=True, width=250)
    print_summary(Path(summary["run_dir"]) / "summary.json", shown)
    console = log.getvalue() + shown.export_text()
    assert console.count(f"failure injected at stage {stage!r}") == 1, console
    assert "Traceback" not in console and "paramiko" not in console and "Secsh" not in console, console
    if stage == "start_new":  # the outage was there: the run log keeps every refused channel
        kept = (Path(summary["run_dir"]) / "run.log").read_text()
        assert "open FAILED" in kept and summary["downtime"]["failed_requests"] > 0
    assert summary["failed_stage"] == stage and summary["old_service_answering"] is True
    assert summary["rolled_back"] == touches_old_service("stop-first", stage)
    assert is_legacy(current_answers(host, target.current))
    if not touches_old_service("stop-first", stage):
        assert find_service(host, target.current.port) == before  # never touched
    new = new_service_process(host, target)
    assert new is None or not is_running(host, new)
    backups = list_backups(host, target.paths.backup_root, "sd15")
    if STOP_FIRST_STAGES.index(stage) > STOP_FIRST_STAGES.index("backup"):
        assert backups == [summary["backup_dir"]]
        verify_backup(host, summary["backup_dir"])  # intact: every file matches its manifest
    else:
        assert backups == []


def test_failed_gate_rolls_back(
    prefect_api: None, legacy: tuple[LocalHost, Target], wheel: str, tmp_path: Path
) -> None:
    host, target = legacy
    strict = [
        c.model_copy(update={"threshold": 1e-6}) if c.name == "p95_seconds" else c for c in target.criteria
    ]
    state = deploy_sdxl(
        target=target.model_copy(update={"criteria": strict}),
        wheel=wheel,
        runs_dir=str(tmp_path / "runs"),
        return_state=True,
    )
    assert (
        state.is_failed()
        and "stage 'gate' failed: GateFailed: enforced success criteria failed: p95_seconds" in state.message
    )
    summary = summary_of(state)
    assert summary["rolled_back"] and summary["old_service_answering"]
    assert {g["criterion"]: g["verdict"] for g in summary["gates"]}["p95_seconds"] == "fail"
    assert is_legacy(current_answers(host, target.current))


def test_dry_run_changes_nothing(prefect_api: None, legacy: tuple[LocalHost, Target], tmp_path: Path) -> None:
    host, target = legacy
    box = Path(target.new.install_dir).parent

    def files() -> dict[str, float]:
        return {str(p): p.stat().st_mtime for p in box.rglob("*") if p.is_file() and p.name != "sd api.log"}

    before, process = files(), find_service(host, target.current.port)
    state = deploy_sdxl(target=target, dry_run=True, runs_dir=str(tmp_path / "runs"), return_state=True)
    assert state.is_completed()
    summary = summary_of(state)
    assert summary["status"] == "dry-run" and [s["name"] for s in summary["stages"]] == ["preflight"]
    plan = (Path(summary["run_dir"]) / "plan.md").read_text()
    assert "stop the current service PID" in plan and "tiny-sdxl" in plan
    assert files() == before and find_service(host, target.current.port) == process
    assert (
        not Path(target.paths.backup_root).exists() and not Path(target.new.install_dir, "releases").exists()
    )


def test_preflight_refuses_when_the_current_service_is_down(prefect_api: None, tmp_path: Path) -> None:
    target = legacy_target(tmp_path / "box", free_port())  # never started
    state = deploy_sdxl(target=target, runs_dir=str(tmp_path / "runs"), return_state=True)
    assert state.is_failed() and "stage 'preflight' failed: PreflightRefused" in state.message
    assert f"no process listens on port {target.current.port}" in state.message
    assert not Path(target.paths.backup_root).exists()


def test_rollback_after_an_interrupted_deploy_is_safe_twice(
    prefect_api: None, legacy: tuple[LocalHost, Target], wheel: str, tmp_path: Path
) -> None:
    """A deploy killed right after starting the new service (old one stopped, no rollback ran)."""
    host, target = legacy
    current = inspect_current.fn(host, target, baseline=False)
    state = save_state(
        host, target, DeployState(run_id="interrupted", stage="backup", old_process=current.process)
    )
    state.backup_dir = backup_current.fn(host, target, current.process).path
    release = ship_release.fn(host, target, Path(wheel))
    stop_service.fn(host, current.process, target.current.port, 10)
    started = start_new_service.fn(host, target, release)
    state.stage, state.new_process = "warmup", started.process
    save_state(host, target, state)
    assert current_answers(host, target.current) is None

    first = rollback_sdxl(target=target, runs_dir=str(tmp_path / "runs"), return_state=True)
    assert first.is_completed(), first.message
    assert "restarted" in summary_of(first)["message"] and not is_running(host, started.process)
    assert is_legacy(current_answers(host, target.current))
    second = rollback_sdxl(target=target, runs_dir=str(tmp_path / "runs"), return_state=True)
    assert second.is_completed() and "already answers" in summary_of(second)["message"]
    assert load_state(host, target).status == "rolled_back"
    verify_backup(host, state.backup_dir)


# --- over SSH -------------------------------------------------------------------------------------


def test_ssh_staged_deploy_tunnel_verify_and_rollback(
    prefect_api: None, sshd: SSHServer, wheel: str, tmp_path: Path
) -> None:
    local = LocalHost()
    target = legacy_target(tmp_path / "ssh box 'q'", free_port(), start_mode="staged")
    new = target.new.model_copy(update={"env": {**target.new.env, "HF_HUB_OFFLINE": "1"}})
    target = target.model_copy(update={"connection": ssh_connection(sshd), "new": new})
    try:
        with open_host(target.connection) as host:
            start_current(host, target)
        runs = str(tmp_path / "runs")
        deployed = deploy_sdxl(target=target, wheel=wheel, runs_dir=runs, return_state=True)
        assert deployed.is_completed(), deployed.message
        summary = summary_of(deployed)
        gates = {g["criterion"]: g for g in summary["gates"]}
        assert gates["tunnel"]["verdict"] == "pass" and "local port forward" in gates["tunnel"]["observed"]
        assert gates["app_request"]["verdict"] == "pass"
        answer = current_answers(local, target.current)
        assert answer is not None and answer.model == "tiny-sdxl"
        # Before the cut-over the app's way (a port forward to the app's port) reached the old service; after
        # it, the new one. The prober, through its own port forward, saw no failed request at all.
        facts = summary["facts"]
        assert (
            facts["app_path_before_cutover"]["through_tunnel"]
            and facts["app_path_before_cutover"]["generate_ok"]
        )
        assert (
            facts["app_path_after_cutover"]["through_tunnel"]
            and facts["app_path_after_cutover"]["generate_ok"]
        )
        downtime = summary["downtime"]
        assert downtime["mode"] == "staged" and downtime["probes"] > 0 and not downtime["still_down"]
        assert downtime["failed_requests"] == 0 and downtime["longest_outage_s"] < 2

        verified = verify_sdxl(target=target, runs_dir=runs, return_state=True)
        assert verified.is_completed(), verified.message

        rolled = rollback_sdxl(target=target, runs_dir=runs, return_state=True)
        assert rolled.is_completed(), rolled.message
        assert is_legacy(current_answers(local, target.current))
        verify_backup(local, summary["backup_dir"])
    finally:
        stop_all(local, target)


def test_a_changed_host_key_is_refused(prefect_api: None, sshd: SSHServer, tmp_path: Path) -> None:
    key = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    known_hosts = tmp_path / "known_hosts"
    kind, blob = key.with_suffix(".pub").read_text().split()[:2]
    known_hosts.write_text(f"{sshd.host_id} {kind} {blob}\n")  # a key the server does not have
    target = legacy_target(tmp_path / "box", free_port())
    target = target.model_copy(update={"connection": ssh_connection(sshd, str(known_hosts))})
    state = deploy_sdxl(target=target, runs_dir=str(tmp_path / "runs"), return_state=True)
    assert (
        state.is_failed() and "stage 'preflight' failed: HostKeyRejected: HOST KEY CHANGED" in state.message
    )
    assert not Path(target.paths.backup_root).exists()
