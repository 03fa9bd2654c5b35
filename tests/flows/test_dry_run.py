"""What preflight (the dry run, and the start of a real run) checks of the new service before anything is
stopped: the model `new.model` names on the box, the app's request and ready sizes against that model, and
how it starts (staged, or refused with the reason), the settings `new.env` passes the service and the criteria's
thresholds. The box is the real `LocalHost` over temporary folders; no Prefect server and no service process,
except in the one test through the flow: each configuration error as a dry run and as a real run, against one
old service."""

from __future__ import annotations

import json
import socket
import struct
import sys
from functools import partial
from pathlib import Path

import pytest

from flows.box.capacity import decide_start_mode
from flows.box.common import service_url
from flows.box.hosts import LocalHost
from flows.box.model_check import check_model, check_new_model
from flows.box.procs import find_service
from flows.config.target import NewService, Target
from flows.errors import PreflightRefused
from flows.evidence.results import GpuInfo, HostFacts
from flows.record.prober import Prober
from flows.runbooks.runbook import deploy_sdxl
from flows.stages.deploy import serve_argv
from service.models import GENERATED_FAMILIES
from tests.support.flows import summary_of

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


def _bad_targets(target: Target, box: Path) -> dict[str, tuple[Target, str]]:
    """The target with each configuration error it refuses, and the words of its refusal (field and value)."""

    def changed(workload: dict[str, object] | None = None, **new: object) -> Target:
        app = {**target.workload.app_request, **(workload or {})}
        return target.model_copy(
            update={
                "new": target.new.model_copy(update=new),
                "workload": target.workload.model_copy(update={"app_request": app}),
            }
        )

    offline_empty_hub = {"HF_HOME": str(box / "empty-hf"), "HF_HUB_OFFLINE": "1"}
    no_such_repo = "sdxl-deploy-tests/no-such-refiner"
    xl = _diffusers_folder(box / "my-sdxl", "StableDiffusionXLPipeline")
    return {
        "misspelt model": (
            changed(model="tiny-sdxll"),
            "new.model: 'tiny-sdxll' is not a known model (did you mean 'tiny-sdxl'?)",
        ),
        "unknown hub repo": (
            changed(env={**target.new.env, **offline_empty_hub, "SDXL_REFINER": no_such_repo}),
            f"new.env.SDXL_REFINER: its refiner loads from the hub cache {box / 'empty-hf' / 'hub'} (the box "
            f"works offline: HF_HUB_OFFLINE): {no_such_repo}: not in the hub cache",
        ),
        "missing local path": (
            changed(model=str(box / "no-such-model")),
            f"new.model: '{box / 'no-such-model'}' does not exist on local",
        ),
        "app request outside the model's bounds": (
            changed({"width": 2048}),
            "workload.app_request.width: must be between 64 and 1024 for tiny-sdxl (got 2048)",
        ),
        "start mode that cannot stage": (  # an SDXL folder, and no room for it beside the old service
            changed({"width": 512, "height": 512}, model=str(xl), start_mode="auto", vram_margin_gb=1000),
            "new.start_mode is auto, but the new service cannot start beside the old one",
        ),
    }


def test_each_configuration_error_fails_the_dry_run_and_the_real_run_before_anything_stops(
    prefect_api: None, legacy: tuple[LocalHost, Target], tmp_path: Path
) -> None:
    """One old service, probed from outside the flow for the whole test; each bad target through the flow as a
    dry run and as a real run: both refused in preflight naming the field and value, the old service's process
    the same one, no request of the outside prober or of the run's own prober failed, nothing shipped."""
    host, target = legacy
    old = find_service(host, target.current.port)
    settings = target.probe.model_copy(update={"app_pause_s": 0.05})
    prober = Prober(partial(service_url, host, target.current.port), target.workload.app_request, settings)
    prober.start()
    try:
        for case, (bad, refusal) in _bad_targets(target, tmp_path / "bad").items():
            for dry_run in (True, False):
                runs = tmp_path / "runs" / case.replace(" ", "-") / ("dry" if dry_run else "real")
                state = deploy_sdxl(target=bad, dry_run=dry_run, runs_dir=str(runs), return_state=True)
                assert state.is_failed(), (case, dry_run, state.message)
                assert "stage 'preflight' failed: PreflightRefused: " in state.message, (case, state.message)
                assert refusal in state.message, (case, dry_run, state.message)
                assert find_service(host, target.current.port) == old, (case, dry_run)
                if not dry_run:  # the run's own prober, on the app's port from the run's start to its end
                    seen = summary_of(state)["downtime"]
                    assert seen["probes"] > 0 and seen["failed_requests"] == 0, (case, seen)
    finally:
        outside = prober.stop()
    assert outside.app_requests > 0 and outside.failed_requests == 0, outside
    assert not Path(target.paths.backup_root).exists()
    assert not (Path(target.new.install_dir) / "releases").exists()


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
    """The target with the app's request changed, and no least size for the resolution gate."""
    target = _target(model)
    app = {**target.workload.app_request, **request}
    criteria = [
        c.model_copy(update={"threshold": None}) if c.name == "resolution" else c for c in target.criteria
    ]
    return target.model_copy(
        update={
            "workload": target.workload.model_copy(update={"app_request": app}),
            "new": target.new.model_copy(update={"ready_sizes": ready_sizes}),
            "criteria": criteria,
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


def test_unknown_app_request_fields_are_refused_with_the_nearest_known_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Named as /generate's `warnings` name them (the field it resembles), and refused: /generate would ignore
    them. An option the model ignores stays a warning, as /generate answers it."""
    host = LocalHost()
    with pytest.raises(PreflightRefused) as refused:
        check_new_model(host, _with_request("tiny-sdxl", width=64, height=63, widht=64, codeformer=1))
    assert str(refused.value) == (
        "workload.app_request.height: Input should be a multiple of 8 (got 63); workload.app_request: unknown "
        "fields codeformer, widht (did you mean width?), which /generate would ignore; accepted: prompt, "
        "negative_prompt, num_inference_steps, width, height, guidance_scale, seed, use_refiner, refiner_split, "
        "use_face_restoration, hires_fix, hires_scale, hires_strength, output_format, sampler, batch_size"
    )
    with caplog.at_level("WARNING"):
        model = check_new_model(
            host, _with_request("tiny-sdxl", width=64, height=64, use_face_restoration=True)
        )
    expected = "workload.app_request: use_face_restoration ignored: no face restorer is installed"
    assert model.warnings == [expected] and expected in caplog.messages


# --- the settings new.env passes the service, and the criteria's thresholds -----------------------------


def test_new_env_is_read_by_the_services_own_settings_model() -> None:
    host = LocalHost()
    fine = {"SDXL_COMPILE": "off", "SDXL_MAX_QUEUE": "4", "SDXL_DEPLOY_CACHE": "/x", "HF_HOME": "/y"}
    assert check_new_model(host, _target("tiny-sdxl", fine)).spec.name == "tiny-sdxl"
    refused = {
        "SDXL_COMPIEL": "on",
        "SDXL_MAX_QUEUE": "0",
        "SDXL_COMPILE": "sometimes",
        "SDXL_PORT": "7000",
    }
    with pytest.raises(PreflightRefused) as problems:
        check_new_model(host, _target("tiny-sdxl", refused))
    assert str(problems.value) == "; ".join(
        [
            "new.env.SDXL_COMPIEL: not a setting of the service (did you mean SDXL_COMPILE?), which would ignore "
            "it; accepted: SDXL_<setting> for a setting of service/settings.py, or SDXL_DEPLOY_CACHE",
            "new.env.SDXL_PORT: the deploy sets the service's port on its command line, which wins over the "
            "environment; set new.port instead",
            "new.env.SDXL_COMPILE: Input should be 'auto', 'on' or 'off' (got 'sometimes')",
            "new.env.SDXL_MAX_QUEUE: Input should be greater than or equal to 1 (got '0')",
        ]
    )
    secret = Target(
        new=NewService(model="tiny-sdxl", python=sys.executable, secret_env={"SDXL_APIKEY": "env:K"})
    )
    with pytest.raises(PreflightRefused, match=r"^new.secret_env.SDXL_APIKEY: .*did you mean SDXL_API_KEY\?"):
        check_new_model(host, secret)
    # A setting the service starts with is the one the app's request is checked against.
    with pytest.raises(PreflightRefused, match=r"workload.app_request.prompt: .*longer than 10 characters"):
        check_new_model(host, _target("tiny-sdxl", {"SDXL_MAX_PROMPT_CHARS": "10"}))
    # Every problem of the target at once: the model's first.
    with pytest.raises(PreflightRefused) as both:
        check_new_model(host, _target("sdxll", {"SDXL_COMPIEL": "on"}))
    assert str(both.value).startswith("new.model: 'sdxll' is not a known model") and "SDXL_COMPIEL" in str(
        both.value
    )


def _with_thresholds(**thresholds: float) -> Target:
    target = _target("tiny-sdxl")
    criteria = [
        c.model_copy(update={"threshold": thresholds[c.name]}) if c.name in thresholds else c
        for c in target.criteria
    ]
    return target.model_copy(update={"criteria": criteria})


def test_criteria_thresholds_are_checked_against_their_ranges() -> None:
    host = LocalHost()
    assert check_new_model(host, _with_thresholds(quality=0, max_downtime_s=0, resolution=1024))
    bad = _with_thresholds(p95_seconds=0, quality=-1, max_downtime_s=float("nan"), tunnel=5)
    with pytest.raises(PreflightRefused) as refused:
        check_new_model(host, bad)
    assert str(refused.value) == "; ".join(
        [
            "criteria.p95_seconds.threshold: 0 is out of range; accepted: above 0 seconds",
            "criteria.tunnel.threshold: tunnel has no threshold (got 5); leave it out",
            "criteria.quality.threshold: -1 is out of range; accepted: at least 0 CLIP points",
            "criteria.max_downtime_s.threshold: nan is out of range; accepted: at least 0 seconds",
        ]
    )
    with pytest.raises(PreflightRefused) as refused:  # the app asks for 1024x1024 (the default request)
        check_new_model(host, _with_thresholds(resolution=2048))
    assert str(refused.value) == (
        "criteria.resolution.threshold: 2048 px is above the app's request (1024x1024, workload.app_request), "
        "so the gate would fail every deploy; accepted: at most 1024"
    )


def test_a_refiner_or_tiny_vae_new_env_names_is_looked_for_where_the_service_loads_it(tmp_path: Path) -> None:
    """On the box's hub (here its hub cache: the box works offline) or, for a folder, on its disk; the
    registry's own refiner is not asked for when another replaces it or none is loaded."""
    hf = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    _cache_repos(tmp_path / "hf", (SDXL_REPOS[0], SDXL_REPOS[2]))  # base and VAE, not the refiner
    unknown = "sdxl-deploy-tests/no-such-refiner"
    with pytest.raises(PreflightRefused) as refused:
        check_model(LocalHost(), _target("sdxl", {**hf, "SDXL_REFINER": unknown}))
    assert str(refused.value) == (
        f"new.env.SDXL_REFINER: its refiner loads from the hub cache {tmp_path / 'hf' / 'hub'} (the box works "
        f"offline: HF_HUB_OFFLINE): {unknown}: not in the hub cache"
    )
    assert check_model(LocalHost(), _target("sdxl", {**hf, "SDXL_LOAD_REFINER": "false"})).hub
    with pytest.raises(PreflightRefused, match=rf"^new.env.SDXL_TINY_VAE: '{tmp_path}/taesd' does not exist"):
        check_model(LocalHost(), _target("tiny-sdxl", {"SDXL_TINY_VAE": str(tmp_path / "taesd")}))
    folder = str(_diffusers_folder(tmp_path / "my-sdxl", "StableDiffusionXLPipeline"))  # on: its family's
    with pytest.raises(
        PreflightRefused, match=r"^new.env.SDXL_TINY_VAE: its tiny VAE loads from the hub cache"
    ):
        check_model(LocalHost(), _target(folder, {**hf, "SDXL_TINY_VAE": "on"}))
