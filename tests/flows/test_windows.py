"""The control side on Windows, as far as it can be proved here: local paths may be Windows paths while
the box's paths stay POSIX, the deploy lock tells live from dead control processes without /proc, files
reach the box byte for byte, and a `local` target on a non-POSIX machine is refused with a clear message."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path, PureWindowsPath

import pytest

from flows.box import hosts as hosts_module
from flows.box.hostfs import read_text, remote_child, write_text
from flows.box.hosts import HostError, LocalHost, open_host
from flows.box.lock import new_owner, owner_alive, stale_reason
from flows.config.target import Connection, load_target

REPO = Path(__file__).resolve().parents[2]
# Modules that run on the control side only (flows' host commands run on the box and stay POSIX).
CONTROL_SIDE = [
    REPO / "flows" / name
    for name in (
        "box/lock.py",
        "record/rundir.py",
        "record/facts.py",
        "record/deploy_record.py",
        "runbooks/commands.py",
        "runbooks/runbook.py",
        "runbooks/hostrun.py",
        "runbooks/plan.py",
        "runbooks/recovery.py",
        "runbooks/verify.py",
        "runbooks/rollback.py",
        "box/releases.py",
        "config/secrets.py",
        "config/target.py",
    )
] + sorted((REPO / "evaluation").glob("*.py"))
POSIX_ONLY = re.compile(
    r"/proc/|os\.getuid|os\.geteuid|\bfcntl\b|os\.killpg|signal\.SIGKILL|shell=True|[\"']/tmp/?[\"']"
)


def test_lock_liveness_tells_live_dead_and_reused_pids_apart() -> None:
    owner = new_owner("deploy-sdxl", "20261202-010000-deploy-sdxl")
    assert owner.control_pid_start is not None
    assert owner_alive(owner) and stale_reason(owner) is None

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    dead = owner.model_copy(update={"control_pid": ended.pid})
    assert not owner_alive(dead)
    assert stale_reason(dead) == f"its control process {ended.pid} on {owner.control_host} is gone"

    reused = owner.model_copy(update={"control_pid_start": "12.00"})  # same PID, another start time
    assert not owner_alive(reused) and "is gone" in (stale_reason(reused) or "")


def test_control_side_modules_use_nothing_posix_only() -> None:
    found = {
        str(path.relative_to(REPO)): POSIX_ONLY.findall(path.read_text(encoding="utf-8"))
        for path in CONTROL_SIDE
    }
    assert {name: hits for name, hits in found.items() if hits} == {}


def test_windows_local_paths_stay_local_and_box_paths_are_posix(tmp_path: Path) -> None:
    file = tmp_path / "gpu.yaml"
    file.write_text(
        "connection:\n"
        "  kind: ssh\n"
        "  hostname: gpu.example.net\n"
        "  key_filename: 'C:\\Users\\Ana Lee\\.ssh\\id_ed25519'\n"
        "  known_hosts: 'C:\\Users\\Ana Lee\\.ssh\\known_hosts'\n"
        "quality:\n"
        "  prompts_file: 'D:\\prompts\\parti – set.tsv'\n"  # a non-ASCII dash: the file is read as UTF-8
        "new:\n"
        "  install_dir: ~/sdxl-deploy\n",
        encoding="utf-8",
    )
    target = load_target(file).on_host("/home/gpu")
    assert target.connection.key_filename == "C:\\Users\\Ana Lee\\.ssh\\id_ed25519"
    assert target.connection.known_hosts == "C:\\Users\\Ana Lee\\.ssh\\known_hosts"
    assert target.quality.prompts_file == "D:\\prompts\\parti – set.tsv"
    assert (
        target.new.install_dir == "/home/gpu/sdxl-deploy"
        and target.new.pid_file == "/home/gpu/sdxl-deploy/sdxl-api.pid"
    )

    wheel = PureWindowsPath("C:\\Users\\Ana Lee\\builds\\sdxl_deploy-0.1.0-py3-none-any.whl")
    release = f"{target.new.install_dir}/releases/0.1.0-abc"
    assert remote_child(release, wheel) == f"{release}/sdxl_deploy-0.1.0-py3-none-any.whl"
    assert remote_child(release, Path("/home/ana/builds/sdxl_deploy-0.1.0-py3-none-any.whl")) == (
        f"{release}/sdxl_deploy-0.1.0-py3-none-any.whl"
    )


def test_files_reach_the_box_byte_for_byte(tmp_path: Path) -> None:
    host, path = LocalHost(), str(tmp_path / "box" / "supervise.sh")
    text = "#!/bin/sh\necho 'naïve – ok'\n"
    write_text(host, path, text)
    assert Path(path).read_bytes() == text.encode("utf-8")  # LF only, UTF-8, whatever the control side
    assert read_text(host, path) == text


def test_a_local_target_on_a_non_posix_machine_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hosts_module, "local_host_supported", lambda: False)
    with pytest.raises(HostError, match="set connection.kind: ssh"):
        open_host(Connection(kind="local"))
    monkeypatch.undo()
    assert isinstance(open_host(Connection(kind="local")), LocalHost)
