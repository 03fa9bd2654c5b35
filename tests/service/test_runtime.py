"""Service behaviour under load, faults, auth and settings, through real uvicorn."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from service.client import ServiceClient, decode_image
from service.settings import ServiceSettings
from service.state import ServiceState
from tests.support.servers import REPO, process_server, settings_for, thread_server

SLOW = {"prompt": "x", "width": 256, "height": 256, "num_inference_steps": 10, "use_refiner": False}
SMALL = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 2}


async def _burst(url: str, n: int, body: dict) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        return await asyncio.gather(*(http.post("/generate", json=body) for _ in range(n)))


def test_full_queue_answers_429_with_retry_after_and_accepted_work_completes(model_cache: Path) -> None:
    settings = settings_for("tiny-sdxl", model_cache, max_queue=1, retry_after_s=3)
    with thread_server(settings) as url:
        responses = asyncio.run(_burst(url, 5, SLOW))
        codes = sorted(r.status_code for r in responses)
        assert codes.count(429) >= 2, codes
        assert set(codes) == {200, 429}
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] == "3"
        assert refused.json()["error_type"] == "overloaded"
        for ok in (r for r in responses if r.status_code == 200):
            assert decode_image(ok.json()["image"]).size == (256, 256)
        assert httpx.get(f"{url}/health").json()["queue_depth"] == 0


def test_out_of_memory_frees_and_the_next_request_works(model_cache: Path) -> None:
    with thread_server(settings_for("tiny-sdxl", model_cache, inject_fault="oom:1")) as url:
        failed = httpx.post(f"{url}/generate", json=SMALL, timeout=60)
        assert failed.status_code == 500
        assert failed.json()["error_type"] == "out_of_memory"
        assert "64x64" in failed.json()["error"] and "memory freed" in failed.json()["error"]
        good = httpx.post(f"{url}/generate", json=SMALL, timeout=60)
        assert good.status_code == 200
        assert httpx.get(f"{url}/health").json()["status"] == "healthy"


def test_timeout_cancels_the_job_and_the_service_goes_on(model_cache: Path) -> None:
    # 2 s: a one-step 64 px request fits in it on a machine busy with other tests; 150 steps at 256 px do not
    with thread_server(settings_for("tiny-sdxl", model_cache, request_timeout_s=2.0)) as url:
        slow = httpx.post(f"{url}/generate", json={**SLOW, "num_inference_steps": 150}, timeout=60)
        assert slow.status_code == 504 and slow.json()["error_type"] == "timeout"
        quick = {**SMALL, "num_inference_steps": 1, "use_refiner": False}
        assert httpx.post(f"{url}/generate", json=quick, timeout=60).status_code == 200
        assert httpx.get(f"{url}/health").json()["status"] == "healthy"


def test_api_key_required_when_configured(model_cache: Path) -> None:
    settings = settings_for("tiny-sd15", model_cache, api_key="s3cret-key")
    with thread_server(settings) as url:
        assert httpx.post(f"{url}/generate", json=SMALL).status_code == 401
        wrong = httpx.post(f"{url}/generate", json=SMALL, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error_type"] == "unauthorized"
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200  # health checks stay open
        with ServiceClient(url, api_key="s3cret-key") as client:
            assert client.generate(**SMALL).success
            assert "sdxl_requests_total" in client.metrics_text()


def test_api_key_off_means_open(service_url) -> None:
    assert httpx.post(f"{service_url('tiny-sd15')}/generate", json=SMALL, timeout=60).status_code == 200


def test_loading_answers_503_and_health_says_loading(model_cache: Path) -> None:
    state = ServiceState(settings_for("tiny-sd15", model_cache))
    release = threading.Event()
    real_load = state.engine.load

    def slow_load() -> None:
        release.wait(60)
        real_load()

    state.engine.load = slow_load  # type: ignore[method-assign]
    import uvicorn

    from service.app import create_app
    from tests.support.servers import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state.settings, state), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            if server.started:
                break
            threading.Event().wait(0.05)
        assert httpx.get(f"{url}/health").json()["status"] == "loading"
        assert httpx.get(f"{url}/ready").status_code == 503
        busy = httpx.post(f"{url}/generate", json=SMALL)
        assert busy.status_code == 503 and busy.json()["error_type"] == "not_ready"
        assert "retry-after" in busy.headers
        release.set()
        from tests.support.servers import wait_ready

        wait_ready(url, timeout=60)
        assert httpx.post(f"{url}/generate", json=SMALL, timeout=60).status_code == 200
    finally:
        release.set()
        server.should_exit = True
        thread.join(15)


def test_failed_load_keeps_the_process_up_and_says_why(tmp_path: Path) -> None:
    settings = ServiceSettings(model="tiny-sd15", cache_dir=tmp_path)
    settings.model = str(tmp_path / "missing-model")
    with thread_server(settings, wait=False) as url:
        for _ in range(100):
            health = httpx.get(f"{url}/health").json()
            if health["status"] != "loading":
                break
            threading.Event().wait(0.05)
        assert health["status"] == "unhealthy" and health["model_loaded"] is False
        assert "missing-model" in health["error"]
        assert httpx.get(f"{url}/ready").status_code == 503
        answer = httpx.post(f"{url}/generate", json=SMALL)
        assert answer.status_code == 503 and "failed to load" in answer.json()["error"]


def test_model_folder_written_by_the_cli_is_served_by_the_cli(tmp_path: Path) -> None:
    folder = tmp_path / "my model"
    build = subprocess.run(
        [sys.executable, "-m", "sdxl_deploy.cli", "models", "build", "tiny-sdxl", "--out", str(folder)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    assert (folder / "base" / "model_index.json").is_file() and (
        folder / "refiner" / "model_index.json"
    ).is_file()
    log = tmp_path / "service.log"
    env = {"SDXL_API_KEY": "k3y-never-logged"}
    with (
        process_server(str(folder), env=env, log=log) as url,
        ServiceClient(url, api_key=env["SDXL_API_KEY"]) as c,
    ):
        health = c.health()
        assert health.backend == "sdxl" and health.refiner_loaded is True
        startup = health.startup
        assert startup.phase == "ready" and startup.load_s is not None and startup.load_s > 0
        assert startup.milestones["loading_started"] <= startup.milestones["base_loaded"]
        answer = c.generate(prompt="a lighthouse", width=64, height=64, num_inference_steps=2)
        assert decode_image(answer.image).size == (64, 64)
    text = log.read_text()
    assert str(folder / "base") in text and str(folder / "refiner") in text  # the service logged its loading
    assert "k3y-never-logged" not in text


def test_plain_diffusers_folder_is_served(model_cache: Path) -> None:
    from service.models import spec_from_path

    base_only = model_cache / "tiny-sd15" / "base"
    spec = spec_from_path(base_only)
    assert spec.backend == "sd15" and spec.base == str(base_only.resolve())
    with thread_server(settings_for(str(base_only), model_cache)) as url:
        # a plain folder gets the real SD1.5 size range, not the tiny models' wider one
        too_small = httpx.post(f"{url}/generate", json=SMALL, timeout=60)
        assert too_small.status_code == 422 and "between 256 and 1024" in too_small.json()["error"]
        ok = httpx.post(
            f"{url}/generate", json={**SMALL, "width": 256, "height": 256, "num_inference_steps": 1}
        )
        assert ok.status_code == 200


def test_settings_refuse_a_public_bind_unless_asked() -> None:
    with pytest.raises(ValidationError, match="not a loopback address"):
        ServiceSettings(host="0.0.0.0")
    assert ServiceSettings(host="0.0.0.0", allow_public_bind=True).host == "0.0.0.0"
    assert ServiceSettings(host="::1").host == "::1"


def test_unknown_model_name_lists_the_valid_ones(tmp_path: Path) -> None:
    from service.models import resolve_model

    with pytest.raises(ValueError, match=r"model='sdxl-turbo' is neither a known model \(.*tiny-sdxl"):
        resolve_model("sdxl-turbo", tmp_path)


def test_hub_models_use_the_real_repositories() -> None:
    from service.models import REGISTRY

    assert REGISTRY["sdxl"].base == "stabilityai/stable-diffusion-xl-base-1.0"
    assert REGISTRY["sdxl"].refiner == "stabilityai/stable-diffusion-xl-refiner-1.0"
    assert REGISTRY["sdxl"].vae == "madebyollin/sdxl-vae-fp16-fix"


def test_hub_id_loading_fails_clearly_offline(tmp_path: Path) -> None:
    """Here no hub is reachable: `sd15` must fail at load with the repository named, not hang."""
    from service.engine import Engine

    engine = Engine(ServiceSettings(model="sd15", cache_dir=tmp_path))
    with pytest.raises(OSError, match="stable-diffusion-v1-5"):
        engine.load()
