"""The deploy's run record and its deploy state on the host change together (`flows/record/deploy_record.py`),
each change recovery needs written to the host when it happens; a `deploy-state.json` written before is read."""

from __future__ import annotations

import json
from pathlib import Path

from flows.box.deploy_state import interrupted_deploy, load_state
from flows.box.hosts import LocalHost
from flows.config.target import NewService, Target
from flows.evidence.results import ProcessInfo
from flows.record.deploy_record import DeployRecord

OLD = ProcessInfo(pid=11, start_ticks=100, cmdline="python working-sd-api.py 7860", group_leader=True)
NEW = ProcessInfo(
    pid=22, start_ticks=200, cmdline="sh supervise.sh 3 python -m sdxl_deploy.cli serve", group_leader=True
)


def _target(tmp_path: Path) -> Target:
    return Target(new=NewService(install_dir=str(tmp_path / "box")))


def test_each_change_is_in_both_records_at_once(tmp_path: Path) -> None:
    host, target = LocalHost(), _target(tmp_path)
    (tmp_path / "box").mkdir()
    run = DeployRecord("deploy-sdxl", target, tmp_path / "runs")
    with run.stage("preflight"):  # before begin(): nothing is written to the host
        pass
    assert load_state(host, target) is None
    run.begin(host, target, old_process=OLD, previous_release=None, mode="staged")
    assert load_state(host, target).stage == "backup"
    with run.stage("backup"):
        run.backed_up("/backups/sd15-1")
    on_host = load_state(host, target)
    assert on_host.backup_dir == run.summary.backup_dir == "/backups/sd15-1"
    with run.stage("ship"):
        run.shipped("0.1.0-abc")
    assert load_state(host, target).release_id == run.summary.release_id == "0.1.0-abc"
    with run.stage("start_staged"):
        run.started(NEW, 1234)
    on_host = load_state(host, target)
    assert (on_host.stage, on_host.new_process, on_host.new_log_offset) == ("start_staged", NEW, 1234)
    with run.stage("cutover", inject_at_start=False):
        run.cutting_over()
        assert load_state(host, target).cut_over  # before the signal: an interruption puts the old one back
    assert interrupted_deploy(host, target) is not None
    run.deployed()
    on_host = load_state(host, target)
    assert (on_host.status, on_host.stage) == ("deployed", "done") and interrupted_deploy(
        host, target
    ) is None
    saved = json.loads(next((tmp_path / "runs").glob("*-deploy-sdxl/summary.json")).read_text())
    assert saved["backup_dir"] == "/backups/sd15-1" and saved["release_id"] == "0.1.0-abc"


def test_a_failed_deploy_says_on_the_host_whether_it_rolled_back(tmp_path: Path) -> None:
    host, target = LocalHost(), _target(tmp_path)
    (tmp_path / "box").mkdir()
    run = DeployRecord("deploy-sdxl", target, tmp_path / "runs")
    run.ended_failed()  # failed in preflight: no state on the host, none written
    assert load_state(host, target) is None
    run.begin(host, target, old_process=OLD, previous_release=3, mode="stop-first")
    run.summary.rolled_back = True
    run.ended_failed()
    assert load_state(host, target).status == "rolled_back"


def test_a_deploy_state_written_before_is_read(tmp_path: Path) -> None:
    host, target = LocalHost(), _target(tmp_path)
    (tmp_path / "box").mkdir()
    (tmp_path / "box" / "deploy-state.json").write_text(
        json.dumps(
            {
                "run_id": "20261207-222939-deploy-sdxl",
                "stage": "benchmark",
                "status": "in_progress",
                "backup_dir": "/srv/box/backups/sd15-20261207-222941",
                "release_id": "0.1.0-e25225d487ee",
                "previous_release": None,
                "old_process": OLD.model_dump(),
                "new_process": NEW.model_dump(),
                "new_log_offset": 0,
                "mode": "staged",
                "cut_over": False,
                "updated_at": "2026-12-07T22:29:53+00:00",
            }
        )
    )
    interrupted = interrupted_deploy(host, target)
    assert interrupted is not None and interrupted.new_process == NEW and interrupted.mode == "staged"
