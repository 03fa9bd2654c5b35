"""What the GPU benchmark times, as data: request shapes (`SCENARIOS`), service set-ups (`SERVICE_VARIANTS`),
the models per family and the performance targets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scenario:
    """One request shape, timed on the baseline and on the service."""

    name: str
    family: str  # "sdxl" or "sd15"
    steps: int
    size: int
    use_refiner: bool = False
    refiner_split: float = 0.8
    target_p50_s: float | None = None  # end-to-end target on the service
    seed: int = 1234
    prompt: str = "professional basketball player shooting a three pointer, arena lights"


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("sdxl-1024-30", "sdxl", steps=30, size=1024, target_p50_s=0.85),
    Scenario("sdxl-1024-20+refiner", "sdxl", steps=20, size=1024, use_refiner=True, target_p50_s=0.85),
    Scenario("sd15-512-20", "sd15", steps=20, size=512, target_p50_s=0.15),
)

# Service set-ups timed beside the shipped defaults (`--variants`), as data: name -> environment. Each image is
# compared with the default service's at the same seed; the opt-ins change images, so theirs is not judged.
SERVICE_VARIANTS: dict[str, dict[str, str]] = {
    "no-cuda-graphs": {"SDXL_CUDA_GRAPHS": "off"},
    "cfg-cutoff-0.5": {"SDXL_CFG_CUTOFF": "0.5"},
    "tiny-vae": {"SDXL_TINY_VAE": "on"},
    "cfg-cutoff-0.5+tiny-vae": {"SDXL_CFG_CUTOFF": "0.5", "SDXL_TINY_VAE": "on"},
    "no-cudnn-benchmark": {"SDXL_CUDNN_BENCHMARK": "off"},
    "no-prompt-cache": {"SDXL_PROMPT_CACHE_SIZE": "0"},
    "compiled-text-encoders": {"SDXL_COMPILE_TEXT_ENCODERS": "on"},
    "no-compiled-text-encoders": {"SDXL_COMPILE_TEXT_ENCODERS": "off"},
    # torch.compile traced again at every start instead of loading the saved compiled functions
    "no-saved-compile": {"SDXL_SAVE_COMPILED": "off"},
    # torch's experimental cache of Dynamo's traces and guards: meant to skip tracing on a warm start, measured
    # slower on torch 2.11 (docs/BENCHMARKS.md, "Measured and rejected"); kept to re-measure on later releases
    "dynamo-cache": {"TORCH_CACHING_PRECOMPILE": "1"},
}
# `--skip`: stages a follow-up run already has ("service": the default set-up; its cache still seeds variants)
SKIPPABLE_STAGES = ("baseline", "eager", "service", "encode")

FAMILY_MODELS = {"sdxl": "synthetic-sdxl", "sd15": "synthetic-sd15"}
TINY_MODELS = {"sdxl": "tiny-sdxl", "sd15": "tiny-sd15"}

# Performance targets that are not per-scenario latencies
TARGETS = {
    "encode_1024_ms": 40.0,
    "peak_vram_base_refiner_gib": 16.0,
    "restart_ready_s": 60.0,
    "concurrency_speedup": 1.3,
}
# Same-seed check: the optimised service image against the service's eager image (PSNR, dB)
SAME_IMAGE_MIN_PSNR_DB = 30.0


def scenarios_of(family: str) -> list[Scenario]:
    """The scenarios of one model family, in `SCENARIOS` order."""
    return [s for s in SCENARIOS if s.family == family]


def scenario_sizes(s: Scenario, tiny: bool) -> tuple[int, int]:
    """(steps, size): tiny runs keep the structure at a CPU-friendly cost."""
    return (min(s.steps, 4), 128) if tiny else (s.steps, s.size)


def setup_key(family: str, label: str) -> str:
    """Where a service set-up's figures are kept: the family for the default, "family:variant" otherwise."""
    return family if label == "default" else f"{family}:{label}"
