"""What preflight (the dry run, and the start of a real run) checks of the new service before anything is
stopped: the model `new.model` names on the box, the app's request and ready sizes against that model, and
how it starts (staged, or refused with the reason). The box is the real `LocalHost` over temporary folders;
no Prefect server and no service process, except in the one end-to-end dry run."""

from __future__ import annotations

import json
import socket
import struct
import sys
from pathlib import Path

import pytest

from flows.capacity import decide_start_mode
from flows.errors import PreflightRefused
from flows.hosts import LocalHost
from flows.model_check import check_model, check_new_model
from flows.procs import find_service
from flows.runbook import deploy_sdxl
from flows.target import NewService, Target
from flows.tasks.deploy import serve_argv
from flows.tasks.preflight import GpuInfo, HostFacts
from service.models import GENERATED_FAMILIES

SDXL_REPOS = (
    "stabilityai/stable-diffusion-xl-base-1.0",
    "stabilityai/stable-diffusion-xl-refiner-1.0",
    "madebyollin/sdxl-vae-fp16-fix",
)


def _target(model: str, env: dict[str, str] | None = None) -> Target:
    return Target(new=NewService(model=model, python=sys.executable, env=env or {}))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _diffusers_folder(path: Path, class_name: str) -> Path:
    path.mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return path


def _safetensors(path: Path, keys: list[str]) -> Path:
    header = json.dumps(
        {key: {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for key in keys}
    ).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def _cache_repos(hf_home: Path, repos: tuple[str, ...]) -> None:
    """A hub cache holding a snapshot of each repo at `main`, as huggingface_hub lays it out."""
    for repo in repos:
        root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text("0" * 40)
        (root / "snapshots" / ("0" * 40)).mkdir(parents=True)
        (root / "snapshots" / ("0" * 40) / "config.json").write_text("{}")


def test_a_misspelt_model_is_refused_with_the_nearest_known_name() -> None:
    with pytest.raises(PreflightRefused) as refused:
        check_model(LocalHost(), _target("sdxll"))
    message = str(refused.value)
    assert message.startswith("new.model: 'sdxll' is not a known model (did you mean 'sdxl'?)")
    assert "tiny-sdxl" in message and "diffusers folder" in message
    with pytest.raises(PreflightRefused, match=r"'stabilityai/sdxl-turbo'.*a hub repo id is served through"):
        check_model(LocalHost(), _target("stabilityai/sdxl-turbo"))


def test_a_generated_model_is_known_without_building_it() -> None:
    model = check_model(LocalHost(), _target("tiny-sdxl"))
    assert (model.kind, model.spec.backend, model.measured_as) == ("known", "sdxl", "tiny-sdxl")
    assert (model.spec.min_size, model.spec.max_size) == (64, 1024)


def test_the_generated_families_are_those_the_builders_build() -> None:
    from service.builders import SPECS

    assert {name: spec.backend for name, spec in SPECS.items()} == GENERATED_FAMILIES


def test_a_folder_is_read_on_the_box_and_its_family_comes_from_its_own_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = LocalHost()
    xl = _diffusers_folder(tmp_path / "my-sdxl", "StableDiffusionXLPipeline")
    model = check_model(host, _target(str(xl)))
    assert (model.kind, model.spec.backend, model.measured_as) == ("folder", "sdxl", "sdxl")
    assert (model.spec.min_size, model.spec.max_size) == (512, 2048)
    v15 = _diffusers_folder(tmp_path / "my-sd15", "StableDiffusionPipeline")
    assert check_model(host, _target(str(v15))).measured_as == "sd15"
    built = tmp_path / "built"
    built.mkdir()
    (built / "MODEL.json").write_text(json.dumps({"name": "tiny-sdxl", "backend": "sdxl", "generated": True}))
    assert check_model(host, _target(str(built))).measured_as == "tiny-sdxl"  # its own measured need
    monkeypatch.setenv("HOME", str(tmp_path))  # the box's $HOME: `~/` is resolved there
    assert check_model(host, _target("~/my-sdxl")).spec.base == str(xl)


def test_a_missing_or_foreign_path_is_refused_naming_it(tmp_path: Path) -> None:
    host = LocalHost()
    with pytest.raises(PreflightRefused, match=rf"new.model: '{tmp_path}/nope' does not exist on local"):
        check_model(host, _target(str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreflightRefused, match="without model_index.json or MODEL.json"):
        check_model(host, _target(str(tmp_path / "empty")))
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(PreflightRefused, match=r"must end in \.safetensors or \.ckpt"):
        check_model(host, _target(str(tmp_path / "weights.bin")))


def test_a_checkpoint_file_has_its_family_read_from_its_header_on_the_box(tmp_path: Path) -> None:
    host = LocalHost()
    xl = _safetensors(tmp_path / "xl.safetensors", ["conditioner.embedders.1.model.ln_final.weight"])
    assert check_model(host, _target(str(xl))).spec.backend == "sdxl"
    v15 = _safetensors(tmp_path / "v15.safetensors", ["cond_stage_model.transformer.text_model.x"])
    assert check_model(host, _target(str(v15))).spec.backend == "sd15"
    (tmp_path / "broken.safetensors").write_bytes(b"not a header")
    with pytest.raises(PreflightRefused, match="not a readable safetensors file"):
        check_model(host, _target(str(tmp_path / "broken.safetensors")))


def test_an_offline_box_must_hold_a_hub_models_repos_in_its_cache(tmp_path: Path) -> None:
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    _cache_repos(tmp_path / "hf", SDXL_REPOS[:2])
    with pytest.raises(PreflightRefused) as refused:
        check_model(LocalHost(), _target("sdxl", env))
    message = str(refused.value)
    assert "HF_HUB_OFFLINE" in message and "madebyollin/sdxl-vae-fp16-fix: not in the hub cache" in message
    assert "stable-diffusion-xl-base-1.0" not in message
    _cache_repos(tmp_path / "hf", SDXL_REPOS[2:])
    assert check_model(LocalHost(), _target("sdxl", env)).hub == f"hub cache {tmp_path / 'hf' / 'hub'}"


def test_a_hub_the_box_cannot_reach_is_the_error() -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint}
    with pytest.raises(PreflightRefused, match=rf"local cannot reach at {endpoint} \("):
        check_model(LocalHost(), _target("sd15", env))


def test_a_misspelt_model_fails_the_dry_run_with_the_old_service_untouched(
    prefect_api: None, legacy: tuple[LocalHost, Target], tmp_path: Path
) -> None:
    """The one run through the flow: the check is part of preflight, which the real run shares."""
    host, target = legacy
    target = target.model_copy(update={"new": target.new.model_copy(update={"model": "sdxll"})})
    process = find_service(host, target.current.port)
    state = deploy_sdxl(target=target, dry_run=True, runs_dir=str(tmp_path / "runs"), return_state=True)
    assert state.is_failed() and "stage 'preflight' failed: PreflightRefused" in state.message
    assert "new.model: 'sdxll' is not a known model (did you mean 'sdxl'?)" in state.message
    assert find_service(host, target.current.port) == process and not Path(target.paths.backup_root).exists()


# --- the start mode: auto stages or refuses, never stop-first by itself ------------------------------


def _facts(gpu_free_gb: float | None) -> HostFacts:
    gpus = [] if gpu_free_gb is None else [GpuInfo(name="RTX 3090 Ti", total_gb=24.0, free_gb=gpu_free_gb)]
    return HostFacts(
        free_disk_gb=100,
        needed_disk_gb=25,
        gpus=gpus,
        driver=None,
        python=sys.executable,
        python_version="3.11",
        packages={},
        torch_cuda=None,
        cuda_available=None,
        problems=[],
    )


def _on_ports(target: Target, **new: object) -> Target:
    """The target with the app's port just below a port nothing listens on (its default staging port)."""
    port = _closed_port() - 1
    current = target.current.model_copy(update={"port": port})
    return target.model_copy(
        update={"current": current, "new": target.new.model_copy(update={"port": port, **new})}
    )


def test_a_folder_of_the_sdxl_family_needs_what_sdxl_needs(tmp_path: Path) -> None:
    host = LocalHost()
    target = _on_ports(_target(str(_diffusers_folder(tmp_path / "my-sdxl", "StableDiffusionXLPipeline"))))
    model = check_model(host, target)
    fits = decide_start_mode(host, target, _facts(20.0), model)  # 17.6 + 1.5 GiB margin = 19.1
    assert fits.mode == "staged" and fits.stage_port == target.new.staging_port
    assert "measured as sdxl, needs 17.6 + 1.5 GiB margin = 19.1 GiB, fits in 20 GiB" in fits.reason
    with pytest.raises(PreflightRefused) as refused:
        decide_start_mode(host, target, _facts(18.0), model)
    assert "new.start_mode is auto, but the new service cannot start beside the old one" in str(refused.value)
    assert "does not fit in 18 GiB free VRAM; set new.start_mode: stop-first" in str(refused.value)
    # No GPU: an SDXL folder's CPU memory need is not measured, so auto refuses rather than guess.
    with pytest.raises(PreflightRefused, match="no measured CPU memory need for model 'sdxl'"):
        decide_start_mode(host, target, _facts(None), model)
    forced = _on_ports(target, start_mode="staged")
    assert "forced" in decide_start_mode(host, forced, _facts(18.0), model).reason
    stop_first = target.model_copy(update={"new": target.new.model_copy(update={"start_mode": "stop-first"})})
    assert decide_start_mode(host, stop_first, _facts(18.0), model).mode == "stop-first"


def test_a_taken_staging_port_stages_on_another_one_the_start_command_uses() -> None:
    host = LocalHost()
    target = _on_ports(_target("tiny-sdxl"))
    model = check_model(host, target)
    with socket.create_server(("127.0.0.1", target.new.staging_port)):
        decision = decide_start_mode(host, target, _facts(None), model)
        assert decision.mode == "staged" and decision.stage_port not in (None, target.new.staging_port)
        assert f"the staging port {target.new.staging_port} is in use on local (PIDs [" in decision.reason
        assert f"so the new service stages on port {decision.stage_port}" in decision.reason
        argv = serve_argv(target, stage_port=decision.stage_port)
        assert argv[argv.index("--stage-port") + 1] == str(decision.stage_port)
        pinned = target.model_copy(
            update={"new": target.new.model_copy(update={"stage_port": target.new.staging_port})}
        )
        with pytest.raises(PreflightRefused, match=r"new.stage_port: the staging port \d+ is in use"):
            decide_start_mode(host, pinned, _facts(None), model)


def test_a_new_service_on_another_port_than_the_apps_cannot_stage() -> None:
    host = LocalHost()
    target = _on_ports(_target("tiny-sdxl"))
    elsewhere = target.model_copy(update={"new": target.new.model_copy(update={"port": target.new.port + 2})})
    with pytest.raises(PreflightRefused, match=r"nothing to take over; set new.start_mode: stop-first"):
        decide_start_mode(host, elsewhere, _facts(None), check_model(host, elsewhere))


# --- the app's request and the ready sizes, against the new model's own bounds ---------------------


def _with_request(model: str, ready_sizes: list[str] | None = None, **request: object) -> Target:
    target = _target(model)
    app = {**target.workload.app_request, **request}
    return target.model_copy(
        update={
            "workload": target.workload.model_copy(update={"app_request": app}),
            "new": target.new.model_copy(update={"ready_sizes": ready_sizes}),
        }
    )


def test_the_app_request_is_validated_as_generate_would_for_the_new_model(tmp_path: Path) -> None:
    host = LocalHost()
    assert check_new_model(host, _with_request("tiny-sdxl", width=64, height=64)).spec.name == "tiny-sdxl"
    with pytest.raises(PreflightRefused) as refused:
        check_new_model(host, _with_request("tiny-sdxl", width=1001, height=64))
    assert str(refused.value) == "workload.app_request.width: Input should be a multiple of 8 (got 1001)"
    with pytest.raises(PreflightRefused) as refused:
        check_new_model(host, _with_request("tiny-sdxl", width=1536, height=64, num_inference_steps=0))
    assert (
        "workload.app_request.num_inference_steps: Input should be greater than or equal to 1 (got 0)"
        in str(refused.value)
    )
    with pytest.raises(PreflightRefused) as refused:  # the schema allows it; tiny-sdxl serves up to 1024
        check_new_model(host, _with_request("tiny-sdxl", width=1536, height=64))
    assert (
        str(refused.value)
        == "workload.app_request.width: must be between 64 and 1024 for tiny-sdxl (got 1536)"
    )
    v15 = _diffusers_folder(tmp_path / "my-sd15", "StableDiffusionPipeline")  # SD1.5 serves 256-1024
    with pytest.raises(PreflightRefused, match=r"workload.app_request.height: must be between 256 and 1024"):
        check_new_model(host, _with_request(str(v15), width=1024, height=1280))


def test_ready_sizes_set_in_the_target_are_checked_against_the_models_range() -> None:
    host = LocalHost()
    assert check_new_model(host, _with_request("tiny-sdxl", ["64x64", "1024x512"], width=64, height=64))
    with pytest.raises(PreflightRefused) as refused:
        check_new_model(host, _with_request("tiny-sdxl", ["64x64", "2048x2048"], width=64, height=64))
    assert (
        str(refused.value) == "new.ready_sizes: '2048x2048' is outside 64-1024 px, the sizes tiny-sdxl serves"
    )
