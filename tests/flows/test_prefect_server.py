"""The UI path, headless: a real `prefect server start`, the process work pool and a deployment from
prefect.yaml, a flow run created through the REST API (what the UI's "Run" button does), and a real
worker that runs it to completion."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from bench.launch import free_port
from flows.config.target import Connection, Criterion, NewService, Target, Workload
from flows.runbooks.demo import TINY_REQUEST

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "sdxl-runbook"  # the work pool prefect.yaml names


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME; stopped by its PID."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "prefect server did not become healthy"
            time.sleep(0.5)
        yield api, env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def prefect_cli(env: dict[str, str], *args: str, timeout: float = 180) -> str:
    result = subprocess.run(
        [PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"prefect {' '.join(args)}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    )
    return result.stdout


def test_deployment_from_prefect_yaml_runs_to_completion(
    prefect_server: tuple[str, dict[str, str]], service_url: Callable[[str], str], tmp_path: Path
) -> None:
    api, env = prefect_server
    prefect_cli(env, "work-pool", "create", POOL, "--type", "process")
    prefect_cli(env, "--no-prompt", "deploy", "--prefect-file", "prefect.yaml", "--name", "verify-sdxl")

    deployment = httpx.get(f"{api}/deployments/name/verify-sdxl/verify-sdxl", timeout=10).json()
    assert deployment["work_pool_name"] == POOL
    assert {"target", "target_file", "runs_dir"} <= set(deployment["parameter_openapi_schema"]["properties"])

    # What the UI's "Custom run" sends: the target, field by field.
    port = int(service_url("tiny-sdxl").rsplit(":", 1)[1])
    box = tmp_path / "box"
    target = Target(
        connection=Connection(kind="local"),
        new=NewService(
            model="tiny-sdxl", port=port, install_dir=str(box / "install"), log_dir=str(box / "logs")
        ),
        workload=Workload(app_request=TINY_REQUEST, benchmark_runs=2, warmup_requests=0),
        criteria=[
            Criterion(name="model_loaded"),
            Criterion(name="resolution", threshold=64),
            Criterion(name="valid_image"),
            Criterion(name="app_request"),
        ],
    )
    runs = tmp_path / "runs"
    created = httpx.post(
        f"{api}/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": {"target": target.model_dump(mode="json"), "runs_dir": str(runs)}},
        timeout=10,
    )
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]

    worker = subprocess.run(
        [PREFECT, "worker", "start", "--pool", POOL, "--run-once"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    deadline = time.monotonic() + 120
    while True:
        state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()["state"]
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert state["type"] == "COMPLETED", f"{state}\n{worker.stdout[-3000:]}\n{worker.stderr[-3000:]}"
    [run_dir] = runs.iterdir()
    assert run_dir.name.endswith("-verify-sdxl") and (run_dir / "summary.json").exists()
