"""The GPU benchmark's pure parts on the CPU: scenarios as data, the image comparison, the table, the CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from service.bench import SCENARIOS, Results, image_diff, scenario_sizes, table
from tests.servers import REPO


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


def test_bench_unet_times_each_variant_and_compares_outputs_with_eager(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from service.bench_unet import VARIANTS, run

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


def test_startup_timeline_places_each_milestone_after_the_spawn() -> None:
    import datetime

    from service.bench import startup_timeline

    spawned = datetime.datetime(2026, 11, 27, 7, 38, 0).timestamp()
    log = "\n".join(
        [
            "some warning printed by an import",
            "2026-11-27 07:38:06,500 INFO service.server: listening",
            "2026-11-27 07:38:07,000 INFO service.engine: Loading synthetic-sd15 (sd15) on cuda as bfloat16",
            "2026-11-27 07:38:08,250 INFO service.engine: Base model loaded in 1.3 s",
            "2026-11-27 07:38:09,000 INFO service.accel: speed: warming up base at 512x512, 1 image(s)",
            "2026-11-27 07:38:40,000 INFO service.accel: speed: warming up base at 512x512, 2 image(s)",
            "2026-11-27 07:39:10,000 INFO service.accel: speed: warm-up took 61.0 s",
            "2026-11-27 07:39:10,100 INFO service.engine: Model loaded successfully: synthetic-sd15",
        ]
    )
    assert startup_timeline(log, spawned) == {
        "first_log_line": 6.5,
        "loading_started": 7.0,
        "base_loaded": 8.25,
        "warmup_started": 9.0,
        "warmup_done": 70.0,
        "model_ready": 70.1,
    }


def test_bench_gpu_times_opt_in_variants_beside_the_default_service(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from service.bench import BenchConfig, run_bench

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
