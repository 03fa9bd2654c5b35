"""The console of a run reads in one screen: each failure once (where the CLI's summary follows, the cause in
its stage table, what was done in its closing line), no traceback, repeated transport errors folded, no
Prefect telemetry, none of the service's own output; the run log keeps all of it."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from prefect import flow, task
from rich.console import Console

from flows.config.target import Criterion, Target
from flows.errors import RehearsedFailure, RunFailed, StageFailed
from flows.evidence.gates import Evidence
from flows.record.rundir import RunRecord, RunSummary
from flows.record.runlog import RUN_LOG, TOLD_BY_SUMMARY, console_view, service_log
from flows.runbooks.cli_run import run_flow
from flows.runbooks.commands import print_summary
from flows.stages.gates import evaluate_gates

REPO = Path(__file__).resolve().parents[2]

CAUSE = "failure injected at stage 'cutover' (fail_at rehearsal)"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """A console handler on the root logger, as Prefect's is; what it wrote."""
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield text
    finally:
        root.removeHandler(handler)


@pytest.fixture
def console(stream: io.StringIO) -> Iterator[io.StringIO]:
    """The root's console handlers seen through `console_view`, as the CLI runs a flow."""
    with console_view(summary_follows=True):
        yield stream


def test_fifty_refused_channels_are_one_console_line_with_the_count(
    console: io.StringIO, tmp_path: Path
) -> None:
    run = RunRecord("deploy-sdxl", Target(), tmp_path)
    forward, transport = logging.getLogger("flows.box.hosts.forward"), logging.getLogger("paramiko.transport")
    for channel in range(50):
        transport.error("Secsh channel %d open FAILED: Connection refused: Connect failed", channel)
        forward.warning(
            "port forward to %s: cannot open a channel: %s",
            "root@box:22 port 7860",
            f"ChannelException(2, 'Connect failed') from 127.0.0.1:{40000 + channel}",
        )
    logging.getLogger("flows").warning("rollback: restarted the old service")
    run.finish("failed", "done")

    lines = console.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert "cannot open a channel" in lines[0] and "[50 times in" in lines[0]
    assert "rollback: restarted" in lines[1]
    assert not any("paramiko" in line for line in lines)
    kept = (tmp_path / run.dir.name / RUN_LOG).read_text()
    assert kept.count("open FAILED") == 50 and kept.count("cannot open a channel") == 50


def test_a_failed_stage_is_told_once_and_its_traceback_is_in_the_run_log(
    console: io.StringIO, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The stage's line says it failed and leaves the cause to the summary that follows (its stage table);
    what the summary tells again (the gate's rows, the downtime, the closing line) is left out too."""
    caplog.set_level(logging.INFO, logger="flows")  # the gate's rows are INFO
    run = RunRecord("deploy-sdxl", Target(), tmp_path)
    with pytest.raises(StageFailed), run.stage("cutover"):
        raise RehearsedFailure(CAUSE)
    service_log().info("Loading pipeline components...:  29%%|██▊       | 2/7")
    evaluate_gates.fn([Criterion(name="max_downtime_s", threshold=5)], Evidence())
    logging.getLogger("flows").warning("deploy-sdxl failed", extra={TOLD_BY_SUMMARY: True})
    run.finish("failed", f"stage 'cutover' failed: RehearsedFailure: {CAUSE}; rolled back")

    text = console.getvalue()
    assert text.splitlines() == [
        "INFO flows - stage cutover: start",
        "ERROR flows - stage cutover: failed after 0.0 s (why: the summary below)",
    ]
    shown = Console(record=True, width=250)
    print_summary(run.dir / "summary.json", shown)
    assert shown.export_text().count(CAUSE) == 1  # in the stage table; the closing line points there
    kept = (run.dir / RUN_LOG).read_text()
    assert "Traceback (most recent call last)" in kept and f"RehearsedFailure: {CAUSE}" in kept
    assert "Loading pipeline components" in kept and "gate max_downtime_s" in kept


def test_without_a_summary_to_follow_the_stages_line_tells_the_cause(
    stream: io.StringIO, tmp_path: Path
) -> None:
    """A worker's console (a run started from the UI): no summary follows, so the line says why."""
    with console_view(summary_follows=False):
        run = RunRecord("deploy-sdxl", Target(), tmp_path)
        with pytest.raises(StageFailed), run.stage("cutover"):
            raise RehearsedFailure(CAUSE)
        run.finish("failed", "done")
    assert f"stage cutover: failed after 0.0 s: RehearsedFailure: {CAUSE}" in stream.getvalue()
    assert "Traceback" not in stream.getvalue()


@task
def _cut_over() -> None:
    raise RehearsedFailure(CAUSE)


@flow(name="deploy-sdxl")
def _failing_deploy(runs_dir: str) -> RunSummary:
    run = RunRecord("deploy-sdxl", Target(), runs_dir)
    try:
        with run.stage("cutover"):
            _cut_over()
    except StageFailed as failure:
        run.finish("failed", f"{failure}; rolled back: restarted the old service")
        raise RunFailed(f"deploy-sdxl {failure}", str(run.dir)) from None
    return run.finish("completed", "")


def test_a_real_flow_failure_is_told_once_by_the_cli(
    stream: io.StringIO, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefect's engines report the task's and the flow's failure again, with tracebacks, and each
    final state: the CLI's console leaves those out; the stage's line says that it failed, the summary's
    stage table why, its closing line what was done."""
    monkeypatch.setenv("COLUMNS", "250")  # the summary's tables unwrapped, so the cause is one line
    with pytest.raises(typer.Exit):
        run_flow(_failing_deploy, print_summary, runs_dir=str(tmp_path))
    log, summary = stream.getvalue(), capsys.readouterr().out
    assert "ERROR prefect.flow_runs - stage cutover: failed after 0.0 s (why: the summary below)" in log
    assert (log + summary).count(CAUSE) == 1 and CAUSE in summary
    assert "Traceback" not in log and "Finished in state" not in log and "deploy-sdxl failed" not in log
    summary = " ".join(summary.split())
    assert "stage 'cutover' failed (why: the table above); rolled back: restarted the old service" in summary
    (run_dir,) = tmp_path.iterdir()
    assert "Traceback (most recent call last)" in (run_dir / RUN_LOG).read_text()


_TELEMETRY = (
    "import os; from flows.runbooks.cli_run import prefect_defaults; prefect_defaults(); "
    "print(os.environ['PREFECT_SERVER_ANALYTICS_ENABLED'])"
)


@pytest.mark.parametrize(("chosen", "expected"), [(None, "false"), ("true", "true")])
def test_prefect_telemetry_is_off_unless_the_user_chose(chosen: str | None, expected: str) -> None:
    """A CLI process as a user starts it: Prefect's settings read at import, then `prefect_defaults`."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_ANALYTICS_ENABLED"}
    if chosen is not None:
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = chosen
    done = subprocess.run(
        [sys.executable, "-c", _TELEMETRY], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == expected
