"""Releases recorded on the box: a rollback returns to the release that served before the failed deploy
(not to the SD1.5 service replaced long ago), `rollback-sdxl` after two deploys returns to the first, and
`sdxl-deploy releases` lists them. Real deploys of real tiny models on the local "box"."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.box.deploy_state import DeployState, load_state, save_state
from flows.box.hosts import LocalHost
from flows.box.procs import find_service, is_running, process_info, start_detached, stop_process
from flows.box.releases import (
    get_release,
    load_releases,
    record_release,
    release_of,
    releases_file,
    serving_now,
)
from flows.box.supervisor import Launch
from flows.config.target import Target
from flows.errors import ReleaseError
from flows.runbooks.rollback import rollback_sdxl
from flows.runbooks.runbook import deploy_sdxl
from flows.stages.backup import backup_current
from flows.stages.preflight import inspect_current
from flows.stages.rollback import current_answers, roll_back
from sdxl_deploy.cli import app
from tests.support.flows import fast, is_legacy, legacy_target, summary_of


def serving_model(host: LocalHost, target: Target) -> tuple[str, str]:
    """(/health model, command line of the process serving the port)."""
    health = current_answers(host, target.current)
    assert health is not None, "nothing answers on the port"
    process = find_service(host, target.current.port)
    assert process is not None
    assert health.model is not None
    return health.model, process.cmdline


# --- the record itself (no deploy) ------------------------------------------------------------------


def test_releases_are_numbered_matched_by_process_and_hold_no_secret(tmp_path: Path, monkeypatch) -> None:
    host = LocalHost()
    target = legacy_target(tmp_path / "box", 7999)
    monkeypatch.setenv("RELEASE_TEST_KEY", "s3cret-value")
    launch = Launch(
        argv=["/opt/py/bin/python", "-m", "sdxl_deploy.cli", "serve", "--model", "tiny-sdxl"],
        workdir=str(tmp_path),
        env={"HF_HOME": "/data/hf"},
        secret_env={"SDXL_API_KEY": "env:RELEASE_TEST_KEY"},
        install_dir=target.new.install_dir,
        log_file=str(tmp_path / "s.log"),
        pid_file=str(tmp_path / "s.pid"),
    )
    sleeper = start_detached(
        host,
        ["sleep", "60"],
        workdir=str(tmp_path),
        log_file=str(tmp_path / "x.log"),
        pid_file=str(tmp_path / "x.pid"),
    )
    try:
        first = record_release(
            host,
            target,
            release_id="0.1-aaa",
            release_path="/r/a",
            launch=launch,
            process=sleeper,
            run_id="run-1",
        )
        other = sleeper.model_copy(update={"start_ticks": sleeper.start_ticks + 1})  # same PID, reused
        second = record_release(
            host,
            target,
            release_id="0.1-bbb",
            release_path="/r/b",
            launch=launch,
            process=other,
            run_id="run-2",
        )
        assert (first.id, second.id) == (1, 2) and first.python == "/opt/py/bin/python"
        assert [r.release_id for r in load_releases(host, target)] == ["0.1-aaa", "0.1-bbb"]
        # The running process is release 1's (same PID and start time), not release 2's (start time differs).
        assert release_of(host, target, process_info(host, sleeper.pid)).id == 1
        assert serving_now(host, first) and not serving_now(host, second)
        assert get_release(host, target, 2).run_id == "run-2"
        with pytest.raises(ReleaseError, match=r"release #7 is not recorded .*recorded: #1, #2"):
            get_release(host, target, 7)
        text = Path(releases_file(target)).read_text()
        assert "env:RELEASE_TEST_KEY" in text and "s3cret-value" not in text
        assert oct(Path(releases_file(target)).stat().st_mode & 0o777) == "0o600"
    finally:
        stop_process(host, sleeper, 5)
    assert release_of(host, target, None) is None
    assert not serving_now(host, first)


def test_a_release_that_cannot_start_again_falls_back_to_the_backup(
    legacy: tuple[LocalHost, Target], tmp_path: Path
) -> None:
    """The release that served before crashes at every start: the rollback stops it again and puts the
    current service back from this deploy's backup, saying so (something must answer)."""
    host, target = legacy
    current = inspect_current.fn(host, target, baseline=False)
    backup = backup_current.fn(host, target, current.process)
    crashing = Launch(
        argv=[sys.executable, "-c", "raise SystemExit(3)"],
        workdir=str(tmp_path),
        install_dir=target.new.install_dir,
        log_file=target.new.log_file,
        pid_file=target.new.pid_file,
    )
    record = record_release(
        host,
        target,
        release_id="0.1-ccc",
        release_path="/r/c",
        launch=crashing,
        process=current.process,
        run_id="r1",
    )
    save_state(
        host,
        target,
        DeployState(
            run_id="r2",
            stage="warmup",
            backup_dir=backup.path,
            old_process=current.process,
            previous_release=record.id,
        ),
    )
    stop_process(host, current.process, 10)
    result = roll_back.fn(host, target)
    assert (
        result.restarted.startswith("could not start release #1")
        and "exited while starting" in result.restarted
    )
    assert "from " + backup.path in result.restarted and result.release is None
    assert is_legacy(current_answers(host, target.current)) and result.answering
    assert load_state(host, target).status == "rolled_back"


# --- real deploys -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_failed_second_upgrade_rolls_back_to_the_release_that_served(
    prefect_api: None, legacy: tuple[LocalHost, Target], wheel: str, tmp_path: Path
) -> None:
    host, target = legacy
    runs = str(tmp_path / "runs")
    first = deploy_sdxl(target=fast(target), wheel=wheel, runs_dir=runs, return_state=True)
    assert first.is_completed(), first.message
    release_a = load_releases(host, target)
    assert [(r.id, r.model) for r in release_a] == [(1, "tiny-sdxl")]
    assert serving_model(host, target)[0] == "tiny-sdxl"

    # New settings (another model), and the upgrade fails once the new service has started.
    second = deploy_sdxl(
        target=fast(target, model="tiny-sd15"),
        fail_at="warmup",
        wheel=wheel,
        runs_dir=runs,
        return_state=True,
    )
    assert second.is_failed() and "rolled back: restarted release #1 (tiny-sdxl" in second.message
    summary = summary_of(second)
    assert summary["rolled_back"] and summary["old_service_answering"] is True
    model, cmdline = serving_model(host, target)
    assert model == "tiny-sdxl" and "--model tiny-sdxl" in cmdline and "tiny-sd15" not in cmdline
    assert not is_legacy(current_answers(host, target.current))  # not the SD1.5 service
    assert load_state(host, target).previous_release == 1
    after = load_releases(host, target)
    assert [r.id for r in after] == [1]  # the failed deploy recorded nothing
    assert after[0].process != release_a[0].process and serving_now(host, after[0])
    assert find_service(host, target.current.port) == after[0].process


@pytest.mark.slow
def test_rollback_after_two_deploys_returns_to_the_first_and_releases_lists_them(
    prefect_api: None, legacy: tuple[LocalHost, Target], wheel: str, tmp_path: Path
) -> None:
    host, target = legacy
    runs = str(tmp_path / "runs")
    for model in ("tiny-sdxl", "tiny-sd15"):
        state = deploy_sdxl(target=fast(target, model=model), wheel=wheel, runs_dir=runs, return_state=True)
        assert state.is_completed(), state.message
    assert serving_model(host, target)[0] == "tiny-sd15"
    first, second = load_releases(host, target)
    assert (first.model, second.model) == ("tiny-sdxl", "tiny-sd15") and not serving_now(host, first)

    target_file = tmp_path / "target.json"
    target_file.write_text(target.model_dump_json())
    listed = CliRunner().invoke(app, ["releases", "--target", str(target_file)], env={"COLUMNS": "300"})
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[1]: line for line in listed.output.splitlines() if line.strip().startswith("│ #")}
    assert "tiny-sd15" in rows["#2"] and "yes" in rows["#2"]
    assert "tiny-sdxl" in rows["#1"] and "yes" not in rows["#1"]

    rolled = rollback_sdxl(target=target, runs_dir=runs, return_state=True)
    assert rolled.is_completed(), rolled.message
    assert "restarted release #1 (tiny-sdxl" in summary_of(rolled)["message"]
    model, cmdline = serving_model(host, target)
    assert model == "tiny-sdxl" and "--model tiny-sdxl" in cmdline
    assert not is_running(host, second.process)
    assert serving_now(host, get_release(host, target, 1))

    again = rollback_sdxl(target=target, runs_dir=runs, return_state=True)  # idempotent
    assert again.is_completed() and "release #1 (tiny-sdxl" in summary_of(again)["message"]
    assert "already answers" in summary_of(again)["message"]
    listed = CliRunner().invoke(app, ["releases", "--target", str(target_file)], env={"COLUMNS": "300"})
    rows = {line.split()[1]: line for line in listed.output.splitlines() if line.strip().startswith("│ #")}
    assert "yes" in rows["#1"] and "yes" not in rows["#2"]
    summary = json.loads((Path(summary_of(again)["run_dir"]) / "summary.json").read_text())
    assert summary["facts"]["rollback"]["release"] == 1
