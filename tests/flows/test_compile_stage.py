"""Stage `compile` (flows/stages/compile.py): the real compile step (`serve --compile-only`) run on a local
box with the new service's command line and environment, recorded as the stage's evidence; a step that fails
fails the stage before anything of the old service is touched. The staged deploy that runs it with compile on
and reuses every function is tests/flows/test_staged_compile.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flows.box.capacity import decide_start_mode
from flows.box.hosts import LocalHost
from flows.box.model_check import NewModel
from flows.box.procs import find_service, is_running, pid_from_file, process_info
from flows.config.target import Target
from flows.errors import StageFailed
from flows.evidence.results import GpuInfo, HostFacts
from flows.record.rundir import RunRecord
from flows.runbooks.plan import (
    STAGED_STAGES,
    STOP_FIRST_COMPILE_AFTER_STOP,
    STOP_FIRST_STAGES,
    deploy_plan,
    stages_of,
    touches_old_service,
)
from flows.runbooks.runbook import (
    build_compiled,
    compile_forced,
)
from flows.stages.compile import compile_argv
from flows.stages.deploy import Release
from flows.stages.rollback import current_answers
from service.models import REGISTRY
from tests.support.flows import is_legacy

SECRET = "s3cret-value-never-logged"


def release_here(tmp_path: Path) -> Release:
    """A release that runs this checkout's python (the wheel's own environment is the deploy tests' business)."""
    folder = tmp_path / "release"
    folder.mkdir(exist_ok=True)
    return Release(
        release_id="test", path=str(folder), site="", wheel_sha256="", reused=True, python=sys.executable
    )


def with_new(target: Target, **fields: object) -> Target:
    return target.model_copy(update={"new": target.new.model_copy(update=fields)})


def test_the_compile_step_with_compile_off_records_that_nothing_was_built(
    prefect_api: None,
    legacy: tuple[LocalHost, Target],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CPU, compile at its default (off there): the step loads the model, builds nothing and says what the
    service does instead; the report is the stage's evidence in summary.json and report.md. Its secret goes
    through the private env file, which is gone afterwards, and is in no log or record."""
    host, target = legacy
    monkeypatch.setenv("TEST_COMPILE_SECRET", SECRET)
    target = with_new(target, model="tiny-sd15", secret_env={"SDXL_API_KEY": "env:TEST_COMPILE_SECRET"})
    run = RunRecord("deploy-sdxl", target, tmp_path / "runs")
    with run.stage("compile"):
        # a box with a GPU runs the step; this one is the CPU, where the step finds compile off
        build_compiled(run, host, target, release_here(tmp_path), True, "beside the old service", gpu=True)
    summary = run.finish("completed", "compile only")
    fact = summary.model_dump(mode="json")["facts"]["compile"]  # as summary.json has it
    report = fact["report"]
    assert report["built"] is False and report["functions"] == [] and report["model"] == "tiny-sd15"
    assert "nothing to build" in report["note"] and "serves uncompiled" in report["note"]
    assert fact["summary"] == f"tiny-sd15: {report['note']}" and fact["where"] == "beside the old service"
    assert fact["command"].endswith(
        f"--model tiny-sd15 --host 127.0.0.1 --port {target.new.port} --ready-sizes 64x64 --compile-only"
    )
    assert "--stage-port" not in fact["command"]
    assert (
        f"- compile step (beside the old service): {fact['summary']}" in (run.dir / "report.md").read_text()
    )
    install = Path(target.new.install_dir)
    assert not (install / "compile.env").exists()  # sourced and deleted by the step's shell
    step = pid_from_file(host, str(install / "compile.pid"))
    assert step is not None and process_info(host, step) is None  # not left running
    for written in (run.dir / "summary.json", run.dir / "run.log", Path(fact["log_file"])):
        assert SECRET not in written.read_text()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"env": {"SDXL_MAX_QUEUE": "0"}}, "the compile step exited with 2"),
        # new.secret_env's values reach the step (through its private env file) as they reach the service
        ({"secret_env": {"SDXL_MAX_QUEUE": "env:TEST_COMPILE_QUEUE"}}, "the compile step exited with 2"),
        ({"compile_timeout_s": 1.0}, "did not finish within 1 s (new.compile_timeout_s); stopped it"),
    ],
    ids=["refused-setting", "refused-secret-setting", "timeout"],
)
def test_a_failing_compile_step_fails_the_stage_with_the_old_service_untouched(
    prefect_api: None,
    legacy: tuple[LocalHost, Target],
    tmp_path: Path,
    change: dict[str, object],
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A step that exits non-zero (a setting the service refuses) or runs past new.compile_timeout_s fails the
    stage, naming why with its last log lines; the step is not left running, and the old service serves on,
    the same process. Before the cut-over (staged) or the stop (stop-first with room) a failure here rolls
    nothing back; after the stop it puts the old service back."""
    host, target = legacy
    monkeypatch.setenv("TEST_COMPILE_QUEUE", "0")
    old = find_service(host, target.current.port)
    target = with_new(target, model="tiny-sd15", **change)
    run = RunRecord("deploy-sdxl", target, tmp_path / "runs")
    with pytest.raises(StageFailed, match="stage 'compile' failed") as failed, run.stage("compile"):
        build_compiled(run, host, target, release_here(tmp_path), False, "beside the old service", gpu=True)
    assert expected in str(failed.value)
    if "SDXL_MAX_QUEUE" in str(change):
        assert "invalid setting max_queue (SDXL_MAX_QUEUE)" in str(failed.value)  # its log line, quoted
    assert run.summary.failed_stage == "compile" and run.summary.facts.compile is None
    step = pid_from_file(host, f"{target.new.install_dir}/compile.pid")
    assert step is not None and process_info(host, step) is None  # not left running
    assert find_service(host, target.current.port) == old and is_running(host, old)
    assert is_legacy(current_answers(host, target.current))
    assert not touches_old_service("staged", "compile")
    assert not touches_old_service("stop-first", "compile", STOP_FIRST_STAGES)
    assert touches_old_service("stop-first", "compile", STOP_FIRST_COMPILE_AFTER_STOP)


def test_a_box_without_a_gpu_skips_the_step_unless_the_target_forces_the_compile_on(
    legacy: tuple[LocalHost, Target], tmp_path: Path
) -> None:
    """No GPU and compile at its default: nothing to build, so no step runs (no process, no log), and the
    record says why; with new.env SDXL_COMPILE=on the step runs (the staged deploy test builds that way)."""
    host, target = legacy
    run = RunRecord("deploy-sdxl", target, tmp_path / "runs")
    build_compiled(run, host, target, release_here(tmp_path), False, "beside the old service", gpu=False)
    assert run.summary.model_dump(mode="json")["facts"]["compile"] == {
        "skipped": "no GPU on the box and new.env does not set SDXL_COMPILE=on"
    }
    assert pid_from_file(host, f"{target.new.install_dir}/compile.pid") is None
    assert compile_forced(with_new(target, env={"SDXL_COMPILE": "on"}))
    assert not compile_forced(with_new(target, env={"SDXL_COMPILE": "auto"}))


def test_the_compile_step_runs_the_service_argv_less_its_staging_port() -> None:
    argv = [
        "py",
        "-m",
        "sdxl_deploy.cli",
        "serve",
        "--port",
        "7860",
        "--stage-port",
        "7861",
        "--ready-sizes",
        "1x1",
    ]
    assert compile_argv(argv) == [*argv[:6], "--ready-sizes", "1x1", "--compile-only"]
    assert compile_argv(["py", "--stage-port=7861", "--compile-only"]) == ["py", "--compile-only"]
    assert STAGED_STAGES.index("compile") < STAGED_STAGES.index("start_staged")


def _facts(free_gb: float) -> HostFacts:
    gpu = GpuInfo(name="NVIDIA GeForce RTX 3090 Ti", total_gb=24.0, free_gb=free_gb)
    return HostFacts(
        free_disk_gb=100,
        needed_disk_gb=25,
        gpus=[gpu],
        driver="550.54",
        python="python3",
        python_version="3.11.7",
        packages={},
        torch_cuda="12.4",
        cuda_available=True,
        problems=[],
    )


@pytest.mark.parametrize(("free_gb", "beside"), [(19.6, True), (6.4, False)], ids=["room", "no-room"])
def test_a_stop_first_deploy_compiles_before_the_stop_only_where_the_card_has_room(
    free_gb: float, beside: bool
) -> None:
    """A 24 GiB card beside SD1.5 (19.6 GiB free) has room for SDXL's compile step: it runs before the old
    service stops. Beside an SDXL release (6.4 GiB free) it has not: it runs after the stop, and the plan
    (what a dry run prints) says so, naming the downtime it adds."""
    target = with_new(Target(), start_mode="stop-first")
    model = NewModel(kind="known", spec=REGISTRY["sdxl"], measured_as="sdxl")
    decision = decide_start_mode(LocalHost(), target, _facts(free_gb), model)
    assert decision.mode == "stop-first" and decision.compile_beside is beside
    assert stages_of(decision) == (STOP_FIRST_STAGES if beside else STOP_FIRST_COMPILE_AFTER_STOP)
    steps = deploy_plan(target, "PID 1", decision).splitlines()
    compile_at = next(i for i, step in enumerate(steps) if "build the compiled functions" in step)
    stop_at = next(i for i, step in enumerate(steps) if "stop the current service PID 1" in step)
    assert (compile_at < stop_at) is beside
    assert "--compile-only" in steps[compile_at] and "--stage-port" not in steps[compile_at]
    downtime = "it runs after the old service stopped, adding its time to the app's downtime"
    assert (downtime in steps[compile_at]) is not beside
    assert ("19.1 GiB, fits in 19.6 GiB free VRAM" if beside else "does not fit in 6.4 GiB") in steps[
        compile_at
    ]


@pytest.mark.parametrize(
    ("free_gb", "env", "jobs"),
    [(19.6, {}, 1), (60.0, {}, 3), (79.0, {}, 4), (79.0, {"SDXL_COMPILE_JOBS": "2"}, None)],
    ids=["3090-beside-sd15", "60-gib", "h100", "set-by-target"],
)
def test_the_compile_step_runs_as_many_processes_as_the_card_holds_copies_of_the_model(
    free_gb: float, env: dict[str, str], jobs: int | None
) -> None:
    """Each process of the step loads the model: a 24 GiB card beside SD1.5 runs one, an empty H100 four (the
    most), and a target that sets SDXL_COMPILE_JOBS is left to it; the plan's command line says how many."""
    target = with_new(Target(), start_mode="stop-first", env=env)
    model = NewModel(kind="known", spec=REGISTRY["sdxl"], measured_as="sdxl")
    decision = decide_start_mode(LocalHost(), target, _facts(free_gb), model)
    assert decision.compile_jobs == jobs
    step = next(s for s in deploy_plan(target, "PID 1", decision).splitlines() if "build the compiled" in s)
    assert (f"--compile-only --compile-jobs {jobs}" in step) is bool(jobs and jobs > 1), step
    if jobs is None:
        assert "its processes side by side: 2 (new.env SDXL_COMPILE_JOBS)" in step
    elif jobs > 1:
        assert (
            f"{jobs} processes side by side, each loading the model (19.1 GiB each, {free_gb:g} GiB free"
            in step
        )
    assert compile_argv(["py", "serve"], jobs) == ["py", "serve", "--compile-only"] + (
        ["--compile-jobs", str(jobs)] if jobs and jobs > 1 else []
    )
