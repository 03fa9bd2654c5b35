"""The hub path, end to end: `sd15` and `sdxl` downloaded by the real `huggingface_hub` client from a local
Hugging Face mirror (olah, tests/support/hub_mirror.py) whose repos have the real ids and file layout, loaded in
bfloat16 as on a GPU, then loaded again from the cache with the hub offline; and loading that follows each
repo's file list (`service/hub.py`): the fp16 variant only where the repo ships it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from flows.box.hosts import LocalHost
from flows.config.target import Target
from flows.runbooks.demo import TINY_REQUEST
from flows.runbooks.runbook import deploy_sdxl
from flows.stages.rollback import current_answers
from service.hub import ModelFilesMissing, plan_load
from service.schema import HealthResponse
from tests.support.flows import summary_of
from tests.support.hub_mirror import (
    NO_SUCH_REPO,
    SD15,
    SDXL_BASE,
    SDXL_REFINER,
    SDXL_VAE,
    TAESD,
    TAESDXL,
    WEIGHTLESS_TAESD,
    Mirror,
)
from tests.support.servers import REPO, free_port, served_process

BF16 = {"SDXL_DTYPE": "bfloat16", "SDXL_DEVICE": "cpu"}
PROMPT = "professional basketball player shooting a three pointer"


def generate(url: str, size: int, **extra: object) -> dict:
    body = {"prompt": PROMPT, "num_inference_steps": 2, "width": size, "height": size, "seed": 7, **extra}
    answer = httpx.post(f"{url}/generate", json=body, timeout=300).json()
    assert answer["success"] is True, answer
    assert answer["final_resolution"] == f"{size}x{size}"
    return answer


def cached_files(hf_home: Path, repo_id: str) -> set[str]:
    """The files of a repo's snapshot in a hub cache (what the service downloaded)."""
    snapshots = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return {p.relative_to(s).as_posix() for s in snapshots.iterdir() for p in s.rglob("*") if p.is_file()}


def loading_lines(log: Path) -> list[str]:
    """The log lines that say which files each component was loaded from."""
    return [
        line
        for line in log.read_text(errors="replace").splitlines()
        if " from hub " in line or "hub cache" in line
    ]


# ----- which files: the repo's file list decides (local folders, fast) ---------------------------------


def local_repo(mirror: Mirror, repo_id: str) -> str:
    """The mirror's working tree of a repo: the real layout (weights as LFS pointers, names are what count)."""
    return str(mirror.root / "models" / repo_id)


def test_fp16_variant_only_where_the_repo_ships_it(hub_mirror: Mirror) -> None:
    base = plan_load(local_repo(hub_mirror, SDXL_BASE), half=True, skip={"vae"})
    assert base.kwargs == {"variant": "fp16", "use_safetensors": True}
    assert base.files == {
        "text_encoder": ["text_encoder/model.fp16.safetensors"],
        "text_encoder_2": ["text_encoder_2/model.fp16.safetensors"],
        "unet": ["unet/diffusion_pytorch_model.fp16.safetensors"],
    }
    refiner = plan_load(local_repo(hub_mirror, SDXL_REFINER), half=True, skip={"vae", "text_encoder_2"})
    assert refiner.variant == "fp16" and list(refiner.files) == ["unet"]
    sd15 = plan_load(local_repo(hub_mirror, SD15), half=True, skip={"safety_checker"})
    assert sd15.variant == "fp16" and set(sd15.files) == {"text_encoder", "unet", "vae"}
    for repo in (SDXL_VAE, TAESD, TAESDXL):  # no fp16 files in the real repos: plain weights, no error
        vae = plan_load(local_repo(hub_mirror, repo), half=True)
        assert vae.kwargs == {"use_safetensors": True}
        assert vae.files == {".": ["diffusion_pytorch_model.safetensors"]}
        assert "plain weights" in vae.describe()
    full = plan_load(local_repo(hub_mirror, SDXL_BASE), half=False)  # float32: the plain files
    assert full.variant is None and full.files["unet"] == ["unet/diffusion_pytorch_model.safetensors"]


def test_a_missing_file_is_named(hub_mirror: Mirror, tmp_path: Path) -> None:
    broken = tmp_path / "sd15-without-unet-weights"
    shutil.copytree(local_repo(hub_mirror, SD15), broken, ignore=shutil.ignore_patterns(".git"))
    for weights in (broken / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()
    with pytest.raises(ModelFilesMissing, match=r"has no file unet/diffusion_pytorch_model\.safetensors"):
        plan_load(str(broken), half=True)
    (broken / "model_index.json").unlink()
    (broken / "config.json").unlink(missing_ok=True)
    with pytest.raises(ModelFilesMissing, match="has no file model_index.json"):
        plan_load(str(broken), half=True)


# ----- served through `sdxl-deploy serve`, downloading from the mirror --------------------------------


@pytest.fixture(scope="module")
def sdxl_home(hub_mirror: Mirror, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One HF_HOME for the module's sdxl starts (the second start reads what the first downloaded)."""
    return tmp_path_factory.mktemp("hf-home-sdxl")


@pytest.mark.slow
def test_sd15_downloads_the_fp16_files_and_generates_in_bfloat16(hub_mirror: Mirror, tmp_path: Path) -> None:
    home, log = tmp_path / "hf-home", tmp_path / "serve.log"
    with served_process("sd15", env={**hub_mirror.env(home), **BF16}, log=log) as (url, _):
        generate(url, 256)
        health = httpx.get(f"{url}/health").json()
    assert health["model"] == "sd15" and health["backend"] == "sd15"
    files = cached_files(home, SD15)
    # The fp16 weights only: half the download, no plain copy, no safety checker (the service has none).
    assert {
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors",
    } <= files
    assert not any(f.startswith("safety_checker/") for f in files)
    assert "unet/diffusion_pytorch_model.safetensors" not in files
    lines = loading_lines(log)
    assert any(f"from {SD15}: fp16 variant from hub {hub_mirror.url}" in line for line in lines), lines


@pytest.mark.slow
def test_sdxl_from_the_mirror_then_from_the_cache_offline(
    hub_mirror: Mirror, sdxl_home: Path, tmp_path: Path
) -> None:
    online = tmp_path / "online.log"
    with served_process("sdxl", env={**hub_mirror.env(sdxl_home), **BF16}, log=online) as (url, _):
        answer = generate(url, 512, use_refiner=True)
        health = httpx.get(f"{url}/health").json()
    assert health["model"] == "sdxl" and health["refiner_loaded"] is True
    assert any("refiner" in stage for stage in answer["timings"]), answer["timings"]  # the refiner ran
    lines = loading_lines(online)
    # The fp16-fix VAE has no fp16 files: plain weights; base and refiner: fp16.
    assert any(f"from {SDXL_VAE}: plain weights from hub" in line for line in lines), lines
    assert any(f"from {SDXL_BASE}: fp16 variant from hub" in line for line in lines), lines
    assert any(f"from {SDXL_REFINER}: fp16 variant from hub" in line for line in lines), lines
    assert cached_files(sdxl_home, SDXL_VAE) >= {"config.json", "diffusion_pytorch_model.safetensors"}
    # the base's own VAE is not downloaded: the fp16-fix VAE replaces it
    assert not any(f.startswith("vae/") for f in cached_files(sdxl_home, SDXL_BASE))

    # Second start: the hub is offline (and its address dead), everything comes from the cache.
    offline_env = {
        **hub_mirror.env(sdxl_home, offline=True),
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
    }
    offline = tmp_path / "offline.log"
    with served_process("sdxl", env={**offline_env, **BF16}, log=offline) as (url, _):
        again = generate(url, 512, use_refiner=True)
    assert again["image"] == answer["image"]  # the same weights, the same seed: the same picture
    lines = loading_lines(offline)
    assert any(f"from {SDXL_VAE}: plain weights from hub cache" in line for line in lines), lines
    assert any(f"from {SDXL_BASE}: fp16 variant from hub cache" in line for line in lines), lines


@pytest.mark.slow
def test_tiny_vae_on_from_the_mirror(hub_mirror: Mirror, tmp_path: Path) -> None:
    home, log = tmp_path / "hf-home", tmp_path / "serve.log"
    env = {**hub_mirror.env(home), **BF16, "SDXL_TINY_VAE": "on", "SDXL_LOAD_REFINER": "false"}
    with served_process("sdxl", env=env, log=log) as (url, _):
        generate(url, 512)
        health = httpx.get(f"{url}/health").json()
    assert health["quality_options"] == [f"tiny_vae={TAESDXL}"]
    assert any(f"from {TAESDXL}: plain weights from hub" in line for line in loading_lines(log))
    assert "diffusion_pytorch_model.safetensors" in cached_files(home, TAESDXL)
    assert not (home / "hub" / f"models--{SDXL_VAE.replace('/', '--')}").exists()  # the tiny VAE replaces it


def start_failing(env: dict[str, str], log: Path, timeout: float = 180.0) -> dict:
    """Start `serve --model sd15` that is expected to fail loading; its /health body once it says why."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sdxl_deploy.cli", "serve", "--model", "sd15", "--port", str(port)],
            env={**os.environ, "PYTHONPATH": str(REPO), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
                if health["status"] == "unhealthy":
                    return health
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(log.read_text(errors="replace")[-3000:])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("repo", "message"),
    [
        (NO_SUCH_REPO, f"hub repo '{NO_SUCH_REPO}' was not found at "),
        (WEIGHTLESS_TAESD, f"hub repo '{WEIGHTLESS_TAESD}' has no file diffusion_pytorch_model.safetensors"),
    ],
)
def test_a_missing_repo_or_file_is_a_clear_error(
    hub_mirror: Mirror, tmp_path: Path, repo: str, message: str
) -> None:
    env = {**hub_mirror.env(tmp_path / "hf-home"), **BF16, "SDXL_TINY_VAE": repo}
    health = start_failing(env, tmp_path / "serve.log")
    assert message in health["error"], health["error"]


# ----- a whole deploy-sdxl run whose new service loads `sdxl` from the mirror -------------------------


@pytest.mark.slow
def test_deploy_flow_serves_sdxl_from_the_mirror(
    prefect_api: None, legacy: tuple[LocalHost, Target], wheel: str, hub_mirror: Mirror, tmp_path: Path
) -> None:
    host, target = legacy
    home = tmp_path / "hf-home"
    new = target.new.model_copy(
        update={
            "model": "sdxl",
            "env": {**target.new.env, **hub_mirror.env(home), **BF16},
            "ready_timeout_s": 600,
        }
    )
    # SDXL's smallest size (512 px), two steps; one warm-up and one measured request. bfloat16 on a shared
    # CPU is slow (~30 s a request here), and this run is about where the weights come from, not speed.
    workload = target.workload.model_copy(
        update={
            "app_request": {**TINY_REQUEST, "width": 512, "height": 512},
            "benchmark_runs": 1,
            "request_timeout_s": 300,
        }
    )
    criteria = [
        c.model_copy(update={"threshold": 300}) if c.name == "p95_seconds" else c for c in target.criteria
    ]
    quality = target.quality.model_copy(update={"prompt_limit": 1})
    target = target.model_copy(
        update={"new": new, "workload": workload, "criteria": criteria, "quality": quality}
    )

    state = deploy_sdxl(target=target, wheel=wheel, runs_dir=str(tmp_path / "runs"), return_state=True)

    assert state.is_completed(), state.message
    summary = summary_of(state)
    assert summary["status"] == "completed" and not summary["rolled_back"]
    gates = {g["criterion"]: g["verdict"] for g in summary["gates"]}
    assert gates["model_loaded"] == gates["app_request"] == gates["resolution"] == "pass", gates
    answer = current_answers(host, target.current)
    assert answer is not None
    health = HealthResponse.model_validate(answer.model_dump())
    assert health.model == "sdxl" and health.refiner_loaded is True
    # stage `prefetch` downloaded the weights while the old service served; the new one loaded them from
    # the cache with the hub offline
    prefetch = summary["facts"]["prefetch"]
    assert prefetch["offline_ready"] and prefetch["bytes_downloaded"] > 1_000_000, prefetch
    lines = loading_lines(Path(target.new.log_file))
    offline = f"{home / 'hub'}"
    assert any(f"from {SDXL_VAE}: plain weights from hub cache {offline}" in line for line in lines), lines
    assert any(f"from {SDXL_BASE}: fp16 variant from hub cache {offline}" in line for line in lines), lines
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in cached_files(home, SDXL_REFINER)
