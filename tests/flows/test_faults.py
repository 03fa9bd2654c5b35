"""Deploy under faults: every test injects one real fault and checks that the old or the new service
answers afterwards (never none), that no backup is lost, and that the run ends with a clear message.

Faults are real: the SSH link is cut by killing the per-connection sshd processes of a private OpenSSH
server, the control process is SIGKILLed, the disk is a 1 MB tmpfs, the new service really crashes,
really fails to load, really stays unready. The same counts feed docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.settings import get_current_settings
from pydantic import ValidationError

from bench.launch import free_port
from flows.box.deploy_state import load_state
from flows.box.hosts import LocalHost, open_host, q
from flows.box.lock import acquire_lock, lock_path, new_owner, read_lock, release_lock
from flows.box.procs import (
    find_service,
    group_members,
    is_running,
    listener_pids,
    pid_from_file,
    process_info,
    start_detached,
    stop_process,
)
from flows.box.supervisor import prepare_supervisor, read_restarts, supervisor_paths
from flows.config.secrets import api_key, service_env
from flows.config.target import NewService, Target
from flows.errors import HostLocked, SecretUnavailable
from flows.runbooks.demo import TINY_REQUEST, start_current, stop_all
from flows.runbooks.rollback import rollback_sdxl
from flows.runbooks.runbook import deploy_sdxl
from flows.runbooks.verify import verify_sdxl
from flows.stages.backup import backup_current, list_backups, verify_backup
from flows.stages.rollback import current_answers, new_service_process
from service.client import ServiceClient
from tests.support.flows import fast, is_legacy, legacy_target, ssh_connection, summary_of
from tests.support.sshd import SSHServer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def mode(path: str | Path) -> int:
    return stat.S_IMODE(Path(path).stat().st_mode)


def assert_old_service_back(host: LocalHost, target: Target, summary: dict, stage: str) -> None:
    """The old service answers, the new one is gone, the backup verifies, the lock is released."""
    assert summary["status"] == "failed" and summary["failed_stage"] == stage, summary["message"]
    assert summary["old_service_answering"] is True
    assert is_legacy(current_answers(host, target.current))
    new = new_service_process(host, target)
    assert new is None or not is_running(host, new)
    if summary["backup_dir"]:
        verify_backup(host, summary["backup_dir"])
    assert read_lock(host, target.new.install_dir) is None


@contextmanager
def cut_link_when(
    condition: Callable[[], bool], server: SSHServer, timeout_s: float = 180
) -> Iterator[list[int]]:
    """Kill every SSH connection to `server` the moment `condition()` holds; yields the killed sshd PIDs."""
    killed: list[int] = []
    done = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while not done.is_set() and time.monotonic() < deadline:
            if condition():
                killed.extend(server.drop_connections())
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield killed
    finally:
        done.set()
        watcher.join()


def command_lines() -> list[bytes]:
    """Every process's command line on this machine (the box, here)."""
    lines = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(path.read_bytes())
        except OSError:
            continue
    return lines


def stage_is(state_file: str, stage: str) -> Callable[[], bool]:
    """True once the deploy recorded on the host that it reached `stage`."""

    def check() -> bool:
        try:
            return json.loads(Path(state_file).read_text())["stage"] == stage
        except (OSError, ValueError, KeyError):
            return False

    return check


# --- one deploy at a time ---------------------------------------------------------------------------


def test_a_second_deploy_is_refused_and_a_stale_lock_is_cleared(
    prefect_api: None, legacy: tuple[LocalHost, Target], tmp_path: Path, fault_counts: dict[str, int]
) -> None:
    host, target = legacy
    install, runs = target.new.install_dir, str(tmp_path / "runs")

    # Someone's deploy runs (a live control process on this machine): refused, even with force_unlock.
    holder = new_owner("deploy-sdxl", "20261127-101500-deploy-sdxl")
    acquire_lock(host, install, holder)
    assert mode(lock_path(install)) == 0o700 and mode(f"{lock_path(install)}/owner.json") == 0o600
    refused = deploy_sdxl(target=target, dry_run=True, force_unlock=True, runs_dir=runs, return_state=True)
    assert refused.is_failed() and "stage 'preflight' failed: HostLocked" in refused.message
    assert f"is locked by deploy-sdxl run 20261127-101500-deploy-sdxl of {holder.who}" in refused.message
    assert f"since {holder.since}" in refused.message and "wait for it to finish" in refused.message
    assert read_lock(host, install).token == holder.token  # untouched
    release_lock(host, install, holder)

    # Its control process was killed: the lock is stale and is cleared by itself.
    gone = subprocess.Popen(["true"])
    gone.wait()
    acquire_lock(host, install, holder.model_copy(update={"token": "dead", "control_pid": gone.pid}))
    cleared = deploy_sdxl(target=target, dry_run=True, runs_dir=runs, return_state=True)
    assert cleared.is_completed(), cleared.message
    assert read_lock(host, install) is None  # and the dry run released its own lock

    # Taken from another machine (cannot be checked from here): refused unless force_unlock.
    remote = holder.model_copy(
        update={"token": "remote", "control_host": "ana-laptop", "who": "ana@ana-laptop", "flow_run_id": None}
    )
    acquire_lock(host, install, remote)
    refused = deploy_sdxl(target=target, dry_run=True, runs_dir=runs, return_state=True)
    assert refused.is_failed() and "locked by deploy-sdxl run" in refused.message
    assert "ana@ana-laptop" in refused.message and "force_unlock=true" in refused.message
    rollback_refused = rollback_sdxl(target=target, runs_dir=runs, return_state=True)
    assert rollback_refused.is_failed() and "HostLocked" in rollback_refused.message
    forced = deploy_sdxl(target=target, dry_run=True, force_unlock=True, runs_dir=runs, return_state=True)
    assert forced.is_completed(), forced.message
    assert read_lock(host, install) is None
    assert is_legacy(current_answers(host, target.current))
    fault_counts["faults"] += 3  # a live holder, a dead one, one that cannot be checked


def _race_for_lock(host: LocalHost, install: str, names: tuple[str, ...]) -> tuple[list, list[str]]:
    """Every name tries to take the lock at the same instant; (winning owners, refusals)."""
    start, winners, losers = threading.Barrier(len(names)), [], []

    def take(name: str) -> None:
        owner = new_owner("deploy-sdxl", name)
        start.wait()
        try:
            winners.append(acquire_lock(host, install, owner))
        except HostLocked as exc:
            losers.append(str(exc))

    threads = [threading.Thread(target=take, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return winners, losers


def test_two_deploys_racing_for_the_lock_never_both_win(tmp_path: Path, fault_counts: dict[str, int]) -> None:
    host, install = LocalHost(), str(tmp_path / "install")
    for round_ in range(10):
        winners, losers = _race_for_lock(host, install, (f"alice-{round_}", f"bob-{round_}"))
        assert len(winners) == 1 and len(losers) == 1, (winners, losers)
        assert read_lock(host, install).token == winners[0].token
        release_lock(host, install, winners[0])
    assert sorted(p.name for p in Path(install).iterdir()) == []  # no temporary lock folders left
    fault_counts["faults"] += 10


# --- the SSH link drops ----------------------------------------------------------------------------


def test_link_cut_during_upload_changes_nothing(
    prefect_api: None, private_sshd: SSHServer, wheel: str, tmp_path: Path, fault_counts: dict[str, int]
) -> None:
    local = LocalHost()
    target = fast(legacy_target(tmp_path / "box", free_port()))
    target = target.model_copy(update={"connection": ssh_connection(private_sshd)})
    big = tmp_path / "big" / Path(wheel).name  # the real wheel plus 48 MB, so the upload takes a while
    big.parent.mkdir()
    big.write_bytes(Path(wheel).read_bytes())
    with zipfile.ZipFile(big, "a", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("sdxl_deploy/padding.bin", os.urandom(48 * 1024 * 1024))
    releases = Path(target.new.install_dir) / "releases"
    try:
        with open_host(target.connection) as host:
            start_current(host, target)
        before = find_service(local, target.current.port)
        with cut_link_when(lambda: any(releases.glob("*/*.whl.part")), private_sshd) as killed:
            state = deploy_sdxl(
                target=target, wheel=str(big), runs_dir=str(tmp_path / "runs"), return_state=True
            )
        assert killed, "the link was never cut"
        assert state.is_failed() and "stage 'ship' failed" in state.message and "uploading" in state.message
        summary = summary_of(state)
        assert not summary["rolled_back"] and summary["facts"]["ssh_reconnects"] >= 1
        assert_old_service_back(local, target, summary, "ship")
        assert find_service(local, target.current.port) == before  # never touched
        assert not list(releases.glob("*/venv")) and not list(releases.glob("*/*.whl"))  # nothing installed
        fault_counts.update(faults=1, backups_verified=1)
    finally:
        stop_all(local, target)


def test_link_cut_during_warmup_is_survived_secrets_stay_private_and_restarts_are_reported(
    prefect_api: None,
    private_sshd: SSHServer,
    wheel: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault_counts: dict[str, int],
) -> None:
    key = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("SDXL_TEST_API_KEY", key)
    local, box = LocalHost(), tmp_path / "ssh box"
    target = legacy_target(box, free_port())
    target = fast(
        target,
        env={**target.new.env, "HF_HUB_OFFLINE": "1"},
        secret_env={"SDXL_API_KEY": "env:SDXL_TEST_API_KEY"},
    )
    target = target.model_copy(update={"connection": ssh_connection(private_sshd)})
    new, runs = target.new, str(tmp_path / "runs")
    try:
        with open_host(target.connection) as host:
            start_current(host, target)
        with cut_link_when(stage_is(new.state_file, "warmup"), private_sshd) as killed:
            deployed = deploy_sdxl(target=target, wheel=wheel, runs_dir=runs, return_state=True)
        assert deployed.is_completed(), deployed.message
        summary = summary_of(deployed)
        assert killed and summary["facts"]["ssh_reconnects"] >= 1  # cut mid warm-up, and survived

        # The key protects the service, and it is nowhere but in the box's private env file.
        url = f"http://127.0.0.1:{new.port}"
        assert httpx.post(f"{url}/generate", json=TINY_REQUEST, timeout=60).status_code == 401
        with ServiceClient(url, api_key=key, timeout=60) as client:
            assert client.generate(**TINY_REQUEST).success
        script, env_file, restarts_file = supervisor_paths(new.install_dir)
        assert mode(env_file) == 0o600 and key in Path(env_file).read_text()
        stored = [p for p in [*Path(runs).rglob("*"), *box.rglob("*")] if p.is_file() and str(p) != env_file]
        assert stored and not [str(p) for p in stored if key.encode() in p.read_bytes()]
        assert not [c for c in command_lines() if key.encode() in c]
        with get_client(sync_client=True) as prefect:
            parameters = prefect.read_flow_run(deployed.state_details.flow_run_id).parameters
        assert key not in json.dumps(parameters, default=str)
        # Private files: install dir, pid file, deploy state, backups.
        assert (
            mode(new.install_dir) == 0o700 and mode(new.pid_file) == 0o600 and mode(new.state_file) == 0o600
        )
        assert mode(target.paths.backup_root) == 0o700 and mode(summary["backup_dir"]) == 0o700

        # The serving process dies (as under the OOM killer): the supervisor restarts it, verify reports it.
        supervisor = process_info(local, pid_from_file(local, new.pid_file))
        serving = listener_pids(local, new.port)
        assert supervisor and serving and supervisor.pid not in serving
        os.kill(serving[0], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with ServiceClient(url, timeout=5) as client:
                if client.ready():
                    break
            time.sleep(0.5)
        assert is_running(local, supervisor) and "restart=1 exit=137" in Path(restarts_file).read_text()
        verified = verify_sdxl(target=target, runs_dir=runs, return_state=True)
        assert verified.is_completed(), verified.message
        checked = summary_of(verified)
        assert checked["facts"]["restarts"]["count"] == 1 and "supervisor: 1 restart(s)" in checked["message"]
        verify_backup(local, summary["backup_dir"])
        fault_counts.update(faults=2, backups_verified=1)
    finally:
        stop_all(local, target)


# --- the control side dies ------------------------------------------------------------------------

KILLED_DEPLOY = """
import sys
from flows.runbooks.runbook import deploy_sdxl
from flows.config.target import Target
deploy_sdxl(target=Target.model_validate_json(sys.argv[1]), wheel=sys.argv[2], runs_dir=sys.argv[3])
"""


def test_control_process_killed_after_the_old_service_stopped(
    prefect_api: None,
    legacy: tuple[LocalHost, Target],
    wheel: str,
    tmp_path: Path,
    fault_counts: dict[str, int],
) -> None:
    host, target = legacy
    target, runs = fast(target), str(tmp_path / "runs")
    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url), "PYTHONPATH": str(REPO)}
    control = subprocess.Popen(
        [sys.executable, "-c", KILLED_DEPLOY, target.model_dump_json(), wheel, runs],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        started = stage_is(target.new.state_file, "start_new")
        deadline = time.monotonic() + 180
        while not started() and control.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert started(), "the deploy never reached start_new"
    finally:
        control.send_signal(signal.SIGKILL)  # the laptop died right after the old service was stopped
        control.wait()
    killed = load_state(host, target)
    assert killed is not None and killed.status == "in_progress" and killed.backup_dir
    assert not is_legacy(current_answers(host, target.current))  # the old service is down
    assert read_lock(host, target.new.install_dir).control_pid == control.pid  # left behind

    # A new deploy finds the state, clears the dead run's lock, restores the old service first.
    again = deploy_sdxl(target=target, wheel=wheel, fail_at="baseline", runs_dir=runs, return_state=True)
    assert again.is_failed() and "stage 'baseline' failed" in again.message
    summary = summary_of(again)
    recovered = summary["facts"]["recovered"]
    assert recovered["run_id"] == killed.run_id and recovered["answering"] is True
    assert_old_service_back(host, target, summary, "baseline")
    verify_backup(host, killed.backup_dir)  # the killed run's backup is intact too
    assert listener_pids(host, target.current.port) == [find_service(host, target.current.port).pid]

    # Running rollback afterwards (twice) is harmless.
    for _ in range(2):
        rolled = rollback_sdxl(target=target, runs_dir=runs, return_state=True)
        assert rolled.is_completed() and "already answers" in summary_of(rolled)["message"]
    assert is_legacy(current_answers(host, target.current))
    fault_counts.update(faults=1, backups_verified=2)


# --- the new service misbehaves -------------------------------------------------------------------

NEW_SERVICE_FAULTS: dict[str, tuple[dict, str]] = {
    "crash_at_start": ({"serve_args": ["--no-such-option"]}, "crashed while loading (exit code 2"),
    "crash_after_ready": (
        {"env_add": {"SDXL_INJECT_FAULT": "crash:1"}},
        "crashed during warm-up request 1 (exit code 70",
    ),
    # a model folder that passes preflight and prefetch (its MODEL.json and model_index.json) but holds no weights
    "model_load_failure": ({"model": "{tmp}/weightless-model"}, "could not load its model"),
    "warmup_timeout": ({"ready_timeout_s": 1}, "was not ready after 1 s"),
}


@pytest.mark.parametrize("fault", NEW_SERVICE_FAULTS)
def test_a_failing_new_service_is_rolled_back(
    prefect_api: None,
    legacy: tuple[LocalHost, Target],
    wheel: str,
    tmp_path: Path,
    fault: str,
    fault_counts: dict[str, int],
) -> None:
    host, target = legacy
    change, expected = NEW_SERVICE_FAULTS[fault]
    change = dict(change)
    if "env_add" in change:
        change["env"] = {**target.new.env, **change.pop("env_add")}
    if "model" in change:
        change["model"] = change["model"].format(tmp=tmp_path)
        built = {"name": "tiny-sdxl", "backend": "sdxl", "generated": True}
        (Path(change["model"]) / "base").mkdir(parents=True)
        (Path(change["model"]) / "MODEL.json").write_text(json.dumps(built))
        (Path(change["model"]) / "base" / "model_index.json").write_text(
            '{"_class_name": "StableDiffusionXLPipeline"}'
        )
    target = fast(target, **change)
    state = deploy_sdxl(target=target, wheel=wheel, runs_dir=str(tmp_path / "runs"), return_state=True)
    assert state.is_failed() and "stage 'warmup' failed: ServiceDidNotStart" in state.message
    assert expected in state.message and "rolled back: restarted" in state.message
    assert state.message.endswith("old service answering")
    summary = summary_of(state)
    assert summary["rolled_back"]
    assert_old_service_back(host, target, summary, "warmup")
    assert load_state(host, target).status == "rolled_back"
    fault_counts.update(faults=1, backups_verified=1)


# --- the disk fills up ----------------------------------------------------------------------------


def test_disk_full_while_backing_up_loses_no_backup(
    prefect_api: None, legacy: tuple[LocalHost, Target], tmp_path: Path, fault_counts: dict[str, int]
) -> None:
    host, target = legacy
    root = Path(target.paths.backup_root)
    root.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 1 MB tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        older = backup_current.fn(host, target, None).path  # fits
        model = Path(target.current.workdir) / "model.ckpt"  # 3 MB more does not
        model.write_bytes(os.urandom(3 * 1024 * 1024))
        current = target.current.model_copy(update={"files": [*target.current.files, str(model)]})
        before = find_service(host, target.current.port)
        state = deploy_sdxl(
            target=fast(target.model_copy(update={"current": current})),
            runs_dir=str(tmp_path / "runs"),
            return_state=True,
        )
        assert state.is_failed() and "stage 'backup' failed: BackupError" in state.message
        assert "No space left on device" in state.message and "partial backup" in state.message
        summary = summary_of(state)
        assert not summary["rolled_back"]
        assert_old_service_back(host, target, summary, "backup")
        assert find_service(host, target.current.port) == before  # never touched
        assert list_backups(host, str(root), "sd15") == [older] and [p.name for p in root.iterdir()] == [
            Path(older).name
        ]
        verify_backup(host, older)
        fault_counts.update(faults=1, backups_verified=1)
    finally:
        subprocess.run(["umount", str(root)], check=False)


# --- the supervisor and the secrets, on their own ------------------------------------------------


def test_the_supervisor_restarts_a_crash_gives_up_on_a_crash_loop_and_stops_with_its_service(
    tmp_path: Path, fault_counts: dict[str, int]
) -> None:
    host, install = LocalHost(), str(tmp_path / "install")
    marker, seen = tmp_path / "crashed-once", tmp_path / "seen-env"
    # Crashes (exit 3) the first time, then runs; it prints the env it got from the private env file.
    flaky = f'echo "$GREETING" > {q(str(seen))}; [ -e {q(str(marker))} ] || {{ touch {q(str(marker))}; exit 3; }}; exec sleep 300'
    files = {"workdir": install, "log_file": f"{install}/svc.log", "pid_file": f"{install}/svc.pid"}
    prefix = prepare_supervisor(host, install, {"GREETING": "it's private"})
    supervisor = start_detached(host, [*prefix, "sh", "-c", flaky], **files)
    deadline = time.monotonic() + 20  # restarted: the record says so and the second child runs
    while time.monotonic() < deadline and not (
        read_restarts(host, install).count and len(group_members(host, supervisor.pid)) >= 2
    ):
        time.sleep(0.1)
    restarts = read_restarts(host, install)
    assert restarts.count == 1 and restarts.last_exit == 3 and not restarts.gave_up
    assert seen.read_text() == "it's private\n" and mode(supervisor_paths(install)[1]) == 0o600
    assert "it's private" not in supervisor.cmdline
    assert "with TERM" in stop_process(host, supervisor, timeout_s=10)
    assert group_members(host, supervisor.pid) == []  # the service went with it

    # A crash loop (3 quick exits in a row) is not a blip: it gives up and exits with the service's code.
    looping = start_detached(host, [*prepare_supervisor(host, install, {}), "sh", "-c", "exit 4"], **files)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and is_running(host, looping):
        time.sleep(0.2)
    restarts = read_restarts(host, install)
    assert (
        not is_running(host, looping) and restarts.gave_up and restarts.count == 2 and restarts.last_exit == 4
    )
    assert "gave up after 2 restart(s)" in restarts.describe()
    fault_counts.update(faults=4)  # one crash, three in a loop


def test_secrets_are_references_resolved_at_run_time(
    prefect_api: None, monkeypatch: pytest.MonkeyPatch, fault_counts: dict[str, int]
) -> None:
    with pytest.raises(ValidationError, match="'SDXL_API_KEY' looks like a secret; put it in new.secret_env"):
        NewService(env={"SDXL_API_KEY": "sk-live-123"})
    with pytest.raises(ValidationError, match="must be 'env:VARIABLE' or 'secret:BLOCK_NAME'"):
        NewService(secret_env={"SDXL_API_KEY": "sk-live-123"})
    from_env = NewService(secret_env={"SDXL_API_KEY": "env:SDXL_TEST_KEY"})
    monkeypatch.delenv("SDXL_TEST_KEY", raising=False)
    with pytest.raises(SecretUnavailable, match="SDXL_TEST_KEY is not set"):
        service_env(from_env)
    monkeypatch.setenv("SDXL_TEST_KEY", "from-env")
    assert api_key(from_env) == "from-env" and "from-env" not in from_env.model_dump_json()

    Secret(value="from-block").save("sdxl-test-api-key", overwrite=True)
    from_block = NewService(secret_env={"SDXL_API_KEY": "secret:sdxl-test-api-key"}, env={"HF_HOME": "/x"})
    assert service_env(from_block) == {"HF_HOME": "/x", "SDXL_API_KEY": "from-block"}
    with pytest.raises(SecretUnavailable, match="'no-such-block' could not be loaded"):
        api_key(NewService(secret_env={"SDXL_API_KEY": "secret:no-such-block"}))
    fault_counts["faults"] += 4  # a value in env, a value in secret_env, a missing variable, a missing block
