"""The service's start as `/health` states it (`startup`: service/startup.py, service/warmup.py), and the
compile smoke test (service/compile_check.py) that keeps a box where torch.compile fails serving, uncompiled.

Real uvicorn servers with tiny models on the CPU; torch.compile is made to fail for real, by pointing
Inductor's C++ compiler (`CXX`) at a binary that does not exist, in a service process of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from service.accel import plan_speed
from service.app import create_app
from service.settings import ServiceSettings
from service.state import ServiceState
from tests.support.servers import REPO, free_port, process_server, settings_for, thread_server, wait_ready

SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "num_inference_steps": 2}
ORDER = ["started", "loading_started", "base_loaded", "warmup_started", "warmup_done", "ready"]
BROKEN_COMPILER = {
    "CXX": "/nonexistent/g++"
}  # Inductor's C++ compiler on the CPU (torch._inductor.config.cpp.cxx)


def _startup(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/health", timeout=10).json()["startup"]


def _wait_for(url: str, done: Callable[[dict[str, Any]], bool], timeout: float = 120) -> dict[str, Any]:
    """Poll `/health` until `done(startup)`; return that `startup`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        startup = _startup(url)
        if done(startup):
            return startup
        time.sleep(0.05)
    raise TimeoutError(f"/health's startup never got there: {startup}")


@contextmanager
def _served(state: ServiceState) -> Iterator[str]:
    """Serve `state` with real uvicorn in a thread (loading starts with the app)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state.settings, state), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.mark.timeout(900)
def test_health_reports_each_phase_of_the_start_with_real_times(model_cache: Path) -> None:
    """loading -> warming_up -> ready, each held open by the test: what a deploy sees while it waits."""
    state = ServiceState(settings_for("tiny-sd15", model_cache, warmup_on_load="on"))
    engine = state.engine
    loading, warming = threading.Event(), threading.Event()
    real_load, real_generate = engine.load, engine.generate

    def held_load() -> None:
        loading.wait(60)
        real_load()

    def held_generate(*args: Any, **kwargs: Any) -> Any:
        warming.wait(60)
        return real_generate(*args, **kwargs)

    engine.load = held_load  # type: ignore[method-assign]
    engine.generate = held_generate  # type: ignore[method-assign]
    with _served(state) as url:
        try:
            first = _wait_for(url, lambda s: "loading_started" in s["milestones"])
            assert first["phase"] == "loading" and first["load_s"] is None and first["warmup_s"] is None
            assert httpx.get(f"{url}/health").json()["status"] == "loading"
            loading.set()
            warm = _wait_for(url, lambda s: s["phase"] == "warming_up")
            assert warm["load_s"] > 0 and "warmup_started" in warm["milestones"]
            assert httpx.get(f"{url}/ready").status_code == 503  # not ready while warming up
            warming.set()
            wait_ready(url, timeout=600)  # a 512 px warm-up: seconds alone, minutes on a busy CPU
        finally:
            loading.set()
            warming.set()
        ready = _startup(url)
        assert httpx.post(f"{url}/generate", json=SMALL, timeout=120).status_code == 200
    assert ready["phase"] == "ready"
    at = ready["milestones"]
    assert [at[name] for name in ORDER] == sorted(at[name] for name in ORDER)
    assert abs(at["started"] - time.time()) < 600  # epoch seconds
    # the durations fit between their milestones (a clock's jitter aside)
    assert at["base_loaded"] - at["loading_started"] - 0.05 <= ready["load_s"]
    assert ready["load_s"] <= at["warmup_started"] - at["loading_started"] + 0.05
    assert 0 < ready["warmup_s"] <= at["warmup_done"] - at["warmup_started"] + 0.05
    assert ready["compiled_shapes"] == ["base 512x512 x1"]  # tiny-sd15's default size, no refiner
    assert ready["compile"] is False and ready["compiled_functions"] == ready["loaded_functions"] == 0
    assert ready["warnings"] == [] and ready["compile_fallbacks"] == []


def test_a_plain_cpu_start_skips_the_warm_up_and_says_so(service_url: Callable[[str], str]) -> None:
    startup = _startup(service_url("tiny-sdxl"))
    assert startup["phase"] == "ready" and startup["load_s"] > 0
    assert set(startup["milestones"]) == {"started", "loading_started", "base_loaded", "ready"}
    assert startup["warmup_s"] is None and startup["compiled_shapes"] == [] and startup["compile"] is False


def test_a_failed_load_says_failed_with_what_it_reached(tmp_path: Path) -> None:
    settings = ServiceSettings(model="tiny-sd15", cache_dir=tmp_path)
    settings.model = str(tmp_path / "missing-model")
    with thread_server(settings, wait=False) as url:
        startup = _wait_for(url, lambda s: s["phase"] != "loading", timeout=60)
        health = httpx.get(f"{url}/health").json()
    assert startup["phase"] == "failed" and health["status"] == "unhealthy"
    assert "missing-model" in health["error"]
    assert set(startup["milestones"]) == {"started", "loading_started"}
    assert startup["milestones"]["started"] <= startup["milestones"]["loading_started"]
    assert startup["load_s"] is None and startup["warmup_s"] is None


# ----- the compile smoke test -------------------------------------------------------------------------------


def _compile_check(env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "service.compile_check", "--device", "cpu"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(900)
def test_compile_check_passes_here_and_fails_without_a_compiler() -> None:
    code, answer = _compile_check({})
    assert (code, answer) == (0, {"ok": True, "device": "cpu", "torch": torch.__version__, "error": None})
    code, answer = _compile_check(BROKEN_COMPILER)
    assert code == 1 and answer["ok"] is False and answer["device"] == "cpu"
    assert "/nonexistent/g++" in answer["error"] and "\n" not in answer["error"]


def test_a_compile_problem_turns_compile_off_with_a_warning(tmp_path: Path) -> None:
    settings = ServiceSettings(cache_dir=tmp_path, compile="on", cuda_graphs="on")
    plan = plan_speed(settings, torch.device("cuda"), compile_error="InductorError: no compiler")
    assert not (plan.compile or plan.compile_vae or plan.cuda_graphs or plan.save_compiled or plan.warmup)
    assert plan.warnings == (
        "torch.compile does not work here (InductorError: no compiler): serving uncompiled",
    )
    assert plan_speed(settings, torch.device("cuda")).compile  # the same settings, compile working


@pytest.mark.timeout(900)
def test_a_service_where_compile_fails_serves_uncompiled_and_says_why(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    env = {**BROKEN_COMPILER, "SDXL_COMPILE": "on", "SDXL_COMPILE_CACHE_DIR": str(tmp_path / "cc")}
    with process_server("tiny-sd15", env=env, log=log) as url:
        answer = httpx.post(f"{url}/generate", json=SMALL, timeout=120)
        health = httpx.get(f"{url}/health").json()
    assert answer.status_code == 200 and answer.json()["success"] is True
    startup = health["startup"]
    assert health["status"] == "healthy" and startup["phase"] == "ready"
    assert startup["compile"] is False and startup["compiled_functions"] == 0
    assert startup["warmup_s"] is None and startup["compiled_shapes"] == []  # the warm-up follows compile
    [warning] = startup["warnings"]
    assert warning.startswith("torch.compile does not work here (") and "/nonexistent/g++" in warning
    assert warning.endswith("): serving uncompiled")
