"""The GPU benchmark's pure parts on the CPU: scenarios as data, the image comparison, the start-up figures from
`/health`, the table, the shared launcher, the CLI, and the wheel that leaves the benchmarks out."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bench.harness import Results
from bench.images import image_diff
from bench.launch import REPO, ServiceProcess
from bench.scenarios import SCENARIOS, scenario_sizes
from bench.startup import NO_STARTUP_FACTS, startup_figures
from bench.table import table
from service.schema import StartupFacts


def test_scenarios_cover_the_issue_targets() -> None:
    by_name = {s.name: s for s in SCENARIOS}
    assert by_name["sdxl-1024-30"].steps == 30 and by_name["sdxl-1024-30"].target_p50_s == 0.85
    refiner = by_name["sdxl-1024-20+refiner"]
    assert refiner.use_refiner and refiner.refiner_split == 0.8 and refiner.steps == 20
    assert by_name["sd15-512-20"].size == 512 and by_name["sd15-512-20"].target_p50_s == 0.15
    assert scenario_sizes(refiner, tiny=True) == (4, 128) and scenario_sizes(refiner, tiny=False) == (
        20,
        1024,
    )


def test_image_diff_is_zero_for_equal_images_and_measures_a_shift() -> None:
    a = np.random.default_rng(0).integers(0, 250, (32, 32, 3), dtype=np.uint8)
    assert image_diff(a, a) == {"mean_abs": 0.0, "max_abs": 0.0, "psnr_db": float("inf")}
    shifted = image_diff(a + 1, a)
    assert shifted["mean_abs"] == 1.0 and shifted["max_abs"] == 1.0 and round(shifted["psnr_db"], 1) == 48.1


def test_table_puts_baseline_beside_service_and_says_met_or_missed() -> None:
    r = Results(meta={"gpu": "NVIDIA H200", "torch": "2.11", "diffusers": "0.42.1"})
    r.baseline["sdxl"] = {
        "sdxl-1024-30": {"fp16_eager": {"pipeline_p50_s": 3.2, "pipeline_plus_png_b64_p50_s": 3.4}}
    }
    same = {"psnr_db": 49.7, "dtype_floor_psnr_db": 14.1, "ok": True}
    r.service["sdxl"] = {
        "sdxl-1024-30": {"e2e_p50_s": 1.105, "same_seed_vs_eager": same, "peak_vram_gib": 12.8},
        "sdxl-1024-20+refiner": {"e2e_p50_s": 0.842},
        "cold_start": {"ready_s": 285.0, "warmup_compile_s": 248.5},
    }
    text = table(r)
    assert "NVIDIA H200" in text
    row = next(line for line in text.splitlines() if line.startswith("sdxl-1024-30"))
    assert "3.200 s" in row and "1.105 s" in row and "MISSED" in row and "49.7 dB" in row
    refiner = next(line for line in text.splitlines() if line.startswith("sdxl-1024-20+refiner"))
    assert "met" in refiner and "MISSED" not in refiner
    assert "cold start to ready 285.000 s (warm-up/compile 248.500 s)" in text


# What a service started at epoch 1_795_000_000.0 states in `/health` (`service.schema.StartupFacts`) once ready.
SPAWNED_AT = 1_795_000_000.0
STARTUP = StartupFacts.model_validate(
    {
        "phase": "ready",
        "milestones": {
            "started": SPAWNED_AT + 6.5,
            "loading_started": SPAWNED_AT + 7.0,
            "base_loaded": SPAWNED_AT + 8.25,
            "warmup_started": SPAWNED_AT + 9.0,
            "warmup_done": SPAWNED_AT + 70.0,
            "ready": SPAWNED_AT + 70.1,
        },
        "load_s": 1.3,
        "warmup_s": 61.0,
        "compile": True,
        "compiled_functions": 2,
        "loaded_functions": 4,
        "compile_fallbacks": [],
        "compiled_shapes": ["base 512x512 x1", "base 512x512 x2"],
        "warnings": [],
    }
)


def test_startup_figures_come_from_the_services_own_startup_facts() -> None:
    figures = startup_figures(STARTUP, ready_s=70.4321, spawned_at=SPAWNED_AT)
    assert figures["ready_s"] == 70.43  # as the client measured it
    assert figures["warmup_compile_s"] == 61.0 and figures["base_load_s"] == 1.3
    # each milestone placed after the spawn, in seconds
    assert figures["timeline_s"] == {
        "started": 6.5,
        "loading_started": 7.0,
        "base_loaded": 8.25,
        "warmup_started": 9.0,
        "warmup_done": 70.0,
        "ready": 70.1,
    }
    assert figures["saved_compile"] == {"loaded": 4, "compiled": 2}
    assert figures["startup_warnings"] == [] and figures["target_ready_s"] == 60.0
    off = STARTUP.model_copy(
        update={"warnings": ["torch.compile does not work here (x): serving uncompiled"]}
    )
    assert startup_figures(off, ready_s=1, spawned_at=SPAWNED_AT)["startup_warnings"] == off.warnings


def test_startup_figures_of_a_service_without_startup_facts_say_so() -> None:
    figures = startup_figures(None, ready_s=12.0, spawned_at=SPAWNED_AT)
    assert figures["ready_s"] == 12.0 and figures["startup_warnings"] == [NO_STARTUP_FACTS]
    assert (
        figures["warmup_compile_s"] is None
        and figures["timeline_s"] == {}
        and figures["saved_compile"] is None
    )


def test_no_service_log_is_parsed_in_bench() -> None:
    sources = {path.name: path.read_text() for path in (REPO / "bench").glob("*.py")}
    assert not [name for name, text in sources.items() if "import re\n" in text or "re.findall" in text]


def test_launcher_reports_a_service_that_exits_before_ready_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    service = ServiceProcess("tiny-sd15", env={"SDXL_HOST": "10.1.2.3"}, log=log, ready_timeout_s=60)
    with pytest.raises(RuntimeError, match=r"service exited with \d+ before it was ready: .*not a loopback"):
        service.start()
    assert service.proc is not None and service.proc.poll() is not None  # gone, not left running
    assert "not a loopback address" in log.read_text()


def test_bench_gpu_is_a_cli_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sdxl_deploy.cli", "bench-gpu", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "--tiny" in out.stdout and "--models" in out.stdout
    for option, value in (("--models", "sd14"), ("--variants", "fp4"), ("--skip", "build")):
        refused = subprocess.run(
            [sys.executable, "-m", "sdxl_deploy.cli", "bench-gpu", "--tiny", option, value],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 2 and f"unknown {option} ['{value}']; valid: " in refused.stderr


def test_the_deploys_wheel_holds_no_benchmark_and_its_cli_says_where_they_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wheel the deploy builds (`pip wheel --no-deps --no-build-isolation`) and installs on the box, from a
    copy of this checkout whose setuptools staging folder still holds the benchmark modules of an older build."""
    from flows.stages import deploy

    checkout = tmp_path / "checkout"
    shutil.copytree(
        REPO,
        checkout,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".cache", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )
    assert (checkout / "bench" / "harness.py").is_file()
    for stale in ("service/bench.py", "service/bench_unet.py", "bench/harness.py"):
        (checkout / "build" / "lib" / stale).parent.mkdir(parents=True, exist_ok=True)
        (checkout / "build" / "lib" / stale).write_text("STALE = True\n")
    monkeypatch.setattr(deploy, "PROJECT_ROOT", checkout)
    wheel = deploy.build_wheel.fn(tmp_path / "wheel")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sdxl_deploy/cli.py" in names and "service/engine.py" in names
    assert [n for n in names if n.startswith("bench/") or n.startswith("service/bench")] == []
    # the installed CLI (the wheel's files alone, run from elsewhere) says how to get the benchmarks
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    for command in ("bench-gpu", "bench-unet"):
        stub = subprocess.run(
            [sys.executable, "-m", "sdxl_deploy.cli", command, "--help"],
            cwd=site,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert stub.returncode == 2, stub.stderr
        assert f"`sdxl-deploy {command}` runs from a checkout" in stub.stderr
        assert "not part of the installed wheel" in stub.stderr


def test_bench_unet_times_each_variant_and_compares_outputs_with_eager(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from bench.unet import VARIANTS, run

    eager = tuple(v for v in VARIANTS if not v.compiled and v.attention == "default")
    results = run(tmp_path, family="sdxl", calls=2, variants=eager, tiny=True)
    assert [(r.variant.name, r.variant.images) for r in results] == [("eager", 1), ("eager", 2), ("eager", 4)]
    assert results[0].rel_err == 0.0  # the same inputs through the same eager module
    assert results[1].rel_err is None  # batch > 1 has no single-image reference
    assert all(abs(r.ms_per_image - r.ms_per_call / r.variant.images) <= 0.01 for r in results)
    data = json.loads((tmp_path / "bench-unet.json").read_text())
    assert data["family"] == "sdxl" and len(data["results"]) == 3 and data["flop_per_image_call"] > 0
    assert set(data["stages_ms"]) == {
        "encode_prompt_cfg",
        "vae_decode",
        "tiny_vae_decode",
        "postprocess_pil",
        "postprocess_service",
    }


@pytest.mark.slow
@pytest.mark.timeout(900)  # six service starts and the baseline: minutes on a CPU that other work shares
def test_bench_gpu_times_opt_in_variants_beside_the_default_service(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from bench.harness import BenchConfig
    from bench.run import run_bench

    config = BenchConfig(
        families=("sd15",),
        out=tmp_path / "out",
        work=tmp_path / "work",
        tiny=True,
        variants=("tiny-vae", "cfg-cutoff-0.5"),
        restart=True,
        concurrency=0,
        reps=1,
        baseline_reps=1,
        ablation=False,
        budget_s=3600.0,  # on a busy CPU the default budget (a device command's 600 s) would skip the variants
    )
    results = run_bench(config)
    assert results.errors == []
    default, tiny_vae, cut = (results.service[k] for k in ("sd15", "sd15:tiny-vae", "sd15:cfg-cutoff-0.5"))
    assert default["quality_options"] == [] and default["sd15-512-20"]["same_seed_vs_eager"]["ok"] is True
    # two untimed requests at the scenario's prompt, then each timed one at a prompt the service has not seen:
    # the store serves the repeats (and SD1.5's empty negative prompt), never a timed prompt
    assert default["health_after"]["prompt_cache"] == {"kept": 3, "size": 64, "hits": 3, "misses": 3}
    assert tiny_vae["env"]["SDXL_TINY_VAE"] == "on" and tiny_vae["quality_options"][0].startswith("tiny_vae=")
    assert cut["env"]["SDXL_CFG_CUTOFF"] == "0.5" and cut["quality_options"] == ["cfg_cutoff=0.5"]
    for variant in (tiny_vae, cut):  # images differ on purpose: reported, not judged
        same = variant["sd15-512-20"]["same_seed_vs_eager"]
        assert (
            same["ok"] is None and same["psnr_db"] < default["sd15-512-20"]["same_seed_vs_eager"]["psnr_db"]
        )
        assert variant["sd15-512-20"]["same_seed_vs_default"]["mean_abs"] > 0
    # every set-up is restarted on its own warm cache, with its own settings
    assert set(results.restart) == {"sd15", "sd15:tiny-vae", "sd15:cfg-cutoff-0.5"}
    for restart in results.restart.values():
        assert restart["warm_start"]["ready_s"] > 0 and restart["sd15-512-20"]["e2e_p50_s"] > 0
    assert (config.out / "serve-sd15-cfg-cutoff-0.5-restart.log").read_text().count("cfg_cutoff=0.5")
    text = (config.out / "table.txt").read_text()
    assert "sd15-512-20 [tiny-vae]: e2e" in text and "sd15-512-20 [cfg-cutoff-0.5]: e2e" in text
    assert "x the default service" in text and "sd15:tiny-vae: restart to ready" in text
