"""Helpers and fixtures for the runbook tests: targets inside a temporary "box", the legacy stand-in
service, a throwaway Prefect server, the project's wheel (registered as a plugin in conftest.py), the console
as the CLI shows a run."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prefect.settings import PREFECT_HOME, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from bench.launch import free_port
from flows.box.hosts import LocalHost, q
from flows.config.target import Connection, CurrentService, Target
from flows.record.runlog import console_view
from flows.runbooks.demo import demo_target, start_current, stop_all
from flows.stages.deploy import build_wheel
from service.schema import ServiceHealth
from tests.support.sshd import SSHServer

LEGACY_SCRIPT = Path(__file__).with_name("legacy_api.py")
# Per test: HTTP requests the services logged, faults injected, backups verified intact afterwards.
FAULT_COUNTS: dict[str, dict[str, int]] = {}
REQUEST_LINE = re.compile(rb'"(?:GET|POST) /')


def legacy_target(
    box: Path, port: int, python: str = sys.executable, start_mode: str = "stop-first"
) -> Target:
    """The demo's local target, with the user's foreign SD1.5 script (the stand-in) as the current service.

    Its files live in a folder whose name has spaces and quotes, to prove every path is quoted. Stop-first
    unless asked: most deploy tests are about stopping the old service and putting it back (the staged
    order has its own tests, tests/flows/test_staged.py).
    """
    app = box / "app dir with 'quotes' and spaces"
    app.mkdir(parents=True, exist_ok=True)
    script = app / "working-sd-api.py"
    shutil.copyfile(LEGACY_SCRIPT, script)
    config = app / "it's settings.json"
    config.write_text('{"steps": 20}\n')
    target = demo_target(box, port, python)
    current = CurrentService(
        name="sd15",
        start_command=f"exec {q(python)} {q(str(script))} {port}",
        workdir=str(app),
        files=[str(script), str(config)],
        pid_file=None,
        log_file=str(box / "logs" / "sd api.log"),
        port=port,
        health_timeout_s=30,
        stop_timeout_s=10,
    )
    new = target.new.model_copy(update={"start_mode": start_mode})
    return target.model_copy(update={"current": current, "new": new})


def ssh_connection(server: SSHServer, known_hosts: str | None = None) -> Connection:
    return Connection(
        kind="ssh",
        hostname=server.hostname,
        port=server.port,
        username=server.username,
        key_filename=str(server.key_filename),
        known_hosts=str(known_hosts or server.known_hosts),
    )


@contextmanager
def cli_console() -> Iterator[io.StringIO]:
    """What a console handler on the root logger writes while the block runs, seen as the CLI shows a run
    (`console_view`: the summary follows)."""
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    logging.getLogger().addHandler(handler)
    try:
        with console_view([handler], summary_follows=True):
            yield text
    finally:
        logging.getLogger().removeHandler(handler)


def summary_of(state) -> dict:
    """The summary.json of a flow run's final state."""
    outcome = state.result(raise_on_failure=False)
    return json.loads((Path(outcome.run_dir) / "summary.json").read_text())


def is_legacy(health: ServiceHealth | None) -> bool:
    """The stand-in's health body (tiny-sdxl's also names its model and backend)."""
    return health is not None and health.status == "healthy" and "backend" not in health.model_fields_set


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Flows run against a throwaway Prefect server and database (one per session)."""
    home = tmp_path_factory.mktemp("prefect-home")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PREFECT_HOME", str(home))
        env.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with temporary_settings({PREFECT_HOME: home}), prefect_test_harness(server_startup_timeout=180):
            yield


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> str:
    """This project's wheel, built once for every deploy of the session."""
    return str(build_wheel.fn(tmp_path_factory.mktemp("wheel")))


@pytest.fixture
def legacy(tmp_path: Path) -> Iterator[tuple[LocalHost, Target]]:
    """A local box with the user's SD1.5 script (the stand-in) running; everything stopped afterwards."""
    host = LocalHost()
    target = legacy_target(tmp_path / "box", free_port())
    start_current(host, target)
    try:
        yield host, target
    finally:
        stop_all(host, target)


@pytest.fixture
def staged(tmp_path: Path) -> Iterator[tuple[LocalHost, Target]]:
    """A box with the legacy stand-in serving; a staged target whose prober sends the app's request back
    to back (so a cut-over that drops requests shows up); everything stopped afterwards."""
    host = LocalHost()
    target = legacy_target(tmp_path / "box", free_port(), start_mode="staged")
    target = fast(target).model_copy(update={"probe": target.probe.model_copy(update={"app_pause_s": 0.05})})
    start_current(host, target)
    try:
        yield host, target
    finally:
        stop_all(host, target)


@pytest.fixture
def fault_counts(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, int]]:
    """Count the requests the services logged during the test; the test adds the faults it injected and
    the backups it verified. With SDXL_FAULT_COUNTS=<file> the totals are written there (RELIABILITY.md)."""
    counts = {"faults": 0, "backups_verified": 0}
    yield counts
    logs = [p for p in tmp_path.rglob("*.log") if p.is_file()]
    counts["requests"] = sum(len(REQUEST_LINE.findall(p.read_bytes())) for p in logs)
    FAULT_COUNTS[request.node.nodeid] = counts
    out = os.environ.get("SDXL_FAULT_COUNTS")
    if out:
        previous = json.loads(Path(out).read_text()) if Path(out).is_file() else {}
        Path(out).write_text(json.dumps(previous | FAULT_COUNTS, indent=2) + "\n")


def fast(target: Target, **new: object) -> Target:
    """The target with the new service's fields changed, one benchmark run and no CLIP comparison."""
    return target.model_copy(
        update={
            "new": target.new.model_copy(update=new),
            "workload": target.workload.model_copy(update={"benchmark_runs": 1}),
            "quality": target.quality.model_copy(update={"enabled": False}),
        }
    )
