"""Runbook building blocks without a Prefect server: target files, gates, run records, prefect.yaml,
process control and backups on the local host (real processes, real files)."""

from __future__ import annotations

import asyncio
import base64
import importlib
import io
import json
import pkgutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image
from prefect.states import Completed, exception_to_failed_state

import flows
from bench.launch import free_port
from flows import errors
from flows.box.common import retry_transient
from flows.box.hostfs import digests, write_text
from flows.box.hosts import LocalHost
from flows.box.procs import find_service, is_running, listener_pids, start_detached, stop_process
from flows.config.target import DEFAULT_CRITERIA, Criterion, Target, expand_home, load_target
from flows.errors import BackupError, DeployError, RehearsedFailure, StageFailed, TargetFileError
from flows.evidence.gates import Evidence, judge
from flows.evidence.results import AppCheck, BenchmarkResult, ImageCheck, LogScan, ProcessInfo, QualityResult
from flows.record.rundir import RunRecord, make_run_dir
from flows.runbooks.demo import demo_target
from flows.stages.backup import backup_current, list_backups, prune_backups, verify_backup
from flows.stages.benchmark import check_image, percentile
from flows.stages.rollback import restore_files
from tests.support.flows import legacy_target

REPO = Path(__file__).resolve().parents[2]


# --- target ---------------------------------------------------------------------------------------


def test_example_target_file_loads() -> None:
    target = load_target(REPO / "docs" / "target.example.yaml")
    assert target.connection.kind == "ssh" and target.connection.trust_new_host is False
    assert target.current.start_command == "python3 /root/working-sd-api.py"
    assert [c.name for c in target.criteria] == [c.name for c in DEFAULT_CRITERIA]


def test_bad_target_file_names_the_field_and_value(tmp_path: Path) -> None:
    path = tmp_path / "target.yaml"
    path.write_text("new:\n  port: 99999\n")
    with pytest.raises(TargetFileError, match=r"new\.port.*99999"):
        load_target(path)
    path.write_text("criteria:\n  - {name: speed}\n")
    with pytest.raises(TargetFileError, match=r"criteria\.0\.name.*'speed'"):
        load_target(path)
    path.write_text("connection: {kind: ssh}\n")
    with pytest.raises(TargetFileError, match="connection.hostname is required"):
        load_target(path)
    with pytest.raises(TargetFileError, match="No such file"):
        load_target(tmp_path / "missing.yaml")


def test_home_paths_resolve_on_the_host() -> None:
    target = Target().on_host("/home/gpu")
    assert target.new.install_dir == "/home/gpu/sdxl-deploy"
    assert target.paths.backup_root == "/home/gpu/backups"
    assert target.current.files == ["/home/gpu/working-sd-api.py"]
    assert target.current.log_file == "/tmp/sd-api.log"
    with pytest.raises(ValueError, match="~user"):
        expand_home("~bob/x", "/home/gpu")


# --- gates ----------------------------------------------------------------------------------------


def _evidence(p95: float = 4.0, vram: float | None = 14.0, tunnel: bool = True) -> Evidence:
    images = [ImageCheck(ok=True, size="1024x1024", detail="valid PNG 1024x1024")] * 3
    return Evidence(
        health={"model_loaded": True, "model": "sdxl"},
        benchmark=BenchmarkResult(
            runs=3,
            requested_size="1024x1024",
            wall_s=[p95] * 3,
            generation_s=[p95] * 3,
            p50_s=p95,
            p95_s=p95,
            peak_vram_gb=vram,
            images=images,
            errors=[],
            model="sdxl",
        ),
        app=AppCheck(through_tunnel=tunnel, health_ok=True, generate_ok=True, seconds=p95, detail="ok"),
        log_scan=LogScan(log_file="x", bytes_scanned=10, matches=[]),
    )


def test_gates_pass_on_good_evidence_and_an_uncompared_quality_is_not_applicable() -> None:
    report = judge(list(DEFAULT_CRITERIA), _evidence())
    verdicts = {row.criterion: row.verdict for row in report.rows}
    assert report.passed
    assert verdicts["quality"] == "n/a"
    assert [r.observed for r in report.rows if r.criterion == "quality"][0].startswith("not compared")
    assert verdicts["max_downtime_s"] == "n/a"  # no prober ran (verify-sdxl)
    assert all(v == "pass" for name, v in verdicts.items() if name not in ("quality", "max_downtime_s"))


def test_a_worse_quality_verdict_blocks_the_deploy_unless_made_warn_only(tmp_path: Path) -> None:
    evidence = _evidence()
    evidence.quality = QualityResult(
        current_score=30.0, new_score=27.0, passed=False, detail="worse: CLIP 27.00 vs 30.00"
    )
    report = judge(list(DEFAULT_CRITERIA), evidence)
    assert not report.passed and [r.criterion for r in report.failures] == ["quality"]
    demo_criteria = demo_target(tmp_path, 7860).criteria
    assert judge(demo_criteria, evidence).passed  # the demo's random weights: warn only
    assert {r.criterion: r.verdict for r in judge(demo_criteria, evidence).rows}["quality"] == "warn"


def test_enforced_gate_fails_and_warn_only_does_not_block() -> None:
    slow = judge(list(DEFAULT_CRITERIA), _evidence(p95=31.0, vram=22.0))
    assert not slow.passed
    assert {r.criterion for r in slow.failures} == {"p95_seconds", "peak_vram_gb"}
    relaxed = [
        c.model_copy(update={"enforce": False}) if c.name == "peak_vram_gb" else c for c in DEFAULT_CRITERIA
    ]
    report = judge([c for c in relaxed if c.name != "p95_seconds"], _evidence(p95=31.0, vram=22.0))
    assert report.passed and {r.criterion: r.verdict for r in report.rows}["peak_vram_gb"] == "warn"


def test_local_target_has_no_tunnel_and_cpu_has_no_vram() -> None:
    rows = {r.criterion: r for r in judge(list(DEFAULT_CRITERIA), _evidence(vram=None, tunnel=False)).rows}
    assert rows["tunnel"].verdict == "n/a" and rows["peak_vram_gb"].verdict == "n/a"


def test_resolution_gate_needs_the_threshold_size() -> None:
    evidence = _evidence()
    assert judge([Criterion(name="resolution", threshold=1024)], evidence).passed
    assert not judge([Criterion(name="resolution", threshold=2048)], evidence).passed


def test_missing_evidence_fails_enforced_criteria() -> None:
    report = judge(list(DEFAULT_CRITERIA), Evidence())
    assert not report.passed
    assert {r.criterion for r in report.failures} >= {
        "model_loaded",
        "p95_seconds",
        "valid_image",
        "app_request",
    }


def test_image_checks() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buffer, format="PNG")
    good = base64.b64encode(buffer.getvalue()).decode()
    assert check_image(good, 64, 48).ok
    assert "expected 64x64" in check_image(good, 64, 64).detail
    assert not check_image("not base64!", 64, 48).ok
    assert not check_image(base64.b64encode(b"plain text").decode(), 64, 48).ok
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([], 95) is None


# --- run records ----------------------------------------------------------------------------------


def test_run_record_times_stages_and_names_the_failed_one(tmp_path: Path) -> None:
    run = RunRecord("deploy-sdxl", Target(), tmp_path, fail_at="ship")
    with run.stage("preflight"):
        pass
    with (
        pytest.raises(StageFailed, match="stage 'backup' failed: ValueError: disk full") as failure,
        run.stage("backup"),
    ):
        raise ValueError("disk full")
    assert failure.value.stage == "backup"
    with pytest.raises(StageFailed) as injected, run.stage("ship"):
        raise AssertionError("never reached: the failure is injected before the body")
    assert isinstance(injected.value.__cause__, RehearsedFailure)
    run.finish("failed", str(failure.value))
    summary = json.loads((run.dir / "summary.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [
        ("preflight", "completed"),
        ("backup", "failed"),
        ("ship", "failed"),
    ]
    assert summary["status"] == "failed" and summary["failed_stage"] == "ship"
    assert run.dir.name.endswith("-deploy-sdxl") and (run.dir / "report.md").exists()


def test_run_dirs_never_collide(tmp_path: Path) -> None:
    dirs = {make_run_dir(tmp_path, "verify-sdxl") for _ in range(3)}
    assert len(dirs) == 3


# --- errors and the retry policy -----------------------------------------------------------------


def test_every_flows_error_lives_in_flows_errors_and_is_a_flow_error() -> None:
    modules = [importlib.import_module(m.name) for m in pkgutil.walk_packages(flows.__path__, "flows.")]
    defined = {
        f"{value.__module__}.{value.__qualname__}"
        for module in modules
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, BaseException)
        and value.__module__.startswith("flows")
    }
    assert defined and {name.rpartition(".")[0] for name in defined} == {"flows.errors"}
    assert all(issubclass(getattr(errors, name.rpartition(".")[2]), errors.FlowError) for name in defined)
    assert issubclass(errors.TargetFileError, ValueError)  # still caught where a ValueError is expected
    assert issubclass(errors.CommandFailed, errors.HostCommandError)  # what `run_checked` raised before


def test_the_retry_policy_retries_only_transient_failures() -> None:
    """A dropped SSH link and network errors are retried; a refusal, a failed command or a bug are not."""

    def retried(error: BaseException) -> bool:
        return retry_transient(None, None, asyncio.run(exception_to_failed_state(error)))

    class BusyHost(errors.FlowError):
        transient = True

    assert retried(errors.HostUnreachable("lost the connection")) and retried(BusyHost("busy"))
    assert retried(httpx.ConnectError("connection refused")) and retried(ConnectionResetError())
    assert not retried(errors.CommandFailed("mkdir failed")) and not retried(
        errors.HostKeyRejected("changed")
    )
    assert not retried(errors.ServiceDidNotStart("exited")) and not retried(ValueError("a bug"))
    assert not retry_transient(None, None, Completed())


# --- prefect.yaml ---------------------------------------------------------------------------------


def test_prefect_yaml_declares_the_deployments() -> None:
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    assert set(deployments) == {
        "deploy-sdxl",
        "verify-sdxl",
        "rollback-sdxl",
        "regression-benchmark",
        "deploy-fleet",
    }
    assert {d["work_pool"]["name"] for d in deployments.values()} == {"sdxl-runbook"}
    assert deployments["deploy-sdxl"]["parameters"]["dry_run"] is True
    nightly_schedule = deployments["regression-benchmark"]["schedules"][0]
    assert nightly_schedule["cron"] == "0 3 * * *"
    assert nightly_schedule["active"] is False  # no target by default: it would probe localhost every night
    closing = (REPO / "scripts" / "ui.sh").read_text().split("Deployments:")[1].split("Ctrl-C")[0]
    assert all(name in closing for name in deployments)  # make ui's closing message names every deployment
    import flows.runbooks.rollback
    import flows.runbooks.runbook
    import flows.runbooks.verify

    for name, module in (
        ("deploy-sdxl", flows.runbooks.runbook),
        ("verify-sdxl", flows.runbooks.verify),
        ("rollback-sdxl", flows.runbooks.rollback),
    ):
        path, function = deployments[name]["entrypoint"].split(":")
        assert path == module.__name__.replace(".", "/") + ".py" and getattr(module, function).name == name
        assert set(deployments[name]["parameters"]) <= set(getattr(module, function).parameters.properties)
    from flows.runbooks.regression import regression_benchmark

    nightly = deployments["regression-benchmark"]["parameters"]
    assert "target_file" in nightly and set(nightly) <= set(regression_benchmark.parameters.properties)
    from flows.runbooks.fleet.flow import deploy_fleet

    fleet = deployments["deploy-fleet"]
    assert (
        fleet["entrypoint"] == "flows/runbooks/fleet/flow.py:deploy_fleet"
        and deploy_fleet.name == "deploy-fleet"
    )
    assert set(fleet["parameters"]) <= set(deploy_fleet.parameters.properties)
    assert fleet["parameters"]["dry_run"] is True


def test_the_ui_shows_the_target_field_by_field() -> None:
    from flows.runbooks.runbook import deploy_sdxl

    schema = deploy_sdxl.parameters
    assert {"Target", "Connection", "CurrentService", "NewService", "Criterion"} <= set(schema.definitions)
    assert schema.properties["target"]["default"]["new"]["port"] == 7860
    assert "gate" in schema.properties["fail_at"]["anyOf"][0]["enum"]


# --- processes and backups on the local host ------------------------------------------------------


@pytest.fixture
def http_server(tmp_path: Path):
    """A dummy service (`python -m http.server`) started detached in a path with spaces and quotes."""
    host = LocalHost()
    workdir = tmp_path / "a dir with 'quotes'"
    port = free_port()
    info = start_detached(
        host,
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        workdir=str(workdir),
        log_file=str(workdir / "logs" / "server log.txt"),
        pid_file=str(workdir / "run" / "server.pid"),
    )
    try:
        _wait_answering(f"http://127.0.0.1:{port}/")
        yield host, info, port, workdir
    finally:
        stop_process(host, info, timeout_s=5)


def _wait_answering(url: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise TimeoutError(url)


def test_start_find_and_stop_by_pid(http_server) -> None:
    host, info, port, workdir = http_server
    assert info.group_leader and "http.server" in info.cmdline
    assert (workdir / "run" / "server.pid").read_text().strip() == str(info.pid)
    assert listener_pids(host, port) == [info.pid]
    assert find_service(host, port) == info
    assert "with TERM" in stop_process(host, info, timeout_s=5)
    assert not is_running(host, info) and listener_pids(host, port) == []
    assert "was not running" in stop_process(host, info)


def test_a_reused_pid_is_never_signalled(http_server) -> None:
    host, info, port, _ = http_server
    impostor = ProcessInfo(pid=info.pid, start_ticks=info.start_ticks + 1, cmdline="old", group_leader=True)
    assert "was not running" in stop_process(host, impostor)
    assert is_running(host, info) and listener_pids(host, port) == [info.pid]


def test_stop_kills_a_process_that_ignores_term(tmp_path: Path) -> None:
    host = LocalHost()
    info = start_detached(
        host,
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)",
        ],
        workdir=str(tmp_path),
        log_file=str(tmp_path / "log"),
        pid_file=str(tmp_path / "pid"),
    )
    try:
        time.sleep(0.3)  # let it install the handler
        assert "killed" in stop_process(host, info, timeout_s=0.5)
        assert not is_running(host, info)
    finally:
        stop_process(host, info, timeout_s=0.1)


def test_backup_manifest_verify_restore_and_prune(tmp_path: Path) -> None:
    host = LocalHost()
    target = legacy_target(tmp_path, free_port())
    script, config = target.current.files
    Path(target.current.log_file).parent.mkdir(parents=True, exist_ok=True)
    Path(target.current.log_file).write_text("served 3 images\n")

    backup = backup_current.fn(host, target, None)
    manifest = verify_backup(host, backup.path)
    originals = {f.original: f for f in manifest.service_files()}
    assert set(originals) == {script, config}
    assert originals[config].sha256 == digests(host, [config])[config].sha256
    saved = Path(backup.path)
    assert (saved / "start_command.txt").read_text().strip() == target.current.start_command
    assert (saved / "logs" / "sd api.log").read_text() == "served 3 images\n"
    assert "no process listened" in (saved / "pip-freeze.txt").read_text()

    # A deleted service file comes back from the backup; an intact one is left alone.
    Path(config).unlink()
    assert restore_files(host, backup.path, manifest.service_files()) == [config]
    assert Path(config).read_text() == '{"steps": 20}\n'

    # Tampering is caught and named.
    write_text(host, f"{backup.path}/start_command.txt", "rm -rf /\n")
    with pytest.raises(BackupError, match="start_command.txt"):
        verify_backup(host, backup.path)

    for _ in range(3):
        backup_current.fn(host, target, None)
    root = target.paths.backup_root
    assert len(list_backups(host, root, "sd15")) == 3  # keep_backups=3 pruned the oldest
    newest = list_backups(host, root, "sd15")[-1]
    assert prune_backups(host, root, "sd15", 1) and list_backups(host, root, "sd15") == [newest]


def test_backup_refuses_missing_service_files(tmp_path: Path) -> None:
    target = legacy_target(tmp_path, free_port())
    current = target.current.model_copy(update={"files": [*target.current.files, str(tmp_path / "gone.py")]})
    with pytest.raises(BackupError, match="gone.py"):
        backup_current.fn(LocalHost(), target.model_copy(update={"current": current}), None)


def test_cli_refuses_an_unknown_stage() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sdxl_deploy.cli", "demo", "--simulate-failure", "lunch"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode != 0 and "'lunch' is not a stage" in result.stderr


class _CorruptingHost(LocalHost):
    """A real local host whose uploads arrive with one byte changed, as a bad link or disk would do."""

    def put(self, local: Path, remote: str) -> None:
        super().put(local, remote)
        data = bytearray(Path(remote).read_bytes())
        data[len(data) // 2] ^= 0xFF
        Path(remote).write_bytes(bytes(data))


def test_a_corrupted_upload_is_refused_before_anything_is_installed(tmp_path: Path) -> None:
    from flows.stages.deploy import ship_release

    wheel = tmp_path / "sdxl_deploy-9.9.9-py3-none-any.whl"
    wheel.write_bytes(b"not really a wheel, but its bytes are what is checked" * 100)
    target = Target().model_copy(deep=True)
    target.new.install_dir = str(tmp_path / "box" / "sdxl-deploy")
    with pytest.raises(DeployError, match=r"does not match the local one .*nothing was installed"):
        ship_release.fn(_CorruptingHost(), target, wheel)
    releases = list((tmp_path / "box" / "sdxl-deploy" / "releases").iterdir())
    assert len(releases) == 1
    assert sorted(p.name for p in releases[0].iterdir()) == [wheel.name + ".part"]  # no wheel, no venv/


# --- warm-up ----------------------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_warm_up_reads_the_compile_time_from_health(tmp_path: Path) -> None:
    """The warm-up task against a real service process: the compile time is /health's `startup.warmup_s`
    (the service's own number, to the millisecond), not a line of its log."""
    from flows.stages.deploy import Started, serve_argv
    from flows.stages.warmup import warm_up

    host = LocalHost()
    target = demo_target(tmp_path, free_port())
    new = target.new.model_copy(
        update={"model": "tiny-sd15", "env": {**target.new.env, "SDXL_WARMUP_ON_LOAD": "on"}}
    )
    target = target.model_copy(update={"new": new})
    process = start_detached(
        host,
        serve_argv(target),
        workdir=str(tmp_path),
        log_file=new.log_file,
        pid_file=new.pid_file,
        env={"PYTHONPATH": str(REPO), **new.env},
    )
    try:
        result = warm_up.fn(host, target, Started(process=process, log_file=new.log_file, log_offset=0))
    finally:
        stop_process(host, process, timeout_s=20)
    startup = result.health.startup
    assert startup.phase == "ready" and startup.compiled_shapes == ["base 512x512 x1"]
    assert result.compile_s == startup.warmup_s and result.compile_s > 0
    assert len(result.warmup_s) == target.workload.warmup_requests
